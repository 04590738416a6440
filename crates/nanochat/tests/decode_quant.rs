//! Reduced-precision weights of the native decode path (`model::decode::WeightFormat`): bf16 rounds
//! to nearest even like torch (and candle); the bf16 and int8 kernels equal a scalar reference
//! built here from independently rounded weights, on odd sizes that hit every remainder path, for
//! decode (few rows) and prefill (GEMM) alike; whole models in bf16 / int8 track the f32 model's
//! logits and greedy tokens; a step reads half / a quarter of the bytes; and the quality evaluation
//! equals loss and bits per byte computed from the candle GPT's forward pass.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use nanochat::bench::quality;
use nanochat::model::decode::{bf16_from_f32, bf16_to_f32, DecodeModel, Matrix, WeightFormat};
use nanochat::model::{GPTConfig, GPT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

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

fn config() -> GPTConfig {
    GPTConfig {
        sequence_len: 64,
        vocab_size: 1031,
        n_layer: 3,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 84,
        rotary: Default::default(),
    }
}

fn randn(n: usize, rng: &mut StdRng) -> Vec<f32> {
    let normal = Normal::new(0.0f32, 1.0).unwrap_or_else(|_| unreachable!());
    (0..n).map(|_| normal.sample(rng)).collect()
}

fn tokens(n: usize, vocab: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b]).then(b.cmp(&a))).unwrap_or(0)
}

/// bf16 through candle (the `half` crate), a rounding implementation independent of ours.
fn candle_bf16(values: &[f32]) -> Result<Vec<f32>> {
    let t = Tensor::new(values, &Device::Cpu)?;
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The int8 quantisation the format promises, computed here: per row `scale = max|w| / 127`,
/// `q = round(w / scale)`; returns the dequantised weights `scale · q` and the row scales.
fn int8_reference(w: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut deq = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks(cols) {
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        deq.extend(row.iter().map(|&v| if scale == 0.0 { 0.0 } else { (v / scale).round() * scale }));
    }
    (deq, scales)
}

#[test]
fn bf16_rounds_to_nearest_even() -> Result<()> {
    let cases: [(u32, u16); 16] = [
        (0x3F80_0000, 0x3F80), // 1.0 is exact
        (0x3F80_7FFF, 0x3F80), // just below the midpoint: down
        (0x3F80_8000, 0x3F80), // tie, kept half even: stays
        (0x3F80_8001, 0x3F81), // just above the midpoint: up
        (0x3F81_8000, 0x3F82), // tie, kept half odd: up to even
        (0x3F81_7FFF, 0x3F81),
        (0xBF80_8000, 0xBF80), // negative ties behave the same on the magnitude
        (0xBF81_8000, 0xBF82),
        (0xBF81_0001, 0xBF81),
        (0x0000_8000, 0x0000), // subnormal tie to even (zero)
        (0x0001_8000, 0x0002),
        (0x8000_0000, 0x8000), // -0.0 keeps its sign
        (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds past the largest bf16: +inf, as torch
        (0x7F80_0000, 0x7F80), // +inf
        (0xFF80_0000, 0xFF80), // -inf
        (0x3EAA_AAAB, 0x3EAB), // 1/3: 0xAAAB > midpoint 0x8000
    ];
    for (bits, want) in cases {
        let got = bf16_from_f32(f32::from_bits(bits));
        assert_eq!(got, want, "bf16 of {bits:#010x}: {got:#06x}, expected {want:#06x}");
    }
    assert!(bf16_to_f32(bf16_from_f32(f32::NAN)).is_nan());
    assert!(bf16_to_f32(bf16_from_f32(-f32::NAN)).is_nan());
    // and agrees bit for bit with candle's conversion on random values of every magnitude and on
    // a sweep of exact ties
    let mut rng = StdRng::seed_from_u64(4);
    let mut values: Vec<f32> = (0..20_000).map(|_| f32::from_bits(rng.random::<u32>())).collect();
    values.extend((0..4096u32).map(|i| f32::from_bits(0x3000_8000 + (i << 16))));
    values.retain(|v| v.is_finite());
    let want = candle_bf16(&values)?;
    for (v, w) in values.iter().zip(&want) {
        assert_eq!(bf16_to_f32(bf16_from_f32(*v)).to_bits(), w.to_bits(), "bf16 of {:#010x}", v.to_bits());
    }
    Ok(())
}

#[test]
fn bf16_and_int8_kernels_match_a_scalar_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    // (n activation rows, k inputs, m outputs): k not a multiple of 8 or 32 hits the vector tails,
    // odd m the unpaired last weight row, n of 1..7 the decode kernel's groups of four, n >= 16
    // the prefill GEMM over several widened blocks (k = 1000: 2,097 weight rows per block), and
    // n · m · k past 2^17 the parallel paths
    let sizes = [
        (1, 37, 5),
        (1, 300, 601),
        (2, 37, 7),
        (3, 61, 13),
        (4, 8, 3),
        (5, 300, 33),
        (7, 9, 1),
        (16, 45, 19),
        (33, 300, 601),
        (20, 1000, 300),
        (20, 1000, 2500),
    ];
    let mut scratch = Vec::new();
    for (case, &(n, k, m)) in sizes.iter().enumerate() {
        let mut w = randn(m * k, &mut rng);
        if m > 2 {
            // an all-zero row (int8 scale 0) and one with a single large weight
            w[k..2 * k].fill(0.0);
            w[2 * k] = 40.0;
        }
        let x = randn(n * k, &mut rng);
        let initial = randn(n * m, &mut rng);
        let (int8_w, scales) = int8_reference(&w, m, k);
        for format in [WeightFormat::Bf16, WeightFormat::Int8, WeightFormat::F32] {
            let reference_w = match format {
                WeightFormat::Bf16 => candle_bf16(&w)?,
                WeightFormat::Int8 => int8_w.clone(),
                WeightFormat::F32 => w.clone(),
            };
            let matrix = Matrix::new(w.clone(), m, k, format)?;
            assert_eq!((matrix.rows(), matrix.cols(), matrix.format()), (m, k, format));
            // the stored weights are exactly the independently rounded ones
            let stored = matrix.to_f32();
            for (i, (a, b)) in stored.iter().zip(&reference_w).enumerate() {
                let tol = if format == WeightFormat::Int8 { 1e-6 * scales[i / k] } else { 0.0 };
                assert!((a - b).abs() <= tol, "case {case} {format}: weight {i} is {a}, expected {b}");
            }
            for accumulate in [false, true] {
                let mut out = initial.clone();
                matrix.linear(&x, n, &mut out, accumulate, &mut scratch)?;
                for i in 0..n {
                    for j in 0..m {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &reference_w[j * k..(j + 1) * k]);
                        let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                        let l1: f64 = xr.iter().zip(wr).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                        let want = dot + if accumulate { f64::from(initial[i * m + j]) } else { 0.0 };
                        let got = f64::from(out[i * m + j]);
                        // f32 accumulation of k products: far below one part in 10^5 of their l1 norm
                        let tol = 1e-5 * (l1 + want.abs()) + 1e-6;
                        assert!(
                            (got - want).abs() <= tol,
                            "case {case} ({n}x{k} . {m}x{k}) {format} accumulate {accumulate}: out[{i}][{j}] = {got}, \
                             expected {want}"
                        );
                    }
                }
            }
        }
    }
    // the checked entry point refuses short buffers instead of reading past them
    let matrix = Matrix::new(vec![1.0; 6], 2, 3, WeightFormat::Bf16)?;
    assert!(matrix.linear(&[1.0; 5], 2, &mut [0.0; 4], false, &mut scratch).is_err());
    assert!(matrix.linear(&[1.0; 6], 2, &mut [0.0; 3], false, &mut scratch).is_err());
    assert!(Matrix::new(vec![1.0; 5], 2, 3, WeightFormat::Int8).is_err());
    Ok(())
}

