#!/usr/bin/env python3
"""Fixtures of routing as serving engines record it, for `moe-xray import` (fixtures/import/).

The routing is taken from moe-xray's own fixture traces (fixtures/health/run_a, run_b: 3 MoE
layers, 8 experts, top-2), so that tests can check that an import gives the same signatures /
loads as moe-xray's own trace of the same routing. The fixture model has one dense layer in
front (config.json: num_hidden_layers 4, first_k_dense_replace 1, DeepSeek style), so the
engines' arrays have 4 layers and the importer must drop layer 0.

Formats, and the engine sources that define them (versions as read for this file):
- vLLM (vllm-project/vllm, main as of 2026, vllm/outputs.py: `CompletionOutput.routed_experts:
  np.ndarray | None  # [seq_len,layer_num,topk]`; the routed-experts capturer records one row per
  forwarded token, prompt + generated - 1 rows, int32). Offline users save it with np.save /
  np.savez; the OpenAI-compatible server (vllm/entrypoints/openai/.../protocol.py) returns the
  prompt rows as the response's `prompt_routed_experts` and the generated rows as each choice's
  `routed_experts` (nested JSON lists).
- SGLang (sgl-project/sglang, main as of 2026):
  python/sglang/srt/layers/moe/routed_experts_capturer.py allocates int32
  [tokens, hf_text_config.num_hidden_layers, num_experts_per_tok]; the tokenizer manager puts
  `pybase64.b64encode(tensor.numpy().tobytes())` into `meta_info["routed_experts"]` of the
  /generate response, shape [prompt_tokens + completion_tokens - 1, layers, top_k].
  python/sglang/srt/eplb/expert_distribution.py dumps the expert-distribution recorder with
  torch.save: per_token / per_pass modes `{"records": [{"forward_pass_id", "rank",
  "gatherer_key", ...}], "last_physical_to_logical_map": int tensor [layers, physical]}` where
  per_token records carry `input_ids`, `positions`, `extend_seq_lens`, `forward_mode`,
  `topk_ids_of_layer` (int32 [layers, tokens, 8], -1 unused) and `global_physical_count`, per_pass
  records `global_physical_count` ([layers, physical]); stat mode `{"rank", "logical_count"
  ([steps, layers, logical]), "average_utilization_rate_over_window"}`.
- torch.save zip layout (pytorch torch/serialization.py, `_save`, pickle protocol 2):
  `<name>/data.pkl`, `<name>/data/<key>` raw little-endian storages, `<name>/byteorder`,
  `<name>/version`; tensors pickle as `torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, requires_grad, OrderedDict())` with the storage as persistent id
  `("storage", torch.<T>Storage, key, "cpu", numel)`. Written here with the standard library
  (fake `torch` modules only for pickling names; nothing from torch is imported).

Run: /work/venvs/import/bin/python tools/make_import_fixtures.py   (numpy pinned in
tools/requirements-import.txt). Output is deterministic.
"""

import base64
import gzip
import collections
import io
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "fixtures", "health")
OUT = os.path.join(ROOT, "fixtures", "import")
L_MOE, E, K = 3, 8, 2
DENSE = 1  # first_k_dense_replace
L_ALL = L_MOE + DENSE


def read_run(name):
    """prompt id -> (category, prompt tokens P, [P+G, L_MOE, K] experts) in first-appearance order."""
    prompts = collections.OrderedDict()
    for line in open(os.path.join(SRC, name, "trace.jsonl")):
        r = json.loads(line)
        p = prompts.setdefault(r["prompt_id"], {"category": r.get("category"), "rows": {}, "types": {}, "ids": {}})
        p["ids"][r["position"]] = r["token_id"]
        p["rows"].setdefault(r["position"], [None] * L_MOE)[r["layer"]] = r["experts"]
        p["types"][r["position"]] = r["token_type"]
    out = collections.OrderedDict()
    for pid, p in prompts.items():
        n = len(p["rows"])
        assert sorted(p["rows"]) == list(range(n)), pid
        n_prompt = sum(1 for t in p["types"].values() if t == "prompt")
        assert all(p["types"][i] == "prompt" for i in range(n_prompt)), pid
        arr = np.array([p["rows"][i] for i in range(n)], dtype=np.int32)
        assert arr.shape == (n, L_MOE, K)
        out[pid] = (p["category"], n_prompt, arr)
        TOKEN_IDS.setdefault(name, {})[pid] = [p["ids"][i] for i in range(n)]
    return out


TOKEN_IDS = {}  # run -> prompt id -> token id of each routed position (from the source trace)
FINAL_TOKEN = 2  # token id of the last generated token (sampled, never forwarded: no routing)


