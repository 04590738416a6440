//! Models in and out: `nanochat import` brings in models trained elsewhere, `nanochat export` hands
//! ours to Hugging Face transformers. No Python at run time.
//!
//! Design choices:
//! - What can be imported is the original's first architecture (v0, which transformers'
//!   `NanoChatForCausalLM` also implements): the original's own checkpoints (`model_<step>.pt` +
//!   `meta_<step>.json`, tokenizer `tokenizer.pkl` + `token_bytes.pt`, [`original`]), transformers
//!   directories ([`hf`]), and either from the Hugging Face hub ([`hub`]). A checkpoint of the
//!   original's newer architecture (value embeddings, sliding windows, smear, lambdas) is refused
//!   with what it has that is not supported, never loaded wrongly.
//! - Pickles are read as data by our own reader ([`pickle`]), which knows the few globals a state
//!   dict and a tiktoken encoding are made of and refuses any other: nothing is ever executed.
//! - Conventions are properties of the model, not guesses: transformers computes the rotary tables
//!   in fp32 where the original rounds them to bf16, so an imported transformers model records fp32
//!   tables in its config ([`crate::model::RotaryTables`]) and reproduces transformers' logits,
//!   while the original's checkpoints keep bf16 and reproduce the original's.
//! - An import becomes an ordinary checkpoint under `$NANOCHAT_BASE_DIR/<stage>_checkpoints/<tag>/`
//!   that `chat`, `serve` and the evals find, plus the tokenizer it came with (`<tag>/tokenizer/`),
//!   which those commands use for it ([`crate::tokenizer::for_checkpoint`]).
//! - Big models stream: every tensor is read, converted and written before the next one, so
//!   importing or exporting a 1.9 B-parameter model needs the memory of its largest tensor.
//! - Weights keep their precision unless asked otherwise (`--dtype`): the original saves bf16
//!   embeddings and fp32 blocks, which load as f32 (or stay bf16 in the serving formats).

pub mod export;
pub mod hf;
pub mod hub;
pub mod names;
pub mod original;
pub mod pickle;
pub mod tokenizer_json;
pub mod torch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::tensor_file::{self, Planned};
use crate::checkpoint::{self, Meta, Source};
use crate::model::decode::{bf16_from_f32, bf16_to_f32};
use crate::model::GPTConfig;

pub use export::{run_export, ExportArgs};

/// Where one weight's elements are in the files being imported.
#[derive(Clone)]
pub enum Location {
    /// A tensor of `Sources::torch[file]`.
    Torch { file: usize, tensor: torch::TorchTensor },
    /// A tensor of `Sources::safetensors[file]`.
    Safetensors { file: usize, entry: tensor_file::Entry },
}

/// One weight to import: our name and shape, its element type at the source, where it is. A
/// source may hold more rows (the original pads its vocabulary to a multiple of 64; those rows
/// are never used): the first `rows` are taken.
pub struct Weight {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub at: Location,
}

/// The open files the weights are read from.
#[derive(Default)]
pub struct Sources {
    pub torch: Vec<torch::TorchFile>,
    pub safetensors: Vec<tensor_file::Reader>,
}

impl Sources {
    /// The first `rows × cols` elements of `w`, little-endian in `w.dtype`.
    fn read(&mut self, w: &Weight) -> Result<Vec<u8>> {
        let mut bytes = match &w.at {
            Location::Torch { file, tensor } => self.torch[*file].read(tensor)?,
            Location::Safetensors { file, entry } => self.safetensors[*file].bytes(entry)?,
        };
        let want = w.rows * w.cols * w.dtype.size_in_bytes();
        ensure!(bytes.len() >= want, "{}: {} bytes where {want} were expected", w.name, bytes.len());
        bytes.truncate(want);
        Ok(bytes)
    }
}

/// A model ready to be written as a nanochat checkpoint.
pub struct Plan {
    pub config: GPTConfig,
    pub tokenizer: bpe::Tokenizer,
    /// The step it is filed under (the original's step; 0 for transformers models).
    pub step: usize,
    /// The stage it came from, when the source says (the original's directory names).
    pub stage: Option<Source>,
    /// What it was, recorded in the meta's `run_config`.
    pub provenance: serde_json::Value,
    /// In the model's parameter order.
    pub weights: Vec<Weight>,
    pub sources: Sources,
}

/// Longest context an imported model may claim: the rotary tables cover 10× it, and nothing in the
/// weights bounds it (the original's models use 2,048).
const MAX_SEQUENCE_LEN: usize = 1 << 16;

