//! From per-prompt routing counts to the analysis input: drop prompts with an empty layer, check
//! categories, index labels (see `docs/statistics.md`).

use crate::error::{Result, StatsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One prompt's aggregated routing counts (mirrors `moe_xray_trace::counts::PromptCounts`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt_id: String,
    pub category: Option<String>,
    /// `A[l,e]`, layer-major, length L·E.
    pub counts: Vec<f64>,
    /// Number of selected tokens per layer (length L); used by the load-balancing baselines in
    /// `--weighted` mode, where the counts are router weights.
    pub tokens_per_layer: Vec<u64>,
}

/// A prompt left out of the analysis and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DroppedPrompt {
    pub prompt_id: String,
    pub reason: String,
}

/// The validated input of the analysis: N prompts (after dropping), all with a category.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisInput {
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Whether `counts` hold router weights (`--weighted`) rather than selection counts.
    pub weighted: bool,
    pub prompt_ids: Vec<String>,
    /// Category names, sorted by name; `labels[i]` indexes this list.
    pub categories: Vec<String>,
    pub labels: Vec<usize>,
    /// N × (L·E) row-major counts.
    pub counts: Vec<f64>,
    /// N × L row-major token counts per layer.
    pub tokens_per_layer: Vec<u64>,
    pub dropped: Vec<DroppedPrompt>,
}

impl AnalysisInput {
    /// Number of prompts kept.
    pub fn n(&self) -> usize {
        self.prompt_ids.len()
    }
    /// Signature length L·E (checked against the limits by [`build_input`]).
    pub fn dim(&self) -> usize {
        self.num_layers.saturating_mul(self.num_experts)
    }
    /// Counts row of prompt `i`.
    pub fn counts_row(&self, i: usize) -> &[f64] {
        let d = self.dim();
        &self.counts[i * d..(i + 1) * d]
    }
    /// Number of prompts per category, in `categories` order.
    pub fn category_sizes(&self) -> Vec<usize> {
        let mut n = vec![0; self.categories.len()];
        for &c in &self.labels {
            n[c] += 1;
        }
        n
    }
}

/// Why a row would be dropped: the first layer whose total count is zero (or not finite).
pub fn empty_layer(counts: &[f64], num_layers: usize, num_experts: usize) -> Option<usize> {
    (0..num_layers).find(|&l| {
        let s: f64 = counts[l * num_experts..(l + 1) * num_experts].iter().sum();
        s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
    })
}

/// Check the shape of one row and that its counts are finite and non-negative.
pub fn check_row(row: &PromptRow, num_layers: usize, num_experts: usize) -> Result<()> {
    let d = num_layers.checked_mul(num_experts).ok_or_else(|| {
        StatsError::Dimension(format!(
            "num_layers × num_experts = {num_layers} × {num_experts} overflows"
        ))
    })?;
    if row.counts.len() != d {
        return Err(StatsError::Dimension(format!(
            "prompt {:?} has {} counts, expected L*E = {}*{} = {}",
            row.prompt_id,
            row.counts.len(),
            num_layers,
            num_experts,
            d
        )));
    }
    if let Some(x) = row.counts.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(StatsError::InvalidInput(format!(
            "prompt {:?} has an invalid count {x} (counts must be finite and >= 0)",
            row.prompt_id
        )));
    }
    Ok(())
}

