//! A pure-Rust inference path for the CPU: the GPT's forward pass (same math as `gpt.rs`) on
//! plain `f32` buffers, with a key/value cache of independent rows ("slots").
//!
//! Why: decoding one token is ~25 small matrix-vector products plus attention; through candle each
//! op allocates tensors and runs single-threaded element-wise kernels, so overhead, not arithmetic,
//! sets the speed. Here the weights are copied once into plain vectors (q, k and v fused into one
//! matrix), every buffer is preallocated, and each step reads every weight once for all rows
//! ([`kernels::linear`]); prompts go through the `gemm` crate in chunks. At batch 1 a step is
//! bound by memory bandwidth: it streams every weight once (46 MB at depth 4 with a 32k
//! vocabulary, three quarters of it `lm_head`), which `nanochat bench decode` compares with a triad.
//!
//! Each slot of a [`DecodeCache`] has its own position, so rows of different lengths decode in one
//! [`DecodeModel::step`]: the engine prefills a prompt into slot 0 and copies it into the others,
//! and a server can fill and free slots independently (continuous batching).
//!
//! Since the step is bound by the bytes it streams, the matrices can also be kept in bf16 (half
//! the bytes) or int8 with a scale per output row (a quarter), see [`WeightFormat`]; activations,
//! the embedding table, the KV cache and all arithmetic stay f32. `nanochat bench decode
//! --quality` (`bench/quality.rs`) measures what the rounding costs in loss.
//!
//! The weights are taken from the GPT by [`Param`], the parameter table's names for them.

mod kernels;

use std::fmt;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::gpt::{GPTConfig, GPT};
use super::params::{BlockParam, Param};

/// Logits are squashed into (-SOFTCAP, SOFTCAP), as in `gpt.rs`.
const SOFTCAP: f32 = 15.0;
/// Longest chunk of a prompt pushed through the layers at once: bounds the activation buffers
/// (the MLP's is chunk × 4 × n_embd) for long prompts.
const PREFILL_CHUNK: usize = 512;

/// How a [`DecodeModel`] stores its matrices, i.e. how many bytes a batch-1 step streams per weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// The trained weights as they are (4 bytes each).
    #[default]
    #[value(name = "f32")]
    F32,
    /// Rounded to bfloat16, to nearest even like torch's `.to(torch.bfloat16)` (2 bytes).
    #[value(name = "bf16")]
    Bf16,
    /// Symmetric int8 with one f32 scale per output row, `scale = max|w_row| / 127` (1 byte).
    #[value(name = "int8")]
    Int8,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 3] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8];

    /// The name the `--weights` flags take.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bfloat16 bits of `x`, rounded to nearest, ties to even, as torch's `round_to_nearest_even`
/// does (NaN becomes the quiet NaN 0x7FC0; values past the largest bf16 round to infinity).
pub fn bf16_from_f32(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let bits = x.to_bits();
    // adding 0x7FFF rounds the dropped half down below the midpoint and up above it; the lowest
    // kept bit breaks ties towards even. No overflow: the largest non-NaN bits are -inf's, 0xFF800000.
    let bias = 0x7FFF + ((bits >> 16) & 1);
    ((bits + bias) >> 16) as u16
}

/// The f32 value of the bfloat16 bits `b` (exact: bf16 is the high half of an f32).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Symmetric int8 quantisation of one row: `(scale, q)` with `scale = max|w| / 127` and
/// `q = round(w / scale)` (half away from zero); an all-zero row gets scale 0 and q = 0.
fn quantize_row(row: &[f32], q: &mut [i8]) -> f32 {
    let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        q.fill(0);
        return if max.is_finite() { 0.0 } else { f32::NAN };
    }
    let scale = max / 127.0;
    for (q, &v) in q.iter_mut().zip(row) {
        // |v / scale| <= 127 up to rounding; the clamp makes that exact before the cast
        *q = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// The storage of one weight matrix in a [`WeightFormat`].
enum MatrixData {
    F32(Vec<f32>),
    /// bf16 bits.
    Bf16(Vec<u16>),
    /// Row `j` is `scale[j] · q[j]`.
    Int8 {
        q: Vec<i8>,
        scale: Vec<f32>,
    },
}

/// A weight matrix, rows × cols row-major (out × in, like torch's `Linear.weight`), stored in one
/// of the [`WeightFormat`]s; [`Matrix::linear`] computes `x · Wᵀ` in any of them.
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: MatrixData,
}

