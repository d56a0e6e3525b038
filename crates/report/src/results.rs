//! The report's view of `results.json`: exactly the schema of
//! [`moe_xray_stats::results::AnalysisResults`] (defined once, in the stats crate; JSON Schema in
//! `docs/results.schema.json`), plus the category of every prompt, which `results.json` does not
//! carry and the report takes from its prompt table.
//!
//! A file of another major `schema_version` is refused with an error naming the file; a file
//! that is not the schema (missing field, wrong type) is an error naming the file and line.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::Path;

pub use moe_xray_stats::results::*;

use crate::{ReportError, Result};

/// A parsed `results.json` ([`AnalysisResults`], reachable through `Deref`) and the category of
/// each prompt in `prompt_ids` order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    /// The parsed file.
    pub analysis: AnalysisResults,
    /// Category of each prompt in `prompt_ids` order; filled from the prompt table by
    /// [`Results::fill_prompt_categories`] ("unknown" for ids without a prompt row).
    pub prompt_categories: Vec<String>,
}

impl Deref for Results {
    type Target = AnalysisResults;
    fn deref(&self) -> &AnalysisResults {
        &self.analysis
    }
}

impl DerefMut for Results {
    fn deref_mut(&mut self) -> &mut AnalysisResults {
        &mut self.analysis
    }
}

impl From<AnalysisResults> for Results {
    fn from(analysis: AnalysisResults) -> Self {
        Results {
            analysis,
            prompt_categories: Vec::new(),
        }
    }
}

impl Results {
    /// Parses `results.json` text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Results> {
        match AnalysisResults::from_json_str(text) {
            Ok(a) => Ok(a.into()),
            Err(ResultsReadError::Json(e)) => Err(ReportError::Parse {
                path: origin.to_path_buf(),
                line: e.line(),
                msg: e.to_string(),
            }),
            Err(e @ ResultsReadError::UnsupportedVersion { .. }) => Err(ReportError::Schema {
                path: origin.to_path_buf(),
                msg: e.to_string(),
            }),
        }
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

    /// Fills `prompt_categories` from a prompt id → category map unless it already has one
    /// entry per prompt (unknown ids get "unknown").
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

    /// Label-permutation p-value of (within − across).
    pub fn p_within_minus_across(&self) -> Option<f64> {
        let s = self.significance.label_permutation.done()?;
        Some(s.p_within_minus_across)
    }

    /// Label-permutation p-value of Cohen's d.
    pub fn p_cohens_d(&self) -> Option<f64> {
        let s = self.significance.label_permutation.done()?;
        Some(s.p_cohens_d)
    }

    /// Number of label permutations.
    pub fn label_permutation_reps(&self) -> Option<usize> {
        let s = self.significance.label_permutation.done()?;
        Some(s.reps)
    }

    /// Bootstrap 95 % CI of Cohen's d.
    pub fn cohens_d_ci(&self) -> Option<(f64, f64)> {
        let [lo, hi] = self.significance.bootstrap.done()?.cohens_d_ci95;
        Some((lo, hi))
    }

    /// Bootstrap 95 % CI of the classifier accuracy.
    pub fn accuracy_ci(&self) -> Option<(f64, f64)> {
        let [lo, hi] = self.significance.bootstrap.done()?.accuracy_ci95?;
        Some((lo, hi))
    }

    /// Number of bootstrap resamples.
    pub fn bootstrap_reps(&self) -> Option<usize> {
        Some(self.significance.bootstrap.done()?.reps)
    }

    /// Classifier label-permutation p-value.
    pub fn p_classifier(&self) -> Option<f64> {
        Some(self.significance.classifier_permutation.done()?.p)
    }

    /// Number of classifier permutations.
    pub fn classifier_permutation_reps(&self) -> Option<usize> {
        Some(self.significance.classifier_permutation.done()?.reps)
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
    fn significance_accessors_read_the_typed_sections() {
        let mut r = Results::default();
        assert_eq!(r.p_within_minus_across(), None);
        assert_eq!(r.cohens_d_ci(), None);
        r.significance.label_permutation = Section::Done(LabelPermutation {
            reps: 99,
            p_within_minus_across: 0.01,
            p_cohens_d: 0.02,
            ..Default::default()
        });
        r.significance.bootstrap = Section::Done(Bootstrap {
            reps: 50,
            cohens_d_ci95: [1.0, 2.0],
            accuracy_ci95: None,
            ..Default::default()
        });
        r.significance.classifier_permutation = Section::Done(ClassifierPermutation {
            p: 0.03,
            reps: 7,
            ..Default::default()
        });
        assert_eq!(r.p_within_minus_across(), Some(0.01));
        assert_eq!(r.p_cohens_d(), Some(0.02));
        assert_eq!(r.label_permutation_reps(), Some(99));
        assert_eq!(r.cohens_d_ci(), Some((1.0, 2.0)));
        assert_eq!(r.bootstrap_reps(), Some(50));
        assert_eq!(r.accuracy_ci(), None);
        assert_eq!(r.p_classifier(), Some(0.03));
        assert_eq!(r.classifier_permutation_reps(), Some(7));
        r.significance.bootstrap = Section::skipped("n too small");
        assert_eq!(r.cohens_d_ci(), None);
        assert_eq!(
            r.significance.bootstrap.why_missing().as_deref(),
            Some("skipped: n too small")
        );
    }
}
