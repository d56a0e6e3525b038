//! Expert masking (ablation) equals transformers with the same mask applied by a forward hook on
//! every router (`tools/hf_ref_ablation.py` -> `fixtures/ablation/hf_masked.json`): teacher-forced
//! logits within 1e-5 and identical routing (experts in rank order) on an OLMoE
//! (softmax-then-top-k) and a Granite-MoE (top-k-then-softmax) f32 fixture, alone and batched;
//! and on DeepSeek-V3 (sigmoid + correction bias + groups) and GPT-OSS (biased top-k-then-softmax)
//! fixtures (`hf_masked_<model>.json`).

use std::collections::HashMap;

use moe_xray_model::generate::{teacher_force_batch, ForcedInput};
use moe_xray_model::model::{LoadOptions, MoeModel};
use moe_xray_model::router::RouterMask;
use moe_xray_test_support::fixture;
use moe_xray_trace::{RoutingDecision, RoutingSink};
use serde_json::Value;

#[derive(Default)]
struct Routes(HashMap<String, Vec<(u32, u32, Vec<u32>)>>);

impl RoutingSink for Routes {
    fn begin_prompt(&mut self, _: &str, _: Option<&str>) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        self.0.entry(d.prompt_id.to_string()).or_default().push((
            d.position,
            d.layer,
            d.experts.to_vec(),
        ));
        Ok(())
    }
    fn end_prompt(&mut self, _: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// One model of a `hf_masked*.json` file: masked teacher-forced logits within 1e-5 of
/// transformers' and identical routing (experts in rank order, MoE layers as listed in
/// `moe_layers`, all layers when absent), alone and batched; returns the max |Δlogit|.
fn check_model(m: &Value) -> f32 {
    let name = m["model"].as_str().unwrap();
    let model = MoeModel::load(&fixture("hf").join(name), &LoadOptions::default()).unwrap();
    let ne = m["num_experts"].as_u64().unwrap() as usize;
    let mut mask = RouterMask::new();
    for (l, experts) in m["mask"].as_object().unwrap() {
        mask.mask_experts(l.parse().unwrap(), ne, &ids(experts))
            .unwrap();
    }
    assert!(mask.masked_count() > 0);
    let moe_layers: Vec<usize> = match m.get("moe_layers") {
        Some(v) => ids(v).into_iter().map(|x| x as usize).collect(),
        None => (0..m["prompts"][0]["experts"][0].as_array().unwrap().len()).collect(),
    };
    let mut max_all = 0f32;
    let prompts = m["prompts"].as_array().unwrap();
    let inputs: Vec<ForcedInput> = prompts
        .iter()
        .map(|p| ForcedInput {
            id: p["prompt_id"].as_str().unwrap().to_string(),
            category: None,
            prompt: ids(&p["prompt_ids"]),
            continuation: ids(&p["continuation"]),
        })
        .collect();
    // Alone (batch 1, prefill in chunks of 5) and all together (one ragged batch).
    for (batches, chunk) in [
        (inputs.chunks(1).collect::<Vec<_>>(), 5usize),
        (vec![&inputs[..]], 512),
    ] {
        let mut routes = Routes::default();
        let mut scored = Vec::new();
        for b in batches {
            scored.extend(
                teacher_force_batch(&model, b, Some(&mask), chunk, true, &mut routes).unwrap(),
            );
        }
        let mut max_diff = 0f32;
        for (p, s) in prompts.iter().zip(&scored) {
            let want = p["logits"].as_array().unwrap();
            let got = s.logits.as_ref().unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, w) in got.iter().zip(want) {
                let w = w.as_array().unwrap();
                assert_eq!(g.len(), w.len());
                for (a, b) in g.iter().zip(w) {
                    max_diff = max_diff.max((a - b.as_f64().unwrap() as f32).abs());
                }
            }
            // routing: per fed token (position order), per MoE layer
            let want_routes = p["experts"].as_array().unwrap();
            let got_routes = &routes.0[s.prompt_id.as_str()];
            let per_tok = want_routes[0].as_array().unwrap().len();
            assert_eq!(got_routes.len(), want_routes.len() * per_tok, "{name}");
            for (t, layers) in want_routes.iter().enumerate() {
                for (i, ex) in layers.as_array().unwrap().iter().enumerate() {
                    let l = moe_layers[i];
                    let (pos, layer, got) = &got_routes[t * per_tok + i];
                    assert_eq!((*pos as usize, *layer as usize), (t, l));
                    assert_eq!(got, &ids(ex), "{name} {} token {t} layer {l}", s.prompt_id);
                    if let Some(mk) = mask.layer(l) {
                        assert!(got.iter().all(|&e| !mk[e as usize]));
                    }
                }
            }
            assert!(s.nll.iter().all(|x| x.is_finite() && *x >= 0.0));
        }
        assert!(max_diff <= 1e-5, "{name}: max |Δlogit| {max_diff}");
        eprintln!("{name}: max |Δlogit| {max_diff:e}");
        max_all = max_all.max(max_diff);
    }
    // Unmasked teacher forcing gives back the greedy continuation as the argmax.
    let base =
        teacher_force_batch(&model, &inputs, None, 512, false, &mut Routes::default()).unwrap();
    for (b, i) in base.iter().zip(&inputs) {
        assert_eq!(b.argmax, i.continuation, "{name}");
    }
    max_all
}

