//! Sharded analysis (`docs/statistics.md`, "Sharded analysis"): [`map_shard`] reads traces as
//! `analyze` does and writes the per-prompt counts of one part of their prompts to a shard file
//! (`moe_xray_stats::shard`); [`merge`] combines any number of shards into exactly the
//! [`Outputs`] of one `analyze` over all the traces.
//!
//! Order: the prompts of one trace list are numbered in first-appearance order (the ordinal);
//! part `i` of `n` holds the ordinals ≡ i (mod n). [`merge`] groups the shards by their trace
//! list, orders the groups by trace list (as strings) and, within a group, the prompts by ordinal
//! (a k-way merge holding one record per shard), so the order of the shard arguments does not
//! matter; the result is that of `analyze` over the concatenated trace lists in that order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{BufWriter, Seek};
use std::path::{Path, PathBuf};

use moe_xray_stats::analyze::{Collector, Outputs, PathChoice, DEFAULT_GRAM_THRESHOLD};
use moe_xray_stats::input::PromptRow;
use moe_xray_stats::shard::{
    write_header, ShardHeader, ShardReader, ShardRecord, ShardWriter, SHARD_FORMAT,
};
use moe_xray_trace::counts::for_each_prompt_counts_info;
use moe_xray_trace::TraceError;

use crate::analyze::{aggregate_options, inferred_warning, AnalyzeOptions};
use crate::error::{invalid, IoContext, PipelineError, Result, ResultExt};
use crate::Progress;

/// What [`map_shard`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSummary {
    /// Prompts of all parts read from the traces.
    pub prompts_read: u64,
    /// Prompts written to this shard (this part).
    pub prompts_written: u64,
    /// Size of the shard file.
    pub bytes: u64,
}

