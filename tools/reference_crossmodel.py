#!/usr/bin/env python3
"""Reference values for `moe-xray compare-models` (crates/stats/src/crossmodel.rs).

Reads the committed analysis directories under fixtures/crossmodel/ (results.json and
signatures.csv, written by `moe-xray analyze`, see fixtures/crossmodel/README.md) and the traces
they were made from, and computes independently with numpy/scipy (pinned in
tools/requirements-stats.txt):

  - the prompt x prompt similarity (mean over layers of the per-layer cosine) of each model;
  - RSA: scipy.stats.spearmanr of the upper triangles; the Mantel p exactly over all N!
    permutations when N <= 8, otherwise from 20000 numpy permutations (compared statistically);
  - linear CKA in the feature-space form ||Y~'X~||_F^2 / (||X~'X~||_F ||Y~'Y~||_F);
  - the per-layer CKA and RSA matrices;
  - per-category Cohen's d on the shared prompts;
  - for the same architecture: the expert matching by scipy.optimize.linear_sum_assignment on the
    same integer weights, its distances, and the drift (per-layer JS of pooled loads in bits, mean
    signature shift) with B's experts as numbered and relabelled.

Run:  /work/venvs/sci/bin/python tools/reference_crossmodel.py
Writes fixtures/crossmodel/expected.json. Definitions: docs/statistics.md, "Cross-model comparison".
"""
import csv
import itertools
import json
import os

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "fixtures", "crossmodel")

# (name, dir A, dir B, traces A, traces B) -- dirs relative to fixtures/crossmodel.
CASES = [
    ("planted_vs_planted", "planted", "planted",
     "fixtures/stats/planted/trace.jsonl", "fixtures/stats/planted/trace.jsonl"),
    ("planted_vs_null", "planted", "null",
     "fixtures/stats/planted/trace.jsonl", "fixtures/stats/null/trace.jsonl"),
    ("mixtral_vs_olmoe", "mixtral", "olmoe", None, None),
    # The N-run comparison (compare-models planted null planted_prompt): its three pairs.
    ("planted_vs_planted_prompt", "planted", "planted_prompt",
     "fixtures/stats/planted/trace.jsonl", "fixtures/stats/planted/trace.jsonl"),
    ("null_vs_planted_prompt", "null", "planted_prompt",
     "fixtures/stats/null/trace.jsonl", "fixtures/stats/planted/trace.jsonl"),
]

# N-run comparisons: the runs in order; every pair i<j on the prompts shared by all runs.
MULTI = [("planted_null_prompt", ["planted", "null", "planted_prompt"])]


def read_analysis(d):
    res = json.load(open(os.path.join(FIX, d, "results.json")))
    with open(os.path.join(FIX, d, "signatures.csv"), newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    L, E = res["num_layers"], res["num_experts"]
    assert len(header) == 2 + L * E
    ids = [r[0] for r in rows]
    cats = [r[1] for r in rows]
    sig = np.array([[float(x) for x in r[2:]] for r in rows], dtype=np.float64)
    layers = res.get("moe_layers") or list(range(L))
    return dict(res=res, L=L, E=E, ids=ids, cats=cats, sig=sig, layers=layers)


def similarity(sig, L, E):
    n = sig.shape[0]
    s = np.zeros((n, n))
    for l in range(L):
        b = sig[:, l * E:(l + 1) * E]
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        s += b @ b.T
    return s / L


def layer_cos(sig, l, E):
    b = sig[:, l * E:(l + 1) * E]
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return b @ b.T


def upper(m):
    i, j = np.triu_indices(m.shape[0], 1)
    return m[i, j]


def spear(x, y):
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return float(spearmanr(x, y).statistic)


def cka(x, y):
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    num = np.linalg.norm(y.T @ x, "fro") ** 2
    den = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return None if den == 0 else float(num / den)


def mantel(sa, sb, seed=12345):
    n = sa.shape[0]
    ua = upper(sa)
    obs = spear(ua, upper(sb))
    i, j = np.triu_indices(n, 1)
    if n <= 8:
        perms = list(itertools.permutations(range(n)))
        exact = True
    else:
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(n) for _ in range(20000)]
        exact = False
    null = np.array([spearmanr(ua, sb[np.ix_(p, p)][i, j]).statistic for p in map(np.array, perms)])
    ge = int(np.sum(null >= obs - 1e-12 * max(1.0, abs(obs))))
    if exact:
        p = ge / len(null)  # the exact permutation p (identity included)
    else:
        p = (1 + ge) / (1 + len(null))
    return dict(p=p, null_mean=float(null.mean()), null_std=float(null.std(ddof=1)),
                reps=len(null), exact=exact)


