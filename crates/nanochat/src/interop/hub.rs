//! `hf:OWNER/REPO[@REVISION]`: a model repository on the Hugging Face hub, downloaded into
//! `$NANOCHAT_BASE_DIR/hub/OWNER--REPO/REVISION/` and imported from there.
//!
//! The hub's layout: `GET {endpoint}/api/models/{repo}/tree/{revision}` lists the repository's
//! files (path, size, and for files in LFS their sha256), `GET {endpoint}/{repo}/resolve/{revision}/{path}`
//! serves one (usually by a redirect to a CDN). The endpoint is `$HF_ENDPOINT` or
//! https://huggingface.co; `$HF_TOKEN`, when set, goes along as `Authorization: Bearer` to the
//! endpoint (never to the host a download is redirected to). Only the files the import needs are
//! fetched: a transformers model's config, weights and tokenizer, or the original's latest
//! `model_<step>.pt` with its meta and tokenizer. A file already downloaded with the listed size is
//! not fetched again, so an interrupted import resumes file by file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::data::download::fetch_file;

/// A repository and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
}

impl RepoRef {
    /// `OWNER/REPO` or `OWNER/REPO@REVISION` (default revision `main`).
    pub fn parse(s: &str) -> Result<RepoRef> {
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let part_ok = |p: &str| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let ok = repo.split_once('/').is_some_and(|(owner, name)| part_ok(owner) && part_ok(name));
        ensure!(ok, "hf:{s}: expected hf:OWNER/REPO or hf:OWNER/REPO@REVISION");
        let rev_ok = !revision.is_empty() && !revision.contains("..") && revision.chars().all(|c| c.is_ascii_graphic());
        ensure!(rev_ok, "hf:{s}: {revision:?} is not a revision (a branch, tag or commit)");
        Ok(RepoRef { repo: repo.to_string(), revision: revision.to_string() })
    }
}

/// Where the hub is and how to authenticate, read once from the environment by the command.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    /// Where downloads go: `$NANOCHAT_BASE_DIR/hub`.
    pub cache: PathBuf,
    pub attempts: u32,
    pub backoff: Duration,
}

impl Hub {
    pub fn from_env() -> Hub {
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        Hub {
            endpoint: endpoint.unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            cache: crate::common::base_dir().join("hub"),
            attempts: 5,
            backoff: Duration::from_secs(2),
        }
    }

    /// An HTTP agent for the hub's API (the repository listing) that sends the token to the
    /// endpoint's host only; timeouts as [`crate::data::download::http_agent`]. The files
    /// themselves go through [`fetch_file`], which handles the token on its own.
    fn agent(&self) -> ureq::Agent {
        let builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)));
        let (Some(token), Some(host)) = (self.token.clone(), host_of(&self.endpoint)) else {
            return builder.build().into();
        };
        let bearer = format!("Bearer {token}");
        builder
            .middleware(move |mut req: ureq::http::Request<ureq::SendBody>, next: ureq::middleware::MiddlewareNext| {
                if req.uri().host() == Some(host.as_str()) {
                    if let Ok(value) = ureq::http::HeaderValue::from_str(&bearer) {
                        req.headers_mut().insert(ureq::http::header::AUTHORIZATION, value);
                    }
                }
                next.handle(req)
            })
            .build()
            .into()
    }
}

fn host_of(url: &str) -> Option<String> {
    url.parse::<ureq::http::Uri>().ok()?.host().map(str::to_string)
}

/// A file of the repository as the tree lists it.
#[derive(Debug, Clone)]
struct RemoteFile {
    path: String,
    size: u64,
}

/// The files at the root of the repository.
fn list(hub: &Hub, agent: &ureq::Agent, r: &RepoRef) -> Result<Vec<RemoteFile>> {
    let url = format!("{}/api/models/{}/tree/{}", hub.endpoint, r.repo, r.revision);
    let mut response = agent.get(&url).call().with_context(|| format!("listing {url}"))?;
    let status = response.status().as_u16();
    match status {
        200 => {}
        401 | 403 => {
            bail!("{url}: HTTP {status}: the repository is private or gated: set HF_TOKEN to a token with access")
        }
        404 => bail!("{url}: HTTP 404: no repository {} with revision {}", r.repo, r.revision),
        _ => bail!("{url}: HTTP {status}"),
    }
    let body = response.body_mut().with_config().limit(64 << 20).read_to_string()?;
    let entries: Value = serde_json::from_str(&body).with_context(|| format!("{url}: not the hub's file list"))?;
    let entries = entries.as_array().with_context(|| format!("{url}: not the hub's file list"))?;
    let mut files = Vec::new();
    for e in entries {
        if e.get("type").and_then(Value::as_str) != Some("file") {
            continue;
        }
        let (Some(path), Some(size)) = (e.get("path").and_then(Value::as_str), e.get("size").and_then(Value::as_u64))
        else {
            bail!("{url}: a file entry without path or size");
        };
        files.push(RemoteFile { path: path.to_string(), size });
    }
    Ok(files)
}

