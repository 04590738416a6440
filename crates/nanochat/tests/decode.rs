//! The native CPU inference path (`model::decode`) against the candle GPT: logits after a prefill
//! and over 50 greedy steps equal `GPT::forward_cached` / `GPT::forward` within 1e-4, at batch 1 and
//! with several slots at different positions, for odd sizes and GQA; and a full cache, a bad slot
//! or a bad token is an error that leaves the cache usable.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use nanochat::model::decode::{DecodeCache, DecodeModel};
use nanochat::model::{GPTConfig, KvCache, GPT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const TOL: f32 = 1e-4;

/// Odd widths and vocabularies (head dims that are not multiples of 8 exercise the kernels' tails),
/// GQA in both, and a vocabulary large enough for the parallel kernel in the second.
fn configs() -> Vec<GPTConfig> {
    vec![
        GPTConfig { sequence_len: 64, vocab_size: 97, n_layer: 2, n_head: 4, n_kv_head: 2, n_embd: 48 },
        GPTConfig { sequence_len: 64, vocab_size: 1031, n_layer: 3, n_head: 2, n_kv_head: 1, n_embd: 84 },
    ]
}

/// A GPT with every weight random (v0's init would zero lm_head and every c_proj, hiding bugs).
fn random_gpt(config: &GPTConfig, seed: u64) -> Result<GPT> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for (name, (rows, cols)) in config.params().into_iter().map(|s| (s.name, (s.shape[0], s.shape[1]))) {
        let std = if name == "transformer.wte.weight" { 1.0 } else { 1.0 / (cols as f32).sqrt() };
        let normal = Normal::new(0.0f32, std)?;
        let values: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
        tensors.insert(name, Tensor::from_vec(values, (rows, cols), &Device::Cpu)?);
    }
    Ok(GPT::new(config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?)
}

fn tokens(n: usize, vocab: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b]).then(b.cmp(&a))).unwrap() as u32
}

/// The candle GPT's logits for the last token of `ids` continuing `cache`, (V,).
fn candle_last(gpt: &GPT, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let idx = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    Ok(gpt.forward_cached_last(&idx, cache)?.i((0, 0))?.to_vec1::<f32>()?)
}

#[test]
fn prefill_and_50_greedy_steps_match_the_candle_gpt() -> Result<()> {
    for (c, config) in configs().iter().enumerate() {
        let gpt = random_gpt(config, c as u64)?;
        let model = DecodeModel::from_gpt(&gpt)?;
        let mut rng = StdRng::seed_from_u64(7);
        // 20 tokens: the prefill goes through the gemm path, the steps through the small kernel
        let prompt = tokens(20, config.vocab_size, &mut rng);
        let mut reference = KvCache::new(config.n_layer);
        let mut cache = model.new_cache(1, 80)?;
        let mut want = candle_last(&gpt, &prompt, &mut reference)?;
        let got = model.prefill(&mut cache, 0, &prompt)?;
        assert!(max_diff(got, &want) < TOL, "config {c} prefill: {}", max_diff(got, &want));
        for step in 0..50 {
            let next = argmax(&want);
            want = candle_last(&gpt, &[next], &mut reference)?;
            let got = model.step(&mut cache, &[(0, next)])?;
            assert!(max_diff(got, &want) < TOL, "config {c} step {step}: {}", max_diff(got, &want));
        }
        assert_eq!(cache.pos(0), 70);
    }
    Ok(())
}

#[test]
fn slots_at_different_positions_decode_together() -> Result<()> {
    for (c, config) in configs().iter().enumerate() {
        let gpt = random_gpt(config, 10 + c as u64)?;
        let model = DecodeModel::from_gpt(&gpt)?;
        let mut rng = StdRng::seed_from_u64(3);
        let v = config.vocab_size;
        // three rows with prompts of 5, 17 and 1 tokens, each with its own batch-1 reference
        let prompts = [tokens(5, v, &mut rng), tokens(17, v, &mut rng), tokens(1, v, &mut rng)];
        let mut cache = model.new_cache(3, 64)?;
        let mut refs = Vec::new();
        let mut want = Vec::new();
        for (slot, prompt) in prompts.iter().enumerate() {
            let mut reference = KvCache::new(config.n_layer);
            want.push(candle_last(&gpt, prompt, &mut reference)?);
            refs.push(reference);
            let got = model.prefill(&mut cache, slot, prompt)?;
            assert!(max_diff(got, &want[slot]) < TOL);
        }
        for step in 0..30 {
            // rows in a different order each step, and sometimes one row sits a step out
            let mut order: Vec<usize> = vec![2, 0, 1];
            order.rotate_left(step % 3);
            if step % 5 == 4 {
                order.pop();
            }
            let rows: Vec<(usize, u32)> = order.iter().map(|&s| (s, argmax(&want[s]))).collect();
            let got = model.step(&mut cache, &rows)?.to_vec();
            for (r, &(slot, token)) in rows.iter().enumerate() {
                want[slot] = candle_last(&gpt, &[token], &mut refs[slot])?;
                let row = &got[r * v..(r + 1) * v];
                assert!(max_diff(row, &want[slot]) < TOL, "config {c} step {step} slot {slot}");
            }
        }
        for (slot, reference) in refs.iter().enumerate() {
            assert_eq!(cache.pos(slot), reference.pos());
        }
    }
    Ok(())
}

