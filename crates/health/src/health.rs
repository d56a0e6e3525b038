//! Streaming routing-health accumulator and the health report.
//!
//! Memory is O(L·E²) for the co-activation matrices plus O(L·E) per prompt only when per-prompt
//! counts are kept (`keep_prompts`, needed by `compare` and the mutual information).

use std::collections::HashMap;

use serde::Serialize;

use crate::exact::ExactMoments;
use crate::metrics;
use crate::{HealthError, Result};
use moe_xray_trace::limits::{check_dims, check_table};
use moe_xray_trace::reader::first_duplicate;
use moe_xray_trace::TokenType;

/// Largest number of co-activation counters `L·E²` kept (2^26, 512 MiB); beyond it co-activation
/// is not computed and the report says so (`notes`).
pub const MAX_COACTIVATION_CELLS: usize = 1 << 26;

/// Options of the health computation.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// Token types counted (default: prompt and generation).
    pub token_types: Vec<TokenType>,
    /// An expert is *cold* at a layer when it was selected at least once but its load share is
    /// below `cold_fraction / E` (default 0.1).
    pub cold_fraction: f64,
    /// Number of strongest co-activation pairs reported per layer (default 10).
    pub top_pairs: usize,
    /// Keep per-prompt L×E counts (for `compare` and mutual information).
    pub keep_prompts: bool,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            token_types: vec![TokenType::Prompt, TokenType::Generation],
            cold_fraction: 0.1,
            top_pairs: 10,
            keep_prompts: false,
        }
    }
}

/// Counts of one prompt (layer-major L×E selection counts over the selected token types).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLoad {
    pub prompt_id: String,
    pub category: Option<String>,
    pub counts: Vec<f64>,
}

/// One token at one layer: the selected experts and, when recorded, the full router distribution.
#[derive(Debug, Clone, Copy)]
pub struct TokenRouting<'a> {
    pub prompt_id: &'a str,
    pub category: Option<&'a str>,
    pub layer: usize,
    pub token_type: TokenType,
    /// Selected experts (distinct), in descending router probability.
    pub experts: &'a [u32],
    /// The full router distribution over all experts (`probs`), when recorded.
    pub probs: Option<&'a [f32]>,
}

/// Accumulates routing health from records (per token) and counts lines (per prompt).
#[derive(Debug, Clone)]
pub struct HealthAccumulator {
    /// Rows: the MoE layers (every decoder layer unless some are dense).
    pub(crate) num_layers: usize,
    pub(crate) num_experts: usize,
    /// Decoder-layer index of each row.
    pub(crate) layer_ids: Vec<usize>,
    /// For each decoder layer its row, `None` for a dense layer.
    pub(crate) row_of: Vec<Option<usize>>,
    pub(crate) opts: HealthOptions,
    pub(crate) load: Vec<f64>,
    pub(crate) tokens: Vec<u64>,
    /// `L·E·E` co-activation counts (full symmetric matrices, diagonal = per-token load); empty
    /// when `L·E²` exceeds [`MAX_COACTIVATION_CELLS`].
    pub(crate) coact: Vec<u64>,
    pub(crate) coact_too_large: bool,
    pub(crate) per_token_records: u64,
    pub(crate) counts_lines: u64,
    pub(crate) entropy: Vec<ExactMoments>,
    pub(crate) margin: Vec<ExactMoments>,
    pub(crate) top_k: Option<usize>,
    pub(crate) top_k_varies: bool,
    pub(crate) prompts: Vec<PromptLoad>,
    pub(crate) prompt_index: HashMap<String, usize>,
    pub(crate) scratch: Vec<f64>,
}

impl HealthAccumulator {
    /// Errors when the dimensions are zero or beyond `moe_xray_trace::limits` (nothing is
    /// allocated before they are checked).
    pub fn new(num_layers: usize, num_experts: usize, opts: HealthOptions) -> Result<Self> {
        let all: Vec<u32> =
            (0..num_layers.min(moe_xray_trace::limits::MAX_LAYERS) as u32).collect();
        Self::with_layers(num_layers, &all, num_experts, opts)
    }

