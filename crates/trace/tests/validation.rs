//! Every validation error names the file and line (or the file) and what is wrong.

use std::collections::HashMap;
use std::path::PathBuf;

use moe_xray_trace::{aggregate_paths, for_each_prompt_counts, AggregateOptions, TokenType};

fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn rec(pid: &str, layer: i64, pos: i64, experts: &str) -> String {
    format!(
        "{{\"prompt_id\":\"{pid}\",\"layer\":{layer},\"position\":{pos},\"token_type\":\"prompt\",\"experts\":{experts}}}\n"
    )
}

fn err_of(name: &str, content: &str, opts: &AggregateOptions) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write(&d, name, content.as_bytes());
    match aggregate_paths(&[p], opts) {
        Ok(t) => panic!("{name}: expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(name: &str, content: &str, opts: &AggregateOptions, needle: &str) {
    let msg = err_of(name, content, opts);
    assert!(
        msg.contains(needle),
        "{name}: expected {needle:?} in error {msg:?}"
    );
    assert!(
        msg.contains(name),
        "{name}: error does not name the file: {msg}"
    );
}

/// [`assert_err`] for each `(file name, content, expected text)` case, all under `opts`.
fn assert_errs(opts: &AggregateOptions, cases: &[(&str, &str, &str)]) {
    for &(name, content, needle) in cases {
        assert_err(name, content, opts, needle);
    }
}

/// The error message of aggregating `paths`, which must fail.
fn agg_err(paths: &[PathBuf], opts: &AggregateOptions) -> String {
    aggregate_paths(paths, opts).unwrap_err().to_string()
}

/// A flat routing-event line (one expert of one token).
fn event(pid: &str, layer: i64, pos: i64, expert: i64) -> String {
    format!(
        "{{\"prompt_id\":\"{pid}\",\"layer\":{layer},\"position\":{pos},\"expert\":{expert},\"token_type\":\"prompt\"}}\n"
    )
}

fn dims(l: usize, e: usize) -> AggregateOptions {
    AggregateOptions {
        num_layers: Some(l),
        num_experts: Some(e),
        ..AggregateOptions::default()
    }
}

/// `dims(2, 4)` that also expects `k` experts per token.
fn top_k(k: usize) -> AggregateOptions {
    AggregateOptions {
        top_k: Some(k),
        ..dims(2, 4)
    }
}

/// `base` with weighted counts requested.
fn weighted(base: AggregateOptions) -> AggregateOptions {
    AggregateOptions {
        weighted: true,
        ..base
    }
}

#[test]
fn malformed_json() {
    let c = rec("a", 0, 0, "[1,2]") + "{\"prompt_id\": oops}\n";
    assert_err("t.jsonl", &c, &dims(2, 4), "t.jsonl:2: malformed JSON");
}

#[test]
fn truncated_last_line() {
    let c = rec("a", 0, 0, "[1,2]") + "{\"prompt_id\":\"a\",\"lay";
    assert_err("t.jsonl", &c, &dims(2, 4), "t.jsonl:2: truncated last line");
}

#[test]
fn last_line_without_newline_is_fine_when_complete() {
    let d = tempfile::tempdir().unwrap();
    let c = rec("a", 0, 0, "[1,2]") + rec("a", 1, 0, "[0,3]").trim_end();
    let p = write(&d, "t.jsonl", c.as_bytes());
    let t = aggregate_paths(&[p], &dims(2, 4)).unwrap();
    assert_eq!(t.prompts[0].counts, vec![0., 1., 1., 0., 1., 0., 0., 1.]);
}

#[test]
fn unknown_token_type() {
    let c = rec("a", 0, 0, "[1,2]").replace("\"prompt\"", "\"answer\"");
    assert_err(
        "t.jsonl",
        &c,
        &dims(2, 4),
        "t.jsonl:1: unknown token_type \"answer\"",
    );
}

#[test]
fn negative_indices() {
    assert_errs(
        &dims(2, 4),
        &[
            (
                "a.jsonl",
                &rec("a", -1, 0, "[1,2]"),
                "a.jsonl:1: negative layer -1",
            ),
            (
                "b.jsonl",
                &rec("a", 0, -5, "[1,2]"),
                "b.jsonl:1: negative position -5",
            ),
            (
                "c.jsonl",
                &rec("a", 0, 0, "[1,-2]"),
                "c.jsonl:1: negative expert -2",
            ),
            (
                "d.jsonl",
                &event("a", 0, 0, -1),
                "d.jsonl:1: negative expert -1",
            ),
        ],
    );
}

#[test]
fn empty_files() {
    let o = AggregateOptions::default();
    assert_errs(
        &o,
        &[
            ("e.jsonl", "", "empty file"),
            ("w.jsonl", "\n  \n\n", "empty file"),
        ],
    );
    // an empty gzip stream is empty too
    let d = tempfile::tempdir().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, b"").unwrap();
    let p = write(&d, "z.jsonl.gz", &enc.finish().unwrap());
    let msg = agg_err(&[p], &o);
    assert!(
        msg.contains("z.jsonl.gz") && msg.contains("empty file"),
        "{msg}"
    );
}

