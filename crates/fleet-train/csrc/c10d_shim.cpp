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
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
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

// Gradient averaging that overlaps the backward pass, as DDP's reducer does: parameters are put
// in buckets in reverse order (the order their gradients become ready), a hook after each
// parameter's gradient accumulation counts down its bucket, and a bucket whose gradients are all
// there is flattened, scaled by 1/world and all-reduced at once while backward goes on. Buckets
// are launched in index order on every rank, so the collectives match up across ranks. `finish`
// launches what is left (a parameter without gradient counts as zero), waits, and writes the
// averaged gradients back. Not armed, the hooks do nothing and `finish` does all the work after
// backward: the same buckets and the same arithmetic, so both ways give the same bits.
class Reducer {
 public:
  Reducer(Group group, std::vector<at::Tensor> params, size_t bucket_bytes, int wire, double scale)
      : group_(std::move(group)),
        params_(std::move(params)),
        scale_(at::scalar_tensor(scale, at::kDouble)) {
    bucket_of_.resize(params_.size());
    // The first bucket holds the last layers, whose gradients come first: small, so that
    // communication starts early (DDP uses 1 MB too).
    size_t cap = std::min<size_t>(bucket_bytes, 1 << 20);
    for (size_t k = params_.size(); k-- > 0;) {
      const auto& param = params_[k];
      if (!param.defined()) throw std::invalid_argument("undefined parameter");
      auto dtype = wire == 1   ? at::kBFloat16
                   : wire == 2 ? at::kHalf
                               : param.scalar_type();
      auto bytes = static_cast<size_t>(param.numel()) * c10::elementSize(dtype);
      bool fits = !buckets_.empty() && buckets_.back().dtype == dtype &&
                  buckets_.back().device == param.device() && buckets_.back().bytes + bytes <= cap;
      if (!fits) {
        if (!buckets_.empty()) cap = bucket_bytes;
        buckets_.push_back(Bucket{{}, 0, 0, dtype, param.device(), {}, {}, 0});
      }
      auto& bucket = buckets_.back();
      bucket.members.push_back(k);
      bucket.numel += param.numel();
      bucket.bytes += bytes;
      bucket_of_[k] = buckets_.size() - 1;
    }
    // Zeroed, so their memory is mapped now and not during the first step's all-reduce.
    for (auto& bucket : buckets_) {
      bucket.flat = at::zeros({bucket.numel}, at::TensorOptions().dtype(bucket.dtype).device(bucket.device));
    }
    reset();
    // The accumulator of a leaf is held weakly by the tensor: keep it alive with our hook on it.
    for (size_t k = 0; k < params_.size(); ++k) {
      auto accumulator = torch::autograd::impl::grad_accumulator(params_[k]);
      if (!accumulator) throw std::invalid_argument("a parameter does not require grad");
      auto key = accumulator->add_post_hook(std::make_unique<Ready>(this, k));
      hooks_.emplace_back(std::move(accumulator), key);
    }
  }

  ~Reducer() {
    // Wait for collectives still in flight (after an error): their buffers are ours.
    for (auto& bucket : buckets_) {
      if (bucket.work) {
        try {
          bucket.work->wait();
        } catch (...) {
        }
      }
    }
    for (auto& [accumulator, key] : hooks_) accumulator->del_post_hook(key);
  }

  void arm() {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = true;
  }

  size_t buckets() const { return buckets_.size(); }

