//! `moe-xray health`: routing health of traces (expert load balance, dead/cold experts, router
//! entropy and top-k margin, co-activation), optionally the mutual information between routing
//! signatures and task. Definitions: docs/health.md.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use moe_xray_health::mi::{mutual_information, signatures_with_labels, MiOptions};
use moe_xray_health::{accumulate_run, output, resolve_traces, svg, HealthOptions};
use moe_xray_trace::{write_atomic, TokenType};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trace files (.jsonl, .jsonl.gz, .jsonl.zst; records, flat events or counts) or run
    /// directories containing them (with manifest.json).
    #[arg(required = true, value_name = "TRACES")]
    pub traces: Vec<PathBuf>,
    /// Write the report as JSON to FILE, or to stdout (instead of the table) when no FILE is given.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
    /// Write CSV files (layers.csv, load.csv, and with per-token input coactivation.csv,
    /// pairs.csv) into DIR.
    #[arg(long, value_name = "DIR")]
    pub csv: Option<PathBuf>,
    /// Write SVG figures (load_heatmap.svg, coactivation_layer<N>.svg) into DIR.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
    /// Layer of the co-activation heatmap.
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Cold expert: selected but share < FRACTION × uniform share (1/E).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1)]
    pub cold_fraction: f64,
    /// Strongest co-activation pairs listed per layer.
    #[arg(long, default_value_t = 10)]
    pub top_pairs: usize,
    /// Token types counted (comma-separated: prompt, generation).
    #[arg(long, value_delimiter = ',', default_value = "prompt,generation")]
    pub token_types: Vec<String>,
    /// Also estimate the mutual information I(signature; task) (needs prompt categories).
    #[arg(long)]
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
    /// Label permutations for the --mi bias correction and p-value.
    #[arg(long, default_value_t = 1000)]
    pub perms: usize,
    /// Seed of the --mi permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(crate) fn parse_token_types(v: &[String]) -> anyhow::Result<Vec<TokenType>> {
    let mut out = Vec::new();
    for s in v {
        let t = match s.trim() {
            "prompt" => TokenType::Prompt,
            "generation" => TokenType::Generation,
            other => {
                bail!("--token-types: unknown token type {other:?} (expected prompt, generation)")
            }
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("--token-types: at least one token type is needed");
    }
    Ok(out)
}

pub(crate) fn write_file(path: &Path, content: &str) -> anyhow::Result<()> {
    write_atomic(path, content.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = HealthOptions {
        token_types: parse_token_types(&args.token_types)?,
        cold_fraction: args.cold_fraction,
        top_pairs: args.top_pairs,
        keep_prompts: args.mi,
    };
    let run = resolve_traces(&args.traces)?;
    if run.manifest.is_none() {
        eprintln!(
            "note: no manifest.json beside the traces: layers and experts are taken from the data (for records/events: highest index seen + 1)"
        );
    }
    let acc = accumulate_run(&run, None, opts)?;
    let report = acc.report();
    if args.layer >= report.num_layers {
        bail!(
            "--layer {} is out of range (the traces have {} layers)",
            args.layer,
            report.num_layers
        );
    }
    let mi = if args.mi {
        let (sigs, labels, dropped) =
            signatures_with_labels(acc.prompts(), report.num_layers, report.num_experts);
        if !dropped.is_empty() {
            eprintln!(
                "--mi: {} prompt(s) left out (first: {} — {})",
                dropped.len(),
                dropped[0].0,
                dropped[0].1
            );
        }
        let m = mutual_information(
            &sigs,
            &labels,
            &MiOptions {
                components: args.mi_components,
                bins: args.mi_bins,
                perms: args.perms,
                seed: args.seed,
                knn: args.mi_knn,
            },
        )
        .context("--mi (mutual information needs prompt categories in the traces)")?;
        Some(m)
    } else {
        None
    };

    let to_stdout_json = args.json.as_deref() == Some(Path::new("-"));
    if !to_stdout_json {
        print!("{}", output::health_table(&report));
        if let Some(m) = &mi {
            print!("{}", output::mi_text(m));
        }
    }
    if let Some(path) = &args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(m) = &mi {
            v["mutual_information"] = serde_json::to_value(m)?;
        }
        let text = serde_json::to_string_pretty(&v)? + "\n";
        if to_stdout_json {
            print!("{text}");
        } else {
            write_file(path, &text)?;
        }
    }
    if let Some(dir) = &args.csv {
        ensure_dir(dir)?;
        write_file(&dir.join("layers.csv"), &output::layers_csv(&report))?;
        write_file(&dir.join("load.csv"), &output::load_csv(&report))?;
        if let Some(c) = output::coactivation_csv(&acc) {
            write_file(&dir.join("coactivation.csv"), &c)?;
        }
        if let Some(p) = output::pairs_csv(&report) {
            write_file(&dir.join("pairs.csv"), &p)?;
        }
    }
    if let Some(dir) = &args.svg {
        ensure_dir(dir)?;
        write_file(&dir.join("load_heatmap.svg"), &svg::load_heatmap(&report))?;
        match acc
            .coactivation(args.layer)
            .and_then(|c| svg::coactivation_heatmap(&report, c, args.layer))
        {
            Some(s) => write_file(&dir.join(format!("coactivation_layer{}.svg", args.layer)), &s)?,
            None => eprintln!(
                "note: no co-activation heatmap: co-activation needs per-token traces (records or flat events), not counts"
            ),
        }
    }
    Ok(())
}
