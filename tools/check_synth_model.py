#!/usr/bin/env python3
"""Prove that a `moe-xray synth-model` checkpoint of any supported family loads in Hugging Face transformers,
and show its routing.

Loads DIR with `AutoTokenizer` + `AutoModelForCausalLM.from_pretrained` (pinned transformers, see
tools/requirements-hf.txt; families: olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss,
granitemoe), runs a forward pass over each prompt with a forward hook on every MoE layer's router (`mlp.gate`,
`mlp.router` (GPT-OSS) or `block_sparse_moe.router` (Granite-MoE); every one returns
`(logits, weights, indices)`; dense layers have none), and prints, per MoE layer: the number of experts used,
max/mean expert load (selections of the most used expert divided by the mean over experts; 1.0 = perfectly
balanced) and the mean entropy of the softmax of the router logits. With categories in the prompt file it also
prints the mean within-category and across-category cosine similarity of per-prompt expert-count signatures (the
paper's statistic, unweighted, all tokens) so a `--planted` model's category structure is visible.

Exit status 1 if loading fails, a layer uses fewer than `--min-used-frac` of its experts or its max/mean load
exceeds `--max-load` (defaults 0.9 and 3.0); the thresholds are the "not collapsed" check.

MXFP4 checkpoints (`synth-model --quant mxfp4`: config.json's `quantization_config.quant_method` is "mxfp4")
are loaded with `quantization_config=Mxfp4Config(dequantize=True)`: transformers dequantises the
`*_blocks` / `*_scales` experts itself, in --dtype (float32 by default).

`--trace FILE` compares the routing with a moe-xray trace of the same prompts (routing records, e.g.
`moe-xray trace --model DIR --prompts P --exact --max-new-tokens 1 --out T` with P written by
`--write-prompts P`; FILE is T/trace.jsonl or T): for every prompt token and MoE layer the token id must
match and the expert set must equal transformers' top-k, except where transformers' own k-th and (k+1)-th
router logits are closer than `--tie-margin` (default 1e-4; reported, not failed). Any other difference
exits 1.

Usage: /work/venvs/hf/bin/python tools/check_synth_model.py DIR [--prompts FILE.jsonl] [--json]
       [--write-prompts FILE.jsonl] [--trace moe-xray-trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

DEFAULT_PROMPTS = [
    ("code-a", "code", "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    mid = len(items) // 2"),
    ("code-b", "code", "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }"),
    ("code-c", "code", "import json\nwith open('data.json') as f:\n    data = json.load(f)\nprint(data['name'])"),
    ("math-a", "math", "What is 128 / 16 + 3 * 7? Compute it step by step."),
    ("math-b", "math", "Solve 4x - 9 = 23 and then compute x^2 + 2x."),
    ("math-c", "math", "If 3 apples cost 1.20 dollars, how much do 10 apples cost?"),
    ("story-a", "story", "The old lighthouse keeper climbed the stairs as the storm rolled in over the sea."),
    ("story-b", "story", "Once upon a time, a curious girl found a map hidden inside her grandmother's book."),
    ("story-c", "story", "The dragon slept for a hundred years until a small boy knocked on the cave door."),
    ("factual-a", "factual", "What is the capital of Australia and when was it founded?"),
    ("factual-b", "factual", "Why do leaves change color in autumn?"),
    ("factual-c", "factual", "Who invented the telephone, and where was it first demonstrated?"),
]


def load_prompts(path: str | None):
    if path is None:
        return DEFAULT_PROMPTS
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                out.append((o["id"], o.get("category"), o["text"]))
            except (json.JSONDecodeError, KeyError) as e:
                sys.exit(f"{path}:{n}: {e}")
    return out


def compare_trace(path: str, hf_routes: dict, tie_margin: float) -> dict:
    """Compares moe-xray's routing records (token_type prompt) with transformers' on the same prompts."""
    p = Path(path)
    if p.is_dir():
        p = p / "trace.jsonl"
    got = {}
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                if o.get("token_type") != "prompt":
                    continue
                got[(o["prompt_id"], o["position"], o["layer"])] = (o.get("token_id"), sorted(o["experts"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                sys.exit(f"{p}:{n}: not a routing record: {e}")
    equal = near = bad = tok_bad = missing = 0
    examples = []
    for key, (tid, experts, gap) in sorted(hf_routes.items()):
        if key not in got:
            missing += 1
            continue
        mt, me = got[key]
        if mt is not None and mt != tid:
            tok_bad += 1
            if len(examples) < 5:
                examples.append(f"{key}: token {mt} in the trace, {tid} in transformers")
        elif me == experts:
            equal += 1
        elif gap < tie_margin:
            near += 1
        else:
            bad += 1
            if len(examples) < 5:
                examples.append(f"{key}: moe-xray {me}, transformers {experts} (gap {gap:.3g})")
    extra = len(set(got) - set(hf_routes))
    return {
        "trace": str(p), "compared": len(hf_routes) - missing, "equal": equal, "near_ties": near,
        "mismatches": bad, "token_mismatches": tok_bad, "missing": missing, "extra": extra,
        "examples": examples, "ok": bad == 0 and tok_bad == 0 and missing == 0 and extra == 0,
    }


def router_of(layer):
    """The router module of a decoder layer, or None for a dense layer."""
    for block_name, router_name in (("mlp", "gate"), ("mlp", "router"), ("block_sparse_moe", "router")):
        block = getattr(layer, block_name, None)
        router = getattr(block, router_name, None) if block is not None else None
        # a dense MLP's `gate_proj` is not a router; routers are the modules returning (logits, w, idx)
        if router is not None and type(router).__name__.endswith("Router"):
            return router
    return None


def main():
    ap = argparse.ArgumentParser(description="check a synthetic MoE checkpoint with transformers")
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", help="JSONL with id, category, text (default: 12 built-in prompts)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-load", type=float, default=3.0)
    ap.add_argument("--min-used-frac", type=float, default=0.9)
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    ap.add_argument("--write-prompts", help="write the prompts used as JSONL (id, category, text) and go on")
    ap.add_argument("--trace", help="moe-xray routing trace of the same prompts (trace.jsonl or its directory)")
    ap.add_argument("--tie-margin", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    d = Path(args.model_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    qc = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    extra = {}
    if qc.get("quant_method") == "mxfp4":
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=getattr(torch, args.dtype), **extra)
    model.eval()
    cfg = model.config
    routers = [(i, router_of(layer)) for i, layer in enumerate(model.model.layers)]
    moe_layers = [i for i, r in routers if r is not None]
    if not moe_layers:
        sys.exit(f"{d}: no MoE layer found in {type(model).__name__}")
    E = routers[moe_layers[0]][1].weight.shape[0]
    k = cfg.num_experts_per_tok
    L = len(moe_layers)
    prompts = load_prompts(args.prompts)
    if args.write_prompts:
        with open(args.write_prompts, "w") as f:
            for pid, cat, text in prompts:
                f.write(json.dumps({"id": pid, "category": cat, "text": text}) + "\n")
    # (prompt id, position, decoder layer) -> (token id, expert set, k-th minus (k+1)-th logit)
    hf_routes = {}

    captured: list = [None] * L

    def mk(j):
        def hook(mod, inp, out):
            logits, _w, idx = out
            captured[j] = (logits.detach().float(), idx.detach())

        return hook

    hs = [routers[i][1].register_forward_hook(mk(j)) for j, i in enumerate(moe_layers)]
    usage = np.zeros((L, E), dtype=np.int64)
    ent_sum = np.zeros(L)
    n_tok = 0
    sigs = []
    cats = []
    for pid, cat, text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            model(torch.tensor([ids]))
        sig = np.zeros((L, E))
        for l in range(L):
            logits, idx = captured[l]
            logits = logits.reshape(-1, E)
            top = torch.sort(logits, dim=-1, descending=True).values
            gaps = (top[:, k - 1] - top[:, k]).tolist() if k < E else [math.inf] * len(ids)
            for pos, (row, gap) in enumerate(zip(idx.reshape(-1, k).tolist(), gaps)):
                hf_routes[(pid, pos, moe_layers[l])] = (ids[pos], sorted(row), gap)
            p = torch.softmax(logits, -1)
            ent_sum[l] += float(-(p * torch.log(p.clamp_min(1e-30))).sum())
            for row in idx.reshape(-1, k).tolist():
                usage[l, row] += 1
                sig[l, row] += 1
        n_tok += len(ids)
        sigs.append(sig / sig.sum(axis=1, keepdims=True))
        cats.append(cat)
    for h in hs:
        h.remove()

    used = (usage > 0).sum(axis=1)
    load = usage.max(axis=1) / (usage.sum(axis=1) / E)
    ent = ent_sum / n_tok
    result = {
        "model_dir": str(d),
        "loaded_by": f"transformers {type(model).__name__}.from_pretrained",
        "model_type": cfg.model_type,
        "moe_layers": moe_layers,
        "num_experts": E,
        "top_k": k,
        "prompts": len(prompts),
        "tokens": n_tok,
        "experts_used": used.tolist(),
        "max_over_mean_load": [round(float(x), 3) for x in load],
        "mean_router_entropy": [round(float(x), 4) for x in ent],
        "max_entropy": round(math.log(E), 4),
    }
    if all(c is not None for c in cats) and len(set(cats)) > 1:
        v = [np.concatenate([s[l] / np.linalg.norm(s[l]) for l in range(L)]) / math.sqrt(L) for s in sigs]
        within, across = [], []
        for i, j in combinations(range(len(v)), 2):
            (within if cats[i] == cats[j] else across).append(float(v[i] @ v[j]))
        result["similarity_within_mean"] = round(float(np.mean(within)), 4)
        result["similarity_across_mean"] = round(float(np.mean(across)), 4)
    ok = bool((used >= args.min_used_frac * E).all() and (load <= args.max_load).all())
    result["not_collapsed"] = ok
    if qc:
        result["quantization"] = f"{qc.get('quant_method')} (loaded with Mxfp4Config(dequantize=True))"
    if args.trace:
        cmp = compare_trace(args.trace, hf_routes, args.tie_margin)
        result["trace_comparison"] = cmp
        ok = ok and cmp["ok"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{d}: loaded by transformers {type(model).__name__} ({cfg.model_type}); MoE layers {moe_layers}, "
            f"{E} experts, top-{k}; {len(prompts)} prompts, {n_tok} tokens"
        )
        print("layer  experts_used  max/mean_load  mean_entropy (max %.3f)" % math.log(E))
        for l in range(L):
            print(f"{moe_layers[l]:5d}  {used[l]:12d}  {load[l]:13.3f}  {ent[l]:12.4f}")
        if "similarity_within_mean" in result:
            print(
                f"signature similarity: within-category {result['similarity_within_mean']}, "
                f"across-category {result['similarity_across_mean']}"
            )
        print("routing not collapsed" if result["not_collapsed"] else "ROUTING COLLAPSED (see thresholds)")
        if "trace_comparison" in result:
            c = result["trace_comparison"]
            print(
                f"moe-xray trace {c['trace']}: {c['compared']} (token, layer) decisions compared, "
                f"{c['equal']} equal expert sets, {c['near_ties']} differ at near-ties (gap < {args.tie_margin}), "
                f"{c['mismatches']} mismatches, {c['token_mismatches']} token-id mismatches, "
                f"{c['missing']} missing -> {'OK' if c['ok'] else 'FAIL'}"
            )
            for m in c["examples"]:
                print("  ", m)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
