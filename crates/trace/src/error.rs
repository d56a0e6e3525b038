//! Errors of the trace crate.

use std::path::PathBuf;

/// Result alias of the trace crate.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

/// Every error names the file (and line, when there is one) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid content at a given line of a file (lines count from 1).
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Invalid content of a whole file (no single line to blame).
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    /// An error raised by a sink while consuming routing decisions.
    #[error("routing sink: {0}")]
    Sink(String),
}
