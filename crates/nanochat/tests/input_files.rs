//! Input files nanochat reads but did not write (data shards, task files), damaged the ways a
//! fuzzer would: truncated, garbage, flipped bytes, huge length fields, lines without end. Each
//! must be a clear error naming the file (or, for damage a format cannot see, a result), never a
//! panic, a hang or an allocation without bound. (Tokenizer files: crates/bpe/tests/hostile_files.rs;
//! checkpoints: checkpoint_safety.rs.)

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use nanochat::data::dataset::{write_shard, Shard};
use nanochat::execution::Limits;
use nanochat::tasks::gsm8k::Gsm8k;
use nanochat::tasks::humaneval::HumanEval;
use nanochat::tasks::{DataRoot, Task};
use rand::{Rng, SeedableRng};

/// Opens a shard and reads every row group: the error, if any, as text.
fn read_shard(path: &Path) -> Result<usize, String> {
    let shard = Shard::open(path).map_err(|e| format!("{e:#}"))?;
    let mut docs = 0;
    for i in 0..shard.num_row_groups() {
        docs += shard.read_texts(i).map_err(|e| format!("{e:#}"))?.len();
    }
    Ok(docs)
}

/// `read_shard` of `bytes` written at `path`, which must not panic or take long; an error must
/// name the file. Returns whether it was an error.
fn check_damaged(path: &Path, bytes: &[u8], case: &str) -> bool {
    std::fs::write(path, bytes).unwrap();
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| read_shard(path)));
    let took = start.elapsed();
    let result = result.unwrap_or_else(|_| panic!("{case}: reading the damaged shard panicked"));
    assert!(took < Duration::from_secs(10), "{case}: took {took:?}");
    if let Err(e) = &result {
        assert!(e.contains(&path.display().to_string()), "{case}: the error does not name the file: {e}");
    }
    result.is_err()
}

#[test]
fn damaged_shards_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.parquet");
    let docs: Vec<String> = (0..2500).map(|i| format!("document {i}: {}", "lorem ipsum ".repeat(i % 13))).collect();
    write_shard(&good, &docs).unwrap();
    assert_eq!(read_shard(&good), Ok(2500));
    let bytes = std::fs::read(&good).unwrap();
    let path = tmp.path().join("shard_00000.parquet");

    for cut in [0, 3, 4, 8, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = read_shard(&path).err().unwrap_or_else(|| panic!("a shard cut at {cut} bytes read fine"));
        assert!(err.contains(&path.display().to_string()) && err.contains("delete it"), "cut at {cut}: {err}");
    }

    // the footer's length field claiming far more than the file holds
    let mut huge = bytes.clone();
    let at = huge.len() - 8;
    huge[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    assert!(check_damaged(&path, &huge, "huge footer length"));

    // garbage between the magic numbers
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut garbage: Vec<u8> = (0..20_000).map(|_| rng.random()).collect();
    garbage[..4].copy_from_slice(b"PAR1");
    let n = garbage.len();
    garbage[n - 4..].copy_from_slice(b"PAR1");
    garbage[n - 8..n - 4].copy_from_slice(&1000u32.to_le_bytes());
    check_damaged(&path, &garbage, "garbage");

    // flipped bytes: anywhere, then concentrated on the footer, where the lengths and counts are
    let footer = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
    let footer_start = bytes.len() - 8 - footer;
    let mut errors = 0;
    for round in 0..400 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + round % 4 {
            let at = if round % 2 == 0 {
                rng.random_range(0..damaged.len())
            } else {
                rng.random_range(footer_start..bytes.len() - 8)
            };
            damaged[at] = rng.random();
        }
        errors += usize::from(check_damaged(&path, &damaged, &format!("flip round {round}")));
    }
    // most damage is caught (a flip inside the text of a page may not be)
    eprintln!("{errors} of 400 damaged shards were errors");
    assert!(errors > 200, "only {errors} of 400 damaged shards were errors");
}

/// A data root holding `eval/gsm8k/test.jsonl` (gzipped when `gz`) with `bytes`.
fn gsm8k_root(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("eval/gsm8k");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("test.jsonl");
    std::fs::write(&path, bytes).unwrap();
    (root, path)
}

fn load_err(root: &Path) -> String {
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| Gsm8k::load(&DataRoot::new(root), "test")));
    let err = match result.expect("loading the task file panicked") {
        Ok(task) => panic!("a damaged task file loaded ({} rows)", task.len()),
        Err(e) => format!("{e:#}"),
    };
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    err
}

#[test]
fn damaged_task_files_are_errors_naming_the_file_and_line() {
    let good = r#"{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}"#;
    let (root, path) = gsm8k_root(format!("{good}\n{good}\n").as_bytes());
    assert_eq!(Gsm8k::load(&DataRoot::new(root.path()), "test").unwrap().len(), 2);

    let (root, path_bad) = gsm8k_root(format!("{good}\n{{\"question\": 1\n").as_bytes());
    let err = load_err(root.path());
    assert!(err.contains(&path_bad.display().to_string()) && err.contains("line 2"), "{err}");

    let (root, _) = gsm8k_root(&[0xff, 0xfe, 0x00, 0x80, b'\n']);
    let err = load_err(root.path());
    assert!(err.contains("test.jsonl") && err.contains("line 1"), "{err}");
    drop(path);
}

#[test]
fn a_line_without_end_is_refused_without_reading_it_all() {
    // 200 MiB without a newline, as a few hundred kilobytes of gzip: the reader stops at 64 MiB
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("eval/humaneval");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("HumanEval.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::best());
    let block = vec![b'x'; 1 << 20];
    for _ in 0..200 {
        gz.write_all(&block).unwrap();
    }
    gz.finish().unwrap();
    let start = Instant::now();
    let result = HumanEval::load(&DataRoot::new(root.path()), Limits::default());
    let err = format!("{:#}", result.err().expect("a file without line breaks must be refused"));
    assert!(err.contains("HumanEval.jsonl.gz") && err.contains("longer than"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
}
