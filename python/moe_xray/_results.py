"""Result objects: the CLI's outputs (JSON bytes, CSV tables, SVG figures) with DataFrame views."""

import html
import json
import os

from . import _frames


class Figure:
    """One SVG figure; shown inline in a notebook (`_repr_svg_` / `_repr_html_`)."""

    def __init__(self, id, svg, title="", caption="", available=True):
        self.id = id
        self.svg = svg
        self.title = title
        self.caption = caption
        self.available = available

    def _repr_svg_(self):
        return self.svg

    def _repr_html_(self):
        parts = ["<figure>"]
        if self.title:
            parts.append(f"<figcaption><b>{html.escape(self.title)}</b></figcaption>")
        parts.append(self.svg)
        if self.caption:
            parts.append(f"<figcaption>{html.escape(self.caption)}</figcaption>")
        parts.append("</figure>")
        return "\n".join(parts)

    def save(self, path):
        """Writes the SVG document to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.svg)

    def __repr__(self):
        return f"Figure({self.id!r}, title={self.title!r})"


class Figures(dict):
    """Figures by id (a dict); all of them shown inline in a notebook."""

    def _repr_html_(self):
        return "\n".join(f._repr_html_() for f in self.values())

    @classmethod
    def from_list(cls, items):
        return cls(
            (d["id"], Figure(d["id"], d["svg"], d["title"], d["caption"], d["available"]))
            for d in items
        )

    @classmethod
    def from_svgs(cls, svgs):
        return cls((k, Figure(k, v)) for k, v in svgs.items())


def _done(section):
    """A results.json section, or None when it was skipped (`{"skipped": reason}`)."""
    if isinstance(section, dict) and set(section) == {"skipped"}:
        return None
    return section


def _long_labels(section, key, doc):
    """What the first and second index of the array at `key` of `section` stand for (the
    `label_i` / `label_j` of docs/tables.md), read from the document `doc`."""
    sec = doc.get(section)

    def get(obj, *path):
        for p in path:
            obj = obj.get(p) if isinstance(obj, dict) else None
        return obj

    def strings(v):
        return list(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else None

    def field(arr, name):
        if not isinstance(arr, list):
            return None
        out = []
        for o in arr:
            v = o.get(name) if isinstance(o, dict) else None
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                return None
            out.append(v if isinstance(v, str) else json.dumps(v))
        return out

    prompts = strings(doc.get("prompt_ids"))
    pcs = lambda p, n: [f"{p}{c}" for c in range(1, n + 1)]
    square = lambda v: (v, v)
    table = {
        ("prompt_ids", ""): lambda: (prompts, None),
        ("categories", ""): lambda: (field(sec, "name"), None),
        ("dropped_prompts", ""): lambda: (field(sec, "prompt_id"), None),
        ("per_layer", ""): lambda: (field(sec, "layer"), None),
        ("layers", ""): lambda: (field(sec, "layer"), None),
        ("category_similarity_matrix", "values"): lambda: square(strings(get(sec, "order"))),
        ("pca", "coords"): lambda: (prompts, pcs("pc", 2)),
        ("pca", "explained_variance_ratio"): lambda: (pcs("pc", len(get(sec, key) or [])), None),
        ("tsne", "coords"): lambda: (prompts, pcs("tsne", 2)),
        ("logreg_5fold", "oof_predictions"): lambda: (prompts, None),
        ("logreg_5fold", "confusion"): lambda: square(strings(get(sec, "labels"))),
        ("lexical_baseline", "classifier.oof_predictions"): lambda: (prompts, None),
        ("lexical_baseline", "classifier.confusion"):
            lambda: square(strings(get(sec, "classifier", "labels"))),
        ("token_matched", "per_layer"): lambda: (field(get(sec, "per_layer"), "layer"), None),
        ("token_matched", "dropped_prompts"):
            lambda: (field(get(sec, "dropped_prompts"), "prompt_id"), None),
        ("token_matched", "category_similarity_matrix.values"):
            lambda: square(strings(get(sec, "category_similarity_matrix", "order"))),
    }
    f = table.get((section, key))
    return f() if f else (None, None)


def long_rows(section, value, doc):
    """The tidy rows of one top-level section of a JSON document (docs/tables.md, "long"): one
    dict per leaf with section, key, i, j, label_i, label_j, value, text — the rows of
    `moe-xray analyze --format parquet`'s `long/<section>.parquet`."""
    rows = []

    def label(idx, level):
        if len(idx) <= level:
            return None
        labels = idx[0][1][0] if level == 0 else (idx[0][1][1] or idx[1][1][0])
        pos = idx[level][0]
        return labels[pos] if labels is not None and pos < len(labels) else None

    def walk(key, idx, v):
        if isinstance(v, dict):
            for k in sorted(v):
                walk(f"{key}.{k}" if key else k, idx, v[k])
        elif isinstance(v, list):
            labels = _long_labels(section, key, doc) if len(idx) < 2 else (None, None)
            for n, c in enumerate(v):
                if len(idx) < 2:
                    walk(key, idx + [(n, labels)], c)
                else:
                    walk(f"{key}[{n}]", idx, c)
        else:
            num, text = None, None
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, (int, float)):
                num = float(v)
                if isinstance(v, int) and abs(v) > 2 ** 53:
                    text = str(v)
            elif isinstance(v, str):
                text = v
            rows.append({
                "section": section,
                "key": key,
                "i": idx[0][0] if idx else None,
                "j": idx[1][0] if len(idx) > 1 else None,
                "label_i": label(idx, 0),
                "label_j": label(idx, 1),
                "value": num,
                "text": text,
            })

    walk("", [], value)
    return rows


