//! `moe-xray trace`: run an OLMoE checkpoint on a prompt file and record the experts its router
//! picks for every prompt and generated token at every layer.
//!
//! Output directory: `trace.jsonl[.gz|.zst]` (`--mode events`) or `counts.jsonl[.gz|.zst]`
//! (`--mode counts`), `generations.jsonl` and `manifest.json`. Every input is validated (model,
//! tokenizer, prompts, token ids) before anything is written. Each prompt is made durable when it
//! finishes: its generation line is appended (fsync) first, then its trace block; `--resume`
//! skips the prompts whose trace block is complete and never appends a generation line twice.
//!
//! By default the last generated token is also run through the model (one extra forward step,
//! logits discarded) so that it has routing records; `--hf-generate-compat` skips it exactly like
//! transformers' `generate()` does.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_xray_model::chat::{ChatTemplate, Sandbox};
use moe_xray_model::config::{eos_token_ids, GenerationDefaults, OlmoeConfig};
use moe_xray_model::generate::{
    check_options, fit_context, generate_all, GenerateOptions, PromptInput, Sampling, Truncate,
};
use moe_xray_model::olmoe::{dtype_name, parse_dtype, LoadOptions, Olmoe};
use moe_xray_model::tokenizer::Tokenizer;
use moe_xray_trace::{
    prompt_set_hash, read_prompts, CountsWriter, EventsWriter, JsonlAppender, Manifest,
    RoutingDecision, RoutingSink,
};
use serde::{Deserialize, Serialize};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One routing record per (token, layer).
    Events,
    /// Per-prompt L×E expert counts only (very large runs).
    Counts,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    Gz,
    Zst,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt file (JSONL `{"id","category","text"}` or CSV `id,category,text`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "events")]
    pub mode: Mode,
    /// Compress the trace file.
    #[arg(long, value_enum)]
    pub compress: Option<Compress>,
    /// Also record the full router distribution of every (token, layer).
    #[arg(long)]
    pub record_probs: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Prompts run together (ragged batching: results do not depend on it). Larger batches
    /// read each expert's weights once for more tokens (on the full OLMoE shape a decode step is
    /// bound by reading the experts from memory); a prompt's trace is written when its batch
    /// finishes, so `--resume` after a crash redoes at most one batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Compute threads, 1 to 1024 (default: all cores). Results do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Keep generating after EOS until --max-new-tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Do not route the last generated token (exactly the tokens transformers' generate() routes).
    #[arg(long)]
    pub hf_generate_compat: bool,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold (with --temperature).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampling streams (one per prompt, by its position in the prompt file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue an interrupted run in the same output directory.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Compute dtype (default: the checkpoint's stored dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Cut prompts that do not fit the context (prompt + --max-new-tokens >
    /// max_position_embeddings) on this side instead of refusing them; recorded in the manifest
    /// and in each cut prompt's generation line.
    #[arg(long, value_enum)]
    pub truncate_prompts: Option<TruncateSide>,
}

/// One line of `generations.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationLine {
    pub prompt_id: String,
    pub category: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    /// The prompt's token count before `--truncate-prompts` cut it (absent when not cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_truncated_from: Option<usize>,
}

/// `--truncate-prompts`: which end of a prompt longer than the context to cut.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TruncateSide {
    /// Drop the first tokens (keep the end).
    Left,
    /// Drop the last tokens (keep the beginning).
    Right,
}

impl From<TruncateSide> for Truncate {
    fn from(t: TruncateSide) -> Self {
        match t {
            TruncateSide::Left => Truncate::Left,
            TruncateSide::Right => Truncate::Right,
        }
    }
}

/// Forwards decisions to the trace writer but leaves `end_prompt` to the caller, who first makes
/// the generation line durable. The prompts in `.1` are already complete in the trace (they are
/// only redone for their lost generation lines): their decisions are dropped, never written twice.
struct Deferred(Rc<RefCell<Box<dyn RoutingSink>>>, HashSet<String>);

