//! What a [`DecodeModel`]'s weight format costs in prediction quality: mean next-token loss (nats)
//! and bits per byte over token rows, computed with the native path itself
//! ([`DecodeModel::prefill_logits`]) and the evaluation's bits per byte ([`BpbTotals`]), so an
//! f32, a bf16 and an int8 copy of one checkpoint compare on the same tokens
//! (`nanochat bench decode --quality N`).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::eval::BpbTotals;
use crate::model::decode::DecodeModel;

/// Loss and bits per byte of a model over some rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Mean cross-entropy of every target, in nats.
    pub loss: f64,
    /// Bits per byte over the targets that have bytes (special tokens have none and are skipped,
    /// as in `eval::loss`).
    pub bpb: f64,
    /// Targets scored.
    pub targets: usize,
}

impl Quality {
    /// exp(loss): the perplexity, whose relative change is what "within 1%" refers to.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Scores every row: each token after the first is a target, predicted from the tokens before it
/// (one prefill of the row minus its last token into a fresh slot). `token_bytes[id]` is the byte
/// length of each id (`bpe::Tokenizer::token_bytes`). Rows shorter than two tokens have no target.
pub fn evaluate(model: &DecodeModel, rows: &[Vec<u32>], token_bytes: &[u32]) -> Result<Quality> {
    let vocab = model.config().vocab_size;
    let longest = rows.iter().map(|r| r.len().saturating_sub(1)).max().unwrap_or(0);
    let mut cache = model.new_cache(1, longest.max(1))?;
    let (mut nats_sum, mut targets) = (0.0f64, 0usize);
    let mut totals = BpbTotals::default();
    for row in rows.iter().filter(|r| r.len() >= 2) {
        if let Some(&bad) = row.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!("token {bad} is outside the model's vocabulary of {vocab}");
        }
        cache.reset_slot(0)?;
        let inputs = &row[..row.len() - 1];
        let logits = model.prefill_logits(&mut cache, 0, inputs, 0)?;
        ensure!(logits.len() == inputs.len() * vocab, "{} logits for {} positions", logits.len(), inputs.len());
        let nats: Vec<f32> = logits
            .par_chunks_exact(vocab)
            .zip(&row[1..])
            .map(|(l, &t)| (log_sum_exp(l) - f64::from(l[t as usize])) as f32)
            .collect();
        nats_sum += nats.iter().map(|&v| f64::from(v)).sum::<f64>();
        targets += nats.len();
        let ids: Vec<i64> = row[1..].iter().map(|&t| i64::from(t)).collect();
        totals.add(&nats, &ids, token_bytes)?;
    }
    ensure!(targets > 0, "no targets to score: every row has fewer than two tokens");
    Ok(Quality { loss: nats_sum / targets as f64, bpb: totals.bpb()?, targets })
}

/// `ln Σ exp(l)`, shifted by the maximum so that nothing overflows, summed in f64.
fn log_sum_exp(l: &[f32]) -> f64 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|&v| f64::from((v - max).exp())).sum();
    f64::from(max) + sum.ln()
}
