//! Pretraining data: parquet shards on disk (`dataset`), fetching them and every other online
//! source over HTTP (`download`, with the sources themselves in `sources`), the tokenizing,
//! data-parallel, resumable loader that turns them into batches (`loader`, with the packing in
//! `packing` and the types both use in `types`), and the `nanochat data` subcommands (`cli`).
//!
//! `--data-dir DIR` (or `NANOCHAT_DATA_MIRROR`) means the same in every command: an offline data
//! mirror laid out like `../shared/data` (`pretrain/gutenberg/` shards, `eval/`, `sft/`, `words/`).
//! Each command reads its part of it, and nothing is downloaded. Without it, the commands use the
//! original's online sources, downloaded on first use into `$NANOCHAT_BASE_DIR`.

pub mod cli;
pub mod dataset;
pub mod download;
pub mod loader;
mod packing;
pub mod sources;
mod types;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The help of every command's `--data-dir`.
pub const MIRROR_HELP: &str = "An offline data mirror laid out like ../shared/data (pretrain/gutenberg/, eval/, sft/, \
                               words/): this command reads its part of it and downloads nothing. Without it the data \
                               comes from $NANOCHAT_BASE_DIR, where the original's online sources are downloaded on \
                               first use";

/// The mirror's pretraining shards, relative to it.
pub const MIRROR_SHARDS: &str = "pretrain/gutenberg";

/// The mirror's CORE eval bundle, relative to it.
pub const MIRROR_EVAL_BUNDLE: &str = "eval/eval_bundle";

/// Where a command that reads pretraining shards finds them.
#[derive(clap::Args, Debug, Clone, Default, serde::Serialize)]
pub struct ShardArgs {
    #[arg(long, env = "NANOCHAT_DATA_MIRROR", value_name = "DIR", help = MIRROR_HELP)]
    pub data_dir: Option<PathBuf>,
    /// A directory of parquet shards, such as `nanochat data build --out` writes (the last one is
    /// the validation split); takes precedence over --data-dir [default: $NANOCHAT_BASE_DIR/base_data]
    #[arg(long, value_name = "DIR")]
    pub shard_dir: Option<PathBuf>,
}

impl ShardArgs {
    /// The shard directory: `--shard-dir`, else the mirror's `pretrain/gutenberg`, else
    /// `$NANOCHAT_BASE_DIR/base_data`.
    pub fn dir(&self) -> Result<PathBuf> {
        if std::env::var_os("NANOCHAT_DATA_DIR").is_some() {
            eprintln!(
                "note: NANOCHAT_DATA_DIR is no longer read: use --shard-dir DIR for a directory of shards, or \
                 --data-dir DIR / NANOCHAT_DATA_MIRROR for a data mirror"
            );
        }
        match (&self.shard_dir, &self.data_dir) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, Some(mirror)) => mirror_shards(mirror),
            (None, None) => Ok(dataset::data_dir()),
        }
    }
}

/// The shard directory of the mirror `mirror`. A directory of shards itself, what `--data-dir`
/// meant for these commands before, still works, with a note.
pub fn mirror_shards(mirror: &Path) -> Result<PathBuf> {
    let shards = mirror.join(MIRROR_SHARDS);
    if shards.is_dir() {
        return Ok(shards);
    }
    if dataset::list_shards(mirror).is_ok() {
        eprintln!(
            "note: --data-dir {} holds shards: --data-dir now names a data mirror laid out like ../shared/data; \
             use --shard-dir for a directory of shards",
            mirror.display()
        );
        return Ok(mirror.to_path_buf());
    }
    bail!(
        "--data-dir {} is not a data mirror: it has no {MIRROR_SHARDS}/ (a mirror is laid out like \
         ../shared/data; for a directory of shards use --shard-dir)",
        mirror.display()
    )
}
