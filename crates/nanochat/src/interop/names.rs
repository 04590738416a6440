//! The one table of parameter names between this project (which uses the original's names) and
//! transformers' `NanoChatForCausalLM`, derived from the model's parameter table
//! ([`GPTConfig::params`]): a new parameter family fails to compile here until it has a mapping.
//!
//! transformers' names, from its conversion script and modeling file: `model.embed_tokens`,
//! `model.layers.<i>.self_attn.{q,k,v,o}_proj`, `model.layers.<i>.mlp.{fc1,fc2}`, `lm_head`; every
//! weight has the same [out, in] layout as ours, so a weight maps to a weight unchanged.

use anyhow::{ensure, Result};

use crate::model::{BlockParam, GPTConfig, Param};

/// One parameter under both names, with its (rows, cols) shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePair {
    pub ours: String,
    pub hf: String,
    pub rows: usize,
    pub cols: usize,
}

/// transformers' name of `param`.
fn hf_name(param: Param) -> String {
    let block = |p: BlockParam| match p {
        BlockParam::Q => "self_attn.q_proj.weight",
        BlockParam::K => "self_attn.k_proj.weight",
        BlockParam::V => "self_attn.v_proj.weight",
        BlockParam::AttnProj => "self_attn.o_proj.weight",
        BlockParam::Fc => "mlp.fc1.weight",
        BlockParam::MlpProj => "mlp.fc2.weight",
    };
    match param {
        Param::Wte => "model.embed_tokens.weight".into(),
        Param::Block(layer, p) => format!("model.layers.{layer}.{}", block(p)),
        Param::LmHead => "lm_head.weight".into(),
    }
}

/// Every parameter of `config`, in the model's order, under both names.
pub fn table(config: &GPTConfig) -> Result<Vec<NamePair>> {
    config
        .params()
        .into_iter()
        .map(|spec| {
            let &[rows, cols] = spec.shape.as_slice() else {
                anyhow::bail!("{} is not a matrix: transformers' NanoChatForCausalLM has no such parameter", spec.name)
            };
            ensure!(rows > 0 && cols > 0, "{} has an empty shape", spec.name);
            Ok(NamePair { hf: hf_name(spec.param), ours: spec.name, rows, cols })
        })
        .collect()
}
