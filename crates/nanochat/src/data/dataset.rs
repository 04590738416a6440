//! Pretraining shards on disk: `$NANOCHAT_BASE_DIR/base_data/shard_{:05}.parquet`, each with a
//! string column `text` in row groups of 1,024 documents (the layout of nanochat's FineWeb-Edu
//! shards). The last shard in sorted order is the validation split.
//!
//! This file lists and reads shards and writes new ones (`nanochat data build`); fetching them
//! over HTTP or from a local mirror lives in `download.rs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use parquet::basic::{Compression, Type as PhysicalType, ZstdLevel};
use parquet::column::reader::ColumnReader;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde::{Deserialize, Serialize};

use crate::common::{base_dir, write_atomic};

/// Documents per row group, as in the original shards: the unit the loader reads and strides over.
pub const ROW_GROUP_DOCS: usize = 1024;

/// Where `nanochat data download` puts shards and the loader looks for them by default.
pub fn data_dir() -> PathBuf {
    base_dir().join("base_data")
}

/// The file name of shard `index`, as on the Hugging Face dataset.
pub fn shard_name(index: usize) -> String {
    format!("shard_{index:05}.parquet")
}

/// Which documents a loader reads: training = every shard but the last, validation = the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    Train,
    Val,
}

/// Every `*.parquet` file in `dir`, sorted by name (partial downloads are hidden `.part` files).
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let hint = "run `nanochat data download` (or `nanochat data build`) first";
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read shard directory {}: {hint}", dir.display()))?;
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let visible = path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'));
        if visible && path.extension().is_some_and(|e| e == "parquet") {
            shards.push(path);
        }
    }
    if shards.is_empty() {
        bail!("no parquet shards in {}: {hint}", dir.display());
    }
    shards.sort();
    Ok(shards)
}

/// The shards of one split. Training needs at least two shards because the last is held out.
pub fn split_shards(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let mut shards = list_shards(dir)?;
    let last = shards.split_off(shards.len() - 1);
    match split {
        Split::Val => Ok(last),
        Split::Train if shards.is_empty() => bail!(
            "only one shard in {}: the last shard is the validation split, so training needs at \
             least two (download more with `nanochat data download -n N`)",
            dir.display()
        ),
        Split::Train => Ok(shards),
    }
}

/// An open shard: its footer is parsed and its `text` column located.
pub struct Shard {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    text_column: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard> {
        guarded(path, || Shard::open_unguarded(path))
    }

    fn open_unguarded(path: &Path) -> Result<Shard> {
        let file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
        let file_len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        let reader = SerializedFileReader::new(file).with_context(|| {
            format!(
                "{} is not a valid parquet file (truncated or corrupt?): delete it and download or \
                 build it again",
                path.display()
            )
        })?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let text_column = schema.columns().iter().position(|c| c.path().string() == "text");
        let Some(text_column) = text_column else {
            let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
            bail!(
                "{} has no `text` column (columns: {}): shards need a string column named `text`",
                path.display(),
                names.join(", ")
            );
        };
        if schema.column(text_column).physical_type() != PhysicalType::BYTE_ARRAY {
            bail!("{}: the `text` column does not hold strings", path.display());
        }
        check_footer(path, &reader, file_len)?;
        Ok(Shard { path: path.to_path_buf(), reader, text_column })
    }

    pub fn num_row_groups(&self) -> usize {
        self.reader.metadata().num_row_groups()
    }

    /// The documents of row group `index`, nulls skipped. Invalid UTF-8 is replaced rather than
    /// fatal: one bad document should not stop a training run.
    pub fn read_texts(&self, index: usize) -> Result<Vec<String>> {
        guarded(&self.path, || self.read_row_group(index))
    }

    fn read_row_group(&self, index: usize) -> Result<Vec<String>> {
        let context = || {
            format!(
                "reading row group {index} of {}: the file is damaged (a corrupt page); delete it and download \
                 it again (`nanochat data download`), or build it again",
                self.path.display()
            )
        };
        let row_group = self.reader.get_row_group(index).with_context(context)?;
        // the footer's row count sizes the buffers: no more than a row group's worth, whatever it says
        let rows = usize::try_from(row_group.metadata().num_rows()).unwrap_or(0).min(ROW_GROUP_DOCS);
        let column = row_group.get_column_reader(self.text_column).with_context(context)?;
        let ColumnReader::ByteArrayColumnReader(mut column) = column else {
            bail!("{}: the `text` column does not hold strings", self.path.display());
        };
        let mut values: Vec<ByteArray> = Vec::with_capacity(rows);
        let mut levels = Vec::with_capacity(rows);
        // The decoders panic on some corrupt pages rather than failing: contain that.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
            match column.read_records(ROW_GROUP_DOCS, Some(&mut levels), None, &mut values) {
                Ok((0, _, _)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }));
        match read {
            Ok(result) => result.with_context(context)?,
            Err(_) => bail!("{}: the parquet decoder failed", context()),
        }
        Ok(values.iter().map(|v| String::from_utf8_lossy(v.data()).into_owned()).collect())
    }
}

