#!/usr/bin/env python3
"""Write the committed synthetic routing traces used by the statistics fidelity tests.

Every case goes to fixtures/stats/<case>/ as trace.jsonl + manifest.json. The traces are
simulated with numpy (seeded, deterministic) from a toy router:

    logit[token, l, e] = base[l, e] + strength_l * mu[c, l, e] + offset[i, l, e] + noise[token, l, e]

    base   ~ N(0, 0.5)    per-layer expert popularity shared by all prompts
    mu     ~ N(0, 1)      category-dependent bias (c = category of prompt i); strength_l = 0 for "null"
    offset ~ N(0, 0.6)    prompt-specific bias (within-category variation)
    noise  ~ N(0, 1)      per-token noise

The top_k experts by logit are selected (descending), and `weights` are the full-softmax
probabilities of those experts (no top-k renormalisation), rounded to float32 and written with
the shortest decimal that round-trips as float32 (readers must parse weights as float32, which
is what the Rust `RoutingRecord` does; tools/reference_stats.py does the same).

Record form (one line per prompt, token position, layer):
  {"prompt_id","category","layer","position","token_id","token_type","experts","weights"}
Counts form (paper_shape only; docs/DESIGN.md "Counts-mode trace lines"): one line per
(prompt, token_type) with L*E layer-major integer `counts` and `tokens`.

Prompts are written in a shuffled order (categories interleaved), so "prompt order = first
appearance in the trace" differs from sorted id order.

Usage:  /work/venvs/sci/bin/python tools/make_stats_traces.py [--out fixtures/stats]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

CATEGORIES4 = ["code", "math", "story", "factual"]


def f32_str(x: float) -> str:
    """Shortest decimal string that round-trips to the same float32."""
    return np.format_float_positional(np.float32(x), unique=True, trim="-")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def simulate(
    rng: np.random.Generator,
    categories: list[str],
    per_cat: int,
    L: int,
    E: int,
    k: int,
    strength: np.ndarray,
    prompt_tokens: tuple[int, int],
    gen_tokens: tuple[int, int],
    offset_sd: float = 0.6,
    base_sd: float = 0.5,
    no_prompt_tokens: set[str] | None = None,
):
    """Yield (prompt_id, category, token_type, position, token_id, experts[L,k], weights[L,k]).

    Prompts are yielded in a shuffled order; tokens in position order; each token carries all L layers.
    """
    base = rng.normal(0.0, base_sd, size=(L, E))
    mu = rng.normal(0.0, 1.0, size=(len(categories), L, E))
    prompts = [(f"{c}-{j + 1:02d}", ci) for ci, c in enumerate(categories) for j in range(per_cat)]
    order = rng.permutation(len(prompts))
    for idx in order:
        pid, ci = prompts[idx]
        offset = rng.normal(0.0, offset_sd, size=(L, E))
        tp = int(rng.integers(prompt_tokens[0], prompt_tokens[1] + 1))
        if no_prompt_tokens and pid in no_prompt_tokens:
            tp = 0
        tg = int(rng.integers(gen_tokens[0], gen_tokens[1] + 1))
        mean = base + strength[:, None] * mu[ci] + offset
        for pos in range(tp + tg):
            ttype = "prompt" if pos < tp else "generation"
            logits = mean + rng.normal(0.0, 1.0, size=(L, E))
            probs = softmax(logits)
            experts = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            weights = np.take_along_axis(probs, experts, axis=1)
            token_id = int(rng.integers(0, 50304))
            yield pid, categories[ci], ttype, pos, token_id, experts, weights


def record_lines(sim) -> list[str]:
    lines = []
    for pid, cat, ttype, pos, token_id, experts, weights in sim:
        for l in range(experts.shape[0]):
            ex = ",".join(str(int(e)) for e in experts[l])
            ws = ",".join(f32_str(w) for w in weights[l])
            lines.append(
                f'{{"prompt_id":"{pid}","category":"{cat}","layer":{l},"position":{pos},'
                f'"token_id":{token_id},"token_type":"{ttype}","experts":[{ex}],"weights":[{ws}]}}'
            )
    return lines


def counts_lines(sim, L: int, E: int) -> list[str]:
    agg: dict[tuple[str, str], dict] = {}
    order: list[tuple[str, str]] = []
    for pid, cat, ttype, _pos, _tid, experts, _w in sim:
        key = (pid, ttype)
        if key not in agg:
            agg[key] = {"category": cat, "tokens": 0, "counts": np.zeros((L, E), dtype=np.int64)}
            order.append(key)
        a = agg[key]
        a["tokens"] += 1
        for l in range(L):
            a["counts"][l, experts[l]] += 1
    lines = []
    for pid, ttype in order:
        a = agg[(pid, ttype)]
        counts = ",".join(str(int(v)) for v in a["counts"].reshape(-1))
        lines.append(
            f'{{"prompt_id":"{pid}","category":"{a["category"]}","token_type":"{ttype}",'
            f'"num_layers":{L},"num_experts":{E},"tokens":{a["tokens"]},"counts":[{counts}]}}'
        )
    return lines


def manifest(model: str, L: int, E: int, k: int, mode: str, seed: int, note: str) -> str:
    m = {
        "model": model,
        "num_layers": L,
        "num_experts": E,
        "top_k": k,
        "dtype": "float32",
        "generation": {"synthetic": True, "seed": seed},
        "tool_version": "tools/make_stats_traces.py",
        "capture_mode": mode,
        "note": note,
    }
    return json.dumps(m, indent=2) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures" / "stats"))
    args = ap.parse_args()
    out = Path(args.out)

    # planted: 40 prompts, 4 categories x 10, L=4, E=16, k=4, separable but noisy (d ~ 1-2).
    seed = 101
    rng = np.random.default_rng(seed)
    L, E, k = 4, 16, 4
    sim = simulate(rng, CATEGORIES4, 10, L, E, k, np.full(L, 0.45), (10, 30), (4, 12))
    write_atomic(out / "planted" / "trace.jsonl", "\n".join(record_lines(sim)) + "\n")
    write_atomic(
        out / "planted" / "manifest.json",
        manifest("synthetic-planted", L, E, k, "records", seed, "category bias 0.45 in every layer"),
    )

    # null: same shape, no category structure.
    seed = 202
    rng = np.random.default_rng(seed)
    sim = simulate(rng, CATEGORIES4, 10, L, E, k, np.zeros(L), (10, 30), (4, 12))
    write_atomic(out / "null" / "trace.jsonl", "\n".join(record_lines(sim)) + "\n")
    write_atomic(
        out / "null" / "manifest.json",
        manifest("synthetic-null", L, E, k, "records", seed, "no category structure"),
    )

    # paper_shape: 80 prompts, L=16, E=64, k=8, strength increasing with depth; counts mode.
    seed = 303
    rng = np.random.default_rng(seed)
    L, E, k = 16, 64, 8
    strength = np.linspace(0.02, 0.28, L)
    sim = simulate(rng, CATEGORIES4, 20, L, E, k, strength, (12, 80), (32, 32), offset_sd=0.5)
    write_atomic(out / "paper_shape" / "trace.jsonl", "\n".join(counts_lines(sim, L, E)) + "\n")
    write_atomic(
        out / "paper_shape" / "manifest.json",
        manifest(
            "synthetic-paper-shape", L, E, k, "counts", seed,
            "category bias strength linspace(0.02, 0.28, 16) over layers; 32 generation tokens",
        ),
    )

    # weighted_small: 10 prompts, 2 categories x 5, L=2, E=6, k=2, few tokens. story-05 has no
    # prompt tokens, so with --token-types prompt it is dropped (and its category then has 4 < 5
    # prompts, so logreg_5fold is skipped).
    seed = 404
    rng = np.random.default_rng(seed)
    L, E, k = 2, 6, 2
    sim = simulate(
        rng, ["code", "story"], 5, L, E, k, np.full(L, 0.8), (3, 8), (2, 5),
        no_prompt_tokens={"story-05"},
    )
    write_atomic(out / "weighted_small" / "trace.jsonl", "\n".join(record_lines(sim)) + "\n")
    write_atomic(
        out / "weighted_small" / "manifest.json",
        manifest(
            "synthetic-weighted-small", L, E, k, "records", seed,
            "tiny case for --weighted and --token-types prompt; story-05 has only generation tokens",
        ),
    )


if __name__ == "__main__":
    main()
