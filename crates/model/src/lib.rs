//! MoE model execution with a routing-capture hook: loading Hugging Face checkpoint directories,
//! one decoder forward pass on candle for every supported MoE family (`families/`), generation,
//! and synthetic checkpoints.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

pub mod chat;
pub mod config;
pub mod control;
pub mod cpu_kernels;
pub mod error;
pub mod families;
pub mod generate;
pub mod gguf;
pub mod limits;
pub mod model;
pub mod mxfp4;
pub mod rope;
pub mod router;
pub mod synth;
pub mod synth_gguf;
pub mod table;
pub mod tokenizer;
pub mod weights;
