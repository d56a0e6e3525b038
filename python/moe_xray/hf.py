"""Record moe-xray routing traces from any transformers 5.x Mixture-of-Experts model.

::

    import moe_xray.hf
    with moe_xray.hf.capture(model, out="traces/run1", prompts="prompts.jsonl",
                             tokenizer=tok) as cap:
        for p in cap.prompts:
            ids = tok(p.text, return_tensors="pt").to(model.device)
            model.generate(**ids, max_new_tokens=32, do_sample=False)

writes ``traces/run1/trace.jsonl`` (routing records, docs/trace-format.md section 1),
``generations.jsonl`` and ``manifest.json`` (with the ``routing`` block) exactly as
``moe-xray trace --hf-generate-compat`` lays them out, so that ``moe-xray analyze``, ``health``,
``compare`` and ``moe_xray.analyze`` read them as a native capture.

How it works: transformers 5.x routers (``mlp.gate``, ``block_sparse_moe.gate``, ``mlp.router``,
...) all return ``(router_logits, weights, indices)``. On the first forward the capture hooks
every module inside the decoder layers and keeps, per layer, the (innermost) module whose output
is such a triple; those are the routers, whatever their class or attribute name. A pre-hook on
the model gives the token ids, the padding and the positions of every forward (prefill: the
prompt; each decode step: one token per sequence), and a wrapper around ``model.generate`` binds
each batch row to the next prompt, reads the generation settings and, when ``generate`` returns,
trims every sequence at its first EOS (rows that finished early in a batch keep being fed padding
tokens) and to the tokens ``generate`` really kept.

What is recorded, per (prompt, MoE decoder layer, token position):

- ``layer``: the decoder-layer index (dense layers have no router and no records);
- ``position``: the token's index in its own sequence, prompt tokens first, padding never
  counted; the last generated token is never fed back by ``generate``, so it has no records
  (``--hf-generate-compat``);
- ``token_id``, ``token_type`` (``prompt`` / ``generation``), ``experts`` in the router's order;
- ``weights``: what the router returns, i.e. the coefficients the model multiplies each expert's
  output by; for OLMoE the full-softmax probabilities (f32) of the chosen experts, before the
  top-k renormalisation, as moe-xray's OLMoE traces hold;
- ``probs`` (``record_probs=True``): the full score vector: f32 softmax of the router logits, or
  for DeepSeek-V3-style routers (``e_score_correction_bias``) their sigmoid, without the bias.

This module is pure Python: it imports torch lazily (only ``capture`` needs it) and never imports
moe-xray's compiled extension.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "CaptureError",
    "Prompt",
    "Capture",
    "capture",
    "read_prompts",
    "prompt_set_hash",
    "format_f32",
    "record_line",
    "routing_block",
]

#: What a record's ``weights`` hold for OLMoE (as crates/pipeline/src/trace.rs writes it).
WEIGHTS_FULL_SOFTMAX = (
    "full-softmax probability of each chosen expert (coefficients renormalised when norm_topk_prob)"
)
#: What a record's ``weights`` hold in every other family.
WEIGHTS_APPLIED = "coefficient applied to each routed expert's output"

# Router kind of each family moe-xray knows (crates/model/src/config.rs `RouterKind::name`).
_ROUTER_KIND = {
    "olmoe": "softmax_topk",
    "mixtral": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "qwen3_moe": "softmax_topk",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "gpt_oss": "topk_softmax",
    "granitemoe": "topk_softmax",
}
# Families whose `weights` are the full-softmax probabilities, not the applied coefficients.
_FULL_SOFTMAX_WEIGHTS = {"olmoe"}

# moe_xray_trace::limits
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_POSITION = 1 << 20
_MAX_NAME_BYTES = 64


class CaptureError(Exception):
    """A capture that cannot be recorded faithfully (the message says why)."""


# --------------------------------------------------------------------------------------------
# Prompts and the prompt-set hash (docs/trace-format.md, "Prompt files").


@dataclass(frozen=True)
class Prompt:
    id: str
    category: Optional[str]
    text: Optional[str]


def _prompt_from(obj: Any, where: str) -> Prompt:
    if isinstance(obj, Prompt):
        p = obj
    elif isinstance(obj, dict):
        p = Prompt(obj.get("id"), obj.get("category"), obj.get("text"))
    elif isinstance(obj, (tuple, list)) and len(obj) == 3:
        p = Prompt(obj[0], obj[1], obj[2])
    else:
        raise CaptureError(f"{where}: a prompt must be a dict with id, category and text, "
                           f"a (id, category, text) tuple or a Prompt, not {type(obj).__name__}")
    if not isinstance(p.id, str) or not p.id:
        raise CaptureError(f"{where}: missing or empty prompt id")
    for field in ("category", "text"):
        v = getattr(p, field)
        if v is not None and (not isinstance(v, str) or not v):
            raise CaptureError(f"{where}: prompt `{p.id}`: {field} must be a non-empty string")
    return p


def read_prompts(path: Union[str, os.PathLike]) -> List[Prompt]:
    """Reads a moe-xray prompt file: JSONL (``{"id", "category", "text"}`` per line, blank lines
    skipped) or, for names ending in ``.csv``, CSV with a header holding ``id``, ``category`` and
    ``text``. Errors name the file and line."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaptureError(f"{path}: not UTF-8: {e}") from None
    out: List[Prompt] = []
    if path.lower().endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
        if not rows:
            raise CaptureError(f"{path}: empty file")
        header = rows[0]
        try:
            cols = [header.index(c) for c in ("id", "category", "text")]
        except ValueError:
            raise CaptureError(f"{path}: the header must contain id, category and text") from None
        for n, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise CaptureError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            p = _prompt_from(tuple(row[c] for c in cols), f"{path}:{n}")
            if p.category is None or p.text is None:
                raise CaptureError(f"{path}:{n}: missing category or text")
            out.append(p)
    else:
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptureError(f"{path}:{n}: malformed line: {e}") from None
            if not isinstance(obj, dict):
                raise CaptureError(f"{path}:{n}: a prompt line must be a JSON object")
            for field in ("id", "category", "text"):
                if field not in obj:
                    raise CaptureError(f"{path}:{n}: missing field `{field}`")
            out.append(_prompt_from(obj, f"{path}:{n}"))
    if not out:
        raise CaptureError(f"{path}: empty file (no prompts)")
    _check_unique(out, path)
    return out


