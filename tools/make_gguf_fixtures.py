#!/usr/bin/env python3
"""Converts committed Hugging Face fixtures (fixtures/hf/<name>/) to GGUF in llama.cpp's layout,
into fixtures/gguf/<name>/ (model-<type>.gguf + a copy of tokenizer.json).

The layout follows llama.cpp's convert_hf_to_gguf.py (its `conversion/` package in the
llama-cpp-python 0.3.36 source distribution) for the architectures involved, without using it:
- names: gguf's tensor names (`blk.N.attn_q.weight`, `blk.N.ffn_gate_inp.weight`, routed experts
  stacked per layer as `blk.N.ffn_{gate,up,down}_exps.weight` [E, I, H] / [E, H, I], ...);
- transforms: q/k rows permuted for interleaved RoPE (`llama`, `granitemoe`: LlamaModel.permute);
  DeepSeek `kv_b_proj` split into `attn_k_b` (transposed) and `attn_v_b`; Granite's fused
  `input_linear` split into gate / up; GPT-OSS's `gate_up_proj` [E, H, 2I] transposed and
  de-interleaved, `down_proj` transposed, `sinks` named `attn_sinks.weight`, the post-attention
  norm named `post_attention_norm`;
- types: 1-D tensors, `*_norm.weight`, routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`) and non-weight
  tensors stay F32; everything else takes the output type, falling back to F16 when a row length
  is not a multiple of the block size (as convert_hf_to_gguf.py's QuantError fallback);
- metadata: `<arch>.*` keys as the converter writes them (block_count, context_length,
  embedding_length, feed_forward_length, attention.*, rope.*, expert_*), the tokenizer as
  `tokenizer.ggml.*` (gpt2 BPE: tokens, token types, merges, special ids) and the chat template.

Deviation kept on purpose: `attention.layer_norm_rms_epsilon` is the config's value (llama.cpp's
OLMoE converter forces 1e-5; the fixtures use their config's eps).

Usage: /work/venvs/gguf/bin/python tools/make_gguf_fixtures.py [HF_FIXTURE...]   (pinned: tools/requirements-gguf.txt)
Output is deterministic (same inputs → byte-identical files).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import gguf

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "fixtures" / "hf"
OUT = ROOT / "fixtures" / "gguf"

# (HF fixture, output types, split into this many parts for one extra f32 copy or 0)
FIXTURES = [
    ("olmoe-tiny-mha-f32", ["f32", "q8_0", "q4_0"], 2),
    ("qwen3moe-tiny-f32", ["f32"], 0),
    ("qwen2moe-tiny-f32", ["f32"], 0),
    ("deepseekv2-tiny-group-f32", ["f32"], 0),
    ("granitemoe-tiny-f32", ["f32", "q8_0"], 0),
    ("gptoss-tiny-f32", ["f32"], 0),
    # gpt-oss in MXFP4 (tools/hf_ref_gptoss_mxfp4.py): experts re-packed as GGUF MXFP4 (type 39),
    # lossless (the dequantised values quantise back to themselves), everything else F32.
    ("gptoss-tiny-mxfp4", ["mxfp4"], 0),
]

ARCH = {
    "olmoe": "olmoe",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gpt_oss": "gpt-oss",
    "granitemoe": "granitemoe",
    "mixtral": "llama",
}

QTYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "mxfp4": gguf.GGMLQuantizationType.MXFP4,
}
FTYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)


def dequantize_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' _convert_moe_packed_tensors: [E, rows, k/32, 16] + [E, rows, k/32] -> [E, k, rows] f32."""
    lo, hi = FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]
    v = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = np.ldexp(v, scales.astype(np.int32)[..., None] - 127).astype(np.float32)
    return v.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).transpose(0, 2, 1).copy()


