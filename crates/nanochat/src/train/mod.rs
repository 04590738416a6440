//! Training stages (`base`: pretraining; `mid`: midtraining; `sft`: supervised finetuning; `rl`:
//! reinforcement learning on GSM8K), the step loop base and mid share (`step_loop`), and the
//! pieces every stage shares: a gradient-accumulated optimizer step (data-parallel across ranks
//! when given a communicator, with the optimizer state sharded across them), checkpoints of that
//! state (or of the weights alone), validation bits per byte (split across ranks; computed by
//! `eval::loss`), greedy samples, the loss EMA, the metrics log and the progress bar.

pub mod base;
pub mod mid;
pub mod rl;
pub mod sft;
pub mod step_loop;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::checkpoint::Meta;
use crate::data::dataset::Split;
use crate::data::loader::{Batch, Loader, LoaderConfig};
use crate::data::sources::{Dataset, Online, RemoteFile};
use crate::dist::{all_gather_vars, broadcast_vars, reduce_grads_to_owners, Communicator, DistMode};
use crate::eval::evaluate_bpb_on;
use crate::model::GPT;
use crate::optim::{clip_grad_norm_on, setup_optimizers, OptimConfig, Optimizers};
use crate::tasks::chat::ChatData;
use crate::tasks::{DataRoot, Task};

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
        accumulate_grads(&mut grads, vars, &(loss / accum_steps as f64)?)?;
        seen += 1;
    }
    if seen != accum_steps {
        bail!("the data ran out after {seen} of {accum_steps} micro-batches");
    }
    Ok((loss_sum / accum_steps as f64, grads))
}

/// Bits per byte on up to `eval_tokens` tokens of the validation split (one pass at most), read
/// in batches of `batch_size` rows of `seq_len` tokens. With several ranks, each reads its own
/// stride of the split, an equal share of the tokens, and the totals are added across ranks.
pub fn validation_bpb(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    loader: &LoaderConfig,
    eval_tokens: usize,
    comm: &dyn Communicator,
) -> Result<f64> {
    let cfg = LoaderConfig { rank: comm.rank(), world_size: comm.world_size(), ..loader.clone() };
    let steps = (eval_tokens / (cfg.batch_size * cfg.seq_len * cfg.world_size)).max(1);
    let batches = validation_batches(model, tokenizer, &cfg)?.take(steps);
    evaluate_bpb_on(comm, model, batches, &tokenizer.token_bytes())
}

/// The validation bits per byte of one process, the batches split across the ranks of `comm`:
/// every rank reads the first `eval_tokens` tokens of the whole split, as one process does, and
/// evaluates batches `rank`, `rank + W`, ... of them; the totals are added across ranks, so the
/// result is one process's up to the order of additions. Each rank tokenizes every batch, which
/// costs little next to the forward passes it skips.
pub fn validation_bpb_split(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    loader: &LoaderConfig,
    eval_tokens: usize,
    comm: &dyn Communicator,
) -> Result<f64> {
    let cfg = LoaderConfig { rank: 0, world_size: 1, ..loader.clone() };
    let steps = (eval_tokens / (cfg.batch_size * cfg.seq_len)).max(1);
    let (rank, world) = (comm.rank(), comm.world_size());
    let batches = validation_batches(model, tokenizer, &cfg)?.take(steps).skip(rank).step_by(world);
    evaluate_bpb_on(comm, model, batches, &tokenizer.token_bytes())
}

