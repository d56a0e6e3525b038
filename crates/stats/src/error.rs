//! Errors of the statistics crate.

/// Result alias of the stats crate.
pub type Result<T, E = StatsError> = std::result::Result<T, E>;

/// Everything that can go wrong while turning routing counts into statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The input does not allow the analysis (too few prompts or categories, missing labels, ...).
    #[error("invalid analysis input: {0}")]
    InvalidInput(String),
    /// Dimensions of a matrix or vector do not match what the computation needs.
    #[error("dimension mismatch: {0}")]
    Dimension(String),
    /// A numerical routine failed (e.g. an eigendecomposition did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// An error from the trace crate (reading traces while streaming).
    #[error(transparent)]
    Trace(#[from] moe_xray_trace::TraceError),
    /// An error reported by a caller-supplied callback or another module (e.g. the classifier).
    #[error("{0}")]
    Other(String),
}
