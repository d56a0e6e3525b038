//! `moe-xray run`: the whole study in one command — trace → analyze → health → figures → report.
//!
//! Output folder layout (every file written through a temp file + rename):
//! - `prompts.jsonl`        the prompt set actually used (a copy; `paper80` is bundled)
//! - `traces/`              `trace.jsonl.gz`, `generations.jsonl`, `manifest.json` (from `trace`)
//! - `results.json`, `signatures.csv`, `prompt_similarity.csv` (from `analyze`)
//! - `health.json`, `health/` (load and co-activation figures, from `health`)
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
    /// Compute threads (default: all cores).
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
    let text = if spec == "paper80" {
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
    };
    if std::fs::read_to_string(&dest).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&dest, text.as_bytes())?;
    }
    // Validate the bundled set the same way as a user's file.
    read_prompts(&dest)?;
    Ok(dest)
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
    analyze::write_outputs(out, &outputs)?;

    // 3. health (load balance, dead/cold experts, router entropy, co-activation, MI).
    if !args.quiet {
        eprintln!("[3/4] routing health");
    }
    let health = health_step(&trace_file, out, args.seed)?;

    // 4. report.
    if !args.quiet {
        eprintln!("[4/4] figures and report");
    }
    let results_path = out.join("results.json");
    let results = moe_xray_report::results::Results::read(&results_path)?;
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
    let report = moe_xray_report::write_report(out, &input)?;
    let results = match outputs {
        Outputs::Exact(e) => e.results,
        Outputs::Gram(r) => *r,
    };
    Ok(RunSummary { report, results })
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
fn health_step(trace_file: &Path, out: &Path, seed: u64) -> Result<HealthSection> {
    use moe_xray_health::{accumulate_run, mi, output, resolve_traces, svg, HealthOptions};
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
    let mut summary = report.summary();
    if let Some(m) = &mi {
        full["mutual_information"] = serde_json::to_value(m)?;
        summary["mutual_information"] = serde_json::to_value(m)?;
    }
    write_atomic(
        out.join("health.json"),
        serde_json::to_string_pretty(&full)? + "\n",
    )?;
    let dir = out.join("health");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", p(&dir)))?;
    write_atomic(dir.join("layers.csv"), output::layers_csv(&report))?;
    write_atomic(dir.join("load.csv"), output::load_csv(&report))?;
    if let Some(c) = output::coactivation_csv(&acc) {
        write_atomic(dir.join("coactivation.csv"), c)?;
    }
    if let Some(c) = output::pairs_csv(&report) {
        write_atomic(dir.join("pairs.csv"), c)?;
    }
    // The co-activation figure shows the deepest layer, where the paper finds the most task signal.
    let layer = report.num_layers.saturating_sub(1);
    let figures = svg::report_figures(&acc, &report, layer)
        .into_iter()
        .map(|f| moe_xray_report::Figure {
            id: f.id,
            title: f.title,
            caption: f.caption,
            svg: f.svg,
            available: f.available,
        })
        .collect();
    let mut notes = vec![
        "Definitions of every health statistic (normalised entropy, max/mean, Gini, Jain, dead and cold \
         experts, router entropy and top-k margin, co-activation lift, mutual information): docs/health.md."
            .to_string(),
    ];
    if let Some(m) = &mi {
        notes.push(output::mi_text(m).trim().to_string());
    }
    Ok(HealthSection {
        summary: Some(summary),
        figures,
        notes,
    })
}

pub fn run(args: Args) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let s = execute(&args, &command)?;
    println!("{}", analyze::summary(&s.results, &args.out));
    println!("report: {}", s.report.display());
    Ok(())
}
