//! `fleet net`'s two halves: the probe that measures a link with what every training host has
//! (python3's sockets; nothing is installed), and the arithmetic that turns link speeds into the
//! cost of a data-parallel step (pure, unit-tested).

use serde::Serialize;

/// What one `measure` printed.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Measured {
    pub rtt_ms: f64,
    /// From the measuring host to the master.
    pub up_mbit: f64,
    /// From the master to the measuring host.
    pub down_mbit: f64,
    /// The same two, with both directions busy at once.
    pub both_up_mbit: f64,
    pub both_down_mbit: f64,
}

/// One direction of one link.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub from: String,
    pub to: String,
    /// With this direction alone busy.
    pub mbit_per_s: f64,
    /// While the other direction is busy too, as in a ring all-reduce: what the estimate uses.
    pub both_ways_mbit_per_s: f64,
    pub rtt_ms: f64,
}

/// A model as the estimate sees it: each parameter as rows × the rest of its values, the way
/// PowerSGD views it (a vector of n values is n × 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub shapes: Vec<(u64, u64)>,
}

impl Model {
    /// All its parameters.
    pub fn parameters(&self) -> u64 {
        self.shapes.iter().map(|(rows, cols)| rows * cols).sum()
    }

    /// A BERT classifier with these sizes, parameter by parameter as transformers'
    /// `BertForSequenceClassification` and fleet-train have them: embeddings (words, positions,
    /// two token types, LayerNorm), per layer the query, key, value and output projections, their
    /// LayerNorm, the feed-forward pair and its LayerNorm, then the pooler and the head.
    pub fn bert(
        vocab: u64,
        hidden: u64,
        layers: u64,
        intermediate: u64,
        positions: u64,
        labels: u64,
    ) -> Model {
        let (h, i) = (hidden, intermediate);
        let layer_norm = [(h, 1), (h, 1)];
        let linear = |out: u64, inp: u64| [(out, inp), (out, 1)];
        let mut shapes = vec![(vocab, h), (positions, h), (2, h)];
        shapes.extend(layer_norm);
        for _ in 0..layers {
            for _ in 0..4 {
                shapes.extend(linear(h, h));
            }
            shapes.extend(layer_norm);
            shapes.extend(linear(i, h));
            shapes.extend(linear(h, i));
            shapes.extend(layer_norm);
        }
        shapes.extend(linear(h, h));
        shapes.extend(linear(labels, h));
        Model { shapes }
    }

    /// BERT-base with two labels: about 109.5 M parameters.
    pub fn bert_base() -> Model {
        Model::bert(30522, 768, 12, 3072, 512, 2)
    }

    /// Values each rank all-reduces per step with PowerSGD at `rank`, in its two all-reduces:
    /// first P (rows × r) of every matrix its factors make smaller with every other parameter
    /// whole, then Q (cols × r). The same rule as fleet-train's `--powersgd-rank`.
    pub fn powersgd_values(&self, rank: u64) -> (u64, u64) {
        let (mut first, mut second) = (0, 0);
        for &(rows, cols) in &self.shapes {
            let r = rank.max(1).min(rows).min(cols);
            if r * (rows + cols) < rows * cols {
                first += rows * r;
                second += cols * r;
            } else {
                first += rows * cols;
            }
        }
        (first, second)
    }
}

/// What the estimate knows of a model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSize {
    /// Every parameter's shape: PowerSGD can be priced.
    Shapes(Model),
    /// Only how many parameters it has (`fleet net --params`).
    Parameters(u64),
}

impl ModelSize {
    pub fn parameters(&self) -> u64 {
        match self {
            ModelSize::Shapes(model) => model.parameters(),
            ModelSize::Parameters(n) => *n,
        }
    }

    fn shapes(&self) -> Option<&Model> {
        match self {
            ModelSize::Shapes(model) => Some(model),
            ModelSize::Parameters(_) => None,
        }
    }
}

/// Milliseconds for a ring all-reduce of `bytes` per rank over `ranks` ranks whose slowest link
/// carries `mbit` Mbit/s with round trip `rtt_ms`: each rank sends and receives 2(N−1)/N of the
/// data, in 2(N−1) steps that each wait about half a round trip.
pub fn ring_allreduce_ms(bytes: f64, ranks: usize, mbit: f64, rtt_ms: f64) -> f64 {
    if ranks < 2 {
        return 0.0;
    }
    let n = ranks as f64;
    let moved = 2.0 * (n - 1.0) / n * bytes;
    moved * 8.0 / (mbit.max(1e-9) * 1e6) * 1000.0 + 2.0 * (n - 1.0) * rtt_ms / 2.0
}

