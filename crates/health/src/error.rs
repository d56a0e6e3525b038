//! Errors of the health crate.

use moe_xray_trace::TraceError;
use std::path::PathBuf;

/// Result alias of the health crate.
pub type Result<T, E = HealthError> = std::result::Result<T, E>;

/// Every error names the file (and line, when there is one) or the input that is wrong. File and
/// line errors are the trace crate's ([`TraceError`]'s `Io`, `Invalid`, `InvalidFile`), so both
/// crates report them the same way.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// An error reading or writing a file: the trace crate's file/line errors.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// Two inputs that must agree do not (e.g. runs with different layer/expert counts).
    #[error("{0}")]
    Mismatch(String),
    /// Invalid arguments or data passed to a computation.
    #[error("{0}")]
    InvalidInput(String),
}

impl HealthError {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TraceError::io(path, source).into()
    }
    /// Invalid content at line `line` (from 1) of `path`.
    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        line: usize,
        message: impl Into<String>,
    ) -> Self {
        TraceError::invalid(path, line, message).into()
    }
    /// Invalid content of a whole file or directory.
    pub(crate) fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TraceError::invalid_file(path, message).into()
    }
}
