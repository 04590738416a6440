//! `nanochat mid train`: midtraining (the original's `mid_train.py`). The base model keeps
//! pretraining, one epoch, on a mixture of conversations, so it learns the chat format, multiple
//! choice, calculator calls, spelling and who it is.
//!
//! Design choices, as in the original unless said otherwise:
//! - the mixture: chat data (SmolTalk), multiple choice (MMLU auxiliary_train), GSM8K train with
//!   calculator parts, the identity conversations twice, and SimpleSpelling / SpellingBee sized in
//!   the original's proportion to the chat data (200 and 80 per 460 chat conversations), all
//!   shuffled together by `--seed`; from an offline mirror, which lacks SmolTalk and MMLU's
//!   auxiliary_train, its ShareGPT conversations and MMLU dev + validation with ARC-Easy/Challenge
//!   validation stand in (the test splits stay for evaluation);
//! - the loss covers every token, the mask of `render_conversation` is ignored: midtraining is the
//!   pretraining objective on chat-formatted text (SFT is where only the assistant's tokens count);
//! - conversations are concatenated into one stream and cut into micro-batches of
//!   `device-batch-size` × (`max-seq-len` + 1) tokens, inputs the first T of each row and targets
//!   the last T, like the pretraining stream; the stream is rendered up front (4 bytes a token:
//!   ~100 MB for the mirror's mixture; with `--num-iterations`, only the tokens those steps read,
//!   so a short run on the online mixture does not render all of it), which fixes the run's length before it starts, so
//!   the LR schedule is base's (constant, then linear warmdown to 0 over the last 20%) on steps
//!   rather than the original's estimate of progress, and resuming needs no loader state: step N
//!   starts at micro-batch N × accumulation steps;
//! - a held-out slice of the shuffled mixture (`--val-fraction`) gives the validation bits per
//!   byte, rather than the original's test splits, which the chat evals use;
//! - the optimizers are set up fresh from the base weights, with Muon's momentum warm-up;
//! - checkpoints go to `$NANOCHAT_BASE_DIR/mid_checkpoints/<tag>`, `<tag>` that of the base model;
//! - the loop (cadences, checkpoints, metrics, progress) is pretraining's (`step_loop.rs`); the
//!   GEMMs are f32 whatever an earlier stage of the same process chose.
//!
//! Data-parallel (`mpirun -n W nanochat mid train ...`, docs/DISTRIBUTED.md): a step's
//! micro-batches are those of one process, and rank r runs micro-batches r, r + W, r + 2W, ... of
//! them (so `--total-batch-size` must be a multiple of device batch × seq len × W); the gradients
//! and the loss are averaged across ranks, so a step is one process's with the same global batch.
//! Validation batches are split the same way and their totals added. Rank 0 alone logs and writes
//! checkpoints, metrics and the report; an error on any rank ends every rank. As the data position
//! is the step itself, a checkpoint resumes under any number of processes that divides the step.
//! The optimizer state is sharded across the ranks, each writing its own shard in a checkpoint;
//! a resume reads them all, so that too works under another number of processes.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;

use super::step_loop::{load_resume_checkpoint, MicroBatches, StageData, Start, StepLoop, TrainReport};
use super::{accum_steps_per_rank, render_task, ChatStageArgs};
use crate::checkpoint::Source;
use crate::checkpoint::{self, Checkpoint, Meta};
use crate::data::sources::{self, Dataset, RemoteFile};
use crate::dist::{self, or_abort, rank_stride, Communicator, SingleProcess};
use crate::eval::evaluate_bpb_on;
use crate::model::{Kernels, GPT};
use crate::optim::LrSchedule;
use crate::tasks::arc::{ArcSubset, ArcTask};
use crate::tasks::chat::ChatData;
use crate::tasks::gsm8k::Gsm8k;
use crate::tasks::mixture::{Subset, TaskMixture};
use crate::tasks::mmlu::Mmlu;
use crate::tasks::spelling::{load_words, SimpleSpelling, SpellingBee, Split};
use crate::tasks::Task;

#[derive(Subcommand)]
pub enum MidCommand {
    /// Midtrain the latest base model on the conversation mixture; checkpoints go to
    /// $NANOCHAT_BASE_DIR/mid_checkpoints/<tag>.
    Train(Box<MidArgs>),
}

