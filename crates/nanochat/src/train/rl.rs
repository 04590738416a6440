//! `nanochat rl train`: reinforcement learning on GSM8K (the original's `chat_rl.py`), a plain
//! policy gradient with a per-problem baseline.
//!
//! Design choices, as in the original:
//! - it starts from the latest SFT model (`--source sft`) and keeps that model's tag;
//! - a step takes `--examples-per-step` training problems in order; for each, `--num-samples`
//!   completions are sampled through the [`Engine`] (calculator included) at `--temperature` 1 with
//!   top-k 50, in groups of `--device-batch-size` rows with a seed per (step, problem, group);
//! - the reward is the task's ([`Task::reward`]): 1 when the completion's `#### N` is the
//!   reference answer, else 0; the advantage is the reward minus the mean reward of the problem's
//!   samples: no division by the standard deviation, no KL term, no ratio clipping, no reference
//!   model — on-policy REINFORCE;
//! - the objective is the sum over sampled tokens (mask 1: never the prompt or the calculator's
//!   forced output) of log p(token) × advantage, divided by the number of such tokens in the
//!   micro-batch, the micro-batches per problem and the problems per step; the loss is its negative;
//! - sequences are padded with `<|assistant_end|>` to the longest of their group; the token that
//!   ended a completion is not part of it (the engine's `generate_batch` drops it, as the original's);
//! - learning rates: base's times `--init-lr-frac` (0.05), decaying linearly to 0 over the run;
//! - every `--eval-every` steps (and at the end): pass@1..k on the first `--eval-examples` test
//!   problems, k = `--device-batch-size` samples per problem at the same temperature;
//! - a checkpoint every `--save-every` steps and at the end, weights only, in
//!   `$NANOCHAT_BASE_DIR/chatrl_checkpoints/<tag>`.
//!
//! The engine samples from a model built over the same parameters that the optimizers update, and
//! is rebuilt after every step so that the next rollouts come from the updated policy.
//!
//! Data-parallel (`mpirun -n W nanochat rl train ...`, docs/DISTRIBUTED.md): rank r takes problems
//! r, r + W, r + 2W, ... of each step's `--examples-per-step` (which must be a multiple of W),
//! samples and scores their rollouts (the seeds depend on the step, problem and group, not on the
//! rank), and the gradients are averaged across ranks onto their parameters' owners (the optimizer
//! state is sharded, as in every stage), as are the step's reward, length and loss;
//! pass@k splits the test problems the same way and adds the counts. Rank 0 alone logs and writes
//! checkpoints, metrics and the report; an error on any rank ends every rank.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;

use super::{
    accumulate_grads, log_on, rank_progress_bar, save_weights_on, setup_optimizers_on, update_on, ChatStageArgs,
    MetricsLog,
};
use crate::checkpoint::Source;
use crate::checkpoint::{self, Checkpoint, LoopState, Meta};
use crate::data::sources::{self, RemoteFile};
use crate::dist::{self, or_abort, rank_stride, Communicator, SingleProcess};
use crate::engine::{Engine, GenerateOptions};
use crate::eval::chat::{grade_samples, sample_problem};
use crate::model::{GPTConfig, Reduction, GPT};
use crate::optim::Optimizers;
use crate::tasks::gsm8k::Gsm8k;
use crate::tasks::Task;

#[derive(Subcommand)]
pub enum RlCommand {
    /// Improve the latest SFT model on GSM8K by reinforcement learning; checkpoints go to
    /// $NANOCHAT_BASE_DIR/chatrl_checkpoints/<tag>.
    Train(Box<RlArgs>),
}

/// The stage whose checkpoint this one starts from unless `--source` says otherwise.
const STARTS_FROM: Source = Source::Sft;
/// Options of `nanochat rl train` (defaults: the original's).
#[derive(Parser, Debug, Clone, Serialize)]
#[command(args_override_self = true)] // a later flag wins, so scripts can append overrides
pub struct RlArgs {
    #[command(flatten)]
    pub stage: ChatStageArgs,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    /// Problems per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub examples_per_step: usize,
    /// Passes over the GSM8K training problems.
    #[arg(long, default_value_t = 1)]
    pub num_epochs: usize,
    /// Stop after at most this many steps (for quick runs).
    #[arg(long)]
    pub max_iterations: Option<usize>,
    /// The learning rates are base's times this at the start, then decay linearly to 0.
    #[arg(long, default_value_t = 0.05)]
    pub init_lr_frac: f64,
    /// Measure pass@k on the test problems every this many steps (0: only at the end).
    #[arg(long, default_value_t = 60)]
    pub eval_every: usize,
    /// Test problems per pass@k measurement.
    #[arg(long, default_value_t = 400)]
    pub eval_examples: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 60)]
    pub save_every: usize,
}

