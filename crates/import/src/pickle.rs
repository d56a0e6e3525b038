//! A restricted reader of `torch.save` files (zip archive + pickle) that only builds plain data.
//!
//! The pickle virtual machine accepts only the opcodes that plain data needs (protocols 2–5):
//! dicts, lists, tuples, ints, floats, strings, bytes, booleans, None, memo operations, and
//! tensors in the one form `torch.save` writes them: `REDUCE` of the global
//! `torch._utils._rebuild_tensor_v2` over a `BINPERSID` storage id
//! `('storage', torch.<T>Storage, key, location, numel)`. `collections.OrderedDict()` (the empty
//! backward-hooks argument) becomes an empty dict. Any other `GLOBAL` / `STACK_GLOBAL` target,
//! any `REDUCE` of something else, and `BUILD`, `NEWOBJ`, `INST`, `OBJ`, `EXT*` are refused: the
//! reader never calls or imports anything.
//!
//! Bounds: the pickle and every storage are at most [`MAX_MEMBER`] bytes, every length is checked
//! against the bytes left, the stack and memo are limited, the machine stops at the end of input
//! (each opcode consumes at least one byte, so it cannot loop), and nesting of converted values
//! is limited to [`MAX_DEPTH`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use crate::{ImportError, Result};

pub const MAX_MEMBER: u64 = 4 << 30;
pub const MAX_STACK: usize = 1 << 22;
pub const MAX_DEPTH: usize = 256;

/// Element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F64,
    F32,
    F16,
    BF16,
}

