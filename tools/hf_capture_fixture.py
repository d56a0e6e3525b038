#!/usr/bin/env python3
"""Runs the transformers capture hook `moe_xray.hf.capture` (python/moe_xray/hf.py) on HF
conformance fixtures and writes its output under fixtures/hf-capture/<model>/ (trace.jsonl,
generations.jsonl, manifest.json), which `crates/cli/tests/hf_capture.rs` compares with
`moe-xray trace --hf-generate-compat` and feeds to `moe-xray analyze`.

Usage (from the repository root, venv of tools/requirements-hf.txt):

    /work/venvs/hf/bin/python tools/hf_capture_fixture.py            # write the fixtures
    /work/venvs/hf/bin/python tools/hf_capture_fixture.py --check    # compare, write nothing

Each model is captured with batch size 1 (one `generate()` per prompt, greedy, 12 new tokens,
fixtures/hf/prompts.jsonl). Checks done on every run (the script fails otherwise):

- the capture against the model's teacher-forced reference `fixtures/hf/<model>/expected_trace.jsonl`
  (written by tools/hf_reference*.py): every captured record has a reference record with the same
  (prompt, layer, position, token id, token type) and the same experts (in order; as sets for
  DeepSeek, whose router uses `torch.topk(sorted=False)`), weights within 1e-5; the reference
  records missing from the capture are exactly those of each prompt's last generated token (never
  fed back by `generate()`); generated ids equal `expected_generations.jsonl`;
- a left-padded batch of all prompts (one `generate()` call, padding dropped from the positions)
  against the batch-1 capture: the same records (keys, token ids, types), experts and weights
  compared and the differences reported (padding changes the matmul shapes, so f32 weights may
  differ in the last bits and a near-tie may flip);
- the written bytes are reproducible: a second batch-1 capture is byte-identical.

torch 2.15.0 + transformers 5.24.0 (tools/requirements-hf.txt); CPU, f32, torch threads 1.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["olmoe-tiny-mha-f32", "olmoe-tiny-gqa-f32", "qwen2moe-tiny-f32", "deepseekv3-tiny-f32"]
MAX_NEW_TOKENS = 12
FILES = ["trace.jsonl", "generations.jsonl", "manifest.json"]


def load_hf_module():
    """python/moe_xray/hf.py by path, so that the (compiled) package need not be installed."""
    path = os.path.join(ROOT, "python", "moe_xray", "hf.py")
    spec = importlib.util.spec_from_file_location("moe_xray_hf", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moe_xray_hf"] = mod
    spec.loader.exec_module(mod)
    return mod


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def load(model_rel):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_rel)
    model = AutoModelForCausalLM.from_pretrained(model_rel, dtype=torch.float32)
    model.eval()
    return tok, model


def capture_batch1(hf, tok, model, model_rel, prompts_rel, out):
    import torch

    with torch.no_grad(), hf.capture(model, out=out, prompts=prompts_rel, tokenizer=tok,
                                     model_name=model_rel) as cap:
        for p in cap.prompts:
            enc = tok(p.text, return_tensors="pt")
            model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return cap


def capture_padded(hf, tok, model, model_rel, prompts_rel, out):
    import torch

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token_id = model.generation_config.pad_token_id
    with torch.no_grad(), hf.capture(model, out=out, prompts=prompts_rel, tokenizer=tok,
                                     model_name=model_rel) as cap:
        enc = tok([p.text for p in cap.prompts], return_tensors="pt", padding=True)
        model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    return cap


def key(r):
    return (r["prompt_id"], r["layer"], r["position"], r["token_type"])


def compare_reference(model_name, family, out):
    """The capture against the teacher-forced reference; returns a summary dict."""
    ref_dir = os.path.join(ROOT, "fixtures", "hf", model_name)
    ref = {key(r): r for r in read_jsonl(os.path.join(ref_dir, "expected_trace.jsonl"))}
    got = read_jsonl(os.path.join(out, "trace.jsonl"))
    as_sets = family.startswith("deepseek")
    max_dw = 0.0
    for r in got:
        e = ref.get(key(r))
        if e is None:
            raise SystemExit(f"{model_name}: captured record {key(r)} not in the reference")
        if r["token_id"] != e["token_id"]:
            raise SystemExit(f"{model_name}: {key(r)}: token id {r['token_id']} != {e['token_id']}")
        if as_sets:
            if sorted(r["experts"]) != sorted(e["experts"]):
                raise SystemExit(f"{model_name}: {key(r)}: experts {r['experts']} != {e['experts']}")
            wr = dict(zip(r["experts"], r["weights"]))
            we = dict(zip(e["experts"], e["weights"]))
            dw = max(abs(wr[x] - we[x]) for x in wr)
        else:
            if r["experts"] != e["experts"]:
                raise SystemExit(f"{model_name}: {key(r)}: experts {r['experts']} != {e['experts']}")
            dw = max(abs(a - b) for a, b in zip(r["weights"], e["weights"]))
        max_dw = max(max_dw, dw)
    if max_dw > 1e-5:
        raise SystemExit(f"{model_name}: weights differ from the reference by {max_dw:g} > 1e-5")
    # The reference records the capture lacks: exactly each prompt's last generated position.
    gens = {g["prompt_id"]: g for g in read_jsonl(os.path.join(ref_dir, "expected_generations.jsonl"))}
    got_keys = {key(r) for r in got}
    missing = [k for k in ref if k not in got_keys]
    for k in missing:
        g = gens[k[0]]
        last = len(g["prompt_ids"]) + len(g["generated_ids"]) - 1
        if k[2] != last or k[3] != "generation":
            raise SystemExit(f"{model_name}: reference record {k} missing from the capture")
    n_moe = len({r["layer"] for r in ref.values()})
    if len(missing) != n_moe * sum(1 for g in gens.values() if g["generated_ids"]):
        raise SystemExit(f"{model_name}: {len(missing)} reference records missing, expected one "
                         "per MoE layer and prompt")
    cap_gens = {g["prompt_id"]: g for g in read_jsonl(os.path.join(out, "generations.jsonl"))}
    for pid, g in gens.items():
        c = cap_gens[pid]
        if c["prompt_ids"] != g["prompt_ids"] or c["generated_ids"] != g["generated_ids"]:
            raise SystemExit(f"{model_name}: {pid}: generated ids differ from the reference")
    return {"records": len(got), "reference_records": len(ref),
            "reference_only_last_token": len(missing), "max_weight_diff": max_dw,
            "experts": "sets" if as_sets else "order"}


def compare_padded(model_name, family, a_dir, b_dir):
    a = {key(r): r for r in read_jsonl(os.path.join(a_dir, "trace.jsonl"))}
    b = {key(r): r for r in read_jsonl(os.path.join(b_dir, "trace.jsonl"))}
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise SystemExit(f"{model_name}: padded batch records differ in keys, e.g. {only}")
    as_sets = family.startswith("deepseek")
    flips, max_dw = 0, 0.0
    for k, r in a.items():
        s = b[k]
        if r["token_id"] != s["token_id"]:
            raise SystemExit(f"{model_name}: padded batch {k}: token id differs")
        same = (sorted(r["experts"]) == sorted(s["experts"])) if as_sets else r["experts"] == s["experts"]
        if not same:
            flips += 1
            continue
        wr = dict(zip(r["experts"], r["weights"]))
        ws = dict(zip(s["experts"], s["weights"]))
        max_dw = max(max_dw, max(abs(wr[x] - ws[x]) for x in wr))
    ga = read_jsonl(os.path.join(a_dir, "generations.jsonl"))
    gb = {g["prompt_id"]: g for g in read_jsonl(os.path.join(b_dir, "generations.jsonl"))}
    gen_diff = sum(1 for g in ga if g["generated_ids"] != gb[g["prompt_id"]]["generated_ids"])
    return {"records": len(a), "expert_mismatches": flips, "max_weight_diff": max_dw,
            "generation_mismatches": gen_diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare a fresh capture with the committed fixtures; write nothing")
    ap.add_argument("--models", nargs="*", default=MODELS)
    args = ap.parse_args()
    os.chdir(ROOT)
    import torch
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf = load_hf_module()
    prompts_rel = "fixtures/hf/prompts.jsonl"
    summary = {"torch": torch.__version__, "transformers": transformers.__version__, "models": {}}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_rel = f"fixtures/hf/{name}"
            tok, model = load(model_rel)
            family = model.config.model_type
            out1 = os.path.join(tmp, name, "b1")
            out2 = os.path.join(tmp, name, "b1-again")
            outp = os.path.join(tmp, name, "padded")
            capture_batch1(hf, tok, model, model_rel, prompts_rel, out1)
            capture_batch1(hf, tok, model, model_rel, prompts_rel, out2)
            for f in FILES:
                if not filecmp.cmp(os.path.join(out1, f), os.path.join(out2, f), shallow=False):
                    raise SystemExit(f"{name}: {f} differs between two identical captures")
            ref = compare_reference(name, family, out1)
            capture_padded(hf, tok, model, model_rel, prompts_rel, outp)
            padded = compare_padded(name, family, out1, outp)
            summary["models"][name] = {"family": family, "vs_reference": ref,
                                       "padded_batch_vs_batch1": padded}
            dest = os.path.join(ROOT, "fixtures", "hf-capture", name)
            if args.check:
                for f in FILES:
                    if not filecmp.cmp(os.path.join(out1, f), os.path.join(dest, f), shallow=False):
                        print(f"{name}: {f} differs from the committed fixture", file=sys.stderr)
                        failed = True
            else:
                os.makedirs(dest, exist_ok=True)
                for f in FILES:
                    shutil.copyfile(os.path.join(out1, f), os.path.join(dest, f))
            print(f"{name}: {json.dumps(summary['models'][name])}", file=sys.stderr)
    if not args.check:
        with open(os.path.join(ROOT, "fixtures", "hf-capture", "summary.json"), "w",
                  encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
