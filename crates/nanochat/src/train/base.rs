//! `nanochat base train`: pretraining of the GPT on the parquet shards (the original's
//! `base_train.py`), with exact resume from checkpoints.
//!
//! Design choices, as in the original unless said otherwise:
//! - everything derives from `--depth`; the horizon comes from `--num-iterations`, or
//!   `--target-flops`, or else the Chinchilla ratio of 20 training tokens per parameter;
//! - gradient accumulation makes every step see `--total-batch-size` tokens whatever fits in
//!   one micro-batch of `--device-batch-size` rows of `--max-seq-len` tokens;
//! - Muon + AdamW, no warmup, linear warmdown over the last 20% of steps, gradient clipping at 1;
//! - validation bits per byte every `--eval-every` steps and at the end; greedy samples from fixed
//!   prompts; checkpoints every `--save-every` steps and at the end;
//! - the logged loss is the debiased EMA of the step losses (here the mean over the step's
//!   micro-batches; the original logs the last micro-batch's);
//! - unlike the original, `--eval-tokens` defaults to 20 steps' worth of tokens rather than a
//!   fixed 10M, so that small CPU runs do not spend most of their time evaluating.
//!
//! The loop itself (cadences, checkpoints, metrics, progress) is the one midtraining runs too
//! (`step_loop.rs`); this stage brings the data (the shard loader) and the options. `--bf16` puts
//! this stage's training GEMMs in bf16, and only this stage's: the model it builds carries the
//! choice ([`Kernels`]), so later stages of the same process run f32 unless they ask.
//!
//! A checkpoint at step N holds the state after N optimizer steps, including the data loader's
//! position and the loss EMA, so `--resume-from-step N` continues as if never interrupted.
//!
//! Data-parallel (`mpirun -n W nanochat base train ...`, docs/DISTRIBUTED.md): every rank reads
//! its own stride of the row groups and runs `total / (device batch × seq len × W)` micro-batches,
//! each gradient is averaged across ranks onto the one rank that owns its parameter, which alone
//! keeps that parameter's optimizer state and updates it (ZeRO-2; clipping sees the global norm),
//! and the updated parameters are gathered by every rank, so a step is the same as one process's
//! with the same global batch; validation is split across ranks and added up; rank 0 alone logs,
//! shows progress and writes the weights, metrics and the report, each rank its own shard of the
//! optimizer state. A checkpoint keeps rank 0's loader state in `loader_state` (as a single
//! process does) and, for W > 1, every rank's in `run_config.loader_states` (indexed by rank), so
//! a run resumes with the same W only. `base eval` splits CORE's items and the validation batches
//! across the ranks and gives one process's results.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;

pub use super::step_loop::TrainReport;
use super::step_loop::{load_resume_checkpoint, MicroBatches, StageData, Start, StepLoop};
use super::{batch_tensors, sample_completions, validation_bpb, validation_bpb_split};
use crate::checkpoint::{self, Meta};
use crate::data::dataset::Split;
use crate::data::loader::{Loader, LoaderConfig, LoaderState, Packing};
use crate::data::sources::{Dataset, Endpoints, Online, RemoteFile};
use crate::data::{ShardArgs, MIRROR_EVAL_BUNDLE};
use crate::dist::{self, or_abort, Communicator, DistMode, SingleProcess};
use crate::eval::bundle::Bundle;
use crate::model::fused::Gemm;
use crate::model::{GPTConfig, Kernels, GPT};
use crate::optim::{LrSchedule, OptimConfig};

#[derive(Subcommand)]
pub enum BaseCommand {
    /// Pretrain the GPT on the parquet shards; checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<tag>.
    Train(Box<TrainArgs>),
    /// CORE metric, validation bits per byte and greedy samples of a saved base checkpoint.
    Eval(EvalArgs),
}

/// The evaluations `nanochat base eval` can run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalKind {
    /// The CORE metric over the eval bundle (22 tasks).
    Core,
    /// Validation bits per byte.
    Bpb,
    /// Greedy completions of fixed prompts.
    Sample,
}

