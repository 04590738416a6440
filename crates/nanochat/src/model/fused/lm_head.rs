//! Fused lm_head projection + softcap + cross-entropy, forward and backward, on the CPU.
//!
//! The (tokens × vocab) logits are by far the largest tensor of a training step (537 MB at 4,096
//! tokens and a 32k vocabulary). Through candle, the forward allocates them, and the backward
//! allocates their gradient and hands both to two more GEMMs: two fresh half-gigabyte buffers per
//! step, each zeroed page by page by the kernel. Here the forward writes the logits into one buffer
//! kept from step to step and, tile by tile as the GEMM finishes them (while they are in cache),
//! scores each row and overwrites it with the row's gradient for a unit upstream gradient up to
//! a per-row factor: the gradient is
//! `G = (softmax(z) − onehot(t)) ⊙ (1 − (z/c)²)` with `z = c tanh(logits / c)`, and since z ≤ c the
//! softmax needs no max pass, `softmax(z) = e / S` with `e = exp(z − c)`, `S = Σ e`. The row keeps
//! `G' = S G`, and 1 / S is folded into the per-row scales the backward applies anyway: with g the
//! per-token upstream gradient, dx = diag(g / S) G' W and dW = G'ᵀ diag(g / S) x. G' is never
//! rescaled, and the buffer goes back to the model's [`LogitsPool`] for the next step.
//!
//! These three products are about two thirds of a training step's matmul FLOPs at the benchmark
//! shape; on [`super::Gemm::Bf16`] (a model whose kernels ask for bf16, on a CPU with AVX-512
//! BF16) they run on the bf16 GEMM (operands rounded to bf16, f32 accumulation, twice the f32
//! rate). Everything else here, the logits buffer, the softmax and G, stays f32.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, matmul, matmul_then, simd, with_f32, Gemm, Mat};

/// The logits buffer of a model's last step, kept for its next one (one at most: training needs
/// one). Each model holds its own (clones share it), so models never hand buffers to each other.
#[derive(Clone, Default)]
pub struct LogitsPool(Arc<Mutex<Option<Vec<f32>>>>);

impl LogitsPool {
    /// A buffer of exactly `n` values (contents unspecified), from the pool when it is large enough.
    fn take(&self, n: usize) -> Vec<f32> {
        let pooled = self.0.lock().ok().and_then(|mut p| p.take());
        match pooled {
            Some(mut buf) if buf.capacity() >= n => {
                buf.resize(n, 0.0);
                buf.truncate(n);
                buf
            }
            _ => vec![0f32; n],
        }
    }

    fn give_back(&self, buf: Vec<f32>) {
        if let Ok(mut p) = self.0.lock() {
            *p = Some(buf);
        }
    }
}

/// Per-token softcapped cross-entropy of `x (N, C) · wᵀ` with `w (V, C)` the lm_head weight,
/// against `targets (N,)` (-1 = ignored, loss 0), its products on `gemm` and its logits buffer
/// from `pool`. Returns the losses (N,).
pub fn lm_head_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    cap: f32,
    gemm: Gemm,
    pool: &LogitsPool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let targets = targets.to_dtype(DType::I64)?.contiguous()?;
    x.apply_op3(&w, &targets, LmHeadCrossEntropy { cap, gemm, pool: pool.clone(), grad: Mutex::new(None) })
}