/// The files an import needs from a repository holding `files`.
fn needed(files: &[RemoteFile]) -> Result<Vec<RemoteFile>> {
    let has = |p: &str| files.iter().any(|f| f.path == p);
    let pick = |names: &[&str]| -> Vec<RemoteFile> {
        files.iter().filter(|f| names.contains(&f.path.as_str())).cloned().collect()
    };
    if has("config.json") {
        let mut out = pick(&["config.json", "tokenizer.json", "tokenizer.pkl"]);
        if has("model.safetensors") {
            out.extend(pick(&["model.safetensors"]));
        } else if has("model.safetensors.index.json") {
            out.extend(pick(&["model.safetensors.index.json"]));
            out.extend(
                files.iter().filter(|f| f.path.starts_with("model-") && f.path.ends_with(".safetensors")).cloned(),
            );
        } else {
            out.extend(pick(&["pytorch_model.bin"]));
        }
        return Ok(out);
    }
    let step = files
        .iter()
        .filter_map(|f| f.path.strip_prefix("model_")?.strip_suffix(".pt")?.parse::<usize>().ok())
        .max()
        .context("the repository has neither config.json (transformers) nor model_<step>.pt (the original)")?;
    let model = format!("model_{step:06}.pt");
    let meta = format!("meta_{step:06}.json");
    let out = pick(&[&model, &meta, "tokenizer.pkl", "token_bytes.pt"]);
    ensure!(out.iter().any(|f| f.path == meta), "the repository has {model} but no {meta}");
    Ok(out)
}

/// Downloads what importing `r` needs; returns the local directory holding it.
pub fn fetch(r: &RepoRef, hub: &Hub) -> Result<PathBuf> {
    let agent = hub.agent();
    let files = needed(&list(hub, &agent, r)?)?;
    let dir = hub.cache.join(r.repo.replace('/', "--")).join(&r.revision);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    println!(
        "hf:{}@{}: {} files, {:.1} MB, into {}",
        r.repo,
        r.revision,
        files.len(),
        total as f64 / 1e6,
        dir.display()
    );
    // the listing above is an API call with the token; the files go through the shared download
    // code, which sends the token to the hub only (not to the storage it redirects to), checks the
    // SHA-256 the hub publishes and resumes a cut connection
    let download_agent = crate::data::download::http_agent();
    let token = crate::data::download::Hub { token: hub.token.clone() };
    for (i, f) in files.iter().enumerate() {
        ensure!(
            Path::new(&f.path).file_name().is_some_and(|n| n == f.path.as_str()) && !f.path.starts_with('.'),
            "the hub lists {:?}, which is not a plain file name",
            f.path
        );
        let dest = dir.join(&f.path);
        let complete = std::fs::metadata(&dest).is_ok_and(|m| m.len() == f.size);
        if !complete {
            let url = format!("{}/{}/resolve/{}/{}", hub.endpoint, r.repo, r.revision, f.path);
            let size = f.size;
            let check = move |p: &Path| -> Result<()> {
                let got = std::fs::metadata(p)?.len();
                ensure!(got == size, "got {got} bytes where the hub lists {size}");
                Ok(())
            };
            let bar = crate::common::progress_bar(size, &format!("{}/{}", i + 1, files.len()));
            bar.set_message(f.path.clone());
            let request = crate::data::download::Request {
                url: &url,
                dest: &dest,
                hub: Some(&token),
                attempts: hub.attempts,
                backoff: hub.backoff,
                validate: &check,
                progress: Some(&bar),
            };
            fetch_file(&download_agent, &request)?;
            bar.finish_and_clear();
        }
    }
    Ok(dir)
}
