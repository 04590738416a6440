//! Training checkpoints on disk: what a run needs to continue exactly, and what inference needs;
//! `select` picks one by stage, tag and step for the commands that load a trained model.
//!
//! A checkpoint at step N is three files in one directory:
//! - `model_{N:06}.safetensors`: the parameters under the original's names (all inference needs);
//! - `optim_{N:06}.safetensors`: the optimizers' state (`adamw.*`, `muon.*`), only for resuming;
//! - `meta_{N:06}.json`: format name and version, model config, step, loop state, data-loader
//!   state, tokenizer fingerprint, the run's options, and the byte size and SHA-256 of every
//!   tensor file (`sha256sum` checks them by hand).
//!
//! A run of several processes, whose optimizer state is sharded (each rank keeps its own
//! parameters'), writes `optim_{N:06}_rank{r}.safetensors` instead of the optimizer file, each rank
//! r its own (the original's layout); the meta lists them all, and loading reads their union, so
//! such a checkpoint resumes under any number of processes that the stage allows.
//!
//! Every file is written to a temporary name and renamed into place, and the meta goes last, so a
//! checkpoint is complete if and only if its meta exists: a crash mid-save leaves at worst an
//! orphan tensor file that the next save overwrites. Files get the permissions of any file the
//! user creates (the umask's), not a temporary file's 0600.
//!
//! Loading trusts nothing it reads: the meta's model config must be in range (checked before
//! anything is sized from it) and fit in the memory this process may use; every tensor file must
//! have its recorded size and SHA-256 (checkpoints saved before checksums load with a note);
//! tensors must be the config's, every value finite; optimizer state must be complete (checked
//! by the optimizers when they load it). Errors say what is wrong with which file, and leave the
//! advice on what to do to the command (another `--step`, another `--resume-from-step`).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod select;
pub mod tensor_file;

pub use select::{default_model_tag, Located, ModelArgs, Source};

use crate::common::{base_dir, write_atomic};
use crate::data::loader::LoaderState;
use crate::model::{GPTConfig, GPT};

/// Written into every meta file; anything else is not a nanochat checkpoint.
pub const FORMAT_NAME: &str = "nanochat-checkpoint";
/// Bumped whenever the meta or tensor layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// `$NANOCHAT_BASE_DIR/base_checkpoints/<tag>`, the tag being `--model-tag` or `d{depth}`.
pub fn base_checkpoint_dir(model_tag: Option<&str>, depth: usize) -> PathBuf {
    let tag = model_tag.map_or_else(|| format!("d{depth}"), str::to_string);
    base_dir().join("base_checkpoints").join(tag)
}

pub fn model_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("model_{step:06}.safetensors"))
}

pub fn optim_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("optim_{step:06}.safetensors"))
}

/// Rank `rank`'s shard of the optimizer state of a checkpoint of several processes.
pub fn optim_shard_path(dir: &Path, step: usize, rank: usize) -> PathBuf {
    dir.join(format!("{}{rank}.safetensors", optim_shard_prefix(step)))
}

fn optim_shard_prefix(step: usize) -> String {
    format!("optim_{step:06}_rank")
}

pub fn meta_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("meta_{step:06}.json"))
}

/// The training loop's own state besides model, optimizer and data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// The loss EMA before debiasing (the debiasing factor depends on the step only).
    pub smooth_train_loss: f64,
    /// Wall-clock seconds spent in training steps so far.
    pub total_training_time: f64,
    /// The last validation bits per byte, if any was computed.
    pub val_bpb: Option<f64>,
    pub min_val_bpb: Option<f64>,
}

/// The contents of `meta_{step}.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// Optimizer steps completed; training resumes at this step.
    pub step: usize,
    pub model_config: GPTConfig,
    pub tokenizer_fingerprint: String,
    pub loop_state: LoopState,
    /// Where the data loader continues; `None` for checkpoints not made by a training run.
    pub loader_state: Option<LoaderState>,
    /// The options of the run that wrote it, for the record.
    pub run_config: serde_json::Value,
    /// Byte size of each tensor file, by file name.
    pub files: BTreeMap<String, u64>,
    /// SHA-256 (hex) of each tensor file, by file name; empty in checkpoints saved before
    /// checksums were recorded.
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

impl Meta {
    /// A meta for the current format; `files` is filled in by [`save`].
    pub fn new(step: usize, model_config: GPTConfig, tokenizer_fingerprint: String) -> Meta {
        Meta {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            step,
            model_config,
            tokenizer_fingerprint,
            loop_state: LoopState::default(),
            loader_state: None,
            run_config: serde_json::Value::Null,
            files: BTreeMap::new(),
            sha256: BTreeMap::new(),
        }
    }
}

