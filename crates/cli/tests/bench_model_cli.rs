//! `moe-xray bench model` end to end on a committed HF fixture: the token accounting of both
//! passes agrees with what `moe-xray trace` processes, the scratch trace is removed, and bad
//! arguments fail with a clear message.

use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
mod common;
use common::s;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moe-xray"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// The committed fixture model and prompt file every run here uses.
fn model_and_prompts() -> (PathBuf, PathBuf) {
    (
        fixture("hf").join("olmoe-tiny-gqa-f32"),
        fixture("hf").join("prompts.jsonl"),
    )
}

/// `moe-xray bench model --model M --prompts P` followed by `extra`.
fn bench_model(model: &Path, prompts: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "model",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn bench_model_counts_match_trace() {
    let (model, prompts) = model_and_prompts();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let o = bench_model(
        &model,
        &prompts,
        &[
            "-n",
            "5",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--capture",
            "events",
            "--scratch",
            s(&scratch),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();

    // The same five prompts through `trace` (EOS ignored, so exactly 3 new tokens each).
    let p5 = tmp.path().join("p5.jsonl");
    let text = std::fs::read_to_string(&prompts).unwrap();
    let five: Vec<&str> = text.lines().take(5).collect();
    std::fs::write(&p5, five.join("\n") + "\n").unwrap();
    let out = tmp.path().join("trace");
    let t = run(&[
        "trace",
        "--model",
        s(&model),
        "--prompts",
        s(&p5),
        "--out",
        s(&out),
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--quiet",
        "--json",
    ]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let tj: Value = serde_json::from_slice(&t.stdout).unwrap();
    let prompt_tokens = tj["prompt_tokens"].as_u64().unwrap();
    let generated = tj["generated_tokens"].as_u64().unwrap();
    assert_eq!(generated, 15);

    let layers = v["num_layers"].as_u64().unwrap();
    let passes = v["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 2);
    assert_eq!(passes[0]["sink"], "null");
    assert_eq!(passes[1]["sink"], "events");
    for p in passes {
        assert_eq!(p["prompts"], 5);
        assert_eq!(p["prefill_tokens"].as_u64().unwrap(), prompt_tokens);
        // every generated token is fed back once (the last one only for its routing)
        assert_eq!(p["decode_tokens"].as_u64().unwrap(), generated);
        assert_eq!(
            p["routing_decisions"].as_u64().unwrap(),
            (prompt_tokens + generated) * layers
        );
        assert!(p["wall_seconds"].as_f64().unwrap() > 0.0);
        assert!(p["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
        assert!(p["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    assert!(v["capture_overhead"].as_f64().is_some());
    // The writer's own time is measured directly: positive, and a part of its pass's wall time.
    let cap = &v["passes"][1];
    let busy = cap["sink_seconds"].as_f64().unwrap();
    assert!(busy > 0.0 && busy < cap["wall_seconds"].as_f64().unwrap());
    let share = v["capture_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "capture share {share}");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() >= v["rss_after_load_bytes"].as_u64().unwrap());
    // the capture pass's trace was written under --scratch and removed afterwards
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}

#[test]
fn bench_model_skip_null_runs_only_the_capture_pass() {
    let (model, prompts) = model_and_prompts();
    let o = bench_model(
        &model,
        &prompts,
        &[
            "-n",
            "2",
            "--max-new-tokens",
            "2",
            "--threads",
            "1",
            "--capture",
            "counts",
            "--skip-null",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let passes = v["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 1);
    assert_eq!(passes[0]["sink"], "counts");
    assert_eq!(passes[0]["decode_tokens"], 4);
    assert!(v["capture_overhead"].is_null());
    assert!(v["capture_share"].as_f64().is_some());
    // With `--capture none` the flag changes nothing: the null pass runs.
    let o = bench_model(
        &model,
        &prompts,
        &[
            "-n",
            "1",
            "--max-new-tokens",
            "1",
            "--capture",
            "none",
            "--skip-null",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passes"].as_array().unwrap().len(), 1);
    assert_eq!(v["passes"][0]["sink"], "null");
}

#[test]
fn bench_model_rejects_too_many_prompts() {
    let (model, prompts) = model_and_prompts();
    let o = bench_model(&model, &prompts, &["-n", "500"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--num-prompts 500"), "{err}");
    assert!(err.contains("has only 8 prompts"), "{err}");

    let o = run(&["bench", "model", "--model", "/nonexistent/model", "-n", "1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
