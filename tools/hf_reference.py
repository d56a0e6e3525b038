#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers for moe-xray's OLMoE conformance tests.

Builds small `OlmoeForCausalLM` models with transformers' own initialisation, saves them in the exact
Hugging Face layout (config.json, model.safetensors[.index.json], generation_config.json, tokenizer.json,
tokenizer_config.json), greedy-generates on a small prompt set and records, with forward hooks on every
layer's router (`model.layers[i].mlp.gate`), which experts were selected for every token.

Output: fixtures/hf/<model>/ (see tools/README.md, section "HF conformance fixtures").

Facts checked in the pinned transformers (tools/requirements-hf.txt) and relied upon here:
- `OlmoeTopKRouter.forward` returns `(router_logits, router_scores, router_indices)`; logits are in the
  model dtype, the softmax is taken in float32, `torch.topk` picks the experts (descending probability),
  renormalisation (norm_topk_prob) is applied to the top-k values only. A forward hook on `mlp.gate`
  therefore sees (logits, weights, indices). We store the full-softmax probabilities (float32 softmax of
  the logits, before renormalisation) as `weights`, and the whole distribution as `probs`.
- `generate()` never feeds the last generated token through the model. The trace is therefore taken from a
  separate teacher-forced forward over prompt + generated ids (batch 1, no padding), so every position,
  including the last generated token, has a record. For f32 models the script asserts that the routing
  seen during `generate()` (KV cache) equals the teacher-forced routing on every position it covers.
- `save_pretrained` writes the published per-expert layout
  (`mlp.experts.{e}.{gate,up,down}_proj.weight`) although the module holds fused parameters
  (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]). The model
  `olmoe-tiny-fused-f32` is written by this script in the fused layout (keys converted here) and with a
  transformers-4.x style config (`rope_theta` at the top level instead of `rope_parameters`); the script
  checks that transformers loads it back to identical logits.

Initialisation: transformers' `_init_weights` (normal(0, initializer_range=0.02), norms = 1), except that,
so that routing is not collapsed onto a near-uniform softmax, the router weights (`mlp.gate.weight`) are
re-drawn with std `ROUTER_LOGIT_STD / sqrt(hidden)` (router input is RMS-normalised, so router logits have
std ~ROUTER_LOGIT_STD) and the untied `lm_head` with std `1/sqrt(hidden)` (next-token logits of std ~1 so
greedy decoding has clear margins). Everything is seeded (`torch.manual_seed(seed)` per model).

Attention and experts use transformers' "eager" implementations (plain math, no fused kernels).

Usage: /work/venvs/hf/bin/python tools/hf_reference.py [--out fixtures/hf]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OlmoeConfig, OlmoeForCausalLM

ROUTER_LOGIT_STD = 1.5
MAX_NEW_TOKENS = 12

# Tulu-style chat template (as used by OLMoE-1B-7B-0125-Instruct): plain-text role markers, bos first,
# eos after each assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

EOS = "<|endoftext|>"  # id 0
PAD = "<|padding|>"  # id 1

