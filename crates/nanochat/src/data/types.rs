//! The types the pretraining loader (`loader.rs`) and its packer (`packing.rs`) share: what to
//! load ([`LoaderConfig`]), where a run is in the data ([`LoaderState`], saved with checkpoints),
//! the batches it yields, and the tokenized row groups and tokenizer pool passed between the
//! reader and the packer. Kept apart so that data flows one way: the loader uses the packer, and
//! both use these. Users name them through `loader`, which re-exports the public ones.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::dataset::Split;

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

/// Tokenized documents of one row group, starting at document `first_doc`: what the reader
/// thread hands the packer.
pub(super) struct RowGroupTokens {
    pub(super) epoch: u64,
    pub(super) shard: usize,
    pub(super) row_group: usize,
    pub(super) first_doc: usize,
    pub(super) docs: std::vec::IntoIter<Vec<u32>>,
}

/// The tokenizer and the threads it runs on, shared by reader and packer.
pub(super) struct Encoder {
    tokenizer: bpe::Tokenizer,
    pool: rayon::ThreadPool,
}

impl Encoder {
    pub(super) fn new(tokenizer: bpe::Tokenizer, pool: rayon::ThreadPool) -> Encoder {
        Encoder { tokenizer, pool }
    }

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
