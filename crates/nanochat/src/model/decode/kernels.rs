//! The CPU kernels of the native inference path ([`super::DecodeModel`]): `x · Wᵀ` for a few rows
//! (decode) or many (prefill), attention of one query over a cached sequence, RMSNorm, rotary and
//! softcap, all on plain `f32` activations. Weight matrices come in three formats ([`Elem`]): f32,
//! bf16 (stored as its 16 bits) and int8 with a scale per output row.
//!
//! Decoding is memory-bound: each step reads every weight once. So the few-row kernel walks the
//! weight matrix once, row by row, and multiplies each weight row (streamed from memory) with every
//! activation row (which stay in L1), split over output rows with rayon; narrower weights mean
//! fewer bytes streamed, widened to f32 in registers. AVX2 + FMA versions are chosen at run time
//! (the build targets baseline x86-64); other CPUs get portable loops.

use std::ops::Range;

use rayon::prelude::*;

/// From this many activation rows on, [`linear`] hands the product to the `gemm` crate, whose
/// packed, cache-blocked kernels win once every weight is reused many times (prefill).
const GEMM_MIN_ROWS: usize = 16;
/// Below this many multiply-adds a kernel runs on the calling thread: rayon's fork-join costs a few
/// microseconds, as much as a small matrix-vector product.
const PAR_MIN_MACS: usize = 1 << 17;
/// The few-row kernel's version of [`PAR_MIN_MACS`], in bytes of weights streamed per row of
/// activations (128 KiB): narrow weights are cheaper to stream, so a bf16 or int8 matrix has to be
/// larger before splitting it pays. With the pass inside rayon's pool (`DecodeModel::forward`) a
/// split costs little, and 128 KiB beat 512 KiB (int8 batch-1 decode ~1,700 -> ~2,200 tokens/s)
/// and 32 KiB (no better, noisier).
const PAR_MIN_WEIGHT_BYTES: usize = 1 << 17;
/// Keys scored at once by [`attend`]: the scores of one block live on the stack.
const KEY_BLOCK: usize = 64;
/// Weights widened to f32 at once before a prefill GEMM over bf16 or int8 weights (8 MiB): blocks of
/// thousands of rows, so that the GEMM's packing of the activations and its fork-join are paid a few
/// times per matrix, not hundreds (512 KiB blocks made bf16 and int8 prefill twice as slow as f32's
/// at the d20 size), and the scratch never grows to a whole d20 `lm_head` (320 MiB in f32).
const DEQUANT_BLOCK: usize = 1 << 21;

/// A pointer to an output buffer that parallel tasks write at disjoint indices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every user hands each task a disjoint set of indices of a buffer that outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight element: f32, bf16 as its raw `u16` bits (the high half of an f32, so widening is a
/// shift), or int8 (whose row scale the caller applies after the dot product). One generic kernel
/// serves all three, so their loop structure cannot drift apart.
pub trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight elements from `p` widened to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable and the CPU must have AVX2 (callers are `avx2,fma` functions,
    /// into which this is inlined).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<__m128i>()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
}

impl Elem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast::<__m128i>())))
    }
}

/// `out (n × m) = x (n × k) · wᵀ` where `w (m × k)` is row-major like torch's `Linear.weight`;
/// with `accumulate` the product is added to `out` (the residual stream) instead.
pub fn linear(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32], accumulate: bool) {
    debug_assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    if n == 0 || m == 0 {
        return;
    }
    if n >= GEMM_MIN_ROWS {
        gemm_block(x, n, k, w, m, out, 0, m, accumulate);
    } else {
        linear_rows(x, n, k, w, None, m, out, accumulate);
    }
}

/// [`linear`] with bf16 weights (`u16` bits). Many rows (prefill) widen the weights block by block
/// into `scratch` for the f32 GEMM; the widening costs one pass over the weights, negligible next
/// to a GEMM that reuses each of them n ≥ 16 times.
#[allow(clippy::too_many_arguments)]
pub fn linear_bf16(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[u16],
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    linear_narrow(x, n, k, w, None, m, out, accumulate, scratch);
}

/// [`linear`] with int8 weights `q` and one scale per output row: `w[j] = scale[j] · q[j]`. The
/// few-row kernel sums `q · x` and scales each dot product once at the end.
#[allow(clippy::too_many_arguments)]
pub fn linear_int8(
    x: &[f32],
    n: usize,
    k: usize,
    q: &[i8],
    scale: &[f32],
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    debug_assert!(scale.len() >= m);
    linear_narrow(x, n, k, q, Some(scale), m, out, accumulate, scratch);
}

