//! End-to-end tests of `moe-xray demo` (random and planted) and of `run`'s resume behaviour.
//! These run the real pipeline (synthetic checkpoint → trace → analyze → health → report) with
//! fewer generated tokens and repetitions than the defaults, to keep CI time reasonable.

use std::path::Path;
use std::process::Command;

fn moe_xray() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe-xray"))
}

fn results(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json written");
    serde_json::from_str(&text).expect("results.json parses")
}

/// The structure of a JSON value: one line per leaf path with its type (arrays: their first
/// element), sorted by key — a snapshot of the results.json schema that ignores the values.
fn shape(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                shape(&m[k], &join(k), out);
            }
        }
        Value::Array(a) => {
            out.push(format!("{path}: array"));
            if let Some(first) = a.first() {
                shape(first, &format!("{path}[]"), out);
            }
        }
        Value::Null => out.push(format!("{path}: null")),
        Value::Bool(_) => out.push(format!("{path}: bool")),
        Value::Number(_) => out.push(format!("{path}: number")),
        Value::String(_) => out.push(format!("{path}: string")),
    }
}

fn demo(dir: &Path, planted: bool) -> String {
    let mut cmd = moe_xray();
    cmd.args([
        "demo",
        "--quiet",
        "--max-new-tokens",
        "4",
        "--reps",
        "100",
        "--out",
    ])
    .arg(dir);
    if planted {
        cmd.arg("--planted");
    }
    let out = cmd.output().expect("moe-xray runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_random_and_planted_and_rerun_reuses_traces() {
    let tmp = tempfile::tempdir().unwrap();

    // Random-weight model: the report must say it is not evidence.
    let rdir = tmp.path().join("random");
    let stdout = demo(&rdir, false);
    assert!(stdout.contains("NOT evidence"), "{stdout}");
    let report = std::fs::read_to_string(rdir.join("report.html")).unwrap();
    assert!(
        report.contains("random-weight synthetic model"),
        "interpretation box missing"
    );
    for fig in [
        "<svg", "Figure 1", "Figure 2", "Figure 3", "Figure 4", "Figure 5",
    ] {
        assert!(report.contains(fig), "{fig} missing from report.html");
    }
    let r = results(&rdir);
    // Snapshot of the results.json structure (the manifest's content is free-form).
    let mut structure = r.clone();
    structure["input"]["manifest"] = serde_json::json!({});
    let mut lines = Vec::new();
    shape(&structure, "", &mut lines);
    let expected = include_str!("snapshots/results_shape.txt");
    assert_eq!(
        lines.join("\n") + "\n",
        expected,
        "results.json structure changed: update crates/cli/tests/snapshots/results_shape.txt"
    );
    assert_eq!(r["num_prompts"], 80);
    assert_eq!(r["num_layers"], 16);
    assert_eq!(r["num_experts"], 64);
    for f in [
        "traces/trace.jsonl.gz",
        "traces/generations.jsonl",
        "traces/manifest.json",
        "signatures.csv",
        "prompt_similarity.csv",
        "health.json",
        "prompts.jsonl",
    ] {
        assert!(rdir.join(f).exists(), "{f} missing");
    }

    // A re-run reuses the finished traces: the trace file is not rewritten.
    let trace = rdir.join("traces/trace.jsonl.gz");
    let before = std::fs::read(&trace).unwrap();
    demo(&rdir, false);
    assert_eq!(std::fs::read(&trace).unwrap(), before);
    // ... and the analysis is byte-identical (same inputs, same seed).
    let again = results(&rdir);
    assert_eq!(again["similarity"], r["similarity"]);
    assert_eq!(again["baselines"], r["baselines"]);

    // Planted positive control: the pipeline must find the structure.
    let pdir = tmp.path().join("planted");
    demo(&pdir, true);
    let p = results(&pdir);
    let d = p["similarity"]["cohens_d"].as_f64().unwrap();
    assert!(d > 1.0, "planted control: Cohen's d {d} should exceed 1");
    let acc = p["logreg_5fold"]["accuracy_mean"].as_f64().unwrap();
    let chance = p["logreg_5fold"]["chance"].as_f64().unwrap();
    assert!(
        acc > chance + 0.4,
        "planted control: accuracy {acc} vs chance {chance}"
    );
    let report = std::fs::read_to_string(pdir.join("report.html")).unwrap();
    assert!(
        report.to_lowercase().contains("planted"),
        "report must say the model is planted"
    );
}

#[test]
fn run_rejects_missing_model_and_unknown_prompt_set() {
    let tmp = tempfile::tempdir().unwrap();
    let out = moe_xray()
        .args(["run", "--model"])
        .arg(tmp.path().join("nope"))
        .args(["--prompts", "no-such-set", "--out"])
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-set"), "{err}");
    assert!(!tmp.path().join("o/report.html").exists());
}