/// Speed-up over one GPU of `ranks` GPUs that each compute `accum` micro-batches of `step_ms`,
/// then all-reduce for `allreduce_ms`.
pub fn speedup(ranks: usize, accum: u32, step_ms: f64, allreduce_ms: f64) -> f64 {
    let work = f64::from(accum) * step_ms;
    ranks as f64 * work / (work + allreduce_ms)
}

/// The micro-batches per all-reduce the estimate prices.
const GRAD_ACCUM: [u32; 3] = [1, 4, 16];
/// The PowerSGD ranks it prices, least compressed first.
const POWERSGD_RANKS: [u64; 3] = [16, 4, 1];

#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub grad_accum: u32,
    pub speedup_fp32: f64,
    pub speedup_bf16: f64,
}

/// PowerSGD at one rank (fp32 factors), without gradient accumulation.
#[derive(Debug, Clone, Serialize)]
pub struct PowerSgdRow {
    pub rank: u64,
    /// What each rank puts into the all-reduces of one step.
    pub bytes_per_step: u64,
    pub allreduce_ms: f64,
    pub speedup: f64,
}

/// The cost of a data-parallel step on the measured network.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub params: u64,
    pub ranks: usize,
    pub bottleneck_mbit: f64,
    pub rtt_ms: f64,
    pub step_ms: f64,
    pub allreduce_fp32_ms: f64,
    pub allreduce_bf16_ms: f64,
    pub settings: Vec<Setting>,
    /// Empty when only the parameter count is known (`fleet net --params`).
    pub powersgd: Vec<PowerSgdRow>,
    pub recommendation: String,
}

/// One way to train, as the recommendation weighs it.
struct Candidate {
    grad_accum: u32,
    /// Its fleet-train flags besides --grad-accum.
    flags: String,
    speedup: f64,
}

