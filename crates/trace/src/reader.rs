//! Streaming trace reader: `.jsonl`, `.jsonl.gz` (concatenated gzip members) and `.jsonl.zst`
//! (concatenated zstd frames), in any of the three line forms of `docs/trace-format.md`.
//!
//! The reader holds one line in memory at a time. It validates everything that can be checked on
//! a single line (plus the file-wide form, top-k and dimensions); checks that need state per
//! prompt (duplicates, category conflicts) are done by [`crate::counts`].

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::limits::{check_dims, MAX_EXPERTS, MAX_LINE_BYTES};
use crate::{Result, RoutingRecord, TokenType, TraceError};

/// Compression of a trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// Compression implied by the file name: `.gz` → gzip, `.zst`/`.zstd` → zstd, else none.
    pub fn from_path(path: impl AsRef<Path>) -> Compression {
        let ext = path
            .as_ref()
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("gz") | Some("gzip") => Compression::Gzip,
            Some("zst") | Some("zstd") => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// Compression implied by the first bytes of a file, if they are a gzip or zstd magic.
    pub fn from_magic(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&ZSTD_MAGIC) {
            Some(Compression::Zstd)
        } else if head.starts_with(&GZIP_MAGIC) {
            Some(Compression::Gzip)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The paper's flat event form: one line per (prompt, layer, position, expert).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatEvent {
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub layer: u32,
    pub position: u32,
    pub expert: u32,
    pub token_type: TokenType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u32>,
    /// Full-softmax router probability of `expert` (see `RoutingRecord::weights`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

/// A counts-mode line: L×E selection counts of one (prompt, token type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountsLine {
    pub prompt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub token_type: TokenType,
    pub num_layers: usize,
    pub num_experts: usize,
    /// Number of tokens of this type (each token has one routing decision per layer).
    pub tokens: u64,
    /// L*E counts, layer-major (`l * E + e`).
    pub counts: Vec<u64>,
    /// L*E sums of router weights, layer-major (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_counts: Option<Vec<f64>>,
}

/// One parsed trace line.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceItem {
    Record(RoutingRecord),
    Event(FlatEvent),
    Counts(CountsLine),
}

impl TraceItem {
    pub fn prompt_id(&self) -> &str {
        match self {
            TraceItem::Record(r) => &r.prompt_id,
            TraceItem::Event(e) => &e.prompt_id,
            TraceItem::Counts(c) => &c.prompt_id,
        }
    }
    pub fn category(&self) -> Option<&str> {
        match self {
            TraceItem::Record(r) => r.category.as_deref(),
            TraceItem::Event(e) => e.category.as_deref(),
            TraceItem::Counts(c) => c.category.as_deref(),
        }
    }
    pub fn token_type(&self) -> TokenType {
        match self {
            TraceItem::Record(r) => r.token_type,
            TraceItem::Event(e) => e.token_type,
            TraceItem::Counts(c) => c.token_type,
        }
    }
    pub fn form(&self) -> TraceForm {
        match self {
            TraceItem::Record(_) => TraceForm::Records,
            TraceItem::Event(_) => TraceForm::Events,
            TraceItem::Counts(_) => TraceForm::Counts,
        }
    }
}

/// The line form of a trace file (one per file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceForm {
    /// `experts`: one line per (prompt, layer, position).
    Records,
    /// `expert`: one line per routing event.
    Events,
    /// `counts`: one line per (prompt, token type).
    Counts,
}

impl TraceForm {
    pub fn name(self) -> &'static str {
        match self {
            TraceForm::Records => "routing records (`experts`)",
            TraceForm::Events => "flat events (`expert`)",
            TraceForm::Counts => "counts lines (`counts`)",
        }
    }
}

/// Items of a trace form that another crate parses (Parquet files and datasets: crate
/// `moe-xray-parquet`), so that this crate needs no columnar dependencies. Every item is checked
/// by [`TraceReader`] exactly as a JSONL line with the same fields; `row` plays the line's part
/// in messages.
pub trait ExternalItems {
    /// The next `(row from 1, item)`, or `None` at the end.
    fn next_item(&mut self) -> Result<Option<(usize, TraceItem)>>;
    /// The file the last item came from (a part of a dataset), named in messages.
    fn source(&self) -> &Path;
}

