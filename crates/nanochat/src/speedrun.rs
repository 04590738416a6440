//! `nanochat speedrun`: the whole pipeline in one command (data → tokenizer → base training and
//! evaluation → midtraining → SFT → chat evaluation → report), resumable, from a preset.
//!
//! A preset is data (`presets/*.json`, or the user's own with `--preset-file`): a model tag and a
//! list of stages, each the command line of one `nanochat` subcommand. The stages run in this
//! process, parsed by the subcommands' own option parsers, so a preset can use every option of
//! every stage and a new stage (say `rl train`) is one more entry. In a stage's arguments `{data}`
//! stands for the data mirror (`--data-dir`) and `{tag}` for the preset's model tag, which the
//! stages name explicitly so that none picks up another run's checkpoints.
//!
//! Data: without a mirror every stage uses the original's online sources (`data/sources.rs`); the
//! files the stages to run need are downloaded into `$NANOCHAT_BASE_DIR` before the first stage
//! starts (the pretraining shards by the data stage, several at a time), so that a network problem
//! shows at once rather than hours in, and `--dry-run` lists them with their sizes. With a mirror
//! (`--data-dir`) nothing is downloaded.
//!
//! Resuming: a stage that starts writes `$NANOCHAT_BASE_DIR/speedrun/<stage>.json` with its command
//! line and start time, and marks it finished when it ends. A rerun skips a finished stage whose
//! command line is unchanged; a changed or unfinished stage runs again and so does every stage
//! after it, since their inputs may have changed. An interrupted training stage that takes
//! `--resume-from-step` continues from the last checkpoint it saved (one written after it started);
//! any other stage that runs again starts from scratch, its old checkpoints removed so that the
//! next stage cannot load a stale one.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::common::{base_dir, write_atomic};
use crate::data::sources::{self, Check, Endpoints, RemoteFile, Retry, Size};

/// The built-in presets, smallest first: (name, JSON).
const BUILTIN: [(&str, &str); 5] = [
    ("micro", include_str!("../presets/micro.json")),
    ("cpu-tiny", include_str!("../presets/cpu-tiny.json")),
    ("cpu-small", include_str!("../presets/cpu-small.json")),
    ("d20", include_str!("../presets/d20.json")),
    ("d26", include_str!("../presets/d26.json")),
];

/// A `nanochat` command parsed and ready to run: what a stage does, and what it downloads.
pub struct StageCommand {
    pub run: Box<dyn FnOnce() -> Result<()>>,
    /// The files the command fetches on first use (none when it reads a mirror).
    pub downloads: Vec<RemoteFile>,
}

/// Parses a `nanochat` command line (without the program name) into a runnable command. The binary
/// passes its own parser, so stages are parsed exactly as if typed.
pub type ParseCommand<'a> = &'a dyn Fn(&[String]) -> Result<StageCommand>;

/// Options of `nanochat speedrun`.
#[derive(clap::Args, Debug)]
pub struct SpeedrunArgs {
    /// The preset to run: micro, cpu-tiny, cpu-small, d20 or d26 (see --list-presets).
    #[arg(long, default_value = "cpu-tiny")]
    pub preset: String,
    /// Run your own preset, a JSON file laid out like the built-in ones (see --show-preset).
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub preset_file: Option<PathBuf>,
    #[arg(long, env = "NANOCHAT_DATA_MIRROR", value_name = "DIR", help = crate::data::MIRROR_HELP)]
    pub data_dir: Option<PathBuf>,
    /// Where every artifact goes [default: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat].
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// Redo this stage and every one after it, even if they finished.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Stop after this stage (the rest run on the next invocation).
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Redo every stage.
    #[arg(long, conflicts_with = "from")]
    pub force: bool,
    /// Print what would run (each stage's command line, and whether it runs, resumes or is skipped)
    /// and what it would download, with the sizes the servers give (unknown when offline).
    #[arg(long)]
    pub dry_run: bool,
    /// List the built-in presets and exit.
    #[arg(long)]
    pub list_presets: bool,
    /// Print the preset's JSON (a starting point for --preset-file) and exit.
    #[arg(long)]
    pub show_preset: bool,
}

/// A pipeline: what to train, stage by stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    /// One line for `--list-presets`: the model, and how long the run takes where.
    pub about: String,
    /// The checkpoint directory name every stage trains into and reads from (`{tag}` in arguments).
    pub model_tag: String,
    pub stages: Vec<StageSpec>,
}

