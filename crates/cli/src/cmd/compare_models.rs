//! `moe-xray compare-models A B`: cross-model comparison of two analyses of the same prompt set
//! (RSA with a Mantel test, linear CKA, per-layer CKA/RSA, task separation side by side, and for
//! the same architecture the Hungarian matching of experts and the matched drift). Definitions:
//! docs/statistics.md, "Cross-model comparison"; JSON schema: docs/crossmodel.schema.json.
//! `--out DIR` writes the comparison's self-contained `report.html` (with the figures inline),
//! together with the other outputs or not at all.
//!
//! A subcommand of its own rather than a mode of `compare`: `compare` reads traces of one
//! architecture and is a CI drift guard (its JSON, table and exit code 3 stay as they are), while
//! this reads analysis directories (results.json + signatures.csv) of any two architectures.

use std::fmt::Write as _;
use std::path::PathBuf;

use moe_xray_pipeline::compare_models::{compare_models, CompareModelsOptions};
use moe_xray_pipeline::outdir::{Batch, OutLock};
use moe_xray_report::crossmodel::{layer_heatmap, render_html, rsa_scatter, CrossModelPage};
use moe_xray_stats::crossmodel::{CrossModelOptions, CrossModelReport};

use super::health::JsonArgs;
use crate::progress::CliProgress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Analysis directory of model A (results.json + signatures.csv, from `analyze` or `run`).
    #[arg(value_name = "A")]
    pub a: PathBuf,
    /// Analysis directory of model B (the same prompt set; any family, layers and experts).
    #[arg(value_name = "B")]
    pub b: PathBuf,
    /// Traces of A for the matched drift (trace file or directory; default A/traces).
    #[arg(long, value_name = "PATH")]
    pub traces_a: Option<PathBuf>,
    /// Traces of B for the matched drift (default B/traces).
    #[arg(long, value_name = "PATH")]
    pub traces_b: Option<PathBuf>,
    /// Mantel permutations (and repetitions of the drift's permutation test; 0 = skip).
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Seed of the permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub json: JsonArgs,
    /// Write the figures (rsa_scatter.svg, layer_cka.svg, layer_rsa.svg) into DIR.
    #[arg(long, value_name = "DIR")]
    pub svg_dir: Option<PathBuf>,
    /// Write report.html into DIR: a self-contained page with RSA, CKA, task separation side by
    /// side, the expert matching and matched drift, and the figures inline.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// No summary on stdout and no progress.
    #[arg(long)]
    pub quiet: bool,
}

fn o(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

/// The human-readable summary.
pub fn summary(r: &CrossModelReport) -> String {
    let mut s = String::new();
    let m = |i: &moe_xray_stats::crossmodel::ModelInfo| {
        format!(
            "{} ({}{} MoE layers x {} experts, {} prompts)",
            i.label,
            i.family
                .as_deref()
                .map(|f| format!("{f}, "))
                .unwrap_or_default(),
            i.num_layers,
            i.num_experts,
            i.num_prompts
        )
    };
    let _ = writeln!(s, "model A: {}", m(&r.model_a));
    let _ = writeln!(s, "model B: {}", m(&r.model_b));
    let _ = writeln!(
        s,
        "shared prompts: {} (only in A: {}, only in B: {})",
        r.shared_prompts,
        r.only_in_a.len(),
        r.only_in_b.len()
    );
    let mantel = match r.rsa.mantel.done() {
        Some(t) => format!("Mantel p = {:.4} ({} permutations)", t.p, t.reps),
        None => r.rsa.mantel.why_missing().unwrap_or_default(),
    };
    let _ = writeln!(
        s,
        "RSA (Spearman of prompt similarities): {}   {mantel}",
        o(r.rsa.spearman)
    );
    let _ = writeln!(s, "linear CKA of signatures: {}", o(r.cka));
    let c = &r.categories;
    let _ = writeln!(s, "{:<24} {:>10} {:>10}", "", "A", "B");
    for (name, p) in [
        ("Cohen's d (results)", c.cohens_d),
        ("Cohen's d (shared)", c.cohens_d_shared),
        ("classifier accuracy", c.accuracy),
        ("chance", c.chance),
    ] {
        let _ = writeln!(s, "{name:<24} {:>10} {:>10}", o(p.a), o(p.b));
    }
    for row in &c.per_category {
        let _ = writeln!(
            s,
            "{:<24} {:>10} {:>10}   recall {} / {}",
            format!("d[{}] (n={})", row.category, row.n),
            o(row.d_a),
            o(row.d_b),
            o(row.recall_a),
            o(row.recall_b)
        );
    }
    match r.expert_matching.done() {
        Some(em) => {
            let _ = writeln!(
                s,
                "expert matching: {} of {} experts relabelled",
                em.moved,
                em.layers.iter().map(|l| l.assignment.len()).sum::<usize>()
            );
        }
        None => {
            let _ = writeln!(
                s,
                "expert matching: {}",
                r.expert_matching.why_missing().unwrap_or_default()
            );
        }
    }
    match r.matched_drift.done() {
        Some(d) => {
            let _ = writeln!(
                s,
                "drift: mean JS {:.6} bits as numbered, {:.6} bits matched; mean shift {} / {}",
                d.unmatched.mean_js_bits,
                d.matched.mean_js_bits,
                o(d.unmatched.mean_shift),
                o(d.matched.mean_shift)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "matched drift: {}",
                r.matched_drift.why_missing().unwrap_or_default()
            );
        }
    }
    s
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // One writer per output directory, held until the files are in place.
    let _lock = args.out.as_deref().map(OutLock::acquire).transpose()?;
    let bar = CliProgress::with_spinner(args.quiet, "compare-models: reading analyses");
    let out = compare_models(
        &CompareModelsOptions {
            a: args.a.clone(),
            b: args.b.clone(),
            traces_a: args.traces_a.clone(),
            traces_b: args.traces_b.clone(),
            stats: CrossModelOptions {
                reps: args.reps,
                seed: args.seed,
            },
        },
        &bar,
    )?;
    drop(bar);
    let json = serde_json::to_string_pretty(&out.report)? + "\n";
    // The output files appear together or not at all.
    let mut batch = Batch::new();
    if let Some(p) = args.json.file() {
        batch.add(p, json.clone())?;
    }
    if let Some(dir) = &args.svg_dir {
        batch.add(
            dir.join("rsa_scatter.svg"),
            rsa_scatter(&out.report, &out.sim_a, &out.sim_b, &out.within),
        )?;
        for which in ["cka", "rsa"] {
            if let Some(svg) = layer_heatmap(&out.report, which) {
                batch.add(dir.join(format!("layer_{which}.svg")), svg)?;
            }
        }
    }
    if let Some(dir) = &args.out {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        batch.add(
            dir.join("report.html"),
            render_html(&CrossModelPage {
                report: &out.report,
                sim_a: &out.sim_a,
                sim_b: &out.sim_b,
                within: &out.within,
                command: &command,
            }),
        )?;
    }
    batch.commit()?;
    if args.json.to_stdout() {
        print!("{json}");
    } else if !args.quiet {
        print!("{}", summary(&out.report));
    }
    Ok(())
}
