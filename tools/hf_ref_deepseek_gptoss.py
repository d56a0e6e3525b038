#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers for the deepseek_v2, deepseek_v3 and gpt_oss families.

Companion of tools/hf_reference.py (OLMoE): it imports that module for the tokenizer, prompt set, chat template,
chat fixture and checkpoint writer, so the prompts and tokenizers are the same. Writes, per model,
fixtures/hf/<model>/ (checkpoint by `save_pretrained`, tokenizer, prompt_ids.jsonl, expected_generations.jsonl,
expected_chat.jsonl, expected_trace.jsonl) and fixtures/hf/summary-hf_ref_deepseek_gptoss.json, and replaces its
own section of fixtures/hf/README.md (between the markers below).

Facts checked in the pinned transformers 5.24.0 (math notes: /work/notes/s7/family-{deepseek_v2,deepseek_v3,
gpt_oss}.md) and relied upon here:
- Routers return `(router_logits, weights, indices)`: `DeepseekV2TopkRouter` / `DeepseekV3TopkRouter` at
  `model.layers[i].mlp.gate` (MoE layers only, i >= first_k_dense_replace), `GptOssTopKRouter` at
  `model.layers[i].mlp.router`. The returned weights are exactly the coefficients the experts module multiplies
  each expert output by (V2: softmax prob * routed_scaling_factor, no renormalisation; V3: sigmoid score without
  the correction bias, renormalised if norm_topk_prob, * routed_scaling_factor; gpt_oss: softmax over the k
  selected logits). They are recorded as `weights`, in the order the router returns the indices (`sorted=False`
  for DeepSeek: heap order, compare sets).
- DeepSeek router logits are f32 in every dtype (`gate.weight` and `e_score_correction_bias` are in
  `_keep_in_fp32_modules_strict`); gpt_oss router logits are in the model dtype.
- Trace: teacher-forced forward over prompt + generated ids (batch 1, eager attention, eager experts); for f32
  models the script asserts that the routing seen during `generate()` (KV cache, MLA latent cache, sliding-window
  cache) equals the teacher-forced routing on every position generate() processed.

Initialisation: transformers' own init (`torch.manual_seed(seed)`), then, so that every feature matters for the
routing (a test must fail if a feature were ignored): router rows std ROUTER_LOGIT_STD/sqrt(hidden) (as
hf_reference.py), lm_head std 1/sqrt(hidden), embeddings std 1, every other projection matrix (attention,
MLA, dense/shared MLP, experts) std GAIN/sqrt(fan_in) (transformers' 0.02 would make attention and experts
negligible next to the residual stream), biases std 0.1 (gpt_oss expert biases 0.5), DeepSeek-V3 correction
bias std CORR_BIAS_STD, gpt_oss router bias std 0.5 and sinks std 1.0. See `init_weights`.