#[test]
fn expert_and_layer_out_of_range() {
    assert_errs(
        &dims(2, 4),
        &[
            (
                "t.jsonl",
                &(rec("a", 0, 0, "[1,2]") + &rec("a", 1, 0, "[4,2]")),
                "t.jsonl:2: expert 4 is out of range (num_experts = 4)",
            ),
            (
                "l.jsonl",
                &(rec("a", 0, 0, "[1,2]") + &rec("a", 2, 0, "[0,2]")),
                "l.jsonl:2: layer 2 is out of range (num_layers = 2)",
            ),
        ],
    );
}

#[test]
fn dims_from_manifest_beside_the_trace() {
    let d = tempfile::tempdir().unwrap();
    write(
        &d,
        "manifest.json",
        br#"{"model":"m","num_layers":2,"num_experts":4,"top_k":2}"#,
    );
    let p = write(&d, "t.jsonl", rec("a", 0, 0, "[5,1]").as_bytes());
    let msg = agg_err(std::slice::from_ref(&p), &AggregateOptions::default());
    assert!(msg.contains("t.jsonl:1: expert 5 is out of range"), "{msg}");
    std::fs::write(&p, rec("a", 0, 0, "[3,1]") + &rec("a", 0, 1, "[3,1,2]")).unwrap();
    let msg = agg_err(std::slice::from_ref(&p), &AggregateOptions::default());
    assert!(msg.contains("t.jsonl:2: mixed top-k"), "{msg}");
    std::fs::write(&p, rec("a", 0, 0, "[3,1]")).unwrap();
    let t = aggregate_paths(&[p], &AggregateOptions::default()).unwrap();
    assert_eq!((t.num_layers, t.num_experts, t.top_k), (2, 4, Some(2)));
    assert!(!t.dims_inferred);
    assert_eq!(t.manifest.unwrap().model, "m");
}

#[test]
fn duplicate_experts_and_weight_lengths() {
    // rec("a", 0, 0, "[1,2]") with `field` appended
    let with = |field: &str| rec("a", 0, 0, "[1,2]").replace("}\n", &format!(",{field}}}\n"));
    assert_errs(
        &dims(2, 4),
        &[
            (
                "t.jsonl",
                &rec("a", 0, 0, "[1,1]"),
                "t.jsonl:1: duplicate expert 1",
            ),
            (
                "w.jsonl",
                &with("\"weights\":[0.5]"),
                "w.jsonl:1: `weights` has 1 entries but `experts` has 2",
            ),
            (
                "p.jsonl",
                &with("\"probs\":[0.5,0.5]"),
                "p.jsonl:1: `probs` has 2 entries but num_experts is 4",
            ),
            (
                "x.jsonl",
                &with("\"weights\":[-0.5,0.1]"),
                "x.jsonl:1: `weights` value -0.5 is not a finite non-negative number",
            ),
            (
                "y.jsonl",
                &with("\"weights\":[1e300,0.1]"),
                "is not a finite non-negative number",
            ),
            (
                "z.jsonl",
                &with("\"probs\":[1.5,0.1,0.1,0.1]"),
                "z.jsonl:1: `probs` value 1.5 is not a probability",
            ),
        ],
    );
}

