//! The decoder forward pass shared by every supported MoE family, on candle, with a
//! routing-capture hook. The family-specific parts are described by [`ModelConfig`] (parsed by
//! the family's file in `families/`) and named by the family's tensor table (`table.rs`).
//!
//! Math, op for op as transformers does it (so that f32 routing matches to rounding):
//! embedding (× Granite's `embedding_multiplier`) → per layer: input RMSNorm → attention →
//! residual (× `residual_multiplier`) → post-attention RMSNorm → MoE block or dense MLP →
//! residual; final RMSNorm; `lm_head` (tied or not; ÷ Granite's `logits_scaling`).
//! - Attention: q/k/v projections (optional biases), OLMoE's RMSNorm over the whole projected q
//!   and k or Qwen3's per-head RMSNorm, optional `clip_qkv`, RoPE (rotate-half; DeepSeek's
//!   interleaved pairs on the rope part; default or YaRN frequencies), GQA, or DeepSeek's
//!   multi-head latent attention; scores in the compute dtype × the scale, causal mask with an
//!   optional sliding window (a window of W: the token and the W−1 before it), GPT-OSS's
//!   per-head sink logit joining the softmax, softmax in f32, output projection.
//! - MoE: router logits (compute dtype, or f32 for DeepSeek; router bias for GPT-OSS), the
//!   family's router (`router.rs`), experts `down(act(gate(x)) * up(x))` weighted and summed in
//!   expert-index order (SwiGLU, or GPT-OSS's clamped variant with biases), plus shared experts
//!   (Qwen2-MoE's gated by `sigmoid(shared_expert_gate(x))`).
//!
//! Batching is *ragged*: the token-wise parts (projections, norms, MoE) run on the concatenated
//! tokens of all sequences in the batch, while attention runs per sequence against that sequence's
//! own KV cache. There is no padding at all, so no real token's routing can depend on the batch.
//! Tokens are grouped by expert so that each expert runs once per step on all of its tokens.

use std::path::Path;

pub use candle_core::DType;
use candle_core::{Device, Tensor, D};
use moe_xray_trace::{RoutingDecision, RoutingSink, TokenType};
use rayon::prelude::*;

use crate::config::{Activation, Family, ModelConfig, QkNorm};
use crate::cpu_kernels::{
    self, matmul_t, matmul_t_f32, rope_rotate_half, xw_mapped, ExpertCall, MoeAccumulator, WSrc,
};
use crate::error::{ModelError, Result};
use crate::router::{check_mask, route_masked, RouterMask, RouterParams};
use crate::table::{bias_name, tensor_table, weight_name, ExpertLayout, Proj, Role};
use crate::weights::{MappedTensor, WeightStore};

/// Parses a `--dtype` value (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(ModelError::InvalidArgument(format!(
            "unsupported dtype `{other}` (f32, bf16, f16)"
        ))),
    }
}

/// Short name of a compute dtype ("f32", "bf16", "f16").
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// The compute dtype of a load: f32 in exact mode (refusing another requested dtype), else the
/// requested one, else `stored()`.
pub(crate) fn compute_dtype(opts: &LoadOptions, stored: impl FnOnce() -> DType) -> Result<DType> {
    match (opts.exact, opts.dtype) {
        (true, Some(d)) if d != DType::F32 => Err(ModelError::InvalidArgument(format!(
            "exact mode computes in f32; the requested dtype {} contradicts it",
            dtype_name(d)
        ))),
        (true, _) => Ok(DType::F32),
        (false, Some(d)) => Ok(d),
        (false, None) => Ok(stored()),
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; `None` = the checkpoint's stored dtype (what transformers does when loading
    /// with `torch_dtype` equal to the stored one).
    pub dtype: Option<DType>,
    pub device: Device,
    /// On the CPU, leave expert weights stored in the compute dtype (bf16 / f16) in the
    /// memory-mapped checkpoint and read them in place instead of copying them at load time
    /// (default: true; results are identical either way).
    pub map_experts: bool,
    /// Exact mode (`--exact`): compute in f32 with quantised weights (GGUF quants, MXFP4)
    /// dequantised exactly to f32, so that routing can be compared with transformers running the
    /// same dequantised weights. A `dtype` other than f32 contradicts it and is refused.
    pub exact: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
            map_experts: true,
            exact: false,
        }
    }
}

#[derive(Debug)]
struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// A projection's weight: a tensor in the compute dtype, or a GGUF matrix kept in its
/// quantised blocks (`gguf::QLinear`, moe-xray's quantised kernel; fast mode on the CPU only).
#[derive(Debug)]
enum LinearWeight {
    Dense(Tensor),
    Quant(Box<crate::gguf::QLinear>),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (LinearWeight::Dense(w), Some(b)) = (&self.weight, &self.bias) {
            if x.dtype() != DType::F32 {
                // torch's biased linear in bf16 / f16 (`addmm`) adds the bias to the f32
                // accumulators and rounds once (GPT-OSS attention, Qwen2-MoE q/k/v).
                let y = matmul_t_f32(x, w)?.broadcast_add(&b.to_dtype(DType::F32)?)?;
                return Ok(y.to_dtype(x.dtype())?);
            }
        }
        let y = match &self.weight {
            LinearWeight::Dense(w) => matmul_t(x, w)?,
            LinearWeight::Quant(q) => q.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x × m` as torch multiplies a tensor by a Python scalar (Granite's multipliers): in bf16 /
/// f16 the product is computed in f32 with the scalar in f32 and rounded once (candle's affine
/// would first round the scalar itself to the compute dtype: 0.3 becomes 0.30078125 in bf16).
/// f32 tensors keep candle's affine, which computes the same product.
fn scale_like_torch(x: &Tensor, m: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return Ok((x * m)?);
    }
    let s = Tensor::new(m as f32, x.device())?;
    Ok(x.to_dtype(DType::F32)?
        .broadcast_mul(&s)?
        .to_dtype(x.dtype())?)
}

/// transformers' `*RMSNorm`: normalise in f32, cast back, then multiply by the weight in the
/// compute dtype — or, for GPT-OSS (whose norm weights stay f32), multiply in f32 and cast.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    weight_f32: bool,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        if self.weight_f32 {
            let y = xf.broadcast_mul(&inv)?;
            return Ok(y.broadcast_mul(&self.weight)?.to_dtype(dtype)?);
        }
        let y = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// A SwiGLU MLP (dense layers and shared experts): `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        // silu evaluated in f32 and rounded once (as torch's reduced-precision kernels).
        let act = (candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(dtype)? * u)?;
        self.down.forward(&act)
    }
}

#[derive(Debug)]
pub(crate) enum Experts {
    /// One module per expert (published checkpoints of most families).
    PerExpert(Vec<[Tensor; 3]>),
    /// Fused `[E, 2I, H]` gate-up (gate rows first) and `[E, H, I]` down.
    Fused { gate_up: Tensor, down: Tensor },
    /// Per-expert layout left in the memory-mapped files (CPU, stored dtype = compute dtype).
    PerExpertMapped(Vec<[MappedTensor; 3]>),
    /// Fused layout left in the memory-mapped files.
    FusedMapped {
        gate_up: MappedTensor,
        down: MappedTensor,
    },
    /// GPT-OSS: gate `[E, I, H]`, up `[E, I, H]`, down `[E, H, I]` (de-interleaved and
    /// transposed from the checkpoint at load time) with biases `[E, I]`, `[E, I]`, `[E, H]`:
    /// GGUF files, and safetensors that cannot stay mapped (`BiasedMapped`: f32, non-CPU,
    /// `map_experts: false`).
    Biased {
        gate: Tensor,
        up: Tensor,
        down: Tensor,
        gate_b: Tensor,
        up_b: Tensor,
        down_b: Tensor,
    },
    /// GPT-OSS experts left in the memory-mapped checkpoint as stored: `gate_up [E, H, 2I]`
    /// (gate / up interleaved on the last axis) and `down [E, I, H]`, multiplied in place by
    /// `cpu_kernels::xw_mapped` (CPU, stored dtype = compute dtype); biases loaded as in `Biased`.
    BiasedMapped(Box<MappedBiased>),
    /// Quantised experts of a GGUF file, multiplied in place (one `QMatMul` per expert and
    /// projection; GPT-OSS biases included).
    Quantized(crate::gguf::QuantExperts),
    /// GPT-OSS experts in MXFP4 (published safetensors or GGUF type 39), computed from the
    /// packed bytes by `moe_xray_kernels::mxfp4`.
    Mxfp4(Box<crate::mxfp4::Mxfp4Experts>),
}

