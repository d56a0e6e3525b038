"""The Python package against the CLI on the committed fixtures: the same bytes (results.json,
health / compare JSON, CSV tables, SVG figures) and the same values (traces, signatures)."""

import gzip
import json
import math
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import moe_xray as mx

from moe_xray._frames import round_trip

RT = round_trip(pd)
STATS_CASES = ["null", "paper_shape", "planted", "weighted_small"]
# Small repetition counts keep the suite fast; the same flags go to the CLI.
FAST = dict(reps=30, classifier_perm_reps=5)
FAST_FLAGS = ["--reps", "30", "--classifier-perm-reps", "5"]


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def f32(xs):
    return [float(np.float32(x)) for x in xs]


# ---------------------------------------------------------------- read_trace


@pytest.mark.parametrize("case", ["planted", "weighted_small"])
def test_read_trace_records_pandas_equals_the_file(fixtures, case):
    path = fixtures / "stats" / case / "trace.jsonl"
    lines = jsonl(path)
    df = mx.read_trace(path)
    assert df.attrs["form"] == "records"
    assert df.attrs["manifest"] == json.loads((path.parent / "manifest.json").read_text())
    assert len(df) == len(lines)
    assert list(df.columns) == [
        "prompt_id", "category", "layer", "position", "token_id", "token_type",
        "experts", "weights", "probs",
    ]
    assert str(df["layer"].dtype) == "uint32"
    for i in (0, len(lines) // 2, len(lines) - 1):
        row, line = df.iloc[i], lines[i]
        assert row["prompt_id"] == line["prompt_id"]
        assert row["category"] == line["category"]
        assert row["layer"] == line["layer"] and row["position"] == line["position"]
        assert row["token_type"] == line["token_type"]
        assert list(row["experts"]) == line["experts"]
        # weights are f32 in the trace format: the values are the file's, rounded to f32
        assert list(row["weights"]) == f32(line["weights"])
    assert df["experts"].map(len).sum() == sum(len(line["experts"]) for line in lines)


def test_read_trace_arrow_types_and_values(fixtures):
    path = fixtures / "health" / "run_a" / "trace.jsonl"
    lines = jsonl(path)
    t = mx.read_trace(path, as_="arrow")
    assert isinstance(t, pa.Table)
    assert t.num_rows == len(lines)
    assert t.schema.field("experts").type == pa.list_(pa.uint32())
    assert t.schema.field("probs").type == pa.list_(pa.float32())
    assert t.schema.metadata[b"moe_xray.form"] == b"records"
    assert json.loads(t.schema.metadata[b"moe_xray.manifest"])["num_experts"] == 8
    probs = t.column("probs").to_pylist()
    assert probs[7] == f32(lines[7]["probs"])
    assert t.column("token_id").to_pylist() == [line.get("token_id") for line in lines]


def test_read_trace_counts(fixtures):
    path = fixtures / "health" / "run_a_counts" / "trace.jsonl"
    lines = jsonl(path)
    df = mx.read_trace(path)
    assert df.attrs["form"] == "counts"
    assert df.attrs["manifest"] is None
    assert [list(c) for c in df["counts"]] == [line["counts"] for line in lines]
    assert list(df["tokens"]) == [line["tokens"] for line in lines]
    t = mx.read_trace(path, as_="arrow")
    assert t.column("counts").to_pylist() == [line["counts"] for line in lines]


def events_of(records):
    out = []
    for r in records:
        for j, e in enumerate(r["experts"]):
            ev = {k: r[k] for k in ("prompt_id", "category", "layer", "position", "token_type")}
            ev["token_id"] = r["token_id"]
            ev["expert"] = e
            ev["weight"] = r["weights"][j]
            out.append(ev)
    return out


def test_read_trace_events_and_compressed(fixtures, tmp_path):
    records = jsonl(fixtures / "stats" / "planted" / "trace.jsonl")
    events = events_of(records)
    text = "".join(json.dumps(e) + "\n" for e in events)
    plain = tmp_path / "events.jsonl"
    plain.write_text(text)
    df = mx.read_trace(plain)
    assert df.attrs["form"] == "events"
    assert len(df) == len(events)
    assert list(df["expert"]) == [e["expert"] for e in events]
    assert list(df["weight"]) == f32([e["weight"] for e in events])
    gz = tmp_path / "events.jsonl.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    pd.testing.assert_frame_equal(mx.read_trace(gz), df)
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "events.jsonl.zst")], check=True)
        pd.testing.assert_frame_equal(mx.read_trace(tmp_path / "events.jsonl.zst"), df)


