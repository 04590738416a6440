//! `nanochat bench decode`: inference speed on the CPU, native path (`model::decode`) and the candle
//! GPT side by side, measured like `bench/torch_decode.py` measures the PyTorch original:
//! - time to first token for prompts of 100 and 512 tokens (prefill + argmax of the last position);
//! - decode tokens/s at batch 1 and 8 after a 100-token prompt (greedy steps, B tokens each);
//! - a memory-bandwidth triad (`a = b + s·c`, arrays far larger than the caches, all rayon
//!   threads), and the fraction of it batch-1 decode reaches: a decode step reads every weight
//!   once, so weight bytes × tokens/s over the triad bandwidth says how close to the memory limit
//!   the kernels run.
//!
//! `--weights f32,bf16,int8` measures the native path with its matrices in each format, back to
//! back (one column each), so their ratios hold even on a busy machine. `--quality N` instead scores
//! a checkpoint in all three formats on N validation rows (loss, bits per byte, perplexity change).
//!
//! Every figure is the median of `--runs` runs after one warm-up (the triad: the best run). Prints a
//! table and one JSON line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, IndexOp, Tensor};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::json;

use super::quality;
use crate::checkpoint;
use crate::data::dataset::Split;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::ShardArgs;
use crate::model::decode::{DecodeModel, WeightFormat};
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
    /// Formats of the native path's matrices to measure, comma-separated (f32, bf16, int8).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub weights: Vec<WeightFormat>,
    /// Instead of speed, score the --checkpoint model in f32, bf16 and int8 on this many
    /// validation rows of its sequence length (from the last shard, see --shard-dir and --data-dir).
    #[arg(long, requires = "checkpoint")]
    pub quality: Option<usize>,
    /// Where the validation shard for --quality is (the last shard).
    #[command(flatten)]
    pub shards: ShardArgs,
}

/// Prompt length of the decode runs.
const DECODE_PROMPT: usize = 100;
/// Prompt lengths of the time-to-first-token runs.
const TTFT_PROMPTS: [usize; 2] = [100, 512];
/// Batch sizes of the decode runs.
const BATCHES: [usize; 2] = [1, 8];
/// Bytes per triad array: at least 64 MiB, and four times the last-level cache where the system
/// says how big it is (a server's L3 can hold hundreds of MiB), at most 1 GiB.
const TRIAD_MIN_BYTES: usize = 64 << 20;
const TRIAD_MAX_BYTES: usize = 1 << 30;

/// The figures of one implementation.
#[derive(Debug, Default)]
struct Figures {
    ttft_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
}