#[test]
fn bf16_and_int8_models_track_the_f32_model() -> Result<()> {
    let config = config();
    let gpt = random_gpt(&config, 3)?;
    let f32_model = DecodeModel::from_gpt(&gpt)?;
    assert_eq!(f32_model.format(), WeightFormat::F32);
    let mut rng = StdRng::seed_from_u64(5);
    // 20 tokens of prompt go through the GEMM path, then 20 steps through the decode kernel
    let prompt = tokens(20, config.vocab_size, &mut rng);
    // (format, largest logit error allowed, share of greedy tokens that must agree)
    for (format, tol, agree) in [(WeightFormat::Bf16, 0.08, 0.9), (WeightFormat::Int8, 0.15, 0.8)] {
        let model = DecodeModel::from_gpt_with(&gpt, format)?;
        assert_eq!(model.format(), format);
        let (mut a, mut b) = (f32_model.new_cache(1, 64)?, model.new_cache(1, 64)?);
        let mut want = f32_model.prefill(&mut a, 0, &prompt)?.to_vec();
        let mut got = model.prefill(&mut b, 0, &prompt)?.to_vec();
        let (mut worst, mut same) = (0.0f32, 0);
        for step in 0..=20 {
            let err = want.iter().zip(&got).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            worst = worst.max(err);
            assert!(err < tol, "{format} step {step}: logits differ by {err}");
            let next = argmax(&want);
            same += usize::from(argmax(&got) == next);
            if step < 20 {
                // both follow the f32 model's choice, so every step compares the same sequence
                want = f32_model.step(&mut a, &[(0, next as u32)])?.to_vec();
                got = model.step(&mut b, &[(0, next as u32)])?.to_vec();
            }
        }
        assert!(same as f64 >= agree * 21.0, "{format}: {same} of 21 greedy tokens agree with f32");
        println!("{format}: largest logit difference {worst:.4}, {same}/21 greedy tokens agree");
    }
    Ok(())
}

