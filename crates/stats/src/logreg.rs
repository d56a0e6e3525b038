//! L2-regularised logistic regression minimising exactly scikit-learn's
//! `LogisticRegression(C, solver="lbfgs")` objective (checked against scikit-learn 1.9.1,
//! `sklearn/linear_model/_logistic.py` and `_linear_loss.py`).
//!
//! * K ≥ 3 classes (multinomial, scikit-learn's symmetric parametrisation with K weight
//!   vectors, `HalfMultinomialLoss`):
//!   `F(W, b) = (1/n) Σ_i −log softmax(W x_i + b)_{y_i} + ‖W‖²_F / (2 C n)`.
//! * K = 2 classes: scikit-learn 1.9.1 (and the default `multi_class="auto"` of older versions)
//!   fits the *binary* model with one weight vector for the positive class `classes_[1]`
//!   (`HalfBinomialLoss`): `F(w, b) = (1/n) Σ_i [log(1 + e^{s_i}) − y_i s_i] + ‖w‖² / (2 C n)`,
//!   `s_i = w·x_i + b`. We do the same, so [`LogReg::coef`] has **one** row when K = 2 (as
//!   `coef_`), and K rows otherwise. (The symmetric 2-class multinomial would be the binary model
//!   with C doubled — not what scikit-learn fits.)
//!
//! The intercept is not penalised. scikit-learn scales the loss by 1/n and the penalty by
//! 1/(2Cn); the minimiser is the same as for `Σ loss + ‖W‖²/(2C)`. In the multinomial model the
//! intercepts are determined only up to a common shift; like L-BFGS started from zero (which
//! never leaves the subspace Σ_k b_k = 0, because every gradient lies in it) we report the
//! representative with Σ_k b_k = 0.
//!
//! **Reduced problem.** The optimal W lies in the row space of X (every gradient of the loss is a
//! combination of the x_i, and the penalty is rotation invariant). [`Design`] computes the thin
//! SVD X = A Σ Bᵀ (r = min(n, d); for d > n as the SVD of the n × n factor Rᵀ of the QR
//! decomposition Xᵀ = Q R, so B = Q C): the reduced features are Z = A Σ (n × r, rows
//! z_i = Bᵀ x_i), whose columns are orthogonal with norms σ_c (the principal components). We
//! solve the identical problem for U = W B on the z_i and map back W = U Bᵀ. This changes only
//! the cost (n·r·K instead of n·d·K per evaluation), not the minimiser. [`Design`] keeps B and
//! Z so that refits with other labels (permutation tests) reuse them; those refits can also
//! stay in reduced coordinates ([`Design::fit_reduced`], predicting test rows projected once
//! with [`Design::project`]), so W is never formed.
//!
//! **Preconditioning.** In the principal-component basis the curvature of the loss at θ = 0 is
//! diagonal: γ σ_c² / n along weight coordinate c (γ = 1/4 binary; 1/K on the class contrasts
//! of the multinomial, where p = 1/K), plus λ = 1/(Cn) from the penalty, and γ for the
//! intercepts (for centred features, as in the cross-validation). L-BFGS therefore runs in the
//! variables v_{kc} = u_{kc} / s_c and β_k = b_k / s_b with s_c = 1/sqrt(γ σ_c²/n + λ),
//! s_b = 1/sqrt(γ) — a diagonal change of variables, so the minimiser is unchanged (the penalty
//! becomes Σ λ s_c² v_{kc}² / 2), but the Hessian at the start is the identity and the
//! iterations no longer depend on the spread of the σ_c (permuted refits on the synthetic
//! paper-shape benchmark data, gtol 1e-6: ~20 instead of ~107 iterations on average; see also
//! the test `preconditioning_makes_random_label_fits_cheap`). Limitation: the scaling assumes
//! the curvature at θ = 0. Where the fit saturates strongly along the large components (e.g.
//! unstandardised columns spanning 1e-3…1e3, which the cross-validation never passes since it
//! standardises first) the preconditioned problem is worse conditioned at the optimum and
//! L-BFGS needs more iterations than without it (measured 385 → 8110 on such a synthetic case;
//! still converged, and `max_iter` bounds it).
//!
//! **Optimiser.** Hand-written L-BFGS (memory 10) with a strong-Wolfe line search (Nocedal &
//! Wright, *Numerical Optimization*, algorithms 3.5/3.6, cubic interpolation, c1 = 1e-4,
//! c2 = 0.9; first trial step 1, also for the initial steepest-descent step, which in the
//! preconditioned variables is a Newton step at θ = 0). Written by hand rather than taken from
//! `argmin` because (a) we run to a gradient tolerance near machine precision, where differences
//! of F drop below its rounding error: the line search then has to decide from directional
//! derivatives (valid because F is convex, see `line_search`) and the run has to end quietly when
//! no further progress is possible, which a generic line search treats as a failure; (b) the
//! classifier permutation test runs ~1000 fits of ~260 parameters each, where a generic
//! framework's per-iteration state handling and allocations are a large share of the cost (here
//! buffers are recycled and one evaluation is two small fixed-order matrix products, see
//! `Packed::matmul`, plus a vectorisable exponential, `exp_nonpos`); (c) ~250 lines do not
//! justify a dependency tree.
//!
//! **Stopping rule.** Stops when ‖∇F‖_∞ ≤ `gtol` · max(1, ‖∇F(0)‖_∞) (default gtol = 1e-10),
//! where ∇F is the gradient with respect to the reduced weights U (in the principal-component
//! basis; ∂F/∂u_{kc} = (∂F/∂v_{kc}) / s_c) and the intercepts, i.e. not with respect to the
//! preconditioned variables; or when the line search cannot make progress any more (machine
//! precision; then `converged` says whether the tolerance was met); or after `max_iter`
//! iterations. Everything runs sequentially with a fixed summation order: results are
//! bit-for-bit reproducible and independent of the thread count (the AVX build of the solver
//! computes the same operations in the same order, without fused multiply-adds).
//!
//! Fidelity (tests in `cv.rs` against `tools/reference_stats.py`, scikit-learn 1.9.1 with
//! `tol=1e-12`): weights agree within 1.4e-7 on all fixtures; intercepts within 1.1e-6, except one
//! paper-shape fold at 1.1e-5 where scikit-learn's own KKT residual (8.9e-7) is ~290× ours.

use std::sync::OnceLock;

use moe_xray_kernels::cpu::{with_avx, AvxBody};
use nalgebra::{DMatrix, SVD};
use serde::Serialize;

/// Errors of [`fit`] / [`Design`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FitError {
    #[error("logistic regression: data has {len} values, expected {n} rows x {d} columns")]
    Shape { len: usize, n: usize, d: usize },
    #[error("logistic regression: {labels} labels for {n} rows")]
    LabelCount { labels: usize, n: usize },
    #[error("logistic regression needs at least 2 classes, got {0}")]
    TooFewClasses(usize),
    #[error(
        "logistic regression: label {label} of row {row} is not below the number of classes {k}"
    )]
    LabelOutOfRange { row: usize, label: usize, k: usize },
    #[error("logistic regression: class {0} has no training rows")]
    EmptyClass(usize),
    #[error("logistic regression: non-finite value in row {row}")]
    NonFinite { row: usize },
    #[error("logistic regression: C must be positive and finite, got {0}")]
    BadC(f64),
    #[error("logistic regression: the singular value decomposition of the {n} x {d} data did not converge")]
    Svd { n: usize, d: usize },
}

