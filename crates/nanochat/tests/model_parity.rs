//! Parity of the Rust GPT with nanochat v0, against the golden fixtures in
//! `tests/fixtures/parity/model/` (computed by the original in float32 on CPU): logits, losses,
//! activations, every gradient, the rotary tables, the KV-cache path and greedy generation,
//! plus the statistics of a fresh init. Each comparison prints its max differences.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use nanochat::model::{named_vars, GPTConfig, Init, KvCache, Reduction, GPT};

fn fixture_dir() -> PathBuf {
    common::parity("model")
}

fn load(file: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture_dir().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    map.get(key).with_context(|| format!("fixture has no tensor {key}"))
}

/// The fixture's `GPTConfig`.
fn config() -> GPTConfig {
    common::fixture_config().expect("the fixture's config")
}

/// The model with the fixture's weights, loaded by name into the VarMap of a fresh init.
fn fixture_model() -> Result<(GPT, VarMap)> {
    let (model, mut varmap) = GPT::init(&config(), 0, &Device::Cpu)?;
    varmap.load(fixture_dir().join("params.safetensors"))?;
    Ok((model, varmap))
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Asserts `ours` is within `atol` of `want` element-wise (and has its shape); prints the max
/// absolute difference and the max difference relative to max |want|.
fn check(what: &str, ours: &Tensor, want: &Tensor, atol: f32) -> Result<f32> {
    ensure!(ours.dims() == want.dims(), "{what}: shape {:?} != {:?}", ours.dims(), want.dims());
    let (a, b) = (flat(ours)?, flat(want)?);
    let max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max).max(f32::MIN_POSITIVE);
    println!("{what:<40} max|diff| {max_abs:.3e}  relative to max|ref| {:.3e}", max_abs / scale);
    ensure!(max_abs <= atol, "{what}: max |diff| {max_abs:e} > {atol:e}");
    Ok(max_abs)
}

#[test]
fn logits_losses_and_activations_match_v0() -> Result<()> {
    let (model, _varmap) = fixture_model()?;
    let batch = load("batch.safetensors")?;
    let idx = get(&batch, "idx")?;
    let (targets, targets_masked) = (get(&batch, "targets")?, get(&batch, "targets_masked")?);

    let logits = model.forward(idx, None)?;
    check("logits", &logits, get(&batch, "logits")?, 5e-5)?;

    let (logits2, activations) = model.forward_with_activations(idx)?;
    check("logits (traced forward)", &logits2, &logits, 0.0)?;
    ensure!(activations.len() == 3 * config().n_layer + 1);
    for (name, act) in &activations {
        check(&format!("act.{name}"), act, get(&batch, &format!("act.{name}"))?, 2e-5)?;
    }

    let loss = model.forward(idx, Some(targets))?;
    check("loss", &loss, get(&batch, "loss")?, 1e-5)?;
    let loss_masked = model.forward(idx, Some(targets_masked))?;
    check("loss_masked", &loss_masked, get(&batch, "loss_masked")?, 1e-5)?;
    let per_token = model.loss(idx, targets, Reduction::PerToken)?;
    check("loss_per_token", &per_token, get(&batch, "loss_per_token")?, 2e-5)?;
    let per_token_masked = model.loss(idx, targets_masked, Reduction::PerToken)?;
    check("loss_per_token_masked", &per_token_masked, get(&batch, "loss_per_token_masked")?, 2e-5)?;
    Ok(())
}

#[test]
fn gradients_match_v0() -> Result<()> {
    let (model, varmap) = fixture_model()?;
    let batch = load("batch.safetensors")?;
    let want = load("grads.safetensors")?;
    let loss = model.forward(get(&batch, "idx")?, Some(get(&batch, "targets")?))?;
    let grads = loss.backward()?;
    let vars = named_vars(&config(), &varmap)?;
    ensure!(vars.len() == want.len(), "{} parameters, fixture has {}", vars.len(), want.len());
    for (name, var) in &vars {
        let ours = grads.get(var).with_context(|| format!("no gradient for {name}"))?;
        let reference = get(&want, name)?;
        // Relative L2 error over the whole tensor: the README's float64 run is at 7.2e-7.
        let err_l2 = (ours - reference)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let ref_l2 = reference.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        println!("grad {name:<36} relative L2 error {:.3e}", err_l2 / ref_l2);
        ensure!(err_l2 <= 1e-5 * ref_l2, "grad {name}: relative L2 error {}", err_l2 / ref_l2);
        let scale = flat(reference)?.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        check(&format!("grad {name}"), ours, reference, 1e-5 * scale.max(1e-3))?;
    }
    Ok(())
}

