//! `nanochat tok train` and `nanochat tok eval`: the tokenizer stage (the original's `tok_train.py`
//! and `tok_eval.py`).
//!
//! Training reads the training shards in order, caps each document at `--doc-cap` characters and
//! stops after `--max-chars` characters, as the original does. Evaluation compares bytes per
//! token against GPT-2's and GPT-4's vocabularies on several kinds of text.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::data::dataset::{self, Shard, Split};
use crate::data::ShardArgs;

#[derive(Subcommand)]
pub enum TokCommand {
    /// Train the BPE tokenizer on the pretraining shards and save it to $NANOCHAT_BASE_DIR/tokenizer.
    Train(TrainArgs),
    /// Compare the tokenizer's compression (bytes per token) with GPT-2's and GPT-4's.
    Eval(EvalArgs),
    /// Time training and encoding (for docs/BENCHMARKS.md); prints JSON.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Total vocabulary size, including the 256 bytes and the 9 special tokens.
    #[arg(long, default_value_t = 65536)]
    pub vocab_size: u32,
    /// Stop after this many characters of training text.
    #[arg(long, default_value_t = 2_000_000_000)]
    pub max_chars: u64,
    /// Cap each document at this many characters.
    #[arg(long, default_value_t = 10_000)]
    pub doc_cap: usize,
    /// Where the shards are (the last one is validation and is not trained on).
    #[command(flatten)]
    pub shards: ShardArgs,
    /// Split pattern (default: nanochat's GPT-4-style pattern with 1-2 digit numbers).
    #[arg(long, default_value = bpe::DEFAULT_PATTERN)]
    pub pattern: String,
    /// Where to write the tokenizer (default: $NANOCHAT_BASE_DIR/tokenizer).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Where the shards are, for in-domain train and validation text.
    #[command(flatten)]
    pub shards: ShardArgs,
    /// Tokenizer directory (default: $NANOCHAT_BASE_DIR/tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Where the shards are: training text from the training shards, encoding on validation.
    #[command(flatten)]
    pub shards: ShardArgs,
    /// Characters of training text (documents in shard order, the last one cut).
    #[arg(long, default_value_t = 50_000_000)]
    pub train_chars: usize,
    #[arg(long, default_value_t = 32768)]
    pub vocab_size: u32,
    /// Also write the trained ranks here (tiktoken format) to compare with another trainer.
    #[arg(long)]
    pub ranks_out: Option<PathBuf>,
    /// Also write the ids of the encoded validation documents here (u32 little-endian).
    #[arg(long)]
    pub ids_out: Option<PathBuf>,
}

pub fn run(cmd: TokCommand) -> Result<()> {
    match cmd {
        TokCommand::Train(args) => train(args),
        TokCommand::Eval(args) => eval(args),
        TokCommand::Bench(args) => bench(args),
    }
}

/// The documents of `shards` in order, read lazily one row group at a time. A read error ends the
/// stream and is left in `error` for the caller to report.
fn documents<'a>(
    shards: &'a [PathBuf],
    error: &'a RefCell<Option<anyhow::Error>>,
) -> impl Iterator<Item = String> + 'a {
    let mut next_shard = 0;
    let mut open: Option<(Shard, usize)> = None;
    let mut buffered = Vec::new().into_iter();
    std::iter::from_fn(move || loop {
        if let Some(doc) = buffered.next() {
            return Some(doc);
        }
        let (shard, rg) = match &mut open {
            Some(current) => current,
            None => {
                let path = shards.get(next_shard)?;
                next_shard += 1;
                match Shard::open(path) {
                    Ok(shard) => open.insert((shard, 0)),
                    Err(e) => {
                        *error.borrow_mut() = Some(e);
                        return None;
                    }
                }
            }
        };
        if *rg >= shard.num_row_groups() {
            open = None;
            continue;
        }
        match shard.read_texts(*rg) {
            Ok(docs) => buffered = docs.into_iter(),
            Err(e) => {
                *error.borrow_mut() = Some(e);
                return None;
            }
        }
        *rg += 1;
    })
}

/// Calls `f` on every document of the given shards, in order, until it returns false.
fn for_each_document(shards: &[PathBuf], mut f: impl FnMut(String) -> bool) -> Result<()> {
    let error = RefCell::new(None);
    for doc in documents(shards, &error) {
        if !f(doc) {
            break;
        }
    }
    error.into_inner().map_or(Ok(()), Err)
}