impl Matrix {
    /// `w` (rows × cols, row-major) converted to `format`.
    pub fn new(w: Vec<f32>, rows: usize, cols: usize, format: WeightFormat) -> Result<Self> {
        ensure!(w.len() == rows * cols, "a {rows} x {cols} matrix from {} values", w.len());
        let data = match format {
            WeightFormat::F32 => MatrixData::F32(w),
            WeightFormat::Bf16 => MatrixData::Bf16(w.par_iter().map(|&v| bf16_from_f32(v)).collect()),
            WeightFormat::Int8 => {
                let mut q = vec![0i8; w.len()];
                let mut scale = vec![0.0f32; rows];
                if cols > 0 {
                    q.par_chunks_mut(cols)
                        .zip(w.par_chunks(cols))
                        .zip(scale.par_iter_mut())
                        .for_each(|((q, row), s)| *s = quantize_row(row, q));
                }
                MatrixData::Int8 { q, scale }
            }
        };
        Ok(Self { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            MatrixData::F32(_) => WeightFormat::F32,
            MatrixData::Bf16(_) => WeightFormat::Bf16,
            MatrixData::Int8 { .. } => WeightFormat::Int8,
        }
    }

    /// Bytes of storage, all of which one product with it reads.
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::F32(w) => 4 * w.len(),
            MatrixData::Bf16(w) => 2 * w.len(),
            MatrixData::Int8 { q, scale } => q.len() + 4 * scale.len(),
        }
    }

    /// The weights the kernels multiply with, widened back to f32 (rows × cols).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            MatrixData::F32(w) => w.clone(),
            MatrixData::Bf16(w) => w.iter().map(|&b| bf16_to_f32(b)).collect(),
            MatrixData::Int8 { q, scale } => {
                q.iter().enumerate().map(|(i, &q)| f32::from(q) * scale[i / self.cols.max(1)]).collect()
            }
        }
    }

    /// `out (n × rows) = x (n × cols) · Wᵀ`, or `out += ...` with `accumulate`. `scratch` holds the
    /// weights widened to f32 for the GEMM of long prefills in bf16 and int8 (reused, so keep it
    /// across calls). An error if the slices are too short.
    pub fn linear(&self, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, scratch: &mut Vec<f32>) -> Result<()> {
        ensure!(x.len() >= n * self.cols, "{} inputs for {n} rows of {}", x.len(), self.cols);
        ensure!(out.len() >= n * self.rows, "{} outputs for {n} rows of {}", out.len(), self.rows);
        self.apply(x, n, out, accumulate, scratch);
        Ok(())
    }

    /// [`Matrix::linear`] for callers that sized the buffers themselves (the forward pass).
    fn apply(&self, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, scratch: &mut Vec<f32>) {
        let (k, m) = (self.cols, self.rows);
        match &self.data {
            MatrixData::F32(w) => kernels::linear(x, n, k, w, m, out, accumulate),
            MatrixData::Bf16(w) => kernels::linear_bf16(x, n, k, w, m, out, accumulate, scratch),
            MatrixData::Int8 { q, scale } => kernels::linear_int8(x, n, k, q, scale, m, out, accumulate, scratch),
        }
    }
}

/// One block's weights, row-major (out × in) like torch's `Linear.weight`.
struct Layer {
    /// c_q, c_k and c_v stacked: (n_embd + 2 · kv_dim) × n_embd, one pass over x for all three.
    qkv: Matrix,
    attn_proj: Matrix,
    fc: Matrix,
    mlp_proj: Matrix,
}

