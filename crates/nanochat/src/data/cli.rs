//! `nanochat data …`: fetch shards (`download`), make shards from your own text (`build`), and
//! measure the loader (`bench`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::dataset::{self, build, split_shards, BuildOptions, Split};
use super::download::{download, link_from, DownloadOptions};
use super::loader::{Loader, LoaderConfig, Packing};
use super::sources::{Endpoints, RemoteFile, PRETRAIN_NUM_SHARDS};
use super::{mirror_shards, ShardArgs, MIRROR_HELP};
use crate::common::base_dir;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Download pretraining shards into $NANOCHAT_BASE_DIR/base_data (the last shard is validation)
    Download {
        /// Number of shards, shard_00000 onwards [default: all 1,823 (~170 GB); with --from or --data-dir: all]
        #[arg(short = 'n', long)]
        num_shards: Option<usize>,
        /// Where the shards are served [default: the original's FineWeb-Edu shards on the Hugging Face
        /// hub, $HF_ENDPOINT/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main]
        #[arg(long, env = "NANOCHAT_DATA_URL", default_value_t = Endpoints::from_env().pretrain, hide_default_value = true)]
        base_url: String,
        /// Take the shards from a local directory of shards instead (hard links when possible, else copies)
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        #[arg(long, env = "NANOCHAT_DATA_MIRROR", value_name = "DIR", help = MIRROR_HELP)]
        data_dir: Option<PathBuf>,
        /// Parallel downloads
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Tries per shard before giving up (network errors and HTTP 5xx are retried)
        #[arg(long, default_value_t = 5)]
        attempts: u32,
        /// Destination shard directory [default: $NANOCHAT_BASE_DIR/base_data]
        #[arg(long = "shard-dir", value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Build shards from local .txt, .jsonl (field `text`), .txt.gz, .jsonl.gz or .parquet files
    Build {
        /// Input files, read in order
        #[arg(long, num_args = 1.., required = true, value_name = "FILE")]
        from: Vec<PathBuf>,
        /// Output directory (must hold no shards yet) [default: $NANOCHAT_BASE_DIR/base_data]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Characters per training shard
        #[arg(long, default_value_t = 250_000_000)]
        shard_chars: usize,
        /// Every N-th document goes to the validation shard
        #[arg(long, default_value_t = 100)]
        val_every: usize,
        /// Plain text is cut at paragraph breaks into documents of at most this many characters
        #[arg(long, default_value_t = 8000)]
        max_doc_chars: usize,
    },
    /// Measure loader throughput (tokens/s) on the training shards for each tokenizer thread count
    Bench {
        #[command(flatten)]
        shards: ShardArgs,
        /// Tokenizer directory [default: $NANOCHAT_BASE_DIR/tokenizer]
        #[arg(long, value_name = "DIR")]
        tokenizer: Option<PathBuf>,
        /// Tokenizer thread counts to measure, comma-separated
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Batches per measurement
        #[arg(long, default_value_t = 100)]
        batches: usize,
        #[arg(long, value_enum, default_value_t = Packing::BestFit)]
        packing: Packing,
    },
}

impl DataCommand {
    /// What running this command downloads: the shards, when it takes them from no local copy.
    pub fn downloads(&self) -> Vec<RemoteFile> {
        match self {
            DataCommand::Download { num_shards, base_url, from: None, data_dir: None, dir, .. } => {
                let dir = dir.clone().unwrap_or_else(dataset::data_dir);
                (0..num_shards.unwrap_or(PRETRAIN_NUM_SHARDS)).map(|i| RemoteFile::shard(base_url, &dir, i)).collect()
            }
            _ => Vec::new(),
        }
    }
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Download { num_shards, base_url, from, data_dir, workers, attempts, dir } => {
            let dir = dir.unwrap_or_else(dataset::data_dir);
            let local = match (from, data_dir) {
                (Some(from), _) => Some(from),
                (None, Some(mirror)) => Some(mirror_shards(&mirror)?),
                (None, None) => None,
            };
            if let Some(mirror) = local {
                let added = link_from(&mirror, &dir, num_shards)?;
                println!("{added} shards added to {} from {}", dir.display(), mirror.display());
                return Ok(());
            }
            let n = num_shards.unwrap_or(PRETRAIN_NUM_SHARDS);
            let opts = DownloadOptions {
                hub: Endpoints::from_env().hub_for(&base_url),
                base_url,
                shards: (0..n).collect(),
                dir: dir.clone(),
                workers,
                attempts,
                backoff: Duration::from_secs(2),
            };
            let fetched = download(&opts)?;
            println!("{fetched} shards downloaded, {} already present, in {}", n - fetched, dir.display());
        }
        DataCommand::Build { from, out, shard_chars, val_every, max_doc_chars } => {
            let out = out.unwrap_or_else(dataset::data_dir);
            let opts = BuildOptions { out: out.clone(), shard_chars, val_every, max_doc_chars };
            let s = build(&from, &opts)?;
            println!(
                "wrote {} training shards ({} documents) and 1 validation shard ({} documents) to {}",
                s.train_shards,
                s.train_docs,
                s.val_docs,
                out.display()
            );
        }
        DataCommand::Bench { shards, tokenizer, threads, batch_size, seq_len, batches, packing } => {
            let dir = shards.dir()?;
            let tok_dir = tokenizer.unwrap_or_else(|| base_dir().join("tokenizer"));
            let tok = bpe::Tokenizer::load(&tok_dir).with_context(|| {
                format!("loading the tokenizer from {} (train one with `nanochat tok train`)", tok_dir.display())
            })?;
            let shards = split_shards(&dir, Split::Train)?.len();
            println!(
                "loader bench: {shards} training shards in {}, vocab {}, B={batch_size} T={seq_len}, \
                 {packing:?} packing, {batches} batches ({} tokens)",
                dir.display(),
                tok.vocab_size(),
                batches * batch_size * seq_len
            );
            for &n in &threads {
                let mut cfg = LoaderConfig::new(dir.clone(), Split::Train, batch_size, seq_len);
                cfg.packing = packing;
                cfg.tokenizer_threads = n;
                bench_one(&tok, &cfg, batches)?;
            }
        }
    }
    Ok(())
}

/// Times `batches` batches from a fresh loader, start-up included: a conservative rate.
fn bench_one(tok: &bpe::Tokenizer, cfg: &LoaderConfig, batches: usize) -> Result<()> {
    let start = Instant::now();
    let mut loader = Loader::new(tok, cfg, None)?;
    let mut first = None;
    let mut tokens = 0usize;
    for _ in 0..batches {
        let Some(batch) = loader.next() else { bail!("the loader ended early") };
        tokens += batch?.inputs.len();
        first.get_or_insert_with(|| start.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "tokenizer threads {}: {tokens} tokens in {secs:.2} s = {:.0} tokens/s (first batch after {:.2} s)",
        cfg.tokenizer_threads,
        tokens as f64 / secs,
        first.unwrap_or_default().as_secs_f64()
    );
    Ok(())
}
