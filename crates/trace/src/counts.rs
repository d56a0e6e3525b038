//! Streaming aggregation of trace files into per-prompt L×E selection counts.
//!
//! Memory is per prompt, never per line: each prompt holds its L×E counts, its per-layer token
//! totals and a compact duplicate detector (one bit per (token type, layer, position) for
//! records, one bit per (token type, layer, position, expert) for flat events, one bit per token
//! type for counts lines). Every line is validated (see `docs/trace-format.md`), including lines
//! of token types that are not selected. Sizes from the input are checked against
//! [`crate::limits`] before anything is allocated from them; the duplicate detectors are sparse,
//! so a line with a huge position or layer costs a bounded amount of memory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::limits::{check_dims, check_table, MAX_LAYER_EXPERTS};
pub use crate::limits::{MAX_EXPERTS, MAX_LAYERS, MAX_POSITIONS};
use crate::manifest::{manifest_path_beside, read_manifest_beside, Manifest};
use crate::reader::{CountsLine, FlatEvent, TraceForm, TraceItem, TraceReader};
use crate::{Result, RoutingRecord, TokenType, TraceError};

/// What to aggregate and how.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateOptions {
    /// Token types to count; an empty list means both.
    pub token_types: Vec<TokenType>,
    /// Add router weights (`weights` / `weight` / `weighted_counts`) instead of 1 per selection;
    /// a selected line without weights is then an error.
    pub weighted: bool,
    /// L; when `None`: the manifest beside the first trace, else the counts lines, else max+1.
    pub num_layers: Option<usize>,
    /// E; resolved like `num_layers`.
    pub num_experts: Option<usize>,
    /// k; when `None`: the manifest, else inferred from the data (and then checked consistent).
    pub top_k: Option<usize>,
    /// prompt_id -> category (from `--prompts`); conflicts with trace categories are errors.
    pub categories: Option<HashMap<String, String>>,
}

impl Default for AggregateOptions {
    fn default() -> Self {
        AggregateOptions {
            token_types: vec![TokenType::Prompt, TokenType::Generation],
            weighted: false,
            num_layers: None,
            num_experts: None,
            top_k: None,
            categories: None,
        }
    }
}

/// Counts of one prompt. Rows are the MoE layers in decoder order (every decoder layer when the
/// manifest has no `routing` block); [`CountsTable::layers`] / [`StreamInfo::layers`] give
/// the decoder-layer index of each row.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptCounts {
    pub prompt_id: String,
    pub category: Option<String>,
    /// L*E, layer-major (`l * E + e`): selections (or summed weights) of expert e at row l.
    pub counts: Vec<f64>,
    /// L entries: number of selected tokens with a routing decision at each row.
    pub tokens_per_layer: Vec<u64>,
}

/// Counts of all prompts of a set of trace files.
#[derive(Debug, Clone, PartialEq)]
pub struct CountsTable {
    /// Number of rows L' of each prompt's counts: the MoE layers (all decoder layers when the
    /// manifest has no `routing` block).
    pub num_layers: usize,
    /// Decoder-layer index of each row (`num_layers` entries, ascending; `0..num_layers` when
    /// every decoder layer is an MoE layer).
    pub layers: Vec<u32>,
    pub num_experts: usize,
    pub top_k: Option<usize>,
    /// In order of first appearance; prompts without selected tokens are kept with zero counts.
    pub prompts: Vec<PromptCounts>,
    /// The manifest beside the first trace file, if any.
    pub manifest: Option<Manifest>,
    /// True when L or E was inferred from the data as max index + 1.
    pub dims_inferred: bool,
}

/// Key of one (token type, layer, position) in the sparse duplicate detectors (layer <
/// [`MAX_LAYERS`] = 2^12 and position < [`MAX_POSITIONS`] = 2^20 are checked before).
fn slot_key(t: usize, layer: usize, position: usize) -> u64 {
    ((t as u64) << 32) | ((layer as u64) << 20) | position as u64
}

fn slot_parts(key: u64) -> (usize, usize, u32) {
    (
        (key >> 32) as usize,
        ((key >> 20) & 0xfff) as usize,
        (key & 0xf_ffff) as u32,
    )
}

fn tt_index(t: TokenType) -> usize {
    match t {
        TokenType::Prompt => 0,
        TokenType::Generation => 1,
    }
}

