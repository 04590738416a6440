//! The pretraining loader against expectations computed independently: the documents written to
//! small shards, encoded directly with the tokenizer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use nanochat::data::dataset::{write_shard, Split};
use nanochat::data::loader::{Batch, Loader, LoaderConfig, LoaderState, Packing};

/// Documents with a unique, parseable id and pseudo-random lengths (some longer than a row).
fn make_docs(shard: usize, count: usize, seed: u64) -> Vec<String> {
    const WORDS: [&str; 12] =
        ["the", "river", "ran", "quietly", "past", "old", "mills,", "and", "a", "heron", "waited.", "Then"];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|i| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let words = 1 + ((x >> 33) % 40) as usize;
            let mut doc = format!("doc {shard}.{}.{}:", i / 1024, i % 1024);
            for w in 0..words {
                doc.push(' ');
                doc.push_str(WORDS[(w * 7 + (x >> 40) as usize) % WORDS.len()]);
            }
            doc
        })
        .collect()
}

/// Writes shards with the given document counts; returns the documents of each shard.
fn make_shards(dir: &Path, counts: &[usize]) -> Vec<Vec<String>> {
    counts
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let docs = make_docs(s, n, s as u64 + 7);
            write_shard(&dir.join(format!("shard_{s:05}.parquet")), &docs).expect("write shard");
            docs
        })
        .collect()
}

fn tokenizer(docs: &[Vec<String>]) -> bpe::Tokenizer {
    let sample = docs.iter().flat_map(|d| d.iter().take(100));
    bpe::Tokenizer::train(sample, 300, bpe::DEFAULT_PATTERN).expect("train tokenizer")
}

fn config(dir: &Path, packing: Packing, batch_size: usize, seq_len: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::new(dir.to_path_buf(), Split::Train, batch_size, seq_len);
    cfg.packing = packing;
    cfg
}

fn take(tok: &bpe::Tokenizer, cfg: &LoaderConfig, resume: Option<&LoaderState>, n: usize) -> Vec<Batch> {
    let loader = Loader::new(tok, cfg, resume).expect("start loader");
    loader.take(n).map(|b| b.expect("batch")).collect()
}

/// The stream-mode chunk behind a batch: inputs and the last target.
fn chunk(batch: &Batch) -> Vec<u32> {
    let mut tokens = batch.inputs.clone();
    tokens.extend(batch.targets.last().map(|&t| t as u32));
    tokens
}

/// Splits a token stream at BOS into documents, decoded; the first piece must start with BOS.
fn decode_docs(tok: &bpe::Tokenizer, tokens: &[u32]) -> Vec<String> {
    assert_eq!(tokens.first(), Some(&tok.bos_id()), "stream must start at a document start");
    tokens.split(|&t| t == tok.bos_id()).skip(1).map(|piece| tok.decode(piece)).collect()
}

/// (shard, row group, index) parsed from a document's "doc s.g.i:" prefix.
fn doc_id(text: &str) -> (usize, usize, usize) {
    let id = text.strip_prefix("doc ").and_then(|t| t.split(':').next()).expect("doc id");
    let parts: Vec<usize> = id.split('.').map(|p| p.parse().expect("number")).collect();
    (parts[0], parts[1], parts[2])
}

#[test]
fn stream_yields_exactly_the_document_tokens_in_order_across_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[1100, 300, 50]);
    let tok = tokenizer(&docs);
    let bos = tok.bos_id();
    let epoch: Vec<u32> = docs[..2].iter().flatten().flat_map(|d| std::iter::once(bos).chain(tok.encode(d))).collect();
    let cfg = config(tmp.path(), Packing::Stream, 4, 128);
    let per_batch = 4 * 128 + 1;
    let batches = take(&tok, &cfg, None, epoch.len() * 3 / 2 / per_batch);
    let got: Vec<u32> = batches.iter().flat_map(chunk).collect();
    let expected: Vec<u32> = epoch.iter().chain(&epoch).copied().take(got.len()).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "stream differs from the encoded documents");
    for b in &batches {
        assert_eq!(b.inputs.len(), 4 * 128);
        assert!(b.inputs[1..].iter().zip(&b.targets).all(|(&i, &t)| i64::from(i) == t));
    }
    assert_eq!(batches[0].state.epoch, 0);
    assert_eq!(batches.last().unwrap().state.epoch, 1);
}

#[test]
fn validation_split_reads_only_the_last_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[200, 200, 120]);
    let tok = tokenizer(&docs);
    let mut cfg = config(tmp.path(), Packing::Stream, 2, 64);
    cfg.split = Split::Val;
    cfg.epochs = Some(1);
    let batches: Vec<Batch> = Loader::new(&tok, &cfg, None).unwrap().map(|b| b.unwrap()).collect();
    let tokens: Vec<u32> = batches.iter().flat_map(chunk).collect();
    let seen = decode_docs(&tok, &tokens);
    assert!(seen.len() > 100, "one pass should cover most of the shard, got {}", seen.len());
    // The final partial batch is dropped, so the last document may be cut.
    assert_eq!(seen[..seen.len() - 1], docs[2][..seen.len() - 1]);
}

