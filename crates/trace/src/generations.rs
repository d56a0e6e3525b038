//! `generations.jsonl`, written by `trace` beside the routing trace: one line per prompt with its
//! prompt and generated token ids and the decoded text (format in docs/trace-format.md).

use serde::{Deserialize, Serialize};

/// One line of `generations.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationLine {
    pub prompt_id: String,
    pub category: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    /// The prompt's token count before `--truncate-prompts` cut it (absent when not cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_truncated_from: Option<usize>,
}
