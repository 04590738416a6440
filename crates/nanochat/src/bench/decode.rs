//! `nanochat bench decode`: inference speed on the CPU, native path (`model::decode`) and the candle
//! GPT side by side, measured like `bench/torch_decode.py` measures the PyTorch original:
//! - time to first token for prompts of 100 and 512 tokens (prefill + argmax of the last position);
//! - decode tokens/s at batch 1 and 8 after a 100-token prompt (greedy steps, B tokens each);
//! - a memory-bandwidth triad (`a = b + s·c`, arrays far larger than the caches, all rayon
//!   threads), and the fraction of it batch-1 decode reaches: a decode step reads every weight
//!   once, so weight bytes × tokens/s over the triad bandwidth says how close to the memory limit
//!   the kernels run.
//!
//! Every figure is the median of `--runs` runs after one warm-up (the triad: the best run). Prints a
//! table and one JSON line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, IndexOp, Tensor};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::json;

use crate::checkpoint;
use crate::model::decode::DecodeModel;
use crate::model::{KvCache, GPT};

#[derive(Args, Debug)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    pub shape: super::ModelShape,
    /// Benchmark a trained model instead: a checkpoint directory (its latest step).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Runs per measurement (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Decode steps per decode run.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Skip the candle path (slow).
    #[arg(long)]
    pub skip_candle: bool,
}

/// Prompt length of the decode runs.
const DECODE_PROMPT: usize = 100;
/// Prompt lengths of the time-to-first-token runs.
const TTFT_PROMPTS: [usize; 2] = [100, 512];
/// Batch sizes of the decode runs.
const BATCHES: [usize; 2] = [1, 8];
/// Elements per triad array: 64 MiB of f32 each, twice the L3 of the dev machine.
const TRIAD_LEN: usize = 1 << 24;

/// The figures of one implementation.
#[derive(Debug, Default)]
struct Figures {
    ttft_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
}

pub fn run(args: &DecodeBenchArgs) -> Result<()> {
    let gpt = build_model(args)?;
    let config = gpt.config().clone();
    let runs = args.runs.max(1);
    let mut rng = StdRng::seed_from_u64(0);
    let mut prompt = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..config.vocab_size as u32)).collect() };
    let ttft_prompts: Vec<Vec<u32>> = TTFT_PROMPTS.iter().map(|&n| prompt(n)).collect();
    let decode_prompt = prompt(DECODE_PROMPT);
    let new = args.new_tokens.max(1);

    let native = DecodeModel::from_gpt(&gpt)?;
    let mut fast = Figures::default();
    for p in &ttft_prompts {
        fast.ttft_ms.push(1e3 * median(runs, || native_ttft(&native, p))?);
    }
    for &b in &BATCHES {
        fast.decode_tok_s.push((b * new) as f64 / median(runs, || native_decode(&native, &decode_prompt, b, new))?);
    }
    let slow = if args.skip_candle {
        None
    } else {
        let mut slow = Figures::default();
        for p in &ttft_prompts {
            slow.ttft_ms.push(1e3 * median(runs, || candle_ttft(&gpt, p))?);
        }
        for &b in &BATCHES {
            slow.decode_tok_s.push((b * new) as f64 / median(runs, || candle_decode(&gpt, &decode_prompt, b, new))?);
        }
        Some(slow)
    };
    let triad_gb_s = triad_bandwidth(runs)? / 1e9;
    let bytes = native.weight_bytes_per_step();
    let fraction = bytes as f64 * fast.decode_tok_s[0] / (triad_gb_s * 1e9);

    println!(
        "nanochat bench decode: {config:?}, {} rayon threads, median of {runs} runs",
        rayon::current_num_threads()
    );
    println!("{:<28} {:>12} {:>12}", "", "native", "candle");
    let cell =
        |f: Option<&Figures>, pick: &dyn Fn(&Figures) -> f64| f.map_or("-".into(), |f| format!("{:.1}", pick(f)));
    for (i, n) in TTFT_PROMPTS.iter().enumerate() {
        let pick = |f: &Figures| f.ttft_ms[i];
        println!(
            "{:<28} {:>12} {:>12}",
            format!("TTFT {n}-token prompt (ms)"),
            cell(Some(&fast), &pick),
            cell(slow.as_ref(), &pick)
        );
    }
    for (i, b) in BATCHES.iter().enumerate() {
        let pick = |f: &Figures| f.decode_tok_s[i];
        println!(
            "{:<28} {:>12} {:>12}",
            format!("decode batch {b} (tok/s)"),
            cell(Some(&fast), &pick),
            cell(slow.as_ref(), &pick)
        );
    }
    println!(
        "triad bandwidth {triad_gb_s:.1} GB/s; batch-1 decode reads {:.1} MB of weights per token = {:.1} GB/s, \
         {:.0}% of triad",
        bytes as f64 / 1e6,
        bytes as f64 * fast.decode_tok_s[0] / 1e9,
        100.0 * fraction
    );
    let figures = |f: &Figures| {
        json!({
            "ttft_ms_100": round2(f.ttft_ms[0]),
            "ttft_ms_512": round2(f.ttft_ms[1]),
            "decode_tok_s_b1": round2(f.decode_tok_s[0]),
            "decode_tok_s_b8": round2(f.decode_tok_s[1]),
        })
    };
    let line = json!({
        "impl": "rust",
        "threads": rayon::current_num_threads(),
        "config": config,
        "native": figures(&fast),
        "candle": slow.as_ref().map(figures),
        "triad_gb_s": round2(triad_gb_s),
        "weight_bytes_per_token": bytes,
        "b1_bandwidth_fraction": round2(fraction * 100.0) / 100.0,
    });
    println!("{line}");
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The random model (v0 init) of the flags, or the checkpoint's model.
fn build_model(args: &DecodeBenchArgs) -> Result<GPT> {
    let device = Device::Cpu;
    if let Some(dir) = &args.checkpoint {
        let step = checkpoint::latest_step(dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))?;
        let ckpt = checkpoint::load(dir, step, &device, false, None)?;
        return Ok(checkpoint::model_from_checkpoint(&ckpt, &device)?.0);
    }
    let config = args.shape.config();
    Ok(GPT::init(&config, 0, &device)?.0)
}

