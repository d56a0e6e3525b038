//! Cross-validated logistic regression (`logreg_5fold`), its permutation test and bootstrap CI.
//!
//! Definitions (normative; see also `docs/statistics.md`):
//! * **StandardScaler** as scikit-learn's (`sklearn/preprocessing/_data.py`, 1.9.1): mean and
//!   variance with ddof 0 (variance by the two-pass formula with the Chan–Golub–LeVeque
//!   correction term that `_incremental_mean_and_var` applies), `scale = sqrt(var)`, and a
//!   feature is treated as constant — scale 1 — when `var ≤ n·ε·var + (n·mean·ε)²`
//!   (`_is_constant_feature` + `_handle_zeros_in_scale`). It is fit on the training rows of each
//!   fold only and applied to that fold's test rows.
//! * **Classifier**: [`crate::logreg`] with C = 1 on the scaled features. Classes absent from a
//!   training fold are absent from that fold's model (as scikit-learn, whose `classes_` come from
//!   the training labels).
//! * **Folds**: [`stratified_kfold`] (our own seeded algorithm, documented there; it cannot
//!   reproduce numpy's RNG, so fidelity tests use the reference's folds), or a given assignment
//!   ([`read_folds_csv`]).
//! * **Metrics**: per-fold accuracy; `accuracy_mean` and `accuracy_std` (ddof 0) over folds;
//!   `macro_f1_oof` = unweighted mean over all classes of F1 = 2·TP / (2·TP + FP + FN) computed
//!   from the out-of-fold predictions of all prompts (0 when the denominator is 0, like
//!   scikit-learn's `zero_division` default); `confusion[t][p]` counts prompts of true class t
//!   predicted as p; `chance` = majority-class rate.
//! * **Skipped** (never an error): fewer than 2 classes, a class with fewer prompts than folds, a
//!   fold without test prompts, or a training fold with fewer than 2 classes.
//! * [`classifier_permutation_test`]: labels permuted uniformly (Fisher–Yates, `ChaCha8Rng`
//!   seeded with `seed`, stream = repetition index), the whole CV rerun with the same folds;
//!   statistic = mean fold accuracy; p = (1 + #{acc_perm ≥ acc_obs}) / (1 + reps). A permuted
//!   training fold with a single class predicts that class. Permuted refits stop at the relative
//!   gradient tolerance [`PERMUTATION_GTOL`] (1e-8) instead of 1e-10 and predict in the reduced
//!   coordinates of their fold ([`crate::logreg::Design::fit_reduced`]).
//! * [`accuracy_bootstrap_ci`]: resample the out-of-fold correctness vector with replacement
//!   (`ChaCha8Rng`, seed, stream = repetition), percentile 95 % interval (2.5 %, 97.5 %, linear
//!   interpolation between order statistics as numpy's default `percentile`).
//!
//! Repetitions run in parallel with rayon; each has its own RNG stream and every fit is
//! sequential and deterministic, so results do not depend on the number of threads.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::logreg::{Design, FitError, LogReg, LogRegOptions};

/// Errors of the cross-validation helpers (invalid shapes, unreadable fold files).
#[derive(Debug, thiserror::Error)]
pub enum CvError {
    #[error("cross-validation: data has {len} values, expected {n} rows x {d} columns")]
    Shape { len: usize, n: usize, d: usize },
    #[error("cross-validation: {what} has {got} entries, expected {n}")]
    Length {
        what: &'static str,
        got: usize,
        n: usize,
    },
    #[error("cross-validation: row {row} has label {label}, but there are only {k} label names")]
    Label { row: usize, label: usize, k: usize },
    #[error("cross-validation: row {row} is in fold {fold}, but there are only {n_folds} folds")]
    Fold {
        row: usize,
        fold: usize,
        n_folds: usize,
    },
    #[error("cross-validation: non-finite value in row {row}")]
    NonFinite { row: usize },
    #[error("cross-validation: need at least 2 folds, got {0}")]
    TooFewFolds(usize),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    FoldsFile {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    FoldsMissing { path: PathBuf, msg: String },
    #[error(transparent)]
    Fit(#[from] FitError),
    #[error("cross-validation: {0}")]
    FoldFit(String),
}

/// A result, or the documented reason it was not computed (serialises as `{"skipped": reason}`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum CvOutcome<T> {
    Done(T),
    Skipped {
        #[serde(rename = "skipped")]
        reason: String,
    },
}

impl<T> CvOutcome<T> {
    /// The result, if it was computed.
    pub fn done(&self) -> Option<&T> {
        match self {
            CvOutcome::Done(t) => Some(t),
            CvOutcome::Skipped { .. } => None,
        }
    }
}

/// scikit-learn's `StandardScaler` (see module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct StandardScaler {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub scale: Vec<f64>,
}

impl StandardScaler {
    /// Fit on the row-major `n × d` matrix (`n ≥ 1`).
    pub fn fit(x: &[f64], n: usize, d: usize) -> Self {
        let nf = n as f64;
        let mut mean = vec![0.0; d];
        for row in x.chunks_exact(d).take(n) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= nf);
        let mut ssq = vec![0.0; d];
        let mut corr = vec![0.0; d];
        for row in x.chunks_exact(d).take(n) {
            for j in 0..d {
                let t = row[j] - mean[j];
                corr[j] += t;
                ssq[j] += t * t;
            }
        }
        let var: Vec<f64> = (0..d)
            .map(|j| (ssq[j] - corr[j] * corr[j] / nf) / nf)
            .collect();
        let eps = f64::EPSILON;
        let scale = (0..d)
            .map(|j| {
                let upper = nf * eps * var[j] + (nf * mean[j] * eps).powi(2);
                if var[j] <= upper {
                    1.0
                } else {
                    var[j].sqrt()
                }
            })
            .collect();
        Self { mean, var, scale }
    }

    /// `(x − mean) / scale`, row-major like the input.
    pub fn transform(&self, x: &[f64]) -> Vec<f64> {
        let d = self.mean.len();
        let mut out = x.to_vec();
        for row in out.chunks_exact_mut(d) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.scale) {
                *v = (*v - m) / s;
            }
        }
        out
    }
}

/// Stratified K-fold assignment with shuffling, our own algorithm: with one `ChaCha8Rng` seeded
/// by `seed`, the members of each class (classes in increasing label order, members in increasing
/// row order) are shuffled (Fisher–Yates, `SliceRandom::shuffle`); the shuffled class lists are
/// concatenated in class order and the t-th prompt of that sequence goes to fold `t mod n_folds`.
/// Each class is thus spread round-robin, continuing where the previous class stopped, so per-class
/// and total fold sizes differ by at most one. Returns the fold of every row.
pub fn stratified_kfold(labels: &[usize], n_folds: usize, seed: u64) -> Vec<usize> {
    let n_folds = n_folds.max(1);
    let k = labels.iter().map(|&l| l + 1).max().unwrap_or(0);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut folds = vec![0; labels.len()];
    let mut t = 0usize;
    for c in 0..k {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        members.shuffle(&mut rng);
        for i in members {
            folds[i] = t % n_folds;
            t += 1;
        }
    }
    folds
}

