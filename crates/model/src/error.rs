//! Errors of the model crate. Every variant names the file or tensor it is about.

use std::path::PathBuf;

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors raised while loading checkpoints or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is invalid (JSON syntax, wrong field type, ...).
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    /// `config.json` has no `model_type` or one this build does not support.
    #[error("{path}: {message}; supported model types: {supported}")]
    UnsupportedModel {
        path: PathBuf,
        message: String,
        supported: String,
    },
    /// A configuration option that is valid for transformers but not supported here.
    #[error("{path}: unsupported configuration: {message}")]
    Unsupported { path: PathBuf, message: String },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("missing tensor `{name}` in checkpoint {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    /// A tensor has a different shape than the configuration implies.
    #[error("tensor `{name}` in {path}: shape mismatch, expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A safetensors file is malformed (truncated, lying header, unsupported dtype, ...).
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// Tokenizer problems (missing file, invalid JSON, encode/decode failure).
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// Chat template problems.
    #[error("chat template ({path}): {message}")]
    ChatTemplate { path: PathBuf, message: String },
    /// A token id outside the model's vocabulary.
    #[error("token id {token} out of range (vocab_size {vocab_size}) in prompt `{prompt_id}`")]
    TokenOutOfRange {
        prompt_id: String,
        token: u32,
        vocab_size: usize,
    },
    /// A prompt does not fit the model's context (`max_position_embeddings`).
    #[error(
        "prompt `{prompt_id}` has {tokens} tokens; with max_new_tokens {max_new_tokens} it needs more \
         positions than the model's max_position_embeddings {max_position_embeddings} (shorten it, \
         lower --max-new-tokens, or cut it with --truncate-prompts left|right)"
    )]
    PromptTooLong {
        prompt_id: String,
        tokens: usize,
        max_new_tokens: usize,
        max_position_embeddings: usize,
    },
    /// The model produced NaN or infinite numbers (broken weights or overflowing activations).
    #[error(
        "non-finite {what} at {where_} for prompt `{prompt_id}` (position {position}): the \
         checkpoint's weights or activations contain NaN or infinity; nothing of this prompt was \
         written"
    )]
    NonFinite {
        prompt_id: String,
        /// "router logits" or "output logits".
        what: &'static str,
        /// "layer N" or "the final layer".
        where_: String,
        position: usize,
    },
    /// Invalid arguments (generation settings, empty prompt, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The routing sink failed (e.g. its output file could not be written).
    #[error(transparent)]
    Sink(#[from] moe_xray_trace::TraceError),
    /// An error from the tensor library.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}
