#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers for the mixtral, qwen2_moe, qwen3_moe and granitemoe families.

Builds tiny random checkpoints of each family with transformers' own classes and initialisation, saves them with
`save_pretrained` (the published key layout), greedy-generates on the shared prompt set and records, with forward
hooks on every MoE layer's router, what the router chose and which coefficients the experts' outputs are
multiplied by. Tokenizer, prompt set, chat template and chat fixture come from `hf_reference.py` (imported, not
copied), so every model directory has the same files as the OLMoE fixtures.

Output: fixtures/hf/<model>/ and fixtures/hf/summary-hf_ref_mixtral_qwen_granite.json
(see fixtures/hf/README.md and tools/README.md). `independent_forward` below is a second, plain-torch
implementation of each family's forward pass, op by op as read in modeling_<family>.py; the script asserts that
it reproduces the recorded f32 routing and generated ids.

Router semantics in the pinned transformers 5.24 (read in modeling_<family>.py; every router returns
`(router_logits, weights, indices)` and the MoE block multiplies expert e's output by `weights[j]` where
`indices[j] == e`, with no later scaling, so the recorded `weights` ARE the applied coefficients):
- mixtral (`MixtralTopKRouter`): logits in the model dtype; softmax in f32 over all experts; torch.topk on the
  probabilities; ALWAYS renormalised over the k (f32, not cast back to the model dtype).
- qwen2_moe / qwen3_moe (`Qwen2MoeTopKRouter` / `Qwen3MoeTopKRouter`): same softmax/topk; renormalised only if
  `norm_topk_prob`; then cast to the model dtype (bf16 weights are bf16-rounded).
- granitemoe (`GraniteMoeTopKRouter`): logits = f32(linear in model dtype); torch.topk on the LOGITS; softmax over
  the k selected logits (f32), cast to the model dtype.
`probs` = f32 softmax of all router logits (reference only for granite); `logits` = raw router logits (f32 of the
model-dtype values; no router has a bias in these families); `margin` = k-th minus (k+1)-th largest of the
quantity the family ranks by (probabilities for mixtral/qwen, logits for granite).

Dense layers (qwen2_moe/qwen3_moe `mlp_only_layers`) have no router and no records; `layer` is the decoder-layer
index. The qwen2_moe shared expert (sigmoid-gated) is not a routed expert and appears in no record.

Initialisation: transformers' `_init_weights` with `torch.manual_seed(seed)`, then (as hf_reference.py) router rows
re-drawn with std ROUTER_LOGIT_STD/sqrt(hidden) and the untied lm_head with std 1/sqrt(hidden) (granite:
logits_scaling/sqrt(hidden), so that the scaled logits have std ~1). Parameters that transformers initialises to
0 or 1 but that carry a feature are re-drawn so the feature matters: qwen2_moe q/k/v biases (std QK_BIAS_STD / V_BIAS_STD)
and `shared_expert_gate` (std ROUTER_LOGIT_STD/sqrt(hidden)), qwen3_moe `q_norm`/`k_norm` weights
(1 + NORM_WEIGHT_STD * N(0,1)). The summary's `feature_effects` counts, per feature, the records whose expert SET
changes (and teacher-forced next-token argmaxes that change) when the feature is removed from the model.

Attention and experts use transformers' "eager" implementations; one thread, deterministic algorithms.
Usage: /work/venvs/hf/bin/python tools/hf_ref_mixtral_qwen_granite.py [--out fixtures/hf] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from transformers import (
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import hf_reference as ref  # noqa: E402  (tokenizer, prompts, chat template, save, chat fixture)

ROUTER_LOGIT_STD = ref.ROUTER_LOGIT_STD
MAX_NEW_TOKENS = ref.MAX_NEW_TOKENS
QK_BIAS_STD = 0.5  # qwen2_moe q/k biases (q/k entries have std ~QK_PROJ_GAIN)
V_BIAS_STD = 0.05  # qwen2_moe v bias (v entries have std ~0.02*sqrt(hidden)); larger makes routing collapse
NORM_WEIGHT_STD = 0.3
QK_PROJ_GAIN = 1.0  # q_proj/k_proj rows: std QK_PROJ_GAIN/sqrt(hidden) -> attention logits of order 1
V_PROJ_GAIN = 1.0  # v_proj rows: std V_PROJ_GAIN/sqrt(hidden)
O_PROJ_GAIN = 0.05  # o_proj rows: std O_PROJ_GAIN/sqrt(heads*head_dim) -> attention output ~ the embeddings
MLP_IN_GAIN = 1.0  # gate/up rows of every MLP (experts, shared expert, dense): std MLP_IN_GAIN/sqrt(hidden)
MLP_OUT_GAIN = 0.05  # down rows: std MLP_OUT_GAIN/sqrt(width) -> MLP outputs comparable to the embeddings
SCRIPT = "tools/hf_ref_mixtral_qwen_granite.py"

FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "granitemoe": (GraniteMoeConfig, GraniteMoeForCausalLM),
}

MODELS = [
    dict(
        name="mixtral-tiny-swa-f32",
        family="mixtral",
        seed=104,
        dtype=torch.float32,
        shard="120KB",
        config=dict(
            vocab_size=512, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=5, tie_word_embeddings=False,
        ),
    ),
    dict(
        name="qwen2moe-tiny-f32",
        family="qwen2_moe",
        seed=205,
        dtype=torch.float32,
        shard=None,
        config=dict(
            vocab_size=576, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_experts=12, num_experts_per_tok=4, norm_topk_prob=False,
            qkv_bias=True, mlp_only_layers=[1], decoder_sparse_step=1, tie_word_embeddings=False,
        ),
    ),
    dict(
        name="qwen3moe-tiny-f32",
        family="qwen3_moe",
        seed=303,
        dtype=torch.float32,
        shard=None,
        config=dict(
            vocab_size=640, hidden_size=48, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
            num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
            tie_word_embeddings=False,
        ),
    ),
    dict(
        name="qwen3moe-tiny-bf16",
        family="qwen3_moe",
        seed=404,
        dtype=torch.bfloat16,
        shard=None,
        # published Qwen3 checkpoints spell it `num_experts`; save_pretrained writes `num_local_experts`
        config_rename={"num_local_experts": "num_experts"},
        config=dict(
            vocab_size=768, hidden_size=48, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=12,
            num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
            tie_word_embeddings=False,
        ),
    ),
    dict(
        name="granitemoe-tiny-f32",
        family="granitemoe",
        seed=506,
        dtype=torch.float32,
        shard=None,
        config=dict(
            vocab_size=520, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            embedding_multiplier=6.0, attention_multiplier=0.1, residual_multiplier=0.3, logits_scaling=4.0,
            tie_word_embeddings=False,
        ),
    ),
]


