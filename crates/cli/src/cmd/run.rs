//! `moe-xray run`: the whole study in one command — trace → analyze → health → figures → report —
//! for a checkpoint of any supported family (signatures and health use its MoE layers only).
//!
//! Output folder layout (every file written through a temp file + rename):
//! - `prompts.jsonl`        the prompt set actually used (a copy; `paper80` is bundled)
//! - `traces/`              `trace.jsonl.gz`, `generations.jsonl`, `manifest.json` (from `trace`)
//! - `results.json`, `signatures.csv`, `prompt_similarity.csv` (from `analyze`)
//! - `health.json`, `health/*.csv` (from `health`; its figures go to `figures/`)
//! - `figures/*.svg`, `report.html`
//! - `control/` (with `--control random-router`): the same layout for the control study
//! - `ablation.json`, `figures/ablation_*.svg` (with `--ablate`: the causal expert ablation)
//!
//! The study itself is `moe_xray_pipeline::study::run_study`; this module parses the flags,
//! shows progress and prints the summary.
//!
//! Resumable: a re-run with the same inputs reuses the finished traces (`trace --resume` skips every
//! prompt already complete); an interrupted trace continues where it stopped. A re-run with other
//! settings into the same folder is refused rather than mixing two runs.

use std::path::PathBuf;

use anyhow::Result;
use moe_xray_pipeline::study::{run_study, StudyAblation, StudyOptions};

use super::{analyze, trace};
use crate::progress::CliProgress;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout of a supported MoE family (`model_type`
    /// olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss, granitemoe).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt set: `paper80` (bundled) or a JSONL / CSV file with id, category, text.
    #[arg(long, default_value = "paper80")]
    pub prompts: String,
    /// New tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts run together (results do not depend on it; see `trace --batch-size`).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute threads, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Repetitions of each null baseline, label permutation and bootstrap.
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Seed of every random stream of the analysis.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Exact mode: compute in f32 with quantised weights (GGUF quants, MXFP4) dequantised
    /// exactly (as `trace --exact`).
    #[arg(long, conflicts_with = "dtype")]
    pub exact: bool,
    /// No progress and no summary on stdout (warnings and errors still go to stderr).
    #[arg(long)]
    pub quiet: bool,
    /// Cut prompts longer than the model's context on this side instead of refusing them (see
    /// `trace --truncate-prompts`).
    #[arg(long, value_enum)]
    pub truncate_prompts: Option<trace::TruncateSide>,
    /// A control study run first into OUT/control/: `random-router` runs the same model and
    /// prompts with every router weight (and router / score-correction bias) replaced by a
    /// seeded permutation of its own entries; results.json gets `random_router_control` and the
    /// report states the observed d and accuracy against that floor (docs/statistics.md,
    /// "Random-router control"). Doubles the run time.
    #[arg(long, value_enum)]
    pub control: Option<Control>,
    /// Seed of the router permutation of `--control random-router`.
    #[arg(long, default_value_t = 0, requires = "control")]
    pub control_seed: u64,
    /// Routing over time: also the statistics per window of W generated tokens, the prompt and
    /// generation phases and the drift between windows (see `analyze --windows`).
    #[arg(long, value_name = "W")]
    pub windows: Option<usize>,
    /// Causal expert ablation after the analysis, on the same model and prompts (as `moe-xray
    /// ablate`, with this run's --max-new-tokens, --reps as bootstrap and permutation
    /// repetitions, and --seed): writes ablation.json and figures/ablation_*.svg with the other
    /// outputs and adds the "Expert ablation" section to the report. Costs 1 + doses ×
    /// categories × (1 + control draws) teacher-forced passes over all prompts.
    #[arg(long)]
    pub ablate: bool,
    /// Experts masked per MoE layer for each category, one dose per value (e.g. 1,2,4: a
    /// dose-response curve).
    #[arg(long, value_delimiter = ',', default_value = "2", requires = "ablate")]
    pub ablate_n: Vec<usize>,
    /// Load-matched random control sets per category and dose.
    #[arg(long, default_value_t = 4, requires = "ablate")]
    pub ablate_control_draws: usize,
}

/// Control studies of `run --control`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Router weights permuted (seeded): the floor that token identity and attention explain.
    RandomRouter,
}

impl Args {
    /// The typed options of the pipeline's study.
    pub fn options(&self) -> StudyOptions {
        StudyOptions {
            model: self.model.clone(),
            prompts: self.prompts.clone(),
            max_new_tokens: self.max_new_tokens,
            chat_template: self.chat_template,
            out: self.out.clone(),
            batch_size: self.batch_size,
            threads: self.threads,
            reps: self.reps,
            seed: self.seed,
            dtype: if self.exact {
                Some(moe_xray_pipeline::trace::EXACT.to_string())
            } else {
                self.dtype.clone()
            },
            truncate_prompts: self.truncate_prompts.map(Into::into),
            random_router_control: self.control.map(|Control::RandomRouter| self.control_seed),
            windows: self.windows,
            ablate: self.ablate.then(|| StudyAblation {
                doses: self.ablate_n.clone(),
                control_draws: self.ablate_control_draws,
            }),
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let progress = CliProgress::new(args.quiet);
    let s = run_study(&args.options(), &command, &progress)?;
    drop(progress);
    if !args.quiet {
        println!("{}", analyze::summary(&s.results, &args.out));
        println!("report: {}", s.report.display());
    }
    Ok(())
}