/// Reads the traces of `opts` (dimensions, token types, `weighted` and categories as `analyze`
/// reads them; the statistics options are not used) and writes the prompts of part `part` of
/// `parts` to the shard file `out` (complete or not at all: a temporary file renamed into place).
pub fn map_shard(
    opts: &AnalyzeOptions,
    part: u64,
    parts: u64,
    out: &Path,
    progress: &dyn Progress,
) -> Result<MapSummary> {
    crate::install_trace_formats();
    let Some(first) = opts.traces.first().cloned() else {
        invalid!("no trace files given");
    };
    if parts == 0 || part >= parts {
        invalid!(
            "--part {part}/{parts}: the part must be between 0 and {}",
            parts.saturating_sub(1)
        );
    }
    let (agg, manifest) = aggregate_options(opts, &first)?;
    if manifest.is_none() {
        let (nl, ne) = (agg.num_layers.is_none(), agg.num_experts.is_none());
        if inferred_warning("map", &opts.traces, nl, ne, 0, 0).is_some() {
            invalid!(
                "map: no manifest.json beside {} and no --model / --num-layers / --num-experts: \
                 the dimensions of all the data cannot be inferred from one shard's traces",
                first.display()
            );
        }
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let records = tempfile::tempfile_in(&dir)
        .io_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    let mut writer = ShardWriter::new(records, part, parts)?;
    // Token bags of the confound controls: per-token traces keep this part's rows until the
    // second pass over the traces has read their token ids (their counts table is in memory
    // anyway); counts lines have no token ids and are streamed.
    let counts_form = matches!(
        moe_xray_trace::TraceReader::open(&first)?.next(),
        Some(Ok((_, moe_xray_trace::TraceItem::Counts(_))))
    );
    let mut held: Vec<(u64, PromptRow)> = Vec::new();
    let mut shard_err: Option<moe_xray_stats::StatsError> = None;
    let mut read = 0u64;
    let info = for_each_prompt_counts_info(&opts.traces, &agg, |p| {
        let ordinal = read;
        read += 1;
        if read.is_multiple_of(4096) {
            progress.step(&format!("map: read {read} prompts"));
        }
        if ordinal % parts != part {
            return Ok(());
        }
        let row = PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        };
        if !counts_form {
            held.push((ordinal, row));
            return Ok(());
        }
        writer.push(ordinal, &row, None).map_err(|e| {
            let message = e.to_string();
            shard_err = Some(e);
            TraceError::InvalidFile {
                path: first.clone(),
                message,
            }
        })
    });
    if let Some(e) = shard_err {
        return Err(e.into());
    }
    let info = info?;
    let rows: Vec<PromptRow> = held.iter().map(|(_, r)| r.clone()).collect();
    progress.step("map: token ids for the confound controls");
    let tokens = crate::confound::token_input(
        &opts.traces,
        &opts.token_types,
        opts.weighted,
        &info.layers,
        info.num_experts,
        &rows,
        None,
    )?;
    drop(rows);
    let token_bags_error = tokens.bags.as_ref().err().cloned();
    for (ordinal, row) in held {
        let bag = tokens
            .bags
            .as_ref()
            .ok()
            .and_then(|b| b.get(&row.prompt_id))
            .map(|b| &b[..]);
        writer.push(ordinal, &row, bag)?;
    }
    let written = writer.len();
    let (mut records, rinfo) = writer.finish()?;
    let k = if opts.weighted {
        agg.top_k.or(info.top_k)
    } else {
        agg.top_k
    };
    let manifest = match manifest {
        Some(m) => Some(serde_json::to_string(
            &serde_json::to_value(m).unwrap_or_default(),
        )?),
        None => None,
    };
    let header = ShardHeader {
        format: SHARD_FORMAT.into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        traces: opts
            .traces
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        part,
        parts,
        num_layers: info.num_layers,
        num_experts: info.num_experts,
        layers: info.layers.iter().map(|&d| d as usize).collect(),
        top_k: k,
        weighted: opts.weighted,
        token_types: opts
            .token_types
            .iter()
            .map(|t| t.as_str().to_string())
            .collect(),
        manifest,
        token_bags_error,
    };
    let name = out.display().to_string();
    let tmp = tempfile::NamedTempFile::new_in(&dir)
        .io_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    let mut w = BufWriter::new(tmp);
    write_header(&mut w, &header, &rinfo)?;
    records
        .rewind()
        .io_context(|| format!("{name}: temporary records file"))?;
    std::io::copy(&mut records, &mut w).io_context(|| format!("{name}: cannot write"))?;
    let tmp = w
        .into_inner()
        .map_err(|e| PipelineError::io(format!("{name}: cannot write"), e.into_error()))?;
    tmp.as_file()
        .sync_all()
        .io_context(|| format!("{name}: cannot write"))?;
    let file = tmp
        .persist(out)
        .map_err(|e| PipelineError::io(format!("{name}: cannot write"), e.error))?;
    let bytes = file
        .metadata()
        .io_context(|| format!("{name}: cannot stat"))?
        .len();
    Ok(MapSummary {
        prompts_read: read,
        prompts_written: written,
        bytes,
    })
}

/// Options of [`merge`]: the statistics options of `analyze` (defaults as there); the options
/// that change the counts were fixed by `map` and are read from the shards.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Shard files written by [`map_shard`]; at least one.
    pub shards: Vec<PathBuf>,
    pub reps: usize,
    pub perm_reps: Option<usize>,
    pub boot_reps: Option<usize>,
    pub classifier_perm_reps: usize,
    pub seed: u64,
    /// Fold assignment CSV (`prompt_id,fold`) for the classifier.
    pub folds: Option<PathBuf>,
    pub path: PathChoice,
    pub no_tsne: bool,
    pub no_classifier: bool,
}

impl MergeOptions {
    /// The defaults of `moe-xray merge` on these shards.
    pub fn new(shards: Vec<PathBuf>) -> Self {
        MergeOptions {
            shards,
            reps: 1000,
            perm_reps: None,
            boot_reps: None,
            classifier_perm_reps: 200,
            seed: 0,
            folds: None,
            path: PathChoice::Auto {
                threshold: DEFAULT_GRAM_THRESHOLD,
            },
            no_tsne: false,
            no_classifier: false,
        }
    }
}

