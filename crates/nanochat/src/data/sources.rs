//! Where every stage's data comes from online: the original's sources, at the URLs it uses, and
//! where each file lands in `$NANOCHAT_BASE_DIR` (its cache). A stage fetches what it needs on
//! first use ([`Online::fetch`]); `speedrun --dry-run` lists it ([`Online::file`], [`probe`]).
//!
//! | data | source | in the cache |
//! |---|---|---|
//! | pretraining shards | `karpathy/fineweb-edu-100b-shuffle` (the original's v0): `shard_{00000..01822}.parquet` | `base_data/` |
//! | CORE eval bundle | `https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip` | `eval_bundle/` |
//! | SmolTalk | `HuggingFaceTB/smol-smoltalk`: `data/train-0000{0..3}-of-00004.parquet`, `data/test-00000-of-00001.parquet` | `task_data/` |
//! | MMLU | `cais/mmlu`, config `all`: `all/{auxiliary_train,dev,validation,test}-00000-of-00001.parquet` | `task_data/` |
//! | ARC | `allenai/ai2_arc`: `ARC-{Easy,Challenge}/{train,validation,test}-00000-of-00001.parquet` | `task_data/` |
//! | GSM8K | `openai/gsm8k`, config `main`: `main/{train,test}-00000-of-00001.parquet` | `task_data/` |
//! | HumanEval | `openai/openai_humaneval`: `openai_humaneval/test-00000-of-00001.parquet` | `task_data/` |
//! | identity conversations | `https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl` | `identity_conversations.jsonl` |
//! | SpellingBee words | `https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt` | `words_alpha.txt` |
//!
//! The Hugging Face files are the datasets' own parquet files on their `main` branch (what the
//! hub's parquet listing of each config and split returns, which the original reads), fetched as
//! `{HF_ENDPOINT}/datasets/{repo}/resolve/main/{path}`: `HF_ENDPOINT` points at a mirror of the hub
//! (the hub's own convention), `HF_TOKEN` is sent as a bearer token, and the SHA-256 the hub
//! publishes for each file is checked. Each other source has its own override of its URL
//! (`NANOCHAT_DATA_URL` for the shards' folder, `NANOCHAT_EVAL_BUNDLE_URL`, `NANOCHAT_IDENTITY_URL`,
//! `NANOCHAT_WORDS_URL`). The environment is read once, at the command line ([`Endpoints::from_env`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::dataset::{shard_name, Shard};
use super::download::{fetch_file, fetch_unpacked, http_agent, probe_agent, probe_size, Hub, Request};

/// The hub, unless `HF_ENDPOINT` says otherwise.
pub const HF_ENDPOINT: &str = "https://huggingface.co";
/// The original's (v0) pretraining data: FineWeb-Edu, 100 B tokens, pre-shuffled.
pub const PRETRAIN_REPO: &str = "karpathy/fineweb-edu-100b-shuffle";
/// Number of shards of [`PRETRAIN_REPO`] (`shard_00000` … `shard_01822`).
pub const PRETRAIN_NUM_SHARDS: usize = 1823;
/// Where the original downloads the CORE eval bundle from (`scripts/base_eval.py`).
pub const EVAL_BUNDLE_URL: &str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip";
/// The original's 1,000 synthetic identity conversations (`runs/speedrun.sh`).
pub const IDENTITY_URL: &str = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl";
/// The SpellingBee word list (`tasks/spellingbee.py`).
pub const WORDS_URL: &str = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt";

/// The URLs of the sources, and the hub's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The Hugging Face hub or a mirror of it, without a trailing slash.
    pub hf: String,
    /// Sent to the hub as `Authorization: Bearer …`.
    pub hf_token: Option<String>,
    /// The folder of the pretraining shards.
    pub pretrain: String,
    pub eval_bundle: String,
    pub identity: String,
    pub words: String,
}

impl Endpoints {
    /// The original's sources, with the hub at `hf`.
    pub fn with_hub(hf: &str) -> Endpoints {
        let hf = hf.trim_end_matches('/').to_string();
        Endpoints {
            pretrain: hub_url(&hf, PRETRAIN_REPO, ""),
            hf,
            hf_token: None,
            eval_bundle: EVAL_BUNDLE_URL.to_string(),
            identity: IDENTITY_URL.to_string(),
            words: WORDS_URL.to_string(),
        }
    }

