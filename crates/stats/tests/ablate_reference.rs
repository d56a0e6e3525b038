//! The deterministic parts of the ablation statistics against numpy (`tools/reference_ablation.py`
//! -> `fixtures/ablation/reference.json`): contrast, characteristic experts (per-layer and global
//! budgets), load bins and per-prompt effects.

use moe_xray_stats::ablation::{
    characteristic_experts, load_bins, prompt_effect, signature_contrast, Budget, PromptScores,
};
use moe_xray_stats::signature::signatures;
use moe_xray_test_support::fixture;
use serde_json::Value;

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
fn nested(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(u32s).collect()
}
fn scores(v: &Value) -> PromptScores {
    PromptScores {
        nll: f64s(&v["nll"]),
        argmax: u32s(&v["argmax"]),
        routes: u32s(&v["routes"]),
    }
}

#[test]
fn ablation_statistics_match_numpy() {
    let text = std::fs::read_to_string(fixture("ablation").join("reference.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    let (l, e, k, nc) = (
        d["num_layers"].as_u64().unwrap() as usize,
        d["num_experts"].as_u64().unwrap() as usize,
        d["top_k"].as_u64().unwrap() as usize,
        d["num_categories"].as_u64().unwrap() as usize,
    );
    let labels: Vec<usize> = u32s(&d["labels"]).into_iter().map(|x| x as usize).collect();
    let counts: Vec<f64> = d["counts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(f64s)
        .collect();
    let sigs = signatures(&counts, l, e);
    let con = signature_contrast(&sigs, &labels, nc, l * e).unwrap();
    let want: Vec<f64> = d["expected"]["contrast"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(f64s)
        .collect();
    assert_eq!(con.len(), want.len());
    for (a, b) in con.iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    let w = l * e;
    for (n, sets) in d["expected"]["per_layer"].as_object().unwrap() {
        let n: usize = n.parse().unwrap();
        for (c, want) in sets.as_array().unwrap().iter().enumerate() {
            let got =
                characteristic_experts(&con[c * w..(c + 1) * w], l, e, Budget::PerLayer(n), e - k)
                    .unwrap();
            assert_eq!(got, nested(want), "per-layer n={n} category {c}");
        }
    }
    for (n, sets) in d["expected"]["global"].as_object().unwrap() {
        let n: usize = n.parse().unwrap();
        for (c, want) in sets.as_array().unwrap().iter().enumerate() {
            let got =
                characteristic_experts(&con[c * w..(c + 1) * w], l, e, Budget::Global(n), e - k)
                    .unwrap();
            assert_eq!(got, nested(want), "global n={n} category {c}");
        }
    }
    let mut load = vec![0.0; w];
    for row in sigs.chunks(w) {
        load.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    load.iter_mut().for_each(|x| *x /= labels.len() as f64);
    for (a, b) in load.iter().zip(f64s(&d["expected"]["load"])) {
        assert!((a - b).abs() < 1e-12);
    }
    for (bins, want) in d["expected"]["load_bins"].as_object().unwrap() {
        let bins: usize = bins.parse().unwrap();
        for (layer, want) in want.as_array().unwrap().iter().enumerate() {
            let got: Vec<u32> = load_bins(&load[layer * e..(layer + 1) * e], bins)
                .into_iter()
                .map(|x| x as u32)
                .collect();
            assert_eq!(got, u32s(want), "bins {bins} layer {layer}");
        }
    }
    for p in d["prompts"].as_array().unwrap() {
        let got = prompt_effect(&scores(&p["base"]), &scores(&p["ablated"]), k).unwrap();
        let x = &p["expected"];
        assert!((got.delta_nll - x["delta_nll"].as_f64().unwrap()).abs() < 1e-12);
        assert!((got.agreement - x["agreement"].as_f64().unwrap()).abs() < 1e-15);
        assert!((got.routing_changed - x["routing_changed"].as_f64().unwrap()).abs() < 1e-15);
        assert!((got.jaccard - x["jaccard"].as_f64().unwrap()).abs() < 1e-12);
    }
}
