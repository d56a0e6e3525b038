//! `config.json` and `generation_config.json` of a Hugging Face checkpoint directory.
//!
//! Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) spellings are
//! accepted. Options that change the math and that this crate does not implement are rejected with
//! a clear error instead of being silently ignored.

use std::path::{Path, PathBuf};

use moe_xray_trace::RoutingLayout;
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::limits::{checked_product, config_limits, MAX_INTERMEDIATE_SIZE, MAX_LAYER_EXPERTS};

/// Model types this build can run (transformers' `model_type`).
pub const SUPPORTED_MODEL_TYPES: &[&str] = crate::families::SUPPORTED;

/// Which transformers modeling file a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Olmoe,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
    GraniteMoe,
}

impl Family {
    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Olmoe => "olmoe",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
            Family::GraniteMoe => "granitemoe",
        }
    }
}

/// q/k normalisation inside attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over the whole projected q (`[heads·head_dim]`) and k (OLMoE).
    Full,
    /// RMSNorm over each head's `head_dim` values, before RoPE (Qwen3-MoE).
    PerHead,
}

/// Multi-head latent attention (DeepSeek-V2/V3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaSpec {
    /// `None`: q is one projection `q_proj`; otherwise `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// eps of `q_a_layernorm` / `kv_a_layernorm` (1e-6 in transformers, whatever `rms_norm_eps`).
    pub lora_norm_eps: f64,
}

/// Attention of one family.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnSpec {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// OLMoE's `clip_qkv`.
    pub clip_qkv: Option<f64>,
    /// A learned per-head sink logit joins every softmax (GPT-OSS `self_attn.sinks`).
    pub sinks: bool,
    /// Softmax scale applied to q·k (`head_dim^-0.5`, Granite's `attention_multiplier`, DeepSeek's
    /// YaRN-corrected scale).
    pub scale: f64,
    pub mla: Option<MlaSpec>,
    /// Sliding window per decoder layer: a window of W lets a token see itself and the W−1
    /// tokens before it.
    pub sliding_window: Vec<Option<usize>>,
}

/// YaRN RoPE scaling (transformers' `_compute_yarn_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnSpec {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// Rotary position embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// Number of rotated dimensions per head (head_dim, or DeepSeek's `qk_rope_head_dim`).
    pub dim: usize,
    /// Pairs are (2i, 2i+1) (DeepSeek) instead of (i, i+dim/2).
    pub interleaved: bool,
    pub yarn: Option<YarnSpec>,
}

/// How a router turns logits into experts and coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// softmax over all experts (f32), top-k, optional renormalisation (OLMoE, Mixtral, Qwen).
    SoftmaxTopK,
    /// top-k of the logits, softmax over the k (GPT-OSS, Granite-MoE).
    TopKSoftmax,
    /// DeepSeek-V2: softmax scores, `greedy` or `group_limited_greedy` (group score = max),
    /// weights × `routed_scaling_factor`.
    DeepseekV2 {
        group_limited: bool,
        n_group: usize,
        topk_group: usize,
        routed_scaling_factor: f64,
    },
    /// DeepSeek-V3: sigmoid scores, choice by scores + `e_score_correction_bias`, groups ranked
    /// by the sum of their top-2 choice scores, optional renormalisation, × `routed_scaling_factor`.
    DeepseekV3 {
        n_group: usize,
        topk_group: usize,
        routed_scaling_factor: f64,
    },
}

impl RouterKind {
    /// Name recorded in the trace manifest.
    pub fn name(&self) -> &'static str {
        match self {
            RouterKind::SoftmaxTopK => "softmax_topk",
            RouterKind::TopKSoftmax => "topk_softmax",
            RouterKind::DeepseekV2 { .. } => "deepseek_v2",
            RouterKind::DeepseekV3 { .. } => "deepseek_v3",
        }
    }
    /// What the full score vector (`probs`) holds: "softmax" or "sigmoid".
    pub fn scores(&self) -> &'static str {
        match self {
            RouterKind::DeepseekV3 { .. } => "sigmoid",
            _ => "softmax",
        }
    }
}

