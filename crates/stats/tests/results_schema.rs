//! The results.json schema: the committed JSON Schema is the one generated from the types, the
//! analysis outputs of every fixture read back into the types and serialise to the same bytes,
//! and files of another schema_version are refused.
//!
//! Regenerate `docs/results.schema.json` after changing a type in `results.rs`:
//! `UPDATE_SCHEMA=1 cargo test -p moe-xray-stats --test results_schema`.

use moe_xray_stats::analyze::{analyze_exact, AnalyzeOptions, Collector, PathChoice};
use moe_xray_stats::input::{from_counts_table, PromptRow};
use moe_xray_stats::results::{
    AnalysisPath, AnalysisResults, ResultsReadError, Section, SCHEMA_VERSION,
};
use moe_xray_test_support::repo_root;
use moe_xray_trace::counts::{aggregate_paths, AggregateOptions};
use moe_xray_trace::TokenType;
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    moe_xray_test_support::fixture("stats").join(case)
}

/// What `moe-xray analyze` writes: pretty JSON and a final newline.
fn to_file_text(r: &AnalysisResults) -> String {
    serde_json::to_string_pretty(r).unwrap() + "\n"
}

/// Parses `text` into the types and serialises it again: must give the same bytes.
fn assert_round_trip(what: &str, text: &str) -> AnalysisResults {
    let parsed = AnalysisResults::from_json_str(text)
        .unwrap_or_else(|e| panic!("{what}: results.json does not parse into the types: {e}"));
    let again = to_file_text(&parsed);
    if again != text {
        let line = text
            .lines()
            .zip(again.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "{what}: round trip differs at line {}: {:?} vs {:?}",
            line + 1,
            text.lines().nth(line),
            again.lines().nth(line)
        );
    }
    parsed
}

#[test]
fn schema_snapshot() {
    let generated = AnalysisResults::json_schema();
    let path = repo_root().join("docs/results.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/results.schema.json differs from the schema generated from crates/stats/src/results.rs; \
         if the change is intended, regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p moe-xray-stats --test results_schema` (and see the \
         schema_version policy in docs/statistics.md)"
    );
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(v["title"], "moe-xray results.json");
    let required: Vec<&str> = v["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for key in [
        "schema_version",
        "similarity",
        "pca",
        "tsne",
        "logreg_5fold",
    ] {
        assert!(required.contains(&key), "{key} not required");
    }
}

fn exact(case: &str, types: Vec<TokenType>, weighted: bool, opts: AnalyzeOptions) -> String {
    let d = fixture(case);
    let agg = AggregateOptions {
        token_types: types,
        weighted,
        ..AggregateOptions::default()
    };
    let table = aggregate_paths(&[d.join("trace.jsonl")], &agg).unwrap();
    let input = from_counts_table(table, None, weighted).unwrap();
    let opts = AnalyzeOptions {
        folds_file: Some(d.join("folds.csv")),
        weighted,
        traces: vec![d.join("trace.jsonl").display().to_string()],
        manifest: serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap())
            .unwrap(),
        ..opts
    };
    to_file_text(&analyze_exact(&input, &opts).unwrap().results)
}

fn small() -> AnalyzeOptions {
    AnalyzeOptions {
        reps: 20,
        perm_reps: 20,
        boot_reps: 20,
        classifier_perm_reps: 4,
        ..AnalyzeOptions::default()
    }
}

