//! Importers of MoE routing recorded by serving engines (vLLM, SGLang), and of Hugging Face
//! router logits (`hf.rs`, routed by the family's rule from `moe_xray_model::router`), into
//! moe-xray's trace format (`trace.jsonl` + `manifest.json`, see docs/trace-format.md,
//! "Importing routing from serving engines"). No code execution: `.npy`/`.npz` are parsed by a
//! strict reader, torch `.pt` files by a restricted pickle reader that only builds data,
//! safetensors by the `safetensors` crate; JSONL may be gzip / zstd compressed.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod b64;
pub mod config;
pub mod error;
pub mod hf;
pub mod jsonl;
pub mod npy;
pub mod output;
pub mod pickle;
pub mod requests;
pub mod sglang;
pub mod vllm;

pub use config::ModelShape;
pub use error::{ImportError, Result};
pub use output::{ImportStats, Sequence, Staged};

/// The first `N` bytes of `s` as an array. Callers pass exact chunks (`chunks_exact(N)`, or a slice
/// already checked to hold `N` bytes); a shorter slice is a bug and panics.
#[inline]
pub(crate) fn exact_bytes<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}
