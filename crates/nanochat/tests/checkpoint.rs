//! Checkpoints: a round trip keeps weights and optimizer state bit-identical, and every kind of
//! damaged or mismatched checkpoint is refused with an error that names the problem.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use nanochat::checkpoint::{self, Meta};
use nanochat::model::{GPTConfig, GPT};
use nanochat::optim::{setup_optimizers, OptimConfig};
use nanochat::train::forward_backward;

fn config() -> GPTConfig {
    GPTConfig {
        sequence_len: 16,
        vocab_size: 64,
        n_layer: 1,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 32,
        rotary: Default::default(),
    }
}

/// Model and optimizer tensors after two training steps (so the optimizer state is non-trivial).
fn trained_state() -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let cfg = config();
    let (model, varmap) = GPT::init(&cfg, 3, &dev).unwrap();
    let mut opt = setup_optimizers(&model, &varmap, &OptimConfig::default()).unwrap();
    let vars: Vec<_> = opt.vars().cloned().collect();
    for step in 0..2u32 {
        let ids: Vec<u32> = (0..32).map(|i| (i * 7 + step * 3) % 64).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| i64::from((i + 1) % 64)).collect();
        let x = Tensor::from_vec(ids, (2, 16), &dev).unwrap();
        let y = Tensor::from_vec(targets, (2, 16), &dev).unwrap();
        let (_, grads) = forward_backward(&model, &vars, [Ok((x, y))], 1).unwrap();
        opt.step(&grads).unwrap();
    }
    (checkpoint::varmap_tensors(&varmap).unwrap(), opt.state_dict().unwrap())
}

fn meta(step: usize) -> Meta {
    let mut meta = Meta::new(step, config(), "0123456789abcdef".to_string());
    meta.loop_state.smooth_train_loss = 3.25;
    meta.loop_state.val_bpb = Some(1.5);
    meta
}

fn save_example(dir: &Path, step: usize) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let (model, optim) = trained_state();
    checkpoint::save(dir, &model, Some(&optim), &meta(step)).unwrap();
    (model, optim)
}

fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        candle_core::DType::I64 => t.to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert_eq!(t.dims(), b[name].dims(), "{name}");
        assert_eq!(bits(t), bits(&b[name]), "{name} differs");
    }
}

fn load_err(dir: &Path, step: usize) -> String {
    match checkpoint::load(dir, step, &Device::Cpu, true, Some("0123456789abcdef")) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn round_trip_is_bit_identical_and_optimizer_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, optim) = save_example(tmp.path(), 7);
    assert!(optim.keys().any(|k| k.starts_with("adamw.")) && optim.keys().any(|k| k.starts_with("muon.")));
    let ckpt = checkpoint::load(tmp.path(), 7, &Device::Cpu, true, Some("0123456789abcdef")).unwrap();
    assert_same(&model, &ckpt.model);
    assert_same(&optim, &ckpt.optim);
    let mut expected = meta(7);
    expected.files = ckpt.meta.files.clone();
    expected.sha256 = ckpt.meta.sha256.clone();
    assert_eq!(ckpt.meta, expected);
    assert_eq!(ckpt.meta.files.len(), 2);

    // The restored model and optimizers hold exactly the saved state.
    let (restored, varmap) = checkpoint::model_from_checkpoint(&ckpt, &Device::Cpu).unwrap();
    let mut opt = setup_optimizers(&restored, &varmap, &OptimConfig::default()).unwrap();
    opt.load_state_dict(&ckpt.optim).unwrap();
    assert_same(&optim, &opt.state_dict().unwrap());
    assert_same(&model, &checkpoint::varmap_tensors(&varmap).unwrap());

    // Inference does not need the optimizer state.
    std::fs::remove_file(checkpoint::optim_path(tmp.path(), 7)).unwrap();
    let ckpt = checkpoint::load(tmp.path(), 7, &Device::Cpu, false, None).unwrap();
    assert!(ckpt.optim.is_empty());
}

#[test]
fn latest_step_counts_only_complete_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(checkpoint::latest_step(&tmp.path().join("nothing")).unwrap(), None);
    save_example(tmp.path(), 3);
    save_example(tmp.path(), 12);
    assert_eq!(checkpoint::latest_step(tmp.path()).unwrap(), Some(12));
    std::fs::remove_file(checkpoint::meta_path(tmp.path(), 12)).unwrap();
    assert_eq!(checkpoint::latest_step(tmp.path()).unwrap(), Some(3));
    let err = load_err(tmp.path(), 12);
    assert!(
        err.contains("no checkpoint for step 12") && err.contains("latest complete checkpoint there is step 3"),
        "{err}"
    );
}

#[test]
fn missing_truncated_and_corrupt_files_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 5);
    let model = checkpoint::model_path(tmp.path(), 5);
    let bytes = std::fs::read(&model).unwrap();

    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("truncated"), "{err}");

    // Same size, damaged header: the checksum notices; without one (an older checkpoint), parsing does.
    let mut damaged = bytes.clone();
    damaged[8..40].fill(b'#');
    std::fs::write(&model, &damaged).unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("damaged") && err.contains("SHA-256"), "{err}");
    let meta_file = checkpoint::meta_path(tmp.path(), 5);
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_file).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("sha256");
    std::fs::write(&meta_file, meta.to_string()).unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("not a valid safetensors file"), "{err}");

    std::fs::remove_file(&model).unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("missing") && err.contains("model_000005.safetensors"), "{err}");

    std::fs::write(&model, &bytes).unwrap();
    std::fs::remove_file(checkpoint::optim_path(tmp.path(), 5)).unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("missing") && err.contains("optim_000005.safetensors"), "{err}");

    let meta_file = checkpoint::meta_path(tmp.path(), 5);
    std::fs::write(&meta_file, "{ not json").unwrap();
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn unknown_version_and_foreign_meta_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 1);
    let path = checkpoint::meta_path(tmp.path(), 1);
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    meta["version"] = 99.into();
    std::fs::write(&path, meta.to_string()).unwrap();
    let err = load_err(tmp.path(), 1);
    assert!(err.contains("version 99"), "{err}");
    meta["format"] = "something-else".into();
    std::fs::write(&path, meta.to_string()).unwrap();
    let err = load_err(tmp.path(), 1);
    assert!(err.contains("not a nanochat checkpoint"), "{err}");
}

#[test]
fn missing_tensor_and_wrong_shape_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut model, optim) = trained_state();
    model.remove("transformer.h.0.mlp.c_fc.weight");
    checkpoint::save(tmp.path(), &model, Some(&optim), &meta(2)).unwrap();
    let err = load_err(tmp.path(), 2);
    assert!(err.contains("has no tensor transformer.h.0.mlp.c_fc.weight"), "{err}");

    let (mut model, optim) = trained_state();
    model.insert("lm_head.weight".to_string(), Tensor::zeros((64, 16), candle_core::DType::F32, &Device::Cpu).unwrap());
    checkpoint::save(tmp.path(), &model, Some(&optim), &meta(2)).unwrap();
    let err = load_err(tmp.path(), 2);
    assert!(err.contains("lm_head.weight") && err.contains("[64, 32]"), "{err}");
}

#[test]
fn a_different_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 4);
    let err = match checkpoint::load(tmp.path(), 4, &Device::Cpu, true, Some("ffffffffffffffff")) {
        Ok(_) => panic!("a different tokenizer must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("tokenizer 0123456789abcdef") && err.contains("ffffffffffffffff"), "{err}");
}
