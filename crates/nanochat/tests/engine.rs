//! The inference engine against nanochat v0: the fixture model's greedy generation
//! (`tests/fixtures/parity/model/generation.*`), KV-cache decoding against full recomputation, sampling
//! (seeds, top-k, several samples), the calculator tool's forced tokens
//! (`tests/fixtures/parity/calculator/`), stopping, a full KV cache reported as an error, and the native
//! CPU backend generating exactly what the candle backend generates.

mod common;

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use nanochat::engine::{sample, Backend, Engine, GenerateOptions, RowState, Sequences, Specials, TextStream};
use nanochat::model::{GPTConfig, KvCache, GPT};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use common::{fixture_engine, tokenizer};

/// The fixture's `GPTConfig`.
fn config() -> GPTConfig {
    common::fixture_config().expect("the fixture's config")
}

fn load(file: &str) -> Result<HashMap<String, Tensor>> {
    let path = common::parity("model").join(file);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))
}

fn json(file: &str) -> Result<Value> {
    let path = common::parity(file);
    Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)?)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn fixture_prompt() -> Result<Vec<u32>> {
    let prompt = load("generation.safetensors")?.remove("prompt").context("no prompt")?;
    Ok(prompt.to_vec1::<i64>()?.into_iter().map(|t| t as u32).collect())
}

fn greedy(num_samples: usize, max_tokens: usize) -> GenerateOptions {
    GenerateOptions { num_samples, max_tokens, temperature: 0.0, top_k: None, seed: 0, ..Default::default() }
}

fn sampled(max_tokens: usize, seed: u64) -> GenerateOptions {
    GenerateOptions { num_samples: 1, max_tokens, temperature: 1.0, top_k: None, seed, ..Default::default() }
}

/// Every step of a generation, as rows of tokens and rows of masks (one row per sample).
fn run(engine: &Engine, prompt: &[u32], opts: &GenerateOptions) -> Result<Sequences> {
    let (mut tokens, mut masks) = (vec![Vec::new(); opts.num_samples], vec![Vec::new(); opts.num_samples]);
    for step in engine.generate(prompt, opts)? {
        let (column, column_masks) = step?;
        for i in 0..opts.num_samples {
            tokens[i].push(column[i]);
            masks[i].push(column_masks[i]);
        }
    }
    Ok((tokens, masks))
}

#[test]
fn greedy_generation_matches_v0_engine() -> Result<()> {
    let engine = fixture_engine()?;
    let prompt = fixture_prompt()?;
    let want = load("generation.safetensors")?.remove("engine_tokens").context("no engine_tokens")?;
    let want: Vec<u32> = want.to_vec1::<i64>()?.into_iter().map(|t| t as u32).collect();
    let gen = json("model/generation.json")?;
    assert_eq!(want, ids(&gen["engine_generate_tokens"]));

    let (tokens, masks) = run(&engine, &prompt, &greedy(1, 20))?;
    assert_eq!(tokens[0], want, "greedy tokens differ from v0's Engine");
    assert_eq!(masks[0], vec![1u8; 20], "sampled tokens carry mask 1");

    // two samples from one prefill at temperature 0: two identical rows, both v0's
    let (tokens, _) = run(&engine, &prompt, &greedy(2, 20))?;
    assert_eq!(tokens, vec![want.clone(); 2]);

    // generate_batch: prompt + completion, mask 0 over the prompt
    let (results, masks) = engine.generate_batch(&prompt, &greedy(1, 20))?;
    assert_eq!(results[0], ids(&gen["engine_generate_batch_result"]));
    assert_eq!(masks[0], [vec![0u8; prompt.len()], vec![1u8; 20]].concat());
    Ok(())
}

