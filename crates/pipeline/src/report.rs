//! The report step of a study: figures and `report.html`, committed together with the rest of an
//! output set; and the inputs the report reads from a trace directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_xray_report::{ReportInput, SyntheticKind};
use moe_xray_trace::GenerationLine;

use crate::error::{IoContext, Result, ResultExt};
use crate::outdir::{Batch, STAGING_PREFIX};

/// Renders the report into a staging directory inside `out` and commits the whole output set:
/// the files already in `batch`, the figures, `results.json` (`results_json`) and `report.html`
/// last. Returns the path of `report.html`.
pub fn commit_with_report(
    out: &Path,
    input: &ReportInput,
    mut batch: Batch,
    results_json: String,
) -> Result<PathBuf> {
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(out)
        .io_context(|| format!("cannot create a staging directory in {}", out.display()))?;
    let staged = moe_xray_report::write_report(staging.path(), input)?;
    let figs = staging.path().join("figures");
    let mut names = std::fs::read_dir(&figs)
        .and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .io_context(|| format!("cannot list {}", figs.display()))?;
    names.sort();
    for n in names {
        batch.add_file(out.join("figures").join(&n), &figs.join(&n))?;
    }
    batch.add(out.join("results.json"), results_json)?;
    let report = out.join("report.html");
    batch.add_file(&report, &staged)?;
    batch.commit()?;
    Ok(report)
}

/// The generated text of every prompt in a `generations.jsonl`, by prompt id.
pub fn read_generations(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).io_context(|| format!("reading {}", path.display()))?;
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let g: GenerationLine = serde_json::from_str(line)
            .step_context(|| format!("{}:{}: malformed generation line", path.display(), i + 1))?;
        map.insert(g.prompt_id, g.text);
    }
    Ok(map)
}

/// What kind of synthetic model `dir` holds, if any (from the `synth.json` that `synth-model`
/// writes).
pub fn synthetic_kind(dir: &Path) -> Option<SyntheticKind> {
    let text = std::fs::read_to_string(dir.join("synth.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        if v.get("planted").and_then(|x| x.as_bool()) == Some(true) {
            SyntheticKind::Planted
        } else {
            SyntheticKind::Random
        },
    )
}