/// The validation split in one pass, as `loader` (its rank, batch size, rows) reads it, as
/// tensors on the model's device.
fn validation_batches(
    model: &GPT,
    tokenizer: &bpe::Tokenizer,
    loader: &LoaderConfig,
) -> Result<impl Iterator<Item = Result<(Tensor, Tensor)>>> {
    let cfg = LoaderConfig { split: Split::Val, epochs: Some(1), ..loader.clone() };
    let device = model_device(model)?;
    let (rows, seq_len) = (cfg.batch_size, cfg.seq_len);
    let batches = Loader::new(tokenizer, &cfg, None)?;
    Ok(batches.map(move |b| b.and_then(|b| batch_tensors(&b, rows, seq_len, &device))))
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

/// A stage's metrics log, `metrics.jsonl` in its checkpoint directory: one JSON record per line,
/// written by rank 0 only (on the other ranks appending does nothing).
pub struct MetricsLog {
    /// The log's path on rank 0; `None` elsewhere.
    path: Option<PathBuf>,
}

impl MetricsLog {
    /// The log in `dir` as one rank of `comm`, for a run that starts at `start_step`: the records
    /// of steps from `start_step` on are dropped (see `drop_metrics_from`).
    pub fn open(comm: &dyn Communicator, dir: &Path, start_step: usize) -> Result<MetricsLog> {
        if !comm.is_root() {
            return Ok(MetricsLog { path: None });
        }
        let path = dir.join("metrics.jsonl");
        drop_metrics_from(&path, start_step)?;
        Ok(MetricsLog { path: Some(path) })
    }

    /// Appends one record (on rank 0).
    pub fn append(&self, value: &serde_json::Value) -> Result<()> {
        match &self.path {
            Some(path) => append_jsonl(path, value),
            None => Ok(()),
        }
    }
}

/// Appends one JSON line to `path` (the metrics log), creating the file and its directory.
fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
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

/// Backpropagates `loss` and adds the gradients of `vars` to `grads`, dropping the rest (so that
/// memory holds one micro-batch's intermediate gradients at a time).
pub fn accumulate_grads(grads: &mut GradStore, vars: &[Var], loss: &Tensor) -> Result<()> {
    let step_grads = loss.backward()?;
    for var in vars {
        let Some(g) = step_grads.get(var) else { continue };
        let sum = match grads.remove(var) {
            Some(acc) => (acc + g)?,
            None => g.clone(),
        };
        grads.insert(var, sum);
    }
    Ok(())
}

/// What one optimizer step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The mean loss over every rank's micro-batches.
    pub loss: f64,
    /// The global gradient norm before clipping, when clipping.
    pub grad_norm: Option<f64>,
    /// Seconds spent communicating across ranks, waiting for the slowest included (0 for a single
    /// process).
    pub comm_seconds: f64,
}

/// One optimizer step as one rank of `comm` (a single process: [`crate::dist::SingleProcess`]): forward and
/// backward over `accum_steps` micro-batches of this rank's data, the loss averaged across ranks,
/// then the learning rates scaled by `lr_multiplier` and, when given, Muon's momentum set, and
/// [`update_on`] (clipping when `grad_clip > 0`) makes the step that of the mean loss over all
/// ranks' micro-batches, the same on every rank.
#[allow(clippy::too_many_arguments)] // each is one knob of the step; a struct would only rename them
pub fn optimizer_step_on(
    comm: &dyn Communicator,
    model: &GPT,
    optimizers: &mut Optimizers,
    vars: &[Var],
    micro_batches: impl IntoIterator<Item = Result<(Tensor, Tensor)>>,
    accum_steps: usize,
    grad_clip: f64,
    lr_multiplier: f64,
    muon_momentum: Option<f64>,
) -> Result<StepStats> {
    let (local_loss, grads) = forward_backward(model, vars, micro_batches, accum_steps)?;
    let comm_started = Instant::now();
    let mut loss = [local_loss];
    comm.all_reduce_sum_f64(&mut loss)?;
    let loss = loss[0] / comm.world_size() as f64;
    let loss_seconds = comm_started.elapsed().as_secs_f64();
    // The averaged loss is the same on every rank, so all ranks stop here together.
    if !loss.is_finite() {
        bail!("the loss is {loss}: training diverged; lower the learning rates");
    }
    optimizers.set_lr_multiplier(lr_multiplier);
    if let Some(momentum) = muon_momentum {
        optimizers.set_muon_momentum(momentum);
    }
    let update = update_on(comm, optimizers, grads, grad_clip)?;
    let comm_seconds = if comm.world_size() > 1 { loss_seconds + update.comm_seconds } else { 0.0 };
    Ok(StepStats { loss, grad_norm: update.grad_norm, comm_seconds })
}