/// A loaded checkpoint. `optim` is empty unless it was asked for.
pub struct Checkpoint {
    pub meta: Meta,
    pub model: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
}

/// The parameters of a VarMap as plain tensors, by name.
pub fn varmap_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("VarMap lock poisoned: {e}"))?;
    Ok(data.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect())
}

/// Writes the checkpoint of `meta.step` into `dir` (created if needed): model, optimizer state
/// (skipped when `optim` is `None`), then the meta.
pub fn save(
    dir: &Path,
    model: &HashMap<String, Tensor>,
    optim: Option<&HashMap<String, Tensor>>,
    meta: &Meta,
) -> Result<()> {
    write_checkpoint(dir, model, optim, &[], meta)
}

/// A tensor file as the meta records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// Writes one rank's shard of the optimizer state of the checkpoint of `step` into `dir` (created
/// if needed); returns its record, which [`save_sharded`] puts in the meta.
pub fn save_optim_shard(dir: &Path, step: usize, rank: usize, optim: &HashMap<String, Tensor>) -> Result<FileRecord> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    save_tensors_atomic(&optim_shard_path(dir, step, rank), optim)
}

/// [`save`] for a run of several processes: the model, then the meta, which lists `shards`, every
/// rank's optimizer file as [`save_optim_shard`] wrote it. Call it once all are written.
pub fn save_sharded(dir: &Path, model: &HashMap<String, Tensor>, shards: &[FileRecord], meta: &Meta) -> Result<()> {
    write_checkpoint(dir, model, None, shards, meta)
}

/// The model, the optimizer state when given, then the meta listing them and `shards`.
fn write_checkpoint(
    dir: &Path,
    model: &HashMap<String, Tensor>,
    optim: Option<&HashMap<String, Tensor>>,
    shards: &[FileRecord],
    meta: &Meta,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    let step = meta.step;
    let mut records = shards.to_vec();
    records.push(save_tensors_atomic(&model_path(dir, step), model)?);
    if let Some(optim) = optim {
        records.push(save_tensors_atomic(&optim_path(dir, step), optim)?);
    }
    let mut meta = meta.clone();
    meta.files = records.iter().map(|r| (r.name.clone(), r.size)).collect();
    meta.sha256 = records.into_iter().map(|r| (r.name, r.sha256)).collect();
    let json = serde_json::to_vec_pretty(&meta).context("serializing checkpoint meta")?;
    write_atomic(&meta_path(dir, step), &json)
}

/// Saves `tensors` as safetensors at `path` via a temporary file and a rename, with the
/// permissions of a new file (the safetensors writer leaves 0600); returns its record.
fn save_tensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<FileRecord> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let result = (|| -> Result<FileRecord> {
        candle_core::safetensors::save(tensors, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666 & !umask()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&tmp)?;
        file.sync_all()?;
        // read back (from the page cache): the digest is of the bytes on disk
        let (size, sha256) = digest_file(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok(FileRecord { name: file_name(path), size, sha256 })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// This process's umask, read without changing it (Linux reports it in /proc; 022 otherwise).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = status.lines().find_map(|l| l.strip_prefix("Umask:"));
    field.and_then(|v| u32::from_str_radix(v.trim(), 8).ok()).unwrap_or(0o022)
}

/// The size and SHA-256 (hex) of a file, read in 1 MiB blocks.
fn digest_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let (mut hasher, mut size) = (Sha256::new(), 0u64);
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&block[..n]);
        size += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The highest step with a complete checkpoint (its meta) in `dir`; `None` if there is none.
pub fn latest_step(dir: &Path) -> Result<Option<usize>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing checkpoints in {}", dir.display())),
    };
    let mut latest = None;
    for entry in entries {
        let name = entry.with_context(|| format!("listing {}", dir.display()))?.file_name();
        let name = name.to_string_lossy();
        let step = name.strip_prefix("meta_").and_then(|s| s.strip_suffix(".json")).and_then(|s| s.parse().ok());
        latest = latest.max(step);
    }
    Ok(latest)
}

