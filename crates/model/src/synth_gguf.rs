//! Synthetic checkpoints as GGUF
//! (`moe-xray synth-model --format gguf --quant f32|bf16|q8_0|q4_k_m|mxfp4`): the random model of
//! [`crate::synth`] (same seed → the same f32 values, tensor for tensor), written in the layout
//! llama.cpp's `convert_hf_to_gguf.py` (and, for `q4_k_m`, `llama-quantize`) gives it.
//!
//! # Layout (llama.cpp's converter, read from the llama-cpp-python 0.3.36 source distribution)
//! - Architecture names: olmoe → `olmoe`, qwen2_moe → `qwen2moe`, qwen3_moe → `qwen3moe`,
//!   deepseek_v2 / deepseek_v3 → `deepseek2` (gating function 1 softmax / 2 sigmoid), gpt_oss →
//!   `gpt-oss`, granitemoe → `granitemoe`, mixtral → `llama` with experts.
//! - Tensor names: [`crate::gguf::gguf_name`] of each role of the family's table (the names the
//!   reader looks up); routed experts stacked per layer as `blk.N.ffn_{gate,up,down}_exps.weight`
//!   (`[E, I, H]`, `[E, H, I]`); q/k rows of `llama` / `granitemoe` permuted for llama.cpp's
//!   interleaved RoPE (`LlamaModel.permute`); DeepSeek's `kv_b_proj` split into `attn_k_b`
//!   (`[H, rank, nope]`, transposed) and `attn_v_b` (`[H, v, rank]`); Granite's `input_linear`
//!   split into gate / up; GPT-OSS's `gate_up_proj` `[E, H, 2I]` transposed and de-interleaved,
//!   `down_proj` transposed, biases split likewise.
//! - Tensor order: llama.cpp's loader order (`weight_name_comparer`: tensors outside blocks first,
//!   then block by block, by name within a block) — the order `llama-quantize` writes (`mxfp4`:
//!   the converter's own order, see below).
//! - Metadata: the `<arch>.*` keys the converter writes (those of `tools/make_gguf_fixtures.py`,
//!   which the reader [`crate::gguf`] maps back onto `config.json`), `general.architecture`,
//!   `general.type`, `general.name`, `general.file_type` (0 all F32, 32 mostly BF16, 7 mostly
//!   Q8_0, 15 mostly Q4_K_M), `general.quantization_version` 2, the tokenizer as
//!   `tokenizer.ggml.*` (`gpt2` byte-level BPE: tokens padded to the vocabulary size with
//!   `[PADi]` entries of type UNUSED as the converter pads them, token types, merges, bos / eos /
//!   padding ids, `add_bos_token` / `add_eos_token` false), `tokenizer.chat_template`, and
//!   `moe_xray.synth` (a JSON string: how the file was made). Two deviations, both so that the
//!   file describes the same model as the safetensors checkpoint: `attention.layer_norm_rms_epsilon`
//!   is the spec's value (the OLMoE converter forces 1e-5; the OLMoE presets use 1e-5 anyway), and
//!   `expert_weights_norm` is written for every family with a `norm_topk_prob` setting.
//!
//! # Tensor types
//! The converter's rule first (`prepare_tensors`): 1-D tensors, `*_norm.weight`, routers
//! (`ffn_gate_inp`, `ffn_gate_inp_shexp`) and anything not named `.weight` stay F32; every other
//! tensor takes the output type (`f32`, `bf16`, `q8_0`; Q8_0 falls back to F16 when a row is not
//! a multiple of 32, as the converter's `QuantError` fallback does).
//!
//! `q4_k_m` is llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_K_M` mix as `llama_tensor_get_type`
//! (`src/llama-quant.cpp`) assigns it without an importance matrix: tensors it may quantise
//! (≥ 2 dimensions, named `…weight`, not `_norm.weight`, not `ffn_gate_inp.weight`) get Q4_K,
//! except
//! - `output.weight` (and `token_embd.weight` when the embeddings are tied): Q6_K (Q8_0 when a row
//!   is not a multiple of 256);
//! - `attn_v.weight`: Q6_K in the layers where `use_more_bits(i, n)` holds (`i < n/8 || i ≥ 7n/8 ||
//!   (i − n/8) % 3 == 2`, `i` counting the attn_v tensors in file order), and Q8_0 in every layer when
//!   the model has exactly 8 experts; `attn_k.weight`: Q8_0 with 8 experts; `attn_output.weight`:
//!   Q5_K with 8 experts;
//! - every `ffn_down*` tensor (routed `ffn_down_exps`, shared `ffn_down_shexp`, dense `ffn_down`)
//!   of block `i`: Q6_K where `use_more_bits(i, block_count)`;
//! - then llama.cpp's fallback for rows that are not a multiple of the type's block (Q4_K → Q5_0,
//!   Q5_K → Q5_1, Q6_K → Q8_0, and F16 when that still does not fit).
//!
//! `mxfp4` (gpt_oss only) is what the converter makes of the HF MXFP4 checkpoint of the same spec
//! (`synth-model --quant mxfp4`, the published openai/gpt-oss layout; `GptOssModel` in llama.cpp's
//! `conversion/gpt_oss.py`): the routed experts `blk.N.ffn_{gate,up,down}_exps.weight` are MXFP4
//! (ggml type 39, `block_mxfp4`: one E8M0 scale byte, then 16 bytes whose low nibbles are values
//! 0–15 and high nibbles values 16–31 of the block), with exactly the HF checkpoint's scales and
//! E2M1 codes (each block quantised by [`crate::mxfp4::quantize_block`] from the values stored in
//! the checkpoint's dtype, nibbles moved as `transform_nibble_layout` moves them); gate / up are
//! the even / odd rows of `gate_up_proj`. Every other tensor follows the converter's rule above
//! with the checkpoint's dtype as output type (`--outtype auto` gives BF16 for a bf16 checkpoint,
//! F16 for f16; an f32 checkpoint is written F32, as `--outtype f32` would), its values those of
//! the HF checkpoint (rounded to its dtype, also where the converter widens them to F32: norms,
//! routers, biases, sinks). `general.file_type` is 38 (`MOSTLY_MXFP4_MOE`, which the converter
//! sets for MXFP4 input). So moe-xray routes the file exactly as the HF MXFP4 checkpoint at the
//! same compute dtype (test). The tensors are in the converter's order, not the loader order of
//! the other types: the repacked experts first (`generate_extra_tensors`: per layer down, gate,
//! up), then the rest, each group in the HF checkpoint's tensor name order.
//!
//! Quantisation uses candle's k-quant code (`QTensor::quantize`, the `from_float` of each block
//! type). Its Q4_K / Q5_K / Q6_K block fitting is not bit-identical to llama.cpp's
//! `quantize_row_q4_K_ref` (`make_qkx2_quants`), so the bytes differ from `llama-quantize`'s while
//! the format, the types and the per-block error are the same kind.
//!
//! # Streaming and reproducibility
//! The header (metadata, tensor infos with offsets computed from the shapes and types) is written
//! first; then each tensor is generated, transformed and quantised in bounded units (row chunks
//! of ≈ 1 M values, one expert for GPT-OSS's transposed experts, one whole tensor for the q/k
//! permutation and DeepSeek's `kv_b` split, which are attention-sized) and written straight to the
//! file, so memory stays at a few units whatever the model size. Values come from the counter-based
//! streams of [`crate::synth`] and quantisation is per block, so the bytes do not depend on the
//! thread count. The file is written to a temporary sibling and renamed into place.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::{gguf_name, type_name};
use crate::limits::checked_product;
use crate::synth::{SynthDtype, SynthSpec, SynthValues, CHAT_TEMPLATE};
use crate::table::{bias_name, tensor_table, weight_name, ExpertLayout, Proj, Role};
use moe_xray_kernels::mxfp4::{BLOCK, GGML_BLOCK_BYTES};

