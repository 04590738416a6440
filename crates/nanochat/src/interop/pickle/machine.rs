//! The pickle machine: runs a pickle's opcodes, building objects in the arena and refusing any
//! global that is not allowed (see the parent module).

use std::collections::HashMap;

use super::{Allowed, Global, Obj, PickleError, TensorView, Value};

/// Objects may take this many bytes per byte of pickle (plus a constant): far more than any real
/// file needs (a tuple of memo references is the most expansive real construct, ~8 bytes per
/// byte), far less than a decompression bomb.
const EXPANSION: usize = 64;

/// A stack item: a value, or the marker `MARK` pushes.
#[derive(Debug, Clone, Copy)]
enum Item {
    Mark,
    Value(Value),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    allowed: Allowed,
    stack: Vec<Item>,
    memo: HashMap<u64, Value>,
    objs: Vec<Obj>,
    /// Bytes of objects built so far, against `budget`.
    used: usize,
    budget: usize,
}

/// Runs `data`, a pickle of the kind `allowed` says: the arena of objects and the returned value.
pub(super) fn run(data: &[u8], allowed: Allowed) -> Result<(Vec<Obj>, Value), PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        allowed,
        stack: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        used: 0,
        budget: data.len().saturating_mul(EXPANSION).saturating_add(1 << 20),
    };
    let root = m.execute()?;
    Ok((m.objs, root))
}

impl<'a> Machine<'a> {
    fn malformed(&self, what: impl Into<String>) -> PickleError {
        PickleError::Malformed { at: self.pos, what: what.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(PickleError::Truncated(self.pos))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length prefix, checked against the remaining input (which it counts bytes of).
    fn len(&mut self, raw: u64) -> Result<usize, PickleError> {
        usize::try_from(raw).ok().filter(|&n| n <= self.data.len() - self.pos).ok_or(PickleError::Truncated(self.pos))
    }

    /// A `\n`-terminated line (GLOBAL's operands).
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or(PickleError::Truncated(self.pos))?;
        let line = std::str::from_utf8(&rest[..n]).map_err(|_| self.malformed("a global name that is not UTF-8"))?;
        self.pos += n + 1;
        Ok(line)
    }

    fn charge(&mut self, bytes: usize) -> Result<(), PickleError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.budget {
            return Err(PickleError::TooBig(self.budget));
        }
        Ok(())
    }

