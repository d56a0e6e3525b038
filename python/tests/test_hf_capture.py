"""The transformers capture hook `moe_xray.hf.capture` run on the committed tiny checkpoints of
every family (fixtures/hf). Needs torch and transformers (tools/requirements-hf.txt); skipped
without them (CI checks the committed hook output instead: test_hf_format.py and
crates/cli/tests/hf_capture.rs)."""

import gzip
import importlib.util
import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF_PY = os.path.join(ROOT, "python", "moe_xray", "hf.py")
FIX = os.path.join(ROOT, "fixtures", "hf")
PROMPTS = os.path.join(FIX, "prompts.jsonl")
MAX_NEW = 12


def _load_hf():
    try:
        from moe_xray import hf

        return hf
    except ImportError:
        spec = importlib.util.spec_from_file_location("moe_xray_hf_src", HF_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["moe_xray_hf_src"] = mod
        spec.loader.exec_module(mod)
        return mod


hf = _load_hf()

# Every f32 checkpoint of fixtures/hf (all eight families).
F32_MODELS = sorted(d for d in os.listdir(FIX)
                    if d.endswith("-f32") and os.path.isdir(os.path.join(FIX, d)))


def _jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


_LOADED = {}


def _model(name):
    if name not in _LOADED:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = os.path.join(FIX, name)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        _LOADED[name] = (tok, model)
    return _LOADED[name]


def _capture_b1(name, out, prompts=PROMPTS, n=None, **gen):
    tok, model = _model(name)
    with torch.no_grad(), hf.capture(model, out=out, prompts=prompts, tokenizer=tok) as cap:
        for p in cap.prompts[:n]:
            model.generate(**tok(p.text, return_tensors="pt"), max_new_tokens=MAX_NEW,
                           do_sample=False, **gen)
    return cap


def _key(r):
    return (r["prompt_id"], r["layer"], r["position"], r["token_type"])


def _same_routing(a, b, as_sets, tol):
    assert a["token_id"] == b["token_id"], (_key(a), a["token_id"], b["token_id"])
    if as_sets:
        assert sorted(a["experts"]) == sorted(b["experts"]), _key(a)
    else:
        assert a["experts"] == b["experts"], _key(a)
    wa, wb = dict(zip(a["experts"], a["weights"])), dict(zip(b["experts"], b["weights"]))
    return max(abs(wa[e] - wb[e]) for e in wa)


@pytest.mark.parametrize("name", F32_MODELS)
def test_every_family_matches_the_transformers_reference(name, tmp_path):
    """Batch-1 generate() captured == the teacher-forced reference trace of tools/hf_reference*.py
    (which also routes the last generated token): same experts, weights within 1e-5, and the
    reference records the capture lacks are exactly each prompt's last generated token."""
    out = str(tmp_path / "cap")
    cap = _capture_b1(name, out, n=3)
    ids = [p.id for p in cap.prompts[:3]]
    assert cap.prompts_captured == ids
    got = _jsonl(os.path.join(out, "trace.jsonl"))
    ref = {_key(r): r for r in _jsonl(os.path.join(FIX, name, "expected_trace.jsonl"))
           if r["prompt_id"] in ids}
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    family = m["routing"]["family"]
    as_sets = family.startswith("deepseek")
    worst = max(_same_routing(r, ref[_key(r)], as_sets, 1e-5) for r in got)
    assert worst <= 1e-5, worst
    gens = {g["prompt_id"]: g for g in _jsonl(os.path.join(FIX, name, "expected_generations.jsonl"))}
    missing = set(ref) - {_key(r) for r in got}
    for pid, layer, pos, ttype in missing:
        g = gens[pid]
        assert ttype == "generation" and pos == len(g["prompt_ids"]) + len(g["generated_ids"]) - 1
    ref_layers = sorted({r["layer"] for r in ref.values()})
    assert m["routing"]["moe_layers"] == ref_layers
    assert len(missing) == len(ref_layers) * sum(1 for p in ids if gens[p]["generated_ids"])
    with open(os.path.join(FIX, name, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert family == cfg["model_type"]
    assert m["num_layers"] == cfg["num_hidden_layers"]
    assert m["top_k"] == cfg["num_experts_per_tok"]
    assert m["routing"]["router"] == hf._ROUTER_KIND[family]
    assert m["routing"]["scores"] == ("sigmoid" if family == "deepseek_v3" else "softmax")
    # What the weights are, per family (docs/trace-format.md).
    sums = [sum(r["weights"]) for r in got]
    if family == "olmoe":
        assert all(s < 1 for s in sums)
    elif family in ("gpt_oss", "granitemoe", "mixtral") or (
            family in ("qwen2_moe", "qwen3_moe") and cfg.get("norm_topk_prob")):
        assert all(abs(s - 1) < 1e-5 for s in sums)
    elif family == "deepseek_v3" and cfg.get("norm_topk_prob"):
        assert all(abs(s - cfg["routed_scaling_factor"]) < 1e-4 for s in sums)
    gl = _jsonl(os.path.join(out, "generations.jsonl"))
    for g in gl:
        assert g["generated_ids"] == gens[g["prompt_id"]]["generated_ids"]
        assert g["prompt_ids"] == gens[g["prompt_id"]]["prompt_ids"]


def test_matches_the_committed_fixture(tmp_path):
    name = "olmoe-tiny-mha-f32"
    out = str(tmp_path / "cap")
    _capture_b1(name, out)
    d = os.path.join(ROOT, "fixtures", "hf-capture", name)
    a, b = _jsonl(os.path.join(out, "trace.jsonl")), _jsonl(os.path.join(d, "trace.jsonl"))
    assert [_key(r) for r in a] == [_key(r) for r in b]
    assert max(_same_routing(x, y, False, 1e-5) for x, y in zip(a, b)) <= 1e-5
    assert _jsonl(os.path.join(out, "generations.jsonl")) == _jsonl(os.path.join(d, "generations.jsonl"))
    ma = json.load(open(os.path.join(out, "manifest.json"), encoding="utf-8"))
    mb = json.load(open(os.path.join(d, "manifest.json"), encoding="utf-8"))
    for k in ("num_layers", "num_experts", "top_k", "dtype", "generation", "prompt_set_hash",
              "capture_mode", "routing", "record_probs", "trace_file"):
        assert ma[k] == mb[k], k


def test_left_padded_batch_with_early_eos_equals_batch_one(tmp_path):
    """One generate() over all prompts, left-padded, with an EOS that one prompt produces early:
    padding positions are dropped, the rows that finished keep being fed padding by generate()
    but their records stop before the EOS, exactly as with one prompt at a time."""
    name = "olmoe-tiny-mha-f32"
    tok, model = _model(name)
    gens = _jsonl(os.path.join(FIX, name, "expected_generations.jsonl"))
    eos = gens[0]["generated_ids"][3]  # code-01 stops after 4 generated tokens
    b1 = str(tmp_path / "b1")
    _capture_b1(name, b1, eos_token_id=eos)
    pb = str(tmp_path / "padded")
    tok.padding_side = "left"
    with torch.no_grad(), hf.capture(model, out=pb, prompts=PROMPTS, tokenizer=tok) as cap:
        enc = tok([p.text for p in cap.prompts], return_tensors="pt", padding=True)
        assert int((enc["attention_mask"] == 0).sum()) > 0  # really padded
        model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                       pad_token_id=model.generation_config.pad_token_id)
    a = {_key(r): r for r in _jsonl(os.path.join(b1, "trace.jsonl"))}
    b = {_key(r): r for r in _jsonl(os.path.join(pb, "trace.jsonl"))}
    assert set(a) == set(b)
    assert max(_same_routing(a[k], b[k], False, 1e-4) for k in a) <= 1e-4
    ga = _jsonl(os.path.join(b1, "generations.jsonl"))
    gb = _jsonl(os.path.join(pb, "generations.jsonl"))
    assert [(g["prompt_id"], g["generated_ids"], g["stopped_on_eos"]) for g in ga] == [
        (g["prompt_id"], g["generated_ids"], g["stopped_on_eos"]) for g in gb]
    first = ga[0]
    assert first["stopped_on_eos"] and first["generated_ids"][-1] == eos
    last_pos = max(r["position"] for r in a.values() if r["prompt_id"] == "code-01")
    assert last_pos == len(first["prompt_ids"]) + len(first["generated_ids"]) - 2
    m = json.load(open(os.path.join(pb, "manifest.json"), encoding="utf-8"))
    assert m["generation"]["eos_token_ids"] == [eos]


def test_forward_passes_teacher_forced_and_probs(tmp_path):
    """Plain forward passes (no generate()): every token is a prompt token, the last one routed
    too; record_probs writes the full softmax, of which OLMoE's weights are the chosen entries."""
    name = "olmoe-tiny-mha-f32"
    tok, model = _model(name)
    gens = _jsonl(os.path.join(FIX, name, "expected_generations.jsonl"))[:2]
    ref = {(r["prompt_id"], r["layer"], r["position"]): r
           for r in _jsonl(os.path.join(FIX, name, "expected_trace.jsonl"))}
    out = str(tmp_path / "fw")
    with torch.no_grad(), hf.capture(model, out=out, prompts=PROMPTS, record_probs=True) as cap:
        for g in gens:
            model(input_ids=torch.tensor([g["prompt_ids"] + g["generated_ids"]]))
    assert cap.prompts_captured == ["code-01", "code-02"]
    recs = _jsonl(os.path.join(out, "trace.jsonl"))
    assert len(recs) == 2 * sum(len(g["prompt_ids"]) + len(g["generated_ids"]) for g in gens)
    for r in recs:
        assert r["token_type"] == "prompt"
        e = ref[(r["prompt_id"], r["layer"], r["position"])]
        assert r["experts"] == e["experts"] and r["token_id"] == e["token_id"]
        assert len(r["probs"]) == 8 and abs(sum(r["probs"]) - 1) < 1e-5
        assert max(abs(a - b) for a, b in zip(r["probs"], e["probs"])) < 1e-5
        assert [r["probs"][x] for x in r["experts"]] == r["weights"]
    assert not os.path.exists(os.path.join(out, "generations.jsonl"))  # no generate() call


def test_gzip_output_equals_plain(tmp_path):
    name = "qwen2moe-tiny-f32"
    plain, gz = str(tmp_path / "plain"), str(tmp_path / "gz")
    _capture_b1(name, plain, n=2)
    tok, model = _model(name)
    with torch.no_grad(), hf.capture(model, out=gz, prompts=PROMPTS, compress="gz") as cap:
        for p in cap.prompts[:2]:
            model.generate(**tok(p.text, return_tensors="pt"), max_new_tokens=MAX_NEW,
                           do_sample=False)
    with gzip.open(os.path.join(gz, "trace.jsonl.gz"), "rb") as f:
        zipped = f.read()
    with open(os.path.join(plain, "trace.jsonl"), "rb") as f:
        assert zipped == f.read()
    m = json.load(open(os.path.join(gz, "manifest.json"), encoding="utf-8"))
    assert m["trace_file"] == "trace.jsonl.gz"
    assert m["routing"]["dense_layers"] == [1] and m["routing"]["num_shared_experts"] == 1


def test_refusals_and_cleanup(tmp_path):
    name = "olmoe-tiny-mha-f32"
    tok, model = _model(name)
    enc = tok("hello there", return_tensors="pt")
    # Beam search reorders the sequences: refused before anything runs.
    with pytest.raises(hf.CaptureError, match="num_beams"):
        with torch.no_grad(), hf.capture(model, out=str(tmp_path / "beam"), prompts=PROMPTS):
            model.generate(**enc, max_new_tokens=2, num_beams=2, do_sample=False)
    assert "generate" not in vars(model)  # the wrapper is removed again
    assert os.listdir(tmp_path / "beam") == []  # nothing left behind
    assert not model._forward_pre_hooks and not model._forward_hooks
    # More sequences than prompts.
    with pytest.raises(hf.CaptureError, match="more sequences than prompts"):
        with torch.no_grad(), hf.capture(model, out=str(tmp_path / "few"),
                                         prompts=[("a", "c", "t")]):
            model.generate(input_ids=torch.tensor([[5, 6], [7, 8]]), max_new_tokens=2,
                           do_sample=False)
    # An existing trace is never overwritten.
    out = str(tmp_path / "twice")
    _capture_b1(name, out, n=1)
    with pytest.raises(hf.CaptureError, match="already exists"):
        with hf.capture(model, out=out, prompts=PROMPTS):
            pass
    # No forward pass: nothing to record.
    with pytest.raises(hf.CaptureError, match="no forward pass"):
        with hf.capture(model, out=str(tmp_path / "idle")):
            pass
    # A model without routers.
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    with pytest.raises(hf.CaptureError, match="no router found"):
        with torch.no_grad(), hf.capture(dense, out=str(tmp_path / "dense")):
            dense(input_ids=torch.tensor([[1, 2, 3]]))
    assert not any(m._forward_hooks for m in model.modules())


def test_prompts_optional(tmp_path):
    name = "granitemoe-tiny-f32"
    tok, model = _model(name)
    out = str(tmp_path / "anon")
    with torch.no_grad(), hf.capture(model, out=out) as cap:
        model.generate(**tok("one two", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    recs = _jsonl(os.path.join(out, "trace.jsonl"))
    assert {r["prompt_id"] for r in recs} == {"prompt-00000"}
    assert all("category" not in r for r in recs)
    m = json.load(open(os.path.join(out, "manifest.json"), encoding="utf-8"))
    assert "prompt_set_hash" not in m and m["routing"]["router"] == "topk_softmax"
    assert cap.prompts_captured == ["prompt-00000"]
