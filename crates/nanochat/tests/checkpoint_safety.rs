//! Checkpoints that cannot lie: each kind of damage (bytes flipped or NaNs written inside the
//! tensor data, an optimizer key renamed at the same size, an impossible or oversized model
//! config) is a clear error that names what is wrong, fast and in bounded memory (the huge
//! configs run the `nanochat` binary under an address-space limit); files get the umask's
//! permissions; a checkpoint from before checksums still loads; and the advice in an error fits
//! the command that hit it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use nanochat::checkpoint::{self, Meta};
use nanochat::model::{GPTConfig, GPT};
use nanochat::optim::{setup_optimizers, OptimConfig};
use nanochat::train::forward_backward;
use sha2::{Digest, Sha256};

fn config(vocab_size: usize) -> GPTConfig {
    GPTConfig {
        sequence_len: 16,
        vocab_size,
        n_layer: 1,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 32,
        rotary: Default::default(),
    }
}

const FINGERPRINT: &str = "0123456789abcdef";

/// Model and optimizer tensors after two training steps (so the optimizer state is non-trivial).
fn trained_state(cfg: &GPTConfig) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let (model, varmap) = GPT::init(cfg, 3, &dev).unwrap();
    let mut opt = setup_optimizers(&model, &varmap, &OptimConfig::default()).unwrap();
    let vars: Vec<_> = opt.vars().cloned().collect();
    let v = cfg.vocab_size as u32;
    for step in 0..2u32 {
        let ids: Vec<u32> = (0..32).map(|i| (i * 7 + step * 3) % v).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| i64::from((i + 1) % v)).collect();
        let x = Tensor::from_vec(ids, (2, 16), &dev).unwrap();
        let y = Tensor::from_vec(targets, (2, 16), &dev).unwrap();
        let (_, grads) = forward_backward(&model, &vars, [Ok((x, y))], 1).unwrap();
        opt.step(&grads).unwrap();
    }
    (checkpoint::varmap_tensors(&varmap).unwrap(), opt.state_dict().unwrap())
}

fn save_example(dir: &Path, step: usize) {
    let (model, optim) = trained_state(&config(64));
    checkpoint::save(dir, &model, Some(&optim), &Meta::new(step, config(64), FINGERPRINT.into())).unwrap();
}

/// The error of loading `step` (with the optimizer state), and how long it took.
fn load_err(dir: &Path, step: usize) -> String {
    let start = Instant::now();
    let err = match checkpoint::load(dir, step, &Device::Cpu, true, Some(FINGERPRINT)) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?} to fail: {err}", start.elapsed());
    err
}

fn edit_meta(dir: &Path, step: usize, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = checkpoint::meta_path(dir, step);
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(&path, meta.to_string()).unwrap();
}

/// Records the current size and SHA-256 of `file` in the meta, as if it had been saved so: damage
/// that gets past the checksum (a consistent, but wrong, checkpoint).
fn record_as_saved(dir: &Path, step: usize, file: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    edit_meta(dir, step, |meta| {
        meta["files"][&name] = bytes.len().into();
        meta["sha256"][&name] = digest.into();
    });
}

/// The byte range of tensor `name`'s data in a safetensors file.
fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    8 + n + start..8 + n + end
}

#[test]
fn the_meta_records_a_checksum_that_sha256sum_would_print() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 3);
    let meta = checkpoint::load_meta(tmp.path(), 3).unwrap();
    assert_eq!(meta.sha256.len(), 2, "{:?}", meta.sha256);
    for (name, recorded) in &meta.sha256 {
        let bytes = std::fs::read(tmp.path().join(name)).unwrap();
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(recorded, &digest, "{name}");
    }
    assert!(checkpoint::load(tmp.path(), 3, &Device::Cpu, true, Some(FINGERPRINT)).is_ok());
}

#[test]
fn a_flipped_byte_inside_tensor_data_is_caught_by_the_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 5);
    for file in [checkpoint::model_path(tmp.path(), 5), checkpoint::optim_path(tmp.path(), 5)] {
        let original = std::fs::read(&file).unwrap();
        let mut bytes = original.clone();
        let middle = bytes.len() - 100;
        bytes[middle] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let err = load_err(tmp.path(), 5);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(err.contains(&name) && err.contains("SHA-256") && err.contains("damaged"), "{err}");
        std::fs::write(&file, &original).unwrap();
    }
}