impl RoutingSink for Deferred {
    fn begin_prompt(&mut self, id: &str, category: Option<&str>) -> moe_xray_trace::Result<()> {
        if self.1.contains(id) {
            return Ok(());
        }
        self.0.borrow_mut().begin_prompt(id, category)
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        if self.1.contains(d.prompt_id) {
            return Ok(());
        }
        self.0.borrow_mut().record(d)
    }
    fn end_prompt(&mut self, _id: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn wants_probs(&self) -> bool {
        self.0.borrow().wants_probs()
    }
}

fn trace_file_name(mode: Mode, compress: Option<Compress>) -> String {
    let base = match mode {
        Mode::Events => "trace.jsonl",
        Mode::Counts => "counts.jsonl",
    };
    match compress {
        None => base.to_string(),
        Some(Compress::Gz) => format!("{base}.gz"),
        Some(Compress::Zst) => format!("{base}.zst"),
    }
}

pub fn run(args: Args) -> Result<()> {
    set_threads(args.threads)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.top_p.is_some() && args.temperature.is_none() {
        bail!("--top-p needs --temperature");
    }
    // ---- validate every input before writing anything ----
    let prompts = read_prompts(&args.prompts)?;
    let cfg = OlmoeConfig::from_dir(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let gen_defaults = GenerationDefaults::from_dir(&args.model)?;
    let template = if args.chat_template {
        Some(ChatTemplate::from_dir(&args.model)?)
    } else {
        None
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: eos_token_ids(&cfg, gen_defaults.as_ref()),
        ignore_eos: args.ignore_eos,
        sampling: args.temperature.map(|t| Sampling {
            temperature: t,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed,
        }),
        hf_generate_compat: args.hf_generate_compat,
        ..Default::default()
    };
    check_options(&opts)?;
    let mut inputs = encode_prompts(
        &prompts,
        &args.prompts.display().to_string(),
        &tokenizer,
        template.as_ref(),
        cfg.vocab_size,
    )?;
    let truncated = fit_prompts(
        &mut inputs,
        &cfg,
        opts.max_new_tokens,
        args.truncate_prompts,
    )
    .with_context(|| format!("{}", args.prompts.display()))?;
    let (model, load_secs) = load_model(&args.model, args.dtype.as_deref())?;

    // ---- outputs ----
    let out = &args.out;
    let trace_path = out.join(trace_file_name(args.mode, args.compress));
    let gen_path = out.join("generations.jsonl");
    let manifest_path = out.join("manifest.json");
    let manifest = Manifest {
        model: args.model.display().to_string(),
        num_layers: cfg.num_hidden_layers,
        num_experts: cfg.num_experts,
        top_k: cfg.num_experts_per_tok,
        dtype: dtype_name(model.dtype()).to_string(),
        generation: serde_json::json!({
            "max_new_tokens": opts.max_new_tokens,
            "decoding": if opts.sampling.is_some() { "sample" } else { "greedy" },
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "eos_token_ids": opts.eos_token_ids,
            "ignore_eos": opts.ignore_eos,
            "chat_template": args.chat_template,
            "hf_generate_compat": opts.hf_generate_compat,
            "last_generated_token_routed": !opts.hf_generate_compat,
        })
        .as_object()
        .cloned()
        .map(|mut g| {
            // Only present when set, so that manifests of runs without it are unchanged.
            if let Some(t) = args.truncate_prompts {
                g.insert("truncate_prompts".into(), Truncate::from(t).name().into());
            }
            serde_json::Value::Object(g)
        })
        .unwrap_or_default(),
        prompt_set_hash: Some(prompt_set_hash(&prompts)),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        capture_mode: match args.mode {
            Mode::Events => "events".into(),
            Mode::Counts => "counts".into(),
        },
        extra: [
            (
                "record_probs".to_string(),
                serde_json::json!(args.record_probs),
            ),
            (
                "trace_file".to_string(),
                serde_json::json!(trace_file_name(args.mode, args.compress)),
            ),
        ]
        .into_iter()
        .collect(),
    };
    // One writer per output directory: a second trace (or run) into it is refused at once.
    let _lock = crate::outdir::OutLock::acquire(out)?;
    let (sink, trace_done, gen_done): (Box<dyn RoutingSink>, Vec<String>, Vec<GenerationLine>);
    let mut gens: JsonlAppender<GenerationLine>;
    if args.resume {
        if manifest_path.exists() {
            let old = Manifest::read(&manifest_path)?;
            if old != manifest {
                bail!(
                    "{}: the existing run used different settings (model, prompts, generation or mode); refusing to resume into it",
                    manifest_path.display()
                );
            }
        }
        let (s, done): (Box<dyn RoutingSink>, Vec<String>) = match args.mode {
            Mode::Events => {
                let (w, d) = EventsWriter::open_resume(&trace_path)?;
                (Box::new(w.with_probs(args.record_probs)), d)
            }
            Mode::Counts => {
                let (w, d) =
                    CountsWriter::open_resume(&trace_path, cfg.num_hidden_layers, cfg.num_experts)?;
                (Box::new(w), d)
            }
        };
        let (g, items) = JsonlAppender::open_resume(&gen_path)?;
        sink = s;
        trace_done = done;
        gen_done = items;
        gens = g;
    } else {
        for p in [&trace_path, &gen_path, &manifest_path] {
            if p.exists() {
                bail!(
                    "{} already exists; use --resume to continue that run or choose another --out",
                    p.display()
                );
            }
        }
        sink = match args.mode {
            Mode::Events => {
                Box::new(EventsWriter::create(&trace_path)?.with_probs(args.record_probs))
            }
            Mode::Counts => Box::new(CountsWriter::create(
                &trace_path,
                cfg.num_hidden_layers,
                cfg.num_experts,
            )?),
        };
        gens = JsonlAppender::create(&gen_path)?;
        trace_done = Vec::new();
        gen_done = Vec::new();
    }
    manifest.write(&manifest_path)?;

    let done: HashSet<String> = trace_done.into_iter().collect();
    let mut have_gen: HashSet<String> = HashSet::new();
    for g in gen_done {
        if !have_gen.insert(g.prompt_id.clone()) {
            bail!(
                "{}: prompt `{}` has two generation lines; the run is damaged, start it again in a new --out",
                gen_path.display(),
                g.prompt_id
            );
        }
    }
    // Prompts complete in the trace whose generation line is missing (generations.jsonl lost its
    // last lines): they are run again for their generation lines, while their routing records,
    // already in the trace, are not written again. Generation is deterministic, so the result is
    // the uninterrupted run's.
    let regen: HashSet<String> = done
        .iter()
        .filter(|id| !have_gen.contains(*id))
        .cloned()
        .collect();
    if !regen.is_empty() && !args.quiet {
        eprintln!(
            "{}: {} prompt(s) complete in the trace have no generation line; redoing them",
            gen_path.display(),
            regen.len()
        );
    }
    let todo: Vec<PromptInput> = inputs
        .iter()
        .filter(|p| !done.contains(&p.id) || regen.contains(&p.id))
        .cloned()
        .collect();

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b =
            ProgressBar::with_draw_target(Some(todo.len() as u64), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} prompts  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let shared: Rc<RefCell<Box<dyn RoutingSink>>> = Rc::new(RefCell::new(sink));
    let mut deferred = Deferred(shared.clone(), regen.clone());
    let start = Instant::now();
    let (mut prompt_tokens, mut gen_tokens) = (0usize, 0usize);
    let categories: std::collections::HashMap<&str, &str> = prompts
        .iter()
        .map(|p| (p.id.as_str(), p.category.as_str()))
        .collect();
    generate_all(
        &model,
        &todo,
        args.batch_size,
        &opts,
        &mut deferred,
        &mut |g| {
            if !have_gen.contains(&g.prompt_id) {
                let text = tokenizer.decode(&g.generated, false)?;
                gens.append(&GenerationLine {
                    prompt_id: g.prompt_id.clone(),
                    category: categories
                        .get(g.prompt_id.as_str())
                        .unwrap_or(&"")
                        .to_string(),
                    prompt_ids: g.prompt_tokens.clone(),
                    generated_ids: g.generated.clone(),
                    text,
                    stopped_on_eos: g.stopped_on_eos,
                    prompt_tokens_truncated_from: truncated.get(g.prompt_id.as_str()).copied(),
                })?;
                have_gen.insert(g.prompt_id.clone());
            }
            if !regen.contains(&g.prompt_id) {
                shared.borrow_mut().end_prompt(&g.prompt_id)?;
            }
            prompt_tokens += g.prompt_tokens.len();
            gen_tokens += g.generated.len();
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.1} tok/s",
                (prompt_tokens + gen_tokens) as f64 / secs
            ));
            bar.inc(1);
            Ok(())
        },
    )
    .context("running the model")?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "prompts": prompts.len(),
        "prompts_run": todo.len(),
        "prompts_resumed": done.len() - regen.len(),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": gen_tokens,
        "load_seconds": load_secs,
        "run_seconds": secs,
        "tokens_per_second": (prompt_tokens + gen_tokens) as f64 / secs.max(1e-9),
        "trace": trace_path,
        "generations": gen_path,
        "manifest": manifest_path,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !args.quiet {
        eprintln!(
            "traced {} prompts ({} resumed) in {:.1} s: {} prompt + {} generated tokens -> {}",
            todo.len(),
            done.len() - regen.len(),
            secs,
            prompt_tokens,
            gen_tokens,
            display(&trace_path)
        );
    }
    Ok(())
}

