//! Fused kernels against the unfused candle composition they replace: values and gradients on
//! random shapes, odd sizes and ignored targets included.

use candle_core::{DType, Device, Module, Tensor, Var};
use nanochat::model::fused::{softcap_cross_entropy, Gemm, LogitsPool};
use nanochat::model::ops::{cross_entropy_per_token, softcap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Normal(0, std) values of `shape`, drawn from `rng`: seeded, so that every run checks the same
/// inputs and a failure can be replayed.
fn randn(rng: &mut StdRng, std: f32, shape: impl Into<candle_core::Shape>) -> Tensor {
    let shape = shape.into();
    let normal = Normal::new(0f32, std).unwrap();
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| normal.sample(rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn softcap_cross_entropy_matches_the_composition() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    for (n, v, seed) in [(1, 2, 0u64), (7, 13, 1), (33, 1000, 2), (64, 4099, 3)] {
        let raw = (randn(&mut rng, 8.0, (n, v)) + seed as f64).unwrap();
        let targets: Vec<i64> =
            (0..n as i64).map(|i| if i % 5 == 3 { -1 } else { (i * 7919 + seed as i64) % v as i64 }).collect();
        let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
        // Random weights on the per-token losses make the upstream gradient non-uniform.
        let w = Tensor::rand(0f32, 1.0, n, &dev).unwrap();

        let x1 = Var::from_tensor(&raw).unwrap();
        let fused = softcap_cross_entropy(x1.as_tensor(), &targets, 15.0).unwrap();
        let g1 = fused.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();

        let x2 = Var::from_tensor(&raw).unwrap();
        let (reference, _) = cross_entropy_per_token(&softcap(x2.as_tensor(), 15.0).unwrap(), &targets).unwrap();
        let g2 = reference.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();

        let dv = max_abs_diff(&fused, &reference);
        let dg = max_abs_diff(g1.get(x1.as_tensor()).unwrap(), g2.get(x2.as_tensor()).unwrap());
        println!("n={n} v={v}: max |loss diff| {dv:.2e}, max |grad diff| {dg:.2e}");
        assert!(dv < 1e-4, "losses differ by {dv}");
        assert!(dg < 1e-6, "gradients differ by {dg}");
        let ignored = fused.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(ignored.iter().skip(3).step_by(5).all(|&l| l == 0.0), "ignored targets give 0 loss");
    }
}

#[test]
fn bad_targets_are_errors_not_panics() {
    let dev = Device::Cpu;
    let raw = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let out_of_range = Tensor::new(&[0i64, 4], &dev).unwrap();
    assert!(softcap_cross_entropy(&raw, &out_of_range, 15.0).is_err());
    let wrong_len = Tensor::new(&[0i64], &dev).unwrap();
    assert!(softcap_cross_entropy(&raw, &wrong_len, 15.0).is_err());
}

/// Gradient of `sum(out * w)` with respect to each of `inputs`, for a random weight `w` (so the
/// upstream gradient is not uniform).
fn grads_of(out: &Tensor, w: &Tensor, inputs: &[&Var]) -> Vec<Tensor> {
    let g = out.mul(w).unwrap().sum_all().unwrap().backward().unwrap();
    inputs.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect()
}

fn check(what: &str, fused: &Tensor, reference: &Tensor, tol: f32) {
    assert_eq!(fused.dims(), reference.dims(), "{what}: shapes differ");
    let d = max_abs_diff(fused, reference);
    let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
    println!("{what}: max |diff| {d:.2e} (scale {scale:.2e})");
    assert!(d <= tol * scale, "{what}: differs by {d} (scale {scale})");
}

#[test]
fn rms_norm_matches_the_composition() {
    let mut rng = StdRng::seed_from_u64(0);
    for (shape, seed) in [(vec![1, 1], 0.0), (vec![3, 7], 1.0), (vec![2, 5, 64], 2.0), (vec![4, 33, 256], -3.0)] {
        let raw = (randn(&mut rng, 2.0, shape.as_slice()) + seed).unwrap();
        let w = randn(&mut rng, 1.0, shape.as_slice());
        let (x1, x2) = (Var::from_tensor(&raw).unwrap(), Var::from_tensor(&raw).unwrap());
        let fused = nanochat::model::fused::rms_norm(x1.as_tensor()).unwrap();
        let reference = nanochat::model::ops::rms_norm(x2.as_tensor()).unwrap();
        check(&format!("rms_norm {shape:?} values"), &fused, &reference, 1e-5);
        let (g1, g2) = (grads_of(&fused, &w, &[&x1]), grads_of(&reference, &w, &[&x2]));
        check(&format!("rms_norm {shape:?} grads"), &g1[0], &g2[0], 1e-5);
    }
}

#[test]
fn relu_squared_matches_the_composition() {
    let mut rng = StdRng::seed_from_u64(0);
    for n in [1usize, 7, 40_000] {
        let raw = randn(&mut rng, 1.0, (n,));
        let w = randn(&mut rng, 1.0, (n,));
        let (x1, x2) = (Var::from_tensor(&raw).unwrap(), Var::from_tensor(&raw).unwrap());
        let fused = nanochat::model::fused::relu_squared(x1.as_tensor()).unwrap();
        let reference = x2.as_tensor().relu().unwrap().sqr().unwrap();
        check(&format!("relu² {n} values"), &fused, &reference, 1e-6);
        let (g1, g2) = (grads_of(&fused, &w, &[&x1]), grads_of(&reference, &w, &[&x2]));
        check(&format!("relu² {n} grads"), &g1[0], &g2[0], 1e-6);
    }
}

#[test]
fn linear_matches_candle_linear() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    for (n, c, out) in [(1usize, 1usize, 1usize), (7, 5, 3), (130, 64, 96), (33, 256, 1024)] {
        let xr = randn(&mut rng, 1.0, (n, c));
        let wr = randn(&mut rng, 0.5, (out, c));
        let up = randn(&mut rng, 1.0, (n, out));
        let (x1, w1) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let (x2, w2) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let fused = nanochat::model::fused::linear(x1.as_tensor(), w1.as_tensor(), Gemm::F32).unwrap();
        let reference = candle_nn::Linear::new(w2.as_tensor().clone(), None).forward(x2.as_tensor()).unwrap();
        check(&format!("linear {n}x{c}->{out} values"), &fused, &reference, 1e-5);
        let (g1, g2) = (grads_of(&fused, &up, &[&x1, &w1]), grads_of(&reference, &up, &[&x2, &w2]));
        check(&format!("linear {n}x{c}->{out} dx"), &g1[0], &g2[0], 1e-5);
        check(&format!("linear {n}x{c}->{out} dw"), &g1[1], &g2[1], 1e-5);
    }
    // a weight that does not fit the input is an error, not a panic
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    assert!(nanochat::model::fused::linear(&x, &Tensor::zeros((3, 5), DType::F32, &dev).unwrap(), Gemm::F32).is_err());
}

/// The model's composition: rotate the halves of (B, T, H, D) by (T, 1, D/2) tables, then RMSNorm.
fn rope_norm_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.dim(3).unwrap() / 2;
    let (x1, x2) = (x.narrow(3, 0, d).unwrap(), x.narrow(3, d, d).unwrap());
    let y1 = (x1.broadcast_mul(cos).unwrap() + x2.broadcast_mul(sin).unwrap()).unwrap();
    let y2 = (x2.broadcast_mul(cos).unwrap() - x1.broadcast_mul(sin).unwrap()).unwrap();
    nanochat::model::ops::rms_norm(&Tensor::cat(&[&y1, &y2], 3).unwrap()).unwrap()
}

