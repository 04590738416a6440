//! Fused parameter-free RMSNorm over the last dimension, forward and backward, parallel over rows.
//!
//! Composed from candle primitives it is six element-wise passes forward (square, mean, add eps,
//! sqrt, reciprocal, multiply) and about twice that backward, each a full-size temporary. Here it
//! is one pass each way; the backward recomputes the row's inverse RMS from the input instead of
//! saving it. With y = x r, r = 1 / sqrt(mean(x²) + eps): dx = r (dy − y mean(dy ⊙ y)).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::f32_slice;
use crate::model::ops::RMS_NORM_EPS;

/// Rows per rayon task: rows are short (64 to a few thousand values), so batch them.
pub(crate) const MIN_ROWS_PER_TASK: usize = 64;

/// `x * rsqrt(mean(x²) + eps)` over the last dimension of an f32 tensor.
pub fn rms_norm(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm)
}

/// 1 / sqrt(mean(x²) + eps) of one row.
pub(crate) fn inv_rms(row: &[f32]) -> f32 {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    1.0 / (ss / row.len() as f32 + RMS_NORM_EPS as f32).sqrt()
}

/// The RMSNorm backward of one row in place: `g` holds dy on entry and dx on return; `y` is the
/// normalised row and `r` its inverse RMS.
pub(crate) fn norm_backward_row(g: &mut [f32], y: &[f32], r: f32) {
    let mean: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum::<f32>() / g.len() as f32;
    g.iter_mut().zip(y).for_each(|(gi, yi)| *gi = r * (*gi - yi * mean));
}

fn row_len(l: &Layout) -> Result<usize> {
    let d = l.shape().dim(D::Minus1)?;
    if d == 0 {
        candle_core::bail!("rms_norm: empty last dimension");
    }
    Ok(d)
}

struct RmsNorm;

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = row_len(l)?;
        let x = f32_slice(s, l, "rms_norm", "input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(MIN_ROWS_PER_TASK).for_each(|(o, row)| {
            let r = inv_rms(row);
            o.iter_mut().zip(row).for_each(|(oi, xi)| *oi = xi * r);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &RmsNormGrad)?))
    }
}

/// (x, dy) -> dx of [`RmsNorm`].
struct RmsNormGrad;

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = row_len(l1)?;
        let (x, dy) = (f32_slice(s1, l1, "rms_norm", "input")?, f32_slice(s2, l2, "rms_norm", "gradient")?);
        if x.len() != dy.len() {
            candle_core::bail!("rms_norm: gradient {:?} does not match input {:?}", l2.shape(), l1.shape());
        }
        let mut out = dy.to_vec();
        out.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(MIN_ROWS_PER_TASK).for_each_init(
            || vec![0f32; d],
            |y, (g, row)| {
                let r = inv_rms(row);
                y.iter_mut().zip(row).for_each(|(yi, xi)| *yi = xi * r);
                norm_backward_row(g, y, r);
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