/// A config the model can run with, and whose context does not ask for unbounded tables.
fn check_config(config: &GPTConfig) -> Result<()> {
    config.validate()?;
    ensure!(
        config.sequence_len > 0 && config.sequence_len <= MAX_SEQUENCE_LEN,
        "a context of {} tokens: expected 1 to {MAX_SEQUENCE_LEN}",
        config.sequence_len
    );
    Ok(())
}

/// Building a tokenizer looks up every split of every token (work quadratic in a token's length):
/// real vocabularies cost a few million steps, a hostile one of huge tokens could cost years.
const MAX_VOCAB_WORK: u64 = 1 << 30;

/// The tokenizer of `tokens` (by id) and split `pattern`, read from another format.
fn tokenizer_from_parts(tokens: Vec<Vec<u8>>, pattern: &str) -> Result<bpe::Tokenizer> {
    let work: u64 = tokens.iter().map(|t| (t.len() as u64).pow(2)).sum();
    ensure!(work <= MAX_VOCAB_WORK, "its tokens are far longer than any real vocabulary's ({work} split steps)");
    Ok(bpe::Tokenizer::from_tokens(tokens, pattern)?)
}

/// The precision an import stores weights in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// As they come (f16 and f64 become f32).
    Keep,
    /// Full precision, 4 bytes a weight.
    F32,
    /// Rounded to bfloat16 (nearest even), 2 bytes a weight; loads as f32.
    Bf16,
}

/// The values of little-endian `bytes` of `dtype`, as f32.
pub fn to_f32(bytes: &[u8], dtype: DType) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        DType::F16 | DType::F64 => {
            let n = bytes.len() / dtype.size_in_bytes();
            Tensor::from_raw_buffer(bytes, dtype, &[n], &Device::Cpu)?.to_dtype(DType::F32)?.to_vec1::<f32>()?
        }
        other => bail!("weights of type {other:?} are not floating point"),
    })
}

/// `values` as little-endian bytes of `dtype` (f32, or bf16 rounded to nearest even like torch).
pub fn from_f32(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|&v| bf16_from_f32(v).to_le_bytes()).collect(),
        other => bail!("cannot store weights as {other:?}"),
    })
}

fn stored_dtype(source: DType, choice: StoreDtype) -> DType {
    match (choice, source) {
        (StoreDtype::F32, _) => DType::F32,
        (StoreDtype::Bf16, _) => DType::BF16,
        (StoreDtype::Keep, DType::BF16) => DType::BF16,
        (StoreDtype::Keep, _) => DType::F32,
    }
}

/// Writes `plan` as a nanochat checkpoint into `dir`: the weights (streamed, one tensor at a
/// time), the tokenizer it came with, then the meta, which makes the checkpoint complete.
pub fn write_checkpoint(mut plan: Plan, dir: &Path, dtype: StoreDtype) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let planned: Vec<Planned> = plan
        .weights
        .iter()
        .map(|w| Planned { name: w.name.clone(), dtype: stored_dtype(w.dtype, dtype), shape: vec![w.rows, w.cols] })
        .collect();
    let model_path = checkpoint::model_path(dir, plan.step);
    let mut writer = tensor_file::Writer::create(&model_path, planned.clone(), &BTreeMap::new())?;
    let bar = crate::common::progress_bar(plan.weights.len() as u64, "import");
    for (w, p) in plan.weights.iter().zip(&planned) {
        bar.set_message(w.name.clone());
        let bytes = plan.sources.read(w).with_context(|| format!("reading {}", w.name))?;
        let bytes = if p.dtype == w.dtype { bytes } else { from_f32(&to_f32(&bytes, w.dtype)?, p.dtype)? };
        writer.write(&bytes)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let size = writer.finish()?;
    let tok_dir = dir.join(crate::tokenizer::CHECKPOINT_TOKENIZER);
    plan.tokenizer.save(&tok_dir).with_context(|| format!("saving the tokenizer into {}", tok_dir.display()))?;
    let mut meta = Meta::new(plan.step, plan.config.clone(), plan.tokenizer.fingerprint());
    meta.run_config = plan.provenance;
    meta.files.insert(file_name(&model_path), size);
    let json = serde_json::to_vec_pretty(&meta)?;
    crate::common::write_atomic(&checkpoint::meta_path(dir, plan.step), &json)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `nanochat import`.
#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// What to import: a checkpoint directory of the original nanochat (model_<step>.pt and
    /// meta_<step>.json) or one such model_<step>.pt; a Hugging Face transformers directory of a
    /// NanoChatForCausalLM (config.json, model.safetensors or its shards, tokenizer.json); or
    /// hf:OWNER/REPO[@REVISION] to download either kind from the Hugging Face hub (HF_ENDPOINT and
    /// HF_TOKEN are honoured).
    pub src: String,
    /// The stage to file it under, which decides which commands find it by default: base, mid, sft
    /// or rl [default: the original's directory name says (base_checkpoints, ...), else sft].
    #[arg(short = 'i', long, value_enum)]
    pub source: Option<Source>,
    /// Its model tag, the directory name under the stage's checkpoints [default: the repository's
    /// or directory's name (an original checkpoint directory is named d<depth>), else d<depth>].
    #[arg(short = 'g', long)]
    pub model_tag: Option<String>,
    /// Which step of an original checkpoint directory [default: the latest].
    #[arg(short = 's', long)]
    pub step: Option<usize>,
    /// The original's tokenizer directory (tokenizer.pkl, token_bytes.pt) [default: the
    /// checkpoint's own directory, else ../../tokenizer from it, as the original lays them out].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The precision to store the weights in: keep (as they come: the original's are bf16
    /// embeddings and f32 blocks), f32 or bf16.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: StoreDtype,
    /// Replace a model already filed under that stage and tag.
    #[arg(long)]
    pub force: bool,
}

