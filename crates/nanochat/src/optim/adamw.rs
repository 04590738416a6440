//! AdamW with the arithmetic of torch's fused implementation, which v0 `setup_optimizers` uses on
//! one device for the embedding and the lm_head:
//! `m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`,
//! with decoupled weight decay `p *= 1 - lr * wd` first. A parameter whose gradient and moments
//! are zero (an embedding row never seen) is left exactly unchanged.
//!
//! On the CPU in f32 (with fused [`Kernels`], the default, as the model's) the update is one
//! multi-threaded pass that rewrites the parameter and both moments in place: the
//! embedding and lm_head are 8.4 M values each at depth 4, and the composition of candle ops
//! makes a dozen full-size temporaries of them per step. Both paths do the same f32 operations in
//! the same order, so they agree bit for bit.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::in_place::{fusable, with_data_mut, InPlace2};
use super::ParamGroup;
use crate::model::Kernels;

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
    /// Fused: the one-pass update on the CPU; otherwise the composition of candle ops (the same
    /// values bit for bit).
    pub kernels: Kernels,
    state: HashMap<String, AdamState>,
}

impl AdamW {
    /// With the default (fused) [`Kernels`].
    pub fn new(groups: Vec<ParamGroup>, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        Self { groups, betas, eps, weight_decay, kernels: Kernels::default(), state: HashMap::new() }
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
                let t = i32::try_from(step).unwrap_or(i32::MAX);
                let bias_correction1 = 1.0 - b1.powi(t);
                let bias_correction2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let k = Coefficients {
                    b1: b1 as f32,
                    one_minus_b1: (1.0 - b1) as f32,
                    b2: b2 as f32,
                    one_minus_b2: (1.0 - b2) as f32,
                    inv_bc2_sqrt: (1.0 / bias_correction2_sqrt) as f32,
                    eps: self.eps as f32,
                    decay: (self.weight_decay != 0.0).then_some((1.0 - group.lr * self.weight_decay) as f32),
                    step_size: (group.lr / bias_correction1) as f32,
                };
                let p = var.as_tensor();
                let (exp_avg, exp_avg_sq) = if fusable(self.kernels, &[p, &g, &state.exp_avg, &state.exp_avg_sq]) {
                    update_in_place(p, &g, &state.exp_avg, &state.exp_avg_sq, k)?;
                    (state.exp_avg, state.exp_avg_sq)
                } else {
                    let exp_avg = (state.exp_avg.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
                    let exp_avg_sq = (state.exp_avg_sq.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
                    let denom = exp_avg_sq.sqrt()?.affine(1.0 / bias_correction2_sqrt, self.eps)?;
                    let mut p = p.detach();
                    if self.weight_decay != 0.0 {
                        p = p.affine(1.0 - group.lr * self.weight_decay, 0.0)?;
                    }
                    let p = (p - exp_avg.affine(k.step_size.into(), 0.0)?.div(&denom)?)?;
                    var.set(&p)?;
                    (exp_avg, exp_avg_sq)
                };
                self.state.insert(name.clone(), AdamState { step, exp_avg, exp_avg_sq });
            }
        }
        Ok(())
    }

    /// Keeps the state of the parameters named `keep` only (sharded state: this rank's).
    pub fn retain_state(&mut self, keep: impl Fn(&str) -> bool) {
        self.state.retain(|name, _| keep(name));
    }

    /// The optimizer state as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`, and
    /// `{param}.step` as an i64 scalar), for checkpoints.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, s) in &self.state {
            let step = i64::try_from(s.step).map_err(candle_core::Error::wrap)?;
            out.insert(format!("{name}.step"), Tensor::new(step, s.exp_avg.device())?);
            // Copies: the fused update rewrites the moments in place at the next step.
            out.insert(format!("{name}.exp_avg"), s.exp_avg.copy()?);
            out.insert(format!("{name}.exp_avg_sq"), s.exp_avg_sq.copy()?);
        }
        Ok(out)
    }

    /// Restores the state saved by [`AdamW::state_dict`]: every parameter's (an empty `state`,
    /// saved before the first step, starts all fresh).
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let params = self.groups.iter().flat_map(|g| g.params.iter());
        let expected: HashSet<String> =
            params.flat_map(|(name, _)| ["step", "exp_avg", "exp_avg_sq"].map(|k| format!("{name}.{k}"))).collect();
        if let Some(key) = state.keys().find(|k| !expected.contains(*k)) {
            candle_core::bail!("the optimizer state has an entry adamw.{key} that is no parameter's AdamW state");
        }
        self.state.clear();
        for group in &self.groups {
            for (name, var) in &group.params {
                let get = |key: &str| state.get(&format!("{name}.{key}"));
                let (Some(step), Some(m), Some(v)) = (get("step"), get("exp_avg"), get("exp_avg_sq")) else {
                    if state.is_empty() {
                        continue;
                    }
                    candle_core::bail!("the optimizer state has no AdamW step, exp_avg and exp_avg_sq for {name}");
                };
                if m.shape() != var.shape() || v.shape() != var.shape() {
                    candle_core::bail!("AdamW moments of {name} do not have its shape {:?}", var.shape());
                }
                let step = step.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                self.state.insert(
                    name.clone(),
                    AdamState {
                        step: u64::try_from(step).map_err(candle_core::Error::wrap)?,
                        // Own copies, which the fused update may rewrite in place.
                        exp_avg: m.to_dtype(DType::F32)?.copy()?,
                        exp_avg_sq: v.to_dtype(DType::F32)?.copy()?,
                    },
                );
            }
        }
        Ok(())
    }
}

/// The per-step constants of the update, as the f32 values candle's `affine` would use.
#[derive(Clone, Copy)]
struct Coefficients {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    decay: Option<f32>,
    step_size: f32,
}

/// The AdamW step of one parameter in one pass, in place. Each value goes through the same f32
/// operations as the composed path (`affine` is `x * mul + add`, hence the `+ 0.0`s, which only
/// turn -0.0 into +0.0 as it does), so the result is identical bit for bit.
fn update_in_place(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: Coefficients) -> Result<()> {
    let step = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = (*m * k.b1 + 0.0) + (g * k.one_minus_b1 + 0.0);
            *v = (*v * k.b2 + 0.0) + ((g * g) * k.one_minus_b2 + 0.0);
            let denom = v.sqrt() * k.inv_bc2_sqrt + k.eps;
            let decayed = k.decay.map_or(*p, |d| *p * d + 0.0);
            *p = decayed - (*m * k.step_size + 0.0) / denom;
        }
    };
    // Candle hands out one tensor's storage mutably per in-place op, so the ops nest: the
    // moments' data are borrowed by the outer two, the parameter and gradient by the inner one.
    with_data_mut(m, |m| {
        with_data_mut(v, |v| {
            if m.len() != v.len() {
                candle_core::bail!("AdamW moments of different sizes");
            }
            p.inplace_op2(
                g,
                &InPlace2(Mutex::new(|p: &mut [f32], g: &[f32]| {
                    if p.len() != g.len() || p.len() != m.len() {
                        candle_core::bail!("AdamW: parameter, gradient and moments differ in size");
                    }
                    const CHUNK: usize = 1 << 14;
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .for_each(|(((p, g), m), v)| step(p, g, m, v));
                    Ok(())
                })),
            )
        })
    })
}
