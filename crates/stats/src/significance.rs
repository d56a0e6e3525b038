//! Label-permutation p-values and the stratified bootstrap CI of Cohen's d (see
//! `docs/statistics.md`). The classifier permutation test and the accuracy bootstrap live in
//! `cv.rs`.

use crate::results::LabelPermutation;
use crate::similarity::{within_across_fast, WithinAcrossSums};
use crate::{sub_rng, tags};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;

/// Relative tolerance when comparing a permuted statistic with the observed one, so that
/// permutations giving the same value up to summation order count as "≥ observed".
pub const TIE_TOLERANCE: f64 = 1e-12;

/// `(1 + #{perm ≥ obs}) / (1 + R)`.
pub fn p_value(observed: f64, perms: &[f64]) -> f64 {
    let tol = TIE_TOLERANCE * observed.abs().max(1.0);
    let ge = perms.iter().filter(|&&x| x >= observed - tol).count();
    (1 + ge) as f64 / (1 + perms.len()) as f64
}

/// Shuffle the category labels among prompts `reps` times (stream `LABEL_PERMUTATION`, one per
/// repetition) and compare within−across and d with the observed labels.
pub fn label_permutation(
    sim: &[f64],
    labels: &[usize],
    reps: usize,
    seed: u64,
) -> LabelPermutation {
    let (w, a, d) = within_across_fast(sim, labels);
    let perms: Vec<(f64, f64)> = (0..reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = sub_rng(seed, tags::LABEL_PERMUTATION, r as u64);
            let mut l = labels.to_vec();
            l.shuffle(&mut rng);
            let (pw, pa, pd) = within_across_fast(sim, &l);
            (pw - pa, pd)
        })
        .collect();
    let diffs: Vec<f64> = perms.iter().map(|x| x.0).collect();
    let ds: Vec<f64> = perms.iter().map(|x| x.1).collect();
    LabelPermutation {
        reps,
        seed,
        observed_within_minus_across: w - a,
        observed_cohens_d: d,
        p_within_minus_across: p_value(w - a, &diffs),
        p_cohens_d: p_value(d, &ds),
    }
}

/// Percentile of sorted data with numpy's default linear interpolation.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Percentile CI `[q_lo, q_hi]` of a sample (NaNs dropped).
pub fn percentile_ci(values: &[f64], q_lo: f64, q_hi: f64) -> [f64; 2] {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    [percentile_sorted(&v, q_lo), percentile_sorted(&v, q_hi)]
}

/// Cohen's d of one stratified bootstrap resample `idx` (original prompt indices); pairs of two
/// copies of the same original prompt are excluded.
pub fn resample_d(sim: &[f64], labels: &[usize], idx: &[usize]) -> f64 {
    let n = labels.len();
    let mut acc = WithinAcrossSums::default();
    for (a, &i) in idx.iter().enumerate() {
        let row = &sim[i * n..(i + 1) * n];
        for &j in &idx[a + 1..] {
            if i != j {
                acc.add(labels[i] == labels[j], row[j]);
            }
        }
    }
    acc.summary().2
}

/// Stratified bootstrap of Cohen's d: `reps` resamples of prompts with replacement within each
/// category (stream `BOOTSTRAP`), percentile 95 % CI (numpy linear interpolation).
pub fn bootstrap_d(sim: &[f64], labels: &[usize], reps: usize, seed: u64) -> [f64; 2] {
    let ncat = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); ncat];
    for (i, &c) in labels.iter().enumerate() {
        members[c].push(i);
    }
    let ds: Vec<f64> = (0..reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = sub_rng(seed, tags::BOOTSTRAP, r as u64);
            let mut idx = Vec::with_capacity(labels.len());
            for m in &members {
                for _ in 0..m.len() {
                    idx.push(m[rng.random_range(0..m.len())]);
                }
            }
            resample_d(sim, labels, &idx)
        })
        .collect();
    percentile_ci(&ds, 0.025, 0.975)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planted(n: usize) -> (Vec<f64>, Vec<usize>) {
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let mut sim = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let base = if labels[i] == labels[j] { 0.8 } else { 0.5 };
                sim[i * n + j] = if i == j {
                    1.0
                } else {
                    base + 0.01 * (((i * j) % 7) as f64)
                };
            }
        }
        (sim, labels)
    }

    #[test]
    fn p_value_plus_one() {
        assert_eq!(p_value(1.0, &[0.0, 2.0, 1.0, 0.5]), 3.0 / 5.0);
        assert_eq!(p_value(5.0, &[]), 1.0);
    }

    #[test]
    fn planted_structure_is_significant_and_deterministic() {
        let (sim, labels) = planted(24);
        let r = label_permutation(&sim, &labels, 199, 0);
        assert_eq!(r.p_within_minus_across, 1.0 / 200.0);
        assert_eq!(r.p_cohens_d, 1.0 / 200.0);
        assert_eq!(r, label_permutation(&sim, &labels, 199, 0));
        let ci = bootstrap_d(&sim, &labels, 200, 0);
        assert!(ci[0] > 3.0 && ci[0] <= ci[1], "{ci:?}");
        assert_eq!(ci, bootstrap_d(&sim, &labels, 200, 0));
    }

    #[test]
    fn no_structure_gives_large_p() {
        let n = 20;
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let mut sim = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                sim[i * n + j] = 0.5 + 0.1 * ((((i + 1) * (j + 1) * 7919) % 13) as f64 / 13.0);
            }
        }
        let r = label_permutation(&sim, &labels, 500, 1);
        assert!(r.p_within_minus_across > 0.01, "{r:?}");
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], 2.5) = 1.075, 97.5 -> 3.925
        assert!((percentile_sorted(&v, 0.025) - 1.075).abs() < 1e-12);
        assert!((percentile_sorted(&v, 0.975) - 3.925).abs() < 1e-12);
    }

    #[test]
    fn resample_excludes_same_original_pairs() {
        let (sim, labels) = planted(6);
        // Only copies of prompt 0 and prompt 3 (same category 0) and prompt 1 (category 1)
        let d1 = resample_d(&sim, &labels, &[0, 0, 3, 1]);
        let d2 = resample_d(&sim, &labels, &[0, 3, 1, 1]);
        assert!(d1.is_finite() && d2.is_finite());
    }
}