/// A random tiny model whose zero-initialised tensors (`lm_head`, every `c_proj`) are refilled, so
/// that attention and the cache matter and the logits are not all equal.
fn random_engine(seed: u64) -> Result<Engine> {
    let cfg = config();
    let (model, varmap) = GPT::init(&cfg, seed, &Device::Cpu)?;
    {
        let data = varmap.data().lock().unwrap();
        let mut rng = StdRng::seed_from_u64(seed + 1);
        for (name, var) in data.iter() {
            if name == "lm_head.weight" || name.ends_with("c_proj.weight") {
                let (rows, cols) = var.as_tensor().dims2()?;
                let std = if name == "lm_head.weight" { 0.5 } else { 1.0 / (cols as f32).sqrt() };
                let normal = rand_distr::Normal::new(0.0f32, std)?;
                let values: Vec<f32> =
                    (0..rows * cols).map(|_| rand_distr::Distribution::sample(&normal, &mut rng)).collect();
                var.set(&Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)?;
            }
        }
    }
    Engine::new(model, tokenizer()?)
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() -> Result<()> {
    let engine = random_engine(7)?;
    let tok = engine.tokenizer();
    let prompt = [vec![tok.bos_id()], tok.encode("The quick brown fox jumps over")].concat();
    let (tokens, _) = run(&engine, &prompt, &greedy(1, 50))?;
    assert_eq!(tokens[0].len(), 50, "50 greedy steps (no stop token was expected from this model)");

    // the same greedy decoding, recomputing the whole sequence without a cache at every step
    let specials = Specials::from_tokenizer(tok)?;
    let mut row = RowState::new();
    let mut seq = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..50 {
        let idx = Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = engine.model().forward(&idx, None)?.i((0, seq.len() - 1))?.to_vec1::<f32>()?;
        let (token, _) = row.step(sample(&logits, 0.0, None, &mut StdRng::seed_from_u64(0)), &specials, tok);
        want.push(token);
        seq.push(token);
    }
    assert_eq!(tokens[0], want);
    Ok(())
}

#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() -> Result<()> {
    let engine = fixture_engine()?;
    let prompt = fixture_prompt()?;
    let (a, _) = run(&engine, &prompt, &sampled(20, 1))?;
    let (b, _) = run(&engine, &prompt, &sampled(20, 1))?;
    let (c, _) = run(&engine, &prompt, &sampled(20, 2))?;
    assert_eq!(a, b, "the same seed gives the same tokens");
    assert_ne!(a, c, "different seeds give different tokens");

    let (greedy_tokens, _) = run(&engine, &prompt, &greedy(1, 20))?;
    let top1 = GenerateOptions { top_k: Some(1), ..sampled(20, 3) };
    assert_eq!(run(&engine, &prompt, &top1)?.0, greedy_tokens);

    // several samples from one prefill at temperature 1 differ, from the first token on
    let (rows, _) = run(&engine, &prompt, &GenerateOptions { num_samples: 4, ..sampled(20, 5) })?;
    assert!(rows.iter().any(|r| r != &rows[0]), "4 samples at temperature 1 were identical");
    assert!(rows.iter().any(|r| r[0] != rows[0][0]), "every sample drew the same first token");
    Ok(())
}

#[test]
fn sample_breaks_ties_on_the_first_index_and_respects_top_k() {
    let mut rng = StdRng::seed_from_u64(0);
    assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], 0.0, None, &mut rng), 1);
    assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], 1.0, Some(1), &mut rng), 1);
    for _ in 0..200 {
        let t = sample(&[5.0, 0.0, 4.0, 4.5, -1.0], 2.0, Some(2), &mut rng);
        assert!(t == 0 || t == 3, "top-2 sampled {t}");
    }
    // NaN logits (a broken model) never panic; like torch's argmax, NaN counts as the largest
    assert_eq!(sample(&[1.0, f32::NAN], 1.0, None, &mut rng), 1);
    assert_eq!(sample(&[1.0, f32::NAN], 0.0, Some(1), &mut rng), 1);
}

#[test]
fn max_tokens_is_respected_and_a_full_cache_is_an_error() -> Result<()> {
    let engine = fixture_engine()?;
    let prompt = fixture_prompt()?;
    assert_eq!(run(&engine, &prompt, &greedy(2, 7))?.0, vec![run(&engine, &prompt, &greedy(1, 7))?.0[0].clone(); 2]);
    assert_eq!(run(&engine, &prompt, &greedy(1, 7))?.0[0].len(), 7);
    assert!(run(&engine, &prompt, &greedy(1, 0))?.0[0].is_empty());

    // prompt + max_tokens beyond the 640 rotary positions: refused up front, with advice
    let err = engine.generate(&prompt, &greedy(1, 640)).err().context("expected an error")?;
    assert!(err.to_string().contains("fewer tokens"), "{err}");

    // a cache with a capacity refuses a chunk that does not fit and stays usable
    let mut cache = KvCache::with_capacity(2, 8);
    let idx = |n: usize| Tensor::new(&prompt[..n], &Device::Cpu)?.unsqueeze(0);
    engine.model().forward_cached(&idx(6)?, &mut cache)?;
    let err = engine.model().forward_cached(&idx(3)?, &mut cache).err().context("expected overflow")?;
    assert!(err.to_string().contains("kv cache full"), "{err}");
    assert_eq!(cache.pos(), 6);
    engine.model().forward_cached(&idx(2)?, &mut cache)?;
    assert_eq!(cache.pos(), 8);
    Ok(())
}

/// Every calculator fixture with a result, as (expression, forced tokens) from `key`.
fn calculator_cases() -> Result<Vec<(String, Vec<u32>)>> {
    let calc = json("calculator/calculator.json")?;
    let mut cases = Vec::new();
    for (group, key) in [("math", "v0_engine_forced_tokens"), ("string_count_head_only", "head_engine_forced_tokens")] {
        for case in calc[group].as_array().context("calculator groups")? {
            if !case[key].is_null() {
                cases.push((case["expr"].as_str().context("expr")?.to_string(), ids(&case[key])));
            }
        }
    }
    Ok(cases)
}

