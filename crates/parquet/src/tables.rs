//! The analysis and routing-health tables as Parquet (`analyze --format parquet`,
//! `health --parquet DIR`). Column names, types and units: `docs/tables.md`.
//!
//! Every function returns the files of a table set as [`TableFile`]s (a path relative to the
//! output directory and the complete Parquet bytes); the caller writes them with the rest of its
//! output set. The bytes depend only on the values: the writer properties are fixed
//! ([`writer_properties`]: `created_by` names moe-xray's version, no timestamps, Snappy, fixed
//! row-group size) and every table is built in one deterministic order on one thread, so the
//! same inputs give byte-identical files at any thread count.
//!
//! - `signatures.parquet`, `prompt_similarity.parquet`, `prompts.parquet` (exact path only),
//!   `per_layer.parquet`, and `long/<section>.parquet`: one tidy table per top-level key of
//!   `results.json` ([`long_rows`]), all with the same schema, so that
//!   `pd.read_parquet(dir / "long" / "per_layer.parquet")` loads one section and
//!   `pd.read_parquet(dir / "long")` loads every section into one frame with a `section` column.
//! - Health: `layers.parquet`, `load.parquet`, `coactivation.parquet` and `pairs.parquet` (per-token
//!   input only), and `long.parquet` (the whole health JSON, flattened the same way).

use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Float64Array, Int64Array, ListArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use moe_xray_health::{HealthAccumulator, HealthReport};
use moe_xray_stats::results::AnalysisResults;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use crate::error::{Error, Result};

/// Rows per record batch and per row group of the large tables (signatures, similarity).
pub const ROWS_PER_GROUP: usize = 65_536;

/// Every top-level key `results.json` can have (the properties of its JSON Schema, generated
/// from the types, so a section added to `results.rs` is here too): the sections of `long/`. A
/// section absent from a file (an optional one) has no `long/` file; the caller removes stale
/// files of an earlier run ([`ANALYSIS_FILES`], [`long_path`]).
pub fn sections() -> Vec<String> {
    let schema: Value = serde_json::from_str(&AnalysisResults::json_schema()).unwrap_or_default();
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The fixed-name Parquet files of `analyze --format parquet` (besides `long/`).
pub const ANALYSIS_FILES: &[&str] = &[
    "signatures.parquet",
    "prompt_similarity.parquet",
    "prompts.parquet",
    "per_layer.parquet",
];

/// The Parquet files of `health --parquet DIR`.
pub const HEALTH_FILES: &[&str] = &[
    "layers.parquet",
    "load.parquet",
    "coactivation.parquet",
    "pairs.parquet",
    "long.parquet",
];

/// The `long/` file of a section.
pub fn long_path(section: &str) -> String {
    format!("long/{section}.parquet")
}

/// One Parquet file of a table set.
#[derive(Debug, Clone, PartialEq)]
pub struct TableFile {
    /// Path relative to the output directory, `/`-separated.
    pub path: String,
    /// The complete file.
    pub bytes: Vec<u8>,
}

/// The writer properties of every table: Snappy, [`ROWS_PER_GROUP`] rows per row group,
/// `created_by` = `moe-xray <version>` (the same for every file a build writes).
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_created_by(format!("moe-xray {}", env!("CARGO_PKG_VERSION")))
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROWS_PER_GROUP))
        .build()
}

/// The values the exact path keeps beside `results.json` (`moe_xray_stats::analyze::ExactOutputs`).
#[derive(Debug, Clone, Copy)]
pub struct ExactTables<'a> {
    /// N × (L·E) signatures, row-major, layer-major within a row.
    pub signatures: &'a [f64],
    /// N × N similarity matrix, row-major.
    pub similarity: &'a [f64],
    /// Category of every prompt, in `prompt_ids` order.
    pub categories: &'a [String],
    /// Out-of-fold class probabilities, N × `logreg_5fold.labels`, when the classifier ran.
    pub oof_probabilities: Option<&'a [f64]>,
}

