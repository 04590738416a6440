//! Pretraining data: parquet shards on disk (`dataset`), fetching them (`download`), the
//! tokenizing, data-parallel, resumable loader that turns them into batches (`loader`, with the
//! packing in `packing` and the types both use in `types`), and the `nanochat data` subcommands
//! (`cli`).

pub mod cli;
pub mod dataset;
pub mod download;
pub mod loader;
mod packing;
mod types;
