//! Routing traces as Parquet: one row per routing record (token, MoE layer), the same fields as
//! a JSONL record (`docs/trace-format.md`, "Parquet"), the manifest as key-value metadata.
//!
//! Writing is streaming: rows are collected in Arrow batches of [`BATCH_ROWS`] and written in row
//! groups of at most [`ROW_GROUP_ROWS`] rows, so memory does not grow with the trace. Reading is
//! streaming too (one decoded batch at a time); every row is then checked by
//! `moe_xray_trace::TraceReader` exactly like a JSONL line ([`ParquetFormat`] is the
//! `ExternalFormat` the pipeline installs).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{
    Array, ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, LargeListArray,
    LargeStringArray, ListArray, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use moe_xray_trace::{
    ExternalFormat, ExternalItems, Manifest, RoutingDecision, RoutingRecord, RoutingSink,
    TokenType, TraceError, TraceItem,
};

use crate::{Error, Result};

/// Key-value metadata key of the format tag ([`FORMAT_RECORDS`]).
pub const FORMAT_KEY: &str = "moe_xray.format";
/// Format tag of a routing-record trace (bumped on an incompatible change of the columns).
pub const FORMAT_RECORDS: &str = "moe-xray routing records 1";
/// Key-value metadata key of the manifest (the `manifest.json` text).
pub const MANIFEST_KEY: &str = "moe_xray.manifest";
/// Rows per Arrow batch handed to the Parquet writer (and read back at a time).
pub const BATCH_ROWS: usize = 8192;
/// Rows per row group written.
pub const ROW_GROUP_ROWS: usize = 131_072;
/// Largest uncompressed row group accepted on reading (a hostile file cannot make the reader
/// decode more than this at once).
pub const MAX_ROW_GROUP_BYTES: i64 = 1 << 30;
/// Largest manifest accepted in the metadata, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// The columns of a routing-record file, in this order. `category` is left out of the parts of
/// a Hive-partitioned dataset (it is in their path).
pub fn records_schema(with_category: bool) -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let mut fields = vec![
        Field::new("prompt_index", DataType::Int32, false),
        Field::new("prompt_id", DataType::Utf8, false),
    ];
    if with_category {
        fields.push(Field::new("category", DataType::Utf8, true));
    }
    fields.extend([
        Field::new("token_type", DataType::Utf8, false),
        Field::new("position", DataType::Int32, false),
        Field::new("token_id", DataType::Int32, true),
        Field::new("layer", DataType::Int32, false),
        Field::new("experts", list(DataType::Int32), false),
        Field::new("weights", list(DataType::Float32), true),
        Field::new("probs", list(DataType::Float32), true),
    ]);
    Arc::new(Schema::new(fields))
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn to_trace_error(e: Error) -> TraceError {
    match e {
        Error::Io { path, source } => TraceError::io(path, source),
        Error::Invalid { path, message } => TraceError::invalid_file(path, message),
    }
}

fn i32_of(path: &Path, what: &str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        invalid(
            path,
            format!("{what} {v} does not fit the Parquet column (int32)"),
        )
    })
}

/// Streaming writer of routing records to one Parquet file.
pub struct RecordsWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    with_category: bool,
    prompt_index: Int32Builder,
    prompt_id: StringBuilder,
    category: StringBuilder,
    token_type: StringBuilder,
    position: Int32Builder,
    token_id: Int32Builder,
    layer: Int32Builder,
    experts: ListBuilder<Int32Builder>,
    weights: ListBuilder<Float32Builder>,
    probs: ListBuilder<Float32Builder>,
    pending: usize,
    rows: u64,
}

