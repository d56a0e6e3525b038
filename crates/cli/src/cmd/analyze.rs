//! `moe-xray analyze`: routing traces → results.json, signatures.csv, prompt_similarity.csv and a
//! short human summary (definitions in docs/statistics.md). The analysis itself is
//! `moe_xray_pipeline::analyze`; this module parses the flags, shows progress and prints.

use anyhow::{bail, Result};
use moe_xray_pipeline::analyze::{analyze, write_outputs_as, AnalyzeOptions, TableFormat};
use moe_xray_pipeline::outdir::OutLock;
use moe_xray_stats::analyze::{PathChoice, DEFAULT_GRAM_THRESHOLD};
use moe_xray_stats::results::{AnalysisResults, Section, TokenMatchMode};
use moe_xray_trace::TokenType;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::progress::CliProgress;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Trace files (JSONL records, flat events or counts lines; .gz / .zst accepted), Parquet
    /// trace files or Hive-partitioned Parquet dataset directories (docs/trace-format.md).
    #[arg(required = true, value_name = "TRACES")]
    pub traces: Vec<PathBuf>,
    /// Prompt file (JSONL or CSV with id, category, text) giving each prompt's category.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Model directory: L, E and k are read from its config.json.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Number of MoE layers L (overrides manifest / config).
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// Number of experts per layer E.
    #[arg(long)]
    pub num_experts: Option<usize>,
    /// Experts selected per token k.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Token types to count: prompt, generation or prompt,generation.
    #[arg(long, value_delimiter = ',', default_value = "prompt,generation")]
    pub token_types: Vec<String>,
    /// Sum router weights instead of counting selections.
    #[arg(long)]
    pub weighted: bool,
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
    /// Formats of the tables beside results.json (comma-separated): `csv` (signatures.csv,
    /// prompt_similarity.csv) and/or `parquet` (signatures, prompt similarity, per-prompt and
    /// per-layer tables and one tidy table per results.json section under long/; docs/tables.md).
    /// Tables of a format not chosen are removed from --out.
    #[arg(long, value_delimiter = ',', default_value = "csv", value_parser = ["csv", "parquet"])]
    pub format: Vec<String>,
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
    /// Also compute the similarity statistics on token-matched routing: `shared` (only tokens
    /// whose id occurs in every category) or `residual` (each token's routing minus its token
    /// id's mean); written as `token_matched` (docs/statistics.md, "Confound controls").
    #[arg(long, value_name = "MODE", value_parser = ["shared", "residual"])]
    pub token_matched: Option<String>,
    /// Routing over time: also the statistics (Cohen's d, classifier accuracy) per window of W
    /// generated tokens, of the prompt and generation phases, and the drift between windows;
    /// written as `windows` (docs/statistics.md, "Routing over time"). Reads the traces twice
    /// more.
    #[arg(long, value_name = "W")]
    pub windows: Option<usize>,
}

