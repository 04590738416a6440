//! Fused kernels against the unfused candle composition they replace: values and gradients on
//! random shapes, odd sizes and ignored targets included.

use candle_core::{DType, Device, Tensor, Var};
use nanochat::model::fused::softcap_cross_entropy;
use nanochat::model::ops::{cross_entropy_per_token, softcap};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn softcap_cross_entropy_matches_the_composition() {
    let dev = Device::Cpu;
    for (n, v, seed) in [(1, 2, 0u64), (7, 13, 1), (33, 1000, 2), (64, 4099, 3)] {
        let raw = (Tensor::randn(0f32, 8.0, (n, v), &dev).unwrap() + seed as f64).unwrap();
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
