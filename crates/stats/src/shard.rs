//! Analysis shards: the exact sufficient statistics of `analyze` for a subset of prompts
//! (`moe-xray map`), combined by `moe-xray merge` into the results of one `analyze` over all of
//! them; optionally the health accumulator (an opaque section, `moe_xray_health::state`) and, in
//! place of the counts, the per-category Gram sums ([`gram_section_bytes`]). Format and rules: `docs/statistics.md`, "Sharded analysis".
//!
//! A shard file is a zstd stream (two frames as written: header, then records; a reader sees
//! their concatenation) holding:
//!
//! - the magic `MXSHARD\0` and the format version (u32 little-endian, [`SHARD_VERSION`]);
//! - the header: its length (u32 LE, at most [`MAX_HEADER_BYTES`]) and [`ShardHeader`] as JSON;
//! - one record per prompt, in increasing `ordinal` order: tag byte 1, `ordinal` (LEB128),
//!   prompt id (LEB128 length, UTF-8 bytes), category (LEB128 0 = none, n + 1 = n UTF-8 bytes),
//!   tokens per layer (LEB128 count, 0 or L, then LEB128 values), the counts encoding byte (0:
//!   L·E LEB128 integers, used when every count is an integer below 2^53; 1: L·E f64
//!   little-endian) and the counts;
//!   (`kind: gram_sums` shards instead: tag byte 2, ordinal, prompt id and what the Gram
//!   accumulator did with it: 0 counted, 1 dropped + reason, 2 no category);
//! - the end: tag byte 0 and the number of records (LEB128);
//! - version 2: the sections, each a tag byte ([`SECTION_HEALTH`], [`SECTION_GRAM`], increasing),
//!   a LEB128 length and the bytes, then a byte 0; nothing may follow. The header's `kind` and
//!   `health` say which sections there must be. Version 1 (still read) ends after the count.
//!
//! Every size read is checked against a limit before anything is allocated from it, and every
//! error names the file and the field.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StatsError};
use crate::input::PromptRow;
use crate::large_n::{GramCategory, PushOutcome};

/// What the records of a shard are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardKind {
    /// One record per prompt with its counts (`map`; merge runs every `analyze` statistic).
    #[default]
    Counts,
    /// One record per prompt with its id only, and the per-category Gram sums in a section
    /// (`map --gram-sums`; merge gives the `gram_sums` path, independent of N but for the ids).
    GramSums,
}

/// The magic bytes at the start of a (decompressed) shard.
pub const SHARD_MAGIC: &[u8; 8] = b"MXSHARD\0";
/// The version of the shard format this build writes (it reads 1 and 2).
pub const SHARD_VERSION: u32 = 2;
/// Largest section accepted after the records (bytes; the Gram sums of a few categories at
/// D = L·E of a few thousand).
pub const MAX_SECTION_BYTES: u64 = 1 << 40;
/// Largest number of values of one category's Gram tiles read from a shard (2^28 f64, 2 GiB).
pub const MAX_GRAM_TILE_VALUES: usize = 1 << 28;
/// Most categories in one Gram-sums section.
pub const MAX_GRAM_CATEGORIES: u64 = 1 << 20;
/// Section tag of the health accumulator (`moe-xray map --health`).
pub const SECTION_HEALTH: u8 = 1;
/// Section tag of the Gram sums (`moe-xray map --gram-sums`).
pub const SECTION_GRAM: u8 = 2;
/// Largest header accepted (JSON bytes).
pub const MAX_HEADER_BYTES: usize = 64 << 20;
/// Most distinct token ids in one prompt's bag.
pub const MAX_BAG_ENTRIES: u64 = 1 << 22;
/// Longest prompt id or category accepted (bytes).
pub const MAX_NAME_BYTES: usize = 1 << 20;
/// The `format` field of every header.
pub const SHARD_FORMAT: &str = "moe-xray-shard";
/// zstd level of the shards written.
pub const ZSTD_LEVEL: i32 = 3;

/// What a shard is: the inputs it was mapped from and every option that changes the counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardHeader {
    /// Always [`SHARD_FORMAT`].
    pub format: String,
    /// moe-xray version that wrote the shard.
    pub tool_version: String,
    /// The trace files read, as given (the `input.traces` of `results.json`).
    pub traces: Vec<String>,
    /// This shard holds the prompts whose ordinal is ≡ `part` (mod `parts`).
    pub part: u64,
    /// Number of parts the prompts of `traces` were split into.
    pub parts: u64,
    /// Rows L of each prompt's counts (the MoE layers).
    pub num_layers: usize,
    /// E.
    pub num_experts: usize,
    /// Decoder-layer index of each row (`num_layers` entries).
    pub layers: Vec<usize>,
    /// k as `analyze` would use it (given, from the manifest, or for `--weighted` inferred from
    /// the data); `None` when unknown.
    pub top_k: Option<usize>,
    /// Counts are summed router weights.
    pub weighted: bool,
    /// Token types counted (`settings.token_types`).
    pub token_types: Vec<String>,
    /// The manifest beside the first trace as compact JSON text (`input.manifest`), if any.
    pub manifest: Option<String>,
    /// Why the records carry no token bags (the confound controls' token ids), e.g.
    /// `counts-form traces have no token ids`; `None` when every analysable prompt has its bag.
    pub token_bags_error: Option<String>,
    /// What the records hold (absent in version 1: `counts`).
    #[serde(default)]
    pub kind: ShardKind,
    /// Whether a health section follows the records (absent in version 1: false).
    #[serde(default)]
    pub health: bool,
}

/// One prompt of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    /// The prompt's bag of token ids (token id, occurrences), ascending token id, when the map
    /// step computed one (`lexical_baseline`).
    pub bag: Option<Vec<(u32, u64)>>,
    /// Position of the prompt in the first-appearance order of all prompts of `traces`
    /// (starting at 0, counting every prompt of every part).
    pub ordinal: u64,
    pub row: PromptRow,
}

