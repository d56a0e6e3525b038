//! gpt-oss's routed experts in their published MXFP4 form, computed from the packed bytes.
//!
//! The Hugging Face checkpoints of openai/gpt-oss store each MoE layer's experts as
//! `mlp.experts.gate_up_proj_blocks` `[E, 2I, H/32, 16]` u8 and `gate_up_proj_scales`
//! `[E, 2I, H/32]` u8, `down_proj_blocks` `[E, H, I/32, 16]` and `down_proj_scales` `[E, H, I/32]`,
//! with `config.json` saying `"quantization_config": {"quant_method": "mxfp4", ...}`
//! (transformers' `integrations/mxfp4.py`). Each row of the packed form is one output unit
//! (`2I` gate/up rows, gate = even rows, up = odd rows: the interleave of the dequantised
//! `[E, H, 2I]` tensor's last axis; `H` down rows), its input axis split into blocks of 32 FP4
//! E2M1 values (two per byte, low nibble first) sharing an E8M0 scale (bias 127). The biases
//! (`gate_up_proj_bias` `[E, 2I]`, `down_proj_bias` `[E, H]`) are ordinary tensors.
//!
//! The bytes stay in the memory-mapped safetensors; `moe_xray_kernels::mxfp4` decodes a panel of
//! rows at a time into a per-thread buffer (never the whole tensor). Decoding is exact, so the
//! result equals an f32 matmul with transformers' dequantised weights (`Mxfp4Config(dequantize=
//! True)`) summed in the kernel's order; each projection's output is rounded once to the compute
//! dtype, as a bf16 / f32 matmul with the dequantised weights would be.
//!
//! GGUF files (llama.cpp's `block_mxfp4`, type 39) are computed as llama.cpp computes them in the
//! default (fast) mode: the activations quantised to Q8_0 and an exact integer sum per block
//! (`moe_xray_kernels::quant`, `QType::Mxfp4`: `ggml_vec_dot_mxfp4_q8_0` bit for bit), 2.9–6.6×
//! faster per call than the f32 path from 64 tokens down to 1 (docs/performance.md, "Session
//! 15"); `--exact` keeps the f32 path above (transformers' numbers).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use moe_xray_kernels::mxfp4::{xwt_mxfp4, MxLayout, MxMatrix, BLOCK, NIBBLE_BYTES};
use moe_xray_kernels::quant::{xwt_q, xwt_q_act, QActivations, QMatrix, QType};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::table::{bias_name, weight_name, Role};
use crate::weights::{MappedTensor, WeightStore};

/// Whether a tensor name is one of MXFP4's packed tensors (`*_blocks` / `*_scales`).
pub fn is_packed_name(name: &str) -> bool {
    name.ends_with("_blocks") || name.ends_with("_scales")
}

/// Checks `config.json`'s `quantization_config` against the checkpoint: MXFP4 blocks need
/// `quant_method` = `mxfp4`, and any other quantisation method is refused (one clear error
/// naming the file), whether or not its tensors are present.
pub fn check_quantization_config(dir: &Path, has_blocks: bool) -> Result<()> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // A checkpoint directory without config.json was refused earlier; nothing to check.
        Err(_) => return Ok(()),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::invalid(&path, format!("invalid JSON: {e}")))?;
    let method = match v.get("quantization_config") {
        None | Some(serde_json::Value::Null) => None,
        Some(q) => Some(
            q.get("quant_method")
                .and_then(|m| m.as_str())
                .ok_or_else(|| {
                    ModelError::invalid(&path, "`quantization_config` has no string `quant_method`")
                })?
                .to_string(),
        ),
    };
    match (method.as_deref(), has_blocks) {
        (Some("mxfp4"), _) | (None, false) => Ok(()),
        (None, true) => Err(ModelError::invalid(
            &path,
            "the checkpoint has MXFP4 `*_blocks` / `*_scales` tensors but config.json has no \
             `quantization_config` with `quant_method` \"mxfp4\"",
        )),
        (Some(other), _) => Err(ModelError::Unsupported {
            path,
            message: format!(
                "`quantization_config.quant_method` = \"{other}\" (only \"mxfp4\" is supported)"
            ),
        }),
    }
}