/// Options of `nanochat base eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Checkpoint directory name under base_checkpoints (e.g. d20) [default: the deepest d<N> there].
    #[arg(long)]
    pub model_tag: Option<String>,
    /// Checkpoint step [default: the latest].
    #[arg(long)]
    pub step: Option<usize>,
    /// Validation tokens to evaluate on.
    #[arg(long, default_value_t = 1 << 20)]
    pub eval_tokens: usize,
    /// Rows per forward pass (rows are the model's context length).
    #[arg(long, default_value_t = 32)]
    pub device_batch_size: usize,
    /// Where the validation shard is (the last shard), and with --data-dir the CORE bundle too.
    #[command(flatten)]
    pub shards: ShardArgs,
    /// Which evaluations to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "core,bpb,sample")]
    pub eval: Vec<EvalKind>,
    /// Evaluate at most this many items per CORE task (for quick runs) [default: all].
    #[arg(long)]
    pub max_per_task: Option<usize>,
    /// The CORE eval bundle (core.yaml, eval_meta_data.csv, eval_data/) [default: with --data-dir the
    /// mirror's eval/eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle, downloaded there on first use].
    #[arg(long)]
    pub bundle_dir: Option<PathBuf>,
    /// Data-parallel across processes: auto (MPI under mpirun, NCCL under a torchrun-style launch), mpi,
    /// nccl (GPUs, the `nccl` feature), or none.
    #[arg(long, value_enum, default_value_t = DistMode::Auto)]
    pub dist: DistMode,
}

impl EvalArgs {
    /// The CORE bundle: `--bundle-dir`, else the mirror's, else the cache's.
    fn core_bundle(&self) -> PathBuf {
        match (&self.bundle_dir, &self.shards.data_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(mirror)) => mirror.join(MIRROR_EVAL_BUNDLE),
            (None, None) => Bundle::default_dir(),
        }
    }

    /// Whether the CORE bundle comes from the online source (into the cache).
    fn downloads_bundle(&self) -> bool {
        self.eval.contains(&EvalKind::Core) && self.bundle_dir.is_none() && self.shards.data_dir.is_none()
    }
}

impl BaseCommand {
    /// What running this command downloads: base eval's CORE bundle, when it comes from no local copy.
    pub fn downloads(&self) -> Vec<RemoteFile> {
        match self {
            BaseCommand::Eval(args) if args.downloads_bundle() => vec![Online::from_env().file(&Dataset::EvalBundle)],
            _ => Vec::new(),
        }
    }
}

