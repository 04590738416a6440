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

use super::dataset::{split_shards, Shard};
use super::packing::Packer;
pub use super::types::{Batch, DocRef, LoaderConfig, LoaderState, Packing, PendingDocs};
use super::types::{Encoder, RowGroupTokens};

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
        let encoder = Arc::new(Encoder::new(tokenizer.clone(), pool));
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
