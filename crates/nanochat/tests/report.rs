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
