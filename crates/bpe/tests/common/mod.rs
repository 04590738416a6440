//! Shared test helpers: the golden tokenizer fixtures and their training text (`tests/fixtures/`,
//! made by the original's code: `bench/fixtures/`), and the full offline data mirror for the test
//! that reads more real text when `NANOCHAT_DATA_MIRROR` names one.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer").join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The fixture's training text: the first 1,000,000 chars of tinyshakespeare (ASCII).
pub fn shakespeare_1m() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinyshakespeare_1m.txt.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(text.chars().count(), 1_000_000, "{}", path.display());
    text
}

/// The fixture tokenizer, loaded from its tiktoken ranks file.
pub fn fixture_tokenizer() -> bpe::Tokenizer {
    let path = fixture("mergeable_ranks.tiktoken");
    let text = std::fs::read_to_string(&path).expect("ranks file");
    let tokens = bpe::format::parse_ranks(&text, &path).expect("parse ranks");
    let pattern = std::fs::read_to_string(fixture("pattern.txt")).expect("pattern");
    bpe::Tokenizer::from_tokens(tokens, &pattern).expect("tokenizer")
}

/// The full offline data mirror named by `NANOCHAT_DATA_MIRROR` (laid out like ../shared/data), or
/// `None` after printing that `test` skips that part; `NANOCHAT_REQUIRE_MIRROR` makes its absence a failure.
pub fn full_mirror(test: &str) -> Option<PathBuf> {
    match std::env::var_os("NANOCHAT_DATA_MIRROR").map(PathBuf::from) {
        Some(dir) if dir.join("pretrain").is_dir() => Some(dir),
        dir => {
            let why = match dir {
                Some(dir) => format!("NANOCHAT_DATA_MIRROR={} is not a data mirror", dir.display()),
                None => "NANOCHAT_DATA_MIRROR is not set".to_string(),
            };
            assert!(std::env::var_os("NANOCHAT_REQUIRE_MIRROR").is_none(), "NANOCHAT_REQUIRE_MIRROR is set but {why}");
            // on the process's stderr, past the harness's capture: `cargo test` shows it
            let _ = writeln!(std::io::stderr(), "{test}: skipped the full data mirror's text, {why}");
            None
        }
    }
}