#[allow(clippy::too_many_arguments)]
fn linear_narrow<E: Elem>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[E],
    scale: Option<&[f32]>,
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    debug_assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    if n == 0 || m == 0 {
        return;
    }
    if n < GEMM_MIN_ROWS {
        linear_rows(x, n, k, w, scale, m, out, accumulate);
        return;
    }
    let block = (DEQUANT_BLOCK / k.max(1)).max(16).min(m);
    if scratch.len() < block * k {
        scratch.resize(block * k, 0.0);
    }
    let mut j0 = 0;
    while j0 < m {
        let rows = block.min(m - j0);
        let dst = &mut scratch[..rows * k];
        let widen = |(r, row): (usize, &mut [f32])| {
            let src = &w[(j0 + r) * k..(j0 + r + 1) * k];
            let s = scale.map_or(1.0, |s| s[j0 + r]);
            row.iter_mut().zip(src).for_each(|(d, &e)| *d = e.to_f32() * s);
        };
        if rows * k >= PAR_MIN_MACS {
            dst.par_chunks_mut(k).enumerate().for_each(widen);
        } else {
            dst.chunks_mut(k).enumerate().for_each(widen);
        }
        gemm_block(x, n, k, dst, rows, out, j0, m, accumulate);
        j0 += rows;
    }
}