/// What [`update_on`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Update {
    /// The global gradient norm before clipping, when clipping.
    pub grad_norm: Option<f64>,
    /// Seconds spent moving gradients and parameters between ranks.
    pub comm_seconds: f64,
}

/// The optimizer update of one step from this rank's gradients `grads` (of its own data), at the
/// optimizers' current learning rates: gradient clipping to global norm `grad_clip` (when > 0),
/// then the update. With several ranks the optimizers must be sharded across them
/// ([`Optimizers::shard`], as [`setup_optimizers_on`] does) and the step is ZeRO-2's: each
/// gradient is averaged onto the rank that owns its parameter, clipping adds the ranks' squared
/// norms, each rank updates its own parameters (their Muon orthogonalisation included), and every
/// rank then gathers the updated parameters, so that all hold the weights one process would.
pub fn update_on(
    comm: &dyn Communicator,
    optimizers: &mut Optimizers,
    grads: GradStore,
    grad_clip: f64,
) -> Result<Update> {
    let world = comm.world_size();
    let shards = match optimizers.shards() {
        _ if world == 1 => None,
        Some(shards) if shards.world_size() == world => Some(shards.clone()),
        _ => bail!("the optimizers are not sharded across the {world} processes: set them up with setup_optimizers_on"),
    };
    let vars: Vec<Var> = optimizers.vars().cloned().collect();
    let started = Instant::now();
    let mut grads = match &shards {
        Some(shards) => reduce_grads_to_owners(comm, &vars, shards, &grads)?,
        None => grads,
    };
    let mut comm_seconds = started.elapsed().as_secs_f64();
    let grad_norm = if grad_clip > 0.0 { Some(clip_grad_norm_on(comm, &vars, &mut grads, grad_clip)?) } else { None };
    optimizers.step(&grads)?;
    if let Some(shards) = &shards {
        let started = Instant::now();
        all_gather_vars(comm, &vars, shards)?;
        comm_seconds += started.elapsed().as_secs_f64();
    }
    Ok(Update { grad_norm, comm_seconds })
}

/// [`setup_optimizers`] for `model` as one rank of `comm`: the state restored from `state` when
/// resuming (a checkpoint's, written by any number of processes), sharded across the ranks so that
/// each keeps its own parameters' ([`Optimizers::shard`]), and the weights made rank 0's on every
/// rank (they start in step whatever their initialisation or the file they read). Returns the
/// optimizers and their parameters, in their order. `state` is taken so that the other ranks' part
/// of it is freed here rather than held for the whole run.
pub fn setup_optimizers_on(
    comm: &dyn Communicator,
    model: &GPT,
    varmap: &VarMap,
    hp: &OptimConfig,
    state: Option<HashMap<String, Tensor>>,
) -> Result<(Optimizers, Vec<Var>)> {
    let mut optimizers = setup_optimizers(model, varmap, hp)?;
    optimizers.shard(comm.rank(), comm.world_size());
    if let Some(state) = state {
        optimizers.load_state_dict(&state).context("restoring the optimizer state")?;
    }
    let vars: Vec<Var> = optimizers.vars().cloned().collect();
    broadcast_vars(comm, &vars)?;
    Ok((optimizers, vars))
}

