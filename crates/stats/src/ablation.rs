//! Causal expert ablation (`moe-xray ablate`, docs/statistics.md "Causal expert ablation"): which
//! experts characterise a category (the contrast of its routing signature), load-matched random
//! control sets, and the effects of masking them — per-prompt changes, bootstrap CIs over prompts
//! and paired permutation p-values against the control.
//!
//! Everything here is plain statistics on numbers the pipeline measured (teacher-forced
//! negative log-likelihoods, argmaxes and routed expert sets); the model run is in
//! `moe-xray-pipeline`'s `ablate`.

use rand::Rng;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StatsError};
use crate::significance::percentile_ci;
use crate::sub_rng;

/// Stream tags of the ablation's random sub-streams (see [`crate::sub_rng`]).
pub mod tags {
    /// Load-matched random control sets: repetition = `category · draws + draw` (per dose: + `dose
    /// index · categories · draws`).
    pub const CONTROL: u64 = 20;
    /// Bootstrap over prompts of one effect cell: repetition = `cell · reps + rep`.
    pub const BOOTSTRAP: u64 = 21;
    /// Paired sign-flip permutation of one effect cell: repetition = `cell · reps + rep`.
    pub const PERMUTATION: u64 = 22;
}

/// Schema version of `ablation.json`.
pub const ABLATION_SCHEMA_VERSION: u32 = 1;

/// How many experts are ablated for one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// The `n` experts of largest contrast in every MoE layer.
    PerLayer(usize),
    /// The `n · L` (layer, expert) pairs of largest contrast over all `L` MoE layers.
    Global(usize),
}

impl Budget {
    pub fn n(self) -> usize {
        match self {
            Budget::PerLayer(n) | Budget::Global(n) => n,
        }
    }
}

/// The contrast of each category's signature: for category `c`, layer `l`, expert `e`,
/// `mean_{i ∈ c} s_i[l,e] − mean_{c' ≠ c} (mean_{i ∈ c'} s_i[l,e])` (the mean of the other
/// categories' means, so category sizes do not weight it). `sigs` is prompts × (L·E) row-major,
/// `labels[i] < num_categories`. Returns categories × (L·E).
pub fn signature_contrast(
    sigs: &[f64],
    labels: &[usize],
    num_categories: usize,
    width: usize,
) -> Result<Vec<f64>> {
    if width == 0 || sigs.len() != labels.len().saturating_mul(width) {
        return Err(StatsError::Dimension(format!(
            "signatures: {} values for {} prompts of width {width}",
            sigs.len(),
            labels.len()
        )));
    }
    if num_categories < 2 {
        return Err(StatsError::InvalidInput(
            "ablation needs at least two categories".into(),
        ));
    }
    let mut means = vec![0.0f64; num_categories * width];
    let mut n = vec![0usize; num_categories];
    for (row, &c) in sigs.chunks(width).zip(labels) {
        if c >= num_categories {
            return Err(StatsError::InvalidInput(format!(
                "category index {c} out of range"
            )));
        }
        n[c] += 1;
        for (m, &x) in means[c * width..(c + 1) * width].iter_mut().zip(row) {
            *m += x;
        }
    }
    for (c, &nc) in n.iter().enumerate() {
        if nc == 0 {
            return Err(StatsError::InvalidInput(format!(
                "category {c} has no prompts"
            )));
        }
        means[c * width..(c + 1) * width]
            .iter_mut()
            .for_each(|m| *m /= nc as f64);
    }
    let mut out = vec![0.0f64; num_categories * width];
    let others = (num_categories - 1) as f64;
    for c in 0..num_categories {
        for j in 0..width {
            let own = means[c * width + j];
            let rest: f64 = (0..num_categories)
                .filter(|&d| d != c)
                .map(|d| means[d * width + j])
                .sum::<f64>()
                / others;
            out[c * width + j] = own - rest;
        }
    }
    Ok(out)
}

/// Largest number of experts that may be masked in one layer: `E − top_k` (the router must still
/// find `top_k` experts).
pub fn max_masked_per_layer(num_experts: usize, top_k: usize) -> usize {
    num_experts.saturating_sub(top_k)
}

