//! Reading PyTorch's `torch.save(state_dict)` files (`.pth`/`.pt`), which tch cannot read.
//!
//! Such a file is a zip: `<name>/data.pkl` is a pickle of an `OrderedDict` of tensors, each
//! pointing (by a persistent id) at a raw little-endian storage `<name>/data/<key>`. This is a
//! small, strict reader of the pickle opcodes `torch.save` emits: anything else (code to run,
//! unknown globals, unknown opcodes) is refused with an error naming the file and the offset.
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The tensors of a state dict, in the file's order, by their names.
pub fn read_pth(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let bad = |msg: String| Error::Weights {
        path: path.to_owned(),
        msg,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        bad(format!("not a zip-format torch.save file ({e}); re-save it with torch.save in PyTorch 1.6 or newer"))
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| bad("no data.pkl inside: not a torch.save file".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut text = String::new();
        order
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("byteorder: {e}")))?;
        if text.trim() != "little" {
            return Err(bad(format!(
                "storages are {} endian; only little endian is read",
                text.trim()
            )));
        }
    }
    let pickle = read_entry(&mut zip, &pkl_name).map_err(bad)?;
    let root = Unpickler::new(&pickle)
        .run()
        .map_err(|e| bad(format!("data.pkl: {e}")))?;
    let Value::Dict(items) = root else {
        return Err(bad(format!(
            "data.pkl holds {}, not a state dict",
            root.kind()
        )));
    };

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let Value::Str(name) = key else {
            return Err(bad(format!("a key is {}, not a string", key.kind())));
        };
        let Value::Tensor(t) = value else {
            return Err(bad(format!("{name:?} is {}, not a tensor", value.kind())));
        };
        if !storages.contains_key(&t.storage) {
            let bytes =
                read_entry(&mut zip, &format!("{prefix}data/{}", t.storage)).map_err(bad)?;
            storages.insert(t.storage.clone(), bytes);
        }
        let bytes = &storages[&t.storage];
        let elem = t.kind.elt_size_in_bytes();
        if bytes.len() != t.numel * elem {
            return Err(bad(format!(
                "{name:?}: storage {} holds {} bytes, expected {} ({} x {:?}); the file is truncated or corrupt",
                t.storage,
                bytes.len(),
                t.numel * elem,
                t.numel,
                t.kind
            )));
        }
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .map(|(&n, &s)| (n - 1).max(0) * s)
            .sum::<i64>()
            + t.offset;
        if t.size.iter().all(|&n| n > 0) && last as usize >= t.numel.max(1) {
            return Err(bad(format!("{name:?}: its view reaches past its storage")));
        }
        let storage = Tensor::f_from_data_size(bytes, &[t.numel as i64], t.kind)?;
        let tensor = storage
            .f_as_strided(&t.size, &t.stride, Some(t.offset))?
            .f_contiguous()?;
        out.push((name, tensor));
    }
    Ok(out)
}

fn read_entry(zip: &mut zip::ZipArchive<File>, name: &str) -> std::result::Result<Vec<u8>, String> {
    let mut entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(bytes)
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Clone, Debug)]
struct TensorRef {
    storage: String,
    kind: Kind,
    numel: usize,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float (no state-dict field needs its value).
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// `('storage', <dtype global>, key, location, numel)` after BINPERSID.
    Storage {
        key: String,
        kind: Kind,
        numel: usize,
    },
    Tensor(TensorRef),
    Mark,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(..) => "a class or function",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Mark => "a mark",
        }
    }

    fn int(&self) -> std::result::Result<i64, String> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            other => Err(format!("expected an int, got {}", other.kind())),
        }
    }

    fn ints(&self) -> std::result::Result<Vec<i64>, String> {
        match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::int).collect(),
            other => Err(format!("expected a tuple of ints, got {}", other.kind())),
        }
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// The pickle machine, restricted to what `torch.save` of a state dict writes.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let text = String::from_utf8(rest[..n].to_vec())
            .map_err(|e| format!("bad text at byte {}: {e}", self.pos))?;
        self.pos += n + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> R<String> {
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|e| format!("bad string at byte {}: {e}", self.pos))
    }

    fn pop(&mut self) -> R<Value> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark));
        let at = at.ok_or_else(|| format!("no mark at byte {}", self.pos))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> R<&mut Value> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("stack underflow at byte {pos}"))
    }

    fn run(mut self) -> R<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes at byte {at} is too large"));
                    }
                    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        other => return Err(format!("APPEND to {} at byte {at}", other.kind())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => return Err(format!("APPENDS to {} at byte {at}", other.kind())),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return Err(format!("odd number of items for SETITEMS at byte {at}"));
                    }
                    let Value::Dict(d) = self.top()? else {
                        return Err(format!("SETITEM on a non-dict at byte {at}"));
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(global(&module, &name)?);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(format!("STACK_GLOBAL without strings at byte {at}"));
                    };
                    self.stack.push(global(&module, &name)?);
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or_else(|| format!("memo {i} unset at byte {at}"))?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid).map_err(|e| format!("{e} at byte {at}"))?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let Value::Tuple(args) = args else {
                        return Err(format!("REDUCE with {} for arguments at byte {at}", args.kind()));
                    };
                    self.stack.push(reduce(func, args).map_err(|e| format!("{e} at byte {at}"))?);
                }
                b'b' => {
                    // BUILD: state for the object below. A state dict's `_metadata` arrives here;
                    // it holds no tensors and is not needed.
                    self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => return Err(format!("BUILD on {} at byte {at}", other.kind())),
                    }
                }
                _ => {
                    return Err(format!(
                        "opcode {op:#04x} ({:?}) at byte {at} is not one torch.save writes for a state dict",
                        op as char
                    ))
                }
            }
        }
    }
}