_LONG_COLUMNS = ["section", "key", "i", "j", "label_i", "label_j", "value", "text"]
_LONG_TYPES = {"i": "int64", "j": "int64", "value": "float64"}


class Results:
    """What `moe-xray analyze` computes. `to_json()` is results.json byte for byte; every section
    is a plain value (`similarity`, `significance`, ...) or a DataFrame (`per_layer`,
    `signatures`, `prompts`, ...); `figures` are the report's SVG figures. A section the analysis
    skipped is None (the reason is in `skipped`)."""

    def __init__(self, results_json, signatures_csv=None, similarity_csv=None,
                 prompt_categories=None, figures=None, as_="pandas"):
        _frames.check_as(as_)
        self._json = results_json
        self.data = json.loads(results_json)
        self._signatures_csv = signatures_csv
        self._similarity_csv = similarity_csv
        self.prompt_categories = list(prompt_categories or [])
        self.figures = figures if figures is not None else Figures()
        self.as_ = as_

    @classmethod
    def load(cls, out, as_="pandas"):
        """The outputs of `moe-xray analyze` / `moe-xray run` in the directory `out`."""

        def text(name):
            p = os.path.join(out, name)
            if not os.path.exists(p):
                return None
            with open(p, encoding="utf-8") as f:
                return f.read()

        results = text("results.json")
        if results is None:
            from . import MoeXrayError

            raise MoeXrayError(f"{os.path.join(out, 'results.json')}: no such file")
        figs = Figures()
        fig_dir = os.path.join(out, "figures")
        if os.path.isdir(fig_dir):
            for name in sorted(os.listdir(fig_dir)):
                if name.endswith(".svg"):
                    with open(os.path.join(fig_dir, name), encoding="utf-8") as f:
                        figs[name[:-4]] = Figure(name[:-4], f.read())
        r = cls(results, text("signatures.csv"), text("prompt_similarity.csv"), None, figs, as_)
        sig = r._signatures_csv
        if sig is not None:
            import csv
            import io

            rows = csv.reader(io.StringIO(sig))
            next(rows, None)
            r.prompt_categories = [row[1] for row in rows if len(row) > 1]
        return r

    def to_json(self):
        """results.json as `moe-xray analyze` writes it (the same bytes)."""
        return self._json

    def write_json(self, path):
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(self._json)

    def __getitem__(self, key):
        return self.data[key]

    def keys(self):
        return self.data.keys()

    # plain values
    @property
    def num_prompts(self):
        return self.data["num_prompts"]

    @property
    def num_layers(self):
        return self.data["num_layers"]

    @property
    def num_experts(self):
        return self.data["num_experts"]

    @property
    def top_k(self):
        return self.data["top_k"]

    @property
    def path(self):
        return self.data["path"]

    @property
    def prompt_ids(self):
        return list(self.data["prompt_ids"])

    @property
    def settings(self):
        return self.data["settings"]

    @property
    def manifest(self):
        return self.data["input"]["manifest"]

    @property
    def similarity(self):
        """`{within: {n, mean, std}, across: {...}, cohens_d}`."""
        return self.data["similarity"]

    @property
    def significance(self):
        return {k: _done(v) for k, v in self.data["significance"].items()}

    @property
    def pca(self):
        return _done(self.data["pca"])

    @property
    def tsne(self):
        return _done(self.data["tsne"])

    @property
    def logreg(self):
        return _done(self.data["logreg_5fold"])

    @property
    def skipped(self):
        """Sections that were not computed, with the reason."""
        out = {}
        for k in ("pca", "tsne", "logreg_5fold"):
            v = self.data.get(k)
            if isinstance(v, dict) and "skipped" in v and len(v) == 1:
                out[k] = v["skipped"]
        for group in ("baselines", "significance"):
            for k, v in self.data.get(group, {}).items():
                if isinstance(v, dict) and "skipped" in v and len(v) == 1:
                    out[f"{group}.{k}"] = v["skipped"]
        return out

    # tables
    @property
    def categories(self):
        return _frames.from_records(self.data["categories"], self.as_, ["name", "n"])

    @property
    def dropped_prompts(self):
        return _frames.from_records(self.data["dropped_prompts"], self.as_, ["prompt_id", "reason"])

    @property
    def per_layer(self):
        return _frames.from_records(self.data["per_layer"], self.as_)

    @property
    def baselines(self):
        rows = []
        for name, b in self.data["baselines"].items():
            row = {"baseline": name}
            row.update(b)
            rows.append(row)
        return _frames.from_records(rows, self.as_)

    @property
    def category_similarity(self):
        """Mean similarity between (and within) categories: a square table."""
        m = self.data["category_similarity_matrix"]
        if self.as_ == "pandas":
            pd = _frames.pandas()
            return pd.DataFrame(m["values"], index=pd.Index(m["order"], name="category"),
                                columns=m["order"])
        cols = {"category": m["order"]}
        for j, c in enumerate(m["order"]):
            cols[c] = [row[j] for row in m["values"]]
        return _frames.from_columns(cols, "arrow")

    @property
    def confusion(self):
        """Classifier confusion matrix (rows: true category, columns: predicted)."""
        lr = self.logreg
        if lr is None:
            return None
        if self.as_ == "pandas":
            pd = _frames.pandas()
            return pd.DataFrame(lr["confusion"], index=pd.Index(lr["labels"], name="true"),
                                columns=lr["labels"])
        cols = {"true": lr["labels"]}
        for j, c in enumerate(lr["labels"]):
            cols[c] = [row[j] for row in lr["confusion"]]
        return _frames.from_columns(cols, "arrow")

    @property
    def prompts(self):
        """One row per prompt analysed: id, category, PCA and t-SNE coordinates, the classifier's
        out-of-fold prediction (columns present when the section was computed)."""
        ids = self.prompt_ids
        cols = {"prompt_id": ids}
        if len(self.prompt_categories) == len(ids):
            cols["category"] = self.prompt_categories
        pca = self.pca
        if pca is not None and len(pca["coords"]) == len(ids):
            cols["pca_1"] = [c[0] for c in pca["coords"]]
            cols["pca_2"] = [c[1] for c in pca["coords"]]
        tsne = self.tsne
        if tsne is not None and len(tsne["coords"]) == len(ids):
            cols["tsne_1"] = [c[0] for c in tsne["coords"]]
            cols["tsne_2"] = [c[1] for c in tsne["coords"]]
        lr = self.logreg
        if lr is not None and len(lr.get("oof_predictions", [])) == len(ids):
            cols["oof_prediction"] = lr["oof_predictions"]
        return _frames.from_columns(cols, self.as_)

    def long(self, section=None):
        """A results.json section as a tidy table (section, key, i, j, label_i, label_j, value,
        text): the rows of `long/<section>.parquet` that `moe-xray analyze --format parquet`
        writes (docs/tables.md); every section in one table when `section` is None."""
        names = list(self.data) if section is None else [section]
        for n in names:
            if n not in self.data:
                raise KeyError(f"{n!r} is not a section of this results.json "
                               f"(sections: {', '.join(self.data)})")
        rows = [r for n in names for r in long_rows(n, self.data[n], self.data)]
        cols = {c: [r[c] for r in rows] for c in _LONG_COLUMNS}
        if self.as_ == "pandas":
            pd = _frames.pandas()
            df = pd.DataFrame(cols, columns=_LONG_COLUMNS)
            for c in ("i", "j"):
                df[c] = df[c].astype("Int64")
            df["value"] = df["value"].astype("float64")
            return df
        pa = _frames.pyarrow()
        return pa.table({
            c: pa.array(cols[c], type=getattr(pa, _LONG_TYPES.get(c, "string"))())
            for c in _LONG_COLUMNS
        })

    @property
    def signatures(self):
        """signatures.csv as a table (prompt_id, category, l{layer}_e{expert}...); None on the
        Gram-sums path, which keeps no per-prompt signatures."""
        return _frames.from_csv(self._signatures_csv, self.as_)

    @property
    def prompt_similarity(self):
        """prompt_similarity.csv: the N x N similarity matrix (None on the Gram-sums path)."""
        return _frames.from_csv(self._similarity_csv, self.as_,
                                index_col=0 if self.as_ == "pandas" else None)

    def _repr_html_(self):
        s = self.similarity
        rows = [
            ("prompts", f"{self.num_prompts} ({len(self.data['categories'])} categories)"),
            ("layers x experts (top-k)", f"{self.num_layers} x {self.num_experts} (top-{self.top_k})"),
            ("within-category similarity", f"{s['within']['mean']:.4f} ± {s['within']['std']:.4f}"),
            ("across-category similarity", f"{s['across']['mean']:.4f} ± {s['across']['std']:.4f}"),
            ("Cohen's d", f"{s['cohens_d']:.3f}"),
        ]
        lr = self.logreg
        if lr is not None:
            rows.append(("classifier accuracy", f"{100 * lr['accuracy_mean']:.1f}% (chance {100 * lr['chance']:.1f}%)"))
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    def __repr__(self):
        s = self.similarity
        return (f"Results({self.num_prompts} prompts, {self.num_layers}x{self.num_experts}, "
                f"within {s['within']['mean']:.4f}, across {s['across']['mean']:.4f}, "
                f"d={s['cohens_d']:.3f})")


