// A C interface over PyTorch's c10d (TCPStore, ProcessGroupGloo and, built with
// FLEET_WITH_NCCL, ProcessGroupNCCL) for fleet-train's Rust code (src/train/ddp.rs).
//
// Conventions, the same for every function:
// - A fallible call returns NULL on success or a malloc'ed error message, which the caller frees
//   with fleet_c10d_free. Results come back through out-pointers.
// - No C++ exception crosses the boundary: `guarded` turns each into its message.
// - Tensors arrive as `at::Tensor*`, which is what tch's Tensor::as_ptr() is.
// - Only Backend's virtual calls are used on process groups, so the object references few
//   symbols of libtorch and only ones it exports (tests/train_shim.rs checks this).
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/autocast_mode.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef FLEET_WITH_NCCL
#include <torch/csrc/distributed/c10d/NCCLUtils.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

using Store = c10::intrusive_ptr<c10d::Store>;
using Group = c10::intrusive_ptr<c10d::Backend>;

char* message(const char* text) { return strdup(text ? text : "unknown error"); }

template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    // Without the C++ backtrace: the message alone is what a user can act on.
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

Store& store_of(void* store) {
  if (!store) throw std::invalid_argument("null store");
  return *static_cast<Store*>(store);
}

Group& group_of(void* group) {
  if (!group) throw std::invalid_argument("null process group");
  return *static_cast<Group*>(group);
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp(c10d::ReduceOp::SUM);
    default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

// Collectives need dense tensors: a non-contiguous one goes through a contiguous copy that is
// copied back afterwards.
struct Dense {
  std::vector<at::Tensor> tensors;
  std::vector<at::Tensor> originals;

  Dense(at::Tensor** given, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (!given[i] || !given[i]->defined()) throw std::invalid_argument("undefined tensor");
      originals.push_back(*given[i]);
      tensors.push_back(given[i]->is_contiguous() ? *given[i] : given[i]->contiguous());
    }
  }
  void write_back() {
    for (size_t i = 0; i < tensors.size(); ++i)
      if (!tensors[i].is_same(originals[i])) originals[i].copy_(tensors[i]);
  }
};

}  // namespace

extern "C" {

void fleet_c10d_free(char* text) { free(text); }

// Applies TORCH_CPP_LOG_LEVEL, as `import torch` does for Python.
void fleet_c10d_init_logging() { c10::initLogging(); }

int fleet_c10d_has_nccl() {
#ifdef FLEET_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

char* fleet_c10d_nccl_version(char** version) {
  return guarded([&] {
#ifdef FLEET_WITH_NCCL
    *version = strdup(c10d::getNcclVersion().c_str());
#else
    (void)version;
    throw std::runtime_error("fleet-train was built without NCCL");
#endif
  });
}

// The names of the CUDA devices the driver sees, one per line (empty without a driver or GPU).
// Asks libcuda directly, which needs no CUDA headers and works in a CPU-only build too.
char* fleet_cuda_device_names(char** names) {
  return guarded([&] {
    std::string joined;
    void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (driver) {
      using Init = int (*)(unsigned);
      using Count = int (*)(int*);
      using Get = int (*)(int*, int);
      using Name = int (*)(char*, int, int);
      auto init = reinterpret_cast<Init>(dlsym(driver, "cuInit"));
      auto count = reinterpret_cast<Count>(dlsym(driver, "cuDeviceGetCount"));
      auto get = reinterpret_cast<Get>(dlsym(driver, "cuDeviceGet"));
      auto name = reinterpret_cast<Name>(dlsym(driver, "cuDeviceGetName"));
      int devices = 0;
      if (init && count && get && name && init(0) == 0 && count(&devices) == 0) {
        for (int i = 0; i < devices; ++i) {
          int device = 0;
          char buffer[256] = {0};
          if (get(&device, i) == 0 && name(buffer, sizeof buffer - 1, device) == 0) {
            joined += std::string(buffer) + "\n";
          }
        }
      }
      dlclose(driver);
    }
    *names = strdup(joined.c_str());
  });
}

// Mixed precision for the forward pass: autocast on the CPU (cuda == 0) or CUDA to bfloat16
// (half == 0) or float16, until fleet_autocast_end. The state is the calling thread's.
char* fleet_autocast_begin(int cuda, int half) {
  return guarded([&] {
    auto device = cuda ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_dtype(device, half ? at::kHalf : at::kBFloat16);
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
  });
}

char* fleet_autocast_end(int cuda) {
  return guarded([&] {
    at::autocast::set_autocast_enabled(cuda ? at::kCUDA : at::kCPU, false);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  });
}

// Rank 0 (is_server != 0) listens on host:port and waits for world_size participants; the
// others connect, retrying until timeout_ms.
char* fleet_c10d_store_new(const char* host, uint16_t port, int world_size, int is_server,
                           int64_t timeout_ms, void** store) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = static_cast<size_t>(world_size);
    options.waitWorkers = true;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    options.useLibUV = true;
    Store created = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    *store = new Store(std::move(created));
  });
}

