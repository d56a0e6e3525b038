//! Routing health (definitions: docs/health.md): the `health` command's computation
//! ([`health`]: [`HealthRunOptions`] → [`HealthOutputs`]) and its output files, and the health
//! step of a study ([`stage_health`]: `health.json` with the mutual information between
//! signatures and category, CSV tables under `health/`, the report's health section).

use std::path::{Path, PathBuf};

use moe_xray_health::input::run_dims;
use moe_xray_health::mi::{mutual_information, signatures_with_labels, MiOptions, MiReport};
use moe_xray_health::{
    accumulate_run, mi, output, resolve_traces, HealthAccumulator, HealthOptions, HealthReport,
    RunInput,
};
use moe_xray_report::{health_figures, HealthSection};

use crate::analyze::{given_dims, inferred_warning};
use crate::error::{invalid, Result, ResultExt};
use crate::outdir::Batch;
use crate::Progress;

/// Where the number of layers and experts of a run come from (the `--model DIR` /
/// `--num-layers` / `--num-experts` flags of `health` and `compare`).
#[derive(Debug, Clone, Default)]
pub struct Dims {
    /// Model directory: the numbers of layers and experts are read from its config.json.
    pub model: Option<PathBuf>,
    /// Number of MoE layers L (overrides manifest / config).
    pub num_layers: Option<usize>,
    /// Number of experts per layer E (overrides manifest / config).
    pub num_experts: Option<usize>,
}

/// (L, E) of `run`: the given numbers, then the `model` directory's config.json, then the run's
/// manifest.json, and only then the trace data — with a loud warning through `progress` saying
/// which dimension was inferred and how to give it (counts lines state both: no warning).
pub fn resolve_dims(run: &RunInput, d: &Dims, progress: &dyn Progress) -> Result<(usize, usize)> {
    let (mut nl, mut ne, _) = given_dims(d.model.as_deref(), d.num_layers, d.num_experts, None)?;
    if let Some(m) = &run.manifest {
        nl = nl.or(Some(m.num_layers));
        ne = ne.or(Some(m.num_experts));
    }
    if let (Some(l), Some(e)) = (nl, ne) {
        return Ok((l, e));
    }
    let (il, ie) = run_dims(run)?;
    if let Some(w) = inferred_warning(&run.label, &run.paths, nl.is_none(), ne.is_none(), il, ie) {
        progress.warn(&w);
    }
    Ok((nl.unwrap_or(il), ne.unwrap_or(ie)))
}

/// Options of the `health` computation.
#[derive(Debug, Clone, Default)]
pub struct HealthRunOptions {
    /// Trace files or run directories containing them.
    pub traces: Vec<PathBuf>,
    /// Dimensions given by the user.
    pub dims: Dims,
    /// Token types, cold-expert threshold, pairs listed (`keep_prompts` is set from `mi`).
    pub health: HealthOptions,
    /// Decoder layer of the co-activation heatmap (must be an MoE layer; `None`: the first MoE
    /// layer).
    pub layer: Option<usize>,
    /// Also estimate the mutual information I(signature; task) with these options.
    pub mi: Option<MiOptions>,
}

/// What [`health`] computed.
pub struct HealthOutputs {
    /// Per-layer accumulations (co-activation matrices, per-prompt loads).
    pub acc: HealthAccumulator,
    /// The health report.
    pub report: HealthReport,
    /// The mutual information, when asked for.
    pub mi: Option<MiReport>,
    /// The decoder layer of the co-activation heatmap (`HealthRunOptions::layer`, resolved).
    pub layer: usize,
}