/// The output types of `synth-model --format gguf --quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    Bf16,
    Q8_0,
    Q4KM,
    /// gpt-oss only: the routed experts as MXFP4 (ggml type 39), everything else as the
    /// converter leaves it from the HF MXFP4 checkpoint (see "MXFP4" in the module docs).
    Mxfp4,
}

/// Names accepted by [`GgufQuant::parse`].
pub const GGUF_QUANTS: &[&str] = &["f32", "bf16", "q8_0", "q4_k_m", "mxfp4"];

impl GgufQuant {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "f32" => Ok(GgufQuant::F32),
            "bf16" => Ok(GgufQuant::Bf16),
            "q8_0" => Ok(GgufQuant::Q8_0),
            "q4_k_m" => Ok(GgufQuant::Q4KM),
            "mxfp4" => Ok(GgufQuant::Mxfp4),
            _ => Err(ModelError::InvalidArgument(format!(
                "unknown --quant `{s}` (one of {})",
                GGUF_QUANTS.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F32 => "f32",
            GgufQuant::Bf16 => "bf16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4KM => "q4_k_m",
            GgufQuant::Mxfp4 => "mxfp4",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::Bf16 => 32,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
            GgufQuant::Mxfp4 => 38, // LLAMA_FTYPE_MOSTLY_MXFP4_MOE
        }
    }
}

/// llama.cpp's architecture name of `family`.
pub fn gguf_arch(family: Family) -> &'static str {
    match family {
        Family::Olmoe => "olmoe",
        Family::Qwen2Moe => "qwen2moe",
        Family::Qwen3Moe => "qwen3moe",
        Family::DeepseekV2 | Family::DeepseekV3 => "deepseek2",
        Family::GptOss => "gpt-oss",
        Family::GraniteMoe => "granitemoe",
        Family::Mixtral => "llama",
    }
}

/// ggml's type id.
fn ggml_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// ggml's type id of MXFP4 (`GGML_TYPE_MXFP4`), which candle does not know.
const GGML_MXFP4: u32 = 39;

/// A tensor's type in the file: one of candle's ggml types, or MXFP4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TensorType {
    Ggml(GgmlDType),
    /// ggml's `block_mxfp4`: 32 values in 17 bytes (E8M0 scale, 16 bytes of nibbles).
    Mxfp4,
}

impl TensorType {
    fn id(self) -> u32 {
        match self {
            TensorType::Ggml(t) => ggml_id(t),
            TensorType::Mxfp4 => GGML_MXFP4,
        }
    }
    fn block_size(self) -> usize {
        match self {
            TensorType::Ggml(t) => t.block_size(),
            TensorType::Mxfp4 => BLOCK,
        }
    }
    fn type_size(self) -> usize {
        match self {
            TensorType::Ggml(t) => t.type_size(),
            TensorType::Mxfp4 => GGML_BLOCK_BYTES,
        }
    }
    fn name(self) -> &'static str {
        match self {
            TensorType::Ggml(t) => type_name(t),
            TensorType::Mxfp4 => "MXFP4",
        }
    }
}

/// How a GGUF tensor's values are made from the Hugging Face tensors (indices into
/// [`SynthValues`]).
#[derive(Debug, Clone)]
enum Source {
    /// The rows of these tensors, one after the other (one: the tensor itself; E: stacked experts).
    Concat(Vec<usize>),
    /// Rows `lo..hi` of each of the `experts` slices of `rows` rows of a fused tensor (Granite's
    /// `input_linear` split into gate and up).
    ExpertRows {
        hf: usize,
        experts: usize,
        rows: usize,
        lo: usize,
        hi: usize,
    },
    /// llama.cpp's q/k row permutation for interleaved RoPE over `heads` heads.
    Permute { hf: usize, heads: usize },
    /// DeepSeek `attn_k_b` `[H, rank, nope]` (`v_b: false`) or `attn_v_b` `[H, v, rank]` from
    /// `kv_b_proj` `[H·(nope+v), rank]`.
    KvB {
        hf: usize,
        heads: usize,
        nope: usize,
        v: usize,
        rank: usize,
        v_b: bool,
    },
    /// GPT-OSS gate (`parity` 0) or up (1) `[E, I, H]` from `gate_up_proj` `[E, H, 2I]`.
    GptOssGateUp {
        hf: usize,
        experts: usize,
        h: usize,
        i: usize,
        parity: usize,
    },
    /// GPT-OSS gate / up bias `[E, I]` from `gate_up_proj_bias` `[E, 2I]`.
    GptOssBias {
        hf: usize,
        experts: usize,
        i: usize,
        parity: usize,
    },
    /// GPT-OSS down `[E, H, I]` from `down_proj` `[E, I, H]`.
    GptOssDown {
        hf: usize,
        experts: usize,
        h: usize,
        i: usize,
    },
}

/// One tensor of the file.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    /// Outermost first (the reverse of ggml's `ne`).
    dims: Vec<usize>,
    ty: TensorType,
    source: Source,
    /// Bytes of the data.
    bytes: u64,
}