/// Expert activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// GPT-OSS: gate clamped above at `limit`, up clamped to ±`limit`,
    /// `down((up + 1) * gate * sigmoid(alpha * gate))`.
    GptOssClamped { limit: f64, alpha: f64 },
}

/// The feed-forward parts of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub router: RouterKind,
    /// Router logits computed in f32 from f32-cast inputs and weights (DeepSeek).
    pub router_logits_f32: bool,
    pub router_bias: bool,
    /// DeepSeek-V3's `e_score_correction_bias` (kept in f32).
    pub score_correction_bias: bool,
    pub activation: Activation,
    /// Expert projections carry biases (GPT-OSS).
    pub expert_bias: bool,
    /// Per decoder layer: whether it is an MoE layer (else a dense MLP).
    pub moe_layers: Vec<bool>,
    /// Intermediate size of the dense layers' MLP.
    pub dense_intermediate_size: usize,
    /// Shared experts (always-on MLP added to the routed output).
    pub shared: Option<SharedSpec>,
    /// OLMoE: `weights` in the trace keep the full-softmax probability even when the applied
    /// coefficients are renormalised (the trace format's original meaning).
    pub record_probabilities: bool,
    /// Routing weights are rounded to the compute dtype before multiplying an expert's output
    /// (OLMoE, Qwen, Granite, GPT-OSS); Mixtral and DeepSeek multiply by the f32 weight.
    pub weights_in_compute_dtype: bool,
}

/// Shared experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedSpec {
    pub intermediate_size: usize,
    /// Number of shared experts (one fused MLP in checkpoints; recorded in the manifest).
    pub count: usize,
    /// Qwen2-MoE: output × sigmoid(`shared_expert_gate`(x)).
    pub gated: bool,
}

/// Granite's scalar multipliers (1 elsewhere).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Multipliers {
    pub embedding: f64,
    pub residual: f64,
    /// Output logits are divided by this.
    pub logits_scaling: f64,
}

impl Default for Multipliers {
    fn default() -> Self {
        Multipliers {
            embedding: 1.0,
            residual: 1.0,
            logits_scaling: 1.0,
        }
    }
}

/// The architecture hyper-parameters of a supported MoE family, read from `config.json`.
/// The flat fields are common to every family (their names are OLMoE's); the family-specific
/// parts are in `attn`, `rope`, `moe` and `multipliers`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Intermediate size of one routed expert.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head q/k dimension (for MLA: nope + rope dims).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub clip_qkv: Option<f64>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as written in the file (e.g. "bfloat16"), if any.
    pub torch_dtype: Option<String>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub attn: AttnSpec,
    pub rope: RopeSpec,
    pub moe: MoeSpec,
    pub multipliers: Multipliers,
}

