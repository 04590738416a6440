//! Hugging Face transformers directories of a `NanoChatForCausalLM` (`model_type: "nanochat"`):
//! `config.json`, the weights (`model.safetensors`, its shards with `model.safetensors.index.json`,
//! or a `pytorch_model.bin`), and the tokenizer (`tokenizer.json`, or the original's
//! `tokenizer.pkl`).
//!
//! transformers' class is the original's first architecture, with two conventions of its own,
//! checked against its modeling code and a forward pass (`bench/interop_fixtures.py`): the rotary
//! tables are fp32 (recorded in the imported config, [`RotaryTables::F32`]), and RMSNorm's epsilon
//! comes from the config (1e-6 by default, v0 uses 1.19e-7: both change activations by less than
//! 1e-6 relative, far below what the weights' precision decides, so any small epsilon is taken).
//! Everything else the config could change (activation, softcap, rotary base or scaling, biases,
//! MLP width) must have nanochat's value, or the model is refused naming the setting.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde_json::Value;

use super::names;
use super::torch::{Contents, TorchFile};
use super::{tokenizer_json, Location, Plan, Sources, Weight};
use crate::checkpoint::tensor_file::Reader;
use crate::model::{GPTConfig, RotaryTables};

/// The config key [`super::export`] adds to say the model was trained with bf16 rotary tables
/// (transformers ignores it), so that a model exported from here comes back unchanged.
pub const ROTARY_KEY: &str = "nanochat_rotary_tables";
/// RMSNorm epsilons up to this change normalised activations by < 5e-6 relative.
const MAX_EPS: f64 = 1e-5;
const MAX_JSON: u64 = 64 << 20;

fn read_json(path: &Path) -> Result<Value> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    ensure!(len <= MAX_JSON, "{} is {len} bytes: too large for what it should hold", path.display());
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Our config for a transformers `config.json`, refusing settings nanochat does not have.
pub fn config_of(cfg: &Value) -> Result<GPTConfig> {
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    ensure!(model_type == "nanochat", "model_type {model_type:?}: not a nanochat model (NanoChatForCausalLM)");
    let size = |key: &str| -> Result<usize> {
        cfg.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| format!("{key} is missing or not a size"))
    };
    let (n_embd, n_head) = (size("hidden_size")?, size("num_attention_heads")?);
    let n_kv_head =
        if cfg.get("num_key_value_heads").is_none_or(Value::is_null) { n_head } else { size("num_key_value_heads")? };
    let mut unsupported = Vec::new();
    let mut want = |key: &str, ok: bool, nanochat: &str| {
        if !ok {
            unsupported.push(format!("{key} = {} (nanochat: {nanochat})", cfg.get(key).unwrap_or(&Value::Null)));
        }
    };
    let num = |key: &str| cfg.get(key).and_then(Value::as_f64);
    want("hidden_act", cfg.get("hidden_act").and_then(Value::as_str) == Some("relu2"), "relu2");
    want("final_logit_softcapping", num("final_logit_softcapping") == Some(15.0), "15.0");
    want("attention_bias", cfg.get("attention_bias").and_then(Value::as_bool) != Some(true), "false");
    want("intermediate_size", size("intermediate_size").ok() == Some(4 * n_embd), "4 × hidden_size");
    want("rms_norm_eps", num("rms_norm_eps").is_none_or(|e| (0.0..=MAX_EPS).contains(&e)), "≤ 1e-5");
    let head_dim_ok = cfg.get("head_dim").is_none_or(|h| h.is_null() || h.as_u64() == Some((n_embd / n_head) as u64));
    want("head_dim", head_dim_ok, "hidden_size / num_attention_heads");
    let rope = cfg.get("rope_parameters").or_else(|| cfg.get("rope_scaling")).filter(|r| !r.is_null());
    let theta = rope.and_then(|r| r.get("rope_theta")).or_else(|| cfg.get("rope_theta")).and_then(Value::as_f64);
    want("rope_theta", theta.is_none_or(|t| t == 10_000.0), "10000");
    let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str);
    want("rope_parameters.rope_type", rope_type.is_none_or(|t| t == "default"), "default");
    if !unsupported.is_empty() {
        bail!("settings nanochat does not have: {}", unsupported.join(", "));
    }
    let rotary = match cfg.get(ROTARY_KEY).and_then(Value::as_str) {
        Some("bf16") => RotaryTables::Bf16,
        _ => RotaryTables::F32,
    };
    let config = GPTConfig {
        sequence_len: size("max_position_embeddings")?,
        vocab_size: size("vocab_size")?,
        n_layer: size("num_hidden_layers")?,
        n_head,
        n_kv_head,
        n_embd,
        rotary,
    };
    super::check_config(&config)?;
    Ok(config)
}

