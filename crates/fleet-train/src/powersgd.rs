//! PowerSGD gradient compression (Vogels, Karimireddy and Jaggi, NeurIPS 2019), as PyTorch's
//! `powerSGD_hook` does it: each gradient matrix M (a parameter viewed as rows × the rest) is
//! sent as two rank-R factors instead of its rows × cols values.
//!
//! One step, on every rank at once:
//! 1. M += the error this rank's compression left last step (error feedback);
//! 2. P = M Q, with Q warm-started from the previous step; all-reduce P (summed);
//! 3. P is orthogonalised (QR); Q = Mᵀ P; all-reduce Q and divide by the world size;
//! 4. the gradient becomes P Qᵀ, the mean of the ranks' M projected onto P's columns, and the
//!    error M − P Qᵀ is kept for the next step.
//!
//! Vectors, and matrices whose factors would not be smaller, travel uncompressed (averaged),
//! batched into the same all-reduce as P. With a rank as large as the matrix the projection
//! is exact, so PowerSGD then equals plain averaging.

use tch::{Kind, Tensor};

use super::ddp::{CommError, ProcessGroup, ReduceOp};

/// One compressed gradient matrix and what it carries from step to step.
struct Matrix {
    /// Index of its parameter.
    param: usize,
    rows: i64,
    cols: i64,
    /// cols × rank, warm-started: the last step's averaged Q.
    q: Tensor,
    /// rows × cols: what this rank's last compression left out.
    error: Tensor,
}

/// Saved Q and error of every matrix, in the compressor's order.
pub struct Saved(Vec<(Tensor, Tensor)>);

pub struct PowerSgd {
    rank: i64,
    /// Optimizer steps averaged plainly before compression starts (PyTorch's
    /// `start_powerSGD_iter`).
    pub warmup_steps: u64,
    /// Optimizer steps seen so far.
    pub steps: u64,
    /// What P, Q and the uncompressed gradients travel as (None: their own dtype).
    wire: Option<Kind>,
    /// The parameters' dtype, which the factors and errors keep.
    kind: Kind,
    params: Vec<Tensor>,
    matrices: Vec<Matrix>,
    /// Indices of the parameters sent uncompressed.
    plain: Vec<usize>,
}

impl PowerSgd {
    /// Compression of the gradients of `params` at `rank` (≥ 1), starting after
    /// `warmup_steps` plain steps.
    pub fn new(params: &[Tensor], rank: usize, warmup_steps: u64, wire: Option<Kind>) -> Self {
        Self::build(params, rank, warmup_steps, wire, false)
    }

    /// `every_matrix`: compress every matrix, even where its factors are not smaller (a rank as
    /// large as the matrix makes PowerSGD exact, which the tests compare with plain averaging).
    fn build(
        params: &[Tensor],
        rank: usize,
        warmup_steps: u64,
        wire: Option<Kind>,
        every_matrix: bool,
    ) -> Self {
        let rank = rank.max(1) as i64;
        let kind = params.first().map_or(Kind::Float, Tensor::kind);
        let mut matrices = Vec::new();
        let mut plain = Vec::new();
        for (index, param) in params.iter().enumerate() {
            let size = param.size();
            let rows = size.first().copied().unwrap_or(1);
            let cols = if rows == 0 {
                0
            } else {
                param.numel() as i64 / rows
            };
            let r = rank.min(rows).min(cols);
            let smaller = r * (rows + cols) < rows * cols;
            if size.len() < 2 || r == 0 || !(smaller || every_matrix) {
                plain.push(index);
                continue;
            }
            let options = (kind, param.device());
            matrices.push(Matrix {
                param: index,
                rows,
                cols,
                q: orthogonal(
                    &start_q(cols, r, index)
                        .to_kind(kind)
                        .to_device(param.device()),
                ),
                error: Tensor::zeros([rows, cols], options),
            });
        }
        PowerSgd {
            rank,
            warmup_steps,
            steps: 0,
            wire,
            kind,
            params: params.iter().map(Tensor::shallow_clone).collect(),
            matrices,
            plain,
        }
    }

    /// Whether this step's gradients are compressed (the warm-up is over).
    pub fn active(&self) -> bool {
        self.steps >= self.warmup_steps
    }

