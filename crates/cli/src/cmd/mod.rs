//! One module per subcommand; each owns its `Args` and `run`.

pub mod ablate;
pub mod analyze;
pub mod bench;
pub mod bench_model;
pub mod compare;
pub mod compare_models;
pub mod convert;
pub mod demo;
pub mod health;
pub mod import;
pub mod map;
pub mod merge;
pub mod run;
pub mod synth_model;
pub mod trace;
