//! CLI tests of `moe-xray health` and `moe-xray compare` on the fixtures of tools/reference_health.py.

use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::Output;
mod common;
use common::{moe_xray, s, stderr};

/// `moe-xray compare A B --reps 0 --fail-above T`: the drift guard alone, no bootstrap.
fn compare_guard(a: &Path, b: &Path, fail_above: &str) -> Output {
    moe_xray(&[
        "compare",
        s(a),
        s(b),
        "--reps",
        "0",
        "--fail-above",
        fail_above,
    ])
}

/// Runs `moe-xray ARGS`, which must exit 1 with `needle` in its stderr; returns that stderr.
fn fails_with(args: &[&str], needle: &str) -> String {
    let out = moe_xray(args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains(needle), "stderr `{e}` lacks `{needle}`");
    e
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("health").join("expected.json")).unwrap())
        .unwrap()
}

#[test]
fn health_writes_table_json_csv_svg() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixture("health").join("run_a");
    let json = dir.path().join("health.json");
    let out = moe_xray(&[
        "health",
        s(&run),
        "--json",
        s(&json),
        "--csv",
        s(&dir.path().join("csv")),
        "--svg",
        s(&dir.path().join("svg")),
        "--layer",
        "2",
        "--mi",
        "--perms",
        "99",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("routing health: 3 layers x 8 experts, top-k 2"),
        "{table}"
    );
    assert!(table.contains("mutual information"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let want = expected();
    let g = v["layers"][1]["gini"].as_f64().unwrap();
    assert!((g - want["health_a"][1]["gini"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!(v["layers"][2]["dead_experts"], serde_json::json!([7]));
    assert!(v["mutual_information"]["p_value"].as_f64().unwrap() <= 1.0);
    for f in ["layers.csv", "load.csv", "coactivation.csv", "pairs.csv"] {
        let c = std::fs::read_to_string(dir.path().join("csv").join(f)).unwrap();
        assert!(c.lines().count() > 3, "{f}");
    }
    let load = std::fs::read_to_string(dir.path().join("csv/load.csv")).unwrap();
    assert!(load.contains("\n2,7,0,0,dead\n"), "{load}");
    let heat = std::fs::read_to_string(dir.path().join("svg/load_heatmap.svg")).unwrap();
    assert!(heat.starts_with("<svg"));
    assert!(dir.path().join("svg/coactivation_layer2.svg").is_file());

    // JSON to stdout is byte-identical to the file (deterministic, seeded).
    let out2 = moe_xray(&["health", s(&run), "--json", "--mi", "--perms", "99"]);
    assert!(out2.status.success());
    assert_eq!(out2.stdout, std::fs::read(&json).unwrap());
}

#[test]
fn health_on_counts_says_what_is_missing() {
    let out = moe_xray(&[
        "health",
        s(&fixture("health").join("run_a_counts/trace.jsonl")),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(t.contains("co-activation needs per-token input"), "{t}");
    assert!(t.contains("router entropy and top-k margin need the full router distribution"));
}

#[test]
fn health_bad_inputs_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[1]}\nnot json\n",
    )
    .unwrap();
    fails_with(&["health", s(&bad)], "bad.jsonl:2");
    fails_with(
        &["health", s(&dir.path().join("missing.jsonl"))],
        "missing.jsonl",
    );
    fails_with(
        &[
            "health",
            s(&fixture("health").join("run_a")),
            "--layer",
            "9",
        ],
        "--layer 9",
    );
}

#[test]
fn compare_reports_js_and_guards() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        fixture("health").join("run_a"),
        fixture("health").join("run_b"),
    );
    let svg = dir.path().join("js.svg");
    let out = moe_xray(&[
        "compare",
        s(&a),
        s(&b),
        "--json",
        "--reps",
        "99",
        "--svg",
        s(&svg),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let max = v["max_js_bits"].as_f64().unwrap();
    assert!((max - expected()["compare"]["max_js_bits"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!(v["shared_prompts"], 11);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("Jensen"));

    // guard: threshold below the max JS -> exit 3; above -> success
    let out = compare_guard(&a, &b, "0.04");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("exceeds --fail-above"));
    let out = compare_guard(&a, &b, "0.06");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // a run compared with itself never trips the guard
    let out = compare_guard(&a, &a, "0");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn compare_mismatched_shapes_is_an_error() {
    let e = fails_with(
        &[
            "compare",
            s(&fixture("health").join("run_a")),
            s(&fixture("health").join("run_e6")),
            "--fail-above",
            "0.5",
        ],
        "same L and E",
    );
    assert!(
        e.contains("8 experts") && e.contains("6 experts") && e.contains("same L and E"),
        "{e}"
    );
}

/// A records trace without a manifest: one layer, 16 experts, top-2, and expert 15 never chosen.
fn dead_last_expert_trace(dir: &Path) -> PathBuf {
    let path = dir.join("trace.jsonl");
    let mut text = String::new();
    for p in 0..4 {
        for pos in 0..15u32 {
            let (a, b) = (pos, (pos + 1 + p) % 15);
            text.push_str(&format!(
                "{{\"prompt_id\":\"p{p}\",\"category\":\"c{}\",\"layer\":0,\"position\":{pos},\"token_id\":1,\"token_type\":\"prompt\",\"experts\":[{a},{b}],\"weights\":[0.6,0.4]}}\n",
                p % 2
            ));
        }
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn health_dead_last_expert_needs_the_true_num_experts() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dead_last_expert_trace(dir.path());

    // Inferred from the data: 15 experts, none dead, and a loud warning saying how to fix it.
    let out = moe_xray(&["health", s(&trace)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 layers x 15 experts"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("dead 0,"), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(
        e.contains("WARNING")
            && e.contains("INFERRED")
            && e.contains("15 experts (highest expert id seen + 1)"),
        "{e}"
    );
    assert!(
        e.contains("--num-experts") && e.contains("--model DIR"),
        "{e}"
    );
    assert!(e.contains("1 layers (highest layer index seen + 1)"), "{e}");

    // --num-experts 16: the never-chosen expert 15 is dead; layers are still inferred (warned).
    let out = moe_xray(&["health", s(&trace), "--num-experts", "16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 layers x 16 experts"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("dead 1,"), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("1 layers (highest layer index seen + 1)"), "{e}");
    assert!(!e.contains("experts (highest"), "{e}");

    // Both given: no warning at all.
    let out = moe_xray(&[
        "health",
        s(&trace),
        "--num-experts",
        "16",
        "--num-layers",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("dead 1,"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("WARNING"), "{}", stderr(&out));

    // --model DIR reads L and E from config.json, as analyze does.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"num_hidden_layers": 1, "num_experts": 16, "num_experts_per_tok": 2}"#,
    )
    .unwrap();
    let out = moe_xray(&["health", s(&trace), "--model", s(&model), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["num_experts"], 16);
    assert_eq!(v["layers"][0]["dead_experts"], serde_json::json!([15]));
    assert!(!stderr(&out).contains("WARNING"), "{}", stderr(&out));

    // A value smaller than the data is an error naming the file and line, not a silent cut.
    let out = moe_xray(&["health", s(&trace), "--num-experts", "8"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("trace.jsonl:8: expert 8 is out of range"),
        "{}",
        stderr(&out)
    );
    // A hostile config is one clear error naming the file.
    std::fs::write(model.join("config.json"), "{\"num_experts\": -1}").unwrap();
    fails_with(&["health", s(&trace), "--model", s(&model)], "config.json");

    // compare takes the same options: with 16 experts both runs agree with themselves.
    let out = moe_xray(&[
        "compare",
        s(&trace),
        s(&trace),
        "--reps",
        "0",
        "--num-experts",
        "16",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["num_experts"], 16, "{v}");
    assert!(
        stderr(&out).contains("1 layers (highest"),
        "{}",
        stderr(&out)
    );
    let out = moe_xray(&["compare", s(&trace), s(&trace), "--reps", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("15 experts (highest expert id seen + 1)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn health_and_compare_share_the_json_and_quiet_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        fixture("health").join("run_a"),
        fixture("health").join("run_b"),
    );
    // --json alone: the JSON on stdout instead of the table.
    let out = moe_xray(&["health", s(&a), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["num_experts"], 8);
    // --json-out FILE: the JSON in FILE and the table on stdout.
    let file = dir.path().join("h.json");
    let out = moe_xray(&["health", s(&a), "--json-out", s(&file)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("routing health:"), "{}", stdout(&out));
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(from_file, v);
    // --json FILE, the older spelling, still writes FILE (with a note on stderr).
    let old = dir.path().join("old.json");
    let out = moe_xray(&["health", s(&a), "--json", s(&old)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&old).unwrap(), std::fs::read(&file).unwrap());
    assert!(stderr(&out).contains("--json-out"), "{}", stderr(&out));
    // --json and --json-out together are refused.
    let out = moe_xray(&["health", s(&a), "--json-out", s(&file), "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // --quiet: nothing on stdout, files still written.
    let q = dir.path().join("q.json");
    let out = moe_xray(&["health", s(&a), "--quiet", "--json-out", s(&q)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    assert_eq!(std::fs::read(&q).unwrap(), std::fs::read(&file).unwrap());

    // compare: the same three spellings.
    let cj = dir.path().join("c.json");
    let out = moe_xray(&["compare", s(&a), s(&b), "--reps", "9", "--json-out", s(&cj)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).is_empty());
    let out2 = moe_xray(&["compare", s(&a), s(&b), "--reps", "9", "--json"]);
    assert_eq!(out2.stdout, std::fs::read(&cj).unwrap());
    let out3 = moe_xray(&["compare", s(&a), s(&b), "--reps", "9", "--quiet"]);
    assert!(out3.status.success(), "{}", stderr(&out3));
    assert!(out3.stdout.is_empty(), "{}", stdout(&out3));
    // --quiet keeps the guard's exit code and message.
    let out = moe_xray(&[
        "compare",
        s(&a),
        s(&b),
        "--reps",
        "0",
        "--fail-above",
        "0.04",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("exceeds --fail-above"));
}
