//! Who this process is in the job (the torchrun environment) and how it talks to the others:
//! the store at MASTER_ADDR:MASTER_PORT, one process group, and the collectives the training loop
//! needs, which do nothing when the job has one rank.

use std::net::{ToSocketAddrs, UdpSocket};
use std::time::Instant;

use anyhow::{Context, bail};
use tch::{Device, Kind, Tensor};

use super::ddp::{Backend, CommError, ProcessGroup, ReduceOp, Store};

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
    // Field order: the group is dropped (shut down) before the store it uses.
    group: Option<ProcessGroup>,
    store: Option<Store>,
    pub world_size: usize,
    device: Device,
    bucket_bytes: usize,
    /// Seconds spent in gradient all-reduces so far.
    pub comm_seconds: f64,
    /// Each rank's host, once [`Collective::exchange`] has been called.
    pub hosts: Vec<String>,
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
            group: None,
            store: None,
            world_size: rank.world_size,
            device,
            bucket_bytes: bucket_bytes.max(1),
            comm_seconds: 0.0,
            hosts: vec![rank.host.clone()],
        };
        if rank.world_size == 1 {
            return Ok(collective);
        }
        let address = format!("{}:{}", rank.master_addr, rank.master_port);
        // Under torchrun the agent already serves the store on MASTER_PORT, and each restart
        // attempt keeps its keys apart with a prefix, as torch.distributed does.
        let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True");
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
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut silent: Vec<usize> = (0..self.world_size).collect();
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

    /// Averages the gradients over the ranks, in buckets of about `bucket_bytes`, one coalesced
    /// all-reduce per bucket. With `wire` (bfloat16 or float16) the gradients travel compressed
    /// and are restored afterwards, as PyTorch DDP's compression hooks do: divided by the world
    /// size first, so the compressed sum cannot overflow.
    pub fn average_gradients(
        &mut self,
        grads: &[Tensor],
        wire: Option<Kind>,
    ) -> Result<(), CommError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let started = Instant::now();
        let scale = 1.0 / self.world_size as f64;
        let sent: Vec<Tensor> = tch::no_grad(|| {
            grads
                .iter()
                .map(|grad| match wire {
                    Some(kind) => (grad * scale).to_kind(kind),
                    None => grad.shallow_clone().g_mul_scalar_(scale),
                })
                .collect()
        });
        let mut bucket: Vec<&Tensor> = Vec::new();
        let mut bytes = 0usize;
        for tensor in &sent {
            let size = tensor.numel() * tensor.kind().elt_size_in_bytes();
            if !bucket.is_empty() && bytes + size > self.bucket_bytes {
                group.all_reduce_coalesced(&bucket, ReduceOp::Sum)?;
                bucket.clear();
                bytes = 0;
            }
            bucket.push(tensor);
            bytes += size;
        }
        if !bucket.is_empty() {
            group.all_reduce_coalesced(&bucket, ReduceOp::Sum)?;
        }
        if wire.is_some() {
            tch::no_grad(|| {
                for (grad, summed) in grads.iter().zip(&sent) {
                    grad.shallow_clone().copy_(summed);
                }
            });
        }
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        self.comm_seconds += started.elapsed().as_secs_f64();
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