/// The GPT's weights and rotary tables, ready for [`DecodeModel::prefill`] and [`DecodeModel::step`].
pub struct DecodeModel {
    config: GPTConfig,
    format: WeightFormat,
    /// The embedding stays f32 in every format: a token reads one row of it, not the whole table.
    wte: Vec<f32>,
    layers: Vec<Layer>,
    lm_head: Matrix,
    /// bf16-rounded cos and sin, (positions × head_dim/2), shared with `GPT::rotary`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    rotary_len: usize,
}

/// Key/value cache for `slots` independent sequences of at most `capacity` positions each, plus
/// the scratch buffers of the forward pass (so steps allocate nothing once they have warmed up).
pub struct DecodeCache {
    slots: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per layer, keys and values as (slot, kv_head, position, head_dim).
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per slot, the number of cached positions: the position of its next token.
    pos: Vec<usize>,
    scratch: Scratch,
}

/// Activations of the tokens of one forward call; only ever grown.
#[derive(Default)]
struct Scratch {
    slot: Vec<usize>,
    pos: Vec<usize>,
    token: Vec<u32>,
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
    /// bf16 / int8 weights widened to f32, a block at a time, for the prefill GEMM.
    dequant: Vec<f32>,
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl DecodeModel {
    /// Copies the weights and rotary tables of `gpt` (from any device) into host memory, as f32.
    pub fn from_gpt(gpt: &GPT) -> Result<Self> {
        Self::from_gpt_with(gpt, WeightFormat::F32)
    }

    /// [`from_gpt`](Self::from_gpt) with the matrices stored in `format` (the embedding table and
    /// everything else stay f32).
    pub fn from_gpt_with(gpt: &GPT, format: WeightFormat) -> Result<Self> {
        let config = gpt.config().clone();
        // A parameter's values on the host, checked against the table's shape.
        let weight = |param: Param| -> Result<Vec<f32>> {
            let spec = config.spec(param);
            let tensor = gpt.weight(param).with_context(|| format!("the GPT has no {}", spec.name))?;
            ensure!(tensor.dims() == spec.shape, "{} is {:?}, expected {:?}", spec.name, tensor.dims(), spec.shape);
            host_vec(tensor).with_context(|| format!("copying {}", spec.name))
        };
        let c = config.n_embd;
        let kvd = config.n_kv_head * config.head_dim();
        let matrix = |param: Param, rows: usize, cols: usize| Matrix::new(weight(param)?, rows, cols, format);
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let block = |p: BlockParam| Param::Block(l, p);
            let (q, k, v) =
                (weight(block(BlockParam::Q))?, weight(block(BlockParam::K))?, weight(block(BlockParam::V))?);
            let qkv = Matrix::new([q, k, v].concat(), c + 2 * kvd, c, format)?;
            layers.push(Layer {
                qkv,
                attn_proj: matrix(block(BlockParam::AttnProj), c, c)?,
                fc: matrix(block(BlockParam::Fc), 4 * c, c)?,
                mlp_proj: matrix(block(BlockParam::MlpProj), c, 4 * c)?,
            });
        }
        let wte = weight(Param::Wte)?;
        let lm_head = matrix(Param::LmHead, config.vocab_size, c)?;
        let (cos, sin) = gpt.rotary();
        let rotary_len = cos.dim(0)?;
        let (cos, sin) = (host_vec(cos)?, host_vec(sin)?);
        ensure!(cos.len() == rotary_len * config.head_dim() / 2, "unexpected rotary table size");
        Ok(Self { config, format, wte, layers, lm_head, cos, sin, rotary_len })
    }

    pub fn config(&self) -> &GPTConfig {
        &self.config
    }