struct LmHeadCrossEntropy {
    cap: f32,
    gemm: Gemm,
    pool: LogitsPool,
    /// G' (N × V) and 1 / S per row from the forward (G = diag(1 / S) G'), consumed by the
    /// backward.
    grad: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl Drop for LmHeadCrossEntropy {
    fn drop(&mut self) {
        // A forward without backward (evaluation) still hands its buffer back.
        if let Ok(mut g) = self.grad.lock() {
            if let Some((buf, _)) = g.take() {
                self.pool.give_back(buf);
            }
        }
    }
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> candle_core::Error {
    candle_core::Error::Msg(format!("lm_head_cross_entropy: lock poisoned: {e}"))
}

/// (N, C, V) of the operands, checked.
fn dims(x: &Shape, w: &Shape, t: &Shape) -> Result<(usize, usize, usize)> {
    let (n, c) = x.dims2()?;
    let (v, cw) = w.dims2()?;
    if cw != c || t.dims1()? != n || v == 0 {
        candle_core::bail!("lm_head_cross_entropy: x {x:?}, weight {w:?} and targets {t:?} do not fit");
    }
    Ok((n, c, v))
}

impl CustomOp3 for LmHeadCrossEntropy {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
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
        let (n, c, v) = dims(l1.shape(), l2.shape(), l3.shape())?;
        let op = "lm_head_cross_entropy";
        let (x, w) = (f32_slice(s1, l1, op, "x")?, f32_slice(s2, l2, op, "weight")?);
        let targets = match (s3, l3.contiguous_offsets()) {
            (CpuStorage::I64(t), Some((a, b))) => &t[a..b],
            _ => candle_core::bail!("{op}: targets must be contiguous i64"),
        };
        let classes = targets
            .iter()
            .map(|&t| match t {
                -1 => Ok(None),
                t if (0..v as i64).contains(&t) => Ok(Some(t as usize)),
                t => candle_core::bail!("{op}: target {t} outside the vocabulary of {v}"),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut buf = self.pool.take(n * v);
        let cap = self.cap;
        // Per row, S so far and z at the target, as f32 bits: a row's tiles all come from one
        // thread, the atomics only let the shared epilogue write them.
        let sums: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        let z_target: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        // Each tile of logits, as soon as the GEMM has it: scored and turned into G' in place.
        let score = |i0: usize, rows: usize, j0: usize, cols: usize, tile: &mut [f32]| {
            for r in 0..rows {
                let i = i0 + r;
                let segment = &mut tile[r * v + j0..r * v + j0 + cols];
                let Some(t) = classes[i] else {
                    segment.fill(0.0);
                    continue;
                };
                if (j0..j0 + cols).contains(&t) {
                    z_target[i].store(simd::softcap_one(segment[t - j0], cap).to_bits(), Relaxed);
                }
                let sum = f32::from_bits(sums[i].load(Relaxed)) + simd::softcap_ce_row(segment, cap);
                sums[i].store(sum.to_bits(), Relaxed);
            }
        };
        let (xm, wm) = (Mat { data: x, rs: c, cs: 1 }, Mat { data: w, rs: 1, cs: c });
        matmul_then(self.gemm, n, v, c, &mut buf, v, xm, wm, Some(&score))?;
        let mut losses = vec![0f32; n];
        // 1 / S per row: G = diag(1 / S) G', and the backward folds it into its row scales
        let mut inv_sums = vec![0f32; n];
        buf.par_chunks_mut(v).zip(losses.par_iter_mut().zip(inv_sums.par_iter_mut())).enumerate().for_each(
            |(i, (row, (loss, inv_sum)))| {
                let Some(t) = classes[i] else { return };
                let (sum, zt) = (f32::from_bits(sums[i].load(Relaxed)), f32::from_bits(z_target[i].load(Relaxed)));
                *loss = sum.ln() + cap - zt;
                let th = zt / cap;
                row[t] -= sum * (1.0 - th * th);
                *inv_sum = 1.0 / sum;
            },
        );
        *self.grad.lock().map_err(lock_err)? = Some((buf, inv_sums));
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, v) = dims(x.shape(), w.shape(), targets.shape())?;
        let Some((g_buf, inv_sums)) = self.grad.lock().map_err(lock_err)?.take() else {
            candle_core::bail!("lm_head_cross_entropy: backward ran twice or before the forward");
        };
        let op = "lm_head_cross_entropy";
        let mut g = grad_res.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        g.iter_mut().zip(&inv_sums).for_each(|(g, s)| *g *= s);
        let result = with_f32(w, op, "weight", |wv| {
            // dx = diag(g / S) (G' W)
            let mut dx = vec![0f32; n * c];
            matmul(self.gemm, n, c, v, &mut dx, c, Mat { data: &g_buf, rs: v, cs: 1 }, Mat { data: wv, rs: c, cs: 1 })?;
            dx.par_chunks_mut(c).zip(g.par_iter()).for_each(|(row, &gi)| row.iter_mut().for_each(|d| *d *= gi));
            // dW = G'ᵀ (diag(g / S) x)
            let xs = with_f32(x, op, "x", |xv| {
                Ok(xv
                    .par_chunks(c)
                    .zip(g.par_iter())
                    .flat_map_iter(|(row, &gi)| row.iter().map(move |d| d * gi))
                    .collect::<Vec<f32>>())
            })?;
            let mut dw = vec![0f32; v * c];
            matmul(
                self.gemm,
                v,
                c,
                n,
                &mut dw,
                c,
                Mat { data: &g_buf, rs: 1, cs: v },
                Mat { data: &xs, rs: c, cs: 1 },
            )?;
            Ok((dx, dw))
        });
        self.pool.give_back(g_buf);
        let (dx, dw) = result?;
        let dev = x.device();
        Ok((Some(Tensor::from_vec(dx, (n, c), dev)?), Some(Tensor::from_vec(dw, (v, c), dev)?), None))
    }
}
