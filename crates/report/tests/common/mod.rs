//! Shared fixture loading for the report tests. The fixture in `tests/data/` is hand-made
//! (generated once by `tests/data/gen_fixture.py`, committed; the tests never run Python): a
//! realistic results.json of 80 prompts in 4 categories, 16 layers × 64 experts, its
//! per-category mean expert usage, and a prompt table whose `code-03` prompt contains `<script>`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use moe_xray_report::{CategoryUsage, PromptRow, ReportInput, Results};

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

pub fn results() -> Results {
    Results::read(data_dir().join("results.json")).expect("fixture results.json parses")
}

pub fn usage() -> CategoryUsage {
    let text = std::fs::read_to_string(data_dir().join("usage.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    CategoryUsage {
        num_layers: v["num_layers"].as_u64().unwrap() as usize,
        num_experts: v["num_experts"].as_u64().unwrap() as usize,
        categories: v["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c[0].as_str().unwrap().to_string(),
                    c[1].as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect(),
                )
            })
            .collect(),
    }
}

pub fn prompts() -> Vec<PromptRow> {
    std::fs::read_to_string(data_dir().join("prompts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            PromptRow {
                id: v["id"].as_str().unwrap().into(),
                category: v["category"].as_str().unwrap().into(),
                text: v["text"].as_str().unwrap().into(),
                generated: v["generated"].as_str().map(str::to_string),
            }
        })
        .collect()
}

pub fn input() -> ReportInput {
    ReportInput {
        results: results(),
        usage: Some(usage()),
        prompts: prompts(),
        command: "moe-xray run --model ./example-olmoe --prompts paper80 --out runs/example".into(),
        ..Default::default()
    }
}

/// A small hand-made `ablation.json` (3 categories, doses 1 and 2): the own-category cells have
/// a positive excess with a CI above 0 and p = 0.005, the others none.
pub fn ablation() -> moe_xray_stats::ablation::AblationResults {
    use moe_xray_stats::ablation::{
        AblationResults, AblationSettings, Dose, EffectCell, Estimate, MaskedSet,
    };
    let cats = ["code", "math", "story"];
    let doses = [1usize, 2]
        .iter()
        .map(|&n| {
            let mut cells = Vec::new();
            for a in cats {
                for e in cats {
                    let own = a == e;
                    let x = if own {
                        0.1 * n as f64
                    } else {
                        0.002 * n as f64
                    };
                    let est = |m: f64| Estimate {
                        mean: m,
                        ci95: [m - 0.01, m + 0.01],
                    };
                    cells.push(EffectCell {
                        ablated: a.into(),
                        evaluated: e.into(),
                        n_prompts: 4,
                        delta_nll: est(x + 0.02),
                        delta_nll_random: est(0.02),
                        excess: est(x),
                        p_excess: if own { 0.005 } else { 0.4 },
                        agreement: if own { 0.8 } else { 0.97 },
                        agreement_random: 0.96,
                        routing_changed: 0.3,
                        routing_changed_random: 0.28,
                        jaccard: 0.8,
                        jaccard_random: 0.81,
                    });
                }
            }
            let masked = cats
                .iter()
                .map(|c| MaskedSet {
                    category: (*c).into(),
                    characteristic: vec![(0..n as u32).collect()],
                    random: vec![vec![(4..4 + n as u32).collect()]],
                })
                .collect();
            moe_xray_stats::ablation::dose_summary(n, masked, cells)
        })
        .collect::<Vec<Dose>>();
    AblationResults {
        schema_version: moe_xray_stats::ablation::ABLATION_SCHEMA_VERSION,
        tool_version: "0.1.0".into(),
        model: "synthetic".into(),
        settings: AblationSettings {
            budget: "per_layer".into(),
            doses: vec![1, 2],
            control_draws: 1,
            load_bins: 4,
            max_new_tokens: 4,
            boot_reps: 100,
            perm_reps: 200,
            seed: 0,
        },
        moe_layers: vec![0],
        num_experts: 8,
        top_k: 2,
        categories: cats.iter().map(|c| (*c).into()).collect(),
        prompt_ids: (0..12).map(|i| format!("p{i}")).collect(),
        continuation_tokens: vec![4; 12],
        base_nll: 2.5,
        contrast: vec![vec![0.0; 8]; 3],
        doses,
        passes: 13,
    }
}

