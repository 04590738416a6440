//! The online sources against a local stand-in for them (`hub/`), never the internet: each
//! source's files arrive in the original's cache layout and read as exactly the same examples as
//! the offline mirror's; a cut connection resumes where it stopped; a corrupt file is refused (a
//! wrong checksum, a body that is no parquet) and a damaged one in the cache is named with what to
//! do; `HF_TOKEN` goes to the hub and nowhere else; with a mirror nothing is downloaded.

mod hub;

use std::path::Path;
use std::time::Duration;

use hub::{fixtures, resolve_path, Hub};
use nanochat::data::dataset::{write_shard, Shard};
use nanochat::data::download::{download, DownloadOptions};
use nanochat::data::sources::{self, Dataset, Online, Retry};
use nanochat::data::ShardArgs;
use nanochat::tasks::arc::{ArcSubset, ArcTask};
use nanochat::tasks::chat::ChatData;
use nanochat::tasks::gsm8k::Gsm8k;
use nanochat::tasks::mmlu::Mmlu;
use nanochat::tasks::spelling::{load_words, SpellingBee, Split};
use nanochat::tasks::{DataRoot, Example, Task};

/// The online sources at `hub`, cached in `cache`, retried quickly.
fn sources_at(hub: &Hub, cache: &Path) -> Online {
    Online { cache: cache.to_path_buf(), endpoints: hub.endpoints(), retry: RETRY }
}

const RETRY: Retry = Retry { attempts: 3, backoff: Duration::from_millis(10) };

fn online(hub: &Hub, cache: &Path) -> DataRoot {
    DataRoot::Online(sources_at(hub, cache))
}

fn mirror() -> DataRoot {
    DataRoot::new(fixtures().join("mirror"))
}

fn examples(task: &dyn Task) -> Vec<Example> {
    (0..task.len()).map(|i| task.get(i).unwrap()).collect()
}

/// Every file under `dir`, hidden ones included, relative and sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_task_reads_the_same_examples_online_as_from_the_mirror() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let cache = tempfile::tempdir().unwrap();
    let (net, local) = (online(&hub, cache.path()), mirror());
    for subset in [ArcSubset::Easy, ArcSubset::Challenge] {
        for split in ["train", "validation", "test"] {
            let (a, b) = (ArcTask::load(&net, subset, split).unwrap(), ArcTask::load(&local, subset, split).unwrap());
            assert_eq!((a.name(), a.len()), (b.name(), 4));
            assert_eq!(examples(&a), examples(&b), "{} differs", a.name());
        }
    }
    for split in ["dev", "validation", "test"] {
        let (a, b) = (Mmlu::load(&net, split).unwrap(), Mmlu::load(&local, split).unwrap());
        assert!(a.len() >= 3 && a.name() == b.name());
        assert_eq!(examples(&a), examples(&b), "MMLU-{split} differs");
    }
    // the split the mirror lacks: online only, read the same way
    let aux = Mmlu::load(&net, "auxiliary_train").unwrap();
    assert_eq!(aux.len(), 8);
    assert!(format!("{:#}", Mmlu::load(&local, "auxiliary_train").err().unwrap()).contains("auxiliary_train"));
    for split in ["train", "test"] {
        let (a, b) = (Gsm8k::load(&net, split).unwrap(), Gsm8k::load(&local, split).unwrap());
        assert_eq!(examples(&a), examples(&b), "GSM8K-{split} differs");
        let (a, b) = (ChatData::load(&net, split).unwrap(), ChatData::load(&local, split).unwrap());
        assert_eq!((a.name(), b.name()), (format!("SmolTalk-{split}"), format!("ShareGPT-{split}")));
        assert_eq!((a.len(), a.skipped()), (b.len(), b.skipped()));
        assert!(a.skipped() > 0, "the fixture's malformed conversations are skipped by both");
        assert_eq!(examples(&a), examples(&b), "chat {split} differs");
    }
    // four files of 75 conversations make the train split
    let train = ChatData::load(&net, "train").unwrap();
    assert_eq!(train.len() + train.skipped(), 300);
    let (a, b) = (load_words(&net).unwrap(), load_words(&local).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.len(), 20);
    let bee = |words| examples(&SpellingBee::new(words, 16, Split::Test));
    assert_eq!(bee(a), bee(b));
    let limits = nanochat::execution::Limits::default();
    match nanochat::tasks::humaneval::HumanEval::load(&local, limits.clone()) {
        Ok(b) => {
            let a = nanochat::tasks::humaneval::HumanEval::load(&net, limits).unwrap();
            assert_eq!(examples(&a), examples(&b));
            let first = a.get(0).unwrap();
            let reply = first.conversation.messages[1].content.clone();
            let nanochat::conversation::Content::Text(solution) = reply else { panic!("{reply:?}") };
            assert!(a.evaluate(&first, &solution), "the canonical solution passes its tests");
        }
        Err(e) => println!("SKIP HumanEval online vs mirror: the sandbox cannot run Python here ({e:#})"),
    }

    // the original's cache layout; nothing partial left; a second load asks for nothing
    let files = tree(cache.path());
    for expected in [
        "task_data/allenai--ai2_arc/ARC-Easy/train-00000-of-00001.parquet",
        "task_data/cais--mmlu/all/auxiliary_train-00000-of-00001.parquet",
        "task_data/openai--gsm8k/main/test-00000-of-00001.parquet",
        "task_data/HuggingFaceTB--smol-smoltalk/data/train-00003-of-00004.parquet",
        "words_alpha.txt",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} not in {files:?}");
    }
    assert!(files.iter().all(|f| !f.contains(".part")), "{files:?}");
    let asked = hub.seen().len();
    Gsm8k::load(&net, "train").unwrap();
    ChatData::load(&net, "train").unwrap();
    assert_eq!(hub.seen().len(), asked, "cached files are not fetched again");
}

