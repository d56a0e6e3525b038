//! Cross-model comparison of routing signatures (`moe-xray compare-models`; definitions in
//! `docs/statistics.md`, "Cross-model comparison"): two runs of the same prompts, possibly of
//! different models with different numbers of layers L and experts E, whose expert indices do
//! not correspond.
//!
//! - **RSA**: Spearman rank correlation of the upper triangles (pairs i<j) of the two
//!   prompt × prompt similarity matrices, with a one-sided Mantel permutation p (the prompt labels
//!   of B's matrix permuted, rows and columns together).
//! - **Linear CKA** between the two centred signature matrices (N × L_A·E_A and N × L_B·E_B).
//! - Both per layer pair (an L_A × L_B matrix of each), when the memory allows.
//! - Per-category Cohen's d of both similarity matrices on the shared prompts.
//! - For the same architecture (same L, E and MoE layers): the experts of B matched to those of A
//!   per layer by usage profile (the Hungarian algorithm, `pathfinding`'s `kuhn_munkres`), the
//!   relabelling that [`relabel_counts`] applies before the drift measures of `moe-xray compare`.
//!
//! Everything here is plain statistics on slices; reading the analysis directories and the drift
//! (routing-health comparison) are in `moe_xray_pipeline::compare_models`.

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::Serialize;

use crate::results::Section;
use crate::similarity::{gram, mean_std};
use crate::{sub_rng, Result, StatsError};

/// `schema_version` of the cross-model JSON (`docs/crossmodel.schema.json`).
pub const SCHEMA_VERSION: u32 = 1;

/// Stream tag of the Mantel permutations (see [`crate::sub_rng`]; tags 1–9 are the analysis').
pub const MANTEL_TAG: u64 = crate::tags::MANTEL;

/// Largest number of Mantel permutations accepted.
pub const MAX_MANTEL_REPS: usize = 10_000_000;

/// Largest number of shared prompts (an N × N matrix of ranks is held per side).
pub const MAX_PROMPTS: usize = 16_384;

/// Largest number of f64 values held by the per-layer matrices ((L_A + L_B) · N²); above it the
/// per-layer section is skipped with the reason.
pub const MAX_PER_LAYER_VALUES: usize = 1 << 25;

/// Scale of the integer weights given to the Hungarian algorithm (see [`match_experts`]).
pub const MATCH_SCALE: f64 = (1u64 << 40) as f64;

/// One model's side of the comparison: signatures of the shared prompts, in the common order.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// L (MoE layers).
    pub num_layers: usize,
    /// E.
    pub num_experts: usize,
    /// Decoder-layer index of each signature layer.
    pub layers: &'a [usize],
    /// N × (L·E) signatures, row-major, layer-major within a row (`s_i[l,e]`).
    pub signatures: &'a [f64],
}

impl Side<'_> {
    fn dim(&self) -> usize {
        self.num_layers * self.num_experts
    }

    fn check(&self, what: &str, n: usize) -> Result<()> {
        let d = moe_xray_trace::limits::check_dims(self.num_layers, self.num_experts, None)
            .map_err(|m| StatsError::InvalidInput(format!("{what}: {m}")))?;
        if self.layers.len() != self.num_layers {
            return Err(StatsError::Dimension(format!(
                "{what}: {} layer labels for {} layers",
                self.layers.len(),
                self.num_layers
            )));
        }
        if Some(self.signatures.len()) != n.checked_mul(d) {
            return Err(StatsError::Dimension(format!(
                "{what}: {} signature values, expected {n} prompts × {d}",
                self.signatures.len()
            )));
        }
        if let Some(i) = self.signatures.iter().position(|x| !x.is_finite()) {
            return Err(StatsError::InvalidInput(format!(
                "{what}: non-finite signature value (prompt {}, column {})",
                i / d,
                i % d
            )));
        }
        Ok(())
    }
}

/// Options of [`compare_signatures`].
#[derive(Debug, Clone)]
pub struct CrossModelOptions {
    /// Mantel permutations (0 skips the test; default 1000).
    pub reps: usize,
    /// Seed of the permutations (default 0).
    pub seed: u64,
}

impl Default for CrossModelOptions {
    fn default() -> Self {
        CrossModelOptions {
            reps: 1000,
            seed: 0,
        }
    }
}

/// The Mantel permutation test of the RSA coefficient.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Mantel {
    pub reps: usize,
    pub seed: u64,
    /// Mean of the permutation null of the Spearman coefficient.
    pub null_mean: f64,
    /// Its std (ddof = 1; 0 with one repetition).
    pub null_std: f64,
    /// One-sided `(1 + #{null ≥ observed}) / (1 + reps)`.
    pub p: f64,
}

/// Representational similarity analysis of the two prompt × prompt similarity matrices.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Rsa {
    /// Number of entries compared: N(N−1)/2 pairs i<j.
    pub pairs: u64,
    /// Spearman rank correlation of the two upper triangles (`null` when either is constant).
    pub spearman: Option<f64>,
    /// The Mantel permutation test (skipped with `--reps 0` or when `spearman` is undefined).
    pub mantel: Section<Mantel>,
}

/// CKA and RSA of every layer pair (layer l of A with layer m of B).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PerLayer {
    /// Decoder-layer indices of A's MoE layers (rows).
    pub layers_a: Vec<usize>,
    /// Decoder-layer indices of B's MoE layers (columns).
    pub layers_b: Vec<usize>,
    /// `cka[l][m]`: linear CKA of A's layer-l signatures (N × E_A) and B's layer-m signatures.
    pub cka: Vec<Vec<Option<f64>>>,
    /// `rsa[l][m]`: Spearman correlation of the per-layer cosine matrices `cos(s_i[l], s_j[l])`.
    pub rsa: Vec<Vec<Option<f64>>>,
}

/// Cohen's d of one category on the shared prompts, in both models.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct CategoryRow {
    pub category: String,
    /// Shared prompts of the category.
    pub n: usize,
    /// d of pairs inside the category against pairs with one prompt in it, model A.
    pub d_a: Option<f64>,
    /// The same for model B.
    pub d_b: Option<f64>,
    /// Recall of the category by A's classifier (`results.json` `logreg_5fold.confusion`).
    pub recall_a: Option<f64>,
    /// The same for B.
    pub recall_b: Option<f64>,
}

