//! `manifest.json`: what produced a set of traces (see `docs/trace-format.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Result, TraceError};

/// File name of the manifest that sits beside trace files.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Description of a capture run. `num_layers`, `num_experts` and `top_k` are required; every
/// other field is optional on input (defaults: empty / `null`). Unknown fields are kept in
/// `extra` and written back unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model name or checkpoint directory.
    #[serde(default)]
    pub model: String,
    /// Number of decoder layers L (every one of them is an MoE layer unless `routing` lists
    /// dense layers).
    pub num_layers: usize,
    /// Number of routed experts per layer E.
    pub num_experts: usize,
    /// Experts selected per token k.
    pub top_k: usize,
    /// Compute dtype of the run ("f32", "bf16", "f16").
    #[serde(default)]
    pub dtype: String,
    /// Generation settings (max_new_tokens, sampling, seed, chat template, ...), free-form.
    #[serde(default)]
    pub generation: serde_json::Value,
    /// `prompts::prompt_set_hash` of the prompt set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_set_hash: Option<String>,
    /// moe-xray version that wrote the traces.
    #[serde(default)]
    pub tool_version: String,
    /// "events" or "counts".
    #[serde(default)]
    pub capture_mode: String,
    /// Which decoder layers have a router, the shared experts and the router kind. Absent: every
    /// layer `0..num_layers` is an MoE layer (the manifests written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingLayout>,
    /// Any other fields, preserved.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn read(path: impl AsRef<Path>) -> Result<Manifest> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| TraceError::io(path, e))?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(TraceError::invalid_file(path, "empty manifest file"));
        }
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            TraceError::invalid(path, e.line().max(1), format!("invalid manifest: {e}"))
        })?;
        m.validate()
            .map_err(|msg| TraceError::invalid_file(path, msg))?;
        Ok(m)
    }

    /// Writes the manifest atomically (pretty-printed JSON with a trailing newline).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut s = serde_json::to_string_pretty(self).map_err(|e| {
            TraceError::invalid_file(path, format!("cannot serialise manifest: {e}"))
        })?;
        s.push('\n');
        crate::atomic::write_atomic(path, s)
    }

    /// Dimensions must be at least 1 and within [`crate::limits`], top_k ≤ num_experts, and the
    /// `routing` block (when present) must partition `0..num_layers` (see
    /// [`RoutingLayout::validate`]).
    pub fn validate(&self) -> std::result::Result<(), String> {
        crate::limits::check_dims(self.num_layers, self.num_experts, Some(self.top_k))
            .map(|_| ())
            .map_err(|m| format!("manifest: {m}"))?;
        if let Some(r) = &self.routing {
            r.validate(self.num_layers, self.num_experts)
                .map_err(|m| format!("manifest: {m}"))?;
        }
        Ok(())
    }

    /// Decoder-layer indices of the layers with a router, ascending: `routing.moe_layers`, or
    /// every layer `0..num_layers` when there is no routing block.
    pub fn moe_layers(&self) -> Vec<u32> {
        match &self.routing {
            Some(r) => r.moe_layers.clone(),
            None => (0..self.num_layers as u32).collect(),
        }
    }
}

/// Largest length of the free-text fields of a [`RoutingLayout`] (`family`, `router`, `scores`),
/// in bytes.
pub const MAX_ROUTING_NAME_BYTES: usize = 64;
/// Largest length of [`RoutingLayout::weights`], in bytes.
pub const MAX_ROUTING_TEXT_BYTES: usize = 1024;

