//! Health and compare over traces whose manifest lists dense layers (`routing` block): the MoE
//! layers only, labelled with their decoder-layer index; records at dense layers are errors.

use std::path::{Path, PathBuf};

use moe_xray_health::compare::{compare_runs, CompareOptions};
use moe_xray_health::input::read_run_data;
use moe_xray_health::output::{coactivation_csv, layers_csv};
use moe_xray_health::{accumulate_run, resolve_run, HealthOptions};

const E: u32 = 4;

fn manifest(l: usize, dense_first: bool) -> String {
    if dense_first {
        let moe: Vec<String> = (1..l).map(|i| i.to_string()).collect();
        format!(
            r#"{{"model":"m","num_layers":{l},"num_experts":{E},"top_k":2,"routing":{{"family":"deepseek_v2","moe_layers":[{}],"dense_layers":[0],"num_shared_experts":2,"router":"deepseek_v2","scores":"softmax","weights":"routed_scaling_factor times the softmax probability"}}}}"#,
            moe.join(",")
        )
    } else {
        format!(r#"{{"model":"m","num_layers":{l},"num_experts":{E},"top_k":2}}"#)
    }
}

/// Records with `probs` for prompts a, b (category x) and c (y) at layers `first..first+moe`;
/// `shift` changes the routing (for a second run to compare with).
fn records(first: u32, moe: u32, shift: u32) -> String {
    let mut s = String::new();
    for (p, (pid, cat)) in [("a", "x"), ("b", "x"), ("c", "y")].into_iter().enumerate() {
        for pos in 0..6u32 {
            for i in 0..moe {
                let e0 = (p as u32 + 3 * i + pos + shift) % E;
                let e1 = (e0 + 1 + (i * pos + shift) % 3) % E;
                let e1 = if e1 == e0 { (e0 + 1) % E } else { e1 };
                let mut probs = [0.05f32; E as usize];
                probs[e0 as usize] = 0.5;
                probs[e1 as usize] = 0.3 + 0.01 * pos as f32;
                s.push_str(&format!(
                    "{{\"prompt_id\":\"{pid}\",\"category\":\"{cat}\",\"layer\":{},\"position\":{pos},\"token_type\":\"prompt\",\"experts\":[{e0},{e1}],\"probs\":{probs:?}}}\n",
                    first + i
                ));
            }
        }
    }
    s
}

fn run_dir(root: &Path, name: &str, manifest: &str, trace: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("manifest.json"), manifest).unwrap();
    std::fs::write(d.join("trace.jsonl"), trace).unwrap();
    d
}