impl RecordsWriter {
    /// Creates `path` (truncating it). The manifest, when given, is stored as key-value metadata
    /// under [`MANIFEST_KEY`]; `with_category` adds the `category` column.
    pub fn create(
        path: impl AsRef<Path>,
        manifest: Option<&Manifest>,
        with_category: bool,
    ) -> Result<RecordsWriter> {
        let path = path.as_ref().to_path_buf();
        let mut kv = vec![KeyValue::new(
            FORMAT_KEY.to_string(),
            FORMAT_RECORDS.to_string(),
        )];
        if let Some(m) = manifest {
            let text = serde_json::to_string(m)
                .map_err(|e| invalid(&path, format!("cannot serialise the manifest: {e}")))?;
            kv.push(KeyValue::new(MANIFEST_KEY.to_string(), text));
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(kv))
            .build();
        let file = File::create(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let schema = records_schema(with_category);
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| invalid(&path, format!("cannot start the Parquet file: {e}")))?;
        let list_i = || {
            ListBuilder::new(Int32Builder::new()).with_field(Field::new(
                "item",
                DataType::Int32,
                true,
            ))
        };
        let list_f = || {
            ListBuilder::new(Float32Builder::new()).with_field(Field::new(
                "item",
                DataType::Float32,
                true,
            ))
        };
        Ok(RecordsWriter {
            path,
            writer,
            schema,
            with_category,
            prompt_index: Int32Builder::new(),
            prompt_id: StringBuilder::new(),
            category: StringBuilder::new(),
            token_type: StringBuilder::new(),
            position: Int32Builder::new(),
            token_id: Int32Builder::new(),
            layer: Int32Builder::new(),
            experts: list_i(),
            weights: list_f(),
            probs: list_f(),
            pending: 0,
            rows: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows written so far (including those still in the current batch).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends one record of the prompt with index `prompt_index` (order of first appearance in
    /// the trace).
    pub fn write(&mut self, prompt_index: u32, r: &RoutingRecord) -> Result<()> {
        let p = &self.path;
        let (pi, pos, layer) = (
            i32_of(p, "prompt index", prompt_index)?,
            i32_of(p, "position", r.position)?,
            i32_of(p, "layer", r.layer)?,
        );
        let tid = r.token_id.map(|t| i32_of(p, "token_id", t)).transpose()?;
        let mut experts = Vec::with_capacity(r.experts.len());
        for &e in &r.experts {
            experts.push(i32_of(p, "expert", e)?);
        }
        self.prompt_index.append_value(pi);
        self.prompt_id.append_value(&r.prompt_id);
        if self.with_category {
            self.category.append_option(r.category.as_deref());
        }
        self.token_type.append_value(r.token_type.as_str());
        self.position.append_value(pos);
        self.token_id.append_option(tid);
        self.layer.append_value(layer);
        self.experts.values().append_slice(&experts);
        self.experts.append(true);
        match &r.weights {
            Some(w) => {
                self.weights.values().append_slice(w);
                self.weights.append(true);
            }
            None => self.weights.append(false),
        }
        match &r.probs {
            Some(w) => {
                self.probs.values().append_slice(w);
                self.probs.append(true);
            }
            None => self.probs.append(false),
        }
        self.pending += 1;
        self.rows += 1;
        if self.pending >= BATCH_ROWS {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.prompt_index.finish()),
            Arc::new(self.prompt_id.finish()),
        ];
        if self.with_category {
            cols.push(Arc::new(self.category.finish()));
        }
        cols.extend([
            Arc::new(self.token_type.finish()) as ArrayRef,
            Arc::new(self.position.finish()),
            Arc::new(self.token_id.finish()),
            Arc::new(self.layer.finish()),
            Arc::new(self.experts.finish()),
            Arc::new(self.weights.finish()),
            Arc::new(self.probs.finish()),
        ]);
        let batch = RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| invalid(&self.path, format!("cannot build a batch: {e}")))?;
        self.writer
            .write(&batch)
            .map_err(|e| invalid(&self.path, format!("cannot write: {e}")))?;
        self.pending = 0;
        Ok(())
    }

    /// Writes the last batch and the footer; returns the number of rows.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_batch()?;
        let path = self.path.clone();
        let file = self
            .writer
            .into_inner()
            .map_err(|e| invalid(&path, format!("cannot finish the Parquet file: {e}")))?;
        file.sync_all().map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(self.rows)
    }
}

/// Numbers prompts in order of first appearance.
#[derive(Debug, Default)]
pub struct PromptIndex(HashMap<String, u32>);

impl PromptIndex {
    /// The index of `id`, assigning the next one on first sight.
    pub fn of(&mut self, id: &str) -> u32 {
        let n = self.0.len() as u32;
        *self.0.entry(id.to_string()).or_insert(n)
    }
    /// Number of prompts numbered.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The capture sink of `trace --format parquet`: like `moe_xray_trace::EventsWriter`, it
/// buffers each prompt's records and writes them when the prompt ends (so rows come in the same
/// order as the lines of the JSONL trace of the same run).
pub struct ParquetSink {
    writer: Option<RecordsWriter>,
    pending: HashMap<String, (Option<String>, Vec<RoutingRecord>)>,
    index: PromptIndex,
    record_probs: bool,
}

impl ParquetSink {
    pub fn new(writer: RecordsWriter, record_probs: bool) -> ParquetSink {
        ParquetSink {
            writer: Some(writer),
            pending: HashMap::new(),
            index: PromptIndex::default(),
            record_probs,
        }
    }