/// Optimiser settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRegOptions {
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub c: f64,
    /// Relative gradient tolerance (see module docs).
    pub gtol: f64,
    pub max_iter: usize,
    /// Number of L-BFGS correction pairs.
    pub memory: usize,
}

impl Default for LogRegOptions {
    fn default() -> Self {
        Self {
            c: 1.0,
            gtol: 1e-10,
            max_iter: 20_000,
            memory: 10,
        }
    }
}

/// A fitted model. `coef` is row-major `rows × n_features` with `rows = 1` for 2 classes (the
/// positive class 1) and `rows = n_classes` otherwise; `intercept` has `rows` entries.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogReg {
    pub n_classes: usize,
    pub n_features: usize,
    pub coef: Vec<f64>,
    pub intercept: Vec<f64>,
    /// L-BFGS iterations used.
    pub n_iter: usize,
    /// ‖∇F‖_∞ at the solution (F scaled by 1/n as in scikit-learn).
    pub grad_norm: f64,
    /// Whether the gradient tolerance was reached.
    pub converged: bool,
}

impl LogReg {
    /// Number of coefficient rows (1 for binary problems).
    pub fn coef_rows(&self) -> usize {
        self.intercept.len()
    }

    /// Coefficient row `k`.
    pub fn coef_row(&self, k: usize) -> &[f64] {
        &self.coef[k * self.n_features..(k + 1) * self.n_features]
    }

    /// Raw scores (`decision_function`), row-major `n × rows`.
    pub fn decision_function(&self, x: &[f64], n: usize) -> Vec<f64> {
        let d = self.n_features;
        let rows = self.coef_rows();
        let mut out = vec![0.0; n * rows];
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            for k in 0..rows {
                out[i * rows + k] = self.intercept[k] + dot(self.coef_row(k), xi);
            }
        }
        out
    }

    /// Predicted classes as scikit-learn's `predict`: binary → class 1 iff score > 0;
    /// multinomial → first arg-max of the scores.
    pub fn predict(&self, x: &[f64], n: usize) -> Vec<usize> {
        let rows = self.coef_rows();
        let s = self.decision_function(x, n);
        (0..n)
            .map(|i| {
                let si = &s[i * rows..(i + 1) * rows];
                if rows == 1 {
                    usize::from(si[0] > 0.0)
                } else {
                    argmax(si)
                }
            })
            .collect()
    }

    /// Class probabilities, row-major `n × n_classes` (binary: `[1 − σ(s), σ(s)]`).
    pub fn predict_proba(&self, x: &[f64], n: usize) -> Vec<f64> {
        let rows = self.coef_rows();
        let k = self.n_classes;
        let s = self.decision_function(x, n);
        let mut out = vec![0.0; n * k];
        for i in 0..n {
            let si = &s[i * rows..(i + 1) * rows];
            let oi = &mut out[i * k..(i + 1) * k];
            if rows == 1 {
                let p = sigmoid(si[0]);
                oi[0] = 1.0 - p;
                oi[1] = p;
            } else {
                let lse = log_sum_exp(si);
                for (o, v) in oi.iter_mut().zip(si) {
                    *o = (v - lse).exp();
                }
            }
        }
        out
    }
}

/// Fit on the row-major `n × d` matrix `x` with labels in `0..n_classes` (every class must occur).
pub fn fit(
    x: &[f64],
    n: usize,
    d: usize,
    labels: &[usize],
    n_classes: usize,
    opts: &LogRegOptions,
) -> Result<LogReg, FitError> {
    Design::new(x, n, d)?.fit(labels, n_classes, opts)
}

/// A training matrix prepared for (repeated) fitting: its principal-component basis and reduced
/// features (see the module docs).
#[derive(Debug, Clone)]
pub struct Design {
    n: usize,
    d: usize,
    /// Reduced dimension r = min(n, d).
    r: usize,
    /// Reduced features Z = A Σ (X = A Σ Bᵀ, thin SVD), row-major n × r; column c has norm σ_c.
    z: Vec<f64>,
    /// Singular values σ_c.
    sigma: Vec<f64>,
    /// Right singular vectors B (orthonormal columns), row-major d × r.
    basis: Vec<f64>,
    /// Preconditioned data of the first fit, reused by later fits with the same class count
    /// and C (the permutation refits). Its content depends only on those, never on which fit
    /// came first, so results do not depend on the thread count.
    scaled: OnceLock<Scaled>,
}

/// The preconditioned problem data of a [`Design`] for one class count and λ (see the module
/// docs): scale_c = 1 / sqrt(γ σ_c² / n + λ) per reduced coordinate, sb = 1 / sqrt(γ) for the
/// intercepts, with γ = 1/4 (binary) or 1/K (multinomial).
#[derive(Debug, Clone)]
struct Scaled {
    rows: usize,
    lambda: f64,
    scale: Vec<f64>,
    sb: f64,
    /// λ scale_c².
    pen: Vec<f64>,
    /// 1/scale per optimisation variable (1/sb for the intercepts): ∂F/∂u = (∂F/∂v) / scale.
    unscale: Vec<f64>,
    /// Z·diag(scale) (n × r) and its transpose, packed.
    zs: Packed,
    zst: Packed,
}

impl Scaled {
    fn new(design: &Design, rows: usize, lambda: f64) -> Self {
        let (n, r) = (design.n, design.r);
        // The loss curvature at θ = 0 along weight coordinate c is γ σ_c² / n (γ = 1/4 binary,
        // 1/K on the class contrasts of the multinomial); the penalty adds λ.
        let gamma = if rows == 1 { 0.25 } else { 1.0 / rows as f64 };
        let scale: Vec<f64> = design
            .sigma
            .iter()
            .map(|s| 1.0 / (gamma * s * s / n as f64 + lambda).sqrt())
            .collect();
        let sb = 1.0 / gamma.sqrt();
        let mut zs = vec![0.0; n * r];
        let mut zst = vec![0.0; r * n];
        for i in 0..n {
            for c in 0..r {
                let v = design.z[i * r + c] * scale[c];
                zs[i * r + c] = v;
                zst[c * n + i] = v;
            }
        }
        let pen = scale.iter().map(|s| lambda * s * s).collect();
        let mut unscale = Vec::with_capacity(rows * r + rows);
        for s in &scale {
            unscale.extend(std::iter::repeat_n(1.0 / s, rows));
        }
        unscale.extend(std::iter::repeat_n(1.0 / sb, rows));
        Self {
            rows,
            lambda,
            scale,
            sb,
            pen,
            unscale,
            zs: Packed::new(&zs, n, r),
            zst: Packed::new(&zst, r, n),
        }
    }
}

/// A fit in the reduced coordinates of its [`Design`], for refits whose coefficients are not
/// needed (permutation tests): predictions come from test rows projected once with
/// [`Design::project`], so the d-dimensional coefficients are never formed.
#[derive(Debug, Clone, PartialEq)]
pub struct ReducedFit {
    rows: usize,
    r: usize,
    /// Reduced weights, row-major rows × r (W = U Bᵀ).
    u: Vec<f64>,
    pub intercept: Vec<f64>,
    /// L-BFGS iterations used.
    pub n_iter: usize,
    /// ‖∇F‖_∞ at the solution, in the reduced coordinates (see module docs).
    pub grad_norm: f64,
    /// Whether the gradient tolerance was reached.
    pub converged: bool,
}