    fn alloc(&mut self, obj: Obj) -> Result<Value, PickleError> {
        let size = 32
            + match &obj {
                Obj::Str(s) => s.len(),
                Obj::Bytes(b) => b.len(),
                Obj::Tuple(v) | Obj::List(v) => 16 * v.len(),
                Obj::Dict(v) => 32 * v.len(),
                Obj::Tensor(t) => 16 * t.shape.len(),
                _ => 0,
            };
        self.charge(size)?;
        self.objs.push(obj);
        Ok(Value::Obj(self.objs.len() - 1))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Item::Value(v));
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(Item::Value(v)) => Ok(v),
            Some(Item::Mark) => Err(self.malformed("a mark where a value was expected")),
            None => Err(self.malformed("pop from an empty stack")),
        }
    }

    fn top(&self) -> Result<Value, PickleError> {
        match self.stack.last() {
            Some(Item::Value(v)) => Ok(*v),
            _ => Err(self.malformed("no value on the stack")),
        }
    }

    /// The values above the topmost mark, removing them and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| self.malformed("no mark on the stack"))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items.into_iter().map(|i| if let Item::Value(v) = i { v } else { Value::None }).collect())
    }

    fn obj_mut(&mut self, v: Value) -> Result<&mut Obj, PickleError> {
        match v {
            Value::Obj(i) if i < self.objs.len() => Ok(&mut self.objs[i]),
            _ => Err(self.malformed("a container was expected")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<Value, PickleError> {
        let global = Global::resolve(module, name, self.allowed)
            .ok_or_else(|| PickleError::Refused(format!("{module}.{name}")))?;
        self.alloc(Obj::Global(global))
    }

    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.malformed("a string that is not UTF-8"))?;
        self.alloc(Obj::Str(s.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?.to_vec();
        self.alloc(Obj::Bytes(bytes))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self.top()?;
        self.charge(32)?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let v = *self.memo.get(&key).ok_or_else(|| self.malformed(format!("memo entry {key} was never stored")))?;
        self.push(v);
        Ok(())
    }

    fn set_items(&mut self, dict: Value, items: &[Value]) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("an odd number of dict items"));
        }
        self.charge(16 * items.len())?;
        let Obj::Dict(entries) = self.obj_mut(dict)? else { return Err(self.malformed("SETITEM on a non-dict")) };
        entries.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        Ok(())
    }

    fn append(&mut self, list: Value, items: &[Value]) -> Result<(), PickleError> {
        self.charge(16 * items.len())?;
        let Obj::List(values) = self.obj_mut(list)? else { return Err(self.malformed("APPEND on a non-list")) };
        values.extend_from_slice(items);
        Ok(())
    }

    fn tuple_items(&self, v: Value) -> Result<Vec<Value>, PickleError> {
        match v {
            Value::Obj(i) => match self.objs.get(i) {
                Some(Obj::Tuple(items)) => Ok(items.clone()),
                _ => Err(self.malformed("arguments that are not a tuple")),
            },
            _ => Err(self.malformed("arguments that are not a tuple")),
        }
    }

    fn as_usize(&self, v: Value, what: &str) -> Result<usize, PickleError> {
        match v {
            Value::Int(i) => usize::try_from(i).map_err(|_| self.malformed(format!("a negative {what}"))),
            _ => Err(self.malformed(format!("{what} is not an integer"))),
        }
    }

    fn usize_tuple(&self, v: Value, what: &str) -> Result<Vec<usize>, PickleError> {
        self.tuple_items(v)?.into_iter().map(|x| self.as_usize(x, what)).collect()
    }

    /// `callable(*args)` for an allowed callable, as the data it stands for.
    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let global = match self.obj_mut(callable)? {
            Obj::Global(g) => *g,
            _ => return Err(self.malformed("REDUCE of something that is not a global")),
        };
        let args = self.tuple_items(args)?;
        match global {
            Global::OrderedDict if args.is_empty() => self.alloc(Obj::Dict(Vec::new())),
            Global::RebuildTensor if args.len() >= 4 => {
                let offset = self.as_usize(args[1], "storage offset")?;
                let shape = self.usize_tuple(args[2], "size")?;
                let stride = self.usize_tuple(args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(self.malformed("a tensor whose size and stride differ in length"));
                }
                if !matches!(self.obj_mut(args[0])?, Obj::Storage { .. }) {
                    return Err(self.malformed("a tensor whose storage is not a persistent storage"));
                }
                self.alloc(Obj::Tensor(TensorView { storage: args[0], offset, shape, stride }))
            }
            Global::RebuildParameter if !args.is_empty() => Ok(args[0]),
            Global::CodecsEncode if args.len() == 2 => {
                let latin1 = matches!(self.get(args[1]), Some(Obj::Str(e)) if e == "latin1" || e == "latin-1");
                if !latin1 {
                    return Err(self.malformed("_codecs.encode to another encoding than latin1"));
                }
                let text = match self.obj_mut(args[0])? {
                    Obj::Str(s) => s.clone(),
                    _ => return Err(self.malformed("_codecs.encode of a non-string")),
                };
                let bytes = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).ok())
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| self.malformed("_codecs.encode of a string that is not latin-1"))?;
                self.alloc(Obj::Bytes(bytes))
            }
            other => Err(self.malformed(format!("{other:?} called with {} arguments", args.len()))),
        }
    }

    /// `('storage', <Type>Storage, key, location, numel)`.
    fn persistent_load(&mut self, pid: Value) -> Result<Value, PickleError> {
        if self.allowed != Allowed::StateDict {
            return Err(self.malformed("a persistent id outside a PyTorch file"));
        }
        let items = self.tuple_items(pid)?;
        let bad = || self.malformed("a persistent id that is not ('storage', type, key, location, numel)");
        if items.len() != 5 {
            return Err(bad());
        }
        let text = |v: Value| match v {
            Value::Obj(i) => match self.objs.get(i) {
                Some(Obj::Str(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        };
        if text(items[0]).as_deref() != Some("storage") {
            return Err(bad());
        }
        let dtype = match items[1] {
            Value::Obj(i) => match self.objs.get(i) {
                Some(Obj::Global(Global::Storage(dtype))) => *dtype,
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        let key = text(items[2]).ok_or_else(bad)?;
        let numel = self.as_usize(items[4], "storage size")?;
        self.alloc(Obj::Storage { dtype, key, numel })
    }

    fn execute(&mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                b'\x80' => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("unknown protocol {proto}")));
                    }
                }
                b'\x95' => {
                    self.le::<8>()?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| self.malformed("POP from an empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                b'\x88' => self.push(Value::Bool(true)),
                b'\x89' => self.push(Value::Bool(false)),
                b'J' | b'K' | b'M' => {
                    let v = match op {
                        b'J' => i64::from(i32::from_le_bytes(self.le()?)),
                        b'K' => i64::from(self.u8()?),
                        _ => i64::from(u16::from_le_bytes(self.le()?)),
                    };
                    self.push(Value::Int(v));
                }
                b'\x8a' => {
                    // LONG1: n bytes of two's complement, little-endian; a checkpoint's fit in 8
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(self.malformed("an integer wider than 64 bits"));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                // strings and bytes: a 1-, 4- or 8-byte length, then the data
                b'X' | b'\x8c' | b'\x8d' | b'B' | b'C' | b'\x8e' => {
                    let raw = match op {
                        b'\x8c' | b'C' => u64::from(self.u8()?),
                        b'X' | b'B' => u64::from(u32::from_le_bytes(self.le()?)),
                        _ => u64::from_le_bytes(self.le()?),
                    };
                    let n = self.len(raw)?;
                    let v = if matches!(op, b'X' | b'\x8c' | b'\x8d') { self.string(n)? } else { self.bytes(n)? };
                    self.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v);
                }
                b')' | b'\x85' | b'\x86' | b'\x87' => {
                    let n = if op == b')' { 0 } else { usize::from(op - 0x84) };
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items))?;
                    self.push(v);
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()))?;
                    self.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items))?;
                    self.push(v);
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, &[item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, &items)?;
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Dict(Vec::new()))?;
                    self.set_items(v, &items)?;
                    self.push(v);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, &[key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                b'\x93' => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Obj::Str(module)), Some(Obj::Str(name))) = (self.get(module), self.get(name)) else {
                        return Err(self.malformed("STACK_GLOBAL of something that is not two strings"));
                    };
                    let (module, name) = (module.clone(), name.clone());
                    let v = self.global(&module, &name)?;
                    self.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v);
                }
                b'\x81' => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let class = match self.get(class) {
                        Some(Obj::Global(g @ Global::TiktokenEncoding)) => *g,
                        _ => return Err(self.malformed("NEWOBJ of a class that is not allowed")),
                    };
                    if !self.tuple_items(args)?.is_empty() {
                        return Err(self.malformed("NEWOBJ with arguments"));
                    }
                    let v = self.alloc(Obj::Instance { class, state: None })?;
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    match self.obj_mut(target)? {
                        Obj::Instance { state: slot @ None, .. } => *slot = Some(state),
                        // an OrderedDict's attributes (a state dict's `_metadata`): not data we use
                        Obj::Dict(_) => {}
                        _ => return Err(self.malformed("BUILD on an object that takes no state")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                // the memo: BINPUT, LONG_BINPUT, MEMOIZE (the next free index); BINGET, LONG_BINGET
                b'q' | b'r' | b'\x94' | b'h' | b'j' => {
                    let key = match op {
                        b'q' | b'h' => u64::from(self.u8()?),
                        b'r' | b'j' => u64::from(u32::from_le_bytes(self.le()?)),
                        _ => self.memo.len() as u64,
                    };
                    if matches!(op, b'h' | b'j') {
                        self.memo_get(key)?;
                    } else {
                        self.memo_put(key)?;
                    }
                }
                _ => return Err(PickleError::Opcode { opcode: op, at }),
            }
        }
    }

    fn get(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(i),
            _ => None,
        }
    }
}
