//! `nanochat sft train`: supervised finetuning (the original's `chat_sft.py`) on whole
//! conversations, learning only the assistant's tokens.
//!
//! Design choices, as in the original unless said otherwise:
//! - it starts from the latest midtrained model (`--source mid`); when there is none it stops and
//!   says so rather than silently finetuning the base model, which `--source base` asks for;
//! - the mixture: ARC-Easy and ARC-Challenge train, GSM8K train, the first 10,000 chat
//!   conversations (SmolTalk), the identity conversations, 300 SimpleSpelling and 300
//!   SpellingBee, shuffled together by `--seed`; validation loss on the chat data's test split.
//!   From an offline mirror, which has no ARC train split and no SmolTalk, ARC validation and its
//!   ShareGPT conversations stand in (the ARC test splits stay for evaluation);
//! - a micro-batch is `--device-batch-size` whole conversations (cut to the model's context), padded
//!   to the longest with `<|assistant_end|>`; targets are -1 (ignored) wherever the mask is 0
//!   (user turns, calculator output, BOS) and on padding, so the loss is the mean over the
//!   assistant's tokens only;
//! - `--target-examples-per-step` conversations per optimizer step (gradient accumulation),
//!   `--num-epochs` passes, the learning rates of base times `--init-lr-frac` (0.02), decaying
//!   linearly to 0 over the run; Muon's momentum stays at 0.95 (no warm-up);
//! - one checkpoint at the end, weights only (the original keeps no optimizer state either), in
//!   `$NANOCHAT_BASE_DIR/chatsft_checkpoints/<tag>`, `<tag>` that of the model it started from.
//!   Unlike the original, the run does its `num_iterations` steps in full (the original breaks
//!   out one step early).
//!
//! Data-parallel (`mpirun -n W nanochat sft train ...`, docs/DISTRIBUTED.md): a step's
//! micro-batches, and so its conversations, are those of one process; rank r runs micro-batches
//! r, r + W, r + 2W, ... of them (so `--target-examples-per-step` must be a multiple of
//! `--device-batch-size` × W), and the gradients and the loss are averaged across ranks: a step is
//! one process's with the same global batch. Validation micro-batches are split the same way and
//! their losses added. Rank 0 alone logs and writes the checkpoint, metrics and report; an error
//! on any rank ends every rank.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;

use super::{
    accum_steps_per_rank, log_on, optimizer_step_on, rank_progress_bar, render_task, save_weights_on,
    setup_optimizers_on, ChatStageArgs, LossEma, MetricsLog,
};
use crate::checkpoint::Source;
use crate::checkpoint::{self, Checkpoint, LoopState, Meta};
use crate::data::sources::{self, Dataset, RemoteFile};
use crate::dist::{self, or_abort, rank_stride, Communicator, SingleProcess};
use crate::model::GPT;
use crate::tasks::arc::{ArcSubset, ArcTask};
use crate::tasks::chat::ChatData;
use crate::tasks::gsm8k::Gsm8k;
use crate::tasks::mixture::{Subset, TaskMixture};
use crate::tasks::spelling::{load_words, SimpleSpelling, SpellingBee, Split};
use crate::tasks::Task;

#[derive(Subcommand)]
pub enum SftCommand {
    /// Finetune the latest midtrained model on whole conversations; checkpoints go to
    /// $NANOCHAT_BASE_DIR/chatsft_checkpoints/<tag>.
    Train(Box<SftArgs>),
}

/// The stage whose checkpoint this one starts from unless `--source` says otherwise.
const STARTS_FROM: Source = Source::Mid;
/// Options of `nanochat sft train` (defaults: the original's).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(args_override_self = true)] // a later flag wins, so scripts can append overrides
pub struct SftArgs {
    #[command(flatten)]
    pub stage: ChatStageArgs,
    /// Conversations per forward/backward pass; lower it if memory runs out.
    #[arg(long, default_value_t = 4)]
    pub device_batch_size: usize,
    /// Conversations per optimizer step; a multiple of device-batch-size.
    #[arg(long, default_value_t = 32)]
    pub target_examples_per_step: usize,
    /// Passes over the mixture.
    #[arg(long, default_value_t = 1)]
    pub num_epochs: usize,
    /// Stop after at most this many steps (for quick runs).
    #[arg(long)]
    pub max_iterations: Option<usize>,
    /// The learning rates are base's times this at the start, then decay linearly to 0.
    #[arg(long, default_value_t = 0.02)]
    pub init_lr_frac: f64,
    /// Evaluate the validation loss every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Micro-batches of validation conversations per evaluation.
    #[arg(long, default_value_t = 100)]
    pub eval_steps: usize,
}

