//! The whole study — trace → analysis → routing health → figures → report — with typed values
//! passed from step to step (what `moe-xray run` and `moe-xray demo` do).
//!
//! Output folder layout (every file written through a temp file + rename):
//! - `prompts.jsonl`        the prompt set actually used (a copy; `paper80` is bundled)
//! - `traces/`              `trace.jsonl.gz`, `generations.jsonl`, `manifest.json` (the trace step)
//! - `results.json`, `signatures.csv`, `prompt_similarity.csv` (the analysis)
//! - `health.json`, `health/*.csv` (routing health; its figures go to `figures/`)
//! - `figures/*.svg`, `report.html`
//!
//! Resumable: a re-run with the same inputs reuses the finished traces (the trace step resumes
//! and skips every prompt already complete); an interrupted trace continues where it stopped. A
//! re-run with other settings into the same folder is refused rather than mixing two runs.

use std::path::{Path, PathBuf};

use moe_xray_model::config::ModelConfig;
use moe_xray_model::generate::Truncate;
use moe_xray_report::{CategoryUsage, PromptRow, ReportInput};
use moe_xray_stats::analyze::Outputs;
use moe_xray_stats::results::{AnalysisResults, RandomRouterControl};
use moe_xray_trace::{read_prompts, write_atomic, Prompt};

use crate::ablate::{stage_ablation, AblateOptions};
use crate::analyze::{analyze, stage_outputs, AnalyzeOptions};
use crate::error::{invalid, IoContext, Result, ResultExt};
use crate::health::stage_health;
use crate::outdir::{check_threads, Batch, OutLock};
use crate::report::{commit_with_report, read_generations, synthetic_kind};
use crate::trace::{prepare_trace_with, Compress, TraceOptions, TraceSummary};
use crate::Progress;

/// The bundled paper80 prompt set (`prompts/paper80.jsonl`, documented in `prompts/README.md`).
pub const PAPER80: &str = include_str!("../../../prompts/paper80.jsonl");

/// Options of a study (the `moe-xray run` flags; defaults as there).
#[derive(Debug, Clone)]
pub struct StudyOptions {
    /// Checkpoint directory in Hugging Face layout.
    pub model: PathBuf,
    /// Prompt set: `paper80` (bundled) or a JSONL / CSV file with id, category, text.
    pub prompts: String,
    /// New tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    pub chat_template: bool,
    /// Output folder.
    pub out: PathBuf,
    /// Prompts run together (results do not depend on it).
    pub batch_size: usize,
    /// Compute threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Repetitions of each null baseline, label permutation and bootstrap.
    pub reps: usize,
    /// Seed of every random stream of the analysis.
    pub seed: u64,
    /// Compute dtype (`None`: the checkpoint's).
    pub dtype: Option<String>,
    /// Cut prompts longer than the model's context on this side instead of refusing them.
    pub truncate_prompts: Option<Truncate>,
    /// `--control random-router --control-seed S`: first run the same study with every router
    /// weight permuted (seed S, `moe_xray_model::control`) into `out/control/`, then the real
    /// study, whose `results.json` gets `random_router_control` and whose report compares both.
    pub random_router_control: Option<u64>,
    /// `--windows W`: routing over time, the statistics per window of W generated tokens.
    pub windows: Option<usize>,
    /// `--ablate`: after the analysis, the causal expert ablation on the same model and prompts
    /// (`crate::ablate`), written with the study's outputs (`ablation.json`,
    /// `figures/ablation_*.svg`) and shown in the report.
    pub ablate: Option<StudyAblation>,
}

/// The ablation settings of `run --ablate` (the rest as the study: continuation length, batch
/// size, threads, dtype, chat template, `reps` bootstrap and permutation repetitions, seed).
#[derive(Debug, Clone, PartialEq)]
pub struct StudyAblation {
    /// Experts masked per MoE layer for each category, one dose per value.
    pub doses: Vec<usize>,
    /// Load-matched random control sets per category and dose.
    pub control_draws: usize,
}

