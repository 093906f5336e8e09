// ProcessGroupGloo.hpp holds these only through shared_ptr/unique_ptr: incomplete types suffice.
#pragma once
namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
class Pair;
class Context;
}  // namespace transport
}  // namespace gloo
