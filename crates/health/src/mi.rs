//! Mutual information between routing signatures and task labels, I(signature; task).
//!
//! Estimator (definition and limits in `docs/health.md`):
//! 1. PCA of the centred N×D signature matrix via the N×N Gram matrix (so D = L·E = 1024 costs
//!    nothing extra); scores of the top `components` principal components, each sign-fixed so
//!    that its largest-magnitude score is positive.
//! 2. Each component is discretised into `bins` rank-based quantile bins
//!    (`bin = floor(rank · bins / N)`, ties broken by prompt order); the joint bin tuple is a cell.
//! 3. Plug-in MI in bits between cell and label.
//! 4. Bias correction: the labels are permuted `perms` times (seeded ChaCha8Rng, stream r for
//!    permutation r); `mi_corrected = mi_plugin − mean(mi_perm)`;
//!    `p = (1 + #{mi_perm ≥ mi_plugin}) / (1 + perms)`.
//!
//! A second, classifier-based estimate is reported alongside: a leave-one-out k-nearest-neighbour
//! predictor (cosine similarity of the signatures, `knn` neighbours, ties by prompt order) gives
//! `q(t|x_i) = (#{neighbours with label t} + 1) / (knn + C)`; since the cross-entropy of any
//! predictor bounds the conditional entropy from above, `I ≥ H(T) − CE` with
//! `CE = mean_i −log2 q(t_i|x_i)` (in expectation over held-out predictions). Its p-value uses the
//! same label permutations.

use std::collections::{BTreeMap, HashMap};

use nalgebra::{DMatrix, SymmetricEigen};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::health::PromptLoad;
use crate::{HealthError, Result};

/// Options of [`mutual_information`].
#[derive(Debug, Clone)]
pub struct MiOptions {
    /// Number of principal components discretised jointly (default 2).
    pub components: usize,
    /// Quantile bins per component (default 3).
    pub bins: usize,
    /// Label permutations for the bias correction and the p-value (default 1000).
    pub perms: usize,
    pub seed: u64,
    /// Neighbours of the leave-one-out k-NN lower bound (default 5; capped at N − 1).
    pub knn: usize,
}

impl Default for MiOptions {
    fn default() -> Self {
        MiOptions {
            knn: 5,
            components: 2,
            bins: 3,
            perms: 1000,
            seed: 0,
        }
    }
}

/// Result of [`mutual_information`] (all MI values in bits).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MiReport {
    pub estimator: String,
    pub n: usize,
    pub dims: usize,
    pub num_classes: usize,
    pub components: usize,
    pub bins: usize,
    /// Label entropy H(T) in bits (upper bound of I).
    pub label_entropy_bits: f64,
    pub mi_plugin_bits: f64,
    /// Mean plug-in MI under label permutations (the estimated bias).
    pub bias_bits: f64,
    /// `mi_plugin − bias` (may be slightly negative when there is no dependence).
    pub mi_corrected_bits: f64,
    /// `mi_corrected / H(T)`.
    pub normalized: f64,
    pub p_value: f64,
    /// Classifier lower bound `H(T) − CE` of leave-one-out k-NN predictions (bits; may be < 0).
    pub knn_lower_bound_bits: f64,
    /// Neighbours used by the k-NN bound.
    pub knn: usize,
    /// `(1 + #{bound_perm ≥ bound}) / (1 + perms)`.
    pub knn_p_value: f64,
    pub perms: usize,
    pub seed: u64,
}

/// Indices of the `k` most cosine-similar other rows of each row (ties by index).
fn neighbours(rows: &[Vec<f64>], k: usize) -> Vec<Vec<usize>> {
    let norms: Vec<f64> = rows
        .iter()
        .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let n = rows.len();
    (0..n)
        .map(|i| {
            let mut sims: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let dot: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
                    let d = norms[i] * norms[j];
                    (if d > 0.0 { dot / d } else { 0.0 }, j)
                })
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            sims.into_iter().take(k).map(|(_, j)| j).collect()
        })
        .collect()
}