/// A cross-model comparison of 12 prompts in 3 categories (category c prefers expert c + layer):
/// with `same`, B is A (2 layers × 4 experts) with its experts renumbered per layer and a
/// hand-made matched drift; otherwise B has 3 layers × 3 experts. Returns the report and the
/// RSA scatter's inputs (upper-triangle similarities of A and B, within-category flags).
pub fn crossmodel(
    same: bool,
) -> (
    moe_xray_stats::crossmodel::CrossModelReport,
    Vec<f64>,
    Vec<f64>,
    Vec<bool>,
) {
    use moe_xray_stats::crossmodel::{
        compare_signatures, CategoryComparison, CategoryRow, CrossModelOptions, CrossModelReport,
        Drift, MatchedDrift, ModelInfo, Pair, Side,
    };
    use moe_xray_stats::results::Section;
    let n = 12;
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    // relabel[l][x]: the number expert x gets (identity for A).
    let sig = |l: usize, e: usize, relabel: &dyn Fn(usize, usize) -> usize| -> Vec<f64> {
        let mut s = Vec::new();
        for (i, &c) in labels.iter().enumerate() {
            for layer in 0..l {
                let mut row = vec![0.0; e];
                for x in 0..e {
                    let v = 1.0
                        + (x == (c + layer) % e) as u8 as f64 * 3.0
                        + ((i * 7 + layer * 3 + x * 5) % 11) as f64 * 0.05;
                    row[relabel(layer, x)] = v;
                }
                let t: f64 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= t);
                s.extend(row);
            }
        }
        s
    };
    let sa = sig(2, 4, &|_, x| x);
    let (lb, eb, layers_b): (usize, usize, Vec<usize>) = if same {
        (2, 4, vec![0, 1])
    } else {
        (3, 3, vec![1, 2, 3])
    };
    let sb = if same {
        sig(2, 4, &|l, x| (x + l + 1) % 4)
    } else {
        sig(3, 3, &|_, x| x)
    };
    let cats: Vec<String> = ["code", "math", "story <&>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let c = compare_signatures(
        &Side {
            num_layers: 2,
            num_experts: 4,
            layers: &[0, 1],
            signatures: &sa,
        },
        &Side {
            num_layers: lb,
            num_experts: eb,
            layers: &layers_b,
            signatures: &sb,
        },
        n,
        &labels,
        &cats,
        &CrossModelOptions { reps: 99, seed: 0 },
    )
    .unwrap();
    let info = |label: &str, l: usize, e: usize, layers: Vec<usize>| ModelInfo {
        label: label.into(),
        model: Some(format!("model-{label}")),
        family: Some("olmoe".into()),
        num_layers: l,
        num_experts: e,
        top_k: 2,
        layers,
        num_prompts: n,
    };
    let mut within = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            within.push(labels[i] == labels[j]);
        }
    }
    let drift = |js: f64, shift: f64| Drift {
        js_bits: vec![js, js / 2.0],
        mean_js_bits: 0.75 * js,
        max_js_bits: js,
        mean_shift: Some(shift),
        permutation_p: Some(0.01),
    };
    let matched_drift = if same {
        Section::Done(MatchedDrift {
            unmatched: drift(0.4, 0.6),
            matched: drift(0.001, 0.0),
        })
    } else {
        Section::skipped("no traces")
    };
    let r = CrossModelReport {
        schema_version: 1,
        tool_version: "0.1.0".into(),
        model_a: info("runs/a", 2, 4, vec![0, 1]),
        model_b: info("runs/b", lb, eb, layers_b.clone()),
        shared_prompts: n,
        only_in_a: vec![],
        only_in_b: vec!["extra-1".into()],
        same_architecture: same,
        rsa: c.rsa,
        cka: c.cka,
        per_layer: c.per_layer,
        categories: CategoryComparison {
            cohens_d: Pair {
                a: Some(1.5),
                b: Some(1.2),
            },
            cohens_d_shared: c.cohens_d_shared,
            accuracy: Pair {
                a: Some(0.9),
                b: Some(0.8),
            },
            chance: Pair {
                a: Some(1.0 / 3.0),
                b: Some(1.0 / 3.0),
            },
            macro_f1: Pair {
                a: Some(0.88),
                b: None,
            },
            per_category: c
                .per_category
                .iter()
                .map(|(cat, k, da, db)| CategoryRow {
                    category: cat.clone(),
                    n: *k,
                    d_a: *da,
                    d_b: *db,
                    recall_a: Some(0.75),
                    recall_b: None,
                })
                .collect(),
        },
        expert_matching: c.expert_matching,
        matched_drift,
    };
    (r, c.sim_a_upper, c.sim_b_upper, within)
}

/// An N-run comparison of three runs built from [`crossmodel`]: pair (R1, R2) of the same
/// architecture with its matching and matched drift, pairs (R1, R3) and (R2, R3) of different
/// architectures.
#[allow(dead_code)]
pub fn crossmodel_multi() -> moe_xray_stats::crossmodel::MultiModelReport {
    use moe_xray_stats::crossmodel::{MultiModelReport, PairComparison};
    let (same, ..) = crossmodel(true);
    let (diff, ..) = crossmodel(false);
    let mut r23 = diff.clone();
    r23.model_a = same.model_b.clone();
    MultiModelReport::from_pairs(
        "0.1.0",
        3,
        vec![vec![], vec![], vec!["extra-1".into()]],
        vec![
            PairComparison {
                a: 0,
                b: 1,
                comparison: same,
            },
            PairComparison {
                a: 0,
                b: 2,
                comparison: diff,
            },
            PairComparison {
                a: 1,
                b: 2,
                comparison: r23,
            },
        ],
    )
    .unwrap()
}

/// Adds a lexical baseline (accuracy 0.25 below the routing classifier's, 5 folds) and
/// residual token-matched statistics (d halved, per layer too) to the fixture's results.
#[allow(dead_code)]
pub fn with_confounds(r: &mut moe_xray_stats::results::AnalysisResults) {
    use moe_xray_stats::results::{LexicalBaseline, Section, TokenMatchMode, TokenMatched};
    let Section::Done(lr) = r.logreg_5fold.clone() else {
        panic!("fixture has a classifier")
    };
    let mut lex = lr;
    lex.accuracy_mean -= 0.25;
    lex.fold_accuracies.iter_mut().for_each(|a| *a -= 0.25);
    r.lexical_baseline = Some(Section::Done(LexicalBaseline {
        vocabulary: 989,
        tokens: 5000,
        classifier: lex,
    }));
    let mut similarity = r.similarity;
    similarity.cohens_d /= 2.0;
    let per_layer = r
        .per_layer
        .iter()
        .map(|l| {
            let mut l = *l;
            l.cohens_d /= 2.0;
            l
        })
        .collect();
    r.token_matched = Some(Section::Done(TokenMatched {
        mode: TokenMatchMode::Residual,
        num_prompts: r.num_prompts,
        token_ids: 989,
        records: 1000,
        dropped_prompts: vec![],
        similarity,
        category_similarity_matrix: r.category_similarity_matrix.clone(),
        per_layer,
    }));
}