/// Writes the checkpoint `meta` describes (the weights of `varmap`, the state of `optimizers`) as
/// one rank of `comm`. A single process writes the usual files. With several ranks, each writes
/// its own shard of the optimizer state (`optim_{step}_rank{r}`); once all are written, which the
/// gathering of their names and sizes to rank 0 ensures, rank 0 writes the weights and the meta
/// (only rank 0's `meta` is used). Then every rank waits at a barrier, so that none runs on (or
/// reports success) before the checkpoint is complete.
pub fn save_checkpoint_on(
    comm: &dyn Communicator,
    dir: &Path,
    varmap: &VarMap,
    optimizers: &Optimizers,
    meta: &Meta,
) -> Result<()> {
    let state = optimizers.state_dict()?;
    if comm.world_size() == 1 {
        crate::checkpoint::save(dir, &crate::checkpoint::varmap_tensors(varmap)?, Some(&state), meta)?;
    } else {
        let shard = crate::checkpoint::save_optim_shard(dir, meta.step, comm.rank(), &state)?;
        let shards = comm.all_gather_bytes(&serde_json::to_vec(&shard)?)?;
        if comm.is_root() {
            let shards: Vec<crate::checkpoint::FileRecord> =
                shards.iter().map(|s| serde_json::from_slice(s)).collect::<Result<_, _>>()?;
            crate::checkpoint::save_sharded(dir, &crate::checkpoint::varmap_tensors(varmap)?, &shards, meta)?;
        }
    }
    comm.barrier()?;
    Ok(())
}

/// Writes the weights-only checkpoint `meta` describes (the parameters of `varmap`, no optimizer
/// state: the chat stages' final checkpoints) as one rank of `comm`: rank 0 writes (the weights are
/// the same on every rank), then every rank waits at a barrier, so that none runs on (or reports
/// success) before the checkpoint is complete.
pub fn save_weights_on(comm: &dyn Communicator, dir: &Path, varmap: &VarMap, meta: &Meta) -> Result<()> {
    if comm.is_root() {
        crate::checkpoint::save(dir, &crate::checkpoint::varmap_tensors(varmap)?, None, meta)?;
    }
    comm.barrier()?;
    Ok(())
}

/// The examples `range` of `task` (cut at its end) rendered to `(ids, mask)`, each cut to
/// `max_tokens`; in parallel, in order.
pub fn render_task(
    tokenizer: &bpe::Tokenizer,
    task: &dyn Task,
    range: std::ops::Range<usize>,
    max_tokens: usize,
) -> Result<Vec<(Vec<u32>, Vec<u8>)>> {
    (range.start.min(task.len())..range.end.min(task.len()))
        .into_par_iter()
        .map(|i| {
            let example = task.get(i)?;
            crate::conversation::render_conversation(tokenizer, &example.conversation, max_tokens)
                .with_context(|| format!("rendering example {i} of {}", task.name()))
        })
        .collect()
}

/// The first and the last of a run's step losses (NaN when it took no step), for the report.
pub fn loss_span(losses: &[f64]) -> (f64, f64) {
    (losses.first().copied().unwrap_or(f64::NAN), losses.last().copied().unwrap_or(f64::NAN))
}

/// Drops the metrics records of steps from `step` on: on resume, those of the interrupted run
/// after its checkpoint, so that the log reads as one uninterrupted run; on a fresh start (step
/// 0), those of an earlier run in the same directory, whose checkpoints get overwritten too.
fn drop_metrics_from(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let record_step = |line: &str| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        value.get("step")?.as_u64()
    };
    let kept: String = text
        .lines()
        .filter(|line| record_step(line).is_none_or(|s| s < step as u64))
        .map(|line| format!("{line}\n"))
        .collect();
    crate::common::write_atomic(path, kept.as_bytes())
}

/// Micro-batches per rank when a step has `accum_steps` in all: they must split evenly across the
/// ranks, so that every rank runs as many (and the step is one process's, micro-batch for micro-batch).
pub fn accum_steps_per_rank(comm: &dyn Communicator, accum_steps: usize, flag: &str) -> Result<usize> {
    let world = comm.world_size();
    if accum_steps == 0 || !accum_steps.is_multiple_of(world) {
        bail!(
            "a step of {accum_steps} micro-batches does not split evenly across {world} processes: make {flag} a \
             multiple of the device batch times {world}"
        );
    }
    Ok(accum_steps / world)
}