class Health:
    """What `moe-xray health` computes: `to_json()` is what `health --json` prints; `layers`,
    `load`, `coactivation`, `pairs` are the tables of `health --csv`; `figures` those of
    `health --svg`."""

    def __init__(self, d, as_="pandas"):
        _frames.check_as(as_)
        self._json = d["json"]
        self.data = json.loads(self._json)
        self._csv = dict(d["csv"])
        self.figures = Figures.from_svgs(d["svg"])
        self.as_ = as_

    def to_json(self):
        return self._json

    def __getitem__(self, key):
        return self.data[key]

    def csv(self, name):
        """The CSV text `health --csv` writes as `<name>.csv` (None when not produced)."""
        return self._csv.get(name)

    @property
    def layers(self):
        return _frames.from_csv(self._csv.get("layers"), self.as_)

    @property
    def load(self):
        return _frames.from_csv(self._csv.get("load"), self.as_)

    @property
    def coactivation(self):
        return _frames.from_csv(self._csv.get("coactivation"), self.as_)

    @property
    def pairs(self):
        return _frames.from_csv(self._csv.get("pairs"), self.as_)

    @property
    def mutual_information(self):
        return self.data.get("mutual_information")

    def _repr_html_(self):
        return self.figures._repr_html_()


class Comparison:
    """What `moe-xray compare` computes: `to_json()` is what `compare --json` prints, `shifts`
    the per-prompt table of `compare --csv`, `figures["js_bars"]` the chart of `compare --svg`;
    `exceeded` is True when `fail_above` was given and exceeded."""

    def __init__(self, d, as_="pandas"):
        _frames.check_as(as_)
        self._json = d["json"]
        self.data = json.loads(self._json)
        self._shifts = d["shifts_csv"]
        self.figures = Figures({"js_bars": Figure("js_bars", d["svg"])})
        self.exceeded = d["exceeded"]
        self.as_ = as_

    def to_json(self):
        return self._json

    def __getitem__(self, key):
        return self.data[key]

    @property
    def shifts(self):
        return _frames.from_csv(self._shifts, self.as_)

    def _repr_html_(self):
        return self.figures._repr_html_()


class Study:
    """A finished `moe_xray.run`: the output folder, `report` (the path of report.html), `trace`
    (the trace step's summary as `trace --json` prints it) and `results` (the analysis, read back from the folder)."""

    def __init__(self, out, report, trace, as_="pandas"):
        self.out = os.fspath(out)
        self.report = report
        self.trace = trace
        self.as_ = as_

    @property
    def results(self):
        return Results.load(self.out, self.as_)

    def __repr__(self):
        return f"Study(out={self.out!r}, report={self.report!r})"
