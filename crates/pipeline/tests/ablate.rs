//! Causal expert ablation on synthetic checkpoints: the planted positive control shows a
//! category-specific effect (own category's characteristic experts hurt its prompts more than
//! other categories' and more than load-matched random experts), a random-weight model does not;
//! outputs are reproducible byte for byte.

use std::path::{Path, PathBuf};

use moe_xray_model::synth::{write_checkpoint, SynthSpec};
use moe_xray_pipeline::ablate::{ablate, to_json_bytes, AblateOptions};
use moe_xray_pipeline::NoProgress;
use moe_xray_stats::ablation::AblationResults;
use moe_xray_test_support::repo_root;

const PER_CATEGORY: usize = 5;

fn write_model(dir: &Path, planted: bool) -> PathBuf {
    let mut spec = SynthSpec::preset("tiny").unwrap();
    spec.planted = planted;
    spec.seed = 0;
    spec.validate().unwrap();
    let out = dir.join(if planted { "planted" } else { "random" });
    write_checkpoint(&spec, &out).unwrap();
    out
}

/// The first `PER_CATEGORY` prompts of each paper80 category.
fn write_prompts(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("prompts/paper80.jsonl")).unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut keep = String::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let c = v["category"].as_str().unwrap().to_string();
        let n = seen.entry(c).or_insert(0usize);
        if *n < PER_CATEGORY {
            *n += 1;
            keep.push_str(line);
            keep.push('\n');
        }
    }
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, keep).unwrap();
    p
}

fn options(model: &Path, prompts: &Path, out: &Path) -> AblateOptions {
    AblateOptions {
        doses: vec![3],
        control_draws: 2,
        max_new_tokens: 8,
        batch_size: 4 * PER_CATEGORY,
        boot_reps: 200,
        perm_reps: 200,
        seed: 7,
        ..AblateOptions::new(
            model.to_path_buf(),
            prompts.to_path_buf(),
            out.to_path_buf(),
        )
    }
}

fn run(model: &Path, prompts: &Path, out: &Path) -> AblationResults {
    let t = std::time::Instant::now();
    let s = ablate(&options(model, prompts, out), &NoProgress).unwrap();
    eprintln!(
        "ablate {:.2} s (load {:.2}, run {:.2})",
        t.elapsed().as_secs_f64(),
        s.load_seconds,
        s.run_seconds
    );
    let bytes = std::fs::read(&s.path).unwrap();
    assert_eq!(bytes, to_json_bytes(&s.results).unwrap());
    s.results
}

fn show(name: &str, r: &AblationResults) {
    for d in &r.doses {
        eprintln!(
            "{name} n={}: diag dNLL {:.4} excess {:.4} | off dNLL {:.4} excess {:.4}",
            d.n,
            d.diagonal_delta_nll,
            d.diagonal_excess,
            d.off_diagonal_delta_nll,
            d.off_diagonal_excess
        );
        for c in &d.cells {
            eprintln!(
                "  {} -> {}: dNLL {:.4} [{:.4},{:.4}] rand {:.4} excess {:.4} p {:.3} agree {:.2}/{:.2} changed {:.2}/{:.2}",
                c.ablated, c.evaluated, c.delta_nll.mean, c.delta_nll.ci95[0], c.delta_nll.ci95[1],
                c.delta_nll_random.mean, c.excess.mean, c.p_excess, c.agreement, c.agreement_random,
                c.routing_changed, c.routing_changed_random
            );
        }
    }
}

#[test]
fn planted_model_shows_category_specific_effects_and_random_model_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = write_prompts(tmp.path());
    let planted = write_model(tmp.path(), true);
    let random = write_model(tmp.path(), false);
    let rp = run(&planted, &prompts, &tmp.path().join("out-planted"));
    let rr = run(&random, &prompts, &tmp.path().join("out-random"));
    show("planted", &rp);
    show("random", &rr);
    assert_eq!(rp.categories.len(), 4);
    assert_eq!(rp.passes, 1 + 4 * 3);
    let (p, r) = (&rp.doses[0], &rr.doses[0]);
    // Planted: masking a category's own experts hurts its prompts more than masking
    // load-matched random experts does, and more than it hurts the other categories.
    assert!(
        p.diagonal_excess > 0.05,
        "planted diagonal excess {}",
        p.diagonal_excess
    );
    assert!(
        p.diagonal_excess - p.off_diagonal_excess > 0.05,
        "planted specificity {} vs {}",
        p.diagonal_excess,
        p.off_diagonal_excess
    );
    let positive = p
        .cells
        .iter()
        .filter(|c| c.ablated == c.evaluated && c.excess.mean > 0.0)
        .count();
    assert!(positive >= 3, "{positive} of 4 diagonal cells positive");
    // The characteristic experts change routing more than the random ones on own prompts.
    for c in p.cells.iter().filter(|c| c.ablated == c.evaluated) {
        assert!(c.routing_changed > c.routing_changed_random, "{c:?}");
    }
    // Random weights: no category-specific effect of comparable size.
    assert!(
        r.diagonal_excess < p.diagonal_excess / 3.0,
        "random diagonal excess {} vs planted {}",
        r.diagonal_excess,
        p.diagonal_excess
    );
    assert!(
        (r.diagonal_excess - r.off_diagonal_excess)
            < (p.diagonal_excess - p.off_diagonal_excess) / 2.0
    );
    // Every random control set is load-matched and disjoint from the characteristic one.
    for m in &p.masked {
        for draw in &m.random {
            for (ch, rnd) in m.characteristic.iter().zip(draw) {
                assert_eq!(ch.len(), 3);
                assert_eq!(rnd.len(), 3);
                assert!(rnd.iter().all(|e| !ch.contains(e)));
            }
        }
    }
}
