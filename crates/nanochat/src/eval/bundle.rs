//! The CORE evaluation bundle on disk: `core.yaml` (the 22 tasks), `eval_meta_data.csv` (their
//! random baselines) and `eval_data/**.jsonl` (the items), parsed into plain Rust values.
//!
//! `core.yaml` has one fixed shape (a list of tasks with scalar fields, a one-element `num_fewshot`
//! list, and a multi-line single-quoted `continuation_delimiter`), so it is read by a small parser
//! for exactly that shape rather than a general YAML dependency; anything else is an error that
//! names the line. The CSV is read the same way: quoted fields with commas, one record per line.
//!
//! Where the bundle comes from: the original downloads `eval_bundle.zip` from its S3 bucket into
//! `$NANOCHAT_BASE_DIR/eval_bundle`; [`Bundle::ensure`] does the same (the URL can be changed with
//! `NANOCHAT_EVAL_BUNDLE_URL`), while a data mirror (`--data-dir`) holds it as `eval/eval_bundle`
//! and `--bundle-dir` points at any copy on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::data::download::fetch_unpacked;
use crate::data::sources::Retry;

/// Downloads the zip archive at `url` and unpacks it as the directory `dir` (see
/// [`fetch_unpacked`]): the original's archive has its files under one top folder, which is
/// dropped, and it must hold a `core.yaml`. Nothing happens when `dir` holds one already.
pub fn download(url: &str, dir: &Path) -> Result<()> {
    let bar = crate::common::progress_bar(0, "download");
    let retry = Retry { attempts: 3, ..Retry::default() };
    let result = fetch_unpacked(&crate::data::download::http_agent(), url, dir, "core.yaml", Some(&bar), retry);
    bar.finish_and_clear();
    result
}

/// How a task's items are scored (`icl_task_type` in `core.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// One context, several continuations: the lowest mean loss over the continuation wins.
    MultipleChoice,
    /// Several contexts, one continuation: the context under which it has the lowest mean loss wins.
    Schema,
    /// One context, one continuation: correct if greedy decoding reproduces every continuation token.
    LanguageModeling,
}

impl TaskType {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "multiple_choice" => Self::MultipleChoice,
            "schema" => Self::Schema,
            "language_modeling" => Self::LanguageModeling,
            other => bail!("unknown icl_task_type {other:?}: expected multiple_choice, schema or language_modeling"),
        })
    }
}

/// One task of `core.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub label: String,
    /// Path of the jsonl under `eval_data/`.
    pub dataset_uri: String,
    pub task_type: TaskType,
    pub num_fewshot: usize,
    /// Between context and continuation; `" "` when the task does not say, as in the original.
    pub continuation_delimiter: String,
}

/// One item of a task, by task type (the jsonl fields of the bundle).
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    MultipleChoice { query: String, choices: Vec<String>, gold: usize },
    Schema { context_options: Vec<String>, continuation: String, gold: usize },
    LanguageModeling { context: String, continuation: String },
}

/// The parsed bundle: tasks in `core.yaml` order and the random baseline of each, as a fraction.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub tasks: Vec<TaskSpec>,
    /// Label → random-guessing accuracy in [0, 1) (the CSV holds percentages).
    pub baselines: HashMap<String, f64>,
}

impl Bundle {
    /// Where the original keeps the bundle: `$NANOCHAT_BASE_DIR/eval_bundle`.
    pub fn default_dir() -> PathBuf {
        crate::common::base_dir().join("eval_bundle")
    }

    /// Makes sure the bundle is in `dir`, downloading it from `url` when it is not (the
    /// original's is [`crate::data::sources::EVAL_BUNDLE_URL`]).
    pub fn ensure(dir: &Path, url: &str) -> Result<()> {
        if !dir.join("core.yaml").is_file() {
            eprintln!("downloading the CORE eval bundle from {url} into {}", dir.display());
            download(url, dir).context(
                "downloading the CORE eval bundle failed: run the command again to resume; offline, pass \
                 --data-dir DIR (a data mirror laid out like ../shared/data) or --bundle-dir DIR (a copy of the bundle)",
            )?;
        }
        Ok(())
    }

