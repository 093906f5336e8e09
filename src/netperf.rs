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

/// Parameters of a BERT classifier with these sizes (embeddings, encoder, pooler, head).
pub fn bert_parameters(
    vocab: u64,
    hidden: u64,
    layers: u64,
    intermediate: u64,
    positions: u64,
    labels: u64,
) -> u64 {
    let embeddings = (vocab + positions + 2) * hidden + 2 * hidden;
    let attention = 4 * (hidden * hidden + hidden) + 2 * hidden;
    let feed_forward =
        hidden * intermediate + intermediate + intermediate * hidden + hidden + 2 * hidden;
    let pooler = hidden * hidden + hidden;
    let head = hidden * labels + labels;
    embeddings + layers * (attention + feed_forward) + pooler + head
}

/// BERT-base with two labels: about 109.5 M parameters.
pub fn bert_base_parameters() -> u64 {
    bert_parameters(30522, 768, 12, 3072, 512, 2)
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

#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub grad_accum: u32,
    pub speedup_fp32: f64,
    pub speedup_bf16: f64,
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
    pub recommendation: String,
}

pub fn estimate(
    params: u64,
    ranks: usize,
    bottleneck_mbit: f64,
    rtt_ms: f64,
    step_ms: f64,
) -> Estimate {
    let fp32 = ring_allreduce_ms(params as f64 * 4.0, ranks, bottleneck_mbit, rtt_ms);
    let bf16 = ring_allreduce_ms(params as f64 * 2.0, ranks, bottleneck_mbit, rtt_ms);
    let settings: Vec<Setting> = [1, 4, 16]
        .into_iter()
        .map(|k| Setting {
            grad_accum: k,
            speedup_fp32: speedup(ranks, k, step_ms, fp32),
            speedup_bf16: speedup(ranks, k, step_ms, bf16),
        })
        .collect();
    let goal = 0.8 * ranks as f64;
    let fp32_pick = settings.iter().find(|s| s.speedup_fp32 >= goal);
    let bf16_pick = settings.iter().find(|s| s.speedup_bf16 >= goal);
    let recommendation = match (fp32_pick, bf16_pick) {
        _ if ranks < 2 => "one rank: nothing to all-reduce".to_string(),
        (Some(s), _) if s.grad_accum == 1 => {
            format!(
                "the network keeps up: {:.2}x of {ranks}x as it is",
                s.speedup_fp32
            )
        }
        (Some(f), Some(b)) if b.grad_accum < f.grad_accum => format!(
            "--grad-accum {} --allreduce-dtype bf16 ({:.2}x of {ranks}x)",
            b.grad_accum, b.speedup_bf16
        ),
        (Some(f), _) => format!(
            "--grad-accum {} ({:.2}x of {ranks}x)",
            f.grad_accum, f.speedup_fp32
        ),
        (None, Some(b)) => format!(
            "--grad-accum {} --allreduce-dtype bf16 ({:.2}x of {ranks}x)",
            b.grad_accum, b.speedup_bf16
        ),
        (None, None) => {
            let best = settings.last().map_or(0.0, |s| s.speedup_bf16);
            format!(
                "the network is too slow for 80% of {ranks}x: even --grad-accum 16 --allreduce-dtype bf16 \
                 gives {best:.2}x; a faster link (wired Gigabit or better) is the fix"
            )
        }
    };
    Estimate {
        params,
        ranks,
        bottleneck_mbit,
        rtt_ms,
        step_ms,
        allreduce_fp32_ms: fp32,
        allreduce_bf16_ms: bf16,
        settings,
        recommendation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_base_has_its_known_size() {
        let params = bert_base_parameters();
        assert!((109_000_000..110_000_000).contains(&params), "{params}");
    }

    #[test]
    fn the_seeds_three_pcs_on_gigabit() {
        // 110 M fp32 parameters, 3 ranks, 1 Gbit/s: 2·2/3 · 440 MB ≈ 4.7 s per step.
        let e = estimate(110_000_000, 3, 1000.0, 0.0, 300.0);
        assert!(
            (e.allreduce_fp32_ms - 4693.3).abs() < 1.0,
            "{}",
            e.allreduce_fp32_ms
        );
        assert!((e.allreduce_bf16_ms * 2.0 - e.allreduce_fp32_ms).abs() < 1e-6);
        // Plain data parallel is slower than one GPU; 16 micro-batches in bf16 are not enough.
        assert!(e.settings[0].speedup_fp32 < 1.0);
        assert!(
            e.recommendation.starts_with("the network is too slow"),
            "{}",
            e.recommendation
        );
        // On 10 Gbit/s, bf16 and four micro-batches reach 80% of 3x.
        let fast = estimate(110_000_000, 3, 10_000.0, 0.1, 300.0);
        assert!(
            fast.recommendation
                .starts_with("--grad-accum 4 --allreduce-dtype bf16"),
            "{}",
            fast.recommendation
        );
        assert_eq!(
            estimate(110_000_000, 1, 1000.0, 0.0, 300.0).allreduce_fp32_ms,
            0.0
        );
    }

    #[test]
    fn speedup_is_linear_without_communication() {
        assert_eq!(speedup(3, 1, 100.0, 0.0), 3.0);
        assert_eq!(speedup(3, 4, 100.0, 400.0), 1.5);
    }
}
