//! moe-xray-report: the study's figures as deterministic SVG and a self-contained `report.html`.
//!
//! * [`render_figures`] turns a parsed `results.json` ([`Results`]) plus the per-category expert
//!   usage ([`CategoryUsage`]) into [`Figure`]s (inline-able SVG with title and caption).
//! * [`render_report`] builds one HTML file (inline SVG and CSS, no scripts, no network) with the
//!   headline numbers, the figures, an interpretation box, the run manifest, the prompt table
//!   with generated text (HTML-escaped) and the command that reproduces it.
//! * [`write_report`] writes `figures/*.svg` and `report.html` into a folder (temp file + rename).
//!
//! Output bytes depend only on the inputs: no timestamps, fixed float formatting.
//!
//! ```no_run
//! use moe_xray_report::{write_report, CategoryUsage, PromptRow, ReportInput, Results};
//! # fn main() -> moe_xray_report::Result<()> {
//! let results = Results::read("runs/x/results.json")?;
//! // per-prompt signatures (L·E, layer-major) → per-category means for the usage figure
//! let sig = vec![1.0 / 64.0; 16 * 64];
//! let usage = CategoryUsage::from_signatures(16, 64, [("code", &sig[..])])?;
//! let input = ReportInput {
//!     results,
//!     usage: Some(usage),
//!     prompts: vec![PromptRow {
//!         id: "code-01".into(),
//!         category: "code".into(),
//!         text: "Write a parser".into(),
//!         generated: Some("fn parse() {}".into()),
//!     }],
//!     command: "moe-xray run --model DIR --out runs/x".into(),
//!     ..Default::default()
//! };
//! let html = write_report("runs/x", &input)?; // runs/x/report.html + runs/x/figures/*.svg
//! # let _ = html;
//! # Ok(())
//! # }
//! ```
//!
//! [`Results`] reads exactly the `results.json` schema, whose types are defined once in
//! `moe_xray_stats::results` (JSON Schema: `docs/results.schema.json`); a file of another major
//! `schema_version` is refused. `results.json` has no per-prompt category list; the report takes
//! the categories from the prompt table ([`ReportInput::results_with_categories`]).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod ablation;
pub mod confound_figures;
pub mod crossmodel;
pub mod crossmodel_multi;
mod figures;
pub mod health_figures;
mod health_section;
mod html;
pub mod results;
mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use figures::{render_figures, FIG_WIDTH};
pub use html::render_report;
pub use results::{Results, SyntheticKind};
pub use svg::esc as html_escape;
/// The figures' shared palette (Okabe–Ito, report order) and font stack.
pub use svg::{FONT as FIGURE_FONT, OKABE_ITO};

/// Errors of this crate; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON input could not be parsed.
    #[error("{path}:{line}: {msg}")]
    Parse {
        /// File.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A `results.json` of a `schema_version` this build does not read.
    #[error("{path}: {msg}")]
    Schema {
        /// File.
        path: PathBuf,
        /// The version found and the versions supported.
        msg: String,
    },
    /// Inputs are inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ReportError>;

/// One rendered figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Stable id, also the SVG element id and the file stem under `figures/`.
    pub id: String,
    /// Title ("Figure N. …").
    pub title: String,
    /// Caption: what the figure shows and how it was computed.
    pub caption: String,
    /// Standalone SVG document (also valid inline in HTML).
    pub svg: String,
    /// False when the data was missing or skipped; the SVG then only says why.
    pub available: bool,
}

/// Mean routing signature (L × E, layer-major, shares summing to 1 per layer) of each category.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CategoryUsage {
    /// L.
    pub num_layers: usize,
    /// E.
    pub num_experts: usize,
    /// (category, mean signature of length L·E).
    pub categories: Vec<(String, Vec<f64>)>,
}

impl CategoryUsage {
    /// Averages per-prompt signatures (each of length L·E) by category; categories in sorted
    /// order. Errors when a signature has the wrong length.
    pub fn from_signatures<'a>(
        num_layers: usize,
        num_experts: usize,
        prompts: impl IntoIterator<Item = (&'a str, &'a [f64])>,
    ) -> Result<CategoryUsage> {
        let len = num_layers * num_experts;
        let mut acc: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
        for (cat, sig) in prompts {
            if sig.len() != len {
                return Err(ReportError::Invalid(format!(
                    "signature of a '{cat}' prompt has {} values, expected L·E = {len}",
                    sig.len()
                )));
            }
            let e = acc
                .entry(cat.to_string())
                .or_insert_with(|| (vec![0.0; len], 0));
            for (a, s) in e.0.iter_mut().zip(sig) {
                *a += s;
            }
            e.1 += 1;
        }
        Ok(CategoryUsage {
            num_layers,
            num_experts,
            categories: acc
                .into_iter()
                .map(|(k, (v, n))| (k, v.into_iter().map(|x| x / n as f64).collect()))
                .collect(),
        })
    }
}

