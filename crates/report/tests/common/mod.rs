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
