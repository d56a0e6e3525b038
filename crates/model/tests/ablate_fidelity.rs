//! Expert masking (ablation) equals transformers with the same mask applied by a forward hook on
//! every router (`tools/hf_ref_ablation.py` -> `fixtures/ablation/hf_masked.json`): teacher-forced
//! logits within 1e-5 and identical routing (experts in rank order) on an OLMoE
//! (softmax-then-top-k) and a Granite-MoE (top-k-then-softmax) f32 fixture, alone and batched.

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

#[test]
fn masked_routing_and_logits_equal_transformers_with_a_router_hook() {
    let text = std::fs::read_to_string(fixture("ablation").join("hf_masked.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let models = doc["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let name = m["model"].as_str().unwrap();
        let model = MoeModel::load(&fixture("hf").join(name), &LoadOptions::default()).unwrap();
        let ne = m["num_experts"].as_u64().unwrap() as usize;
        let mut mask = RouterMask::new();
        for (l, experts) in m["mask"].as_object().unwrap() {
            mask.mask_experts(l.parse().unwrap(), ne, &ids(experts))
                .unwrap();
        }
        assert!(mask.masked_count() > 0);
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
                    for (l, ex) in layers.as_array().unwrap().iter().enumerate() {
                        let (pos, layer, got) = &got_routes[t * per_tok + l];
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
        }
        // Unmasked teacher forcing gives back the greedy continuation as the argmax.
        let base =
            teacher_force_batch(&model, &inputs, None, 512, false, &mut Routes::default()).unwrap();
        for (b, i) in base.iter().zip(&inputs) {
            assert_eq!(b.argmax, i.continuation, "{name}");
        }
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
