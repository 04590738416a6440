//! The tokenizer: mergeable tokens + the nine chat specials; encoding, decoding, batch encoding.
//!
//! Encoding follows tiktoken exactly: pre-tokenize, then inside each piece repeatedly merge the
//! adjacent pair of parts whose concatenated bytes have the lowest rank (the leftmost on ties).
//! Parts are always tokens, so "the rank of the concatenation of two parts" is precomputed as a
//! map from id pairs to the merged id: no byte-string hashing inside the merge loop. Whole pieces
//! that are a single token (most words) are found with one lookup. Long pieces (a run of letters
//! with no space can be megabytes long) use a heap so that encoding stays O(n log n).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::train::{self, TrainProgress};
use crate::{Error, Splitter, SPECIAL_TOKENS};

/// Pieces at least this long are merged with a heap instead of the quadratic scan.
const LONG_PIECE: usize = 128;
/// Building the pair table hashes every prefix of every token: its cost is the sum of the squared
/// token lengths. A real vocabulary's is a few million; this bound (about a second's work) keeps
/// a vocabulary of absurdly long tokens from stalling a load.
const MAX_PAIR_WORK: u64 = 1 << 34;

/// A byte-level BPE tokenizer with nanochat's special tokens. Cheap to clone (shared tables).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    pattern: String,
    splitter: Splitter,
    /// The bytes of every mergeable token, by id (= rank).
    tokens: Vec<Vec<u8>>,
    /// Token bytes -> id, as tiktoken's encoder (a byte string listed twice keeps its last id).
    ranks: FxHashMap<Vec<u8>, u32>,
    /// (left id, right id) -> id of the concatenation, for every split of every token into two tokens.
    pairs: FxHashMap<(u32, u32), u32>,
    /// The id of each single byte.
    byte_ids: [u32; 256],
}

impl Tokenizer {
    /// Trains a tokenizer of `vocab_size` tokens (256 bytes + merges + the 9 specials) on `docs`.
    pub fn train<I, S>(docs: I, vocab_size: u32, pattern: &str) -> Result<Tokenizer, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str> + Send + Sync,
    {
        Self::train_with_progress(docs, vocab_size, pattern, &|_| {})
    }

    /// [`Tokenizer::train`], reporting progress to `progress` (called from worker threads too).
    pub fn train_with_progress<I, S>(
        docs: I,
        vocab_size: u32,
        pattern: &str,
        progress: &(dyn Fn(TrainProgress) + Sync),
    ) -> Result<Tokenizer, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str> + Send + Sync,
    {
        let n_special = SPECIAL_TOKENS.len();
        let min = 256 + n_special as u32;
        if vocab_size < min {
            return Err(Error::VocabTooSmall { vocab_size, n_special, min });
        }
        let merges = train::learn_merges(docs, vocab_size - min, pattern, progress)?;
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &merges {
            let mut merged = tokens[a as usize].clone();
            merged.extend_from_slice(&tokens[b as usize]);
            tokens.push(merged);
        }
        Tokenizer::from_tokens(tokens, pattern)
    }

    /// Builds a tokenizer from the bytes of each mergeable token (index = rank = id) and a pattern.
    /// Every single byte must be a token, so that any input can be encoded.
    pub fn from_tokens(tokens: Vec<Vec<u8>>, pattern: &str) -> Result<Tokenizer, Error> {
        let splitter = Splitter::new(pattern)?;
        if tokens.len() > (u32::MAX as usize) - SPECIAL_TOKENS.len() {
            return Err(Error::Vocabulary(format!("{} tokens do not fit 32-bit ids", tokens.len())));
        }
        let work: u64 = tokens.iter().map(|t| (t.len() as u64).pow(2)).sum();
        if work > MAX_PAIR_WORK {
            let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
            return Err(Error::Vocabulary(format!(
                "its tokens are too long to index (the longest is {longest} bytes): not a BPE vocabulary"
            )));
        }
        let mut ranks = FxHashMap::default();
        ranks.reserve(tokens.len());
        for (id, bytes) in tokens.iter().enumerate() {
            if bytes.is_empty() {
                return Err(Error::Vocabulary(format!("token {id} has no bytes")));
            }
            ranks.insert(bytes.clone(), id as u32);
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *ranks
                .get(&[b as u8][..])
                .ok_or_else(|| Error::Vocabulary(format!("byte {b:#04x} is not a token: every byte must be")))?;
        }
        let mut pairs = FxHashMap::default();
        for (bytes, &id) in &ranks {
            for k in 1..bytes.len() {
                if let (Some(&l), Some(&r)) = (ranks.get(&bytes[..k]), ranks.get(&bytes[k..])) {
                    pairs.insert((l, r), id);
                }
            }
        }
        let pattern = pattern.to_string();
        Ok(Tokenizer { inner: Arc::new(Inner { pattern, splitter, tokens, ranks, pairs, byte_ids }) })
    }

    /// The split pattern.
    pub fn pattern(&self) -> &str {
        &self.inner.pattern
    }

    /// The bytes of every mergeable token, by id.
    pub fn mergeable_tokens(&self) -> &[Vec<u8>] {
        &self.inner.tokens
    }

    /// Number of mergeable tokens (the id of the first special token).
    pub fn n_mergeable(&self) -> usize {
        self.inner.tokens.len()
    }

    /// Total number of ids: mergeable tokens + specials.
    pub fn vocab_size(&self) -> usize {
        self.n_mergeable() + SPECIAL_TOKENS.len()
    }

