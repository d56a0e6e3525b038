//! Routing health for moe-xray: expert load balance (entropy, Gini, Jain, max/mean, dead and cold
//! experts), per-token router entropy and top-k margin, expert co-activation, comparison of two
//! runs (Jensen–Shannon divergence, signature shift, permutation test) and the mutual information
//! between routing signatures and task. Definitions: `docs/health.md`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod compare;
pub mod error;
pub mod exact;
pub mod health;
pub mod input;
pub mod metrics;
pub mod mi;
pub mod output;
pub mod state;

pub use compare::{compare_runs, CompareOptions, CompareReport};
pub use error::{HealthError, Result};
pub use health::{HealthAccumulator, HealthOptions, HealthReport, PromptLoad, TokenRouting};
pub use input::{accumulate_run, resolve_run, resolve_traces, RunInput};
pub use mi::{mutual_information, MiOptions, MiReport};