/// How completions are sampled, for training and for pass@k.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct RolloutArgs {
    /// Completions sampled per problem.
    #[arg(long, default_value_t = 16)]
    pub num_samples: usize,
    /// Completions decoded together, and trained on per forward/backward pass; also the k of pass@k.
    #[arg(long, default_value_t = 8)]
    pub device_batch_size: usize,
    /// Longest completion, in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only; 0 = all.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
}

impl RolloutArgs {
    fn options(&self, num_samples: usize, seed: u64) -> GenerateOptions {
        GenerateOptions {
            num_samples,
            max_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: Some(self.top_k).filter(|&k| k > 0),
            seed,
            ..GenerateOptions::default()
        }
    }
}

/// What a run did, for the caller (and tests).
#[derive(Debug, Clone)]
pub struct RlReport {
    /// The mean reward of every step's samples.
    pub rewards: Vec<f64>,
    pub num_iterations: usize,
    /// The last pass@1..k on the test problems.
    pub pass_at_k: Vec<f64>,
}

impl RlCommand {
    /// What running this command downloads on first use (nothing with a mirror): GSM8K.
    pub fn downloads(&self) -> Vec<RemoteFile> {
        let RlCommand::Train(args) = self;
        args.stage.downloads(&[sources::gsm8k("train"), sources::gsm8k("test")])
    }
}

pub fn run(cmd: RlCommand) -> Result<()> {
    let RlCommand::Train(args) = cmd;
    let comm = dist::init(args.stage.dist)?;
    let result = run_on(&args, comm.as_ref());
    or_abort(comm.as_ref(), result)
}

/// [`run`] as one rank of `comm`: every rank loads the starting checkpoint and the problems, rank
/// 0 alone writes the report section and prints the summary.
fn run_on(args: &RlArgs, comm: &dyn Communicator) -> Result<()> {
    let tokenizer = crate::tokenizer::load()?;
    let device = Device::cuda_if_available(dist::local_rank())?;
    let (init, at) = args.stage.model.load(STARTS_FROM, &tokenizer, &device)?;
    let tag = at.tag;
    let root = args.stage.data_root();
    let (train_task, test_task) = (Gsm8k::load(&root, "train")?, Gsm8k::load(&root, "test")?);
    let out_dir = Source::Rl.checkpoints_dir().join(&tag);
    let start = std::time::Instant::now();
    let report = train_on(args, &tokenizer, &train_task, &test_task, &init, &out_dir, comm)?;
    if !comm.is_root() {
        return Ok(());
    }
    write_report_section(args, &report, start.elapsed().as_secs_f64())?;
    let pass1 = report.pass_at_k.first().copied().unwrap_or(f64::NAN);
    println!(
        "done: {} steps, last mean reward {:.4}, GSM8K pass@1 {pass1:.4}; checkpoint in {}",
        report.num_iterations,
        report.rewards.last().copied().unwrap_or(f64::NAN),
        out_dir.display()
    );
    Ok(())
}

/// The rl_train section of the report.
fn write_report_section(args: &RlArgs, report: &RlReport, seconds: f64) -> Result<()> {
    let passes: Vec<String> =
        report.pass_at_k.iter().enumerate().map(|(k, p)| format!("pass@{}: {p:.4}", k + 1)).collect();
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len().max(1) as f64;
    let head = &report.rewards[..report.rewards.len().min(10)];
    let tail = &report.rewards[report.rewards.len().saturating_sub(10)..];
    let markdown = format!(
        "- steps: {} of {} problems × {} samples\n- mean reward, first 10 steps: {:.4}; last 10 steps: {:.4}\n\
         - GSM8K test ({} problems): {}\n",
        report.num_iterations,
        args.examples_per_step,
        args.rollout.num_samples,
        mean(head),
        mean(tail),
        args.eval_examples,
        passes.join(", ")
    );
    let metrics = json!({
        "seconds": seconds, "steps": report.num_iterations, "rewards": report.rewards,
        "pass_at_k": report.pass_at_k,
    });
    crate::report::write_section("rl_train", &markdown, metrics)?;
    Ok(())
}

