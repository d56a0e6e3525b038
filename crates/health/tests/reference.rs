//! Health and compare statistics against tools/reference_health.py (numpy/scipy) on the
//! committed fixtures in fixtures/health/.

use std::path::{Path, PathBuf};

use moe_xray_health::compare::{compare_runs, CompareOptions};
use moe_xray_health::input::read_run_data;
use moe_xray_health::{accumulate_run, resolve_run, HealthAccumulator, HealthOptions};
use moe_xray_trace::TokenType;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/health")
}

fn expected() -> Value {
    let s = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn close(got: f64, want: &Value, tol: f64, what: &str) {
    let want = want
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number"));
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

fn acc(run: &str, opts: HealthOptions) -> HealthAccumulator {
    let r = resolve_run(&fixtures().join(run)).unwrap();
    accumulate_run(&r, None, opts).unwrap()
}

fn check_layers(acc: &HealthAccumulator, want: &Value, router: bool) {
    let rep = acc.report();
    let want = want.as_array().unwrap();
    assert_eq!(rep.layers.len(), want.len());
    for (l, (g, w)) in rep.layers.iter().zip(want).enumerate() {
        let loads: Vec<f64> = w["load"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(g.load, loads, "layer {l} load");
        assert_eq!(g.tokens, w["tokens"].as_u64().unwrap());
        close(g.entropy_nats, &w["entropy_nats"], 1e-12, "entropy");
        close(
            g.normalized_entropy,
            &w["normalized_entropy"],
            1e-12,
            "normalized entropy",
        );
        close(g.gini, &w["gini"], 1e-12, "gini");
        close(g.jain, &w["jain"], 1e-12, "jain");
        close(g.max_mean_ratio, &w["max_mean_ratio"], 1e-12, "max/mean");
        let dead: Vec<usize> = w["dead_experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(g.dead_experts, dead);
        if router {
            let r = g.router.as_ref().expect("router stats");
            close(
                r.entropy_mean,
                &w["router_entropy_mean"],
                1e-12,
                "router entropy mean",
            );
            close(
                r.entropy_std,
                &w["router_entropy_std"],
                1e-9,
                "router entropy std",
            );
            close(r.margin_mean, &w["margin_mean"], 1e-12, "margin mean");
            close(r.margin_std, &w["margin_std"], 1e-9, "margin std");
            close(r.margin_min, &w["margin_min"], 1e-12, "margin min");
            let co = acc.coactivation(l).unwrap();
            let wco: Vec<u64> = w["coactivation"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
                .collect();
            assert_eq!(co, wco.as_slice(), "layer {l} co-activation");
        } else {
            assert!(g.router.is_none() && g.top_pairs.is_none());
        }
    }
}

#[test]
fn health_of_run_a_matches_reference() {
    let e = expected();
    check_layers(
        &acc("run_a", HealthOptions::default()),
        &e["health_a"],
        true,
    );
    check_layers(
        &acc("run_b", HealthOptions::default()),
        &e["health_b"],
        true,
    );
}

#[test]
fn prompt_only_token_filter_matches_reference() {
    let opts = HealthOptions {
        token_types: vec![TokenType::Prompt],
        ..Default::default()
    };
    check_layers(
        &acc("run_a", opts),
        &expected()["health_a_prompt_only"],
        true,
    );
}

#[test]
fn counts_mode_gives_same_load_metrics_without_per_token_data() {
    let a = acc("run_a_counts", HealthOptions::default());
    check_layers(&a, &expected()["health_a"], false);
    let rep = a.report();
    assert!(!rep.available.coactivation && !rep.available.router_distribution);
    assert!(rep
        .notes
        .iter()
        .any(|n| n.contains("co-activation needs per-token")));
}

#[test]
fn compare_matches_reference() {
    let e = &expected()["compare"];
    let opts = HealthOptions::default();
    let a = read_run_data(&fixtures().join("run_a"), &opts).unwrap();
    let b = read_run_data(&fixtures().join("run_b"), &opts).unwrap();
    let r = compare_runs(
        &a,
        &b,
        &CompareOptions {
            reps: 199,
            seed: 1,
            fail_above: Some(0.04),
        },
    )
    .unwrap();
    for (g, w) in r.per_layer.iter().zip(e["per_layer"].as_array().unwrap()) {
        close(g.js_bits, &w["js_bits"], 1e-12, "js bits");
        close(g.js_nats, &w["js_nats"], 1e-12, "js nats");
    }
    close(r.mean_js_bits, &e["mean_js_bits"], 1e-12, "mean js");
    close(r.max_js_bits, &e["max_js_bits"], 1e-12, "max js");
    assert_eq!(r.exceeded, Some(true));
    assert_eq!(
        r.shared_prompts as u64,
        e["shared_prompts"].as_u64().unwrap()
    );
    let ws = e["prompt_shifts"].as_array().unwrap();
    assert_eq!(r.prompt_shifts.len(), ws.len());
    for (g, w) in r.prompt_shifts.iter().zip(ws) {
        assert_eq!(g.prompt_id, w["prompt_id"].as_str().unwrap());
        close(g.shift, &w["shift"], 1e-12, "shift");
    }
    for (g, w) in r
        .category_shifts
        .iter()
        .zip(e["category_shifts"].as_array().unwrap())
    {
        assert_eq!(g.category, w["category"].as_str().unwrap());
        close(g.mean_shift, &w["mean_shift"], 1e-12, "category mean shift");
        close(
            g.std_shift.unwrap(),
            &w["std_shift"],
            1e-9,
            "category std shift",
        );
    }
    let p = r.permutation.unwrap();
    assert!(p.p_value > 0.0 && p.p_value <= 1.0);
    assert_eq!(p.reps, 199);
}

#[test]
fn compare_rejects_shape_mismatch_naming_both_runs() {
    let opts = HealthOptions::default();
    let a = read_run_data(&fixtures().join("run_a"), &opts).unwrap();
    let b = read_run_data(&fixtures().join("run_e6"), &opts).unwrap();
    let msg = compare_runs(&a, &b, &CompareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("run_a") && msg.contains("run_e6") && msg.contains("6 experts"),
        "{msg}"
    );
}

#[test]
fn flat_events_give_the_same_load_and_coactivation() {
    // Convert run A's records to the flat event form (one line per selected expert).
    let text = std::fs::read_to_string(fixtures().join("run_a/trace.jsonl")).unwrap();
    let mut events = String::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        for (rank, e) in r["experts"].as_array().unwrap().iter().enumerate() {
            let ev = serde_json::json!({
                "prompt_id": r["prompt_id"], "category": r["category"], "layer": r["layer"],
                "position": r["position"], "token_type": r["token_type"], "expert": e,
                "weight": r["weights"][rank],
            });
            events.push_str(&ev.to_string());
            events.push('\n');
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("events.jsonl");
    std::fs::write(&p, events).unwrap();
    let run = resolve_run(&p).unwrap();
    let acc = accumulate_run(&run, Some((3, 8)), HealthOptions::default()).unwrap();
    let want = &expected()["health_a"];
    let rep = acc.report();
    assert!(rep.available.coactivation && !rep.available.router_distribution);
    for l in 0..3 {
        close(rep.layers[l].gini, &want[l]["gini"], 1e-12, "gini");
        assert_eq!(rep.layers[l].tokens, want[l]["tokens"].as_u64().unwrap());
        let wco: Vec<u64> = want[l]["coactivation"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
            .collect();
        assert_eq!(acc.coactivation(l).unwrap(), wco.as_slice());
    }
}