/// The E2M1 values by code (transformers' `FP4_VALUES`): `KVALUES / 2`.
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Quantises 32 values to one MXFP4 block in transformers' layout: returns the E8M0 scale byte
/// and the 16 bytes whose byte `j` holds the code of value `2j` in its low nibble and of value
/// `2j + 1` in its high nibble.
///
/// The quantiser of `tools/hf_ref_gptoss_mxfp4.py` (and gguf-py's `MXFP4.quantize_blocks`): scale
/// exponent `floor(log2(max|x|)) − 2` (biased by 127, clamped to 0..=254; 0 for an all-zero
/// block), so the largest magnitude lands in [4, 8) units and values above 6 units saturate;
/// each value gets the nearest of [`FP4_VALUES`] times the scale, the first in table order on
/// ties (so −0 is never chosen), with the error `|d · v − x|` computed in f32 as numpy does.
/// `floor(log2(·))` is read from the exponent bits (exact; numpy's float32 `log2` can round up
/// to the next integer when max|x| lies within an ulp below a power of two: bf16 / f16 values
/// cannot lie there, so the tool and this agree on bf16 / f16 checkpoints; with `--dtype f32` such
/// a block's scale could differ from the tool's by one step); non-finite inputs are not
/// expected (the writer's values are finite) but give some block without panicking.
pub fn quantize_block(x: &[f32; BLOCK]) -> (u8, [u8; NIBBLE_BYTES]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    // biased exponent field = floor(log2(amax)) + 127 for normal amax; 0 for zero / subnormal
    let field = (amax.to_bits() >> 23) & 0xFF;
    let e = if field == 0 {
        0
    } else {
        field.saturating_sub(2).min(254)
    };
    // 2^(e - 127) exactly (subnormal for e = 0)
    let d = f32::from_bits(if e == 0 { 0x0040_0000 } else { e << 23 });
    let code = |v: f32| -> u8 {
        let mut best = 0usize;
        let mut best_err = f32::INFINITY;
        for (c, q) in FP4_VALUES.iter().enumerate() {
            let err = (d * q - v).abs();
            if err < best_err {
                best = c;
                best_err = err;
            }
        }
        best as u8
    };
    let mut out = [0u8; NIBBLE_BYTES];
    for (j, o) in out.iter_mut().enumerate() {
        *o = code(x[2 * j]) | (code(x[2 * j + 1]) << 4);
    }
    (e as u8, out)
}

/// The 16 nibble bytes of one block in transformers' order (byte `j`: value `2j` low, `2j + 1`
/// high) rearranged into ggml's `block_mxfp4` order (byte `j`: value `j` low, `j + 16` high), as
/// llama.cpp's converter does (`GptOssModel.transform_nibble_layout`). The codes are the same (both
/// index the E2M1 table), only their places move.
pub fn hf_to_ggml_nibbles(q: &[u8; NIBBLE_BYTES]) -> [u8; NIBBLE_BYTES] {
    let code = |v: usize| (q[v / 2] >> (4 * (v % 2))) & 0x0F;
    let mut out = [0u8; NIBBLE_BYTES];
    for (j, o) in out.iter_mut().enumerate() {
        *o = code(j) | (code(j + NIBBLE_BYTES) << 4);
    }
    out
}

/// Where the packed experts are.
#[derive(Debug)]
enum Packed {
    /// Published safetensors: interleaved gate/up rows, separate scales.
    Hf {
        gate_up_blocks: MappedTensor,
        gate_up_scales: MappedTensor,
        down_blocks: MappedTensor,
        down_scales: MappedTensor,
    },
    /// GGUF type 39 (`ffn_{gate,up,down}_exps`, `[E, I, H]`, `[E, I, H]`, `[E, H, I]`), ggml's
    /// 17-byte blocks; `q8`: computed on Q8_0 activations as llama.cpp does (the fast mode),
    /// else in f32 (`--exact`).
    Ggml {
        gate: MappedTensor,
        up: MappedTensor,
        down: MappedTensor,
        q8: bool,
    },
}

/// The MXFP4 experts of one layer.
#[derive(Debug)]
pub struct Mxfp4Experts {
    packed: Packed,
    /// Gate, up and down biases `[E, I]`, `[E, I]`, `[E, H]` in the compute dtype (gpt-oss).
    biases: Option<[Tensor; 3]>,
    experts: usize,
    inter: usize,
    hidden: usize,
}

impl Mxfp4Experts {
    /// Whether MoE layer `l` of `store` holds MXFP4 experts.
    pub(crate) fn present(cfg: &ModelConfig, store: &WeightStore, l: usize) -> bool {
        store.contains(&format!(
            "{}_blocks",
            weight_name(cfg.family, Role::FusedGateUp(l))
        ))
    }

