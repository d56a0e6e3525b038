//! Hugging Face router logits (`output_router_logits=True`) → routing records, by the family's
//! own routing rule (`moe_xray_model::router::route`, the router moe-xray's capture uses).
//!
//! Accepted layout (docs/trace-format.md, "Importing routing from serving engines"): one tensor per MoE layer,
//! in decoder order, each `[batch * seq, num_experts]` (transformers' flattened tokens; `[batch,
//! seq, num_experts]` is accepted too), f32 / f16 / bf16 / f64:
//! - safetensors: tensors `router_logits.0`, `router_logits.1`, ... plus, optionally,
//!   `input_ids` and `attention_mask` (integer `[batch, seq]` or `[seq]`); other tensors are
//!   ignored;
//! - `.pt` (`torch.save`, read by the restricted pickle reader): a dict with `router_logits` (the
//!   tuple / list transformers returns) or keys `router_logits.{i}`, optionally `input_ids` and
//!   `attention_mask`; or the bare tuple / list.
//!
//! Tokens whose `attention_mask` is 0 are padding: skipped, and the positions of a row count its
//! kept tokens from 0.

use std::path::{Path, PathBuf};

use moe_xray_model::config::{ModelConfig, RouterKind};
use moe_xray_model::router::{route, RouterParams};
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelShape;
use crate::output::{Sequence, Staged};
use crate::pickle::{TorchFile, Value};
use crate::requests::RequestInfo;
use crate::{ImportError, Result};

/// Largest accepted input file (safetensors are read whole).
pub const MAX_FILE: u64 = 4 << 30;

/// The family's router and, for DeepSeek-V3, the correction bias of each MoE layer.
pub struct HfRouter {
    cfg: ModelConfig,
    /// Per MoE layer (decoder order): `e_score_correction_bias` (f32), when the family has one.
    score_bias: Vec<Option<Vec<f32>>>,
}

impl HfRouter {
    /// The router of the config behind `shape` (which must come from a config the model crate
    /// reads). DeepSeek-V3's `e_score_correction_bias` is read from the checkpoint's safetensors
    /// in the config's directory (it steers the choice and is not in config.json).
    pub fn load(shape: &ModelShape) -> Result<HfRouter> {
        let src = shape.source.clone().ok_or_else(|| {
            ImportError::Usage(
                "import hf needs the model's config.json (--config): the routing rule is the family's"
                    .into(),
            )
        })?;
        let cfg = match &shape.model_config {
            Some(c) => (**c).clone(),
            None => {
                // Re-read for the model crate's own message.
                let text = String::from_utf8_lossy(&crate::npy::read_bounded(&src, 16 << 20)?)
                    .into_owned();
                let e = ModelConfig::from_json_str(&text, &src).err().map_or_else(
                    || "not a configuration of a supported MoE family".to_string(),
                    |e| e.to_string(),
                );
                return Err(ImportError::invalid_file(
                    &src,
                    format!("import hf needs a config of a supported family: {e}"),
                ));
            }
        };
        let moe = cfg.moe_layer_indices();
        let mut score_bias = vec![None; moe.len()];
        if cfg.moe.score_correction_bias {
            let dir = src
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let store = moe_xray_model::weights::WeightStore::open(&dir).map_err(|e| {
                ImportError::invalid_file(
                    &dir,
                    format!("{} needs e_score_correction_bias from the checkpoint's safetensors beside config.json: {e}", cfg.model_type()),
                )
            })?;
            for (row, &l) in moe.iter().enumerate() {
                let name = moe_xray_model::table::weight_name(
                    cfg.family,
                    moe_xray_model::table::Role::ScoreBias(l as usize),
                );
                let t = store
                    .load(
                        &name,
                        &[cfg.num_experts],
                        Some(candle_core::DType::F32),
                        &candle_core::Device::Cpu,
                    )
                    .and_then(|t| t.to_vec1::<f32>().map_err(Into::into))
                    .map_err(|e| {
                        ImportError::invalid(&dir, format!("tensor {name}"), e.to_string())
                    })?;
                score_bias[row] = Some(t);
            }
        }
        Ok(HfRouter { cfg, score_bias })
    }

    pub fn num_moe_layers(&self) -> usize {
        self.score_bias.len()
    }

