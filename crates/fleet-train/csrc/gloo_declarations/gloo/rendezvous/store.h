// ProcessGroupGloo.hpp defines GlooStore as a subclass of gloo::rendezvous::Store. The virtual
// functions are declared in gloo's own order (IStore, then Store) so that a vtable emitted here
// would match libtorch's; in practice none is, since only libtorch constructs a GlooStore.
#pragma once
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#define GLOO_STORE_HAS_STORE_V2 1

namespace gloo {
class IStore {
 public:
  virtual ~IStore() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
  virtual bool has_v2_support() = 0;
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>& keys) = 0;
  virtual void multi_set(const std::vector<std::string>& keys,
                         const std::vector<std::vector<char>>& values) = 0;
  virtual void append(const std::string& key, const std::vector<char>& value) = 0;
  virtual int64_t add(const std::string& key, int64_t value) = 0;
};

namespace rendezvous {
class Store : public IStore {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::seconds(30);
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) {
    wait(keys);
  }
  virtual bool has_v2_support() { return false; }
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>&) {
    throw std::runtime_error("gloo::rendezvous::Store::multi_get is not declared here");
  }
  virtual void multi_set(const std::vector<std::string>&, const std::vector<std::vector<char>>&) {
    throw std::runtime_error("gloo::rendezvous::Store::multi_set is not declared here");
  }
  virtual void append(const std::string&, const std::vector<char>&) {
    throw std::runtime_error("gloo::rendezvous::Store::append is not declared here");
  }
  virtual int64_t add(const std::string&, int64_t) {
    throw std::runtime_error("gloo::rendezvous::Store::add is not declared here");
  }
};
}  // namespace rendezvous
}  // namespace gloo