impl ReducedFit {
    /// Predicted classes (as [`LogReg::predict`]) of rows given in reduced coordinates
    /// (row-major `m × r`, from [`Design::project`]).
    pub fn predict(&self, z: &[f64], m: usize) -> Vec<usize> {
        let (rows, r) = (self.rows, self.r);
        let mut s = vec![0.0; rows];
        (0..m)
            .map(|i| {
                let zi = &z[i * r..(i + 1) * r];
                for (k, sk) in s.iter_mut().enumerate() {
                    *sk = self.intercept[k] + dot(&self.u[k * r..(k + 1) * r], zi);
                }
                if rows == 1 {
                    usize::from(s[0] > 0.0)
                } else {
                    argmax(&s)
                }
            })
            .collect()
    }
}

impl Design {
    /// Prepare the row-major `n × d` matrix `x`.
    pub fn new(x: &[f64], n: usize, d: usize) -> Result<Self, FitError> {
        if x.len() != n * d || n == 0 || d == 0 {
            return Err(FitError::Shape { len: x.len(), n, d });
        }
        if let Some(row) = (0..n).find(|&i| x[i * d..(i + 1) * d].iter().any(|v| !v.is_finite())) {
            return Err(FitError::NonFinite { row });
        }
        let r = n.min(d);
        // M = X (d ≤ n) or M = X Q = Rᵀ with Xᵀ = Q R (d > n, so that the SVD is of an n × n
        // matrix); then M = A Σ Cᵀ, Z = A Σ and B = C (d ≤ n) or B = Q C.
        let (m, q) = if d > n {
            let qr = DMatrix::from_column_slice(d, n, x).qr();
            (qr.r().transpose(), Some(qr.q()))
        } else {
            (DMatrix::from_row_slice(n, d, x), None)
        };
        let svd = SVD::try_new_unordered(m, true, true, 5.0 * f64::EPSILON, 1000 * (r + 1))
            .ok_or(FitError::Svd { n, d })?;
        let (Some(a), Some(ct)) = (svd.u, svd.v_t) else {
            return Err(FitError::Svd { n, d });
        };
        let sigma: Vec<f64> = svd.singular_values.iter().copied().collect();
        let mut z = vec![0.0; n * r];
        for i in 0..n {
            for c in 0..r {
                z[i * r + c] = a[(i, c)] * sigma[c];
            }
        }
        let b = match q {
            Some(q) => q * ct.transpose(),
            None => ct.transpose(),
        };
        let mut basis = vec![0.0; d * r];
        for j in 0..d {
            for c in 0..r {
                basis[j * r + c] = b[(j, c)];
            }
        }
        Ok(Self {
            n,
            d,
            r,
            z,
            sigma,
            basis,
            scaled: OnceLock::new(),
        })
    }

    /// Number of rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduced coordinates `x B` of the row-major `m × d` rows `x` (row-major `m × r`), the
    /// input of [`ReducedFit::predict`].
    pub fn project(&self, x: &[f64], m: usize) -> Vec<f64> {
        let (d, r) = (self.d, self.r);
        let mut out = vec![0.0; m * r];
        for (xi, oi) in x.chunks_exact(d).take(m).zip(out.chunks_exact_mut(r)) {
            for (&v, bj) in xi.iter().zip(self.basis.chunks_exact(r)) {
                axpy(v, bj, oi);
            }
        }
        out
    }

    /// Fit with labels in `0..n_classes`; every class must occur.
    pub fn fit(
        &self,
        labels: &[usize],
        n_classes: usize,
        opts: &LogRegOptions,
    ) -> Result<LogReg, FitError> {
        let red = self.fit_reduced(labels, n_classes, opts)?;
        let (d, r, rows) = (self.d, self.r, red.rows);
        // W = U Bᵀ.
        let mut coef = vec![0.0; rows * d];
        for k in 0..rows {
            let uk = &red.u[k * r..(k + 1) * r];
            for (w, bj) in coef[k * d..(k + 1) * d]
                .iter_mut()
                .zip(self.basis.chunks_exact(r))
            {
                *w = dot(uk, bj);
            }
        }
        Ok(LogReg {
            n_classes,
            n_features: d,
            coef,
            intercept: red.intercept,
            n_iter: red.n_iter,
            grad_norm: red.grad_norm,
            converged: red.converged,
        })
    }

    /// As [`Design::fit`], but the weights stay in reduced coordinates.
    #[allow(clippy::expect_used)] // `get` right after a successful `set`
    pub fn fit_reduced(
        &self,
        labels: &[usize],
        n_classes: usize,
        opts: &LogRegOptions,
    ) -> Result<ReducedFit, FitError> {
        let n = self.n;
        if labels.len() != n {
            return Err(FitError::LabelCount {
                labels: labels.len(),
                n,
            });
        }
        if n_classes < 2 {
            return Err(FitError::TooFewClasses(n_classes));
        }
        if !(opts.c > 0.0 && opts.c.is_finite()) {
            return Err(FitError::BadC(opts.c));
        }
        let mut counts = vec![0usize; n_classes];
        for (row, &label) in labels.iter().enumerate() {
            if label >= n_classes {
                return Err(FitError::LabelOutOfRange {
                    row,
                    label,
                    k: n_classes,
                });
            }
            counts[label] += 1;
        }
        if let Some(k) = counts.iter().position(|&c| c == 0) {
            return Err(FitError::EmptyClass(k));
        }

        let rows = if n_classes == 2 { 1 } else { n_classes };
        let r = self.r;
        let lambda = 1.0 / (opts.c * n as f64);
        let built;
        let sc: &Scaled = match self.scaled.get() {
            Some(sc) if sc.rows == rows && sc.lambda == lambda => sc,
            Some(_) => {
                built = Scaled::new(self, rows, lambda);
                &built
            }
            None => match self.scaled.set(Scaled::new(self, rows, lambda)) {
                Ok(()) => self.scaled.get().expect("just set"),
                Err(sc) => {
                    built = sc;
                    &built
                }
            },
        };
        let (scale, sb) = (&sc.scale, sc.sb);
        let mut obj = Objective {
            zs: &sc.zs,
            zst: &sc.zst,
            labels,
            n,
            r,
            rows,
            pen: &sc.pen,
            sb,
            scores: vec![0.0; n * rows],
            res: vec![0.0; n * rows],
            ly: vec![0.0; n],
        };
        let theta0 = vec![0.0; rows * r + rows];
        let rep = solve(
            &mut obj,
            theta0,
            &sc.unscale,
            opts.memory.max(1),
            opts.gtol,
            opts.max_iter,
        );

        // θ = [V (r × rows, feature-major), β]; U[k][c] = scale_c V[c][k], b = sb β.
        let (v, beta) = rep.x.split_at(rows * r);
        let mut u = vec![0.0; rows * r];
        for c in 0..r {
            for k in 0..rows {
                u[k * r + c] = scale[c] * v[c * rows + k];
            }
        }
        let mut intercept: Vec<f64> = beta.iter().map(|b| sb * b).collect();
        if rows > 1 {
            let m = intercept.iter().sum::<f64>() / rows as f64;
            intercept.iter_mut().for_each(|v| *v -= m);
        }
        Ok(ReducedFit {
            rows,
            r,
            u,
            intercept,
            n_iter: rep.iters,
            grad_norm: rep.gnorm,
            converged: rep.converged,
        })
    }
}

/// The scaled objective in the preconditioned variables θ = [V (r × rows, feature-major),
/// β (rows)], with U[k][c] = scale_c V[c][k] and b = sb β.
struct Objective<'a> {
    /// Scaled features Zs = Z·diag(scale) (n × r) and their transpose (r × n), packed.
    zs: &'a Packed,
    zst: &'a Packed,
    labels: &'a [usize],
    n: usize,
    r: usize,
    rows: usize,
    /// λ scale_c² (the penalty in the new variables).
    pen: &'a [f64],
    sb: f64,
    scores: Vec<f64>,
    res: Vec<f64>,
    /// Shifted logit of the true class per row.
    ly: Vec<f64>,
}

