//! The AVX-512 BF16 GEMM against an f64 reference computed from the bf16-rounded operands (odd
//! shapes, every operand layout, alpha, accumulation), the lm_head and linear kernels with their
//! bf16 GEMMs against their f32 paths, and Muon's Newton–Schulz with bf16 GEMMs against v0's f32
//! and bf16 iterations. Every test returns early, saying so, on a CPU without AVX-512 BF16 (and
//! fails there instead when NANOCHAT_REQUIRE_BF16 is set).

mod common;

use candle_core::{Device, Tensor, Var};
use nanochat::model::fused::{self, gemm_bf16, round_bf16, Gemm, LogitsPool, Mat};
use nanochat::model::Kernels;

/// Whether `test` cannot run here: the CPU lacks AVX-512 BF16 (it says so). With
/// NANOCHAT_REQUIRE_BF16 set (CI sets it on a CPU that has the feature) that is a failure instead.
fn skip(test: &str) -> bool {
    let skip = !fused::bf16_supported();
    if skip {
        assert!(
            std::env::var_os("NANOCHAT_REQUIRE_BF16").is_none(),
            "NANOCHAT_REQUIRE_BF16 is set but {test} finds no AVX-512 BF16"
        );
        common::skipped(test, "this CPU lacks AVX-512 BF16");
    }
    skip
}

/// Deterministic values in [-1, 1) (a 64-bit LCG), with a sprinkle of larger magnitudes.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let x = ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0;
            if i % 97 == 5 {
                x * 300.0
            } else {
                x
            }
        })
        .collect()
}

/// A (rows × cols) matrix stored row-major, or column-major when `transposed`.
fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Mat<'_> {
    if transposed {
        Mat { data, rs: 1, cs: rows }
    } else {
        Mat { data, rs: cols, cs: 1 }
    }
}

/// `gemm_bf16` on (av, bv) into a destination with rows 3 longer than n, against the f64
/// reference of the rounded operands: the worst error relative to the sum of magnitudes must stay
/// at f32 accumulation's level.
fn check(what: &str, (m, n, k): (usize, usize, usize), av: Mat, bv: Mat, alpha: f32, accumulate: bool) {
    let dst_rs = n + 3;
    let before = values(m * dst_rs, (m * n * k) as u64);
    let mut dst = before.clone();
    gemm_bf16(m, n, k, &mut dst, dst_rs, av, bv, alpha, accumulate).unwrap();
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut abs) = (0f64, 0f64);
            for kk in 0..k {
                let p = f64::from(round_bf16(av.data[i * av.rs + kk * av.cs]))
                    * f64::from(round_bf16(bv.data[kk * bv.rs + j * bv.cs]));
                sum += p;
                abs += p.abs();
            }
            let old = if accumulate { f64::from(before[i * dst_rs + j]) } else { 0.0 };
            let reference = f64::from(alpha) * sum + old;
            // f32 accumulation of k products: error ~ (a few ulps) × the sum of magnitudes
            let scale = f64::from(alpha.abs()) * abs + old.abs() + 1e-30;
            worst = worst.max((f64::from(dst[i * dst_rs + j]) - reference).abs() / scale);
        }
        // the gap between rows is not part of C and stays as it was
        for j in n..dst_rs {
            assert_eq!(dst[i * dst_rs + j], before[i * dst_rs + j], "{what}: wrote past row {i}");
        }
    }
    println!("{what}: worst relative error {worst:.2e}");
    assert!(worst < 1e-5, "{what}: error {worst:.2e}");
}

