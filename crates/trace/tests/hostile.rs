//! Hostile inputs (issue 14): sizes claimed by a manifest, a counts line, an option or an index
//! are checked against `moe_xray_trace::limits` before anything is allocated from them, and a
//! file whose compression does not match its name is refused. Each test names the class.

use std::io::Write;
use std::path::{Path, PathBuf};

use moe_xray_trace::limits::{MAX_EXPERTS, MAX_LAYER_EXPERTS};
use moe_xray_trace::{
    aggregate_paths, for_each_prompt_counts, for_each_prompt_counts_info, AggregateOptions,
    TraceReader,
};

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn rec(pid: &str, layer: i64, pos: i64, experts: &str) -> String {
    format!(
        "{{\"prompt_id\":\"{pid}\",\"category\":\"c\",\"layer\":{layer},\"position\":{pos},\"token_type\":\"prompt\",\"experts\":{experts}}}\n"
    )
}

fn agg_err(paths: &[PathBuf], opts: &AggregateOptions) -> String {
    match aggregate_paths(paths, opts) {
        Ok(t) => panic!("expected an error, got {} prompts", t.prompts.len()),
        Err(e) => e.to_string(),
    }
}

/// Class 1: a manifest claiming 2^40 layers used to wrap `L * E` to 0 and panic with an index
/// out of bounds; 2^63 used to be a capacity overflow.
#[test]
fn manifest_with_huge_dimensions_is_refused_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let t = write(d.path(), "trace.jsonl", rec("a", 0, 0, "[0,1]").as_bytes());
    for (manifest, needle) in [
        (
            r#"{"num_layers":1099511627776,"num_experts":1099511627776,"top_k":1}"#,
            "num_layers = 1099511627776 exceeds the supported maximum 4096",
        ),
        (
            r#"{"num_layers":2,"num_experts":9223372036854775808,"top_k":2}"#,
            "num_experts = 9223372036854775808 exceeds",
        ),
        (
            r#"{"num_layers":4096,"num_experts":4096,"top_k":2}"#,
            "num_layers × num_experts = 4096 × 4096 exceeds the supported maximum 1048576",
        ),
        (
            r#"{"num_layers":2,"num_experts":4,"top_k":18446744073709551615}"#,
            "top_k = 18446744073709551615 must be between 1 and num_experts = 4",
        ),
    ] {
        write(d.path(), "manifest.json", manifest.as_bytes());
        let msg = agg_err(std::slice::from_ref(&t), &AggregateOptions::default());
        assert!(
            msg.contains("manifest.json") && msg.contains(needle),
            "{manifest}: {msg}"
        );
    }
}

#[test]
fn given_dimensions_are_checked_too() {
    let d = tempfile::tempdir().unwrap();
    let t = write(d.path(), "t.jsonl", rec("a", 0, 0, "[0,1]").as_bytes());
    for (opts, needle) in [
        (
            AggregateOptions {
                num_layers: Some(1 << 40),
                ..AggregateOptions::default()
            },
            "num_layers = 1099511627776 exceeds",
        ),
        (
            AggregateOptions {
                num_experts: Some(usize::MAX),
                ..AggregateOptions::default()
            },
            "num_experts = 18446744073709551615 exceeds",
        ),
        (
            AggregateOptions {
                num_layers: Some(4096),
                num_experts: Some(4096),
                ..AggregateOptions::default()
            },
            "4096 × 4096 exceeds",
        ),
        (
            AggregateOptions {
                top_k: Some(MAX_EXPERTS + 1),
                ..AggregateOptions::default()
            },
            "top_k = 4097 must be between 1 and num_experts = 4096",
        ),
    ] {
        let msg = agg_err(std::slice::from_ref(&t), &opts);
        assert!(msg.contains("t.jsonl") && msg.contains(needle), "{msg}");
    }
}

#[test]
fn counts_line_with_huge_dimensions_is_refused_at_its_line() {
    let d = tempfile::tempdir().unwrap();
    for (l, e, needle) in [
        (1i64 << 40, 1i64, "num_layers 1099511627776 is out of range"),
        (4_000_000_000, 1, "num_layers = 4000000000 exceeds"),
        (1, 1 << 20, "num_experts = 1048576 exceeds"),
        (4096, 4096, "num_layers × num_experts = 4096 × 4096 exceeds"),
    ] {
        let line = format!(
            "{{\"prompt_id\":\"a\",\"token_type\":\"prompt\",\"num_layers\":{l},\"num_experts\":{e},\"tokens\":1,\"counts\":[1]}}\n"
        );
        let p = write(d.path(), "c.jsonl", line.as_bytes());
        let msg = agg_err(std::slice::from_ref(&p), &AggregateOptions::default());
        assert!(msg.contains("c.jsonl:1:") && msg.contains(needle), "{msg}");
        let msg = for_each_prompt_counts(&[p], &AggregateOptions::default(), |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("c.jsonl:1:") && msg.contains(needle), "{msg}");
    }
}

