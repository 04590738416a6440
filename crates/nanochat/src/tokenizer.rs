//! The project's tokenizer on disk: where it lives and how a stage loads it.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// `$NANOCHAT_BASE_DIR/tokenizer`.
pub fn tokenizer_dir() -> PathBuf {
    crate::common::base_dir().join("tokenizer")
}

/// Loads the trained tokenizer, telling the user how to make one if there is none.
pub fn load() -> Result<bpe::Tokenizer> {
    let dir = tokenizer_dir();
    if !dir.join(bpe::format::META_FILE).exists() {
        anyhow::bail!("no tokenizer in {}: run `nanochat tok train` first", dir.display());
    }
    bpe::Tokenizer::load(&dir).with_context(|| format!("loading the tokenizer from {}", dir.display()))
}