#[test]
fn bf16_gemm_matches_an_f64_reference_of_the_rounded_operands() {
    if skip("bf16_gemm_matches_an_f64_reference_of_the_rounded_operands") {
        return;
    }
    // Odd k (a zero-padded last pair), m and n off the 12-row and 32-column tiles and the 240-row
    // blocks, k over a 256 chunk; every layout of each operand (which picks the packing path).
    let shapes = [(1, 1, 1), (1, 40, 7), (13, 33, 3), (12, 32, 2), (37, 65, 257), (300, 289, 301), (25, 31, 600)];
    for (si, &(m, n, k)) in shapes.iter().enumerate() {
        for (ta, tb, accumulate) in
            [(false, false, false), (false, true, true), (true, false, true), (true, true, false)]
        {
            let seed = 10 * si as u64;
            let (a, b) = (values(m * k, seed + 1), values(k * n, seed + 2));
            let what = format!("{m}x{n}x{k} (a^T {ta}, b^T {tb}, accumulate {accumulate})");
            check(&what, (m, n, k), view(&a, m, k, ta), view(&b, k, n, tb), -0.75, accumulate);
        }
    }
    // neither stride 1 (every third element): the generic packing
    let (m, n, k) = (29, 35, 19);
    let (a, b) = (values(3 * m * k, 7), values(3 * k * n, 8));
    let (av, bv) = (Mat { data: &a, rs: 3 * k, cs: 3 }, Mat { data: &b, rs: 3, cs: 3 * k });
    check("29x35x19 strided", (m, n, k), av, bv, 2.0, true);
}

#[test]
fn bf16_gemm_rounds_its_operands_to_bf16() {
    if skip("bf16_gemm_rounds_its_operands_to_bf16") {
        return;
    }
    // A bf16 keeps 7 bits of mantissa: 1 + 2^-8 and 1 + 3·2^-8 are ties, to even: 1 and 1 + 2^-6;
    // 1 + 3·2^-9 rounds up to 1 + 2^-7. The sums of the rounded operands are exact in f32.
    let (a, b) = ([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-9)], [1.0f32; 3]);
    let mut dst = [0f32; 1];
    gemm_bf16(1, 1, 3, &mut dst, 1, view(&a, 1, 3, false), view(&b, 3, 1, false), 1.0, false).unwrap();
    assert_eq!([round_bf16(a[0]), round_bf16(a[1]), round_bf16(a[2])], [1.0, 1.0 + 2f32.powi(-6), 1.0 + 2f32.powi(-7)]);
    assert_eq!(dst[0], 3.0 + 2f32.powi(-6) + 2f32.powi(-7));
    // the same values as B, packed by the other path (rows, here columns, adjacent)
    gemm_bf16(1, 1, 3, &mut dst, 1, view(&b, 1, 3, false), view(&a, 3, 1, false), 1.0, false).unwrap();
    assert_eq!(dst[0], 3.0 + 2f32.powi(-6) + 2f32.powi(-7));
    // k = 0: C = 0, or C unchanged when accumulating
    let mut dst = [5f32; 6];
    gemm_bf16(2, 3, 0, &mut dst, 3, view(&[], 2, 0, false), view(&[], 0, 3, false), 1.0, true).unwrap();
    assert_eq!(dst, [5.0; 6]);
    gemm_bf16(2, 3, 0, &mut dst, 3, view(&[], 2, 0, false), view(&[], 0, 3, false), 1.0, false).unwrap();
    assert_eq!(dst, [0.0; 6]);
}

#[test]
fn bf16_gemm_rejects_operands_too_small() {
    if skip("bf16_gemm_rejects_operands_too_small") {
        return;
    }
    let (a, b) = (values(6, 1), values(6, 2));
    let mut dst = vec![0f32; 4];
    assert!(gemm_bf16(2, 2, 3, &mut dst, 2, view(&a, 2, 3, false), view(&b, 3, 2, false), 1.0, false).is_ok());
    assert!(gemm_bf16(2, 2, 4, &mut dst, 2, view(&a, 2, 4, false), view(&b, 4, 2, false), 1.0, false).is_err());
    assert!(gemm_bf16(3, 2, 3, &mut dst, 2, view(&a, 3, 3, false), view(&b, 3, 2, false), 1.0, false).is_err());
    assert!(gemm_bf16(2, 2, 3, &mut dst, 1, view(&a, 2, 3, false), view(&b, 3, 2, false), 1.0, false).is_err());
}