#[test]
fn mixed_top_k() {
    let c = rec("a", 0, 0, "[1,2]") + &rec("a", 1, 0, "[1,2,3]");
    assert_err("t.jsonl", &c, &dims(2, 4), "t.jsonl:2: mixed top-k");
    // across files
    let d = tempfile::tempdir().unwrap();
    let p1 = write(&d, "one.jsonl", rec("a", 0, 0, "[1,2]").as_bytes());
    let p2 = write(&d, "two.jsonl", rec("b", 0, 0, "[1]").as_bytes());
    let msg = agg_err(&[p1, p2], &dims(2, 4));
    assert!(
        msg.contains("two.jsonl:1: mixed top-k") && msg.contains("one.jsonl:1"),
        "{msg}"
    );
    // against the given top_k
    assert_err(
        "k.jsonl",
        &rec("a", 0, 0, "[1,2]"),
        &top_k(3),
        "k.jsonl:1: mixed top-k",
    );
}

#[test]
fn duplicate_records_and_events() {
    let c = rec("a", 0, 0, "[1,2]") + &rec("b", 0, 0, "[1,2]") + &rec("a", 0, 0, "[0,3]");
    assert_err(
        "t.jsonl",
        &c,
        &dims(2, 4),
        "t.jsonl:3: duplicate record: prompt 'a', layer 0, position 0",
    );
    // same slot but a different token type is fine
    let d = tempfile::tempdir().unwrap();
    let c2 = rec("a", 0, 0, "[1,2]") + &rec("a", 0, 0, "[0,3]").replace("prompt\"", "generation\"");
    let p = write(&d, "ok.jsonl", c2.as_bytes());
    assert!(aggregate_paths(&[p], &dims(2, 4)).is_ok());
    let c = event("a", 0, 3, 1) + &event("a", 0, 3, 2) + &event("a", 0, 3, 1);
    assert_err(
        "e.jsonl",
        &c,
        &dims(2, 4),
        "e.jsonl:3: duplicate event: prompt 'a', layer 0, position 3, token_type prompt, expert 1",
    );
}

#[test]
fn flat_events_mixed_top_k() {
    let c = event("a", 0, 0, 1) + &event("a", 0, 0, 2) + &event("a", 0, 1, 1);
    assert_err("e.jsonl", &c, &dims(2, 4), "mixed top-k: prompt 'a', layer 0, position 1 (prompt) has 1 routing events but 2 are expected");
    assert_err("f.jsonl", &c, &top_k(1), "f.jsonl:2: mixed top-k");
}

#[test]
fn category_conflicts() {
    let with_cat =
        |l: i64, c: &str| rec("a", l, 0, "[1,2]").replace("{", &format!("{{\"category\":\"{c}\","));
    let c = with_cat(0, "code") + &with_cat(1, "math");
    assert_err(
        "t.jsonl",
        &c,
        &dims(2, 4),
        "t.jsonl:2: category conflict for prompt 'a': \"math\" here but \"code\"",
    );
    let mut map = HashMap::new();
    map.insert("a".to_string(), "poetry".to_string());
    let o = AggregateOptions {
        categories: Some(map),
        ..dims(2, 4)
    };
    assert_err(
        "p.jsonl",
        &with_cat(0, "code"),
        &o,
        "category conflict for prompt 'a'",
    );
}

#[test]
fn mixed_line_forms() {
    let both = "{\"prompt_id\":\"a\",\"layer\":1,\"position\":0,\"expert\":1,\"experts\":[1],\"token_type\":\"prompt\"}\n";
    assert_errs(
        &dims(2, 4),
        &[
            (
                "t.jsonl",
                &(rec("a", 0, 0, "[1,2]") + &event("a", 1, 0, 1)),
                "t.jsonl:2: mixed line forms in one file",
            ),
            ("b.jsonl", both, "b.jsonl:1: line mixes line forms"),
            (
                "n.jsonl",
                "{\"prompt_id\":\"a\"}\n",
                "n.jsonl:1: line is neither",
            ),
            (
                "m.jsonl",
                &rec("a", 0, 0, "[1,2]").replace("\"prompt_id\":\"a\",", ""),
                "m.jsonl:1: missing field `prompt_id`",
            ),
        ],
    );
}

#[test]
fn weighted_needs_weights() {
    assert_err(
        "t.jsonl",
        &rec("a", 0, 0, "[1,2]"),
        &weighted(dims(2, 4)),
        "t.jsonl:1: weighted counts need router weights",
    );
}

