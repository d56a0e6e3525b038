#!/usr/bin/env python3
"""Synthetic counts-form traces for the map/merge scale run (docs/performance.md, "Session 7:
map/merge at scale"): PROMPTS prompts x TOKENS tokens, L layers x E experts, top-k K, split into
FILES files OUT/part-NNNN.jsonl.zst (zstd -3) with a manifest.json beside them.

Each (prompt, layer) row is a multinomial draw of TOKENS*K selections over E experts with
category-tilted probabilities (weight 1 + 0.5*[(e + l) % 4 == category % 4] times a per-prompt
lognormal jitter), so every layer sums to TOKENS*K as the trace reader checks. (The per-token
rule "k distinct experts" is not simulated; the cost of map/merge does not depend on it.)

Usage: python3 tools/make_scale_counts.py OUT [--prompts 1000000] [--files 4] [--seed 0]
Needs numpy and the zstd command.
"""
import argparse
import json
import os
import subprocess

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--categories", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    L, E, K, T = a.layers, a.experts, a.top_k, a.tokens
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump({"model": "synthetic-scale", "num_layers": L, "num_experts": E, "top_k": K,
                   "dtype": "float32", "generation": {"synthetic": True, "seed": a.seed},
                   "tool_version": "tools/make_scale_counts.py", "capture_mode": "counts"},
                  f, indent=2)
        f.write("\n")
    lut = [str(i) for i in range(T * K + 1)]
    e = np.arange(E)[None, :]
    l = np.arange(L)[:, None]
    per_file = (a.prompts + a.files - 1) // a.files
    batch = 2000
    for fi in range(a.files):
        lo, hi = fi * per_file, min(a.prompts, (fi + 1) * per_file)
        path = os.path.join(a.out, f"part-{fi:04d}.jsonl.zst")
        with open(path, "wb") as raw:
            z = subprocess.Popen(["zstd", "-3", "-q", "-c"], stdin=subprocess.PIPE, stdout=raw)
            rng = np.random.default_rng([a.seed, fi])
            for b0 in range(lo, hi, batch):
                b1 = min(hi, b0 + batch)
                ids = np.arange(b0, b1)
                cats = ids % a.categories
                tilt = ((e + l)[None, :, :] % 4 == (cats % 4)[:, None, None]).astype(float)
                w = (1.0 + 0.5 * tilt) * rng.lognormal(0.0, 0.3, size=(b1 - b0, L, E))
                p = w / w.sum(axis=2, keepdims=True)
                counts = rng.multinomial(T * K, p).reshape(b1 - b0, L * E)
                out = []
                for i, c, row in zip(ids, cats, counts.tolist()):
                    out.append(
                        f'{{"prompt_id":"p{i:07d}","category":"cat{c}","token_type":"prompt",'
                        f'"num_layers":{L},"num_experts":{E},"tokens":{T},"counts":['
                        + ",".join([lut[x] for x in row]) + "]}\n")
                z.stdin.write("".join(out).encode())
            z.stdin.close()
            if z.wait() != 0:
                raise SystemExit(f"zstd failed for {path}")
        print(path, hi - lo, "prompts")


if __name__ == "__main__":
    main()