    /// How the matrices are stored.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Longest sequence the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.rotary_len
    }

    /// Bytes of weights one decode step reads (every matrix once in its format, int8 scales
    /// included, plus one f32 embedding row per token).
    pub fn weight_bytes_per_step(&self) -> usize {
        let blocks: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.attn_proj.bytes() + l.fc.bytes() + l.mlp_proj.bytes()).sum();
        blocks + self.lm_head.bytes() + 4 * self.config.n_embd
    }

    /// An empty cache of `slots` rows, each holding up to `capacity` positions.
    pub fn new_cache(&self, slots: usize, capacity: usize) -> Result<DecodeCache> {
        ensure!(slots > 0, "a decode cache needs at least one slot");
        ensure!(
            capacity <= self.rotary_len,
            "cache capacity {capacity} exceeds the model's {} positions (10 * sequence_len)",
            self.rotary_len
        );
        let c = &self.config;
        let per_layer = slots * c.n_kv_head * capacity * c.head_dim();
        Ok(DecodeCache {
            slots,
            capacity,
            kv_heads: c.n_kv_head,
            head_dim: c.head_dim(),
            k: (0..c.n_layer).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..c.n_layer).map(|_| vec![0.0; per_layer]).collect(),
            pos: vec![0; slots],
            scratch: Scratch::default(),
        })
    }

    /// Appends `tokens` to the sequence in `slot` and returns the logits (vocab_size) after its
    /// last token. Nothing changes if the tokens do not fit.
    pub fn prefill<'c>(&self, cache: &'c mut DecodeCache, slot: usize, tokens: &[u32]) -> Result<&'c [f32]> {
        ensure!(!tokens.is_empty(), "prefill needs at least one token");
        self.append(cache, slot, tokens, tokens.len() - 1, |_| {})?;
        Ok(&cache.scratch.logits[..self.config.vocab_size])
    }

    /// Appends `tokens` to `slot` like [`prefill`](Self::prefill) and returns the logits after each
    /// of `tokens[from..]`, (len - from) × vocab_size: what scoring a continuation needs, without
    /// paying the vocabulary projection for its context.
    pub fn prefill_logits(
        &self,
        cache: &mut DecodeCache,
        slot: usize,
        tokens: &[u32],
        from: usize,
    ) -> Result<Vec<f32>> {
        ensure!(from <= tokens.len(), "logits from token {from} of {}", tokens.len());
        let mut out = Vec::with_capacity((tokens.len() - from) * self.config.vocab_size);
        self.append(cache, slot, tokens, from, |logits| out.extend_from_slice(logits))?;
        Ok(out)
    }

    /// Pushes `tokens` through the model in chunks into `slot`, handing the logits after each of
    /// `tokens[logits_from..]` to `sink` chunk by chunk.
    fn append(
        &self,
        cache: &mut DecodeCache,
        slot: usize,
        tokens: &[u32],
        logits_from: usize,
        mut sink: impl FnMut(&[f32]),
    ) -> Result<()> {
        ensure!(slot < cache.slots, "slot {slot} out of range: the cache has {} slots", cache.slots);
        self.check_tokens(tokens)?;
        let start = cache.pos[slot];
        cache.check_room(slot, tokens.len())?;
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let offset = i * PREFILL_CHUNK;
            let s = &mut cache.scratch;
            s.slot.clear();
            s.slot.resize(chunk.len(), slot);
            s.pos.clear();
            s.pos.extend((0..chunk.len()).map(|t| start + offset + t));
            s.token.clear();
            s.token.extend_from_slice(chunk);
            let first = logits_from.saturating_sub(offset).min(chunk.len());
            self.forward(cache, first);
            sink(&cache.scratch.logits[..(chunk.len() - first) * self.config.vocab_size]);
        }
        cache.pos[slot] += tokens.len();
        Ok(())
    }

    /// Decodes one token for each of `rows` (slot, token), all slots distinct, and returns their
    /// logits, rows.len() × vocab_size in the order of `rows`. Nothing changes on an error.
    pub fn step<'c>(&self, cache: &'c mut DecodeCache, rows: &[(usize, u32)]) -> Result<&'c [f32]> {
        ensure!(!rows.is_empty(), "a decode step needs at least one row");
        for (i, &(slot, _)) in rows.iter().enumerate() {
            ensure!(slot < cache.slots, "slot {slot} out of range: the cache has {} slots", cache.slots);
            ensure!(rows[..i].iter().all(|&(other, _)| other != slot), "slot {slot} appears twice in one decode step");
            cache.check_room(slot, 1)?;
        }
        let s = &mut cache.scratch;
        s.slot.clear();
        s.pos.clear();
        s.token.clear();
        for &(slot, token) in rows {
            s.slot.push(slot);
            s.pos.push(cache.pos[slot]);
            s.token.push(token);
        }
        self.check_tokens(&cache.scratch.token)?;
        self.forward(cache, 0);
        for &(slot, _) in rows {
            cache.pos[slot] += 1;
        }
        Ok(&cache.scratch.logits[..rows.len() * self.config.vocab_size])
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token {bad} is outside the model's vocabulary of {vocab}");
        }
        Ok(())
    }

    /// Runs the tokens staged in the scratch (slot, position, token) through the model, writes
    /// their keys and values into the cache and the logits of the tokens from `logits_from` on
    /// into `scratch.logits`. The caller has validated slots, positions and tokens.
    fn forward(&self, cache: &mut DecodeCache, logits_from: usize) {
        // The pass runs on one of rayon's workers, not on the calling thread: its parallel
        // products are then forks inside the pool, which the other worker takes while it is still
        // awake, instead of jobs injected from outside, each of which puts the caller to sleep and
        // wakes a worker (~25 per decode step). int8 batch-1 decode went from ~1,450 to ~2,100
        // tokens/s on 2 cores with this, f32 from ~720 to ~900.
        rayon::scope(|_| self.forward_in_pool(cache, logits_from))
    }

    fn forward_in_pool(&self, cache: &mut DecodeCache, logits_from: usize) {
        let cfg = &self.config;
        let (c, hd, nh, nkv) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
        let (kvd, vocab, cap) = (nkv * hd, cfg.vocab_size, cache.capacity);
        let qkv_w = c + 2 * kvd;
        let n = cache.scratch.token.len();
        let s = &mut cache.scratch;
        for buf in [&mut s.x, &mut s.xn, &mut s.y] {
            grow(buf, n * c);
        }
        grow(&mut s.qkv, n * qkv_w);
        grow(&mut s.hidden, n * 4 * c);
        let avx = kernels::simd();

        // x = norm(wte(idx))
        for (i, &t) in s.token.iter().enumerate() {
            let t = t as usize;
            kernels::rms_norm(&self.wte[t * c..(t + 1) * c], &mut s.x[i * c..(i + 1) * c]);
        }
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            // attention: q, k, v of every token, rotary + QK-norm, into the cache
            for i in 0..n {
                kernels::rms_norm(&s.x[i * c..(i + 1) * c], &mut s.xn[i * c..(i + 1) * c]);
            }
            layer.qkv.apply(&s.xn, n, &mut s.qkv, false, &mut s.dequant);
            for i in 0..n {
                let (slot, p) = (s.slot[i], s.pos[i]);
                let (cos, sin) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
                let row = &mut s.qkv[i * qkv_w..(i + 1) * qkv_w];
                for head in row[..c + kvd].chunks_exact_mut(hd) {
                    kernels::rotary(head, cos, sin);
                    kernels::rms_norm_in_place(head);
                }
                for h in 0..nkv {
                    let at = ((slot * nkv + h) * cap + p) * hd;
                    cache.k[l][at..at + hd].copy_from_slice(&row[c + h * hd..c + (h + 1) * hd]);
                    cache.v[l][at..at + hd].copy_from_slice(&row[c + kvd + h * hd..c + kvd + (h + 1) * hd]);
                }
            }
            // every (token, head) attends over its slot's cached positions up to its own
            let (keys, values) = (&cache.k[l], &cache.v[l]);
            let (qkv, slots, pos) = (&s.qkv, &s.slot, &s.pos);
            let attend = |(idx, out): (usize, &mut [f32])| {
                let (i, h) = (idx / nh, idx % nh);
                let kvh = h / (nh / nkv); // GQA: adjacent query heads share a kv head
                let base = (slots[i] * nkv + kvh) * cap * hd;
                let len = pos[i] + 1;
                let q = &qkv[i * qkv_w + h * hd..i * qkv_w + (h + 1) * hd];
                let (k, v) = (&keys[base..base + len * hd], &values[base..base + len * hd]);
                kernels::attend(q, k, v, len, scale, out, avx);
            };
            let work: usize = pos.iter().map(|p| (p + 1) * nh * hd).sum();
            if work < 1 << 15 {
                s.y[..n * c].chunks_exact_mut(hd).enumerate().for_each(attend);
            } else {
                s.y[..n * c].par_chunks_exact_mut(hd).enumerate().for_each(attend);
            }
            layer.attn_proj.apply(&s.y, n, &mut s.x, true, &mut s.dequant);

            // MLP: x += c_proj(relu(c_fc(norm(x)))²)
            for i in 0..n {
                kernels::rms_norm(&s.x[i * c..(i + 1) * c], &mut s.xn[i * c..(i + 1) * c]);
            }
            layer.fc.apply(&s.xn, n, &mut s.hidden, false, &mut s.dequant);
            s.hidden[..n * 4 * c].iter_mut().for_each(|h| *h = h.max(0.0) * h.max(0.0));
            layer.mlp_proj.apply(&s.hidden, n, &mut s.x, true, &mut s.dequant);
        }

        // logits = softcap(lm_head(norm(x))) for the rows that need them
        let first = logits_from.min(n);
        let rows = n - first;
        if rows == 0 {
            return;
        }
        for i in first..n {
            kernels::rms_norm(&s.x[i * c..(i + 1) * c], &mut s.xn[i * c..(i + 1) * c]);
        }
        grow(&mut s.logits, rows * vocab);
        self.lm_head.apply(&s.xn[first * c..n * c], rows, &mut s.logits, false, &mut s.dequant);
        kernels::softcap(&mut s.logits[..rows * vocab], SOFTCAP);
    }
}

