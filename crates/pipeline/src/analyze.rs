//! Analysis: routing traces → routing signatures and their statistics (definitions in
//! docs/statistics.md), and the output files `results.json`, `signatures.csv`,
//! `prompt_similarity.csv`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use moe_xray_stats::analyze::{Collector, Outputs, PathChoice, DEFAULT_GRAM_THRESHOLD};
use moe_xray_stats::input::PromptRow;
use moe_xray_stats::results::AnalysisResults;
use moe_xray_trace::counts::{for_each_prompt_counts_info, AggregateOptions};
use moe_xray_trace::{
    read_manifest_beside, read_prompts, TokenType, TraceError, TraceItem, TraceReader,
};

use crate::error::{invalid, IoContext, PipelineError, Result, ResultExt};
use crate::outdir::Batch;
use crate::Progress;

/// Options of an analysis (the `moe-xray analyze` flags; defaults as there).
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Trace files (JSONL records, flat events or counts lines; .gz / .zst accepted); at least one.
    pub traces: Vec<PathBuf>,
    /// Prompt file giving each prompt's category.
    pub prompts: Option<PathBuf>,
    /// Model directory: L, E and k are read from its config.json.
    pub model: Option<PathBuf>,
    /// Number of MoE layers L (overrides manifest / config).
    pub num_layers: Option<usize>,
    /// Number of experts per layer E.
    pub num_experts: Option<usize>,
    /// Experts selected per token k.
    pub top_k: Option<usize>,
    /// Token types counted (non-empty, no repeats).
    pub token_types: Vec<TokenType>,
    /// Sum router weights instead of counting selections.
    pub weighted: bool,
    /// Repetitions of each null baseline.
    pub reps: usize,
    /// Label permutations of the similarity test (`None`: `reps`).
    pub perm_reps: Option<usize>,
    /// Bootstrap resamples (`None`: `reps`).
    pub boot_reps: Option<usize>,
    /// Label permutations of the classifier test.
    pub classifier_perm_reps: usize,
    /// Seed of every random stream.
    pub seed: u64,
    /// Fold assignment CSV (`prompt_id,fold`) for the classifier.
    pub folds: Option<PathBuf>,
    /// All-pairs path, Gram-sums path, or chosen by the number of prompts.
    pub path: PathChoice,
    /// Skip t-SNE.
    pub no_tsne: bool,
    /// Skip the classifier and its tests.
    pub no_classifier: bool,
    /// `--token-matched`: also compute the similarity statistics on token-matched routing.
    pub token_matched: Option<moe_xray_stats::results::TokenMatchMode>,
    /// `--windows W`: also the statistics per window of W generated tokens (`windows`).
    pub windows: Option<usize>,
}

impl AnalyzeOptions {
    /// The defaults of `moe-xray analyze` on these trace files.
    pub fn new(traces: Vec<PathBuf>) -> Self {
        AnalyzeOptions {
            traces,
            prompts: None,
            model: None,
            num_layers: None,
            num_experts: None,
            top_k: None,
            token_types: vec![TokenType::Prompt, TokenType::Generation],
            weighted: false,
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
            token_matched: None,
            windows: None,
        }
    }
}

/// L, E, k from a Hugging Face config.json.
pub fn model_dims(dir: &Path) -> Result<(usize, usize, usize)> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).io_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).step_context(|| format!("{}: invalid JSON", path.display()))?;
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| {
                PipelineError::Invalid(format!(
                    "{}: missing or invalid integer field {k:?}",
                    path.display()
                ))
            })
    };
    Ok((
        get("num_hidden_layers")?,
        get("num_experts")?,
        get("num_experts_per_tok")?,
    ))
}

/// The dimensions the user gave: `num_layers` / `num_experts` / `top_k` first, then the
/// config.json of the `model` directory ([`model_dims`]); `None` where neither says. Shared by
/// `analyze`, `health` and `compare`.
pub fn given_dims(
    model: Option<&Path>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<usize>,
) -> Result<(Option<usize>, Option<usize>, Option<usize>)> {
    let (mut nl, mut ne, mut k) = (num_layers, num_experts, top_k);
    if let Some(dir) = model {
        let (l, e, kk) = model_dims(dir)?;
        nl = nl.or(Some(l));
        ne = ne.or(Some(e));
        k = k.or(Some(kk));
    }
    Ok((nl, ne, k))
}

