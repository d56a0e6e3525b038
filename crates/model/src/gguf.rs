//! GGUF checkpoints (llama.cpp's format): one `.gguf` file or a split set
//! `<name>-0000N-of-0000M.gguf`, for the architectures llama.cpp converts the supported families
//! to (`olmoe`, `qwen2moe`, `qwen3moe`, `deepseek2` (DeepSeek-V2 with softmax gating, V3 with
//! sigmoid gating), `gpt-oss`, `granitemoe`, and `llama` with experts = Mixtral).
//!
//! The header is read with candle's GGUF reader; the `<arch>.*` metadata is turned into the
//! family's `config.json` fields and parsed by the family's own parser (`families/`), so a GGUF
//! model has exactly the [`ModelConfig`] of the Hugging Face checkpoint it was converted from
//! (as far as llama.cpp's metadata says: see [`config_json`]). Tensors are found through the
//! family-neutral roles of `table.rs`, named as llama.cpp names them ([`gguf_name`]), and checked
//! against the table's shapes before anything is loaded.
//!
//! Norms, routers and embeddings are dequantised to the compute dtype. Routed experts stored as
//! F32 / F16 / BF16 are loaded like a safetensors checkpoint's (same kernels, same numbers);
//! quantised experts stay quantised and are never dequantised as a whole: Q8_0, Q4_0, Q4_K, Q5_K
//! and Q6_K are multiplied in place by moe-xray's kernel (`moe_xray_kernels::quant`, activations
//! quantised to 8 bits as ggml does), the other types (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K) by one candle
//! `QMatMul` per expert and projection; MXFP4 experts (type 39) by moe-xray's kernel on Q8_0
//! activations as llama.cpp does (`--exact`: the f32 MXFP4 kernel, `crate::mxfp4`). In fast mode
//! on the CPU, the other matrices of those five
//! types (attention, dense and shared MLPs, an untied output head) stay in the file's map too and
//! use the same kernel ([`QLinear`]); `--exact` dequantises everything to f32, and
//! `MOE_XRAY_QMATMUL=candle` ([`QMATMUL_ENV`]) restores the candle path of earlier sessions.
//!
//! llama.cpp conventions undone at load time: the q/k rows of `llama` / `granitemoe` are permuted
//! for llama.cpp's interleaved RoPE (undone here, so the shared rotate-half RoPE applies), and
//! DeepSeek's `kv_b_proj` is stored split as `attn_k_b` (transposed) and `attn_v_b`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use moe_xray_kernels::quant::{xwt_q, QMatrix, QType};
use serde_json::{Map, Value};

use crate::config::{Family, GenerationDefaults, ModelConfig};
use crate::error::{ModelError, Result};
use crate::limits::checked_product;
use crate::model::{Experts, LoadOptions, MoeModel, TensorSource};
use crate::table::{bias_name, tensor_table, weight_name, ExpertLayout, Proj, Role};

/// llama.cpp architectures this build reads.
pub const SUPPORTED_ARCHS: &[&str] = &[
    "olmoe",
    "qwen2moe",
    "qwen3moe",
    "deepseek2",
    "gpt-oss",
    "granitemoe",
    "llama",
];

/// Largest number of elements of one GGUF tensor accepted (2^40).
const MAX_TENSOR_ELEMS: usize = 1 << 40;

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

struct Part {
    path: PathBuf,
    content: gguf_file::Content,
}

/// A GGUF model: one file or every part of a split set, headers read and checked.
pub struct GgufFile {
    path: PathBuf,
    parts: Vec<Part>,
    /// Tensor name → index of the part holding it.
    index: HashMap<String, usize>,
    arch: String,
    /// Tensors stored as MXFP4 (declared to candle's reader under a stand-in type).
    mxfp4: std::collections::HashSet<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("parts", &self.parts.len())
            .field("tensors", &self.index.len())
            .field("arch", &self.arch)
            .finish()
    }
}

/// `(prefix, n)` when the file name is `<prefix>-0000i-of-0000n.gguf`.
fn split_name(path: &Path) -> Option<(String, usize)> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".gguf")
        .or_else(|| name.strip_suffix(".GGUF"))?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, idx) = head.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(total) || !digits(idx) {
        return None;
    }
    let n: usize = total.parse().ok()?;
    let i: usize = idx.parse().ok()?;
    if n == 0 || i == 0 || i > n {
        return None;
    }
    Some((prefix.to_string(), n))
}

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::invalid(path, message)
}

/// llama.cpp's name of a tensor type (`Q4_K`, not candle's `Q4K`).
pub(crate) fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// ggml's type id of MXFP4 (`GGML_TYPE_MXFP4`), which candle's reader does not know.
const GGML_MXFP4: u32 = 39;
/// The type MXFP4 tensors are declared as to candle's reader (same block of 32 values; their
/// data is never read through candle: see [`GgufFile::is_mxfp4`]).
const MXFP4_STAND_IN: u32 = 2; // Q4_0

/// Reads the header of a GGUF file; the names of its MXFP4 tensors come back separately (they
/// are declared to candle's reader under a stand-in type, see [`scan_mxfp4`]).
pub(crate) fn read_header(path: &Path) -> Result<(gguf_file::Content, Vec<String>)> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut r = BufReader::new(file);
    let explain = |e: candle_core::Error| {
        let msg = e.to_string().trim_end().to_string();
        let hint = if msg.contains("unknown dtype") {
            " (supported tensor types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
             Q4_K, Q5_K, Q6_K, MXFP4)"
        } else {
            ""
        };
        bad(path, format!("invalid GGUF file: {msg}{hint}"))
    };
    match gguf_file::Content::read(&mut r) {
        Ok(c) => Ok((c, Vec::new())),
        Err(e)
            if e.to_string()
                .contains(&format!("unknown dtype for tensor {GGML_MXFP4}")) =>
        {
            let (header, names) = scan_mxfp4(path)?;
            let c = gguf_file::Content::read(&mut std::io::Cursor::new(header)).map_err(explain)?;
            Ok((c, names))
        }
        Err(e) => Err(explain(e)),
    }
}

/// Walks a GGUF (v2 / v3) header and returns its bytes with every MXFP4 tensor's type replaced
/// by [`MXFP4_STAND_IN`], and those tensors' names. Every length is checked against the file
/// before it is used (hostile input); the data section is not read.
fn scan_mxfp4(path: &Path) -> Result<(Vec<u8>, Vec<String>)> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |m: String| bad(path, format!("invalid GGUF file: {m}"));
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut r = BufReader::new(file);
    let io = |e: std::io::Error| ModelError::io(path, e);
    fn rd<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b)?;
        Ok(b)
    }
    let magic = rd::<4>(&mut r).map_err(io)?;
    let version = u32::from_le_bytes(rd::<4>(&mut r).map_err(io)?);
    if &magic != b"GGUF" || !(2..=3).contains(&version) {
        return Err(err(format!(
            "MXFP4 tensors in a GGUF file of magic {magic:?} version {version}"
        )));
    }
    let u64_ = |r: &mut BufReader<File>| -> Result<u64> {
        Ok(u64::from_le_bytes(rd::<8>(r).map_err(io)?))
    };
    let u32_ = |r: &mut BufReader<File>| -> Result<u32> {
        Ok(u32::from_le_bytes(rd::<4>(r).map_err(io)?))
    };
    let n_tensors = u64_(&mut r)?;
    let n_kv = u64_(&mut r)?;
    if n_tensors > 1 << 24 || n_kv > 1 << 24 {
        return Err(err(format!(
            "{n_tensors} tensors / {n_kv} metadata entries"
        )));
    }
    let skip = |r: &mut BufReader<File>, n: u64| -> Result<()> {
        let pos = r.stream_position().map_err(io)?;
        if pos.checked_add(n).is_none_or(|end| end > len) {
            return Err(err(format!(
                "a length of {n} bytes at offset {pos} runs past the end"
            )));
        }
        r.seek(SeekFrom::Current(n as i64)).map_err(io)?;
        Ok(())
    };
    let string = |r: &mut BufReader<File>| -> Result<Vec<u8>> {
        let n = u64_(r)?;
        let pos = r.stream_position().map_err(io)?;
        if n > 1 << 30 || pos.saturating_add(n) > len {
            return Err(err(format!("a string of {n} bytes at offset {pos}")));
        }
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b).map_err(io)?;
        Ok(b)
    };
    // Skips one metadata value of type `t` (nested arrays up to depth 4).
    let value = |r: &mut BufReader<File>, t: u32, depth: u64| -> Result<()> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        let mut stack = vec![(t, 1u64, depth)];
        while let Some((t, count, d)) = stack.pop() {
            if let Some(size) = fixed(t) {
                skip(r, size.saturating_mul(count))?;
                continue;
            }
            match t {
                8 => {
                    for _ in 0..count {
                        let n = u64_(r)?;
                        skip(r, n)?;
                    }
                }
                9 if d < 4 => {
                    for _ in 0..count {
                        let et = u32_(r)?;
                        let n = u64_(r)?;
                        if n > len {
                            return Err(err(format!("an array of {n} elements")));
                        }
                        stack.push((et, n, d + 1));
                    }
                }
                _ => return Err(err(format!("metadata value type {t}"))),
            }
        }
        Ok(())
    };
    for _ in 0..n_kv {
        string(&mut r)?;
        let t = u32_(&mut r)?;
        value(&mut r, t, 0)?;
    }
    let mut patches = Vec::new();
    let mut names = Vec::new();
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let dims = u32_(&mut r)?;
        if dims > 4 {
            return Err(err(format!("a tensor of {dims} dimensions")));
        }
        skip(&mut r, 8 * u64::from(dims))?;
        let pos = r.stream_position().map_err(io)?;
        if u32_(&mut r)? == GGML_MXFP4 {
            patches.push(pos);
            names.push(String::from_utf8_lossy(&name).into_owned());
        }
        u64_(&mut r)?;
    }
    let end = r.stream_position().map_err(io)?;
    let mut header = vec![0u8; usize::try_from(end).map_err(|_| err("header too large".into()))?];
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    r.read_exact(&mut header).map_err(io)?;
    for p in patches {
        let p = p as usize;
        header[p..p + 4].copy_from_slice(&MXFP4_STAND_IN.to_le_bytes());
    }
    Ok((header, names))
}

