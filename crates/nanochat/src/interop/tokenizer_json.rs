//! Our tokenizer as a Hugging Face `tokenizer.json` and back: the form transformers' tiktoken
//! converter gives the original's tokenizer (and which its nanochat conversion script writes).
//!
//! That form is a byte-level BPE: the vocabulary maps each token's bytes, spelled with GPT-2's
//! printable stand-in for every byte, to its id (= tiktoken rank); the merges list, for every token,
//! each split into two tokens, ordered by the rank of the result, which makes its merging equal to
//! tiktoken's lowest-rank-first rule; the pre-tokenizer splits with nanochat's regex and then maps
//! bytes; the nine chat specials are added tokens after the mergeable ones.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// GPT-2's byte stand-ins: printable bytes stand for themselves, the others for the 256 code
/// points from U+0100 up, in byte order.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

fn spell(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// `tokenizer.json` of `tokenizer`.
pub fn to_json(tokenizer: &bpe::Tokenizer) -> Value {
    let table = byte_to_char();
    let tokens = tokenizer.mergeable_tokens();
    let ranks: HashMap<&[u8], usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_slice(), i)).collect();
    let vocab: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (spell(t, &table), json!(i))).collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (rank, token) in tokens.iter().enumerate() {
        let mut splits: Vec<(usize, usize, usize)> =
            (1..token.len()).filter_map(|i| Some((*ranks.get(&token[..i])?, *ranks.get(&token[i..])?, rank))).collect();
        splits.sort();
        merges.extend(splits);
    }
    let merges: Vec<Value> =
        merges.iter().map(|&(l, r, _)| json!([spell(&tokens[l], &table), spell(&tokens[r], &table)])).collect();
    let added: Vec<Value> = bpe::SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": tokens.len() + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern()}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merges},
    })
}

/// Larger than any real tokenizer.json (a few MB for 65,536 tokens).
const MAX_TOKENIZER_JSON: u64 = 256 << 20;

/// The tokenizer of a `tokenizer.json` in the form [`to_json`] writes (and transformers' tiktoken
/// converter): anything else (another pre-tokenizer, a normalizer, other special tokens) is
/// refused, since it would not encode like nanochat.
pub fn from_file(path: &Path) -> Result<bpe::Tokenizer> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    ensure!(len <= MAX_TOKENIZER_JSON, "{} is {len} bytes: too large for a tokenizer", path.display());
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    from_json(&v).with_context(|| format!("{} is not a nanochat tokenizer", path.display()))
}

pub fn from_json(v: &Value) -> Result<bpe::Tokenizer> {
    let model = v.get("model").context("no model")?;
    ensure!(model.get("type").and_then(Value::as_str) == Some("BPE"), "its model is not BPE");
    ensure!(v.get("normalizer").is_none_or(Value::is_null), "it has a normalizer, which nanochat does not");
    ensure!(model.get("byte_fallback").and_then(Value::as_bool) != Some(true), "it uses byte fallback");
    let pattern = split_pattern(v.get("pre_tokenizer").context("no pre_tokenizer")?)?;
    let vocab = model.get("vocab").and_then(Value::as_object).context("no vocab")?;
    let mut by_char = HashMap::new();
    for (b, c) in byte_to_char().iter().enumerate() {
        by_char.insert(*c, b as u8);
    }
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; vocab.len()];
    for (spelled, id) in vocab {
        let id = id.as_u64().and_then(|i| usize::try_from(i).ok()).filter(|&i| i < tokens.len());
        let id = id.with_context(|| format!("the ids of the vocabulary are not 0..{}", tokens.len()))?;
        let bytes = spelled
            .chars()
            .map(|c| by_char.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .with_context(|| format!("token {spelled:?} is not byte-level"))?;
        ensure!(tokens[id].is_none(), "id {id} appears twice in the vocabulary");
        tokens[id] = Some(bytes);
    }
    let n = tokens.len();
    let tokens: Vec<Vec<u8>> = tokens.into_iter().collect::<Option<_>>().context("the vocabulary has gaps")?;
    let mut specials: Vec<(u64, String)> = Vec::new();
    for added in v.get("added_tokens").and_then(Value::as_array).context("no added_tokens")? {
        let id = added.get("id").and_then(Value::as_u64).context("an added token without id")?;
        let content = added.get("content").and_then(Value::as_str).context("an added token without content")?;
        specials.push((id, content.to_string()));
    }
    specials.sort();
    let want: Vec<(u64, String)> =
        bpe::SPECIAL_TOKENS.iter().enumerate().map(|(i, s)| ((n + i) as u64, s.to_string())).collect();
    ensure!(specials == want, "its added tokens are {specials:?}, not nanochat's nine after the {n} mergeable ones");
    super::tokenizer_from_parts(tokens, &pattern)
}

/// The regex of a `Sequence[Split(Regex, Isolated), ByteLevel(use_regex: false)]` pre-tokenizer.
fn split_pattern(pre: &Value) -> Result<String> {
    let steps = match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => pre.get("pretokenizers").and_then(Value::as_array).context("an empty Sequence")?.clone(),
        _ => vec![pre.clone()],
    };
    let [split, byte_level] = steps.as_slice() else {
        bail!("its pre-tokenizer is not a regex split followed by byte-level mapping")
    };
    ensure!(
        split.get("type").and_then(Value::as_str) == Some("Split")
            && split.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && split.get("invert").and_then(Value::as_bool) != Some(true),
        "its pre-tokenizer does not split with a regex"
    );
    ensure!(
        byte_level.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && byte_level.get("use_regex").and_then(Value::as_bool) == Some(false)
            && byte_level.get("add_prefix_space").and_then(Value::as_bool) != Some(true),
        "its byte-level step adds a prefix space or splits again"
    );
    let pattern = split.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str);
    Ok(pattern.context("its split has no regex")?.to_string())
}
