//! Health and compare statistics against tools/reference_health.py (numpy/scipy) on the
//! committed fixtures in fixtures/health/.

use moe_xray_test_support::fixture;

use moe_xray_health::compare::{compare_runs, CompareOptions};
use moe_xray_health::input::read_run_data;
use moe_xray_health::{accumulate_run, resolve_run, HealthAccumulator, HealthOptions};
use moe_xray_trace::TokenType;
use serde_json::Value;

fn expected() -> Value {
    let s = std::fs::read_to_string(fixture("health").join("expected.json")).unwrap();
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

/// [`close`] for each `(got, key in want, tolerance)`, labelled by the key.
fn close_fields(want: &Value, cases: &[(f64, &str, f64)]) {
    for &(got, key, tol) in cases {
        close(got, &want[key], tol, key);
    }
}

/// A JSON matrix of counts, flattened row-major.
fn flat_u64(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
        .collect()
}

/// The run data of the fixture run `name` with the default options.
fn run_data(name: &str) -> moe_xray_health::compare::RunData {
    read_run_data(&fixture("health").join(name), &HealthOptions::default()).unwrap()
}

fn acc(run: &str, opts: HealthOptions) -> HealthAccumulator {
    let r = resolve_run(&fixture("health").join(run)).unwrap();
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
        let dead: Vec<usize> = w["dead_experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(g.dead_experts, dead);
        let mut fields = vec![
            (g.entropy_nats, "entropy_nats", 1e-12),
            (g.normalized_entropy, "normalized_entropy", 1e-12),
            (g.gini, "gini", 1e-12),
            (g.jain, "jain", 1e-12),
            (g.max_mean_ratio, "max_mean_ratio", 1e-12),
        ];
        if router {
            let r = g.router.as_ref().expect("router stats");
            fields.extend([
                (r.entropy_mean, "router_entropy_mean", 1e-12),
                (r.entropy_std, "router_entropy_std", 1e-9),
                (r.margin_mean, "margin_mean", 1e-12),
                (r.margin_std, "margin_std", 1e-9),
                (r.margin_min, "margin_min", 1e-12),
            ]);
            let co = acc.coactivation(l).unwrap();
            let wco = flat_u64(&w["coactivation"]);
            assert_eq!(co, wco.as_slice(), "layer {l} co-activation");
        } else {
            assert!(g.router.is_none() && g.top_pairs.is_none());
        }
        close_fields(w, &fields);
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
    let (a, b) = (run_data("run_a"), run_data("run_b"));
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
        close_fields(
            w,
            &[(g.js_bits, "js_bits", 1e-12), (g.js_nats, "js_nats", 1e-12)],
        );
    }
    close_fields(
        e,
        &[
            (r.mean_js_bits, "mean_js_bits", 1e-12),
            (r.max_js_bits, "max_js_bits", 1e-12),
        ],
    );
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
    let (a, b) = (run_data("run_a"), run_data("run_e6"));
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
    let text = std::fs::read_to_string(fixture("health").join("run_a/trace.jsonl")).unwrap();
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
        let wco = flat_u64(&want[l]["coactivation"]);
        assert_eq!(acc.coactivation(l).unwrap(), wco.as_slice());
    }
}