/// `H(T) − CE` in bits of the Laplace-smoothed leave-one-out k-NN predictions.
fn knn_bound(nb: &[Vec<usize>], y: &[usize], classes: usize, h: f64) -> f64 {
    let mut ce = 0.0;
    let mut counts = vec![0usize; classes];
    for (i, nbrs) in nb.iter().enumerate() {
        counts.iter_mut().for_each(|c| *c = 0);
        for &j in nbrs {
            counts[y[j]] += 1;
        }
        let q = (counts[y[i]] as f64 + 1.0) / (nbrs.len() + classes) as f64;
        ce -= q.log2();
    }
    h - ce / y.len() as f64
}

/// Plug-in MI in bits between two discrete label vectors.
pub fn plugin_mi_bits(x: &[usize], y: &[usize]) -> f64 {
    let n = x.len() as f64;
    let mut joint: HashMap<(usize, usize), usize> = HashMap::new();
    let mut px: HashMap<usize, usize> = HashMap::new();
    let mut py: HashMap<usize, usize> = HashMap::new();
    for (&a, &b) in x.iter().zip(y) {
        *joint.entry((a, b)).or_default() += 1;
        *px.entry(a).or_default() += 1;
        *py.entry(b).or_default() += 1;
    }
    // Sum in a fixed order so the result does not depend on hash order.
    let mut cells: Vec<((usize, usize), usize)> = joint.into_iter().collect();
    cells.sort_unstable();
    let mut mi = 0.0;
    for ((a, b), c) in cells {
        let pxy = c as f64 / n;
        mi += pxy * (pxy * n * n / (px[&a] as f64 * py[&b] as f64)).log2();
    }
    mi.max(0.0)
}

fn entropy_bits(y: &[usize]) -> f64 {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &v in y {
        *counts.entry(v).or_default() += 1;
    }
    let n = y.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Scores of the top `m` principal components (N×m, row-major) of the centred rows.
pub fn pca_scores(rows: &[Vec<f64>], m: usize) -> Vec<Vec<f64>> {
    let n = rows.len();
    let d = rows.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; d];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += x;
        }
    }
    mean.iter_mut().for_each(|x| *x /= n as f64);
    let centred: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(x, m)| x - m).collect())
        .collect();
    let gram = DMatrix::from_fn(n, n, |i, j| {
        centred[i]
            .iter()
            .zip(&centred[j])
            .map(|(a, b)| a * b)
            .sum::<f64>()
    });
    let eig = SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        eig.eigenvalues[b]
            .total_cmp(&eig.eigenvalues[a])
            .then(a.cmp(&b))
    });
    let top = eig.eigenvalues[order[0]].max(0.0);
    let mut scores = vec![Vec::with_capacity(m.min(n)); n];
    for &c in order.iter().take(m) {
        let lam = eig.eigenvalues[c];
        if lam.is_nan() || lam <= 1e-12 * top.max(1e-300) {
            break;
        }
        let s = lam.sqrt();
        let col: Vec<f64> = (0..n).map(|i| eig.eigenvectors[(i, c)] * s).collect();
        let mut big = 0;
        for i in 1..n {
            if col[i].abs() > col[big].abs() {
                big = i;
            }
        }
        let sign = if col[big] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..n {
            scores[i].push(col[i] * sign);
        }
    }
    scores
}

/// Rank-based quantile bins of one column: `floor(rank · bins / N)`, ties by index.
fn quantile_bins(values: &[f64], bins: usize) -> Vec<usize> {
    let n = values.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let mut out = vec![0; n];
    for (rank, &i) in idx.iter().enumerate() {
        // In u128: `rank · bins` must not overflow for a hostile `bins` (same value otherwise).
        out[i] = (rank as u128 * bins as u128 / n as u128) as usize;
    }
    out
}

