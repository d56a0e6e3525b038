//! The moe-xray pipeline as a library: typed options in, typed results out, for the `moe-xray`
//! command-line tool and any other front end (e.g. a Python package).
//!
//! - [`trace`]: run a checkpoint on a prompt set and record its routing ([`trace::TraceOptions`] →
//!   [`trace::TraceSummary`]): the manifest, `--resume`, the generations file.
//! - [`analyze`]: routing traces → statistics ([`analyze::AnalyzeOptions`] → `Outputs`) and the
//!   output files (`results.json`, `signatures.csv`, `prompt_similarity.csv`).
//! - [`merge`]: sharded analysis: `map` writes one part of the traces' per-prompt counts to a
//!   shard file, `merge` combines shards into exactly the outputs of one `analyze`.
//! - [`health`]: the routing-health step of a study (`health.json`, `health/*.csv`).
//! - [`report`]: figures and `report.html` committed with the rest of an output set.
//! - [`windows`]: routing over time (`--windows W`), the trace read per window of generated
//!   tokens.
//! - [`study`]: [`study::run_study`] chains them: trace → analysis → health → report.
//! - [`outdir`]: one writer per output directory ([`outdir::OutLock`]) and output sets that appear
//!   all together or not at all ([`outdir::Batch`]).
//!
//! Progress goes through the [`Progress`] trait (the CLI draws bars with it); nothing here prints
//! except [`Progress::warn`]'s default.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod ablate;
pub mod analyze;
pub mod compare_models;
pub mod confound;
pub mod error;
pub mod health;
pub mod merge;
pub mod outdir;
pub mod report;
pub mod study;
pub mod trace;
pub mod windows;

pub use error::{PipelineError, Result};

/// Installs the readers of the trace forms that live outside `moe-xray-trace` (Parquet files
/// and Hive-partitioned Parquet datasets, `moe_xray_parquet`), so that every reader of traces
/// (analyze, health, compare, map) accepts them. Idempotent; the pipeline's entry points call it.
pub fn install_trace_formats() {
    moe_xray_parquet::trace_io::install();
}

/// Progress and notices of a long pipeline step. Every method has a default (nothing, or a
/// warning on stderr), so an implementation overrides only what it shows.
pub trait Progress {
    /// A notice for the user (stage headers such as `[1/4] tracing routing -> DIR`, a resumed
    /// run's repairs, the trace summary of a study).
    fn message(&self, _msg: &str) {}
    /// The current step of a step without a natural counter (replaces the previous text).
    fn step(&self, _msg: &str) {}
    /// A warning that must reach the user even when progress is hidden.
    fn warn(&self, msg: &str) {
        eprintln!("{msg}");
    }
    /// Tracing starts `total` prompts.
    fn prompts_begin(&self, _total: u64) {}
    /// One prompt finished; `tokens_per_second` is the throughput so far.
    fn prompt_done(&self, _tokens_per_second: f64) {}
    /// Tracing finished successfully (on an error it is not called: implementations clear
    /// their bars when dropped).
    fn prompts_end(&self) {}
}

/// Shows nothing; warnings still go to stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
