//! `moe-xray ablate`: causal expert ablation. For each category, its most characteristic experts
//! (top-N by the contrast of its routing signature) are masked in the routers and every prompt is
//! scored teacher-forced on the unablated model's own greedy continuation; the same number of
//! load-matched random experts is the control. Writes `OUT/ablation.json` (the effect matrix per
//! dose, bootstrap CIs, permutation p-values; docs/statistics.md "Causal expert ablation").
//!
//! The work is done by `moe_xray_pipeline::ablate`; this module parses the flags and prints.

use std::path::PathBuf;

use anyhow::Result;
use moe_xray_pipeline::ablate::{self as pipeline_ablate, AblateOptions};

use crate::cmd::trace::TruncateSide;
use crate::progress::CliProgress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory (any supported MoE family, see `trace --help`).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt file (JSONL `{"id","category","text"}` or CSV); at least two categories.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output directory (`ablation.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// Experts masked per MoE layer for each category (a comma-separated list gives a
    /// dose-response curve, one dose per value). At most experts − top_k per layer.
    #[arg(long = "n", value_delimiter = ',', default_value = "2")]
    pub n: Vec<usize>,
    /// Global budget: mask the N·L (layer, expert) pairs of largest contrast over all MoE layers
    /// instead of N in every layer.
    #[arg(long)]
    pub global_budget: bool,
    /// Load-matched random control sets per category and dose.
    #[arg(long, default_value_t = 4)]
    pub control_draws: usize,
    /// Load quantile bins per layer that the random control matches within.
    #[arg(long, default_value_t = 4)]
    pub load_bins: usize,
    /// Length of the unablated greedy continuation that is scored.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Prompts run together (results do not depend on it).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Bootstrap repetitions (CIs over prompts) per effect cell.
    #[arg(long, default_value_t = 1000)]
    pub boot_reps: usize,
    /// Permutation repetitions (paired sign flips, characteristic vs control) per effect cell.
    #[arg(long, default_value_t = 1000)]
    pub perm_reps: usize,
    /// Seed of the control draws, bootstrap and permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute threads, 1 to 1024 (default: all cores). Results do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Compute dtype (default: the checkpoint's stored dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Cut prompts that do not fit the context on this side instead of refusing them.
    #[arg(long, value_enum)]
    pub truncate_prompts: Option<TruncateSide>,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The typed options of the pipeline's ablation.
    pub fn options(&self) -> AblateOptions {
        AblateOptions {
            doses: self.n.clone(),
            global_budget: self.global_budget,
            control_draws: self.control_draws,
            load_bins: self.load_bins,
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            chat_template: self.chat_template,
            dtype: self.dtype.clone(),
            threads: self.threads,
            boot_reps: self.boot_reps,
            perm_reps: self.perm_reps,
            seed: self.seed,
            truncate_prompts: self.truncate_prompts.map(Into::into),
            ..AblateOptions::new(self.model.clone(), self.prompts.clone(), self.out.clone())
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let progress = CliProgress::with_spinner(args.quiet, "ablation");
    let s = pipeline_ablate::ablate(&args.options(), &progress)?;
    drop(progress);
    let r = &s.results;
    if args.json {
        let doses: Vec<serde_json::Value> = r
            .doses
            .iter()
            .map(|d| {
                serde_json::json!({
                    "n": d.n,
                    "diagonal_excess": d.diagonal_excess,
                    "off_diagonal_excess": d.off_diagonal_excess,
                    "diagonal_delta_nll": d.diagonal_delta_nll,
                    "off_diagonal_delta_nll": d.off_diagonal_delta_nll,
                })
            })
            .collect();
        let v = serde_json::json!({
            "ablation": s.path,
            "prompts": r.prompt_ids.len(),
            "categories": r.categories,
            "passes": r.passes,
            "base_nll": r.base_nll,
            "doses": doses,
            "load_seconds": s.load_seconds,
            "run_seconds": s.run_seconds,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !args.quiet {
        for d in &r.doses {
            eprintln!(
                "n = {}: ΔNLL own category {:+.4} (excess over load-matched random {:+.4}), other categories {:+.4} (excess {:+.4}) nats/token",
                d.n, d.diagonal_delta_nll, d.diagonal_excess, d.off_diagonal_delta_nll, d.off_diagonal_excess
            );
        }
        eprintln!(
            "{} prompts, {} teacher-forced passes in {:.1} s (load {:.1} s) -> {}",
            r.prompt_ids.len(),
            r.passes,
            s.run_seconds,
            s.load_seconds,
            s.path.display()
        );
    }
    Ok(())
}
