//! The parts of `results.json` (schema in `docs/DESIGN.md`) that the report reads.
//!
//! These are the report's own, deliberately tolerant serde types: every section other than the
//! core similarity numbers is optional (`#[serde(default)]`), sections that the analysis skipped
//! (`{"skipped": "reason"}`) parse as [`Section::Skipped`], and unknown fields are ignored. The
//! significance section is kept as raw JSON and read through accessor methods that accept the
//! plausible key spellings, so a renamed key degrades to "n/a" instead of a parse error.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ReportError, Result};

/// `{n, mean, std}` over a set of prompt pairs (std with ddof = 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    /// Number of unordered pairs.
    #[serde(default)]
    pub n: u64,
    /// Mean similarity.
    #[serde(default)]
    pub mean: f64,
    /// Standard deviation over pairs (ddof = 1).
    #[serde(default)]
    pub std: f64,
}

/// `similarity` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Similarity {
    /// Within-category pairs.
    #[serde(default)]
    pub within: PairStats,
    /// Across-category pairs.
    #[serde(default)]
    pub across: PairStats,
    /// Cohen's d with pooled std.
    #[serde(default)]
    pub cohens_d: f64,
}

/// `category_similarity_matrix` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryMatrix {
    /// Categories sorted by name.
    #[serde(default)]
    pub order: Vec<String>,
    /// `values[a][b]` = mean similarity between prompts of categories a and b.
    #[serde(default)]
    pub values: Vec<Vec<f64>>,
}

/// One entry of `per_layer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Layer index.
    #[serde(default)]
    pub layer: usize,
    /// Mean within-category cosine at this layer.
    #[serde(default)]
    pub within_mean: f64,
    /// Mean across-category cosine at this layer.
    #[serde(default)]
    pub across_mean: f64,
    /// Cohen's d at this layer.
    #[serde(default)]
    pub cohens_d: f64,
}

/// One baseline (`baselines.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Mean over repetitions of the mean pair similarity.
    #[serde(default)]
    pub mean: f64,
    /// Std over repetitions of the mean pair similarity (ddof = 1).
    #[serde(default)]
    pub std: f64,
    /// Mean over repetitions of the pair std (ddof = 1).
    #[serde(default)]
    pub pair_std: f64,
    /// Number of repetitions.
    #[serde(default)]
    pub reps: u64,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
}

/// `baselines` section; each baseline may be absent or skipped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    /// Expert axis permuted per prompt and layer.
    #[serde(default)]
    pub permutation: Section<Baseline>,
    /// Uniform random top-k routing with the observed token counts.
    #[serde(default)]
    pub load_balance_uniform: Section<Baseline>,
    /// Random top-k routing drawn from the pooled per-layer expert load.
    #[serde(default)]
    pub load_balance_marginal: Section<Baseline>,
}

/// `pca` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pca {
    /// Explained-variance ratio of the first components.
    #[serde(default)]
    pub explained_variance_ratio: Vec<f64>,
    /// First two component scores per prompt (prompt_ids order).
    #[serde(default)]
    pub coords: Vec<Vec<f64>>,
}

/// `tsne` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tsne {
    /// 2-D embedding per prompt (prompt_ids order).
    #[serde(default)]
    pub coords: Vec<Vec<f64>>,
    /// Final KL divergence.
    #[serde(default)]
    pub kl_divergence: f64,
    /// Perplexity used.
    #[serde(default)]
    pub perplexity: f64,
}

/// `logreg_5fold` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Logreg {
    /// Accuracy of each fold.
    #[serde(default)]
    pub fold_accuracies: Vec<f64>,
    /// Mean fold accuracy.
    #[serde(default)]
    pub accuracy_mean: f64,
    /// Std of fold accuracies (ddof = 0).
    #[serde(default)]
    pub accuracy_std: f64,
    /// Macro-F1 of the out-of-fold predictions.
    #[serde(default)]
    pub macro_f1_oof: f64,
    /// Confusion matrix, rows = true, columns = predicted, in `labels` order.
    #[serde(default)]
    pub confusion: Vec<Vec<f64>>,
    /// Class labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Majority-class rate.
    #[serde(default)]
    pub chance: f64,
}

/// An optional section: present, skipped with a reason, or absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Section<T> {
    /// Skipped by the analysis (`{"skipped": "reason"}`).
    Skipped {
        /// Why.
        skipped: String,
    },
    /// Computed.
    Present(T),
    /// Missing or `null`.
    #[default]
    Absent,
}

