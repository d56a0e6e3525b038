//! `synth-model --format gguf` end to end: the GGUF files of the tiny preset run through
//! `moe-xray trace --model file.gguf`; the F32 file routes exactly like the f32 safetensors
//! checkpoint of the same seed, the Q8_0 and Q4_K_M files within their quantisation's agreement
//! (prompt tokens; printed), and the prompts are encoded identically (the tokenizer comes from the
//! GGUF metadata).

use std::collections::BTreeMap;
use std::path::Path;

use moe_xray_test_support::fixture;
use serde_json::Value;

mod common;
use common::{moe_xray, s, stderr};

type Sets = BTreeMap<(String, u64, u64), Vec<u64>>;

fn trace(model: &Path, out: &Path) -> (Sets, Vec<Value>) {
    let o = moe_xray(&[
        "trace",
        "--model",
        s(model),
        "--prompts",
        s(&fixture("hf").join("prompts.jsonl")),
        "--out",
        s(out),
        "--max-new-tokens",
        "2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}: {}", model.display(), stderr(&o));
    let mut sets = Sets::new();
    for l in std::fs::read_to_string(out.join("trace.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(l).unwrap();
        if v["token_type"] != "prompt" {
            continue;
        }
        let mut e: Vec<u64> = v["experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        e.sort_unstable();
        sets.insert(
            (
                v["prompt_id"].as_str().unwrap().to_string(),
                v["position"].as_u64().unwrap(),
                v["layer"].as_u64().unwrap(),
            ),
            e,
        );
    }
    let gens = std::fs::read_to_string(out.join("generations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["prompt_ids"].clone())
        .collect();
    (sets, gens)
}

#[test]
fn trace_runs_on_synthetic_gguf_files_and_routes_like_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("st");
    let o = moe_xray(&[
        "synth-model",
        "--out",
        s(&st),
        "--dtype",
        "f32",
        "--seed",
        "4",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, want_ids) = trace(&st, &tmp.path().join("t-st"));
    assert!(!want.is_empty());
    for (quant, min) in [("f32", 1.0), ("q8_0", 0.95), ("q4_k_m", 0.70)] {
        let g = tmp.path().join(format!("m-{quant}.gguf"));
        let o = moe_xray(&[
            "synth-model",
            "--format",
            "gguf",
            "--quant",
            quant,
            "--out",
            s(&g),
            "--seed",
            "4",
            "--json",
        ]);
        assert!(o.status.success(), "{quant}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["arch"], "olmoe");
        assert_eq!(v["quant"], quant);
        let (got, ids) = trace(&g, &tmp.path().join(format!("t-{quant}")));
        assert_eq!(ids, want_ids, "{quant}: prompts encoded differently");
        assert_eq!(got.len(), want.len(), "{quant}");
        let same = want.iter().filter(|(k, e)| &got[*k] == *e).count();
        let frac = same as f64 / want.len() as f64;
        eprintln!(
            "tiny preset, {quant} GGUF: {same}/{} prompt (token, layer) expert sets equal to the \
             f32 safetensors model",
            want.len()
        );
        assert!(frac >= min, "{quant}: {frac}");
    }
}

#[test]
fn gguf_options_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = |args: &[&str], needle: &str| {
        let mut a = vec!["synth-model"];
        a.extend_from_slice(args);
        let o = moe_xray(&a);
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: {e}");
    };
    let g = tmp.path().join("m.gguf");
    bad(
        &["--format", "gguf", "--quant", "q3_k", "--out", s(&g)],
        "unknown --quant",
    );
    bad(
        &["--format", "gguf", "--dtype", "f16", "--out", s(&g)],
        "--quant",
    );
    bad(
        &["--quant", "q8_0", "--out", s(&tmp.path().join("d"))],
        "--format gguf",
    );
    bad(&["--format", "onnx", "--out", s(&g)], "unknown --format");
    bad(
        &["--format", "gguf", "--out", s(&tmp.path().join("m.bin"))],
        ".gguf",
    );
    assert!(!g.exists());
}
