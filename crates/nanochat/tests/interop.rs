//! `nanochat import` and `export` against fixtures made by the original nanochat and by
//! transformers (`tests/fixtures/interop/`, from `bench/interop_fixtures.py`): each import gives
//! the logits of the code that made it within 1e-4 and its greedy tokens exactly; the original's
//! tokenizer encodes and renders conversations like the original; an export imports back
//! bit-exactly; hostile pickles and files are refused without running anything or falling over;
//! a checkpoint of the original's newer architecture is refused naming what it has.
//! Each comparison prints its max difference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use nanochat::checkpoint::{self, Checkpoint};
use nanochat::conversation::Conversation;
use nanochat::engine::{Engine, GenerateOptions};
use nanochat::interop::{self, original, pickle, tokenizer_json, StoreDtype};
use nanochat::model::decode::WeightFormat;
use nanochat::model::{GPTConfig, RotaryTables, GPT};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

fn expected(kind: &str) -> Result<(Value, HashMap<String, Tensor>)> {
    let dir = fixtures().join(kind);
    let json: Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json"))?)?;
    let logits = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    Ok((json, logits))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn nanochat(args: &[&str], base: &Path) -> Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_nanochat")).args(args).env("NANOCHAT_BASE_DIR", base).output()?)
}

fn ok(out: std::process::Output) -> Result<String> {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "command failed:\n{text}");
    Ok(text)
}

fn failed(out: std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the command should have failed:\n{text}");
    text
}

/// Imports `src` through the library into `dir` and loads it back as the commands do.
fn import_into(src: &Path, dir: &Path) -> Result<(Checkpoint, bpe::Tokenizer)> {
    let plan = interop::plan_local(src, None, None)?;
    let step = plan.step;
    interop::write_checkpoint(plan, dir, StoreDtype::Keep)?;
    let tokenizer = nanochat::tokenizer::for_checkpoint(dir)?;
    let ckpt = checkpoint::load(dir, step, &Device::Cpu, false, Some(&tokenizer.fingerprint()))?;
    Ok((ckpt, tokenizer))
}

