//! A bf16 GEMM on AVX-512 BF16 for the products of training (issue 10): `C = alpha · A · B
//! [+ C]` with both operands rounded to bf16 (round to nearest even) while they are packed, and the
//! products accumulated in f32 by `vdpbf16ps`, which does 32 multiply-adds per instruction: twice
//! the f32 FMA rate of the same vector width. Only the operands lose precision; the accumulators,
//! the output and everything around the GEMM (master weights, optimizer, softmax) stay f32.
//!
//! The layout is the usual one of a packed GEMM (BLIS): B is packed once, whole, into panels of
//! `NR` columns; rayon's threads take blocks of rows of C, each packing its rows of A chunk by chunk
//! of `KCP` pairs along k into micro-panels of `MR` rows, so that a micro-panel of B (16 KiB) stays in L1
//! while the kernel sweeps the block's micro-panels of A (in L2). `vdpbf16ps` multiplies pairs of
//! bf16 adjacent along k inside each 32-bit lane, so both operands are packed as pairs along k
//! (one `u32` per pair, the lower k in the low half), an odd k padded with a zero.
//!
//! The kernels only run when the CPU has AVX-512 BF16 (checked at run time); a model whose
//! [`super::Kernels`] ask for bf16 runs its training products (`linear.rs`, `lm_head.rs`, Muon's
//! Newton-Schulz) on them ([`super::Gemm::Bf16`]), which otherwise, and on other CPUs, keep the
//! f32 GEMM.

// Off x86-64 only the support check and the rounding are used: the GEMM reports no support there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::sync::OnceLock;

use candle_core::Result;
use rayon::prelude::*;

use super::Mat;

/// Rows of C per micro-kernel call: 12 rows × 2 vectors = 24 of the 32 zmm registers accumulate,
/// leaving room for the two vectors of B and the broadcast of A.
const MR: usize = 12;
/// Columns of C per micro-kernel call: two 16-lane f32 vectors.
const NR: usize = 32;
/// k-pairs per chunk: a micro-panel of B is then KCP × NR × 4 bytes = 16 KiB, half of L1.
const KCP: usize = 128;
/// The most rows of C one task takes: its chunk of packed A (MC × KCP × 4 = 120 KiB) and, for the
/// narrow backward products, its 240-row tile of C stay in L2 from chunk to chunk.
const MC_MAX: usize = 240;
/// Column panels per epilogue tile: 240 rows × 256 columns × 4 bytes = 240 KiB, in L2 next to
/// the packed A.
const EPILOGUE_PANELS: usize = 8;

/// Whether this CPU runs the bf16 GEMM (AVX-512 F, BW, VL and BF16), detected once.
pub fn bf16_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The bf16 bits of `x` as `vcvtne2ps2bf16` rounds: to nearest even, NaN kept a quiet NaN, and
/// denormals to a signed zero (which `vdpbf16ps` would make of a bf16 denormal anyway).
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        (b >> 16) | 0x40
    } else if x.is_subnormal() {
        (b >> 16) & 0x8000
    } else {
        b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16
    }
}

/// `x` rounded to bf16 as the packing rounds it, widened back to f32: what the products see (for
/// tests and references).
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// `dst (m x n, row stride dst_rs) = alpha · a (m x k) · b (k x n) [+ dst]` with a and b rounded to
/// bf16, on all of rayon's threads. An error on a CPU without AVX-512 BF16 (see
/// [`bf16_supported`]): callers pick the f32 GEMM there. Bounds are checked here, before any
/// raw-pointer access.
#[allow(clippy::too_many_arguments)] // the BLAS shape: sizes, operands, scale, accumulate
pub fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    gemm_bf16_then(m, n, k, dst, dst_rs, a, b, alpha, accumulate, None)
}

/// What to do with each finished tile of C, on the thread that computed it, while the tile is
/// still in its L2: `(i0, rows, j0, cols, c)` where `c` holds rows i0 .. i0 + rows of C (row
/// stride dst_rs, starting at row i0) and the tile is their columns j0 .. j0 + cols. The tiles
/// cover C once, each row's tiles in column order.
pub type Epilogue<'a> = &'a (dyn Fn(usize, usize, usize, usize, &mut [f32]) + Sync);