/// The stage whose checkpoint this one starts from unless `--source` says otherwise.
const STARTS_FROM: Source = Source::Base;
/// Options of `nanochat mid train` (defaults: the original's d20 run).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(args_override_self = true)] // a later flag wins, so scripts can append overrides
pub struct MidArgs {
    #[command(flatten)]
    pub stage: ChatStageArgs,
    /// Context length in tokens [default: the base model's].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Rows per forward/backward pass; lower it if memory runs out.
    #[arg(long, default_value_t = 32)]
    pub device_batch_size: usize,
    /// Tokens per optimizer step; a multiple of device-batch-size * max-seq-len.
    #[arg(long, default_value_t = 524_288)]
    pub total_batch_size: usize,
    /// Stop after this many steps [default: one epoch of the mixture].
    #[arg(long)]
    pub num_iterations: Option<usize>,
    /// Fraction of the steps at the end spent decaying the learning rate to 0.
    #[arg(long, default_value_t = 0.2)]
    pub warmdown_ratio: f64,
    /// Fraction of the mixture held out for validation.
    #[arg(long, default_value_t = 0.02)]
    pub val_fraction: f64,
    /// Evaluate validation bits per byte every this many steps (0: never).
    #[arg(long, default_value_t = 150)]
    pub eval_every: usize,
    /// Validation tokens per evaluation [default: 20 * total-batch-size].
    #[arg(long)]
    pub eval_tokens: Option<usize>,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue the run from its checkpoint at this step.
    #[arg(long)]
    pub resume_from_step: Option<usize>,
}

pub fn run(cmd: MidCommand) -> Result<()> {
    let MidCommand::Train(args) = cmd;
    let comm = dist::init(args.stage.dist)?;
    let result = run_on(&args, comm.as_ref());
    or_abort(comm.as_ref(), result)
}

/// [`run`] as one rank of `comm`: every rank loads the base checkpoint and builds the mixture,
/// rank 0 alone writes the report section and prints the summary.
fn run_on(args: &MidArgs, comm: &dyn Communicator) -> Result<()> {
    let tokenizer = crate::tokenizer::load()?;
    let device = Device::cuda_if_available(dist::local_rank())?;
    let (base, at) = args.stage.model.load(STARTS_FROM, &tokenizer, &device)?;
    let tag = at.tag;
    let (train_task, val_task) = mid_mixture(&args.stage, args.val_fraction)?;
    let out_dir = Source::Mid.checkpoints_dir().join(&tag);
    let start = std::time::Instant::now();
    let report = train_on(args, &tokenizer, train_task.as_ref(), val_task.as_ref(), &base, &out_dir, comm)?;
    if !comm.is_root() {
        return Ok(());
    }
    let bpb = report.val_bpb.map_or_else(|| "not evaluated".to_string(), |b| format!("{b:.4}"));
    let (first_loss, last_loss) = super::loss_span(&report.losses);
    let markdown = format!(
        "- started from: base/{tag} step {}\n- mixture: {} ({} conversations)\n- steps: {} of {} tokens\n\
         - training loss: {first_loss:.4} at the first step, {last_loss:.4} at the last\n\
         - validation bpb: {bpb}\n- throughput: {:.0} tokens/s\n- processes: {}\n",
        base.meta.step,
        train_task.name(),
        train_task.len(),
        report.num_iterations,
        args.total_batch_size,
        report.tokens_per_sec,
        comm.world_size()
    );
    let metrics = json!({
        "seconds": start.elapsed().as_secs_f64(), "steps": report.num_iterations, "val_bpb": report.val_bpb,
        "first_loss": first_loss, "last_loss": last_loss, "tokens_per_sec": report.tokens_per_sec,
        "world_size": comm.world_size(),
    });
    crate::report::write_section("mid_train", &markdown, metrics)?;
    println!(
        "done: {} steps, {:.0} tokens/s, validation bpb {bpb}; checkpoints in {}",
        report.num_iterations,
        report.tokens_per_sec,
        out_dir.display()
    );
    Ok(())
}

