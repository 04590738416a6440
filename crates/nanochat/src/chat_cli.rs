//! `nanochat chat`: talk to a trained model in the terminal, with line editing and history,
//! the reply streamed as it is generated. `-p "..."` asks one question and exits.
//!
//! Like the original's `chat_cli`, the conversation is kept as tokens: `<|bos|>`, then per turn
//! `<|user_start|>` text `<|user_end|>` `<|assistant_start|>` reply `<|assistant_end|>`, the reply
//! including any calculator call and its forced answer exactly as generated.
//!
//! `nanochat chat eval ...` runs the chat evaluations instead (see [`crate::eval::chat`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::{Args, Subcommand, ValueEnum};
use rustyline::error::ReadlineError;

use crate::engine::{Engine, GenerateOptions, TextStream};
use crate::model::decode::WeightFormat;
use crate::model::GPT;

/// Which training stage's checkpoints to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    Base,
    Mid,
    Sft,
    Rl,
}

impl Source {
    /// The stage's checkpoint directory under `$NANOCHAT_BASE_DIR`, named as in the original.
    pub fn checkpoints_dir(self) -> PathBuf {
        let name = match self {
            Source::Base => "base_checkpoints",
            Source::Mid => "mid_checkpoints",
            Source::Sft => "chatsft_checkpoints",
            Source::Rl => "chatrl_checkpoints",
        };
        crate::common::base_dir().join(name)
    }
}

#[derive(Args, Debug)]
// `chat eval` takes its own options; mixing them with the chat's (`chat -p x eval`) is an error
#[command(args_conflicts_with_subcommands = true)]
pub struct ChatArgs {
    #[command(subcommand)]
    pub command: Option<ChatCommand>,
    /// Ask this one question, print the reply and exit.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Sampling temperature; 0 = always the most likely token.
    #[arg(short = 't', long, default_value_t = 0.6)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only; 0 = all.
    #[arg(short = 'k', long, default_value_t = 50)]
    pub top_k: usize,
    /// Longest reply, in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Which stage's model to talk to.
    #[arg(short = 'i', long, value_enum, default_value_t = Source::Sft)]
    pub source: Source,
    /// Model tag (checkpoint directory name, e.g. d20); default: the deepest `d<N>` there.
    #[arg(short = 'g', long)]
    pub model_tag: Option<String>,
    /// Checkpoint step; default: the latest.
    #[arg(short = 's', long)]
    pub step: Option<usize>,
    /// Seed of the first reply; each later reply uses the next one.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Precision of the weights that generate: bf16 and int8 decode faster on the CPU (fewer bytes
    /// per token) with slightly different logits; they run the native CPU path even with a GPU.
    #[arg(long, value_enum, default_value_t = WeightFormat::F32)]
    pub weights: WeightFormat,
}

/// What `nanochat chat` can do besides chatting.
#[derive(Subcommand, Debug)]
pub enum ChatCommand {
    /// Evaluate a chat model: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE.
    Eval(crate::eval::chat::ChatEvalArgs),
}

/// Loads the project tokenizer and the model of `source` / `model_tag` / `step` into an engine, on
/// the GPU when there is one.
pub fn load_engine(source: Source, model_tag: Option<&str>, step: Option<usize>) -> Result<Engine> {
    load_engine_with(source, model_tag, step, WeightFormat::F32)
}

/// [`load_engine`] with the weights in `weights`. Reduced precision exists only on the native CPU
/// path, so for bf16 and int8 the checkpoint is loaded into host memory even when a GPU exists.
pub fn load_engine_with(
    source: Source,
    model_tag: Option<&str>,
    step: Option<usize>,
    weights: WeightFormat,
) -> Result<Engine> {
    let tokenizer = crate::tokenizer::load()?;
    let root = source.checkpoints_dir();
    let tag = match model_tag {
        Some(tag) => tag.to_string(),
        None => default_model_tag(&root)?,
    };
    let dir = root.join(&tag);
    let step = match step {
        Some(step) => step,
        None => crate::checkpoint::latest_step(&dir)?.with_context(|| {
            format!("no checkpoint in {}: train that stage first or pick --model-tag", dir.display())
        })?,
    };
    let device = if weights == WeightFormat::F32 { Device::cuda_if_available(0)? } else { Device::Cpu };
    let ckpt = crate::checkpoint::load(&dir, step, &device, false, Some(&tokenizer.fingerprint()))?;
    let model = GPT::new(&ckpt.meta.model_config, VarBuilder::from_tensors(ckpt.model, DType::F32, &device))?;
    Engine::with_weights(model, tokenizer, weights)
}

