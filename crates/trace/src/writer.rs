//! Durable, resumable trace writers.
//!
//! A sink buffers the decisions of each prompt in memory; on `end_prompt` it appends the prompt's
//! lines in one write (plain), as one gzip member (`.gz`) or as one zstd frame (`.zst`, with
//! content checksum), then flushes and fsyncs the file. A process killed at any moment therefore
//! leaves the completed prompts intact plus at most one partial tail, which `open_resume` removes.
//!
//! Resume rules (see `docs/trace-format.md`):
//! - gzip / zstd: the file is scanned member by member (frame by frame); everything from the
//!   first member that cannot be decoded completely is cut off. Each complete member is one
//!   complete prompt (one item for [`JsonlAppender`]).
//! - plain: a partial last line is cut off. Events files cannot prove that the last prompt's block
//!   was written completely, so the last prompt's lines are cut off too and it is redone. Counts
//!   files write both token-type lines for every prompt, so the last prompt is kept when both
//!   are present. [`JsonlAppender`] items are single lines, so every complete line is kept.
//!
//! A complete unit (line or member) that does not parse is an error, never silently dropped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::reader::{Compression, CountsLine};
use crate::{Result, RoutingDecision, RoutingSink, TokenType, TraceError};

/// BufRead adapter that counts consumed bytes (to find member boundaries).
struct Counting<R> {
    inner: R,
    pos: u64,
}

impl<R: BufRead> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.pos += amt as u64;
        self.inner.consume(amt)
    }
}

/// One complete unit found while scanning a file for resume: a line (plain) or the decoded
/// content of a member (gzip / zstd), with its byte range in the file.
struct Unit {
    start: u64,
    end: u64,
    data: Vec<u8>,
}

/// Scans `path`; returns the complete units. A partial tail is not returned.
fn scan_units(path: &Path, compression: Compression) -> Result<Vec<Unit>> {
    let io = |e| TraceError::io(path, e);
    let f = File::open(path).map_err(io)?;
    let mut r = Counting {
        inner: BufReader::with_capacity(1 << 16, f),
        pos: 0,
    };
    let mut units = Vec::new();
    loop {
        let start = r.pos;
        if r.fill_buf().map_err(io)?.is_empty() {
            break;
        }
        let mut data = Vec::new();
        let ok = match compression {
            Compression::None => {
                r.read_until(b'\n', &mut data).map_err(io)?;
                data.last() == Some(&b'\n')
            }
            Compression::Gzip => {
                let mut d = flate2::bufread::GzDecoder::new(&mut r);
                d.read_to_end(&mut data).is_ok()
            }
            Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(&mut r) {
                Ok(d) => {
                    let mut d = d.single_frame();
                    d.read_to_end(&mut data).is_ok()
                }
                Err(_) => false,
            },
        };
        if !ok {
            break;
        }
        units.push(Unit {
            start,
            end: r.pos,
            data,
        });
    }
    Ok(units)
}

/// An append-only file of durable blocks.
struct BlockFile {
    path: PathBuf,
    file: File,
    compression: Compression,
    fsync: bool,
}

