//! The health section and the Gram-sums shards of `moe-xray map` / `merge`
//! (docs/statistics.md, "Sharded analysis"):
//! - `map --health` + `merge --health DIR` write byte-identical health outputs (health.json,
//!   the CSV tables, the figures) to one `moe-xray health` over the same traces, for shards of
//!   1, 2 and 3 parts given in a shuffled order — on per-token and counts-form fixtures, a trace
//!   with the full router distribution (entropy and margin), and an imported vLLM run with a dense
//!   layer; `merge --health DIR --mi` equals `health --mi`;
//! - `map --gram-sums` + `merge` equal `analyze --gram` to 1e-9, byte-identically whatever the
//!   order of the shards;
//! - mixed, health-less and `--exact-pairs` requests are refused, naming the file, and nothing is
//!   written.

mod common;
use common::{moe_xray, s, stderr};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn run_ok(args: &[&str]) {
    let o = moe_xray(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

/// Same file names, same bytes.
fn assert_same_dir(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "{} vs {}", a.display(), b.display());
    for n in na {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{} differs from {}",
            a.join(&n).display(),
            b.join(&n).display()
        );
    }
}

/// Maps `trace` into `parts` shards and returns them in the order `order`.
fn shards(
    dir: &Path,
    tag: &str,
    trace: &Path,
    parts: u64,
    order: &[u64],
    flags: &[&str],
) -> Vec<String> {
    for i in 0..parts {
        let out = dir.join(format!("{tag}-{i}of{parts}.mxs"));
        let part = format!("{i}/{parts}");
        let mut args = vec![
            "map",
            s(trace),
            "--part",
            &part,
            "--out",
            s(&out),
            "--quiet",
        ];
        args.extend_from_slice(flags);
        run_ok(&args);
    }
    order
        .iter()
        .map(|i| s(&dir.join(format!("{tag}-{i}of{parts}.mxs"))).to_string())
        .collect()
}

/// `health` on `trace` vs `map --health` (1, 2, 3 parts, shuffled) + `merge --health`.
fn check_health(trace: &Path, flags: &[&str], health_flags: &[&str]) {
    check_health_with(trace, flags, health_flags, &[], &[]);
}

/// [`check_health`] with flags given only to `health` (`only_health`) or only to `merge`
/// (`only_merge`), e.g. the spellings of the --mi options.
fn check_health_with(
    trace: &Path,
    flags: &[&str],
    health_flags: &[&str],
    only_health: &[&str],
    only_merge: &[&str],
) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let want = d.join("health");
    let json = want.join("health.json");
    let mut args = vec![
        "health",
        s(trace),
        "--json-out",
        s(&json),
        "--csv",
        s(&want),
        "--svg",
        s(&want),
        "--quiet",
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(health_flags);
    args.extend_from_slice(only_health);
    run_ok(&args);
    let mut map_flags = vec!["--health"];
    map_flags.extend_from_slice(flags);
    for (parts, order) in [(1u64, vec![0u64]), (2, vec![1, 0]), (3, vec![2, 0, 1])] {
        let list = shards(d, "h", trace, parts, &order, &map_flags);
        let got = d.join(format!("merged-health-{parts}"));
        let analysis = d.join(format!("analysis-{parts}"));
        let mut args = vec!["merge"];
        args.extend(list.iter().map(|x| x.as_str()));
        args.extend_from_slice(&[
            "--out",
            s(&analysis),
            "--health",
            s(&got),
            "--reps",
            "3",
            "--no-tsne",
            "--no-classifier",
            "--quiet",
        ]);
        args.extend_from_slice(health_flags);
        args.extend_from_slice(only_merge);
        run_ok(&args);
        assert_same_dir(&want, &got);
        assert!(analysis.join("results.json").exists());
    }
}

#[test]
fn merged_health_equals_health_on_stats_fixtures() {
    // Per-token records (co-activation) and counts lines (no co-activation).
    check_health(&repo("fixtures/stats/planted/trace.jsonl"), &[], &[]);
    check_health(
        &repo("fixtures/stats/paper_shape/trace.jsonl"),
        &["--token-types", "prompt"],
        &["--cold-fraction", "0.5", "--top-pairs", "3"],
    );
}

#[test]
fn merged_mutual_information_equals_health_mi() {
    for name in ["planted", "paper_shape"] {
        check_health_with(
            &repo(&format!("fixtures/stats/{name}/trace.jsonl")),
            &[],
            &[],
            &["--mi", "--perms", "40", "--seed", "3", "--mi-bins", "4"],
            &["--mi", "--mi-perms", "40", "--seed", "3", "--mi-bins", "4"],
        );
    }
}