# ---------------------------------------------------------------- analyze / signatures


@pytest.mark.parametrize("case", STATS_CASES)
def test_analyze_results_json_is_the_cli_bytes(fixtures, tmp_path, cli, case):
    d = fixtures / "stats" / case
    trace, folds = d / "trace.jsonl", d / "folds.csv"
    out = tmp_path / "cli"
    # t-SNE of the largest case is slow in CI's opt-level-0 build; the other cases check it
    no_tsne = case == "paper_shape"
    cli("analyze", trace, "--folds", folds, *FAST_FLAGS, "--out", out, "--quiet",
        *(["--no-tsne"] if no_tsne else []))
    r = mx.analyze(trace, folds=folds, no_tsne=no_tsne, **FAST)
    assert r.to_json() == (out / "results.json").read_text()
    assert r.to_json().encode() == (out / "results.json").read_bytes()
    # the DataFrames hold the CLI's tables value for value
    sig_cli = pd.read_csv(out / "signatures.csv", **RT)
    pd.testing.assert_frame_equal(r.signatures, sig_cli, check_exact=True)
    sim_cli = pd.read_csv(out / "prompt_similarity.csv", **RT, index_col=0)
    pd.testing.assert_frame_equal(r.prompt_similarity, sim_cli, check_exact=True)
    data = json.loads((out / "results.json").read_text())
    assert list(r.per_layer["cohens_d"]) == [x["cohens_d"] for x in data["per_layer"]]
    assert r.prompt_ids == data["prompt_ids"]
    prompts = r.prompts
    assert list(prompts["prompt_id"]) == data["prompt_ids"]
    assert list(prompts["category"]) == list(sig_cli["category"])
    assert [[a, b] for a, b in zip(prompts["pca_1"], prompts["pca_2"])] == data["pca"]["coords"]
    assert list(r.category_similarity.index) == data["category_similarity_matrix"]["order"]
    assert r.category_similarity.values.tolist() == data["category_similarity_matrix"]["values"]
    # signatures() alone: the same table as signatures.csv
    s = mx.signatures(trace)
    pd.testing.assert_frame_equal(s, sig_cli, check_exact=True)
    assert mx.signatures(trace, as_="arrow").to_pandas().equals(sig_cli)


def test_analyze_options_weighted_prompt_only_and_gram_path(fixtures, tmp_path, cli):
    d = fixtures / "stats" / "weighted_small"
    trace = d / "trace.jsonl"
    out = tmp_path / "w"
    cli("analyze", trace, "--weighted", "--token-types", "prompt", "--seed", "7",
        *FAST_FLAGS, "--out", out, "--quiet")
    r = mx.analyze([trace], weighted=True, token_types="prompt", seed=7, **FAST)
    assert r.to_json().encode() == (out / "results.json").read_bytes()
    sig = mx.signatures(trace, weighted=True, token_types=["prompt"])
    pd.testing.assert_frame_equal(
        sig, pd.read_csv(out / "signatures.csv", **RT), check_exact=True
    )
    g = tmp_path / "g"
    cli("analyze", trace, "--gram", *FAST_FLAGS, "--out", g, "--quiet")
    rg = mx.analyze(trace, path="gram_sums", **FAST)
    assert rg.to_json().encode() == (g / "results.json").read_bytes()
    assert rg.path == "gram_sums"
    assert rg.signatures is None and rg.prompt_similarity is None
    assert "pca" in rg.skipped


