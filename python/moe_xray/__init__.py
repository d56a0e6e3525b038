"""moe-xray from Python: routing signatures of Mixture-of-Experts models.

The statistics, tables and figures are computed by the same Rust code as the `moe-xray`
command-line tool (compiled into `moe_xray._native`); this package turns them into pandas
DataFrames (or pyarrow Tables with ``as_="arrow"``) and notebook-friendly objects.

- :func:`read_trace` — a trace file (records, flat events or counts lines; .gz / .zst; a Parquet
  file or Hive-partitioned Parquet dataset directory) as a table.
- :func:`signatures` — per-prompt routing signatures as a table.
- :func:`analyze` — the statistics of ``moe-xray analyze`` as a :class:`Results`.
- :func:`health`, :func:`compare` — ``moe-xray health`` / ``moe-xray compare``.
- :func:`trace`, :func:`run` — ``moe-xray trace`` / ``moe-xray run`` on a checkpoint (CPU).
- :mod:`moe_xray.hf` — record the routing of a transformers model on any device.

Keyword options have the names and defaults of the CLI flags (``--num-experts`` is
``num_experts=``). Bad input raises :class:`MoeXrayError` naming the file and field.
"""

import json
import os

from . import _frames
from ._results import Comparison, Figure, Figures, Health, Results, Study

__version__ = "0.1.0"

__all__ = [
    "read_trace",
    "signatures",
    "analyze",
    "health",
    "compare",
    "trace",
    "run",
    "load_results",
    "Results",
    "Health",
    "Comparison",
    "Study",
    "Figure",
    "Figures",
    "MoeXrayError",
    "MoeXrayWarning",
]


def _nat():
    # Imported on first use, so that the pure-Python parts (e.g. moe_xray.hf) work without it.
    from . import _native as n

    return n


def __getattr__(name):
    if name in ("MoeXrayError", "MoeXrayWarning"):
        return getattr(_nat(), name)
    raise AttributeError(f"module 'moe_xray' has no attribute {name!r}")


def _paths(traces):
    if isinstance(traces, (str, bytes, os.PathLike)):
        return [os.fspath(traces)]
    out = [os.fspath(t) for t in traces]
    if not out:
        raise ValueError("no trace files given")
    return out


def _opt_path(p):
    return None if p is None else os.fspath(p)


def _token_types(options):
    t = options.get("token_types")
    if isinstance(t, str):
        options["token_types"] = [s for s in t.split(",")]
    return options


_TRACE_TYPES = {
    "records": {
        "prompt_id": "string", "category": "string", "layer": "uint32", "position": "uint32",
        "token_id": "uint32", "token_type": "string", "experts": "list<uint32>",
        "weights": "list<float32>", "probs": "list<float32>",
    },
    "events": {
        "prompt_id": "string", "category": "string", "layer": "uint32", "position": "uint32",
        "expert": "uint32", "token_type": "string", "token_id": "uint32", "weight": "float32",
    },
    "counts": {
        "prompt_id": "string", "category": "string", "token_type": "string",
        "num_layers": "uint64", "num_experts": "uint64", "tokens": "uint64",
        "counts": "list<uint64>", "weighted_counts": "list<float64>",
    },
}


def read_trace(path, as_="pandas"):
    """A trace file as a table, one row per line (per row of a Parquet trace file or dataset
    directory, read natively by the Rust reader; pyarrow is not needed): routing records (``experts``, ``weights``,
    ``probs`` as lists), flat events (one row per selected expert) or counts lines. The columns
    are the JSON fields of docs/trace-format.md. The form (``"records"``, ``"events"``,
    ``"counts"``) and the manifest.json beside the file (or None) are in ``df.attrs`` (pandas)
    or the schema metadata ``moe_xray.form`` / ``moe_xray.manifest`` (Arrow)."""
    _frames.check_as(as_)
    d = _nat().read_trace(os.fspath(path))
    manifest = json.loads(d["manifest"]) if d["manifest"] is not None else None
    meta = {"form": d["form"], "manifest": manifest}
    if as_ == "arrow":
        meta = {"form": d["form"], "manifest": d["manifest"] or "null"}
    return _frames.from_columns(d["columns"], as_, _TRACE_TYPES[d["form"]], meta)