pub(crate) fn token_types(names: &[String]) -> Result<Vec<TokenType>> {
    let mut out = Vec::new();
    for n in names {
        let t = match n.trim() {
            "prompt" => TokenType::Prompt,
            "generation" => TokenType::Generation,
            other => bail!("--token-types: unknown token type {other:?} (use prompt, generation or prompt,generation)"),
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("--token-types: empty list");
    }
    Ok(out)
}

impl Args {
    /// The typed options of the pipeline's analysis.
    pub fn options(&self) -> Result<AnalyzeOptions> {
        Ok(AnalyzeOptions {
            traces: self.traces.clone(),
            prompts: self.prompts.clone(),
            model: self.model.clone(),
            num_layers: self.num_layers,
            num_experts: self.num_experts,
            top_k: self.top_k,
            token_types: token_types(&self.token_types)?,
            weighted: self.weighted,
            reps: self.reps,
            perm_reps: self.perm_reps,
            boot_reps: self.boot_reps,
            classifier_perm_reps: self.classifier_perm_reps,
            seed: self.seed,
            folds: self.folds.clone(),
            path: if self.exact_pairs {
                PathChoice::ExactPairs
            } else if self.gram {
                PathChoice::GramSums
            } else {
                PathChoice::Auto {
                    threshold: self.gram_threshold,
                }
            },
            no_tsne: self.no_tsne,
            no_classifier: self.no_classifier,
            token_matched: match self.token_matched.as_deref() {
                None => None,
                Some("shared") => Some(TokenMatchMode::Shared),
                Some("residual") => Some(TokenMatchMode::Residual),
                Some(other) => {
                    bail!("--token-matched: unknown mode {other:?} (use shared or residual)")
                }
            },
            windows: self.windows,
        })
    }
}

fn fmt_ci(s: &Section<moe_xray_stats::results::Bootstrap>) -> String {
    match s {
        Section::Done(b) => format!(
            "95% CI [{:.3}, {:.3}]",
            b.cohens_d_ci95[0], b.cohens_d_ci95[1]
        ),
        Section::Skipped { skipped } => format!("CI skipped: {skipped}"),
    }
}

/// The short human summary.
pub fn summary(r: &AnalysisResults, out: &Path) -> String {
    let mut s = String::new();
    let cats: Vec<String> = r
        .categories
        .iter()
        .map(|c| format!("{} ({})", c.name, c.n))
        .collect();
    // Some decoder layers dense: name the MoE layers the signatures are built from.
    let layers = match &r.moe_layers {
        Some(m) if m.iter().enumerate().any(|(i, &l)| i != l) => {
            format!("{} MoE layers {m:?}", r.num_layers)
        }
        _ => format!("{} layers", r.num_layers),
    };
    let _ = writeln!(
        s,
        "{} prompts, {layers} x {} experts (top-{}), categories: {}; path: {}",
        r.num_prompts,
        r.num_experts,
        r.top_k,
        cats.join(", "),
        r.path
    );
    if !r.dropped_prompts.is_empty() {
        let _ = writeln!(
            s,
            "dropped {} prompt(s) (see dropped_prompts)",
            r.dropped_prompts.len()
        );
    }
    let sim = &r.similarity;
    let _ = writeln!(
        s,
        "within-category similarity  {:.4} ± {:.4} (n={} pairs)",
        sim.within.mean, sim.within.std, sim.within.n
    );
    let _ = writeln!(
        s,
        "across-category similarity  {:.4} ± {:.4} (n={} pairs)",
        sim.across.mean, sim.across.std, sim.across.n
    );
    let mut d_line = format!(
        "Cohen's d = {:.3}, {}",
        sim.cohens_d,
        fmt_ci(&r.significance.bootstrap)
    );
    if let Section::Done(p) = &r.significance.label_permutation {
        let _ = write!(
            d_line,
            "; label permutation p = {:.4} (within−across), {:.4} (d), {} perms",
            p.p_within_minus_across, p.p_cohens_d, p.reps
        );
    }
    let _ = writeln!(s, "{d_line}");
    for (name, b) in [
        ("permutation", &r.baselines.permutation),
        ("load-balance (uniform)", &r.baselines.load_balance_uniform),
        (
            "load-balance (marginal)",
            &r.baselines.load_balance_marginal,
        ),
    ] {
        if let Section::Done(b) = b {
            let _ = writeln!(
                s,
                "baseline {name:<24} {:.4} ± {:.4} (pair sd {:.4}, {} reps)",
                b.mean, b.std, b.pair_std, b.reps
            );
        }
    }
    if let Some(best) = r
        .per_layer
        .iter()
        .filter(|l| l.cohens_d.is_finite())
        .max_by(|a, b| a.cohens_d.total_cmp(&b.cohens_d))
    {
        let _ = writeln!(
            s,
            "strongest layer: {} (d = {:.3})",
            best.layer, best.cohens_d
        );
    }
    if let Section::Done(lr) = &r.logreg_5fold {
        let mut line = format!(
            "logistic regression: accuracy {:.1}% ± {:.1}% (fold sd), macro-F1 {:.3}, chance {:.1}%",
            100.0 * lr.accuracy_mean,
            100.0 * lr.accuracy_std,
            lr.macro_f1_oof,
            100.0 * lr.chance
        );
        if let Section::Done(b) = &r.significance.bootstrap {
            if let Some(ci) = b.accuracy_ci95 {
                let _ = write!(
                    line,
                    ", 95% CI [{:.1}%, {:.1}%]",
                    100.0 * ci[0],
                    100.0 * ci[1]
                );
            }
        }
        if let Section::Done(p) = &r.significance.classifier_permutation {
            let _ = write!(line, ", permutation p = {:.4}", p.p);
        }
        let _ = writeln!(s, "{line}");
    } else if let Section::Skipped { skipped } = &r.logreg_5fold {
        let _ = writeln!(s, "logistic regression skipped: {skipped}");
    }
    match &r.lexical_baseline {
        Some(Section::Done(lx)) => {
            let c = &lx.classifier;
            let _ = writeln!(
                s,
                "lexical baseline (token ids only, {} ids): accuracy {:.1}% ± {:.1}% (fold sd), macro-F1 {:.3}, chance {:.1}%",
                lx.vocabulary,
                100.0 * c.accuracy_mean,
                100.0 * c.accuracy_std,
                c.macro_f1_oof,
                100.0 * c.chance
            );
        }
        Some(Section::Skipped { skipped }) => {
            let _ = writeln!(s, "lexical baseline skipped: {skipped}");
        }
        None => {}
    }
    match &r.token_matched {
        Some(Section::Done(t)) => {
            let _ = writeln!(
                s,
                "token-matched ({}, {} token ids, {} prompts): within {:.4}, across {:.4}, Cohen's d = {:.3}",
                t.mode.as_str(),
                t.token_ids,
                t.num_prompts,
                t.similarity.within.mean,
                t.similarity.across.mean,
                t.similarity.cohens_d
            );
        }
        Some(Section::Skipped { skipped }) => {
            let _ = writeln!(s, "token-matched statistics skipped: {skipped}");
        }
        None => {}
    }
    s.push_str(&windows_summary(r));
    s.push_str(&control_summary(r));
    if let Section::Done(p) = &r.pca {
        let top: Vec<String> = p
            .explained_variance_ratio
            .iter()
            .take(2)
            .map(|x| format!("{:.1}%", 100.0 * x))
            .collect();
        let _ = writeln!(s, "PCA: first components explain {}", top.join(", "));
    }
    let _ = writeln!(s, "wrote {}", out.join("results.json").display());
    s
}

fn fmt_d(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "n/a".into()
    }
}

