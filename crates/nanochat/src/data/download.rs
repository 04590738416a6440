//! Fetching files over HTTP into `$NANOCHAT_BASE_DIR`: pretraining shards from the Hugging Face
//! dataset (or any server with the same file names), or from a local mirror by hard link or copy;
//! and the one-file fetch ([`fetch_file`]) that every online source uses (`sources.rs`).
//!
//! A file only ever appears under its final name complete and checked: the bytes go to a hidden
//! `.part` file, which is checked (its length; its SHA-256 where the server publishes one, as the
//! Hugging Face hub does for every large file; the caller's own check, such as a parquet footer)
//! before it is renamed. A dropped connection is retried from where it stopped (an HTTP range
//! request), a `.part` left by an interrupted run is resumed the same way, and processes sharing
//! the cache (the ranks of a data-parallel run) take a lock so that one of them downloads while
//! the others wait for the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::dataset::{list_shards, shard_name, Shard};
use super::sources::Retry;
use crate::common::progress_bar;

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
    /// Sent as a bearer token, and the server's SHA-256 checked: set for the Hugging Face hub.
    pub hub: Option<Hub>,
}

/// How to talk to the Hugging Face hub (or a mirror of it, `HF_ENDPOINT`): its token (`HF_TOKEN`)
/// goes with each request, and the SHA-256 it publishes for a file (`X-Linked-Etag`) is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hub {
    pub token: Option<String>,
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
                        let request = Request {
                            url: &url,
                            dest: &dest,
                            hub: opts.hub.as_ref(),
                            attempts: opts.attempts,
                            backoff: opts.backoff,
                            validate: &check_shard,
                            progress: None,
                        };
                        match fetch_file(&agent, &request) {
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
    agent_with(Duration::from_secs(30), Duration::from_secs(60))
}

fn agent_with(connect: Duration, read: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(connect))
        .timeout_recv_response(Some(read))
        .timeout_per_read(Some(read))
        .build()
        .into()
}

fn check_shard(path: &Path) -> Result<()> {
    Shard::open(path).map(|_| ()).context("the downloaded file is not a usable shard")
}

/// One file to fetch, and how to accept it.
pub struct Request<'a> {
    pub url: &'a str,
    pub dest: &'a Path,
    /// Set when the URL is on the Hugging Face hub: its token is sent, its checksum checked.
    pub hub: Option<&'a Hub>,
    /// Tries for errors that may pass (network errors, HTTP 5xx, 408 and 429, short or corrupt bodies).
    pub attempts: u32,
    /// Wait before the second try; doubled before each later one.
    pub backoff: Duration,
    /// The caller's check of the complete file (a parquet footer, a zip directory, ...).
    pub validate: &'a dyn Fn(&Path) -> Result<()>,
    /// A bar to show the bytes on, when the caller has one.
    pub progress: Option<&'a ProgressBar>,
}