/// The name this crate used when it ran OLMoE only.
pub type OlmoeConfig = ModelConfig;

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// transformers' `model_type`.
    pub fn model_type(&self) -> &'static str {
        self.family.model_type()
    }

    /// Dimension of the value vectors per head.
    pub fn v_head_dim(&self) -> usize {
        self.attn.mla.map_or(self.head_dim, |m| m.v_head_dim)
    }

    /// Decoder-layer indices with a router.
    pub fn moe_layer_indices(&self) -> Vec<u32> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.moe.moe_layers.get(l).copied().unwrap_or(true))
            .map(|l| l as u32)
            .collect()
    }

    /// Decoder-layer indices with a dense MLP.
    pub fn dense_layer_indices(&self) -> Vec<u32> {
        (0..self.num_hidden_layers)
            .filter(|&l| !self.moe.moe_layers.get(l).copied().unwrap_or(true))
            .map(|l| l as u32)
            .collect()
    }

    /// Reads and validates `<dir>/config.json`.
    /// A `.gguf` file (or one part of a split set) gives the configuration its metadata
    /// describes (`gguf::GgufFile::config`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return crate::gguf::GgufFile::open(dir)?.config();
        }
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::invalid(path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::invalid(path, "config is not a JSON object"))?;
        let supported = SUPPORTED_MODEL_TYPES.join(", ");
        let family = match obj.get("model_type") {
            None | Some(Value::Null) => {
                return Err(ModelError::UnsupportedModel {
                    path: path.to_path_buf(),
                    message: "no `model_type` field".into(),
                    supported,
                })
            }
            Some(Value::String(t)) => match crate::families::family_of(t) {
                Some(f) => f,
                None => {
                    return Err(ModelError::UnsupportedModel {
                        path: path.to_path_buf(),
                        message: format!("unsupported model_type \"{t}\""),
                        supported,
                    })
                }
            },
            Some(other) => {
                return Err(ModelError::UnsupportedModel {
                    path: path.to_path_buf(),
                    message: format!("unsupported model_type {other}"),
                    supported,
                })
            }
        };
        let r = Reader { obj, path };
        let cfg = crate::families::parse_config(family, &r)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The fields every family reads the same way (transformers' `PretrainedConfig` and the
    /// common decoder fields), with the family's defaults for the rest; the family parser
    /// overrides what differs.
    pub(crate) fn common(family: Family, r: &Reader<'_>) -> Result<Self> {
        let num_attention_heads = r.usize_req("num_attention_heads")?;
        let hidden_size = r.usize_req("hidden_size")?;
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 {
                    return Err(ModelError::invalid(
                        r.path,
                        "`num_attention_heads` must be positive",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_hidden_layers = r.usize_req("num_hidden_layers")?;
        if num_hidden_layers > crate::limits::MAX_LAYERS {
            return Err(ModelError::invalid(
                r.path,
                format!(
                    "`num_hidden_layers` = {num_hidden_layers} exceeds the limit of {} (see \
                     docs/trace-format.md, \"Limits\")",
                    crate::limits::MAX_LAYERS
                ),
            ));
        }
        let rope_theta = r.rope_theta()?;
        Ok(ModelConfig {
            family,
            vocab_size: r.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize_opt("intermediate_size")?.unwrap_or(0),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: r
                .usize_opt("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            attention_bias: r.bool_or("attention_bias", false)?,
            clip_qkv: None,
            num_experts: 0,
            num_experts_per_tok: r.usize_req("num_experts_per_tok")?,
            norm_topk_prob: false,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            torch_dtype: match r.obj.get("dtype").or_else(|| r.obj.get("torch_dtype")) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            eos_token_id: token_ids(r.obj.get("eos_token_id"), r.path, "eos_token_id")?,
            pad_token_id: token_ids(r.obj.get("pad_token_id"), r.path, "pad_token_id")?
                .first()
                .copied(),
            bos_token_id: token_ids(r.obj.get("bos_token_id"), r.path, "bos_token_id")?
                .first()
                .copied(),
            attn: AttnSpec {
                qkv_bias: false,
                o_bias: false,
                qk_norm: QkNorm::None,
                clip_qkv: None,
                sinks: false,
                scale: if head_dim == 0 {
                    1.0
                } else {
                    (head_dim as f64).powf(-0.5)
                },
                mla: None,
                sliding_window: vec![None; num_hidden_layers],
            },
            rope: RopeSpec {
                theta: rope_theta,
                dim: head_dim,
                interleaved: false,
                yarn: None,
            },
            moe: MoeSpec {
                router: RouterKind::SoftmaxTopK,
                router_logits_f32: false,
                router_bias: false,
                score_correction_bias: false,
                activation: Activation::SwiGlu,
                expert_bias: false,
                moe_layers: vec![true; num_hidden_layers],
                dense_intermediate_size: 0,
                shared: None,
                record_probabilities: false,
                weights_in_compute_dtype: true,
            },
            multipliers: Multipliers::default(),
        })
    }

    // `%` instead of `is_multiple_of` keeps the workspace MSRV.
    #[allow(clippy::manual_is_multiple_of)]
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(ModelError::invalid(path, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        for (name, limit) in config_limits() {
            let v = match name {
                "vocab_size" => self.vocab_size,
                "hidden_size" => self.hidden_size,
                "intermediate_size" => self.intermediate_size,
                "num_hidden_layers" => self.num_hidden_layers,
                "num_attention_heads" => self.num_attention_heads,
                "num_key_value_heads" => self.num_key_value_heads,
                "num_experts" => self.num_experts,
                _ => self.max_position_embeddings,
            };
            if v > limit {
                return bad(format!(
                    "`{name}` = {v} exceeds the limit of {limit} (see docs/trace-format.md, \"Limits\")"
                ));
            }
        }
        for (name, v) in [
            ("head_dim", self.head_dim),
            (
                "moe dense intermediate_size",
                self.moe.dense_intermediate_size,
            ),
            (
                "shared expert intermediate size",
                self.moe.shared.map_or(0, |s| s.intermediate_size),
            ),
        ] {
            if v > MAX_INTERMEDIATE_SIZE {
                return bad(format!(
                    "`{name}` = {v} exceeds the limit of {MAX_INTERMEDIATE_SIZE}"
                ));
            }
        }
        if self.num_hidden_layers.saturating_mul(self.num_experts) > MAX_LAYER_EXPERTS {
            return bad(format!(
                "`num_hidden_layers` × `num_experts` = {} × {} exceeds the limit of {MAX_LAYER_EXPERTS}",
                self.num_hidden_layers, self.num_experts
            ));
        }
        if self.attn.mla.is_none() && self.rope.dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rope.dim % 2 != 0 || self.rope.dim > self.head_dim {
            return bad(format!(
                "the rotary dimension {} must be even and at most head_dim {}",
                self.rope.dim, self.head_dim
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return bad(format!(
                "num_experts_per_tok {} exceeds num_experts {}",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_qkv {c} must be positive"));
            }
        }
        if !(self.attn.scale.is_finite() && self.attn.scale > 0.0) {
            return bad(format!(
                "the attention scale {} must be positive",
                self.attn.scale
            ));
        }
        for (name, v) in [
            ("embedding_multiplier", self.multipliers.embedding),
            ("residual_multiplier", self.multipliers.residual),
            ("logits_scaling", self.multipliers.logits_scaling),
        ] {
            if !(v.is_finite() && v != 0.0) {
                return bad(format!("`{name}` {v} must be finite and non-zero"));
            }
        }
        if let Some(w) = self.attn.sliding_window.iter().flatten().find(|&&w| w == 0) {
            return bad(format!("`sliding_window` {w} must be positive"));
        }
        match self.moe.router {
            RouterKind::DeepseekV2 {
                group_limited: true,
                n_group,
                topk_group,
                ..
            }
            | RouterKind::DeepseekV3 {
                n_group,
                topk_group,
                ..
            } => {
                if n_group == 0 || self.num_experts % n_group != 0 {
                    return bad(format!(
                        "`n_group` {n_group} must divide `n_routed_experts` {}",
                        self.num_experts
                    ));
                }
                if topk_group == 0 || topk_group > n_group {
                    return bad(format!(
                        "`topk_group` {topk_group} must be between 1 and `n_group` {n_group}"
                    ));
                }
                if topk_group * (self.num_experts / n_group) < self.num_experts_per_tok {
                    return bad(format!(
                        "`topk_group` {topk_group} groups of {} experts hold fewer than \
                         `num_experts_per_tok` {} experts",
                        self.num_experts / n_group,
                        self.num_experts_per_tok
                    ));
                }
                if matches!(self.moe.router, RouterKind::DeepseekV3 { .. })
                    && self.num_experts / n_group < 2
                {
                    return bad(format!(
                        "DeepSeek-V3 ranks groups by their top-2 scores: `n_group` {n_group} \
                         leaves fewer than 2 experts per group"
                    ));
                }
            }
            _ => {}
        }
        if self.moe.moe_layers.len() != self.num_hidden_layers
            || self.attn.sliding_window.len() != self.num_hidden_layers
        {
            return bad("per-layer settings do not cover `num_hidden_layers`".into());
        }
        if !self.moe.moe_layers.iter().any(|&m| m) {
            return bad("the configuration has no MoE layer".into());
        }
        if self.parameter_count().is_none() {
            return bad(format!(
                "the sizes (vocab_size {}, hidden_size {}, intermediate_size {}, num_hidden_layers {}, \
                 num_experts {}) multiply to more parameters than this machine can address",
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.num_experts
            ));
        }
        Ok(())
    }

    /// Number of parameters the configuration implies (checked arithmetic; `None` on overflow).
    pub fn parameter_count(&self) -> Option<usize> {
        crate::table::tensor_table(self, crate::table::ExpertLayout::Canonical)
            .ok()?
            .iter()
            .try_fold(0usize, |acc, t| acc.checked_add(checked_product(&t.shape)?))
    }
}

fn token_ids(v: Option<&Value>, path: &Path, key: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ModelError::invalid(path, format!("`{key}` must be a token id, found {x}"))
            })
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Typed access to the fields of a `config.json` object, with errors naming the file and field.
pub(crate) struct Reader<'a> {
    pub(crate) obj: &'a Map<String, Value>,
    pub(crate) path: &'a Path,
}

impl Reader<'_> {
    pub(crate) fn unsupported(&self, message: String) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            message,
        }
    }
    pub(crate) fn wrong(&self, key: &str, what: &str, v: &Value) -> ModelError {
        ModelError::invalid(self.path, format!("`{key}` must be {what}, found {v}"))
    }
    pub(crate) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }
    pub(crate) fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            ModelError::invalid(self.path, format!("missing required field `{key}`"))
        })
    }
    pub(crate) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }
    pub(crate) fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// RoPE base frequency from `rope_parameters` (transformers 5.x) or `rope_theta` +
    /// `rope_scaling` (4.x).
    pub(crate) fn rope_theta(&self) -> Result<f64> {
        Ok(self.rope()?.0)
    }

    /// RoPE base frequency and scaling from `rope_parameters` (transformers 5.x) or
    /// `rope_theta` + `rope_scaling` (4.x). The default RoPE and YaRN are implemented; other
    /// rope types are refused.
    pub(crate) fn rope(&self) -> Result<(f64, Option<YarnSpec>)> {
        let mut theta = self.f64_opt("rope_theta")?;
        let mut yarn = None;
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(v) = self.obj.get(key) else { continue };
            let params = match v {
                Value::Null => continue,
                Value::Object(m) => m,
                other => return Err(self.wrong(key, "an object or null", other)),
            };
            let rope_type = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let num = |name: &str| -> Result<Option<f64>> {
                match params.get(name) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => x
                        .as_f64()
                        .map(Some)
                        .ok_or_else(|| self.wrong(&format!("{key}.{name}"), "a number", x)),
                }
            };
            match rope_type {
                "default" => {}
                "yarn" => {
                    let factor = num("factor")?.ok_or_else(|| {
                        ModelError::invalid(
                            self.path,
                            format!("missing required field `{key}.factor` (YaRN)"),
                        )
                    })?;
                    if !(factor.is_finite() && factor >= 1.0) {
                        return Err(ModelError::invalid(
                            self.path,
                            format!("`{key}.factor` {factor} must be at least 1"),
                        ));
                    }
                    let original = match num("original_max_position_embeddings")? {
                        Some(o) if (1.0..=1e9).contains(&o) => o as usize,
                        Some(o) => {
                            return Err(ModelError::invalid(
                                self.path,
                                format!(
                                    "`{key}.original_max_position_embeddings` {o} must be a \
                                     positive integer"
                                ),
                            ))
                        }
                        None => self.usize_opt("max_position_embeddings")?.unwrap_or(4096),
                    };
                    let spec = YarnSpec {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: num("beta_fast")?.unwrap_or(32.0),
                        beta_slow: num("beta_slow")?.unwrap_or(1.0),
                        mscale: num("mscale")?,
                        mscale_all_dim: num("mscale_all_dim")?,
                        attention_factor: num("attention_factor")?,
                        truncate: match params.get("truncate") {
                            None | Some(Value::Null) => true,
                            Some(Value::Bool(b)) => *b,
                            Some(x) => {
                                return Err(self.wrong(&format!("{key}.truncate"), "a boolean", x))
                            }
                        },
                    };
                    for (name, v) in [("beta_fast", spec.beta_fast), ("beta_slow", spec.beta_slow)]
                    {
                        if !(v.is_finite() && v > 0.0) {
                            return Err(ModelError::invalid(
                                self.path,
                                format!("`{key}.{name}` {v} must be positive"),
                            ));
                        }
                    }
                    yarn = Some(spec);
                }
                other => {
                    return Err(self.unsupported(format!(
                        "`{key}` rope_type `{other}` (only `default` and `yarn` RoPE are implemented)"
                    )));
                }
            }
            if let Some(t) = params.get("rope_theta") {
                theta = Some(
                    t.as_f64()
                        .ok_or_else(|| self.wrong("rope_parameters.rope_theta", "a number", t))?,
                );
            }
        }
        Ok((theta.unwrap_or(10000.0), yarn))
    }
}

