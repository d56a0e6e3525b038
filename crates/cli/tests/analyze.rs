//! Integration tests of `moe-xray analyze` (the binary).

use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe-xray"))
}

fn run(args: &[&str], threads: &str) -> std::process::Output {
    bin()
        .env("RAYON_NUM_THREADS", threads)
        .args(args)
        .output()
        .unwrap()
}

fn small_args<'a>(trace: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "analyze",
        trace,
        "--out",
        out,
        "--reps",
        "50",
        "--classifier-perm-reps",
        "5",
        "--no-tsne",
    ]
}

#[test]
fn good_run_writes_all_outputs_and_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let trace = fixture("stats/planted").join("trace.jsonl");
    let folds = fixture("stats/planted").join("folds.csv");
    let (t, o, f) = (
        trace.to_str().unwrap(),
        out.to_str().unwrap(),
        folds.to_str().unwrap(),
    );
    let mut args = small_args(t, o);
    args.extend(["--folds", f]);
    let r = run(&args, "2");
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        stdout.contains("within-category similarity  0.7622"),
        "{stdout}"
    );
    assert!(stdout.contains("Cohen's d = 1.376"), "{stdout}");
    assert!(stdout.contains("95% CI"), "{stdout}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["schema_version"], 1);
    assert_eq!(res["path"], "exact_pairs");
    assert_eq!(res["num_prompts"], 40);
    assert_eq!(res["top_k"], 4);
    assert_eq!(res["input"]["manifest"]["model"], "synthetic-planted");
    assert_eq!(
        res["logreg_5fold"]["fold_accuracies"],
        serde_json::json!([1.0, 0.875, 0.875, 1.0, 1.0])
    );
    let sig = std::fs::read_to_string(out.join("signatures.csv")).unwrap();
    assert_eq!(sig.lines().count(), 41);
    assert!(sig.starts_with("prompt_id,category,l0_e0,l0_e1"));
    let sim = std::fs::read_to_string(out.join("prompt_similarity.csv")).unwrap();
    assert_eq!(sim.lines().count(), 41);
    assert_eq!(sim.lines().nth(1).unwrap().split(',').count(), 41);
    // no temp files left behind
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with(".moe-xray-tmp"), "{name}");
    }
}

#[test]
fn json_output_and_thread_count_independence() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = fixture("stats/null").join("trace.jsonl");
    let t = trace.to_str().unwrap();
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("out{threads}"));
        let o = out.to_str().unwrap().to_string();
        let mut args = small_args(t, &o);
        args.push("--json");
        let r = run(&args, threads);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let printed: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(printed["num_prompts"], 40);
        outs.push((
            std::fs::read(out.join("results.json")).unwrap(),
            std::fs::read(out.join("prompt_similarity.csv")).unwrap(),
        ));
    }
    assert!(
        outs[0] == outs[1],
        "outputs differ between RAYON_NUM_THREADS=1 and 2"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn rec(id: &str, cat: &str, layer: u32, pos: u32, experts: &str) -> String {
    format!(
        "{{\"prompt_id\":\"{id}\",\"category\":\"{cat}\",\"layer\":{layer},\"position\":{pos},\"token_type\":\"prompt\",\"experts\":{experts}}}\n"
    )
}

fn expect_failure(args: &[&str], out: &Path, needles: &[&str]) {
    let r = run(args, "2");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "expected failure, got success");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.join("results.json").exists(), "partial output written");
    assert!(
        !out.join("signatures.csv").exists(),
        "partial output written"
    );
}

#[test]
fn bad_inputs_fail_cleanly_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let dims = ["--num-layers", "1", "--num-experts", "4", "--top-k", "1"];

    // malformed JSON on line 2
    let good = rec("a1", "a", 0, 0, "[0]");
    let p = write(d, "bad.jsonl", &format!("{good}{{not json\n"));
    let mut args = vec!["analyze", p.to_str().unwrap(), "--out", o];
    args.extend(dims);
    expect_failure(&args, &out, &["bad.jsonl:2"]);

    // expert index out of range
    let p = write(
        d,
        "range.jsonl",
        &format!("{good}{}", rec("a2", "a", 0, 0, "[7]")),
    );
    let mut args = vec!["analyze", p.to_str().unwrap(), "--out", o];
    args.extend(dims);
    expect_failure(&args, &out, &["range.jsonl:2"]);

    // one category only
    let text: String = (0..4)
        .map(|i| rec(&format!("a{i}"), "a", 0, 0, "[1]"))
        .collect();
    let p = write(d, "onecat.jsonl", &text);
    let mut args = vec!["analyze", p.to_str().unwrap(), "--out", o];
    args.extend(dims);
    expect_failure(&args, &out, &["at least 2 categories"]);

    // empty file
    let p = write(d, "empty.jsonl", "");
    let mut args = vec!["analyze", p.to_str().unwrap(), "--out", o];
    args.extend(dims);
    expect_failure(&args, &out, &["empty.jsonl"]);

    // unknown token type on the command line
    let p = write(d, "ok.jsonl", &good);
    let mut args = vec![
        "analyze",
        p.to_str().unwrap(),
        "--out",
        o,
        "--token-types",
        "answer",
    ];
    args.extend(dims);
    expect_failure(&args, &out, &["unknown token type"]);

    // missing file
    let missing = d.join("nope.jsonl");
    let mut args = vec!["analyze", missing.to_str().unwrap(), "--out", o];
    args.extend(dims);
    expect_failure(&args, &out, &["nope.jsonl"]);
}

