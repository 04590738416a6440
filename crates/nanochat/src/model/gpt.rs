//! The GPT of nanochat v0, to be read top to bottom like the original `gpt.py`.
//!
//! Design choices, all as in the original:
//! - rotary position embeddings (base 10,000, halves rotated, not interleaved), no learned positions;
//!   the cos/sin tables hold bf16-rounded values, because v0 stores them in bf16 (a model imported
//!   from transformers records fp32 tables instead, see [`RotaryTables`])
//! - QK-norm: RMSNorm of queries and keys after RoPE
//! - untied token embedding and lm_head, no biases anywhere
//! - RMSNorm without learnable parameters, eps = f32::EPSILON
//! - ReLU² MLP of width 4 * n_embd
//! - group-query attention (n_kv_head divides n_head)
//! - logits softcapped at 15 with tanh
//!
//! The parameters are those of the table in `params.rs`, by [`Param`]; the model holds the
//! [`Kernels`] it runs (fused CPU kernels or the plain composition, f32 or bf16 training GEMMs).

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::fused::{self, Gemm, Kernels, LogitsPool};
use super::kv_cache::KvCache;
use super::ops::{cross_entropy_per_token, rms_norm, softcap, softmax_last_dim};
use super::params::{BlockParam, Init, OptimGroup, Param, ParamSpec};

/// Base of the rotary frequencies.
const ROPE_BASE: f32 = 10_000.0;
/// Logits are squashed into (-SOFTCAP, SOFTCAP).
const SOFTCAP: f64 = 15.0;
/// The rotary tables cover 10x the training context, as in the original, so that generation can
/// run past `sequence_len` without recomputing them.
const ROTARY_LEN_FACTOR: usize = 10;

/// Upper bounds of a config's fields, far above any model here or in the original (its largest
/// is 32 layers, width 2,048, 65,536 tokens, context 2,048): a corrupt config is refused before
/// anything is sized from it, and sizes derived from a valid one cannot overflow.
const MAX_LAYERS: usize = 1024;
const MAX_EMBD: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 24;
const MAX_SEQUENCE_LEN: usize = 1 << 20;

/// The precision of the rotary cos/sin tables, a property of how a model was trained: its weights
/// expect the tables it saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotaryTables {
    /// Rounded to bf16, as v0 keeps them (every model trained here or by the original).
    #[default]
    Bf16,
    /// Full fp32, as transformers' `NanoChatForCausalLM` computes them (models imported from it).
    F32,
}

/// Model shape. Everything derives from `depth` in practice (see [`GPTConfig::from_depth`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GPTConfig {
    pub sequence_len: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// Recorded in every checkpoint; metas written before it existed are v0's bf16.
    #[serde(default)]
    pub rotary: RotaryTables,
}

