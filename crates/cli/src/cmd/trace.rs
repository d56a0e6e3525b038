//! `moe-xray trace`: run an MoE checkpoint (olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2,
//! deepseek_v3, gpt_oss or granitemoe) on a prompt file and record the experts its routers pick
//! for every prompt and generated token at every MoE layer (dense layers have no records; the
//! manifest's `routing` block lists both).
//!
//! Output directory: `trace.jsonl[.gz|.zst]` (`--mode events`), `trace.parquet` (`--format
//! parquet`) or `counts.jsonl[.gz|.zst]` (`--mode counts`), `generations.jsonl` and
//! `manifest.json`. Every input is validated (model,
//! tokenizer, prompts, token ids) before anything is written. Each prompt is made durable when it
//! finishes: its generation line is appended (fsync) first, then its trace block; `--resume`
//! skips the prompts whose trace block is complete and never appends a generation line twice.
//!
//! By default the last generated token is also run through the model (one extra forward step,
//! logits discarded) so that it has routing records; `--hf-generate-compat` skips it exactly like
//! transformers' `generate()` does.
//!
//! The work is done by `moe_xray_pipeline::trace`; this module parses the flags, draws the
//! progress bar and prints the summary.

use std::path::PathBuf;

use anyhow::Result;
use moe_xray_model::generate::Truncate;
use moe_xray_pipeline::trace::{self as pipeline_trace, TraceOptions};

use crate::progress::CliProgress;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One routing record per (token, layer).
    Events,
    /// Per-prompt L×E expert counts only (very large runs).
    Counts,
}

/// `--format`: the trace file's format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSONL lines (trace.jsonl[.gz|.zst]), durable per prompt, resumable.
    Jsonl,
    /// One Parquet file trace.parquet (routing records, the manifest in its metadata), moved
    /// into place with generations.jsonl and manifest.json when the run ends; not resumable.
    Parquet,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    Gz,
    Zst,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout (config.json, safetensors, tokenizer.json) of
    /// a supported MoE family (`model_type` olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2,
    /// deepseek_v3, gpt_oss, granitemoe), or a llama.cpp GGUF file (`.gguf`, or any part of a
    /// split `-0000N-of-0000M.gguf` set; a tokenizer.json beside it overrides its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt file (JSONL `{"id","category","text"}` or CSV `id,category,text`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "events")]
    pub mode: Mode,
    /// Compress the trace file.
    #[arg(long, value_enum)]
    pub compress: Option<Compress>,
    /// Trace file format (parquet: --mode events only, no --compress, no --resume).
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Also record the router's full score vector of every (token, MoE layer): softmax
    /// probabilities, or sigmoid scores for deepseek_v3 (the manifest's `routing.scores`).
    #[arg(long)]
    pub record_probs: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Prompts run together (ragged batching: results do not depend on it). Larger batches
    /// read each expert's weights once for more tokens (at real model sizes a decode step is
    /// bound by reading the experts from memory); a prompt's trace is written when its batch
    /// finishes, so `--resume` after a crash redoes at most one batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute threads, 1 to 1024 (default: all cores). Results do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Keep generating after EOS until --max-new-tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Do not route the last generated token (exactly the tokens transformers' generate() routes).
    #[arg(long)]
    pub hf_generate_compat: bool,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold (with --temperature).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampling streams (one per prompt, by its position in the prompt file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue an interrupted run in the same output directory.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Compute dtype (default: the checkpoint's stored dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Exact mode: compute in f32 with quantised weights (GGUF quants, MXFP4) dequantised
    /// exactly, so that routing can be compared with transformers on the dequantised weights.
    #[arg(long, conflicts_with = "dtype")]
    pub exact: bool,
    /// Cut prompts that do not fit the context (prompt + --max-new-tokens >
    /// max_position_embeddings) on this side instead of refusing them; recorded in the manifest
    /// and in each cut prompt's generation line.
    #[arg(long, value_enum)]
    pub truncate_prompts: Option<TruncateSide>,
}

/// `--truncate-prompts`: which end of a prompt longer than the context to cut.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TruncateSide {
    /// Drop the first tokens (keep the end).
    Left,
    /// Drop the last tokens (keep the beginning).
    Right,
}

impl From<TruncateSide> for Truncate {
    fn from(t: TruncateSide) -> Self {
        match t {
            TruncateSide::Left => Truncate::Left,
            TruncateSide::Right => Truncate::Right,
        }
    }
}

impl From<Mode> for pipeline_trace::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Events => pipeline_trace::Mode::Events,
            Mode::Counts => pipeline_trace::Mode::Counts,
        }
    }
}

impl From<Compress> for pipeline_trace::Compress {
    fn from(c: Compress) -> Self {
        match c {
            Compress::Gz => pipeline_trace::Compress::Gz,
            Compress::Zst => pipeline_trace::Compress::Zst,
        }
    }
}

impl Args {
    /// The typed options of the pipeline's trace step.
    pub fn options(&self) -> TraceOptions {
        TraceOptions {
            model: self.model.clone(),
            prompts: self.prompts.clone(),
            out: self.out.clone(),
            mode: self.mode.into(),
            compress: self.compress.map(Into::into),
            format: match self.format {
                Format::Jsonl => pipeline_trace::TraceFormat::Jsonl,
                Format::Parquet => pipeline_trace::TraceFormat::Parquet,
            },
            record_probs: self.record_probs,
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            threads: self.threads,
            chat_template: self.chat_template,
            ignore_eos: self.ignore_eos,
            hf_generate_compat: self.hf_generate_compat,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            resume: self.resume,
            dtype: if self.exact {
                Some(pipeline_trace::EXACT.to_string())
            } else {
                self.dtype.clone()
            },
            truncate_prompts: self.truncate_prompts.map(Into::into),
            router_control: None,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let progress = CliProgress::new(args.quiet);
    let summary = pipeline_trace::trace(&args.options(), &progress)?;
    drop(progress);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else if !args.quiet {
        eprintln!("{}", summary.line());
    }
    Ok(())
}