impl Default for StudyAblation {
    /// `ablate`'s defaults: one dose of 2 experts per layer, 4 control draws.
    fn default() -> Self {
        let d = AblateOptions::new(PathBuf::new(), PathBuf::new(), PathBuf::new());
        StudyAblation {
            doses: d.doses,
            control_draws: d.control_draws,
        }
    }
}

impl StudyOptions {
    /// The ablation's options for this study (prompts: the set the study wrote to
    /// `out/prompts.jsonl`).
    fn ablate_options(&self, a: &StudyAblation) -> AblateOptions {
        AblateOptions {
            doses: a.doses.clone(),
            control_draws: a.control_draws,
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            chat_template: self.chat_template,
            dtype: self.dtype.clone(),
            threads: self.threads,
            boot_reps: self.reps,
            perm_reps: self.reps,
            seed: self.seed,
            truncate_prompts: self.truncate_prompts,
            ..AblateOptions::new(
                self.model.clone(),
                self.out.join("prompts.jsonl"),
                self.out.clone(),
            )
        }
    }
}

/// Folder of the random-router control inside a study's output folder.
pub const CONTROL_DIR: &str = "control";

impl StudyOptions {
    /// The defaults of `moe-xray run` for this checkpoint and output folder.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        StudyOptions {
            model: model.into(),
            prompts: "paper80".into(),
            max_new_tokens: 32,
            chat_template: false,
            out: out.into(),
            batch_size: 64,
            threads: None,
            reps: 1000,
            seed: 0,
            dtype: None,
            truncate_prompts: None,
            random_router_control: None,
            windows: None,
            ablate: None,
        }
    }
}

/// Summary of a finished study.
#[derive(Debug, Clone)]
pub struct StudySummary {
    /// `report.html`.
    pub report: PathBuf,
    /// The analysis (as in `results.json`).
    pub results: AnalysisResults,
    /// The trace step.
    pub trace: TraceSummary,
}

/// The prompt set `spec` names (`paper80` or a prompt file), validated and normalised to JSONL
/// (nothing is written).
pub fn prompt_set_text(spec: &str) -> Result<String> {
    Ok(if spec == "paper80" {
        PAPER80.to_string()
    } else {
        let src = PathBuf::from(spec);
        if !src.exists() {
            invalid!("--prompts {spec}: no such file (and not a bundled set; bundled: paper80)");
        }
        // Validate (JSONL or CSV) and normalise to JSONL.
        let prompts = read_prompts(&src)?;
        let mut s = String::new();
        for pr in &prompts {
            s.push_str(&serde_json::to_string(&serde_json::json!({
                "id": pr.id, "category": pr.category, "text": pr.text
            }))?);
            s.push('\n');
        }
        s
    })
}

/// The prompts `spec` names and how errors name their source.
fn prompt_set(spec: &str) -> Result<(Vec<Prompt>, String)> {
    if spec == "paper80" {
        let set = PAPER80
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<std::result::Result<Vec<Prompt>, _>>()
            .step_context(|| "bundled paper80 prompts")?;
        Ok((set, "paper80".to_string()))
    } else if Path::new(spec).exists() {
        Ok((read_prompts(spec)?, spec.to_string()))
    } else {
        invalid!("--prompts {spec}: no such file (and not a bundled set; bundled: paper80)");
    }
}

/// Resolves the prompt set and writes the set used to `out/prompts.jsonl`.
fn prepare_prompts(spec: &str, out: &Path) -> Result<PathBuf> {
    let dest = out.join("prompts.jsonl");
    let text = prompt_set_text(spec)?;
    if std::fs::read_to_string(&dest).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&dest, text.as_bytes())?;
    }
    // Validate the bundled set the same way as a user's file.
    read_prompts(&dest)?;
    Ok(dest)
}