    /// Finishes the file; returns its number of rows.
    pub fn finish(mut self) -> Result<u64> {
        match self.writer.take() {
            Some(w) => w.finish(),
            None => Ok(0),
        }
    }
}

fn sink_err(e: Error) -> TraceError {
    TraceError::Sink(e.to_string())
}

impl RoutingSink for ParquetSink {
    fn begin_prompt(
        &mut self,
        prompt_id: &str,
        category: Option<&str>,
    ) -> moe_xray_trace::Result<()> {
        if self.pending.contains_key(prompt_id) {
            return Err(TraceError::Sink(format!(
                "prompt '{prompt_id}' begun twice"
            )));
        }
        self.pending.insert(
            prompt_id.to_string(),
            (category.map(str::to_string), Vec::new()),
        );
        Ok(())
    }

    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        let (cat, recs) = self.pending.get_mut(d.prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "decision for prompt '{}' outside begin_prompt/end_prompt",
                d.prompt_id
            ))
        })?;
        recs.push(RoutingRecord {
            prompt_id: d.prompt_id.to_string(),
            category: cat.clone(),
            layer: d.layer,
            position: d.position,
            token_id: Some(d.token_id),
            token_type: d.token_type,
            experts: d.experts.to_vec(),
            weights: (!d.weights.is_empty()).then(|| d.weights.to_vec()),
            probs: if self.record_probs {
                d.probs.map(<[f32]>::to_vec)
            } else {
                None
            },
        });
        Ok(())
    }

    fn end_prompt(&mut self, prompt_id: &str) -> moe_xray_trace::Result<()> {
        let (_, recs) = self.pending.remove(prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "end_prompt for prompt '{prompt_id}' that was not begun"
            ))
        })?;
        let Some(w) = self.writer.as_mut() else {
            return Err(TraceError::Sink(
                "the Parquet file is already finished".into(),
            ));
        };
        if !recs.is_empty() {
            let i = self.index.of(prompt_id);
            for r in &recs {
                w.write(i, r).map_err(sink_err)?;
            }
        }
        Ok(())
    }

    fn wants_probs(&self) -> bool {
        self.record_probs
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// An integer column of any of the integer types a writer may have used.
enum IntCol {
    I32(Int32Array),
    I64(Int64Array),
    U32(UInt32Array),
    U64(UInt64Array),
}

impl IntCol {
    fn of(a: &ArrayRef) -> Option<IntCol> {
        let any = a.as_any();
        if let Some(x) = any.downcast_ref::<Int32Array>() {
            return Some(IntCol::I32(x.clone()));
        }
        if let Some(x) = any.downcast_ref::<Int64Array>() {
            return Some(IntCol::I64(x.clone()));
        }
        if let Some(x) = any.downcast_ref::<UInt32Array>() {
            return Some(IntCol::U32(x.clone()));
        }
        any.downcast_ref::<UInt64Array>()
            .map(|x| IntCol::U64(x.clone()))
    }
    fn get(&self, i: usize) -> Option<i64> {
        match self {
            IntCol::I32(a) => a.is_valid(i).then(|| i64::from(a.value(i))),
            IntCol::I64(a) => a.is_valid(i).then(|| a.value(i)),
            IntCol::U32(a) => a.is_valid(i).then(|| i64::from(a.value(i))),
            IntCol::U64(a) => a
                .is_valid(i)
                .then(|| i64::try_from(a.value(i)).unwrap_or(i64::MAX)),
        }
    }
}

enum FloatCol {
    F32(Float32Array),
    F64(Float64Array),
}

impl FloatCol {
    fn of(a: &ArrayRef) -> Option<FloatCol> {
        let any = a.as_any();
        if let Some(x) = any.downcast_ref::<Float32Array>() {
            return Some(FloatCol::F32(x.clone()));
        }
        any.downcast_ref::<Float64Array>()
            .map(|x| FloatCol::F64(x.clone()))
    }
    fn get(&self, i: usize) -> Option<f64> {
        match self {
            FloatCol::F32(a) => a.is_valid(i).then(|| f64::from(a.value(i))),
            FloatCol::F64(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

enum StrCol {
    Small(StringArray),
    Large(LargeStringArray),
}

impl StrCol {
    fn of(a: &ArrayRef) -> Option<StrCol> {
        let any = a.as_any();
        if let Some(x) = any.downcast_ref::<StringArray>() {
            return Some(StrCol::Small(x.clone()));
        }
        any.downcast_ref::<LargeStringArray>()
            .map(|x| StrCol::Large(x.clone()))
    }
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            StrCol::Small(a) => a.is_valid(i).then(|| a.value(i)),
            StrCol::Large(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// A list column: validity, offsets (as `usize` ranges) and its child values.
struct ListCol<T> {
    list: ArrayRef,
    offsets: Vec<usize>,
    values: T,
    child_nulls: bool,
}

impl<T> ListCol<T> {
    fn of(a: &ArrayRef, child: impl Fn(&ArrayRef) -> Option<T>) -> Option<ListCol<T>> {
        let any = a.as_any();
        let (offsets, values): (Vec<usize>, ArrayRef) =
            if let Some(l) = any.downcast_ref::<ListArray>() {
                let o = l
                    .value_offsets()
                    .iter()
                    .map(|&x| x.max(0) as usize)
                    .collect();
                (o, l.values().clone())
            } else if let Some(l) = any.downcast_ref::<LargeListArray>() {
                let o = l
                    .value_offsets()
                    .iter()
                    .map(|&x| x.max(0) as usize)
                    .collect();
                (o, l.values().clone())
            } else {
                return None;
            };
        let child_nulls = values.null_count() > 0;
        Some(ListCol {
            list: a.clone(),
            offsets,
            values: child(&values)?,
            child_nulls,
        })
    }
    /// The index range of row `i`'s values, `None` for a null list.
    fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        if !self.list.is_valid(i) {
            return None;
        }
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        Some(a..b.max(a))
    }
}

/// Which type each column must have (for messages and the schema check).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Int,
    Str,
    IntList,
    FloatList,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Int => "an integer (int32 or int64)",
            Kind::Str => "a string",
            Kind::IntList => "a list of integers",
            Kind::FloatList => "a list of floats (float32 or float64)",
        }
    }
    fn accepts(self, t: &DataType) -> bool {
        let int = |t: &DataType| {
            matches!(
                t,
                DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64
            )
        };
        let float = |t: &DataType| matches!(t, DataType::Float32 | DataType::Float64);
        let list_of = |t: &DataType, f: &dyn Fn(&DataType) -> bool| match t {
            DataType::List(c) | DataType::LargeList(c) => f(c.data_type()),
            _ => false,
        };
        match self {
            Kind::Int => int(t),
            Kind::Str => matches!(t, DataType::Utf8 | DataType::LargeUtf8),
            Kind::IntList => list_of(t, &int),
            Kind::FloatList => list_of(t, &float),
        }
    }
}

/// (column, kind, required)
const COLUMNS: [(&str, Kind, bool); 10] = [
    ("prompt_index", Kind::Int, false),
    ("prompt_id", Kind::Str, true),
    ("category", Kind::Str, false),
    ("token_type", Kind::Str, true),
    ("position", Kind::Int, true),
    ("token_id", Kind::Int, false),
    ("layer", Kind::Int, true),
    ("experts", Kind::IntList, true),
    ("weights", Kind::FloatList, false),
    ("probs", Kind::FloatList, false),
];

/// Checks the Arrow schema of a file: every required column present, every known column of its
/// type. Unknown columns are ignored. Returns whether `prompt_index` and `category` are present.
pub fn check_schema(path: &Path, schema: &Schema) -> Result<(bool, bool)> {
    for (name, kind, required) in COLUMNS {
        match schema.field_with_name(name) {
            Ok(f) => {
                if !kind.accepts(f.data_type()) {
                    return Err(invalid(
                        path,
                        format!(
                            "column `{name}` has type {}, expected {}",
                            f.data_type(),
                            kind.name()
                        ),
                    ));
                }
            }
            Err(_) if required => {
                return Err(invalid(
                    path,
                    format!(
                    "missing column `{name}` (a moe-xray routing-record trace has the columns {})",
                    COLUMNS.map(|c| c.0).join(", ")
                ),
                ))
            }
            Err(_) => {}
        }
    }
    Ok((
        schema.field_with_name("prompt_index").is_ok(),
        schema.field_with_name("category").is_ok(),
    ))
}

/// The columns of one decoded batch.
struct Cols {
    rows: usize,
    prompt_index: Option<IntCol>,
    prompt_id: StrCol,
    category: Option<StrCol>,
    token_type: StrCol,
    position: IntCol,
    token_id: Option<IntCol>,
    layer: IntCol,
    experts: ListCol<IntCol>,
    weights: Option<ListCol<FloatCol>>,
    probs: Option<ListCol<FloatCol>>,
}

/// Opens a Parquet file for reading its metadata and rows; errors name the file.
fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
        invalid(
            path,
            format!("not a readable Parquet file (truncated or corrupt?): {e}"),
        )
    })
}

