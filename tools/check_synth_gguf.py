#!/usr/bin/env python3
"""Checks a GGUF file written by `moe-xray synth-model --format gguf` with the `gguf` package
(llama.cpp's own Python reader, pinned in tools/requirements-gguf.txt):

- the file parses; `general.architecture` is a llama.cpp architecture and every tensor name is one
  of that architecture's tensor names in gguf-py's table (`MODEL_TENSORS[arch]`, with `.weight` /
  `.bias`), with no tensor missing that the file's own blocks imply (attention, norms, router,
  experts);
- every tensor's byte size matches its shape and ggml type, and it dequantises (gguf.quants) to a
  finite array of its shape;
- with `--ref FILE_F32.gguf` (the same model written with `--quant f32`, same seed): the same names
  and shapes, and each tensor's relative RMS error (‖deq − ref‖ / ‖ref‖) is below the bound of its
  type (BF16 0.5 %, Q8_0 1 %, Q6_K 3 %, Q5_K / Q5_0 / Q5_1 6 %, Q4_K / Q4_0 12 %, F16 0.1 %,
  F32 0);
- with `--hf DIR` (gpt-oss `--quant mxfp4` files: the HF MXFP4 checkpoint of the same arguments,
  `synth-model --quant mxfp4`, read here with numpy alone): every MXFP4 expert tensor dequantised
  by gguf-py equals, value for value (bit for bit), the HF `*_blocks` / `*_scales` dequantised the
  way transformers' `integrations/mxfp4.py` does (FP4 table, value 2j in the low nibble of byte
  j, times 2^(scale − 127); gate = even rows, up = odd rows of `gate_up_proj`), and every other
  HF tensor (mapped by gguf-py's `TensorNameMap`, biases split as the converter splits them)
  equals its GGUF tensor.

Prints the type counts and the worst error per type; exits 1 on any failure.

Usage: /work/venvs/gguf/bin/python tools/check_synth_gguf.py FILE.gguf [--ref FILE_F32.gguf]
       [--hf HF_MXFP4_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict

import numpy as np
import gguf
from gguf import GGUFReader

T = gguf.GGMLQuantizationType
BOUND = {
    T.F32: 0.0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 0.01, T.Q6_K: 0.03,
    T.Q5_K: 0.06, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q4_K: 0.12, T.Q4_0: 0.12,
}
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def read_safetensors(d: str) -> dict:
    """name -> numpy array (BF16 / F16 / F32 as float32, U8 as uint8) of every safetensors file."""
    import glob
    import os
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        raw = open(path, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, info in head.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = raw[base + a:base + b]
            dt = info["dtype"]
            if dt == "BF16":
                v = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dt == "F16":
                v = np.frombuffer(buf, np.float16).astype(np.float32)
            elif dt == "F32":
                v = np.frombuffer(buf, np.float32)
            elif dt == "U8":
                v = np.frombuffer(buf, np.uint8)
            else:
                raise ValueError(f"{path}: {name}: dtype {dt}")
            out[name] = v.reshape(info["shape"])
    return out


def hf_mxfp4_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' `convert_moe_packed_tensors` in numpy: [E, R, nb, 16] + [E, R, nb] -> [E, R, nb*32]."""
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    v = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    exp = scales.astype(np.int32) - 127
    v = v * np.ldexp(np.float32(1.0), exp)[..., None].astype(np.float32)
    return v.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def check_hf(r: GGUFReader, ts: dict, arch: str, n_layer: int, hf_dir: str, fails: list) -> dict:
    hf = read_safetensors(hf_dir)
    nmap = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layer)
    seen = set()
    n_values = 0

    def compare(gname: str, want: np.ndarray, what: str):
        nonlocal n_values
        if gname not in ts:
            fails.append(f"{gname}: missing (for {what})")
            return
        t, shape = ts[gname]
        got = dequant(t).reshape(shape)
        seen.add(gname)
        if got.shape != want.shape:
            fails.append(f"{gname}: shape {got.shape}, {what} {want.shape}")
        elif not np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32)):
            bad = int((got != want).sum())
            fails.append(f"{gname}: {bad} values differ from {what}")
        n_values += got.size

    for name, v in hf.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            deq = hf_mxfp4_dequant(v, hf[name[:-len("_blocks")] + "_scales"])
            layer = int(name.split(".")[2])
            if "gate_up_proj" in name:
                compare(f"blk.{layer}.ffn_gate_exps.weight", deq[:, 0::2], name + " (even rows)")
                compare(f"blk.{layer}.ffn_up_exps.weight", deq[:, 1::2], name + " (odd rows)")
            else:
                compare(f"blk.{layer}.ffn_down_exps.weight", deq, name)
            continue
        if name.endswith("gate_up_proj_bias"):
            base = name.replace("gate_up_proj_bias", "")
            g = nmap.get_name(base + "gate_proj.bias", try_suffixes=(".bias",))
            u = nmap.get_name(base + "up_proj.bias", try_suffixes=(".bias",))
            compare(str(g), v[..., 0::2], name + " (even)")
            compare(str(u), v[..., 1::2], name + " (odd)")
            continue
        hname = name.replace("down_proj_bias", "down_proj.bias")
        if hname.endswith("sinks"):
            hname += ".weight"
        g = nmap.get_name(hname, try_suffixes=(".weight", ".bias"))
        if g is None:
            fails.append(f"{name}: no GGUF name in gguf-py's map for {arch}")
            continue
        compare(g, v, name)
    for gname in ts:
        if gname not in seen:
            fails.append(f"{gname}: no HF tensor corresponds to it")
    return {"hf_tensors": len(hf), "gguf_tensors_compared": len(seen), "values_compared": n_values}


