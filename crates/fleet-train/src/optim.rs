//! AdamW with decoupled weight decay (as `torch.optim.AdamW(fused=True)`, through ATen's fused
//! kernel) and the linear warm-up and decay schedule of transformers. Not tch's optimizer because
//! its state (the two moment estimates) has to be saved in checkpoints and broadcast on resume,
//! which tch's does not expose.

use tch::Tensor;

use super::ddp::{AdamWStep, CommError, fused_adamw};

pub struct AdamW {
    params: Vec<Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    steps: i64,
}

struct Param {
    name: String,
    tensor: Tensor,
    first: Tensor,
    second: Tensor,
    decay: bool,
}

impl AdamW {
    /// Biases and LayerNorm weights are not decayed, as in transformers' Trainer.
    pub fn new(named: &[(String, Tensor)], weight_decay: f64) -> AdamW {
        let params = named
            .iter()
            .map(|(name, tensor)| Param {
                name: name.clone(),
                tensor: tensor.shallow_clone(),
                first: tensor.zeros_like().detach(),
                second: tensor.zeros_like().detach(),
                decay: !(name.ends_with(".bias") || name.contains("LayerNorm.")),
            })
            .collect();
        AdamW {
            params,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            steps: 0,
        }
    }

    /// One update with learning rate `lr` from the gradients the parameters hold, through
    /// ATen's fused AdamW kernel (one pass over each parameter and its moments); parameters
    /// without a gradient are left as they are.
    pub fn step(&mut self, lr: f64) -> Result<(), CommError> {
        self.steps += 1;
        let Some(first) = self.params.first() else {
            return Ok(());
        };
        let count = Tensor::from_slice(&[self.steps as f32]).to_device(first.tensor.device());
        for decay in [true, false] {
            let group: Vec<&Param> = self
                .params
                .iter()
                .filter(|p| p.decay == decay && p.tensor.grad().defined())
                .collect();
            if group.is_empty() {
                continue;
            }
            let list = |pick: fn(&Param) -> &Tensor| group.iter().map(|p| pick(p)).collect();
            let (params, firsts, seconds): (Vec<_>, Vec<_>, Vec<_>) =
                (list(|p| &p.tensor), list(|p| &p.first), list(|p| &p.second));
            let hyper = AdamWStep {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                weight_decay: if decay { self.weight_decay } else { 0.0 },
                eps: self.eps,
            };
            fused_adamw(&params, &firsts, &seconds, &count, hyper)?;
        }
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// The gradients in parameter order (undefined ones skipped).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.tensor.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// The moment estimates, named `adam.first.<param>` and `adam.second.<param>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("adam.first.{}", p.name), p.first.shallow_clone()),
                    (format!("adam.second.{}", p.name), p.second.shallow_clone()),
                ]
            })
            .collect()
    }

    pub fn set_steps(&mut self, steps: i64) {
        self.steps = steps;
    }
}

/// transformers' get_linear_schedule_with_warmup: from 0 up to `peak` over `warmup` steps, then
/// down to 0 at `total`.
pub fn linear_schedule(step: u64, warmup: u64, total: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    peak * (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

/// Scales all gradients so their joint L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        if norms.is_empty() {
            return 0.0;
        }
        let norm = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let scale = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && scale < 1.0 {
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(scale);
            }
        }
        norm
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_step_is_adamw_written_out() {
        // A decayed weight, a bias (not decayed) and a weight without a gradient, three steps,
        // against torch.optim.AdamW's update written out in f64.
        let named: Vec<(String, Tensor)> = ["layer.weight", "layer.bias", "unused.weight"]
            .iter()
            .zip([3, 2, 2])
            .map(|(name, n)| {
                let t = (Tensor::arange(n, (tch::Kind::Float, tch::Device::Cpu)) * 0.3 - 0.2)
                    .set_requires_grad(true);
                (name.to_string(), t)
            })
            .collect();
        let mut optimizer = AdamW::new(&named, 0.1);
        let start: Vec<Vec<f64>> = named
            .iter()
            .map(|(_, t)| Vec::try_from(t).unwrap())
            .collect();
        let (mut expected, mut m, mut v) =
            (start.clone(), vec![vec![0.0; 3]; 2], vec![vec![0.0; 3]; 2]);
        for step in 1..=3 {
            let grads: Vec<Vec<f64>> = (0..2)
                .map(|i| {
                    (0..named[i].1.numel())
                        .map(|j| 0.5 - 0.25 * (i + j + step) as f64)
                        .collect()
                })
                .collect();
            optimizer.zero_grad();
            for (i, grad) in grads.iter().enumerate() {
                // d/dt sum(t · g) = g.
                let g = Tensor::from_slice(grad).to_kind(tch::Kind::Float);
                (&named[i].1 * g).sum(tch::Kind::Float).backward();
            }
            let lr = 0.01;
            optimizer.step(lr).unwrap();
            let (c1, c2) = (
                1.0 - 0.9f64.powi(step as i32),
                1.0 - 0.999f64.powi(step as i32),
            );
            for i in 0..2 {
                for (j, g) in grads[i].iter().enumerate() {
                    if i == 0 {
                        expected[i][j] *= 1.0 - lr * 0.1;
                    }
                    m[i][j] = 0.9 * m[i][j] + 0.1 * g;
                    v[i][j] = 0.999 * v[i][j] + 0.001 * g * g;
                    expected[i][j] -= lr / c1 * m[i][j] / ((v[i][j] / c2).sqrt() + 1e-8);
                }
                let got = Vec::<f64>::try_from(&named[i].1.to_kind(tch::Kind::Double)).unwrap();
                for (a, b) in got.iter().zip(&expected[i]) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "step {step}, {}: {got:?} vs {:?}",
                        named[i].0,
                        expected[i]
                    );
                }
            }
        }
        let unused = Vec::<f64>::try_from(&named[2].1.to_kind(tch::Kind::Double)).unwrap();
        assert_eq!(unused, start[2], "a parameter without a gradient moved");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(0, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(5, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(10, 10, 110, 1.0), 1.0);
        assert_eq!(linear_schedule(60, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(110, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(0, 0, 10, 2.0), 2.0);
    }
}