/// The loud warning when the dimensions of per-token traces without a manifest were inferred
/// from the highest ids seen (`layers` / `experts`: which were inferred), or `None` (counts
/// files state their dimensions).
pub fn inferred_warning(
    label: &str,
    paths: &[PathBuf],
    layers: bool,
    experts: bool,
    l: usize,
    e: usize,
) -> Option<String> {
    let first = paths
        .first()
        .and_then(|p| TraceReader::open(p).ok())
        .and_then(|mut r| r.next())
        .and_then(|i| i.ok());
    if matches!(first, Some((_, TraceItem::Counts(_)))) || !(layers || experts) {
        return None;
    }
    let mut what = Vec::new();
    if layers {
        what.push(format!("{l} layers (highest layer index seen + 1)"));
    }
    if experts {
        what.push(format!("{e} experts (highest expert id seen + 1)"));
    }
    let consequence = if experts {
        "Experts above the highest id seen that are never chosen are missing, so dead experts are under-counted. "
    } else {
        "Trailing layers without any routing record would be missing. "
    };
    Some(format!(
        "WARNING: {label}: no manifest.json beside the traces, so the dimensions are INFERRED from the data: {}. \
         {consequence}Fix: pass --model DIR (the checkpoint's config.json) or --num-experts E / --num-layers L.",
        what.join(" and ")
    ))
}

/// How the traces of `opts` are aggregated into per-prompt counts (dimensions given by the user,
/// then by the manifest beside `first`; categories from the prompt file), and that manifest.
pub(crate) fn aggregate_options(
    opts: &AnalyzeOptions,
    first: &Path,
) -> Result<(AggregateOptions, Option<moe_xray_trace::Manifest>)> {
    if opts.token_types.is_empty() {
        invalid!("--token-types: empty list");
    }
    crate::windows::check_window(opts.windows)?;
    let (nl, ne, mut k) = given_dims(
        opts.model.as_deref(),
        opts.num_layers,
        opts.num_experts,
        opts.top_k,
    )?;
    let manifest = read_manifest_beside(first)?;
    if let Some(m) = &manifest {
        k = k.or(Some(m.top_k));
    }
    let categories = match &opts.prompts {
        Some(p) => Some(
            read_prompts(p)?
                .into_iter()
                .map(|p| (p.id, p.category))
                .collect::<HashMap<_, _>>(),
        ),
        None => None,
    };
    let agg = AggregateOptions {
        token_types: opts.token_types.clone(),
        weighted: opts.weighted,
        num_layers: nl,
        num_experts: ne,
        top_k: k,
        categories,
    };
    Ok((agg, manifest))
}

/// The routing signatures of [`analyze`] without any statistic: one row per prompt kept, in
/// first-appearance order (prompts with a zero-total layer are dropped, as `analyze` drops
/// them), as `signatures.csv` holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct SignatureTable {
    /// L (MoE layers).
    pub num_layers: usize,
    /// E.
    pub num_experts: usize,
    /// Decoder-layer index of each signature layer (the `l` of the `l{l}_e{e}` columns).
    pub layers: Vec<usize>,
    /// Kept prompts.
    pub prompt_ids: Vec<String>,
    /// Category of each kept prompt (from the traces or the prompt file), if known.
    pub categories: Vec<Option<String>>,
    /// N × (L·E) signatures, row-major, layer-major within a row.
    pub signatures: Vec<f64>,
    /// Prompts left out and why.
    pub dropped: Vec<moe_xray_stats::input::DroppedPrompt>,
}