#[test]
fn tool_calls_force_the_calculator_answer_with_mask_0() -> Result<()> {
    let tok = tokenizer()?;
    let sp = Specials::from_tokenizer(&tok)?;
    let cases = calculator_cases()?;
    assert!(cases.len() > 30);
    // a scripted token source: text, a tool call, then junk the forced tokens must override
    let junk = tok.encode(" junk");
    for (expr, forced) in &cases {
        let mut row = RowState::new();
        let script = [tok.encode("so"), vec![sp.python_start], tok.encode(expr), vec![sp.python_end]].concat();
        for &t in &script {
            assert_eq!(row.step(t, &sp, &tok), (t, 1), "{expr}: sampled tokens pass through");
        }
        let got: Vec<(u32, u8)> = (0..forced.len()).map(|i| row.step(junk[i % junk.len()], &sp, &tok)).collect();
        assert_eq!(got, forced.iter().map(|&t| (t, 0)).collect::<Vec<_>>(), "{expr}");
        assert_eq!(row.step(junk[0], &sp, &tok), (junk[0], 1), "{expr}: sampling resumes");
        assert!(!row.is_completed());
        row.step(sp.assistant_end, &sp, &tok);
        assert!(row.is_completed());
    }
    // no answer (invalid expression), an empty call, and a python_end outside a call force nothing
    let mut row = RowState::new();
    for t in [vec![sp.python_start], tok.encode("1/0"), vec![sp.python_end, sp.python_start, sp.python_end]].concat() {
        row.step(t, &sp, &tok);
    }
    row.step(sp.python_end, &sp, &tok);
    assert_eq!(row.step(junk[0], &sp, &tok), (junk[0], 1));
    let mut row = RowState::new();
    row.step(sp.bos, &sp, &tok);
    assert!(row.is_completed(), "<|bos|> ends a row too");
    Ok(())
}

/// A model that is a lookup table of next tokens: with v0's init every `c_proj` is zero, so the
/// blocks add nothing and the last hidden state is `norm(wte[token])`. Each token in `chain` gets a
/// basis vector as its embedding and `lm_head` maps that vector to the token's successor.
fn chain_engine(chain: &[(u32, u32)]) -> Result<Engine> {
    let cfg = config();
    let (model, varmap) = GPT::init(&cfg, 0, &Device::Cpu)?;
    let data = varmap.data().lock().unwrap();
    let var = |name: &str| data.get(name).context("no such parameter");
    let (mut wte, mut lm_head) =
        (var("transformer.wte.weight")?.as_tensor().to_vec2::<f32>()?, vec![vec![0f32; cfg.n_embd]; cfg.vocab_size]);
    for (j, &(from, to)) in chain.iter().enumerate() {
        wte[from as usize] = (0..cfg.n_embd).map(|c| if c == j { 1.0 } else { 0.0 }).collect();
        lm_head[to as usize][j] = 2.0;
    }
    let to_tensor = |rows: Vec<Vec<f32>>| Tensor::new(rows, &Device::Cpu);
    var("transformer.wte.weight")?.set(&to_tensor(wte)?)?;
    var("lm_head.weight")?.set(&to_tensor(lm_head)?)?;
    drop(data);
    Engine::new(model, tokenizer()?)
}

#[test]
fn engine_runs_a_tool_call_end_to_end_and_stops_at_assistant_end() -> Result<()> {
    let tok = tokenizer()?;
    let sp = Specials::from_tokenizer(&tok)?;
    let mut tested = 0;
    for (expr, forced) in calculator_cases()? {
        // the model writes `<|python_start|>` expr `<|python_end|>`; after the forced answer it ends
        let start = tok.encode("x")[0];
        let written = [vec![sp.python_start], tok.encode(&expr), vec![sp.python_end]].concat();
        let mut from = vec![start];
        from.extend(&written[..written.len() - 1]);
        let mut chain: Vec<(u32, u32)> = from.iter().copied().zip(written.iter().copied()).collect();
        chain.push((sp.output_end, sp.assistant_end));
        let mut seen: Vec<u32> = chain.iter().map(|c| c.0).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != chain.len() || chain.len() > config().n_embd {
            continue; // a token repeats: a lookup table cannot express this expression
        }
        let engine = chain_engine(&chain)?;
        let prompt = [tok.bos_id(), start];
        let opts = GenerateOptions { num_samples: 2, ..greedy(2, 100) };
        let (tokens, masks) = run(&engine, &prompt, &opts)?;
        let want = [written.clone(), forced.clone(), vec![sp.assistant_end]].concat();
        let want_masks = [vec![1u8; written.len()], vec![0u8; forced.len()], vec![1]].concat();
        assert_eq!(tokens, vec![want.clone(); 2], "{expr}");
        assert_eq!(masks, vec![want_masks.clone(); 2], "{expr}");

        let (results, batch_masks) = engine.generate_batch(&prompt, &opts)?;
        assert_eq!(results[1], [prompt.to_vec(), written.clone(), forced.clone()].concat(), "{expr}");
        assert_eq!(batch_masks[1], [vec![0u8; 2], want_masks[..want_masks.len() - 1].to_vec()].concat());
        tested += 1;
        if tested == 5 {
            break;
        }
    }
    assert!(tested >= 3, "only {tested} calculator cases fit a lookup-table model");
    Ok(())
}

