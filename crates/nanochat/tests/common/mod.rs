//! What the integration tests share: where the committed fixtures are (`tests/fixtures/`: the
//! original's parity fixtures and a small data mirror; the tokenizer they were made with lives in
//! the `bpe` crate), the fixture model, and the full offline data mirror for the few tests that need
//! all of it. Nothing here reads outside the repository unless `NANOCHAT_DATA_MIRROR` says so.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use nanochat::checkpoint::{self, Meta};
use nanochat::engine::Engine;
use nanochat::model::{GPTConfig, GPT};

/// `tests/fixtures/` of this crate.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A file of the parity fixtures computed by the original (`parity/model/...`, `parity/optim/...`,
/// `parity/calculator/...`, `parity/conversations.json`; see `tests/fixtures/README.md`).
pub fn parity(relative: &str) -> PathBuf {
    fixtures().join("parity").join(relative)
}

/// A file of the tokenizer fixtures (`mergeable_ranks.tiktoken`, ...), kept with the `bpe` crate.
pub fn tokenizer_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpe/tests/fixtures/tokenizer").join(name)
}

/// The small data mirror: laid out like the full one (`pretrain/gutenberg/`, `eval/`, `sft/`,
/// `words/`), with a handful of items per file.
pub fn data() -> PathBuf {
    fixtures().join("mirror")
}

/// The full offline data mirror named by `NANOCHAT_DATA_MIRROR`, or `None` after printing that
/// `test` skips its checks of it, and why. With `NANOCHAT_REQUIRE_MIRROR` set (as CI sets it where
/// the mirror exists), a missing mirror fails the test instead.
pub fn full_mirror(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("NANOCHAT_DATA_MIRROR").map(PathBuf::from);
    match dir {
        Some(dir) if dir.join("eval").is_dir() && dir.join("pretrain").is_dir() => Some(dir),
        _ => {
            let why = match &dir {
                Some(dir) => format!("NANOCHAT_DATA_MIRROR={} is not a data mirror", dir.display()),
                None => "NANOCHAT_DATA_MIRROR is not set".to_string(),
            };
            assert!(std::env::var_os("NANOCHAT_REQUIRE_MIRROR").is_none(), "NANOCHAT_REQUIRE_MIRROR is set but {why}");
            skipped(test, &format!("its checks of the full data mirror (laid out like ../shared/data): {why}"));
            None
        }
    }
}

/// Says that `test` (or a part of it) skipped and why, on the process's stderr: past the test
/// harness's capture, so that `cargo test` shows it for a passing test too.
pub fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "{test}: skipped, {why}");
}

/// The tokenizer the parity fixtures were made with (vocabulary 1024).
pub fn tokenizer() -> Result<bpe::Tokenizer> {
    let path = tokenizer_fixture("mergeable_ranks.tiktoken");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bpe::Tokenizer::from_tokens(bpe::format::parse_ranks(&text, &path)?, bpe::DEFAULT_PATTERN)?)
}

/// The fixture model's `GPTConfig`, as `parity/model/config.json` records it.
pub fn fixture_config() -> Result<GPTConfig> {
    let path = parity("model/config.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)?;
    Ok(serde_json::from_value(json["config"].clone())?)
}

/// The fixture model's weights, by the original's parameter names.
pub fn fixture_params() -> Result<HashMap<String, Tensor>> {
    let path = parity("model/params.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))
}

/// The engine over the fixture model and tokenizer.
pub fn fixture_engine() -> Result<Engine> {
    let vb = VarBuilder::from_tensors(fixture_params()?, DType::F32, &Device::Cpu);
    Engine::new(GPT::new(&fixture_config()?, vb)?, tokenizer()?)
}

/// The fixture tokenizer, and the fixture weights as checkpoint `<stage_dir>/d2` of step 5, under
/// `base` laid out as `$NANOCHAT_BASE_DIR`.
pub fn fixture_checkpoint(base: &Path, stage_dir: &str) -> Result<()> {
    let tok = tokenizer()?;
    tok.save(&base.join("tokenizer"))?;
    let meta = Meta::new(5, fixture_config()?, tok.fingerprint());
    checkpoint::save(&base.join(stage_dir).join("d2"), &fixture_params()?, None, &meta)?;
    Ok(())
}