impl DType {
    fn from_storage(name: &str) -> Option<DType> {
        Some(match name {
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            DType::I64 | DType::F64 => 8,
            DType::I32 | DType::F32 => 4,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

/// A tensor as `torch.save` describes it (not yet materialised).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub key: String,
    pub dtype: DType,
    pub storage_numel: u64,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Plain data decoded from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
}

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Objects on the VM stack; containers are shared so that memoised references see later
/// appends, as in Python.
#[derive(Debug, Clone)]
enum Obj {
    Mark,
    Val(Value),
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(Rc<RefCell<Vec<(Obj, Obj)>>>),
    Tuple(Rc<Vec<Obj>>),
    Global(&'static str),
    Storage {
        key: String,
        dtype: DType,
        numel: u64,
    },
}

fn is_allowed_global(module: &str, name: &str) -> Option<&'static str> {
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Some("_rebuild_tensor_v2"),
        ("collections", "OrderedDict") => Some("OrderedDict"),
        ("torch", n) if DType::from_storage(n).is_some() => {
            // Leak-free static names for the storage classes.
            [
                "LongStorage",
                "IntStorage",
                "ShortStorage",
                "CharStorage",
                "ByteStorage",
                "BoolStorage",
                "DoubleStorage",
                "FloatStorage",
                "HalfStorage",
                "BFloat16Storage",
            ]
            .into_iter()
            .find(|s| *s == n)
        }
        _ => None,
    }
}

struct Vm<'a> {
    b: &'a [u8],
    i: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
}

type R<T> = std::result::Result<T, String>;

impl Vm<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end = self
            .i
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("truncated pickle at byte {}", self.i))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> R<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> R<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(crate::exact_bytes(s)))
    }
    fn push(&mut self, o: Obj) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err("pickle stack exceeds the limit".into());
        }
        self.stack.push(o);
        Ok(())
    }
    fn pop(&mut self) -> R<Obj> {
        match self.stack.pop() {
            Some(Obj::Mark) | None => Err(format!("pickle stack underflow at byte {}", self.i)),
            Some(o) => Ok(o),
        }
    }
    fn pop_mark(&mut self) -> R<Vec<Obj>> {
        let pos = self
            .stack
            .iter()
            .rposition(|o| matches!(o, Obj::Mark))
            .ok_or_else(|| format!("no MARK on the pickle stack at byte {}", self.i))?;
        let items = self.stack.split_off(pos + 1);
        self.stack.pop();
        Ok(items)
    }
    fn string(&mut self, n: usize) -> R<String> {
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| format!("invalid UTF-8 string at byte {}", self.i))
    }
    fn memo_put(&mut self, idx: u32) -> R<()> {
        let top = self
            .stack
            .last()
            .filter(|o| !matches!(o, Obj::Mark))
            .cloned()
            .ok_or_else(|| "memoize with an empty stack".to_string())?;
        if self.memo.len() >= MAX_STACK {
            return Err("pickle memo exceeds the limit".into());
        }
        self.memo.insert(idx, top);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> R<()> {
        let o = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("memo key {idx} not found"))?;
        self.push(o)
    }
    fn global(&mut self, module: &str, name: &str) -> R<()> {
        match is_allowed_global(module, name) {
            Some(g) => self.push(Obj::Global(g)),
            None => Err(format!(
                "refused: the pickle refers to {module}.{name}; only plain data (tensors, dicts, lists, tuples, numbers, strings) is accepted and nothing is ever called"
            )),
        }
    }

    fn run(&mut self) -> R<Obj> {
        loop {
            let at = self.i;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if !(2..=5).contains(&v) {
                        return Err(format!("unsupported pickle protocol {v}"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'}' => self.push(Obj::Dict(Rc::new(RefCell::new(Vec::new()))))?,
                b']' => self.push(Obj::List(Rc::new(RefCell::new(Vec::new()))))?,
                b')' => self.push(Obj::Tuple(Rc::new(Vec::new())))?,
                b'(' => self.push(Obj::Mark)?,
                b'N' => self.push(Obj::Val(Value::None))?,
                0x88 => self.push(Obj::Val(Value::Bool(true)))?,
                0x89 => self.push(Obj::Val(Value::Bool(false)))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Val(Value::Int(v as i64)))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Val(Value::Int(v as i64)))?
                }
                b'M' => {
                    let s = self.take(2)?;
                    let v = u16::from_le_bytes([s[0], s[1]]);
                    self.push(Obj::Val(Value::Int(v as i64)))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes does not fit 64 bits"));
                    }
                    let s = self.take(n)?;
                    let mut v: i64 = 0;
                    for (j, &byte) in s.iter().enumerate() {
                        v |= (byte as i64) << (8 * j);
                    }
                    if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Obj::Val(Value::Int(v)))?
                }
                b'G' => {
                    let s = self.take(8)?;
                    let v = f64::from_be_bytes(crate::exact_bytes(s));
                    self.push(Obj::Val(Value::Float(v)))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Val(Value::Str(s)))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Val(Value::Str(s)))?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).unwrap_or(usize::MAX);
                    let s = self.string(n)?;
                    self.push(Obj::Val(Value::Str(s)))?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.push(Obj::Val(Value::Bytes(s)))?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let s = self.take(n)?.to_vec();
                    self.push(Obj::Val(Value::Bytes(s)))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(Rc::new(items)))?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last() {
                        Some(Obj::List(l)) => l.borrow_mut().push(v),
                        _ => return Err(format!("APPEND to a non-list at byte {at}")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last() {
                        Some(Obj::List(l)) => l.borrow_mut().extend(items),
                        _ => return Err(format!("APPENDS to a non-list at byte {at}")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.stack.last() {
                        Some(Obj::Dict(d)) => d.borrow_mut().push((k, v)),
                        _ => return Err(format!("SETITEM on a non-dict at byte {at}")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(format!("SETITEMS with an odd number of items at byte {at}"));
                    }
                    match self.stack.last() {
                        Some(Obj::Dict(d)) => {
                            let mut d = d.borrow_mut();
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => return Err(format!("SETITEMS on a non-dict at byte {at}")),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Obj::Val(Value::Str(m)), Obj::Val(Value::Str(n))) => self.global(&m, &n)?,
                        _ => return Err(format!("STACK_GLOBAL without strings at byte {at}")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let st = storage_from_pid(&pid)?;
                    self.push(st)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let r = reduce(f, args)?;
                    self.push(r)?
                }
                other => {
                    return Err(format!(
                        "refused: pickle opcode 0x{other:02x} at byte {at} is not plain data (only tensors, dicts, lists, tuples, numbers and strings are accepted)"
                    ))
                }
            }
        }
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.b[self.i..];
        let n = rest
            .iter()
            .take(256)
            .position(|&c| c == b'\n')
            .ok_or_else(|| format!("unterminated GLOBAL name at byte {}", self.i))?;
        let s = self.string(n)?;
        self.i += 1;
        Ok(s)
    }
}

fn storage_from_pid(pid: &Obj) -> R<Obj> {
    let bad = || {
        "persistent id is not a torch storage ('storage', type, key, location, numel)".to_string()
    };
    let Obj::Tuple(t) = pid else {
        return Err(bad());
    };
    if t.len() != 5 {
        return Err(bad());
    }
    match (&t[0], &t[1], &t[2], &t[4]) {
        (
            Obj::Val(Value::Str(tag)),
            Obj::Global(g),
            Obj::Val(Value::Str(key)),
            Obj::Val(Value::Int(n)),
        ) if tag == "storage" && *n >= 0 => {
            let dtype = DType::from_storage(g).ok_or_else(bad)?;
            if key.is_empty() || key.contains('/') || key.contains("..") {
                return Err(format!("invalid storage key {key:?}"));
            }
            Ok(Obj::Storage {
                key: key.clone(),
                dtype,
                numel: *n as u64,
            })
        }
        _ => Err(bad()),
    }
}

fn ints(o: &Obj, what: &str) -> R<Vec<u64>> {
    let Obj::Tuple(t) = o else {
        return Err(format!("{what}: expected a tuple of integers"));
    };
    if t.len() > 16 {
        return Err(format!(
            "{what}: {} dimensions exceed the limit of 16",
            t.len()
        ));
    }
    t.iter()
        .map(|x| match x {
            Obj::Val(Value::Int(n)) if *n >= 0 => Ok(*n as u64),
            _ => Err(format!("{what}: expected non-negative integers")),
        })
        .collect()
}

fn reduce(f: Obj, args: Obj) -> R<Obj> {
    let Obj::Tuple(a) = &args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match f {
        Obj::Global("OrderedDict") if a.is_empty() => {
            Ok(Obj::Dict(Rc::new(RefCell::new(Vec::new()))))
        }
        Obj::Global("_rebuild_tensor_v2") if a.len() == 6 || a.len() == 7 => {
            let Obj::Storage { key, dtype, numel } = &a[0] else {
                return Err("_rebuild_tensor_v2 without a storage".into());
            };
            let offset = match &a[1] {
                Obj::Val(Value::Int(n)) if *n >= 0 => *n as u64,
                _ => return Err("_rebuild_tensor_v2: bad storage offset".into()),
            };
            let shape = ints(&a[2], "tensor size")?;
            let stride = ints(&a[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err("tensor size and stride differ in length".into());
            }
            Ok(Obj::Val(Value::Tensor(TensorRef {
                key: key.clone(),
                dtype: *dtype,
                storage_numel: *numel,
                offset,
                shape,
                stride,
            })))
        }
        Obj::Global(g) => Err(format!(
            "refused: REDUCE of {g} with these arguments; only tensor rebuilding and empty OrderedDict are accepted"
        )),
        _ => Err("refused: REDUCE of something that is not an accepted global; nothing is ever called".into()),
    }
}

fn to_value(o: &Obj, depth: usize) -> R<Value> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "data nested deeper than {MAX_DEPTH} levels (or cyclic)"
        ));
    }
    Ok(match o {
        Obj::Val(v) => v.clone(),
        Obj::List(l) => Value::List(
            l.borrow()
                .iter()
                .map(|x| to_value(x, depth + 1))
                .collect::<R<_>>()?,
        ),
        Obj::Tuple(t) => Value::Tuple(t.iter().map(|x| to_value(x, depth + 1)).collect::<R<_>>()?),
        Obj::Dict(d) => Value::Dict(
            d.borrow()
                .iter()
                .map(|(k, v)| Ok((to_value(k, depth + 1)?, to_value(v, depth + 1)?)))
                .collect::<R<_>>()?,
        ),
        Obj::Mark | Obj::Global(_) | Obj::Storage { .. } => {
            return Err("the pickle's result contains a class or storage object, not data".into())
        }
    })
}