/// A table being written: its schema and the Parquet writer over an in-memory buffer.
struct Table {
    path: String,
    schema: SchemaRef,
    writer: ArrowWriter<Vec<u8>>,
}

impl Table {
    fn new(path: impl Into<String>, fields: Vec<Field>) -> Result<Table> {
        let path = path.into();
        let schema = Arc::new(Schema::new(fields));
        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(writer_properties()))
            .map_err(|e| invalid(&path, format!("cannot start the Parquet writer: {e}")))?;
        Ok(Table {
            path,
            schema,
            writer,
        })
    }

    fn write(&mut self, columns: Vec<ArrayRef>) -> Result<()> {
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| invalid(&self.path, format!("cannot build a record batch: {e}")))?;
        self.writer
            .write(&batch)
            .map_err(|e| invalid(&self.path, format!("cannot write Parquet: {e}")))
    }

    fn finish(self) -> Result<TableFile> {
        let path = self.path;
        let bytes = self
            .writer
            .into_inner()
            .map_err(|e| invalid(&path, format!("cannot finish the Parquet file: {e}")))?;
        Ok(TableFile { path, bytes })
    }
}

fn invalid(path: &str, message: String) -> Error {
    Error::Invalid {
        path: PathBuf::from(path),
        message,
    }
}

fn f(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

fn utf8(name: &str) -> Field {
    f(name, DataType::Utf8, false)
}

fn utf8_opt(name: &str) -> Field {
    f(name, DataType::Utf8, true)
}

fn int(name: &str) -> Field {
    f(name, DataType::Int64, false)
}

fn int_opt(name: &str) -> Field {
    f(name, DataType::Int64, true)
}

fn float(name: &str) -> Field {
    f(name, DataType::Float64, true)
}

fn int_list(name: &str) -> Field {
    f(
        name,
        DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
        false,
    )
}

/// A float as `results.json` writes it: non-finite values are `null`.
fn num(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// A count or index as Int64 (an error, not a wrap, above `i64::MAX`).
fn i64_of(path: &str, what: &str, x: u64) -> Result<i64> {
    i64::try_from(x)
        .map_err(|_| invalid(path, format!("{what} {x} does not fit in an Int64 column")))
}

fn ints(v: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}

fn ints_opt(v: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}

fn floats(v: Vec<Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}

fn strs<S: AsRef<str>>(v: &[S]) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v.iter().map(|s| s.as_ref())))
}

fn strs_opt(v: Vec<Option<String>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}

/// Decoder-layer index of signature layer `row` (`moe_layers` when some layers are dense).
fn decoder_layer(r: &AnalysisResults, row: usize) -> usize {
    r.moe_layers
        .as_ref()
        .and_then(|m| m.get(row).copied())
        .unwrap_or(row)
}

/// Every Parquet file of `analyze --format parquet`: the exact path's tables when `exact` is
/// given (the Gram-sums path has no per-prompt values), `per_layer.parquet` and one
/// `long/<section>.parquet` per top-level key of `results.json`.
pub fn analysis_tables(
    r: &AnalysisResults,
    exact: Option<ExactTables<'_>>,
) -> Result<Vec<TableFile>> {
    let mut out = Vec::new();
    if let Some(x) = exact {
        out.push(signatures_table(r, x)?);
        out.push(similarity_table(r, x)?);
        out.push(prompts_table(r, x)?);
    }
    out.push(per_layer_table(r)?);
    let json = serde_json::to_value(r)
        .map_err(|e| invalid("long", format!("cannot serialise the results: {e}")))?;
    let Value::Object(top) = &json else {
        return Err(invalid("long", "results are not a JSON object".into()));
    };
    for (section, value) in top {
        let path = long_path(section);
        let rows = long_rows(section, value, &json);
        out.push(long_table(&path, &rows)?);
    }
    Ok(out)
}

