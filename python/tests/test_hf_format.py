"""The torch-free parts of the transformers capture hook (moe_xray/hf.py): the record lines are
byte-identical to moe-xray's writer, the prompt-set hash and prompt reading agree with the CLI,
and the committed hook fixtures (fixtures/hf-capture, written by tools/hf_capture_fixture.py)
are consistent traces. These run without torch (CI)."""

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF_PY = os.path.join(ROOT, "python", "moe_xray", "hf.py")
CAPTURES = os.path.join(ROOT, "fixtures", "hf-capture")
MODELS = sorted(d for d in os.listdir(CAPTURES) if os.path.isdir(os.path.join(CAPTURES, d)))


def _load_hf():
    try:
        from moe_xray import hf  # the installed package

        return hf
    except ImportError:  # a checkout without the compiled extension
        spec = importlib.util.spec_from_file_location("moe_xray_hf_src", HF_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["moe_xray_hf_src"] = mod
        spec.loader.exec_module(mod)
        return mod


hf = _load_hf()


def _f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# (f32 bit pattern, the text serde_json 1.0.154 writes for it), produced by moe-xray's writer
# dependency (serde_json::to_string(&f32)); every notation boundary is represented.
SERDE_F32 = [
    (200494509, "9.371707e-32"),
    (2025487460, "3.0259067e+34"),
    (992044912, "0.0024628304"),
    (881839207, "2.6784548e-7"),
    (1023426549, "0.031310994"),
    (915262580, "0.000004225929"),
    (945425324, "0.00005198612"),
    (1, "1e-45"),
    (8388608, "1.1754944e-38"),
    (1065353216, "1.0"),
    (1266679808, "16777216.0"),
    (872415232, "1.1920929e-7"),
    (2139095039, "3.4028235e+38"),
    (1287568416, "100000000.0"),
    (1400239819, "1056407500000.0"),
    (1487707154, "1.5182905e+15"),
    (1164861558, "3814.0288"),
    (1024, "1.435e-42"),
]


@pytest.mark.parametrize("bits,text", SERDE_F32)
def test_format_f32_matches_serde_json(bits, text):
    assert hf.format_f32(_f32(bits)) == text
    # The pure-Python digit search agrees with the numpy fast path.
    a = _f32(bits)
    assert hf._shortest_f32_digits_py(a) == hf._shortest_f32_digits(a)


def test_format_f32_rounds_to_f32_and_refuses_non_finite():
    assert hf.format_f32(0.1) == "0.1"
    assert hf.format_f32(0.4076630473136902) == "0.40766305"
    assert hf.format_f32(0.0) == "0.0"
    assert hf.format_f32(-2.5) == "-2.5"
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(hf.CaptureError):
            hf.format_f32(bad)


def _reserialise(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    assert lines
    for n, line in enumerate(lines, 1):
        r = json.loads(line)
        got = hf.record_line(r["prompt_id"], r.get("category"), r["layer"], r["position"],
                             r.get("token_id"), r["token_type"], r["experts"], r.get("weights"),
                             r.get("probs"))
        assert got == line, f"{path}:{n}"
    return len(lines)


@pytest.mark.parametrize("rel", ["fixtures/stats/planted/trace.jsonl",
                                 "fixtures/stats/weighted_small/trace.jsonl"])
def test_record_line_is_byte_identical_to_moe_xray_writer(rel):
    # Traces written by moe-xray's EventsWriter (serde_json): every line reproduced exactly.
    assert _reserialise(os.path.join(ROOT, rel)) > 100


def test_prompt_set_hash_matches_the_cli():
    # docs/trace-format.md's example, and the hash `moe-xray trace` writes for fixtures/hf.
    assert hf.prompt_set_hash([{"id": "a", "category": "c", "text": "t"}]) == (
        "efb2eba3de3d772b7573209b6ceb362fd3b970910bfb6ef511edfcc6fd835c64")
    prompts = hf.read_prompts(os.path.join(ROOT, "fixtures", "hf", "prompts.jsonl"))
    assert [p.id for p in prompts][:2] == ["code-01", "code-02"]
    assert hf.prompt_set_hash(prompts) == (
        "a7ddf540d53c69bccc26c2b076c26b19a587cf1f13119659a39e246fef79f6e5")
    # Order and escaping: independent of prompt order; quotes, newlines and non-ASCII escaped
    # as serde_json does (compact, UTF-8 kept).
    ps = [("b", "x", 'say "hi"\n\u00e9\t\x01'), ("a", "y", "t")]
    assert hf.prompt_set_hash(ps) == hf.prompt_set_hash(list(reversed(ps)))
    import hashlib

    want = hashlib.sha256(('["a","y","t"]\n["b","x","say \\"hi\\"\\n\u00e9\\t\\u0001"]\n')
                          .encode("utf-8")).hexdigest()
    assert hf.prompt_set_hash(ps) == want


def test_read_prompts_jsonl_csv_and_errors(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('category,id,text\ncode,c1,"a, ""quoted""\nline"\nmath,m1,2+2\n', encoding="utf-8")
    got = hf.read_prompts(p)
    assert [(x.id, x.category, x.text) for x in got] == [
        ("c1", "code", 'a, "quoted"\nline'), ("m1", "math", "2+2")]
    cases = {
        "dup.jsonl": ('{"id":"a","category":"c","text":"t"}\n{"id":"a","category":"c","text":"u"}\n',
                      "duplicate prompt id `a`"),
        "missing.jsonl": ('{"id":"a","text":"t"}\n', "missing field `category`"),
        "bad.jsonl": ('{"id":"a","category":"c","text":"t"}\n{oops\n', "bad.jsonl:2: malformed"),
        "empty.jsonl": ("\n\n", "empty file"),
        "emptyid.jsonl": ('{"id":"","category":"c","text":"t"}\n', "empty prompt id"),
    }
    for name, (text, msg) in cases.items():
        f = tmp_path / name
        f.write_text(text, encoding="utf-8")
        with pytest.raises(hf.CaptureError) as e:
            hf.read_prompts(f)
        assert msg in str(e.value) and name in str(e.value), str(e.value)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


@pytest.mark.parametrize("model", MODELS)
def test_committed_hook_fixture_is_a_consistent_trace(model):
    d = os.path.join(CAPTURES, model)
    _reserialise(os.path.join(d, "trace.jsonl"))
    with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    recs = _jsonl(os.path.join(d, "trace.jsonl"))
    gens = {g["prompt_id"]: g for g in _jsonl(os.path.join(d, "generations.jsonl"))}
    moe = m["routing"]["moe_layers"]
    assert sorted(set(moe) | set(m["routing"]["dense_layers"])) == list(range(m["num_layers"]))
    assert m["capture_mode"] == "events" and m["generation"]["hf_generate_compat"] is True
    assert m["generation"]["last_generated_token_routed"] is False
    assert m["prompt_set_hash"] == hf.prompt_set_hash(
        hf.read_prompts(os.path.join(ROOT, "fixtures", "hf", "prompts.jsonl")))
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
        assert len(r["experts"]) == m["top_k"] == len(r["weights"])
        assert len(set(r["experts"])) == m["top_k"]
        assert all(0 <= e < m["num_experts"] for e in r["experts"])
        assert all(w >= 0 for w in r["weights"])
    assert list(by_prompt) == list(gens)  # prompt-file order
    for pid, rs in by_prompt.items():
        g = gens[pid]
        full = g["prompt_ids"] + g["generated_ids"]
        n = len(full) - 1  # the last generated token is never fed back
        # Records in (position, layer) order, one per routed position and MoE layer.
        assert [(r["position"], r["layer"]) for r in rs] == [(p, l) for p in range(n) for l in moe]
        for r in rs:
            assert r["token_id"] == full[r["position"]]
            want = "prompt" if r["position"] < len(g["prompt_ids"]) else "generation"
            assert r["token_type"] == want
            assert r["category"] == g["category"]
        if g["stopped_on_eos"]:
            assert g["generated_ids"][-1] in m["generation"]["eos_token_ids"]
    if m["routing"]["family"] == "olmoe":
        # Full-softmax probabilities before renormalisation: they sum to less than 1.
        assert all(sum(r["weights"]) < 1.0 for r in recs)
        assert m["routing"]["weights"] == hf.WEIGHTS_FULL_SOFTMAX


def test_hf_module_imports_without_torch():
    # The hook module is pure Python: it must import (and its helpers work) with torch absent,
    # and capture() must then fail with a clear error.
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        f"spec = importlib.util.spec_from_file_location('h', {HF_PY!r})\n"
        "h = importlib.util.module_from_spec(spec); sys.modules['h'] = h\n"
        "spec.loader.exec_module(h)\n"
        "assert h.format_f32(0.25) == '0.25'\n"
        "try:\n"
        "    h.capture(object(), out='unused')\n"
        "except h.CaptureError as e:\n"
        "    print('error:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "needs torch and transformers" in r.stdout
