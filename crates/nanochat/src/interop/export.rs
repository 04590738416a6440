//! `nanochat export --format hf DIR`: a trained model as a Hugging Face transformers directory that
//! `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load with no
//! custom code (transformers' own `NanoChatForCausalLM`).
//!
//! Written: `config.json` (v0's RMSNorm epsilon, f32::EPSILON; softcap 15; relu2; rotary base
//! 10,000), `model.safetensors` under transformers' names ([`super::names`]), `generation_config.json`
//! (stops at `<|assistant_end|>` and `<|bos|>`, as the engine does), `tokenizer.json`
//! ([`super::tokenizer_json`]), `tokenizer_config.json` with a chat template that renders
//! conversations as nanochat does, and `special_tokens_map.json`.
//!
//! One difference cannot be exported: transformers computes the rotary tables in fp32, where a
//! model trained here (or by the original) saw bf16-rounded ones, so transformers' logits differ
//! from ours by about 1e-3 (`bench/hf_check.py` measures it). The config records the tables the
//! model was trained with (a key transformers ignores), so importing the export back is exact.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::{from_f32, hf, names, tokenizer_json};
use crate::checkpoint::tensor_file::{Planned, Writer};
use crate::checkpoint::{self, ModelArgs, Source};
use crate::common::write_atomic;
use crate::model::RotaryTables;

/// The formats `export` writes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A Hugging Face transformers directory (NanoChatForCausalLM).
    Hf,
}

/// The weight precision of an export.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// Full precision: exactly the model's weights.
    F32,
    /// Rounded to bfloat16 (nearest even): half the size.
    Bf16,
}

/// `nanochat export`.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// The directory to write (created; it must be empty or absent unless --force).
    pub dir: PathBuf,
    /// What to write: hf, a transformers directory.
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// Weight precision: f32 (exact) or bf16 (half the size, rounded to nearest even).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDtype,
    /// Write into a directory that already has files (replacing those of the same names).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Renders a conversation as nanochat's `render_conversation` does (a system message joins the
/// first user message after a blank line), and `<|assistant_start|>` for a generation prompt.
const CHAT_TEMPLATE: &str = "{%- set ns = namespace(system='') -%}\
{{- '<|bos|>' -}}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}\
{%- elif message['role'] == 'user' -%}\
{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}{%- set ns.system = '' -%}\
{%- elif message['role'] == 'assistant' -%}\
{{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}";

fn write_json(path: &std::path::Path, value: &Value) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

pub fn run_export(args: ExportArgs) -> Result<()> {
    let at = args.model.locate(Source::Sft)?;
    let tokenizer = crate::tokenizer::for_checkpoint(&at.dir)?;
    let ckpt = checkpoint::load(&at.dir, at.step, &Device::Cpu, false, Some(&tokenizer.fingerprint()))?;
    let config = &ckpt.meta.model_config;
    let dir = &args.dir;
    if dir.exists() {
        let empty = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.next().is_none();
        ensure!(
            empty || args.force,
            "{} is not empty: pick a new directory, or --force to write into it",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let dtype = match args.dtype {
        ExportDtype::F32 => DType::F32,
        ExportDtype::Bf16 => DType::BF16,
    };
    let table = names::table(config)?;
    let planned: Vec<Planned> =
        table.iter().map(|p| Planned { name: p.hf.clone(), dtype, shape: vec![p.rows, p.cols] }).collect();
    let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let mut writer = Writer::create(&dir.join("model.safetensors"), planned, &metadata)?;
    let bar = crate::common::progress_bar(table.len() as u64, "export");
    for p in &table {
        let tensor = ckpt.model.get(&p.ours).with_context(|| format!("the checkpoint has no {}", p.ours))?;
        let values = tensor.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        writer.write(&from_f32(&values, dtype)?)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    writer.finish()?;

    let special = |name: &str| tokenizer.special_id(name).with_context(|| format!("the tokenizer has no {name}"));
    let (bos, end) = (special("<|bos|>")?, special("<|assistant_end|>")?);
    let dtype_name = if dtype == DType::BF16 { "bfloat16" } else { "float32" };
    let rotary = match config.rotary {
        RotaryTables::Bf16 => "bf16",
        RotaryTables::F32 => "f32",
    };
    let mut hf_config = json!({
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": f64::from(f32::EPSILON),
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rope_theta": 10000.0,
        "final_logit_softcapping": 15.0,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": false,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": end,
        "pad_token_id": bos,
        "dtype": dtype_name,
    });
    hf_config[hf::ROTARY_KEY] = json!(rotary);
    write_json(&dir.join("config.json"), &hf_config)?;
    let generation = json!({"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos});
    write_json(&dir.join("generation_config.json"), &generation)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json::to_json(&tokenizer))?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "model_max_length": config.sequence_len,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHAT_TEMPLATE,
    });
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    let specials = json!({"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"});
    write_json(&dir.join("special_tokens_map.json"), &specials)?;
    println!(
        "exported the {} model {} step {} ({:.1} M parameters, {dtype_name}) to {}",
        format!("{:?}", at.source).to_lowercase(),
        at.tag,
        at.step,
        config.num_params() as f64 / 1e6,
        dir.display()
    );
    if config.rotary == RotaryTables::Bf16 {
        println!(
            "note: this model was trained with bf16-rounded rotary tables; transformers computes them in fp32, \
             which moves its logits by ~1e-3 (bench/hf_check.py measures it)"
        );
    }
    Ok(())
}