    /// Reads `core.yaml` and `eval_meta_data.csv` from `dir`, checking that every task has a
    /// baseline. Items are read per task by [`Bundle::load_items`].
    pub fn load(dir: &Path) -> Result<Self> {
        let yaml_path = dir.join("core.yaml");
        if !yaml_path.exists() {
            bail!(
                "no CORE eval bundle at {} (core.yaml missing): leave out --bundle-dir to download the \
                 original's, or pass --bundle-dir with a copy of it (a data mirror has one in eval/eval_bundle)",
                dir.display()
            );
        }
        let yaml = std::fs::read_to_string(&yaml_path).with_context(|| format!("reading {}", yaml_path.display()))?;
        let tasks = parse_core_yaml(&yaml).with_context(|| format!("parsing {}", yaml_path.display()))?;
        let csv_path = dir.join("eval_meta_data.csv");
        let csv = std::fs::read_to_string(&csv_path)
            .with_context(|| format!("reading {}: the bundle is incomplete, download it again", csv_path.display()))?;
        let baselines = parse_baselines(&csv).with_context(|| format!("parsing {}", csv_path.display()))?;
        if let Some(t) = tasks.iter().find(|t| !baselines.contains_key(&t.label)) {
            bail!("task {} of core.yaml has no random baseline in {}", t.label, csv_path.display());
        }
        Ok(Self { dir: dir.to_path_buf(), tasks, baselines })
    }

    /// All items of `task`, in file order.
    pub fn load_items(&self, task: &TaskSpec) -> Result<Vec<Item>> {
        let path = self.dir.join("eval_data").join(&task.dataset_uri);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} for task {}: the bundle is incomplete", path.display(), task.label))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| parse_item(line, task.task_type).with_context(|| format!("{}:{}", path.display(), i + 1)))
            .collect()
    }

    /// The random baseline of `label` as a fraction.
    pub fn baseline(&self, label: &str) -> Result<f64> {
        self.baselines.get(label).copied().ok_or_else(|| anyhow!("no random baseline for task {label}"))
    }
}

fn parse_item(line: &str, task_type: TaskType) -> Result<Item> {
    let v: Value = serde_json::from_str(line).context("invalid JSON")?;
    let text = |key: &str| -> Result<String> {
        v.get(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("missing string field {key:?}"))
    };
    let texts = |key: &str| -> Result<Vec<String>> {
        let list = v.get(key).and_then(Value::as_array).ok_or_else(|| anyhow!("missing list field {key:?}"))?;
        list.iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| anyhow!("non-string entry in {key:?}")))
            .collect()
    };
    let gold = |n: usize| -> Result<usize> {
        let g = v.get("gold").and_then(Value::as_u64).ok_or_else(|| anyhow!("missing integer field \"gold\""))?;
        let g = usize::try_from(g)?;
        if g >= n {
            bail!("gold {g} out of range for {n} options");
        }
        Ok(g)
    };
    Ok(match task_type {
        TaskType::MultipleChoice => {
            let choices = texts("choices")?;
            let gold = gold(choices.len())?;
            Item::MultipleChoice { query: text("query")?, choices, gold }
        }
        TaskType::Schema => {
            let context_options = texts("context_options")?;
            let gold = gold(context_options.len())?;
            Item::Schema { context_options, continuation: text("continuation")?, gold }
        }
        TaskType::LanguageModeling => {
            Item::LanguageModeling { context: text("context")?, continuation: text("continuation")? }
        }
    })
}

/// Parses `core.yaml`: `icl_tasks:` then `- label: ...` entries with `dataset_uri`,
/// `num_fewshot` (a one-element list), `icl_task_type` and an optional `continuation_delimiter`.
pub fn parse_core_yaml(text: &str) -> Result<Vec<TaskSpec>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut tasks = Vec::new();
    let mut fields: Option<HashMap<String, String>> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let lineno = i + 1;
        i += 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "icl_tasks:" {
            continue;
        }
        let entry = if let Some(rest) = trimmed.strip_prefix("- ").filter(|_| !line.starts_with(' ')) {
            if let Some(done) = fields.take() {
                tasks.push(task_from_fields(done)?);
            }
            fields = Some(HashMap::new());
            rest
        } else if line.starts_with("  ") {
            trimmed
        } else {
            bail!("line {lineno}: expected `icl_tasks:`, a `- label:` entry or an indented field, got {line:?}");
        };
        let current = fields.as_mut().ok_or_else(|| anyhow!("line {lineno}: field before the first `- ` entry"))?;
        let (key, raw) = entry.split_once(':').ok_or_else(|| anyhow!("line {lineno}: expected `key: value`"))?;
        let raw = raw.trim_start();
        let value = if raw.is_empty() {
            // A block list (`num_fewshot:` then `  - 10`): the original only reads its first element.
            let mut items = Vec::new();
            while let Some(item) =
                lines.get(i).and_then(|l| l.trim().strip_prefix("- ").filter(|_| l.starts_with("  ")))
            {
                items.push(item.trim().to_string());
                i += 1;
            }
            items.into_iter().next().ok_or_else(|| anyhow!("line {lineno}: `{key}:` has no value"))?
        } else if let Some(quoted) = raw.strip_prefix('\'') {
            let (value, used) = single_quoted(quoted, &lines[i..]).with_context(|| format!("line {lineno}"))?;
            i += used;
            value
        } else {
            raw.trim_end().to_string()
        };
        current.insert(key.trim().to_string(), value);
    }
    if let Some(done) = fields.take() {
        tasks.push(task_from_fields(done)?);
    }
    if tasks.is_empty() {
        bail!("no tasks under `icl_tasks:`");
    }
    Ok(tasks)
}

