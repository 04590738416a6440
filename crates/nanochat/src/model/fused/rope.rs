//! Fused rotary embedding + QK-norm (RMSNorm of each head after the rotation), forward and
//! backward, on (B, T, H, D) queries or keys, parallel over rows.
//!
//! Composed, the rotation alone is two narrows, four broadcast multiplies, an add, a subtract and a
//! concatenation, then the norm's six passes; every one a full-size temporary, and the backward
//! doubles that. Rotation, per position t and pair (x1, x2) of the two halves:
//! y1 = x1 cos + x2 sin, y2 = x2 cos − x1 sin. Its transpose (the backward):
//! dx1 = dy1 cos − dy2 sin, dx2 = dy1 sin + dy2 cos.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;
use super::norm::{inv_rms, norm_backward_row, MIN_ROWS_PER_TASK};

/// RMSNorm(rotary(x)) for x (B, T, H, D) with cos and sin (T, 1, D/2) (or anything of T * D/2
/// values).
pub fn rope_qk_norm(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    let table = |c: &Tensor| -> Result<Arc<[f32]>> {
        let v = c.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if v.len() != t * (d / 2) {
            candle_core::bail!("rope_qk_norm: table of {} values for {t} positions of head dim {d}", v.len());
        }
        Ok(v.into())
    };
    let tables = Tables { cos: table(cos)?, sin: table(sin)? };
    x.contiguous()?.apply_op1(RopeNorm(tables))
}

#[derive(Clone)]
struct Tables {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
}

/// (T, H, D) of an input, checked.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (_, t, h, d) = l.shape().dims4()?;
    if d == 0 || d % 2 != 0 {
        candle_core::bail!("rope_qk_norm: head dim {d} must be even and non-zero");
    }
    Ok((t, h, d))
}

struct RopeNorm(Tables);

/// Rotates `x` (one head row at position `pos`) into `y`.
fn rotate(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for j in 0..half {
        y1[j] = x1[j] * cos[j] + x2[j] * sin[j];
        y2[j] = x2[j] * cos[j] - x1[j] * sin[j];
    }
}

impl CustomOp1 for RopeNorm {
    fn name(&self) -> &'static str {
        "rope-qk-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, h, d) = dims(l)?;
        let x = f32_slice(s, l, "rope_qk_norm", "input")?;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().with_min_len(MIN_ROWS_PER_TASK).for_each(
            |(n, (o, row))| {
                let pos = (n / h) % t;
                let (cos, sin) = (&self.0.cos[pos * half..][..half], &self.0.sin[pos * half..][..half]);
                rotate(row, o, cos, sin);
                let r = inv_rms(o);
                o.iter_mut().for_each(|v| *v *= r);
            },
        );
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &RopeNormGrad(self.0.clone()))?))
    }
}

/// (x, dy) -> dx of [`RopeNorm`]: the norm's backward at the rotated row, then the rotation's
/// transpose.
struct RopeNormGrad(Tables);

impl CustomOp2 for RopeNormGrad {
    fn name(&self) -> &'static str {
        "rope-qk-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, h, d) = dims(l1)?;
        let op = "rope_qk_norm";
        let (x, dy) = (f32_slice(s1, l1, op, "input")?, f32_slice(s2, l2, op, "gradient")?);
        if x.len() != dy.len() {
            candle_core::bail!("rope_qk_norm: gradient {:?} does not match input {:?}", l2.shape(), l1.shape());
        }
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each_init(
                || (vec![0f32; d], vec![0f32; d]),
                |(y, g), (n, (o, (row, dyrow)))| {
                    let pos = (n / h) % t;
                    let (cos, sin) = (&self.0.cos[pos * half..][..half], &self.0.sin[pos * half..][..half]);
                    rotate(row, y, cos, sin);
                    let r = inv_rms(y);
                    y.iter_mut().for_each(|v| *v *= r);
                    g.copy_from_slice(dyrow);
                    norm_backward_row(g, y, r);
                    let (g1, g2) = g.split_at(half);
                    let (o1, o2) = o.split_at_mut(half);
                    for j in 0..half {
                        o1[j] = g1[j] * cos[j] - g2[j] * sin[j];
                        o2[j] = g1[j] * sin[j] + g2[j] * cos[j];
                    }
                },
            );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
