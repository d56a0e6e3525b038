//! The manifest's `routing` block (dense layers, shared experts, router kind): its validation,
//! and aggregation over the MoE layers only, labelled with decoder-layer indices.

use std::path::{Path, PathBuf};

use moe_xray_trace::manifest::MANIFEST_FILE;
use moe_xray_trace::{
    aggregate_paths, for_each_prompt_counts_info, AggregateOptions, CountsWriter, Manifest,
    RoutingDecision, RoutingLayout, RoutingSink, TokenType,
};

const E: usize = 4;

/// A manifest of `l` decoder layers, E = 4, k = 2, with an optional routing block.
fn manifest_json(l: usize, routing: Option<&str>) -> String {
    match routing {
        Some(r) => {
            format!(r#"{{"model":"m","num_layers":{l},"num_experts":{E},"top_k":2,"routing":{r}}}"#)
        }
        None => format!(r#"{{"model":"m","num_layers":{l},"num_experts":{E},"top_k":2}}"#),
    }
}

fn routing(moe: &str, dense: &str) -> String {
    format!(
        r#"{{"family":"qwen2_moe","moe_layers":{moe},"dense_layers":{dense},"num_shared_experts":1,"router":"softmax_topk","scores":"softmax","weights":"softmax probability of each selected expert"}}"#
    )
}

fn rec(pid: &str, cat: &str, layer: u32, pos: u32, experts: [u32; 2], w: [f32; 2]) -> String {
    format!(
        "{{\"prompt_id\":\"{pid}\",\"category\":\"{cat}\",\"layer\":{layer},\"position\":{pos},\"token_type\":\"prompt\",\"experts\":[{},{}],\"weights\":[{},{}]}}\n",
        experts[0], experts[1], w[0], w[1]
    )
}

/// Records of three prompts over `moe` MoE layers (numbered `first + i`), deterministic and
/// different per prompt, layer and position.
fn records(first: u32, moe: u32) -> String {
    let mut s = String::new();
    for (p, (pid, cat)) in [("a", "x"), ("b", "x"), ("c", "y")].into_iter().enumerate() {
        for pos in 0..5u32 {
            for i in 0..moe {
                let e0 = (p as u32 + 2 * i + pos) % E as u32;
                let e1 = (e0 + 1 + (i + pos) % 3) % E as u32;
                let e1 = if e1 == e0 { (e0 + 1) % E as u32 } else { e1 };
                let w = [0.25 + 0.01 * pos as f32, 0.125 + 0.01 * i as f32];
                s.push_str(&rec(pid, cat, first + i, pos, [e0, e1], w));
            }
        }
    }
    s
}

fn dir_with(manifest: &str, trace_name: &str, trace: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(MANIFEST_FILE), manifest).unwrap();
    let p = d.path().join(trace_name);
    std::fs::write(&p, trace).unwrap();
    (d, p)
}

#[test]
fn dense_first_layer_aggregates_like_the_renumbered_trace() {
    // Decoder layers 0..4, layer 0 dense: records at layers 1, 2, 3.
    let (_d1, dense) = dir_with(
        &manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
        "t.jsonl",
        &records(1, 3),
    );
    // The same records renumbered 0..3, without a routing block.
    let (_d2, plain) = dir_with(&manifest_json(3, None), "t.jsonl", &records(0, 3));
    for weighted in [false, true] {
        let opts = AggregateOptions {
            weighted,
            ..AggregateOptions::default()
        };
        let a = aggregate_paths(std::slice::from_ref(&dense), &opts).unwrap();
        let b = aggregate_paths(std::slice::from_ref(&plain), &opts).unwrap();
        assert_eq!(a.num_layers, 3, "rows are the MoE layers");
        assert_eq!(a.layers, vec![1, 2, 3]);
        assert_eq!(b.layers, vec![0, 1, 2]);
        assert_eq!((a.num_experts, a.top_k), (b.num_experts, b.top_k));
        assert_eq!(a.prompts, b.prompts, "weighted = {weighted}");
        assert!(a.prompts[0].counts.iter().sum::<f64>() > 0.0);
        let mut streamed = Vec::new();
        let info = for_each_prompt_counts_info(std::slice::from_ref(&dense), &opts, |p| {
            streamed.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!((info.num_layers, info.layers.clone()), (3, vec![1, 2, 3]));
        assert_eq!(streamed, a.prompts);
    }
}

#[test]
fn dense_middle_layer_and_labels() {
    // Layers 0 and 2 MoE, layer 1 dense.
    let mut t = String::new();
    t.push_str(&rec("a", "x", 0, 0, [0, 1], [0.5, 0.25]));
    t.push_str(&rec("a", "x", 2, 0, [2, 3], [0.5, 0.25]));
    let (_d, p) = dir_with(
        &manifest_json(3, Some(&routing("[0,2]", "[1]"))),
        "t.jsonl",
        &t,
    );
    let table = aggregate_paths(&[p], &AggregateOptions::default()).unwrap();
    assert_eq!(table.layers, vec![0, 2]);
    assert_eq!(
        table.prompts[0].counts,
        vec![1., 1., 0., 0., 0., 0., 1., 1.]
    );
    assert_eq!(table.prompts[0].tokens_per_layer, vec![1, 1]);
}

#[test]
fn a_record_at_a_dense_layer_is_an_error_naming_file_and_line() {
    let mut t = records(1, 3);
    t.push_str(&rec("a", "x", 0, 9, [0, 1], [0.5, 0.25]));
    let line = t.lines().count();
    let (_d, p) = dir_with(
        &manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
        "t.jsonl",
        &t,
    );
    let msg = aggregate_paths(&[p], &AggregateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("t.jsonl:{line}:")) && msg.contains("layer 0 is a dense layer"),
        "{msg}"
    );
    // Flat events too.
    let ev = "{\"prompt_id\":\"a\",\"layer\":1,\"position\":0,\"expert\":1,\"token_type\":\"prompt\"}\n\
              {\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"expert\":1,\"token_type\":\"prompt\"}\n";
    let (_d, p) = dir_with(
        &manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
        "e.jsonl",
        ev,
    );
    let msg = aggregate_paths(&[p], &AggregateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("e.jsonl:2:") && msg.contains("dense layer"),
        "{msg}"
    );
}

/// Runs the decisions of `records(first, moe)` through a `CountsWriter` of `l` layers with the
/// given dense layers and returns the file's text.
fn counts_file(dir: &Path, l: usize, dense: &[u32], first: u32, moe: u32) -> PathBuf {
    let path = dir.join("counts.jsonl");
    let mut w = CountsWriter::create(&path, l, E)
        .unwrap()
        .with_dense_layers(dense)
        .unwrap()
        .with_fsync(false);
    for (p, (pid, cat)) in [("a", "x"), ("b", "x"), ("c", "y")].into_iter().enumerate() {
        w.begin_prompt(pid, Some(cat)).unwrap();
        for pos in 0..5u32 {
            for i in 0..moe {
                let e0 = (p as u32 + 2 * i + pos) % E as u32;
                let e1 = (e0 + 1 + (i + pos) % 3) % E as u32;
                let e1 = if e1 == e0 { (e0 + 1) % E as u32 } else { e1 };
                let experts = [e0, e1];
                let weights = [0.25 + 0.01 * pos as f32, 0.125 + 0.01 * i as f32];
                w.record(&RoutingDecision {
                    prompt_id: pid,
                    layer: first + i,
                    position: pos,
                    token_id: 7,
                    token_type: TokenType::Prompt,
                    experts: &experts,
                    weights: &weights,
                    probs: None,
                })
                .unwrap();
            }
        }
        w.end_prompt(pid).unwrap();
    }
    path
}

#[test]
fn counts_lines_with_a_dense_layer() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join(MANIFEST_FILE),
        manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
    )
    .unwrap();
    let counts = counts_file(d.path(), 4, &[0], 1, 3);
    let text = std::fs::read_to_string(&counts).unwrap();
    assert!(text.contains("\"num_layers\":4"), "{text}");
    // The same routing as records: the same per-prompt counts.
    let (_d2, recs) = dir_with(
        &manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
        "t.jsonl",
        &records(1, 3),
    );
    for weighted in [false, true] {
        let opts = AggregateOptions {
            weighted,
            ..AggregateOptions::default()
        };
        let a = aggregate_paths(std::slice::from_ref(&counts), &opts).unwrap();
        let b = aggregate_paths(std::slice::from_ref(&recs), &opts).unwrap();
        assert_eq!(a.layers, vec![1, 2, 3]);
        assert_eq!(a.top_k, Some(2));
        assert_eq!(a.prompts, b.prompts, "weighted = {weighted}");
    }
    // A counts line with selections at the dense layer is rejected with file and line.
    let mut bad: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
    bad["counts"][0] = 1.into();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[2] = bad.to_string();
    std::fs::write(&counts, lines.join("\n") + "\n").unwrap();
    let msg = aggregate_paths(&[counts], &AggregateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("counts.jsonl:3:") && msg.contains("layer 0 is a dense layer"),
        "{msg}"
    );
}