def bf16_twin(f32_name: str, **over) -> dict:
    """The bf16 twin of an f32 fixture: same seed and config (so the same weights), made the way a user gets a
    bf16 checkpoint: the f32 model saved, loaded back with `from_pretrained(dtype=torch.bfloat16)` (none of these
    families has `_keep_in_fp32_modules`, so every tensor is bf16) and saved again (`bf16_via_from_pretrained`)."""
    base = next(m for m in MODELS if m["name"] == f32_name)
    return {**copy.deepcopy(base), "name": f32_name.replace("-f32", "-bf16"), "dtype": torch.bfloat16,
            "bf16_via_from_pretrained": True, **over}


MODELS += [
    bf16_twin("mixtral-tiny-swa-f32", shard="60KB"),
    bf16_twin("qwen2moe-tiny-f32", shard=None),
    bf16_twin("granitemoe-tiny-f32", shard=None),
]

# ---------------------------------------------------------------------------------------------- model access


def moe_router(family: str, layer):
    """The router module of a decoder layer, or None for a dense layer."""
    if family == "granitemoe":
        return layer.block_sparse_moe.router
    gate = getattr(layer.mlp, "gate", None)
    # qwen dense layers are `Qwen2MoeMLP`/`Qwen3MoeMLP`, whose `gate_proj` is a Linear; a router has `top_k`
    return gate if gate is not None and hasattr(gate, "top_k") else None


def moe_layers(family: str, model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if moe_router(family, layer) is not None]


def n_experts(cfg) -> int:
    return int(getattr(cfg, "num_local_experts", None) or cfg.num_experts)


def make_model(spec: dict):
    cfg_cls, model_cls = FAMILIES[spec["family"]]
    cfg = cfg_cls(pad_token_id=1, eos_token_id=0, bos_token_id=0, max_position_embeddings=512, **spec["config"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = model_cls(cfg)
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)
    fam = spec["family"]
    def redraw(t: torch.Tensor, std: float):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                redraw(p.weight, QK_PROJ_GAIN / math.sqrt(h))
            redraw(layer.self_attn.v_proj.weight, V_PROJ_GAIN / math.sqrt(h))
            o = layer.self_attn.o_proj.weight
            redraw(o, O_PROJ_GAIN / math.sqrt(o.shape[-1]))
            experts = layer.block_sparse_moe.experts if fam == "granitemoe" else getattr(layer.mlp, "experts", None)
            mlps = []
            if experts is not None:
                redraw(experts.gate_up_proj, MLP_IN_GAIN / math.sqrt(h))  # [E, 2I, H]
                redraw(experts.down_proj, MLP_OUT_GAIN / math.sqrt(experts.down_proj.shape[-1]))  # [E, H, I]
                if fam == "qwen2_moe":
                    mlps.append(layer.mlp.shared_expert)
            else:
                mlps.append(layer.mlp)  # a dense layer
            for m in mlps:
                redraw(m.gate_proj.weight, MLP_IN_GAIN / math.sqrt(h))
                redraw(m.up_proj.weight, MLP_IN_GAIN / math.sqrt(h))
                redraw(m.down_proj.weight, MLP_OUT_GAIN / math.sqrt(m.down_proj.weight.shape[-1]))
            r = moe_router(fam, layer)
            if r is not None:
                r.weight.copy_(torch.randn(r.weight.shape, generator=g) * (ROUTER_LOGIT_STD / math.sqrt(h)))
            if fam == "qwen2_moe":
                redraw(layer.self_attn.q_proj.bias, QK_BIAS_STD)
                redraw(layer.self_attn.k_proj.bias, QK_BIAS_STD)
                redraw(layer.self_attn.v_proj.bias, V_BIAS_STD)
                if r is not None:
                    w = layer.mlp.shared_expert_gate.weight
                    w.copy_(torch.randn(w.shape, generator=g) * (ROUTER_LOGIT_STD / math.sqrt(h)))
            if fam == "qwen3_moe":
                for n in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    n.weight.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(n.weight.shape, generator=g))
        assert not cfg.tie_word_embeddings
        scale = float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
        w = model.lm_head.weight
        w.copy_(torch.randn(w.shape, generator=g) * (scale / math.sqrt(h)))
    model = model.to(torch.float32 if spec.get("bf16_via_from_pretrained") else spec["dtype"])
    model.eval()
    ref.set_impl(model)
    if spec.get("bf16_via_from_pretrained"):
        # what a user does with an f32 checkpoint: save it, load it back with dtype=bfloat16
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = model_cls.from_pretrained(tmp, dtype=torch.bfloat16)
        ref.set_impl(model)
        model.eval()
        bad = [n for n, p in model.named_parameters() if p.dtype != torch.bfloat16]
        assert not bad, f"{spec['name']}: not bf16 after from_pretrained: {bad}"
    return model


def reload(spec, model, out: Path, ids: list[int]):
    """from_pretrained of the written directory (the reference runs on it); f32: bit-identical logits."""
    _cfg_cls, model_cls = FAMILIES[spec["family"]]
    m2 = model_cls.from_pretrained(str(out), dtype=model.dtype)
    ref.set_impl(m2)
    m2.eval()
    fam = spec["family"]
    assert n_experts(m2.config) == n_experts(model.config), f"{out}: expert count lost in config.json"
    assert moe_layers(fam, m2) == moe_layers(fam, model), f"{out}: MoE layers differ after reload"
    if model.dtype == torch.float32:
        x = torch.tensor([ids])
        with torch.no_grad():
            a = model(x).logits
            b = m2(x).logits
        assert torch.equal(a, b), f"{out}: reloaded model differs (max {float((a - b).abs().max())})"
    return m2


