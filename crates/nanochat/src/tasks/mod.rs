//! Task datasets: the conversations midtraining and SFT learn from and the chat evals grade.
//!
//! A [`Task`] is an indexable list of [`Example`]s. Each example is a [`Conversation`] in the
//! original's `{"messages": …}` shape plus the [`Answer`] an evaluation needs (the letters and the
//! correct one for multiple choice, the reference final number for GSM8K and SpellingBee). Tasks
//! are cheap to index: files are parsed once at load, generated tasks build each example from
//! `(seed, index)` on demand. Slicing, shuffling, mixtures and sequences are in [`mixture`].
//!
//! Where the data comes from: a [`DataRoot`]. Online (the default) it is the original's: the
//! Hugging Face datasets `allenai/ai2_arc`, `cais/mmlu`, `openai/gsm8k`, `openai/openai_humaneval`
//! and `HuggingFaceTB/smol-smoltalk` (their parquet files), the `dwyl/english-words` word list and
//! the original's identity conversations, downloaded on first use into `$NANOCHAT_BASE_DIR`
//! (`data/sources.rs` lists every URL). Offline, `--data-dir` names a mirror laid out like
//! `../shared/data` (`eval/arc`, `eval/mmlu`, `eval/gsm8k`, `eval/humaneval`, `sft/`, `words/`), read
//! in place. Both give the same examples for the same split; the mirror lacks some splits (ARC
//! train, MMLU auxiliary_train, SmolTalk), and the stages say what stands in for them.

pub mod arc;
pub mod chat;
pub mod gsm8k;
pub mod humaneval;
pub mod identity;
pub mod mixture;
pub mod mmlu;
pub mod spelling;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::conversation::{Content, Conversation, Role};
use crate::data::sources::{Dataset, Online};

/// Where the task data comes from (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataRoot {
    /// A directory laid out like the offline mirror: read in place, nothing downloaded.
    Mirror(PathBuf),
    /// The original's online sources, downloaded on first use into the cache.
    Online(Online),
}

/// Where one split of a task's data was found.
enum Located {
    /// The mirror's file (JSON lines, the mirror's row format).
    Mirror(PathBuf),
    /// The downloaded files (the source's format: parquet for the Hugging Face datasets).
    Online(Vec<PathBuf>),
}

impl DataRoot {
    /// The mirror at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> DataRoot {
        DataRoot::Mirror(dir.into())
    }

    /// The mirror of `--data-dir` when given, else the online sources as the environment sets them.
    pub fn from_args(data_dir: Option<PathBuf>) -> DataRoot {
        data_dir.map_or_else(|| DataRoot::Online(Online::from_env()), DataRoot::Mirror)
    }

    /// `$NANOCHAT_BASE_DIR/task_data`, where the online datasets are kept (as the original keeps them).
    pub fn default_dir() -> PathBuf {
        crate::common::base_dir().join("task_data")
    }

    pub fn is_mirror(&self) -> bool {
        matches!(self, DataRoot::Mirror(_))
    }

    /// The data of one split: the mirror's file `mirror` (relative to it), or the online files of
    /// `online`, downloaded if they are not in the cache yet. `what` names the data for errors.
    fn locate(&self, mirror: &str, online: &[Dataset], what: &str) -> Result<Located> {
        match self {
            DataRoot::Mirror(dir) => {
                let path = dir.join(mirror);
                if !path.is_file() {
                    bail!(
                        "{} not found. With --data-dir the task data is read from the mirror {} ({mirror}), \
                         which has no {what}: point --data-dir at a mirror laid out like ../shared/data, or \
                         leave it out to download {what} on first use",
                        path.display(),
                        dir.display()
                    );
                }
                Ok(Located::Mirror(path))
            }
            DataRoot::Online(sources) => {
                Ok(Located::Online(sources.fetch(online).with_context(|| format!("getting {what}"))?))
            }
        }
    }

    /// The rows of one split (see [`DataRoot::locate`]): the mirror's JSON lines as `T`s, or the
    /// online parquet rows as `H`s (the source's schema), converted. Also returns where the rows
    /// came from, for errors about them.
    fn rows<T, H>(&self, mirror: &str, online: &[Dataset], what: &str) -> Result<(String, Vec<T>)>
    where
        T: serde::de::DeserializeOwned,
        H: serde::de::DeserializeOwned + Into<T>,
    {
        Ok(match self.locate(mirror, online, what)? {
            Located::Mirror(path) => (path.display().to_string(), read_jsonl(&path)?),
            Located::Online(paths) => (what.to_string(), read_parquet::<H>(&paths)?.into_iter().map(H::into).collect()),
        })
    }

    /// [`DataRoot::locate`] of data that is one file either way.
    fn locate_file(&self, mirror: &str, online: Dataset, what: &str) -> Result<PathBuf> {
        match self.locate(mirror, &[online], what)? {
            Located::Mirror(path) => Ok(path),
            Located::Online(paths) => paths.into_iter().next().with_context(|| format!("no file for {what}")),
        }
    }
}

