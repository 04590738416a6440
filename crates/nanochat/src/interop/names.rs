//! The one table of parameter names between this project (which uses the original's names) and
//! transformers' `NanoChatForCausalLM`, derived from the model's own parameter list.
//!
//! transformers' names, from its conversion script and modeling file: `model.embed_tokens`,
//! `model.layers.<i>.self_attn.{q,k,v,o}_proj`, `model.layers.<i>.mlp.{fc1,fc2}`, `lm_head`; every
//! weight has the same [out, in] layout as ours, so a weight maps to a weight unchanged.

use anyhow::{bail, Result};

use crate::model::GPTConfig;

/// One parameter under both names, with its (rows, cols) shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub ours: String,
    pub hf: String,
    pub rows: usize,
    pub cols: usize,
}

/// transformers' name of our parameter `ours`.
fn hf_name(ours: &str) -> Result<String> {
    match ours {
        "transformer.wte.weight" => return Ok("model.embed_tokens.weight".into()),
        "lm_head.weight" => return Ok("lm_head.weight".into()),
        _ => {}
    }
    if let Some((layer, rest)) = ours.strip_prefix("transformer.h.").and_then(|r| r.split_once('.')) {
        let module = match rest {
            "attn.c_q.weight" => "self_attn.q_proj.weight",
            "attn.c_k.weight" => "self_attn.k_proj.weight",
            "attn.c_v.weight" => "self_attn.v_proj.weight",
            "attn.c_proj.weight" => "self_attn.o_proj.weight",
            "mlp.c_fc.weight" => "mlp.fc1.weight",
            "mlp.c_proj.weight" => "mlp.fc2.weight",
            _ => bail!("no transformers name for parameter {ours}"),
        };
        return Ok(format!("model.layers.{layer}.{module}"));
    }
    bail!("no transformers name for parameter {ours}")
}

/// Every parameter of `config`, in the model's order, under both names.
pub fn table(config: &GPTConfig) -> Result<Vec<Param>> {
    config
        .param_shapes()
        .into_iter()
        .map(|(ours, (rows, cols))| Ok(Param { hf: hf_name(&ours)?, ours, rows, cols }))
        .collect()
}