class RouterCapture:
    """Forward hooks on every MoE layer's router; each call appends (logits, weights, indices)."""

    def __init__(self, family: str, model):
        self.layers = moe_layers(family, model)
        self.calls: dict[int, list] = {l: [] for l in self.layers}
        self.handles = [
            moe_router(family, model.model.layers[l]).register_forward_hook(self._hook(l)) for l in self.layers
        ]

    def _hook(self, l):
        def hook(module, inputs, output):
            logits, weights, indices = output  # checked: (router_logits, weights, indices) in all four families
            self.calls[l].append((logits.detach().clone(), weights.detach().clone(), indices.detach().clone()))

        return hook

    def reset(self):
        self.calls = {l: [] for l in self.layers}

    def close(self):
        for h in self.handles:
            h.remove()


def teacher_forced(family: str, model, full: list[int]):
    """One forward over `full`; returns ({layer: (logits, weights, indices)}, next-token logits [T, V])."""
    cap = RouterCapture(family, model)
    with torch.no_grad():
        out = model(torch.tensor([full], dtype=torch.long))
    res = {l: cap.calls[l][0] for l in cap.layers}
    cap.close()
    return res, out.logits[0].float()


# ---------------------------------------------------------------------------------------------- ablations
# Each returns a deep copy of the model with one feature removed; used only for the feature-effect counts.


def ablate_sliding_window(model):
    m = copy.deepcopy(model)
    m.config.sliding_window = None  # MixtralModel.forward picks create_causal_mask when None
    return m


def ablate_renormalisation(family: str):
    """mixtral: applied weights = full-softmax probabilities of the chosen experts (no renormalisation)."""

    def f(model):
        m = copy.deepcopy(model)
        for l in moe_layers(family, m):
            r = moe_router(family, m.model.layers[l])

            def fwd(self, hidden_states):
                hidden_states = hidden_states.reshape(-1, self.hidden_dim)
                logits = F.linear(hidden_states, self.weight)
                probs = torch.softmax(logits.float(), dim=-1)
                vals, idx = torch.topk(probs, self.top_k, dim=-1)
                return logits, vals, idx

            r.forward = types.MethodType(fwd, r)
        return m

    return f


def ablate_norm_topk_prob(family: str):
    def f(model):
        m = copy.deepcopy(model)
        for l in moe_layers(family, m):
            r = moe_router(family, m.model.layers[l])
            r.norm_topk_prob = not r.norm_topk_prob
        return m

    return f


