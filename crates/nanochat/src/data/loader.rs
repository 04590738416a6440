//! The pretraining data loader: shards → documents → tokens (BOS first) → (B, T) batches.
//!
//! Design choices:
//! - Data-parallel: rank r of W reads row groups r, r+W, r+2W, … of every shard in order, as the
//!   original does, so the ranks together read each row group exactly once per epoch.
//! - Two packings. `Stream` (nanochat v0): concatenate documents and cut B·T+1 tokens per batch;
//!   inputs are the first B·T, targets the same shifted by one. `BestFit` (later nanochat): every
//!   row of T+1 tokens starts at a document start; it takes the largest buffered document that
//!   fits the room left, and only when none fits crops the shortest one to fill the row.
//! - Exact resume: every batch carries the state after it. That is a cursor (the next document
//!   to read) plus the documents already read but not yet used (the best-fit buffer, or the
//!   stream's half-used document and how much of it is used). Documents are named by position,
//!   not stored, and re-tokenized on resume, so the state stays small.
//! - Two threads and a tokenizer pool: a reader decompresses one row group at a time and
//!   tokenizes it on `tokenizer_threads` threads; a packer builds batches ahead of the consumer
//!   (`prefetch_batches`), so training never waits on data.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::dataset::{split_shards, Shard, Split};
use super::packing::{Packer, RowGroupTokens};

/// How documents are laid into rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Packing {
    Stream,
    BestFit,
}

/// What to load and how.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Directory of `shard_*.parquet` files.
    pub dir: PathBuf,
    pub split: Split,
    /// Rows per batch (B).
    pub batch_size: usize,
    /// Tokens per row (T).
    pub seq_len: usize,
    pub packing: Packing,
    pub rank: usize,
    pub world_size: usize,
    pub tokenizer_threads: usize,
    /// Best-fit chooses among this many tokenized documents (the original uses 1,000).
    pub buffer_docs: usize,
    /// Batches built ahead of the consumer.
    pub prefetch_batches: usize,
    /// Stop after this many passes over the split (`None`: never, as in training).
    pub epochs: Option<u64>,
}

impl LoaderConfig {
    /// Defaults for everything but what must be chosen: stream packing (as nanochat v0), one
    /// process, two tokenizer threads, a best-fit buffer of 1,000 documents.
    pub fn new(dir: PathBuf, split: Split, batch_size: usize, seq_len: usize) -> LoaderConfig {
        LoaderConfig {
            dir,
            split,
            batch_size,
            seq_len,
            packing: Packing::Stream,
            rank: 0,
            world_size: 1,
            tokenizer_threads: 2,
            buffer_docs: 1000,
            prefetch_batches: 4,
            epochs: None,
        }
    }
}

/// The position of one document: shard (index into the split's sorted shards), row group, and
/// index among the row group's non-null documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DocRef {
    pub shard: usize,
    pub row_group: usize,
    pub doc: usize,
}

/// Documents of one row group that were read but not yet used, in use order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDocs {
    pub shard: usize,
    pub row_group: usize,
    pub docs: Vec<usize>,
}

/// Everything needed to continue exactly where a batch left off; save it with the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub rank: usize,
    pub world_size: usize,
    pub packing: Packing,
    /// Passes completed over the split before `next`.
    pub epoch: u64,
    /// The next document to read.
    pub next: DocRef,
    /// Documents read but not used yet, grouped by row group to keep checkpoints small.
    pub pending: Vec<PendingDocs>,
    /// Tokens of the first pending document already used (stream packing).
    pub offset: usize,
}

/// One batch, row-major B×T, and the loader state right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    /// `i64` so that callers can mark ignored positions with -1, as the cross-entropy expects.
    pub targets: Vec<i64>,
    pub state: LoaderState,
}