/// [`gemm_bf16`], then `epilogue` on every tile of C as soon as it is final: a pass over C that
/// would otherwise read it back from memory (the lm_head's logits are 537 MB) runs on data in
/// cache.
#[allow(clippy::too_many_arguments)] // the BLAS shape, and the epilogue
pub fn gemm_bf16_then(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    accumulate: bool,
    epilogue: Option<Epilogue>,
) -> Result<()> {
    if !bf16_supported() {
        candle_core::bail!("gemm_bf16: this CPU lacks AVX-512 BF16");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let end = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    if n > dst_rs && m > 1 {
        candle_core::bail!("gemm_bf16: row stride {dst_rs} shorter than a row of {n}");
    }
    let dst_len = end(m, dst_rs, n, 1);
    if dst_len > dst.len() {
        candle_core::bail!("gemm_bf16: destination too small for {m}x{n}");
    }
    let dst = &mut dst[..dst_len];
    // one row: its stride is never used, and may be anything
    let dst_rs = if m == 1 { n } else { dst_rs };
    if k == 0 {
        if !accumulate {
            dst.par_chunks_mut(dst_rs).for_each(|row| row[..n].fill(0.0));
        }
        if let Some(epilogue) = epilogue {
            dst.par_chunks_mut(dst_rs).enumerate().for_each(|(i, row)| epilogue(i, 1, 0, n, row));
        }
        return Ok(());
    }
    if end(m, a.rs, k, a.cs) > a.data.len() || end(k, b.rs, n, b.cs) > b.data.len() {
        candle_core::bail!("gemm_bf16: operands too small for a {m}x{k} by {k}x{n} product");
    }
    #[cfg(target_arch = "x86_64")]
    {
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        // B, whole: panel j holds columns j·NR.., pair by pair over all of k.
        let mut packed_b = vec![0u32; panels * kp * NR];
        packed_b.par_chunks_mut(kp * NR).enumerate().for_each(|(j, panel)| {
            let j0 = j * NR;
            // B's columns are the packed rows here: row stride b.cs, k stride b.rs.
            let src = Strided { data: b.data, base: j0 * b.cs, sr: b.cs, sk: b.rs };
            // SAFETY: the CPU has the kernels' features (checked above); the panel holds kp · NR
            // values and every element read, (j0 + r, kk) for r < the panel's columns and kk < k,
            // lies inside `b` by the bounds check above.
            unsafe { x86::pack(panel, NR, &src, NR.min(n - j0), k, kp) };
        });
        let threads = rayon::current_num_threads().max(1);
        let tasks = m.div_ceil(MC_MAX).max((threads * 2).min(m.div_ceil(MR)));
        let mc = m.div_ceil(tasks).next_multiple_of(MR);
        let job = Job { n, k, kp, dst_rs, a, packed_b: &packed_b, alpha, accumulate, epilogue };
        dst.par_chunks_mut(mc * dst_rs).enumerate().for_each(|(t, c)| {
            let i0 = t * mc;
            // SAFETY: as above for the features; `c` holds rows i0.. of C, at most mc of them, the
            // last possibly cut after its n-th column, which the kernel never passes.
            unsafe { x86::block(&job, c, i0, mc.min(m - i0)) };
        });
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // bf16_supported() is false off x86-64, so this is not reached
        let _ = (a, b, alpha, accumulate, epilogue);
        candle_core::bail!("gemm_bf16: no AVX-512 BF16 off x86-64")
    }
}

/// A strided source for packing: element (r, kk) at `data[base + r * sr + kk * sk]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    base: usize,
    sr: usize,
    sk: usize,
}

/// What every task of one product shares.
struct Job<'a> {
    n: usize,
    k: usize,
    kp: usize,
    dst_rs: usize,
    a: Mat<'a>,
    packed_b: &'a [u32],
    alpha: f32,
    accumulate: bool,
    epilogue: Option<Epilogue<'a>>,
}

