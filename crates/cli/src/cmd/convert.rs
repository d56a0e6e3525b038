//! `moe-xray convert`: a routing-record trace (JSONL, .gz, .zst, Parquet file or dataset) as one
//! Parquet file (`--to parquet`) or as a Hive-partitioned Parquet dataset
//! `OUT/run=<name>/category=<category>/part-<N>.parquet` (`--to parquet-dataset`) that DuckDB,
//! polars, pandas and Spark read directly. `analyze`, `health`, `compare` and `map` read both back
//! with the same results as on the original trace (docs/trace-format.md, "Parquet"). The output
//! appears complete or not at all. The work is `moe_xray_parquet`'s.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use moe_xray_parquet::dataset::{write_dataset, DEFAULT_ROWS_PER_PART};
use moe_xray_parquet::trace_io::convert_to_file;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum To {
    /// One Parquet file (the manifest in its key-value metadata).
    Parquet,
    /// A Hive-partitioned dataset directory run=<name>/category=<category>/part-<N>.parquet.
    ParquetDataset,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trace files or directories in the records form (`experts`): JSONL (.gz / .zst), a trace
    /// or run directory, a Parquet file or dataset.
    #[arg(required = true, value_name = "TRACES")]
    pub traces: Vec<PathBuf>,
    /// Output form.
    #[arg(long, value_enum)]
    pub to: To,
    /// Output: the Parquet file, or the dataset directory (new or empty).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Run name of the dataset's `run=` partition (default: the manifest's model directory name,
    /// else "trace").
    #[arg(long)]
    pub run: Option<String>,
    /// Prompt file (JSONL or CSV with id, category, text): the category of records without one.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Rows per part file of the dataset (a category's parts are numbered part-0, part-1, ...).
    #[arg(long, default_value_t = DEFAULT_ROWS_PER_PART)]
    pub rows_per_part: u64,
    /// No summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    moe_xray_pipeline::install_trace_formats();
    let input = moe_xray_health::resolve_traces(&args.traces)?;
    let categories: Option<HashMap<String, String>> = match &args.prompts {
        Some(p) => Some(
            moe_xray_trace::read_prompts(p)?
                .into_iter()
                .map(|p| (p.id, p.category))
                .collect(),
        ),
        None => None,
    };
    let manifest = input.manifest.as_ref();
    match args.to {
        To::Parquet => {
            if args.out.exists() {
                bail!("{}: already exists", args.out.display());
            }
            let rows = convert_to_file(&input.paths, manifest, categories.as_ref(), &args.out)?;
            if !args.quiet {
                eprintln!("wrote {rows} routing records -> {}", args.out.display());
            }
        }
        To::ParquetDataset => {
            let run = match &args.run {
                Some(r) => r.clone(),
                None => manifest
                    .and_then(|m| {
                        std::path::Path::new(&m.model)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "trace".to_string()),
            };
            let s = write_dataset(
                &input.paths,
                manifest,
                categories.as_ref(),
                &args.out,
                &run,
                args.rows_per_part,
            )?;
            if !args.quiet {
                eprintln!(
                    "wrote {} routing records of {} prompts in {} categories ({} part files) -> {}/run={}",
                    s.rows,
                    s.prompts,
                    s.partitions,
                    s.parts,
                    args.out.display(),
                    moe_xray_parquet::dataset::escape(&run)
                );
            }
        }
    }
    Ok(())
}