/// How a task is graded: by the logits of the answer letters, or by sampling a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalType {
    Categorical,
    Generative,
}

/// What grading an example needs besides its conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Training data only: nothing to grade.
    None,
    /// Multiple choice: the letters offered and the correct one.
    Choice { letters: Vec<String>, correct: String },
    /// The reference final answer, as [`extract_answer`] reads it from a `#### N` line.
    Final(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub conversation: Conversation,
    pub answer: Answer,
}

/// An indexable dataset of examples. `Send + Sync` so evals and loaders can share it across threads.
pub trait Task: Send + Sync {
    /// A short name for logs and reports, e.g. `ARC-Easy-test`.
    fn name(&self) -> String;

    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The example at `index` (`0..len()`); an index out of range is an error.
    fn get(&self, index: usize) -> Result<Example>;

    /// How the chat eval grades this task; `None` for training-only data.
    fn eval_type(&self) -> Option<EvalType>;

    /// Whether `completion` (the assistant's text) answers `example` correctly: the exact letter for
    /// multiple choice (surrounding whitespace ignored), the same `#### N` number for generative tasks.
    fn evaluate(&self, example: &Example, completion: &str) -> bool {
        match &example.answer {
            Answer::None => false,
            Answer::Choice { correct, .. } => completion.trim() == correct,
            Answer::Final(reference) => extract_answer(completion).as_deref() == Some(reference.as_str()),
        }
    }

    /// What RL maximises for `completion`: by default 1 when [`Task::evaluate`] passes it, else 0
    /// (the original's GSM8K reward); a task may grade more finely.
    fn reward(&self, example: &Example, completion: &str) -> f64 {
        f64::from(u8::from(self.evaluate(example, completion)))
    }
}

/// Fails with a clear message when `index` is past the end of a task.
fn check_index(task: &str, index: usize, len: usize) -> Result<()> {
    if index >= len {
        bail!("{task}: example {index} requested but the task has {len} examples");
    }
    Ok(())
}

/// The final answer of a GSM8K-style completion: the first `#### ` followed by an optional minus
/// sign and digits, dots and commas, with the commas removed (the original's `#### (\-?[0-9\.\,]+)`).
pub fn extract_answer(completion: &str) -> Option<String> {
    let is_number_char = |c: char| c.is_ascii_digit() || c == '.' || c == ',';
    completion.match_indices("#### ").find_map(|(at, marker)| {
        let rest = &completion[at + marker.len()..];
        let body = rest.strip_prefix('-').unwrap_or(rest);
        let end = body.find(|c| !is_number_char(c)).unwrap_or(body.len());
        if end == 0 {
            return None;
        }
        let sign = if body.len() < rest.len() { "-" } else { "" };
        Some(format!("{sign}{}", body[..end].replace(',', "")))
    })
}

/// The original's multiple-choice prompt. The choice comes before its letter (`- choice=A`) so the
/// letter the model answers with is the token right after the text it refers to.
pub fn render_mc(question: &str, letters: &[String], choices: &[String]) -> String {
    let mut prompt = format!("Multiple Choice question: {question}\n");
    for (letter, choice) in letters.iter().zip(choices) {
        prompt.push_str(&format!("- {choice}={letter}\n"));
    }
    prompt.push_str("\nRespond only with the letter of the correct answer.");
    prompt
}

/// The generator for example `index` of the stream `stream`: distinct `(stream, index)` pairs (both
/// below 2^32) get distinct seeds, so generated tasks never depend on which examples were read before.
fn example_rng(stream: u64, index: usize) -> StdRng {
    StdRng::seed_from_u64(stream.rotate_left(32) ^ index as u64)
}