#[test]
fn ranks_together_read_every_row_group_once_per_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    // Row groups: shard 0 has 3 (1024, 1024, 52 docs), shard 1 has 2, the validation shard 1.
    let docs = make_shards(tmp.path(), &[2100, 1100, 40]);
    let tok = tokenizer(&docs);
    let world = 3;
    let mut seen_by_rank = Vec::new();
    for rank in 0..world {
        let mut cfg = config(tmp.path(), Packing::Stream, 8, 256);
        (cfg.rank, cfg.world_size) = (rank, world);
        let loader = Loader::new(&tok, &cfg, None).unwrap();
        // Read until the rank's first document comes round again: one full epoch.
        let mut tokens = Vec::new();
        let mut first_epoch = Vec::new();
        for batch in loader {
            tokens.extend(chunk(&batch.unwrap()));
            let texts = decode_docs(&tok, &tokens);
            if let Some(again) = texts.iter().skip(1).position(|t| *t == texts[0]) {
                first_epoch = texts[..=again].to_vec();
                break;
            }
        }
        let ids: Vec<(usize, usize, usize)> = first_epoch.iter().map(|t| doc_id(t)).collect();
        assert!(ids.iter().all(|&(_, g, _)| g % world == rank), "rank {rank} read another rank's row group");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "rank {rank} did not read in order");
        seen_by_rank.push(first_epoch);
    }
    let mut all: Vec<&String> = seen_by_rank.iter().flatten().collect();
    all.sort();
    let mut expected: Vec<&String> = docs[..2].iter().flatten().collect();
    expected.sort();
    assert_eq!(all.len(), expected.len(), "every training document exactly once");
    assert!(all == expected);
    // Shard 1 has row groups 0 and 1 only, so rank 2 reads nothing from it.
    assert!(seen_by_rank[2].iter().all(|t| doc_id(t).0 == 0));
}

/// True if each crop (piece, length) can be given a distinct source document of that length
/// that starts with the piece.
fn match_crops(crops: &[(Vec<u32>, usize)], sources: &[(Vec<u32>, usize)], used: &mut [bool]) -> bool {
    let Some(((piece, len), rest)) = crops.split_first() else {
        return true;
    };
    for i in 0..sources.len() {
        if !used[i] && sources[i].1 == *len && sources[i].0.starts_with(piece) {
            used[i] = true;
            if match_crops(rest, sources, used) {
                return true;
            }
            used[i] = false;
        }
    }
    false
}

#[test]
fn best_fit_rows_start_at_documents_and_crop_only_when_nothing_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[400, 300, 20]);
    let tok = tokenizer(&docs);
    let bos = tok.bos_id();
    let (rows, seq_len) = (4, 48);
    let mut cfg = config(tmp.path(), Packing::BestFit, rows, seq_len);
    // A buffer larger than the data holds every unused document, which makes the choices checkable.
    cfg.buffer_docs = 10_000;
    cfg.epochs = Some(1);
    let len_of: HashMap<&String, usize> = docs[..2].iter().flatten().map(|d| (d, tok.encode(d).len() + 1)).collect();
    let mut unused: HashSet<&String> = len_of.keys().copied().collect();
    let mut lengths: BTreeMap<usize, usize> = BTreeMap::new();
    for &l in len_of.values() {
        *lengths.entry(l).or_default() += 1;
    }
    let take_length = |lengths: &mut BTreeMap<usize, usize>, l: usize| match lengths.get_mut(&l) {
        Some(1) => _ = lengths.remove(&l),
        Some(n) => *n -= 1,
        None => panic!("no unused document of {l} tokens"),
    };
    let (mut crops_total, mut whole_total) = (0, 0);
    for batch in Loader::new(&tok, &cfg, None).unwrap() {
        let batch = batch.unwrap();
        let mut crops = Vec::new();
        let mut whole = HashSet::new();
        for r in 0..rows {
            let mut row = batch.inputs[r * seq_len..(r + 1) * seq_len].to_vec();
            row.push(batch.targets[(r + 1) * seq_len - 1] as u32);
            assert_eq!(row[0], bos, "a row does not start with BOS");
            let mut room = seq_len + 1;
            let pieces: Vec<&[u32]> = row.split(|&t| t == bos).skip(1).collect();
            for (i, piece) in pieces.iter().enumerate() {
                let text = tok.decode(piece);
                let len = piece.len() + 1;
                let largest_fit = lengths.range(..=room).next_back().map(|(&l, _)| l);
                if unused.contains(&text) && len_of.get(&text) == Some(&len) {
                    assert_eq!(largest_fit, Some(len), "not the largest document that fits in {room}");
                    take_length(&mut lengths, len);
                    unused.remove(&text);
                    whole.insert(text);
                    room -= len;
                } else {
                    assert_eq!(i, pieces.len() - 1, "only the last piece of a row may be cropped");
                    assert_eq!(largest_fit, None, "cropped although a document fits in {room}");
                    let shortest = *lengths.keys().next().expect("an unused document");
                    take_length(&mut lengths, shortest);
                    crops.push((piece.to_vec(), shortest));
                }
            }
        }
        // The cropped documents are those used in this batch (no longer pending) but not whole.
        let pending: HashSet<&String> = batch
            .state
            .pending
            .iter()
            .flat_map(|p| p.docs.iter().map(|&i| &docs[p.shard][p.row_group * 1024 + i]))
            .collect();
        let cropped: Vec<&String> = unused.iter().copied().filter(|d| !pending.contains(d)).collect();
        let sources: Vec<(Vec<u32>, usize)> = cropped.iter().map(|d| (tok.encode(d), len_of[d] - 1)).collect();
        let crops: Vec<(Vec<u32>, usize)> = crops.into_iter().map(|(p, l)| (p, l - 1)).collect();
        assert_eq!(sources.len(), crops.len(), "documents vanished without being placed");
        assert!(
            match_crops(&crops, &sources, &mut vec![false; sources.len()]),
            "crops are not of the shortest documents"
        );
        for d in cropped {
            unused.remove(d);
        }
        (crops_total, whole_total) = (crops_total + crops.len(), whole_total + whole.len());
    }
    assert!(
        crops_total > 0 && whole_total > 0,
        "test data should exercise both ({whole_total} whole, {crops_total} cropped)"
    );
}