PROMPTS = [
    ("code-01", "code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
    ("code-02", "code", "Write a Python function that reverses a list in place."),
    ("math-01", "math", "What is 17 * 23 + 4? Show your steps."),
    ("math-02", "math", "Solve for x: 3x + 7 = 22."),
    ("story-01", "story", "Once upon a time, a small fox lived at the edge of a quiet forest."),
    ("story-02", "story", "Tell me a short story about a lighthouse keeper and a storm."),
    ("factual-01", "factual", "What is the capital of France?"),
    ("factual-02", "factual", "Why is the sky blue during the day?"),
]

# Tiny training corpus for the byte-level BPE tokenizers (written for this project).
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "fn main() { let v: Vec<i32> = (0..10).collect(); println!(\"{:?}\", v); }\n",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\nprint(x.sum(axis=0))\n",
    "Write a function that returns the largest element of a list.",
    "What is 12 + 35? The answer is 47.",
    "Compute 7 * 8 = 56 and 9 * 9 = 81. Then 56 + 81 = 137.",
    "Solve for x: 2x + 3 = 11, so 2x = 8 and x = 4.",
    "The derivative of x^2 is 2x, and the integral of 2x is x^2 + C.",
    "If a train travels 60 miles in 1.5 hours, its average speed is 40 miles per hour.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "The old man walked slowly along the beach, listening to the waves and the gulls.",
    "She opened the door and found a small fox sleeping by the fire.",
    "The storm came in the night, and the lighthouse keeper climbed the stairs to light the lamp.",
    "They laughed and danced until the stars faded and the morning came.",
    "What is the capital of France? The capital of France is Paris.",
    "Why is the sky blue? Sunlight is scattered by the molecules of the air, and blue light is scattered most.",
    "Who wrote Hamlet? William Shakespeare wrote Hamlet around 1600.",
    "How many planets are in the solar system? There are eight planets.",
    "Where is Mount Everest? It is in the Himalayas, on the border of Nepal and China.",
    "When did the Second World War end? It ended in 1945.",
    "<|user|>\nHello, can you help me?\n<|assistant|>\nOf course! What do you need?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:()[]{}<>=+-*/",
]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A GPT-NeoX-style byte-level BPE (like OLMo's), trained on CORPUS; specials take ids 0 and 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    assert tok.get_vocab_size() <= vocab_size
    return tok


MODELS = [
    # name, config overrides, seed, dtype, layout, shard size
    dict(
        name="olmoe-tiny-mha-f32",
        seed=11,
        dtype=torch.float32,
        layout="per_expert",
        shard=None,
        config=dict(
            vocab_size=512, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False,
        ),
    ),
    dict(
        name="olmoe-tiny-gqa-f32",
        seed=22,
        dtype=torch.float32,
        layout="per_expert",
        shard="300KB",
        config=dict(
            vocab_size=640, hidden_size=64, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
            norm_topk_prob=True, clip_qkv=1.2, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    dict(
        name="olmoe-tiny-bf16",
        seed=33,
        dtype=torch.bfloat16,
        layout="per_expert",
        shard=None,
        config=dict(
            vocab_size=768, hidden_size=48, intermediate_size=24, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=6, num_experts=12, num_experts_per_tok=3,
            norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False,
        ),
    ),
    dict(
        name="olmoe-tiny-fused-f32",
        seed=44,
        dtype=torch.float32,
        layout="fused",
        shard=None,
        config=dict(
            vocab_size=520, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, num_experts=10, num_experts_per_tok=3,
            norm_topk_prob=True, clip_qkv=None, tie_word_embeddings=True,
        ),
    ),
]


def make_model(spec: dict) -> OlmoeForCausalLM:
    c = dict(spec["config"])
    cfg = OlmoeConfig(
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
        max_position_embeddings=512,
        **c,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = OlmoeForCausalLM(cfg)
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=g) * (ROUTER_LOGIT_STD / math.sqrt(h)))
        if not cfg.tie_word_embeddings:
            w = model.lm_head.weight
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(h))
        else:
            # tied: the embedding is the output matrix too; scale it like an lm_head
            w = model.model.embed_tokens.weight
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(h))
    model = model.to(spec["dtype"])
    model.eval()
    set_impl(model)
    return model


def set_impl(model):
    model.config._attn_implementation = "eager"
    try:
        model.set_experts_implementation("eager")
    except AttributeError:
        model.config._experts_implementation = "eager"


class RouterCapture:
    """Forward hooks on every layer's `mlp.gate`; each call appends (logits, indices) per layer."""

    def __init__(self, model):
        self.calls: list[list] = [[] for _ in model.model.layers]
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(module, inputs, output):
            logits, weights, indices = output  # checked: (router_logits, router_scores, router_indices)
            self.calls[i].append((logits.detach().clone(), indices.detach().clone()))

        return hook

    def reset(self):
        self.calls = [[] for _ in self.calls]

    def close(self):
        for h in self.handles:
            h.remove()