/// Read a fold assignment CSV (`prompt_id,fold`, optional header line `prompt_id,fold`, blank lines
/// ignored) for the given prompts. Returns `(fold per prompt, number of folds = max fold + 1)`.
/// Unknown or duplicate prompt ids, malformed lines and prompts without a fold are errors naming
/// the file (and line).
pub fn read_folds_csv(path: &Path, prompt_ids: &[String]) -> Result<(Vec<usize>, usize), CvError> {
    let text = std::fs::read_to_string(path).map_err(|source| CvError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let index: std::collections::HashMap<&str, usize> = prompt_ids
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let mut folds: Vec<Option<usize>> = vec![None; prompt_ids.len()];
    let err = |line: usize, msg: String| CvError::FoldsFile {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut seen_data = false;
    for (lineno, raw) in text.lines().enumerate() {
        let line_no = lineno + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(',');
        let (Some(id), Some(fold), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err(
                line_no,
                format!("expected `prompt_id,fold`, got `{line}`"),
            ));
        };
        let (id, fold) = (id.trim().trim_matches('"'), fold.trim().trim_matches('"'));
        if !seen_data && id == "prompt_id" && fold == "fold" {
            seen_data = true;
            continue;
        }
        seen_data = true;
        let fold: usize = fold.parse().map_err(|_| {
            err(
                line_no,
                format!("fold `{fold}` is not a non-negative integer"),
            )
        })?;
        let Some(&i) = index.get(id) else {
            return Err(err(line_no, format!("unknown prompt id `{id}`")));
        };
        if folds[i].is_some() {
            return Err(err(line_no, format!("duplicate prompt id `{id}`")));
        }
        folds[i] = Some(fold);
    }
    let mut out = Vec::with_capacity(folds.len());
    for (i, f) in folds.into_iter().enumerate() {
        match f {
            Some(f) => out.push(f),
            None => {
                return Err(CvError::FoldsMissing {
                    path: path.to_path_buf(),
                    msg: format!("no fold for prompt `{}`", prompt_ids[i]),
                })
            }
        }
    }
    let n_folds = out.iter().max().map_or(0, |m| m + 1);
    Ok((out, n_folds))
}

/// One fold's fitted model (for fixtures): `coef` rows as [`LogReg::coef`] (one row for a binary
/// fold), in the scaled feature space; `classes` are the label indices the model knows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FoldModel {
    pub classes: Vec<usize>,
    pub coef: Vec<Vec<f64>>,
    pub intercept: Vec<f64>,
    pub n_iter: usize,
    pub converged: bool,
    /// Class probabilities of the fold's test rows, row-major `n_test × classes.len()` (columns
    /// in `classes` order; not serialised).
    #[serde(skip)]
    pub test_proba: Vec<f64>,
}

/// `logreg_5fold` of results.json (fields after `chance` are not serialised).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogRegCvResult {
    pub fold_accuracies: Vec<f64>,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub macro_f1_oof: f64,
    pub confusion: Vec<Vec<u64>>,
    pub labels: Vec<String>,
    pub chance: f64,
    #[serde(skip)]
    pub fold_coefs: Vec<FoldModel>,
    /// Out-of-fold predicted label per row.
    #[serde(skip)]
    pub oof_predictions: Vec<usize>,
    /// Out-of-fold correctness per row (input of [`accuracy_bootstrap_ci`]).
    #[serde(skip)]
    pub correct: Vec<bool>,
    /// Out-of-fold class probabilities, row-major `n × labels.len()` (a class absent from a
    /// fold's training rows has probability 0 for that fold's test rows).
    #[serde(skip)]
    pub oof_proba: Vec<f64>,
}

/// One fold of [`PreparedFolds::run`]: predicted labels of its test rows and, if kept, its model;
/// or the reason the cross-validation cannot be run.
type FoldOutcome = Result<(Vec<usize>, Option<FoldModel>), String>;

/// Folds with their scaled train/test matrices, prepared once and refit with any labels.
struct PreparedFolds {
    n_folds: usize,
    train: Vec<Vec<usize>>,
    test: Vec<Vec<usize>>,
    folds: Vec<FoldData>,
}

impl PreparedFolds {
    fn new(x: &[f64], d: usize, folds: &[usize], n_folds: usize) -> Result<Self, CvError> {
        let (train, test) = fold_rows(folds, n_folds);
        // Folds are prepared in parallel (each independently, so the result does not depend on
        // the thread count).
        let prepared: Vec<Result<FoldData, FitError>> = (0..n_folds)
            .into_par_iter()
            .map(|f| FoldData::new(x, d, &train[f], &test[f]))
            .collect();
        Self::assemble(n_folds, train, test, prepared)
    }

    /// The prepared folds from their parts (the first preparation error, in fold order).
    fn assemble(
        n_folds: usize,
        train: Vec<Vec<usize>>,
        test: Vec<Vec<usize>>,
        prepared: Vec<Result<FoldData, FitError>>,
    ) -> Result<Self, CvError> {
        Ok(Self {
            n_folds,
            train,
            test,
            folds: prepared.into_iter().collect::<Result<_, _>>()?,
        })
    }

    /// Out-of-fold predictions and fold models; `Err(reason)` when a training fold has < 2
    /// classes and `constant_fallback` is false. With `reduced` (permuted refits) the models stay
    /// in reduced coordinates and predict the projected test rows (the same scores up to
    /// rounding; no fold models are kept then). Folds are fitted in parallel; each fit is
    /// sequential and the results are combined in fold order, so nothing depends on the thread
    /// count.
    fn run(
        &self,
        labels: &[usize],
        opts: &LogRegOptions,
        constant_fallback: bool,
        keep_models: bool,
        reduced: bool,
    ) -> Result<(Vec<usize>, Vec<FoldModel>), String> {
        let per_fold: Vec<FoldOutcome> = (0..self.n_folds)
            .into_par_iter()
            .map(|f| self.run_fold(f, labels, opts, constant_fallback, keep_models, reduced))
            .collect();
        let mut pred = vec![0usize; labels.len()];
        let mut models = Vec::new();
        for (f, out) in per_fold.into_iter().enumerate() {
            let (p, model) = out?;
            for (&i, &pl) in self.test[f].iter().zip(&p) {
                pred[i] = pl;
            }
            models.extend(model);
        }
        Ok((pred, models))
    }