// The AVX-512 intrinsics and target features are stable since Rust 1.89, the workspace's
// rust-version.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{bf16_bits, Job, Strided, EPILOGUE_PANELS, KCP, MR, NR};

    /// The low `n` bits set (n ≤ 16).
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Packs `rows` rows into micro-panels of `width` rows, micro-panel `i` at `dst[i * pairs *
    /// width..]`: `dst[i * pairs * width + p * width + r]` = the bf16 pair (x(i·width + r, 2p),
    /// x(i·width + r, 2p + 1)), zero for rows ≥ `rows` and k indices ≥ kvalid. Rounding is the
    /// hardware's (`vcvtne2ps2bf16`: nearest even, denormals to zero), which `bf16_bits`
    /// reproduces.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/BF16; `dst` must hold rows.div_ceil(width) · pairs · width values, and `src.base + r * src.sr +
    /// kk * src.sk` must lie inside `src.data` for r < rows, kk < kvalid.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack(dst: &mut [u32], width: usize, src: &Strided, rows: usize, kvalid: usize, pairs: usize) {
        debug_assert!(dst.len() >= rows.div_ceil(width) * pairs * width && kvalid <= 2 * pairs);
        // SAFETY: forwarded contract
        unsafe {
            if src.sr == 1 {
                pack_rows_contiguous(dst, width, src, rows, kvalid, pairs);
            } else {
                for (i, panel) in dst.chunks_mut(pairs * width).take(rows.div_ceil(width)).enumerate() {
                    let src = Strided { base: src.base + i * width * src.sr, ..*src };
                    let rows = width.min(rows - i * width);
                    if src.sk == 1 {
                        pack_k_contiguous(panel, width, &src, rows, kvalid, pairs);
                    } else {
                        pack_strided(panel, width, &src, rows, kvalid, pairs);
                    }
                }
            }
        }
    }

    /// [`pack`] where consecutive rows are adjacent in memory (Gᵀ, W and x of the backward): per
    /// pair, the rows of its two k indices are loaded 16 at a time, rounded together, and
    /// interleaved into pairs by one word permutation. The pair loop is the outer one, so that
    /// each k index's rows are read once, whole, for all micro-panels: Gᵀ's k indices are rows of
    /// G 128 KiB apart, which all fall in the same cache set, so a line left for the next
    /// micro-panel would be evicted before it came back.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn pack_rows_contiguous(
        dst: &mut [u32],
        width: usize,
        src: &Strided,
        rows: usize,
        kvalid: usize,
        pairs: usize,
    ) {
        // word 2i of a pair vector takes word i (k even) of the rounded vector, word 2i + 1 word
        // 16 + i (k odd)
        let idx: [u16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as u16);
        // SAFETY: 64 bytes read from a 64-byte array
        let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
        let d = dst.as_mut_ptr();
        let data = src.data.as_ptr();
        let micro = rows.div_ceil(width);
        for p in 0..pairs {
            // The k indices PREFETCH pairs ahead, possibly in the next chunk or past the end of
            // the source (prefetches never fault): far-apart rows give the hardware prefetcher no
            // stream to follow, and each load would otherwise wait for DRAM on its own.
            const PREFETCH: usize = 4;
            for kk in [2 * (p + PREFETCH), 2 * (p + PREFETCH) + 1] {
                let row = data.wrapping_add(src.base + kk * src.sk);
                for line in (0..rows).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line) as *const i8);
                }
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(rows - 1) as *const i8);
            }
            for i in 0..micro {
                for g in (0..width).step_by(16) {
                    let lanes = 16.min(width - g);
                    let valid = rows.saturating_sub(i * width + g).min(lanes);
                    let load = |kk: usize| {
                        if valid == 0 || kk >= kvalid {
                            _mm512_setzero_ps()
                        } else {
                            // SAFETY: rows i · width + g .. + valid at k index kk are inside the
                            // source by the caller's contract; masked-off lanes are not read
                            unsafe {
                                _mm512_maskz_loadu_ps(mask(valid), data.add(src.base + i * width + g + kk * src.sk))
                            }
                        }
                    };
                    let v = _mm512_cvtne2ps_pbh(load(2 * p + 1), load(2 * p));
                    // SAFETY: a transmute between two 512-bit vector types
                    let v = _mm512_permutexvar_epi16(idx, unsafe { std::mem::transmute::<__m512bh, __m512i>(v) });
                    // SAFETY: (i · pairs + p) · width + g + lanes ≤ micro · pairs · width ≤ dst.len()
                    unsafe { _mm512_mask_storeu_epi32(d.add((i * pairs + p) * width + g) as *mut i32, mask(lanes), v) };
                }
            }
        }
    }

    /// [`pack`] where k is contiguous (the rows of G and of W, and of x in the forward): 16 rows ×
    /// 32 k are loaded and rounded row by row into 16 vectors of 16 pairs, then transposed so
    /// that each vector holds one pair of 16 rows.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn pack_k_contiguous(
        dst: &mut [u32],
        width: usize,
        src: &Strided,
        rows: usize,
        kvalid: usize,
        pairs: usize,
    ) {
        let d = dst.as_mut_ptr();
        let data = src.data.as_ptr();
        for g in (0..width).step_by(16) {
            let lanes = 16.min(width - g);
            let valid = rows.saturating_sub(g).min(lanes);
            for pb in (0..pairs).step_by(16) {
                let kb = 2 * pb;
                let kv = kvalid.saturating_sub(kb).min(32);
                let (lo, hi) = (mask(kv.min(16)), mask(kv.saturating_sub(16)));
                let mut t = [_mm512_setzero_si512(); 16];
                for (r, tr) in t.iter_mut().enumerate().take(valid) {
                    let row = src.base + (g + r) * src.sr + kb;
                    // The same k indices of the next micro-panel's rows, which [`pack`] packs
                    // next (or, past the block, are fetched for nothing): rows far apart give
                    // the hardware prefetcher only short streams.
                    let ahead = data.wrapping_add(row + width * src.sr);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16) as *const i8);
                    // SAFETY: row g + r < rows and the k indices the masks let through are below
                    // kvalid, inside the source by the caller's contract; masked-off lanes are not
                    // read (hence the wrapping address for the upper half)
                    let v = unsafe {
                        _mm512_cvtne2ps_pbh(
                            _mm512_maskz_loadu_ps(hi, data.wrapping_add(row + 16)),
                            _mm512_maskz_loadu_ps(lo, data.wrapping_add(row)),
                        )
                    };
                    // SAFETY: a transmute between two 512-bit vector types
                    *tr = unsafe { std::mem::transmute::<__m512bh, __m512i>(v) };
                }
                let t = transpose16(&t);
                for (q, v) in t.iter().enumerate().take(16.min(pairs - pb)) {
                    // SAFETY: (pb + q) · width + g + lanes ≤ pairs · width ≤ dst.len()
                    unsafe { _mm512_mask_storeu_epi32(d.add((pb + q) * width + g) as *mut i32, mask(lanes), *v) };
                }
            }
        }
    }

    /// The transpose of a 16 × 16 matrix of 32-bit words, one row per vector: interleaves of words
    /// and of quad-words within 128-bit lanes, then two rounds of lane shuffles.
    #[target_feature(enable = "avx512f")]
    fn transpose16(t: &[__m512i; 16]) -> [__m512i; 16] {
        // a[2i] lane L: rows 2i, 2i+1 at columns 4L, 4L+1; a[2i+1] the same at 4L+2, 4L+3
        let a: [__m512i; 16] = std::array::from_fn(|i| {
            let (x, y) = (t[i & !1], t[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(x, y)
            } else {
                _mm512_unpackhi_epi32(x, y)
            }
        });
        // b[4i + j] lane L: rows 4i .. 4i+3 at column 4L + j
        let b: [__m512i; 16] = std::array::from_fn(|i| {
            let (q, j) = (i & !3, i & 3);
            let (x, y) = (a[q + (j >> 1)], a[q + 2 + (j >> 1)]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi64(x, y)
            } else {
                _mm512_unpackhi_epi64(x, y)
            }
        });
        // out[4L + j] = lane L of b[j], b[4 + j], b[8 + j], b[12 + j]
        let mut out = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            let lo01 = _mm512_shuffle_i32x4::<0x44>(b[j], b[4 + j]);
            let hi01 = _mm512_shuffle_i32x4::<0xee>(b[j], b[4 + j]);
            let lo23 = _mm512_shuffle_i32x4::<0x44>(b[8 + j], b[12 + j]);
            let hi23 = _mm512_shuffle_i32x4::<0xee>(b[8 + j], b[12 + j]);
            out[j] = _mm512_shuffle_i32x4::<0x88>(lo01, lo23);
            out[4 + j] = _mm512_shuffle_i32x4::<0xdd>(lo01, lo23);
            out[8 + j] = _mm512_shuffle_i32x4::<0x88>(hi01, hi23);
            out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(hi01, hi23);
        }
        out
    }

    /// [`pack`] for any strides (no training operand needs it), element by element.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn pack_strided(dst: &mut [u32], width: usize, src: &Strided, rows: usize, kvalid: usize, pairs: usize) {
        let x = |r: usize, kk: usize| {
            if r < rows && kk < kvalid {
                // SAFETY: in bounds by the caller's contract
                bf16_bits(unsafe { *src.data.get_unchecked(src.base + r * src.sr + kk * src.sk) })
            } else {
                0
            }
        };
        for p in 0..pairs {
            for r in 0..width {
                dst[p * width + r] = x(r, 2 * p) | x(r, 2 * p + 1) << 16;
            }
        }
    }

    /// Rows i0 .. i0 + rows of C, whose values (from row i0 on, row stride job.dst_rs) are `c`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/BF16; A must hold rows i0 .. i0 + rows over all of k, the
    /// packed B all of k and n, and `c` every (row, column < n) of the block.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn block(job: &Job, c: &mut [f32], i0: usize, rows: usize) {
        let (n, k, kp, ldc) = (job.n, job.k, job.kp, job.dst_rs);
        let micro = rows.div_ceil(MR);
        let panels = n.div_ceil(NR);
        let mut packed_a = vec![0u32; micro * KCP * MR];
        let mut p0 = 0;
        while p0 < kp {
            let pairs = KCP.min(kp - p0);
            let k0 = 2 * p0;
            let kvalid = (2 * pairs).min(k - k0);
            let src = Strided { data: job.a.data, base: i0 * job.a.rs + k0 * job.a.cs, sr: job.a.rs, sk: job.a.cs };
            // SAFETY: `packed_a` holds micro · pairs · MR values; rows i0 .. i0 + rows and k
            // indices k0 .. k0 + kvalid ≤ k lie inside A by the caller's contract.
            unsafe { pack(&mut packed_a, MR, &src, rows, kvalid, pairs) };
            let load_c = job.accumulate || p0 > 0;
            for jr in 0..panels {
                let cols = NR.min(n - jr * NR);
                // SAFETY: panel jr of the packed B starts at jr · kp · NR and holds kp pairs.
                let b = unsafe { job.packed_b.as_ptr().add(jr * kp * NR + p0 * NR) };
                for ir in 0..micro {
                    let r0 = ir * MR;
                    // SAFETY: the micro-panels are inside `packed_a` and the packed B; rows r0 ..
                    // r0 + MR.min(rows − r0) and columns jr · NR .. + cols of C are inside `c`.
                    unsafe {
                        kernel(
                            pairs,
                            packed_a.as_ptr().add(ir * pairs * MR),
                            b,
                            c.as_mut_ptr().add(r0 * ldc + jr * NR),
                            ldc,
                            MR.min(rows - r0),
                            cols,
                            job.alpha,
                            load_c,
                        )
                    };
                }
                // the last chunk of k finishes the tile: hand it over while it is in L2
                let last = jr + 1 == panels || (jr + 1) % EPILOGUE_PANELS == 0;
                if let (Some(epilogue), true, true) = (job.epilogue, p0 + pairs == kp, last) {
                    let j0 = (jr - jr % EPILOGUE_PANELS) * NR;
                    epilogue(i0, rows, j0, jr * NR + cols - j0, c);
                }
            }
            p0 += pairs;
        }
    }

    /// The micro-kernel: C (rows ≤ MR, cols ≤ NR; row stride ldc) = alpha · Σ_p a_p b_p [+ C],
    /// with `a` MR pairs and `b` NR pairs per k-pair p.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/BF16; `a` must hold pairs · MR values, `b` pairs · NR,
    /// and C every (row < rows, column < cols) from `c`.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        load_c: bool,
    ) {
        // 512 bits either way: __m512bh is 32 bf16 in a zmm register
        macro_rules! bh {
            ($v:expr) => {
                std::mem::transmute::<__m512i, __m512bh>($v)
            };
        }
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..pairs {
            // SAFETY: b holds NR = 32 values for this pair, a MR values
            let (b0, b1) = unsafe {
                (bh!(_mm512_loadu_si512(b as *const __m512i)), bh!(_mm512_loadu_si512(b.add(16) as *const __m512i)))
            };
            for r in 0..MR {
                // SAFETY: r < MR; a transmute between two 512-bit vector types
                let av = unsafe { bh!(_mm512_set1_epi32(*a.add(r) as i32)) };
                acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], av, b0);
                acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], av, b1);
            }
            // SAFETY: stays within (or one past) the micro-panels
            unsafe {
                a = a.add(MR);
                b = b.add(NR);
            }
        }
        let (m0, m1) = (mask(cols.min(16)), mask(cols.saturating_sub(16).min(16)));
        let va = _mm512_set1_ps(alpha);
        for r in 0..MR {
            if r < rows {
                // SAFETY: row r < rows of C; the masks keep to its cols columns (masked-off lanes
                // are neither read nor written)
                unsafe {
                    let row = c.add(r * ldc);
                    let (mut v0, mut v1) = (_mm512_mul_ps(acc[2 * r], va), _mm512_mul_ps(acc[2 * r + 1], va));
                    if load_c {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.wrapping_add(16)));
                    }
                    _mm512_mask_storeu_ps(row, m0, v0);
                    _mm512_mask_storeu_ps(row.wrapping_add(16), m1, v1);
                }
            }
        }
    }
}