/// Estimates I(signature; task) — see the module docs. `signatures` are N rows of equal length,
/// `labels` N task labels (at least two distinct).
pub fn mutual_information(
    signatures: &[Vec<f64>],
    labels: &[String],
    opts: &MiOptions,
) -> Result<MiReport> {
    let n = signatures.len();
    if n != labels.len() {
        return Err(HealthError::InvalidInput(format!(
            "mutual information: {n} signatures but {} labels",
            labels.len()
        )));
    }
    if n < 4 {
        return Err(HealthError::InvalidInput(format!(
            "mutual information needs at least 4 prompts (got {n})"
        )));
    }
    let dims = signatures[0].len();
    if signatures.iter().any(|s| s.len() != dims) {
        return Err(HealthError::InvalidInput(
            "mutual information: signatures have different lengths".into(),
        ));
    }
    if opts.components == 0 || opts.bins < 2 {
        return Err(HealthError::InvalidInput(
            "mutual information needs components ≥ 1 and bins ≥ 2".into(),
        ));
    }
    if opts.perms > crate::compare::MAX_PERMUTATIONS {
        return Err(HealthError::InvalidInput(format!(
            "mutual information: --perms {} exceeds the maximum {}",
            opts.perms,
            crate::compare::MAX_PERMUTATIONS
        )));
    }
    let mut names: Vec<&String> = labels.iter().collect();
    names.sort();
    names.dedup();
    if names.len() < 2 {
        return Err(HealthError::InvalidInput(
            "mutual information needs at least two task categories".into(),
        ));
    }
    let y: Vec<usize> = labels
        .iter()
        .map(|l| names.binary_search(&l).unwrap_or(0))
        .collect();
    let scores = pca_scores(signatures, opts.components);
    let used = scores[0].len();
    // bins^used joint cells must be indexable (checked: hostile --mi-bins / --mi-components).
    if (0..used)
        .try_fold(1usize, |acc, _| acc.checked_mul(opts.bins))
        .is_none()
    {
        return Err(HealthError::InvalidInput(format!(
            "mutual information: {} bins ^ {used} components joint cells overflow; use fewer bins or components",
            opts.bins
        )));
    }
    let mut cell = vec![0usize; n];
    for c in 0..used {
        let col: Vec<f64> = scores.iter().map(|r| r[c]).collect();
        for (cl, b) in cell.iter_mut().zip(quantile_bins(&col, opts.bins)) {
            *cl = *cl * opts.bins + b;
        }
    }
    let observed = plugin_mi_bits(&cell, &y);
    let h = entropy_bits(&y);
    let knn = opts.knn.clamp(1, n - 1);
    let nb = neighbours(signatures, knn);
    let bound = knn_bound(&nb, &y, names.len(), h);
    let mut bound_ge = 0usize;
    let mut perm_y = y.clone();
    let mut null = Vec::with_capacity(opts.perms);
    for r in 0..opts.perms {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream(r as u64);
        perm_y.copy_from_slice(&y);
        perm_y.shuffle(&mut rng);
        null.push(plugin_mi_bits(&cell, &perm_y));
        if knn_bound(&nb, &perm_y, names.len(), h) >= bound - 1e-12 {
            bound_ge += 1;
        }
    }
    let bias = if null.is_empty() {
        0.0
    } else {
        null.iter().sum::<f64>() / null.len() as f64
    };
    let ge = null.iter().filter(|&&x| x >= observed - 1e-12).count();
    let corrected = observed - bias;
    Ok(MiReport {
        estimator: "plug-in MI over quantile-binned top PCA components, minus mean MI under label permutations".into(),
        n,
        dims,
        num_classes: names.len(),
        components: used,
        bins: opts.bins,
        label_entropy_bits: h,
        mi_plugin_bits: observed,
        bias_bits: bias,
        mi_corrected_bits: corrected,
        normalized: corrected / h,
        p_value: (1.0 + ge as f64) / (1.0 + null.len() as f64),
        knn_lower_bound_bits: bound,
        knn,
        knn_p_value: (1.0 + bound_ge as f64) / (1.0 + null.len() as f64),
        perms: opts.perms,
        seed: opts.seed,
    })
}