    /// Fold `f` of [`PreparedFolds::run`]: predicted labels of its test rows, and its model if
    /// `keep_models`.
    fn run_fold(
        &self,
        f: usize,
        labels: &[usize],
        opts: &LogRegOptions,
        constant_fallback: bool,
        keep_models: bool,
        reduced: bool,
    ) -> FoldOutcome {
        let (classes, yloc) = training_classes(labels, &self.train[f]);
        let n_test = self.test[f].len();
        if classes.len() < 2 {
            if !constant_fallback {
                return Err(format!("training set of fold {f} has fewer than 2 classes"));
            }
            let c = classes.first().copied().unwrap_or(0);
            return Ok((vec![c; n_test], None));
        }
        let fold = &self.folds[f];
        if reduced && !keep_models {
            return Ok((
                fold.predict_reduced(f, &classes, &yloc, n_test, opts)?,
                None,
            ));
        }
        let model: LogReg = fold
            .design
            .fit(&yloc, classes.len(), opts)
            .map_err(|e| format!("fold {f}: {e}"))?;
        let p = model.predict(&fold.xte, n_test);
        let pred = p.iter().map(|&pl| classes[pl]).collect();
        let kept = keep_models.then(|| FoldModel {
            test_proba: model.predict_proba(&fold.xte, n_test),
            coef: (0..model.coef_rows())
                .map(|k| model.coef_row(k).to_vec())
                .collect(),
            intercept: model.intercept.clone(),
            n_iter: model.n_iter,
            converged: model.converged,
            classes,
        });
        Ok((pred, kept))
    }

    fn fold_accuracies(&self, labels: &[usize], pred: &[usize]) -> Vec<f64> {
        self.test
            .iter()
            .map(|t| {
                let ok = t.iter().filter(|&&i| pred[i] == labels[i]).count();
                ok as f64 / t.len() as f64
            })
            .collect()
    }
}

/// Training and test rows of every fold (in increasing row order).
fn fold_rows(folds: &[usize], n_folds: usize) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let mut train = vec![Vec::new(); n_folds];
    let mut test = vec![Vec::new(); n_folds];
    for (i, &f) in folds.iter().enumerate() {
        for (g, tr) in train.iter_mut().enumerate() {
            if g != f {
                tr.push(i);
            }
        }
        test[f].push(i);
    }
    (train, test)
}

/// One fold prepared for fitting: the design of its scaled training rows, its scaled test rows
/// and their reduced coordinates.
struct FoldData {
    design: Design,
    xte: Vec<f64>,
    zte: Vec<f64>,
}

impl FoldData {
    fn new(x: &[f64], d: usize, train: &[usize], test: &[usize]) -> Result<Self, FitError> {
        let xtr = gather(x, d, train);
        let scaler = StandardScaler::fit(&xtr, train.len(), d);
        let xte = scaler.transform(&gather(x, d, test));
        Self::from_features(&scaler.transform(&xtr), train.len(), xte, test.len(), d)
    }

    /// A fold from its final (already standardised) training and test rows, `d` columns each.
    fn from_features(
        xtr: &[f64],
        n_train: usize,
        xte: Vec<f64>,
        n_test: usize,
        d: usize,
    ) -> Result<Self, FitError> {
        let design = Design::new(xtr, n_train, d)?;
        let zte = design.project(&xte, n_test);
        Ok(Self { design, xte, zte })
    }

    /// Number of correctly predicted test rows of a permuted refit (labels `perm`), in reduced
    /// coordinates; a training set with one class predicts that class (the hits of
    /// [`PreparedFolds::run_fold`] with `constant_fallback` and `reduced`).
    fn permuted_hits(
        &self,
        f: usize,
        train: &[usize],
        test: &[usize],
        perm: &[usize],
        opts: &LogRegOptions,
    ) -> Result<usize, String> {
        let (classes, yloc) = training_classes(perm, train);
        let hits = |pred: &mut dyn Iterator<Item = usize>| {
            test.iter()
                .zip(pred)
                .filter(|&(&i, p)| perm[i] == p)
                .count()
        };
        if classes.len() < 2 {
            let c = classes.first().copied().unwrap_or(0);
            return Ok(hits(&mut std::iter::repeat(c)));
        }
        let pred = self.predict_reduced(f, &classes, &yloc, test.len(), opts)?;
        Ok(hits(&mut pred.into_iter()))
    }

    /// Predicted labels (from `classes`) of the `n_test` test rows of a fit to `yloc` (training
    /// labels as indices into `classes`, at least two) in reduced coordinates.
    fn predict_reduced(
        &self,
        f: usize,
        classes: &[usize],
        yloc: &[usize],
        n_test: usize,
        opts: &LogRegOptions,
    ) -> Result<Vec<usize>, String> {
        let model = self
            .design
            .fit_reduced(yloc, classes.len(), opts)
            .map_err(|e| format!("fold {f}: {e}"))?;
        let p = model.predict(&self.zte, n_test);
        Ok(p.iter().map(|&pl| classes[pl]).collect())
    }
}

/// The classes among the training labels `labels[train]` (sorted) and those labels as indices
/// into them.
fn training_classes(labels: &[usize], train: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let ytr: Vec<usize> = train.iter().map(|&i| labels[i]).collect();
    let mut classes = ytr.clone();
    classes.sort_unstable();
    classes.dedup();
    let mut remap = vec![usize::MAX; classes.last().map_or(0, |m| m + 1)];
    for (j, &c) in classes.iter().enumerate() {
        remap[c] = j;
    }
    let yloc = ytr.iter().map(|&c| remap[c]).collect();
    (classes, yloc)
}