def cohens_d(w, a):
    w, a = np.asarray(w), np.asarray(a)
    if len(w) < 2 or len(a) < 2:
        return None
    nw, na = len(w), len(a)
    sp = np.sqrt(((nw - 1) * w.var(ddof=1) + (na - 1) * a.var(ddof=1)) / (nw + na - 2))
    d = (w.mean() - a.mean()) / sp
    return float(d) if np.isfinite(d) else None


def category_d(sim, labels, c):
    n = len(labels)
    w, a = [], []
    for i in range(n):
        for j in range(i + 1, n):
            x, y = labels[i] == c, labels[j] == c
            if x and y:
                w.append(sim[i, j])
            elif x != y:
                a.append(sim[i, j])
    return cohens_d(w, a)


def overall_d(sim, labels):
    n = len(labels)
    w = [sim[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    a = [sim[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    return cohens_d(w, a)


def match(sa, sb, L, E, layers):
    out = []
    for l in range(L):
        A = sa[:, l * E:(l + 1) * E]
        B = sb[:, l * E:(l + 1) * E]
        w = A.T @ B
        wmax = w.max()
        if wmax > 0:
            wi = np.floor(w / wmax * 2.0 ** 40 + 0.5).astype(np.int64)
            r, c = linear_sum_assignment(wi, maximize=True)
            assign = [int(x) for x in c[np.argsort(r)]]
        else:
            assign = list(range(E))
        out.append(dict(layer=layers[l], assignment=assign,
                        distance_identity=float(np.linalg.norm(A - B)),
                        distance_matched=float(np.linalg.norm(A - B[:, assign])),
                        weight=int(sum(wi[e, assign[e]] for e in range(E))) if wmax > 0 else 0))
    return out


def trace_counts(path, L, E, token_types):
    counts = {}
    order = []
    for line in open(os.path.join(ROOT, path)):
        r = json.loads(line)
        if r["token_type"] not in token_types:
            continue
        pid = r["prompt_id"]
        if pid not in counts:
            counts[pid] = np.zeros((L, E))
            order.append(pid)
        for e in r["experts"]:
            counts[pid][r["layer"], e] += 1
    return order, counts


def drift(order_a, ca, order_b, cb, assign, L, E):
    pa = sum(ca[p] for p in order_a)
    pb = sum(cb[p] for p in order_b)
    if assign is not None:
        perm = np.array(assign)
        pb = np.stack([pb[l, perm[l]] for l in range(L)])
        cb = {p: np.stack([v[l, perm[l]] for l in range(L)]) for p, v in cb.items()}
    js = [float(jensenshannon(pa[l] / pa[l].sum(), pb[l] / pb[l].sum(), base=2) ** 2) for l in range(L)]
    shifts = []
    for p in order_a:
        if p in cb:
            a, b = ca[p], cb[p]
            cos = [a[l] @ b[l] / np.linalg.norm(a[l]) / np.linalg.norm(b[l]) for l in range(L)]
            shifts.append(1 - np.mean(cos))
    return dict(js_bits=js, mean_js_bits=float(np.mean(js)), mean_shift=float(np.mean(shifts)))


def case(name, da, db, ta, tb):
    A, B = read_analysis(da), read_analysis(db)
    bidx = {p: i for i, p in enumerate(B["ids"])}
    shared = [(i, bidx[p]) for i, p in enumerate(A["ids"]) if p in bidx]
    ia = [s[0] for s in shared]
    ib = [s[1] for s in shared]
    sa, sb = A["sig"][ia], B["sig"][ib]
    cats = [A["cats"][i] for i in ia]
    names = sorted(set(cats))
    labels = [names.index(c) for c in cats]
    SA, SB = similarity(sa, A["L"], A["E"]), similarity(sb, B["L"], B["E"])
    out = dict(a=da, b=db, shared=len(shared),
               spearman=spear(upper(SA), upper(SB)),
               mantel=mantel(SA, SB),
               cka=cka(sa, sb),
               per_layer=dict(
                   cka=[[cka(sa[:, l * A["E"]:(l + 1) * A["E"]], sb[:, m * B["E"]:(m + 1) * B["E"]])
                         for m in range(B["L"])] for l in range(A["L"])],
                   rsa=[[spear(upper(layer_cos(sa, l, A["E"])), upper(layer_cos(sb, m, B["E"])))
                         for m in range(B["L"])] for l in range(A["L"])]),
               cohens_d_shared=[overall_d(SA, labels), overall_d(SB, labels)],
               per_category=[dict(category=c, n=labels.count(k),
                                  d_a=category_d(SA, labels, k), d_b=category_d(SB, labels, k))
                             for k, c in enumerate(names)],
               sim_a_upper_sum=float(upper(SA).sum()))
    same = (A["L"], A["E"], A["layers"]) == (B["L"], B["E"], B["layers"])
    if same:
        m = match(sa, sb, A["L"], A["E"], A["layers"])
        out["matching"] = m
        tt = A["res"]["settings"]["token_types"]
        oa, ca = trace_counts(ta, A["L"], A["E"], tt)
        ob, cb = trace_counts(tb, B["L"], B["E"], B["res"]["settings"]["token_types"])
        out["drift"] = dict(
            unmatched=drift(oa, ca, ob, cb, None, A["L"], A["E"]),
            matched=drift(oa, ca, ob, cb, [x["assignment"] for x in m], A["L"], A["E"]))
    else:
        out["matching"] = None
        out["drift"] = None
    return name, out


def multi(name, dirs):
    """The N x N matrices (RSA Spearman, linear CKA; diagonal None) and each run's Cohen's d on
    the prompts shared by every run, in the first run's order."""
    runs = [read_analysis(d) for d in dirs]
    common = set(runs[0]["ids"])
    for r in runs[1:]:
        common &= set(r["ids"])
    ids = [p for p in runs[0]["ids"] if p in common]
    sigs, sims = [], []
    for r in runs:
        idx = {p: i for i, p in enumerate(r["ids"])}
        sig = r["sig"][[idx[p] for p in ids]]
        sigs.append(sig)
        sims.append(similarity(sig, r["L"], r["E"]))
    cats = [runs[0]["cats"][runs[0]["ids"].index(p)] for p in ids]
    names = sorted(set(cats))
    labels = [names.index(c) for c in cats]
    n = len(runs)
    rsa = [[None] * n for _ in range(n)]
    ck = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                rsa[i][j] = spear(upper(sims[i]), upper(sims[j]))
                ck[i][j] = cka(sigs[i], sigs[j])
    return name, dict(runs=dirs, shared=len(ids), rsa=rsa, cka=ck,
                      cohens_d_shared=[overall_d(s, labels) for s in sims],
                      categories=[dict(category=c, n=labels.count(k)) for k, c in enumerate(names)])


def main():
    expected = dict(
        generator="tools/reference_crossmodel.py",
        numpy=np.__version__,
        cases=dict(case(*c) for c in CASES),
        multi=dict(multi(*m) for m in MULTI),
    )
    with open(os.path.join(FIX, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