/// One stage of a preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Unique within the preset; names the marker file and `--from` / `--until`.
    pub name: String,
    /// The `nanochat` command line without the program name, e.g. `["base", "train", "--depth", "2"]`.
    pub args: Vec<String>,
    /// Appended when a data mirror is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror: Vec<String>,
    /// Appended when no mirror is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub online: Vec<String>,
    /// The checkpoint directory the stage writes, under `$NANOCHAT_BASE_DIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<String>,
    /// Whether the stage continues from its checkpoint with `--resume-from-step N`.
    #[serde(default)]
    pub resumable: bool,
}

impl Preset {
    /// The built-in preset `name`.
    pub fn builtin(name: &str) -> Result<Preset> {
        let Some((_, json)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            bail!("no preset {name:?}: pick one of {} or pass --preset-file FILE", names.join(", "));
        };
        Preset::parse(json).with_context(|| format!("the built-in preset {name}"))
    }

    /// Every built-in preset, smallest first.
    pub fn builtins() -> Result<Vec<Preset>> {
        BUILTIN.iter().map(|(name, _)| Preset::builtin(name)).collect()
    }

    /// A preset from its JSON, checked.
    pub fn parse(json: &str) -> Result<Preset> {
        let preset: Preset = serde_json::from_str(json).context("not a valid preset (see --show-preset)")?;
        if preset.stages.is_empty() {
            bail!("preset {} has no stages", preset.name);
        }
        for (i, stage) in preset.stages.iter().enumerate() {
            if stage.name.is_empty() || stage.name.contains(['/', '\\']) || stage.name.starts_with('.') {
                bail!("stage {i} of preset {}: {:?} cannot name a marker file", preset.name, stage.name);
            }
            if preset.stages[..i].iter().any(|s| s.name == stage.name) {
                bail!("preset {} has two stages named {}", preset.name, stage.name);
            }
            if stage.args.first().is_none_or(|a| a == "speedrun") {
                bail!(
                    "stage {} of preset {} must run a pipeline command, not {:?}",
                    stage.name,
                    preset.name,
                    stage.args
                );
            }
        }
        Ok(preset)
    }

    fn stage_index(&self, name: &str, option: &str) -> Result<usize> {
        self.stages.iter().position(|s| s.name == name).with_context(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            format!("{option} {name}: preset {} has the stages {}", self.name, names.join(", "))
        })
    }
}

/// A stage with its arguments filled in for this run.
#[derive(Debug, Clone)]
struct Stage {
    name: String,
    argv: Vec<String>,
    checkpoints: Option<PathBuf>,
    resumable: bool,
    /// What the stage's command downloads on first use.
    downloads: Vec<RemoteFile>,
}

/// Fills in `{data}` and `{tag}` and picks each stage's mirror or online arguments; parses each
/// stage's command line with `parse`, so that a typo fails now, not hours in, and learns what it
/// downloads.
fn resolve(preset: &Preset, mirror: Option<&Path>, base: &Path, parse: ParseCommand) -> Result<Vec<Stage>> {
    let data = mirror.map(|m| m.to_string_lossy().into_owned());
    let fill = |s: &str| -> Result<String> {
        let s = s.replace("{tag}", &preset.model_tag);
        match &data {
            Some(dir) => Ok(s.replace("{data}", dir)),
            None if s.contains("{data}") => bail!("{s:?} names the data mirror: pass --data-dir DIR"),
            None => Ok(s),
        }
    };
    let mut stages = Vec::new();
    for spec in &preset.stages {
        let extra = if mirror.is_some() { &spec.mirror } else { &spec.online };
        let argv = spec.args.iter().chain(extra).map(|a| fill(a)).collect::<Result<Vec<_>>>()?;
        let command =
            parse(&argv).with_context(|| format!("stage {} of preset {}: {}", spec.name, preset.name, shell(&argv)))?;
        let checkpoints = spec.checkpoints.as_deref().map(fill).transpose()?.map(|c| base.join(c));
        stages.push(Stage {
            name: spec.name.clone(),
            argv,
            checkpoints,
            resumable: spec.resumable,
            downloads: command.downloads,
        });
    }
    Ok(stages)
}

/// The files the stages that run in this invocation download, each once, under the first stage
/// that needs it, leaving out those already in place.
fn pending_downloads<'a>(stages: &'a [Stage], actions: &[Action]) -> Vec<(&'a str, &'a RemoteFile)> {
    let mut pending: Vec<(&str, &RemoteFile)> = Vec::new();
    for (stage, action) in stages.iter().zip(actions) {
        if !matches!(action, Action::Run | Action::Resume(_)) {
            continue;
        }
        for file in &stage.downloads {
            if !pending.iter().any(|(_, f)| f.dest == file.dest) && !file.is_present() {
                pending.push((&stage.name, file));
            }
        }
    }
    pending
}