    /// An accumulator for a model of `decoder_layers` decoder layers of which `moe_layers`
    /// (ascending, distinct, below `decoder_layers`, as the manifest's `routing.moe_layers`)
    /// have a router; the others are dense and must not appear in the input. Rows, report
    /// layers and per-prompt counts are the MoE layers in decoder order, labelled with their
    /// decoder-layer index.
    pub fn with_layers(
        decoder_layers: usize,
        moe_layers: &[u32],
        num_experts: usize,
        opts: HealthOptions,
    ) -> Result<Self> {
        if decoder_layers == 0 || num_experts == 0 {
            return Err(HealthError::InvalidInput(format!(
                "need at least one layer and one expert (got {decoder_layers} layers, {num_experts} experts)"
            )));
        }
        check_dims(decoder_layers, num_experts, None).map_err(HealthError::InvalidInput)?;
        let mut row_of = vec![None; decoder_layers];
        let mut prev = None;
        for (row, &l) in moe_layers.iter().enumerate() {
            let slot = row_of
                .get_mut(l as usize)
                .filter(|_| prev.is_none_or(|p| l > p));
            match slot {
                Some(s) => *s = Some(row),
                None => {
                    return Err(HealthError::InvalidInput(format!(
                        "MoE layers must be ascending, distinct and below num_layers = {decoder_layers} (got {l})"
                    )))
                }
            }
            prev = Some(l);
        }
        let num_layers = moe_layers.len();
        if num_layers == 0 {
            return Err(HealthError::InvalidInput(
                "need at least one MoE layer (every layer is dense)".into(),
            ));
        }
        let le = check_dims(num_layers, num_experts, None).map_err(HealthError::InvalidInput)?;
        if !(opts.cold_fraction >= 0.0 && opts.cold_fraction.is_finite()) {
            return Err(HealthError::InvalidInput(format!(
                "--cold-fraction must be a finite non-negative number (got {})",
                opts.cold_fraction
            )));
        }
        let coact_cells = le
            .checked_mul(num_experts)
            .filter(|&c| c <= MAX_COACTIVATION_CELLS);
        Ok(HealthAccumulator {
            num_layers,
            num_experts,
            layer_ids: moe_layers.iter().map(|&l| l as usize).collect(),
            row_of,
            opts,
            load: vec![0.0; le],
            tokens: vec![0; num_layers],
            coact: vec![0; coact_cells.unwrap_or(0)],
            coact_too_large: coact_cells.is_none(),
            per_token_records: 0,
            counts_lines: 0,
            entropy: vec![ExactMoments::default(); num_layers],
            margin: vec![ExactMoments::default(); num_layers],
            top_k: None,
            top_k_varies: false,
            prompts: Vec::new(),
            prompt_index: HashMap::new(),
            scratch: Vec::with_capacity(num_experts),
        })
    }

    /// Number of MoE layers (the rows of the load, of the per-prompt counts and of the report).
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Number of decoder layers (the range of `layer` in the input).
    pub fn num_decoder_layers(&self) -> usize {
        self.row_of.len()
    }