/// Growable bitset.
#[derive(Debug, Default, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, i % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] >> b & 1 == 1;
        self.0[w] |= 1 << b;
        was
    }
    fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

#[derive(Debug, Default)]
struct Acc {
    prompt_id: String,
    category: Option<String>,
    category_from: String,
    /// layer -> expert -> count (grown on demand when dimensions are not known yet).
    counts: Vec<Vec<f64>>,
    tokens_per_layer: Vec<u64>,
    /// records: (token type, layer, position / 64) -> bit per position (sparse: memory grows
    /// with the records seen, not with the largest position).
    rec_seen: HashMap<u64, u64>,
    /// events: (token type, layer, position) -> bit per expert.
    ev_seen: HashMap<u64, Bits>,
    /// counts lines: bit per token type.
    counts_seen: u8,
    first_path: usize,
}

impl Acc {
    fn new(prompt_id: &str, first_path: usize) -> Acc {
        Acc {
            prompt_id: prompt_id.to_string(),
            first_path,
            ..Acc::default()
        }
    }

    fn add(&mut self, layer: usize, expert: usize, v: f64) {
        if self.counts.len() <= layer {
            self.counts.resize_with(layer + 1, Vec::new);
        }
        let row = &mut self.counts[layer];
        if row.len() <= expert {
            row.resize(expert + 1, 0.0);
        }
        row[expert] += v;
    }

    /// Row of layer `layer`, at least `e` long.
    fn row_mut(&mut self, layer: usize, e: usize) -> &mut [f64] {
        if self.counts.len() <= layer {
            self.counts.resize_with(layer + 1, Vec::new);
        }
        let row = &mut self.counts[layer];
        if row.len() < e {
            row.resize(e, 0.0);
        }
        &mut row[..e]
    }

    fn add_tokens(&mut self, layer: usize, n: u64) {
        if self.tokens_per_layer.len() <= layer {
            self.tokens_per_layer.resize(layer + 1, 0);
        }
        self.tokens_per_layer[layer] += n;
    }

    /// `l * e` was checked against the limits by [`State::dims`].
    fn finish(self, l: usize, e: usize) -> PromptCounts {
        let mut counts = vec![0.0; l.saturating_mul(e)];
        for (li, row) in self.counts.into_iter().enumerate().take(l) {
            for (ei, v) in row.into_iter().enumerate().take(e) {
                counts[li * e + ei] = v;
            }
        }
        let mut tokens_per_layer = self.tokens_per_layer;
        tokens_per_layer.resize(l, 0);
        PromptCounts {
            prompt_id: self.prompt_id,
            category: self.category,
            counts,
            tokens_per_layer,
        }
    }
}

/// State shared by all prompts of an aggregation.
struct State<'a> {
    opts: &'a AggregateOptions,
    selected: [bool; 2],
    paths: Vec<PathBuf>,
    /// Known L and E (from options, manifest or counts lines).
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<(usize, String)>,
    max_layer: Option<usize>,
    max_expert: Option<usize>,
    probs_len: Option<usize>,
    form: Option<(TraceForm, usize)>,
    manifest: Option<Manifest>,
    /// From the manifest's `routing` block: for each decoder layer its MoE row (`None`: dense),
    /// and the manifest's path for messages. `None`: every layer is an MoE layer.
    layout: Option<(Vec<Option<usize>>, String)>,
}

