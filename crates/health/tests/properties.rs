//! Property tests of the health metrics and the comparison.

use moe_xray_health::compare::{compare_runs, CompareOptions, RunData};
use moe_xray_health::metrics::{
    gini, jain, js_divergence_bits, max_mean_ratio, normalized_entropy,
};
use moe_xray_health::{HealthAccumulator, HealthOptions, PromptLoad, TokenRouting};
use moe_xray_trace::TokenType;
use proptest::prelude::*;

fn load_vec() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(0u32..50, 2..24)
        .prop_filter("non-zero total", |v| v.iter().any(|&x| x > 0))
        .prop_map(|v| v.into_iter().map(f64::from).collect())
}

proptest! {
    #[test]
    fn js_of_a_run_with_itself_is_zero(p in load_vec()) {
        prop_assert!(js_divergence_bits(&p, &p).unwrap().abs() < 1e-12);
    }

    #[test]
    fn js_is_symmetric_and_in_unit_interval((p, q) in (2usize..20).prop_flat_map(|n| (
        prop::collection::vec(0u32..30, n), prop::collection::vec(0u32..30, n)))
        .prop_filter("non-zero", |(p, q)| p.iter().any(|&x| x > 0) && q.iter().any(|&x| x > 0))) {
        let p: Vec<f64> = p.into_iter().map(f64::from).collect();
        let q: Vec<f64> = q.into_iter().map(f64::from).collect();
        let a = js_divergence_bits(&p, &q).unwrap();
        let b = js_divergence_bits(&q, &p).unwrap();
        prop_assert!((a - b).abs() < 1e-12);
        prop_assert!((0.0..=1.0).contains(&a));
    }

    #[test]
    fn permuting_expert_labels_leaves_metrics_unchanged(
        (p, perm) in load_vec().prop_flat_map(|p| { let n = p.len(); (Just(p), Just((0..n).collect::<Vec<_>>()).prop_shuffle()) })
    ) {
        let q: Vec<f64> = perm.iter().map(|&i| p[i]).collect();
        prop_assert!((gini(&p) - gini(&q)).abs() < 1e-12);
        prop_assert!((normalized_entropy(&p) - normalized_entropy(&q)).abs() < 1e-12);
        prop_assert!((jain(&p) - jain(&q)).abs() < 1e-12);
        prop_assert!((max_mean_ratio(&p) - max_mean_ratio(&q)).abs() < 1e-12);
        let e = p.len() as f64;
        prop_assert!(gini(&p) >= 0.0 && gini(&p) <= (e - 1.0) / e + 1e-12);
        prop_assert!(jain(&p) >= 1.0 / e - 1e-12 && jain(&p) <= 1.0 + 1e-12);
    }

    #[test]
    fn coactivation_is_symmetric_with_load_on_diagonal(
        tokens in prop::collection::vec((0usize..3, Just((0u32..6).collect::<Vec<_>>()).prop_shuffle(), 1usize..4), 1..60)
    ) {
        let mut acc = HealthAccumulator::new(3, 6, HealthOptions::default()).unwrap();
        for (layer, experts, k) in &tokens {
            acc.add_token(&TokenRouting {
                prompt_id: "p", category: None, layer: *layer, token_type: TokenType::Prompt,
                experts: &experts[..*k], probs: None,
            }).unwrap();
        }
        for l in 0..3 {
            let c = acc.coactivation(l).unwrap();
            for i in 0..6 {
                prop_assert_eq!(c[i * 6 + i] as f64, acc.load()[l * 6 + i]);
                for j in 0..6 {
                    prop_assert_eq!(c[i * 6 + j], c[j * 6 + i]);
                }
            }
        }
    }

    #[test]
    fn compare_of_a_run_with_itself_is_zero_everywhere(
        counts in prop::collection::vec(prop::collection::vec(1u32..20, 8), 2..6)
    ) {
        let prompts: Vec<PromptLoad> = counts.iter().enumerate().map(|(i, c)| PromptLoad {
            prompt_id: format!("p{i}"), category: Some(format!("c{}", i % 2)),
            counts: c.iter().map(|&x| f64::from(x)).collect(),
        }).collect();
        let run = |label: &str| RunData { label: label.into(), num_layers: 2, layers: vec![0, 1], num_experts: 4, prompts: prompts.clone() };
        let r = compare_runs(&run("A"), &run("B"), &CompareOptions { reps: 20, seed: 0, fail_above: Some(0.0) }).unwrap();
        prop_assert!(r.max_js_bits.abs() < 1e-12);
        prop_assert_eq!(r.exceeded, Some(false));
        prop_assert!(r.prompt_shifts.iter().all(|s| s.shift.abs() < 1e-12));
    }
}
