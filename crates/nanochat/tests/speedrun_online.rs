//! `nanochat speedrun` without a data mirror, against a local stand-in for the online sources
//! (`hub/`: the fixture datasets in the hub's layout, two generated pretraining shards, a generated
//! CORE bundle): `--dry-run` lists what the stages would download with the servers' sizes (and
//! still runs offline, saying the sizes are unknown); the `micro` preset downloads exactly those
//! files and runs every stage on them; with a mirror nothing is downloaded.

mod hub;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use hub::Hub;
use nanochat::data::dataset::write_shard;
use nanochat::data::sources::PRETRAIN_REPO;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

/// `n` documents of made-up sentences, the same for the same seed.
fn documents(n: usize, seed: u64) -> Vec<String> {
    let words = "the a river mountain reads writes small large quickly slowly bird tree city light \
                 morning evening stone water friend story learns finds carries under over near"
        .split_whitespace()
        .collect::<Vec<_>>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let sentences: Vec<String> = (0..8)
                .map(|_| {
                    let s: Vec<&str> = (0..10).map(|_| *words.choose(&mut rng).unwrap()).collect();
                    format!("{}.", s.join(" "))
                })
                .collect();
            sentences.join(" ")
        })
        .collect()
}

fn shard_bytes(docs: &[String]) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.parquet");
    write_shard(&path, docs).unwrap();
    std::fs::read(path).unwrap()
}