/// The characteristic experts of one category: `contrast` is its (L·E) contrast row; returns
/// per layer the chosen experts, ascending. Ranking: larger contrast first, ties to the lower
/// (layer, expert). A global budget takes the `n · L` best pairs over all layers but never more
/// than `max_per_layer` in one layer (the pairs beyond are skipped, the next best taken).
pub fn characteristic_experts(
    contrast: &[f64],
    num_layers: usize,
    num_experts: usize,
    budget: Budget,
    max_per_layer: usize,
) -> Result<Vec<Vec<u32>>> {
    if contrast.len() != num_layers.saturating_mul(num_experts) {
        return Err(StatsError::Dimension(format!(
            "contrast has {} values, expected {num_layers} x {num_experts}",
            contrast.len()
        )));
    }
    let rank = |a: &usize, b: &usize| contrast[*b].total_cmp(&contrast[*a]).then(a.cmp(b));
    let mut out = vec![Vec::new(); num_layers];
    match budget {
        Budget::PerLayer(n) => {
            if n > max_per_layer {
                return Err(StatsError::InvalidInput(format!(
                    "{n} experts per layer: at most {max_per_layer} can be masked (experts − top_k)"
                )));
            }
            for (l, chosen) in out.iter_mut().enumerate() {
                let mut idx: Vec<usize> = (l * num_experts..(l + 1) * num_experts).collect();
                idx.sort_by(rank);
                *chosen = idx[..n]
                    .iter()
                    .map(|&i| (i - l * num_experts) as u32)
                    .collect();
                chosen.sort_unstable();
            }
        }
        Budget::Global(n) => {
            let total = n.checked_mul(num_layers).ok_or_else(|| {
                StatsError::InvalidInput(format!("global budget {n} x {num_layers} overflows"))
            })?;
            if total > max_per_layer.saturating_mul(num_layers) {
                return Err(StatsError::InvalidInput(format!(
                    "global budget of {total} experts: at most {max_per_layer} per layer can be masked"
                )));
            }
            let mut idx: Vec<usize> = (0..contrast.len()).collect();
            idx.sort_by(rank);
            let mut taken = 0usize;
            for i in idx {
                if taken == total {
                    break;
                }
                let l = i / num_experts;
                if out[l].len() < max_per_layer {
                    out[l].push((i % num_experts) as u32);
                    taken += 1;
                }
            }
            out.iter_mut().for_each(|v| v.sort_unstable());
        }
    }
    Ok(out)
}

/// Load bin of every expert of one layer: experts ranked by load (ascending, ties to the lower
/// index), rank `r` in bin `⌊r · bins / E⌋`.
pub fn load_bins(load: &[f64], bins: usize) -> Vec<usize> {
    let e = load.len();
    let mut idx: Vec<usize> = (0..e).collect();
    idx.sort_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)));
    let mut bin = vec![0usize; e];
    for (r, &i) in idx.iter().enumerate() {
        bin[i] = r * bins.max(1) / e.max(1);
    }
    bin
}

