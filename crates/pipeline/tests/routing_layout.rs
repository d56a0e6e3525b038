//! Traces of a model with dense decoder layers (the manifest's `routing` block): analysis, health
//! and compare use the MoE layers only and label them with their decoder-layer index; the numbers
//! are those of the same records renumbered 0..L'−1 without a routing block.

use std::path::{Path, PathBuf};

use moe_xray_pipeline::analyze::{analyze, signatures_csv, AnalyzeOptions};
use moe_xray_pipeline::health::{compare, health, Dims, HealthRunOptions};
use moe_xray_pipeline::Progress;
use moe_xray_stats::analyze::{Outputs, PathChoice};
use moe_xray_test_support::fixture;

struct Quiet;
impl Progress for Quiet {}

/// Decoder index of MoE layer `l` of the planted fixture (4 MoE layers) in a 6-layer model whose
/// layers 0 and 3 are dense.
fn decoder(l: u64) -> u64 {
    l + 1 + u64::from(l >= 2)
}

/// The planted fixture as it is (`plain`) and with layers renumbered to decoder indices and a
/// routing block (`dense`); `shift` rotates the experts (a second run for compare).
fn write_runs(root: &Path, shift: u64) -> (PathBuf, PathBuf) {
    let src = fixture("stats/planted");
    let text = std::fs::read_to_string(src.join("trace.jsonl")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let e = m["num_experts"].as_u64().unwrap();
    let (mut plain, mut dense) = (String::new(), String::new());
    for line in text.lines() {
        let mut r: serde_json::Value = serde_json::from_str(line).unwrap();
        for x in r["experts"].as_array_mut().unwrap() {
            *x = ((x.as_u64().unwrap() + shift) % e).into();
        }
        plain.push_str(&(r.to_string() + "\n"));
        let l = r["layer"].as_u64().unwrap();
        r["layer"] = decoder(l).into();
        dense.push_str(&(r.to_string() + "\n"));
    }
    let p = root.join(format!("plain{shift}"));
    let d = root.join(format!("dense{shift}"));
    for dir in [&p, &d] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(p.join("trace.jsonl"), plain).unwrap();
    std::fs::write(p.join("manifest.json"), m.to_string()).unwrap();
    std::fs::write(d.join("trace.jsonl"), dense).unwrap();
    assert_eq!(m["num_layers"], 4);
    m["num_layers"] = 6.into();
    m["routing"] = serde_json::json!({
        "family": "qwen2_moe", "moe_layers": [1, 2, 4, 5], "dense_layers": [0, 3],
        "num_shared_experts": 1, "router": "softmax_topk", "scores": "softmax",
        "weights": "softmax probability of each selected expert"
    });
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    (p, d)
}

fn options(dir: &Path, path: PathChoice) -> AnalyzeOptions {
    let mut o = AnalyzeOptions::new(vec![dir.join("trace.jsonl")]);
    o.reps = 20;
    o.perm_reps = Some(20);
    o.boot_reps = Some(20);
    o.classifier_perm_reps = 4;
    o.folds = Some(fixture("stats/planted/folds.csv"));
    o.no_tsne = true;
    o.path = path;
    o
}

#[test]
fn analysis_uses_the_moe_layers_labelled_by_decoder_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, dense) = write_runs(tmp.path(), 0);
    for path in [PathChoice::ExactPairs, PathChoice::GramSums] {
        let a = analyze(&options(&dense, path), &Quiet).unwrap();
        let b = analyze(&options(&plain, path), &Quiet).unwrap();
        let (ra, rb) = (a.results(), b.results());
        assert_eq!(ra.num_layers, 4);
        assert_eq!(ra.moe_layers, Some(vec![1, 2, 4, 5]));
        assert_eq!(rb.moe_layers, None);
        assert_eq!(
            ra.per_layer.iter().map(|l| l.layer).collect::<Vec<_>>(),
            vec![1, 2, 4, 5]
        );
        assert_eq!(
            ra.input.manifest["routing"]["dense_layers"],
            serde_json::json!([0, 3])
        );
        // Everything else is the renumbered trace's analysis.
        let mut va = serde_json::to_value(ra).unwrap();
        let mut vb = serde_json::to_value(rb).unwrap();
        for v in [&mut va, &mut vb] {
            let o = v.as_object_mut().unwrap();
            o.remove("input");
            o.remove("moe_layers");
        }
        for l in va["per_layer"].as_array_mut().unwrap() {
            let d = l["layer"].as_u64().unwrap();
            l["layer"] = [1u64, 2, 4, 5].iter().position(|&x| x == d).unwrap().into();
        }
        assert_eq!(va, vb, "{path:?}");
        if let (Outputs::Exact(ea), Outputs::Exact(eb)) = (&a, &b) {
            assert_eq!(ea.signatures, eb.signatures);
            let csv = signatures_csv(ra, &ea.signatures, &ea.prompt_categories);
            let header = csv.lines().next().unwrap();
            assert!(
                header.starts_with("prompt_id,category,l1_e0,l1_e1,"),
                "{header}"
            );
            assert!(
                header.contains(",l4_e0,")
                    && !header.contains(",l0_e")
                    && !header.contains(",l3_e")
            );
            let plain_csv = signatures_csv(rb, &eb.signatures, &eb.prompt_categories);
            assert_eq!(
                csv.lines().skip(1).collect::<Vec<_>>(),
                plain_csv.lines().skip(1).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn a_record_at_a_dense_layer_fails_the_analysis() {
    let tmp = tempfile::tempdir().unwrap();
    let (_plain, dense) = write_runs(tmp.path(), 0);
    let t = dense.join("trace.jsonl");
    let mut text = std::fs::read_to_string(&t).unwrap();
    let n = text.lines().count();
    text.push_str("{\"prompt_id\":\"x-1\",\"layer\":3,\"position\":0,\"token_type\":\"prompt\",\"experts\":[0,1,2,3]}\n");
    std::fs::write(&t, text).unwrap();
    let err = analyze(&options(&dense, PathChoice::ExactPairs), &Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("trace.jsonl:{}:", n + 1))
            && err.contains("layer 3 is a dense layer"),
        "{err}"
    );
}

#[test]
fn health_and_compare_label_decoder_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, dense) = write_runs(tmp.path(), 0);
    let (plain1, dense1) = write_runs(tmp.path(), 1);
    let run = |dir: &Path, layer: usize| {
        health(
            &HealthRunOptions {
                traces: vec![dir.to_path_buf()],
                layer: Some(layer),
                ..HealthRunOptions::default()
            },
            &Quiet,
        )
    };
    let hd = run(&dense, 5).unwrap();
    let hp = run(&plain, 3).unwrap();
    assert_eq!(
        hd.report.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![1, 2, 4, 5]
    );
    for (a, b) in hd.report.layers.iter().zip(&hp.report.layers) {
        assert_eq!((&a.load, a.gini, a.tokens), (&b.load, b.gini, b.tokens));
    }
    // --layer is a decoder-layer index: a dense layer or one past the end is refused.
    let err = run(&dense, 3).err().unwrap().to_string();
    assert!(err.contains("--layer 3 is a dense layer"), "{err}");
    let err = run(&dense, 6).err().unwrap().to_string();
    assert!(
        err.contains("out of range (the traces have 6 layers)"),
        "{err}"
    );
    let svg_dir = tmp.path().join("svg");
    let mut batch = moe_xray_pipeline::outdir::Batch::new();
    assert!(hd.stage_svg(&svg_dir, 5, &mut batch).unwrap());
    assert!(!hd.stage_svg(&svg_dir, 3, &mut batch).unwrap());
    let copts = moe_xray_health::CompareOptions {
        reps: 20,
        ..moe_xray_health::CompareOptions::default()
    };
    let hopts = moe_xray_health::HealthOptions::default();
    let cd = compare(&dense, &dense1, &Dims::default(), &hopts, &copts, &Quiet).unwrap();
    let cp = compare(&plain, &plain1, &Dims::default(), &hopts, &copts, &Quiet).unwrap();
    assert_eq!(
        cd.per_layer.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![1, 2, 4, 5]
    );
    assert!(cd.max_js_bits > 0.0);
    for (a, b) in cd.per_layer.iter().zip(&cp.per_layer) {
        assert_eq!(a.js_bits, b.js_bits);
    }
    assert_eq!(
        (cd.mean_js_bits, cd.mean_shift),
        (cp.mean_js_bits, cp.mean_shift)
    );
}

#[test]
fn a_routing_block_without_dense_layers_changes_only_the_manifest_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, _dense) = write_runs(tmp.path(), 0);
    let all = tmp.path().join("all");
    std::fs::create_dir_all(&all).unwrap();
    std::fs::copy(plain.join("trace.jsonl"), all.join("trace.jsonl")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("manifest.json")).unwrap())
            .unwrap();
    m["routing"] = serde_json::json!({
        "family": "olmoe", "moe_layers": [0, 1, 2, 3], "dense_layers": [],
        "num_shared_experts": 0, "router": "softmax_topk", "scores": "softmax",
        "weights": "full-softmax probability before top-k renormalisation"
    });
    std::fs::write(all.join("manifest.json"), m.to_string()).unwrap();
    let a = analyze(&options(&all, PathChoice::ExactPairs), &Quiet).unwrap();
    let b = analyze(&options(&plain, PathChoice::ExactPairs), &Quiet).unwrap();
    assert_eq!(a.results().moe_layers, None);
    let mut ra = a.results().clone();
    let rb = b.results();
    assert_eq!(ra.input.manifest["routing"]["family"], "olmoe");
    ra.input = rb.input.clone();
    assert_eq!(&ra, rb);
}