/// The tensors of [`Experts::BiasedMapped`].
#[derive(Debug)]
pub(crate) struct MappedBiased {
    gate_up: MappedTensor,
    down: MappedTensor,
    gate_b: Tensor,
    up_b: Tensor,
    down_b: Tensor,
}

/// Where [`MoeModel`] reads its tensors, by Hugging Face name: a safetensors checkpoint
/// ([`WeightStore`]) or a GGUF file (`gguf::GgufSource`).
pub(crate) trait TensorSource {
    /// The stored shape of tensor `name` (empty if absent).
    fn shape_of(&self, name: &str) -> Vec<usize>;
    /// Tensor `name`, shape checked against `expected`, converted to `dtype` when given.
    fn load_tensor(
        &self,
        name: &str,
        expected: &[usize],
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Tensor>;
    /// Tensor `name` (shape `expected`) kept in its quantised blocks for the CPU kernel, when the
    /// source stores it so (GGUF); `None`: load it with [`TensorSource::load_tensor`].
    fn quantized(&self, _name: &str, _expected: &[usize]) -> Result<Option<crate::gguf::QLinear>> {
        Ok(None)
    }
}

impl TensorSource for WeightStore {
    fn shape_of(&self, name: &str) -> Vec<usize> {
        self.entry(name)
            .map(|e| e.shape.clone())
            .unwrap_or_default()
    }
    fn load_tensor(
        &self,
        name: &str,
        expected: &[usize],
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Tensor> {
        self.load(name, expected, dtype, device)
    }
}

#[derive(Debug)]
enum Attn {
    Standard {
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        q_norm: Option<RmsNorm>,
        k_norm: Option<RmsNorm>,
        /// Per-head sink logits (f32, `[heads]`).
        sinks: Option<Vec<f32>>,
    },
    Mla {
        /// `q_proj`, or `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
        q: Linear,
        q_b: Option<(RmsNorm, Linear)>,
        kv_a: Linear,
        kv_a_norm: RmsNorm,
        kv_b: Linear,
        o: Linear,
    },
}

#[derive(Debug)]
struct MoeBlock {
    router: Tensor,
    /// f32 copies for routers computed in f32 (DeepSeek).
    router_f32: Option<Tensor>,
    router_bias: Option<Tensor>,
    score_bias: Option<Vec<f32>>,
    experts: Experts,
    shared: Option<Mlp>,
    shared_gate: Option<Linear>,
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug)]
struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    attn: Attn,
    window: Option<usize>,
    ffn: Ffn,
}

/// Per-sequence decoding state: position and KV cache.
#[derive(Debug, Clone)]
pub struct SeqState {
    pub prompt_id: String,
    /// Number of tokens already processed (= position of the next token).
    pub pos: usize,
    /// Length of the prompt being prefilled (see [`SeqState::set_prefill_span`]).
    prefill_span: usize,
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
}

impl SeqState {
    /// Declares that positions `0..span` are one prompt that may be fed in several chunks. While
    /// a chunk lies inside the span, its attention rows are laid out over `span` keys (the keys
    /// not yet computed are masked out and zero), exactly as in a one-shot prefill of the whole
    /// prompt, so chunked prefill gives bit-identical scores, routing and logits. Memory per
    /// chunk is `heads × chunk × span` scores instead of `heads × span²`.
    pub fn set_prefill_span(&mut self, span: usize) {
        self.prefill_span = span;
    }
}

/// One sequence's tokens for one forward step.
#[derive(Debug)]
pub struct StepSeq<'a> {
    pub state: &'a mut SeqState,
    pub tokens: &'a [u32],
    pub token_type: TokenType,
    /// Whether the next-token logits of this sequence are needed.
    pub want_logits: bool,
}

/// Router output of one MoE layer for all tokens of a step.
struct LayerRouting {
    layer: u32,
    experts: Vec<u32>,
    weights: Vec<f32>,
    probs: Vec<f32>,
    /// First token row whose router logits or scores are not finite (nothing routed).
    non_finite_row: Option<usize>,
}

