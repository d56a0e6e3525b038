//! `moe_xray._native`: the moe-xray crates called from Python. Every statistic, table and figure
//! comes from the same Rust functions as the `moe-xray` command-line tool (the pipeline crate's
//! typed options and results); this module only converts arguments and results. The Python
//! package `moe_xray` (beside this crate) wraps these functions into DataFrames and `Results`.
//!
//! Results cross the boundary as plain Python values: the exact JSON and CSV texts the CLI writes
//! (so `to_json()` is byte for byte the CLI's file), flat lists of numbers and column lists. A
//! failure raises `moe_xray.MoeXrayError` with the error and each of its causes once, naming the
//! file concerned, as the CLI prints it. The GIL is released while Rust computes.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::exceptions::{PyValueError, PyWarning};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use moe_xray_health::compare::CompareOptions;
use moe_xray_health::mi::MiOptions;
use moe_xray_health::{output, HealthOptions};
use moe_xray_model::generate::Truncate;
use moe_xray_pipeline::analyze::{
    analyze as run_analysis, signature_table, signatures_csv, similarity_csv, AnalyzeOptions,
};
use moe_xray_pipeline::health::{compare as run_compare, health as run_health, Dims};
use moe_xray_pipeline::health::{HealthOutputs, HealthRunOptions};
use moe_xray_pipeline::study::{run_study, StudyOptions};
use moe_xray_pipeline::trace::{trace as run_trace, Compress, Mode, TraceOptions};
use moe_xray_pipeline::{PipelineError, Progress};
use moe_xray_report::health_figures;
use moe_xray_report::{render_figures, CategoryUsage, Results as ReportResults};
use moe_xray_stats::analyze::{Outputs, PathChoice, DEFAULT_GRAM_THRESHOLD};
use moe_xray_trace::{read_manifest_beside, TokenType, TraceItem, TraceReader};

pyo3::create_exception!(
    moe_xray,
    MoeXrayError,
    PyValueError,
    "An input moe-xray refuses (the message names the file and field) or a failed step."
);
pyo3::create_exception!(
    moe_xray,
    MoeXrayWarning,
    PyWarning,
    "A warning of moe-xray, e.g. dimensions inferred from the data."
);

/// The error and its causes, ": "-separated, each cause once (as the CLI prints them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cur = c.source();
    }
    msg
}

fn py_err(e: impl std::error::Error) -> PyErr {
    MoeXrayError::new_err(error_chain(&e))
}

fn invalid(msg: impl Into<String>) -> PyErr {
    MoeXrayError::new_err(msg.into())
}

/// Collects a step's warnings (emitted as Python warnings once the GIL is held again); progress
/// is not shown.
#[derive(Default)]
struct Warnings(Mutex<Vec<String>>);

impl Progress for Warnings {
    fn warn(&self, msg: &str) {
        if let Ok(mut w) = self.0.lock() {
            w.push(msg.to_string());
        }
    }
}

impl Warnings {
    fn emit(self, py: Python<'_>) -> PyResult<()> {
        let list = self.0.into_inner().unwrap_or_default();
        let category = py.get_type::<MoeXrayWarning>();
        for w in list {
            let msg =
                std::ffi::CString::new(w.replace('\0', " ")).map_err(|e| invalid(e.to_string()))?;
            PyErr::warn(py, &category, &msg, 2)?;
        }
        Ok(())
    }
}

