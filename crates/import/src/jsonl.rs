//! Bounded JSONL reading and small JSON helpers shared by the importers.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use moe_xray_trace::Compression;

use crate::{ImportError, Result};

/// Longest accepted JSONL line (a response carrying routing for a long request is large).
pub const MAX_LINE: u64 = 1 << 30;

/// Calls `f(line_number, value)` for every non-blank line of `path` (lines count from 1).
/// Plain, gzip (`.jsonl.gz`, concatenated members allowed) or zstd (`.jsonl.zst`) text: the
/// compression is detected from the magic bytes and must match the file name, as for trace files
/// (`moe_xray_trace::Compression`); corrupt or truncated compressed data is an error naming the
/// file and the line being read.
pub fn for_each_line(path: &Path, mut f: impl FnMut(usize, Value) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let mut head = BufReader::with_capacity(1 << 16, file);
    let magic = head
        .fill_buf()
        .map_err(|e| ImportError::io(path, e))?
        .to_vec();
    let by_name = Compression::from_path(path);
    let compression = match Compression::from_magic(&magic) {
        Some(c) if c == by_name => c,
        Some(c) => {
            return Err(ImportError::invalid_file(
                path,
                format!(
                    "file name says {} but the content is {} data (rename the file to match its content)",
                    by_name.name(),
                    c.name()
                ),
            ))
        }
        None if by_name != Compression::None && !magic.is_empty() => {
            return Err(ImportError::invalid_file(
                path,
                format!(
                    "file name says {} but the content does not start with the {} magic bytes",
                    by_name.name(),
                    by_name.name()
                ),
            ))
        }
        None => Compression::None,
    };
    let mut r: Box<dyn BufRead> = match compression {
        Compression::None => Box::new(head),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(head),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            1 << 16,
            zstd::stream::read::Decoder::with_buffer(head).map_err(|e| ImportError::io(path, e))?,
        )),
    };
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = (&mut r)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| {
                ImportError::invalid(
                    path,
                    format!("line {}", line_no + 1),
                    format!("cannot read ({} data): {e}", compression.name()),
                )
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n as u64 > MAX_LINE {
            return Err(ImportError::invalid(
                path,
                format!("line {line_no}"),
                format!("line longer than {MAX_LINE} bytes"),
            ));
        }
        let complete = buf.last() == Some(&b'\n');
        let text = std::str::from_utf8(&buf).map_err(|_| {
            ImportError::invalid(path, format!("line {line_no}"), "not valid UTF-8")
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(text).map_err(|e| {
            let what = if complete {
                format!("malformed JSON: {e}")
            } else {
                format!("truncated last line: {e}")
            };
            ImportError::invalid(path, format!("line {line_no}"), what)
        })?;
        f(line_no, v)?;
    }
    if line_no == 0 {
        return Err(ImportError::invalid_file(path, "empty file"));
    }
    Ok(())
}

/// An optional non-negative integer field.
pub fn opt_usize(v: &Value, key: &str) -> std::result::Result<Option<usize>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("field {key}: expected a non-negative integer, found {x}")),
    }
}

/// An optional non-empty string field.
pub fn opt_string(v: &Value, key: &str) -> std::result::Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(x) => Err(format!(
            "field {key}: expected a non-empty string, found {x}"
        )),
    }
}

/// A nested JSON array `[rows][layers][k]` of integers → (flat values, rows, layers, k). The
/// inner dimensions come from the first row (or from `dims` when given) and every row must
/// match them.
pub fn array3(
    v: &Value,
    name: &str,
    dims: Option<(usize, usize)>,
) -> std::result::Result<(Vec<i64>, usize, usize, usize), String> {
    let rows = v
        .as_array()
        .ok_or_else(|| format!("{name}: expected an array [tokens][layers][top_k]"))?;
    let (mut layers, mut k) = dims.unwrap_or((0, 0));
    let mut out = Vec::new();
    for (t, row) in rows.iter().enumerate() {
        let ls = row
            .as_array()
            .ok_or_else(|| format!("{name}[{t}]: expected an array of layers"))?;
        if t == 0 && dims.is_none() {
            layers = ls.len();
        }
        if ls.len() != layers {
            return Err(format!(
                "wrong shape: {name}[{t}] has {} layers, expected {layers}",
                ls.len()
            ));
        }
        for (l, sel) in ls.iter().enumerate() {
            let es = sel
                .as_array()
                .ok_or_else(|| format!("{name}[{t}][{l}]: expected an array of expert ids"))?;
            if t == 0 && l == 0 && dims.is_none() {
                k = es.len();
            }
            if es.len() != k {
                return Err(format!(
                    "wrong shape: {name}[{t}][{l}] has {} experts, expected {k}",
                    es.len()
                ));
            }
            for x in es {
                out.push(
                    x.as_i64()
                        .filter(|&x| x >= i32::MIN as i64 && x <= i32::MAX as i64)
                        .ok_or_else(|| {
                            format!("{name}[{t}][{l}]: {x} is not an int32 expert id")
                        })?,
                );
            }
        }
    }
    Ok((out, rows.len(), layers, k))
}
