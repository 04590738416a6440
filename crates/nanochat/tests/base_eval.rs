//! `nanochat base eval` driven as a user would, on the fixture model saved as a base checkpoint:
//! with `--eval core,bpb --max-per-task 1` it writes the original's CSV + JSON (22 task rows and
//! CORE), prints the validation bpb and leaves the report section. And the first stages end to end,
//! tokenizer → base train → base eval → report, each leaving its section in `report.md`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use nanochat::data::dataset::write_shard;

/// The CORE bundle of the small data mirror: every task, a few items each.
fn bundle_dir() -> PathBuf {
    common::data().join("eval/eval_bundle")
}

/// The fixture tokenizer and weights as base checkpoint d2 at step 5, and a train + val shard.
fn setup(base: &Path) -> Result<()> {
    common::fixture_checkpoint(base, "base_checkpoints")?;
    let docs: Vec<String> =
        (0..20).map(|i| format!("Document {i}: the cat sat on the mat, and the dog watched.")).collect();
    write_shard(&base.join("data/shard_00000.parquet"), &docs)?;
    write_shard(&base.join("data/shard_00001.parquet"), &docs)?;
    Ok(())
}

#[test]
fn base_eval_writes_core_csv_and_json_and_the_report_section() -> Result<()> {
    let base = tempfile::tempdir()?;
    setup(base.path())?;
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["base", "eval", "--model-tag", "d2", "--eval", "core,bpb", "--max-per-task", "1"])
        .args(["--eval-tokens", "128", "--device-batch-size", "2"])
        .arg("--bundle-dir")
        .arg(bundle_dir())
        .arg("--data-dir")
        .arg(base.path().join("data"))
        .env("NANOCHAT_BASE_DIR", base.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "base eval failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("CORE ") && stdout.contains("validation bpb"), "{stdout}");

    let csv = std::fs::read_to_string(base.path().join("base_eval/base_d2_000005.csv"))?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 22 + 1, "header, 22 tasks, CORE:\n{csv}");
    assert!(lines[0].starts_with("Task") && lines[23].starts_with("CORE"), "{csv}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.path().join("base_eval/base_d2_000005.json"))?)?;
    assert_eq!(json["tasks"].as_array().context("tasks")?.len(), 22);
    let core = json["core"].as_f64().context("core")?;
    assert!(core.is_finite() && core <= 1.0, "{core}");

    let section: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.path().join("report/base_eval.json"))?)?;
    assert_eq!(section["metrics"]["core"].as_f64(), Some(core));
    assert!(section["metrics"]["val_bpb"].as_f64().is_some_and(|b| b > 0.0), "{section}");
    Ok(())
}

fn nanochat(base: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat")).args(args).env("NANOCHAT_BASE_DIR", base).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "nanochat {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

#[test]
fn tokenizer_base_train_and_eval_sections_assemble_into_the_report() -> Result<()> {
    let base = tempfile::tempdir()?;
    let data = base.path().join("data");
    let docs: Vec<String> =
        (0..60).map(|i| format!("Story {i}: the cat sat on the mat while {} dogs watched the river.", i % 7)).collect();
    write_shard(&data.join("shard_00000.parquet"), &docs)?;
    write_shard(&data.join("shard_00001.parquet"), &docs[..10])?;
    let data = data.to_str().context("temp path")?;
    let bundle = bundle_dir();
    let b = base.path();
    nanochat(b, &["tok", "train", "--vocab-size", "300", "--data-dir", data])?;
    let train = [
        "base",
        "train",
        "--depth",
        "1",
        "--n-embd",
        "64",
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "128",
        "--num-iterations",
        "3",
        "--eval-every",
        "3",
        "--eval-tokens",
        "128",
        "--sample-every",
        "0",
        "--data-dir",
        data,
    ];
    nanochat(b, &train)?;
    let bundle = bundle.to_str().context("bundle path")?;
    let eval = [
        "base",
        "eval",
        "--model-tag",
        "d1",
        "--max-per-task",
        "1",
        "--eval-tokens",
        "128",
        "--device-batch-size",
        "4",
        "--bundle-dir",
        bundle,
        "--data-dir",
        data,
    ];
    nanochat(b, &eval)?;
    nanochat(b, &["report"])?;
    let md = std::fs::read_to_string(b.join("report/report.md"))?;
    println!("{md}");
    for section in ["## tokenizer", "## base_train", "## base_eval", "bytes/token", "final validation bpb", "Samples"] {
        assert!(md.contains(section), "{section} missing from:\n{md}");
    }
    assert!(md.contains("| CORE | ") && !md.contains("| CORE | - |"), "{md}");
    assert!(std::fs::read_to_string(b.join("report/loss.svg"))?.contains("<polyline"));
    Ok(())
}