def test_analyze_prompts_file_and_arrow_sections(fixtures, tmp_path, cli):
    records = jsonl(fixtures / "stats" / "planted" / "trace.jsonl")
    for r in records:
        del r["category"]
    # a trace without categories and a prompt file that gives them
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = list(dict.fromkeys(r["prompt_id"] for r in records))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"id": i, "category": "cat-" + i.split("-")[0], "text": "x"}) + "\n" for i in ids
    ))
    out = tmp_path / "out"
    cli("analyze", trace, "--prompts", prompts, *FAST_FLAGS, "--no-tsne", "--top-k", "4",
        "--num-layers", "4", "--num-experts", "16", "--out", out, "--quiet")
    r = mx.analyze(trace, prompts=prompts, no_tsne=True, top_k=4, num_layers=4,
                   num_experts=16, as_="arrow", **FAST)
    assert r.to_json().encode() == (out / "results.json").read_bytes()
    assert r.tsne is None and r.skipped["tsne"]
    assert isinstance(r.per_layer, pa.Table)
    assert set(r.signatures.column("category").to_pylist()) == {"cat-code", "cat-factual", "cat-math", "cat-story"}
    assert "tsne_1" not in r.prompts.column_names


def test_results_load_and_figures(fixtures, tmp_path, cli):
    trace = fixtures / "stats" / "planted" / "trace.jsonl"
    r = mx.analyze(trace, **FAST)
    assert set(r.figures) >= {"fig1-category-similarity", "fig4-pca", "fig7-expert-usage"}
    for f in r.figures.values():
        assert f.svg.startswith("<svg") and f.svg.rstrip().endswith("</svg>")
        assert f._repr_svg_() == f.svg
        assert f.svg in f._repr_html_()
    assert "fig4-pca" in r.figures._repr_html_()
    assert "Cohen" in r._repr_html_()
    out = tmp_path / "cli"
    cli("analyze", trace, *FAST_FLAGS, "--out", out, "--quiet")
    loaded = mx.load_results(out)
    assert loaded.to_json() == r.to_json()
    pd.testing.assert_frame_equal(loaded.signatures, r.signatures, check_exact=True)
    pd.testing.assert_frame_equal(loaded.prompts, r.prompts, check_exact=True)


# ---------------------------------------------------------------- health / compare


def test_health_is_the_cli(fixtures, tmp_path, cli):
    run_a = fixtures / "health" / "run_a"
    csv_dir, svg_dir = tmp_path / "csv", tmp_path / "svg"
    stdout = cli("health", run_a, "--json", "--mi", "--perms", "50", "--layer", "2",
                 "--csv", csv_dir, "--svg", svg_dir)
    h = mx.health(run_a, mi=True, perms=50, layer=2)
    assert h.to_json() == stdout
    for name in ("layers", "load", "coactivation", "pairs"):
        assert h.csv(name) == (csv_dir / f"{name}.csv").read_text(), name
    pd.testing.assert_frame_equal(
        h.layers, pd.read_csv(csv_dir / "layers.csv", **RT), check_exact=True
    )
    assert set(h.figures) == {"load_heatmap", "coactivation_layer2"}
    for k, f in h.figures.items():
        assert f.svg == (svg_dir / f"{k}.svg").read_text()
    assert h.mutual_information is not None
    assert h["num_experts"] == 8


def test_health_counts_and_expected_values(fixtures, cli):
    path = fixtures / "health" / "run_a_counts" / "trace.jsonl"
    stdout = cli("health", path, "--json")
    h = mx.health(path)
    assert h.to_json() == stdout
    assert h.coactivation is None
    assert "coactivation_layer0" not in h.figures


def test_compare_is_the_cli(fixtures, tmp_path, cli):
    a, b = fixtures / "health" / "run_a", fixtures / "health" / "run_b"
    csv, svg = tmp_path / "shifts.csv", tmp_path / "js.svg"
    stdout = cli("compare", a, b, "--json", "--reps", "50", "--seed", "3", "--csv", csv, "--svg", svg)
    c = mx.compare(a, b, reps=50, seed=3)
    assert c.to_json() == stdout
    assert c.figures["js_bars"].svg == svg.read_text()
    pd.testing.assert_frame_equal(
        c.shifts, pd.read_csv(csv, **RT), check_exact=True
    )
    assert c.exceeded is None
    assert mx.compare(a, b, reps=0, fail_above=0.0).exceeded is True


# ---------------------------------------------------------------- run