#[test]
fn merged_health_equals_health_with_router_distribution() {
    // `probs` on every record: router entropy and top-k margin (exact sums, not Welford).
    let dir = repo("fixtures/hf/olmoe-tiny-mha-f32");
    let trace = dir.join("expected_trace.jsonl");
    check_health(&trace, &["--model", s(&dir)], &[]);
    let h: Value = serde_json::from_slice(
        &moe_xray(&["health", s(&trace), "--model", s(&dir), "--json"]).stdout,
    )
    .unwrap();
    assert!(h["layers"][0]["router"]["margin_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn merged_health_equals_health_on_an_imported_vllm_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("va");
    let fx = |p: &str| repo(&format!("fixtures/import/{p}"));
    run_ok(&[
        "import",
        "vllm",
        s(&fx("vllm/run_a.npz")),
        "--requests",
        s(&fx("vllm/requests_a.jsonl")),
        "--config",
        s(&fx("config.json")),
        "--out",
        s(&run),
    ]);
    check_health(&run.join("trace.jsonl"), &[], &[]);
}

/// Every number of `a` within `tol` of `b` (relative to max(1, |x|)), everything else equal.
fn assert_close(a: &Value, b: &Value, tol: f64, path: &str) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}"
            );
            for (k, v) in x {
                assert_close(v, &y[k], tol, &format!("{path}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}");
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                assert_close(u, v, tol, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (u, v) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (u - v).abs() <= tol * u.abs().max(1.0),
                "{path}: {u} vs {v}"
            );
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

#[test]
fn gram_sums_shards_equal_analyze_gram_in_any_order() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for name in ["planted", "weighted_small"] {
        let trace = repo(&format!("fixtures/stats/{name}/trace.jsonl"));
        let want = d.join(format!("analyze-{name}"));
        run_ok(&["analyze", s(&trace), "--gram", "--out", s(&want), "--quiet"]);
        let want: Value =
            serde_json::from_slice(&std::fs::read(want.join("results.json")).unwrap()).unwrap();
        assert_eq!(want["path"], "gram_sums");
        let mut first: Option<Vec<u8>> = None;
        for (parts, order) in [(1u64, vec![0u64]), (3, vec![2, 0, 1]), (3, vec![1, 2, 0])] {
            let list = shards(d, name, &trace, parts, &order, &["--gram-sums"]);
            let out = d.join(format!("merged-{name}-{parts}-{}", order[0]));
            let mut args = vec!["merge"];
            args.extend(list.iter().map(|x| x.as_str()));
            args.extend_from_slice(&["--out", s(&out), "--quiet"]);
            run_ok(&args);
            let bytes = std::fs::read(out.join("results.json")).unwrap();
            let got: Value = serde_json::from_slice(&bytes).unwrap();
            assert_close(&want, &got, 1e-9, name);
            assert!(got["baselines"]["permutation"]["skipped"].is_string());
            // The same split in another order: the same bytes.
            if parts == 3 {
                match &first {
                    None => first = Some(bytes),
                    Some(f) => assert!(*f == bytes, "{name}: shard order changed the bytes"),
                }
            }
        }
    }
}

#[test]
fn health_and_gram_refusals_name_the_file_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let trace = repo("fixtures/stats/planted/trace.jsonl");
    let counts = shards(d, "c", &trace, 2, &[0, 1], &[]);
    let gram = shards(d, "g", &trace, 2, &[0, 1], &["--gram-sums", "--health"]);
    let out = d.join("out");
    let health = d.join("health");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![&counts[0], &counts[1], "--health", s(&health)],
            vec!["no health section", &counts[0], "map it with --health"],
        ),
        (vec![&counts[0], &gram[1]], vec!["kind differs", &gram[1]]),
        (
            vec![&gram[0], &gram[1], "--exact-pairs"],
            vec!["--exact-pairs needs the per-prompt counts"],
        ),
        (vec![&gram[1]], vec!["missing part(s) [0]"]),
        (
            vec![&gram[0], &gram[1], "--health", s(&health), "--mi"],
            vec!["--mi needs every prompt's counts"],
        ),
    ];
    for (list, needles) in cases {
        let mut args = vec!["merge"];
        args.extend(list.iter().copied());
        args.extend_from_slice(&["--out", s(&out), "--reps", "2", "--quiet"]);
        let o = moe_xray(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{list:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{list:?}: {n:?} not in {err}");
        }
        assert!(!out.join("results.json").exists());
        assert!(!health.join("health.json").exists());
    }
    // A truncated shard with a health section is refused naming the file (the health
    // section's own hostile-input checks: `moe_xray_health::state` unit tests).
    let h = shards(d, "h", &trace, 1, &[0], &["--health"]);
    let bytes = std::fs::read(&h[0]).unwrap();
    let bad_path = d.join("bad.mxs");
    std::fs::write(&bad_path, &bytes[..bytes.len() - 20]).unwrap();
    let o = moe_xray(&[
        "merge",
        s(&bad_path),
        "--out",
        s(&out),
        "--health",
        s(&health),
        "--reps",
        "2",
        "--quiet",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(s(&bad_path)), "{}", stderr(&o));
    assert!(!health.join("health.json").exists());
}
