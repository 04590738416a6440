//! The original nanochat's files: a checkpoint directory (`model_<step>.pt`, a `torch.save`d state
//! dict whose keys may carry torch.compile's `_orig_mod.` prefix, and `meta_<step>.json` with its
//! `model_config`) and a tokenizer directory (`tokenizer.pkl`, a pickled tiktoken `Encoding`, and
//! `token_bytes.pt`, the byte length of every token).
//!
//! Only the original's first architecture is ours. Its later one (value embeddings, sliding
//! windows, smear, backout, per-layer lambdas, rotary base 100k) shows in the meta's
//! `model_config` and in the parameters, and is refused naming what it has. Checkpoints of the
//! versions in between, which padded the vocabulary to a multiple of 64, are read with the padding
//! rows dropped (they are never used: the original crops the logits to the vocabulary).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde_json::Value;

use super::pickle::{self, Allowed, Global, Obj};
use super::torch::{Contents, TorchFile, TorchTensor};
use super::{Location, Plan, Sources, Weight};
use crate::checkpoint::Source;
use crate::model::{GPTConfig, RotaryTables};

/// Larger than any real tokenizer.pkl (~1 MB for 65,536 tokens).
const MAX_TOKENIZER_PICKLE: u64 = 256 << 20;
/// Larger than any real meta_<step>.json.
const MAX_META: u64 = 16 << 20;
/// The `model_config` keys of the first architecture.
const V0_CONFIG: [&str; 6] = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"];

/// The original's later architecture, recognised by its parameters: (name prefix or suffix, what
/// it is). A state dict key matches when it starts with the prefix or contains it as a component.
const NEWER_PARAMS: [(&str, &str); 8] = [
    ("value_embeds.", "value embeddings (value_embeds)"),
    ("value_embed.", "value embeddings (value_embed)"),
    (".ve_gate.", "value-embedding gates (attn.ve_gate)"),
    ("v0_lambdas", "value-embedding lambdas (v0_lambdas)"),
    ("resid_lambdas", "per-layer residual lambdas (resid_lambdas)"),
    ("x0_lambdas", "per-layer input-embedding lambdas (x0_lambdas)"),
    ("smear_", "smear (smear_gate, smear_lambda)"),
    ("backout_lambda", "backout (backout_lambda)"),
];

/// The steps of the checkpoints in `dir` (`model_<step>.pt` files), ascending.
fn steps(dir: &Path) -> Result<Vec<usize>> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("model_").and_then(|s| s.strip_suffix(".pt")).and_then(|s| s.parse().ok())
        {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    ensure!(len <= cap, "{} is {len} bytes, too large for what it should hold", path.display());
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The stage the original's directory layout says: `<base>/<stage>_checkpoints/<tag>/`.
fn stage_of(dir: &Path) -> Option<Source> {
    let parent = std::fs::canonicalize(dir).ok()?.parent()?.file_name()?.to_string_lossy().into_owned();
    Some(match parent.as_str() {
        "base_checkpoints" => Source::Base,
        "mid_checkpoints" => Source::Mid,
        "chatsft_checkpoints" => Source::Sft,
        "chatrl_checkpoints" => Source::Rl,
        _ => return None,
    })
}

/// The model config of an original meta, refusing the later architecture and anything unknown.
fn config_of(meta: &Value, unsupported: &mut Vec<String>) -> Result<GPTConfig> {
    let cfg = meta.get("model_config").and_then(Value::as_object).context("the meta has no model_config")?;
    for (key, value) in cfg {
        if key == "window_pattern" {
            unsupported.push(format!("sliding-window attention (window_pattern {value})"));
        } else if !V0_CONFIG.contains(&key.as_str()) {
            unsupported.push(format!("model_config.{key} = {value}"));
        }
    }
    let get = |key: &str| -> Result<usize> {
        cfg.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| format!("model_config.{key} is missing or not a size"))
    };
    Ok(GPTConfig {
        sequence_len: get("sequence_len")?,
        vocab_size: get("vocab_size")?,
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_kv_head: get("n_kv_head")?,
        n_embd: get("n_embd")?,
        rotary: RotaryTables::Bf16,
    })
}

/// The error for a checkpoint of an architecture that is not ours.
fn refuse(path: &Path, unsupported: &[String]) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is a checkpoint of a newer nanochat architecture, which is not supported yet: it has {}. Only the \
         original's first architecture (the one transformers' NanoChatForCausalLM implements) can be imported",
        path.display(),
        unsupported.join(", ")
    )
}