#[test]
fn dims_from_model_config_and_dropped_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = d.join("model");
    std::fs::create_dir(&model).unwrap();
    write(
        &model,
        "config.json",
        r#"{"num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 1}"#,
    );
    let mut text = String::new();
    for (i, cat) in ["a", "a", "b", "b", "b"].iter().enumerate() {
        let id = format!("p{i}");
        for pos in 0..3u32 {
            let e = (i as u32 + pos) % 4;
            text += &rec(&id, cat, 0, pos, &format!("[{e}]"));
            // p4 has no routing at layer 1 -> dropped
            if i != 4 {
                text += &rec(&id, cat, 1, pos, &format!("[{}]", (e + 1) % 4));
            }
        }
    }
    let p = write(d, "t.jsonl", &text);
    let out = d.join("out");
    let r = run(
        &[
            "analyze",
            p.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--reps",
            "20",
            "--no-tsne",
            "--no-classifier",
        ],
        "2",
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["num_layers"], 2);
    assert_eq!(res["num_experts"], 4);
    assert_eq!(res["num_prompts"], 4);
    assert_eq!(res["dropped_prompts"][0]["prompt_id"], "p4");
    assert!(String::from_utf8_lossy(&r.stdout).contains("dropped 1 prompt"));
}

#[test]
fn quiet_prints_nothing_and_changes_no_output_and_inferred_dims_are_warned() {
    let tmp = tempfile::tempdir().unwrap();
    // A copy of fixtures/stats/null's trace without its manifest: L and E are inferred from the
    // records, with a warning on stderr.
    let trace = tmp.path().join("trace.jsonl");
    std::fs::copy(fixture("stats/null").join("trace.jsonl"), &trace).unwrap();
    let t = trace.to_str().unwrap();
    let mut outs = Vec::new();
    for quiet in [false, true] {
        let out = tmp.path().join(format!("out{quiet}"));
        let o = out.to_str().unwrap().to_string();
        let mut args = small_args(t, &o);
        if quiet {
            args.push("--quiet");
        }
        let r = run(&args, "2");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(
            r.stdout.is_empty(),
            quiet,
            "{}",
            String::from_utf8_lossy(&r.stdout)
        );
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(e.contains("WARNING") && e.contains("INFERRED"), "{e}");
        assert!(e.contains("--num-experts E"), "{e}");
        let files: Vec<Vec<u8>> = ["results.json", "signatures.csv", "prompt_similarity.csv"]
            .iter()
            .map(|f| std::fs::read(out.join(f)).unwrap())
            .collect();
        outs.push(files);
    }
    assert!(outs[0] == outs[1], "--quiet changed an output file");
}

/// Confound controls: the lexical baseline is always written and printed; `--token-matched`
/// adds the token-matched statistics (residual on the planted fixture, whose random token ids
/// leave no id shared by every category, so `shared` is skipped with that reason).
#[test]
fn lexical_baseline_and_token_matched() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = fixture("stats/planted").join("trace.jsonl");
    let folds = fixture("stats/planted").join("folds.csv");
    let t = trace.to_str().unwrap();
    for (mode, want) in [
        ("residual", "token-matched (residual"),
        (
            "shared",
            "token-matched statistics skipped: no token id occurs in every category",
        ),
    ] {
        let out = tmp.path().join(mode);
        let o = out.to_str().unwrap();
        let mut args = small_args(t, o);
        args.extend(["--folds", folds.to_str().unwrap(), "--token-matched", mode]);
        let r = run(&args, "1");
        let stdout = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(
            stdout.contains("lexical baseline (token ids only, 1081 ids): accuracy 27.5%"),
            "{stdout}"
        );
        assert!(stdout.contains(want), "{stdout}");
        let res: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(
            res["lexical_baseline"]["classifier"]["accuracy_mean"],
            0.275
        );
        assert_eq!(res["lexical_baseline"]["vocabulary"], 1081);
        if mode == "residual" {
            assert_eq!(res["token_matched"]["mode"], "residual");
            assert_eq!(res["token_matched"]["num_prompts"], 20);
        } else {
            assert!(res["token_matched"]["skipped"].is_string());
        }
    }
    let out = tmp.path().join("bad");
    let mut args = small_args(t, out.to_str().unwrap());
    args.extend(["--token-matched", "lexical"]);
    let r = run(&args, "1");
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--token-matched"));
    // Counts-form traces have no token ids.
    let counts = fixture("stats/paper_shape").join("trace.jsonl");
    let out = tmp.path().join("counts");
    let args = small_args(counts.to_str().unwrap(), out.to_str().unwrap());
    let r = run(&args, "1");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        res["lexical_baseline"]["skipped"],
        "counts-form traces have no token ids"
    );
    assert!(res.get("token_matched").is_none());
}
