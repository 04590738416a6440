//! `nanochat bench`: throughput measurements of the model on this machine, printed as a table and
//! as one JSON line, so that `docs/BENCHMARKS.md` can be regenerated and compared side by side with
//! the PyTorch reference (`bench/torch_reference.py`).

pub mod decode;
pub mod train;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Training step throughput (forward, backward, optimizer) on random tokens.
    Train(train::TrainBenchArgs),
    /// Inference: time to first token and decode tokens/s at several batch sizes.
    Decode(decode::DecodeBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => train::run(&args),
        BenchCommand::Decode(args) => decode::run(&args),
    }
}