fn model(config: &GPTConfig, ckpt: &Checkpoint) -> Result<GPT> {
    Ok(GPT::new(config, VarBuilder::from_tensors(ckpt.model.clone(), DType::F32, &Device::Cpu))?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(a.dims() == b.dims(), "shapes {:?} and {:?}", a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Logits of every prompt within 1e-4 of the fixture's, the prompt's ids from the imported
/// tokenizer, and greedy tokens through the engine (the path `chat` takes) equal to the fixture's.
fn check_against(kind: &str, gpt: GPT, tokenizer: bpe::Tokenizer) -> Result<()> {
    let (json, logits) = expected(kind)?;
    let original_prompts = expected("original")?.0["prompts"].clone();
    let engine = Engine::with_weights(gpt, tokenizer.clone(), WeightFormat::F32)?;
    for (i, case) in json["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["ids"]);
        let mut encoded = vec![tokenizer.bos_id()];
        encoded.extend(tokenizer.encode(case["text"].as_str().unwrap()));
        assert_eq!(encoded, ids(&original_prompts[i]["ids"]), "{kind} prompt {i}: the imported tokenizer's ids");
        assert_eq!(encoded, prompt, "{kind} prompt {i}: ids");
        let idx = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let ours = engine.model().forward(&idx, None)?.squeeze(0)?;
        let diff = max_diff(&ours, &logits[&format!("logits.{i}")])?;
        println!("{kind} prompt {i}: logits max|diff| {diff:.3e}");
        assert!(diff <= TOL, "{kind} prompt {i}: logits differ by {diff}");
        let want = ids(&case["greedy"]);
        let stop = [tokenizer.special_id("<|assistant_end|>"), tokenizer.special_id("<|bos|>")];
        let tool = tokenizer.special_id("<|python_start|>");
        assert!(want.iter().all(|t| !stop.contains(&Some(*t)) && Some(*t) != tool), "fixture greedy hits a special");
        let opts = GenerateOptions { max_tokens: want.len(), temperature: 0.0, ..GenerateOptions::default() };
        let row = engine.generate_batch(&prompt, &opts)?.0.remove(0);
        assert_eq!(&row[prompt.len()..], want.as_slice(), "{kind} prompt {i}: greedy tokens");
    }
    Ok(())
}

#[test]
fn the_originals_checkpoint_imports_to_its_logits_and_greedy_tokens() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, tokenizer) = import_into(&fixtures().join("original/base_checkpoints/d2"), tmp.path())?;
    let config = ckpt.meta.model_config.clone();
    assert_eq!(config.rotary, RotaryTables::Bf16, "the original's checkpoints keep v0's bf16 rotary tables");
    assert_eq!(ckpt.meta.step, 10);
    // v0 keeps the embedding in bf16 and the blocks in f32; the import keeps them so
    let file = checkpoint::tensor_file::Reader::open(&checkpoint::model_path(tmp.path(), 10), None)?;
    let dtype = |n: &str| file.header.entries.iter().find(|e| e.name == n).map(|e| e.dtype);
    assert_eq!(dtype("transformer.wte.weight"), Some(DType::BF16));
    assert_eq!(dtype("lm_head.weight"), Some(DType::F32));
    check_against("original", model(&config, &ckpt)?, tokenizer)
}

#[test]
fn a_transformers_directory_imports_to_its_logits_and_greedy_tokens() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ckpt, tokenizer) = import_into(&fixtures().join("hf/model"), tmp.path())?;
    let config = ckpt.meta.model_config.clone();
    assert_eq!(config.rotary, RotaryTables::F32, "a transformers model records transformers' fp32 rotary tables");
    check_against("hf", model(&config, &ckpt)?, tokenizer.clone())?;

    // the recorded property carries the match: the same weights with v0's bf16 tables are off
    let bf16 = GPTConfig { rotary: RotaryTables::Bf16, ..config };
    let (json, logits) = expected("hf")?;
    let prompt = ids(&json["prompts"][0]["ids"]);
    let idx = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let off = model(&bf16, &ckpt)?.forward(&idx, None)?.squeeze(0)?;
    let want = logits["logits.0"].clone();
    let diff = max_diff(&off, &want)?;
    println!("hf weights with bf16 rotary tables: logits max|diff| {diff:.3e}");
    assert!(diff > 10.0 * TOL, "bf16 tables should visibly miss transformers' logits ({diff})");

    // both fixtures hold one model: the two imports agree on every weight
    let original_dir = tempfile::tempdir()?;
    let (orig, orig_tok) = import_into(&fixtures().join("original/base_checkpoints/d2"), original_dir.path())?;
    assert_eq!(orig_tok.fingerprint(), tokenizer.fingerprint(), "tokenizer.json and tokenizer.pkl differ");
    for (name, t) in &orig.model {
        assert_eq!(max_diff(t, &ckpt.model[name])?, 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn sharded_and_tied_transformers_layouts_import_the_same_weights() -> Result<()> {
    use checkpoint::tensor_file::{Planned, Reader, Writer};
    let src = fixtures().join("hf/model");
    let (single_dir, sharded, tied) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let (reference, _) = import_into(&src, single_dir.path())?;
    let mut file = Reader::open(&src.join("model.safetensors"), None)?;
    let entries = file.header.entries.clone();
    // two shards and their index, as save_pretrained writes a big model; and one file without
    // lm_head, whose config ties it to the embedding
    let (first, second) = entries.split_at(entries.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (name, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let planned = part.iter().map(|e| Planned { name: e.name.clone(), dtype: e.dtype, shape: e.shape.clone() });
        let mut writer = Writer::create(&sharded.path().join(name), planned.collect(), &Default::default())?;
        for e in part {
            writer.write(&file.bytes(e)?)?;
            weight_map.insert(e.name.clone(), Value::from(name));
        }
        writer.finish()?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), serde_json::to_vec(&index)?)?;
    let untied: Vec<_> = entries.iter().filter(|e| e.name != "lm_head.weight").collect();
    let planned = untied.iter().map(|e| Planned { name: e.name.clone(), dtype: e.dtype, shape: e.shape.clone() });
    let mut writer = Writer::create(&tied.path().join("model.safetensors"), planned.collect(), &Default::default())?;
    for e in &untied {
        writer.write(&file.bytes(e)?)?;
    }
    writer.finish()?;
    let mut config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
    for dir in [sharded.path(), tied.path()] {
        std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json"))?;
        config["tie_word_embeddings"] = Value::Bool(dir == tied.path());
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    }

    let out = tempfile::tempdir()?;
    let (from_shards, _) = import_into(sharded.path(), &out.path().join("sharded"))?;
    for (name, t) in &reference.model {
        assert_eq!(max_diff(t, &from_shards.model[name])?, 0.0, "sharded {name}");
    }
    let (from_tied, _) = import_into(tied.path(), &out.path().join("tied"))?;
    let embed = &reference.model["transformer.wte.weight"];
    assert_eq!(max_diff(&from_tied.model["lm_head.weight"], embed)?, 0.0, "the tied lm_head is the embedding");
    Ok(())
}

#[test]
fn a_compiled_all_bf16_checkpoint_imports_under_the_original_names() -> Result<()> {
    // `_orig_mod.` prefixes (torch.compile), every weight bf16: the import is the bf16 rounding of
    // the original fixture's weights
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let compiled_src = fixtures().join("original/compiled");
    let plan = interop::plan_local(&compiled_src, None, Some(&fixtures().join("original/tokenizer")))?;
    assert!(plan.weights.iter().all(|w| w.dtype == DType::BF16 && !w.name.starts_with("_orig_mod.")));
    interop::write_checkpoint(plan, a.path(), StoreDtype::Keep)?;
    let compiled = checkpoint::load(a.path(), 10, &Device::Cpu, false, None)?;
    let (reference, _) = import_into(&fixtures().join("original/base_checkpoints/d2"), b.path())?;
    for (name, t) in &reference.model {
        let rounded = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        assert_eq!(max_diff(&rounded, &compiled.model[name])?, 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn the_imported_tokenizer_encodes_and_renders_like_the_original() -> Result<()> {
    let (json, _) = expected("original")?;
    let tokenizer = original::tokenizer_from_pickle(&fixtures().join("original/tokenizer/tokenizer.pkl"))?;
    original::check_token_bytes(&fixtures().join("original/tokenizer/token_bytes.pt"), &tokenizer)?;
    assert_eq!(tokenizer.vocab_size() as u64, json["vocab_size"].as_u64().unwrap());
    assert_eq!(u64::from(tokenizer.bos_id()), json["bos_id"].as_u64().unwrap());
    for case in json["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text), ids(&case["ids"]), "encode {text:?}");
    }
    for case in json["conversations"].as_array().unwrap() {
        let conv: Conversation = serde_json::from_value(case["conversation"].clone())?;
        let (got, mask) = nanochat::conversation::render_conversation(&tokenizer, &conv, 2048)?;
        assert_eq!(got, ids(&case["ids"]), "render {conv:?}");
        let want_mask: Vec<u8> = case["mask"].as_array().unwrap().iter().map(|m| m.as_u64().unwrap() as u8).collect();
        assert_eq!(mask, want_mask, "mask {conv:?}");
        let completion = nanochat::conversation::render_for_completion(&tokenizer, &conv)?;
        assert_eq!(completion, ids(&case["completion"]), "completion {conv:?}");
    }

    // transformers' converter and ours write the same tokenizer.json model, and it reads back
    let theirs: Value = serde_json::from_slice(&std::fs::read(fixtures().join("hf/model/tokenizer.json"))?)?;
    let ours = tokenizer_json::to_json(&tokenizer);
    assert_eq!(ours["model"]["vocab"], theirs["model"]["vocab"], "vocab");
    assert_eq!(ours["model"]["merges"], theirs["model"]["merges"], "merges");
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"], "pre-tokenizer");
    assert_eq!(ours["added_tokens"], theirs["added_tokens"], "specials");
    assert_eq!(tokenizer_json::from_json(&ours)?.fingerprint(), tokenizer.fingerprint());
    Ok(())
}

/// Every tensor of the checkpoint in `dir` (its latest step).
fn tensors_of(dir: &Path) -> Result<(GPTConfig, HashMap<String, Tensor>)> {
    let step = checkpoint::latest_step(dir)?.context("no checkpoint")?;
    let ckpt = checkpoint::load(dir, step, &Device::Cpu, false, None)?;
    Ok((ckpt.meta.model_config, ckpt.model))
}

#[test]
fn export_then_import_is_lossless_through_the_commands() -> Result<()> {
    let base = tempfile::tempdir()?;
    let src = fixtures().join("original/base_checkpoints/d2");
    let out = ok(nanochat(&["import", src.to_str().unwrap(), "--dtype", "f32"], base.path())?)?;
    assert!(out.contains("nanochat chat -i base -g d2"), "{out}");
    let imported = base.path().join("base_checkpoints/d2");
    let export_dir = base.path().join("exported");
    ok(nanochat(&["export", export_dir.to_str().unwrap(), "-i", "base", "-g", "d2"], base.path())?)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(export_dir.join(f).is_file(), "no {f}");
    }
    let config: Value = serde_json::from_slice(&std::fs::read(export_dir.join("config.json"))?)?;
    assert_eq!(config["model_type"], "nanochat");
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(f64::from(f32::EPSILON)));
    ok(nanochat(&["import", export_dir.to_str().unwrap(), "-i", "sft", "-g", "back"], base.path())?)?;
    let (a_config, a) = tensors_of(&imported)?;
    let (b_config, b) = tensors_of(&base.path().join("chatsft_checkpoints/back"))?;
    assert_eq!(a_config, b_config, "the config (rotary tables included) comes back");
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let (x, y) = (t.flatten_all()?.to_vec1::<f32>()?, b[name].flatten_all()?.to_vec1::<f32>()?);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} changed");
    }
    let (ta, tb) = (
        nanochat::tokenizer::for_checkpoint(&imported)?,
        nanochat::tokenizer::for_checkpoint(&base.path().join("chatsft_checkpoints/back"))?,
    );
    assert_eq!(ta.fingerprint(), tb.fingerprint(), "the tokenizer comes back");

    // a second import under the same tag is refused unless forced
    let again = failed(nanochat(&["import", src.to_str().unwrap()], base.path())?);
    assert!(again.contains("--force"), "{again}");
    ok(nanochat(&["import", src.to_str().unwrap(), "--force"], base.path())?)?;

    // bf16 export: every weight is the bf16 rounding
    let bf16_dir = base.path().join("exported-bf16");
    ok(nanochat(&["export", bf16_dir.to_str().unwrap(), "-i", "base", "-g", "d2", "--dtype", "bf16"], base.path())?)?;
    let file = checkpoint::tensor_file::Reader::open(&bf16_dir.join("model.safetensors"), None)?;
    assert!(file.header.entries.iter().all(|e| e.dtype == DType::BF16));
    Ok(())
}

#[test]
fn hostile_pickles_are_refused_without_running_anything() -> Result<()> {
    let marker = Path::new("/tmp/nanochat-interop-pwned");
    let err = format!("{:#}", interop::plan_local(&fixtures().join("hostile"), None, None).err().unwrap());
    assert!(err.contains("posix.system") && err.contains("refused"), "{err}");
    let err =
        format!("{:#}", original::tokenizer_from_pickle(&fixtures().join("hostile/tokenizer.pkl")).err().unwrap());
    assert!(err.contains("posix.system") && err.contains("refused"), "{err}");
    assert!(!marker.exists(), "something ran the payload");

    // hand-made pickles: each is an error, quickly, with no crash
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("eval", b"\x80\x02c__builtin__\neval\nX\x04\x00\x00\x001+1q\x00\x85R.".to_vec()),
        ("stack_global", b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93.".to_vec()),
        ("truncated", b"\x80\x02}q\x00(X\x05\x00\x00\x00ab".to_vec()),
        ("huge string length", b"\x80\x02X\xff\xff\xff\xff".to_vec()),
        ("huge bytes8 length", b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec()),
        ("memo index never stored", b"\x80\x02j\xff\xff\xff\x7f.".to_vec()),
        ("empty stack", b"\x80\x02R.".to_vec()),
        ("unknown opcode", b"\x80\x02\xff.".to_vec()),
        ("no stop", b"\x80\x02N".to_vec()),
    ];
    // a list nested a million deep through the memo, and a billion laughs (30 levels of tuples of
    // 1000 references to the level below): legal data, read in linear time and memory, freed
    // without recursion (objects refer to each other by index)
    let mut deep = b"\x80\x02]q\x000".to_vec();
    for _ in 0..1_000_000 {
        deep.extend_from_slice(b"]q\x010h\x00h\x01a0h\x01q\x000");
    }
    deep.extend_from_slice(b"h\x00.");
    let mut laughs = b"\x80\x02X\x01\x00\x00\x00aq\x00".to_vec();
    for _ in 0..30 {
        laughs.push(b'(');
        laughs.extend(std::iter::repeat_n(&b"h\x00"[..], 1000).flatten());
        laughs.extend_from_slice(b"tq\x00");
    }
    laughs.push(b'.');
    // what does copy data (bytes from a string, as protocol 2 writes them) is capped: a 1 MB string
    // turned into bytes a thousand times is refused, not 1 GB
    let mut bomb = b"\x80\x02c_codecs\nencode\nq\x01X\x00\x00\x10\x00".to_vec();
    bomb.extend(std::iter::repeat_n(b'a', 1 << 20));
    bomb.extend_from_slice(b"q\x00X\x06\x00\x00\x00latin1q\x02");
    for _ in 0..1000 {
        bomb.extend_from_slice(b"h\x01h\x00h\x02\x86R0");
    }
    bomb.extend_from_slice(b"N.");
    let legal = ["deep", "laughs"];
    cases.push(("deep", deep));
    cases.push(("laughs", laughs));
    for (name, data) in &cases {
        let start = std::time::Instant::now();
        let result = pickle::read(data, pickle::Allowed::StateDict);
        let secs = start.elapsed().as_secs_f64();
        println!("{name}: {:?} in {secs:.3}s", result.as_ref().err().map(ToString::to_string));
        assert!(secs < 10.0, "{name} took {secs}s");
        assert_eq!(result.is_ok(), legal.contains(name), "{name}");
    }
    let err = pickle::read(&bomb, pickle::Allowed::Tiktoken).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("more than"), "the codecs bomb: {err:?}");

    // a tokenizer of absurdly long tokens (building one looks at every split of every token) is
    // refused rather than worked through for hours
    let mut long = tokenizer_json::to_json(&original::tokenizer_from_pickle(
        &fixtures().join("original/tokenizer/tokenizer.pkl"),
    )?);
    let vocab = long["model"]["vocab"].as_object_mut().unwrap();
    let merged = vocab.iter().find(|(_, id)| id.as_u64() == Some(300)).map(|(k, _)| k.clone()).unwrap();
    vocab.remove(&merged);
    vocab.insert("a".repeat(1 << 16), Value::from(300));
    let err = format!("{:#}", tokenizer_json::from_json(&long).err().unwrap());
    assert!(err.contains("longer than any real vocabulary"), "{err}");

    // configs that would size things the files do not hold: refused before anything is allocated
    let tmp = tempfile::tempdir()?;
    std::fs::copy(fixtures().join("original/base_checkpoints/d2/model_000010.pt"), tmp.path().join("model_000010.pt"))?;
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("original/base_checkpoints/d2/meta_000010.json"))?)?;
    let tok = fixtures().join("original/tokenizer");
    for (key, value, says) in [
        ("n_layer", 1u64 << 40, "n_layer 1099511627776 is above"),
        ("sequence_len", 1 << 40, "sequence_len 1099511627776 is above"),
        ("n_head", 0, "n_head"),
        ("vocab_size", 1 << 40, "vocab_size 1099511627776 is above"),
    ] {
        let mut meta = meta.clone();
        meta["model_config"][key] = Value::from(value);
        std::fs::write(tmp.path().join("meta_000010.json"), serde_json::to_vec(&meta)?)?;
        let err = format!("{:#}", interop::plan_local(tmp.path(), None, Some(&tok)).err().unwrap());
        assert!(err.contains(says), "{key} = {value}: {err}");
    }
    let hf = tempfile::tempdir()?;
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures().join("hf/model").join(f), hf.path().join(f))?;
    }
    let mut config: Value = serde_json::from_slice(&std::fs::read(fixtures().join("hf/model/config.json"))?)?;
    config["num_hidden_layers"] = Value::from(1u64 << 40);
    std::fs::write(hf.path().join("config.json"), serde_json::to_vec(&config)?)?;
    let err = format!("{:#}", interop::plan_local(hf.path(), None, None).err().unwrap());
    assert!(err.contains("config.json") && err.contains("n_layer 1099511627776 is above"), "{err}");

    // damaged PyTorch files: cut short
    let tmp = tempfile::tempdir()?;
    let good = std::fs::read(fixtures().join("original/base_checkpoints/d2/model_000010.pt"))?;
    let cut = tmp.path().join("model_000010.pt");
    std::fs::copy(
        fixtures().join("original/base_checkpoints/d2/meta_000010.json"),
        tmp.path().join("meta_000010.json"),
    )?;
    for len in [good.len() / 2, 100, 3] {
        std::fs::write(&cut, &good[..len])?;
        let err = interop::plan_local(tmp.path(), None, Some(&fixtures().join("original/tokenizer")));
        assert!(err.is_err(), "a .pt cut to {len} bytes was accepted");
    }
    Ok(())
}

