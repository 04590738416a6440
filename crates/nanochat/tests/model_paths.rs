//! The model's three paths agree, so that an architecture change that misses one fails here: on
//! random configurations (GQA, MQA and plain multi-head attention, odd widths and vocabularies,
//! depths 1 to 4) with random weights, the composed candle path (`Kernels { fused: false, .. }`),
//! the fused CPU kernels (the default) and the native decode path (`model::decode`) give the same
//! logits within 1e-4, without a KV cache and with one (prefill, then token by token, several
//! slots at different positions); and the composed and fused paths give the same losses and
//! gradients of every parameter. The two candle models run side by side in one process: the
//! kernels are a value each model holds.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use nanochat::model::decode::DecodeModel;
use nanochat::model::{named_vars, GPTConfig, Kernels, KvCache, Reduction, GPT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const LOGITS_TOL: f32 = 1e-4;
/// Gradients: max |composed - fused| relative to max |composed| of each parameter.
const GRAD_TOL: f32 = 1e-4;

/// Which attention the configuration has.
#[derive(Clone, Copy, Debug)]
enum Heads {
    /// Grouped-query: several query heads per kv head, more than one kv head.
    Gqa,
    /// Multi-query: one kv head.
    Mqa,
    /// One kv head per query head.
    Mha,
}

/// A configuration of the given kind with sizes drawn from `rng`: odd head counts and widths that
/// are not multiples of 8 (the kernels' tails), vocabularies that are not powers of two.
fn random_config(heads: Heads, rng: &mut StdRng) -> GPTConfig {
    let n_kv_head = match heads {
        Heads::Gqa => rng.random_range(2..=3),
        Heads::Mqa => 1,
        Heads::Mha => rng.random_range(1..=3),
    };
    let group = match heads {
        Heads::Mha => 1,
        _ => rng.random_range(2..=3),
    };
    let n_head = n_kv_head * group;
    let head_dim = 2 * rng.random_range(3..=9);
    GPTConfig {
        sequence_len: rng.random_range(12..=40),
        vocab_size: rng.random_range(50..=300),
        n_layer: rng.random_range(1..=4),
        n_head,
        n_kv_head,
        n_embd: n_head * head_dim,
    }
}

/// Random values for every parameter of the table (v0's init would zero lm_head and every c_proj,
/// hiding differences in them): N(0, 1) for the embedding, N(0, 1/sqrt(fan_in)) otherwise.
fn random_weights(config: &GPTConfig, rng: &mut StdRng) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for spec in config.params() {
        let fan_in = *spec.shape.last().context("a scalar parameter")?;
        let std = if spec.name == "transformer.wte.weight" { 1.0 } else { 1.0 / (fan_in as f32).sqrt() };
        let normal = Normal::new(0.0f32, std)?;
        let values: Vec<f32> = (0..spec.numel()).map(|_| normal.sample(rng)).collect();
        tensors.insert(spec.name, Tensor::from_vec(values, spec.shape, &Device::Cpu)?);
    }
    Ok(tensors)
}