def _check_unique(prompts: Sequence[Prompt], where: str) -> None:
    seen = set()
    for p in prompts:
        if p.id in seen:
            raise CaptureError(f"{where}: duplicate prompt id `{p.id}`")
        seen.add(p.id)


def prompt_set_hash(prompts: Iterable[Any]) -> str:
    """moe-xray's ``prompt_set_hash``: lower-case hex SHA-256 of the prompts sorted by id (byte
    order), each serialised as the compact JSON array ``["id","category","text"]`` followed by
    ``\\n`` (serde_json escaping, which ``json.dumps(..., ensure_ascii=False)`` reproduces)."""
    ps = [_prompt_from(p, "prompt_set_hash") for p in prompts]
    h = hashlib.sha256()
    for p in sorted(ps, key=lambda p: p.id.encode("utf-8")):
        if p.category is None or p.text is None:
            raise CaptureError(f"prompt_set_hash: prompt `{p.id}` needs a category and a text")
        h.update(_json([p.id, p.category, p.text]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# JSON exactly as serde_json writes it (compact; f32 in ryu's shortest form).


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _to_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def format_f32(x: float) -> str:
    """The text serde_json writes for the f32 nearest ``x``: the shortest decimal that reads back
    to the same f32, e.g. ``0.40766305``, ``1.0``, ``0.0000001``, ``2.9802322e-8``, ``1e+13``."""
    try:
        v = _to_f32(float(x))
    except OverflowError:
        raise CaptureError(f"weight {x!r} does not fit an f32") from None
    if not math.isfinite(v):
        raise CaptureError(f"weight {x!r} is not finite")
    if v == 0.0:
        return "-0.0" if math.copysign(1.0, v) < 0 else "0.0"
    sign = "-" if v < 0 else ""
    a = -v if v < 0 else v
    digits, exp10 = _shortest_f32_digits(a)
    # value = digits * 10^exp10, laid out as serde_json 1.0.154 does (its f32 formatter, zmij
    # 1.0: fixed notation for decimal exponents -6..=12, otherwise `d.ddde+XX` / `de-X`).
    length = len(digits)
    k = exp10
    kk = length + k
    if 0 <= k and kk <= 13:
        s = digits + "0" * (kk - length) + ".0"
    elif 0 < kk <= 13:
        s = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        s = "0." + "0" * (-kk) + digits
    else:
        e = kk - 1
        mant = digits if length == 1 else digits[0] + "." + digits[1:]
        s = mant + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + s


try:  # numpy's Dragon4 (C) finds the same digits ~10x faster; the fallback is pure Python
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the environment
    _np = None


def _shortest_f32_digits(a: float) -> Tuple[str, int]:
    """Shortest digit string d and exponent e with float32(d * 10^e) == a (a > 0, an exact f32);
    among the shortest, the one closest to a."""
    if _np is not None:
        mant, _, ex = _np.format_float_scientific(_np.float32(a), unique=True, trim="-").partition("e")
        d = mant.replace(".", "")
        return d, int(ex) - (len(d) - 1)
    return _shortest_f32_digits_py(a)


def _shortest_f32_digits_py(a: float) -> Tuple[str, int]:
    for p in range(1, 10):
        mant, _, ex = ("%.*e" % (p - 1, a)).partition("e")
        m = int(mant.replace(".", ""))
        e = int(ex) - (p - 1)
        best = None
        for c in (m, m - 1, m + 1):
            if c <= 0 or len(str(c)) != p:
                continue
            val = float(f"{c}e{e}")
            try:
                same = _to_f32(val) == a
            except OverflowError:
                same = False
            if same:
                err = abs(val - a)
                if best is None or err < best[0]:
                    best = (err, c)
        if best is not None:
            d = str(best[1]).rstrip("0")
            return d, e + (p - len(d))
    raise AssertionError("unreachable: 9 digits always round-trip an f32")


def record_line(
    prompt_id: str,
    category: Optional[str],
    layer: int,
    position: int,
    token_id: Optional[int],
    token_type: str,
    experts: Sequence[int],
    weights: Optional[Sequence[float]] = None,
    probs: Optional[Sequence[float]] = None,
) -> str:
    """One routing record line (with its ``\\n``), byte-identical to moe-xray's EventsWriter."""
    parts = ['{"prompt_id":', _json(prompt_id)]
    if category is not None:
        parts += [',"category":', _json(category)]
    parts.append(f',"layer":{int(layer)},"position":{int(position)}')
    if token_id is not None:
        parts.append(f',"token_id":{int(token_id)}')
    parts += [',"token_type":', _json(token_type)]
    parts.append(',"experts":[' + ",".join(str(int(e)) for e in experts) + "]")
    if weights:
        parts.append(',"weights":[' + ",".join(format_f32(w) for w in weights) + "]")
    if probs is not None:
        parts.append(',"probs":[' + ",".join(format_f32(w) for w in probs) + "]")
    parts.append("}\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# The manifest's routing block.


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    v = getattr(cfg, key, None)
    return default if v is None else v


def routing_block(config: Any, moe_layers: Sequence[int], num_layers: int,
                  router_class: str = "", sigmoid_scores: bool = False) -> Dict[str, Any]:
    """The manifest's ``routing`` block for a transformers config (the text config of a
    multimodal model) and the decoder layers where routers were found."""
    family = str(_cfg_get(config, "model_type", "unknown"))
    moe = sorted(set(int(l) for l in moe_layers))
    dense = [l for l in range(num_layers) if l not in set(moe)]
    shared = _cfg_get(config, "n_shared_experts", None)
    if shared is None:
        shared = _cfg_get(config, "num_shared_experts", None)
    if shared is None:
        shared = 1 if int(_cfg_get(config, "shared_expert_intermediate_size", 0) or 0) > 0 else 0
    router = _ROUTER_KIND.get(family)
    if router is None:
        router = ("transformers:" + router_class) if router_class else "transformers"
        router = router.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", "ignore")
    scores = "sigmoid" if (family == "deepseek_v3" or sigmoid_scores) else "softmax"
    return {
        "family": family.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", "ignore"),
        "moe_layers": moe,
        "dense_layers": dense,
        "num_shared_experts": int(shared),
        "router": router,
        "scores": scores,
        "weights": WEIGHTS_FULL_SOFTMAX if family in _FULL_SOFTMAX_WEIGHTS else WEIGHTS_APPLIED,
    }


def _dtype_name(dtype: Any) -> str:
    s = str(dtype).replace("torch.", "")
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(s, s)


def _tool_version() -> str:
    """The installed moe-xray package's version; from a checkout, the version in
    python/pyproject.toml or python/Cargo.toml; otherwise "unknown"."""
    try:
        from importlib.metadata import version

        return version("moe-xray")
    except Exception:  # not installed (run from a checkout)
        pass
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, section in (("pyproject.toml", "[project]"), ("Cargo.toml", "[package]")):
        try:
            with open(os.path.join(here, name), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        current = None
        for line in lines:
            s = line.strip()
            if s.startswith("["):
                current = s
            elif current == section and s.startswith("version") and "=" in s:
                v = s.split("=", 1)[1].strip()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    return v[1:-1]
    return "unknown"


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".moe-xray-tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# The capture.


class _Seq:
    """One sequence (batch row) being captured: its prompt and its records so far."""

    __slots__ = ("prompt", "records", "prompt_len")

    def __init__(self, prompt: Prompt, prompt_len: Optional[int]):
        self.prompt = prompt
        # (position, layer, token_id, experts, weights, probs)
        self.records: List[Tuple[int, int, Optional[int], list, list, Optional[list]]] = []
        self.prompt_len = prompt_len  # None outside generate(): every token is a prompt token


class _Step:
    """What the model's pre-hook learnt about one forward: for every (row, column) of the
    flattened [B, T] input its sequence, position and token id, or None for padding."""

    __slots__ = ("slots", "n")

    def __init__(self, slots: List[Optional[Tuple[_Seq, int, Optional[int]]]]):
        self.slots = slots
        self.n = len(slots)


class Capture:
    """See :func:`capture`."""

    def __init__(self, model: Any, out: Union[str, os.PathLike], prompts: Any = None, *,
                 tokenizer: Any = None, record_probs: bool = False,
                 model_name: Optional[str] = None, chat_template: bool = False,
                 compress: Optional[str] = None):
        try:
            import torch  # noqa: F401
        except ImportError as e:  # pragma: no cover - exercised only without torch
            raise CaptureError("moe_xray.hf.capture needs torch and transformers") from e
        self.model = model
        self.out = os.fspath(out)
        if compress not in (None, "gz"):
            raise CaptureError(f"compress must be None or 'gz', not {compress!r}")
        self.trace_name = "trace.jsonl" + (".gz" if compress == "gz" else "")
        if prompts is None:
            self.prompts: Optional[List[Prompt]] = None
        elif isinstance(prompts, (str, os.PathLike)):
            self.prompts = read_prompts(prompts)
        else:
            self.prompts = [_prompt_from(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
            if not self.prompts:
                raise CaptureError("prompts: empty list")
            _check_unique(self.prompts, "prompts")
        self.tokenizer = tokenizer
        self.record_probs = bool(record_probs)
        self.chat_template = bool(chat_template)
        cfg = model.config
        self.text_config = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.family = str(_cfg_get(self.text_config, "model_type", "unknown"))
        self.num_layers = int(_cfg_get(self.text_config, "num_hidden_layers", 0))
        if not 1 <= self.num_layers <= MAX_LAYERS:
            raise CaptureError(f"config.json: num_hidden_layers = {self.num_layers} "
                               f"(must be 1..{MAX_LAYERS})")
        self.model_name = model_name or str(getattr(cfg, "_name_or_path", "") or self.family)
        self.full_softmax_weights = self.family in _FULL_SOFTMAX_WEIGHTS
        self._layers_name, self._layers = self._find_decoder_layers()
        self._handles: List[Any] = []
        self._probe_handles: Dict[str, Any] = {}
        self._routers: Optional[Dict[str, int]] = None  # module name -> decoder layer
        self._router_class = ""
        self._sigmoid = False
        self._outputs: Dict[str, Any] = {}
        self._step: Optional[_Step] = None
        self._gen: Optional[Dict[str, Any]] = None
        self._pending: List[_Seq] = []  # sequences of the current generate() / forward
        self._next_prompt = 0
        self._written: List[str] = []
        self._gen_settings: List[Dict[str, Any]] = []
        self.num_experts: Optional[int] = None
        self.top_k: Optional[int] = None
        self.records_written = 0
        self._trace_f = None
        self._gens_f = None
        self._orig_generate = None
        self._had_generate_attr = False
        self._active = False

    # -- setup -------------------------------------------------------------------------------

    def _find_decoder_layers(self):
        import torch.nn as nn

        found = []
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == self.num_layers:
                found.append((not name.endswith("layers"), name.count("."), name, mod))
        if not found:
            raise CaptureError(
                f"no list of {self.num_layers} decoder layers (num_hidden_layers) in "
                f"{type(self.model).__name__}")
        found.sort(key=lambda t: (t[0], t[1]))
        _, _, name, mod = found[0]
        return name, mod

    def __enter__(self) -> "Capture":
        if self._active:
            raise CaptureError("this capture is already active")
        os.makedirs(self.out, exist_ok=True)
        for f in (self.trace_name, "generations.jsonl", "manifest.json"):
            p = os.path.join(self.out, f)
            if os.path.exists(p):
                raise CaptureError(f"{p} already exists; choose another out directory")
        self._trace_f = open(os.path.join(self.out, self.trace_name), "wb")
        self._gens_f = open(os.path.join(self.out, "generations.jsonl"), "wb")
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._post_hook, with_kwargs=True))
        prefix = self._layers_name + "." if self._layers_name else ""
        for name, mod in self.model.named_modules():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split(".")
            if len(rest) < 2 or not rest[0].isdigit():
                continue  # the layer list itself or a decoder layer
            layer = int(rest[0])
            self._probe_handles[name] = mod.register_forward_hook(self._make_hook(name, layer))
        self._had_generate_attr = "generate" in vars(m)
        self._orig_generate = m.generate
        m.generate = self._generate
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._active = False
        for h in self._handles:
            h.remove()
        for h in self._probe_handles.values():
            h.remove()
        self._handles.clear()
        self._probe_handles.clear()
        if self._had_generate_attr:
            self.model.generate = self._orig_generate
        else:
            try:
                del self.model.generate
            except AttributeError:
                pass
        self._pending = []  # an interrupted generate(): its prompts are not complete
        self._step = None
        self._gen = None
        for f in (self._trace_f, self._gens_f):
            if f is not None:
                f.close()
        # Files left empty are removed: no prompt completed (then a new capture may use the
        # directory), or only forward passes ran (no generations).
        for name, empty in ((self.trace_name, not self._written),
                            ("generations.jsonl", not self._written or not self._gen_settings)):
            p = os.path.join(self.out, name)
            if empty and os.path.exists(p) and os.path.getsize(p) == 0:
                os.unlink(p)
        if self._routers is not None and self._written:
            self._write_manifest()
        elif exc_type is None:
            raise CaptureError(
                "no forward pass ran inside the capture: nothing to record (call "
                "model.generate(...) or model(...) inside the with block)")

    # -- hooks -------------------------------------------------------------------------------

    def _make_hook(self, name: str, layer: int):
        def hook(module, args, output):
            if not _is_router_output(output):
                return None
            if name in self._outputs:
                raise CaptureError(f"{name}: the router ran twice in one forward pass")
            self._outputs[name] = (layer, type(module).__name__,
                                   hasattr(module, "e_score_correction_bias"),
                                   tuple(t.detach() for t in output))
            return None

        return hook

    def _pre_hook(self, module, args, kwargs):
        self._outputs = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            B, T = int(ids.shape[0]), int(ids.shape[1])
        elif embeds is not None:
            B, T = int(embeds.shape[0]), int(embeds.shape[1])
        else:
            raise CaptureError("a forward without input_ids or inputs_embeds")
        ids_list = ids.detach().to("cpu").tolist() if ids is not None else None
        mask = kwargs.get("attention_mask")
        mask2d = None
        if mask is not None and hasattr(mask, "ndim") and mask.ndim == 2:
            mask2d = mask.detach().to("cpu").tolist()
        slots: List[Optional[Tuple[_Seq, int, Optional[int]]]] = []
        g = self._gen
        if g is not None:
            if g["seqs"] is None:
                g["seqs"] = [self._bind(g["prompt_lens"][b]) for b in range(B)]
                self._pending = list(g["seqs"])
            if B != len(g["seqs"]):
                raise CaptureError(
                    f"generate() fed a batch of {B} rows to a forward but was called with "
                    f"{len(g['seqs'])} (beam search, num_return_sequences > 1 and assisted "
                    "decoding are not supported)")
            col0 = g["fed"]
            W, pm, npl = g["width"], g["prompt_mask"], g["prompt_lens"]
            for b in range(B):
                seq = g["seqs"][b]
                for t in range(T):
                    col = col0 + t
                    tok = ids_list[b][t] if ids_list is not None else None
                    if col < W:
                        if not pm[b][col]:
                            slots.append(None)
                            continue
                        pos = g["cum"][b][col] - 1
                    else:
                        pos = npl[b] + (col - W)
                    slots.append((seq, pos, tok))
            g["fed"] = col0 + T
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise CaptureError(
                    "a forward with a non-empty cache outside generate(): call generate() "
                    "inside the capture, or full-sequence forwards")
            if mask2d is not None and len(mask2d[0]) != T:
                mask2d = None
            seqs = [self._bind(None) for _ in range(B)]
            self._pending = seqs
            for b in range(B):
                pos = 0
                for t in range(T):
                    if mask2d is not None and not mask2d[b][t]:
                        slots.append(None)
                        continue
                    slots.append((seqs[b], pos, ids_list[b][t] if ids_list is not None else None))
                    pos += 1
        self._step = _Step(slots)
        return None

    def _post_hook(self, module, args, kwargs, output):
        step = self._step
        if step is None:
            return None
        self._step = None
        outputs, self._outputs = self._outputs, {}
        if self._routers is None:
            self._discover(outputs)
        missing = [n for n in self._routers if n not in outputs]
        if missing:
            raise CaptureError(f"router {missing[0]} did not run in this forward pass")
        self._collect(step, outputs)
        if self._gen is None:
            self._finish(self._pending, None)
            self._pending = []
        return None

    def _discover(self, outputs: Dict[str, Any]) -> None:
        by_layer: Dict[int, List[str]] = {}
        for name, (layer, *_rest) in outputs.items():
            by_layer.setdefault(layer, []).append(name)
        if not by_layer:
            raise CaptureError(
                f"no router found in {type(self.model).__name__}: no module inside "
                f"{self._layers_name or 'the decoder layers'} returned (router_logits, weights, "
                "indices) (is this a transformers 5.x MoE model?)")
        routers: Dict[str, int] = {}
        for layer, names in by_layer.items():
            # A module that passes its child's triple through returns the same tensors: keep
            # the innermost one. Two distinct routers in one layer are not supported.
            names.sort(key=lambda n: -n.count("."))
            inner = names[0]
            t_inner = outputs[inner][3]
            for other in names[1:]:
                t_other = outputs[other][3]
                if not all(a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())
                           for a, b in zip(t_inner, t_other)):
                    raise CaptureError(f"decoder layer {layer} has two routers ({inner}, {other})")
            routers[inner] = layer
        E = {int(outputs[n][3][0].shape[-1]) for n in routers}
        K = {int(outputs[n][3][2].shape[-1]) for n in routers}
        if len(E) != 1 or len(K) != 1:
            raise CaptureError(f"the routers disagree on the number of experts {sorted(E)} "
                               f"or top-k {sorted(K)}")
        self.num_experts, self.top_k = E.pop(), K.pop()
        if not 1 <= self.num_experts <= MAX_EXPERTS or not 1 <= self.top_k <= self.num_experts:
            raise CaptureError(f"num_experts {self.num_experts} / top_k {self.top_k} out of range")
        cfg_e = None
        for key in ("num_experts", "n_routed_experts", "num_local_experts"):
            if _cfg_get(self.text_config, key) is not None:
                cfg_e = int(_cfg_get(self.text_config, key))
                break
        if cfg_e is not None and cfg_e != self.num_experts:
            raise CaptureError(f"the routers score {self.num_experts} experts but the config says "
                               f"{cfg_e}")
        first = min(routers, key=lambda n: routers[n])
        self._router_class = outputs[first][1]
        self._sigmoid = bool(outputs[first][2])
        self._routers = dict(sorted(routers.items(), key=lambda kv: kv[1]))
        for name in list(self._probe_handles):
            if name not in self._routers:
                self._probe_handles.pop(name).remove()

    def _collect(self, step: _Step, outputs: Dict[str, Any]) -> None:
        import torch

        E, k = self.num_experts, self.top_k
        for name, layer in self._routers.items():
            logits, weights, idx = outputs[name][3]
            n = int(idx.numel()) // max(k, 1)
            if idx.shape[-1] != k or n != step.n or logits.numel() != step.n * E:
                raise CaptureError(
                    f"{name}: router output of {n} tokens x {idx.shape[-1]} experts does not "
                    f"match the forward's {step.n} tokens x top_k {k}")
            idx2 = idx.reshape(n, k)
            if self.full_softmax_weights:
                probs_full = torch.softmax(logits.reshape(n, E).float(), dim=-1)
                w = probs_full.gather(1, idx2.long())
            else:
                w = weights.reshape(n, k).float()
                probs_full = None
            probs = None
            if self.record_probs:
                lf = logits.reshape(n, E).float()
                probs = (torch.sigmoid(lf) if self._sigmoid else
                         (probs_full if probs_full is not None else torch.softmax(lf, dim=-1)))
                probs = probs.to("cpu").tolist()
            idx_l = idx2.to("cpu").tolist()
            w_l = w.to("cpu").tolist()
            for i, slot in enumerate(step.slots):
                if slot is None:
                    continue
                seq, pos, tok = slot
                seq.records.append((pos, layer, tok, idx_l[i], w_l[i],
                                    probs[i] if probs is not None else None))

    # -- sequences ---------------------------------------------------------------------------

    def _bind(self, prompt_len: Optional[int]) -> _Seq:
        i = self._next_prompt
        if self.prompts is None:
            p = Prompt(f"prompt-{i:05d}", None, None)
        elif i >= len(self.prompts):
            raise CaptureError(
                f"more sequences than prompts: sequence {i + 1} has no prompt (the capture was "
                f"given {len(self.prompts)}; each generate() row or fresh forward row takes the "
                "next prompt in order)")
        else:
            p = self.prompts[i]
        self._next_prompt = i + 1
        return _Seq(p, prompt_len)

    @property
    def prompts_captured(self) -> List[str]:
        """Ids of the prompts written so far, in order."""
        return list(self._written)

    def _finish(self, seqs: List[_Seq], kept: Optional[List[Tuple[int, List[int], List[int], bool]]]):
        """Writes each sequence's block. ``kept`` (generate()): per row the number of routed
        positions, the prompt ids, the generated ids and whether it stopped on EOS."""
        for b, seq in enumerate(seqs):
            recs = sorted(seq.records, key=lambda r: (r[0], r[1]))
            if kept is not None:
                limit, prompt_ids, gen_ids, eos = kept[b]
                full = prompt_ids + gen_ids
                recs = [r for r in recs if r[0] < limit]
                for r in recs:
                    if r[2] is not None and r[2] != full[r[0]]:
                        raise CaptureError(
                            f"prompt `{seq.prompt.id}`: the token fed at position {r[0]} ({r[2]}) "
                            f"is not the one generate() returned ({full[r[0]]})")
                n_layers = len(self._routers)
                if len(recs) != limit * n_layers:
                    raise CaptureError(
                        f"prompt `{seq.prompt.id}`: {len(recs)} routing records for {limit} "
                        f"positions x {n_layers} MoE layers")
            for r in recs:
                if r[0] + 1 > MAX_POSITION:
                    raise CaptureError(f"prompt `{seq.prompt.id}`: position {r[0]} over the limit")
            plen = seq.prompt_len
            lines = []
            for pos, layer, tok, experts, weights, probs in recs:
                ttype = "prompt" if plen is None or pos < plen else "generation"
                lines.append(record_line(seq.prompt.id, seq.prompt.category, layer, pos, tok,
                                         ttype, experts, weights, probs))
            data = "".join(lines).encode("utf-8")
            if kept is not None:
                text = ""
                if self.tokenizer is not None:
                    text = self.tokenizer.decode(gen_ids, skip_special_tokens=False)
                gl = {"prompt_id": seq.prompt.id, "category": seq.prompt.category or "",
                      "prompt_ids": prompt_ids, "generated_ids": gen_ids, "text": text,
                      "stopped_on_eos": eos}
                self._gens_f.write((_json(gl) + "\n").encode("utf-8"))
                self._gens_f.flush()
                os.fsync(self._gens_f.fileno())
            if data:
                self._trace_f.write(gzip.compress(data, mtime=0) if self.trace_name.endswith(".gz")
                                    else data)
                self._trace_f.flush()
                os.fsync(self._trace_f.fileno())
            self.records_written += len(recs)
            self._written.append(seq.prompt.id)
        if self._routers is not None:
            self._write_manifest()

    # -- generate() --------------------------------------------------------------------------

    def _generate(self, *args, **kwargs):
        if self._gen is not None:
            raise CaptureError("generate() called inside generate()")
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if ids is None or not hasattr(ids, "shape") or ids.ndim != 2:
            raise CaptureError("generate() inside the capture needs input_ids [batch, length]")
        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(key) is not None:
                raise CaptureError(f"generate({key}=...) is not supported: rejected draft tokens "
                                   "would be routed")
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            raise CaptureError("generate() with a cache passed in is not supported by the capture")
        settings, eos = self._settings(kwargs)
        B, W = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        pm = (mask.detach().to("cpu").tolist() if mask is not None
              else [[1] * W for _ in range(B)])
        if len(pm) != B or any(len(r) != W for r in pm):
            raise CaptureError("generate(): attention_mask and input_ids differ in shape")
        cum = []
        for r in pm:
            c, s = [], 0
            for v in r:
                s += 1 if v else 0
                c.append(s)
            cum.append(c)
        prompt_lens = [c[-1] if c else 0 for c in cum]
        if any(n == 0 for n in prompt_lens):
            raise CaptureError("generate(): a batch row without prompt tokens")
        ids_l = ids.detach().to("cpu").tolist()
        self._gen = {"seqs": None, "fed": 0, "width": W, "prompt_mask": pm, "cum": cum,
                     "prompt_lens": prompt_lens}
        try:
            result = self._orig_generate(*args, **kwargs)
            seqs = self._gen["seqs"]
            if seqs is None:
                raise CaptureError("generate() ran no forward pass")
            sequences = getattr(result, "sequences", result)
            out_l = sequences.detach().to("cpu").tolist()
            kept = []
            for b in range(B):
                prompt_ids = [t for t, m in zip(ids_l[b], pm[b]) if m]
                gen_ids = out_l[b][W:] if len(out_l[b]) >= W and out_l[b][:W] == ids_l[b] else None
                if gen_ids is None:
                    raise CaptureError("generate() returned sequences that do not start with the "
                                       "prompt")
                stopped = False
                for j, t in enumerate(gen_ids):
                    if t in eos:
                        gen_ids = gen_ids[: j + 1]
                        stopped = True
                        break
                # generate() never feeds the last token it generates (hf-generate-compat).
                kept.append((len(prompt_ids) + len(gen_ids) - 1 if gen_ids else len(prompt_ids),
                             prompt_ids, gen_ids, stopped))
            self._gen_settings.append(settings)
            self._gen = None
            self._finish(seqs, kept)
            self._pending = []
            return result
        finally:
            self._gen = None
            self._pending = []

    def _settings(self, kwargs: Dict[str, Any]):
        import copy

        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        gc = copy.deepcopy(gc) if gc is not None else None
        get = lambda k, d=None: (kwargs[k] if k in kwargs else _cfg_get(gc, k, d))  # noqa: E731
        if int(get("num_beams", 1) or 1) != 1:
            raise CaptureError("generate(num_beams > 1) is not supported: beams reorder the "
                               "sequences, so routed tokens are not the returned ones")
        if int(get("num_return_sequences", 1) or 1) != 1:
            raise CaptureError("generate(num_return_sequences > 1) is not supported")
        eos = get("eos_token_id")
        eos_l = [] if eos is None else ([int(eos)] if isinstance(eos, int) else
                                         [int(e) for e in (eos.tolist() if hasattr(eos, "tolist")
                                                           else eos)])
        sample = bool(get("do_sample", False))
        max_new = get("max_new_tokens")
        settings = {
            "max_new_tokens": None if max_new is None else int(max_new),
            "decoding": "sample" if sample else "greedy",
            "temperature": float(get("temperature", 1.0)) if sample else None,
            "top_p": float(get("top_p", 1.0)) if sample else None,
            "seed": None,
            "eos_token_ids": eos_l,
            "ignore_eos": False,
            "chat_template": self.chat_template,
        }
        if max_new is None and get("max_length") is not None:
            settings["max_length"] = int(get("max_length"))
        return settings, set(eos_l)

    # -- manifest ----------------------------------------------------------------------------

    def manifest(self) -> Dict[str, Any]:
        """The manifest this capture writes (field order as moe-xray's ``Manifest``)."""
        if self._routers is None:
            raise CaptureError("no forward pass yet: the routers are not known")
        import torch
        import transformers

        distinct = []
        for s in self._gen_settings:
            if s not in distinct:
                distinct.append(s)
        gen: Dict[str, Any] = {"hf_generate_compat": True, "last_generated_token_routed": False}
        if len(distinct) == 1:
            gen.update(distinct[0])
        elif distinct:
            gen["calls"] = distinct
        else:
            gen["decoding"] = "none (forward passes only)"
        gen = dict(sorted(gen.items()))
        m: Dict[str, Any] = {
            "model": self.model_name,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "dtype": _dtype_name(getattr(self.model, "dtype", "")),
            "generation": gen,
        }
        if self.prompts is not None and all(p.category and p.text for p in self.prompts):
            m["prompt_set_hash"] = prompt_set_hash(self.prompts)
        m["tool_version"] = _tool_version()
        m["capture_mode"] = "events"
        m["routing"] = routing_block(self.text_config, list(self._routers.values()),
                                     self.num_layers, self._router_class, self._sigmoid)
        device = getattr(self.model, "device", None)
        extra = {
            "capture": {
                "tool": "moe_xray.hf.capture",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "device": str(device) if device is not None else "",
                "routers": list(self._routers),
                "router_class": self._router_class,
                "prompts_captured": len(self._written),
            },
            "record_probs": self.record_probs,
            "trace_file": self.trace_name,
        }
        m.update(sorted(extra.items()))
        return m

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest(), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
        _write_atomic(os.path.join(self.out, "manifest.json"), text)


def _is_router_output(output: Any) -> bool:
    """(router_logits [..., E], weights [..., k], indices [..., k] integer), k <= E."""
    if not isinstance(output, tuple) or len(output) != 3:
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    logits, weights, idx = output
    if not all(isinstance(t, torch.Tensor) for t in output):
        return False
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        return False
    if not (logits.is_floating_point() and weights.is_floating_point()):
        return False
    if idx.ndim < 1 or logits.ndim < 1 or idx.shape != weights.shape:
        return False
    k, e = int(idx.shape[-1]), int(logits.shape[-1])
    if k < 1 or e < k:
        return False
    return logits.numel() // e == idx.numel() // k


def capture(model: Any, out: Union[str, os.PathLike], prompts: Any = None, *,
            tokenizer: Any = None, record_probs: bool = False, model_name: Optional[str] = None,
            chat_template: bool = False, compress: Optional[str] = None) -> Capture:
    """Capture the routing of ``model`` (any transformers 5.x MoE model, on any device) into
    ``out`` (created if missing; refused when it already holds a trace) in moe-xray's trace
    format. Use as a context manager around ``model.generate(...)`` (or plain forward passes).

    - ``prompts``: a prompt file (JSONL / CSV, as ``moe-xray trace --prompts``), or a list of
      dicts / ``(id, category, text)`` tuples, or None (ids ``prompt-00000``, ...). Every batch
      row of each ``generate()`` call (or of a full-sequence forward) takes the next prompt in
      order; the capture's ``.prompts`` is that list. With texts, the manifest gets the prompt
      set's ``prompt_set_hash``.
    - ``tokenizer``: used only to write the decoded ``text`` of ``generations.jsonl``.
    - ``record_probs``: also write each record's full score vector (``probs``).
    - ``model_name``: the manifest's ``model`` (default: ``config._name_or_path``).
    - ``chat_template``: whether you wrapped the prompts with the chat template (recorded in the
      manifest's ``generation`` block).
    - ``compress="gz"``: write ``trace.jsonl.gz`` (one gzip member per prompt).

    Each prompt's block is written (and fsynced) when its ``generate()`` call returns; the
    manifest is rewritten after every call, so an interrupted notebook keeps every finished
    prompt. Beam search, ``num_return_sequences > 1``, assisted decoding and a cache passed into
    ``generate()`` are refused (routed tokens would not be the returned ones).
    """
    return Capture(model, out, prompts, tokenizer=tokenizer, record_probs=record_probs,
                   model_name=model_name, chat_template=chat_template, compress=compress)
