//! Analysis shards: the exact sufficient statistics of `analyze` for a subset of prompts
//! (`moe-xray map`), combined by `moe-xray merge` into the results of one `analyze` over all of
//! them. Format and rules: `docs/statistics.md`, "Sharded analysis".
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
//! - the end: tag byte 0 and the number of records (LEB128); nothing may follow.
//!
//! Every size read is checked against a limit before anything is allocated from it, and every
//! error names the file and the field.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StatsError};
use crate::input::PromptRow;

/// The magic bytes at the start of a (decompressed) shard.
pub const SHARD_MAGIC: &[u8; 8] = b"MXSHARD\0";
/// The version of the shard format this build writes and reads.
pub const SHARD_VERSION: u32 = 1;
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
    pub fn finish(mut self) -> Result<(W, RecordsInfo)> {
        let io = |e: std::io::Error| StatsError::Other(format!("writing the shard: {e}"));
        let mut b = vec![0u8];
        put_varint(&mut b, self.info.count);
        self.enc.write_all(&b).map_err(io)?;
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
    count: u64,
    last: Option<u64>,
    done: bool,
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
        if version != SHARD_VERSION {
            return Err(bad(
                &name,
                "version",
                format!("version {version} is not supported (this build reads {SHARD_VERSION})"),
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
        Ok(ShardReader {
            name,
            src,
            header,
            d,
            count: 0,
            last: None,
            done: false,
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
            let mut extra = [0u8; 1];
            match self.src.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => return Err(bad(n, "end", "data after the end marker")),
                Err(e) => return Err(bad(n, "end", e)),
            }
            self.done = true;
            return Ok(None);
        }
        if tag != 1 {
            return Err(bad(
                n,
                "record tag",
                format!("{tag} after record {}", self.count),
            ));
        }
        let at = self.count;
        let ordinal = self.varint("ordinal")?;
        let h = &self.header;
        if self.last.is_some_and(|l| ordinal <= l) || ordinal % h.parts != h.part {
            return Err(bad(
                n,
                "ordinal",
                format!(
                    "record {at}: ordinal {ordinal} not increasing or not in part {} of {}",
                    h.part, h.parts
                ),
            ));
        }
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

fn read_exact(r: &mut impl Read, buf: &mut [u8], name: &str, field: &str) -> Result<()> {
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
        let last = t.len() - 1;
        t[last] = 3;
        check(t, "record count");
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