/// Signatures, their labels, and the `(prompt_id, reason)` of the prompts left out.
pub type LabelledSignatures = (Vec<Vec<f64>>, Vec<String>, Vec<(String, String)>);

/// Signatures of DESIGN.md (`s[l,e] = A[l,e] / Σ_e A[l,e]`, layer-major) of prompts with a
/// category; prompts without category or with an empty layer are returned in the second list.
pub fn signatures_with_labels(
    prompts: &[PromptLoad],
    num_layers: usize,
    num_experts: usize,
) -> LabelledSignatures {
    let mut sigs = Vec::new();
    let mut labels = Vec::new();
    let mut dropped = Vec::new();
    'p: for p in prompts {
        let Some(cat) = &p.category else {
            dropped.push((p.prompt_id.clone(), "no category".to_string()));
            continue;
        };
        let mut s = p.counts.clone();
        for l in 0..num_layers {
            let r = &mut s[l * num_experts..(l + 1) * num_experts];
            let t: f64 = r.iter().sum();
            if t <= 0.0 {
                dropped.push((p.prompt_id.clone(), format!("no selections at layer {l}")));
                continue 'p;
            }
            r.iter_mut().for_each(|x| *x /= t);
        }
        sigs.push(s);
        labels.push(cat.clone());
    }
    (sigs, labels, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn data(separated: bool) -> (Vec<Vec<f64>>, Vec<String>) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut sigs = Vec::new();
        let mut labels = Vec::new();
        for i in 0..60 {
            let c = i % 3;
            let mut v: Vec<f64> = (0..32).map(|_| rng.random::<f64>()).collect();
            if separated {
                v[c] += 5.0;
            }
            sigs.push(v);
            labels.push(format!("cat{c}"));
        }
        (sigs, labels)
    }

    #[test]
    fn separated_classes_have_high_significant_mi() {
        let (s, l) = data(true);
        let opts = MiOptions {
            perms: 200,
            ..Default::default()
        };
        let r = mutual_information(&s, &l, &opts).unwrap();
        assert!(r.mi_corrected_bits > 0.8, "{r:?}");
        assert!(r.p_value < 0.01);
        assert!(r.knn_lower_bound_bits > 0.5, "{r:?}");
        assert!(r.knn_lower_bound_bits <= r.label_entropy_bits);
        assert!(r.knn_p_value < 0.01);
        assert!(r.mi_plugin_bits <= r.label_entropy_bits + 1e-12);
        assert_eq!(r, mutual_information(&s, &l, &opts).unwrap());
    }

    #[test]
    fn unrelated_labels_have_near_zero_corrected_mi() {
        let (s, l) = data(false);
        let opts = MiOptions {
            perms: 300,
            ..Default::default()
        };
        let r = mutual_information(&s, &l, &opts).unwrap();
        assert!(r.mi_corrected_bits.abs() < 0.15, "{r:?}");
        assert!(r.p_value > 0.01, "{r:?}");
        assert!(r.bias_bits > 0.0);
        assert!(r.knn_lower_bound_bits < 0.1, "{r:?}");
    }

    #[test]
    fn plugin_mi_of_identical_labels_is_entropy() {
        let x = [0, 0, 1, 1, 2, 2];
        assert!((plugin_mi_bits(&x, &x) - 3f64.log2()).abs() < 1e-12);
        assert_eq!(plugin_mi_bits(&[0, 1, 0, 1], &[0, 0, 1, 1]), 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = vec![vec![0.0; 3]; 5];
        let one = vec!["a".to_string(); 5];
        assert!(mutual_information(&s, &one, &MiOptions::default()).is_err());
        assert!(mutual_information(&s[..2], &one[..2], &MiOptions::default()).is_err());
    }
}
