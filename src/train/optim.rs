//! AdamW with decoupled weight decay (as `torch.optim.AdamW`) and the linear warm-up and decay
//! schedule of transformers. Written out rather than taken from tch because its state (the two
//! moment estimates) has to be saved in checkpoints and broadcast on resume, which tch's
//! optimizer does not expose.

use tch::Tensor;

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

    /// One update with learning rate `lr` from the gradients the parameters hold.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let correction1 = 1.0 - self.beta1.powi(self.steps as i32);
        let correction2 = (1.0 - self.beta2.powi(self.steps as i32)).sqrt();
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                if p.decay && self.weight_decay > 0.0 && lr > 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                // In place, one pass per operation: the moment estimates first...
                let _ = p.first.lerp_(&grad, 1.0 - self.beta1);
                let _ = p.second.lerp_(&grad.square(), 1.0 - self.beta2);
                if lr > 0.0 {
                    // ...then p -= lr/c1 · m / (√v/c2 + ε), written as
                    // p += m / ((√v + ε·c2) · -c1·c2⁻¹/lr) to need two passes over v.
                    let mut denominator = p.second.sqrt();
                    let _ = denominator.g_add_scalar_(self.eps * correction2);
                    let _ = denominator.g_mul_scalar_(-correction1 / (lr * correction2));
                    let _ = p.tensor.addcdiv_(&p.first, &denominator);
                }
            }
        });
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
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(0, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(5, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(10, 10, 110, 1.0), 1.0);
        assert_eq!(linear_schedule(60, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(110, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(0, 0, 10, 2.0), 2.0);
    }
}