  // Returns how many buckets the backward pass launched (the rest are launched here). Each
  // bucket's averages are written back to the gradients as soon as it is reduced, while the
  // buckets after it are still on the wire.
  size_t finish() {
    size_t early;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      armed_ = false;
      early = next_;
      while (next_ < buckets_.size()) launch(next_++);
    }
    std::string error = error_;
    at::NoGradGuard no_grad;
    for (auto& bucket : buckets_) {
      if (!bucket.work) continue;
      try {
        bucket.work->wait();
      } catch (const c10::Error& e) {
        if (error.empty()) error = e.what_without_backtrace();
      } catch (const std::exception& e) {
        if (error.empty()) error = e.what();
      }
      bucket.work.reset();
      // After an error the rest are still waited for (their buffers are ours), not used.
      if (error.empty()) write_back(bucket);
    }
    reset();
    if (!error.empty()) throw std::runtime_error(error);
    return early;
  }

 private:
  struct Bucket {
    std::vector<size_t> members;
    int64_t numel;
    size_t bytes;
    at::ScalarType dtype;
    at::Device device;
    at::Tensor flat;
    c10::intrusive_ptr<c10d::Work> work;
    size_t pending;
  };

  struct Ready : torch::autograd::FunctionPostHook {
    Ready(Reducer* reducer, size_t index) : reducer(reducer), index(index) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list&) override {
      reducer->ready(index);
      return outputs;
    }
    Reducer* reducer;
    size_t index;
  };

  void reset() {
    next_ = 0;
    seen_.assign(params_.size(), false);
    for (auto& bucket : buckets_) bucket.pending = bucket.members.size();
    error_.clear();
  }

  // Runs on the autograd thread, right after parameter `k`'s gradient was accumulated.
  void ready(size_t k) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!armed_ || seen_[k]) return;
    seen_[k] = true;
    buckets_[bucket_of_[k]].pending -= 1;
    while (next_ < buckets_.size() && buckets_[next_].pending == 0) launch(next_++);
  }

  // Copies a reduced bucket's averages into its parameters' gradients.
  void write_back(Bucket& bucket) {
    int64_t offset = 0;
    for (auto k : bucket.members) {
      auto& param = params_[k];
      auto averaged = bucket.flat.narrow(0, offset, param.numel()).view(param.sizes());
      auto& grad = param.mutable_grad();
      if (grad.defined()) {
        grad.copy_(averaged);
      } else {
        grad = averaged.to(param.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      }
      offset += param.numel();
    }
  }

  // Called with the mutex held. Errors are kept for `finish`: a hook cannot report them.
  void launch(size_t b) {
    auto& bucket = buckets_[b];
    try {
      at::NoGradGuard no_grad;
      int64_t offset = 0;
      for (auto k : bucket.members) {
        const auto& param = params_[k];
        auto slice = bucket.flat.narrow(0, offset, param.numel());
        const auto& grad = param.grad();
        if (!grad.defined()) {
          slice.zero_();
        } else if (grad.scalar_type() == bucket.dtype) {
          // In one pass over memory, straight into the bucket.
          at::mul_out(slice, grad.reshape({-1}), scale_);
        } else {
          // Scaled before the compression, so a compressed sum cannot overflow. A product in
          // another dtype than its output goes through a temporary as large as the gradient:
          // scaled here a cache-sized piece at a time, then converted into the bucket.
          auto values = grad.reshape({-1});
          if (!scratch_.defined() || scratch_.scalar_type() != grad.scalar_type() ||
              scratch_.device() != grad.device()) {
            scratch_ = at::empty({kScratch}, grad.options());
          }
          for (int64_t from = 0; from < values.numel(); from += kScratch) {
            auto length = std::min(kScratch, values.numel() - from);
            auto piece = scratch_.narrow(0, 0, length);
            at::mul_out(piece, values.narrow(0, from, length), scale_);
            slice.narrow(0, from, length).copy_(piece);
          }
        }
        offset += param.numel();
      }
      std::vector<at::Tensor> one{bucket.flat};
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
      bucket.work = group_->allreduce(one, options);
    } catch (const c10::Error& e) {
      if (error_.empty()) error_ = e.what_without_backtrace();
    } catch (const std::exception& e) {
      if (error_.empty()) error_ = e.what();
    }
  }

  // Values per piece when scaling into a compressed bucket (4 MiB of fp32).
  static constexpr int64_t kScratch = 1 << 20;

  Group group_;
  std::vector<at::Tensor> params_;
  // 1/world as a CPU scalar, which kernels on any device take as a plain number.
  at::Tensor scale_;
  at::Tensor scratch_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks_;
  std::mutex mutex_;
  bool armed_ = false;
  size_t next_ = 0;
  std::vector<bool> seen_;
  std::string error_;
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

// One AdamW step for n parameters at once with ATen's fused kernel (what
// torch.optim.AdamW(fused=True) calls): one pass over each parameter, its gradient and its two
// moments instead of one per operation. `step` is the step count as a float tensor on the
// parameters' device, already counted for this step; parameters without a gradient are the
// caller's to leave out.
char* fleet_fused_adamw(at::Tensor** params, at::Tensor** first, at::Tensor** second, size_t n,
                        at::Tensor* step, double lr, double beta1, double beta2,
                        double weight_decay, double eps) {
  return guarded([&] {
    std::vector<at::Tensor> p, grads, m, v, steps;
    for (size_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      grads.push_back(params[i]->grad());
      m.push_back(*first[i]);
      v.push_back(*second[i]);
      steps.push_back(*step);
    }
    at::NoGradGuard no_grad;
    at::_fused_adamw_(p, grads, m, v, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
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

// A Reducer over `params` (see above). `wire`: 0 sends gradients in their own dtype, 1 as
// bfloat16, 2 as float16. `scale` multiplies every gradient (1/world size to average).
char* fleet_c10d_reducer_new(void* group, at::Tensor** params, size_t n, size_t bucket_bytes,
                             int wire, double scale, void** reducer, size_t* buckets) {
  return guarded([&] {
    std::vector<at::Tensor> tensors;
    for (size_t i = 0; i < n; ++i) {
      if (!params[i]) throw std::invalid_argument("null parameter");
      tensors.push_back(*params[i]);
    }
    auto made = std::make_unique<Reducer>(group_of(group), std::move(tensors), bucket_bytes, wire, scale);
    *buckets = made->buckets();
    *reducer = made.release();
  });
}

// The next backward pass launches buckets as their gradients become ready.
char* fleet_c10d_reducer_arm(void* reducer) {
  return guarded([&] {
    if (!reducer) throw std::invalid_argument("null reducer");
    static_cast<Reducer*>(reducer)->arm();
  });
}

// Launches the buckets not launched yet, waits for all, writes the averaged gradients back;
// `early` is how many buckets the backward pass had launched.
char* fleet_c10d_reducer_finish(void* reducer, size_t* early) {
  return guarded([&] {
    if (!reducer) throw std::invalid_argument("null reducer");
    *early = static_cast<Reducer*>(reducer)->finish();
  });
}

void fleet_c10d_reducer_free(void* reducer) { delete static_cast<Reducer*>(reducer); }

}  // extern "C"
