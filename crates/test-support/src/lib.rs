//! Helpers shared by the test suites of the moe-xray crates (a dev-dependency only, never
//! published): where the repository's committed fixtures and docs are, and the conversion of a
//! stored [`RoutingRecord`] back into the [`RoutingDecision`] a capture sink receives.
//!
//! Paths are absolute and free of `..` (the repository root is two levels above this crate), so
//! they read well in assertion messages and are the same from every crate's tests.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use moe_xray_trace::{RoutingDecision, RoutingRecord};

/// The repository root (the directory holding the workspace `Cargo.toml`, `fixtures/`, `docs/`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.join("../.."))
}

/// `fixtures/REL` under the repository root, e.g. `fixture("hf")`, `fixture("stats/planted")`.
pub fn fixture(rel: impl AsRef<Path>) -> PathBuf {
    repo_root().join("fixtures").join(rel)
}

/// Every file directly in `dir`, by name, with its bytes (for byte-for-byte comparisons of
/// written outputs). Panics (a test helper) when the directory or a file cannot be read.
pub fn dir_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let bytes = std::fs::read(e.path())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// `docs/NAME` under the repository root, e.g. `doc("health.md")`.
pub fn doc(name: impl AsRef<Path>) -> PathBuf {
    repo_root().join("docs").join(name)
}

/// The decision a [`moe_xray_trace::RoutingSink`] receives for the token `r` describes — the
/// inverse of what the trace writers store. Panics (a test helper) when `r` lacks the token id
/// or the router weights, which every captured record has.
pub fn decision(r: &RoutingRecord) -> RoutingDecision<'_> {
    RoutingDecision {
        prompt_id: &r.prompt_id,
        layer: r.layer,
        position: r.position,
        token_id: r.token_id.expect("record without token_id"),
        token_type: r.token_type,
        experts: &r.experts,
        weights: r.weights.as_deref().expect("record without weights"),
        probs: r.probs.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_xray_trace::TokenType;

    #[test]
    fn paths_point_into_the_repository() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(!repo_root().to_string_lossy().contains(".."));
        assert!(fixture("health").join("run_a").is_dir());
        assert!(doc("DESIGN.md").is_file());
    }

    #[test]
    fn decision_mirrors_the_record() {
        let r = RoutingRecord {
            prompt_id: "p".into(),
            category: Some("c".into()),
            layer: 2,
            position: 5,
            token_id: Some(7),
            token_type: TokenType::Generation,
            experts: vec![3, 1],
            weights: Some(vec![0.5, 0.25]),
            probs: Some(vec![0.1, 0.25, 0.15, 0.5]),
        };
        let d = decision(&r);
        assert_eq!(
            (d.prompt_id, d.layer, d.position, d.token_id, d.token_type),
            ("p", 2, 5, 7, TokenType::Generation)
        );
        assert_eq!((d.experts, d.weights), (&[3, 1][..], &[0.5f32, 0.25][..]));
        assert_eq!(d.probs, Some(&[0.1f32, 0.25, 0.15, 0.5][..]));
    }
}