impl Planned {
    fn cols(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }
    fn rows(&self) -> usize {
        let n = self.dims.len().saturating_sub(1);
        self.dims[..n].iter().product()
    }
    /// ggml's `ggml_n_dims`: trailing `ne` of 1 do not count.
    fn n_dims(&self) -> usize {
        let ne: Vec<usize> = self.dims.iter().rev().copied().collect();
        let mut n = ne.len();
        while n > 1 && ne[n - 1] == 1 {
            n -= 1;
        }
        n.max(1)
    }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's `weight_name_comparer`: tensors outside blocks (layer −1) first, then by layer,
/// then by name.
fn llama_order(a: &str, b: &str) -> std::cmp::Ordering {
    let la = layer_of(a).map_or(-1i64, |l| l as i64);
    let lb = layer_of(b).map_or(-1i64, |l| l as i64);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The converter's choice (`prepare_tensors`): F32 or the output type.
fn converter_keeps_f32(p: &Planned) -> bool {
    let n = &p.name;
    p.dims.len() <= 1
        || n.ends_with("_norm.weight")
        || n.contains(".ffn_gate_inp.")
        || n.contains(".ffn_gate_inp_shexp.")
        || !n.ends_with(".weight")
}

/// llama.cpp's `tensor_type_fallback`.
fn fallback(ty: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let f = match ty {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        other => other,
    };
    if cols.is_multiple_of(f.block_size()) {
        f
    } else {
        GgmlDType::F16
    }
}

/// Assigns every tensor its type (`tensors` in file order). `rest`: the type of the tensors
/// `--quant mxfp4` leaves unquantised (the checkpoint's dtype).
fn assign_types(
    tensors: &mut [Planned],
    quant: GgufQuant,
    n_expert: usize,
    n_layer: usize,
    rest: GgmlDType,
) {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let is_attn_v = |n: &str| {
        n.contains("attn_v.weight")
            || n.contains("attn_qkv.weight")
            || n.contains("attn_kv_b.weight")
    };
    let n_wv = tensors.iter().filter(|t| is_attn_v(&t.name)).count();
    let mut i_wv = 0usize;
    for t in tensors.iter_mut() {
        let cols = t.cols();
        if quant == GgufQuant::Mxfp4 {
            // the converter: the repacked MXFP4 experts (`repack_mxfp4`, raw type MXFP4), then its
            // usual rule with the output type of the bf16 / f16 checkpoint (`--outtype auto`)
            t.ty = if matches!(
                t.source,
                Source::GptOssGateUp { .. } | Source::GptOssDown { .. }
            ) {
                TensorType::Mxfp4
            } else if converter_keeps_f32(t) {
                TensorType::Ggml(GgmlDType::F32)
            } else {
                TensorType::Ggml(rest)
            };
            let elems = t.rows() as u64 * cols as u64;
            t.bytes = elems / t.ty.block_size() as u64 * t.ty.type_size() as u64;
            continue;
        }
        t.ty = TensorType::Ggml(match quant {
            GgufQuant::F32 | GgufQuant::Mxfp4 => GgmlDType::F32,
            _ if converter_keeps_f32(t) => GgmlDType::F32,
            GgufQuant::Bf16 => GgmlDType::BF16,
            GgufQuant::Q8_0 => {
                if cols.is_multiple_of(32) {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F16
                }
            }
            GgufQuant::Q4KM => {
                // llama-quantize's `tensor_allows_quantization` on the converter's output
                let name = t.name.as_str();
                let allowed = t.n_dims() >= 2
                    && name.ends_with("weight")
                    && !name.contains("_norm.weight")
                    && !name.contains("ffn_gate_inp.weight");
                if !allowed {
                    GgmlDType::F32
                } else {
                    let mut ty = GgmlDType::Q4K;
                    if name == "output.weight" || (tied && name == "token_embd.weight") {
                        ty = if cols.is_multiple_of(256) {
                            GgmlDType::Q6K
                        } else {
                            GgmlDType::Q8_0
                        };
                    } else if name == "token_embd.weight" {
                    } else if is_attn_v(name) {
                        if use_more_bits(i_wv, n_wv) {
                            ty = GgmlDType::Q6K;
                        }
                        if n_expert == 8 {
                            ty = GgmlDType::Q8_0;
                        }
                        i_wv += 1;
                    } else if name.contains("attn_k.weight") {
                        if n_expert == 8 {
                            ty = GgmlDType::Q8_0;
                        }
                    } else if name.contains("attn_q.weight") {
                    } else if name.contains("attn_output.weight") {
                        if n_expert == 8 {
                            ty = GgmlDType::Q5K;
                        }
                    } else if name.contains("ffn_up") || name.contains("ffn_gate") {
                    } else if name.contains("ffn_down") {
                        let l = layer_of(name).unwrap_or(0);
                        if use_more_bits(l, n_layer) {
                            ty = GgmlDType::Q6K;
                        }
                    }
                    fallback(ty, cols)
                }
            }
        });
        let elems = t.rows() as u64 * cols as u64;
        t.bytes = elems / t.ty.block_size() as u64 * t.ty.type_size() as u64;
    }
}

/// The tensors of the file, in file order, with their types.
fn plan(
    spec: &SynthSpec,
    cfg: &ModelConfig,
    values: &SynthValues,
    quant: GgufQuant,
) -> Result<Vec<Planned>> {
    let f = cfg.family;
    let idx = |name: &str| -> Result<usize> {
        values.index_of(name).ok_or_else(|| {
            ModelError::InvalidArgument(format!("synthetic tensor `{name}` is not in the plan"))
        })
    };
    let mut out: Vec<Planned> = Vec::new();
    let mut push = |name: String, dims: Vec<usize>, source: Source| {
        out.push(Planned {
            name,
            dims,
            ty: TensorType::Ggml(GgmlDType::F32),
            source,
            bytes: 0,
        })
    };
    let (e, i, h) = (cfg.num_experts, cfg.intermediate_size, cfg.hidden_size);
    let permuted = matches!(f, Family::Mixtral | Family::GraniteMoe);
    let table = tensor_table(cfg, ExpertLayout::Canonical)?;
    for t in &table {
        let role = t.role;
        let is_bias = t.name == bias_name(f, role) && t.name != weight_name(f, role);
        let hf = idx(&t.name)?;
        let missing = || {
            ModelError::InvalidArgument(format!(
                "no GGUF name for `{}` of a {} model",
                t.name,
                f.model_type()
            ))
        };
        match role {
            Role::Expert(_, x, _) if x > 0 => {}
            Role::Expert(l, _, p) => {
                let name = gguf_name(f, Role::Expert(l, 0, p), false).ok_or_else(missing)?;
                let mut srcs = Vec::with_capacity(e);
                for x in 0..e {
                    srcs.push(idx(&weight_name(f, Role::Expert(l, x, p)))?);
                }
                let dims = if p == Proj::Down {
                    vec![e, h, i]
                } else {
                    vec![e, i, h]
                };
                push(name, dims, Source::Concat(srcs));
            }
            Role::FusedGateUp(l) if f == Family::GptOss => {
                for (parity, p) in [(0, Proj::Gate), (1, Proj::Up)] {
                    let name = gguf_name(f, Role::Expert(l, 0, p), is_bias).ok_or_else(missing)?;
                    if is_bias {
                        push(
                            name,
                            vec![e, i],
                            Source::GptOssBias {
                                hf,
                                experts: e,
                                i,
                                parity,
                            },
                        );
                    } else {
                        push(
                            name,
                            vec![e, i, h],
                            Source::GptOssGateUp {
                                hf,
                                experts: e,
                                h,
                                i,
                                parity,
                            },
                        );
                    }
                }
            }
            Role::FusedDown(l) if f == Family::GptOss => {
                let name =
                    gguf_name(f, Role::Expert(l, 0, Proj::Down), is_bias).ok_or_else(missing)?;
                if is_bias {
                    push(name, vec![e, h], Source::Concat(vec![hf]));
                } else {
                    push(
                        name,
                        vec![e, h, i],
                        Source::GptOssDown {
                            hf,
                            experts: e,
                            h,
                            i,
                        },
                    );
                }
            }
            Role::FusedGateUp(l) => {
                // Granite-MoE `input_linear` [E, 2I, H]: gate rows first, then up
                for (k, p) in [(0, Proj::Gate), (1, Proj::Up)] {
                    let name = gguf_name(f, Role::Expert(l, 0, p), false).ok_or_else(missing)?;
                    push(
                        name,
                        vec![e, i, h],
                        Source::ExpertRows {
                            hf,
                            experts: e,
                            rows: 2 * i,
                            lo: k * i,
                            hi: (k + 1) * i,
                        },
                    );
                }
            }
            Role::FusedDown(l) => {
                let name =
                    gguf_name(f, Role::Expert(l, 0, Proj::Down), false).ok_or_else(missing)?;
                push(name, vec![e, h, i], Source::Concat(vec![hf]));
            }
            Role::KvB(l) if !is_bias => {
                let m = cfg.attn.mla.ok_or_else(missing)?;
                let nh = cfg.num_attention_heads;
                for v_b in [false, true] {
                    let (name, dims) = if v_b {
                        (
                            format!("blk.{l}.attn_v_b.weight"),
                            vec![nh, m.v_head_dim, m.kv_lora_rank],
                        )
                    } else {
                        (
                            format!("blk.{l}.attn_k_b.weight"),
                            vec![nh, m.kv_lora_rank, m.qk_nope_head_dim],
                        )
                    };
                    push(
                        name,
                        dims,
                        Source::KvB {
                            hf,
                            heads: nh,
                            nope: m.qk_nope_head_dim,
                            v: m.v_head_dim,
                            rank: m.kv_lora_rank,
                            v_b,
                        },
                    );
                }
            }
            Role::Q(_) | Role::K(_) if permuted && !is_bias => {
                let heads = if matches!(role, Role::Q(_)) {
                    cfg.num_attention_heads
                } else {
                    cfg.num_key_value_heads
                };
                let name = gguf_name(f, role, false).ok_or_else(missing)?;
                push(name, t.shape.clone(), Source::Permute { hf, heads });
            }
            _ => {
                let name = gguf_name(f, role, is_bias).ok_or_else(missing)?;
                push(name, t.shape.clone(), Source::Concat(vec![hf]));
            }
        }
    }
    out.sort_by(|a, b| llama_order(&a.name, &b.name));
    for w in out.windows(2) {
        if w[0].name == w[1].name {
            return Err(ModelError::InvalidArgument(format!(
                "two tensors named `{}` in the GGUF plan",
                w[0].name
            )));
        }
    }
    for t in &out {
        if checked_product(&t.dims).is_none() {
            return Err(ModelError::InvalidArgument(format!(
                "tensor `{}`: shape {:?} is too large",
                t.name, t.dims
            )));
        }
    }
    let rest = match spec.dtype {
        SynthDtype::F32 => GgmlDType::F32,
        SynthDtype::Bf16 => GgmlDType::BF16,
        SynthDtype::F16 => GgmlDType::F16,
    };
    assign_types(&mut out, quant, cfg.num_experts, spec.num_layers, rest);
    if quant == GgufQuant::Mxfp4 {
        out.sort_by_key(converter_order);
    }
    Ok(out)
}

/// The order in which llama.cpp's converter writes gpt-oss from an MXFP4 checkpoint: first the
/// repacked experts (`generate_extra_tensors`), then every other tensor, each group in the order
/// of the Hugging Face tensors it comes from (the safetensors files' name order, which is the
/// order of [`SynthValues`]' indices), gate before up where one HF tensor gives both.
fn converter_order(p: &Planned) -> (bool, usize, usize) {
    let (hf, sub) = match &p.source {
        Source::Concat(hfs) => (hfs.first().copied().unwrap_or(0), 0),
        Source::ExpertRows { hf, lo, .. } => (*hf, *lo),
        Source::Permute { hf, .. } | Source::GptOssDown { hf, .. } => (*hf, 0),
        Source::KvB { hf, v_b, .. } => (*hf, usize::from(*v_b)),
        Source::GptOssGateUp { hf, parity, .. } | Source::GptOssBias { hf, parity, .. } => {
            (*hf, *parity)
        }
    };
    (p.ty != TensorType::Mxfp4, hf, sub)
}

// ---------------------------------------------------------------------------------------------
// GGUF encoding

const ALIGN: u64 = 32;

/// A metadata value.
enum Meta {
    U32(u32),
    I32s(Vec<i32>),
    F32(f32),
    F32s(Vec<f32>),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_kv(out: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(out, key);
    match v {
        Meta::U32(x) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Meta::F32(x) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Meta::Bool(b) => {
            out.extend_from_slice(&7u32.to_le_bytes());
            out.push(u8::from(*b));
        }
        Meta::Str(s) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::I32s(a) => {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Meta::F32s(a) => {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Meta::Strs(a) => {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter().for_each(|s| put_str(out, s));
        }
    }
}

fn u32_of(v: usize, what: &str) -> Result<Meta> {
    u32::try_from(v)
        .map(Meta::U32)
        .map_err(|_| ModelError::InvalidArgument(format!("{what} = {v} does not fit GGUF's u32")))
}

/// The `<arch>.*`, `general.*` and `tokenizer.*` metadata (see the module docs).
fn metadata(
    spec: &SynthSpec,
    cfg: &ModelConfig,
    values: &SynthValues,
    quant: GgufQuant,
    name: &str,
    info: &Value,
) -> Result<Vec<(String, Meta)>> {
    let f = spec.family;
    let arch = gguf_arch(f);
    let c = crate::synth::config_json(spec);
    let get = |k: &str| c.get(k).filter(|v| !v.is_null());
    let mut m: Vec<(String, Meta)> = Vec::new();
    let a = |k: &str| format!("{arch}.{k}");
    m.push(("general.architecture".into(), Meta::Str(arch.into())));
    m.push(("general.type".into(), Meta::Str("model".into())));
    m.push(("general.name".into(), Meta::Str(name.into())));
    m.push(("general.file_type".into(), Meta::U32(quant.file_type())));
    m.push(("general.quantization_version".into(), Meta::U32(2)));
    m.push((a("block_count"), u32_of(spec.num_layers, "block_count")?));
    m.push((
        a("context_length"),
        u32_of(spec.max_position_embeddings, "context_length")?,
    ));
    m.push((a("embedding_length"), u32_of(spec.hidden_size, "hidden")?));
    if let Some(ff) = get("intermediate_size").and_then(Value::as_u64) {
        m.push((
            a("feed_forward_length"),
            u32_of(ff as usize, "intermediate")?,
        ));
    }
    m.push((a("attention.head_count"), u32_of(spec.num_heads, "heads")?));
    let kv = if f == Family::DeepseekV2 || f == Family::DeepseekV3 {
        1
    } else {
        cfg.num_key_value_heads
    };
    m.push((a("attention.head_count_kv"), u32_of(kv, "kv heads")?));
    m.push((
        a("attention.layer_norm_rms_epsilon"),
        Meta::F32(spec.rms_norm_eps as f32),
    ));
    m.push((a("vocab_size"), u32_of(spec.vocab_size, "vocab")?));
    m.push((a("expert_count"), u32_of(spec.num_experts, "experts")?));
    m.push((a("expert_used_count"), u32_of(spec.top_k, "top-k")?));
    m.push((a("rope.freq_base"), Meta::F32(spec.rope_theta as f32)));
    let rope = get("rope_parameters").cloned().unwrap_or(Value::Null);
    if let Some(y) = spec.yarn {
        if y.mscale != y.mscale_all_dim {
            return Err(ModelError::InvalidArgument(format!(
                "YaRN mscale {:?} differs from mscale_all_dim {:?}: llama.cpp's GGUF metadata has \
                 one value (`rope.scaling.yarn_log_multiplier`) and assumes they are equal",
                y.mscale, y.mscale_all_dim
            )));
        }
    }
    if rope.get("rope_type").and_then(Value::as_str) == Some("yarn") {
        m.push((a("rope.scaling.type"), Meta::Str("yarn".into())));
        let fl = |k: &str| rope.get(k).and_then(Value::as_f64);
        if let Some(x) = fl("factor") {
            m.push((a("rope.scaling.factor"), Meta::F32(x as f32)));
        }
        if let Some(x) = rope
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
        {
            m.push((
                a("rope.scaling.original_context_length"),
                u32_of(x as usize, "original_max_position_embeddings")?,
            ));
        }
        for (k, key) in [
            ("attention_factor", "rope.scaling.yarn_attn_factor"),
            ("beta_fast", "rope.scaling.yarn_beta_fast"),
            ("beta_slow", "rope.scaling.yarn_beta_slow"),
        ] {
            if let Some(x) = fl(k) {
                m.push((a(key), Meta::F32(x as f32)));
            }
        }
    }
    if let Some(hd) = get("head_dim").and_then(Value::as_u64) {
        if !matches!(
            f,
            Family::GraniteMoe | Family::DeepseekV2 | Family::DeepseekV3
        ) {
            m.push((a("attention.key_length"), u32_of(hd as usize, "head_dim")?));
            m.push((
                a("attention.value_length"),
                u32_of(hd as usize, "head_dim")?,
            ));
        }
    }
    if let Some(n) = get("norm_topk_prob").and_then(Value::as_bool) {
        m.push((a("expert_weights_norm"), Meta::Bool(n)));
    }
    match f {
        Family::Qwen2Moe | Family::Qwen3Moe => {
            if let Some(x) = get("moe_intermediate_size").and_then(Value::as_u64) {
                m.push((
                    a("expert_feed_forward_length"),
                    u32_of(x as usize, "moe_intermediate_size")?,
                ));
            }
            if let Some(x) = get("shared_expert_intermediate_size").and_then(Value::as_u64) {
                m.push((
                    a("expert_shared_feed_forward_length"),
                    u32_of(x as usize, "shared_expert_intermediate_size")?,
                ));
            }
        }
        Family::Olmoe => {
            if let Some(x) = get("clip_qkv").and_then(Value::as_f64) {
                m.push((a("attention.clamp_kqv"), Meta::F32(x as f32)));
            }
        }
        Family::Mixtral => {
            m.push((
                a("rope.dimension_count"),
                u32_of(cfg.head_dim(), "head_dim")?,
            ));
            if let Some(w) = get("sliding_window").and_then(Value::as_u64) {
                m.push((
                    a("attention.sliding_window"),
                    u32_of(w as usize, "sliding_window")?,
                ));
            }
        }
        Family::GraniteMoe => {
            m.push((
                a("rope.dimension_count"),
                u32_of(spec.hidden_size / spec.num_heads.max(1), "head_dim")?,
            ));
            for (k, key) in [
                ("attention_multiplier", "attention.scale"),
                ("embedding_multiplier", "embedding_scale"),
                ("residual_multiplier", "residual_scale"),
                ("logits_scaling", "logit_scale"),
            ] {
                if let Some(x) = get(k).and_then(Value::as_f64).filter(|&x| x != 0.0) {
                    m.push((a(key), Meta::F32(x as f32)));
                }
            }
            m.push((
                a("expert_feed_forward_length"),
                u32_of(spec.intermediate_size, "intermediate")?,
            ));
        }
        Family::GptOss => {
            if let Some(w) = get("sliding_window").and_then(Value::as_u64) {
                m.push((
                    a("attention.sliding_window"),
                    u32_of(w as usize, "sliding_window")?,
                ));
            }
            m.push((
                a("expert_feed_forward_length"),
                u32_of(spec.intermediate_size, "intermediate")?,
            ));
            let lim = get("swiglu_limit").and_then(Value::as_f64).unwrap_or(7.0);
            if lim != 7.0 {
                m.push((
                    a("swiglu_clamp_exp"),
                    Meta::F32s(vec![lim as f32; spec.num_layers]),
                ));
            }
        }
        Family::DeepseekV2 | Family::DeepseekV3 => {
            let mla = cfg
                .attn
                .mla
                .ok_or_else(|| ModelError::InvalidArgument("a DeepSeek spec without MLA".into()))?;
            m.push((
                a("leading_dense_block_count"),
                u32_of(spec.dense_layers.len(), "first_k_dense_replace")?,
            ));
            if let Some(q) = mla.q_lora_rank {
                m.push((a("attention.q_lora_rank"), u32_of(q, "q_lora_rank")?));
            }
            let kv = mla.kv_lora_rank;
            m.push((a("attention.kv_lora_rank"), u32_of(kv, "kv_lora_rank")?));
            m.push((
                a("attention.key_length"),
                u32_of(kv + mla.qk_rope_head_dim, "key_length")?,
            ));
            m.push((a("attention.value_length"), u32_of(kv, "value_length")?));
            m.push((
                a("attention.key_length_mla"),
                u32_of(
                    mla.qk_nope_head_dim + mla.qk_rope_head_dim,
                    "key_length_mla",
                )?,
            ));
            m.push((
                a("attention.value_length_mla"),
                u32_of(mla.v_head_dim, "v_head_dim")?,
            ));
            m.push((
                a("expert_feed_forward_length"),
                u32_of(spec.intermediate_size, "moe_intermediate_size")?,
            ));
            m.push((
                a("expert_shared_count"),
                u32_of(spec.num_shared_experts, "n_shared_experts")?,
            ));
            m.push((
                a("expert_weights_scale"),
                Meta::F32(spec.routed_scaling_factor as f32),
            ));
            m.push((a("expert_group_count"), u32_of(spec.n_group, "n_group")?));
            m.push((
                a("expert_group_used_count"),
                u32_of(spec.topk_group, "topk_group")?,
            ));
            m.push((
                a("expert_gating_func"),
                Meta::U32(if f == Family::DeepseekV3 { 2 } else { 1 }),
            ));
            m.push((
                a("rope.dimension_count"),
                u32_of(mla.qk_rope_head_dim, "qk_rope_head_dim")?,
            ));
            if let Some(x) = rope.get("mscale_all_dim").and_then(Value::as_f64) {
                m.push((
                    a("rope.scaling.yarn_log_multiplier"),
                    Meta::F32((0.1 * x) as f32),
                ));
            }
        }
    }
    // tokenizer: gpt2-style byte-level BPE, padded to the vocabulary as the converter pads it
    let tpath = PathBuf::from("tokenizer.json (synth-model)");
    let tok: Value = serde_json::from_slice(&values.tokenizer_json)
        .map_err(|e| ModelError::invalid(&tpath, e.to_string()))?;
    let n = spec.vocab_size;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![5i32; n]; // UNUSED
    let vocab = tok
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::invalid(&tpath, "no model.vocab"))?;
    let mut place = |id: Option<u64>, s: &str, ty: i32| -> Result<()> {
        let id = id
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < n)
            .ok_or_else(|| {
                ModelError::invalid(
                    &tpath,
                    format!("token `{s}` has no id below the vocabulary size {n}"),
                )
            })?;
        tokens[id] = s.to_string();
        types[id] = ty;
        Ok(())
    };
    for (s, id) in vocab {
        place(id.as_u64(), s, 1)?; // NORMAL
    }
    for t in tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let s = t.get("content").and_then(Value::as_str).unwrap_or_default();
        let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
        place(
            t.get("id").and_then(Value::as_u64),
            s,
            if special { 3 } else { 4 },
        )?;
    }
    let merges: Vec<String> = tok
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    Value::Array(p) => p
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => String::new(),
                })
                .collect()
        })
        .unwrap_or_default();
    let bos = tokens
        .iter()
        .position(|t| t == "<|endoftext|>")
        .ok_or_else(|| ModelError::invalid(&tpath, "no <|endoftext|> token"))?;
    m.push(("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())));
    // the converter's names (`get_vocab_base_pre`): the project's byte-level tokenizer has GPT-2's
    // pre-tokenizer, `gpt-2` (llama.cpp refuses `gpt2`: "unknown pre-tokenizer type")
    let pre = if spec.uses_olmo_tokenizer() {
        "olmo"
    } else {
        "gpt-2"
    };
    m.push(("tokenizer.ggml.pre".into(), Meta::Str(pre.into())));
    m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)));
    m.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
    m.push(("tokenizer.ggml.merges".into(), Meta::Strs(merges)));
    m.push(("tokenizer.ggml.bos_token_id".into(), u32_of(bos, "bos")?));
    m.push((
        "tokenizer.ggml.eos_token_id".into(),
        Meta::U32(spec.eos_token_id()),
    ));
    m.push(("tokenizer.ggml.padding_token_id".into(), Meta::U32(1)));
    m.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Meta::Bool(false)));
    m.push((
        "tokenizer.chat_template".into(),
        Meta::Str(CHAT_TEMPLATE.into()),
    ));
    m.push(("moe_xray.synth".into(), Meta::Str(info.to_string())));
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Tensor data