    /// The rank of the factors.
    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    /// Bytes each rank puts into the all-reduces of one compressed step (P, Q and the
    /// uncompressed gradients).
    pub fn bytes_per_step(&self) -> u64 {
        let element = self.wire.unwrap_or(self.kind).elt_size_in_bytes() as u64;
        let plain: i64 = self
            .plain
            .iter()
            .map(|&i| self.params[i].numel() as i64)
            .sum();
        let factors: i64 = self
            .matrices
            .iter()
            .map(|m| m.q.size()[1] * (m.rows + m.cols))
            .sum();
        (plain + factors) as u64 * element
    }

    /// Replaces every gradient by its compressed average over the group's `world_size` ranks
    /// (see the module's steps), and counts the step.
    pub fn reduce(&mut self, group: &ProcessGroup, world_size: usize) -> Result<(), CommError> {
        let world = world_size as f64;
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();

        // Error feedback, then P = M Q for every matrix.
        let inputs: Vec<Tensor> = self
            .matrices
            .iter()
            .map(|m| grads[m.param].to_kind(self.kind).view([m.rows, m.cols]) + &m.error)
            .collect();
        let ps: Vec<Tensor> = inputs
            .iter()
            .zip(&self.matrices)
            .map(|(input, m)| input.matmul(&m.q))
            .collect();

        // One all-reduce carries P and the uncompressed gradients (divided first, so a
        // half-precision sum cannot overflow).
        let plain: Vec<Tensor> = self
            .plain
            .iter()
            .map(|&i| grads[i].to_kind(self.kind).reshape([-1]) / world)
            .collect();
        let p_values: i64 = ps.iter().map(|p| p.numel() as i64).sum();
        let both: Vec<Tensor> = ps.iter().chain(&plain).map(Tensor::shallow_clone).collect();
        let sent = self.send(&both, group)?;
        let plain_flat = sent.narrow(0, p_values, sent.size()[0] - p_values);
        write_back(&plain_flat, self.plain.iter().map(|&i| &grads[i]));

        // P orthogonalised, Q = Mᵀ P, averaged.
        let ps: Vec<Tensor> = split(&sent, ps.iter().map(Tensor::size))
            .iter()
            .map(orthogonal)
            .collect();
        let qs: Vec<Tensor> = inputs
            .iter()
            .zip(&ps)
            .map(|(input, p)| input.tr().matmul(p))
            .collect();
        let q_flat = self.send(&qs, group)? / world;
        let qs = split(&q_flat, qs.iter().map(Tensor::size));

        for (((m, input), p), q) in self.matrices.iter_mut().zip(&inputs).zip(&ps).zip(qs) {
            let approx = p.matmul(&q.tr());
            m.error = input - &approx;
            let grad = &grads[m.param];
            grad.view([m.rows, m.cols]).copy_(&approx);
            m.q = q;
        }
        self.steps += 1;
        Ok(())
    }

    /// What this rank carries from step to step, for a checkpoint: each matrix's Q (the same on
    /// every rank) and its error feedback (this rank's own).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.matrices
            .iter()
            .flat_map(|m| {
                [
                    (format!("q.{}", m.param), m.q.shallow_clone()),
                    (format!("error.{}", m.param), m.error.shallow_clone()),
                ]
            })
            .collect()
    }

    /// What [`PowerSgd::state`] saved, matched to this compressor's matrices; None unless it
    /// holds every matrix in its shape.
    pub fn matched(&self, saved: &[(String, Tensor)]) -> Option<Saved> {
        let find = |name: String, like: &Tensor| {
            saved
                .iter()
                .find(|(n, t)| *n == name && t.size() == like.size())
                .map(|(_, t)| t.to_kind(like.kind()).to_device(like.device()))
        };
        self.matrices
            .iter()
            .map(|m| {
                Some((
                    find(format!("q.{}", m.param), &m.q)?,
                    find(format!("error.{}", m.param), &m.error)?,
                ))
            })
            .collect::<Option<Vec<_>>>()
            .map(Saved)
    }

    /// Continues from what was saved.
    pub fn restore(&mut self, saved: Saved) {
        for (m, (q, error)) in self.matrices.iter_mut().zip(saved.0) {
            m.q = q;
            m.error = error;
        }
    }

    /// Counts a step whose gradients were averaged plainly (the warm-up).
    pub fn skip(&mut self) {
        self.steps += 1;
    }

    /// All-reduces (sums) the tensors as one flat tensor, in the wire dtype.
    fn send(&self, tensors: &[Tensor], group: &ProcessGroup) -> Result<Tensor, CommError> {
        if tensors.is_empty() {
            return Ok(Tensor::zeros([0], (self.kind, tch::Device::Cpu)));
        }
        let flat: Vec<Tensor> = tensors.iter().map(|t| t.reshape([-1])).collect();
        let flat = Tensor::cat(&flat, 0);
        let wire = match self.wire {
            Some(kind) => flat.to_kind(kind),
            None => flat,
        };
        group.all_reduce(&[&wire], ReduceOp::Sum)?;
        Ok(wire.to_kind(self.kind))
    }
}