#[test]
fn best_fit_rows_hold_whole_documents_with_the_default_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[1500, 100, 20]);
    let tok = tokenizer(&docs);
    let encoded: HashSet<Vec<u32>> = docs.iter().flatten().map(|d| tok.encode(d)).collect();
    let seq_len = 64;
    let cfg = config(tmp.path(), Packing::BestFit, 8, seq_len);
    for batch in take(&tok, &cfg, None, 20) {
        for r in 0..8 {
            let row = &batch.inputs[r * seq_len..(r + 1) * seq_len];
            assert_eq!(row[0], tok.bos_id());
            let pieces: Vec<&[u32]> = row.split(|&t| t == tok.bos_id()).skip(1).collect();
            // All but the last piece (which the row's end may cut) are whole documents.
            for piece in &pieces[..pieces.len() - 1] {
                assert!(encoded.contains(*piece), "a row holds a partial document in its middle");
            }
        }
    }
}

fn check_resume(packing: Packing, rank: usize, world: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[2100, 300, 30]);
    let tok = tokenizer(&docs);
    let mut cfg = config(tmp.path(), packing, 8, 128);
    (cfg.rank, cfg.world_size) = (rank, world);
    cfg.buffer_docs = 50;
    // Through the first epoch and a few batches into the second.
    let mut reference: Vec<Batch> = Vec::new();
    for batch in Loader::new(&tok, &cfg, None).unwrap() {
        reference.push(batch.unwrap());
        if reference.iter().rev().take(12).all(|b| b.state.epoch >= 1) {
            break;
        }
    }
    let wrap = reference.iter().position(|b| b.state.epoch == 1).unwrap();
    for k in [0, 1, 17, wrap / 2, wrap - 1, wrap, wrap + 3] {
        let json = serde_json::to_string(&reference[k].state).unwrap();
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        let resumed = take(&tok, &cfg, Some(&state), 3);
        for (i, batch) in resumed.iter().enumerate() {
            assert!(*batch == reference[k + 1 + i], "{packing:?}: batch {} after a restore at {k} differs", k + 1 + i);
        }
    }
}

#[test]
fn stream_resume_yields_the_uninterrupted_next_batch() {
    check_resume(Packing::Stream, 0, 1);
}

#[test]
fn best_fit_resume_yields_the_uninterrupted_next_batch() {
    check_resume(Packing::BestFit, 0, 1);
}

#[test]
fn resume_is_exact_for_a_rank_of_several() {
    check_resume(Packing::BestFit, 1, 2);
}

#[test]
fn resume_with_another_world_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = make_shards(tmp.path(), &[50, 50, 10]);
    let tok = tokenizer(&docs);
    let cfg = config(tmp.path(), Packing::Stream, 2, 16);
    let state = take(&tok, &cfg, None, 1).remove(0).state;
    let mut other = cfg.clone();
    other.world_size = 2;
    let err = Loader::new(&tok, &other, Some(&state)).err().expect("must refuse");
    assert!(format!("{err:#}").contains("resume with the same number of processes"), "{err:#}");
}