impl GgufFile {
    /// Opens a GGUF file, or all parts of a split set when `path` is one of them. Every tensor's
    /// size is checked against its type and against the file length (truncated files are refused
    /// here, before anything is loaded).
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = match split_name(path) {
            Some((prefix, n)) => (1..=n)
                .map(|i| path.with_file_name(format!("{prefix}-{i:05}-of-{n:05}.gguf")))
                .collect(),
            None => vec![path.to_path_buf()],
        };
        let mut parts = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        let mut mxfp4 = std::collections::HashSet::new();
        for (pi, p) in files.iter().enumerate() {
            if !p.is_file() {
                return Err(bad(
                    p,
                    format!(
                        "missing part {} of the split GGUF model {} ({} parts)",
                        pi + 1,
                        path.display(),
                        files.len()
                    ),
                ));
            }
            let (content, mx) = read_header(p)?;
            let file_len = std::fs::metadata(p)
                .map_err(|e| ModelError::io(p, e))?
                .len();
            if files.len() > 1 {
                if let Some(v) = content.metadata.get("split.count") {
                    let n = v.to_u64().ok();
                    if n != Some(files.len() as u64) {
                        return Err(bad(
                            p,
                            format!(
                                "metadata `split.count` is {v:?} but the file name says {} parts",
                                files.len()
                            ),
                        ));
                    }
                }
            }
            for (name, info) in &content.tensor_infos {
                let dims = info.shape.dims();
                let elems = checked_product(dims)
                    .filter(|&n| n <= MAX_TENSOR_ELEMS)
                    .ok_or_else(|| {
                        bad(p, format!("tensor `{name}`: shape {dims:?} is too large"))
                    })?;
                let t = info.ggml_dtype;
                let is_mx = mx.contains(name);
                let tname = if is_mx { "MXFP4" } else { type_name(t) };
                let row = dims.last().copied().unwrap_or(1);
                if !row.is_multiple_of(t.block_size()) {
                    return Err(bad(
                        p,
                        format!(
                            "tensor `{name}` ({tname}): rows of {row} values are not a multiple \
                             of the type's block of {}",
                            t.block_size()
                        ),
                    ));
                }
                let type_size = if is_mx {
                    moe_xray_kernels::mxfp4::GGML_BLOCK_BYTES
                } else {
                    t.type_size()
                };
                let bytes = (elems / t.block_size()) as u64 * type_size as u64;
                let end = content
                    .tensor_data_offset
                    .checked_add(info.offset)
                    .and_then(|s| s.checked_add(bytes));
                match end {
                    Some(end) if end <= file_len => {}
                    _ => {
                        return Err(bad(
                            p,
                            format!(
                                "truncated GGUF file: tensor `{name}` ({tname}, shape {dims:?}) \
                                 needs {bytes} bytes at offset {} but the file has {file_len} bytes",
                                content.tensor_data_offset.saturating_add(info.offset)
                            ),
                        ))
                    }
                }
                if index.insert(name.clone(), pi).is_some() {
                    return Err(bad(p, format!("tensor `{name}` appears in two parts")));
                }
                if is_mx {
                    mxfp4.insert(name.clone());
                }
            }
            parts.push(Part {
                path: p.clone(),
                content,
            });
        }
        let first = &parts[0];
        let arch = match first.content.metadata.get("general.architecture") {
            Some(gguf_file::Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(bad(
                    &first.path,
                    format!("metadata `general.architecture` must be a string, found {v:?}"),
                ))
            }
            None => {
                return Err(bad(
                    &first.path,
                    "missing metadata key `general.architecture`",
                ))
            }
        };
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedModel {
                path: first.path.clone(),
                message: format!("unsupported GGUF architecture \"{arch}\""),
                supported: SUPPORTED_ARCHS.join(", "),
            });
        }
        Ok(GgufFile {
            path: files[0].clone(),
            parts,
            index,
            arch,
            mxfp4,
        })
    }

    /// The first (or only) file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// llama.cpp's architecture name (`general.architecture`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.parts[0].content.metadata.get(key)
    }

    fn akey(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    /// A non-negative integer metadata value.
    fn uint(&self, key: &str) -> Result<Option<usize>> {
        use gguf_file::Value as V;
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match v {
            V::U8(x) => Some(u64::from(*x)),
            V::U16(x) => Some(u64::from(*x)),
            V::U32(x) => Some(u64::from(*x)),
            V::U64(x) => Some(*x),
            V::I8(x) => u64::try_from(*x).ok(),
            V::I16(x) => u64::try_from(*x).ok(),
            V::I32(x) => u64::try_from(*x).ok(),
            V::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                bad(
                    &self.path,
                    format!("metadata `{key}` must be a non-negative integer, found {v:?}"),
                )
            })
    }

    fn uint_req(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .ok_or_else(|| bad(&self.path, format!("missing metadata key `{key}`")))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        use gguf_file::Value as V;
        Ok(match self.meta(key) {
            None => None,
            // The shortest decimal of the f32 (1e-5, not 9.999999747378752e-6): the value the
            // converter was given.
            Some(V::F32(x)) => Some(x.to_string().parse::<f64>().unwrap_or(f64::from(*x))),
            Some(V::F64(x)) => Some(*x),
            Some(v) => match self.uint(key) {
                Ok(Some(n)) => Some(n as f64),
                _ => {
                    return Err(bad(
                        &self.path,
                        format!("metadata `{key}` must be a number, found {v:?}"),
                    ))
                }
            },
        })
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(bad(
                &self.path,
                format!("metadata `{key}` must be a boolean, found {v:?}"),
            )),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.meta(key) {
            None => Ok(None),
            Some(gguf_file::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(
                &self.path,
                format!("metadata `{key}` must be a string, found {v:?}"),
            )),
        }
    }

    fn info(&self, name: &str) -> Option<(&Part, &gguf_file::TensorInfo)> {
        let p = &self.parts[*self.index.get(name)?];
        Some((p, p.content.tensor_infos.get(name)?))
    }

    /// Shape of tensor `name` (candle order: outermost first), if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|(_, i)| i.shape.dims().to_vec())
    }

    /// Storage type of tensor `name`, if present.
    pub fn tensor_type(&self, name: &str) -> Option<GgmlDType> {
        self.info(name).map(|(_, i)| i.ggml_dtype)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Whether tensor `name` is stored as MXFP4 (ggml type 39).
    pub fn is_mxfp4(&self, name: &str) -> bool {
        self.mxfp4.contains(name)
    }

    /// The stored bytes of MXFP4 tensor `name`, left in a read-only map of its file.
    pub fn mxfp4_bytes(&self, name: &str) -> Result<crate::weights::MappedTensor> {
        let (part, info) = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.path.clone(),
        })?;
        if !self.is_mxfp4(name) {
            return Err(bad(&part.path, format!("tensor `{name}` is not MXFP4")));
        }
        let dims = info.shape.dims().to_vec();
        let blocks = checked_product(&dims).map(|n| n / moe_xray_kernels::mxfp4::BLOCK);
        let start = part.content.tensor_data_offset.checked_add(info.offset);
        let len = blocks.and_then(|b| b.checked_mul(moe_xray_kernels::mxfp4::GGML_BLOCK_BYTES));
        let (Some(start), Some(len)) = (start.and_then(|s| usize::try_from(s).ok()), len) else {
            return Err(bad(&part.path, format!("tensor `{name}`: size overflows")));
        };
        let file = File::open(&part.path).map_err(|e| ModelError::io(&part.path, e))?;
        let map = moe_xray_kernels::mmap::ReadOnlyMap::map(&file)
            .map_err(|e| ModelError::io(&part.path, e))?;
        crate::weights::MappedTensor::new(
            std::sync::Arc::new(map),
            start,
            start.saturating_add(len),
            DType::U8,
            dims,
        )
        .ok_or_else(|| bad(&part.path, format!("truncated GGUF file: tensor `{name}`")))
    }

    /// Reads tensor `name` as stored (quantised or not; MXFP4 tensors are refused here: they
    /// are read with [`GgufFile::mxfp4_bytes`] or [`GgufFile::dequantized`]).
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let (part, info) = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.path.clone(),
        })?;
        if self.is_mxfp4(name) {
            return Err(bad(
                &part.path,
                format!("tensor `{name}` is MXFP4, which candle's quantised matmul does not read"),
            ));
        }
        let file = File::open(&part.path).map_err(|e| ModelError::io(&part.path, e))?;
        let mut r = BufReader::new(file);
        info.read(&mut r, part.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| bad(&part.path, format!("tensor `{name}`: {e}")))
    }

    /// Reads tensor `name` dequantised to f32.
    pub fn dequantized(&self, name: &str) -> Result<Tensor> {
        if self.is_mxfp4(name) {
            let m = self.mxfp4_bytes(name)?;
            let k = m.shape.last().copied().unwrap_or(0);
            let rows = checked_product(&m.shape).map_or(0, |n| n / k.max(1));
            let w = moe_xray_kernels::mxfp4::MxMatrix::new(
                moe_xray_kernels::mxfp4::MxLayout::Ggml { data: m.bytes() },
                rows,
                k,
            )
            .ok_or_else(|| bad(&self.part_of(name), format!("tensor `{name}`: MXFP4 sizes")))?;
            return Ok(Tensor::from_vec(
                w.dequantize(),
                m.shape.clone(),
                &Device::Cpu,
            )?);
        }
        Ok(self.qtensor(name)?.dequantize(&Device::Cpu)?)
    }

    fn part_of(&self, name: &str) -> PathBuf {
        self.info(name)
            .map(|(p, _)| p.path.clone())
            .unwrap_or_else(|| self.path.clone())
    }

    /// Indices of the blocks that have a router (`blk.N.ffn_gate_inp.weight`).
    fn routed_blocks(&self, layers: usize) -> Vec<usize> {
        (0..layers)
            .filter(|l| self.contains(&format!("blk.{l}.ffn_gate_inp.weight")))
            .collect()
    }

    /// The `config.json` object of the Hugging Face checkpoint this file describes (llama.cpp's
    /// metadata keys mapped back onto the family's fields).
    pub fn config_json(&self) -> Result<Map<String, Value>> {
        let k = |s: &str| self.akey(s);
        let mut c = Map::new();
        let mut put = |key: &str, v: Value| {
            c.insert(key.to_string(), v);
        };
        let layers = self.uint_req(&k("block_count"))?;
        if layers > crate::limits::MAX_LAYERS {
            return Err(bad(
                &self.path,
                format!(
                    "metadata `{}` = {layers} exceeds the limit of {}",
                    k("block_count"),
                    crate::limits::MAX_LAYERS
                ),
            ));
        }
        let hidden = self.uint_req(&k("embedding_length"))?;
        let heads = self.uint_req(&k("attention.head_count"))?;
        let experts = self.uint_req(&k("expert_count"))?;
        let used = self.uint_req(&k("expert_used_count"))?;
        let vocab = match self.uint(&k("vocab_size"))? {
            Some(v) => v,
            None => match self.shape("token_embd.weight") {
                Some(s) if s.len() == 2 => s[0],
                _ => {
                    return Err(ModelError::MissingTensor {
                        name: "token_embd.weight".into(),
                        dir: self.path.clone(),
                    })
                }
            },
        };
        put("vocab_size", vocab.into());
        put("hidden_size", hidden.into());
        put("num_hidden_layers", layers.into());
        put("num_attention_heads", heads.into());
        if let Some(kv) = self.uint(&k("attention.head_count_kv"))? {
            put("num_key_value_heads", kv.into());
        }
        if let Some(n) = self.uint(&k("context_length"))? {
            put("max_position_embeddings", n.into());
        }
        if let Some(e) = self.float(&k("attention.layer_norm_rms_epsilon"))? {
            put("rms_norm_eps", e.into());
        }
        put("num_experts_per_tok", used.into());
        put(
            "tie_word_embeddings",
            (!self.contains("output.weight")).into(),
        );
        for (key, field) in [
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.uint(key)? {
                put(field, id.into());
            }
        }
        // RoPE: base frequency and YaRN.
        let theta = self.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), theta.into());
        let scaling = self.string(&k("rope.scaling.type"))?;
        match scaling.as_deref() {
            None | Some("none") => {
                rope.insert("rope_type".into(), "default".into());
            }
            Some("yarn") => {
                rope.insert("rope_type".into(), "yarn".into());
                let factor = self.float(&k("rope.scaling.factor"))?.ok_or_else(|| {
                    bad(
                        &self.path,
                        format!("missing metadata key `{}` (YaRN)", k("rope.scaling.factor")),
                    )
                })?;
                rope.insert("factor".into(), factor.into());
                if let Some(o) = self.uint(&k("rope.scaling.original_context_length"))? {
                    rope.insert("original_max_position_embeddings".into(), o.into());
                }
                for (key, field) in [
                    ("rope.scaling.yarn_beta_fast", "beta_fast"),
                    ("rope.scaling.yarn_beta_slow", "beta_slow"),
                    ("rope.scaling.yarn_attn_factor", "attention_factor"),
                ] {
                    if let Some(v) = self.float(&k(key))? {
                        rope.insert(field.into(), v.into());
                    }
                }
                if self.arch == "gpt-oss" {
                    rope.insert("truncate".into(), false.into());
                }
                if self.arch == "deepseek2" {
                    // llama.cpp writes 0.1 × mscale_all_dim and assumes mscale = mscale_all_dim
                    // (true of every published DeepSeek-V2/V3 config).
                    if let Some(m) = self.float(&k("rope.scaling.yarn_log_multiplier"))? {
                        rope.insert("mscale_all_dim".into(), (m / 0.1).into());
                        rope.insert("mscale".into(), (m / 0.1).into());
                    }
                }
            }
            Some(other) => {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    message: format!(
                        "metadata `{}` = \"{other}\" (only no scaling and yarn)",
                        k("rope.scaling.type")
                    ),
                })
            }
        }
        put("rope_parameters", Value::Object(rope));
        let q_bias = self.contains("blk.0.attn_q.bias");
        let routed = self.routed_blocks(layers);
        let dense_layers: Vec<Value> = (0..layers)
            .filter(|l| !routed.contains(l))
            .map(Value::from)
            .collect();
        let ff = self.uint(&k("feed_forward_length"))?;
        let expert_ff = self.uint(&k("expert_feed_forward_length"))?;
        let norm = self.boolean(&k("expert_weights_norm"))?;
        let model_type = match self.arch.as_str() {
            "olmoe" => {
                put("num_experts", experts.into());
                put(
                    "intermediate_size",
                    expert_ff
                        .or(ff)
                        .ok_or_else(|| {
                            bad(
                                &self.path,
                                format!("missing metadata key `{}`", k("feed_forward_length")),
                            )
                        })?
                        .into(),
                );
                put("norm_topk_prob", norm.unwrap_or(false).into());
                put("attention_bias", q_bias.into());
                if let Some(c) = self.float(&k("attention.clamp_kqv"))? {
                    put("clip_qkv", c.into());
                }
                "olmoe"
            }
            "qwen2moe" | "qwen3moe" => {
                put("num_experts", experts.into());
                put(
                    "moe_intermediate_size",
                    expert_ff
                        .ok_or_else(|| {
                            bad(
                                &self.path,
                                format!(
                                    "missing metadata key `{}`",
                                    k("expert_feed_forward_length")
                                ),
                            )
                        })?
                        .into(),
                );
                if let Some(ff) = ff {
                    put("intermediate_size", ff.into());
                }
                put("mlp_only_layers", Value::Array(dense_layers));
                if self.arch == "qwen2moe" {
                    put("qkv_bias", q_bias.into());
                    put("norm_topk_prob", norm.unwrap_or(false).into());
                    if let Some(s) = self.uint(&k("expert_shared_feed_forward_length"))? {
                        put("shared_expert_intermediate_size", s.into());
                    }
                    "qwen2_moe"
                } else {
                    put("attention_bias", q_bias.into());
                    put("norm_topk_prob", norm.unwrap_or(true).into());
                    if let Some(d) = self.uint(&k("attention.key_length"))? {
                        put("head_dim", d.into());
                    }
                    "qwen3_moe"
                }
            }
            "deepseek2" => {
                let sigmoid = match self.uint(&k("expert_gating_func"))? {
                    None | Some(1) => false,
                    Some(2) => true,
                    Some(g) => {
                        return Err(ModelError::Unsupported {
                            path: self.path.clone(),
                            message: format!(
                                "metadata `{}` = {g} (1 softmax, 2 sigmoid)",
                                k("expert_gating_func")
                            ),
                        })
                    }
                };
                put("n_routed_experts", experts.into());
                put(
                    "moe_intermediate_size",
                    self.uint_req(&k("expert_feed_forward_length"))?.into(),
                );
                put("intermediate_size", ff.unwrap_or(0).into());
                put(
                    "first_k_dense_replace",
                    self.uint(&k("leading_dense_block_count"))?
                        .unwrap_or(0)
                        .into(),
                );
                put(
                    "q_lora_rank",
                    self.uint(&k("attention.q_lora_rank"))?.into(),
                );
                put(
                    "kv_lora_rank",
                    self.uint_req(&k("attention.kv_lora_rank"))?.into(),
                );
                let rope_dim = self.uint_req(&k("rope.dimension_count"))?;
                let key_len = match self.uint(&k("attention.key_length_mla"))? {
                    Some(v) => v,
                    None => self.uint_req(&k("attention.key_length"))?,
                };
                let v_len = match self.uint(&k("attention.value_length_mla"))? {
                    Some(v) => v,
                    None => self.uint_req(&k("attention.value_length"))?,
                };
                let nope = key_len.checked_sub(rope_dim).ok_or_else(|| {
                    bad(
                        &self.path,
                        format!(
                            "metadata `{}` = {key_len} is smaller than `{}` = {rope_dim}",
                            k("attention.key_length_mla"),
                            k("rope.dimension_count")
                        ),
                    )
                })?;
                put("qk_rope_head_dim", rope_dim.into());
                put("qk_nope_head_dim", nope.into());
                put("v_head_dim", v_len.into());
                put(
                    "n_shared_experts",
                    self.uint(&k("expert_shared_count"))?.unwrap_or(0).into(),
                );
                put(
                    "routed_scaling_factor",
                    self.float(&k("expert_weights_scale"))?
                        .filter(|&s| s != 0.0)
                        .unwrap_or(1.0)
                        .into(),
                );
                put("norm_topk_prob", norm.unwrap_or(false).into());
                let groups = self.uint(&k("expert_group_count"))?.unwrap_or(1);
                put("n_group", groups.max(1).into());
                put(
                    "topk_group",
                    self.uint(&k("expert_group_used_count"))?
                        .unwrap_or(1)
                        .max(1)
                        .into(),
                );
                // llama.cpp does not use them, but converts them: q_a / kv_a / o biases.
                put(
                    "attention_bias",
                    self.contains("blk.0.attn_output.bias").into(),
                );
                if sigmoid {
                    put("scoring_func", "sigmoid".into());
                    put("topk_method", "noaux_tc".into());
                    "deepseek_v3"
                } else {
                    put(
                        "topk_method",
                        if groups > 1 {
                            "group_limited_greedy"
                        } else {
                            "greedy"
                        }
                        .into(),
                    );
                    "deepseek_v2"
                }
            }
            "gpt-oss" => {
                put("num_local_experts", experts.into());
                put(
                    "intermediate_size",
                    expert_ff
                        .or(ff)
                        .ok_or_else(|| {
                            bad(
                                &self.path,
                                format!(
                                    "missing metadata key `{}`",
                                    k("expert_feed_forward_length")
                                ),
                            )
                        })?
                        .into(),
                );
                if let Some(d) = self.uint(&k("attention.key_length"))? {
                    put("head_dim", d.into());
                }
                if let Some(w) = self.uint(&k("attention.sliding_window"))? {
                    put("sliding_window", w.into());
                }
                put("attention_bias", q_bias.into());
                // llama.cpp's gpt-oss clamps at 7 (`swiglu_limit` of the published models); a
                // per-layer `swiglu_clamp_exp` array, where present, must be one value.
                if let Some(v) = self.meta(&k("swiglu_clamp_exp")) {
                    let key = k("swiglu_clamp_exp");
                    let vals: Vec<f64> = match v {
                        gguf_file::Value::Array(a) => a
                            .iter()
                            .map(|x| match x {
                                gguf_file::Value::F32(f) => Ok(f64::from(*f)),
                                other => Err(bad(
                                    &self.path,
                                    format!(
                                        "metadata `{key}` must hold f32 values, found {other:?}"
                                    ),
                                )),
                            })
                            .collect::<Result<_>>()?,
                        other => {
                            return Err(bad(
                                &self.path,
                                format!("metadata `{key}` must be an array, found {other:?}"),
                            ))
                        }
                    };
                    let nonzero: Vec<f64> = vals.into_iter().filter(|&x| x != 0.0).collect();
                    if let Some(&first) = nonzero.first() {
                        if nonzero.iter().any(|&x| x != first) {
                            return Err(ModelError::Unsupported {
                                path: self.path.clone(),
                                message: format!("metadata `{key}`: different limits per layer"),
                            });
                        }
                        put("swiglu_limit", first.into());
                    }
                }
                "gpt_oss"
            }
            "granitemoe" => {
                put("num_local_experts", experts.into());
                put(
                    "intermediate_size",
                    expert_ff
                        .or(ff)
                        .ok_or_else(|| {
                            bad(
                                &self.path,
                                format!("missing metadata key `{}`", k("feed_forward_length")),
                            )
                        })?
                        .into(),
                );
                for (key, field) in [
                    ("attention.scale", "attention_multiplier"),
                    ("embedding_scale", "embedding_multiplier"),
                    ("residual_scale", "residual_multiplier"),
                    ("logit_scale", "logits_scaling"),
                ] {
                    if let Some(v) = self.float(&k(key))? {
                        put(field, v.into());
                    }
                }
                put("attention_bias", q_bias.into());
                "granitemoe"
            }
            "llama" => {
                if experts == 0 {
                    return Err(ModelError::Unsupported {
                        path: self.path.clone(),
                        message: "a `llama` GGUF without experts (a dense model)".into(),
                    });
                }
                put("num_local_experts", experts.into());
                put(
                    "intermediate_size",
                    expert_ff
                        .or(ff)
                        .ok_or_else(|| {
                            bad(
                                &self.path,
                                format!("missing metadata key `{}`", k("feed_forward_length")),
                            )
                        })?
                        .into(),
                );
                if let Some(w) = self.uint(&k("attention.sliding_window"))? {
                    put("sliding_window", w.into());
                }
                "mixtral"
            }
            other => {
                return Err(ModelError::UnsupportedModel {
                    path: self.path.clone(),
                    message: format!("unsupported GGUF architecture \"{other}\""),
                    supported: SUPPORTED_ARCHS.join(", "),
                })
            }
        };
        put("model_type", model_type.into());
        Ok(c)
    }

    /// The model configuration (see [`GgufFile::config_json`]), validated like a config.json.
    pub fn config(&self) -> Result<ModelConfig> {
        let obj = self.config_json()?;
        let text = Value::Object(obj).to_string();
        ModelConfig::from_json_str(&text, &self.path)
    }

    /// EOS / BOS / padding token ids from the tokenizer metadata.
    pub fn generation_defaults(&self) -> Result<GenerationDefaults> {
        Ok(GenerationDefaults {
            eos_token_id: self
                .uint("tokenizer.ggml.eos_token_id")?
                .map(|t| vec![t as u32])
                .unwrap_or_default(),
            pad_token_id: self
                .uint("tokenizer.ggml.padding_token_id")?
                .map(|t| t as u32),
            bos_token_id: self.uint("tokenizer.ggml.bos_token_id")?.map(|t| t as u32),
        })
    }

    /// The token string of id `key`'s value in `tokenizer.ggml.tokens`, if both are present.
    fn token_string(&self, key: &str) -> Result<Option<String>> {
        let Some(id) = self.uint(key)? else {
            return Ok(None);
        };
        Ok(match self.meta("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(a)) => match a.get(id) {
                Some(gguf_file::Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        })
    }

    /// `tokenizer.chat_template` with the BOS / EOS token strings.
    pub fn chat_template(&self) -> Result<Option<(String, String, String)>> {
        let Some(src) = self.string("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let bos = self
            .token_string("tokenizer.ggml.bos_token_id")?
            .unwrap_or_default();
        let eos = self
            .token_string("tokenizer.ggml.eos_token_id")?
            .unwrap_or_default();
        Ok(Some((src, bos, eos)))
    }
}

/// llama.cpp's name of the weight (or, with `bias`, the bias) of a module role. Routed experts
/// are stacked per layer (`ffn_{gate,up,down}_exps`); fused roles have no single GGUF name.
pub fn gguf_name(family: Family, role: Role, bias: bool) -> Option<String> {
    let suffix = if bias { "bias" } else { "weight" };
    let blk = |l: usize, s: &str| Some(format!("blk.{l}.{s}.{suffix}"));
    let p = |p: Proj| match p {
        Proj::Gate => "gate",
        Proj::Up => "up",
        Proj::Down => "down",
    };
    match role {
        Role::Embed => Some(format!("token_embd.{suffix}")),
        Role::LmHead => Some(format!("output.{suffix}")),
        Role::FinalNorm => Some(format!("output_norm.{suffix}")),
        Role::InputNorm(l) => blk(l, "attn_norm"),
        Role::PostNorm(l) => blk(
            l,
            if family == Family::GptOss {
                "post_attention_norm"
            } else {
                "ffn_norm"
            },
        ),
        Role::Q(l) => blk(l, "attn_q"),
        Role::K(l) => blk(l, "attn_k"),
        Role::V(l) => blk(l, "attn_v"),
        Role::O(l) => blk(l, "attn_output"),
        Role::QNorm(l) => blk(l, "attn_q_norm"),
        Role::KNorm(l) => blk(l, "attn_k_norm"),
        Role::Sinks(l) => blk(l, "attn_sinks"),
        Role::QA(l) => blk(l, "attn_q_a"),
        Role::QANorm(l) => blk(l, "attn_q_a_norm"),
        Role::QB(l) => blk(l, "attn_q_b"),
        Role::KvA(l) => blk(l, "attn_kv_a_mqa"),
        Role::KvANorm(l) => blk(l, "attn_kv_a_norm"),
        Role::KvB(l) => blk(l, "attn_kv_b"),
        Role::Router(l) => blk(l, "ffn_gate_inp"),
        // llama.cpp keeps the `.bias` of `e_score_correction_bias` in the name.
        Role::ScoreBias(l) => Some(format!("blk.{l}.exp_probs_b.bias")),
        Role::Expert(l, _, pr) => blk(l, &format!("ffn_{}_exps", p(pr))),
        Role::FusedGateUp(_) | Role::FusedDown(_) => None,
        Role::Dense(l, pr) => blk(l, &format!("ffn_{}", p(pr))),
        Role::Shared(l, pr) => blk(l, &format!("ffn_{}_shexp", p(pr))),
        Role::SharedGate(l) => blk(l, "ffn_gate_inp_shexp"),
    }
}

/// How one Hugging Face tensor is made from GGUF tensors.
#[derive(Debug, Clone)]
enum Recipe {
    Plain(String),
    /// llama.cpp's q/k row permutation for interleaved RoPE, undone (`heads` heads).
    Unpermute(String, usize),
    /// DeepSeek `kv_b_proj` from `attn_k_b` `[H, rank, nope]` and `attn_v_b` `[H, v, rank]`.
    KvB {
        k_b: String,
        v_b: String,
    },
}

/// The tensors of a GGUF model under their Hugging Face names (see [`TensorSource`]).
pub struct GgufSource {
    file: GgufFile,
    cfg: ModelConfig,
    recipes: HashMap<String, Recipe>,
    /// Where quantised routed experts live (see [`ExpertResidency`]).
    residency: ExpertResidency,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("file", &self.file)
            .finish()
    }
}

fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    // llama.cpp: w.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2); inverse: reshape to
    // (heads, rows/heads/2, 2, cols), swap back.
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(ModelError::InvalidArgument(format!(
            "cannot undo the RoPE permutation of {rows} rows over {heads} heads"
        )));
    }
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

impl GgufSource {
    /// Checks every tensor of the family's table against the file (presence and shape) and
    /// records how each Hugging Face tensor is read.
    pub fn new(file: GgufFile, cfg: ModelConfig) -> Result<Self> {
        let f = cfg.family;
        let layout = if f == Family::GptOss {
            ExpertLayout::Fused
        } else {
            ExpertLayout::PerExpert
        };
        let permuted = matches!(f, Family::Mixtral | Family::GraniteMoe);
        let mut recipes = HashMap::new();
        let check = |name: &str, expected: &[usize]| -> Result<()> {
            match file.shape(name) {
                None => Err(ModelError::MissingTensor {
                    name: name.to_string(),
                    dir: file.path.clone(),
                }),
                Some(s) if s == expected => Ok(()),
                // A [1, H] tensor may be stored as [H].
                Some(s) if checked_product(&s) == checked_product(expected) && s.len() == 1 => {
                    Ok(())
                }
                Some(s) => Err(ModelError::ShapeMismatch {
                    name: name.to_string(),
                    path: file.part_of(name),
                    expected: expected.to_vec(),
                    found: s,
                }),
            }
        };
        let (e, i, h) = (cfg.num_experts, cfg.intermediate_size, cfg.hidden_size);
        for spec in tensor_table(&cfg, layout)? {
            let role = spec.role;
            let is_bias = spec.name == bias_name(f, role) && spec.name != weight_name(f, role);
            match role {
                Role::Expert(_, x, _) if x > 0 => continue,
                Role::Expert(l, _, p) => {
                    let name = gguf_name(f, Role::Expert(l, 0, p), false).unwrap_or_default();
                    if !file.contains(&name) && file.contains(&legacy_expert(l, 0, p)) {
                        // Older files (Mixtral GGUFs before stacked experts): one tensor per
                        // expert.
                        let one = if p == Proj::Down { [h, i] } else { [i, h] };
                        for x in 0..e {
                            check(&legacy_expert(l, x, p), &one)?;
                        }
                        continue;
                    }
                    let shape = if p == Proj::Down {
                        [e, h, i]
                    } else {
                        [e, i, h]
                    };
                    check(&name, &shape)?;
                    continue;
                }
                Role::FusedGateUp(l) | Role::FusedDown(l) => {
                    let down = matches!(role, Role::FusedDown(_));
                    let projs: &[Proj] = if down {
                        &[Proj::Down]
                    } else {
                        &[Proj::Gate, Proj::Up]
                    };
                    for &p in projs {
                        let name = gguf_name(f, Role::Expert(l, 0, p), is_bias).unwrap_or_default();
                        let shape: Vec<usize> = match (is_bias, down) {
                            (true, true) => vec![e, h],
                            (true, false) => vec![e, i],
                            (false, true) => vec![e, h, i],
                            (false, false) => vec![e, i, h],
                        };
                        check(&name, &shape)?;
                    }
                    continue;
                }
                _ => {}
            }
            let Some(gname) = gguf_name(f, role, is_bias) else {
                continue;
            };
            if let (Role::KvB(l), false) = (role, file.contains(&gname)) {
                if let Some(m) = cfg.attn.mla {
                    let nh = cfg.num_attention_heads;
                    let k_b = format!("blk.{l}.attn_k_b.weight");
                    let v_b = format!("blk.{l}.attn_v_b.weight");
                    check(&k_b, &[nh, m.kv_lora_rank, m.qk_nope_head_dim])?;
                    check(&v_b, &[nh, m.v_head_dim, m.kv_lora_rank])?;
                    recipes.insert(spec.name.clone(), Recipe::KvB { k_b, v_b });
                    continue;
                }
            }
            check(&gname, &spec.shape)?;
            let recipe = match role {
                Role::Q(_) if permuted => Recipe::Unpermute(gname, cfg.num_attention_heads),
                Role::K(_) if permuted => Recipe::Unpermute(gname, cfg.num_key_value_heads),
                _ => Recipe::Plain(gname),
            };
            recipes.insert(spec.name.clone(), recipe);
        }
        let residency = ExpertResidency::choose(&file);
        Ok(GgufSource {
            file,
            cfg,
            recipes,
            residency,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The compute dtype when none is asked for: BF16 / F16 when most of the unquantised
    /// weights are stored so, else F32 (quantised files compute in F32, as llama.cpp).
    pub fn default_dtype(&self) -> DType {
        let mut by: HashMap<&'static str, usize> = HashMap::new();
        for part in &self.file.parts {
            for info in part.content.tensor_infos.values() {
                let n = info.shape.elem_count();
                let k = match info.ggml_dtype {
                    GgmlDType::BF16 => "bf16",
                    GgmlDType::F16 => "f16",
                    _ => "f32",
                };
                let e = by.entry(k).or_default();
                *e = e.saturating_add(n);
            }
        }
        match by.into_iter().max_by_key(|(k, n)| (*n, *k)).map(|(k, _)| k) {
            Some("bf16") => DType::BF16,
            Some("f16") => DType::F16,
            _ => DType::F32,
        }
    }

    fn read(&self, recipe: &Recipe) -> Result<Tensor> {
        match recipe {
            Recipe::Plain(n) => self.file.dequantized(n),
            Recipe::Unpermute(n, heads) => unpermute(&self.file.dequantized(n)?, *heads),
            Recipe::KvB { k_b, v_b } => {
                let kb = self.file.dequantized(k_b)?; // [H, rank, nope]
                let vb = self.file.dequantized(v_b)?; // [H, v, rank]
                let kb = kb.transpose(1, 2)?; // [H, nope, rank]
                let kv = Tensor::cat(&[&kb, &vb], 1)?; // [H, nope + v, rank]
                let (hh, rows, rank) = kv.dims3()?;
                Ok(kv.contiguous()?.reshape((hh * rows, rank))?)
            }
        }
    }

    /// The routed experts of MoE layer `l` (F32 / F16 / BF16: loaded like safetensors experts;
    /// quantised: one `QMatMul` per expert and projection).
    /// In exact mode (`exact`), quantised experts are dequantised to f32 instead (whole tensors:
    /// a checking mode for models that fit in memory as f32).
    pub(crate) fn experts(
        &self,
        l: usize,
        dtype: DType,
        dev: &Device,
        exact: bool,
    ) -> Result<Experts> {
        let f = self.cfg.family;
        let (e, i, h) = (
            self.cfg.num_experts,
            self.cfg.intermediate_size,
            self.cfg.hidden_size,
        );
        let name =
            |p: Proj, bias: bool| gguf_name(f, Role::Expert(l, 0, p), bias).unwrap_or_default();
        let (gn, un, dn) = (
            name(Proj::Gate, false),
            name(Proj::Up, false),
            name(Proj::Down, false),
        );
        if !self.file.contains(&gn) && self.file.contains(&legacy_expert(l, 0, Proj::Gate)) {
            return self.legacy_experts(l, dtype, dev, exact);
        }
        let mx = [&gn, &un, &dn].map(|n| self.file.is_mxfp4(n));
        if mx.iter().any(|&m| m) && dev.is_cpu() {
            if !mx.iter().all(|&m| m) {
                return Err(bad(
                    &self.file.part_of(&gn),
                    format!(
                        "layer {l}: the routed experts mix MXFP4 and other types ({gn}, {un}, \
                         {dn}); all three must be MXFP4"
                    ),
                ));
            }
            let biases = if self.cfg.moe.expert_bias {
                let b = |p: Proj| -> Result<Tensor> {
                    Ok(self
                        .file
                        .dequantized(&name(p, true))?
                        .to_dtype(dtype)?
                        .to_device(dev)?)
                };
                Some([b(Proj::Gate)?, b(Proj::Up)?, b(Proj::Down)?])
            } else {
                None
            };
            let maps = [
                self.file.mxfp4_bytes(&gn)?,
                self.file.mxfp4_bytes(&un)?,
                self.file.mxfp4_bytes(&dn)?,
            ];
            let experts = crate::mxfp4::Mxfp4Experts::from_gguf(maps, biases, (e, i, h), exact)
                .map_err(|err| bad(&self.file.part_of(&gn), format!("layer {l}: {err}")))?;
            return Ok(Experts::Mxfp4(Box::new(experts)));
        }
        let types = [&gn, &un, &dn].map(|n| self.file.tensor_type(n));
        let quantized = types.iter().any(|t| t.is_some_and(|t| !is_float(t)));
        // candle's Q4_1 / Q5_0 / Q5_1 dot products need an even number of blocks per row (a
        // debug assertion): such experts (rows of 32, 96, ... values) are dequantised instead.
        let odd_blocks = [(types[0], h), (types[1], h), (types[2], i)]
            .iter()
            .any(|(t, cols)| {
                t.is_some_and(|t| {
                    matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
                        && !(cols / t.block_size()).is_multiple_of(2)
                })
            });
        let quantized = quantized && !odd_blocks;
        let biases = if self.cfg.moe.expert_bias {
            let b = |p: Proj| -> Result<Tensor> {
                Ok(self
                    .file
                    .dequantized(&name(p, true))?
                    .to_dtype(dtype)?
                    .to_device(dev)?)
            };
            Some([b(Proj::Gate)?, b(Proj::Up)?, b(Proj::Down)?])
        } else {
            None
        };
        if !quantized || !dev.is_cpu() || exact {
            let ld = |n: &str| -> Result<Tensor> {
                Ok(self.file.dequantized(n)?.to_dtype(dtype)?.to_device(dev)?)
            };
            let (gate, up, down) = (ld(&gn)?, ld(&un)?, ld(&dn)?);
            return Ok(match biases {
                Some([gate_b, up_b, down_b]) => Experts::Biased {
                    gate,
                    up,
                    down,
                    gate_b,
                    up_b,
                    down_b,
                },
                None => Experts::Fused {
                    gate_up: Tensor::cat(&[&gate, &up], 1)?,
                    down,
                },
            });
        }
        let split = |n: &str, rows: usize, cols: usize| -> Result<QProj> {
            if self.residency == ExpertResidency::Mapped {
                return self.file.mapped_experts(n, e, rows, cols);
            }
            let qt = self.file.qtensor(n)?;
            let t = qt.dtype();
            let data = qt.data()?;
            let per = checked_product(&[rows, cols])
                .map(|elems| elems / t.block_size() * t.type_size())
                .filter(|&b| b > 0 && b.checked_mul(e) == Some(data.len()))
                .ok_or_else(|| {
                    bad(
                        &self.file.part_of(n),
                        format!("tensor `{n}`: its data does not split into {e} experts"),
                    )
                })?;
            if let Some(ty) = fast_type(t) {
                return Ok(QProj::Fast(Box::new(FastQ {
                    bytes: QBytes::Owned(data.into_owned()),
                    ty,
                    rows,
                    cols,
                    per,
                })));
            }
            let mut out = Vec::with_capacity(e);
            for x in 0..e {
                let bytes = &data[x * per..(x + 1) * per];
                let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, t)?;
                let q = QTensor::new(storage, (rows, cols))?;
                out.push(QMatMul::from_qtensor(q)?);
            }
            Ok(QProj::Loaded(out))
        };
        Ok(Experts::Quantized(QuantExperts {
            gate: split(&gn, i, h)?,
            up: split(&un, i, h)?,
            down: split(&dn, h, i)?,
            biases,
        }))
    }
}

/// llama.cpp's name of one expert's projection in files written before experts were stacked.
fn legacy_expert(l: usize, x: usize, p: Proj) -> String {
    let p = match p {
        Proj::Gate => "gate",
        Proj::Up => "up",
        Proj::Down => "down",
    };
    format!("blk.{l}.ffn_{p}.{x}.weight")
}

impl GgufSource {
    /// Routed experts stored one tensor per expert and projection (`blk.N.ffn_gate.X.weight`).
    fn legacy_experts(&self, l: usize, dtype: DType, dev: &Device, exact: bool) -> Result<Experts> {
        let e = self.cfg.num_experts;
        if self.cfg.moe.expert_bias {
            return Err(bad(
                &self.file.path,
                format!("layer {l}: per-expert tensors with expert biases are not supported"),
            ));
        }
        let names = |p: Proj| -> Vec<String> { (0..e).map(|x| legacy_expert(l, x, p)).collect() };
        let (gn, un, dn) = (names(Proj::Gate), names(Proj::Up), names(Proj::Down));
        let quantized = gn
            .iter()
            .chain(&un)
            .chain(&dn)
            .any(|n| self.file.tensor_type(n).is_some_and(|t| !is_float(t)));
        if !quantized || !dev.is_cpu() || exact {
            let stack = |ns: &[String]| -> Result<Tensor> {
                let ts = ns
                    .iter()
                    .map(|n| Ok(self.file.dequantized(n)?.to_dtype(dtype)?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&ts, 0)?.to_device(dev)?)
            };
            let (gate, up, down) = (stack(&gn)?, stack(&un)?, stack(&dn)?);
            return Ok(Experts::Fused {
                gate_up: Tensor::cat(&[&gate, &up], 1)?,
                down,
            });
        }
        // One type moe-xray's kernel reads, one shape: the experts' blocks concatenated into one
        // stacked copy (as a stacked tensor's), so both layouts compute the same bits; anything
        // else: candle's `QMatMul` per expert.
        let qm = |ns: &[String]| -> Result<QProj> {
            let qts = ns
                .iter()
                .map(|n| self.file.qtensor(n))
                .collect::<Result<Vec<_>>>()?;
            let first = qts.first().map(|q| (q.dtype(), q.shape().dims().to_vec()));
            if let Some((t, dims)) = first {
                let same = qts
                    .iter()
                    .all(|q| q.dtype() == t && q.shape().dims() == dims.as_slice());
                if let (true, Some(ty), [rows, cols]) = (same, fast_type(t), dims.as_slice()) {
                    let mut bytes = Vec::new();
                    for q in &qts {
                        bytes.extend_from_slice(&q.data()?);
                    }
                    let per = bytes.len() / qts.len();
                    return Ok(QProj::Fast(Box::new(FastQ {
                        bytes: QBytes::Owned(bytes),
                        ty,
                        rows: *rows,
                        cols: *cols,
                        per,
                    })));
                }
            }
            Ok(QProj::Loaded(
                qts.into_iter()
                    .map(QMatMul::from_qtensor)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ))
        };
        Ok(Experts::Quantized(QuantExperts {
            gate: qm(&gn)?,
            up: qm(&un)?,
            down: qm(&dn)?,
            biases: None,
        }))
    }
}

impl TensorSource for GgufSource {
    fn quantized(&self, name: &str, expected: &[usize]) -> Result<Option<QLinear>> {
        let Some(Recipe::Plain(n)) = self.recipes.get(name) else {
            return Ok(None);
        };
        let (Some(t), [rows, cols]) = (self.file.tensor_type(n), expected) else {
            return Ok(None);
        };
        if fast_type(t).is_none() || self.file.shape(n).as_deref() != Some(expected) {
            return Ok(None);
        }
        Ok(match self.file.mapped_experts(n, 1, *rows, *cols)? {
            QProj::Fast(q) => Some(QLinear(*q)),
            _ => None,
        })
    }

    fn shape_of(&self, name: &str) -> Vec<usize> {
        match self.recipes.get(name) {
            Some(Recipe::Plain(n)) | Some(Recipe::Unpermute(n, _)) => {
                self.file.shape(n).unwrap_or_default()
            }
            Some(Recipe::KvB { .. }) => self
                .cfg
                .attn
                .mla
                .map(|m| {
                    vec![
                        self.cfg.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim),
                        m.kv_lora_rank,
                    ]
                })
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn load_tensor(
        &self,
        name: &str,
        expected: &[usize],
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Tensor> {
        let recipe = self
            .recipes
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.file.path.clone(),
            })?;
        let t = self.read(recipe)?;
        let t = if t.dims() != expected && t.elem_count() == checked_product(expected).unwrap_or(0)
        {
            t.reshape(expected)?
        } else {
            t
        };
        if t.dims() != expected {
            let gname = match recipe {
                Recipe::Plain(n) | Recipe::Unpermute(n, _) => n.clone(),
                Recipe::KvB { k_b, .. } => k_b.clone(),
            };
            return Err(ModelError::ShapeMismatch {
                path: self.file.part_of(&gname),
                name: gname,
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let t = match dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        Ok(t.to_device(device)?)
    }
}

/// Quantised routed experts of one layer: `QMatMul`s per expert (`[I, H]` gate and up, `[H, I]`
/// down), with GPT-OSS's biases (`[E, I]`, `[E, I]`, `[E, H]`) when present.
#[derive(Debug)]
pub struct QuantExperts {
    gate: QProj,
    up: QProj,
    down: QProj,
    biases: Option<[Tensor; 3]>,
}

impl QuantExperts {
    /// `x · Wᵀ` for projection `p` of expert `e` (computed in f32, returned in `x`'s dtype).
    pub(crate) fn project(&self, p: Proj, e: usize, x: &Tensor) -> Result<Tensor> {
        let m = match p {
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        };
        let dtype = x.dtype();
        let y = m.forward(e, &x.to_dtype(DType::F32)?.contiguous()?)?;
        Ok(y.to_dtype(dtype)?)
    }

    /// Expert `e`'s gate, up and down blocks when moe-xray's kernel reads all three in place
    /// and there are no biases (the raw-slice MoE path); `None` otherwise.
    pub(crate) fn matrices(&self, e: usize) -> Result<Option<[QMatrix<'_>; 3]>> {
        if self.biases.is_some() {
            return Ok(None);
        }
        Ok(match (&self.gate, &self.up, &self.down) {
            (QProj::Fast(g), QProj::Fast(u), QProj::Fast(d)) => {
                Some([g.matrix(e)?, u.matrix(e)?, d.matrix(e)?])
            }
            _ => None,
        })
    }

    /// Whether every expert takes the raw-slice path ([`QuantExperts::matrices`] is `Some`).
    pub(crate) fn raw_slices(&self) -> bool {
        self.biases.is_none()
            && matches!(
                (&self.gate, &self.up, &self.down),
                (QProj::Fast(_), QProj::Fast(_), QProj::Fast(_))
            )
    }

    /// The biases of expert `e` (gate, up, down), if any.
    pub(crate) fn biases(&self, e: usize) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(match &self.biases {
            Some([g, u, d]) => Some((g.get(e)?, u.get(e)?, d.get(e)?)),
            None => None,
        })
    }
}

/// Loads a GGUF model (one file or a split set).
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<MoeModel> {
    load_model_with(path, opts, None)
}

/// [`load_model`] with the quantised experts' residency given (`None`: [`ExpertResidency::choose`]).
/// Both residencies compute the same numbers.
pub fn load_model_with(
    path: &Path,
    opts: &LoadOptions,
    residency: Option<ExpertResidency>,
) -> Result<MoeModel> {
    let file = GgufFile::open(path)?;
    let cfg = file.config()?;
    let mut src = GgufSource::new(file, cfg.clone())?;
    if let Some(r) = residency {
        src.residency = r;
    }
    let dtype = crate::model::compute_dtype(opts, || src.default_dtype())?;
    let dev = opts.device.clone();
    let exact = opts.exact;
    MoeModel::assemble(cfg, &src, opts, dtype, &|_cfg: &ModelConfig, l: usize| {
        src.experts(l, dtype, &dev, exact)
    })
}

/// `tokenizer.json` beside a GGUF file, if there is one (it overrides the GGUF's tokenizer
/// metadata).
pub fn tokenizer_beside(path: &Path) -> Option<PathBuf> {
    let beside = path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("tokenizer.json");
    beside.is_file().then_some(beside)
}

/// llama.cpp's pre-tokenizer regexes (`llama-vocab.cpp`) for the `tokenizer.ggml.pre` values
/// read here; each is followed by a byte-level step.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl GgufFile {
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.meta(key) {
            Some(gguf_file::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    gguf_file::Value::String(s) => Ok(s.clone()),
                    other => Err(bad(
                        &self.path,
                        format!("metadata `{key}` must hold strings, found {other:?}"),
                    )),
                })
                .collect(),
            Some(v) => Err(bad(
                &self.path,
                format!("metadata `{key}` must be an array, found {v:?}"),
            )),
            None => Err(bad(&self.path, format!("missing metadata key `{key}`"))),
        }
    }

    /// A `tokenizer.json` document built from the `tokenizer.ggml.*` metadata: byte-level BPE
    /// (`tokenizer.ggml.model` = `gpt2`) with the pre-tokenizer of `tokenizer.ggml.pre` =
    /// `default` / `gpt2` / `olmo` (GPT-2's), `qwen2`, or `llama-bpe` / `llama3` / `smaug-bpe`.
    /// Anything else is refused (a wrong pre-tokenizer would silently change every token id):
    /// put the model's tokenizer.json beside the file instead.
    pub fn tokenizer_json(&self) -> Result<String> {
        let unsupported = |what: String| ModelError::Tokenizer {
            path: self.path.clone(),
            message: format!(
                "{what}: cannot build the tokenizer from the GGUF metadata; put the model's \
                 tokenizer.json (from its Hugging Face repository) beside {}",
                self.path.display()
            ),
        };
        let model = self.string("tokenizer.ggml.model")?;
        if model.as_deref() != Some("gpt2") {
            return Err(unsupported(format!(
                "tokenizer.ggml.model is {model:?} (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<usize> = match self.meta("tokenizer.ggml.token_type") {
            Some(gguf_file::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    gguf_file::Value::I32(x) => usize::try_from(*x).unwrap_or(0),
                    gguf_file::Value::U32(x) => *x as usize,
                    _ => 0,
                })
                .collect(),
            _ => Vec::new(),
        };
        let byte_level = |use_regex: bool| {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                               "trim_offsets": true, "use_regex": use_regex})
        };
        let split = |re: &str| {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated",
                 "invert": false},
                byte_level(false)]})
        };
        let pre = self
            .string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".into());
        let (normalizer, pre_tokenizer) = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" | "olmo" => (Value::Null, byte_level(true)),
            "qwen2" => (serde_json::json!({"type": "NFC"}), split(REGEX_QWEN2)),
            "llama-bpe" | "llama3" | "smaug-bpe" => (Value::Null, split(REGEX_LLAMA3)),
            other => {
                return Err(unsupported(format!(
                    "tokenizer.ggml.pre `{other}` (known here: default, gpt-2, olmo, qwen2, \
                     llama-bpe)"
                )))
            }
        };
        let mut vocab = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(Value::from(i));
        }
        // llama_token_type: 3 control, 4 user-defined.
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .filter_map(|(i, &t)| {
                tokens.get(i).map(|c| {
                    serde_json::json!({"id": i, "content": c, "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": t == 4,
                        "special": t == 3})
                })
            })
            .collect();
        let doc = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": byte_level(true),
            "decoder": byte_level(true),
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        Ok(doc.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Quantised experts left in the mapped file (GGUF by mapping).

/// Where the quantised routed experts of a GGUF model live. Both compute the same numbers (the
/// same kernel on the same blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertResidency {
    /// Copied into memory once at load time (one `QMatMul` per expert and projection).
    Loaded,
    /// Left in the read-only map of the file: moe-xray's kernel reads an expert's blocks in
    /// place (types candle computes: copied per use into a short-lived `QMatMul`), so resident
    /// memory does not grow with the number of experts and files larger than RAM run (the page
    /// cache holds what fits).
    Mapped,
}