fn token_types(names: &[String]) -> PyResult<Vec<TokenType>> {
    let mut out = Vec::new();
    for n in names {
        let t = match n.trim() {
            "prompt" => TokenType::Prompt,
            "generation" => TokenType::Generation,
            other => {
                return Err(invalid(format!(
                    "token_types: unknown token type {other:?} (use \"prompt\", \"generation\" or both)"
                )))
            }
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(invalid("token_types: empty list"));
    }
    Ok(out)
}

fn path_choice(path: &str, gram_threshold: usize) -> PyResult<PathChoice> {
    Ok(match path {
        "auto" => PathChoice::Auto {
            threshold: gram_threshold,
        },
        "exact_pairs" => PathChoice::ExactPairs,
        "gram_sums" => PathChoice::GramSums,
        other => {
            return Err(invalid(format!(
                "path: {other:?} is not one of \"auto\", \"exact_pairs\", \"gram_sums\""
            )))
        }
    })
}

/// The trace file's lines as columns: `{"form", "columns", "manifest"}` (manifest: the JSON text
/// of the manifest.json beside the file, or None).
#[pyfunction]
fn read_trace<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let (items, manifest) = py
        .detach(|| -> Result<_, PipelineError> {
            let reader = TraceReader::open(&path)?;
            let mut items = Vec::new();
            for item in reader {
                items.push(item?.1);
            }
            let manifest = read_manifest_beside(&path)?;
            let manifest = match manifest {
                Some(m) => Some(serde_json::to_string(&m)?),
                None => None,
            };
            Ok((items, manifest))
        })
        .map_err(py_err)?;
    let form = match items.first() {
        Some(TraceItem::Event(_)) => "events",
        Some(TraceItem::Counts(_)) => "counts",
        _ => "records",
    };
    let cols = PyDict::new(py);
    let n = items.len();
    let mut prompt_id = Vec::with_capacity(n);
    let mut category = Vec::with_capacity(n);
    let mut token_type = Vec::with_capacity(n);
    match form {
        "records" => {
            let (mut layer, mut position, mut token_id) = (vec![], vec![], vec![]);
            let (mut experts, mut weights, mut probs) = (vec![], vec![], vec![]);
            for it in items {
                let TraceItem::Record(r) = it else {
                    return Err(mixed(&path));
                };
                prompt_id.push(r.prompt_id);
                category.push(r.category);
                layer.push(r.layer);
                position.push(r.position);
                token_id.push(r.token_id);
                token_type.push(r.token_type.as_str());
                experts.push(r.experts);
                weights.push(r.weights);
                probs.push(r.probs);
            }
            cols.set_item("prompt_id", prompt_id)?;
            cols.set_item("category", category)?;
            cols.set_item("layer", layer)?;
            cols.set_item("position", position)?;
            cols.set_item("token_id", token_id)?;
            cols.set_item("token_type", token_type)?;
            cols.set_item("experts", experts)?;
            cols.set_item("weights", weights)?;
            cols.set_item("probs", probs)?;
        }
        "events" => {
            let (mut layer, mut position, mut expert) = (vec![], vec![], vec![]);
            let (mut token_id, mut weight) = (vec![], vec![]);
            for it in items {
                let TraceItem::Event(e) = it else {
                    return Err(mixed(&path));
                };
                prompt_id.push(e.prompt_id);
                category.push(e.category);
                layer.push(e.layer);
                position.push(e.position);
                expert.push(e.expert);
                token_type.push(e.token_type.as_str());
                token_id.push(e.token_id);
                weight.push(e.weight);
            }
            cols.set_item("prompt_id", prompt_id)?;
            cols.set_item("category", category)?;
            cols.set_item("layer", layer)?;
            cols.set_item("position", position)?;
            cols.set_item("expert", expert)?;
            cols.set_item("token_type", token_type)?;
            cols.set_item("token_id", token_id)?;
            cols.set_item("weight", weight)?;
        }
        _ => {
            let (mut nl, mut ne, mut tokens) = (vec![], vec![], vec![]);
            let (mut counts, mut weighted) = (vec![], vec![]);
            for it in items {
                let TraceItem::Counts(c) = it else {
                    return Err(mixed(&path));
                };
                prompt_id.push(c.prompt_id);
                category.push(c.category);
                token_type.push(c.token_type.as_str());
                nl.push(c.num_layers);
                ne.push(c.num_experts);
                tokens.push(c.tokens);
                counts.push(c.counts);
                weighted.push(c.weighted_counts);
            }
            cols.set_item("prompt_id", prompt_id)?;
            cols.set_item("category", category)?;
            cols.set_item("token_type", token_type)?;
            cols.set_item("num_layers", nl)?;
            cols.set_item("num_experts", ne)?;
            cols.set_item("tokens", tokens)?;
            cols.set_item("counts", counts)?;
            cols.set_item("weighted_counts", weighted)?;
        }
    }
    let out = PyDict::new(py);
    out.set_item("form", form)?;
    out.set_item("columns", cols)?;
    out.set_item("manifest", manifest)?;
    Ok(out)
}