pub fn run(args: &DecodeBenchArgs) -> Result<()> {
    if let Some(rows) = args.quality {
        return run_quality(args, rows);
    }
    let gpt = build_model(args, None)?;
    let config = gpt.config().clone();
    let runs = args.runs.max(1);
    let mut rng = StdRng::seed_from_u64(0);
    let mut prompt = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..config.vocab_size as u32)).collect() };
    let ttft_prompts: Vec<Vec<u32>> = TTFT_PROMPTS.iter().map(|&n| prompt(n)).collect();
    let decode_prompt = prompt(DECODE_PROMPT);
    let new = args.new_tokens.max(1);

    let mut formats = args.weights.clone();
    formats.dedup();
    ensure!(!formats.is_empty(), "--weights needs at least one format");
    // one native model at a time, so that only one copy of the weights competes for the caches
    let mut natives = Vec::with_capacity(formats.len());
    for &format in &formats {
        let native = DecodeModel::from_gpt_with(&gpt, format)?;
        let mut fast = Figures::default();
        for p in &ttft_prompts {
            fast.ttft_ms.push(1e3 * median(runs, || native_ttft(&native, p))?);
        }
        for &b in &BATCHES {
            fast.decode_tok_s.push((b * new) as f64 / median(runs, || native_decode(&native, &decode_prompt, b, new))?);
        }
        natives.push((format, native.weight_bytes_per_step(), fast));
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
    let fraction = |bytes: usize, f: &Figures| bytes as f64 * f.decode_tok_s[0] / (triad_gb_s * 1e9);

    println!(
        "nanochat bench decode: {config:?}, {} rayon threads, median of {runs} runs",
        rayon::current_num_threads()
    );
    let mut header = format!("{:<28}", "");
    for (format, _, _) in &natives {
        header.push_str(&format!(" {:>12}", format!("native {format}")));
    }
    println!("{header} {:>12}", "candle");
    let cell =
        |f: Option<&Figures>, pick: &dyn Fn(&Figures) -> f64| f.map_or("-".into(), |f| format!("{:.1}", pick(f)));
    let print_row = |label: String, pick: &dyn Fn(&Figures) -> f64| {
        let mut line = format!("{label:<28}");
        for (_, _, fast) in &natives {
            line.push_str(&format!(" {:>12}", cell(Some(fast), pick)));
        }
        println!("{line} {:>12}", cell(slow.as_ref(), pick));
    };
    for (i, n) in TTFT_PROMPTS.iter().enumerate() {
        print_row(format!("TTFT {n}-token prompt (ms)"), &|f: &Figures| f.ttft_ms[i]);
    }
    for (i, b) in BATCHES.iter().enumerate() {
        print_row(format!("decode batch {b} (tok/s)"), &|f: &Figures| f.decode_tok_s[i]);
    }
    println!("triad bandwidth {triad_gb_s:.1} GB/s");
    for (format, bytes, fast) in &natives {
        println!(
            "{format:>4} weights: batch-1 decode reads {:.1} MB per token = {:.1} GB/s, {:.0}% of triad",
            *bytes as f64 / 1e6,
            *bytes as f64 * fast.decode_tok_s[0] / 1e9,
            100.0 * fraction(*bytes, fast)
        );
    }
    let figures = |f: &Figures| {
        json!({
            "ttft_ms_100": round2(f.ttft_ms[0]),
            "ttft_ms_512": round2(f.ttft_ms[1]),
            "decode_tok_s_b1": round2(f.decode_tok_s[0]),
            "decode_tok_s_b8": round2(f.decode_tok_s[1]),
        })
    };
    // "native" and its byte figures are the first format's, as before formats existed; every
    // format's figures are under "formats"
    let (first_format, first_bytes, first) = &natives[0];
    let by_format: serde_json::Map<String, serde_json::Value> = natives
        .iter()
        .map(|(format, bytes, fast)| {
            let mut entry = figures(fast);
            entry["weight_bytes_per_token"] = json!(bytes);
            entry["b1_bandwidth_fraction"] = json!(round2(fraction(*bytes, fast) * 100.0) / 100.0);
            (format.to_string(), entry)
        })
        .collect();
    let line = json!({
        "impl": "rust",
        "threads": rayon::current_num_threads(),
        "config": config,
        "weights": first_format,
        "native": figures(first),
        "formats": by_format,
        "candle": slow.as_ref().map(figures),
        "triad_gb_s": round2(triad_gb_s),
        "weight_bytes_per_token": first_bytes,
        "b1_bandwidth_fraction": round2(fraction(*first_bytes, first) * 100.0) / 100.0,
    });
    println!("{line}");
    Ok(())
}

/// `--quality N`: the checkpoint's loss and bits per byte on N validation rows with its matrices
/// in f32, bf16 and int8, and the change of each from f32.
fn run_quality(args: &DecodeBenchArgs, rows: usize) -> Result<()> {
    ensure!(rows > 0, "--quality needs at least one row");
    let tokenizer = crate::tokenizer::load()?;
    let gpt = build_model(args, Some(&tokenizer))?;
    let seq_len = gpt.config().sequence_len;
    let data_dir = args.shards.dir()?;
    let rows = validation_rows(&tokenizer, &data_dir, seq_len, rows)?;
    let token_bytes = tokenizer.token_bytes();
    println!(
        "nanochat bench decode --quality: {} validation rows of {} tokens from {}",
        rows.len(),
        seq_len + 1,
        data_dir.display()
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "weights", "MB/step", "loss", "bpb", "ppl vs f32", "bpb vs f32", "seconds"
    );
    let mut results = Vec::new();
    for format in WeightFormat::ALL {
        let model = DecodeModel::from_gpt_with(&gpt, format)?;
        let start = Instant::now();
        let q = quality::evaluate(&model, &rows, &token_bytes)?;
        let secs = start.elapsed().as_secs_f64();
        let base = results.first().map_or(q, |(_, _, b): &(WeightFormat, usize, quality::Quality)| *b);
        let ppl_change = 100.0 * (q.perplexity() / base.perplexity() - 1.0);
        let bpb_change = 100.0 * (q.bpb / base.bpb - 1.0);
        println!(
            "{:<8} {:>10.1} {:>10.5} {:>10.5} {:>11.3}% {:>11.3}% {:>10.1}",
            format.name(),
            model.weight_bytes_per_step() as f64 / 1e6,
            q.loss,
            q.bpb,
            ppl_change,
            bpb_change,
            secs
        );
        results.push((format, model.weight_bytes_per_step(), q));
    }
    let base = results[0].2;
    let entries: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(format, bytes, q)| {
            let entry = json!({
                "loss": q.loss,
                "bpb": q.bpb,
                "weight_bytes_per_token": bytes,
                "ppl_change_pct": 100.0 * (q.perplexity() / base.perplexity() - 1.0),
                "bpb_change_pct": 100.0 * (q.bpb / base.bpb - 1.0),
            });
            (format.to_string(), entry)
        })
        .collect();
    let line = json!({
        "impl": "rust",
        "quality_rows": rows.len(),
        "targets": base.targets,
        "config": gpt.config(),
        "formats": entries,
    });
    println!("{line}");
    Ok(())
}

