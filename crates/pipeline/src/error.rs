//! The pipeline's error type. Each variant keeps the message of the step that failed; the
//! errors of the other crates are passed through unchanged (their message and source).

use moe_xray_health::HealthError;
use moe_xray_model::error::ModelError;
use moe_xray_report::ReportError;
use moe_xray_stats::StatsError;
use moe_xray_trace::TraceError;

/// Result alias of this crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Errors of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An option or input is invalid (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// A file-system operation failed; `context` names the file.
    #[error("{context}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A step failed; `context` says which (e.g. `trace step`, `analysing FILE`).
    #[error("{context}")]
    Context {
        /// The step.
        context: String,
        /// Cause.
        #[source]
        source: Box<PipelineError>,
    },
    /// Trace files, prompts, manifest.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// Model loading, tokenizer, chat template, generation.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Statistics.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// Routing health.
    #[error(transparent)]
    Health(#[from] HealthError),
    /// Figures and report.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// JSON serialisation.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl PipelineError {
    /// An [`PipelineError::Io`] error.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PipelineError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a step's name to an error, like anyhow's `context`.
pub trait ResultExt<T> {
    /// Wraps the error in [`PipelineError::Context`] with the text `f` returns.
    fn step_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<PipelineError>> ResultExt<T> for std::result::Result<T, E> {
    fn step_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| PipelineError::Context {
            context: f().into(),
            source: Box::new(e.into()),
        })
    }
}

/// Adds a file context to an I/O result.
pub(crate) trait IoContext<T> {
    fn io_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| PipelineError::io(f(), e))
    }
}

/// Returns early with [`PipelineError::Invalid`].
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::PipelineError::Invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;
