//! Hostile model inputs for `moe-xray trace` (issue 14, part B): configs with huge or
//! inconsistent sizes, prompts longer than the context, chat templates without limits and
//! checkpoints with non-finite numbers. Each gives one clear error naming the file / field /
//! prompt, a non-zero exit, no panic or abort, and no output for inputs refused up front.

use moe_xray_test_support::fixture;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
mod common;
use common::{s, stderr};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moe-xray"))
}

/// A private copy of fixture model `name` in `dir`.
fn copy_model(name: &str, dir: &Path) -> PathBuf {
    let src = fixture("hf").join(name);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, v.to_string()).unwrap();
}

fn trace(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("trace")
        .args([
            "--model",
            s(model),
            "--prompts",
            s(prompts),
            "--out",
            s(out),
            "--quiet",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// Fails with a non-zero exit, without a panic or abort, and with a message containing `needles`.
fn refused(o: &Output, needles: &[&str]) -> String {
    let e = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {e}"
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit code (a signal means an abort): {e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "missing `{n}` in: {e}");
    }
    e
}

fn nothing_written(out: &Path) {
    assert!(
        !out.exists() || std::fs::read_dir(out).unwrap().next().is_none(),
        "{} should hold no output",
        out.display()
    );
}

fn write_prompts(dir: &Path, prompts: &[(&str, String)]) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let mut text = String::new();
    for (id, t) in prompts {
        text.push_str(&serde_json::json!({"id": id, "category": "c", "text": t}).to_string());
        text.push('\n');
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn huge_config_sizes_are_refused_naming_config_and_field() {
    for (field, value) in [
        ("num_experts", Value::from(1_000_000_000_000u64)),
        ("num_hidden_layers", Value::from(1_000_000_000u64)),
        ("vocab_size", Value::from(u64::MAX)),
        ("intermediate_size", Value::from(1u64 << 40)),
        ("max_position_embeddings", Value::from(1u64 << 50)),
    ] {
        let d = tempfile::tempdir().unwrap();
        let model = copy_model("olmoe-tiny-mha-f32", d.path());
        edit_json(&model.join("config.json"), |m| {
            m.insert(field.into(), value.clone());
        });
        let out = d.path().join("out");
        let o = trace(&model, &fixture("hf").join("prompts.jsonl"), &out, &[]);
        refused(&o, &["config.json", field, "limit"]);
        nothing_written(&out);
    }
}

#[test]
fn config_sizes_inconsistent_with_the_checkpoint_are_refused() {
    for (field, value) in [
        ("num_hidden_layers", 3u64),
        ("num_experts", 16),
        ("vocab_size", 1024),
    ] {
        let d = tempfile::tempdir().unwrap();
        let model = copy_model("olmoe-tiny-mha-f32", d.path());
        edit_json(&model.join("config.json"), |m| {
            m.insert(field.into(), value.into());
        });
        let out = d.path().join("out");
        let o = trace(&model, &fixture("hf").join("prompts.jsonl"), &out, &[]);
        refused(&o, &["config.json", field]);
        nothing_written(&out);
    }
}

#[test]
fn prompt_longer_than_the_context_is_refused_before_any_output() {
    let d = tempfile::tempdir().unwrap();
    // 1 MB of text: hundreds of thousands of tokens for a model whose context is 512.
    let long = "the quick brown fox jumps over the lazy dog. ".repeat(1 << 20 >> 5);
    let prompts = write_prompts(d.path(), &[("short", "hello world".into()), ("huge", long)]);
    let out = d.path().join("out");
    let t = Instant::now();
    let o = trace(
        &fixture("hf").join("olmoe-tiny-mha-f32"),
        &prompts,
        &out,
        &[],
    );
    let e = refused(
        &o,
        &[
            "prompt `huge`",
            "max_position_embeddings 512",
            "--truncate-prompts",
        ],
    );
    assert!(!e.contains("prompt `short`"), "{e}");
    nothing_written(&out);
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn max_new_tokens_beyond_the_context_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), &[("p", "hello world".into())]);
    let out = d.path().join("out");
    let o = trace(
        &fixture("hf").join("olmoe-tiny-mha-f32"),
        &prompts,
        &out,
        &["--max-new-tokens", "600"],
    );
    refused(&o, &["prompt `p`", "600", "max_position_embeddings 512"]);
    nothing_written(&out);
    // Even truncation cannot make room when the new tokens alone fill the context.
    let o = trace(
        &fixture("hf").join("olmoe-tiny-mha-f32"),
        &prompts,
        &out,
        &["--max-new-tokens", "512", "--truncate-prompts", "left"],
    );
    refused(&o, &["max_position_embeddings 512"]);
    nothing_written(&out);
}

#[test]
fn truncate_prompts_left_and_right_fit_the_context_and_are_recorded() {
    let d = tempfile::tempdir().unwrap();
    let long: String = (0..400).map(|i| format!("w{i} ")).collect();
    let prompts = write_prompts(d.path(), &[("long", long), ("short", "hello".into())]);
    let model = fixture("hf").join("olmoe-tiny-mha-f32");
    let mut kept = Vec::new();
    for side in ["left", "right"] {
        let out = d.path().join(side);
        let o = trace(
            &model,
            &prompts,
            &out,
            &["--max-new-tokens", "4", "--truncate-prompts", side],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let gens = jsonl(&out.join("generations.jsonl"));
        let long = gens.iter().find(|g| g["prompt_id"] == "long").unwrap();
        let ids = long["prompt_ids"].as_array().unwrap().clone();
        assert_eq!(ids.len(), 512 - 4);
        let from = long["prompt_tokens_truncated_from"].as_u64().unwrap();
        assert!(from > 512, "{from}");
        let short = gens.iter().find(|g| g["prompt_id"] == "short").unwrap();
        assert!(short.get("prompt_tokens_truncated_from").is_none());
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["generation"]["truncate_prompts"], side);
        // The trace covers exactly the kept positions.
        let max_pos = jsonl(&out.join("trace.jsonl"))
            .iter()
            .filter(|r| r["prompt_id"] == "long")
            .map(|r| r["position"].as_u64().unwrap())
            .max()
            .unwrap();
        assert_eq!(max_pos, 511);
        kept.push(ids);
    }
    // left keeps the end of the prompt, right its beginning: different token windows.
    assert_ne!(kept[0], kept[1]);
}

fn with_template(dir: &Path, template: &str) -> PathBuf {
    let model = copy_model("olmoe-tiny-mha-f32", dir);
    edit_json(&model.join("tokenizer_config.json"), |m| {
        m.insert("chat_template".into(), template.into());
    });
    model
}

#[test]
fn hostile_chat_templates_fail_quickly_naming_the_template() {
    for (template, why) in [
        // Builds a huge output string.
        (
            "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}",
            "output",
        ),
        // Nested loops that would run for hours.
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
            "fuel",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let model = with_template(d.path(), template);
        let out = d.path().join("out");
        let t = Instant::now();
        let o = trace(
            &model,
            &fixture("hf").join("prompts.jsonl"),
            &out,
            &["--chat-template"],
        );
        refused(&o, &["tokenizer_config.json", why]);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        nothing_written(&out);
    }
}

/// Overwrites the values of tensor `name` in a single-file safetensors checkpoint (its header
/// located with serde_json) with `f(index)`, for the elements whose index satisfies `pick`.
fn poison(file: &Path, name: &str, pick: impl Fn(usize) -> bool, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[name];
    assert_eq!(info["dtype"], "F32", "{name}");
    let start = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + info["data_offsets"][1].as_u64().unwrap() as usize;
    for (i, c) in bytes[start..end].chunks_mut(4).enumerate() {
        if pick(i) {
            c.copy_from_slice(&value.to_le_bytes());
        }
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn nan_router_weights_fail_with_layer_and_prompt() {
    let d = tempfile::tempdir().unwrap();
    let model = copy_model("olmoe-tiny-mha-f32", d.path());
    poison(
        &model.join("model.safetensors"),
        "model.layers.1.mlp.gate.weight",
        |_| true,
        f32::NAN,
    );
    let out = d.path().join("out");
    let o = trace(
        &model,
        &fixture("hf").join("prompts.jsonl"),
        &out,
        &["--batch-size", "1"],
    );
    refused(&o, &["non-finite", "layer 1", "prompt `code-01`"]);
    // No prompt completed, so no record may be in the trace (and certainly no null weight).
    let trace = std::fs::read_to_string(out.join("trace.jsonl")).unwrap_or_default();
    assert!(trace.is_empty(), "{trace}");
}

#[test]
fn inf_embedding_fails_on_the_prompt_that_uses_it_and_keeps_earlier_prompts() {
    let d = tempfile::tempdir().unwrap();
    let model = copy_model("olmoe-tiny-mha-f32", d.path());
    // A token that the third prompt uses and the first two do not.
    let gens = jsonl(&fixture("hf").join("olmoe-tiny-mha-f32/expected_generations.jsonl"));
    let ids = |i: usize| -> Vec<u64> {
        gens[i]["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let earlier: Vec<u64> = (0..2)
        .flat_map(|i| {
            let mut v = ids(i);
            v.extend(
                gens[i]["generated_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap()),
            );
            v
        })
        .collect();
    let third = gens[2]["prompt_id"].as_str().unwrap().to_string();
    let tok = ids(2).into_iter().find(|t| !earlier.contains(t)).unwrap() as usize;
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let h = cfg["hidden_size"].as_u64().unwrap() as usize;
    poison(
        &model.join("model.safetensors"),
        "model.embed_tokens.weight",
        |i| i / h == tok,
        f32::INFINITY,
    );
    let out = d.path().join("out");
    let o = trace(
        &model,
        &fixture("hf").join("prompts.jsonl"),
        &out,
        &["--batch-size", "1", "--max-new-tokens", "12"],
    );
    refused(&o, &["non-finite", "layer 0", &format!("prompt `{third}`")]);
    // The two earlier prompts are complete and durable; nothing of the failing prompt is written.
    let recs = jsonl(&out.join("trace.jsonl"));
    let mut ids_seen: Vec<String> = recs
        .iter()
        .map(|r| r["prompt_id"].as_str().unwrap().to_string())
        .collect();
    ids_seen.dedup();
    let want: Vec<String> = (0..2)
        .map(|i| gens[i]["prompt_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids_seen, want);
    assert!(recs
        .iter()
        .all(|r| r["weights"].as_array().unwrap().iter().all(|w| w.is_f64())));
    assert_eq!(jsonl(&out.join("generations.jsonl")).len(), 2);
}

#[test]
fn run_refuses_a_prompt_longer_than_the_context_before_writing_anything() {
    let d = tempfile::tempdir().unwrap();
    let long: String = (0..400).map(|i| format!("w{i} ")).collect();
    let prompts = write_prompts(d.path(), &[("a", "hello".into()), ("long", long)]);
    let out = d.path().join("run");
    let o = Command::new(bin())
        .args(["run", "--model"])
        .arg(fixture("hf").join("olmoe-tiny-mha-f32"))
        .args([
            "--prompts",
            s(&prompts),
            "--out",
            s(&out),
            "--quiet",
            "--reps",
            "10",
        ])
        .args(["--max-new-tokens", "4"])
        .output()
        .unwrap();
    refused(&o, &["prompt `long`", "max_position_embeddings 512"]);
    assert!(!out.exists(), "run wrote {}", out.display());
}