/// The parts of `generation_config.json` that matter for decoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

impl GenerationDefaults {
    /// Reads `<dir>/generation_config.json`; a missing file gives `Ok(None)`.
    /// For a `.gguf` file: the tokenizer metadata's ids.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        if crate::gguf::is_gguf(dir) {
            return Ok(Some(
                crate::gguf::GgufFile::open(dir)?.generation_defaults()?,
            ));
        }
        let path: PathBuf = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::invalid(&path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::invalid(&path, "not a JSON object"))?;
        Ok(Some(GenerationDefaults {
            eos_token_id: token_ids(obj.get("eos_token_id"), &path, "eos_token_id")?,
            pad_token_id: token_ids(obj.get("pad_token_id"), &path, "pad_token_id")?
                .first()
                .copied(),
            bos_token_id: token_ids(obj.get("bos_token_id"), &path, "bos_token_id")?
                .first()
                .copied(),
        }))
    }
}

/// EOS ids for decoding: `generation_config.json` wins over `config.json` (as in transformers).
pub fn eos_token_ids(cfg: &ModelConfig, gen: Option<&GenerationDefaults>) -> Vec<u32> {
    match gen {
        Some(g) if !g.eos_token_id.is_empty() => g.eos_token_id.clone(),
        _ => cfg.eos_token_id.clone(),
    }
}

