//! The confound controls (`lexical_baseline`, `token_matched` shared / residual) against
//! `fixtures/stats/*/expected*.json` (`lexical_baseline`, `token_matched.{shared,residual}`),
//! produced by `tools/reference_stats.py` (scikit-learn's StandardScaler + LogisticRegression on
//! the dense bag-of-token-id matrix; numpy for the token-matched similarity). The classifier's
//! out-of-fold predictions must be identical; similarity statistics agree to 1e-9.

use std::sync::Arc;

use moe_xray_stats::analyze::{analyze_exact, AnalyzeOptions};
use moe_xray_stats::input::{from_counts_table, AnalysisInput};
use moe_xray_stats::lexical::{shared_token_ids, PassShape, SharedPass, TokenInput, TokenPass};
use moe_xray_stats::results::{AnalysisResults, Section, TokenMatchMode};
use moe_xray_test_support::fixture;
use moe_xray_trace::counts::{aggregate_paths, AggregateOptions};
use moe_xray_trace::{TokenType, TraceReader};
use serde_json::Value;

fn close(what: &str, a: f64, b: &Value, tol: f64) {
    let b = b.as_f64().unwrap_or(f64::NAN);
    assert!(
        (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
        "{what}: rust {a} vs reference {b} (tol {tol})"
    );
}

/// The token input as the pipeline builds it (`moe_xray_pipeline::confound`), from one trace.
fn token_input(
    trace: &std::path::Path,
    input: &AnalysisInput,
    types: &[TokenType],
    weighted: bool,
    mode: TokenMatchMode,
) -> TokenInput {
    let layers: Vec<u32> = (0..input.num_layers as u32).collect();
    let shape = PassShape::new(
        &layers,
        input.num_experts,
        types,
        weighted,
        &input.prompt_ids,
    );
    let items = || TraceReader::open(trace).unwrap().map(|x| x.unwrap().1);
    let mut pass = TokenPass::new(shape.clone(), mode == TokenMatchMode::Residual);
    items().for_each(|it| pass.push(&it));
    let (bags, residual) = pass.finish();
    let matched = match mode {
        TokenMatchMode::Residual => residual,
        TokenMatchMode::Shared => Some(match &bags {
            Err(e) => Err(e.clone()),
            Ok(b) => {
                let cats: Vec<String> = input
                    .labels
                    .iter()
                    .map(|&c| input.categories[c].clone())
                    .collect();
                let shared = shared_token_ids(b, &input.prompt_ids, &cats);
                if shared.is_empty() {
                    Err("no token id occurs in every category".into())
                } else {
                    let mut p2 = SharedPass::new(shape, shared);
                    items().for_each(|it| p2.push(&it));
                    p2.finish()
                }
            }
        }),
    };
    TokenInput { bags, matched }
}

fn run(case: &str, expected: &str, types: Vec<TokenType>, weighted: bool) {
    let d = fixture("stats").join(case);
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(expected)).unwrap()).unwrap();
    let trace = d.join("trace.jsonl");
    let agg = AggregateOptions {
        token_types: types.clone(),
        weighted,
        ..AggregateOptions::default()
    };
    let table = aggregate_paths(std::slice::from_ref(&trace), &agg).unwrap();
    let input = from_counts_table(table, None, weighted).unwrap();
    let tag = format!("{case}/{expected}");
    for mode in [TokenMatchMode::Shared, TokenMatchMode::Residual] {
        let opts = AnalyzeOptions {
            reps: 0,
            perm_reps: 0,
            boot_reps: 0,
            classifier_perm_reps: 0,
            // The fold file lists prompts that prompt-only variants drop (their classifier is
            // skipped either way: a category has fewer prompts than folds).
            folds_file: (input.dropped.is_empty()).then(|| d.join("folds.csv")),
            skip_tsne: true,
            weighted,
            tokens: Some(Arc::new(token_input(
                &trace, &input, &types, weighted, mode,
            ))),
            ..AnalyzeOptions::default()
        };
        let r = analyze_exact(&input, &opts).unwrap().results;
        check_lexical(&tag, &r, &exp["lexical_baseline"]);
        check_matched(
            &format!("{tag} {}", mode.as_str()),
            &r,
            &exp["token_matched"][mode.as_str()],
        );
    }
}

