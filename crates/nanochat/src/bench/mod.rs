//! `nanochat bench`: throughput measurements of the model on this machine, printed as a table and
//! as one JSON line, so that `docs/BENCHMARKS.md` can be regenerated and compared side by side with
//! the PyTorch reference scripts in `bench/`.

pub mod decode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Inference: time to first token and decode tokens/s at several batch sizes.
    Decode(decode::DecodeBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::run(&args),
    }
}
