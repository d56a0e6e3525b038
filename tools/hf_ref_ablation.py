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

Output: fixtures/ablation/hf_masked.json (small: 2 models x 2 prompts).
Usage: /work/venvs/hf/bin/python tools/hf_ref_ablation.py [--out fixtures/ablation]
"""

from __future__ import annotations

import argparse
import json
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


def router_of(model, layer):
    mlp = model.model.layers[layer].mlp if hasattr(model.model.layers[layer], "mlp") else None
    if mlp is not None and hasattr(mlp, "gate"):
        return mlp.gate
    return model.model.layers[layer].block_sparse_moe.router


class MaskHook:
    """Forward hook replacing a router's (logits, weights, indices) by the masked router."""

    def __init__(self, kind: str, masked: list[int], num_experts: int, top_k: int, record: list):
        self.kind, self.top_k, self.record = kind, top_k, record
        self.mask = torch.zeros(num_experts, dtype=torch.bool)
        self.mask[masked] = True

    def __call__(self, module, args, output):
        x = args[0].reshape(-1, module.weight.shape[1])
        logits = F.linear(x, module.weight)
        if self.kind == "softmax_topk":
            masked = logits.masked_fill(self.mask, float("-inf"))
            probs = torch.softmax(masked, dtype=torch.float, dim=-1)
            w, idx = torch.topk(probs, self.top_k, dim=-1)
            w = w.to(logits.dtype)
        else:
            masked = logits.float().masked_fill(self.mask, float("-inf"))
            top, idx = masked.topk(self.top_k, dim=-1)
            w = torch.softmax(top, dim=-1).type_as(x)
        if not self.mask.any():
            assert torch.equal(idx, output[2]) and torch.equal(w, output[1]), "unmasked hook differs"
        self.record.append(idx.tolist())
        return (logits, w, idx)


def run(name: str, spec: dict) -> dict:
    d = ROOT / "fixtures" / "hf" / name
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.config._attn_implementation = "eager"
    try:
        model.set_experts_implementation("eager")
    except AttributeError:
        model.config._experts_implementation = "eager"
    model.eval()
    cfg = model.config
    ne = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    k = cfg.num_experts_per_tok
    gens = {}
    for line in (d / "expected_generations.jsonl").read_text().splitlines():
        g = json.loads(line)
        gens[g["prompt_id"]] = g
    out = {"model": name, "router": spec["kind"], "num_experts": ne, "top_k": k,
           "mask": {str(l): e for l, e in spec["mask"].items()}, "prompts": []}
    for pid in PROMPTS:
        g = gens[pid]
        prompt, cont = g["prompt_ids"], g["generated_ids"]
        fed = prompt + cont[:-1]
        x = torch.tensor([fed])
        result = {}
        for masked in (False, True):
            records = {l: [] for l in range(cfg.num_hidden_layers)}
            hooks = []
            for l in range(cfg.num_hidden_layers):
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
        routes = [[records[l][0][t] for l in range(cfg.num_hidden_layers)] for t in range(len(fed))]
        for t in routes:
            for l, ex in enumerate(t):
                assert not set(ex) & set(spec["mask"].get(l, [])), "a masked expert was chosen"
        changed = sum(
            1 for t in range(len(fed)) for l in range(cfg.num_hidden_layers)
            if result[False][1][l][0][t] != records[l][0][t]
        )
        out["prompts"].append({
            "prompt_id": pid,
            "prompt_ids": prompt,
            "continuation": cont,
            "logits": [[float(v) for v in r] for r in rows.tolist()],
            "experts": routes,
            "unmasked_argmax_equals_continuation": bool((base_logits[len(prompt) - 1:].argmax(-1) == torch.tensor(cont)).all()),
            "routing_changed": changed,
        })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "ablation"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    res = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
           "models": [run(n, s) for n, s in MODELS.items()]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_masked.json").write_text(json.dumps(res) + "\n")
    for m in res["models"]:
        for p in m["prompts"]:
            print(m["model"], p["prompt_id"], "routing changed", p["routing_changed"],
                  "unmasked argmax == continuation", p["unmasked_argmax_equals_continuation"])


if __name__ == "__main__":
    main()