/// A YAML single-quoted scalar that starts with `first` and may continue over `rest`: `''` is a
/// quote, and line breaks fold (one break → a space, each blank line → `\n`, indentation dropped).
/// Returns the value and how many lines of `rest` it used.
fn single_quoted(first: &str, rest: &[&str]) -> Result<(String, usize)> {
    let mut raw = Vec::new();
    let mut segment = first;
    loop {
        let (text, closed) = unquote_line(segment)?;
        raw.push(text);
        if closed {
            break;
        }
        segment = rest.get(raw.len() - 1).ok_or_else(|| anyhow!("unterminated single-quoted string"))?;
    }
    let last = raw.len() - 1;
    let mut out = String::new();
    let mut blank = 0;
    for (k, line) in raw.iter().enumerate() {
        let line = match (k == 0, k == last) {
            (true, true) => line.as_str(),
            (true, false) => line.trim_end(),
            (false, true) => line.trim_start(),
            (false, false) => line.trim(),
        };
        if k == 0 {
            out.push_str(line);
            continue;
        }
        if line.is_empty() && k != last {
            blank += 1;
            continue;
        }
        if blank > 0 {
            out.push_str(&"\n".repeat(blank));
        } else {
            out.push(' ');
        }
        blank = 0;
        out.push_str(line);
    }
    Ok((out, last))
}

/// One line of a single-quoted scalar up to its closing quote (`''` unescaped), and whether it closed.
fn unquote_line(s: &str) -> Result<(String, bool)> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\'' {
            out.push(c);
            continue;
        }
        let rest = chars.as_str();
        if let Some(after) = rest.strip_prefix('\'') {
            out.push('\'');
            chars = after.chars();
            continue;
        }
        if !rest.trim().is_empty() {
            bail!("unexpected text after the closing quote: {rest:?}");
        }
        return Ok((out, true));
    }
    Ok((out, false))
}

fn task_from_fields(mut f: HashMap<String, String>) -> Result<TaskSpec> {
    let mut take = |k: &str| f.remove(k).ok_or_else(|| anyhow!("a task in core.yaml lacks `{k}`"));
    let label = take("label")?;
    let spec = TaskSpec {
        dataset_uri: take("dataset_uri")?,
        task_type: TaskType::parse(&take("icl_task_type")?)?,
        num_fewshot: take("num_fewshot")?.parse().with_context(|| format!("num_fewshot of {label}"))?,
        continuation_delimiter: f.remove("continuation_delimiter").unwrap_or_else(|| " ".to_string()),
        label,
    };
    Ok(spec)
}

/// Reads the `Random baseline` column (percent) of `eval_meta_data.csv` by `Eval Task`, as fractions.
pub fn parse_baselines(text: &str) -> Result<HashMap<String, f64>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = csv_record(lines.next().ok_or_else(|| anyhow!("empty CSV"))?)?;
    let col = |name: &str| header.iter().position(|h| h == name).ok_or_else(|| anyhow!("no {name:?} column"));
    let (task_col, base_col) = (col("Eval Task")?, col("Random baseline")?);
    let mut out = HashMap::new();
    for (i, line) in lines.enumerate() {
        let rec = csv_record(line).with_context(|| format!("record {}", i + 1))?;
        let (Some(task), Some(base)) = (rec.get(task_col), rec.get(base_col)) else {
            bail!("record {} has {} fields, fewer than the header", i + 1, rec.len());
        };
        let percent: f64 = base.trim().parse().with_context(|| format!("random baseline of {task}: {base:?}"))?;
        out.insert(task.trim().to_string(), percent / 100.0);
    }
    Ok(out)
}

/// Splits one CSV line into fields: commas separate, double quotes enclose, `""` is a quote.
fn csv_record(line: &str) -> Result<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let field = fields.last_mut().ok_or_else(|| anyhow!("internal: no field"))?;
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            _ => field.push(c),
        }
    }
    if quoted {
        bail!("unbalanced quotes in {line:?}");
    }
    Ok(fields)
}