/// Runs the restricted VM over `bytes`.
pub fn parse_pickle(bytes: &[u8]) -> R<Value> {
    let mut vm = Vm {
        b: bytes,
        i: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let top = vm.run()?;
    to_value(&top, 0)
}

/// A torch `.pt` file: its decoded data and its zip archive (for the storages).
pub struct TorchFile {
    pub data: Value,
    prefix: String,
    archive: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
}

fn read_member<R: std::io::Read + std::io::Seek>(
    z: &mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut m = z
        .by_name(name)
        .map_err(|e| ImportError::invalid(path, format!("member {name:?}"), e.to_string()))?;
    if m.size() > MAX_MEMBER {
        return Err(ImportError::invalid(
            path,
            format!("member {name:?}"),
            format!("{} bytes exceed the limit of {MAX_MEMBER}", m.size()),
        ));
    }
    let mut buf = Vec::with_capacity(m.size().min(1 << 26) as usize);
    (&mut m)
        .take(MAX_MEMBER + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            ImportError::invalid(
                path,
                format!("member {name:?}"),
                format!("cannot read: {e}"),
            )
        })?;
    Ok(buf)
}

impl TorchFile {
    /// Opens a `torch.save` zip file and decodes its pickle (nothing is executed).
    pub fn open(path: &Path) -> Result<TorchFile> {
        let f = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
        let mut z = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| {
            ImportError::invalid_file(
                path,
                format!("not a torch.save zip archive ({e}); legacy (pre-1.6) .pt files are not supported"),
            )
        })?;
        let pkls: Vec<String> = z
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let [pkl] = pkls.as_slice() else {
            return Err(ImportError::invalid_file(
                path,
                format!(
                    "expected exactly one <archive>/data.pkl, found {}",
                    pkls.len()
                ),
            ));
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let bo = format!("{prefix}byteorder");
        if z.index_for_name(&bo).is_some() {
            let b = read_member(&mut z, &bo, path)?;
            if b != b"little" {
                return Err(ImportError::invalid_file(
                    path,
                    "only little-endian torch files are supported",
                ));
            }
        }
        let bytes = read_member(&mut z, pkl, path)?;
        let data = parse_pickle(&bytes)
            .map_err(|m| ImportError::invalid(path, format!("member {pkl:?}"), m))?;
        Ok(TorchFile {
            data,
            prefix,
            archive: z,
        })
    }

