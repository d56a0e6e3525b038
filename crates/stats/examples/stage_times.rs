//! Per-stage wall times of the paper-shape analysis on synthetic data, without building the CLI:
//! `cargo run --release -p moe-xray-stats --example stage_times [reps] [classifier_perm_reps]`.
//! `... --example stage_times large N`: the Gram-sums path on N synthetic prompts.
//! (`moe-xray bench analyze` / `bench analyze-large` are the user-facing benchmarks; these are the
//! same workloads.)

use moe_xray_stats::analyze::{analyze_exact, AnalyzeOptions};
use moe_xray_stats::baselines::{run_baseline, Baseline};
use moe_xray_stats::bench::{synthetic_rows, threads, SynthShape};
use moe_xray_stats::input::build_input;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("large") {
        args.next();
        let n: usize = args
            .next()
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(1_000_000);
        return large(n);
    }
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
    if let Some(only) = args.next() {
        // Just one baseline (for profiling).
        let which = match only.as_str() {
            "permutation" => Baseline::Permutation,
            "uniform" => Baseline::LoadBalanceUniform,
            _ => Baseline::LoadBalanceMarginal,
        };
        let t = Instant::now();
        let b = run_baseline(which, &input, reps, 0);
        println!(
            "{which:?}: {:.3} s, mean {:.6}",
            t.elapsed().as_secs_f64(),
            b.mean
        );
        return Ok(());
    }
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

fn large(prompts: usize) -> Result<(), Box<dyn std::error::Error>> {
    use moe_xray_stats::bench::large_rows;
    use moe_xray_stats::large_n::GramAccumulator;
    let (nl, ne) = (16, 64);
    let t0 = Instant::now();
    let mut acc = GramAccumulator::new(nl, ne);
    let mut gen_time = 0.0;
    let mut start = 0;
    while start < prompts {
        let end = (start + 4096).min(prompts);
        let tg = Instant::now();
        let rows = large_rows(start..end, nl, ne, 4, 0);
        gen_time += tg.elapsed().as_secs_f64();
        for r in rows {
            acc.push(r)?;
        }
        start = end;
    }
    let s = acc.finish()?;
    let total = t0.elapsed().as_secs_f64();
    println!(
        "large: {prompts} prompts, threads={}: total {total:.2} s (generation {gen_time:.2} s)",
        threads()
    );
    println!(
        "check: within {:.6} ± {:.6}, across {:.6} ± {:.6}, d {:.4}",
        s.similarity.within.mean,
        s.similarity.within.std,
        s.similarity.across.mean,
        s.similarity.across.std,
        s.similarity.cohens_d
    );
    Ok(())
}