fn gather(x: &[f64], d: usize, rows: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &i in rows {
        out.extend_from_slice(&x[i * d..(i + 1) * d]);
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Validate inputs; returns `Ok(Some(reason))` when the CV must be skipped.
fn check_inputs(
    x: &[f64],
    n: usize,
    d: usize,
    labels: &[usize],
    n_classes: usize,
    folds: &[usize],
    n_folds: usize,
) -> Result<Option<String>, CvError> {
    if x.len() != n * d || d == 0 {
        return Err(CvError::Shape { len: x.len(), n, d });
    }
    if labels.len() != n {
        return Err(CvError::Length {
            what: "labels",
            got: labels.len(),
            n,
        });
    }
    if folds.len() != n {
        return Err(CvError::Length {
            what: "folds",
            got: folds.len(),
            n,
        });
    }
    if n_folds < 2 {
        return Err(CvError::TooFewFolds(n_folds));
    }
    for (row, &label) in labels.iter().enumerate() {
        if label >= n_classes {
            return Err(CvError::Label {
                row,
                label,
                k: n_classes,
            });
        }
    }
    for (row, &fold) in folds.iter().enumerate() {
        if fold >= n_folds {
            return Err(CvError::Fold { row, fold, n_folds });
        }
    }
    if let Some(row) = (0..n).find(|&i| x[i * d..(i + 1) * d].iter().any(|v| !v.is_finite())) {
        return Err(CvError::NonFinite { row });
    }
    check_labels_folds(labels, n_classes, folds, n_folds)
}

/// The label and fold checks of [`check_inputs`]; `Ok(Some(reason))` when the CV must be skipped.
fn check_labels_folds(
    labels: &[usize],
    n_classes: usize,
    folds: &[usize],
    n_folds: usize,
) -> Result<Option<String>, CvError> {
    let mut counts = vec![0usize; n_classes];
    labels.iter().for_each(|&l| counts[l] += 1);
    let present = counts.iter().filter(|&&c| c > 0).count();
    if present < 2 {
        return Ok(Some(format!(
            "logistic regression needs at least 2 categories, got {present}"
        )));
    }
    if let Some(c) = (0..n_classes).find(|&c| counts[c] < n_folds) {
        return Ok(Some(format!(
            "category {c} has {} prompts, fewer than the {n_folds} folds",
            counts[c]
        )));
    }
    let mut fold_sizes = vec![0usize; n_folds];
    folds.iter().for_each(|&f| fold_sizes[f] += 1);
    if let Some(f) = fold_sizes.iter().position(|&s| s == 0) {
        return Ok(Some(format!("fold {f} has no prompts")));
    }
    Ok(None)
}

/// Cross-validated logistic regression on the row-major `n × d` matrix `x` (see module docs).
/// `labels` index `label_names`; `folds` are in `0..n_folds`.
#[allow(clippy::too_many_arguments)]
pub fn logreg_cv(
    x: &[f64],
    n: usize,
    d: usize,
    labels: &[usize],
    label_names: &[String],
    folds: &[usize],
    n_folds: usize,
) -> Result<CvOutcome<LogRegCvResult>, CvError> {
    let k = label_names.len();
    if let Some(reason) = check_inputs(x, n, d, labels, k, folds, n_folds)? {
        return Ok(CvOutcome::Skipped { reason });
    }
    let prep = PreparedFolds::new(x, d, folds, n_folds)?;
    Ok(fit_cv(&prep, labels, label_names))
}

/// [`logreg_cv`] and [`classifier_permutation_test`] on the same folds: the folds are prepared
/// and the observed labels fitted once, and the permutation test's observed statistic is the
/// CV's `accuracy_mean` (the same fits, so the same number).
#[allow(clippy::too_many_arguments)]
pub fn logreg_cv_with_permutation(
    x: &[f64],
    n: usize,
    d: usize,
    labels: &[usize],
    label_names: &[String],
    folds: &[usize],
    n_folds: usize,
    reps: usize,
    seed: u64,
) -> Result<(CvOutcome<LogRegCvResult>, CvOutcome<ClassifierPermutation>), CvError> {
    fn skipped<T>(reason: &str) -> CvOutcome<T> {
        CvOutcome::Skipped {
            reason: reason.to_string(),
        }
    }
    if let Some(reason) = check_inputs(x, n, d, labels, label_names.len(), folds, n_folds)? {
        return Ok((skipped(&reason), skipped(&reason)));
    }
    if reps == 0 {
        let prep = PreparedFolds::new(x, d, folds, n_folds)?;
        let cv = fit_cv(&prep, labels, label_names);
        let perm = match &cv {
            CvOutcome::Done(_) => skipped("0 repetitions requested"),
            CvOutcome::Skipped { reason } => skipped(reason),
        };
        return Ok((cv, perm));
    }
    // Each fold is prepared and its permuted refits are started in the same parallel task, so
    // the refits of a prepared fold keep every thread busy while slower preparations finish
    // (five folds on two threads would otherwise leave one idle). Every refit is sequential
    // and the hit counts are combined in (repetition, fold) order afterwards, so nothing
    // depends on the thread count; the numbers are those of `permutation_null`.
    let (train, test) = fold_rows(folds, n_folds);
    let perms = permuted_labels(labels, reps, seed);
    let perm_opts = permutation_options();
    type FoldWork = Result<(FoldData, Vec<Result<usize, String>>), FitError>;
    let work: Vec<FoldWork> = (0..n_folds)
        .into_par_iter()
        .map(|f| {
            let fd = FoldData::new(x, d, &train[f], &test[f])?;
            let hits = perms
                .par_iter()
                .map(|p| fd.permuted_hits(f, &train[f], &test[f], p, &perm_opts))
                .collect();
            Ok((fd, hits))
        })
        .collect();
    let mut prepared = Vec::with_capacity(n_folds);
    let mut hits = Vec::with_capacity(n_folds);
    for w in work {
        match w {
            Ok((fd, h)) => {
                prepared.push(Ok(fd));
                hits.push(h);
            }
            Err(e) => prepared.push(Err(e)),
        }
    }
    let prep = PreparedFolds::assemble(n_folds, train, test, prepared)?;
    let cv = fit_cv(&prep, labels, label_names);
    let perm = match &cv {
        CvOutcome::Done(r) => {
            let null = (0..reps)
                .map(|rep| {
                    let acc = hits
                        .iter()
                        .zip(&prep.test)
                        .map(|(h, t)| {
                            let ok = h[rep].clone()?;
                            Ok(ok as f64 / t.len() as f64)
                        })
                        .collect::<Result<Vec<f64>, String>>()?;
                    Ok(mean(&acc))
                })
                .collect::<Result<Vec<f64>, String>>()
                .map_err(CvError::FoldFit)?;
            CvOutcome::Done(summarise_null(r.accuracy_mean, &null, reps, seed))
        }
        CvOutcome::Skipped { reason } => skipped(reason),
    };
    Ok((cv, perm))
}

/// Features of one fold for [`logreg_cv_fold_features`]: the training rows (row-major
/// `n_train × d`), the test rows (`n_test × d`) and `d`, already in their final form (no
/// scaler is applied).
pub type FoldFeatures = (Vec<f64>, Vec<f64>, usize);

/// [`logreg_cv`] on features built per fold by `features(fold, train rows, test rows)` (rows in
/// increasing order) instead of one standardised matrix: the same folds, solver, fits and
/// metrics. Used by the lexical baseline, whose folds are standardised and embedded without
/// forming the dense bag-of-tokens matrix (`crate::lexical`).
pub fn logreg_cv_fold_features<F>(
    n: usize,
    labels: &[usize],
    label_names: &[String],
    folds: &[usize],
    n_folds: usize,
    features: F,
) -> Result<CvOutcome<LogRegCvResult>, CvError>
where
    F: Fn(usize, &[usize], &[usize]) -> Result<FoldFeatures, CvError> + Sync,
{
    if labels.len() != n {
        return Err(CvError::Length {
            what: "labels",
            got: labels.len(),
            n,
        });
    }
    if folds.len() != n {
        return Err(CvError::Length {
            what: "folds",
            got: folds.len(),
            n,
        });
    }
    if n_folds < 2 {
        return Err(CvError::TooFewFolds(n_folds));
    }
    let k = label_names.len();
    for (row, &label) in labels.iter().enumerate() {
        if label >= k {
            return Err(CvError::Label { row, label, k });
        }
    }
    for (row, &fold) in folds.iter().enumerate() {
        if fold >= n_folds {
            return Err(CvError::Fold { row, fold, n_folds });
        }
    }
    if let Some(reason) = check_labels_folds(labels, k, folds, n_folds)? {
        return Ok(CvOutcome::Skipped { reason });
    }
    let (train, test) = fold_rows(folds, n_folds);
    let prepared: Vec<Result<Result<FoldData, FitError>, CvError>> = (0..n_folds)
        .into_par_iter()
        .map(|f| {
            let (xtr, xte, d) = features(f, &train[f], &test[f])?;
            let (ntr, nte) = (train[f].len(), test[f].len());
            if xtr.len() != ntr * d || xte.len() != nte * d {
                return Err(CvError::Shape {
                    len: xtr.len() + xte.len(),
                    n: ntr + nte,
                    d,
                });
            }
            Ok(FoldData::from_features(&xtr, ntr, xte, nte, d))
        })
        .collect();
    let prepared = prepared.into_iter().collect::<Result<Vec<_>, CvError>>()?;
    let prep = PreparedFolds::assemble(n_folds, train, test, prepared)?;
    Ok(fit_cv(&prep, labels, label_names))
}

/// The cross-validated fit of [`logreg_cv`] on prepared folds.
fn fit_cv(
    prep: &PreparedFolds,
    labels: &[usize],
    label_names: &[String],
) -> CvOutcome<LogRegCvResult> {
    let (n, k) = (labels.len(), label_names.len());
    let (pred, models) = match prep.run(labels, &LogRegOptions::default(), false, true, false) {
        Ok(r) => r,
        Err(reason) => return CvOutcome::Skipped { reason },
    };
    let fold_accuracies = prep.fold_accuracies(labels, &pred);
    let accuracy_mean = mean(&fold_accuracies);
    let accuracy_std = (fold_accuracies
        .iter()
        .map(|a| (a - accuracy_mean).powi(2))
        .sum::<f64>()
        / fold_accuracies.len() as f64)
        .sqrt();
    let mut confusion = vec![vec![0u64; k]; k];
    for i in 0..n {
        confusion[labels[i]][pred[i]] += 1;
    }
    let macro_f1_oof = macro_f1(&confusion);
    let counts: Vec<u64> = confusion.iter().map(|r| r.iter().sum()).collect();
    let chance = *counts.iter().max().unwrap_or(&0) as f64 / n as f64;
    let correct = (0..n).map(|i| pred[i] == labels[i]).collect();
    // Every fold has a model here (no constant fallback): models[f] is fold f's.
    let mut oof_proba = vec![0.0; n * k];
    for (f, m) in models.iter().enumerate() {
        let c = m.classes.len();
        for (t, &row) in prep
            .test
            .get(f)
            .map_or(&[][..], |v| &v[..])
            .iter()
            .enumerate()
        {
            for (ci, &class) in m.classes.iter().enumerate() {
                if let (Some(&p), true) = (m.test_proba.get(t * c + ci), class < k) {
                    oof_proba[row * k + class] = p;
                }
            }
        }
    }
    CvOutcome::Done(LogRegCvResult {
        fold_accuracies,
        accuracy_mean,
        accuracy_std,
        macro_f1_oof,
        confusion,
        labels: label_names.to_vec(),
        chance,
        fold_coefs: models,
        oof_predictions: pred,
        correct,
        oof_proba,
    })
}

/// Macro-averaged F1 over all classes of a confusion matrix (rows true, cols predicted), with
/// scikit-learn's formula F1 = 2·TP / (true + predicted) and 0 for an empty denominator. Classes
/// that occur neither as truth nor as prediction are left out, as scikit-learn's default `labels`.
pub fn macro_f1(confusion: &[Vec<u64>]) -> f64 {
    let k = confusion.len();
    let mut f1s = Vec::with_capacity(k);
    for c in 0..k {
        let tp = confusion[c][c] as f64;
        let true_sum: u64 = confusion[c].iter().sum();
        let pred_sum: u64 = confusion.iter().map(|r| r[c]).sum();
        if true_sum + pred_sum == 0 {
            continue;
        }
        f1s.push(2.0 * tp / (true_sum + pred_sum) as f64);
    }
    if f1s.is_empty() {
        0.0
    } else {
        f1s.iter().sum::<f64>() / f1s.len() as f64
    }
}

/// Relative gradient tolerance of the refits on permuted labels (the stopping rule of
/// [`crate::logreg`]). Only their predictions are used. At 1e-8 they were identical to those of
/// fits run to the observed fits' 1e-10 on every prediction checked (2 × 16 000 test
/// predictions of 1000 permuted refits each on the paper-shape fixture and the synthetic
/// benchmark data, and the 16 000 of `analyze` on the fixture), while at 1e-6 one (previous
/// solver) or two (this one) of the fixture's 16 000 differed; 1e-8 costs ~1.5× the iterations of
/// 1e-6 and ~0.7× those of 1e-10.
/// (scikit-learn's reference uses its default `tol=1e-4` there.) Fits stay deterministic.
pub const PERMUTATION_GTOL: f64 = 1e-8;

/// Result of [`classifier_permutation_test`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassifierPermutation {
    /// Observed mean fold accuracy.
    pub observed: f64,
    pub p_value: f64,
    /// Mean of the permuted mean fold accuracies.
    pub null_mean: f64,
    pub reps: usize,
    pub seed: u64,
}

/// Label-permutation test of the CV accuracy (see module docs).
#[allow(clippy::too_many_arguments)]
pub fn classifier_permutation_test(
    x: &[f64],
    n: usize,
    d: usize,
    labels: &[usize],
    n_classes: usize,
    folds: &[usize],
    n_folds: usize,
    reps: usize,
    seed: u64,
) -> Result<CvOutcome<ClassifierPermutation>, CvError> {
    if let Some(reason) = check_inputs(x, n, d, labels, n_classes, folds, n_folds)? {
        return Ok(CvOutcome::Skipped { reason });
    }
    if reps == 0 {
        return Ok(CvOutcome::Skipped {
            reason: "0 repetitions requested".into(),
        });
    }
    let prep = PreparedFolds::new(x, d, folds, n_folds)?;
    let observed = match prep.run(labels, &LogRegOptions::default(), false, false, false) {
        Ok((pred, _)) => mean(&prep.fold_accuracies(labels, &pred)),
        Err(reason) => return Ok(CvOutcome::Skipped { reason }),
    };
    Ok(CvOutcome::Done(permutation_null(
        &prep, labels, observed, reps, seed,
    )?))
}

/// The permutation null of the mean fold accuracy on prepared folds, `observed` being the
/// accuracy with the true labels (see module docs).
fn permutation_null(
    prep: &PreparedFolds,
    labels: &[usize],
    observed: f64,
    reps: usize,
    seed: u64,
) -> Result<ClassifierPermutation, CvError> {
    let perm_opts = permutation_options();
    let null: Vec<f64> = permuted_labels(labels, reps, seed)
        .par_iter()
        .map(|perm| match prep.run(perm, &perm_opts, true, false, true) {
            Ok((pred, _)) => Ok(mean(&prep.fold_accuracies(perm, &pred))),
            Err(e) => Err(e),
        })
        .collect::<Result<_, String>>()
        .map_err(CvError::FoldFit)?;
    Ok(summarise_null(observed, &null, reps, seed))
}

/// Options of the permuted refits (gradient tolerance [`PERMUTATION_GTOL`]).
fn permutation_options() -> LogRegOptions {
    LogRegOptions {
        gtol: PERMUTATION_GTOL,
        ..LogRegOptions::default()
    }
}

/// The permuted labels of every repetition: repetition r shuffles `labels` (Fisher–Yates) with
/// `ChaCha8Rng` seeded with `seed`, stream r.
fn permuted_labels(labels: &[usize], reps: usize, seed: u64) -> Vec<Vec<usize>> {
    (0..reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(r as u64);
            let mut perm = labels.to_vec();
            perm.shuffle(&mut rng);
            perm
        })
        .collect()
}

