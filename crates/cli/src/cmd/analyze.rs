//! `moe-xray analyze`: routing traces → results.json, signatures.csv, prompt_similarity.csv and a
//! short human summary (definitions in docs/statistics.md).

use anyhow::{bail, Context, Result};
use moe_xray_stats::analyze::{
    AnalyzeOptions, Collector, Outputs, PathChoice, DEFAULT_GRAM_THRESHOLD,
};
use moe_xray_stats::input::PromptRow;
use moe_xray_stats::results::{AnalysisResults, Section};
use moe_xray_trace::counts::{for_each_prompt_counts_info, AggregateOptions};
use moe_xray_trace::{read_manifest_beside, read_prompts, TokenType, TraceError};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::health::inferred_warning;
use crate::outdir::{Batch, OutLock};
use crate::progress::Spinner;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Trace files (JSONL records, flat events or counts lines; .gz / .zst accepted).
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

/// L, E, k from a Hugging Face config.json.
pub fn model_dims(dir: &Path) -> Result<(usize, usize, usize)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .with_context(|| format!("{}: missing or invalid integer field {k:?}", path.display()))
    };
    Ok((
        get("num_hidden_layers")?,
        get("num_experts")?,
        get("num_experts_per_tok")?,
    ))
}

/// The dimensions the user gave: `--num-layers` / `--num-experts` / `--top-k` first, then the
/// config.json of `--model DIR` ([`model_dims`]); `None` where neither says. Shared by `analyze`,
/// `health` and `compare`.
pub fn given_dims(
    model: Option<&Path>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<usize>,
) -> Result<(Option<usize>, Option<usize>, Option<usize>)> {
    let (mut nl, mut ne, mut k) = (num_layers, num_experts, top_k);
    if let Some(dir) = model {
        let (l, e, kk) = model_dims(dir)?;
        nl = nl.or(Some(l));
        ne = ne.or(Some(e));
        k = k.or(Some(kk));
    }
    Ok((nl, ne, k))
}