/// The manifest's `"routing"` block: how the model's decoder layers route (see
/// `docs/trace-format.md`, "Manifest"). `moe_layers` and `dense_layers` partition the decoder
/// layers `0..num_layers`; records exist only at `moe_layers`, and signatures, counts and health
/// are built from those layers, labelled with their decoder-layer index.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingLayout {
    /// Model family (the checkpoint's `model_type`: "olmoe", "mixtral", "qwen2_moe", ...).
    pub family: String,
    /// Decoder-layer indices of the layers with a router, ascending.
    pub moe_layers: Vec<u32>,
    /// Decoder-layer indices of the dense layers (an MLP, no router, no records), ascending.
    pub dense_layers: Vec<u32>,
    /// Shared experts per MoE layer (applied to every token besides the routed ones; never in
    /// `experts`).
    pub num_shared_experts: u32,
    /// Router kind: "softmax_topk" (softmax over all experts, then top-k), "topk_softmax"
    /// (top-k of the logits, softmax over those k), "deepseek_v2", "deepseek_v3"; free text for
    /// kinds added later.
    pub router: String,
    /// What `probs` holds with `--record-probs`: "softmax" (probabilities over all experts) or
    /// "sigmoid" (independent scores in (0, 1), without any correction bias).
    pub scores: String,
    /// What a record's `weights` hold for this family, in words.
    pub weights: String,
    /// Any other fields, preserved.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl RoutingLayout {
    /// Every layer of `0..num_layers` an MoE layer with a softmax-then-top-k router and no
    /// shared experts (what an absent block means); set the other fields for other families.
    pub fn all_moe(family: &str, num_layers: u32) -> RoutingLayout {
        RoutingLayout {
            family: family.to_string(),
            moe_layers: (0..num_layers).collect(),
            router: "softmax_topk".into(),
            scores: "softmax".into(),
            ..RoutingLayout::default()
        }
    }

    /// `moe_layers` and `dense_layers` are ascending, without repeats, below `num_layers`,
    /// disjoint, together exactly `0..num_layers`, and `moe_layers` is not empty;
    /// `num_shared_experts` ≤ [`crate::limits::MAX_EXPERTS`]; `scores` is "softmax" or "sigmoid";
    /// the texts are within [`MAX_ROUTING_NAME_BYTES`] / [`MAX_ROUTING_TEXT_BYTES`]. The message
    /// names the field (`routing.<field>`).
    pub fn validate(
        &self,
        num_layers: usize,
        _num_experts: usize,
    ) -> std::result::Result<(), String> {
        for (field, list) in [
            ("moe_layers", &self.moe_layers),
            ("dense_layers", &self.dense_layers),
        ] {
            if list.len() > num_layers {
                return Err(format!(
                    "routing.{field} has {} entries but num_layers = {num_layers}",
                    list.len()
                ));
            }
            let mut prev: Option<u32> = None;
            for &l in list.iter() {
                if l as usize >= num_layers {
                    return Err(format!(
                        "routing.{field}: layer {l} is not below num_layers = {num_layers}"
                    ));
                }
                if let Some(p) = prev {
                    if l <= p {
                        return Err(format!(
                            "routing.{field} must be ascending without repeats ({l} follows {p})"
                        ));
                    }
                }
                prev = Some(l);
            }
        }
        if self.moe_layers.is_empty() {
            return Err(
                "routing.moe_layers is empty (a trace needs at least one MoE layer)".into(),
            );
        }
        // Both lists are ascending and below num_layers: merge them to check the partition.
        let (mut i, mut j) = (0usize, 0usize);
        for l in 0..num_layers as u32 {
            let in_moe = self.moe_layers.get(i) == Some(&l);
            let in_dense = self.dense_layers.get(j) == Some(&l);
            match (in_moe, in_dense) {
                (true, true) => {
                    return Err(format!(
                        "routing.dense_layers: layer {l} is also in routing.moe_layers"
                    ))
                }
                (false, false) => {
                    return Err(format!(
                        "routing.moe_layers / routing.dense_layers: layer {l} is in neither (together they must list every layer 0..num_layers = {num_layers})"
                    ))
                }
                (true, false) => i += 1,
                (false, true) => j += 1,
            }
        }
        if self.num_shared_experts as usize > crate::limits::MAX_EXPERTS {
            return Err(format!(
                "routing.num_shared_experts = {} exceeds the supported maximum {}",
                self.num_shared_experts,
                crate::limits::MAX_EXPERTS
            ));
        }
        for (field, text, max) in [
            ("family", &self.family, MAX_ROUTING_NAME_BYTES),
            ("router", &self.router, MAX_ROUTING_NAME_BYTES),
            ("scores", &self.scores, MAX_ROUTING_NAME_BYTES),
            ("weights", &self.weights, MAX_ROUTING_TEXT_BYTES),
        ] {
            if text.len() > max {
                return Err(format!(
                    "routing.{field} is {} bytes long, more than the {max} accepted",
                    text.len()
                ));
            }
        }
        if !matches!(self.scores.as_str(), "softmax" | "sigmoid") {
            return Err(format!(
                "routing.scores = {:?} must be \"softmax\" or \"sigmoid\"",
                self.scores
            ));
        }
        Ok(())
    }

    /// For each decoder layer `0..num_layers`: its row among the MoE layers, `None` for a dense
    /// layer. Call after [`RoutingLayout::validate`].
    pub fn rows(&self, num_layers: usize) -> Vec<Option<usize>> {
        let mut rows = vec![None; num_layers];
        for (row, &l) in self.moe_layers.iter().enumerate() {
            if let Some(r) = rows.get_mut(l as usize) {
                *r = Some(row);
            }
        }
        rows
    }
}