/// A load-matched random control set: for every layer and every chosen expert (ascending), an
/// expert drawn uniformly from the not-chosen, not-yet-drawn experts of the same load bin
/// ([`load_bins`] of `load`, the layer's mean expert frequency), or, if that bin is used up,
/// of the nearest bin that is not (ties to the lower bin). Needs `2 · chosen ≤ E` per layer.
pub fn load_matched_random(
    load: &[f64],
    num_experts: usize,
    chosen: &[Vec<u32>],
    bins: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Vec<u32>>> {
    if load.len() != chosen.len().saturating_mul(num_experts) {
        return Err(StatsError::Dimension(format!(
            "load has {} values, expected {} x {num_experts}",
            load.len(),
            chosen.len()
        )));
    }
    let mut out = Vec::with_capacity(chosen.len());
    for (l, ch) in chosen.iter().enumerate() {
        let layer_load = &load[l * num_experts..(l + 1) * num_experts];
        let bin = load_bins(layer_load, bins);
        let mut free: Vec<bool> = vec![true; num_experts];
        for &e in ch {
            match free.get_mut(e as usize) {
                Some(f) => *f = false,
                None => {
                    return Err(StatsError::InvalidInput(format!(
                        "expert {e} out of range in layer {l}"
                    )))
                }
            }
        }
        if ch.len().saturating_mul(2) > num_experts {
            return Err(StatsError::InvalidInput(format!(
                "a load-matched control of {} experts in layer {l} needs at least {} experts, the layer has {num_experts}",
                ch.len(),
                ch.len() * 2
            )));
        }
        let nb = bin.iter().copied().max().map_or(1, |m| m + 1);
        let mut drawn = Vec::with_capacity(ch.len());
        for &e in ch {
            let b0 = bin[e as usize];
            let mut pick = None;
            for dist in 0..nb {
                for b in [b0.checked_sub(dist), Some(b0 + dist)]
                    .into_iter()
                    .flatten()
                {
                    if b >= nb || pick.is_some() {
                        continue;
                    }
                    let cand: Vec<usize> = (0..num_experts)
                        .filter(|&x| free[x] && bin[x] == b)
                        .collect();
                    if !cand.is_empty() {
                        pick = Some(cand[rng.random_range(0..cand.len())]);
                    }
                }
                if pick.is_some() {
                    break;
                }
            }
            let p = pick.ok_or_else(|| {
                StatsError::InvalidInput(format!("no expert left to match in layer {l}"))
            })?;
            free[p] = false;
            drawn.push(p as u32);
        }
        drawn.sort_unstable();
        out.push(drawn);
    }
    Ok(out)
}

/// What one prompt's teacher-forced pass gave.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptScores {
    /// Per continuation token: negative log-likelihood.
    pub nll: Vec<f64>,
    /// Per continuation token: the argmax token.
    pub argmax: Vec<u32>,
    /// The chosen experts of every fed (token, MoE layer), `top_k` each, in recording order.
    pub routes: Vec<u32>,
}

/// One prompt's change under an ablation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptEffect {
    /// Mean NLL over the continuation, ablated minus unablated.
    pub delta_nll: f64,
    /// Fraction of continuation positions whose ablated argmax equals the unablated argmax.
    pub agreement: f64,
    /// Fraction of (token, MoE layer) whose expert set changed.
    pub routing_changed: f64,
    /// Mean Jaccard index of the ablated and unablated expert sets over (token, MoE layer).
    pub jaccard: f64,
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        f64::NAN
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// The change of one prompt: `base` unablated, `ablated` with the mask; both scored on the same
/// continuation and routed over the same tokens.
pub fn prompt_effect(
    base: &PromptScores,
    ablated: &PromptScores,
    top_k: usize,
) -> Result<PromptEffect> {
    if base.nll.len() != ablated.nll.len()
        || base.argmax.len() != ablated.argmax.len()
        || base.routes.len() != ablated.routes.len()
        || base.nll.is_empty()
        || top_k == 0
        || !base.routes.len().is_multiple_of(top_k)
    {
        return Err(StatsError::Dimension(format!(
            "ablated and unablated passes differ in shape (nll {} vs {}, routes {} vs {}, top_k {top_k})",
            base.nll.len(),
            ablated.nll.len(),
            base.routes.len(),
            ablated.routes.len()
        )));
    }
    let agree = base
        .argmax
        .iter()
        .zip(&ablated.argmax)
        .filter(|(a, b)| a == b)
        .count();
    let mut changed = 0usize;
    let mut jac = 0.0f64;
    let n_rec = base.routes.len() / top_k;
    for (a, b) in base.routes.chunks(top_k).zip(ablated.routes.chunks(top_k)) {
        let inter = a.iter().filter(|x| b.contains(x)).count();
        // expert sets have distinct members
        let union = 2 * top_k - inter;
        if inter != top_k {
            changed += 1;
        }
        jac += inter as f64 / union as f64;
    }
    Ok(PromptEffect {
        delta_nll: mean(&ablated.nll) - mean(&base.nll),
        agreement: agree as f64 / base.argmax.len().max(1) as f64,
        routing_changed: if n_rec == 0 {
            0.0
        } else {
            changed as f64 / n_rec as f64
        },
        jaccard: if n_rec == 0 { 1.0 } else { jac / n_rec as f64 },
    })
}

