//! Shard download over real HTTP, against a small server on 127.0.0.1 started by each test that
//! serves good files, drops connections mid-file and answers 404/500; and copying from a mirror.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nanochat::data::dataset::write_shard;
use nanochat::data::download::{download, link_from, DownloadOptions};

#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    /// Announces the full length, sends half, closes the connection.
    Truncated(Vec<u8>),
    Status(u16),
}

/// Serves `routes` (path → replies for successive requests; the last one repeats), counting hits.
struct Server {
    url: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(routes: Vec<(&str, Vec<Reply>)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let routes: HashMap<String, Vec<Reply>> = routes.into_iter().map(|(p, r)| (p.to_string(), r)).collect();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (Arc::clone(&hits), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &routes, &h);
                }
            }
        });
        Server { url, hits, stop, thread: Some(thread) }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream, routes: &HashMap<String, Vec<Reply>>, hits: &Mutex<HashMap<String, usize>>) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16_384 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let n = {
        let mut hits = hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let reply = routes.get(&path).map(|r| r[(n - 1).min(r.len() - 1)].clone()).unwrap_or(Reply::Status(404));
    let ok = |len: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    let _ = match reply {
        Reply::Body(body) => stream.write_all(ok(body.len()).as_bytes()).and_then(|()| stream.write_all(&body)),
        Reply::Truncated(body) => {
            stream.write_all(ok(body.len()).as_bytes()).and_then(|()| stream.write_all(&body[..body.len() / 2]))
        }
        Reply::Status(code) => stream
            .write_all(format!("HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()),
    };
    let _ = stream.flush();
}

/// Bytes of a valid shard with `n` documents.
fn shard_bytes(n: usize) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.parquet");
    let docs: Vec<String> = (0..n).map(|i| format!("document number {i} with some words")).collect();
    write_shard(&path, &docs).unwrap();
    std::fs::read(path).unwrap()
}

fn options(server: &Server, dir: &Path, shards: &[usize], attempts: u32) -> DownloadOptions {
    DownloadOptions {
        base_url: format!("{}/data/", server.url),
        shards: shards.to_vec(),
        dir: dir.to_path_buf(),
        workers: 2,
        attempts,
        backoff: Duration::from_millis(10),
        hub: None,
    }
}

/// Every file in `dir`, hidden ones included, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn downloads_in_parallel_and_skips_shards_already_present() {
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| shard_bytes(100 + i)).collect();
    let server = Server::start(vec![
        ("/data/shard_00000.parquet", vec![Reply::Body(bodies[0].clone())]),
        ("/data/shard_00001.parquet", vec![Reply::Body(bodies[1].clone())]),
        ("/data/shard_00002.parquet", vec![Reply::Body(bodies[2].clone())]),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(download(&options(&server, tmp.path(), &[0, 1, 2], 3)).unwrap(), 3);
    assert_eq!(files(tmp.path()), ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]);
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(&std::fs::read(tmp.path().join(format!("shard_0000{i}.parquet"))).unwrap(), body);
    }
    assert_eq!(download(&options(&server, tmp.path(), &[0, 1, 2], 3)).unwrap(), 0);
    assert_eq!(server.hits("/data/shard_00001.parquet"), 1, "a present, valid shard is not fetched again");
}

#[test]
fn retries_a_dropped_connection_and_a_server_error() {
    let body = shard_bytes(300);
    let replies = vec![Reply::Truncated(body.clone()), Reply::Status(500), Reply::Body(body.clone())];
    let server = Server::start(vec![("/data/shard_00004.parquet", replies)]);
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(download(&options(&server, tmp.path(), &[4], 5)).unwrap(), 1);
    assert_eq!(server.hits("/data/shard_00004.parquet"), 3);
    assert_eq!(std::fs::read(tmp.path().join("shard_00004.parquet")).unwrap(), body);
    assert_eq!(files(tmp.path()), ["shard_00004.parquet"]);
}