/// Checks that `len` is `rows × cols` of the table at `path`.
fn check_len(path: &str, what: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(invalid(
            path,
            format!("{what} has {len} values, expected {rows} × {cols}"),
        )),
    }
}

/// `signatures.parquet`: one row per (prompt, layer, expert), prompts in `prompt_ids` order.
fn signatures_table(r: &AnalysisResults, x: ExactTables<'_>) -> Result<TableFile> {
    const PATH: &str = "signatures.parquet";
    let (n, l, e) = (r.prompt_ids.len(), r.num_layers, r.num_experts);
    let d = l
        .checked_mul(e)
        .ok_or_else(|| invalid(PATH, format!("{l} layers × {e} experts overflow")))?;
    check_len(PATH, "the signature matrix", x.signatures.len(), n, d)?;
    check_len(PATH, "the category list", x.categories.len(), n, 1)?;
    let mut t = Table::new(
        PATH,
        vec![
            utf8("prompt_id"),
            utf8("category"),
            int("layer"),
            int("expert"),
            float("frequency"),
        ],
    )?;
    let layers = (0..l)
        .map(|row| i64_of(PATH, "layer", decoder_layer(r, row) as u64))
        .collect::<Result<Vec<_>>>()?;
    let experts = (0..e)
        .map(|j| i64_of(PATH, "expert", j as u64))
        .collect::<Result<Vec<_>>>()?;
    // Whole prompts per batch, about ROWS_PER_GROUP rows each.
    let per_batch = (ROWS_PER_GROUP / d.max(1)).max(1);
    let mut start = 0;
    while start < n {
        let end = n.min(start + per_batch);
        let rows = (end - start) * d;
        let (mut ids, mut cats) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let (mut lay, mut exp, mut val) = (
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        for i in start..end {
            for (li, &layer) in layers.iter().enumerate() {
                for (ej, &expert) in experts.iter().enumerate() {
                    ids.push(r.prompt_ids[i].as_str());
                    cats.push(x.categories[i].as_str());
                    lay.push(layer);
                    exp.push(expert);
                    val.push(num(x.signatures[i * d + li * e + ej]));
                }
            }
        }
        t.write(vec![
            strs(&ids),
            strs(&cats),
            ints(lay),
            ints(exp),
            floats(val),
        ])?;
        start = end;
    }
    t.finish()
}

/// `prompt_similarity.parquet`: one row per ordered prompt pair (a, b), diagonal included, as
/// `prompt_similarity.csv`.
fn similarity_table(r: &AnalysisResults, x: ExactTables<'_>) -> Result<TableFile> {
    const PATH: &str = "prompt_similarity.parquet";
    let n = r.prompt_ids.len();
    check_len(PATH, "the similarity matrix", x.similarity.len(), n, n)?;
    check_len(PATH, "the category list", x.categories.len(), n, 1)?;
    let mut t = Table::new(
        PATH,
        vec![
            utf8("prompt_a"),
            utf8("category_a"),
            utf8("prompt_b"),
            utf8("category_b"),
            float("similarity"),
        ],
    )?;
    let per_batch = (ROWS_PER_GROUP / n.max(1)).max(1);
    let mut start = 0;
    while start < n {
        let end = n.min(start + per_batch);
        let rows = (end - start) * n;
        let (mut a, mut ca, mut b, mut cb, mut v) = (
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        for i in start..end {
            for j in 0..n {
                a.push(r.prompt_ids[i].as_str());
                ca.push(x.categories[i].as_str());
                b.push(r.prompt_ids[j].as_str());
                cb.push(x.categories[j].as_str());
                v.push(num(x.similarity[i * n + j]));
            }
        }
        t.write(vec![strs(&a), strs(&ca), strs(&b), strs(&cb), floats(v)])?;
        start = end;
    }
    t.finish()
}

/// `prompts.parquet`: one row per prompt: id, category, PCA and t-SNE coordinates, out-of-fold
/// prediction, whether it is correct, and `prob_<label>` per class in `logreg_5fold.labels` order.
fn prompts_table(r: &AnalysisResults, x: ExactTables<'_>) -> Result<TableFile> {
    const PATH: &str = "prompts.parquet";
    let n = r.prompt_ids.len();
    check_len(PATH, "the category list", x.categories.len(), n, 1)?;
    let coords = |c: Option<&Vec<[f64; 2]>>, what: &str| -> Result<[Vec<Option<f64>>; 2]> {
        match c {
            Some(c) => {
                check_len(PATH, what, c.len(), n, 1)?;
                Ok([
                    c.iter().map(|p| num(p[0])).collect(),
                    c.iter().map(|p| num(p[1])).collect(),
                ])
            }
            None => Ok([vec![None; n], vec![None; n]]),
        }
    };
    let [pca1, pca2] = coords(r.pca.done().map(|p| &p.coords), "pca.coords")?;
    let [tsne1, tsne2] = coords(r.tsne.done().map(|t| &t.coords), "tsne.coords")?;
    let clf = r.logreg_5fold.done();
    let labels: &[String] = clf.map_or(&[], |c| &c.labels);
    let (predicted, correct): (Vec<Option<String>>, Vec<Option<bool>>) = match clf {
        Some(c) => {
            check_len(
                PATH,
                "logreg_5fold.oof_predictions",
                c.oof_predictions.len(),
                n,
                1,
            )?;
            c.oof_predictions
                .iter()
                .zip(x.categories)
                .map(|(p, t)| (Some(p.clone()), Some(p == t)))
                .unzip()
        }
        None => (vec![None; n], vec![None; n]),
    };
    let k = labels.len();
    let proba = match (clf, x.oof_probabilities) {
        (Some(_), Some(p)) => {
            check_len(PATH, "the out-of-fold probabilities", p.len(), n, k)?;
            Some(p)
        }
        _ => None,
    };
    let mut fields = vec![
        int("prompt_index"),
        utf8("prompt_id"),
        utf8("category"),
        float("pca_1"),
        float("pca_2"),
        float("tsne_1"),
        float("tsne_2"),
        utf8_opt("predicted"),
        f("correct", DataType::Boolean, true),
    ];
    for label in labels {
        fields.push(float(&format!("prob_{label}")));
    }
    let mut t = Table::new(PATH, fields)?;
    let mut cols: Vec<ArrayRef> = vec![
        ints(
            (0..n)
                .map(|i| i64_of(PATH, "prompt index", i as u64))
                .collect::<Result<Vec<_>>>()?,
        ),
        strs(&r.prompt_ids),
        strs(x.categories),
        floats(pca1),
        floats(pca2),
        floats(tsne1),
        floats(tsne2),
        strs_opt(predicted),
        Arc::new(arrow_array::BooleanArray::from(correct)),
    ];
    for c in 0..k {
        cols.push(floats(
            (0..n)
                .map(|i| proba.and_then(|p| num(p[i * k + c])))
                .collect(),
        ));
    }
    t.write(cols)?;
    t.finish()
}

/// `per_layer.parquet`: `per_layer` of results.json, one row per MoE layer.
fn per_layer_table(r: &AnalysisResults) -> Result<TableFile> {
    const PATH: &str = "per_layer.parquet";
    let mut t = Table::new(
        PATH,
        vec![
            int("layer"),
            float("within_mean"),
            float("across_mean"),
            float("cohens_d"),
        ],
    )?;
    let layer = r
        .per_layer
        .iter()
        .map(|l| i64_of(PATH, "layer", l.layer as u64))
        .collect::<Result<Vec<_>>>()?;
    t.write(vec![
        ints(layer),
        floats(r.per_layer.iter().map(|l| num(l.within_mean)).collect()),
        floats(r.per_layer.iter().map(|l| num(l.across_mean)).collect()),
        floats(r.per_layer.iter().map(|l| num(l.cohens_d)).collect()),
    ])?;
    t.finish()
}

/// One row of a long table: a leaf of the JSON (see [`long_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LongRow {
    /// Top-level key of the document.
    pub section: String,
    /// Object keys from the section to the leaf, `.`-joined (array levels left out; empty for a
    /// section that is itself a value). Array indices after the second are written into the key
    /// as `[n]`.
    pub key: String,
    /// Index in the first array on the way to the leaf.
    pub i: Option<u64>,
    /// Index in the second array.
    pub j: Option<u64>,
    /// What `i` indexes, where known (prompt id, category, layer, component).
    pub label_i: Option<String>,
    /// What `j` indexes.
    pub label_j: Option<String>,
    /// A number (`null` for null, strings and booleans).
    pub value: Option<f64>,
    /// A string, a boolean (`true` / `false`), or the exact decimal of an integer beyond 2^53.
    pub text: Option<String>,
}

/// What the indices of the array at `key` in `section` stand for: the labels of its first and
/// second index, read from `doc` (the whole document).
fn index_labels(section: &str, key: &str, doc: &Value) -> [Option<Vec<String>>; 2] {
    let strings = |v: Option<&Value>| -> Option<Vec<String>> {
        v?.as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let field = |arr: Option<&Value>, name: &str| -> Option<Vec<String>> {
        arr?.as_array()?
            .iter()
            .map(|o| match o.get(name)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    };
    let sec = doc.get(section);
    let prompts = || strings(doc.get("prompt_ids"));
    let pcs = |p: &str, n: usize| Some((1..=n).map(|c| format!("{p}{c}")).collect());
    match (section, key) {
        ("prompt_ids", "") => [prompts(), None],
        ("categories", "") => [field(sec, "name"), None],
        ("dropped_prompts", "") => [field(sec, "prompt_id"), None],
        // per_layer of results.json, layers of the health JSON
        ("per_layer" | "layers", "") => [field(sec, "layer"), None],
        ("category_similarity_matrix", "values") => {
            let o = strings(sec.and_then(|s| s.get("order")));
            [o.clone(), o]
        }
        ("pca", "coords") => [prompts(), pcs("pc", 2)],
        ("pca", "explained_variance_ratio") => {
            let n = sec
                .and_then(|s| s.get(key))
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            [pcs("pc", n), None]
        }
        ("tsne", "coords") => [prompts(), pcs("tsne", 2)],
        ("logreg_5fold", "oof_predictions") => [prompts(), None],
        ("logreg_5fold", "confusion") => {
            let l = strings(sec.and_then(|s| s.get("labels")));
            [l.clone(), l]
        }
        ("lexical_baseline", "classifier.oof_predictions") => [prompts(), None],
        ("lexical_baseline", "classifier.confusion") => {
            let l = strings(
                sec.and_then(|s| s.get("classifier"))
                    .and_then(|c| c.get("labels")),
            );
            [l.clone(), l]
        }
        ("token_matched", "per_layer") => {
            [field(sec.and_then(|s| s.get("per_layer")), "layer"), None]
        }
        ("token_matched", "dropped_prompts") => [
            field(sec.and_then(|s| s.get("dropped_prompts")), "prompt_id"),
            None,
        ],
        ("token_matched", "category_similarity_matrix.values") => {
            let o = strings(
                sec.and_then(|s| s.get("category_similarity_matrix"))
                    .and_then(|c| c.get("order")),
            );
            [o.clone(), o]
        }
        _ => [None, None],
    }
}

/// The tidy rows of one top-level `section` of the JSON document `doc` (`value` is
/// `doc[section]`): one row per leaf (number, string, boolean, null), object keys in name
/// order, array elements in order.
/// Empty arrays and objects have no row; a skipped section is the one row `key = "skipped"`
/// with the reason in `text`.
pub fn long_rows(section: &str, value: &Value, doc: &Value) -> Vec<LongRow> {
    struct Walk<'a> {
        section: &'a str,
        doc: &'a Value,
        rows: Vec<LongRow>,
    }
    impl Walk<'_> {
        fn leaf(&mut self, key: &str, idx: &[(u64, [Option<Vec<String>>; 2])], v: &Value) {
            let (value, text) = match v {
                Value::Null => (None, None),
                Value::Bool(b) => (None, Some(b.to_string())),
                Value::String(s) => (None, Some(s.clone())),
                Value::Number(n) => {
                    let exact = n
                        .as_u64()
                        .map(|u| u > (1 << 53))
                        .or_else(|| n.as_i64().map(|i| i.unsigned_abs() > (1 << 53)))
                        .unwrap_or(false);
                    (n.as_f64(), exact.then(|| n.to_string()))
                }
                Value::Array(_) | Value::Object(_) => return,
            };
            // The labels of index 0 come from the first array's labels[0]; those of index 1
            // from the first array's labels[1] (2-D arrays) or the second array's labels[0].
            let label = |level: usize| -> Option<String> {
                let (pos, _) = idx.get(level)?;
                let from = match level {
                    0 => idx[0].1[0].as_ref(),
                    _ => idx[0].1[1].as_ref().or(idx[1].1[0].as_ref()),
                }?;
                from.get(usize::try_from(*pos).ok()?).cloned()
            };
            self.rows.push(LongRow {
                section: self.section.to_string(),
                key: key.to_string(),
                i: idx.first().map(|x| x.0),
                j: idx.get(1).map(|x| x.0),
                label_i: label(0),
                label_j: label(1),
                value,
                text,
            });
        }

        fn walk(&mut self, key: &str, idx: &mut Vec<(u64, [Option<Vec<String>>; 2])>, v: &Value) {
            match v {
                Value::Object(m) => {
                    // Keys by name, whatever the map's own order.
                    let mut entries: Vec<_> = m.iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    for (k, child) in entries {
                        let sub = if key.is_empty() {
                            k.clone()
                        } else {
                            format!("{key}.{k}")
                        };
                        self.walk(&sub, idx, child);
                    }
                }
                Value::Array(a) => {
                    let labels = if idx.len() < 2 {
                        // Only the labels of the first array level matter for index 0; a second
                        // level reads them from the first one or its own.
                        index_labels(self.section, key, self.doc)
                    } else {
                        [None, None]
                    };
                    for (n, child) in a.iter().enumerate() {
                        if idx.len() < 2 {
                            idx.push((n as u64, labels.clone()));
                            self.walk(key, idx, child);
                            idx.pop();
                        } else {
                            self.walk(&format!("{key}[{n}]"), idx, child);
                        }
                    }
                }
                leaf => self.leaf(key, idx, leaf),
            }
        }
    }
    let mut w = Walk {
        section,
        doc,
        rows: Vec::new(),
    };
    w.walk("", &mut Vec::new(), value);
    w.rows
}

/// The schema of every long table.
fn long_fields() -> Vec<Field> {
    vec![
        utf8("section"),
        utf8("key"),
        int_opt("i"),
        int_opt("j"),
        utf8_opt("label_i"),
        utf8_opt("label_j"),
        float("value"),
        utf8_opt("text"),
    ]
}

/// A long table at `path` from its rows.
fn long_table(path: &str, rows: &[LongRow]) -> Result<TableFile> {
    let mut t = Table::new(path, long_fields())?;
    let idx = |g: fn(&LongRow) -> Option<u64>| -> Result<ArrayRef> {
        Ok(ints_opt(
            rows.iter()
                .map(|r| g(r).map(|x| i64_of(path, "index", x)).transpose())
                .collect::<Result<Vec<_>>>()?,
        ))
    };
    t.write(vec![
        strs(&rows.iter().map(|r| r.section.as_str()).collect::<Vec<_>>()),
        strs(&rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>()),
        idx(|r| r.i)?,
        idx(|r| r.j)?,
        strs_opt(rows.iter().map(|r| r.label_i.clone()).collect()),
        strs_opt(rows.iter().map(|r| r.label_j.clone()).collect()),
        floats(rows.iter().map(|r| r.value).collect()),
        strs_opt(rows.iter().map(|r| r.text.clone()).collect()),
    ])?;
    t.finish()
}

/// The Parquet files of `health --parquet DIR`: `layers.parquet`, `load.parquet`, with
/// per-token input `coactivation.parquet` and `pairs.parquet`, and `long.parquet` (the health
/// JSON `json`, `mutual_information` included when computed, flattened as [`long_rows`] with one
/// `section` per top-level key).
pub fn health_tables(
    report: &HealthReport,
    acc: &HealthAccumulator,
    json: &Value,
) -> Result<Vec<TableFile>> {
    let mut out = vec![health_layers(report)?, health_load(report)?];
    if let Some(t) = health_coactivation(acc)? {
        out.push(t);
    }
    if let Some(t) = health_pairs(report)? {
        out.push(t);
    }
    let mut rows = Vec::new();
    if let Value::Object(top) = json {
        let mut entries: Vec<_> = top.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (section, value) in entries {
            rows.extend(long_rows(section, value, json));
        }
    }
    out.push(long_table("long.parquet", &rows)?);
    Ok(out)
}

fn int_lists(path: &str, v: Vec<&Vec<usize>>) -> Result<ArrayRef> {
    let lists = v
        .into_iter()
        .map(|l| {
            l.iter()
                .map(|&x| i64_of(path, "expert", x as u64).map(Some))
                .collect::<Result<Vec<_>>>()
                .map(Some)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
        lists,
    )))
}

