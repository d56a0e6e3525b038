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

impl TraceError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TraceError::Io {
            path: path.into(),
            source,
        }
    }

    /// Invalid content at line `line` (from 1) of `path`.
    pub fn invalid(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        TraceError::Invalid {
            path: path.into(),
            line,
            message: message.into(),
        }
    }

    /// Invalid content of the whole file `path`.
    pub fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TraceError::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
