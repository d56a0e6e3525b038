//! CLI tests of `moe-xray health` and `moe-xray compare` on the fixtures of tools/reference_health.py.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/health")
}

fn moe_xray(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-xray"))
        .args(args)
        .output()
        .expect("run moe-xray")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

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
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

#[test]
fn health_writes_table_json_csv_svg() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixtures().join("run_a");
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
    let out = moe_xray(&["health", s(&fixtures().join("run_a_counts/trace.jsonl"))]);
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
        &["health", s(&fixtures().join("run_a")), "--layer", "9"],
        "--layer 9",
    );
}

#[test]
fn compare_reports_js_and_guards() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixtures().join("run_a"), fixtures().join("run_b"));
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
            s(&fixtures().join("run_a")),
            s(&fixtures().join("run_e6")),
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
