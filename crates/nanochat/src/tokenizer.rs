//! The project's tokenizer on disk: where it lives and how a stage loads it. A checkpoint
//! directory may carry a tokenizer of its own (an imported model, which came with the tokenizer it
//! was trained with): the commands that load a model use that one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The name of the tokenizer directory inside a checkpoint directory that carries its own.
pub const CHECKPOINT_TOKENIZER: &str = "tokenizer";

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

/// The tokenizer the model in checkpoint directory `dir` was trained with: the one it carries, if
/// any (`dir/tokenizer`, written by `nanochat import`), else the project's.
pub fn for_checkpoint(dir: &Path) -> Result<bpe::Tokenizer> {
    let own = dir.join(CHECKPOINT_TOKENIZER);
    if own.join(bpe::format::META_FILE).exists() {
        return bpe::Tokenizer::load(&own)
            .with_context(|| format!("loading the model's tokenizer from {}", own.display()));
    }
    load()
}