/// Runs the whole study into `opts.out`, holding the folder's lock; `command` is the command
/// line shown in the report. A bad prompt set or a missing checkpoint is refused before the
/// output folder is touched.
pub fn run_study(
    opts: &StudyOptions,
    command: &str,
    progress: &dyn Progress,
) -> Result<StudySummary> {
    check_threads(opts.threads)?;
    prompt_set_text(&opts.prompts)?;
    ModelConfig::from_dir(&opts.model)?;
    // One writer per output folder, refused at once.
    let _lock = OutLock::acquire(&opts.out)?;
    execute_study(opts, command, progress)
}

/// [`run_study`] for a caller that already holds the lock of `opts.out` (e.g. the demo, which
/// writes its model into the same folder first).
pub fn execute_study(
    opts: &StudyOptions,
    command: &str,
    progress: &dyn Progress,
) -> Result<StudySummary> {
    crate::windows::check_window(opts.windows)?;
    if let Some(a) = &opts.ablate {
        opts.ablate_options(a).check().step_context(|| "--ablate")?;
    }
    let control = match opts.random_router_control {
        None => None,
        Some(seed) => {
            let copts = StudyOptions {
                out: opts.out.join(CONTROL_DIR),
                random_router_control: None,
                ablate: None,
                ..opts.clone()
            };
            progress.message(&format!(
                "[control] random-router control (router weights permuted, seed {seed}) -> {}",
                copts.out.display()
            ));
            let c = study_once(&copts, command, progress, Some(seed), None)?;
            progress.message(&format!(
                "[control] done: d = {:.3}; now the real study",
                c.results.similarity.cohens_d
            ));
            Some(control_section(&c.results, seed))
        }
    };
    study_once(opts, command, progress, None, control)
}

/// The `random_router_control` section from the control study's results.
pub fn control_section(
    c: &AnalysisResults,
    seed: u64,
) -> moe_xray_stats::results::Section<RandomRouterControl> {
    use moe_xray_stats::results::{Section, WindowClassifier};
    Section::Done(RandomRouterControl {
        method: moe_xray_model::control::METHOD.to_string(),
        seed,
        dir: CONTROL_DIR.to_string(),
        num_prompts: c.num_prompts,
        similarity: c.similarity,
        classifier: match &c.logreg_5fold {
            Section::Done(l) => Section::Done(WindowClassifier {
                accuracy_mean: l.accuracy_mean,
                accuracy_std: l.accuracy_std,
                chance: l.chance,
                fold_accuracies: l.fold_accuracies.clone(),
                n_folds: l.n_folds,
            }),
            Section::Skipped { skipped } => Section::skipped(skipped.clone()),
        },
    })
}

