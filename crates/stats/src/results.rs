//! The `results.json` schema: the typed sections that `analyze` writes and every reader (report,
//! Python package) parses. Defined only here; `docs/results.schema.json` is generated from these
//! types (test `schema_snapshot` in `crates/stats/tests/results_schema.rs`) and the stability
//! policy of [`SCHEMA_VERSION`] is in `docs/statistics.md` ("results.json schema").
//!
//! Byte layout: fields are written in declaration order, so each struct lists its fields in the
//! order of the files written before these sections were typed (the classifier and t-SNE
//! sections, then free-form JSON, are in name order). Floats use serde_json's shortest
//! round-trip form; non-finite floats (e.g. Cohen's d with zero pooled SD) are written as `null`
//! and read back as NaN, so parsing a file (with exact float parsing, serde_json's
//! `float_roundtrip`) and serialising it again gives the same bytes.

use crate::input::DroppedPrompt;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// Current `schema_version` of `results.json` (the major version: bumped when a field is
/// removed, renamed or changes type or meaning; adding an optional field does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// Every `schema_version` this build reads.
pub const SUPPORTED_SCHEMA_VERSIONS: &[u32] = &[SCHEMA_VERSION];

/// The whole `results.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "moe-xray results.json")]
pub struct AnalysisResults {
    /// Major version of this schema (see `docs/statistics.md`, "results.json schema").
    pub schema_version: u32,
    /// Version of moe-xray that wrote the file.
    pub tool_version: String,
    /// Trace files and their capture manifest.
    pub input: InputInfo,
    /// Analysis settings.
    pub settings: Settings,
    /// N: prompts analysed (after dropping).
    pub num_prompts: usize,
    /// L: MoE layers (the layers of the signatures).
    pub num_layers: usize,
    /// Decoder-layer index of each of the `num_layers` signature layers, ascending, when some
    /// decoder layers are dense (no router; the manifest's `routing.dense_layers`); absent when
    /// every decoder layer is an MoE layer and signature layer l is decoder layer l.
    /// `per_layer[].layer` is the decoder-layer index either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_layers: Option<Vec<usize>>,
    /// E: experts per layer.
    pub num_experts: usize,
    /// k: experts selected per token (0 when unknown, only possible on the `gram_sums` path).
    pub top_k: usize,
    /// Categories in name order with their prompt counts.
    pub categories: Vec<CategoryCount>,
    /// Prompt ids in analysis order (the row order of every per-prompt array).
    pub prompt_ids: Vec<String>,
    /// Prompts left out, with the reason.
    pub dropped_prompts: Vec<DroppedPrompt>,
    /// How the pair statistics were computed.
    pub path: AnalysisPath,
    /// Within- and across-category pair similarity and Cohen's d.
    pub similarity: SimilaritySummary,
    /// Mean similarity between the prompts of two categories.
    pub category_similarity_matrix: CategoryMatrix,
    /// The pair statistics per layer.
    pub per_layer: Vec<LayerStats>,
    /// Null baselines.
    pub baselines: Baselines,
    /// Significance tests.
    pub significance: Significance,
    /// PCA of the signatures.
    pub pca: Section<PcaResult>,
    /// t-SNE embedding of the signatures.
    pub tsne: Section<TsneResult>,
    /// Cross-validated logistic-regression classifier of the categories.
    pub logreg_5fold: Section<LogRegResult>,
    /// Confound control: the same classifier (same folds, solver and standardisation) on
    /// bag-of-token-id features of the counted tokens: what token identity alone gives. Absent
    /// in files written before it was added (and when no token ids were supplied to the
    /// library); skipped for traces without token ids (counts form) and on the `gram_sums` path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical_baseline: Option<Section<LexicalBaseline>>,
    /// Confound control (`--token-matched`): the similarity statistics on tokens shared by every
    /// category, or after per-token-id residualisation. Absent unless requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_matched: Option<Section<TokenMatched>>,
    /// Routing over time (`--windows W`): the statistics per window of W generated tokens, the
    /// prompt and generation phases, and the drift between windows. Absent unless requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Section<RoutingWindows>>,
    /// Random-router control (`run --control random-router`): the similarity statistics and
    /// classifier of the same model and prompts with every router weight re-drawn. Absent
    /// unless requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_router_control: Option<Section<RandomRouterControl>>,
}

