//! Load-balance metrics of one expert-load vector, and divergences between load distributions.
//!
//! Hand-written: each is a few lines of arithmetic whose exact definition (log base, degenerate
//! cases) we document in `docs/health.md`; no maintained crate offers these with those conventions.

/// Shares `x_e / Σ x`; all zeros when the total is zero.
pub fn shares(load: &[f64]) -> Vec<f64> {
    let total: f64 = load.iter().sum();
    if total <= 0.0 {
        return vec![0.0; load.len()];
    }
    load.iter().map(|&x| x / total).collect()
}

/// Shannon entropy in nats of a distribution given by non-negative weights (normalised here),
/// with `0 ln 0 = 0`. Zero when the total is zero.
pub fn entropy_nats(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut h = 0.0;
    for &w in weights {
        if w > 0.0 {
            let p = w / total;
            h -= p * p.ln();
        }
    }
    h
}

/// Entropy divided by `ln E` (1 = perfectly uniform load, 0 = one expert takes everything).
/// Defined as 1 when `E = 1` and 0 when the total load is zero.
pub fn normalized_entropy(load: &[f64]) -> f64 {
    let e = load.len();
    let total: f64 = load.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    if e <= 1 {
        return 1.0;
    }
    entropy_nats(load) / (e as f64).ln()
}

/// Gini coefficient `Σ_i Σ_j |x_i − x_j| / (2 E Σ x)`, computed in O(E log E) from the sorted
/// values as `(2 Σ_i i·x_(i)) / (E Σ x) − (E + 1)/E` (i from 1, ascending order). 0 = equal load,
/// (E−1)/E = one expert takes everything. 0 when the total is zero.
pub fn gini(load: &[f64]) -> f64 {
    let e = load.len();
    let total: f64 = load.iter().sum();
    if e == 0 || total <= 0.0 {
        return 0.0;
    }
    let mut v = load.to_vec();
    v.sort_by(f64::total_cmp);
    let weighted: f64 = v
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as f64 + 1.0) * x)
        .sum();
    let n = e as f64;
    let g = 2.0 * weighted / (n * total) - (n + 1.0) / n;
    g.max(0.0)
}

/// Jain's fairness index `(Σ x)² / (E Σ x²)`: 1 = equal load, 1/E = one expert takes everything.
/// 0 when the total is zero.
pub fn jain(load: &[f64]) -> f64 {
    let e = load.len();
    let total: f64 = load.iter().sum();
    let sq: f64 = load.iter().map(|x| x * x).sum();
    if e == 0 || sq <= 0.0 {
        return 0.0;
    }
    total * total / (e as f64 * sq)
}

/// `max_e x_e / mean_e x_e` (1 = equal load, E = one expert takes everything); 0 when empty.
pub fn max_mean_ratio(load: &[f64]) -> f64 {
    let e = load.len();
    let total: f64 = load.iter().sum();
    if e == 0 || total <= 0.0 {
        return 0.0;
    }
    let max = load.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max * e as f64 / total
}

/// Jensen–Shannon divergence in bits (base 2, so it lies in [0, 1]) between the distributions
/// obtained by normalising the non-negative weight vectors `p` and `q`:
/// `JS = ½ KL(P‖M) + ½ KL(Q‖M)`, `M = (P+Q)/2`. Equals the square of
/// `scipy.spatial.distance.jensenshannon(p, q, base=2)`. The natural-log value is `JS · ln 2`.
/// Returns `None` when either vector has zero total or the lengths differ.
pub fn js_divergence_bits(p: &[f64], q: &[f64]) -> Option<f64> {
    if p.len() != q.len() {
        return None;
    }
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    if sp <= 0.0 || sq <= 0.0 {
        return None;
    }
    let mut js = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let a = a / sp;
        let b = b / sq;
        let m = 0.5 * (a + b);
        if a > 0.0 {
            js += 0.5 * a * (a / m).ln();
        }
        if b > 0.0 {
            js += 0.5 * b * (b / m).ln();
        }
    }
    Some((js / std::f64::consts::LN_2).clamp(0.0, 1.0))
}