/// Reads the traces of `opts` as [`analyze`] does (the same options: dimensions, token types,
/// `weighted`, categories) and returns their routing signatures; no statistic is computed.
pub fn signature_table(opts: &AnalyzeOptions, progress: &dyn Progress) -> Result<SignatureTable> {
    crate::install_trace_formats();
    let Some(first) = opts.traces.first().cloned() else {
        invalid!("no trace files given");
    };
    let (agg, _) = aggregate_options(opts, &first)?;
    let mut prompt_ids = Vec::new();
    let mut categories = Vec::new();
    let mut signatures = Vec::new();
    let mut dropped = Vec::new();
    let info = for_each_prompt_counts_info(&opts.traces, &agg, |p| {
        let l = p.tokens_per_layer.len();
        let e = p.counts.len() / l.max(1);
        let row = PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        };
        moe_xray_stats::input::check_row(&row, l, e).map_err(|err| TraceError::InvalidFile {
            path: first.clone(),
            message: err.to_string(),
        })?;
        if let Some(layer) = moe_xray_stats::input::empty_layer(&row.counts, l, e) {
            dropped.push(moe_xray_stats::input::DroppedPrompt {
                prompt_id: row.prompt_id,
                reason: format!("no selected tokens at layer {layer} (zero total count)"),
            });
            return Ok(());
        }
        let mut counts = row.counts;
        moe_xray_stats::signature::signature_in_place(&mut counts, l, e);
        prompt_ids.push(row.prompt_id);
        categories.push(row.category);
        signatures.extend_from_slice(&counts);
        if prompt_ids.len().is_multiple_of(1024) {
            progress.step(&format!("signatures: read {} prompts", prompt_ids.len()));
        }
        Ok(())
    })?;
    Ok(SignatureTable {
        num_layers: info.num_layers,
        num_experts: info.num_experts,
        layers: info.layers.iter().map(|&d| d as usize).collect(),
        prompt_ids,
        categories,
        signatures,
        dropped,
    })
}

