//! Who this process is in the job (the torchrun environment) and how it talks to the others:
//! the store at MASTER_ADDR:MASTER_PORT, one process group, and the collectives the training loop
//! needs, which do nothing when the job has one rank.

use std::net::{ToSocketAddrs, UdpSocket};
use std::time::Instant;

use anyhow::{Context, bail};
use tch::{Device, Kind, Tensor};

use super::ddp::{Backend, CommError, ProcessGroup, ReduceOp, Reducer, Store};
use super::powersgd::PowerSgd;

/// The torchrun environment of this rank.
#[derive(Debug, Clone)]
pub struct Rank {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub host: String,
}

impl Rank {
    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; alone (rank 0 of 1)
    /// when none is set.
    pub fn from_env() -> anyhow::Result<Rank> {
        let number = |name: &str, default: usize| -> anyhow::Result<usize> {
            match std::env::var(name) {
                Ok(value) => value
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={value:?} is not a non-negative integer")),
                Err(_) => Ok(default),
            }
        };
        let rank = number("RANK", 0)?;
        let world_size = number("WORLD_SIZE", 1)?;
        let local_rank = number("LOCAL_RANK", 0)?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let master_addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = number("MASTER_PORT", 29500)?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("MASTER_PORT={port} is not a TCP port"))?;
        let host = std::env::var("FLEET_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "?".into())
            });
        Ok(Rank {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            host,
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The local address that routes to MASTER_ADDR: what Gloo must listen on. A host name that
    /// resolves to loopback (common on Ubuntu) would make the other hosts dial themselves.
    fn route_to_master(&self) -> Option<String> {
        let master = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .ok()?
            .next()?;
        let bind = if master.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(master).ok()?;
        Some(socket.local_addr().ok()?.ip().to_string())
    }
}

/// The collectives of the training loop over all ranks.
pub struct Collective {
    // Field order: the reducer is dropped before the group it uses, the group (shut down)
    // before the store.
    reducer: Option<Reducer>,
    /// PowerSGD, when the gradients are compressed to low-rank factors.
    compressor: Option<PowerSgd>,
    /// Bytes the gradient all-reduces of the steps so far put on the wire, per rank.
    pub comm_bytes: u64,
    /// Bytes of one step's plain all-reduce (every gradient whole, in the wire dtype).
    plain_bytes: u64,
    /// Whether gradient all-reduces overlap the backward pass.
    overlap: bool,
    group: Option<ProcessGroup>,
    store: Option<Store>,
    pub world_size: usize,
    device: Device,
    bucket_bytes: usize,
    /// Seconds the steps so far waited for gradient all-reduces after their backward pass.
    pub comm_seconds: f64,
    /// Without overlap: seconds the steps so far waited for the slowest rank to finish its
    /// backward pass, before their all-reduce (so `comm_seconds` is the network's part alone).
    pub wait_seconds: f64,
    /// Buckets all-reduced so far, and how many of them the backward pass launched.
    pub buckets_reduced: u64,
    pub buckets_overlapped: u64,
    /// Each rank's host, once [`Collective::exchange`] has been called.
    pub hosts: Vec<String>,
    /// Rank 0's process serves the store (not torchrun's agent): a store that answers proves
    /// rank 0 alive.
    store_in_rank_zero: bool,
}

impl Collective {
    pub fn connect(
        rank: &Rank,
        backend: Backend,
        device: Device,
        connect_timeout_s: u64,
        timeout_s: u64,
        bucket_bytes: usize,
    ) -> anyhow::Result<Collective> {
        let mut collective = Collective {
            reducer: None,
            compressor: None,
            comm_bytes: 0,
            plain_bytes: 0,
            overlap: false,
            group: None,
            store: None,
            world_size: rank.world_size,
            device,
            bucket_bytes: bucket_bytes.max(1),
            comm_seconds: 0.0,
            wait_seconds: 0.0,
            buckets_reduced: 0,
            buckets_overlapped: 0,
            hosts: vec![rank.host.clone()],
            store_in_rank_zero: false,
        };
        if rank.world_size == 1 {
            return Ok(collective);
        }
        let address = format!("{}:{}", rank.master_addr, rank.master_port);
        // Under torchrun the agent already serves the store on MASTER_PORT, and each restart
        // attempt keeps its keys apart with a prefix, as torch.distributed does.
        let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True");
        collective.store_in_rank_zero = !agent_store;
        let attempt = std::env::var("TORCHELASTIC_RESTART_COUNT")
            .or_else(|_| std::env::var("FLEET_RESTART_COUNT"))
            .unwrap_or_else(|_| "0".into());
        let store = Store::connect(
            &rank.master_addr,
            rank.master_port,
            rank.world_size,
            rank.is_main() && !agent_store,
            (connect_timeout_s * 1000) as i64,
        )
        .and_then(|store| store.prefixed(&format!("/fleet-train/attempt_{attempt}")))
        .map_err(|e| {
            anyhow::anyhow!(
                "could not meet the other {} ranks at {address} within {connect_timeout_s} s \
                 (MASTER_ADDR:MASTER_PORT): {e}",
                rank.world_size - 1
            )
        })?;
        let timeout_ms = (timeout_s * 1000) as i64;
        let group = match backend {
            Backend::Gloo => {
                let bind = rank.route_to_master();
                ProcessGroup::gloo(
                    &store,
                    rank.rank,
                    rank.world_size,
                    bind.as_deref(),
                    timeout_ms,
                )
            }
            Backend::Nccl => ProcessGroup::nccl(&store, rank.rank, rank.world_size, timeout_ms),
        }
        .map_err(|e| anyhow::anyhow!("{} process group: {e}", backend.name()))?;
        collective.group = Some(group);
        collective.store = Some(store);
        Ok(collective)
    }

    /// Every rank's `value` for `key`, in rank order (through the store), and every rank's host
    /// for later messages.
    pub fn exchange(&mut self, rank: &Rank, key: &str, value: &str) -> anyhow::Result<Vec<String>> {
        let Some(store) = &self.store else {
            return Ok(vec![value.to_string()]);
        };
        let mine = format!("{}\n{value}", rank.host);
        store.set(&format!("{key}/{}", rank.rank), mine.as_bytes())?;
        let mut values = Vec::with_capacity(self.world_size);
        let mut hosts = Vec::with_capacity(self.world_size);
        for r in 0..self.world_size {
            let bytes = store
                .get(&format!("{key}/{r}"))
                .map_err(|e| anyhow::anyhow!("waiting for rank {r}'s {key}: {e}"))?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let (host, value) = text.split_once('\n').unwrap_or(("?", &text));
            hosts.push(host.to_string());
            values.push(value.to_string());
        }
        self.hosts = hosts;
        Ok(values)
    }

    /// Rank `r` and its host, for messages.
    pub fn who(&self, r: usize) -> String {
        format!(
            "rank {r} ({})",
            self.hosts.get(r).map_or("?", String::as_str)
        )
    }

    /// After a collective failed: which ranks are gone. Every rank that is still alive says so in
    /// the store and looks, for a few seconds, for the others; the ones that never answer are
    /// named. The store lives in rank 0, so when it cannot be reached, rank 0 is the one lost.
    pub fn failure(&self, rank: &Rank, what: &str, error: CommError) -> anyhow::Error {
        let Some(store) = &self.store else {
            return anyhow::anyhow!("{what}: {error}");
        };
        if store.set(&format!("alive/{}", rank.rank), b"1").is_err() {
            return anyhow::anyhow!(
                "{what}: lost {}, which serves the store: {error}",
                self.who(0)
            );
        }
        // A peer notices the failure at its own next collective, which on a busy machine can
        // come seconds later.
        let deadline = Instant::now() + std::time::Duration::from_secs(8);
        let mut silent: Vec<usize> = (0..self.world_size)
            .filter(|&r| !(r == 0 && self.store_in_rank_zero))
            .collect();
        while !silent.is_empty() && Instant::now() < deadline {
            silent.retain(|r| !store.has(&format!("alive/{r}")).unwrap_or(false));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if silent.is_empty() {
            return anyhow::anyhow!("{what}: {error}");
        }
        let lost: Vec<String> = silent.iter().map(|&r| self.who(r)).collect();
        anyhow::anyhow!("{what}: lost {}: {error}", lost.join(", "))
    }

    /// Copies the tensors from rank 0 to every rank.
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<(), CommError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let refs: Vec<&Tensor> = tensors.iter().collect();
        group.broadcast(&refs, 0)
    }

    /// Prepares gradient averaging over `params` (see [`Reducer`]): with `overlap`, each bucket
    /// of gradients is all-reduced while the rest of the backward pass runs. With `wire`
    /// (bfloat16 or float16) the gradients travel compressed and are restored afterwards, as
    /// PyTorch DDP's compression hooks do: divided by the world size first, so the compressed
    /// sum cannot overflow. Returns how many buckets there are.
    pub fn reduce_gradients_of(
        &mut self,
        params: &[Tensor],
        wire: Option<Kind>,
        overlap: bool,
        powersgd: Option<PowerSgd>,
    ) -> Result<usize, CommError> {
        let Some(group) = &self.group else {
            return Ok(0);
        };
        self.compressor = powersgd;
        let element = wire.map_or(4, |k| k.elt_size_in_bytes()) as u64;
        self.plain_bytes = params.iter().map(|p| p.numel() as u64 * element).sum();
        self.reducer = None;
        let reducer = Reducer::new(
            group,
            params,
            self.bucket_bytes,
            wire,
            1.0 / self.world_size as f64,
        )?;
        let buckets = reducer.buckets;
        self.reducer = Some(reducer);
        self.overlap = overlap;
        Ok(buckets)
    }

    /// How many buckets the gradients are all-reduced in (0 with one rank).
    pub fn buckets(&self) -> usize {
        self.reducer.as_ref().map_or(0, |r| r.buckets)
    }

    /// Called before the backward pass that completes a step's gradients (the last of its
    /// accumulation micro-batches): with overlap, that pass starts the all-reduces.
    pub fn before_last_backward(&self) -> Result<(), CommError> {
        match &self.reducer {
            Some(reducer) if self.overlap && !self.compressing() => reducer.arm(),
            _ => Ok(()),
        }
    }

    /// Whether this step's gradients go through PowerSGD (its warm-up is over).
    fn compressing(&self) -> bool {
        self.compressor.as_ref().is_some_and(PowerSgd::active)
    }

    /// PowerSGD's state on this rank, for a checkpoint (None without PowerSGD).
    pub fn powersgd_state(&self) -> Option<Vec<(String, Tensor)>> {
        self.compressor.as_ref().map(PowerSgd::state)
    }

    /// Continues PowerSGD from `saved` (this rank's state at the checkpoint) when every rank
    /// has its own; otherwise every rank starts it afresh, so that all keep the same Q.
    /// Returns whether it continued.
    pub fn restore_powersgd(
        &mut self,
        saved: Option<Vec<(String, Tensor)>>,
    ) -> Result<bool, CommError> {
        let Some(compressor) = self.compressor.as_ref() else {
            return Ok(false);
        };
        let matched = saved.and_then(|saved| compressor.matched(&saved));
        let have = self.sum(&[if matched.is_some() { 1.0 } else { 0.0 }])?[0];
        let everyone = have as usize == self.world_size;
        if let (true, Some(matched), Some(compressor)) =
            (everyone, matched, self.compressor.as_mut())
        {
            compressor.restore(matched);
        }
        Ok(everyone)
    }

    /// PowerSGD's rank, when it compresses the gradients.
    pub fn powersgd_rank(&self) -> Option<usize> {
        self.compressor.as_ref().map(PowerSgd::rank)
    }

    /// Completes the step's gradient averaging: every rank then holds the mean gradients.
    pub fn average_gradients(&mut self) -> Result<(), CommError> {
        let (Some(reducer), Some(group)) = (&self.reducer, &self.group) else {
            return Ok(());
        };
        let started = Instant::now();
        if !self.overlap {
            // Meet first, so the all-reduce's time is the network's and not a slower rank's.
            let one = Tensor::zeros([1], (Kind::Float, self.device));
            group.all_reduce(&[&one], ReduceOp::Sum)?;
            self.wait_seconds += started.elapsed().as_secs_f64();
        }
        let reducing = Instant::now();
        match self.compressor.as_mut() {
            Some(compressor) if compressor.active() => {
                compressor.reduce(group, self.world_size)?;
                self.comm_bytes += compressor.bytes_per_step();
            }
            compressor => {
                let early = reducer.finish()?;
                self.buckets_reduced += reducer.buckets as u64;
                self.buckets_overlapped += early as u64;
                self.comm_bytes += self.plain_bytes;
                if let Some(compressor) = compressor {
                    compressor.skip();
                }
            }
        }
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        self.comm_seconds += reducing.elapsed().as_secs_f64();
        Ok(())
    }

    /// Sums numbers over the ranks.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>, CommError> {
        let tensor = Tensor::from_slice(values)
            .to_kind(Kind::Double)
            .to_device(self.device);
        if let Some(group) = &self.group {
            group.all_reduce(&[&tensor], ReduceOp::Sum)?;
        }
        Vec::<f64>::try_from(tensor.to_device(Device::Cpu))
            .map_err(|e| CommError(format!("reading the sum: {e}")))
    }
}
