//! Prompt×prompt similarity and its summaries over unordered pairs i<j (see `docs/statistics.md`).

use crate::results::{CategoryMatrix, LayerStats, PairStats, SimilaritySummary};
use nalgebra::{DMatrix, DMatrixView};

/// `G = V Vᵀ` for a row-major N×D matrix `v` (N×N, row-major = column-major since symmetric).
/// Uses nalgebra's GEMM (matrixmultiply), single-threaded and deterministic.
pub fn gram(v: &[f64], n: usize, d: usize) -> Vec<f64> {
    assert_eq!(v.len(), n * d, "gram: matrix has the wrong length");
    // Row-major N×D is column-major D×N: columns are the prompts.
    let vt = DMatrixView::from_slice(v, d, n);
    // `transpose() * view` goes through nalgebra's gemm (matrixmultiply's blocked dgemm);
    // `tr_mul` would be a naive dot-product loop.
    let vn: DMatrix<f64> = vt.transpose();
    let g: DMatrix<f64> = &vn * vt;
    g.as_slice().to_vec()
}

/// Per-layer cosine matrix `C_l[i,j] = cos(s_i[l], s_j[l])` from embeddings `v` (N×(L·E)).
pub fn layer_gram(
    v: &[f64],
    n: usize,
    num_layers: usize,
    num_experts: usize,
    l: usize,
) -> Vec<f64> {
    let d = num_layers * num_experts;
    let vt = DMatrixView::from_slice(v, d, n);
    let block = vt.rows(l * num_experts, num_experts);
    let mut g: DMatrix<f64> = block.tr_mul(&block);
    g *= num_layers as f64;
    g.as_slice().to_vec()
}

/// Mean and std (ddof = 1) with a two-pass algorithm, in the order given.
pub fn mean_std(xs: impl Iterator<Item = f64> + Clone) -> PairStats {
    let mut n = 0u64;
    let mut s = 0.0;
    for x in xs.clone() {
        n += 1;
        s += x;
    }
    if n == 0 {
        return PairStats {
            n: 0,
            mean: f64::NAN,
            std: f64::NAN,
        };
    }
    let mean = s / n as f64;
    let ss: f64 = xs.map(|x| (x - mean) * (x - mean)).sum();
    let std = if n > 1 {
        (ss / (n - 1) as f64).sqrt()
    } else {
        f64::NAN
    };
    PairStats { n, mean, std }
}

/// Cohen's d with the pooled SD `sp = sqrt(((n_w−1)s_w² + (n_a−1)s_a²)/(n_w+n_a−2))`.
pub fn cohens_d(w: &PairStats, a: &PairStats) -> f64 {
    let (nw, na) = (w.n as f64, a.n as f64);
    let sp = (((nw - 1.0) * w.std * w.std + (na - 1.0) * a.std * a.std) / (nw + na - 2.0)).sqrt();
    (w.mean - a.mean) / sp
}

/// Within/across summaries of a symmetric N×N similarity matrix over pairs i<j.
pub fn summarize(sim: &[f64], labels: &[usize]) -> SimilaritySummary {
    let n = labels.len();
    let pairs = move |same: bool| {
        (0..n).flat_map(move |i| {
            ((i + 1)..n)
                .filter(move |&j| (labels[i] == labels[j]) == same)
                .map(move |j| sim[i * n + j])
        })
    };
    let within = mean_std(pairs(true));
    let across = mean_std(pairs(false));
    SimilaritySummary {
        within,
        across,
        cohens_d: cohens_d(&within, &across),
    }
}

