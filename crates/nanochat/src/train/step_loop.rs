//! The training loop that pretraining (`base.rs`) and midtraining (`mid.rs`) share, from the
//! start step (0, or the step of the checkpoint a run resumes from) to the horizon: validation
//! bits per byte every `eval_every` steps and at the end, greedy samples every `sample_every`
//! steps, a checkpoint every `save_every` steps and at the end, and in between one optimizer step
//! per iteration at the schedule's learning rate and Muon's momentum warm-up, the debiased loss
//! EMA, one metrics record per step and the progress bar. Rank 0 alone logs and writes.
//!
//! What differs between the stages is their data ([`StageData`]: micro-batches, validation, and
//! what a checkpoint keeps of the data position) and their settings ([`StepLoop`]). A checkpoint
//! at step N holds the state after N steps, the loss EMA included, so a resumed run continues as
//! if never interrupted.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use super::{
    optimizer_step_on, rank_progress_bar, sample_completions, save_checkpoint_on, setup_optimizers_on, LossEma,
    MetricsLog,
};
use crate::checkpoint::{self, Checkpoint, LoopState, Meta};
use crate::dist::Communicator;
use crate::model::{GPTConfig, Kernels, GPT};
use crate::optim::{muon_momentum, LrSchedule, OptimConfig};

/// This rank's micro-batches of one optimizer step, as (inputs, targets) of shape (B, T).
pub type MicroBatches<'a> = Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + 'a>;

/// A stage's data, as the loop uses it.
pub trait StageData {
    /// This rank's micro-batches of optimizer step `step` (the loop takes as many as a step has).
    fn micro_batches<'a>(&'a mut self, step: usize, comm: &'a dyn Communicator) -> MicroBatches<'a>;

    /// Validation bits per byte of `model`, the same on every rank of `comm`.
    fn validation_bpb(&mut self, model: &GPT, comm: &dyn Communicator) -> Result<f64>;

    /// Records in `meta` (rank 0's is the one saved) what the checkpoint needs of the data
    /// position to resume exactly. Called on every rank, so it may communicate.
    fn checkpoint_meta(&self, comm: &dyn Communicator, meta: &mut Meta) -> Result<()>;
}

/// The settings of one run of the loop.
pub struct StepLoop<'a> {
    /// The progress bar's label, e.g. "base train".
    pub name: &'static str,
    /// The kernels the model and its optimizers run: the stage's own choice (`--bf16`), never
    /// inherited from an earlier stage of the same process.
    pub kernels: Kernels,
    pub num_iterations: usize,
    /// This rank's micro-batches per optimizer step.
    pub accum_steps: usize,
    /// Tokens per optimizer step, over all ranks.
    pub tokens_per_step: usize,
    pub schedule: LrSchedule,
    pub optim: OptimConfig,
    /// Clip the gradient's global norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Validation every this many steps (0: never).
    pub eval_every: usize,
    /// Greedy samples every this many steps (0: never).
    pub sample_every: usize,
    /// A checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// The run's options, saved in every checkpoint's meta.
    pub run_config: serde_json::Value,
    /// Where the checkpoints and the metrics log go.
    pub out_dir: &'a Path,
}

/// What a run of the loop starts from.
pub struct Start {
    pub model: GPT,
    pub varmap: VarMap,
    /// The optimizer state of the checkpoint resumed from.
    pub optim_state: Option<HashMap<String, Tensor>>,
    pub step: usize,
    pub loop_state: LoopState,
}

impl Start {
    /// A run from step 0 with `model`, whose parameters `varmap` holds.
    pub fn fresh(model: GPT, varmap: VarMap) -> Start {
        Start { model, varmap, optim_state: None, step: 0, loop_state: LoopState::default() }
    }

    /// A run resumed from `ckpt`, loaded by [`load_resume_checkpoint`].
    pub fn resumed(ckpt: Checkpoint, device: &Device) -> Result<Start> {
        let (model, varmap) = checkpoint::model_from_checkpoint(&ckpt, device)?;
        let Checkpoint { meta, optim, .. } = ckpt;
        Ok(Start { model, varmap, optim_state: Some(optim), step: meta.step, loop_state: meta.loop_state })
    }
}

/// The checkpoint of `step` in `out_dir`, with its optimizer state, for `--resume-from-step`: it
/// must come from this tokenizer (its `fingerprint`) and be of this run's model shape.
pub fn load_resume_checkpoint(
    out_dir: &Path,
    step: usize,
    device: &Device,
    fingerprint: &str,
    model_config: &GPTConfig,
) -> Result<Checkpoint> {
    let ckpt = checkpoint::load(out_dir, step, device, true, Some(fingerprint))
        .with_context(|| format!("resuming from step {step}: pick another --resume-from-step"))?;
    if &ckpt.meta.model_config != model_config {
        bail!(
            "the checkpoint of step {step} in {} is of the model {:?} but this run's is {model_config:?}: resume \
             with the options of the original run (and from the model it started from)",
            out_dir.display(),
            ckpt.meta.model_config
        );
    }
    Ok(ckpt)
}

