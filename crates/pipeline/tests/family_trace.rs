//! The trace step on checkpoints of families other than OLMoE (fixtures/hf): the manifest's
//! `routing` block, routing records counted over the MoE layers only, counts and events traces of
//! a model with a dense layer, and resuming runs whose manifest predates the routing block.

use std::path::{Path, PathBuf};

use moe_xray_model::config::ModelConfig;
use moe_xray_pipeline::analyze::{analyze, AnalyzeOptions};
use moe_xray_pipeline::trace::{
    routing_layout, trace, Compress, Mode, TraceOptions, WEIGHTS_APPLIED, WEIGHTS_FULL_SOFTMAX,
};
use moe_xray_pipeline::Progress;
use moe_xray_stats::analyze::Outputs;
use moe_xray_test_support::fixture;
use moe_xray_trace::{Manifest, RoutingLayout};

struct Quiet;
impl Progress for Quiet {}

fn layout(dir: &str) -> RoutingLayout {
    routing_layout(&ModelConfig::from_dir(&fixture("hf").join(dir)).unwrap())
}

fn expect(
    family: &str,
    moe: &[u32],
    dense: &[u32],
    shared: u32,
    router: &str,
    scores: &str,
    weights: &str,
) -> RoutingLayout {
    RoutingLayout {
        family: family.into(),
        moe_layers: moe.to_vec(),
        dense_layers: dense.to_vec(),
        num_shared_experts: shared,
        router: router.into(),
        scores: scores.into(),
        weights: weights.into(),
        extra: Default::default(),
    }
}

#[test]
fn routing_layout_describes_each_family() {
    // Values from fixtures/hf/README.md.
    let cases = [
        (
            "olmoe-tiny-gqa-f32",
            expect(
                "olmoe",
                &[0, 1, 2],
                &[],
                0,
                "softmax_topk",
                "softmax",
                WEIGHTS_FULL_SOFTMAX,
            ),
        ),
        (
            "qwen2moe-tiny-f32",
            expect(
                "qwen2_moe",
                &[0, 2],
                &[1],
                1,
                "softmax_topk",
                "softmax",
                WEIGHTS_APPLIED,
            ),
        ),
        (
            "deepseekv2-tiny-greedy-f32",
            expect(
                "deepseek_v2",
                &[1, 2],
                &[0],
                2,
                "deepseek_v2",
                "softmax",
                WEIGHTS_APPLIED,
            ),
        ),
        (
            "deepseekv3-tiny-bf16",
            expect(
                "deepseek_v3",
                &[1, 2],
                &[0],
                1,
                "deepseek_v3",
                "sigmoid",
                WEIGHTS_APPLIED,
            ),
        ),
        (
            "gptoss-tiny-f32",
            expect(
                "gpt_oss",
                &[0, 1, 2],
                &[],
                0,
                "topk_softmax",
                "softmax",
                WEIGHTS_APPLIED,
            ),
        ),
    ];
    for (dir, want) in cases {
        let got = layout(dir);
        assert_eq!(got, want, "{dir}");
        // A block the trace crate accepts for that checkpoint.
        let cfg = ModelConfig::from_dir(&fixture("hf").join(dir)).unwrap();
        got.validate(cfg.num_hidden_layers, cfg.num_experts)
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
}

fn options(model: &str, out: PathBuf) -> TraceOptions {
    let mut o = TraceOptions::new(fixture("hf").join(model), fixture("hf/prompts.jsonl"), out);
    o.max_new_tokens = 3;
    o.batch_size = 3;
    o
}

fn analyse(trace: &Path) -> Outputs {
    let mut a = AnalyzeOptions::new(vec![trace.to_path_buf()]);
    a.prompts = Some(fixture("hf/prompts.jsonl"));
    a.reps = 10;
    a.no_tsne = true;
    a.no_classifier = true;
    analyze(&a, &Quiet).unwrap()
}

#[test]
fn counts_and_events_of_a_model_with_a_dense_layer_agree() {
    // qwen3_moe fixture: decoder layer 0 is dense, 1 and 2 route.
    let tmp = tempfile::tempdir().unwrap();
    let ev = trace(&options("qwen3moe-tiny-f32", tmp.path().join("ev")), &Quiet).unwrap();
    let mut co = options("qwen3moe-tiny-f32", tmp.path().join("co"));
    co.mode = Mode::Counts;
    let co = trace(&co, &Quiet).unwrap();
    // One record per routed token and MoE layer (the last generated token is routed too).
    let tokens = (ev.prompt_tokens + ev.generated_tokens) as u64;
    assert_eq!(ev.records, tokens * 2);
    assert_eq!(co.records, ev.records);
    let lines = std::fs::read_to_string(&ev.trace).unwrap();
    assert_eq!(lines.lines().count() as u64, ev.records);
    assert!(!lines.contains("\"layer\":0,"));
    let m = Manifest::read(&ev.manifest).unwrap();
    assert_eq!(m.num_layers, 3);
    assert_eq!(m.routing.as_ref().unwrap().moe_layers, [1, 2]);
    assert_eq!(Manifest::read(&co.manifest).unwrap().routing, m.routing);

    let (a, b) = (analyse(&ev.trace), analyse(&co.trace));
    for r in [a.results(), b.results()] {
        assert_eq!(r.num_layers, 2);
        assert_eq!(r.moe_layers.as_deref(), Some(&[1usize, 2][..]));
        let labels: Vec<usize> = r.per_layer.iter().map(|p| p.layer).collect();
        assert_eq!(labels, [1, 2]);
    }
    match (a, b) {
        (Outputs::Exact(a), Outputs::Exact(b)) => {
            assert_eq!(a.signatures.len(), 8 * 2 * 16);
            assert_eq!(a.signatures, b.signatures);
        }
        _ => panic!("8 prompts take the exact path"),
    }
}

/// Removes the `routing` block from a run's manifest, as a run before it existed wrote it.
fn strip_routing(dir: &Path) {
    let p = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("routing").is_some());
    std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

#[test]
fn resume_accepts_a_manifest_without_routing_only_when_no_layer_is_dense() {
    let tmp = tempfile::tempdir().unwrap();
    // OLMoE (every layer routes): a run started before the routing block existed resumes, and
    // its manifest gains the block.
    let out = tmp.path().join("olmoe");
    let mut o = options("olmoe-tiny-mha-f32", out.clone());
    o.compress = Some(Compress::Gz);
    let first = trace(&o, &Quiet).unwrap();
    strip_routing(&out);
    o.resume = true;
    let again = trace(&o, &Quiet).unwrap();
    assert_eq!(again.prompts_resumed, 8);
    assert_eq!((again.prompts_run, again.records), (0, 0));
    assert!(first.records > 0);
    let m = Manifest::read(out.join("manifest.json")).unwrap();
    assert_eq!(m.routing.unwrap().moe_layers, [0, 1]);

    // qwen2_moe (layer 1 dense): a manifest without the block says every layer routes, which
    // is not this model: refused.
    let out = tmp.path().join("qwen2");
    let mut o = options("qwen2moe-tiny-f32", out.clone());
    o.compress = Some(Compress::Gz);
    trace(&o, &Quiet).unwrap();
    strip_routing(&out);
    o.resume = true;
    let err = trace(&o, &Quiet).unwrap_err().to_string();
    assert!(err.contains("different settings"), "{err}");
}
