"""Parquet traces from Python: ``read_trace`` reads a Parquet file and a Hive-partitioned dataset
(``moe-xray convert``) as the same table as the JSONL trace, ``analyze`` gives the same
results.json, and DuckDB reads the dataset directly with per-layer expert counts equal to
moe-xray's signatures."""

import json

import duckdb
import numpy as np
import pandas as pd
import pytest

import moe_xray as mx

FAST = dict(reps=20, classifier_perm_reps=5)


@pytest.fixture(scope="module")
def planted_forms(tmp_path_factory, fixtures, cli):
    d = tmp_path_factory.mktemp("parquet")
    src = fixtures / "stats" / "planted" / "trace.jsonl"
    cli("convert", src, "--to", "parquet", "--out", d / "t.parquet", "--quiet")
    cli(
        "convert", src, "--to", "parquet-dataset", "--out", d / "ds",
        "--run", "planted", "--rows-per-part", "500", "--quiet",
    )
    return src, d / "t.parquet", d / "ds"


def test_read_trace_parquet_equals_jsonl(planted_forms):
    src, file, ds = planted_forms
    want = mx.read_trace(src)
    for p in (file, ds):
        got = mx.read_trace(p)
        assert got.attrs["form"] == "records"
        assert got.attrs["manifest"] == want.attrs["manifest"]
        pd.testing.assert_frame_equal(got, want)


def test_analyze_parquet_is_the_jsonl_bytes(planted_forms):
    src, file, ds = planted_forms
    want = json.loads(mx.analyze([src], **FAST).to_json())
    for p in (file, ds):
        got = json.loads(mx.analyze([p], **FAST).to_json())
        assert got["input"]["traces"] == [str(p)]
        got["input"]["traces"] = want["input"]["traces"]
        assert got == want


def test_duckdb_reads_the_dataset_and_counts_match(planted_forms):
    src, _, ds = planted_forms
    con = duckdb.connect()
    glob = str(ds / "**" / "*.parquet")
    # The partition columns come from the paths.
    runs = con.execute(
        f"SELECT DISTINCT run FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall()
    assert runs == [("planted",)]
    cats = con.execute(
        f"SELECT category, count(DISTINCT prompt_id) FROM read_parquet('{glob}', hive_partitioning = true) "
        "GROUP BY category ORDER BY category"
    ).fetchall()
    sig = mx.signatures([src])
    want_cats = sig.groupby("category")["prompt_id"].nunique().sort_index()
    assert cats == list(want_cats.items())
    # Per (prompt, layer, expert) selection counts, normalised per (prompt, layer): the
    # signatures moe-xray computes.
    rows = con.execute(
        f"""
        WITH sel AS (
            SELECT prompt_id, layer, unnest(experts) AS expert
            FROM read_parquet('{glob}', hive_partitioning = true)
        ), c AS (
            SELECT prompt_id, layer, expert, count(*) AS n FROM sel GROUP BY ALL
        )
        SELECT prompt_id, layer, expert,
               n / sum(n) OVER (PARTITION BY prompt_id, layer) AS s
        FROM c
        """
    ).fetchall()
    got = {(p, f"l{l}_e{e}"): s for p, l, e, s in rows}
    assert len(got) > 100
    values = sig.set_index("prompt_id").drop(columns=["category"])
    for (p, col), s in got.items():
        assert values.loc[p, col] == pytest.approx(s, rel=1e-12, abs=0)
    # Every non-zero signature entry was counted by DuckDB.
    nonzero = int(np.count_nonzero(values.to_numpy()))
    assert nonzero == len(got)
    # Per-layer totals (selections per layer) equal the trace's.
    per_layer = dict(
        con.execute(
            f"SELECT layer, sum(len(experts)) FROM read_parquet('{glob}') GROUP BY layer"
        ).fetchall()
    )
    df = mx.read_trace(src)
    want_layer = df.groupby("layer")["experts"].apply(lambda s: int(s.map(len).sum()))
    assert per_layer == {int(k): v for k, v in want_layer.items()}


def test_pandas_and_pyarrow_read_the_dataset(planted_forms):
    import pyarrow.dataset as pads

    src, _, ds = planted_forms
    want = mx.read_trace(src)
    df = pd.read_parquet(ds)
    assert len(df) == len(want)
    assert set(df["run"].astype(str)) == {"planted"}
    t = pads.dataset(ds, partitioning="hive").to_table()
    assert t.num_rows == len(want)
    got = t.to_pandas().sort_values(["prompt_index", "layer", "position"], kind="stable")
    per_cat = got.groupby("category")["prompt_id"].nunique().to_dict()
    assert per_cat == want.groupby("category")["prompt_id"].nunique().to_dict()