def signatures(traces, prompts=None, as_="pandas", **options):
    """Per-prompt routing signatures ``s[l,e] = A[l,e] / sum_e A[l,e]`` as ``moe-xray analyze``
    computes them (same options: ``model``, ``num_layers``, ``num_experts``, ``top_k``,
    ``token_types``, ``weighted``): columns ``prompt_id``, ``category``, then ``l{layer}_e{expert}``
    (the columns of signatures.csv). Prompts with a layer without any selection are left out;
    they are listed in ``attrs["dropped"]`` (pandas) / schema metadata (Arrow)."""
    _frames.check_as(as_)
    options = _token_types(dict(options))
    d = _nat().signatures(_paths(traces), prompts=_opt_path(prompts), **_fs(options))
    names = d["columns"]
    width = len(names) - 2
    values = d["values"]
    n = len(d["prompt_ids"])
    dropped = [{"prompt_id": i, "reason": r} for i, r in d["dropped"]]
    if as_ == "pandas":
        pd = _frames.pandas()
        import numpy as np

        arr = np.asarray(values, dtype=np.float64).reshape(n, width)
        df = pd.DataFrame(arr, columns=names[2:])
        df.insert(0, "category", d["categories"])
        df.insert(0, "prompt_id", d["prompt_ids"])
        df.attrs["dropped"] = dropped
        return df
    cols = {"prompt_id": d["prompt_ids"], "category": d["categories"]}
    for j, name in enumerate(names[2:]):
        cols[name] = values[j::width] if width else []
    types = {"prompt_id": "string", "category": "string"}
    types.update({name: "float64" for name in names[2:]})
    return _frames.from_columns(cols, "arrow", types, {"dropped": dropped})


_PATH_OPTIONS = ("model", "folds")


def _fs(options):
    for k in _PATH_OPTIONS:
        if k in options:
            options[k] = _opt_path(options[k])
    return options


def analyze(traces, prompts=None, as_="pandas", **options):
    """The statistics of ``moe-xray analyze`` (options: the CLI flags, e.g. ``reps=1000``,
    ``seed=0``, ``folds=``, ``num_experts=``, ``weighted=True``, ``path="exact_pairs"`` or
    ``"gram_sums"``, ``no_tsne=True``). Returns :class:`Results`; nothing is written."""
    _frames.check_as(as_)
    options = _fs(_token_types(dict(options)))
    d = _nat().analyze(_paths(traces), prompts=_opt_path(prompts), **options)
    return Results(
        d["results_json"],
        d["signatures_csv"],
        d["similarity_csv"],
        d["prompt_categories"],
        Figures.from_list(d["figures"]),
        as_,
    )


def load_results(out, as_="pandas"):
    """The outputs of ``moe-xray analyze`` or ``moe-xray run`` in the folder ``out`` as
    :class:`Results` (figures from ``out/figures/`` when present)."""
    return Results.load(os.fspath(out), as_)


def health(traces, as_="pandas", **options):
    """Routing health as ``moe-xray health`` computes it (options: ``model``, ``num_layers``,
    ``num_experts``, ``layer``, ``cold_fraction``, ``top_pairs``, ``token_types``, ``mi``,
    ``mi_components``, ``mi_bins``, ``mi_knn``, ``perms``, ``seed``). ``traces``: trace files
    or run directories. Returns :class:`Health`."""
    _frames.check_as(as_)
    options = _fs(_token_types(dict(options)))
    return Health(_nat().health(_paths(traces), **options), as_)


def compare(run_a, run_b, as_="pandas", **options):
    """Compares the routing of two runs as ``moe-xray compare`` does (options: ``model``,
    ``num_layers``, ``num_experts``, ``reps``, ``seed``, ``fail_above``, ``token_types``).
    Returns :class:`Comparison` (``exceeded`` says whether ``fail_above`` was exceeded)."""
    _frames.check_as(as_)
    options = _fs(_token_types(dict(options)))
    return Comparison(_nat().compare(os.fspath(run_a), os.fspath(run_b), **options), as_)


def trace(model_dir, prompts, out, **options):
    """Records the routing of the checkpoint in ``model_dir`` on a prompt file into ``out``
    (``moe-xray trace``; options: ``mode``, ``compress``, ``record_probs``,
    ``max_new_tokens``, ``batch_size``, ``chat_template``, ``hf_generate_compat``, ...).
    Returns the summary ``trace --json`` prints, as a dict."""
    s = _nat().trace(os.fspath(model_dir), os.fspath(prompts), os.fspath(out), **options)
    return json.loads(s)


def run(model_dir, prompts, out, as_="pandas", **options):
    """The whole study of ``moe-xray run``: trace -> analysis -> routing health -> figures ->
    ``out/report.html``. ``prompts``: ``"paper80"`` (bundled) or a prompt file. Options:
    ``max_new_tokens``, ``chat_template``, ``batch_size``, ``reps``, ``seed``, ``dtype``,
    ``truncate_prompts``. Returns :class:`Study` (``.results`` reads the analysis back)."""
    prompts = prompts if prompts == "paper80" else os.fspath(prompts)
    args = ", ".join(
        [repr(os.fspath(model_dir)), repr(prompts), repr(os.fspath(out))]
        + [f"{k}={v!r}" for k, v in sorted(options.items())]
    )
    d = _nat().run(
        os.fspath(model_dir), os.fspath(out), prompts=prompts,
        command=f"moe_xray.run({args})", **options
    )
    return Study(out, d["report"], json.loads(d["trace"]), as_)