#[test]
fn rotary_tables_equal_v0_bf16_buffers() -> Result<()> {
    let (model, _varmap) = fixture_model()?;
    let want = load("rotary_buffers.safetensors")?;
    let (cos, sin) = model.rotary();
    for (name, ours) in [("cos", cos), ("sin", sin)] {
        let reference = get(&want, name)?;
        ensure!(reference.dtype() == DType::BF16);
        let reference = reference.to_dtype(DType::F32)?.reshape(ours.dims())?;
        // The tables are bf16 values: they must be exactly equal.
        check(&format!("rotary {name}"), ours, &reference, 0.0)?;
    }
    Ok(())
}

fn ids(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
}

fn row(tokens: &[i64]) -> Result<Tensor> {
    Ok(Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?)
}

/// Greedy argmax of the last position of logits (1, T, V).
fn argmax_last(logits: &Tensor) -> Result<i64> {
    let t = logits.dim(1)?;
    let last = logits.narrow(1, t - 1, 1)?.flatten_all()?;
    Ok(i64::from(last.argmax(D::Minus1)?.to_scalar::<u32>()?))
}

#[test]
fn kv_cache_generation_matches_v0_engine() -> Result<()> {
    let (model, _varmap) = fixture_model()?;
    let gen = load("generation.safetensors")?;
    let prompt = ids(get(&gen, "prompt")?)?;
    let engine_tokens = ids(get(&gen, "engine_tokens")?)?;

    // Engine path: prefill the prompt, then one token per forward, greedy.
    let mut cache = KvCache::new(config().n_layer);
    let mut logits = model.forward_cached(&row(&prompt)?, &mut cache)?;
    let mut rows = vec![logits.clone()];
    let mut generated = Vec::new();
    for step in 0..engine_tokens.len() {
        let next = argmax_last(&logits)?;
        generated.push(next);
        if step + 1 < engine_tokens.len() {
            logits = model.forward_cached(&row(&[next])?, &mut cache)?;
            rows.push(logits.clone());
        }
    }
    ensure!(cache.pos() == prompt.len() + engine_tokens.len() - 1);
    let kv_logits = Tensor::cat(&rows, 1)?;
    check("logits_kvcache", &kv_logits, get(&gen, "logits_kvcache")?, 5e-5)?;
    assert_eq!(generated, engine_tokens, "greedy tokens differ from v0's Engine");

    // The same positions through one full forward without a cache.
    let all: Vec<i64> = prompt.iter().chain(&engine_tokens[..engine_tokens.len() - 1]).copied().collect();
    check("no-cache logits vs kv-cache", &model.forward(&row(&all)?, None)?, &kv_logits, 5e-5)?;

    // A multi-token chunk after a cached prefix: prefix visible, causal inside the chunk.
    let mut cache = KvCache::new(config().n_layer);
    let chunk_a = model.forward_cached(&row(&prompt[..6])?, &mut cache)?;
    let chunk_b = model.forward_cached(&row(&prompt[6..])?, &mut cache)?;
    check("chunk_a_logits", &chunk_a, get(&gen, "chunk_a_logits")?, 5e-5)?;
    check("chunk_b_logits", &chunk_b, get(&gen, "chunk_b_logits")?, 5e-5)?;

    // A prefilled batch-1 cache expanded to 2 rows decodes both rows identically.
    let mut cache = KvCache::new(config().n_layer);
    model.forward_cached(&row(&prompt)?, &mut cache)?;
    let mut batch_cache = cache.expand_batch(2)?;
    let next = Tensor::new(&[[engine_tokens[0]], [engine_tokens[0]]], &Device::Cpu)?;
    let two = model.forward_cached(&next, &mut batch_cache)?;
    let want_row = kv_logits.narrow(1, prompt.len(), 1)?;
    check("expanded cache row 0", &two.narrow(0, 0, 1)?, &want_row, 5e-5)?;
    check("expanded cache row 1", &two.narrow(0, 1, 1)?, &want_row, 5e-5)?;
    Ok(())
}