def with_dense(arr):
    """[T, L_MOE, K] -> [T, L_ALL, K] with the dense layer 0 zero-filled (as the engines' buffers)."""
    full = np.zeros((arr.shape[0], L_ALL, K), dtype=np.int32)
    full[:, DENSE:, :] = arr
    return full


def write(path, data, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)


# ----------------------------------------------------------------------------- torch.save
class _Storage:
    def __init__(self, cls_name, array):
        self.cls_name = cls_name
        self.array = np.ascontiguousarray(array)


class _Tensor:
    def __init__(self, storage, shape):
        self.storage = storage
        self.shape = tuple(shape)

    def __reduce__(self):
        stride = []
        acc = 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (
            sys.modules["torch._utils"]._rebuild_tensor_v2,
            (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()),
        )


def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*a):  # never called: only its name is pickled
        raise RuntimeError("not torch")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for n in ["IntStorage", "LongStorage"]:
        c = type(n, (), {})
        c.__module__ = "torch"
        setattr(torch, n, c)
    torch._utils = utils
    sys.modules.setdefault("torch", torch)
    sys.modules.setdefault("torch._utils", utils)
    return torch


def tensor(array):
    array = np.ascontiguousarray(array)
    cls = {np.dtype(np.int32): "IntStorage", np.dtype(np.int64): "LongStorage"}[array.dtype]
    return _Tensor(_Storage(cls, array), array.shape)


