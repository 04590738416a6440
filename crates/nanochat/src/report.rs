//! The report card (`nanochat report`), as in the original's `report.py`: every stage writes a
//! section (markdown for people, metrics as JSON for the summary table) into
//! `$NANOCHAT_BASE_DIR/report/`; `nanochat report` assembles them into `report/report.md` with the
//! environment, each stage's wall clock, the summary table and an SVG plot of the loss curves.
//!
//! Sections are separate files, written atomically, so that stages can run in any order, be
//! rerun (the newer section replaces the older) or crash without spoiling the others.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::write_atomic;

/// Section names in pipeline order; the report lists them so, then any others by name.
const PIPELINE: [&str; 10] = [
    "tokenizer",
    "base_train",
    "base_eval",
    "chat_eval_base",
    "mid_train",
    "chat_eval_mid",
    "sft_train",
    "chat_eval_sft",
    "rl_train",
    "chat_eval_rl",
];

/// Rows of the summary table: `CORE` comes from `base_eval`, the rest from `chat_eval_<stage>`.
const TABLE_ROWS: [&str; 7] = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"];
const TABLE_STAGES: [&str; 4] = ["base", "mid", "sft", "rl"];

/// One stage's contribution to the report, as stored in `report/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub markdown: String,
    /// Numbers for the summary table and the wall clock (`"seconds"`), by convention:
    /// `base_eval` has `"core"`; `chat_eval_<stage>` has `"tasks": {name: accuracy}` and `"chatcore"`.
    pub metrics: Value,
    /// When the section was written, seconds since the Unix epoch.
    pub written_at: u64,
}

/// `$NANOCHAT_BASE_DIR/report`.
pub fn report_dir() -> PathBuf {
    crate::common::base_dir().join("report")
}

/// Writes the section `name` into the report directory, replacing an earlier one of that name.
pub fn write_section(name: &str, markdown: &str, metrics: Value) -> Result<PathBuf> {
    write_section_to(&report_dir(), name, markdown, metrics)
}

/// [`write_section`] into `dir`.
pub fn write_section_to(dir: &Path, name: &str, markdown: &str, metrics: Value) -> Result<PathBuf> {
    let written_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let section = Section { name: name.to_string(), markdown: markdown.to_string(), metrics, written_at };
    let path = dir.join(format!("{name}.json"));
    write_atomic(&path, &serde_json::to_vec_pretty(&section)?)?;
    Ok(path)
}

/// Reads every section in `dir`, in pipeline order.
pub fn read_sections(dir: &Path) -> Result<Vec<Section>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no report sections in {}: run a stage first (e.g. `nanochat tok train`)", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut sections = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let section: Section = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a report section: delete it or rerun its stage", path.display()))?;
            sections.push(section);
        }
    }
    if sections.is_empty() {
        bail!("no report sections in {}: run a stage first (e.g. `nanochat tok train`)", dir.display());
    }
    let rank = |name: &str| PIPELINE.iter().position(|&p| p == name).unwrap_or(PIPELINE.len());
    sections.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)).then_with(|| a.name.cmp(&b.name)));
    Ok(sections)
}

/// `nanochat report`: assembles the report under `$NANOCHAT_BASE_DIR` and says where it is.
pub fn run(args: ReportArgs) -> Result<()> {
    let base = crate::common::base_dir();
    match args.command {
        None => {
            let path = generate(&base)?;
            println!("report written to {}", path.display());
        }
        Some(ReportCommand::Reset) => {
            let removed = reset(&base.join("report"))?;
            println!("removed {removed} report files; the stages write their sections again as they run");
        }
    }
    Ok(())
}

/// `nanochat report [reset]`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub command: Option<ReportCommand>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ReportCommand {
    /// Start a new report: delete the sections, report.md and loss.svg (nothing else).
    Reset,
}