    /// Decoder-layer index of each row.
    pub fn layer_ids(&self) -> &[usize] {
        &self.layer_ids
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    fn wants(&self, t: TokenType) -> bool {
        self.opts.token_types.contains(&t)
    }

    /// Index of the prompt's kept counts (`None` unless `keep_prompts`); errors when one more
    /// prompt would exceed `moe_xray_trace::limits::MAX_TABLE_CELLS`.
    fn prompt_slot(
        &mut self,
        prompt_id: &str,
        category: Option<&str>,
    ) -> std::result::Result<Option<usize>, String> {
        if !self.opts.keep_prompts {
            return Ok(None);
        }
        if let Some(&i) = self.prompt_index.get(prompt_id) {
            if self.prompts[i].category.is_none() {
                self.prompts[i].category = category.map(str::to_string);
            }
            return Ok(Some(i));
        }
        let i = self.prompts.len();
        let le = self.load.len();
        check_table(i + 1, le, 0)?;
        self.prompts.push(PromptLoad {
            prompt_id: prompt_id.to_string(),
            category: category.map(str::to_string),
            counts: vec![0.0; le],
        });
        self.prompt_index.insert(prompt_id.to_string(), i);
        Ok(Some(i))
    }

    /// Adds one token at one layer. Errors (layer/expert out of range, repeated expert, wrong
    /// `probs` length) are returned as messages for the caller to attach file and line to.
    pub fn add_token(&mut self, t: &TokenRouting<'_>) -> std::result::Result<(), String> {
        let (l_n, e_n) = (self.row_of.len(), self.num_experts);
        let row = match self.row_of.get(t.layer) {
            None => return Err(format!("layer {} out of range (num_layers {l_n})", t.layer)),
            Some(None) => {
                return Err(format!(
                    "layer {} is a dense layer (routing.dense_layers in the manifest): dense layers have no router and no routing records",
                    t.layer
                ))
            }
            Some(Some(r)) => *r,
        };
        if let Some(&x) = t.experts.iter().find(|&&x| x as usize >= e_n) {
            return Err(format!("expert {x} out of range (num_experts {e_n})"));
        }
        if let Some(x) = first_duplicate(t.experts) {
            return Err(format!("expert {x} selected twice for the same token"));
        }
        if let Some(p) = t.probs {
            if p.len() != e_n {
                return Err(format!(
                    "`probs` has {} entries, expected num_experts = {e_n}",
                    p.len()
                ));
            }
        }
        if !self.wants(t.token_type) {
            return Ok(());
        }
        let k = t.experts.len();
        match self.top_k {
            None => self.top_k = Some(k),
            Some(k0) if k0 != k => self.top_k_varies = true,
            Some(_) => {}
        }
        let slot = self.prompt_slot(t.prompt_id, t.category)?;
        self.per_token_records += 1;
        self.tokens[row] = self.tokens[row].saturating_add(1);
        let base = row * e_n;
        for &x in t.experts {
            self.load[base + x as usize] += 1.0;
        }
        if !self.coact_too_large {
            let cbase = row * e_n * e_n;
            for &i in t.experts {
                let row = cbase + i as usize * e_n;
                for &j in t.experts {
                    self.coact[row + j as usize] += 1;
                }
            }
        }
        if let Some(slot) = slot {
            let c = &mut self.prompts[slot].counts;
            for &x in t.experts {
                c[base + x as usize] += 1.0;
            }
        }
        if let Some(p) = t.probs {
            let (h, margin) = router_entropy_and_margin(p, k, &mut self.scratch);
            self.entropy[row].push(h);
            if let Some(m) = margin {
                self.margin[row].push(m);
            }
        }
        Ok(())
    }

    /// Adds a counts-mode line (L×E counts of one prompt and token type; `tokens` tokens, each
    /// with one decision per layer). Counts lines carry no per-token data, so after one of them
    /// co-activation is reported as unavailable.
    pub fn add_counts(
        &mut self,
        prompt_id: &str,
        category: Option<&str>,
        token_type: TokenType,
        counts: &[u64],
        tokens: u64,
    ) -> std::result::Result<(), String> {
        let e_n = self.num_experts;
        let le = self.row_of.len() * e_n;
        if counts.len() != le {
            return Err(format!(
                "`counts` has {} entries, expected num_layers × num_experts = {le}",
                counts.len()
            ));
        }
        // Rows of decoder layers: a dense layer's must be zero, the others are the MoE rows.
        for (l, row) in self.row_of.iter().enumerate() {
            if row.is_none() && counts[l * e_n..(l + 1) * e_n].iter().any(|&c| c != 0) {
                return Err(format!(
                    "layer {l} is a dense layer (routing.dense_layers in the manifest) but has non-zero counts"
                ));
            }
        }
        if !self.wants(token_type) {
            return Ok(());
        }
        let slot = self.prompt_slot(prompt_id, category)?;
        self.counts_lines += 1;
        for (l, row) in self.row_of.iter().enumerate() {
            let Some(r) = *row else { continue };
            let src = &counts[l * e_n..(l + 1) * e_n];
            for (a, &c) in self.load[r * e_n..(r + 1) * e_n].iter_mut().zip(src) {
                *a += c as f64;
            }
            if let Some(slot) = slot {
                let dst = &mut self.prompts[slot].counts[r * e_n..(r + 1) * e_n];
                for (a, &c) in dst.iter_mut().zip(src) {
                    *a += c as f64;
                }
            }
        }
        for t in &mut self.tokens {
            *t = t.saturating_add(tokens);
        }
        Ok(())
    }

    /// Per-layer load (`L·E`, layer-major).
    pub fn load(&self) -> &[f64] {
        &self.load
    }

    /// Whether co-activation is available (only per-token input was seen).
    pub fn has_coactivation(&self) -> bool {
        self.counts_lines == 0 && self.per_token_records > 0 && !self.coact_too_large
    }

    /// The E×E co-activation matrix of `layer` (row-major), `None` when unavailable.
    pub fn coactivation(&self, layer: usize) -> Option<&[u64]> {
        if !self.has_coactivation() || layer >= self.num_layers {
            return None;
        }
        let e = self.num_experts;
        Some(&self.coact[layer * e * e..(layer + 1) * e * e])
    }

    /// The kept per-prompt counts (empty unless `keep_prompts`).
    pub fn prompts(&self) -> &[PromptLoad] {
        &self.prompts
    }

    /// Consumes the accumulator, returning the per-prompt counts.
    pub fn into_prompts(self) -> Vec<PromptLoad> {
        self.prompts
    }

    /// Builds the report.
    pub fn report(&self) -> HealthReport {
        let e_n = self.num_experts;
        let uniform = 1.0 / e_n as f64;
        let coact = self.has_coactivation();
        let any_probs = self.entropy.iter().any(|m| m.count() > 0);
        let mut layers = Vec::with_capacity(self.num_layers);
        for l in 0..self.num_layers {
            let load = &self.load[l * e_n..(l + 1) * e_n];
            let total: f64 = load.iter().sum();
            let share = metrics::shares(load);
            let dead: Vec<usize> = (0..e_n).filter(|&e| load[e] == 0.0).collect();
            let cold: Vec<usize> = (0..e_n)
                .filter(|&e| load[e] > 0.0 && share[e] < self.opts.cold_fraction * uniform)
                .collect();
            let router = (self.entropy[l].count() > 0).then(|| {
                let h = &self.entropy[l];
                let m = &self.margin[l];
                let h_mean = h.mean();
                RouterStats {
                    tokens: h.count(),
                    entropy_mean: h_mean,
                    entropy_std: h.std(),
                    normalized_entropy_mean: if e_n > 1 {
                        h_mean / (e_n as f64).ln()
                    } else {
                        0.0
                    },
                    margin_tokens: m.count(),
                    margin_mean: m.mean(),
                    margin_std: m.std(),
                    margin_min: m.min(),
                }
            });
            let top_pairs = coact.then(|| {
                top_pairs(
                    self.coactivation(l).unwrap_or(&[]),
                    load,
                    self.tokens[l],
                    e_n,
                    self.opts.top_pairs,
                )
            });
            layers.push(LayerHealth {
                layer: self.layer_ids[l],
                tokens: self.tokens[l],
                selections: total,
                normalized_entropy: metrics::normalized_entropy(load),
                entropy_nats: metrics::entropy_nats(load),
                max_mean_ratio: metrics::max_mean_ratio(load),
                gini: metrics::gini(load),
                jain: metrics::jain(load),
                dead_experts: dead,
                cold_experts: cold,
                load: load.to_vec(),
                share,
                router,
                top_pairs,
            });
        }
        let mut notes = Vec::new();
        if self.coact_too_large {
            notes.push(format!(
                "co-activation not computed: num_layers × num_experts² = {} × {}² exceeds the limit of {MAX_COACTIVATION_CELLS} counters",
                self.num_layers, e_n
            ));
        } else if !coact {
            notes.push(
                "co-activation needs per-token input (routing records or flat events); counts-mode traces only give per-prompt totals"
                    .to_string(),
            );
        }
        if !any_probs {
            notes.push(
                "router entropy and top-k margin need the full router distribution (`probs`, captured with --record-probs in records mode)"
                    .to_string(),
            );
        }
        if self.top_k_varies {
            notes.push("the number of selected experts varies between tokens".to_string());
        }
        let overall = overall(&layers);
        HealthReport {
            schema_version: 1,
            num_layers: self.num_layers,
            num_experts: e_n,
            top_k: if self.top_k_varies { None } else { self.top_k },
            cold_fraction: self.opts.cold_fraction,
            token_types: self
                .opts
                .token_types
                .iter()
                .map(|t| t.as_str().to_string())
                .collect(),
            inputs: InputSummary {
                token_records: self.per_token_records,
                counts_lines: self.counts_lines,
                records_with_probs: self.entropy.iter().map(|m| m.count()).sum(),
            },
            available: Availability {
                coactivation: coact,
                router_distribution: any_probs,
            },
            notes,
            overall,
            layers,
        }
    }
}

impl HealthReport {
    /// Compact summary (scalars only: dimensions, inputs and the overall block) for the HTML
    /// report's health table.
    pub fn summary(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "cold_fraction": self.cold_fraction,
            "token_records": self.inputs.token_records,
            "counts_lines": self.inputs.counts_lines,
            "coactivation_available": self.available.coactivation,
            "router_distribution_available": self.available.router_distribution,
        });
        if let (Some(obj), Ok(serde_json::Value::Object(o))) =
            (v.as_object_mut(), serde_json::to_value(&self.overall))
        {
            obj.extend(o);
        }
        v
    }
}

