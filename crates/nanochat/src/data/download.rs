//! Fetching shards into the shard directory: over HTTP from the Hugging Face dataset (or any
//! server with the same file names), or from a local mirror by hard link or copy. The HTTP part
//! ([`fetch_file`]) also serves the other downloads, such as the CORE eval bundle.
//!
//! A shard only ever appears under its final name complete: downloads go to a hidden `.part`
//! file that is checked (length, parquet footer) before it is renamed, and removed on failure.
//! Shards already present with a valid footer are skipped, so an interrupted download resumes
//! by running the same command again.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::dataset::{list_shards, shard_name, Shard};
use crate::common::progress_bar;

/// The original's pretraining data: FineWeb-Edu 100B tokens, pre-shuffled, 1,823 shards.
pub const DEFAULT_BASE_URL: &str = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main";
/// Number of shards of the default dataset (`shard_00000` … `shard_01822`).
pub const DEFAULT_NUM_SHARDS: usize = 1823;

/// What to download and how hard to try.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    /// URL of the folder holding `shard_{:05}.parquet`.
    pub base_url: String,
    /// Shard indices to fetch.
    pub shards: Vec<usize>,
    /// Destination directory.
    pub dir: PathBuf,
    /// Parallel downloads.
    pub workers: usize,
    /// Tries per shard for errors that may pass (network errors, HTTP 5xx, 408, 429).
    pub attempts: u32,
    /// Wait before the second try; doubled before each later one.
    pub backoff: Duration,
}

/// Downloads the requested shards; returns how many were fetched (the rest were already there).
/// Every shard is attempted even if some fail; the error then names each failure.
pub fn download(opts: &DownloadOptions) -> Result<usize> {
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating shard directory {}", opts.dir.display()))?;
    let agent = http_agent();
    let bar = progress_bar(opts.shards.len() as u64, "download");
    let next = AtomicUsize::new(0);
    let fetched = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..opts.workers.clamp(1, opts.shards.len().max(1)) {
            scope.spawn(|| {
                while let Some(&index) = opts.shards.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let name = shard_name(index);
                    let dest = opts.dir.join(&name);
                    if !is_valid_shard(&dest) {
                        let url = format!("{}/{name}", opts.base_url.trim_end_matches('/'));
                        match fetch_file(&agent, &url, &dest, opts.attempts, opts.backoff, &check_shard) {
                            Ok(()) => {
                                fetched.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                if let Ok(mut f) = failures.lock() {
                                    f.push((index, format!("{e:#}")));
                                }
                            }
                        }
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if !failures.is_empty() {
        failures.sort();
        let lines: Vec<String> = failures.iter().map(|(_, e)| format!("  {e}")).collect();
        bail!(
            "{} of {} shards failed to download (those that did are in {}): run the command \
             again to retry, or check --base-url / NANOCHAT_DATA_URL\n{}",
            failures.len(),
            opts.shards.len(),
            opts.dir.display(),
            lines.join("\n")
        );
    }
    Ok(fetched.into_inner())
}

/// A shard counts as present when its parquet footer parses: a truncated file has no footer.
pub fn is_valid_shard(path: &Path) -> bool {
    path.is_file() && Shard::open(path).is_ok()
}

/// One try's outcome: worth retrying or not.
enum Failure {
    Transient(String),
    Permanent(String),
}

/// The HTTP client downloads use: statuses are handled by the caller, and a stalled connection
/// fails (and is retried) rather than hanging the download.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn check_shard(path: &Path) -> Result<()> {
    Shard::open(path).map(|_| ()).context("the downloaded file is not a usable shard")
}

/// Downloads `url` to `dest`, which appears only complete and accepted by `validate`: the bytes go
/// to a hidden `.part` file first. Network errors, HTTP 5xx, 408 and 429, short bodies and files
/// `validate` rejects are retried up to `attempts` times, waiting `backoff`, doubled each time.
pub fn fetch_file(
    agent: &ureq::Agent,
    url: &str,
    dest: &Path,
    attempts: u32,
    backoff: Duration,
    validate: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let part = part_path(dest);
    let mut delay = backoff;
    let attempts = attempts.max(1);
    for attempt in 1..=attempts {
        let result = fetch_once(agent, url, &part)
            .and_then(|()| validate(&part).map_err(|e| Failure::Transient(format!("{e:#}"))));
        if result.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        match result {
            Ok(()) => {
                std::fs::rename(&part, dest)
                    .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
                return Ok(());
            }
            Err(Failure::Permanent(msg)) => bail!("{url}: {msg}"),
            Err(Failure::Transient(msg)) if attempt == attempts => {
                bail!("{url}: failed after {attempts} attempts; last error: {msg}")
            }
            Err(Failure::Transient(_)) => {
                std::thread::sleep(delay);
                delay = delay.saturating_mul(2);
            }
        }
    }
    bail!("{url}: no download attempt was made")
}

fn fetch_once(agent: &ureq::Agent, url: &str, part: &Path) -> Result<(), Failure> {
    let transient = |e: &dyn std::fmt::Display| Failure::Transient(e.to_string());
    let response = agent.get(url).call().map_err(|e| transient(&e))?;
    let status = response.status();
    if !status.is_success() {
        let msg = format!("HTTP {status}");
        let code = status.as_u16();
        return Err(if status.is_server_error() || code == 408 || code == 429 {
            Failure::Transient(msg)
        } else {
            Failure::Permanent(format!("{msg}: no such file at this URL"))
        });
    }
    let expected: Option<u64> =
        response.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let mut body = response.into_body().into_reader();
    let mut file = File::create(part).map_err(|e| Failure::Permanent(format!("creating {}: {e}", part.display())))?;
    let written = std::io::copy(&mut body, &mut file).map_err(|e| transient(&e))?;
    if let Some(expected) = expected.filter(|&n| n != written) {
        return Err(Failure::Transient(format!("got {written} of {expected} bytes")));
    }
    file.flush().and_then(|()| file.sync_all()).map_err(|e| transient(&e))?;
    Ok(())
}

/// The hidden name a shard has while it is being written.
fn part_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.part"))
}

/// Brings the first `limit` shards (all if `None`) of a local mirror into `dir`: a hard link when
/// both are on one file system, else a copy. Returns how many were added.
pub fn link_from(mirror: &Path, dir: &Path, limit: Option<usize>) -> Result<usize> {
    let mut shards = list_shards(mirror)?;
    shards.truncate(limit.unwrap_or(usize::MAX));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bar = progress_bar(shards.len() as u64, "copy");
    let mut added = 0;
    for src in &shards {
        let Some(name) = src.file_name() else {
            continue;
        };
        let dest = dir.join(name);
        if !is_valid_shard(&dest) {
            Shard::open(src).with_context(|| format!("the mirror {} is damaged", mirror.display()))?;
            let part = part_path(&dest);
            let _ = std::fs::remove_file(&part);
            if std::fs::hard_link(src, &part).is_err() {
                std::fs::copy(src, &part)
                    .with_context(|| format!("copying {} to {}", src.display(), part.display()))?;
            }
            std::fs::rename(&part, &dest)
                .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
            added += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(added)
}
