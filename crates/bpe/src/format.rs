//! The on-disk format of a tokenizer (version 1): a directory with two files.
//!
//! - `tokenizer.tiktoken`: tiktoken's ranks format, one mergeable token per line,
//!   `base64(token bytes) + " " + rank`, ranks `0..n` in order (rank = id). Readable by tiktoken.
//! - `tokenizer.json`: `{"format": "nanochat-bpe", "version": 1, "pattern": …, "n_mergeable": n,
//!   "special_tokens": ["<|bos|>", …], "ranks_fnv1a64": "…"}`; the special tokens take the ids
//!   `n, n+1, …` in the order listed, and the checksum of the ranks file catches truncation and
//!   corruption that still parses.
//!
//! Both files are written through a temporary file and a rename, JSON last, so a tokenizer
//! directory is either complete or detected as such. Loading reads at most [`MAX_META_BYTES`] and
//! [`MAX_RANKS_BYTES`] (far above any real tokenizer's files), so a wrong or hostile file is an
//! error, never an unbounded read.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Error, Tokenizer, SPECIAL_TOKENS};

pub const RANKS_FILE: &str = "tokenizer.tiktoken";
pub const META_FILE: &str = "tokenizer.json";
/// The largest `tokenizer.json` read (a real one is a few hundred bytes).
pub const MAX_META_BYTES: u64 = 1 << 20;
/// The largest `tokenizer.tiktoken` read (GPT-4o's 200,000 tokens take 3.6 MB).
pub const MAX_RANKS_BYTES: u64 = 64 << 20;
const FORMAT: &str = "nanochat-bpe";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    version: u32,
    pattern: String,
    n_mergeable: usize,
    special_tokens: Vec<String>,
    ranks_fnv1a64: String,
}

/// 64-bit FNV-1a: a tiny, stable checksum (not for security).
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

fn checksum(bytes: &[u8]) -> String {
    let mut h = Fnv::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}

/// The ranks file's text for `tokens`.
pub fn ranks_to_string(tokens: &[Vec<u8>]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::with_capacity(tokens.len() * 16);
    for (rank, t) in tokens.iter().enumerate() {
        out.push_str(&b64.encode(t));
        out.push(' ');
        out.push_str(&rank.to_string());
        out.push('\n');
    }
    out
}

/// Parses a tiktoken ranks file whose ranks are `0..n` in order; returns the bytes of each token.
pub fn parse_ranks(text: &str, path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let corrupt = |line: usize, reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("line {}: {reason}", line + 1),
    };
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (token, rank) = line.split_once(' ').ok_or_else(|| corrupt(i, "expected `base64 rank`".into()))?;
        let rank: usize = rank.parse().map_err(|_| corrupt(i, format!("bad rank {rank:?}")))?;
        if rank != i {
            return Err(corrupt(i, format!("rank {rank} out of order (expected {i})")));
        }
        let bytes = b64.decode(token).map_err(|e| corrupt(i, format!("bad base64: {e}")))?;
        if bytes.is_empty() {
            return Err(corrupt(i, "empty token".into()));
        }
        tokens.push(bytes);
    }
    Ok(tokens)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The bytes of `path`, refusing a file larger than `max` without reading past it (a device or
/// a growing file included).
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() as u64 > max {
        return Err(Error::Corrupt { path: path.to_path_buf(), reason: format!("larger than {max} bytes") });
    }
    Ok(bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

impl Tokenizer {
    /// Saves the tokenizer into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ranks = ranks_to_string(self.mergeable_tokens());
        let meta = Meta {
            format: FORMAT.into(),
            version: VERSION,
            pattern: self.pattern().into(),
            n_mergeable: self.n_mergeable(),
            special_tokens: SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect(),
            ranks_fnv1a64: checksum(ranks.as_bytes()),
        };
        let meta_path = dir.join(META_FILE);
        let json = serde_json::to_string_pretty(&meta)
            .map_err(|e| Error::Corrupt { path: meta_path.clone(), reason: e.to_string() })?;
        write_atomic(&dir.join(RANKS_FILE), ranks.as_bytes())?;
        write_atomic(&meta_path, json.as_bytes())
    }

    /// Loads a tokenizer saved by [`Tokenizer::save`], checking every part of it.
    pub fn load(dir: &Path) -> Result<Tokenizer, Error> {
        let meta_path = dir.join(META_FILE);
        let ranks_path = dir.join(RANKS_FILE);
        let corrupt = |path: &Path, reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
        let json = read_capped(&meta_path, MAX_META_BYTES)?;
        let meta: Meta = serde_json::from_slice(&json).map_err(|e| corrupt(&meta_path, e.to_string()))?;
        if meta.format != FORMAT || meta.version != VERSION {
            return Err(corrupt(
                &meta_path,
                format!(
                    "format {:?} version {} (this build reads {FORMAT:?} version {VERSION})",
                    meta.format, meta.version
                ),
            ));
        }
        if meta.special_tokens != SPECIAL_TOKENS {
            return Err(corrupt(&meta_path, format!("unexpected special tokens {:?}", meta.special_tokens)));
        }
        let ranks = read_capped(&ranks_path, MAX_RANKS_BYTES)?;
        if checksum(&ranks) != meta.ranks_fnv1a64 {
            return Err(corrupt(&ranks_path, "checksum mismatch (truncated or modified)".into()));
        }
        let text = std::str::from_utf8(&ranks).map_err(|e| corrupt(&ranks_path, e.to_string()))?;
        let tokens = parse_ranks(text, &ranks_path)?;
        if tokens.len() != meta.n_mergeable {
            return Err(corrupt(&ranks_path, format!("{} tokens, expected {}", tokens.len(), meta.n_mergeable)));
        }
        Tokenizer::from_tokens(tokens, &meta.pattern).map_err(|e| corrupt(&ranks_path, e.to_string()))
    }
}