/// The model over `varmap`'s parameters, in an engine: sampling from it sees every update the
/// optimizers make to those parameters. Default (f32) kernels, as the policy being trained.
fn policy_engine(config: &GPTConfig, varmap: &VarMap, tokenizer: &bpe::Tokenizer, device: &Device) -> Result<Engine> {
    let model = GPT::new(config, VarBuilder::from_varmap(varmap, DType::F32, device))?;
    Engine::new(model, tokenizer.clone())
}

/// Trains the `init` checkpoint's weights on `train_task`'s problems, measuring pass@k on
/// `test_task`; checkpoints and metrics go to `out_dir`. In this process alone.
pub fn train(
    args: &RlArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    test_task: &dyn Task,
    init: &Checkpoint,
    out_dir: &Path,
) -> Result<RlReport> {
    train_on(args, tokenizer, train_task, test_task, init, out_dir, &SingleProcess)
}

/// [`train`] as rank `comm.rank()` of `comm.world_size()`; every rank must call it with the same
/// options and problems. Every rank returns the same rewards; only rank 0 writes anything.
pub fn train_on(
    args: &RlArgs,
    tokenizer: &bpe::Tokenizer,
    train_task: &dyn Task,
    test_task: &dyn Task,
    init: &Checkpoint,
    out_dir: &Path,
    comm: &dyn Communicator,
) -> Result<RlReport> {
    let world = comm.world_size();
    let rollout = &args.rollout;
    ensure!(
        rollout.device_batch_size > 0 && rollout.num_samples.is_multiple_of(rollout.device_batch_size),
        "--num-samples {} is not a multiple of --device-batch-size {}",
        rollout.num_samples,
        rollout.device_batch_size
    );
    ensure!(args.examples_per_step > 0, "--examples-per-step must be at least 1");
    // Every rank must take as many problems, or the average of their gradients would weigh the
    // problems unequally.
    ensure!(
        args.examples_per_step.is_multiple_of(world),
        "--examples-per-step {} does not split evenly across {world} processes",
        args.examples_per_step
    );
    let mut num_iterations = train_task.len() / args.examples_per_step * args.num_epochs;
    num_iterations = args.max_iterations.map_or(num_iterations, |m| num_iterations.min(m));
    if num_iterations == 0 {
        bail!("{} problems make no step of {}: lower --examples-per-step", train_task.len(), args.examples_per_step);
    }
    let device = Device::cuda_if_available(dist::local_rank())?;
    let config = init.meta.model_config.clone();
    // The default (f32) kernels: this stage has no --bf16, and an earlier stage's choice stays with its model.
    let (model, varmap) = checkpoint::model_from_checkpoint(init, &device)?;
    let optim_config = args.stage.optim_config(args.init_lr_frac);
    let (mut optimizers, vars) = setup_optimizers_on(comm, &model, &varmap, &optim_config, None)?;
    let pad_id = tokenizer.special_id("<|assistant_end|>").context("the tokenizer has no <|assistant_end|>")?;
    let metrics = MetricsLog::open(comm, out_dir, 0)?;
    let eval_problems = args.eval_examples.min(test_task.len());

    let pb = rank_progress_bar(comm, num_iterations, "rl train");
    let say = |line: String| log_on(comm, &pb, line);
    say(format!(
        "RL on {}: {num_iterations} steps of {} problems × {} samples (max {} new tokens), {} problems on each of \
         {world} processes",
        train_task.name(),
        args.examples_per_step,
        rollout.num_samples,
        rollout.max_new_tokens,
        args.examples_per_step / world
    ));
    let mut rewards = Vec::new();
    let mut pass_at_k = Vec::new();
    let mut total_time = 0.0;
    for step in 0..=num_iterations {
        let last_step = step == num_iterations;
        let engine = policy_engine(&config, &varmap, tokenizer, &device)?;
        if last_step || (args.eval_every > 0 && step % args.eval_every == 0) {
            pass_at_k = evaluate_pass_at_k_on(comm, &engine, test_task, eval_problems, rollout, step)?;
            let shown: Vec<String> =
                pass_at_k.iter().enumerate().map(|(k, p)| format!("pass@{} {p:.4}", k + 1)).collect();
            say(format!("step {step:05} | {} test problems: {}", eval_problems, shown.join(", ")));
            metrics.append(&json!({ "step": step, "pass_at_k": pass_at_k }))?;
        }
        if last_step {
            break;
        }
        let t0 = std::time::Instant::now();
        // The step's problems are one process's; rank r takes those at r, r + W, r + 2W, ...
        let problems: Vec<usize> = rank_stride(comm, 0, args.examples_per_step)
            .map(|j| (step * args.examples_per_step + j) % train_task.len())
            .collect();
        let lr_multiplier = 1.0 - step as f64 / num_iterations as f64;
        let stats = rl_step_on(
            comm,
            &model,
            &engine,
            &mut optimizers,
            &vars,
            train_task,
            problems.into_iter(),
            rollout,
            step,
            pad_id,
            lr_multiplier,
        )
        .with_context(|| format!("step {step}"))?;
        let dt = t0.elapsed().as_secs_f64();
        total_time += dt;
        rewards.push(stats.mean_reward);
        pb.set_message(format!("reward {:.3} | lrm {lr_multiplier:.2}", stats.mean_reward));
        pb.inc(1);
        metrics.append(&json!({
            "step": step, "reward": stats.mean_reward, "sequence_length": stats.mean_length,
            "pg_loss": stats.loss, "lr_multiplier": lr_multiplier, "dt": dt,
        }))?;
        let saving = args.save_every > 0 && (step + 1) % args.save_every == 0 && step + 1 < num_iterations;
        if saving {
            save_on(comm, args, init, &config, tokenizer, &varmap, step + 1, total_time, out_dir)?;
        }
    }
    pb.finish();
    save_on(comm, args, init, &config, tokenizer, &varmap, num_iterations, total_time, out_dir)?;
    say(format!("saved checkpoint in {}", out_dir.display()));
    Ok(RlReport { rewards, num_iterations, pass_at_k })
}

