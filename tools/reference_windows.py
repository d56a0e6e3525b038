#!/usr/bin/env python3
"""Reference implementation (numpy / scikit-learn) of routing over time (`analyze --windows W`,
docs/statistics.md "Routing over time"), for the Rust test crates/stats/tests/windows_reference.rs.

Reads fixtures/stats/<case>/trace.jsonl (record form) and its folds.csv, and writes
fixtures/windows/<case>_w<W>.json.

Definitions (normative text in docs/statistics.md):
* Analysed prompts: those the main analysis keeps (every layer has a selected expert over the
  prompt and generated tokens).
* Generated token j of a prompt = its position minus the prompt's first generated position;
  window w = j // W. The windows are 0 .. ceil(longest generation / W) - 1.
* A window's counts: unweighted expert selections of its tokens per (layer, expert); a prompt is in
  the window only if every layer has a selection there. Prompt phase: prompt tokens only;
  generation phase: all generated tokens (same rule).
* similarity: sim = mean per-layer cosine of the counts, pairs i<j, within / across category,
  std ddof=1, Cohen's d with pooled SD; skipped when fewer than 2 categories have >= 2 prompts.
* classifier: folds.csv restricted to the window's prompts; per fold
  StandardScaler + LogisticRegression(C=1, lbfgs, tol=1e-12) on the per-layer-normalised
  signatures (exactly logreg_5fold of tools/reference_stats.py) over the categories present in
  the window; skipped when a present category has fewer prompts than folds or a fold is empty.
  accuracy_mean / accuracy_std (ddof=0) over folds; chance = majority rate.
* drift[w]: over prompts in windows w and w+1, the sim of their two window signatures; mean and
  std (ddof=1). phase_drift: the same between prompt and generation phases.

Usage:
  /work/venvs/sci/bin/python tools/reference_windows.py            # planted and null, W = 4 and 3
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_stats import (  # noqa: E402
    FIXTURES,
    N_FOLDS,
    ROOT,
    cohens_d,
    lr_pipeline,
    read_folds,
    write_atomic,
)

OUT = ROOT / "fixtures" / "windows"


def read(case: str):
    d = FIXTURES / case
    man = json.loads((d / "manifest.json").read_text())
    L, E = man["num_layers"], man["num_experts"]
    order, cats, recs = [], {}, []
    with open(d / "trace.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            pid = r["prompt_id"]
            if pid not in cats:
                order.append(pid)
                cats[pid] = r.get("category")
            recs.append(r)
    return L, E, order, cats, recs, read_folds(d / "folds.csv")


def unit(S):
    L = S.shape[1]
    n = np.linalg.norm(S, axis=2, keepdims=True)
    return (S / n).reshape(S.shape[0], -1) / np.sqrt(L)


def stats(ids, C, cats, folds, tokens):
    """ids: prompts of the slot (all layers non-empty); C: (n, L, E) counts."""
    n = len(ids)
    out = {"num_prompts": n, "tokens": int(tokens)}
    labels = np.array([cats[p] for p in ids])
    present, sizes = np.unique(labels, return_counts=True) if n else (np.array([]), np.array([]))
    if (sizes >= 2).sum() < 2:
        why = "too few prompts"
        out["similarity"] = {"skipped": why}
        out["classifier"] = {"skipped": why}
        return out
    V = unit(C)
    sim = V @ V.T
    iu, ju = np.triu_indices(n, k=1)
    vals = sim[iu, ju]
    same = labels[iu] == labels[ju]
    w, a = vals[same], vals[~same]
    out["similarity"] = {
        "within": {"n": int(w.size), "mean": float(w.mean()), "std": float(w.std(ddof=1))},
        "across": {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1))},
        "cohens_d": cohens_d(w, a),
    }
    fold = np.array([folds[p] for p in ids])
    k = int(max(folds.values())) + 1
    if sizes.min() < k or any((fold == f).sum() == 0 for f in range(k)):
        out["classifier"] = {"skipped": "too few prompts per category or fold"}
        return out
    X = (C / C.sum(axis=2, keepdims=True)).reshape(n, -1)
    accs = []
    for f in range(k):
        te = fold == f
        pipe = lr_pipeline(1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.fit(X[~te], labels[~te])
        accs.append(float((pipe.predict(X[te]) == labels[te]).mean()))
    out["classifier"] = {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs, ddof=0)),
        "chance": float(sizes.max() / n),
        "fold_accuracies": accs,
        "n_folds": k,
    }
    return out


def drift(a_ids, A, b_ids, B):
    va, vb = unit(A), unit(B)
    pos = {p: i for i, p in enumerate(b_ids)}
    sims = [float(va[i] @ vb[pos[p]]) for i, p in enumerate(a_ids) if p in pos]
    s = np.array(sims)
    return {
        "num_prompts": len(sims),
        "mean": float(s.mean()) if s.size else None,
        "std": float(s.std(ddof=1)) if s.size > 1 else None,
    }


def compute(case: str, W: int):
    L, E, order, cats, recs, folds = read(case)
    total = {p: np.zeros((L, E)) for p in order}
    first = {}
    last = {}
    for r in recs:
        for e in r["experts"]:
            total[r["prompt_id"]][r["layer"], e] += 1
        if r["token_type"] == "generation":
            p, pos = r["prompt_id"], r["position"]
            first[p] = min(first.get(p, pos), pos)
            last[p] = max(last.get(p, pos), pos)
    kept = [p for p in order if (total[p].sum(axis=1) > 0).all()]
    longest = max(last[p] - first[p] + 1 for p in first if p in kept)
    nwin = -(-longest // W)
    slots = {}  # (prompt, slot) -> counts; slot: window index, "prompt", "generation"
    toks = {}
    for r in recs:
        p = r["prompt_id"]
        if p not in kept:
            continue
        if r["token_type"] == "prompt":
            targets = ["prompt"]
        else:
            targets = [(r["position"] - first[p]) // W, "generation"]
        for t in targets:
            c = slots.setdefault((p, t), np.zeros((L, E)))
            for e in r["experts"]:
                c[r["layer"], e] += 1
            if r["layer"] == 0:
                toks[(p, t)] = toks.get((p, t), 0) + 1

    def slot(t):
        ids = [p for p in kept if (p, t) in slots and (slots[(p, t)].sum(axis=1) > 0).all()]
        C = np.array([slots[(p, t)] for p in ids]).reshape(len(ids), L, E)
        return ids, C, sum(toks.get((p, t), 0) for p in ids)

    res = {"case": case, "window_tokens": W, "max_generated": int(longest)}
    ps, gs = slot("prompt"), slot("generation")
    res["prompt_phase"] = stats(ps[0], ps[1], cats, folds, ps[2])
    res["generation_phase"] = stats(gs[0], gs[1], cats, folds, gs[2])
    res["phase_drift"] = drift(ps[0], ps[1], gs[0], gs[1])
    wins = [slot(w) for w in range(nwin)]
    res["windows"] = []
    for w, s in enumerate(wins):
        st = stats(s[0], s[1], cats, folds, s[2])
        res["windows"].append({"start": w * W, "end": (w + 1) * W, **st})
    res["drift"] = [drift(a[0], a[1], b[0], b[1]) for a, b in zip(wins, wins[1:])]
    return res


def main():
    for case in ["planted", "null"]:
        for W in [4, 3]:
            res = compute(case, W)
            path = OUT / f"{case}_w{W}.json"
            write_atomic(path, json.dumps(res, indent=1) + "\n")
            print(f"wrote {path.relative_to(ROOT)}: {len(res['windows'])} windows")
    assert N_FOLDS == 5


if __name__ == "__main__":
    main()
