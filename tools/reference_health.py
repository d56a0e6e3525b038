#!/usr/bin/env python3
"""Reference values for `moe-xray health` / `moe-xray compare` (crates/health).

Generates small seeded fixtures under fixtures/health/ and the expected statistics computed
independently with numpy/scipy (pinned in tools/requirements-health.txt):

  fixtures/health/run_a/{trace.jsonl,manifest.json}  records with `probs` (L=3, E=8, k=2, 12 prompts)
  fixtures/health/run_b/{trace.jsonl,manifest.json}  same prompts routed by a perturbed router,
                                                     one prompt missing and one extra
  fixtures/health/run_a_counts/trace.jsonl           run A converted to counts mode
  fixtures/health/run_e6/trace.jsonl                 a run with E=6 (shape mismatch)
  fixtures/health/expected.json                      reference statistics

Run:  /work/venvs/sci/bin/python tools/reference_health.py
Definitions: docs/health.md. The probabilities are generated in float32 and written as the exact
float32 values (as decimal doubles), so Rust (which stores f32) and this script see the same numbers.
"""
import json
import os
import sys

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as sp_entropy

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "health")
L, E, K = 3, 8, 2
CATS = ["code", "math", "prose"]


def softmax32(z):
    z = z - z.max()
    p = np.exp(z)
    return (p / p.sum()).astype(np.float32)


def topk(p, k):
    # descending probability, ties: lower index first (stable sort of -p), as torch.topk
    return [int(i) for i in np.argsort(-p.astype(np.float64), kind="stable")[:k]]


def gen_run(seed, prompt_ids, ne, bias_shift, with_probs=True):
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(1234)  # category biases shared by both runs
    bias = {c: base.normal(0, 1.5, size=(L, ne)) for c in CATS}
    for c in CATS:
        bias[c][L - 1, ne - 1] = -40.0  # a dead expert (never in the top-k) in the last layer
    recs = []
    for pid in prompt_ids:
        cat = pid.split("-")[0]
        n_prompt = int(rng.integers(3, 7))
        n_gen = int(rng.integers(1, 4))
        for pos in range(n_prompt + n_gen):
            tt = "prompt" if pos < n_prompt else "generation"
            for layer in range(L):
                z = bias[cat][layer] + bias_shift[layer] + rng.normal(0, 1.0, size=ne)
                p = softmax32(z)
                ex = topk(p, K)
                r = {"prompt_id": pid, "category": cat, "layer": layer, "position": pos,
                     "token_id": int(rng.integers(0, 1000)), "token_type": tt, "experts": ex,
                     "weights": [float(p[e]) for e in ex]}
                if with_probs:
                    r["probs"] = [float(x) for x in p]
                recs.append(r)
    return recs


def write_run(name, recs, ne, manifest=True):
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "trace.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    if manifest:
        m = {"model": "reference-health-synthetic", "num_layers": L, "num_experts": ne, "top_k": K,
             "dtype": "f32", "capture_mode": "events", "tool_version": "reference"}
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(m, f, indent=1)
            f.write("\n")


def counts_lines(recs, ne):
    out = {}
    order = []
    for r in recs:
        key = (r["prompt_id"], r["token_type"])
        if key not in out:
            out[key] = {"prompt_id": r["prompt_id"], "category": r["category"],
                        "token_type": r["token_type"], "num_layers": L, "num_experts": ne,
                        "tokens": 0, "counts": [0] * (L * ne), "_pos": set()}
            order.append(key)
        o = out[key]
        o["_pos"].add(r["position"])
        for e in r["experts"]:
            o["counts"][r["layer"] * ne + e] += 1
    lines = []
    for key in order:
        o = out[key]
        o["tokens"] = len(o.pop("_pos"))
        lines.append(o)
    return lines


def gini_pairwise(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) * x.sum()))


