//! Sharded analysis (`docs/statistics.md`, "Sharded analysis"): [`map_shard`] reads traces as
//! `analyze` does and writes the per-prompt counts of one part of their prompts to a shard file
//! (`moe_xray_stats::shard`); [`merge`] combines any number of shards into exactly the
//! [`Outputs`] of one `analyze` over all the traces. [`map_shard_with`] can also write the
//! health accumulator of the part (a second pass, read as `health` reads the traces) and, instead
//! of the counts, the per-category Gram sums; [`merge_all`] then also gives the health report
//! (exact) and, from Gram sums, the `gram_sums` path (to rounding, at a cost independent of N
//! but for the prompt ids).
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

use moe_xray_health::{HealthAccumulator, HealthOptions};
use moe_xray_stats::analyze::{Collector, Outputs, PathChoice, DEFAULT_GRAM_THRESHOLD};
use moe_xray_stats::input::PromptRow;
use moe_xray_stats::large_n::GramAccumulator;
use moe_xray_stats::shard::{
    gram_section_bytes, read_gram_section, write_header, ShardHeader, ShardKind, ShardReader,
    ShardRecord, ShardWriter, SECTION_GRAM, SECTION_HEALTH, SHARD_FORMAT,
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

/// What a shard holds besides the prompts (`moe-xray map --health`, `--gram-sums`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Also the health accumulator of the part's prompts (a second pass over the traces, as
    /// `moe-xray health` reads them).
    pub health: bool,
    /// The per-category Gram sums instead of the per-prompt counts (merge gives the
    /// `gram_sums` path, at a cost independent of the number of prompts but for their ids).
    pub gram_sums: bool,
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
    map_shard_with(opts, MapContents::default(), part, parts, out, progress)
}