/// What a run did, for the caller (and tests).
#[derive(Debug, Clone)]
pub struct SftReport {
    /// The loss of every step (mean over the step's micro-batches).
    pub losses: Vec<f64>,
    pub num_iterations: usize,
    /// The last validation loss (nats per supervised token).
    pub val_loss: f64,
}

pub fn run(cmd: SftCommand) -> Result<()> {
    let SftCommand::Train(args) = cmd;
    let comm = dist::init(args.stage.dist)?;
    let result = run_on(&args, comm.as_ref());
    or_abort(comm.as_ref(), result)
}

/// [`run`] as one rank of `comm`: every rank loads the starting checkpoint and builds the
/// mixture, rank 0 alone writes the report section and prints the summary.
fn run_on(args: &SftArgs, comm: &dyn Communicator) -> Result<()> {
    let tokenizer = crate::tokenizer::load()?;
    let device = Device::cuda_if_available(dist::local_rank())?;
    let (init, at) = args.stage.model.load(STARTS_FROM, &tokenizer, &device)?;
    let tag = at.tag;
    let (train_task, val_task) = sft_mixture(&args.stage)?;
    let out_dir = Source::Sft.checkpoints_dir().join(&tag);
    let start = std::time::Instant::now();
    let report = train_on(args, &tokenizer, train_task.as_ref(), val_task.as_ref(), &init, &out_dir, comm)?;
    if !comm.is_root() {
        return Ok(());
    }
    let (first_loss, last_loss) = super::loss_span(&report.losses);
    let markdown = format!(
        "- started from: {:?}/{tag} step {}\n- mixture: {} conversations\n- steps: {} of {} conversations\n\
         - training loss: {first_loss:.4} at the first step, {last_loss:.4} at the last\n\
         - validation loss: {:.4}\n- processes: {}\n",
        args.stage.model.source.unwrap_or(STARTS_FROM),
        init.meta.step,
        train_task.len(),
        report.num_iterations,
        args.target_examples_per_step,
        report.val_loss,
        comm.world_size()
    );
    let metrics = json!({
        "seconds": start.elapsed().as_secs_f64(), "steps": report.num_iterations, "val_loss": report.val_loss,
        "first_loss": first_loss, "last_loss": last_loss, "world_size": comm.world_size(),
    });
    crate::report::write_section("sft_train", &markdown, metrics)?;
    println!(
        "done: {} steps, validation loss {:.4}; checkpoint in {}",
        report.num_iterations,
        report.val_loss,
        out_dir.display()
    );
    Ok(())
}

/// The original's SFT mixture and validation conversations (see the module docs).
pub fn sft_mixture(stage: &ChatStageArgs) -> Result<(Arc<dyn Task>, Arc<dyn Task>)> {
    let root = stage.data_root();
    let words = load_words(&root)?;
    let chat: Arc<dyn Task> = Arc::new(ChatData::load(&root, "train")?);
    let arc_split = if root.is_mirror() { "validation" } else { "train" };
    let tasks: Vec<Arc<dyn Task>> = vec![
        Arc::new(ArcTask::load(&root, ArcSubset::Easy, arc_split)?),
        Arc::new(ArcTask::load(&root, ArcSubset::Challenge, arc_split)?),
        Arc::new(Gsm8k::load(&root, "train")?),
        Arc::new(Subset::slice(chat, 0, Some(10_000), 1)?),
        stage.identity()?,
        Arc::new(SimpleSpelling::new(words.clone(), 300, Split::Train)),
        Arc::new(SpellingBee::new(words, 300, Split::Train)),
    ];
    let val: Arc<dyn Task> = Arc::new(ChatData::load(&root, "test")?);
    Ok((Arc::new(TaskMixture::new(tasks, stage.seed)), val))
}

/// The online data [`sft_mixture`] reads (the identity conversations aside), for listing what the
/// stage downloads.
fn sources() -> Vec<Dataset> {
    let mut datasets = vec![sources::arc("ARC-Easy", "train"), sources::arc("ARC-Challenge", "train")];
    datasets.extend([sources::gsm8k("train"), Dataset::Words]);
    datasets.extend(sources::smoltalk("train"));
    datasets.extend(sources::smoltalk("test"));
    datasets
}

