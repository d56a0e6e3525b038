//! `analyze --format parquet` and `health --parquet DIR` (the binary): results.json unchanged,
//! byte-identical tables at 1 and 2 threads, tables of a format not asked for removed.

use moe_xray_test_support::fixture;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str], threads: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_moe-xray"))
        .env("RAYON_NUM_THREADS", threads)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn analyze(out: &Path, format: &str, threads: &str) {
    let trace = fixture("stats/planted").join("trace.jsonl");
    run(
        &[
            "analyze",
            trace.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--reps",
            "30",
            "--classifier-perm-reps",
            "5",
            "--quiet",
            "--format",
            format,
        ],
        threads,
    );
}

/// Relative paths of the files under `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn analyze_parquet_tables_beside_an_unchanged_results_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (csv, p1, p2) = (
        tmp.path().join("csv"),
        tmp.path().join("p1"),
        tmp.path().join("p2"),
    );
    analyze(&csv, "csv", "2");
    analyze(&p1, "csv,parquet", "1");
    analyze(&p2, "csv,parquet", "2");
    let read = |p: &Path| std::fs::read(p).unwrap();
    // results.json and the CSVs are the same bytes with or without Parquet
    for f in ["results.json", "signatures.csv", "prompt_similarity.csv"] {
        assert!(read(&csv.join(f)) == read(&p1.join(f)), "{f}");
    }
    // every file byte-identical at 1 and 2 threads
    let names = files(&p1);
    assert_eq!(names, files(&p2));
    for f in &names {
        assert!(read(&p1.join(f)) == read(&p2.join(f)), "{f} differs");
    }
    for f in [
        "signatures.parquet",
        "prompt_similarity.parquet",
        "prompts.parquet",
        "per_layer.parquet",
        "long/per_layer.parquet",
        "long/logreg_5fold.parquet",
        "long/settings.parquet",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} missing: {names:?}");
        assert_eq!(&read(&p1.join(f))[..4], b"PAR1", "{f}");
    }
    // Parquet only: the CSVs of the earlier run are removed; CSV only: the Parquet tables are
    analyze(&p1, "parquet", "2");
    let now = files(&p1);
    assert!(!now.iter().any(|n| n.ends_with(".csv")), "{now:?}");
    assert!(read(&csv.join("results.json")) == read(&p1.join("results.json")));
    analyze(&p1, "csv", "2");
    let now = files(&p1);
    assert!(!now.iter().any(|n| n.ends_with(".parquet")), "{now:?}");
    assert_eq!(now, files(&csv));
}

#[test]
fn health_parquet_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = fixture("stats/planted").join("trace.jsonl");
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        let dir = tmp.path().join(format!("h{threads}"));
        run(
            &[
                "health",
                trace.to_str().unwrap(),
                "--quiet",
                "--parquet",
                dir.to_str().unwrap(),
            ],
            threads,
        );
        outs.push(dir);
    }
    let names = files(&outs[0]);
    assert_eq!(
        names,
        [
            "coactivation.parquet",
            "layers.parquet",
            "load.parquet",
            "long.parquet",
            "pairs.parquet"
        ]
    );
    for f in &names {
        assert!(
            std::fs::read(outs[0].join(f)).unwrap() == std::fs::read(outs[1].join(f)).unwrap(),
            "{f} differs between 1 and 2 threads"
        );
    }
}
