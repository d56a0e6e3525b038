//! Issue 14 for the health crate: the output directories of `moe-xray trace` and `moe-xray run`
//! are accepted as runs, and sizes from manifests, inferred indices and options are limited
//! before anything is allocated from them.

use std::io::Write;
use std::path::Path;

use moe_xray_health::compare::{compare_runs, CompareOptions, MAX_PERMUTATIONS};
use moe_xray_health::health::MAX_COACTIVATION_CELLS;
use moe_xray_health::input::read_run_data;
use moe_xray_health::mi::{mutual_information, MiOptions};
use moe_xray_health::{accumulate_run, resolve_run, HealthAccumulator, HealthOptions};

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn records() -> String {
    let mut s = String::new();
    for (pid, cat) in [("a", "x"), ("b", "y")] {
        for layer in 0..2 {
            s.push_str(&format!(
                "{{\"prompt_id\":\"{pid}\",\"category\":\"{cat}\",\"layer\":{layer},\"position\":0,\"token_type\":\"prompt\",\"experts\":[{layer},2]}}\n"
            ));
        }
    }
    s
}

const MANIFEST: &str = r#"{"model":"m","num_layers":2,"num_experts":4,"top_k":2}"#;
const GENERATIONS: &str = "{\"prompt_id\":\"a\",\"text\":\"hello\",\"tokens\":[1,2]}\n{\"prompt_id\":\"b\",\"text\":\"bye\",\"tokens\":[3]}\n";

/// What `moe-xray trace --out DIR` leaves: the trace, generations.jsonl and manifest.json.
fn trace_dir(dir: &Path) {
    write(&dir.join("trace.jsonl.gz"), &gz(records().as_bytes()));
    write(&dir.join("generations.jsonl"), GENERATIONS.as_bytes());
    write(&dir.join("manifest.json"), MANIFEST.as_bytes());
}

#[test]
fn trace_output_directory_is_a_run() {
    let d = tempfile::tempdir().unwrap();
    trace_dir(d.path());
    let run = resolve_run(d.path()).unwrap();
    assert_eq!(run.paths, vec![d.path().join("trace.jsonl.gz")]);
    assert_eq!(run.manifest.as_ref().map(|m| m.num_experts), Some(4));
    let acc = accumulate_run(&run, None, HealthOptions::default()).unwrap();
    assert_eq!(acc.report().inputs.token_records, 4);
    let data = read_run_data(d.path(), &HealthOptions::default()).unwrap();
    assert_eq!(data.prompts.len(), 2);
}

#[test]
fn run_output_directory_is_a_run() {
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("prompts.jsonl"),
        b"{\"id\":\"a\",\"category\":\"x\",\"text\":\"t\"}\n",
    );
    write(&d.path().join("results.json"), b"{}\n");
    trace_dir(&d.path().join("traces"));
    let run = resolve_run(d.path()).unwrap();
    assert_eq!(
        run.paths,
        vec![d.path().join("traces").join("trace.jsonl.gz")]
    );
    assert_eq!(run.manifest.as_ref().map(|m| m.num_layers), Some(2));
    let a = read_run_data(d.path(), &HealthOptions::default()).unwrap();
    let b = read_run_data(&d.path().join("traces"), &HealthOptions::default()).unwrap();
    let r = compare_runs(&a, &b, &CompareOptions::default()).unwrap();
    assert_eq!(r.max_js_bits, 0.0);
    assert_eq!(r.shared_prompts, 2);
}

#[test]
fn directory_without_traces_names_both_layouts() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("generations.jsonl"), GENERATIONS.as_bytes());
    write(&d.path().join("traces").join("prompts.jsonl"), b"{}\n");
    let msg = resolve_run(d.path()).unwrap_err().to_string();
    assert!(
        msg.contains("no trace files") && msg.contains("traces/ sub-directory"),
        "{msg}"
    );
}

#[test]
fn huge_manifest_dimensions_are_refused() {
    let d = tempfile::tempdir().unwrap();
    trace_dir(d.path());
    for m in [
        r#"{"num_layers":1099511627776,"num_experts":4,"top_k":2}"#,
        r#"{"num_layers":9223372036854775808,"num_experts":9223372036854775808,"top_k":2}"#,
    ] {
        write(&d.path().join("manifest.json"), m.as_bytes());
        let msg = read_run_data(d.path(), &HealthOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("manifest.json") && msg.contains("exceeds the supported maximum"),
            "{msg}"
        );
    }
}

#[test]
fn inferred_dimensions_are_limited_with_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.jsonl");
    write(
        &p,
        (records()
            + "{\"prompt_id\":\"c\",\"layer\":4294967295,\"position\":0,\"token_type\":\"prompt\",\"experts\":[0,1]}\n")
            .as_bytes(),
    );
    let msg = read_run_data(&p, &HealthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t.jsonl:5:") && msg.contains("num_layers = 4294967296 exceeds"),
        "{msg}"
    );
}

#[test]
fn too_many_events_for_one_token_stop_at_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("e.jsonl");
    let mut s = String::new();
    for e in [0, 1, 2, 3, 0] {
        s.push_str(&format!(
            "{{\"prompt_id\":\"a\",\"layer\":0,\"position\":0,\"expert\":{e},\"token_type\":\"prompt\"}}\n"
        ));
    }
    write(&p, s.as_bytes());
    write(
        &d.path().join("manifest.json"),
        br#"{"num_layers":1,"num_experts":4,"top_k":2}"#,
    );
    let msg = read_run_data(&p, &HealthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("e.jsonl:5:") && msg.contains("more than num_experts = 4"),
        "{msg}"
    );
}

