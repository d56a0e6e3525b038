//! The manifest says when a trace was captured in the exact mode (`--exact`): `"exact": true`,
//! `dtype` "f32"; a fast-mode trace of the same quantised file has no `exact` key.

use moe_xray_test_support::fixture;
use serde_json::Value;

mod common;
use common::{moe_xray, s, stderr};

fn manifest(exact: bool, out: &std::path::Path) -> Value {
    let model = fixture("gguf")
        .join("olmoe-tiny-mha")
        .join("model-q8_0.gguf");
    let prompts = fixture("hf").join("prompts.jsonl");
    let mut args = vec![
        "trace",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--out",
        s(out),
        "--max-new-tokens",
        "1",
        "--quiet",
    ];
    if exact {
        args.push("--exact");
    }
    let o = moe_xray(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn the_manifest_records_the_exact_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let exact = manifest(true, &tmp.path().join("exact"));
    assert_eq!(exact["exact"], Value::Bool(true));
    assert_eq!(exact["dtype"], "f32");
    let fast = manifest(false, &tmp.path().join("fast"));
    assert!(fast.get("exact").is_none(), "{fast}");
}

#[test]
fn an_invalid_kernel_cap_is_an_error_naming_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gguf")
        .join("olmoe-tiny-mha")
        .join("model-f32.gguf");
    let prompts = fixture("hf").join("prompts.jsonl");
    let out = tmp.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_moe-xray"))
        .env("MOE_XRAY_KERNEL", "avx1024")
        .args(["trace", "--model", s(&model), "--prompts", s(&prompts)])
        .args(["--out", s(&out), "--max-new-tokens", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("MOE_XRAY_KERNEL"), "{}", stderr(&o));
    assert!(!out.join("manifest.json").exists());
}