fn bad(file: &str, field: &str, msg: impl std::fmt::Display) -> StatsError {
    StatsError::InvalidInput(format!("{file}: shard field {field}: {msg}"))
}

fn put_varint(buf: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        buf.push((x as u8) | 0x80);
        x >>= 7;
    }
    buf.push(x as u8);
}

/// The largest integer that every f64 below it represents exactly (2^53).
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// What [`ShardWriter::finish`] learned from the records it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordsInfo {
    /// Number of records.
    pub count: u64,
    /// Length L·E of every record's counts (`None` without records).
    pub dim: Option<usize>,
    /// Length of the non-empty `tokens_per_layer` of the records, if any.
    pub token_layers: Option<usize>,
}

/// Writes the records of a shard (the second zstd frame of the file, see the module docs);
/// records must come in increasing ordinal order. The header, which needs what only the end of
/// the input tells (the MoE layers, k), is written afterwards by [`write_header`] in front of it.
pub struct ShardWriter<W: Write> {
    enc: zstd::Encoder<'static, BufWriter<W>>,
    parts: u64,
    part: u64,
    info: RecordsInfo,
    last: Option<u64>,
    buf: Vec<u8>,
}

impl<W: Write> ShardWriter<W> {
    /// Starts the records of part `part` of `parts`.
    pub fn new(out: W, part: u64, parts: u64) -> Result<Self> {
        if parts == 0 || part >= parts {
            return Err(StatsError::InvalidInput(format!(
                "part {part} of {parts} parts (parts are numbered 0..parts-1)"
            )));
        }
        let io = |e: std::io::Error| StatsError::Other(format!("writing the shard: {e}"));
        let enc = zstd::Encoder::new(BufWriter::new(out), ZSTD_LEVEL).map_err(io)?;
        Ok(ShardWriter {
            enc,
            parts,
            part,
            info: RecordsInfo {
                count: 0,
                dim: None,
                token_layers: None,
            },
            last: None,
            buf: Vec::new(),
        })
    }

