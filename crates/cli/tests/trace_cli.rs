//! `moe-xray trace` end to end on the committed HF conformance fixtures: conformance of the files
//! it writes, independence from batch size and thread count, bad inputs (clear error, non-zero
//! exit, nothing written), and resume after a real `kill -9`.

use moe_xray_test_support::fixture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
mod common;
use common::s;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moe-xray"))
}

fn trace(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("trace")
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fixture model `name`, the fixture prompt file and a fresh temporary directory.
fn setup(name: &str) -> (PathBuf, PathBuf, tempfile::TempDir) {
    (
        fixture("hf").join(name),
        fixture("hf").join("prompts.jsonl"),
        tempfile::tempdir().unwrap(),
    )
}

/// `--model M --prompts P --out O` followed by `extra`: the argument list every run here shares.
fn trace_args(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    [
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--out",
        s(out),
    ]
    .iter()
    .chain(extra)
    .map(|x| x.to_string())
    .collect()
}

/// `moe-xray trace` with [`trace_args`].
fn trace_in(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("trace")
        .args(trace_args(model, prompts, out, extra))
        .output()
        .unwrap()
}

/// The identity of a trace record: (prompt_id, position, layer).
fn record_key(v: &Value) -> (String, u64, u64) {
    (
        v["prompt_id"].as_str().unwrap().to_string(),
        v["position"].as_u64().unwrap(),
        v["layer"].as_u64().unwrap(),
    )
}

#[test]
fn trace_files_match_transformers_and_ignore_batch_and_threads() {
    let (model, prompts, tmp) = setup("olmoe-tiny-gqa-f32");
    let mut traces = Vec::new();
    for (name, bs, th) in [("a", "1", "1"), ("b", "5", "2"), ("c", "5", "1")] {
        let out = tmp.path().join(name);
        ok(&trace_in(
            &model,
            &prompts,
            &out,
            &[
                "--max-new-tokens",
                "12",
                "--batch-size",
                bs,
                "--threads",
                th,
                "--quiet",
            ],
        ));
        traces.push(std::fs::read_to_string(out.join("trace.jsonl")).unwrap());
    }
    // Same threads-independent bytes for the same batch size; same set of lines for any batch size.
    assert_eq!(traces[1], traces[2], "thread count changed the trace bytes");
    // Another batch size: identical records (every token's computation is independent of its
    // batch: ragged batching, no padding, row-independent CPU kernels).
    let parse = |t: &str| -> BTreeMap<(String, u64, u64), Value> {
        t.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (record_key(&v), v)
            })
            .collect()
    };
    let (a, b) = (parse(&traces[0]), parse(&traces[1]));
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), traces[0].lines().count(), "duplicate records");
    for (k, ra) in &a {
        assert_eq!(ra, &b[k], "batch size changed the record at {k:?}");
    }

    // Conformance of the written files with transformers.
    let out = tmp.path().join("a");
    let want: HashMap<(String, u64, u64), Value> = jsonl(&model.join("expected_trace.jsonl"))
        .into_iter()
        .map(|v| (record_key(&v), v))
        .collect();
    let got = jsonl(&out.join("trace.jsonl"));
    assert_eq!(got.len(), want.len());
    for r in &got {
        let e = &want[&record_key(r)];
        assert_eq!(r["experts"], e["experts"]);
        assert_eq!(r["token_id"], e["token_id"]);
        assert_eq!(r["category"], e["category"]);
        for (a, b) in r["weights"]
            .as_array()
            .unwrap()
            .iter()
            .zip(e["weights"].as_array().unwrap())
        {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
        }
        assert!(r.get("probs").is_none());
    }
    let exp_gen: HashMap<String, Value> = jsonl(&model.join("expected_generations.jsonl"))
        .into_iter()
        .map(|v| (v["prompt_id"].as_str().unwrap().to_string(), v))
        .collect();
    let gens = jsonl(&out.join("generations.jsonl"));
    assert_eq!(gens.len(), exp_gen.len());
    for g in &gens {
        let e = &exp_gen[g["prompt_id"].as_str().unwrap()];
        assert_eq!(g["generated_ids"], e["generated_ids"]);
        assert_eq!(g["prompt_ids"], e["prompt_ids"]);
        assert_eq!(g["text"], e["generated_text"]);
    }
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["num_layers"], 3);
    assert_eq!(m["num_experts"], 16);
    assert_eq!(m["top_k"], 4);
    assert_eq!(m["dtype"], "f32");
    assert_eq!(m["capture_mode"], "events");
}

