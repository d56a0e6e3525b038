//! Hive-partitioned Parquet datasets of routing records:
//! `ROOT/run=<name>/category=<category>/part-<N>.parquet`.
//!
//! The partition columns (`run`, `category`) are only in the path, never in the files, so DuckDB,
//! polars, pandas (pyarrow) and Spark read the dataset directly with the partition columns
//! restored. Partition values are escaped as Hive does (`%XX` for `/ = % : ? # * " ' \ ^ [ ] {`,
//! control characters and DEL); a record without a category goes to the Hive null partition
//! `category=__HIVE_DEFAULT_PARTITION__`. Each part has the columns of
//! [`crate::trace_io::records_schema`] without `category`, and the manifest in its metadata.
//!
//! Reading a dataset back merges the category partitions by `prompt_index` (the prompt's order of
//! first appearance in the trace it was written from), streaming with one open part per category,
//! so `analyze` / `health` / `compare` / `map` see the prompts in the original order and give the
//! same results as on the original trace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_xray_trace::{ExternalItems, Manifest, RoutingRecord, TraceError, TraceItem};

use crate::trace_io::{for_each_record, read_manifest, FileRows, PromptIndex, RecordsWriter};
use crate::{Error, Result};

/// Hive's name of the partition of null values.
pub const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";
/// Most category partitions read or written (each is one open file while reading).
pub const MAX_PARTITIONS: usize = 512;
/// Most part files in one category partition.
pub const MAX_PARTS: usize = 1_000_000;
/// Default rows per part file when writing.
pub const DEFAULT_ROWS_PER_PART: u64 = 4_000_000;

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Escapes a partition value as Hive does.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let special = (c as u32) < 0x20
            || c == '\u{7f}'
            || matches!(
                c,
                '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '^' | '[' | ']' | '{'
            );
        if special {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Undoes [`escape`]; `None` for malformed escapes.
pub fn unescape(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The value of a `key=value` path component, unescaped (`Some(None)`: the null partition).
fn partition_value(path: &Path, key: &str) -> Result<Option<Option<String>>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let Some(v) = name.strip_prefix(key).and_then(|r| r.strip_prefix('=')) else {
        return Ok(None);
    };
    if v == HIVE_NULL {
        return Ok(Some(None));
    }
    match unescape(v) {
        Some(s) => Ok(Some(Some(s))),
        None => Err(invalid(
            path,
            format!("malformed escape in the partition directory name `{name}`"),
        )),
    }
}

/// The category of a dataset part from its parent directory `category=<value>` (`None` when the
/// parent is not a category partition).
pub fn category_of_path(file: &Path) -> Result<Option<Option<String>>> {
    match file.parent() {
        Some(p) => partition_value(p, "category"),
        None => Ok(None),
    }
}

fn subdirs_with(dir: &Path, key: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let prefix = format!("{key}=");
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = entry.map_err(io(dir))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && p.is_dir() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `dir` is a dataset root (`run=` sub-directories) or one run of it (`category=`
/// sub-directories).
pub fn is_dataset_dir(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        (name.starts_with("run=") || name.starts_with("category=")) && e.path().is_dir()
    })
}

/// The category partitions of a dataset directory (a root with exactly one `run=`, or a run
/// directory) and their part files, in order.
fn partitions(dir: &Path) -> Result<Vec<(Option<String>, Vec<PathBuf>)>> {
    let runs = subdirs_with(dir, "run")?;
    let run_dir = match runs.as_slice() {
        [] => dir.to_path_buf(),
        [one] => one.clone(),
        many => {
            let names: Vec<String> = many
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            return Err(invalid(
                dir,
                format!(
                    "the dataset holds {} runs ({}); name one run directory, e.g. {}",
                    names.len(),
                    names.join(", "),
                    many[0].display()
                ),
            ));
        }
    };
    let cats = subdirs_with(&run_dir, "category")?;
    if cats.is_empty() {
        return Err(invalid(
            &run_dir,
            "no category=<value> partition directories (expected run=<name>/category=<value>/part-<N>.parquet)",
        ));
    }
    if cats.len() > MAX_PARTITIONS {
        return Err(invalid(
            &run_dir,
            format!(
                "{} category partitions, more than the supported {MAX_PARTITIONS}",
                cats.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(cats.len());
    for c in cats {
        let cat = partition_value(&c, "category")?.unwrap_or(None);
        let mut parts = Vec::new();
        for entry in std::fs::read_dir(&c).map_err(io(&c))? {
            let p = entry.map_err(io(&c))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name.starts_with('_') || !name.ends_with(".parquet") {
                continue;
            }
            if p.is_file() {
                parts.push(p);
            }
            if parts.len() > MAX_PARTS {
                return Err(invalid(
                    &c,
                    format!("more than the supported {MAX_PARTS} part files"),
                ));
            }
        }
        // part-2 before part-10: by the number in `part-<N>`, then by name.
        parts.sort_by_key(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            let n = name
                .strip_prefix("part-")
                .and_then(|r| r.strip_suffix(".parquet"))
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            (n, name)
        });
        if parts.is_empty() {
            return Err(invalid(&c, "partition without any .parquet part file"));
        }
        out.push((cat, parts));
    }
    Ok(out)
}

/// The manifest of a dataset: every part's metadata must hold the same one (or none at all).
/// Parts whose dimensions differ are an error naming the part and the field.
pub fn dataset_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let mut first: Option<(Option<Manifest>, PathBuf)> = None;
    for (_, parts) in partitions(dir)? {
        for p in parts {
            let m = read_manifest(&p)?;
            match &first {
                None => first = Some((m, p)),
                Some((m0, p0)) => check_same_manifest(&p, m.as_ref(), p0, m0.as_ref())?,
            }
        }
    }
    Ok(first.and_then(|(m, _)| m))
}

fn check_same_manifest(
    p: &Path,
    m: Option<&Manifest>,
    p0: &Path,
    m0: Option<&Manifest>,
) -> Result<()> {
    let (m, m0) = match (m, m0) {
        (None, None) => return Ok(()),
        (Some(m), Some(m0)) => (m, m0),
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                p,
                format!(
                    "metadata `{}`: present in only one of this part and {}",
                    crate::trace_io::MANIFEST_KEY,
                    p0.display()
                ),
            ))
        }
    };
    let fields: [(&str, String, String); 4] = [
        (
            "num_layers",
            m.num_layers.to_string(),
            m0.num_layers.to_string(),
        ),
        (
            "num_experts",
            m.num_experts.to_string(),
            m0.num_experts.to_string(),
        ),
        ("top_k", m.top_k.to_string(), m0.top_k.to_string()),
        (
            "routing.moe_layers",
            format!("{:?}", m.moe_layers()),
            format!("{:?}", m0.moe_layers()),
        ),
    ];
    for (name, a, b) in fields {
        if a != b {
            return Err(invalid(
                p,
                format!(
                    "mixed dimensions in the dataset: manifest {name} = {a} here but {b} in {}",
                    p0.display()
                ),
            ));
        }
    }
    if m != m0 {
        return Err(invalid(
            p,
            format!(
                "metadata `{}` differs from the manifest of {} (parts of one run have one manifest)",
                crate::trace_io::MANIFEST_KEY,
                p0.display()
            ),
        ));
    }
    Ok(())
}

/// One category partition: its parts read one after the other, with the next row peeked.
struct Chain {
    category: Option<String>,
    parts: Vec<PathBuf>,
    next_part: usize,
    cur: Option<FileRows>,
    head: Option<(usize, u32, RoutingRecord, PathBuf)>,
}

impl Chain {
    fn advance(&mut self) -> moe_xray_trace::Result<()> {
        self.head = None;
        loop {
            if let Some(f) = self.cur.as_mut() {
                if let Some((row, idx, rec)) = f.next_row()? {
                    let Some(idx) = idx else {
                        return Err(TraceError::invalid_file(
                            f.path(),
                            "missing column `prompt_index` (the parts of a dataset need it to restore the prompt order)",
                        ));
                    };
                    self.head = Some((row, idx, rec, f.path().to_path_buf()));
                    return Ok(());
                }
                self.cur = None;
            }
            let Some(p) = self.parts.get(self.next_part) else {
                return Ok(());
            };
            self.next_part += 1;
            let f = FileRows::open(p, Some(self.category.clone())).map_err(to_trace)?;
            if !f.has_index() {
                return Err(TraceError::invalid_file(
                    p,
                    "missing column `prompt_index` (the parts of a dataset need it to restore the prompt order)",
                ));
            }
            self.cur = Some(f);
        }
    }
}

fn to_trace(e: Error) -> TraceError {
    match e {
        Error::Io { path, source } => TraceError::io(path, source),
        Error::Invalid { path, message } => TraceError::invalid_file(path, message),
    }
}

/// The rows of a dataset, merged across category partitions by `prompt_index`.
pub struct DatasetRows {
    chains: Vec<Chain>,
    source: PathBuf,
    started: bool,
}

impl DatasetRows {
    /// Opens a dataset root (one `run=`) or run directory; checks that all parts agree on the
    /// manifest (see [`dataset_manifest`]).
    pub fn open(dir: &Path) -> Result<DatasetRows> {
        dataset_manifest(dir)?;
        let chains = partitions(dir)?
            .into_iter()
            .map(|(category, parts)| Chain {
                category,
                parts,
                next_part: 0,
                cur: None,
                head: None,
            })
            .collect();
        Ok(DatasetRows {
            chains,
            source: dir.to_path_buf(),
            started: false,
        })
    }
}

impl ExternalItems for DatasetRows {
    fn next_item(&mut self) -> moe_xray_trace::Result<Option<(usize, TraceItem)>> {
        if !self.started {
            self.started = true;
            for c in self.chains.iter_mut() {
                c.advance()?;
            }
        }
        let mut best: Option<(usize, u32)> = None;
        for (i, c) in self.chains.iter().enumerate() {
            if let Some((_, idx, _, _)) = &c.head {
                if best.is_none_or(|(_, b)| *idx < b) {
                    best = Some((i, *idx));
                }
            }
        }
        let Some((i, _)) = best else {
            return Ok(None);
        };
        let chain = &mut self.chains[i];
        let Some((row, _, rec, src)) = chain.head.take() else {
            return Ok(None);
        };
        self.source = src;
        chain.advance()?;
        Ok(Some((row, TraceItem::Record(rec))))
    }

    fn source(&self) -> &Path {
        &self.source
    }
}

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    pub rows: u64,
    pub prompts: usize,
    pub partitions: usize,
    pub parts: usize,
}

