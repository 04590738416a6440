//! AdamW with the arithmetic of torch's fused implementation, which v0 `setup_optimizers` uses on
//! one device for the embedding and the lm_head:
//! `m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`,
//! with decoupled weight decay `p *= 1 - lr * wd` first. A parameter whose gradient and moments
//! are zero (an embedding row never seen) is left exactly unchanged.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use super::ParamGroup;

struct AdamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over several groups (each with its own learning rate), state per parameter.
pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    state: HashMap<String, AdamState>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        Self { groups, betas, eps, weight_decay, state: HashMap::new() }
    }

    /// Updates every parameter that has a gradient in `grads`; the others (and their step
    /// counts) are left alone, as torch skips parameters whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (b1, b2) = self.betas;
        for group in &self.groups {
            for (name, var) in &group.params {
                let Some(g) = grads.get(var) else { continue };
                let g = g.detach();
                let state = match self.state.remove(name) {
                    Some(state) => state,
                    None => AdamState { step: 0, exp_avg: g.zeros_like()?, exp_avg_sq: g.zeros_like()? },
                };
                let step = state.step + 1;
                let exp_avg = (state.exp_avg.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
                let exp_avg_sq = (state.exp_avg_sq.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
                let t = i32::try_from(step).unwrap_or(i32::MAX);
                let bias_correction1 = 1.0 - b1.powi(t);
                let bias_correction2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let step_size = group.lr / bias_correction1;
                let denom = exp_avg_sq.sqrt()?.affine(1.0 / bias_correction2_sqrt, self.eps)?;
                let mut p = var.as_tensor().detach();
                if self.weight_decay != 0.0 {
                    p = p.affine(1.0 - group.lr * self.weight_decay, 0.0)?;
                }
                let p = (p - exp_avg.affine(step_size, 0.0)?.div(&denom)?)?;
                var.set(&p)?;
                self.state.insert(name.clone(), AdamState { step, exp_avg, exp_avg_sq });
            }
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`, and
    /// `{param}.step` as an i64 scalar), for checkpoints.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, s) in &self.state {
            let step = i64::try_from(s.step).map_err(candle_core::Error::wrap)?;
            out.insert(format!("{name}.step"), Tensor::new(step, s.exp_avg.device())?);
            out.insert(format!("{name}.exp_avg"), s.exp_avg.clone());
            out.insert(format!("{name}.exp_avg_sq"), s.exp_avg_sq.clone());
        }
        Ok(out)
    }

    /// Restores the state saved by [`AdamW::state_dict`]; parameters absent from `state` start
    /// fresh, as on the first step.
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for group in &self.groups {
            for (name, var) in &group.params {
                let get = |key: &str| state.get(&format!("{name}.{key}"));
                let (Some(step), Some(m), Some(v)) = (get("step"), get("exp_avg"), get("exp_avg_sq")) else {
                    continue;
                };
                if m.shape() != var.shape() || v.shape() != var.shape() {
                    candle_core::bail!("AdamW moments of {name} do not have its shape {:?}", var.shape());
                }
                let step = step.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                self.state.insert(
                    name.clone(),
                    AdamState {
                        step: u64::try_from(step).map_err(candle_core::Error::wrap)?,
                        exp_avg: m.to_dtype(DType::F32)?,
                        exp_avg_sq: v.to_dtype(DType::F32)?,
                    },
                );
            }
        }
        Ok(())
    }
}