/// p-value and null mean of the permuted mean fold accuracies `null` (repetition order).
fn summarise_null(observed: f64, null: &[f64], reps: usize, seed: u64) -> ClassifierPermutation {
    let ge = null.iter().filter(|&&a| a >= observed).count();
    ClassifierPermutation {
        observed,
        p_value: (1 + ge) as f64 / (1 + reps) as f64,
        null_mean: mean(null),
        reps,
        seed,
    }
}

/// Percentile bootstrap interval of an accuracy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BootstrapCi {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
    pub reps: usize,
    pub seed: u64,
}

/// Percentile 95 % bootstrap CI of the mean of `correct` (see module docs). `None` when `correct`
/// is empty or `reps` is 0.
pub fn accuracy_bootstrap_ci(correct: &[bool], reps: usize, seed: u64) -> Option<BootstrapCi> {
    let n = correct.len();
    if n == 0 || reps == 0 {
        return None;
    }
    let estimate = correct.iter().filter(|&&c| c).count() as f64 / n as f64;
    let mut stats: Vec<f64> = (0..reps)
        .into_par_iter()
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(r as u64);
            let hits = (0..n).filter(|_| correct[rng.random_range(0..n)]).count();
            hits as f64 / n as f64
        })
        .collect();
    stats.sort_by(|a, b| a.total_cmp(b));
    Some(BootstrapCi {
        estimate,
        lo: percentile_linear(&stats, 2.5),
        hi: percentile_linear(&stats, 97.5),
        reps,
        seed,
    })
}