impl BlockFile {
    fn create(path: &Path) -> Result<BlockFile> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| TraceError::io(path, e))?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, file: File) -> Result<BlockFile> {
        file.sync_all().map_err(|e| TraceError::io(path, e))?;
        if let Some(dir) = path.parent() {
            crate::atomic::sync_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            });
        }
        Ok(BlockFile {
            path: path.to_path_buf(),
            file,
            compression: Compression::from_path(path),
            fsync: true,
        })
    }

    /// Opens for appending after cutting the file to `len` bytes.
    fn reopen_at(path: &Path, len: u64) -> Result<BlockFile> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TraceError::io(path, e))?;
        file.set_len(len).map_err(|e| TraceError::io(path, e))?;
        Self::from_file(path, file)
    }

    /// Scans an existing file for resume (missing file: no units). Checks the compression of
    /// a non-empty file against its name.
    fn scan(path: &Path) -> Result<Option<Vec<Unit>>> {
        if !path.exists() {
            return Ok(None);
        }
        let compression = Compression::from_path(path);
        let mut head = Vec::new();
        File::open(path)
            .and_then(|f| f.take(4).read_to_end(&mut head))
            .map_err(|e| TraceError::io(path, e))?;
        let magic = Compression::from_magic(&head);
        if head.len() >= 4 && magic.unwrap_or(Compression::None) != compression {
            return Err(TraceError::invalid_file(
                path,
                format!(
                    "cannot resume: file name says {} but the content is {}",
                    compression.name(),
                    magic.unwrap_or(Compression::None).name()
                ),
            ));
        }
        Ok(Some(scan_units(path, compression)?))
    }

    /// Appends one block durably (one write, one member/frame, then fsync).
    fn append(&mut self, data: &[u8]) -> Result<()> {
        let io = |e| TraceError::io(&self.path, e);
        let bytes: std::borrow::Cow<[u8]> = match self.compression {
            Compression::None => data.into(),
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(data).map_err(io)?;
                enc.finish().map_err(io)?.into()
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(io)?;
                enc.include_checksum(true).map_err(io)?;
                enc.write_all(data).map_err(io)?;
                enc.finish().map_err(io)?.into()
            }
        };
        self.file.write_all(&bytes).map_err(io)?;
        self.file.flush().map_err(io)?;
        if self.fsync {
            self.file.sync_data().map_err(io)?;
        }
        Ok(())
    }
}

/// Splits a unit's content into lines (each must end with '\n'), returning `(line, bytes)` with
/// line numbers counted over the decoded stream.
fn lines_of(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split_inclusive(|&b| b == b'\n')
        .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
}

#[derive(serde::Deserialize)]
struct IdOnly {
    prompt_id: String,
    token_type: Option<TokenType>,
}

/// Parses the prompt id of each line of a unit; errors name the file and the decoded line.
fn unit_prompt_ids(path: &Path, unit: &Unit, line0: &mut usize) -> Result<Vec<IdOnly>> {
    let mut out = Vec::new();
    for l in lines_of(&unit.data) {
        *line0 += 1;
        let id: IdOnly = serde_json::from_slice(l).map_err(|e| {
            TraceError::invalid(
                path,
                *line0,
                format!("cannot resume: unreadable line in a complete block: {e}"),
            )
        })?;
        out.push(id);
    }
    Ok(out)
}

/// Resume logic shared by the two routing writers. `group_complete(n_lines)` decides whether the
/// last prompt of a plain file is complete. Returns the kept length and completed prompt ids.
fn resume_prompts(
    path: &Path,
    units: &[Unit],
    compression: Compression,
    group_complete: impl Fn(&[IdOnly]) -> bool,
) -> Result<(u64, Vec<String>)> {
    let mut done: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut line = 0usize;
    let mut keep = 0u64;
    if compression != Compression::None {
        for u in units {
            let ids = unit_prompt_ids(path, u, &mut line)?;
            let Some(first) = ids.first() else {
                keep = u.end;
                continue;
            };
            if ids.iter().any(|i| i.prompt_id != first.prompt_id) {
                return Err(TraceError::invalid(
                    path,
                    line,
                    "cannot resume: a block holds lines of several prompts",
                ));
            }
            if !seen.insert(first.prompt_id.clone()) {
                return Err(TraceError::invalid(
                    path,
                    line,
                    format!(
                        "cannot resume: prompt '{}' is written twice",
                        first.prompt_id
                    ),
                ));
            }
            done.push(first.prompt_id.clone());
            keep = u.end;
        }
        return Ok((keep, done));
    }
    // Plain: group consecutive lines by prompt.
    let mut group: Vec<IdOnly> = Vec::new();
    let mut group_start = 0u64;
    for u in units {
        let mut ids = unit_prompt_ids(path, u, &mut line)?;
        let Some(id) = ids.pop() else {
            continue;
        };
        if group.first().is_some_and(|g| g.prompt_id != id.prompt_id) {
            let pid = group[0].prompt_id.clone();
            if !seen.insert(pid.clone()) {
                return Err(TraceError::invalid(
                    path,
                    line,
                    format!("cannot resume: prompt '{pid}' is written twice"),
                ));
            }
            done.push(pid);
            group.clear();
            keep = group_start;
        }
        if group.is_empty() {
            group_start = u.start;
        }
        group.push(id);
        keep = keep.max(group_start);
        let _ = u.end;
    }
    if let Some(first) = group.first() {
        if group_complete(&group) {
            if seen.insert(first.prompt_id.clone()) {
                done.push(first.prompt_id.clone());
            }
            keep = units.last().map_or(0, |u| u.end);
        } else {
            keep = group_start;
        }
    }
    Ok((keep, done))
}

