//! The transformers capture hook `moe_xray.hf.capture` (python/moe_xray/hf.py) against
//! `moe-xray trace --hf-generate-compat`.
//!
//! torch is too heavy for CI, so the hook runs under `tools/hf_capture_fixture.py` (transformers
//! 5.24, torch 2.15, f32, batch size 1, greedy, 12 new tokens) and its output is committed in
//! `fixtures/hf-capture/<model>/`. Here, for every such model, `moe-xray trace
//! --hf-generate-compat` runs on the same checkpoint and prompts, and the two captures must hold
//! the same records in the same order (prompt, position, layer): the same token ids, token types
//! and categories, the same experts (in order; as sets for DeepSeek, whose router uses
//! `torch.topk(sorted=False)`), weights within 1e-5; the same generations and manifest (but for
//! the fields that name the tool). `moe-xray analyze` must accept the hook's trace and give the
//! same signatures and prompt similarities as on the native trace.

use std::collections::BTreeMap;
use std::path::Path;

use moe_xray_test_support::fixture;
use moe_xray_trace::{GenerationLine, Manifest, RoutingRecord};
use serde_json::Value;

mod common;
use common::{moe_xray, s, stderr};

/// The fixture models the hook was run on (tools/hf_capture_fixture.py `MODELS`).
const MODELS: [&str; 4] = [
    "olmoe-tiny-mha-f32",
    "olmoe-tiny-gqa-f32",
    "qwen2moe-tiny-f32",
    "deepseekv3-tiny-f32",
];

fn records(p: &Path) -> Vec<RoutingRecord> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(text.ends_with('\n'), "{}: no final newline", p.display());
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}", p.display(), i + 1))
        })
        .collect()
}

