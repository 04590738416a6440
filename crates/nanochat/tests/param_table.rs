//! The parameter table (`GPTConfig::params`) is the one description of the model's parameters:
//! it lists each once with v0's shape, init and optimizer group; the model's weights, its
//! `named_weights` and the optimizer split follow it; and a variable the table does not list is
//! refused by the optimizer setup instead of silently landing in Muon's group.

use std::collections::HashSet;

use candle_core::{DType, Device, Var};
use nanochat::model::{BlockParam, GPTConfig, Init, OptimGroup, Param, GPT};
use nanochat::optim::{setup_optimizers, OptimConfig};

/// Grouped-query attention: 4 query heads of dimension 16 on 2 kv heads.
fn config() -> GPTConfig {
    GPTConfig { sequence_len: 16, vocab_size: 97, n_layer: 3, n_head: 4, n_kv_head: 2, n_embd: 64 }
}

#[test]
fn the_table_lists_every_parameter_once_with_v0s_shapes_inits_and_groups() {
    let cfg = config();
    let table = cfg.params();
    assert_eq!(table.len(), 2 + 6 * cfg.n_layer);
    let names: HashSet<&str> = table.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), table.len(), "a name appears twice");
    assert_eq!(table.iter().map(|s| s.numel()).sum::<usize>(), cfg.num_params());
    assert_eq!(cfg.num_params(), 2 * 97 * 64 + 3 * (64 * 64 * 2 + 32 * 64 * 2 + 2 * 4 * 64 * 64));

    let wte = &table[0];
    assert_eq!((wte.param, wte.name.as_str()), (Param::Wte, "transformer.wte.weight"));
    assert_eq!(
        (wte.shape.as_slice(), wte.init, wte.group),
        (&[97, 64][..], Init::Normal { std: 1.0 }, OptimGroup::Embedding)
    );
    let lm_head = &table[table.len() - 1];
    assert_eq!((lm_head.param, lm_head.name.as_str()), (Param::LmHead, "lm_head.weight"));
    assert_eq!(
        (lm_head.shape.as_slice(), lm_head.init, lm_head.group),
        (&[97, 64][..], Init::Zeros, OptimGroup::Unembedding)
    );

    // Layer 2's keys: (n_kv_head · head_dim, n_embd) = (32, 64), std 1/sqrt(64) · sqrt(32/64).
    let c_k = cfg.spec(Param::Block(2, BlockParam::K));
    assert_eq!((c_k.name.as_str(), c_k.shape.as_slice()), ("transformer.h.2.attn.c_k.weight", &[32, 64][..]));
    assert!((c_k.init.std() - 0.125 * 0.5f64.sqrt()).abs() < 1e-15, "{:?}", c_k.init);
    assert_eq!(cfg.find_param("transformer.h.2.attn.c_k.weight"), Some(c_k));
    // The MLP's output projection: (n_embd, 4 n_embd), zero like every output projection.
    let proj = cfg.spec(Param::Block(0, BlockParam::MlpProj));
    assert_eq!((proj.name.as_str(), proj.shape.as_slice()), ("transformer.h.0.mlp.c_proj.weight", &[64, 256][..]));
    assert_eq!(proj.init, Init::Zeros);
    // Every block weight is a Muon matrix, every other parameter an AdamW one.
    for spec in &table {
        let in_block = matches!(spec.param, Param::Block(..));
        assert_eq!(spec.group == OptimGroup::Matrix, in_block, "{}", spec.name);
        assert_eq!(spec.shape.len(), 2, "{}", spec.name);
    }
    assert_eq!(cfg.find_param("transformer.h.3.attn.c_q.weight"), None, "there is no layer 3");
}

#[test]
fn the_models_weights_follow_the_table() -> anyhow::Result<()> {
    let cfg = config();
    let (model, varmap) = GPT::init(&cfg, 1, &Device::Cpu)?;
    let names: Vec<String> = model.named_weights().into_iter().map(|(name, _)| name).collect();
    let table: Vec<String> = cfg.params().into_iter().map(|s| s.name).collect();
    assert_eq!(names, table);
    // `weight` hands out the trainable variable itself, under the table's shape.
    let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
    for spec in cfg.params() {
        let w = model.weight(spec.param).expect("every parameter has a weight");
        assert_eq!(w.dims(), spec.shape.as_slice(), "{}", spec.name);
        assert_eq!(w.id(), data[&spec.name].as_tensor().id(), "{} is not the VarMap's variable", spec.name);
    }
    Ok(())
}

#[test]
fn the_optimizers_split_by_the_table_and_refuse_unknown_variables() -> anyhow::Result<()> {
    let cfg = config();
    let (model, varmap) = GPT::init(&cfg, 1, &Device::Cpu)?;
    let opt = setup_optimizers(&model, &varmap, &OptimConfig::default())?;
    let group = |g: usize| opt.adamw.groups[g].params.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!((group(0), group(1)), (vec!["lm_head.weight".to_string()], vec!["transformer.wte.weight".to_string()]));
    let muon: Vec<String> = opt.muon.group.params.iter().map(|(n, _)| n.clone()).collect();
    let matrices: Vec<String> =
        cfg.params().into_iter().filter(|s| s.group == OptimGroup::Matrix).map(|s| s.name).collect();
    assert_eq!(muon, matrices);
    assert_eq!((opt.adamw.kernels, opt.muon.kernels), (model.kernels(), model.kernels()));

    // A variable the table does not know (say, a new parameter family added to the model but not
    // to the table) is an error naming it, not one more Muon matrix.
    let extra = "transformer.h.0.attn.ve_gate.weight";
    varmap
        .data()
        .lock()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .insert(extra.to_string(), Var::zeros((2, 12), DType::F32, &Device::Cpu)?);
    let err = setup_optimizers(&model, &varmap, &OptimConfig::default()).err().expect("an unknown variable");
    assert!(err.to_string().contains(extra), "{err}");

    // And a parameter of the table that the VarMap lacks is one too.
    let (model, varmap) = GPT::init(&cfg, 1, &Device::Cpu)?;
    varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?.remove("transformer.h.1.mlp.c_fc.weight");
    let err = setup_optimizers(&model, &varmap, &OptimConfig::default()).err().expect("a missing parameter");
    assert!(err.to_string().contains("transformer.h.1.mlp.c_fc.weight"), "{err}");
    Ok(())
}