void fleet_c10d_store_free(void* store) { delete static_cast<Store*>(store); }

// A view of `store` that puts "<prefix>/" before every key, as torch.distributed does per restart
// attempt, so that keys of an earlier attempt on the same store are never read.
char* fleet_c10d_store_prefixed(void* store, const char* prefix, void** prefixed) {
  return guarded([&] {
    Store created = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store_of(store));
    *prefixed = new Store(std::move(created));
  });
}

char* fleet_c10d_store_set(void* store, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] {
    store_of(store)->set(std::string(key), std::vector<uint8_t>(data, data + len));
  });
}

// Waits for the key (up to the store's timeout). *data is malloc'ed; free with fleet_c10d_free.
char* fleet_c10d_store_get(void* store, const char* key, uint8_t** data, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> value = store_of(store)->get(std::string(key));
    *data = static_cast<uint8_t*>(malloc(value.empty() ? 1 : value.size()));
    if (!*data) throw std::bad_alloc();
    if (!value.empty()) memcpy(*data, value.data(), value.size());
    *len = value.size();
  });
}

// *present = 1 when `key` is set, without waiting.
char* fleet_c10d_store_check(void* store, const char* key, int* present) {
  return guarded([&] { *present = store_of(store)->check({std::string(key)}) ? 1 : 0; });
}

// bind_address: the address Gloo's TCP device listens on (the interface that reaches the
// master); empty lets Gloo resolve this host's name, which often gives loopback.
char* fleet_c10d_gloo_new(void* store, int rank, int size, const char* bind_address,
                          int64_t timeout_ms, void** group) {
  return guarded([&] {
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    if (bind_address && *bind_address) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_address));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    Group created = c10::make_intrusive<c10d::ProcessGroupGloo>(store_of(store), rank, size, options);
    *group = new Group(std::move(created));
  });
}

// The NCCL communicator itself is made by the first collective; timeout_ms bounds each
// collective through c10d's watchdog.
char* fleet_c10d_nccl_new(void* store, int rank, int size, int64_t timeout_ms, void** group) {
  return guarded([&] {
#ifdef FLEET_WITH_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create(false);
    options->timeout = std::chrono::milliseconds(timeout_ms);
    Group created = c10::make_intrusive<c10d::ProcessGroupNCCL>(store_of(store), rank, size, options);
    *group = new Group(std::move(created));
#else
    (void)store; (void)rank; (void)size; (void)timeout_ms; (void)group;
    throw std::runtime_error("fleet-train was built without NCCL");
#endif
  });
}

// Stops NCCL's watchdog threads and destroys its communicators (nothing for Gloo).
char* fleet_c10d_group_shutdown(void* group) {
  return guarded([&] { group_of(group)->shutdown(); });
}

void fleet_c10d_group_free(void* group) { delete static_cast<Group*>(group); }

// One collective over all tensors (same dtype and device), in place.
char* fleet_c10d_all_reduce_coalesced(void* group, at::Tensor** tensors, size_t n, int op) {
  return guarded([&] {
    c10d::AllreduceCoalescedOptions options;
    options.reduceOp = reduce_op(op);
    Dense dense(tensors, n);
    group_of(group)->allreduce_coalesced(dense.tensors, options)->wait();
    dense.write_back();
  });
}

// One collective per tensor, all started before any is waited for, in place.
char* fleet_c10d_all_reduce(void* group, at::Tensor** tensors, size_t n, int op) {
  return guarded([&] {
    c10d::AllreduceOptions options;
    options.reduceOp = reduce_op(op);
    Dense dense(tensors, n);
    std::vector<c10::intrusive_ptr<c10d::Work>> started;
    for (auto& tensor : dense.tensors) {
      std::vector<at::Tensor> one{tensor};
      started.push_back(group_of(group)->allreduce(one, options));
    }
    for (auto& work : started) work->wait();
    dense.write_back();
  });
}

char* fleet_c10d_broadcast(void* group, at::Tensor** tensors, size_t n, int root) {
  return guarded([&] {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    Dense dense(tensors, n);
    std::vector<c10::intrusive_ptr<c10d::Work>> started;
    for (auto& tensor : dense.tensors) {
      std::vector<at::Tensor> one{tensor};
      started.push_back(group_of(group)->broadcast(one, options));
    }
    for (auto& work : started) work->wait();
    dense.write_back();
  });
}


}  // extern "C"