    /// Routes one token of MoE layer `row`: (experts, recorded weights).
    fn route(&self, row: usize, logits: &[f32], order: &mut Vec<u32>) -> (Vec<u32>, Vec<f32>) {
        let scores: Vec<f32> = match self.cfg.moe.router {
            RouterKind::DeepseekV3 { .. } => logits.iter().map(|&x| sigmoid(x)).collect(),
            RouterKind::TopKSoftmax => Vec::new(),
            _ => softmax(logits),
        };
        let p = RouterParams {
            kind: self.cfg.moe.router,
            top_k: self.cfg.num_experts_per_tok,
            norm_topk_prob: self.cfg.norm_topk_prob,
            record_probabilities: self.cfg.moe.record_probabilities,
            score_bias: self.score_bias.get(row).and_then(|b| b.as_deref()),
        };
        let r = route(&p, logits, &scores, order);
        (r.experts, r.recorded)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax in f32, maximum subtracted first (as torch).
fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// One input file's tensors.
struct Logits {
    /// Per MoE layer: `[n, E]` row-major.
    layers: Vec<Vec<f32>>,
    /// Tokens (rows) per layer and experts per row.
    n: usize,
    e: usize,
    /// `(values, batch, seq)`.
    input_ids: Option<(Vec<i64>, usize, usize)>,
    attention_mask: Option<(Vec<i64>, usize, usize)>,
}

fn float_dtype(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

fn st_floats(path: &Path, name: &str, t: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let bad = |m: String| ImportError::invalid(path, format!("tensor {name}"), m);
    let size = float_dtype(t.dtype()).ok_or_else(|| {
        bad(format!(
            "expected f32 / f16 / bf16 / f64 router logits, found {:?}",
            t.dtype()
        ))
    })?;
    let b = t.data();
    Ok(b.chunks_exact(size)
        .map(|c| match t.dtype() {
            Dtype::F32 => f32::from_le_bytes(crate::exact_bytes(c)),
            Dtype::F64 => f64::from_le_bytes(crate::exact_bytes(c)) as f32,
            Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
            _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        })
        .collect())
}

fn st_ints(path: &Path, name: &str, t: &safetensors::tensor::TensorView<'_>) -> Result<Vec<i64>> {
    let b = t.data();
    Ok(match t.dtype() {
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(crate::exact_bytes(c)))
            .collect(),
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(crate::exact_bytes(c)) as i64)
            .collect(),
        Dtype::I16 => b
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        Dtype::U8 | Dtype::BOOL => b.iter().map(|&x| x as i64).collect(),
        Dtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
        d => {
            return Err(ImportError::invalid(
                path,
                format!("tensor {name}"),
                format!("expected an integer tensor, found {d:?}"),
            ))
        }
    })
}

/// `[batch, seq]` (or `[seq]`) of an integer tensor.
fn bs(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [s] => Ok((1, s)),
        [b, s] => Ok((b, s)),
        _ => Err(ImportError::invalid(
            path,
            format!("tensor {name}"),
            format!("wrong shape {shape:?}: expected [batch, seq] or [seq]"),
        )),
    }
}

/// `(rows, experts)` of a logits tensor: `[n, E]` or `[batch, seq, E]`.
fn ne(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [n, e] => Ok((n, e)),
        [b, s, e] => b
            .checked_mul(s)
            .map(|n| (n, e))
            .ok_or_else(|| ImportError::invalid(path, format!("tensor {name}"), "size overflows")),
        _ => Err(ImportError::invalid(
            path,
            format!("tensor {name}"),
            format!("wrong shape {shape:?}: expected [batch * seq, num_experts]"),
        )),
    }
}

fn read_safetensors(path: &Path) -> Result<Logits> {
    let bytes = crate::npy::read_bounded(path, MAX_FILE)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ImportError::invalid_file(path, format!("not a safetensors file: {e}")))?;
    let mut layers = Vec::new();
    let (mut n, mut e) = (0, 0);
    loop {
        let name = format!("router_logits.{}", layers.len());
        let Ok(t) = st.tensor(&name) else { break };
        let (ni, ei) = ne(path, &name, t.shape())?;
        if layers.is_empty() {
            (n, e) = (ni, ei);
        } else if (ni, ei) != (n, e) {
            return Err(ImportError::invalid(
                path,
                format!("tensor {name}"),
                format!("shape [{ni}, {ei}] differs from router_logits.0's [{n}, {e}]"),
            ));
        }
        layers.push(st_floats(path, &name, &t)?);
    }
    if layers.is_empty() {
        return Err(ImportError::invalid_file(
            path,
            "no tensor router_logits.0 (expected router_logits.{i}, one per MoE layer)",
        ));
    }
    let get = |name: &str| -> Result<Option<(Vec<i64>, usize, usize)>> {
        match st.tensor(name) {
            Err(_) => Ok(None),
            Ok(t) => {
                let (b, s) = bs(path, name, t.shape())?;
                Ok(Some((st_ints(path, name, &t)?, b, s)))
            }
        }
    };
    let input_ids = get("input_ids")?;
    let attention_mask = get("attention_mask")?;
    Ok(Logits {
        layers,
        n,
        e,
        input_ids,
        attention_mask,
    })
}

