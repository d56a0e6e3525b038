//! Reading runs (trace files or run directories) into a [`HealthAccumulator`], streaming, with
//! the shared trace reader of `moe-xray-trace`.

use std::path::{Path, PathBuf};

use moe_xray_trace::limits::check_dims;
use moe_xray_trace::{read_manifest_beside, Manifest, TokenType, TraceItem, TraceReader};

use crate::health::{HealthAccumulator, HealthOptions, TokenRouting};
use crate::{HealthError, Result};

/// The trace files of one run and the manifest found beside them (if any).
#[derive(Debug, Clone)]
pub struct RunInput {
    /// What the user named (file or directory), for messages.
    pub label: String,
    pub paths: Vec<PathBuf>,
    pub manifest: Option<Manifest>,
}

const TRACE_SUFFIXES: [&str; 5] = [
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".jsonl.zstd",
    ".parquet",
];

/// JSONL files that `moe-xray trace` and `moe-xray run` write beside the traces but that are not
/// traces (the generated texts and the prompt set).
const NOT_TRACES: [&str; 2] = ["generations", "prompts"];

/// Sub-directory of a `moe-xray run` output directory that holds the traces.
pub const RUN_TRACES_DIR: &str = "traces";

fn is_trace_name(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with('.') {
        return false; // hidden files, e.g. the temporary files of atomic writes
    }
    TRACE_SUFFIXES.iter().any(|s| {
        name.strip_suffix(s)
            .is_some_and(|stem| !stem.is_empty() && !NOT_TRACES.contains(&stem))
    })
}