/// A number of both models.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Pair {
    pub a: Option<f64>,
    pub b: Option<f64>,
}

/// Task separation of both models side by side.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct CategoryComparison {
    /// `similarity.cohens_d` of each `results.json` (all prompts of that analysis).
    pub cohens_d: Pair,
    /// Cohen's d (within vs across) recomputed on the shared prompts.
    pub cohens_d_shared: Pair,
    /// `logreg_5fold.accuracy_mean` of each `results.json` (`null` when skipped).
    pub accuracy: Pair,
    /// `logreg_5fold.chance`.
    pub chance: Pair,
    /// `logreg_5fold.macro_f1_oof`.
    pub macro_f1: Pair,
    /// One row per category (sorted by name).
    pub per_category: Vec<CategoryRow>,
}

/// The matching of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct LayerMatch {
    /// Decoder-layer index.
    pub layer: usize,
    /// `assignment[e]` = the expert of B matched to expert e of A.
    pub assignment: Vec<usize>,
    /// Experts with `assignment[e] ≠ e`.
    pub moved: usize,
    /// `‖S_A,l − S_B,l‖_F` (N × E blocks of the signatures, experts as numbered).
    pub distance_identity: f64,
    /// `‖S_A,l − S_B,l P‖_F` after the matching.
    pub distance_matched: f64,
}

/// Experts of B matched to those of A, per layer (same architecture only).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ExpertMatching {
    pub method: String,
    pub layers: Vec<LayerMatch>,
    /// Σ moved over layers.
    pub moved: usize,
}

/// The drift measures of `moe-xray compare` (docs/health.md) for one labelling of B's experts.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Drift {
    /// Per-layer JS divergence (bits) of the pooled loads, in layer order.
    pub js_bits: Vec<f64>,
    pub mean_js_bits: f64,
    pub max_js_bits: f64,
    /// Mean over shared prompts of `1 − sim(s_A, s_B)`.
    pub mean_shift: Option<f64>,
    /// p of the run-label permutation test of the mean JS (`null` with `--reps 0`).
    pub permutation_p: Option<f64>,
}

/// Drift as numbered and after the matching.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct MatchedDrift {
    /// B's experts as numbered (what `moe-xray compare` reports).
    pub unmatched: Drift,
    /// B's experts relabelled by the matching.
    pub matched: Drift,
}

/// One compared model.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ModelInfo {
    /// The directory given.
    pub label: String,
    /// `input.manifest.model` of its results.json, when present.
    pub model: Option<String>,
    /// `input.manifest.routing.family`, when present.
    pub family: Option<String>,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Decoder-layer index of each MoE layer.
    pub layers: Vec<usize>,
    /// Prompts of its analysis.
    pub num_prompts: usize,
}

/// The whole cross-model comparison (`compare-models --json`; schema `docs/crossmodel.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(title = "moe-xray compare-models")]
pub struct CrossModelReport {
    pub schema_version: u32,
    pub tool_version: String,
    pub model_a: ModelInfo,
    pub model_b: ModelInfo,
    /// Prompts in both analyses (the statistics use these, in A's order).
    pub shared_prompts: usize,
    /// Prompt ids only in A's analysis.
    pub only_in_a: Vec<String>,
    /// Prompt ids only in B's analysis.
    pub only_in_b: Vec<String>,
    /// Same L, E and MoE layers (expert matching defined).
    pub same_architecture: bool,
    pub rsa: Rsa,
    /// Linear CKA of the two signature matrices (`null` when either is constant).
    pub cka: Option<f64>,
    pub per_layer: Section<PerLayer>,
    pub categories: CategoryComparison,
    pub expert_matching: Section<ExpertMatching>,
    pub matched_drift: Section<MatchedDrift>,
}

impl CrossModelReport {
    /// The JSON Schema of the report (committed as `docs/crossmodel.schema.json`).
    #[allow(clippy::expect_used)] // a schemars schema is plain JSON: serialising it cannot fail
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(CrossModelReport);
        serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
    }
}

/// `schema_version` of the N-run cross-model JSON (`compare-models` with three or more runs;
/// schema `docs/crossmodel-multi.schema.json`).
pub const MULTI_SCHEMA_VERSION: u32 = 1;

/// Largest number of runs of one `compare-models` call (N(N−1)/2 pairwise comparisons).
pub const MAX_MODELS: usize = 32;

/// A category of the prompts shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct CategoryCount {
    pub category: String,
    /// Shared prompts of the category.
    pub n: usize,
}

/// One model's value of a per-category statistic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct CategoryCell {
    /// d of pairs inside the category against pairs with one prompt in it (shared prompts).
    pub d: Option<f64>,
    /// Recall of the category by the model's own classifier (`logreg_5fold.confusion`).
    pub recall: Option<f64>,
}

/// Task separation of one model (one column of the side-by-side table).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ModelSeparation {
    /// `similarity.cohens_d` of its `results.json` (all prompts of that analysis).
    pub cohens_d: Option<f64>,
    /// Cohen's d recomputed on the prompts shared by every run.
    pub cohens_d_shared: Option<f64>,
    /// `logreg_5fold.accuracy_mean`.
    pub accuracy: Option<f64>,
    /// `logreg_5fold.chance`.
    pub chance: Option<f64>,
    /// `logreg_5fold.macro_f1_oof`.
    pub macro_f1: Option<f64>,
    /// One cell per category, in `MultiModelReport::categories` order.
    pub per_category: Vec<CategoryCell>,
}

/// The N × N matrices of the pairwise comparisons (symmetric; row i, column j compares run i
/// with run j; the diagonal is `null`: a run against itself is 1 by definition and untested).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PairwiseMatrices {
    /// RSA: Spearman correlation of the two prompt × prompt similarity matrices.
    pub rsa: Vec<Vec<Option<f64>>>,
    /// One-sided Mantel permutation p of the RSA coefficient (`null` when skipped).
    pub mantel_p: Vec<Vec<Option<f64>>>,
    /// Linear CKA of the two signature matrices.
    pub cka: Vec<Vec<Option<f64>>>,
}