    /// Appends one prompt.
    pub fn push(
        &mut self,
        ordinal: u64,
        row: &PromptRow,
        bag: Option<&[(u32, u64)]>,
    ) -> Result<()> {
        if self.last.is_some_and(|l| ordinal <= l) || ordinal % self.parts != self.part {
            return Err(StatsError::InvalidInput(format!(
                "prompt {:?}: ordinal {ordinal} out of order or not in part {} of {}",
                row.prompt_id, self.part, self.parts
            )));
        }
        let d = *self.info.dim.get_or_insert(row.counts.len());
        let nt = row.tokens_per_layer.len();
        if row.counts.len() != d || (nt != 0 && *self.info.token_layers.get_or_insert(nt) != nt) {
            return Err(StatsError::Dimension(format!(
                "prompt {:?}: {} counts and {nt} token totals, unlike the prompts before",
                row.prompt_id,
                row.counts.len(),
            )));
        }
        for s in std::iter::once(&row.prompt_id).chain(row.category.as_ref()) {
            if s.len() > MAX_NAME_BYTES {
                return Err(StatsError::InvalidInput(format!(
                    "prompt {:?}: id or category longer than {MAX_NAME_BYTES} bytes",
                    row.prompt_id
                )));
            }
        }
        let b = &mut self.buf;
        b.clear();
        b.push(1);
        put_varint(b, ordinal);
        put_varint(b, row.prompt_id.len() as u64);
        b.extend_from_slice(row.prompt_id.as_bytes());
        match &row.category {
            None => put_varint(b, 0),
            Some(c) => {
                put_varint(b, c.len() as u64 + 1);
                b.extend_from_slice(c.as_bytes());
            }
        }
        put_varint(b, nt as u64);
        for &t in &row.tokens_per_layer {
            put_varint(b, t);
        }
        let integer = row
            .counts
            .iter()
            .all(|&x| x < EXACT_INT && ((x as u64) as f64).to_bits() == x.to_bits());
        if integer {
            b.push(0);
            for &x in &row.counts {
                put_varint(b, x as u64);
            }
        } else {
            b.push(1);
            for &x in &row.counts {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        match bag {
            None => put_varint(b, 0),
            Some(bag) => {
                put_varint(b, bag.len() as u64 + 1);
                let mut prev: Option<u32> = None;
                for &(t, c) in bag {
                    if prev.is_some_and(|p| t <= p) {
                        return Err(StatsError::InvalidInput(format!(
                            "prompt {:?}: token bag not in ascending token-id order",
                            row.prompt_id
                        )));
                    }
                    put_varint(b, u64::from(t - prev.map_or(0, |p| p + 1)));
                    put_varint(b, c);
                    prev = Some(t);
                }
            }
        }
        self.enc
            .write_all(b)
            .map_err(|e| StatsError::Other(format!("writing the shard: {e}")))?;
        self.info.count += 1;
        self.last = Some(ordinal);
        Ok(())
    }

    /// Appends one prompt of a Gram-sums shard: its id and what the Gram accumulator did with
    /// it (tag 2, ordinal, id, then 0 = counted, 1 = dropped and the reason, 2 = no category).
    pub fn push_id(&mut self, ordinal: u64, prompt_id: &str, outcome: &PushOutcome) -> Result<()> {
        if self.last.is_some_and(|l| ordinal <= l) || ordinal % self.parts != self.part {
            return Err(StatsError::InvalidInput(format!(
                "prompt {prompt_id:?}: ordinal {ordinal} out of order or not in part {} of {}",
                self.part, self.parts
            )));
        }
        let reason = match outcome {
            PushOutcome::Dropped(r) => Some(r.as_str()),
            _ => None,
        };
        for s in std::iter::once(prompt_id).chain(reason) {
            if s.len() > MAX_NAME_BYTES {
                return Err(StatsError::InvalidInput(format!(
                    "prompt {prompt_id:?}: id or reason longer than {MAX_NAME_BYTES} bytes"
                )));
            }
        }
        let b = &mut self.buf;
        b.clear();
        b.push(2);
        put_varint(b, ordinal);
        put_varint(b, prompt_id.len() as u64);
        b.extend_from_slice(prompt_id.as_bytes());
        match outcome {
            PushOutcome::Accepted => b.push(0),
            PushOutcome::Dropped(r) => {
                b.push(1);
                put_varint(b, r.len() as u64);
                b.extend_from_slice(r.as_bytes());
            }
            PushOutcome::NoCategory => b.push(2),
        }
        self.enc
            .write_all(b)
            .map_err(|e| StatsError::Other(format!("writing the shard: {e}")))?;
        self.info.count += 1;
        self.last = Some(ordinal);
        Ok(())
    }

    /// Number of records written.
    pub fn len(&self) -> u64 {
        self.info.count
    }

    /// Whether no record was written.
    pub fn is_empty(&self) -> bool {
        self.info.count == 0
    }

    /// Writes the end marker and finishes the zstd frame; returns the writer and what the
    /// records hold.
    pub fn finish(self) -> Result<(W, RecordsInfo)> {
        self.finish_with_sections(&[])
    }

    /// [`Self::finish`], writing the sections `(tag, bytes)` (increasing tags:
    /// [`SECTION_HEALTH`], [`SECTION_GRAM`]) after the end marker: each a tag byte, its LEB128
    /// length and the bytes; then a tag byte 0.
    pub fn finish_with_sections(mut self, sections: &[(u8, &[u8])]) -> Result<(W, RecordsInfo)> {
        let io = |e: std::io::Error| StatsError::Other(format!("writing the shard: {e}"));
        let mut b = vec![0u8];
        put_varint(&mut b, self.info.count);
        self.enc.write_all(&b).map_err(io)?;
        let mut prev = 0u8;
        for &(tag, bytes) in sections {
            if tag <= prev || tag > SECTION_GRAM {
                return Err(StatsError::InvalidInput(format!(
                    "shard section tags must be increasing, 1 or 2 (got {tag} after {prev})"
                )));
            }
            prev = tag;
            let mut h = vec![tag];
            put_varint(&mut h, bytes.len() as u64);
            self.enc.write_all(&h).map_err(io)?;
            self.enc.write_all(bytes).map_err(io)?;
        }
        self.enc.write_all(&[0]).map_err(io)?;
        let w = self.enc.finish().map_err(io)?;
        let w = w
            .into_inner()
            .map_err(|e| StatsError::Other(format!("writing the shard: {}", e.error())))?;
        Ok((w, self.info))
    }
}

/// Writes the first zstd frame of a shard (magic, version, header), after checking the header
/// against the records written ([`RecordsInfo`]); the records frame is appended after it.
pub fn write_header(
    out: &mut impl Write,
    header: &ShardHeader,
    records: &RecordsInfo,
) -> Result<()> {
    let d = moe_xray_trace::limits::check_dims(header.num_layers, header.num_experts, header.top_k)
        .map_err(StatsError::InvalidInput)?;
    if header.parts == 0 || header.part >= header.parts {
        return Err(StatsError::InvalidInput(format!(
            "part {} of {} parts (parts are numbered 0..parts-1)",
            header.part, header.parts
        )));
    }
    if records.dim.is_some_and(|x| x != d)
        || records.token_layers.is_some_and(|x| x != header.num_layers)
        || header.layers.len() != header.num_layers
    {
        return Err(StatsError::Dimension(format!(
            "shard header L = {}, E = {} ({} layer labels) but records of {:?} counts and {:?} token totals",
            header.num_layers,
            header.num_experts,
            header.layers.len(),
            records.dim,
            records.token_layers
        )));
    }
    let json = serde_json::to_vec(header).map_err(|e| StatsError::Other(e.to_string()))?;
    if json.len() > MAX_HEADER_BYTES {
        return Err(StatsError::InvalidInput(format!(
            "shard header of {} bytes exceeds {MAX_HEADER_BYTES}",
            json.len()
        )));
    }
    let mut raw = Vec::with_capacity(16 + json.len());
    raw.extend_from_slice(SHARD_MAGIC);
    raw.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    raw.extend_from_slice(&(json.len() as u32).to_le_bytes());
    raw.extend_from_slice(&json);
    let frame = zstd::encode_all(&raw[..], ZSTD_LEVEL)
        .map_err(|e| StatsError::Other(format!("writing the shard: {e}")))?;
    out.write_all(&frame)
        .map_err(|e| StatsError::Other(format!("writing the shard: {e}")))
}

/// Reads a shard record by record (one record in memory), validating everything.
pub struct ShardReader {
    name: String,
    src: BufReader<zstd::Decoder<'static, BufReader<Box<dyn Read + Send>>>>,
    header: ShardHeader,
    d: usize,
    version: u32,
    count: u64,
    last: Option<u64>,
    done: bool,
    /// Whether the sections after the records have been read (version 1 has none).
    sections_read: bool,
}

/// One prompt of a Gram-sums shard.
#[derive(Debug, Clone, PartialEq)]
pub struct IdRecord {
    pub ordinal: u64,
    pub prompt_id: String,
    pub outcome: PushOutcome,
}

impl ShardReader {
    /// Opens a shard file.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let f = std::fs::File::open(path)
            .map_err(|e| StatsError::InvalidInput(format!("{name}: cannot open: {e}")))?;
        Self::from_reader(name, Box::new(f))
    }

    /// Reads a shard from `r`; `name` is used in errors.
    pub fn from_reader(name: String, r: Box<dyn Read + Send>) -> Result<Self> {
        let dec = zstd::Decoder::new(r)
            .map_err(|e| StatsError::InvalidInput(format!("{name}: not a zstd stream: {e}")))?;
        let mut src = BufReader::with_capacity(1 << 16, dec);
        let mut magic = [0u8; 8];
        read_exact(&mut src, &mut magic, &name, "magic")?;
        if &magic != SHARD_MAGIC {
            return Err(bad(&name, "magic", "not a moe-xray shard"));
        }
        let mut w = [0u8; 4];
        read_exact(&mut src, &mut w, &name, "version")?;
        let version = u32::from_le_bytes(w);
        if !(1..=SHARD_VERSION).contains(&version) {
            return Err(bad(
                &name,
                "version",
                format!(
                    "version {version} is not supported (this build reads 1 to {SHARD_VERSION})"
                ),
            ));
        }
        read_exact(&mut src, &mut w, &name, "header length")?;
        let hlen = u32::from_le_bytes(w) as usize;
        if hlen > MAX_HEADER_BYTES {
            return Err(bad(
                &name,
                "header length",
                format!("{hlen} bytes exceeds the limit {MAX_HEADER_BYTES}"),
            ));
        }
        let mut hbuf = Vec::new();
        (&mut src)
            .take(hlen as u64)
            .read_to_end(&mut hbuf)
            .map_err(|e| bad(&name, "header", e))?;
        if hbuf.len() != hlen {
            return Err(bad(&name, "header", "truncated"));
        }
        let header: ShardHeader =
            serde_json::from_slice(&hbuf).map_err(|e| bad(&name, "header", e))?;
        if header.format != SHARD_FORMAT {
            return Err(bad(
                &name,
                "header.format",
                format!("{:?} is not {SHARD_FORMAT:?}", header.format),
            ));
        }
        let d =
            moe_xray_trace::limits::check_dims(header.num_layers, header.num_experts, header.top_k)
                .map_err(|m| bad(&name, "header.num_layers/num_experts/top_k", m))?;
        if header.layers.len() != header.num_layers
            || header.layers.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(bad(
                &name,
                "header.layers",
                format!(
                    "must be {} increasing decoder-layer indices",
                    header.num_layers
                ),
            ));
        }
        if header.parts == 0 || header.part >= header.parts {
            return Err(bad(
                &name,
                "header.part",
                format!("part {} of {} parts", header.part, header.parts),
            ));
        }
        if header.traces.is_empty() {
            return Err(bad(&name, "header.traces", "empty list"));
        }
        if version == 1 && (header.kind != ShardKind::Counts || header.health) {
            return Err(bad(
                &name,
                "header.kind/health",
                "a version-1 shard holds counts only",
            ));
        }
        Ok(ShardReader {
            name,
            src,
            header,
            d,
            version,
            count: 0,
            last: None,
            done: false,
            sections_read: version == 1,
        })
    }