impl Objective<'_> {
    #[inline(always)]
    fn eval(&mut self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let (n, r, k) = (self.n, self.r, self.rows);
        let (v, beta) = theta.split_at(r * k);
        let (gv, gb) = grad.split_at_mut(r * k);
        // Scores without intercept: Zs V (n × rows).
        self.zs.matmul(k, v, &mut self.scores);
        gb.iter_mut().for_each(|g| *g = 0.0);
        let mut loss = 0.0;
        if k == 1 {
            let b0 = self.sb * beta[0];
            for ((&s0, res), &y) in self.scores.iter().zip(&mut self.res).zip(self.labels) {
                let s = s0 + b0;
                let yf = if y == 1 { 1.0 } else { 0.0 };
                // log(1 + e^s) − y s and σ(s) − y, stably from one exponential.
                let e = exp_nonpos(-s.abs());
                let p = if s >= 0.0 {
                    1.0 / (1.0 + e)
                } else {
                    e / (1.0 + e)
                };
                loss += s.max(0.0) + e.ln_1p() - yf * s;
                *res = p - yf;
                gb[0] += *res;
            }
        } else {
            // Softmax with one exp per class: e_k = exp(l_k − max), p_k = e_k / Σ e. First the
            // shifted logits of all rows, then their exponentials in one vectorisable pass.
            // Specialised for k ≤ 8 (same operations in the same order as the general loop).
            loss = match k {
                3 => self.softmax_k::<3>(beta, gb),
                4 => self.softmax_k::<4>(beta, gb),
                5 => self.softmax_k::<5>(beta, gb),
                6 => self.softmax_k::<6>(beta, gb),
                7 => self.softmax_k::<7>(beta, gb),
                8 => self.softmax_k::<8>(beta, gb),
                _ => self.softmax_dyn(beta, gb),
            };
        }
        // Weight gradient: Zsᵀ R (r × rows).
        self.zst.matmul(k, &self.res, gv);
        let inv_n = 1.0 / n as f64;
        let mut pen = 0.0;
        for ((gc, vc), &pc) in gv.chunks_exact_mut(k).zip(v.chunks_exact(k)).zip(self.pen) {
            let mut sq = 0.0;
            for (g, w) in gc.iter_mut().zip(vc) {
                *g = *g * inv_n + pc * w;
                sq += w * w;
            }
            pen += pc * sq;
        }
        gb.iter_mut().for_each(|g| *g *= inv_n * self.sb);
        loss * inv_n + 0.5 * pen
    }
}

impl Objective<'_> {
    /// The multinomial part of [`Objective::eval`] for any k: residuals P − Y into `res`,
    /// intercept gradient sums into `gb` (zeroed by the caller), returns Σ_i −log p_{i,y_i}.
    #[inline(always)]
    fn softmax_dyn(&mut self, beta: &[f64], gb: &mut [f64]) -> f64 {
        let k = self.rows;
        let mut loss = 0.0;
        for (((si, ri), &y), ly) in self
            .scores
            .chunks_exact(k)
            .zip(self.res.chunks_exact_mut(k))
            .zip(self.labels)
            .zip(&mut self.ly)
        {
            let mut m = f64::NEG_INFINITY;
            for ((l, s), b) in ri.iter_mut().zip(si).zip(beta) {
                *l = s + self.sb * b;
                m = m.max(*l);
            }
            ri.iter_mut().for_each(|l| *l -= m);
            *ly = ri[y];
        }
        exp_nonpos_slice(&mut self.res);
        for ((ri, &y), &ly) in self.res.chunks_exact_mut(k).zip(self.labels).zip(&self.ly) {
            let sum: f64 = ri.iter().sum();
            loss += sum.ln() - ly;
            for (j, (l, g)) in ri.iter_mut().zip(gb.iter_mut()).enumerate() {
                *l = *l / sum - if j == y { 1.0 } else { 0.0 };
                *g += *l;
            }
        }
        loss
    }

    /// [`Objective::softmax_dyn`] for a fixed K: each row's logits are formed in registers
    /// and stored once (no reloading of just-stored scalars, which stalled store forwarding),
    /// the intercept gradient is accumulated in registers. Bit-identical to the general loop.
    #[inline(always)]
    fn softmax_k<const K: usize>(&mut self, beta: &[f64], gb: &mut [f64]) -> f64 {
        let mut sbb = [0.0f64; K];
        for (o, b) in sbb.iter_mut().zip(beta) {
            *o = self.sb * b;
        }
        for (((si, ri), &y), ly) in self
            .scores
            .chunks_exact(K)
            .zip(self.res.chunks_exact_mut(K))
            .zip(self.labels)
            .zip(&mut self.ly)
        {
            #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
            let si: &[f64; K] = si.try_into().expect("chunk of K");
            let mut l = [0.0f64; K];
            let mut m = f64::NEG_INFINITY;
            for q in 0..K {
                l[q] = si[q] + sbb[q];
                m = m.max(l[q]);
            }
            for v in l.iter_mut() {
                *v -= m;
            }
            *ly = l[y];
            ri.copy_from_slice(&l);
        }
        exp_nonpos_slice(&mut self.res);
        let mut loss = 0.0;
        let mut g = [0.0f64; K];
        for ((ri, &y), &ly) in self.res.chunks_exact_mut(K).zip(self.labels).zip(&self.ly) {
            #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
            let ri: &mut [f64; K] = ri.try_into().expect("chunk of K");
            // Σ e from −0.0 as `Iterator::sum` (the same sum: −0.0 + x = x).
            let mut sum = -0.0;
            for e in ri.iter() {
                sum += e;
            }
            loss += sum.ln() - ly;
            for q in 0..K {
                let v = ri[q] / sum - if q == y { 1.0 } else { 0.0 };
                ri[q] = v;
                g[q] += v;
            }
        }
        gb.copy_from_slice(&g);
        loss
    }
}

/// Number of rows of A per register block of [`Packed::matmul`].
const BLOCK: usize = 8;

/// A matrix A (m × p) packed for [`Packed::matmul`]: full blocks of [`BLOCK`] rows stored
/// column by column (the BLOCK entries of one column contiguous), then the remaining rows
/// row-major.
#[derive(Debug, Clone)]
struct Packed {
    m: usize,
    p: usize,
    data: Vec<f64>,
}

impl Packed {
    /// Pack the row-major `m × p` matrix `a`.
    fn new(a: &[f64], m: usize, p: usize) -> Self {
        let full = m / BLOCK * BLOCK;
        let mut data = Vec::with_capacity(m * p);
        for i0 in (0..full).step_by(BLOCK) {
            for c in 0..p {
                data.extend((0..BLOCK).map(|j| a[(i0 + j) * p + c]));
            }
        }
        data.extend_from_slice(&a[full * p..m * p]);
        Self { m, p, data }
    }