/// Applies `--threads`: the size of rayon's global pool, which the model's kernels (and candle,
/// through `RAYON_NUM_THREADS`) use. Must run before any tensor work.
pub(crate) fn set_threads(threads: Option<usize>) -> Result<()> {
    crate::outdir::check_threads(threads)?;
    if let Some(t) = threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    Ok(())
}

/// Tokenises the prompts (through the chat template when given, which writes the special tokens
/// itself), rejecting prompts that encode to nothing and token ids outside the model's vocabulary.
/// `source` names the prompt file in errors.
pub(crate) fn encode_prompts(
    prompts: &[moe_xray_trace::Prompt],
    source: &str,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    vocab_size: usize,
) -> Result<Vec<PromptInput>> {
    // All prompts are rendered at once in a memory- and time-limited child process: a hostile
    // template that builds a huge string fails with an error instead of aborting this process.
    let rendered = match template {
        Some(t) => {
            let texts: Vec<&str> = prompts.iter().map(|p| p.text.as_str()).collect();
            Some(t.render_users_sandboxed(&texts, &Sandbox::current_exe()?)?)
        }
        None => None,
    };
    let mut inputs = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let tokens = match &rendered {
            Some(r) => {
                let text = r
                    .get(i)
                    .with_context(|| format!("{source}: prompt `{}` was not rendered", p.id))?;
                tokenizer.encode(text, false)?
            }
            None => tokenizer.encode(&p.text, true)?,
        };
        if tokens.is_empty() {
            bail!("{source}: prompt `{}` encodes to no tokens", p.id);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            bail!(
                "prompt `{}`: token id {t} out of range (model vocab_size {vocab_size}); does {} belong to this model?",
                p.id,
                tokenizer.path().display()
            );
        }
        inputs.push(PromptInput {
            id: p.id.clone(),
            category: Some(p.category.clone()),
            tokens,
            index: i as u64,
        });
    }
    Ok(inputs)
}