/// A model tag is one plain directory name.
fn is_plain_tag(tag: &str) -> bool {
    !tag.is_empty() && !tag.starts_with('.') && tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The tag an import gets unless told: the name it had (the hub repository's, or the directory's),
/// so that it does not take the place of a model of the same depth trained here.
fn default_tag(src: &str, config: &GPTConfig) -> String {
    let name = match src.strip_prefix("hf:") {
        Some(repo) => repo.split('@').next().and_then(|r| r.rsplit('/').next()).map(str::to_string),
        None => {
            let path = Path::new(src);
            let dir = if path.is_file() { path.parent() } else { Some(path) };
            dir.and_then(|d| std::fs::canonicalize(d).ok())
                .and_then(|d| Some(d.file_name()?.to_string_lossy().into_owned()))
        }
    };
    name.filter(|n| is_plain_tag(n)).unwrap_or_else(|| format!("d{}", config.n_layer))
}

/// The plan for a local source: a transformers directory, an original checkpoint directory, or
/// one model_<step>.pt file.
pub fn plan_local(src: &Path, step: Option<usize>, tokenizer: Option<&Path>) -> Result<Plan> {
    if src.is_file() {
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let file_step = name.strip_prefix("model_").and_then(|s| s.strip_suffix(".pt")).and_then(|s| s.parse().ok());
        let Some(file_step) = file_step else {
            bail!("{}: import a directory, or an original checkpoint file named model_<step>.pt", src.display());
        };
        ensure!(step.is_none_or(|s| s == file_step), "--step {step:?} names another step than {}", src.display());
        let dir = src.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return original::plan(dir, Some(file_step), tokenizer);
    }
    ensure!(
        src.is_dir(),
        "{} does not exist: give a model directory, a model_<step>.pt or hf:OWNER/REPO",
        src.display()
    );
    if src.join("config.json").is_file() {
        return hf::plan(src);
    }
    original::plan(src, step, tokenizer)
}

/// `nanochat import SRC`: reads the model, writes it as a checkpoint, says how to use it.
pub fn run_import(args: ImportArgs) -> Result<()> {
    let plan = match args.src.strip_prefix("hf:") {
        Some(repo) => {
            let local = hub::fetch(&hub::RepoRef::parse(repo)?, &hub::Hub::from_env())?;
            plan_local(&local, args.step, args.tokenizer.as_deref())?
        }
        None => plan_local(Path::new(&args.src), args.step, args.tokenizer.as_deref())?,
    };
    let stage = args.source.or(plan.stage).unwrap_or(Source::Sft);
    let tag = args.model_tag.clone().unwrap_or_else(|| default_tag(&args.src, &plan.config));
    ensure!(is_plain_tag(&tag), "model tag {tag:?}: use letters, digits, '-', '_' and '.' only (it names a directory)");
    let dir = stage.checkpoints_dir().join(&tag);
    if checkpoint::latest_step(&dir)?.is_some() || dir.join(crate::tokenizer::CHECKPOINT_TOKENIZER).exists() {
        ensure!(
            args.force,
            "{} already holds a model: pick another --model-tag, or --force to replace it",
            dir.display()
        );
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let (config, step) = (plan.config.clone(), plan.step);
    let params = config.num_params();
    write_checkpoint(plan, &dir, args.dtype)?;
    let source = format!("{stage:?}").to_lowercase();
    println!(
        "imported {} ({:.1} M parameters, depth {}, vocabulary {}) as the {source} model {tag}, step {step}, in {}",
        args.src,
        params as f64 / 1e6,
        config.n_layer,
        config.vocab_size,
        dir.display()
    );
    println!("talk to it:  nanochat chat -i {source} -g {tag}");
    println!("serve it:    nanochat serve -i {source} -g {tag}");
    Ok(())
}
