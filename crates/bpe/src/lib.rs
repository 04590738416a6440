//! Byte-level BPE for nanochat: training and encoding in one small crate with no ML dependencies.
//!
//! - Training ([`Tokenizer::train`]) reproduces the merges of the original's `rustbpe` exactly:
//!   regex pre-tokenization, unique chunks counted, then merges of the most frequent adjacent pair
//!   (ties: the smallest `(left, right)` pair), counts kept incrementally with a lazy max-heap.
//! - Encoding ([`Tokenizer::encode`]) gives the same ids as `tiktoken` with the same ranks and
//!   pattern: per pre-token, repeatedly merge the adjacent pair whose merged bytes have the lowest rank.
//! - The nine chat special tokens are appended after the merges; special strings inside ordinary
//!   text are ordinary text unless [`Tokenizer::encode_with_special`] is asked for.
//! - The split pattern is configurable; the default (and GPT-4's) run through a hand-written
//!   pre-tokenizer that is tested against `fancy-regex`, any other pattern through `fancy-regex`.
//!
//! On-disk format: see [`format`].

pub mod format;
mod pretokenize;
mod tokenizer;
mod train;

pub use pretokenize::Splitter;
pub use tokenizer::Tokenizer;
pub use train::{learn_merges, TrainProgress};

/// nanochat's split pattern: GPT-4's, with numbers in groups of one or two digits.
pub const DEFAULT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// GPT-4's (cl100k) split pattern, numbers in groups of up to three digits.
pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The chat special tokens, in the order they are appended after the mergeable tokens.
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// Everything that can go wrong when training, loading or saving a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vocab size {vocab_size} is too small: it must be at least 256 byte tokens + {n_special} special tokens = {min}")]
    VocabTooSmall { vocab_size: u32, n_special: usize, min: u32 },
    #[error("the training corpus is empty: give at least one non-empty document")]
    EmptyCorpus,
    #[error("invalid split pattern: {0}")]
    Pattern(String),
    #[error("invalid vocabulary: {0}")]
    Vocabulary(String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: corrupt tokenizer file: {reason} (re-create it with `nanochat tok train`)")]
    Corrupt { path: std::path::PathBuf, reason: String },
}
