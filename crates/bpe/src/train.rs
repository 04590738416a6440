//! BPE training, with exactly the merges of the original's `rustbpe`.
//!
//! 1. Pre-tokenize every document (in parallel) and count identical chunks: the merges only ever
//!    look inside a chunk, so a chunk seen a million times is stored once with its count.
//! 2. Count adjacent pairs over the unique chunks, weighted by chunk count (overlapping pairs
//!    count: `aaa` holds two `(a, a)`), and remember which chunks hold each pair.
//! 3. Repeatedly merge the pair with the highest count, ties to the smallest `(left, right)`,
//!    replacing non-overlapping occurrences left to right. Only the chunks holding the pair are
//!    touched, and they report the exact change of every pair count around each occurrence.
//!    The max-heap is lazy: a popped entry whose count went stale is pushed back with the
//!    current count. Counts of existing pairs only fall, so heap counts are upper bounds and
//!    the first fresh top is the true maximum.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{Error, Splitter};

type Pair = (u32, u32);

/// Documents are pre-tokenized in batches of this many, so memory stays bounded by the
/// unique chunks rather than the corpus.
const DOC_BATCH: usize = 8192;

/// Where training is, for progress displays.
#[derive(Debug, Clone, Copy)]
pub enum TrainProgress {
    /// Documents and characters pre-tokenized so far.
    Counted { docs: u64, chars: u64 },
    /// Merges done out of the total asked for.
    Merged { done: u32, total: u32 },
}

/// Learns `n_merges` merges (fewer if the corpus runs out of pairs); merge `i` makes id `256 + i`.
pub fn learn_merges<I, S>(
    docs: I,
    n_merges: u32,
    pattern: &str,
    progress: &(dyn Fn(TrainProgress) + Sync),
) -> Result<Vec<Pair>, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str> + Send + Sync,
{
    let splitter = Splitter::new(pattern)?;
    let chunks = count_chunks(docs, &splitter, progress);
    if chunks.is_empty() {
        return Err(Error::EmptyCorpus);
    }
    let mut words: Vec<Vec<u32>> = Vec::with_capacity(chunks.len());
    let mut counts: Vec<i64> = Vec::with_capacity(chunks.len());
    for (chunk, count) in chunks {
        words.push(chunk.bytes().map(u32::from).collect());
        counts.push(count);
    }
    let (mut pair_counts, positions) = count_pairs(&words, &counts);
    let mut heap: BinaryHeap<MergeJob> = positions
        .into_iter()
        .map(|(pair, pos)| MergeJob { count: pair_counts.get(&pair).copied().unwrap_or(0), pair, pos })
        .collect();

    let mut merges = Vec::with_capacity(n_merges as usize);
    while merges.len() < n_merges as usize {
        let Some(mut job) = heap.pop() else { break };
        let current = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if job.count != current {
            if current > 0 {
                job.count = current;
                heap.push(job);
            }
            continue;
        }
        if current <= 0 {
            break;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(job.pair);

        let mut new_positions: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
        for &w in &job.pos {
            let weight = counts[w as usize];
            merge_word(&mut words[w as usize], job.pair, new_id, |pair, delta| {
                *pair_counts.entry(pair).or_insert(0) += delta * weight;
                if delta > 0 {
                    let pos = new_positions.entry(pair).or_default();
                    if pos.last() != Some(&w) {
                        pos.push(w);
                    }
                }
            });
        }
        for (pair, pos) in new_positions {
            let count = pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                heap.push(MergeJob { count, pair, pos });
            }
        }
        if merges.len() % 256 == 0 || merges.len() == n_merges as usize {
            progress(TrainProgress::Merged { done: merges.len() as u32, total: n_merges });
        }
    }
    Ok(merges)
}

/// Unique chunks of all documents with their counts.
fn count_chunks<I, S>(docs: I, splitter: &Splitter, progress: &(dyn Fn(TrainProgress) + Sync)) -> FxHashMap<String, i64>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str> + Send + Sync,
{
    let mut total: FxHashMap<String, i64> = FxHashMap::default();
    let (mut n_docs, mut n_chars) = (0u64, 0u64);
    let mut docs = docs.into_iter().peekable();
    let threads = rayon::current_num_threads().max(1);
    while docs.peek().is_some() {
        let batch: Vec<S> = docs.by_ref().take(DOC_BATCH).collect();
        let per_task = batch.len().div_ceil(threads * 4).max(1);
        let partial: Vec<FxHashMap<&str, i64>> = batch
            .par_chunks(per_task)
            .map(|group| {
                let mut local: FxHashMap<&str, i64> = FxHashMap::default();
                for doc in group {
                    for piece in splitter.pieces(doc.as_ref()) {
                        *local.entry(piece).or_insert(0) += 1;
                    }
                }
                local
            })
            .collect();
        for local in partial {
            for (piece, c) in local {
                match total.get_mut(piece) {
                    Some(t) => *t += c,
                    None => {
                        total.insert(piece.to_owned(), c);
                    }
                }
            }
        }
        n_docs += batch.len() as u64;
        n_chars += batch.iter().map(|d| d.as_ref().len() as u64).sum::<u64>();
        progress(TrainProgress::Counted { docs: n_docs, chars: n_chars });
    }
    total
}