/// Borrowed form of a `RoutingRecord` line (same field order), to serialise without copying.
#[derive(Serialize)]
struct RecordRef<'a> {
    prompt_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<&'a str>,
    layer: u32,
    position: u32,
    token_id: u32,
    token_type: TokenType,
    experts: &'a [u32],
    #[serde(skip_serializing_if = "<[f32]>::is_empty")]
    weights: &'a [f32],
    #[serde(skip_serializing_if = "Option::is_none")]
    probs: Option<&'a [f32]>,
}

/// Capture sink of `--mode events`: writes routing records (one line per prompt, layer,
/// position), one durable block per prompt.
pub struct EventsWriter {
    out: BlockFile,
    pending: HashMap<String, (Option<String>, Vec<u8>)>,
    record_probs: bool,
    prompts_written: usize,
}

impl EventsWriter {
    /// Creates (or truncates) `path`; compression from the extension (`.gz`, `.zst`).
    pub fn create(path: impl AsRef<Path>) -> Result<EventsWriter> {
        Ok(Self::new(BlockFile::create(path.as_ref())?))
    }

    /// Opens `path` for resuming: keeps its complete prompts, cuts a partial tail, and returns
    /// the ids of the completed prompts (to be skipped). A missing file is created.
    pub fn open_resume(path: impl AsRef<Path>) -> Result<(EventsWriter, Vec<String>)> {
        let path = path.as_ref();
        let Some(units) = BlockFile::scan(path)? else {
            return Ok((Self::create(path)?, Vec::new()));
        };
        // Plain events files cannot prove the last block complete: it is redone.
        let (keep, done) = resume_prompts(path, &units, Compression::from_path(path), |_| false)?;
        let mut w = Self::new(BlockFile::reopen_at(path, keep)?);
        w.prompts_written = done.len();
        Ok((w, done))
    }

    fn new(out: BlockFile) -> EventsWriter {
        EventsWriter {
            out,
            pending: HashMap::new(),
            record_probs: false,
            prompts_written: 0,
        }
    }

    /// Whether to fsync after every prompt (default true). Only turn it off for data that can be
    /// regenerated (synthetic benchmarks): without fsync a machine crash may lose prompts.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.out.fsync = fsync;
        self
    }

    /// Also record the full router distribution (`probs`) of every decision that carries it.
    pub fn with_probs(mut self, record_probs: bool) -> Self {
        self.record_probs = record_probs;
        self
    }

    pub fn path(&self) -> &Path {
        &self.out.path
    }

    /// Number of prompts in the file (including those kept by `open_resume`).
    pub fn prompts_written(&self) -> usize {
        self.prompts_written
    }

    /// Ids of prompts begun but not ended (their data is not in the file).
    pub fn unfinished(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pending.keys().cloned().collect();
        v.sort();
        v
    }
}

