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
    /// Number of MoE layers L.
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

    /// Dimensions must be at least 1 and within [`crate::limits`], and top_k ≤ num_experts.
    fn validate(&self) -> std::result::Result<(), String> {
        crate::limits::check_dims(self.num_layers, self.num_experts, Some(self.top_k))
            .map(|_| ())
            .map_err(|m| format!("manifest: {m}"))
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
pub fn read_manifest_beside(path: impl AsRef<Path>) -> Result<Option<Manifest>> {
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