#[test]
fn the_identity_conversations_are_the_originals_online() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let cache = tempfile::tempdir().unwrap();
    let task = nanochat::tasks::identity::load(&online(&hub, cache.path()), 1).unwrap();
    let file = ChatData::custom_json(&fixtures().join("other/identity_conversations.jsonl")).unwrap();
    assert_eq!(examples(task.as_ref()), examples(&file));
    assert!(cache.path().join("identity_conversations.jsonl").is_file());
    // a mirror has none: 1,000 generated ones, and nothing asked of the server
    let asked = hub.seen().len();
    assert_eq!(nanochat::tasks::identity::load(&mirror(), 1).unwrap().len(), 1000);
    assert_eq!(hub.seen().len(), asked);
}

#[test]
fn a_cut_connection_resumes_where_it_stopped() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let cache = tempfile::tempdir().unwrap();
    let root = sources_at(&hub, cache.path());
    let path = resolve_path("cais/mmlu", "all/test-00000-of-00001.parquet");
    let bytes = std::fs::read(fixtures().join("hub/cais/mmlu/all/test-00000-of-00001.parquet")).unwrap();
    hub.cut_next(&path);
    let got = root.fetch(&[sources::mmlu("test")]).unwrap();
    assert_eq!(std::fs::read(&got[0]).unwrap(), bytes);
    let storage: Vec<_> = hub.seen().into_iter().filter(|s| s.path == format!("/storage{path}")).collect();
    assert_eq!(storage.len(), 2, "{storage:?}");
    assert_eq!(storage[0].range, None);
    assert_eq!(storage[1].range, Some(format!("bytes={}-", bytes.len() / 2)), "the second try asks for the rest");

    // a run interrupted earlier left a partial file: the next run continues it
    let words = cache.path().join("words_alpha.txt");
    let list = std::fs::read(fixtures().join("other/words_alpha.txt")).unwrap();
    std::fs::write(cache.path().join(".words_alpha.txt.part"), &list[..10]).unwrap();
    root.fetch(&[Dataset::Words]).unwrap();
    assert_eq!(std::fs::read(&words).unwrap(), list);
    let asked = hub.seen().into_iter().filter(|s| s.path == "/words_alpha.txt").collect::<Vec<_>>();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].range.as_deref(), Some("bytes=10-"));
    assert!(tree(cache.path()).iter().all(|f| !f.contains(".part")));
}