#[test]
fn chunked_and_long_prefills_match_the_full_forward() -> Result<()> {
    let config = &configs()[0];
    let gpt = random_gpt(config, 5)?;
    let model = DecodeModel::from_gpt(&gpt)?;
    let mut rng = StdRng::seed_from_u64(9);
    // 600 tokens: more than one internal prefill chunk of 512
    let ids = tokens(600, config.vocab_size, &mut rng);
    let full = gpt.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?, None)?.i(0)?.to_vec2::<f32>()?;
    let mut cache = model.new_cache(1, 640)?;
    let got = model.prefill(&mut cache, 0, &ids)?;
    assert!(max_diff(got, &full[599]) < TOL, "long prefill: {}", max_diff(got, &full[599]));
    // the same sequence in uneven pieces and single steps
    let mut cache = model.new_cache(1, 100)?;
    let mut start = 0;
    for len in [3, 1, 30, 1, 1, 17] {
        let got = model.prefill(&mut cache, 0, &ids[start..start + len])?;
        let last = start + len - 1;
        assert!(max_diff(got, &full[last]) < TOL, "piece ending at {last}");
        start += len;
    }
    Ok(())
}

#[test]
fn copied_slots_continue_like_the_original() -> Result<()> {
    let config = &configs()[1];
    let gpt = random_gpt(config, 8)?;
    let model = DecodeModel::from_gpt(&gpt)?;
    let mut rng = StdRng::seed_from_u64(1);
    let prompt = tokens(12, config.vocab_size, &mut rng);
    let mut cache = model.new_cache(4, 32)?;
    let first = model.prefill(&mut cache, 0, &prompt)?.to_vec();
    for dst in 1..4 {
        cache.copy_slot(0, dst)?;
        assert_eq!(cache.pos(dst), 12);
    }
    let next = argmax(&first);
    let v = config.vocab_size;
    let got = model.step(&mut cache, &[(0, next), (1, next), (2, next), (3, next)])?.to_vec();
    for r in 1..4 {
        assert!(max_diff(&got[..v], &got[r * v..(r + 1) * v]) < 1e-6, "row {r}");
    }
    // a reset slot starts over: its logits equal a fresh prefill's
    cache.reset_slot(2)?;
    let again = model.prefill(&mut cache, 2, &prompt)?;
    assert!(max_diff(again, &first) < 1e-6);
    Ok(())
}

#[test]
fn a_full_cache_or_bad_input_is_an_error_and_changes_nothing() -> Result<()> {
    let config = &configs()[0];
    let gpt = random_gpt(config, 2)?;
    let model = DecodeModel::from_gpt(&gpt)?;
    let ids: Vec<u32> = (0..10).collect();
    let mut cache: DecodeCache = model.new_cache(2, 8)?;
    model.prefill(&mut cache, 0, &ids[..6])?;
    let err = model.prefill(&mut cache, 0, &ids[..3]).err().context("expected overflow")?;
    assert!(err.to_string().contains("kv cache full"), "{err}");
    assert_eq!(cache.pos(0), 6);
    model.prefill(&mut cache, 0, &ids[..2])?;
    assert_eq!(cache.pos(0), 8);
    let err = model.step(&mut cache, &[(1, 0), (0, 1)]).err().context("expected overflow")?;
    assert!(err.to_string().contains("kv cache full"), "{err}");
    assert_eq!((cache.pos(0), cache.pos(1)), (8, 0), "a refused step advances no row");
    // slots, tokens and sizes out of range
    assert!(model.step(&mut cache, &[(2, 0)]).is_err());
    assert!(model.step(&mut cache, &[(1, 0), (1, 1)]).is_err());
    assert!(model.step(&mut cache, &[(1, 97)]).is_err());
    assert!(model.step(&mut cache, &[]).is_err());
    assert!(model.prefill(&mut cache, 1, &[]).is_err());
    assert!(cache.copy_slot(0, 5).is_err());
    assert_eq!(cache.pos(1), 0);
    model.step(&mut cache, &[(1, 3)])?;
    // the rotary tables bound the capacity
    assert!(model.new_cache(1, 641).is_err());
    assert!(model.new_cache(0, 8).is_err());
    Ok(())
}
