//! Writers: round trips for all three compressions, durability and resume after a cut tail.

use moe_xray_test_support::decision;
use std::path::{Path, PathBuf};

use moe_xray_trace::reader::read_all;
use moe_xray_trace::{
    aggregate_paths, AggregateOptions, CountsWriter, EventsWriter, JsonlAppender, RoutingDecision,
    RoutingRecord, RoutingSink, TokenType, TraceItem,
};

const L: u32 = 3;
const E: u32 = 6;
const EXTS: [&str; 3] = ["jsonl", "jsonl.gz", "jsonl.zst"];

/// Deterministic decisions of prompt `i`: `3 + i % 3` prompt tokens, `i % 4` generated tokens.
fn decisions(i: usize) -> Vec<RoutingRecord> {
    let id = format!("p{i}");
    let (np, ng) = (3 + i % 3, i % 4);
    let mut out = Vec::new();
    for pos in 0..(np + ng) {
        for layer in 0..L {
            let a = ((i * 7 + pos * 3 + layer as usize) % E as usize) as u32;
            let b = (a + 1 + (pos as u32 % (E - 1))) % E;
            let b = if b == a { (a + 1) % E } else { b };
            let probs: Vec<f32> = (0..E)
                .map(|e| {
                    if e == a {
                        0.5
                    } else if e == b {
                        0.25
                    } else {
                        0.25 / (E - 2) as f32
                    }
                })
                .collect();
            out.push(RoutingRecord {
                prompt_id: id.clone(),
                category: Some(format!("cat{}", i % 2)),
                layer,
                position: pos as u32,
                token_id: Some((i * 100 + pos) as u32),
                token_type: if pos < np {
                    TokenType::Prompt
                } else {
                    TokenType::Generation
                },
                experts: vec![a, b],
                weights: Some(vec![0.5, 0.25 + pos as f32 * 1e-3]),
                probs: Some(probs),
            });
        }
    }
    out
}

fn feed(sink: &mut dyn RoutingSink, recs: &[RoutingRecord]) {
    for r in recs {
        sink.record(&decision(r)).unwrap();
    }
}

fn run_prompt(sink: &mut dyn RoutingSink, i: usize) {
    let recs = decisions(i);
    sink.begin_prompt(&format!("p{i}"), Some(&format!("cat{}", i % 2)))
        .unwrap();
    feed(sink, &recs);
    sink.end_prompt(&format!("p{i}")).unwrap();
}

fn records_of(path: &Path) -> Vec<RoutingRecord> {
    read_all(path)
        .unwrap()
        .into_iter()
        .map(|i| match i {
            TraceItem::Record(r) => r,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn events_round_trip_all_compressions_with_interleaving_and_probs() {
    let d = tempfile::tempdir().unwrap();
    for ext in EXTS {
        let p = d.path().join(format!("t.{ext}"));
        let mut w = EventsWriter::create(&p).unwrap().with_probs(true);
        assert!(w.wants_probs());
        // two prompts interleaved (as in a batch), then more prompts
        let (r0, r1) = (decisions(0), decisions(1));
        w.begin_prompt("p0", Some("cat0")).unwrap();
        w.begin_prompt("p1", Some("cat1")).unwrap();
        for (a, b) in r0.iter().zip(r1.iter()) {
            feed(&mut w, std::slice::from_ref(a));
            feed(&mut w, std::slice::from_ref(b));
        }
        feed(&mut w, &r1[r0.len()..]);
        w.end_prompt("p1").unwrap();
        w.end_prompt("p0").unwrap();
        for i in 2..5 {
            run_prompt(&mut w, i);
        }
        assert_eq!(w.prompts_written(), 5);
        drop(w);
        let mut expected = decisions(1);
        expected.extend(decisions(0));
        for i in 2..5 {
            expected.extend(decisions(i));
        }
        assert_eq!(records_of(&p), expected, "{ext}");
        let bytes = std::fs::read(&p).unwrap();
        match ext {
            "jsonl.gz" => assert_eq!(&bytes[..2], &[0x1f, 0x8b]),
            "jsonl.zst" => assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd]),
            _ => assert_eq!(bytes[0], b'{'),
        }
    }
}

#[test]
fn probs_are_omitted_unless_requested() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.jsonl");
    let mut w = EventsWriter::create(&p).unwrap();
    run_prompt(&mut w, 0);
    drop(w);
    let recs = records_of(&p);
    assert!(recs
        .iter()
        .all(|r| r.probs.is_none() && r.weights.is_some()));
}