#[test]
fn counts_mode_probs_compression_and_hf_compat() {
    let (model, prompts, tmp) = setup("olmoe-tiny-mha-f32");
    let ev = tmp.path().join("ev");
    ok(&trace_in(
        &model,
        &prompts,
        &ev,
        &[
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--record-probs",
            "--quiet",
        ],
    ));
    let records = jsonl(&ev.join("trace.jsonl"));
    assert!(records
        .iter()
        .all(|r| r["probs"].as_array().map(|p| p.len()) == Some(8)));
    let cnt = tmp.path().join("cnt");
    let o = trace_in(
        &model,
        &prompts,
        &cnt,
        &[
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--mode",
            "counts",
            "--compress",
            "gz",
            "--json",
            "--quiet",
        ],
    );
    ok(&o);
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["generated_tokens"], 8 * 5);
    assert!(cnt.join("counts.jsonl.gz").is_file());
    // Counts equal the events aggregated by hand.
    let mut want: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for r in &records {
        let v = want
            .entry((
                r["prompt_id"].as_str().unwrap().into(),
                r["token_type"].as_str().unwrap().into(),
            ))
            .or_insert(vec![0; 16]);
        for e in r["experts"].as_array().unwrap() {
            v[r["layer"].as_u64().unwrap() as usize * 8 + e.as_u64().unwrap() as usize] += 1;
        }
    }
    let mut n = 0;
    for item in moe_xray_trace::TraceReader::open(cnt.join("counts.jsonl.gz")).unwrap() {
        let (_, item) = item.unwrap();
        if let moe_xray_trace::TraceItem::Counts(c) = item {
            let k = (c.prompt_id.clone(), c.token_type.as_str().to_string());
            assert_eq!(&c.counts, &want[&k], "{k:?}");
            n += 1;
        }
    }
    assert_eq!(n, 16);
    // --hf-generate-compat: one generated token per prompt fewer is routed.
    let compat = tmp.path().join("compat");
    ok(&trace_in(
        &model,
        &prompts,
        &compat,
        &[
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--hf-generate-compat",
            "--quiet",
        ],
    ));
    let gen_records = |p: &Path| {
        jsonl(p)
            .iter()
            .filter(|r| r["token_type"] == "generation")
            .count()
    };
    assert_eq!(gen_records(&ev.join("trace.jsonl")), 8 * 5 * 2);
    assert_eq!(gen_records(&compat.join("trace.jsonl")), 8 * 4 * 2);
}