/// Reads and checks the meta of `step`: it must exist, parse, and be of this format and version.
pub fn load_meta(dir: &Path, step: usize) -> Result<Meta> {
    let path = meta_path(dir, step);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = match latest_step(dir) {
                Ok(Some(latest)) => format!("the latest complete checkpoint there is step {latest}"),
                _ => "there is no complete checkpoint there".to_string(),
            };
            bail!("no checkpoint for step {step} in {} ({} is missing); {hint}", dir.display(), path.display());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not valid JSON: the checkpoint is damaged", path.display()))?;
    let format = value.get("format").and_then(|v| v.as_str()).unwrap_or_default();
    if format != FORMAT_NAME {
        bail!("{} is not a nanochat checkpoint meta (format {format:?})", path.display());
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or_default();
    if version != u64::from(FORMAT_VERSION) {
        bail!(
            "{} has checkpoint format version {version}, but this nanochat reads version {FORMAT_VERSION}: use the \
             nanochat release that wrote it",
            path.display()
        );
    }
    let meta: Meta = serde_json::from_value(value)
        .with_context(|| format!("{} is missing fields or has wrong types (corrupt checkpoint)", path.display()))?;
    if meta.step != step {
        bail!("{} says it is step {}, not {step}: the file was renamed or copied wrongly", path.display(), meta.step);
    }
    // before anything is sized from it
    meta.model_config.validate().map_err(|e| {
        anyhow::anyhow!("{}: the model config is impossible ({e}): the meta is corrupt", path.display())
    })?;
    Ok(meta)
}

/// Refuses a model that cannot fit: loading holds the tensor file's bytes and the tensors made
/// from them, plus the model's tables.
fn check_memory(meta: &Meta, path: &Path) -> Result<()> {
    let config = &meta.model_config;
    let weights = 4 * config.num_params() as u64;
    let needed = weights + config.memory_bytes();
    let Some((available, what)) = memory_budget() else { return Ok(()) };
    if needed > available {
        bail!(
            "{}: the model (n_layer {}, n_embd {}, vocab_size {}, sequence_len {}) needs about {:.1} GB to load, but {} \
             is {:.1} GB: the meta is corrupt, or the model is for a bigger machine",
            path.display(),
            config.n_layer,
            config.n_embd,
            config.vocab_size,
            config.sequence_len,
            needed as f64 / 1e9,
            what,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// What this process may still allocate, and where that limit comes from: the smallest of the
/// machine's available memory, the address-space limit and the cgroup's memory limit.
fn memory_budget() -> Option<(u64, &'static str)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find_map(|l| l.strip_prefix(key))?;
        Some(line.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
    };
    let mut budget = (kib("MemAvailable:")?, "the memory available on this machine");
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: limit is a valid rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0 && limit.rlim_cur != libc::RLIM_INFINITY {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mapped = status.lines().find_map(|l| l.strip_prefix("VmSize:"));
        let mapped = mapped.and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0);
        budget = budget.min((limit.rlim_cur.saturating_sub(mapped * 1024), "what the address-space limit leaves"));
    }
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    if let Some(cgroup) = cgroup {
        budget = budget.min((cgroup, "the cgroup's memory limit"));
    }
    Some(budget)
}

/// Loads the checkpoint of `step` from `dir`, checking its files against the meta, its tensors
/// against the model config, and, when `tokenizer_fingerprint` is given, its tokenizer.
pub fn load(
    dir: &Path,
    step: usize,
    device: &Device,
    with_optim: bool,
    tokenizer_fingerprint: Option<&str>,
) -> Result<Checkpoint> {
    let meta = load_meta(dir, step)?;
    check_memory(&meta, &meta_path(dir, step))?;
    if let Some(current) = tokenizer_fingerprint {
        if current != meta.tokenizer_fingerprint {
            bail!(
                "checkpoint step {step} in {} was trained with tokenizer {} but the current tokenizer is {current}: \
                 restore the tokenizer it was trained with ($NANOCHAT_BASE_DIR/tokenizer) or train a new model",
                dir.display(),
                meta.tokenizer_fingerprint
            );
        }
    }
    let model = read_tensors(&model_path(dir, step), &meta, device)?;
    check_model_tensors(&model, &meta.model_config, &model_path(dir, step))?;
    check_finite(&model, &model_path(dir, step))?;
    let optim = if with_optim { read_optim(dir, &meta, device)? } else { HashMap::new() };
    Ok(Checkpoint { meta, model, optim })
}

/// The optimizer state of a checkpoint: its optimizer file, or the union of its ranks' shards.
fn read_optim(dir: &Path, meta: &Meta, device: &Device) -> Result<HashMap<String, Tensor>> {
    let prefix = optim_shard_prefix(meta.step);
    let shards: Vec<&String> = meta.files.keys().filter(|name| name.starts_with(&prefix)).collect();
    if shards.is_empty() {
        let state = read_tensors(&optim_path(dir, meta.step), meta, device)?;
        check_finite(&state, &optim_path(dir, meta.step))?;
        return Ok(state);
    }
    let mut state = HashMap::new();
    for name in shards {
        let shard = read_tensors(&dir.join(name), meta, device)?;
        check_finite(&shard, &dir.join(name))?;
        for (key, tensor) in shard {
            if state.insert(key.clone(), tensor).is_some() {
                bail!(
                    "{key} is in two optimizer shards of step {} in {} (corrupt checkpoint)",
                    meta.step,
                    dir.display()
                );
            }
        }
    }
    Ok(state)
}

/// Reads one tensor file, after [`verify_file`], a tensor at a time (a big model is never in
/// memory twice); f16 and bf16 tensors (imported models keep the precision they came in) are
/// widened to f32.
fn read_tensors(path: &Path, meta: &Meta, device: &Device) -> Result<HashMap<String, Tensor>> {
    verify_file(path, meta)?;
    let expected = meta.files.get(&file_name(path)).copied();
    let mut reader = tensor_file::Reader::open(path, expected)
        .with_context(|| format!("{} is not a valid safetensors file (corrupt checkpoint)", path.display()))?;
    reader.load_all(device, true)
}

/// Checks that a tensor file the meta lists exists with its recorded size and SHA-256.
fn verify_file(path: &Path, meta: &Meta) -> Result<()> {
    let name = file_name(path);
    let Some(&expected) = meta.files.get(&name) else {
        bail!("the checkpoint meta of step {} lists no {name}: it was saved without it", meta.step);
    };
    let (size, sha256) = match digest_file(path) {
        Ok(digest) => digest,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} is missing: the checkpoint of step {} is incomplete", path.display(), meta.step)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if size != expected {
        bail!(
            "{} is {size} bytes but the checkpoint recorded {expected}: the file is truncated or was replaced",
            path.display()
        );
    }
    match meta.sha256.get(&name) {
        Some(recorded) if *recorded != sha256 => bail!(
            "{} is damaged: its SHA-256 is {sha256}, but the checkpoint recorded {recorded} when it was saved",
            path.display()
        ),
        Some(_) => {}
        None => eprintln!(
            "note: {} has no recorded checksum (saved by an older nanochat): loaded without verifying its bytes",
            path.display()
        ),
    }
    Ok(())
}

/// Every floating-point value must be finite: a NaN or infinity in weights or optimizer state is
/// damage, never something to train on or sample from.
fn check_finite(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        // x - x is 0 for every finite x and NaN otherwise, so the sum is 0 exactly when all are finite
        let sum = t.sub(t)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if sum != 0.0 {
            bail!("{}: tensor {name} holds NaN or infinite values: the checkpoint is damaged", path.display());
        }
    }
    Ok(())
}

/// Every parameter of `config`'s table must be present with its shape and f32; nothing else may be.
fn check_model_tensors(tensors: &HashMap<String, Tensor>, config: &GPTConfig, path: &Path) -> Result<()> {
    let params = config.params();
    for spec in &params {
        let (name, shape) = (&spec.name, &spec.shape);
        let Some(t) = tensors.get(name) else {
            bail!(
                "{} has no tensor {name}: it does not match the model config in its meta ({config:?})",
                path.display()
            );
        };
        if t.dims() != shape.as_slice() || t.dtype() != DType::F32 {
            bail!(
                "{}: tensor {name} is {:?} {:?}, but the model config needs F32 {shape:?}",
                path.display(),
                t.dtype(),
                t.dims()
            );
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !params.iter().any(|s| &s.name == *k)) {
        bail!("{} has an unexpected tensor {extra}: not a checkpoint of this model", path.display());
    }
    Ok(())
}

/// A trainable model over the checkpoint's weights, with the VarMap that owns them.
pub fn model_from_checkpoint(ckpt: &Checkpoint, device: &Device) -> Result<(GPT, VarMap)> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|e| anyhow::anyhow!("VarMap lock poisoned: {e}"))?;
        for (name, tensor) in &ckpt.model {
            data.insert(name.clone(), Var::from_tensor(&tensor.to_device(device)?)?);
        }
    }
    let model = GPT::new(&ckpt.meta.model_config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    Ok((model, varmap))
}