fn generations(p: &Path) -> Vec<GenerationLine> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `moe-xray trace --hf-generate-compat --batch-size 1` on fixture model `name` (as the hook
/// was run).
fn native_trace(name: &str, out: &Path) {
    let model = fixture("hf").join(name);
    let prompts = fixture("hf").join("prompts.jsonl");
    let o = moe_xray(&[
        "trace",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--out",
        s(out),
        "--hf-generate-compat",
        "--max-new-tokens",
        "12",
        // One prompt at a time, as the hook ran: prompt blocks are written as prompts finish,
        // so this gives the prompt-file order (the records themselves do not depend on it).
        "--batch-size",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "trace {name}: {}", stderr(&o));
}

/// Compares two captures record by record; returns (records, largest weight difference,
/// records whose weights are bit-identical).
fn compare_records(
    name: &str,
    hook: &[RoutingRecord],
    native: &[RoutingRecord],
    as_sets: bool,
) -> (usize, f32, usize) {
    assert_eq!(
        hook.len(),
        native.len(),
        "{name}: {} hook records, {} native records",
        hook.len(),
        native.len()
    );
    let mut max_dw = 0f32;
    let mut identical = 0usize;
    for (i, (h, n)) in hook.iter().zip(native).enumerate() {
        let at = format!("{name}: record {}", i + 1);
        assert_eq!(h.prompt_id, n.prompt_id, "{at}");
        assert_eq!(h.category, n.category, "{at}");
        assert_eq!(h.layer, n.layer, "{at}");
        assert_eq!(h.position, n.position, "{at}");
        assert_eq!(h.token_id, n.token_id, "{at}");
        assert!(h.token_id.is_some(), "{at}: no token id");
        assert_eq!(h.token_type, n.token_type, "{at}");
        assert!(
            h.probs.is_none() && n.probs.is_none(),
            "{at}: probs not asked for"
        );
        let (hw, nw) = (h.weights.as_ref().unwrap(), n.weights.as_ref().unwrap());
        assert_eq!(hw.len(), h.experts.len(), "{at}");
        let pairs = |e: &[u32], w: &[f32]| -> BTreeMap<u32, f32> {
            e.iter().copied().zip(w.iter().copied()).collect()
        };
        if as_sets {
            let (a, b) = (pairs(&h.experts, hw), pairs(&n.experts, nw));
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{at}: expert sets {:?} vs {:?}",
                h.experts,
                n.experts
            );
        } else {
            assert_eq!(h.experts, n.experts, "{at}: experts (router order)");
        }
        let (a, b) = (pairs(&h.experts, hw), pairs(&n.experts, nw));
        let mut same = true;
        for (e, wa) in &a {
            let wb = b[e];
            let d = (wa - wb).abs();
            assert!(d <= 1e-5, "{at}: expert {e}: weight {wa} vs {wb}");
            max_dw = max_dw.max(d);
            same &= wa.to_bits() == wb.to_bits();
        }
        identical += usize::from(same);
    }
    (hook.len(), max_dw, identical)
}

fn compare_manifests(name: &str, hook: &Manifest, native: &Manifest) {
    assert_eq!(hook.num_layers, native.num_layers, "{name}");
    assert_eq!(hook.num_experts, native.num_experts, "{name}");
    assert_eq!(hook.top_k, native.top_k, "{name}");
    assert_eq!(hook.dtype, native.dtype, "{name}");
    assert_eq!(hook.prompt_set_hash, native.prompt_set_hash, "{name}");
    assert_eq!(hook.capture_mode, native.capture_mode, "{name}");
    assert_eq!(hook.routing, native.routing, "{name}: routing block");
    assert!(
        hook.routing.is_some(),
        "{name}: the hook wrote no routing block"
    );
    for key in [
        "max_new_tokens",
        "decoding",
        "eos_token_ids",
        "hf_generate_compat",
        "last_generated_token_routed",
        "ignore_eos",
        "chat_template",
        "temperature",
        "top_p",
    ] {
        assert_eq!(
            hook.generation[key], native.generation[key],
            "{name}: generation.{key}"
        );
    }
    assert_eq!(hook.generation["hf_generate_compat"], Value::Bool(true));
    for key in ["record_probs", "trace_file"] {
        assert_eq!(hook.extra.get(key), native.extra.get(key), "{name}: {key}");
    }
    let cap = &hook.extra["capture"];
    assert_eq!(cap["tool"], "moe_xray.hf.capture", "{name}");
    assert_eq!(cap["prompts_captured"], 8, "{name}");
    assert_eq!(
        cap["routers"].as_array().map(Vec::len),
        native.routing.as_ref().map(|r| r.moe_layers.len()),
        "{name}: one router per MoE layer"
    );
}

#[test]
fn hook_capture_equals_native_trace_hf_generate_compat() {
    let mut summary = Vec::new();
    for name in MODELS {
        let dir = fixture("hf-capture").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("native");
        native_trace(name, &out);
        let hook_m = Manifest::read(dir.join("manifest.json")).unwrap();
        let native_m = Manifest::read(out.join("manifest.json")).unwrap();
        compare_manifests(name, &hook_m, &native_m);
        let as_sets = native_m
            .routing
            .as_ref()
            .is_some_and(|r| r.router.starts_with("deepseek"));
        let hook = records(&dir.join("trace.jsonl"));
        let native = records(&out.join("trace.jsonl"));
        let (n, max_dw, identical) = compare_records(name, &hook, &native, as_sets);
        // Every MoE layer has a record at every routed position, and no dense layer has one.
        let moe = native_m.moe_layers();
        assert!(hook.iter().all(|r| moe.contains(&r.layer)), "{name}");
        // The generations: the same prompt and generated ids; the last generated token has no
        // records (generate() never feeds it back).
        let hg = generations(&dir.join("generations.jsonl"));
        let ng = generations(&out.join("generations.jsonl"));
        assert_eq!(hg.len(), ng.len(), "{name}");
        let mut routed = 0usize;
        for (h, g) in hg.iter().zip(&ng) {
            assert_eq!(h.prompt_id, g.prompt_id, "{name}");
            assert_eq!(h.category, g.category, "{name}");
            assert_eq!(h.prompt_ids, g.prompt_ids, "{name}: {}", g.prompt_id);
            assert_eq!(h.generated_ids, g.generated_ids, "{name}: {}", g.prompt_id);
            assert_eq!(
                h.stopped_on_eos, g.stopped_on_eos,
                "{name}: {}",
                g.prompt_id
            );
            assert_eq!(h.text, g.text, "{name}: {}", g.prompt_id);
            let last = (g.prompt_ids.len() + g.generated_ids.len()) as u32 - 1;
            let max_pos = hook
                .iter()
                .filter(|r| r.prompt_id == g.prompt_id)
                .map(|r| r.position)
                .max()
                .unwrap();
            assert_eq!(max_pos + 1, last, "{name}: {}", g.prompt_id);
            routed += last as usize;
        }
        assert_eq!(
            n,
            routed * moe.len(),
            "{name}: one record per routed token and MoE layer"
        );
        summary.push(format!(
            "{name}: {n} records equal, max weight diff {max_dw:e}, {identical} bit-identical"
        ));
    }
    eprintln!("{}", summary.join("\n"));
}

#[test]
fn some_fixture_prompt_stops_on_eos() {
    // The EOS path (generate() stops, EOS never routed) is covered by at least one fixture.
    let g = generations(&fixture("hf-capture/olmoe-tiny-gqa-f32/generations.jsonl"));
    assert!(
        g.iter().any(|g| g.stopped_on_eos),
        "no prompt stopped on EOS"
    );
    assert!(g.iter().any(|g| !g.stopped_on_eos));
}

#[test]
fn analyze_accepts_the_hook_trace_and_matches_the_native_one() {
    for name in [
        "olmoe-tiny-mha-f32",
        "qwen2moe-tiny-f32",
        "deepseekv3-tiny-f32",
    ] {
        let dir = fixture("hf-capture").join(name);
        let prompts = fixture("hf").join("prompts.jsonl");
        let tmp = tempfile::tempdir().unwrap();
        let native = tmp.path().join("native");
        native_trace(name, &native);
        let analyze = |trace: &Path, out: &Path, extra: &[&str]| {
            let mut args = vec![
                "analyze",
                s(trace),
                "--prompts",
                s(&prompts),
                "--out",
                s(out),
                "--reps",
                "20",
                "--classifier-perm-reps",
                "5",
                "--no-tsne",
                "--quiet",
            ];
            args.extend_from_slice(extra);
            let o = moe_xray(&args);
            assert!(
                o.status.success(),
                "analyze {}: {}",
                trace.display(),
                stderr(&o)
            );
        };
        let (a, b) = (tmp.path().join("a-hook"), tmp.path().join("a-native"));
        analyze(&dir.join("trace.jsonl"), &a, &[]);
        analyze(&native.join("trace.jsonl"), &b, &[]);
        for f in ["signatures.csv", "prompt_similarity.csv"] {
            let (x, y) = (
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
            );
            assert!(
                x == y,
                "{name}: {f} differs between the hook's and the native trace"
            );
        }
        let res: Value =
            serde_json::from_str(&std::fs::read_to_string(a.join("results.json")).unwrap())
                .unwrap();
        let m = Manifest::read(dir.join("manifest.json")).unwrap();
        let moe: Vec<u64> = m.moe_layers().into_iter().map(u64::from).collect();
        assert_eq!(res["num_prompts"], 8, "{name}");
        // Layers labelled with their decoder index (qwen2moe: dense layer 1; deepseek: dense 0);
        // results.json lists `moe_layers` only when some layer is dense.
        let per_layer: Vec<u64> = res["per_layer"]
            .as_array()
            .map(|v| v.iter().filter_map(|l| l["layer"].as_u64()).collect())
            .unwrap_or_default();
        assert_eq!(per_layer, moe, "{name}: results.json per_layer[].layer");
        let dense = m
            .routing
            .as_ref()
            .is_some_and(|r| !r.dense_layers.is_empty());
        if dense {
            let got: Vec<u64> = res["moe_layers"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            assert_eq!(got, moe, "{name}: results.json moe_layers");
        }
        // Weighted statistics use the hook's weights.
        analyze(
            &dir.join("trace.jsonl"),
            &tmp.path().join("a-weighted"),
            &["--weighted"],
        );
    }
}