fn mixed(path: &std::path::Path) -> PyErr {
    invalid(format!(
        "{}: mixes trace forms (records, flat events, counts lines); one file holds one form",
        path.display()
    ))
}

/// The analysis options of `moe-xray analyze` (same names, same defaults).
#[allow(clippy::too_many_arguments)]
fn analyze_options(
    traces: Vec<PathBuf>,
    prompts: Option<PathBuf>,
    model: Option<PathBuf>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<usize>,
    token_types_: Vec<String>,
    weighted: bool,
) -> PyResult<AnalyzeOptions> {
    let mut o = AnalyzeOptions::new(traces);
    o.prompts = prompts;
    o.model = model;
    o.num_layers = num_layers;
    o.num_experts = num_experts;
    o.top_k = top_k;
    o.token_types = token_types(&token_types_)?;
    o.weighted = weighted;
    Ok(o)
}

fn default_token_types() -> Vec<String> {
    vec!["prompt".into(), "generation".into()]
}

/// Routing signatures: `{"prompt_ids", "categories", "columns", "values" (flat, row-major),
/// "dropped": [(id, reason)], "csv" (signatures.csv as `analyze` writes it)}`.
#[pyfunction]
#[pyo3(signature = (traces, prompts=None, model=None, num_layers=None, num_experts=None,
    top_k=None, token_types=default_token_types(), weighted=false))]
#[allow(clippy::too_many_arguments)]
fn signatures<'py>(
    py: Python<'py>,
    traces: Vec<PathBuf>,
    prompts: Option<PathBuf>,
    model: Option<PathBuf>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<usize>,
    token_types: Vec<String>,
    weighted: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = analyze_options(
        traces,
        prompts,
        model,
        num_layers,
        num_experts,
        top_k,
        token_types,
        weighted,
    )?;
    let warnings = Warnings::default();
    let t = py
        .detach(|| signature_table(&opts, &warnings))
        .map_err(py_err)?;
    warnings.emit(py)?;
    let mut columns = vec!["prompt_id".to_string(), "category".to_string()];
    for l in &t.layers {
        for e in 0..t.num_experts {
            columns.push(format!("l{l}_e{e}"));
        }
    }
    let out = PyDict::new(py);
    out.set_item("prompt_ids", &t.prompt_ids)?;
    out.set_item("categories", &t.categories)?;
    out.set_item("columns", columns)?;
    out.set_item("num_layers", t.num_layers)?;
    out.set_item("num_experts", t.num_experts)?;
    out.set_item("values", &t.signatures)?;
    let dropped: Vec<(String, String)> = t
        .dropped
        .into_iter()
        .map(|d| (d.prompt_id, d.reason))
        .collect();
    out.set_item("dropped", dropped)?;
    Ok(out)
}

fn figures_list<'py>(
    py: Python<'py>,
    figs: impl IntoIterator<Item = moe_xray_report::Figure>,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for f in figs {
        let d = PyDict::new(py);
        d.set_item("id", f.id)?;
        d.set_item("title", f.title)?;
        d.set_item("caption", f.caption)?;
        d.set_item("svg", f.svg)?;
        d.set_item("available", f.available)?;
        list.append(d)?;
    }
    Ok(list)
}

/// The analysis: `{"results_json"` (results.json's bytes as `analyze` writes them),
/// `"signatures_csv"`, `"similarity_csv"` (None on the Gram-sums path), `"prompt_categories"`,
/// `"figures"` (the report's study figures)}.
#[pyfunction]
#[pyo3(signature = (traces, prompts=None, model=None, num_layers=None, num_experts=None,
    top_k=None, token_types=default_token_types(), weighted=false, reps=1000, perm_reps=None,
    boot_reps=None, classifier_perm_reps=200, seed=0, folds=None, path="auto",
    gram_threshold=DEFAULT_GRAM_THRESHOLD, no_tsne=false, no_classifier=false))]