impl RoutingSink for EventsWriter {
    fn begin_prompt(&mut self, prompt_id: &str, category: Option<&str>) -> Result<()> {
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

    fn record(&mut self, d: &RoutingDecision<'_>) -> Result<()> {
        let (cat, buf) = self.pending.get_mut(d.prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "decision for prompt '{}' outside begin_prompt/end_prompt",
                d.prompt_id
            ))
        })?;
        let rec = RecordRef {
            prompt_id: d.prompt_id,
            category: cat.as_deref(),
            layer: d.layer,
            position: d.position,
            token_id: d.token_id,
            token_type: d.token_type,
            experts: d.experts,
            weights: d.weights,
            probs: if self.record_probs { d.probs } else { None },
        };
        serde_json::to_writer(&mut *buf, &rec)
            .map_err(|e| TraceError::Sink(format!("cannot serialise a record: {e}")))?;
        buf.push(b'\n');
        Ok(())
    }

    fn end_prompt(&mut self, prompt_id: &str) -> Result<()> {
        let (_, buf) = self.pending.remove(prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "end_prompt for prompt '{prompt_id}' that was not begun"
            ))
        })?;
        if !buf.is_empty() {
            self.out.append(&buf)?;
        }
        self.prompts_written += 1;
        Ok(())
    }

    fn wants_probs(&self) -> bool {
        self.record_probs
    }
}

/// (decisions per layer, counts L*E, weighted L*E, whether all decisions had weights)
type TypeCounts = (Vec<u64>, Vec<u64>, Vec<f64>, bool);

#[derive(Default)]
struct CountsAcc {
    category: Option<String>,
    /// Indexed by token type (prompt, generation).
    per_type: [TypeCounts; 2],
}

/// Capture sink of `--mode counts`: one line per (prompt, token type) with L×E counts (and
/// weighted counts when every decision carried weights), both token types always written.
pub struct CountsWriter {
    out: BlockFile,
    num_layers: usize,
    num_experts: usize,
    /// Per decoder layer: whether it is a dense layer (no router; its row stays zero).
    dense: Vec<bool>,
    pending: HashMap<String, CountsAcc>,
    prompts_written: usize,
}

impl CountsWriter {
    pub fn create(
        path: impl AsRef<Path>,
        num_layers: usize,
        num_experts: usize,
    ) -> Result<CountsWriter> {
        let path = path.as_ref();
        Self::check_dims(path, num_layers, num_experts)?;
        Ok(Self::new(BlockFile::create(path)?, num_layers, num_experts))
    }

    /// See [`EventsWriter::open_resume`]; plain counts files keep their last prompt when both of
    /// its lines are present.
    pub fn open_resume(
        path: impl AsRef<Path>,
        num_layers: usize,
        num_experts: usize,
    ) -> Result<(CountsWriter, Vec<String>)> {
        let path = path.as_ref();
        Self::check_dims(path, num_layers, num_experts)?;
        let Some(units) = BlockFile::scan(path)? else {
            return Ok((Self::create(path, num_layers, num_experts)?, Vec::new()));
        };
        let (keep, done) = resume_prompts(path, &units, Compression::from_path(path), |g| {
            g.len() == 2
                && g[0].token_type == Some(TokenType::Prompt)
                && g[1].token_type == Some(TokenType::Generation)
        })?;
        let mut w = Self::new(BlockFile::reopen_at(path, keep)?, num_layers, num_experts);
        w.prompts_written = done.len();
        Ok((w, done))
    }

    /// Before the file is created: dimensions of at least 1 and within [`crate::limits`] (they
    /// come from a model config; each prompt holds 2 × (L + 2·L·E) counters).
    fn check_dims(path: &Path, l: usize, e: usize) -> Result<()> {
        if l == 0 || e == 0 {
            return Err(TraceError::invalid_file(
                path,
                "counts writer needs num_layers and num_experts of at least 1",
            ));
        }
        crate::limits::check_dims(l, e, None)
            .map(|_| ())
            .map_err(|m| TraceError::invalid_file(path, format!("counts writer: {m}")))
    }