#[test]
fn nans_or_infinities_in_the_weights_are_an_error_even_with_a_matching_checksum() {
    for (value, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let tmp = tempfile::tempdir().unwrap();
        save_example(tmp.path(), 5);
        let file = checkpoint::model_path(tmp.path(), 5);
        let mut bytes = std::fs::read(&file).unwrap();
        let range = tensor_range(&bytes, "transformer.h.0.attn.c_q.weight");
        bytes[range.start + 40..range.start + 44].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        // with the checksum of the damaged file: the values themselves are checked
        record_as_saved(tmp.path(), 5, &file);
        let err = load_err(tmp.path(), 5);
        assert!(err.contains("transformer.h.0.attn.c_q.weight") && err.contains("NaN or infinite"), "{what}: {err}");
    }
    // in the optimizer state too
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 5);
    let file = checkpoint::optim_path(tmp.path(), 5);
    let mut bytes = std::fs::read(&file).unwrap();
    let range = tensor_range(&bytes, "muon.transformer.h.0.mlp.c_fc.weight.momentum_buffer");
    bytes[range.end - 4..range.end].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    record_as_saved(tmp.path(), 5, &file);
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("momentum_buffer") && err.contains("optim_000005"), "{err}");
}

#[test]
fn a_renamed_optimizer_key_is_refused_not_silently_reset() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 5);
    let file = checkpoint::optim_path(tmp.path(), 5);
    let original = std::fs::read(&file).unwrap();
    // the same number of bytes, one key renamed in the header
    let (from, to) = (b"lm_head.weight.exp_avg_sq".as_slice(), b"lm_head.weight.exp_avg_zz".as_slice());
    let at = original.windows(from.len()).position(|w| w == from).expect("the key is in the header");
    let mut bytes = original.clone();
    bytes[at..at + from.len()].copy_from_slice(to);
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), original.len() as u64);
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("optim_000005.safetensors") && err.contains("SHA-256"), "{err}");

    // past the checksum, the optimizers refuse a state that is not exactly theirs
    record_as_saved(tmp.path(), 5, &file);
    let ckpt = checkpoint::load(tmp.path(), 5, &Device::Cpu, true, Some(FINGERPRINT)).unwrap();
    let (model, varmap) = checkpoint::model_from_checkpoint(&ckpt, &Device::Cpu).unwrap();
    let mut opt = setup_optimizers(&model, &varmap, &OptimConfig::default()).unwrap();
    let err = opt.load_state_dict(&ckpt.optim).expect_err("a renamed key must be refused").to_string();
    assert!(err.contains("lm_head.weight.exp_avg_zz"), "{err}");

    // a key missing altogether
    let mut state = ckpt.optim.clone();
    state.retain(|k, _| k != "adamw.lm_head.weight.exp_avg_zz");
    let err = opt.load_state_dict(&state).expect_err("a missing key must be refused").to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    // a missing optimizer altogether
    state.retain(|k, _| !k.starts_with("muon."));
    assert!(opt.load_state_dict(&state).is_err());
    // an empty state (saved before the first step) starts fresh
    assert!(opt.load_state_dict(&HashMap::new()).is_ok());
}

#[test]
fn impossible_model_configs_are_refused_before_anything_is_allocated() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("n_head", 0.into(), "n_head"),
        ("n_layer", 100_000_000u64.into(), "n_layer 100000000"),
        ("sequence_len", 1_000_000_000_000u64.into(), "sequence_len 1000000000000"),
        ("n_embd", 33.into(), "n_embd must split"),
        ("vocab_size", 0.into(), "vocab_size"),
        ("n_kv_head", 3.into(), "n_kv_head"),
    ];
    for (field, value, expected) in cases {
        let tmp = tempfile::tempdir().unwrap();
        save_example(tmp.path(), 5);
        edit_meta(tmp.path(), 5, |meta| meta["model_config"][field] = value.clone());
        let err = load_err(tmp.path(), 5);
        assert!(err.contains(expected) && err.contains("meta_000005.json"), "{field} = {value}: {err}");
        // the meta alone is refused too (resume, listing)
        assert!(checkpoint::load_meta(tmp.path(), 5).is_err(), "{field} = {value}");
    }
}