impl GPTConfig {
    /// nanochat's single dial: width 64 per layer, heads of dimension ~128, no GQA.
    pub fn from_depth(depth: usize, vocab_size: usize, sequence_len: usize) -> Self {
        let n_embd = depth * 64;
        let n_head = n_embd.div_ceil(128).max(1);
        Self {
            sequence_len,
            vocab_size,
            n_layer: depth,
            n_head,
            n_kv_head: n_head,
            n_embd,
            rotary: RotaryTables::default(),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Rejects shapes the forward pass cannot run or no machine could hold, with the reason.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.n_layer == 0 || c.n_head == 0 || c.n_kv_head == 0 || c.vocab_size == 0 || c.sequence_len == 0 {
            candle_core::bail!("GPTConfig needs n_layer, n_head, n_kv_head, vocab_size, sequence_len > 0: {c:?}");
        }
        for (field, value, max) in [
            ("n_layer", c.n_layer, MAX_LAYERS),
            ("n_embd", c.n_embd, MAX_EMBD),
            ("vocab_size", c.vocab_size, MAX_VOCAB),
            ("sequence_len", c.sequence_len, MAX_SEQUENCE_LEN),
        ] {
            if value > max {
                candle_core::bail!("{field} {value} is above {max}, more than any model has: {c:?}");
            }
        }
        if !c.n_embd.is_multiple_of(c.n_head) || !c.head_dim().is_multiple_of(2) {
            candle_core::bail!("n_embd must split into n_head heads of even dimension: {c:?}");
        }
        if !c.n_head.is_multiple_of(c.n_kv_head) {
            candle_core::bail!("n_kv_head must divide n_head: {c:?}");
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(ParamSpec::numel).sum()
    }

    /// Bytes a model of this (valid) config holds in memory: its f32 weights and rotary tables.
    pub fn memory_bytes(&self) -> u64 {
        let rotary = 2 * self.sequence_len * ROTARY_LEN_FACTOR * (self.head_dim() / 2);
        4 * (self.num_params() + rotary) as u64
    }

    /// Training FLOPs per token: 6 per non-embedding weight (forward + backward matmuls; the
    /// embedding is a lookup) plus the attention score/value matmuls over the full context.
    pub fn estimate_flops(&self) -> u64 {
        let non_embedding = (self.num_params() - self.vocab_size * self.n_embd) as u64;
        let (l, h, q, t) = (self.n_layer, self.n_head, self.head_dim(), self.sequence_len);
        6 * non_embedding + 12 * (l * h * q * t) as u64
    }
}

impl GPTConfig {
    /// The parameter table: every parameter of this shape of model, in the original's
    /// `named_parameters()` order (the order of initialisation draws and of the fixtures).
    pub fn params(&self) -> Vec<ParamSpec> {
        let blocks = (0..self.n_layer).flat_map(|i| BlockParam::ALL.map(|p| Param::Block(i, p)));
        std::iter::once(Param::Wte).chain(blocks).chain([Param::LmHead]).map(|p| self.spec(p)).collect()
    }

    /// The table's row of `param`: its shape, initialisation and optimizer group. The one place
    /// that says what each parameter is.
    pub fn spec(&self, param: Param) -> ParamSpec {
        let (c, v, kv) = (self.n_embd, self.vocab_size, self.n_kv_head * self.head_dim());
        let (shape, init, group) = match param {
            Param::Wte => (vec![v, c], Init::Normal { std: 1.0 }, OptimGroup::Embedding),
            Param::LmHead => (vec![v, c], Init::Zeros, OptimGroup::Unembedding),
            Param::Block(_, p) => {
                let (out, inp) = match p {
                    BlockParam::Q | BlockParam::AttnProj => (c, c),
                    BlockParam::K | BlockParam::V => (kv, c),
                    BlockParam::Fc => (4 * c, c),
                    BlockParam::MlpProj => (c, 4 * c),
                };
                let init = match p {
                    BlockParam::AttnProj | BlockParam::MlpProj => Init::Zeros,
                    _ => Init::linear(out, inp),
                };
                (vec![out, inp], init, OptimGroup::Matrix)
            }
        };
        ParamSpec { param, name: param.name(), shape, init, group }
    }

    /// The row of the parameter named `name`, if the model has one.
    pub fn find_param(&self, name: &str) -> Option<ParamSpec> {
        self.params().into_iter().find(|s| s.name == name)
    }
}

/// The model's parameters as (name, Var) in table order, for the optimizers. A parameter missing
/// from `varmap`, or a variable in it that the table does not list (which no optimizer group
/// would update), is an error.
pub fn named_vars(config: &GPTConfig, varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap.data().lock().map_err(|e| candle_core::Error::Msg(format!("VarMap lock poisoned: {e}")))?;
    let specs = config.params();
    if let Some(extra) = data.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
        candle_core::bail!("the VarMap has a variable {extra} that is not a parameter of the model");
    }
    specs
        .into_iter()
        .map(|spec| match data.get(&spec.name) {
            Some(var) => Ok((spec.name, var.clone())),
            None => candle_core::bail!("VarMap has no parameter {}", spec.name),
        })
        .collect()
}

/// The rotary cos and sin tables, each (len, 1, head_dim/2), f32 tensors: with
/// [`RotaryTables::Bf16`] holding bf16-rounded values, because v0 keeps these buffers in bf16 and
/// fp32 * bf16 promotes to fp32; with [`RotaryTables::F32`] unrounded, as transformers has them.
fn rotary_tables(len: usize, head_dim: usize, precision: RotaryTables, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / ROPE_BASE.powf((2 * i) as f32 / head_dim as f32)).collect();
    let freqs: Vec<f32> = (0..len).flat_map(|t| inv_freq.iter().map(move |f| t as f32 * f)).collect();
    let table = |f: fn(f32) -> f32| -> Result<Tensor> {
        let values: Vec<f32> = freqs.iter().map(|&x| f(x)).collect();
        let table = Tensor::from_vec(values, (len, 1, half), device)?;
        match precision {
            RotaryTables::Bf16 => table.to_dtype(DType::BF16)?.to_dtype(DType::F32),
            RotaryTables::F32 => Ok(table),
        }
    };
    Ok((table(f32::cos)?, table(f32::sin)?))
}

