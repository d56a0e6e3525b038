"""The Parquet tables of `moe-xray analyze --format parquet` and `health --parquet` (docs/tables.md),
read with pandas + pyarrow: one line per table, values equal to results.json / the health JSON."""

import csv
import json
import math

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def analysis(cli, fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    trace = fixtures / "stats" / "planted" / "trace.jsonl"
    cli("analyze", trace, "--out", out, "--reps", "30", "--classifier-perm-reps", "5",
        "--quiet", "--format", "csv,parquet")
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f)


def same(a, b):
    """Equal floats, null/None/NaN equal to each other."""
    none = lambda x: x is None or (isinstance(x, float) and math.isnan(x))
    if none(a) or none(b):
        return none(a) and none(b)
    return a == b


def leaves(value, key="", idx=()):
    """(key, i, j, leaf) of a results.json section, as docs/tables.md defines the long rows."""
    if isinstance(value, dict):
        for k in sorted(value):
            yield from leaves(value[k], f"{key}.{k}" if key else k, idx)
    elif isinstance(value, list):
        for n, v in enumerate(value):
            if len(idx) < 2:
                yield from leaves(v, key, idx + (n,))
            else:
                yield from leaves(v, f"{key}[{n}]", idx)
    else:
        yield key, (idx + (None, None))[0], (idx + (None, None))[1], value


def test_every_section_loads_in_one_line_and_equals_results_json(analysis):
    out, r = analysis
    everything = pd.read_parquet(out / "long")
    assert set(everything["section"]) == {k for k, v in r.items() if list(leaves(v))}
    for section, value in r.items():
        df = pd.read_parquet(out / "long" / f"{section}.parquet")
        want = list(leaves(value))
        assert len(df) == len(want), section
        for row, (key, i, j, leaf) in zip(df.itertuples(index=False), want):
            assert row.section == section and row.key == key, (section, key)
            assert (None if pd.isna(row.i) else int(row.i)) == i
            assert (None if pd.isna(row.j) else int(row.j)) == j
            if isinstance(leaf, bool):
                assert row.text == str(leaf).lower()
            elif isinstance(leaf, (int, float)):
                assert row.value == float(leaf), (section, key, i, j)
            elif isinstance(leaf, str):
                assert row.text == leaf
            else:
                assert pd.isna(row.value) and row.text is None
    # labelled 2-D section: pivots straight into the category matrix
    m = pd.read_parquet(out / "long" / "category_similarity_matrix.parquet")
    m = m[m.key == "values"].pivot(index="label_i", columns="label_j", values="value")
    order = r["category_similarity_matrix"]["order"]
    for a, ca in enumerate(order):
        for b, cb in enumerate(order):
            assert same(m.loc[ca, cb], r["category_similarity_matrix"]["values"][a][b])


def test_per_prompt_and_per_layer_tables(analysis):
    out, r = analysis
    p = pd.read_parquet(out / "prompts.parquet")
    assert list(p["prompt_id"]) == r["prompt_ids"]
    assert [list(c) for c in zip(p["pca_1"], p["pca_2"])] == r["pca"]["coords"]
    assert [list(c) for c in zip(p["tsne_1"], p["tsne_2"])] == r["tsne"]["coords"]
    lr = r["logreg_5fold"]
    assert list(p["predicted"]) == lr["oof_predictions"]
    probs = p[[f"prob_{c}" for c in lr["labels"]]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-9
    assert [lr["labels"][k] for k in probs.argmax(axis=1)] == lr["oof_predictions"]
    assert (p["correct"] == (p["predicted"] == p["category"])).all()
    layers = pd.read_parquet(out / "per_layer.parquet")
    assert layers.to_dict("records") == r["per_layer"]


def test_signatures_and_similarity_equal_the_csvs(analysis):
    out, r = analysis
    sig = pd.read_parquet(out / "signatures.parquet")
    with open(out / "signatures.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    wide = sig.pivot_table(index="prompt_id", columns=["layer", "expert"], values="frequency",
                           sort=False)
    assert list(wide.index) == [b[0] for b in body]
    for b in body:
        got = wide.loc[b[0]].to_numpy()
        assert list(got) == [float(x) for x in b[2:]]
    assert len(header) - 2 == wide.shape[1]
    sim = pd.read_parquet(out / "prompt_similarity.parquet")
    with open(out / "prompt_similarity.csv", encoding="utf-8") as f:
        srows = list(csv.reader(f))
    n = len(r["prompt_ids"])
    assert len(sim) == n * n
    assert list(sim["similarity"]) == [float(x) for row in srows[1:] for x in row[1:]]


def test_health_parquet_tables(cli, fixtures, tmp_path):
    trace = fixtures / "stats" / "planted" / "trace.jsonl"
    cli("health", trace, "--quiet", "--parquet", tmp_path / "pq", "--json-out", tmp_path / "h.json")
    with open(tmp_path / "h.json", encoding="utf-8") as f:
        h = json.load(f)
    layers = pd.read_parquet(tmp_path / "pq" / "layers.parquet")
    assert list(layers["layer"]) == [l["layer"] for l in h["layers"]]
    assert list(layers["gini"]) == [l["gini"] for l in h["layers"]]
    assert [list(x) for x in layers["dead_experts"]] == [l["dead_experts"] for l in h["layers"]]
    load = pd.read_parquet(tmp_path / "pq" / "load.parquet")
    assert list(load["share"]) == [s for l in h["layers"] for s in l["share"]]
    long = pd.read_parquet(tmp_path / "pq" / "long.parquet")
    g = long[(long.section == "overall") & (long.key == "mean_gini")]
    assert list(g["value"]) == [h["overall"]["mean_gini"]]


def test_results_long_equals_the_parquet_files(analysis):
    """`Results.long(section)` (the package, from results.json) has the rows of the CLI's
    long/<section>.parquet, labels included."""
    mx = pytest.importorskip("moe_xray")
    out, r = analysis
    res = mx.load_results(out)
    for section in r:
        got = res.long(section)
        want = pd.read_parquet(out / "long" / f"{section}.parquet")
        assert len(got) == len(want), section
        for a, b in zip(got.itertuples(index=False), want.itertuples(index=False)):
            for col in ("section", "key", "label_i", "label_j", "text"):
                x, y = getattr(a, col), getattr(b, col)
                assert (pd.isna(x) and pd.isna(y)) or x == y, (section, col, x, y)
            for col in ("i", "j", "value"):
                x, y = getattr(a, col), getattr(b, col)
                assert (pd.isna(x) and pd.isna(y)) or x == y, (section, col, x, y)
    assert len(res.long()) == len(pd.read_parquet(out / "long"))
    with pytest.raises(KeyError):
        res.long("no_such_section")
    arrow = mx.load_results(out, as_="arrow").long("pca")
    assert arrow.num_rows == len(pd.read_parquet(out / "long" / "pca.parquet"))
    assert str(arrow.schema.field("value").type) == "double"