/// Downloads `request.url` to `request.dest`, which appears only complete and accepted: the bytes
/// go to a hidden `.part` file first. Network errors, HTTP 5xx, 408 and 429, short bodies, checksum
/// mismatches and files `validate` rejects are retried up to `attempts` times, waiting `backoff`,
/// doubled each time; a dropped connection resumes where it stopped. The `.part` file is locked
/// while it is written: a process that finds it locked waits, then takes the finished file.
pub fn fetch_file(agent: &ureq::Agent, request: &Request) -> Result<()> {
    let url = request.url;
    let part = part_path(request.dest);
    let Some(mut file) = claim(&part, request.dest, request.validate)? else {
        return Ok(());
    };
    let mut delay = request.backoff;
    let attempts = request.attempts.max(1);
    for attempt in 1..=attempts {
        let result = fetch_once(agent, request, &mut file, &part).and_then(|expected| {
            check_sha256(&part, expected.as_deref()).and_then(|()| (request.validate)(&part)).map_err(|e| {
                // the bytes are wrong, not missing: the next try starts from the beginning
                let _ = file.set_len(0);
                Failure::Transient(format!("{e:#}"))
            })
        });
        match result {
            Ok(()) => {
                return std::fs::rename(&part, request.dest)
                    .with_context(|| format!("renaming {} to {}", part.display(), request.dest.display()));
            }
            Err(Failure::Permanent(msg)) => {
                let _ = std::fs::remove_file(&part);
                bail!("{url}: {msg}")
            }
            Err(Failure::Transient(msg)) if attempt == attempts => {
                let _ = std::fs::remove_file(&part);
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

/// Opens and locks `part` (created if missing, kept if a run left it: it is resumed), waiting
/// while another process holds it. `None` when `dest` is complete by then, fetched by that process.
/// A lock taken on a `.part` that was renamed or removed meanwhile is no claim: try again.
fn claim(part: &Path, dest: &Path, validate: &dyn Fn(&Path) -> Result<()>) -> Result<Option<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    if let Some(dir) = part.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    loop {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(part)
            .with_context(|| format!("creating {}", part.display()))?;
        // SAFETY: flock on a descriptor owned by `file`, which outlives the lock.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("locking {}", part.display()));
            }
        }
        let held = file.metadata().with_context(|| format!("reading {}", part.display()))?;
        let ours = std::fs::metadata(part).is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev());
        if dest.is_file() && validate(dest).is_ok() {
            if ours {
                let _ = std::fs::remove_file(part);
            }
            return Ok(None);
        }
        if ours {
            return Ok(Some(file));
        }
    }
}

/// One GET of the file into `file` (the locked `part`), continuing what it holds with a range
/// request. Returns the SHA-256 the hub published for the file, if it did.
fn fetch_once(agent: &ureq::Agent, request: &Request, file: &mut File, part: &Path) -> Result<Option<String>, Failure> {
    let transient = |e: &dyn std::fmt::Display| Failure::Transient(e.to_string());
    let have = file.metadata().map_or(0, |m| m.len());
    let token = request.hub.and_then(|h| h.token.as_deref());
    // The hub answers a large file with a redirect to its storage, and the redirect carries the
    // file's SHA-256 (`X-Linked-Etag`): follow it by hand to read that header on the way.
    let mut response = get(agent, request.url, token, have, false).map_err(|e| transient(&e))?;
    let mut sha256 = None;
    if response.status().is_redirection() {
        sha256 = request.hub.and(header(&response, "x-linked-etag")).and_then(|e| sha256_of_etag(&e));
        let Some(location) = header(&response, "location") else {
            return Err(Failure::Permanent(format!("HTTP {} without a Location", response.status())));
        };
        let next = resolve(request.url, &location);
        // the token only goes to the host it is for, not to the storage it redirects to
        let token = token.filter(|_| origin(&next) == origin(request.url));
        response = get(agent, &next, token, have, true).map_err(|e| transient(&e))?;
    } else if request.hub.is_some() {
        sha256 =
            header(&response, "x-linked-etag").or_else(|| header(&response, "etag")).and_then(|e| sha256_of_etag(&e));
    }
    let status = response.status();
    let code = status.as_u16();
    let restart = |file: &mut File, msg: String| {
        // the part is no prefix of the file (it changed, or the part is bad): start over
        let _ = file.set_len(0);
        Failure::Transient(msg)
    };
    if code == 416 {
        return Err(restart(file, "HTTP 416: the partial download does not fit the file".into()));
    }
    if !status.is_success() {
        let msg = format!("HTTP {status}");
        return Err(if status.is_server_error() || code == 408 || code == 429 {
            Failure::Transient(msg)
        } else if (code == 401 || code == 403) && request.hub.is_some() {
            Failure::Permanent(format!("{msg}: no access (a gated dataset needs HF_TOKEN set to a token with access)"))
        } else {
            Failure::Permanent(format!("{msg}: no such file at this URL (or no access to it)"))
        });
    }
    let length = header(&response, "content-length").and_then(|v| v.parse::<u64>().ok());
    let (offset, total) = if code == 206 {
        let range = header(&response, "content-range").unwrap_or_default();
        match parse_content_range(&range) {
            Some((start, total)) if start == have => (have, total),
            _ => return Err(restart(file, format!("the server resumed at the wrong place ({range:?})"))),
        }
    } else {
        file.set_len(0).map_err(|e| Failure::Permanent(format!("writing {}: {e}", part.display())))?;
        (0, length)
    };
    let mut body = response.into_body().into_reader();
    if let Some(bar) = request.progress {
        bar.set_length(total.unwrap_or(0));
        bar.set_position(offset);
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut written = offset;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // keep what arrived: the next try asks for the rest
            Err(e) => return Err(transient(&e)),
        };
        file.write_all(&buf[..n]).map_err(|e| Failure::Permanent(format!("writing {}: {e}", part.display())))?;
        written += n as u64;
        if let Some(bar) = request.progress {
            bar.set_position(written);
        }
    }
    file.sync_all().map_err(|e| transient(&e))?;
    if let Some(total) = total.filter(|&n| n != written) {
        return Err(Failure::Transient(format!("got {written} of {total} bytes")));
    }
    Ok(sha256)
}