/// The first `chars` characters of `doc`.
fn cap_chars(mut doc: String, chars: usize) -> String {
    if let Some((cut, _)) = doc.char_indices().nth(chars) {
        doc.truncate(cut);
    }
    doc
}

/// Exactly `chars` characters of training documents, in shard order (the last one cut): the
/// benchmark's fixed input.
fn training_text(dir: &std::path::Path, chars: u64) -> Result<Vec<String>> {
    let shards = dataset::split_shards(dir, Split::Train)?;
    let mut docs = Vec::new();
    let mut total = 0u64;
    for_each_document(&shards, |doc| {
        let doc = cap_chars(doc, (chars - total) as usize);
        total += doc.chars().count() as u64;
        docs.push(doc);
        total < chars
    })?;
    Ok(docs)
}

fn train(args: TrainArgs) -> Result<()> {
    let dir = args.shards.dir()?;
    let out = args.out.unwrap_or_else(crate::tokenizer::tokenizer_dir);
    let shards = dataset::split_shards(&dir, Split::Train)?;
    eprintln!("training on up to {} characters from {}", args.max_chars, dir.display());
    let start = Instant::now();
    // Documents stream from the shards as training consumes them: nothing is held but the
    // batch being counted.
    let error = RefCell::new(None);
    let (docs, chars, bytes) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    let stream = documents(&shards, &error).map(|doc| cap_chars(doc, args.doc_cap)).take_while(|doc| {
        let more = chars.get() < args.max_chars;
        if more {
            docs.set(docs.get() + 1);
            chars.set(chars.get() + doc.chars().count() as u64);
            bytes.set(bytes.get() + doc.len() as u64);
        }
        more
    });
    let n_merges = args.vocab_size.saturating_sub(256 + bpe::SPECIAL_TOKENS.len() as u32);
    let pb = crate::common::progress_bar(args.max_chars + n_merges as u64, "tok train");
    let progress = |p: bpe::TrainProgress| match p {
        bpe::TrainProgress::Counted { chars, .. } => pb.set_position(chars.min(args.max_chars)),
        bpe::TrainProgress::Merged { done, .. } => pb.set_position(args.max_chars + done as u64),
    };
    let trained = bpe::Tokenizer::train_with_progress(stream, args.vocab_size, &args.pattern, &progress);
    pb.finish_and_clear();
    if let Some(e) = error.into_inner() {
        return Err(e.context("reading the training shards"));
    }
    let tok = trained.context("training the tokenizer")?;
    let train_time = start.elapsed();
    tok.save(&out).with_context(|| format!("saving the tokenizer to {}", out.display()))?;

    // Compression on held-out text: the validation shard's first documents.
    let val = dataset::split_shards(&dir, Split::Val)?;
    let mut sample = Vec::new();
    let mut sample_bytes = 0usize;
    for_each_document(&val, |doc| {
        sample_bytes += doc.len();
        sample.push(doc);
        sample_bytes < 5_000_000
    })?;
    let n_tokens: usize = tok.batch_encode(&sample).iter().map(Vec::len).sum();
    eprintln!(
        "trained a {}-token vocabulary ({} merges) on {} documents, {} chars, {} bytes",
        tok.vocab_size(),
        tok.n_mergeable() - 256,
        docs.get(),
        chars.get(),
        bytes.get()
    );
    eprintln!(
        "time: {:.1}s reading and training; compression on validation text: {:.3} bytes/token",
        train_time.as_secs_f64(),
        sample_bytes as f64 / n_tokens.max(1) as f64
    );
    eprintln!("saved to {}", out.display());
    let bytes_per_token = sample_bytes as f64 / n_tokens.max(1) as f64;
    let markdown = format!(
        "- vocabulary: {} tokens\n- trained on: {} documents, {} characters\n- validation compression: \
         {bytes_per_token:.3} bytes/token\n",
        tok.vocab_size(),
        docs.get(),
        chars.get()
    );
    let metrics = serde_json::json!({
        "seconds": start.elapsed().as_secs_f64(), "train_seconds": train_time.as_secs_f64(),
        "vocab_size": tok.vocab_size(), "documents": docs.get(), "chars": chars.get(),
        "bytes_per_token": bytes_per_token,
    });
    crate::report::write_section("tokenizer", &markdown, metrics)?;
    Ok(())
}