    /// The header.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The file name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next record, or `None` after the end marker (checked: record count, nothing after).
    pub fn next_record(&mut self) -> Result<Option<ShardRecord>> {
        if self.done {
            return Ok(None);
        }
        let name = self.name.clone();
        let n = &name;
        let tag = self.byte("record tag")?;
        if tag == 0 {
            let count = self.varint("record count")?;
            if count != self.count {
                return Err(bad(
                    n,
                    "record count",
                    format!("end marker says {count} records, {} read", self.count),
                ));
            }
            if self.version == 1 {
                self.expect_eof()?;
            }
            self.done = true;
            return Ok(None);
        }
        if tag != 1 || self.header.kind != ShardKind::Counts {
            return Err(bad(
                n,
                "record tag",
                format!(
                    "{tag} after record {} (a {:?} shard)",
                    self.count, self.header.kind
                ),
            ));
        }
        let at = self.count;
        let ordinal = self.ordinal(at)?;
        let prompt_id = self.string("prompt_id", at)?;
        let clen = self.varint("category length")?;
        let category = if clen == 0 {
            None
        } else {
            Some(self.string_of_len(clen - 1, "category", at)?)
        };
        let ntok = self.varint("tokens_per_layer length")?;
        let nl = self.header.num_layers as u64;
        if ntok != 0 && ntok != nl {
            return Err(bad(
                n,
                "tokens_per_layer length",
                format!("record {at} ({prompt_id:?}): {ntok}, expected 0 or {nl}"),
            ));
        }
        let mut tokens_per_layer = Vec::with_capacity(ntok as usize);
        for _ in 0..ntok {
            tokens_per_layer.push(self.varint("tokens_per_layer")?);
        }
        let enc = self.byte("counts encoding")?;
        let mut counts = Vec::with_capacity(self.d);
        match enc {
            0 => {
                for _ in 0..self.d {
                    let x = self.varint("counts")?;
                    if x >= 1 << 53 {
                        return Err(bad(
                            n,
                            "counts",
                            format!("record {at} ({prompt_id:?}): integer {x} ≥ 2^53"),
                        ));
                    }
                    counts.push(x as f64);
                }
            }
            1 => {
                let mut b = [0u8; 8];
                for _ in 0..self.d {
                    read_exact(&mut self.src, &mut b, n, "counts")?;
                    counts.push(f64::from_le_bytes(b));
                }
            }
            x => {
                return Err(bad(
                    n,
                    "counts encoding",
                    format!("record {at} ({prompt_id:?}): {x} (expected 0 or 1)"),
                ))
            }
        }
        let blen = self.varint("token bag length")?;
        let bag = if blen == 0 {
            None
        } else {
            let n = blen - 1;
            if n > MAX_BAG_ENTRIES {
                return Err(bad(
                    &name,
                    "token bag length",
                    format!("record {at} ({prompt_id:?}): {n} entries exceed {MAX_BAG_ENTRIES}"),
                ));
            }
            let mut bag = Vec::with_capacity(n as usize);
            let mut next = 0u64;
            for _ in 0..n {
                let t = next
                    .checked_add(self.varint("token bag")?)
                    .filter(|&t| t <= u64::from(u32::MAX))
                    .ok_or_else(|| {
                        bad(
                            &name,
                            "token bag",
                            format!("record {at}: token id beyond u32"),
                        )
                    })?;
                let c = self.varint("token bag")?;
                bag.push((t as u32, c));
                next = t + 1;
            }
            Some(bag)
        };
        self.count += 1;
        self.last = Some(ordinal);
        Ok(Some(ShardRecord {
            bag,
            ordinal,
            row: PromptRow {
                prompt_id,
                category,
                counts,
                tokens_per_layer,
            },
        }))
    }