fn read_pt(path: &Path) -> Result<Logits> {
    let mut tf = TorchFile::open(path)?;
    let data = tf.data.clone();
    let mut named: Vec<(String, crate::pickle::TensorRef)> = Vec::new();
    let tensor_of = |v: &Value, rec: &str| -> Result<crate::pickle::TensorRef> {
        match v {
            Value::Tensor(t) => Ok(t.clone()),
            other => Err(ImportError::invalid(
                path,
                rec,
                format!("expected a tensor, found {}", other.kind()),
            )),
        }
    };
    let list = match &data {
        Value::List(l) | Value::Tuple(l) => Some(l.clone()),
        Value::Dict(_) => match data.get("router_logits") {
            Some(Value::List(l)) | Some(Value::Tuple(l)) => Some(l.clone()),
            Some(other) => {
                return Err(ImportError::invalid(
                    path,
                    "router_logits",
                    format!(
                        "expected a tuple or list of tensors, found {}",
                        other.kind()
                    ),
                ))
            }
            None => None,
        },
        other => {
            return Err(ImportError::invalid_file(
                path,
                format!(
                    "expected a dict or a tuple of router-logit tensors, found {}",
                    other.kind()
                ),
            ))
        }
    };
    match list {
        Some(l) => {
            for (i, v) in l.iter().enumerate() {
                let rec = format!("router_logits[{i}]");
                named.push((rec.clone(), tensor_of(v, &rec)?));
            }
        }
        None => {
            while let Some(v) = data.get(&format!("router_logits.{}", named.len())) {
                let rec = format!("router_logits.{}", named.len());
                named.push((rec.clone(), tensor_of(v, &rec)?));
            }
        }
    }
    if named.is_empty() {
        return Err(ImportError::invalid_file(
            path,
            "no router logits (expected key router_logits holding one tensor per MoE layer, or router_logits.{i})",
        ));
    }
    let mut layers = Vec::new();
    let (mut n, mut e) = (0, 0);
    for (rec, t) in &named {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let (ni, ei) = ne(path, rec, &shape)?;
        if layers.is_empty() {
            (n, e) = (ni, ei);
        } else if (ni, ei) != (n, e) {
            return Err(ImportError::invalid(
                path,
                rec.as_str(),
                format!("shape [{ni}, {ei}] differs from the first layer's [{n}, {e}]"),
            ));
        }
        layers.push(tf.f32_tensor(path, rec, t)?);
    }
    let mut get = |name: &str| -> Result<Option<(Vec<i64>, usize, usize)>> {
        match data.get(name) {
            None | Some(Value::None) => Ok(None),
            Some(v) => {
                let t = tensor_of(v, name)?;
                let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                let (b, s) = bs(path, name, &shape)?;
                Ok(Some((tf.int_tensor(path, name, &t)?, b, s)))
            }
        }
    };
    let input_ids = get("input_ids")?;
    let attention_mask = get("attention_mask")?;
    Ok(Logits {
        layers,
        n,
        e,
        input_ids,
        attention_mask,
    })
}