#[test]
fn the_originals_newer_architecture_is_refused_naming_what_it_has() {
    let err = interop::plan_local(&fixtures().join("head/base_checkpoints/d2"), None, None).err().unwrap();
    let err = format!("{err:#}");
    println!("{err}");
    for what in ["newer nanochat architecture", "value embeddings", "sliding-window", "smear", "lambdas", "backout"] {
        assert!(err.contains(what), "the refusal does not name {what}: {err}");
    }
}

/// A Hugging Face hub on 127.0.0.1 serving one repository from a directory: the file list at
/// `/api/models/{repo}/tree/{rev}` and the files at `/{repo}/resolve/{rev}/{file}` (the weights by
/// a redirect, as the hub sends them to its CDN). Records each request's path and Authorization.
struct HubServer {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

/// A request's path and Authorization header.
type Seen = (String, Option<String>);

impl HubServer {
    fn start(repo: &str, rev: &str, files: Vec<(String, Vec<u8>)>) -> HubServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, repo, rev) = (seen.clone(), repo.to_string(), rev.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut request, mut auth) = (String::new(), None);
                let _ = reader.read_line(&mut request);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_string());
                        }
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock().unwrap().push((path.clone(), auth));
                let respond = |status: &str, extra: &str, body: &[u8]| {
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let mut stream = &stream;
                    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
                };
                let list: Vec<Value> = files
                    .iter()
                    .map(|(name, bytes)| serde_json::json!({"type": "file", "path": name, "size": bytes.len()}))
                    .collect();
                let resolve = format!("/{repo}/resolve/{rev}/");
                if path == format!("/api/models/{repo}/tree/{rev}") {
                    respond("200 OK", "Content-Type: application/json\r\n", &serde_json::to_vec(&list).unwrap());
                } else if let Some(name) = path.strip_prefix(&resolve).filter(|n| n.ends_with(".safetensors")) {
                    respond("302 Found", &format!("Location: /cdn/{name}\r\n"), b"");
                } else if let Some(file) = files.iter().find(|(n, _)| {
                    path.strip_prefix(&resolve) == Some(n.as_str()) || path.strip_prefix("/cdn/") == Some(n.as_str())
                }) {
                    respond("200 OK", "", &file.1);
                } else if path.starts_with("/api/models/private/") {
                    respond("401 Unauthorized", "", b"");
                } else {
                    respond("404 Not Found", "", b"");
                }
                stream.flush().ok();
            }
        });
        HubServer { url, seen }
    }

    fn requests(&self, prefix: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|(p, _)| p.starts_with(prefix)).cloned().collect()
    }
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn import_from_hub(hub: &HubServer, src: &str, base: &Path, extra: &[&str]) -> Result<std::process::Output> {
    let mut args = vec!["import", src];
    args.extend_from_slice(extra);
    Ok(Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(&args)
        .env("NANOCHAT_BASE_DIR", base)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "hf_secret")
        .output()?)
}