/// The columns of `m` made orthonormal (the Q of its reduced QR).
fn orthogonal(m: &Tensor) -> Tensor {
    Tensor::linalg_qr(m, "reduced").0
}

/// The first Q of a matrix: the same on every rank without touching the random generator
/// (which seeds dropout and the data order), and different for each parameter.
fn start_q(cols: i64, rank: i64, salt: usize) -> Tensor {
    let n = Tensor::arange(cols * rank, (Kind::Double, tch::Device::Cpu)) + (salt as f64) * 7919.0;
    let hashed = ((n * 12.9898).sin() * 43758.5453).frac() - 0.5;
    hashed.to_kind(Kind::Float).view([cols, rank])
}

/// Pieces of `flat` with the given shapes, in order.
fn split(flat: &Tensor, shapes: impl Iterator<Item = Vec<i64>>) -> Vec<Tensor> {
    let mut offset = 0;
    shapes
        .map(|shape| {
            let len: i64 = shape.iter().product();
            let piece = flat.narrow(0, offset, len).view(shape.as_slice());
            offset += len;
            piece
        })
        .collect()
}

/// Copies consecutive pieces of `flat` into the gradients, each in its own shape and dtype.
fn write_back<'a>(flat: &Tensor, grads: impl Iterator<Item = &'a Tensor>) {
    let mut offset = 0;
    for grad in grads {
        let len = grad.numel() as i64;
        let piece = flat
            .narrow(0, offset, len)
            .view_as(grad)
            .to_kind(grad.kind());
        grad.shallow_clone().copy_(&piece);
        offset += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddp::Store;
    use tch::Device;

    const WORLD: usize = 3;

    /// Runs `body(rank, group)` on WORLD ranks, each a thread with its own Gloo group on
    /// loopback; returns what each returned, in rank order.
    fn on_ranks<T: Send + 'static>(
        body: impl Fn(usize, &ProcessGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let body = std::sync::Arc::new(body);
        let threads: Vec<_> = (0..WORLD)
            .map(|rank| {
                let body = body.clone();
                std::thread::spawn(move || {
                    let store =
                        Store::connect("127.0.0.1", port, WORLD, rank == 0, 30_000).unwrap();
                    let group =
                        ProcessGroup::gloo(&store, rank, WORLD, Some("127.0.0.1"), 30_000).unwrap();
                    body(rank, &group)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// Parameters of a small model's shapes: two matrices, a 4-D kernel and a vector.
    fn params() -> Vec<Tensor> {
        [vec![6, 5], vec![4, 9], vec![3, 2, 2, 2], vec![7]]
            .into_iter()
            .map(|shape| {
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true)
            })
            .collect()
    }

    /// Gives each parameter the gradient `values(rank, step, index)`.
    fn set_grads(params: &[Tensor], rank: usize, step: i64) -> Vec<Tensor> {
        params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let n = p.numel() as i64;
                let seed = (rank as i64 * 1000 + step * 100 + i as i64) as f64;
                let g = ((Tensor::arange(n, (Kind::Double, Device::Cpu)) + seed) * 1.618)
                    .sin()
                    .to_kind(Kind::Float)
                    .view(p.size().as_slice());
                if p.grad().defined() {
                    let _ = p.grad().zero_();
                }
                let loss = (p * &g).sum(Kind::Float);
                loss.backward();
                g
            })
            .collect()
    }

    fn mean_over_ranks(per_rank: &[Vec<Tensor>], index: usize) -> Tensor {
        per_rank
            .iter()
            .map(|grads| grads[index].shallow_clone())
            .reduce(|a, b| a + b)
            .unwrap()
            / per_rank.len() as f64
    }

    #[test]
    fn at_full_rank_it_equals_plain_averaging_step_after_step() {
        let results = on_ranks(|rank, group| {
            let params = params();
            let mut psgd = PowerSgd::build(&params, 64, 0, None, true);
            assert_eq!(psgd.plain, [3], "every matrix is compressed");
            let mut steps = Vec::new();
            for step in 0..3 {
                let given = set_grads(&params, rank, step);
                psgd.reduce(group, WORLD).unwrap();
                let got: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
                steps.push((given, got));
            }
            steps
        });
        for step in 0..3 {
            let given: Vec<Vec<Tensor>> = results
                .iter()
                .map(|r| r[step].0.iter().map(Tensor::shallow_clone).collect())
                .collect();
            for index in 0..4 {
                let mean = mean_over_ranks(&given, index);
                for (rank, r) in results.iter().enumerate() {
                    let got = &r[step].1[index];
                    let diff = (got - &mean).abs().max().double_value(&[]);
                    assert!(
                        diff < 1e-4,
                        "step {step}, rank {rank}, param {index}: off by {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_low_rank_carries_its_error_to_the_next_step_and_every_rank_agrees() {
        let results = on_ranks(|rank, group| {
            let params = params();
            let mut psgd = PowerSgd::new(&params, 1, 0, None);
            // At rank 1 the 6×5 and 4×9 matrices and the 3×8 kernel are compressed.
            assert_eq!(psgd.plain, [3]);
            let given = set_grads(&params, rank, 0);
            psgd.reduce(group, WORLD).unwrap();
            let first: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
            let errors: Vec<Tensor> = psgd.matrices.iter().map(|m| m.error.copy()).collect();
            // What the compression left out is this rank's gradient minus what it got.
            for (m, error) in psgd.matrices.iter().zip(&errors) {
                let left =
                    given[m.param].view([m.rows, m.cols]) - first[m.param].view([m.rows, m.cols]);
                assert!((&left - error).abs().max().double_value(&[]) < 1e-5);
                assert!(
                    error.abs().max().double_value(&[]) > 1e-3,
                    "rank 1 loses something"
                );
            }
            // A step with zero gradients still sends what was left out.
            for p in &params {
                let _ = p.grad().zero_();
            }
            psgd.reduce(group, WORLD).unwrap();
            let second: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
            (first, second)
        });
        let (first0, second0) = &results[0];
        for (index, grad) in second0.iter().take(3).enumerate() {
            assert!(
                grad.abs().max().double_value(&[]) > 1e-3,
                "param {index}: the error was not carried"
            );
        }
        for (first, second) in &results[1..] {
            for index in 0..4 {
                assert!(
                    first[index].equal(&first0[index]),
                    "ranks disagree on step 1"
                );
                assert!(
                    second[index].equal(&second0[index]),
                    "ranks disagree on step 2"
                );
            }
        }
    }

    #[test]
    fn bytes_per_step_count_the_factors_and_the_uncompressed_values() {
        let params = params();
        let psgd = PowerSgd::new(&params, 1, 0, Some(Kind::BFloat16));
        // (6+5) + (4+9) + (3+8) factor values at rank 1, 7 plain, two bytes each.
        assert_eq!(psgd.bytes_per_step(), (11 + 13 + 11 + 7) * 2);
    }

    #[test]
    fn its_bytes_are_what_fleet_net_prices_for_the_same_model() {
        use crate::model::{BertClassifier, BertConfig, Preset, named_parameters};
        let config = BertConfig::preset(Preset::Small, 8000, 128);
        let vars = tch::nn::VarStore::new(Device::Cpu);
        let _model = BertClassifier::new(&vars.root(), config.clone(), 2);
        let params: Vec<Tensor> = named_parameters(&vars)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let priced = fleet::netperf::Model::bert(
            config.vocab_size as u64,
            config.hidden_size as u64,
            config.num_hidden_layers as u64,
            config.intermediate_size as u64,
            config.max_position_embeddings as u64,
            2,
        );
        let total: i64 = params.iter().map(Tensor::numel).map(|n| n as i64).sum();
        assert_eq!(total as u64, priced.parameters());
        for rank in [1, 4, 16] {
            let (first, second) = priced.powersgd_values(rank);
            let psgd = PowerSgd::new(&params, rank as usize, 0, None);
            assert_eq!(psgd.bytes_per_step(), (first + second) * 4, "rank {rank}");
        }
    }
}