/// One row of the prompt table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptRow {
    /// Prompt id.
    pub id: String,
    /// Category.
    pub category: String,
    /// Prompt text.
    pub text: String,
    /// Generated continuation, if any.
    pub generated: Option<String>,
}

/// Optional routing-health section (issue 7): the health numbers (shown grouped and rounded,
/// like the headline table), prebuilt SVG figures and explanatory paragraphs (plain text,
/// escaped). [`HealthSection::new`] builds it from a health accumulator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthSection {
    /// The `moe-xray health` report of the run (load balance, router confidence, co-activation).
    pub report: Option<moe_xray_health::HealthReport>,
    /// Mutual information between routing signature and category, when computed.
    pub mutual_information: Option<moe_xray_health::MiReport>,
    /// Figures (SVG strings are inserted as they are: they must come from trusted code, e.g.
    /// [`health_figures`]).
    pub figures: Vec<Figure>,
    /// Paragraphs of plain text.
    pub notes: Vec<String>,
}

/// Everything the report shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportInput {
    /// Parsed results.json.
    pub results: Results,
    /// Per-category mean signatures for the expert-usage figure.
    pub usage: Option<CategoryUsage>,
    /// Prompt table (also used to fill `results.prompt_categories` when missing).
    pub prompts: Vec<PromptRow>,
    /// Command line that reproduces the report.
    pub command: String,
    /// Page title; default "moe-xray routing report: MODEL".
    pub title: Option<String>,
    /// Manifest to show; default `results.input.manifest`.
    pub manifest: Option<serde_json::Value>,
    /// Overrides the synthetic-model detection from the manifest.
    pub synthetic: Option<SyntheticKind>,
    /// Routing-health section.
    pub health: Option<HealthSection>,
    /// Causal expert ablation (`ablation.json`, `run --ablate`): the "Expert ablation" section.
    pub ablation: Option<moe_xray_stats::ablation::AblationResults>,
}

impl ReportInput {
    /// The results with `prompt_categories` filled from the prompt table when missing.
    pub fn results_with_categories(&self) -> Results {
        let mut r = self.results.clone();
        let map: BTreeMap<String, String> = self
            .prompts
            .iter()
            .map(|p| (p.id.clone(), p.category.clone()))
            .collect();
        r.fill_prompt_categories(&map);
        r
    }

    /// The manifest shown in the report.
    pub fn manifest(&self) -> &serde_json::Value {
        self.manifest
            .as_ref()
            .unwrap_or(&self.results.input.manifest)
    }

    /// Synthetic-model kind: the override, else detected from the manifest.
    pub fn synthetic_kind(&self) -> Option<SyntheticKind> {
        self.synthetic
            .or_else(|| results::synthetic_kind_of(self.manifest()))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename (the trace
/// crate's shared implementation).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    moe_xray_trace::write_atomic(path, bytes).map_err(|e| match e {
        moe_xray_trace::TraceError::Io { path, source } => ReportError::Io { path, source },
        other => ReportError::Invalid(other.to_string()),
    })
}

/// Writes `dir/figures/<id>.svg` for every figure (health figures included) and
/// `dir/report.html`; returns the path of `report.html`.
pub fn write_report(dir: impl AsRef<Path>, input: &ReportInput) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let fig_dir = dir.join("figures");
    std::fs::create_dir_all(&fig_dir).map_err(|e| ReportError::Io {
        path: fig_dir.clone(),
        source: e,
    })?;
    let results = input.results_with_categories();
    let mut figs = render_figures(&results, input.usage.as_ref());
    if let Some(h) = &input.health {
        figs.extend(h.figures.iter().cloned());
    }
    for f in &figs {
        let safe: String =
            f.id.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
        write_atomic(&fig_dir.join(format!("{safe}.svg")), f.svg.as_bytes())?;
    }
    let html = render_report(input);
    let path = dir.join("report.html");
    write_atomic(&path, html.as_bytes())?;
    Ok(path)
}
