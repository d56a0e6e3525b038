//! `moe-xray compare-models` on the committed analysis directories: the JSON on stdout and in a
//! file (byte-identical, at 1 and 2 threads), the figures, report.html (`--out`), the summary,
//! and clear errors.

mod common;
use common::{moe_xray, s, stderr};
use moe_xray_test_support::{fixture, repo_root};

#[test]
fn json_figures_and_summary() {
    let dir = fixture("crossmodel");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ta = repo_root().join("fixtures/stats/planted/trace.jsonl");
    let tb = repo_root().join("fixtures/stats/null/trace.jsonl");
    let (a, b) = (dir.join("planted"), dir.join("null"));
    let args = |extra: &[&str]| {
        let mut v = vec![
            "compare-models",
            s(&a),
            s(&b),
            "--traces-a",
            s(&ta),
            "--traces-b",
            s(&tb),
            "--reps",
            "300",
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let json_file = out.join("cm.json");
    let html_dir = tmp.path().join("html");
    let a1 = args(&[
        "--json-out",
        s(&json_file),
        "--svg-dir",
        s(&out),
        "--out",
        s(&html_dir),
    ]);
    let o = moe_xray(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = String::from_utf8(o.stdout).unwrap();
    assert!(
        summary.contains("RSA (Spearman of prompt similarities)"),
        "{summary}"
    );
    assert!(summary.contains("expert matching:"), "{summary}");
    for f in [
        "rsa_scatter.svg",
        "layer_cka.svg",
        "layer_rsa.svg",
        "drift.svg",
    ] {
        let t = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(
            t.starts_with("<svg") && t.trim_end().ends_with("</svg>"),
            "{f}"
        );
    }
    // --out: the self-contained report.html with every section and the figures inline
    let html = std::fs::read_to_string(html_dir.join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.ends_with("</html>\n"));
    for needle in [
        "<section id=\"similarity\">",
        "<section id=\"task-separation\">",
        "<section id=\"expert-matching\">",
        "<table class=\"drift\">",
        "id=\"fig-crossmodel-rsa\"",
        "id=\"fig-crossmodel-layer-cka\"",
        "id=\"fig-crossmodel-layer-rsa\"",
        "id=\"fig-crossmodel-drift\"",
    ] {
        assert!(html.contains(needle), "{needle} missing from report.html");
    }
    assert!(!html.contains("<script"));
    let text = std::fs::read_to_string(&json_file).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["shared_prompts"], 40);
    assert_eq!(v["same_architecture"], true);
    assert_eq!(v["rsa"]["mantel"]["reps"], 300);
    assert!(
        v["matched_drift"]["matched"]["mean_js_bits"]
            .as_f64()
            .unwrap()
            < v["matched_drift"]["unmatched"]["mean_js_bits"]
                .as_f64()
                .unwrap()
    );
    // --json on stdout gives the same bytes, at any thread count.
    for threads in ["1", "2"] {
        let a2 = args(&["--json"]);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_moe-xray"))
            .args(&a2)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            text,
            "threads {threads}"
        );
    }
}

#[test]
fn a_trace_directory_is_refused_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = moe_xray(&[
        "compare-models",
        s(&fixture("health").join("run_a")),
        s(&fixture("crossmodel").join("planted")),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(!out.join("report.html").exists(), "no report on failure");
    let e = stderr(&o);
    assert!(
        e.contains("no results.json") && e.contains("moe-xray analyze"),
        "{e}"
    );
}

/// Three runs: the N-run JSON (schema docs/crossmodel-multi.schema.json, byte-identical on
/// stdout and in a file at 1 and 2 threads), the matrix and drift figures, the N-run
/// report.html, the summary; --traces-a with three runs and a wrong number of --traces are
/// refused before any output.
#[test]
fn three_runs_give_matrices_figures_and_report() {
    let dir = fixture("crossmodel");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let html_dir = tmp.path().join("html");
    let tp = repo_root().join("fixtures/stats/planted/trace.jsonl");
    let tn = repo_root().join("fixtures/stats/null/trace.jsonl");
    let (a, b, c) = (
        dir.join("planted"),
        dir.join("null"),
        dir.join("planted_prompt"),
    );
    let args = |extra: &[&str]| {
        let mut v = vec![
            "compare-models",
            s(&a),
            s(&b),
            s(&c),
            "--traces",
            s(&tp),
            "--traces",
            s(&tn),
            "--traces",
            s(&tp),
            "--reps",
            "200",
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let json_file = out.join("cm.json");
    let a1 = args(&[
        "--json-out",
        s(&json_file),
        "--svg-dir",
        s(&out),
        "--out",
        s(&html_dir),
    ]);
    let o = moe_xray(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = String::from_utf8(o.stdout).unwrap();
    for needle in [
        "R3: ",
        "shared by every run: 40 prompts",
        "R1 x R3",
        "R2 x R3",
    ] {
        assert!(summary.contains(needle), "{needle}: {summary}");
    }
    for f in [
        "matrix_rsa.svg",
        "matrix_cka.svg",
        "drift_R1_R2.svg",
        "drift_R1_R3.svg",
        "drift_R2_R3.svg",
    ] {
        let t = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(
            t.starts_with("<svg") && t.trim_end().ends_with("</svg>"),
            "{f}"
        );
    }
    let html = std::fs::read_to_string(html_dir.join("report.html")).unwrap();
    for needle in [
        "<section id=\"matrices\">",
        "<section id=\"pair-2-3\">",
        "id=\"fig-crossmodel-matrix-rsa\"",
        "id=\"fig-crossmodel-matrix-cka\"",
        "id=\"fig-crossmodel-drift-1-3\"",
    ] {
        assert!(html.contains(needle), "{needle} missing from report.html");
    }
    let text = std::fs::read_to_string(&json_file).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["models"].as_array().unwrap().len(), 3);
    assert_eq!(v["pairs"].as_array().unwrap().len(), 3);
    assert_eq!(v["matrices"]["rsa"][0][0], serde_json::Value::Null);
    assert_eq!(v["matrices"]["rsa"][0][2], v["matrices"]["rsa"][2][0]);
    assert!(v["matrices"]["rsa"][0][2].as_f64().unwrap() > 0.9);
    for threads in ["1", "2"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_moe-xray"))
            .args(args(&["--json"]))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            text,
            "threads {threads}"
        );
    }
    // Refusals, before any output.
    let none = tmp.path().join("none");
    let o = moe_xray(&[
        "compare-models",
        s(&a),
        s(&b),
        s(&c),
        "--traces-a",
        s(&tp),
        "--out",
        s(&none),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--traces once per run"),
        "{}",
        stderr(&o)
    );
    let o = moe_xray(&[
        "compare-models",
        s(&a),
        s(&b),
        s(&c),
        "--traces",
        s(&tp),
        "--out",
        s(&none),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("one per run"), "{}", stderr(&o));
    assert!(!none.join("report.html").exists());
    let o = moe_xray(&["compare-models", s(&a)]);
    assert!(!o.status.success());
}
