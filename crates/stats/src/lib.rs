//! Routing signatures and the statistics of the study (see `docs/statistics.md`).
//!
//! Entry points: [`input::build_input`] / [`input::from_counts_table`] to validate counts,
//! [`analyze::analyze`] for the whole `results.json`, [`large_n`] for the streaming Gram-sums path.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod ablation;
pub mod analyze;
pub mod baselines;
pub mod bench;
pub mod crossmodel;
pub mod cv;
pub mod error;
pub mod input;
pub mod large_n;
pub mod lexical;
pub mod logreg;
pub mod pca;
pub mod results;
pub mod shard;
pub mod signature;
pub mod significance;
pub mod similarity;
pub mod tsne;
pub mod windows;

pub use analyze::{analyze, AnalyzeOptions};
pub use error::{Result, StatsError};
pub use results::AnalysisResults;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Stream tags of the random sub-streams (see [`sub_rng`]); documented in `docs/statistics.md`.
pub mod tags {
    pub const PERMUTATION: u64 = 1;
    pub const LOAD_BALANCE_UNIFORM: u64 = 2;
    pub const LOAD_BALANCE_MARGINAL: u64 = 3;
    pub const LABEL_PERMUTATION: u64 = 4;
    pub const BOOTSTRAP: u64 = 5;
    pub const CLASSIFIER_PERMUTATION: u64 = 6;
    pub const ACCURACY_BOOTSTRAP: u64 = 7;
    pub const FOLDS: u64 = 8;
    pub const TSNE: u64 = 9;
    pub const MANTEL: u64 = 10;
}

/// The random stream of repetition `rep` of the computation `tag`: `ChaCha8Rng::seed_from_u64(seed)`
/// switched to stream `(tag << 48) | rep`. Each repetition owns its stream, so results do not
/// depend on which thread runs it.
pub fn sub_rng(seed: u64, tag: u64, rep: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream((tag << 48) | (rep & ((1u64 << 48) - 1)));
    r
}