/// The logits of the fixture's first prompt from the checkpoint in `dir`, against `kind`'s.
fn first_prompt_diff(dir: &Path, kind: &str) -> Result<f32> {
    let (config, tensors) = tensors_of(dir)?;
    let gpt = GPT::new(&config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
    let (json, logits) = expected(kind)?;
    let prompt = ids(&json["prompts"][0]["ids"]);
    let idx = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    max_diff(&gpt.forward(&idx, None)?.squeeze(0)?, &logits["logits.0"])
}

#[test]
fn a_transformers_repository_is_fetched_from_the_hub_with_the_token_and_not_twice() -> Result<()> {
    let hub = HubServer::start("someone/nanochat-tiny", "main", files_of(&fixtures().join("hf/model")));
    let base = tempfile::tempdir()?;
    let out = ok(import_from_hub(&hub, "hf:someone/nanochat-tiny", base.path(), &[])?)?;
    assert!(out.contains("nanochat chat -i sft -g nanochat-tiny"), "{out}");
    let dir = base.path().join("chatsft_checkpoints/nanochat-tiny");
    let diff = first_prompt_diff(&dir, "hf")?;
    println!("hub import: logits max|diff| {diff:.3e}");
    assert!(diff <= TOL);
    let api = hub.requests("/api/");
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].1.as_deref(), Some("Bearer hf_secret"), "HF_TOKEN goes to the hub");
    let weights = hub.requests("/cdn/model.safetensors");
    assert_eq!(weights.len(), 1, "the weights come through the redirect");
    // again: everything is already there, nothing is downloaded twice
    let fetched = hub.requests("/someone/").len();
    ok(import_from_hub(&hub, "hf:someone/nanochat-tiny", base.path(), &["--force"])?)?;
    assert_eq!(hub.requests("/someone/").len(), fetched, "a downloaded file was fetched again");
    assert_eq!(hub.requests("/api/").len(), 2, "the file list is asked for each time");
    Ok(())
}