/// A trace form read by another crate, installed once per process with
/// [`install_external_format`] (the pipeline installs the Parquet reader).
pub trait ExternalFormat: Send + Sync {
    /// Whether `path` is in this form: a file whose first bytes are `head`, or a directory
    /// (`head` empty).
    fn claims(&self, path: &Path, head: &[u8]) -> bool;
    /// Opens `path` (claimed before) as a stream of items.
    fn open(&self, path: &Path) -> Result<Box<dyn ExternalItems>>;
    /// The manifest stored in `path` itself (e.g. Parquet key-value metadata), if any.
    fn manifest(&self, path: &Path) -> Result<Option<crate::Manifest>>;
}

static EXTERNAL: OnceLock<Box<dyn ExternalFormat>> = OnceLock::new();

/// Installs the reader of an external trace form (once per process; later calls are ignored and
/// return `false`).
pub fn install_external_format(f: Box<dyn ExternalFormat>) -> bool {
    EXTERNAL.set(f).is_ok()
}

/// Magic bytes at the start (and end) of a Parquet file.
const PARQUET_MAGIC: [u8; 4] = *b"PAR1";

/// The installed external form that claims `path` (a directory, or a file by its first bytes).
pub fn external_format_of(path: &Path) -> Option<&'static dyn ExternalFormat> {
    let f = EXTERNAL.get()?;
    if path.is_dir() {
        return f.claims(path, &[]).then_some(f.as_ref());
    }
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).ok()?;
    let n = file.read(&mut head).ok()?;
    f.claims(path, &head[..n]).then_some(f.as_ref())
}

/// All fields any line form may have; parsed first so that errors can be specific.
#[derive(Deserialize)]
struct RawLine {
    prompt_id: Option<String>,
    category: Option<String>,
    layer: Option<i64>,
    position: Option<i64>,
    token_id: Option<i64>,
    token_type: Option<String>,
    experts: Option<Vec<i64>>,
    expert: Option<i64>,
    weights: Option<Vec<f64>>,
    weight: Option<f64>,
    probs: Option<Vec<f64>>,
    num_layers: Option<i64>,
    num_experts: Option<i64>,
    tokens: Option<i64>,
    counts: Option<Vec<i64>>,
    weighted_counts: Option<Vec<f64>>,
}

impl RawLine {
    /// The fields of an item parsed elsewhere, to be checked like a JSONL line.
    fn from_item(item: TraceItem) -> RawLine {
        let ints = |v: Vec<u32>| v.into_iter().map(i64::from).collect();
        let floats = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
        let mut raw = RawLine {
            prompt_id: None,
            category: None,
            layer: None,
            position: None,
            token_id: None,
            token_type: Some(item.token_type().as_str().to_string()),
            experts: None,
            expert: None,
            weights: None,
            weight: None,
            probs: None,
            num_layers: None,
            num_experts: None,
            tokens: None,
            counts: None,
            weighted_counts: None,
        };
        match item {
            TraceItem::Record(r) => {
                raw.prompt_id = Some(r.prompt_id);
                raw.category = r.category;
                raw.layer = Some(r.layer.into());
                raw.position = Some(r.position.into());
                raw.token_id = r.token_id.map(i64::from);
                raw.experts = Some(ints(r.experts));
                raw.weights = r.weights.map(floats);
                raw.probs = r.probs.map(floats);
            }
            TraceItem::Event(e) => {
                raw.prompt_id = Some(e.prompt_id);
                raw.category = e.category;
                raw.layer = Some(e.layer.into());
                raw.position = Some(e.position.into());
                raw.token_id = e.token_id.map(i64::from);
                raw.expert = Some(e.expert.into());
                raw.weight = e.weight.map(f64::from);
            }
            TraceItem::Counts(c) => {
                raw.prompt_id = Some(c.prompt_id);
                raw.category = c.category;
                raw.num_layers = i64::try_from(c.num_layers).ok();
                raw.num_experts = i64::try_from(c.num_experts).ok();
                raw.tokens = i64::try_from(c.tokens).ok();
                raw.counts = Some(
                    c.counts
                        .into_iter()
                        .map(|x| i64::try_from(x).unwrap_or(i64::MAX))
                        .collect(),
                );
                raw.weighted_counts = c.weighted_counts;
            }
        }
        raw
    }
}

