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
