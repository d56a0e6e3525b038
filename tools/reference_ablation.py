#!/usr/bin/env python3
"""numpy reference of the deterministic parts of the expert ablation statistics
(`crates/stats/src/ablation.rs`, docs/statistics.md "Causal expert ablation"):
signature contrast, characteristic experts (per-layer and global budgets), load bins, and
per-prompt effects (ΔNLL, top-1 agreement, routing changed, Jaccard).
The seeded parts (control draws, bootstrap, permutation) use moe-xray's ChaCha streams and are
tested for their properties in Rust instead.

Inputs are drawn here (numpy, seeded) and written with the expected values to
fixtures/ablation/reference.json; `crates/stats/tests/ablate_reference.rs` checks them.
Usage: /work/venvs/sci/bin/python tools/reference_ablation.py [--out fixtures/ablation]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
L, E, K = 3, 8, 2


def contrast(sigs, labels, ncat):
    means = np.stack([sigs[labels == c].mean(axis=0) for c in range(ncat)])
    out = np.empty_like(means)
    for c in range(ncat):
        others = [d for d in range(ncat) if d != c]
        out[c] = means[c] - means[others].mean(axis=0)
    return out


def rank_desc(values, offset=0):
    # larger first, ties to the lower index (stable sort of -values)
    return [int(i) + offset for i in np.argsort(-values, kind="stable")]


def per_layer(c_row, n):
    return [sorted(int(e) for e in rank_desc(c_row[l * E:(l + 1) * E])[:n]) for l in range(L)]


def global_budget(c_row, n, cap):
    out = [[] for _ in range(L)]
    total = n * L
    taken = 0
    for i in rank_desc(c_row):
        if taken == total:
            break
        l = i // E
        if len(out[l]) < cap:
            out[l].append(i % E)
            taken += 1
    return [sorted(v) for v in out]


def load_bins(load, bins):
    order = np.argsort(load, kind="stable")
    b = np.empty(len(load), dtype=int)
    for r, i in enumerate(order):
        b[i] = r * bins // len(load)
    return [int(x) for x in b]


def effect(base, abl):
    dn = float(np.mean(abl["nll"]) - np.mean(base["nll"]))
    agree = float(np.mean(np.array(base["argmax"]) == np.array(abl["argmax"])))
    a = np.array(base["routes"]).reshape(-1, K)
    b = np.array(abl["routes"]).reshape(-1, K)
    changed, jac = 0, 0.0
    for x, y in zip(a, b):
        inter = len(set(x) & set(y))
        changed += inter != K
        jac += inter / len(set(x) | set(y))
    return {"delta_nll": dn, "agreement": agree, "routing_changed": changed / len(a), "jaccard": jac / len(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "ablation"))
    out = Path(ap.parse_args().out)
    rng = np.random.default_rng(19)
    ncat, per = 3, 4
    labels = np.repeat(np.arange(ncat), per)
    counts = rng.integers(0, 6, size=(ncat * per, L * E)).astype(float)
    counts[:, 0] += 1  # every layer of every prompt has routing
    counts[:, E] += 1
    counts[:, 2 * E] += 1
    # signatures: per layer normalised
    sigs = counts.reshape(-1, L, E)
    sigs = (sigs / sigs.sum(axis=2, keepdims=True)).reshape(-1, L * E)
    con = contrast(sigs, labels, ncat)
    load = sigs.mean(axis=0)
    prompts = []
    for _ in range(4):
        T, R = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        base = {"nll": rng.exponential(2.0, T).tolist(), "argmax": rng.integers(0, 5, T).tolist(),
                "routes": np.concatenate([rng.choice(E, K, replace=False) for _ in range(R)]).tolist()}
        abl = {"nll": (np.array(base["nll"]) + rng.normal(0.3, 0.5, T)).tolist(),
               "argmax": [a if rng.random() < 0.6 else int(rng.integers(0, 5)) for a in base["argmax"]],
               "routes": [int(e) for r in np.array(base["routes"]).reshape(-1, K)
                          for e in (r if rng.random() < 0.5 else rng.choice(E, K, replace=False))]}
        prompts.append({"base": base, "ablated": abl, "expected": effect(base, abl)})
    doc = {
        "num_layers": L, "num_experts": E, "top_k": K, "num_categories": ncat,
        "labels": labels.tolist(), "counts": counts.tolist(),
        "expected": {
            "contrast": con.tolist(),
            "per_layer": {str(n): [per_layer(con[c], n) for c in range(ncat)] for n in (1, 2, 3)},
            "global": {str(n): [global_budget(con[c], n, E - K) for c in range(ncat)] for n in (1, 2)},
            "load": load.tolist(),
            "load_bins": {str(b): [load_bins(load[l * E:(l + 1) * E], b) for l in range(L)] for b in (1, 3, 4)},
        },
        "prompts": prompts,
        "numpy": np.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out / "reference.json")


if __name__ == "__main__":
    main()