def torch_save(path, obj, archive="archive"):
    torch = sys.modules["torch"]
    storages = []

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                for i, s in enumerate(storages):
                    if s is o:
                        key = i
                        break
                else:
                    storages.append(o)
                    key = len(storages) - 1
                return ("storage", getattr(torch, o.cls_name), str(key), "cpu", o.array.size)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    mem = io.BytesIO()
    with zipfile.ZipFile(mem, "w", zipfile.ZIP_STORED) as z:
        def add(name, data):
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, data)

        add("data.pkl", buf.getvalue())
        add("byteorder", b"little")
        for i, s in enumerate(storages):
            add(f"data/{i}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
        add("version", b"3\n")
    write(path, mem.getvalue(), "wb")


class _Evil:
    """A pickle that would run a shell command when loaded: the importer must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo moe-xray-must-never-run-this",))


# ----------------------------------------------------------------------------- fixtures
def main():
    _fake_torch()
    run_a, run_b = read_run("run_a"), read_run("run_b")
    config = {
        "_name_or_path": "fixture-moe-4l",
        "model_type": "deepseek_v2",
        "num_hidden_layers": L_ALL,
        "first_k_dense_replace": DENSE,
        "moe_layer_freq": 1,
        "n_routed_experts": E,
        "num_experts_per_tok": K,
    }
    write(os.path.join(OUT, "config.json"), json.dumps(config, indent=2) + "\n")

    # vLLM, offline: one np.savez_compressed member per request + the requests file.
    arrays, reqs = {}, []
    for pid, (cat, n_prompt, arr) in run_a.items():
        arrays[pid] = with_dense(arr)
        # vLLM records prompt + completion - 1 rows: the last generated token has none.
        reqs.append({"prompt_id": pid, "prompt_tokens": n_prompt,
                     "completion_tokens": arr.shape[0] - n_prompt + 1, "category": cat})
    # The layout of np.savez_compressed (a deflated zip of <name>.npy members), with fixed
    # timestamps so that the file is reproducible.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for pid, a in arrays.items():
            m = io.BytesIO()
            np.save(m, a)
            info = zipfile.ZipInfo(f"{pid}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, m.getvalue())
    write(os.path.join(OUT, "vllm", "run_a.npz"), buf.getvalue(), "wb")
    write(os.path.join(OUT, "vllm", "requests_a.jsonl"), "".join(json.dumps(r) + "\n" for r in reqs))
    first = next(iter(run_a))
    b = io.BytesIO()
    np.save(b, arrays[first])
    write(os.path.join(OUT, "vllm", "npy", f"{first}.npy"), b.getvalue(), "wb")

    # vLLM, OpenAI-compatible server: JSONL of /v1/completions responses for run_b.
    lines = []
    for i, (pid, (cat, n_prompt, arr)) in enumerate(run_b.items()):
        full = with_dense(arr)
        n_gen_rows = arr.shape[0] - n_prompt
        lines.append(json.dumps({
            "id": f"cmpl-{i:04d}", "object": "text_completion", "created": 0, "model": "fixture-moe-4l",
            "prompt_id": pid, "category": cat,
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                         "token_ids": TOKEN_IDS["run_b"][pid][n_prompt:] + [FINAL_TOKEN],
                         "stop_reason": None, "routed_experts": full[n_prompt:].tolist()}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen_rows + 1,
                      "total_tokens": n_prompt + n_gen_rows + 1},
            "prompt_routed_experts": full[:n_prompt].tolist(),
            "prompt_token_ids": TOKEN_IDS["run_b"][pid][:n_prompt],
        }) + "\n")
    write(os.path.join(OUT, "vllm", "responses_b.jsonl"), "".join(lines))
    # The same responses gzip-compressed (deterministic: mtime 0, no file name in the header),
    # for the compressed-JSONL path of the importers.
    with open(os.path.join(OUT, "vllm", "responses_b.jsonl.gz"), "wb") as f:
        f.write(gzip.compress("".join(lines).encode(), compresslevel=9, mtime=0))

    # SGLang /generate responses for run_a (meta_info.routed_experts: base64 int32).
    lines = []
    for i, (pid, (cat, n_prompt, arr)) in enumerate(run_a.items()):
        full = with_dense(arr)
        lines.append(json.dumps({
            "text": "", "prompt_id": pid, "category": cat,
            "meta_info": {"id": f"{i:032x}", "finish_reason": {"type": "length", "length": 0},
                          "prompt_tokens": n_prompt, "completion_tokens": arr.shape[0] - n_prompt + 1,
                          "cached_tokens": 0,
                          "routed_experts": base64.b64encode(full.astype("<i4").tobytes()).decode("ascii")},
        }) + "\n")
    write(os.path.join(OUT, "sglang", "responses_a.jsonl"), "".join(lines))

    # SGLang expert-distribution recorder dumps of run_a. Physical experts: the 8 logical ones
    # plus two redundant replicas (physical 8 -> logical 3, physical 9 -> logical 5); odd tokens
    # of a pass use the replica. Passes: one EXTEND pass per prompt (its prompt tokens), then
    # DECODE passes, step j holding the j-th generated token of every prompt that has one.
    phys_to_log = np.tile(np.array(list(range(E)) + [3, 5], dtype=np.int64), (L_ALL, 1))
    replica = {3: 8, 5: 9}
    passes = []
    for pid, (cat, n_prompt, arr) in run_a.items():
        passes.append((1, arr[:n_prompt], TOKEN_IDS["run_a"][pid][:n_prompt]))
    longest = max(arr.shape[0] - n for _, n, arr in run_a.values())
    for j in range(longest):
        live = [(pid, n, arr) for pid, (_, n, arr) in run_a.items() if n + j < arr.shape[0]]
        passes.append((2, np.stack([arr[n + j] for _, n, arr in live]),
                       [TOKEN_IDS["run_a"][pid][n + j] for pid, n, _ in live]))
    per_token, per_pass, stat = [], [], []
    for fp, (mode, toks, ids) in enumerate(passes):
        t = toks.shape[0]
        topk = np.full((L_ALL, t, 8), -1, dtype=np.int32)
        count = np.zeros((L_ALL, E + 2), dtype=np.int32)
        logical = np.zeros((L_ALL, E), dtype=np.int32)
        for ti in range(t):
            for l in range(L_MOE):
                for s, e in enumerate(toks[ti, l]):
                    p = replica.get(int(e), int(e)) if ti % 2 == 1 else int(e)
                    topk[l + DENSE, ti, s] = p
                    count[l + DENSE, p] += 1
                    logical[l + DENSE, e] += 1
        common = {"forward_pass_id": fp, "rank": 0, "gatherer_key": "primary"}
        per_token.append({**common, "input_ids": ids, "positions": list(range(t)),
                          "extend_seq_lens": [t] if mode == 1 else None, "forward_mode": mode,
                          "topk_ids_of_layer": tensor(topk), "misc_objects": [],
                          "global_physical_count": tensor(count)})
        per_pass.append({**common, "global_physical_count": tensor(count)})
        stat.append(logical)
    torch_save(os.path.join(OUT, "sglang", "per_token.pt"),
               {"records": per_token, "last_physical_to_logical_map": tensor(phys_to_log)})
    torch_save(os.path.join(OUT, "sglang", "per_pass.pt"),
               {"records": per_pass, "last_physical_to_logical_map": tensor(phys_to_log)})
    torch_save(os.path.join(OUT, "sglang", "stat.pt"),
               {"rank": 0, "logical_count": tensor(np.stack(stat)),
                "average_utilization_rate_over_window": None})
    torch_save(os.path.join(OUT, "sglang", "evil.pt"), {"records": [_Evil()]})


if __name__ == "__main__":
    main()