fn assert_fails_cleanly(args: &[&str], out: &Path, needle: &str) {
    let o = trace(args);
    assert!(!o.status.success(), "should fail: {args:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "stderr `{err}` lacks `{needle}`");
    assert!(!err.contains("panicked"), "{err}");
    let written: Vec<_> = std::fs::read_dir(out)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "files written on error: {written:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_inputs_fail_cleanly_and_write_nothing() {
    let (good, prompts, tmp) = setup("olmoe-tiny-mha-f32");
    let out = tmp.path().join("out");
    let model = tmp.path().join("m");
    let run = |m: &Path, p: &Path, needle: &str| {
        let args = trace_args(m, p, &out, &["--quiet"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails_cleanly(&args, &out, needle);
    };
    // Missing / unknown model_type.
    copy_dir(&good, &model);
    let cfg_path = model.join("config.json");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut c = cfg.clone();
    c.as_object_mut().unwrap().remove("model_type");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    run(&model, &prompts, "supported model types: olmoe");
    c["model_type"] = "llama".into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    run(&model, &prompts, "\"llama\"");
    // Shape mismatch.
    let mut c = cfg.clone();
    c["intermediate_size"] = 20.into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    run(&model, &prompts, "shape mismatch");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // Truncated safetensors.
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    run(&model, &prompts, "invalid safetensors");
    std::fs::write(&st, &bytes).unwrap();
    // Missing tokenizer.
    let tok = std::fs::read(model.join("tokenizer.json")).unwrap();
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    run(&model, &prompts, "tokenizer.json");
    // Token ids out of range: a tokenizer with a larger vocabulary than the model.
    std::fs::copy(
        fixture("hf").join("olmoe-tiny-bf16/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    run(&model, &prompts, "out of range");
    std::fs::write(model.join("tokenizer.json"), &tok).unwrap();
    // Malformed prompt file (line 2).
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\":\"a\",\"category\":\"x\",\"text\":\"hi\"}\n{\"id\": \"b\", \"category\": \n",
    )
    .unwrap();
    run(&model, &bad, "bad.jsonl:2");
    // And the restored model works.
    ok(&trace_in(
        &model,
        &prompts,
        &out,
        &["--max-new-tokens", "2", "--quiet"],
    ));
    // A second run into the same directory without --resume is refused.
    let o = trace_in(&model, &prompts, &out, &["--quiet"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn resume_after_kill_loses_and_duplicates_nothing() {
    let (model, fixture_prompts, tmp) = setup("olmoe-tiny-gqa-f32");
    // Many prompts so that the run takes a while.
    let base = jsonl(&fixture_prompts);
    let mut lines = String::new();
    for i in 0..40 {
        for p in &base {
            let mut q = p.clone();
            q["id"] = format!("{}-{i}", p["id"].as_str().unwrap()).into();
            lines.push_str(&q.to_string());
            lines.push('\n');
        }
    }
    let prompts = tmp.path().join("many.jsonl");
    std::fs::write(&prompts, lines).unwrap();
    let n_prompts = base.len() * 40;
    let args = |out: &Path| -> Vec<String> {
        trace_args(
            &model,
            &prompts,
            out,
            &[
                "--max-new-tokens",
                "16",
                "--ignore-eos",
                "--batch-size",
                "2",
                "--threads",
                "1",
                "--quiet",
                "--compress",
                "zst",
            ],
        )
    };
    // Reference: uninterrupted run.
    let full = tmp.path().join("full");
    let o = Command::new(bin())
        .arg("trace")
        .args(args(&full))
        .output()
        .unwrap();
    ok(&o);
    // Interrupted run: kill -9 once some prompts are durable.
    let out = tmp.path().join("killed");
    let mut child = Command::new(bin())
        .arg("trace")
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(out.join("generations.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 10 || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let partial = std::fs::read_to_string(out.join("generations.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        !status.success() && partial < n_prompts,
        "the run finished before it could be killed ({partial} prompts)"
    );
    let mut a = args(&out);
    a.push("--resume".into());
    let o = Command::new(bin()).arg("trace").args(&a).output().unwrap();
    ok(&o);
    // Same generations (each prompt exactly once) and same trace records as the full run.
    let gens = |d: &Path| {
        let v = jsonl(&d.join("generations.jsonl"));
        let ids: Vec<String> = v
            .iter()
            .map(|g| g["prompt_id"].as_str().unwrap().to_string())
            .collect();
        let set: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(ids.len(), set.len(), "duplicate generation lines");
        v.into_iter()
            .map(|g| (g["prompt_id"].as_str().unwrap().to_string(), g))
            .collect::<BTreeMap<_, _>>()
    };
    let (gf, gk) = (gens(&full), gens(&out));
    assert_eq!(gf.len(), n_prompts);
    assert_eq!(gf, gk);
    let records = |d: &Path| {
        let mut v: Vec<String> = Vec::new();
        for item in moe_xray_trace::TraceReader::open(d.join("trace.jsonl.zst")).unwrap() {
            let (_, item) = item.unwrap();
            match item {
                moe_xray_trace::TraceItem::Record(r) => v.push(serde_json::to_string(&r).unwrap()),
                other => panic!("unexpected {other:?}"),
            }
        }
        v
    };
    let (rf, rk) = (records(&full), records(&out));
    assert_eq!(rf.len(), rk.len(), "records lost or duplicated");
    let sf: BTreeSet<_> = rf.iter().collect();
    let sk: BTreeSet<_> = rk.iter().collect();
    assert_eq!(sk.len(), rk.len(), "duplicate records after resume");
    assert_eq!(sf, sk);
}