#[test]
fn counts_line_errors() {
    let cl = |pid: &str, tt: &str, counts: &str, tokens: u32| {
        format!("{{\"prompt_id\":\"{pid}\",\"token_type\":\"{tt}\",\"num_layers\":2,\"num_experts\":2,\"tokens\":{tokens},\"counts\":{counts}}}\n")
    };
    let o = AggregateOptions::default();
    assert_errs(
        &o,
        &[
            (
                "c.jsonl",
                &cl("a", "prompt", "[1,1,1]", 1),
                "c.jsonl:1: `counts` has 3 entries but num_layers * num_experts = 4",
            ),
            (
                "d.jsonl",
                &(cl("a", "prompt", "[1,1,1,1]", 1) + &cl("a", "prompt", "[1,1,1,1]", 1)),
                "d.jsonl:2: duplicate counts line: prompt 'a', token_type prompt",
            ),
            (
                "k.jsonl",
                &(cl("a", "prompt", "[1,1,1,1]", 1) + &cl("b", "prompt", "[2,0,1,0]", 1)),
                "k.jsonl:2: mixed top-k",
            ),
            (
                "n.jsonl",
                &cl("a", "prompt", "[1,-1,1,1]", 1),
                "n.jsonl:1: negative count -1",
            ),
        ],
    );
    assert_err(
        "x.jsonl",
        &cl("a", "prompt", "[1,1,1,1]", 1),
        &dims(3, 2),
        "x.jsonl:1: num_layers 2 differs from the expected 3",
    );
    assert_err(
        "w.jsonl",
        &cl("a", "prompt", "[1,1,1,1]", 1),
        &weighted(AggregateOptions::default()),
        "w.jsonl:1: weighted counts requested",
    );
    // streaming: a prompt that reappears after another one
    let d = tempfile::tempdir().unwrap();
    let c = cl("a", "prompt", "[1,1,1,1]", 1)
        + &cl("b", "prompt", "[1,1,1,1]", 1)
        + &cl("a", "generation", "[1,1,1,1]", 1);
    let p = write(&d, "s.jsonl", c.as_bytes());
    let msg = for_each_prompt_counts(&[p], &o, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("s.jsonl:3: prompt 'a' appears again"), "{msg}");
}