/// The original's choice of model when none is named: the `d<N>` directory with the largest N,
/// else the most recently modified directory.
pub fn default_model_tag(root: &Path) -> Result<String> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("no checkpoints in {}: train that stage first or pick --source", root.display()))?;
    let mut tags = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        if entry.file_type()?.is_dir() {
            let modified = entry.metadata()?.modified()?;
            tags.push((entry.file_name().to_string_lossy().into_owned(), modified));
        }
    }
    let depth = |tag: &str| tag.strip_prefix('d').and_then(|d| d.parse::<usize>().ok());
    if let Some((tag, _)) = tags.iter().filter_map(|(t, _)| depth(t).map(|d| (t, d))).max_by_key(|&(_, d)| d) {
        return Ok(tag.clone());
    }
    match tags.into_iter().max_by_key(|(_, modified)| *modified) {
        Some((tag, _)) => Ok(tag),
        None => bail!("no model directories in {}: train that stage first", root.display()),
    }
}

pub fn run(mut args: ChatArgs) -> Result<()> {
    if let Some(ChatCommand::Eval(eval_args)) = args.command.take() {
        return crate::eval::chat::run(eval_args);
    }
    let engine = load_engine_with(args.source, args.model_tag.as_deref(), args.step, args.weights)?;
    let mut chat = Chat::new(&engine, &args)?;
    if let Some(prompt) = &args.prompt {
        return chat.reply(prompt);
    }
    println!("nanochat interactive mode\nType 'quit' or 'exit' to end, 'clear' to start a new conversation.");
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    loop {
        let line = match editor.readline("\nUser: ") {
            Ok(line) => line,
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => break,
            Err(e) => return Err(e).context("reading your input"),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        // history is a convenience: failing to record a line must not end the chat
        let _ = editor.add_history_entry(input);
        match input.to_lowercase().as_str() {
            "quit" | "exit" => break,
            "clear" => {
                chat.clear();
                println!("Conversation cleared.");
            }
            // a failed turn (say, a conversation grown too long) is reported and the chat goes on
            _ => {
                if let Err(e) = chat.reply(input) {
                    println!("\nerror: {e:#}");
                }
            }
        }
    }
    println!("Goodbye!");
    Ok(())
}

/// One conversation: its tokens so far and the settings of every reply.
struct Chat<'a> {
    engine: &'a Engine,
    tokens: Vec<u32>,
    opts: GenerateOptions,
    user_start: u32,
    user_end: u32,
    assistant_start: u32,
}

impl<'a> Chat<'a> {
    fn new(engine: &'a Engine, args: &ChatArgs) -> Result<Self> {
        let tok = engine.tokenizer();
        let id = |name: &str| tok.special_id(name).with_context(|| format!("the tokenizer has no {name}"));
        Ok(Self {
            engine,
            tokens: vec![tok.bos_id()],
            opts: GenerateOptions {
                num_samples: 1,
                max_tokens: args.max_tokens,
                temperature: args.temperature,
                top_k: Some(args.top_k),
                seed: args.seed,
            },
            user_start: id("<|user_start|>")?,
            user_end: id("<|user_end|>")?,
            assistant_start: id("<|assistant_start|>")?,
        })
    }

    fn clear(&mut self) {
        self.tokens.truncate(1);
    }

    /// Adds the user's turn, streams the assistant's reply to stdout and adds it too. On error
    /// the conversation is left as it was before the turn.
    fn reply(&mut self, input: &str) -> Result<()> {
        let tok = self.engine.tokenizer();
        let mut prompt = self.tokens.clone();
        prompt.push(self.user_start);
        prompt.extend(tok.encode(input));
        prompt.extend([self.user_end, self.assistant_start]);
        let assistant_end = self.engine.specials().assistant_end;

        let mut out = std::io::stdout().lock();
        write!(out, "\nAssistant: ")?;
        out.flush()?;
        let mut text = TextStream::new();
        let mut reply = Vec::new();
        for step in self.engine.generate(&prompt, &self.opts)? {
            let token = step?.0[0];
            reply.push(token);
            write!(out, "{}", text.push(tok, token))?;
            out.flush()?;
        }
        writeln!(out, "{}", text.finish())?;
        // a reply cut by max_tokens is closed all the same, so the next turn reads well-formed
        if reply.last() != Some(&assistant_end) {
            reply.push(assistant_end);
        }
        prompt.extend(reply);
        self.tokens = prompt;
        self.opts.seed = self.opts.seed.wrapping_add(1);
        Ok(())
    }
}