#[test]
fn gives_up_with_a_clear_error_and_leaves_no_partial_file() {
    let server = Server::start(vec![
        ("/data/shard_00000.parquet", vec![Reply::Body(shard_bytes(10))]),
        ("/data/shard_00001.parquet", vec![Reply::Truncated(shard_bytes(300))]),
        ("/data/shard_00002.parquet", vec![Reply::Status(503)]),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let err = format!("{:#}", download(&options(&server, tmp.path(), &[0, 1, 2], 3)).unwrap_err());
    assert!(err.contains("2 of 3 shards failed"), "{err}");
    assert!(err.contains("shard_00001.parquet: failed after 3 attempts"), "{err}");
    assert!(err.contains("shard_00002.parquet: failed after 3 attempts; last error: HTTP 503"), "{err}");
    assert!(err.contains("run the command again"), "{err}");
    assert_eq!(server.hits("/data/shard_00001.parquet"), 3);
    assert_eq!(files(tmp.path()), ["shard_00000.parquet"], "no partial or temporary file may remain");
}

#[test]
fn a_missing_shard_fails_at_once() {
    let server = Server::start(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let err = format!("{:#}", download(&options(&server, tmp.path(), &[7], 5)).unwrap_err());
    assert!(err.contains("shard_00007.parquet: HTTP 404"), "{err}");
    assert!(err.contains("check --base-url / NANOCHAT_DATA_URL"), "{err}");
    assert_eq!(server.hits("/data/shard_00007.parquet"), 1, "a 404 is not retried");
    assert!(files(tmp.path()).is_empty());
}

#[test]
fn a_page_that_is_not_parquet_is_rejected_and_a_corrupt_local_file_replaced() {
    let body = shard_bytes(20);
    let server = Server::start(vec![
        ("/data/shard_00000.parquet", vec![Reply::Body(b"<html>rate limited</html>".to_vec())]),
        ("/data/shard_00001.parquet", vec![Reply::Body(body.clone())]),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("shard_00001.parquet"), &body[..body.len() - 10]).unwrap();
    let err = format!("{:#}", download(&options(&server, tmp.path(), &[0, 1], 2)).unwrap_err());
    assert!(err.contains("not a usable shard"), "{err}");
    assert_eq!(files(tmp.path()), ["shard_00001.parquet"]);
    assert_eq!(std::fs::read(tmp.path().join("shard_00001.parquet")).unwrap(), body);
}

#[test]
fn copies_from_a_local_mirror() {
    let mirror = tempfile::tempdir().unwrap();
    for (i, name) in ["shard_00000.parquet", "shard_00001.parquet", "shard_00021.parquet"].iter().enumerate() {
        std::fs::write(mirror.path().join(name), shard_bytes(5 + i)).unwrap();
    }
    std::fs::write(mirror.path().join("manifest.json"), "{}").unwrap();
    let dest = tempfile::tempdir().unwrap();
    assert_eq!(link_from(mirror.path(), dest.path(), Some(2)).unwrap(), 2);
    assert_eq!(files(dest.path()), ["shard_00000.parquet", "shard_00001.parquet"]);
    assert_eq!(link_from(mirror.path(), dest.path(), None).unwrap(), 1);
    assert_eq!(files(dest.path()).len(), 3);
    let same = std::fs::read(mirror.path().join("shard_00021.parquet")).unwrap();
    assert_eq!(std::fs::read(dest.path().join("shard_00021.parquet")).unwrap(), same);
    let err = format!("{:#}", link_from(&mirror.path().join("missing"), dest.path(), None).unwrap_err());
    assert!(err.contains("cannot read shard directory"), "{err}");
}

#[test]
fn the_download_command_takes_shards_from_a_mirror() {
    use nanochat::data::cli::{run, DataCommand};
    let mirror = tempfile::tempdir().unwrap();
    for name in ["shard_00000.parquet", "shard_00001.parquet"] {
        std::fs::write(mirror.path().join(name), shard_bytes(3)).unwrap();
    }
    let dest = tempfile::tempdir().unwrap();
    let cmd = DataCommand::Download {
        num_shards: None,
        base_url: "http://127.0.0.1:9/unused".into(),
        from: Some(mirror.path().to_path_buf()),
        data_dir: None,
        workers: 1,
        attempts: 1,
        dir: Some(dest.path().to_path_buf()),
    };
    run(cmd).unwrap();
    assert_eq!(files(dest.path()), ["shard_00000.parquet", "shard_00001.parquet"]);
}

/// A zip archive of `(name, bytes)` files.
fn zip_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

#[test]
fn the_core_eval_bundle_downloads_unpacks_and_loads() {
    let bundle = common::data().join("eval/eval_bundle");
    let read = |name: &str| std::fs::read(bundle.join(name)).unwrap();
    let (yaml, csv) = (read("core.yaml"), read("eval_meta_data.csv"));
    let good = zip_bytes(&[("eval_bundle/core.yaml", &yaml), ("eval_bundle/eval_meta_data.csv", &csv)]);
    let escaping = zip_bytes(&[("../evil.txt", b"x"), ("core.yaml", &yaml)]);
    let no_yaml = zip_bytes(&[("eval_bundle/readme.txt", b"hello")]);
    let server = Server::start(vec![
        ("/good.zip", vec![Reply::Truncated(good.clone()), Reply::Body(good)]),
        ("/notzip", vec![Reply::Body(b"<html>not found</html>".to_vec())]),
        ("/escape.zip", vec![Reply::Body(escaping)]),
        ("/noyaml.zip", vec![Reply::Body(no_yaml)]),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let url = |path: &str| format!("{}{path}", server.url);

    // A truncated first reply is retried; the top folder is dropped; the bundle then loads.
    let dir = tmp.path().join("eval_bundle");
    nanochat::eval::bundle::download(&url("/good.zip"), &dir).unwrap();
    assert_eq!(server.hits("/good.zip"), 2);
    let bundle = nanochat::eval::bundle::Bundle::load(&dir).unwrap();
    assert_eq!(bundle.tasks.len(), 22);
    assert_eq!(files(tmp.path()), ["eval_bundle"], "no temporary files left");

    // Failures leave nothing behind: not a zip, a path escaping the directory, no core.yaml.
    for (path, expected) in
        [("/notzip", "not a zip archive"), ("/escape.zip", "unsafe path"), ("/noyaml.zip", "no core.yaml")]
    {
        let dir = tmp.path().join("other");
        let err = nanochat::eval::bundle::download(&url(path), &dir).unwrap_err();
        assert!(format!("{err:#}").contains(expected), "{path}: {err:#}");
        assert_eq!(files(tmp.path()), ["eval_bundle"], "{path} left files behind");
    }
    assert!(!tmp.path().join("evil.txt").exists() && !Path::new("../evil.txt").exists());
}