    /// `out = A B` for row-major B (p × k) and out (m × k), k small (the number of coefficient
    /// rows). Hand-written rather than a GEMM call because the matrices are tiny (a library
    /// call's packing would dominate) and the summation order must be fixed: every output is a
    /// single left-to-right sum over p. Specialised for k ≤ 8 so that the accumulators of a
    /// block of rows stay in registers.
    fn matmul(&self, k: usize, b: &[f64], out: &mut [f64]) {
        // Compiled with AVX where the CPU has it (out of line, so that its register allocation
        // does not depend on the caller). Same operations in the same order, no fused
        // multiply-adds: identical results.
        struct Body<'a> {
            a: &'a Packed,
            k: usize,
            b: &'a [f64],
            out: &'a mut [f64],
        }
        impl AvxBody for Body<'_> {
            type Output = ();
            #[inline(always)]
            fn run(self) {
                self.a.matmul_generic(self.k, self.b, self.out)
            }
        }
        with_avx(Body { a: self, k, b, out })
    }

    #[inline(always)]
    fn matmul_generic(&self, k: usize, b: &[f64], out: &mut [f64]) {
        match k {
            1 => self.matmul_k::<1>(b, out),
            2 => self.matmul_k::<2>(b, out),
            3 => self.matmul_k::<3>(b, out),
            4 => self.matmul_k::<4>(b, out),
            5 => self.matmul_k::<5>(b, out),
            6 => self.matmul_k::<6>(b, out),
            7 => self.matmul_k::<7>(b, out),
            8 => self.matmul_k::<8>(b, out),
            _ => {
                let (m, p) = (self.m, self.p);
                out[..m * k].iter_mut().for_each(|o| *o = 0.0);
                for i in 0..m {
                    let oi = &mut out[i * k..(i + 1) * k];
                    for (c, bl) in b.chunks_exact(k).take(p).enumerate() {
                        axpy(self.at(i, c), bl, oi);
                    }
                }
            }
        }
    }

    /// Entry (i, c) of A.
    fn at(&self, i: usize, c: usize) -> f64 {
        let full = self.m / BLOCK * BLOCK;
        if i < full {
            self.data[(i / BLOCK * self.p + c) * BLOCK + i % BLOCK]
        } else {
            self.data[full * self.p + (i - full) * self.p + c]
        }
    }

    #[inline(always)]
    fn matmul_k<const K: usize>(&self, b: &[f64], out: &mut [f64]) {
        let (m, p) = (self.m, self.p);
        let full = m / BLOCK * BLOCK;
        let b = &b[..p * K];
        let (panels, rest) = self.data.split_at(full * p);
        let (o_full, o_rest) = out[..m * K].split_at_mut(full * K);
        for (panel, ob) in panels
            .chunks_exact(BLOCK * p)
            .zip(o_full.chunks_exact_mut(BLOCK * K))
        {
            // BLOCK independent accumulator chains hide the addition latency.
            let mut acc = [[0.0f64; K]; BLOCK];
            for (xs, bl) in panel.chunks_exact(BLOCK).zip(b.chunks_exact(K)) {
                #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
                let xs: &[f64; BLOCK] = xs.try_into().expect("block");
                #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
                let bl: &[f64; K] = bl.try_into().expect("chunk of K");
                for j in 0..BLOCK {
                    for q in 0..K {
                        acc[j][q] += xs[j] * bl[q];
                    }
                }
            }
            for (o, a) in ob.chunks_exact_mut(K).zip(&acc) {
                o.copy_from_slice(a);
            }
        }
        for (ai, oi) in rest.chunks_exact(p).zip(o_rest.chunks_exact_mut(K)) {
            let mut acc = [0.0f64; K];
            for (x, bl) in ai.iter().zip(b.chunks_exact(K)) {
                #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
                let bl: &[f64; K] = bl.try_into().expect("chunk of K");
                for q in 0..K {
                    acc[q] += x * bl[q];
                }
            }
            oi.copy_from_slice(&acc);
        }
    }
}

struct LbfgsReport {
    x: Vec<f64>,
    iters: usize,
    gnorm: f64,
    converged: bool,
}

/// One evaluated point of the line search.
struct Point {
    alpha: f64,
    x: Vec<f64>,
    f: f64,
    g: Vec<f64>,
    dg: f64,
}

/// [`lbfgs`]; on x86-64 CPUs with AVX the same code (everything it calls is inlined) is compiled
/// with AVX enabled. Rust never contracts `a + b * c` into a fused multiply-add and the summation
/// orders are explicit, so both versions give bit-identical results.
fn solve(
    obj: &mut Objective<'_>,
    x0: Vec<f64>,
    unscale: &[f64],
    m: usize,
    gtol: f64,
    max_iter: usize,
) -> LbfgsReport {
    struct Body<'a, 'b> {
        obj: &'a mut Objective<'b>,
        x0: Vec<f64>,
        unscale: &'a [f64],
        m: usize,
        gtol: f64,
        max_iter: usize,
    }
    impl AvxBody for Body<'_, '_> {
        type Output = LbfgsReport;
        #[inline(always)]
        fn run(self) -> LbfgsReport {
            lbfgs(
                self.obj,
                self.x0,
                self.unscale,
                self.m,
                self.gtol,
                self.max_iter,
            )
        }
    }
    with_avx(Body {
        obj,
        x0,
        unscale,
        m,
        gtol,
        max_iter,
    })
}

/// L-BFGS from `x0`; stops when ‖g ⊙ unscale‖_∞ ≤ gtol · max(1, same at x0) (see module docs).
#[inline(always)]
fn lbfgs(
    obj: &mut Objective<'_>,
    x0: Vec<f64>,
    unscale: &[f64],
    m: usize,
    gtol: f64,
    max_iter: usize,
) -> LbfgsReport {
    let dim = x0.len();
    let gnorm = |g: &[f64]| {
        g.iter()
            .zip(unscale)
            .fold(0.0f64, |acc, (a, b)| acc.max((a * b).abs()))
    };
    let mut x = x0;
    let mut g = vec![0.0; dim];
    let mut f = obj.eval(&x, &mut g);
    let tol = gtol * gnorm(&g).max(1.0);
    // Correction pairs (s, y, 1/sᵀy, sᵀy, yᵀy), oldest first; `spare` recycles their buffers.
    #[allow(clippy::type_complexity)]
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64, f64, f64)> =
        std::collections::VecDeque::with_capacity(m);
    let mut spare: Option<(Vec<f64>, Vec<f64>)> = None;
    let mut pool: Vec<Point> = Vec::new();
    let mut alpha_buf = vec![0.0; m];
    let mut iters = 0;
    let mut dir = vec![0.0; dim];
    while iters < max_iter {
        if gnorm(&g) <= tol {
            break;
        }
        // Two-loop recursion: dir = −H g (γ = sᵀy / yᵀy of the newest pair was computed when
        // the pair was stored).
        dir.copy_from_slice(&g);
        let h = hist.len();
        for (j, (s, y, rho, _, _)) in hist.iter().enumerate().rev() {
            let a = rho * dot(s, &dir);
            alpha_buf[j] = a;
            axpy(-a, y, &mut dir);
        }
        let gamma = match hist.back() {
            Some(&(_, _, _, sy, yy)) => sy / yy,
            None => 1.0,
        };
        dir.iter_mut().for_each(|v| *v *= gamma);
        for (j, (s, y, rho, _, _)) in hist.iter().enumerate() {
            let beta = rho * dot(y, &dir);
            axpy(alpha_buf[j] - beta, s, &mut dir);
        }
        dir.iter_mut().for_each(|v| *v = -*v);
        let mut dg0 = dot(&g, &dir);
        if dg0.is_nan() || dg0 >= 0.0 || h == 0 {
            // First iteration (or a non-descent direction): steepest descent.
            hist.clear();
            for (dv, gv) in dir.iter_mut().zip(&g) {
                *dv = -gv;
            }
            dg0 = dot(&g, &dir);
        }
        // Trial step 1, also for steepest descent: in the preconditioned variables the Hessian
        // at θ = 0 is the identity (exactly so on the class contrasts for centred features), so
        // the first step is a Newton step.
        let alpha0 = 1.0;
        let step = line_search(obj, &x, f, dg0, &dir, alpha0, &mut pool);
        let Some(mut p) = step else {
            if hist.is_empty() {
                break; // even steepest descent cannot decrease F: machine precision
            }
            hist.clear();
            continue;
        };
        iters += 1;
        let (mut s, mut y) = spare
            .take()
            .unwrap_or_else(|| (vec![0.0; dim], vec![0.0; dim]));
        for (((sv, yv), (xn, xo)), (gn, go)) in s
            .iter_mut()
            .zip(y.iter_mut())
            .zip(p.x.iter().zip(&x))
            .zip(p.g.iter().zip(&g))
        {
            *sv = xn - xo;
            *yv = gn - go;
        }
        let sy = dot(&s, &y);
        let yy = dot(&y, &y);
        if sy > f64::EPSILON * yy && sy > 0.0 {
            if hist.len() == m {
                spare = hist.pop_front().map(|(s, y, ..)| (s, y));
            }
            hist.push_back((s, y, 1.0 / sy, sy, yy));
        } else {
            spare = Some((s, y));
        }
        std::mem::swap(&mut x, &mut p.x);
        std::mem::swap(&mut g, &mut p.g);
        f = p.f;
        pool.push(p);
    }
    let gn = gnorm(&g);
    LbfgsReport {
        x,
        iters,
        gnorm: gn,
        converged: gn <= tol,
    }
}

