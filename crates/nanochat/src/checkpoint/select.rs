//! Choosing a checkpoint: which stage's directory (`--source`), which model in it (`--model-tag`,
//! by default the deepest `d<N>`, as the original picks), which step (`--step`, by default the
//! latest). One clap flag group, [`ModelArgs`], for every command that loads a trained model:
//! `chat`, `serve`, `chat eval`, `base eval` and the chat training stages.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Serialize;

use super::{latest_step, load, Checkpoint};
use crate::engine::Engine;
use crate::model::decode::WeightFormat;
use crate::model::GPT;

/// Which training stage's checkpoints to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Base,
    Mid,
    Sft,
    Rl,
}

impl Source {
    /// The stage's checkpoint directory under `$NANOCHAT_BASE_DIR`, named as in the original.
    pub fn checkpoints_dir(self) -> PathBuf {
        let name = match self {
            Source::Base => "base_checkpoints",
            Source::Mid => "mid_checkpoints",
            Source::Sft => "chatsft_checkpoints",
            Source::Rl => "chatrl_checkpoints",
        };
        crate::common::base_dir().join(name)
    }

    /// The command that writes this stage's checkpoints.
    pub fn train_command(self) -> &'static str {
        match self {
            Source::Base => "nanochat base train",
            Source::Mid => "nanochat mid train",
            Source::Sft => "nanochat sft train",
            Source::Rl => "nanochat rl train",
        }
    }
}

/// The flags that pick a trained model. The default stage depends on the command (`chat` and
/// `serve` talk to the SFT model, `sft train` starts from midtraining's, ...), so it is passed to
/// [`ModelArgs::locate`] rather than written here.
#[derive(clap::Args, Debug, Clone, Default, Serialize)]
pub struct ModelArgs {
    /// Which stage's model: base, mid, sft or rl [default: sft; a training stage starts from the
    /// stage before it].
    #[arg(short = 'i', long, value_enum)]
    pub source: Option<Source>,
    /// Model tag: the checkpoint directory's name, e.g. d20 [default: the deepest d<N> there, else
    /// the newest directory].
    #[arg(short = 'g', long)]
    pub model_tag: Option<String>,
    /// Checkpoint step [default: the latest].
    #[arg(short = 's', long)]
    pub step: Option<usize>,
}

/// A checkpoint picked by [`ModelArgs::locate`]: it exists (its meta does), nothing is loaded yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub source: Source,
    pub tag: String,
    pub dir: PathBuf,
    pub step: usize,
}

impl ModelArgs {
    /// The checkpoint these flags name, `default` being the stage when `--source` is not given.
    /// When there is none, the error says which command makes one.
    pub fn locate(&self, default: Source) -> Result<Located> {
        let source = self.source.unwrap_or(default);
        let root = source.checkpoints_dir();
        let hint = format!("run `{}` first", source.train_command());
        let tag = match &self.model_tag {
            Some(tag) => tag.clone(),
            None => default_model_tag(&root).with_context(|| format!("no {source:?} model to load: {hint}"))?,
        };
        let dir = root.join(&tag);
        let step = match self.step {
            Some(step) => step,
            None => latest_step(&dir)?
                .with_context(|| format!("no checkpoint in {}: {hint} (or pick another --model-tag)", dir.display()))?,
        };
        Ok(Located { source, tag, dir, step })
    }

    /// The checkpoint these flags name, loaded (weights only) and checked against `tokenizer`.
    pub fn load(&self, default: Source, tokenizer: &bpe::Tokenizer, device: &Device) -> Result<(Checkpoint, Located)> {
        let at = self.locate(default)?;
        let own = at.dir.join(crate::tokenizer::CHECKPOINT_TOKENIZER);
        if own.exists() && crate::tokenizer::for_checkpoint(&at.dir)?.fingerprint() != tokenizer.fingerprint() {
            bail!(
                "{} is an imported model with a tokenizer of its own ({}), not the project's: to train on from it, \
                 make it the project's tokenizer (copy that directory to {})",
                at.dir.display(),
                own.display(),
                crate::tokenizer::tokenizer_dir().display()
            );
        }
        let ckpt = load(&at.dir, at.step, device, false, Some(&tokenizer.fingerprint())).with_context(|| {
            format!(
                "loading the {} model {} at step {}: pick another step with --step, or make a new one with `{}`",
                format!("{:?}", at.source).to_lowercase(),
                at.tag,
                at.step,
                at.source.train_command()
            )
        })?;
        Ok((ckpt, at))
    }

    /// The model these flags name with its tokenizer (the project's, or the one an imported model
    /// carries), in an engine whose weights are in `weights`: f32 on the GPU when there is one;
    /// reduced precision exists only on the native CPU path, so for bf16 and int8 the checkpoint
    /// is loaded into host memory.
    pub fn load_engine(&self, default: Source, weights: WeightFormat) -> Result<Engine> {
        let tokenizer = crate::tokenizer::for_checkpoint(&self.locate(default)?.dir)?;
        let device = if weights == WeightFormat::F32 { Device::cuda_if_available(0)? } else { Device::Cpu };
        let (ckpt, _) = self.load(default, &tokenizer, &device)?;
        let model = GPT::new(&ckpt.meta.model_config, VarBuilder::from_tensors(ckpt.model, DType::F32, &device))?;
        Engine::with_weights(model, tokenizer, weights)
    }
}

/// The original's choice of model when none is named: the `d<N>` directory with the largest N,
/// else the most recently modified directory.
pub fn default_model_tag(root: &Path) -> Result<String> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("no checkpoints in {}: train that stage first or pick --source", root.display()))?;
    let mut tags = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", root.display()))?;
        if entry.file_type()?.is_dir() {
            let modified = entry.metadata()?.modified()?;
            tags.push((entry.file_name().to_string_lossy().into_owned(), modified));
        }
    }
    let depth = |tag: &str| tag.strip_prefix('d').and_then(|d| d.parse::<usize>().ok());
    if let Some((tag, _)) = tags.iter().filter_map(|(t, _)| depth(t).map(|d| (t, d))).max_by_key(|&(_, d)| d) {
        return Ok(tag.clone());
    }
    match tags.into_iter().max_by_key(|(_, modified)| *modified) {
        Some((tag, _)) => Ok(tag),
        None => bail!("no model directories in {}: train that stage first", root.display()),
    }
}
