//! Safetensors checkpoints (single file or sharded with `model.safetensors.index.json`),
//! memory-mapped and validated before any tensor is touched.
//!
//! Tensors are either copied out of the mapping in their stored dtype (bf16 stays bf16), with the
//! mapped pages released right after the copy, or — for the expert weights on the CPU, which are
//! 93 % of OLMoE — left in the mapping as [`MappedTensor`]s that the CPU kernels read in place
//! (no load-time copy; the page cache holds the only copy). Loading never holds two copies of the
//! model in memory and never materialises an f32 copy of the experts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_xray_kernels::mmap::ReadOnlyMap as Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

/// A tensor left in the memory-mapped checkpoint file (read in place, never copied).
#[derive(Debug, Clone)]
pub struct MappedTensor {
    mmap: Arc<Mmap>,
    start: usize,
    end: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl MappedTensor {
    /// Bytes `start..end` of `mmap` as a tensor of `dtype` and `shape` (`None` if out of range).
    pub fn new(
        mmap: Arc<Mmap>,
        start: usize,
        end: usize,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Option<Self> {
        (start <= end && end <= mmap.len()).then_some(MappedTensor {
            mmap,
            start,
            end,
            dtype,
            shape,
        })
    }

    /// The tensor's bytes (little-endian, row-major).
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.start..self.end]
    }

    /// A copy as a candle tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_raw_buffer(
            self.bytes(),
            self.dtype,
            &self.shape,
            device,
        )?)
    }
}

