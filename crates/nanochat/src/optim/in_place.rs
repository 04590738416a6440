//! In-place optimizer updates on the CPU: candle's in-place ops hand a tensor's storage to a
//! closure, so that AdamW and Muon rewrite parameters and state in one pass instead of composing
//! full-size temporaries (used when the optimizer's [`Kernels`] are fused, as the model's).

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};

use crate::model::Kernels;

/// Whether a one-pass update applies: fused `kernels`, and every tensor contiguous f32 on the CPU.
pub(super) fn fusable(kernels: Kernels, tensors: &[&Tensor]) -> bool {
    kernels.fused && tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

fn contiguous_f32<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&mut data[a..b]),
        _ => candle_core::bail!("in-place update: tensors must be contiguous f32"),
    }
}

/// Runs `f` on the data of `t`, mutably, through candle's in-place op.
pub(super) fn with_data_mut(t: &Tensor, f: impl FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
    t.inplace_op1(&InPlace1(Mutex::new(f)))
}

/// In-place op wrappers around closures; the Mutex gives the `FnMut` the `&self` access candle's
/// traits offer (it is never contended).
struct InPlace1<F>(Mutex<F>);
pub(super) struct InPlace2<F>(pub(super) Mutex<F>);

impl<F: FnMut(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace1<F> {
    fn name(&self) -> &'static str {
        "optimizer-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let mut f = self.0.lock().map_err(|_| candle_core::Error::Msg("optimizer update: poisoned lock".into()))?;
        f(contiguous_f32(s, l)?)
    }
}

impl<F: FnMut(&mut [f32], &[f32]) -> Result<()>> InplaceOp2 for InPlace2<F> {
    fn name(&self) -> &'static str {
        "optimizer-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = match (s2, l2.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((a, b))) => &data[a..b],
            _ => candle_core::bail!("in-place update: the second operand must be contiguous f32"),
        };
        let mut f = self.0.lock().map_err(|_| candle_core::Error::Msg("optimizer update: poisoned lock".into()))?;
        f(contiguous_f32(s1, l1)?, g)
    }
}