/// [`map_shard`] with the health section and / or Gram sums of `contents`.
pub fn map_shard_with(
    opts: &AnalyzeOptions,
    contents: MapContents,
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
    // The ids of this part's prompts, for the health pass.
    let mut part_ids: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut gram: Option<GramAccumulator> = None;
    let info = for_each_prompt_counts_info(&opts.traces, &agg, |p| {
        let ordinal = read;
        read += 1;
        if read.is_multiple_of(4096) {
            progress.step(&format!("map: read {read} prompts"));
        }
        if ordinal % parts != part {
            return Ok(());
        }
        if contents.health {
            part_ids.insert(p.prompt_id.clone());
        }
        let row = PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        };
        let pushed = if contents.gram_sums {
            // As `analyze --gram`: the collector's accumulator, L and E from the first prompt.
            let g = gram.get_or_insert_with(|| {
                let l = row.tokens_per_layer.len();
                GramAccumulator::new(l, row.counts.len() / l.max(1))
            });
            let id = row.prompt_id.clone();
            g.push_outcome(row)
                .and_then(|outcome| writer.push_id(ordinal, &id, &outcome))
        } else if !counts_form {
            held.push((ordinal, row));
            return Ok(());
        } else {
            writer.push(ordinal, &row, None)
        };
        pushed.map_err(|e| {
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
    let token_bags_error = if contents.gram_sums {
        Some("not computed on the gram_sums path".to_string())
    } else {
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
        token_bags_error
    };
    let written = writer.len();
    let health_bytes = if contents.health {
        progress.step("map: health accumulator (second pass over the traces)");
        let acc = map_health(opts, manifest.as_ref(), &info, &part_ids)?;
        drop(part_ids);
        Some(acc.to_state_bytes().map_err(|e| {
            PipelineError::Invalid(format!("{}: health section: {e}", out.display()))
        })?)
    } else {
        None
    };
    let gram_bytes = match gram.as_mut() {
        Some(g) => Some(gram_section_bytes(&g.take_categories())),
        None if contents.gram_sums => {
            // No prompt in this part: an empty section (no category).
            Some(gram_section_bytes(&[]))
        }
        None => None,
    };
    drop(gram);
    let mut sections: Vec<(u8, &[u8])> = Vec::new();
    if let Some(b) = &health_bytes {
        sections.push((SECTION_HEALTH, b));
    }
    if let Some(b) = &gram_bytes {
        sections.push((SECTION_GRAM, b));
    }
    let (mut records, mut rinfo) = writer.finish_with_sections(&sections)?;
    drop(health_bytes);
    drop(gram_bytes);
    if contents.gram_sums {
        rinfo.dim = None; // id records carry no counts
    }
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
        kind: if contents.gram_sums {
            ShardKind::GramSums
        } else {
            ShardKind::Counts
        },
        health: contents.health,
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

/// The health accumulator of the prompts in `part_ids`, read as `moe-xray health` reads the
/// traces (the manifest's MoE layers, the map's L, E and token types).
fn map_health(
    opts: &AnalyzeOptions,
    manifest: Option<&moe_xray_trace::Manifest>,
    info: &moe_xray_trace::counts::StreamInfo,
    part_ids: &std::collections::HashSet<String>,
) -> Result<HealthAccumulator> {
    let decoder = match manifest {
        Some(m) if m.routing.is_some() => m.num_layers,
        _ => info.num_layers,
    };
    let hopts = HealthOptions {
        token_types: opts.token_types.clone(),
        ..HealthOptions::default()
    };
    let mut acc = HealthAccumulator::with_layers(decoder, &info.layers, info.num_experts, hopts)?;
    for p in &opts.traces {
        moe_xray_health::input::accumulate_file_where(&mut acc, p, &|id| part_ids.contains(id))?;
    }
    Ok(acc)
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
    /// Also the health report from the shards' health sections (`map --health`): its report
    /// options (`cold_fraction`, `top_pairs`); the token types are those of the shards.
    pub health: Option<HealthOptions>,
    /// With `health`: also the mutual information I(signature; task) as `health --mi` computes
    /// it, from the per-prompt counts of counts shards (unweighted; not from Gram sums).
    pub health_mi: Option<moe_xray_health::MiOptions>,
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
            health: None,
            health_mi: None,
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

/// What [`merge_all`] produced.
pub struct MergeOutputs {
    /// The outputs of `analyze` over all the traces.
    pub analysis: Outputs,
    /// The outputs of `health` over all the traces (when [`MergeOptions::health`] is set).
    pub health: Option<crate::health::HealthOutputs>,
}

/// Combines the shards into the outputs of one `analyze` over all their traces (see the module
/// docs for the order). Errors: incompatible shards, a trace list with a missing part, a prompt
/// in two shards (named, with both files), a gap in the ordinals.
pub fn merge(opts: &MergeOptions, progress: &dyn Progress) -> Result<Outputs> {
    Ok(merge_all(opts, progress)?.analysis)
}

/// One record of either kind of shard.
enum Item {
    Row(ShardRecord),
    Id(moe_xray_stats::shard::IdRecord),
}

impl Item {
    fn id(&self) -> &str {
        match self {
            Item::Row(r) => &r.row.prompt_id,
            Item::Id(r) => &r.prompt_id,
        }
    }
}

fn next_item(r: &mut ShardReader) -> Result<Option<(u64, Item)>> {
    Ok(match r.header().kind {
        ShardKind::Counts => r.next_record()?.map(|x| (x.ordinal, Item::Row(x))),
        ShardKind::GramSums => r.next_id()?.map(|x| (x.ordinal, Item::Id(x))),
    })
}

/// [`merge`], and with [`MergeOptions::health`] also the health report of all the traces from
/// the shards' health sections (exact: the same bytes as `moe-xray health` over the traces).
/// Shards mapped with `--gram-sums` give the `gram_sums` path (`--exact-pairs` is refused).
pub fn merge_all(opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeOutputs> {
    if opts.shards.is_empty() {
        invalid!("no shard files given");
    }
    let mut readers = Vec::with_capacity(opts.shards.len());
    for p in &opts.shards {
        readers.push(ShardReader::open(p)?);
    }
    let k = check_compatible(&readers)?;
    let kind = readers[0].header().kind;
    if let Some(r) = readers.iter().find(|r| r.header().kind != kind) {
        invalid!(
            "{} and {}: shard field kind differs ({:?} vs {:?}); merge shards mapped all with or all without --gram-sums",
            readers[0].name(),
            r.name(),
            kind,
            r.header().kind
        );
    }
    if opts.health.is_some() {
        if let Some(r) = readers.iter().find(|r| !r.header().health) {
            invalid!(
                "{}: no health section (map it with --health to merge the health report)",
                r.name()
            );
        }
    }
    let gram_kind = kind == ShardKind::GramSums;
    if opts.health_mi.is_some() {
        if opts.health.is_none() {
            invalid!("--mi needs --health DIR");
        }
        if gram_kind {
            invalid!(
                "--mi needs every prompt's counts, but these shards hold Gram sums (map --gram-sums)"
            );
        }
        if readers[0].header().weighted {
            invalid!(
                "--mi needs selection counts, but these shards hold router weights (map --weighted)"
            );
        }
    }
    // The per-prompt counts for --mi, in the order `health` reads the prompts.
    let mut mi_prompts: Vec<moe_xray_health::PromptLoad> = Vec::new();
    if gram_kind && opts.path == PathChoice::ExactPairs {
        invalid!(
            "--exact-pairs needs the per-prompt counts, but these shards hold Gram sums (map --gram-sums): only the gram_sums path can be merged from them"
        );
    }
    // Groups by trace list (sorted), each with its parts.
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in readers.iter().enumerate() {
        groups.entry(r.header().traces.clone()).or_default().push(i);
    }
    for (traces, members) in groups.iter_mut() {
        let parts = readers[members[0]].header().parts;
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for &i in members.iter() {
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
        // Sections are read in part order, so sums do not depend on the argument order.
        members.sort_by_key(|&i| readers[i].header().part);
    }
    let first_reader = groups.values().next().map(|m| m[0]).unwrap_or(0);
    let h0 = readers[first_reader].header().clone();
    let manifest = match &h0.manifest {
        None => serde_json::json!({}),
        Some(text) => {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                PipelineError::Invalid(format!(
                    "{}: shard field manifest: {e}",
                    readers[first_reader].name()
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
    let mut gram = gram_kind.then(|| GramAccumulator::new(nl, ne));
    let mut health: Option<HealthAccumulator> = None;
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
        let mut pending: HashMap<usize, Item> = HashMap::new();
        for &i in members {
            if let Some((ordinal, item)) = next_item(&mut readers[i])? {
                heap.push(Reverse((ordinal, i)));
                pending.insert(i, item);
            }
        }
        let mut expect = 0u64;
        while let Some(Reverse((ordinal, i))) = heap.pop() {
            let Some(item) = pending.remove(&i) else {
                invalid!("internal: no pending record of shard {i}");
            };
            if ordinal != expect {
                invalid!(
                    "{}: shard field ordinal: prompt {:?} has ordinal {ordinal}, expected {expect} (a shard of traces {group_traces:?} is incomplete)",
                    readers[i].name(),
                    item.id()
                );
            }
            expect += 1;
            if let Some(&j) = owner.get(item.id()) {
                invalid!(
                    "prompt {:?} is in two shards: {} and {}",
                    item.id(),
                    opts.shards[j].display(),
                    opts.shards[i].display()
                );
            }
            owner.insert(item.id().to_string(), i);
            match item {
                Item::Row(rec) => {
                    if opts.health_mi.is_some() {
                        mi_prompts.push(moe_xray_health::PromptLoad {
                            prompt_id: rec.row.prompt_id.clone(),
                            category: rec.row.category.clone(),
                            counts: rec.row.counts.clone(),
                        });
                    }
                    if keep_bags {
                        if let Some(b) = rec.bag {
                            bags.insert(rec.row.prompt_id.clone(), b);
                        }
                    }
                    collector
                        .push(rec.row)
                        .step_context(|| format!("merging {}", opts.shards[i].display()))?;
                }
                Item::Id(rec) => {
                    if let Some(g) = gram.as_mut() {
                        g.add_prompt(rec.prompt_id, rec.outcome);
                    }
                }
            }
            read += 1;
            if read.is_multiple_of(4096) {
                progress.step(&format!("merge: read {read} prompts"));
            }
            if let Some((next_ordinal, next)) = next_item(&mut readers[i])? {
                heap.push(Reverse((next_ordinal, i)));
                pending.insert(i, next);
            }
        }
        // The sections after the records: health states and Gram sums, in part order.
        for &i in members {
            let name = readers[i].name().to_string();
            readers[i].read_sections(|tag, rd| {
                if tag == SECTION_HEALTH {
                    if let Some(hopts) = &opts.health {
                        let st = HealthAccumulator::from_state(
                            &format!("{name}: health section"),
                            rd,
                            hopts,
                        )
                        .map_err(|e| moe_xray_stats::StatsError::InvalidInput(e.to_string()))?;
                        match health.as_mut() {
                            None => health = Some(st),
                            Some(acc) => acc.merge(&st).map_err(|e| {
                                moe_xray_stats::StatsError::InvalidInput(format!(
                                    "{name}: health section: {e}"
                                ))
                            })?,
                        }
                        return Ok(());
                    }
                } else if tag == SECTION_GRAM {
                    if let Some(g) = gram.as_mut() {
                        let tiles = g.tile_len();
                        return read_gram_section(&name, rd, nl, ne, tiles, |c| g.add_category(c));
                    }
                }
                std::io::copy(rd, &mut std::io::sink()).map_err(|e| {
                    moe_xray_stats::StatsError::InvalidInput(format!("{name}: {e}"))
                })?;
                Ok(())
            })?;
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
    let analysis = match gram {
        Some(g) => {
            let summary = g
                .finish()
                .step_context(|| format!("analysing the shards {desc}"))?;
            Outputs::Gram(Box::new(moe_xray_stats::analyze::analyze_gram(
                summary,
                nl,
                ne,
                k,
                &stats_opts,
            )))
        }
        None => collector
            .finish(k, &stats_opts)
            .step_context(|| format!("analysing the shards {desc}"))?,
    };
    let health = match (opts.health.as_ref(), health) {
        (Some(_), Some(acc)) => {
            let report = acc.report();
            let layer = acc.layer_ids().first().copied().unwrap_or(0);
            let mi = match &opts.health_mi {
                Some(mo) => {
                    let (sigs, labels, dropped) = moe_xray_health::mi::signatures_with_labels(
                        &mi_prompts,
                        report.num_layers,
                        report.num_experts,
                    );
                    drop(mi_prompts);
                    if let Some(first) = dropped.first() {
                        progress.warn(&format!(
                            "--mi: {} prompt(s) left out (first: {} — {})",
                            dropped.len(),
                            first.0,
                            first.1
                        ));
                    }
                    progress.step("merge: mutual information (permutations)");
                    Some(
                        moe_xray_health::mutual_information(&sigs, &labels, mo).step_context(
                            || "--mi (mutual information needs prompt categories in the traces)",
                        )?,
                    )
                }
                None => None,
            };
            Some(crate::health::HealthOutputs {
                acc,
                report,
                mi,
                layer,
            })
        }
        (Some(_), None) => invalid!("no health section in the shards"),
        _ => None,
    };
    Ok(MergeOutputs { analysis, health })
}

/// The prompt id of the next record of `r` (used to name a prompt held twice).
fn peek_id(r: &mut ShardReader) -> Result<Option<String>> {
    Ok(next_item(r)?.map(|(_, item)| item.id().to_string()))
}
