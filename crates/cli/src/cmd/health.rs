//! `moe-xray health`: routing health of traces (expert load balance, dead/cold experts, router
//! entropy and top-k margin, co-activation), optionally the mutual information between routing
//! signatures and task. Definitions: docs/health.md.

use std::path::{Path, PathBuf};

use anyhow::bail;
use moe_xray_health::mi::MiOptions;
use moe_xray_health::{output, HealthOptions};
use moe_xray_pipeline::health::{health, Dims, HealthRunOptions};
use moe_xray_pipeline::outdir::{Batch, OutLock};
use moe_xray_trace::TokenType;

use crate::progress::CliProgress;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trace files (.jsonl, .jsonl.gz, .jsonl.zst; records, flat events or counts; .parquet) or
    /// run directories containing them (with manifest.json), or Hive-partitioned Parquet
    /// dataset directories.
    #[arg(required = true, value_name = "TRACES")]
    pub traces: Vec<PathBuf>,
    #[command(flatten)]
    pub dims: DimsArgs,
    #[command(flatten)]
    pub json: JsonArgs,
    /// No summary table on stdout (warnings and errors still go to stderr) and no progress.
    #[arg(long)]
    pub quiet: bool,
    /// Write CSV files (layers.csv, load.csv, and with per-token input coactivation.csv,
    /// pairs.csv) into DIR.
    #[arg(long, value_name = "DIR")]
    pub csv: Option<PathBuf>,
    /// Write the tables as Parquet (layers.parquet, load.parquet, and with per-token input
    /// coactivation.parquet, pairs.parquet; long.parquet: the whole report as one tidy table;
    /// docs/tables.md) into DIR.
    #[arg(long, value_name = "DIR")]
    pub parquet: Option<PathBuf>,
    /// Write SVG figures (load_heatmap.svg, coactivation_layer<N>.svg) into DIR.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
    /// Decoder layer of the co-activation heatmap (default: the first MoE layer).
    #[arg(long)]
    pub layer: Option<usize>,
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

/// The run's dimensions as `analyze` takes them (`--model DIR` / `--num-layers` /
/// `--num-experts`); shared by `health` and `compare`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DimsArgs {
    /// Model directory: the number of layers and experts are read from its config.json
    /// (needed when the traces have no manifest.json and the last experts are never chosen).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Number of MoE layers L (overrides manifest / config).
    #[arg(long, value_name = "L")]
    pub num_layers: Option<usize>,
    /// Number of experts per layer E (overrides manifest / config).
    #[arg(long, value_name = "E")]
    pub num_experts: Option<usize>,
}

/// The one `--json` convention of `analyze`, `health`, `compare`, `trace` and `synth-model`:
/// `--json` prints the JSON on stdout instead of the human summary; here `--json-out FILE`
/// writes it to FILE (the summary is still printed). `--json FILE`, the older spelling of
/// `--json-out FILE`, still works.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JsonArgs {
    /// Print the report as JSON on stdout instead of the table. (`--json FILE`, the older
    /// spelling of `--json-out FILE`, still works.)
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Write the report as JSON to FILE (the table is still printed).
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    json_out: Option<PathBuf>,
}

impl DimsArgs {
    /// The pipeline's typed dimensions.
    pub fn dims(&self) -> Dims {
        Dims {
            model: self.model.clone(),
            num_layers: self.num_layers,
            num_experts: self.num_experts,
        }
    }
}

impl JsonArgs {
    /// Whether the JSON goes to stdout (instead of the human summary).
    pub fn to_stdout(&self) -> bool {
        self.json.as_deref() == Some(Path::new("-"))
    }

    /// The file the JSON is written to, if any (a deprecation note for `--json FILE`).
    pub fn file(&self) -> Option<&Path> {
        if let Some(p) = self.json.as_deref().filter(|p| *p != Path::new("-")) {
            eprintln!(
                "note: `--json {}` is the older spelling of `--json-out {0}` (`--json` alone prints the JSON on stdout)",
                p.display()
            );
            return Some(p);
        }
        self.json_out.as_deref()
    }
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

pub fn run(args: Args) -> anyhow::Result<()> {
    // One writer per output directory (refused at once); --csv, --parquet and --svg may name the
    // same one.
    let mut locks: Vec<(OutLock, PathBuf)> = Vec::new();
    for dir in [&args.csv, &args.parquet, &args.svg].into_iter().flatten() {
        let same = |d: &Path| match (d.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !locks.iter().any(|(_, d)| same(d)) {
            locks.push((OutLock::acquire(dir)?, dir.clone()));
        }
    }
    let opts = HealthRunOptions {
        traces: args.traces.clone(),
        dims: args.dims.dims(),
        health: HealthOptions {
            token_types: parse_token_types(&args.token_types)?,
            cold_fraction: args.cold_fraction,
            top_pairs: args.top_pairs,
            keep_prompts: args.mi,
        },
        layer: args.layer,
        mi: args.mi.then_some(MiOptions {
            components: args.mi_components,
            bins: args.mi_bins,
            perms: args.perms,
            seed: args.seed,
            knn: args.mi_knn,
        }),
    };
    let bar = CliProgress::with_spinner(args.quiet, "health: reading traces");
    let h = health(&opts, &bar)?;
    let (report, mi) = (&h.report, &h.mi);
    drop(bar);
    let to_stdout_json = args.json.to_stdout();
    let json_file = args.json.file();
    if !to_stdout_json && !args.quiet {
        print!("{}", output::health_table(report));
        if let Some(m) = mi {
            print!("{}", output::mi_text(m));
        }
    }
    // Every file is computed and written to a temporary file first; they appear together.
    let mut batch = Batch::new();
    if let Some(dir) = &args.csv {
        h.stage_csv(dir, &mut batch)?;
    }
    if let Some(dir) = &args.parquet {
        h.stage_parquet(dir, &mut batch)?;
    }
    if let Some(dir) = &args.svg {
        if !h.stage_svg(dir, h.layer, &mut batch)? {
            eprintln!(
                "note: no co-activation heatmap: co-activation needs per-token traces (records or flat events), not counts"
            );
        }
    }
    let mut stdout_json = None;
    if to_stdout_json || json_file.is_some() {
        let text = h.json()?;
        if let Some(path) = json_file {
            batch.add(path, text)?;
        } else {
            stdout_json = Some(text);
        }
    }
    batch.commit()?;
    if let Some(text) = stdout_json {
        print!("{text}");
    }
    Ok(())
}