/// Entropy (nats) of the full router distribution (renormalised to sum 1 in f64) and the top-k
/// margin `p_(k) − p_(k+1)` of the sorted probabilities (`None` when `k = 0` or `k ≥ E`).
pub fn router_entropy_and_margin(
    probs: &[f32],
    k: usize,
    scratch: &mut Vec<f64>,
) -> (f64, Option<f64>) {
    scratch.clear();
    scratch.extend(probs.iter().map(|&p| (p as f64).max(0.0)));
    let total: f64 = scratch.iter().sum();
    if total > 0.0 {
        for p in scratch.iter_mut() {
            *p /= total;
        }
    }
    let h = metrics::entropy_nats(scratch);
    let margin = if k >= 1 && k < scratch.len() {
        scratch.sort_by(|a, b| b.total_cmp(a));
        Some(scratch[k - 1] - scratch[k])
    } else {
        None
    };
    (h, margin)
}

/// Strongest co-activation pairs `i < j` by lift `= observed / expected`, with
/// `expected = load_i · load_j / T` (independent selection at the observed marginal rates, T =
/// tokens at the layer). Pairs never observed together are excluded; ties broken by count
/// (descending), then `(i, j)` ascending.
pub fn top_pairs(coact: &[u64], load: &[f64], tokens: u64, e: usize, n: usize) -> Vec<PairStat> {
    let mut pairs = Vec::new();
    if tokens == 0 {
        return pairs;
    }
    for i in 0..e {
        for j in i + 1..e {
            let c = coact[i * e + j];
            if c == 0 {
                continue;
            }
            let expected = load[i] * load[j] / tokens as f64;
            pairs.push(PairStat {
                i,
                j,
                count: c,
                expected,
                lift: c as f64 / expected,
            });
        }
    }
    pairs.sort_by(|a, b| {
        b.lift
            .total_cmp(&a.lift)
            .then(b.count.cmp(&a.count))
            .then((a.i, a.j).cmp(&(b.i, b.j)))
    });
    pairs.truncate(n);
    pairs
}