#[allow(clippy::too_many_arguments)]
fn analyze<'py>(
    py: Python<'py>,
    traces: Vec<PathBuf>,
    prompts: Option<PathBuf>,
    model: Option<PathBuf>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    top_k: Option<usize>,
    token_types: Vec<String>,
    weighted: bool,
    reps: usize,
    perm_reps: Option<usize>,
    boot_reps: Option<usize>,
    classifier_perm_reps: usize,
    seed: u64,
    folds: Option<PathBuf>,
    path: &str,
    gram_threshold: usize,
    no_tsne: bool,
    no_classifier: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = analyze_options(
        traces,
        prompts,
        model,
        num_layers,
        num_experts,
        top_k,
        token_types,
        weighted,
    )?;
    opts.reps = reps;
    opts.perm_reps = perm_reps;
    opts.boot_reps = boot_reps;
    opts.classifier_perm_reps = classifier_perm_reps;
    opts.seed = seed;
    opts.folds = folds;
    opts.path = path_choice(path, gram_threshold)?;
    opts.no_tsne = no_tsne;
    opts.no_classifier = no_classifier;
    let warnings = Warnings::default();
    type Computed = (
        String,
        Option<(String, String)>,
        Vec<String>,
        Vec<moe_xray_report::Figure>,
    );
    let (json, csvs, categories, figures) = py
        .detach(|| -> Result<Computed, PipelineError> {
            let outputs = run_analysis(&opts, &warnings)?;
            let r = outputs.results();
            // The bytes `moe-xray analyze` writes to results.json.
            let json = serde_json::to_string_pretty(r)? + "\n";
            let mut report = ReportResults::from(r.clone());
            let (csvs, categories, usage) = match &outputs {
                Outputs::Exact(e) => {
                    let (l, ne) = (r.num_layers, r.num_experts);
                    let len = l * ne;
                    let usage = CategoryUsage::from_signatures(
                        l,
                        ne,
                        e.prompt_categories
                            .iter()
                            .enumerate()
                            .map(|(i, c)| (c.as_str(), &e.signatures[i * len..(i + 1) * len])),
                    )?;
                    report.prompt_categories = e.prompt_categories.clone();
                    (
                        Some((
                            signatures_csv(r, &e.signatures, &e.prompt_categories),
                            similarity_csv(r, &e.similarity),
                        )),
                        e.prompt_categories.clone(),
                        Some(usage),
                    )
                }
                Outputs::Gram(_) => (None, Vec::new(), None),
            };
            let figures = render_figures(&report, usage.as_ref());
            Ok((json, csvs, categories, figures))
        })
        .map_err(py_err)?;
    warnings.emit(py)?;
    let out = PyDict::new(py);
    out.set_item("results_json", json)?;
    let (sig, sim) = match csvs {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    out.set_item("signatures_csv", sig)?;
    out.set_item("similarity_csv", sim)?;
    out.set_item("prompt_categories", categories)?;
    out.set_item("figures", figures_list(py, figures)?)?;
    Ok(out)
}

fn dims(model: Option<PathBuf>, num_layers: Option<usize>, num_experts: Option<usize>) -> Dims {
    Dims {
        model,
        num_layers,
        num_experts,
    }
}

/// Routing health: `{"json"` (what `health --json` prints), `"csv"`: {name: text} (the files of
/// `health --csv`), `"svg"`: {name: text} (the files of `health --svg`)}.
#[pyfunction]
#[pyo3(signature = (traces, model=None, num_layers=None, num_experts=None, layer=None,
    cold_fraction=0.1, top_pairs=10, token_types=default_token_types(), mi=false,
    mi_components=2, mi_bins=3, mi_knn=5, perms=1000, seed=0))]