#[test]
fn every_section_of_the_planted_fixture_round_trips() {
    let text = exact(
        "planted",
        vec![TokenType::Prompt, TokenType::Generation],
        false,
        small(),
    );
    let r = assert_round_trip("planted", &text);
    assert_eq!(r.schema_version, SCHEMA_VERSION);
    assert_eq!(r.path, AnalysisPath::ExactPairs);
    let lr = r.logreg_5fold.done().expect("classifier ran");
    assert_eq!(lr.oof_predictions.len(), r.num_prompts);
    assert_eq!(lr.confusion.len(), lr.labels.len());
    let t = r.tsne.done().expect("t-SNE ran");
    assert_eq!(t.coords.len(), r.num_prompts);
    assert!(r.significance.classifier_permutation.done().is_some());
    assert!(r
        .significance
        .bootstrap
        .done()
        .unwrap()
        .accuracy_ci95
        .is_some());
    // The typed sections keep the key order of the files written before they were typed
    // (serde_json maps: name order).
    for (section, keys) in [
        (
            "logreg_5fold",
            &[
                "accuracy_mean",
                "accuracy_std",
                "chance",
                "confusion",
                "fold_accuracies",
                "labels",
                "macro_f1_oof",
                "n_folds",
                "oof_predictions",
            ][..],
        ),
        (
            "tsne",
            &["coords", "kl_divergence", "n_iter", "perplexity"][..],
        ),
        (
            "classifier_permutation",
            &["null_mean", "observed_accuracy", "p", "reps", "seed"][..],
        ),
    ] {
        let start = text.find(&format!("\"{section}\": {{")).unwrap();
        let pos: Vec<usize> = keys
            .iter()
            .map(|k| start + text[start..].find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{section}: {keys:?}");
    }
}

#[test]
fn skipped_and_nan_sections_round_trip() {
    // weighted_small: a category with one prompt (null on the matrix diagonal) and, with 0
    // repetitions, skipped baselines and significance; t-SNE and the classifier disabled.
    for (types, weighted) in [
        (vec![TokenType::Prompt, TokenType::Generation], false),
        (vec![TokenType::Prompt, TokenType::Generation], true),
        (vec![TokenType::Prompt], false),
        (vec![TokenType::Prompt], true),
    ] {
        let text = exact(
            "weighted_small",
            types,
            weighted,
            AnalyzeOptions {
                reps: 0,
                perm_reps: 0,
                boot_reps: 0,
                skip_tsne: true,
                skip_classifier: true,
                ..AnalyzeOptions::default()
            },
        );
        let r = assert_round_trip("weighted_small", &text);
        assert!(matches!(r.baselines.permutation, Section::Skipped { .. }));
        assert_eq!(
            r.tsne.why_missing().as_deref(),
            Some("skipped: disabled (--no-tsne)")
        );
    }
    for case in ["null", "paper_shape"] {
        let text = exact(
            case,
            vec![TokenType::Prompt, TokenType::Generation],
            false,
            AnalyzeOptions {
                skip_tsne: true,
                ..small()
            },
        );
        assert_round_trip(case, &text);
    }
}

#[test]
fn gram_sums_path_round_trips() {
    let d = fixture("null");
    let agg = AggregateOptions::default();
    let table = aggregate_paths(&[d.join("trace.jsonl")], &agg).unwrap();
    let (nl, ne) = (table.num_layers, table.num_experts);
    let mut c = Collector::new(nl, ne, PathChoice::GramSums);
    for p in table.prompts {
        c.push(PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        })
        .unwrap();
    }
    let out = c.finish(table.top_k, &small()).unwrap();
    let text = to_file_text(out.results());
    let r = assert_round_trip("null --gram", &text);
    assert_eq!(r.path, AnalysisPath::GramSums);
    assert!(r.pca.done().is_none() && r.logreg_5fold.done().is_none());
    assert!(text.contains("\"path\": \"gram_sums\""));
}

#[test]
fn other_schema_versions_are_refused() {
    let text = exact(
        "weighted_small",
        vec![TokenType::Prompt, TokenType::Generation],
        false,
        AnalyzeOptions {
            reps: 0,
            perm_reps: 0,
            boot_reps: 0,
            skip_tsne: true,
            skip_classifier: true,
            ..AnalyzeOptions::default()
        },
    );
    let first = "{\n  \"schema_version\": 1,";
    assert!(text.starts_with(first));
    for (replacement, found) in [
        ("{\n  \"schema_version\": 2,", "2"),
        ("{\n  \"schema_version\": \"1\",", "\"1\""),
        ("{\n  \"schema_version\": 1.5,", "1.5"),
        ("{\n  \"schema_version\": null,", "null"),
        ("{\n", "missing"),
        (
            "{\n  \"schema_version\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",",
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa…",
        ),
    ] {
        let other = text.replacen(first, replacement, 1);
        match AnalysisResults::from_json_str(&other) {
            Err(e @ ResultsReadError::UnsupportedVersion { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("schema_version {found} is not supported")),
                    "{msg}"
                );
                assert!(msg.contains("reads schema_version 1"), "{msg}");
            }
            other => panic!("{replacement:?}: {other:?}"),
        }
    }
    // The right version but not the schema: serde's message names the field, with the line.
    let broken = text.replacen("\n  \"num_layers\"", "\n  \"n_layers\"", 1);
    let e = AnalysisResults::from_json_str(&broken).unwrap_err();
    assert!(matches!(e, ResultsReadError::Json(_)));
    assert!(e.to_string().contains("missing field `num_layers`"), "{e}");
    let bad_section = text.replacen(
        "\"skipped\": \"0 repetitions",
        "\"skipped\": 0, \"x\": \"",
        1,
    );
    assert!(AnalysisResults::from_json_str(&bad_section).is_err());
}