/// The dry run's list of downloads, with sizes from the servers (or the sources' listings).
fn print_downloads(pending: &[(&str, &RemoteFile)], base: &Path) {
    if pending.is_empty() {
        println!("downloads: none (a data mirror is given, or everything is in place)");
        return;
    }
    let files: Vec<RemoteFile> = pending.iter().map(|(_, f)| (*f).clone()).collect();
    let sizes = sources::probe(&files, &Endpoints::from_env());
    println!("downloads into {} (on first use):", base.display());
    for ((stage, file), size) in pending.iter().zip(&sizes) {
        let dest = file.dest.strip_prefix(base).unwrap_or(&file.dest);
        println!("  {stage:<14} {:>12}  {}  from {}", size.to_string(), dest.display(), file.url);
    }
    let known: u64 = sizes.iter().map(|s| if let Size::Exact(n) | Size::About(n) = s { *n } else { 0 }).sum();
    let approximate = sizes.iter().filter(|s| matches!(s, Size::About(_))).count();
    let unknown = sizes.iter().filter(|s| matches!(s, Size::Unknown)).count();
    let mut total = format!("  total: {} files, {}", files.len(), sources::human_bytes(known));
    if approximate + unknown > 0 {
        total.push_str(&format!(
            " ({approximate} sizes approximate and {unknown} unknown: the servers could not be asked, offline?)"
        ));
    }
    println!("{total}");
}

/// What a stage did or will do, kept in `$NANOCHAT_BASE_DIR/speedrun/<stage>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    stage: String,
    args: Vec<String>,
    /// Seconds since the Unix epoch.
    started_at: u64,
    finished_at: Option<u64>,
    /// The stage's wall clock (of its last attempt, when it resumed).
    seconds: Option<f64>,
}

fn marker_path(base: &Path, stage: &str) -> PathBuf {
    base.join("speedrun").join(format!("{stage}.json"))
}