/// Deletes what the report is made of in `dir`: the section files, `report.md` and `loss.svg`;
/// other files are left alone. Returns how many files went.
pub fn reset(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let is_section = path.extension().is_some_and(|e| e == "json")
            && std::fs::read_to_string(&path).is_ok_and(|t| serde_json::from_str::<Section>(&t).is_ok());
        if is_section || name == "report.md" || name == "loss.svg" {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Assembles `base/report/report.md` (and `loss.svg` beside it when there are loss curves).
pub fn generate(base: &Path) -> Result<PathBuf> {
    let dir = base.join("report");
    let sections = read_sections(&dir)?;
    let mut md = String::from("# nanochat training report\n\n");
    md.push_str(&environment());
    md.push_str("\n## Summary\n\n");
    md.push_str(&summary_table(&sections));
    let curves = loss_curves(base)?;
    if !curves.is_empty() {
        write_atomic(&dir.join("loss.svg"), loss_svg(&curves).as_bytes())?;
        md.push_str("\n## Training loss\n\n![training loss](loss.svg)\n");
    }
    for section in &sections {
        let _ = write!(md, "\n## {}\n\n", section.name);
        if let Some(seconds) = section.metrics.get("seconds").and_then(Value::as_f64) {
            let _ = writeln!(md, "Wall clock: {}\n", format_duration(seconds));
        }
        md.push_str(section.markdown.trim_end());
        md.push('\n');
    }
    let path = dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// The summary table of the original: a row per metric, a column per stage, "-" where missing.
pub fn summary_table(sections: &[Section]) -> String {
    let find = |name: &str| sections.iter().find(|s| s.name == name).map(|s| &s.metrics);
    let cell = |row: &str, stage: &str| -> Option<f64> {
        match row {
            "CORE" if stage == "base" => find("base_eval")?.get("core")?.as_f64(),
            "CORE" => None,
            "ChatCORE" => find(&format!("chat_eval_{stage}"))?.get("chatcore")?.as_f64(),
            task => find(&format!("chat_eval_{stage}"))?.get("tasks")?.get(task)?.as_f64(),
        }
    };
    let mut table = String::from("| Metric | BASE | MID | SFT | RL |\n|---|---|---|---|---|\n");
    for row in TABLE_ROWS {
        let cells: Vec<String> = TABLE_STAGES
            .iter()
            .map(|stage| cell(row, stage).map_or_else(|| "-".to_string(), |v| format!("{v:.4}")))
            .collect();
        let _ = writeln!(table, "| {row} | {} |", cells.join(" | "));
    }
    table
}

/// The machine the pipeline ran on, the commit and the date.
fn environment() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or_else(|| "unknown".to_string(), |kb| format!("{:.1} GiB", kb / (1024.0 * 1024.0)));
    let gpu = if candle_core::utils::cuda_is_available() { "CUDA" } else { "none" };
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".to_string(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!(
        "## Environment\n\n- Date: {}\n- CPU: {cpu} ({cores} cores)\n- Memory: {memory}\n- GPU: {gpu}\n- Commit: {commit}\n",
        format_utc(now)
    )
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (the civil-from-days algorithm, to avoid a date crate).
fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hour, minute) = (secs % 86_400 / 3600, secs % 3600 / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{seconds:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60),
    }
}

/// One training run's loss by step: `(label, points)`.
pub type Curve = (String, Vec<(f64, f64)>);

/// The loss curves of every `*_checkpoints/<tag>/metrics.jsonl` under `base`, labelled
/// `<stage>/<tag>`; the smoothed loss where logged, else the raw one.
pub fn loss_curves(base: &Path) -> Result<Vec<Curve>> {
    let mut curves = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else { return Ok(curves) };
    let mut stage_dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("_checkpoints")))
        .collect();
    stage_dirs.sort();
    for stage_dir in stage_dirs {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(&stage_dir)
            .with_context(|| format!("listing {}", stage_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path().join("metrics.jsonl")))
            .filter(|p| p.is_file())
            .collect();
        runs.sort();
        for metrics in runs {
            let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
            let points: Vec<(f64, f64)> = text
                .lines()
                .filter_map(|line| {
                    let v: Value = serde_json::from_str(line).ok()?;
                    let loss = v.get("smooth_loss").or_else(|| v.get("loss")).or_else(|| v.get("train_loss"))?;
                    Some((v.get("step")?.as_f64()?, loss.as_f64()?))
                })
                .filter(|(_, loss)| loss.is_finite())
                .collect();
            if !points.is_empty() {
                let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let stage = name(&stage_dir).trim_end_matches("_checkpoints").to_string();
                let tag = metrics.parent().map(name).unwrap_or_default();
                curves.push((format!("{stage}/{tag}"), points));
            }
        }
    }
    Ok(curves)
}

/// A line plot of `curves` as a standalone SVG: axes with their ranges, one polyline per curve
/// and a legend. Written by hand: a plotting crate would cost more build time than this.
pub fn loss_svg(curves: &[Curve]) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 20.0, 50.0);
    let points = curves.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    // a single point or a flat line still needs a non-empty range to scale by
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut svg = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" \
         height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
        w - left - right,
        h - top - bottom
    );
    let (xb, yb) = (h - bottom, left);
    let _ = writeln!(svg, "<text x=\"{left}\" y=\"{}\">{x0}</text>", xb + 16.0);
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x1}</text>", w - right, xb + 16.0);
    let _ =
        writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>", (left + w - right) / 2.0, h - 8.0);
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y1:.3}</text>", yb - 6.0, top + 10.0);
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{xb}\" text-anchor=\"end\">{y0:.3}</text>", yb - 6.0);
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">loss</text>",
        (top + xb) / 2.0,
        (top + xb) / 2.0
    );
    for (i, (label, pts)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            coords.join(" ")
        );
        let ly = top + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{ly}\" fill=\"{color}\" text-anchor=\"end\">{}</text>",
            w - right - 8.0,
            xml_escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