/// Values per generation unit of the row-wise sources.
const UNIT: usize = 1 << 20;
/// Values per parallel quantisation task.
const QTASK: usize = 1 << 16;

/// `vals` (`rows × cols`, row-major) in type `ty`, appended to `out`.
fn encode(ty: TensorType, vals: &[f32], cols: usize, out: &mut Vec<u8>) -> Result<()> {
    let ty = match ty {
        TensorType::Ggml(t) => t,
        TensorType::Mxfp4 => return encode_mxfp4(vals, cols, out),
    };
    match ty {
        GgmlDType::F32 => vals
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlDType::F16 => vals
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        GgmlDType::BF16 => vals
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        _ => {
            let rows_per = (QTASK / cols.max(1)).max(1);
            let parts: Vec<Result<Vec<u8>>> = vals
                .par_chunks(rows_per * cols)
                .map(|chunk| {
                    let t = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
                    let q = QTensor::quantize(&t, ty)?;
                    Ok(q.data()?.into_owned())
                })
                .collect();
            for p in parts {
                out.extend_from_slice(&p?);
            }
        }
    }
    Ok(())
}

/// `vals` (whole rows of `cols` values, `cols` a multiple of 32) as ggml `block_mxfp4` blocks:
/// each block of 32 consecutive values of a row quantised by [`crate::mxfp4::quantize_block`]
/// (the quantiser of the HF MXFP4 checkpoint, so scale and codes are that checkpoint's), then its
/// nibbles moved into ggml's order ([`crate::mxfp4::hf_to_ggml_nibbles`]) behind the scale byte.
fn encode_mxfp4(vals: &[f32], cols: usize, out: &mut Vec<u8>) -> Result<()> {
    if cols == 0 || !cols.is_multiple_of(BLOCK) || !vals.len().is_multiple_of(cols) {
        return Err(ModelError::InvalidArgument(format!(
            "MXFP4 needs rows of a multiple of {BLOCK} values, got rows of {cols} ({} values)",
            vals.len()
        )));
    }
    // QTASK is a multiple of BLOCK: every task holds whole blocks
    let parts: Vec<Vec<u8>> = vals
        .par_chunks(QTASK)
        .map(|chunk| {
            let mut o = Vec::with_capacity(chunk.len() / BLOCK * GGML_BLOCK_BYTES);
            let mut x = [0f32; BLOCK];
            for b in chunk.chunks_exact(BLOCK) {
                x.copy_from_slice(b);
                let (e, q) = crate::mxfp4::quantize_block(&x);
                o.push(e);
                o.extend_from_slice(&crate::mxfp4::hf_to_ggml_nibbles(&q));
            }
            o
        })
        .collect();
    for p in parts {
        out.extend_from_slice(&p);
    }
    Ok(())
}