#[test]
fn text_stream_holds_back_split_characters_and_hides_specials() -> Result<()> {
    let tok = tokenizer()?;
    let sp = Specials::from_tokenizer(&tok)?;
    let mut text = TextStream::new();
    // byte-level tokens: id b is the single byte b; "é" is C3 A9, "€" is E2 82 AC
    assert_eq!(text.push(&tok, 0xC3), "");
    assert_eq!(text.push(&tok, sp.python_start), "", "special tokens print nothing");
    assert_eq!(text.push(&tok, 0xA9), "é");
    assert_eq!(text.push(&tok, 0xE2), "");
    assert_eq!(text.push(&tok, 0x82), "");
    assert_eq!(text.push(&tok, 0xAC), "€");
    assert_eq!(text.push(&tok, 0xFF), "\u{FFFD}", "a byte that never becomes valid");
    assert_eq!(text.push(&tok, b'a' as u32), "a");
    assert_eq!(text.push(&tok, 0xE2), "");
    assert_eq!(text.push(&tok, b'b' as u32), "\u{FFFD}b", "an interrupted character");
    assert_eq!(text.push(&tok, 0xC3), "");
    assert_eq!(text.finish(), "\u{FFFD}");
    // streamed text equals the whole decode for the fixture's generation
    let ids = [fixture_prompt()?, ids(&json("model/generation.json")?["engine_generate_tokens"])].concat();
    let mut text = TextStream::new();
    let mut streamed: String = ids.iter().map(|&id| text.push(&tok, id)).collect();
    streamed.push_str(&text.finish());
    assert_eq!(streamed, tok.decode(&ids[1..]));
    Ok(())
}

#[test]
fn an_unbounded_cache_grows_past_its_first_buffer() -> Result<()> {
    let engine = random_engine(11)?;
    let tok = engine.tokenizer();
    let text = "a long enough text to run the cache past its first sixty-four positions, ".repeat(8);
    let ids: Vec<u32> = [vec![tok.bos_id()], tok.encode(&text)].concat().into_iter().take(150).collect();
    assert_eq!(ids.len(), 150);
    let full = engine.model().forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?, None)?;
    // a 40-token chunk, then single tokens, then a 30-token chunk: buffers of 64, 128, then 256
    let mut cache = KvCache::new(2);
    let mut start = 0;
    for len in [40].into_iter().chain(std::iter::repeat_n(1, 80)).chain([30]) {
        let chunk = Tensor::new(&ids[start..start + len], &Device::Cpu)?.unsqueeze(0)?;
        let logits = engine.model().forward_cached(&chunk, &mut cache)?;
        let want = full.narrow(1, start, len)?;
        let diff = (logits - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "positions {start}..{}: max |diff| {diff}", start + len);
        start += len;
    }
    assert_eq!(cache.pos(), 150);
    Ok(())
}

#[test]
fn native_and_candle_backends_generate_the_same() -> Result<()> {
    let vb = VarBuilder::from_tensors(load("params.safetensors")?, DType::F32, &Device::Cpu);
    let candle = Engine::with_backend(GPT::new(&config(), vb)?, tokenizer()?, Backend::Candle)?;
    let native = fixture_engine()?;
    assert_eq!((native.backend(), candle.backend()), (Backend::Native, Backend::Candle), "native is the CPU default");
    let prompt = fixture_prompt()?;
    let many = GenerateOptions {
        num_samples: 4,
        max_tokens: 40,
        temperature: 1.0,
        top_k: Some(50),
        seed: 5,
        ..Default::default()
    };
    for opts in [greedy(1, 40), greedy(3, 40), sampled(60, 3), many] {
        assert_eq!(run(&native, &prompt, &opts)?, run(&candle, &prompt, &opts)?, "{opts:?}");
    }
    // the candle backend still refuses a full cache up front, like the native one
    let err = candle.generate(&prompt, &greedy(1, 640)).err().context("expected an error")?;
    assert!(err.to_string().contains("fewer tokens"), "{err}");
    Ok(())
}
