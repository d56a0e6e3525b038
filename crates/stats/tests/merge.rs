//! Shards keep the counts exactly: rows written to shards (split into parts) and read back in
//! ordinal order give byte-identical results to the rows themselves, on both paths, for integer
//! and weighted (non-integer) counts.

use moe_xray_stats::analyze::{Collector, PathChoice};
use moe_xray_stats::bench::{synthetic_rows, SynthShape};
use moe_xray_stats::input::PromptRow;
use moe_xray_stats::shard::{write_header, ShardHeader, ShardReader, ShardWriter, SHARD_FORMAT};
use moe_xray_stats::AnalyzeOptions;

fn rows(weighted: bool) -> Vec<PromptRow> {
    let mut r = synthetic_rows(&SynthShape {
        prompts: 40,
        categories: 3,
        layers: 3,
        experts: 8,
        top_k: 2,
        tokens: 10,
        seed: 11,
    });
    if weighted {
        for (i, row) in r.iter_mut().enumerate() {
            for (j, x) in row.counts.iter_mut().enumerate() {
                *x *= 0.1 + ((i * 31 + j * 7) % 13) as f64 / 17.0;
            }
        }
    }
    r
}

fn shard_bytes(rows: &[PromptRow], part: u64, parts: u64) -> Vec<u8> {
    let mut w = ShardWriter::new(Vec::new(), part, parts).unwrap();
    for (o, r) in rows.iter().enumerate() {
        if o as u64 % parts == part {
            w.push(o as u64, r, None).unwrap();
        }
    }
    let (records, info) = w.finish().unwrap();
    let header = ShardHeader {
        format: SHARD_FORMAT.into(),
        tool_version: "test".into(),
        traces: vec!["t".into()],
        part,
        parts,
        num_layers: 3,
        num_experts: 8,
        layers: vec![0, 1, 2],
        top_k: Some(2),
        weighted: false,
        token_types: vec!["prompt".into()],
        manifest: None,
        token_bags_error: Some("none".into()),
        kind: moe_xray_stats::shard::ShardKind::Counts,
        health: false,
    };
    let mut out = Vec::new();
    write_header(&mut out, &header, &info).unwrap();
    out.extend_from_slice(&records);
    out
}

fn results(rows: Vec<PromptRow>, path: PathChoice) -> String {
    let opts = AnalyzeOptions {
        reps: 10,
        perm_reps: 10,
        boot_reps: 10,
        classifier_perm_reps: 2,
        skip_tsne: true,
        path,
        ..AnalyzeOptions::default()
    };
    let mut c = Collector::new(3, 8, path);
    for r in rows {
        c.push(r).unwrap();
    }
    serde_json::to_string(c.finish(Some(2), &opts).unwrap().results()).unwrap()
}

#[test]
fn rows_through_shards_give_identical_results() {
    for weighted in [false, true] {
        let original = rows(weighted);
        for parts in [1u64, 2, 3] {
            // Read every part back and put the records in ordinal order, as merge does.
            let mut back = Vec::new();
            for part in (0..parts).rev() {
                let bytes = shard_bytes(&original, part, parts);
                let mut r =
                    ShardReader::from_reader("s".into(), Box::new(std::io::Cursor::new(bytes)))
                        .unwrap();
                assert_eq!(r.header().part, part);
                while let Some(rec) = r.next_record().unwrap() {
                    back.push(rec);
                }
            }
            back.sort_by_key(|r| r.ordinal);
            let back: Vec<PromptRow> = back.into_iter().map(|r| r.row).collect();
            assert_eq!(back.len(), original.len());
            for (a, b) in original.iter().zip(&back) {
                assert_eq!(a.prompt_id, b.prompt_id);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.counts), bits(&b.counts));
            }
            for path in [PathChoice::ExactPairs, PathChoice::GramSums] {
                assert_eq!(
                    results(original.clone(), path),
                    results(back.clone(), path),
                    "weighted {weighted}, {parts} parts, {path:?}"
                );
            }
        }
    }
}