/// Evaluate x + α dir (buffers recycled from `pool`).
#[inline(always)]
fn eval_point(
    obj: &mut Objective<'_>,
    pool: &mut Vec<Point>,
    x: &[f64],
    dir: &[f64],
    alpha: f64,
) -> Point {
    let mut p = pool.pop().unwrap_or_else(|| origin(0.0, 0.0));
    p.x.resize(x.len(), 0.0);
    p.g.resize(x.len(), 0.0);
    for ((xn, a), d) in p.x.iter_mut().zip(x).zip(dir) {
        *xn = a + alpha * d;
    }
    p.f = obj.eval(&p.x, &mut p.g);
    p.dg = dot(&p.g, dir);
    p.alpha = alpha;
    p
}

/// The point α = 0 of a line search (its x and g are never used).
fn origin(f0: f64, dg0: f64) -> Point {
    Point {
        alpha: 0.0,
        x: Vec::new(),
        f: f0,
        g: Vec::new(),
        dg: dg0,
    }
}

/// Strong-Wolfe line search (Nocedal & Wright alg. 3.5 with the zoom of alg. 3.6). Returns the
/// accepted point, or a point with a sufficient decrease if the search stalls, or `None` when no
/// decrease is possible. Evaluated points are recycled through `pool`.
#[inline(always)]
fn line_search(
    obj: &mut Objective<'_>,
    x: &[f64],
    f0: f64,
    dg0: f64,
    dir: &[f64],
    alpha_init: f64,
    pool: &mut Vec<Point>,
) -> Option<Point> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const MAX_EVALS: usize = 60;
    let mut evals = 0;
    // Sufficient decrease. The objective is convex, so φ'(α) ≤ c1·φ'(0) implies the Armijo
    // condition (φ(α) ≤ φ(0) + α φ'(α)); using it keeps the search working once differences
    // of F are below its rounding error while its gradient is still informative.
    let armijo = |p: &Point| p.f <= f0 + C1 * p.alpha * dg0 || p.dg <= C1 * dg0;
    let curvature = |p: &Point| p.dg.abs() <= -C2 * dg0;

    let mut prev: Option<Point> = None; // α_{i−1} (None = α = 0)
    let mut alpha = alpha_init;
    let (mut lo, mut hi): (Option<Point>, Point);
    loop {
        let p = eval_point(obj, pool, x, dir, alpha);
        evals += 1;
        let prev_f = prev.as_ref().map_or(f0, |q| q.f);
        // (By convexity a point that is still descending, φ'(α) < 0, is lower than every
        // earlier one: a larger rounded F is then ignored.)
        if !p.f.is_finite() || !armijo(&p) || (prev.is_some() && p.f >= prev_f && p.dg >= 0.0) {
            lo = prev;
            hi = p;
            break;
        }
        if curvature(&p) {
            pool.extend(prev);
            return Some(p);
        }
        if p.dg >= 0.0 {
            hi = prev.unwrap_or_else(|| origin(f0, dg0));
            lo = Some(p);
            break;
        }
        if evals >= MAX_EVALS {
            pool.extend(prev);
            return Some(p);
        }
        alpha = p.alpha * 2.0;
        pool.extend(prev.replace(p));
    }
    // Zoom between lo (satisfies Armijo, lowest f so far; None = α 0) and hi.
    while evals < MAX_EVALS {
        let (a_lo, f_lo, dg_lo) = lo.as_ref().map_or((0.0, f0, dg0), |q| (q.alpha, q.f, q.dg));
        let (a_hi, f_hi, dg_hi) = (hi.alpha, hi.f, hi.dg);
        let width = (a_hi - a_lo).abs();
        if width <= 1e-15 * a_lo.abs().max(a_hi.abs()) || width == 0.0 {
            break;
        }
        let mut a = if f_hi.is_finite() {
            cubic_min(a_lo, f_lo, dg_lo, a_hi, f_hi, dg_hi)
        } else {
            f64::NAN
        };
        let (amin, amax) = (a_lo.min(a_hi), a_lo.max(a_hi));
        if !(a.is_finite() && a > amin + 0.1 * width && a < amax - 0.1 * width) {
            a = 0.5 * (a_lo + a_hi);
        }
        let p = eval_point(obj, pool, x, dir, a);
        evals += 1;
        if !p.f.is_finite() || !armijo(&p) || (p.f >= f_lo && p.dg * (a_hi - a_lo) >= 0.0) {
            pool.push(std::mem::replace(&mut hi, p));
        } else {
            if curvature(&p) {
                pool.extend(lo);
                pool.push(hi);
                return Some(p);
            }
            if p.dg * (a_hi - a_lo) >= 0.0 {
                let new_hi = lo.take().unwrap_or_else(|| origin(f0, dg0));
                pool.push(std::mem::replace(&mut hi, new_hi));
            }
            pool.extend(lo.replace(p));
        }
    }
    pool.push(hi);
    // Stalled: accept the best point with a strict decrease, if any.
    match lo {
        Some(q) if q.f < f0 => Some(q),
        other => {
            pool.extend(other);
            None
        }
    }
}

/// [`exp_nonpos`] of every element, in place (with AVX where available: identical results).
fn exp_nonpos_slice(v: &mut [f64]) {
    struct Body<'a>(&'a mut [f64]);
    impl AvxBody for Body<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            self.0.iter_mut().for_each(|x| *x = exp_nonpos(*x))
        }
    }
    with_avx(Body(v));
}

