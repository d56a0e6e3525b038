//! Per-stage wall times of the paper-shape analysis on synthetic data, without building the CLI:
//! `cargo run --release -p moe-xray-stats --example stage_times [reps] [classifier_perm_reps]`.
//! (`moe-xray bench analyze` is the user-facing benchmark; this is the same workload.)

use moe_xray_stats::analyze::{analyze_exact, AnalyzeOptions};
use moe_xray_stats::baselines::{run_baseline, Baseline};
use moe_xray_stats::bench::{synthetic_rows, threads, SynthShape};
use moe_xray_stats::input::build_input;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let cperm: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let (layers, experts, top_k) = (16, 64, 8);
    let rows = synthetic_rows(&SynthShape {
        prompts: 80,
        categories: 4,
        layers,
        experts,
        top_k,
        tokens: 64,
        seed: 0,
    });
    let input = build_input(layers, experts, top_k, false, rows)?;
    let full = AnalyzeOptions {
        reps,
        perm_reps: reps,
        boot_reps: reps,
        classifier_perm_reps: cperm,
        seed: 0,
        ..AnalyzeOptions::default()
    };
    println!("threads={}", threads());
    let t = Instant::now();
    let out = analyze_exact(&input, &full)?;
    println!("total {:.3} s", t.elapsed().as_secs_f64());
    for which in [
        Baseline::Permutation,
        Baseline::LoadBalanceUniform,
        Baseline::LoadBalanceMarginal,
    ] {
        let t = Instant::now();
        let b = run_baseline(which, &input, reps, 0);
        println!(
            "  {which:?}: {:.3} s  (mean {:.6} std {:.6} pair_std {:.6})",
            t.elapsed().as_secs_f64(),
            b.mean,
            b.std,
            b.pair_std
        );
    }
    let only = |classifier: bool| AnalyzeOptions {
        reps: 0,
        perm_reps: 0,
        boot_reps: if classifier { reps } else { 0 },
        classifier_perm_reps: if classifier { cperm } else { 0 },
        skip_tsne: classifier,
        skip_classifier: !classifier,
        seed: 0,
        ..AnalyzeOptions::default()
    };
    let t = Instant::now();
    analyze_exact(&input, &only(true))?;
    println!(
        "  LR CV + perms + acc boot: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    analyze_exact(&input, &only(false))?;
    println!(
        "  similarity + PCA + t-SNE: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let r = &out.results;
    println!(
        "check: within {:.4} across {:.4} d {:.3}",
        r.similarity.within.mean, r.similarity.across.mean, r.similarity.cohens_d
    );
    Ok(())
}