/// Which computation produced the pair statistics (`"path"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnalysisPath {
    /// All pairs from the N×N similarity matrix; every section computed.
    #[default]
    ExactPairs,
    /// Per-category sums and Gram matrices (large N); the sections that need all prompts in
    /// memory are skipped.
    GramSums,
}

impl AnalysisPath {
    /// The name written in `results.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            AnalysisPath::ExactPairs => "exact_pairs",
            AnalysisPath::GramSums => "gram_sums",
        }
    }
}

impl std::fmt::Display for AnalysisPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `input`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct InputInfo {
    /// Trace files, as given on the command line.
    pub traces: Vec<String>,
    /// The capture manifest found beside the first trace (`docs/trace-format.md`, keys in name
    /// order), or `{}`.
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub manifest: serde_json::Value,
}

/// `settings`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Settings {
    /// Token types counted (`prompt`, `generation`).
    pub token_types: Vec<String>,
    /// Router weights summed instead of selections counted.
    pub weighted: bool,
    /// Repetitions of each null baseline.
    pub reps: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Label permutations of the similarity test.
    pub perm_reps: usize,
    /// Bootstrap resamples.
    pub boot_reps: usize,
    /// Label permutations of the classifier test.
    pub classifier_perm_reps: usize,
}

/// A category and its number of prompts (after dropping).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct CategoryCount {
    pub name: String,
    pub n: usize,
}

/// `{n, mean, std}` over a set of prompt pairs; `std` has ddof = 1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct PairStats {
    /// Number of unordered pairs.
    pub n: u64,
    /// Mean similarity (`null` when n = 0).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub mean: f64,
    /// Standard deviation over the pairs, ddof = 1 (`null` when n < 2).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub std: f64,
}

/// `similarity`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct SimilaritySummary {
    /// Pairs of the same category.
    pub within: PairStats,
    /// Pairs of different categories.
    pub across: PairStats,
    /// (mean_within − mean_across) / pooled SD (`null` when the pooled SD is zero).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub cohens_d: f64,
}

/// `category_similarity_matrix`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct CategoryMatrix {
    /// Category names, sorted by name.
    pub order: Vec<String>,
    /// `values[a][b]`: mean similarity between prompts of categories a and b (`null` on the
    /// diagonal of a category with one prompt).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Vec<Vec<Option<f64>>>")]
    pub values: Vec<Vec<f64>>,
}

/// One entry of `per_layer`: the pair statistics with the layer's cosine instead of sim.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct LayerStats {
    pub layer: usize,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub within_mean: f64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub across_mean: f64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub cohens_d: f64,
}

/// One null baseline: mean over repetitions of the all-pairs mean similarity `m_r`, its std
/// (ddof = 1) and the mean of the per-repetition pair std `q_r`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct BaselineStats {
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub mean: f64,
    /// `null` with a single repetition.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub std: f64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub pair_std: f64,
    pub reps: usize,
    pub seed: u64,
}

/// `baselines`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Baselines {
    /// Expert axis permuted per prompt and layer.
    pub permutation: Section<BaselineStats>,
    /// Each token picks k distinct experts uniformly.
    pub load_balance_uniform: Section<BaselineStats>,
    /// Each token draws k experts in proportion to the pooled per-layer load.
    pub load_balance_marginal: Section<BaselineStats>,
}

/// `significance.label_permutation`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct LabelPermutation {
    pub reps: usize,
    pub seed: u64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub observed_within_minus_across: f64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub observed_cohens_d: f64,
    /// (1 + #{permuted ≥ observed}) / (1 + reps) for within − across.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub p_within_minus_across: f64,
    /// The same for Cohen's d.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub p_cohens_d: f64,
}