#[allow(clippy::too_many_arguments)]
fn health<'py>(
    py: Python<'py>,
    traces: Vec<PathBuf>,
    model: Option<PathBuf>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    layer: Option<usize>,
    cold_fraction: f64,
    top_pairs: usize,
    token_types: Vec<String>,
    mi: bool,
    mi_components: usize,
    mi_bins: usize,
    mi_knn: usize,
    perms: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = HealthRunOptions {
        traces,
        dims: dims(model, num_layers, num_experts),
        health: HealthOptions {
            token_types: self::token_types(&token_types)?,
            cold_fraction,
            top_pairs,
            keep_prompts: mi,
        },
        layer,
        mi: mi.then_some(MiOptions {
            components: mi_components,
            bins: mi_bins,
            perms,
            seed,
            knn: mi_knn,
        }),
    };
    let warnings = Warnings::default();
    type Computed = (String, Vec<(String, String)>, Vec<(String, String)>);
    let (json, csv, svg) = py
        .detach(|| -> Result<Computed, PipelineError> {
            let h: HealthOutputs = run_health(&opts, &warnings)?;
            let json = h.json()?;
            let mut csv = vec![
                ("layers".to_string(), output::layers_csv(&h.report)),
                ("load".to_string(), output::load_csv(&h.report)),
            ];
            if let Some(c) = output::coactivation_csv(&h.acc) {
                csv.push(("coactivation".to_string(), c));
            }
            if let Some(p) = output::pairs_csv(&h.report) {
                csv.push(("pairs".to_string(), p));
            }
            // The figures `health --svg` writes (see `HealthOutputs::stage_svg`).
            let mut svg = vec![(
                "load_heatmap".to_string(),
                health_figures::load_heatmap(&h.report),
            )];
            let layer = h.layer;
            let row = h.acc.layer_ids().iter().position(|&l| l == layer);
            if let Some(s) = row
                .and_then(|r| h.acc.coactivation(r).map(|c| (r, c)))
                .and_then(|(r, c)| health_figures::coactivation_heatmap(&h.report, c, r))
            {
                svg.push((format!("coactivation_layer{layer}"), s));
            }
            Ok((json, csv, svg))
        })
        .map_err(py_err)?;
    warnings.emit(py)?;
    let out = PyDict::new(py);
    out.set_item("json", json)?;
    let c = PyDict::new(py);
    for (k, v) in csv {
        c.set_item(k, v)?;
    }
    out.set_item("csv", c)?;
    let s = PyDict::new(py);
    for (k, v) in svg {
        s.set_item(k, v)?;
    }
    out.set_item("svg", s)?;
    Ok(out)
}

/// Comparison of two runs: `{"json"` (what `compare --json` prints), `"shifts_csv"`,
/// `"svg"` (the JS bar chart), `"exceeded"`}.
#[pyfunction]
#[pyo3(signature = (run_a, run_b, model=None, num_layers=None, num_experts=None, reps=1000,
    seed=0, fail_above=None, token_types=default_token_types()))]
#[allow(clippy::too_many_arguments)]
fn compare<'py>(
    py: Python<'py>,
    run_a: PathBuf,
    run_b: PathBuf,
    model: Option<PathBuf>,
    num_layers: Option<usize>,
    num_experts: Option<usize>,
    reps: usize,
    seed: u64,
    fail_above: Option<f64>,
    token_types: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    if let Some(t) = fail_above {
        if !(0.0..=1.0).contains(&t) {
            return Err(invalid(format!(
                "fail_above {t}: the JS divergence in bits lies in [0, 1]"
            )));
        }
    }
    let hopts = HealthOptions {
        token_types: self::token_types(&token_types)?,
        ..Default::default()
    };
    let copts = CompareOptions {
        reps,
        seed,
        fail_above,
    };
    let d = dims(model, num_layers, num_experts);
    let warnings = Warnings::default();
    let (json, csv, svg, exceeded) = py
        .detach(|| -> Result<_, PipelineError> {
            let report = run_compare(&run_a, &run_b, &d, &hopts, &copts, &warnings)?;
            Ok((
                serde_json::to_string_pretty(&report)? + "\n",
                output::shifts_csv(&report),
                health_figures::js_bars(&report),
                report.exceeded,
            ))
        })
        .map_err(py_err)?;
    warnings.emit(py)?;
    let out = PyDict::new(py);
    out.set_item("json", json)?;
    out.set_item("shifts_csv", csv)?;
    out.set_item("svg", svg)?;
    out.set_item("exceeded", exceeded)?;
    Ok(out)
}

fn truncate(side: Option<&str>) -> PyResult<Option<Truncate>> {
    match side {
        None => Ok(None),
        Some("left") => Ok(Some(Truncate::Left)),
        Some("right") => Ok(Some(Truncate::Right)),
        Some(other) => Err(invalid(format!(
            "truncate_prompts: {other:?} is not \"left\" or \"right\""
        ))),
    }
}

