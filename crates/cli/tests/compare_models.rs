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
    for f in ["rsa_scatter.svg", "layer_cka.svg", "layer_rsa.svg"] {
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
