//! Staged output: the importers write `trace.jsonl` and `manifest.json` into a temporary
//! directory beside `--out`, and only a complete import is renamed to `--out`. Any error drops
//! the temporary directory, so nothing is written (`--out` must not exist or be empty).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use moe_xray_trace::{CountsLine, Manifest, RoutingRecord, TokenType};
use serde_json::{json, Value};

use crate::config::ModelShape;
use crate::{ImportError, Result};

/// File names inside the output directory.
pub const TRACE_FILE: &str = "trace.jsonl";

/// One request's routing: `rows` is the flat `[n_rows, layers, k]` array (C order) of expert ids
/// as the engine recorded them; rows `0..prompt_tokens` are prompt tokens, the rest generated
/// tokens (positions continue from `prompt_tokens`).
#[derive(Debug, Clone)]
pub struct Sequence<'a> {
    pub prompt_id: String,
    pub category: Option<String>,
    pub prompt_tokens: usize,
    pub rows: &'a [i64],
    pub n_rows: usize,
    pub layers: usize,
    pub k: usize,
    /// Vocabulary id of each row's token, when the source has them (same length as the rows).
    pub token_ids: Option<Vec<u32>>,
    /// Router weights aligned with `rows` (`[n_rows, layers, k]`), when the source has them
    /// (HF router logits); engines record none.
    pub weights: Option<&'a [f32]>,
}

/// Totals reported in the manifest and by the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub prompts: usize,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Tokens whose every entry was -1 (padding): skipped.
    pub padding_tokens: u64,
}

