//! Routing over time (`windows`, `moe_xray_stats::windows`) against
//! `fixtures/windows/<case>_w<W>.json`, produced by `tools/reference_windows.py` (numpy and
//! scikit-learn's StandardScaler + LogisticRegression) from the traces of `fixtures/stats/<case>`.
//! Pair statistics and drift agree to 1e-9; classifier accuracies are identical; the same
//! windows are skipped. On the planted control the per-window d is positive in every window and
//! larger than on the null traces.

use moe_xray_stats::cv::read_folds_csv;
use moe_xray_stats::input::{from_counts_table, AnalysisInput};
use moe_xray_stats::results::{DriftStats, RoutingWindows, Section, WindowStats};
use moe_xray_stats::windows::{window_folds, WindowScan, WindowShape};
use moe_xray_test_support::fixture;
use moe_xray_trace::counts::{aggregate_paths, AggregateOptions};
use moe_xray_trace::TraceReader;
use serde_json::Value;

fn close(what: &str, a: f64, b: &Value, tol: f64) {
    let b = b.as_f64().unwrap_or(f64::NAN);
    assert!(
        (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
        "{what}: rust {a} vs reference {b}"
    );
}

fn windows(case: &str, w: usize) -> (AnalysisInput, RoutingWindows) {
    let d = fixture("stats").join(case);
    let trace = d.join("trace.jsonl");
    let table =
        aggregate_paths(std::slice::from_ref(&trace), &AggregateOptions::default()).unwrap();
    let input = from_counts_table(table, None, false).unwrap();
    let layers: Vec<u32> = (0..input.num_layers as u32).collect();
    let shape = WindowShape::new(&layers, input.num_experts, false, w, &input.prompt_ids);
    let items = || TraceReader::open(&trace).unwrap().map(|x| x.unwrap().1);
    let mut scan = WindowScan::new(shape);
    items().for_each(|it| scan.push(&it));
    let mut pass = scan.finish().unwrap();
    items().for_each(|it| pass.push(&it));
    let folds = read_folds_csv(&d.join("folds.csv"), &input.prompt_ids).unwrap();
    let f = |rows: &[usize], local: &[usize]| window_folds(Some(&folds), 0, rows, local);
    let r = match pass.finish(&input.labels, &input.categories, &f) {
        Section::Done(r) => r,
        Section::Skipped { skipped } => panic!("{case}: skipped: {skipped}"),
    };
    (input, r)
}

fn check_stats(tag: &str, s: &WindowStats, e: &Value) {
    assert_eq!(
        s.num_prompts as u64,
        e["num_prompts"].as_u64().unwrap(),
        "{tag}"
    );
    assert_eq!(s.tokens, e["tokens"].as_u64().unwrap(), "{tag}");
    match (&s.similarity, e["similarity"].get("skipped")) {
        (Section::Done(x), None) => {
            let es = &e["similarity"];
            assert_eq!(x.within.n, es["within"]["n"].as_u64().unwrap(), "{tag}");
            assert_eq!(x.across.n, es["across"]["n"].as_u64().unwrap(), "{tag}");
            close(
                &format!("{tag} within"),
                x.within.mean,
                &es["within"]["mean"],
                1e-9,
            );
            close(
                &format!("{tag} across"),
                x.across.mean,
                &es["across"]["mean"],
                1e-9,
            );
            close(
                &format!("{tag} within std"),
                x.within.std,
                &es["within"]["std"],
                1e-9,
            );
            close(&format!("{tag} d"), x.cohens_d, &es["cohens_d"], 1e-9);
        }
        (Section::Skipped { .. }, Some(_)) => {}
        (a, b) => panic!("{tag}: similarity rust {a:?} vs reference skipped {b:?}"),
    }
    match (&s.classifier, e["classifier"].get("skipped")) {
        (Section::Done(c), None) => {
            let ec = &e["classifier"];
            assert_eq!(
                serde_json::json!(c.fold_accuracies),
                ec["fold_accuracies"],
                "{tag}: fold accuracies"
            );
            close(
                &format!("{tag} acc"),
                c.accuracy_mean,
                &ec["accuracy_mean"],
                1e-12,
            );
            close(
                &format!("{tag} acc sd"),
                c.accuracy_std,
                &ec["accuracy_std"],
                1e-12,
            );
            close(&format!("{tag} chance"), c.chance, &ec["chance"], 1e-15);
        }
        (Section::Skipped { .. }, Some(_)) => {}
        (a, b) => panic!("{tag}: classifier rust {a:?} vs reference skipped {b:?}"),
    }
}

fn check_drift(tag: &str, d: &DriftStats, e: &Value) {
    assert_eq!(
        d.num_prompts as u64,
        e["num_prompts"].as_u64().unwrap(),
        "{tag}"
    );
    close(&format!("{tag} mean"), d.mean, &e["mean"], 1e-9);
    close(&format!("{tag} std"), d.std, &e["std"], 1e-9);
}

fn run(case: &str, w: usize) -> RoutingWindows {
    let path = fixture("windows").join(format!("{case}_w{w}.json"));
    let e: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (_, r) = windows(case, w);
    let tag = format!("{case} W={w}");
    assert_eq!(r.window_tokens, w);
    assert_eq!(r.max_generated as u64, e["max_generated"].as_u64().unwrap());
    check_stats(
        &format!("{tag} prompt phase"),
        &r.prompt_phase,
        &e["prompt_phase"],
    );
    check_stats(
        &format!("{tag} generation phase"),
        &r.generation_phase,
        &e["generation_phase"],
    );
    check_drift(
        &format!("{tag} phase drift"),
        &r.phase_drift,
        &e["phase_drift"],
    );
    let ew = e["windows"].as_array().unwrap();
    assert_eq!(r.windows.len(), ew.len(), "{tag}: windows");
    for (i, (s, x)) in r.windows.iter().zip(ew).enumerate() {
        assert_eq!(s.start.unwrap() as u64, x["start"].as_u64().unwrap());
        assert_eq!(s.end.unwrap() as u64, x["end"].as_u64().unwrap());
        check_stats(&format!("{tag} window {i}"), s, x);
    }
    let ed = e["drift"].as_array().unwrap();
    assert_eq!(r.drift.len(), ed.len(), "{tag}: drift");
    for (i, (d, x)) in r.drift.iter().zip(ed).enumerate() {
        check_drift(&format!("{tag} drift {i}"), d, x);
    }
    r
}

#[test]
fn planted_and_null_match_the_reference() {
    for w in [4, 3] {
        let p = run("planted", w);
        let n = run("null", w);
        // The planted control carries category information in every window of at least 20
        // prompts; the null traces carry much less.
        for (a, b) in p.windows.iter().zip(&n.windows) {
            if a.num_prompts < 20 {
                continue; // the last, partial windows of the shortest generations
            }
            if let (Section::Done(a), Section::Done(b)) = (&a.similarity, &b.similarity) {
                assert!(a.cohens_d > 0.3, "planted W={w}: d {}", a.cohens_d);
                assert!(
                    a.cohens_d > b.cohens_d + 0.2,
                    "planted {} vs null {}",
                    a.cohens_d,
                    b.cohens_d
                );
            }
        }
        let (pg, ng) = (
            p.generation_phase.similarity.done().unwrap().cohens_d,
            n.generation_phase.similarity.done().unwrap().cohens_d,
        );
        assert!(
            pg > ng + 0.3,
            "generation phase d: planted {pg} vs null {ng}"
        );
    }
}
