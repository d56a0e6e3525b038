//! The routing shape of a model: which decoder layers are MoE layers, how many routed experts,
//! top-k. Read from a Hugging Face `config.json`, or given explicitly.
//!
//! Engines index their routing arrays by decoder layer (`num_hidden_layers` rows; dense layers
//! hold whatever the buffer was initialised with, zeros in vLLM and SGLang). moe-xray numbers
//! MoE layers only, from 0. The MoE layers of a config:
//! - DeepSeek-V2/V3 style (`first_k_dense_replace`, `moe_layer_freq`): layer `i` is MoE iff
//!   `i >= first_k_dense_replace` and `i % moe_layer_freq == 0`;
//! - Qwen2/3-MoE style (`decoder_sparse_step`, `mlp_only_layers`): layer `i` is MoE iff `i` is not
//!   in `mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`;
//! - otherwise every layer (OLMoE, Mixtral, ...).
//!
//! Keys are looked up at the top level, then in `text_config` (multimodal wrappers).

use std::path::{Path, PathBuf};

use moe_xray_trace::RoutingLayout;
use serde_json::Value;

use crate::{ImportError, Result};

/// Upper limits on a config's sizes (far above any real model).
pub const MAX_LAYERS: usize = 4096;
pub const MAX_EXPERTS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Name recorded in the manifest (`_name_or_path`, `model_type` or the config's directory).
    pub model: String,
    /// Decoder layers (`num_hidden_layers`), or `None` when not known (no config).
    pub num_hidden_layers: Option<usize>,
    /// Decoder-layer indices of the MoE layers, ascending (None: every layer of the array).
    pub moe_layers: Option<Vec<usize>>,
    pub num_experts: usize,
    /// Experts per token, when known.
    pub top_k: Option<usize>,
    /// The config file it came from.
    pub source: Option<PathBuf>,
    /// The manifest's `routing` block (family, MoE / dense decoder layers, router kind), when the
    /// shape comes from a config. Records are then numbered by decoder layer and the manifest's
    /// `num_layers` is `num_hidden_layers`, as in moe-xray's own traces.
    pub routing: Option<RoutingLayout>,
    /// The configuration as moe-xray's model crate reads it, when it is a supported family with
    /// every field the model crate needs (`import hf` requires it; vLLM / SGLang imports use it
    /// for the routing block only).
    pub model_config: Option<Box<moe_xray_model::config::ModelConfig>>,
}

// The same block and texts as moe-xray's own traces: one definition, in the model crate.
pub use moe_xray_model::config::{routing_layout, WEIGHTS_APPLIED, WEIGHTS_FULL_SOFTMAX};

/// Router kind and score kind of a `model_type` (for configs the model crate cannot read in
/// full, e.g. a config holding only the routing fields).
fn router_of(model_type: &str) -> (&'static str, &'static str) {
    match model_type {
        "deepseek_v2" => ("deepseek_v2", "softmax"),
        "deepseek_v3" => ("deepseek_v3", "sigmoid"),
        "gpt_oss" | "granitemoe" => ("topk_softmax", "softmax"),
        "olmoe" | "mixtral" | "qwen2_moe" | "qwen3_moe" => ("softmax_topk", "softmax"),
        _ => ("unknown", "softmax"),
    }
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null()).or_else(|| {
        v.get("text_config")
            .and_then(|t| t.get(key))
            .filter(|x| !x.is_null())
    })
}

fn get_usize(path: &Path, v: &Value, key: &str, max: usize) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if (n as u128) <= max as u128 => Ok(Some(n as usize)),
            _ => Err(ImportError::invalid(
                path,
                format!("field {key}"),
                format!("expected an integer in 0..={max}, found {x}"),
            )),
        },
    }
}