/// The original's midtraining mixture from the task data (see the module docs), split into the
/// training part and the held-out last `val_fraction` of it.
pub fn mid_mixture(stage: &ChatStageArgs, val_fraction: f64) -> Result<(Arc<dyn Task>, Arc<dyn Task>)> {
    let root = stage.data_root();
    let chat = ChatData::load(&root, "train")?;
    let words = load_words(&root)?;
    let identity = stage.identity()?;
    let spelling = |per_460: usize| chat.len() * per_460 / 460;
    let mut tasks: Vec<Arc<dyn Task>> = vec![
        Arc::new(SimpleSpelling::new(words.clone(), spelling(200), Split::Train)),
        Arc::new(SpellingBee::new(words, spelling(80), Split::Train)),
        Arc::new(chat),
    ];
    if root.is_mirror() {
        tasks.extend([
            Arc::new(Mmlu::load(&root, "dev")?) as Arc<dyn Task>,
            Arc::new(Mmlu::load(&root, "validation")?),
            Arc::new(ArcTask::load(&root, ArcSubset::Easy, "validation")?),
            Arc::new(ArcTask::load(&root, ArcSubset::Challenge, "validation")?),
        ]);
    } else {
        tasks.push(Arc::new(Mmlu::load(&root, "auxiliary_train")?));
    }
    tasks.extend([Arc::new(Gsm8k::load(&root, "train")?) as Arc<dyn Task>, identity.clone(), identity]);
    split_off_val(Arc::new(TaskMixture::new(tasks, stage.seed)), val_fraction)
}

/// The online data [`mid_mixture`] reads (the identity conversations aside), for listing what the
/// stage downloads.
fn sources() -> Vec<Dataset> {
    let mut datasets = sources::smoltalk("train");
    datasets.extend([sources::mmlu("auxiliary_train"), sources::gsm8k("train"), Dataset::Words]);
    datasets
}

impl MidCommand {
    /// What running this command downloads on first use (nothing with a mirror).
    pub fn downloads(&self) -> Vec<RemoteFile> {
        let MidCommand::Train(args) = self;
        args.stage.mixture_downloads(sources())
    }
}

/// `(first part, last val_fraction)` of a task; both must be non-empty.
pub fn split_off_val(task: Arc<dyn Task>, val_fraction: f64) -> Result<(Arc<dyn Task>, Arc<dyn Task>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction is {val_fraction}: it must be in [0, 1)");
    }
    let n = task.len();
    let n_val = ((n as f64 * val_fraction).ceil() as usize).max(1);
    if n_val >= n {
        bail!("the mixture has {n} conversations: too few to hold {n_val} out for validation");
    }
    let train = Subset::slice(task.clone(), 0, Some(n - n_val), 1)?;
    let val = Subset::slice(task, n - n_val, None, 1)?;
    Ok((Arc::new(train), Arc::new(val)))
}

/// The conversations of `task` rendered and concatenated, masks dropped (every token is trained on),
/// each cut to one row of T + 1 tokens as the original cuts them to its context. With a `limit`,
/// only the stream's first `limit` tokens: conversations are rendered a few thousand at a time
/// until there are enough, so that a short run on a large mixture (the online SmolTalk has 460K
/// conversations) does not render all of it; the tokens are the same as the whole stream's first.
fn token_stream(
    tokenizer: &bpe::Tokenizer,
    task: &dyn Task,
    max_tokens: usize,
    limit: Option<usize>,
) -> Result<Vec<u32>> {
    const CHUNK: usize = 4096;
    let mut stream = Vec::new();
    for start in (0..task.len()).step_by(CHUNK) {
        if limit.is_some_and(|limit| stream.len() >= limit) {
            break;
        }
        stream.extend(
            render_task(tokenizer, task, start..start + CHUNK, max_tokens)?.into_iter().flat_map(|(ids, _)| ids),
        );
    }
    stream.truncate(limit.unwrap_or(usize::MAX));
    Ok(stream)
}