/// Weighted counts of every adjacent pair, and the chunks holding each pair (ascending, no repeats).
fn count_pairs(words: &[Vec<u32>], counts: &[i64]) -> (FxHashMap<Pair, i64>, FxHashMap<Pair, Vec<u32>>) {
    // Before any merge every id is a byte, so dense tables indexed by `left * 256 + right` do.
    const N: usize = 256 * 256;
    let per_task = words.len().div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partial: Vec<(Vec<i64>, Vec<Vec<u32>>)> = words
        .par_chunks(per_task)
        .enumerate()
        .map(|(task, group)| {
            let mut c = vec![0i64; N];
            let mut pos: Vec<Vec<u32>> = vec![Vec::new(); N];
            for (k, word) in group.iter().enumerate() {
                let w = (task * per_task + k) as u32;
                for pair in word.windows(2) {
                    let p = pair[0] as usize * 256 + pair[1] as usize;
                    c[p] += counts[w as usize];
                    if pos[p].last() != Some(&w) {
                        pos[p].push(w);
                    }
                }
            }
            (c, pos)
        })
        .collect();
    let mut pair_counts = FxHashMap::default();
    let mut positions: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for (c, pos) in partial {
        for (p, (count, list)) in c.into_iter().zip(pos).enumerate() {
            if list.is_empty() {
                continue;
            }
            let pair = ((p / 256) as u32, (p % 256) as u32);
            *pair_counts.entry(pair).or_insert(0) += count;
            positions.entry(pair).or_default().extend(list);
        }
    }
    (pair_counts, positions)
}

/// Replaces the non-overlapping occurrences of `pair` in `ids`, left to right, by `new_id`, and
/// reports every pair-count change: each occurrence removes itself and its neighbour pairs and
/// adds the pairs its neighbours now form with `new_id`.
fn merge_word(ids: &mut Vec<u32>, (a, b): Pair, new_id: u32, mut delta: impl FnMut(Pair, i64)) {
    let n = ids.len();
    let (mut w, mut r) = (0, 0);
    while r < n {
        if r + 1 < n && ids[r] == a && ids[r + 1] == b {
            if w > 0 {
                let x = ids[w - 1];
                delta((x, a), -1);
                delta((x, new_id), 1);
            }
            delta((a, b), -1);
            if r + 2 < n {
                let y = ids[r + 2];
                delta((b, y), -1);
                delta((new_id, y), 1);
            }
            ids[w] = new_id;
            r += 2;
        } else {
            ids[w] = ids[r];
            r += 1;
        }
        w += 1;
    }
    ids.truncate(w);
}

/// A heap entry: a pair, its count when pushed, and the chunks that may hold it.
struct MergeJob {
    count: i64,
    pair: Pair,
    pos: Vec<u32>,
}

impl Ord for MergeJob {
    /// Higher count first; on equal counts the smaller pair first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for MergeJob {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for MergeJob {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The incremental deltas must equal a full recount, including overlapping runs.
    #[test]
    fn merge_deltas_equal_recount() {
        let recount = |ids: &[u32]| {
            let mut m: FxHashMap<Pair, i64> = FxHashMap::default();
            for w in ids.windows(2) {
                *m.entry((w[0], w[1])).or_insert(0) += 1;
            }
            m
        };
        for word in [vec![1, 1, 1], vec![1, 1, 1, 1], vec![2, 1, 1, 3, 1, 1, 1, 2], vec![1, 1, 2, 1, 1]] {
            let before = recount(&word);
            let mut ids = word.clone();
            let mut got = before.clone();
            merge_word(&mut ids, (1, 1), 9, |p, d| *got.entry(p).or_insert(0) += d);
            got.retain(|_, c| *c != 0);
            assert_eq!(got, recount(&ids), "word {word:?} -> {ids:?}");
        }
    }
}