/// `f` with the default kernels, then with bf16 ones: its results under each. The kernels are
/// values, so tests running at the same time never see each other's.
fn f32_then_bf16<T>(f: impl Fn(Kernels) -> T) -> (T, T) {
    let bf16 = Kernels { bf16: true, ..Kernels::default() };
    assert_eq!((Kernels::default().gemm(), bf16.gemm()), (Gemm::F32, Gemm::Bf16));
    (f(Kernels::default()), f(bf16))
}

/// Each bf16 result within `tol` (relative to the largest f32 magnitude) of its f32 result, and
/// not identical to it (else the bf16 GEMM did not run).
fn close_but_rounded(pairs: [(&str, &Tensor, &Tensor); 3], tol: f32) {
    for (what, bf, f) in pairs {
        let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let (diff, scale) = (max(&(bf - f).unwrap()), max(f));
        println!("{what}: max |bf16 - f32| {diff:.2e}, max |f32| {scale:.2e}");
        assert!(diff <= tol * scale, "{what}: bf16 differs from f32 by {diff} (scale {scale})");
        assert!(diff > 0.0, "{what}: identical, so the bf16 GEMM did not run");
    }
}

#[test]
fn linear_with_bf16_gemms_matches_the_f32_path() {
    if skip("linear_with_bf16_gemms_matches_the_f32_path") {
        return;
    }
    let dev = Device::Cpu;
    let (n, c, out) = (301, 96, 157);
    let xr = Tensor::randn(0f32, 1.0, (n, c), &dev).unwrap();
    let wr = Tensor::randn(0f32, 0.1, (out, c), &dev).unwrap();
    let up = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
    let ((y32, dx32, dw32), (y16, dx16, dw16)) = f32_then_bf16(|kernels| {
        let (x, w) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let y = fused::linear(x.as_tensor(), w.as_tensor(), kernels.gemm()).unwrap();
        let grads = y.mul(&up).unwrap().sum_all().unwrap().backward().unwrap();
        (y.clone(), grads.get(x.as_tensor()).unwrap().clone(), grads.get(w.as_tensor()).unwrap().clone())
    });
    close_but_rounded([("y", &y16, &y32), ("dx", &dx16, &dx32), ("dw", &dw16, &dw32)], 1e-2);
}

#[test]
fn lm_head_with_bf16_gemms_matches_the_f32_path() {
    if skip("lm_head_with_bf16_gemms_matches_the_f32_path") {
        return;
    }
    let dev = Device::Cpu;
    let (n, c, v) = (77, 96, 1237);
    let xr = Tensor::randn(0f32, 1.0, (n, c), &dev).unwrap();
    let wr = (Tensor::randn(0f32, 1.0, (v, c), &dev).unwrap() * 0.2).unwrap();
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -1 } else { (i * 7919) % v as i64 }).collect();
    let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
    // random weights on the per-token losses: a non-uniform upstream gradient
    let weights = Tensor::rand(0f32, 1.0, n, &dev).unwrap();
    let ((l32, dx32, dw32), (l16, dx16, dw16)) = f32_then_bf16(|kernels| {
        let (x, w) = (Var::from_tensor(&xr).unwrap(), Var::from_tensor(&wr).unwrap());
        let (gemm, pool) = (kernels.gemm(), LogitsPool::default());
        let losses = fused::lm_head_cross_entropy(x.as_tensor(), w.as_tensor(), &targets, 15.0, gemm, &pool).unwrap();
        let grads = losses.mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
        (losses, grads.get(x.as_tensor()).unwrap().clone(), grads.get(w.as_tensor()).unwrap().clone())
    });
    close_but_rounded([("losses", &l16, &l32), ("dx", &dx16, &dx32), ("dw", &dw16, &dw32)], 1e-2);
}

