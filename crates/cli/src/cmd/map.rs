//! `moe-xray map`: the map step of a sharded analysis — reads traces as `analyze` does and writes
//! the per-prompt counts of one part of their prompts (or their per-category Gram sums,
//! `--gram-sums`; and the health accumulator, `--health`) to a shard file, which `moe-xray
//! merge` combines (docs/statistics.md, "Sharded analysis"). The work is
//! `moe_xray_pipeline::merge::map_shard_with`.

use anyhow::{bail, Context, Result};
use moe_xray_pipeline::analyze::AnalyzeOptions;
use moe_xray_pipeline::merge::{map_shard_with, MapContents};
use std::path::PathBuf;

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
    /// Keep part I of N (0 <= I < N): the prompts whose first-appearance index is I mod N.
    #[arg(long, value_name = "I/N", default_value = "0/1")]
    pub part: String,
    /// The shard file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the health accumulator of the part's prompts (a second pass over the traces,
    /// read as `moe-xray health` reads them), for `moe-xray merge --health DIR`.
    #[arg(long)]
    pub health: bool,
    /// Write the per-category Gram sums (n, S, the upper triangle of M, norm sums) and the
    /// prompt ids instead of the per-prompt counts: merge cost independent of the number of
    /// prompts, but merge gives only the gram_sums path (no baselines, significance, PCA,
    /// t-SNE, classifier or lexical baseline).
    #[arg(long)]
    pub gram_sums: bool,
    /// No summary and no progress.
    #[arg(long)]
    pub quiet: bool,
}

/// `I/N` with 0 <= I < N.
pub fn parse_part(s: &str) -> Result<(u64, u64)> {
    let (i, n) = s
        .split_once('/')
        .with_context(|| format!("--part {s:?}: expected I/N, e.g. 0/4"))?;
    let i: u64 = i
        .trim()
        .parse()
        .with_context(|| format!("--part {s:?}: I is not an integer"))?;
    let n: u64 = n
        .trim()
        .parse()
        .with_context(|| format!("--part {s:?}: N is not an integer"))?;
    if n == 0 || i >= n {
        bail!("--part {s:?}: need 0 <= I < N (parts are numbered from 0)");
    }
    Ok((i, n))
}

pub fn run(args: Args) -> Result<()> {
    let (part, parts) = parse_part(&args.part)?;
    let mut opts = AnalyzeOptions::new(args.traces.clone());
    opts.prompts = args.prompts.clone();
    opts.model = args.model.clone();
    opts.num_layers = args.num_layers;
    opts.num_experts = args.num_experts;
    opts.top_k = args.top_k;
    opts.token_types = super::analyze::token_types(&args.token_types)?;
    opts.weighted = args.weighted;
    let progress = CliProgress::with_spinner(args.quiet, "map: reading traces");
    let contents = MapContents {
        health: args.health,
        gram_sums: args.gram_sums,
    };
    let s = map_shard_with(&opts, contents, part, parts, &args.out, &progress)?;
    drop(progress);
    if !args.quiet {
        println!(
            "map: part {part}/{parts}: {} of {} prompts, {} bytes -> {}",
            s.prompts_written,
            s.prompts_read,
            s.bytes,
            args.out.display()
        );
    }
    Ok(())
}