/// The weights-only checkpoint of `step` ([`save_weights_on`]: rank 0 writes, every rank waits
/// until it is complete).
#[allow(clippy::too_many_arguments)] // the run's state at a step; only the step changes between calls
fn save_on(
    comm: &dyn Communicator,
    args: &RlArgs,
    init: &Checkpoint,
    config: &GPTConfig,
    tokenizer: &bpe::Tokenizer,
    varmap: &VarMap,
    step: usize,
    total_time: f64,
    out_dir: &Path,
) -> Result<()> {
    let mut meta = Meta::new(step, config.clone(), tokenizer.fingerprint());
    meta.loop_state = LoopState { total_training_time: total_time, ..LoopState::default() };
    meta.run_config = json!({ "args": args, "source": format!("{:?}", args.stage.model.source.unwrap_or(STARTS_FROM)), "source_step": init.meta.step });
    save_weights_on(comm, out_dir, varmap, &meta)
}

/// What one RL step saw.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean reward over every sample of the step.
    pub mean_reward: f64,
    /// Mean length of the sampled sequences (prompt included), in tokens.
    pub mean_length: f64,
    /// The policy-gradient loss, summed over the step's micro-batches.
    pub loss: f64,
}

/// One policy-gradient step as one rank of `comm` (a single process: [`SingleProcess`]): sample
/// completions for each of `problems`, this rank's share of the step's (every rank as many), with
/// `engine` (a model over the parameters `optimizers` update), score them, and take one optimizer
/// step at the learning rates scaled by `lr_multiplier`;
/// the gradients are averaged across ranks, so the step is that of all ranks' problems together,
/// and the statistics are the whole step's on every rank.
#[allow(clippy::too_many_arguments)] // the policy, its optimizers, the step's data and the communicator
pub fn rl_step_on(
    comm: &dyn Communicator,
    model: &GPT,
    engine: &Engine,
    optimizers: &mut Optimizers,
    vars: &[Var],
    task: &dyn Task,
    problems: impl ExactSizeIterator<Item = usize>,
    rollout: &RolloutArgs,
    step: usize,
    pad_id: u32,
    lr_multiplier: f64,
) -> Result<StepStats> {
    let num_problems = problems.len();
    let passes = rollout.num_samples / rollout.device_batch_size;
    let device = model.rotary().0.device().clone();
    let mut grads = GradStore::default();
    let (mut reward_sum, mut length_sum, mut samples, mut loss_sum) = (0.0, 0usize, 0usize, 0.0);
    for index in problems {
        // every group of rows is its own generation with its own seed, as in the original
        let mut groups = Vec::with_capacity(passes);
        for group in 0..passes {
            let seed = rollout_seed(step, index, group);
            let sampled = sample_problem(task, engine, index, &rollout.options(rollout.device_batch_size, seed))?;
            let rewards: Vec<f64> =
                sampled.completions(engine.tokenizer()).iter().map(|c| task.reward(&sampled.example, c)).collect();
            groups.push((sampled.rows, sampled.masks, rewards));
        }
        let all: Vec<f64> = groups.iter().flat_map(|(_, _, r)| r.iter().copied()).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        reward_sum += all.iter().sum::<f64>();
        samples += all.len();
        for (rows, masks, rewards) in groups {
            length_sum += rows.iter().map(Vec::len).sum::<usize>();
            let advantages: Vec<f32> = rewards.iter().map(|r| (r - mean) as f32).collect();
            let loss = pg_loss(model, &rows, &masks, &advantages, pad_id, &device)?;
            let loss = (loss / (passes * num_problems) as f64)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            accumulate_grads(&mut grads, vars, &loss)?;
        }
    }
    let mut totals = [loss_sum, reward_sum, length_sum as f64, samples as f64];
    comm.all_reduce_sum_f64(&mut totals)?;
    let [loss_sum, reward_sum, length_sum, samples] = totals;
    let loss_sum = loss_sum / comm.world_size() as f64;
    // The reduced loss is the same on every rank, so all ranks stop here together.
    if !loss_sum.is_finite() {
        bail!("the policy-gradient loss is {loss_sum}: training diverged; lower the learning rates");
    }
    optimizers.set_lr_multiplier(lr_multiplier);
    // Each rank's loss is divided by its own problem count, so the average of the gradients over
    // ranks is the gradient of the loss of all the step's problems (every rank has as many).
    update_on(comm, optimizers, grads, 0.0)?;
    Ok(StepStats {
        mean_reward: reward_sum / samples.max(1.0),
        mean_length: length_sum / samples.max(1.0),
        loss: loss_sum,
    })
}