/// The two-run comparison of runs `a` < `b` (indices into `MultiModelReport::models`) on the
/// prompts shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PairComparison {
    pub a: usize,
    pub b: usize,
    /// Everything `compare-models A B` reports for the pair (its `only_in_a` / `only_in_b` list
    /// the prompts of each run that are not shared by every run).
    pub comparison: CrossModelReport,
}

/// The cross-model comparison of N ≥ 3 runs (`compare-models R1 R2 R3 … --json`; schema
/// `docs/crossmodel-multi.schema.json`). Every pair i<j is compared exactly as two runs are, on
/// the prompts shared by all runs, with the same seed.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[schemars(title = "moe-xray compare-models (N runs)")]
pub struct MultiModelReport {
    pub schema_version: u32,
    pub tool_version: String,
    /// The runs, in the order given.
    pub models: Vec<ModelInfo>,
    /// Prompts in every analysis (the statistics use these, in the first run's order).
    pub shared_prompts: usize,
    /// Per run: its prompt ids that are not in every analysis.
    pub not_shared: Vec<Vec<String>>,
    /// Categories of the shared prompts (sorted by name).
    pub categories: Vec<CategoryCount>,
    pub matrices: PairwiseMatrices,
    /// Task separation of each run, in `models` order.
    pub separation: Vec<ModelSeparation>,
    /// Every pair i<j, in row-major order (0,1), (0,2), …, (1,2), ….
    pub pairs: Vec<PairComparison>,
}

impl MultiModelReport {
    /// The JSON Schema of the report (committed as `docs/crossmodel-multi.schema.json`).
    #[allow(clippy::expect_used)] // a schemars schema is plain JSON: serialising it cannot fail
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(MultiModelReport);
        serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
    }

    /// Assembles the report from the pairwise comparisons of `n_models` runs: `pairs` must hold
    /// every pair i<j exactly once, in row-major order, all on the same shared prompts. The
    /// matrices and the per-run task separation are read from the pairs (run i's column from
    /// any pair that contains it: run 0 from (0,1) as A, run i > 0 from (0,i) as B).
    pub fn from_pairs(
        tool_version: &str,
        n_models: usize,
        not_shared: Vec<Vec<String>>,
        pairs: Vec<PairComparison>,
    ) -> Result<MultiModelReport> {
        if !(2..=MAX_MODELS).contains(&n_models) {
            return Err(StatsError::InvalidInput(format!(
                "{n_models} runs: compare-models takes 2 to {MAX_MODELS}"
            )));
        }
        let expected: Vec<(usize, usize)> = (0..n_models)
            .flat_map(|i| (i + 1..n_models).map(move |j| (i, j)))
            .collect();
        let got: Vec<(usize, usize)> = pairs.iter().map(|p| (p.a, p.b)).collect();
        if got != expected {
            return Err(StatsError::Dimension(format!(
                "pairwise comparisons {got:?}, expected {expected:?}"
            )));
        }
        if not_shared.len() != n_models {
            return Err(StatsError::Dimension(format!(
                "{} lists of unshared prompts for {n_models} runs",
                not_shared.len()
            )));
        }
        let first = &pairs[0].comparison;
        let names = |c: &CrossModelReport| -> Vec<(String, usize)> {
            c.categories
                .per_category
                .iter()
                .map(|r| (r.category.clone(), r.n))
                .collect()
        };
        let first_names = names(first);
        if let Some(p) = pairs.iter().find(|p| {
            p.comparison.shared_prompts != first.shared_prompts
                || names(&p.comparison) != first_names
        }) {
            return Err(StatsError::Dimension(format!(
                "pair ({}, {}) compares {} shared prompts in other categories than pair (0, 1) ({})",
                p.a, p.b, p.comparison.shared_prompts, first.shared_prompts
            )));
        }
        let mut m = vec![vec![None; n_models]; n_models];
        let (mut rsa, mut mantel_p, mut cka) = (m.clone(), m.clone(), std::mem::take(&mut m));
        for p in &pairs {
            let c = &p.comparison;
            let mp = c.rsa.mantel.done().map(|t| t.p);
            for (x, y) in [(p.a, p.b), (p.b, p.a)] {
                rsa[x][y] = c.rsa.spearman;
                mantel_p[x][y] = mp;
                cka[x][y] = c.cka;
            }
        }
        let column = |c: &CrossModelReport, side_a: bool| -> ModelSeparation {
            let k = &c.categories;
            let pick = |p: Pair| if side_a { p.a } else { p.b };
            ModelSeparation {
                cohens_d: pick(k.cohens_d),
                cohens_d_shared: pick(k.cohens_d_shared),
                accuracy: pick(k.accuracy),
                chance: pick(k.chance),
                macro_f1: pick(k.macro_f1),
                per_category: k
                    .per_category
                    .iter()
                    .map(|r| CategoryCell {
                        d: if side_a { r.d_a } else { r.d_b },
                        recall: if side_a { r.recall_a } else { r.recall_b },
                    })
                    .collect(),
            }
        };
        let mut models = Vec::with_capacity(n_models);
        let mut separation = Vec::with_capacity(n_models);
        for i in 0..n_models {
            // Pairs are row-major: (0, j) is at index j − 1.
            let (c, side_a) = if i == 0 {
                (&pairs[0].comparison, true)
            } else {
                (&pairs[i - 1].comparison, false)
            };
            models.push(if side_a {
                c.model_a.clone()
            } else {
                c.model_b.clone()
            });
            separation.push(column(c, side_a));
        }
        Ok(MultiModelReport {
            schema_version: MULTI_SCHEMA_VERSION,
            tool_version: tool_version.to_string(),
            models,
            shared_prompts: first.shared_prompts,
            not_shared,
            categories: first
                .categories
                .per_category
                .iter()
                .map(|r| CategoryCount {
                    category: r.category.clone(),
                    n: r.n,
                })
                .collect(),
            matrices: PairwiseMatrices { rsa, mantel_p, cka },
            separation,
            pairs,
        })
    }
}