    /// The sources as the environment sets them (see the module docs): read once, by a command.
    pub fn from_env() -> Endpoints {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut endpoints = Endpoints::with_hub(&var("HF_ENDPOINT").unwrap_or_else(|| HF_ENDPOINT.to_string()));
        endpoints.hf_token = var("HF_TOKEN");
        let overrides = [
            ("NANOCHAT_DATA_URL", &mut endpoints.pretrain),
            ("NANOCHAT_EVAL_BUNDLE_URL", &mut endpoints.eval_bundle),
            ("NANOCHAT_IDENTITY_URL", &mut endpoints.identity),
            ("NANOCHAT_WORDS_URL", &mut endpoints.words),
        ];
        for (name, url) in overrides {
            if let Some(value) = var(name) {
                *url = value;
            }
        }
        endpoints
    }

    /// How to talk to `url`'s server: as the hub (token, checksums) when the URL is a dataset
    /// file on it; the token goes nowhere else.
    pub fn hub_for(&self, url: &str) -> Option<Hub> {
        let on_hub = url.strip_prefix(&self.hf).is_some_and(|rest| rest.starts_with("/datasets/"));
        on_hub.then(|| Hub { token: self.hf_token.clone() })
    }
}

/// `{hf}/datasets/{repo}/resolve/main/{path}`: a file of a dataset repository on the hub.
fn hub_url(hf: &str, repo: &str, path: &str) -> String {
    format!("{hf}/datasets/{repo}/resolve/main/{path}").trim_end_matches('/').to_string()
}

/// One file of one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// Pretraining shard `i`.
    Shard(usize),
    /// The CORE eval bundle (a zip, unpacked as a directory).
    EvalBundle,
    /// A parquet file of a Hugging Face dataset repository.
    Hub { repo: &'static str, path: String },
    /// The original's identity conversations (JSON lines).
    Identity,
    /// The SpellingBee word list.
    Words,
}

/// `allenai/ai2_arc`, subset `ARC-Easy` or `ARC-Challenge`, split `train`, `validation` or `test`.
pub fn arc(subset: &str, split: &str) -> Dataset {
    Dataset::Hub { repo: "allenai/ai2_arc", path: format!("{subset}/{split}-00000-of-00001.parquet") }
}

/// `cais/mmlu`, config `all`, split `auxiliary_train`, `dev`, `validation` or `test`.
pub fn mmlu(split: &str) -> Dataset {
    Dataset::Hub { repo: "cais/mmlu", path: format!("all/{split}-00000-of-00001.parquet") }
}

/// `openai/gsm8k`, config `main`, split `train` or `test`.
pub fn gsm8k(split: &str) -> Dataset {
    Dataset::Hub { repo: "openai/gsm8k", path: format!("main/{split}-00000-of-00001.parquet") }
}

/// `openai/openai_humaneval`: its one split, `test`.
pub fn humaneval() -> Dataset {
    Dataset::Hub { repo: "openai/openai_humaneval", path: "openai_humaneval/test-00000-of-00001.parquet".into() }
}

/// `HuggingFaceTB/smol-smoltalk`, split `train` (four files, ~230 MB each) or `test` (one).
pub fn smoltalk(split: &str) -> Vec<Dataset> {
    let files = if split == "train" { 4 } else { 1 };
    (0..files)
        .map(|i| Dataset::Hub {
            repo: "HuggingFaceTB/smol-smoltalk",
            path: format!("data/{split}-{i:05}-of-{files:05}.parquet"),
        })
        .collect()
}

/// How a downloaded file is checked before it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A pretraining shard: parquet with a `text` column.
    Shard,
    /// Any parquet file: its footer parses.
    Parquet,
    /// A zip archive unpacked as a directory holding this file.
    Unpacked(&'static str),
    /// UTF-8 text, not empty.
    Text,
    /// JSON lines: every non-blank line is JSON.
    JsonLines,
}

/// A file to fetch: from where, to where, how to check it, and about how big it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    pub url: String,
    pub dest: PathBuf,
    pub check: Check,
    /// The size where the source's listing gives it (approximate), for a plan made offline.
    pub approx_bytes: Option<u64>,
}

impl RemoteFile {
    /// A pretraining shard of the folder at `base_url`, into `dir`.
    pub fn shard(base_url: &str, dir: &Path, index: usize) -> RemoteFile {
        let name = shard_name(index);
        RemoteFile {
            url: format!("{}/{name}", base_url.trim_end_matches('/')),
            dest: dir.join(name),
            check: Check::Shard,
            // "each shard is ~100MB of text (compressed)" (the original's speedrun.sh)
            approx_bytes: Some(100_000_000),
        }
    }