#[test]
fn rope_qk_norm_matches_the_composition() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    for (b, t, h, d) in [(1, 1, 1, 2), (2, 7, 3, 8), (2, 33, 4, 64)] {
        let raw = randn(&mut rng, 1.0, (b, t, h, d));
        let w = randn(&mut rng, 1.0, (b, t, h, d));
        let angles = Tensor::rand(0f32, 6.0, (t, 1, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let (x1, x2) = (Var::from_tensor(&raw).unwrap(), Var::from_tensor(&raw).unwrap());
        let fused = nanochat::model::fused::rope_qk_norm(x1.as_tensor(), &cos, &sin).unwrap();
        let reference = rope_norm_reference(x2.as_tensor(), &cos, &sin);
        check(&format!("rope_qk_norm {:?} values", (b, t, h, d)), &fused, &reference, 1e-5);
        let (g1, g2) = (grads_of(&fused, &w, &[&x1]), grads_of(&reference, &w, &[&x2]));
        check(&format!("rope_qk_norm {:?} grads", (b, t, h, d)), &g1[0], &g2[0], 1e-5);
    }
}

/// Attention as the model composes it: heads first, kv heads repeated, scores, additive mask with
/// a visible prefix of tk - tq keys, softmax, weighted values, back to (B, Tq, H, D).
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (b, tq, h, d) = q.dims4().unwrap();
    let (_, tk, hkv, _) = k.dims4().unwrap();
    let r = h / hkv;
    let heads = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let repeat = |x: &Tensor| {
        // (B, Hkv, Tk, D) -> (B, H, Tk, D) with query head j served by kv head j / r
        let x = heads(x).unsqueeze(2).unwrap();
        x.broadcast_as((b, hkv, r, tk, d)).unwrap().contiguous().unwrap().reshape((b, h, tk, d)).unwrap()
    };
    let (qh, kh, vh) = (heads(q), repeat(k), repeat(v));
    let att = (qh.matmul(&kh.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
    let prefix = tk - tq;
    let mask: Vec<f32> =
        (0..tq).flat_map(|i| (0..tk).map(move |j| if j <= prefix + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (tq, tk), q.device()).unwrap();
    let att = nanochat::model::ops::softmax_last_dim(&att.broadcast_add(&mask).unwrap()).unwrap();
    att.matmul(&vh).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
}

#[test]
fn causal_attention_matches_the_composition() {
    let mut rng = StdRng::seed_from_u64(0);
    // (B, Tq, Tk, H, Hkv, D): single token, odd lengths, more than one query block, GQA ratio 2,
    // a cached prefix (Tk > Tq)
    for (b, tq, tk, h, hkv, d) in
        [(1, 1, 1, 1, 1, 8), (2, 7, 7, 2, 1, 8), (1, 130, 130, 4, 2, 64), (2, 65, 65, 2, 2, 64), (1, 5, 12, 4, 2, 8)]
    {
        let shape = format!("{:?}", (b, tq, tk, h, hkv, d));
        let qr = randn(&mut rng, 1.0, (b, tq, h, d));
        let kr = randn(&mut rng, 1.0, (b, tk, hkv, d));
        let vr = randn(&mut rng, 1.0, (b, tk, hkv, d));
        let w = randn(&mut rng, 1.0, (b, tq, h, d));
        let vars =
            |_: ()| (Var::from_tensor(&qr).unwrap(), Var::from_tensor(&kr).unwrap(), Var::from_tensor(&vr).unwrap());
        let (q1, k1, v1) = vars(());
        let (q2, k2, v2) = vars(());
        let fused = nanochat::model::fused::causal_attention(q1.as_tensor(), k1.as_tensor(), v1.as_tensor()).unwrap();
        let reference = attention_reference(q2.as_tensor(), k2.as_tensor(), v2.as_tensor());
        check(&format!("attention {shape} values"), &fused, &reference, 1e-5);
        let g1 = grads_of(&fused, &w, &[&q1, &k1, &v1]);
        let g2 = grads_of(&reference, &w, &[&q2, &k2, &v2]);
        for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(g1.iter().zip(&g2)) {
            check(&format!("attention {shape} {name}"), a, r, 1e-5);
        }
    }
}

#[test]
fn lm_head_cross_entropy_matches_the_composition() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    for (n, c, v) in [(1, 8, 3), (7, 16, 13), (65, 64, 1000)] {
        let xr = randn(&mut rng, 1.0, (n, c));
        let wr = randn(&mut rng, 2.0, (v, c));
        let targets: Vec<i64> = (0..n as i64).map(|i| if i % 5 == 3 { -1 } else { (i * 7919) % v as i64 }).collect();
        let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
        let w = Tensor::rand(0f32, 1.0, n, &dev).unwrap();
        let (x1, w1) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let (x2, w2) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let pool = LogitsPool::default();
        let fused = nanochat::model::fused::lm_head_cross_entropy(
            x1.as_tensor(),
            w1.as_tensor(),
            &targets,
            15.0,
            Gemm::F32,
            &pool,
        )
        .unwrap();
        let logits = x2.as_tensor().matmul(&w2.as_tensor().t().unwrap()).unwrap();
        let (reference, _) = cross_entropy_per_token(&softcap(&logits, 15.0).unwrap(), &targets).unwrap();
        check(&format!("lm_head CE {:?} losses", (n, c, v)), &fused, &reference, 1e-5);
        let g1 = grads_of(&fused, &w, &[&x1, &w1]);
        let g2 = grads_of(&reference, &w, &[&x2, &w2]);
        check(&format!("lm_head CE {:?} dx", (n, c, v)), &g1[0], &g2[0], 1e-5);
        check(&format!("lm_head CE {:?} dw", (n, c, v)), &g1[1], &g2[1], 1e-5);
    }
    // a forward without backward, then one with: the pooled buffer must not leak between them
    let xr = randn(&mut rng, 1.0, (3, 8));
    let wr = randn(&mut rng, 1.0, (5, 8));
    let t = Tensor::new(&[0i64, 4, 2], &dev).unwrap();
    let pool = LogitsPool::default();
    let a = nanochat::model::fused::lm_head_cross_entropy(&xr, &wr, &t, 15.0, Gemm::F32, &pool).unwrap();
    let b = nanochat::model::fused::lm_head_cross_entropy(&xr, &wr, &t, 15.0, Gemm::F32, &pool).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let bad = Tensor::new(&[0i64, 5, 2], &dev).unwrap();
    assert!(nanochat::model::fused::lm_head_cross_entropy(&xr, &wr, &bad, 15.0, Gemm::F32, &pool).is_err());
}