/// Runs the analysis and returns its outputs (no file written). Shows the step and the prompts
/// read so far on `progress`; a warning goes there too when the dimensions are inferred from
/// per-token data.
pub fn analyze(opts: &AnalyzeOptions, progress: &dyn Progress) -> Result<Outputs> {
    crate::install_trace_formats();
    let Some(first) = opts.traces.first().cloned() else {
        invalid!("no trace files given");
    };
    let types = opts.token_types.clone();
    let (agg, manifest) = aggregate_options(opts, &first)?;
    let (nl, ne, k) = (agg.num_layers, agg.num_experts, agg.top_k);
    let choice = opts.path;
    let mut collector: Option<Collector> = None;
    let mut stats_err: Option<moe_xray_stats::StatsError> = None;
    let mut read = 0usize;
    let dims = for_each_prompt_counts_info(&opts.traces, &agg, |p| {
        read += 1;
        if read.is_multiple_of(1024) {
            progress.step(&format!("analyze: read {read} prompts"));
        }
        let c = collector.get_or_insert_with(|| {
            Collector::new(
                p.tokens_per_layer.len(),
                p.counts.len() / p.tokens_per_layer.len().max(1),
                choice,
            )
        });
        c.push(PromptRow {
            prompt_id: p.prompt_id,
            category: p.category,
            counts: p.counts,
            tokens_per_layer: p.tokens_per_layer,
        })
        .map_err(|e| {
            let msg = e.to_string();
            stats_err = Some(e);
            TraceError::InvalidFile {
                path: first.clone(),
                message: msg,
            }
        })
    });
    if let Some(e) = stats_err {
        return Err(e.into());
    }
    let info = dims?;
    let (l, e) = (info.num_layers, info.num_experts);
    let trace_desc = opts
        .traces
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if manifest.is_none() {
        if let Some(w) =
            inferred_warning(&trace_desc, &opts.traces, nl.is_none(), ne.is_none(), l, e)
        {
            progress.warn(&w);
        }
    }
    progress.step(&format!(
        "analyze: statistics on {read} prompts ({} reps per baseline)",
        opts.reps
    ));
    // Weighted counts cannot reveal k; take it from the data as the unweighted path does.
    let k = if opts.weighted { k.or(info.top_k) } else { k };
    // Signature layer l is decoder layer info.layers[l] (dense layers have no router and are
    // left out). Only when some layer is dense do the two differ and `moe_layers` is written.
    let identity = info
        .layers
        .iter()
        .enumerate()
        .all(|(i, &d)| d as usize == i);
    let layers = (!identity).then(|| info.layers.iter().map(|&d| d as usize).collect::<Vec<_>>());
    let collector = collector.unwrap_or_else(|| Collector::new(l, e, choice));
    // Confound controls: the token ids of the prompts the exact path analyses (the Gram path
    // holds no rows and skips both sections).
    let tokens = if collector.buffered().is_empty() {
        moe_xray_stats::lexical::TokenInput {
            bags: Err("not computed on the gram_sums path".into()),
            matched: opts.token_matched.map(|_| Err("not computed".into())),
        }
    } else {
        progress.step("analyze: token ids for the confound controls");
        crate::confound::token_input(
            &opts.traces,
            &opts.token_types,
            opts.weighted,
            &info.layers,
            e,
            collector.buffered(),
            opts.token_matched,
        )?
    };
    let stats_opts = moe_xray_stats::AnalyzeOptions {
        reps: opts.reps,
        perm_reps: opts.perm_reps.unwrap_or(opts.reps),
        boot_reps: opts.boot_reps.unwrap_or(opts.reps),
        classifier_perm_reps: opts.classifier_perm_reps,
        seed: opts.seed,
        folds: None,
        folds_file: opts.folds.clone(),
        token_types: types.iter().map(|t| t.as_str().to_string()).collect(),
        weighted: opts.weighted,
        traces: opts
            .traces
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        manifest: manifest
            .map(|m| serde_json::to_value(m).unwrap_or_default())
            .unwrap_or_else(|| serde_json::json!({})),
        path: choice,
        skip_tsne: opts.no_tsne,
        skip_classifier: opts.no_classifier,
        layers,
        tokens: Some(std::sync::Arc::new(tokens)),
        ..moe_xray_stats::AnalyzeOptions::default()
    };
    let mut outputs = collector
        .finish(k, &stats_opts)
        .step_context(|| format!("analysing {trace_desc}"))?;
    if let Some(w) = opts.windows {
        progress.step(&format!("analyze: windows of {w} generated tokens"));
        let section = match &outputs {
            Outputs::Exact(e) => crate::windows::window_section(
                &opts.traces,
                e,
                &info.layers,
                opts.weighted,
                w,
                opts.folds.as_deref(),
            )?,
            Outputs::Gram(_) => {
                moe_xray_stats::results::Section::skipped("not computed on the gram_sums path")
            }
        };
        match &mut outputs {
            Outputs::Exact(e) => e.results.windows = Some(section),
            Outputs::Gram(r) => r.windows = Some(section),
        }
    }
    Ok(outputs)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `signatures.csv`: prompt_id, category, then one column per (layer, expert), `l{l}_e{e}`, with
/// l the decoder-layer index (`moe_layers` of the results when some layers are dense).
pub fn signatures_csv(r: &AnalysisResults, sig: &[f64], categories: &[String]) -> String {
    let d = r.num_layers * r.num_experts;
    let mut s = String::from("prompt_id,category");
    for row in 0..r.num_layers {
        let l = r
            .moe_layers
            .as_ref()
            .and_then(|m| m.get(row).copied())
            .unwrap_or(row);
        for e in 0..r.num_experts {
            let _ = write!(s, ",l{l}_e{e}");
        }
    }
    s.push('\n');
    for (i, id) in r.prompt_ids.iter().enumerate() {
        s.push_str(&csv_field(id));
        s.push(',');
        s.push_str(&csv_field(&categories[i]));
        for x in &sig[i * d..(i + 1) * d] {
            let _ = write!(s, ",{x}");
        }
        s.push('\n');
    }
    s
}

/// `prompt_similarity.csv`: N×N matrix with a header row and a first column of prompt ids.
pub fn similarity_csv(r: &AnalysisResults, sim: &[f64]) -> String {
    let n = r.prompt_ids.len();
    let mut s = String::from("prompt_id");
    for id in &r.prompt_ids {
        s.push(',');
        s.push_str(&csv_field(id));
    }
    s.push('\n');
    for (i, id) in r.prompt_ids.iter().enumerate() {
        s.push_str(&csv_field(id));
        for x in &sim[i * n..(i + 1) * n] {
            let _ = write!(s, ",{x}");
        }
        s.push('\n');
    }
    s
}

/// Adds the output files except `results.json` to `batch` (destinations in `out`) and returns
/// the text of `results.json`, which the caller adds last: it marks a complete output set.
/// CSVs of an earlier run that this one does not produce (the Gram-sums path writes none) are
/// removed when the batch is committed, so no file of another run stays beside the new results.
pub fn stage_outputs(out: &Path, outputs: &Outputs, batch: &mut Batch) -> Result<String> {
    let r = outputs.results();
    let json = serde_json::to_string_pretty(r)? + "\n";
    match outputs {
        Outputs::Exact(e) => {
            batch.add(
                out.join("signatures.csv"),
                signatures_csv(r, &e.signatures, &e.prompt_categories),
            )?;
            batch.add(
                out.join("prompt_similarity.csv"),
                similarity_csv(r, &e.similarity),
            )?;
        }
        Outputs::Gram(_) => {
            batch.remove(out.join("signatures.csv"));
            batch.remove(out.join("prompt_similarity.csv"));
        }
    }
    Ok(json)
}

/// Writes the output files into `out` all together or not at all (see [`crate::outdir`]):
/// every file complete in a temporary file first, then renamed into place, `results.json` last.
/// The caller holds the directory's lock.
pub fn write_outputs(out: &Path, outputs: &Outputs) -> Result<()> {
    write_outputs_as(out, outputs, &[TableFormat::Csv])
}

/// The formats of the tables beside `results.json` (`analyze --format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// `signatures.csv`, `prompt_similarity.csv`.
    Csv,
    /// The Parquet tables of [`stage_parquet`] (docs/tables.md).
    Parquet,
}