    /// The next prompt of a Gram-sums shard, or `None` after the end marker.
    pub fn next_id(&mut self) -> Result<Option<IdRecord>> {
        if self.done {
            return Ok(None);
        }
        let name = self.name.clone();
        let tag = self.byte("record tag")?;
        if tag == 0 {
            let count = self.varint("record count")?;
            if count != self.count {
                return Err(bad(
                    &name,
                    "record count",
                    format!("end marker says {count} records, {} read", self.count),
                ));
            }
            self.done = true;
            return Ok(None);
        }
        if tag != 2 || self.header.kind != ShardKind::GramSums {
            return Err(bad(
                &name,
                "record tag",
                format!(
                    "{tag} after record {} (a {:?} shard)",
                    self.count, self.header.kind
                ),
            ));
        }
        let at = self.count;
        let ordinal = self.ordinal(at)?;
        let prompt_id = self.string("prompt_id", at)?;
        let outcome = match self.byte("outcome")? {
            0 => PushOutcome::Accepted,
            1 => PushOutcome::Dropped(self.string("drop reason", at)?),
            2 => PushOutcome::NoCategory,
            x => {
                return Err(bad(
                    &name,
                    "outcome",
                    format!("record {at} ({prompt_id:?}): {x} (expected 0, 1 or 2)"),
                ))
            }
        };
        self.count += 1;
        self.last = Some(ordinal);
        Ok(Some(IdRecord {
            ordinal,
            prompt_id,
            outcome,
        }))
    }

    /// Reads the sections after the records (call after the last record): `f(tag, reader)`
    /// gets each section's bytes (a reader limited to its length, which `f` must read to the
    /// end); checks that the sections are those the header announces, in increasing tag
    /// order, and that nothing follows. Version-1 shards have none.
    pub fn read_sections(
        &mut self,
        mut f: impl FnMut(u8, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        if self.sections_read {
            return Ok(());
        }
        let name = self.name.clone();
        if !self.done {
            return Err(bad(&name, "sections", "records not read to the end"));
        }
        let mut prev = 0u8;
        let mut seen = Vec::new();
        loop {
            let tag = self.byte("section tag")?;
            if tag == 0 {
                break;
            }
            if tag <= prev || tag > SECTION_GRAM {
                return Err(bad(
                    &name,
                    "section tag",
                    format!(
                        "{tag} after {prev} (expected increasing tags 1 = health, 2 = gram sums)"
                    ),
                ));
            }
            prev = tag;
            let len = self.varint("section length")?;
            if len > MAX_SECTION_BYTES {
                return Err(bad(
                    &name,
                    "section length",
                    format!("{len} bytes exceeds {MAX_SECTION_BYTES}"),
                ));
            }
            let mut take = (&mut self.src).take(len);
            f(tag, &mut take)?;
            if take.limit() != 0 {
                return Err(bad(
                    &name,
                    "section length",
                    format!("section {tag}: {} of {len} bytes not read", take.limit()),
                ));
            }
            seen.push(tag);
        }
        let want_health = self.header.health;
        let want_gram = self.header.kind == ShardKind::GramSums;
        if seen.contains(&SECTION_HEALTH) != want_health
            || seen.contains(&SECTION_GRAM) != want_gram
        {
            return Err(bad(
                &name,
                "sections",
                format!(
                    "sections {seen:?}, but the header says health = {want_health}, kind = {:?}",
                    self.header.kind
                ),
            ));
        }
        self.expect_eof()?;
        self.sections_read = true;
        Ok(())
    }

    fn expect_eof(&mut self) -> Result<()> {
        let mut extra = [0u8; 1];
        match self.src.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(bad(&self.name, "end", "data after the end marker")),
            Err(e) => Err(bad(&self.name, "end", e)),
        }
    }

    fn ordinal(&mut self, at: u64) -> Result<u64> {
        let ordinal = self.varint("ordinal")?;
        let h = &self.header;
        if self.last.is_some_and(|l| ordinal <= l) || ordinal % h.parts != h.part {
            return Err(bad(
                &self.name,
                "ordinal",
                format!(
                    "record {at}: ordinal {ordinal} not increasing or not in part {} of {}",
                    h.part, h.parts
                ),
            ));
        }
        Ok(ordinal)
    }

    fn byte(&mut self, field: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        read_exact(&mut self.src, &mut b, &self.name, field)?;
        Ok(b[0])
    }

    fn varint(&mut self, field: &str) -> Result<u64> {
        let mut x = 0u64;
        for i in 0..10 {
            let b = self.byte(field)?;
            let v = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(bad(&self.name, field, "varint overflows 64 bits"));
            }
            x |= v << (7 * i);
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(bad(&self.name, field, "varint longer than 10 bytes"))
    }

    fn string(&mut self, field: &str, at: u64) -> Result<String> {
        let len = self.varint(field)?;
        self.string_of_len(len, field, at)
    }

    fn string_of_len(&mut self, len: u64, field: &str, at: u64) -> Result<String> {
        if len > MAX_NAME_BYTES as u64 {
            return Err(bad(
                &self.name,
                field,
                format!("record {at}: length {len} exceeds {MAX_NAME_BYTES}"),
            ));
        }
        let mut b = vec![0u8; len as usize];
        read_exact(&mut self.src, &mut b, &self.name, field)?;
        String::from_utf8(b).map_err(|_| bad(&self.name, field, format!("record {at}: not UTF-8")))
    }
}

