//! Muon (MomentUm Orthogonalized by Newton-Schulz), as v0 `muon.py` runs it on one device: SGD
//! with Nesterov momentum whose update is replaced by the nearest semi-orthogonal matrix,
//! approximated by 5 steps of a quintic Newton-Schulz iteration. For the 2-D matrices of the
//! transformer blocks only. The iteration runs in f32 (the f32 variant of the fixture is the
//! parity target); v0 runs it in bf16, which on the CPU it does here too when the optimizer's
//! [`Kernels`] (the model's) put the training GEMM in bf16: the products' operands are rounded to
//! bf16.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use super::in_place::{fusable, InPlace2};
use super::ParamGroup;
use crate::model::fused::{self, Gemm};
use crate::model::Kernels;

/// Quintic coefficients (a, b, c) of v0, tuned to maximise the slope at zero.
const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// torch's `lerp(s, e, w)` with its two branches (they round differently), `w` taken in f32.
fn lerp(s: &Tensor, e: &Tensor, w: f64) -> Result<Tensor> {
    let w = w as f32;
    let diff = (e - s)?;
    if w.abs() < 0.5 {
        s + diff.affine(w as f64, 0.0)?
    } else {
        e - diff.affine((1.0 - w) as f64, 0.0)?
    }
}

/// One momentum step: `buf = lerp(buf, g, 1 - momentum)`, then the gradient fed to the
/// orthogonalisation, `lerp(g, buf, momentum)` with Nesterov or `buf` without.
/// Returns (new buffer, blended gradient).
pub fn momentum_update(buf: &Tensor, g: &Tensor, momentum: f64, nesterov: bool) -> Result<(Tensor, Tensor)> {
    let buf = lerp(buf, g, 1.0 - momentum)?;
    let g = if nesterov { lerp(g, &buf, momentum)? } else { buf.clone() };
    Ok((buf, g))
}

/// torch's `lerp` of one value, as [`lerp`] computes it on tensors (`affine` is `x * w + 0.0`).
fn lerp_one(s: f32, e: f32, w: f32) -> f32 {
    let diff = e - s;
    if w.abs() < 0.5 {
        s + (diff * w + 0.0)
    } else {
        e - (diff * (1.0 - w) + 0.0)
    }
}

/// [`momentum_update`] in one pass on the CPU: `buf` rewritten in place, the blended gradient
/// returned; the same f32 operations in the same order, so the same values bit for bit.
pub fn momentum_in_place(buf: &Tensor, g: &Tensor, momentum: f64, nesterov: bool) -> Result<Vec<f32>> {
    let (w_buf, w_blend) = ((1.0 - momentum) as f32, momentum as f32);
    let mut blended = Vec::new();
    buf.inplace_op2(
        g,
        &InPlace2(Mutex::new(|buf: &mut [f32], g: &[f32]| {
            if buf.len() != g.len() {
                candle_core::bail!("Muon: momentum buffer and gradient differ in size");
            }
            blended = buf
                .iter_mut()
                .zip(g)
                .map(|(b, &g)| {
                    *b = lerp_one(*b, g, w_buf);
                    if nesterov {
                        lerp_one(g, *b, w_blend)
                    } else {
                        *b
                    }
                })
                .collect();
            Ok(())
        })),
    )?;
    Ok(blended)
}

/// `p += alpha · update` in place, as `p + update.affine(alpha, 0.0)` computes it.
pub fn add_scaled_in_place(p: &Tensor, update: &Tensor, alpha: f64) -> Result<()> {
    let alpha = alpha as f32;
    p.inplace_op2(
        update,
        &InPlace2(Mutex::new(|p: &mut [f32], u: &[f32]| {
            if p.len() != u.len() {
                candle_core::bail!("Muon: parameter and update differ in size");
            }
            p.iter_mut().zip(u).for_each(|(p, &u)| *p += u * alpha + 0.0);
            Ok(())
        })),
    )
}

/// Approximately orthogonalises `g` (rows, cols): U V^T of its SVD, up to singular values in
/// roughly [0.7, 1.2], which is what Muon needs and far cheaper than an SVD. On the CPU with fused
/// `kernels`, over plain buffers on their training GEMM.
pub fn zeropower_via_newtonschulz5(g: &Tensor, steps: usize, kernels: Kernels) -> Result<Tensor> {
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    // Work on the wide orientation so X X^T is the smaller Gram matrix.
    let mut x = g.to_dtype(DType::F32)?;
    if tall {
        x = x.t()?.contiguous()?;
    }
    x = if x.device().is_cpu() && kernels.fused {
        newton_schulz_cpu(&x, steps, kernels.gemm())?
    } else {
        let (a, b, c) = NS_COEFFS;
        // Frobenius normalisation puts every singular value in [0, 1], where the iteration
        // converges.
        let norm = x.sqr()?.sum_all()?.sqrt()?;
        x = x.broadcast_div(&(norm + 1e-7)?)?;
        for _ in 0..steps {
            let gram = x.matmul(&x.t()?)?; // A = X X^T
            let poly = ((&gram * b)? + (&gram * c)?.matmul(&gram)?)?; // B = b A + (c A) A
            x = ((&x * a)? + poly.matmul(&x)?)?; // X = a X + B X
        }
        x
    };
    if tall {
        x = x.t()?.contiguous()?;
    }
    Ok(x)
}

fn mat(data: &[f32], rs: usize, cs: usize) -> fused::Mat<'_> {
    fused::Mat { data, rs, cs }
}