/// Options of `nanochat base train` (defaults: the original's d20 run).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(args_override_self = true)] // a later flag wins, so scripts can append overrides
pub struct TrainArgs {
    /// Number of layers; width is 64 per layer, heads of dimension 128.
    #[arg(long, default_value_t = 20)]
    pub depth: usize,
    /// Override the width (default depth * 64).
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Override the number of heads (default ceil(n_embd / 128)).
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Override the number of key/value heads (default n_head, i.e. no grouped-query attention).
    #[arg(long)]
    pub n_kv_head: Option<usize>,
    /// Context length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Rows per forward/backward pass; lower it if memory runs out.
    #[arg(long, default_value_t = 32)]
    pub device_batch_size: usize,
    /// Tokens per optimizer step; a multiple of device-batch-size * max-seq-len.
    #[arg(long, default_value_t = 524_288)]
    pub total_batch_size: usize,
    /// Train for exactly this many steps.
    #[arg(long, conflicts_with = "target_flops")]
    pub num_iterations: Option<usize>,
    /// Train for this many FLOPs (used when --num-iterations is not given).
    #[arg(long)]
    pub target_flops: Option<f64>,
    /// Otherwise: train on this many tokens per parameter (Chinchilla: 20).
    #[arg(long, default_value_t = 20.0)]
    pub target_param_data_ratio: f64,
    /// AdamW learning rate of the token embedding (scaled by (n_embd/768)^-0.5).
    #[arg(long, default_value_t = 0.2)]
    pub embedding_lr: f64,
    /// AdamW learning rate of the lm_head (scaled by (n_embd/768)^-0.5).
    #[arg(long, default_value_t = 0.004)]
    pub unembedding_lr: f64,
    /// Muon learning rate of the block matrices.
    #[arg(long, default_value_t = 0.02)]
    pub matrix_lr: f64,
    /// Clip the gradient's global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Fraction of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Fraction of the steps at the end spent decaying the learning rate.
    #[arg(long, default_value_t = 0.2)]
    pub warmdown_ratio: f64,
    /// Learning rate at the end, as a fraction of the initial one.
    #[arg(long, default_value_t = 0.0)]
    pub final_lr_frac: f64,
    /// Evaluate validation bits per byte every this many steps (0: never).
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
    /// Validation tokens per evaluation [default: 20 * total-batch-size].
    #[arg(long)]
    pub eval_tokens: Option<usize>,
    /// Print greedy samples every this many steps (0: never).
    #[arg(long, default_value_t = 2000)]
    pub sample_every: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue the run from its checkpoint at this step.
    #[arg(long)]
    pub resume_from_step: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub shards: ShardArgs,
    /// Checkpoint directory name under base_checkpoints [default: d<depth>].
    #[arg(long)]
    pub model_tag: Option<String>,
    /// Seed of the weight initialisation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// How documents are packed into rows (v0: stream).
    #[arg(long, value_enum, default_value_t = Packing::Stream)]
    pub packing: Packing,
    /// Data-parallel across processes: auto (MPI under mpirun, NCCL under a torchrun-style launch), mpi,
    /// nccl (GPUs, the `nccl` feature), or none.
    #[arg(long, value_enum, default_value_t = DistMode::Auto)]
    pub dist: DistMode,
    /// Run the step's matmuls (the blocks' projections, the lm_head, Muon's Newton-Schulz) in bf16
    /// (f32 accumulation, f32 weights and optimizer state) on CPUs with AVX-512 BF16: ~1.6x faster
    /// steps at depth 4, same loss; ignored elsewhere.
    #[arg(long)]
    pub bf16: bool,
}

impl TrainArgs {
    /// The model shape these options describe, for a vocabulary of `vocab_size` tokens.
    pub fn model_config(&self, vocab_size: usize) -> Result<GPTConfig> {
        let mut cfg = GPTConfig::from_depth(self.depth, vocab_size, self.max_seq_len);
        if let Some(n_embd) = self.n_embd {
            cfg.n_embd = n_embd;
            cfg.n_head = n_embd.div_ceil(128).max(1);
        }
        cfg.n_head = self.n_head.unwrap_or(cfg.n_head);
        cfg.n_kv_head = self.n_kv_head.unwrap_or(cfg.n_head);
        cfg.validate().context("check --depth, --n-embd, --n-head and --n-kv-head")?;
        Ok(cfg)
    }

    /// Micro-batches per optimizer step of a single process.
    pub fn grad_accum_steps(&self) -> Result<usize> {
        self.grad_accum_steps_for(1)
    }

    /// Micro-batches per optimizer step on each of `world_size` ranks: the global batch stays
    /// `--total-batch-size` whatever the number of ranks.
    pub fn grad_accum_steps_for(&self, world_size: usize) -> Result<usize> {
        let per_pass = self.device_batch_size * self.max_seq_len * world_size;
        if per_pass == 0 || self.total_batch_size == 0 || !self.total_batch_size.is_multiple_of(per_pass) {
            bail!(
                "--total-batch-size {} must be a positive multiple of --device-batch-size {} x --max-seq-len {} x \
                 {world_size} processes = {per_pass} tokens",
                self.total_batch_size,
                self.device_batch_size,
                self.max_seq_len
            );
        }
        Ok(self.total_batch_size / per_pass)
    }

