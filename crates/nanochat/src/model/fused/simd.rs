//! Vectorisable row primitives for the fused kernels: exp, tanh-softcap, max and the softmax and
//! cross-entropy gradient rows.
//!
//! libm's `expf` and `tanhf` are scalar calls; the lm_head cross-entropy alone needs 134 M of
//! each per step at the benchmark shape, and they showed up as 10% of the step in the profile.
//! Here exp is Cephes' polynomial (max relative error ~2 ulp over the range used) written
//! branch-free so that LLVM vectorises it, and every primitive is compiled twice: for the
//! baseline target and with AVX2 + FMA (with fused multiply-adds in the polynomials), picked at
//! run time (the release build targets generic x86-64, whose SSE2 has a quarter of AVX2's width).

/// `a · b + c`: one instruction with one rounding where the caller is compiled with FMA, two
/// operations otherwise (without FMA, `mul_add` is a libm call, far slower than the two). The
/// polynomials below are chains of these, so the fused form also halves their latency.
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x), branch-free: x = n ln 2 + r with |r| ≤ ln 2 / 2, e^r by a degree-7 polynomial, 2^n
/// through the exponent bits. Inputs are clamped to [-87.3, 88], so very negative inputs give
/// ~1e-38 instead of 0 (harmless next to the sums they enter) and nothing overflows.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer without SSE4.1's roundps, and leaves that
    // integer n in the low bits of the sum: its bits are those of 1.5 * 2^23 (0x4b40_0000) plus n.
    // Reading n from there, rather than by `n as i32` (a saturating conversion LLVM does one lane
    // at a time), keeps the whole function in vector registers.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4b40_0000;
    let x = x.clamp(-87.3, 88.0);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = mul_add::<FMA>(p, r, 1.398_199_9e-3);
    p = mul_add::<FMA>(p, r, 8.333_452e-3);
    p = mul_add::<FMA>(p, r, 4.166_579_6e-2);
    p = mul_add::<FMA>(p, r, 1.666_666_5e-1);
    p = mul_add::<FMA>(p, r, 0.5); // Cephes 5.0000001e-1, which is 0.5 in f32
    let e = mul_add::<FMA>(p, r * r, r) + 1.0;
    // 2^n: the biased exponent n + 127 (in 1..=254 after the clamp) in the exponent field
    e * f32::from_bits(rounded.to_bits().wrapping_sub(ROUND_BITS - 127) << 23)
}

/// `cap * tanh(x / cap)` as `cap * (1 − 2 / (exp(2x / cap) + 1))`: absolute error ~1e-7 · cap.
#[inline(always)]
fn softcap<const FMA: bool>(x: f32, cap: f32) -> f32 {
    cap * (1.0 - 2.0 / (exp::<FMA>(2.0 * x / cap) + 1.0))
}

/// [`softcap`] of one value, for the odd scalar next to the vector passes.
pub(crate) fn softcap_one(x: f32, cap: f32) -> f32 {
    softcap::<false>(x, cap)
}

const LANES: usize = 16;

macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic<const FMA: bool>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                generic::<true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has just been checked to support the features `avx2` is built with.
                return unsafe { avx2($($arg),*) };
            }
            generic::<false>($($arg),*)
        }
    };
}

dispatch! {
    /// The largest value (-inf for an empty slice).
    fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
            }
        }
        let m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        chunks.remainder().iter().fold(m, |m, &x| if x > m { x } else { m })
    }
}

dispatch! {
    /// `x = exp(x − shift)` in place; returns the sum of the new values.
    fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp::<FMA>(c[l] - shift);
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp::<FMA>(*x - shift);
            sum += *x;
        }
        sum
    }
}

dispatch! {
    /// `x = cap * tanh(x / cap)` in place; returns the largest new value.
    fn softcap_max(xs: &mut [f32], cap: f32) -> f32 {
        xs.iter_mut().for_each(|x| *x = softcap::<FMA>(*x, cap));
        max(xs)
    }
}

dispatch! {
    /// One pass of the softcapped cross-entropy over a row of logits x, for a unit upstream
    /// gradient: with t = tanh(x / cap), z = cap t and e = exp(z − cap), the row becomes
    /// e (1 − t²) and the sum S of e is returned. z ≤ cap bounds e by 1 and keeps it above
    /// e^−2cap, so no max pass is needed; then lse = ln S + cap, and the gradient with respect to
    /// x is the row divided by S (the target's −(1 − t_target²) is the caller's). With
    /// u = exp(2x / cap) and v = 1 / (u + 1): t = 1 − 2v, 1 − t² = 4v(1 − v), e = exp(−2 cap v).
    fn softcap_ce_row(xs: &mut [f32], cap: f32) -> f32 {
        let (two_over_cap, minus_two_cap) = (2.0 / cap, -2.0 * cap);
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        let term = |x: f32| {
            let v = 1.0 / (exp::<FMA>(x * two_over_cap) + 1.0);
            let e = exp::<FMA>(minus_two_cap * v);
            (e, e * 4.0 * v * (1.0 - v))
        };
        for c in &mut chunks {
            for l in 0..LANES {
                let (e, w) = term(c[l]);
                c[l] = w;
                acc[l] += e;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            let (e, w) = term(*x);
            *x = w;
            sum += e;
        }
        sum
    }
}

dispatch! {
    /// The attention backward row: `p = exp(s − lse)` over the scores in `p`, and
    /// `ds = p (dp − delta)` over dP in `ds`.
    fn softmax_grad(p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32) -> () {
        p.iter_mut().zip(ds.iter_mut()).for_each(|(p, ds)| {
            *p = exp::<FMA>(*p - lse);
            *ds = *p * (*ds - delta);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let b = x.exp();
            for a in [exp::<false>(x), exp::<true>(x)] {
                assert!((a - b).abs() <= 4.0 * f32::EPSILON * b, "exp({x}) = {a}, libm {b}");
            }
        }
        assert!(exp::<false>(f32::NEG_INFINITY) < 1e-37 && exp::<true>(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn primitives_match_scalar_code() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 / 7.0 - 6.0).collect();
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut e = xs.clone();
        let s = exp_sum(&mut e, 1.5);
        let want: f32 = xs.iter().map(|x| (x - 1.5).exp()).sum();
        assert!((s - want).abs() < 1e-5 * want);
        let mut c = xs.clone();
        let m = softcap_max(&mut c, 5.0);
        for (a, x) in c.iter().zip(&xs) {
            assert!((a - 5.0 * (x / 5.0).tanh()).abs() < 2e-6 * 5.0);
        }
        assert_eq!(m, max(&c));
        let mut w = xs.clone();
        let sum = softcap_ce_row(&mut w, 5.0);
        let z: Vec<f64> = xs.iter().map(|&x| 5.0 * (f64::from(x) / 5.0).tanh()).collect();
        let want: f64 = z.iter().map(|z| (z - 5.0).exp()).sum();
        assert!((f64::from(sum) - want).abs() < 1e-5 * want, "{sum} vs {want}");
        for (w, z) in w.iter().zip(&z) {
            let want = (z - 5.0).exp() * (1.0 - (z / 5.0).powi(2));
            assert!((f64::from(*w) - want).abs() < 1e-5 * want.abs() + 1e-7, "{w} vs {want}");
        }
    }
}