/// The globals a state dict may name; anything else would mean running foreign code.
fn global(module: &str, name: &str) -> R<Value> {
    let known = matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch", _)
    );
    if !known || (module == "torch" && storage_kind(name).is_none()) {
        return Err(format!(
            "refusing to load global {module}.{name}: a state dict has no need of it"
        ));
    }
    Ok(Value::Global(module.to_owned(), name.to_owned()))
}

fn persistent_load(pid: Value) -> R<Value> {
    let Value::Tuple(t) = pid else {
        return Err(format!("persistent id is {}, not a tuple", pid.kind()));
    };
    match &t[..] {
        [Value::Str(tag), Value::Global(_, dtype), Value::Str(key), Value::Str(_location), numel]
            if tag == "storage" =>
        {
            let kind =
                storage_kind(dtype).ok_or_else(|| format!("unknown storage type {dtype}"))?;
            let numel =
                usize::try_from(numel.int()?).map_err(|_| "negative storage size".to_owned())?;
            Ok(Value::Storage {
                key: key.clone(),
                kind,
                numel,
            })
        }
        _ => Err("persistent id is not a ('storage', type, key, location, size) tuple".into()),
    }
}

fn reduce(func: Value, args: Vec<Value>) -> R<Value> {
    let Value::Global(module, name) = &func else {
        return Err(format!("REDUCE on {}", func.kind()));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            let [storage, offset, size, stride, ..] = &args[..] else {
                return Err("_rebuild_tensor_v2 with too few arguments".into());
            };
            let Value::Storage { key, kind, numel } = storage else {
                return Err(format!(
                    "_rebuild_tensor_v2 on {}, not a storage",
                    storage.kind()
                ));
            };
            let (size, stride) = (size.ints()?, stride.ints()?);
            if size.len() != stride.len() || size.iter().any(|&n| n < 0) {
                return Err(format!("bad tensor shape {size:?} / stride {stride:?}"));
            }
            Ok(Value::Tensor(TensorRef {
                storage: key.clone(),
                kind: *kind,
                numel: *numel,
                offset: offset.int()?,
                size,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        _ => Err(format!("refusing to call {module}.{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> R<Value> {
        Unpickler::new(bytes).run()
    }

    #[test]
    fn refuses_code_execution_and_unknown_opcodes() {
        // GLOBAL os.system
        let err = run(b"\x80\x02cos\nsystem\n.").unwrap_err();
        assert!(err.contains("os.system"), "{err}");
        let err = run(b"\x80\x02I1\n.").unwrap_err();
        assert!(err.contains("opcode 0x49"), "{err}");
        let err = run(b"\x80\x02}q\x00(X\x01\x00").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn reads_dicts_ints_and_strings() {
        let v = run(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x05X\x01\x00\x00\x00bJ\xff\xff\xff\xffu.")
            .unwrap();
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(d.len(), 2);
        assert!(matches!(d[1].1, Value::Int(-1)));
    }
}
