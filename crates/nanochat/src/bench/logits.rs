//! `nanochat bench logits`: a trained model's logits and greedy continuation for one prompt, as one
//! JSON line, for side-by-side checks against other implementations of the same model
//! (`bench/hf_check.py` compares them with transformers running the exported model). The
//! continuation is the model's own argmax, token after token, without the calculator tool the
//! engine runs (it would write the tool's result where the model would have guessed one), as
//! transformers' `generate` computes it.

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::Args;
use serde_json::json;

use crate::checkpoint::{ModelArgs, Source};
use crate::conversation::{render_for_completion, Conversation, Message, Role};
use crate::model::decode::WeightFormat;
use crate::model::GPT;

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
    /// Greedy tokens to generate after the prompt, by the model alone (no tool), stopping early at
    /// <|assistant_end|> or <|bos|>.
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
    let stops = [engine.specials().assistant_end, engine.specials().bos];
    let greedy = greedy(model, &ids, args.greedy, stops)?;
    let line = json!({
        "ids": ids,
        "logits": logits,
        "greedy": greedy,
        "greedy_text": tokenizer.decode(&greedy),
        "rotary": engine.model().config().rotary,
    });
    println!("{line}");
    Ok(())
}

/// `steps` argmax tokens after `ids`, one full forward pass each (a few tokens of a check need no
/// KV cache), stopping before any of `stops`.
fn greedy(model: &GPT, ids: &[u32], steps: usize, stops: [u32; 2]) -> Result<Vec<u32>> {
    let mut row = ids.to_vec();
    for _ in 0..steps {
        let idx = Tensor::new(row.as_slice(), model.rotary().0.device())?.unsqueeze(0)?;
        let logits = model.forward(&idx, None)?.squeeze(0)?;
        let last = logits.get(row.len() - 1)?.to_dtype(DType::F32)?;
        let next = last.argmax(0)?.to_scalar::<u32>()?;
        if stops.contains(&next) {
            break;
        }
        row.push(next);
    }
    Ok(row.split_off(ids.len()))
}