/// What [`compare_signatures`] computes from the signatures alone.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureComparison {
    pub rsa: Rsa,
    pub cka: Option<f64>,
    pub per_layer: Section<PerLayer>,
    /// `(category, n, d_a, d_b)` in the order of the category names given.
    pub per_category: Vec<(String, usize, Option<f64>, Option<f64>)>,
    pub cohens_d_shared: Pair,
    pub expert_matching: Section<ExpertMatching>,
    /// Upper-triangle entries (pairs i<j, row-major) of both similarity matrices, for the figure.
    pub sim_a_upper: Vec<f64>,
    pub sim_b_upper: Vec<f64>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// 1-based ranks with ties given their average rank (scipy's `rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && x[idx[j]] == x[idx[i]] {
            j += 1;
        }
        // positions i..j (0-based) share the ranks i+1..=j: their mean is (i + 1 + j) / 2.
        let avg = (i + 1 + j) as f64 / 2.0;
        for &k in &idx[i..j] {
            r[k] = avg;
        }
        i = j;
    }
    r
}

/// Pearson correlation (two-pass); NaN when either vector is constant or shorter than 2.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x[..n].iter().zip(&y[..n]) {
        let (u, v) = (a - mx, b - my);
        sxy += u * v;
        sxx += u * u;
        syy += v * v;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return f64::NAN;
    }
    sxy / (sxx.sqrt() * syy.sqrt())
}

/// Spearman rank correlation: Pearson correlation of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// The entries i<j of a row-major N × N matrix, row by row.
pub fn upper_triangle(m: &[f64], n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        out.extend_from_slice(&m[i * n + i + 1..(i + 1) * n]);
    }
    out
}

/// `sim(i,j) = (1/L) Σ_l cos(s_i[l], s_j[l])` of one side (N × N, row-major), as `analyze`.
pub fn similarity_matrix(side: &Side<'_>, n: usize) -> Vec<f64> {
    let d = side.dim();
    let mut v = side.signatures.to_vec();
    if d > 0 {
        for row in v.chunks_mut(d) {
            crate::signature::embed_in_place(row, side.num_layers, side.num_experts);
        }
    }
    gram(&v, n, d)
}

/// Per-layer cosine matrix `cos(s_i[l], s_j[l])` (N × N) of one side.
fn layer_cosines(side: &Side<'_>, n: usize, l: usize) -> Vec<f64> {
    let e = side.num_experts;
    let mut block = layer_block(side, n, l);
    for row in block.chunks_mut(e) {
        let nrm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nrm > 0.0 {
            row.iter_mut().for_each(|x| *x /= nrm);
        }
    }
    gram(&block, n, e)
}

/// The N × E block of layer l of the signatures.
fn layer_block(side: &Side<'_>, n: usize, l: usize) -> Vec<f64> {
    let (d, e) = (side.dim(), side.num_experts);
    let mut out = Vec::with_capacity(n * e);
    for i in 0..n {
        out.extend_from_slice(&side.signatures[i * d + l * e..i * d + (l + 1) * e]);
    }
    out
}

