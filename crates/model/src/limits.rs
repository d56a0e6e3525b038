//! Plain limits on every size that comes from a file or a flag (`config.json`, safetensors
//! headers, `synth-model` flags, prompts), checked before anything is allocated.
//!
//! The limits are far above every published MoE checkpoint (OLMoE-1B-7B: vocab 50,304, hidden
//! 2,048, 16 layers, 64 experts, 4,096 positions) and far below sizes whose products could
//! overflow or whose allocations could abort the process. They are documented for users in
//! `docs/trace-format.md` ("Limits").

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// Largest accepted `vocab_size`.
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
/// Largest accepted `hidden_size`.
pub const MAX_HIDDEN_SIZE: usize = 1 << 16;
/// Largest accepted `intermediate_size` (per expert).
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 18;
/// Largest accepted `num_hidden_layers`.
pub const MAX_LAYERS: usize = 1024;
/// Largest accepted `num_attention_heads` (and `num_key_value_heads`).
pub const MAX_HEADS: usize = 1024;
/// Largest accepted `num_experts`.
pub const MAX_EXPERTS: usize = 4096;
/// Largest accepted `num_hidden_layers × num_experts` (the trace readers' limit on L·E).
pub const MAX_LAYER_EXPERTS: usize = 1 << 20;
/// Largest accepted `max_position_embeddings` (the context length every prompt must fit into).
pub const MAX_POSITION_EMBEDDINGS: usize = 1 << 20;
/// Largest accepted safetensors JSON header (bytes).
pub const MAX_SAFETENSORS_HEADER: usize = 100_000_000;
/// Largest accepted number of dimensions of one tensor in a safetensors header.
pub const MAX_TENSOR_RANK: usize = 8;

/// The per-field limits, as `(field, limit)`, in the order they are checked.
pub fn config_limits() -> [(&'static str, usize); 8] {
    [
        ("vocab_size", MAX_VOCAB_SIZE),
        ("hidden_size", MAX_HIDDEN_SIZE),
        ("intermediate_size", MAX_INTERMEDIATE_SIZE),
        ("num_hidden_layers", MAX_LAYERS),
        ("num_attention_heads", MAX_HEADS),
        ("num_key_value_heads", MAX_HEADS),
        ("num_experts", MAX_EXPERTS),
        ("max_position_embeddings", MAX_POSITION_EMBEDDINGS),
    ]
}

/// `a · b · …` or `None` on overflow.
pub fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Checks a safetensors file's header before the `safetensors` crate parses it: header length
/// bounded and inside the file, every tensor's dtype known, rank bounded, element count and byte
/// length computed with checked arithmetic, and every `data_offsets` pair ordered and inside the
/// file's data section. `bytes` is the whole file; `path` names it in errors.
pub fn check_safetensors_header(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |m: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: m,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "file is {} bytes, shorter than the 8-byte header length",
                bytes.len()
            ))
        })?;
    let n = u64::from_le_bytes(len_bytes);
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_SAFETENSORS_HEADER)
        .ok_or_else(|| {
            bad(format!(
                "header length {n} exceeds the limit of {MAX_SAFETENSORS_HEADER} bytes"
            ))
        })?;
    let header = bytes.get(8..8 + n).ok_or_else(|| {
        bad(format!(
            "header length {n} runs past the end of the file ({} bytes)",
            bytes.len()
        ))
    })?;
    let data_len = bytes.len() - 8 - n;
    let text = std::str::from_utf8(header).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    let v: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let t = |m: String| bad(format!("tensor `{name}`: {m}"));
        let dtype = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| t("no `dtype` string".into()))?;
        let elem_bits: usize = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
            "I16" | "U16" | "F16" | "BF16" => 16,
            "I32" | "U32" | "F32" => 32,
            "I64" | "U64" | "F64" => 64,
            "F4" => 4,
            "F6_E2M3" | "F6_E3M2" => 6,
            other => return Err(t(format!("unknown dtype `{other}`"))),
        };
        let shape = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| t("no `shape` array".into()))?;
        if shape.len() > MAX_TENSOR_RANK {
            return Err(t(format!(
                "rank {} exceeds the limit of {MAX_TENSOR_RANK}",
                shape.len()
            )));
        }
        let mut dims = Vec::with_capacity(shape.len());
        for d in shape {
            let d = d
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| t(format!("shape entry {d} is not a non-negative integer")))?;
            dims.push(d);
        }
        let bits = checked_product(&dims)
            .and_then(|e| e.checked_mul(elem_bits))
            .ok_or_else(|| t(format!("shape {dims:?} overflows")))?;
        let offsets = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| t("`data_offsets` is not a pair".into()))?;
        let off = |i: usize| {
            offsets[i]
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    t(format!(
                        "data offset {} is not a non-negative integer",
                        offsets[i]
                    ))
                })
        };
        let (s, e) = (off(0)?, off(1)?);
        if s > e || e > data_len {
            return Err(t(format!(
                "data_offsets [{s}, {e}] are not an ordered range inside the data section ({data_len} bytes)"
            )));
        }
        if bits % 8 != 0 || e - s != bits / 8 {
            return Err(t(format!(
                "byte length {} does not match shape {dims:?} of {dtype}",
                e - s
            )));
        }
    }
    Ok(())
}
