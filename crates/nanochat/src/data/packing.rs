//! Packing tokenized documents into batches, for the loader (`loader.rs`): the plain stream
//! (concatenate and cut) and BOS-aligned best-fit; and the state that names what was read but
//! not yet used (a `LoaderState`, see `types.rs`), so that a resumed loader continues exactly.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::{anyhow, bail, Result};

use super::dataset::Shard;
use super::types::{Batch, DocRef, Encoder, LoaderConfig, LoaderState, Packing, PendingDocs, RowGroupTokens};

/// A tokenized document and where it came from.
struct Doc {
    at: DocRef,
    tokens: Vec<u32>,
}

/// The packer's view of the reader: documents one at a time, and the cursor after the last.
struct DocSource {
    row_groups: Receiver<Result<RowGroupTokens>>,
    current: Option<RowGroupTokens>,
    epoch: u64,
    next: DocRef,
    finite: bool,
}

impl DocSource {
    /// The next document, or `None` once a finite loader has read its last epoch.
    fn next_doc(&mut self) -> Result<Option<Doc>> {
        loop {
            if let Some(group) = &mut self.current {
                if let Some(tokens) = group.docs.next() {
                    let at = DocRef { shard: group.shard, row_group: group.row_group, doc: group.first_doc };
                    group.first_doc += 1;
                    self.epoch = group.epoch;
                    self.next = DocRef { doc: at.doc + 1, ..at };
                    return Ok(Some(Doc { at, tokens }));
                }
            }
            match self.row_groups.recv() {
                Ok(group) => self.current = Some(group?),
                Err(_) if self.finite => return Ok(None),
                Err(_) => bail!("the data reader thread stopped unexpectedly"),
            }
        }
    }
}

/// The packer thread: turns documents into batches.
pub(super) struct Packer {
    cfg: LoaderConfig,
    /// Stream: at most the half-used document. Best-fit: the candidates, in reading order.
    buffer: Vec<Doc>,
    offset: usize,
    source: DocSource,
}

impl Packer {
    /// A packer that continues from `state`, reading new documents from `row_groups`. The
    /// documents `state` had pending are re-read by `run`, on the packer's own thread.
    pub(super) fn new(cfg: &LoaderConfig, state: &LoaderState, row_groups: Receiver<Result<RowGroupTokens>>) -> Packer {
        let source =
            DocSource { row_groups, current: None, epoch: state.epoch, next: state.next, finite: cfg.epochs.is_some() };
        Packer { cfg: cfg.clone(), buffer: Vec::new(), offset: state.offset, source }
    }

    pub(super) fn run(
        mut self,
        shards: &[PathBuf],
        encoder: &Encoder,
        pending: &[PendingDocs],
        out: SyncSender<Result<Batch>>,
    ) {
        if let Err(e) = self.restore(shards, encoder, pending) {
            let _ = out.send(Err(e));
            return;
        }
        loop {
            let batch = match self.cfg.packing {
                Packing::Stream => self.stream_batch(),
                Packing::BestFit => self.best_fit_batch(),
            };
            let sent = match batch {
                Ok(Some(batch)) => out.send(Ok(batch)),
                Ok(None) => return,
                Err(e) => {
                    let _ = out.send(Err(e));
                    return;
                }
            };
            if sent.is_err() {
                return; // the loader was dropped
            }
        }
    }

    /// Re-reads and re-tokenizes the documents a saved state had read but not used.
    fn restore(&mut self, shards: &[PathBuf], encoder: &Encoder, pending: &[PendingDocs]) -> Result<()> {
        for group in pending {
            let path = &shards[group.shard];
            let texts = Shard::open(path)?.read_texts(group.row_group)?;
            let mut picked = Vec::with_capacity(group.docs.len());
            for &doc in &group.docs {
                let text = texts.get(doc).ok_or_else(|| {
                    anyhow!(
                        "the data loader state refers to document {doc} of row group {} of {}, \
                         which has only {}: the shards changed since the checkpoint",
                        group.row_group,
                        path.display(),
                        texts.len()
                    )
                })?;
                picked.push(text.as_str());
            }
            for (&doc, tokens) in group.docs.iter().zip(encoder.encode(&picked)) {
                let at = DocRef { shard: group.shard, row_group: group.row_group, doc };
                self.buffer.push(Doc { at, tokens });
            }
        }
        Ok(())
    }

    fn stream_batch(&mut self) -> Result<Option<Batch>> {
        let need = self.cfg.batch_size * self.cfg.seq_len + 1;
        let mut tokens = Vec::with_capacity(need);
        while tokens.len() < need {
            if self.buffer.is_empty() {
                let Some(doc) = self.source.next_doc()? else {
                    return Ok(None);
                };
                self.buffer.push(doc);
                self.offset = 0;
            }
            let doc = &self.buffer[0].tokens;
            let take = (need - tokens.len()).min(doc.len() - self.offset);
            tokens.extend_from_slice(&doc[self.offset..self.offset + take]);
            self.offset += take;
            if self.offset == doc.len() {
                self.buffer.clear();
                self.offset = 0;
            }
        }
        let targets = tokens[1..].iter().map(|&t| i64::from(t)).collect();
        tokens.pop();
        Ok(Some(Batch { inputs: tokens, targets, state: self.state() }))
    }

    fn best_fit_batch(&mut self) -> Result<Option<Batch>> {
        let (rows, width) = (self.cfg.batch_size, self.cfg.seq_len + 1);
        let mut inputs = Vec::with_capacity(rows * self.cfg.seq_len);
        let mut targets = Vec::with_capacity(rows * self.cfg.seq_len);
        let mut row = Vec::with_capacity(width);
        for _ in 0..rows {
            row.clear();
            while row.len() < width {
                while self.buffer.len() < self.cfg.buffer_docs.max(1) {
                    match self.source.next_doc()? {
                        Some(doc) => self.buffer.push(doc),
                        None if self.buffer.is_empty() => return Ok(None),
                        None => break,
                    }
                }
                let room = width - row.len();
                // Largest that fits (first on ties); if none fits, the shortest, cropped.
                let mut best: Option<usize> = None;
                let mut shortest = 0;
                for (i, doc) in self.buffer.iter().enumerate() {
                    let len = doc.tokens.len();
                    if len <= room && best.is_none_or(|b| len > self.buffer[b].tokens.len()) {
                        best = Some(i);
                    }
                    if len < self.buffer[shortest].tokens.len() {
                        shortest = i;
                    }
                }
                let doc = self.buffer.remove(best.unwrap_or(shortest));
                row.extend_from_slice(&doc.tokens[..doc.tokens.len().min(room)]);
            }
            inputs.extend_from_slice(&row[..width - 1]);
            targets.extend(row[1..].iter().map(|&t| i64::from(t)));
        }
        Ok(Some(Batch { inputs, targets, state: self.state() }))
    }

    fn state(&self) -> LoaderState {
        let mut pending: Vec<PendingDocs> = Vec::new();
        for doc in &self.buffer {
            match pending.last_mut() {
                Some(p) if (p.shard, p.row_group) == (doc.at.shard, doc.at.row_group) => p.docs.push(doc.at.doc),
                _ => pending.push(PendingDocs {
                    shard: doc.at.shard,
                    row_group: doc.at.row_group,
                    docs: vec![doc.at.doc],
                }),
            }
        }
        LoaderState {
            rank: self.cfg.rank,
            world_size: self.cfg.world_size,
            packing: self.cfg.packing,
            epoch: self.source.epoch,
            next: self.source.next,
            pending,
            offset: self.offset,
        }
    }
}