#[test]
fn processes_sharing_the_cache_download_each_file_once() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let path = resolve_path("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet");
    hub.slow(&path);
    let cache = tempfile::tempdir().unwrap();
    // the ranks of a data-parallel run load the same data at the same time
    let loaded: Vec<usize> = std::thread::scope(|s| {
        let ranks: Vec<_> =
            (0..4).map(|_| s.spawn(|| ChatData::load(&online(&hub, cache.path()), "test").unwrap().len())).collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(loaded.iter().all(|&n| n == loaded[0] && n > 0), "{loaded:?}");
    let fetched = hub.seen().into_iter().filter(|s| s.path == format!("/storage{path}")).count();
    assert_eq!(fetched, 1, "one download, the others wait for it");
    assert!(tree(cache.path()).iter().all(|f| !f.contains(".part")), "{:?}", tree(cache.path()));
}

#[test]
fn a_corrupt_download_is_refused_and_a_damaged_file_named() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let cache = tempfile::tempdir().unwrap();
    let root = sources_at(&hub, cache.path());

    // the hub's checksum does not match the bytes: every try is refused, nothing is kept
    hub.lie_about(&resolve_path("openai/gsm8k", "main/train-00000-of-00001.parquet"));
    let err = format!("{:#}", root.fetch(&[sources::gsm8k("train")]).unwrap_err());
    assert!(err.contains("SHA-256") && err.contains("failed after 3 attempts"), "{err}");
    assert!(err.contains("run the command again") && err.contains("--data-dir"), "{err}");
    assert!(tree(cache.path()).iter().all(|f| !f.contains("gsm8k")), "{:?}", tree(cache.path()));

    // a server without checksums sends something that is no parquet file (an error page)
    let plain = format!("{}/plain.parquet", hub.url);
    hub.file("/plain.parquet", b"<html>rate limited</html>".to_vec());
    let file = sources::RemoteFile {
        url: plain,
        dest: cache.path().join("plain.parquet"),
        check: sources::Check::Parquet,
        approx_bytes: None,
    };
    let err = format!("{:#}", sources::fetch_all(&[file], &hub.endpoints(), RETRY).unwrap_err());
    assert!(err.contains("not a parquet file"), "{err}");
    assert!(!cache.path().join("plain.parquet").exists());

    // a file damaged in the cache after it arrived: reading it says which file and what to do
    let arc = root.fetch(&[sources::arc("ARC-Easy", "test")]).unwrap().remove(0);
    let mut bytes = std::fs::read(&arc).unwrap();
    let middle = bytes.len() / 3;
    bytes[middle..middle + 64].iter_mut().for_each(|b| *b = !*b);
    std::fs::write(&arc, &bytes).unwrap();
    let err = ArcTask::load(&DataRoot::Online(root.clone()), ArcSubset::Easy, "test").err();
    let err = format!("{:#}", err.expect("a damaged file must not load"));
    assert!(err.contains("ARC-Easy/test-00000-of-00001.parquet") && err.contains("delete it"), "{err}");
}

#[test]
fn a_corrupt_page_in_a_training_shard_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("shard_00000.parquet");
    let docs: Vec<String> =
        (0..3000).map(|i| format!("document {i}: {}", "words and more words ".repeat(20))).collect();
    write_shard(&path, &docs).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 256].iter_mut().for_each(|b| *b = b.wrapping_add(77));
    std::fs::write(&path, &bytes).unwrap();
    let shard = Shard::open(&path).unwrap();
    let errors: Vec<String> =
        (0..shard.num_row_groups()).filter_map(|g| shard.read_texts(g).err()).map(|e| format!("{e:#}")).collect();
    assert!(!errors.is_empty(), "a corrupt page must not read as text");
    for err in errors {
        assert!(err.contains("shard_00000.parquet") && err.contains("download it again"), "{err}");
    }
}