/// Median seconds of `runs` calls of `f` (which returns its own seconds), after one warm-up.
fn median(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    f()?;
    let mut times = (0..runs).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// First index of the largest logit, as greedy sampling picks it.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn native_ttft(model: &DecodeModel, prompt: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(1, prompt.len() + 1)?;
    let start = Instant::now();
    let first = argmax(model.prefill(&mut cache, 0, prompt)?);
    std::hint::black_box(first);
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds for `new` greedy steps of `batch` rows after prefilling `prompt` (not timed) into slot 0
/// and copying it into the others, as the engine does.
fn native_decode(model: &DecodeModel, prompt: &[u32], batch: usize, new: usize) -> Result<f64> {
    let mut cache = model.new_cache(batch, prompt.len() + new)?;
    let first = argmax(model.prefill(&mut cache, 0, prompt)?);
    for slot in 1..batch {
        cache.copy_slot(0, slot)?;
    }
    let vocab = model.config().vocab_size;
    let mut rows: Vec<(usize, u32)> = (0..batch).map(|slot| (slot, first)).collect();
    let start = Instant::now();
    for _ in 0..new {
        let logits = model.step(&mut cache, &rows)?;
        for (row, l) in rows.iter_mut().zip(logits.chunks_exact(vocab)) {
            row.1 = argmax(l);
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn candle_ttft(gpt: &GPT, prompt: &[u32]) -> Result<f64> {
    let mut cache = KvCache::with_capacity(gpt.config().n_layer, prompt.len() + 1);
    let start = Instant::now();
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let logits = gpt.forward_cached_last(&ids, &mut cache)?.i((0, 0))?.to_vec1::<f32>()?;
    std::hint::black_box(argmax(&logits));
    Ok(start.elapsed().as_secs_f64())
}

/// The candle counterpart of [`native_decode`], as the engine's candle backend runs it.
fn candle_decode(gpt: &GPT, prompt: &[u32], batch: usize, new: usize) -> Result<f64> {
    let mut cache = KvCache::with_capacity(gpt.config().n_layer, prompt.len() + new);
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let first = argmax(&gpt.forward_cached_last(&ids, &mut cache)?.i((0, 0))?.to_vec1::<f32>()?);
    let mut cache = if batch == 1 { cache } else { cache.expand_batch(batch)? };
    let mut column = vec![first; batch];
    let start = Instant::now();
    for _ in 0..new {
        let ids = Tensor::from_vec(column.clone(), (batch, 1), &Device::Cpu)?;
        let logits = gpt.forward_cached(&ids, &mut cache)?.i((.., 0, ..))?.to_vec2::<f32>()?;
        column = logits.iter().map(|l| argmax(l)).collect();
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Bytes per second of `a[i] = b[i] + s * c[i]` (STREAM's triad: two arrays read, one written)
/// over arrays far larger than the caches, on all rayon threads. The best of the runs, as STREAM
/// reports it: the figure is a ceiling, and on a shared machine the median mostly measures the
/// neighbours.
fn triad_bandwidth(runs: usize) -> Result<f64> {
    let (b, c) = (vec![1.0f32; TRIAD_LEN], vec![2.0f32; TRIAD_LEN]);
    let mut a = vec![0.0f32; TRIAD_LEN];
    let chunk = TRIAD_LEN.div_ceil(4 * rayon::current_num_threads());
    let mut best = f64::INFINITY;
    median(runs.max(5), || {
        let start = Instant::now();
        a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).zip(c.par_chunks(chunk)).for_each(|((a, b), c)| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.min(secs);
        Ok(secs)
    })?;
    std::hint::black_box(&a);
    Ok((3 * 4 * TRIAD_LEN) as f64 / best)
}