/// Records the routing of a checkpoint on a prompt set (`moe-xray trace`); returns the summary
/// `trace --json` prints, as JSON text.
#[pyfunction]
#[pyo3(signature = (model, prompts, out, mode="events", compress=None, record_probs=false,
    max_new_tokens=32, batch_size=64, chat_template=false, ignore_eos=false,
    hf_generate_compat=false, temperature=None, top_p=None, seed=0, resume=false, dtype=None,
    truncate_prompts=None))]
#[allow(clippy::too_many_arguments)]
fn trace(
    py: Python<'_>,
    model: PathBuf,
    prompts: PathBuf,
    out: PathBuf,
    mode: &str,
    compress: Option<&str>,
    record_probs: bool,
    max_new_tokens: usize,
    batch_size: usize,
    chat_template: bool,
    ignore_eos: bool,
    hf_generate_compat: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: u64,
    resume: bool,
    dtype: Option<String>,
    truncate_prompts: Option<&str>,
) -> PyResult<String> {
    let mut o = TraceOptions::new(model, prompts, out);
    o.mode = match mode {
        "events" => Mode::Events,
        "counts" => Mode::Counts,
        other => {
            return Err(invalid(format!(
                "mode: {other:?} is not \"events\" or \"counts\""
            )))
        }
    };
    o.compress = match compress {
        None => None,
        Some("gz") => Some(Compress::Gz),
        Some("zst") => Some(Compress::Zst),
        Some(other) => {
            return Err(invalid(format!(
                "compress: {other:?} is not \"gz\" or \"zst\""
            )))
        }
    };
    o.record_probs = record_probs;
    o.max_new_tokens = max_new_tokens;
    o.batch_size = batch_size;
    o.chat_template = chat_template;
    o.ignore_eos = ignore_eos;
    o.hf_generate_compat = hf_generate_compat;
    o.temperature = temperature;
    o.top_p = top_p;
    o.seed = seed;
    o.resume = resume;
    o.dtype = dtype;
    o.truncate_prompts = truncate(truncate_prompts)?;
    let warnings = Warnings::default();
    let summary = py.detach(|| run_trace(&o, &warnings)).map_err(py_err)?;
    warnings.emit(py)?;
    Ok(summary.to_json().to_string())
}

/// The whole study (`moe-xray run`): trace → analysis → health → figures → report.html in `out`.
/// Returns `{"report": path, "trace": summary JSON text}`.
#[pyfunction]
#[pyo3(signature = (model, out, prompts="paper80", max_new_tokens=32, chat_template=false,
    batch_size=64, reps=1000, seed=0, dtype=None, truncate_prompts=None, command=""))]
#[allow(clippy::too_many_arguments)]
fn run<'py>(
    py: Python<'py>,
    model: PathBuf,
    out: PathBuf,
    prompts: &str,
    max_new_tokens: usize,
    chat_template: bool,
    batch_size: usize,
    reps: usize,
    seed: u64,
    dtype: Option<String>,
    truncate_prompts: Option<&str>,
    command: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let mut o = StudyOptions::new(model, out);
    o.prompts = prompts.to_string();
    o.max_new_tokens = max_new_tokens;
    o.chat_template = chat_template;
    o.batch_size = batch_size;
    o.reps = reps;
    o.seed = seed;
    o.dtype = dtype;
    o.truncate_prompts = truncate(truncate_prompts)?;
    let warnings = Warnings::default();
    let s = py
        .detach(|| run_study(&o, command, &warnings))
        .map_err(py_err)?;
    warnings.emit(py)?;
    let out = PyDict::new(py);
    out.set_item("report", s.report)?;
    out.set_item("trace", s.trace.to_json().to_string())?;
    Ok(out)
}

/// The compiled part of the `moe_xray` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Parquet traces (files and Hive datasets) for read_trace and every reader of traces.
    moe_xray_pipeline::install_trace_formats();
    m.add("MoeXrayError", py.get_type::<MoeXrayError>())?;
    m.add("MoeXrayWarning", py.get_type::<MoeXrayWarning>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(read_trace, m)?)?;
    m.add_function(wrap_pyfunction!(signatures, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(health, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(trace, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    Ok(())
}