#[test]
fn sink_protocol_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut w = EventsWriter::create(d.path().join("t.jsonl")).unwrap();
    let r = &decisions(0)[0];
    let dec = RoutingDecision {
        prompt_id: "p0",
        layer: 0,
        position: 0,
        token_id: 1,
        token_type: TokenType::Prompt,
        experts: &r.experts,
        weights: &[],
        probs: None,
    };
    assert!(w
        .record(&dec)
        .unwrap_err()
        .to_string()
        .contains("outside begin_prompt"));
    assert!(w.end_prompt("zz").is_err());
    w.begin_prompt("p0", None).unwrap();
    assert!(w
        .begin_prompt("p0", None)
        .unwrap_err()
        .to_string()
        .contains("begun twice"));
    let mut c = CountsWriter::create(d.path().join("c.jsonl"), 2, 4).unwrap();
    c.begin_prompt("p0", None).unwrap();
    let bad = RoutingDecision {
        experts: &[7],
        ..dec
    };
    assert!(c
        .record(&bad)
        .unwrap_err()
        .to_string()
        .contains("expert 7 out of range"));
    let bad = RoutingDecision { layer: 2, ..dec };
    assert!(c
        .record(&bad)
        .unwrap_err()
        .to_string()
        .contains("layer 2 out of range"));
}

#[test]
fn counts_writer_matches_events_aggregation() {
    let d = tempfile::tempdir().unwrap();
    for ext in EXTS {
        let pe = d.path().join(format!("e.{ext}"));
        let pc = d.path().join(format!("c.{ext}"));
        let mut we = EventsWriter::create(&pe).unwrap();
        let mut wc = CountsWriter::create(&pc, L as usize, E as usize).unwrap();
        for i in 0..6 {
            run_prompt(&mut we, i);
            run_prompt(&mut wc, i);
        }
        drop((we, wc));
        for (weighted, types) in [
            (false, vec![TokenType::Prompt, TokenType::Generation]),
            (false, vec![TokenType::Generation]),
            (true, vec![TokenType::Prompt, TokenType::Generation]),
        ] {
            let o = AggregateOptions {
                weighted,
                token_types: types,
                ..AggregateOptions::default()
            };
            let te = aggregate_paths(std::slice::from_ref(&pe), &o).unwrap();
            let tc = aggregate_paths(std::slice::from_ref(&pc), &o).unwrap();
            assert_eq!((tc.num_layers, tc.num_experts, tc.top_k), (3, 6, Some(2)));
            assert_eq!(te.prompts.len(), 6);
            for (a, b) in te.prompts.iter().zip(&tc.prompts) {
                assert_eq!(a.prompt_id, b.prompt_id);
                assert_eq!(a.category, b.category);
                assert_eq!(a.tokens_per_layer, b.tokens_per_layer);
                for (x, y) in a.counts.iter().zip(&b.counts) {
                    assert!((x - y).abs() < 1e-9, "{ext} {weighted}: {x} vs {y}");
                }
            }
        }
    }
}

fn full_file(dir: &Path, name: &str, counts: bool, n: usize) -> PathBuf {
    let p = dir.join(name);
    if counts {
        let mut w = CountsWriter::create(&p, L as usize, E as usize).unwrap();
        (0..n).for_each(|i| run_prompt(&mut w, i));
    } else {
        let mut w = EventsWriter::create(&p).unwrap();
        (0..n).for_each(|i| run_prompt(&mut w, i));
    }
    p
}