/// Checks that every shard was mapped with the same options and returns the common k.
fn check_compatible(readers: &[ShardReader]) -> Result<Option<usize>> {
    let a = readers[0].header();
    let mut k: Option<(usize, &str)> = None;
    for r in readers {
        let h = r.header();
        let differs = |field: &str, x: String, y: String| -> Result<()> {
            if x != y {
                invalid!(
                    "{} and {}: shard field {field} differs ({x} vs {y}); shards must be mapped with the same options",
                    readers[0].name(),
                    r.name()
                );
            }
            Ok(())
        };
        differs(
            "num_layers/num_experts",
            format!("{}x{}", a.num_layers, a.num_experts),
            format!("{}x{}", h.num_layers, h.num_experts),
        )?;
        differs(
            "layers",
            format!("{:?}", a.layers),
            format!("{:?}", h.layers),
        )?;
        differs("weighted", a.weighted.to_string(), h.weighted.to_string())?;
        differs(
            "token_types",
            format!("{:?}", a.token_types),
            format!("{:?}", h.token_types),
        )?;
        if let Some(hk) = h.top_k {
            match k {
                Some((k0, n0)) if k0 != hk => invalid!(
                    "{n0} and {}: shard field top_k differs ({k0} vs {hk})",
                    r.name()
                ),
                _ => k = Some((hk, r.name())),
            }
        }
    }
    Ok(k.map(|(k, _)| k))
}