/// One-pass sums `(n, Σx, Σx²)` of pair similarities, turned into [`PairStats`] by
/// [`PairSums::stats`]. Shared by the fast paths (label permutation, bootstrap of d) and the
/// Gram-sums path, which get the sums without visiting pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairSums {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl PairSums {
    #[inline]
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Component-wise sum of two sets of sums.
    pub fn merge(self, o: PairSums) -> PairSums {
        PairSums {
            n: self.n + o.n,
            sum: self.sum + o.sum,
            sum_sq: self.sum_sq + o.sum_sq,
        }
    }

    /// Mean and std (ddof = 1, `var = (Σx² − Σx·mean)/(n − 1)`, clamped at 0 against rounding).
    pub fn stats(&self) -> PairStats {
        let n = self.n as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq - self.sum * mean) / (n - 1.0);
        PairStats {
            n: self.n,
            mean,
            std: var.max(0.0).sqrt(),
        }
    }
}

/// [`PairSums`] of within-category and across-category pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WithinAcrossSums {
    pub within: PairSums,
    pub across: PairSums,
}

impl WithinAcrossSums {
    #[inline]
    pub fn add(&mut self, same_category: bool, x: f64) {
        if same_category {
            self.within.add(x);
        } else {
            self.across.add(x);
        }
    }

    /// `(within_mean, across_mean, cohens_d)`.
    pub fn summary(&self) -> (f64, f64, f64) {
        let (w, a) = (self.within.stats(), self.across.stats());
        (w.mean, a.mean, cohens_d(&w, &a))
    }
}

/// Only the means of within and across pairs (fast path for permutation tests): returns
/// `(within_mean, across_mean, cohens_d)`.
pub fn within_across_fast(sim: &[f64], labels: &[usize]) -> (f64, f64, f64) {
    let n = labels.len();
    let mut acc = WithinAcrossSums::default();
    for i in 0..n {
        let li = labels[i];
        let row = &sim[i * n..(i + 1) * n];
        for j in (i + 1)..n {
            acc.add(labels[j] == li, row[j]);
        }
    }
    acc.summary()
}

/// Category×category mean similarity; `(A,A)` uses pairs i<j within A. Categories in `order`.
pub fn category_matrix(sim: &[f64], labels: &[usize], order: &[String]) -> CategoryMatrix {
    let n = labels.len();
    let c = order.len();
    let mut sum = vec![0.0; c * c];
    let mut cnt = vec![0u64; c * c];
    for i in 0..n {
        for j in (i + 1)..n {
            let (a, b) = (labels[i], labels[j]);
            let x = sim[i * n + j];
            sum[a * c + b] += x;
            cnt[a * c + b] += 1;
            if a != b {
                sum[b * c + a] += x;
                cnt[b * c + a] += 1;
            }
        }
    }
    let values = (0..c)
        .map(|a| {
            (0..c)
                .map(|b| sum[a * c + b] / cnt[a * c + b] as f64)
                .collect()
        })
        .collect();
    CategoryMatrix {
        order: order.to_vec(),
        values,
    }
}

/// Per-layer within mean, across mean and Cohen's d from per-layer cosines.
pub fn per_layer(
    v: &[f64],
    labels: &[usize],
    num_layers: usize,
    num_experts: usize,
) -> Vec<LayerStats> {
    let n = labels.len();
    (0..num_layers)
        .map(|l| {
            let c = layer_gram(v, n, num_layers, num_experts, l);
            let s = summarize(&c, labels);
            LayerStats {
                layer: l,
                within_mean: s.within.mean,
                across_mean: s.across.mean,
                cohens_d: s.cohens_d,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_ddof1() {
        let s = mean_std([1.0, 2.0, 3.0, 4.0].into_iter());
        assert_eq!(s.n, 4);
        assert!((s.mean - 2.5).abs() < 1e-15);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn fast_path_matches_two_pass() {
        let n = 7;
        let mut sim = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                sim[i * n + j] = (((i + 1) * (j + 1)) % 5) as f64 / 5.0 + (i == j) as u8 as f64;
            }
        }
        let labels = [0, 1, 0, 2, 1, 0, 2];
        let s = summarize(&sim, &labels);
        let (w, a, d) = within_across_fast(&sim, &labels);
        assert!((s.within.mean - w).abs() < 1e-12);
        assert!((s.across.mean - a).abs() < 1e-12);
        assert!((s.cohens_d - d).abs() < 1e-10);
    }
}