/// Environment variable that forces the residency: `mapped` or `loaded`.
pub const EXPERTS_ENV: &str = "MOE_XRAY_GGUF_EXPERTS";

impl ExpertResidency {
    /// `Loaded` when [`EXPERTS_ENV`] is `loaded`, otherwise `Mapped`: measured on a 4-layer
    /// Qwen3-30B-A3B-shaped Q4_K_M file (docs/performance.md, "GGUF by mapping"), mapping was
    /// no slower (60.4 s against 65.2 s) and peaked 2.3 GB lower, with byte-identical traces.
    pub fn choose(_file: &GgufFile) -> Self {
        match std::env::var(EXPERTS_ENV).ok().as_deref() {
            Some("loaded") => ExpertResidency::Loaded,
            _ => ExpertResidency::Mapped,
        }
    }
}

/// One quantised projection of every expert of a layer.
#[derive(Debug)]
enum QProj {
    Loaded(Vec<QMatMul>),
    Mapped(Box<MappedQ>),
    /// A type moe-xray's own kernel reads (`moe_xray_kernels::quant`), loaded or mapped.
    Fast(Box<FastQ>),
}

/// Environment variable that sends every quantised expert to candle's `QMatMul` (`candle`), the
/// path before session 9 (for comparisons); unset or anything else: moe-xray's kernel.
pub const QMATMUL_ENV: &str = "MOE_XRAY_QMATMUL";