#[test]
fn an_original_checkpoint_repository_is_fetched_at_a_revision() -> Result<()> {
    let mut files = files_of(&fixtures().join("original/base_checkpoints/d2"));
    files.extend(files_of(&fixtures().join("original/tokenizer")));
    let hub = HubServer::start("someone/nanochat-d2", "v1", files);
    let base = tempfile::tempdir()?;
    ok(import_from_hub(&hub, "hf:someone/nanochat-d2@v1", base.path(), &["-g", "mine"])?)?;
    let diff = first_prompt_diff(&base.path().join("chatsft_checkpoints/mine"), "original")?;
    println!("hub import of the original's files: logits max|diff| {diff:.3e}");
    assert!(diff <= TOL);

    let missing = failed(import_from_hub(&hub, "hf:someone/other", base.path(), &[])?);
    assert!(missing.contains("no repository someone/other"), "{missing}");
    let private = failed(import_from_hub(&hub, "hf:private/model", base.path(), &[])?);
    assert!(private.contains("HF_TOKEN"), "{private}");
    let bad = failed(import_from_hub(&hub, "hf:../etc", base.path(), &[])?);
    assert!(bad.contains("hf:OWNER/REPO"), "{bad}");
    Ok(())
}

/// transformers loads an export with no custom code and reproduces its own outputs (a model that came
/// from transformers, so the rotary convention is the same): needs Python with transformers
/// (`NANOCHAT_PYTHON`, default python3); skipped without it unless NANOCHAT_REQUIRE_TRANSFORMERS=1.
#[test]
fn transformers_loads_the_export_and_reproduces_its_own_outputs() -> Result<()> {
    let python = std::env::var("NANOCHAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "from transformers import NanoChatForCausalLM"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("NANOCHAT_REQUIRE_TRANSFORMERS").is_none(),
            "{python} cannot import transformers' NanoChatForCausalLM"
        );
        println!("skipped: {python} has no transformers with NanoChatForCausalLM (set NANOCHAT_PYTHON)");
        return Ok(());
    }
    let base = tempfile::tempdir()?;
    ok(nanochat(&["import", fixtures().join("hf/model").to_str().unwrap(), "-g", "tiny"], base.path())?)?;
    let export = base.path().join("export");
    ok(nanochat(&["export", export.to_str().unwrap(), "-i", "sft", "-g", "tiny"], base.path())?)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/transformers/load_export.py");
    let out = Command::new(&python).arg(script).arg(&export).arg(fixtures()).output()?;
    println!("{}", ok(out)?);
    Ok(())
}
