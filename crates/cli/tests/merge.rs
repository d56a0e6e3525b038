//! `moe-xray map` + `moe-xray merge` give exactly the outputs of one `moe-xray analyze` over the
//! same traces (byte-identical files), for any split into parts and any order of the shards;
//! incompatible, incomplete, duplicated and damaged shards are refused, naming the file / prompt,
//! and nothing is written.

mod common;
use common::{moe_xray, s, stderr};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/stats")
        .join(name)
}

fn run_ok(args: &[&str]) {
    let o = moe_xray(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

/// Every file of `a` equals the file of the same name in `b`, and both have the same files.
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
    assert_eq!(na, nb);
    assert!(na.contains(&"results.json".to_string()));
    for n in na {
        let (x, y) = (
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
        );
        assert!(
            x == y,
            "{} differs from {}",
            a.join(&n).display(),
            b.join(&n).display()
        );
    }
}

/// Maps `trace` into `parts` shards (with `map_flags`) and returns them in the order `order`.
fn shards(
    dir: &Path,
    tag: &str,
    trace: &Path,
    parts: u64,
    order: &[u64],
    map_flags: &[&str],
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
        args.extend_from_slice(map_flags);
        run_ok(&args);
    }
    order
        .iter()
        .map(|i| s(&dir.join(format!("{tag}-{i}of{parts}.mxs"))).to_string())
        .collect()
}

/// analyze vs map (2 and 3 parts, shuffled) + merge, with the same statistics flags.
fn check(name: &str, map_flags: &[&str], stat_flags: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let trace = fixture(name).join("trace.jsonl");
    let reference = tmp.path().join("analyze");
    let mut args = vec!["analyze", s(&trace), "--out", s(&reference), "--quiet"];
    args.extend_from_slice(map_flags);
    args.extend_from_slice(stat_flags);
    run_ok(&args);
    for (parts, order) in [(2u64, vec![1u64, 0]), (3, vec![2, 0, 1]), (1, vec![0])] {
        let list = shards(tmp.path(), name, &trace, parts, &order, map_flags);
        let out = tmp.path().join(format!("merge{parts}"));
        let mut args = vec!["merge"];
        args.extend(list.iter().map(|x| x.as_str()));
        args.extend_from_slice(&["--out", s(&out), "--quiet"]);
        args.extend_from_slice(stat_flags);
        run_ok(&args);
        assert_same_dir(&reference, &out);
    }
}

#[test]
fn merge_equals_analyze_on_paper_shape_with_every_section() {
    let folds = fixture("paper_shape").join("folds.csv");
    check(
        "paper_shape",
        &[],
        &[
            "--folds",
            s(&folds),
            "--reps",
            "30",
            "--classifier-perm-reps",
            "3",
        ],
    );
}

#[test]
fn merge_equals_analyze_on_record_traces() {
    for name in ["null", "planted"] {
        let folds = fixture(name).join("folds.csv");
        check(
            name,
            &[],
            &[
                "--folds",
                s(&folds),
                "--reps",
                "20",
                "--classifier-perm-reps",
                "2",
                "--no-tsne",
            ],
        );
    }
}

#[test]
fn merge_equals_analyze_weighted_prompt_only_and_gram_path() {
    let stat = ["--reps", "20", "--classifier-perm-reps", "2", "--no-tsne"];
    check("weighted_small", &["--weighted"], &stat);
    check("weighted_small", &["--token-types", "prompt"], &stat);
    check("planted", &[], &["--gram", "--reps", "5"]);
}

#[test]
fn bad_shard_sets_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let trace = fixture("paper_shape").join("trace.jsonl");
    let two = shards(d, "p", &trace, 2, &[0, 1], &[]);
    let three = shards(d, "p", &trace, 3, &[0, 1, 2], &[]);
    let prompt_only = shards(d, "q", &trace, 2, &[0, 1], &["--token-types", "prompt"]);
    // The same traces under another name: every prompt is in two shards.
    let copy_dir = d.join("copy");
    std::fs::create_dir(&copy_dir).unwrap();
    for f in ["trace.jsonl", "manifest.json"] {
        std::fs::copy(fixture("paper_shape").join(f), copy_dir.join(f)).unwrap();
    }
    let copy = shards(d, "c", &copy_dir.join("trace.jsonl"), 1, &[0], &[]);
    let truncated = d.join("truncated.mxs");
    let bytes = std::fs::read(&two[0]).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 40]).unwrap();
    let out = d.join("out");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![&two[0], &two[0], &two[1]],
            vec!["is in two shards", &two[0]],
        ),
        (
            vec![&two[0], &two[1], &copy[0]],
            vec!["is in two shards", &copy[0], &two[0]],
        ),
        (vec![&three[0], &three[2]], vec!["missing part(s) [1]"]),
        (
            vec![&two[0], &three[1], &three[2], &three[0]],
            vec!["split into 2 and 3 parts"],
        ),
        (
            vec![&two[0], &prompt_only[1]],
            vec!["token_types differs", &prompt_only[1]],
        ),
        (
            vec![s(&truncated), &two[1]],
            vec![s(&truncated), "truncated"],
        ),
    ];
    for (list, needles) in cases {
        let mut args = vec!["merge"];
        args.extend(list.iter().copied());
        args.extend_from_slice(&["--out", s(&out), "--reps", "2", "--no-tsne", "--quiet"]);
        let o = moe_xray(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{list:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{list:?}: {n:?} not in {err}");
        }
        assert!(!out.join("results.json").exists());
    }
    // Flags of map: a bad part, and traces whose dimensions would have to be inferred.
    let o = moe_xray(&[
        "map",
        s(&trace),
        "--part",
        "2/2",
        "--out",
        s(&d.join("x.mxs")),
    ]);
    assert!(stderr(&o).contains("0 <= I < N"), "{}", stderr(&o));
    let bare = d.join("bare.jsonl");
    std::fs::copy(fixture("null").join("trace.jsonl"), &bare).unwrap();
    let o = moe_xray(&["map", s(&bare), "--out", s(&d.join("y.mxs"))]);
    assert!(
        stderr(&o).contains("cannot be inferred from one shard"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("y.mxs").exists());
}