/// A small CORE bundle in the original's layout, one task of each kind, inside a top folder.
fn bundle_zip() -> Vec<u8> {
    let yaml = "icl_tasks:\n\
                - label: copa\n  dataset_uri: commonsense_reasoning/copa.jsonl\n  num_fewshot:\n  - 0\n  icl_task_type: multiple_choice\n\
                - label: winograd\n  dataset_uri: language_understanding/winograd_wsc.jsonl\n  num_fewshot:\n  - 0\n  icl_task_type: schema\n\
                - label: lambada_openai\n  dataset_uri: language_understanding/lambada_openai.jsonl\n  num_fewshot:\n  - 0\n  icl_task_type: language_modeling\n";
    let csv = "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n\
               copa,commonsense reasoning,multiple choice,0,2,50,,x\n\
               winograd,language understanding,schema,0,2,50,,x\n\
               lambada_openai,language understanding,language modeling,0,2,0,,x\n";
    let copa =
        "{\"query\": \"The river was high because\", \"choices\": [\"it rained\", \"it was dry\"], \"gold\": 0}\n\
                {\"query\": \"The bird sang because\", \"choices\": [\"it was morning\", \"stone\"], \"gold\": 0}\n";
    let wino = "{\"context_options\": [\"The friend reads\", \"The stone reads\"], \"continuation\": \"a story.\", \"gold\": 0}\n\
                {\"context_options\": [\"The tree carries\", \"The bird carries\"], \"continuation\": \"water.\", \"gold\": 1}\n";
    let lambada = "{\"context\": \"the bird finds the\", \"continuation\": \" tree\"}\n\
                   {\"context\": \"a friend reads a\", \"continuation\": \" story\"}\n";
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, text) in [
        ("core.yaml", yaml),
        ("eval_meta_data.csv", csv),
        ("eval_data/commonsense_reasoning/copa.jsonl", copa),
        ("eval_data/language_understanding/winograd_wsc.jsonl", wino),
        ("eval_data/language_understanding/lambada_openai.jsonl", lambada),
    ] {
        zip.start_file(format!("eval_bundle/{name}"), options).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// The hub with everything the micro preset reads online.
fn hub_for_micro() -> Hub {
    let hub = Hub::start();
    hub.serve_fixtures();
    hub.dataset_file(PRETRAIN_REPO, "shard_00000.parquet", shard_bytes(&documents(400, 1)));
    hub.dataset_file(PRETRAIN_REPO, "shard_00001.parquet", shard_bytes(&documents(60, 2)));
    hub.file("/eval_bundle.zip", bundle_zip());
    hub
}

/// Runs `nanochat speedrun ARGS` on `base` with the sources in `env`; (succeeded, stdout + stderr).
fn speedrun(base: &Path, env: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .arg("speedrun")
        .args(args)
        .env("NANOCHAT_BASE_DIR", base)
        .env_remove("NANOCHAT_DATA_MIRROR")
        .env_remove("NANOCHAT_DATA_DIR")
        .env_remove("NANOCHAT_DATA_URL")
        .env_remove("HF_TOKEN")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The URLs of the dry run's download list, as paths on the hub, sorted.
fn listed(plan: &str, hub: &Hub) -> Vec<String> {
    let start = plan.find("downloads into").unwrap_or_else(|| panic!("no download list in:\n{plan}"));
    let mut paths: Vec<String> = plan[start..]
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.strip_prefix(&hub.url).map(str::to_string))
        .collect();
    paths.sort();
    paths
}

#[test]
fn micro_dry_run_lists_what_it_would_download() {
    let hub = hub_for_micro();
    let base = tempfile::tempdir().unwrap();
    let (ok, plan) = speedrun(base.path(), &hub.env(), &["--preset", "micro", "--dry-run"]);
    assert!(ok, "{plan}");
    let paths = listed(&plan, &hub);
    let expect = [
        "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet",
        "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00001.parquet",
        "/eval_bundle.zip",
        "/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00003-of-00004.parquet",
        "/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/test-00000-of-00001.parquet",
        "/datasets/cais/mmlu/resolve/main/all/auxiliary_train-00000-of-00001.parquet",
        "/datasets/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",
        "/datasets/allenai/ai2_arc/resolve/main/ARC-Challenge/train-00000-of-00001.parquet",
        "/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet",
        "/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet",
        "/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet",
        "/datasets/openai/openai_humaneval/resolve/main/openai_humaneval/test-00000-of-00001.parquet",
        "/identity_conversations.jsonl",
        "/words_alpha.txt",
    ];
    for path in expect {
        assert!(paths.iter().any(|p| p == path), "{path} is not listed:\n{plan}");
    }
    assert_eq!(paths.len(), 19, "{plan}");
    // sizes from the servers: the exact bytes of each file, and their total
    let words = std::fs::metadata(hub::fixtures().join("other/words_alpha.txt")).unwrap().len();
    let line = plan.lines().find(|l| l.contains("/words_alpha.txt")).unwrap();
    assert!(line.contains(&format!("{words} B")), "{line}");
    assert!(plan.contains("total: 19 files") && !plan.contains("unknown"), "{plan}");
    assert!(hub.seen().iter().all(|s| s.method == "HEAD"), "a dry run downloads nothing");
    println!("{plan}");

    // offline: the plan still comes, the sizes are the sources' estimates or unknown
    let offline: Vec<(&str, String)> =
        hub.env().into_iter().map(|(k, _)| (k, "http://127.0.0.1:9".to_string())).collect();
    let (ok, plan) = speedrun(base.path(), &offline, &["--preset", "micro", "--dry-run"]);
    assert!(ok, "{plan}");
    assert!(plan.contains("size unknown") && plan.contains("~100.0 MB") && plan.contains("offline?"), "{plan}");

    // with a mirror there is nothing to download
    let asked = hub.seen().len();
    let mirror = hub::fixtures().join("mirror");
    let (ok, plan) =
        speedrun(base.path(), &hub.env(), &["--preset", "micro", "--dry-run", "--data-dir", mirror.to_str().unwrap()]);
    assert!(ok && plan.contains("downloads: none"), "{plan}");
    assert_eq!(hub.seen().len(), asked);
}

#[test]
fn micro_runs_every_stage_on_the_online_sources() {
    let hub = hub_for_micro();
    let base = tempfile::tempdir().unwrap();
    let (ok, plan) = speedrun(base.path(), &hub.env(), &["--preset", "micro", "--dry-run"]);
    assert!(ok, "{plan}");
    let planned = listed(&plan, &hub);
    let (ok, out) = speedrun(base.path(), &hub.env(), &["--preset", "micro"]);
    assert!(ok, "{out}");
    assert_eq!(hub.downloaded(), planned, "the run downloads exactly what the dry run listed");
    println!("downloaded by `speedrun --preset micro` from the local hub:\n  {}", hub.downloaded().join("\n  "));
    for output in [
        "base_data/shard_00001.parquet",
        "eval_bundle/core.yaml",
        "task_data/HuggingFaceTB--smol-smoltalk/data/train-00000-of-00004.parquet",
        "words_alpha.txt",
        "identity_conversations.jsonl",
        "chatsft_checkpoints/d1/model_000003.safetensors",
        "report/chat_eval_sft.json",
    ] {
        assert!(base.path().join(output).exists(), "{output} is missing:\n{out}");
    }
    let report = std::fs::read_to_string(base.path().join("report/report.md")).unwrap();
    assert!(report.contains("| CORE |") && report.contains("| ChatCORE |"), "{report}");
    // the mixtures are the original's: SmolTalk and MMLU's auxiliary_train
    let mid = std::fs::read_to_string(base.path().join("report/mid_train.json")).unwrap();
    assert!(mid.contains("SmolTalk-train") && mid.contains("MMLU-auxiliary_train"), "{mid}");

    // everything is in place now: a rerun downloads nothing
    let before = hub.downloaded().len();
    let (ok, out) = speedrun(base.path(), &hub.env(), &["--preset", "micro", "--force"]);
    assert!(ok, "{out}");
    assert_eq!(hub.downloaded().len(), before);
}