/// Texts of several kinds for `tok eval`: the original's mix of news, code, math and science,
/// here written for this project, plus in-domain training and validation documents.
fn eval_texts(dir: &std::path::Path) -> Result<Vec<(&'static str, String)>> {
    let mut texts = vec![
        ("prose", include_str!("tok_eval/prose.txt").to_string()),
        ("code", include_str!("conversation.rs").to_string()),
        ("math", include_str!("tok_eval/math.txt").to_string()),
        ("numbers", (0..400u64).map(|i| format!("{} ", i * i * 7919 % 100_003)).collect()),
        ("non-english", include_str!("tok_eval/non_english.txt").to_string()),
    ];
    for (name, split) in [("train-shard", Split::Train), ("val-shard", Split::Val)] {
        let shards = dataset::split_shards(dir, split)?;
        let mut text = String::new();
        for_each_document(&shards, |doc| {
            text.push_str(&doc);
            text.len() < 1_000_000
        })?;
        texts.push((name, text));
    }
    Ok(texts)
}

fn eval(args: EvalArgs) -> Result<()> {
    let tok = match args.tokenizer {
        Some(dir) => bpe::Tokenizer::load(&dir).with_context(|| format!("loading {}", dir.display()))?,
        None => crate::tokenizer::load()?,
    };
    let gpt2 = tiktoken_rs::r50k_base().map_err(|e| anyhow::anyhow!("GPT-2 vocabulary: {e}"))?;
    let gpt4 = tiktoken_rs::cl100k_base().map_err(|e| anyhow::anyhow!("GPT-4 vocabulary: {e}"))?;
    let texts = eval_texts(&args.shards.dir()?)?;
    println!("Bytes per token (higher is better) — ours: vocab {}", tok.vocab_size());
    println!(
        "{:<12} {:>9} | {:>7} {:>6} | {:>7} {:>6} | {:>7} {:>6} | {:>8} {:>8}",
        "text", "bytes", "GPT-2", "ratio", "GPT-4", "ratio", "ours", "ratio", "vs GPT-2", "vs GPT-4"
    );
    for (name, text) in &texts {
        let bytes = text.len();
        let n2 = gpt2.encode_ordinary(text).len();
        let n4 = gpt4.encode_ordinary(text).len();
        let ours = tok.encode(text).len();
        let ratio = |n: usize| bytes as f64 / n.max(1) as f64;
        // Relative difference in token count: positive means ours needs fewer tokens.
        let rel = |n: usize| 100.0 * (n as f64 - ours as f64) / n.max(1) as f64;
        println!(
            "{name:<12} {bytes:>9} | {n2:>7} {:>6.2} | {n4:>7} {:>6.2} | {ours:>7} {:>6.2} | {:>+7.1}% {:>+7.1}%",
            ratio(n2),
            ratio(n4),
            ratio(ours),
            rel(n2),
            rel(n4)
        );
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let dir = args.shards.dir()?;
    let docs = training_text(&dir, args.train_chars as u64)?;
    let t = Instant::now();
    let tok = bpe::Tokenizer::train(&docs, args.vocab_size, bpe::DEFAULT_PATTERN)?;
    let train_s = t.elapsed().as_secs_f64();
    if let Some(path) = &args.ranks_out {
        crate::common::write_atomic(path, bpe::format::ranks_to_string(tok.mergeable_tokens()).as_bytes())?;
    }
    let mut val = Vec::new();
    for_each_document(&dataset::split_shards(&dir, Split::Val)?, |doc| {
        val.push(doc);
        true
    })?;
    let val_bytes: usize = val.iter().map(String::len).sum();
    let t = Instant::now();
    let mut n_single = 0usize;
    for doc in &val {
        n_single += tok.encode(doc).len();
    }
    let single_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n_batch: usize = tok.batch_encode(&val).iter().map(Vec::len).sum();
    let batch_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(n_single == n_batch, "batch encoding disagrees with sequential encoding");
    if let Some(path) = &args.ids_out {
        let ids: Vec<u8> = tok.batch_encode(&val).iter().flatten().flat_map(|id| id.to_le_bytes()).collect();
        crate::common::write_atomic(path, &ids)?;
    }
    let summary = serde_json::json!({
        "train_docs": docs.len(),
        "train_chars": args.train_chars,
        "vocab_size": args.vocab_size,
        "train_seconds": train_s,
        "encode_bytes": val_bytes,
        "encode_tokens": n_single,
        "encode_single_thread_mb_s": val_bytes as f64 / single_s / 1e6,
        "encode_all_threads_mb_s": val_bytes as f64 / batch_s / 1e6,
        "threads": rayon::current_num_threads(),
        "peak_rss_mb": crate::common::peak_rss_mb(),
    });
    println!("{summary}");
    Ok(())
}
