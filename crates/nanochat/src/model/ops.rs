//! The element-wise and reduction building blocks of the GPT, written as compositions of candle
//! primitives so that autodiff works: candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope`
//! have no backward on the CPU. For f32 on the CPU the model uses the fused kernels of `fused/`
//! (hand-written backwards) instead; these compositions remain the reference they are tested
//! against, and the path of the other devices and of the KV cache.

use candle_core::{DType, Result, Tensor, D};

/// `torch.finfo(float32).eps`, the default epsilon of `F.rms_norm` that the original relies on.
pub const RMS_NORM_EPS: f64 = f32::EPSILON as f64;

/// Parameter-free RMSNorm over the last dimension: `x * rsqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + RMS_NORM_EPS)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)
}

/// Softmax over the last dimension. The max is detached: softmax is invariant to the shift, so
/// the gradient is exact without differentiating through `max`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension (max-shifted log-sum-exp, as torch computes it).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Smoothly caps values to (-cap, cap): `cap * tanh(x / cap)`.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    x.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)
}

/// Per-token cross-entropy of `logits` (N, V) against integer `targets` (N,), where a target of -1
/// is ignored (torch's `ignore_index=-1`). Returns the losses (N,) with 0 at ignored positions and
/// the number of non-ignored targets as an f32 scalar tensor.
pub fn cross_entropy_per_token(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let targets = targets.to_dtype(DType::I64)?;
    let valid = targets.ge(0i64)?;
    // gather cannot take -1: point ignored rows at class 0 and zero their loss afterwards.
    let safe = valid.where_cond(&targets, &targets.zeros_like()?)?;
    let log_probs = log_softmax_last_dim(logits)?;
    let picked = log_probs.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let valid = valid.to_dtype(logits.dtype())?;
    let losses = picked.neg()?.mul(&valid)?;
    Ok((losses, valid.sum_all()?))
}