/// Imports router-logit files (`.safetensors`, `.pt`). With `requests` (the requests file, its
/// lines in the order of the batch rows of all inputs), each row is named by its line's
/// `prompt_id` and its first `prompt_tokens` kept tokens are prompt tokens, the rest generated
/// tokens (with `completion_tokens`, prompt + completion must equal the row's kept tokens).
/// Without, rows are named `<file stem>` (batch 1) or `<file stem>/<row>`, and every token is a
/// prompt token.
pub fn import(
    staged: &mut Staged,
    router: &HfRouter,
    files: &[PathBuf],
    requests: Option<&Path>,
) -> Result<()> {
    let reqs: Option<Vec<(String, RequestInfo)>> = match requests {
        Some(r) => {
            let mut v: Vec<(String, RequestInfo)> =
                crate::requests::read_requests(r)?.into_iter().collect();
            v.sort_by_key(|(_, i)| i.line);
            Some(v)
        }
        None => None,
    };
    let mut next_req = 0usize;
    let m = router.num_moe_layers();
    let e_cfg = router.cfg.num_experts;
    let k = router.cfg.num_experts_per_tok;
    for file in files {
        let ext = file
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .unwrap_or_default();
        let lg = match ext.as_str() {
            "safetensors" => read_safetensors(file)?,
            _ => read_pt(file)?,
        };
        let shape_err = |rec: &str, m: String| {
            ImportError::invalid(file, rec, format!("wrong shape for the stated config: {m}"))
        };
        if lg.layers.len() != m {
            return Err(shape_err(
                "router_logits",
                format!(
                    "{} layers of router logits, but the config has {m} MoE layers (transformers returns one tensor per MoE layer)",
                    lg.layers.len()
                ),
            ));
        }
        if lg.e != e_cfg {
            return Err(shape_err(
                "router_logits",
                format!("{} experts per row, but the config has {e_cfg}", lg.e),
            ));
        }
        let (b, s) = match (&lg.input_ids, &lg.attention_mask) {
            (Some((_, b, s)), _) | (None, Some((_, b, s))) => (*b, *s),
            (None, None) => (1, lg.n),
        };
        if let (Some((_, b1, s1)), Some((_, b2, s2))) = (&lg.input_ids, &lg.attention_mask) {
            if (b1, s1) != (b2, s2) {
                return Err(shape_err(
                    "attention_mask",
                    format!("[{b2}, {s2}] differs from input_ids' [{b1}, {s1}]"),
                ));
            }
        }
        if b.checked_mul(s) != Some(lg.n) {
            return Err(shape_err(
                "router_logits",
                format!(
                    "{} rows per layer, but input_ids / attention_mask say batch {b} x seq {s}",
                    lg.n
                ),
            ));
        }
        if let Some((mask, _, _)) = &lg.attention_mask {
            if let Some(x) = mask.iter().find(|&&x| x != 0 && x != 1) {
                return Err(ImportError::invalid(
                    file,
                    "attention_mask",
                    format!("value {x} is not 0 or 1"),
                ));
            }
        }
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("hf")
            .to_string();
        let mut order = Vec::with_capacity(e_cfg);
        for row in 0..b {
            let rec = format!("batch row {row}");
            let kept: Vec<usize> = (0..s)
                .filter(|&t| {
                    lg.attention_mask
                        .as_ref()
                        .is_none_or(|(mk, _, _)| mk[row * s + t] != 0)
                })
                .collect();
            let padding = (s - kept.len()) as u64;
            if kept.is_empty() {
                return Err(ImportError::invalid(
                    file,
                    &rec,
                    "no token (attention_mask is 0 everywhere)",
                ));
            }
            let (prompt_id, category, prompt_tokens) = match &reqs {
                Some(rs) => {
                    let (id, info) = rs.get(next_req).ok_or_else(|| {
                        ImportError::invalid(
                            file,
                            &rec,
                            format!(
                                "the requests file has {} lines, fewer than the batch rows of the inputs",
                                rs.len()
                            ),
                        )
                    })?;
                    next_req += 1;
                    if let Some(c) = info.completion_tokens {
                        if info.prompt_tokens.checked_add(c) != Some(kept.len()) {
                            return Err(shape_err(
                                &rec,
                                format!(
                                    "{} tokens, but request {id:?} has prompt_tokens {} + completion_tokens {c}",
                                    kept.len(),
                                    info.prompt_tokens
                                ),
                            ));
                        }
                    }
                    (id.clone(), info.category.clone(), info.prompt_tokens)
                }
                None if b == 1 => (stem.clone(), None, kept.len()),
                None => (format!("{stem}/{row}"), None, kept.len()),
            };
            let mut experts = Vec::with_capacity(kept.len() * m * k);
            let mut weights = Vec::with_capacity(kept.len() * m * k);
            for (pos, &t) in kept.iter().enumerate() {
                let n_row = row * s + t;
                for (l, layer) in lg.layers.iter().enumerate() {
                    let x = &layer[n_row * e_cfg..(n_row + 1) * e_cfg];
                    if x.iter().any(|v| !v.is_finite()) {
                        return Err(ImportError::invalid(
                            file,
                            &rec,
                            format!("token {pos}, MoE layer {l}: non-finite router logit"),
                        ));
                    }
                    let (ex, w) = router.route(l, x, &mut order);
                    experts.extend(ex.iter().map(|&v| v as i64));
                    weights.extend(w);
                }
            }
            let token_ids = match &lg.input_ids {
                Some((ids, _, _)) => Some(
                    kept.iter()
                        .map(|&t| {
                            u32::try_from(ids[row * s + t]).map_err(|_| {
                                ImportError::invalid(
                                    file,
                                    &rec,
                                    format!("input_ids: {} is not a token id", ids[row * s + t]),
                                )
                            })
                        })
                        .collect::<Result<Vec<u32>>>()?,
                ),
                None => None,
            };
            staged.write_sequence(
                file,
                &rec,
                &Sequence {
                    prompt_id,
                    category,
                    prompt_tokens,
                    rows: &experts,
                    n_rows: kept.len(),
                    layers: m,
                    k,
                    token_ids,
                    weights: Some(&weights),
                },
            )?;
            staged.stats.padding_tokens += padding;
        }
    }
    if let Some(rs) = &reqs {
        if next_req != rs.len() {
            return Err(ImportError::Usage(format!(
                "the requests file has {} lines but the inputs hold {next_req} batch rows",
                rs.len()
            )));
        }
    }
    Ok(())
}
