//! `nanochat bench`: throughput measurements of the model on this machine (`train`, `decode`,
//! `gemm`), and what the native decode path's reduced-precision weights cost in loss (`quality`),
//! printed as a table and as one JSON line, so that `docs/BENCHMARKS.md` can be regenerated and
//! compared side by side with the PyTorch reference (`bench/torch_reference.py`).

pub mod decode;
pub mod gemm;
pub mod quality;
pub mod train;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::model::GPTConfig;

/// The benchmarked model's shape; the defaults are the issues' depth-4 configuration.
#[derive(Args, Debug, Clone)]
pub struct ModelShape {
    /// Number of transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub n_layer: usize,
    /// Model width.
    #[arg(long, default_value_t = 256)]
    pub n_embd: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    pub n_head: usize,
    /// Key/value heads (divides n_head) [default: n_head].
    #[arg(long)]
    pub n_kv_head: Option<usize>,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32768)]
    pub vocab: usize,
    /// Sequence length: a training row; for inference, the context (the rotary tables cover 10x).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
}

impl ModelShape {
    pub fn config(&self) -> GPTConfig {
        GPTConfig {
            sequence_len: self.seq_len,
            vocab_size: self.vocab,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head.unwrap_or(self.n_head),
            n_embd: self.n_embd,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Training step throughput (forward, backward, optimizer) on random tokens.
    Train(train::TrainBenchArgs),
    /// Inference: time to first token and decode tokens/s at several batch sizes.
    Decode(decode::DecodeBenchArgs),
    /// GEMM GFLOP/s (f32, and bf16 where the CPU has AVX-512 BF16) at the training step's shapes:
    /// the measured peak for the step's figures.
    Gemm(gemm::GemmBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => train::run(&args),
        BenchCommand::Decode(args) => decode::run(&args),
        BenchCommand::Gemm(args) => gemm::run(&args),
    }
}

/// The median of `values` (the mean of the middle two for an even count); reorders them.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