/// The manifest in a Parquet file's key-value metadata (`None` when it has none).
pub fn read_manifest(path: &Path) -> Result<Option<Manifest>> {
    let b = open_builder(path)?;
    manifest_of(path, &b)
}

fn manifest_of(path: &Path, b: &ParquetRecordBatchReaderBuilder<File>) -> Result<Option<Manifest>> {
    let kv = b.metadata().file_metadata().key_value_metadata();
    let Some(text) = kv
        .and_then(|kv| kv.iter().find(|k| k.key == MANIFEST_KEY))
        .and_then(|k| k.value.as_deref())
    else {
        return Ok(None);
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(invalid(
            path,
            format!(
                "metadata `{MANIFEST_KEY}` is {} bytes, more than the limit {MAX_MANIFEST_BYTES}",
                text.len()
            ),
        ));
    }
    let m: Manifest = serde_json::from_str(text).map_err(|e| {
        invalid(
            path,
            format!("metadata `{MANIFEST_KEY}`: invalid manifest: {e}"),
        )
    })?;
    m.validate()
        .map_err(|msg| invalid(path, format!("metadata `{MANIFEST_KEY}`: {msg}")))?;
    Ok(Some(m))
}

/// Streaming rows of one Parquet trace file.
pub struct FileRows {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    cols: Option<Cols>,
    at: usize,
    row: usize,
    /// The category from a `category=` component of the path (dataset parts): `Some(None)` for
    /// the Hive null partition.
    path_category: Option<Option<String>>,
    has_index: bool,
}