/// Cuts a finished file at every `step`-th byte, resumes, completes the missing prompts and
/// checks the result equals an uninterrupted run (no loss, no duplicates).
fn check_resume_at_every_cut(counts: bool, ext: &str, step: usize) {
    let d = tempfile::tempdir().unwrap();
    let n = 5;
    let clean = full_file(d.path(), &format!("clean.{ext}"), counts, n);
    let bytes = std::fs::read(&clean).unwrap();
    let o = AggregateOptions::default();
    let want = aggregate_paths(std::slice::from_ref(&clean), &o).unwrap();
    let mut cuts: Vec<usize> = (0..=bytes.len()).step_by(step).collect();
    cuts.push(bytes.len());
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        let p = d.path().join(format!("cut.{ext}"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let done = if counts {
            let (mut w, done) = CountsWriter::open_resume(&p, L as usize, E as usize).unwrap();
            (0..n)
                .filter(|i| !done.contains(&format!("p{i}")))
                .for_each(|i| run_prompt(&mut w, i));
            done
        } else {
            let (mut w, done) = EventsWriter::open_resume(&p).unwrap();
            (0..n)
                .filter(|i| !done.contains(&format!("p{i}")))
                .for_each(|i| run_prompt(&mut w, i));
            done
        };
        // completed prompts are a prefix, and the cut-off ones were redone
        let expect_prefix: Vec<String> = (0..done.len()).map(|i| format!("p{i}")).collect();
        assert_eq!(done, expect_prefix, "{ext} cut {cut}");
        if cut == bytes.len() && (ext != "jsonl" || counts) {
            assert_eq!(done.len(), n, "{ext}: a clean file keeps every prompt");
        }
        let got = aggregate_paths(std::slice::from_ref(&p), &o)
            .unwrap_or_else(|e| panic!("{ext} counts={counts} cut {cut}: {e}"));
        assert_eq!(got.prompts, want.prompts, "{ext} counts={counts} cut {cut}");
    }
}

#[test]
fn events_resume_after_cut_plain() {
    check_resume_at_every_cut(false, "jsonl", 97);
}

#[test]
fn events_resume_after_cut_gzip() {
    check_resume_at_every_cut(false, "jsonl.gz", 23);
}

#[test]
fn events_resume_after_cut_zstd() {
    check_resume_at_every_cut(false, "jsonl.zst", 23);
}

#[test]
fn counts_resume_after_cut_all_compressions() {
    for (ext, step) in [("jsonl", 41), ("jsonl.gz", 17), ("jsonl.zst", 17)] {
        check_resume_at_every_cut(true, ext, step);
    }
}

#[test]
fn resume_of_missing_file_creates_it_and_wrong_content_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("new.jsonl.gz");
    let (mut w, done) = EventsWriter::open_resume(&p).unwrap();
    assert!(done.is_empty());
    run_prompt(&mut w, 0);
    drop(w);
    assert_eq!(
        EventsWriter::open_resume(&p).unwrap().1,
        vec!["p0".to_string()]
    );
    // a plain file with a .gz name is not silently truncated
    let q = d.path().join("plain.jsonl.gz");
    std::fs::write(&q, "{\"prompt_id\":\"a\"}\n").unwrap();
    let msg = EventsWriter::open_resume(&q).err().unwrap().to_string();
    assert!(
        msg.contains("plain.jsonl.gz") && msg.contains("cannot resume"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&q).unwrap(), b"{\"prompt_id\":\"a\"}\n");
    // an unparsable complete line is an error, not a truncation
    let r = d.path().join("bad.jsonl");
    std::fs::write(&r, "garbage\n{\"prompt_id\":\"a\"}\n").unwrap();
    let msg = EventsWriter::open_resume(&r).err().unwrap().to_string();
    assert!(msg.contains("bad.jsonl:1: cannot resume"), "{msg}");
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Gen {
    prompt_id: String,
    generated_ids: Vec<u32>,
    text: String,
}

#[test]
fn jsonl_appender_round_trip_and_resume() {
    let d = tempfile::tempdir().unwrap();
    for ext in EXTS {
        let p = d.path().join(format!("generations.{ext}"));
        let items: Vec<Gen> = (0..4)
            .map(|i| Gen {
                prompt_id: format!("p{i}"),
                generated_ids: vec![i, i + 1],
                text: format!("text \"{i}\"\n"),
            })
            .collect();
        let mut w = JsonlAppender::create(&p).unwrap();
        for it in &items {
            w.append(it).unwrap();
        }
        drop(w);
        let full = std::fs::read(&p).unwrap();
        let (_, got) = JsonlAppender::<Gen>::open_resume(&p).unwrap();
        assert_eq!(got, items, "{ext}");
        // cut inside the last item
        std::fs::write(&p, &full[..full.len() - 5]).unwrap();
        let (mut w, got) = JsonlAppender::<Gen>::open_resume(&p).unwrap();
        assert_eq!(got, items[..3].to_vec(), "{ext}");
        w.append(&items[3]).unwrap();
        drop(w);
        let (_, got) = JsonlAppender::<Gen>::open_resume(&p).unwrap();
        assert_eq!(got, items, "{ext}");
    }
}

#[test]
fn without_fsync_the_content_is_the_same() {
    let d = tempfile::tempdir().unwrap();
    for ext in EXTS {
        let a = d.path().join(format!("a.{ext}"));
        let b = d.path().join(format!("b.{ext}"));
        let mut wa = CountsWriter::create(&a, L as usize, E as usize).unwrap();
        let mut wb = CountsWriter::create(&b, L as usize, E as usize)
            .unwrap()
            .with_fsync(false);
        for i in 0..3 {
            run_prompt(&mut wa, i);
            run_prompt(&mut wb, i);
        }
        drop((wa, wb));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{ext}"
        );
    }
}
