//! `nanochat bench logits`: a trained model's logits and greedy continuation for one prompt, as one
//! JSON line, for side-by-side checks against other implementations of the same model
//! (`bench/hf_check.py` compares them with transformers running the exported model).

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde_json::json;

use crate::checkpoint::{ModelArgs, Source};
use crate::conversation::{render_for_completion, Conversation, Message, Role};
use crate::engine::GenerateOptions;
use crate::model::decode::WeightFormat;

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text: scored after <|bos|>, or with --chat sent as a user message and rendered for the
    /// assistant's reply, as `chat` does.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a conversation.
    #[arg(long)]
    pub chat: bool,
    /// Greedy tokens to generate after the prompt (stopping early at <|assistant_end|> or <|bos|>).
    #[arg(long, default_value_t = 20)]
    pub greedy: usize,
}

pub fn run(args: &LogitsArgs) -> Result<()> {
    let engine = args.model.load_engine(Source::Sft, WeightFormat::F32)?;
    let tokenizer = engine.tokenizer();
    let ids = if args.chat {
        let conversation = Conversation {
            messages: vec![Message::new(Role::User, args.prompt.clone()), Message::new(Role::Assistant, "")],
        };
        render_for_completion(tokenizer, &conversation)?
    } else {
        let mut ids = vec![tokenizer.bos_id()];
        ids.extend(tokenizer.encode(&args.prompt));
        ids
    };
    let model = engine.model();
    let idx = Tensor::new(ids.as_slice(), model.rotary().0.device())?.unsqueeze(0)?;
    let logits = model.forward(&idx, None)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let opts = GenerateOptions { max_tokens: args.greedy, temperature: 0.0, ..GenerateOptions::default() };
    let (rows, _) = engine.generate_batch(&ids, &opts)?;
    let row = rows.into_iter().next().context("no generated row")?;
    let greedy = &row[ids.len()..];
    let line = json!({
        "ids": ids,
        "logits": logits,
        "greedy": greedy,
        "greedy_text": tokenizer.decode(greedy),
        "rotary": engine.model().config().rotary,
    });
    println!("{line}");
    Ok(())
}