/// A trainable model over its own copy of `weights`, running `kernels`.
fn trainable(config: &GPTConfig, weights: &HashMap<String, Tensor>, kernels: Kernels) -> Result<(GPT, VarMap)> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, t) in weights {
            data.insert(name.clone(), Var::from_tensor(&t.copy()?)?);
        }
    }
    let model = GPT::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?.with_kernels(kernels);
    Ok((model, varmap))
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn max_diff(a: &[f32], b: &[f32]) -> Result<f32> {
    ensure!(a.len() == b.len(), "{} values against {}", a.len(), b.len());
    Ok(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

/// Asserts `ours` within `tol` of `want`, printing the difference.
fn check(what: &str, ours: &[f32], want: &[f32], tol: f32) -> Result<()> {
    let d = max_diff(ours, want)?;
    println!("{what:<60} max |diff| {d:.2e}");
    ensure!(d <= tol, "{what}: max |diff| {d:e} > {tol:e}");
    Ok(())
}

fn tokens(n: usize, vocab: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Logits (V,) of the last token of `ids` continuing `cache`.
fn cached_last(gpt: &GPT, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let idx = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    flat(&gpt.forward_cached_last(&idx, cache)?)
}

/// Every path's logits against the composed full forward over `rows` (B sequences of T tokens).
fn check_logits(config: &GPTConfig, composed: &GPT, fused: &GPT, rows: &[Vec<u32>]) -> Result<()> {
    let (b, t, v) = (rows.len(), rows[0].len(), config.vocab_size);
    let idx = Tensor::new(rows.concat(), &Device::Cpu)?.reshape((b, t))?;
    let want = composed.forward(&idx, None)?; // (B, T, V)
    check("fused forward vs composed", &flat(&fused.forward(&idx, None)?)?, &flat(&want)?, LOGITS_TOL)?;
    let want_row = |r: usize, p: usize| -> Result<Vec<f32>> { flat(&want.i((r, p))?) };

    // The candle KV cache, on both paths: a prefill of the first half, then one token at a time.
    let split = t / 2 + 1;
    for (name, gpt) in [("composed", composed), ("fused", fused)] {
        for (r, row) in rows.iter().enumerate() {
            let mut cache = KvCache::new(config.n_layer);
            let prefill = cached_last(gpt, &row[..split], &mut cache)?;
            check(&format!("{name} kv-cache prefill, row {r}"), &prefill, &want_row(r, split - 1)?, LOGITS_TOL)?;
            for p in split..t {
                let step = cached_last(gpt, &row[p..=p], &mut cache)?;
                check(&format!("{name} kv-cache step at {p}, row {r}"), &step, &want_row(r, p)?, LOGITS_TOL)?;
            }
        }
    }

    // The native path: every position of a prefill, then the rows decoded together from slots at
    // different positions (row r prefilled up to split - r).
    let native = DecodeModel::from_gpt(fused)?;
    let mut cache = native.new_cache(b, t)?;
    for (r, row) in rows.iter().enumerate() {
        let all = native.prefill_logits(&mut cache, r, &row[..split - r], 0)?;
        for p in 0..split - r {
            let got = &all[p * v..(p + 1) * v];
            check(&format!("native prefill at {p}, slot {r}"), got, &want_row(r, p)?, LOGITS_TOL)?;
        }
    }
    for k in 0..t - split {
        let batch: Vec<(usize, u32)> = rows.iter().enumerate().map(|(r, row)| (r, row[split - r + k])).collect();
        let logits = native.step(&mut cache, &batch)?.to_vec();
        for (r, _) in rows.iter().enumerate() {
            let p = split - r + k;
            check(&format!("native step at {p}, slot {r}"), &logits[r * v..(r + 1) * v], &want_row(r, p)?, LOGITS_TOL)?;
        }
    }
    Ok(())
}

/// Losses (mean and per token, some targets ignored) and every parameter's gradient, composed
/// against fused.
fn check_losses_and_gradients(
    config: &GPTConfig,
    weights: &HashMap<String, Tensor>,
    rows: &[Vec<u32>],
    rng: &mut StdRng,
) -> Result<()> {
    let (composed, composed_vars) = trainable(config, weights, Kernels { fused: false, bf16: false })?;
    let (fused, fused_vars) = trainable(config, weights, Kernels::default())?;
    let (b, t) = (rows.len(), rows[0].len());
    let idx = Tensor::new(rows.concat(), &Device::Cpu)?.reshape((b, t))?;
    let targets: Vec<i64> =
        (0..b * t).map(|i| if i % 7 == 3 { -1 } else { rng.random_range(0..config.vocab_size as i64) }).collect();
    let targets = Tensor::from_vec(targets, (b, t), &Device::Cpu)?;

    let per_token = |gpt: &GPT| -> Result<Vec<f32>> { flat(&gpt.loss(&idx, &targets, Reduction::PerToken)?) };
    check("per-token losses, fused vs composed", &per_token(&fused)?, &per_token(&composed)?, LOGITS_TOL)?;
    let loss_c = composed.forward(&idx, Some(&targets))?;
    let loss_f = fused.forward(&idx, Some(&targets))?;
    check("mean loss, fused vs composed", &flat(&loss_f)?, &flat(&loss_c)?, LOGITS_TOL)?;

    let (grads_c, grads_f) = (loss_c.backward()?, loss_f.backward()?);
    let (vars_c, vars_f) = (named_vars(config, &composed_vars)?, named_vars(config, &fused_vars)?);
    ensure!(vars_c.len() == config.params().len());
    for ((name, var_c), (_, var_f)) in vars_c.iter().zip(&vars_f) {
        let want = flat(grads_c.get(var_c).with_context(|| format!("composed: no gradient for {name}"))?)?;
        let got = flat(grads_f.get(var_f).with_context(|| format!("fused: no gradient for {name}"))?)?;
        let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs())).max(1e-6);
        ensure!(scale > 1e-6, "{name}: a zero gradient compares nothing");
        check(&format!("grad {name} (relative to {scale:.1e})"), &got, &want, GRAD_TOL * scale)?;
    }
    Ok(())
}

#[test]
fn composed_fused_and_native_paths_agree_on_random_configs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(18);
    let kinds = [Heads::Gqa, Heads::Mqa, Heads::Mha, Heads::Gqa, Heads::Mqa, Heads::Mha];
    for (i, heads) in kinds.into_iter().enumerate() {
        let config = random_config(heads, &mut rng);
        println!("config {i} ({heads:?}): {config:?}");
        let weights = random_weights(&config, &mut rng)?;
        let vb = || VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let composed = GPT::new(&config, vb())?.with_kernels(Kernels { fused: false, bf16: false });
        let fused = GPT::new(&config, vb())?;
        assert_eq!(fused.kernels(), Kernels::default());
        let t = rng.random_range(6..=config.sequence_len);
        let rows: Vec<Vec<u32>> = (0..2).map(|_| tokens(t, config.vocab_size, &mut rng)).collect();
        check_logits(&config, &composed, &fused, &rows)?;
        check_losses_and_gradients(&config, &weights, &rows, &mut rng)?;
    }
    Ok(())
}