fn token_types(names: &[String]) -> Result<Vec<TokenType>> {
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

/// Run the analysis and return the outputs (no files written).
pub fn compute(args: &Args) -> Result<Outputs> {
    compute_with_progress(args, &crate::progress::spinner(true, ""))
}

/// [`compute`], showing the step and the prompts read so far on `progress`; a warning goes there
/// too when the dimensions are inferred from per-token data.
pub fn compute_with_progress(args: &Args, progress: &Spinner) -> Result<Outputs> {
    let types = token_types(&args.token_types)?;
    let (nl, ne, mut k) = given_dims(
        args.model.as_deref(),
        args.num_layers,
        args.num_experts,
        args.top_k,
    )?;
    let manifest = read_manifest_beside(&args.traces[0])?;
    if let Some(m) = &manifest {
        k = k.or(Some(m.top_k));
    }
    let categories = match &args.prompts {
        Some(p) => Some(
            read_prompts(p)?
                .into_iter()
                .map(|p| (p.id, p.category))
                .collect::<HashMap<_, _>>(),
        ),
        None => None,
    };
    let agg = AggregateOptions {
        token_types: types.clone(),
        weighted: args.weighted,
        num_layers: nl,
        num_experts: ne,
        top_k: k,
        categories,
    };
    let choice = if args.exact_pairs {
        PathChoice::ExactPairs
    } else if args.gram {
        PathChoice::GramSums
    } else {
        PathChoice::Auto {
            threshold: args.gram_threshold,
        }
    };
    let mut collector: Option<Collector> = None;
    let mut stats_err: Option<moe_xray_stats::StatsError> = None;
    let first = args.traces[0].clone();
    let mut read = 0usize;
    let dims = for_each_prompt_counts_info(&args.traces, &agg, |p| {
        read += 1;
        if read.is_multiple_of(1024) {
            progress.step(format!("analyze: read {read} prompts"));
        }
        let c = collector.get_or_insert_with(|| {
            Collector::new(
                p.tokens_per_layer.len(),
                p.counts.len() / p.tokens_per_layer.len().max(1),
                choice,
            )
        });
        c.push(PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        })
        .map_err(|e| {
            let msg = e.to_string();
            stats_err = Some(e);
            TraceError::InvalidFile {
                path: first.clone(),
                message: msg,
            }
        })
    });
    if let Some(e) = stats_err {
        return Err(e.into());
    }
    let info = dims?;
    let (l, e) = (info.num_layers, info.num_experts);
    if manifest.is_none() {
        let label = args
            .traces
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(w) = inferred_warning(&label, &args.traces, nl.is_none(), ne.is_none(), l, e) {
            progress.warn(&w);
        }
    }
    progress.step(format!(
        "analyze: statistics on {read} prompts ({} reps per baseline)",
        args.reps
    ));
    // Weighted counts cannot reveal k; take it from the data as the unweighted path does.
    let k = if args.weighted { k.or(info.top_k) } else { k };
    let collector = collector.unwrap_or_else(|| Collector::new(l, e, choice));
    let opts = AnalyzeOptions {
        reps: args.reps,
        perm_reps: args.perm_reps.unwrap_or(args.reps),
        boot_reps: args.boot_reps.unwrap_or(args.reps),
        classifier_perm_reps: args.classifier_perm_reps,
        seed: args.seed,
        folds: None,
        folds_file: args.folds.clone(),
        token_types: types.iter().map(|t| t.as_str().to_string()).collect(),
        weighted: args.weighted,
        traces: args
            .traces
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        manifest: manifest
            .map(|m| serde_json::to_value(m).unwrap_or_default())
            .unwrap_or_else(|| serde_json::json!({})),
        path: choice,
        skip_tsne: args.no_tsne,
        skip_classifier: args.no_classifier,
        ..AnalyzeOptions::default()
    };
    let trace_desc = args
        .traces
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    collector
        .finish(k, &opts)
        .with_context(|| format!("analysing {trace_desc}"))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `signatures.csv`: prompt_id, category, then one column per (layer, expert), `l{l}_e{e}`.
pub fn signatures_csv(r: &AnalysisResults, sig: &[f64], categories: &[String]) -> String {
    let d = r.num_layers * r.num_experts;
    let mut s = String::from("prompt_id,category");
    for l in 0..r.num_layers {
        for e in 0..r.num_experts {
            let _ = write!(s, ",l{l}_e{e}");
        }
    }
    s.push('\n');
    for (i, id) in r.prompt_ids.iter().enumerate() {
        s.push_str(&csv_field(id));
        s.push(',');
        s.push_str(&csv_field(&categories[i]));
        for x in &sig[i * d..(i + 1) * d] {
            let _ = write!(s, ",{x}");
        }
        s.push('\n');
    }
    s
}

/// `prompt_similarity.csv`: N×N matrix with a header row and a first column of prompt ids.
pub fn similarity_csv(r: &AnalysisResults, sim: &[f64]) -> String {
    let n = r.prompt_ids.len();
    let mut s = String::from("prompt_id");
    for id in &r.prompt_ids {
        s.push(',');
        s.push_str(&csv_field(id));
    }
    s.push('\n');
    for (i, id) in r.prompt_ids.iter().enumerate() {
        s.push_str(&csv_field(id));
        for x in &sim[i * n..(i + 1) * n] {
            let _ = write!(s, ",{x}");
        }
        s.push('\n');
    }
    s
}

/// Adds the output files except `results.json` to `batch` (destinations in `out`) and returns
/// the text of `results.json`, which the caller adds last: it marks a complete output set.
/// CSVs of an earlier run that this one does not produce (the Gram-sums path writes none) are
/// removed when the batch is committed, so no file of another run stays beside the new results.
pub fn stage_outputs(out: &Path, outputs: &Outputs, batch: &mut Batch) -> Result<String> {
    let r = outputs.results();
    let json = serde_json::to_string_pretty(r)? + "\n";
    match outputs {
        Outputs::Exact(e) => {
            batch.add(
                out.join("signatures.csv"),
                signatures_csv(r, &e.signatures, &e.prompt_categories),
            )?;
            batch.add(
                out.join("prompt_similarity.csv"),
                similarity_csv(r, &e.similarity),
            )?;
        }
        Outputs::Gram(_) => {
            batch.remove(out.join("signatures.csv"));
            batch.remove(out.join("prompt_similarity.csv"));
        }
    }
    Ok(json)
}

/// Writes the output files into `out` all together or not at all (see `crate::outdir`):
/// every file complete in a temporary file first, then renamed into place, `results.json` last.
/// The caller holds the directory's lock.
pub fn write_outputs(out: &Path, outputs: &Outputs) -> Result<()> {
    let mut batch = Batch::new();
    let json = stage_outputs(out, outputs, &mut batch)?;
    batch.add(out.join("results.json"), json)?;
    batch.commit()
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
    let _ = writeln!(
        s,
        "{} prompts, {} layers x {} experts (top-{}), categories: {}; path: {}",
        r.num_prompts,
        r.num_layers,
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

pub fn run(args: Args) -> Result<()> {
    // One writer per output directory, refused at once (before the analysis runs).
    let _lock = OutLock::acquire(&args.out)?;
    let progress = crate::progress::spinner(args.quiet, "analyze: reading traces");
    let outputs = compute_with_progress(&args, &progress)?;
    progress.step("analyze: writing outputs");
    write_outputs(&args.out, &outputs)?;
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(outputs.results())?);
    } else if !args.quiet {
        print!("{}", summary(outputs.results(), &args.out));
    }
    Ok(())
}
