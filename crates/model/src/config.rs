//! `config.json` and `generation_config.json` of a Hugging Face checkpoint directory.
//!
//! Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) spellings are
//! accepted. Options that change the math and that this crate does not implement are rejected with
//! a clear error instead of being silently ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::limits::{checked_product, config_limits, MAX_LAYER_EXPERTS};

/// Model types this build can run.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["olmoe"];

/// The OLMoE architecture hyper-parameters (transformers' `OlmoeConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct OlmoeConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
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
}

impl OlmoeConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
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
        match obj.get("model_type") {
            None | Some(Value::Null) => {
                return Err(ModelError::UnsupportedModel {
                    path: path.to_path_buf(),
                    message: "no `model_type` field".into(),
                    supported,
                })
            }
            Some(Value::String(t)) if SUPPORTED_MODEL_TYPES.contains(&t.as_str()) => {}
            Some(other) => {
                return Err(ModelError::UnsupportedModel {
                    path: path.to_path_buf(),
                    message: format!("unsupported model_type {other}"),
                    supported,
                })
            }
        }
        let r = Reader { obj, path };
        let hidden_act = r.string_or("hidden_act", "silu")?;
        if hidden_act != "silu" {
            return Err(r.unsupported(format!("hidden_act `{hidden_act}` (only `silu`)")));
        }
        let num_attention_heads = r.usize_req("num_attention_heads")?;
        let rope_theta = r.rope_theta()?;
        let cfg = OlmoeConfig {
            vocab_size: r.usize_req("vocab_size")?,
            hidden_size: r.usize_req("hidden_size")?,
            intermediate_size: r.usize_req("intermediate_size")?,
            num_hidden_layers: r.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: r
                .usize_opt("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            attention_bias: r.bool_or("attention_bias", false)?,
            clip_qkv: r.f64_opt("clip_qkv")?,
            num_experts: r.usize_req("num_experts")?,
            num_experts_per_tok: r.usize_req("num_experts_per_tok")?,
            norm_topk_prob: r.bool_or("norm_topk_prob", false)?,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            torch_dtype: match obj.get("dtype").or_else(|| obj.get("torch_dtype")) {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            eos_token_id: token_ids(obj.get("eos_token_id"), path, "eos_token_id")?,
            pad_token_id: token_ids(obj.get("pad_token_id"), path, "pad_token_id")?
                .first()
                .copied(),
            bos_token_id: token_ids(obj.get("bos_token_id"), path, "bos_token_id")?
                .first()
                .copied(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    // `%` instead of `is_multiple_of` keeps the workspace MSRV (1.85).
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
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
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
        if self.num_hidden_layers.saturating_mul(self.num_experts) > MAX_LAYER_EXPERTS {
            return bad(format!(
                "`num_hidden_layers` × `num_experts` = {} × {} exceeds the limit of {MAX_LAYER_EXPERTS}",
                self.num_hidden_layers, self.num_experts
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("`max_position_embeddings` must be positive".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
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
        let (h, i, e) = (self.hidden_size, self.intermediate_size, self.num_experts);
        let kv = self.num_key_value_heads.checked_mul(self.head_dim())?;
        let embed = checked_product(&[self.vocab_size, h])?;
        let attn = checked_product(&[h, h])?
            .checked_mul(2)?
            .checked_add(checked_product(&[kv, h])?.checked_mul(2)?)?;
        let experts = checked_product(&[e, 3, i, h])?;
        let layer = attn
            .checked_add(experts)?
            .checked_add(checked_product(&[e, h])?)?
            .checked_add(checked_product(&[h, 4])?)?;
        checked_product(&[layer, self.num_hidden_layers])?
            .checked_add(checked_product(&[embed, 2])?)?
            .checked_add(h)
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

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn unsupported(&self, message: String) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            message,
        }
    }
    fn wrong(&self, key: &str, what: &str, v: &Value) -> ModelError {
        ModelError::invalid(self.path, format!("`{key}` must be {what}, found {v}"))
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| {
            ModelError::invalid(self.path, format!("missing required field `{key}`"))
        })
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }
    fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// RoPE base frequency from `rope_parameters` (transformers 5.x) or `rope_theta` +
    /// `rope_scaling` (4.x). Only the default (unscaled) RoPE is implemented.
    fn rope_theta(&self) -> Result<f64> {
        let mut theta = self.f64_opt("rope_theta")?;
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
            if rope_type != "default" {
                return Err(self.unsupported(format!(
                    "`{key}` rope_type `{rope_type}` (only `default` RoPE is implemented)"
                )));
            }
            if let Some(t) = params.get("rope_theta") {
                theta = Some(
                    t.as_f64()
                        .ok_or_else(|| self.wrong("rope_parameters.rope_theta", "a number", t))?,
                );
            }
        }
        Ok(theta.unwrap_or(10000.0))
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
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
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
pub fn eos_token_ids(cfg: &OlmoeConfig, gen: Option<&GenerationDefaults>) -> Vec<u32> {
    match gen {
        Some(g) if !g.eos_token_id.is_empty() => g.eos_token_id.clone(),
        _ => cfg.eos_token_id.clone(),
    }
}