    /// Whether the file is in place and passes its check.
    pub fn is_present(&self) -> bool {
        match self.check {
            Check::Unpacked(marker) => self.dest.join(marker).is_file(),
            check => self.dest.is_file() && validate(check, &self.dest).is_ok(),
        }
    }
}

/// How hard to try a download: tries for errors that may pass, and the wait before the second
/// (doubled before each later one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { attempts: 5, backoff: Duration::from_secs(2) }
    }
}

/// The online sources with a cache: where a stage's data comes from when no mirror is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Online {
    /// `$NANOCHAT_BASE_DIR`: the files land under it, laid out as in the module docs.
    pub cache: PathBuf,
    pub endpoints: Endpoints,
    pub retry: Retry,
}

impl Online {
    /// The cache `$NANOCHAT_BASE_DIR` and the sources as the environment sets them.
    pub fn from_env() -> Online {
        Online { cache: crate::common::base_dir(), endpoints: Endpoints::from_env(), retry: Retry::default() }
    }

    /// Where `dataset` comes from and where it goes.
    pub fn file(&self, dataset: &Dataset) -> RemoteFile {
        let e = &self.endpoints;
        let (url, dest, check, approx_bytes) = match dataset {
            Dataset::Shard(i) => return RemoteFile::shard(&e.pretrain, &self.cache.join("base_data"), *i),
            // "~162MB" (the original's speedrun.sh)
            Dataset::EvalBundle => {
                (e.eval_bundle.clone(), self.cache.join("eval_bundle"), Check::Unpacked("core.yaml"), Some(162_000_000))
            }
            Dataset::Hub { repo, path } => (
                hub_url(&e.hf, repo, path),
                self.cache.join("task_data").join(repo.replace('/', "--")).join(path),
                Check::Parquet,
                approx_size(repo, path),
            ),
            Dataset::Identity => {
                (e.identity.clone(), self.cache.join("identity_conversations.jsonl"), Check::JsonLines, None)
            }
            // the list as the offline mirror holds it (370,099 words, CRLF line endings)
            Dataset::Words => (e.words.clone(), self.cache.join("words_alpha.txt"), Check::Text, Some(4_234_861)),
        };
        RemoteFile { url, dest, check, approx_bytes }
    }

    /// The local paths of `datasets`, each downloaded first if it is not in the cache yet.
    pub fn fetch(&self, datasets: &[Dataset]) -> Result<Vec<PathBuf>> {
        let files: Vec<RemoteFile> = datasets.iter().map(|d| self.file(d)).collect();
        fetch_all(&files, &self.endpoints, self.retry)?;
        Ok(files.into_iter().map(|f| f.dest).collect())
    }
}

/// The sizes the sources' listings give, approximately, for the plan of a run made offline (the
/// small files are left out: they do not matter to it).
fn approx_size(repo: &str, path: &str) -> Option<u64> {
    const MB: u64 = 1_000_000;
    match (repo, path) {
        // the hub's file listing: 230, 230, 231 and 232 MB, and 48.2 MB
        ("HuggingFaceTB/smol-smoltalk", p) if p.starts_with("data/train") => Some(231 * MB),
        ("HuggingFaceTB/smol-smoltalk", _) => Some(48 * MB),
        // the `all` config's download size (51.5 MB) less its evaluation splits
        ("cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet") => Some(47 * MB),
        _ => None,
    }
}

/// Downloads each file of `files` that is not in place yet, with a byte progress bar for each.
/// The error names the files that failed and what to do.
pub fn fetch_all(files: &[RemoteFile], endpoints: &Endpoints, retry: Retry) -> Result<()> {
    let agent = http_agent();
    for file in files.iter().filter(|f| !f.is_present()) {
        let name = file.dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        eprintln!("downloading {} to {}", file.url, file.dest.display());
        let bar = crate::common::progress_bar(0, "download");
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_message(name);
        let result = match file.check {
            Check::Unpacked(marker) => fetch_unpacked(&agent, &file.url, &file.dest, marker, Some(&bar), retry),
            check => {
                let hub = endpoints.hub_for(&file.url);
                let validate = |path: &Path| validate(check, path);
                let request = Request {
                    url: &file.url,
                    dest: &file.dest,
                    hub: hub.as_ref(),
                    attempts: retry.attempts,
                    backoff: retry.backoff,
                    validate: &validate,
                    progress: Some(&bar),
                };
                fetch_file(&agent, &request)
            }
        };
        bar.finish_and_clear();
        result.with_context(|| {
            format!(
                "downloading {} failed: run the command again to resume it; offline, pass --data-dir DIR \
                 (or set NANOCHAT_DATA_MIRROR) with a data mirror laid out like ../shared/data",
                file.dest.display()
            )
        })?;
    }
    Ok(())
}