/// e^x for x ≤ 0 (NaN stays NaN; below −745 the result is that of −745, at most the smallest
/// subnormal), within a few ulp of `f64::exp` and exactly 1 at 0. Hand-written because it is the
/// hottest call of the objective and std's `exp` is an opaque libm call: this version uses only
/// adds, multiplies and bit operations, so the softmax pass over all rows vectorises (and gives
/// the same result on every x86-64 CPU). Method: x = k ln 2 + r with |r| ≤ ln 2 / 2 (Cody–Waite
/// split of ln 2 from fdlibm), e^r by its Taylor polynomial of degree 13 (truncation error
/// < 1e-17 relative), then two exact power-of-two scalings 2^k1 · 2^k2, k1 + k2 = k, so that
/// results in the subnormal range are rounded once.
#[inline(always)]
fn exp_nonpos(x: f64) -> f64 {
    // 1.5 · 2^52: adding it rounds to an integer.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    // fdlibm's ln2_hi (trailing zero bits, so kf · LN2_HI is exact) and ln2_lo.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const C: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let x = if x < -745.0 { -745.0 } else { x };
    let kf = (x * std::f64::consts::LOG2_E + MAGIC) - MAGIC;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    let mut p = C[13];
    for c in C[..13].iter().rev() {
        p = p * r + c;
    }
    // 2^j from the integer j (|j| < 1023) held in the low mantissa bits of j + MAGIC + 1023.
    let pow2 = |j: f64| f64::from_bits((j + (MAGIC + 1023.0)).to_bits() << 52);
    let k1 = (kf * 0.5 + MAGIC) - MAGIC;
    p * pow2(k1) * pow2(kf - k1)
}

/// Minimiser of the cubic interpolating f and f' at a and b.
fn cubic_min(a: f64, fa: f64, ga: f64, b: f64, fb: f64, gb: f64) -> f64 {
    let d1 = ga + gb - 3.0 * (fa - fb) / (a - b);
    let disc = d1 * d1 - ga * gb;
    if disc < 0.0 {
        return f64::NAN;
    }
    let d2 = (b - a).signum() * disc.sqrt();
    b - (b - a) * (gb + d2 - d1) / (gb - ga + 2.0 * d2)
}