    /// Optimizer steps of the run, from whichever horizon option applies.
    pub fn num_iterations(&self, cfg: &GPTConfig) -> Result<usize> {
        let batch = self.total_batch_size as f64;
        let steps = match (self.num_iterations, self.target_flops) {
            (Some(n), _) => n,
            (None, Some(flops)) => (flops / (cfg.estimate_flops() as f64 * batch)).round() as usize,
            (None, None) => (self.target_param_data_ratio * cfg.num_params() as f64 / batch) as usize,
        };
        if steps == 0 {
            bail!(
                "the training horizon is 0 steps: raise --num-iterations, --target-flops or --target-param-data-ratio"
            );
        }
        Ok(steps)
    }

    /// The loader of `comm`'s rank: its stride of the row groups.
    fn loader_config(&self, dir: &Path, split: Split, comm: &dyn Communicator) -> LoaderConfig {
        let mut cfg = LoaderConfig::new(dir.to_path_buf(), split, self.device_batch_size, self.max_seq_len);
        cfg.packing = self.packing;
        (cfg.rank, cfg.world_size) = (comm.rank(), comm.world_size());
        cfg
    }
}

pub fn run(cmd: BaseCommand) -> Result<()> {
    match cmd {
        BaseCommand::Train(args) => {
            let comm = dist::init(args.dist)?;
            let started = Instant::now();
            let trained = crate::tokenizer::load().and_then(|tokenizer| {
                let dir = checkpoint::base_checkpoint_dir(args.model_tag.as_deref(), args.depth);
                Ok((train_on(&args, &tokenizer, &dir, comm.as_ref())?, tokenizer, dir))
            });
            let (report, tokenizer, dir) = match trained {
                Ok(done) => done,
                // Returning would leave the other ranks waiting for this one in their next collective.
                Err(e) if comm.world_size() > 1 => {
                    eprintln!("rank {} of {}: error: {e:#}", comm.rank(), comm.world_size());
                    comm.abort(1)
                }
                Err(e) => return Err(e),
            };
            if !comm.is_root() {
                return Ok(());
            }
            write_train_section(&args, &tokenizer, &report, started.elapsed().as_secs_f64())?;
            let bpb = report.val_bpb.map_or_else(|| "not evaluated".to_string(), |b| format!("{b:.4}"));
            println!(
                "done: {} steps, {:.0} tokens/s, validation bpb {bpb}; checkpoints in {}",
                report.num_iterations,
                report.tokens_per_sec,
                dir.display()
            );
            Ok(())
        }
        BaseCommand::Eval(args) => {
            let comm = dist::init(args.dist)?;
            let result = run_eval(&args, comm.as_ref());
            or_abort(comm.as_ref(), result)
        }
    }
}

/// The base-train section of the report: what was trained, how long, how well.
fn write_train_section(args: &TrainArgs, tokenizer: &bpe::Tokenizer, report: &TrainReport, seconds: f64) -> Result<()> {
    let cfg = args.model_config(tokenizer.vocab_size())?;
    let params = cfg.num_params();
    let flops = cfg.estimate_flops() as f64 * (report.num_iterations * args.total_batch_size) as f64;
    let bpb = report.val_bpb.map_or_else(|| "-".to_string(), |b| format!("{b:.4}"));
    let markdown = format!(
        "- depth: {}\n- parameters: {params}\n- steps: {} of {} tokens\n- training FLOPs: {flops:.3e}\n\
         - final validation bpb: {bpb}\n- throughput: {:.0} tokens/s\n",
        args.depth, report.num_iterations, args.total_batch_size, report.tokens_per_sec
    );
    let metrics = json!({
        "seconds": seconds, "depth": args.depth, "params": params, "steps": report.num_iterations,
        "total_batch_size": args.total_batch_size, "flops": flops, "val_bpb": report.val_bpb,
        "tokens_per_sec": report.tokens_per_sec,
        "eval_tokens": args.eval_tokens.unwrap_or(20 * args.total_batch_size),
    });
    crate::report::write_section("base_train", &markdown, metrics)?;
    Ok(())
}