/// numpy's default (`linear`) percentile of sorted data, `q` in percent.
pub fn percentile_linear(sorted: &[f64], q: f64) -> f64 {
    let m = sorted.len();
    if m == 1 {
        return sorted[0];
    }
    let pos = q / 100.0 * (m - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(m - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_matches_definition_and_constant_columns() {
        // Column 0 constant (scale 1), column 1 varies, column 2 constant non-zero with rounding.
        let x = vec![5.0, 1.0, 0.1, 5.0, 2.0, 0.1, 5.0, 4.0, 0.1];
        let s = StandardScaler::fit(&x, 3, 3);
        assert_eq!(s.scale[0], 1.0);
        assert_eq!(s.scale[2], 1.0);
        assert!((s.mean[1] - 7.0 / 3.0).abs() < 1e-15);
        let var = ((1.0f64 - 7.0 / 3.0).powi(2)
            + (2.0f64 - 7.0 / 3.0).powi(2)
            + (4.0f64 - 7.0 / 3.0).powi(2))
            / 3.0;
        assert!((s.scale[1] - var.sqrt()).abs() < 1e-15);
        let t = s.transform(&x);
        assert_eq!(t[0], 0.0);
        assert!((t[1] + t[4] + t[7]).abs() < 1e-14);
    }

    #[test]
    fn stratified_folds_are_balanced_and_seeded() {
        let labels: Vec<usize> = (0..23).map(|i| i % 3).collect();
        let f = stratified_kfold(&labels, 5, 9);
        assert_eq!(f, stratified_kfold(&labels, 5, 9));
        assert_ne!(f, stratified_kfold(&labels, 5, 10));
        let mut sizes = [0usize; 5];
        f.iter().for_each(|&v| sizes[v] += 1);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        for c in 0..3 {
            let mut per = [0usize; 5];
            (0..23)
                .filter(|&i| labels[i] == c)
                .for_each(|i| per[f[i]] += 1);
            assert!(per.iter().max().unwrap() - per.iter().min().unwrap() <= 1);
        }
    }

    fn separable(n_per: usize, k: usize, d: usize) -> (Vec<f64>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for c in 0..k {
            for i in 0..n_per {
                for j in 0..d {
                    let base = if j % k == c { 3.0 } else { 0.0 };
                    x.push(base + ((i * 31 + j * 17 + c * 7) % 11) as f64 * 0.05);
                }
                y.push(c);
            }
        }
        (x, y)
    }

    #[test]
    fn separable_data_is_classified_perfectly() {
        let (x, y) = separable(10, 4, 12);
        let n = y.len();
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let folds = stratified_kfold(&y, 5, 0);
        let r = logreg_cv(&x, n, 12, &y, &names, &folds, 5).unwrap();
        let CvOutcome::Done(r) = r else {
            panic!("skipped")
        };
        assert_eq!(r.fold_accuracies, vec![1.0; 5]);
        assert_eq!(r.accuracy_std, 0.0);
        assert_eq!(r.macro_f1_oof, 1.0);
        assert_eq!(r.chance, 0.25);
        for c in 0..4 {
            assert_eq!(r.confusion[c][c], 10);
        }
        assert_eq!(r.fold_coefs.len(), 5);
        let ci = accuracy_bootstrap_ci(&r.correct, 200, 1).unwrap();
        assert_eq!((ci.lo, ci.hi), (1.0, 1.0));
        let perm = classifier_permutation_test(&x, n, 12, &y, 4, &folds, 5, 19, 3).unwrap();
        let CvOutcome::Done(p) = perm else {
            panic!("skipped")
        };
        assert_eq!(p.observed, 1.0);
        assert_eq!(p.p_value, 1.0 / 20.0);
        assert!(p.null_mean < 0.6);
        // The combined call prepares and fits once and gives the same two results.
        let (r2, p2) = logreg_cv_with_permutation(&x, n, 12, &y, &names, &folds, 5, 19, 3).unwrap();
        assert_eq!(r2, CvOutcome::Done(r.clone()));
        assert_eq!(p2, CvOutcome::Done(p));
        let json = serde_json::to_value(CvOutcome::Done(r)).unwrap();
        assert!(json.get("fold_coefs").is_none());
        assert_eq!(json["labels"][3], "d");
    }

    #[test]
    fn permutation_and_bootstrap_do_not_depend_on_thread_count() {
        // Overlapping classes, so the permutation null has spread.
        let (mut x, y) = separable(8, 3, 6);
        for (k, v) in x.iter_mut().enumerate() {
            *v += ((k * 37) % 13) as f64 * 0.4;
        }
        let folds = stratified_kfold(&y, 4, 5);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let p = classifier_permutation_test(&x, 24, 6, &y, 3, &folds, 4, 40, 11).unwrap();
                let correct: Vec<bool> = (0..24).map(|i| i % 3 != 0).collect();
                (p, accuracy_bootstrap_ci(&correct, 300, 2).unwrap())
            })
        };
        let (a, b) = (run(1), run(3));
        assert_eq!(a, b);
        let CvOutcome::Done(p) = &a.0 else {
            panic!("skipped")
        };
        assert!(p.p_value > 0.0 && p.p_value <= 1.0);
        assert!(a.1.lo <= 2.0 / 3.0 && 2.0 / 3.0 <= a.1.hi && a.1.lo < a.1.hi);
    }

    #[test]
    fn fused_cv_and_permutation_equal_the_separate_computations() {
        // `logreg_cv_with_permutation` prepares the folds and runs the permuted refits fold by
        // fold; it must give exactly `logreg_cv` and `classifier_permutation_test`, for any
        // thread count. The second case has classes of 3 and 6 prompts and 3 folds of 3, so
        // some permuted training folds have a single class (constant prediction; checked).
        let (mut x, y) = separable(8, 3, 6);
        for (k, v) in x.iter_mut().enumerate() {
            *v += ((k * 37) % 13) as f64 * 0.4;
        }
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let folds = stratified_kfold(&y, 4, 5);
        let y2: Vec<usize> = (0..9).map(|i| usize::from(i >= 3)).collect();
        let folds2: Vec<usize> = (0..9).map(|i| i % 3).collect();
        let x2: Vec<f64> = (0..9 * 6).map(|k| ((k * 29) % 11) as f64 * 0.3).collect();
        let single_class_fold = permuted_labels(&y2, 200, 3)
            .iter()
            .any(|p| (0..3).any(|f| (0..9).filter(|&i| folds2[i] != f).all(|i| p[i] == 1)));
        assert!(single_class_fold);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (cv, perm) =
                    logreg_cv_with_permutation(&x, 24, 6, &y, &names, &folds, 4, 40, 11).unwrap();
                assert_eq!(cv, logreg_cv(&x, 24, 6, &y, &names, &folds, 4).unwrap());
                let sep = classifier_permutation_test(&x, 24, 6, &y, 3, &folds, 4, 40, 11);
                assert_eq!(perm, sep.unwrap());
                assert!(perm.done().is_some());
                let (cv2, perm2) =
                    logreg_cv_with_permutation(&x2, 9, 6, &y2, &names[..2], &folds2, 3, 200, 3)
                        .unwrap();
                assert_eq!(
                    cv2,
                    logreg_cv(&x2, 9, 6, &y2, &names[..2], &folds2, 3).unwrap()
                );
                let sep2 = classifier_permutation_test(&x2, 9, 6, &y2, 2, &folds2, 3, 200, 3);
                assert_eq!(perm2, sep2.unwrap());
                assert!(cv2.done().is_some() && perm2.done().is_some());
            });
        }
    }

    #[test]
    fn skips_instead_of_failing() {
        let (x, mut y) = separable(10, 2, 4);
        y[0] = 2; // class 2 has a single prompt
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let folds: Vec<usize> = (0..20).map(|i| i % 5).collect();
        let r = logreg_cv(&x, 20, 4, &y, &names, &folds, 5).unwrap();
        assert!(matches!(r, CvOutcome::Skipped { .. }));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with("{\"skipped\":\"category 2 has 1 prompts"),
            "{json}"
        );
        let one = vec![0usize; 20];
        let r = logreg_cv(&x, 20, 4, &one, &names[..1], &folds, 5).unwrap();
        assert!(matches!(r, CvOutcome::Skipped { .. }));
        assert!(matches!(
            logreg_cv(&x, 20, 4, &y, &names, &folds[..3], 5),
            Err(CvError::Length { .. })
        ));
    }

    #[test]
    fn macro_f1_zero_division() {
        // Class 2 never predicted and never true: left out; class 1 never predicted: F1 0.
        let c = vec![vec![3, 1, 0], vec![2, 0, 0], vec![0, 0, 0]];
        let f = macro_f1(&c);
        let f0 = 2.0 * 3.0 / (4.0 + 5.0);
        assert!((f - (f0 + 0.0) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn folds_csv_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("folds.csv");
        let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        std::fs::write(&p, "prompt_id,fold\na,0\n\nc,1\nb,2\n").unwrap();
        assert_eq!(read_folds_csv(&p, &ids).unwrap(), (vec![0, 2, 1], 3));
        std::fs::write(&p, "prompt_id,fold\na,0\nx,1\n").unwrap();
        let e = read_folds_csv(&p, &ids).unwrap_err().to_string();
        assert!(e.ends_with("folds.csv:3: unknown prompt id `x`"), "{e}");
        std::fs::write(&p, "a,0\nb,zz\n").unwrap();
        let e = read_folds_csv(&p, &ids).unwrap_err().to_string();
        assert!(e.contains("folds.csv:2:"), "{e}");
        std::fs::write(&p, "a,0\nb,1\n").unwrap();
        let e = read_folds_csv(&p, &ids).unwrap_err().to_string();
        assert!(e.contains("no fold for prompt `c`"), "{e}");
    }
    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// scikit-learn fixtures (tools/reference_stats.py): identical fold accuracies, macro-F1 and
    /// confusion given the same folds; coefficients and intercepts within 1e-5.
    fn check_logreg_fixture(case: &str) {
        let fx = fixture_support::load(case);
        let exp = &fx.expected["logreg_5fold"];
        let (folds, n_folds) = read_folds_csv(&fx.dir.join("folds.csv"), &fx.prompt_ids).unwrap();
        let out = logreg_cv(&fx.x, fx.n, fx.d, &fx.labels, &fx.names, &folds, n_folds).unwrap();
        let CvOutcome::Done(r) = out else {
            panic!("{case}: skipped")
        };
        let f64s = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect()
        };
        assert_eq!(r.fold_accuracies, f64s(&exp["fold_accuracies"]), "{case}");
        assert!(close(
            r.accuracy_mean,
            exp["accuracy_mean"].as_f64().unwrap(),
            1e-15
        ));
        assert!(close(
            r.accuracy_std,
            exp["accuracy_std"].as_f64().unwrap(),
            1e-15
        ));
        assert!(
            close(r.macro_f1_oof, exp["macro_f1_oof"].as_f64().unwrap(), 1e-14),
            "{case}: macro F1 {} vs {}",
            r.macro_f1_oof,
            exp["macro_f1_oof"]
        );
        assert_eq!(r.chance, exp["chance"].as_f64().unwrap());
        let conf: Vec<Vec<u64>> = serde_json::from_value(exp["confusion"].clone()).unwrap();
        assert_eq!(r.confusion, conf, "{case}");
        let oof: Vec<String> = serde_json::from_value(exp["oof_predictions"].clone()).unwrap();
        let ours: Vec<String> = r
            .oof_predictions
            .iter()
            .map(|&p| fx.names[p].clone())
            .collect();
        assert_eq!(ours, oof, "{case}");
        let models = exp["fold_models"].as_array().unwrap();
        assert_eq!(models.len(), r.fold_coefs.len());
        let (mut max_diff, mut max_idiff) = (0.0f64, 0.0f64);
        for (f, (m, ours)) in models.iter().zip(&r.fold_coefs).enumerate() {
            let classes: Vec<String> = serde_json::from_value(m["classes"].clone()).unwrap();
            let our_classes: Vec<String> =
                ours.classes.iter().map(|&c| fx.names[c].clone()).collect();
            assert_eq!(our_classes, classes, "{case} fold {f}");
            let coef: Vec<Vec<f64>> = serde_json::from_value(m["coef"].clone()).unwrap();
            assert_eq!(coef.len(), ours.coef.len(), "{case} fold {f}: coef rows");
            for (a, b) in coef.iter().flatten().zip(ours.coef.iter().flatten()) {
                max_diff = max_diff.max((a - b).abs());
            }
            let sk_intercept = f64s(&m["intercept"]);
            let mut idiff = 0.0f64;
            for (a, b) in sk_intercept.iter().zip(&ours.intercept) {
                idiff = idiff.max((a - b).abs());
            }
            max_idiff = max_idiff.max(idiff);
            // The scaler of this fold.
            let train: Vec<usize> = (0..fx.n).filter(|&i| folds[i] != f).collect();
            let xtr = gather(&fx.x, fx.d, &train);
            let sc = StandardScaler::fit(&xtr, train.len(), fx.d);
            if idiff >= 1e-5 {
                // The intercepts are the weakly determined direction (the loss Hessian along
                // them is Σ p(1−p), tiny when the training data are separable), so the
                // reference's own stopping error shows there first. Accept only if our point
                // is the better minimiser by an order of magnitude, and the gap is still small.
                let xs = sc.transform(&xtr);
                let ytr: Vec<usize> = train.iter().map(|&i| fx.labels[i]).collect();
                let ours_kkt = kkt_residual(&xs, &ytr, &ours.coef, &ours.intercept, &ours.classes);
                let sk_kkt = kkt_residual(&xs, &ytr, &coef, &sk_intercept, &ours.classes);
                eprintln!(
                    "{case} fold {f}: intercept gap {idiff:e}; KKT residual ours {ours_kkt:e}, sklearn {sk_kkt:e}"
                );
                assert!(idiff < 1e-4 && ours_kkt * 10.0 < sk_kkt, "{case} fold {f}");
            }
            for (a, b) in f64s(&m["scaler_mean"]).iter().zip(&sc.mean) {
                assert!(close(*a, *b, 1e-15), "{case} fold {f}: mean {a} vs {b}");
            }
            for (a, b) in f64s(&m["scaler_scale"]).iter().zip(&sc.scale) {
                assert!(
                    close(*a, *b, 1e-13 * a.abs()),
                    "{case} fold {f}: scale {a} vs {b}"
                );
            }
        }
        eprintln!("{case}: max |coef − sklearn| = {max_diff:e}, max |intercept − sklearn| = {max_idiff:e}");
        assert!(
            max_diff < 1e-5,
            "{case}: max coefficient difference {max_diff}"
        );
    }

    /// max |∇| of the unscaled objective C Σ loss + ‖W‖²/2 (C = 1) at (W, b), computed
    /// independently of the optimiser (as `kkt_grad_max` in tools/reference_stats.py).
    fn kkt_residual(
        xs: &[f64],
        y: &[usize],
        coef: &[Vec<f64>],
        intercept: &[f64],
        classes: &[usize],
    ) -> f64 {
        let d = coef[0].len();
        let n = y.len();
        let model = LogReg {
            n_classes: classes.len(),
            n_features: d,
            coef: coef.iter().flatten().copied().collect(),
            intercept: intercept.to_vec(),
            n_iter: 0,
            grad_norm: 0.0,
            converged: true,
        };
        let p = model.predict_proba(xs, n);
        let k = classes.len();
        let rows = coef.len();
        let mut worst = 0.0f64;
        for (row, w) in coef.iter().enumerate() {
            let cls = if rows == 1 { 1 } else { row };
            let mut gb = 0.0;
            let mut g = w.clone();
            for i in 0..n {
                let t = if classes[cls] == y[i] { 1.0 } else { 0.0 };
                let r = p[i * k + cls] - t;
                gb += r;
                for j in 0..d {
                    g[j] += r * xs[i * d + j];
                }
            }
            worst = g.iter().fold(worst.max(gb.abs()), |m, v| m.max(v.abs()));
        }
        worst
    }

    #[test]
    fn sklearn_fixture_logreg_planted() {
        check_logreg_fixture("planted");
    }

    #[test]
    fn sklearn_fixture_logreg_null() {
        check_logreg_fixture("null");
    }

    #[test]
    fn sklearn_fixture_logreg_binary() {
        check_logreg_fixture("weighted_small");
    }

    #[test]
    fn sklearn_fixture_logreg_paper_shape() {
        check_logreg_fixture("paper_shape");
    }
}

