//! MoE model execution with a routing-capture hook: loading Hugging Face checkpoint directories,
//! the OLMoE forward pass on candle, generation, and synthetic checkpoints.

pub mod chat;
pub mod config;
pub mod cpu_kernels;
pub mod error;
pub mod generate;
pub mod olmoe;
pub mod synth;
pub mod tokenizer;
pub mod weights;