/// Streaming reader over one trace file; an iterator of `(line number, item)` (lines from 1).
/// After the first error it yields nothing more. A file without any trace line yields an
/// "empty file" error.
pub struct TraceReader {
    path: PathBuf,
    inner: Box<dyn BufRead>,
    compression: Compression,
    buf: Vec<u8>,
    line: usize,
    items: usize,
    done: bool,
    form: Option<(TraceForm, usize)>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<(usize, usize)>,
    probs_len: Option<(usize, usize)>,
    counts_dims: Option<(usize, usize, usize)>,
    /// Items parsed by an [`ExternalFormat`] (then `inner` is empty).
    external: Option<Box<dyn ExternalItems>>,
    /// The file of the current external item (a dataset part), for messages.
    source: Option<PathBuf>,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("path", &self.path)
            .field("compression", &self.compression)
            .field("line", &self.line)
            .finish()
    }
}

impl TraceReader {
    /// Opens a trace file. The compression is detected from the magic bytes and must match the
    /// file name: a `.gz` / `.zst` name whose content lacks that magic, and gzip or zstd content
    /// under another name (e.g. gzip data in `.jsonl.zst`, zstd data in `.jsonl`), are errors.
    pub fn open(path: impl AsRef<Path>) -> Result<TraceReader> {
        let path = path.as_ref().to_path_buf();
        let io = |e| TraceError::io(&path, e);
        let mut file = std::fs::File::open(&path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            if let Some(f) = EXTERNAL.get().filter(|f| f.claims(&path, &[])) {
                let items = f.open(&path)?;
                return Ok(TraceReader::external(path, items));
            }
            return Err(TraceError::invalid_file(
                &path,
                "is a directory, not a trace file",
            ));
        }
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            let n = file.read(&mut head[got..]).map_err(io)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Err(TraceError::invalid_file(
                &path,
                "empty file (no trace lines)",
            ));
        }
        if let Some(f) = EXTERNAL.get().filter(|f| f.claims(&path, &head[..got])) {
            let items = f.open(&path)?;
            return Ok(TraceReader::external(path, items));
        }
        if head[..got] == PARQUET_MAGIC {
            return Err(TraceError::invalid_file(
                &path,
                "is a Parquet file, but no Parquet reader is installed in this program (the moe-xray pipeline installs it)",
            ));
        }
        let by_ext = Compression::from_path(&path);
        let compression = match Compression::from_magic(&head[..got]) {
            Some(c) if c == by_ext => c,
            Some(c) => {
                return Err(TraceError::invalid_file(
                    &path,
                    format!(
                        "file name says {} but the content is {} data (rename the file to match its content)",
                        by_ext.name(),
                        c.name()
                    ),
                ))
            }
            None if by_ext != Compression::None => {
                return Err(TraceError::invalid_file(
                    &path,
                    format!(
                        "file name says {} but the content does not start with the {} magic bytes",
                        by_ext.name(),
                        by_ext.name()
                    ),
                ))
            }
            None => Compression::None,
        };
        let file = std::io::Cursor::new(head[..got].to_vec()).chain(file);
        let inner: Box<dyn BufRead> = match compression {
            Compression::None => Box::new(BufReader::with_capacity(1 << 16, file)),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)),
            )),
            Compression::Zstd => {
                let dec = zstd::stream::read::Decoder::new(file).map_err(io)?;
                Box::new(BufReader::with_capacity(1 << 16, dec))
            }
        };
        Ok(TraceReader {
            path,
            inner,
            compression,
            buf: Vec::new(),
            line: 0,
            items: 0,
            done: false,
            form: None,
            num_layers: None,
            num_experts: None,
            top_k: None,
            probs_len: None,
            counts_dims: None,
            external: None,
            source: None,
        })
    }

    fn external(path: PathBuf, items: Box<dyn ExternalItems>) -> TraceReader {
        TraceReader {
            path,
            inner: Box::new(std::io::empty()),
            compression: Compression::None,
            buf: Vec::new(),
            line: 0,
            items: 0,
            done: false,
            form: None,
            num_layers: None,
            num_experts: None,
            top_k: None,
            probs_len: None,
            counts_dims: None,
            external: Some(items),
            source: None,
        }
    }

    /// The next item of an external form, checked like a JSONL line with the same fields.
    fn next_external(&mut self) -> Result<Option<(usize, TraceItem)>> {
        let Some(ext) = self.external.as_mut() else {
            return Ok(None);
        };
        let next = ext.next_item()?;
        self.source = Some(ext.source().to_path_buf());
        let Some((row, item)) = next else {
            if self.items == 0 {
                return Err(TraceError::invalid_file(
                    &self.path,
                    "empty trace (no rows)",
                ));
            }
            return Ok(None);
        };
        self.line = row;
        let raw = RawLine::from_item(item);
        let item = self.convert(raw)?;
        self.items += 1;
        Ok(Some((row, item)))
    }

    /// Also checks `layer < num_layers`, `expert < num_experts`, `probs.len() == num_experts`
    /// and counts-line dimensions against these values.
    pub fn with_dims(mut self, num_layers: Option<usize>, num_experts: Option<usize>) -> Self {
        self.num_layers = num_layers;
        self.num_experts = num_experts;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The file's line form, once the first trace line has been read.
    pub fn form(&self) -> Option<TraceForm> {
        self.form.map(|(f, _)| f)
    }

    /// Number of selected experts per record seen so far (records form only).
    pub fn top_k(&self) -> Option<usize> {
        self.top_k.map(|(k, _)| k)
    }

    fn err(&self, message: impl Into<String>) -> TraceError {
        TraceError::invalid(
            self.source.as_ref().unwrap_or(&self.path),
            self.line,
            message,
        )
    }

    fn next_item(&mut self) -> Result<Option<(usize, TraceItem)>> {
        if self.external.is_some() {
            return self.next_external();
        }
        loop {
            self.buf.clear();
            let limit = MAX_LINE_BYTES as u64 + 1;
            let n = match (&mut self.inner)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(n) => n,
                Err(e) => {
                    let line = self.line + 1;
                    return Err(TraceError::invalid(
                        &self.path,
                        line,
                        format!(
                            "cannot read {} data (corrupt or truncated file): {e}",
                            self.compression.name()
                        ),
                    ));
                }
            };
            if n == 0 {
                if self.items == 0 {
                    return Err(TraceError::invalid_file(
                        &self.path,
                        "empty file (no trace lines)",
                    ));
                }
                return Ok(None);
            }
            self.line += 1;
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(self.err(format!(
                    "line longer than {MAX_LINE_BYTES} bytes (the supported maximum)"
                )));
            }
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let complete = self.buf.last() == Some(&b'\n');
            let raw: RawLine = match serde_json::from_slice(&self.buf) {
                Ok(r) => r,
                Err(e) => {
                    let mut msg = if complete {
                        format!("malformed JSON: {e}")
                    } else {
                        format!("truncated last line (no trailing newline, not valid JSON): {e}")
                    };
                    if e.is_data() {
                        msg = format!("invalid field: {e}");
                    }
                    return Err(self.err(msg));
                }
            };
            let item = self.convert(raw)?;
            self.items += 1;
            return Ok(Some((self.line, item)));
        }
    }

    fn index(&self, name: &str, v: Option<i64>) -> Result<u32> {
        match v {
            None => Err(self.err(format!("missing field `{name}`"))),
            Some(x) if x < 0 => {
                Err(self.err(format!("negative {name} {x} (indices count from 0)")))
            }
            Some(x) if x > u32::MAX as i64 => Err(self.err(format!("{name} {x} is out of range"))),
            Some(x) => Ok(x as u32),
        }
    }

    fn convert(&mut self, mut raw: RawLine) -> Result<TraceItem> {
        let forms = [
            (raw.counts.is_some(), TraceForm::Counts),
            (raw.expert.is_some(), TraceForm::Events),
            (raw.experts.is_some(), TraceForm::Records),
        ];
        let present: Vec<TraceForm> = forms.iter().filter(|f| f.0).map(|f| f.1).collect();
        let form = match present.as_slice() {
            [f] => *f,
            [] => {
                return Err(self.err(
                    "line is neither a routing record (`experts`), a flat event (`expert`) nor a counts line (`counts`)",
                ))
            }
            _ => {
                return Err(self.err(
                    "line mixes line forms (has more than one of `experts`, `expert`, `counts`)",
                ))
            }
        };
        match self.form {
            None => self.form = Some((form, self.line)),
            Some((f, first)) if f != form => {
                return Err(self.err(format!(
                    "mixed line forms in one file: this line is {} but line {first} is {}",
                    form.name(),
                    f.name()
                )))
            }
            Some(_) => {}
        }
        let prompt_id = match raw.prompt_id.take() {
            None => return Err(self.err("missing field `prompt_id`")),
            Some(p) if p.is_empty() => return Err(self.err("empty `prompt_id`")),
            Some(p) => p,
        };
        let token_type = match raw.token_type.as_deref() {
            None => return Err(self.err("missing field `token_type`")),
            Some("prompt") => TokenType::Prompt,
            Some("generation") => TokenType::Generation,
            Some(other) => {
                return Err(self.err(format!(
                    "unknown token_type \"{other}\" (expected \"prompt\" or \"generation\")"
                )))
            }
        };
        let token_id = match raw.token_id {
            None => None,
            v => Some(self.index("token_id", v)?),
        };
        match form {
            TraceForm::Counts => self.convert_counts(raw, prompt_id, token_type),
            TraceForm::Events => {
                let layer = self.index("layer", raw.layer)?;
                let position = self.index("position", raw.position)?;
                let expert = self.index("expert", raw.expert)?;
                self.check_layer(layer)?;
                self.check_expert(expert)?;
                let weight = match raw.weight {
                    None => None,
                    Some(w) => Some(self.check_coefficient("weight", w)?),
                };
                Ok(TraceItem::Event(FlatEvent {
                    prompt_id,
                    category: raw.category,
                    layer,
                    position,
                    expert,
                    token_type,
                    token_id,
                    weight,
                }))
            }
            TraceForm::Records => {
                let layer = self.index("layer", raw.layer)?;
                let position = self.index("position", raw.position)?;
                self.check_layer(layer)?;
                let raw_experts = raw.experts.unwrap_or_default();
                if raw_experts.is_empty() {
                    return Err(self.err("empty `experts` list"));
                }
                if raw_experts.len() > MAX_EXPERTS {
                    return Err(self.err(format!(
                        "`experts` has {} entries, more than the supported maximum number of experts {MAX_EXPERTS}",
                        raw_experts.len()
                    )));
                }
                let mut experts = Vec::with_capacity(raw_experts.len());
                for &x in &raw_experts {
                    let e = self.index("expert", Some(x))?;
                    self.check_expert(e)?;
                    experts.push(e);
                }
                if let Some(e) = first_duplicate(&experts) {
                    return Err(self.err(format!("duplicate expert {e} in `experts`")));
                }
                match self.top_k {
                    None => self.top_k = Some((experts.len(), self.line)),
                    Some((k, first)) if k != experts.len() => {
                        return Err(self.err(format!(
                            "mixed top-k: {} experts here but {k} at line {first}",
                            experts.len()
                        )))
                    }
                    Some(_) => {}
                }
                let weights = match raw.weights {
                    None => None,
                    Some(ws) => {
                        if ws.len() != experts.len() {
                            return Err(self.err(format!(
                                "`weights` has {} entries but `experts` has {}",
                                ws.len(),
                                experts.len()
                            )));
                        }
                        let mut out = Vec::with_capacity(ws.len());
                        for w in ws {
                            out.push(self.check_coefficient("weights", w)?);
                        }
                        Some(out)
                    }
                };
                let probs = match raw.probs {
                    None => None,
                    Some(ps) => {
                        if ps.len() > MAX_EXPERTS {
                            return Err(self.err(format!(
                                "`probs` has {} entries, more than the supported maximum number of experts {MAX_EXPERTS}",
                                ps.len()
                            )));
                        }
                        if let Some(ne) = self.num_experts {
                            if ps.len() != ne {
                                return Err(self.err(format!(
                                    "`probs` has {} entries but num_experts is {ne}",
                                    ps.len()
                                )));
                            }
                        }
                        match self.probs_len {
                            None => self.probs_len = Some((ps.len(), self.line)),
                            Some((n, first)) if n != ps.len() => {
                                return Err(self.err(format!(
                                    "`probs` has {} entries but {n} at line {first}",
                                    ps.len()
                                )))
                            }
                            Some(_) => {}
                        }
                        if let Some(&e) = experts.iter().find(|&&e| e as usize >= ps.len()) {
                            return Err(self.err(format!(
                                "expert {e} has no entry in `probs` ({} entries)",
                                ps.len()
                            )));
                        }
                        let mut out = Vec::with_capacity(ps.len());
                        for p in ps {
                            out.push(self.check_weight("probs", p)?);
                        }
                        Some(out)
                    }
                };
                Ok(TraceItem::Record(RoutingRecord {
                    prompt_id,
                    category: raw.category,
                    layer,
                    position,
                    token_id,
                    token_type,
                    experts,
                    weights,
                    probs,
                }))
            }
        }
    }

    fn convert_counts(
        &mut self,
        raw: RawLine,
        prompt_id: String,
        token_type: TokenType,
    ) -> Result<TraceItem> {
        let nl = self.index("num_layers", raw.num_layers)? as usize;
        let ne = self.index("num_experts", raw.num_experts)? as usize;
        if nl == 0 || ne == 0 {
            return Err(self.err("num_layers and num_experts must be at least 1"));
        }
        let want = check_dims(nl, ne, None).map_err(|m| self.err(m))?;
        if let Some(l) = self.num_layers {
            if l != nl {
                return Err(self.err(format!("num_layers {nl} differs from the expected {l}")));
            }
        }
        if let Some(e) = self.num_experts {
            if e != ne {
                return Err(self.err(format!("num_experts {ne} differs from the expected {e}")));
            }
        }
        match self.counts_dims {
            None => self.counts_dims = Some((nl, ne, self.line)),
            Some((l, e, first)) if (l, e) != (nl, ne) => {
                return Err(self.err(format!(
                    "dimensions {nl}x{ne} differ from {l}x{e} at line {first}"
                )))
            }
            Some(_) => {}
        }
        let tokens = self.index("tokens", raw.tokens)? as u64;
        let raw_counts = raw.counts.unwrap_or_default();
        if raw_counts.len() != want {
            return Err(self.err(format!(
                "`counts` has {} entries but num_layers * num_experts = {want}",
                raw_counts.len()
            )));
        }
        let mut counts = Vec::with_capacity(want);
        for c in raw_counts {
            if c < 0 {
                return Err(self.err(format!("negative count {c}")));
            }
            counts.push(c as u64);
        }
        for (l, row) in counts.chunks_exact(ne).enumerate() {
            let s: u64 = row.iter().fold(0u64, |a, &x| a.saturating_add(x));
            if s > tokens.saturating_mul(ne as u64) {
                return Err(self.err(format!(
                    "layer {l}: {s} selections for {tokens} tokens exceeds num_experts per token"
                )));
            }
        }
        let weighted_counts = match raw.weighted_counts {
            None => None,
            Some(w) => {
                if w.len() != want {
                    return Err(self.err(format!(
                        "`weighted_counts` has {} entries but num_layers * num_experts = {want}",
                        w.len()
                    )));
                }
                if let Some(x) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                    return Err(self.err(format!("invalid weighted count {x}")));
                }
                Some(w)
            }
        };
        Ok(TraceItem::Counts(CountsLine {
            prompt_id,
            category: raw.category,
            token_type,
            num_layers: nl,
            num_experts: ne,
            tokens,
            counts,
            weighted_counts,
        }))
    }

    fn check_layer(&self, layer: u32) -> Result<()> {
        match self.num_layers {
            Some(l) if layer as usize >= l => {
                Err(self.err(format!("layer {layer} is out of range (num_layers = {l})")))
            }
            _ => Ok(()),
        }
    }

    fn check_expert(&self, e: u32) -> Result<()> {
        match self.num_experts {
            Some(n) if e as usize >= n => {
                Err(self.err(format!("expert {e} is out of range (num_experts = {n})")))
            }
            _ => Ok(()),
        }
    }

    /// `weights` / `weight`: the coefficients applied to the routed experts' outputs, finite and
    /// ≥ 0 but not bounded by 1 (DeepSeek's `routed_scaling_factor` makes them sum to more).
    fn check_coefficient(&self, name: &str, w: f64) -> Result<f32> {
        let f = w as f32;
        if !w.is_finite() || w < 0.0 || !f.is_finite() {
            return Err(self.err(format!(
                "`{name}` value {w} is not a finite non-negative number"
            )));
        }
        Ok(f)
    }

    fn check_weight(&self, name: &str, w: f64) -> Result<f32> {
        if !w.is_finite() || !(0.0..=1.0 + 1e-6).contains(&w) {
            return Err(self.err(format!("`{name}` value {w} is not a probability in [0, 1]")));
        }
        Ok(w as f32)
    }
}

impl Iterator for TraceReader {
    type Item = Result<(usize, TraceItem)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_item() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The first value that occurs twice in `xs` (the smallest such value for long lists), without
/// quadratic work on long hostile lists.
pub fn first_duplicate(xs: &[u32]) -> Option<u32> {
    if xs.len() <= 16 {
        return xs
            .iter()
            .enumerate()
            .find(|&(i, x)| xs[..i].contains(x))
            .map(|(_, &x)| x);
    }
    let mut sorted = xs.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// Reads all items of a file (convenience for small files and tests).
pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<TraceItem>> {
    TraceReader::open(path)?
        .map(|r| r.map(|(_, i)| i))
        .collect()
}

/// Set of prompt ids in first-appearance order (helper for callers that need only the ids).
pub fn prompt_ids(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for item in TraceReader::open(path)? {
        let (_, item) = item?;
        if seen.insert(item.prompt_id().to_string()) {
            out.push(item.prompt_id().to_string());
        }
    }
    Ok(out)
}