/// Computes the routing health of the traces (no file written).
pub fn health(opts: &HealthRunOptions, progress: &dyn Progress) -> Result<HealthOutputs> {
    crate::install_trace_formats();
    let hopts = HealthOptions {
        keep_prompts: opts.mi.is_some(),
        ..opts.health.clone()
    };
    let run = resolve_traces(&opts.traces)?;
    let dims = resolve_dims(&run, &opts.dims, progress)?;
    let acc = accumulate_run(&run, Some(dims), hopts)?;
    let report = acc.report();
    let layer = match opts.layer {
        Some(l) => l,
        None => acc.layer_ids().first().copied().unwrap_or(0),
    };
    if !report.layers.iter().any(|l| l.layer == layer) {
        if layer < acc.num_decoder_layers() {
            invalid!(
                "--layer {} is a dense layer (no router; the MoE layers are {:?})",
                layer,
                acc.layer_ids()
            );
        }
        invalid!(
            "--layer {} is out of range (the traces have {} layers)",
            layer,
            acc.num_decoder_layers()
        );
    }
    let mi = match &opts.mi {
        Some(mo) => {
            let (sigs, labels, dropped) =
                signatures_with_labels(acc.prompts(), report.num_layers, report.num_experts);
            if let Some(first) = dropped.first() {
                progress.warn(&format!(
                    "--mi: {} prompt(s) left out (first: {} — {})",
                    dropped.len(),
                    first.0,
                    first.1
                ));
            }
            progress.step("health: mutual information (permutations)");
            let m = mutual_information(&sigs, &labels, mo).step_context(|| {
                "--mi (mutual information needs prompt categories in the traces)"
            })?;
            Some(m)
        }
        None => None,
    };
    Ok(HealthOutputs {
        acc,
        report,
        mi,
        layer,
    })
}

impl HealthOutputs {
    /// The report as JSON (with `mutual_information` when computed), pretty, newline-terminated.
    pub fn json(&self) -> Result<String> {
        let mut v = serde_json::to_value(&self.report)?;
        if let Some(m) = &self.mi {
            v["mutual_information"] = serde_json::to_value(m)?;
        }
        Ok(serde_json::to_string_pretty(&v)? + "\n")
    }

    /// Adds `layers.csv`, `load.csv` and, with per-token input, `coactivation.csv` and
    /// `pairs.csv` in `dir` to `batch`.
    pub fn stage_csv(&self, dir: &Path, batch: &mut Batch) -> Result<()> {
        batch.add(dir.join("layers.csv"), output::layers_csv(&self.report))?;
        batch.add(dir.join("load.csv"), output::load_csv(&self.report))?;
        if let Some(c) = output::coactivation_csv(&self.acc) {
            batch.add(dir.join("coactivation.csv"), c)?;
        }
        if let Some(p) = output::pairs_csv(&self.report) {
            batch.add(dir.join("pairs.csv"), p)?;
        }
        Ok(())
    }

    /// Adds the Parquet tables (`layers.parquet`, `load.parquet`, with per-token input
    /// `coactivation.parquet` and `pairs.parquet`, and `long.parquet`: the report JSON as one
    /// tidy table; docs/tables.md) in `dir` to `batch`; those of an earlier run that this one
    /// does not produce are removed at the commit.
    pub fn stage_parquet(&self, dir: &Path, batch: &mut Batch) -> Result<()> {
        use moe_xray_parquet::tables;
        let mut v = serde_json::to_value(&self.report)?;
        if let Some(m) = &self.mi {
            v["mutual_information"] = serde_json::to_value(m)?;
        }
        let files = tables::health_tables(&self.report, &self.acc, &v)
            .map_err(|e| crate::error::PipelineError::Invalid(format!("{}: {e}", dir.display())))?;
        for f in &files {
            batch.add(dir.join(&f.path), &f.bytes)?;
        }
        for name in tables::HEALTH_FILES {
            if !files.iter().any(|f| f.path == *name) && dir.join(name).exists() {
                batch.remove(dir.join(name));
            }
        }
        Ok(())
    }