/// Writes the routing records of `inputs` as the dataset `out/run=<run>/category=<c>/part-<N>.parquet`
/// (a new part after `rows_per_part` rows). Everything is written to a staging directory beside
/// `out` and renamed into place at the end, so `out` appears complete or not at all; `out` must
/// not exist or be an empty directory. `categories` fills the category of records without one.
pub fn write_dataset(
    inputs: &[PathBuf],
    manifest: Option<&Manifest>,
    categories: Option<&HashMap<String, String>>,
    out: &Path,
    run: &str,
    rows_per_part: u64,
) -> Result<DatasetSummary> {
    if run.is_empty() {
        return Err(invalid(out, "empty run name"));
    }
    if rows_per_part == 0 {
        return Err(invalid(out, "rows per part must be at least 1"));
    }
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !empty {
            return Err(invalid(
                out,
                "already exists (the dataset is written to a new or empty directory)",
            ));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = tempfile::Builder::new()
        .prefix(".moe-xray-staging-")
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    let run_dir = staging.path().join(format!("run={}", escape(run)));
    struct Open {
        writer: RecordsWriter,
        part: u64,
        rows: u64,
    }
    let mut writers: HashMap<Option<String>, Open> = HashMap::new();
    let mut index = PromptIndex::default();
    let mut parts = 0usize;
    let mut rows = 0u64;
    let new_part = |cat: &Option<String>, part: u64| -> Result<RecordsWriter> {
        let name = match cat {
            Some(c) => escape(c),
            None => HIVE_NULL.to_string(),
        };
        let d = run_dir.join(format!("category={name}"));
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        RecordsWriter::create(d.join(format!("part-{part}.parquet")), manifest, false)
    };
    for_each_record(inputs, categories, |r| {
        if r.category.as_deref() == Some("") {
            return Err(invalid(
                &inputs[0],
                format!(
                    "prompt '{}' has an empty category, which a Hive partition cannot hold",
                    r.prompt_id
                ),
            ));
        }
        let i = index.of(&r.prompt_id);
        if !writers.contains_key(&r.category) {
            if writers.len() >= MAX_PARTITIONS {
                return Err(invalid(
                    out,
                    format!("more than {MAX_PARTITIONS} categories"),
                ));
            }
            let w = new_part(&r.category, 0)?;
            parts += 1;
            writers.insert(
                r.category.clone(),
                Open {
                    writer: w,
                    part: 0,
                    rows: 0,
                },
            );
        }
        let Some(o) = writers.get_mut(&r.category) else {
            return Err(invalid(out, "internal: partition writer missing"));
        };
        if o.rows >= rows_per_part {
            let next = new_part(&r.category, o.part + 1)?;
            let old = std::mem::replace(&mut o.writer, next);
            old.finish()?;
            o.part += 1;
            o.rows = 0;
            parts += 1;
        }
        o.writer.write(i, &r)?;
        o.rows += 1;
        rows += 1;
        Ok(())
    })?;
    if rows == 0 {
        return Err(invalid(&inputs[0], "no routing records to write"));
    }
    let partitions = writers.len();
    // Finish in a fixed order (the files are the same whatever the order; errors are not).
    let mut open: Vec<(Option<String>, Open)> = writers.into_iter().collect();
    open.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, o) in open {
        o.writer.finish()?;
    }
    // An ordinary directory (tempfile creates 0700 ones).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io(staging.path()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        Error::Io {
            path: out.to_path_buf(),
            source: e,
        }
    })?;
    Ok(DatasetSummary {
        rows,
        prompts: index.len(),
        partitions,
        parts,
    })
}
