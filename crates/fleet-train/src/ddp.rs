//! PyTorch's c10d from Rust: the TCP store and the Gloo and NCCL process groups, through the C
//! shim in `csrc/c10d_shim.cpp`, with the two ATen calls tch lacks (autocast to bf16, the fused
//! AdamW kernel). This is the trainer's only module with `unsafe` code.
//!
//! Every shim call returns either nothing (success) or a message it allocated, which
//! [`ShimResult::check`] turns into a [`CommError`] and frees. Handles are owned by [`Store`] and
//! [`ProcessGroup`] and freed exactly once, in `Drop`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;

use tch::Tensor;

/// A failure reported by c10d (connect timeout, peer gone, wrong tensor, ...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommError(pub String);

mod shim {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn fleet_c10d_free(text: *mut c_char);
        pub fn fleet_c10d_init_logging();
        pub fn fleet_c10d_has_nccl() -> c_int;
        pub fn fleet_cuda_device_names(names: *mut *mut c_char) -> *mut c_char;
        pub fn fleet_autocast_begin(cuda: c_int, half: c_int) -> *mut c_char;
        pub fn fleet_autocast_end(cuda: c_int) -> *mut c_char;
        pub fn fleet_fused_adamw(
            params: *const *mut c_void,
            first: *const *mut c_void,
            second: *const *mut c_void,
            n: usize,
            step: *mut c_void,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
        pub fn fleet_c10d_nccl_version(version: *mut *mut c_char) -> *mut c_char;
        pub fn fleet_c10d_store_new(
            host: *const c_char,
            port: u16,
            world_size: c_int,
            is_server: c_int,
            timeout_ms: i64,
            store: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn fleet_c10d_store_free(store: *mut c_void);
        pub fn fleet_c10d_store_prefixed(
            store: *mut c_void,
            prefix: *const c_char,
            prefixed: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn fleet_c10d_store_set(
            store: *mut c_void,
            key: *const c_char,
            data: *const u8,
            len: usize,
        ) -> *mut c_char;
        pub fn fleet_c10d_store_get(
            store: *mut c_void,
            key: *const c_char,
            data: *mut *mut u8,
            len: *mut usize,
        ) -> *mut c_char;
        pub fn fleet_c10d_store_check(
            store: *mut c_void,
            key: *const c_char,
            present: *mut c_int,
        ) -> *mut c_char;
        pub fn fleet_c10d_gloo_new(
            store: *mut c_void,
            rank: c_int,
            size: c_int,
            bind_address: *const c_char,
            timeout_ms: i64,
            group: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn fleet_c10d_nccl_new(
            store: *mut c_void,
            rank: c_int,
            size: c_int,
            timeout_ms: i64,
            group: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn fleet_c10d_group_shutdown(group: *mut c_void) -> *mut c_char;
        pub fn fleet_c10d_group_free(group: *mut c_void);
        pub fn fleet_c10d_reducer_new(
            group: *mut c_void,
            params: *const *mut c_void,
            n: usize,
            bucket_bytes: usize,
            wire: c_int,
            scale: f64,
            reducer: *mut *mut c_void,
            buckets: *mut usize,
        ) -> *mut c_char;
        pub fn fleet_c10d_reducer_arm(reducer: *mut c_void) -> *mut c_char;
        pub fn fleet_c10d_reducer_finish(reducer: *mut c_void, early: *mut usize) -> *mut c_char;
        pub fn fleet_c10d_reducer_free(reducer: *mut c_void);
        pub fn fleet_c10d_all_reduce(
            group: *mut c_void,
            tensors: *const *mut c_void,
            n: usize,
            op: c_int,
        ) -> *mut c_char;
        pub fn fleet_c10d_broadcast(
            group: *mut c_void,
            tensors: *const *mut c_void,
            n: usize,
            root: c_int,
        ) -> *mut c_char;
    }
}

/// What a shim call returned: null for success, else a message the shim allocated.
struct ShimResult(*mut c_char);

impl ShimResult {
    fn check(self) -> Result<(), CommError> {
        if self.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null result is a NUL-terminated string from strdup in the shim, owned by
        // us from here on and freed exactly once, right after it is copied.
        let message = unsafe { CStr::from_ptr(self.0) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above; the pointer is not used again.
        unsafe { shim::fleet_c10d_free(self.0) };
        Err(CommError(message))
    }
}

fn c_string(what: &str, text: &str) -> Result<CString, CommError> {
    CString::new(text).map_err(|_| CommError(format!("{what} contains a NUL byte: {text:?}")))
}

/// Applies `TORCH_CPP_LOG_LEVEL` to libtorch's own logging, as `import torch` does in Python.
/// Unless the user set it, only fatal messages are logged: c10d's warnings while it retries come
/// with C++ stack frames, and every failure reaches the user as fleet-train's own error anyway.
/// Must be called first thing in `main`, before any thread exists.
pub fn init_logging() {
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        // SAFETY: called at the start of main, while the process has a single thread, so no
        // other thread reads the environment concurrently.
        unsafe { std::env::set_var("TORCH_CPP_LOG_LEVEL", "FATAL") };
    }
    // SAFETY: takes no arguments and only reads the environment.
    unsafe { shim::fleet_c10d_init_logging() }
}

/// The NCCL version libtorch was built with, or None when fleet-train was built without NCCL.
pub fn nccl_version() -> Option<String> {
    // SAFETY: takes no arguments.
    if unsafe { shim::fleet_c10d_has_nccl() } == 0 {
        return None;
    }
    let mut version: *mut c_char = ptr::null_mut();
    // SAFETY: `version` is a valid out-pointer; on success the shim stores a strdup'ed string.
    ShimResult(unsafe { shim::fleet_c10d_nccl_version(&mut version) })
        .check()
        .ok()?;
    if version.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from the shim, freed once right after it is copied.
    let text = unsafe { CStr::from_ptr(version) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above.
    unsafe { shim::fleet_c10d_free(version) };
    Some(text)
}

/// The CUDA devices the driver sees, by name (none without a driver or GPU).
pub fn cuda_device_names() -> Vec<String> {
    let mut names: *mut c_char = ptr::null_mut();
    // SAFETY: `names` is a valid out-pointer; on success the shim stores a strdup'ed string.
    if ShimResult(unsafe { shim::fleet_cuda_device_names(&mut names) })
        .check()
        .is_err()
        || names.is_null()
    {
        return Vec::new();
    }
    // SAFETY: a NUL-terminated string from the shim, freed once right after it is copied.
    let text = unsafe { CStr::from_ptr(names) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above.
    unsafe { shim::fleet_c10d_free(names) };
    text.lines().map(str::to_string).collect()
}

/// Runs `forward` under autocast to bfloat16 (`half` false) or float16 on `device`, as
/// `torch.autocast(device_type, dtype)` does. tch's own autocast knows only CUDA and float16.
pub fn autocast<T>(
    device: tch::Device,
    half: bool,
    forward: impl FnOnce() -> T,
) -> Result<T, CommError> {
    let cuda = c_int::from(device.is_cuda());
    // SAFETY: plain values in; the shim only flips this thread's autocast state.
    ShimResult(unsafe { shim::fleet_autocast_begin(cuda, c_int::from(half)) }).check()?;
    let result = forward();
    // SAFETY: as above; pairs with the begin call just made on this thread.
    ShimResult(unsafe { shim::fleet_autocast_end(cuda) }).check()?;
    Ok(result)
}

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step (decoupled weight decay, bias-corrected moments, as `torch.optim.AdamW`) of
/// `params` with their gradients and moment estimates `first` and `second` (same lengths, all
/// defined, on one device), through ATen's fused kernel. `step` is the step count this update
/// makes, as a one-element float tensor on the parameters' device.
pub fn fused_adamw(
    params: &[&Tensor],
    first: &[&Tensor],
    second: &[&Tensor],
    step: &Tensor,
    hyper: AdamWStep,
) -> Result<(), CommError> {
    if params.len() != first.len() || params.len() != second.len() {
        return Err(CommError(
            "AdamW: one moment of each kind per parameter".into(),
        ));
    }
    let (p, m, v) = (
        tensor_pointers(params),
        tensor_pointers(first),
        tensor_pointers(second),
    );
    // SAFETY: the three arrays hold `p.len()` live at::Tensor pointers borrowed for the call, and
    // `step` is live; the shim reads the arrays and updates the tensors in place.
    ShimResult(unsafe {
        shim::fleet_fused_adamw(
            p.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            p.len(),
            step.as_ptr() as *mut c_void,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
        )
    })
    .check()
}

/// Reduction applied by an all-reduce. The values are the shim's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
}

/// The TCP key-value store the ranks meet at: rank 0 serves it on MASTER_ADDR:MASTER_PORT.
pub struct Store(*mut c_void);

// SAFETY: c10d's TCPStore is used from one thread at a time here (the training loop is
// synchronous); moving its handle between threads is what c10d itself does.
unsafe impl Send for Store {}

impl Store {
    /// Serves (rank 0) or joins the store; waits until all `world_size` ranks arrived or the
    /// timeout passed.
    pub fn connect(
        host: &str,
        port: u16,
        world_size: usize,
        is_server: bool,
        timeout_ms: i64,
    ) -> Result<Store, CommError> {
        let host = c_string("MASTER_ADDR", host)?;
        let world = c_int::try_from(world_size)
            .map_err(|_| CommError(format!("world size {world_size} is too large")))?;
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: `host` outlives the call; `handle` is a valid out-pointer, set on success only.
        ShimResult(unsafe {
            shim::fleet_c10d_store_new(
                host.as_ptr(),
                port,
                world,
                c_int::from(is_server),
                timeout_ms,
                &mut handle,
            )
        })
        .check()?;
        Ok(Store(handle))
    }

    /// A view of this store whose keys all start with `prefix`.
    pub fn prefixed(&self, prefix: &str) -> Result<Store, CommError> {
        let prefix = c_string("store prefix", prefix)?;
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: the handle is live; the new store holds its own reference to the underlying
        // one, so either may be dropped first; `handle` is a valid out-pointer.
        ShimResult(unsafe {
            shim::fleet_c10d_store_prefixed(self.0, prefix.as_ptr(), &mut handle)
        })
        .check()?;
        Ok(Store(handle))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let key = c_string("store key", key)?;
        // SAFETY: the handle is live (owned by self); key and value outlive the call, and the
        // shim copies the bytes before returning.
        ShimResult(unsafe {
            shim::fleet_c10d_store_set(self.0, key.as_ptr(), value.as_ptr(), value.len())
        })
        .check()
    }

    /// Whether `key` is set, without waiting.
    pub fn has(&self, key: &str) -> Result<bool, CommError> {
        let key = c_string("store key", key)?;
        let mut present: c_int = 0;
        // SAFETY: the handle is live; `present` is a valid out-pointer.
        ShimResult(unsafe { shim::fleet_c10d_store_check(self.0, key.as_ptr(), &mut present) })
            .check()?;
        Ok(present != 0)
    }

    /// Waits for `key` to be set (by any rank), up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, CommError> {
        let key = c_string("store key", key)?;
        let mut data: *mut u8 = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: the handle is live; `data` and `len` are valid out-pointers.
        ShimResult(unsafe {
            shim::fleet_c10d_store_get(self.0, key.as_ptr(), &mut data, &mut len)
        })
        .check()?;
        if data.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: on success the shim malloc'ed `len` bytes (at least one) at `data`; they are
        // copied and then freed exactly once.
        let value = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        // SAFETY: as above.
        unsafe { shim::fleet_c10d_free(data.cast()) };
        Ok(value)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from fleet_c10d_store_new and is freed only here.
        unsafe { shim::fleet_c10d_store_free(self.0) }
    }
}

/// Which c10d backend a process group runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A process group over all ranks: the collectives that average gradients.
pub struct ProcessGroup {
    handle: *mut c_void,
}

// SAFETY: c10d process groups are designed to be driven from any one thread at a time.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// A Gloo group whose TCP device listens on `bind_address` (None: the address this host's
    /// name resolves to).
    pub fn gloo(
        store: &Store,
        rank: usize,
        world_size: usize,
        bind_address: Option<&str>,
        timeout_ms: i64,
    ) -> Result<ProcessGroup, CommError> {
        let bind = c_string("bind address", bind_address.unwrap_or(""))?;
        let (rank, size) = rank_and_size(rank, world_size)?;
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: the store handle is live for the call (the group keeps its own reference);
        // `bind` outlives the call; `handle` is a valid out-pointer.
        ShimResult(unsafe {
            shim::fleet_c10d_gloo_new(store.0, rank, size, bind.as_ptr(), timeout_ms, &mut handle)
        })
        .check()?;
        Ok(ProcessGroup { handle })
    }

    /// An NCCL group (CUDA tensors only); its communicator is made by the first collective.
    pub fn nccl(
        store: &Store,
        rank: usize,
        world_size: usize,
        timeout_ms: i64,
    ) -> Result<ProcessGroup, CommError> {
        let (rank, size) = rank_and_size(rank, world_size)?;
        let mut handle: *mut c_void = ptr::null_mut();
        // SAFETY: the store handle is live for the call; `handle` is a valid out-pointer.
        ShimResult(unsafe {
            shim::fleet_c10d_nccl_new(store.0, rank, size, timeout_ms, &mut handle)
        })
        .check()?;
        Ok(ProcessGroup { handle })
    }

    /// One collective per tensor, reduced in place (tensors may differ in dtype).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<(), CommError> {
        let pointers = tensor_pointers(tensors);
        // SAFETY: the group handle is live; `pointers` holds live at::Tensor pointers borrowed
        // from `tensors` for the duration of the call, and the shim only reads the array.
        ShimResult(unsafe {
            shim::fleet_c10d_all_reduce(self.handle, pointers.as_ptr(), pointers.len(), op as c_int)
        })
        .check()
    }

    /// Copies each tensor from rank `root` to every rank, in place.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<(), CommError> {
        let pointers = tensor_pointers(tensors);
        let root = c_int::try_from(root).map_err(|_| CommError(format!("bad root rank {root}")))?;
        // SAFETY: as in all_reduce.
        ShimResult(unsafe {
            shim::fleet_c10d_broadcast(self.handle, pointers.as_ptr(), pointers.len(), root)
        })
        .check()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from a *_new call and is shut down and freed only here. A
        // shutdown error at exit has nobody left to act on it.
        let _ = ShimResult(unsafe { shim::fleet_c10d_group_shutdown(self.handle) }).check();
        // SAFETY: as above.
        unsafe { shim::fleet_c10d_group_free(self.handle) }
    }
}

/// Averages gradients over a process group in buckets, as PyTorch DDP's reducer does: armed
/// before a backward pass, each bucket is all-reduced as soon as all its gradients are
/// accumulated, while the rest of the backward pass runs; [`Reducer::finish`] launches what is
/// left, waits and writes the averages back into the gradients. Unarmed, `finish` does the same
/// work after backward, so both ways give the same bits.
pub struct Reducer {
    handle: *mut c_void,
    /// How many buckets the parameters were split into.
    pub buckets: usize,
}

// SAFETY: the reducer is driven from the training thread; its hooks run on autograd threads
// and take the shim's own lock.
unsafe impl Send for Reducer {}

impl Reducer {
    /// A reducer over `params` (each must require grad), in buckets of about `bucket_bytes`;
    /// gradients are multiplied by `scale` and sent as `wire` (None: their own dtype; bfloat16
    /// or float16 compress them).
    pub fn new(
        group: &ProcessGroup,
        params: &[Tensor],
        bucket_bytes: usize,
        wire: Option<tch::Kind>,
        scale: f64,
    ) -> Result<Reducer, CommError> {
        let wire = match wire {
            None => 0,
            Some(tch::Kind::BFloat16) => 1,
            Some(tch::Kind::Half) => 2,
            Some(other) => return Err(CommError(format!("cannot send gradients as {other:?}"))),
        };
        let refs: Vec<&Tensor> = params.iter().collect();
        let pointers = tensor_pointers(&refs);
        let mut handle: *mut c_void = ptr::null_mut();
        let mut buckets = 0usize;
        // SAFETY: the group handle is live (the reducer keeps its own reference to the group);
        // `pointers` holds live at::Tensor pointers for the call, and the shim copies the
        // tensors (sharing their storage); `handle` and `buckets` are valid out-pointers.
        ShimResult(unsafe {
            shim::fleet_c10d_reducer_new(
                group.handle,
                pointers.as_ptr(),
                pointers.len(),
                bucket_bytes,
                wire,
                scale,
                &mut handle,
                &mut buckets,
            )
        })
        .check()?;
        Ok(Reducer { handle, buckets })
    }