/// The plan to import the checkpoint of `step` (default: the latest) in the original's directory
/// `dir`, with the tokenizer from `tokenizer_dir` or found beside it.
pub fn plan(dir: &Path, step: Option<usize>, tokenizer_dir: Option<&Path>) -> Result<Plan> {
    let available = steps(dir)?;
    let step = match step {
        Some(step) => step,
        None => *available.last().with_context(|| {
            format!("no model_<step>.pt in {}: not a checkpoint directory of the original nanochat", dir.display())
        })?,
    };
    ensure!(available.contains(&step), "no model_{step:06}.pt in {} (steps there: {available:?})", dir.display());
    let model_path = dir.join(format!("model_{step:06}.pt"));
    let meta_path = dir.join(format!("meta_{step:06}.json"));
    let meta: Value = serde_json::from_slice(&read_capped(&meta_path, MAX_META)?)
        .with_context(|| format!("{} is not JSON", meta_path.display()))?;
    let mut unsupported = Vec::new();
    let mut config = config_of(&meta, &mut unsupported).with_context(|| format!("reading {}", meta_path.display()))?;
    super::check_config(&config).with_context(|| format!("{}: its model_config cannot run", meta_path.display()))?;

    let file = TorchFile::open(&model_path)?;
    let Contents::StateDict(entries) = &file.contents else {
        bail!("{} holds a single tensor, not a model's state dict", model_path.display());
    };
    let entries: Vec<(String, TorchTensor)> =
        entries.iter().map(|(k, t)| (k.strip_prefix("_orig_mod.").unwrap_or(k).to_string(), t.clone())).collect();
    // every layer has six weights: a config claiming more layers than the file has tensors is not
    // this file's (and must not size anything)
    ensure!(
        config.n_layer.saturating_mul(6).saturating_add(2) <= entries.len(),
        "{}: model_config says {} layers, but the state dict has {} tensors",
        model_path.display(),
        config.n_layer,
        entries.len()
    );
    let expected = super::names::table(&config)?;
    let mut newer = BTreeSet::new();
    for (name, _) in &entries {
        if let Some((_, what)) = NEWER_PARAMS.iter().find(|(p, _)| name.starts_with(p) || name.contains(p)) {
            newer.insert(*what);
        } else if !expected.iter().any(|p| p.ours == *name) {
            unsupported.push(format!("parameter {name}"));
        }
    }
    unsupported.splice(0..0, newer.into_iter().map(str::to_string));
    if !unsupported.is_empty() {
        return Err(refuse(&model_path, &unsupported));
    }

    let mut weights = Vec::with_capacity(expected.len());
    for super::names::NamePair { ours: name, rows, cols, .. } in expected {
        let tensor = entries
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.clone())
            .with_context(|| format!("{} has no {name}: not a complete checkpoint", model_path.display()))?;
        let padded = name == "transformer.wte.weight" || name == "lm_head.weight";
        let fits = tensor.shape.len() == 2
            && tensor.shape[1] == cols
            && (tensor.shape[0] == rows || (padded && tensor.shape[0] > rows));
        ensure!(
            fits,
            "{}: {name} is {:?}, but its model_config needs [{rows}, {cols}]",
            model_path.display(),
            tensor.shape
        );
        ensure!(
            matches!(tensor.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64),
            "{}: {name} holds {:?}, not floating point weights",
            model_path.display(),
            tensor.dtype
        );
        weights.push(Weight { name, rows, cols, dtype: tensor.dtype, at: Location::Torch { file: 0, tensor } });
    }

    let tok_dir = find_tokenizer(dir, tokenizer_dir)?;
    let tokenizer = tokenizer_from_pickle(&tok_dir.join("tokenizer.pkl"))?;
    let token_bytes = tok_dir.join("token_bytes.pt");
    if token_bytes.exists() {
        check_token_bytes(&token_bytes, &tokenizer)?;
    }
    ensure!(
        tokenizer.vocab_size() == config.vocab_size,
        "the tokenizer in {} has {} tokens but the model's vocabulary is {}: not the tokenizer it was trained with",
        tok_dir.display(),
        tokenizer.vocab_size(),
        config.vocab_size
    );
    config.rotary = RotaryTables::Bf16;
    let provenance = serde_json::json!({
        "imported_from": model_path.display().to_string(),
        "format": "nanochat (the original's model_<step>.pt)",
        "tokenizer": tok_dir.display().to_string(),
        "original_meta": meta,
    });
    Ok(Plan {
        config,
        tokenizer,
        step,
        stage: stage_of(dir),
        provenance,
        weights,
        sources: Sources { torch: vec![file], safetensors: vec![] },
    })
}