def read_safetensors(d: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        b = f.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        header = json.loads(b[8 : 8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            s, e = info["data_offsets"]
            raw = b[8 + n + s : 8 + n + e]
            if info["dtype"] == "F32":
                out[name] = np.frombuffer(raw, dtype="<f4").reshape(info["shape"]).copy()
            elif info["dtype"] == "BF16":  # exact in f32
                u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                out[name] = u.view(np.float32).reshape(info["shape"]).copy()
            elif info["dtype"] == "U8" and name.endswith(("_blocks", "_scales")):
                out[name] = np.frombuffer(raw, dtype=np.uint8).reshape(info["shape"]).copy()
            else:
                raise SystemExit(f"{f}: {name} is {info['dtype']}; only F32/BF16 (and MXFP4) fixtures are converted")
    # MXFP4 experts: dequantised to the f32 tensor transformers would hold.
    for name in [k for k in out if k.endswith("_blocks")]:
        base = name.removesuffix("_blocks")
        out[base] = dequantize_hf_mxfp4(out.pop(name), out.pop(base + "_scales"))
    return out


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # LlamaModel.permute: rows regrouped for llama.cpp's interleaved (non-NeoX) RoPE.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(cfg: dict, t: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    mt = cfg["model_type"]
    arch = ARCH[mt]
    L = cfg["num_hidden_layers"]
    out: list[tuple[str, np.ndarray]] = []
    add = lambda n, a: out.append((n, np.ascontiguousarray(a, dtype=np.float32)))  # noqa: E731

    add("token_embd.weight", t.pop("model.embed_tokens.weight"))
    add("output_norm.weight", t.pop("model.norm.weight"))
    if "lm_head.weight" in t:
        add("output.weight", t.pop("lm_head.weight"))
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    for l in range(L):
        p = f"model.layers.{l}."
        b = f"blk.{l}."
        g = lambda k: t.pop(p + k)  # noqa: E731
        has = lambda k: (p + k) in t  # noqa: E731
        add(b + "attn_norm.weight", g("input_layernorm.weight"))
        post = "post_attention_norm" if arch == "gpt-oss" else "ffn_norm"
        add(b + post + ".weight", g("post_attention_layernorm.weight"))
        # attention
        for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
                       ("q_a_proj", "attn_q_a"), ("q_b_proj", "attn_q_b"), ("kv_a_proj_with_mqa", "attn_kv_a_mqa"),
                       ("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm"),
                       ("q_a_layernorm", "attn_q_a_norm"), ("kv_a_layernorm", "attn_kv_a_norm")]:
            for suf in ("weight", "bias"):
                k = f"self_attn.{hf}.{suf}"
                if has(k):
                    a = g(k)
                    if arch in ("llama", "granitemoe") and hf == "q_proj":
                        a = permute(a, n_head)
                    if arch in ("llama", "granitemoe") and hf == "k_proj":
                        a = permute(a, n_kv)
                    add(f"{b}{gg}.{suf}", a)
        if has("self_attn.sinks"):
            add(b + "attn_sinks.weight", g("self_attn.sinks"))
        if has("self_attn.kv_b_proj.weight"):
            kv_b = g("self_attn.kv_b_proj.weight")
            nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = kv_b.reshape(n_head, nope + vd, kv_b.shape[-1])
            k_b, v_b = kv_b[:, :nope, :], kv_b[:, nope:, :]
            add(b + "attn_k_b.weight", k_b.transpose(0, 2, 1))
            add(b + "attn_v_b.weight", v_b)
        # feed-forward
        E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
        for router in ("mlp.gate.weight", "block_sparse_moe.gate.weight", "block_sparse_moe.router.layer.weight",
                       "mlp.router.weight"):
            if has(router):
                add(b + "ffn_gate_inp.weight", g(router))
        if has("mlp.router.bias"):
            add(b + "ffn_gate_inp.bias", g("mlp.router.bias"))
        if has("mlp.gate.e_score_correction_bias"):
            add(b + "exp_probs_b.bias", g("mlp.gate.e_score_correction_bias"))
        if has("mlp.experts.0.gate_proj.weight") or has("block_sparse_moe.experts.0.w1.weight"):
            names = ({"gate": "w1", "down": "w2", "up": "w3"} if arch == "llama"
                     else {"gate": "gate_proj", "down": "down_proj", "up": "up_proj"})
            base = "block_sparse_moe.experts" if arch == "llama" else "mlp.experts"
            for proj in ("down", "gate", "up"):
                add(f"{b}ffn_{proj}_exps.weight",
                    np.stack([g(f"{base}.{x}.{names[proj]}.weight") for x in range(E)]))
        if has("block_sparse_moe.input_linear.weight"):
            gu = g("block_sparse_moe.input_linear.weight")
            i = gu.shape[1] // 2
            add(b + "ffn_gate_exps.weight", gu[:, :i, :])
            add(b + "ffn_up_exps.weight", gu[:, i:, :])
            add(b + "ffn_down_exps.weight", g("block_sparse_moe.output_linear.weight"))
        if arch == "gpt-oss" and has("mlp.experts.gate_up_proj"):
            gu = g("mlp.experts.gate_up_proj").transpose(0, 2, 1)  # [E, 2I, H]
            add(b + "ffn_gate_exps.weight", gu[:, ::2, :])
            add(b + "ffn_up_exps.weight", gu[:, 1::2, :])
            gub = g("mlp.experts.gate_up_proj_bias")
            add(b + "ffn_gate_exps.bias", gub[..., ::2])
            add(b + "ffn_up_exps.bias", gub[..., 1::2])
            add(b + "ffn_down_exps.weight", g("mlp.experts.down_proj").transpose(0, 2, 1))
            add(b + "ffn_down_exps.bias", g("mlp.experts.down_proj_bias"))
        elif has("mlp.experts.gate_up_proj"):
            gu = g("mlp.experts.gate_up_proj")
            i = gu.shape[1] // 2
            add(b + "ffn_gate_exps.weight", gu[:, :i, :])
            add(b + "ffn_up_exps.weight", gu[:, i:, :])
            add(b + "ffn_down_exps.weight", g("mlp.experts.down_proj"))
        for proj in ("gate", "up", "down"):
            if has(f"mlp.{proj}_proj.weight"):
                add(f"{b}ffn_{proj}.weight", g(f"mlp.{proj}_proj.weight"))
            for sh in ("shared_expert", "shared_experts"):
                if has(f"mlp.{sh}.{proj}_proj.weight"):
                    add(f"{b}ffn_{proj}_shexp.weight", g(f"mlp.{sh}.{proj}_proj.weight"))
        if has("mlp.shared_expert_gate.weight"):
            add(b + "ffn_gate_inp_shexp.weight", g("mlp.shared_expert_gate.weight"))
    if t:
        raise SystemExit(f"unconverted tensors: {sorted(t)}")
    return out


def write_metadata(w: gguf.GGUFWriter, cfg: dict, d: Path, ftype: gguf.LlamaFileType) -> None:
    mt = cfg["model_type"]
    arch = ARCH[mt]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(d.name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    n_head = cfg["num_attention_heads"]
    w.add_head_count(n_head)
    w.add_head_count_kv(1 if arch == "deepseek2" else cfg.get("num_key_value_heads", n_head))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    w.add_expert_count(E)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if (a := rope.get("attention_factor")) is not None:
            w.add_rope_scaling_yarn_attn_factor(a)
        if (bf := rope.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(bf)
        if (bs := rope.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(bs)
    ff = cfg.get("intermediate_size")
    if ff is not None:
        w.add_feed_forward_length(ff)
    if cfg.get("head_dim") is not None and arch not in ("granitemoe", "deepseek2"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if (s := cfg.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(s)
    if arch == "olmoe" and cfg.get("clip_qkv") is not None:
        w.add_clamp_kqv(cfg["clip_qkv"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    if arch == "granitemoe":
        w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
        for key, fn in [("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                        ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)]:
            if cfg.get(key):
                fn(cfg[key])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
    if arch == "gpt-oss":
        w.add_sliding_window(cfg["sliding_window"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        # llama.cpp's gpt-oss clamps at 7; other limits as the per-layer key other archs use.
        if (lim := cfg.get("swiglu_limit", 7.0)) != 7.0:
            w.add_swiglu_clamp_exp([float(lim)] * cfg["num_hidden_layers"])
    if arch == "deepseek2":
        w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        if cfg.get("q_lora_rank") is not None:
            w.add_q_lora_rank(cfg["q_lora_rank"])
        kv = cfg["kv_lora_rank"]
        w.add_kv_lora_rank(kv)
        w.add_key_length(kv + cfg["qk_rope_head_dim"])
        w.add_value_length(kv)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        w.add_value_length_mla(cfg["v_head_dim"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        if (s := cfg.get("routed_scaling_factor")) is not None:
            w.add_expert_weights_scale(s)
        if cfg.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        if cfg.get("n_group") is not None:
            w.add_expert_group_count(cfg["n_group"])
        if cfg.get("topk_group") is not None:
            w.add_expert_group_used_count(cfg["topk_group"])
        if mt == "deepseek_v3":
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        else:
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
        if (m := rope.get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * m)
    # tokenizer (gpt2-style BPE as in the fixtures' tokenizer.json)
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    n = max(max(vocab.values()), max(added, default=0)) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = gguf.TokenType.NORMAL
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = tok["model"].get("merges", [])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    gen = json.loads((d / "generation_config.json").read_text()) if (d / "generation_config.json").exists() else {}
    for key, fn in [("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("pad_token_id", w.add_pad_token_id)]:
        v = gen.get(key, cfg.get(key))
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            fn(v)
    tc = d / "tokenizer_config.json"
    if tc.exists() and isinstance(ct := json.loads(tc.read_text()).get("chat_template"), str):
        w.add_chat_template(ct)


def qtype_for(name: str, a: np.ndarray, out: str) -> gguf.GGMLQuantizationType:
    if a.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if ".ffn_gate_inp." in name or ".ffn_gate_inp_shexp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if out == "mxfp4":  # MOSTLY_MXFP4_MOE: routed experts only
        return QTYPE[out] if "_exps." in name else gguf.GGMLQuantizationType.F32
    return QTYPE[out]


def write(d: Path, out_type: str, dest: Path, split: int = 0) -> list[Path]:
    cfg = json.loads((d / "config.json").read_text())
    tensors = convert_tensors(cfg, read_safetensors(d))
    arch = ARCH[cfg["model_type"]]
    kw = {}
    if split:
        kw["split_max_tensors"] = (len(tensors) + split - 1) // split
    w = gguf.GGUFWriter(dest, arch, **kw)
    write_metadata(w, cfg, d, FTYPE[out_type])
    for name, a in tensors:
        qt = qtype_for(name, a, out_type)
        try:
            data = gguf.quants.quantize(a, qt) if qt != gguf.GGMLQuantizationType.F32 else a
            if qt == gguf.GGMLQuantizationType.MXFP4:  # must be lossless (see FIXTURES)
                assert np.array_equal(gguf.quants.dequantize(data, qt), a), name
        except gguf.QuantError:
            qt = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(a, qt)
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split:
        return sorted(dest.parent.glob(dest.stem + "-*-of-*.gguf"))
    return [dest]


def main() -> int:
    only = set(sys.argv[1:])  # optional: HF fixture names to convert (default: all)
    for name, types, split in FIXTURES:
        if only and name not in only:
            continue
        src = HF / name
        dst = OUT / name.removesuffix("-f32")
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
        for ty in types:
            for p in write(src, ty, dst / f"model-{ty}.gguf"):
                print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")
        if split:
            for p in write(src, "f32", dst / "split" / "model.gguf", split):
                print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")
            shutil.copyfile(src / "tokenizer.json", dst / "split" / "tokenizer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