Usage: /work/venvs/hf/bin/python tools/hf_ref_deepseek_gptoss.py [--out fixtures/hf] [--only NAME]
"""

from __future__ import annotations

import copy
import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
)

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import hf_reference as ref  # noqa: E402  (tokenizer, prompts, chat template, checkpoint writer)

ROUTER_LOGIT_STD = ref.ROUTER_LOGIT_STD
MAX_NEW_TOKENS = ref.MAX_NEW_TOKENS
GAIN = 1.0
CORR_BIAS_STD = 0.1
README_BEGIN = "<!-- BEGIN hf_ref_deepseek_gptoss.py -->"
README_END = "<!-- END hf_ref_deepseek_gptoss.py -->"

# DeepSeek-V2-Lite's rope_scaling, shrunk: factor 4 instead of 40, original_max_position_embeddings 256 so that the
# YaRN ramp falls inside the 4 rope frequencies of a rope head dim of 8; mscale = mscale_all_dim = 0.707 as in
# V2-Lite (attention_factor exactly 1, softmax scale multiplied by mscale^2).
YARN_V2 = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256,
    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
)
# V3: mscale != mscale_all_dim so that both the cos/sin attention factor and the softmax mscale differ from 1.
YARN_V3 = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256,
    beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.707,
)
# gpt-oss-20b's rope_parameters (yarn, factor 32, truncate false) unchanged.
YARN_OSS = dict(
    rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096,
    beta_fast=32.0, beta_slow=1.0, truncate=False,
)

COMMON = dict(pad_token_id=1, eos_token_id=0, bos_token_id=0, tie_word_embeddings=False)

MODELS = [
    dict(
        name="deepseekv2-tiny-greedy-f32", family="deepseek_v2", seed=101, dtype=torch.float32, shard=None,
        config=dict(
            vocab_size=512, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
            topk_method="greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
            max_position_embeddings=1024, rope_parameters=dict(YARN_V2),
        ),
    ),
    dict(
        name="deepseekv2-tiny-group-f32", family="deepseek_v2", seed=202, dtype=torch.float32, shard="150KB",
        config=dict(
            vocab_size=576, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
            topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.25,
            # norm_topk_prob is set but IGNORED by the V2 router (trap: an implementation must not renormalise)
            norm_topk_prob=True, attention_bias=True,
            max_position_embeddings=1024, rope_parameters=dict(YARN_V2),
        ),
    ),
    dict(
        name="deepseekv3-tiny-f32", family="deepseek_v3", seed=303, dtype=torch.float32, shard=None,
        config=dict(
            vocab_size=640, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
            n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
            max_position_embeddings=1024, rope_parameters=dict(YARN_V3),
        ),
    ),
    dict(
        name="deepseekv3-tiny-bf16", family="deepseek_v3", seed=404, dtype=torch.bfloat16, shard=None,
        config=dict(
            vocab_size=640, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
            n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
            max_position_embeddings=1024, rope_parameters=dict(YARN_V3),
        ),
    ),
    dict(
        name="gptoss-tiny-f32", family="gpt_oss", seed=505, dtype=torch.float32, shard=None,
        config=dict(
            vocab_size=512, hidden_size=48, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=12, num_experts_per_tok=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
            swiglu_limit=4.0, swiglu_alpha=1.702, rms_norm_eps=1e-5, attention_bias=True,
            max_position_embeddings=131072, rope_parameters=dict(YARN_OSS),
        ),
    ),
    # gptoss-tiny-f32 (same seed, same weights) saved in bf16: transformers' gpt_oss has no strict-fp32 modules,
    # so every tensor (router, bias, sinks, norms) is bf16 and the router logits and weights are bf16.
    dict(
        name="gptoss-tiny-bf16", family="gpt_oss", seed=505, dtype=torch.bfloat16, shard=None,
        config=dict(
            vocab_size=512, hidden_size=48, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=12, num_experts_per_tok=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
            swiglu_limit=4.0, swiglu_alpha=1.702, rms_norm_eps=1e-5, attention_bias=True,
            max_position_embeddings=131072, rope_parameters=dict(YARN_OSS),
        ),
    ),
]

# deepseekv2-tiny-group-f32 (same seed, same weights) as a user gets it in bf16 (see `write_checkpoint`), listed
# right after its f32 twin.
MODELS.insert(
    next(i for i, m in enumerate(MODELS) if m["name"] == "deepseekv2-tiny-group-f32") + 1,
    {**copy.deepcopy(next(m for m in MODELS if m["name"] == "deepseekv2-tiny-group-f32")),
     "name": "deepseekv2-tiny-group-bf16", "dtype": torch.bfloat16, "shard": None},
)

CLASSES = {
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM),
}


def router_of(layer, family):
    if family == "gpt_oss":
        return layer.mlp.router
    gate = getattr(layer.mlp, "gate", None)
    # dense DeepSeek layers have an MLP whose gate_proj is a Linear, no `gate` attribute
    return gate if gate is not None and not isinstance(gate, torch.nn.Linear) else None


def moe_layers(model, family) -> list[int]:
    return [i for i, l in enumerate(model.model.layers) if router_of(l, family) is not None]


def num_experts(cfg, family) -> int:
    return cfg.num_local_experts if family == "gpt_oss" else cfg.n_routed_experts


def init_weights(model, spec):
    """Re-draw the weights (after transformers' init) so every feature matters; see the module docstring."""
    fam = spec["family"]
    cfg = model.config
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if name == "model.embed_tokens.weight":
                p.copy_(randn(p.shape, 1.0))
            elif name == "lm_head.weight":
                p.copy_(randn(p.shape, 1.0 / math.sqrt(h)))
            elif "norm" in name:
                p.copy_(1.0 + randn(p.shape, 0.1))  # non-trivial norm weights (a missed norm weight shows)
            elif name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
                p.copy_(randn(p.shape, ROUTER_LOGIT_STD / math.sqrt(h)))
            elif name.endswith("mlp.router.bias"):
                p.copy_(randn(p.shape, 0.5))
            elif leaf == "sinks":
                p.copy_(randn(p.shape, 1.0))
            elif fam == "gpt_oss" and leaf == "gate_up_proj":  # [E, H, 2I], x @ W
                p.copy_(randn(p.shape, 2.5 / math.sqrt(p.shape[1])))  # |gate/up| often > swiglu_limit
            elif fam == "gpt_oss" and leaf == "down_proj":  # [E, I, H]
                p.copy_(randn(p.shape, GAIN / math.sqrt(p.shape[1])))
            elif fam == "gpt_oss" and leaf in ("gate_up_proj_bias", "down_proj_bias"):
                p.copy_(randn(p.shape, 0.5))
            elif leaf in ("gate_up_proj", "down_proj"):  # DeepSeek fused experts [E, out, in]
                p.copy_(randn(p.shape, GAIN / math.sqrt(p.shape[2])))
            elif leaf == "weight" and p.dim() == 2:  # nn.Linear [out, in]
                p.copy_(randn(p.shape, GAIN / math.sqrt(p.shape[1])))
            elif leaf == "bias":
                p.copy_(randn(p.shape, 0.1))
            else:
                raise AssertionError(f"unhandled parameter {name} {tuple(p.shape)}")
        if fam == "deepseek_v3":
            for i in moe_layers(model, fam):
                b = model.model.layers[i].mlp.gate.e_score_correction_bias
                b.copy_(randn(b.shape, CORR_BIAS_STD))


def make_model(spec):
    cfg_cls, model_cls = CLASSES[spec["family"]]
    cfg = cfg_cls(**COMMON, **spec["config"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = model_cls(cfg)
    init_weights(model, spec)
    model.eval()
    ref.set_impl(model)
    return model


def write_checkpoint(model, spec, tok, out: Path) -> dict:
    """save_pretrained (+ tokenizer files) via hf_reference.save_checkpoint; bf16 goes through from_pretrained."""
    if spec["dtype"] == torch.float32:
        info = ref.save_checkpoint(model, dict(spec, layout="published"), tok, out)
    else:
        # The way a user gets a bf16 checkpoint: load the f32 one with dtype=bfloat16 (transformers keeps the
        # `_keep_in_fp32_modules_strict` tensors in f32) and save it.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = type(model).from_pretrained(tmp, dtype=spec["dtype"])
            ref.set_impl(model)
            model.eval()
        if spec["family"] == "gpt_oss":
            # gpt_oss has no `_keep_in_fp32_modules_strict`: every tensor is now bf16; save it as it is.
            info = ref.save_checkpoint(model, dict(spec, layout="published"), tok, out)
            return _describe_written(info, spec, out), model
        # transformers now holds `mlp.gate.weight` in f32 (strict fp32 list). Published DeepSeek-V2/V3/Moonlight
        # bf16 checkpoints store it in bf16 (and e_score_correction_bias in f32): round it to bf16 values here,
        # save, and store that tensor as bf16 on disk (lossless); transformers upcasts it back to f32 at load
        # (checked by `reload`, which compares logits bit for bit).
        with torch.no_grad():
            for i in moe_layers(model, spec["family"]):
                w = model.model.layers[i].mlp.gate.weight
                w.copy_(w.to(torch.bfloat16).to(w.dtype))
        info = ref.save_checkpoint(model, dict(spec, layout="published"), tok, out)
        files = sorted(out.glob("*.safetensors"))
        assert len(files) == 1, files
        sd = ref.read_safetensors_dir(out)
        sd = {k: (v.to(torch.bfloat16) if k.endswith("mlp.gate.weight") else v).contiguous() for k, v in sd.items()}
        save_file(sd, str(files[0]), metadata={"format": "pt"})
        info["postprocessed"] = (
            "mlp.gate.weight stored as bfloat16 (published layout); everything else as save_pretrained wrote it"
        )
    return _describe_written(info, spec, out), model


def _describe_written(info: dict, spec, out: Path) -> dict:
    written = ref.read_safetensors_dir(out)
    info["layout"] = (
        "fused gpt_oss layout (gate_up_proj [E,H,2I] interleaved, down_proj [E,I,H], biases), "
        "written by save_pretrained"
        if spec["family"] == "gpt_oss"
        else "per_expert (mlp.experts.{e}.{gate,up,down}_proj.weight), written by save_pretrained"
    )
    info.pop("config_form", None)
    info["shards"] = len(list(out.glob("*.safetensors")))
    info["tensor_dtypes"] = {}
    for k, v in sorted(written.items()):
        short = k.split(".")
        key = ".".join(s if not s.isdigit() else "N" for s in short)
        info["tensor_dtypes"].setdefault(key, str(v.dtype).replace("torch.", ""))
    return info


def reload(model, spec, out: Path, ids):
    """Load the written directory (what a user does): the reference runs on it; logits must be bit-identical."""
    cls = type(model)
    m2 = cls.from_pretrained(str(out), dtype=spec["dtype"])
    ref.set_impl(m2)
    m2.eval()
    for i in moe_layers(m2, spec["family"]):
        if spec["family"] != "gpt_oss":
            assert m2.model.layers[i].mlp.gate.weight.dtype == torch.float32
    x = torch.tensor([ids])
    with torch.no_grad():
        a = model(x).logits
        b = m2(x).logits
    assert torch.equal(a, b), f"{out}: reloaded model differs (max {float((a - b).float().abs().max())})"
    return m2


class Capture:
    """Forward hooks on every MoE layer's router: (logits, weights, indices) per call."""

    def __init__(self, model, family):
        self.layers = moe_layers(model, family)
        self.calls = {l: [] for l in self.layers}
        self.handles = []
        for l in self.layers:
            r = router_of(model.model.layers[l], family)
            self.handles.append(r.register_forward_hook(self._hook(l)))

    def _hook(self, l):
        def hook(module, inputs, output):
            logits, weights, indices = output  # checked: (router_logits, router weights/scores, router_indices)
            self.calls[l].append(
                (logits.detach().float().clone(), weights.detach().float().clone(), indices.detach().clone())
            )

        return hook

    def reset(self):
        self.calls = {l: [] for l in self.layers}

    def close(self):
        for h in self.handles:
            h.remove()


def topk_set(x: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(x, k).indices.tolist())


def routing_analysis(family, cfg, router, logits: torch.Tensor, idx: list[int]) -> dict:
    """probs, margin and the local feature checks for one token (logits f32 [E])."""
    k = cfg.num_experts_per_tok
    E = logits.shape[0]
    out = {}
    if family == "gpt_oss":
        probs = torch.softmax(logits, dim=-1)
        s = torch.sort(logits, descending=True).values
        out["margin"] = float(s[k - 1] - s[k])
        bias = router.bias.detach().float()
        out["bias_changed"] = topk_set(logits - bias, k) != set(idx)
    elif family == "deepseek_v2":
        probs = torch.softmax(logits, dim=-1)
        s = torch.sort(probs, descending=True).values
        plain_margin = float(s[k - 1] - s[k])
        if cfg.topk_method == "group_limited_greedy":
            ng, tg = cfg.n_group, cfg.topk_group
            gs = probs.view(ng, E // ng).max(dim=-1).values
            gss = torch.sort(gs, descending=True).values
            group_margin = float(gss[tg - 1] - gss[tg])
            chosen = torch.topk(gs, tg).indices
            mask = torch.zeros(ng, dtype=torch.bool)
            mask[chosen] = True
            cand = probs.view(ng, E // ng)[mask].flatten()
            cs = torch.sort(cand, descending=True).values
            out["margin"] = min(group_margin, float(cs[k - 1] - cs[k]))
            out["group_changed"] = topk_set(probs, k) != set(idx)
        else:
            out["margin"] = plain_margin
    else:  # deepseek_v3
        probs = torch.sigmoid(logits)
        bias = router.e_score_correction_bias.detach().float()
        ng, tg = cfg.n_group, cfg.topk_group

        def choose(sfc):
            gs = sfc.view(ng, E // ng).topk(2, dim=-1).values.sum(-1)
            chosen = torch.topk(gs, tg).indices
            mask = torch.zeros(ng, dtype=torch.bool)
            mask[chosen] = True
            m = sfc.view(ng, E // ng).masked_fill(~mask[:, None], float("-inf")).flatten()
            return gs, m

        sfc = probs + bias
        gs, m = choose(sfc)
        gss = torch.sort(gs, descending=True).values
        ms = torch.sort(m, descending=True).values
        out["margin"] = min(float(gss[tg - 1] - gss[tg]), float(ms[k - 1] - ms[k]))
        assert set(torch.topk(m, k).indices.tolist()) == set(idx), "V3 routing re-derivation mismatch"
        _, m_nobias = choose(probs)
        out["bias_changed"] = set(torch.topk(m_nobias, k).indices.tolist()) != set(idx)
        out["group_changed"] = topk_set(sfc, k) != set(idx)
    out["probs"] = probs
    return out


def teacher_forced(model, cap, full_ids):
    cap.reset()
    with torch.no_grad():
        model(torch.tensor([full_ids], dtype=torch.long))
    return {l: cap.calls[l][0] for l in cap.layers}


def run_model(model, spec, tok, out: Path, prompts_ids):
    fam = spec["family"]
    cfg = model.config
    E = num_experts(cfg, fam)
    cap = Capture(model, fam)
    layers = cap.layers
    gens, trace, fulls = [], [], []
    usage = {l: np.zeros(E, dtype=np.int64) for l in layers}
    stats = dict(records=0, min_router_margin=float("inf"), min_logit_margin=float("inf"))
    mism = 0
    counts = {}
    for (pid, cat, _text), ids in zip(ref.PROMPTS, prompts_ids):
        input_ids = torch.tensor([ids], dtype=torch.long)
        cap.reset()
        with torch.no_grad():
            res = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                output_scores=True, return_dict_in_generate=True,
            )
        full = res.sequences[0].tolist()
        fulls.append(full)
        generated = full[len(ids):]
        margins = []
        for s in res.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        stats["min_logit_margin"] = min(stats["min_logit_margin"], min(margins))
        gen_idx = {l: torch.cat([c[2] for c in cap.calls[l]], 0) for l in layers}
        stopped = len(generated) < MAX_NEW_TOKENS or (generated and generated[-1] == cfg.eos_token_id)
        gens.append(
            {
                "prompt_id": pid, "prompt_ids": ids, "generated_ids": generated,
                "generated_text": tok.decode(generated, skip_special_tokens=False),
                "stopped_on_eos": bool(stopped), "max_new_tokens": MAX_NEW_TOKENS, "logit_margins": margins,
            }
        )
        tf = teacher_forced(model, cap, full)
        for pos in range(len(full)):
            for l in layers:
                logits, weights, idx = tf[l]
                ex = idx[pos].tolist()
                router = router_of(model.model.layers[l], fam)
                a = routing_analysis(fam, cfg, router, logits[pos], ex)
                for key in ("bias_changed", "group_changed"):
                    if key in a:
                        counts[key] = counts.get(key, 0) + int(a[key])
                stats["min_router_margin"] = min(stats["min_router_margin"], a["margin"])
                usage[l][ex] += 1
                if pos < gen_idx[l].shape[0] and set(gen_idx[l][pos].tolist()) != set(ex):
                    mism += 1
                trace.append(
                    {
                        "prompt_id": pid, "category": cat, "layer": l, "position": pos, "token_id": full[pos],
                        "token_type": "prompt" if pos < len(ids) else "generation",
                        "experts": ex,
                        "weights": [float(w) for w in weights[pos].tolist()],
                        "probs": ref.f32list(a["probs"]),
                        "logits": ref.f32list(logits[pos]),
                        "margin": a["margin"],
                    }
                )
                stats["records"] += 1
    cap.close()
    with open(out / "expected_trace.jsonl", "w") as f:
        for rec in trace:
            f.write(json.dumps(rec) + "\n")
    with open(out / "expected_generations.jsonl", "w") as f:
        for g in gens:
            f.write(json.dumps(g) + "\n")
    stats["generate_vs_teacher_forced_mismatches"] = mism
    stats["moe_layers"] = layers
    stats["dense_layers"] = [i for i in range(cfg.num_hidden_layers) if i not in layers]
    stats["experts_used_per_layer"] = {str(l): int((usage[l] > 0).sum()) for l in layers}
    stats["max_over_mean_load_per_layer"] = {
        str(l): round(float(usage[l].max() / usage[l].mean()), 3) for l in layers
    }
    stats["feature_effects"] = {f"records_{k}": v for k, v in counts.items()}
    check_weight_semantics(fam, cfg, trace, bf16=spec["dtype"] == torch.bfloat16)
    return stats, trace, fulls


def check_weight_semantics(fam, cfg, trace, bf16=False):
    """Assert the documented meaning of `weights` on every record."""
    rsf = getattr(cfg, "routed_scaling_factor", None)
    for r in trace:
        w = torch.tensor(r["weights"], dtype=torch.float64)
        p = torch.tensor(r["probs"], dtype=torch.float64)
        sel = p[r["experts"]]
        if fam == "deepseek_v2":  # softmax prob * routed_scaling_factor, never renormalised
            exp = sel * rsf
        elif fam == "deepseek_v3":  # sigmoid (no bias), renormalised, * routed_scaling_factor
            exp = sel / (sel.sum() + 1e-20) * rsf if cfg.norm_topk_prob else sel * rsf
        else:  # softmax over the k selected logits
            lg = torch.tensor(r["logits"], dtype=torch.float64)[r["experts"]]
            exp = torch.softmax(lg, dim=-1)
        # The router math is f32 in every dtype for DeepSeek. gpt_oss computes it in the model dtype: in bf16 the
        # softmax over the k is rounded to bf16 (ulp 2^-8 = 3.9e-3 just below 1), so allow two ulps there.
        tol = 8e-3 if (bf16 and fam == "gpt_oss") else 1e-5
        assert torch.allclose(w, exp, atol=tol, rtol=0), (fam, r["prompt_id"], r["position"], w, exp)


def expert_sets(model, fam, fulls):
    cap = Capture(model, fam)
    out = []
    for full in fulls:
        tf = teacher_forced(model, cap, full)
        for pos in range(len(full)):
            for l in cap.layers:
                out.append(frozenset(tf[l][2][pos].tolist()))
    cap.close()
    return out


def changed(a, b):
    return sum(int(x != y) for x, y in zip(a, b))


@contextlib.contextmanager
def patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def ablations(model, spec, fulls) -> dict:
    """Re-run the teacher-forced forwards with one feature switched off; count records whose expert set changes."""
    fam = spec["family"]
    cfg = model.config
    base = expert_sets(model, fam, fulls)
    res = {}
    if fam in ("deepseek_v2", "deepseek_v3"):
        rot = model.model.rotary_emb
        d = cfg.qk_rope_head_dim
        theta = cfg.rope_parameters["rope_theta"]
        plain = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        plain_scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
        with contextlib.ExitStack() as st:
            for layer in model.model.layers:
                st.enter_context(patched(layer.self_attn, "scaling", plain_scale))
            res["records_changed_without_softmax_mscale"] = changed(base, expert_sets(model, fam, fulls))
        with contextlib.ExitStack() as st:
            st.enter_context(patched(rot, "inv_freq", plain))
            st.enter_context(patched(rot, "attention_scaling", 1.0))
            for layer in model.model.layers:
                st.enter_context(patched(layer.self_attn, "scaling", plain_scale))
            res["records_changed_without_yarn"] = changed(base, expert_sets(model, fam, fulls))
    if fam == "gpt_oss":
        with contextlib.ExitStack() as st:
            for layer in model.model.layers:
                s = layer.self_attn.sinks
                off = torch.nn.Parameter(torch.full_like(s, float("-inf")), requires_grad=False)
                st.enter_context(patched(layer.self_attn, "sinks", off))
            res["records_changed_without_sinks"] = changed(base, expert_sets(model, fam, fulls))
        with patched(cfg, "sliding_window", 10**6):
            res["records_changed_without_sliding_window"] = changed(base, expert_sets(model, fam, fulls))
        with contextlib.ExitStack() as st:
            for layer in model.model.layers:
                st.enter_context(patched(layer.mlp.experts, "limit", float("inf")))
            res["records_changed_without_swiglu_clamp"] = changed(base, expert_sets(model, fam, fulls))
        with contextlib.ExitStack() as st:
            for layer in model.model.layers:
                st.enter_context(patched(layer.mlp.router, "bias", None))
            res["records_changed_without_router_bias_everywhere"] = changed(base, expert_sets(model, fam, fulls))
        res.update(clamp_and_sink_stats(model, fulls))
    return res


def clamp_and_sink_stats(model, fulls) -> dict:
    """Count clamped SwiGLU activations (over every routed (token, expert) pair) and the attention mass of sinks."""
    tot = dict(gate_elems=0, gate_clamped=0, up_clamped_high=0, up_clamped_low=0)
    sink_mass = []
    handles = []
    originals = []
    for layer in model.model.layers:
        ex = layer.mlp.experts
        orig = ex._apply_gate
        originals.append((ex, orig))

        def counting(gate_up, _orig=orig, _ex=ex):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            tot["gate_elems"] += gate.numel()
            tot["gate_clamped"] += int((gate > _ex.limit).sum())
            tot["up_clamped_high"] += int((up > _ex.limit).sum())
            tot["up_clamped_low"] += int((up < -_ex.limit).sum())
            return _orig(gate_up)

        ex._apply_gate = counting

        def sink_hook(m, i, o):
            w = o[1]  # attention probabilities without the sink column: [b, h, q, kv]
            sink_mass.append((1.0 - w.float().sum(-1)).flatten())

        handles.append(layer.self_attn.register_forward_hook(sink_hook))
    try:
        with torch.no_grad():
            for full in fulls:
                model(torch.tensor([full]))
    finally:
        for h in handles:
            h.remove()
        for ex, _orig in originals:
            del ex._apply_gate
    sm = torch.cat(sink_mass)
    return {
        "swiglu_limit": model.config.swiglu_limit,
        "swiglu_gate_elements": tot["gate_elems"],
        "swiglu_gate_clamped_above": tot["gate_clamped"],
        "swiglu_up_clamped_above": tot["up_clamped_high"],
        "swiglu_up_clamped_below": tot["up_clamped_low"],
        "sink_attention_mass_mean": round(float(sm.mean()), 4),
        "sink_attention_mass_min": round(float(sm.min()), 4),
        "sink_attention_mass_max": round(float(sm.max()), 4),
    }


# ---------------------------------------------------------------------------------------------------------------
# Independent re-implementation, written from the family notes (/work/notes/s7/family-*.md) and reading only the
# written config.json + safetensors: checks that the notes describe exactly what transformers computes.
# f64 throughout; batch 1, full causal sequence, no cache.


def _yarn_inv_freq(d: int, rp: dict, max_pos: int):
    theta = rp["rope_theta"]
    pos_freqs = theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if rp.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rp.get("factor") or max_pos / rp["original_max_position_embeddings"]
    orig = rp["original_max_position_embeddings"]

    def get_mscale(sc, m=1.0):
        return 1.0 if sc <= 1 else 0.1 * m * math.log(sc) + 1.0

    af = rp.get("attention_factor")
    if af is None:
        if rp.get("mscale") and rp.get("mscale_all_dim"):
            af = get_mscale(factor, rp["mscale"]) / get_mscale(factor, rp["mscale_all_dim"])
        else:
            af = get_mscale(factor)
    bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def corr(n):
        return d * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr(bf), corr(bs)
    if rp.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, af


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def independent_forward(out: Path, ids: list[int]):
    """Returns (logits [s, V], {layer: (expert sets per position, weights per position)})."""
    cfg = json.loads((out / "config.json").read_text())
    W = {k: v.to(torch.float64) for k, v in ref.read_safetensors_dir(out).items()}
    fam = cfg["model_type"]
    s = len(ids)
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    pos = torch.arange(s, dtype=torch.float64)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    x = W["model.embed_tokens.weight"][ids]
    routing = {}

    def lin(t, name, bias=True):
        y = t @ W[name + ".weight"].T
        if bias and name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    if fam in ("deepseek_v2", "deepseek_v3"):
        dn, dr, dv, R = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        rp = cfg["rope_parameters"]
        inv, af = _yarn_inv_freq(dr, rp, cfg["max_position_embeddings"])
        ang = pos[:, None] * inv[None, :]  # [s, dr/2]
        c, sn = torch.cos(ang) * af, torch.sin(ang) * af
        scale = (dn + dr) ** -0.5
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0 if rp["factor"] > 1 else 1.0
            scale = scale * m * m

        def rope(t):  # interleaved pairs (2j, 2j+1), output interleaved
            a, b = t[..., 0::2], t[..., 1::2]
            o = torch.empty_like(t)
            o[..., 0::2] = a * c - b * sn
            o[..., 1::2] = a * sn + b * c
            return o

        E = cfg["n_routed_experts"]
        k = cfg["num_experts_per_tok"]
        eps = cfg["rms_norm_eps"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = _rms(x, W[f"{p}.input_layernorm.weight"], eps)
            if cfg["q_lora_rank"] is None:
                q = lin(h, f"{p}.self_attn.q_proj")
            else:
                qa = _rms(lin(h, f"{p}.self_attn.q_a_proj"), W[f"{p}.self_attn.q_a_layernorm.weight"], 1e-6)
                q = lin(qa, f"{p}.self_attn.q_b_proj")
            q = q.view(s, nh, dn + dr)
            ckv = lin(h, f"{p}.self_attn.kv_a_proj_with_mqa")
            lat = _rms(ckv[:, :R], W[f"{p}.self_attn.kv_a_layernorm.weight"], 1e-6)
            kpe = rope(ckv[:, R:])  # [s, dr], shared by all heads
            qpe = rope(q[..., dn:].transpose(0, 1)).transpose(0, 1)  # [s, nh, dr]
            kv = lin(lat, f"{p}.self_attn.kv_b_proj").view(s, nh, dn + dv)
            knope, v = kv[..., :dn], kv[..., dn:]
            sc = (torch.einsum("qhd,khd->hqk", q[..., :dn], knope) + torch.einsum("qhd,kd->hqk", qpe, kpe)) * scale
            sc = sc.masked_fill(~causal, float("-inf"))
            pr = torch.softmax(sc, -1)
            att = torch.einsum("hqk,khd->qhd", pr, v).reshape(s, nh * dv)
            x = x + lin(att, f"{p}.self_attn.o_proj")
            h = _rms(x, W[f"{p}.post_attention_layernorm.weight"], eps)

            def mlp(t, pre):
                act = torch.nn.functional.silu(lin(t, f"{pre}.gate_proj")) * lin(t, f"{pre}.up_proj")
                return lin(act, f"{pre}.down_proj")

            if f"{p}.mlp.gate.weight" not in W:
                x = x + mlp(h, f"{p}.mlp")
                continue
            logits = h @ W[f"{p}.mlp.gate.weight"].T
            rsf = cfg["routed_scaling_factor"]
            sets, wts = [], []
            y = mlp(h, f"{p}.mlp.shared_experts")
            for t in range(s):
                if fam == "deepseek_v2":
                    sc_ = torch.softmax(logits[t], -1)
                    if cfg["topk_method"] == "group_limited_greedy":
                        ng, tg = cfg["n_group"], cfg["topk_group"]
                        gs = sc_.view(ng, E // ng).max(-1).values
                        keep = torch.zeros(ng, dtype=torch.bool)
                        keep[torch.topk(gs, tg).indices] = True
                        rank = sc_.view(ng, E // ng).masked_fill(~keep[:, None], 0.0).flatten()
                    else:
                        rank = sc_
                    idx = torch.topk(rank, k).indices
                    w = sc_[idx] * rsf
                else:
                    sg = torch.sigmoid(logits[t])
                    sfc = sg + W[f"{p}.mlp.gate.e_score_correction_bias"]
                    ng, tg = cfg["n_group"], cfg["topk_group"]
                    gs = sfc.view(ng, E // ng).topk(2, -1).values.sum(-1)
                    keep = torch.zeros(ng, dtype=torch.bool)
                    keep[torch.topk(gs, tg).indices] = True
                    rank = sfc.view(ng, E // ng).masked_fill(~keep[:, None], float("-inf")).flatten()
                    idx = torch.topk(rank, k).indices
                    w = sg[idx]
                    if cfg["norm_topk_prob"]:
                        w = w / (w.sum() + 1e-20)
                    w = w * rsf
                sets.append(set(idx.tolist()))
                wts.append(dict(zip(idx.tolist(), w.tolist())))
                for e, we in zip(idx.tolist(), w.tolist()):
                    y[t] = y[t] + we * mlp(h[t : t + 1], f"{p}.mlp.experts.{e}")[0]
            routing[i] = (sets, wts)
            x = x + y
        x = _rms(x, W["model.norm.weight"], cfg["rms_norm_eps"])
        return x @ W["lm_head.weight"].T, routing

    assert fam == "gpt_oss", fam
    hd, nkv = cfg["head_dim"], cfg["num_key_value_heads"]
    inv, af = _yarn_inv_freq(hd, cfg["rope_parameters"], cfg["max_position_embeddings"])
    ang = pos[:, None] * inv[None, :]
    c, sn = (torch.cos(ang) * af)[:, None, :], (torch.sin(ang) * af)[:, None, :]

    def rope(t):  # half rotation [s, heads, hd]
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * c - b * sn, b * c + a * sn], -1)

    eps = cfg["rms_norm_eps"]
    k = cfg["num_experts_per_tok"]
    lim, alpha = cfg["swiglu_limit"], cfg["swiglu_alpha"]
    qi = torch.arange(s)[:, None]
    ki = torch.arange(s)[None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, W[f"{p}.input_layernorm.weight"], eps)
        q = rope(lin(h, f"{p}.self_attn.q_proj").view(s, nh, hd))
        kk = rope(lin(h, f"{p}.self_attn.k_proj").view(s, nkv, hd))
        v = lin(h, f"{p}.self_attn.v_proj").view(s, nkv, hd)
        rep = nh // nkv
        kk, v = kk.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        sc = torch.einsum("qhd,khd->hqk", q, kk) * hd**-0.5
        allowed = ki <= qi
        if cfg["layer_types"][i] == "sliding_attention":
            allowed = allowed & (ki > qi - cfg["sliding_window"])
        sc = sc.masked_fill(~allowed, float("-inf"))
        sink = W[f"{p}.self_attn.sinks"][:, None, None].expand(nh, s, 1)
        pr = torch.softmax(torch.cat([sc, sink], -1), -1)[..., :-1]
        att = torch.einsum("hqk,khd->qhd", pr, v).reshape(s, nh * hd)
        x = x + lin(att, f"{p}.self_attn.o_proj")
        h = _rms(x, W[f"{p}.post_attention_layernorm.weight"], eps)
        logits = lin(h, f"{p}.mlp.router")
        gu_w, gu_b = W[f"{p}.mlp.experts.gate_up_proj"], W[f"{p}.mlp.experts.gate_up_proj_bias"]
        dw, db = W[f"{p}.mlp.experts.down_proj"], W[f"{p}.mlp.experts.down_proj_bias"]
        y = torch.zeros_like(x)
        sets, wts = [], []
        for t in range(s):
            tv, idx = torch.topk(logits[t], k)
            w = torch.softmax(tv, -1)
            sets.append(set(idx.tolist()))
            wts.append(dict(zip(idx.tolist(), w.tolist())))
            for e, we in zip(idx.tolist(), w.tolist()):
                gu = h[t] @ gu_w[e] + gu_b[e]
                g, u = gu[0::2].clamp(max=lim), gu[1::2].clamp(-lim, lim)
                o = ((u + 1) * (g * torch.sigmoid(g * alpha))) @ dw[e] + db[e]
                y[t] = y[t] + we * o
        routing[i] = (sets, wts)
        x = x + y
    x = _rms(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T, routing


def group_limited_gap(cfg: dict, probs: list[float], st: set, want: set) -> float | None:
    """deepseek_v2 group_limited_greedy: when `st` uses an expert of a group transformers masked out, the gap that
    explains the mismatch is between group scores (per-group max probability): the lowest score among the
    topk_group groups transformers kept minus the highest score among the masked groups `st` used. None when `st`
    stays inside transformers' groups (then the experts' own probabilities explain it)."""
    ng, tg = cfg["n_group"], cfg["topk_group"]
    per = len(probs) // ng
    gs = [max(probs[g * per:(g + 1) * per]) for g in range(ng)]
    kept = set(sorted(range(ng), key=lambda g: -gs[g])[:tg])
    extra = {e // per for e in st} - kept
    if not extra:
        return None
    return min(gs[g] for g in kept) - max(gs[g] for g in extra)


def first_mismatch_gaps(fam, trace, sets_of, cfg=None) -> tuple[int, list]:
    """Expert-set mismatches of `sets_of(prompt_id, position, layer)` against the recorded trace, and the
    mismatches with no earlier one in their sequence (no mismatch at a lower layer of the same position or at an
    earlier position): (prompt, position, layer, gap), gap = the recorded ranking values (gpt_oss: logits; else
    probs) of the experts trading places, min(theirs) - max(ours); for deepseek_v2 group_limited_greedy the group
    scores' gap when the groups differ (`group_limited_gap`)."""
    key = "logits" if fam == "gpt_oss" else "probs"
    grouped = fam == "deepseek_v2" and cfg is not None and cfg.get("topk_method") == "group_limited_greedy"
    mism = {}
    for r in trace:
        k = (r["prompt_id"], r["position"], r["layer"])
        st, want = sets_of(*k), set(r["experts"])
        if st != want:
            gg = group_limited_gap(cfg, r[key], st, want) if grouped else None
            if gg is not None:
                mism[k] = gg
                continue
            lo = min(r[key][x] for x in want - st)
            hi = max(r[key][x] for x in st - want)
            mism[k] = lo - hi
    layers = sorted({r["layer"] for r in trace})
    first = []
    for (p, pos, l), gap in sorted(mism.items()):
        up = any((p, pos, x) in mism for x in layers if x < l) or any(
            (p, q, y) in mism for q in range(pos) for y in layers
        )
        if not up:
            first.append([p, pos, l, gap])
    return len(mism), first


def bf16_calibration(spec, out: Path, fulls, trace) -> dict:
    """How far plain rounding moves the bf16 routing: transformers itself on the written bf16 checkpoint, computed
    in f32 (dtype=float32) instead of bf16, and in bf16 with another torch thread count. The f32 computation's
    first-in-sequence mismatch gaps are the scale a bf16 re-implementation's near ties are measured against."""
    fam = spec["family"]
    res = {}
    for label, dtype, threads in (("f32_compute", torch.float32, 1), ("bf16_2_threads", torch.bfloat16, 2)):
        m = type_of(fam).from_pretrained(str(out), dtype=dtype)
        ref.set_impl(m)
        m.eval()
        torch.set_num_threads(threads)
        cap = Capture(m, fam)
        got = {}
        for (pid, _c, _t), full in zip(ref.PROMPTS, fulls):
            tf = teacher_forced(m, cap, full)
            for l in cap.layers:
                for pos, ex in enumerate(tf[l][2].tolist()):
                    got[(pid, pos, l)] = set(ex)
        cap.close()
        torch.set_num_threads(1)
        n, first = first_mismatch_gaps(fam, trace, lambda p, pos, l: got[(p, pos, l)], spec["config"])
        res[label] = dict(
            expert_set_mismatches=n,
            first_in_sequence=first,
            max_first_in_sequence_gap=max((abs(f[3]) for f in first), default=0.0),
        )
    return res


def type_of(fam):
    return CLASSES[fam][1]


def independent_check(model, out: Path, fulls, trace) -> dict:
    """Compare the independent f64 forward with transformers (logits) and with the recorded trace (routing)."""
    by = {(r["prompt_id"], r["position"], r["layer"]): r for r in trace}
    max_logit = 0.0
    set_mism = 0
    max_w = 0.0
    max_mm_margin = 0.0
    n = 0
    for (pid, _c, _t), full in zip(ref.PROMPTS, fulls):
        lg, routing = independent_forward(out, full)
        with torch.no_grad():
            hf = model(torch.tensor([full])).logits[0].double()
        max_logit = max(max_logit, float((lg - hf).abs().max()))
        for l, (sets, wts) in routing.items():
            for pos, (st, wd) in enumerate(zip(sets, wts)):
                r = by[(pid, pos, l)]
                n += 1
                if st != set(r["experts"]):
                    set_mism += 1
                    max_mm_margin = max(max_mm_margin, r["margin"])
                    continue
                for e, w in zip(r["experts"], r["weights"]):
                    max_w = max(max_w, abs(wd[e] - w))
    return dict(
        records_compared=n, expert_set_mismatches=set_mism, max_recorded_margin_of_mismatches=max_mm_margin,
        max_abs_weight_diff=max_w,
        max_abs_next_token_logit_diff=max_logit,
    )


def describe(spec, m) -> str:
    c = spec["config"]
    fam = spec["family"]
    fe = m["feature_effects"]
    ind = m["independent_f64_reimplementation"]
    if fam == "gpt_oss":
        feat = (
            f"hidden {c['hidden_size']}, heads {c['num_attention_heads']}/kv {c['num_key_value_heads']}, head_dim "
            f"{c['head_dim']}, {c['num_local_experts']} experts top-{c['num_experts_per_tok']}, layer_types "
            f"{c['layer_types']}, sliding_window {c['sliding_window']}, swiglu_limit {c['swiglu_limit']}, YaRN factor "
            f"{c['rope_parameters']['factor']} (truncate false)"
        )
    else:
        feat = (
            f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers (first_k_dense_replace "
            f"{c['first_k_dense_replace']}), heads {c['num_attention_heads']}, q_lora_rank {c['q_lora_rank']}, "
            f"kv_lora_rank {c['kv_lora_rank']}, nope/rope/v {c['qk_nope_head_dim']}/{c['qk_rope_head_dim']}/"
            f"{c['v_head_dim']}, {c['n_routed_experts']} experts top-{c['num_experts_per_tok']}, shared "
            f"{c['n_shared_experts']}, routed_scaling_factor {c['routed_scaling_factor']}"
        )
        if fam == "deepseek_v2":
            feat += f", topk_method {c['topk_method']}"
            if c["topk_method"] == "group_limited_greedy":
                feat += (
                    f" (n_group {c['n_group']}, topk_group {c['topk_group']}), norm_topk_prob true (ignored), "
                    "attention_bias true"
                )
        else:
            feat += f", n_group {c['n_group']}, topk_group {c['topk_group']}, norm_topk_prob {c['norm_topk_prob']}"
        rp = c["rope_parameters"]
        feat += f", YaRN factor {rp['factor']} mscale {rp['mscale']} mscale_all_dim {rp['mscale_all_dim']}"
    return (
        f"- `{spec['name']}` ({fam}): {m['dtype']}, seed {m['seed']}, vocab {c['vocab_size']}, {feat}; "
        f"{m['shards']} safetensors file(s); {m['records']} records (MoE layers {m['moe_layers']}, dense "
        f"{m['dense_layers']}); experts used per layer {m['experts_used_per_layer']}, max/mean load "
        f"{m['max_over_mean_load_per_layer']}; min router margin {m['min_router_margin']:.3g}; min next-token logit "
        f"margin {m['min_logit_margin']:.3g}; generate vs teacher-forced mismatches "
        f"{m['generate_vs_teacher_forced_mismatches']}; feature effects {json.dumps(fe)}; independent float64 "
        f"re-implementation: {ind['expert_set_mismatches']} expert-set mismatches (largest recorded margin among them "
        f"{ind['max_recorded_margin_of_mismatches']:.3g}), max next-token logit diff "
        f"{ind['max_abs_next_token_logit_diff']:.2g}."
        + (
            f" bf16 calibration: the same checkpoint computed by transformers in f32 changes "
            f"{m['bf16_calibration']['f32_compute']['expert_set_mismatches']} expert sets (first of each sequence "
            f"at gaps up to {m['bf16_calibration']['f32_compute']['max_first_in_sequence_gap']:.3g}); bf16 with 2 "
            f"threads changes {m['bf16_calibration']['bf16_2_threads']['expert_set_mismatches']}."
            if "bf16_calibration" in m
            else ""
        )
    )


README_HEAD = """## deepseek_v2, deepseek_v3, gpt_oss (`tools/hf_ref_deepseek_gptoss.py`)

Generated by `tools/hf_ref_deepseek_gptoss.py` (torch {torch}, transformers {tf}); summary in
`summary-hf_ref_deepseek_gptoss.json`; exact forward math per family in the script's docstring and the
family notes. Same prompts, tokenizer construction, chat template and file set as the OLMoE fixtures. Differences:

- `layer` is the decoder-layer index; dense layers (DeepSeek `first_k_dense_replace`) have no records, so the first
  DeepSeek record of a position has `layer` 1. Records are ordered by prompt, position, layer.
- `experts`: the router's indices in the order transformers returns them (DeepSeek: `torch.topk(sorted=False)`,
  heap order, NOT descending — compare sets; gpt_oss: descending logit).
- `weights`: the coefficients transformers multiplies each expert output by, aligned with `experts`:
  deepseek_v2 = softmax probability * `routed_scaling_factor` (no renormalisation; `norm_topk_prob` is ignored by
  V2); deepseek_v3 = sigmoid score WITHOUT the correction bias, divided by the sum over the k (+1e-20) when
  `norm_topk_prob`, times `routed_scaling_factor` (so they sum to 2.5); gpt_oss = softmax over the k selected
  logits (router bias included).
- `probs`: deepseek_v2 and gpt_oss = f32 softmax over all E router logits (gpt_oss: bias included; transformers
  itself never computes this full softmax); deepseek_v3 = f32 sigmoid of all E logits, without the correction bias.
- `logits`: the raw router logits (f32; DeepSeek computes them in f32 in every dtype; gpt_oss: incl. bias).
- `margin`: gap at the selection boundary of the quantity the family ranks by. gpt_oss: k-th minus (k+1)-th
  largest logit. deepseek_v2 greedy: k-th minus (k+1)-th softmax probability. deepseek_v2
  group_limited_greedy: min(group margin, in-group margin) where group margin = topk_group-th minus
  (topk_group+1)-th largest per-group MAX probability, and in-group margin = k-th minus (k+1)-th probability
  among the experts of the chosen groups. deepseek_v3: the same min, with the per-group score = sum of the group's
  top-2 of (sigmoid + correction bias) and the in-group ranking by sigmoid + correction bias.
- Feature effects (summary, `feature_effects`): `records_bias_changed` = records whose expert set differs from
  the same routing without the bias (V3: correction bias, group-limited; gpt_oss: router bias, plain top-k) at the
  same hidden state; `records_group_changed` = records whose set differs from a plain top-k without the group
  limit; `records_changed_without_X` = records whose set changes when the whole teacher-forced forward is re-run
  with feature X switched off (YaRN -> default rope and plain softmax scale; softmax mscale only; sinks -> -inf;
  sliding window -> none; SwiGLU clamp -> none; router bias -> none); `swiglu_*` count clamped activations over
  every routed (token, expert) pair of the teacher-forced forwards; `sink_attention_mass_*` = probability mass the
  sink takes per (layer, head, query).
- Initialisation: see the script docstring (projection matrices std 1/sqrt(fan_in), not transformers' 0.02, so that
  attention, experts and every feature visibly change the routing).
- `token_type` is "prompt" or "generation" (as in the OLMoE fixtures).
- Checks done by the script on every run: transformers reloads each written directory to bit-identical logits;
  (f32) `generate()` routing == teacher-forced routing (as sets); the `weights` semantics above on every record;
  and an independent float64 re-implementation written from the family notes (reading only config.json and the
  safetensors) reproduces every f32 expert set, the weights within ~1e-6 and the next-token logits within ~5e-6
  (`independent_f64_reimplementation` in the summary; for bf16 it only reports the bf16-vs-f64 differences).
- bf16 (`deepseekv3-tiny-bf16`): the f32 model is saved, loaded back with `dtype=bfloat16` (transformers keeps
  `mlp.gate.weight` and `e_score_correction_bias` in f32: `_keep_in_fp32_modules_strict`), its router weight is
  rounded to bf16 values and saved; `mlp.gate.weight` is then stored as bfloat16 on disk, as in the published
  DeepSeek/Moonlight checkpoints (lossless), `e_score_correction_bias` stays float32 (`tensor_dtypes` in the
  summary). transformers upcasts the gate weight to f32 at load; router logits, sigmoid, bias, weights are f32.
  Compare it teacher-forced; generated ids informative only. Calibration: computing this bf16 checkpoint in
  float64 (or loading it in f32) instead of bf16 changes 16 of 496 expert sets, at recorded margins up to 0.039
  (the weights here are O(1/sqrt(fan_in)), so bf16 rounding propagates), while changing torch's thread count
  changes none: a Rust bf16 path must round where transformers rounds (see the family note) to get close.
- bf16 (`deepseekv2-tiny-group-bf16`): `deepseekv2-tiny-group-f32`'s weights (same seed and config: MLA with
  q_lora_rank, group-limited routing, a dense first layer, a shared expert, YaRN, attention biases) made bf16 as
  `deepseekv3-tiny-bf16` above (router weight stored as bf16, transformers computes the router in f32; V2 has no
  correction bias). Calibration (`bf16_calibration` in the summary): transformers itself computing this bf16
  checkpoint in f32 changes 5 of the 494 expert sets, the first of each sequence at gaps up to 0.0019, while bf16
  with 2 threads changes none. For group-limited routing a mismatch whose experts cross into a group transformers
  masked out is measured between group scores (each group's largest probability: the lowest kept group minus the
  highest masked group used, `group_limited_gap`), otherwise between the experts' probabilities.
- bf16 (`gptoss-tiny-bf16`): `gptoss-tiny-f32`'s weights (same seed) loaded back with `dtype=bfloat16` and saved.
  gpt_oss has no strict-fp32 modules, so every tensor (router weight and bias, sinks, norms, experts and their
  biases) is bf16 on disk and in memory, and transformers computes the router logits, the softmax over the k (so
  `weights` are bf16 values), the attention with its sink softmax and the experts in bf16. Compare it
  teacher-forced. Calibration (`bf16_calibration` in the summary): transformers itself computing the same bf16
  checkpoint in f32 instead of bf16 changes 34 of the 810 expert sets (95.8 % agreement), the first mismatch of
  each sequence at logit gaps up to 0.0703 (9 bf16 spacings at |logit| ~ 1; the later ones follow from it through
  the residual stream and attention), while running bf16 with 2 threads instead of 1 changes none.
- gpt_oss uses `swiglu_limit` 4.0 (not the default 7.0) so that reading it from config.json is tested and the
  clamp bites (counts in `feature_effects`).

"""


def write_readme_section(root: Path, summary: dict):
    path = root / "README.md"
    text = path.read_text() if path.exists() else "# Hugging Face conformance fixtures\n"
    body = README_HEAD.format(torch=summary["torch"], tf=summary["transformers"])
    body += "\n".join(summary["_lines"]) + "\n"
    block = f"{README_BEGIN}\n{body}{README_END}\n"
    if README_BEGIN in text and README_END in text:
        pre = text.split(README_BEGIN)[0]
        post = text.split(README_END, 1)[1].lstrip("\n")
        text = pre + block + (("\n" + post) if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(TOOLS.parent / "fixtures" / "hf"))
    ap.add_argument("--only", default=None, help="build only this model (summary/README still rewritten)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    spath = root / "summary-hf_ref_deepseek_gptoss.json"
    old = json.loads(spath.read_text()) if spath.exists() else {"models": {}}
    summary = {
        "generator": "tools/hf_ref_deepseek_gptoss.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "router_logit_std": ROUTER_LOGIT_STD,
        "projection_gain": GAIN,
        "correction_bias_std": CORR_BIAS_STD,
        "max_new_tokens": MAX_NEW_TOKENS,
        "models": {},
    }
    lines = []
    for spec in MODELS:
        name = spec["name"]
        if args.only and name != args.only:
            if name in old["models"]:
                summary["models"][name] = old["models"][name]
                lines.append(describe(spec, old["models"][name]))
            continue
        out = root / name
        print(f"== {name}", file=sys.stderr)
        tok = ref.build_tokenizer(spec["config"]["vocab_size"])
        model = make_model(spec)
        info, model = write_checkpoint(model, spec, tok, out)
        prompts_ids = [tok.encode(text).ids for _, _, text in ref.PROMPTS]
        for ids in prompts_ids:
            assert max(ids) < model.config.vocab_size
        model = reload(model, spec, out, prompts_ids[0])
        ref.chat_fixture(tok, out, ref.EOS)
        with open(out / "prompt_ids.jsonl", "w") as f:
            for (pid, _c, _t), ids in zip(ref.PROMPTS, prompts_ids):
                f.write(json.dumps({"prompt_id": pid, "ids": ids}) + "\n")
        stats, _trace, fulls = run_model(model, spec, tok, out, prompts_ids)
        if spec["dtype"] == torch.float32:
            assert stats["generate_vs_teacher_forced_mismatches"] == 0, stats
        stats["feature_effects"].update(ablations(model, spec, fulls))
        chk = independent_check(model, out, fulls, _trace)
        stats["independent_f64_reimplementation"] = chk
        if spec["dtype"] == torch.bfloat16 and spec["family"] in ("gpt_oss", "deepseek_v2"):
            stats["bf16_calibration"] = bf16_calibration(spec, out, fulls, _trace)
            print("bf16 calibration", stats["bf16_calibration"], file=sys.stderr)
            assert stats["bf16_calibration"]["bf16_2_threads"]["expert_set_mismatches"] == 0
        print("independent check", chk, file=sys.stderr)
        if spec["dtype"] == torch.float32:
            assert chk["expert_set_mismatches"] == 0 and chk["max_abs_weight_diff"] < 1e-5, chk
            assert chk["max_abs_next_token_logit_diff"] < 1e-3, chk
        info.update(stats)
        info["family"] = spec["family"]
        info["dtype"] = str(spec["dtype"]).replace("torch.", "")
        info["seed"] = spec["seed"]
        info["config"] = json.loads(json.dumps(spec["config"]))
        info["prompt_lengths"] = [len(i) for i in prompts_ids]
        info["tokenizer_vocab"] = tok.get_vocab_size()
        info["comparison"] = (
            "teacher-forced (bf16: every expert-set mismatch must be explained by its router margin; generated "
            "ids informative only)"
            if spec["dtype"] == torch.bfloat16
            else "exact: identical expert sets, weights within 1e-6, identical generated ids"
        )
        info["bytes"] = sum(p.stat().st_size for p in out.iterdir())
        summary["models"][name] = info
        lines.append(describe(spec, info))
        print(json.dumps({k: v for k, v in info.items() if k != "tensor_dtypes"}, indent=1), file=sys.stderr)
    spath.write_text(json.dumps(summary, indent=2) + "\n")
    summary["_lines"] = lines
    write_readme_section(root, summary)


if __name__ == "__main__":
    main()
