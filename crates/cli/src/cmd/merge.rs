//! `moe-xray merge`: the merge step of a sharded analysis — combines shard files written by
//! `moe-xray map` into exactly the outputs (`results.json`, `signatures.csv`,
//! `prompt_similarity.csv`) of one `moe-xray analyze` over all their traces
//! (docs/statistics.md, "Sharded analysis"). The work is `moe_xray_pipeline::merge::merge`.

use anyhow::Result;
use moe_xray_pipeline::analyze::write_outputs;
use moe_xray_pipeline::merge::{merge, MergeOptions};
use moe_xray_pipeline::outdir::OutLock;
use moe_xray_stats::analyze::{PathChoice, DEFAULT_GRAM_THRESHOLD};
use std::path::PathBuf;

use crate::progress::CliProgress;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Shard files (written by `moe-xray map`), in any order.
    #[arg(required = true, value_name = "SHARDS")]
    pub shards: Vec<PathBuf>,
    /// Repetitions of each null baseline.
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Label permutations of the similarity test (default: --reps).
    #[arg(long)]
    pub perm_reps: Option<usize>,
    /// Bootstrap resamples (default: --reps).
    #[arg(long)]
    pub boot_reps: Option<usize>,
    /// Label permutations of the classifier test.
    #[arg(long, default_value_t = 200)]
    pub classifier_perm_reps: usize,
    /// Seed of every random stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fold assignment CSV (`prompt_id,fold`) for the classifier.
    #[arg(long, value_name = "FILE")]
    pub folds: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "analysis")]
    pub out: PathBuf,
    /// Print results.json on stdout instead of the summary (it is also written to --out).
    #[arg(long)]
    pub json: bool,
    /// No summary on stdout and no progress (warnings and errors still go to stderr).
    #[arg(long)]
    pub quiet: bool,
    /// Force the all-pairs path.
    #[arg(long, conflicts_with = "gram")]
    pub exact_pairs: bool,
    /// Force the streaming Gram-sums path.
    #[arg(long)]
    pub gram: bool,
    /// Above this many prompts the Gram-sums path is used automatically.
    #[arg(long, default_value_t = DEFAULT_GRAM_THRESHOLD)]
    pub gram_threshold: usize,
    /// Skip t-SNE.
    #[arg(long)]
    pub no_tsne: bool,
    /// Skip the classifier and its tests.
    #[arg(long)]
    pub no_classifier: bool,
}

pub fn run(args: Args) -> Result<()> {
    let _lock = OutLock::acquire(&args.out)?;
    let opts = MergeOptions {
        shards: args.shards.clone(),
        reps: args.reps,
        perm_reps: args.perm_reps,
        boot_reps: args.boot_reps,
        classifier_perm_reps: args.classifier_perm_reps,
        seed: args.seed,
        folds: args.folds.clone(),
        path: if args.exact_pairs {
            PathChoice::ExactPairs
        } else if args.gram {
            PathChoice::GramSums
        } else {
            PathChoice::Auto {
                threshold: args.gram_threshold,
            }
        },
        no_tsne: args.no_tsne,
        no_classifier: args.no_classifier,
    };
    let progress = CliProgress::with_spinner(args.quiet, "merge: reading shards");
    let outputs = merge(&opts, &progress)?;
    moe_xray_pipeline::Progress::step(&progress, "merge: writing outputs");
    write_outputs(&args.out, &outputs)?;
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(outputs.results())?);
    } else if !args.quiet {
        print!("{}", super::analyze::summary(outputs.results(), &args.out));
    }
    Ok(())
}
