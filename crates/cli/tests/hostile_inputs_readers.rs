//! Issue 14, readers (CLI level): valid output directories that used to be refused, and hostile
//! reader inputs that used to be accepted or to crash, each checked through the binary.

use moe_xray_test_support::repo_root;
use std::path::Path;
use std::process::{Command, Output};
mod common;
use common::{moe_xray, s};

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Exit code 1, no panic, and `needles` in stderr.
fn fails(o: &Output, needles: &[&str]) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// `health DIR` and `compare DIR DIR` on the output directory of `trace` (trace + manifest +
/// generations.jsonl) and on a run-style directory (prompts.jsonl + traces/) used to fail on
/// `generations.jsonl:1` and `prompts.jsonl`.
#[test]
fn health_and_compare_accept_trace_and_run_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace-out");
    let model = repo_root().join("fixtures/hf/olmoe-tiny-mha-f32");
    let prompts = repo_root().join("fixtures/hf/prompts.jsonl");
    let o = moe_xray(&[
        "trace",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--out",
        s(&out),
        "--max-new-tokens",
        "2",
    ]);
    ok(&o, "trace");
    assert!(out.join("generations.jsonl").is_file());
    assert!(out.join("manifest.json").is_file());

    let run = tmp.path().join("run-out");
    copy_dir(&out, &run.join("traces"));
    std::fs::copy(&prompts, run.join("prompts.jsonl")).unwrap();

    for dir in [&out, &run] {
        let json = tmp.path().join("h.json");
        let o = moe_xray(&["health", s(dir), "--json", s(&json)]);
        ok(&o, &format!("health {}", dir.display()));
        let h: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(h["inputs"]["token_records"].as_u64().unwrap() > 0, "{h}");
        let o = moe_xray(&[
            "compare",
            s(&out),
            s(dir),
            "--reps",
            "0",
            "--fail-above",
            "0",
        ]);
        ok(&o, &format!("compare {}", dir.display()));
    }
}

/// `analyze --weighted` without a manifest infers k from the data, as unweighted analysis does
/// (it used to fail with "top_k is unknown"), and gives the results of the run with a manifest.
#[test]
fn analyze_weighted_without_manifest_infers_top_k() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = repo_root().join("fixtures/stats/weighted_small");
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(fixture.join("trace.jsonl"), bare.join("trace.jsonl")).unwrap();
    let args = |trace: &Path, out: &Path| {
        vec![
            "analyze".to_string(),
            s(trace).to_string(),
            "--out".into(),
            s(out).into(),
            "--weighted".into(),
            "--reps".into(),
            "20".into(),
            "--classifier-perm-reps".into(),
            "3".into(),
            "--no-tsne".into(),
        ]
    };
    let run = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_moe-xray"))
            .args(&a)
            .output()
            .unwrap()
    };
    let (o1, o2) = (tmp.path().join("o1"), tmp.path().join("o2"));
    ok(
        &run(args(&bare.join("trace.jsonl"), &o1)),
        "analyze --weighted (no manifest)",
    );
    ok(
        &run(args(&fixture.join("trace.jsonl"), &o2)),
        "analyze --weighted (manifest)",
    );
    let read = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("results.json")).unwrap()).unwrap()
    };
    let (r1, r2) = (read(&o1), read(&o2));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(r1["top_k"], manifest["top_k"]);
    for key in ["similarity", "baselines", "per_layer", "pca"] {
        assert_eq!(r1[key], r2[key], "{key}");
    }
}

/// A manifest with 2^40 layers made `analyze` panic (index out of bounds after `L * E`
/// wrapped); 2^63 made `health` abort with "capacity overflow".
#[test]
fn huge_manifest_dimensions_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        repo_root().join("fixtures/stats/planted/trace.jsonl"),
        dir.join("trace.jsonl"),
    )
    .unwrap();
    let trace = dir.join("trace.jsonl");
    let out = tmp.path().join("out");
    for m in [
        r#"{"num_layers":1099511627776,"num_experts":1099511627776,"top_k":4}"#,
        r#"{"num_layers":9223372036854775808,"num_experts":64,"top_k":4}"#,
    ] {
        std::fs::write(dir.join("manifest.json"), m).unwrap();
        let o = moe_xray(&["analyze", s(&trace), "--out", s(&out), "--reps", "5"]);
        fails(&o, &["manifest.json", "exceeds the supported maximum"]);
        assert!(!out.join("results.json").exists());
        fails(
            &moe_xray(&["health", s(&dir)]),
            &["manifest.json", "exceeds the supported maximum"],
        );
    }
}

/// A `.jsonl.zst` file holding gzip data was accepted.
#[test]
fn compression_mismatch_fails_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // The reader refuses on the magic bytes, before decoding: a gzip header is enough.
    let mut gzip = vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
    gzip.extend(std::fs::read(repo_root().join("fixtures/stats/planted/trace.jsonl")).unwrap());
    let p = tmp.path().join("trace.jsonl.zst");
    std::fs::write(&p, gzip).unwrap();
    let out = tmp.path().join("out");
    let o = moe_xray(&[
        "analyze",
        s(&p),
        "--out",
        s(&out),
        "--reps",
        "5",
        "--top-k",
        "4",
    ]);
    fails(
        &o,
        &[
            "trace.jsonl.zst",
            "file name says zstd but the content is gzip data",
        ],
    );
    fails(&moe_xray(&["health", s(&p)]), &["trace.jsonl.zst", "gzip"]);
}

/// A CSV prompt file with an unclosed quote was accepted (the next prompt swallowed).
#[test]
fn csv_prompts_with_an_unclosed_quote_fail_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("prompts.csv");
    std::fs::write(
        &csv,
        "id,category,text\na,code,\"print(1)\nb,math,what is 2+2\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = moe_xray(&[
        "trace",
        "--model",
        s(&repo_root().join("fixtures/hf/olmoe-tiny-mha-f32")),
        "--prompts",
        s(&csv),
        "--out",
        s(&out),
    ]);
    fails(&o, &["prompts.csv:2: unclosed quote"]);
}
