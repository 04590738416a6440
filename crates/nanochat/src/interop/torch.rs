//! PyTorch files as `torch.save` writes them (the zip format of PyTorch 1.6 and later): a zip
//! holding `<name>/data.pkl`, the pickled object, whose tensors point by persistent id at storages
//! stored as `<name>/data/<key>`, raw and uncompressed.
//!
//! The pickle is read by [`super::pickle`] (data only, a short list of globals); a tensor's bytes
//! are read only when asked for, one storage at a time, so a checkpoint of billions of parameters
//! is converted with the memory of its largest tensor. Every size the file claims is checked
//! against the file before anything is allocated for it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;

use super::pickle::{self, Allowed, Obj, Pickle, TensorView, Value};

/// Larger than any state dict's or tokenizer's pickle (they are kilobytes to a few megabytes).
const MAX_PICKLE: u64 = 256 << 20;

/// A tensor of a PyTorch file: where its elements are.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    key: String,
    storage_numel: usize,
}

impl TorchTensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What a PyTorch file holds, for the two kinds nanochat reads.
pub enum Contents {
    /// A state dict: names and tensors, in the file's order.
    StateDict(Vec<(String, TorchTensor)>),
    /// A single tensor (`token_bytes.pt`).
    Tensor(TorchTensor),
}

/// An open PyTorch file.
pub struct TorchFile {
    path: PathBuf,
    archive: zip::ZipArchive<File>,
    file_len: u64,
    prefix: String,
    big_endian: bool,
    pub contents: Contents,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic)?;
        if n >= 2 && magic[0] == 0x80 {
            bail!(
                "{} is a PyTorch file in the legacy format (before PyTorch 1.6), which is not read here: load it \
                 in Python and save it again with torch.save",
                path.display()
            );
        }
        ensure!(n == 4 && &magic == b"PK\x03\x04", "{} is not a PyTorch checkpoint (not a zip file)", path.display());
        let archive =
            zip::ZipArchive::new(file).with_context(|| format!("{} is not a readable zip", path.display()))?;
        let prefix = archive
            .file_names()
            .filter_map(|n| n.ok())
            .find_map(|n| n.strip_suffix("/data.pkl").filter(|p| !p.contains('/')).map(str::to_string))
            .with_context(|| format!("{} has no data.pkl: not a torch.save file", path.display()))?;
        let mut torch = TorchFile {
            path: path.to_path_buf(),
            archive,
            file_len,
            prefix,
            big_endian: false,
            contents: Contents::StateDict(vec![]),
        };
        let order = torch.entry(&format!("{}/byteorder", torch.prefix), 16).ok();
        torch.big_endian = match order.as_deref() {
            None | Some(b"little") => false,
            Some(b"big") => true,
            Some(other) => bail!("{}: unknown byte order {:?}", path.display(), String::from_utf8_lossy(other)),
        };
        let data = torch.entry(&format!("{}/data.pkl", torch.prefix), MAX_PICKLE)?;
        let pickle = pickle::read(&data, Allowed::StateDict)
            .with_context(|| format!("{}: refusing to load this file", path.display()))?;
        torch.contents = contents(&pickle).with_context(|| format!("{}: not a state dict", path.display()))?;
        Ok(torch)
    }

    /// The bytes of entry `name`, which must be stored uncompressed (as PyTorch writes) and at most
    /// `limit` bytes.
    fn entry(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let file_len = self.file_len;
        let mut entry = self.archive.by_name(name).with_context(|| format!("no {name} in the archive"))?;
        ensure!(
            entry.compression() == zip::CompressionMethod::Stored,
            "{name} is compressed; PyTorch stores its entries uncompressed"
        );
        let size = entry.size();
        ensure!(size <= limit && size <= file_len, "{name} claims {size} bytes, more than the file can hold");
        let mut bytes = vec![0u8; size as usize];
        entry.read_exact(&mut bytes).with_context(|| format!("reading {name}"))?;
        Ok(bytes)
    }

    /// The elements of `t`, row-major, as little-endian bytes of its dtype.
    pub fn read(&mut self, t: &TorchTensor) -> Result<Vec<u8>> {
        let es = t.dtype.size_in_bytes();
        let name = format!("{}/data/{}", self.prefix, t.key);
        let storage = self.entry(&name, u64::MAX).with_context(|| format!("reading {}", self.path.display()))?;
        ensure!(
            storage.len() == t.storage_numel * es,
            "{name} holds {} bytes for {} elements of {:?}",
            storage.len(),
            t.storage_numel,
            t.dtype
        );
        let n = t.elements();
        let mut out = Vec::with_capacity(n * es);
        if n > 0 {
            // the last element's index, checked to be inside the storage
            let last = t
                .shape
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?))
                .filter(|&last| last < t.storage_numel)
                .with_context(|| format!("a tensor of {name} reaches past its storage"))?;
            if is_contiguous(&t.shape, &t.stride) {
                out.extend_from_slice(&storage[t.offset * es..(last + 1) * es]);
            } else {
                let mut index = vec![0usize; t.shape.len()];
                for _ in 0..n {
                    let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
                    out.extend_from_slice(&storage[at * es..(at + 1) * es]);
                    for d in (0..index.len()).rev() {
                        index[d] += 1;
                        if index[d] < t.shape[d] {
                            break;
                        }
                        index[d] = 0;
                    }
                }
            }
        }
        if self.big_endian {
            out.chunks_exact_mut(es).for_each(<[u8]>::reverse);
        }
        Ok(out)
    }
}

/// Row-major without gaps (dimensions of size 1 may have any stride).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

fn tensor(pickle: &Pickle, v: Value) -> Result<TorchTensor> {
    let Some(Obj::Tensor(TensorView { storage, offset, shape, stride })) = pickle.obj(v) else {
        bail!("an entry that is not a tensor");
    };
    let Some(Obj::Storage { dtype, key, numel }) = pickle.obj(*storage) else { bail!("a tensor without storage") };
    ensure!(
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "a storage key {key:?} that PyTorch does not write"
    );
    Ok(TorchTensor {
        dtype: *dtype,
        shape: shape.clone(),
        stride: stride.clone(),
        offset: *offset,
        key: key.clone(),
        storage_numel: *numel,
    })
}

fn contents(pickle: &Pickle) -> Result<Contents> {
    if let Some(entries) = pickle.dict(pickle.root) {
        let mut out = Vec::with_capacity(entries.len());
        for &(k, v) in entries {
            let name = pickle.str(k).context("a state dict key that is not a string")?;
            out.push((name.to_string(), tensor(pickle, v).with_context(|| format!("entry {name:?}"))?));
        }
        return Ok(Contents::StateDict(out));
    }
    Ok(Contents::Tensor(tensor(pickle, pickle.root).context("neither a dict of tensors nor a tensor")?))
}