#[test]
fn counts_writer_refuses_decisions_at_dense_layers() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("c.jsonl");
    assert!(CountsWriter::create(&path, 2, E)
        .unwrap()
        .with_dense_layers(&[2])
        .is_err());
    assert!(CountsWriter::create(&path, 2, E)
        .unwrap()
        .with_dense_layers(&[0, 1])
        .is_err());
    let mut w = CountsWriter::create(&path, 2, E)
        .unwrap()
        .with_dense_layers(&[0])
        .unwrap();
    w.begin_prompt("a", None).unwrap();
    let err = w
        .record(&RoutingDecision {
            prompt_id: "a",
            layer: 0,
            position: 0,
            token_id: 1,
            token_type: TokenType::Prompt,
            experts: &[0, 1],
            weights: &[0.5, 0.25],
            probs: None,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 0 is a dense layer"), "{err}");
}

#[test]
fn manifest_round_trip_and_absent_block() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(MANIFEST_FILE);
    std::fs::write(&p, manifest_json(4, Some(&routing("[1,2,3]", "[0]")))).unwrap();
    let m = Manifest::read(&p).unwrap();
    let r = m.routing.clone().unwrap();
    assert_eq!(
        (r.moe_layers.clone(), r.dense_layers.clone()),
        (vec![1, 2, 3], vec![0])
    );
    assert_eq!((r.num_shared_experts, r.scores.as_str()), (1, "softmax"));
    assert_eq!(m.moe_layers(), vec![1, 2, 3]);
    m.write(&p).unwrap();
    assert_eq!(Manifest::read(&p).unwrap(), m);
    // Without the block nothing is written for it, and every layer is an MoE layer.
    std::fs::write(&p, manifest_json(3, None)).unwrap();
    let m = Manifest::read(&p).unwrap();
    assert!(m.routing.is_none());
    assert_eq!(m.moe_layers(), vec![0, 1, 2]);
    assert!(!serde_json::to_string(&m).unwrap().contains("routing"));
    let all = RoutingLayout::all_moe("olmoe", 3);
    assert_eq!(all.moe_layers, vec![0, 1, 2]);
    assert_eq!(all.validate(3, 4), Ok(()));
    assert_eq!(all.rows(3), vec![Some(0), Some(1), Some(2)]);
}