/// Checks what rendering needs: an optional leading system message, then user and assistant
/// strictly alternating (at least one of each), user messages as plain text.
fn check_roles(conversation: &Conversation) -> Result<()> {
    let messages = match conversation.messages.split_first() {
        Some((first, rest)) if first.role == Role::System => rest,
        _ => &conversation.messages[..],
    };
    if messages.len() < 2 {
        bail!("a conversation needs at least a user message and an assistant reply");
    }
    for (i, message) in messages.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::User } else { Role::Assistant };
        if message.role != expected {
            bail!("message {i} is from {:?} where {expected:?} was expected: roles must alternate", message.role);
        }
        if message.role == Role::User && !matches!(message.content, Content::Text(_)) {
            bail!("message {i}: user messages must be plain text");
        }
    }
    Ok(())
}

/// Opens a text file, decompressing it if its name ends in `.gz`. Its lines may be at most
/// [`MAX_LINE_BYTES`] long.
fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(LineLimit { inner: BufReader::with_capacity(1 << 20, reader), since_newline: 0 }))
}

/// The longest line a task file may have, far above any row of the datasets: a file without line
/// breaks (or a decompression bomb of one) is an error, not an allocation without end.
const MAX_LINE_BYTES: usize = 64 << 20;

/// A reader whose lines may be at most [`MAX_LINE_BYTES`] long: past that, reading fails.
struct LineLimit<R> {
    inner: R,
    /// Bytes consumed since the last newline.
    since_newline: usize,
}

impl<R: BufRead> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for LineLimit<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.since_newline > MAX_LINE_BYTES {
            let message = format!("a line longer than {MAX_LINE_BYTES} bytes: not a file of this format");
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, message));
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        if amount == 0 {
            return;
        }
        // consume follows a fill_buf that returned at least `amount` bytes: this reads nothing
        let last_newline =
            self.inner.fill_buf().ok().and_then(|b| b[..amount.min(b.len())].iter().rposition(|&c| c == b'\n'));
        self.since_newline = match last_newline {
            Some(i) => amount - i - 1,
            None => self.since_newline + amount,
        };
        self.inner.consume(amount);
    }
}

/// Reads a JSON-lines file (optionally gzipped) into rows; blank lines are skipped and a line that
/// does not parse is an error naming the file and line.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for (i, line) in open_text(path)?.lines().enumerate() {
        let line = line.with_context(|| format!("reading {} line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a valid row for this task", path.display(), i + 1))?;
        rows.push(row);
    }
    Ok(rows)
}

/// Reads the rows of parquet files (the splits of a Hugging Face dataset), in file order, as `T`s
/// through their JSON form (see [`for_each_parquet_row`]). A row that does not fit `T` is an error
/// naming the file and row.
fn read_parquet<T: serde::de::DeserializeOwned>(paths: &[PathBuf]) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for_each_parquet_row(paths, &mut |path, i, value| {
        let row = serde_json::from_value(value)
            .with_context(|| format!("{} row {}: not a valid row for this task", path.display(), i + 1))?;
        rows.push(row);
        Ok(())
    })?;
    Ok(rows)
}

/// Calls `f(file, row index, row)` with each row of the parquet files, in order, as JSON (lists
/// become arrays, structs objects), one row at a time.
fn for_each_parquet_row(
    paths: &[PathBuf],
    f: &mut dyn FnMut(&Path, usize, serde_json::Value) -> Result<()>,
) -> Result<()> {
    for path in paths {
        let damaged = || {
            format!(
                "{} is damaged (truncated or corrupt): delete it and run the command again to download it again",
                path.display()
            )
        };
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = SerializedFileReader::new(file).with_context(damaged)?;
        // The record reader panics on some malformed files rather than failing: contain that.
        let mut callback_error = None;
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> parquet::errors::Result<()> {
            for (i, row) in reader.get_row_iter(None)?.enumerate() {
                if let Err(e) = f(path, i, field_json(&Field::Group(row?))) {
                    callback_error = Some(e);
                    break;
                }
            }
            Ok(())
        }));
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow::Error::from(e).context(damaged())),
            Err(_) => return Err(anyhow!("the parquet reader failed").context(damaged())),
        }
        if let Some(e) = callback_error {
            return Err(e);
        }
    }
    Ok(())
}

/// A parquet record field as JSON.
fn field_json(field: &Field) -> serde_json::Value {
    use serde_json::Value;
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float(x) => Value::from(f64::from(*x)),
        Field::Double(x) => Value::from(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(String::from_utf8_lossy(b.data()).into_owned()),
        Field::Group(row) => Value::Object(row.get_column_iter().map(|(k, v)| (k.clone(), field_json(v))).collect()),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => {
            Value::Object(map.entries().iter().map(|(k, v)| (k.to_string(), field_json(v))).collect())
        }
        // dates, times, decimals: no task reads them; their text is enough
        other => Value::String(other.to_string()),
    }
}