/// The trace files directly in `dir`, sorted by name.
fn trace_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| HealthError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| HealthError::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && is_trace_name(&p) {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Resolves one path: a trace file, or a directory. A directory is either a trace directory
/// (the output of `moe-xray trace`: every `*.jsonl[.gz|.zst]` file in it except
/// `generations.jsonl` and `prompts.jsonl`, sorted by name, plus its `manifest.json`) or, when
/// it holds no trace file itself, a run directory (the output of `moe-xray run`) whose
/// `traces/` sub-directory is such a trace directory.
pub fn resolve_run(path: &Path) -> Result<RunInput> {
    let mut paths = Vec::new();
    let mut manifest_dir = path.to_path_buf();
    if path.is_dir() && moe_xray_trace::reader::external_format_of(path).is_some() {
        // A Parquet dataset directory (run=/category=/part-N.parquet): one trace.
        paths.push(path.to_path_buf());
    } else if path.is_dir() {
        paths = trace_files_in(path)?;
        let sub = path.join(RUN_TRACES_DIR);
        if paths.is_empty() && sub.is_dir() {
            paths = trace_files_in(&sub)?;
            manifest_dir = sub;
        }
        if paths.is_empty() {
            return Err(HealthError::invalid_file(
                path,
                "directory contains no trace files (*.jsonl, *.jsonl.gz, *.jsonl.zst other than generations.jsonl and prompts.jsonl), neither directly nor in a traces/ sub-directory",
            ));
        }
    } else if path.exists() {
        paths.push(path.to_path_buf());
    } else {
        return Err(HealthError::invalid_file(path, "no such file or directory"));
    }
    let manifest = read_manifest_beside(&manifest_dir)?;
    Ok(RunInput {
        label: path.display().to_string(),
        paths,
        manifest,
    })
}

/// Resolves several paths (files or directories) into one run; the first manifest found is used.
pub fn resolve_traces(paths: &[PathBuf]) -> Result<RunInput> {
    if paths.is_empty() {
        return Err(HealthError::InvalidInput("no trace files given".into()));
    }
    let mut all = Vec::new();
    let mut manifest = None;
    for p in paths {
        let r = resolve_run(p)?;
        if manifest.is_none() {
            manifest = r.manifest;
        }
        all.extend(r.paths);
    }
    Ok(RunInput {
        label: paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        paths: all,
        manifest,
    })
}

/// Dimensions (L, E) of a run: from the manifest when present, otherwise from a first streaming
/// pass over the traces (counts lines carry them; for records/events: max layer + 1 and the
/// larger of max expert + 1 and the `probs` length). Inferred dimensions are limited like the
/// manifest's (`moe_xray_trace::limits`); an index beyond them is an error naming file and line.
pub fn run_dims(run: &RunInput) -> Result<(usize, usize)> {
    if let Some(m) = &run.manifest {
        return Ok((m.num_layers, m.num_experts));
    }
    let (mut nl, mut ne) = (0usize, 0usize);
    for p in &run.paths {
        for item in TraceReader::open(p)? {
            let (line, item) = item?;
            match item {
                TraceItem::Counts(c) => {
                    nl = nl.max(c.num_layers);
                    ne = ne.max(c.num_experts);
                }
                TraceItem::Record(r) => {
                    nl = nl.max(r.layer as usize + 1);
                    for &e in &r.experts {
                        ne = ne.max(e as usize + 1);
                    }
                    if let Some(pr) = &r.probs {
                        ne = ne.max(pr.len());
                    }
                }
                TraceItem::Event(e) => {
                    nl = nl.max(e.layer as usize + 1);
                    ne = ne.max(e.expert as usize + 1);
                }
            }
            if let Err(why) = check_dims(nl, ne, None) {
                return Err(HealthError::invalid(
                    p,
                    line,
                    format!("without a manifest.json the dimensions are inferred from the largest indices: {why}"),
                ));
            }
        }
    }
    Ok((nl, ne))
}

/// Streams all traces of `run` into a new accumulator with dimensions `dims` (or [`run_dims`]).
pub fn accumulate_run(
    run: &RunInput,
    dims: Option<(usize, usize)>,
    opts: HealthOptions,
) -> Result<HealthAccumulator> {
    let (nl, ne) = match dims {
        Some(d) => d,
        None => run_dims(run)?,
    };
    let mut acc = match run
        .manifest
        .as_ref()
        .and_then(|m| m.routing.as_ref().map(|r| (m, r)))
    {
        // The manifest's routing block: records only at its MoE layers, rows labelled with the
        // decoder-layer index.
        Some((m, r)) => {
            if nl != m.num_layers {
                return Err(HealthError::InvalidInput(format!(
                    "{}: the given num_layers = {nl} differs from num_layers = {} in manifest.json, whose routing block lists the MoE layers of its decoder layers",
                    run.label, m.num_layers
                )));
            }
            HealthAccumulator::with_layers(nl, &r.moe_layers, ne, opts)?
        }
        None => HealthAccumulator::new(nl, ne, opts)?,
    };
    for p in &run.paths {
        accumulate_file(&mut acc, p)?;
    }
    Ok(acc)
}

/// Key of one token at one layer in the flat-event form (consecutive events with the same key
/// form one token).
type EventKey = (String, Option<String>, u32, u32, TokenType);

/// Streams one trace file into `acc`; every error names the file and line.
pub fn accumulate_file(acc: &mut HealthAccumulator, path: &Path) -> Result<()> {
    accumulate_file_where(acc, path, &|_| true)
}

/// [`accumulate_file`] restricted to the prompts for which `keep(prompt_id)` is true (the
/// prompts of one part of a sharded analysis, `moe-xray map --health`); the other prompts'
/// lines are read and checked by the trace reader but not accumulated.
pub fn accumulate_file_where(
    acc: &mut HealthAccumulator,
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let reader =
        TraceReader::open(path)?.with_dims(Some(acc.num_decoder_layers()), Some(acc.num_experts()));
    let mut pending: Option<(EventKey, usize)> = None;
    let mut experts: Vec<u32> = Vec::new();
    let flush = |acc: &mut HealthAccumulator,
                 pending: &Option<(EventKey, usize)>,
                 experts: &[u32]|
     -> Result<()> {
        if let Some(((pid, cat, layer, _, tt), line)) = pending {
            acc.add_token(&TokenRouting {
                prompt_id: pid,
                category: cat.as_deref(),
                layer: *layer as usize,
                token_type: *tt,
                experts,
                probs: None,
            })
            .map_err(|m| HealthError::invalid(path, *line, m))?;
        }
        Ok(())
    };
    for item in reader {
        let (line, item) = item?;
        if !keep(item.prompt_id()) {
            // As if the line were read: it ends the pending flat-event token.
            flush(acc, &pending, &experts)?;
            experts.clear();
            pending = None;
            continue;
        }
        match item {
            TraceItem::Record(r) => acc
                .add_token(&TokenRouting {
                    prompt_id: &r.prompt_id,
                    category: r.category.as_deref(),
                    layer: r.layer as usize,
                    token_type: r.token_type,
                    experts: &r.experts,
                    probs: r.probs.as_deref(),
                })
                .map_err(|m| HealthError::invalid(path, line, m))?,
            TraceItem::Counts(c) => {
                if (c.num_layers, c.num_experts) != (acc.num_decoder_layers(), acc.num_experts()) {
                    return Err(HealthError::invalid(
                        path,
                        line,
                        format!(
                            "counts line is {}x{} but the run is {}x{} (layers x experts)",
                            c.num_layers,
                            c.num_experts,
                            acc.num_decoder_layers(),
                            acc.num_experts()
                        ),
                    ));
                }
                acc.add_counts(
                    &c.prompt_id,
                    c.category.as_deref(),
                    c.token_type,
                    &c.counts,
                    c.tokens,
                )
                .map_err(|m| HealthError::invalid(path, line, m))?
            }
            TraceItem::Event(e) => {
                let key: EventKey = (e.prompt_id, e.category, e.layer, e.position, e.token_type);
                let same = matches!(&pending, Some((k, _)) if *k == key);
                if !same {
                    flush(acc, &pending, &experts)?;
                    experts.clear();
                    pending = Some((key, line));
                } else if experts.len() >= acc.num_experts() {
                    return Err(HealthError::invalid(
                        path,
                        line,
                        format!(
                            "more than num_experts = {} routing events for one token",
                            acc.num_experts()
                        ),
                    ));
                }
                experts.push(e.expert);
            }
        }
    }
    flush(acc, &pending, &experts)?;
    Ok(())
}

/// Reads one run (trace file or run directory) for [`crate::compare::compare_runs`]: per-prompt
/// counts over the token types of `opts` (per-prompt counts are always kept).
pub fn read_run_data(path: &Path, opts: &HealthOptions) -> Result<crate::compare::RunData> {
    let run = resolve_run(path)?;
    let opts = HealthOptions {
        keep_prompts: true,
        ..opts.clone()
    };
    let acc = accumulate_run(&run, None, opts)?;
    Ok(crate::compare::RunData {
        label: run.label,
        num_layers: acc.num_layers(),
        layers: acc.layer_ids().to_vec(),
        num_experts: acc.num_experts(),
        prompts: acc.into_prompts(),
    })
}
