#!/usr/bin/env python3
"""Hugging Face transformers side of the side-by-side benchmark against `moe-xray bench model`.

Runs an OLMoE checkpoint (Hugging Face layout, e.g. from `moe-xray synth-model --preset olmoe-1b-7b`)
with transformers on CPU on exactly the workload of `moe-xray bench model`
(crates/cli/src/cmd/bench_model.rs) and reports prefill and decode tokens/s separately, wall time
and peak RSS, with the same field names as `moe-xray bench model --json`.

Usage (environment: tools/requirements-hf.txt, virtualenv /work/venvs/hf):

    /work/venvs/hf/bin/python tools/bench_hf.py --model DIR [-n 8] [--max-new-tokens 32] \
        [--batch-size 8] [--threads 2] [--dtype bf16] [--no-capture] [--json FILE]

    # the paper workload (80 prompts x 32 new tokens), as `moe-xray bench model -n 0`:
    /work/venvs/hf/bin/python tools/bench_hf.py --model /path/olmoe-1b-7b -n 0 --json hf.json

Options: `--prompts paper80|FILE.jsonl|FILE.csv` (default the bundled prompts/paper80.jsonl),
`-n N` first N prompts (0 = all; default 8 as bench model), `--max-new-tokens` (32), `--batch-size` (8),
`--threads` (2; torch.set_num_threads), `--dtype bf16|f32|f16` (bf16: the model is loaded with
`dtype=torch.bfloat16`, the current name of the deprecated `torch_dtype=` argument), `--no-capture`
(no router hooks: the bare model), `--attn-implementation` / `--experts-implementation` (default:
transformers' own choice, printed), `--json FILE` (summary), `--counts-out FILE` (per-prompt routing
counts in the format of `moe-xray trace --mode counts`, for checking that both sides route the same
tokens), `--generations-out FILE` (prompt and generated token ids per prompt).

Workload, identical to `moe-xray bench model`:
- Prompts: the first N prompts of the set (JSONL `{"id","category","text"}` or CSV `id,category,text`).
- Tokenisation: `tokenizers.Tokenizer.from_file(<model>/tokenizer.json).encode(text,
  add_special_tokens=True)`, the same library and call as moe-xray (crates/model/src/tokenizer.rs,
  `Tokenizer::encode(text, true)`): BOS/EOS are added exactly when the tokenizer's post-processor adds
  them; no chat template (bench model has none).
- Consecutive batches of `--batch-size` prompts in file order. Greedy decoding (argmax, ties to the
  lowest id) of exactly `--max-new-tokens` tokens per prompt; EOS is ignored.
- Like moe-xray, the last generated token is also run through the model (routing only: this last step
  calls the base model `model.model`, without the LM head, as moe-xray skips its logits).
- Token accounting: prefill = the first forward of each batch (all prompt tokens); decode = every later
  forward (one token per prompt). Per prompt: prefill = prompt length, decode = max_new_tokens (the
  max_new_tokens - 1 generated tokens that produce the next token + the last one). Tokens are real
  (non-pad) tokens; the pad positions transformers also computes are reported as `padded_tokens`.
  Tokens/s of a phase = its tokens / seconds spent inside the model forward calls of that phase
  (including the router hooks); argmax and batch assembly count towards the wall time only.

transformers' normal batched inference: left padding (pad id = config.pad_token_id) with an attention
mask, position ids = cumsum(mask) - 1 (as generate() computes them), a DynamicCache, prefill as one forward
over the padded batch (logits_to_keep=1), decode as a manual loop (generate() is not used so that the two
phases are timed separately). The model runs in eval mode under torch.inference_mode().

Routing capture (default; `--no-capture` switches it off): a forward hook on every layer's `mlp.gate`
(`OlmoeTopKRouter`, whose output is (router_logits, router_weights, router_indices)) accumulates, per
prompt and token type (prompt / generation), the L x E expert counts and the summed router weights of
the real (non-pad) tokens, like moe-xray's counts sink. `routing_decisions` = (token, layer) pairs
recorded, as in bench model.

Memory: `peak_rss_bytes` = VmHWM of /proc/self/status (as bench model), `ru_maxrss_bytes` =
resource.getrusage(RUSAGE_SELF).ru_maxrss * 1024; `rss_after_load_bytes` = VmRSS after loading.

The hub is never contacted (HF_HUB_OFFLINE=1, local_files_only=True).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAPER80 = REPO / "prompts" / "paper80.jsonl"
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


class UserError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# prompts (same rules as crates/trace/src/prompts.rs)


def _check(path, line, raw, seen):
    def err(m):
        return UserError(f"{path}:{line}: {m}")

    pid = raw.get("id")
    if pid is None:
        raise err("missing field `id`")
    if isinstance(pid, bool) or not isinstance(pid, (str, int, float)):
        raise err(f"`id` must be a string, found {json.dumps(pid)}")
    pid = pid if isinstance(pid, str) else json.dumps(pid)
    if not pid.strip():
        raise err("empty `id`")
    cat = raw.get("category")
    if cat is None:
        raise err(f"prompt '{pid}': missing field `category`")
    if not isinstance(cat, str) or not cat.strip():
        raise err(f"prompt '{pid}': empty or non-string `category`")
    text = raw.get("text")
    if text is None:
        raise err(f"prompt '{pid}': missing field `text`")
    if not isinstance(text, str) or not text.strip():
        raise err(f"prompt '{pid}': empty or non-string `text`")
    if pid in seen:
        raise err(f"duplicate prompt id '{pid}'")
    seen.add(pid)
    return {"id": pid, "category": cat, "text": text}


def read_prompts(path: Path) -> list[dict]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from e
    out, seen = [], set()
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(data.decode("utf-8").splitlines(keepends=True)))
        if not rows or not any(h.strip() for h in rows[0]):
            raise UserError(f"{path}: empty prompt file (no CSV header)")
        header = [h.strip() for h in rows[0]]
        for need in ("id", "category", "text"):
            if need not in header:
                raise UserError(f"{path}:1: CSV header must contain id,category,text; `{need}` is missing")
        col = {name: header.index(name) for name in ("id", "category", "text")}
        for i, rec in enumerate(rows[1:], start=2):
            raw = {k: (rec[c] if c < len(rec) else None) for k, c in col.items()}
            out.append(_check(path, i, raw, seen))
    else:
        for i, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: invalid prompt JSON: {e}") from e
            if not isinstance(raw, dict):
                raise UserError(f"{path}:{i}: invalid prompt JSON: expected an object")
            out.append(_check(path, i, raw, seen))
    if not out:
        raise UserError(f"{path}: empty prompt file (no prompts)")
    return out


def load_prompts(spec: str) -> list[dict]:
    if spec == "paper80":
        return read_prompts(PAPER80)
    p = Path(spec)
    if not p.exists():
        raise UserError(f"--prompts {spec}: no such file (and not a bundled set; bundled: paper80)")
    return read_prompts(p)


# ---------------------------------------------------------------------------------------------
# memory


def proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except OSError:
        return None
    return None


def ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


# ---------------------------------------------------------------------------------------------
# routing capture


class RouterCapture:
    """Forward hooks on every layer's `mlp.gate`. Before each forward the caller sets which rows of the
    flattened (batch * seq) router input are real tokens (`rows`, None = all), the batch slot of each
    real row (`owner`) and the token type (0 = prompt, 1 = generation)."""

    def __init__(self, model, num_layers: int, num_experts: int, top_k: int):
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.rows = None
        self.owner = None
        self.token_type = 0
        self.decisions = 0
        self.counts = None  # int64 [2, B, L, E]
        self.weighted = None  # float64 [2, B, L, E]
        self.handles = []
        layers = model.model.layers
        if len(layers) != num_layers:
            raise UserError(f"model has {len(layers)} layers, config says {num_layers}")
        for li, layer in enumerate(layers):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is None:
                raise UserError(f"layer {li} has no `mlp.gate` router module (not an OLMoE checkpoint?)")
            self.handles.append(gate.register_forward_hook(self._hook(li)))

    def begin_batch(self, b: int):
        self.counts = torch.zeros((2, b, self.L, self.E), dtype=torch.int64)
        self.weighted = torch.zeros((2, b, self.L, self.E), dtype=torch.float64)

    def set_step(self, rows, owner, token_type):
        self.rows, self.owner, self.token_type = rows, owner, token_type

    def _hook(self, li):
        def hook(_module, _inputs, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise RuntimeError(
                    f"layer {li}: `mlp.gate` returned {type(output).__name__}, expected (logits, weights, indices) "
                    f"as in the pinned transformers (tools/requirements-hf.txt)"
                )
            _logits, weights, indices = output
            if self.rows is not None:
                indices = indices.index_select(0, self.rows)
                weights = weights.index_select(0, self.rows)
            flat = ((self.owner * self.L + li) * self.E).unsqueeze(1) + indices
            flat = flat.reshape(-1)
            c = self.counts[self.token_type].view(-1)
            c.index_add_(0, flat, torch.ones_like(flat))
            w = self.weighted[self.token_type].view(-1)
            w.index_add_(0, flat, weights.reshape(-1).to(torch.float64))
            self.decisions += indices.shape[0]

        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------
# model calls


def cache_kwarg(fn) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; use whichever the forward takes."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def argmax_lowest(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice per row: highest logit, ties to the lowest id (torch.argmax's rule; NaN never wins
    as in bench model: NaNs are replaced by -inf first)."""
    lg = logits.float()
    lg = torch.where(torch.isnan(lg), torch.full_like(lg, float("-inf")), lg)
    return torch.argmax(lg, dim=-1)


