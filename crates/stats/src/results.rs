//! `results.json` (schema version 1, see `docs/DESIGN.md`): serde structs, field names exactly as
//! the contract. Non-finite floats (e.g. Cohen's d with zero pooled SD) serialise as `null`.

use crate::input::DroppedPrompt;
use serde::{Deserialize, Serialize};

/// Current `schema_version` of `results.json`.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisResults {
    pub schema_version: u32,
    pub tool_version: String,
    pub input: InputInfo,
    pub settings: Settings,
    pub num_prompts: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub categories: Vec<CategoryCount>,
    pub prompt_ids: Vec<String>,
    pub dropped_prompts: Vec<DroppedPrompt>,
    /// `"exact_pairs"` or `"gram_sums"` (see [`PATH_EXACT`], [`PATH_GRAM`]).
    pub path: String,
    pub similarity: SimilaritySummary,
    pub category_similarity_matrix: CategoryMatrix,
    pub per_layer: Vec<LayerStats>,
    pub baselines: Baselines,
    pub significance: Significance,
    pub pca: Section<PcaResult>,
    pub tsne: Section<serde_json::Value>,
    pub logreg_5fold: Section<serde_json::Value>,
}

/// Name of the all-pairs path in `results.json`.
pub const PATH_EXACT: &str = "exact_pairs";
/// Name of the streaming Gram-sums path in `results.json`.
pub const PATH_GRAM: &str = "gram_sums";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InputInfo {
    pub traces: Vec<String>,
    /// The manifest found beside the traces (free-form JSON), or `{}`.
    pub manifest: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub token_types: Vec<String>,
    pub weighted: bool,
    pub reps: usize,
    pub seed: u64,
    pub perm_reps: usize,
    pub boot_reps: usize,
    pub classifier_perm_reps: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryCount {
    pub name: String,
    pub n: usize,
}

/// `{n, mean, std}` over a set of prompt pairs; `std` has ddof = 1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PairStats {
    pub n: u64,
    pub mean: f64,
    pub std: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SimilaritySummary {
    pub within: PairStats,
    pub across: PairStats,
    pub cohens_d: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CategoryMatrix {
    pub order: Vec<String>,
    pub values: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub within_mean: f64,
    pub across_mean: f64,
    pub cohens_d: f64,
}

/// One null baseline: mean over repetitions of the all-pairs mean similarity `m_r`, its std
/// (ddof = 1) and the mean of the per-repetition pair std `q_r`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BaselineStats {
    pub mean: f64,
    pub std: f64,
    pub pair_std: f64,
    pub reps: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    pub permutation: Section<BaselineStats>,
    pub load_balance_uniform: Section<BaselineStats>,
    pub load_balance_marginal: Section<BaselineStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelPermutation {
    pub reps: usize,
    pub seed: u64,
    pub observed_within_minus_across: f64,
    pub observed_cohens_d: f64,
    pub p_within_minus_across: f64,
    pub p_cohens_d: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub reps: usize,
    pub seed: u64,
    pub confidence: f64,
    /// Percentile CI `[2.5 %, 97.5 %]` of Cohen's d (stratified bootstrap of prompts).
    pub cohens_d_ci95: [f64; 2],
    /// Percentile CI of the out-of-fold classifier accuracy (absent when the classifier was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_ci95: Option<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Significance {
    pub label_permutation: Section<LabelPermutation>,
    pub bootstrap: Section<Bootstrap>,
    pub classifier_permutation: Section<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PcaResult {
    pub explained_variance_ratio: Vec<f64>,
    pub coords: Vec<[f64; 2]>,
}

/// A section that is either computed or skipped with a reason (`{"skipped": "..."}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Section<T> {
    Done(T),
    Skipped { skipped: String },
}

impl<T> Section<T> {
    /// A skipped section with its reason.
    pub fn skipped(reason: impl Into<String>) -> Self {
        Section::Skipped {
            skipped: reason.into(),
        }
    }
    /// The computed value, if any.
    pub fn done(&self) -> Option<&T> {
        match self {
            Section::Done(t) => Some(t),
            Section::Skipped { .. } => None,
        }
    }
}