/// Dot product with sixteen interleaved accumulators (element j goes to lane j mod 16; lanes
/// and the tail are then added in a fixed order, so results are reproducible). Several chains
/// instead of one let the additions pipeline.
#[inline(always)]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f64; 4]; 4];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for (q, lanes) in acc.iter_mut().enumerate() {
            #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
            let x: &[f64; 4] = x[4 * q..4 * q + 4].try_into().expect("4 lanes");
            #[allow(clippy::expect_used)] // an exact-size chunk: the conversion cannot fail
            let y: &[f64; 4] = y[4 * q..4 * q + 4].try_into().expect("4 lanes");
            for l in 0..4 {
                lanes[l] += x[l] * y[l];
            }
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let mut lanes = [0.0f64; 4];
    for l in 0..4 {
        lanes[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

#[inline(always)]
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

fn sigmoid(s: f64) -> f64 {
    if s >= 0.0 {
        1.0 / (1.0 + (-s).exp())
    } else {
        let e = s.exp();
        e / (1.0 + e)
    }
}

fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (k, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = k;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, d: usize, k: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<usize> = (0..n).map(|i| i % k).collect();
        let x = (0..n * d)
            .map(|idx| {
                let (i, j) = (idx / d, idx % d);
                let shift = if j % k == labels[i] { 1.0 } else { 0.0 };
                shift + rng.random_range(-1.0..1.0)
            })
            .collect();
        (x, labels)
    }

    /// Objective in the original coordinates (unscaled form × 1/n), computed independently.
    fn full_objective(m: &LogReg, x: &[f64], labels: &[usize], c: f64) -> f64 {
        let n = labels.len();
        let p = m.predict_proba(x, n);
        let k = m.n_classes;
        let loss: f64 = (0..n).map(|i| -p[i * k + labels[i]].ln()).sum();
        let pen: f64 = m.coef.iter().map(|w| w * w).sum();
        loss / n as f64 + pen / (2.0 * c * n as f64)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for (k, d) in [(2usize, 3usize), (3, 4)] {
            let n = 9;
            let (x, y) = data(n, d, k, 7);
            let rows = if k == 2 { 1 } else { k };
            let xt: Vec<f64> = (0..d * n).map(|t| x[(t % n) * d + t / n]).collect();
            let pen = vec![0.37; d];
            let (zs, zst) = (Packed::new(&x, n, d), Packed::new(&xt, d, n));
            let mut obj = Objective {
                zs: &zs,
                zst: &zst,
                labels: &y,
                n,
                r: d,
                rows,
                pen: &pen,
                sb: 1.3,
                scores: vec![0.0; n * rows],
                res: vec![0.0; n * rows],
                ly: vec![0.0; n],
            };
            let theta: Vec<f64> = (0..rows * d + rows)
                .map(|i| ((i * 5 % 7) as f64 - 3.0) * 0.2)
                .collect();
            let mut g = vec![0.0; theta.len()];
            obj.eval(&theta, &mut g);
            let mut scratch = vec![0.0; theta.len()];
            for j in 0..theta.len() {
                let h = 1e-6;
                let mut t = theta.clone();
                t[j] += h;
                let fa = obj.eval(&t, &mut scratch);
                t[j] -= 2.0 * h;
                let fb = obj.eval(&t, &mut scratch);
                let fd = (fa - fb) / (2.0 * h);
                assert!((fd - g[j]).abs() < 1e-7, "k={k} j={j}: fd {fd} vs {}", g[j]);
            }
        }
    }

    #[test]
    fn separable_two_class_is_perfect_and_stationary() {
        // Two features; class 1 has the larger first feature.
        let x2 = [-2.0, -1.0, -1.5, -0.5, 1.0, 2.0, 1.5, 0.7];
        let y = [0, 0, 1, 1];
        let m = fit(&x2, 4, 2, &y, 2, &LogRegOptions::default()).unwrap();
        assert_eq!(m.coef_rows(), 1);
        assert_eq!(m.predict(&x2, 4), y);
        assert!(m.converged, "grad {}", m.grad_norm);
        let p = m.predict_proba(&x2, 4);
        for i in 0..4 {
            assert!((p[2 * i] + p[2 * i + 1] - 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn solution_is_the_minimum_wide_and_narrow() {
        // d > n exercises the QR reduction, d < n the direct path.
        for (n, d, k) in [(12usize, 40usize, 3usize), (30, 5, 4), (10, 25, 2)] {
            let (x, y) = data(n, d, k, 11);
            let opts = LogRegOptions::default();
            let m = fit(&x, n, d, &y, k, &opts).unwrap();
            assert!(m.converged, "n={n} d={d}: grad {}", m.grad_norm);
            let f0 = full_objective(&m, &x, &y, 1.0);
            // Any perturbation of a coefficient or intercept increases the objective.
            for j in [0, d / 2, d - 1] {
                for s in [1e-4, -1e-4] {
                    let mut m2 = m.clone();
                    m2.coef[j] += s;
                    assert!(full_objective(&m2, &x, &y, 1.0) > f0);
                    let mut m3 = m.clone();
                    m3.intercept[0] += s;
                    assert!(full_objective(&m3, &x, &y, 1.0) > f0);
                }
            }
            // Stationarity in the original coordinates: W/C = −Σ residual x (unscaled form).
            let p = m.predict_proba(&x, n);
            let rows = m.coef_rows();
            for kk in 0..rows {
                let cls = if rows == 1 { 1 } else { kk };
                for j in 0..d {
                    let gsum: f64 = (0..n)
                        .map(|i| {
                            let t = if y[i] == cls { 1.0 } else { 0.0 };
                            (p[i * k + cls] - t) * x[i * d + j]
                        })
                        .sum();
                    let g = gsum + m.coef[kk * d + j];
                    assert!(g.abs() < 1e-7, "n={n} d={d} class {kk} feat {j}: {g}");
                }
            }
            if rows > 1 {
                assert!(m.intercept.iter().sum::<f64>().abs() < 1e-12);
            }
        }
    }

    #[test]
    fn deterministic_and_validates() {
        let (x, y) = data(20, 30, 4, 3);
        let a = fit(&x, 20, 30, &y, 4, &LogRegOptions::default()).unwrap();
        let b = fit(&x, 20, 30, &y, 4, &LogRegOptions::default()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            fit(&x, 20, 30, &y, 5, &LogRegOptions::default()),
            Err(FitError::EmptyClass(4))
        );
        assert_eq!(
            fit(&x, 20, 30, &y, 1, &LogRegOptions::default()),
            Err(FitError::TooFewClasses(1))
        );
        assert!(matches!(
            fit(&x[..10], 20, 30, &y, 4, &LogRegOptions::default()),
            Err(FitError::Shape { .. })
        ));
        let mut bad = x.clone();
        bad[65] = f64::INFINITY;
        assert_eq!(
            fit(&bad, 20, 30, &y, 4, &LogRegOptions::default()),
            Err(FitError::NonFinite { row: 2 })
        );
    }

    #[test]
    fn packed_matmul_matches_naive_product() {
        // Row counts around the block size, and class counts with and without specialisation.
        for (m, p) in [(1usize, 3usize), (7, 5), (8, 4), (13, 9), (24, 2)] {
            for k in [1usize, 3, 4, 8, 9] {
                let a: Vec<f64> = (0..m * p).map(|t| ((t * 7 % 11) as f64) - 5.0).collect();
                let b: Vec<f64> = (0..p * k).map(|t| ((t * 5 % 13) as f64) * 0.25).collect();
                let mut out = vec![f64::NAN; m * k];
                Packed::new(&a, m, p).matmul(k, &b, &mut out);
                for i in 0..m {
                    for q in 0..k {
                        let want: f64 = (0..p).map(|c| a[i * p + c] * b[c * k + q]).sum();
                        assert_eq!(out[i * k + q], want, "m={m} p={p} k={k} ({i},{q})");
                    }
                }
            }
        }
    }

    #[test]
    fn dot_matches_plain_sum() {
        for n in [0usize, 1, 5, 15, 16, 17, 40, 261] {
            let a: Vec<f64> = (0..n).map(|t| ((t * 3 % 7) as f64) - 3.0).collect();
            let b: Vec<f64> = (0..n).map(|t| ((t * 5 % 9) as f64) * 0.5).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), want, "n={n}"); // small integers and halves: exact
        }
    }

    #[test]
    fn reduced_fit_predicts_like_the_full_model() {
        for (n, d, k) in [(15usize, 40usize, 3usize), (12, 30, 2), (40, 6, 4)] {
            let (x, y) = data(n, d, k, 5);
            let (xt, _) = data(9, d, k, 6);
            let design = Design::new(&x, n, d).unwrap();
            let opts = LogRegOptions::default();
            let full = design.fit(&y, k, &opts).unwrap();
            let red = design.fit_reduced(&y, k, &opts).unwrap();
            assert_eq!(red.n_iter, full.n_iter);
            assert_eq!(red.intercept, full.intercept);
            let zt = design.project(&xt, 9);
            assert_eq!(
                red.predict(&zt, 9),
                full.predict(&xt, 9),
                "n={n} d={d} k={k}"
            );
            // Scores agree up to rounding.
            let s_full = full.decision_function(&xt, 9);
            let rows = full.coef_rows();
            let r = n.min(d);
            for i in 0..9 {
                for q in 0..rows {
                    let s = red.intercept[q] + dot(&red.u[q * r..(q + 1) * r], &zt[i * r..]);
                    assert!((s - s_full[i * rows + q]).abs() < 1e-9 * (1.0 + s.abs()));
                }
            }
        }
    }

    #[test]
    fn preconditioning_makes_random_label_fits_cheap() {
        // The permutation-test regime: standardised features (d > n) dominated by a few principal
        // components of very different sizes, random labels. Plain L-BFGS in the QR basis (the
        // previous solver) needed ~300 iterations here; the preconditioned one ~15.
        let (n, d, k, nf) = (40usize, 200usize, 4usize, 6usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let load: Vec<f64> = (0..nf * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut x = vec![0.0; n * d];
        for i in 0..n {
            let a: Vec<f64> = (0..nf)
                .map(|f| rng.random_range(-1.0..1.0) * 4f64.powi(f as i32))
                .collect();
            for j in 0..d {
                x[i * d + j] = (0..nf).map(|f| a[f] * load[f * d + j]).sum::<f64>()
                    + rng.random_range(-0.5..0.5);
            }
        }
        for j in 0..d {
            let m: f64 = (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64;
            let v: f64 = (0..n).map(|i| (x[i * d + j] - m).powi(2)).sum::<f64>() / n as f64;
            for i in 0..n {
                x[i * d + j] = (x[i * d + j] - m) / v.sqrt();
            }
        }
        let y: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
        let m = fit(&x, n, d, &y, k, &LogRegOptions::default()).unwrap();
        assert!(m.converged, "grad {}", m.grad_norm);
        assert!(m.n_iter <= 40, "{} iterations", m.n_iter);
    }

    #[test]
    fn specialised_softmax_is_bit_identical_to_the_general_loop() {
        for k in 3..=8 {
            let (n, d) = (37, 11);
            let (x, labels) = data(n, d, k, 40 + k as u64);
            let design = Design::new(&x, n, d).unwrap();
            let sc = Scaled::new(&design, k, 1.0 / n as f64);
            let make = || Objective {
                zs: &sc.zs,
                zst: &sc.zst,
                labels: &labels,
                n,
                r: design.r,
                rows: k,
                pen: &sc.pen,
                sb: sc.sb,
                scores: (0..n * k)
                    .map(|i| ((i * 7919) % 23) as f64 * 0.9 - 9.0)
                    .collect(),
                res: vec![0.0; n * k],
                ly: vec![0.0; n],
            };
            let beta: Vec<f64> = (0..k).map(|q| 0.3 * q as f64 - 0.7).collect();
            let (mut a, mut b) = (make(), make());
            let (mut ga, mut gb) = (vec![0.0; k], vec![0.0; k]);
            let la = a.softmax_dyn(&beta, &mut ga);
            let lb = match k {
                3 => b.softmax_k::<3>(&beta, &mut gb),
                4 => b.softmax_k::<4>(&beta, &mut gb),
                5 => b.softmax_k::<5>(&beta, &mut gb),
                6 => b.softmax_k::<6>(&beta, &mut gb),
                7 => b.softmax_k::<7>(&beta, &mut gb),
                _ => b.softmax_k::<8>(&beta, &mut gb),
            };
            assert_eq!(la.to_bits(), lb.to_bits(), "k={k}");
            assert!(la.is_finite() && la > 0.0);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ga), bits(&gb), "k={k}");
            assert_eq!(bits(&a.res), bits(&b.res), "k={k}");
            assert_eq!(bits(&a.ly), bits(&b.ly), "k={k}");
        }
    }

    #[test]
    fn exp_nonpos_is_within_a_few_ulp_of_std() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert!(exp_nonpos(f64::NAN).is_nan());
        assert_eq!(exp_nonpos(-1000.0), exp_nonpos(-745.0));
        assert!(exp_nonpos(-745.0) <= 5e-324);
        let mut worst = 0u64;
        let mut x = -744.9;
        while x <= 0.0 {
            for t in [x, x * 0.999_999_7, -(x * x) / 745.0] {
                let (a, b) = (exp_nonpos(t), t.exp());
                let ulps = a.to_bits().abs_diff(b.to_bits());
                worst = worst.max(ulps);
                assert!(ulps <= 2, "exp({t}): {a:e} vs {b:e}");
            }
            x += 0.013_7;
        }
        eprintln!("exp_nonpos: worst {worst} ulp");
    }
}