    /// The storage bytes of `t` and the storage index of each of its elements, C order (the
    /// view checked to stay inside the storage, the storage's length checked).
    fn view(&mut self, path: &Path, record: &str, t: &TensorRef) -> Result<(Vec<u8>, Vec<usize>)> {
        let bad = |m: String| ImportError::invalid(path, record, m);
        if t.shape.len() != t.stride.len() {
            return Err(bad("tensor size and stride differ in length".into()));
        }
        let mut count: u64 = 1;
        let mut max_index = t.offset;
        for (&d, &s) in t.shape.iter().zip(&t.stride) {
            count = count
                .checked_mul(d)
                .ok_or_else(|| bad("tensor size overflows".into()))?;
            if d > 0 {
                max_index = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(max_index))
                    .ok_or_else(|| bad("tensor extent overflows".into()))?;
            }
        }
        if count > MAX_MEMBER / 8 {
            return Err(bad(format!("tensor of {count} elements exceeds the limit")));
        }
        if count > 0 && max_index >= t.storage_numel {
            return Err(bad(format!(
                "tensor view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} elements",
                t.offset, t.shape, t.stride, t.storage_numel
            )));
        }
        let name = format!("{}data/{}", self.prefix, t.key);
        let raw = read_member(&mut self.archive, &name, path)?;
        let isz = t.dtype.size() as u64;
        if raw.len() as u64 != t.storage_numel.saturating_mul(isz) {
            return Err(bad(format!(
                "storage {name:?} holds {} bytes, expected {} elements of {isz} bytes (truncated?)",
                raw.len(),
                t.storage_numel
            )));
        }
        let mut out = Vec::with_capacity(count as usize);
        let nd = t.shape.len();
        let mut idx = vec![0u64; nd];
        for _ in 0..count {
            let mut lin = t.offset;
            for (i, s) in idx.iter().zip(&t.stride) {
                lin += i * s;
            }
            out.push(lin as usize);
            for d in (0..nd).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok((raw, out))
    }

