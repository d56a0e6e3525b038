//! `moe-xray compare RUN_A RUN_B`: per-layer Jensen–Shannon divergence of expert load, per-prompt
//! signature shift, category shifts and a permutation test; `--fail-above` makes it a CI guard
//! (exit code 3 when the maximum per-layer JS exceeds the threshold). Definitions: docs/health.md.

use std::path::PathBuf;

use anyhow::bail;
use moe_xray_health::compare::CompareOptions;
use moe_xray_health::{output, HealthOptions};
use moe_xray_pipeline::health::compare;
use moe_xray_report::health_figures;

use super::health::{parse_token_types, DimsArgs, JsonArgs};
use crate::progress::CliProgress;
use moe_xray_pipeline::outdir::Batch;

/// Exit code when `--fail-above` is exceeded (errors exit with 1).
pub const EXIT_DRIFT: i32 = 3;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// First run: a trace file or a run directory (traces + manifest.json).
    #[arg(value_name = "RUN_A")]
    pub run_a: PathBuf,
    /// Second run (same number of layers and experts).
    #[arg(value_name = "RUN_B")]
    pub run_b: PathBuf,
    #[command(flatten)]
    pub dims: DimsArgs,
    #[command(flatten)]
    pub json: JsonArgs,
    /// No table on stdout (the exit code and the --fail-above message remain) and no progress.
    #[arg(long)]
    pub quiet: bool,
    /// Write the per-layer JS bar chart (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Write per-prompt shifts (CSV) to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Permutation repetitions of the run-label test (0 = skip).
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Seed of the permutation test.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Exit with code 3 when the maximum per-layer JS divergence (bits, in [0,1]) exceeds JS.
    #[arg(long, value_name = "JS")]
    pub fail_above: Option<f64>,
    /// Token types counted (comma-separated: prompt, generation).
    #[arg(long, value_delimiter = ',', default_value = "prompt,generation")]
    pub token_types: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(t) = args.fail_above {
        if !(0.0..=1.0).contains(&t) {
            bail!("--fail-above {t}: the JS divergence in bits lies in [0, 1]");
        }
    }
    let hopts = HealthOptions {
        token_types: parse_token_types(&args.token_types)?,
        ..Default::default()
    };
    let bar = CliProgress::with_spinner(args.quiet, "compare: reading runs");
    let report = compare(
        &args.run_a,
        &args.run_b,
        &args.dims.dims(),
        &hopts,
        &CompareOptions {
            reps: args.reps,
            seed: args.seed,
            fail_above: args.fail_above,
        },
        &bar,
    )?;
    drop(bar);
    let to_stdout_json = args.json.to_stdout();
    // The output files appear together or not at all (temporary files first, then renamed).
    let mut batch = Batch::new();
    if let Some(p) = args.json.file() {
        batch.add(p, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    if let Some(p) = &args.svg {
        batch.add(p, health_figures::js_bars(&report))?;
    }
    if let Some(p) = &args.csv {
        batch.add(p, output::shifts_csv(&report))?;
    }
    batch.commit()?;
    if to_stdout_json {
        print!("{}", serde_json::to_string_pretty(&report)? + "\n");
    } else if !args.quiet {
        print!("{}", output::compare_table(&report));
    }
    if report.exceeded == Some(true) {
        eprintln!(
            "moe-xray compare: max per-layer JS {:.6} bits (layer {}) exceeds --fail-above {}",
            report.max_js_bits,
            report.max_js_layer,
            args.fail_above.unwrap_or(0.0)
        );
        std::process::exit(EXIT_DRIFT);
    }
    Ok(())
}
