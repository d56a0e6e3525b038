//! `moe-xray run`: the whole study in one command — trace → analyze → health → figures → report.
//!
//! Output folder layout (every file written through a temp file + rename):
//! - `prompts.jsonl`        the prompt set actually used (a copy; `paper80` is bundled)
//! - `traces/`              `trace.jsonl.gz`, `generations.jsonl`, `manifest.json` (from `trace`)
//! - `results.json`, `signatures.csv`, `prompt_similarity.csv` (from `analyze`)
//! - `health.json`, `health/*.csv` (from `health`; its figures go to `figures/`)
//! - `figures/*.svg`, `report.html`
//!
//! Resumable: a re-run with the same inputs reuses the finished traces (`trace --resume` skips every
//! prompt already complete); an interrupted trace continues where it stopped. A re-run with other
//! settings into the same folder is refused rather than mixing two runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use moe_xray_report::{CategoryUsage, HealthSection, PromptRow, ReportInput, SyntheticKind};
use moe_xray_stats::analyze::Outputs;
use moe_xray_trace::{read_prompts, write_atomic};

use super::{analyze, trace};
use crate::outdir::{check_threads, Batch, OutLock, STAGING_PREFIX};

/// The bundled paper80 prompt set (`prompts/paper80.jsonl`, documented in `prompts/README.md`).
pub const PAPER80: &str = include_str!("../../../../prompts/paper80.jsonl");

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt set: `paper80` (bundled) or a JSONL / CSV file with id, category, text.
    #[arg(long, default_value = "paper80")]
    pub prompts: String,
    /// New tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts run together (results do not depend on it; see `trace --batch-size`).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute threads, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Repetitions of each null baseline, label permutation and bootstrap.
    #[arg(long, default_value_t = 1000)]
    pub reps: usize,
    /// Seed of every random stream of the analysis.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Cut prompts longer than the model's context on this side instead of refusing them (see
    /// `trace --truncate-prompts`).
    #[arg(long, value_enum)]
    pub truncate_prompts: Option<trace::TruncateSide>,
}

/// Parses a subcommand's `Args` from an argument list, so that `run` uses exactly the defaults and
/// validation a user gets on the command line.
fn parse_args<A: clap::Args>(name: &str, argv: &[String]) -> Result<A> {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        inner: A,
    }
    let mut full = vec![name.to_string()];
    full.extend(argv.iter().cloned());
    Wrap::<A>::try_parse_from(full)
        .map(|w| w.inner)
        .map_err(|e| anyhow::anyhow!("internal {name} arguments: {e}"))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Resolves `--prompts` and writes the set used to `out/prompts.jsonl`.
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