/// The quantised types computed by `moe_xray_kernels::quant` (others, and all of them when
/// [`QMATMUL_ENV`] is `candle`, use candle's `QMatMul`).
fn fast_type(t: GgmlDType) -> Option<QType> {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CANDLE.get_or_init(|| std::env::var(QMATMUL_ENV).is_ok_and(|v| v.trim() == "candle")) {
        return None;
    }
    match t {
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4K => Some(QType::Q4K),
        GgmlDType::Q5K => Some(QType::Q5K),
        GgmlDType::Q6K => Some(QType::Q6K),
        _ => None,
    }
}

/// A GGUF matrix (attention, dense MLP, output head) kept in its quantised blocks, in the file's
/// read-only map, and multiplied by moe-xray's kernel (fast mode on the CPU; `--exact` and
/// [`QMATMUL_ENV`]` = candle` dequantise it at load instead).
#[derive(Debug)]
pub struct QLinear(FastQ);

impl QLinear {
    /// `x · Wᵀ` computed in f32, returned in `x`'s dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = self.0.forward(0, &x.to_dtype(DType::F32)?.contiguous()?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// Where the blocks of a [`FastQ`] live.
#[derive(Debug)]
enum QBytes {
    Owned(Vec<u8>),
    Mapped(crate::weights::MappedTensor),
}

/// A stacked `[E, rows, cols]` quantised expert tensor read in place by moe-xray's kernel.
#[derive(Debug)]
struct FastQ {
    bytes: QBytes,
    ty: QType,
    rows: usize,
    cols: usize,
    /// Bytes of one expert.
    per: usize,
}

impl FastQ {
    /// Expert `e`'s `[rows, cols]` blocks.
    fn matrix(&self, e: usize) -> Result<QMatrix<'_>> {
        let all = match &self.bytes {
            QBytes::Owned(v) => v.as_slice(),
            QBytes::Mapped(m) => m.bytes(),
        };
        let b = e
            .checked_mul(self.per)
            .and_then(|s| all.get(s..s.checked_add(self.per)?))
            .ok_or_else(|| ModelError::InvalidArgument(format!("expert {e} out of range")))?;
        QMatrix::new(self.ty, b, self.rows, self.cols).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "quantised expert: {} bytes do not hold [{}, {}] in {}",
                b.len(),
                self.rows,
                self.cols,
                self.ty.name()
            ))
        })
    }

    /// `x · W_eᵀ` for f32 `x` `[.., cols]` (on the CPU).
    fn forward(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        let w = self.matrix(e)?;
        let dims = x.dims().to_vec();
        let (lead, k) = match dims.split_last() {
            Some((&k, lead)) if k == self.cols => (lead.to_vec(), k),
            _ => {
                return Err(ModelError::InvalidArgument(format!(
                    "quantised expert: input {dims:?} does not end in {}",
                    self.cols
                )))
            }
        };
        let n = x.elem_count() / k.max(1);
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let y = xwt_q(&xv, n, &w);
        let mut out = lead;
        out.push(self.rows);
        Ok(Tensor::from_vec(y, out, x.device())?)
    }
}