/// Loading of the scikit-learn fixtures in `fixtures/stats/<case>/` for the tests of this crate's
/// t-SNE and classifier modules. Signatures come from `expected.json` (`signatures`) when present,
/// otherwise from the counts-mode trace (counts of all token types summed per prompt, normalised
/// per layer), so these tests do not depend on the trace reader.
#[cfg(test)]
pub(crate) mod fixture_support {
    use std::collections::HashMap;
    use std::path::PathBuf;

    pub(crate) struct Fixture {
        pub dir: PathBuf,
        pub expected: serde_json::Value,
        pub x: Vec<f64>,
        pub n: usize,
        pub d: usize,
        pub labels: Vec<usize>,
        pub names: Vec<String>,
        pub prompt_ids: Vec<String>,
    }

    pub(crate) fn load(case: &str) -> Fixture {
        // MOE_XRAY_FIXTURES overrides the repository's fixtures folder (out-of-tree builds).
        let root = std::env::var_os("MOE_XRAY_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
        let dir = root.join("stats").join(case);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let prompt_ids: Vec<String> =
            serde_json::from_value(expected["prompt_ids"].clone()).unwrap();
        let names: Vec<String> = expected["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        let (nl, ne) = (
            expected["num_layers"].as_u64().unwrap() as usize,
            expected["num_experts"].as_u64().unwrap() as usize,
        );
        let d = nl * ne;
        let mut category: HashMap<String, String> = HashMap::new();
        let mut counts: HashMap<String, Vec<f64>> = HashMap::new();
        let trace = std::fs::read_to_string(dir.join("trace.jsonl")).unwrap();
        for line in trace.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let id = v["prompt_id"].as_str().unwrap().to_string();
            if let Some(c) = v["category"].as_str() {
                category.entry(id.clone()).or_insert_with(|| c.to_string());
            }
            if let Some(cs) = v["counts"].as_array() {
                let acc = counts.entry(id).or_insert_with(|| vec![0.0; d]);
                for (a, c) in acc.iter_mut().zip(cs) {
                    *a += c.as_f64().unwrap();
                }
            }
        }
        let n = prompt_ids.len();
        let x: Vec<f64> = if let Some(sig) = expected["signatures"].as_array() {
            sig.iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                .collect()
        } else {
            let mut x = Vec::with_capacity(n * d);
            for id in &prompt_ids {
                let a = &counts[id];
                for l in 0..nl {
                    let row = &a[l * ne..(l + 1) * ne];
                    let tot: f64 = row.iter().sum();
                    x.extend(row.iter().map(|v| v / tot));
                }
            }
            x
        };
        assert_eq!(x.len(), n * d, "{case}: signature matrix shape");
        let labels = prompt_ids
            .iter()
            .map(|id| names.iter().position(|c| *c == category[id]).unwrap())
            .collect();
        Fixture {
            dir,
            expected,
            x,
            n,
            d,
            labels,
            names,
            prompt_ids,
        }
    }
}
