//! Routing signatures and the statistics of the study (see `docs/statistics.md`).

pub mod analyze;
pub mod baselines;
pub mod cv;
pub mod error;
pub mod input;
pub mod large_n;
pub mod logreg;
pub mod pca;
pub mod results;
pub mod signature;
pub mod significance;
pub mod similarity;
pub mod tsne;