/// `out[i][col0 + j] (+)= x[i] · w[j]` for the `rows` weight rows of `w` (rows × k), through the
/// `gemm` crate; `out` is n rows of stride `ld`.
#[allow(clippy::too_many_arguments)]
fn gemm_block(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    col0: usize,
    ld: usize,
    accumulate: bool,
) {
    assert!(x.len() >= n * k && w.len() >= rows * k && col0 + rows <= ld && out.len() >= n * ld);
    let parallelism = if n * rows * k >= PAR_MIN_MACS { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the strides describe x (n × k) and the output block (n × rows, row stride ld, from
    // column col0) row-major and wᵀ (k × rows) as the column-major view of w (rows × k); the
    // assert above keeps every access in bounds.
    unsafe {
        gemm::gemm(
            n,
            rows,
            k,
            out.as_mut_ptr().add(col0),
            1,
            ld as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The few-row kernel: every weight row read once for all `n` activation rows, each dot product
/// times the row's `scale` (int8) when there is one.
#[allow(clippy::too_many_arguments)]
fn linear_rows<E: Elem>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[E],
    scale: Option<&[f32]>,
    m: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m && scale.is_none_or(|s| s.len() >= m));
    let avx = has_avx2_fma();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let work = move |rows: Range<usize>| {
        let out_ptr = out_ptr;
        let write = |i: usize, j: usize, d: f32| {
            // SAFETY: (i, j) is in bounds, and only the task owning output column j writes it.
            unsafe {
                let o = out_ptr.0.add(i * m + j);
                *o = if accumulate { *o + d } else { d };
            }
        };
        // two weight rows at a time against up to four activation rows: eight independent
        // accumulators keep both FMA units busy, and each weight is loaded once per group
        let mut j = rows.start;
        while j < rows.end {
            let pair = j + 1 < rows.end;
            let w0 = &w[j * k..(j + 1) * k];
            let w1 = if pair { &w[(j + 1) * k..(j + 2) * k] } else { w0 };
            // f32 weights have no scale: multiplying by 1.0 leaves their results bit-identical
            let (s0, s1) = scale.map_or((1.0, 1.0), |s| (s[j], if pair { s[j + 1] } else { 1.0 }));
            let mut i = 0;
            while i < n {
                let g = (n - i).min(4);
                let dots = if g == 1 {
                    let xi = &x[i * k..(i + 1) * k];
                    [[dot_w(w0, xi, avx), 0.0, 0.0, 0.0], [if pair { dot_w(w1, xi, avx) } else { 0.0 }, 0.0, 0.0, 0.0]]
                } else {
                    // a short group repeats its last row; the surplus results are dropped
                    let xs: [&[f32]; 4] = std::array::from_fn(|r| {
                        let row = i + r.min(g - 1);
                        &x[row * k..(row + 1) * k]
                    });
                    dot2x4(w0, w1, xs, avx)
                };
                for (r, (&d0, &d1)) in dots[0].iter().zip(&dots[1]).enumerate().take(g) {
                    write(i + r, j, d0 * s0);
                    if pair {
                        write(i + r, j + 1, d1 * s1);
                    }
                }
                i += g;
            }
            j += 2;
        }
    };
    if n * m * k * std::mem::size_of::<E>() < PAR_MIN_WEIGHT_BYTES {
        work(0..m);
    } else {
        // a few blocks per thread so that a slower core does not hold up the step
        let block = m.div_ceil(4 * rayon::current_num_threads()).max(8);
        (0..m.div_ceil(block)).into_par_iter().for_each(|b| work(b * block..((b + 1) * block).min(m)));
    }
}

/// Dot product of two equal-length slices.
pub fn dot(a: &[f32], b: &[f32], avx: bool) -> f32 {
    dot_w(a, b, avx)
}

/// Dot product of a weight row (any format, unscaled) with an activation row of the same length.
fn dot_w<E: Elem>(w: &[E], x: &[f32], avx: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: the caller checked that the CPU has AVX2 and FMA.
        return unsafe { avx2::dot(w, x) };
    }
    let _ = avx;
    let mut acc = [0.0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let tail: f32 = cw.remainder().iter().zip(cx.remainder()).map(|(&a, b)| a.to_f32() * b).sum();
    for (a, b) in cw.zip(cx) {
        for l in 0..8 {
            acc[l] += a[l].to_f32() * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot products of two weight rows with four activation rows, reading the weights once.
fn dot2x4<E: Elem>(w0: &[E], w1: &[E], xs: [&[f32]; 4], avx: bool) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: the caller checked that the CPU has AVX2 and FMA.
        return unsafe { avx2::dot2x4(w0, w1, xs) };
    }
    [std::array::from_fn(|r| dot_w(w0, xs[r], avx)), std::array::from_fn(|r| dot_w(w1, xs[r], avx))]
}

/// `y += a * x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32], avx: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: the caller checked that the CPU has AVX2 and FMA.
        return unsafe { avx2::axpy(y, a, x) };
    }
    let _ = avx;
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Elem;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Four independent accumulators hide the FMA latency.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<E: Elem>(w: &[E], x: &[f32]) -> f32 {
        let k = w.len().min(x.len());
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= k {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(E::load8(pw.add(i + 8 * u)), _mm256_loadu_ps(px.add(i + 8 * u)), *a);
            }
            i += 32;
        }
        while i + 8 <= k {
            acc[0] = _mm256_fmadd_ps(E::load8(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < k {
            s += w[i].to_f32() * x[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot2x4<E: Elem>(w0: &[E], w1: &[E], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = w0.len();
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let px = xs.map(|x| x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut b = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= k {
            // each weight vector is widened once and used for all four activation rows
            let (v0, v1) = (E::load8(p0.add(i)), E::load8(p1.add(i)));
            for r in 0..4 {
                let xv = _mm256_loadu_ps(px[r].add(i));
                a[r] = _mm256_fmadd_ps(v0, xv, a[r]);
                b[r] = _mm256_fmadd_ps(v1, xv, b[r]);
            }
            i += 8;
        }
        let mut out = [a.map(|v| hsum(v)), b.map(|v| hsum(v))];
        while i < k {
            let (u0, u1) = (w0[i].to_f32(), w1[i].to_f32());
            for r in 0..4 {
                out[0][r] += u0 * xs[r][i];
                out[1][r] += u1 * xs[r][i];
            }
            i += 1;
        }
        out
    }

    /// A plain loop: compiled with AVX2 enabled, it vectorises 8 wide.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
    }
}

/// Parameter-free RMSNorm of one row, `x / sqrt(mean(x²) + eps)` with eps = `f32::EPSILON`,
/// written to `out` (which may be `x` itself through [`rms_norm_in_place`]).
pub fn rms_norm(x: &[f32], out: &mut [f32]) {
    let inv = inv_rms(x);
    out.iter_mut().zip(x).for_each(|(o, v)| *o = v * inv);
}

pub fn rms_norm_in_place(x: &mut [f32]) {
    let inv = inv_rms(x);
    x.iter_mut().for_each(|v| *v *= inv);
}

fn inv_rms(x: &[f32]) -> f32 {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean + f32::EPSILON).sqrt()
}

/// Rotates the two halves of one head `x` by the position whose table rows are `cos`, `sin`.
pub fn rotary(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] + b * sin[i];
        x2[i] = b * cos[i] - a * sin[i];
    }
}

/// `cap * tanh(x / cap)` over every element, in parallel for large buffers, with the fused
/// kernels' vectorised softcap (libm's `tanhf` costs ~20 ns, a sizeable part of a decode step over
/// a 32k vocabulary).
pub fn softcap(x: &mut [f32], cap: f32) {
    let f = |c: &mut [f32]| {
        crate::model::fused::softcap_in_place(c, cap);
    };
    if x.len() < 1 << 14 {
        f(x);
    } else {
        x.par_chunks_mut(4096).for_each(f);
    }
}

/// Softmax attention of one query head `q` over the first `len` keys and values of a cached
/// sequence (`keys`, `values`: positions × head_dim, contiguous), written to `out` (head_dim).
/// Scores are taken a block at a time with a running maximum (as flash attention does), so no
/// buffer grows with the sequence.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], len: usize, scale: f32, out: &mut [f32], avx: bool) {
    let hd = q.len();
    out.fill(0.0);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut scores = [0.0f32; KEY_BLOCK];
    let mut start = 0;
    while start < len {
        let b = (len - start).min(KEY_BLOCK);
        let mut block_max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate().take(b) {
            let p = start + j;
            *s = dot(q, &keys[p * hd..(p + 1) * hd], avx) * scale;
            block_max = block_max.max(*s);
        }
        let new_max = max.max(block_max);
        if new_max > max && sum > 0.0 {
            let correction = (max - new_max).exp();
            sum *= correction;
            out.iter_mut().for_each(|o| *o *= correction);
        }
        max = new_max;
        for (j, &s) in scores.iter().enumerate().take(b) {
            let p = (s - max).exp();
            sum += p;
            let pos = start + j;
            axpy(out, p, &values[pos * hd..(pos + 1) * hd], avx);
        }
        start += b;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Whether the CPU runs the AVX2 kernels: looked up once per layer call and passed down.
pub fn simd() -> bool {
    has_avx2_fma()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable loops (what CPUs without AVX2 run) and the AVX2 kernels agree for every weight
    /// format, on lengths that leave every remainder (the integration tests only reach the path
    /// this CPU picks).
    #[test]
    fn portable_and_avx2_dots_agree() {
        fn check<E: Elem>(w: &[E], xs: [&[f32]; 4]) {
            let w1: Vec<E> = w.iter().rev().copied().collect();
            let tol = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()));
            let (p, v) = (dot_w(w, xs[0], false), dot_w(w, xs[0], simd()));
            assert!(tol(p, v), "dot: {p} vs {v}");
            let (p, v) = (dot2x4(w, &w1, xs, false), dot2x4(w, &w1, xs, simd()));
            for (a, b) in p.iter().flatten().zip(v.iter().flatten()) {
                assert!(tol(*a, *b), "dot2x4: {a} vs {b}");
            }
        }
        for k in [1, 7, 8, 31, 32, 45, 77] {
            let val = |i: usize, s: usize| ((i * 37 + s * 11) % 23) as f32 / 7.0 - 1.5;
            let xs: Vec<Vec<f32>> = (0..4).map(|r| (0..k).map(|i| val(i, r)).collect()).collect();
            let xs: [&[f32]; 4] = std::array::from_fn(|r| xs[r].as_slice());
            let w: Vec<f32> = (0..k).map(|i| val(i, 9)).collect();
            check(&w, xs);
            check(&w.iter().map(|v| (v.to_bits() >> 16) as u16).collect::<Vec<_>>(), xs);
            check(&(0..k).map(|i| ((i * 53) % 255) as i32 as i8).collect::<Vec<_>>(), xs);
            // the widening itself: bf16 is the high half of the f32 bits, int8 its value
            assert_eq!(0x3F81u16.to_f32(), f32::from_bits(0x3F81_0000));
            assert_eq!((-128i8).to_f32(), -128.0);
        }
    }

    #[test]
    fn softcap_matches_libm() {
        let mut v: Vec<f32> = (0..20_000).map(|i| (i as f32 - 10_000.0) * 0.01).collect();
        let want: Vec<f32> = v.iter().map(|x| 15.0 * (x / 15.0).tanh()).collect();
        softcap(&mut v, 15.0);
        assert!(v.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        let mut edges = [0.0, 1e30, -1e30, f32::NAN];
        softcap(&mut edges, 15.0);
        assert_eq!(&edges[..3], &[0.0, 15.0, -15.0]);
        assert!(edges[3].is_nan());
    }
}