/// The prompt set `--prompts` names, validated and normalised to JSONL (nothing is written).
fn prompt_set_text(spec: &str) -> Result<String> {
    Ok(if spec == "paper80" {
        PAPER80.to_string()
    } else {
        let src = PathBuf::from(spec);
        if !src.exists() {
            bail!("--prompts {spec}: no such file (and not a bundled set; bundled: paper80)");
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

/// What kind of synthetic model `dir` holds, if any (from the `synth.json` that `synth-model`
/// writes).
fn synthetic_kind(dir: &Path) -> Option<SyntheticKind> {
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

/// Summary of a finished run.
pub struct RunSummary {
    pub report: PathBuf,
    pub results: moe_xray_stats::results::AnalysisResults,
}

/// Runs the whole pipeline; `command` is the command line shown in the report.
pub fn execute(args: &Args, command: &str) -> Result<RunSummary> {
    let out = &args.out;
    // Prompts that do not fit the model (context length, tokenizer, template) are refused before
    // anything is written.
    let (set, source) = if args.prompts == "paper80" {
        let set = PAPER80
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<std::result::Result<Vec<moe_xray_trace::Prompt>, _>>()
            .context("bundled paper80 prompts")?;
        (set, "paper80".to_string())
    } else if Path::new(&args.prompts).exists() {
        (read_prompts(&args.prompts)?, args.prompts.clone())
    } else {
        bail!(
            "--prompts {}: no such file (and not a bundled set; bundled: paper80)",
            args.prompts
        );
    };
    trace::check_prompts(
        &args.model,
        &set,
        &source,
        args.chat_template,
        args.max_new_tokens,
        args.truncate_prompts,
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", p(out)))?;
    let prompts_path = prepare_prompts(&args.prompts, out)?;
    let traces = out.join("traces");

    // 1. trace (resumable).
    let mut targv = vec![
        "--model".to_string(),
        p(&args.model),
        "--prompts".into(),
        p(&prompts_path),
        "--out".into(),
        p(&traces),
        "--compress".into(),
        "gz".into(),
        "--record-probs".into(),
        "--max-new-tokens".into(),
        args.max_new_tokens.to_string(),
        "--batch-size".into(),
        args.batch_size.to_string(),
    ];
    if traces.join("manifest.json").exists() {
        targv.push("--resume".into());
    }
    if args.chat_template {
        targv.push("--chat-template".into());
    }
    if let Some(t) = args.threads {
        targv.extend(["--threads".into(), t.to_string()]);
    }
    if let Some(d) = &args.dtype {
        targv.extend(["--dtype".into(), d.clone()]);
    }
    if args.quiet {
        targv.push("--quiet".into());
    }
    if let Some(t) = args.truncate_prompts {
        let side = match t {
            trace::TruncateSide::Left => "left",
            trace::TruncateSide::Right => "right",
        };
        targv.extend(["--truncate-prompts".into(), side.into()]);
    }
    if !args.quiet {
        eprintln!("[1/4] tracing routing -> {}", p(&traces));
    }
    trace::run(parse_args("trace", &targv)?).context("trace step")?;
    let trace_file = traces.join("trace.jsonl.gz");

    // 2. analyze.
    if !args.quiet {
        eprintln!("[2/4] analysing routing signatures");
    }
    let aargv = vec![
        p(&trace_file),
        "--prompts".into(),
        p(&prompts_path),
        "--reps".into(),
        args.reps.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--out".into(),
        p(out),
    ];
    let aargs: analyze::Args = parse_args("analyze", &aargv)?;
    let outputs = analyze::compute(&aargs).context("analyze step")?;
    // The analysis, health and report files appear together: all are written to temporary files
    // first and renamed into place at the end, results.json and then report.html last.
    let mut batch = Batch::new();
    let results_json = analyze::stage_outputs(out, &outputs, &mut batch)?;

    // 3. health (load balance, dead/cold experts, router entropy, co-activation, MI).
    if !args.quiet {
        eprintln!("[3/4] routing health");
    }
    let health = health_step(&trace_file, out, args.seed, &mut batch)?;

    // 4. report.
    if !args.quiet {
        eprintln!("[4/4] figures and report");
    }
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
    let generated = read_generations(&traces.join("generations.jsonl"))?;
    let rows = prompts
        .iter()
        .map(|pr| PromptRow {
            id: pr.id.clone(),
            category: pr.category.clone(),
            text: pr.text.clone(),
            generated: generated.get(&pr.id).cloned(),
        })
        .collect();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(traces.join("manifest.json"))
            .with_context(|| format!("reading {}", p(&traces.join("manifest.json"))))?,
    )
    .with_context(|| format!("parsing {}", p(&traces.join("manifest.json"))))?;
    let input = ReportInput {
        results,
        usage,
        prompts: rows,
        command: command.to_string(),
        title: None,
        manifest: Some(manifest),
        synthetic: synthetic_kind(&args.model),
        health: Some(health),
    };
    let report = commit_with_report(out, &input, batch, results_json)?;
    let results = match outputs {
        Outputs::Exact(e) => e.results,
        Outputs::Gram(r) => *r,
    };
    Ok(RunSummary { report, results })
}

/// Renders the report into a staging directory inside `out` and commits the whole output set:
/// the files already in `batch`, the figures, `results.json` and `report.html` last.
fn commit_with_report(
    out: &Path,
    input: &ReportInput,
    mut batch: Batch,
    results_json: String,
) -> Result<PathBuf> {
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(out)
        .with_context(|| format!("cannot create a staging directory in {}", p(out)))?;
    let staged = moe_xray_report::write_report(staging.path(), input)?;
    let figs = staging.path().join("figures");
    let mut names = std::fs::read_dir(&figs)
        .and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("cannot list {}", p(&figs)))?;
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

fn read_generations(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", p(path)))?;
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let g: trace::GenerationLine = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed generation line", p(path), i + 1))?;
        map.insert(g.prompt_id, g.text);
    }
    Ok(map)
}

/// Routing health of the run's trace: `health.json` (with the mutual information between
/// signatures and category), CSV tables under `health/`, and the report's health section.
fn health_step(
    trace_file: &Path,
    out: &Path,
    seed: u64,
    batch: &mut Batch,
) -> Result<HealthSection> {
    use moe_xray_health::{accumulate_run, mi, output, resolve_traces, HealthOptions};
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

pub fn run(args: Args) -> Result<()> {
    check_threads(args.threads)?;
    // A bad prompt set or a missing checkpoint is refused before the output folder is touched.
    prompt_set_text(&args.prompts)?;
    moe_xray_model::config::OlmoeConfig::from_dir(&args.model)?;
    // One writer per output folder, refused at once.
    let _lock = OutLock::acquire(&args.out)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let s = execute(&args, &command)?;
    println!("{}", analyze::summary(&s.results, &args.out));
    println!("report: {}", s.report.display());
    Ok(())
}
