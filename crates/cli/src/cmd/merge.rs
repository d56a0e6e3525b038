//! `moe-xray merge`: the merge step of a sharded analysis — combines shard files written by
//! `moe-xray map` into exactly the outputs (`results.json`, `signatures.csv`,
//! `prompt_similarity.csv`) of one `moe-xray analyze` over all their traces, and with
//! `--health DIR` the outputs of one `moe-xray health` (shards mapped with `--health`); shards
//! mapped with `--gram-sums` give the `gram_sums` path to rounding (docs/statistics.md, "Sharded
//! analysis"). The work is `moe_xray_pipeline::merge::merge_all`.

use anyhow::Result;
use moe_xray_pipeline::analyze::write_outputs;
use moe_xray_pipeline::merge::{merge_all, MergeOptions};
use moe_xray_pipeline::outdir::{Batch, OutLock};
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
    /// Also write the routing-health outputs of all the traces into DIR, from the shards'
    /// health sections (every shard mapped with `map --health`): health.json (as `health
    /// --json`), layers.csv, load.csv, coactivation.csv, pairs.csv (as `health --csv DIR`) and
    /// the figures (as `health --svg DIR`) — the same bytes as `moe-xray health` over the traces.
    /// With --mi also the mutual information (counts shards only).
    #[arg(long, value_name = "DIR")]
    pub health: Option<PathBuf>,
    /// With --health: cold expert = selected but share < FRACTION × 1/E.
    #[arg(
        long,
        value_name = "FRACTION",
        default_value_t = 0.1,
        requires = "health"
    )]
    pub cold_fraction: f64,
    /// With --health: strongest co-activation pairs listed per layer.
    #[arg(long, default_value_t = 10, requires = "health")]
    pub top_pairs: usize,
    /// With --health: also the mutual information I(signature; task) as `health --mi` (counts
    /// shards, unweighted; its permutations are seeded with --seed).
    #[arg(long, requires = "health")]
    pub mi: bool,
    /// PCA components discretised jointly for --mi.
    #[arg(long, default_value_t = 2)]
    pub mi_components: usize,
    /// Quantile bins per component for --mi.
    #[arg(long, default_value_t = 3)]
    pub mi_bins: usize,
    /// Neighbours of the --mi leave-one-out k-NN lower bound.
    #[arg(long, default_value_t = 5)]
    pub mi_knn: usize,
    /// Label permutations for the --mi bias correction and p-value (`health --perms`).
    #[arg(long, default_value_t = 1000)]
    pub mi_perms: usize,
}

pub fn run(args: Args) -> Result<()> {
    let _lock = OutLock::acquire(&args.out)?;
    let same_dir =
        |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a == b,
        };
    let _health_lock = match &args.health {
        Some(dir) if !same_dir(dir, &args.out) => Some(OutLock::acquire(dir)?),
        _ => None,
    };
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
        health: args
            .health
            .as_ref()
            .map(|_| moe_xray_health::HealthOptions {
                cold_fraction: args.cold_fraction,
                top_pairs: args.top_pairs,
                ..moe_xray_health::HealthOptions::default()
            }),
        health_mi: args.mi.then_some(moe_xray_health::MiOptions {
            components: args.mi_components,
            bins: args.mi_bins,
            perms: args.mi_perms,
            seed: args.seed,
            knn: args.mi_knn,
        }),
    };
    let progress = CliProgress::with_spinner(args.quiet, "merge: reading shards");
    let merged = merge_all(&opts, &progress)?;
    let outputs = merged.analysis;
    moe_xray_pipeline::Progress::step(&progress, "merge: writing outputs");
    // The health outputs first (all or nothing), then the analysis.
    if let (Some(dir), Some(h)) = (&args.health, &merged.health) {
        let mut batch = Batch::new();
        batch.add(dir.join("health.json"), h.json()?)?;
        h.stage_csv(dir, &mut batch)?;
        h.stage_svg(dir, h.layer, &mut batch)?;
        batch.commit()?;
    }
    write_outputs(&args.out, &outputs)?;
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(outputs.results())?);
    } else if !args.quiet {
        print!("{}", super::analyze::summary(outputs.results(), &args.out));
    }
    Ok(())
}