/// Inferred dimensions (no manifest): each index is below its own limit, but their product is
/// not; the error comes at the line that grew it, before the per-prompt tables are allocated.
#[test]
fn inferred_dimensions_product_is_limited() {
    let d = tempfile::tempdir().unwrap();
    let s = rec("a", 0, 0, "[4095]") + &rec("a", 4095, 0, "[0]");
    let p = write(d.path(), "t.jsonl", s.as_bytes());
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(
        msg.contains("t.jsonl:2:")
            && msg.contains(&format!(
                "4096 × 4096 (from the largest indices seen) exceeds the supported maximum {MAX_LAYER_EXPERTS}"
            )),
        "{msg}"
    );
    // A `probs` vector longer than any supported expert count.
    let probs = vec!["0"; MAX_EXPERTS + 1].join(",");
    let line = format!(
        "{{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"token_type\":\"prompt\",\"experts\":[0],\"probs\":[{probs}]}}\n"
    );
    let p = write(d.path(), "p.jsonl", line.as_bytes());
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(
        msg.contains("p.jsonl:1:") && msg.contains("`probs` has 4097 entries"),
        "{msg}"
    );
}

/// Many prompts × a large L·E would need more memory than the table limit: refused at the first
/// prompt that crosses it, not by an allocation failure at the end.
#[test]
fn prompts_times_cells_is_limited() {
    let d = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for i in 0..300 {
        s.push_str(&rec(&format!("p{i}"), 0, 0, "[0]"));
    }
    let p = write(d.path(), "t.jsonl", s.as_bytes());
    let opts = AggregateOptions {
        num_layers: Some(1024),
        num_experts: Some(1024),
        ..AggregateOptions::default()
    };
    let msg = agg_err(&[p], &opts);
    assert!(
        msg.contains("t.jsonl:") && msg.contains("counts held in memory at once"),
        "{msg}"
    );
}

/// Huge positions and layers cost a bounded amount of memory per line (sparse duplicate
/// detectors), and duplicates far apart are still found.
#[test]
fn sparse_duplicate_detection_at_extreme_positions() {
    let d = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for i in 0..200 {
        s.push_str(&rec(&format!("p{i}"), 4095, (1 << 20) - 1, "[1,0]"));
    }
    let p = write(d.path(), "t.jsonl", s.as_bytes());
    let t = aggregate_paths(std::slice::from_ref(&p), &AggregateOptions::default()).unwrap();
    assert_eq!(
        (t.num_layers, t.num_experts, t.prompts.len()),
        (4096, 2, 200)
    );
    let s = rec("a", 4095, (1 << 20) - 1, "[1,0]")
        + &rec("a", 4095, 0, "[1,0]")
        + &rec("a", 4095, (1 << 20) - 1, "[0,1]");
    let p = write(d.path(), "dup.jsonl", s.as_bytes());
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(
        msg.contains("dup.jsonl:3: duplicate record") && msg.contains("position 1048575"),
        "{msg}"
    );
    let ev = |pos: i64, e: i64| {
        format!("{{\"prompt_id\":\"a\",\"layer\":4095,\"position\":{pos},\"expert\":{e},\"token_type\":\"prompt\"}}\n")
    };
    let s = ev(1 << 19, 255) + &ev(0, 1) + &ev(1 << 19, 255);
    let p = write(d.path(), "ev.jsonl", s.as_bytes());
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(msg.contains("ev.jsonl:3: duplicate event"), "{msg}");
}

