//! `moe-xray compare-models A B [C …]`: cross-model comparison of analyses of the same prompt set
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

use moe_xray_pipeline::compare_models::{
    compare_many, compare_models, CompareManyOptions, CompareModelsOptions,
};
use moe_xray_pipeline::outdir::{Batch, OutLock};
use moe_xray_report::crossmodel::{
    drift_figure, layer_heatmap, render_html, rsa_scatter, CrossModelPage, DRIFT_ID,
};
use moe_xray_report::crossmodel_multi;
use moe_xray_stats::crossmodel::{CrossModelOptions, CrossModelReport, MultiModelReport};

use super::health::JsonArgs;
use crate::progress::CliProgress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Analysis directories (results.json + signatures.csv, from `analyze` or `run`) of two or
    /// more runs of the same prompt set (any family, layers and experts). Two runs give the
    /// two-run comparison; three or more compare every pair on the prompts all runs share and
    /// give the N × N matrices (JSON schema docs/crossmodel-multi.schema.json).
    #[arg(value_name = "RUN", num_args = 2.., required = true)]
    pub runs: Vec<PathBuf>,
    /// Traces of the first run for the matched drift (trace file or directory; default
    /// RUN/traces). Two runs only; with more, use --traces.
    #[arg(long, value_name = "PATH")]
    pub traces_a: Option<PathBuf>,
    /// Traces of the second run (default RUN/traces). Two runs only.
    #[arg(long, value_name = "PATH")]
    pub traces_b: Option<PathBuf>,
    /// Traces of each run for the matched drift, given once per run in the order of the runs
    /// (default RUN/traces).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["traces_a", "traces_b"])]
    pub traces: Vec<PathBuf>,
    /// Mantel permutations (and repetitions of the drift's permutation test; 0 = skip).
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Seed of the permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub json: JsonArgs,
    /// Write the figures into DIR: two runs: rsa_scatter.svg, layer_cka.svg, layer_rsa.svg and
    /// drift.svg; more: matrix_rsa.svg, matrix_cka.svg and drift_R<i>_R<j>.svg per pair of the
    /// same architecture.
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

/// The human-readable summary of an N-run comparison.
pub fn summary_many(r: &MultiModelReport) -> String {
    let mut s = String::new();
    for (i, m) in r.models.iter().enumerate() {
        let _ = writeln!(
            s,
            "R{}: {} ({}{} MoE layers x {} experts, {} prompts)",
            i + 1,
            m.label,
            m.family
                .as_deref()
                .map(|f| format!("{f}, "))
                .unwrap_or_default(),
            m.num_layers,
            m.num_experts,
            m.num_prompts
        );
    }
    let _ = writeln!(s, "shared by every run: {} prompts", r.shared_prompts);
    let _ = writeln!(
        s,
        "{:<10} {:>10} {:>10} {:>10}  matched drift (mean JS bits, as numbered -> matched)",
        "pair", "RSA", "Mantel p", "CKA"
    );
    for p in &r.pairs {
        let c = &p.comparison;
        let drift = match c.matched_drift.done() {
            Some(d) => format!(
                "{:.6} -> {:.6}",
                d.unmatched.mean_js_bits, d.matched.mean_js_bits
            ),
            None if c.same_architecture => "(no traces)".into(),
            None => "(different architectures)".into(),
        };
        let _ = writeln!(
            s,
            "{:<10} {:>10} {:>10} {:>10}  {drift}",
            format!("R{} x R{}", p.a + 1, p.b + 1),
            o(c.rsa.spearman),
            o(c.rsa.mantel.done().map(|m| m.p)),
            o(c.cka)
        );
    }
    let head: String = (0..r.models.len())
        .map(|i| format!(" {:>10}", format!("R{}", i + 1)))
        .collect();
    let _ = writeln!(s, "{:<24}{head}", "");
    type Get = fn(&moe_xray_stats::crossmodel::ModelSeparation) -> Option<f64>;
    let rows: [(&str, Get); 4] = [
        ("Cohen's d (results)", |m| m.cohens_d),
        ("Cohen's d (shared)", |m| m.cohens_d_shared),
        ("classifier accuracy", |m| m.accuracy),
        ("chance", |m| m.chance),
    ];
    for (name, get) in rows {
        let cells: String = r
            .separation
            .iter()
            .map(|m| format!(" {:>10}", o(get(m))))
            .collect();
        let _ = writeln!(s, "{name:<24}{cells}");
    }
    s
}

fn run_many(args: Args) -> anyhow::Result<()> {
    if args.traces_a.is_some() || args.traces_b.is_some() {
        anyhow::bail!(
            "--traces-a / --traces-b name the traces of two runs; with {} runs give --traces once per run, in the order of the runs",
            args.runs.len()
        );
    }
    let _lock = args.out.as_deref().map(OutLock::acquire).transpose()?;
    let bar = CliProgress::with_spinner(args.quiet, "compare-models: reading analyses");
    let out = compare_many(
        &CompareManyOptions {
            runs: args.runs.clone(),
            traces: args.traces.iter().cloned().map(Some).collect(),
            stats: CrossModelOptions {
                reps: args.reps,
                seed: args.seed,
            },
        },
        &bar,
    )?;
    drop(bar);
    let r = &out.report;
    let json = serde_json::to_string_pretty(r)? + "\n";
    let mut batch = Batch::new();
    if let Some(p) = args.json.file() {
        batch.add(p, json.clone())?;
    }
    if let Some(dir) = &args.svg_dir {
        for which in ["rsa", "cka"] {
            if let Some(svg) = crossmodel_multi::matrix_heatmap(r, which) {
                batch.add(dir.join(format!("matrix_{which}.svg")), svg)?;
            }
        }
        for p in &r.pairs {
            let id = crossmodel_multi::pair_drift_id(p.a, p.b);
            if let Some(svg) = drift_figure(&p.comparison, &id) {
                batch.add(
                    dir.join(format!("drift_R{}_R{}.svg", p.a + 1, p.b + 1)),
                    svg,
                )?;
            }
        }
    }
    if let Some(dir) = &args.out {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        batch.add(
            dir.join("report.html"),
            crossmodel_multi::render_html(&crossmodel_multi::MultiModelPage {
                report: r,
                command: &command,
            }),
        )?;
    }
    batch.commit()?;
    if args.json.to_stdout() {
        print!("{json}");
    } else if !args.quiet {
        print!("{}", summary_many(r));
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.runs.len() > 2 {
        return run_many(args);
    }
    let (a, b) = match args.runs.as_slice() {
        [a, b] => (a.clone(), b.clone()),
        _ => anyhow::bail!("compare-models takes at least two analysis directories"),
    };
    let (traces_a, traces_b) = match args.traces.as_slice() {
        [] => (args.traces_a.clone(), args.traces_b.clone()),
        [ta, tb] => (Some(ta.clone()), Some(tb.clone())),
        t => anyhow::bail!(
            "{} --traces paths for 2 runs: give one per run, in the order of the runs",
            t.len()
        ),
    };
    // One writer per output directory, held until the files are in place.
    let _lock = args.out.as_deref().map(OutLock::acquire).transpose()?;
    let bar = CliProgress::with_spinner(args.quiet, "compare-models: reading analyses");
    let out = compare_models(
        &CompareModelsOptions {
            a,
            b,
            traces_a,
            traces_b,
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
        if let Some(svg) = drift_figure(&out.report, DRIFT_ID) {
            batch.add(dir.join("drift.svg"), svg)?;
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