/// `layers.parquet`: the columns of `layers.csv`, dead/cold experts as lists.
fn health_layers(r: &HealthReport) -> Result<TableFile> {
    const PATH: &str = "layers.parquet";
    let mut t = Table::new(
        PATH,
        vec![
            int("layer"),
            int("tokens"),
            float("selections"),
            float("normalized_entropy"),
            float("entropy_nats"),
            float("max_mean_ratio"),
            float("gini"),
            float("jain"),
            int_list("dead_experts"),
            int_list("cold_experts"),
            float("router_entropy_mean"),
            float("router_entropy_std"),
            float("margin_mean"),
            float("margin_std"),
            float("margin_min"),
        ],
    )?;
    let ls = &r.layers;
    let router = |g: fn(&moe_xray_health::health::RouterStats) -> f64, margin: bool| {
        floats(
            ls.iter()
                .map(|l| {
                    l.router
                        .as_ref()
                        .filter(|s| !margin || s.margin_tokens > 0)
                        .and_then(|s| num(g(s)))
                })
                .collect(),
        )
    };
    let col = |g: fn(&moe_xray_health::health::LayerHealth) -> f64| {
        floats(ls.iter().map(|l| num(g(l))).collect())
    };
    t.write(vec![
        ints(
            ls.iter()
                .map(|l| i64_of(PATH, "layer", l.layer as u64))
                .collect::<Result<Vec<_>>>()?,
        ),
        ints(
            ls.iter()
                .map(|l| i64_of(PATH, "tokens", l.tokens))
                .collect::<Result<Vec<_>>>()?,
        ),
        col(|l| l.selections),
        col(|l| l.normalized_entropy),
        col(|l| l.entropy_nats),
        col(|l| l.max_mean_ratio),
        col(|l| l.gini),
        col(|l| l.jain),
        int_lists(PATH, ls.iter().map(|l| &l.dead_experts).collect())?,
        int_lists(PATH, ls.iter().map(|l| &l.cold_experts).collect())?,
        router(|s| s.entropy_mean, false),
        router(|s| s.entropy_std, false),
        router(|s| s.margin_mean, true),
        router(|s| s.margin_std, true),
        router(|s| s.margin_min, true),
    ])?;
    t.finish()
}