def load_stats(recs, ne):
    load = np.zeros((L, ne))
    tokens = np.zeros(L, dtype=np.int64)
    co = np.zeros((L, ne, ne), dtype=np.int64)
    ent = [[] for _ in range(L)]
    mar = [[] for _ in range(L)]
    for r in recs:
        l = r["layer"]
        tokens[l] += 1
        ex = r["experts"]
        for i in ex:
            load[l, i] += 1
            for j in ex:
                co[l, i, j] += 1
        if "probs" in r:
            p = np.array(r["probs"], dtype=np.float64)
            p = p / p.sum()
            ent[l].append(float(sp_entropy(p)))
            s = np.sort(p)[::-1]
            k = len(ex)
            mar[l].append(float(s[k - 1] - s[k]))
    layers = []
    for l in range(L):
        x = load[l]
        share = x / x.sum()
        layer = {
            "layer": l, "tokens": int(tokens[l]), "load": x.tolist(),
            "entropy_nats": float(sp_entropy(share)),
            "normalized_entropy": float(sp_entropy(share) / np.log(ne)),
            "gini": gini_pairwise(x),
            "jain": float(x.sum() ** 2 / (ne * (x ** 2).sum())),
            "max_mean_ratio": float(x.max() / x.mean()),
            "dead_experts": [int(e) for e in np.where(x == 0)[0]],
            "coactivation": co[l].tolist(),
        }
        if ent[l]:
            layer["router_entropy_mean"] = float(np.mean(ent[l]))
            layer["router_entropy_std"] = float(np.std(ent[l]))
            layer["margin_mean"] = float(np.mean(mar[l]))
            layer["margin_std"] = float(np.std(mar[l]))
            layer["margin_min"] = float(np.min(mar[l]))
        layers.append(layer)
    return load, layers


def prompt_counts(recs, ne):
    out = {}
    cat = {}
    for r in recs:
        c = out.setdefault(r["prompt_id"], np.zeros((L, ne)))
        cat[r["prompt_id"]] = r["category"]
        for e in r["experts"]:
            c[r["layer"], e] += 1
    return out, cat


def main():
    ids_a = [f"{c}-{i:02d}" for c in CATS for i in range(4)]
    ids_b = [p for p in ids_a if p != "prose-03"] + ["math-99"]
    shift_b = np.random.default_rng(99).normal(0, 0.8, size=(L, E))
    recs_a = gen_run(1, ids_a, E, np.zeros((L, E)))
    recs_b = gen_run(2, ids_b, E, shift_b)
    recs_e6 = gen_run(3, ids_a[:3], 6, np.zeros((L, 6)), with_probs=False)
    write_run("run_a", recs_a, E)
    write_run("run_b", recs_b, E)
    write_run("run_e6", recs_e6, 6)
    d = os.path.join(ROOT, "run_a_counts")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "trace.jsonl"), "w") as f:
        for o in counts_lines(recs_a, E):
            f.write(json.dumps(o, separators=(",", ":")) + "\n")

    load_a, layers_a = load_stats(recs_a, E)
    load_b, layers_b = load_stats(recs_b, E)
    # prompt-only variant (token type filter)
    _, layers_a_prompt = load_stats([r for r in recs_a if r["token_type"] == "prompt"], E)

    js = []
    for l in range(L):
        d_bits = jensenshannon(load_a[l], load_b[l], base=2) ** 2
        d_nats = jensenshannon(load_a[l], load_b[l]) ** 2
        js.append({"layer": l, "js_bits": float(d_bits), "js_nats": float(d_nats)})
    pa, cat_a = prompt_counts(recs_a, E)
    pb, _ = prompt_counts(recs_b, E)
    shifts = []
    for pid in ids_a:
        if pid not in pb:
            continue
        cos = [float(pa[pid][l] @ pb[pid][l] / (np.linalg.norm(pa[pid][l]) * np.linalg.norm(pb[pid][l])))
               for l in range(L)]
        sim = float(np.mean(cos))
        shifts.append({"prompt_id": pid, "category": cat_a[pid], "similarity": sim, "shift": 1 - sim})
    cats = []
    for c in sorted({s["category"] for s in shifts}):
        v = np.array([s["shift"] for s in shifts if s["category"] == c])
        cats.append({"category": c, "n": len(v), "mean_shift": float(v.mean()),
                     "std_shift": float(v.std(ddof=1)) if len(v) > 1 else None})
    expected = {
        "generator": "tools/reference_health.py",
        "versions": {"numpy": np.__version__, "scipy": __import__("scipy").__version__,
                     "python": sys.version.split()[0]},
        "num_layers": L, "num_experts": E, "top_k": K,
        "health_a": layers_a,
        "health_a_prompt_only": layers_a_prompt,
        "health_b": layers_b,
        "compare": {"per_layer": js, "mean_js_bits": float(np.mean([j["js_bits"] for j in js])),
                    "max_js_bits": float(np.max([j["js_bits"] for j in js])),
                    "prompt_shifts": shifts, "category_shifts": cats,
                    "shared_prompts": len(shifts)},
    }
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print("wrote", os.path.normpath(ROOT))


if __name__ == "__main__":
    main()
