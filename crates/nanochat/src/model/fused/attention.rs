//! Fused causal self-attention with group-query heads, forward and backward, on the CPU.
//!
//! The composed version materialises the (T × T) scores of every head several times per layer
//! (matmul, scale, mask add, max, subtract, exp, sum, divide, and as many again in the backward):
//! 33 MB each at batch 8, 4 heads, T = 512, each a fresh allocation that the kernel must zero
//! page by page. Here one task per (batch, head) walks the queries in blocks of [`BLOCK_Q`] rows:
//! scores of the block against the keys it may see (one GEMM), an exact softmax per row (the whole
//! visible key range is in the block, so no online rescaling is needed), and the weighted sum of
//! values (one GEMM). Only a (BLOCK_Q × T) scratch is live per task, and each row's log-sum-exp is
//! kept for the backward, which recomputes the probabilities instead of storing them (as
//! FlashAttention does).
//!
//! Layouts are the projections' own, so no transposes are needed around the kernel: q (B, Tq, H,
//! D), k and v (B, Tk, Hkv, D), output (B, Tq, H, D). Query head h reads kv head h / (H / Hkv)
//! (adjacent query heads share a kv head, like `repeat_interleave`). With Tk > Tq the first
//! Tk - Tq keys are a prefix that every query sees (a KV cache), causal inside the chunk.
//!
//! Backward, per row i with P the probabilities, dY the output gradient and s = 1/sqrt(D):
//! dV = Pᵀ dY; dP = dY Vᵀ; dS = P ⊙ (dP − rowsum(dY ⊙ Y)); dQ = s dS K; dK = s dSᵀ Q.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, gemm, simd, Mat};

/// Query rows per block: the (BLOCK_Q × Tk) scores stay in L2 for T up to a few thousand.
const BLOCK_Q: usize = 64;

/// Causal attention of q (B, Tq, H, D) over k, v (B, Tk, Hkv, D), Tk ≥ Tq; returns (B, Tq, H, D).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3(&k, &v, CausalAttention { lse: Mutex::new(None) })
}

struct CausalAttention {
    /// Log-sum-exp of every score row (B, H, Tq), written by the forward for the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hkv: usize,
    d: usize,
}

impl Dims {
    fn new(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (b, tq, h, d) = q.dims4()?;
        let (bk, tk, hkv, dk) = k.dims4()?;
        if v != k || bk != b || dk != d || hkv == 0 || h % hkv != 0 || tk < tq {
            candle_core::bail!("causal_attention: q {q:?} does not fit k {k:?} and v {v:?}");
        }
        Ok(Self { b, tq, tk, h, hkv, d })
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.d as f64).sqrt()) as f32
    }

    /// Offsets of q[b, 0, h, :] and k[b, 0, h / r, :], and the row strides of q and k.
    fn bases(&self, b: usize, h: usize) -> (usize, usize, usize, usize) {
        let (q_rs, kv_rs) = (self.h * self.d, self.hkv * self.d);
        let g = h / (self.h / self.hkv);
        (b * self.tq * q_rs + h * self.d, b * self.tk * kv_rs + g * self.d, q_rs, kv_rs)
    }
}

/// Scores of query rows i0.. (bq of them) against the first `nk` keys, scaled: s (bq × nk).
#[allow(clippy::too_many_arguments)] // the operands, the (batch, head) and the block
fn scores(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    b: usize,
    h: usize,
    i0: usize,
    bq: usize,
    nk: usize,
    s: &mut [f32],
) -> Result<()> {
    let (q0, k0, q_rs, kv_rs) = dm.bases(b, h);
    let qm = Mat { data: &q[q0 + i0 * q_rs..], rs: q_rs, cs: 1 };
    let kt = Mat { data: &k[k0..], rs: 1, cs: kv_rs };
    gemm(bq, nk, dm.d, s, nk, qm, kt, dm.scale(), false)
}

/// The block's extent: (rows, keys visible to its last row).
fn block(dm: &Dims, i0: usize) -> (usize, usize) {
    let bq = BLOCK_Q.min(dm.tq - i0);
    (bq, (dm.tk - dm.tq + i0 + bq).min(dm.tk))
}

/// One (batch, head): y (Tq × D, rows contiguous) and lse (Tq).
fn forward_head(dm: &Dims, q: &[f32], k: &[f32], v: &[f32], b: usize, h: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (_, k0, _, kv_rs) = dm.bases(b, h);
    let offset = dm.tk - dm.tq;
    let mut y = vec![0f32; dm.tq * dm.d];
    let mut lse = vec![0f32; dm.tq];
    let mut s = Vec::new();
    for i0 in (0..dm.tq).step_by(BLOCK_Q) {
        let (bq, nk) = block(dm, i0);
        s.resize(bq * nk, 0.0);
        scores(dm, q, k, b, h, i0, bq, nk, &mut s)?;
        for (i, row) in s.chunks_mut(nk).enumerate() {
            let (visible, masked) = row.split_at_mut(offset + i0 + i + 1);
            let max = simd::max(visible);
            let sum = simd::exp_sum(visible, max);
            let inv = 1.0 / sum;
            visible.iter_mut().for_each(|x| *x *= inv);
            masked.fill(0.0);
            lse[i0 + i] = max + sum.ln();
        }
        let p = Mat { data: &s, rs: nk, cs: 1 };
        let vm = Mat { data: &v[k0..], rs: kv_rs, cs: 1 };
        gemm(bq, dm.d, nk, &mut y[i0 * dm.d..], dm.d, p, vm, 1.0, false)?;
    }
    Ok((y, lse))
}