    /// The id of a special token such as `<|assistant_end|>`.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        SPECIAL_TOKENS.iter().position(|&s| s == name).map(|i| (self.n_mergeable() + i) as u32)
    }

    /// The id of `<|bos|>`, which starts every document and conversation.
    pub fn bos_id(&self) -> u32 {
        self.n_mergeable() as u32
    }

    /// Encodes ordinary text: special-token strings in it are plain text, never special ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out);
        out
    }

    /// Encodes `text`, appending to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut scratch = Scratch::default();
        for piece in self.inner.splitter.pieces(text) {
            self.encode_piece(piece.as_bytes(), out, &mut scratch);
        }
    }

    /// Encodes text in which the nine special-token strings are the special ids.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut search = 0;
        while let Some(found) = text[search..].find("<|") {
            let at = search + found;
            match SPECIAL_TOKENS.iter().position(|s| text[at..].starts_with(s)) {
                Some(i) => {
                    self.encode_into(&text[start..at], &mut out);
                    out.push((self.n_mergeable() + i) as u32);
                    start = at + SPECIAL_TOKENS[i].len();
                    search = start;
                }
                None => search = at + 2,
            }
        }
        self.encode_into(&text[start..], &mut out);
        out
    }

    /// Encodes many texts in parallel; the same ids as encoding them one by one.
    pub fn batch_encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// The raw bytes of `ids`. Ids beyond the vocabulary decode to nothing.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_raw(id));
        }
        out
    }

    /// Decodes `ids` to text; bytes that are not valid UTF-8 become U+FFFD (one per maximal
    /// invalid sequence, as Python's `errors="replace"`), never a panic.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The text of one id, as `decode(&[id])`.
    pub fn id_to_token(&self, id: u32) -> String {
        self.decode(&[id])
    }

    /// Byte length of every id (0 for the specials): the denominator of bits per byte.
    pub fn token_bytes(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.inner.tokens.iter().map(|t| t.len() as u32).collect();
        out.resize(self.vocab_size(), 0);
        out
    }

    /// A fingerprint of the vocabulary, pattern and specials (FNV-1a, hex): checkpoints record it
    /// so that a model is never paired with a different tokenizer by mistake.
    pub fn fingerprint(&self) -> String {
        let mut h = crate::format::Fnv::default();
        h.write(self.inner.pattern.as_bytes());
        for t in &self.inner.tokens {
            h.write(&(t.len() as u32).to_le_bytes());
            h.write(t);
        }
        for s in SPECIAL_TOKENS {
            h.write(s.as_bytes());
        }
        format!("{:016x}", h.finish())
    }

    fn token_raw(&self, id: u32) -> &[u8] {
        let n = self.n_mergeable();
        match self.inner.tokens.get(id as usize) {
            Some(t) => t,
            None => SPECIAL_TOKENS.get(id as usize - n).map(|s| s.as_bytes()).unwrap_or(&[]),
        }
    }

    #[inline]
    fn pair_id(&self, left: u32, right: u32) -> u32 {
        self.inner.pairs.get(&(left, right)).copied().unwrap_or(u32::MAX)
    }

    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>, scratch: &mut Scratch) {
        if let Some(&id) = self.inner.ranks.get(piece) {
            out.push(id);
        } else if piece.len() < LONG_PIECE {
            self.merge_short(piece, out, scratch);
        } else {
            self.merge_long(piece, out);
        }
    }

    /// tiktoken's loop: the lowest-ranked adjacent pair is merged until none can be.
    fn merge_short(&self, piece: &[u8], out: &mut Vec<u32>, scratch: &mut Scratch) {
        let parts = &mut scratch.parts;
        let ranks = &mut scratch.ranks;
        parts.clear();
        parts.extend(piece.iter().map(|&b| self.inner.byte_ids[b as usize]));
        ranks.clear();
        ranks.extend(parts.windows(2).map(|w| self.pair_id(w[0], w[1])));
        loop {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            parts[at] = best;
            parts.remove(at + 1);
            ranks.remove(at);
            if at > 0 {
                ranks[at - 1] = self.pair_id(parts[at - 1], parts[at]);
            }
            if at < ranks.len() {
                ranks[at] = self.pair_id(parts[at], parts[at + 1]);
            }
        }
        out.extend_from_slice(parts);
    }

    /// The same merges as [`Self::merge_short`] in O(n log n): a linked list of parts and a heap
    /// of candidate pairs keyed by (rank, position), stale entries skipped when popped.
    fn merge_long(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.inner.byte_ids[b as usize]).collect();
        let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.pair_id(ids[i], ids[i + 1]);
            if r != u32::MAX {
                heap.push(Reverse((r, i)));
            }
        }
        while let Some(Reverse((r, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE || self.pair_id(ids[i], ids[j]) != r {
                continue;
            }
            ids[i] = r;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                let rl = self.pair_id(ids[prev[i]], r);
                if rl != u32::MAX {
                    heap.push(Reverse((rl, prev[i])));
                }
            }
            if next[i] != NONE {
                let rr = self.pair_id(r, ids[next[i]]);
                if rr != u32::MAX {
                    heap.push(Reverse((rr, i)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(ids[i]);
            i = next[i];
        }
    }
}

/// Buffers reused across the pieces of one text.
#[derive(Default)]
struct Scratch {
    parts: Vec<u32>,
    ranks: Vec<u32>,
}