/// The run's progress bar on rank 0, a hidden one elsewhere (only rank 0 speaks).
pub fn rank_progress_bar(comm: &dyn Communicator, len: usize, name: &str) -> indicatif::ProgressBar {
    if comm.is_root() {
        crate::common::progress_bar(len as u64, name)
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// [`log`] on rank 0 only: [`log`] prints even with a hidden bar.
pub fn log_on(comm: &dyn Communicator, pb: &indicatif::ProgressBar, line: String) {
    if comm.is_root() {
        log(pb, line);
    }
}

/// Prints a log line above the progress bar, or plainly when the bar is hidden (not a terminal),
/// where indicatif's `println` would drop it.
pub fn log(pb: &indicatif::ProgressBar, line: String) {
    pb.suspend(|| eprintln!("{line}"));
}

/// The options midtraining and SFT share: where they start from, their data, their learning rates.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct ChatStageArgs {
    /// The checkpoint to start from; the new checkpoints go under the same tag.
    #[command(flatten)]
    #[serde(flatten)]
    pub model: crate::checkpoint::ModelArgs,
    #[arg(long, env = "NANOCHAT_DATA_MIRROR", value_name = "DIR", help = crate::data::MIRROR_HELP)]
    pub data_dir: Option<PathBuf>,
    /// JSON-lines file of identity conversations to train on [default: the original's, downloaded;
    /// with --data-dir, 1,000 generated ones].
    #[arg(long)]
    pub identity_file: Option<PathBuf>,
    /// AdamW learning rate of the token embedding (scaled by (n_embd/768)^-0.5).
    #[arg(long, default_value_t = 0.2)]
    pub embedding_lr: f64,
    /// AdamW learning rate of the lm_head (scaled by (n_embd/768)^-0.5).
    #[arg(long, default_value_t = 0.004)]
    pub unembedding_lr: f64,
    /// Muon learning rate of the block matrices.
    #[arg(long, default_value_t = 0.02)]
    pub matrix_lr: f64,
    /// Clip the gradient's global norm to this (0: no clipping, as the original's chat stages).
    #[arg(long, default_value_t = 0.0)]
    pub grad_clip: f64,
    /// Seed of the data mixture's order and of the generated tasks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Data-parallel across processes: auto (MPI under mpirun, NCCL under a torchrun-style launch), mpi,
    /// nccl (GPUs, the `nccl` feature), or none.
    #[arg(long, value_enum, default_value_t = DistMode::Auto)]
    pub dist: DistMode,
}

impl ChatStageArgs {
    /// The optimizer learning rates, each scaled by `lr_frac`.
    pub fn optim_config(&self, lr_frac: f64) -> OptimConfig {
        OptimConfig {
            unembedding_lr: self.unembedding_lr * lr_frac,
            embedding_lr: self.embedding_lr * lr_frac,
            matrix_lr: self.matrix_lr * lr_frac,
            weight_decay: 0.0,
        }
    }

    /// Where the task data comes from: the mirror of `--data-dir`, else the online sources.
    pub fn data_root(&self) -> DataRoot {
        DataRoot::from_args(self.data_dir.clone())
    }

    /// The identity conversations: the user's file, or those of the data root.
    pub fn identity(&self) -> Result<Arc<dyn Task>> {
        match &self.identity_file {
            Some(path) => Ok(Arc::new(ChatData::custom_json(path)?)),
            None => crate::tasks::identity::load(&self.data_root(), self.seed),
        }
    }

    /// The files a stage training on a mixture downloads: its online `sources` and the identity
    /// conversations, unless a file replaces them (nothing with a mirror).
    pub fn mixture_downloads(&self, mut sources: Vec<Dataset>) -> Vec<RemoteFile> {
        if self.identity_file.is_none() {
            sources.push(Dataset::Identity);
        }
        self.downloads(&sources)
    }

    /// The files the stage downloads, from its online `sources` (none with a mirror).
    pub fn downloads(&self, sources: &[Dataset]) -> Vec<RemoteFile> {
        if self.data_dir.is_some() {
            return Vec::new();
        }
        let online = Online::from_env();
        sources.iter().map(|d| online.file(d)).collect()
    }
}
