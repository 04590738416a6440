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

/// Rows of the summary table: `Val bpb` comes from `base_eval` (else `base_train`) and `mid_train`,
/// `CORE` from `base_eval`, the rest from `chat_eval_<stage>`: every task the chat evals run.
const TABLE_ROWS: [&str; 9] =
    ["Val bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"];
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
    md.push_str(&summary_notes(&sections));
    let curves = loss_curves(base)?;
    if !curves.is_empty() {
        write_atomic(&dir.join("loss.svg"), loss_svg(&curves).as_bytes())?;
        md.push_str("\n## Training curves\n\n![training loss](loss.svg)\n");
    }
    for section in &sections {
        let _ = write!(md, "\n## {}\n\n", section.name);
        if let Some(seconds) = section.metrics.get("seconds").and_then(Value::as_f64) {
            let _ = writeln!(md, "Wall clock: {}\n", format_duration(seconds));
        }
        md.push_str(section.markdown.trim_end());
        md.push('\n');
        if let Some(rewards) = section.metrics.get("rewards").and_then(Value::as_array) {
            md.push_str(&rewards_by_step(rewards));
        }
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
            "Val bpb" if stage == "base" => find("base_eval")
                .and_then(|m| m.get("val_bpb")?.as_f64())
                .or_else(|| find("base_train")?.get("val_bpb")?.as_f64()),
            "Val bpb" if stage == "mid" => find("mid_train")?.get("val_bpb")?.as_f64(),
            "Val bpb" => None,
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

/// RL's mean reward at every step (every k-th step of a long run, so the line stays readable).
fn rewards_by_step(rewards: &[Value]) -> String {
    let every = rewards.len().div_ceil(50).max(1);
    let cells: Vec<String> = rewards
        .iter()
        .enumerate()
        .step_by(every)
        .map(|(step, r)| format!("{step}: {}", r.as_f64().map_or_else(|| "-".to_string(), |r| format!("{r:.3}"))))
        .collect();
    let which = if every == 1 { "every step".to_string() } else { format!("every {every}th step") };
    format!("- mean reward per step ({which}): {}\n", cells.join(", "))
}

/// What the table's numbers mean where that is not obvious, and what went wrong: which
/// validation bits per byte are shown (base training and base eval may measure different amounts of
/// text; midtraining's are on the chat mixture, not the pretraining shards), and RL's rewards.
pub fn summary_notes(sections: &[Section]) -> String {
    let find = |name: &str| sections.iter().find(|s| s.name == name).map(|s| &s.metrics);
    let number = |section: &str, key: &str| find(section).and_then(|m| m.get(key)?.as_f64());
    let tokens = |section: &str| {
        number(section, "eval_tokens")
            .map_or_else(String::new, |t| format!(" over up to {} validation tokens", t as u64))
    };
    let mut notes = String::new();
    match (number("base_eval", "val_bpb"), number("base_train", "val_bpb")) {
        (Some(eval), Some(train)) => {
            let _ = writeln!(
                notes,
                "- Val bpb, BASE: {eval:.4} from base eval{}; base training measured {train:.4}{} at its last step (the two differ by the amount of validation text they read).",
                tokens("base_eval"),
                tokens("base_train")
            );
        }
        (None, Some(_)) => notes.push_str("- Val bpb, BASE: from base training's last evaluation.\n"),
        _ => {}
    }
    if number("mid_train", "val_bpb").is_some() {
        notes.push_str("- Val bpb, MID: on midtraining's held-out chat mixture, not the pretraining text.\n");
    }
    if let Some(rewards) = find("rl_train").and_then(|m| m.get("rewards")?.as_array().cloned()) {
        let rewards: Vec<f64> = rewards.iter().filter_map(Value::as_f64).collect();
        if !rewards.is_empty() && rewards.iter().all(|&r| r == 0.0) {
            let _ = writeln!(
                notes,
                "- **RL learned nothing: the mean reward was 0 at every one of its {} steps**, so every advantage \
                 was 0 and the RL weights equal the SFT weights. The model must solve some training problems \
                 before RL can reinforce anything: train a bigger model or longer, or sample more completions.",
                rewards.len()
            );
        }
    }
    if notes.is_empty() {
        notes
    } else {
        format!("\n{notes}")
    }
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

/// One training run's curve by step: `(label, points)`. The label ends in what is plotted when it
/// is not the loss (RL's mean reward).
pub type Curve = (String, Vec<(f64, f64)>);

/// The training curves of every `*_checkpoints/<tag>/metrics.jsonl` under `base`, labelled
/// `<stage>/<tag>`: the smoothed loss where logged, else the raw one; for RL, whose loss is a
/// policy-gradient surrogate with no meaning of its own, the mean reward.
pub fn loss_curves(base: &Path) -> Result<Vec<Curve>> {
    let mut curves = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else { return Ok(curves) };
    let mut stage_dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("_checkpoints")))
        .collect();
    stage_dirs.sort_by_key(|d| {
        let order = ["base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"];
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (order.iter().position(|&o| o == name).unwrap_or(order.len()), name)
    });
    for stage_dir in stage_dirs {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(&stage_dir)
            .with_context(|| format!("listing {}", stage_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path().join("metrics.jsonl")))
            .filter(|p| p.is_file())
            .collect();
        runs.sort();
        for metrics in runs {
            let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
            let records: Vec<Value> = text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
            let is_rl = records.iter().any(|v| v.get("reward").is_some());
            let points: Vec<(f64, f64)> = records
                .iter()
                .filter_map(|v| {
                    let y = if is_rl {
                        v.get("reward")?
                    } else {
                        v.get("smooth_loss").or_else(|| v.get("loss")).or_else(|| v.get("train_loss"))?
                    };
                    Some((v.get("step")?.as_f64()?, y.as_f64()?))
                })
                .filter(|(_, y)| y.is_finite())
                .collect();
            if !points.is_empty() {
                let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let stage = name(&stage_dir).trim_end_matches("_checkpoints").to_string();
                let tag = metrics.parent().map(name).unwrap_or_default();
                let what = if is_rl { " mean reward" } else { "" };
                curves.push((format!("{stage}/{tag}{what}"), points));
            }
        }
    }
    Ok(curves)
}