impl SftCommand {
    /// What running this command downloads on first use (nothing with a mirror).
    pub fn downloads(&self) -> Vec<RemoteFile> {
        let SftCommand::Train(args) = self;
        args.stage.mixture_downloads(sources())
    }
}

/// Rendered conversations as one padded batch: inputs (row-major, `rows` × `cols`, padded with
/// `pad_id`), and targets, the next token where the mask says the model writes it and -1
/// elsewhere and on padding. `cols` is the longest conversation's length minus one.
pub fn collate(conversations: &[(Vec<u32>, Vec<u8>)], pad_id: u32) -> (Vec<u32>, Vec<i64>, usize) {
    let cols = conversations.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0).saturating_sub(1).max(1);
    let mut inputs = vec![pad_id; conversations.len() * cols];
    let mut targets = vec![-1i64; conversations.len() * cols];
    for (row, (ids, mask)) in conversations.iter().enumerate() {
        let n = ids.len().saturating_sub(1);
        inputs[row * cols..row * cols + n].copy_from_slice(&ids[..n]);
        // mask[i + 1] says whether token i + 1, the target at position i, is the model's to write.
        for i in 0..n {
            if mask[i + 1] == 1 {
                targets[row * cols + i] = i64::from(ids[i + 1]);
            }
        }
    }
    (inputs, targets, cols)
}

/// Micro-batch `k` of `rows` conversations, wrapping around the list (later epochs), as tensors.
fn micro_batch(
    conversations: &[(Vec<u32>, Vec<u8>)],
    k: usize,
    rows: usize,
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let picked: Vec<_> = (k * rows..(k + 1) * rows).map(|i| conversations[i % conversations.len()].clone()).collect();
    let (inputs, targets, cols) = collate(&picked, pad_id);
    Ok((Tensor::from_vec(inputs, (rows, cols), device)?, Tensor::from_vec(targets, (rows, cols), device)?))
}

/// The mean loss over the first `steps` micro-batches of the validation conversations. Each rank
/// of `comm` evaluates its stride of them and the sum is added across ranks, so every rank
/// returns the mean over all `steps`.
fn validation_loss(
    comm: &dyn Communicator,
    model: &GPT,
    conversations: &[(Vec<u32>, Vec<u8>)],
    steps: usize,
    rows: usize,
    pad_id: u32,
) -> Result<f64> {
    let device = model.rotary().0.device().clone();
    let mut total = [0.0f64];
    for k in rank_stride(comm, 0, steps) {
        let (x, y) = micro_batch(conversations, k, rows, pad_id, &device)?;
        total[0] += f64::from(model.forward(&x, Some(&y))?.to_scalar::<f32>()?);
    }
    comm.all_reduce_sum_f64(&mut total)?;
    Ok(total[0] / steps as f64)
}

/// Finetunes the `init` checkpoint's weights on `train_task`, evaluating on `val_task`; the
/// checkpoint and metrics go to `out_dir`. In this process alone.
pub fn train(
    args: &SftArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    val_task: &dyn Task,
    init: &Checkpoint,
    out_dir: &Path,
) -> Result<SftReport> {
    train_on(args, tokenizer, train_task, val_task, init, out_dir, &SingleProcess)
}