/// A GET of `url`, from byte `from` on when it is not 0; redirects followed only when `follow`.
fn get(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    from: u64,
    follow: bool,
) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
    let mut request = agent.get(url).config().max_redirects(if follow { 10 } else { 0 }).build();
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    if from > 0 {
        request = request.header("Range", format!("bytes={from}-"));
    }
    request.call()
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The SHA-256 in an ETag (`"<64 hex digits>"`, perhaps weak), as the hub gives it for large
/// (LFS) files; other ETags (git blob hashes, S3's MD5s) are not SHA-256 and are ignored.
fn sha256_of_etag(etag: &str) -> Option<String> {
    let value = etag.trim().trim_start_matches("W/").trim_matches('"');
    (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())).then(|| value.to_ascii_lowercase())
}

fn check_sha256(path: &Path, expected: Option<&str>) -> Result<()> {
    let Some(expected) = expected else { return Ok(()) };
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual != expected {
        bail!("the file's SHA-256 is {actual}, the server published {expected}: corrupted on the way");
    }
    Ok(())
}

/// `(first byte, total length)` of a `Content-Range: bytes first-last/total` header.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let first = range.split_once('-')?.0.parse().ok()?;
    Some((first, total.parse().ok()))
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    url[after_scheme..].find('/').map_or(url, |i| &url[..after_scheme + i])
}

/// A redirect's `Location`, absolute or relative to the URL that gave it.
fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{location}")
    }
}

/// What a server says about a file without sending it: its size, where it says (the hub gives a
/// large file's size on its redirect, `X-Linked-Size`).
pub fn probe_size(agent: &ureq::Agent, url: &str, hub: Option<&Hub>) -> Result<Option<u64>> {
    let size = |r: &ureq::http::Response<ureq::Body>, name: &str| header(r, name).and_then(|v| v.parse::<u64>().ok());
    let mut request = agent.head(url).config().max_redirects(0).build();
    if let Some(token) = hub.and_then(|h| h.token.as_deref()) {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.call()?;
    if response.status().is_redirection() {
        if let Some(n) = size(&response, "x-linked-size") {
            return Ok(Some(n));
        }
        let next = header(&response, "location").map(|l| resolve(url, &l)).unwrap_or_else(|| url.to_string());
        let followed = agent.head(&next).call()?;
        return Ok(if followed.status().is_success() { size(&followed, "content-length") } else { None });
    }
    if !response.status().is_success() {
        bail!("HTTP {}", response.status());
    }
    Ok(size(&response, "x-linked-size").or_else(|| size(&response, "content-length")))
}

/// The client for [`probe_size`]: quick to give up, since a listing should not wait on a dead network.
pub fn probe_agent() -> ureq::Agent {
    agent_with(Duration::from_secs(5), Duration::from_secs(10))
}

/// The hidden name a file has while it is being written.
fn part_path(dest: &Path) -> PathBuf {
    hidden(dest, "part")
}

fn hidden(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.{suffix}"))
}

/// Downloads the zip archive at `url` and unpacks it as the directory `dir`, which then holds
/// `marker` (the file that says it is what was asked for). The archive's files may sit under one
/// top folder, which is dropped. `dir` appears complete or not at all: the archive and its files
/// go next to it under hidden names of this process and are renamed at the end (a process that
/// finishes second keeps the first one's copy); entries that would land outside `dir` are refused.
/// Nothing happens when `dir` already holds `marker`.
pub fn fetch_unpacked(
    agent: &ureq::Agent,
    url: &str,
    dir: &Path,
    marker: &str,
    progress: Option<&ProgressBar>,
    retry: Retry,
) -> Result<()> {
    if dir.join(marker).is_file() {
        return Ok(());
    }
    let pid = std::process::id();
    let archive = hidden(dir, &format!("{pid}.zip"));
    let staging = hidden(dir, &format!("{pid}.unpacking"));
    let opens = |path: &Path| -> Result<()> {
        let file = File::open(path)?;
        zip::ZipArchive::new(file).map(|_| ()).context("the downloaded file is not a zip archive")
    };
    let request = Request {
        url,
        dest: &archive,
        hub: None,
        attempts: retry.attempts,
        backoff: retry.backoff,
        validate: &opens,
        progress,
    };
    fetch_file(agent, &request)?;
    let result = unpack(&archive, &staging, marker).and_then(|()| match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        Err(_) if dir.join(marker).is_file() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("renaming {} to {}", staging.display(), dir.display())),
    });
    let _ = std::fs::remove_file(&archive);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Unpacks the zip `archive` into `dest` (emptied first), dropping a single top folder.