def test_run_writes_the_report(fixtures, tmp_path):
    model = fixtures / "hf" / "olmoe-tiny-mha-f32"
    out = tmp_path / "study"
    s = mx.run(model, fixtures / "hf" / "prompts.jsonl", out, max_new_tokens=4, reps=20)
    report = out / "report.html"
    assert s.report == report
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") or html.startswith("<!doctype html>")
    assert "moe_xray.run(" in html
    assert s.trace["prompts"] == 8 and s.trace["routing_records"] > 0
    r = s.results
    assert r.num_prompts + len(r.data["dropped_prompts"]) == 8
    assert (out / "results.json").read_text() == r.to_json()
    assert "fig4-pca" in r.figures
    # the study's trace reads back; its analysis is the same as analysing the trace again
    trace = out / "traces" / "trace.jsonl.gz"
    df = mx.read_trace(trace)
    assert df["prompt_id"].nunique() == 8
    assert len(df) == s.trace["routing_records"]


# ---------------------------------------------------------------- bad input


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for call in (
        lambda: mx.read_trace(missing),
        lambda: mx.analyze(missing),
        lambda: mx.signatures(missing),
        lambda: mx.health(missing),
    ):
        with pytest.raises(mx.MoeXrayError, match="nope.jsonl"):
            call()


def test_malformed_trace_names_file_and_line(tmp_path, fixtures):
    lines = (fixtures / "stats" / "planted" / "trace.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"prompt_id": "x", "layer": "zero"'] + lines[3:10]) + "\n")
    with pytest.raises(mx.MoeXrayError, match=r"bad\.jsonl.*4|4.*bad\.jsonl"):
        mx.read_trace(bad)
    with pytest.raises(mx.MoeXrayError, match=r"bad\.jsonl"):
        mx.analyze(bad, **FAST)
    assert issubclass(mx.MoeXrayError, ValueError)


def test_mixed_forms_and_hostile_sizes(tmp_path, fixtures):
    rec = (fixtures / "stats" / "planted" / "trace.jsonl").read_text().splitlines()[0]
    cnt = (fixtures / "health" / "run_a_counts" / "trace.jsonl").read_text().splitlines()[0]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(rec + "\n" + cnt + "\n")
    with pytest.raises(mx.MoeXrayError, match="mixed.jsonl"):
        mx.read_trace(mixed)
    huge = tmp_path / "huge.jsonl"
    line = json.loads(cnt)
    line["num_layers"], line["num_experts"] = 10**12, 10**12
    huge.write_text(json.dumps(line) + "\n")
    with pytest.raises(mx.MoeXrayError, match="huge.jsonl"):
        mx.signatures(huge)


def test_bad_options_and_prompt_file(tmp_path, fixtures):
    trace = fixtures / "stats" / "planted" / "trace.jsonl"
    with pytest.raises(mx.MoeXrayError, match="path"):
        mx.analyze(trace, path="sideways")
    with pytest.raises(mx.MoeXrayError, match="token_types"):
        mx.analyze(trace, token_types=["prompt", "answer"])
    with pytest.raises(TypeError):
        mx.analyze(trace, no_such_option=1)
    with pytest.raises(ValueError, match="as_"):
        mx.read_trace(trace, as_="polars")
    with pytest.raises(mx.MoeXrayError, match="fail_above"):
        mx.compare(trace, trace, fail_above=2.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "category": "x"}\n')
    with pytest.raises(mx.MoeXrayError, match="prompts.jsonl"):
        mx.analyze(trace, prompts=prompts, **FAST)
    with pytest.raises(mx.MoeXrayError, match="layer"):
        mx.health(fixtures / "health" / "run_a", layer=99)


def test_run_refuses_a_missing_model_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(mx.MoeXrayError, match="no-model"):
        mx.run(tmp_path / "no-model", "paper80", out)
    assert not out.exists()


def test_inferred_dimensions_warn(tmp_path, fixtures):
    src = fixtures / "stats" / "planted" / "trace.jsonl"
    trace = tmp_path / "trace.jsonl"  # no manifest.json beside it
    trace.write_text(src.read_text())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = mx.analyze(trace, top_k=4, **FAST)
    assert any(issubclass(x.category, mx.MoeXrayWarning) and "INFERRED" in str(x.message) for x in w)
    assert r.num_experts == 16
    assert not math.isnan(r.similarity["cohens_d"])