/// A mean with its bootstrap percentile 95 % CI over prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Estimate {
    pub mean: f64,
    pub ci95: [f64; 2],
}

/// The effect of ablating one category's experts on the prompts of one category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EffectCell {
    /// The category whose characteristic experts are masked.
    pub ablated: String,
    /// The category whose prompts are scored.
    pub evaluated: String,
    pub n_prompts: usize,
    /// Mean change of next-token NLL (nats per continuation token), characteristic experts masked.
    pub delta_nll: Estimate,
    /// The same with the load-matched random experts masked (mean over draws per prompt).
    pub delta_nll_random: Estimate,
    /// `delta_nll − delta_nll_random` (paired per prompt).
    pub excess: Estimate,
    /// One-sided paired sign-flip permutation p-value of `excess > 0`.
    pub p_excess: f64,
    /// Mean top-1 agreement with the unablated argmax (characteristic / random).
    pub agreement: f64,
    pub agreement_random: f64,
    /// Mean fraction of (token, layer) whose expert set changed (characteristic / random).
    pub routing_changed: f64,
    pub routing_changed_random: f64,
    /// Mean Jaccard index of the expert sets (characteristic / random).
    pub jaccard: f64,
    pub jaccard_random: f64,
}

/// Bootstrap and permutation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Resampling {
    pub boot_reps: usize,
    pub perm_reps: usize,
    pub seed: u64,
}

/// Summarises one cell: `own[p]` the effect on prompt `p` with the characteristic experts masked,
/// `random[d][p]` with control draw `d`. `cell` selects the random sub-streams.
pub fn effect_cell(
    ablated: &str,
    evaluated: &str,
    own: &[PromptEffect],
    random: &[Vec<PromptEffect>],
    rs: Resampling,
    cell: u64,
) -> Result<EffectCell> {
    let n = own.len();
    if n == 0 || random.is_empty() || random.iter().any(|r| r.len() != n) {
        return Err(StatsError::Dimension(format!(
            "effect cell {ablated} -> {evaluated}: {n} prompts, {} control draws of unequal size or none",
            random.len()
        )));
    }
    let nd = random.len() as f64;
    let rmean = |f: &dyn Fn(&PromptEffect) -> f64| -> Vec<f64> {
        (0..n)
            .map(|p| random.iter().map(|d| f(&d[p])).sum::<f64>() / nd)
            .collect()
    };
    let d_own: Vec<f64> = own.iter().map(|e| e.delta_nll).collect();
    let d_rand = rmean(&|e| e.delta_nll);
    let diff: Vec<f64> = d_own.iter().zip(&d_rand).map(|(a, b)| a - b).collect();
    let boots: Vec<[f64; 3]> = (0..rs.boot_reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = sub_rng(
                rs.seed,
                tags::BOOTSTRAP,
                cell.wrapping_mul(rs.boot_reps as u64) + r as u64,
            );
            let mut s = [0.0f64; 3];
            for _ in 0..n {
                let i = rng.random_range(0..n);
                s[0] += d_own[i];
                s[1] += d_rand[i];
                s[2] += diff[i];
            }
            s.map(|x| x / n as f64)
        })
        .collect();
    let ci = |j: usize| -> [f64; 2] {
        let v: Vec<f64> = boots.iter().map(|b| b[j]).collect();
        percentile_ci(&v, 0.025, 0.975)
    };
    let observed = mean(&diff);
    let hits: usize = (0..rs.perm_reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = sub_rng(
                rs.seed,
                tags::PERMUTATION,
                cell.wrapping_mul(rs.perm_reps as u64) + r as u64,
            );
            let s: f64 = diff
                .iter()
                .map(|&d| if rng.random::<bool>() { d } else { -d })
                .sum::<f64>()
                / n as f64;
            usize::from(s >= observed)
        })
        .sum();
    Ok(EffectCell {
        ablated: ablated.to_string(),
        evaluated: evaluated.to_string(),
        n_prompts: n,
        delta_nll: Estimate {
            mean: mean(&d_own),
            ci95: ci(0),
        },
        delta_nll_random: Estimate {
            mean: mean(&d_rand),
            ci95: ci(1),
        },
        excess: Estimate {
            mean: observed,
            ci95: ci(2),
        },
        p_excess: (1 + hits) as f64 / (1 + rs.perm_reps) as f64,
        agreement: mean(&own.iter().map(|e| e.agreement).collect::<Vec<_>>()),
        agreement_random: mean(&rmean(&|e| e.agreement)),
        routing_changed: mean(&own.iter().map(|e| e.routing_changed).collect::<Vec<_>>()),
        routing_changed_random: mean(&rmean(&|e| e.routing_changed)),
        jaccard: mean(&own.iter().map(|e| e.jaccard).collect::<Vec<_>>()),
        jaccard_random: mean(&rmean(&|e| e.jaccard)),
    })
}

