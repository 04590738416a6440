//! A local stand-in for the online sources, for the download tests: an HTTP server on 127.0.0.1
//! that serves files in the sources' URL layout. Hugging Face files are served as the hub serves
//! large (LFS) files: `GET /datasets/{repo}/resolve/main/{path}` answers a redirect to a second
//! server (the storage, another origin) with the file's SHA-256 and size in `X-Linked-Etag` and
//! `X-Linked-Size`; the storage serves the bytes, with range requests. Other files are served
//! plainly. Every request is recorded (method, path, `Authorization`, `Range`), and faults can be
//! injected: a connection cut in the middle of a body, a wrong published checksum.

#![allow(dead_code)] // each test file uses its own part of it

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The fixtures: the datasets in the hub's layout, the mirror's layout and the other sources.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/online")
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
}

#[derive(Clone)]
struct File {
    bytes: Vec<u8>,
    /// Served through the storage with a published SHA-256 (wrong when `lie` is set).
    lfs: bool,
    lie: bool,
    /// Cut the next body of this file halfway.
    cut: bool,
    /// Wait a moment before each body of this file (so that downloads overlap).
    slow: bool,
}

#[derive(Default)]
struct State {
    files: HashMap<String, File>,
    seen: Vec<Seen>,
}

/// The hub and its storage.
pub struct Hub {
    /// The hub's URL: `HF_ENDPOINT`, and the base of the other sources' URLs.
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Hub {
    pub fn start() -> Hub {
        let state = Arc::new(Mutex::new(State::default()));
        let storage = listen(Arc::clone(&state), None);
        let url = listen(Arc::clone(&state), Some(storage));
        Hub { url, state }
    }

    /// A plain file at `path` (such as `/words_alpha.txt`).
    pub fn file(&self, path: &str, bytes: Vec<u8>) {
        let file = File { bytes, lfs: false, lie: false, cut: false, slow: false };
        self.state.lock().unwrap().files.insert(path.to_string(), file);
    }

    /// A file of the dataset `repo` on the hub, at `path` in it.
    pub fn dataset_file(&self, repo: &str, path: &str, bytes: Vec<u8>) {
        let file = File { bytes, lfs: true, lie: false, cut: false, slow: false };
        self.state.lock().unwrap().files.insert(resolve_path(repo, path), file);
    }

    /// Every fixture dataset (`fixtures/online/hub/{owner}/{name}/{path}`) on the hub, and the
    /// identity conversations and word list at `/identity_conversations.jsonl` and `/words_alpha.txt`.
    pub fn serve_fixtures(&self) {
        let root = fixtures().join("hub");
        for path in walk(&root) {
            let relative = path.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            let mut parts = relative.splitn(3, '/');
            let (owner, name, file) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            self.dataset_file(&format!("{owner}/{name}"), file, std::fs::read(&path).unwrap());
        }
        for name in ["identity_conversations.jsonl", "words_alpha.txt"] {
            self.file(&format!("/{name}"), std::fs::read(fixtures().join("other").join(name)).unwrap());
        }
    }

    /// The sources with the hub here: `HF_ENDPOINT` and the other sources' URLs, as the
    /// environment of a `nanochat` process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HF_ENDPOINT", self.url.clone()),
            ("NANOCHAT_EVAL_BUNDLE_URL", format!("{}/eval_bundle.zip", self.url)),
            ("NANOCHAT_IDENTITY_URL", format!("{}/identity_conversations.jsonl", self.url)),
            ("NANOCHAT_WORDS_URL", format!("{}/words_alpha.txt", self.url)),
        ]
    }

    /// The same, as the library's value.
    pub fn endpoints(&self) -> nanochat::data::sources::Endpoints {
        let mut e = nanochat::data::sources::Endpoints::with_hub(&self.url);
        e.eval_bundle = format!("{}/eval_bundle.zip", self.url);
        e.identity = format!("{}/identity_conversations.jsonl", self.url);
        e.words = format!("{}/words_alpha.txt", self.url);
        e
    }

    /// The next body sent for the file at `path` (as [`Hub::file`] or [`resolve_path`] names it)
    /// stops halfway and the connection closes.
    pub fn cut_next(&self, path: &str) {
        self.state.lock().unwrap().files.get_mut(path).unwrap().cut = true;
    }

    /// Every body of the file at `path` waits 300 ms before it starts.
    pub fn slow(&self, path: &str) {
        self.state.lock().unwrap().files.get_mut(path).unwrap().slow = true;
    }

    /// The hub publishes a wrong SHA-256 for the file at `path`.
    pub fn lie_about(&self, path: &str) {
        self.state.lock().unwrap().files.get_mut(path).unwrap().lie = true;
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The paths asked for with GET on the hub and the plain files (not the storage), sorted.
    pub fn downloaded(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .seen()
            .into_iter()
            .filter(|s| s.method == "GET" && !s.path.starts_with("/storage/"))
            .map(|s| s.path)
            .collect();
        paths.sort();
        paths
    }
}

/// The hub's path of a dataset file.
pub fn resolve_path(repo: &str, path: &str) -> String {
    format!("/datasets/{repo}/resolve/main/{path}")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Serves on a new port; the hub (with `storage`, the storage's URL) or the storage. Returns the URL.
fn listen(state: Arc<Mutex<State>>, storage: Option<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (state, storage) = (Arc::clone(&state), storage.clone());
            std::thread::spawn(move || serve(stream, &state, storage.as_deref()));
        }
    });
    url
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, storage: Option<&str>) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16_384 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or("/").to_string());
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        authorization: header("authorization"),
        range: header("range"),
    };
    let range = seen.range.clone();
    let mut state = state.lock().unwrap();
    let (owner_path, file) = match storage {
        // the hub: LFS files redirect to the storage, plain files are served here
        Some(storage_url) => match state.files.get(&path).cloned() {
            Some(file) if file.lfs => {
                state.seen.push(seen);
                let sha = if file.lie { "0".repeat(64) } else { sha256(&file.bytes) };
                let reply = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {storage_url}/storage{path}\r\nX-Linked-Etag: \"{sha}\"\r\n\
                     X-Linked-Size: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    file.bytes.len()
                );
                drop(state);
                let _ = stream.write_all(reply.as_bytes());
                return;
            }
            other => (path.clone(), other),
        },
        // the storage: /storage/{hub path}
        None => {
            let owner = path.strip_prefix("/storage").unwrap_or(&path).to_string();
            let file = state.files.get(&owner).cloned();
            (owner, file)
        }
    };
    state.seen.push(seen);
    let Some(file) = file else {
        drop(state);
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let cut = file.cut && method == "GET";
    if cut {
        state.files.get_mut(&owner_path).unwrap().cut = false;
    }
    drop(state);
    let total = file.bytes.len();
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, body, extra) = match from {
        Some(n) if n >= total => {
            let reply = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(reply.as_bytes());
            return;
        }
        Some(n) => {
            ("206 Partial Content", &file.bytes[n..], format!("Content-Range: bytes {n}-{}/{total}\r\n", total - 1))
        }
        None => ("200 OK", &file.bytes[..], String::new()),
    };
    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n", body.len());
    let _ = stream.write_all(reply.as_bytes());
    if method == "GET" {
        if file.slow {
            std::thread::sleep(Duration::from_millis(300));
        }
        let sent = if cut { &body[..body.len() / 2] } else { body };
        let _ = stream.write_all(sent);
    }
    let _ = stream.flush();
}