#[test]
fn compression_mismatch_and_corruption() {
    let o = dims(2, 4);
    let plain = rec("a", 0, 0, "[1,2]");
    assert_errs(
        &o,
        &[
            ("t.jsonl.gz", &plain, "file name says gzip"),
            ("t.jsonl.zst", &plain, "file name says zstd"),
        ],
    );
    let d = tempfile::tempdir().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let body: String = (0..200).map(|i| rec("a", 0, i, "[1,2]")).collect();
    std::io::Write::write_all(&mut enc, body.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let p = write(&d, "cut.jsonl.gz", &gz[..gz.len() / 2]);
    let msg = agg_err(&[p], &o);
    assert!(
        msg.contains("cut.jsonl.gz:") && msg.contains("corrupt or truncated"),
        "{msg}"
    );
    let z = zstd::encode_all(body.as_bytes(), 3).unwrap();
    let p = write(&d, "cut.jsonl.zst", &z[..z.len() - 3]);
    let msg = agg_err(&[p], &o);
    assert!(msg.contains("cut.jsonl.zst:"), "{msg}");
}

#[test]
fn counts_filters_weights_and_zero_prompts() {
    let d = tempfile::tempdir().unwrap();
    let mk = |pid: &str, l: u32, pos: u32, tt: &str, ex: &str, w: &str| {
        format!("{{\"prompt_id\":\"{pid}\",\"category\":\"c\",\"layer\":{l},\"position\":{pos},\"token_type\":\"{tt}\",\"experts\":{ex},\"weights\":{w}}}\n")
    };
    let c = mk("a", 0, 0, "prompt", "[2,0]", "[0.5,0.25]")
        + &mk("a", 1, 0, "prompt", "[1,2]", "[0.5,0.125]")
        + &mk("a", 0, 1, "generation", "[2,1]", "[0.75,0.125]")
        + &mk("a", 1, 1, "generation", "[0,1]", "[0.5,0.25]")
        + &mk("b", 0, 0, "generation", "[0,1]", "[0.5,0.25]")
        + &mk("b", 1, 0, "generation", "[0,1]", "[0.5,0.25]");
    let p = write(&d, "t.jsonl", c.as_bytes());
    let all = aggregate_paths(std::slice::from_ref(&p), &AggregateOptions::default()).unwrap();
    assert!(all.dims_inferred);
    assert_eq!(
        (all.num_layers, all.num_experts, all.top_k),
        (2, 3, Some(2))
    );
    assert_eq!(all.prompts[0].prompt_id, "a");
    assert_eq!(all.prompts[0].counts, vec![1., 1., 2., 1., 2., 1.]);
    assert_eq!(all.prompts[0].tokens_per_layer, vec![2, 2]);
    let prompt_only = AggregateOptions {
        token_types: vec![TokenType::Prompt],
        ..AggregateOptions::default()
    };
    let t = aggregate_paths(std::slice::from_ref(&p), &prompt_only).unwrap();
    assert_eq!(t.prompts[0].counts, vec![1., 0., 1., 0., 1., 1.]);
    // prompt b has no prompt tokens: kept with zero counts
    assert_eq!(t.prompts[1].prompt_id, "b");
    assert_eq!(t.prompts[1].counts, vec![0.; 6]);
    assert_eq!(t.prompts[1].tokens_per_layer, vec![0, 0]);
    assert_eq!(t.prompts[1].category.as_deref(), Some("c"));
    let w = AggregateOptions {
        weighted: true,
        token_types: vec![TokenType::Generation],
        ..AggregateOptions::default()
    };
    let t = aggregate_paths(&[p], &w).unwrap();
    assert_eq!(t.prompts[0].counts, vec![0., 0.125, 0.75, 0.5, 0.25, 0.]);
}

#[test]
fn three_forms_give_the_same_counts() {
    let d = tempfile::tempdir().unwrap();
    let records = rec("a", 0, 0, "[1,2]")
        + &rec("a", 1, 0, "[0,1]")
        + &rec("a", 0, 1, "[3,2]")
        + &rec("a", 1, 1, "[1,0]")
        + &rec("b", 0, 0, "[0,3]")
        + &rec("b", 1, 0, "[2,3]");
    let mut events = String::new();
    for line in records.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for e in v["experts"].as_array().unwrap() {
            events.push_str(&format!("{{\"prompt_id\":{},\"layer\":{},\"position\":{},\"expert\":{e},\"token_type\":\"prompt\"}}\n", v["prompt_id"], v["layer"], v["position"]));
        }
    }
    let counts = "{\"prompt_id\":\"a\",\"token_type\":\"prompt\",\"num_layers\":2,\"num_experts\":4,\"tokens\":2,\"counts\":[0,1,2,1,2,2,0,0]}\n{\"prompt_id\":\"b\",\"token_type\":\"prompt\",\"num_layers\":2,\"num_experts\":4,\"tokens\":1,\"counts\":[1,0,0,1,0,0,1,1]}\n";
    let o = dims(2, 4);
    let tr = aggregate_paths(&[write(&d, "r.jsonl", records.as_bytes())], &o).unwrap();
    let te = aggregate_paths(&[write(&d, "e.jsonl", events.as_bytes())], &o).unwrap();
    let pc = write(&d, "c.jsonl", counts.as_bytes());
    let tc = aggregate_paths(std::slice::from_ref(&pc), &AggregateOptions::default()).unwrap();
    assert_eq!(tr.prompts, te.prompts);
    assert_eq!(tr.prompts, tc.prompts);
    assert_eq!(
        (tc.num_layers, tc.num_experts, tc.top_k, tc.dims_inferred),
        (2, 4, Some(2), false)
    );
    let mut streamed = Vec::new();
    let dims = for_each_prompt_counts(&[pc], &AggregateOptions::default(), |p| {
        streamed.push(p);
        Ok(())
    })
    .unwrap();
    assert_eq!(dims, (2, 4));
    assert_eq!(streamed, tr.prompts);
}

#[test]
fn absurd_indices_are_refused_without_allocating() {
    // One case a line: (file name, content, expected text).
    #[rustfmt::skip]
    let cases: [(&str, &str, &str); 4] = [
        ("l.jsonl", &rec("a", 4_000_000_000, 0, "[1,2]"), "l.jsonl:1: layer 4000000000 exceeds the supported maximum"),
        ("p.jsonl", &rec("a", 0, 4_000_000_000, "[1,2]"), "p.jsonl:1: position 4000000000 exceeds"),
        ("e.jsonl", &rec("a", 0, 0, "[1,4000000000]"), "e.jsonl:1: expert 4000000000 exceeds"),
        ("o.jsonl", &rec("a", 0, 0, "[1,5000000000]"), "o.jsonl:1: expert 5000000000 is out of range"),
    ];
    assert_errs(&AggregateOptions::default(), &cases);
}