/// Rotates the two halves of the last dimension of `x` (B, T, H, D) by position; `cos` and `sin`
/// are (T, 1, D/2) and broadcast over batch and heads.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d)?, x.narrow(D::Minus1, d, d)?);
    let y1 = (x1.broadcast_mul(cos)? + x2.broadcast_mul(sin)?)?;
    let y2 = (x2.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[&y1, &y2], D::Minus1)
}

/// Additive attention mask (Tq, Tk) for a chunk of `tq` queries whose keys are the `tk - tq`
/// cached positions followed by the chunk itself: the whole prefix is visible, and causal inside
/// the chunk. With no prefix this is the plain causal mask.
fn attention_mask(tq: usize, tk: usize, device: &Device) -> Result<Tensor> {
    let prefix = tk - tq;
    let mask: Vec<f32> =
        (0..tq).flat_map(|i| (0..tk).map(move |j| if j <= prefix + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (tq, tk), device)
}

/// Named intermediate tensors collected by [`GPT::forward_with_activations`].
type Trace = Vec<(String, Tensor)>;

/// What every layer of one forward pass shares: the rotary rows of the chunk's positions, the
/// additive attention mask (None for a single query, which sees every key, and on the fused path,
/// whose kernel masks by itself), and the kernels it runs: fused (the model's choice, for f32 on the
/// CPU) and on which training GEMM.
struct Pass {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    fused: bool,
    gemm: Gemm,
}

impl Pass {
    /// `x · Wᵀ` over the last dimension of `x`, through the fused linear (and the training GEMM,
    /// see `fused/linear.rs`) on the fused path.
    fn project(&self, layer: &Linear, x: &Tensor) -> Result<Tensor> {
        if !self.fused {
            return layer.forward(x);
        }
        let c = x.dim(D::Minus1)?;
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.push(layer.weight().dim(0)?);
        fused::linear(&x.reshape(((), c))?, layer.weight(), self.gemm)?.reshape(dims)
    }

    /// RMSNorm, fused on the fused path.
    fn norm(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            fused::rms_norm(x)
        } else {
            rms_norm(x)
        }
    }
}

/// Whether `x` (a pass's activations) can take the fused kernels when `kernels` ask for them: they
/// are f32 CPU kernels.
fn fusable(kernels: Kernels, x: &Tensor) -> bool {
    kernels.fused && x.device().is_cpu() && x.dtype() == DType::F32
}

struct CausalSelfAttention {
    layer_idx: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    c_q: Linear,
    c_k: Linear,
    c_v: Linear,
    c_proj: Linear,
}