/// Directories created for `--out`'s parent, removed again (if still empty) unless disarmed.
struct CreatedDirs {
    dirs: Vec<PathBuf>,
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

pub struct Staged {
    out: PathBuf,
    tmp: tempfile::TempDir,
    trace: BufWriter<File>,
    seen: HashSet<String>,
    shape: ModelShape,
    layer_map: Option<Vec<usize>>,
    top_k: Option<usize>,
    counts_mode: Option<bool>,
    pub stats: ImportStats,
    // Last: dropped after the staging directory is removed.
    created: CreatedDirs,
}

fn tmp_err(path: &Path, e: std::io::Error) -> ImportError {
    ImportError::io(path, e)
}

impl Staged {
    /// Prepares a staging directory for `out` (which must not exist, or be an empty directory).
    pub fn create(out: &Path, shape: ModelShape) -> Result<Staged> {
        if out.exists() {
            let empty = out.is_dir()
                && std::fs::read_dir(out)
                    .map_err(|e| ImportError::io(out, e))?
                    .next()
                    .is_none();
            if !empty {
                return Err(ImportError::invalid_file(
                    out,
                    "output directory exists and is not empty (nothing was written)",
                ));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut missing = Vec::new();
        let mut a = parent.as_path();
        while !a.as_os_str().is_empty() && !a.exists() {
            missing.push(a.to_path_buf());
            a = a.parent().unwrap_or(Path::new(""));
        }
        missing.reverse();
        let created = CreatedDirs { dirs: missing };
        std::fs::create_dir_all(&parent).map_err(|e| ImportError::io(&parent, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".moe-xray-staging-import-")
            .tempdir_in(&parent)
            .map_err(|e| ImportError::io(&parent, e))?;
        let tp = tmp.path().join(TRACE_FILE);
        let f = File::create(&tp).map_err(|e| tmp_err(&tp, e))?;
        Ok(Staged {
            out: out.to_path_buf(),
            tmp,
            trace: BufWriter::with_capacity(1 << 16, f),
            seen: HashSet::new(),
            shape,
            layer_map: None,
            top_k: None,
            counts_mode: None,
            stats: ImportStats::default(),
            created,
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    fn claim_id(&mut self, file: &Path, record: &str, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(ImportError::invalid(file, record, "empty prompt id"));
        }
        if !self.seen.insert(id.to_string()) {
            return Err(ImportError::invalid(
                file,
                record,
                format!("duplicate prompt id {id:?}"),
            ));
        }
        Ok(())
    }

    fn set_mode(&mut self, file: &Path, counts: bool) -> Result<()> {
        match self.counts_mode {
            Some(c) if c != counts => Err(ImportError::invalid_file(
                file,
                "cannot mix per-token routing and aggregated counts in one import",
            )),
            _ => {
                self.counts_mode = Some(counts);
                Ok(())
            }
        }
    }

    /// Validates the dimensions of an array against the model shape and earlier arrays; returns
    /// the decoder-layer indices of the MoE layers.
    fn check_dims(
        &mut self,
        file: &Path,
        record: &str,
        layers: usize,
        k: usize,
    ) -> Result<Vec<usize>> {
        let bad = |m: String| {
            ImportError::invalid(
                file,
                record,
                format!("wrong shape for the stated config: {m}"),
            )
        };
        if let Some(k0) = self.shape.top_k {
            if k != k0 {
                return Err(bad(format!(
                    "top-k dimension {k} differs from num_experts_per_tok = {k0}"
                )));
            }
        }
        if k == 0 || k > self.shape.num_experts {
            return Err(bad(format!(
                "top-k dimension {k} must be in 1..={}",
                self.shape.num_experts
            )));
        }
        if let Some(k0) = self.top_k {
            if k != k0 {
                return Err(bad(format!(
                    "top-k dimension {k} differs from earlier records' {k0}"
                )));
            }
        }
        let map = self.shape.layer_map(layers).map_err(bad)?;
        if let Some(prev) = &self.layer_map {
            if prev.len() != map.len() {
                return Err(bad(format!(
                    "{} MoE layers differ from earlier records' {}",
                    map.len(),
                    prev.len()
                )));
            }
        }
        self.top_k = Some(k);
        self.layer_map = Some(map.clone());
        Ok(map)
    }

    /// Validates one request's routing completely, then appends its records.
    pub fn write_sequence(&mut self, file: &Path, record: &str, seq: &Sequence<'_>) -> Result<()> {
        self.set_mode(file, false)?;
        let (layers, k) = (seq.layers, seq.k);
        let expect = seq
            .n_rows
            .checked_mul(layers)
            .and_then(|x| x.checked_mul(k))
            .ok_or_else(|| ImportError::invalid(file, record, "array size overflows"))?;
        if seq.rows.len() != expect {
            return Err(ImportError::invalid(
                file,
                record,
                format!(
                    "{} values do not fill the shape [{}, {layers}, {k}]",
                    seq.rows.len(),
                    seq.n_rows
                ),
            ));
        }
        if seq.prompt_tokens > seq.n_rows {
            return Err(ImportError::invalid(
                file,
                record,
                format!(
                    "{} routing rows are fewer than the {} prompt tokens",
                    seq.n_rows, seq.prompt_tokens
                ),
            ));
        }
        if u32::try_from(seq.n_rows).is_err() || seq.n_rows >= 1 << 20 {
            return Err(ImportError::invalid(
                file,
                record,
                format!("{} token positions exceed the limit of 2^20", seq.n_rows),
            ));
        }
        if let Some(w) = seq.weights {
            if w.len() != expect {
                return Err(ImportError::invalid(
                    file,
                    record,
                    format!("{} weights for {expect} expert ids", w.len()),
                ));
            }
        }
        if let Some(ids) = &seq.token_ids {
            if ids.len() != seq.n_rows {
                return Err(ImportError::invalid(
                    file,
                    record,
                    format!("{} token ids for {} routing rows", ids.len(), seq.n_rows),
                ));
            }
        }
        let map = self.check_dims(file, record, layers, k)?;
        let e_max = self.shape.num_experts as i64;
        // Pass 1: validate, mark padding tokens.
        let mut padding = vec![false; seq.n_rows];
        for (t, pad) in padding.iter_mut().enumerate() {
            let tt = if t < seq.prompt_tokens {
                "prompt"
            } else {
                "generation"
            };
            let mut n_pad = 0usize;
            for &l in &map {
                let row = &seq.rows[(t * layers + l) * k..(t * layers + l + 1) * k];
                let minus = row.iter().filter(|&&x| x == -1).count();
                if minus == k {
                    n_pad += 1;
                    continue;
                }
                let at = |m: String| {
                    ImportError::invalid(file, record, format!("token {t} ({tt}), layer {l}: {m}"))
                };
                if minus > 0 {
                    return Err(at(format!(
                        "-1 (no expert) mixed with expert ids in {row:?}"
                    )));
                }
                for (j, &x) in row.iter().enumerate() {
                    if x < 0 || x >= e_max {
                        return Err(at(format!(
                            "expert id {x} out of range (num_experts = {e_max})"
                        )));
                    }
                    if row[..j].contains(&x) {
                        return Err(at(format!("expert id {x} selected twice in {row:?}")));
                    }
                }
            }
            if n_pad == map.len() {
                *pad = true;
            } else if n_pad > 0 {
                return Err(ImportError::invalid(
                    file,
                    record,
                    format!("token {t} ({tt}): -1 (padding) in some MoE layers but not in all"),
                ));
            }
        }
        let id = seq.prompt_id.clone();
        self.claim_id(file, record, &id)?;
        // Pass 2: write.
        let tp = self.tmp.path().join(TRACE_FILE);
        for (t, &pad) in padding.iter().enumerate() {
            if pad {
                self.stats.padding_tokens += 1;
                continue;
            }
            let token_type = if t < seq.prompt_tokens {
                self.stats.prompt_tokens += 1;
                TokenType::Prompt
            } else {
                self.stats.generation_tokens += 1;
                TokenType::Generation
            };
            for (out_l, &l) in map.iter().enumerate() {
                let row = &seq.rows[(t * layers + l) * k..(t * layers + l + 1) * k];
                let span = (t * layers + l) * k..(t * layers + l + 1) * k;
                let rec = RoutingRecord {
                    prompt_id: id.clone(),
                    category: seq.category.clone(),
                    layer: self.shape.out_layer(out_l) as u32,
                    position: t as u32,
                    token_id: seq.token_ids.as_ref().map(|ids| ids[t]),
                    token_type,
                    experts: row.iter().map(|&x| x as u32).collect(),
                    weights: seq.weights.map(|w| w[span].to_vec()),
                    probs: None,
                };
                serde_json::to_writer(&mut self.trace, &rec)
                    .map_err(|e| tmp_err(&tp, std::io::Error::other(e)))?;
                self.trace.write_all(b"\n").map_err(|e| tmp_err(&tp, e))?;
            }
        }
        self.stats.prompts += 1;
        Ok(())
    }

    /// Appends aggregated counts of one pseudo-prompt (one counts line per token type).
    /// `counts` is `[layers_of_array, E]` layer-major; dense layers are dropped with the map.
    pub fn write_counts(
        &mut self,
        file: &Path,
        record: &str,
        prompt_id: &str,
        counts: &[i64],
        layers: usize,
        k: usize,
    ) -> Result<()> {
        self.set_mode(file, true)?;
        let e = self.shape.num_experts;
        if Some(counts.len()) != layers.checked_mul(e) {
            return Err(ImportError::invalid(
                file,
                record,
                format!(
                    "wrong shape for the stated config: {} counts are not [{layers}, {e}]",
                    counts.len()
                ),
            ));
        }
        let map = self.check_dims(file, record, layers, k)?;
        let mut out = Vec::with_capacity(map.len() * e);
        let mut tokens: Option<u64> = None;
        for (out_l, &l) in map.iter().enumerate() {
            let row = &counts[l * e..(l + 1) * e];
            let mut sum: u64 = 0;
            for (x, &c) in row.iter().enumerate() {
                let c = u64::try_from(c).map_err(|_| {
                    ImportError::invalid(
                        file,
                        record,
                        format!("layer {l}, expert {x}: negative count {c}"),
                    )
                })?;
                sum = sum.checked_add(c).ok_or_else(|| {
                    ImportError::invalid(file, record, format!("layer {l}: count sum overflows"))
                })?;
                out.push(c);
            }
            if !sum.is_multiple_of(k as u64) {
                return Err(ImportError::invalid(
                    file,
                    record,
                    format!("layer {l}: {sum} selections are not a multiple of top_k = {k}"),
                ));
            }
            let t = sum / k as u64;
            match tokens {
                Some(t0) if t0 != t => {
                    return Err(ImportError::invalid(
                        file,
                        record,
                        format!(
                            "layer {l} counts {t} tokens but MoE layer {} counted {t0} (every token is routed once per layer)",
                            map[0]
                        ),
                    ))
                }
                _ => tokens = Some(t),
            }
            let _ = out_l;
        }
        self.claim_id(file, record, prompt_id)?;
        let tokens = tokens.unwrap_or(0);
        // With a routing block the rows are the decoder layers (dense rows zero).
        let rows = self.out_rows(map.len());
        let out = if rows == map.len() {
            out
        } else {
            let mut full = vec![0u64; rows * e];
            for (row, chunk) in out.chunks_exact(e).enumerate() {
                let l = self.shape.out_layer(row);
                full[l * e..(l + 1) * e].copy_from_slice(chunk);
            }
            full
        };
        let tp = self.tmp.path().join(TRACE_FILE);
        for (tt, c, t) in [
            (TokenType::Prompt, out, tokens),
            (TokenType::Generation, vec![0u64; rows * e], 0),
        ] {
            let line = CountsLine {
                prompt_id: prompt_id.to_string(),
                category: None,
                token_type: tt,
                num_layers: rows,
                num_experts: e,
                tokens: t,
                counts: c,
                weighted_counts: None,
            };
            serde_json::to_writer(&mut self.trace, &line)
                .map_err(|e| tmp_err(&tp, std::io::Error::other(e)))?;
            self.trace.write_all(b"\n").map_err(|e| tmp_err(&tp, e))?;
        }
        self.stats.prompts += 1;
        self.stats.prompt_tokens += tokens;
        Ok(())
    }

    /// Layers of the output: the decoder layers with a routing block, else the MoE layers kept.
    fn out_rows(&self, moe_rows: usize) -> usize {
        match (&self.shape.routing, self.shape.num_hidden_layers) {
            (Some(_), Some(h)) => h,
            _ => moe_rows,
        }
    }

    /// Writes the manifest and moves the finished directory to `--out`. `import` is recorded
    /// under the manifest's `import` key (engine, sources, what the source lacks).
    pub fn finish(mut self, engine: &str, mut import: Value) -> Result<(PathBuf, ImportStats)> {
        let tp = self.tmp.path().join(TRACE_FILE);
        if self.stats.prompts == 0 {
            return Err(ImportError::Usage(
                "no routing records found in the inputs (nothing was written)".into(),
            ));
        }
        self.trace.flush().map_err(|e| tmp_err(&tp, e))?;
        self.trace
            .get_ref()
            .sync_all()
            .map_err(|e| tmp_err(&tp, e))?;
        let layers = self.out_rows(self.layer_map.as_ref().map_or(0, Vec::len));
        let counts = self.counts_mode == Some(true);
        if let Value::Object(m) = &mut import {
            m.insert("engine".into(), json!(engine));
            m.insert("prompts".into(), json!(self.stats.prompts));
            m.insert("prompt_tokens".into(), json!(self.stats.prompt_tokens));
            m.insert(
                "generation_tokens".into(),
                json!(self.stats.generation_tokens),
            );
            m.insert(
                "padding_tokens_skipped".into(),
                json!(self.stats.padding_tokens),
            );
            if let Some(map) = &self.layer_map {
                m.insert("moe_layers_of_source".into(), json!(map));
            }
            if let Some(src) = &self.shape.source {
                m.insert("config".into(), json!(src.display().to_string()));
            }
        }
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("import".to_string(), import);
        let manifest = Manifest {
            model: self.shape.model.clone(),
            num_layers: layers,
            num_experts: self.shape.num_experts,
            top_k: self.top_k.unwrap_or(1),
            dtype: String::new(),
            generation: json!({}),
            prompt_set_hash: None,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            capture_mode: if counts { "counts" } else { "events" }.to_string(),
            routing: self.shape.routing.clone(),
            extra,
        };
        manifest.write(
            self.tmp
                .path()
                .join(moe_xray_trace::manifest::MANIFEST_FILE),
        )?;
        let stats = self.stats.clone();
        let out = self.out.clone();
        let Staged {
            tmp,
            trace,
            mut created,
            ..
        } = self;
        drop(trace);
        let staged = tmp.keep();
        if let Err(e) = std::fs::rename(&staged, &out) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(ImportError::io(&out, e));
        }
        created.dirs.clear();
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok((out, stats))
    }
}