/// Checks the footer's numbers that the parquet reader trusts (and asserts on, or sizes buffers
/// from): every row count non-negative, every column chunk inside the file.
fn check_footer(path: &Path, reader: &SerializedFileReader<File>, file_len: u64) -> Result<()> {
    for (i, row_group) in reader.metadata().row_groups().iter().enumerate() {
        let chunks_inside = row_group.columns().iter().all(|chunk| {
            let start = chunk.dictionary_page_offset().unwrap_or(chunk.data_page_offset());
            let end = start.checked_add(chunk.compressed_size());
            start >= 0
                && chunk.compressed_size() >= 0
                && chunk.uncompressed_size() >= 0
                && chunk.num_values() >= 0
                && end.is_some_and(|end| u64::try_from(end).is_ok_and(|end| end <= file_len))
        });
        if row_group.num_rows() < 0 || !chunks_inside {
            bail!(
                "{}: row group {i} points outside the file (a corrupt footer): delete it and download or build it \
                 again",
                path.display()
            );
        }
    }
    Ok(())
}

/// Runs a read of the parquet file at `path`, turning a panic of the parquet reader (it asserts
/// on some malformed data) into an error that names the file.
fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        bail!(
            "{} is malformed (the parquet reader gave up on it): delete it and download or build it again",
            path.display()
        )
    })
}

/// Writes `docs` as a shard at `path`: column `text`, row groups of [`ROW_GROUP_DOCS`], zstd.
pub fn write_shard<S: AsRef<str>>(path: &Path, docs: &[S]) -> Result<()> {
    let schema = parse_message_type("message schema { REQUIRED BYTE_ARRAY text (STRING); }")?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        // Long prose neither repeats (dictionaries) nor benefits from min/max statistics.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::None)
        .build();
    let mut bytes = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut bytes, Arc::new(schema), Arc::new(props))?;
    for chunk in docs.chunks(ROW_GROUP_DOCS) {
        let mut row_group = writer.next_row_group()?;
        if let Some(mut column) = row_group.next_column()? {
            let values: Vec<ByteArray> = chunk.iter().map(|d| ByteArray::from(d.as_ref())).collect();
            column.typed::<ByteArrayType>().write_batch(&values, None, None)?;
            column.close()?;
        }
        row_group.close()?;
    }
    writer.close()?;
    write_atomic(path, &bytes)
}

/// How `nanochat data build` cuts and splits the input.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Output directory; must not already hold shards.
    pub out: PathBuf,
    /// A training shard is closed once it holds this many characters.
    pub shard_chars: usize,
    /// Every `val_every`-th document goes to the validation shard.
    pub val_every: usize,
    /// Plain-text files are cut into documents of at most this many characters.
    pub max_doc_chars: usize,
}

/// What `build` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildSummary {
    pub train_shards: usize,
    pub train_docs: usize,
    pub val_docs: usize,
}