/// Build the analysis input. Prompts with a zero-total layer are dropped (and listed); every kept
/// prompt needs a category; at least two categories with at least two prompts each are required.
pub fn build_input(
    num_layers: usize,
    num_experts: usize,
    top_k: usize,
    weighted: bool,
    rows: Vec<PromptRow>,
) -> Result<AnalysisInput> {
    if num_layers == 0 || num_experts == 0 {
        return Err(StatsError::InvalidInput(format!(
            "num_layers ({num_layers}) and num_experts ({num_experts}) must be positive"
        )));
    }
    if top_k == 0 || top_k > num_experts {
        return Err(StatsError::InvalidInput(format!(
            "top_k = {top_k} must be between 1 and num_experts = {num_experts}"
        )));
    }
    // Plain limits (docs/trace-format.md, "Limits") before anything is sized from L and E.
    let d = moe_xray_trace::limits::check_dims(num_layers, num_experts, Some(top_k))
        .map_err(StatsError::InvalidInput)?;
    let mut dropped = Vec::new();
    let mut kept: Vec<(PromptRow, String)> = Vec::new();
    let mut missing = Vec::new();
    for row in rows {
        check_row(&row, num_layers, num_experts)?;
        if let Some(l) = empty_layer(&row.counts, num_layers, num_experts) {
            dropped.push(DroppedPrompt {
                prompt_id: row.prompt_id.clone(),
                reason: format!("no selected tokens at layer {l} (zero total count)"),
            });
            continue;
        }
        match row.category.clone() {
            Some(c) if !c.is_empty() => kept.push((row, c)),
            _ => missing.push(row.prompt_id.clone()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<_> = missing.iter().take(5).map(|s| format!("{s:?}")).collect();
        return Err(StatsError::InvalidInput(format!(
            "{} prompt(s) have no category (e.g. {}); give categories in the trace or with --prompts FILE",
            missing.len(),
            shown.join(", ")
        )));
    }
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, c) in &kept {
        *sizes.entry(c.clone()).or_default() += 1;
    }
    let big = sizes.values().filter(|&&n| n >= 2).count();
    if big < 2 {
        let desc: Vec<_> = sizes.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        return Err(StatsError::InvalidInput(format!(
            "need at least 2 categories with at least 2 prompts each (after dropping {} prompt(s)); found {{{}}}",
            dropped.len(),
            desc.join(", ")
        )));
    }
    let categories: Vec<String> = sizes.keys().cloned().collect();
    let index: BTreeMap<&str, usize> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let n = kept.len();
    let too_many = || {
        StatsError::InvalidInput(format!(
            "{n} prompts × {d} counts (num_layers × num_experts) do not fit in memory"
        ))
    };
    let cap_counts = n.checked_mul(d).ok_or_else(too_many)?;
    let cap_tokens = n.checked_mul(num_layers).ok_or_else(too_many)?;
    let mut input = AnalysisInput {
        num_layers,
        num_experts,
        top_k,
        weighted,
        prompt_ids: Vec::with_capacity(n),
        categories: categories.clone(),
        labels: Vec::with_capacity(n),
        counts: Vec::with_capacity(cap_counts),
        tokens_per_layer: Vec::with_capacity(cap_tokens),
        dropped,
    };
    for (row, c) in kept {
        input.labels.push(index[c.as_str()]);
        input.prompt_ids.push(row.prompt_id);
        input.counts.extend_from_slice(&row.counts);
        if row.tokens_per_layer.len() == num_layers {
            input
                .tokens_per_layer
                .extend_from_slice(&row.tokens_per_layer);
        } else {
            // Unknown token counts: derive them from unweighted totals (Σ_e A / k).
            for l in 0..num_layers {
                let s: f64 = row.counts[l * num_experts..(l + 1) * num_experts]
                    .iter()
                    .sum();
                input
                    .tokens_per_layer
                    .push((s / top_k as f64).round() as u64);
            }
        }
    }
    Ok(input)
}

/// Build the analysis input from the trace crate's aggregated counts table.
pub fn from_counts_table(
    table: moe_xray_trace::counts::CountsTable,
    top_k_fallback: Option<usize>,
    weighted: bool,
) -> Result<AnalysisInput> {
    let top_k = table.top_k.or(top_k_fallback).ok_or_else(|| {
        StatsError::InvalidInput(
            "top_k is unknown: give it in manifest.json, --model DIR or --top-k".into(),
        )
    })?;
    let rows = table
        .prompts
        .into_iter()
        .map(|p| PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        })
        .collect();
    build_input(table.num_layers, table.num_experts, top_k, weighted, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, cat: Option<&str>, counts: Vec<f64>) -> PromptRow {
        PromptRow {
            prompt_id: id.into(),
            category: cat.map(Into::into),
            counts,
            tokens_per_layer: vec![],
        }
    }

    #[test]
    fn drops_empty_layer_and_sorts_categories() {
        let rows = vec![
            row("a", Some("zeta"), vec![1., 1., 2., 0.]),
            row("b", Some("alpha"), vec![1., 0., 0., 1.]),
            row("c", Some("zeta"), vec![0., 0., 1., 1.]),
            row("d", Some("alpha"), vec![2., 0., 0., 2.]),
            row("e", Some("zeta"), vec![0., 1., 1., 1.]),
        ];
        let inp = build_input(2, 2, 1, false, rows).unwrap();
        assert_eq!(inp.categories, vec!["alpha", "zeta"]);
        assert_eq!(inp.prompt_ids, vec!["a", "b", "d", "e"]);
        assert_eq!(inp.labels, vec![1, 0, 0, 1]);
        assert_eq!(inp.dropped.len(), 1);
        assert_eq!(inp.dropped[0].prompt_id, "c");
        assert!(inp.dropped[0].reason.contains("layer 0"));
        assert_eq!(inp.tokens_per_layer, vec![2, 2, 1, 1, 2, 2, 1, 2]);
    }

    #[test]
    fn one_category_is_an_error() {
        let rows = vec![
            row("a", Some("x"), vec![1., 1.]),
            row("b", Some("x"), vec![1., 1.]),
            row("c", Some("y"), vec![1., 1.]),
        ];
        let err = build_input(1, 2, 1, false, rows).unwrap_err().to_string();
        assert!(err.contains("at least 2 categories"), "{err}");
    }

    #[test]
    fn missing_category_and_bad_shapes_are_errors() {
        let rows = vec![row("a", None, vec![1., 1.])];
        let err = build_input(1, 2, 1, false, rows).unwrap_err().to_string();
        assert!(
            err.contains("no category") && err.contains("\"a\""),
            "{err}"
        );
        let rows = vec![row("a", Some("x"), vec![1., 1., 1.])];
        assert!(build_input(1, 2, 1, false, rows).is_err());
        let rows = vec![row("a", Some("x"), vec![1., f64::NAN])];
        assert!(build_input(1, 2, 1, false, rows).is_err());
        assert!(build_input(1, 2, 3, false, vec![]).is_err());
    }

    #[test]
    fn huge_dimensions_are_refused_before_allocating() {
        for (l, e, needle) in [
            (1usize << 40, 4usize, "num_layers = 1099511627776 exceeds"),
            (4, 1 << 63, "num_experts = 9223372036854775808 exceeds"),
            (
                usize::MAX,
                usize::MAX,
                "num_layers = 18446744073709551615 exceeds",
            ),
            (4096, 4096, "num_layers × num_experts"),
        ] {
            let rows = vec![row("a", Some("x"), vec![1.0; 4])];
            let err = build_input(l, e, 1, false, rows).unwrap_err().to_string();
            assert!(err.contains(needle), "{l} {e}: {err}");
        }
        let row = row("a", Some("x"), vec![1.0; 4]);
        let err = check_row(&row, usize::MAX, 2).unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
    }
}