/// What a record's `weights` hold when the family keeps OLMoE's original meaning
/// (`MoeSpec::record_probabilities`).
pub const WEIGHTS_FULL_SOFTMAX: &str = "full-softmax probability of each chosen expert (coefficients renormalised when norm_topk_prob)";
/// What a record's `weights` hold in every other family.
pub const WEIGHTS_APPLIED: &str = "coefficient applied to each routed expert's output";

/// The manifest's `routing` block for a checkpoint configuration: its family, the decoder-layer
/// indices of its MoE and dense layers, its shared experts (0 without), the router kind and what
/// `probs` (`scores`) and `weights` hold.
pub fn routing_layout(cfg: &ModelConfig) -> RoutingLayout {
    RoutingLayout {
        family: cfg.model_type().to_string(),
        moe_layers: cfg.moe_layer_indices(),
        dense_layers: cfg.dense_layer_indices(),
        num_shared_experts: cfg
            .moe
            .shared
            .map_or(0, |s| u32::try_from(s.count).unwrap_or(u32::MAX)),
        router: cfg.moe.router.name().to_string(),
        scores: cfg.moe.router.scores().to_string(),
        weights: if cfg.moe.record_probabilities {
            WEIGHTS_FULL_SOFTMAX
        } else {
            WEIGHTS_APPLIED
        }
        .to_string(),
        extra: Default::default(),
    }
}