impl CausalSelfAttention {
    fn new(cfg: &GPTConfig, layer_idx: usize, weight: &impl Fn(Param) -> Result<Linear>) -> Result<Self> {
        let w = |p: BlockParam| weight(Param::Block(layer_idx, p));
        Ok(Self {
            layer_idx,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim(),
            c_q: w(BlockParam::Q)?,
            c_k: w(BlockParam::K)?,
            c_v: w(BlockParam::V)?,
            c_proj: w(BlockParam::AttnProj)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, hkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        // project and split heads: q (B, T, H, D), k and v (B, T, Hkv, D)
        let q = pass.project(&self.c_q, x)?.reshape((b, t, h, hd))?;
        let k = pass.project(&self.c_k, x)?.reshape((b, t, hkv, hd))?;
        let v = pass.project(&self.c_v, x)?.reshape((b, t, hkv, hd))?;
        if pass.fused && cache.is_none() {
            // Fused kernels in the projections' (B, T, heads, D) layout: no transposes, no (T x T)
            // intermediates. The cached path (a prefix of past keys) keeps the composition below.
            let q = fused::rope_qk_norm(&q, &pass.cos, &pass.sin)?;
            let k = fused::rope_qk_norm(&k, &pass.cos, &pass.sin)?;
            let y = fused::causal_attention(&q, &k, &v)?.reshape((b, t, c))?;
            return pass.project(&self.c_proj, &y);
        }
        // rotary, then QK-norm, then heads first: q (B, H, T, D), k and v (B, Hkv, T, D)
        let q = rms_norm(&apply_rotary(&q, &pass.cos, &pass.sin)?)?;
        let k = rms_norm(&apply_rotary(&k, &pass.cos, &pass.sin)?)?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // with a cache, prepend the past: k and v (B, Hkv, Tk, D), Tk = cached + T
        let (k, v) = match cache {
            Some(cache) => cache.append(self.layer_idx, k, v)?,
            None => (k, v),
        };
        let tk = k.dim(2)?;
        // GQA: the r query heads served by kv head j are adjacent (heads j*r .. j*r+r-1, like
        // repeat_interleave), so stacking them along time, q (B, Hkv, r*T, D), lets every query
        // meet its kv head in one matmul without copying k and v r times.
        let r = h / hkv;
        let q = q.reshape((b, hkv, r * t, hd))?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (B, Hkv, r*T, Tk)
        let att = att.reshape((b, hkv, r, t, tk))?;
        let att = match &pass.mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let att = softmax_last_dim(&att)?.reshape((b, hkv, r * t, tk))?;
        let y = att.matmul(&v)?; // (B, Hkv, r*T, D)

        // heads back together: (B, H, T, D) -> (B, T, H*D)
        let y = y.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, c))?;
        pass.project(&self.c_proj, &y)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn new(layer_idx: usize, weight: &impl Fn(Param) -> Result<Linear>) -> Result<Self> {
        let w = |p: BlockParam| weight(Param::Block(layer_idx, p));
        Ok(Self { c_fc: w(BlockParam::Fc)?, c_proj: w(BlockParam::MlpProj)? })
    }

    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        // (B, T, C) -> (B, T, 4C) -> relu² -> (B, T, C)
        let h = pass.project(&self.c_fc, x)?;
        let h = if pass.fused { fused::relu_squared(&h)? } else { h.relu()?.sqr()? };
        pass.project(&self.c_proj, &h)
    }
}

struct Block {
    attn: CausalSelfAttention,
    mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        i: usize,
        x: &Tensor,
        pass: &Pass,
        cache: Option<&mut KvCache>,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let attn_out = self.attn.forward(&pass.norm(x)?, pass, cache)?;
        let x = (x + &attn_out)?;
        let mlp_out = self.mlp.forward(&pass.norm(&x)?, pass)?;
        let x = (x + &mlp_out)?;
        if let Some(trace) = trace {
            trace.push((format!("h.{i}.attn_out"), attn_out));
            trace.push((format!("h.{i}.mlp_out"), mlp_out));
            trace.push((format!("h.{i}.out"), x.clone()));
        }
        Ok(x)
    }
}

/// How [`GPT::loss`] reduces the per-token cross-entropies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the targets that are not -1.
    Mean,
    /// One loss per target, flattened (B*T), 0 where the target is -1 (torch's `'none'`).
    PerToken,
}

/// The GPT. Parameters come from a [`VarBuilder`] under the original's names.
#[allow(clippy::upper_case_acronyms)] // named as in the original
pub struct GPT {
    config: GPTConfig,
    kernels: Kernels,
    /// Every parameter, in table order: what [`GPT::weight`] and [`GPT::named_weights`] hand out.
    weights: Vec<(ParamSpec, Tensor)>,
    wte: Embedding,
    blocks: Vec<Block>,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The fused lm_head's logits buffer, kept from step to step (see `fused/lm_head.rs`).
    logits_pool: LogitsPool,
}

