//! Errors of the Parquet layer: every one names the file (and the column where there is one).

use std::path::PathBuf;

/// What went wrong reading or writing Parquet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not what moe-xray expects (schema, types, values).
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
