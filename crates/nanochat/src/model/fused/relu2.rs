//! Fused ReLU² (the MLP's activation), forward and backward, parallel over chunks.
//!
//! Composed, `relu` then `sqr` is two passes forward and four backward over the (tokens × 4C)
//! hidden activations, the largest tensors of a block. Here: y = max(x, 0)², dx = 2 max(x, 0) dy.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_slice;

/// Values per rayon task.
const CHUNK: usize = 1 << 14;

/// `max(x, 0)²` element-wise on an f32 tensor.
pub fn relu_squared(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Relu2)
}

struct Relu2;

impl CustomOp1 for Relu2 {
    fn name(&self) -> &'static str {
        "relu-squared"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relu_squared", "input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &x)| {
                let r = x.max(0.0);
                *o = r * r;
            })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &Relu2Grad)?))
    }
}

/// (x, dy) -> 2 max(x, 0) dy.
struct Relu2Grad;

impl CustomOp2 for Relu2Grad {
    fn name(&self) -> &'static str {
        "relu-squared-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_slice(s1, l1, "relu_squared", "input")?, f32_slice(s2, l2, "relu_squared", "gradient")?);
        if x.len() != dy.len() {
            candle_core::bail!("relu_squared: gradient {:?} does not match input {:?}", l2.shape(), l1.shape());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(o, (x, dy))| {
            o.iter_mut().zip(x.iter().zip(dy)).for_each(|(o, (&x, &g))| *o = 2.0 * x.max(0.0) * g)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
