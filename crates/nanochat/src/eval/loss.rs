//! Bits per byte: the validation loss that does not depend on the vocabulary, so that models with
//! different tokenizers compare. `bpb = sum(nats of counted targets) / (ln 2 * sum(their bytes))`,
//! where a target counts unless it is negative (-1: ignored) or a special token (0 bytes), as in the
//! original's `loss_eval.py`. Sums run over the whole stream; averaging per-batch bpb would weight
//! batches wrongly.

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::{Reduction, GPT};

/// Running sums over a token stream: nats over the counted targets and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BpbTotals {
    pub nats: f64,
    pub bytes: u64,
}

impl BpbTotals {
    /// Adds one batch: per-token losses (nats) aligned with their targets; `token_bytes[id]` is the
    /// byte length of each id (see `bpe::Tokenizer::token_bytes`).
    pub fn add(&mut self, per_token_nats: &[f32], targets: &[i64], token_bytes: &[u32]) -> Result<()> {
        if per_token_nats.len() != targets.len() {
            bail!("{} losses for {} targets", per_token_nats.len(), targets.len());
        }
        for (&loss, &target) in per_token_nats.iter().zip(targets) {
            if target < 0 {
                continue;
            }
            let Some(&n) = usize::try_from(target).ok().and_then(|t| token_bytes.get(t)) else {
                bail!("target id {target} is outside the vocabulary of {} tokens", token_bytes.len());
            };
            if n > 0 {
                self.nats += f64::from(loss);
                self.bytes += u64::from(n);
            }
        }
        Ok(())
    }

    /// Bits per byte so far; an error if no byte was counted.
    pub fn bpb(&self) -> Result<f64> {
        if self.bytes == 0 {
            bail!("no bytes to compute bits per byte over: is the evaluation data empty?");
        }
        Ok(self.nats / (std::f64::consts::LN_2 * self.bytes as f64))
    }
}

/// Bits per byte of one batch of per-token losses and their targets.
pub fn bits_per_byte(per_token_nats: &[f32], targets: &[i64], token_bytes: &[u32]) -> Result<f64> {
    let mut totals = BpbTotals::default();
    totals.add(per_token_nats, targets, token_bytes)?;
    totals.bpb()
}

/// Bits per byte of `model` over (inputs, targets) batches of shape (B, T), targets -1 = ignore.
pub fn evaluate_bpb(
    model: &GPT,
    batches: impl IntoIterator<Item = Result<(Tensor, Tensor)>>,
    token_bytes: &[u32],
) -> Result<f64> {
    let mut totals = BpbTotals::default();
    for batch in batches {
        let (x, y) = batch?;
        let losses = model.loss(&x, &y, Reduction::PerToken)?.to_vec1::<f32>()?;
        let targets = y.flatten_all()?.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
        totals.add(&losses, &targets, token_bytes)?;
    }
    totals.bpb()
}