/// Checks a downloaded file by its kind.
fn validate(check: Check, path: &Path) -> Result<()> {
    match check {
        Check::Shard => Shard::open(path).map(drop).context("the downloaded file is not a usable shard"),
        Check::Parquet => {
            let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            parquet::file::reader::SerializedFileReader::new(file)
                .map(drop)
                .context("the downloaded file is not a parquet file (truncated, or an error page?)")
        }
        Check::Unpacked(_) => Ok(()),
        Check::Text | Check::JsonLines => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let text = std::str::from_utf8(&bytes).context("the downloaded file is not UTF-8 text")?;
            anyhow::ensure!(!text.trim().is_empty(), "the downloaded file is empty");
            if check == Check::JsonLines {
                for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    serde_json::from_str::<serde_json::Value>(line)
                        .with_context(|| format!("line {} of the downloaded file is not JSON", i + 1))?;
                }
            }
            Ok(())
        }
    }
}

/// The size of each file for a plan: `Some` from its server (a HEAD request) or, when that cannot
/// be had, from [`RemoteFile::approx_bytes`] (flagged approximate); `None` when neither knows.
/// Servers that cannot be reached are asked once, so an offline plan does not wait on each file.
pub fn probe(files: &[RemoteFile], endpoints: &Endpoints) -> Vec<Size> {
    let agent = probe_agent();
    let mut unreachable: Vec<String> = Vec::new();
    files
        .iter()
        .map(|file| {
            let host = file.url.split('/').take(3).collect::<Vec<_>>().join("/");
            let asked = if unreachable.contains(&host) {
                None
            } else {
                match probe_size(&agent, &file.url, endpoints.hub_for(&file.url).as_ref()) {
                    Ok(size) => size,
                    Err(_) => {
                        unreachable.push(host);
                        None
                    }
                }
            };
            match (asked, file.approx_bytes) {
                (Some(n), _) => Size::Exact(n),
                (None, Some(n)) => Size::About(n),
                (None, None) => Size::Unknown,
            }
        })
        .collect()
}

/// A file's size in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Exact(u64),
    About(u64),
    Unknown,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Exact(n) => write!(f, "{}", human_bytes(*n)),
            Size::About(n) => write!(f, "~{}", human_bytes(*n)),
            Size::Unknown => write!(f, "size unknown"),
        }
    }
}

/// `1.2 GB`, `340 KB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    let units = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3)];
    units
        .iter()
        .find(|(_, scale)| n as f64 >= *scale)
        .map_or_else(|| format!("{n} B"), |(unit, scale)| format!("{:.1} {unit}", n as f64 / scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_urls_follow_the_hubs_layout_and_the_token_goes_to_the_hub_only() {
        let mut e = Endpoints::with_hub("http://mirror.example/");
        e.hf_token = Some("secret".into());
        let online = Online { cache: PathBuf::from("/cache"), endpoints: e.clone(), retry: Retry::default() };
        let f = online.file(&arc("ARC-Easy", "train"));
        assert_eq!(
            f.url,
            "http://mirror.example/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/train-00000-of-00001.parquet"
        );
        assert_eq!(f.dest, Path::new("/cache/task_data/allenai--ai2_arc/ARC-Easy/train-00000-of-00001.parquet"));
        let shard = online.file(&Dataset::Shard(7));
        assert_eq!(
            shard.url,
            "http://mirror.example/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00007.parquet"
        );
        assert_eq!(e.hub_for(&shard.url), Some(Hub { token: Some("secret".into()) }));
        assert_eq!(e.hub_for(&online.file(&Dataset::Words).url), None);
        assert_eq!(e.hub_for("http://mirror.example.evil/datasets/x"), None);
        assert_eq!(e.hub_for("http://mirror.example/words_alpha.txt"), None);
        assert_eq!(smoltalk("train").len(), 4);
        assert_eq!(human_bytes(1_234_000_000), "1.2 GB");
        assert_eq!(human_bytes(999), "999 B");
    }
}