/// `v` rounded to `dtype` (round-to-nearest-even) and back, as the checkpoint of that dtype
/// stores it.
fn round_to(dtype: SynthDtype, v: f32) -> f32 {
    match dtype {
        SynthDtype::F32 => v,
        SynthDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        SynthDtype::F16 => half::f16::from_f32(v).to_f32(),
    }
}

/// Calls `emit` with the values of `t` in order, in bounded units of whole rows.
fn produce(
    t: &Planned,
    values: &SynthValues,
    emit: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let cols = t.cols();
    let step_rows = (UNIT / cols.max(1)).max(1);
    let mut buf: Vec<f32> = Vec::new();
    // rows r0..r0+n of HF tensor `hf` (row length `cols`)
    let mut rows_of = |hf: usize,
                       r0: usize,
                       n: usize,
                       emit: &mut dyn FnMut(&[f32]) -> Result<()>|
     -> Result<()> {
        let mut r = r0;
        while r < r0 + n {
            let k = step_rows.min(r0 + n - r);
            buf.resize(k * cols, 0.0);
            values.fill(hf, r * cols, &mut buf);
            emit(&buf)?;
            r += k;
        }
        Ok(())
    };
    match &t.source {
        Source::Concat(hfs) => {
            for &hf in hfs {
                let shape = values.shape(hf);
                let total: usize = shape.iter().product();
                rows_of(hf, 0, total / cols.max(1), emit)?;
            }
        }
        Source::ExpertRows {
            hf,
            experts,
            rows,
            lo,
            hi,
        } => {
            for x in 0..*experts {
                rows_of(*hf, x * rows + lo, hi - lo, emit)?;
            }
        }
        Source::Permute { hf, heads } => {
            let shape = values.shape(*hf);
            let (rows, c) = (shape[0], shape.iter().skip(1).product::<usize>());
            let mut w = vec![0f32; rows * c];
            values.fill(*hf, 0, &mut w);
            // LlamaModel.permute: w.reshape(heads, 2, rows/heads/2, c).swapaxes(1, 2)
            let half = rows / (*heads).max(1) / 2;
            let mut p = vec![0f32; rows * c];
            for hh in 0..*heads {
                for j in 0..half {
                    for two in 0..2 {
                        let src = (hh * 2 + two) * half + j;
                        let dst = (hh * half + j) * 2 + two;
                        p[dst * c..(dst + 1) * c].copy_from_slice(&w[src * c..(src + 1) * c]);
                    }
                }
            }
            emit(&p)?;
        }
        Source::KvB {
            hf,
            heads,
            nope,
            v,
            rank,
            v_b,
        } => {
            let per = nope + v;
            let mut w = vec![0f32; heads * per * rank];
            values.fill(*hf, 0, &mut w);
            let mut o = Vec::with_capacity(heads * rank * per);
            for hh in 0..*heads {
                if *v_b {
                    for j in 0..*v {
                        let r = hh * per + nope + j;
                        o.extend_from_slice(&w[r * rank..(r + 1) * rank]);
                    }
                } else {
                    // k_b[h][r][n] = kv_b[h·per + n][r]
                    for r in 0..*rank {
                        for n in 0..*nope {
                            o.push(w[(hh * per + n) * rank + r]);
                        }
                    }
                }
            }
            emit(&o)?;
        }
        Source::GptOssGateUp {
            hf,
            experts,
            h,
            i,
            parity,
        } => {
            let mut w = vec![0f32; h * 2 * i];
            let mut o = vec![0f32; i * h];
            for x in 0..*experts {
                values.fill(*hf, x * h * 2 * i, &mut w);
                // o[r][c] = gu[x][c][2r + parity]
                for r in 0..*i {
                    for c in 0..*h {
                        o[r * h + c] = w[c * 2 * i + 2 * r + parity];
                    }
                }
                emit(&o)?;
            }
        }
        Source::GptOssBias {
            hf,
            experts,
            i,
            parity,
        } => {
            let mut w = vec![0f32; experts * 2 * i];
            values.fill(*hf, 0, &mut w);
            let o: Vec<f32> = (0..experts * i)
                .map(|k| w[(k / i) * 2 * i + 2 * (k % i) + parity])
                .collect();
            emit(&o)?;
        }
        Source::GptOssDown { hf, experts, h, i } => {
            let mut w = vec![0f32; i * h];
            let mut o = vec![0f32; h * i];
            for x in 0..*experts {
                values.fill(*hf, x * i * h, &mut w);
                for r in 0..*h {
                    for c in 0..*i {
                        o[r * i + c] = w[c * h + r];
                    }
                }
                emit(&o)?;
            }
        }
    }
    Ok(())
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub model_type: String,
    pub arch: String,
    pub quant: String,
    pub num_parameters: u64,
    pub file_bytes: u64,
    pub tokenizer: String,
    /// Number of tensors of each ggml type.
    pub tensor_types: BTreeMap<String, usize>,
    /// `--planted`: vocabulary entries per class.
    pub planted_class_counts: Option<[usize; 4]>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

/// Whether `path` is a GGUF file that `synth-model` wrote (it may be replaced). The project's
/// header reader, which knows MXFP4 (candle's does not).
fn is_synth_gguf(path: &Path) -> bool {
    crate::gguf::read_header(path)
        .map(|(c, _)| c.metadata.contains_key("moe_xray.synth"))
        .unwrap_or(false)
}

/// Writes the synthetic model `spec` as one GGUF file `out` (see the module docs). `out` must end
/// in `.gguf` and must not exist, or be a file an earlier `synth-model --format gguf` wrote.
pub fn write_gguf(spec: &SynthSpec, quant: GgufQuant, out: &Path) -> Result<GgufSummary> {
    spec.validate()?;
    if quant == GgufQuant::Mxfp4 {
        // the checks of the HF MXFP4 checkpoint: gpt_oss, hidden / intermediate multiples of 32
        let mut mx = spec.clone();
        mx.mxfp4_experts = true;
        mx.validate()?;
    } else if spec.mxfp4_experts {
        return Err(ModelError::InvalidArgument(format!(
            "a spec with MXFP4 experts is written as GGUF with --quant mxfp4, not {}",
            quant.name()
        )));
    }
    if !crate::gguf::is_gguf(out) {
        return Err(ModelError::InvalidArgument(format!(
            "{}: a GGUF output must be a file name ending in .gguf",
            out.display()
        )));
    }
    if out.exists() && !(out.is_file() && is_synth_gguf(out)) {
        return Err(ModelError::InvalidArgument(format!(
            "{}: exists and is not a GGUF file written by synth-model; choose another --out",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let fname = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synth.gguf".into());
    let tmp = parent.join(format!(".{fname}.partial-{}", std::process::id()));
    let res = write_file(spec, quant, &tmp, &fname);
    match res {
        Ok(mut s) => {
            fs::rename(&tmp, out).map_err(io_err(out))?;
            s.path = out.to_path_buf();
            Ok(s)
        }
        Err(e) => {
            // best effort: the temporary file is ours
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_file(spec: &SynthSpec, quant: GgufQuant, path: &Path, fname: &str) -> Result<GgufSummary> {
    let cfg = spec.model_config()?;
    // the values of the unquantised checkpoint of the same seed (`--quant mxfp4` quantises them)
    let mut vspec = spec.clone();
    if quant == GgufQuant::Mxfp4 {
        vspec.mxfp4_experts = false;
    }
    let values = SynthValues::new(&vspec)?;
    let tensors = plan(spec, &cfg, &values, quant)?;
    let mut info = json!({
        "generator": concat!("moe-xray synth-model ", env!("CARGO_PKG_VERSION")),
        "model_type": spec.family.model_type(),
        "seed": spec.seed,
        "quant": quant.name(),
        "planted": spec.planted,
        "planted_class_counts": values.class_counts,
        "num_parameters": spec.num_parameters(),
        "tokenizer": values.tokenizer_kind,
        "note": "random weights: no language ability; see the moe-xray model crate docs (synth.rs, synth_gguf.rs)",
    });
    if quant == GgufQuant::Mxfp4 {
        // the dtype of the HF MXFP4 checkpoint this file is the conversion of
        info["dtype"] = json!(spec.dtype.torch_name());
    }
    let name = format!(
        "moe-xray synth {} {}",
        fname.trim_end_matches(".gguf"),
        spec.family.model_type()
    );
    let meta = metadata(spec, &cfg, &values, quant, &name, &info)?;

    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_kv(&mut head, k, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in &tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.bytes).div_ceil(ALIGN) * ALIGN;
    }
    while !(head.len() as u64).is_multiple_of(ALIGN) {
        head.push(0);
    }
    let file = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&head).map_err(io_err(path))?;
    let mut written = 0u64;
    let mut bytes = Vec::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    // `--quant mxfp4` writes what llama.cpp's converter makes of the HF MXFP4 checkpoint, whose
    // values are stored in its dtype (experts quantised from those)
    let round = quant == GgufQuant::Mxfp4 && spec.dtype != SynthDtype::F32;
    let mut rounded: Vec<f32> = Vec::new();
    for (t, &off) in tensors.iter().zip(&offsets) {
        if written < off {
            w.write_all(&vec![0u8; (off - written) as usize])
                .map_err(io_err(path))?;
            written = off;
        }
        let cols = t.cols();
        let mut n = 0u64;
        produce(t, &values, &mut |vals: &[f32]| {
            bytes.clear();
            let vals = if round {
                // as the HF MXFP4 checkpoint stores them: every value in its dtype first
                rounded.clear();
                rounded.extend(vals.iter().map(|&v| round_to(spec.dtype, v)));
                &rounded[..]
            } else {
                vals
            };
            encode(t.ty, vals, cols, &mut bytes)?;
            w.write_all(&bytes).map_err(io_err(path))?;
            n += bytes.len() as u64;
            Ok(())
        })?;
        if n != t.bytes {
            return Err(ModelError::InvalidArgument(format!(
                "tensor `{}`: wrote {n} bytes, planned {}",
                t.name, t.bytes
            )));
        }
        written += n;
        *types.entry(t.ty.name().to_string()).or_default() += 1;
    }
    let file = w
        .into_inner()
        .map_err(|e| ModelError::io(path, e.into_error()))?;
    file.sync_all().map_err(io_err(path))?;
    let file_bytes = fs::metadata(path).map_err(io_err(path))?.len();
    Ok(GgufSummary {
        path: path.to_path_buf(),
        model_type: spec.family.model_type().to_string(),
        arch: gguf_arch(spec.family).to_string(),
        quant: quant.name().to_string(),
        num_parameters: spec.num_parameters(),
        file_bytes,
        tokenizer: values.tokenizer_kind.to_string(),
        tensor_types: types,
        planted_class_counts: values.class_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp() {
        // n = 16: i < 2, i >= 14, (i - 2) % 3 == 2 → 0, 1, 4, 7, 10, 13, 14, 15
        let got: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(got, vec![0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn fallback_follows_llama_cpp() {
        assert_eq!(fallback(GgmlDType::Q4K, 512), GgmlDType::Q4K);
        assert_eq!(fallback(GgmlDType::Q4K, 64), GgmlDType::Q5_0);
        assert_eq!(fallback(GgmlDType::Q6K, 64), GgmlDType::Q8_0);
        assert_eq!(fallback(GgmlDType::Q5K, 96), GgmlDType::Q5_1);
        assert_eq!(fallback(GgmlDType::Q4K, 20), GgmlDType::F16);
    }

    #[test]
    fn llama_order_is_by_layer_then_name() {
        let mut v = vec![
            "blk.10.a",
            "blk.2.b",
            "token_embd.weight",
            "blk.2.a",
            "output.weight",
        ];
        v.sort_by(|a, b| llama_order(a, b));
        assert_eq!(
            v,
            vec![
                "output.weight",
                "token_embd.weight",
                "blk.2.a",
                "blk.2.b",
                "blk.10.a"
            ]
        );
    }

    #[test]
    fn quant_names_parse() {
        for q in GGUF_QUANTS {
            assert_eq!(GgufQuant::parse(q).unwrap().name(), *q);
        }
        assert_eq!(GgufQuant::parse("Q4_K_M").unwrap(), GgufQuant::Q4KM);
        assert!(GgufQuant::parse("q3_k").is_err());
    }
}