impl<'a> State<'a> {
    fn new(paths: &[PathBuf], opts: &'a AggregateOptions) -> Result<State<'a>> {
        if paths.is_empty() {
            return Err(TraceError::invalid_file(".", "no trace files given"));
        }
        let mut selected = [false; 2];
        for t in &opts.token_types {
            selected[tt_index(*t)] = true;
        }
        if opts.token_types.is_empty() {
            selected = [true; 2];
        }
        // Manifests beside the traces must agree with each other on the dimensions.
        let mut manifest: Option<(Manifest, PathBuf)> = None;
        for p in paths {
            if let Some(m) = read_manifest_beside(p)? {
                let mp = manifest_path_beside(p);
                match &manifest {
                    None => manifest = Some((m, mp)),
                    Some((m0, p0)) => {
                        if (m0.num_layers, m0.num_experts, m0.top_k)
                            != (m.num_layers, m.num_experts, m.top_k)
                        {
                            return Err(TraceError::invalid_file(
                                &mp,
                                format!(
                                    "manifest dimensions L={} E={} k={} differ from {} (L={} E={} k={})",
                                    m.num_layers,
                                    m.num_experts,
                                    m.top_k,
                                    p0.display(),
                                    m0.num_layers,
                                    m0.num_experts,
                                    m0.top_k
                                ),
                            ));
                        }
                        let moe = |m: &Manifest| m.routing.as_ref().map(|r| r.moe_layers.clone());
                        if moe(m0) != moe(&m) {
                            return Err(TraceError::invalid_file(
                                &mp,
                                format!(
                                    "routing.moe_layers {:?} differ from {} ({:?})",
                                    m.moe_layers(),
                                    p0.display(),
                                    m0.moe_layers()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let manifest_path = manifest.as_ref().map(|(_, p)| p.display().to_string());
        let manifest = manifest.map(|(m, _)| m);
        check_given_dims(opts).map_err(|m| TraceError::invalid_file(&paths[0], m))?;
        let num_layers = opts.num_layers.or(manifest.as_ref().map(|m| m.num_layers));
        let num_experts = opts
            .num_experts
            .or(manifest.as_ref().map(|m| m.num_experts));
        if num_layers == Some(0) || num_experts == Some(0) {
            return Err(TraceError::invalid_file(
                &paths[0],
                "num_layers and num_experts must be at least 1",
            ));
        }
        let top_k = match (opts.top_k, &manifest) {
            (Some(k), _) => Some((k, "the given top_k".to_string())),
            (None, Some(m)) => Some((
                m.top_k,
                format!("top_k in {}", manifest_path.clone().unwrap_or_default()),
            )),
            _ => None,
        };
        if let (Some((k, _)), Some(e)) = (&top_k, num_experts) {
            if *k == 0 || *k > e {
                return Err(TraceError::invalid_file(
                    &paths[0],
                    format!("top_k = {k} must be between 1 and num_experts = {e}"),
                ));
            }
        }
        if let (Some(l), Some(e)) = (num_layers, num_experts) {
            check_dims(l, e, None).map_err(|m| TraceError::invalid_file(&paths[0], m))?;
        }
        let mut layout = None;
        if let Some((m, r)) = manifest
            .as_ref()
            .and_then(|m| m.routing.as_ref().map(|r| (m, r)))
        {
            let mp = manifest_path.clone().unwrap_or_default();
            if num_layers != Some(m.num_layers) {
                return Err(TraceError::invalid_file(
                    &paths[0],
                    format!(
                        "the given num_layers = {} differs from num_layers = {} in {mp}, whose routing block lists the MoE layers of its decoder layers",
                        num_layers.unwrap_or(0),
                        m.num_layers
                    ),
                ));
            }
            layout = Some((r.rows(m.num_layers), mp));
        }
        Ok(State {
            opts,
            selected,
            paths: paths.to_vec(),
            num_layers,
            num_experts,
            top_k,
            max_layer: None,
            max_expert: None,
            probs_len: None,
            form: None,
            manifest,
            layout,
        })
    }

    fn open(&self, pi: usize) -> Result<TraceReader> {
        Ok(TraceReader::open(&self.paths[pi])?.with_dims(self.num_layers, self.num_experts))
    }

    fn err(&self, pi: usize, line: usize, msg: impl Into<String>) -> TraceError {
        TraceError::invalid(&self.paths[pi], line, msg)
    }

    fn note_form(&mut self, pi: usize, line: usize, form: TraceForm) -> Result<()> {
        match self.form {
            None => self.form = Some((form, pi)),
            Some((f, p0)) if f != form => {
                return Err(self.err(
                    pi,
                    line,
                    format!(
                        "this file holds {} but {} holds {}; all trace files must have the same line form",
                        form.name(),
                        self.paths[p0].display(),
                        f.name()
                    ),
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn check_top_k(&mut self, pi: usize, line: usize, k: usize) -> Result<()> {
        match &self.top_k {
            None => {
                let src = format!("{}:{line}", self.paths[pi].display());
                self.top_k = Some((k, src));
            }
            Some((k0, src)) if *k0 != k => {
                return Err(self.err(
                    pi,
                    line,
                    format!("mixed top-k: {k} experts per token here but {k0} ({src})"),
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn check_category(
        &self,
        acc: &mut Acc,
        pi: usize,
        line: usize,
        cat: Option<&str>,
    ) -> Result<()> {
        let Some(c) = cat else { return Ok(()) };
        match &acc.category {
            None => {
                acc.category = Some(c.to_string());
                acc.category_from = format!("{}:{line}", self.paths[pi].display());
            }
            Some(c0) if c0 != c => {
                return Err(self.err(
                    pi,
                    line,
                    format!(
                        "category conflict for prompt '{}': \"{c}\" here but \"{c0}\" ({})",
                        acc.prompt_id, acc.category_from
                    ),
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// A record or event at a dense layer (listed in the manifest's `routing.dense_layers`) is
    /// an error: dense layers have no router.
    fn check_not_dense(&self, pi: usize, line: usize, layer: usize) -> Result<()> {
        if let Some((rows, mp)) = &self.layout {
            if matches!(rows.get(layer), Some(None)) {
                return Err(self.err(
                    pi,
                    line,
                    format!(
                        "layer {layer} is a dense layer (routing.dense_layers in {mp}): dense layers have no router and no routing records"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether decoder layer `layer` is a dense layer of the manifest's routing block.
    fn is_dense(&self, layer: usize) -> bool {
        matches!(&self.layout, Some((rows, _)) if matches!(rows.get(layer), Some(None)))
    }

    /// The counts of `acc` with only the MoE-layer rows (all rows without a routing block).
    fn finish_acc(&self, acc: Acc, l: usize, e: usize) -> PromptCounts {
        let mut p = acc.finish(l, e);
        if let Some((rows, _)) = &self.layout {
            let moe: Vec<usize> = (0..l)
                .filter(|&li| matches!(rows.get(li), Some(Some(_))))
                .collect();
            let mut counts = Vec::with_capacity(moe.len().saturating_mul(e));
            let mut tokens = Vec::with_capacity(moe.len());
            for &li in &moe {
                counts.extend_from_slice(&p.counts[li * e..(li + 1) * e]);
                tokens.push(p.tokens_per_layer[li]);
            }
            p.counts = counts;
            p.tokens_per_layer = tokens;
        }
        p
    }

    /// Decoder-layer index of each row of the finished counts (`l` decoder layers).
    fn row_layers(&self, l: usize) -> Vec<u32> {
        (0..l as u32)
            .filter(|&li| !self.is_dense(li as usize))
            .collect()
    }

    fn see_layer_expert(&mut self, layer: usize, expert: usize) {
        self.max_layer = Some(self.max_layer.map_or(layer, |m| m.max(layer)));
        self.max_expert = Some(self.max_expert.map_or(expert, |m| m.max(expert)));
    }

    fn apply(&mut self, acc: &mut Acc, pi: usize, line: usize, item: &TraceItem) -> Result<()> {
        self.note_form(pi, line, item.form())?;
        let (layer, position, max_expert) = match item {
            TraceItem::Record(r) => (r.layer, r.position, r.experts.iter().max().copied()),
            TraceItem::Event(e) => (e.layer, e.position, Some(e.expert)),
            TraceItem::Counts(_) => (0, 0, None),
        };
        if layer as usize >= MAX_LAYERS {
            return Err(self.err(
                pi,
                line,
                format!(
                    "layer {layer} exceeds the supported maximum {}",
                    MAX_LAYERS - 1
                ),
            ));
        }
        if position as usize >= MAX_POSITIONS {
            return Err(self.err(
                pi,
                line,
                format!(
                    "position {position} exceeds the supported maximum {}",
                    MAX_POSITIONS - 1
                ),
            ));
        }
        if !matches!(item, TraceItem::Counts(_)) {
            self.check_not_dense(pi, line, layer as usize)?;
        }
        if let Some(e) = max_expert.filter(|&e| e as usize >= MAX_EXPERTS) {
            return Err(self.err(
                pi,
                line,
                format!(
                    "expert {e} exceeds the supported maximum {}",
                    MAX_EXPERTS - 1
                ),
            ));
        }
        self.check_category(acc, pi, line, item.category())?;
        match item {
            TraceItem::Record(r) => self.apply_record(acc, pi, line, r),
            TraceItem::Event(e) => self.apply_event(acc, pi, line, e),
            TraceItem::Counts(c) => self.apply_counts(acc, pi, line, c),
        }
    }

    fn apply_record(
        &mut self,
        acc: &mut Acc,
        pi: usize,
        line: usize,
        r: &RoutingRecord,
    ) -> Result<()> {
        let t = tt_index(r.token_type);
        let layer = r.layer as usize;
        let pos = r.position as usize;
        let word = acc
            .rec_seen
            .entry(slot_key(t, layer, pos >> 6))
            .or_insert(0);
        let bit = 1u64 << (pos & 63);
        let was_set = *word & bit != 0;
        *word |= bit;
        if was_set {
            return Err(self.err(
                pi,
                line,
                format!(
                    "duplicate record: prompt '{}', layer {}, position {}, token_type {} appears more than once",
                    r.prompt_id,
                    r.layer,
                    r.position,
                    r.token_type.as_str()
                ),
            ));
        }
        self.check_top_k(pi, line, r.experts.len())?;
        if let Some(p) = &r.probs {
            self.probs_len = Some(self.probs_len.map_or(p.len(), |m| m.max(p.len())));
        }
        for &e in &r.experts {
            self.see_layer_expert(layer, e as usize);
        }
        if !self.selected[t] {
            return Ok(());
        }
        if self.opts.weighted {
            let Some(ws) = &r.weights else {
                return Err(self.err(
                    pi,
                    line,
                    "weighted counts need router weights, but this record has no `weights`",
                ));
            };
            for (&e, &w) in r.experts.iter().zip(ws) {
                acc.add(layer, e as usize, w as f64);
            }
        } else {
            for &e in &r.experts {
                acc.add(layer, e as usize, 1.0);
            }
        }
        acc.add_tokens(layer, 1);
        Ok(())
    }

    fn apply_event(&mut self, acc: &mut Acc, pi: usize, line: usize, ev: &FlatEvent) -> Result<()> {
        let t = tt_index(ev.token_type);
        let layer = ev.layer as usize;
        let slot = acc
            .ev_seen
            .entry(slot_key(t, layer, ev.position as usize))
            .or_default();
        let new_token = slot.0.iter().all(|w| *w == 0);
        if slot.set(ev.expert as usize) {
            return Err(self.err(
                pi,
                line,
                format!(
                    "duplicate event: prompt '{}', layer {}, position {}, token_type {}, expert {} appears more than once",
                    ev.prompt_id,
                    ev.layer,
                    ev.position,
                    ev.token_type.as_str(),
                    ev.expert
                ),
            ));
        }
        if let Some(k) = self.top_k.as_ref().map(|(k, _)| *k) {
            let n = slot.count() as usize;
            if n > k {
                return Err(self.err(
                    pi,
                    line,
                    format!(
                        "mixed top-k: prompt '{}', layer {}, position {} has {n} events but top_k = {k}",
                        ev.prompt_id, ev.layer, ev.position
                    ),
                ));
            }
        }
        self.see_layer_expert(layer, ev.expert as usize);
        if !self.selected[t] {
            return Ok(());
        }
        let v = if self.opts.weighted {
            match ev.weight {
                Some(w) => w as f64,
                None => {
                    return Err(self.err(
                        pi,
                        line,
                        "weighted counts need router weights, but this event has no `weight`",
                    ))
                }
            }
        } else {
            1.0
        };
        acc.add(layer, ev.expert as usize, v);
        if new_token {
            acc.add_tokens(layer, 1);
        }
        Ok(())
    }

    /// Checks that every token of every flat-event prompt has exactly k events (after the data
    /// is read, since the events of a token need not be adjacent).
    fn finish_events(&mut self, acc: &Acc) -> Result<()> {
        // In (token type, layer, position) order, so that messages do not depend on hashing.
        let mut slots: Vec<(u64, &Bits)> = acc.ev_seen.iter().map(|(k, b)| (*k, b)).collect();
        slots.sort_unstable_by_key(|(k, _)| *k);
        for (key, bits) in slots {
            let (t, layer, pos) = slot_parts(key);
            let n = bits.count() as usize;
            if n == 0 {
                continue;
            }
            let tt = if t == 0 { "prompt" } else { "generation" };
            match &self.top_k {
                None => {
                    self.top_k = Some((
                        n,
                        format!("prompt '{}', layer {layer}, position {pos}", acc.prompt_id),
                    ))
                }
                Some((k, src)) if *k != n => {
                    return Err(TraceError::invalid_file(
                        &self.paths[acc.first_path],
                        format!(
                            "mixed top-k: prompt '{}', layer {layer}, position {pos} ({tt}) has {n} routing events but {k} are expected ({src})",
                            acc.prompt_id
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn apply_counts(
        &mut self,
        acc: &mut Acc,
        pi: usize,
        line: usize,
        c: &CountsLine,
    ) -> Result<()> {
        let t = tt_index(c.token_type);
        if acc.counts_seen & (1 << t) != 0 {
            return Err(self.err(
                pi,
                line,
                format!(
                    "duplicate counts line: prompt '{}', token_type {} appears more than once",
                    c.prompt_id,
                    c.token_type.as_str()
                ),
            ));
        }
        acc.counts_seen |= 1 << t;
        let (l, e) = (c.num_layers, c.num_experts);
        match (self.num_layers, self.num_experts) {
            (Some(l0), Some(e0)) if (l0, e0) != (l, e) => {
                return Err(self.err(
                    pi,
                    line,
                    format!("dimensions {l}x{e} differ from the expected {l0}x{e0}"),
                ))
            }
            _ => {
                self.num_layers = Some(l);
                self.num_experts = Some(e);
            }
        }
        // Dense layers (routing.dense_layers) have no selections.
        for li in (0..l).filter(|&li| self.is_dense(li)) {
            let nonzero = c.counts[li * e..(li + 1) * e].iter().any(|&x| x != 0)
                || c.weighted_counts
                    .as_ref()
                    .is_some_and(|w| w[li * e..(li + 1) * e].iter().any(|&x| x != 0.0));
            if nonzero {
                let mp = self
                    .layout
                    .as_ref()
                    .map(|(_, p)| p.as_str())
                    .unwrap_or_default();
                return Err(self.err(
                    pi,
                    line,
                    format!(
                        "layer {li} is a dense layer (routing.dense_layers in {mp}) but has non-zero counts"
                    ),
                ));
            }
        }
        // Every token selects exactly k experts at every MoE layer.
        if let Some(tokens) = std::num::NonZeroU64::new(c.tokens) {
            let moe_rows: Vec<usize> = (0..l).filter(|&li| !self.is_dense(li)).collect();
            for li in moe_rows {
                let s: u64 = c.counts[li * e..(li + 1) * e]
                    .iter()
                    .fold(0u64, |a, &x| a.saturating_add(x));
                let k = s / tokens;
                if k * tokens.get() != s {
                    return Err(self.err(
                        pi,
                        line,
                        format!(
                            "layer {li}: {s} selections is not a multiple of tokens = {}",
                            c.tokens
                        ),
                    ));
                }
                self.check_top_k(pi, line, k as usize)?;
            }
        } else if c.counts.iter().any(|&x| x != 0) {
            return Err(self.err(pi, line, "non-zero counts with tokens = 0"));
        }
        if !self.selected[t] {
            return Ok(());
        }
        if self.opts.weighted {
            let Some(w) = &c.weighted_counts else {
                return Err(self.err(
                    pi,
                    line,
                    "weighted counts requested, but this counts line has no `weighted_counts`",
                ));
            };
            for (li, src) in w.chunks_exact(e).enumerate() {
                for (dst, &x) in acc.row_mut(li, e).iter_mut().zip(src) {
                    *dst += x;
                }
            }
        } else {
            for (li, src) in c.counts.chunks_exact(e).enumerate() {
                for (dst, &x) in acc.row_mut(li, e).iter_mut().zip(src) {
                    *dst += x as f64;
                }
            }
        }
        for li in 0..l {
            acc.add_tokens(li, c.tokens);
        }
        Ok(())
    }

    fn resolve_category(&self, acc: &mut Acc) -> Result<()> {
        let Some(map) = &self.opts.categories else {
            return Ok(());
        };
        let Some(c) = map.get(&acc.prompt_id) else {
            return Ok(());
        };
        match &acc.category {
            None => acc.category = Some(c.clone()),
            Some(c0) if c0 != c => {
                return Err(TraceError::invalid_file(
                    &self.paths[acc.first_path],
                    format!(
                        "category conflict for prompt '{}': \"{c0}\" ({}) but \"{c}\" in the prompts file",
                        acc.prompt_id, acc.category_from
                    ),
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// L and E as known so far (given, or the largest indices seen + 1).
    fn dims_so_far(&self) -> (usize, usize) {
        let l = self
            .num_layers
            .unwrap_or_else(|| self.max_layer.map_or(0, |m| m + 1));
        let e = self.num_experts.unwrap_or_else(|| {
            self.max_expert
                .map_or(0, |m| m + 1)
                .max(self.probs_len.unwrap_or(0))
        });
        (l, e)
    }

    /// Checks, after each line, that the dimensions seen so far and the memory for `prompts`
    /// prompts held at once stay within [`crate::limits`] (before [`Acc::finish`] allocates).
    fn check_budget(&self, pi: usize, line: usize, prompts: usize) -> Result<()> {
        let (l, e) = self.dims_so_far();
        let cells = l
            .checked_mul(e)
            .filter(|&c| c <= MAX_LAYER_EXPERTS)
            .ok_or_else(|| {
                self.err(
                    pi,
                    line,
                    format!(
                        "num_layers × num_experts = {l} × {e} (from the largest indices seen) exceeds the supported maximum {MAX_LAYER_EXPERTS}"
                    ),
                )
            })?;
        check_table(prompts, cells, l).map_err(|m| self.err(pi, line, m))
    }

    /// Final L, E and whether they were inferred.
    fn dims(&self) -> Result<(usize, usize, bool)> {
        let mut inferred = false;
        let l = match self.num_layers {
            Some(l) => l,
            None => {
                inferred = true;
                self.max_layer.map_or(0, |m| m + 1)
            }
        };
        let e = match self.num_experts {
            Some(e) => e,
            None => {
                inferred = true;
                self.max_expert
                    .map_or(0, |m| m + 1)
                    .max(self.probs_len.unwrap_or(0))
            }
        };
        if l == 0 || e == 0 {
            return Err(TraceError::invalid_file(
                &self.paths[0],
                "cannot determine num_layers / num_experts (no routing data)",
            ));
        }
        check_dims(l, e, None).map_err(|m| TraceError::invalid_file(&self.paths[0], m))?;
        Ok((l, e, inferred))
    }
}

/// Aggregates all trace files into per-prompt counts (see the module docs for memory use).
/// All files must have the same line form; a prompt may be spread over several files.
pub fn aggregate_paths(paths: &[PathBuf], opts: &AggregateOptions) -> Result<CountsTable> {
    let mut st = State::new(paths, opts)?;
    let mut accs: Vec<Acc> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for pi in 0..paths.len() {
        let reader = st.open(pi)?;
        for item in reader {
            let (line, item) = item?;
            let id = item.prompt_id();
            let ai = match index.get(id) {
                Some(&i) => i,
                None => {
                    index.insert(id.to_string(), accs.len());
                    accs.push(Acc::new(id, pi));
                    accs.len() - 1
                }
            };
            st.apply(&mut accs[ai], pi, line, &item)?;
            st.check_budget(pi, line, accs.len())?;
        }
    }
    for acc in accs.iter_mut() {
        st.finish_events(acc)?;
        st.resolve_category(acc)?;
    }
    let (l, e, dims_inferred) = st.dims()?;
    let layers = st.row_layers(l);
    Ok(CountsTable {
        num_layers: layers.len(),
        layers,
        num_experts: e,
        top_k: st.top_k.as_ref().map(|(k, _)| *k),
        prompts: accs.into_iter().map(|a| st.finish_acc(a, l, e)).collect(),
        manifest: st.manifest.clone(),
        dims_inferred,
    })
}

/// Calls `f` with the counts of each prompt, in file order, holding only one prompt in memory —
/// for counts-mode files of millions of prompts. The counts lines of a prompt must be adjacent
/// (as the capture writes them); a prompt that reappears later is an error. Files in the other
/// line forms are aggregated with [`aggregate_paths`] first and then handed out one by one.
/// Returns `(num_layers, num_experts)`; [`for_each_prompt_counts_info`] also returns top_k.
pub fn for_each_prompt_counts(
    paths: &[PathBuf],
    opts: &AggregateOptions,
    f: impl FnMut(PromptCounts) -> Result<()>,
) -> Result<(usize, usize)> {
    let info = for_each_prompt_counts_info(paths, opts, f)?;
    Ok((info.num_layers, info.num_experts))
}

/// What [`for_each_prompt_counts_info`] learned about the traces besides the prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Rows L' of each prompt's counts: the MoE layers (see [`CountsTable::num_layers`]).
    pub num_layers: usize,
    /// Decoder-layer index of each row (see [`CountsTable::layers`]).
    pub layers: Vec<u32>,
    pub num_experts: usize,
    /// k: the given / manifest top_k, else inferred from the data (experts per record, events
    /// per token, or counts per layer / tokens) exactly as [`aggregate_paths`] does — also for
    /// `weighted` aggregation, whose counts are router weights and cannot reveal k.
    pub top_k: Option<usize>,
}

/// [`for_each_prompt_counts`], returning L, E and k.
pub fn for_each_prompt_counts_info(
    paths: &[PathBuf],
    opts: &AggregateOptions,
    mut f: impl FnMut(PromptCounts) -> Result<()>,
) -> Result<StreamInfo> {
    if paths.is_empty() {
        return Err(TraceError::invalid_file(".", "no trace files given"));
    }
    if first_form(&paths[0])? != TraceForm::Counts {
        let table = aggregate_paths(paths, opts)?;
        let info = StreamInfo {
            num_layers: table.num_layers,
            layers: table.layers.clone(),
            num_experts: table.num_experts,
            top_k: table.top_k,
        };
        for p in table.prompts {
            f(p)?;
        }
        return Ok(info);
    }
    let mut st = State::new(paths, opts)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut cur: Option<Acc> = None;
    for pi in 0..paths.len() {
        let reader = st.open(pi)?;
        for item in reader {
            let (line, item) = item?;
            let id = item.prompt_id();
            if cur.as_ref().is_none_or(|a| a.prompt_id != id) {
                if seen.contains(id) {
                    return Err(st.err(
                        pi,
                        line,
                        format!(
                            "prompt '{id}' appears again after other prompts (the counts lines of a prompt must be adjacent, and prompts must not repeat)"
                        ),
                    ));
                }
                seen.insert(id.to_string());
                if let Some(a) = cur.take() {
                    emit(&st, a, &mut f)?;
                }
            }
            let acc = cur.get_or_insert_with(|| Acc::new(id, pi));
            st.apply(acc, pi, line, &item)?;
            st.check_budget(pi, line, 1)?;
        }
    }
    if let Some(a) = cur.take() {
        emit(&st, a, &mut f)?;
    }
    let (l, e, _) = st.dims()?;
    let layers = st.row_layers(l);
    Ok(StreamInfo {
        num_layers: layers.len(),
        layers,
        num_experts: e,
        top_k: st.top_k.as_ref().map(|(k, _)| *k),
    })
}

/// Checks the dimensions given in [`AggregateOptions`] (flags or a model config) against the
/// limits, each one that is given.
fn check_given_dims(opts: &AggregateOptions) -> std::result::Result<(), String> {
    let what = "(given option)";
    if let Some(l) = opts.num_layers {
        check_dims(l, 1, None).map_err(|m| format!("{m} {what}"))?;
    }
    if let Some(e) = opts.num_experts {
        check_dims(1, e, None).map_err(|m| format!("{m} {what}"))?;
    }
    if let Some(k) = opts.top_k {
        let e = opts.num_experts.unwrap_or(MAX_EXPERTS);
        check_dims(1, e, Some(k)).map_err(|m| format!("{m} {what}"))?;
    }
    Ok(())
}

fn emit(st: &State, mut acc: Acc, f: &mut impl FnMut(PromptCounts) -> Result<()>) -> Result<()> {
    st.resolve_category(&mut acc)?;
    let (l, e, _) = st.dims()?;
    f(st.finish_acc(acc, l, e))
}

fn first_form(path: &Path) -> Result<TraceForm> {
    let mut r = TraceReader::open(path)?;
    match r.next() {
        Some(Ok((_, item))) => Ok(item.form()),
        Some(Err(e)) => Err(e),
        None => Err(TraceError::invalid_file(
            path,
            "empty file (no trace lines)",
        )),
    }
}
