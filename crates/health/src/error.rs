//! Errors of the health crate.

use std::path::PathBuf;

/// Result alias of the health crate.
pub type Result<T, E = HealthError> = std::result::Result<T, E>;

/// Every error names the file (and line, when there is one) or the input that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// An error of the trace crate (reading, writing).
    #[error(transparent)]
    Trace(#[from] moe_xray_trace::TraceError),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid content at a line of a file (lines count from 1).
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Invalid content of a whole file or directory.
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    /// Two inputs that must agree do not (e.g. runs with different layer/expert counts).
    #[error("{0}")]
    Mismatch(String),
    /// Invalid arguments or data passed to a computation.
    #[error("{0}")]
    InvalidInput(String),
}

impl HealthError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HealthError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        line: usize,
        message: impl Into<String>,
    ) -> Self {
        HealthError::Invalid {
            path: path.into(),
            line,
            message: message.into(),
        }
    }
    pub(crate) fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        HealthError::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