/// `nanochat base eval` as one rank of `comm`: loads the checkpoint once, runs the evaluations
/// asked for, saves the CORE results as `$NANOCHAT_BASE_DIR/base_eval/base_<tag>_<step>.{csv,json}`
/// (the original's layout) and writes the report section. With several ranks, CORE's items and
/// the validation batches are split across them and the counts and totals added, which gives one
/// process's results; rank 0 alone samples, prints and writes.
fn run_eval(args: &EvalArgs, comm: &dyn Communicator) -> Result<()> {
    let started = Instant::now();
    let root = comm.is_root();
    let base = crate::common::base_dir();
    let checkpoints = base.join("base_checkpoints");
    let tag = match &args.model_tag {
        Some(tag) => tag.clone(),
        None => crate::checkpoint::default_model_tag(&checkpoints)?,
    };
    let dir = checkpoints.join(&tag);
    let tokenizer = crate::tokenizer::for_checkpoint(&dir)?;
    let step = match args.step {
        Some(step) => step,
        None => checkpoint::latest_step(&dir)?.with_context(|| {
            format!("no checkpoint in {}: train one with `nanochat base train` first", dir.display())
        })?,
    };
    let device = Device::cuda_if_available(dist::local_rank())?;
    let ckpt = checkpoint::load(&dir, step, &device, false, Some(&tokenizer.fingerprint()))
        .with_context(|| format!("loading the base model {tag} at step {step}: pick another with --step"))?;
    let (model, _) = checkpoint::model_from_checkpoint(&ckpt, &device)?;
    let mut markdown = format!("- model: {tag} step {step}\n");
    let mut metrics = json!({ "model_tag": tag, "step": step });

    if args.eval.contains(&EvalKind::Core) {
        let bundle_dir = args.core_bundle();
        if root && args.downloads_bundle() {
            Bundle::ensure(&bundle_dir, &Endpoints::from_env().eval_bundle)?;
        }
        let results = crate::eval::core::evaluate_core_on(comm, &model, &tokenizer, &bundle_dir, args.max_per_task)?;
        if root {
            let (csv, _) = results.save(&base.join("base_eval"), &format!("base_{tag}_{step:06}"))?;
            println!("CORE {:.4}; per task in {}", results.core, csv.display());
        }
        markdown.push_str(&format!("- CORE: {:.4}\n\n```\n{}```\n", results.core, results.to_csv()));
        metrics["core"] = json!(results.core);
    }
    if args.eval.contains(&EvalKind::Bpb) {
        let loader =
            LoaderConfig::new(args.shards.dir()?, Split::Val, args.device_batch_size, model.config().sequence_len);
        let bpb = validation_bpb_split(&model, &tokenizer, &loader, args.eval_tokens, comm)?;
        if root {
            println!("{} step {step}: validation bpb {bpb:.4}", dir.display());
        }
        markdown.push_str(&format!("- validation bpb: {bpb:.4}\n"));
        metrics["val_bpb"] = json!(bpb);
        metrics["eval_tokens"] = json!(args.eval_tokens);
    }
    if !root {
        return Ok(());
    }
    if args.eval.contains(&EvalKind::Sample) {
        let samples = sample_completions(&model, &tokenizer)?;
        samples.iter().for_each(|s| println!("  {s}"));
        markdown.push_str("\nSamples:\n\n");
        samples.iter().for_each(|s| markdown.push_str(&format!("- {}\n", s.replace('\n', " "))));
    }
    metrics["seconds"] = json!(started.elapsed().as_secs_f64());
    metrics["world_size"] = json!(comm.world_size());
    crate::report::write_section("base_eval", &markdown, metrics)?;
    Ok(())
}