fn check_lexical(tag: &str, r: &AnalysisResults, e: &Value) {
    let lx = r
        .lexical_baseline
        .as_ref()
        .expect("lexical_baseline written");
    let ec = &e["classifier"];
    match lx {
        Section::Skipped { skipped } => {
            let want = e
                .get("skipped")
                .or_else(|| ec.get("skipped"))
                .unwrap_or_else(|| panic!("{tag}: rust skipped ({skipped}), reference did not"));
            if skipped.contains("counts-form") {
                assert_eq!(want, "counts-form traces have no token ids", "{tag}");
            }
        }
        Section::Done(lx) => {
            assert!(ec.get("skipped").is_none(), "{tag}: reference skipped {ec}");
            assert_eq!(
                lx.vocabulary as u64,
                e["vocabulary"].as_u64().unwrap(),
                "{tag}"
            );
            assert_eq!(lx.tokens, e["tokens"].as_u64().unwrap(), "{tag}");
            let c = &lx.classifier;
            assert_eq!(
                serde_json::json!(c.oof_predictions),
                ec["oof_predictions"],
                "{tag}: out-of-fold predictions"
            );
            assert_eq!(
                serde_json::json!(c.fold_accuracies),
                ec["fold_accuracies"],
                "{tag}: fold accuracies"
            );
            assert_eq!(serde_json::json!(c.confusion), ec["confusion"], "{tag}");
            close(
                &format!("{tag} macro f1"),
                c.macro_f1_oof,
                &ec["macro_f1_oof"],
                1e-12,
            );
            close(&format!("{tag} chance"), c.chance, &ec["chance"], 1e-15);
        }
    }
}

fn check_matched(tag: &str, r: &AnalysisResults, e: &Value) {
    let tm = r.token_matched.as_ref().expect("token_matched written");
    let t = match tm {
        Section::Skipped { skipped } => {
            assert!(
                e.get("skipped").is_some(),
                "{tag}: rust skipped ({skipped}), reference {e}"
            );
            return;
        }
        Section::Done(t) => t,
    };
    assert!(e.get("skipped").is_none(), "{tag}: reference skipped {e}");
    assert_eq!(
        t.num_prompts as u64,
        e["num_prompts"].as_u64().unwrap(),
        "{tag}"
    );
    assert_eq!(
        t.token_ids as u64,
        e["token_ids"].as_u64().unwrap(),
        "{tag}"
    );
    assert_eq!(t.records, e["records"].as_u64().unwrap(), "{tag}");
    let dropped: Vec<&str> = t
        .dropped_prompts
        .iter()
        .map(|d| d.prompt_id.as_str())
        .collect();
    let want: Vec<&str> = e["dropped_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["prompt_id"].as_str().unwrap())
        .collect();
    let mut sorted = want.clone();
    sorted.sort_unstable();
    let mut ours = dropped.clone();
    ours.sort_unstable();
    assert_eq!(ours, sorted, "{tag}: dropped");
    let s = &e["similarity"];
    close(
        &format!("{tag} within"),
        t.similarity.within.mean,
        &s["within"]["mean"],
        1e-9,
    );
    close(
        &format!("{tag} within sd"),
        t.similarity.within.std,
        &s["within"]["std"],
        1e-9,
    );
    close(
        &format!("{tag} across"),
        t.similarity.across.mean,
        &s["across"]["mean"],
        1e-9,
    );
    close(
        &format!("{tag} across sd"),
        t.similarity.across.std,
        &s["across"]["std"],
        1e-9,
    );
    close(
        &format!("{tag} d"),
        t.similarity.cohens_d,
        &s["cohens_d"],
        1e-9,
    );
    let m = &e["category_similarity_matrix"]["values"];
    for (i, row) in t.category_similarity_matrix.values.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            close(&format!("{tag} matrix[{i},{j}]"), v, &m[i][j], 1e-9);
        }
    }
    for (l, pl) in t.per_layer.iter().enumerate() {
        let el = &e["per_layer"][l];
        close(
            &format!("{tag} layer {l} within"),
            pl.within_mean,
            &el["within_mean"],
            1e-9,
        );
        close(
            &format!("{tag} layer {l} across"),
            pl.across_mean,
            &el["across_mean"],
            1e-9,
        );
        close(
            &format!("{tag} layer {l} d"),
            pl.cohens_d,
            &el["cohens_d"],
            1e-9,
        );
    }
}

#[test]
fn planted_confound_controls_match_reference() {
    run(
        "planted",
        "expected.json",
        vec![TokenType::Prompt, TokenType::Generation],
        false,
    );
}

#[test]
fn null_confound_controls_match_reference() {
    run(
        "null",
        "expected.json",
        vec![TokenType::Prompt, TokenType::Generation],
        false,
    );
}

#[test]
fn counts_form_skips_confound_controls() {
    run(
        "paper_shape",
        "expected.json",
        vec![TokenType::Prompt, TokenType::Generation],
        false,
    );
}

#[test]
fn weighted_small_confound_controls_match_reference() {
    for (expected, types, weighted) in [
        (
            "expected.json",
            vec![TokenType::Prompt, TokenType::Generation],
            false,
        ),
        (
            "expected_weighted.json",
            vec![TokenType::Prompt, TokenType::Generation],
            true,
        ),
        ("expected_prompt_only.json", vec![TokenType::Prompt], false),
        (
            "expected_weighted_prompt_only.json",
            vec![TokenType::Prompt],
            true,
        ),
    ] {
        run("weighted_small", expected, types, weighted);
    }
}