#[test]
fn the_hub_token_goes_to_the_hub_and_nowhere_else() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let cache = tempfile::tempdir().unwrap();
    let mut endpoints = hub.endpoints();
    endpoints.hf_token = Some("hf_secret".into());
    let root = Online { endpoints, ..sources_at(&hub, cache.path()) };
    root.fetch(&[sources::humaneval(), Dataset::Words, Dataset::Identity]).unwrap();
    let seen = hub.seen();
    let on_hub: Vec<_> = seen.iter().filter(|s| s.path.starts_with("/datasets/")).collect();
    assert_eq!(on_hub.len(), 1);
    assert_eq!(on_hub[0].authorization.as_deref(), Some("Bearer hf_secret"));
    for other in seen.iter().filter(|s| !s.path.starts_with("/datasets/")) {
        assert_eq!(other.authorization, None, "{other:?} must not carry the hub's token");
    }
    assert!(seen.iter().any(|s| s.path.starts_with("/storage/")), "the file came from the storage");
}

#[test]
fn pretraining_shards_download_from_the_hub_with_checksums() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let shard = |n: usize| {
        let path = tmp.path().join(format!("src{n}.parquet"));
        let docs: Vec<String> = (0..n).map(|i| format!("document {i}")).collect();
        write_shard(&path, &docs).unwrap();
        std::fs::read(path).unwrap()
    };
    let repo = sources::PRETRAIN_REPO;
    hub.dataset_file(repo, "shard_00000.parquet", shard(10));
    hub.dataset_file(repo, "shard_00001.parquet", shard(20));
    hub.lie_about(&resolve_path(repo, "shard_00001.parquet"));
    let endpoints = hub.endpoints();
    let dir = tmp.path().join("base_data");
    let opts = DownloadOptions {
        hub: endpoints.hub_for(&endpoints.pretrain),
        base_url: endpoints.pretrain.clone(),
        shards: vec![0, 1],
        dir: dir.clone(),
        workers: 2,
        attempts: 2,
        backoff: Duration::from_millis(10),
    };
    assert!(opts.hub.is_some(), "the default shard folder is on the hub");
    let err = format!("{:#}", download(&opts).unwrap_err());
    assert!(err.contains("1 of 2 shards failed") && err.contains("SHA-256"), "{err}");
    assert_eq!(tree(&dir), ["shard_00000.parquet"]);
    assert_eq!(Shard::open(&dir.join("shard_00000.parquet")).unwrap().read_texts(0).unwrap().len(), 10);
}

#[test]
fn a_mirror_means_no_download() {
    let hub = Hub::start();
    hub.serve_fixtures();
    let root = mirror();
    ArcTask::load(&root, ArcSubset::Easy, "test").unwrap();
    ChatData::load(&root, "train").unwrap();
    load_words(&root).unwrap();
    // the command line: --data-dir is the mirror, whatever the sources' URLs say
    let base = tempfile::tempdir().unwrap();
    let mirror_dir = tempfile::tempdir().unwrap();
    let shards = mirror_dir.path().join("pretrain/gutenberg");
    std::fs::create_dir_all(&shards).unwrap();
    for name in ["shard_00000.parquet", "shard_00001.parquet"] {
        write_shard(&shards.join(name), &["a document", "another one"]).unwrap();
    }
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nanochat"));
    cmd.args(["data", "download", "--data-dir"]).arg(mirror_dir.path()).env("NANOCHAT_BASE_DIR", base.path());
    cmd.env_remove("NANOCHAT_DATA_MIRROR").envs(hub.env());
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(&base.path().join("base_data")), ["shard_00000.parquet", "shard_00001.parquet"]);
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
    // every shard-reading command's --data-dir: the mirror's shards; a directory of shards (the
    // old meaning) still works; anything else says what --data-dir is now
    let args = |data_dir: &Path| ShardArgs { data_dir: Some(data_dir.to_path_buf()), shard_dir: None };
    assert_eq!(args(mirror_dir.path()).dir().unwrap(), shards);
    assert_eq!(args(&shards).dir().unwrap(), shards);
    let err = format!("{:#}", args(base.path()).dir().unwrap_err());
    assert!(err.contains("not a data mirror") && err.contains("--shard-dir"), "{err}");
    let explicit = ShardArgs { data_dir: Some(mirror_dir.path().to_path_buf()), shard_dir: Some(base.path().into()) };
    assert_eq!(explicit.dir().unwrap(), base.path(), "--shard-dir wins");
}
