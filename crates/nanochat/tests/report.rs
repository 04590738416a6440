//! The report card: sections written by (fake) stages assemble into `report.md` with the summary
//! table filled where stages reported and "-" elsewhere, the loss plot is well-formed SVG, and a
//! missing report directory is a clear error.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use nanochat::report::{generate, loss_curves, loss_svg, write_section_to};
use serde_json::json;

/// Fake stages: the tokenizer, base eval (CORE), an SFT chat eval over two tasks, a base training
/// run's metrics log.
fn fake_pipeline(base: &Path) -> Result<()> {
    let dir = base.join("report");
    write_section_to(
        &dir,
        "chat_eval_sft",
        "- ARC-Easy: 0.5\n",
        json!({"tasks": {"ARC-Easy": 0.5, "GSM8K": 0.125}, "chatcore": 0.25, "seconds": 30.0}),
    )?;
    write_section_to(&dir, "tokenizer", "- vocab: 1024\n", json!({"seconds": 2.5, "vocab_size": 1024}))?;
    write_section_to(&dir, "base_eval", "- CORE: 0.1234\n", json!({"core": 0.1234, "seconds": 125.0}))?;
    let run = base.join("base_checkpoints/d1");
    std::fs::create_dir_all(&run)?;
    let lines: Vec<String> = (0..10)
        .map(|s| json!({"step": s, "loss": 5.0 - s as f64 * 0.3, "smooth_loss": 5.0 - s as f64 * 0.25}).to_string())
        .chain(std::iter::once(json!({"step": 10, "val_bpb": 1.5}).to_string()))
        .collect();
    std::fs::write(run.join("metrics.jsonl"), lines.join("\n") + "\n")?;
    Ok(())
}

#[test]
fn sections_assemble_into_a_report_with_the_summary_table() -> Result<()> {
    let base = tempfile::tempdir()?;
    fake_pipeline(base.path())?;
    let path = generate(base.path())?;
    let md = std::fs::read_to_string(&path)?;
    println!("{md}");
    assert!(md.contains("| CORE | 0.1234 | - | - | - |"), "{md}");
    assert!(md.contains("| ARC-Easy | - | - | 0.5000 | - |"), "{md}");
    assert!(md.contains("| GSM8K | - | - | 0.1250 | - |"), "{md}");
    assert!(md.contains("| MMLU | - | - | - | - |"), "{md}");
    assert!(md.contains("| ChatCORE | - | - | 0.2500 | - |"), "{md}");
    assert!(md.contains("| SpellingBee | - | - | - | - |"), "every task the chat evals run has a row: {md}");
    assert!(md.contains("- CPU: ") && md.contains("- Commit: ") && md.contains("- GPU: "), "{md}");
    // pipeline order, whatever order the stages wrote in, each with its wall clock
    let at = |s: &str| md.find(s).unwrap_or(usize::MAX);
    assert!(at("## tokenizer") < at("## base_eval") && at("## base_eval") < at("## chat_eval_sft"), "{md}");
    assert!(md.contains("Wall clock: 2.5s") && md.contains("Wall clock: 2m05s"), "{md}");
    assert!(md.contains("![training loss](loss.svg)"));
    assert!(base.path().join("report/loss.svg").is_file());
    Ok(())
}