/// The Gram matrix `K = X̃ X̃ᵀ` of the column-centred N × D matrix `x`.
fn centred_gram(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut c = x.to_vec();
    for j in 0..d {
        let m = (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64;
        for i in 0..n {
            c[i * d + j] -= m;
        }
    }
    gram(&c, n, d)
}

fn frobenius_dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Linear CKA of the column-centred N × dx matrix `x` and N × dy matrix `y`:
/// `‖X̃ᵀỸ‖_F² / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`, computed as `⟨K, L⟩_F / (‖K‖_F ‖L‖_F)` with the Gram
/// matrices `K = X̃X̃ᵀ`, `L = ỸỸᵀ`. NaN when either centred matrix is zero.
pub fn linear_cka(x: &[f64], dx: usize, y: &[f64], dy: usize, n: usize) -> f64 {
    let k = centred_gram(x, n, dx);
    let l = centred_gram(y, n, dy);
    cka_of_grams(&k, &l)
}

fn cka_of_grams(k: &[f64], l: &[f64]) -> f64 {
    let kl = frobenius_dot(k, l);
    let kk = frobenius_dot(k, k);
    let ll = frobenius_dot(l, l);
    if kk <= 0.0 || ll <= 0.0 {
        return f64::NAN;
    }
    kl / (kk.sqrt() * ll.sqrt())
}

/// RSA of two symmetric N × N similarity matrices: Spearman correlation of their upper triangles
/// and, for `reps > 0`, the Mantel test. Permutation r draws a uniform permutation σ of the N
/// prompts (Fisher–Yates on `0..N` with `sub_rng(seed, MANTEL_TAG, r)`) and correlates A's
/// entries (i, j) with B's (σ(i), σ(j)). Ranks are a permutation of the same multiset under σ, so
/// the coefficient is the dot product of A's centred ranks with B's centred ranks read through σ,
/// divided by the fixed norms; the observed value is the same expression with σ = identity.
/// `p = (1 + #{null ≥ observed − 1e-12·max(1, |observed|)}) / (1 + reps)`.
pub fn rsa(sim_a: &[f64], sim_b: &[f64], n: usize, reps: usize, seed: u64) -> Result<Rsa> {
    if Some(sim_a.len()) != n.checked_mul(n) || sim_a.len() != sim_b.len() {
        return Err(StatsError::Dimension(format!(
            "rsa: matrices of {} and {} values for N = {n}",
            sim_a.len(),
            sim_b.len()
        )));
    }
    if reps > MAX_MANTEL_REPS {
        return Err(StatsError::InvalidInput(format!(
            "--reps {reps} exceeds the maximum {MAX_MANTEL_REPS}"
        )));
    }
    let ua = upper_triangle(sim_a, n);
    let ub = upper_triangle(sim_b, n);
    let m = ua.len();
    let centre = |r: Vec<f64>| -> (Vec<f64>, f64) {
        let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
        let c: Vec<f64> = r.iter().map(|x| x - mean).collect();
        let ss = c.iter().map(|x| x * x).sum::<f64>();
        (c, ss)
    };
    let (ca, ssa) = centre(average_ranks(&ua));
    let (cb, ssb) = centre(average_ranks(&ub));
    let undefined = m < 2 || ssa <= 0.0 || ssb <= 0.0;
    let denom = ssa.sqrt() * ssb.sqrt();
    // B's centred ranks as a symmetric N × N matrix (diagonal unused).
    let mut rb = vec![0.0; n * n];
    let mut k = 0;
    for i in 0..n {
        for j in i + 1..n {
            rb[i * n + j] = cb[k];
            rb[j * n + i] = cb[k];
            k += 1;
        }
    }
    let stat = |perm: &[usize]| -> f64 {
        let mut s = 0.0;
        let mut k = 0;
        for i in 0..n {
            let row = &rb[perm[i] * n..(perm[i] + 1) * n];
            for &pj in &perm[i + 1..] {
                s += ca[k] * row[pj];
                k += 1;
            }
        }
        s / denom
    };
    let identity: Vec<usize> = (0..n).collect();
    if undefined {
        return Ok(Rsa {
            pairs: m as u64,
            spearman: None,
            mantel: Section::skipped("the Spearman coefficient is undefined (a constant matrix)"),
        });
    }
    let observed = stat(&identity);
    let mantel = if reps == 0 {
        Section::skipped("--reps 0")
    } else {
        let null: Vec<f64> = (0..reps)
            .into_par_iter()
            .map(|r| {
                let mut rng = sub_rng(seed, MANTEL_TAG, r as u64);
                let mut perm = identity.clone();
                perm.shuffle(&mut rng);
                stat(&perm)
            })
            .collect();
        let tol = 1e-12 * observed.abs().max(1.0);
        let ge = null.iter().filter(|&&x| x >= observed - tol).count();
        let st = mean_std(null.iter().copied());
        Section::Done(Mantel {
            reps,
            seed,
            null_mean: st.mean,
            null_std: if reps > 1 { st.std } else { 0.0 },
            p: (1.0 + ge as f64) / (1.0 + reps as f64),
        })
    };
    Ok(Rsa {
        pairs: m as u64,
        spearman: Some(observed),
        mantel,
    })
}

/// Per-category Cohen's d of a similarity matrix: for each category c with at least two prompts
/// (and at least one prompt outside it), pairs i<j inside c against pairs with exactly one prompt
/// in c, pooled SD as `similarity.cohens_d`. `labels[i]` indexes `0..num_categories`.
pub fn per_category_d(sim: &[f64], n: usize, labels: &[usize], num_categories: usize) -> Vec<f64> {
    (0..num_categories)
        .map(|c| {
            let pairs = |inside: bool| {
                (0..n).flat_map(move |i| {
                    (i + 1..n)
                        .filter(move |&j| {
                            let (a, b) = (labels[i] == c, labels[j] == c);
                            if inside {
                                a && b
                            } else {
                                a != b
                            }
                        })
                        .map(move |j| sim[i * n + j])
                })
            };
            let w = mean_std(pairs(true));
            let a = mean_std(pairs(false));
            if w.n < 2 || a.n < 2 {
                return f64::NAN;
            }
            crate::similarity::cohens_d(&w, &a)
        })
        .collect()
}

/// Matches B's experts to A's per layer (same L, E). The usage profile of expert e at layer l is
/// its column of the signatures over the shared prompts, `p_e = (s_i[l,e])_i`. The matching is
/// the permutation π maximising `Σ_e p^A_e · p^B_π(e)`, i.e. minimising the Frobenius distance
/// `‖S_A,l − S_B,l P_π‖_F` (the norms do not depend on π). Solved exactly by the Hungarian
/// algorithm (`pathfinding::kuhn_munkres`) on the integer weights
/// `w[e][f] = floor(p^A_e · p^B_f / max_ef(p^A_e · p^B_f) · 2⁴⁰ + 0.5)` (integers: the algorithm
/// compares slacks for equality); all weights 0 → the identity.
pub fn match_experts(a: &Side<'_>, b: &Side<'_>, n: usize) -> Result<ExpertMatching> {
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts) || a.layers != b.layers {
        return Err(StatsError::Dimension(
            "expert matching needs the same layers and experts".into(),
        ));
    }
    let e = a.num_experts;
    let mut layers = Vec::with_capacity(a.num_layers);
    for l in 0..a.num_layers {
        let ba = layer_block(a, n, l);
        let bb = layer_block(b, n, l);
        let mut w = vec![0.0; e * e];
        for i in 0..n {
            let (ra, rb) = (&ba[i * e..(i + 1) * e], &bb[i * e..(i + 1) * e]);
            for (x, &pa) in ra.iter().enumerate() {
                for (y, &pb) in rb.iter().enumerate() {
                    w[x * e + y] += pa * pb;
                }
            }
        }
        let wmax = w.iter().copied().fold(0.0, f64::max);
        let assignment: Vec<usize> = if wmax > 0.0 {
            let ints: Vec<i64> = w
                .iter()
                .map(|&x| (x / wmax * MATCH_SCALE + 0.5).floor() as i64)
                .collect();
            let m = Matrix::from_vec(e, e, ints)
                .map_err(|err| StatsError::Numerical(format!("expert matching: {err}")))?;
            kuhn_munkres(&m).1
        } else {
            (0..e).collect()
        };
        let dist = |perm: &dyn Fn(usize) -> usize| -> f64 {
            let mut s = 0.0;
            for i in 0..n {
                for x in 0..e {
                    let d = ba[i * e + x] - bb[i * e + perm(x)];
                    s += d * d;
                }
            }
            s.sqrt()
        };
        let moved = assignment
            .iter()
            .enumerate()
            .filter(|(x, y)| x != *y)
            .count();
        layers.push(LayerMatch {
            layer: a.layers[l],
            distance_identity: dist(&|x| x),
            distance_matched: dist(&|x| assignment[x]),
            moved,
            assignment,
        });
    }
    Ok(ExpertMatching {
        method: "Hungarian algorithm (pathfinding::kuhn_munkres) maximising the summed dot \
                 products of matched usage profiles over the shared prompts"
            .into(),
        moved: layers.iter().map(|l| l.moved).sum(),
        layers,
    })
}

