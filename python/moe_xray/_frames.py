"""Tables as pandas DataFrames or pyarrow Tables (both optional at import, one needed per call)."""

import io

FORMS = ("pandas", "arrow")


def check_as(as_):
    if as_ not in FORMS:
        raise ValueError(f"as_={as_!r}: use 'pandas' or 'arrow'")


def pandas():
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moe_xray: DataFrames need pandas (pip install pandas), or pass as_='arrow' with pyarrow"
        ) from e
    return pd


def pyarrow():
    try:
        import pyarrow as pa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moe_xray: Arrow tables need pyarrow (pip install pyarrow), or pass as_='pandas'"
        ) from e
    return pa


def from_csv(text, as_="pandas", index_col=None):
    """A CSV text written by moe-xray as a table; floats read back exactly (round trip)."""
    check_as(as_)
    if text is None:
        return None
    if as_ == "pandas":
        pd = pandas()
        return pd.read_csv(
            io.StringIO(text),
            index_col=index_col,
            keep_default_na=False,
            na_values=[""],
            **round_trip(pd),
        )
    pa = pyarrow()
    import pyarrow.csv as pacsv

    return pacsv.read_csv(pa.BufferReader(text.encode("utf-8")))


def round_trip(pd):
    """read_csv options that parse every float exactly (pandas 3 does by default and deprecates
    the option)."""
    major = int(pd.__version__.split(".")[0])
    return {} if major >= 3 else {"float_precision": "round_trip"}


def from_records(rows, as_="pandas", columns=None):
    """A list of dicts as a table."""
    check_as(as_)
    if as_ == "pandas":
        return pandas().DataFrame.from_records(rows, columns=columns)
    pa = pyarrow()
    if not rows and columns:
        return pa.table({c: [] for c in columns})
    return pa.Table.from_pylist(rows)


def from_columns(cols, as_="pandas", types=None, metadata=None):
    """A dict of equally long column lists as a table; `types` maps a column to its Arrow type
    (pyarrow) or pandas dtype, by name of the Arrow type."""
    check_as(as_)
    if as_ == "pandas":
        pd = pandas()
        df = pd.DataFrame(cols)
        for name, t in (types or {}).items():
            dtype = _PANDAS_DTYPES.get(t)
            if dtype is None or name not in df:
                continue
            has_null = df[name].isna().any()
            if has_null and dtype.startswith("uint"):
                dtype = "UInt" + dtype[4:]  # nullable integer
            df[name] = df[name].astype(dtype)
        if metadata:
            df.attrs.update(metadata)
        return df
    pa = pyarrow()
    arrays = {}
    for name, values in cols.items():
        t = (types or {}).get(name)
        arrays[name] = pa.array(values, type=_arrow_type(pa, t) if t else None)
    table = pa.table(arrays)
    if metadata:
        import json

        table = table.replace_schema_metadata(
            {f"moe_xray.{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
        )
    return table


_PANDAS_DTYPES = {
    "uint32": "uint32",
    "uint64": "uint64",
    "string": None,
}


def _arrow_type(pa, t):
    if t.startswith("list<") and t.endswith(">"):
        return pa.list_(_arrow_type(pa, t[5:-1]))
    return {
        "string": pa.string(),
        "uint32": pa.uint32(),
        "uint64": pa.uint64(),
        "float32": pa.float32(),
        "float64": pa.float64(),
    }[t]