/// Micro-batch `k` of the stream: rows of T + 1 tokens cut one after another, as (inputs, targets).
fn micro_batch(stream: &[u32], k: usize, rows: usize, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let span = rows * (seq_len + 1);
    let Some(tokens) = stream.get(k * span..(k + 1) * span) else {
        bail!("micro-batch {k} is past the end of the {}-token stream", stream.len());
    };
    let (mut inputs, mut targets) = (Vec::with_capacity(rows * seq_len), Vec::with_capacity(rows * seq_len));
    for row in tokens.chunks_exact(seq_len + 1) {
        inputs.extend_from_slice(&row[..seq_len]);
        targets.extend(row[1..].iter().map(|&t| i64::from(t)));
    }
    let x = Tensor::from_vec(inputs, (rows, seq_len), device)?;
    let y = Tensor::from_vec(targets, (rows, seq_len), device)?;
    Ok((x, y))
}

/// Runs (or resumes) midtraining from the `base` checkpoint's weights on `train_task`, with
/// checkpoints and metrics in `out_dir`, in this process alone.
pub fn train(
    args: &MidArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    val_task: &dyn Task,
    base: &Checkpoint,
    out_dir: &Path,
) -> Result<TrainReport> {
    train_on(args, tokenizer, train_task, val_task, base, out_dir, &SingleProcess)
}

/// [`train`] as rank `comm.rank()` of `comm.world_size()`; every rank must call it with the same
/// options and data. Every rank returns the same losses; only rank 0 writes anything.
pub fn train_on(
    args: &MidArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    val_task: &dyn Task,
    base: &Checkpoint,
    out_dir: &Path,
    comm: &dyn Communicator,
) -> Result<TrainReport> {
    let world = comm.world_size();
    let device = Device::cuda_if_available(dist::local_rank())?;
    let model_config = base.meta.model_config.clone();
    let seq_len = args.max_seq_len.unwrap_or(model_config.sequence_len);
    if seq_len > model_config.sequence_len {
        bail!("--max-seq-len {seq_len} is longer than the base model's context of {}", model_config.sequence_len);
    }
    let rows = args.device_batch_size;
    let per_pass = rows * seq_len;
    if per_pass == 0 || !args.total_batch_size.is_multiple_of(per_pass) {
        bail!("--total-batch-size {} is not a multiple of {rows} x {seq_len}", args.total_batch_size);
    }
    let accum_steps = args.total_batch_size / per_pass;
    let rank_accum_steps = accum_steps_per_rank(comm, accum_steps, "--total-batch-size")?;
    let row_tokens = rows * (seq_len + 1);
    // a run of --num-iterations steps reads that many steps' tokens, and one more token to say
    // whether the mixture holds them all
    let needed = args.num_iterations.map(|n| n * accum_steps * row_tokens + 1);
    let stream = token_stream(tokenizer, train_task, seq_len + 1, needed)?;
    let epoch_steps = stream.len() / row_tokens / accum_steps;
    let num_iterations = match args.num_iterations {
        Some(n) if n > epoch_steps => {
            bail!("--num-iterations {n} is more than one epoch of the mixture ({epoch_steps} steps): lower it")
        }
        Some(n) => n,
        None => epoch_steps,
    };
    if num_iterations == 0 {
        bail!("the mixture's {} tokens make no full step of {} tokens", stream.len(), args.total_batch_size);
    }
    let wanted_val_batches = (args.eval_tokens.unwrap_or(20 * args.total_batch_size) / per_pass).max(1);
    let val_stream = token_stream(tokenizer, val_task, seq_len + 1, Some(wanted_val_batches * row_tokens))?;
    let val_available = val_stream.len() / row_tokens;
    if args.eval_every > 0 && val_available == 0 {
        bail!("the held-out conversations make less than one batch: raise --val-fraction or pass --eval-every 0");
    }
    let val_batches = wanted_val_batches.min(val_available.max(1));
    // The stream's length stands for its content: a resume on other data would silently differ.
    // `grad_accum_steps` is the whole step's, over all ranks: a step's micro-batches do not depend
    // on the number of processes, so a run may resume on another number of them.
    let run_config = json!({
        "args": args, "num_iterations": num_iterations, "grad_accum_steps": accum_steps,
        "stream_tokens": stream.len(), "base_step": base.meta.step, "world_size": world,
    });

    let start = match args.resume_from_step {
        None => {
            let (model, varmap) = checkpoint::model_from_checkpoint(base, &device)?;
            Start::fresh(model, varmap)
        }
        Some(step) => {
            let ckpt = load_resume_checkpoint(out_dir, step, &device, &tokenizer.fingerprint(), &model_config)?;
            for key in ["stream_tokens", "num_iterations", "grad_accum_steps"] {
                if ckpt.meta.run_config.get(key) != run_config.get(key) {
                    bail!("the run's {key} changed since the checkpoint: resume with the original options and data");
                }
            }
            Start::resumed(ckpt, &device)?
        }
    };
    let intro = format!(
        "midtraining {model_config:?} on a mixture of {} conversations ({} tokens of it rendered): {num_iterations} \
         steps of {} tokens ({rank_accum_steps} micro-batches of {rows}x{seq_len} on each of {world} processes)",
        train_task.len(),
        stream.len(),
        args.total_batch_size
    );
    let mut data = StreamData {
        stream,
        val_stream,
        val_batches,
        accum_steps,
        rows,
        seq_len,
        token_bytes: tokenizer.token_bytes(),
        device,
    };
    let steps = StepLoop {
        name: "mid train",
        // f32 GEMMs: this stage has no --bf16, and an earlier stage's choice stays with its model
        kernels: Kernels::default(),
        num_iterations,
        accum_steps: rank_accum_steps,
        tokens_per_step: args.total_batch_size,
        schedule: LrSchedule {
            num_iterations,
            warmup_ratio: 0.0,
            warmdown_ratio: args.warmdown_ratio,
            final_lr_frac: 0.0,
        },
        optim: args.stage.optim_config(1.0),
        grad_clip: args.stage.grad_clip,
        eval_every: args.eval_every,
        sample_every: 0,
        save_every: args.save_every,
        run_config,
        out_dir,
    };
    steps.run(comm, tokenizer, start, &mut data, intro)
}