/// The stage's marker; `None` when there is none or it is unreadable (the stage then reruns).
fn read_marker(base: &Path, stage: &str) -> Result<Option<Marker>> {
    let path = marker_path(base, stage);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(serde_json::from_str(&text).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_marker(base: &Path, marker: &Marker) -> Result<()> {
    write_atomic(&marker_path(base, &marker.stage), &serde_json::to_vec_pretty(marker)?)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What happens to a stage in this invocation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    /// Finished earlier with the same command line, in this many seconds.
    Skip(Option<f64>),
    Run,
    /// Continue an interrupted attempt from its checkpoint at this step.
    Resume(usize),
    /// After `--until`.
    Stop,
}

/// Decides each stage's action from the markers: skip a finished, unchanged stage whose checkpoints
/// are still there until a stage must run, then run everything after it; `redo_from` (from `--from` / `--force`) forces that.
fn plan(stages: &[Stage], base: &Path, redo_from: usize, until: usize) -> Result<Vec<Action>> {
    let mut actions = Vec::new();
    let mut rerun = false;
    for (i, stage) in stages.iter().enumerate() {
        let marker = read_marker(base, &stage.name)?.filter(|m| m.args == stage.argv);
        let action = if i > until {
            Action::Stop
        } else if rerun || i >= redo_from {
            Action::Run
        } else if let Some(m) = marker.as_ref().filter(|m| m.finished_at.is_some() && has_checkpoint(stage)) {
            Action::Skip(m.seconds)
        } else {
            match (&marker, &stage.checkpoints) {
                (Some(m), Some(dir)) if stage.resumable => {
                    resume_step(dir, m.started_at)?.map_or(Action::Run, Action::Resume)
                }
                _ => Action::Run,
            }
        };
        rerun |= matches!(action, Action::Run | Action::Resume(_));
        actions.push(action);
    }
    Ok(actions)
}

/// Whether the stage's checkpoints are still there (true for a stage without any): a finished stage
/// whose checkpoints were deleted since runs again rather than leave the next stage without a model.
fn has_checkpoint(stage: &Stage) -> bool {
    stage.checkpoints.as_deref().is_none_or(|dir| crate::checkpoint::latest_step(dir).is_ok_and(|s| s.is_some()))
}

/// The latest complete checkpoint in `dir` written since `since` (by the interrupted attempt).
fn resume_step(dir: &Path, since: u64) -> Result<Option<usize>> {
    let Some(step) = crate::checkpoint::latest_step(dir)? else { return Ok(None) };
    let written = std::fs::metadata(crate::checkpoint::meta_path(dir, step))
        .and_then(|m| m.modified())
        .map_or(0, |t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    Ok((written >= since).then_some(step))
}

/// `nanochat speedrun`.
pub fn run(args: SpeedrunArgs, parse: ParseCommand) -> Result<()> {
    if args.list_presets {
        for preset in Preset::builtins()? {
            let stages: Vec<&str> = preset.stages.iter().map(|s| s.name.as_str()).collect();
            println!("{:<10} {}\n{:<10} stages: {}", preset.name, preset.about, "", stages.join(" → "));
        }
        return Ok(());
    }
    let preset = match &args.preset_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading the preset {}", path.display()))?;
            Preset::parse(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Preset::builtin(&args.preset)?,
    };
    if args.show_preset {
        println!("{}", serde_json::to_string_pretty(&preset)?);
        return Ok(());
    }
    if let Some(dir) = &args.base_dir {
        // The stages find $NANOCHAT_BASE_DIR through the environment; no other thread runs yet.
        std::env::set_var("NANOCHAT_BASE_DIR", dir);
    }
    let base = base_dir();
    let mirror = match &args.data_dir {
        // Absolute, so that the recorded command lines do not depend on the working directory.
        Some(dir) => Some(std::fs::canonicalize(dir).with_context(|| {
            format!(
                "the data mirror {} is not there: give --data-dir a directory laid out like ../shared/data",
                dir.display()
            )
        })?),
        None => None,
    };
    let stages = resolve(&preset, mirror.as_deref(), &base, parse)?;
    let redo_from = match (&args.from, args.force) {
        (Some(name), _) => preset.stage_index(name, "--from")?,
        (None, true) => 0,
        (None, false) => stages.len(),
    };
    let until = args.until.as_deref().map_or(Ok(stages.len() - 1), |name| preset.stage_index(name, "--until"))?;
    let actions = plan(&stages, &base, redo_from, until)?;
    if args.dry_run {
        println!("speedrun {} in {}:", preset.name, base.display());
        for (stage, action) in stages.iter().zip(&actions) {
            println!("  {:<14} {:<24} nanochat {}", stage.name, describe(*action), shell(&stage.argv));
        }
        print_downloads(&pending_downloads(&stages, &actions), &base);
        return Ok(());
    }
    // the shards are left to the data stage, which fetches several at a time
    let pending: Vec<RemoteFile> = pending_downloads(&stages, &actions)
        .into_iter()
        .filter(|(_, f)| f.check != Check::Shard)
        .map(|(_, f)| f.clone())
        .collect();
    if !pending.is_empty() {
        eprintln!(
            "speedrun {}: downloading the {} files the stages need into {}",
            preset.name,
            pending.len(),
            base.display()
        );
        sources::fetch_all(&pending, &Endpoints::from_env(), Retry::default())?;
    }
    execute(&preset, &stages, &actions, &base, parse)
}

/// Runs the planned stages with a header per stage, then writes the report and the summary.
fn execute(preset: &Preset, stages: &[Stage], actions: &[Action], base: &Path, parse: ParseCommand) -> Result<()> {
    let started = Instant::now();
    let n = stages.len();
    eprintln!("speedrun {}: {} stages, artifacts in {}", preset.name, n, base.display());
    let mut seconds: Vec<Option<f64>> = Vec::new();
    for (i, (stage, &action)) in stages.iter().zip(actions).enumerate() {
        let header = format!("[speedrun {}/{n} {}] {}", i + 1, clock(started.elapsed().as_secs_f64()), stage.name);
        let ran = match action {
            Action::Stop => None,
            Action::Skip(secs) => {
                eprintln!("{header}: finished earlier with the same options, skipped");
                secs
            }
            Action::Run | Action::Resume(_) => {
                eprintln!("\n{header}: nanochat {}", shell(&stage.argv));
                let secs = run_stage(stages, i, action, base, parse)?;
                eprintln!("{header}: done in {}", clock(secs));
                Some(secs)
            }
        };
        seconds.push(ran);
    }
    let table = summary(stages, actions, &seconds, true);
    if actions.last() == Some(&Action::Stop) {
        println!("{table}\nstopped after --until; run again without it to continue");
        return Ok(());
    }
    let total: f64 = seconds.iter().flatten().sum();
    let stage_metrics: Vec<_> =
        stages.iter().zip(&seconds).map(|(s, secs)| json!({ "stage": s.name, "seconds": secs })).collect();
    let markdown = format!(
        "- preset: {}\n- model tag: {}\n\n{}",
        preset.name,
        preset.model_tag,
        summary(stages, actions, &seconds, false)
    );
    let metrics = json!({ "seconds": total, "preset": preset.name, "stages": stage_metrics });
    crate::report::write_section("speedrun", &markdown, metrics)?;
    let report = crate::report::generate(base)?;
    // The exact command to type: this binary (`nanochat` may not be on the PATH), with the base
    // directory when it is not the default.
    let env = std::env::var_os("NANOCHAT_BASE_DIR")
        .map(|dir| format!("NANOCHAT_BASE_DIR={} ", dir.to_string_lossy()))
        .unwrap_or_default();
    let exe = std::env::current_exe().map_or_else(|_| "nanochat".to_string(), |p| p.display().to_string());
    println!(
        "\nspeedrun {} done: {} for the whole pipeline, {} in this run\n\n{table}\nreport: {}\n\
         talk to your model:  {env}{exe} chat -g {tag}   (one question: add -p \"Why is the sky blue?\")\n\
         web chat:            {env}{exe} serve -g {tag}  then open http://127.0.0.1:8000",
        preset.name,
        clock(total),
        clock(started.elapsed().as_secs_f64()),
        report.display(),
        tag = preset.model_tag,
    );
    Ok(())
}

/// Runs stage `i` (fresh, or resumed) between its start and finish markers; returns its wall clock.
fn run_stage(stages: &[Stage], i: usize, action: Action, base: &Path, parse: ParseCommand) -> Result<f64> {
    let stage = &stages[i];
    let mut argv = stage.argv.clone();
    let started_at = match action {
        Action::Resume(step) => {
            eprintln!("resuming the interrupted run from its checkpoint at step {step}");
            argv.extend(["--resume-from-step".to_string(), step.to_string()]);
            // the attempt that wrote the checkpoint started then: a later interruption may resume from it too
            read_marker(base, &stage.name)?.map_or_else(unix_now, |m| m.started_at)
        }
        _ => {
            if let Some(dir) = stage.checkpoints.as_ref().filter(|d| d.exists()) {
                eprintln!("removing the earlier checkpoints in {}", dir.display());
                std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            unix_now()
        }
    };
    let mut marker =
        Marker { stage: stage.name.clone(), args: stage.argv.clone(), started_at, finished_at: None, seconds: None };
    write_marker(base, &marker)?;
    // The later stages' results came from the inputs this stage is about to replace.
    for later in &stages[i + 1..] {
        let path = marker_path(base, &later.name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let t0 = Instant::now();
    let command = parse(&argv)?;
    (command.run)().with_context(|| {
        format!("stage {} failed; fix the cause and rerun the same speedrun command to continue from it", stage.name)
    })?;
    let secs = t0.elapsed().as_secs_f64();
    marker.finished_at = Some(unix_now());
    marker.seconds = Some(secs);
    write_marker(base, &marker)?;
    Ok(secs)
}

/// What a stage does in this invocation, for the plan and the summary.
fn describe(action: Action) -> String {
    match action {
        Action::Skip(_) => "skip (finished earlier)".to_string(),
        Action::Run => "run".to_string(),
        Action::Resume(step) => format!("resume from step {step}"),
        Action::Stop => "stop (--until)".to_string(),
    }
}

/// The per-stage wall-clock table (markdown, which also reads well in a terminal); with
/// `this_run`, a column saying what each stage did in this invocation.
fn summary(stages: &[Stage], actions: &[Action], seconds: &[Option<f64>], this_run: bool) -> String {
    let mut table = String::from(if this_run {
        "| stage | wall clock | this run |\n|---|---:|---|\n"
    } else {
        "| stage | wall clock |\n|---|---:|\n"
    });
    for ((stage, action), secs) in stages.iter().zip(actions).zip(seconds) {
        let secs = secs.map_or_else(|| "-".to_string(), clock);
        let note = if this_run { format!(" {} |", describe(*action)) } else { String::new() };
        table.push_str(&format!("| {} | {secs} |{note}\n", stage.name));
    }
    table
}

/// `m:ss`, or `h:mm:ss` past the hour; tenths of a second under a minute.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{seconds:.1}s"),
        60..3600 => format!("{}:{:02}", s / 60, s % 60),
        _ => format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60),
    }
}

/// A command line as one would type it, arguments with spaces or shell characters quoted.
fn shell(argv: &[String]) -> String {
    let quote = |a: &String| {
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "|&;<>()$`\\\"'*?[]#~".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.clone()
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}