impl<T> Section<T> {
    /// The computed value, if any.
    pub fn get(&self) -> Option<&T> {
        match self {
            Section::Present(v) => Some(v),
            _ => None,
        }
    }

    /// Why the section is not there (skip reason, or "not in results.json").
    pub fn why_missing(&self) -> Option<String> {
        match self {
            Section::Present(_) => None,
            Section::Skipped { skipped } => Some(format!("skipped: {skipped}")),
            Section::Absent => Some("not in results.json".to_string()),
        }
    }
}

/// A category with its prompt count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryCount {
    /// Category name.
    #[serde(default)]
    pub name: String,
    /// Number of prompts (after dropping).
    #[serde(default)]
    pub n: u64,
}

/// A prompt excluded from the analysis.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DroppedPrompt {
    /// Prompt id.
    #[serde(default)]
    pub prompt_id: String,
    /// Why it was dropped.
    #[serde(default)]
    pub reason: String,
}

/// `input` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputSection {
    /// Trace files analysed.
    #[serde(default)]
    pub traces: Vec<String>,
    /// Capture manifest (free-form JSON).
    #[serde(default)]
    pub manifest: serde_json::Value,
}

/// The fields of `results.json` the report uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Schema version.
    #[serde(default)]
    pub schema_version: u64,
    /// moe-xray version that wrote the file.
    #[serde(default)]
    pub tool_version: String,
    /// Inputs (trace paths, manifest).
    #[serde(default)]
    pub input: InputSection,
    /// Analysis settings (free-form).
    #[serde(default)]
    pub settings: serde_json::Value,
    /// N.
    #[serde(default)]
    pub num_prompts: usize,
    /// L.
    #[serde(default)]
    pub num_layers: usize,
    /// E.
    #[serde(default)]
    pub num_experts: usize,
    /// k.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Categories and their sizes.
    #[serde(default)]
    pub categories: Vec<CategoryCount>,
    /// Prompt ids in analysis order (the order of the PCA / t-SNE coordinates).
    #[serde(default)]
    pub prompt_ids: Vec<String>,
    /// Category of each prompt in `prompt_ids` order. Not part of the DESIGN.md schema; read when
    /// present, otherwise filled by the report from its prompt table
    /// ([`Results::fill_prompt_categories`]).
    #[serde(default)]
    pub prompt_categories: Vec<String>,
    /// Prompts excluded from the analysis.
    #[serde(default)]
    pub dropped_prompts: Vec<DroppedPrompt>,
    /// "exact_pairs" or "gram_sums".
    #[serde(default)]
    pub path: String,
    /// Headline similarity numbers.
    #[serde(default)]
    pub similarity: Similarity,
    /// Category × category mean similarity.
    #[serde(default)]
    pub category_similarity_matrix: CategoryMatrix,
    /// Per-layer statistics.
    #[serde(default)]
    pub per_layer: Vec<LayerStats>,
    /// Null-model baselines.
    #[serde(default)]
    pub baselines: Baselines,
    /// Significance tests (raw JSON; see the accessor methods).
    #[serde(default)]
    pub significance: serde_json::Value,
    /// PCA.
    #[serde(default)]
    pub pca: Section<Pca>,
    /// t-SNE.
    #[serde(default)]
    pub tsne: Section<Tsne>,
    /// Logistic-regression cross-validation.
    #[serde(default)]
    pub logreg_5fold: Section<Logreg>,
}