#[test]
fn muon_with_bf16_gemms_stays_within_v0s_bf16_gap() {
    if skip("muon_with_bf16_gemms_stays_within_v0s_bf16_gap") {
        return;
    }
    let f = candle_core::safetensors::load(common::parity("optim/muon.safetensors"), &Device::Cpu).unwrap();
    let get =
        |k: &str| f.get(k).unwrap_or_else(|| panic!("fixture has no {k}")).to_dtype(candle_core::DType::F32).unwrap();
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    for k in [1, 2] {
        let gn = get(&format!("gn{k}"));
        let (fp32, bf16) = (get(&format!("fp32.update{k}")), get(&format!("bf16.update{k}")));
        let (ours32, ours16) =
            f32_then_bf16(|kernels| nanochat::optim::muon::zeropower_via_newtonschulz5(&gn, 5, kernels).unwrap());
        let v0_gap = max(&(&bf16 - &fp32).unwrap());
        let (to_fp32, to_bf16) = (max(&(&ours16 - &fp32).unwrap()), max(&(&ours16 - &bf16).unwrap()));
        println!("update{k}: v0 bf16 vs fp32 {v0_gap:.2e}; ours with bf16 GEMMs vs v0 fp32 {to_fp32:.2e}, vs v0 bf16 {to_bf16:.2e}; scale {:.2e}", max(&fp32));
        assert!(max(&(&ours32 - &fp32).unwrap()) <= 2e-6, "the f32 path moved");
        assert!(to_fp32 > 0.0, "identical to f32: the bf16 GEMM did not run");
        // rounding only the products' operands stays closer to f32 than v0's all-bf16 iteration
        assert!(to_fp32 <= v0_gap, "update{k}: {to_fp32} from f32, more than v0's bf16 ({v0_gap})");
        assert!(to_bf16 <= 2.0 * v0_gap, "update{k}: {to_bf16} from v0's bf16 update");
    }
}

#[test]
fn the_epilogue_sees_every_tile_once_finished_and_in_column_order() {
    if skip("the_epilogue_sees_every_tile_once_finished_and_in_column_order") {
        return;
    }
    // 2 row blocks of the threads, a partial micro-panel, and columns past one epilogue tile with
    // a partial last panel; k over one chunk of pairs, so tiles finish in a later chunk.
    let (m, n, k) = (250, 600, 301);
    let (a, b) = (values(m * k, 11), values(k * n, 12));
    let mut want = vec![0f32; m * n];
    gemm_bf16(m, n, k, &mut want, n, view(&a, m, k, false), view(&b, k, n, false), 1.0, false).unwrap();
    let seen = std::sync::Mutex::new(vec![Vec::new(); m]);
    let record = |i0: usize, rows: usize, j0: usize, cols: usize, tile: &mut [f32]| {
        let mut seen = seen.lock().unwrap();
        for r in 0..rows {
            let row = &mut tile[r * n + j0..r * n + j0 + cols];
            assert_eq!(row, &want[(i0 + r) * n + j0..(i0 + r) * n + j0 + cols], "tile not final");
            row.iter_mut().for_each(|x| *x = -*x); // what the epilogue writes stays
            seen[i0 + r].push((j0, cols));
        }
    };
    let mut got = vec![0f32; m * n];
    fused::gemm_bf16_then(
        m,
        n,
        k,
        &mut got,
        n,
        view(&a, m, k, false),
        view(&b, k, n, false),
        1.0,
        false,
        Some(&record),
    )
    .unwrap();
    assert!(got.iter().zip(&want).all(|(g, w)| *g == -*w));
    for (i, tiles) in seen.into_inner().unwrap().into_iter().enumerate() {
        let mut next = 0;
        for (j0, cols) in tiles {
            assert_eq!(j0, next, "row {i}: tiles out of order or overlapping");
            next = j0 + cols;
        }
        assert_eq!(next, n, "row {i}: tiles do not cover the row");
    }
}
