//! `nanochat speedrun`, run as the binary on a temporary `$NANOCHAT_BASE_DIR` with the small data
//! mirror (tests/fixtures/mirror): the presets are valid command lines; the `micro` preset runs every stage and leaves
//! each one's output and the report; an interrupted training stage resumes from its checkpoint to
//! the same bytes; a rerun skips finished stages; a changed stage reruns with every stage after it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn mirror() -> PathBuf {
    common::data()
}

/// Runs `nanochat speedrun ARGS` on `base`; returns whether it succeeded and its output (stdout, then stderr).
fn speedrun(base: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .arg("speedrun")
        .args(args)
        .env("NANOCHAT_BASE_DIR", base)
        .env_remove("NANOCHAT_DATA_MIRROR")
        .env_remove("NANOCHAT_DATA_DIR")
        // no test touches the internet: the online sources are a closed port here
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("NANOCHAT_DATA_URL")
        .env("NANOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
        .env("NANOCHAT_IDENTITY_URL", "http://127.0.0.1:9/identity_conversations.jsonl")
        .env("NANOCHAT_WORDS_URL", "http://127.0.0.1:9/words_alpha.txt")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// [`speedrun`] that must succeed.
fn speedrun_ok(base: &Path, args: &[&str]) -> String {
    let (ok, text) = speedrun(base, args);
    assert!(ok, "speedrun {args:?} failed:\n{text}");
    text
}

/// The row of `stage` in the printed summary table.
fn row<'a>(output: &'a str, stage: &str) -> &'a str {
    let prefix = format!("| {stage} |");
    output.lines().rev().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no row {stage} in:\n{output}"))
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// The report's summary table (the metrics of every stage).
fn summary_table(base: &Path) -> String {
    let report = std::fs::read_to_string(base.join("report/report.md")).unwrap();
    let start = report.find("## Summary").unwrap();
    let end = report[start..].find("\n## ").map_or(report.len(), |i| start + i);
    report[start..end].to_string()
}

#[test]
fn presets_are_valid_and_errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let data = mirror();
    let data = data.to_str().unwrap();
    let list = speedrun_ok(base, &["--list-presets"]);
    for preset in ["micro", "cpu-tiny", "cpu-small", "d20", "d26"] {
        assert!(list.contains(preset), "{list}");
        // the dry run parses every stage's command line with that command's own options
        let plan = speedrun_ok(base, &["--preset", preset, "--dry-run", "--data-dir", data]);
        assert!(plan.contains("base-train") && plan.contains("nanochat sft train"), "{plan}");
    }
    // without a mirror every stage has its online source: the plan lists what it would download
    // (tests/speedrun_online.rs checks the list against a local server)
    let (ok, text) = speedrun(base, &["--preset", "d20", "--dry-run"]);
    assert!(ok && text.contains("mid-train") && text.contains("downloads into"), "{text}");

    // a user's preset: the JSON of a built-in one, edited; a typo in a stage fails before anything runs
    let json = speedrun_ok(base, &["--preset", "micro", "--show-preset"]);
    let file = base.join("mine.json");
    std::fs::write(&file, json.replace("\"--depth\"", "\"--depht\"")).unwrap();
    let (ok, text) = speedrun(base, &["--preset-file", file.to_str().unwrap(), "--data-dir", data]);
    assert!(!ok && text.contains("base-train") && text.contains("--depht"), "{text}");
    assert!(!base.join("speedrun").exists() && !base.join("base_data").exists());
    let (ok, text) = speedrun(base, &["--preset", "micro", "--data-dir", data, "--until", "nope"]);
    assert!(!ok && text.contains("tok-train"), "{text}");
}