    /// Adds `load_heatmap.svg` and `coactivation_layer<layer>.svg` in `dir` to `batch` (`layer`
    /// is a decoder-layer index); returns false when there is no co-activation heatmap (counts
    /// input has no co-activation, or `layer` is not an MoE layer).
    pub fn stage_svg(&self, dir: &Path, layer: usize, batch: &mut Batch) -> Result<bool> {
        batch.add(
            dir.join("load_heatmap.svg"),
            health_figures::load_heatmap(&self.report),
        )?;
        let row = self.acc.layer_ids().iter().position(|&l| l == layer);
        match row
            .and_then(|r| self.acc.coactivation(r).map(|c| (r, c)))
            .and_then(|(r, c)| health_figures::coactivation_heatmap(&self.report, c, r))
        {
            Some(s) => {
                batch.add(dir.join(format!("coactivation_layer{layer}.svg")), s)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Computes the routing health of `trace_file` and adds `health.json` and `health/*.csv`
/// (destinations in `out`) to `batch`; `seed` seeds the mutual-information permutations.
/// Returns the report's health section (its co-activation figure shows the deepest layer).
pub fn stage_health(
    trace_file: &Path,
    out: &Path,
    seed: u64,
    batch: &mut Batch,
) -> Result<HealthSection> {
    let run = resolve_traces(&[trace_file.to_path_buf()])?;
    let opts = HealthOptions {
        keep_prompts: true,
        ..HealthOptions::default()
    };
    let acc = accumulate_run(&run, None, opts)?;
    let report = acc.report();
    let (sigs, labels, _dropped) =
        mi::signatures_with_labels(acc.prompts(), report.num_layers, report.num_experts);
    let mi = mi::mutual_information(
        &sigs,
        &labels,
        &mi::MiOptions {
            seed,
            ..mi::MiOptions::default()
        },
    )
    .ok();
    let mut full = serde_json::to_value(&report)?;
    if let Some(m) = &mi {
        full["mutual_information"] = serde_json::to_value(m)?;
    }
    batch.add(
        out.join("health.json"),
        serde_json::to_string_pretty(&full)? + "\n",
    )?;
    let dir = out.join("health");
    batch.add(dir.join("layers.csv"), output::layers_csv(&report))?;
    batch.add(dir.join("load.csv"), output::load_csv(&report))?;
    if let Some(c) = output::coactivation_csv(&acc) {
        batch.add(dir.join("coactivation.csv"), c)?;
    }
    if let Some(c) = output::pairs_csv(&report) {
        batch.add(dir.join("pairs.csv"), c)?;
    }
    // The co-activation figure shows the deepest layer, where the paper finds the most task signal.
    let layer = report.num_layers.saturating_sub(1);
    Ok(HealthSection::new(&acc, report, mi, layer))
}

/// Reads one run (trace file or run directory) for a comparison, its dimensions resolved as
/// [`health`] does.
pub fn read_run(
    path: &Path,
    dims: &Dims,
    opts: &HealthOptions,
    progress: &dyn Progress,
) -> Result<moe_xray_health::compare::RunData> {
    crate::install_trace_formats();
    let run = moe_xray_health::resolve_run(path)?;
    progress.step(&format!("compare: reading {}", run.label));
    let d = resolve_dims(&run, dims, progress)?;
    let opts = HealthOptions {
        keep_prompts: true,
        ..opts.clone()
    };
    let acc = accumulate_run(&run, Some(d), opts)?;
    Ok(moe_xray_health::compare::RunData {
        label: run.label,
        num_layers: acc.num_layers(),
        layers: acc.layer_ids().to_vec(),
        num_experts: acc.num_experts(),
        prompts: acc.into_prompts(),
    })
}

/// Compares the routing of two runs (JS divergences, permutation test, drift guard).
pub fn compare(
    run_a: &Path,
    run_b: &Path,
    dims: &Dims,
    opts: &HealthOptions,
    compare: &moe_xray_health::CompareOptions,
    progress: &dyn Progress,
) -> Result<moe_xray_health::CompareReport> {
    crate::install_trace_formats();
    let a = read_run(run_a, dims, opts, progress)?;
    let b = read_run(run_b, dims, opts, progress)?;
    progress.step("compare: divergences and permutation test");
    Ok(moe_xray_health::compare_runs(&a, &b, compare)?)
}
