//! MoE model execution with a routing-capture hook: loading Hugging Face checkpoint directories,
//! the OLMoE forward pass on candle, generation, and synthetic checkpoints.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

pub mod chat;
pub mod config;
pub mod cpu_kernels;
pub mod error;
pub mod generate;
pub mod limits;
pub mod olmoe;
pub mod synth;
pub mod tokenizer;
pub mod weights;