#[test]
fn health_of_a_dense_first_layer_equals_the_renumbered_run_but_for_labels() {
    let root = tempfile::tempdir().unwrap();
    let dense = run_dir(root.path(), "dense", &manifest(4, true), &records(1, 3, 0));
    let plain = run_dir(root.path(), "plain", &manifest(3, false), &records(0, 3, 0));
    let opts = HealthOptions {
        keep_prompts: true,
        ..HealthOptions::default()
    };
    let a = accumulate_run(&resolve_run(&dense).unwrap(), None, opts.clone()).unwrap();
    let b = accumulate_run(&resolve_run(&plain).unwrap(), None, opts).unwrap();
    assert_eq!((a.num_layers(), a.num_decoder_layers()), (3, 4));
    assert_eq!(a.layer_ids(), &[1, 2, 3]);
    assert_eq!(
        a.prompts(),
        b.prompts(),
        "per-prompt counts over the MoE layers"
    );
    let (ra, rb) = (a.report(), b.report());
    assert_eq!(
        ra.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(ra
        .layers
        .iter()
        .all(|l| l.router.is_some() && l.top_pairs.is_some()));
    // Relabel A's layers to 0..3: then the reports are identical.
    let mut relabelled = ra.clone();
    for l in &mut relabelled.layers {
        l.layer -= 1;
    }
    relabelled.overall.least_balanced_layer -= 1;
    assert_eq!(relabelled, rb);
    // The CSVs name the decoder layers.
    let csv = layers_csv(&ra);
    let first: Vec<&str> = csv.lines().skip(1).map(|l| &l[..2]).collect();
    assert_eq!(first, vec!["1,", "2,", "3,"]);
    let co = coactivation_csv(&a).unwrap();
    assert!(co.lines().nth(1).unwrap().starts_with("1,0,0,"), "{co}");
    assert!(!co.lines().any(|l| l.starts_with("0,")));
    for row in 0..3 {
        assert_eq!(a.coactivation(row), b.coactivation(row));
    }
}

#[test]
fn compare_of_runs_with_a_dense_layer() {
    let root = tempfile::tempdir().unwrap();
    let d1 = run_dir(root.path(), "d1", &manifest(4, true), &records(1, 3, 0));
    let d2 = run_dir(root.path(), "d2", &manifest(4, true), &records(1, 3, 1));
    let p1 = run_dir(root.path(), "p1", &manifest(3, false), &records(0, 3, 0));
    let p2 = run_dir(root.path(), "p2", &manifest(3, false), &records(0, 3, 1));
    let opts = HealthOptions::default();
    let copts = CompareOptions {
        reps: 50,
        ..CompareOptions::default()
    };
    let read = |p: &PathBuf| read_run_data(p, &opts).unwrap();
    let (a1, a2) = (read(&d1), read(&d2));
    assert_eq!(a1.layers, vec![1, 2, 3]);
    let dense = compare_runs(&a1, &a2, &copts).unwrap();
    let plain = compare_runs(&read(&p1), &read(&p2), &copts).unwrap();
    assert!(dense.max_js_bits > 0.0);
    assert_eq!(
        dense.per_layer.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let mut relabelled = dense.clone();
    for l in &mut relabelled.per_layer {
        l.layer -= 1;
    }
    relabelled.max_js_layer -= 1;
    relabelled.run_a.label = plain.run_a.label.clone();
    relabelled.run_b.label = plain.run_b.label.clone();
    assert_eq!(relabelled, plain);
    // A run whose MoE layers differ cannot be compared layer by layer.
    let m = manifest(4, true).replace(
        r#""moe_layers":[1,2,3],"dense_layers":[0]"#,
        r#""moe_layers":[0,2,3],"dense_layers":[1]"#,
    );
    assert!(m.contains("[0,2,3]"));
    let t = records(1, 3, 0).replace("\"layer\":1,", "\"layer\":0,");
    let other = run_dir(root.path(), "other", &m, &t);
    let err = compare_runs(&a1, &read(&other), &copts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("differ in their MoE layers"), "{err}");
}

#[test]
fn records_and_counts_at_a_dense_layer_are_rejected() {
    let root = tempfile::tempdir().unwrap();
    let mut t = records(1, 3, 0);
    t.push_str("{\"prompt_id\":\"a\",\"layer\":0,\"position\":9,\"token_type\":\"prompt\",\"experts\":[0,1]}\n");
    let line = t.lines().count();
    let d = run_dir(root.path(), "bad", &manifest(4, true), &t);
    let err = accumulate_run(&resolve_run(&d).unwrap(), None, HealthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("trace.jsonl:{line}:")) && err.contains("layer 0 is a dense layer"),
        "{err}"
    );
    // A counts line (rows = decoder layers) with selections at the dense layer.
    let mut counts = vec![0u64; 16];
    counts[1] = 1;
    counts[4] = 1;
    counts[5] = 1;
    let line = format!(
        "{{\"prompt_id\":\"a\",\"token_type\":\"prompt\",\"num_layers\":4,\"num_experts\":4,\"tokens\":1,\"counts\":{counts:?}}}\n"
    );
    let d = run_dir(root.path(), "badcounts", &manifest(4, true), &line);
    let err = accumulate_run(&resolve_run(&d).unwrap(), None, HealthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("trace.jsonl:1:") && err.contains("layer 0 is a dense layer"),
        "{err}"
    );
}

#[test]
fn counts_lines_use_the_moe_rows() {
    let root = tempfile::tempdir().unwrap();
    // Decoder layers 0..3, layer 1 dense; one prompt, 2 tokens, k = 2.
    let m = r#"{"model":"m","num_layers":3,"num_experts":4,"top_k":2,"routing":{"family":"qwen3_moe","moe_layers":[0,2],"dense_layers":[1],"num_shared_experts":0,"router":"softmax_topk","scores":"softmax","weights":"renormalised top-k probabilities"}}"#;
    let counts = [2u64, 1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 1];
    let line = format!(
        "{{\"prompt_id\":\"a\",\"token_type\":\"prompt\",\"num_layers\":3,\"num_experts\":4,\"tokens\":2,\"counts\":{counts:?}}}\n"
    );
    let d = run_dir(root.path(), "counts", m, &line);
    let acc = accumulate_run(&resolve_run(&d).unwrap(), None, HealthOptions::default()).unwrap();
    assert_eq!(acc.load(), &[2., 1., 1., 0., 0., 0., 3., 1.]);
    let r = acc.report();
    assert_eq!(
        r.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(r.layers[1].tokens, 2);
}