/// Gradients of one kv head g of batch b: dq of its r query heads (r × Tq × D), dk, dv (Tk × D).
#[allow(clippy::too_many_arguments)] // the saved forward tensors, the incoming gradient, the task
fn backward_group(
    dm: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: &[f32],
    dy: &[f32],
    lse: &[f32],
    b: usize,
    g: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (r, d, offset) = (dm.h / dm.hkv, dm.d, dm.tk - dm.tq);
    let mut dq = vec![0f32; r * dm.tq * d];
    let mut dk = vec![0f32; dm.tk * d];
    let mut dv = vec![0f32; dm.tk * d];
    let (mut p, mut ds) = (Vec::new(), Vec::new());
    for hh in 0..r {
        let h = g * r + hh;
        let (q0, k0, q_rs, kv_rs) = dm.bases(b, h);
        let lse = &lse[(b * dm.h + h) * dm.tq..];
        for i0 in (0..dm.tq).step_by(BLOCK_Q) {
            let (bq, nk) = block(dm, i0);
            p.resize(bq * nk, 0.0);
            ds.resize(bq * nk, 0.0);
            scores(dm, q, k, b, h, i0, bq, nk, &mut p)?;
            let dyb = Mat { data: &dy[q0 + i0 * q_rs..], rs: q_rs, cs: 1 };
            gemm(bq, nk, d, &mut ds, nk, dyb, Mat { data: &v[k0..], rs: 1, cs: kv_rs }, 1.0, false)?; // dP
            for (i, (prow, dsrow)) in p.chunks_mut(nk).zip(ds.chunks_mut(nk)).enumerate() {
                let row = q0 + (i0 + i) * q_rs;
                let delta: f32 = dy[row..row + d].iter().zip(&y[row..row + d]).map(|(a, b)| a * b).sum();
                let (lim, l) = (offset + i0 + i + 1, lse[i0 + i]);
                simd::softmax_grad(&mut prow[..lim], &mut dsrow[..lim], l, delta);
                prow[lim..].fill(0.0);
                dsrow[lim..].fill(0.0);
            }
            let pt = Mat { data: &p, rs: 1, cs: nk };
            gemm(nk, d, bq, &mut dv, d, pt, dyb, 1.0, true)?;
            let dsm = Mat { data: &ds, rs: nk, cs: 1 };
            let km = Mat { data: &k[k0..], rs: kv_rs, cs: 1 };
            gemm(bq, d, nk, &mut dq[(hh * dm.tq + i0) * d..], d, dsm, km, dm.scale(), false)?;
            let dst = Mat { data: &ds, rs: 1, cs: nk };
            let qb = Mat { data: &q[q0 + i0 * q_rs..], rs: q_rs, cs: 1 };
            gemm(nk, d, bq, &mut dk, d, dst, qb, dm.scale(), true)?;
        }
    }
    Ok((dq, dk, dv))
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> candle_core::Error {
    candle_core::Error::Msg(format!("causal_attention: lock poisoned: {e}"))
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = Dims::new(l1.shape(), l2.shape(), l3.shape())?;
        let op = "causal_attention";
        let (q, k, v) = (f32_slice(s1, l1, op, "q")?, f32_slice(s2, l2, op, "k")?, f32_slice(s3, l3, op, "v")?);
        let heads = (0..dm.b * dm.h)
            .into_par_iter()
            .map(|bh| forward_head(&dm, q, k, v, bh / dm.h, bh % dm.h))
            .collect::<Result<Vec<_>>>()?;
        // scatter the per-head rows back into (B, Tq, H, D); lse stays (B, H, Tq)
        let mut y = vec![0f32; dm.b * dm.tq * dm.h * dm.d];
        let mut lse = Vec::with_capacity(dm.b * dm.h * dm.tq);
        for (bh, (yh, lh)) in heads.iter().enumerate() {
            let (b, h) = (bh / dm.h, bh % dm.h);
            for (i, row) in yh.chunks(dm.d).enumerate() {
                let at = ((b * dm.tq + i) * dm.h + h) * dm.d;
                y[at..at + dm.d].copy_from_slice(row);
            }
            lse.extend_from_slice(lh);
        }
        *self.lse.lock().map_err(lock_err)? = Some(lse);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::new(q.shape(), k.shape(), v.shape())?;
        let lse = self.lse.lock().map_err(lock_err)?;
        let Some(lse) = lse.as_ref() else {
            candle_core::bail!("causal_attention: backward before forward");
        };
        // Plain copies of the (small) saved tensors: a few MB per layer, cheap next to the GEMMs.
        let data = |t: &Tensor| t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        let (qv, kv, vv, yv, dyv) = (data(q)?, data(k)?, data(v)?, data(res)?, data(grad_res)?);
        let groups = (0..dm.b * dm.hkv)
            .into_par_iter()
            .map(|bg| backward_group(&dm, &qv, &kv, &vv, &yv, &dyv, lse, bg / dm.hkv, bg % dm.hkv))
            .collect::<Result<Vec<_>>>()?;
        let (r, d) = (dm.h / dm.hkv, dm.d);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        for (bg, (gq, gk, gv)) in groups.iter().enumerate() {
            let (b, g) = (bg / dm.hkv, bg % dm.hkv);
            for (n, row) in gq.chunks(d).enumerate() {
                let (hh, i) = (n / dm.tq, n % dm.tq);
                let at = ((b * dm.tq + i) * dm.h + g * r + hh) * d;
                dq[at..at + d].copy_from_slice(row);
            }
            for (j, (rk, rv)) in gk.chunks(d).zip(gv.chunks(d)).enumerate() {
                let at = ((b * dm.tk + j) * dm.hkv + g) * d;
                dk[at..at + d].copy_from_slice(rk);
                dv[at..at + d].copy_from_slice(rv);
            }
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