    fn new(out: BlockFile, num_layers: usize, num_experts: usize) -> CountsWriter {
        CountsWriter {
            out,
            num_layers,
            num_experts,
            dense: vec![false; num_layers],
            pending: HashMap::new(),
            prompts_written: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.out.path
    }

    pub fn prompts_written(&self) -> usize {
        self.prompts_written
    }

    /// Whether to fsync after every prompt (default true). Only turn it off for data that can be
    /// regenerated (synthetic benchmarks): without fsync a machine crash may lose prompts.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.out.fsync = fsync;
        self
    }

    /// The dense decoder layers (the manifest's `routing.dense_layers`): a decision there is an
    /// error, their rows of every counts line stay zero, and every prompt must have the same
    /// number of decisions at each of the other layers. Indices ≥ num_layers are errors.
    pub fn with_dense_layers(mut self, dense: &[u32]) -> Result<Self> {
        for &l in dense {
            match self.dense.get_mut(l as usize) {
                Some(d) => *d = true,
                None => {
                    return Err(TraceError::invalid_file(
                        &self.out.path,
                        format!(
                            "counts writer: dense layer {l} is not below num_layers = {}",
                            self.num_layers
                        ),
                    ))
                }
            }
        }
        if self.dense.iter().all(|&d| d) {
            return Err(TraceError::invalid_file(
                &self.out.path,
                "counts writer: every layer is dense (no MoE layer to count)",
            ));
        }
        Ok(self)
    }
}

impl RoutingSink for CountsWriter {
    fn begin_prompt(&mut self, prompt_id: &str, category: Option<&str>) -> Result<()> {
        if self.pending.contains_key(prompt_id) {
            return Err(TraceError::Sink(format!(
                "prompt '{prompt_id}' begun twice"
            )));
        }
        // Checked against the limits by `check_dims` when the writer was made.
        let (l, le) = (
            self.num_layers,
            self.num_layers.saturating_mul(self.num_experts),
        );
        let fresh = || (vec![0u64; l], vec![0u64; le], vec![0f64; le], true);
        self.pending.insert(
            prompt_id.to_string(),
            CountsAcc {
                category: category.map(str::to_string),
                per_type: [fresh(), fresh()],
            },
        );
        Ok(())
    }

