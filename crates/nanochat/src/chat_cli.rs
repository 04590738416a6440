//! `nanochat chat`: talk to a trained model in the terminal, with line editing and history,
//! the reply streamed as it is generated. `-p "..."` asks one question and exits.
//!
//! Like the original's `chat_cli`, the conversation is kept as tokens: `<|bos|>`, then per turn
//! `<|user_start|>` text `<|user_end|>` `<|assistant_start|>` reply `<|assistant_end|>`, the reply
//! including any calculator call and its forced answer exactly as generated.
//!
//! `nanochat chat eval ...` runs the chat evaluations instead (see [`crate::eval::chat`]).

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rustyline::error::ReadlineError;

use crate::checkpoint::{ModelArgs, Source};
use crate::engine::{Engine, GenerateOptions, SamplingArgs, TextStream};
use crate::model::decode::WeightFormat;

#[derive(Args, Debug)]
// `chat eval` takes its own options; mixing them with the chat's (`chat -p x eval`) is an error
#[command(args_conflicts_with_subcommands = true)]
pub struct ChatArgs {
    #[command(subcommand)]
    pub command: Option<ChatCommand>,
    /// Ask this one question, print the reply and exit.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub model: ModelArgs,
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

impl ChatArgs {
    /// What running this command downloads on first use: `chat eval`'s task data.
    pub fn downloads(&self) -> Vec<crate::data::sources::RemoteFile> {
        match &self.command {
            Some(ChatCommand::Eval(eval)) => eval.downloads(),
            None => Vec::new(),
        }
    }
}

pub fn run(mut args: ChatArgs) -> Result<()> {
    if let Some(ChatCommand::Eval(eval_args)) = args.command.take() {
        return crate::eval::chat::run(eval_args);
    }
    let engine = args.model.load_engine(Source::Sft, args.weights)?;
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
                max_tokens: args.sampling.max_tokens,
                temperature: args.sampling.temperature,
                top_k: Some(args.sampling.top_k),
                seed: args.seed,
                ..GenerateOptions::default()
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