/// Midtraining's data: the rendered mixture as one token stream, and the held-out one. The data
/// position is the step itself (step N starts at micro-batch N × accumulation steps), so a
/// checkpoint needs no loader state, and resumes under any number of processes.
struct StreamData {
    stream: Vec<u32>,
    val_stream: Vec<u32>,
    /// Validation micro-batches per evaluation.
    val_batches: usize,
    /// Micro-batches per optimizer step, over all ranks.
    accum_steps: usize,
    rows: usize,
    seq_len: usize,
    token_bytes: Vec<u32>,
    device: Device,
}

impl StageData for StreamData {
    fn micro_batches<'a>(&'a mut self, step: usize, comm: &'a dyn Communicator) -> MicroBatches<'a> {
        // The step's micro-batches are one process's; rank r runs those at r, r + W, r + 2W, ...
        let (stream, rows, seq_len, device) = (&self.stream, self.rows, self.seq_len, &self.device);
        let batches = rank_stride(comm, step * self.accum_steps, self.accum_steps);
        Box::new(batches.map(move |k| micro_batch(stream, k, rows, seq_len, device)))
    }

    fn validation_bpb(&mut self, model: &GPT, comm: &dyn Communicator) -> Result<f64> {
        // Each rank evaluates its stride of the validation batches; the totals are added.
        let (stream, rows, seq_len, device) = (&self.val_stream, self.rows, self.seq_len, &self.device);
        let batches = rank_stride(comm, 0, self.val_batches).map(|k| micro_batch(stream, k, rows, seq_len, device));
        evaluate_bpb_on(comm, model, batches, &self.token_bytes)
    }

    fn checkpoint_meta(&self, _comm: &dyn Communicator, _meta: &mut Meta) -> Result<()> {
        // The data position is the step itself: the checkpoint needs no rank's loader state.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::identity::Identity;

    #[test]
    fn a_limited_stream_is_the_whole_streams_prefix() {
        let task = Identity::new(9000, 3); // more than two rendering chunks
        let text: Vec<String> = (0..50).map(|i| format!("{:?}", task.get(i).unwrap().conversation)).collect();
        let tokenizer = bpe::Tokenizer::train(text.iter(), 300, bpe::DEFAULT_PATTERN).unwrap();
        let whole = token_stream(&tokenizer, &task, 64, None).unwrap();
        for limit in [1, 1000, whole.len() / 2, whole.len(), whole.len() + 5] {
            let part = token_stream(&tokenizer, &task, 64, Some(limit)).unwrap();
            assert_eq!(part[..], whole[..limit.min(whole.len())]);
        }
    }
}
