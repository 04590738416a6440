//! The transformer blocks' projections, `y = x · Wᵀ` with W (out, in) as torch's `Linear`, forward
//! and backward on the CPU on the model's training GEMM ([`super::Gemm`]): f32 (the `gemm` crate)
//! by default, the AVX-512 BF16 GEMM for a model whose kernels ask for it. That is torch's
//! autocast: the operands of the products rounded to bf16, accumulation, outputs, master weights
//! and gradients in f32.
//!
//! The backward reads x, W and the upstream gradient in place (no copies) and does the two
//! products of a linear layer, dx = dy · W and dW = dyᵀ · x, each in one GEMM over all rows.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{f32_slice, matmul, with_f32, Gemm, Mat};

/// `x (N, in) · wᵀ` with `w (out, in)`, forward and backward on `gemm`.
pub fn linear(x: &Tensor, w: &Tensor, gemm: Gemm) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, Linear(gemm))
}

struct Linear(Gemm);

/// (N, in, out) of the operands, checked.
fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
    let (n, c) = x.dims2()?;
    let (out, cw) = w.dims2()?;
    if cw != c {
        candle_core::bail!("linear: input {x:?} does not fit weight {w:?}");
    }
    Ok((n, c, out))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, out) = dims(l1.shape(), l2.shape())?;
        let (x, w) = (f32_slice(s1, l1, "linear", "x")?, f32_slice(s2, l2, "linear", "weight")?);
        let mut y = vec![0f32; n * out];
        matmul(self.0, n, out, c, &mut y, out, Mat { data: x, rs: c, cs: 1 }, Mat { data: w, rs: 1, cs: c })?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, out) = dims(x.shape(), w.shape())?;
        if grad_res.dims2()? != (n, out) {
            candle_core::bail!("linear: gradient {:?} does not fit the output ({n}, {out})", grad_res.shape());
        }
        let mut dx = vec![0f32; n * c];
        let mut dw = vec![0f32; out * c];
        with_f32(grad_res, "linear", "gradient", |dy| {
            with_f32(w, "linear", "weight", |wv| {
                matmul(self.0, n, c, out, &mut dx, c, Mat { data: dy, rs: out, cs: 1 }, Mat { data: wv, rs: c, cs: 1 })
            })?;
            with_f32(x, "linear", "x", |xv| {
                matmul(self.0, out, c, n, &mut dw, c, Mat { data: dy, rs: 1, cs: out }, Mat { data: xv, rs: c, cs: 1 })
            })
        })?;
        let dev = x.device();
        Ok((Some(Tensor::from_vec(dx, (n, c), dev)?), Some(Tensor::from_vec(dw, (out, c), dev)?)))
    }
}