/// `significance.bootstrap`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Bootstrap {
    pub reps: usize,
    pub seed: u64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub confidence: f64,
    /// Percentile CI `[2.5 %, 97.5 %]` of Cohen's d (stratified bootstrap of prompts).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "[Option<f64>; 2]")]
    pub cohens_d_ci95: [f64; 2],
    /// Percentile CI of the out-of-fold classifier accuracy (absent when the classifier was
    /// skipped or no resamples were requested).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan::de"
    )]
    #[schemars(with = "Option<[Option<f64>; 2]>")]
    pub accuracy_ci95: Option<[f64; 2]>,
}

/// `significance.classifier_permutation`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct ClassifierPermutation {
    /// Mean over permutations of the mean fold accuracy.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub null_mean: f64,
    /// Mean fold accuracy with the true labels.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub observed_accuracy: f64,
    /// (1 + #{permuted accuracy ≥ observed}) / (1 + reps).
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub p: f64,
    pub reps: usize,
    /// `settings.seed` (the stream is derived from it, see `docs/statistics.md`).
    pub seed: u64,
}

/// `significance`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Significance {
    pub label_permutation: Section<LabelPermutation>,
    pub bootstrap: Section<Bootstrap>,
    pub classifier_permutation: Section<ClassifierPermutation>,
}

/// `pca`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct PcaResult {
    /// Share of the total variance of the first min(10, N − 1) components.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Vec<Option<f64>>")]
    pub explained_variance_ratio: Vec<f64>,
    /// Scores on the first two components, in `prompt_ids` order.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Vec<[Option<f64>; 2]>")]
    pub coords: Vec<[f64; 2]>,
}

/// `tsne`: the embedding and the diagnostics scikit-learn reports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct TsneResult {
    /// 2-D embedding, in `prompt_ids` order.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Vec<[Option<f64>; 2]>")]
    pub coords: Vec<[f64; 2]>,
    /// scikit-learn's `kl_divergence_`.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub kl_divergence: f64,
    /// scikit-learn's `n_iter_` (index of the last iteration that ran).
    pub n_iter: usize,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub perplexity: f64,
}

/// `logreg_5fold`: cross-validated multinomial logistic regression (fields in name order).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct LogRegResult {
    /// Mean of `fold_accuracies`.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub accuracy_mean: f64,
    /// Std of `fold_accuracies`, ddof = 0.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub accuracy_std: f64,
    /// Majority-class rate.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub chance: f64,
    /// Out-of-fold confusion counts: rows = true, columns = predicted, in `labels` order.
    pub confusion: Vec<Vec<u64>>,
    /// Accuracy of each fold.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Vec<Option<f64>>")]
    pub fold_accuracies: Vec<f64>,
    /// Class labels (category names).
    pub labels: Vec<String>,
    /// Macro-F1 of the out-of-fold predictions.
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub macro_f1_oof: f64,
    pub n_folds: usize,
    /// Out-of-fold predicted category of every prompt, in `prompt_ids` order.
    pub oof_predictions: Vec<String>,
}

/// `lexical_baseline`: the `logreg_5fold` classifier on bag-of-token-id features (see
/// `docs/statistics.md`, "Confound controls").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LexicalBaseline {
    /// Distinct token ids among the counted tokens of the analysed prompts (the features).
    pub vocabulary: usize,
    /// Tokens counted: every (prompt, token type, position) of the selected token types once.
    pub tokens: u64,
    /// The cross-validated classifier on those features; fields as `logreg_5fold`, same folds.
    pub classifier: LogRegResult,
}

/// How `token_matched` removes token identity (`--token-matched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenMatchMode {
    /// Only tokens whose id occurs in every category.
    Shared,
    /// Each (token, layer) selection vector minus its token id's corpus mean.
    Residual,
}

impl TokenMatchMode {
    /// The name used in the CLI and in results.json.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenMatchMode::Shared => "shared",
            TokenMatchMode::Residual => "residual",
        }
    }
}