/// A stacked quantised expert tensor left in the file's map.
#[derive(Debug)]
struct MappedQ {
    /// The stacked `[E, rows, cols]` tensor's bytes.
    bytes: crate::weights::MappedTensor,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// Bytes of one expert.
    per: usize,
}

impl QProj {
    /// `x · W_eᵀ` (f32).
    fn forward(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        let out_of_range = || ModelError::InvalidArgument(format!("expert {e} out of range"));
        match self {
            QProj::Loaded(v) => Ok(v.get(e).ok_or_else(out_of_range)?.forward(x)?),
            QProj::Fast(q) => q.forward(e, x),
            QProj::Mapped(q) => {
                let MappedQ {
                    bytes,
                    dtype,
                    rows,
                    cols,
                    per,
                } = q.as_ref();
                let all = bytes.bytes();
                let b = e
                    .checked_mul(*per)
                    .and_then(|s| all.get(s..s.checked_add(*per)?))
                    .ok_or_else(out_of_range)?;
                let storage = QStorage::from_data(Cow::Borrowed(b), &Device::Cpu, *dtype)?;
                let m = QMatMul::from_qtensor(QTensor::new(storage, (*rows, *cols))?)?;
                Ok(m.forward(x)?)
            }
        }
    }
}

impl GgufFile {
    /// The quantised expert tensor `name` (`[experts, rows, cols]`) left in a read-only map of
    /// its file (sizes checked against the file when it was opened).
    fn mapped_experts(
        &self,
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<QProj> {
        let (part, info) = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.path.clone(),
        })?;
        let t = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let per = checked_product(&[rows, cols])
            .map(|elems| elems / t.block_size() * t.type_size())
            .filter(|&b| b > 0);
        let total = per.and_then(|p| p.checked_mul(experts));
        let start = part
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok());
        let (Some(per), Some(total), Some(start)) = (per, total, start) else {
            return Err(bad(&part.path, format!("tensor `{name}`: size overflows")));
        };
        if checked_product(&dims) != checked_product(&[experts, rows, cols]) {
            return Err(bad(
                &part.path,
                format!("tensor `{name}`: shape {dims:?} does not hold {experts} experts of [{rows}, {cols}]"),
            ));
        }
        let file = File::open(&part.path).map_err(|e| ModelError::io(&part.path, e))?;
        let map = moe_xray_kernels::mmap::ReadOnlyMap::map(&file)
            .map_err(|e| ModelError::io(&part.path, e))?;
        let bytes = crate::weights::MappedTensor::new(
            std::sync::Arc::new(map),
            start,
            start.saturating_add(total),
            DType::U8,
            dims,
        )
        .ok_or_else(|| bad(&part.path, format!("truncated GGUF file: tensor `{name}`")))?;
        if let Some(ty) = fast_type(t) {
            return Ok(QProj::Fast(Box::new(FastQ {
                bytes: QBytes::Mapped(bytes),
                ty,
                rows,
                cols,
                per,
            })));
        }
        Ok(QProj::Mapped(Box::new(MappedQ {
            bytes,
            dtype: t,
            rows,
            cols,
            per,
        })))
    }
}