/// The weight files of a transformers directory, and which file holds each tensor.
fn open_weights(dir: &Path) -> Result<(Sources, HashMap<String, Location>)> {
    let mut sources = Sources::default();
    let mut at = HashMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let map = read_json(&index)?;
        let map = map.get("weight_map").and_then(Value::as_object).context("the index has no weight_map")?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                // a shard is a file of this directory, nothing else
                let plain = Path::new(name).file_name().is_some_and(|f| f == name) && !name.starts_with('.');
                ensure!(plain, "{}: shard {name:?} is not a file name", index.display());
                Ok(dir.join(name))
            })
            .collect::<Result<_>>()?
    } else if dir.join("pytorch_model.bin").is_file() {
        let file = TorchFile::open(&dir.join("pytorch_model.bin"))?;
        let Contents::StateDict(entries) = &file.contents else { bail!("pytorch_model.bin is not a state dict") };
        for (name, tensor) in entries {
            at.insert(name.clone(), Location::Torch { file: 0, tensor: tensor.clone() });
        }
        sources.torch.push(file);
        return Ok((sources, at));
    } else {
        bail!("{} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin", dir.display());
    };
    for (i, path) in files.iter().enumerate() {
        let reader = Reader::open(path, None)?;
        for entry in &reader.header.entries {
            ensure!(
                at.insert(entry.name.clone(), Location::Safetensors { file: i, entry: entry.clone() }).is_none(),
                "tensor {} is in two shards",
                entry.name
            );
        }
        sources.safetensors.push(reader);
    }
    Ok((sources, at))
}

fn shape_and_dtype(at: &Location) -> (Vec<usize>, DType) {
    match at {
        Location::Torch { tensor, .. } => (tensor.shape.clone(), tensor.dtype),
        Location::Safetensors { entry, .. } => (entry.shape.clone(), entry.dtype),
    }
}

/// The plan to import the transformers directory `dir`.
pub fn plan(dir: &Path) -> Result<Plan> {
    let config_path = dir.join("config.json");
    let cfg = read_json(&config_path)?;
    let mut config = config_of(&cfg).with_context(|| format!("{}: cannot import this model", config_path.display()))?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        tokenizer_json::from_file(&dir.join("tokenizer.json"))?
    } else if dir.join("tokenizer.pkl").is_file() {
        super::original::tokenizer_from_pickle(&dir.join("tokenizer.pkl"))?
    } else {
        bail!("{} has no tokenizer.json (or the original's tokenizer.pkl)", dir.display());
    };
    // a vocabulary padded beyond the tokenizer (rows never used) is cut to it
    ensure!(
        tokenizer.vocab_size() <= config.vocab_size,
        "the tokenizer has {} tokens, more than the model's vocabulary of {}",
        tokenizer.vocab_size(),
        config.vocab_size
    );
    config.vocab_size = tokenizer.vocab_size();
    let (sources, mut at) = open_weights(dir)?;
    // six weights a layer: a config claiming more layers than there are tensors sizes nothing
    ensure!(
        config.n_layer.saturating_mul(6).saturating_add(1) <= at.len(),
        "{}: num_hidden_layers is {} but the weights hold {} tensors",
        config_path.display(),
        config.n_layer,
        at.len()
    );
    let tied = cfg.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true);
    let table = names::table(&config)?;
    let mut weights = Vec::with_capacity(table.len());
    for p in &table {
        let location = match at.remove(&p.hf) {
            Some(location) => location,
            None if tied && p.hf == "lm_head.weight" => {
                weights.first().map(|w: &Weight| w.at.clone()).context("no embedding to tie lm_head to")?
            }
            None => bail!("{} has no tensor {}: not a complete model", dir.display(), p.hf),
        };
        let (shape, dtype) = shape_and_dtype(&location);
        let padded = p.ours == "transformer.wte.weight" || p.ours == "lm_head.weight";
        let fits = shape.len() == 2 && shape[1] == p.cols && (shape[0] == p.rows || (padded && shape[0] > p.rows));
        ensure!(fits, "{}: {} is {shape:?}, but its config needs [{}, {}]", dir.display(), p.hf, p.rows, p.cols);
        ensure!(
            matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64),
            "{}: {} holds {dtype:?}, not floating point weights",
            dir.display(),
            p.hf
        );
        weights.push(Weight { name: p.ours.clone(), rows: p.rows, cols: p.cols, dtype, at: location });
    }
    let mut extra: Vec<&String> = at.keys().collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!("{} has tensors NanoChatForCausalLM does not: {name} (and {} more)", dir.display(), extra.len() - 1);
    }
    let kept: BTreeMap<&str, &Value> = ["architectures", "model_type", "rms_norm_eps", "dtype", "torch_dtype"]
        .into_iter()
        .filter_map(|k| Some((k, cfg.get(k)?)))
        .collect();
    let provenance = serde_json::json!({
        "imported_from": dir.display().to_string(),
        "format": "Hugging Face transformers (NanoChatForCausalLM)",
        "config": kept,
    });
    Ok(Plan { config, tokenizer, step: 0, stage: None, provenance, weights, sources })
}
