//! The vocabulary of the GPT's parameter table: a parameter's place in the model ([`Param`]), its
//! name in the original's `named_parameters()`, how it is initialised ([`Init`]) and which
//! optimizer updates it ([`OptimGroup`]), together one row, [`ParamSpec`]. The rows themselves,
//! with their shapes (any rank), are `GPTConfig::params` and `GPTConfig::spec` in `gpt.rs`, next
//! to the model they describe; everything else derives from them: creating and initialising a
//! model (`GPT::init`), building it over a checkpoint's tensors by name (`GPT::new`),
//! `GPT::named_weights`, the native decode path's weights (`decode.rs`, by [`Param`], not by
//! position), the optimizer split (`optim::setup_optimizers`), the checkpoint's tensor check, and
//! name mappings to other formats.
//!
//! A new parameter family is one [`Param`] variant (and its name here), one arm of
//! `GPTConfig::spec` and its place in `GPTConfig::params`, plus the forward passes that use it
//! (`gpt.rs` and `decode.rs`).

use candle_core::Result;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Where a parameter sits in the model: what the forward passes ask the table for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    /// The token embedding, (vocab_size, n_embd).
    Wte,
    /// One weight of block `layer`.
    Block(usize, BlockParam),
    /// The unembedding, (vocab_size, n_embd), untied from the embedding.
    LmHead,
}

/// The weights of one transformer block, all `Linear` weights (out, in) as torch stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockParam {
    /// Queries, (n_head · head_dim, n_embd).
    Q,
    /// Keys, (n_kv_head · head_dim, n_embd).
    K,
    /// Values, (n_kv_head · head_dim, n_embd).
    V,
    /// The attention's output projection, (n_embd, n_embd).
    AttnProj,
    /// The MLP's first layer, (4 · n_embd, n_embd).
    Fc,
    /// The MLP's output projection, (n_embd, 4 · n_embd).
    MlpProj,
}

impl BlockParam {
    /// A block's weights in `named_parameters()` order.
    pub const ALL: [BlockParam; 6] =
        [BlockParam::Q, BlockParam::K, BlockParam::V, BlockParam::AttnProj, BlockParam::Fc, BlockParam::MlpProj];

    /// The name under `transformer.h.{layer}.`.
    fn suffix(self) -> &'static str {
        match self {
            BlockParam::Q => "attn.c_q.weight",
            BlockParam::K => "attn.c_k.weight",
            BlockParam::V => "attn.c_v.weight",
            BlockParam::AttnProj => "attn.c_proj.weight",
            BlockParam::Fc => "mlp.c_fc.weight",
            BlockParam::MlpProj => "mlp.c_proj.weight",
        }
    }
}

impl Param {
    /// The original's name of the parameter (its key in checkpoints).
    pub fn name(self) -> String {
        match self {
            Param::Wte => "transformer.wte.weight".to_string(),
            Param::Block(layer, p) => format!("transformer.h.{layer}.{}", p.suffix()),
            Param::LmHead => "lm_head.weight".to_string(),
        }
    }
}

/// How a parameter starts (v0's `init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros: `lm_head` (logits start uniform) and every output projection (each block starts
    /// as the identity).
    Zeros,
    /// Normal with mean 0 and this standard deviation.
    Normal { std: f64 },
}

impl Init {
    /// v0's init of a `Linear` weight (out, in): N(0, σ) with σ = 1/sqrt(fan_in) ·
    /// min(1, sqrt(fan_out / fan_in)).
    pub fn linear(fan_out: usize, fan_in: usize) -> Init {
        let (fan_out, fan_in) = (fan_out as f64, fan_in as f64);
        Init::Normal { std: 1.0 / fan_in.sqrt() * (fan_out / fan_in).sqrt().min(1.0) }
    }

    /// The standard deviation (0 for [`Init::Zeros`]).
    pub fn std(self) -> f64 {
        match self {
            Init::Zeros => 0.0,
            Init::Normal { std } => std,
        }
    }

    /// `n` initial values, drawn from `rng` in order (zeros draw nothing).
    pub fn sample(self, n: usize, rng: &mut impl Rng) -> Result<Vec<f32>> {
        match self {
            Init::Zeros => Ok(vec![0.0; n]),
            Init::Normal { std } => {
                let normal = Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
                Ok((0..n).map(|_| normal.sample(rng)).collect())
            }
        }
    }
}

/// Which optimizer updates a parameter, at which learning rate (v0's `setup_optimizers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimGroup {
    /// AdamW at the embedding learning rate.
    Embedding,
    /// AdamW at the unembedding learning rate.
    Unembedding,
    /// Muon at the matrix learning rate: 2-D parameters only.
    Matrix,
}

/// One row of the parameter table.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub param: Param,
    /// The original's name, [`Param::name`].
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub group: OptimGroup,
}

impl ParamSpec {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