#[test]
fn fresh_init_follows_v0_init() -> Result<()> {
    // wider than the fixture model, for enough samples per tensor; the same vocabulary as its batch
    let cfg = GPTConfig {
        sequence_len: 64,
        vocab_size: 1024,
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 64,
        rotary: Default::default(),
    };
    let (model, varmap) = GPT::init(&cfg, 42, &Device::Cpu)?;
    for ((name, var), spec) in named_vars(&cfg, &varmap)?.into_iter().zip(cfg.params()) {
        let values = flat(var.as_tensor())?;
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (values.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = spec.init.std();
        println!("init {name:<36} std {std:.5} (formula {want:.5}) mean {mean:+.5}");
        if want == 0.0 {
            ensure!(values.iter().all(|&x| x == 0.0), "{name} must start at zero");
        } else {
            // 2048+ samples: the sample std is within ~1.6% per sigma.
            ensure!((std / want - 1.0).abs() < 0.06, "{name}: std {std} vs {want}");
            ensure!(mean.abs() < 0.1 * want, "{name}: mean {mean}");
        }
    }
    // c_k of this GQA config is [32, 64]: the min(1, sqrt(fan_out/fan_in)) factor applies.
    let c_k = cfg.find_param("transformer.h.0.attn.c_k.weight").context("no c_k")?;
    ensure!(c_k.shape == [32, 64] && (c_k.init.std() - 0.125 / 2f64.sqrt()).abs() < 1e-12);
    // v0 starts lm_head and every c_proj at zero, the embedding at N(0, 1)
    ensure!(cfg.find_param("lm_head.weight").context("no lm_head")?.init == Init::Zeros);
    ensure!(cfg.find_param("transformer.h.1.mlp.c_proj.weight").context("no c_proj")?.init == Init::Zeros);
    ensure!(cfg.find_param("transformer.wte.weight").context("no wte")?.init == Init::Normal { std: 1.0 });

    // All logits start at 0: the loss is ln V and only lm_head gets a gradient.
    let batch = load("batch.safetensors")?;
    let loss = model.forward(get(&batch, "idx")?, Some(get(&batch, "targets")?))?;
    let ln_v = (cfg.vocab_size as f32).ln();
    check("loss at init vs ln V", &loss, &Tensor::new(ln_v, &Device::Cpu)?, 1e-5)?;
    let grads = loss.backward()?;
    for (name, var) in named_vars(&cfg, &varmap)? {
        let nonzero = match grads.get(&var) {
            Some(g) => flat(g)?.iter().any(|&x| x != 0.0),
            None => false,
        };
        ensure!(nonzero == (name == "lm_head.weight"), "{name}: nonzero gradient at init = {nonzero}");
    }

    // The same seed gives the same weights; another seed does not.
    let (_, same) = GPT::init(&cfg, 42, &Device::Cpu)?;
    let (_, other) = GPT::init(&cfg, 43, &Device::Cpu)?;
    let wte = |vm: &VarMap| -> Result<Vec<f32>> {
        let vars = named_vars(&cfg, vm)?;
        flat(vars[0].1.as_tensor())
    };
    ensure!(wte(&varmap)? == wte(&same)?, "same seed, different weights");
    ensure!(wte(&varmap)? != wte(&other)?, "different seeds, same weights");
    Ok(())
}

#[test]
fn config_counts_match_v0_d20() -> Result<()> {
    let cfg = GPTConfig::from_depth(20, 65536, 2048);
    assert_eq!((cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim()), (1280, 10, 10, 128));
    // v0 logs 560,988,160 parameters and 3.491758e9 FLOPs per token for d20.
    assert_eq!(cfg.num_params(), 560_988_160);
    assert_eq!(cfg.estimate_flops(), 3_491_758_080);
    assert_eq!(GPTConfig::from_depth(1, 1024, 64).n_head, 1);
    let fixture_names: Vec<String> =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(fixture_dir().join("config.json"))?)?
            ["param_names_in_order"]
            .as_array()
            .context("param_names_in_order")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
    let ours: Vec<String> = config().params().into_iter().map(|s| s.name).collect();
    assert_eq!(ours, fixture_names);
    let json = serde_json::to_string(&cfg)?;
    assert_eq!(serde_json::from_str::<GPTConfig>(&json)?, cfg);
    Ok(())
}