/// Path of the manifest beside a trace file (or inside `path` when it is a directory).
pub fn manifest_path_beside(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    if path.is_dir() {
        return path.join(MANIFEST_FILE);
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(MANIFEST_FILE),
        _ => PathBuf::from(MANIFEST_FILE),
    }
}

/// Reads `manifest.json` beside `path`; `Ok(None)` when there is none, an error when it exists but
/// is invalid.
/// A trace in an external form (a Parquet file or dataset, see
/// [`crate::reader::ExternalFormat`]) carries its own manifest, which is read instead.
pub fn read_manifest_beside(path: impl AsRef<Path>) -> Result<Option<Manifest>> {
    if let Some(f) = crate::reader::external_format_of(path.as_ref()) {
        return f.manifest(path.as_ref());
    }
    let mp = manifest_path_beside(path);
    if !mp.is_file() {
        return Ok(None);
    }
    Manifest::read(&mp).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_extra_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MANIFEST_FILE);
        std::fs::write(
            &p,
            r#"{"model":"m","num_layers":2,"num_experts":4,"top_k":2,"custom":{"a":1}}"#,
        )
        .unwrap();
        let m = read_manifest_beside(dir.path().join("trace.jsonl"))
            .unwrap()
            .unwrap();
        assert_eq!((m.num_layers, m.num_experts, m.top_k), (2, 4, 2));
        assert_eq!(m.extra["custom"]["a"], 1);
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), m);
    }

    #[test]
    fn absent_manifest_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_manifest_beside(dir.path().join("t.jsonl"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn invalid_manifests_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MANIFEST_FILE);
        for (content, needle) in [
            ("", "empty manifest"),
            ("{\"num_layers\": 2}", "num_experts"),
            ("{not json", "invalid manifest"),
            (r#"{"num_layers":2,"num_experts":4,"top_k":5}"#, "top_k = 5"),
            (
                r#"{"num_layers":0,"num_experts":4,"top_k":1}"#,
                "num_layers",
            ),
            (
                r#"{"num_layers":1099511627776,"num_experts":4,"top_k":1}"#,
                "num_layers = 1099511627776 exceeds the supported maximum 4096",
            ),
            (
                r#"{"num_layers":2,"num_experts":9223372036854775808,"top_k":1}"#,
                "num_experts = 9223372036854775808 exceeds",
            ),
            (
                r#"{"num_layers":4096,"num_experts":4096,"top_k":1}"#,
                "num_layers × num_experts = 4096 × 4096 exceeds",
            ),
            (
                r#"{"num_layers":-1,"num_experts":4,"top_k":1}"#,
                "invalid manifest",
            ),
            (
                r#"{"num_layers":2.5,"num_experts":4,"top_k":1}"#,
                "invalid manifest",
            ),
        ] {
            std::fs::write(&p, content).unwrap();
            let msg = read_manifest_beside(&p).unwrap_err().to_string();
            assert!(
                msg.contains("manifest.json") && msg.contains(needle),
                "{content:?}: {msg}"
            );
        }
    }
}