impl DecodeCache {
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Cached positions of `slot` (0 for a slot out of range).
    pub fn pos(&self, slot: usize) -> usize {
        self.pos.get(slot).copied().unwrap_or(0)
    }

    /// Empties `slot` for a new sequence (its old keys are simply overwritten later).
    pub fn reset_slot(&mut self, slot: usize) -> Result<()> {
        ensure!(slot < self.slots, "slot {slot} out of range: the cache has {} slots", self.slots);
        self.pos[slot] = 0;
        Ok(())
    }

    /// Makes `dst` a copy of the sequence in `src`: N samples share one prompt prefill.
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        let slots = self.slots;
        ensure!(src < slots && dst < slots, "slots {src} -> {dst} out of range: the cache has {slots} slots");
        if src == dst {
            return Ok(());
        }
        let len = self.pos[src];
        let (cap, hd) = (self.capacity, self.head_dim);
        let per_slot = self.kv_heads * cap * hd;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            for h in 0..self.kv_heads {
                let (from, to) = (src * per_slot + h * cap * hd, dst * per_slot + h * cap * hd);
                buf.copy_within(from..from + len * hd, to);
            }
        }
        self.pos[dst] = len;
        Ok(())
    }

    /// Whether `slot` has room for `t` more positions; the error says how to avoid it.
    fn check_room(&self, slot: usize, t: usize) -> Result<()> {
        let (pos, capacity) = (self.pos[slot], self.capacity);
        if pos + t > capacity {
            bail!(
                "kv cache full: slot {slot} has {pos} cached + {t} new positions, over its capacity of \
                 {capacity}; ask for fewer tokens or size the cache for prompt + max tokens"
            );
        }
        Ok(())
    }
}