impl ModelShape {
    /// Reads `config.json` (`path` may be the file or the directory holding it).
    pub fn from_config(path: &Path) -> Result<ModelShape> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let bytes = crate::npy::read_bounded(&file, 16 << 20)?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ImportError::invalid_file(&file, format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ImportError::invalid_file(
                &file,
                "config is not a JSON object",
            ));
        }
        let layers = get_usize(&file, &v, "num_hidden_layers", MAX_LAYERS)?
            .ok_or_else(|| ImportError::invalid_file(&file, "missing num_hidden_layers"))?;
        let mut experts = None;
        for key in ["num_experts", "n_routed_experts", "num_local_experts"] {
            if let Some(n) = get_usize(&file, &v, key, MAX_EXPERTS)? {
                experts = Some(n);
                break;
            }
        }
        let num_experts = experts.filter(|&n| n > 0).ok_or_else(|| {
            ImportError::invalid_file(
                &file,
                "no routed experts: none of num_experts / n_routed_experts / num_local_experts is a positive integer",
            )
        })?;
        let top_k = get_usize(&file, &v, "num_experts_per_tok", MAX_EXPERTS)?.or(get_usize(
            &file,
            &v,
            "moe_topk",
            MAX_EXPERTS,
        )?);
        if let Some(k) = top_k {
            if k == 0 || k > num_experts {
                return Err(ImportError::invalid_file(
                    &file,
                    format!("num_experts_per_tok = {k} must be in 1..={num_experts}"),
                ));
            }
        }
        let first_dense = get_usize(&file, &v, "first_k_dense_replace", MAX_LAYERS)?.unwrap_or(0);
        let freq = get_usize(&file, &v, "moe_layer_freq", MAX_LAYERS)?.unwrap_or(1);
        let step = get_usize(&file, &v, "decoder_sparse_step", MAX_LAYERS)?.unwrap_or(1);
        if freq == 0 || step == 0 {
            return Err(ImportError::invalid_file(
                &file,
                "moe_layer_freq and decoder_sparse_step must be at least 1",
            ));
        }
        let mut mlp_only = Vec::new();
        if let Some(x) = get(&v, "mlp_only_layers") {
            let arr = x.as_array().ok_or_else(|| {
                ImportError::invalid(&file, "field mlp_only_layers", "expected an array")
            })?;
            for e in arr {
                match e.as_u64() {
                    Some(n) if (n as usize) < layers => mlp_only.push(n as usize),
                    _ => {
                        return Err(ImportError::invalid(
                            &file,
                            "field mlp_only_layers",
                            format!("{e} is not a layer index below {layers}"),
                        ))
                    }
                }
            }
        }
        let moe: Vec<usize> = (0..layers)
            .filter(|&i| {
                i >= first_dense && i % freq == 0 && (i + 1) % step == 0 && !mlp_only.contains(&i)
            })
            .collect();
        if moe.is_empty() {
            return Err(ImportError::invalid_file(
                &file,
                "the config has no MoE layers",
            ));
        }
        let model = v
            .get("_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| {
                file.parent()
                    .map(|p| p.display().to_string())
                    .filter(|s| !s.is_empty())
            })
            .or_else(|| {
                v.get("model_type")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .or_else(|| {
                v.get("text_config")
                    .and_then(|t| t.get("model_type"))
                    .and_then(Value::as_str)
            })
            .unwrap_or("");
        let text = String::from_utf8_lossy(&bytes);
        let model_config = moe_xray_model::config::ModelConfig::from_json_str(&text, &file).ok();
        let routing = match &model_config {
            // The model crate's reading wins where both read the file (same rules; it also knows
            // the shared experts).
            Some(cfg) => {
                let r = routing_layout(cfg);
                if r.moe_layers.len() + r.dense_layers.len() != layers
                    || cfg.num_experts != num_experts
                {
                    return Err(ImportError::invalid_file(
                        &file,
                        "the model crate reads different layers or experts from this config",
                    ));
                }
                r
            }
            None => {
                let (router, scores) = router_of(model_type);
                let shared = get_usize(&file, &v, "n_shared_experts", MAX_EXPERTS)?.unwrap_or(0);
                let family: String = model_type.chars().take(64).collect();
                RoutingLayout {
                    family,
                    moe_layers: moe.iter().map(|&l| l as u32).collect(),
                    dense_layers: (0..layers)
                        .filter(|l| !moe.contains(l))
                        .map(|l| l as u32)
                        .collect(),
                    num_shared_experts: shared as u32,
                    router: router.into(),
                    scores: scores.into(),
                    weights: String::new(),
                    extra: Default::default(),
                }
            }
        };
        let moe: Vec<usize> = routing.moe_layers.iter().map(|&l| l as usize).collect();
        Ok(ModelShape {
            model,
            num_hidden_layers: Some(layers),
            moe_layers: Some(moe),
            num_experts,
            top_k,
            source: Some(file),
            routing: Some(routing),
            model_config: model_config.map(Box::new),
        })
    }

    /// A shape from explicit numbers (no config): every layer of the arrays is an MoE layer.
    pub fn explicit(
        num_experts: usize,
        num_layers: Option<usize>,
        top_k: Option<usize>,
    ) -> ModelShape {
        ModelShape {
            model: String::new(),
            num_hidden_layers: num_layers,
            moe_layers: None,
            num_experts,
            top_k,
            source: None,
            routing: None,
            model_config: None,
        }
    }

    /// Decoder-layer index written for the `row`-th MoE layer: the config's MoE layer with a
    /// routing block, `row` itself without.
    pub fn out_layer(&self, row: usize) -> usize {
        match (&self.routing, &self.moe_layers) {
            (Some(_), Some(moe)) => moe.get(row).copied().unwrap_or(row),
            _ => row,
        }
    }

    /// Number of MoE layers written (L of the output), given an array's layer dimension.
    pub fn layer_map(&self, array_layers: usize) -> std::result::Result<Vec<usize>, String> {
        match (&self.moe_layers, self.num_hidden_layers) {
            (Some(moe), Some(h)) => {
                if array_layers == h {
                    Ok(moe.clone())
                } else if array_layers == moe.len() {
                    Ok((0..moe.len()).collect())
                } else {
                    Err(format!(
                        "layer dimension {array_layers} matches neither num_hidden_layers = {h} nor the {} MoE layers of the config",
                        moe.len()
                    ))
                }
            }
            (_, Some(h)) if array_layers != h => Err(format!(
                "layer dimension {array_layers} differs from --num-layers {h}"
            )),
            _ => Ok((0..array_layers).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(json: &str) -> Result<ModelShape> {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), json).unwrap();
        ModelShape::from_config(d.path())
    }

    #[test]
    fn dense_layer_rules() {
        let ds = shape(r#"{"num_hidden_layers":6,"n_routed_experts":8,"num_experts_per_tok":2,"first_k_dense_replace":2,"moe_layer_freq":1}"#).unwrap();
        assert_eq!(ds.moe_layers.as_deref(), Some(&[2, 3, 4, 5][..]));
        assert_eq!((ds.num_experts, ds.top_k), (8, Some(2)));
        let qw = shape(r#"{"num_hidden_layers":6,"num_experts":4,"num_experts_per_tok":2,"decoder_sparse_step":2,"mlp_only_layers":[3]}"#).unwrap();
        assert_eq!(qw.moe_layers.as_deref(), Some(&[1, 5][..]));
        let ol =
            shape(r#"{"num_hidden_layers":3,"num_experts":4,"num_experts_per_tok":2}"#).unwrap();
        assert_eq!(ol.layer_map(3).unwrap(), vec![0, 1, 2]);
        assert_eq!(ds.layer_map(6).unwrap(), vec![2, 3, 4, 5]);
        assert_eq!(ds.layer_map(4).unwrap(), vec![0, 1, 2, 3]);
        assert!(ds
            .layer_map(5)
            .unwrap_err()
            .contains("num_hidden_layers = 6"));
        let mm = shape(r#"{"text_config":{"num_hidden_layers":2,"num_local_experts":4,"num_experts_per_tok":1}}"#).unwrap();
        assert_eq!((mm.num_experts, mm.moe_layers.unwrap().len()), (4, 2));
    }

    #[test]
    fn bad_configs_name_the_file() {
        for (json, needle) in [
            ("{", "invalid JSON"),
            (r#"{"num_experts":4}"#, "num_hidden_layers"),
            (r#"{"num_hidden_layers":2}"#, "no routed experts"),
            (
                r#"{"num_hidden_layers":2,"num_experts":4,"num_experts_per_tok":5}"#,
                "num_experts_per_tok = 5",
            ),
            (
                r#"{"num_hidden_layers":-1,"num_experts":4}"#,
                "num_hidden_layers",
            ),
            (
                r#"{"num_hidden_layers":2,"num_experts":4,"first_k_dense_replace":2}"#,
                "no MoE layers",
            ),
        ] {
            let e = shape(json).unwrap_err().to_string();
            assert!(
                e.contains("config.json") && e.contains(needle),
                "{json}: {e}"
            );
        }
    }
}