/// Builds shards from local `.txt`, `.jsonl` (field `text`; either may be `.gz`) and `.parquet`
/// files: training shards first, then one validation shard, which sorts last.
pub fn build(inputs: &[PathBuf], opts: &BuildOptions) -> Result<BuildSummary> {
    if opts.val_every < 2 {
        bail!("--val-every must be at least 2 (every N-th document goes to validation)");
    }
    if std::fs::read_dir(&opts.out).is_ok_and(|mut d| d.any(|e| is_parquet(e.ok()))) {
        bail!("{} already holds parquet files: remove them or choose another --out", opts.out.display());
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let mut summary = BuildSummary { train_shards: 0, train_docs: 0, val_docs: 0 };
    let (mut train, mut train_chars, mut val, mut seen) = (Vec::new(), 0usize, Vec::new(), 0usize);
    for input in inputs {
        for_each_document(input, opts.max_doc_chars, &mut |doc| {
            seen += 1;
            if seen % opts.val_every == 0 {
                val.push(doc);
                return Ok(());
            }
            train_chars += doc.len();
            train.push(doc);
            if train_chars >= opts.shard_chars {
                write_shard(&opts.out.join(shard_name(summary.train_shards)), &train)?;
                summary.train_shards += 1;
                summary.train_docs += train.len();
                train.clear();
                train_chars = 0;
            }
            Ok(())
        })?;
    }
    if !train.is_empty() {
        write_shard(&opts.out.join(shard_name(summary.train_shards)), &train)?;
        summary.train_shards += 1;
        summary.train_docs += train.len();
    }
    if summary.train_docs == 0 || val.is_empty() {
        bail!(
            "only {seen} non-empty documents in the input: need at least {} so that every \
             {}-th can go to validation (lower --val-every or add text)",
            opts.val_every,
            opts.val_every
        );
    }
    summary.val_docs = val.len();
    write_shard(&opts.out.join(shard_name(summary.train_shards)), &val)?;
    Ok(summary)
}

fn is_parquet(entry: Option<std::fs::DirEntry>) -> bool {
    entry.is_some_and(|e| e.path().extension().is_some_and(|x| x == "parquet"))
}

/// Calls `f` with each non-empty document of one input file, by its extension.
fn for_each_document(path: &Path, max_doc_chars: usize, f: &mut dyn FnMut(String) -> Result<()>) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), true),
        None => (name.clone(), false),
    };
    let open = || -> Result<Box<dyn Read>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) })
    };
    if stem.ends_with(".txt") {
        let mut text = String::new();
        open()?.read_to_string(&mut text).with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
        for doc in chunk_text(&text, max_doc_chars) {
            f(doc)?;
        }
    } else if stem.ends_with(".jsonl") {
        for (i, line) in BufReader::new(open()?).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}: not valid JSON", path.display(), i + 1))?;
            let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
                bail!("{} line {}: no string field `text`", path.display(), i + 1);
            };
            if !text.trim().is_empty() {
                f(text.to_string())?;
            }
        }
    } else if stem.ends_with(".parquet") && !gz {
        let shard = Shard::open(path)?;
        for row_group in 0..shard.num_row_groups() {
            for text in shard.read_texts(row_group)? {
                if !text.trim().is_empty() {
                    f(text)?;
                }
            }
        }
    } else {
        bail!(
            "{}: unsupported input; use .txt, .jsonl (with a `text` field), .txt.gz, .jsonl.gz \
             or .parquet (with a `text` column)",
            path.display()
        );
    }
    Ok(())
}

/// Cuts plain text into documents: paragraphs (separated by blank lines) are joined up to
/// `max_chars`; a longer paragraph is cut at whitespace. One huge document would otherwise be
/// cropped to a single row by the best-fit packer.
fn chunk_text(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut docs = Vec::new();
    let (mut doc, mut doc_chars) = (String::new(), 0);
    let text = text.replace("\r\n", "\n");
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let mut rest = paragraph;
        while !rest.is_empty() {
            let sep = if doc.is_empty() { 0 } else { 2 };
            let rest_chars = rest.chars().count();
            if doc_chars + sep + rest_chars <= max_chars {
                if sep > 0 {
                    doc.push_str("\n\n");
                }
                doc.push_str(rest);
                doc_chars += sep + rest_chars;
                rest = "";
            } else if !doc.is_empty() {
                docs.push(std::mem::take(&mut doc));
                doc_chars = 0;
            } else {
                let (head, tail) = split_at_whitespace(rest, max_chars);
                docs.push(head.trim_end().to_string());
                rest = tail.trim_start();
            }
        }
    }
    if !doc.is_empty() {
        docs.push(doc);
    }
    docs
}

/// Splits `s` after at most `max_chars` characters, at the last whitespace if there is one.
fn split_at_whitespace(s: &str, max_chars: usize) -> (&str, &str) {
    let end = s.char_indices().nth(max_chars).map_or(s.len(), |(i, _)| i);
    let cut = match s[..end].rfind(char::is_whitespace) {
        Some(i) if i > 0 => i,
        _ => end,
    };
    s.split_at(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_keeps_every_word_and_respects_the_limit() {
        let text = "one two three\n\nfour five\r\n\r\nsix seven eight nine ten eleven twelve";
        let docs = chunk_text(text, 12);
        assert!(docs.iter().all(|d| d.chars().count() <= 12), "{docs:?}");
        let words: Vec<&str> = docs.iter().flat_map(|d| d.split_whitespace()).collect();
        assert_eq!(words, text.split_whitespace().collect::<Vec<_>>());
        assert_eq!(chunk_text("a\n\nb", 100), vec!["a\n\nb".to_string()]);
    }
}
