//! `nanochat bench train`: training-step throughput of the GPT on random tokens, split into
//! forward, backward and optimizer, with the project's real optimizer setup (Muon + AdamW,
//! gradient clipping at 1.0), so that it measures what `nanochat base train` spends per step.
//! Its PyTorch counterpart is `bench/torch_train.py`; both print one JSON line to compare.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};

use super::median;
use crate::model::fused::Gemm;
use crate::model::{Kernels, GPT};
use crate::optim::{clip_grad_norm, muon_momentum, setup_optimizers, OptimConfig};

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    pub shape: super::ModelShape,
    /// Rows per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Untimed steps first (allocator and caches warm up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Seed of the weights and of the random tokens.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Run the unfused candle composition instead of the fused CPU kernels, for comparison.
    #[arg(long)]
    pub unfused: bool,
    /// Run the step's GEMMs (the blocks' projections and the lm_head, forward and backward) in bf16
    /// (AVX-512 BF16, f32 accumulation) where the CPU has it; weights, optimizer state and the rest
    /// of the step stay f32.
    #[arg(long)]
    pub bf16: bool,
}

/// Seconds spent in each phase of one step.
#[derive(Clone, Copy, Debug, Default)]
struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

impl StepTimes {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }
}

pub fn run(args: &TrainBenchArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let kernels = Kernels { fused: !args.unfused, bf16: args.bf16 };
    let bf16_active = kernels.gemm() == Gemm::Bf16;
    if args.bf16 && !bf16_active {
        eprintln!(
            "bench train: --bf16 asked for, but {}: the GEMMs stay f32",
            if args.unfused { "the unfused path has no bf16 GEMM" } else { "this CPU lacks AVX-512 BF16" }
        );
    }
    let device = Device::Cpu;
    let config = args.shape.config();
    let (model, varmap) = GPT::init(&config, args.seed, &device)?;
    let model = model.with_kernels(kernels);
    let mut optimizers = setup_optimizers(&model, &varmap, &OptimConfig::default())?;
    let vars: Vec<_> = optimizers.vars().cloned().collect();
    let (b, t) = (args.batch, args.shape.seq_len);
    let tokens_per_step = b * t;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let threads = rayon::current_num_threads();
    eprintln!(
        "bench train: {} params, {} layers, n_embd {}, heads {}/{} (q/kv), seq {t}, batch {b}, vocab {}, {} kernels, GEMMs in {}, {threads} threads",
        config.num_params(),
        config.n_layer,
        config.n_embd,
        config.n_head,
        config.n_kv_head,
        config.vocab_size,
        if args.unfused { "unfused" } else { "fused" },
        if bf16_active { "bf16 (AVX-512 BF16)" } else { "f32" },
    );

    let mut times = Vec::with_capacity(args.steps);
    let mut last_loss = f64::NAN;
    for step in 0..args.warmup + args.steps {
        // Fresh random tokens every step, as a data loader would give.
        let ids: Vec<u32> = (0..tokens_per_step + b).map(|_| rng.random_range(0..args.shape.vocab as u32)).collect();
        let rows = Tensor::from_vec(ids, (b, t + 1), &device)?;
        let (x, y) = (
            rows.narrow(1, 0, t)?.contiguous()?,
            rows.narrow(1, 1, t)?.contiguous()?.to_dtype(candle_core::DType::I64)?,
        );

        let start = Instant::now();
        let loss = model.forward(&x, Some(&y))?;
        last_loss = f64::from(loss.to_scalar::<f32>()?);
        let forward = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let mut grads = loss.backward()?;
        let backward = start.elapsed().as_secs_f64();

        let start = Instant::now();
        clip_grad_norm(&vars, &mut grads, 1.0)?;
        optimizers.set_muon_momentum(muon_momentum(step));
        optimizers.step(&grads)?;
        drop(grads);
        let optimizer = start.elapsed().as_secs_f64();

        let st = StepTimes { forward, backward, optimizer };
        let timed = step >= args.warmup;
        eprintln!(
            "{} step {:>3}: {:7.3} s (forward {:.3}, backward {:.3}, optimizer {:.3})  loss {:.4}  {:8.1} tok/s",
            if timed { "timed " } else { "warmup" },
            step,
            st.total(),
            st.forward,
            st.backward,
            st.optimizer,
            last_loss,
            tokens_per_step as f64 / st.total()
        );
        if timed {
            times.push(st);
        }
    }
    if !last_loss.is_finite() {
        bail!("the loss is {last_loss}: the benchmark diverged");
    }

    let mut totals: Vec<f64> = times.iter().map(StepTimes::total).collect();
    let mut fwd: Vec<f64> = times.iter().map(|s| s.forward).collect();
    let mut bwd: Vec<f64> = times.iter().map(|s| s.backward).collect();
    let mut opt: Vec<f64> = times.iter().map(|s| s.optimizer).collect();
    let step_s = median(&mut totals);
    let (fwd, bwd, opt) = (median(&mut fwd), median(&mut bwd), median(&mut opt));
    let tok_s = tokens_per_step as f64 / step_s;
    let peak_rss = crate::common::peak_rss_mb();
    eprintln!(
        "median step {step_s:.3} s: forward {fwd:.3} s ({:.0}%), backward {bwd:.3} s ({:.0}%), optimizer {opt:.3} s ({:.0}%)",
        100.0 * fwd / step_s,
        100.0 * bwd / step_s,
        100.0 * opt / step_s
    );
    eprintln!(
        "median {tok_s:.1} tokens/s, {:.1} GFLOP/s by estimate_flops, peak RSS {} MB",
        config.estimate_flops() as f64 * tokens_per_step as f64 / step_s / 1e9,
        peak_rss.map_or("?".to_string(), |m| format!("{m:.0}"))
    );
    let json = serde_json::json!({
        "bench": "train",
        "impl": if args.unfused { "rust-candle-unfused" } else { "rust-candle-fused" },
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_kv_head": config.n_kv_head,
        "seq_len": t,
        "batch": b,
        "vocab": config.vocab_size,
        "threads": threads,
        "bf16_gemm": bf16_active,
        "steps": args.steps,
        "median_step_s": step_s,
        "forward_s": fwd,
        "backward_s": bwd,
        "optimizer_s": opt,
        "tokens_per_s": tok_s,
        "peak_rss_mb": peak_rss,
        "final_loss": last_loss,
    });
    println!("{json}");
    Ok(())
}