/// What a run did, for the caller (and tests).
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The step the run started at (the resumed step, or 0).
    pub start_step: usize,
    /// The loss of every step from `start_step` on (mean over the step's micro-batches).
    pub losses: Vec<f64>,
    pub num_iterations: usize,
    /// The last validation bits per byte, if any evaluation ran.
    pub val_bpb: Option<f64>,
    /// Training throughput over the run, tokens per second.
    pub tokens_per_sec: f64,
    /// The kernels the run's model and optimizers ran.
    pub kernels: Kernels,
}

impl StepLoop<'_> {
    /// Runs the loop as one rank of `comm` from `start` on `data`; `intro` is logged first. Every
    /// rank must call it with the same settings. Every rank returns the same losses; only rank 0
    /// writes anything.
    pub fn run(
        &self,
        comm: &dyn Communicator,
        tokenizer: &bpe::Tokenizer,
        start: Start,
        data: &mut dyn StageData,
        intro: String,
    ) -> Result<TrainReport> {
        let Start { model, varmap, optim_state, step: start_step, mut loop_state } = start;
        let num_iterations = self.num_iterations;
        if start_step > num_iterations {
            bail!("cannot resume from step {start_step}: the run is only {num_iterations} steps long");
        }
        let model = model.with_kernels(self.kernels);
        let model_config = model.config().clone();
        let fingerprint = tokenizer.fingerprint();
        // Sharded across the ranks: each keeps (and updates) its own parameters' state.
        let (mut optimizers, vars) = setup_optimizers_on(comm, &model, &varmap, &self.optim, optim_state)?;
        let metrics = MetricsLog::open(comm, self.out_dir, start_step)?;
        let flops_per_token = model_config.estimate_flops() as f64;

        let pb = rank_progress_bar(comm, num_iterations, self.name);
        pb.set_position(start_step as u64);
        let say = |line: String| super::log_on(comm, &pb, line);
        say(intro);
        let mut ema = LossEma { value: loop_state.smooth_train_loss };
        let mut losses = Vec::new();
        let mut step = start_step;
        let mut run_time = 0.0;
        loop {
            let last_step = step == num_iterations;
            if self.eval_every > 0 && (last_step || step % self.eval_every == 0) {
                let bpb = data.validation_bpb(&model, comm)?;
                loop_state.val_bpb = Some(bpb);
                loop_state.min_val_bpb = Some(loop_state.min_val_bpb.map_or(bpb, |m| m.min(bpb)));
                say(format!("step {step:05} | validation bpb {bpb:.4}"));
                metrics.append(&json!({ "step": step, "val_bpb": bpb }))?;
            }
            if comm.is_root() && self.sample_every > 0 && (last_step || (step > 0 && step % self.sample_every == 0)) {
                let samples = sample_completions(&model, tokenizer)?;
                samples.iter().for_each(|s| say(format!("  {s}")));
                metrics.append(&json!({ "step": step, "samples": samples }))?;
            }
            let periodic_save = self.save_every > 0 && step % self.save_every == 0 && step != start_step;
            if last_step || periodic_save {
                let mut meta = Meta::new(step, model_config.clone(), fingerprint.clone());
                meta.loop_state = LoopState { smooth_train_loss: ema.value, ..loop_state.clone() };
                meta.run_config = self.run_config.clone();
                data.checkpoint_meta(comm, &mut meta)?;
                save_checkpoint_on(comm, self.out_dir, &varmap, &optimizers, &meta)?;
                say(format!("step {step:05} | saved checkpoint in {}", self.out_dir.display()));
            }
            if last_step {
                break;
            }

            let t0 = Instant::now();
            let lr_multiplier = self.schedule.multiplier(step);
            let momentum = muon_momentum(step);
            let stats = optimizer_step_on(
                comm,
                &model,
                &mut optimizers,
                &vars,
                data.micro_batches(step, comm),
                self.accum_steps,
                self.grad_clip,
                lr_multiplier,
                Some(momentum),
            )
            .with_context(|| format!("step {step}"))?;
            let dt = t0.elapsed().as_secs_f64();

            let smooth_loss = ema.update(stats.loss, step);
            losses.push(stats.loss);
            loop_state.total_training_time += dt;
            run_time += dt;
            let tokens_per_sec = self.tokens_per_step as f64 / dt;
            pb.set_message(format!(
                "loss {smooth_loss:.4} | lrm {lr_multiplier:.2} | {tokens_per_sec:.0} tok/s | {:.2} TFLOP/s",
                flops_per_token * tokens_per_sec / 1e12
            ));
            pb.inc(1);
            metrics.append(&json!({
                "step": step, "loss": stats.loss, "smooth_loss": smooth_loss, "lr_multiplier": lr_multiplier,
                "muon_momentum": momentum, "grad_norm": stats.grad_norm, "dt": dt,
                "comm_seconds": stats.comm_seconds, "tokens_per_sec": tokens_per_sec,
                "flops_per_sec": flops_per_token * tokens_per_sec,
                "total_training_time": loop_state.total_training_time,
            }))?;
            step += 1;
        }
        pb.finish();
        let trained_steps = (num_iterations - start_step) as f64;
        let tokens_per_sec = if run_time > 0.0 { trained_steps * self.tokens_per_step as f64 / run_time } else { 0.0 };
        Ok(TrainReport {
            start_step,
            losses,
            num_iterations,
            val_bpb: loop_state.val_bpb,
            tokens_per_sec,
            kernels: model.kernels(),
        })
    }
}