/// The prompt checks of `trace` (tokenizer, chat template, token ids, context length) without
/// loading the weights: `run` calls it before it writes anything.
pub(crate) fn check_prompts(
    model: &Path,
    prompts: &[moe_xray_trace::Prompt],
    source: &str,
    chat_template: bool,
    max_new_tokens: usize,
    truncate: Option<TruncateSide>,
) -> Result<()> {
    let cfg = OlmoeConfig::from_dir(model)?;
    let tokenizer = Tokenizer::from_dir(model)?;
    let template = if chat_template {
        Some(ChatTemplate::from_dir(model)?)
    } else {
        None
    };
    let mut inputs = encode_prompts(
        prompts,
        source,
        &tokenizer,
        template.as_ref(),
        cfg.vocab_size,
    )?;
    fit_prompts(&mut inputs, &cfg, max_new_tokens, truncate).with_context(|| source.to_string())?;
    Ok(())
}

/// Makes every prompt fit the model's context (prompt + `max_new_tokens` ≤
/// `max_position_embeddings`), cutting it on the `truncate` side or refusing it with its id and
/// token count. Returns the original token count of every cut prompt, by prompt id.
pub(crate) fn fit_prompts(
    inputs: &mut [PromptInput],
    cfg: &OlmoeConfig,
    max_new_tokens: usize,
    truncate: Option<TruncateSide>,
) -> Result<std::collections::HashMap<String, usize>> {
    let mut cut = std::collections::HashMap::new();
    for p in inputs.iter_mut() {
        if let Some(n) = fit_context(
            &p.id,
            &mut p.tokens,
            max_new_tokens,
            cfg.max_position_embeddings,
            truncate.map(Truncate::from),
        )? {
            cut.insert(p.id.clone(), n);
        }
    }
    Ok(cut)
}

/// Loads the checkpoint with the `--dtype` option; returns the model and the load time in seconds.
pub(crate) fn load_model(dir: &Path, dtype: Option<&str>) -> Result<(Olmoe, f64)> {
    let dtype = dtype.map(parse_dtype).transpose()?;
    let t = Instant::now();
    let model = Olmoe::load(
        dir,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", dir.display()))?;
    Ok((model, t.elapsed().as_secs_f64()))
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