/// The Gram-sums section: the number of categories (LEB128), then per category its name
/// (LEB128 length + UTF-8), n (LEB128) and as f64 LE: S_A (D values), Σ‖v‖², Σ‖v‖⁴, the per-layer
/// Σ‖v_l‖² and Σ‖v_l‖⁴ (L values each) and the upper tiles of M_A (`tile_len` values).
pub fn gram_section_bytes(cats: &[GramCategory]) -> Vec<u8> {
    let mut b = Vec::new();
    put_varint(&mut b, cats.len() as u64);
    for c in cats {
        put_varint(&mut b, c.name.len() as u64);
        b.extend_from_slice(c.name.as_bytes());
        put_varint(&mut b, c.n);
        let scalars = [c.norm2, c.norm4];
        for x in c
            .sum
            .iter()
            .chain(&scalars)
            .chain(&c.layer_norm2)
            .chain(&c.layer_norm4)
            .chain(&c.tiles)
        {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    b
}

/// Reads a Gram-sums section written by [`gram_section_bytes`] for `num_layers` × `num_experts`
/// and `tile_len` tile values, giving each category to `f` (one in memory at a time); `name`
/// is used in errors. Category names must be distinct, non-empty and increasing (as written).
pub fn read_gram_section(
    name: &str,
    r: &mut dyn Read,
    num_layers: usize,
    num_experts: usize,
    tile_len: usize,
    mut f: impl FnMut(GramCategory) -> Result<()>,
) -> Result<()> {
    if tile_len > MAX_GRAM_TILE_VALUES {
        return Err(bad(
            name,
            "gram tiles",
            format!("{tile_len} values per category exceed {MAX_GRAM_TILE_VALUES}"),
        ));
    }
    let d = num_layers * num_experts;
    let mut src = SectionSrc { r, name };
    let count = src.varint("gram categories")?;
    if count > MAX_GRAM_CATEGORIES {
        return Err(bad(
            name,
            "gram categories",
            format!("{count} exceeds {MAX_GRAM_CATEGORIES}"),
        ));
    }
    let mut prev: Option<String> = None;
    for _ in 0..count {
        let len = src.varint("gram category name")?;
        if len == 0 || len > MAX_NAME_BYTES as u64 {
            return Err(bad(
                name,
                "gram category name",
                format!("length {len} (1 to {MAX_NAME_BYTES})"),
            ));
        }
        let mut nb = vec![0u8; len as usize];
        read_exact(src.r, &mut nb, name, "gram category name")?;
        let cat =
            String::from_utf8(nb).map_err(|_| bad(name, "gram category name", "not UTF-8"))?;
        if prev.as_ref().is_some_and(|p| *p >= cat) {
            return Err(bad(
                name,
                "gram category name",
                format!("{cat:?} not after {prev:?} (names must be increasing)"),
            ));
        }
        let n = src.varint("gram n")?;
        let mut vals = |k: usize, field: &str| -> Result<Vec<f64>> {
            let mut v = Vec::with_capacity(k);
            let mut b = [0u8; 8];
            for _ in 0..k {
                read_exact(src.r, &mut b, name, field)?;
                let x = f64::from_le_bytes(b);
                if !x.is_finite() {
                    return Err(bad(name, field, format!("category {cat:?}: {x}")));
                }
                v.push(x);
            }
            Ok(v)
        };
        let sum = vals(d, "gram sum")?;
        let s2 = vals(2, "gram norm sums")?;
        let layer_norm2 = vals(num_layers, "gram layer norms")?;
        let layer_norm4 = vals(num_layers, "gram layer norms")?;
        let tiles = vals(tile_len, "gram tiles")?;
        prev = Some(cat.clone());
        f(GramCategory {
            name: cat,
            n,
            sum,
            norm2: s2[0],
            norm4: s2[1],
            layer_norm2,
            layer_norm4,
            tiles,
        })?;
    }
    let mut extra = [0u8; 1];
    match src.r.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(bad(name, "gram sums", "data after the last category")),
        Err(e) => Err(bad(name, "gram sums", e)),
    }
}

struct SectionSrc<'a> {
    r: &'a mut dyn Read,
    name: &'a str,
}

impl SectionSrc<'_> {
    fn varint(&mut self, field: &str) -> Result<u64> {
        let mut x = 0u64;
        let mut b = [0u8; 1];
        for i in 0..10 {
            read_exact(self.r, &mut b, self.name, field)?;
            if i == 9 && b[0] > 1 {
                return Err(bad(self.name, field, "varint overflows 64 bits"));
            }
            x |= u64::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(bad(self.name, field, "varint longer than 10 bytes"))
    }
}

