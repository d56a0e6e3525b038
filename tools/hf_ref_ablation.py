#!/usr/bin/env python3
"""Reference fixture for moe-xray's expert ablation (`moe-xray ablate`, issue 19): the same expert
mask applied in Hugging Face transformers by a forward hook on every MoE layer's router.

For each committed f32 fixture model (an OLMoE one: softmax-then-top-k; a Granite-MoE one:
top-k-then-softmax) and a fixed mask per MoE layer, the hook replaces the router's output by the
router recomputed with the masked experts' logits set to -inf *before* the family's rule:

- OLMoE (`OlmoeTopKRouter`): logits = x·Wᵀ; masked logits -inf; float32 softmax; torch.topk; (no
  renormalisation: norm_topk_prob is false in the fixture) -> weights = the top-k probabilities.
- Granite-MoE (`GraniteMoeTopKRouter`): logits = x·Wᵀ (float); masked logits -inf; topk; softmax
  over the k chosen logits.

Each prompt is scored teacher-forced on its committed greedy continuation (`expected_generations`
of the unablated model): one forward over prompt + continuation[:-1]; the logits that predict each
continuation token and every fed token's masked routing (experts in topk order) are recorded.
The Rust test `crates/model/tests/ablate_fidelity.rs` asserts logits within 1e-5 and identical
routing. Without the mask the hook must reproduce the model's own logits bit for bit (checked here).

Two more families, one file each (fixtures/ablation/hf_masked_<model>.json, 2 prompts, logits
rounded to 9 significant digits, which round-trip float32):

- DeepSeek-V3 (`DeepseekV3TopkRouter`: sigmoid scores, correction bias, group-limited choice):
  masked logits -inf (score 0) and the masked experts' choice values (score + bias) -inf *before*
  the group scores (sum of each group's two best choice values), so a group left with one
  unmasked expert scores -inf, then transformers' own group top-k, the -inf fill of the other
  groups and the top-k; weights = the unmasked experts' scores, normalised, times the scaling
  factor. The masks keep at least two unmasked experts in topk_group groups, so no choice
  between -inf values (where torch.topk's tie order is undefined) is ever made.
- GPT-OSS (`GptOssTopKRouter`): logits = x·Wᵀ + b; masked logits -inf; topk; softmax over the k.

Output: fixtures/ablation/hf_masked.json (small: 2 models x 2 prompts) and
fixtures/ablation/hf_masked_{deepseekv3,gptoss}-tiny-f32.json.
Usage: /work/venvs/hf/bin/python tools/hf_ref_ablation.py [--out fixtures/ablation] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["code-01", "math-01"]
# decoder layer -> masked experts (the fixtures have 8 experts, top-2)
MODELS = {
    "olmoe-tiny-mha-f32": {"kind": "softmax_topk", "mask": {0: [1, 5], 1: [0, 2, 3, 7]}},
    "granitemoe-tiny-f32": {"kind": "topk_softmax", "mask": {0: [2], 1: [0, 1, 4, 6, 7], 2: [3, 5]}},
}
# One file each (16 experts in 4 groups, top-2 groups, top-4; 12 experts, top-3). DeepSeek-V3's
# decoder layer 0 is dense. Layer 2 leaves group 0 one unmasked expert (group score -inf).
EXTRA_MODELS = {
    "deepseekv3-tiny-f32": {"kind": "deepseek_v3", "mask": {1: [0, 5, 10], 2: [0, 1, 2, 9]}},
    "gptoss-tiny-f32": {"kind": "topk_softmax_bias", "mask": {0: [0, 4], 1: [1, 2, 3, 5, 7, 11], 2: [6]}},
}


# bf16 checkpoints (fixtures/hf, written by tools/hf_reference.py / hf_ref_deepseek_gptoss.py), run in bf16: one
# file each, compared by near ties (see run_bf16). OLMoE: 12 experts top-3, 4 layers; GPT-OSS: gptoss-tiny-f32's
# mask.
BF16_MODELS = {
    "olmoe-tiny-bf16": {"kind": "softmax_topk", "mask": {0: [1, 5], 1: [0, 2, 3, 7], 2: [4], 3: [6, 9, 10, 11]}},
    "gptoss-tiny-bf16": {"kind": "topk_softmax_bias", "mask": {0: [0, 4], 1: [1, 2, 3, 5, 7, 11], 2: [6]}},
}


def router_of(model, layer):
    """The router module of a MoE decoder layer (None for a dense one)."""
    mlp = model.model.layers[layer].mlp if hasattr(model.model.layers[layer], "mlp") else None
    if mlp is not None and hasattr(mlp, "gate"):
        return mlp.gate
    if mlp is not None and hasattr(mlp, "router"):
        return mlp.router
    if mlp is not None:
        return None
    return model.model.layers[layer].block_sparse_moe.router


def deepseek_v3_masked(module, x, mask):
    """DeepseekV3TopkRouter.forward with the masked experts' choice values -inf (see the header).
    Returns (logits, weights, indices) with the indices in descending choice order."""
    x = x.view(-1, module.hidden_dim)
    logits = F.linear(x.type(torch.float32), module.weight.type(torch.float32))
    logits = logits.masked_fill(mask, float("-inf"))
    scores = logits.sigmoid()
    choice = (scores + module.e_score_correction_bias).masked_fill(mask, float("-inf"))
    per = module.num_experts // module.num_group
    group_scores = choice.view(-1, module.num_group, per).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=module.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, module.num_group, per).reshape(-1, module.num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    top, idx = torch.topk(choice, k=module.top_k, dim=-1, sorted=True)
    assert torch.isfinite(top).all(), "a choice between -inf values: change the mask"
    w = scores.gather(1, idx)
    if module.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, w * module.routed_scaling_factor, idx


class MaskHook:
    """Forward hook replacing a router's (logits, weights, indices) by the masked router. `values`, when
    given, receives the masked ranking values per call (softmax_topk: the f32 probabilities; the top-k-first
    kinds: the masked logits, as float32), for explaining bf16 near ties."""

    def __init__(self, kind: str, masked: list[int], num_experts: int, top_k: int, record: list, values=None):
        self.kind, self.top_k, self.record, self.values = kind, top_k, record, values
        self.force = None  # calibration only: experts per token to use instead of the top-k (run_bf16)
        self.mask = torch.zeros(num_experts, dtype=torch.bool)
        self.mask[masked] = True

    def __call__(self, module, args, output):
        x = args[0].reshape(-1, module.weight.shape[1])
        if self.kind == "deepseek_v3":
            logits, w, idx = deepseek_v3_masked(module, x, self.mask)
            self.record.append(idx.tolist())
            if not self.mask.any():
                # transformers picks with sorted=False (and normalises in that order): the same
                # experts, weights equal to rounding; the model's own output is kept.
                oi, order = output[2].sort(dim=-1)
                ni, norder = idx.sort(dim=-1)
                assert torch.equal(oi, ni), "unmasked hook differs (experts)"
                assert torch.allclose(output[1].gather(1, order), w.gather(1, norder), rtol=1e-6, atol=0), \
                    "unmasked hook differs (weights)"
                return output
            return (logits, w, idx)
        if self.kind == "topk_softmax_bias":
            logits = F.linear(x, module.weight, module.bias)
            masked = logits.masked_fill(self.mask, float("-inf"))
            top, idx = torch.topk(masked, self.top_k, dim=-1)
            if self.force is not None:
                idx = torch.tensor(self.force)
                top = masked.gather(1, idx)
            w = torch.softmax(top, dim=1, dtype=top.dtype)
            if not self.mask.any():
                assert torch.equal(idx, output[2]) and torch.equal(w, output[1]), "unmasked hook differs"
            self.record.append(idx.tolist())
            if self.values is not None:
                self.values.append(masked.float().tolist())
            return (logits, w, idx)
        logits = F.linear(x, module.weight)
        if self.kind == "softmax_topk":
            masked = logits.masked_fill(self.mask, float("-inf"))
            probs = torch.softmax(masked, dtype=torch.float, dim=-1)
            w, idx = torch.topk(probs, self.top_k, dim=-1)
            if self.force is not None:
                idx = torch.tensor(self.force)
                w = probs.gather(1, idx)
            w = w.to(logits.dtype)
        else:
            masked = logits.float().masked_fill(self.mask, float("-inf"))
            top, idx = masked.topk(self.top_k, dim=-1)
            w = torch.softmax(top, dim=-1).type_as(x)
        if not self.mask.any():
            assert torch.equal(idx, output[2]) and torch.equal(w, output[1]), "unmasked hook differs"
        self.record.append(idx.tolist())
        if self.values is not None:
            self.values.append((probs if self.kind == "softmax_topk" else masked).float().tolist())
        return (logits, w, idx)


def load(name: str, dtype):
    d = ROOT / "fixtures" / "hf" / name
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
    model.config._attn_implementation = "eager"
    try:
        model.set_experts_implementation("eager")
    except AttributeError:
        model.config._experts_implementation = "eager"
    model.eval()
    return model


def masked_forward(model, spec, moe, ne, k, fed, masked=True, values=False, force=None):
    """One teacher-forced forward over `fed` with the hooks (mask applied or not): (logits [T, V], routing
    {layer: [experts per token]}, ranking values {layer: [values per token]} when `values`). `force`
    ({layer: experts per token}) imposes the experts (weights by the family's rule over them)."""
    records = {l: [] for l in moe}
    vals = {l: [] for l in moe} if values else None
    hooks = []
    for l in moe:
        m = spec["mask"].get(l, []) if masked else []
        hook = MaskHook(spec["kind"], m, ne, k, records[l], vals[l] if values else None)
        hook.force = force[l] if force else None
        hooks.append(router_of(model, l).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([fed])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, {l: records[l][0] for l in moe}, ({l: vals[l][0] for l in moe} if values else None)


def run_bf16(name: str, spec: dict) -> dict:
    """The bf16 fidelity case: the masked forward of the bf16 checkpoint in bf16 (what moe-xray is compared
    with), plus per token and MoE layer the masked ranking values (to explain near ties) and a calibration:
    the same masked forward of the same checkpoint computed in f32 instead of bf16."""
    model = load(name, torch.bfloat16)
    ref32 = load(name, torch.float32)
    cfg = model.config
    ne = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    moe = [l for l in range(cfg.num_hidden_layers) if router_of(model, l) is not None]
    k = cfg.num_experts_per_tok
    gens = [json.loads(line) for line in (ROOT / "fixtures" / "hf" / name / "expected_generations.jsonl")
            .read_text().splitlines()]
    gens = {g["prompt_id"]: g for g in gens}
    out = {"model": name, "router": spec["kind"], "dtype": "bfloat16", "num_experts": ne, "top_k": k,
           "moe_layers": moe, "mask": {str(l): e for l, e in spec["mask"].items()},
           "rank_values": "f32 softmax probabilities of the masked logits" if spec["kind"] == "softmax_topk"
           else "masked router logits (bias included; bf16 values)", "prompts": []}
    cal = {"routing_mismatches": 0, "records": 0, "first_in_sequence_gaps": [],
           "max_abs_logit_diff_before_first_mismatch": 0.0, "max_abs_logit": 0.0}
    for pid in PROMPTS:
        g = gens[pid]
        prompt, cont = g["prompt_ids"], g["generated_ids"]
        fed = prompt + cont[:-1]
        base, _, _ = masked_forward(model, spec, moe, ne, k, fed, masked=False)
        with torch.no_grad():
            plain = model(torch.tensor([fed])).logits[0]
        assert torch.equal(plain, base), "the unmasked hook changed the logits"
        logits, routes, vals = masked_forward(model, spec, moe, ne, k, fed, values=True)
        l32, routes32, _ = masked_forward(ref32, spec, moe, ne, k, fed)
        first_bad = len(fed)
        for t in range(len(fed)):
            for l in moe:
                assert not set(routes[l][t]) & set(spec["mask"].get(l, [])), "a masked expert was chosen"
                cal["records"] += 1
                if set(routes[l][t]) != set(routes32[l][t]):
                    cal["routing_mismatches"] += 1
                    if first_bad == len(fed):  # the first of this sequence: how near a tie it was
                        ours, theirs = set(routes32[l][t]), set(routes[l][t])
                        v = vals[l][t]
                        gap = min(v[x] for x in theirs - ours) - max(v[x] for x in ours - theirs)
                        cal["first_in_sequence_gaps"].append([pid, t, l, gap])
                    first_bad = min(first_bad, t)
        rows = logits[len(prompt) - 1:].float()
        rows32 = l32[len(prompt) - 1:].float()
        upto = max(0, first_bad - (len(prompt) - 1))  # score rows fed only tokens before the first mismatch
        if upto:
            cal["max_abs_logit_diff_before_first_mismatch"] = max(
                cal["max_abs_logit_diff_before_first_mismatch"], float((rows[:upto] - rows32[:upto]).abs().max()))
        cal["max_abs_logit"] = max(cal["max_abs_logit"], float(rows.abs().max()))
        # The same f32 computation with the bf16 run's expert choices imposed: the logit noise of bf16 rounding
        # alone, on every row (no routing flip).
        lf, _, _ = masked_forward(ref32, spec, moe, ne, k, fed, force=routes)
        cal["max_abs_logit_diff_same_routing"] = max(
            cal.get("max_abs_logit_diff_same_routing", 0.0),
            float((rows - lf[len(prompt) - 1:].float()).abs().max()))
        unmasked_routes = masked_forward(model, spec, moe, ne, k, fed, masked=False)[1]
        out["prompts"].append({
            "prompt_id": pid,
            "prompt_ids": prompt,
            "continuation": cont,
            "logits": rows.tolist(),
            "experts": [[routes[l][t] for l in moe] for t in range(len(fed))],
            # masked experts' logits are -inf: written as null (JSON has no infinities)
            "rank": [[[float(f"{v:.7g}") if math.isfinite(v) else None for v in vals[l][t]] for l in moe]
                     for t in range(len(fed))],
            "routing_changed": sum(1 for t in range(len(fed)) for l in moe
                                   if sorted(unmasked_routes[l][t]) != sorted(routes[l][t])),
        })
    out["calibration_f32_compute"] = cal
    return out


def run(name: str, spec: dict) -> dict:
    d = ROOT / "fixtures" / "hf" / name
    model = load(name, torch.float32)
    cfg = model.config
    ne = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    moe = [l for l in range(cfg.num_hidden_layers) if router_of(model, l) is not None]
    k = cfg.num_experts_per_tok
    gens = {}
    for line in (d / "expected_generations.jsonl").read_text().splitlines():
        g = json.loads(line)
        gens[g["prompt_id"]] = g
    out = {"model": name, "router": spec["kind"], "num_experts": ne, "top_k": k, "moe_layers": moe,
           "mask": {str(l): e for l, e in spec["mask"].items()}, "prompts": []}
    for pid in PROMPTS:
        g = gens[pid]
        prompt, cont = g["prompt_ids"], g["generated_ids"]
        fed = prompt + cont[:-1]
        x = torch.tensor([fed])
        result = {}
        for masked in (False, True):
            records = {l: [] for l in moe}
            hooks = []
            for l in moe:
                m = spec["mask"].get(l, []) if masked else []
                hooks.append(router_of(model, l).register_forward_hook(MaskHook(spec["kind"], m, ne, k, records[l])))
            with torch.no_grad():
                logits = model(x).logits[0]
            for h in hooks:
                h.remove()
            result[masked] = (logits, records)
        base_logits = result[False][0]
        with torch.no_grad():
            plain = model(x).logits[0]
        assert torch.equal(plain, base_logits), "the unmasked hook changed the logits"
        logits, records = result[True]
        rows = logits[len(prompt) - 1:]
        assert rows.shape[0] == len(cont)
        # routing: per fed token, per layer (token-major, as moe-xray records it)
        routes = [[records[l][0][t] for l in moe] for t in range(len(fed))]
        for t in routes:
            for l, ex in zip(moe, t):
                assert not set(ex) & set(spec["mask"].get(l, [])), "a masked expert was chosen"
        changed = sum(
            1 for t in range(len(fed)) for l in moe
            if sorted(result[False][1][l][0][t]) != sorted(records[l][0][t])
        )
        digits = spec.get("digits")
        rnd = (lambda v: float(f"{v:.{digits}g}")) if digits else float
        out["prompts"].append({
            "prompt_id": pid,
            "prompt_ids": prompt,
            "continuation": cont,
            "logits": [[rnd(v) for v in r] for r in rows.tolist()],
            "experts": routes,
            "unmasked_argmax_equals_continuation": bool((base_logits[len(prompt) - 1:].argmax(-1) == torch.tensor(cont)).all()),
            "routing_changed": changed,
        })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "ablation"))
    ap.add_argument("--only", default=None, help="one model name (writes only its file)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    done = []
    if a.only is None or a.only in MODELS:
        res = dict(versions, models=[run(n, s) for n, s in MODELS.items() if a.only in (None, n)])
        if a.only is None:
            (out / "hf_masked.json").write_text(json.dumps(res) + "\n")
        done += res["models"]
    for n, spec in EXTRA_MODELS.items():
        if a.only not in (None, n):
            continue
        m = run(n, dict(spec, digits=9))
        (out / f"hf_masked_{n}.json").write_text(json.dumps(dict(versions, models=[m])) + "\n")
        done.append(m)
    for n, spec in BF16_MODELS.items():
        if a.only not in (None, n):
            continue
        m = run_bf16(n, spec)
        (out / f"hf_masked_{n}.json").write_text(json.dumps(dict(versions, models=[m])) + "\n")
        print(n, "calibration (same masked forward computed in f32)", m["calibration_f32_compute"])
        done.append(m)
    for m in done:
        for p in m["prompts"]:
            print(m["model"], p["prompt_id"], "routing changed", p["routing_changed"],
                  "unmasked argmax == continuation", p.get("unmasked_argmax_equals_continuation"))


if __name__ == "__main__":
    main()