def field(r: GGUFReader, key: str):
    f = r.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def arch_names(arch: str, n_layer: int) -> set[str]:
    a = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    out = set()
    for t in gguf.MODEL_TENSORS[a]:
        fmt = gguf.TENSOR_NAMES[t]
        for bid in range(n_layer) if "{bid}" in fmt else [None]:
            base = fmt.format(bid=bid) if bid is not None else fmt
            out.update({base + ".weight", base + ".bias"})
    return out


def tensors(r: GGUFReader) -> dict:
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # outermost first
        out[t.name] = (t, shape)
    return out


def dequant(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--ref")
    ap.add_argument("--hf", help="HF MXFP4 checkpoint directory of the same arguments (gpt-oss --quant mxfp4)")
    a = ap.parse_args()
    r = GGUFReader(a.file)
    fails: list[str] = []
    arch = field(r, "general.architecture")
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        print(f"{a.file}: unknown architecture {arch!r}")
        return 1
    n_layer = int(field(r, f"{arch}.block_count"))
    known = arch_names(arch, n_layer)
    ts = tensors(r)
    for name in ts:
        if name not in known:
            fails.append(f"{name}: not a tensor name of llama.cpp's {arch}")
    for l in range(n_layer):
        for need in ("attn_norm.weight", "ffn_gate_inp.weight"):
            n = f"blk.{l}.{need}"
            if n not in ts and not (need == "ffn_gate_inp.weight" and f"blk.{l}.ffn_down.weight" in ts):
                fails.append(f"{n}: missing")
        if f"blk.{l}.ffn_gate_inp.weight" in ts:
            for p in ("gate", "up", "down"):
                if f"blk.{l}.ffn_{p}_exps.weight" not in ts:
                    fails.append(f"blk.{l}.ffn_{p}_exps.weight: missing")
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", f"{arch}.expert_count",
              f"{arch}.expert_used_count", f"{arch}.embedding_length"):
        if field(r, k) is None:
            fails.append(f"metadata {k}: missing")
    vocab = field(r, f"{arch}.vocab_size")
    ntok = len(field(r, "tokenizer.ggml.tokens") or [])
    if vocab is not None and ntok != int(vocab):
        fails.append(f"tokenizer.ggml.tokens has {ntok} entries, vocab_size is {vocab}")
    ref = tensors(GGUFReader(a.ref)) if a.ref else None
    counts: Counter = Counter()
    worst: dict = defaultdict(float)
    for name, (t, shape) in ts.items():
        ty = T(int(t.tensor_type))
        counts[ty.name] += 1
        bs, ts_ = gguf.GGML_QUANT_SIZES[ty]
        n = int(np.prod(shape))
        want = n // bs * ts_
        if n % bs or int(t.n_bytes) != want:
            fails.append(f"{name}: {t.n_bytes} bytes, {ty.name} {shape} needs {want}")
            continue
        d = dequant(t)
        if tuple(d.shape) != shape:
            fails.append(f"{name}: dequantised shape {d.shape} != {shape}")
            continue
        if not np.isfinite(d).all():
            fails.append(f"{name}: non-finite values")
        if ref is not None:
            if name not in ref:
                fails.append(f"{name}: not in the reference file")
                continue
            rt, rshape = ref[name]
            if rshape != shape:
                fails.append(f"{name}: shape {shape}, reference {rshape}")
                continue
            rv = dequant(rt)
            den = float(np.linalg.norm(rv)) or 1.0
            err = float(np.linalg.norm(d - rv)) / den
            worst[ty.name] = max(worst[ty.name], err)
            if err > BOUND.get(ty, 0.2) + 1e-7:
                fails.append(f"{name} ({ty.name}): relative RMS error {err:.4f} > {BOUND.get(ty, 0.2)}")
    if ref is not None and set(ref) != set(ts):
        fails.append(f"tensor names differ from the reference: {sorted(set(ref) ^ set(ts))[:5]}")
    # MXFP4 files: the converter writes the repacked experts first (`generate_extra_tensors`)
    mx = [t.name for t in r.tensors if int(t.tensor_type) == int(T.MXFP4)]
    if mx and [t.name for t in r.tensors[:len(mx)]] != mx:
        fails.append("MXFP4 tensors are not the first tensors of the file (the converter's order)")
    hf_summary = check_hf(r, ts, arch, n_layer, a.hf, fails) if a.hf else None
    synth = field(r, "moe_xray.synth")
    print(json.dumps({
        "file": a.file, "arch": arch, "tensors": len(ts), "types": dict(sorted(counts.items())),
        "file_type": int(field(r, "general.file_type")),
        "worst_relative_rms_error": {k: round(v, 5) for k, v in sorted(worst.items())} if ref else None,
        "synth": json.loads(synth) if synth else None,
        "hf_comparison": hf_summary,
        "failures": fails[:20], "num_failures": len(fails),
    }, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
