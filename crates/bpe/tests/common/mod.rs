//! Shared test helpers: paths to the golden fixtures and the data mirror.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` next to the repository root.
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures/tokenizer").join(name)
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
    let path = shared().join("data/pretrain/tinyshakespeare.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.chars().take(1_000_000).collect()
}

/// The fixture tokenizer, loaded from its tiktoken ranks file.
pub fn fixture_tokenizer() -> bpe::Tokenizer {
    let path = fixture("mergeable_ranks.tiktoken");
    let text = std::fs::read_to_string(&path).expect("ranks file");
    let tokens = bpe::format::parse_ranks(&text, &path).expect("parse ranks");
    let pattern = std::fs::read_to_string(fixture("pattern.txt")).expect("pattern");
    bpe::Tokenizer::from_tokens(tokens, &pattern).expect("tokenizer")
}