    fn record(&mut self, d: &RoutingDecision<'_>) -> Result<()> {
        let (l, e) = (self.num_layers, self.num_experts);
        let acc = self.pending.get_mut(d.prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "decision for prompt '{}' outside begin_prompt/end_prompt",
                d.prompt_id
            ))
        })?;
        let layer = d.layer as usize;
        if layer >= l {
            return Err(TraceError::Sink(format!(
                "layer {layer} out of range (num_layers = {l})"
            )));
        }
        if self.dense[layer] {
            return Err(TraceError::Sink(format!(
                "layer {layer} is a dense layer (no router) but a routing decision was recorded there"
            )));
        }
        let t = match d.token_type {
            TokenType::Prompt => 0,
            TokenType::Generation => 1,
        };
        let (tok, counts, weighted, has_w) = &mut acc.per_type[t];
        let with_w = d.weights.len() == d.experts.len();
        for (i, &x) in d.experts.iter().enumerate() {
            let x = x as usize;
            if x >= e {
                return Err(TraceError::Sink(format!(
                    "expert {x} out of range (num_experts = {e})"
                )));
            }
            counts[layer * e + x] += 1;
            if with_w {
                weighted[layer * e + x] += d.weights[i] as f64;
            }
        }
        *has_w &= with_w;
        tok[layer] += 1;
        Ok(())
    }

    fn end_prompt(&mut self, prompt_id: &str) -> Result<()> {
        let acc = self.pending.remove(prompt_id).ok_or_else(|| {
            TraceError::Sink(format!(
                "end_prompt for prompt '{prompt_id}' that was not begun"
            ))
        })?;
        let mut buf = Vec::new();
        // weighted counts are written when every decision of the prompt carried weights
        // (the first MoE layer; `with_dense_layers` keeps at least one)
        let first = self.dense.iter().position(|&d| !d).unwrap_or(0);
        let any = acc.per_type.iter().any(|p| p.0[first] > 0);
        let all_w = any && acc.per_type.iter().all(|p| p.3);
        for (t, (tok, counts, weighted, _)) in acc.per_type.into_iter().enumerate() {
            let tokens = tok[first];
            if let Some(l) = (0..tok.len()).find(|&l| !self.dense[l] && tok[l] != tokens) {
                return Err(TraceError::Sink(format!(
                    "prompt '{prompt_id}': {} decisions at layer {l} but {tokens} at layer {first}",
                    tok[l]
                )));
            }
            let line = CountsLine {
                prompt_id: prompt_id.to_string(),
                category: acc.category.clone(),
                token_type: if t == 0 {
                    TokenType::Prompt
                } else {
                    TokenType::Generation
                },
                num_layers: self.num_layers,
                num_experts: self.num_experts,
                tokens,
                counts,
                weighted_counts: all_w.then_some(weighted),
            };
            serde_json::to_writer(&mut buf, &line)
                .map_err(|e| TraceError::Sink(format!("cannot serialise counts: {e}")))?;
            buf.push(b'\n');
        }
        self.out.append(&buf)?;
        self.prompts_written += 1;
        Ok(())
    }
}

/// Durable JSONL appender of arbitrary items (e.g. `generations.jsonl`): each `append` writes
/// one line (one gzip member / zstd frame when compressed) and fsyncs.
pub struct JsonlAppender<T> {
    out: BlockFile,
    _item: std::marker::PhantomData<fn(&T)>,
}

impl<T: Serialize> JsonlAppender<T> {
    pub fn create(path: impl AsRef<Path>) -> Result<JsonlAppender<T>> {
        Ok(JsonlAppender {
            out: BlockFile::create(path.as_ref())?,
            _item: std::marker::PhantomData,
        })
    }

    /// Opens for resuming: returns the complete items already in the file (a partial last line
    /// or member is cut off; a complete line that does not parse as `T` is an error). A missing
    /// file is created.
    pub fn open_resume(path: impl AsRef<Path>) -> Result<(JsonlAppender<T>, Vec<T>)>
    where
        T: DeserializeOwned,
    {
        let path = path.as_ref();
        let Some(units) = BlockFile::scan(path)? else {
            return Ok((Self::create(path)?, Vec::new()));
        };
        let mut items = Vec::new();
        let mut keep = 0;
        let mut line = 0usize;
        for u in &units {
            for l in lines_of(&u.data) {
                line += 1;
                let item: T = serde_json::from_slice(l)
                    .map_err(|e| TraceError::invalid(path, line, format!("cannot resume: {e}")))?;
                items.push(item);
            }
            keep = u.end;
        }
        Ok((
            JsonlAppender {
                out: BlockFile::reopen_at(path, keep)?,
                _item: std::marker::PhantomData,
            },
            items,
        ))
    }

    /// Whether to fsync after every prompt (default true). Only turn it off for data that can be
    /// regenerated (synthetic benchmarks): without fsync a machine crash may lose prompts.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.out.fsync = fsync;
        self
    }

    /// Appends one item durably.
    pub fn append(&mut self, item: &T) -> Result<()> {
        let mut buf = serde_json::to_vec(item).map_err(|e| {
            TraceError::invalid_file(&self.out.path, format!("cannot serialise an item: {e}"))
        })?;
        buf.push(b'\n');
        self.out.append(&buf)
    }

    pub fn path(&self) -> &Path {
        &self.out.path
    }
}