    /// Materialises an integer tensor (any integer / bool dtype) as i64 values, C order.
    pub fn int_tensor(&mut self, path: &Path, record: &str, t: &TensorRef) -> Result<Vec<i64>> {
        if matches!(t.dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            return Err(ImportError::invalid(
                path,
                record,
                format!("expected an integer tensor, found {:?}", t.dtype),
            ));
        }
        let (raw, idx) = self.view(path, record, t)?;
        Ok(idx
            .into_iter()
            .map(|i| match t.dtype {
                DType::I64 => i64::from_le_bytes(crate::exact_bytes(&raw[i * 8..i * 8 + 8])),
                DType::I32 => i32::from_le_bytes(crate::exact_bytes(&raw[i * 4..i * 4 + 4])) as i64,
                DType::I16 => i16::from_le_bytes([raw[i * 2], raw[i * 2 + 1]]) as i64,
                DType::I8 => raw[i] as i8 as i64,
                _ => raw[i] as i64,
            })
            .collect())
    }

    /// Materialises a floating-point tensor (f32, f64, f16, bf16) as f32 values, C order (f64
    /// rounded to f32; f16 / bf16 widened exactly).
    pub fn f32_tensor(&mut self, path: &Path, record: &str, t: &TensorRef) -> Result<Vec<f32>> {
        if !matches!(t.dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            return Err(ImportError::invalid(
                path,
                record,
                format!("expected a floating-point tensor, found {:?}", t.dtype),
            ));
        }
        let (raw, idx) = self.view(path, record, t)?;
        Ok(idx
            .into_iter()
            .map(|i| match t.dtype {
                DType::F32 => f32::from_le_bytes(crate::exact_bytes(&raw[i * 4..i * 4 + 4])),
                DType::F64 => f64::from_le_bytes(crate::exact_bytes(&raw[i * 8..i * 8 + 8])) as f32,
                DType::F16 => half::f16::from_le_bytes([raw[i * 2], raw[i * 2 + 1]]).to_f32(),
                _ => half::bf16::from_le_bytes([raw[i * 2], raw[i * 2 + 1]]).to_f32(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plain_containers() {
        // {'a': [1, 2], 'b': (None, True, 'x')} with protocol 2, memo and SETITEMS.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02eX\x01\x00\x00\x00bq\x03N\x88X\x01\x00\x00\x00x\x87q\x04u.";
        let v = parse_pickle(p).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&Value::List(vec![Value::Int(1), Value::Int(2)]))
        );
        assert_eq!(
            v.get("b"),
            Some(&Value::Tuple(vec![
                Value::None,
                Value::Bool(true),
                Value::Str("x".into())
            ]))
        );
    }

    #[test]
    fn memo_sees_later_appends() {
        // l = []; memo; APPEND 5; then a tuple (l, l) built from the memo.
        let p = b"\x80\x02]q\x00K\x05ah\x00\x86.";
        let v = parse_pickle(p).unwrap();
        let five = Value::List(vec![Value::Int(5)]);
        assert_eq!(v, Value::Tuple(vec![five.clone(), five]));
    }

    #[test]
    fn refuses_code() {
        for p in [
            &b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R."[..],
            &b"\x80\x02cbuiltins\neval\n."[..],
            &b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93."[..],
            &b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R."[..],
            &b"\x80\x02}b."[..],
            &b"\x80\x02(i__main__\nX\n."[..],
        ] {
            let e = parse_pickle(p).unwrap_err();
            assert!(e.contains("refused"), "{p:?}: {e}");
        }
    }

    #[test]
    fn rejects_malformed_without_panicking() {
        let good = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02eu.";
        for cut in 0..good.len() {
            assert!(parse_pickle(&good[..cut]).is_err(), "{cut}");
        }
        for p in [
            &b"\x80\x02a."[..],
            &b"\x80\x02K\x01K\x02s."[..],
            &b"\x80\x02h\x07."[..],
            &b"\x80\x02u."[..],
        ] {
            assert!(parse_pickle(p).is_err());
        }
        // Arbitrary bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut v = Vec::new();
            for _ in 0..(x % 40) {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                v.push((x >> 16) as u8);
            }
            let _ = parse_pickle(&v);
        }
    }
}