/// `token_matched`: the pair statistics of `similarity`, `category_similarity_matrix` and
/// `per_layer` on token-matched routing vectors (see `docs/statistics.md`, "Confound controls").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenMatched {
    pub mode: TokenMatchMode,
    /// Prompts in these statistics (the analysed prompts minus `dropped_prompts`).
    pub num_prompts: usize,
    /// shared: token ids occurring in every category; residual: distinct token ids.
    pub token_ids: usize,
    /// (token, layer) routing records used.
    pub records: u64,
    /// Analysed prompts left out here (a layer without shared tokens, or a zero residual).
    pub dropped_prompts: Vec<DroppedPrompt>,
    pub similarity: SimilaritySummary,
    pub category_similarity_matrix: CategoryMatrix,
    pub per_layer: Vec<LayerStats>,
}

/// `windows`: routing over generation (see `docs/statistics.md`, "Routing over time").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RoutingWindows {
    /// W: generated tokens per window.
    pub window_tokens: usize,
    /// Most generated tokens (with routing records) of any analysed prompt.
    pub max_generated: usize,
    /// The statistics on the prompt tokens only.
    pub prompt_phase: WindowStats,
    /// The statistics on the generated tokens only.
    pub generation_phase: WindowStats,
    /// Per prompt, the similarity of its prompt-phase and generation-phase signatures.
    pub phase_drift: DriftStats,
    /// Window w covers generated tokens `[w·W, (w+1)·W)` of every prompt.
    pub windows: Vec<WindowStats>,
    /// `drift[w]`: per prompt, the similarity of its signatures in windows w and w+1.
    pub drift: Vec<DriftStats>,
}

/// The statistics of one window (or phase) of `windows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowStats {
    /// First generated-token index of the window (absent for the phases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<usize>,
    /// One past the last generated-token index (absent for the phases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<usize>,
    /// Prompts with a routed token in the window at every layer (the others are left out).
    pub num_prompts: usize,
    /// Tokens counted (summed over those prompts).
    pub tokens: u64,
    /// Within / across pair similarity and Cohen's d, as `similarity`.
    pub similarity: Section<SimilaritySummary>,
    /// The classifier of `logreg_5fold` on the window's signatures.
    pub classifier: Section<WindowClassifier>,
}

/// The cross-validated classifier of one window (fields as in `logreg_5fold`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowClassifier {
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    /// Majority-category rate among the window's prompts.
    pub chance: f64,
    pub fold_accuracies: Vec<f64>,
    pub n_folds: usize,
}

/// Mean and std (ddof = 1) over prompts of the similarity (mean per-layer cosine) of two
/// signatures of the same prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DriftStats {
    /// Prompts with both signatures.
    pub num_prompts: usize,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub mean: f64,
    #[serde(deserialize_with = "nan::de")]
    #[schemars(with = "Option<f64>")]
    pub std: f64,
}

/// `random_router_control`: the same study with every router weight re-drawn (see
/// `docs/statistics.md`, "Random-router control").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RandomRouterControl {
    /// How the router weights were re-drawn (`permute_entries`).
    pub method: String,
    /// Seed of the re-draw (`--control-seed`).
    pub seed: u64,
    /// The control's output folder, relative to this file's folder.
    pub dir: String,
    /// Prompts analysed in the control.
    pub num_prompts: usize,
    /// The control's `similarity`.
    pub similarity: SimilaritySummary,
    /// The control's `logreg_5fold` accuracy, chance and std, or why it was skipped.
    pub classifier: Section<WindowClassifier>,
}

/// A section that is either computed or skipped with a reason (`{"skipped": "..."}`).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "{T}OrSkipped")]
pub enum Section<T> {
    Done(T),
    Skipped { skipped: String },
}