#[test]
fn invalid_routing_blocks_name_the_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(MANIFEST_FILE);
    let with = |field: &str, value: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&routing("[1,2,3]", "[0]")).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    };
    let long = format!("\"{}\"", "x".repeat(65));
    let cases: Vec<(String, &str)> = vec![
        (routing("[1,2,4]", "[0]"), "routing.moe_layers: layer 4 is not below num_layers = 4"),
        (routing("[1,3,2]", "[0]"), "routing.moe_layers must be ascending"),
        (routing("[1,2,2,3]", "[0]"), "routing.moe_layers must be ascending"),
        (routing("[0,1,2,3]", "[0]"), "routing.dense_layers: layer 0 is also in routing.moe_layers"),
        (routing("[1,2]", "[0]"), "layer 3 is in neither"),
        (routing("[]", "[0,1,2,3]"), "routing.moe_layers is empty"),
        (routing("[0,1,2,3,4,5]", "[]"), "routing.moe_layers has 6 entries but num_layers = 4"),
        (routing("[1,2,3]", "[-1]"), "invalid manifest"),
        (with("scores", "\"logits\""), "routing.scores"),
        (with("family", &long), "routing.family is 65 bytes long"),
        (with("num_shared_experts", "5000"), "routing.num_shared_experts = 5000 exceeds"),
        (with("num_shared_experts", "-1"), "invalid manifest"),
        (
            r#"{"family":"mixtral","dense_layers":[],"num_shared_experts":0,"router":"softmax_topk","scores":"softmax","weights":"w"}"#.to_string(),
            "missing field `moe_layers`",
        ),
        ("[1,2,3]".to_string(), "invalid manifest"),
    ];
    for (block, needle) in cases {
        std::fs::write(&p, manifest_json(4, Some(&block))).unwrap();
        let msg = Manifest::read(&p).unwrap_err().to_string();
        assert!(
            msg.contains("manifest.json") && msg.contains(needle),
            "{block}: expected {needle:?} in {msg}"
        );
        // Aggregation reads the manifest beside the traces and fails the same way.
        let t = d.path().join("t.jsonl");
        std::fs::write(&t, records(1, 3)).unwrap();
        let msg = aggregate_paths(&[t], &AggregateOptions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("manifest.json"), "{msg}");
    }
}

#[test]
fn manifests_that_disagree_on_routing_and_given_layers() {
    let (_d1, a) = dir_with(
        &manifest_json(4, Some(&routing("[1,2,3]", "[0]"))),
        "t.jsonl",
        &records(1, 3),
    );
    let (_d2, b) = dir_with(
        &manifest_json(4, Some(&routing("[0,1,2,3]", "[]"))),
        "t.jsonl",
        &records(1, 3),
    );
    let msg = aggregate_paths(&[a.clone(), b], &AggregateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("routing.moe_layers"), "{msg}");
    let opts = AggregateOptions {
        num_layers: Some(3),
        ..AggregateOptions::default()
    };
    let msg = aggregate_paths(&[a], &opts).unwrap_err().to_string();
    assert!(msg.contains("differs from num_layers = 4"), "{msg}");
}

#[test]
fn applied_weights_above_one_are_accepted() {
    // DeepSeek's routed_scaling_factor makes the applied coefficients exceed 1.
    let t = rec("a", "x", 0, 0, [0, 1], [2.5, 0.75]) + &rec("a", "x", 1, 0, [2, 3], [1.25, 1.0]);
    let (_d, p) = dir_with(&manifest_json(2, None), "t.jsonl", &t);
    let opts = AggregateOptions {
        weighted: true,
        ..AggregateOptions::default()
    };
    let table = aggregate_paths(&[p], &opts).unwrap();
    assert_eq!(
        table.prompts[0].counts,
        vec![2.5, 0.75, 0., 0., 0., 0., 1.25, 1.0]
    );
}
