//! Routing over time (`--windows W`; definitions in docs/statistics.md, "Routing over time"): the
//! trace files are read twice more — once for each prompt's first generated position, once for
//! the window counts — and the per-window statistics are `moe_xray_stats::windows`.

use std::path::PathBuf;

use moe_xray_stats::analyze::ExactOutputs;
use moe_xray_stats::cv::read_folds_csv;
use moe_xray_stats::results::{RoutingWindows, Section};
use moe_xray_stats::windows::{window_folds, WindowScan, WindowShape};
use moe_xray_trace::{TraceItem, TraceReader};

use crate::error::{invalid, Result};

/// Most tokens per window (`--windows`).
pub const MAX_WINDOW_TOKENS: usize = 1 << 20;

/// Checks a `--windows` value.
pub fn check_window(w: Option<usize>) -> Result<()> {
    if let Some(w) = w {
        if w == 0 || w > MAX_WINDOW_TOKENS {
            invalid!("--windows {w}: must be between 1 and {MAX_WINDOW_TOKENS} generated tokens");
        }
    }
    Ok(())
}

fn each_item(traces: &[PathBuf], mut push: impl FnMut(&TraceItem)) -> Result<()> {
    for path in traces {
        for item in TraceReader::open(path)? {
            let (_, item) = item?;
            push(&item);
        }
    }
    Ok(())
}

/// The `windows` section of the analysed prompts of `e` (the exact path's outputs): windows of
/// `window` generated tokens of `traces`. `layers`: decoder index of each signature row; `folds`:
/// the analysis's fold file, if any (otherwise stratified 5-fold per window, seeded like
/// `logreg_5fold`).
pub fn window_section(
    traces: &[PathBuf],
    e: &ExactOutputs,
    layers: &[u32],
    weighted: bool,
    window: usize,
    folds: Option<&std::path::Path>,
) -> Result<Section<RoutingWindows>> {
    check_window(Some(window))?;
    let r = &e.results;
    let shape = WindowShape::new(layers, r.num_experts, weighted, window, &r.prompt_ids);
    let mut scan = WindowScan::new(shape);
    each_item(traces, |it| scan.push(it))?;
    let mut pass = match scan.finish() {
        Ok(p) => p,
        Err(why) => return Ok(Section::skipped(why)),
    };
    each_item(traces, |it| pass.push(it))?;
    let cats: Vec<String> = r.categories.iter().map(|c| c.name.clone()).collect();
    let mut labels = Vec::with_capacity(e.prompt_categories.len());
    for c in &e.prompt_categories {
        match cats.iter().position(|x| x == c) {
            Some(i) => labels.push(i),
            None => return Ok(Section::skipped(format!("category {c:?} is not analysed"))),
        }
    }
    let file_folds = match folds {
        Some(p) => Some(
            read_folds_csv(p, &r.prompt_ids)
                .map_err(|e| crate::error::PipelineError::Invalid(e.to_string()))?,
        ),
        None => None,
    };
    let seed = r.settings.seed;
    let fold_of =
        |rows: &[usize], local: &[usize]| window_folds(file_folds.as_ref(), seed, rows, local);
    Ok(pass.finish(&labels, &cats, &fold_of))
}
