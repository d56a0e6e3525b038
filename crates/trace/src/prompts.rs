//! Prompt files: JSONL (`{"id", "category", "text"}` per line) or CSV with the header
//! `id,category,text` (any column order; parsed with the `csv` crate, so quoted fields may
//! contain commas and newlines).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Result, TraceError};

/// One prompt of a prompt set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub category: String,
    pub text: String,
}

#[derive(Deserialize)]
struct RawPrompt {
    id: Option<serde_json::Value>,
    category: Option<String>,
    text: Option<String>,
}

/// Reads a prompt file; `.csv` files are CSV, everything else JSONL. Errors (with file and line):
/// empty file, malformed line, missing `id` / `category` / `text`, empty id or text, duplicate id.
/// Blank lines in JSONL are skipped.
pub fn read_prompts(path: impl AsRef<Path>) -> Result<Vec<Prompt>> {
    let path = path.as_ref();
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let prompts = if is_csv {
        read_csv(path)?
    } else {
        read_jsonl(path)?
    };
    if prompts.is_empty() {
        return Err(TraceError::invalid_file(
            path,
            "empty prompt file (no prompts)",
        ));
    }
    Ok(prompts)
}

fn check(path: &Path, line: usize, raw: RawPrompt, seen: &mut HashSet<String>) -> Result<Prompt> {
    let err = |m: String| TraceError::invalid(path, line, m);
    let id = match raw.id {
        None | Some(serde_json::Value::Null) => return Err(err("missing field `id`".into())),
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => return Err(err(format!("`id` must be a string, found {other}"))),
    };
    if id.trim().is_empty() {
        return Err(err("empty `id`".into()));
    }
    let category = raw
        .category
        .ok_or_else(|| err(format!("prompt '{id}': missing field `category`")))?;
    if category.trim().is_empty() {
        return Err(err(format!("prompt '{id}': empty `category`")));
    }
    let text = raw
        .text
        .ok_or_else(|| err(format!("prompt '{id}': missing field `text`")))?;
    if text.trim().is_empty() {
        return Err(err(format!("prompt '{id}': empty `text`")));
    }
    if !seen.insert(id.clone()) {
        return Err(err(format!("duplicate prompt id '{id}'")));
    }
    Ok(Prompt { id, category, text })
}

fn read_jsonl(path: &Path) -> Result<Vec<Prompt>> {
    let f = std::fs::File::open(path).map_err(|e| TraceError::io(path, e))?;
    let mut r = std::io::BufReader::new(f);
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| TraceError::io(path, e))?;
        if n == 0 {
            break;
        }
        line += 1;
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let raw: RawPrompt = serde_json::from_slice(&buf).map_err(|e| {
            let trunc = if buf.last() != Some(&b'\n') {
                "truncated last line: "
            } else {
                ""
            };
            TraceError::invalid(path, line, format!("{trunc}invalid prompt JSON: {e}"))
        })?;
        out.push(check(path, line, raw, &mut seen)?);
    }
    Ok(out)
}

/// Checks the RFC 4180 quoting that the `csv` crate accepts leniently: a quoted field must be
/// closed before the end of the file (otherwise every following prompt would silently become part
/// of its text), and a closing quote must be followed by a comma, a line end or the end of the
/// file (`"a"b` is not a field). Returns the 1-based line and a message for the first violation.
fn check_csv_quoting(bytes: &[u8]) -> std::result::Result<(), (usize, String)> {
    #[derive(Clone, Copy)]
    enum S {
        /// At the start of a field (or of a record).
        Start,
        /// Inside an unquoted field (quotes there are literal, as in the `csv` crate).
        Field,
        /// Inside a quoted field.
        Quoted,
        /// After a quote inside a quoted field: either `""` (a literal quote) or the end of it.
        AfterQuote,
    }
    let mut s = S::Start;
    let mut line = 1usize;
    let mut opened = 0usize;
    for &b in bytes {
        let sep = matches!(b, b',' | b'\n' | b'\r');
        s = match s {
            S::Start if b == b'"' => {
                opened = line;
                S::Quoted
            }
            S::Start | S::Field => {
                if sep {
                    S::Start
                } else {
                    S::Field
                }
            }
            S::Quoted => {
                if b == b'"' {
                    S::AfterQuote
                } else {
                    S::Quoted
                }
            }
            S::AfterQuote if b == b'"' => S::Quoted,
            S::AfterQuote if sep => S::Start,
            S::AfterQuote => {
                return Err((
                    line,
                    format!(
                        "text after the closing quote of the field opened at line {opened} (a quote inside a quoted field must be doubled: \"\")"
                    ),
                ))
            }
        };
        if b == b'\n' {
            line += 1;
        }
    }
    if let S::Quoted = s {
        return Err((
            opened,
            "unclosed quote: the quoted field opened here runs to the end of the file".into(),
        ));
    }
    Ok(())
}

fn read_csv(path: &Path) -> Result<Vec<Prompt>> {
    let bytes = std::fs::read(path).map_err(|e| TraceError::io(path, e))?;
    check_csv_quoting(&bytes).map_err(|(line, m)| TraceError::invalid(path, line, m))?;
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes.as_slice());
    let headers = r
        .headers()
        .map_err(|e| TraceError::invalid(path, 1, format!("invalid CSV header: {e}")))?
        .clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].trim().is_empty()) {
        return Err(TraceError::invalid_file(
            path,
            "empty prompt file (no CSV header)",
        ));
    }
    for need in ["id", "category", "text"] {
        if !headers.iter().any(|h| h.trim() == need) {
            return Err(TraceError::invalid(
                path,
                1,
                format!("CSV header must contain id,category,text; `{need}` is missing"),
            ));
        }
    }
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (ci, cc, ct) = (col("id"), col("category"), col("text"));
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            TraceError::invalid(path, line, format!("invalid CSV record: {e}"))
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let get = |c: Option<usize>| c.and_then(|i| rec.get(i)).map(str::to_string);
        let raw = RawPrompt {
            id: get(ci).map(serde_json::Value::String),
            category: get(cc),
            text: get(ct),
        };
        out.push(check(path, line, raw, &mut seen)?);
    }
    Ok(out)
}