/// The same iteration, f32 operation for f32 operation, over plain buffers on the CPU through the
/// training GEMM `gemm` (`fused::matmul`: f32, or bf16 operands like v0's bf16 iteration): a
/// tensor per operation costs more than the products themselves at these sizes (24 matrices of
/// 256 × 256 to 256 × 1,024 per step at depth 4, each with 5 × 6 operations).
fn newton_schulz_cpu(x: &Tensor, steps: usize, gemm: Gemm) -> Result<Tensor> {
    let (a, b, c) = (NS_COEFFS.0 as f32, NS_COEFFS.1 as f32, NS_COEFFS.2 as f32);
    let (m, n) = x.dims2()?;
    let mut x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt() + 1e-7;
    x.iter_mut().for_each(|v| *v /= norm);
    let (mut gram, mut scaled, mut poly, mut bx) =
        (vec![0f32; m * m], vec![0f32; m * m], vec![0f32; m * m], vec![0f32; m * n]);
    for _ in 0..steps {
        fused::matmul(gemm, m, m, n, &mut gram, m, mat(&x, n, 1), mat(&x, 1, n))?; // A = X X^T
        scaled.iter_mut().zip(&gram).for_each(|(s, g)| *s = g * c);
        fused::matmul(gemm, m, m, m, &mut poly, m, mat(&scaled, m, 1), mat(&gram, m, 1))?;
        poly.iter_mut().zip(&gram).for_each(|(p, g)| *p += g * b); // B = b A + (c A) A
        fused::matmul(gemm, m, n, m, &mut bx, n, mat(&poly, m, 1), mat(&x, n, 1))?;
        x.iter_mut().zip(&bx).for_each(|(x, bx)| *x = *x * a + bx); // X = a X + B X
    }
    Tensor::from_vec(x, (m, n), &candle_core::Device::Cpu)
}

/// Muon over one group of 2-D parameters. State: one momentum buffer per parameter.
pub struct Muon {
    pub group: ParamGroup,
    pub momentum: f64,
    pub nesterov: bool,
    pub ns_steps: usize,
    /// Fused: in-place momentum and update, and the Newton-Schulz products on the kernels' GEMM
    /// (bf16 when they say so); otherwise the composition of candle ops.
    pub kernels: Kernels,
    state: HashMap<String, Tensor>,
}

impl Muon {
    /// v0's defaults besides the learning rate: momentum 0.95, Nesterov, 5 Newton-Schulz steps;
    /// the default (fused, f32) [`Kernels`].
    pub fn new(group: ParamGroup) -> Self {
        Self { group, momentum: 0.95, nesterov: true, ns_steps: 5, kernels: Kernels::default(), state: HashMap::new() }
    }

    /// Updates every parameter that has a gradient in `grads`; the others are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (name, var) in &self.group.params {
            let Some(g) = grads.get(var) else { continue };
            let (rows, cols) = var.dims2()?;
            let g = g.detach();
            let buf = match self.state.get(name) {
                Some(buf) => buf.clone(),
                None => g.zeros_like()?,
            };
            // Tall matrices get a larger step so that the update's RMS matches across shapes.
            let alpha = -self.group.lr * (rows as f64 / cols as f64).max(1.0).sqrt();
            if fusable(self.kernels, &[var.as_tensor(), &g, &buf]) {
                // the buffer rewritten in place, the parameter too: no full-size temporaries
                let blended = momentum_in_place(&buf, &g, self.momentum, self.nesterov)?;
                let blended = Tensor::from_vec(blended, (rows, cols), g.device())?;
                let update = zeropower_via_newtonschulz5(&blended, self.ns_steps, self.kernels)?;
                add_scaled_in_place(var.as_tensor(), &update, alpha)?;
                self.state.insert(name.clone(), buf);
                continue;
            }
            let (buf, g) = momentum_update(&buf, &g, self.momentum, self.nesterov)?;
            let update = zeropower_via_newtonschulz5(&g, self.ns_steps, self.kernels)?;
            var.set(&(var.as_tensor().detach() + update.affine(alpha, 0.0)?)?)?;
            self.state.insert(name.clone(), buf);
        }
        Ok(())
    }

    /// Keeps the momentum buffers of the parameters named `keep` only (sharded state: this rank's).
    pub fn retain_state(&mut self, keep: impl Fn(&str) -> bool) {
        self.state.retain(|name, _| keep(name));
    }

    /// The optimizer state as named tensors (`{param}.momentum_buffer`), for checkpoints.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        // copies: the fused update rewrites the buffers in place at the next step
        self.state.iter().map(|(name, buf)| Ok((format!("{name}.momentum_buffer"), buf.copy()?))).collect()
    }

    /// Restores the state saved by [`Muon::state_dict`]: every parameter's (an empty `state`,
    /// saved before the first step, starts all with zero buffers).
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let expected: HashSet<String> =
            self.group.params.iter().map(|(name, _)| format!("{name}.momentum_buffer")).collect();
        if let Some(key) = state.keys().find(|k| !expected.contains(*k)) {
            candle_core::bail!("the optimizer state has an entry muon.{key} that is no parameter's Muon state");
        }
        self.state.clear();
        for (name, var) in &self.group.params {
            let buf = state.get(&format!("{name}.momentum_buffer"));
            if buf.is_none() && !state.is_empty() {
                candle_core::bail!("the optimizer state has no Muon momentum_buffer for {name}");
            }
            if let Some(buf) = buf {
                if buf.shape() != var.shape() {
                    candle_core::bail!(
                        "momentum buffer of {name} has shape {:?}, expected {:?}",
                        buf.shape(),
                        var.shape()
                    );
                }
                // an own copy, which the fused update may rewrite in place
                self.state.insert(name.clone(), buf.to_dtype(DType::F32)?.copy()?);
            }
        }
        Ok(())
    }
}