/// A seed per (step, problem, group) so that every rollout differs and a rerun repeats them.
fn rollout_seed(step: usize, index: usize, group: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in [step, index, group] {
        h = (h ^ v as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h & 0x7fff_ffff
}

/// The negated policy-gradient objective of one group of sampled rows: −Σ log p(token) ×
/// advantage of its row over the sampled tokens, divided by their number. Rows are padded with
/// `pad_id`; targets are -1 where the mask is 0 (prompt, forced tool output) and on padding.
pub fn pg_loss(
    model: &GPT,
    rows: &[Vec<u32>],
    masks: &[Vec<u8>],
    advantages: &[f32],
    pad_id: u32,
    device: &Device,
) -> Result<Tensor> {
    let conversations: Vec<(Vec<u32>, Vec<u8>)> = rows.iter().cloned().zip(masks.iter().cloned()).collect();
    let (inputs, targets, cols) = super::sft::collate(&conversations, pad_id);
    let valid = targets.iter().filter(|&&t| t >= 0).count().max(1);
    let n = rows.len();
    let x = Tensor::from_vec(inputs, (n, cols), device)?;
    let y = Tensor::from_vec(targets, (n, cols), device)?;
    // per-token cross-entropy is −log p(target), 0 where the target is ignored
    let nll = model.loss(&x, &y, Reduction::PerToken)?.reshape((n, cols))?;
    let adv = Tensor::from_slice(advantages, (n, 1), device)?;
    Ok((nll.broadcast_mul(&adv)?.sum_all()? / valid as f64)?)
}

/// pass@1..k on the first `problems` problems of `task`, k = the device batch size: the fraction
/// of problems where any of the first j samples is right, for each j.
pub fn evaluate_pass_at_k(
    engine: &Engine,
    task: &dyn Task,
    problems: usize,
    rollout: &RolloutArgs,
    step: usize,
) -> Result<Vec<f64>> {
    evaluate_pass_at_k_on(&SingleProcess, engine, task, problems, rollout, step)
}

/// [`evaluate_pass_at_k`] as one rank of `comm`: this rank samples its stride of the problems (a
/// problem's seed does not depend on the rank) and the pass counts are added across ranks.
pub fn evaluate_pass_at_k_on(
    comm: &dyn Communicator,
    engine: &Engine,
    task: &dyn Task,
    problems: usize,
    rollout: &RolloutArgs,
    step: usize,
) -> Result<Vec<f64>> {
    let k = rollout.device_batch_size;
    let mut passes = vec![0f64; k];
    for index in rank_stride(comm, 0, problems) {
        let seed = rollout_seed(step, index, usize::MAX);
        let (_, outcomes) = grade_samples(task, engine, index, &rollout.options(k, seed))?;
        for (j, pass) in passes.iter_mut().enumerate() {
            *pass += f64::from(u8::from(outcomes[..=j].iter().any(|&o| o)));
        }
    }
    comm.all_reduce_sum_f64(&mut passes)?;
    Ok(passes.iter().map(|&p| p / problems.max(1) as f64).collect())
}