/// Adds the Parquet tables (`signatures.parquet`, `prompt_similarity.parquet`,
/// `prompts.parquet`, `per_layer.parquet`, `long/<section>.parquet`; docs/tables.md) to `batch`;
/// those of an earlier run that this one does not produce are removed at the commit.
pub fn stage_parquet(out: &Path, outputs: &Outputs, batch: &mut Batch) -> Result<()> {
    use moe_xray_parquet::tables;
    let r = outputs.results();
    let exact = match outputs {
        Outputs::Exact(e) => Some(tables::ExactTables {
            signatures: &e.signatures,
            similarity: &e.similarity,
            categories: &e.prompt_categories,
            oof_probabilities: e.oof_probabilities.as_deref(),
        }),
        Outputs::Gram(_) => None,
    };
    let files = tables::analysis_tables(r, exact)
        .map_err(|e| PipelineError::Invalid(format!("{}: {e}", out.display())))?;
    for f in &files {
        batch.add(out.join(&f.path), &f.bytes)?;
    }
    remove_stale_parquet(out, batch, &files);
    Ok(())
}

/// Removes (at the commit) the Parquet tables of an earlier run not in `kept`.
fn remove_stale_parquet(
    out: &Path,
    batch: &mut Batch,
    kept: &[moe_xray_parquet::tables::TableFile],
) {
    use moe_xray_parquet::tables;
    let names = tables::ANALYSIS_FILES.iter().map(|s| s.to_string()).chain(
        tables::sections()
            .into_iter()
            .map(|s| tables::long_path(&s)),
    );
    for name in names {
        if !kept.iter().any(|f| f.path == name) && out.join(&name).exists() {
            batch.remove(out.join(&name));
        }
    }
}

/// [`write_outputs`] with the tables in each of `formats` (`results.json` is the same bytes
/// whatever the formats); tables of a format not asked for are removed, so no file of an
/// earlier run stays beside the new results.
pub fn write_outputs_as(out: &Path, outputs: &Outputs, formats: &[TableFormat]) -> Result<()> {
    let mut batch = Batch::new();
    let json = if formats.contains(&TableFormat::Csv) {
        stage_outputs(out, outputs, &mut batch)?
    } else {
        for name in ["signatures.csv", "prompt_similarity.csv"] {
            batch.remove(out.join(name));
        }
        serde_json::to_string_pretty(outputs.results())? + "\n"
    };
    if formats.contains(&TableFormat::Parquet) {
        stage_parquet(out, outputs, &mut batch)?;
    } else {
        remove_stale_parquet(out, &mut batch, &[]);
    }
    batch.add(out.join("results.json"), json)?;
    batch.commit()
}
