//! Training stages (`base`: pretraining) and the pieces every stage shares: a gradient-accumulated
//! step, validation bits per byte, greedy samples, the loss EMA and the metrics log.

pub mod base;

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use crate::data::dataset::Split;
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::model::{Reduction, GPT};

/// A loader batch as (inputs, targets) tensors of shape (B, T).
pub fn batch_tensors(batch: &Batch, batch_size: usize, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    if batch.inputs.len() != batch_size * seq_len || batch.targets.len() != batch_size * seq_len {
        bail!("batch of {} tokens is not {batch_size} x {seq_len}", batch.inputs.len());
    }
    let x = Tensor::from_slice(&batch.inputs, (batch_size, seq_len), device)?;
    let y = Tensor::from_slice(&batch.targets, (batch_size, seq_len), device)?;
    Ok((x, y))
}

/// Forward and backward over the micro-batches of one optimizer step. Each micro-batch loss is
/// divided by their number before its backward pass, so the summed gradients are those of the
/// mean loss over the whole step, as if it were one big batch. Returns that mean loss and the
/// gradients of `vars` only (the intermediate gradients are dropped micro-batch by micro-batch,
/// which bounds memory to one micro-batch).
pub fn forward_backward(
    model: &GPT,
    vars: &[Var],
    micro_batches: impl IntoIterator<Item = Result<(Tensor, Tensor)>>,
    accum_steps: usize,
) -> Result<(f64, GradStore)> {
    let mut grads = GradStore::default();
    let (mut loss_sum, mut seen) = (0.0, 0);
    for micro in micro_batches.into_iter().take(accum_steps) {
        let (x, y) = micro?;
        let loss = model.forward(&x, Some(&y))?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?);
        let step_grads = (loss / accum_steps as f64)?.backward()?;
        for var in vars {
            let Some(g) = step_grads.get(var) else { continue };
            let sum = match grads.remove(var) {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            };
            grads.insert(var, sum);
        }
        seen += 1;
    }
    if seen != accum_steps {
        bail!("the data ran out after {seen} of {accum_steps} micro-batches");
    }
    Ok((loss_sum / accum_steps as f64, grads))
}

/// Sums for bits per byte over one batch: (nats over counted targets, their bytes). A target
/// counts if it is not -1 and its token has bytes (special tokens have none), as in the original.
pub fn bpb_totals(per_token_nats: &[f32], targets: &[i64], token_bytes: &[u32]) -> Result<(f64, u64)> {
    if per_token_nats.len() != targets.len() {
        bail!("{} losses for {} targets", per_token_nats.len(), targets.len());
    }
    let (mut nats, mut bytes) = (0.0f64, 0u64);
    for (&loss, &target) in per_token_nats.iter().zip(targets) {
        if target < 0 {
            continue;
        }
        let Some(&n) = token_bytes.get(target as usize) else {
            bail!("target id {target} is outside the vocabulary of {} tokens", token_bytes.len());
        };
        if n > 0 {
            nats += f64::from(loss);
            bytes += u64::from(n);
        }
    }
    Ok((nats, bytes))
}

/// Bits per byte of the model on the given (inputs, targets) batches: a loss that does not
/// depend on the tokenizer's vocabulary, so runs with different tokenizers compare.
pub fn evaluate_bpb(
    model: &GPT,
    batches: impl IntoIterator<Item = Result<(Tensor, Tensor)>>,
    token_bytes: &[u32],
) -> Result<f64> {
    let (mut nats, mut bytes) = (0.0, 0u64);
    for batch in batches {
        let (x, y) = batch?;
        let losses = model.loss(&x, &y, Reduction::PerToken)?.to_vec1::<f32>()?;
        let targets = y.flatten_all()?.to_vec1::<i64>()?;
        let (n, b) = bpb_totals(&losses, &targets, token_bytes)?;
        nats += n;
        bytes += b;
    }
    if bytes == 0 {
        bail!("no validation bytes to evaluate on: is the validation shard empty?");
    }
    Ok(nats / (std::f64::consts::LN_2 * bytes as f64))
}

/// Bits per byte on up to `eval_tokens` tokens of the validation split (one pass at most), read
/// in batches of `batch_size` rows of `seq_len` tokens.
pub fn validation_bpb(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    loader: &LoaderConfig,
    eval_tokens: usize,
) -> Result<f64> {
    let cfg = LoaderConfig { split: Split::Val, epochs: Some(1), ..loader.clone() };
    let device = model_device(model)?;
    let steps = (eval_tokens / (cfg.batch_size * cfg.seq_len)).max(1);
    let batches = Loader::new(tokenizer, &cfg, None)?
        .take(steps)
        .map(|b| b.and_then(|b| batch_tensors(&b, cfg.batch_size, cfg.seq_len, &device)));
    evaluate_bpb(model, batches, &tokenizer.token_bytes())
}

/// Prompts whose greedy completions show what the model has learnt (the original's list).
pub const SAMPLE_PROMPTS: [&str; 6] = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
];

/// Each of [`SAMPLE_PROMPTS`] followed by its greedy continuation of 16 tokens.
pub fn sample_completions(model: &GPT, tokenizer: &bpe::Tokenizer) -> Result<Vec<String>> {
    SAMPLE_PROMPTS.iter().map(|p| Ok(format!("{p}{}", greedy_complete(model, tokenizer, p, 16)?))).collect()
}

/// Greedy continuation of `prompt` (BOS first) by `max_tokens` tokens. It reruns the full forward
/// on the growing sequence, cut to the model's context: slow but simple, for occasional samples.
pub fn greedy_complete(model: &GPT, tokenizer: &bpe::Tokenizer, prompt: &str, max_tokens: usize) -> Result<String> {
    let device = model_device(model)?;
    let mut ids = vec![tokenizer.bos_id()];
    ids.extend(tokenizer.encode(prompt));
    let prompt_len = ids.len();
    let context = model.config().sequence_len;
    for _ in 0..max_tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let x = Tensor::from_slice(window, (1, window.len()), &device)?;
        let logits = model.forward(&x, None)?; // (1, t, V)
        let last = logits.narrow(1, window.len() - 1, 1)?.flatten_all()?;
        ids.push(last.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_scalar::<u32>()?);
    }
    Ok(tokenizer.decode(&ids[prompt_len..]))
}

fn model_device(model: &GPT) -> Result<Device> {
    Ok(model.rotary().0.device().clone())
}

/// The exponential moving average of the training loss that the original logs, with its bias
/// towards the initial 0 divided out.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossEma {
    /// The raw average; saved in checkpoints.
    pub value: f64,
}

impl LossEma {
    pub const BETA: f64 = 0.9;

    /// Adds the loss of step `step` (0-based) and returns the debiased average.
    pub fn update(&mut self, loss: f64, step: usize) -> f64 {
        self.value = Self::BETA * self.value + (1.0 - Self::BETA) * loss;
        let power = i32::try_from(step + 1).unwrap_or(i32::MAX);
        self.value / (1.0 - Self::BETA.powi(power))
    }
}

/// Appends one JSON line to `path` (the metrics log), creating the file and its directory.
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{value}").with_context(|| format!("appending to {}", path.display()))
}