fn overall(layers: &[LayerHealth]) -> OverallHealth {
    let n = layers.len() as f64;
    let mean = |f: &dyn Fn(&LayerHealth) -> f64| layers.iter().map(f).sum::<f64>() / n;
    let (mut worst, mut worst_h) = (0, f64::INFINITY);
    for l in layers {
        if l.normalized_entropy < worst_h {
            worst_h = l.normalized_entropy;
            worst = l.layer;
        }
    }
    let routers: Vec<&RouterStats> = layers.iter().filter_map(|l| l.router.as_ref()).collect();
    OverallHealth {
        mean_normalized_entropy: mean(&|l| l.normalized_entropy),
        min_normalized_entropy: worst_h,
        least_balanced_layer: worst,
        mean_gini: mean(&|l| l.gini),
        max_gini: layers.iter().map(|l| l.gini).fold(0.0, f64::max),
        mean_jain: mean(&|l| l.jain),
        min_jain: layers.iter().map(|l| l.jain).fold(f64::INFINITY, f64::min),
        max_max_mean_ratio: layers.iter().map(|l| l.max_mean_ratio).fold(0.0, f64::max),
        dead_experts: layers.iter().map(|l| l.dead_experts.len()).sum(),
        cold_experts: layers.iter().map(|l| l.cold_experts.len()).sum(),
        router_entropy_mean: (!routers.is_empty())
            .then(|| routers.iter().map(|r| r.entropy_mean).sum::<f64>() / routers.len() as f64),
        router_margin_mean: (!routers.is_empty() && routers.iter().all(|r| r.margin_tokens > 0))
            .then(|| routers.iter().map(|r| r.margin_mean).sum::<f64>() / routers.len() as f64),
    }
}