    /// Maps layer `l`'s packed experts (shapes checked against config.json) and loads the biases.
    pub(crate) fn load(
        cfg: &ModelConfig,
        store: &WeightStore,
        l: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let f = cfg.family;
        let (e, i, h) = (cfg.num_experts, cfg.intermediate_size, cfg.hidden_size);
        let cfg_path = store.dir().join("config.json");
        for (what, n) in [("hidden_size", h), ("intermediate_size", i)] {
            if n == 0 || !n.is_multiple_of(BLOCK) {
                return Err(ModelError::invalid(
                    &cfg_path,
                    format!(
                        "`{what}` = {n} is not a multiple of the MXFP4 block of {BLOCK}, but layer \
                         {l}'s experts are MXFP4"
                    ),
                ));
            }
        }
        if !dev.is_cpu() {
            return Err(ModelError::InvalidArgument(
                "MXFP4 experts are computed by the CPU kernels only (use the CPU device)".into(),
            ));
        }
        let gu = weight_name(f, Role::FusedGateUp(l));
        let dn = weight_name(f, Role::FusedDown(l));
        let u8_only = |t: &MappedTensor, name: &str| -> Result<()> {
            if t.dtype != DType::U8 {
                return Err(ModelError::Safetensors {
                    path: store.dir().to_path_buf(),
                    message: format!("tensor `{name}` must be u8 (MXFP4), found {:?}", t.dtype),
                });
            }
            Ok(())
        };
        let map = |name: String, shape: &[usize]| -> Result<MappedTensor> {
            let t = store.map_bytes(&name, shape)?;
            u8_only(&t, &name)?;
            Ok(t)
        };
        let gate_up_blocks = map(format!("{gu}_blocks"), &[e, 2 * i, h / BLOCK, NIBBLE_BYTES])?;
        let gate_up_scales = map(format!("{gu}_scales"), &[e, 2 * i, h / BLOCK])?;
        let down_blocks = map(format!("{dn}_blocks"), &[e, h, i / BLOCK, NIBBLE_BYTES])?;
        let down_scales = map(format!("{dn}_scales"), &[e, h, i / BLOCK])?;
        let gub = store
            .load(
                &bias_name(f, Role::FusedGateUp(l)),
                &[e, 2 * i],
                Some(dtype),
                dev,
            )?
            .reshape((e, i, 2))?;
        let down_b = store.load(&bias_name(f, Role::FusedDown(l)), &[e, h], Some(dtype), dev)?;
        Ok(Mxfp4Experts {
            packed: Packed::Hf {
                gate_up_blocks,
                gate_up_scales,
                down_blocks,
                down_scales,
            },
            biases: Some([
                gub.narrow(2, 0, 1)?.squeeze(2)?.contiguous()?,
                gub.narrow(2, 1, 1)?.squeeze(2)?.contiguous()?,
                down_b,
            ]),
            experts: e,
            inter: i,
            hidden: h,
        })
    }

    /// GGUF experts (`[gate, up, down]` u8 maps of `[E, I, H]`, `[E, I, H]`, `[E, H, I]` MXFP4
    /// tensors, sizes checked here) with optional biases; `exact`: in f32 on the exactly decoded
    /// weights, else on Q8_0 activations as llama.cpp (module docs).
    pub(crate) fn from_gguf(
        [gate, up, down]: [MappedTensor; 3],
        biases: Option<[Tensor; 3]>,
        (e, i, h): (usize, usize, usize),
        exact: bool,
    ) -> Result<Self> {
        for (t, rows, k) in [(&gate, i, h), (&up, i, h), (&down, h, i)] {
            let ok = e
                .checked_mul(rows)
                .and_then(|r| MxMatrix::new(MxLayout::Ggml { data: t.bytes() }, r, k))
                .is_some();
            if !ok || t.shape != [e, rows, k] {
                return Err(ModelError::InvalidArgument(format!(
                    "MXFP4 expert tensor of shape {:?} and {} bytes is not [{e}, {rows}, {k}]",
                    t.shape,
                    t.bytes().len()
                )));
            }
        }
        Ok(Mxfp4Experts {
            packed: Packed::Ggml {
                gate,
                up,
                down,
                q8: !exact,
            },
            biases,
            experts: e,
            inter: i,
            hidden: h,
        })
    }