/// A running loader; iterate it for batches. It ends only if `epochs` is set.
pub struct Loader {
    batches: Option<Receiver<Result<Batch>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts loading from the beginning of the split, or right after the batch whose state is
    /// `resume`.
    pub fn new(tokenizer: &bpe::Tokenizer, cfg: &LoaderConfig, resume: Option<&LoaderState>) -> Result<Loader> {
        if cfg.batch_size == 0 || cfg.seq_len == 0 {
            bail!("batch size and sequence length must be positive");
        }
        if cfg.rank >= cfg.world_size {
            bail!("rank {} is out of range for {} processes", cfg.rank, cfg.world_size);
        }
        let shards = split_shards(&cfg.dir, cfg.split)?;
        let state = match resume {
            Some(state) => check_resume(state, cfg, shards.len())?,
            None => LoaderState {
                rank: cfg.rank,
                world_size: cfg.world_size,
                packing: cfg.packing,
                epoch: 0,
                next: DocRef { shard: 0, row_group: cfg.rank, doc: 0 },
                pending: Vec::new(),
                offset: 0,
            },
        };
        // Opened here so that a corrupt first shard is reported by `new`, not by the first batch.
        let first = Shard::open(&shards[state.next.shard])?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.tokenizer_threads.max(1))
            .thread_name(|i| format!("tokenizer-{i}"))
            .build()
            .context("starting the tokenizer threads")?;
        let encoder = Arc::new(Encoder { tokenizer: tokenizer.clone(), pool });
        let reader = Reader {
            shards: shards.clone(),
            rank: cfg.rank,
            world_size: cfg.world_size,
            epochs: cfg.epochs,
            encoder: Arc::clone(&encoder),
            epoch: state.epoch,
            next: state.next,
            open: Some((state.next.shard, first)),
        };
        let (row_group_tx, row_group_rx) = sync_channel(1);
        let (batch_tx, batch_rx) = sync_channel(cfg.prefetch_batches.max(1));
        let reader_thread = std::thread::Builder::new()
            .name("data-reader".into())
            .spawn(move || reader.run(row_group_tx))
            .context("starting the data reader thread")?;
        let packer = Packer::new(cfg, &state, row_group_rx);
        let packer_thread = std::thread::Builder::new()
            .name("data-packer".into())
            .spawn(move || packer.run(&shards, &encoder, &state.pending, batch_tx))
            .context("starting the data packer thread")?;
        Ok(Loader { batches: Some(batch_rx), threads: vec![reader_thread, packer_thread] })
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let batches = self.batches.as_ref()?;
        let item = batches.recv().ok();
        if matches!(item, Some(Err(_))) {
            // The threads have stopped; later calls end the iteration instead of blocking.
            self.batches = None;
        }
        item
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel makes the packer, and then the reader, stop at their next send.
        self.batches = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn check_resume(state: &LoaderState, cfg: &LoaderConfig, shards: usize) -> Result<LoaderState> {
    if (state.rank, state.world_size) != (cfg.rank, cfg.world_size) {
        bail!(
            "the data loader state was saved by rank {} of {} but this is rank {} of {}: resume \
             with the same number of processes",
            state.rank,
            state.world_size,
            cfg.rank,
            cfg.world_size
        );
    }
    if state.packing != cfg.packing {
        bail!("the data loader state is for {:?} packing, not {:?}", state.packing, cfg.packing);
    }
    let referenced = state.pending.iter().map(|p| p.shard).chain([state.next.shard]);
    if let Some(bad) = referenced.filter(|&s| s >= shards).max() {
        bail!(
            "the data loader state refers to shard {bad} but {} has {shards} {:?} shards: the \
             shard directory changed since the checkpoint",
            cfg.dir.display(),
            cfg.split
        );
    }
    if state.next.row_group % cfg.world_size != cfg.rank {
        bail!("the data loader state is inconsistent (row group of another rank)");
    }
    Ok(state.clone())
}

/// The tokenizer and the threads it runs on, shared by reader and packer.
pub(super) struct Encoder {
    tokenizer: bpe::Tokenizer,
    pool: rayon::ThreadPool,
}

impl Encoder {
    /// Token ids of each text, BOS first.
    pub(super) fn encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        let bos = self.tokenizer.bos_id();
        let mut docs = self.pool.install(|| self.tokenizer.batch_encode(texts));
        for doc in &mut docs {
            doc.insert(0, bos);
        }
        docs
    }
}

/// The reader thread: walks this rank's row groups from `next`, epoch after epoch.
struct Reader {
    shards: Vec<PathBuf>,
    rank: usize,
    world_size: usize,
    epochs: Option<u64>,
    encoder: Arc<Encoder>,
    epoch: u64,
    next: DocRef,
    open: Option<(usize, Shard)>,
}

impl Reader {
    fn run(mut self, out: SyncSender<Result<RowGroupTokens>>) {
        if let Err(e) = self.read_all(&out) {
            let _ = out.send(Err(e));
        }
    }

    fn read_all(&mut self, out: &SyncSender<Result<RowGroupTokens>>) -> Result<()> {
        // Counted over a whole epoch, to fail instead of spinning when this rank gets nothing.
        let (mut whole_epoch, mut docs_in_epoch) = (false, 0usize);
        loop {
            if self.next.shard >= self.shards.len() {
                if whole_epoch && docs_in_epoch == 0 {
                    bail!(
                        "rank {} of {} gets no documents from the {} shards: use fewer processes \
                         or more data",
                        self.rank,
                        self.world_size,
                        self.shards.len()
                    );
                }
                self.epoch += 1;
                self.next = DocRef { shard: 0, row_group: self.rank, doc: 0 };
                (whole_epoch, docs_in_epoch) = (true, 0);
            }
            if self.epochs.is_some_and(|n| self.epoch >= n) {
                return Ok(());
            }
            let at = self.next;
            let shard = match self.open.take() {
                Some((index, shard)) if index == at.shard => shard,
                _ => Shard::open(&self.shards[at.shard])?,
            };
            if at.row_group >= shard.num_row_groups() {
                self.next = DocRef { shard: at.shard + 1, row_group: self.rank, doc: 0 };
                continue;
            }
            let texts = shard.read_texts(at.row_group)?;
            self.open = Some((at.shard, shard));
            let texts = texts.get(at.doc..).unwrap_or_default();
            docs_in_epoch += texts.len();
            if !texts.is_empty() {
                let tokens = RowGroupTokens {
                    epoch: self.epoch,
                    shard: at.shard,
                    row_group: at.row_group,
                    first_doc: at.doc,
                    docs: self.encoder.encode(texts).into_iter(),
                };
                if out.send(Ok(tokens)).is_err() {
                    return Ok(()); // the loader was dropped
                }
            }
            self.next = DocRef { row_group: at.row_group + self.world_size, doc: 0, ..at };
        }
    }
}