def ablate_shared_expert_gate(model):
    """qwen2_moe: shared expert added with coefficient 1 instead of sigmoid(shared_expert_gate(x))."""
    m = copy.deepcopy(model)
    for l in moe_layers("qwen2_moe", m):
        blk = m.model.layers[l].mlp

        def fwd(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            shared = self.shared_expert(x)
            _, w, idx = self.gate(x)
            out = self.experts(x, idx, w) + shared
            return out.reshape(b, s, h)

        blk.forward = types.MethodType(fwd, blk)
    return m


def ablate_shared_expert(model):
    """qwen2_moe: no shared expert at all."""
    m = copy.deepcopy(model)
    for l in moe_layers("qwen2_moe", m):
        blk = m.model.layers[l].mlp

        def fwd(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            _, w, idx = self.gate(x)
            return self.experts(x, idx, w).reshape(b, s, h)

        blk.forward = types.MethodType(fwd, blk)
    return m


def ablate_qkv_bias(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.zero_()
    return m


def ablate_dense_layers(family: str):
    """qwen: the dense layers' MLP output replaced by zeros (a loader that skipped them)."""

    def f(model):
        m = copy.deepcopy(model)
        moe = set(moe_layers(family, m))
        for i, layer in enumerate(m.model.layers):
            if i not in moe:
                layer.mlp.forward = types.MethodType(lambda self, x: torch.zeros_like(x), layer.mlp)
        return m

    return f


def ablate_qk_norm(model):
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    return m


def ablate_qk_norm_weight(model):
    """qwen3_moe: q/k RMSNorm applied but its weight ignored (all ones)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    return m


def ablate_embedding_multiplier(model):
    m = copy.deepcopy(model)
    m.model.embedding_multiplier = 1.0
    return m


def ablate_attention_multiplier(model):
    """granitemoe: the usual head_dim**-0.5 attention scaling instead of attention_multiplier."""
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.self_attn.scaling = layer.self_attn.head_dim**-0.5
    return m


def ablate_residual_multiplier(model):
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.residual_multiplier = 1.0
    return m


def ablate_granite_full_softmax(model):
    """granitemoe: softmax over all experts, then top-k (weights = full-softmax probabilities, no renorm)."""
    m = copy.deepcopy(model)
    for l in moe_layers("granitemoe", m):
        r = moe_router("granitemoe", m.model.layers[l])

        def fwd(self, hidden_states):
            logits = F.linear(hidden_states, self.weight).float()
            probs = torch.softmax(logits, dim=-1)
            vals, idx = probs.topk(self.top_k, dim=-1)
            return logits, vals.type_as(hidden_states), idx

        r.forward = types.MethodType(fwd, r)
    return m


ABLATIONS = {
    "mixtral": {
        "sliding_window": ablate_sliding_window,
        "topk_renormalisation": ablate_renormalisation("mixtral"),
    },
    "qwen2_moe": {
        "shared_expert_gate": ablate_shared_expert_gate,
        "shared_expert": ablate_shared_expert,
        "norm_topk_prob": ablate_norm_topk_prob("qwen2_moe"),
        "qkv_bias": ablate_qkv_bias,
        "dense_layer_mlp": ablate_dense_layers("qwen2_moe"),
    },
    "qwen3_moe": {
        "qk_norm": ablate_qk_norm,
        "qk_norm_weight": ablate_qk_norm_weight,
        "norm_topk_prob": ablate_norm_topk_prob("qwen3_moe"),
        "dense_layer_mlp": ablate_dense_layers("qwen3_moe"),
    },
    "granitemoe": {
        "embedding_multiplier": ablate_embedding_multiplier,
        "attention_multiplier": ablate_attention_multiplier,
        "residual_multiplier": ablate_residual_multiplier,
        "topk_then_softmax": ablate_granite_full_softmax,
    },
}


# ---------------------------------------------------------------------------------------------- reference run


def ranked_margin(family: str, logits_row: torch.Tensor, probs_row: torch.Tensor, k: int) -> float:
    q = logits_row.float() if family == "granitemoe" else probs_row
    s = torch.sort(q, descending=True).values
    return float(s[k - 1] - s[k])


def run_model(spec: dict, model, tok: Tokenizer, out: Path, prompts_ids: list[list[int]]) -> tuple[dict, dict]:
    fam = spec["family"]
    cfg = model.config
    k = cfg.num_experts_per_tok
    n_e = n_experts(cfg)
    layers = moe_layers(fam, model)
    cap = RouterCapture(fam, model)
    gens, trace_rows, fulls = [], [], {}
    min_margin = float("inf")
    zero_margin = 0
    min_logit_margin = float("inf")
    gen_vs_tf_mismatch = 0
    gen_vs_tf_weight_diff = 0.0
    usage = {l: np.zeros(n_e, dtype=np.int64) for l in layers}
    weight_sum_range = [float("inf"), float("-inf")]
    for (pid, cat, _text), ids in zip(ref.PROMPTS, prompts_ids):
        input_ids = torch.tensor([ids], dtype=torch.long)
        cap.reset()
        with torch.no_grad():
            res = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        full = res.sequences[0].tolist()
        fulls[pid] = full
        generated = full[len(ids):]
        margins = []
        for s in res.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        min_logit_margin = min(min_logit_margin, min(margins))
        gen_idx = {l: torch.cat([c[2] for c in cap.calls[l]], 0) for l in layers}
        gen_w = {l: torch.cat([c[1] for c in cap.calls[l]], 0) for l in layers}
        stopped_eos = len(generated) < MAX_NEW_TOKENS or (generated and generated[-1] == cfg.eos_token_id)
        gens.append(
            {
                "prompt_id": pid,
                "prompt_ids": ids,
                "generated_ids": generated,
                "generated_text": tok.decode(generated, skip_special_tokens=False),
                "stopped_on_eos": bool(stopped_eos),
                "max_new_tokens": MAX_NEW_TOKENS,
                "logit_margins": margins,
            }
        )
        tf, _ = teacher_forced(fam, model, full)
        for l in layers:
            logits, weights, idx = tf[l]
            probs = torch.softmax(logits.float(), dim=-1)
            for pos in range(len(full)):
                ex = idx[pos].tolist()
                w = [float(x) for x in weights[pos].float().tolist()]
                margin = ranked_margin(fam, logits[pos], probs[pos], k)
                min_margin = min(min_margin, margin)
                zero_margin += int(margin == 0.0)
                usage[l][ex] += 1
                sw = sum(w)
                weight_sum_range = [min(weight_sum_range[0], sw), max(weight_sum_range[1], sw)]
                if pos < gen_idx[l].shape[0]:
                    if gen_idx[l][pos].tolist() != ex:
                        gen_vs_tf_mismatch += 1
                    else:
                        d = float((gen_w[l][pos].float() - weights[pos].float()).abs().max())
                        gen_vs_tf_weight_diff = max(gen_vs_tf_weight_diff, d)
                trace_rows.append(
                    (
                        pid,
                        pos,
                        l,
                        {
                            "prompt_id": pid,
                            "category": cat,
                            "layer": l,
                            "position": pos,
                            "token_id": full[pos],
                            "token_type": "prompt" if pos < len(ids) else "generation",
                            "experts": ex,
                            "weights": w,
                            "probs": ref.f32list(probs[pos]),
                            "logits": ref.f32list(logits[pos]),
                            "margin": margin,
                        },
                    )
                )
    cap.close()
    order = {pid: i for i, (pid, _c, _t) in enumerate(ref.PROMPTS)}
    trace_rows.sort(key=lambda r: (order[r[0]], r[1], r[2]))
    with open(out / "expected_trace.jsonl", "w") as f:
        for *_, rec in trace_rows:
            f.write(json.dumps(rec) + "\n")
    with open(out / "expected_generations.jsonl", "w") as f:
        for g in gens:
            f.write(json.dumps(g) + "\n")
    loads = {}
    for l in layers:
        u = usage[l]
        loads[l] = (int((u > 0).sum()), round(float(u.max() / u.mean()), 3))
    stats = {
        "records": len(trace_rows),
        "moe_layers": layers,
        "dense_layers": [i for i in range(cfg.num_hidden_layers) if i not in layers],
        "min_router_margin": min_margin,
        "min_router_margin_quantity": "logit" if fam == "granitemoe" else "probability",
        "records_with_zero_router_margin": zero_margin,
        "min_logit_margin": min_logit_margin,
        "generate_vs_teacher_forced_mismatches": gen_vs_tf_mismatch,
        "generate_vs_teacher_forced_max_weight_diff": gen_vs_tf_weight_diff,
        "experts_used_per_layer": {str(l): loads[l][0] for l in layers},
        "max_over_mean_load_per_layer": {str(l): loads[l][1] for l in layers},
        "applied_weight_sum_range": weight_sum_range,
        "prompt_lengths": [len(i) for i in prompts_ids],
    }
    return stats, fulls


def feature_effects(spec: dict, model, fulls: dict) -> dict:
    """Per ablation: records whose expert SET differs, and positions whose next-token argmax differs."""
    fam = spec["family"]
    base = {pid: teacher_forced(fam, model, full) for pid, full in fulls.items()}
    res = {}
    for name, ablate in ABLATIONS[fam].items():
        m = ablate(model)
        changed_sets = changed_argmax = records = positions = 0
        for pid, full in fulls.items():
            (r0, lg0), (r1, lg1) = base[pid], teacher_forced(fam, m, full)
            for l in r0:
                a = torch.sort(r0[l][2], dim=-1).values
                b = torch.sort(r1[l][2], dim=-1).values
                changed_sets += int((a != b).any(dim=-1).sum())
                records += a.shape[0]
            changed_argmax += int((lg0.argmax(-1) != lg1.argmax(-1)).sum())
            positions += lg0.shape[0]
        res[name] = {
            "records_with_changed_expert_set": changed_sets,
            "records": records,
            "positions_with_changed_argmax": changed_argmax,
            "positions": positions,
        }
        del m
    return res


def bf16_calibration(spec: dict, out: Path, fulls: dict) -> dict:
    """How far plain rounding moves the bf16 routing: transformers itself on the written bf16 checkpoint, computed
    in f32 (`from_pretrained(dtype=float32)`) instead of bf16, and in bf16 with 2 torch threads instead of 1. The
    f32 computation's first-in-sequence mismatch gaps (in the quantity the family ranks by: probabilities, or
    logits for granite) are the scale a bf16 re-implementation's near ties are measured against. A mismatch is
    "first in sequence" when no lower layer of its position and no earlier position of its prompt mismatches."""
    fam = spec["family"]
    key = "logits" if fam == "granitemoe" else "probs"
    trace = {}
    for line in (out / "expected_trace.jsonl").read_text().splitlines():
        r = json.loads(line)
        trace[(r["prompt_id"], r["position"], r["layer"])] = r
    _cfg_cls, model_cls = FAMILIES[fam]
    res = {}
    for label, dtype, threads in (("f32_compute", torch.float32, 1), ("bf16_2_threads", torch.bfloat16, 2)):
        m = model_cls.from_pretrained(str(out), dtype=dtype)
        ref.set_impl(m)
        m.eval()
        torch.set_num_threads(threads)
        try:
            mism = {}
            for pid, full in fulls.items():
                tf, _ = teacher_forced(fam, m, full)
                for l, (_lg, _w, idx) in tf.items():
                    for pos, ex in enumerate(idx.tolist()):
                        r = trace[(pid, pos, l)]
                        st, want = set(ex), set(r["experts"])
                        if st != want:
                            lo = min(r[key][x] for x in want - st)
                            hi = max(r[key][x] for x in st - want)
                            mism[(pid, pos, l)] = lo - hi
        finally:
            torch.set_num_threads(1)
        order = {pid: i for i, (pid, _c, _t) in enumerate(ref.PROMPTS)}
        first = []
        for (p, pos, l), gap in sorted(mism.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])):
            up = any(q == p and (qp < pos or (qp == pos and ql < l)) for (q, qp, ql) in mism)
            if not up:
                first.append([p, pos, l, gap])
        res[label] = dict(
            expert_set_mismatches=len(mism),
            records=len(trace),
            first_in_sequence=first,
            max_first_in_sequence_gap=max((abs(f[3]) for f in first), default=0.0),
        )
        del m
    return res


def sliding_window_stats(spec: dict, fulls: dict, prompts_ids) -> dict | None:
    w = spec["config"].get("sliding_window")
    if not w:
        return None
    return {
        "sliding_window": w,
        "shortest_prompt": min(len(i) for i in prompts_ids),
        "positions_beyond_window": sum(max(0, len(f) - w) for f in fulls.values()),
        "positions": sum(len(f) for f in fulls.values()),
    }


def layout_info(out: Path) -> dict:
    sd = ref.read_safetensors_dir(out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    moe_keys = sorted(k for k in sd if ".layers.0." in k or ".layers.1." in k)
    return {
        "safetensors_files": files,
        "tensors": len(sd),
        "layer_keys_example": {k: list(sd[k].shape) for k in moe_keys if ".experts.1." not in k
                               and not any(f".experts.{e}." in k for e in range(2, 64))},
    }


# ---------------------------------------------------------------------------------------------- independent check
# A second implementation of each family's forward pass, written from the math notes (plain torch ops on the
# tensors of the written safetensors files, no transformers modules). It must reproduce the recorded trace:
# f32: identical expert lists and applied weights within 1e-6, teacher-forced argmax = the generated ids.


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def independent_forward(family: str, sd: dict, cfg: dict, ids: list[int]):
    """Returns ({layer: (experts [T,k], weights [T,k])}, logits [T, V]) computed from the notes."""
    H, nh, nkv, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or H // nh
    k = cfg["num_experts_per_tok"]
    eps = cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"]
    dt = sd["model.embed_tokens.weight"].dtype
    T = len(ids)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.arange(T, dtype=torch.float)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if family == "mixtral" and cfg.get("sliding_window"):
        allowed &= j > i - cfg["sliding_window"]
    mask = torch.where(allowed, torch.zeros((), dtype=dt), torch.finfo(dt).min)
    scale = cfg["attention_multiplier"] if family == "granitemoe" else d**-0.5
    resid = cfg.get("residual_multiplier", 1.0) if family == "granitemoe" else 1.0
    mlp_only = cfg.get("mlp_only_layers") or []
    step = cfg.get("decoder_sparse_step", 1)
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    if family == "granitemoe":
        x = x * cfg["embedding_multiplier"]
    silu = torch.nn.functional.silu
    routing = {}
    for l in range(L):
        p = f"model.layers.{l}."
        g = lambda n: sd[p + n]  # noqa: E731
        h = _rms(x, g("input_layernorm.weight"), eps)

        def proj(name, n_heads):
            y = h @ g(f"self_attn.{name}.weight").T
            if p + f"self_attn.{name}.bias" in sd:
                y = y + g(f"self_attn.{name}.bias")
            y = y.view(T, n_heads, d)
            if family == "qwen3_moe" and name in ("q_proj", "k_proj"):
                y = _rms(y, g(f"self_attn.{name[0]}_norm.weight"), eps)
            return y.transpose(0, 1)  # [heads, T, d]

        q = _rope(proj("q_proj", nh), cos, sin)
        kk = _rope(proj("k_proj", nkv), cos, sin)
        v = proj("v_proj", nkv)
        rep = nh // nkv
        kk = kk.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        s = (q @ kk.transpose(1, 2)) * scale + mask
        a = torch.softmax(s, dim=-1, dtype=torch.float32).to(dt) @ v  # [nh, T, d]
        a = a.transpose(0, 1).reshape(T, nh * d) @ g("self_attn.o_proj.weight").T
        x = x + a * resid if family == "granitemoe" else x + a
        h = _rms(x, g("post_attention_layernorm.weight"), eps)
        is_moe = family in ("mixtral", "granitemoe") or (l not in mlp_only and (l + 1) % step == 0)
        if not is_moe:
            out = (silu(h @ g("mlp.gate_proj.weight").T) * (h @ g("mlp.up_proj.weight").T)) @ g("mlp.down_proj.weight").T
        else:
            if family == "mixtral":
                logits = h @ g("block_sparse_moe.gate.weight").T
                vals, idx = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)
                w = vals / vals.sum(-1, keepdim=True)
            elif family == "granitemoe":
                logits = (h @ g("block_sparse_moe.router.layer.weight").T).float()
                tl, idx = logits.topk(k, dim=-1)
                w = torch.softmax(tl, dim=-1).to(dt)
            else:
                logits = h @ g("mlp.gate.weight").T
                vals, idx = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), k, dim=-1)
                if cfg["norm_topk_prob"]:
                    vals = vals / vals.sum(-1, keepdim=True)
                w = vals.to(dt)
            routing[l] = (idx, w)
            out = torch.zeros_like(h)
            for t in range(T):
                for slot in sorted(range(k), key=lambda j_: int(idx[t, j_])):  # ascending expert index
                    e = int(idx[t, slot])
                    if family == "mixtral":
                        pe = f"block_sparse_moe.experts.{e}."
                        gu = (g(pe + "w1.weight"), g(pe + "w3.weight"), g(pe + "w2.weight"))
                    elif family == "granitemoe":
                        gate_up = g("block_sparse_moe.input_linear.weight")[e]
                        I = gate_up.shape[0] // 2
                        gu = (gate_up[:I], gate_up[I:], g("block_sparse_moe.output_linear.weight")[e])
                    else:
                        pe = f"mlp.experts.{e}."
                        gu = (g(pe + "gate_proj.weight"), g(pe + "up_proj.weight"), g(pe + "down_proj.weight"))
                    y = (silu(h[t] @ gu[0].T) * (h[t] @ gu[1].T)) @ gu[2].T
                    out[t] = out[t] + (y * w[t, slot]).to(dt)
            if family == "qwen2_moe":
                sh = (silu(h @ g("mlp.shared_expert.gate_proj.weight").T) * (h @ g("mlp.shared_expert.up_proj.weight").T))
                sh = sh @ g("mlp.shared_expert.down_proj.weight").T
                out = out + torch.sigmoid(h @ g("mlp.shared_expert_gate.weight").T) * sh
        x = x + out * resid if family == "granitemoe" else x + out
    x = _rms(x, sd["model.norm.weight"], eps)
    lm = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    logits = x @ lm.T
    if family == "granitemoe":
        logits = logits / cfg["logits_scaling"]
    return routing, logits.float()


def independent_check(spec: dict, out: Path) -> dict:
    fam = spec["family"]
    sd = ref.read_safetensors_dir(out)
    cfg = json.loads((out / "config.json").read_text())
    trace = {}
    for line in (out / "expected_trace.jsonl").read_text().splitlines():
        r = json.loads(line)
        trace[(r["prompt_id"], r["position"], r["layer"])] = r
    same = total = argmax_same = argmax_total = 0
    max_dw = 0.0
    for line in (out / "expected_generations.jsonl").read_text().splitlines():
        g = json.loads(line)
        full = g["prompt_ids"] + g["generated_ids"]
        with torch.no_grad():
            routing, logits = independent_forward(fam, sd, cfg, full)
        for l, (idx, w) in routing.items():
            for pos in range(len(full)):
                e = trace[(g["prompt_id"], pos, l)]
                total += 1
                if idx[pos].tolist() == e["experts"]:
                    same += 1
                    max_dw = max(max_dw, max(abs(float(a) - b) for a, b in zip(w[pos].float(), e["weights"])))
        n = len(g["prompt_ids"])
        for pos in range(n - 1, len(full) - 1):
            argmax_total += 1
            argmax_same += int(int(logits[pos].argmax()) == full[pos + 1])
    assert total == len(trace), (total, len(trace))
    res = {
        "identical_expert_lists": same,
        "records": total,
        "max_abs_weight_diff_on_identical": max_dw,
        "argmax_equals_generated": argmax_same,
        "generated_positions": argmax_total,
    }
    if spec["dtype"] == torch.float32:
        assert same == total and max_dw <= 1e-6 and argmax_same == argmax_total, (out, res)
    return res


# ---------------------------------------------------------------------------------------------- README section

README_BEGIN = "<!-- BEGIN hf_ref_mixtral_qwen_granite.py -->"
README_END = "<!-- END hf_ref_mixtral_qwen_granite.py -->"
README_HEAD = """## Mixtral, Qwen2-MoE, Qwen3-MoE, Granite-MoE (`tools/hf_ref_mixtral_qwen_granite.py`)

Generated by `tools/hf_ref_mixtral_qwen_granite.py` with torch {torch} and transformers {tf}; do not edit by hand
(this section is rewritten by the script; numbers also in `summary-hf_ref_mixtral_qwen_granite.json`). Same files
per model as the OLMoE fixtures (tokenizer, prompts and chat template from `hf_reference.py`); the exact forward
math of each family is written out in the script's docstring and `independent_forward`. Differences in meaning:

- `layer` is the decoder-layer index; dense layers (qwen `mlp_only_layers`) have no records.
- `weights` are the coefficients transformers multiplies each routed expert's output by (the router's returned
  weights; no later scaling in these families), in `experts` order (= `torch.topk` order): mixtral = top-k
  softmax probabilities renormalised (f32); qwen2_moe/qwen3_moe = top-k softmax probabilities, renormalised only
  if `norm_topk_prob`, cast to the model dtype; granitemoe = softmax over the k largest logits, cast to the
  model dtype. The qwen2_moe shared expert (coefficient `sigmoid(shared_expert_gate(x))`) is in no record.
- `probs` = f32 softmax over all router logits; `logits` = raw router logits (f32 of the model-dtype values; no
  router bias in these families); `margin` = k-th minus (k+1)-th largest of what the family ranks by:
  probabilities (mixtral, qwen) or logits (granitemoe). Generated tokens have `token_type` "generation".
- `logit_margins` in `expected_generations.jsonl` are top-1 minus top-2 of the logits AFTER granite's
  `logits_scaling` division (a model that ignores `logits_scaling` has 4x larger margins; greedy ids are unchanged).
- Initialisation: transformers' own with the seed, then re-drawn (generator seeded `seed*1000+7`): router rows
  std {rstd}/sqrt(hidden); lm_head std 1/sqrt(hidden) (granite: logits_scaling/sqrt(hidden)); q/k_proj rows
  std {qk}/sqrt(hidden), v_proj {vg}/sqrt(hidden), o_proj {og}/sqrt(heads*head_dim); every MLP (experts,
  shared expert, dense layers) gate/up {mi}/sqrt(hidden), down {mo}/sqrt(width) — so attention and expert outputs
  are of the size of the embeddings and every feature changes the routing; qwen2_moe q/k biases std {qkb}, v bias
  {vb}, `shared_expert_gate` std {rstd}/sqrt(hidden); qwen3_moe q_norm/k_norm weights 1 + {nw}·N(0,1).
  The f32 seeds were picked from a scan of 8 seeds per model among those with every expert used in every MoE
  layer, max/mean load < 2.5, min router margin > 1e-5 and min next-token logit margin > 1e-3.
- Feature effects: for each feature, the model with that feature removed (sliding window off, renormalisation off,
  shared expert gate = 1, no shared expert, `norm_topk_prob` flipped, q/k/v biases zeroed, dense-layer MLP
  zeroed, no q/k norm, q/k norm weights = 1, a multiplier = 1 (attention: head_dim^-0.5), granite weights = full
  softmax probabilities) is run teacher-forced over the same ids: "sets" = records whose expert SET changes,
  "argmax" = positions whose next-token argmax changes.
- Independent check: `independent_forward` re-implements each family from the safetensors with plain torch ops
  (op by op as read in transformers' modeling files); it reproduces every f32 expert list exactly, weights within 1e-6 and every
  generated id (the script asserts it), and the bf16 model's lists too.
- f32 models: compare exactly (identical expert lists in order, applied weights within 1e-6, identical generated
  ids; the script asserts that `generate()` with its KV cache routes exactly like the teacher-forced forward).
  bf16: compare teacher-forced (generated ids informative only); router ties (margin 0) occur.
  `qwen3moe-tiny-bf16` has its own seed and config (the initialised model cast with `.to(bfloat16)`);
  `mixtral-tiny-swa-bf16`, `qwen2moe-tiny-bf16` and `granitemoe-tiny-bf16` are the f32 fixtures of the same name
  (same seed, config and weights) made the way a user gets a bf16 checkpoint: saved, loaded back with
  `from_pretrained(dtype=torch.bfloat16)` (no tensor of these families is kept in f32) and saved again.
  `bf16_calibration` (summary): transformers itself computing the written bf16 checkpoint in f32
  (`dtype=float32`) instead of bf16 changes a few expert sets — the gaps (probabilities; granite: logits) of the
  first mismatch of each sequence are the scale of bf16 near ties — while bf16 with 2 threads changes none.

"""


def readme_line(name: str, m: dict) -> str:
    c = m["config"]
    fam = m["model_type"]
    e = c.get("num_local_experts") or c.get("num_experts")
    feats = {
        "mixtral": f"sliding_window {c.get('sliding_window')} (shortest prompt "
        f"{m.get('sliding_window_coverage', {}).get('shortest_prompt')} tokens), {len(m['checkpoint']['safetensors_files'])} shards",
        "qwen2_moe": f"qkv_bias, shared expert width {c.get('shared_expert_intermediate_size')} with sigmoid gate, "
        f"norm_topk_prob {c.get('norm_topk_prob')}, mlp_only_layers {c.get('mlp_only_layers')} (dense width "
        f"{c.get('intermediate_size')}), expert width {c.get('moe_intermediate_size')}",
        "qwen3_moe": f"q/k RMSNorm, head_dim {c.get('head_dim')} (hidden/heads = {c['hidden_size'] // c['num_attention_heads']}), "
        f"norm_topk_prob {c.get('norm_topk_prob')}, mlp_only_layers {c.get('mlp_only_layers')} (dense width "
        f"{c.get('intermediate_size')}), expert width {c.get('moe_intermediate_size')}",
        "granitemoe": f"embedding/attention/residual multipliers {c.get('embedding_multiplier')}/"
        f"{c.get('attention_multiplier')}/{c.get('residual_multiplier')}, logits_scaling {c.get('logits_scaling')}, "
        f"top-k then softmax",
    }[fam]
    eff = "; ".join(
        f"{k}: sets {v['records_with_changed_expert_set']}/{v['records']}, argmax {v['positions_with_changed_argmax']}/{v['positions']}"
        for k, v in m["feature_effects"].items()
    )
    ind = m["independent_reimplementation"]
    return (
        f"- `{name}` ({fam}): {m['dtype']}, seed {m['seed']}, vocab {c['vocab_size']}, hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers (MoE {m['moe_layers']}), heads {c['num_attention_heads']}/kv "
        f"{c['num_key_value_heads']}, {e} experts top-{c['num_experts_per_tok']}; {feats}; config "
        f"{m['config_form']}; {m['records']} records; experts used per MoE layer {m['experts_used_per_layer']}, "
        f"max/mean load {m['max_over_mean_load_per_layer']}; min router margin {m['min_router_margin']:.3g} "
        f"({m['min_router_margin_quantity']}; {m['records_with_zero_router_margin']} records at 0); min "
        f"next-token logit margin {m['min_logit_margin']:.3g}; generate vs teacher-forced mismatches "
        f"{m['generate_vs_teacher_forced_mismatches']}; feature effects — {eff}; independent re-implementation: "
        f"{ind['identical_expert_lists']}/{ind['records']} identical expert lists, max weight diff "
        f"{ind['max_abs_weight_diff_on_identical']:.2g}, {ind['argmax_equals_generated']}/{ind['generated_positions']} "
        f"generated ids; {m['bytes']} bytes."
        + (
            f" bf16 calibration: transformers computing this bf16 checkpoint in f32 changes "
            f"{m['bf16_calibration']['f32_compute']['expert_set_mismatches']}/{m['records']} expert sets (first of "
            f"each sequence at gaps up to {m['bf16_calibration']['f32_compute']['max_first_in_sequence_gap']:.3g}); "
            f"bf16 with 2 threads changes {m['bf16_calibration']['bf16_2_threads']['expert_set_mismatches']}."
            if "bf16_calibration" in m
            else ""
        )
    )


def write_readme_section(root: Path, summary: dict):
    path = root / "README.md"
    text = path.read_text() if path.exists() else "# Hugging Face conformance fixtures\n"
    body = README_HEAD.format(
        torch=summary["torch"], tf=summary["transformers"], rstd=ROUTER_LOGIT_STD, qk=QK_PROJ_GAIN,
        vg=V_PROJ_GAIN, og=O_PROJ_GAIN, mi=MLP_IN_GAIN, mo=MLP_OUT_GAIN, qkb=QK_BIAS_STD, vb=V_BIAS_STD,
        nw=NORM_WEIGHT_STD,
    )
    body += "\n".join(readme_line(n, m) for n, m in summary["models"].items()) + "\n"
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
    ap.add_argument("--only", nargs="*", help="model names to (re)build; the summary keeps the others")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    # the shared prompt set (written by hf_reference.py) must be the one this script uses
    want = [json.dumps({"id": p, "category": c, "text": t}) for p, c, t in ref.PROMPTS]
    have = (root / "prompts.jsonl").read_text().splitlines()
    assert have == want, "fixtures/hf/prompts.jsonl differs from hf_reference.PROMPTS"
    summary_path = root / f"summary-{Path(SCRIPT).stem}.json"
    summary = {
        "generator": SCRIPT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "router_logit_std": ROUTER_LOGIT_STD,
        "qk_bias_std": QK_BIAS_STD,
        "v_bias_std": V_BIAS_STD,
        "norm_weight_std": NORM_WEIGHT_STD,
        "qk_proj_gain": QK_PROJ_GAIN,
        "v_proj_gain": V_PROJ_GAIN,
        "o_proj_gain": O_PROJ_GAIN,
        "mlp_in_gain": MLP_IN_GAIN,
        "mlp_out_gain": MLP_OUT_GAIN,
        "max_new_tokens": MAX_NEW_TOKENS,
        "models": {},
    }
    if args.only and summary_path.exists():
        summary["models"] = json.loads(summary_path.read_text())["models"]
    for spec in MODELS:
        name = spec["name"]
        if args.only and name not in args.only:
            continue
        out = root / name
        print(f"== {name}", file=sys.stderr)
        tok = ref.build_tokenizer(spec["config"]["vocab_size"])
        model = make_model(spec)
        info = ref.save_checkpoint(model, dict(spec, layout="per_expert"), tok, out)
        info.pop("save_pretrained_layout", None)
        info["layout"] = "as written by save_pretrained"
        if spec.get("config_rename"):
            cpath = out / "config.json"
            cj = json.loads(cpath.read_text())
            for old, new in spec["config_rename"].items():
                cj[new] = cj.pop(old)
            cpath.write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
            info["config_form"] += "; keys renamed by this script: " + ", ".join(
                f"{a} -> {b}" for a, b in spec["config_rename"].items()
            )
        prompts_ids = [tok.encode(text).ids for _, _, text in ref.PROMPTS]
        for ids in prompts_ids:
            assert max(ids) < model.config.vocab_size
        model = reload(spec, model, out, prompts_ids[0])
        ref.chat_fixture(tok, out, ref.EOS)
        with open(out / "prompt_ids.jsonl", "w") as f:
            for (pid, _c, _t), ids in zip(ref.PROMPTS, prompts_ids):
                f.write(json.dumps({"prompt_id": pid, "ids": ids}) + "\n")
        stats, fulls = run_model(spec, model, tok, out, prompts_ids)
        if spec["dtype"] == torch.float32:
            assert stats["generate_vs_teacher_forced_mismatches"] == 0, stats
        info.update(stats)
        info["model_type"] = model.config.model_type
        info["dtype"] = str(spec["dtype"]).replace("torch.", "")
        info["seed"] = spec["seed"]
        info["config"] = dict(spec["config"])
        info["head_dim"] = model.model.layers[0].self_attn.head_dim
        info["attention_scaling"] = model.model.layers[0].self_attn.scaling
        info["feature_effects"] = feature_effects(spec, model, fulls)
        sw = sliding_window_stats(spec, fulls, prompts_ids)
        if sw:
            info["sliding_window_coverage"] = sw
        info["independent_reimplementation"] = independent_check(spec, out)
        if spec.get("bf16_via_from_pretrained"):
            info["bf16_calibration"] = bf16_calibration(spec, out, fulls)
            print("bf16 calibration", info["bf16_calibration"], file=sys.stderr)
            assert info["bf16_calibration"]["bf16_2_threads"]["expert_set_mismatches"] == 0, name
        info["tokenizer_vocab"] = tok.get_vocab_size()
        info["checkpoint"] = layout_info(out)
        info["comparison"] = (
            "teacher-forced (bf16: compare the trace teacher-forced over prompt+generated ids; every mismatch "
            "explained by its router margin; generated ids are informative only)"
            if spec["dtype"] == torch.bfloat16
            else "exact: identical experts (order), applied weights within 1e-6, identical generated ids"
        )
        info["bytes"] = sum(p.stat().st_size for p in out.iterdir())
        summary["models"][name] = info
        print(json.dumps({k: v for k, v in info.items() if k != "checkpoint"}, indent=1), file=sys.stderr)
    summary["models"] = {s["name"]: summary["models"][s["name"]] for s in MODELS if s["name"] in summary["models"]}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    write_readme_section(root, summary)


if __name__ == "__main__":
    main()