def run_pass(model, seqs, batch_size, max_new_tokens, pad_id, capture: RouterCapture | None):
    lm_kw = cache_kwarg(model.forward)
    base_kw = cache_kwarg(model.model.forward)
    r = {
        "sink": "counts" if capture is not None else "null",
        "prompts": len(seqs),
        "prefill_tokens": 0,
        "decode_tokens": 0,
        "padded_tokens": 0,
        "prefill_seconds": 0.0,
        "decode_seconds": 0.0,
        "wall_seconds": 0.0,
        "forward_calls": 0,
    }
    results = []  # per prompt: generated ids, counts
    wall = time.perf_counter()
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        b = len(chunk)
        lens = [len(s["ids"]) for s in chunk]
        width = max(lens)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, s in enumerate(chunk):
            input_ids[i, width - lens[i] :] = torch.tensor(s["ids"], dtype=torch.long)
            mask[i, width - lens[i] :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        fed = sum(lens)
        if capture is not None:
            capture.begin_batch(b)
            flat_mask = mask.reshape(-1).bool()
            rows = None if bool(flat_mask.all()) else flat_mask.nonzero().squeeze(1)
            owner = torch.arange(b).repeat_interleave(torch.tensor(lens))
            capture.set_step(rows, owner, 0)
        cache = DynamicCache(config=model.config)
        generated = [[] for _ in range(b)]
        want_logits = max_new_tokens > 0
        t = time.perf_counter()
        if want_logits:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{lm_kw: cache},
            )
        else:
            out = model.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{base_kw: cache},
            )
        r["prefill_seconds"] += time.perf_counter() - t
        r["prefill_tokens"] += fed
        r["padded_tokens"] += b * width - fed
        r["forward_calls"] += 1
        next_pos = mask.sum(-1, keepdim=True)  # position of the next token, per row
        if capture is not None:
            capture.set_step(None, torch.arange(b), 1)
        for step in range(max_new_tokens):
            tok = argmax_lowest(out.logits[:, -1, :])
            for i in range(b):
                generated[i].append(int(tok[i]))
            cache = out_cache(out)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            want_logits = step + 1 < max_new_tokens
            kwargs = dict(
                input_ids=tok.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_pos,
                use_cache=True,
            )
            t = time.perf_counter()
            if want_logits:
                out = model(logits_to_keep=1, **kwargs, **{lm_kw: cache})
            else:
                out = model.model(**kwargs, **{base_kw: cache})
            r["decode_seconds"] += time.perf_counter() - t
            r["decode_tokens"] += b
            r["forward_calls"] += 1
            next_pos = next_pos + 1
        for i, s in enumerate(chunk):
            res = {"id": s["id"], "category": s["category"], "prompt_ids": s["ids"], "generated_ids": generated[i]}
            if capture is not None:
                res["counts"] = [capture.counts[tt, i].reshape(-1).tolist() for tt in (0, 1)]
                res["weighted"] = [capture.weighted[tt, i].reshape(-1).tolist() for tt in (0, 1)]
                res["tokens"] = [lens[i], max_new_tokens]
            results.append(res)
        del cache, out
    r["wall_seconds"] = time.perf_counter() - wall

    def rate(n, s):
        return n / s if s > 0 else 0.0

    r["prefill_tokens_per_second"] = rate(r["prefill_tokens"], r["prefill_seconds"])
    r["decode_tokens_per_second"] = rate(r["decode_tokens"], r["decode_seconds"])
    r["tokens_per_second"] = rate(r["prefill_tokens"] + r["decode_tokens"], r["wall_seconds"])
    r["routing_decisions"] = capture.decisions if capture is not None else None
    return r, results


# ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def gb(b):
    return "n/a" if b is None else f"{b / 1e9:.2f} GB"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, type=Path, help="checkpoint directory in Hugging Face layout")
    ap.add_argument(
        "--prompts", default="paper80", help="paper80 (bundled) or a JSONL / CSV file with id, category, text"
    )
    ap.add_argument("-n", "--num-prompts", type=int, default=8, help="use the first N prompts (0 = all) [8]")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt, EOS ignored [32]")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per left-padded batch [8]")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads [2]")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="load/compute dtype [bf16]")
    ap.add_argument("--no-capture", action="store_true", help="no router hooks (bare model)")
    ap.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers' choice)")
    ap.add_argument(
        "--experts-implementation",
        default=None,
        help="e.g. eager, grouped_mm, batched_mm (default: transformers' choice)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the summary as JSON to this file")
    ap.add_argument(
        "--counts-out", type=Path, default=None, help="per-prompt routing counts (moe-xray counts.jsonl format)"
    )
    ap.add_argument(
        "--generations-out", type=Path, default=None, help="prompt and generated token ids per prompt (JSONL)"
    )
    a = ap.parse_args(argv)
    if a.num_prompts < 0:
        ap.error("-n/--num-prompts must be >= 0")
    if a.max_new_tokens < 0:
        ap.error("--max-new-tokens must be >= 0")
    if a.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if a.threads < 1:
        ap.error("--threads must be at least 1")
    if a.counts_out is not None and a.no_capture:
        ap.error("--counts-out needs routing capture (drop --no-capture)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    total_t = time.perf_counter()

    prompts = load_prompts(a.prompts)
    if a.num_prompts > 0:
        if a.num_prompts > len(prompts):
            raise UserError(
                f"--num-prompts {a.num_prompts}: the prompt set {a.prompts} has only {len(prompts)} prompts"
            )
        prompts = prompts[: a.num_prompts]

    tok_path = a.model / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{tok_path}: no such file")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise UserError(f"{tok_path}: {e}") from e
    if not (a.model / "config.json").is_file():
        raise UserError(f"{a.model / 'config.json'}: no such file")

    hf_logging.disable_progress_bar()
    load_kw = {"dtype": DTYPES[a.dtype], "local_files_only": True}
    if a.attn_implementation:
        load_kw["attn_implementation"] = a.attn_implementation
    if a.experts_implementation:
        load_kw["experts_implementation"] = a.experts_implementation
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(a.model), **load_kw)
    model.eval()
    load_seconds = time.perf_counter() - t
    rss_after_load = proc_status_bytes("VmRSS")
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    top_k = cfg.num_experts_per_tok
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    seqs = []
    for p in prompts:
        ids = tokenizer.encode(p["text"], add_special_tokens=True).ids
        if not ids:
            raise UserError(f"{a.prompts}: prompt `{p['id']}` encodes to no tokens")
        bad = [x for x in ids if x >= cfg.vocab_size]
        if bad:
            raise UserError(f"prompt `{p['id']}`: token id {bad[0]} >= vocab_size {cfg.vocab_size} of {a.model}")
        seqs.append({"id": p["id"], "category": p["category"], "ids": ids})

    capture = None if a.no_capture else RouterCapture(model, num_layers, num_experts, top_k)
    with torch.inference_mode():
        pas, results = run_pass(model, seqs, a.batch_size, a.max_new_tokens, pad_id, capture)
    if capture is not None:
        capture.close()
        expect = (pas["prefill_tokens"] + pas["decode_tokens"]) * num_layers
        if pas["routing_decisions"] != expect:
            raise RuntimeError(f"internal: {pas['routing_decisions']} routing decisions recorded, expected {expect}")

    summary = {
        "tool": "tools/bench_hf.py",
        "model": str(a.model),
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "hidden_size": cfg.hidden_size,
        "dtype": a.dtype,
        "threads": a.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens,
        "prompt_set": a.prompts,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "experts_implementation": getattr(cfg, "_experts_implementation_internal", None)
        or getattr(cfg, "_experts_implementation", None),
        "load_seconds": load_seconds,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "ru_maxrss_bytes": ru_maxrss_bytes(),
        "total_seconds": time.perf_counter() - total_t,
        "passes": [pas],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }

    if a.json is not None:
        write_atomic(a.json, json.dumps(summary, indent=2) + "\n")
    if a.counts_out is not None:
        lines = []
        for res in results:
            for tt, name in enumerate(("prompt", "generation")):
                if res["tokens"][tt] == 0:
                    continue
                lines.append(
                    json.dumps(
                        {
                            "prompt_id": res["id"],
                            "category": res["category"],
                            "token_type": name,
                            "num_layers": num_layers,
                            "num_experts": num_experts,
                            "tokens": res["tokens"][tt],
                            "counts": res["counts"][tt],
                            "weighted_counts": res["weighted"][tt],
                        }
                    )
                )
        write_atomic(a.counts_out, "".join(x + "\n" for x in lines))
    if a.generations_out is not None:
        lines = [
            json.dumps(
                {
                    "prompt_id": r["id"],
                    "category": r["category"],
                    "prompt_ids": r["prompt_ids"],
                    "generated_ids": r["generated_ids"],
                }
            )
            for r in results
        ]
        write_atomic(a.generations_out, "".join(x + "\n" for x in lines))

    v = summary["versions"]
    print(
        f"bench hf: {a.model} ({num_layers} layers x {num_experts} experts, top-{top_k}, hidden {cfg.hidden_size}, "
        f"{a.dtype}), {len(seqs)} prompts x {a.max_new_tokens} new tokens, batch {a.batch_size}, threads {a.threads}"
    )
    print(
        f"torch {v['torch']}, transformers {v['transformers']}, attn {summary['attn_implementation']}, "
        f"experts {summary['experts_implementation']}"
    )
    print(
        f"load {load_seconds:.2f} s, RSS after load {gb(rss_after_load)}, peak RSS {gb(summary['peak_rss_bytes'])} "
        f"(VmHWM), {gb(summary['ru_maxrss_bytes'])} (ru_maxrss), total {summary['total_seconds']:.2f} s"
    )
    hdr = ("sink", "prefill", "prefill s", "prefill t/s", "decode", "decode s", "decode t/s", "wall s", "total t/s")
    print("{:<8} {:>9} {:>10} {:>12} {:>9} {:>10} {:>12} {:>9} {:>10}".format(*hdr))
    p = pas
    print(
        f"{p['sink']:<8} {p['prefill_tokens']:>9} {p['prefill_seconds']:>10.2f} "
        f"{p['prefill_tokens_per_second']:>12.2f} "
        f"{p['decode_tokens']:>9} {p['decode_seconds']:>10.2f} {p['decode_tokens_per_second']:>12.2f} "
        f"{p['wall_seconds']:>9.2f} {p['tokens_per_second']:>10.2f}"
    )
    rd = p["routing_decisions"]
    print(
        f"padded (non-real) tokens also computed in prefill: {p['padded_tokens']}; "
        f"routing decisions recorded: {rd if rd is not None else 'n/a (--no-capture)'}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
