"""Reference fixture for gpt-oss in its published MXFP4 form (issue 17): a tiny gpt_oss checkpoint whose
routed experts are stored as `mlp.experts.{gate_up,down}_proj_{blocks,scales}` (u8) with
`"quantization_config": {"quant_method": "mxfp4", ...}` in config.json, everything else in bf16 (as
openai/gpt-oss-20b), and the routing of transformers on the *dequantised* weights in f32.

Layout (transformers 5.24 `integrations/mxfp4.py`, `_convert_moe_packed_tensors`): `*_blocks` is
`[E, rows, k/32, 16]` where `rows` are the output units of the dequantised-then-transposed tensor (gate_up:
2I rows, gate = even rows, up = odd rows; down: H rows) and `k` its input axis; byte j of a block holds value 2j
in its low nibble and 2j+1 in its high nibble, an E2M1 code (FP4_VALUES); `*_scales` `[E, rows, k/32]` is the
E8M0 exponent with bias 127 (value = FP4 * 2^(scale-127)).

Quantiser (this script's, as gguf-py's MXFP4.quantize_blocks): scale exponent floor(log2(max|x|)) - 2, then the
nearest E2M1 value (first in table order on ties). The reference model holds exactly the dequantised experts
and the bf16-rounded other weights in f32; it is checked against transformers' own loader,
`from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True), dtype=float32)` (logits identical),
and the routing is recorded with tools/hf_ref_deepseek_gptoss.py's machinery (teacher-forced, f32).

Also writes fixtures/gguf/gptoss-tiny-mxfp4/model.gguf: the same model converted by gguf-py with the experts as
GGUF type MXFP4 (39) — only when run with --gguf from /work/venvs/gguf (see tools/make_gguf_fixtures.py).

Usage: /work/venvs/hf/bin/python tools/hf_ref_gptoss_mxfp4.py [--out fixtures/hf]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import hf_ref_deepseek_gptoss as base  # noqa: E402
import hf_reference as ref  # noqa: E402

NAME = "gptoss-tiny-mxfp4"
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
SPEC = dict(
    name=NAME, family="gpt_oss", seed=606, dtype=torch.float32, shard=None,
    config=dict(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=12, num_experts_per_tok=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
        swiglu_limit=4.0, swiglu_alpha=1.702, rms_norm_eps=1e-5, attention_bias=True,
        max_position_embeddings=131072, rope_parameters=dict(base.YARN_OSS),
    ),
)
QUANT_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}


def quantize(w: np.ndarray):
    """w [..., rows, k] f32 -> blocks [..., rows, k/32, 16] u8, scales [..., rows, k/32] u8, dequantised f32."""
    *pre, rows, k = w.shape
    assert k % 32 == 0
    b = w.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-38))) - 2 + 127, 0)
    e = np.clip(e, 0, 254).astype(np.uint8)
    d = np.ldexp(np.float32(1.0), e.astype(np.int32) - 127).astype(np.float32)
    errs = np.abs(d[:, None, None] * FP4_VALUES[None, None, :] - b[:, :, None])
    codes = np.argmin(errs, axis=-1).astype(np.uint8)  # [nb, 32]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    deq = (FP4_VALUES[codes] * d[:, None]).astype(np.float32)
    return (
        packed.reshape(*pre, rows, k // 32, 16),
        e.reshape(*pre, rows, k // 32),
        deq.reshape(*pre, rows, k),
    )


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' _convert_moe_packed_tensors in numpy (without the final transpose)."""
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    v = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = np.ldexp(v, scales.astype(np.int32)[..., None] - 127).astype(np.float32)
    return v.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(TOOLS.parent / "fixtures" / "hf"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out) / NAME
    tok = ref.build_tokenizer(SPEC["config"]["vocab_size"])
    model = base.make_model(SPEC)
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("gate_up_proj", "down_proj"):
                # [E, in, out] (x @ W) -> rows = out units, k = in.
                w = p.detach().numpy().transpose(0, 2, 1).copy()
                blocks, scales, deq = quantize(w)
                assert np.array_equal(dequantize(blocks, scales), deq)
                packed[name + "_blocks"] = torch.from_numpy(blocks)
                packed[name + "_scales"] = torch.from_numpy(scales)
                p.copy_(torch.from_numpy(deq.transpose(0, 2, 1).copy()))
            else:
                # Everything else is stored in bf16 (as the published checkpoints).
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    # The checkpoint: bf16 tensors, u8 experts, config.json with quantization_config.
    model.save_pretrained(str(out))
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            continue
        sd[name] = p.to(torch.bfloat16).contiguous()
    sd.update({k: v.contiguous() for k, v in packed.items()})
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = QUANT_CONFIG
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": ref.EOS, "eos_token": ref.EOS,
        "pad_token": ref.PAD, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": ref.CHAT_TEMPLATE,
    }, indent=2) + "\n")

    prompts_ids = [tok.encode(text).ids for _, _, text in ref.PROMPTS]
    # transformers' own MXFP4 loader, dequantising on the CPU: must equal the in-memory reference.
    loaded = None
    try:
        loaded = type(model).from_pretrained(
            str(out), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
        )
        ref.set_impl(loaded)
        loaded.eval()
        x = torch.tensor([prompts_ids[0]])
        with torch.no_grad():
            a, b = model(x).logits, loaded(x).logits
        assert torch.equal(a, b), f"Mxfp4Config(dequantize=True) differs: {float((a - b).abs().max())}"
        loader = "transformers Mxfp4Config(dequantize=True), float32 (logits identical to the numpy dequantisation)"
    except Exception as e:  # noqa: BLE001 (recorded: which loader produced the reference)
        print(f"Mxfp4Config loader unavailable: {e!r}", file=sys.stderr)
        loader = f"numpy dequantisation (transformers' loader failed: {type(e).__name__})"
    ref_model = loaded if loaded is not None else model
    ref.chat_fixture(tok, out, ref.EOS)
    with open(out / "prompt_ids.jsonl", "w") as f:
        for (pid, _c, _t), ids in zip(ref.PROMPTS, prompts_ids):
            f.write(json.dumps({"prompt_id": pid, "ids": ids}) + "\n")
    stats, _trace, _fulls = base.run_model(ref_model, SPEC, tok, out, prompts_ids)
    assert stats["generate_vs_teacher_forced_mismatches"] == 0, stats
    summary = {
        "generator": "tools/hf_ref_gptoss_mxfp4.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reference_loader": loader,
        "config": SPEC["config"],
        "seed": SPEC["seed"],
        "prompt_lengths": [len(i) for i in prompts_ids],
        "bytes": sum(p.stat().st_size for p in out.iterdir()),
        **{k: v for k, v in stats.items()},
    }
    (Path(args.out) / f"summary-{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
