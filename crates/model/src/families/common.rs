//! Config helpers several families share.

use serde_json::Value;

use crate::config::Reader;
use crate::error::{ModelError, Result};

/// `hidden_act` must be SiLU (the SwiGLU experts and MLPs).
pub(crate) fn require_silu(r: &Reader<'_>) -> Result<()> {
    let act = r.string_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(r.unsupported(format!("hidden_act `{act}` (only `silu`)")));
    }
    Ok(())
}

/// Per-layer sliding windows from `layer_types` (transformers 5.x: "sliding_attention" /
/// "full_attention") and `sliding_window`; `default_sliding(l)` decides when `layer_types` is
/// absent.
pub(crate) fn sliding_windows(
    r: &Reader<'_>,
    layers: usize,
    default_sliding: impl Fn(usize) -> bool,
) -> Result<Vec<Option<usize>>> {
    let window = r.usize_opt("sliding_window")?;
    let types: Option<Vec<String>> = match r.obj.get("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            if a.len() != layers {
                return Err(ModelError::invalid(
                    r.path,
                    format!(
                        "`layer_types` has {} entries for `num_hidden_layers` = {layers}",
                        a.len()
                    ),
                ));
            }
            let mut v = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                match x.as_str() {
                    Some(s @ ("sliding_attention" | "full_attention")) => v.push(s.to_string()),
                    _ => {
                        return Err(ModelError::invalid(
                            r.path,
                            format!(
                                "`layer_types[{i}]` must be \"sliding_attention\" or \
                                 \"full_attention\", found {x}"
                            ),
                        ))
                    }
                }
            }
            Some(v)
        }
        Some(other) => return Err(r.wrong("layer_types", "an array", other)),
    };
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let sliding = match &types {
            Some(t) => t[l] == "sliding_attention",
            None => default_sliding(l),
        };
        if sliding {
            match window {
                Some(0) => {
                    return Err(ModelError::invalid(
                        r.path,
                        "`sliding_window` must be positive",
                    ))
                }
                Some(w) => out.push(Some(w)),
                None => {
                    return Err(ModelError::invalid(
                        r.path,
                        format!("layer {l} uses sliding attention but `sliding_window` is missing"),
                    ))
                }
            }
        } else {
            out.push(None);
        }
    }
    Ok(out)
}

/// Qwen-style dense layers: a layer is sparse when it is not in `mlp_only_layers` and
/// `(layer + 1) % decoder_sparse_step == 0`.
pub(crate) fn qwen_moe_layers(r: &Reader<'_>, layers: usize) -> Result<Vec<bool>> {
    let step = r.usize_opt("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(ModelError::invalid(
            r.path,
            "`decoder_sparse_step` must be positive",
        ));
    }
    let only = index_list(r, "mlp_only_layers", layers)?;
    Ok((0..layers)
        .map(|l| !only.contains(&l) && (l + 1) % step == 0)
        .collect())
}

/// A list of layer indices, each below `layers`.
pub(crate) fn index_list(r: &Reader<'_>, key: &str, layers: usize) -> Result<Vec<usize>> {
    match r.obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(
                |(i, x)| match x.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) if n < layers => Ok(n),
                    _ => Err(ModelError::invalid(
                        r.path,
                        format!("`{key}[{i}]` must be a layer index below {layers}, found {x}"),
                    )),
                },
            )
            .collect(),
        Some(other) => Err(r.wrong(key, "an array of layer indices", other)),
    }
}