    /// The next backward pass launches each bucket as soon as its gradients are ready.
    pub fn arm(&self) -> Result<(), CommError> {
        // SAFETY: the handle is live until Drop.
        ShimResult(unsafe { shim::fleet_c10d_reducer_arm(self.handle) }).check()
    }

    /// Launches the buckets not yet launched, waits for every one and writes the averaged
    /// gradients back; a failed collective (peer lost, timeout) is the error. Returns how many
    /// buckets the backward pass had already launched.
    pub fn finish(&self) -> Result<usize, CommError> {
        let mut early = 0usize;
        // SAFETY: the handle is live until Drop; `early` is a valid out-pointer.
        ShimResult(unsafe { shim::fleet_c10d_reducer_finish(self.handle, &mut early) }).check()?;
        Ok(early)
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: the handle came from fleet_c10d_reducer_new and is freed only here; the shim
        // waits for collectives in flight and removes its hooks.
        unsafe { shim::fleet_c10d_reducer_free(self.handle) }
    }
}

fn rank_and_size(rank: usize, world_size: usize) -> Result<(c_int, c_int), CommError> {
    match (c_int::try_from(rank), c_int::try_from(world_size)) {
        (Ok(rank), Ok(size)) if rank < size => Ok((rank, size)),
        _ => Err(CommError(format!(
            "rank {rank} is not below world size {world_size}"
        ))),
    }
}

fn tensor_pointers(tensors: &[&Tensor]) -> Vec<*mut c_void> {
    tensors
        .iter()
        .map(|tensor| tensor.as_ptr() as *mut c_void)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A group of one rank on loopback: its all-reduce returns what it was given, so what the
    /// reducer writes back is exactly its own scaling and conversion.
    fn alone() -> (Store, ProcessGroup) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let store = Store::connect("127.0.0.1", port, 1, true, 30_000).unwrap();
        let group = ProcessGroup::gloo(&store, 0, 1, Some("127.0.0.1"), 30_000).unwrap();
        (store, group)
    }

    #[test]
    fn the_reducer_scales_and_compresses_every_value_of_a_large_gradient() {
        let (_store, group) = alone();
        tch::manual_seed(7);
        // More values than the shim scales in one piece (1 << 20), and not a multiple of it.
        let sizes = [2 * (1 << 20) + 12_345, 1000];
        let coefficients: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::randn([n], (Kind::Float, Device::Cpu)))
            .collect();
        for (wire, expected_kind) in [(None, Kind::Float), (Some(Kind::BFloat16), Kind::BFloat16)] {
            let params: Vec<Tensor> = sizes
                .iter()
                .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)).set_requires_grad(true))
                .collect();
            let reducer = Reducer::new(&group, &params, 1 << 20, wire, 0.25).unwrap();
            let loss = params
                .iter()
                .zip(&coefficients)
                .map(|(p, c)| (p * c).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
            reducer.finish().unwrap();
            for (param, c) in params.iter().zip(&coefficients) {
                let expected = (c * 0.25).to_kind(expected_kind).to_kind(Kind::Float);
                assert!(
                    param.grad().equal(&expected),
                    "{wire:?}, {} values",
                    c.numel()
                );
            }
        }
    }
}