def fuse_state_dict(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Per-expert keys -> transformers 5.x fused keys (gate_up_proj = cat(gate, up) along dim 1)."""
    out = {}
    n_e = cfg.num_experts
    for k, v in sd.items():
        if ".mlp.experts." in k:
            continue
        out[k] = v
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.mlp.experts"
        gate = torch.stack([sd[f"{p}.{e}.gate_proj.weight"] for e in range(n_e)])  # [E, I, H]
        up = torch.stack([sd[f"{p}.{e}.up_proj.weight"] for e in range(n_e)])
        down = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(n_e)])  # [E, H, I]
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        out[f"{p}.down_proj"] = down.contiguous()
    return out


def read_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    files = sorted(d.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    return sd


def save_checkpoint(model, spec, tok: Tokenizer, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    kwargs = {}
    if spec["shard"]:
        kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(str(out), **kwargs)
    info = {}
    written = read_safetensors_dir(out)
    per_expert = any(".mlp.experts.0." in k for k in written)
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in written)
    info["save_pretrained_layout"] = "per_expert" if per_expert else ("fused" if fused else "unknown")
    if spec["layout"] == "fused":
        assert per_expert, "expected save_pretrained to write per-expert keys"
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        fused_sd = fuse_state_dict(written, model.config)
        save_file(fused_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        # transformers-4.x style config: rope_theta at top level, no rope_parameters
        cfg = json.loads((out / "config.json").read_text())
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp["rope_theta"]
        cfg["rope_scaling"] = None
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = "float32"
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        info["layout"] = "fused (gate_up_proj [E,2I,H], down_proj [E,H,I]); converted by this script"
        info["config_form"] = "transformers 4.x (rope_theta)"
    else:
        info["layout"] = "per_expert (written by save_pretrained)"
        info["config_form"] = "transformers 5.x (rope_parameters)"
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    return info


def f32list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.to(torch.float32).tolist()]


def run_model(model, spec, tok: Tokenizer, out: Path, prompts_ids: list[list[int]]) -> dict:
    cfg = model.config
    k = cfg.num_experts_per_tok
    cap = RouterCapture(model)
    gens = []
    trace_lines = []
    n_records = 0
    min_margin = float("inf")
    min_logit_margin = float("inf")
    gen_vs_tf_mismatch = 0
    clip_frac = []
    usage = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    for (pid, cat, _text), ids in zip(PROMPTS, prompts_ids):
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
        generated = full[len(ids):]
        margins = []
        for s in res.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        min_logit_margin = min(min_logit_margin, min(margins))
        # routing seen during generate(): per layer, concat of (positions) over calls
        gen_idx = [torch.cat([c[1] for c in cap.calls[l]], 0) for l in range(cfg.num_hidden_layers)]
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
        # teacher-forced forward over prompt + generated ids: every position is recorded
        cap.reset()
        with torch.no_grad():
            model(torch.tensor([full], dtype=torch.long))
        for l in range(cfg.num_hidden_layers):
            logits, idx = cap.calls[l][0]
            probs = torch.softmax(logits.float(), dim=-1)
            sorted_p = torch.sort(probs, dim=-1, descending=True).values
            for pos in range(len(full)):
                ex = idx[pos].tolist()
                p = probs[pos]
                margin = float(sorted_p[pos, k - 1] - sorted_p[pos, k])
                min_margin = min(min_margin, margin)
                usage[l, ex] += 1
                if pos < gen_idx[l].shape[0] and gen_idx[l][pos].tolist() != ex:
                    gen_vs_tf_mismatch += 1
                trace_lines.append(
                    (
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
                            "weights": [float(p[e]) for e in ex],
                            "probs": f32list(p),
                            "margin": margin,
                        },
                    )
                )
                n_records += 1
    cap.close()
    # records ordered by prompt, then position, then layer
    with open(out / "expected_trace.jsonl", "w") as f:
        for pi, (pid, _c, _t) in enumerate(PROMPTS):
            rows = [r for r in trace_lines if r[2]["prompt_id"] == pid]
            rows.sort(key=lambda r: (r[0], r[1]))
            for _, _, rec in rows:
                f.write(json.dumps(rec) + "\n")
    with open(out / "expected_generations.jsonl", "w") as f:
        for g in gens:
            f.write(json.dumps(g) + "\n")
    total = usage.sum(axis=1, keepdims=True)
    load = usage / total * cfg.num_experts  # load relative to the mean
    return {
        "records": n_records,
        "min_router_margin": min_margin,
        "min_logit_margin": min_logit_margin,
        "generate_vs_teacher_forced_mismatches": gen_vs_tf_mismatch,
        "experts_used_per_layer": [int((u > 0).sum()) for u in usage],
        "max_over_mean_load_per_layer": [round(float(x), 3) for x in load.max(axis=1)],
    }


def clip_fraction(model, ids: list[int]) -> float | None:
    """Fraction of q/k/v elements that clip_qkv clamps (layer 0 only) — shows the option is exercised."""
    c = model.config.clip_qkv
    if c is None:
        return None
    attn = model.model.layers[0].self_attn
    seen = {}

    def grab(name):
        def hook(m, i, o):
            seen[name] = o.detach().float().clone()

        return hook

    hs = [
        attn.q_norm.register_forward_hook(grab("q")),
        attn.k_norm.register_forward_hook(grab("k")),
        attn.v_proj.register_forward_hook(grab("v")),
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hs:
        h.remove()
    allv = torch.cat([seen[n].flatten() for n in ("q", "k", "v")])
    return float((allv.abs() > c).float().mean())


def reload(model, out: Path, ids: list[int]) -> OlmoeForCausalLM:
    """Load the written directory with transformers (what a user does); the reference runs on this.

    For f32 models, asserts identical logits to the in-memory model (both layouts). For bf16 the
    in-memory model differs slightly (its RoPE buffer was cast to bf16 by `.to()`, from_pretrained keeps
    it in f32), so the reloaded model is the reference.
    """
    m2 = OlmoeForCausalLM.from_pretrained(str(out), dtype=model.dtype)
    set_impl(m2)
    m2.eval()
    if model.dtype == torch.float32:
        x = torch.tensor([ids])
        with torch.no_grad():
            a = model(x).logits
            b = m2(x).logits
        assert torch.equal(a, b), f"{out}: reloaded model differs (max {float((a - b).abs().max())})"
    return m2


def chat_fixture(tok: Tokenizer, out: Path, bos: str):
    """Chat-template rendering by transformers (jinja2) for the Rust minijinja renderer."""
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast.from_pretrained(str(out))
    cases = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Solve 2x = 4."},
        ],
    ]
    with open(out / "expected_chat.jsonl", "w") as f:
        for msgs in cases:
            text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text).ids
            f.write(json.dumps({"messages": msgs, "add_generation_prompt": True, "rendered": text, "ids": ids}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures" / "hf"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "prompts.jsonl", "w") as f:
        for pid, cat, text in PROMPTS:
            f.write(json.dumps({"id": pid, "category": cat, "text": text}) + "\n")
    summary = {
        "generator": "tools/hf_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "router_logit_std": ROUTER_LOGIT_STD,
        "max_new_tokens": MAX_NEW_TOKENS,
        "models": {},
    }
    for spec in MODELS:
        name = spec["name"]
        out = root / name
        print(f"== {name}", file=sys.stderr)
        tok = build_tokenizer(spec["config"]["vocab_size"])
        model = make_model(spec)
        info = save_checkpoint(model, spec, tok, out)
        prompts_ids = [tok.encode(text).ids for _, _, text in PROMPTS]
        for ids in prompts_ids:
            assert max(ids) < model.config.vocab_size
        model = reload(model, out, prompts_ids[0])
        chat_fixture(tok, out, EOS)
        with open(out / "prompt_ids.jsonl", "w") as f:
            for (pid, _c, _t), ids in zip(PROMPTS, prompts_ids):
                f.write(json.dumps({"prompt_id": pid, "ids": ids}) + "\n")
        stats = run_model(model, spec, tok, out, prompts_ids)
        if spec["dtype"] == torch.float32:
            assert stats["generate_vs_teacher_forced_mismatches"] == 0, stats
        info.update(stats)
        info["dtype"] = str(spec["dtype"]).replace("torch.", "")
        info["seed"] = spec["seed"]
        info["config"] = {k: v for k, v in spec["config"].items()}
        info["clip_fraction_layer0"] = clip_fraction(model, prompts_ids[0])
        info["tokenizer_vocab"] = tok.get_vocab_size()
        info["comparison"] = (
            "teacher-forced (bf16: compare the trace teacher-forced over prompt+generated ids; "
            "generated ids are informative only)"
            if spec["dtype"] == torch.bfloat16
            else "exact: identical experts (order), weights within 1e-5, identical generated ids"
        )
        info["bytes"] = sum(p.stat().st_size for p in out.iterdir())
        summary["models"][name] = info
        print(json.dumps(info, indent=1), file=sys.stderr)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_readme(root, summary)


def write_readme(root: Path, summary: dict):
    lines = [
        "# Hugging Face conformance fixtures",
        "",
        f"Generated by `tools/hf_reference.py` with torch {summary['torch']} and transformers "
        f"{summary['transformers']} (pinned in `tools/requirements-hf.txt`); do not edit by hand.",
        "See tools/README.md (\"HF conformance fixtures\") for how to regenerate and for the file formats.",
        "",
        "`prompts.jsonl`: the prompt set (id/category/text). Per model directory: the checkpoint in HF layout,",
        "`prompt_ids.jsonl` (token ids of each prompt, no special tokens added), `expected_generations.jsonl`",
        f"(greedy, {summary['max_new_tokens']} new tokens max, EOS stops), `expected_trace.jsonl` (teacher-forced",
        "forward over prompt+generated ids: one record per (position, layer) including the last generated",
        "token; `weights` = full-softmax probabilities of `experts`, `probs` = full router distribution,",
        "`margin` = k-th minus (k+1)-th probability), `expected_chat.jsonl` (chat template rendered by",
        "transformers).",
        "",
    ]
    for name, m in summary["models"].items():
        c = m["config"]
        lines.append(
            f"- `{name}`: {m['dtype']}, seed {m['seed']}, vocab {c['vocab_size']}, hidden {c['hidden_size']}, "
            f"intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, heads {c['num_attention_heads']}"
            f"/kv {c['num_key_value_heads']}, {c['num_experts']} experts top-{c['num_experts_per_tok']}, "
            f"norm_topk_prob {c['norm_topk_prob']}, clip_qkv {c['clip_qkv']}, tie_word_embeddings "
            f"{c['tie_word_embeddings']}; weights {m['layout']}; config {m['config_form']}; "
            f"{m['records']} records; experts used per layer {m['experts_used_per_layer']}, max/mean load "
            f"{m['max_over_mean_load_per_layer']}; min router margin {m['min_router_margin']:.3g}; "
            f"min next-token logit margin {m['min_logit_margin']:.3g}; comparison: {m['comparison']}."
        )
    lines.append("")
    (root / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