/// The health report (`moe-xray health --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthReport {
    pub schema_version: u32,
    pub num_layers: usize,
    pub num_experts: usize,
    /// Number of experts selected per token (`null` for counts-only input or when it varies).
    pub top_k: Option<usize>,
    pub cold_fraction: f64,
    pub token_types: Vec<String>,
    pub inputs: InputSummary,
    pub available: Availability,
    /// What could not be computed from this input and why.
    pub notes: Vec<String>,
    pub overall: OverallHealth,
    pub layers: Vec<LayerHealth>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InputSummary {
    /// Per-token (token, layer) records counted.
    pub token_records: u64,
    /// Counts-mode lines counted.
    pub counts_lines: u64,
    /// Records that carried the full router distribution.
    pub records_with_probs: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Availability {
    pub coactivation: bool,
    pub router_distribution: bool,
}

/// Summary over layers (mean / worst layer).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OverallHealth {
    pub mean_normalized_entropy: f64,
    pub min_normalized_entropy: f64,
    pub least_balanced_layer: usize,
    pub mean_gini: f64,
    pub max_gini: f64,
    pub mean_jain: f64,
    pub min_jain: f64,
    pub max_max_mean_ratio: f64,
    /// Total (layer, expert) pairs never selected.
    pub dead_experts: usize,
    /// Total (layer, expert) pairs that are cold.
    pub cold_experts: usize,
    /// Mean over layers of the mean per-token router entropy (nats).
    pub router_entropy_mean: Option<f64>,
    /// Mean over layers of the mean top-k margin.
    pub router_margin_mean: Option<f64>,
}

/// Health of one layer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerHealth {
    pub layer: usize,
    /// Tokens routed at this layer.
    pub tokens: u64,
    /// Total selections (Σ load).
    pub selections: f64,
    pub normalized_entropy: f64,
    pub entropy_nats: f64,
    pub max_mean_ratio: f64,
    pub gini: f64,
    pub jain: f64,
    pub dead_experts: Vec<usize>,
    pub cold_experts: Vec<usize>,
    pub load: Vec<f64>,
    pub share: Vec<f64>,
    /// Per-token router entropy and top-k margin (only when `probs` were recorded).
    pub router: Option<RouterStats>,
    /// Strongest co-activation pairs (only with per-token input).
    pub top_pairs: Option<Vec<PairStat>>,
}

/// Per-token router statistics of one layer (std with ddof = 0).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouterStats {
    pub tokens: u64,
    pub entropy_mean: f64,
    pub entropy_std: f64,
    pub normalized_entropy_mean: f64,
    pub margin_tokens: u64,
    pub margin_mean: f64,
    pub margin_std: f64,
    pub margin_min: f64,
}

