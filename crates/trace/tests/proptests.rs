//! Property tests: no input makes the reader, the aggregator or resume panic, and arbitrary
//! records round-trip through the writers.

use moe_xray_test_support::decision;
use std::io::Write;

use moe_xray_trace::reader::read_all;
use moe_xray_trace::{
    aggregate_paths, AggregateOptions, EventsWriter, JsonlAppender, RoutingRecord, RoutingSink,
    TokenType, TraceItem, TraceReader,
};
use proptest::prelude::*;

/// `PROPTEST_CASES` when set (longer runs, docs/trace-format.md "Robustness"), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Reads, aggregates and resumes from `content` stored under `name`; only checks nothing panics
/// and every error names the file.
fn exercise(name: &str, content: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, content).unwrap();
    if let Ok(r) = TraceReader::open(&p) {
        for item in r {
            if let Err(e) = item {
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
    for opts in [
        AggregateOptions::default(),
        AggregateOptions {
            num_layers: Some(2),
            num_experts: Some(4),
            weighted: true,
            ..AggregateOptions::default()
        },
    ] {
        if let Err(e) = aggregate_paths(std::slice::from_ref(&p), &opts) {
            assert!(e.to_string().contains(name), "{e}");
        }
    }
    let _ = EventsWriter::open_resume(&p);
    std::fs::write(&p, content).unwrap();
    let _ = JsonlAppender::<serde_json::Value>::open_resume(&p);
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[1,2]}".to_string()),
        Just("{\"prompt_id\":\"a\",\"layer\":0,\"position\":1,\"expert\":3,\"token_type\":\"generation\"}".to_string()),
        Just("{\"prompt_id\":\"a\",\"token_type\":\"prompt\",\"num_layers\":2,\"num_experts\":2,\"tokens\":1,\"counts\":[1,0,0,1]}".to_string()),
        (any::<i64>(), any::<i64>(), prop::collection::vec(any::<i64>(), 0..4)).prop_map(|(l, p, ex)| format!(
            "{{\"prompt_id\":\"b\",\"layer\":{l},\"position\":{p},\"token_type\":\"prompt\",\"experts\":{ex:?}}}"
        )),
        (0u32..3, 0u32..3, prop::collection::vec(0u32..6, 0..4), prop::collection::vec(-1.0f64..2.0, 0..4)).prop_map(|(l, p, ex, w)| format!(
            "{{\"prompt_id\":\"c\",\"category\":\"x{l}\",\"layer\":{l},\"position\":{p},\"token_type\":\"prompt\",\"experts\":{ex:?},\"weights\":{w:?}}}"
        )),
        (any::<u32>(), prop::collection::vec(any::<i64>(), 0..6)).prop_map(|(t, c)| format!(
            "{{\"prompt_id\":\"d\",\"token_type\":\"generation\",\"num_layers\":2,\"num_experts\":2,\"tokens\":{t},\"counts\":{c:?}}}"
        )),
        "[ -~]{0,40}",
        Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise("t.jsonl", &bytes);
        exercise("t.jsonl.gz", &bytes);
        exercise("t.jsonl.zst", &bytes);
        exercise("g.jsonl.gz", &gz(&bytes));
        let z = zstd::encode_all(&bytes[..], 1).unwrap();
        exercise("z.jsonl.zst", &z);
        exercise("zc.jsonl.zst", &z[..z.len() / 2]);
    }

    #[test]
    fn arbitrary_lines_never_panic(lines in prop::collection::vec(fragment(), 0..8), newline in any::<bool>()) {
        let mut s = lines.join("\n");
        if newline {
            s.push('\n');
        }
        exercise("l.jsonl", s.as_bytes());
        let g = gz(s.as_bytes());
        exercise("l.jsonl.gz", &g);
        exercise("lc.jsonl.gz", &g[..g.len() * 2 / 3]);
    }
}

fn record_strategy() -> impl Strategy<Value = RoutingRecord> {
    (
        0usize..3,
        0u32..4,
        0u32..50,
        any::<u32>(),
        any::<bool>(),
        Just((0u32..16).collect::<Vec<u32>>()).prop_shuffle(),
        1usize..5,
        prop::collection::vec(0.0f32..=1.0, 4),
        prop::option::of(prop::collection::vec(0.0f32..=1.0, 16)),
    )
        .prop_map(
            |(p, layer, position, tid, gen, experts, k, w, probs)| RoutingRecord {
                prompt_id: format!("prompt-\"{p}\"\u{e9}"),
                category: Some(format!("cat {p}")),
                layer,
                position,
                token_id: Some(tid),
                token_type: if gen {
                    TokenType::Generation
                } else {
                    TokenType::Prompt
                },
                experts: experts[..k].to_vec(),
                weights: Some(w[..k].to_vec()),
                probs,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_records_round_trip(recs in prop::collection::vec(record_strategy(), 1..30), ext in 0usize..3) {
        // one top-k per file (mixed top-k is an error by design)
        let k = recs[0].experts.len();
        let recs: Vec<RoutingRecord> = recs
            .into_iter()
            .map(|mut r| {
                r.experts.truncate(k);
                r.weights.as_mut().unwrap().truncate(k);
                if r.experts.len() < k {
                    r.experts = (0..k as u32).collect();
                    r.weights = Some(vec![0.5; k]);
                }
                r
            })
            .collect();
        let has_probs = recs[0].probs.is_some();
        let recs: Vec<RoutingRecord> = recs
            .into_iter()
            .map(|mut r| {
                if r.probs.is_some() != has_probs {
                    r.probs = if has_probs { Some(vec![0.0625; 16]) } else { None };
                }
                r
            })
            .collect();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(["t.jsonl", "t.jsonl.gz", "t.jsonl.zst"][ext]);
        let mut w = EventsWriter::create(&p).unwrap().with_probs(true);
        // each record as its own prompt block keeps file order = input order
        for (i, r) in recs.iter().enumerate() {
            w.begin_prompt(&r.prompt_id, r.category.as_deref()).unwrap();
            w.record(&decision(r)).unwrap();
            w.end_prompt(&r.prompt_id).unwrap();
            prop_assert_eq!(w.prompts_written(), i + 1);
        }
        drop(w);
        let back: Vec<RoutingRecord> = read_all(&p)
            .unwrap()
            .into_iter()
            .map(|i| match i { TraceItem::Record(r) => r, _ => unreachable!() })
            .collect();
        prop_assert_eq!(back, recs);
    }
}
