//! Bits per byte: the validation loss that does not depend on the vocabulary, so that models with
//! different tokenizers compare. `bpb = sum(nats of counted targets) / (ln 2 * sum(their bytes))`,
//! where a target counts unless it is negative (-1: ignored) or a special token (0 bytes), as in the
//! original's `loss_eval.py`. Sums run over the whole stream; averaging per-batch bpb would weight
//! batches wrongly. The one implementation: training's validation (`train`), `base eval` and the
//! decode benchmark's quality check (`bench::quality`) all add into a [`BpbTotals`].

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::dist::{Communicator, SingleProcess};
use crate::model::{Reduction, GPT};

/// Running sums over a token stream: nats over the counted targets and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BpbTotals {
    pub nats: f64,
    pub bytes: u64,
}

impl BpbTotals {
    /// Adds one batch: per-token losses (nats) aligned with their targets; `token_bytes[id]` is the
    /// byte length of each id (see `bpe::Tokenizer::token_bytes`). The batch is summed on its own
    /// first, then added; on an error nothing is added.
    pub fn add(&mut self, per_token_nats: &[f32], targets: &[i64], token_bytes: &[u32]) -> Result<()> {
        if per_token_nats.len() != targets.len() {
            bail!("{} losses for {} targets", per_token_nats.len(), targets.len());
        }
        let (mut nats, mut bytes) = (0.0f64, 0u64);
        for (&loss, &target) in per_token_nats.iter().zip(targets) {
            if target < 0 {
                continue;
            }
            let Some(&n) = usize::try_from(target).ok().and_then(|t| token_bytes.get(t)) else {
                bail!("target id {target} is outside the vocabulary of {} tokens", token_bytes.len());
            };
            if n > 0 {
                nats += f64::from(loss);
                bytes += u64::from(n);
            }
        }
        self.nats += nats;
        self.bytes += bytes;
        Ok(())
    }

    /// The totals of every rank of `comm` added together (the same on every rank).
    pub fn all_reduce(self, comm: &dyn Communicator) -> Result<BpbTotals> {
        // f64 carries byte counts exactly up to 2^53
        let mut sums = [self.nats, self.bytes as f64];
        comm.all_reduce_sum_f64(&mut sums)?;
        Ok(BpbTotals { nats: sums[0], bytes: sums[1] as u64 })
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
    evaluate_bpb_on(&SingleProcess, model, batches, token_bytes)
}

/// [`evaluate_bpb`] on this rank's share of the batches: the totals are added across the ranks
/// of `comm` before the division, so the result is that of all ranks' batches together, the same
/// on every rank.
pub fn evaluate_bpb_on(
    comm: &dyn Communicator,
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
    totals.all_reduce(comm)?.bpb()
}