/// `load.parquet`: one row per (layer, expert): load, share, status (`ok` / `cold` / `dead`).
fn health_load(r: &HealthReport) -> Result<TableFile> {
    const PATH: &str = "load.parquet";
    let mut t = Table::new(
        PATH,
        vec![
            int("layer"),
            int("expert"),
            float("load"),
            float("share"),
            utf8("status"),
        ],
    )?;
    let (mut lay, mut exp, mut load, mut share, mut status) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in &r.layers {
        for e in 0..r.num_experts {
            lay.push(i64_of(PATH, "layer", l.layer as u64)?);
            exp.push(i64_of(PATH, "expert", e as u64)?);
            load.push(l.load.get(e).copied().and_then(num));
            share.push(l.share.get(e).copied().and_then(num));
            status.push(if l.dead_experts.contains(&e) {
                "dead"
            } else if l.cold_experts.contains(&e) {
                "cold"
            } else {
                "ok"
            });
        }
    }
    t.write(vec![
        ints(lay),
        ints(exp),
        floats(load),
        floats(share),
        strs(&status),
    ])?;
    t.finish()
}

/// `coactivation.parquet`: `layer, i, j, count` for every expert pair (diagonal = load), or
/// `None` without per-token input.
fn health_coactivation(acc: &HealthAccumulator) -> Result<Option<TableFile>> {
    const PATH: &str = "coactivation.parquet";
    let e = acc.num_experts();
    let mut t = Table::new(PATH, vec![int("layer"), int("i"), int("j"), int("count")])?;
    for (row, &l) in acc.layer_ids().iter().enumerate() {
        let Some(c) = acc.coactivation(row) else {
            return Ok(None);
        };
        check_len(PATH, "the co-activation matrix", c.len(), e, e)?;
        let (mut lay, mut ii, mut jj, mut cnt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..e {
            for j in 0..e {
                lay.push(i64_of(PATH, "layer", l as u64)?);
                ii.push(i64_of(PATH, "expert", i as u64)?);
                jj.push(i64_of(PATH, "expert", j as u64)?);
                cnt.push(i64_of(PATH, "count", c[i * e + j])?);
            }
        }
        t.write(vec![ints(lay), ints(ii), ints(jj), ints(cnt)])?;
    }
    Ok(Some(t.finish()?))
}

/// `pairs.parquet`: the strongest co-activated pairs per layer (`layer, rank, i, j, count,
/// expected, lift`), or `None` without per-token input.
fn health_pairs(r: &HealthReport) -> Result<Option<TableFile>> {
    const PATH: &str = "pairs.parquet";
    let mut cols: [Vec<i64>; 5] = Default::default();
    let (mut expected, mut lift) = (Vec::new(), Vec::new());
    for l in &r.layers {
        let Some(pairs) = l.top_pairs.as_ref() else {
            return Ok(None);
        };
        for (rank, p) in pairs.iter().enumerate() {
            cols[0].push(i64_of(PATH, "layer", l.layer as u64)?);
            cols[1].push(i64_of(PATH, "rank", rank as u64 + 1)?);
            cols[2].push(i64_of(PATH, "expert", p.i as u64)?);
            cols[3].push(i64_of(PATH, "expert", p.j as u64)?);
            cols[4].push(i64_of(PATH, "count", p.count)?);
            expected.push(num(p.expected));
            lift.push(num(p.lift));
        }
    }
    let mut t = Table::new(
        PATH,
        vec![
            int("layer"),
            int("rank"),
            int("i"),
            int("j"),
            int("count"),
            float("expected"),
            float("lift"),
        ],
    )?;
    let [a, b, c, d, e] = cols;
    t.write(vec![
        ints(a),
        ints(b),
        ints(c),
        ints(d),
        ints(e),
        floats(expected),
        floats(lift),
    ])?;
    Ok(Some(t.finish()?))
}