fn read_exact(r: &mut (impl Read + ?Sized), buf: &mut [u8], name: &str, field: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad(name, field, "truncated file (unexpected end)")
        } else {
            bad(name, field, e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ShardHeader {
        ShardHeader {
            format: SHARD_FORMAT.into(),
            tool_version: "test".into(),
            traces: vec!["t.jsonl".into()],
            part: 1,
            parts: 2,
            num_layers: 2,
            num_experts: 3,
            layers: vec![0, 1],
            top_k: Some(2),
            weighted: false,
            token_types: vec!["prompt".into()],
            manifest: None,
            token_bags_error: None,
            kind: ShardKind::Counts,
            health: false,
        }
    }

    fn rows() -> Vec<(u64, PromptRow)> {
        vec![
            (
                1,
                PromptRow {
                    prompt_id: "a".into(),
                    category: Some("x".into()),
                    counts: vec![1., 0., 3., 300., 2., 1.],
                    tokens_per_layer: vec![2, 151],
                },
            ),
            (
                5,
                PromptRow {
                    prompt_id: "b€".into(),
                    category: None,
                    counts: vec![0.25, 0., 1e300, 0.5, f64::MIN_POSITIVE, 7.],
                    tokens_per_layer: vec![],
                },
            ),
        ]
    }

    fn write(rows: &[(u64, PromptRow)]) -> Vec<u8> {
        let mut w = ShardWriter::new(Vec::new(), 1, 2).unwrap();
        for (i, (o, r)) in rows.iter().enumerate() {
            let bag = [(3u32, 2u64), (70_000, 1), (u32::MAX, 5)];
            w.push(*o, r, (i == 0).then_some(&bag[..])).unwrap();
        }
        let (records, info) = w.finish().unwrap();
        assert_eq!(
            (info.count, info.dim, info.token_layers),
            (2, Some(6), Some(2))
        );
        let mut out = Vec::new();
        write_header(&mut out, &header(), &info).unwrap();
        out.extend_from_slice(&records);
        out
    }

    fn read_all(bytes: Vec<u8>) -> Result<Vec<ShardRecord>> {
        let mut r =
            ShardReader::from_reader("s.mxs".into(), Box::new(std::io::Cursor::new(bytes)))?;
        let mut out = Vec::new();
        while let Some(x) = r.next_record()? {
            out.push(x);
        }
        r.read_sections(|_, rd| {
            std::io::copy(rd, &mut std::io::sink())
                .map_err(|e| StatsError::Other(e.to_string()))?;
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn round_trip_is_exact() {
        let rs = rows();
        let back = read_all(write(&rs)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bag, Some(vec![(3, 2), (70_000, 1), (u32::MAX, 5)]));
        for ((o, r), b) in rs.iter().zip(&back) {
            assert_eq!(*o, b.ordinal);
            assert_eq!(r, &b.row);
            assert_eq!(b.bag.is_some(), b.ordinal == 1);
            for (x, y) in r.counts.iter().zip(&b.row.counts) {
                assert_eq!(x.to_bits(), y.to_bits());
            }
        }
    }

    /// A version-1 shard (header without `kind` / `health`, nothing after the end marker) is
    /// still read.
    #[test]
    fn version_1_shards_are_read() {
        let good = zstd::decode_all(&write(&rows())[..]).unwrap();
        let hlen = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        let h1 = serde_json::to_string(&header())
            .unwrap()
            .replace(",\"kind\":\"counts\",\"health\":false", "");
        assert!(!h1.contains("kind"));
        let mut t = good[..8].to_vec();
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&(h1.len() as u32).to_le_bytes());
        t.extend_from_slice(h1.as_bytes());
        t.extend_from_slice(&good[16 + hlen..good.len() - 1]); // no sections terminator
        let back = read_all(recompress(&t)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].row, rows()[1].1);
        // A version-1 shard cannot claim sections.
        let mut t2 = t.clone();
        t2[8] = 1;
        let h = serde_json::to_string(&ShardHeader {
            health: true,
            ..header()
        })
        .unwrap();
        t2.truncate(12);
        t2.extend_from_slice(&(h.len() as u32).to_le_bytes());
        t2.extend_from_slice(h.as_bytes());
        let err = read_all(recompress(&t2)).unwrap_err().to_string();
        assert!(err.contains("header.kind/health"), "{err}");
    }

    fn gram_cats() -> Vec<GramCategory> {
        let c = |name: &str, x: f64| GramCategory {
            name: name.into(),
            n: 3,
            sum: vec![x; 6],
            norm2: 1.5,
            norm4: x,
            layer_norm2: vec![0.25, x],
            layer_norm4: vec![x, 1e-300],
            tiles: (0..10).map(|i| i as f64 * x).collect(),
        };
        vec![c("a", 0.5), c("b€", -3.25)]
    }

    fn gram_shard(sections: &[(u8, &[u8])], h: ShardHeader) -> Vec<u8> {
        let mut w = ShardWriter::new(Vec::new(), 1, 2).unwrap();
        w.push_id(1, "p1", &PushOutcome::Accepted).unwrap();
        w.push_id(3, "p3", &PushOutcome::Dropped("empty layer 0".into()))
            .unwrap();
        w.push_id(5, "p5", &PushOutcome::NoCategory).unwrap();
        assert!(w.push_id(5, "again", &PushOutcome::Accepted).is_err());
        let (records, mut info) = w.finish_with_sections(sections).unwrap();
        info.dim = None;
        let mut out = Vec::new();
        write_header(&mut out, &h, &info).unwrap();
        out.extend_from_slice(&records);
        out
    }

    #[test]
    fn gram_sums_shards_round_trip_and_refuse_damage() {
        let cats = gram_cats();
        let bytes = gram_section_bytes(&cats);
        let h = ShardHeader {
            kind: ShardKind::GramSums,
            health: true,
            ..header()
        };
        let file = gram_shard(
            &[(SECTION_HEALTH, b"HEALTH"), (SECTION_GRAM, &bytes)],
            h.clone(),
        );
        let mut r =
            ShardReader::from_reader("g.mxs".into(), Box::new(std::io::Cursor::new(file))).unwrap();
        assert!(
            r.next_record().is_err(),
            "a gram shard has no count records"
        );
        let mut r = ShardReader::from_reader(
            "g.mxs".into(),
            Box::new(std::io::Cursor::new(gram_shard(
                &[(SECTION_HEALTH, b"HEALTH"), (SECTION_GRAM, &bytes)],
                h.clone(),
            ))),
        )
        .unwrap();
        let mut ids = Vec::new();
        while let Some(x) = r.next_id().unwrap() {
            ids.push(x);
        }
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1].outcome, PushOutcome::Dropped("empty layer 0".into()));
        let (mut health, mut back) = (Vec::new(), Vec::new());
        r.read_sections(|tag, rd| {
            if tag == SECTION_HEALTH {
                rd.read_to_end(&mut health).unwrap();
                Ok(())
            } else {
                read_gram_section("g.mxs", rd, 2, 3, 10, |c| {
                    back.push(c);
                    Ok(())
                })
            }
        })
        .unwrap();
        assert_eq!(health, b"HEALTH");
        assert_eq!(back, cats);
        // Hostile Gram sections.
        let gram = |b: &[u8], tiles: usize| {
            read_gram_section("g.mxs", &mut &b[..], 2, 3, tiles, |_| Ok(()))
                .unwrap_err()
                .to_string()
        };
        assert!(gram(&bytes[..bytes.len() - 3], 10).contains("gram tiles"));
        assert!(gram(&bytes, 9).contains("g.mxs: shard field gram"));
        assert!(gram(&bytes, MAX_GRAM_TILE_VALUES + 1).contains("gram tiles"));
        assert!(gram(&[0xff, 0xff, 0xff, 0x7f], 10).contains("gram categories"));
        let mut nan = bytes.clone();
        let at = nan.len() - 8;
        nan[at..].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(gram(&nan, 10).contains("gram tiles"));
        let mut swapped = gram_section_bytes(&[cats[1].clone(), cats[0].clone()]);
        assert!(gram(&swapped, 10).contains("increasing"));
        swapped[1] = 0;
        assert!(gram(&swapped, 10).contains("gram category name"));
        // The header promises a health section that is missing.
        let file = gram_shard(&[(SECTION_GRAM, &bytes)], h);
        let mut r =
            ShardReader::from_reader("g.mxs".into(), Box::new(std::io::Cursor::new(file))).unwrap();
        while r.next_id().unwrap().is_some() {}
        let err = r
            .read_sections(|_, rd| {
                std::io::copy(rd, &mut std::io::sink()).unwrap();
                Ok(())
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sections") && err.contains("health = true"),
            "{err}"
        );
    }

    #[test]
    fn writer_refuses_wrong_part_and_order() {
        let mut w = ShardWriter::new(Vec::new(), 1, 2).unwrap();
        let r = rows();
        let err = w.push(2, &r[0].1, None).unwrap_err().to_string();
        assert!(err.contains("not in part 1 of 2"), "{err}");
        w.push(5, &r[0].1, None).unwrap();
        assert!(w.push(3, &r[1].1, None).is_err());
        assert!(w.push(9, &r[1].1, Some(&[(4, 1), (4, 1)])).is_err());
        let mut short = r[1].1.clone();
        short.counts.pop();
        assert!(w.push(7, &short, None).is_err());
        let (_, info) = w.finish().unwrap();
        let mut h = header();
        h.num_experts = 4;
        assert!(write_header(&mut Vec::new(), &h, &info).is_err());
    }

    fn recompress(raw: &[u8]) -> Vec<u8> {
        zstd::encode_all(raw, 1).unwrap()
    }

    #[test]
    fn hostile_shards_are_refused_naming_file_and_field() {
        let good = zstd::decode_all(&write(&rows())[..]).unwrap();
        let check = |raw: Vec<u8>, field: &str| {
            let err = read_all(recompress(&raw)).unwrap_err().to_string();
            assert!(
                err.contains("s.mxs") && err.contains(field),
                "{field}: {err}"
            );
        };
        // Truncated anywhere after the header.
        for cut in [good.len() - 1, good.len() - 5, good.len() / 2] {
            check(good[..cut].to_vec(), "shard field");
        }
        // Trailing data.
        let mut t = good.clone();
        t.push(7);
        check(t, "end");
        // Bad magic and version.
        let mut t = good.clone();
        t[0] = b'X';
        check(t, "magic");
        let mut t = good.clone();
        t[8] = 9;
        check(t, "version");
        // A huge header length is refused before allocating.
        let mut t = good.clone();
        t[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        check(t, "header length");
        // Hostile header fields.
        let hlen = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        let body = &good[16 + hlen..];
        let with_header = |h: &str| {
            let mut t = good[..12].to_vec();
            t.extend_from_slice(&(h.len() as u32).to_le_bytes());
            t.extend_from_slice(h.as_bytes());
            t.extend_from_slice(body);
            t
        };
        let hjson = serde_json::to_string(&header()).unwrap();
        check(
            with_header(&hjson.replace("\"num_experts\":3", "\"num_experts\":1000000")),
            "num_experts",
        );
        check(
            with_header(&hjson.replace("\"parts\":2", "\"parts\":0")),
            "header.part",
        );
        check(
            with_header(&hjson.replace("\"layers\":[0,1]", "\"layers\":[1,0]")),
            "header.layers",
        );
        check(
            with_header(&hjson.replace("\"weighted\"", "\"surprise\":1,\"weighted\"")),
            "header",
        );
        // Record count in the end marker.
        let mut t = good.clone();
        let last = t.len() - 2; // the count, before the sections' terminator
        t[last] = 3;
        check(t, "record count");
        // A section the header does not announce, and a section length beyond the data.
        let mut t = good.clone();
        t.pop();
        t.extend_from_slice(&[SECTION_HEALTH, 1, 9, 0]);
        check(t, "sections");
        let mut t = good.clone();
        t.pop();
        t.extend_from_slice(&[SECTION_GRAM, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        check(t, "section length");
        // A prompt-id length beyond the limit.
        let mut t = good[..16 + hlen].to_vec();
        t.extend_from_slice(&[1, 1]); // tag, ordinal 1
        t.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]); // length 2^28 - 1
        check(t, "prompt_id");
        // An ordinal outside the part.
        let mut t = good[..16 + hlen].to_vec();
        t.extend_from_slice(&[1, 2]);
        check(t, "ordinal");
        // Not zstd at all.
        let err = read_all(b"hello world".to_vec()).unwrap_err().to_string();
        assert!(err.contains("s.mxs"), "{err}");
    }
}