fn unpack(archive: &Path, dest: &Path, marker: &str) -> Result<()> {
    use std::path::Component;
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{} is not a zip archive", archive.display()))?;
    let mut entries = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let entry = zip.by_index(i).with_context(|| format!("reading entry {i} of {}", archive.display()))?;
        // `enclosed_name` refuses absolute paths and `..`: nothing is written outside `dest`
        let path = entry.enclosed_name().with_context(|| format!("unsafe path {:?} in the archive", entry.name()))?;
        entries.push((i, path, entry.is_dir()));
    }
    let top = |p: &Path| match p.components().next() {
        Some(Component::Normal(c)) => Some(c.to_os_string()),
        _ => None,
    };
    let shared_top = entries.first().and_then(|(_, p, _)| top(p)).filter(|t| {
        entries.iter().all(|(_, p, is_dir)| top(p).as_ref() == Some(t) && (p.components().count() > 1 || *is_dir))
    });
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("removing the leftover {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for (i, path, is_dir) in entries {
        let relative = match &shared_top {
            Some(t) => path.strip_prefix(t).map(Path::to_path_buf).unwrap_or(path),
            None => path,
        };
        let out = dest.join(&relative);
        if is_dir {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut entry = zip.by_index(i).with_context(|| format!("reading entry {i} of {}", archive.display()))?;
        let mut file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        std::io::copy(&mut entry, &mut file).with_context(|| format!("unpacking {}", relative.display()))?;
    }
    if !dest.join(marker).is_file() {
        bail!("the archive has no {marker}");
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_etags_and_ranges_parse() {
        assert_eq!(origin("https://huggingface.co/datasets/a/b"), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:8/x"), "http://127.0.0.1:8");
        assert_eq!(resolve("http://h:1/a/b/c", "/cdn/x"), "http://h:1/cdn/x");
        assert_eq!(resolve("http://h:1/a/b/c", "https://cdn.example/x"), "https://cdn.example/x");
        assert_eq!(resolve("http://h:1/a/b/c", "d"), "http://h:1/a/b/d");
        let sha = "ab".repeat(32);
        assert_eq!(sha256_of_etag(&format!("\"{sha}\"")), Some(sha.clone()));
        assert_eq!(sha256_of_etag(&format!("W/\"{}\"", sha.to_uppercase())), Some(sha));
        assert_eq!(sha256_of_etag("\"d41d8cd98f00b204e9800998ecf8427e\""), None, "S3's MD5 is no SHA-256");
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