#[test]
fn masked_routing_and_logits_equal_transformers_with_a_router_hook() {
    let text = std::fs::read_to_string(fixture("ablation").join("hf_masked.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let models = doc["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        check_model(m);
    }
}

/// DeepSeek-V3 (sigmoid scores, correction bias, group-limited choice: masked experts count
/// -inf in the group scores, a group left with one unmasked expert is never chosen) and GPT-OSS
/// (router bias, top-k then softmax) against transformers with the same rule in a router hook
/// (`tools/hf_ref_ablation.py`, one file each).
#[test]
fn deepseek_v3_and_gpt_oss_masking_equal_transformers() {
    for name in ["deepseekv3-tiny-f32", "gptoss-tiny-f32"] {
        let path = fixture("ablation").join(format!("hf_masked_{name}.json"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let models = doc["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0]["model"], name);
        let d = check_model(&models[0]);
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

#[test]
fn masks_that_leave_too_few_experts_or_hit_dense_layers_are_refused() {
    let model = MoeModel::load(
        &fixture("hf").join("olmoe-tiny-mha-f32"),
        &LoadOptions::default(),
    )
    .unwrap();
    let input = vec![ForcedInput {
        id: "p".into(),
        category: None,
        prompt: vec![5, 6, 7],
        continuation: vec![8],
    }];
    let mut m = RouterMask::new();
    m.mask_experts(0, 8, &[0, 1, 2, 3, 4, 5, 6]).unwrap();
    let e = teacher_force_batch(&model, &input, Some(&m), 512, false, &mut Routes::default())
        .unwrap_err();
    assert!(e.to_string().contains("fewer than top_k"), "{e}");
    let mut m = RouterMask::new();
    m.mask_experts(5, 8, &[0]).unwrap();
    let e = teacher_force_batch(&model, &input, Some(&m), 512, false, &mut Routes::default())
        .unwrap_err();
    assert!(e.to_string().contains("not a MoE layer"), "{e}");
    let mut m = RouterMask::new();
    m.mask_experts(0, 9, &[0]).unwrap();
    assert!(
        teacher_force_batch(&model, &input, Some(&m), 512, false, &mut Routes::default()).is_err()
    );
}

/// Numbers of a JSON array; `null` (a masked expert's −∞ logit in `rank`) is −∞.
fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            if x.is_null() {
                f64::NEG_INFINITY
            } else {
                x.as_f64().unwrap()
            }
        })
        .collect()
}

/// bf16 masking against transformers' bf16 masked forward (`tools/hf_ref_ablation.py`,
/// `hf_masked_<model>-bf16.json`). Teacher-forced, batch 1 with prefill chunks of 5, and all
/// prompts in one ragged batch (which must give the same routing and logits bit for bit).
/// Routing: expert sets equal, except mismatches whose first one in a sequence is a near tie in
/// transformers' masked ranking values (gap < `max_gap`); the later ones of that sequence follow
/// from it. Logits: the score rows that see only tokens before the sequence's first routing
/// mismatch are within `logit_tol`. Returns (identical sets, records, max |Δlogit| compared).
fn check_model_bf16(m: &Value, max_gap: f64, logit_tol: f32) -> (usize, usize, f32) {
    let name = m["model"].as_str().unwrap();
    assert_eq!(m["dtype"], "bfloat16");
    let model = MoeModel::load(&fixture("hf").join(name), &LoadOptions::default()).unwrap();
    assert_eq!(model.dtype(), candle_core::DType::BF16, "{name}");
    let ne = m["num_experts"].as_u64().unwrap() as usize;
    let mut mask = RouterMask::new();
    for (l, experts) in m["mask"].as_object().unwrap() {
        mask.mask_experts(l.parse().unwrap(), ne, &ids(experts))
            .unwrap();
    }
    let moe_layers: Vec<u32> = ids(&m["moe_layers"]);
    let prompts = m["prompts"].as_array().unwrap();
    let inputs: Vec<ForcedInput> = prompts
        .iter()
        .map(|p| ForcedInput {
            id: p["prompt_id"].as_str().unwrap().to_string(),
            category: None,
            prompt: ids(&p["prompt_ids"]),
            continuation: ids(&p["continuation"]),
        })
        .collect();
    let mut alone = Routes::default();
    let mut scored = Vec::new();
    for one in inputs.chunks(1) {
        scored.extend(teacher_force_batch(&model, one, Some(&mask), 5, true, &mut alone).unwrap());
    }
    let mut batched = Routes::default();
    let together =
        teacher_force_batch(&model, &inputs, Some(&mask), 512, true, &mut batched).unwrap();
    for (a, b) in scored.iter().zip(&together) {
        assert_eq!(
            a.logits, b.logits,
            "{name} {}: batch changes logits",
            a.prompt_id
        );
        assert_eq!(
            alone.0[a.prompt_id.as_str()],
            batched.0[b.prompt_id.as_str()],
            "{name} {}: batch changes routing",
            a.prompt_id
        );
    }
    let (mut same, mut total, mut max_diff) = (0usize, 0usize, 0f32);
    for (p, s) in prompts.iter().zip(&scored) {
        let pid = s.prompt_id.as_str();
        let want = p["experts"].as_array().unwrap();
        let rank = p["rank"].as_array().unwrap();
        let got = &alone.0[pid];
        assert_eq!(got.len(), want.len() * moe_layers.len(), "{name} {pid}");
        let mut first_mismatch: Option<usize> = None;
        for (t, layers) in want.iter().enumerate() {
            for (i, ex) in layers.as_array().unwrap().iter().enumerate() {
                let l = moe_layers[i];
                let (pos, layer, ours) = &got[t * moe_layers.len() + i];
                assert_eq!((*pos as usize, *layer), (t, l), "{name} {pid}");
                let mk = mask.layer(l as usize).unwrap();
                assert!(
                    ours.iter().all(|&e| !mk[e as usize]),
                    "{name}: masked expert chosen"
                );
                total += 1;
                let mut a = ours.clone();
                let mut b = ids(ex);
                a.sort();
                b.sort();
                if a == b {
                    same += 1;
                    continue;
                }
                let v = floats(&rank[t][i]);
                let lo = b
                    .iter()
                    .filter(|x| !a.contains(x))
                    .map(|&x| v[x as usize])
                    .fold(f64::INFINITY, f64::min);
                let hi = a
                    .iter()
                    .filter(|x| !b.contains(x))
                    .map(|&x| v[x as usize])
                    .fold(f64::NEG_INFINITY, f64::max);
                let gap = (lo - hi).abs();
                let upstream = first_mismatch.is_some();
                eprintln!(
                    "  {name} {pid} token {t} layer {l}: ours {a:?} HF {b:?}; HF gap {gap:.3e}{}",
                    if upstream {
                        " (after an earlier mismatch of this sequence)"
                    } else {
                        ""
                    }
                );
                assert!(
                    upstream || gap < max_gap,
                    "{name} {pid} token {t} layer {l}: masked set mismatch not explained by a near tie (gap {gap})"
                );
                first_mismatch.get_or_insert(t);
            }
        }
        // Score row r predicts continuation[r] from fed tokens 0..=prompt_len-1+r.
        let prompt_len = ids(&p["prompt_ids"]).len();
        let clean_rows = first_mismatch.map_or(usize::MAX, |t| (t + 1).saturating_sub(prompt_len));
        let want_logits = p["logits"].as_array().unwrap();
        let got_logits = s.logits.as_ref().unwrap();
        assert_eq!(got_logits.len(), want_logits.len(), "{name} {pid}");
        for (g, w) in got_logits.iter().zip(want_logits).take(clean_rows) {
            let w = floats(w);
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(&w) {
                max_diff = max_diff.max((a - *b as f32).abs());
            }
        }
        assert!(s.nll.iter().all(|x| x.is_finite() && *x >= 0.0));
    }
    assert!(
        max_diff <= logit_tol,
        "{name}: max |Δlogit| {max_diff} on rows before the first routing mismatch"
    );
    eprintln!(
        "{name}: masked bf16: {same}/{total} identical expert sets ({:.2} %), max |Δlogit| {max_diff:e} before the first mismatch",
        100.0 * same as f64 / total as f64
    );
    (same, total, max_diff)
}

/// Tolerances (stated in docs/statistics.md, "Checks"):
/// - routing: the first mismatch of a sequence must be a near tie of transformers' masked ranking
///   values: OLMoE probability gap < 1e-3 (as `hf_conformance.rs`'s bf16 test), GPT-OSS logit
///   gap < 0.024 (as `family_conformance.rs`: two bf16 steps; measured 180 / 180 identical, 179
///   before session 10 with its one mismatch at a gap of 0.0117), and at least 97 % identical sets;
/// - logits (bf16 values; spacing 2^-5 = 0.031 at |logit| in [4, 8), the fixtures' range):
///   OLMoE 0.0625 (two spacings), GPT-OSS 0.15. The fixture's `calibration_f32_compute` gives the
///   scale: transformers itself, computing the same checkpoint in f32 with the bf16 run's expert
///   choices imposed, moves the logits by up to 0.031 (OLMoE) and 0.136 (GPT-OSS, whose weights
///   were drawn large so that sinks, clamps and windows matter); each tolerance must cover it.
#[test]
fn bf16_masking_equals_transformers_up_to_near_ties() {
    for (name, max_gap, logit_tol) in [
        ("olmoe-tiny-bf16", 1e-3, 0.0625f32),
        ("gptoss-tiny-bf16", 0.024, 0.15),
    ] {
        let path = fixture("ablation").join(format!("hf_masked_{name}.json"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let models = doc["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0]["model"], name);
        let cal = &models[0]["calibration_f32_compute"];
        let noise = cal["max_abs_logit_diff_same_routing"].as_f64().unwrap();
        assert!(
            noise > 0.0 && noise <= logit_tol as f64,
            "{name}: calibration {noise}"
        );
        let (same, total, _) = check_model_bf16(&models[0], max_gap, logit_tol);
        assert!(same * 100 >= total * 97, "{name}: {same}/{total}");
    }
}