/// Validation bits per byte and greedy samples of the checkpoint at `step` in `dir`, evaluated
/// at the model's context length (only the model weights are loaded).
pub fn evaluate_checkpoint(
    dir: &Path,
    step: usize,
    tokenizer: &bpe::Tokenizer,
    data_dir: &Path,
    batch_size: usize,
    eval_tokens: usize,
) -> Result<(f64, Vec<String>)> {
    let device = Device::cuda_if_available(0)?;
    let ckpt = checkpoint::load(dir, step, &device, false, Some(&tokenizer.fingerprint()))?;
    let (model, _) = checkpoint::model_from_checkpoint(&ckpt, &device)?;
    let seq_len = model.config().sequence_len;
    let loader = LoaderConfig::new(data_dir.to_path_buf(), Split::Val, batch_size, seq_len);
    let bpb = validation_bpb(&model, tokenizer, &loader, eval_tokens, &SingleProcess)?;
    Ok((bpb, sample_completions(&model, tokenizer)?))
}

/// Runs (or resumes) pretraining as `args` say, with checkpoints and metrics in `out_dir`, on the
/// processes `--dist` finds (one, unless an MPI launcher started this process).
pub fn train(args: &TrainArgs, tokenizer: &bpe::Tokenizer, out_dir: &Path) -> Result<TrainReport> {
    let comm = dist::init(args.dist)?;
    train_on(args, tokenizer, out_dir, comm.as_ref())
}

/// [`train`] as rank `comm.rank()` of `comm.world_size()`; every rank must call it with the same
/// options. Every rank returns the same losses; only rank 0 writes anything.
pub fn train_on(
    args: &TrainArgs,
    tokenizer: &bpe::Tokenizer,
    out_dir: &Path,
    comm: &dyn Communicator,
) -> Result<TrainReport> {
    let (world, root) = (comm.world_size(), comm.is_root());
    let device = Device::cuda_if_available(dist::local_rank())?;
    let kernels = Kernels { bf16: args.bf16, ..Kernels::default() };
    if args.bf16 && root {
        let how = if kernels.gemm() == Gemm::Bf16 { "in bf16" } else { "in f32 (no AVX-512 BF16 here)" };
        eprintln!("training matmuls {how}");
    }
    let model_config = args.model_config(tokenizer.vocab_size())?;
    let accum_steps = args.grad_accum_steps_for(world)?;
    let num_iterations = args.num_iterations(&model_config)?;
    let data_dir = args.shards.dir()?;
    let run_config = json!({
        "args": args, "num_iterations": num_iterations, "grad_accum_steps": accum_steps, "world_size": world,
    });

    // The model, the optimizer state and the loop state: fresh, or as the checkpoint left them.
    let (start, loader_state) = match args.resume_from_step {
        None => {
            let (model, varmap) = GPT::init(&model_config, args.seed, &device)?;
            (Start::fresh(model, varmap), None)
        }
        Some(step) => {
            let ckpt = load_resume_checkpoint(out_dir, step, &device, &tokenizer.fingerprint(), &model_config)?;
            if ckpt.meta.run_config.get("num_iterations") != run_config.get("num_iterations") && root {
                eprintln!("warning: the run had a different horizon; the learning-rate schedule changes from here");
            }
            let loader_state = rank_loader_state(&ckpt.meta, comm)?;
            (Start::resumed(ckpt, &device)?, loader_state)
        }
    };
    let tokens_per_step = args.total_batch_size;
    let intro = format!(
        "model {model_config:?}: {} parameters, {:.3e} FLOPs/token; {num_iterations} steps of {tokens_per_step} \
         tokens ({accum_steps} micro-batches of {}x{} on each of {world} processes), {:.2} tokens per parameter",
        model_config.num_params(),
        model_config.estimate_flops() as f64,
        args.device_batch_size,
        args.max_seq_len,
        (num_iterations * tokens_per_step) as f64 / model_config.num_params() as f64,
    );
    let mut data = ShardData {
        loader: Loader::new(tokenizer, &args.loader_config(&data_dir, Split::Train, comm), loader_state.as_ref())?,
        loader_state,
        rows: args.device_batch_size,
        seq_len: args.max_seq_len,
        val_loader: args.loader_config(&data_dir, Split::Val, comm),
        eval_tokens: args.eval_tokens.unwrap_or(20 * tokens_per_step),
        tokenizer,
        device,
    };
    let steps = StepLoop {
        name: "base train",
        kernels,
        num_iterations,
        accum_steps,
        tokens_per_step,
        schedule: LrSchedule {
            num_iterations,
            warmup_ratio: args.warmup_ratio,
            warmdown_ratio: args.warmdown_ratio,
            final_lr_frac: args.final_lr_frac,
        },
        optim: OptimConfig {
            unembedding_lr: args.unembedding_lr,
            embedding_lr: args.embedding_lr,
            matrix_lr: args.matrix_lr,
            weight_decay: 0.0,
        },
        grad_clip: args.grad_clip,
        eval_every: args.eval_every,
        sample_every: args.sample_every,
        save_every: args.save_every,
        run_config,
        out_dir,
    };
    steps.run(comm, tokenizer, start, &mut data, intro)
}

