//! The `nanochat` command line: one subcommand per pipeline stage, each a thin call into the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nanochat",
    version,
    about = "Train and serve your own small ChatGPT: tokenizer, pretraining, chat stages, evals, chat and web UI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizer: train it, evaluate its compression.
    #[command(subcommand)]
    Tok(nanochat::tok::TokCommand),
    /// Pretraining data: download shards, build shards from your own text, benchmark the loader.
    #[command(subcommand)]
    Data(nanochat::data::cli::DataCommand),
    /// Base model: pretrain it (resumable, with checkpoints), evaluate a checkpoint.
    #[command(subcommand)]
    Base(nanochat::train::base::BaseCommand),
    /// Midtraining: the base model learns the chat format on a conversation mixture (resumable).
    #[command(subcommand)]
    Mid(nanochat::train::mid::MidCommand),
    /// Supervised finetuning on whole conversations, loss on the assistant's tokens only.
    #[command(subcommand)]
    Sft(nanochat::train::sft::SftCommand),
    /// Reinforcement learning on GSM8K: sample, reward the right answers, follow the policy gradient.
    #[command(subcommand)]
    Rl(nanochat::train::rl::RlCommand),
    /// Talk to a trained model in the terminal (or ask one question with -p).
    Chat(nanochat::chat_cli::ChatArgs),
    /// Web chat: the UI, the streaming API and an OpenAI-compatible API.
    Serve(nanochat::serve::ServeArgs),
    /// Bring in a model trained elsewhere: the original nanochat's checkpoints, a Hugging Face
    /// transformers NanoChatForCausalLM directory, or either from the hub (hf:OWNER/REPO).
    Import(nanochat::interop::ImportArgs),
    /// Write a trained model as a Hugging Face transformers directory (--format hf).
    Export(nanochat::interop::ExportArgs),
    /// Measure training and inference throughput on this machine.
    #[command(subcommand)]
    Bench(nanochat::bench::BenchCommand),
    /// Assemble the report card from the sections the stages wrote into $NANOCHAT_BASE_DIR/report
    /// (`report reset` starts a new one).
    Report(nanochat::report::ReportArgs),
    /// The whole pipeline in one command, resumable, from a preset: data, tokenizer, base, mid, SFT, evals, report.
    Speedrun(nanochat::speedrun::SpeedrunArgs),
}

fn main() -> Result<()> {
    keep_large_allocations();
    execute(Cli::parse().command)
}

/// glibc returns every allocation over 32 MB to the kernel when it is freed and maps it afresh
/// next time, so the kernel zeroes those pages again on every training step (a fifth of the step
/// at depth 4, docs/PROFILE.md). Raising the threshold keeps such buffers in the heap for reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_allocations() {
    // SAFETY: mallopt only tunes the allocator; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations() {}

/// Parses a speedrun stage's command line with this parser, so that a preset runs the very
/// commands a user would type, with all their options.
fn parse_stage(argv: &[String]) -> Result<nanochat::speedrun::StageCommand> {
    let cli = Cli::try_parse_from(std::iter::once("nanochat").chain(argv.iter().map(String::as_str)))?;
    let downloads = match &cli.command {
        Command::Data(cmd) => cmd.downloads(),
        Command::Base(cmd) => cmd.downloads(),
        Command::Mid(cmd) => cmd.downloads(),
        Command::Sft(cmd) => cmd.downloads(),
        Command::Rl(cmd) => cmd.downloads(),
        Command::Chat(args) => args.downloads(),
        _ => Vec::new(),
    };
    Ok(nanochat::speedrun::StageCommand { downloads, run: Box::new(move || execute(cli.command)) })
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Tok(cmd) => nanochat::tok::run(cmd),
        Command::Data(cmd) => nanochat::data::cli::run(cmd),
        Command::Base(cmd) => nanochat::train::base::run(cmd),
        Command::Mid(cmd) => nanochat::train::mid::run(cmd),
        Command::Sft(cmd) => nanochat::train::sft::run(cmd),
        Command::Rl(cmd) => nanochat::train::rl::run(cmd),
        Command::Chat(args) => nanochat::chat_cli::run(args),
        Command::Serve(args) => nanochat::serve::run(args),
        Command::Import(args) => nanochat::interop::run_import(args),
        Command::Export(args) => nanochat::interop::run_export(args),
        Command::Bench(cmd) => nanochat::bench::run(cmd),
        Command::Report(args) => nanochat::report::run(args),
        Command::Speedrun(args) => nanochat::speedrun::run(args, &parse_stage),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition only when it parses one; this checks every subcommand's.
    #[test]
    fn every_command_line_definition_is_valid() {
        super::Cli::command().debug_assert();
    }
}