/// About six round tick values covering `[lo, hi]` (steps of 1, 2 or 5 times a power of ten).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&s| s >= raw).unwrap_or(raw);
    // a hair of slack, so that an end that is a multiple of the step is not lost to rounding
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick value written as briefly as its step allows.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{value:.decimals$}")
}

/// The curves as a standalone SVG, one panel per run stacked vertically (runs of different stages
/// have different step ranges and loss scales), each with round-valued ticks and grid lines on both
/// axes and its own title. Written by hand: a plotting crate would cost more build time than this.
pub fn loss_svg(curves: &[Curve]) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let (w, panel_h, left, right, top, bottom) = (720.0, 240.0, 70.0, 20.0, 30.0, 45.0);
    let h = panel_h * curves.len().max(1) as f64;
    let mut svg = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" \
         height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    for (i, (label, pts)) in curves.iter().enumerate() {
        let y_top = panel_h * i as f64;
        let (x0, x1, y0, y1) = pts.iter().fold((f64::MAX, f64::MIN, f64::MAX, f64::MIN), |(a, b, c, d), &(x, y)| {
            (a.min(x), b.max(x), c.min(y), d.max(y))
        });
        // a single point or a flat line still needs a non-empty range to scale by
        let (x1, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > y0 { y1 } else { y0 + 1.0 });
        let (pl, pr, pt, pb) = (left, w - right, y_top + top, y_top + panel_h - bottom);
        let px = |x: f64| pl + (x - x0) / (x1 - x0) * (pr - pl);
        let py = |y: f64| pt + (y1 - y) / (y1 - y0) * (pb - pt);
        let _ = writeln!(svg, "<text x=\"{pl}\" y=\"{}\" font-weight=\"bold\">{}</text>", pt - 8.0, xml_escape(label));
        let (xt, yt) = (ticks(x0, x1), ticks(y0, y1));
        let x_step = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
        let y_step = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
        for &x in &xt {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"{pt}\" x2=\"{0:.1}\" y2=\"{pb}\" stroke=\"#ddd\"/>\n\
                 <text x=\"{0:.1}\" y=\"{1}\" text-anchor=\"middle\">{2}</text>",
                px(x),
                pb + 15.0,
                tick_label(x, x_step)
            );
        }
        for &y in &yt {
            let _ = writeln!(
                svg,
                "<line x1=\"{pl}\" y1=\"{0:.1}\" x2=\"{pr}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\n\
                 <text x=\"{1}\" y=\"{2:.1}\" text-anchor=\"end\">{3}</text>",
                py(y),
                pl - 6.0,
                py(y) + 4.0,
                tick_label(y, y_step)
            );
        }
        let _ = writeln!(
            svg,
            "<rect x=\"{pl}\" y=\"{pt}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
            pr - pl,
            pb - pt
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>", (pl + pr) / 2.0, pb + 32.0);
        let y_name = if label.ends_with("mean reward") { "reward" } else { "loss" };
        let mid = (pt + pb) / 2.0;
        let _ = writeln!(
            svg,
            "<text x=\"16\" y=\"{mid}\" transform=\"rotate(-90 16 {mid})\" text-anchor=\"middle\">{y_name}</text>"
        );
        let coords: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
            COLORS[i % COLORS.len()],
            coords.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