impl Results {
    /// Parses `results.json` text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Results> {
        serde_json::from_str(text).map_err(|e| ReportError::Parse {
            path: origin.to_path_buf(),
            line: e.line(),
            msg: e.to_string(),
        })
    }

    /// Reads and parses a `results.json` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Results> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ReportError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Results::from_json_str(&text, path)
    }

    /// Fills `prompt_categories` from a prompt id → category map when results.json did not carry
    /// it (unknown ids get "unknown").
    pub fn fill_prompt_categories(&mut self, map: &BTreeMap<String, String>) {
        if self.prompt_categories.len() == self.prompt_ids.len() && !self.prompt_ids.is_empty() {
            return;
        }
        self.prompt_categories = self
            .prompt_ids
            .iter()
            .map(|id| map.get(id).cloned().unwrap_or_else(|| "unknown".into()))
            .collect();
    }

    /// Categories in display order: the similarity matrix order, then any other category names
    /// (sorted), so colours are the same in every figure.
    pub fn category_order(&self) -> Vec<String> {
        let mut out: Vec<String> = self.category_similarity_matrix.order.clone();
        let mut extra: Vec<String> = self
            .categories
            .iter()
            .map(|c| c.name.clone())
            .chain(self.prompt_categories.iter().cloned())
            .filter(|c| !out.contains(c))
            .collect();
        extra.sort();
        extra.dedup();
        out.extend(extra);
        out
    }

    /// Whether the manifest marks the model as synthetic, and if so whether it is the planted
    /// positive control. Looks for a `synthetic` key in the manifest (bool, string such as
    /// "random" / "planted", or an object with `planted: true` or `kind`), and for a model name
    /// starting with "synthetic".
    pub fn synthetic_kind(&self) -> Option<SyntheticKind> {
        synthetic_kind_of(&self.input.manifest)
    }

    fn sig(&self, section: &str) -> Option<&serde_json::Value> {
        self.significance.get(section).filter(|v| v.is_object())
    }

    /// Label-permutation p-value of (within − across).
    pub fn p_within_minus_across(&self) -> Option<f64> {
        let s = self.sig("label_permutation")?;
        first_f64(s, &["p_within_minus_across", "p_diff", "p_value", "p"])
    }

    /// Label-permutation p-value of Cohen's d.
    pub fn p_cohens_d(&self) -> Option<f64> {
        let s = self.sig("label_permutation")?;
        first_f64(s, &["p_cohens_d", "p_d"])
    }

    /// Number of label permutations.
    pub fn label_permutation_reps(&self) -> Option<u64> {
        let s = self.sig("label_permutation")?;
        first_f64(s, &["reps", "permutations", "n"]).map(|v| v as u64)
    }

    /// Bootstrap 95 % CI of Cohen's d.
    pub fn cohens_d_ci(&self) -> Option<(f64, f64)> {
        let s = self.sig("bootstrap")?;
        first_ci(
            s,
            &[
                "cohens_d_ci",
                "cohens_d_ci95",
                "ci_cohens_d",
                "d_ci",
                "cohens_d",
                "ci",
            ],
        )
    }

    /// Bootstrap 95 % CI of the classifier accuracy.
    pub fn accuracy_ci(&self) -> Option<(f64, f64)> {
        let s = self.sig("bootstrap")?;
        first_ci(
            s,
            &[
                "accuracy_ci",
                "accuracy_ci95",
                "ci_accuracy",
                "classifier_accuracy_ci",
                "accuracy",
            ],
        )
        .or_else(|| {
            let c = self.sig("classifier_permutation")?;
            first_ci(c, &["accuracy_ci", "accuracy_ci95", "ci_accuracy"])
        })
    }

    /// Number of bootstrap resamples.
    pub fn bootstrap_reps(&self) -> Option<u64> {
        let s = self.sig("bootstrap")?;
        first_f64(s, &["reps", "resamples", "b", "n"]).map(|v| v as u64)
    }

    /// Classifier label-permutation p-value.
    pub fn p_classifier(&self) -> Option<f64> {
        let s = self.sig("classifier_permutation")?;
        first_f64(s, &["p_accuracy", "p_value", "p"])
    }

    /// Number of classifier permutations.
    pub fn classifier_permutation_reps(&self) -> Option<u64> {
        let s = self.sig("classifier_permutation")?;
        first_f64(s, &["reps", "permutations", "n"]).map(|v| v as u64)
    }

    /// Skip reason of a significance sub-section, if it says `{"skipped": ...}`.
    pub fn significance_skipped(&self, section: &str) -> Option<String> {
        self.significance
            .get(section)?
            .get("skipped")?
            .as_str()
            .map(str::to_string)
    }
}

/// Kind of synthetic model, as read from a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// Random weights: no task structure.
    Random,
    /// Router deliberately made sensitive to token classes (positive control).
    Planted,
}

/// See [`Results::synthetic_kind`].
pub fn synthetic_kind_of(manifest: &serde_json::Value) -> Option<SyntheticKind> {
    use serde_json::Value;
    let planted_word = |s: &str| s.to_ascii_lowercase().contains("planted");
    let from_value = |v: &Value| -> Option<SyntheticKind> {
        match v {
            Value::Bool(true) => Some(SyntheticKind::Random),
            Value::String(s) if !s.is_empty() => Some(if planted_word(s) {
                SyntheticKind::Planted
            } else {
                SyntheticKind::Random
            }),
            Value::Object(o) => {
                let planted = o.get("planted").and_then(Value::as_bool) == Some(true)
                    || o.get("kind")
                        .or_else(|| o.get("mode"))
                        .and_then(Value::as_str)
                        .is_some_and(planted_word);
                Some(if planted {
                    SyntheticKind::Planted
                } else {
                    SyntheticKind::Random
                })
            }
            _ => None,
        }
    };
    if let Some(k) = manifest.get("synthetic").and_then(from_value) {
        return Some(k);
    }
    if let Some(k) = manifest
        .get("extra")
        .and_then(|e| e.get("synthetic"))
        .and_then(from_value)
    {
        return Some(k);
    }
    let model = manifest.get("model").and_then(Value::as_str).unwrap_or("");
    let base = model.rsplit(['/', '\\']).next().unwrap_or(model);
    if base.to_ascii_lowercase().starts_with("synthetic")
        || base.to_ascii_lowercase().starts_with("synth-")
    {
        return Some(if planted_word(base) {
            SyntheticKind::Planted
        } else {
            SyntheticKind::Random
        });
    }
    None
}

