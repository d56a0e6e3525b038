#!/usr/bin/env python3
"""Fixtures for `moe-xray import` written by REAL torch + transformers (fixtures/import/hf/,
fixtures/import/sglang/torch/). Complements tools/make_import_fixtures.py (numpy only).

1. `import hf`: for each tiny checkpoint below (fixtures/hf/<model>/, written by transformers 5.24 by
   tools/hf_reference.py / hf_ref_*.py), the teacher-forced forward over prompt + generated ids of
   every prompt (expected_generations.jsonl), in ONE right-padded batch, with
   `output_router_logits=True`. transformers returns `router_logits` = a tuple with one tensor per
   MoE layer (dense layers have no router), each `[batch * seq, num_experts]` (the router's raw
   logits: transformers/models/<family>/modeling_<family>.py, `*TopKRouter.forward` returns
   `router_logits` first and `_can_record_outputs["router_logits"] = OutputRecorder(..., index=0)`).
   Saved as
   - `router_logits.safetensors` (safetensors.torch.save_file): `router_logits.{i}` (f32), plus
     `input_ids` and `attention_mask` (int64 [batch, seq]);
   - `router_logits.pt` (torch.save): `{"router_logits": <the tuple>, "input_ids": ...,
     "attention_mask": ...}`;
   - for olmoe-tiny-mha-f32 also `router_logits_{bf16,f16}.{safetensors,pt}`: the same logits
     rounded to bfloat16 / float16 (the 2-byte float storages);
   - `requests.jsonl`: `{"prompt_id", "category", "prompt_tokens", "completion_tokens"}` per batch
     row, in batch order.
   The script checks that the padded batch routes every real token as the batch-1 forward of
   fixtures/hf/<model>/expected_trace.jsonl does (expert sets), so the importer can be tested
   against that trace.
2. SGLang recorder dumps re-saved by torch.save: the dumps of tools/make_import_fixtures.py
   (written with the standard library in torch's layout) are loaded with
   `torch.load(weights_only=True)` and written again with `torch.save` into
   fixtures/import/sglang/torch/ (per_token.pt, per_pass.pt, stat.pt); the per_token dump's
   `topk_ids_of_layer` are re-saved as non-contiguous views (a transpose of a contiguous tensor)
   to exercise strides. `evil.pt`: torch.save of an object whose `__reduce__` returns
   `(print, ("pwned",))` — a pickle that would call a function (the importer must refuse it).

Run: /work/venvs/hf/bin/python tools/make_import_fixtures_torch.py  (torch 2.15.0, transformers
5.24.0, tools/requirements-hf.txt). Deterministic for a given torch build.
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(ROOT, "fixtures", "hf")
OUT = os.path.join(ROOT, "fixtures", "import")
MODELS = ["olmoe-tiny-mha-f32", "deepseekv3-tiny-f32", "gptoss-tiny-f32", "qwen3moe-tiny-f32"]


def jl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def hf_fixture(name):
    src = os.path.join(HF, name)
    gens = jl(os.path.join(src, "expected_generations.jsonl"))
    cats = {p["id"]: p["category"] for p in jl(os.path.join(HF, "prompts.jsonl"))}
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.eval()
    seqs = [g["prompt_ids"] + g["generated_ids"] for g in gens]
    n = max(len(s) for s in seqs)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    rl = tuple(t.detach().contiguous() for t in out.router_logits)
    for t in rl:
        assert t.shape == (len(seqs) * n, rl[0].shape[1]) and t.dtype == torch.float32, t.shape
    # Check against the batch-1 reference trace (expert sets of every real token).
    want = {}
    for r in jl(os.path.join(src, "expected_trace.jsonl")):
        want.setdefault((r["prompt_id"], r["position"]), []).append(set(r["experts"]))
    k = model.config.num_experts_per_tok
    diffs = 0
    for b, g in enumerate(gens):
        for p in range(len(seqs[b])):
            got = [set(torch.topk(t[b * n + p], k).indices.tolist()) for t in rl]
            # Only a plain top-k of the logits is checked here (softmax and top-k-softmax rank
            # like the logits); DeepSeek-V3's bias and groups are checked by the Rust test.
            if model.config.model_type in ("deepseek_v3",):
                continue
            if got != want[(g["prompt_id"], p)]:
                diffs += 1
    assert diffs == 0, f"{name}: {diffs} tokens route differently in the padded batch"
    dst = os.path.join(OUT, "hf", name)
    os.makedirs(dst, exist_ok=True)
    tensors = {f"router_logits.{i}": t for i, t in enumerate(rl)}
    tensors["input_ids"] = ids
    tensors["attention_mask"] = mask
    save_file(tensors, os.path.join(dst, "router_logits.safetensors"))
    torch.save({"router_logits": rl, "input_ids": ids, "attention_mask": mask},
               os.path.join(dst, "router_logits.pt"))
    if name == "olmoe-tiny-mha-f32":
        # Half-precision copies (bf16, f16 storages): the .pt and .safetensors readers of 2-byte
        # floats must agree.
        for dt, tag in [(torch.bfloat16, "bf16"), (torch.float16, "f16")]:
            low = tuple(t.to(dt) for t in rl)
            lt = {f"router_logits.{i}": t for i, t in enumerate(low)}
            lt["input_ids"] = ids
            lt["attention_mask"] = mask
            save_file(lt, os.path.join(dst, f"router_logits_{tag}.safetensors"))
            torch.save({"router_logits": low, "input_ids": ids, "attention_mask": mask},
                       os.path.join(dst, f"router_logits_{tag}.pt"))
    with open(os.path.join(dst, "requests.jsonl"), "w") as f:
        for g in gens:
            f.write(json.dumps({"prompt_id": g["prompt_id"], "category": cats[g["prompt_id"]],
                                "prompt_tokens": len(g["prompt_ids"]),
                                "completion_tokens": len(g["generated_ids"])}) + "\n")
    print(f"{name}: {len(rl)} MoE layers, batch {len(seqs)} x {n}, {model.config.model_type}")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def sglang_fixture():
    src = os.path.join(OUT, "sglang")
    dst = os.path.join(src, "torch")
    os.makedirs(dst, exist_ok=True)
    for mode in ["per_token", "per_pass", "stat"]:
        obj = torch.load(os.path.join(src, f"{mode}.pt"), weights_only=True)
        if mode == "per_token":
            for r in obj["records"]:
                t = r["topk_ids_of_layer"]
                # Same values, stored transposed: a non-contiguous view of its storage.
                r["topk_ids_of_layer"] = t.transpose(0, 1).contiguous().transpose(0, 1)
                assert not r["topk_ids_of_layer"].is_contiguous()
        torch.save(obj, os.path.join(dst, f"{mode}.pt"))
    torch.save({"records": [Evil()]}, os.path.join(dst, "evil.pt"))
    print("sglang: per_token, per_pass, stat, evil re-saved by torch", torch.__version__)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    only = sys.argv[1:]
    for m in MODELS:
        if not only or m in only:
            hf_fixture(m)
    if not only or "sglang" in only:
        sglang_fixture()


if __name__ == "__main__":
    main()