/// SHA-256 (lower-case hex) of the canonical serialisation of a prompt set: the prompts sorted by
/// `id` (byte order), each written as the compact JSON array `[id, category, text]` (serde_json
/// string escaping) followed by `\n`. The hash therefore ignores file format (JSONL/CSV), field
/// order and prompt order, but changes with any id, category or text.
pub fn prompt_set_hash(prompts: &[Prompt]) -> String {
    let mut sorted: Vec<&Prompt> = prompts.iter().collect();
    sorted.sort_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
    let mut h = Sha256::new();
    for p in sorted {
        // Serialising strings cannot fail; an empty line would still make the hash differ.
        let line = serde_json::to_string(&[&p.id, &p.category, &p.text]).unwrap_or_default();
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, s: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, s).unwrap();
        p
    }

    #[test]
    fn jsonl_and_csv_agree_and_hash_is_order_independent() {
        let d = tempfile::tempdir().unwrap();
        let j = write(
            &d,
            "p.jsonl",
            "{\"id\":\"a\",\"category\":\"code\",\"text\":\"x, y\"}\n\n{\"text\":\"z\",\"id\":\"b\",\"category\":\"math\"}\n",
        );
        let c = write(&d, "p.csv", "category,id,text\nmath,b,z\ncode,a,\"x, y\"\n");
        let pj = read_prompts(&j).unwrap();
        let pc = read_prompts(&c).unwrap();
        assert_eq!(pj.len(), 2);
        assert_eq!(pj[0].text, "x, y");
        assert_eq!(pc[0].id, "b");
        assert_eq!(prompt_set_hash(&pj), prompt_set_hash(&pc));
        assert_eq!(prompt_set_hash(&pj).len(), 64);
        let mut changed = pj.clone();
        changed[0].text.push('!');
        assert_ne!(prompt_set_hash(&pj), prompt_set_hash(&changed));
    }

    #[test]
    fn csv_quoting_that_rfc_4180_allows_is_accepted() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "ok.csv",
            "id,category,text\r\na,c,\"multi\r\nline, \"\"quoted\"\"\"\r\nb,c,plain \"inner\" quotes\r\nc,c,\"\"\"\"\n",
        );
        let ps = read_prompts(&p).unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[0].text, "multi\r\nline, \"quoted\"");
        assert_eq!(ps[1].text, "plain \"inner\" quotes");
        assert_eq!(ps[2].text, "\"");
    }

    #[test]
    fn hash_of_known_input() {
        // sha256 of `["a","c","t"]\n` computed independently (Python hashlib).
        let p = vec![Prompt {
            id: "a".into(),
            category: "c".into(),
            text: "t".into(),
        }];
        assert_eq!(
            prompt_set_hash(&p),
            "efb2eba3de3d772b7573209b6ceb362fd3b970910bfb6ef511edfcc6fd835c64"
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("e.jsonl", "", "empty prompt file"),
            ("e.csv", "", "empty prompt file"),
            ("h.csv", "id,text\na,b\n", "`category` is missing"),
            (
                "d.jsonl",
                "{\"id\":\"a\",\"category\":\"c\",\"text\":\"t\"}\n{\"id\":\"a\",\"category\":\"c\",\"text\":\"u\"}\n",
                "p:2: duplicate prompt id 'a'",
            ),
            ("d.csv", "id,category,text\na,c,t\na,c,u\n", ":3: duplicate prompt id"),
            ("m.jsonl", "{\"id\":\"a\",\"text\":\"t\"}\n", ":1: prompt 'a': missing field `category`"),
            ("t.jsonl", "{\"id\":\"a\",\"category\":\"c\",\"text\":\"  \"}\n", ":1: prompt 'a': empty `text`"),
            ("t.csv", "id,category,text\na,c,\n", ":2: prompt 'a': empty `text`"),
            ("j.jsonl", "{\"id\":\"a\",\"category\":\"c\",\"text\":\"t\"}\n{oops}\n", ":2: invalid prompt JSON"),
            ("x.jsonl", "{\"id\":\"a\",\"category\":\"c\",\"text\":\"t\"}\n{\"id\":\"b\",", ":2: truncated last line"),
            ("r.csv", "id,category,text\na,c\n", ":2: invalid CSV record"),
            (
                "q.csv",
                "id,category,text\na,c,\"hello\nb,c,world\n",
                ":2: unclosed quote",
            ),
            (
                "q2.csv",
                "id,category,text\na,c,\"hello\nb,c,\"world\"\n",
                ":3: text after the closing quote of the field opened at line 2",
            ),
            ("q3.csv", "id,category,text\na,c,\"x\"y\n", ":2: text after the closing quote"),
        ];
        for (name, content, needle) in cases {
            let p = write(&d, name, content);
            let msg = read_prompts(&p).unwrap_err().to_string();
            let needle = needle.replace("p:2", &format!("{name}:2"));
            assert!(msg.contains(name), "{name}: {msg}");
            assert!(
                msg.contains(&needle),
                "{name}: expected {needle:?} in {msg}"
            );
        }
    }
}
