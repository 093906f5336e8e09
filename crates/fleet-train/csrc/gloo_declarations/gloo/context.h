// ProcessGroupGloo.hpp's inline setTimeout() calls context->setTimeout(), so gloo::Context must be
// a complete type with that member; libtorch_cpu.so exports its definition. Data members are left
// out because the shim never creates, copies or inspects a Context.
#pragma once
#include <chrono>
#include <memory>
#include <gloo/transport/device.h>
namespace gloo {
class Context {
 public:
  Context() = delete;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  virtual ~Context();
  void setTimeout(std::chrono::milliseconds timeout);
  std::chrono::milliseconds getTimeout() const;
};
}  // namespace gloo