#[test]
fn the_loss_plot_is_well_formed_svg_with_a_polyline() -> Result<()> {
    let base = tempfile::tempdir()?;
    fake_pipeline(base.path())?;
    let curves = loss_curves(base.path())?;
    assert_eq!(curves.len(), 1);
    assert_eq!(curves[0].0, "base/d1");
    assert_eq!(curves[0].1.len(), 10, "only records with a loss are plotted");
    assert_eq!(curves[0].1[1], (1.0, 4.75), "the smoothed loss is preferred");
    let svg = loss_svg(&curves);
    assert!(svg.contains("<polyline") && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    // a real XML parser where one is at hand (python3 is already needed for HumanEval)
    let file = base.path().join("loss.svg");
    std::fs::write(&file, &svg)?;
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom as m; d = m.parse(sys.argv[1]); assert d.getElementsByTagName('polyline')",
        ])
        .arg(&file)
        .output()
    {
        ensure!(out.status.success(), "the SVG is not well-formed XML: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn nanochat_report_writes_the_report_or_says_to_run_a_stage_first() -> Result<()> {
    let base = tempfile::tempdir()?;
    let report =
        || Command::new(env!("CARGO_BIN_EXE_nanochat")).arg("report").env("NANOCHAT_BASE_DIR", base.path()).output();
    let out = report()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run a stage first"), "{err}");

    fake_pipeline(base.path())?;
    let out = report()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("report.md"));
    assert!(base.path().join("report/report.md").is_file());

    // `report reset` removes the sections and the assembled report, and nothing else.
    let keep = base.path().join("report/notes.txt");
    std::fs::write(&keep, "mine")?;
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["report", "reset"])
        .env("NANOCHAT_BASE_DIR", base.path())
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut left: Vec<String> = std::fs::read_dir(base.path().join("report"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    left.sort();
    assert_eq!(left, ["notes.txt"]);
    let out = report()?;
    assert!(!out.status.success(), "no sections after a reset");
    Ok(())
}

/// A pipeline whose base training and base eval measured bits per byte over different amounts of
/// text, whose midtraining measured its own, and whose RL never saw a reward.
fn pipeline_with_rl(base: &Path, rewards: &[f64]) -> Result<()> {
    let dir = base.join("report");
    write_section_to(&dir, "base_train", "- steps: 10\n", json!({"val_bpb": 2.0332, "eval_tokens": 81920}))?;
    write_section_to(
        &dir,
        "base_eval",
        "- CORE: 0.01\n",
        json!({"core": 0.01, "val_bpb": 2.0627, "eval_tokens": 1048576}),
    )?;
    write_section_to(&dir, "mid_train", "- steps: 5\n", json!({"val_bpb": 1.5341}))?;
    write_section_to(&dir, "chat_eval_sft", "", json!({"tasks": {"SpellingBee": 0.18}}))?;
    write_section_to(&dir, "rl_train", "- steps: 3\n", json!({"rewards": rewards, "steps": rewards.len()}))?;
    let run = base.join("chatrl_checkpoints/d1");
    std::fs::create_dir_all(&run)?;
    let lines: Vec<String> =
        rewards.iter().enumerate().map(|(s, r)| json!({"step": s, "reward": r, "pg_loss": 0.0}).to_string()).collect();
    std::fs::write(run.join("metrics.jsonl"), lines.join("\n") + "\n")?;
    Ok(())
}

#[test]
fn the_summary_explains_its_bpb_figures_and_says_when_rl_learned_nothing() -> Result<()> {
    let base = tempfile::tempdir()?;
    pipeline_with_rl(base.path(), &[0.0, 0.0, 0.0])?;
    let md = std::fs::read_to_string(generate(base.path())?)?;
    println!("{md}");
    assert!(md.contains("| Val bpb | 2.0627 | 1.5341 | - | - |"), "base eval's bpb, and midtraining's: {md}");
    assert!(md.contains("| SpellingBee | - | - | 0.1800 | - |"), "{md}");
    assert!(md.contains("2.0627 from base eval over up to 1048576 validation tokens"), "{md}");
    assert!(md.contains("base training measured 2.0332 over up to 81920 validation tokens at its last step"), "{md}");
    assert!(md.contains("RL learned nothing: the mean reward was 0 at every one of its 3 steps"), "{md}");
    assert!(md.contains("mean reward per step (every step): 0: 0.000, 1: 0.000, 2: 0.000"), "{md}");
    let curves = loss_curves(base.path())?;
    assert_eq!(curves.len(), 1);
    assert_eq!(curves[0].0, "chatrl/d1 mean reward", "RL plots its reward, not its surrogate loss");

    // an RL run that got some reward: no warning
    let base = tempfile::tempdir()?;
    pipeline_with_rl(base.path(), &[0.0, 0.125, 0.25])?;
    let md = std::fs::read_to_string(generate(base.path())?)?;
    assert!(!md.contains("RL learned nothing"), "{md}");
    assert!(md.contains("1: 0.125, 2: 0.250"), "{md}");
    Ok(())
}

#[test]
fn each_curve_gets_a_panel_with_round_ticks_on_both_axes() -> Result<()> {
    let curves = vec![
        ("base/d1".to_string(), (0..=100).map(|s| (s as f64, 10.0 - s as f64 * 0.07)).collect()),
        ("chatrl/d1 mean reward".to_string(), vec![(0.0, 0.0), (1.0, 0.5)]),
    ];
    let svg = loss_svg(&curves);
    assert_eq!(svg.matches("<polyline").count(), 2);
    // x ticks 0, 20, ..., 100 of the first panel, y ticks 4, 6, 8, 10 (loss from 3 to 10), 0.1 apart for RL
    for tick in [">0<", ">20<", ">100<", ">4<", ">10<", ">0.5<"] {
        assert!(svg.contains(tick), "no tick label {tick}: {svg}");
    }
    assert!(svg.contains(">reward<") && svg.contains(">loss<") && svg.contains(">step<"));
    Ok(())
}