#[test]
fn micro_runs_every_stage_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let data = mirror();
    let micro = ["--preset", "micro", "--data-dir", data.to_str().unwrap()];
    let with = |extra: &[&'static str]| [&micro[..], extra].concat();

    // 1. up to the base model only
    let out = speedrun_ok(base, &with(&["--until", "base-train"]));
    assert!(row(&out, "base-train").contains("| run |") && row(&out, "mid-train").contains("| stop"), "{out}");
    let ckpt = base.join("base_checkpoints/d1");
    let final_model = ckpt.join("model_000006.safetensors");
    let bytes = std::fs::read(&final_model).unwrap();
    assert!(ckpt.join("model_000003.safetensors").exists() && !base.join("mid_checkpoints").exists());

    // 2. interrupted after its step-3 checkpoint: the marker says started, not finished
    let marker_path = base.join("speedrun/base-train.json");
    let mut marker: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker_path).unwrap()).unwrap();
    marker["finished_at"] = serde_json::Value::Null;
    std::fs::write(&marker_path, marker.to_string()).unwrap();
    for name in ["model_000006.safetensors", "optim_000006.safetensors", "meta_000006.json"] {
        std::fs::remove_file(ckpt.join(name)).unwrap();
    }
    let out = speedrun_ok(base, &with(&["--until", "base-train"]));
    assert!(row(&out, "tok-train").contains("| skip"), "{out}");
    assert!(row(&out, "base-train").contains("| resume from step 3 |"), "{out}");
    assert_eq!(std::fs::read(&final_model).unwrap(), bytes, "the resumed run must end where the first one did");
    let trained_at = mtime(&final_model);

    // 3. the rest of the pipeline; the finished stages are skipped
    let out = speedrun_ok(base, &micro);
    for stage in ["data", "tok-train", "tok-eval", "base-train"] {
        assert!(row(&out, stage).contains("| skip"), "{out}");
    }
    for stage in ["base-eval", "mid-train", "sft-train", "chat-eval"] {
        assert!(row(&out, stage).contains("| run |"), "{out}");
    }
    assert_eq!(mtime(&final_model), trained_at);
    for output in [
        "tokenizer/tokenizer.json",
        "mid_checkpoints/d1/model_000004.safetensors",
        "chatsft_checkpoints/d1/model_000003.safetensors",
        "report/chat_eval_sft.json",
        "report/loss.svg",
    ] {
        assert!(base.join(output).exists(), "{output} is missing");
    }
    let report = std::fs::read_to_string(base.join("report/report.md")).unwrap();
    for part in ["| CORE |", "| ChatCORE |", "## speedrun", "| base-train |", "| chat-eval |"] {
        assert!(report.contains(part), "the report has no {part}:\n{report}");
    }
    assert!(out.contains("report/report.md") && out.contains("chat -g d1") && out.contains("serve -g d1"), "{out}");
    let table = summary_table(base);

    // 4. nothing left to do: everything is skipped and the report says the same
    let out = speedrun_ok(base, &micro);
    assert!(!out.contains("| run |"), "{out}");
    assert_eq!(summary_table(base), table);
    // a finished stage whose checkpoints are gone runs again, and so does everything after it
    std::fs::rename(base.join("mid_checkpoints"), base.join("moved")).unwrap();
    let plan = speedrun_ok(base, &with(&["--dry-run"]));
    let action = |stage: &str| plan.lines().find(|l| l.trim_start().starts_with(stage)).unwrap().to_string();
    assert!(action("base-eval").contains("skip") && action("mid-train").contains(" run "), "{plan}");
    assert!(action("chat-eval").contains(" run "), "{plan}");
    std::fs::rename(base.join("moved"), base.join("mid_checkpoints")).unwrap();
    let sft_model = base.join("chatsft_checkpoints/d1/model_000003.safetensors");
    let sft_at = mtime(&sft_model);

    // 5. a changed stage reruns, and so does every stage after it, from scratch
    let json = speedrun_ok(base, &["--preset", "micro", "--show-preset"]);
    let changed = json.replace("\"--max-problems\",\n        \"3\"", "\"--max-problems\",\n        \"2\"");
    assert_ne!(changed, json, "the test's edit must change the preset");
    let file = base.join("changed.json");
    std::fs::write(&file, changed).unwrap();
    let out = speedrun_ok(base, &["--preset-file", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert!(row(&out, "sft-train").contains("| skip") && row(&out, "chat-eval").contains("| run |"), "{out}");
    let out = speedrun_ok(base, &with(&["--from", "sft-train"]));
    assert!(row(&out, "mid-train").contains("| skip") && row(&out, "sft-train").contains("| run |"), "{out}");
    assert!(row(&out, "chat-eval").contains("| run |"), "{out}");
    assert!(mtime(&sft_model) > sft_at);
}
