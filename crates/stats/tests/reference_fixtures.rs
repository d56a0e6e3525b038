#![allow(clippy::needless_range_loop)] // index-parallel comparisons of matrices
//! Compare the Rust statistics with `fixtures/stats/*/expected*.json`, produced by
//! `tools/reference_stats.py` (numpy / scikit-learn pinned in `tools/requirements-stats.txt`).
//! Deterministic quantities to 1e-9; Monte Carlo baselines within 5 combined standard errors.

use moe_xray_stats::analyze::{analyze_exact, AnalyzeOptions};
use moe_xray_stats::input::from_counts_table;
use moe_xray_stats::results::Section;
use moe_xray_test_support::fixture;
use moe_xray_trace::counts::{aggregate_paths, AggregateOptions};
use moe_xray_trace::TokenType;
use serde_json::Value;
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    fixture("stats").join(case)
}

fn close(what: &str, a: f64, b: f64, tol: f64) {
    assert!(
        (a - b).abs() <= tol || (a.is_nan() && b.is_nan()),
        "{what}: rust {a} vs reference {b} (tol {tol})"
    );
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// [`close`] for each `(label, rust value, reference value)`, labels prefixed by `tag`.
fn close_all(tag: &str, cases: &[(&str, f64, &Value)], tol: f64) {
    for &(what, ours, want) in cases {
        close(&format!("{tag} {what}"), ours, f(want), tol);
    }
}

/// [`close`] for every cell of an `rows x cols` matrix: `ours(i, j)` against `want[i][j]`.
fn close_matrix(
    what: &str,
    (rows, cols): (usize, usize),
    ours: impl Fn(usize, usize) -> f64,
    want: &[Value],
    tol: f64,
) {
    for i in 0..rows {
        for j in 0..cols {
            close(&format!("{what}[{i},{j}]"), ours(i, j), f(&want[i][j]), tol);
        }
    }
}

/// A JSON array of strings (`key` = None) or of objects' `key` string fields.
fn strs<'a>(v: &'a Value, key: Option<&str>) -> Vec<&'a str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match key {
            Some(k) => x[k].as_str().unwrap(),
            None => x.as_str().unwrap(),
        })
        .collect()
}

struct Case {
    name: &'static str,
    expected: &'static str,
    token_types: Vec<TokenType>,
    weighted: bool,
    classifier: bool,
}

