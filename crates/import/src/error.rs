//! Errors of the import crate. Every error names the file and, where there is one, the record
//! (JSONL line, array name, pickle object) that is wrong.

use std::path::PathBuf;

use moe_xray_trace::TraceError;

/// Result alias of the import crate.
pub type Result<T, E = ImportError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid content of one record of a file (a JSONL line, an array of an .npz, ...).
    #[error("{path}: {record}: {message}")]
    Invalid {
        path: PathBuf,
        record: String,
        message: String,
    },
    /// Invalid content of a whole file.
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    /// Inconsistent options (no file to blame).
    #[error("{0}")]
    Usage(String),
    /// An error of the trace crate (manifest / output writing).
    #[error(transparent)]
    Trace(#[from] TraceError),
}

impl ImportError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImportError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(
        path: impl Into<PathBuf>,
        record: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ImportError::Invalid {
            path: path.into(),
            record: record.into(),
            message: message.into(),
        }
    }

    pub fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ImportError::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