/// [`train`] as rank `comm.rank()` of `comm.world_size()`; every rank must call it with the same
/// options and data. Every rank returns the same losses; only rank 0 writes anything.
pub fn train_on(
    args: &SftArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    val_task: &dyn Task,
    init: &Checkpoint,
    out_dir: &Path,
    comm: &dyn Communicator,
) -> Result<SftReport> {
    let world = comm.world_size();
    let device = Device::cuda_if_available(dist::local_rank())?;
    let model_config = init.meta.model_config.clone();
    let rows = args.device_batch_size;
    if rows == 0 || !args.target_examples_per_step.is_multiple_of(rows) {
        bail!(
            "--target-examples-per-step {} is not a multiple of --device-batch-size {rows}",
            args.target_examples_per_step
        );
    }
    let accum_steps = args.target_examples_per_step / rows;
    let rank_accum_steps = accum_steps_per_rank(comm, accum_steps, "--target-examples-per-step")?;
    let mut num_iterations = train_task.len() / args.target_examples_per_step * args.num_epochs;
    num_iterations = args.max_iterations.map_or(num_iterations, |m| num_iterations.min(m));
    if num_iterations == 0 {
        bail!(
            "{} conversations make no step of {} examples: lower --target-examples-per-step",
            train_task.len(),
            args.target_examples_per_step
        );
    }
    // Rendering cuts conversations to the context; a row of n tokens gives n - 1 inputs.
    let max_tokens = model_config.sequence_len + 1;
    let conversations = render_task(tokenizer, train_task, 0..usize::MAX, max_tokens)?;
    let val_steps = args.eval_steps.max(1);
    let val_conversations = render_task(tokenizer, val_task, 0..val_steps * rows, max_tokens)?;
    if val_conversations.is_empty() {
        bail!("{} has no conversations to validate on", val_task.name());
    }
    let pad_id = tokenizer.special_id("<|assistant_end|>").context("the tokenizer has no <|assistant_end|>")?;

    // The default (f32) kernels: this stage has no --bf16, and an earlier stage's choice stays with its model.
    let (model, varmap) = checkpoint::model_from_checkpoint(init, &device)?;
    let optim_config = args.stage.optim_config(args.init_lr_frac);
    let (mut optimizers, vars) = setup_optimizers_on(comm, &model, &varmap, &optim_config, None)?;
    let metrics = MetricsLog::open(comm, out_dir, 0)?;

    let pb = rank_progress_bar(comm, num_iterations, "sft train");
    let say = |line: String| log_on(comm, &pb, line);
    say(format!(
        "finetuning {model_config:?} on {} conversations: {num_iterations} steps of {} ({rank_accum_steps} \
         micro-batches of {rows} on each of {world} processes)",
        conversations.len(),
        args.target_examples_per_step
    ));
    let mut ema = LossEma::default();
    let mut losses = Vec::new();
    let mut val_loss = f64::NAN;
    let mut total_time = 0.0;
    for step in 0..=num_iterations {
        let last_step = step == num_iterations;
        if last_step || (args.eval_every > 0 && step % args.eval_every == 0) {
            val_loss = validation_loss(comm, &model, &val_conversations, val_steps, rows, pad_id)?;
            say(format!("step {step:05} | validation loss {val_loss:.4}"));
            metrics.append(&json!({ "step": step, "val_loss": val_loss }))?;
        }
        if last_step {
            break;
        }
        let t0 = std::time::Instant::now();
        // The step's micro-batches (and so its conversations) are one process's; rank r runs those at
        // r, r + W, r + 2W, ... Whole micro-batches rather than every W-th conversation: the loss of a
        // micro-batch is the mean over its supervised tokens, so regrouping conversations would change
        // the step, not only its order of additions.
        let first = step * accum_steps;
        let micro_batches =
            rank_stride(comm, first, accum_steps).map(|k| micro_batch(&conversations, k, rows, pad_id, &device));
        let lr_multiplier = 1.0 - step as f64 / num_iterations as f64;
        let stats = optimizer_step_on(
            comm,
            &model,
            &mut optimizers,
            &vars,
            micro_batches,
            rank_accum_steps,
            args.stage.grad_clip,
            lr_multiplier,
            None,
        )
        .with_context(|| format!("step {step}"))?;
        let (loss, grad_norm) = (stats.loss, stats.grad_norm);
        let dt = t0.elapsed().as_secs_f64();
        total_time += dt;
        let smooth_loss = ema.update(loss, step);
        losses.push(loss);
        pb.set_message(format!("loss {smooth_loss:.4} | lrm {lr_multiplier:.2}"));
        pb.inc(1);
        metrics.append(&json!({
            "step": step, "loss": loss, "smooth_loss": smooth_loss, "lr_multiplier": lr_multiplier,
            "grad_norm": grad_norm, "dt": dt, "comm_seconds": stats.comm_seconds,
        }))?;
    }
    pb.finish();
    let mut meta = Meta::new(num_iterations, model_config, tokenizer.fingerprint());
    meta.loop_state =
        LoopState { smooth_train_loss: ema.value, total_training_time: total_time, ..LoopState::default() };
    meta.run_config = json!({ "args": args, "num_iterations": num_iterations,
                              "source": format!("{:?}", args.stage.model.source.unwrap_or(STARTS_FROM)), "source_step": init.meta.step,
                              "world_size": world });
    save_weights_on(comm, out_dir, &varmap, &meta)?;
    say(format!("saved checkpoint in {}", out_dir.display()));
    Ok(SftReport { losses, num_iterations, val_loss })
}