/// The first `n` rows of `seq_len + 1` tokens of the validation split, packed as training packs
/// them (documents concatenated, each after a BOS), so every token after the first is a target.
fn validation_rows(tokenizer: &bpe::Tokenizer, data_dir: &Path, seq_len: usize, n: usize) -> Result<Vec<Vec<u32>>> {
    let cfg = LoaderConfig { epochs: Some(1), ..LoaderConfig::new(data_dir.to_path_buf(), Split::Val, 1, seq_len) };
    let mut rows = Vec::with_capacity(n);
    for batch in Loader::new(tokenizer, &cfg, None)?.take(n) {
        let batch = batch?;
        // stream packing: the targets are the inputs shifted by one, so the row is the inputs
        // plus the last target
        ensure!(
            batch.inputs.len() == seq_len
                && batch.targets.len() == seq_len
                && batch.inputs[1..].iter().zip(&batch.targets).all(|(&i, &t)| i64::from(i) == t),
            "the validation loader's targets are not its inputs shifted by one"
        );
        let Some(&last) = batch.targets.last() else { bail!("an empty validation row") };
        let mut row = batch.inputs;
        row.push(u32::try_from(last).context("a validation target outside the vocabulary")?);
        rows.push(row);
    }
    ensure!(!rows.is_empty(), "no validation rows in {}", data_dir.display());
    Ok(rows)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The random model (v0 init) of the flags, or the checkpoint's model (checked against
/// `tokenizer` when one is given).
fn build_model(args: &DecodeBenchArgs, tokenizer: Option<&bpe::Tokenizer>) -> Result<GPT> {
    let device = Device::Cpu;
    if let Some(dir) = &args.checkpoint {
        let step = checkpoint::latest_step(dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))?;
        let fingerprint = tokenizer.map(|t| t.fingerprint());
        let ckpt = checkpoint::load(dir, step, &device, false, fingerprint.as_deref())?;
        return Ok(checkpoint::model_from_checkpoint(&ckpt, &device)?.0);
    }
    let config = args.shape.config();
    Ok(GPT::init(&config, 0, &device)?.0)
}

/// Median seconds of `runs` calls of `f` (which returns its own seconds), after one warm-up.
fn median(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    f()?;
    let mut times = (0..runs).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    Ok(super::median(&mut times))
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
    let bytes = last_level_cache_bytes()
        .map_or(TRIAD_MIN_BYTES, |llc| llc.saturating_mul(4).clamp(TRIAD_MIN_BYTES, TRIAD_MAX_BYTES));
    let len = bytes / std::mem::size_of::<f32>();
    let (b, c) = (vec![1.0f32; len], vec![2.0f32; len]);
    let mut a = vec![0.0f32; len];
    let chunk = len.div_ceil(4 * rayon::current_num_threads());
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
    Ok((3 * 4 * len) as f64 / best)
}

/// The largest cache CPU 0 reports (Linux sysfs: `cache/index*/size`, e.g. "260M" or "32768K"),
/// or None where the system does not say.
fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("size")).ok())
        .filter_map(|size| {
            let size = size.trim();
            let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
            let scale = match unit {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => return None,
            };
            digits.parse::<usize>().ok()?.checked_mul(scale)
        })
        .max()
}