/// All tensors of a checkpoint directory.
pub struct WeightStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn candle_dtype(d: Dtype, path: &Path, name: &str) -> Result<DType> {
    match d {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        // MXFP4 packed nibbles and E8M0 scales (gpt-oss's `*_blocks` / `*_scales`).
        Dtype::U8 if crate::mxfp4::is_packed_name(name) => Ok(DType::U8),
        other => Err(ModelError::Safetensors {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` has unsupported dtype {other:?} (bf16, f16, f32; u8 only for \
                 MXFP4 `*_blocks` / `*_scales`)"
            ),
        }),
    }
}

impl WeightStore {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files: Vec<PathBuf> = Vec::new();
        let mut weight_map: Option<BTreeMap<String, String>> = None;
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::invalid(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::invalid(&index_path, "no `weight_map` object"))?;
            let mut wm = BTreeMap::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    ModelError::invalid(
                        &index_path,
                        format!("weight_map[`{k}`] is not a file name"),
                    )
                })?;
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(ModelError::invalid(
                        &index_path,
                        format!("weight_map[`{k}`] = `{f}` is not a plain file name"),
                    ));
                }
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
                wm.insert(k.clone(), f.to_string());
            }
            files.sort();
            weight_map = Some(wm);
        } else if single.exists() {
            files.push(single);
        } else {
            return Err(ModelError::invalid(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ));
        }
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // Read-only; like every mmap-based loader we require that the file is not truncated
            // or rewritten while the model is loaded (see `moe_xray_kernels::mmap`).
            let mmap = Mmap::map(&file).map_err(|e| ModelError::io(path, e))?;
            crate::limits::check_safetensors_header(path, &mmap)?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: format!("{e}"),
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = candle_dtype(info.dtype, path, &name)?;
                let (s, e) = info.data_offsets;
                let elems: usize = info.shape.iter().product();
                if e - s != elems * dtype.size_in_bytes() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        message: format!("tensor `{name}`: byte length does not match its shape"),
                    });
                }
                if let Some(wm) = &weight_map {
                    let expected = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
                    let listed = wm.get(&name).map(String::as_str);
                    if listed != Some(expected) {
                        return Err(ModelError::invalid(
                            &index_path,
                            format!(
                                "tensor `{name}` is in {expected} but the index maps it to {}",
                                listed.unwrap_or("no file")
                            ),
                        ));
                    }
                }
                entries.insert(
                    name,
                    TensorEntry {
                        file: fi,
                        dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            shards.push(Shard {
                path: path.clone(),
                mmap: Arc::new(mmap),
            });
        }
        if let Some(wm) = &weight_map {
            if let Some(name) = wm.keys().find(|k| !entries.contains_key(*k)) {
                return Err(ModelError::invalid(
                    &index_path,
                    format!(
                        "tensor `{name}` is listed in the index but absent from {}",
                        wm[name]
                    ),
                ));
            }
        }
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            shards,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The file a tensor is stored in.
    pub fn path_of(&self, entry: &TensorEntry) -> PathBuf {
        self.shards
            .get(entry.file)
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    /// The dtype most tensors are stored in (by element count).
    pub fn dominant_dtype(&self) -> DType {
        let mut by: HashMap<DType, usize> = HashMap::new();
        // Packed MXFP4 bytes (u8) are no compute dtype.
        for e in self.entries.values().filter(|e| e.dtype != DType::U8) {
            *by.entry(e.dtype).or_default() += e.shape.iter().product::<usize>();
        }
        by.into_iter()
            .max_by_key(|(d, n)| (*n, d.size_in_bytes()))
            .map(|(d, _)| d)
            .unwrap_or(DType::F32)
    }

    /// Loads tensor `name`, checking its shape, in its stored dtype or converted to `dtype`.
    pub fn load(
        &self,
        name: &str,
        expected: &[usize],
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self.checked_entry(name, expected)?;
        let shard = &self.shards[entry.file];
        let bytes = &shard.mmap[entry.start..entry.end];
        let t = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, device)?;
        self.release(entry);
        match dtype {
            Some(d) if d != entry.dtype => Ok(t.to_dtype(d)?),
            _ => Ok(t),
        }
    }

    /// Tensor `name` left in the mapping (shape checked), when it can be read in place: stored
    /// as `dtype`, which is bf16 or f16, with an element-aligned start. `None` otherwise (the
    /// caller then loads a copy with [`WeightStore::load`]).
    pub fn map(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
    ) -> Result<Option<MappedTensor>> {
        let entry = self.checked_entry(name, expected)?;
        let shard = &self.shards[entry.file];
        let aligned =
            (shard.mmap.as_ptr() as usize + entry.start).is_multiple_of(dtype.size_in_bytes());
        if entry.dtype != dtype || !matches!(dtype, DType::BF16 | DType::F16) || !aligned {
            return Ok(None);
        }
        #[cfg(unix)]
        {
            // Ask the kernel to read the range ahead (the experts are all used in the first
            // prefill step); failure only costs speed, hence ignored.
            shard.mmap.will_need(entry.start..entry.end);
        }
        Ok(Some(MappedTensor {
            mmap: shard.mmap.clone(),
            start: entry.start,
            end: entry.end,
            dtype,
            shape: entry.shape.clone(),
        }))
    }

    /// Tensor `name` left in the mapping whatever its dtype (shape checked): MXFP4 blocks and
    /// scales, read byte by byte.
    pub fn map_bytes(&self, name: &str, expected: &[usize]) -> Result<MappedTensor> {
        let entry = self.checked_entry(name, expected)?;
        let shard = &self.shards[entry.file];
        #[cfg(unix)]
        {
            shard.mmap.will_need(entry.start..entry.end);
        }
        Ok(MappedTensor {
            mmap: shard.mmap.clone(),
            start: entry.start,
            end: entry.end,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
        })
    }

    fn checked_entry(&self, name: &str, expected: &[usize]) -> Result<&TensorEntry> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: self.shards[entry.file].path.clone(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    /// Drops the mapped pages of a tensor that has been copied out (they are re-read from the
    /// file if touched again), so that resident memory holds one copy of the model, not two.
    fn release(&self, entry: &TensorEntry) {
        self.shards[entry.file].mmap.release(entry.start..entry.end);
    }
}
