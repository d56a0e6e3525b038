//! `moe-xray demo`: the whole study on a synthetic model, with no arguments and no downloads.
//!
//! It writes a random-weight OLMoE checkpoint with the paper's routing shape (16 MoE layers,
//! 64 experts, top-8; small hidden size so it runs in a minute or two on 2 cores; the real OLMo
//! tokenizer) into `OUT/model`, then runs `moe-xray run` on the bundled paper80 prompts.
//!
//! Honest by construction: a random-weight model has no task structure, and the report says so.
//! `--planted` instead builds the positive control of `moe_xray_model::synth` (router made
//! sensitive to token classes), where the pipeline must find category structure.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use moe_xray_model::synth::{self, SynthSpec};
use moe_xray_stats::results::Section;

use moe_xray_pipeline::outdir::{check_threads, OutLock};
use moe_xray_pipeline::study::{execute_study, StudyOptions};

use crate::progress::CliProgress;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Output folder (model, traces, results, figures, report.html).
    #[arg(long, default_value = "moe-xray-demo")]
    pub out: PathBuf,
    /// Positive control: a synthetic router deliberately sensitive to token classes.
    #[arg(long)]
    pub planted: bool,
    /// New tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Repetitions of each null baseline, label permutation and bootstrap.
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Compute threads, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress and no summary; only the one-line verdict on what the numbers mean (a
    /// random-weight model's are not evidence) is still printed.
    #[arg(long)]
    pub quiet: bool,
}

/// The demo model: the paper's routing shape (L=16, E=64, k=8) with a small hidden size.
pub fn demo_spec(planted: bool) -> Result<SynthSpec> {
    let mut s = SynthSpec::preset("small")?;
    s.num_layers = 16;
    s.num_experts = 64;
    s.top_k = 8;
    s.hidden_size = 128;
    s.intermediate_size = 64;
    s.num_heads = 4;
    s.num_kv_heads = 4;
    s.seed = 0;
    s.planted = planted;
    s.validate()?;
    Ok(s)
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    check_threads(args.threads)?;
    let model_dir = args.out.join("model");
    // One writer per output folder, for the model and the whole run.
    let _lock = OutLock::acquire(&args.out)?;
    let spec = demo_spec(args.planted)?;
    if !args.quiet {
        eprintln!(
            "[0/4] writing the synthetic {}model -> {}",
            if args.planted { "planted " } else { "" },
            model_dir.display()
        );
    }
    synth::write_checkpoint(&spec, &model_dir)
        .with_context(|| format!("writing the demo model to {}", model_dir.display()))?;
    let opts = StudyOptions {
        max_new_tokens: args.max_new_tokens,
        batch_size: 8,
        threads: args.threads,
        reps: args.reps,
        ..StudyOptions::new(model_dir, &args.out)
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let progress = CliProgress::new(args.quiet);
    let s = execute_study(&opts, &command, &progress)?;
    drop(progress);
    let r = &s.results;
    if !args.quiet {
        println!("{}", super::analyze::summary(r, &args.out));
    }
    let acc = match &r.logreg_5fold {
        Section::Done(c) => format!("{:.1} %", 100.0 * c.accuracy_mean),
        Section::Skipped { skipped } => format!("skipped ({skipped})"),
    };
    if args.planted {
        println!(
            "positive control (planted router): Cohen's d = {:.2}, classifier accuracy {acc}; \
             the pipeline should find the planted category structure (d > 1, accuracy well above chance).",
            r.similarity.cohens_d
        );
    } else {
        println!(
            "random-weight model: it has no task structure, so these numbers are NOT evidence of \
             task-conditioned routing (d = {:.2}, accuracy {acc}); run `moe-xray demo --planted` \
             for the positive control, or `moe-xray run --model DIR` on a real checkpoint.",
            r.similarity.cohens_d
        );
    }
    if !args.quiet {
        println!("report: {}", s.report.display());
        println!("demo wall time: {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}