/// Cosine similarity of two vectors; `None` when either has zero norm.
pub fn cosine(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut dot = 0.0;
    let mut na = 0.0;
    let mut nb = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na <= 0.0 || nb <= 0.0 {
        return None;
    }
    Some(dot / (na.sqrt() * nb.sqrt()))
}

/// Signature similarity of DESIGN.md: `sim = (1/L) Σ_l cos(s[l,:], s'[l,:])` for two layer-major
/// count matrices (cosine is scale invariant, so counts and shares give the same value).
/// `None` when either prompt has zero total in some layer.
pub fn signature_similarity(
    a: &[f64],
    b: &[f64],
    num_layers: usize,
    num_experts: usize,
) -> Option<f64> {
    let mut s = 0.0;
    for l in 0..num_layers {
        let r = l * num_experts..(l + 1) * num_experts;
        s += cosine(&a[r.clone()], &b[r])?;
    }
    Some(s / num_layers as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    #[test]
    fn uniform_and_concentrated_extremes() {
        let u = [5.0; 8];
        assert_abs_diff_eq!(normalized_entropy(&u), 1.0, epsilon = 1e-15);
        assert_abs_diff_eq!(gini(&u), 0.0, epsilon = 1e-15);
        assert_abs_diff_eq!(jain(&u), 1.0, epsilon = 1e-15);
        assert_abs_diff_eq!(max_mean_ratio(&u), 1.0, epsilon = 1e-15);
        let mut c = [0.0; 8];
        c[3] = 7.0;
        assert_abs_diff_eq!(normalized_entropy(&c), 0.0, epsilon = 1e-15);
        assert_abs_diff_eq!(gini(&c), 7.0 / 8.0, epsilon = 1e-15);
        assert_abs_diff_eq!(jain(&c), 1.0 / 8.0, epsilon = 1e-15);
        assert_abs_diff_eq!(max_mean_ratio(&c), 8.0, epsilon = 1e-15);
    }

    #[test]
    fn gini_matches_pairwise_definition() {
        let x = [3.0, 0.0, 1.0, 9.0, 4.0, 4.0];
        let n = x.len() as f64;
        let total: f64 = x.iter().sum();
        let mut s = 0.0;
        for a in x {
            for b in x {
                s += f64::abs(a - b);
            }
        }
        assert_abs_diff_eq!(gini(&x), s / (2.0 * n * total), epsilon = 1e-14);
    }

    #[test]
    fn js_known_values() {
        assert_eq!(js_divergence_bits(&[1.0, 0.0], &[0.0, 1.0]), Some(1.0));
        assert_abs_diff_eq!(
            js_divergence_bits(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap(),
            0.0,
            epsilon = 1e-15
        );
        assert!(js_divergence_bits(&[0.0, 0.0], &[1.0, 1.0]).is_none());
        // P = (1/2, 1/2), Q = (1, 0): M = (3/4, 1/4); JS = ½[½ log2(2/3) + ½ log2 2] + ½ log2(4/3)
        let want = 0.5 * (0.5 * (2.0f64 / 3.0).log2() + 0.5) + 0.5 * (4.0f64 / 3.0).log2();
        assert_abs_diff_eq!(
            js_divergence_bits(&[1.0, 1.0], &[1.0, 0.0]).unwrap(),
            want,
            epsilon = 1e-15
        );
    }

    #[test]
    fn signature_similarity_is_mean_of_layer_cosines() {
        let a = [1.0, 0.0, 1.0, 1.0];
        let b = [1.0, 0.0, 1.0, 0.0];
        let s = signature_similarity(&a, &b, 2, 2).unwrap();
        assert_abs_diff_eq!(s, 0.5 * (1.0 + 1.0 / 2f64.sqrt()), epsilon = 1e-15);
        assert!(signature_similarity(&a, &[0.0, 0.0, 1.0, 1.0], 2, 2).is_none());
    }
}