#[test]
fn weight_bytes_per_step_halve_and_quarter() -> Result<()> {
    let config = config();
    let gpt = random_gpt(&config, 1)?;
    let bytes = |format| -> Result<usize> { Ok(DecodeModel::from_gpt_with(&gpt, format)?.weight_bytes_per_step()) };
    let (f32_bytes, bf16_bytes, int8_bytes) =
        (bytes(WeightFormat::F32)?, bytes(WeightFormat::Bf16)?, bytes(WeightFormat::Int8)?);
    // exact: every matrix weight once in its width, int8 scales (one f32 per output row), and one
    // f32 embedding row
    let (c, kvd) = (config.n_embd, config.n_kv_head * config.head_dim());
    let matrices = config.params().iter().skip(1).map(|s| s.numel()).sum::<usize>();
    let rows = config.n_layer * ((c + 2 * kvd) + c + 4 * c + c) + config.vocab_size;
    assert_eq!(f32_bytes, 4 * matrices + 4 * c);
    assert_eq!(bf16_bytes, 2 * matrices + 4 * c);
    assert_eq!(int8_bytes, matrices + 4 * rows + 4 * c);
    let (half, quarter) = (bf16_bytes as f64 / f32_bytes as f64, int8_bytes as f64 / f32_bytes as f64);
    assert!((0.5..0.51).contains(&half), "bf16 reads {half} of f32's bytes");
    assert!((0.25..0.27).contains(&quarter), "int8 reads {quarter} of f32's bytes");
    Ok(())
}

#[test]
fn quality_matches_loss_and_bpb_from_the_candle_forward() -> Result<()> {
    let config = config();
    let gpt = random_gpt(&config, 9)?;
    let model = DecodeModel::from_gpt(&gpt)?;
    let mut rng = StdRng::seed_from_u64(2);
    let v = config.vocab_size;
    // rows of different lengths (one too short to have a target); some ids have no bytes, as
    // special tokens do
    let rows = vec![tokens(40, v, &mut rng), tokens(17, v, &mut rng), tokens(2, v, &mut rng), tokens(1, v, &mut rng)];
    let token_bytes: Vec<u32> = (0..v as u32).map(|i| if i % 7 == 0 { 0 } else { 1 + i % 4 }).collect();
    let got = quality::evaluate(&model, &rows, &token_bytes)?;

    let (mut nats, mut targets, mut bpb_nats, mut bytes) = (0.0f64, 0usize, 0.0f64, 0u64);
    for row in rows.iter().filter(|r| r.len() >= 2) {
        let t = row.len() - 1;
        let idx = Tensor::new(&row[..t], &Device::Cpu)?.unsqueeze(0)?;
        let logits = gpt.forward(&idx, None)?.i(0)?; // (T, V)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for (p, &target) in row[1..].iter().enumerate() {
            let loss = -f64::from(logp[p][target as usize]);
            nats += loss;
            targets += 1;
            if token_bytes[target as usize] > 0 {
                bpb_nats += loss;
                bytes += u64::from(token_bytes[target as usize]);
            }
        }
    }
    let (want_loss, want_bpb) = (nats / targets as f64, bpb_nats / (std::f64::consts::LN_2 * bytes as f64));
    assert_eq!(got.targets, targets);
    assert!((got.loss - want_loss).abs() < 1e-4, "loss {} vs candle {want_loss}", got.loss);
    assert!((got.bpb - want_bpb).abs() < 1e-4, "bpb {} vs candle {want_bpb}", got.bpb);
    assert!((got.perplexity() - want_loss.exp()).abs() < 1e-3 * want_loss.exp());

    // bf16 costs little, int8 a bit more, on this random model too
    for (format, limit) in [(WeightFormat::Bf16, 0.01), (WeightFormat::Int8, 0.03)] {
        let q = quality::evaluate(&DecodeModel::from_gpt_with(&gpt, format)?, &rows, &token_bytes)?;
        let change = (q.perplexity() / got.perplexity() - 1.0).abs();
        assert!(change < limit, "{format}: perplexity changes by {:.3}%", 100.0 * change);
    }
    // nothing to score, or a target outside the vocabulary, is an error
    assert!(quality::evaluate(&model, &[vec![1]], &token_bytes).is_err());
    assert!(quality::evaluate(&model, &[vec![1, v as u32]], &token_bytes).is_err());
    Ok(())
}