fn fmt_acc(c: &Section<moe_xray_stats::results::WindowClassifier>) -> String {
    match c {
        Section::Done(c) => format!("{:.1}%", 100.0 * c.accuracy_mean),
        Section::Skipped { .. } => "n/a".into(),
    }
}

/// The summary lines of `windows` (routing over time), if computed.
fn windows_summary(r: &AnalysisResults) -> String {
    let mut s = String::new();
    match &r.windows {
        Some(Section::Done(w)) => {
            let d = |x: &moe_xray_stats::results::WindowStats| {
                x.similarity
                    .done()
                    .map_or("n/a".into(), |s| fmt_d(s.cohens_d))
            };
            let _ = writeln!(
                s,
                "routing over time (windows of {} generated tokens, {} windows): prompt phase d = {}, accuracy {}; generation phase d = {}, accuracy {}; prompt-vs-generation signature similarity {:.3}",
                w.window_tokens,
                w.windows.len(),
                d(&w.prompt_phase),
                fmt_acc(&w.prompt_phase.classifier),
                d(&w.generation_phase),
                fmt_acc(&w.generation_phase.classifier),
                w.phase_drift.mean
            );
            let per: Vec<String> = w
                .windows
                .iter()
                .map(|x| {
                    format!(
                        "[{}-{}) d {} acc {}",
                        x.start.unwrap_or(0),
                        x.end.unwrap_or(0),
                        d(x),
                        fmt_acc(&x.classifier)
                    )
                })
                .collect();
            let _ = writeln!(s, "  per window: {}", per.join("; "));
        }
        Some(Section::Skipped { skipped }) => {
            let _ = writeln!(s, "routing over time skipped: {skipped}");
        }
        None => {}
    }
    s
}

/// The summary line of `random_router_control`, if present.
pub fn control_summary(r: &AnalysisResults) -> String {
    let mut s = String::new();
    match &r.random_router_control {
        Some(Section::Done(c)) => {
            let _ = writeln!(
                s,
                "random-router control (seed {}): d = {} vs {} observed; accuracy {} vs {} observed",
                c.seed,
                fmt_d(c.similarity.cohens_d),
                fmt_d(r.similarity.cohens_d),
                fmt_acc(&c.classifier),
                r.logreg_5fold
                    .done()
                    .map_or("n/a".into(), |l| format!("{:.1}%", 100.0 * l.accuracy_mean))
            );
        }
        Some(Section::Skipped { skipped }) => {
            let _ = writeln!(s, "random-router control skipped: {skipped}");
        }
        None => {}
    }
    s
}

pub fn run(args: Args) -> Result<()> {
    // One writer per output directory, refused at once (before the analysis runs).
    let _lock = OutLock::acquire(&args.out)?;
    let progress = CliProgress::with_spinner(args.quiet, "analyze: reading traces");
    let outputs = analyze(&args.options()?, &progress)?;
    moe_xray_pipeline::Progress::step(&progress, "analyze: writing outputs");
    let formats: Vec<TableFormat> = args
        .format
        .iter()
        .map(|f| match f.as_str() {
            "parquet" => TableFormat::Parquet,
            _ => TableFormat::Csv,
        })
        .collect();
    write_outputs_as(&args.out, &outputs, &formats)?;
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(outputs.results())?);
    } else if !args.quiet {
        print!("{}", summary(outputs.results(), &args.out));
    }
    Ok(())
}