/// Pretraining's data: this rank's stride of the shards, through the loader, whose state after
/// the last batch a checkpoint keeps.
struct ShardData<'a> {
    loader: Loader,
    /// The loader's state after the last batch taken (`None` before the first).
    loader_state: Option<LoaderState>,
    /// A micro-batch's rows and tokens per row.
    rows: usize,
    seq_len: usize,
    val_loader: LoaderConfig,
    eval_tokens: usize,
    tokenizer: &'a bpe::Tokenizer,
    device: Device,
}

impl StageData for ShardData<'_> {
    fn micro_batches<'a>(&'a mut self, _step: usize, _comm: &'a dyn Communicator) -> MicroBatches<'a> {
        let (rows, seq_len, state, device) = (self.rows, self.seq_len, &mut self.loader_state, &self.device);
        Box::new((&mut self.loader).map(move |b| {
            let b = b?;
            *state = Some(b.state.clone());
            batch_tensors(&b, rows, seq_len, device)
        }))
    }

    fn validation_bpb(&mut self, model: &GPT, comm: &dyn Communicator) -> Result<f64> {
        validation_bpb(model, self.tokenizer, &self.val_loader, self.eval_tokens, comm)
    }

    fn checkpoint_meta(&self, comm: &dyn Communicator, meta: &mut Meta) -> Result<()> {
        // Every rank's loader state goes to rank 0, which alone writes the meta.
        let states = comm.all_gather_bytes(&serde_json::to_vec(&self.loader_state)?)?;
        meta.loader_state = self.loader_state.clone();
        if comm.world_size() > 1 {
            let states: Vec<Option<LoaderState>> =
                states.iter().map(|s| serde_json::from_slice(s)).collect::<Result<_, _>>()?;
            meta.run_config["loader_states"] = json!(states);
        }
        Ok(())
    }
}

/// This rank's loader state in a checkpoint's meta (see the module docs for the layout); the
/// checkpoint must come from a run of as many processes.
fn rank_loader_state(meta: &Meta, comm: &dyn Communicator) -> Result<Option<LoaderState>> {
    let saved_world = meta.run_config.get("world_size").and_then(serde_json::Value::as_u64).unwrap_or(1);
    if saved_world != comm.world_size() as u64 {
        bail!(
            "the checkpoint of step {} was written by a run of {saved_world} processes but this run has {}: resume \
             with as many (each rank's data position is saved)",
            meta.step,
            comm.world_size()
        );
    }
    if comm.world_size() == 1 {
        return Ok(meta.loader_state.clone());
    }
    let state = meta.run_config.get("loader_states").and_then(|states| states.get(comm.rank()));
    let state = state.with_context(|| format!("the checkpoint of step {} has no loader state per rank", meta.step))?;
    serde_json::from_value(state.clone()).context("reading this rank's loader state from the checkpoint")
}