fn first_f64(v: &serde_json::Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_f64()))
}

fn ci_of(v: &serde_json::Value) -> Option<(f64, f64)> {
    if let Some(a) = v.as_array() {
        if a.len() == 2 {
            return Some((a[0].as_f64()?, a[1].as_f64()?));
        }
        return None;
    }
    if v.is_object() {
        for (lo, hi) in [
            ("lo", "hi"),
            ("low", "high"),
            ("ci_low", "ci_high"),
            ("lower", "upper"),
            ("ci_lower", "ci_upper"),
            ("p2_5", "p97_5"),
        ] {
            if let (Some(a), Some(b)) = (
                v.get(lo).and_then(|x| x.as_f64()),
                v.get(hi).and_then(|x| x.as_f64()),
            ) {
                return Some((a, b));
            }
        }
        for k in ["ci", "ci95"] {
            if let Some(c) = v.get(k).and_then(ci_of) {
                return Some(c);
            }
        }
    }
    None
}

fn first_ci(v: &serde_json::Value, keys: &[&str]) -> Option<(f64, f64)> {
    keys.iter().find_map(|k| v.get(*k).and_then(ci_of))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn synthetic_detection() {
        assert_eq!(
            synthetic_kind_of(&json!({"model": "allenai/OLMoE-1B-7B-0924"})),
            None
        );
        assert_eq!(
            synthetic_kind_of(&json!({"synthetic": true})),
            Some(SyntheticKind::Random)
        );
        assert_eq!(synthetic_kind_of(&json!({"synthetic": false})), None);
        assert_eq!(
            synthetic_kind_of(&json!({"synthetic": "planted"})),
            Some(SyntheticKind::Planted)
        );
        assert_eq!(
            synthetic_kind_of(&json!({"synthetic": {"planted": true}})),
            Some(SyntheticKind::Planted)
        );
        assert_eq!(
            synthetic_kind_of(&json!({"model": "/tmp/demo/synthetic-olmoe"})),
            Some(SyntheticKind::Random)
        );
        assert_eq!(
            synthetic_kind_of(&json!({"model": "runs/synth-planted"})),
            Some(SyntheticKind::Planted)
        );
    }

    #[test]
    fn sections_parse_present_skipped_absent_and_null() {
        let r = Results::from_json_str(
            r#"{"tsne": {"skipped": "too few"}, "pca": null,
                "logreg_5fold": {"accuracy_mean": 0.5, "labels": ["a"]}}"#,
            Path::new("r.json"),
        )
        .unwrap();
        assert_eq!(r.tsne.why_missing().unwrap(), "skipped: too few");
        assert_eq!(r.pca, Section::Absent);
        assert_eq!(r.baselines.permutation, Section::Absent);
        assert_eq!(r.logreg_5fold.get().unwrap().accuracy_mean, 0.5);
    }

    #[test]
    fn significance_accessors_accept_key_variants() {
        let mut r = Results {
            significance: json!({
                "label_permutation": {"p_within_minus_across": 0.01, "p_cohens_d": 0.02},
                "bootstrap": {"cohens_d": {"ci_low": 1.0, "ci_high": 2.0}},
                "classifier_permutation": {"p_value": 0.03}
            }),
            ..Default::default()
        };
        assert_eq!(r.p_within_minus_across(), Some(0.01));
        assert_eq!(r.p_cohens_d(), Some(0.02));
        assert_eq!(r.cohens_d_ci(), Some((1.0, 2.0)));
        assert_eq!(r.p_classifier(), Some(0.03));
        r.significance = json!({"bootstrap": {"skipped": "n too small"}});
        assert_eq!(r.cohens_d_ci(), None);
        assert_eq!(r.significance_skipped("bootstrap").unwrap(), "n too small");
    }
}