impl Candidate {
    fn describe(&self) -> String {
        let accum = (self.grad_accum > 1).then(|| format!("--grad-accum {}", self.grad_accum));
        let flags = (!self.flags.is_empty()).then(|| self.flags.clone());
        [accum, flags]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The estimate for `model` on `ranks` ranks.
pub fn estimate(
    model: &ModelSize,
    ranks: usize,
    bottleneck_mbit: f64,
    rtt_ms: f64,
    step_ms: f64,
) -> Estimate {
    let params = model.parameters();
    let allreduce = |values: u64, bytes: u64| {
        ring_allreduce_ms((values * bytes) as f64, ranks, bottleneck_mbit, rtt_ms)
    };
    let (fp32, bf16) = (allreduce(params, 4), allreduce(params, 2));
    let settings: Vec<Setting> = GRAD_ACCUM
        .into_iter()
        .map(|k| Setting {
            grad_accum: k,
            speedup_fp32: speedup(ranks, k, step_ms, fp32),
            speedup_bf16: speedup(ranks, k, step_ms, bf16),
        })
        .collect();
    // Two all-reduces per step: P with the uncompressed parameters, then Q.
    let powersgd_ms = |model: &Model, rank| {
        let (first, second) = model.powersgd_values(rank);
        (first + second, allreduce(first, 4) + allreduce(second, 4))
    };
    let powersgd: Vec<PowerSgdRow> = model
        .shapes()
        .into_iter()
        .flat_map(|model| POWERSGD_RANKS.map(|rank| (model, rank)))
        .map(|(model, rank)| {
            let (values, ms) = powersgd_ms(model, rank);
            PowerSgdRow {
                rank,
                bytes_per_step: values * 4,
                allreduce_ms: ms,
                speedup: speedup(ranks, 1, step_ms, ms),
            }
        })
        .collect();

    let candidates = candidates(ranks, step_ms, fp32, bf16, &powersgd);
    let recommendation = recommend(&candidates, ranks);
    Estimate {
        params,
        ranks,
        bottleneck_mbit,
        rtt_ms,
        step_ms,
        allreduce_fp32_ms: fp32,
        allreduce_bf16_ms: bf16,
        settings,
        powersgd,
        recommendation,
    }
}

/// Every setting the recommendation weighs, least change first: fewer micro-batches per
/// all-reduce (the optimizer sees the batch it was given), then for each the exact fp32 sum,
/// bf16, and PowerSGD from the highest rank down.
fn candidates(
    ranks: usize,
    step_ms: f64,
    fp32_ms: f64,
    bf16_ms: f64,
    powersgd: &[PowerSgdRow],
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for k in GRAD_ACCUM {
        let mut add = |flags: String, ms: f64| {
            candidates.push(Candidate {
                grad_accum: k,
                flags,
                speedup: speedup(ranks, k, step_ms, ms),
            })
        };
        add(String::new(), fp32_ms);
        add("--allreduce-dtype bf16".into(), bf16_ms);
        for row in powersgd {
            add(format!("--powersgd-rank {}", row.rank), row.allreduce_ms);
        }
    }
    candidates
}

/// The first candidate that reaches 80% of linear speed-up, said for the user; else the best.
fn recommend(candidates: &[Candidate], ranks: usize) -> String {
    let goal = 0.8 * ranks as f64;
    if ranks < 2 {
        return "one rank: nothing to all-reduce".to_string();
    }
    if let Some(c) = candidates.iter().find(|c| c.speedup >= goal) {
        return if c.grad_accum == 1 && c.flags.is_empty() {
            format!(
                "the network keeps up: {:.2}x of {ranks}x as it is",
                c.speedup
            )
        } else {
            format!("{} ({:.2}x of {ranks}x)", c.describe(), c.speedup)
        };
    }
    match candidates
        .iter()
        .max_by(|a, b| a.speedup.total_cmp(&b.speedup))
    {
        Some(best) => format!(
            "the network is too slow for 80% of {ranks}x: even {} gives {:.2}x; a faster link \
             (wired Gigabit or better) is the fix",
            best.describe(),
            best.speedup
        ),
        None => "nothing to weigh".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_base_has_its_known_size() {
        let params = Model::bert_base().parameters();
        assert!((109_000_000..110_000_000).contains(&params), "{params}");
    }

    #[test]
    fn powersgd_sends_two_factors_of_each_matrix_they_make_smaller() {
        // 100 × 50 at rank 4: P 100 × 4, Q 50 × 4; the vector and the 3 × 50 matrix (whose
        // factors, 3 × 3 and 50 × 3, are larger) go whole.
        let model = Model {
            shapes: vec![(100, 50), (100, 1), (3, 50)],
        };
        assert_eq!(model.powersgd_values(4), (400 + 100 + 150, 200));
        // BERT-base at rank 4: over a hundred times fewer values than the whole gradient.
        let base = Model::bert_base();
        let (first, second) = base.powersgd_values(4);
        assert!(
            base.parameters() / (first + second) > 100,
            "{first} + {second}"
        );
    }

    #[test]
    fn the_seeds_three_pcs_on_gigabit() {
        // BERT-base fp32 over 3 ranks at 1 Gbit/s: 2·2/3 · 438 MB ≈ 4.7 s per step.
        let base = ModelSize::Shapes(Model::bert_base());
        let count_only = ModelSize::Parameters(base.parameters());
        let e = estimate(&base, 3, 1000.0, 0.0, 300.0);
        assert!(
            (e.allreduce_fp32_ms - 4672.0).abs() < 10.0,
            "{}",
            e.allreduce_fp32_ms
        );
        assert!((e.allreduce_bf16_ms * 2.0 - e.allreduce_fp32_ms).abs() < 1e-6);
        // Plain data parallel is slower than one GPU; PowerSGD at rank 4 is the least change
        // that reaches 80% of 3x, rank 16 is not enough.
        assert!(e.settings[0].speedup_fp32 < 1.0);
        let rank = |r| e.powersgd.iter().find(|row| row.rank == r).unwrap();
        assert!(rank(16).speedup < 2.4 && rank(4).speedup >= 2.4, "{e:?}");
        assert!(
            e.recommendation.starts_with("--powersgd-rank 4 ("),
            "{}",
            e.recommendation
        );
        // Knowing only the parameter count, there are no PowerSGD rows, and 16 micro-batches in
        // bf16 are not enough.
        let count = estimate(&count_only, 3, 1000.0, 0.0, 300.0);
        assert!(count.powersgd.is_empty());
        assert!(
            count.recommendation.starts_with(
                "the network is too slow for 80% of 3x: even --grad-accum 16 --allreduce-dtype bf16"
            ),
            "{}",
            count.recommendation
        );
        // On 10 Gbit/s, bf16 and four micro-batches reach 80% of 3x.
        let fast = estimate(&count_only, 3, 10_000.0, 0.1, 300.0);
        assert!(
            fast.recommendation
                .starts_with("--grad-accum 4 --allreduce-dtype bf16"),
            "{}",
            fast.recommendation
        );
        assert_eq!(
            estimate(&base, 1, 1000.0, 0.0, 300.0).allreduce_fp32_ms,
            0.0
        );
    }

    #[test]
    fn speedup_is_linear_without_communication() {
        assert_eq!(speedup(3, 1, 100.0, 0.0), 3.0);
        assert_eq!(speedup(3, 4, 100.0, 400.0), 1.5);
    }
}
