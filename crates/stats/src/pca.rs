//! Exact PCA of the signature matrix: centred, unscaled, via the eigendecomposition of the N×N
//! Gram matrix of the centred rows (N ≪ L·E), with scikit-learn's sign convention.

use crate::error::{Result, StatsError};
use crate::results::PcaResult;
use nalgebra::{DMatrix, DMatrixView, SymmetricEigen};

/// Which `svd_flip` rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignConvention {
    /// scikit-learn ≥ 1.5 `PCA`: `svd_flip(U, Vt, u_based_decision=False)` — in each component
    /// (row of `Vt`) the loading with the largest absolute value (first one on ties) is positive.
    #[default]
    ComponentBased,
    /// scikit-learn < 1.5: in each column of `U` the score with the largest |value| is positive.
    ScoreBased,
}

/// PCA result with the explained-variance ratios of the first `min(max_components, N−1)`
/// components and the first two component scores of every prompt.
pub fn pca(
    x: &[f64],
    n: usize,
    d: usize,
    max_components: usize,
    sign: SignConvention,
) -> Result<PcaResult> {
    if x.len() != n * d {
        return Err(StatsError::Dimension(format!(
            "pca: {} values for a {n}x{d} matrix",
            x.len()
        )));
    }
    if n < 2 {
        return Err(StatsError::InvalidInput(
            "pca needs at least 2 prompts".into(),
        ));
    }
    // Centre the columns.
    let mut xc = x.to_vec();
    for j in 0..d {
        let m = (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64;
        for i in 0..n {
            xc[i * d + j] -= m;
        }
    }
    let xt = DMatrixView::from_slice(&xc, d, n); // columns = centred prompts
    let k: DMatrix<f64> = xt.tr_mul(&xt);
    let total: f64 = k.trace();
    let eig = SymmetricEigen::try_new(k, 1e-300_f64.max(f64::EPSILON * 1e-3), 10_000)
        .ok_or_else(|| StatsError::Numerical("PCA eigendecomposition did not converge".into()))?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let ncomp = max_components.min(n - 1);
    let mut ratios = Vec::with_capacity(ncomp);
    let mut coords = vec![[0.0f64; 2]; n];
    for (c, &idx) in order.iter().take(ncomp).enumerate() {
        let lambda = eig.eigenvalues[idx].max(0.0);
        ratios.push(if total > 0.0 { lambda / total } else { 0.0 });
        if c >= 2 || lambda <= 0.0 {
            continue;
        }
        let s = lambda.sqrt();
        let u = eig.eigenvectors.column(idx);
        let flip = match sign {
            SignConvention::ScoreBased => {
                let j = argmax_abs(u.iter().copied());
                u[j] < 0.0
            }
            SignConvention::ComponentBased => {
                // component loading v = Xcᵀ u / s
                let v: Vec<f64> = (0..d)
                    .map(|f| (0..n).map(|i| xc[i * d + f] * u[i]).sum::<f64>() / s)
                    .collect();
                let j = argmax_abs(v.iter().copied());
                v[j] < 0.0
            }
        };
        let sgn = if flip { -1.0 } else { 1.0 };
        for i in 0..n {
            coords[i][c] = sgn * u[i] * s;
        }
    }
    Ok(PcaResult {
        explained_variance_ratio: ratios,
        coords,
    })
}

/// Index of the first entry with the largest absolute value (numpy `argmax(abs(x))`).
fn argmax_abs(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x.abs() > best.1 {
            best = (i, x.abs());
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_of_points_on_a_line_and_a_bump() {
        // Points (t, 0, 0) for t = -2..2 plus a small second direction.
        let x = [
            -2.0, 0.1, 0.0, //
            -1.0, -0.1, 0.0, //
            0.0, 0.0, 0.0, //
            1.0, -0.1, 0.0, //
            2.0, 0.1, 0.0,
        ];
        let r = pca(&x, 5, 3, 10, SignConvention::ComponentBased).unwrap();
        assert_eq!(r.explained_variance_ratio.len(), 4);
        let total = 10.0 + 0.04;
        assert!((r.explained_variance_ratio[0] - 10.0 / total).abs() < 1e-12);
        assert!((r.explained_variance_ratio[1] - 0.04 / total).abs() < 1e-12);
        // first loading (1,0,0) is positive, so scores follow t
        for (i, t) in [-2.0, -1.0, 0.0, 1.0, 2.0].iter().enumerate() {
            assert!((r.coords[i][0] - t).abs() < 1e-12, "{:?}", r.coords);
        }
        assert!((r.coords[0][1].abs() - 0.1).abs() < 1e-12);
        // largest |loading| of comp 2 is +y => score of the first point is +0.1
        assert!((r.coords[0][1] - 0.1).abs() < 1e-12);
        let u = pca(&x, 5, 3, 10, SignConvention::ScoreBased).unwrap();
        // score-based: the largest |score| of the first component is positive
        let big = u
            .coords
            .iter()
            .map(|c| c[0])
            .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        assert!((big - 2.0).abs() < 1e-12, "{:?}", u.coords);
    }
}