#[test]
fn a_model_bigger_than_the_machine_is_refused_with_the_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 5);
    // in range field by field, ~3e12 parameters together
    let huge = serde_json::json!({"sequence_len": 2048, "vocab_size": 65536, "n_layer": 1024, "n_head": 128,
                                  "n_kv_head": 128, "n_embd": 16384});
    edit_meta(tmp.path(), 5, |meta| meta["model_config"] = huge);
    let err = load_err(tmp.path(), 5);
    assert!(err.contains("needs about") && err.contains("GB") && err.contains("n_layer 1024"), "{err}");
}

/// The octal mode this process gives new files.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
    u32::from_str_radix(field.trim(), 8).unwrap()
}

#[test]
fn checkpoint_files_get_the_permissions_of_any_new_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 2);
    let expected = 0o666 & !umask();
    for path in [
        checkpoint::model_path(tmp.path(), 2),
        checkpoint::optim_path(tmp.path(), 2),
        checkpoint::meta_path(tmp.path(), 2),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, expected, "{}: {mode:o}", path.display());
    }
}

#[test]
fn a_checkpoint_saved_before_checksums_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    save_example(tmp.path(), 4);
    edit_meta(tmp.path(), 4, |meta| {
        meta.as_object_mut().unwrap().remove("sha256");
    });
    let ckpt = checkpoint::load(tmp.path(), 4, &Device::Cpu, true, Some(FINGERPRINT)).unwrap();
    assert!(ckpt.meta.sha256.is_empty());
    assert!(!ckpt.model.is_empty() && !ckpt.optim.is_empty());
}

/// A base dir with a tokenizer and an SFT checkpoint `d1` at step 3 whose meta `edit` changes.
fn base_dir_with_model(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let base = tempfile::tempdir().unwrap();
    let docs = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer"];
    let tok = bpe::Tokenizer::train(docs, 300, bpe::DEFAULT_PATTERN).unwrap();
    tok.save(&base.path().join("tokenizer")).unwrap();
    let cfg = config(tok.vocab_size());
    let (model, _) = trained_state(&cfg);
    let dir = base.path().join("chatsft_checkpoints/d1");
    checkpoint::save(&dir, &model, None, &Meta::new(3, cfg, tok.fingerprint())).unwrap();
    edit_meta(&dir, 3, edit);
    base
}

/// Runs `nanochat chat -p hi` on `base` under an address-space limit; returns its stderr after
/// checking it failed, fast.
fn chat_fails(base: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nanochat"));
    command.args(["chat", "-p", "hi"]).env("NANOCHAT_BASE_DIR", base);
    // SAFETY: setrlimit is async-signal-safe and the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 2 << 30, rlim_max: 2 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "chat succeeded: {stderr}");
    assert_eq!(out.status.code(), Some(1), "it must fail with an error, not a signal: {stderr}");
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}: {stderr}", start.elapsed());
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn the_binary_refuses_huge_configs_fast_under_a_memory_limit() {
    for (field, value) in
        [("n_layer", 100_000_000u64), ("sequence_len", 1_000_000_000_000u64), ("n_head", 0), ("n_embd", 16384)]
    {
        let base = base_dir_with_model(|meta| meta["model_config"][field] = value.into());
        let stderr = chat_fails(base.path());
        assert!(stderr.contains(field) || stderr.contains("needs about"), "{field} = {value}: {stderr}");
        assert!(stderr.contains("meta_000003.json"), "{stderr}");
    }
    // in range, but more than the 2 GiB this process may map
    let base = base_dir_with_model(|meta| {
        meta["model_config"] = serde_json::json!({"sequence_len": 2048, "vocab_size": 65536, "n_layer": 8,
                                                  "n_head": 16, "n_kv_head": 16, "n_embd": 2048});
    });
    let stderr = chat_fails(base.path());
    assert!(stderr.contains("needs about"), "{stderr}");
}

#[test]
fn chat_on_a_damaged_checkpoint_gives_advice_for_chat() {
    let base = base_dir_with_model(|_| {});
    let file = checkpoint::model_path(&base.path().join("chatsft_checkpoints/d1"), 3);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&file, &bytes).unwrap();
    let stderr = chat_fails(base.path());
    assert!(stderr.contains("model_000003.safetensors") && stderr.contains("damaged"), "{stderr}");
    assert!(stderr.contains("--step"), "the advice names chat's flag: {stderr}");
    assert!(!stderr.contains("resume"), "training advice in chat: {stderr}");
}