/// One co-activated expert pair.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairStat {
    pub i: usize,
    pub j: usize,
    pub count: u64,
    pub expected: f64,
    pub lift: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok<'a>(layer: usize, experts: &'a [u32], probs: Option<&'a [f32]>) -> TokenRouting<'a> {
        TokenRouting {
            prompt_id: "p",
            category: Some("c"),
            layer,
            token_type: TokenType::Prompt,
            experts,
            probs,
        }
    }

    #[test]
    fn coactivation_diagonal_is_load_and_symmetric() {
        let mut acc = HealthAccumulator::new(1, 4, HealthOptions::default()).unwrap();
        acc.add_token(&tok(0, &[0, 1], None)).unwrap();
        acc.add_token(&tok(0, &[1, 2], None)).unwrap();
        acc.add_token(&tok(0, &[1, 0], None)).unwrap();
        let c = acc.coactivation(0).unwrap();
        assert_eq!(c, &[2, 2, 0, 0, 2, 3, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
        let r = acc.report();
        assert_eq!(r.layers[0].dead_experts, vec![3]);
        assert_eq!(r.layers[0].load, vec![2.0, 3.0, 1.0, 0.0]);
        assert_eq!(r.top_k, Some(2));
        let pairs = r.layers[0].top_pairs.as_ref().unwrap();
        // (0,1): 2 / (2*3/3) = 1; (1,2): 1 / (3*1/3) = 1 -> tie on lift, count decides
        assert_eq!((pairs[0].i, pairs[0].j, pairs[0].count), (0, 1, 2));
        assert!((pairs[0].lift - 1.0).abs() < 1e-15);
    }

    #[test]
    fn counts_input_disables_coactivation_and_says_why() {
        let mut acc = HealthAccumulator::new(2, 2, HealthOptions::default()).unwrap();
        acc.add_counts("p", None, TokenType::Prompt, &[3, 1, 2, 2], 2)
            .unwrap();
        let r = acc.report();
        assert!(!r.available.coactivation && !r.available.router_distribution);
        assert!(r.layers[0].top_pairs.is_none());
        assert_eq!(r.notes.len(), 2);
        assert!(r.notes[0].contains("co-activation"));
        assert_eq!(r.layers[1].normalized_entropy, 1.0);
        let sum = r.summary();
        assert_eq!(sum["dead_experts"], 0);
        assert_eq!(sum["coactivation_available"], false);
        assert!(sum.get("layers").is_none());
        assert!(acc
            .add_counts("p", None, TokenType::Prompt, &[1], 1)
            .is_err());
    }

    #[test]
    fn cold_and_token_type_filter() {
        let opts = HealthOptions {
            token_types: vec![TokenType::Prompt],
            cold_fraction: 0.5,
            ..Default::default()
        };
        let mut acc = HealthAccumulator::new(1, 4, opts).unwrap();
        // shares 10/21, 10/21, 1/21 (< 0.5/4), 0 (dead, not cold)
        acc.add_counts("p", None, TokenType::Prompt, &[10, 10, 1, 0], 10)
            .unwrap();
        acc.add_counts("p", None, TokenType::Generation, &[0, 0, 0, 100], 50)
            .unwrap();
        let r = acc.report();
        assert_eq!(r.layers[0].cold_experts, vec![2]);
        assert_eq!(r.layers[0].dead_experts, vec![3]);
        assert_eq!(r.inputs.counts_lines, 1);
    }

    #[test]
    fn router_entropy_and_margin_values() {
        let mut s = Vec::new();
        let (h, m) = router_entropy_and_margin(&[0.5, 0.25, 0.125, 0.125], 2, &mut s);
        let want = 0.5 * 2f64.ln() + 0.25 * 4f64.ln() + 0.25 * 8f64.ln();
        assert!((h - want).abs() < 1e-12);
        assert_eq!(m, Some(0.125));
        let (_, m) = router_entropy_and_margin(&[0.5, 0.5], 2, &mut s);
        assert_eq!(m, None);
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let mut acc = HealthAccumulator::new(2, 4, HealthOptions::default()).unwrap();
        assert!(acc
            .add_token(&tok(2, &[0], None))
            .unwrap_err()
            .contains("layer 2"));
        assert!(acc
            .add_token(&tok(0, &[4], None))
            .unwrap_err()
            .contains("expert 4"));
        assert!(acc
            .add_token(&tok(0, &[1, 1], None))
            .unwrap_err()
            .contains("twice"));
        assert!(acc
            .add_token(&tok(0, &[1], Some(&[1.0])))
            .unwrap_err()
            .contains("probs"));
        assert!(HealthAccumulator::new(0, 4, HealthOptions::default()).is_err());
    }
}