fn run_case(c: &Case) {
    let d = dir(c.name);
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(c.expected)).unwrap()).unwrap();
    let agg = AggregateOptions {
        token_types: c.token_types.clone(),
        weighted: c.weighted,
        ..AggregateOptions::default()
    };
    let table = aggregate_paths(&[d.join("trace.jsonl")], &agg).unwrap();
    let input = from_counts_table(table, None, c.weighted).unwrap();
    let reps = 400;
    let opts = AnalyzeOptions {
        reps,
        perm_reps: 200,
        boot_reps: 200,
        classifier_perm_reps: if c.classifier { 20 } else { 0 },
        folds_file: Some(d.join("folds.csv")),
        skip_tsne: true,
        skip_classifier: !c.classifier,
        weighted: c.weighted,
        ..AnalyzeOptions::default()
    };
    let out = analyze_exact(&input, &opts).unwrap();
    let r = &out.results;
    let tag = format!("{}/{}", c.name, c.expected);

    assert_eq!(
        r.num_prompts as u64,
        exp["num_prompts"].as_u64().unwrap(),
        "{tag}"
    );
    let ids = strs(&exp["prompt_ids"], None);
    assert_eq!(r.prompt_ids, ids, "{tag}: prompt order");
    let dropped = strs(&exp["dropped_prompts"], Some("prompt_id"));
    let ours: Vec<&str> = r
        .dropped_prompts
        .iter()
        .map(|x| x.prompt_id.as_str())
        .collect();
    assert_eq!(ours, dropped, "{tag}: dropped");
    assert_eq!(
        r.similarity.within.n,
        exp["similarity"]["within"]["n"].as_u64().unwrap()
    );
    assert_eq!(
        r.similarity.across.n,
        exp["similarity"]["across"]["n"].as_u64().unwrap()
    );
    let s = &exp["similarity"];
    let sim = &r.similarity;
    close_all(
        &tag,
        &[
            ("within.mean", sim.within.mean, &s["within"]["mean"]),
            ("within.std", sim.within.std, &s["within"]["std"]),
            ("across.mean", sim.across.mean, &s["across"]["mean"]),
            ("across.std", sim.across.std, &s["across"]["std"]),
            ("d", sim.cohens_d, &s["cohens_d"]),
        ],
        1e-9,
    );

    // Similarity matrix and signatures (when the fixture carries them).
    let n = r.num_prompts;
    if let Some(ps) = exp.get("prompt_similarity").and_then(|x| x.as_array()) {
        let sim = |i, j| out.similarity[i * n + j];
        close_matrix(&format!("{tag} sim"), (n, n), sim, ps, 1e-9);
    }
    if let Some(sg) = exp.get("signatures").and_then(|x| x.as_array()) {
        let dd = r.num_layers * r.num_experts;
        let sig = |i, k| out.signatures[i * dd + k];
        close_matrix(&format!("{tag} sig"), (n, dd), sig, sg, 1e-12);
    }

    let cm = &exp["category_similarity_matrix"];
    let order = strs(&cm["order"], None);
    assert_eq!(r.category_similarity_matrix.order, order);
    for (a, row) in r.category_similarity_matrix.values.iter().enumerate() {
        for (b, x) in row.iter().enumerate() {
            close(
                &format!("{tag} cat[{a},{b}]"),
                *x,
                f(&cm["values"][a][b]),
                1e-9,
            );
        }
    }
    for (l, pl) in r.per_layer.iter().enumerate() {
        let e = &exp["per_layer"][l];
        close_all(
            &format!("{tag} layer {l}"),
            &[
                ("within", pl.within_mean, &e["within_mean"]),
                ("across", pl.across_mean, &e["across_mean"]),
                ("d", pl.cohens_d, &e["cohens_d"]),
            ],
            1e-9,
        );
    }

    // PCA: ratios to 1e-9, scores (with scikit-learn's sign) to 1e-7.
    let p = r.pca.done().expect("pca computed");
    let er = exp["pca"]["explained_variance_ratio"].as_array().unwrap();
    assert_eq!(
        p.explained_variance_ratio.len(),
        er.len(),
        "{tag}: PCA components"
    );
    for (k, x) in p.explained_variance_ratio.iter().enumerate() {
        close(&format!("{tag} pca ratio {k}"), *x, f(&er[k]), 1e-9);
    }
    let ec = exp["pca"]["coords"].as_array().unwrap();
    let coord = |i: usize, k: usize| p.coords[i][k];
    close_matrix(&format!("{tag} pca coord "), (n, 2), coord, ec, 1e-7);

    // Baselines: same null model, different random streams => compare statistically.
    for name in [
        "permutation",
        "load_balance_uniform",
        "load_balance_marginal",
    ] {
        let ours = match name {
            "permutation" => &r.baselines.permutation,
            "load_balance_uniform" => &r.baselines.load_balance_uniform,
            _ => &r.baselines.load_balance_marginal,
        };
        let Section::Done(b) = ours else {
            panic!("{tag} {name} skipped")
        };
        let e = &exp["baselines"][name];
        let reps_e = f(&e["reps"]);
        let se = ((b.std * b.std) / reps as f64 + f(&e["std"]).powi(2) / reps_e).sqrt();
        close(
            &format!("{tag} {name} mean"),
            b.mean,
            f(&e["mean"]),
            5.0 * se + 1e-12,
        );
        // The spread of m_r and the pair std agree to within 15 % (Monte Carlo estimates).
        close(
            &format!("{tag} {name} std"),
            b.std,
            f(&e["std"]),
            0.15 * f(&e["std"]) + 1e-12,
        );
        close(
            &format!("{tag} {name} pair_std"),
            b.pair_std,
            f(&e["pair_std"]),
            0.05 * f(&e["pair_std"]) + 1e-12,
        );
    }

    // Significance: planted structure gives the minimal p-value in both implementations; the
    // bootstrap CI of d overlaps the reference one.
    let lp = r.significance.label_permutation.done().unwrap();
    let ep = f(&exp["significance"]["label_permutation"]["p_within_minus_across"]);
    // Monte Carlo p-values: within 5 binomial standard errors of our R_p permutations.
    let sd = (ep * (1.0 - ep) / lp.reps as f64).sqrt();
    close(
        &format!("{tag} label-permutation p"),
        lp.p_within_minus_across,
        ep,
        5.0 * sd + 2.0 / lp.reps as f64,
    );
    if let Some(eci) = exp["significance"]["bootstrap"]["cohens_d_ci95"].as_array() {
        let ci = r.significance.bootstrap.done().unwrap().cohens_d_ci95;
        let (lo, hi) = (f(&eci[0]), f(&eci[1]));
        let w = hi - lo;
        close(&format!("{tag} d CI lo"), ci[0], lo, 0.25 * w + 1e-9);
        close(&format!("{tag} d CI hi"), ci[1], hi, 0.25 * w + 1e-9);
    }

    if c.classifier {
        let lr = r.logreg_5fold.done().expect("classifier ran");
        let e = &exp["logreg_5fold"];
        assert_eq!(
            serde_json::json!(lr.fold_accuracies),
            e["fold_accuracies"],
            "{tag}: fold accuracies"
        );
        close(
            &format!("{tag} macro f1"),
            lr.macro_f1_oof,
            f(&e["macro_f1_oof"]),
            1e-12,
        );
        assert_eq!(
            serde_json::json!(lr.confusion),
            e["confusion"],
            "{tag}: confusion"
        );
    }
}

#[test]
fn planted_matches_reference() {
    run_case(&Case {
        name: "planted",
        expected: "expected.json",
        token_types: vec![TokenType::Prompt, TokenType::Generation],
        weighted: false,
        classifier: true,
    });
}

#[test]
fn null_matches_reference() {
    run_case(&Case {
        name: "null",
        expected: "expected.json",
        token_types: vec![TokenType::Prompt, TokenType::Generation],
        weighted: false,
        classifier: false,
    });
}

#[test]
fn paper_shape_matches_reference() {
    run_case(&Case {
        name: "paper_shape",
        expected: "expected.json",
        token_types: vec![TokenType::Prompt, TokenType::Generation],
        weighted: false,
        classifier: false,
    });
}

#[test]
fn weighted_small_variants_match_reference() {
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
        run_case(&Case {
            name: "weighted_small",
            expected,
            token_types: types,
            weighted,
            classifier: false,
        });
    }
}