impl GPT {
    /// Builds the model over the tensors of `vb` (a checkpoint, or a [`VarMap`] for training;
    /// parameters missing from a VarMap are created as zeros: use [`GPT::init`] for a fresh model),
    /// fetching every parameter of the table by name. It runs the default [`Kernels`] (fused, f32
    /// GEMMs) until told otherwise ([`GPT::with_kernels`]).
    pub fn new(config: &GPTConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let weights = config
            .params()
            .into_iter()
            .map(|spec| {
                let tensor = vb.get_with_hints(spec.shape.clone(), &spec.name, candle_nn::init::ZERO)?;
                Ok((spec, tensor))
            })
            .collect::<Result<Vec<_>>>()?;
        let tensor = |p: Param| -> Result<Tensor> {
            match weights.iter().find(|(spec, _)| spec.param == p) {
                Some((_, t)) => Ok(t.clone()),
                None => candle_core::bail!("the parameter table has no {}", p.name()),
            }
        };
        let linear = |p: Param| -> Result<Linear> { Ok(Linear::new(tensor(p)?, None)) };
        let blocks = (0..config.n_layer)
            .map(|i| Ok(Block { attn: CausalSelfAttention::new(config, i, &linear)?, mlp: Mlp::new(i, &linear)? }))
            .collect::<Result<Vec<_>>>()?;
        let (wte, lm_head) = (Embedding::new(tensor(Param::Wte)?, config.n_embd), linear(Param::LmHead)?);
        let rotary_len = config.sequence_len * ROTARY_LEN_FACTOR;
        let (cos, sin) = rotary_tables(rotary_len, config.head_dim(), config.rotary, vb.device())?;
        Ok(Self {
            config: config.clone(),
            kernels: Kernels::default(),
            weights,
            wte,
            blocks,
            lm_head,
            cos,
            sin,
            logits_pool: LogitsPool::default(),
        })
    }

