#!/usr/bin/env python3
"""Reference implementation (numpy / scipy / scikit-learn) of every statistic in docs/DESIGN.md.

Reads fixtures/stats/<case>/trace.jsonl (record form, flat-event form or counts mode), writes
fixtures/stats/<case>/folds.csv (first, if absent or --rewrite-folds) and the expected JSON with the
results.json field names. The Rust tests compare against these files.

What is exact and what is Monte Carlo
-------------------------------------
Exact (deterministic, Rust compares to tight tolerances): signatures, prompt_similarity, similarity,
category_similarity_matrix, per_layer, pca, logreg_5fold (+ fold_models), tsne (sklearn's own
optimiser; Rust compares KL within 5 %).
Monte Carlo (numpy PCG64 streams, so NOT the same random numbers as Rust's ChaCha8; Rust compares
statistically): baselines.* and significance.*. Each block says `"monte_carlo": true`.

Definitions and choices (see docs/DESIGN.md, which is normative)
---------------------------------------------------------------
* Reader: `weights` are parsed as float32 then widened to float64 (the Rust RoutingRecord stores
  f32), counts are summed in float64 in file order. Prompt order = first appearance in the trace
  (of any line). A prompt with zero selected count in any layer is dropped ("dropped_prompts").
* Signature s_i[l,e] = A_i[l,e] / sum_e A_i[l,e], layer-major flattening (index l*E+e).
* sim(i,j) = mean_l cos(s_i[l], s_j[l]); pairs i<j; std ddof=1; Cohen's d with pooled SD (ddof=1).
* PCA: sklearn PCA(n_components=min(10, N-1), svd_solver="full") -- "full" is forced so the
  numbers are exact LAPACK SVD (svd_solver="auto" would pick "randomized" at the paper shape);
  sign convention: svd_flip(u_based_decision=False), i.e. each component (row of Vt) is flipped
  so that its entry of largest absolute value is positive.
* t-SNE: sklearn TSNE(n_components=2, method="exact", perplexity=min(30, (N-1)/3), init="pca",
  learning_rate="auto", random_state=0), max_iter 1000 (default). Note sklearn's PCA init uses
  PCA(svd_solver="auto", random_state=0), cast to float32, scaled so column 0 has std 1e-4.
* logreg_5fold: folds from folds.csv (written with StratifiedKFold(5, shuffle=True,
  random_state=0) over the prompts in prompt order with their category labels); per fold a
  Pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="lbfgs", tol=1e-12,
  max_iter=100000)) so the coefficients are the true minimiser (fold_models[].kkt_grad_max
  reports the remaining gradient; it is ~1e-7, far below the 1e-5 comparison tolerance). With 2 classes sklearn fits the
  BINARY objective (coef shape 1 x F, positive class = labels[1]); with >2 classes the
  multinomial one (coef K x F). fold_models coef/intercept are in standardised feature space;
  scaler_mean / scaler_scale give the StandardScaler of each fold (scale 1 for constant features).
  When a class has fewer prompts than folds: {"skipped": reason}.
* Baselines (per DESIGN.md): permutation (expert axis of A_i[l,:] permuted uniformly per prompt and
  layer); load_balance_uniform (T_il = floor(sum_e U_i[l,e]/k + 0.5) tokens where U are the
  UNWEIGHTED counts; each token draws k distinct experts uniformly); load_balance_marginal (same
  T_il; each token draws k experts without replacement with probabilities proportional to
  P_l[e] = sum_i A_i[l,e] (A weighted when --weighted), sequential renormalised draws, simulated
  with the equivalent exponential race (k smallest of Exp(1)/P_l[e]); zero-load experts are never drawn; if fewer than k
  experts have load, all of those are drawn). Per repetition m_r = mean pair sim over i<j, q_r =
  pair std (ddof=1); reported mean_r m_r, std_r m_r (ddof=1), mean_r q_r.
* significance: label_permutation (R=1000 shuffles of labels; p = (1 + #{stat_perm >= obs}) /
  (1 + R)) for within-minus-across and for d; bootstrap (B=1000, stratified resampling of prompts
  within category, pairs made of two copies of one original prompt excluded; percentile CI with
  numpy's default linear interpolation at 2.5 / 97.5) of d, and of the classifier accuracy by
  resampling the out-of-fold correctness vector (plain, N with replacement);
  classifier_permutation (R=200 label permutations, same folds, sklearn default tol=1e-4).
* lexical_baseline (confound control): X[i, t] = number of counted tokens of prompt i with token
  id t -- every (token type, position) of the selected token types once, over the records of the
  analysed prompts -- one column per token id that occurs (sorted ids), dense; then exactly the
  logreg_5fold pipeline (same folds, StandardScaler, LogisticRegression tol=1e-12), without
  fold_models. {"vocabulary": V, "tokens": sum of X, "classifier": {...}}.
* token_matched (confound control), both modes under "token_matched": {"shared": ..., "residual":
  ...}: "shared" sums only the records whose token id occurs in every category (in the token
  bags of the analysed prompts); a prompt with a zero layer is dropped. "residual" subtracts from
  every record's selection vector (1 per expert, or the float32 weight with --weighted) the mean
  selection vector of its token id at that layer over all analysed prompts (mean over the token
  id's (type, layer, position) occurrences); a prompt with a layer whose residual norm is
  <= 1e-9 * its selection mass at that layer is dropped. Then similarity, category matrix and
  per_layer exactly as for the signatures (per-layer cosines; scale-free).

Usage:
  /work/venvs/sci/bin/python tools/reference_stats.py --case planted
  /work/venvs/sci/bin/python tools/reference_stats.py --all        # every case and variant
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import scipy
import sklearn
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "stats"
N_FOLDS = 5


# ----------------------------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Table:
    """Per-prompt counts: prompt_ids (first-appearance order), categories, A (N,L,E), U (unweighted)."""

    def __init__(self, L, E, k, ids, cats, A, U, dropped):
        self.L, self.E, self.k = L, E, k
        self.ids, self.cats, self.A, self.U, self.dropped = ids, cats, A, U, dropped


def read_table(case_dir: Path, token_types=("prompt", "generation"), weighted=False) -> Table:
    man = json.loads((case_dir / "manifest.json").read_text())
    L, E, k = man["num_layers"], man["num_experts"], man["top_k"]
    order: list[str] = []
    cats: dict[str, str] = {}
    A: dict[str, np.ndarray] = {}
    U: dict[str, np.ndarray] = {}

    def ensure(pid, cat):
        if pid not in A:
            order.append(pid)
            cats[pid] = cat
            A[pid] = np.zeros((L, E))
            U[pid] = np.zeros((L, E))

    with open(case_dir / "trace.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            ensure(r["prompt_id"], r.get("category"))
            if r["token_type"] not in token_types:
                continue
            pid = r["prompt_id"]
            if "counts" in r:
                c = np.asarray(r["counts"], dtype=np.float64).reshape(L, E)
                U[pid] += c
                if weighted:
                    if "weighted_counts" not in r:
                        raise SystemExit(f"{case_dir}: --weighted needs weighted_counts in counts mode")
                    A[pid] += np.asarray(r["weighted_counts"], dtype=np.float64).reshape(L, E)
                else:
                    A[pid] += c
            elif "experts" in r:
                l = r["layer"]
                ws = r.get("weights")
                for j, e in enumerate(r["experts"]):
                    U[pid][l, e] += 1.0
                    if weighted:
                        A[pid][l, e] += float(np.float32(ws[j]))
                    else:
                        A[pid][l, e] += 1.0
            elif "expert" in r:
                if weighted:
                    raise SystemExit(f"{case_dir}: flat events carry no weights")
                U[pid][r["layer"], r["expert"]] += 1.0
                A[pid][r["layer"], r["expert"]] += 1.0
            else:
                raise SystemExit(f"{case_dir}: unknown line form")
    ids, keep_cats, As, Us, dropped = [], [], [], [], []
    for pid in order:
        zero_layers = [l for l in range(L) if A[pid][l].sum() == 0]
        if zero_layers:
            dropped.append({"prompt_id": pid, "reason": f"no selected routing counts in layer {zero_layers[0]}"})
            continue
        ids.append(pid)
        keep_cats.append(cats[pid])
        As.append(A[pid])
        Us.append(U[pid])
    return Table(L, E, k, ids, keep_cats, np.array(As), np.array(Us), dropped)


# ----------------------------------------------------------------------------------------------
# Similarity
# ----------------------------------------------------------------------------------------------


def signatures(A: np.ndarray) -> np.ndarray:
    """(N,L,E) counts -> (N,L,E) per-layer normalised signatures."""
    return A / A.sum(axis=2, keepdims=True)


def unit_rows(S: np.ndarray) -> np.ndarray:
    """(N,L,E) -> (N, L*E) concat of per-layer unit vectors / sqrt(L); sim = V V^T."""
    L = S.shape[1]
    Vn = S / np.linalg.norm(S, axis=2, keepdims=True)
    return Vn.reshape(S.shape[0], -1) / np.sqrt(L)


def pair_stats(values: np.ndarray):
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std(ddof=1))}


def cohens_d(w: np.ndarray, a: np.ndarray) -> float:
    nw, na = w.size, a.size
    sp = np.sqrt(((nw - 1) * w.var(ddof=1) + (na - 1) * a.var(ddof=1)) / (nw + na - 2))
    return float((w.mean() - a.mean()) / sp)


def within_across(sim: np.ndarray, labels: np.ndarray):
    iu, ju = np.triu_indices(sim.shape[0], k=1)
    vals = sim[iu, ju]
    same = labels[iu] == labels[ju]
    return vals[same], vals[~same]


def similarity_block(S: np.ndarray, labels: np.ndarray, cats_sorted: list[str]):
    V = unit_rows(S)
    sim = V @ V.T
    w, a = within_across(sim, labels)
    out = {
        "similarity": {"within": pair_stats(w), "across": pair_stats(a), "cohens_d": cohens_d(w, a)},
    }
    vals = []
    for A_ in cats_sorted:
        row = []
        ia = np.where(labels == A_)[0]
        for B_ in cats_sorted:
            ib = np.where(labels == B_)[0]
            if A_ == B_:
                sub = sim[np.ix_(ia, ia)]
                row.append(float(sub[np.triu_indices(ia.size, k=1)].mean()))
            else:
                row.append(float(sim[np.ix_(ia, ib)].mean()))
        vals.append(row)
    out["category_similarity_matrix"] = {"order": cats_sorted, "values": vals}
    per_layer = []
    Vn = S / np.linalg.norm(S, axis=2, keepdims=True)
    for l in range(S.shape[1]):
        c = Vn[:, l, :] @ Vn[:, l, :].T
        wl, al = within_across(c, labels)
        per_layer.append(
            {"layer": l, "within_mean": float(wl.mean()), "across_mean": float(al.mean()), "cohens_d": cohens_d(wl, al)}
        )
    out["per_layer"] = per_layer
    return sim, out


# ----------------------------------------------------------------------------------------------
# Baselines (Monte Carlo)
# ----------------------------------------------------------------------------------------------


def mean_and_pair_std(S: np.ndarray):
    V = unit_rows(S)
    sim = V @ V.T
    iu, ju = np.triu_indices(S.shape[0], k=1)
    v = sim[iu, ju]
    return v.mean(), v.std(ddof=1)


def token_layout(U: np.ndarray, k: int):
    """T_il = floor(sum_e U_i[l,e]/k + 0.5) (round half away from zero, like Rust f64::round)."""
    N, L, _ = U.shape
    T = np.floor(U.sum(axis=2) / k + 0.5).astype(np.int64)
    group = np.repeat(np.arange(N * L), T.reshape(-1))  # (i*L + l) of each synthetic token
    layer = group % L
    return T, group, layer


def draw_counts(rng, group, layer, inv_w, N, L, E, k):
    """Each synthetic token draws k experts without replacement with P(e) ~ w[layer, e].

    Exponential-race form of sequential renormalised sampling: the k smallest of Exp(1)/w_e are an
    exact draw of k experts without replacement proportional to w (same law as Gumbel-top-k);
    inv_w = 1/w with inf for w = 0, so zero-load experts are never drawn (they are only ever among
    the k smallest when fewer than k experts have load, and those slots are discarded)."""
    t = group.size
    keys = rng.standard_exponential(size=(t, E), dtype=np.float32) * inv_w[layer]
    kk = min(k, E)
    sel = np.argpartition(keys, kk - 1, axis=1)[:, :kk]
    ok = np.isfinite(np.take_along_axis(keys, sel, axis=1))
    flat = (group[:, None] * E + sel)[ok]
    return np.bincount(flat, minlength=N * L * E).reshape(N, L, E).astype(np.float64)


def baseline(kind: str, A: np.ndarray, U: np.ndarray, k: int, reps: int, seed: int):
    N, L, E = A.shape
    rng = np.random.default_rng(seed)
    m = np.empty(reps)
    q = np.empty(reps)
    if kind != "permutation":
        T, group, layer = token_layout(U, k)
        if kind == "load_balance_uniform":
            inv_w = np.ones((L, E), dtype=np.float32)
        else:
            P = A.sum(axis=0)
            with np.errstate(divide="ignore"):
                inv_w = (1.0 / P).astype(np.float32)
    for r in range(reps):
        if kind == "permutation":
            perm = np.argsort(rng.random((N, L, E)), axis=2)
            Ar = np.take_along_axis(A, perm, axis=2)
        else:
            Ar = draw_counts(rng, group, layer, inv_w, N, L, E, k)
            # A synthetic prompt-layer with zero tokens would have an undefined signature; it cannot
            # occur for kept prompts unless T_il rounds to 0 (then fall back to a uniform signature).
            zero = Ar.sum(axis=2) == 0
            if zero.any():
                Ar[zero] = 1.0
        m[r], q[r] = mean_and_pair_std(signatures(Ar))
    return {
        "mean": float(m.mean()),
        "std": float(m.std(ddof=1)),
        "pair_std": float(q.mean()),
        "reps": reps,
        "seed": seed,
        "monte_carlo": True,
        "rng": "numpy PCG64 default_rng(seed)",
    }


# ----------------------------------------------------------------------------------------------
# PCA, t-SNE, logistic regression
# ----------------------------------------------------------------------------------------------


def pca_block(X: np.ndarray):
    n = min(10, X.shape[0] - 1)
    p = PCA(n_components=n, svd_solver="full")
    Z = p.fit_transform(X)
    return {
        "explained_variance_ratio": [float(v) for v in p.explained_variance_ratio_],
        "coords": [[float(a), float(b)] for a, b in Z[:, :2]],
        "components_first2": [[float(v) for v in row] for row in p.components_[:2]],
        "svd_solver": "full",
    }


def tsne_block(X: np.ndarray):
    N = X.shape[0]
    perplexity = min(30.0, (N - 1) / 3.0)
    t = TSNE(
        n_components=2, method="exact", perplexity=perplexity, init="pca",
        learning_rate="auto", random_state=0,
    )
    Y = t.fit_transform(X)
    return {
        "coords": [[float(a), float(b)] for a, b in Y],
        "kl_divergence": float(t.kl_divergence_),
        "perplexity": perplexity,
        "learning_rate": float(t.learning_rate_),
        "n_iter": int(t.n_iter_),
    }


def make_folds(ids, labels, path: Path):
    skf = StratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=0)
    fold = np.empty(len(ids), dtype=int)
    for f, (_, test) in enumerate(skf.split(np.zeros(len(ids)), labels)):
        fold[test] = f
    text = "prompt_id,fold\n" + "".join(f"{pid},{int(fo)}\n" for pid, fo in zip(ids, fold))
    write_atomic(path, text)


def read_folds(path: Path) -> dict[str, int]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["prompt_id"]: int(row["fold"]) for row in csv.DictReader(f)}


def lr_pipeline(tol: float):
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("lr", LogisticRegression(C=1.0, solver="lbfgs", tol=tol, max_iter=100000)),
        ]
    )


def too_few(labels: np.ndarray, n_folds: int):
    cats, counts = np.unique(labels, return_counts=True)
    for c, n in zip(cats, counts):
        if n < n_folds:
            return f"category '{c}' has {n} prompts, fewer than {n_folds} folds"
    if cats.size < 2:
        return "only one category"
    return None


def kkt_grad_max(Xs, y, lr) -> float:
    """Max |gradient| of C*sum_i loss_i + 0.5*||W||^2 at the fitted (W, b): how far the reported
    coefficients are from the exact minimiser (the objective is 1-strongly convex in W, so the
    coefficient error is at most about this size)."""
    from scipy.special import expit, softmax

    W, b, cl = lr.coef_, lr.intercept_, lr.classes_
    if W.shape[0] == 1:
        t = (y == cl[1]).astype(float)
        r = expit(Xs @ W[0] + b[0]) - t
        g = np.concatenate([lr.C * Xs.T @ r + W[0], [lr.C * r.sum()]])
    else:
        Y = (y[:, None] == cl[None, :]).astype(float)
        R_ = softmax(Xs @ W.T + b, axis=1) - Y
        g = np.concatenate([(lr.C * R_.T @ Xs + W).ravel(), lr.C * R_.sum(axis=0)])
    return float(np.abs(g).max())


def cv_predict(X, y, fold, tol, keep_models=False):
    pred = np.empty(y.size, dtype=object)
    accs, models = [], []
    for f in range(int(fold.max()) + 1):
        te = fold == f
        tr = ~te
        pipe = lr_pipeline(tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.fit(X[tr], y[tr])
        p = pipe.predict(X[te])
        pred[te] = p
        accs.append(float(accuracy_score(y[te], p)))
        if keep_models:
            sc, lr = pipe.named_steps["scaler"], pipe.named_steps["lr"]
            models.append(
                {
                    "fold": f,
                    "classes": [str(c) for c in lr.classes_],
                    "coef": [[float(v) for v in row] for row in lr.coef_],
                    "intercept": [float(v) for v in lr.intercept_],
                    "n_iter": int(lr.n_iter_[0]),
                    "kkt_grad_max": kkt_grad_max(sc.transform(X[tr]), y[tr], lr),
                    "scaler_mean": [float(v) for v in sc.mean_],
                    "scaler_scale": [float(v) for v in sc.scale_],
                }
            )
    return pred.astype(str), accs, models


def logreg_block(X, y, fold):
    reason = too_few(y, N_FOLDS)
    if reason:
        return {"skipped": reason}, None
    labels = sorted(set(y.tolist()))
    pred, accs, models = cv_predict(X, y, fold, 1e-12, keep_models=True)
    _, counts = np.unique(y, return_counts=True)
    out = {
        "fold_accuracies": accs,
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs, ddof=0)),
        "macro_f1_oof": float(f1_score(y, pred, average="macro", labels=labels)),
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "labels": labels,
        "chance": float(counts.max() / y.size),
        "oof_predictions": pred.tolist(),
        "fold_models": models,
        "binary_objective": len(labels) == 2,
    }
    return out, pred


# ----------------------------------------------------------------------------------------------
# Significance (Monte Carlo)
# ----------------------------------------------------------------------------------------------


def label_permutation(sim, labels, reps, seed):
    rng = np.random.default_rng(seed)
    w, a = within_across(sim, labels)
    obs_diff, obs_d = w.mean() - a.mean(), cohens_d(w, a)
    ge_diff = ge_d = 0
    for _ in range(reps):
        pl = rng.permutation(labels)
        w2, a2 = within_across(sim, pl)
        ge_diff += (w2.mean() - a2.mean()) >= obs_diff
        ge_d += cohens_d(w2, a2) >= obs_d
    return {
        "p_within_minus_across": (1 + ge_diff) / (1 + reps),
        "p_cohens_d": (1 + ge_d) / (1 + reps),
        "observed_within_minus_across": float(obs_diff),
        "reps": reps,
        "seed": seed,
        "monte_carlo": True,
    }


def bootstrap(sim, labels, correct, reps, seed):
    rng = np.random.default_rng(seed)
    cats = sorted(set(labels.tolist()))
    members = [np.where(labels == c)[0] for c in cats]
    ds = np.empty(reps)
    for r in range(reps):
        idx = np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])
        lab = labels[idx]
        iu, ju = np.triu_indices(idx.size, k=1)
        keep = idx[iu] != idx[ju]
        iu, ju = iu[keep], ju[keep]
        vals = sim[idx[iu], idx[ju]]
        same = lab[iu] == lab[ju]
        ds[r] = cohens_d(vals[same], vals[~same])
    out = {
        "cohens_d_ci95": [float(np.percentile(ds, 2.5)), float(np.percentile(ds, 97.5))],
        "reps": reps,
        "seed": seed,
        "monte_carlo": True,
    }
    if correct is not None:
        accs = np.array([correct[rng.integers(0, correct.size, correct.size)].mean() for _ in range(reps)])
        out["accuracy_ci95"] = [float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))]
    return out


def classifier_permutation(X, y, fold, acc_obs, reps, seed):
    rng = np.random.default_rng(seed)
    ge = 0
    for _ in range(reps):
        yp = rng.permutation(y)
        pred, _, _ = cv_predict(X, yp, fold, 1e-4)
        ge += float(np.mean(pred == yp)) >= acc_obs
    return {"p": (1 + ge) / (1 + reps), "reps": reps, "seed": seed, "tol": 1e-4, "monte_carlo": True}


# ----------------------------------------------------------------------------------------------
# Confound controls
# ----------------------------------------------------------------------------------------------


def read_tokens(case_dir: Path, tab: Table, token_types, weighted):
    """Token ids of the analysed prompts: ({pid: {(type, position): token_id}}, records), or None
    for traces without token ids (counts form)."""
    ids = set(tab.ids)
    toks = {pid: {} for pid in tab.ids}
    recs = []
    with open(case_dir / "trace.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "experts" not in r and "expert" not in r:
                return None
            if r["token_type"] not in token_types or r["prompt_id"] not in ids:
                continue
            if "token_id" not in r:
                return None
            pid = r["prompt_id"]
            toks[pid].setdefault((r["token_type"], r["position"]), r["token_id"])
            if "experts" in r:
                experts, ws = r["experts"], r.get("weights")
            else:
                experts, ws = [r["expert"]], ([r["weight"]] if "weight" in r else None)
            w = [float(np.float32(x)) for x in ws] if (weighted and ws is not None) else [1.0] * len(experts)
            recs.append((pid, r["token_type"], r["layer"], r["position"], r["token_id"], experts, w))
    return toks, recs


def lexical_block(tab: Table, labels, fold, toks):
    vocab = sorted({t for pid in tab.ids for t in toks[pid].values()})
    index = {t: j for j, t in enumerate(vocab)}
    X = np.zeros((len(tab.ids), len(vocab)))
    for i, pid in enumerate(tab.ids):
        for t in toks[pid].values():
            X[i, index[t]] += 1.0
    clf, _ = logreg_block(X, labels, fold)
    clf.pop("fold_models", None)
    clf.pop("binary_objective", None)
    return {"vocabulary": len(vocab), "tokens": int(X.sum()), "classifier": clf}


def token_matched_block(tab: Table, labels, cats_sorted, toks, recs, mode):
    L, E = tab.L, tab.E
    idx = {pid: i for i, pid in enumerate(tab.ids)}
    N = len(tab.ids)
    A = np.zeros((N, L, E))
    seen = set()
    records = 0
    if mode == "residual":
        tot, occ, nit = {}, {}, {}
        for pid, tt, l, pos, t, experts, w in recs:
            i = idx[pid]
            tot.setdefault(t, np.zeros((L, E)))
            occ.setdefault(t, np.zeros(L))
            if (i, tt, l, pos) not in seen:
                seen.add((i, tt, l, pos))
                records += 1
                occ[t][l] += 1
                nit[(i, t, l)] = nit.get((i, t, l), 0) + 1
            for e, x in zip(experts, w):
                tot[t][l, e] += x
                A[i, l, e] += x
        R = A.copy()
        for (i, t, l), n in sorted(nit.items()):
            R[i, l] -= n * tot[t][l] / occ[t][l]
        mass = A.sum(axis=2)
        norms = np.linalg.norm(R, axis=2)
        zero = norms <= 1e-9 * mass
        n_ids = len(tot)
        why = "zero residual at layer {}"
    else:
        per_cat = {}
        for pid, c in zip(tab.ids, labels):
            per_cat.setdefault(c, set()).update(toks[pid].values())
        shared = set.intersection(*per_cat.values())
        if not shared:
            return {"skipped": "no token id occurs in every category"}
        for pid, tt, l, pos, t, experts, w in recs:
            if t not in shared:
                continue
            i = idx[pid]
            if (i, tt, l, pos) not in seen:
                seen.add((i, tt, l, pos))
                records += 1
            for e, x in zip(experts, w):
                A[i, l, e] += x
        R = A
        zero = A.sum(axis=2) <= 0
        n_ids = len(shared)
        why = "no token shared by every category at layer {}"
    keep = ~zero.any(axis=1)
    dropped = [{"prompt_id": pid, "reason": why.format(int(np.argmax(zero[i])))}
               for i, pid in enumerate(tab.ids) if not keep[i]]
    _, sizes = np.unique(labels[keep], return_counts=True)
    if (sizes >= 2).sum() < 2:
        return {"skipped": f"fewer than 2 categories with at least 2 prompts remain ({len(dropped)} of {N} prompts dropped)"}
    out = {"mode": mode, "num_prompts": int(keep.sum()), "token_ids": n_ids, "records": records,
           "dropped_prompts": dropped}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, block = similarity_block(R[keep], labels[keep], cats_sorted)
    out.update(block)
    return out


def confound_blocks(case: str, tab: Table, labels, cats_sorted, fold, token_types, weighted):
    got = read_tokens(FIXTURES / case, tab, token_types, weighted)
    if got is None:
        reason = "counts-form traces have no token ids"
        return {"skipped": reason}, {"shared": {"skipped": reason}, "residual": {"skipped": reason}}
    toks, recs = got
    tm = {m: token_matched_block(tab, labels, cats_sorted, toks, recs, m) for m in ("shared", "residual")}
    return lexical_block(tab, labels, fold, toks), tm


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def compute(case: str, token_types, weighted, reps, sig_reps, clf_reps, include_signatures=True):
    case_dir = FIXTURES / case
    man = json.loads((case_dir / "manifest.json").read_text())
    tab = read_table(case_dir, token_types, weighted)
    labels = np.array(tab.cats, dtype=object).astype(str)
    cats_sorted = sorted(set(labels.tolist()))
    S3 = signatures(tab.A)
    X = S3.reshape(S3.shape[0], -1)
    folds_path = case_dir / "folds.csv"
    if not folds_path.exists():
        # Folds are made once, from the default settings (both token types, unweighted).
        base = read_table(case_dir)
        make_folds(base.ids, np.array(base.cats).astype(str), folds_path)
    fmap = read_folds(folds_path)
    fold = np.array([fmap[pid] for pid in tab.ids])

    sim, simblock = similarity_block(S3, labels, cats_sorted)
    res = {
        "schema_version": 1,
        "tool_version": "reference_stats.py",
        "reference": {
            "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
            "python": sys.version.split()[0],
            "command": "tools/reference_stats.py --case " + case
            + ("" if list(token_types) == ["prompt", "generation"] else " --token-types " + ",".join(token_types))
            + (" --weighted" if weighted else ""),
        },
        "input": {"traces": [f"fixtures/stats/{case}/trace.jsonl"], "manifest": man,
                  "folds": f"fixtures/stats/{case}/folds.csv"},
        "settings": {"token_types": list(token_types), "weighted": weighted, "reps": reps, "seed": 0},
        "num_prompts": len(tab.ids),
        "num_layers": tab.L,
        "num_experts": tab.E,
        "top_k": tab.k,
        "categories": [{"name": c, "n": int((labels == c).sum())} for c in cats_sorted],
        "prompt_ids": tab.ids,
        "dropped_prompts": tab.dropped,
        "path": "exact_pairs",
    }
    res.update(simblock)
    res["prompt_similarity"] = [[float(v) for v in row] for row in sim]
    if include_signatures:
        res["signatures"] = [[float(v) for v in row] for row in X]
    else:
        res["signatures_omitted"] = "file size; recompute from counts (exact integers / row sums)"
        res["signature_sq_norms"] = [float(v) for v in (X * X).sum(axis=1)]
    res["baselines"] = {
        kind: baseline(kind, tab.A, tab.U, tab.k, reps, seed)
        for seed, kind in enumerate(["permutation", "load_balance_uniform", "load_balance_marginal"])
    }
    res["pca"] = pca_block(X)
    res["tsne"] = tsne_block(X)
    lr, pred = logreg_block(X, labels, fold)
    res["logreg_5fold"] = lr
    correct = None if pred is None else (pred == labels).astype(float)
    sig = {
        "label_permutation": label_permutation(sim, labels, sig_reps, 10),
        "bootstrap": bootstrap(sim, labels, correct, sig_reps, 11),
    }
    if pred is not None:
        sig["classifier_permutation"] = classifier_permutation(X, labels, fold, lr["accuracy_mean"], clf_reps, 12)
    else:
        sig["classifier_permutation"] = {"skipped": lr["skipped"]}
    res["significance"] = sig
    res["lexical_baseline"], res["token_matched"] = confound_blocks(
        case, tab, labels, cats_sorted, fold, token_types, weighted)
    return res


def compute_confound(case: str, token_types, weighted):
    """Only the confound-control sections (for --only-confound)."""
    tab = read_table(FIXTURES / case, token_types, weighted)
    labels = np.array(tab.cats, dtype=object).astype(str)
    cats_sorted = sorted(set(labels.tolist()))
    fmap = read_folds(FIXTURES / case / "folds.csv")
    fold = np.array([fmap[pid] for pid in tab.ids])
    return confound_blocks(case, tab, labels, cats_sorted, fold, token_types, weighted)


VARIANTS = {
    # case: [(output file, token_types, weighted)]
    "planted": [("expected.json", ("prompt", "generation"), False)],
    "null": [("expected.json", ("prompt", "generation"), False)],
    "paper_shape": [("expected.json", ("prompt", "generation"), False)],
    "weighted_small": [
        ("expected.json", ("prompt", "generation"), False),
        ("expected_weighted.json", ("prompt", "generation"), True),
        ("expected_prompt_only.json", ("prompt",), False),
        ("expected_weighted_prompt_only.json", ("prompt",), True),
    ],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="case name (repeatable)")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--reps", type=int, default=2000, help="baseline repetitions (default 2000)")
    ap.add_argument("--sig-reps", type=int, default=1000)
    ap.add_argument("--clf-reps", type=int, default=200)
    ap.add_argument("--rewrite-folds", action="store_true")
    ap.add_argument("--only-confound", action="store_true",
                    help="recompute only lexical_baseline and token_matched and add them to the existing "
                         "expected files (every other value stays byte-identical)")
    args = ap.parse_args()
    cases = list(VARIANTS) if args.all else (args.case or [])
    if not cases:
        ap.error("give --case NAME or --all")
    for case in cases:
        if args.rewrite_folds and (FIXTURES / case / "folds.csv").exists():
            (FIXTURES / case / "folds.csv").unlink()
        for fname, tt, weighted in VARIANTS[case]:
            if args.only_confound:
                path = FIXTURES / case / fname
                res = json.loads(path.read_text())
                res["lexical_baseline"], res["token_matched"] = compute_confound(case, tt, weighted)
                write_atomic(path, json.dumps(res, indent=1) + "\n")
                lx = res["lexical_baseline"]
                acc = lx["classifier"].get("accuracy_mean", lx["classifier"]) if "classifier" in lx else lx
                print(f"{case}/{fname}: lexical accuracy {acc}; token_matched d "
                      + ", ".join(f"{m}={b.get('similarity', {}).get('cohens_d', b.get('skipped'))}"
                                  for m, b in res["token_matched"].items()), flush=True)
                continue
            res = compute(case, tt, weighted, args.reps, args.sig_reps, args.clf_reps,
                          include_signatures=(case != "paper_shape"))
            write_atomic(FIXTURES / case / fname, json.dumps(res, indent=1) + "\n")
            s = res["similarity"]
            print(
                f"{case}/{fname}: N={res['num_prompts']} within={s['within']['mean']:.4f} "
                f"across={s['across']['mean']:.4f} d={s['cohens_d']:.3f} "
                f"acc={res['logreg_5fold'].get('accuracy_mean', 'skipped')} "
                f"perm={res['baselines']['permutation']['mean']:.4f} "
                f"lbu={res['baselines']['load_balance_uniform']['mean']:.4f} "
                f"lbm={res['baselines']['load_balance_marginal']['mean']:.4f} "
                f"kl={res['tsne']['kl_divergence']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
