//! The JSON Schema of `moe-xray compare-models --json` (`docs/crossmodel.schema.json`) is the one
//! generated from the types of `crates/stats/src/crossmodel.rs`. Regenerate it after changing a
//! type: `UPDATE_SCHEMA=1 cargo test -p moe-xray-stats --test crossmodel_schema`.

use moe_xray_stats::crossmodel::CrossModelReport;
use moe_xray_test_support::repo_root;

#[test]
fn crossmodel_schema_snapshot() {
    let generated = CrossModelReport::json_schema();
    let path = repo_root().join("docs/crossmodel.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/crossmodel.schema.json differs from the schema generated from \
         crates/stats/src/crossmodel.rs; regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p moe-xray-stats --test crossmodel_schema`"
    );
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(v["title"], "moe-xray compare-models");
    let required: Vec<&str> = v["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for key in [
        "schema_version",
        "rsa",
        "per_layer",
        "categories",
        "expert_matching",
        "matched_drift",
    ] {
        assert!(required.contains(&key), "{key} not required: {required:?}");
    }
}

/// The N-run report's schema (`docs/crossmodel-multi.schema.json`), regenerated the same way.
#[test]
fn crossmodel_multi_schema_snapshot() {
    let generated = moe_xray_stats::crossmodel::MultiModelReport::json_schema();
    let path = repo_root().join("docs/crossmodel-multi.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/crossmodel-multi.schema.json differs from the schema generated from \
         crates/stats/src/crossmodel.rs; regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p moe-xray-stats --test crossmodel_schema`"
    );
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(v["title"], "moe-xray compare-models (N runs)");
    for key in ["models", "matrices", "separation", "pairs", "not_shared"] {
        assert!(
            v["required"].as_array().unwrap().iter().any(|x| x == key),
            "{key} not required"
        );
    }
}