/// Combines the shards into the outputs of one `analyze` over all their traces (see the module
/// docs for the order). Errors: incompatible shards, a trace list with a missing part, a prompt
/// in two shards (named, with both files), a gap in the ordinals.
pub fn merge(opts: &MergeOptions, progress: &dyn Progress) -> Result<Outputs> {
    if opts.shards.is_empty() {
        invalid!("no shard files given");
    }
    let mut readers = Vec::with_capacity(opts.shards.len());
    for p in &opts.shards {
        readers.push(ShardReader::open(p)?);
    }
    let k = check_compatible(&readers)?;
    // Groups by trace list (sorted), each with its parts.
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in readers.iter().enumerate() {
        groups.entry(r.header().traces.clone()).or_default().push(i);
    }
    for (traces, members) in &groups {
        let parts = readers[members[0]].header().parts;
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for &i in members {
            let (h_parts, h_part) = (readers[i].header().parts, readers[i].header().part);
            if h_parts != parts {
                invalid!(
                    "{} and {}: traces {traces:?} split into {parts} and {} parts",
                    readers[members[0]].name(),
                    readers[i].name(),
                    h_parts
                );
            }
            if let Some(&j) = seen.get(&h_part) {
                let first = peek_id(&mut readers[i])?;
                let what = match first {
                    Some(id) => format!("prompt {id:?} is in two shards"),
                    None => "two shards hold the same part".to_string(),
                };
                invalid!(
                    "{what}: {} and {} (both part {} of {parts} of traces {traces:?})",
                    opts.shards[j].display(),
                    opts.shards[i].display(),
                    h_part
                );
            }
            seen.insert(h_part, i);
        }
        if seen.len() as u64 != parts {
            let missing: Vec<u64> = (0..parts)
                .filter(|p| !seen.contains_key(p))
                .take(5)
                .collect();
            invalid!(
                "traces {traces:?}: {} of {parts} parts given; missing part(s) {missing:?} (every part is needed for the analysis of these traces)",
                seen.len()
            );
        }
    }
    let h0 = readers[groups.values().next().map(|m| m[0]).unwrap_or(0)]
        .header()
        .clone();
    let manifest = match &h0.manifest {
        None => serde_json::json!({}),
        Some(text) => {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                PipelineError::Invalid(format!(
                    "{}: shard field manifest: {e}",
                    readers[groups.values().next().map(|m| m[0]).unwrap_or(0)].name()
                ))
            })?;
            // The manifest goes into results.json: it must come back exactly as mapped.
            if serde_json::to_string(&v)? != *text {
                invalid!("shard field manifest: does not read back to the same JSON text");
            }
            v
        }
    };
    let (nl, ne) = (h0.num_layers, h0.num_experts);
    let mut collector = Collector::new(nl, ne, opts.path);
    // Token bags for the lexical baseline (exact path only, as in `analyze`).
    let bags_error = groups
        .values()
        .flatten()
        .find_map(|&i| readers[i].header().token_bags_error.clone());
    let keep_bags = bags_error.is_none() && opts.path != PathChoice::GramSums;
    let mut bags: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut read = 0u64;
    let mut traces: Vec<String> = Vec::new();
    for (group_traces, members) in &groups {
        traces.extend(group_traces.iter().cloned());
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut pending: HashMap<usize, ShardRecord> = HashMap::new();
        for &i in members {
            if let Some(rec) = readers[i].next_record()? {
                heap.push(Reverse((rec.ordinal, i)));
                pending.insert(i, rec);
            }
        }
        let mut expect = 0u64;
        while let Some(Reverse((ordinal, i))) = heap.pop() {
            let Some(rec) = pending.remove(&i) else {
                invalid!("internal: no pending record of shard {i}");
            };
            if ordinal != expect {
                invalid!(
                    "{}: shard field ordinal: prompt {:?} has ordinal {ordinal}, expected {expect} (a shard of traces {group_traces:?} is incomplete)",
                    readers[i].name(),
                    rec.row.prompt_id
                );
            }
            expect += 1;
            if let Some(&j) = owner.get(&rec.row.prompt_id) {
                invalid!(
                    "prompt {:?} is in two shards: {} and {}",
                    rec.row.prompt_id,
                    opts.shards[j].display(),
                    opts.shards[i].display()
                );
            }
            owner.insert(rec.row.prompt_id.clone(), i);
            if keep_bags {
                if let Some(b) = rec.bag {
                    bags.insert(rec.row.prompt_id.clone(), b);
                }
            }
            collector
                .push(rec.row)
                .step_context(|| format!("merging {}", opts.shards[i].display()))?;
            read += 1;
            if read.is_multiple_of(4096) {
                progress.step(&format!("merge: read {read} prompts"));
            }
            if let Some(next) = readers[i].next_record()? {
                heap.push(Reverse((next.ordinal, i)));
                pending.insert(i, next);
            }
        }
    }
    progress.step(&format!(
        "merge: statistics on {read} prompts ({} reps per baseline)",
        opts.reps
    ));
    let identity = h0.layers.iter().enumerate().all(|(i, &d)| d == i);
    let tokens = moe_xray_stats::lexical::TokenInput {
        bags: if collector.buffered().is_empty() {
            Err("not computed on the gram_sums path".into())
        } else {
            match bags_error {
                Some(e) => Err(e),
                None => Ok(bags),
            }
        },
        matched: None,
    };
    let stats_opts = moe_xray_stats::AnalyzeOptions {
        reps: opts.reps,
        perm_reps: opts.perm_reps.unwrap_or(opts.reps),
        boot_reps: opts.boot_reps.unwrap_or(opts.reps),
        classifier_perm_reps: opts.classifier_perm_reps,
        seed: opts.seed,
        folds: None,
        folds_file: opts.folds.clone(),
        token_types: h0.token_types.clone(),
        weighted: h0.weighted,
        traces,
        manifest,
        path: opts.path,
        skip_tsne: opts.no_tsne,
        skip_classifier: opts.no_classifier,
        layers: (!identity).then(|| h0.layers.clone()),
        tokens: Some(std::sync::Arc::new(tokens)),
        ..moe_xray_stats::AnalyzeOptions::default()
    };
    let desc = opts
        .shards
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    collector
        .finish(k, &stats_opts)
        .step_context(|| format!("analysing the shards {desc}"))
}

/// The prompt id of the next record of `r` (used to name a prompt held twice).
fn peek_id(r: &mut ShardReader) -> Result<Option<String>> {
    Ok(r.next_record()?.map(|rec| rec.row.prompt_id))
}
