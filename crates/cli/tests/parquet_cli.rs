//! Parquet traces through the CLI: `convert --to parquet|parquet-dataset`, `trace --format
//! parquet`, and `analyze` / `health` / `compare` / `map`+`merge` reading a Parquet file or a
//! Hive dataset back with the same outputs as on the JSONL trace (byte for byte once the input
//! paths, which name different files, are replaced); bad Parquet input fails with exit 1, one
//! error naming the file, and nothing written.

use moe_xray_test_support::{fixture, repo_root};
use std::path::{Path, PathBuf};
use std::process::Output;
mod common;
use common::{moe_xray, s, stderr};

fn ok(args: &[&str]) -> Output {
    let o = moe_xray(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// `text` with every input path replaced by `TRACE` (results name their inputs).
fn unpathed(text: &str, paths: &[&Path]) -> String {
    let mut t = text.to_string();
    for p in paths {
        t = t.replace(s(p), "TRACE");
    }
    t
}

struct Forms {
    _dir: tempfile::TempDir,
    jsonl: PathBuf,
    file: PathBuf,
    dataset: PathBuf,
}

fn forms(case: &str) -> Forms {
    let d = tempfile::tempdir().unwrap();
    let jsonl = fixture(format!("stats/{case}/trace.jsonl"));
    let file = d.path().join("t.parquet");
    let dataset = d.path().join("ds");
    ok(&[
        "convert",
        s(&jsonl),
        "--to",
        "parquet",
        "--out",
        s(&file),
        "--quiet",
    ]);
    ok(&[
        "convert",
        s(&jsonl),
        "--to",
        "parquet-dataset",
        "--out",
        s(&dataset),
        "--rows-per-part",
        "700",
        "--quiet",
    ]);
    Forms {
        _dir: d,
        jsonl,
        file,
        dataset,
    }
}

#[test]
fn analyze_reads_parquet_files_and_datasets_identically() {
    for (case, extra) in [
        ("planted", vec![]),
        (
            "weighted_small",
            vec!["--weighted", "--token-types", "prompt"],
        ),
    ] {
        let f = forms(case);
        let out = tempfile::tempdir().unwrap();
        let mut results = Vec::new();
        for (i, t) in [&f.jsonl, &f.file, &f.dataset].into_iter().enumerate() {
            let o = out.path().join(format!("a{i}"));
            let mut args = vec![
                "analyze",
                s(t),
                "--reps",
                "20",
                "--classifier-perm-reps",
                "10",
                "--out",
                s(&o),
                "--quiet",
            ];
            args.extend(extra.iter().copied());
            ok(&args);
            let r = std::fs::read_to_string(o.join("results.json")).unwrap();
            let sig = std::fs::read(o.join("signatures.csv")).unwrap();
            results.push((unpathed(&r, &[t]), sig));
        }
        assert!(results[0].0.contains("\"TRACE\""), "{case}");
        assert_eq!(results[0], results[1], "{case}: Parquet file");
        assert_eq!(results[0], results[2], "{case}: Parquet dataset");
    }
}

#[test]
fn health_compare_and_map_read_parquet_identically() {
    let f = forms("planted");
    let other = fixture("stats/null/trace.jsonl");
    let out = tempfile::tempdir().unwrap();
    let mut health = Vec::new();
    let mut compare = Vec::new();
    let mut merged = Vec::new();
    for (i, t) in [&f.jsonl, &f.file, &f.dataset].into_iter().enumerate() {
        let h = ok(&["health", s(t), "--json"]);
        health.push(unpathed(&String::from_utf8_lossy(&h.stdout), &[t]));
        let c = ok(&["compare", s(t), s(&other), "--json"]);
        compare.push(unpathed(&String::from_utf8_lossy(&c.stdout), &[t]));
        let mut shards = Vec::new();
        for part in ["0/2", "1/2"] {
            let sh = out.path().join(format!("s{i}-{}.shard", &part[..1]));
            ok(&["map", s(t), "--part", part, "--out", s(&sh), "--quiet"]);
            shards.push(sh);
        }
        let m = out.path().join(format!("m{i}"));
        ok(&[
            "merge",
            s(&shards[0]),
            s(&shards[1]),
            "--reps",
            "20",
            "--classifier-perm-reps",
            "10",
            "--out",
            s(&m),
            "--quiet",
        ]);
        let r = std::fs::read_to_string(m.join("results.json")).unwrap();
        merged.push(unpathed(&r, &[t]));
    }
    for (what, v) in [
        ("health", &health),
        ("compare", &compare),
        ("merge", &merged),
    ] {
        assert!(v[0].len() > 100, "{what}");
        assert_eq!(v[0], v[1], "{what}: Parquet file");
        assert_eq!(v[0], v[2], "{what}: Parquet dataset");
    }
}

#[test]
fn trace_format_parquet_equals_the_jsonl_trace() {
    let model = repo_root().join("fixtures/hf/olmoe-tiny-bf16");
    let prompts = repo_root().join("fixtures/hf/prompts.jsonl");
    let d = tempfile::tempdir().unwrap();
    let (tj, tp) = (d.path().join("tj"), d.path().join("tp"));
    let base = |out: &Path| {
        vec![
            "trace".to_string(),
            "--model".into(),
            s(&model).into(),
            "--prompts".into(),
            s(&prompts).into(),
            "--out".into(),
            s(out).into(),
            "--max-new-tokens".into(),
            "3".into(),
            "--record-probs".into(),
            "--quiet".into(),
        ]
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        moe_xray(&a)
    };
    assert!(run(base(&tj)).status.success());
    let mut pa = base(&tp);
    pa.extend(["--format".to_string(), "parquet".to_string()]);
    let o = run(pa.clone());
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&tp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["generations.jsonl", "manifest.json", "trace.parquet"]
    );
    assert_eq!(
        std::fs::read(tj.join("generations.jsonl")).unwrap(),
        std::fs::read(tp.join("generations.jsonl")).unwrap()
    );
    // Same records, same order; the manifests differ only in `trace_file`.
    moe_xray_pipeline::install_trace_formats();
    let a = moe_xray_trace::reader::read_all(tj.join("trace.jsonl")).unwrap();
    let b = moe_xray_trace::reader::read_all(tp.join("trace.parquet")).unwrap();
    assert!(!a.is_empty());
    assert_eq!(a, b);
    let mj = moe_xray_trace::Manifest::read(tj.join("manifest.json")).unwrap();
    let mut mp = moe_xray_trace::read_manifest_beside(tp.join("trace.parquet"))
        .unwrap()
        .unwrap();
    assert_eq!(
        mp,
        moe_xray_trace::Manifest::read(tp.join("manifest.json")).unwrap()
    );
    assert_eq!(mp.extra["trace_file"], "trace.parquet");
    mp.extra.insert("trace_file".into(), "trace.jsonl".into());
    assert_eq!(mp, mj);
    // Into the same directory again: refused; --resume: refused, nothing created.
    let o = run(pa);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    let tr = d.path().join("tr");
    let mut ra = base(&tr);
    ra.extend(["--format".into(), "parquet".into(), "--resume".into()]);
    let o = run(ra);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume is not supported with --format parquet"));
    assert!(!tr.exists());
}

#[test]
fn bad_parquet_input_fails_with_one_error_and_writes_nothing() {
    let f = forms("weighted_small");
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&f.file).unwrap();
    let cut = d.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    // A dataset whose parts disagree on the manifest's dimensions.
    let mixed = d.path().join("mixed");
    let mut m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("stats/weighted_small/manifest.json")).unwrap(),
    )
    .unwrap();
    m["num_layers"] = serde_json::json!(m["num_layers"].as_u64().unwrap() + 1);
    let mdir = d.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("manifest.json"), m.to_string()).unwrap();
    std::fs::copy(f.jsonl.clone(), mdir.join("trace.jsonl")).unwrap();
    let other = d.path().join("other");
    ok(&[
        "convert",
        s(&mdir),
        "--to",
        "parquet-dataset",
        "--out",
        s(&other),
        "--run",
        "r",
        "--quiet",
    ]);
    ok(&[
        "convert",
        s(&f.jsonl),
        "--to",
        "parquet-dataset",
        "--out",
        s(&mixed),
        "--run",
        "r",
        "--quiet",
    ]);
    let cats: Vec<PathBuf> = std::fs::read_dir(other.join("run=r"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let victim = cats[0].join("part-0.parquet");
    let target = mixed
        .join("run=r")
        .join(cats[0].file_name().unwrap())
        .join("part-0.parquet");
    std::fs::copy(&victim, &target).unwrap();
    for (input, want) in [
        (&cut, vec!["cut.parquet", "truncated or corrupt"]),
        (&mixed, vec!["part-0.parquet", "num_layers"]),
    ] {
        for cmd in ["analyze", "health", "map"] {
            let out = d.path().join(format!("out-{cmd}"));
            let args: Vec<&str> = match cmd {
                "analyze" => vec![cmd, s(input), "--out", s(&out), "--reps", "5"],
                "map" => vec![cmd, s(input), "--out", s(&out)],
                _ => vec![cmd, s(input), "--json-out", s(&out)],
            };
            let o = moe_xray(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let e = stderr(&o);
            assert_eq!(
                e.lines().filter(|l| l.starts_with("error:")).count(),
                1,
                "{e}"
            );
            for w in &want {
                assert!(e.contains(w), "{args:?}: `{w}` not in {e}");
            }
            assert!(!out.exists(), "{args:?} wrote {}", out.display());
        }
    }
}
