//! safetensors files read and written one tensor at a time, so that a checkpoint of billions of
//! parameters never needs a second copy of itself in memory: loading holds the tensors built so far
//! plus the bytes of one, and writing streams each tensor to disk as soon as it is ready (what
//! `nanochat import` and `export` need for a 1.9 B-parameter model).
//!
//! The format (<https://github.com/huggingface/safetensors>): an 8-byte little-endian header length
//! N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?:
//! {string: string}}`, then the data, offsets relative to its start. Every claim of a header is
//! checked against the file before anything is allocated for it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

/// Largest header accepted (the reference implementation's limit): a header is a few KB per
/// tensor, so anything bigger is not a checkpoint.
const MAX_HEADER: u64 = 100_000_000;

/// One tensor of a file: where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub begin: u64,
    pub end: u64,
}

impl Entry {
    pub fn byte_len(&self) -> u64 {
        self.end - self.begin
    }
}

/// The parsed header of a safetensors file, its tensors in file order.
#[derive(Debug, Clone)]
pub struct Header {
    pub entries: Vec<Entry>,
}

/// The dtype names of the format, for the element types checkpoints use.
fn dtype_from_name(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U8" => DType::U8,
        "U32" => DType::U32,
        _ => return None,
    })
}

pub fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::U8 => "U8",
        DType::U32 => "U32",
        other => bail!("no safetensors name for {other:?}"),
    })
}

/// Reads and checks the header of the safetensors file `file` (of `file_len` bytes): every tensor's
/// range lies inside the data and has the size its dtype and shape say.
pub fn read_header(file: &mut File, file_len: u64) -> Result<Header> {
    ensure!(file_len >= 8, "{file_len} bytes: too short to be a safetensors file");
    file.seek(SeekFrom::Start(0))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n <= MAX_HEADER && n <= file_len - 8,
        "a header of {n} bytes in a file of {file_len}: not a safetensors file"
    );
    let mut text = vec![0u8; n as usize];
    file.read_exact(&mut text)?;
    let value: Value = serde_json::from_slice(&text).context("the header is not JSON")?;
    let Value::Object(map) = value else { bail!("the header is not a JSON object") };
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut header = Header { entries: Vec::with_capacity(map.len()) };
    for (name, info) in map {
        // free-form strings (transformers writes {"format": "pt"}); nothing here reads them
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| info.get(key).with_context(|| format!("tensor {name:?} has no {key}"));
        let dtype_str = field("dtype")?.as_str().with_context(|| format!("tensor {name:?}: dtype is not a string"))?;
        let dtype = dtype_from_name(dtype_str)
            .with_context(|| format!("tensor {name:?} has dtype {dtype_str}, which no checkpoint uses"))?;
        let shape = field("shape")?
            .as_array()
            .with_context(|| format!("tensor {name:?}: shape is not a list"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .with_context(|| format!("tensor {name:?}: shape holds something else than sizes"))?;
        let offsets = field("data_offsets")?
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .with_context(|| format!("tensor {name:?}: data_offsets is not two offsets"))?;
        let (begin, end) = offsets;
        ensure!(
            begin <= end && end <= data_len,
            "tensor {name:?}: bytes {begin}..{end} outside the {data_len} of data"
        );
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let bytes = elements.and_then(|e| e.checked_mul(dtype.size_in_bytes() as u64));
        ensure!(
            bytes == Some(end - begin),
            "tensor {name:?}: {} bytes for a {dtype_str} tensor of shape {shape:?}",
            end - begin
        );
        header.entries.push(Entry { name, dtype, shape, begin: data_start + begin, end: data_start + end });
    }
    header.entries.sort_by_key(|e| e.begin);
    Ok(header)
}

/// The raw little-endian bytes of `entry`.
pub fn read_bytes(file: &mut File, entry: &Entry) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; usize::try_from(entry.byte_len()).context("a tensor larger than memory")?];
    file.seek(SeekFrom::Start(entry.begin))?;
    file.read_exact(&mut bytes).with_context(|| format!("reading tensor {}", entry.name))?;
    Ok(bytes)
}

