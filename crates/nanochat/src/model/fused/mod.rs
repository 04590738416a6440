//! Fused CPU kernels with hand-written backwards, as candle custom ops, that replace the
//! compositions of candle primitives in `ops.rs` when the model runs on the CPU. Composed, each
//! of these materialises several full-size temporaries through single-threaded element-wise
//! kernels; fused, each is one or two passes in parallel over rows (see `docs/PROFILE.md` for the
//! measurements that motivated each one).
//!
//! - `attention`: causal self-attention with GQA (blocked, exact softmax, recomputing backward)
//! - `norm`: parameter-free RMSNorm
//! - `rope`: rotary embedding + QK-norm
//! - `relu2`: the MLP's ReLU²
//! - `cross_entropy`: softcap + cross-entropy over the vocabulary
//! - `lm_head`: the lm_head projection fused with softcap + cross-entropy (one reused logits buffer)
//! - `linear`: the blocks' projections, forward and backward, on the training GEMM
//! - `gemm_bf16`: an AVX-512 BF16 GEMM the training products can use ([`Gemm::Bf16`])
//!
//! Whether a model runs these kernels at all, and on which GEMM, is a value, [`Kernels`], that
//! each command picks from its flags and hands to the model and its optimizers: nothing here is a
//! process-wide switch, so two models (a bf16 training stage, then an f32 one; a fused and a
//! composed model in one test) never see each other's choice.

mod attention;
mod cross_entropy;
mod gemm_bf16;
mod linear;
mod lm_head;
mod norm;
mod relu2;
mod rope;
mod simd;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

pub use attention::causal_attention;
pub use cross_entropy::softcap_cross_entropy;
pub use gemm_bf16::{bf16_supported, gemm_bf16, gemm_bf16_then, round_bf16, Epilogue};

/// `cap * tanh(x / cap)` in place, vectorised (AVX2 + FMA when the CPU has them): the softcap the
/// lm_head kernels apply, shared with the native decode path.
pub fn softcap_in_place(xs: &mut [f32], cap: f32) {
    simd::softcap_max(xs, cap);
}
pub use linear::linear;
pub use lm_head::{lm_head_cross_entropy, LogitsPool};
pub use norm::rms_norm;
pub use relu2::relu_squared;
pub use rope::rope_qk_norm;

/// Which kernels a model and its optimizers run on the CPU, chosen per command from its flags
/// (`--unfused`, `--bf16`) and held by the model ([`crate::model::GPT::kernels`]) and the optimizers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// The fused kernels of this module and the optimizers' one-pass updates (the default). Off:
    /// the candle composition of `ops.rs`, for benchmarks (`nanochat bench train --unfused`) and
    /// for debugging.
    pub fused: bool,
    /// The training GEMMs (the blocks' projections, the lm_head, Muon's Newton-Schulz) on AVX-512
    /// BF16 (operands rounded to bf16, f32 accumulation), where the CPU has it and `fused` is on.
    /// Off by default, so that numerics are those of the f32 path unless asked for.
    pub bf16: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels { fused: true, bf16: false }
    }
}

impl Kernels {
    /// The GEMM the fused training products run on: bf16 when asked for, fused, and supported by
    /// this CPU ([`bf16_supported`]); f32 otherwise.
    pub fn gemm(self) -> Gemm {
        if self.fused && self.bf16 && bf16_supported() {
            Gemm::Bf16
        } else {
            Gemm::F32
        }
    }
}

/// The GEMM of the training products (`matmul`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gemm {
    /// f32 operands, the `gemm` crate.
    #[default]
    F32,
    /// Operands rounded to bf16, f32 accumulation ([`gemm_bf16`]): an error on a CPU without
    /// AVX-512 BF16, so pick it through [`Kernels::gemm`].
    Bf16,
}

/// A read-only matrix view for the GEMMs (`gemm` and [`gemm_bf16`]): element (i, j) at
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `dst (m x n, row stride dst_rs) = [dst +] scale * a (m x k) · b (k x n)` on the calling thread
/// (the kernels parallelise over heads or rows themselves, so nested GEMM threads would only
/// oversubscribe the two cores). Bounds are checked here, before the raw-pointer call.
#[allow(clippy::too_many_arguments)] // the BLAS shape: sizes, operands, scale, accumulate
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    gemm_with(m, n, k, dst, dst_rs, a, b, scale, accumulate, gemm::Parallelism::None)
}

#[allow(clippy::too_many_arguments)]
fn gemm_with(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return Ok(());
    }
    let end = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    if end(m, dst_rs, n, 1) > dst.len() || end(m, a.rs, k, a.cs) > a.data.len() || end(k, b.rs, n, b.cs) > b.data.len()
    {
        candle_core::bail!("fused gemm: operands too small for a {m}x{k} by {k}x{n} product");
    }
    // SAFETY: every index the product touches was checked to lie inside its slice above, and `dst`
    // is borrowed mutably so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `dst (m x n, row stride dst_rs) = scale * a · b` on all of rayon's threads, for the big
/// products that are not already inside a parallel loop.
#[allow(clippy::too_many_arguments)] // the BLAS shape: sizes, operands, scale
pub(crate) fn gemm_parallel(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
) -> Result<()> {
    gemm_with(m, n, k, dst, dst_rs, a, b, scale, false, gemm::Parallelism::Rayon(rayon::current_num_threads()))
}

/// `dst (m x n, row stride dst_rs) = a (m x k) · b (k x n)` on all threads, on the training GEMM
/// `gemm`.
#[allow(clippy::too_many_arguments)] // the BLAS shape, and which GEMM
pub(crate) fn matmul(
    gemm: Gemm,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
) -> Result<()> {
    matmul_then(gemm, m, n, k, dst, dst_rs, a, b, None)
}

/// [`matmul`], then `epilogue` over every tile of the product (see [`gemm_bf16::Epilogue`]): on
/// tiles still in cache with the bf16 GEMM, on whole rows after the f32 one.
#[allow(clippy::too_many_arguments)] // the BLAS shape, which GEMM, and the epilogue
pub(crate) fn matmul_then(
    gemm: Gemm,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    epilogue: Option<Epilogue>,
) -> Result<()> {
    if gemm == Gemm::Bf16 {
        return gemm_bf16_then(m, n, k, dst, dst_rs, a, b, 1.0, false, epilogue);
    }
    gemm_parallel(m, n, k, dst, dst_rs, a, b, 1.0)?;
    if let Some(epilogue) = epilogue {
        dst.par_chunks_mut(dst_rs).take(m).enumerate().for_each(|(i, row)| epilogue(i, 1, 0, n, row));
    }
    Ok(())
}

/// The contiguous f32 data of a CPU tensor, or an error naming the op and the operand.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be contiguous f32"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, read in place (no copy unless the tensor
/// is not contiguous), for the backward passes, which get their operands as tensors.
pub(crate) fn with_f32<T>(t: &Tensor, op: &str, what: &str, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(f32_slice(s, layout, op, what)?),
        _ => candle_core::bail!("{op}: {what} must be on the CPU"),
    }
}