/// A records line with thousands of experts is checked for duplicates without quadratic work.
#[test]
fn long_expert_lists_are_limited_and_checked_fast() {
    let d = tempfile::tempdir().unwrap();
    let many: Vec<String> = (0..MAX_EXPERTS + 1).map(|e| e.to_string()).collect();
    let p = write(
        d.path(),
        "long.jsonl",
        rec("a", 0, 0, &format!("[{}]", many.join(","))).as_bytes(),
    );
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(msg.contains("`experts` has 4097 entries"), "{msg}");
    let mut dup: Vec<String> = (0..MAX_EXPERTS as u32 - 1).map(|e| e.to_string()).collect();
    dup.push("17".into());
    let p = write(
        d.path(),
        "dup.jsonl",
        rec("a", 0, 0, &format!("[{}]", dup.join(","))).as_bytes(),
    );
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(msg.contains("duplicate expert 17"), "{msg}");
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Class 3: the compression named by the file must be the compression of its content.
#[test]
fn compression_name_and_content_must_match() {
    let d = tempfile::tempdir().unwrap();
    let plain = rec("a", 0, 0, "[0,1]");
    let g = gz(plain.as_bytes());
    let z = zstd::encode_all(plain.as_bytes(), 1).unwrap();
    for (name, content, needle) in [
        (
            "gzip-in.jsonl.zst",
            &g,
            "file name says zstd but the content is gzip data",
        ),
        (
            "zstd-in.jsonl.gz",
            &z,
            "file name says gzip but the content is zstd data",
        ),
        (
            "gzip-in.jsonl",
            &g,
            "file name says plain but the content is gzip data",
        ),
        (
            "zstd-in.jsonl",
            &z,
            "file name says plain but the content is zstd data",
        ),
        (
            "plain-in.jsonl.gz",
            &plain.as_bytes().to_vec(),
            "file name says gzip but the content does not start with the gzip magic bytes",
        ),
        (
            "plain-in.jsonl.zst",
            &plain.as_bytes().to_vec(),
            "file name says zstd but the content does not start with the zstd magic bytes",
        ),
    ] {
        let p = write(d.path(), name, content);
        let msg = TraceReader::open(&p).unwrap_err().to_string();
        assert!(msg.contains(name) && msg.contains(needle), "{name}: {msg}");
        let msg = agg_err(&[p], &AggregateOptions::default());
        assert!(msg.contains(name) && msg.contains(needle), "{name}: {msg}");
    }
    for (name, content) in [("ok.jsonl.gz", &g), ("ok.jsonl.zst", &z)] {
        let p = write(d.path(), name, content);
        assert_eq!(
            aggregate_paths(&[p], &AggregateOptions::default())
                .unwrap()
                .prompts
                .len(),
            1
        );
    }
}

/// Class 4: `--weighted` without a manifest used to fail with "top_k is unknown"; the streaming
/// aggregation now reports the k it inferred, also when the counts are router weights.
#[test]
fn top_k_is_inferred_for_weighted_streaming() {
    let d = tempfile::tempdir().unwrap();
    let line = |pid: &str, l: i64, e: &str| {
        format!(
            "{{\"prompt_id\":\"{pid}\",\"layer\":{l},\"position\":0,\"token_type\":\"prompt\",\"experts\":{e},\"weights\":[0.5,0.25]}}\n"
        )
    };
    let s = line("a", 0, "[0,1]") + &line("a", 1, "[2,3]") + &line("b", 0, "[1,2]");
    let p = write(d.path(), "w.jsonl", s.as_bytes());
    let opts = AggregateOptions {
        weighted: true,
        ..AggregateOptions::default()
    };
    let mut n = 0;
    let info = for_each_prompt_counts_info(std::slice::from_ref(&p), &opts, |pc| {
        n += 1;
        assert_eq!(pc.counts.len(), 2 * 4);
        Ok(())
    })
    .unwrap();
    assert_eq!(
        (info.num_layers, info.num_experts, info.top_k, n),
        (2, 4, Some(2), 2)
    );
    let c = |pid: &str, tokens: u64, counts: &str, w: &str| {
        format!(
            "{{\"prompt_id\":\"{pid}\",\"token_type\":\"prompt\",\"num_layers\":1,\"num_experts\":4,\"tokens\":{tokens},\"counts\":{counts},\"weighted_counts\":{w}}}\n"
        )
    };
    let s =
        c("a", 2, "[3,1,1,1]", "[0.9,0.2,0.3,0.1]") + &c("b", 1, "[1,1,1,0]", "[0.1,0.1,0.2,0]");
    let p = write(d.path(), "wc.jsonl", s.as_bytes());
    let info = for_each_prompt_counts_info(&[p], &opts, |_| Ok(())).unwrap();
    assert_eq!(info.top_k, Some(3));
}

/// The counts writer sizes per-prompt tables from a model config: refused before the file is
/// created.
#[test]
fn counts_writer_refuses_huge_dimensions_before_creating_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("counts.jsonl");
    for (l, e) in [(1usize << 40, 64usize), (16, usize::MAX), (4096, 4096)] {
        let Err(err) = moe_xray_trace::CountsWriter::create(&p, l, e) else {
            panic!("{l} x {e} accepted");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("counts.jsonl") && msg.contains("exceeds the supported maximum"),
            "{msg}"
        );
        assert!(!p.exists());
    }
    assert!(moe_xray_trace::CountsWriter::create(&p, 16, 64).is_ok());
}

/// A small compressed file that expands to one endless line (a decompression bomb) is refused
/// at the line limit instead of being buffered whole.
#[test]
fn endless_line_in_a_compressed_file_is_refused() {
    use moe_xray_trace::limits::MAX_LINE_BYTES;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bomb.jsonl.zst");
    let mut enc = zstd::stream::write::Encoder::new(std::fs::File::create(&p).unwrap(), 1).unwrap();
    let chunk = vec![b' '; 1 << 20];
    enc.write_all(b"{\"prompt_id\":\"a\"").unwrap();
    for _ in 0..(MAX_LINE_BYTES >> 20) + 1 {
        enc.write_all(&chunk).unwrap();
    }
    enc.finish().unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
    let msg = agg_err(&[p], &AggregateOptions::default());
    assert!(
        msg.contains("bomb.jsonl.zst:1: line longer than 268435456 bytes"),
        "{msg}"
    );
}