impl<T> Default for Section<T> {
    /// Skipped with the reason "not computed".
    fn default() -> Self {
        Section::skipped("not computed")
    }
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
    /// Why the section was not computed (`"skipped: reason"`), `None` when it was.
    pub fn why_missing(&self) -> Option<String> {
        match self {
            Section::Done(_) => None,
            Section::Skipped { skipped } => Some(format!("skipped: {skipped}")),
        }
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Section<T> {
    /// `{"skipped": "reason"}` (exactly that one key) is [`Section::Skipped`]; anything else
    /// must be a `T`, and its error (e.g. a missing field) is reported as such.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        if let Some(obj) = v.as_object().filter(|o| o.len() == 1) {
            if let Some(reason) = obj.get("skipped") {
                return match reason.as_str() {
                    Some(r) => Ok(Section::skipped(r)),
                    None => Err(D::Error::custom(
                        "\"skipped\" must be a string (the reason)",
                    )),
                };
            }
        }
        serde_json::from_value(v)
            .map(Section::Done)
            .map_err(D::Error::custom)
    }
}

/// Why a `results.json` text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResultsReadError {
    /// `schema_version` is missing, not an integer, or a version this build does not read.
    #[error("results.json schema_version {found} is not supported (this moe-xray {tool} reads schema_version {supported}); re-run `moe-xray analyze` with this version, or read the file with the moe-xray that wrote it")]
    UnsupportedVersion {
        /// What the file says (`missing` when absent).
        found: String,
        /// The versions this build reads.
        supported: String,
        tool: &'static str,
    },
    /// Not valid JSON, or not the schema (serde_json's message, with line and column).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl AnalysisResults {
    /// Parses `results.json` text: first checks `schema_version` (a file of another major
    /// version is refused before its fields are read), then reads exactly this schema.
    pub fn from_json_str(text: &str) -> Result<AnalysisResults, ResultsReadError> {
        /// `None` when the field is absent (`null` is `Some(Null)`).
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default, deserialize_with = "present")]
            schema_version: Option<serde_json::Value>,
        }
        fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
            serde_json::Value::deserialize(d).map(Some)
        }
        let probe: Probe = serde_json::from_str(text)?;
        let supported = |v: &serde_json::Value| {
            v.as_u64()
                .is_some_and(|v| SUPPORTED_SCHEMA_VERSIONS.iter().any(|&s| u64::from(s) == v))
        };
        match &probe.schema_version {
            Some(v) if supported(v) => Ok(serde_json::from_str(text)?),
            other => Err(ResultsReadError::UnsupportedVersion {
                found: other.as_ref().map_or_else(
                    || "missing".to_string(),
                    |v| {
                        // A hostile file may put anything here: show at most 40 characters.
                        let shown = v.to_string();
                        match shown.char_indices().nth(40) {
                            Some((cut, _)) => format!("{}…", &shown[..cut]),
                            None => shown,
                        }
                    },
                ),
                supported: SUPPORTED_SCHEMA_VERSIONS
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                tool: env!("CARGO_PKG_VERSION"),
            }),
        }
    }

    /// The JSON Schema of `results.json` (committed as `docs/results.schema.json`), pretty
    /// printed with a final newline.
    #[allow(clippy::expect_used)] // a schemars schema is plain JSON: serialising it cannot fail
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(AnalysisResults);
        serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
    }
}

/// Deserialisers that read `null` as NaN, the way serde_json writes non-finite floats, for
/// `f64` fields and arrays of them.
mod nan {
    use serde::{Deserialize, Deserializer};

    pub trait Nullable: Sized {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    }

    struct W<T>(T);

    impl<'de, T: Nullable> Deserialize<'de> for W<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            T::read(d).map(W)
        }
    }

    impl Nullable for f64 {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
        }
    }

    impl<T: Nullable> Nullable for Vec<T> {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(Vec::<W<T>>::deserialize(d)?
                .into_iter()
                .map(|w| w.0)
                .collect())
        }
    }

    impl<T: Nullable> Nullable for [T; 2] {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let [a, b] = <[W<T>; 2]>::deserialize(d)?;
            Ok([a.0, b.0])
        }
    }

    impl<T: Nullable> Nullable for Option<T> {
        fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(Option::<W<T>>::deserialize(d)?.map(|w| w.0))
        }
    }

    /// `#[serde(deserialize_with = "nan::de")]` for any [`Nullable`] field type.
    pub fn de<'de, D: Deserializer<'de>, T: Nullable>(d: D) -> Result<T, D::Error> {
        T::read(d)
    }
}