    /// Expert `e`'s `[rows, k]` matrix of a GGUF tensor for the Q8_0-activation kernel (the
    /// bytes [`Self::ggml`] cuts out).
    fn ggml_q(t: &MappedTensor, rows: usize, k: usize, e: usize) -> Result<QMatrix<'_>> {
        let bytes = match Self::ggml(t, rows, k, e)?.layout() {
            MxLayout::Ggml { data } => Some(data),
            MxLayout::Hf { .. } => None,
        };
        bytes
            .and_then(|b| QMatrix::new(QType::Mxfp4, b, rows, k))
            .ok_or_else(|| {
                ModelError::InvalidArgument(format!(
                    "MXFP4 tensor {:?}: expert {e} of [{rows}, {k}] out of range",
                    t.shape
                ))
            })
    }

    fn ggml(t: &MappedTensor, rows: usize, k: usize, e: usize) -> Result<MxMatrix<'_>> {
        let all = MxMatrix::new(MxLayout::Ggml { data: t.bytes() }, t.shape[0] * rows, k)
            .ok_or_else(|| {
                ModelError::InvalidArgument(format!("MXFP4 tensor {:?}: sizes", t.shape))
            })?;
        all.sub(e * rows, (e + 1) * rows)
            .ok_or_else(|| ModelError::InvalidArgument(format!("expert {e} out of range")))
    }

    fn matrix<'a>(
        blocks: &'a MappedTensor,
        scales: &'a MappedTensor,
        rows: usize,
        k: usize,
        e: usize,
    ) -> Result<MxMatrix<'a>> {
        let total = blocks.shape.first().and_then(|&ne| ne.checked_mul(rows));
        let layout = MxLayout::Hf {
            blocks: blocks.bytes(),
            scales: scales.bytes(),
        };
        let all = total
            .and_then(|t| MxMatrix::new(layout, t, k))
            .ok_or_else(|| {
                ModelError::InvalidArgument(format!(
                    "MXFP4 tensor of shape {:?} does not hold {rows} rows of {k} values per expert",
                    blocks.shape
                ))
            })?;
        all.sub(e * rows, (e + 1) * rows)
            .ok_or_else(|| ModelError::InvalidArgument(format!("expert {e} out of range")))
    }

    fn check_expert(&self, e: usize) -> Result<()> {
        if e >= self.experts {
            return Err(ModelError::InvalidArgument(format!(
                "expert {e} out of range"
            )));
        }
        Ok(())
    }

    /// Gate and up projections of expert `e` for the rows `x` `[n, H]` (without biases), each
    /// `[n, I]` in `x`'s dtype.
    pub(crate) fn gate_up(&self, e: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_expert(e)?;
        let (i, h) = (self.inter, self.hidden);
        let dtype = x.dtype();
        let (n, k) = x.dims2()?;
        if k != h {
            return Err(ModelError::InvalidArgument(format!(
                "MXFP4 experts: input of width {k}, expected {h}"
            )));
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (g, u) = match &self.packed {
            Packed::Hf {
                gate_up_blocks,
                gate_up_scales,
                ..
            } => {
                let w = Self::matrix(gate_up_blocks, gate_up_scales, 2 * i, h, e)?;
                let y = xwt_mxfp4(&xs, n, &w); // [n, 2I], gate / up interleaved
                let mut g = Vec::with_capacity(n * i);
                let mut u = Vec::with_capacity(n * i);
                for pair in y.chunks_exact(2) {
                    g.push(pair[0]);
                    u.push(pair[1]);
                }
                (g, u)
            }
            Packed::Ggml {
                gate, up, q8: true, ..
            } => {
                // Gate and up share one quantisation of the activations.
                let (gm, um) = (Self::ggml_q(gate, i, h, e)?, Self::ggml_q(up, i, h, e)?);
                let act = QActivations::new(QType::Mxfp4, &xs, n, h);
                (xwt_q_act(&act, &gm), xwt_q_act(&act, &um))
            }
            Packed::Ggml { gate, up, .. } => (
                xwt_mxfp4(&xs, n, &Self::ggml(gate, i, h, e)?),
                xwt_mxfp4(&xs, n, &Self::ggml(up, i, h, e)?),
            ),
        };
        let dev = x.device();
        Ok((
            Tensor::from_vec(g, (n, i), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(u, (n, i), dev)?.to_dtype(dtype)?,
        ))
    }

    /// Down projection of expert `e` for `act` `[n, I]` (without bias), `[n, H]` in `act`'s dtype.
    pub(crate) fn down(&self, e: usize, act: &Tensor) -> Result<Tensor> {
        self.check_expert(e)?;
        let (i, h) = (self.inter, self.hidden);
        let (n, k) = act.dims2()?;
        if k != i {
            return Err(ModelError::InvalidArgument(format!(
                "MXFP4 experts: activation of width {k}, expected {i}"
            )));
        }
        let xs = act.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = match &self.packed {
            Packed::Hf {
                down_blocks,
                down_scales,
                ..
            } => xwt_mxfp4(&xs, n, &Self::matrix(down_blocks, down_scales, h, i, e)?),
            Packed::Ggml { down, q8: true, .. } => xwt_q(&xs, n, &Self::ggml_q(down, h, i, e)?),
            Packed::Ggml { down, .. } => xwt_mxfp4(&xs, n, &Self::ggml(down, h, i, e)?),
        };
        Ok(Tensor::from_vec(y, (n, h), act.device())?.to_dtype(act.dtype())?)
    }

    /// The biases of expert `e` (gate, up, down), if any.
    pub(crate) fn biases(&self, e: usize) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        self.check_expert(e)?;
        Ok(match &self.biases {
            Some([g, u, d]) => Some((g.get(e)?, u.get(e)?, d.get(e)?)),
            None => None,
        })
    }
}