/// The tokenizer directory of a checkpoint: the one given, else the checkpoint's own directory
/// (hub repositories keep them together), else `../../tokenizer` (`$NANOCHAT_BASE_DIR/tokenizer`
/// for `$NANOCHAT_BASE_DIR/<stage>_checkpoints/<tag>`).
fn find_tokenizer(dir: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(given) = given {
        ensure!(given.join("tokenizer.pkl").is_file(), "no tokenizer.pkl in {}", given.display());
        return Ok(given.to_path_buf());
    }
    let beside = dir.to_path_buf();
    let layout = dir.join("..").join("..").join("tokenizer");
    for candidate in [beside, layout] {
        if candidate.join("tokenizer.pkl").is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no tokenizer.pkl beside {} or in ../../tokenizer: pass --tokenizer DIR (the original's \
         $NANOCHAT_BASE_DIR/tokenizer, with tokenizer.pkl and token_bytes.pt)",
        dir.display()
    )
}

/// The tokenizer of the original's `tokenizer.pkl`: a tiktoken `Encoding` of mergeable ranks
/// (rank = id) and the nine chat specials after them.
pub fn tokenizer_from_pickle(path: &Path) -> Result<bpe::Tokenizer> {
    let data = read_capped(path, MAX_TOKENIZER_PICKLE)?;
    let p =
        pickle::read(&data, Allowed::Tiktoken).with_context(|| format!("{}: refusing to load it", path.display()))?;
    let bad = |what: &str| anyhow::anyhow!("{}: not the original's tokenizer: {what}", path.display());
    let state = match p.obj(p.root) {
        Some(Obj::Instance { class: Global::TiktokenEncoding, state: Some(state) }) => *state,
        _ => return Err(bad("not a pickled tiktoken Encoding")),
    };
    if let Some(name) = p.str(state) {
        return Err(bad(&format!("it names tiktoken's built-in encoding {name:?}, not a trained one")));
    }
    let pattern = p.get(state, "pat_str").and_then(|v| p.str(v)).ok_or_else(|| bad("no pat_str"))?;
    let ranks = p.get(state, "mergeable_ranks").and_then(|v| p.dict(v)).ok_or_else(|| bad("no mergeable_ranks"))?;
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; ranks.len()];
    for &(k, v) in ranks {
        let bytes = p.bytes(k).ok_or_else(|| bad("a mergeable token that is not bytes"))?;
        let rank = match v {
            pickle::Value::Int(r) => usize::try_from(r).ok().filter(|&r| r < tokens.len()),
            _ => None,
        };
        let rank = rank.ok_or_else(|| bad("ranks are not 0..n"))?;
        ensure!(tokens[rank].is_none(), bad(&format!("rank {rank} appears twice")));
        tokens[rank] = Some(bytes.to_vec());
    }
    let n = tokens.len();
    let tokens: Vec<Vec<u8>> = tokens.into_iter().collect::<Option<_>>().ok_or_else(|| bad("ranks are not 0..n"))?;
    let specials = p.get(state, "special_tokens").and_then(|v| p.dict(v)).ok_or_else(|| bad("no special_tokens"))?;
    let mut found: Vec<(i64, String)> = Vec::with_capacity(specials.len());
    for &(k, v) in specials {
        let (Some(name), pickle::Value::Int(id)) = (p.str(k), v) else { return Err(bad("malformed special_tokens")) };
        found.push((id, name.to_string()));
    }
    found.sort();
    let want: Vec<(i64, String)> =
        bpe::SPECIAL_TOKENS.iter().enumerate().map(|(i, s)| ((n + i) as i64, s.to_string())).collect();
    ensure!(
        found == want,
        bad(&format!("its special tokens are {found:?}, not nanochat's nine after the {n} mergeable tokens"))
    );
    super::tokenizer_from_parts(tokens, pattern).with_context(|| format!("{}: unusable tokenizer", path.display()))
}

/// Checks the original's `token_bytes.pt` against `tokenizer`: v0's `tok_train.py` stores, per id,
/// the UTF-8 length of the token decoded on its own (invalid UTF-8 decodes to U+FFFD, 3 bytes), 0
/// for the specials. A mismatch means the two files are not from one tokenizer.
pub fn check_token_bytes(path: &Path, tokenizer: &bpe::Tokenizer) -> Result<()> {
    let mut file = TorchFile::open(path)?;
    let Contents::Tensor(t) = &file.contents else { bail!("{} is not a single tensor", path.display()) };
    let t = t.clone();
    ensure!(
        t.shape == [tokenizer.vocab_size()] && matches!(t.dtype, DType::I32 | DType::I64),
        "{}: a {:?} tensor of shape {:?}, not one length per token of a {}-token vocabulary",
        path.display(),
        t.dtype,
        t.shape,
        tokenizer.vocab_size()
    );
    let bytes = file.read(&t)?;
    let values: Vec<i64> = match t.dtype {
        DType::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into()).collect(),
        _ => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
    };
    for (id, &got) in values.iter().enumerate() {
        let want = if id < tokenizer.n_mergeable() { tokenizer.decode(&[id as u32]).len() as i64 } else { 0 };
        ensure!(
            got == want,
            "{} says token {id} has {got} bytes where tokenizer.pkl's has {want}: the two files are not from one \
             tokenizer",
            path.display()
        );
    }
    Ok(())
}