#[test]
fn accumulator_dimensions_are_checked_and_coactivation_is_bounded() {
    for (l, e) in [
        (1usize << 40, 4usize),
        (usize::MAX, usize::MAX),
        (4096, 4096),
    ] {
        let msg = HealthAccumulator::new(l, e, HealthOptions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("exceeds the supported maximum"), "{msg}");
    }
    // 64 × 4096² counters would be 8 GiB: co-activation is skipped with a note.
    let (l, e) = (64, 4096);
    assert!(l * e * e > MAX_COACTIVATION_CELLS);
    let mut acc = HealthAccumulator::new(l, e, HealthOptions::default()).unwrap();
    acc.add_token(&moe_xray_health::TokenRouting {
        prompt_id: "a",
        category: None,
        layer: 63,
        token_type: moe_xray_trace::TokenType::Prompt,
        experts: &[4095, 0],
        probs: None,
    })
    .unwrap();
    assert!(acc.coactivation(63).is_none());
    let r = acc.report();
    assert!(!r.available.coactivation);
    assert_eq!(r.layers[63].load[4095], 1.0);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("co-activation not computed")),
        "{:?}",
        r.notes
    );
}

#[test]
fn hostile_repetition_and_bin_counts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    trace_dir(d.path());
    let a = read_run_data(d.path(), &HealthOptions::default()).unwrap();
    let opts = CompareOptions {
        reps: usize::MAX,
        ..CompareOptions::default()
    };
    let msg = compare_runs(&a, &a, &opts).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("exceeds the maximum {MAX_PERMUTATIONS}")),
        "{msg}"
    );

    let sigs: Vec<Vec<f64>> = (0..8)
        .map(|i| vec![i as f64, (i * i) as f64, 1.0])
        .collect();
    let labels: Vec<String> = (0..8).map(|i| ["x", "y"][i % 2].to_string()).collect();
    let msg = mutual_information(
        &sigs,
        &labels,
        &MiOptions {
            bins: usize::MAX,
            components: 3,
            perms: 10,
            ..MiOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("overflow"), "{msg}");
    let msg = mutual_information(
        &sigs,
        &labels,
        &MiOptions {
            perms: usize::MAX,
            ..MiOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("--perms"), "{msg}");
    // A huge component count is capped by the data, not allocated.
    let r = mutual_information(
        &sigs,
        &labels,
        &MiOptions {
            components: usize::MAX,
            perms: 10,
            ..MiOptions::default()
        },
    )
    .unwrap();
    assert!(r.mi_plugin_bits.is_finite());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Lines of the three forms with hostile numbers, and arbitrary text.
    fn line() -> impl Strategy<Value = String> {
        let num = prop_oneof![
            0i64..6,
            Just(-1i64),
            Just(4095),
            Just(4096),
            Just(1 << 20),
            Just(1 << 32),
            Just(1 << 40),
            Just(i64::MAX),
            Just(i64::MIN),
        ];
        prop_oneof![
            (num.clone(), num.clone(), prop::collection::vec(num.clone(), 0..5)).prop_map(|(l, p, e)| format!(
                "{{\"prompt_id\":\"a\",\"category\":\"x\",\"layer\":{l},\"position\":{p},\"token_type\":\"prompt\",\"experts\":{e:?}}}"
            )),
            (num.clone(), num.clone(), num.clone()).prop_map(|(l, p, e)| format!(
                "{{\"prompt_id\":\"b\",\"layer\":{l},\"position\":{p},\"expert\":{e},\"token_type\":\"generation\"}}"
            )),
            (num.clone(), num.clone(), num, prop::collection::vec(0i64..4, 0..9)).prop_map(|(l, e, t, c)| format!(
                "{{\"prompt_id\":\"c\",\"token_type\":\"prompt\",\"num_layers\":{l},\"num_experts\":{e},\"tokens\":{t},\"counts\":{c:?}}}"
            )),
            "[ -~]{0,30}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(64), failure_persistence: None, ..ProptestConfig::default() })]

        /// health / compare input never panics: `Ok` with dimensions within the limits, or an
        /// error naming the trace or the manifest.
        #[test]
        fn run_reading_never_panics(
            lines in prop::collection::vec(line(), 1..6),
            manifest in prop::option::of((0usize..6, 0usize..6, 0usize..6)),
            keep in any::<bool>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            write(&d.path().join("t.jsonl"), (lines.join("\n") + "\n").as_bytes());
            if let Some((l, e, k)) = manifest {
                write(
                    &d.path().join("manifest.json"),
                    format!("{{\"num_layers\":{l},\"num_experts\":{e},\"top_k\":{k}}}").as_bytes(),
                );
            }
            let opts = HealthOptions { keep_prompts: keep, ..HealthOptions::default() };
            match read_run_data(d.path(), &opts) {
                Ok(r) => {
                    prop_assert!(moe_xray_trace::limits::check_dims(r.num_layers, r.num_experts, None).is_ok());
                    for p in &r.prompts {
                        prop_assert_eq!(p.counts.len(), r.num_layers * r.num_experts);
                    }
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(m.contains("t.jsonl") || m.contains("manifest.json") || m.contains("layers"), "{}", m);
                }
            }
        }
    }
}