/// An open safetensors file: its header, and its tensors read on demand.
pub struct Reader {
    path: PathBuf,
    file: File,
    pub header: Header,
}

impl Reader {
    /// Opens `path`; with `expected_len`, a file of another size is refused before reading it
    /// (a truncated or replaced checkpoint).
    pub fn open(path: &Path, expected_len: Option<u64>) -> Result<Reader> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
        if let Some(expected) = expected_len {
            ensure!(
                len == expected,
                "{} is {len} bytes but {expected} were recorded: the file is truncated or was replaced",
                path.display()
            );
        }
        let header = read_header(&mut file, len)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        Ok(Reader { path: path.to_path_buf(), file, header })
    }

    /// The raw bytes of `entry` (one of this file's).
    pub fn bytes(&mut self, entry: &Entry) -> Result<Vec<u8>> {
        read_bytes(&mut self.file, entry).with_context(|| format!("reading {}", self.path.display()))
    }

    /// Every tensor, on `device`; f16 and bf16 widened to f32 when `widen` is set.
    pub fn load_all(&mut self, device: &Device, widen: bool) -> Result<HashMap<String, Tensor>> {
        let entries = self.header.entries.clone();
        let mut out = HashMap::with_capacity(entries.len());
        for entry in &entries {
            let bytes = self.bytes(entry)?;
            let mut tensor = Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
            if widen && matches!(entry.dtype, DType::BF16 | DType::F16) {
                tensor = tensor.to_dtype(DType::F32)?;
            }
            drop(bytes);
            out.insert(entry.name.clone(), tensor.to_device(device)?);
        }
        Ok(out)
    }
}

/// A tensor announced to a [`Writer`]: name, dtype and shape.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Writes a safetensors file whose header is known up front, the tensors' bytes following one at a
/// time in the order announced, to a temporary file renamed into place by [`Writer::finish`].
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once finished.
    out: Option<BufWriter<File>>,
    planned: Vec<Planned>,
    next: usize,
}

impl Writer {
    pub fn create(path: &Path, planned: Vec<Planned>, metadata: &BTreeMap<String, String>) -> Result<Writer> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0u64;
        for p in &planned {
            let bytes = (p.shape.iter().product::<usize>() * p.dtype.size_in_bytes()) as u64;
            header.insert(
                p.name.clone(),
                json!({"dtype": dtype_name(p.dtype)?, "shape": p.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = serde_json::to_vec(&header)?;
        // the data starts 8-byte aligned, as the reference writer pads it
        while !(8 + text.len()).is_multiple_of(8) {
            text.push(b' ');
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let written = out.write_all(&(text.len() as u64).to_le_bytes()).and_then(|()| out.write_all(&text));
        let writer = Writer { path: path.to_path_buf(), tmp, out: Some(out), planned, next: 0 };
        written.with_context(|| format!("writing {}", writer.tmp.display()))?;
        Ok(writer)
    }

    /// The bytes of the next announced tensor (little-endian, in its dtype).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(p) = self.planned.get(self.next) else { bail!("more tensors written than announced") };
        let want = p.shape.iter().product::<usize>() * p.dtype.size_in_bytes();
        ensure!(bytes.len() == want, "{}: {} bytes where {want} were announced", p.name, bytes.len());
        let Some(out) = self.out.as_mut() else { bail!("the file is already finished") };
        out.write_all(bytes).with_context(|| format!("writing {}", self.tmp.display()))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; returns its size.
    pub fn finish(mut self) -> Result<u64> {
        ensure!(self.next == self.planned.len(), "{} of {} tensors written", self.next, self.planned.len());
        let Some(out) = self.out.take() else { bail!("the file is already finished") };
        let result = (|| -> Result<u64> {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let size = file.metadata()?.len();
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for Writer {
    /// An abandoned writer (an error on the way) leaves no temporary file behind.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
