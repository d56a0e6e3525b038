//! `moe-xray bench`: benchmarks. `bench analyze` times the statistics on synthetic data of the
//! paper's shape; `bench analyze-large` times the streaming Gram-sums path on many prompts.

use anyhow::Result;
use moe_xray_stats::analyze::{analyze_exact, analyze_gram, AnalyzeOptions};
use moe_xray_stats::baselines::{run_baseline, Baseline};
use moe_xray_stats::bench::{large_rows, synthetic_rows, threads, SynthShape};
use moe_xray_stats::input::build_input;
use moe_xray_stats::large_n::GramAccumulator;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Full analysis (baselines, significance, PCA, t-SNE, 5-fold LR) on synthetic routing counts.
    Analyze(AnalyzeBench),
    /// Gram-sums path (within/across, per-layer d, category matrix) on many synthetic prompts.
    AnalyzeLarge(LargeBench),
    /// MoE checkpoint (any supported family): prefill / decode tokens/s, capture overhead (null vs
    /// trace sink), peak RSS.
    Model(super::bench_model::ModelBench),
}

#[derive(clap::Args, Debug)]
pub struct AnalyzeBench {
    #[arg(long, default_value_t = 80)]
    pub prompts: usize,
    #[arg(long, default_value_t = 4)]
    pub categories: usize,
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Tokens per prompt (prompt + generation).
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    #[arg(long, default_value_t = 200)]
    pub classifier_perm_reps: usize,
    /// Timed runs (the best and the median are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args, Debug)]
pub struct LargeBench {
    #[arg(long, default_value_t = 1_000_000)]
    pub prompts: usize,
    #[arg(long, default_value_t = 4)]
    pub categories: usize,
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn run_analyze(b: AnalyzeBench) -> Result<()> {
    let rows = synthetic_rows(&SynthShape {
        prompts: b.prompts,
        categories: b.categories,
        layers: b.layers,
        experts: b.experts,
        top_k: b.top_k,
        tokens: b.tokens,
        seed: b.seed,
    });
    let input = build_input(b.layers, b.experts, b.top_k, false, rows)?;
    let opts = AnalyzeOptions {
        reps: b.reps,
        perm_reps: b.reps,
        boot_reps: b.reps,
        classifier_perm_reps: b.classifier_perm_reps,
        seed: b.seed,
        ..AnalyzeOptions::default()
    };
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..b.runs.max(1) {
        let t = Instant::now();
        let out = analyze_exact(&input, &opts)?;
        times.push(t.elapsed().as_secs_f64());
        last = Some(out);
    }
    // Per-stage timings of one extra run, for the breakdown.
    let stage = |name: &str, f: &dyn Fn()| {
        let t = Instant::now();
        f();
        println!("  {name:<28} {:.3} s", t.elapsed().as_secs_f64());
    };
    times.sort_by(f64::total_cmp);
    println!(
        "bench analyze: {} prompts x {} layers x {} experts, k={}, {} tokens/prompt, reps={}, classifier perms={}, threads={}",
        b.prompts,
        b.layers,
        b.experts,
        b.top_k,
        b.tokens,
        b.reps,
        b.classifier_perm_reps,
        threads()
    );
    println!(
        "total: best {:.3} s, median {:.3} s over {} runs",
        times[0],
        times[times.len() / 2],
        times.len()
    );
    let only = |f: &dyn Fn(&mut AnalyzeOptions)| {
        let mut o = AnalyzeOptions {
            reps: 0,
            perm_reps: 0,
            boot_reps: 0,
            classifier_perm_reps: 0,
            skip_tsne: true,
            skip_classifier: true,
            seed: b.seed,
            ..AnalyzeOptions::default()
        };
        f(&mut o);
        o
    };
    let run = |o: AnalyzeOptions| {
        let _ = analyze_exact(&input, &o);
    };
    stage("similarity+PCA only", &|| run(only(&|_| {})));
    stage("+ 3 baselines", &|| run(only(&|o| o.reps = b.reps)));
    for which in [
        Baseline::Permutation,
        Baseline::LoadBalanceUniform,
        Baseline::LoadBalanceMarginal,
    ] {
        stage(&format!("  baseline {which:?}"), &|| {
            run_baseline(which, &input, b.reps, b.seed);
        });
    }
    stage("+ label perm + bootstrap d", &|| {
        run(only(&|o| {
            o.perm_reps = b.reps;
            o.boot_reps = b.reps;
        }))
    });
    stage("+ t-SNE", &|| run(only(&|o| o.skip_tsne = false)));
    stage("+ LR CV + perms + acc boot", &|| {
        run(only(&|o| {
            o.skip_classifier = false;
            o.boot_reps = b.reps;
            o.classifier_perm_reps = b.classifier_perm_reps;
        }))
    });
    if let Some(out) = last {
        let r = &out.results;
        println!(
            "check: within {:.4} across {:.4} d {:.3}",
            r.similarity.within.mean, r.similarity.across.mean, r.similarity.cohens_d
        );
    }
    Ok(())
}

fn run_large(b: LargeBench) -> Result<()> {
    let (nl, ne) = (b.layers, b.experts);
    let t0 = Instant::now();
    let mut acc = GramAccumulator::new(nl, ne);
    let chunk = 4096;
    let mut gen_time = 0.0;
    let mut start = 0;
    while start < b.prompts {
        let end = (start + chunk).min(b.prompts);
        let tg = Instant::now();
        let rows = large_rows(start..end, nl, ne, b.categories, b.seed);
        gen_time += tg.elapsed().as_secs_f64();
        for r in rows {
            acc.push(r)?;
        }
        start = end;
    }
    let summary = acc.finish()?;
    let total = t0.elapsed().as_secs_f64();
    let r = analyze_gram(summary, nl, ne, None, &AnalyzeOptions::default());
    println!(
        "bench analyze-large: {} prompts x {} layers x {} experts, threads={}",
        b.prompts,
        nl,
        ne,
        threads()
    );
    println!(
        "total {:.2} s (synthetic data generation {:.2} s, accumulation+finish {:.2} s)",
        total,
        gen_time,
        total - gen_time
    );
    println!(
        "check: within {:.6} ± {:.6} (n={}), across {:.6} ± {:.6} (n={}), d {:.4}",
        r.similarity.within.mean,
        r.similarity.within.std,
        r.similarity.within.n,
        r.similarity.across.mean,
        r.similarity.across.std,
        r.similarity.across.n,
        r.similarity.cohens_d
    );
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Analyze(b) => run_analyze(b),
        What::AnalyzeLarge(b) => run_large(b),
        What::Model(b) => super::bench_model::run(b),
    }
}
