//! A Python pickle reader that only ever builds data: what a PyTorch state dict or a pickled
//! tiktoken encoding holds, and nothing else.
//!
//! Unpickling in Python runs code: a pickle names functions (`GLOBAL module name`) and calls them
//! (`REDUCE`). Here nothing is ever called. A pickle may name only the few globals these files
//! are made of ([`Global`]), each interpreted by this module as the data it stands for (an
//! `OrderedDict()` is an empty dict, `_rebuild_tensor_v2(...)` a description of a tensor); any
//! other name, such as `posix.system`, is refused with an error the moment it appears.
//!
//! Hostile input is bounded: every length is checked against the bytes that remain before
//! anything is allocated for it, objects live in one flat arena (no recursion to build or drop
//! them, however deeply a pickle nests or however often it refers back to an object), memo
//! indices are looked up in a map (a huge index allocates nothing), and the total size of what a
//! pickle builds is capped at a multiple of its own size. The reader runs in time linear in the
//! input.

use candle_core::DType;

mod machine;

/// Everything that stops a pickle from being read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error(
        "the pickle calls `{0}`, which is not part of a checkpoint or tokenizer: refused (loading it in Python \
         would run that code)"
    )]
    Refused(String),
    #[error("the pickle uses opcode 0x{opcode:02x} at byte {at}, which no checkpoint or tokenizer needs: refused")]
    Opcode { opcode: u8, at: usize },
    #[error("the pickle ends in the middle of an opcode at byte {0} (truncated file?)")]
    Truncated(usize),
    #[error("malformed pickle at byte {at}: {what}")]
    Malformed { at: usize, what: String },
    #[error("the pickle builds more than {0} bytes of objects, far more than its size explains: refused")]
    TooBig(usize),
}

/// The globals a state dict or a tiktoken encoding is made of, each read as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: called with no arguments, an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: a tensor.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(data, ...)`: the tensor `data`.
    RebuildParameter,
    /// `torch.<Type>Storage`: the element type of a storage, in a persistent id.
    Storage(DType),
    /// `_codecs.encode(text, "latin1")`: how protocol 2 writes bytes.
    CodecsEncode,
    /// `tiktoken.core.Encoding`: an object whose state is a dict.
    TiktokenEncoding,
}

/// Which globals a kind of file may name (and whether it may have persistent ids, which
/// PyTorch's zip format uses for storages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// A `torch.save`d state dict (`data.pkl` inside the zip).
    StateDict,
    /// A pickled `tiktoken.Encoding` (the original's `tokenizer.pkl`).
    Tiktoken,
}

impl Global {
    fn resolve(module: &str, name: &str, allowed: Allowed) -> Option<Global> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("tiktoken.core", "Encoding") => Global::TiktokenEncoding,
            ("torch", storage) => Global::Storage(match storage {
                "FloatStorage" => DType::F32,
                "BFloat16Storage" => DType::BF16,
                "HalfStorage" => DType::F16,
                "DoubleStorage" => DType::F64,
                "LongStorage" => DType::I64,
                "IntStorage" => DType::I32,
                "ShortStorage" => DType::I16,
                "ByteStorage" => DType::U8,
                _ => return None,
            }),
            _ => return None,
        };
        let ok = match allowed {
            Allowed::StateDict => !matches!(global, Global::TiktokenEncoding),
            Allowed::Tiktoken => matches!(global, Global::TiktokenEncoding | Global::CodecsEncode),
        };
        ok.then_some(global)
    }
}

/// A value on the stack or inside an object: scalars inline, everything else an index into the
/// arena ([`Pickle::obj`]). Copying one never copies an object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(usize),
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    /// The storage: an [`Obj::Storage`].
    pub storage: Value,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

/// An object of the arena.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// In insertion order.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// A persistent id `('storage', type, key, location, numel)`: the bytes are outside the pickle.
    Storage {
        dtype: DType,
        key: String,
        numel: usize,
    },
    Tensor(TensorView),
    /// An instance of an allowed class and the state `BUILD` gave it.
    Instance {
        class: Global,
        state: Option<Value>,
    },
}

/// A read pickle: the arena and the value the pickle returned.
pub struct Pickle {
    objs: Vec<Obj>,
    pub root: Value,
}

impl Pickle {
    pub fn obj(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(i),
            _ => None,
        }
    }

    pub fn str(&self, v: Value) -> Option<&str> {
        match self.obj(v)? {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn bytes(&self, v: Value) -> Option<&[u8]> {
        match self.obj(v)? {
            Obj::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The entries of a dict.
    pub fn dict(&self, v: Value) -> Option<&[(Value, Value)]> {
        match self.obj(v)? {
            Obj::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, dict: Value, key: &str) -> Option<Value> {
        self.dict(dict)?.iter().find(|(k, _)| self.str(*k) == Some(key)).map(|(_, v)| *v)
    }
}

/// Reads `data`, a pickle of the kind `allowed` says.
pub fn read(data: &[u8], allowed: Allowed) -> Result<Pickle, PickleError> {
    let (objs, root) = machine::run(data, allowed)?;
    Ok(Pickle { objs, root })
}