/// The experts masked for one category at one dose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MaskedSet {
    pub category: String,
    /// Per MoE layer (in `moe_layers` order): the characteristic experts masked.
    pub characteristic: Vec<Vec<u32>>,
    /// Per control draw, per MoE layer: the load-matched random experts masked.
    pub random: Vec<Vec<Vec<u32>>>,
}

/// One dose (one `n`): the masked sets and the effect matrix (ablated × evaluated, row-major in
/// `categories` order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dose {
    pub n: usize,
    pub masked: Vec<MaskedSet>,
    pub cells: Vec<EffectCell>,
    /// Mean `excess` of the diagonal cells (own category) and of the off-diagonal cells.
    pub diagonal_excess: f64,
    pub off_diagonal_excess: f64,
    /// Mean `delta_nll` of the diagonal cells (own category) and of the off-diagonal cells.
    pub diagonal_delta_nll: f64,
    pub off_diagonal_delta_nll: f64,
}

/// Diagonal / off-diagonal means of a dose's cells.
pub fn dose_summary(n: usize, masked: Vec<MaskedSet>, cells: Vec<EffectCell>) -> Dose {
    let pick = |diag: bool, f: &dyn Fn(&EffectCell) -> f64| -> f64 {
        mean(
            &cells
                .iter()
                .filter(|c| (c.ablated == c.evaluated) == diag)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    Dose {
        n,
        diagonal_excess: pick(true, &|c| c.excess.mean),
        off_diagonal_excess: pick(false, &|c| c.excess.mean),
        diagonal_delta_nll: pick(true, &|c| c.delta_nll.mean),
        off_diagonal_delta_nll: pick(false, &|c| c.delta_nll.mean),
        masked,
        cells,
    }
}

/// Settings recorded in `ablation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AblationSettings {
    /// `per_layer` or `global`.
    pub budget: String,
    pub doses: Vec<usize>,
    pub control_draws: usize,
    pub load_bins: usize,
    pub max_new_tokens: usize,
    pub boot_reps: usize,
    pub perm_reps: usize,
    pub seed: u64,
}

/// `ablation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AblationResults {
    pub schema_version: u32,
    pub tool_version: String,
    pub model: String,
    pub settings: AblationSettings,
    /// Decoder indices of the MoE layers (the layers of every per-layer list).
    pub moe_layers: Vec<u32>,
    pub num_experts: usize,
    pub top_k: usize,
    pub categories: Vec<String>,
    pub prompt_ids: Vec<String>,
    /// Continuation tokens scored per prompt (the unablated model's greedy continuation).
    pub continuation_tokens: Vec<usize>,
    /// Mean unablated NLL per continuation token, over all prompts.
    pub base_nll: f64,
    /// Per category, per MoE layer × expert (layer-major): the signature contrast.
    pub contrast: Vec<Vec<f64>>,
    pub doses: Vec<Dose>,
    /// Teacher-forced passes run (each over all prompts; greedy generation not counted).
    pub passes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn contrast_is_own_mean_minus_mean_of_other_means() {
        // 3 categories, width 2; category 0 has two prompts.
        let sigs = [1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.2, 0.8];
        let labels = [0, 0, 1, 2];
        let c = signature_contrast(&sigs, &labels, 3, 2).unwrap();
        // cat0 mean (0.75, 0.25); cat1 (0,1); cat2 (0.2,0.8)
        assert!((c[0] - (0.75 - 0.1)).abs() < 1e-12);
        assert!((c[3] - (1.0 - 0.525)).abs() < 1e-12);
        assert!(signature_contrast(&sigs, &labels, 1, 2).is_err());
    }

    #[test]
    fn per_layer_and_global_budgets() {
        // 2 layers × 4 experts
        let c = [0.1, 0.5, 0.5, -0.2, 0.9, 0.8, 0.7, 0.0];
        let pl = characteristic_experts(&c, 2, 4, Budget::PerLayer(2), 2).unwrap();
        assert_eq!(pl, vec![vec![1, 2], vec![0, 1]]);
        let g = characteristic_experts(&c, 2, 4, Budget::Global(2), 3).unwrap();
        assert_eq!(g, vec![vec![1], vec![0, 1, 2]]);
        assert!(characteristic_experts(&c, 2, 4, Budget::PerLayer(3), 2).is_err());
    }

    #[test]
    fn load_matched_control_stays_in_bin_and_avoids_chosen() {
        let load = [0.01, 0.02, 0.03, 0.04, 0.2, 0.21, 0.22, 0.23];
        let chosen = vec![vec![0u32, 5]];
        for s in 0..50 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
            let r = load_matched_random(&load, 8, &chosen, 2, &mut rng).unwrap();
            assert_eq!(r[0].len(), 2);
            let lo = r[0].iter().filter(|&&e| e < 4).count();
            assert_eq!(lo, 1, "{r:?}");
            assert!(!r[0].contains(&0) && !r[0].contains(&5));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert!(load_matched_random(&load, 8, &[vec![0, 1, 2, 3, 4]], 2, &mut rng).is_err());
    }

    #[test]
    fn prompt_effect_counts_changes() {
        let base = PromptScores {
            nll: vec![1.0, 2.0],
            argmax: vec![5, 6],
            routes: vec![0, 1, 2, 3],
        };
        let abl = PromptScores {
            nll: vec![2.0, 3.0],
            argmax: vec![5, 7],
            routes: vec![1, 0, 2, 4],
        };
        let e = prompt_effect(&base, &abl, 2).unwrap();
        assert_eq!(e.delta_nll, 1.0);
        assert_eq!(e.agreement, 0.5);
        assert_eq!(e.routing_changed, 0.5);
        assert!((e.jaccard - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!(prompt_effect(&base, &PromptScores::default(), 2).is_err());
    }

    #[test]
    fn effect_cell_detects_a_real_excess_and_not_a_null_one() {
        let mk = |d: f64| PromptEffect {
            delta_nll: d,
            agreement: 1.0,
            routing_changed: 0.0,
            jaccard: 1.0,
        };
        let rs = Resampling {
            boot_reps: 500,
            perm_reps: 500,
            seed: 3,
        };
        let own: Vec<PromptEffect> = (0..20).map(|i| mk(1.0 + 0.01 * i as f64)).collect();
        let rnd = vec![(0..20)
            .map(|i| mk(0.1 + 0.02 * (i % 3) as f64))
            .collect::<Vec<_>>()];
        let c = effect_cell("a", "a", &own, &rnd, rs, 0).unwrap();
        assert!(c.excess.mean > 0.8 && c.excess.ci95[0] > 0.8, "{c:?}");
        assert!(c.p_excess < 0.01);
        let null: Vec<PromptEffect> = (0..20)
            .map(|i| mk(if i % 2 == 0 { 0.1 } else { -0.1 }))
            .collect();
        let rnd0 = vec![vec![mk(0.0); 20]];
        let c = effect_cell("a", "b", &null, &rnd0, rs, 1).unwrap();
        assert!(c.p_excess > 0.2, "{c:?}");
        assert!(c.excess.ci95[0] < 0.0 && c.excess.ci95[1] > 0.0);
        // same seed -> same numbers
        assert_eq!(c, effect_cell("a", "b", &null, &rnd0, rs, 1).unwrap());
    }
}