impl FileRows {
    /// Opens `path`, checking its schema and row-group sizes. `path_category`: the category of
    /// a dataset part, from its path.
    pub fn open(path: &Path, path_category: Option<Option<String>>) -> Result<FileRows> {
        let b = open_builder(path)?;
        let (has_index, _) = check_schema(path, b.schema())?;
        for (i, rg) in b.metadata().row_groups().iter().enumerate() {
            if rg.total_byte_size() > MAX_ROW_GROUP_BYTES || rg.total_byte_size() < 0 {
                return Err(invalid(
                    path,
                    format!(
                        "row group {i} is {} bytes uncompressed, more than the supported {MAX_ROW_GROUP_BYTES}",
                        rg.total_byte_size()
                    ),
                ));
            }
        }
        let reader = b
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| invalid(path, format!("cannot read: {e}")))?;
        Ok(FileRows {
            path: path.to_path_buf(),
            reader,
            cols: None,
            at: 0,
            row: 0,
            path_category,
            has_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has the `prompt_index` column.
    pub fn has_index(&self) -> bool {
        self.has_index
    }

    fn row_err(&self, message: impl Into<String>) -> TraceError {
        TraceError::invalid(&self.path, self.row, message)
    }

    fn load(&mut self, batch: &RecordBatch) -> moe_xray_trace::Result<Cols> {
        let col = |name: &str| batch.column_by_name(name);
        let bad = |name: &str| {
            TraceError::invalid_file(
                &self.path,
                format!("column `{name}` changes type within the file"),
            )
        };
        let req = |name: &str| col(name).ok_or_else(|| bad(name));
        let experts = ListCol::of(req("experts")?, IntCol::of).ok_or_else(|| bad("experts"))?;
        let weights = match col("weights") {
            Some(a) => Some(ListCol::of(a, FloatCol::of).ok_or_else(|| bad("weights"))?),
            None => None,
        };
        let probs = match col("probs") {
            Some(a) => Some(ListCol::of(a, FloatCol::of).ok_or_else(|| bad("probs"))?),
            None => None,
        };
        Ok(Cols {
            rows: batch.num_rows(),
            prompt_index: match col("prompt_index") {
                Some(a) => Some(IntCol::of(a).ok_or_else(|| bad("prompt_index"))?),
                None => None,
            },
            prompt_id: StrCol::of(req("prompt_id")?).ok_or_else(|| bad("prompt_id"))?,
            category: match col("category") {
                Some(a) => Some(StrCol::of(a).ok_or_else(|| bad("category"))?),
                None => None,
            },
            token_type: StrCol::of(req("token_type")?).ok_or_else(|| bad("token_type"))?,
            position: IntCol::of(req("position")?).ok_or_else(|| bad("position"))?,
            token_id: match col("token_id") {
                Some(a) => Some(IntCol::of(a).ok_or_else(|| bad("token_id"))?),
                None => None,
            },
            layer: IntCol::of(req("layer")?).ok_or_else(|| bad("layer"))?,
            experts,
            weights,
            probs,
        })
    }

    /// The next row: `(row from 1, prompt_index if present, record)`.
    pub fn next_row(
        &mut self,
    ) -> moe_xray_trace::Result<Option<(usize, Option<u32>, RoutingRecord)>> {
        loop {
            if let Some(c) = &self.cols {
                if self.at < c.rows {
                    break;
                }
            }
            match self.reader.next() {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(TraceError::invalid_file(
                        &self.path,
                        format!(
                            "cannot decode the rows after row {} (truncated or corrupt file?): {e}",
                            self.row
                        ),
                    ))
                }
                Some(Ok(batch)) => {
                    let cols = self.load(&batch)?;
                    self.cols = Some(cols);
                    self.at = 0;
                }
            }
        }
        self.row += 1;
        let i = self.at;
        self.at += 1;
        let rec = self.record_at(i)?;
        Ok(Some(rec))
    }

    fn record_at(&self, i: usize) -> moe_xray_trace::Result<(usize, Option<u32>, RoutingRecord)> {
        let Some(c) = &self.cols else {
            return Err(self.row_err("no batch loaded"));
        };
        let index = |name: &str, v: Option<i64>| -> moe_xray_trace::Result<u32> {
            match v {
                None => Err(self.row_err(format!("column `{name}`: null value"))),
                Some(x) if x < 0 => Err(self.row_err(format!(
                    "column `{name}`: negative value {x} (indices count from 0)"
                ))),
                Some(x) => u32::try_from(x).map_err(|_| {
                    self.row_err(format!("column `{name}`: value {x} is out of range"))
                }),
            }
        };
        let prompt_index = match &c.prompt_index {
            Some(col) => Some(index("prompt_index", col.get(i))?),
            None => None,
        };
        let prompt_id = c
            .prompt_id
            .get(i)
            .ok_or_else(|| self.row_err("column `prompt_id`: null value"))?
            .to_string();
        let file_cat = c.category.as_ref().and_then(|col| col.get(i));
        let category = match (&self.path_category, file_cat) {
            (Some(p), Some(f)) if p.as_deref() != Some(f) => {
                return Err(self.row_err(format!(
                    "column `category` is \"{f}\" but the file's path says category={}",
                    p.as_deref().unwrap_or(crate::dataset::HIVE_NULL)
                )))
            }
            (_, Some(f)) => Some(f.to_string()),
            (Some(p), None) => p.clone(),
            (None, None) => None,
        };
        let token_type = match c.token_type.get(i) {
            Some("prompt") => TokenType::Prompt,
            Some("generation") => TokenType::Generation,
            Some(other) => {
                return Err(self.row_err(format!(
                    "column `token_type`: unknown value \"{other}\" (expected \"prompt\" or \"generation\")"
                )))
            }
            None => return Err(self.row_err("column `token_type`: null value")),
        };
        let position = index("position", c.position.get(i))?;
        let layer = index("layer", c.layer.get(i))?;
        let token_id = match &c.token_id {
            Some(col) => match col.get(i) {
                None => None,
                v => Some(index("token_id", v)?),
            },
            None => None,
        };
        let Some(r) = c.experts.range(i) else {
            return Err(self.row_err("column `experts`: null value"));
        };
        if c.experts.child_nulls && (r.start..r.end).any(|j| c.experts.values.get(j).is_none()) {
            return Err(self.row_err("column `experts`: null inside the list"));
        }
        if r.len() > moe_xray_trace::limits::MAX_EXPERTS {
            return Err(self.row_err(format!(
                "column `experts`: {} entries, more than the supported maximum number of experts {}",
                r.len(),
                moe_xray_trace::limits::MAX_EXPERTS
            )));
        }
        let mut experts = Vec::with_capacity(r.len());
        for j in r {
            experts.push(index("experts", c.experts.values.get(j))?);
        }
        let floats = |name: &str,
                      col: &Option<ListCol<FloatCol>>|
         -> moe_xray_trace::Result<Option<Vec<f32>>> {
            let Some(col) = col else { return Ok(None) };
            let Some(r) = col.range(i) else {
                return Ok(None);
            };
            if r.len() > moe_xray_trace::limits::MAX_EXPERTS {
                return Err(self.row_err(format!(
                    "column `{name}`: {} entries, more than the supported maximum number of experts {}",
                    r.len(),
                    moe_xray_trace::limits::MAX_EXPERTS
                )));
            }
            let mut out = Vec::with_capacity(r.len());
            for j in r {
                match col.values.get(j) {
                    Some(v) => out.push(v as f32),
                    None => {
                        return Err(self.row_err(format!("column `{name}`: null inside the list")))
                    }
                }
            }
            Ok(Some(out))
        };
        let weights = floats("weights", &c.weights)?;
        let probs = floats("probs", &c.probs)?;
        Ok((
            self.row,
            prompt_index,
            RoutingRecord {
                prompt_id,
                category,
                layer,
                position,
                token_id,
                token_type,
                experts,
                weights,
                probs,
            },
        ))
    }
}

impl ExternalItems for FileRows {
    fn next_item(&mut self) -> moe_xray_trace::Result<Option<(usize, TraceItem)>> {
        Ok(self
            .next_row()?
            .map(|(row, _, r)| (row, TraceItem::Record(r))))
    }
    fn source(&self) -> &Path {
        &self.path
    }
}

/// Whether the first bytes of a file are Parquet's magic.
pub fn is_parquet_head(head: &[u8]) -> bool {
    head.starts_with(b"PAR1")
}

/// The Parquet trace form for `moe_xray_trace::install_external_format`: single files (by their
/// magic bytes) and Hive-partitioned datasets (directories, see [`crate::dataset`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct ParquetFormat;

impl ExternalFormat for ParquetFormat {
    fn claims(&self, path: &Path, head: &[u8]) -> bool {
        if head.is_empty() {
            return crate::dataset::is_dataset_dir(path);
        }
        is_parquet_head(head)
    }