/// The error for a non-finite value at token `row` of a step (rows are the sequences' tokens,
/// concatenated in batch order).
fn non_finite(batch: &[StepSeq<'_>], row: usize, what: &'static str, where_: String) -> ModelError {
    let mut start = 0usize;
    for s in batch {
        if row < start + s.tokens.len() {
            return ModelError::NonFinite {
                prompt_id: s.state.prompt_id.clone(),
                what,
                where_,
                position: s.state.pos + (row - start),
            };
        }
        start += s.tokens.len();
    }
    ModelError::NonFinite {
        prompt_id: String::new(),
        what,
        where_,
        position: row,
    }
}

/// Checks the configuration against the checkpoint before anything is loaded: every tensor of
/// the family's table must be present with its shape. Errors name `config.json` and the field
/// when a size disagrees, or the tensor and both shapes.
fn check_against_store(cfg: &ModelConfig, store: &WeightStore, layout: ExpertLayout) -> Result<()> {
    let path = store.dir().join("config.json");
    let bad = |field: &str, value: usize, msg: String| {
        Err(ModelError::invalid(
            &path,
            format!("`{field}` = {value} does not match the checkpoint: {msg}"),
        ))
    };
    let f = cfg.family;
    let embed = weight_name(f, Role::Embed);
    if let Some(e) = store.entry(&embed) {
        if e.shape.len() == 2 && e.shape[1] != cfg.hidden_size {
            return bad(
                "hidden_size",
                cfg.hidden_size,
                format!("`{embed}` has shape {:?}", e.shape),
            );
        }
        if e.shape.len() == 2 && e.shape[0] != cfg.vocab_size {
            return bad(
                "vocab_size",
                cfg.vocab_size,
                format!("`{embed}` has shape {:?}", e.shape),
            );
        }
    }
    let last = cfg.num_hidden_layers.saturating_sub(1);
    let last_name = weight_name(f, Role::InputNorm(last));
    if !store.contains(&last_name) {
        return bad(
            "num_hidden_layers",
            cfg.num_hidden_layers,
            format!("the checkpoint has no tensor `{last_name}`"),
        );
    }
    if let Some(&l0) = cfg.moe_layer_indices().first() {
        let router = weight_name(f, Role::Router(l0 as usize));
        if let Some(e) = store.entry(&router) {
            if e.shape.first() != Some(&cfg.num_experts) {
                return bad(
                    "num_experts",
                    cfg.num_experts,
                    format!("`{router}` has shape {:?}", e.shape),
                );
            }
        }
    }
    for t in tensor_table(cfg, layout)? {
        match store.entry(&t.name) {
            // MXFP4 experts: `<name>_blocks` / `_scales`, checked when mapped.
            None if store.contains(&format!("{}_blocks", t.name)) => {}
            None => {
                return Err(ModelError::MissingTensor {
                    name: t.name,
                    dir: store.dir().to_path_buf(),
                })
            }
            Some(e) if e.shape != t.shape => {
                return Err(ModelError::ShapeMismatch {
                    name: t.name,
                    path: store.path_of(e),
                    expected: t.shape,
                    found: e.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A model of any supported family, ready to run.
#[derive(Debug)]
pub struct MoeModel {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    /// YaRN's attention factor multiplying cos and sin (1 otherwise).
    rope_scaling: f32,
}

impl MoeModel {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return crate::gguf::load_model(dir, opts);
        }
        let cfg = ModelConfig::from_dir(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(cfg, &store, opts)
    }

    pub fn from_store(cfg: ModelConfig, store: &WeightStore, opts: &LoadOptions) -> Result<Self> {
        let f = cfg.family;
        // Which expert layout the checkpoint uses: fused if the first MoE layer's fused
        // gate-up tensor is present.
        let first_moe = cfg.moe_layer_indices().first().copied().unwrap_or(0) as usize;
        let mxfp4 = crate::mxfp4::Mxfp4Experts::present(&cfg, store, first_moe);
        crate::mxfp4::check_quantization_config(store.dir(), mxfp4)?;
        let layout = if mxfp4 || store.contains(&weight_name(f, Role::FusedGateUp(first_moe))) {
            ExpertLayout::Fused
        } else {
            ExpertLayout::PerExpert
        };
        check_against_store(&cfg, store, layout)?;
        let dtype = compute_dtype(opts, || store.dominant_dtype())?;
        Self::assemble(cfg, store, opts, dtype, &|cfg: &ModelConfig, l: usize| {
            self::load_experts(cfg, store, opts, dtype, l, layout)
        })
    }

    /// Builds the model from checked tensors: `src` gives every tensor but the routed experts,
    /// which `experts` loads per MoE layer.
    pub(crate) fn assemble(
        cfg: ModelConfig,
        src: &dyn TensorSource,
        opts: &LoadOptions,
        dtype: DType,
        experts: &dyn Fn(&ModelConfig, usize) -> Result<Experts>,
    ) -> Result<Self> {
        let f = cfg.family;
        let store = src;
        let dev = &opts.device;
        let h = cfg.hidden_size;
        let (e, i) = (cfg.num_experts, cfg.intermediate_size);
        let shape_of = |name: &str| -> Vec<usize> { store.shape_of(name) };
        let ld = |name: &str| store.load_tensor(name, &shape_of(name), Some(dtype), dev);
        // GPT-OSS keeps its norm weights in f32 and multiplies before casting.
        let norm_f32 = f == Family::GptOss;
        let norm_eps = |role: Role, eps: f64| -> Result<RmsNorm> {
            let name = weight_name(f, role);
            Ok(RmsNorm {
                weight: if norm_f32 {
                    store.load_tensor(&name, &shape_of(&name), Some(DType::F32), dev)?
                } else {
                    ld(&name)?
                },
                eps,
                weight_f32: norm_f32,
            })
        };
        let norm = |role: Role| norm_eps(role, cfg.rms_norm_eps);
        let weight = |name: &str| -> Result<LinearWeight> {
            if dev.is_cpu() && !opts.exact {
                if let Some(q) = store.quantized(name, &shape_of(name))? {
                    return Ok(LinearWeight::Quant(Box::new(q)));
                }
            }
            Ok(LinearWeight::Dense(ld(name)?))
        };
        let lin = |role: Role, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: weight(&weight_name(f, role))?,
                bias: if bias {
                    Some(ld(&bias_name(f, role))?)
                } else {
                    None
                },
            })
        };
        let mlp = |role: &dyn Fn(Proj) -> Role| -> Result<Mlp> {
            Ok(Mlp {
                gate: lin(role(Proj::Gate), false)?,
                up: lin(role(Proj::Up), false)?,
                down: lin(role(Proj::Down), false)?,
            })
        };
        let embed = ld(&weight_name(f, Role::Embed))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let attn = if let Some(m) = cfg.attn.mla {
                // `attention_bias` (held in `o_bias`): q_a_proj, kv_a_proj_with_mqa, o_proj.
                let ab = cfg.attn.o_bias;
                let (q, q_b) = match m.q_lora_rank {
                    Some(_) => (
                        lin(Role::QA(l), ab)?,
                        Some((
                            norm_eps(Role::QANorm(l), m.lora_norm_eps)?,
                            lin(Role::QB(l), false)?,
                        )),
                    ),
                    None => (lin(Role::Q(l), false)?, None),
                };
                Attn::Mla {
                    q,
                    q_b,
                    kv_a: lin(Role::KvA(l), ab)?,
                    kv_a_norm: norm_eps(Role::KvANorm(l), m.lora_norm_eps)?,
                    kv_b: lin(Role::KvB(l), false)?,
                    o: lin(Role::O(l), ab)?,
                }
            } else {
                let qkv_b = cfg.attn.qkv_bias;
                let (q_norm, k_norm) = match cfg.attn.qk_norm {
                    QkNorm::None => (None, None),
                    QkNorm::Full | QkNorm::PerHead => {
                        (Some(norm(Role::QNorm(l))?), Some(norm(Role::KNorm(l))?))
                    }
                };
                let sinks = if cfg.attn.sinks {
                    let t = store.load_tensor(
                        &weight_name(f, Role::Sinks(l)),
                        &[cfg.num_attention_heads],
                        Some(DType::F32),
                        dev,
                    )?;
                    Some(t.to_vec1::<f32>()?)
                } else {
                    None
                };
                Attn::Standard {
                    q: lin(Role::Q(l), qkv_b)?,
                    k: lin(Role::K(l), qkv_b)?,
                    v: lin(Role::V(l), qkv_b)?,
                    o: lin(Role::O(l), cfg.attn.o_bias)?,
                    q_norm,
                    k_norm,
                    sinks,
                }
            };
            let is_moe = cfg.moe.moe_layers.get(l).copied().unwrap_or(true);
            let ffn = if !is_moe {
                Ffn::Dense(mlp(&|p| Role::Dense(l, p))?)
            } else {
                let experts = experts(&cfg, l)?;
                let router_name = weight_name(f, Role::Router(l));
                let router = ld(&router_name)?;
                let router_f32 = if cfg.moe.router_logits_f32 {
                    Some(store.load_tensor(&router_name, &[e, h], Some(DType::F32), dev)?)
                } else {
                    None
                };
                let router_bias = if cfg.moe.router_bias {
                    Some(ld(&bias_name(f, Role::Router(l)))?)
                } else {
                    None
                };
                let score_bias = if cfg.moe.score_correction_bias {
                    let t = store.load_tensor(
                        &weight_name(f, Role::ScoreBias(l)),
                        &[e],
                        Some(DType::F32),
                        dev,
                    )?;
                    Some(t.to_vec1::<f32>()?)
                } else {
                    None
                };
                let (shared, shared_gate) = match cfg.moe.shared {
                    Some(s) => (
                        Some(mlp(&|p| Role::Shared(l, p))?),
                        if s.gated {
                            Some(lin(Role::SharedGate(l), false)?)
                        } else {
                            None
                        },
                    ),
                    None => (None, None),
                };
                Ffn::Moe(MoeBlock {
                    router,
                    router_f32,
                    router_bias,
                    score_bias,
                    experts,
                    shared,
                    shared_gate,
                })
            };
            layers.push(Layer {
                input_norm: norm(Role::InputNorm(l))?,
                post_norm: norm(Role::PostNorm(l))?,
                attn,
                window: cfg.attn.sliding_window.get(l).copied().flatten(),
                ffn,
            });
        }
        let _ = i;
        let final_norm = norm(Role::FinalNorm)?;
        let lm_head = Linear {
            weight: if cfg.tie_word_embeddings {
                LinearWeight::Dense(embed.clone())
            } else {
                weight(&weight_name(f, Role::LmHead))?
            },
            bias: None,
        };
        let (inv_freq, rope_scaling) = crate::rope::inv_freq(&cfg.rope);
        Ok(MoeModel {
            cfg,
            device: dev.clone(),
            dtype,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            inv_freq,
            rope_scaling,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the expert weights are read in place from the memory-mapped checkpoint.
    pub fn experts_mapped(&self) -> bool {
        self.layers.iter().all(|l| match &l.ffn {
            Ffn::Moe(m) => matches!(
                m.experts,
                Experts::PerExpertMapped(_)
                    | Experts::FusedMapped { .. }
                    | Experts::BiasedMapped(_)
            ),
            Ffn::Dense(_) => true,
        })
    }

    /// A fresh sequence state (empty KV cache).
    pub fn new_sequence(&self, prompt_id: &str) -> SeqState {
        SeqState {
            prompt_id: prompt_id.to_string(),
            pos: 0,
            prefill_span: 0,
            k: vec![None; self.cfg.num_hidden_layers],
            v: vec![None; self.cfg.num_hidden_layers],
        }
    }

    /// Checks that every token id is inside the vocabulary.
    pub fn check_tokens(&self, prompt_id: &str, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(&t) => Err(ModelError::TokenOutOfRange {
                prompt_id: prompt_id.to_string(),
                token: t,
                vocab_size: self.cfg.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// cos / sin tables `[len, dim/2]` for positions `start..start+len` (f32, scaled by YaRN's
    /// attention factor).
    fn rope_tables_f32(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let a = f * p as f32;
                if self.rope_scaling == 1.0 {
                    cos.push(a.cos());
                    sin.push(a.sin());
                } else {
                    cos.push(a.cos() * self.rope_scaling);
                    sin.push(a.sin() * self.rope_scaling);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), &self.device)?;
        let sin = Tensor::from_vec(sin, (len, half), &self.device)?;
        Ok((cos, sin))
    }

    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rope_tables_f32(start, len)?;
        if self.cfg.family == Family::DeepseekV2 {
            // DeepSeek-V2 rotates in f32 (complex multiplication) with f32 tables.
            return Ok((cos, sin));
        }
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }

    /// Applies RoPE to `x` `[1, heads, t, dim]` (the rotated part only).
    fn apply_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self.cfg.family {
            // DeepSeek-V2: complex multiplication of interleaved pairs, in f32.
            Family::DeepseekV2 => {
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                let y = candle_nn::rotary_emb::rope_i_slow(&xf, cos, sin)?;
                Ok(y.to_dtype(self.dtype)?)
            }
            // DeepSeek-V3: interleaved pairs regrouped (evens then odds), then rotate-half.
            Family::DeepseekV3 if self.cfg.rope.interleaved => {
                let d = x.dim(D::Minus1)?;
                let (b, h, t) = x.dims4().map(|(b, h, t, _)| (b, h, t))?;
                let y = x
                    .reshape((b, h, t, d / 2, 2))?
                    .transpose(3, 4)?
                    .reshape((b, h, t, d))?
                    .contiguous()?;
                Ok(candle_nn::rotary_emb::rope_slow(&y, cos, sin)?)
            }
            _ => match rope_rotate_half(x, cos, sin)? {
                Some(y) => Ok(y),
                None => Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?),
            },
        }
    }

    /// Runs one forward step over a ragged batch and reports every (token, MoE layer) routing
    /// decision to `sink`, ordered per sequence by position, then layer. Returns, per sequence,
    /// the f32 logits of its last token when `want_logits` is set.
    pub fn forward(
        &self,
        batch: &mut [StepSeq<'_>],
        sink: &mut dyn RoutingSink,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.forward_masked(batch, sink, None)
    }

    /// The random-router control: replaces the router matrix, router bias and score-correction
    /// bias of every MoE layer by a seeded permutation of its own entries ([`crate::control`]).
    pub fn permute_routers(&mut self, seed: u64) -> Result<()> {
        use crate::control::{permutation, permute_tensor, RouterTensor};
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let Ffn::Moe(b) = &mut layer.ffn else {
                continue;
            };
            let p = permutation(seed, l, RouterTensor::Weight, b.router.elem_count());
            b.router = permute_tensor(&b.router, &p)?;
            if let Some(t) = &mut b.router_f32 {
                *t = permute_tensor(t, &p)?;
            }
            if let Some(t) = &mut b.router_bias {
                let p = permutation(seed, l, RouterTensor::Bias, t.elem_count());
                *t = permute_tensor(t, &p)?;
            }
            if let Some(v) = &mut b.score_bias {
                let p = permutation(seed, l, RouterTensor::ScoreBias, v.len());
                *v = crate::control::apply(v, &p);
            }
        }
        Ok(())
    }

    /// Checks an expert mask against this model: masks only on MoE layers, one entry per expert,
    /// at least `top_k` experts unmasked in each.
    pub fn check_router_mask(&self, mask: &RouterMask) -> Result<()> {
        let moe = self.cfg.moe_layer_indices();
        for (l, m) in mask.layers() {
            if !moe.iter().any(|&x| x as usize == l) {
                return Err(ModelError::InvalidArgument(format!(
                    "expert mask on decoder layer {l}, which is not a MoE layer"
                )));
            }
            check_mask(m, self.cfg.num_experts, self.cfg.num_experts_per_tok)
                .map_err(|e| ModelError::InvalidArgument(format!("decoder layer {l}: {e}")))?;
        }
        Ok(())
    }

    /// [`MoeModel::forward`] with experts masked out of the routers (`mask`, see
    /// [`crate::router::route_masked`]): the masked experts' router logits are set to `-inf`
    /// before the family's scores, and they are never chosen.
    pub fn forward_masked(
        &self,
        batch: &mut [StepSeq<'_>],
        sink: &mut dyn RoutingSink,
        mask: Option<&RouterMask>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if let Some(m) = mask {
            self.check_router_mask(m)?;
        }
        let mut all_ids: Vec<u32> = Vec::new();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::InvalidArgument(format!(
                    "empty token chunk for prompt `{}`",
                    s.state.prompt_id
                )));
            }
            self.check_tokens(&s.state.prompt_id, s.tokens)?;
            all_ids.extend_from_slice(s.tokens);
        }
        if all_ids.is_empty() {
            return Ok(Vec::new());
        }
        let n_tok = all_ids.len();
        let ids = Tensor::from_vec(all_ids.clone(), n_tok, &self.device)?;
        let mut xs = self.embed.index_select(&ids, 0)?;
        let mult = self.cfg.multipliers;
        if mult.embedding != 1.0 {
            xs = scale_like_torch(&xs, mult.embedding)?;
        }
        let wants_probs = sink.wants_probs();
        // The step runs on one of rayon's worker threads: the kernels' parallel loops (thousands
        // per step in decode: a few per expert) are then forked from inside the pool, which costs
        // a join, instead of being injected from outside it, which costs an injection, a wake-up
        // and a cross-thread join each. Same computation, same bits.
        let (routing, logits) = rayon::scope(|_| -> Result<_> {
            let mut routing = Vec::with_capacity(self.layers.len());
            let ropes = batch
                .iter()
                .map(|s| self.rope_tables(s.state.pos, s.tokens.len()))
                .collect::<Result<Vec<_>>>()?;
            for (l, layer) in self.layers.iter().enumerate() {
                let residual = xs.clone();
                let h = layer.input_norm.forward(&xs)?;
                let attn = self.attention(l, layer, &h, batch, &ropes)?;
                xs = if mult.residual != 1.0 {
                    (residual + scale_like_torch(&attn, mult.residual)?)?
                } else {
                    cpu_kernels::add(&residual, &attn)?
                };
                let residual = xs.clone();
                let h = layer.post_norm.forward(&xs)?;
                let out = match &layer.ffn {
                    Ffn::Dense(m) => m.forward(&h)?,
                    Ffn::Moe(block) => {
                        let layer_mask = mask.and_then(|m| m.layer(l));
                        let (moe, r) = self.moe(l, block, &h, wants_probs, layer_mask)?;
                        if let Some(row) = r.non_finite_row {
                            return Err(non_finite(
                                batch,
                                row,
                                "router logits",
                                format!("layer {l}"),
                            ));
                        }
                        routing.push(r);
                        moe
                    }
                };
                xs = if mult.residual != 1.0 {
                    (residual + scale_like_torch(&out, mult.residual)?)?
                } else {
                    cpu_kernels::add(&residual, &out)?
                };
            }
            // Logits of the last token of each sequence that wants them: one lm_head matmul for the
            // whole step (the final norm and the matmul are row-wise, so batching changes nothing).
            let mut last_rows = Vec::new();
            let mut row = 0usize;
            for s in batch.iter() {
                if s.want_logits {
                    last_rows.push((row + s.tokens.len() - 1) as u32);
                }
                row += s.tokens.len();
            }
            let logits = if last_rows.is_empty() {
                Vec::new()
            } else {
                let n = last_rows.len();
                let idx = Tensor::from_vec(last_rows, n, &self.device)?;
                let h = self.norm.forward(&xs.index_select(&idx, 0)?)?;
                let mut lg = self.lm_head.forward(&h)?;
                if mult.logits_scaling != 1.0 {
                    lg = if lg.dtype() == DType::F32 {
                        (lg / mult.logits_scaling)?
                    } else {
                        // torch divides a bf16 / f16 tensor by a Python scalar in f32 and rounds
                        // once (candle's affine would multiply by the scalar's reciprocal rounded
                        // to the compute dtype).
                        let s = Tensor::new(mult.logits_scaling as f32, lg.device())?;
                        lg.to_dtype(DType::F32)?
                            .broadcast_div(&s)?
                            .to_dtype(lg.dtype())?
                    };
                }
                lg.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
            };
            if let Some(bad) = logits.iter().position(|x| !x.is_finite()) {
                let vocab = self.cfg.vocab_size.max(1);
                let mut rows = Vec::new();
                let mut row = 0usize;
                for s in batch.iter() {
                    if s.want_logits {
                        rows.push(row + s.tokens.len() - 1);
                    }
                    row += s.tokens.len();
                }
                let row = rows.get(bad / vocab).copied().unwrap_or(0);
                return Err(non_finite(
                    batch,
                    row,
                    "output logits",
                    "the final layer".into(),
                ));
            }
            Ok((routing, logits))
        })?;
        // Report routing decisions: per sequence, per token, per MoE layer.
        let k = self.cfg.num_experts_per_tok;
        let ne = self.cfg.num_experts;
        let mut row = 0usize;
        for s in batch.iter() {
            for (j, &tok) in s.tokens.iter().enumerate() {
                let r = row + j;
                for lr in routing.iter() {
                    sink.record(&RoutingDecision {
                        prompt_id: &s.state.prompt_id,
                        layer: lr.layer,
                        position: (s.state.pos + j) as u32,
                        token_id: tok,
                        token_type: s.token_type,
                        experts: &lr.experts[r * k..(r + 1) * k],
                        weights: &lr.weights[r * k..(r + 1) * k],
                        probs: if wants_probs {
                            Some(&lr.probs[r * ne..(r + 1) * ne])
                        } else {
                            None
                        },
                    })?;
                }
            }
            row += s.tokens.len();
        }
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0usize;
        for s in batch.iter_mut() {
            if s.want_logits {
                out.push(Some(logits[next * vocab..(next + 1) * vocab].to_vec()));
                next += 1;
            } else {
                out.push(None);
            }
            s.state.pos += s.tokens.len();
        }
        Ok(out)
    }

    /// q `[n, heads, dq]`, k `[n, kv_heads, dq]`, v `[n, kv_heads, dv]` of a layer (before RoPE
    /// for the standard attention; MLA's rope part is rotated per sequence).
    fn qkv(&self, layer: &Layer, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let n = h.dim(0)?;
        match &layer.attn {
            Attn::Standard {
                q,
                k,
                v,
                q_norm,
                k_norm,
                ..
            } => {
                let mut qs = q.forward(h)?;
                let mut ks = k.forward(h)?;
                let mut vs = v.forward(h)?;
                if cfg.attn.qk_norm == QkNorm::Full {
                    if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
                        qs = qn.forward(&qs)?;
                        ks = kn.forward(&ks)?;
                    }
                }
                if let Some(c) = cfg.attn.clip_qkv {
                    qs = qs.clamp(-c, c)?;
                    ks = ks.clamp(-c, c)?;
                    vs = vs.clamp(-c, c)?;
                }
                let mut qs = qs.reshape((n, nh, hd))?;
                let mut ks = ks.reshape((n, nkv, hd))?;
                if cfg.attn.qk_norm == QkNorm::PerHead {
                    if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
                        qs = qn.forward(&qs)?;
                        ks = kn.forward(&ks)?;
                    }
                }
                Ok((qs, ks, vs.reshape((n, nkv, hd))?))
            }
            Attn::Mla {
                q,
                q_b,
                kv_a,
                kv_a_norm,
                kv_b,
                ..
            } => {
                let Some(m) = cfg.attn.mla else {
                    return Err(ModelError::InvalidArgument(
                        "MLA weights without an MLA configuration".into(),
                    ));
                };
                let (nope, rope, vd) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim);
                let qs = match q_b {
                    Some((norm, b)) => b.forward(&norm.forward(&q.forward(h)?)?)?,
                    None => q.forward(h)?,
                };
                let qs = qs.reshape((n, nh, nope + rope))?;
                let ckv = kv_a.forward(h)?; // [n, kv_lora + rope]
                let c = ckv.narrow(1, 0, m.kv_lora_rank)?;
                let k_pe = ckv.narrow(1, m.kv_lora_rank, rope)?; // shared by all heads
                let kv = kv_b
                    .forward(&kv_a_norm.forward(&c.contiguous()?)?)?
                    .reshape((n, nh, nope + vd))?;
                let k_nope = kv.narrow(2, 0, nope)?;
                let vs = kv.narrow(2, nope, vd)?.contiguous()?;
                let k_pe = k_pe.reshape((n, 1, rope))?.broadcast_as((n, nh, rope))?;
                let ks = Tensor::cat(&[&k_nope, &k_pe], 2)?.contiguous()?;
                Ok((qs, ks, vs))
            }
        }
    }

    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        batch: &mut [StepSeq<'_>],
        ropes: &[(Tensor, Tensor)],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd, vd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
            cfg.v_head_dim(),
        );
        let rope_dim = cfg.rope.dim;
        let (q, k, v) = self.qkv(layer, h)?;
        let (sinks, o_proj) = match &layer.attn {
            Attn::Standard { sinks, o, .. } => (sinks.as_deref(), o),
            Attn::Mla { o, .. } => (None, o),
        };
        let window = layer.window;
        let scale = cfg.attn.scale as f32;
        // Sequences are independent here (each has its own KV cache), so they run on rayon's
        // threads; every sequence's computation is the same whatever the thread count.
        let mut offsets = Vec::with_capacity(batch.len());
        let mut row = 0usize;
        for s in batch.iter() {
            offsets.push(row);
            row += s.tokens.len();
        }
        let outs = batch
            .par_iter_mut()
            .zip(ropes.par_iter())
            .zip(offsets.par_iter())
            .map(|((s, (cos, sin)), &row)| -> Result<Tensor> {
                let t = s.tokens.len();
                let heads = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.narrow(0, row, t)?
                        .transpose(0, 1)?
                        .contiguous()?
                        .unsqueeze(0)?)
                };
                // RoPE on the last `rope_dim` dimensions of each head.
                let rotate = |x: Tensor| -> Result<Tensor> {
                    let d = x.dim(D::Minus1)?;
                    if rope_dim == d {
                        return self.apply_rope(&x, cos, sin);
                    }
                    let pass = x.narrow(3, 0, d - rope_dim)?;
                    let rot = self.apply_rope(
                        &x.narrow(3, d - rope_dim, rope_dim)?.contiguous()?,
                        cos,
                        sin,
                    )?;
                    Ok(Tensor::cat(&[&pass, &rot], 3)?.contiguous()?)
                };
                let qs = rotate(heads(&q)?)?;
                let ks = rotate(heads(&k)?)?;
                let vs = heads(&v)?;
                let (ks, vs) = match (&s.state.k[l], &s.state.v[l]) {
                    (Some(pk), Some(pv)) => {
                        (Tensor::cat(&[pk, &ks], 2)?, Tensor::cat(&[pv, &vs], 2)?)
                    }
                    _ => (ks, vs),
                };
                s.state.k[l] = Some(ks.clone());
                s.state.v[l] = Some(vs.clone());
                let cached = ks.dim(2)?;
                // A prefill chunk inside the prompt span attends over `span` key slots (the
                // future ones zero and masked), as the one-shot prefill does.
                let span = s.state.prefill_span;
                let chunked = s.state.pos + t <= span && t < span;
                let (ks, vs, total) = if chunked && cached < span {
                    let kpad = Tensor::zeros((1, nkv, span - cached, hd), ks.dtype(), ks.device())?;
                    let vpad = Tensor::zeros((1, nkv, span - cached, vd), vs.dtype(), vs.device())?;
                    (
                        Tensor::cat(&[&ks, &kpad], 2)?,
                        Tensor::cat(&[&vs, &vpad], 2)?,
                        span,
                    )
                } else {
                    (ks, vs, cached)
                };
                let rep = nh / nkv;
                let expand = |x: Tensor, d: usize| -> Result<Tensor> {
                    if rep == 1 {
                        return Ok(x);
                    }
                    Ok(x.unsqueeze(2)?
                        .expand((1, nkv, rep, total, d))?
                        .reshape((1, nh, total, d))?)
                };
                let ks = expand(ks, hd)?;
                let vs = expand(vs, vd)?;
                // As transformers' eager attention: scores in the compute dtype, multiplied by the
                // scale (computed in f32 and rounded once, like torch's reduced-precision
                // multiplication by a scalar), mask added, softmax in f32, cast back.
                // A chunk's queries are padded with zero rows so that candle's matmuls take the
                // same kernel as in the one-shot prefill (gemm picks its kernel from the shape:
                // a single row, or at most 16×16 outputs, use other reduction orders); the padded
                // rows are dropped after attention.
                let rows = if chunked {
                    let mut m = t.max(2);
                    if total * total > 256 {
                        m = m.max(256 / total + 1);
                    }
                    m.min(total)
                } else {
                    t
                };
                let qs = if rows > t {
                    let pad = Tensor::zeros((1, nh, rows - t, hd), qs.dtype(), qs.device())?;
                    Tensor::cat(&[&qs, &pad], 2)?
                } else {
                    qs
                };
                let scale_t = Tensor::new(scale, &self.device)?;
                let mut scores = qs
                    .matmul(&ks.t()?)?
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&scale_t)?
                    .to_dtype(self.dtype)?;
                let past = cached - t;
                let windowed = window.is_some_and(|w| w < total);
                if t > 1 || chunked || windowed {
                    // Rows at and after `t` are padding (never masked, dropped below).
                    let mask: Vec<f32> = (0..rows)
                        .flat_map(|i| {
                            (0..total).map(move |j| {
                                let visible =
                                    j <= past + i && window.is_none_or(|w| past + i - j < w);
                                if i >= t || visible {
                                    0.0
                                } else {
                                    f32::NEG_INFINITY
                                }
                            })
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (rows, total), &self.device)?
                        .to_dtype(self.dtype)?;
                    scores = scores.broadcast_add(&mask)?;
                }
                let scores = scores.to_dtype(DType::F32)?;
                let probs = match sinks {
                    None => candle_nn::ops::softmax_last_dim(&scores)?,
                    Some(sinks) => {
                        // GPT-OSS: each head's sink logit joins the softmax and is dropped.
                        let sink = Tensor::from_vec(sinks.to_vec(), (1, nh, 1, 1), &self.device)?
                            .broadcast_as((1, nh, rows, 1))?;
                        let all = Tensor::cat(&[&scores, &sink], 3)?;
                        // transformers subtracts each row's maximum in the compute dtype before
                        // the softmax (one more rounding in bf16 / f16); in f32 this is the
                        // softmax's own first step, so f32 is left as it was.
                        let all = if self.dtype == DType::F32 {
                            all
                        } else {
                            let a = all.to_dtype(self.dtype)?;
                            a.broadcast_sub(&a.max_keepdim(3)?)?.to_dtype(DType::F32)?
                        };
                        candle_nn::ops::softmax_last_dim(&all.contiguous()?)?.narrow(3, 0, total)?
                    }
                }
                .to_dtype(self.dtype)?;
                let o = probs.contiguous()?.matmul(&vs.contiguous()?)?; // [1, nh, rows, vd]
                let o = if rows > t { o.narrow(2, 0, t)? } else { o };
                Ok(o.squeeze(0)?.transpose(0, 1)?.reshape((t, nh * vd))?)
            })
            .collect::<Result<Vec<_>>>()?;
        let o = Tensor::cat(&outs, 0)?;
        o_proj.forward(&o)
    }

    fn expert_weights(&self, block: &MoeBlock, e: usize) -> Result<[Tensor; 3]> {
        let i = self.cfg.intermediate_size;
        let [g, u, d] = match &block.experts {
            Experts::PerExpert(v) => v[e].clone(),
            Experts::Fused { gate_up, down } => {
                let gu = gate_up.get(e)?;
                [gu.narrow(0, 0, i)?, gu.narrow(0, i, i)?, down.get(e)?]
            }
            Experts::PerExpertMapped(v) => [
                v[e][0].to_tensor(&self.device)?,
                v[e][1].to_tensor(&self.device)?,
                v[e][2].to_tensor(&self.device)?,
            ],
            Experts::FusedMapped { gate_up, down } => {
                let gu = gate_up.to_tensor(&self.device)?.get(e)?;
                [
                    gu.narrow(0, 0, i)?,
                    gu.narrow(0, i, i)?,
                    down.to_tensor(&self.device)?.get(e)?,
                ]
            }
            Experts::Biased { gate, up, down, .. } => [gate.get(e)?, up.get(e)?, down.get(e)?],
            Experts::BiasedMapped(b) => {
                let (gate_up, down) = (&b.gate_up, &b.down);
                // Expert e's slices of the stored layout, transposed and de-interleaved.
                let h = self.cfg.hidden_size;
                let slice = |m: &MappedTensor, shape: [usize; 2]| -> Result<Tensor> {
                    let size = m.dtype.size_in_bytes();
                    let len = shape[0] * shape[1] * size;
                    let bytes = m.bytes().get(e * len..(e + 1) * len).ok_or_else(|| {
                        ModelError::InvalidArgument(format!("expert {e} outside {:?}", m.shape))
                    })?;
                    Ok(Tensor::from_raw_buffer(
                        bytes,
                        m.dtype,
                        &shape,
                        &self.device,
                    )?)
                };
                let gu = slice(gate_up, [h, 2 * i])?.t()?.contiguous()?; // [2I, H]
                let gu = gu.reshape((i, 2, h))?;
                [
                    gu.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?,
                    gu.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?,
                    slice(down, [i, h])?.t()?.contiguous()?,
                ]
            }
            Experts::Quantized(_) | Experts::Mxfp4(_) => {
                return Err(ModelError::InvalidArgument(
                    "quantised experts are multiplied in place, never dequantised".into(),
                ))
            }
        };
        let conv = |w: Tensor| -> Result<Tensor> {
            Ok(if w.dtype() == self.dtype {
                w
            } else {
                w.to_dtype(self.dtype)?
            })
        };
        Ok([conv(g)?, conv(u)?, conv(d)?])
    }

    /// Router logits `[n, E]` in f32 (router bias included).
    fn router_logits(&self, block: &MoeBlock, h: &Tensor) -> Result<Tensor> {
        let logits = match (&block.router_f32, &block.router_bias) {
            (Some(w), b) => {
                let l = matmul_t(&h.to_dtype(DType::F32)?, w)?;
                match b {
                    Some(b) => l.broadcast_add(&b.to_dtype(DType::F32)?)?,
                    None => l,
                }
            }
            // GPT-OSS's router is a biased linear: bias added to the f32 accumulators, one
            // rounding to the compute dtype (as [`Linear::forward`]).
            (None, Some(b)) => matmul_t_f32(h, &block.router)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .to_dtype(h.dtype())?,
            (None, None) => matmul_t(h, &block.router)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn moe(
        &self,
        l: usize,
        block: &MoeBlock,
        h: &Tensor,
        wants_probs: bool,
        mask: Option<&[bool]>,
    ) -> Result<(Tensor, LayerRouting)> {
        let (n_tok, hidden) = h.dims2()?;
        let ne = self.cfg.num_experts;
        let k = self.cfg.num_experts_per_tok;
        let mut logits_t = self.router_logits(block, h)?;
        let mut logits = logits_t.flatten_all()?.to_vec1::<f32>()?;
        // NaN / infinite router logits (a -inf logit alone gives a finite 0 probability, also
        // refused): never route on them. Checked before masking, whose -inf are intended.
        let bad_logit_row = logits
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| i / ne.max(1));
        if let (Some(m), None) = (mask, bad_logit_row) {
            for row in logits.chunks_mut(ne.max(1)) {
                for (x, &m) in row.iter_mut().zip(m) {
                    if m {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            logits_t = Tensor::from_vec(logits.clone(), (n_tok, ne), logits_t.device())?;
        }
        let scores_t = match self.cfg.moe.router.scores() {
            "sigmoid" => candle_nn::ops::sigmoid(&logits_t)?,
            _ => candle_nn::ops::softmax_last_dim(&logits_t)?,
        };
        let probs = scores_t.flatten_all()?.to_vec1::<f32>()?;
        let non_finite_row = probs
            .iter()
            .position(|p| !p.is_finite())
            .map(|i| i / ne.max(1))
            .or(bad_logit_row);
        if let Some(row) = non_finite_row {
            let empty = LayerRouting {
                layer: l as u32,
                experts: Vec::new(),
                weights: Vec::new(),
                probs: Vec::new(),
                non_finite_row: Some(row),
            };
            return Ok((h.clone(), empty));
        }
        let params = RouterParams {
            kind: self.cfg.moe.router,
            top_k: k,
            norm_topk_prob: self.cfg.norm_topk_prob,
            record_probabilities: self.cfg.moe.record_probabilities,
            score_bias: block.score_bias.as_deref(),
        };
        let mut experts = Vec::with_capacity(n_tok * k);
        let mut weights = Vec::with_capacity(n_tok * k);
        // Per expert: (token row, combination weight).
        let mut groups: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); ne];
        let mut order: Vec<u32> = Vec::with_capacity(ne);
        for r in 0..n_tok {
            let span = r * ne..(r + 1) * ne;
            let tr = route_masked(
                &params,
                &logits[span.clone()],
                &probs[span],
                mask,
                &mut order,
            );
            for (j, &x) in tr.experts.iter().enumerate() {
                experts.push(x);
                weights.push(tr.recorded[j]);
                groups[x as usize].0.push(r as u32);
                groups[x as usize].1.push(tr.applied[j]);
            }
        }
        let routing = LayerRouting {
            layer: l as u32,
            experts,
            weights,
            probs: if wants_probs { probs } else { Vec::new() },
            non_finite_row: None,
        };
        let routed = self.routed_experts(block, h, groups, hidden)?;
        let mut out = routed;
        if let Some(shared) = &block.shared {
            let mut s = shared.forward(h)?;
            if let Some(gate) = &block.shared_gate {
                // sigmoid evaluated in f32 and rounded once, as torch's reduced-precision kernel
                // (candle's bf16 sigmoid rounds exp, the sum and the reciprocal separately).
                let g = gate.forward(h)?;
                let g = candle_nn::ops::sigmoid(&g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?;
                s = s.broadcast_mul(&g)?;
            }
            out = (out + s)?;
        }
        Ok((out, routing))
    }

    /// `Σ_e w_e · expert_e(x)` over each token's chosen experts, in expert-index order.
    fn routed_experts(
        &self,
        block: &MoeBlock,
        h: &Tensor,
        groups: Vec<(Vec<u32>, Vec<f32>)>,
        hidden: usize,
    ) -> Result<Tensor> {
        let n_tok = h.dim(0)?;
        let swiglu = matches!(self.cfg.moe.activation, Activation::SwiGlu);
        let raw_quant = matches!(&block.experts, Experts::Quantized(q) if q.raw_slices());
        if swiglu
            && MoeAccumulator::supports(h)
            && (raw_quant
                || !matches!(
                    block.experts,
                    Experts::Biased { .. }
                        | Experts::BiasedMapped(_)
                        | Experts::Quantized(_)
                        | Experts::Mxfp4(_)
                ))
        {
            let mut acc = MoeAccumulator::new(h, self.cfg.intermediate_size)?
                .round_weights(self.cfg.moe.weights_in_compute_dtype);
            let (ii, hh) = (self.cfg.intermediate_size, hidden);
            let active: Vec<usize> = (0..groups.len())
                .filter(|&e| !groups[e].0.is_empty())
                .collect();
            // Weights that are not read in place: the experts' tensors (views, no copies).
            let owned: Vec<[Tensor; 3]> = match &block.experts {
                Experts::Quantized(_)
                | Experts::PerExpertMapped(_)
                | Experts::FusedMapped { .. } => Vec::new(),
                _ => active
                    .iter()
                    .map(|&e| self.expert_weights(block, e))
                    .collect::<Result<_>>()?,
            };
            let mut calls = Vec::with_capacity(active.len());
            for (j, &e) in active.iter().enumerate() {
                let (rows, ws) = &groups[e];
                let w = match &block.experts {
                    Experts::Quantized(q) => {
                        let Some([g, u, d]) = q.matrices(e)? else {
                            return Err(ModelError::InvalidArgument(format!(
                                "expert {e}: quantised blocks not readable in place"
                            )));
                        };
                        [WSrc::Quant(g), WSrc::Quant(u), WSrc::Quant(d)]
                    }
                    Experts::PerExpertMapped(v) => {
                        let [g, u, d] = &v[e];
                        [
                            WSrc::Mapped(g, 0, ii * hh),
                            WSrc::Mapped(u, 0, ii * hh),
                            WSrc::Mapped(d, 0, hh * ii),
                        ]
                    }
                    Experts::FusedMapped { gate_up, down } => {
                        let o = e * 2 * ii * hh;
                        [
                            WSrc::Mapped(gate_up, o, ii * hh),
                            WSrc::Mapped(gate_up, o + ii * hh, ii * hh),
                            WSrc::Mapped(down, e * hh * ii, hh * ii),
                        ]
                    }
                    _ => {
                        let [wg, wu, wd] = &owned[j];
                        [WSrc::Tensor(wg), WSrc::Tensor(wu), WSrc::Tensor(wd)]
                    }
                };
                calls.push(ExpertCall { rows, ws, w });
            }
            acc.add_experts(calls)?;
            return Ok(acc.finish(&self.device)?);
        }
        // Other devices and activations: the same computation with candle ops.
        let mut acc = Tensor::zeros((n_tok, hidden), self.dtype, &self.device)?;
        for (e, (rows, ws)) in groups.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, &self.device)?;
            let xe = h.index_select(&idx, 0)?;
            let quant = match &block.experts {
                Experts::Quantized(q) => Some(q),
                _ => None,
            };
            let mx = match &block.experts {
                Experts::Mxfp4(m) => Some(m),
                _ => None,
            };
            // GPT-OSS experts read in place: [H, 2I] and [I, H] slices of expert e.
            let (ii, hh) = (self.cfg.intermediate_size, hidden);
            let mapped = match &block.experts {
                Experts::BiasedMapped(b) => Some((&b.gate_up, &b.down)),
                _ => None,
            };
            let (mut g, mut u, wd) = match (quant, mx, mapped) {
                (Some(q), _, _) => (
                    q.project(Proj::Gate, e, &xe)?,
                    q.project(Proj::Up, e, &xe)?,
                    None,
                ),
                (None, Some(m), _) => {
                    let (g, u) = m.gate_up(e, &xe)?;
                    (g, u, None)
                }
                (None, None, Some((gu, _))) => {
                    // Gate / up interleaved: even columns gate, odd columns up.
                    let y = xw_mapped(&xe, gu, e * hh * 2 * ii, hh, 2 * ii)?.reshape((n, ii, 2))?;
                    (
                        y.narrow(2, 0, 1)?.squeeze(2)?,
                        y.narrow(2, 1, 1)?.squeeze(2)?,
                        None,
                    )
                }
                (None, None, None) => {
                    let [wg, wu, wd] = self.expert_weights(block, e)?;
                    (matmul_t(&xe, &wg)?, matmul_t(&xe, &wu)?, Some(wd))
                }
            };
            let biases = match &block.experts {
                Experts::Biased {
                    gate_b,
                    up_b,
                    down_b,
                    ..
                } => Some((gate_b.get(e)?, up_b.get(e)?, down_b.get(e)?)),
                Experts::BiasedMapped(b) => {
                    Some((b.gate_b.get(e)?, b.up_b.get(e)?, b.down_b.get(e)?))
                }
                Experts::Quantized(q) => q.biases(e)?,
                Experts::Mxfp4(m) => m.biases(e)?,
                _ => None,
            };
            if let Some((gb, ub, _)) = &biases {
                g = g.broadcast_add(gb)?;
                u = u.broadcast_add(ub)?;
            }
            let act = match self.cfg.moe.activation {
                // silu evaluated in f32 and rounded once (torch's reduced-precision kernels do
                // the same; candle's bf16 silu would round every intermediate).
                Activation::SwiGlu => {
                    (candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(self.dtype)? * u)?
                }
                Activation::GptOssClamped { limit, alpha } => {
                    let g = g.clamp(f64::NEG_INFINITY, limit)?;
                    let u = u.clamp(-limit, limit)?;
                    // As torch in bf16 / f16: `gate * alpha` with alpha in f32 and one rounding,
                    // the sigmoid in f32 and one rounding (candle's reduced-precision affine
                    // and sigmoid round alpha and every intermediate); f32 is unchanged.
                    let ga = scale_like_torch(&g, alpha)?;
                    let sig =
                        candle_nn::ops::sigmoid(&ga.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?;
                    let glu = (&g * sig)?;
                    ((u + 1.0)? * glu)?
                }
            };
            let mut y = match (&wd, quant, mx, mapped) {
                (Some(wd), _, _, _) => matmul_t(&act, wd)?,
                (None, Some(q), _, _) => q.project(Proj::Down, e, &act)?,
                (None, None, Some(m), _) => m.down(e, &act)?,
                (None, None, None, Some((_, d))) => xw_mapped(&act, d, e * ii * hh, ii, hh)?,
                (None, None, None, None) => {
                    return Err(ModelError::InvalidArgument(format!(
                        "expert {e} has no down projection"
                    )))
                }
            };
            if let Some((_, _, db)) = &biases {
                y = y.broadcast_add(db)?;
            }
            let w = Tensor::from_vec(ws, (n, 1), &self.device)?;
            let y = if self.cfg.moe.weights_in_compute_dtype {
                y.broadcast_mul(&w.to_dtype(self.dtype)?)?
            } else {
                y.to_dtype(DType::F32)?
                    .broadcast_mul(&w)?
                    .to_dtype(self.dtype)?
            };
            acc = acc.index_add(&idx, &y, 0)?;
        }
        Ok(acc)
    }
}

/// Loads (or maps) the routed experts of MoE layer `l`.
fn load_experts(
    cfg: &ModelConfig,
    store: &WeightStore,
    opts: &LoadOptions,
    dtype: DType,
    l: usize,
    layout: ExpertLayout,
) -> Result<Experts> {
    let f = cfg.family;
    let dev = &opts.device;
    let (e, i, h) = (cfg.num_experts, cfg.intermediate_size, cfg.hidden_size);
    // On the CPU, experts stored in the compute dtype (bf16 / f16) stay in the mapping.
    let map = |name: &str, shape: &[usize]| -> Result<Option<MappedTensor>> {
        if dev.is_cpu() && opts.map_experts {
            store.map(name, shape, dtype)
        } else {
            Ok(None)
        }
    };
    if layout == ExpertLayout::Fused {
        let gu_key = weight_name(f, Role::FusedGateUp(l));
        let down_key = weight_name(f, Role::FusedDown(l));
        if crate::mxfp4::Mxfp4Experts::present(cfg, store, l) {
            return Ok(Experts::Mxfp4(Box::new(crate::mxfp4::Mxfp4Experts::load(
                cfg, store, l, dtype, dev,
            )?)));
        }
        if crate::families::fused_transposed(f) {
            // GPT-OSS: [E, H, 2I] with gate / up interleaved on the last axis, [E, I, H].
            // Left in the mapping where it can be (multiplied in the stored layout).
            if let (Some(gate_up), Some(down)) =
                (map(&gu_key, &[e, h, 2 * i])?, map(&down_key, &[e, i, h])?)
            {
                let gub = store.load(
                    &bias_name(f, Role::FusedGateUp(l)),
                    &[e, 2 * i],
                    Some(dtype),
                    dev,
                )?;
                let gub = gub.reshape((e, i, 2))?;
                return Ok(Experts::BiasedMapped(Box::new(MappedBiased {
                    gate_up,
                    down,
                    gate_b: gub.narrow(2, 0, 1)?.squeeze(2)?.contiguous()?,
                    up_b: gub.narrow(2, 1, 1)?.squeeze(2)?.contiguous()?,
                    down_b: store.load(
                        &bias_name(f, Role::FusedDown(l)),
                        &[e, h],
                        Some(dtype),
                        dev,
                    )?,
                })));
            }
            let gu = store.load(&gu_key, &[e, h, 2 * i], Some(dtype), dev)?;
            let gu = gu.transpose(1, 2)?.contiguous()?; // [E, 2I, H]
            let gu = gu.reshape((e, i, 2, h))?;
            let gate = gu.narrow(2, 0, 1)?.squeeze(2)?.contiguous()?;
            let up = gu.narrow(2, 1, 1)?.squeeze(2)?.contiguous()?;
            let down = store
                .load(&down_key, &[e, i, h], Some(dtype), dev)?
                .transpose(1, 2)?
                .contiguous()?;
            let gub = store.load(
                &bias_name(f, Role::FusedGateUp(l)),
                &[e, 2 * i],
                Some(dtype),
                dev,
            )?;
            let gub = gub.reshape((e, i, 2))?;
            return Ok(Experts::Biased {
                gate,
                up,
                down,
                gate_b: gub.narrow(2, 0, 1)?.squeeze(2)?.contiguous()?,
                up_b: gub.narrow(2, 1, 1)?.squeeze(2)?.contiguous()?,
                down_b: store.load(&bias_name(f, Role::FusedDown(l)), &[e, h], Some(dtype), dev)?,
            });
        }
        return Ok(
            match (map(&gu_key, &[e, 2 * i, h])?, map(&down_key, &[e, h, i])?) {
                (Some(gate_up), Some(down)) => Experts::FusedMapped { gate_up, down },
                _ => Experts::Fused {
                    gate_up: store.load(&gu_key, &[e, 2 * i, h], None, dev)?,
                    down: store.load(&down_key, &[e, h, i], None, dev)?,
                },
            },
        );
    }
    let names = |x: usize| {
        [
            (weight_name(f, Role::Expert(l, x, Proj::Gate)), [i, h]),
            (weight_name(f, Role::Expert(l, x, Proj::Up)), [i, h]),
            (weight_name(f, Role::Expert(l, x, Proj::Down)), [h, i]),
        ]
    };
    let mut mapped = Vec::with_capacity(e);
    for x in 0..e {
        let [g, u, d] = names(x);
        match (map(&g.0, &g.1)?, map(&u.0, &u.1)?, map(&d.0, &d.1)?) {
            (Some(g), Some(u), Some(d)) => mapped.push([g, u, d]),
            _ => break,
        }
    }
    if mapped.len() == e {
        return Ok(Experts::PerExpertMapped(mapped));
    }
    let mut v = Vec::with_capacity(e);
    for x in 0..e {
        let [g, u, d] = names(x);
        v.push([
            store.load(&g.0, &g.1, None, dev)?,
            store.load(&u.0, &u.1, None, dev)?,
            store.load(&d.0, &d.1, None, dev)?,
        ]);
    }
    Ok(Experts::PerExpert(v))
}