/// B's layer-major L × E counts relabelled by a matching: `out[l·E + e] = counts[l·E + π_l(e)]`,
/// so that B's expert π_l(e) takes A's number e.
pub fn relabel_counts(counts: &[f64], m: &ExpertMatching, num_experts: usize) -> Vec<f64> {
    let mut out = counts.to_vec();
    for (l, lm) in m.layers.iter().enumerate() {
        for (e, &f) in lm.assignment.iter().enumerate() {
            if let (Some(o), Some(&c)) = (
                out.get_mut(l * num_experts + e),
                counts.get(l * num_experts + f),
            ) {
                *o = c;
            }
        }
    }
    out
}

/// Per layer: the normalised centred Gram (CKA) and normalised centred ranks (RSA), if defined.
type LayerPrep = (Option<Vec<f64>>, Option<Vec<f64>>);

/// The per-layer CKA and RSA matrices, or why they were skipped.
fn per_layer(a: &Side<'_>, b: &Side<'_>, n: usize) -> Section<PerLayer> {
    let values = (a.num_layers + b.num_layers)
        .checked_mul(n)
        .and_then(|x| x.checked_mul(n));
    if values.is_none_or(|v| v > MAX_PER_LAYER_VALUES) {
        return Section::skipped(format!(
            "(L_A + L_B)·N² = ({} + {})·{n}² exceeds {MAX_PER_LAYER_VALUES} values",
            a.num_layers, b.num_layers
        ));
    }
    // Per layer: the centred Gram normalised to unit Frobenius norm, and the centred ranks of the
    // cosine matrix's upper triangle normalised to unit norm; CKA and Spearman are dot products.
    let prep = |s: &Side<'_>| -> Vec<LayerPrep> {
        (0..s.num_layers)
            .into_par_iter()
            .map(|l| {
                let k = centred_gram(&layer_block(s, n, l), n, s.num_experts);
                let kn = frobenius_dot(&k, &k).sqrt();
                let k = (kn > 0.0).then(|| k.iter().map(|x| x / kn).collect());
                let r = average_ranks(&upper_triangle(&layer_cosines(s, n, l), n));
                let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
                let c: Vec<f64> = r.iter().map(|x| x - mean).collect();
                let cn = frobenius_dot(&c, &c).sqrt();
                let r = (cn > 0.0 && c.len() >= 2).then(|| c.iter().map(|x| x / cn).collect());
                (k, r)
            })
            .collect()
    };
    let pa = prep(a);
    let pb = prep(b);
    let dot = |x: &Option<Vec<f64>>, y: &Option<Vec<f64>>| match (x, y) {
        (Some(x), Some(y)) => finite(frobenius_dot(x, y)),
        _ => None,
    };
    Section::Done(PerLayer {
        layers_a: a.layers.to_vec(),
        layers_b: b.layers.to_vec(),
        cka: pa
            .iter()
            .map(|(ka, _)| pb.iter().map(|(kb, _)| dot(ka, kb)).collect())
            .collect(),
        rsa: pa
            .iter()
            .map(|(_, ra)| pb.iter().map(|(_, rb)| dot(ra, rb)).collect())
            .collect(),
    })
}