/// One study into `opts.out`; `router`: permute the routers with this seed (the control);
/// `control`: the control's section for this study's results.
fn study_once(
    opts: &StudyOptions,
    command: &str,
    progress: &dyn Progress,
    router: Option<u64>,
    control: Option<moe_xray_stats::results::Section<RandomRouterControl>>,
) -> Result<StudySummary> {
    let out = &opts.out;
    let traces = out.join("traces");
    let mut topts = TraceOptions::new(&opts.model, out.join("prompts.jsonl"), &traces);
    topts.compress = Some(Compress::Gz);
    topts.record_probs = true;
    topts.max_new_tokens = opts.max_new_tokens;
    topts.batch_size = opts.batch_size;
    topts.resume = traces.join("manifest.json").exists();
    topts.chat_template = opts.chat_template;
    topts.threads = opts.threads;
    topts.dtype = opts.dtype.clone();
    topts.truncate_prompts = opts.truncate_prompts;
    topts.router_control = router;
    // Prompts that do not fit the model (context length, tokenizer, template) are refused before
    // anything is written; the prompts are encoded (and the chat template rendered) once.
    let (set, source) = prompt_set(&opts.prompts)?;
    let prepared = prepare_trace_with(&topts, set, &source)?;
    // The weights too (a tensor missing or of the wrong shape is refused before anything is
    // written).
    let loaded = prepared.load().step_context(|| "trace step")?;
    std::fs::create_dir_all(out).io_context(|| format!("creating {}", out.display()))?;
    let prompts_path = prepare_prompts(&opts.prompts, out)?;

    // 1. trace (resumable).
    progress.message(&format!("[1/4] tracing routing -> {}", traces.display()));
    let trace = loaded.run(progress).step_context(|| "trace step")?;
    progress.message(&trace.line());
    let trace_file = trace.trace.clone();

    // 2. analysis.
    progress.message("[2/4] analysing routing signatures");
    let mut aopts = AnalyzeOptions::new(vec![trace_file.clone()]);
    aopts.prompts = Some(prompts_path.clone());
    aopts.reps = opts.reps;
    aopts.seed = opts.seed;
    // (its steps are not shown inside a study; its warnings are)
    aopts.windows = opts.windows;
    let mut outputs = analyze(&aopts, &WarningsOf(progress)).step_context(|| "analyze step")?;
    if let Some(c) = control {
        match &mut outputs {
            Outputs::Exact(e) => e.results.random_router_control = Some(c),
            Outputs::Gram(r) => r.random_router_control = Some(c),
        }
    }
    // The analysis, health and report files appear together: all are written to temporary files
    // first and renamed into place at the end, results.json and then report.html last.
    let mut batch = Batch::new();
    let results_json = stage_outputs(out, &outputs, &mut batch)?;

    // 3. health (load balance, dead/cold experts, router entropy, co-activation, MI).
    progress.message("[3/4] routing health");
    let health = stage_health(&trace_file, out, opts.seed, &mut batch)?;

    // (optional) causal expert ablation on the same model and prompts.
    let ablation = match &opts.ablate {
        Some(a) if router.is_none() => {
            progress.message(&format!(
                "[ablation] masking each category's characteristic experts (n = {:?}, {} control draws)",
                a.doses, a.control_draws
            ));
            let (r, _, secs) = crate::ablate::ablate_unstaged(&opts.ablate_options(a), progress)
                .step_context(|| "ablation step")?;
            progress.message(&format!(
                "[ablation] done in {secs:.1} s ({} teacher-forced passes)",
                r.passes
            ));
            stage_ablation(
                &r,
                &out.join("ablation.json"),
                &out.join("figures"),
                &mut batch,
            )?;
            Some(r)
        }
        _ => None,
    };

    // 4. report.
    progress.message("[4/4] figures and report");
    let results_path = out.join("results.json");
    let results = moe_xray_report::results::Results::from_json_str(&results_json, &results_path)?;
    let usage = match &outputs {
        Outputs::Exact(e) => {
            let (l, ne) = (e.results.num_layers, e.results.num_experts);
            let len = l * ne;
            Some(CategoryUsage::from_signatures(
                l,
                ne,
                e.prompt_categories
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.as_str(), &e.signatures[i * len..(i + 1) * len])),
            )?)
        }
        Outputs::Gram(_) => None,
    };
    let prompts = read_prompts(&prompts_path)?;
    let generated = read_generations(&trace.generations)?;
    let rows = prompts
        .iter()
        .map(|pr| PromptRow {
            id: pr.id.clone(),
            category: pr.category.clone(),
            text: pr.text.clone(),
            generated: generated.get(&pr.id).cloned(),
        })
        .collect();
    let manifest_path = &trace.manifest;
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_path)
            .io_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .step_context(|| format!("parsing {}", manifest_path.display()))?;
    let input = ReportInput {
        results,
        usage,
        prompts: rows,
        command: command.to_string(),
        title: router
            .map(|seed| format!("Random-router control (router weights permuted, seed {seed})")),
        manifest: Some(manifest),
        synthetic: synthetic_kind(&opts.model),
        health: Some(health),
        ablation,
    };
    let report = commit_with_report(out, &input, batch, results_json)?;
    let results = match outputs {
        Outputs::Exact(e) => e.results,
        Outputs::Gram(r) => *r,
    };
    Ok(StudySummary {
        report,
        results,
        trace,
    })
}

/// Forwards only the warnings of a step to `.0`.
struct WarningsOf<'a>(&'a dyn Progress);

impl Progress for WarningsOf<'_> {
    fn warn(&self, msg: &str) {
        self.0.warn(msg);
    }
}