    /// A freshly initialised, trainable model (v0's `init_weights`: each parameter's
    /// [`super::params::Init`]), drawn deterministically from `seed` in table order, with the
    /// VarMap that owns its parameters.
    pub fn init(config: &GPTConfig, seed: u64, device: &Device) -> Result<(Self, VarMap)> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let varmap = VarMap::new();
        {
            let mut data =
                varmap.data().lock().map_err(|e| candle_core::Error::Msg(format!("VarMap lock poisoned: {e}")))?;
            for spec in config.params() {
                let values = spec.init.sample(spec.numel(), &mut rng)?;
                let var = Var::from_tensor(&Tensor::from_vec(values, spec.shape, device)?)?;
                data.insert(spec.name, var);
            }
        }
        let model = Self::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((model, varmap))
    }

    /// The model running `kernels` from now on (the command's choice, e.g. `base train --bf16`).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels the model runs (and its optimizers should: `optim::setup_optimizers`).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn config(&self) -> &GPTConfig {
        &self.config
    }

    /// The tensor of `param` (every parameter of the table has one).
    pub fn weight(&self, param: Param) -> Option<&Tensor> {
        self.weights.iter().find(|(spec, _)| spec.param == param).map(|(_, t)| t)
    }

    pub fn num_params(&self) -> usize {
        self.config.num_params()
    }

    pub fn estimate_flops(&self) -> u64 {
        self.config.estimate_flops()
    }

    /// The full rotary cos/sin tables, (10 * sequence_len, 1, head_dim/2).
    pub fn rotary(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Every weight by its original name, in table order ([`GPTConfig::params`]): for saving and
    /// for converting to other formats.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.weights.iter().map(|(spec, t)| (spec.name.clone(), t.clone())).collect()
    }

    /// `idx` (B, T) of token ids. Without targets: softcapped logits (B, T, V). With targets
    /// (B, T), -1 = ignore: the mean cross-entropy, a scalar.
    pub fn forward(&self, idx: &Tensor, targets: Option<&Tensor>) -> Result<Tensor> {
        match targets {
            Some(targets) => self.loss(idx, targets, Reduction::Mean),
            None => self.logits(&self.trunk(idx, None, None)?),
        }
    }

    /// Cross-entropy of the next-token predictions for `idx` against `targets` (B, T).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, reduction: Reduction) -> Result<Tensor> {
        let x = self.trunk(idx, None, None)?;
        let targets = targets.flatten_all()?; // (B*T,)
        let losses = if fusable(self.kernels, &x) {
            // Projection, softcap and scoring in one op with one logits buffer reused from step to
            // step (see `fused/lm_head.rs`).
            let c = x.dim(D::Minus1)?;
            let (w, gemm, pool) = (self.lm_head.weight(), self.kernels.gemm(), &self.logits_pool);
            fused::lm_head_cross_entropy(&x.reshape(((), c))?, w, &targets, SOFTCAP as f32, gemm, pool)?
        } else {
            let logits = self.logits(&x)?;
            let v = logits.dim(D::Minus1)?;
            cross_entropy_per_token(&logits.reshape(((), v))?, &targets)?.0
        };
        match reduction {
            // A batch whose every target is ignored (an SFT micro-batch of user turns cut at the
            // context) has loss 0 and no gradient rather than 0/0 = NaN, which would poison the step.
            Reduction::Mean => {
                let count = targets.ge(0i64)?.to_dtype(losses.dtype())?.sum_all()?.maximum(1.0)?;
                losses.sum_all()?.div(&count)
            }
            Reduction::PerToken => Ok(losses),
        }
    }

    /// Logits (B, T, V) for a chunk of `idx` (B, T) that continues the sequence held in `cache`
    /// (prefill with the whole prompt, then decode one token at a time); appends to the cache.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.logits(&self.trunk(idx, Some(cache), None)?)
    }

    /// Like [`GPT::forward_cached`] but returns only the last position's logits (B, 1, V): a
    /// prefill needs no others, and the vocabulary projection of every prompt position would
    /// otherwise dominate the time to first token.
    pub fn forward_cached_last(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.trunk(idx, Some(cache), None)?;
        let t = x.dim(1)?;
        if t == 0 {
            candle_core::bail!("forward_cached_last needs at least one token");
        }
        self.logits(&x.narrow(1, t - 1, 1)?)
    }

    /// Logits plus the intermediate activations, named like the fixtures: `h.{i}.attn_out`,
    /// `h.{i}.mlp_out` (module outputs before the residual add), `h.{i}.out`, `lm_head_in`.
    pub fn forward_with_activations(&self, idx: &Tensor) -> Result<(Tensor, Trace)> {
        let mut trace = Trace::new();
        let x = self.trunk(idx, None, Some(&mut trace))?;
        trace.push(("lm_head_in".to_string(), x.clone()));
        Ok((self.logits(&x)?, trace))
    }

    /// Embedding and blocks: the final normalised hidden state (B, T, C).
    fn trunk(&self, idx: &Tensor, mut cache: Option<&mut KvCache>, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        let (_b, t) = idx.dims2()?;
        let t0 = cache.as_ref().map_or(0, |c| c.pos());
        if t0 + t > self.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} tokens exceeds the rotary tables ({} = 10 * sequence_len)",
                t0 + t,
                self.cos.dim(0)?
            );
        }
        let x = self.wte.forward(idx)?;
        let fused = fusable(self.kernels, &x);
        let pass = Pass {
            cos: self.cos.narrow(0, t0, t)?,
            sin: self.sin.narrow(0, t0, t)?,
            mask: if t > 1 && !(fused && cache.is_none()) {
                Some(attention_mask(t, t0 + t, idx.device())?)
            } else {
                None
            },
            fused,
            gemm: self.kernels.gemm(),
        };
        let mut x = pass.norm(&x)?; // (B, T, C)
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(i, &x, &pass, cache.as_deref_mut(), trace.as_deref_mut())?;
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        pass.norm(&x)
    }

    /// (B, T, C) -> softcapped logits (B, T, V).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        softcap(&self.lm_head.forward(x)?, SOFTCAP)
    }
}