/// Every signature-based statistic of the comparison. `labels[i]` indexes `categories` (the
/// category of shared prompt i); the signatures of both sides are in the same prompt order.
pub fn compare_signatures(
    a: &Side<'_>,
    b: &Side<'_>,
    n: usize,
    labels: &[usize],
    categories: &[String],
    opts: &CrossModelOptions,
) -> Result<SignatureComparison> {
    if n < 3 {
        return Err(StatsError::InvalidInput(format!(
            "{n} shared prompts: the comparison needs at least 3"
        )));
    }
    if n > MAX_PROMPTS {
        return Err(StatsError::InvalidInput(format!(
            "{n} shared prompts exceed the maximum {MAX_PROMPTS}"
        )));
    }
    a.check("model A", n)?;
    b.check("model B", n)?;
    if labels.len() != n || labels.iter().any(|&c| c >= categories.len()) {
        return Err(StatsError::Dimension(format!(
            "{} labels for {n} prompts and {} categories",
            labels.len(),
            categories.len()
        )));
    }
    let sim_a = similarity_matrix(a, n);
    let sim_b = similarity_matrix(b, n);
    let rsa = rsa(&sim_a, &sim_b, n, opts.reps, opts.seed)?;
    let cka = finite(linear_cka(a.signatures, a.dim(), b.signatures, b.dim(), n));
    let per_layer = per_layer(a, b, n);
    let da = per_category_d(&sim_a, n, labels, categories.len());
    let db = per_category_d(&sim_b, n, labels, categories.len());
    let per_category = categories
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let k = labels.iter().filter(|&&x| x == c).count();
            (name.clone(), k, finite(da[c]), finite(db[c]))
        })
        .collect();
    let overall = |sim: &[f64]| finite(crate::similarity::summarize(sim, labels).cohens_d);
    let same =
        (a.num_layers, a.num_experts) == (b.num_layers, b.num_experts) && a.layers == b.layers;
    let expert_matching = if same {
        Section::Done(match_experts(a, b, n)?)
    } else {
        Section::skipped(format!(
            "different architectures (A: {} MoE layers × {} experts at decoder layers {:?}; B: {} × {} at {:?}): expert indices do not correspond",
            a.num_layers, a.num_experts, a.layers, b.num_layers, b.num_experts, b.layers
        ))
    };
    Ok(SignatureComparison {
        rsa,
        cka,
        per_layer,
        per_category,
        cohens_d_shared: Pair {
            a: overall(&sim_a),
            b: overall(&sim_b),
        },
        expert_matching,
        sim_a_upper: upper_triangle(&sim_a, n),
        sim_b_upper: upper_triangle(&sim_b, n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// N prompts in `cats` categories, L layers, E experts; category c prefers experts c, c+1.
    fn planted(n: usize, cats: usize, l: usize, e: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<usize> = (0..n).map(|i| i % cats).collect();
        let mut s = vec![0.0; n * l * e];
        for i in 0..n {
            for layer in 0..l {
                let row = &mut s[i * l * e + layer * e..i * l * e + (layer + 1) * e];
                for (x, v) in row.iter_mut().enumerate() {
                    let pref = x == (labels[i] + layer) % e || x == (labels[i] + layer + 1) % e;
                    *v = rng.random::<f64>() + if pref { 3.0 } else { 0.0 };
                }
                let t: f64 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= t);
            }
        }
        (s, labels)
    }

    fn side<'a>(s: &'a [f64], layers: &'a [usize], e: usize) -> Side<'a> {
        Side {
            num_layers: layers.len(),
            num_experts: e,
            layers,
            signatures: s,
        }
    }

    #[test]
    fn ranks_average_ties_like_scipy() {
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0]),
            vec![4.0, 1.0, 4.0, 2.0, 4.0]
        );
        assert!((spearman(&[1., 2., 3., 4.], &[10., 20., 30., 45.]) - 1.0).abs() < 1e-15);
        assert!((spearman(&[1., 2., 3., 4.], &[4., 3., 2., 1.]) + 1.0).abs() < 1e-15);
        assert!(spearman(&[1., 1., 1.], &[1., 2., 3.]).is_nan());
    }

    #[test]
    fn a_model_against_itself_gives_one() {
        let (s, labels) = planted(24, 3, 2, 6, 1);
        let layers = [0, 1];
        let a = side(&s, &layers, 6);
        let cats: Vec<String> = ["x", "y", "z"].iter().map(|c| c.to_string()).collect();
        let r =
            compare_signatures(&a, &a, 24, &labels, &cats, &CrossModelOptions::default()).unwrap();
        assert!((r.rsa.spearman.unwrap() - 1.0).abs() < 1e-12);
        assert!((r.cka.unwrap() - 1.0).abs() < 1e-12);
        let m = r.rsa.mantel.done().unwrap();
        assert!(m.p < 0.01 && m.null_mean.abs() < 0.1, "{m:?}");
        let pl = r.per_layer.done().unwrap();
        for l in 0..2 {
            assert!((pl.cka[l][l].unwrap() - 1.0).abs() < 1e-12);
            assert!((pl.rsa[l][l].unwrap() - 1.0).abs() < 1e-12);
        }
        let em = r.expert_matching.done().unwrap();
        assert_eq!(em.moved, 0);
        assert!(em.layers.iter().all(|l| l.distance_matched == 0.0));
        for (_, _, da, db) in &r.per_category {
            assert_eq!(da, db);
            assert!(da.unwrap() > 1.0);
        }
    }

    #[test]
    fn shuffled_prompt_labels_give_rsa_near_zero() {
        let (s, labels) = planted(30, 3, 2, 6, 2);
        let n = 30;
        let d = 12;
        // B = A's signatures with rows assigned to other prompts (a random permutation).
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        let mut sb = vec![0.0; n * d];
        for i in 0..n {
            sb[i * d..(i + 1) * d].copy_from_slice(&s[perm[i] * d..(perm[i] + 1) * d]);
        }
        let layers = [0, 1];
        let cats: Vec<String> = ["x", "y", "z"].iter().map(|c| c.to_string()).collect();
        let opts = CrossModelOptions { reps: 500, seed: 4 };
        let r = compare_signatures(
            &side(&s, &layers, 6),
            &side(&sb, &layers, 6),
            n,
            &labels,
            &cats,
            &opts,
        )
        .unwrap();
        let m = r.rsa.mantel.done().unwrap();
        assert!(r.rsa.spearman.unwrap().abs() < 0.2, "{:?}", r.rsa);
        assert!(m.p > 0.05, "{m:?}");
        assert!(r.cka.unwrap() < 0.5, "{:?}", r.cka);
        // Deterministic for any thread count.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let r1 = pool
            .install(|| {
                compare_signatures(
                    &side(&s, &layers, 6),
                    &side(&sb, &layers, 6),
                    n,
                    &labels,
                    &cats,
                    &opts,
                )
            })
            .unwrap();
        assert_eq!(r, r1);
    }

    #[test]
    fn permuted_experts_are_matched_back() {
        let (s, labels) = planted(20, 4, 3, 8, 3);
        let (n, l, e) = (20, 3, 8);
        // B = A with experts renumbered per layer: B[l, q_l(x)] = A[l, x].
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let qs: Vec<Vec<usize>> = (0..l)
            .map(|_| {
                let mut q: Vec<usize> = (0..e).collect();
                q.shuffle(&mut rng);
                q
            })
            .collect();
        let mut sb = vec![0.0; s.len()];
        for i in 0..n {
            for layer in 0..l {
                for x in 0..e {
                    sb[i * l * e + layer * e + qs[layer][x]] = s[i * l * e + layer * e + x];
                }
            }
        }
        let layers = [0, 1, 2];
        let m = match_experts(&side(&s, &layers, e), &side(&sb, &layers, e), n).unwrap();
        for (lm, q) in m.layers.iter().zip(&qs) {
            assert_eq!(&lm.assignment, q);
            assert!(lm.distance_matched < 1e-12);
            assert!(lm.distance_identity > 0.1);
        }
        // Relabelling B's counts with the matching gives A's back.
        let counts_b: Vec<f64> = sb[..l * e].to_vec();
        let back = relabel_counts(&counts_b, &m, e);
        assert_eq!(back, s[..l * e].to_vec());
        let _ = labels;
    }

    #[test]
    fn different_architectures_skip_matching_and_keep_rsa() {
        let (s, labels) = planted(18, 3, 2, 6, 6);
        let (t, _) = planted(18, 3, 3, 4, 7);
        let cats: Vec<String> = ["x", "y", "z"].iter().map(|c| c.to_string()).collect();
        let r = compare_signatures(
            &side(&s, &[0, 1], 6),
            &side(&t, &[1, 2, 3], 4),
            18,
            &labels,
            &cats,
            &CrossModelOptions { reps: 200, seed: 0 },
        )
        .unwrap();
        assert!(r.expert_matching.done().is_none());
        // Both planted on the same categories: the similarity structures agree.
        assert!(r.rsa.spearman.unwrap() > 0.3, "{:?}", r.rsa);
        assert!(r.rsa.mantel.done().unwrap().p < 0.01);
        let pl = r.per_layer.done().unwrap();
        assert_eq!((pl.cka.len(), pl.cka[0].len()), (2, 3));
    }

    /// A pairwise report of `sa` against `sb` for the N-run tests (planted signatures, the same
    /// 18 prompts in 3 categories); the first signature value stands in for the accuracy and
    /// the label, so that each run's column can be told apart.
    fn pair_report(sa: &[f64], sb: &[f64]) -> CrossModelReport {
        let (_, labels) = planted(18, 3, 2, 6, 0);
        let cats: Vec<String> = ["x", "y", "z"].iter().map(|c| c.to_string()).collect();
        let layers = [0, 1];
        let c = compare_signatures(
            &side(sa, &layers, 6),
            &side(sb, &layers, 6),
            18,
            &labels,
            &cats,
            &CrossModelOptions { reps: 99, seed: 0 },
        )
        .unwrap();
        let info = |x: f64| ModelInfo {
            label: format!("{x}"),
            model: None,
            family: None,
            num_layers: 2,
            num_experts: 6,
            top_k: 2,
            layers: vec![0, 1],
            num_prompts: 18,
        };
        let none = Pair { a: None, b: None };
        CrossModelReport {
            schema_version: SCHEMA_VERSION,
            tool_version: "t".into(),
            model_a: info(sa[0]),
            model_b: info(sb[0]),
            shared_prompts: 18,
            only_in_a: vec![],
            only_in_b: vec![],
            same_architecture: true,
            rsa: c.rsa,
            cka: c.cka,
            per_layer: c.per_layer,
            categories: CategoryComparison {
                cohens_d: none,
                cohens_d_shared: c.cohens_d_shared,
                accuracy: Pair {
                    a: Some(sa[0]),
                    b: Some(sb[0]),
                },
                chance: none,
                macro_f1: none,
                per_category: c
                    .per_category
                    .iter()
                    .map(|(cat, n, da, db)| CategoryRow {
                        category: cat.clone(),
                        n: *n,
                        d_a: *da,
                        d_b: *db,
                        recall_a: None,
                        recall_b: None,
                    })
                    .collect(),
            },
            expert_matching: c.expert_matching,
            matched_drift: Section::skipped("no traces"),
        }
    }

    #[test]
    fn n_run_report_is_assembled_from_the_pairs() {
        let runs: Vec<Vec<f64>> = (1..=3).map(|s| planted(18, 3, 2, 6, s).0).collect();
        let mut pairs = Vec::new();
        for i in 0..3 {
            for j in i + 1..3 {
                pairs.push(PairComparison {
                    a: i,
                    b: j,
                    comparison: pair_report(&runs[i], &runs[j]),
                });
            }
        }
        let r = MultiModelReport::from_pairs("t", 3, vec![vec![]; 3], pairs.clone()).unwrap();
        for p in &pairs {
            let c = &p.comparison;
            assert_eq!(r.matrices.rsa[p.a][p.b], c.rsa.spearman);
            assert_eq!(r.matrices.rsa[p.b][p.a], c.rsa.spearman);
            assert_eq!(r.matrices.cka[p.b][p.a], c.cka);
            let mp = c.rsa.mantel.done().map(|m| m.p);
            assert_eq!(r.matrices.mantel_p[p.a][p.b], mp);
        }
        for i in 0..3 {
            assert!(r.matrices.rsa[i][i].is_none() && r.matrices.cka[i][i].is_none());
        }
        // each run's column and model info come from a pair that contains it
        for (i, run) in runs.iter().enumerate() {
            assert_eq!(r.separation[i].accuracy, Some(run[0]));
            assert_eq!(r.models[i].label, format!("{}", run[0]));
        }
        // run 2's d on the shared prompts is the same read from pair (0, 2) or (1, 2)
        assert_eq!(
            r.separation[2].cohens_d_shared,
            pairs[2].comparison.categories.cohens_d_shared.b
        );
        assert_eq!(r.categories.len(), 3);
        // wrong order, a missing pair, too few runs, wrong lists, other prompts: errors
        let mut swapped = pairs.clone();
        swapped.swap(0, 1);
        let e = MultiModelReport::from_pairs("t", 3, vec![vec![]; 3], swapped).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let e =
            MultiModelReport::from_pairs("t", 3, vec![vec![]; 3], pairs[..2].to_vec()).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        assert!(MultiModelReport::from_pairs("t", 1, vec![vec![]], vec![]).is_err());
        assert!(MultiModelReport::from_pairs("t", 3, vec![vec![]; 2], pairs.clone()).is_err());
        let mut other = pairs.clone();
        other[2].comparison.categories.per_category[0].n = 5;
        let e = MultiModelReport::from_pairs("t", 3, vec![vec![]; 3], other).unwrap_err();
        assert!(e.to_string().contains("pair (1, 2)"), "{e}");
    }

    #[test]
    fn hostile_inputs_are_errors() {
        let s = vec![0.25; 4 * 4];
        let a = side(&s, &[0], 4);
        let cats = vec!["x".to_string()];
        let e = compare_signatures(&a, &a, 2, &[0, 0], &cats, &CrossModelOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("at least 3"), "{e}");
        let short = vec![0.25; 7];
        let b = side(&short, &[0], 4);
        assert!(compare_signatures(&a, &b, 4, &[0; 4], &cats, &Default::default()).is_err());
        let mut nan = s.clone();
        nan[3] = f64::NAN;
        let c = side(&nan, &[0], 4);
        let e = compare_signatures(&a, &c, 4, &[0; 4], &cats, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{e}");
    }
}