    fn open(&self, path: &Path) -> moe_xray_trace::Result<Box<dyn ExternalItems>> {
        if path.is_dir() {
            return Ok(Box::new(
                crate::dataset::DatasetRows::open(path).map_err(to_trace_error)?,
            ));
        }
        let cat = crate::dataset::category_of_path(path).map_err(to_trace_error)?;
        Ok(Box::new(FileRows::open(path, cat).map_err(to_trace_error)?))
    }

    fn manifest(&self, path: &Path) -> moe_xray_trace::Result<Option<Manifest>> {
        if path.is_dir() {
            return crate::dataset::dataset_manifest(path).map_err(to_trace_error);
        }
        read_manifest(path).map_err(to_trace_error)
    }
}

/// Installs [`ParquetFormat`] as the trace crate's external form (idempotent).
pub fn install() {
    moe_xray_trace::install_external_format(Box::new(ParquetFormat));
}

/// Converts routing-record traces (any form `TraceReader` reads in the records form: JSONL,
/// .gz, .zst, Parquet) to one Parquet file `out` written whole to a temporary file beside it and
/// renamed into place at the end (nothing is left on an error). `categories` fills the category
/// of records without one (prompt id -> category). Returns the number of rows.
pub fn convert_to_file(
    inputs: &[PathBuf],
    manifest: Option<&Manifest>,
    categories: Option<&HashMap<String, String>>,
    out: &Path,
) -> Result<u64> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".moe-xray-tmp-")
        .suffix(".parquet")
        .tempfile_in(&dir)
        .map_err(|e| Error::Io {
            path: dir.clone(),
            source: e,
        })?;
    let mut w = RecordsWriter::create(tmp.path(), manifest, true)?;
    let mut index = PromptIndex::default();
    for_each_record(inputs, categories, |r| {
        let i = index.of(&r.prompt_id);
        w.write(i, &r)
    })?;
    let rows = w.finish()?;
    // An ordinary output file (tempfile creates 0600 ones).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(
            |e| Error::Io {
                path: tmp.path().to_path_buf(),
                source: e,
            },
        )?;
    }
    tmp.persist(out).map_err(|e| Error::Io {
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(rows)
}

/// Calls `f` with every record of `inputs` in order (records form only; categories filled from
/// `categories` where a record has none).
pub fn for_each_record(
    inputs: &[PathBuf],
    categories: Option<&HashMap<String, String>>,
    mut f: impl FnMut(RoutingRecord) -> Result<()>,
) -> Result<()> {
    for p in inputs {
        let reader = moe_xray_trace::TraceReader::open(p).map_err(trace_to_error)?;
        for item in reader {
            let (line, item) = item.map_err(trace_to_error)?;
            let mut r = match item {
                TraceItem::Record(r) => r,
                other => {
                    return Err(invalid(
                        p,
                        format!(
                            "line {line}: holds {}; only routing records (`experts`) convert to Parquet",
                            other.form().name()
                        ),
                    ))
                }
            };
            if r.category.is_none() {
                if let Some(c) = categories.and_then(|m| m.get(&r.prompt_id)) {
                    r.category = Some(c.clone());
                }
            }
            f(r)?;
        }
    }
    Ok(())
}

/// A trace-crate error as this crate's (the message keeps its file and line).
pub fn trace_to_error(e: TraceError) -> Error {
    match e {
        TraceError::Io { path, source } => Error::Io { path, source },
        TraceError::Invalid {
            path,
            line,
            message,
        } => Error::Invalid {
            path,
            message: format!("line/row {line}: {message}"),
        },
        TraceError::InvalidFile { path, message } => Error::Invalid { path, message },
        TraceError::Sink(m) => Error::Invalid {
            path: PathBuf::from("."),
            message: m,
        },
    }
}
