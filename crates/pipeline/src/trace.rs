//! Tracing: run an MoE checkpoint of any supported family (`moe_xray_model::config::Family`) on a
//! prompt set and record the experts its routers pick for every prompt and generated token at
//! every MoE layer (dense decoder layers have no router and no records).
//!
//! Output directory: `trace.jsonl[.gz|.zst]` ([`Mode::Events`]) or `counts.jsonl[.gz|.zst]`
//! ([`Mode::Counts`]), `generations.jsonl` ([`GenerationLine`]) and `manifest.json`. Every input
//! is validated (model, tokenizer, prompts, token ids) before anything is written
//! ([`prepare_trace`]). Each prompt is made durable when it finishes: its generation line is
//! appended (fsync) first, then its trace block; with [`TraceOptions::resume`] the prompts whose
//! trace block is complete are skipped and no generation line is ever appended twice.
//!
//! The manifest's `routing` block ([`routing_layout`]) says which decoder layers are MoE layers,
//! the shared experts, the router kind and what `weights` / `probs` hold for the family.
//!
//! By default the last generated token is also run through the model (one extra forward step,
//! logits discarded) so that it has routing records; `hf_generate_compat` skips it exactly like
//! transformers' `generate()` does.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use moe_xray_model::chat::{ChatTemplate, Sandbox};
use moe_xray_model::config::{eos_token_ids, GenerationDefaults, ModelConfig};
use moe_xray_model::generate::{
    check_options, fit_context, generate_all, GenerateOptions, Generation, PromptInput, Sampling,
    Truncate,
};
use moe_xray_model::model::{dtype_name, parse_dtype, LoadOptions, MoeModel};
use moe_xray_model::tokenizer::Tokenizer;
use moe_xray_parquet::trace_io::{ParquetSink, RecordsWriter};
use moe_xray_trace::{
    prompt_set_hash, read_prompts, CountsWriter, EventsWriter, GenerationLine, JsonlAppender,
    Manifest, Prompt, RoutingDecision, RoutingSink,
};

use crate::error::{invalid, PipelineError, Result, ResultExt};
use crate::outdir::{check_threads, OutLock};
use crate::Progress;

/// What the trace file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// One routing record per (token, layer).
    #[default]
    Events,
    /// Per-prompt L×E expert counts only (very large runs).
    Counts,
}

/// File format of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TraceFormat {
    /// JSONL lines (`trace.jsonl[.gz|.zst]`), durable per prompt and resumable.
    #[default]
    Jsonl,
    /// One Parquet file `trace.parquet` (routing records, the manifest in its metadata; see
    /// `docs/trace-format.md`, "Parquet"), written to a staging directory and moved into place
    /// with `generations.jsonl` and `manifest.json` when the run ends. Not resumable.
    Parquet,
}

/// File name of the Parquet trace in the output directory.
pub const PARQUET_TRACE_FILE: &str = "trace.parquet";

/// Compression of the trace file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    Gz,
    Zst,
}

/// Options of a trace run (the `moe-xray trace` flags; defaults as there).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Checkpoint directory in Hugging Face layout (config.json, safetensors, tokenizer.json), or
    /// a GGUF file (`moe_xray_model::gguf`).
    pub model: PathBuf,
    /// Prompt file (JSONL `{"id","category","text"}` or CSV `id,category,text`).
    pub prompts: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    pub mode: Mode,
    pub compress: Option<Compress>,
    /// JSONL (default) or Parquet.
    pub format: TraceFormat,
    /// Also record the full router distribution of every (token, layer).
    pub record_probs: bool,
    pub max_new_tokens: usize,
    /// Prompts run together (ragged batching: results do not depend on it).
    pub batch_size: usize,
    /// Compute threads, 1 to [`crate::outdir::MAX_THREADS`] (`None`: all cores).
    pub threads: Option<usize>,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    pub chat_template: bool,
    /// Keep generating after EOS until `max_new_tokens`.
    pub ignore_eos: bool,
    /// Do not route the last generated token (exactly the tokens transformers' generate() routes).
    pub hf_generate_compat: bool,
    /// Sample with this temperature instead of greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold (with `temperature`).
    pub top_p: Option<f32>,
    /// Seed of the sampling streams (one per prompt, by its position in the prompt file).
    pub seed: u64,
    /// Continue an interrupted run in the same output directory.
    pub resume: bool,
    /// Compute dtype (`None`: the checkpoint's stored dtype).
    pub dtype: Option<String>,
    /// Cut prompts that do not fit the context on this side instead of refusing them.
    pub truncate_prompts: Option<Truncate>,
    /// Random-router control: permute every router weight with this seed after loading
    /// (`moe_xray_model::control`); recorded in the manifest as `random_router_control`.
    pub router_control: Option<u64>,
}

impl TraceOptions {
    /// The defaults of `moe-xray trace` for these model, prompts and output paths.
    pub fn new(
        model: impl Into<PathBuf>,
        prompts: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        TraceOptions {
            model: model.into(),
            prompts: prompts.into(),
            out: out.into(),
            mode: Mode::Events,
            compress: None,
            format: TraceFormat::Jsonl,
            record_probs: false,
            max_new_tokens: 32,
            batch_size: 64,
            threads: None,
            chat_template: false,
            ignore_eos: false,
            hf_generate_compat: false,
            temperature: None,
            top_p: None,
            seed: 0,
            resume: false,
            dtype: None,
            truncate_prompts: None,
            router_control: None,
        }
    }
}

/// What a finished trace run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    /// Prompts in the prompt set.
    pub prompts: usize,
    /// Prompts run now.
    pub prompts_run: usize,
    /// Prompts already complete in the trace of an earlier run (resume).
    pub prompts_resumed: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Routing records written now: one per (routed token, MoE layer); dense layers have none.
    pub records: u64,
    pub load_seconds: f64,
    pub run_seconds: f64,
    pub trace: PathBuf,
    pub generations: PathBuf,
    pub manifest: PathBuf,
}

impl TraceSummary {
    /// The summary as the JSON object `trace --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "prompts": self.prompts,
            "prompts_run": self.prompts_run,
            "prompts_resumed": self.prompts_resumed,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "routing_records": self.records,
            "load_seconds": self.load_seconds,
            "run_seconds": self.run_seconds,
            "tokens_per_second": (self.prompt_tokens + self.generated_tokens) as f64
                / self.run_seconds.max(1e-9),
            "trace": self.trace,
            "generations": self.generations,
            "manifest": self.manifest,
        })
    }

    /// The one-line human summary.
    pub fn line(&self) -> String {
        format!(
            "traced {} prompts ({} resumed) in {:.1} s: {} prompt + {} generated tokens, {} routing records -> {}",
            self.prompts_run,
            self.prompts_resumed,
            self.run_seconds,
            self.prompt_tokens,
            self.generated_tokens,
            self.records,
            self.trace.display()
        )
    }
}

/// Forwards decisions to the trace writer but leaves `end_prompt` to the caller, who first makes
/// the generation line durable. The prompts in `.1` are already complete in the trace (they are
/// only redone for their lost generation lines): their decisions are dropped, never written twice.
/// `.2` counts the decisions written.
struct Deferred(Rc<RefCell<Box<dyn RoutingSink>>>, HashSet<String>, u64);

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
        self.2 += 1;
        self.0.borrow_mut().record(d)
    }
    fn end_prompt(&mut self, _id: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn wants_probs(&self) -> bool {
        self.0.borrow().wants_probs()
    }
}

/// File name of the trace file in the output directory.
pub fn trace_file_name(mode: Mode, compress: Option<Compress>) -> String {
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

// The routing block and the `weights` texts are defined once, beside the configuration they
// describe (the importers write the same block).
pub use moe_xray_model::config::{routing_layout, WEIGHTS_APPLIED, WEIGHTS_FULL_SOFTMAX};

/// Whether the manifest `old` of an earlier run may be resumed by a run whose manifest is `new`:
/// equal, or equal but for the `routing` block that `old` lacks (written before the block
/// existed) when every decoder layer of `new` is an MoE layer (what a missing block means).
fn resumable(old: &Manifest, new: &Manifest) -> bool {
    if old == new {
        return true;
    }
    match (&old.routing, &new.routing) {
        (None, Some(r)) if r.dense_layers.is_empty() => {
            let mut stripped = new.clone();
            stripped.routing = None;
            *old == stripped
        }
        _ => false,
    }
}

/// The checks of the options alone (before any file is read); applies `threads`.
fn check_run_options(opts: &TraceOptions) -> Result<()> {
    set_threads(opts.threads)?;
    if opts.batch_size == 0 {
        invalid!("--batch-size must be at least 1");
    }
    if opts.top_p.is_some() && opts.temperature.is_none() {
        invalid!("--top-p needs --temperature");
    }
    if opts.format == TraceFormat::Parquet {
        if opts.mode != Mode::Events {
            invalid!("--format parquet writes routing records: it needs --mode events");
        }
        if opts.compress.is_some() {
            invalid!("--format parquet is compressed inside the file (snappy): drop --compress");
        }
        if opts.resume {
            invalid!(
                "--resume is not supported with --format parquet: the Parquet trace is written whole when the run ends, so an interrupted run leaves nothing to resume (run it again, or trace as JSONL with --resume and convert it with `moe-xray convert`)"
            );
        }
    }
    Ok(())
}

/// A trace run whose inputs are all validated and encoded; nothing written yet.
pub struct PreparedTrace {
    opts: TraceOptions,
    prompts: Vec<Prompt>,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    gen: GenerateOptions,
    inputs: Vec<PromptInput>,
    truncated: HashMap<String, usize>,
}

/// Runs a whole trace: [`prepare_trace`], then [`PreparedTrace::run`].
pub fn trace(opts: &TraceOptions, progress: &dyn Progress) -> Result<TraceSummary> {
    prepare_trace(opts)?.run(progress)
}

/// Validates every input of a trace run (options, prompt file, checkpoint configuration,
/// tokenizer, chat template, token ids, context length) without loading the weights or writing
/// anything. Applies `threads` (see [`set_threads`]).
pub fn prepare_trace(opts: &TraceOptions) -> Result<PreparedTrace> {
    check_run_options(opts)?;
    let prompts = read_prompts(&opts.prompts)?;
    let source = opts.prompts.display().to_string();
    prepare_trace_with(opts, prompts, &source)
}

/// [`prepare_trace`] on a prompt set already read (`opts.prompts` is where the run will say its
/// prompts came from; `source` names them in errors).
pub fn prepare_trace_with(
    opts: &TraceOptions,
    prompts: Vec<Prompt>,
    source: &str,
) -> Result<PreparedTrace> {
    check_run_options(opts)?;
    let cfg = ModelConfig::from_dir(&opts.model)?;
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let gen_defaults = GenerationDefaults::from_dir(&opts.model)?;
    let template = if opts.chat_template {
        Some(ChatTemplate::from_dir(&opts.model)?)
    } else {
        None
    };
    let gen = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        eos_token_ids: eos_token_ids(&cfg, gen_defaults.as_ref()),
        ignore_eos: opts.ignore_eos,
        sampling: opts.temperature.map(|t| Sampling {
            temperature: t,
            top_p: opts.top_p.unwrap_or(1.0),
            seed: opts.seed,
        }),
        hf_generate_compat: opts.hf_generate_compat,
        ..Default::default()
    };
    check_options(&gen)?;
    let mut inputs = encode_prompts(
        &prompts,
        source,
        &tokenizer,
        template.as_ref(),
        cfg.vocab_size,
    )?;
    let truncated = fit_prompts(&mut inputs, &cfg, gen.max_new_tokens, opts.truncate_prompts)
        .step_context(|| source.to_string())?;
    Ok(PreparedTrace {
        opts: opts.clone(),
        prompts,
        cfg,
        tokenizer,
        gen,
        inputs,
        truncated,
    })
}

impl PreparedTrace {
    /// The manifest this run writes (and that a resumed run must match).
    fn manifest(&self, dtype: &str) -> Manifest {
        let (args, opts) = (&self.opts, &self.gen);
        Manifest {
            model: args.model.display().to_string(),
            num_layers: self.cfg.num_hidden_layers,
            num_experts: self.cfg.num_experts,
            top_k: self.cfg.num_experts_per_tok,
            dtype: dtype.to_string(),
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
                    g.insert("truncate_prompts".into(), t.name().into());
                }
                serde_json::Value::Object(g)
            })
            .unwrap_or_default(),
            prompt_set_hash: Some(prompt_set_hash(&self.prompts)),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            capture_mode: match args.mode {
                Mode::Events => "events".into(),
                Mode::Counts => "counts".into(),
            },
            routing: Some(routing_layout(&self.cfg)),
            extra: [
                (
                    "record_probs".to_string(),
                    serde_json::json!(args.record_probs),
                ),
                (
                    "trace_file".to_string(),
                    serde_json::json!(match args.format {
                        TraceFormat::Jsonl => trace_file_name(args.mode, args.compress),
                        TraceFormat::Parquet => PARQUET_TRACE_FILE.to_string(),
                    }),
                ),
            ]
            .into_iter()
            // Only present in the exact mode (`--exact`), so that other manifests are unchanged:
            // `dtype` then says "f32" and this says that quantised weights were dequantised.
            .chain(
                (args.dtype.as_deref() == Some(EXACT))
                    .then(|| ("exact".to_string(), serde_json::json!(true))),
            )
            // Only present for the random-router control (`router_control`).
            .chain(args.router_control.map(|seed| {
                (
                    "random_router_control".to_string(),
                    serde_json::json!({
                        "method": moe_xray_model::control::METHOD,
                        "seed": seed,
                    }),
                )
            }))
            .collect(),
        }
    }

    /// Loads the weights (checked against the family's tensor table: a missing tensor or a shape
    /// that disagrees is an error naming it) without writing anything.
    pub fn load(self) -> Result<LoadedTrace> {
        let (mut model, load_secs) = load_model(&self.opts.model, self.opts.dtype.as_deref())?;
        if let Some(seed) = self.opts.router_control {
            model
                .permute_routers(seed)
                .map_err(PipelineError::from)
                .step_context(|| "random-router control")?;
        }
        Ok(LoadedTrace {
            prepared: self,
            model,
            load_secs,
        })
    }

    /// [`PreparedTrace::load`], then [`LoadedTrace::run`].
    pub fn run(self, progress: &dyn Progress) -> Result<TraceSummary> {
        self.load()?.run(progress)
    }
}

/// A trace run whose inputs are validated and whose model is loaded; nothing written yet.
pub struct LoadedTrace {
    prepared: PreparedTrace,
    model: MoeModel,
    load_secs: f64,
}

impl LoadedTrace {
    /// Takes the output directory's lock, writes (or checks, on resume) the manifest and traces
    /// every prompt not yet complete.
    pub fn run(self, progress: &dyn Progress) -> Result<TraceSummary> {
        let LoadedTrace {
            prepared: this,
            model,
            load_secs,
        } = self;
        let args = &this.opts;
        if args.format == TraceFormat::Parquet {
            return run_parquet(this, model, load_secs, progress);
        }
        let cfg = &this.cfg;
        let out = &args.out;
        let trace_path = out.join(trace_file_name(args.mode, args.compress));
        let gen_path = out.join("generations.jsonl");
        let manifest_path = out.join("manifest.json");
        let manifest = this.manifest(dtype_name(model.dtype()));
        // One writer per output directory: a second trace (or run) into it is refused at once.
        let _lock = OutLock::acquire(out)?;
        let (sink, trace_done, gen_done): (Box<dyn RoutingSink>, Vec<String>, Vec<GenerationLine>);
        let mut gens: JsonlAppender<GenerationLine>;
        if args.resume {
            if manifest_path.exists() {
                let old = Manifest::read(&manifest_path)?;
                if !resumable(&old, &manifest) {
                    invalid!(
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
                    let (w, d) = CountsWriter::open_resume(
                        &trace_path,
                        cfg.num_hidden_layers,
                        cfg.num_experts,
                    )?;
                    (
                        Box::new(w.with_dense_layers(&cfg.dense_layer_indices())?),
                        d,
                    )
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
                    invalid!(
                        "{} already exists; use --resume to continue that run or choose another --out",
                        p.display()
                    );
                }
            }
            sink = match args.mode {
                Mode::Events => {
                    Box::new(EventsWriter::create(&trace_path)?.with_probs(args.record_probs))
                }
                Mode::Counts => Box::new(
                    CountsWriter::create(&trace_path, cfg.num_hidden_layers, cfg.num_experts)?
                        .with_dense_layers(&cfg.dense_layer_indices())?,
                ),
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
                invalid!(
                    "{}: prompt `{}` has two generation lines; the run is damaged, start it again in a new --out",
                    gen_path.display(),
                    g.prompt_id
                );
            }
        }
        // Prompts complete in the trace whose generation line is missing (generations.jsonl lost
        // its last lines): they are run again for their generation lines, while their routing
        // records, already in the trace, are not written again. Generation is deterministic, so
        // the result is the uninterrupted run's.
        let regen: HashSet<String> = done
            .iter()
            .filter(|id| !have_gen.contains(*id))
            .cloned()
            .collect();
        if !regen.is_empty() {
            progress.message(&format!(
                "{}: {} prompt(s) complete in the trace have no generation line; redoing them",
                gen_path.display(),
                regen.len()
            ));
        }
        let todo: Vec<PromptInput> = this
            .inputs
            .iter()
            .filter(|p| !done.contains(&p.id) || regen.contains(&p.id))
            .cloned()
            .collect();

        progress.prompts_begin(todo.len() as u64);
        let shared: Rc<RefCell<Box<dyn RoutingSink>>> = Rc::new(RefCell::new(sink));
        let mut deferred = Deferred(shared.clone(), regen.clone(), 0);
        let start = Instant::now();
        let (mut prompt_tokens, mut gen_tokens) = (0usize, 0usize);
        let categories: HashMap<&str, &str> = this
            .prompts
            .iter()
            .map(|p| (p.id.as_str(), p.category.as_str()))
            .collect();
        let tokenizer = &this.tokenizer;
        let truncated = &this.truncated;
        generate_all(
            &model,
            &todo,
            args.batch_size,
            &this.gen,
            &mut deferred,
            &mut |g| {
                if !have_gen.contains(&g.prompt_id) {
                    let text = tokenizer.decode(&g.generated, false)?;
                    gens.append(&generation_line(&g, text, &categories, truncated))?;
                    have_gen.insert(g.prompt_id.clone());
                }
                if !regen.contains(&g.prompt_id) {
                    shared.borrow_mut().end_prompt(&g.prompt_id)?;
                }
                prompt_tokens += g.prompt_tokens.len();
                gen_tokens += g.generated.len();
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                progress.prompt_done((prompt_tokens + gen_tokens) as f64 / secs);
                Ok(())
            },
        )
        .step_context(|| "running the model")?;
        progress.prompts_end();
        Ok(TraceSummary {
            prompts: this.prompts.len(),
            prompts_run: todo.len(),
            prompts_resumed: done.len() - regen.len(),
            prompt_tokens,
            generated_tokens: gen_tokens,
            records: deferred.2,
            load_seconds: load_secs,
            run_seconds: start.elapsed().as_secs_f64(),
            trace: trace_path,
            generations: gen_path,
            manifest: manifest_path,
        })
    }
}

/// The generations-file line of a finished prompt (both trace writers, JSONL and Parquet).
fn generation_line(
    g: &Generation,
    text: String,
    categories: &HashMap<&str, &str>,
    truncated: &HashMap<String, usize>,
) -> GenerationLine {
    GenerationLine {
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
    }
}

/// Forwards to a shared [`ParquetSink`] (kept by the caller to finish the file).
struct SharedParquet(Rc<RefCell<ParquetSink>>);

impl RoutingSink for SharedParquet {
    fn begin_prompt(&mut self, id: &str, category: Option<&str>) -> moe_xray_trace::Result<()> {
        self.0.borrow_mut().begin_prompt(id, category)
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        self.0.borrow_mut().record(d)
    }
    fn end_prompt(&mut self, id: &str) -> moe_xray_trace::Result<()> {
        self.0.borrow_mut().end_prompt(id)
    }
    fn wants_probs(&self) -> bool {
        self.0.borrow().wants_probs()
    }
}

/// `trace --format parquet`: every prompt traced into a staging directory inside the output
/// directory; `trace.parquet`, `generations.jsonl` and `manifest.json` (last) are moved into
/// place when the run succeeds, and nothing is left when it fails.
fn run_parquet(
    this: PreparedTrace,
    model: MoeModel,
    load_secs: f64,
    progress: &dyn Progress,
) -> Result<TraceSummary> {
    let args = &this.opts;
    let out = &args.out;
    let trace_path = out.join(PARQUET_TRACE_FILE);
    let gen_path = out.join("generations.jsonl");
    let manifest_path = out.join("manifest.json");
    let manifest = this.manifest(dtype_name(model.dtype()));
    let _lock = OutLock::acquire(out)?;
    for p in [&trace_path, &gen_path, &manifest_path] {
        if p.exists() {
            invalid!(
                "{} already exists; choose another --out (--format parquet does not resume)",
                p.display()
            );
        }
    }
    let staging = tempfile::Builder::new()
        .prefix(crate::outdir::STAGING_PREFIX)
        .tempdir_in(out)
        .map_err(|e| {
            PipelineError::io(
                format!("cannot create a staging directory in {}", out.display()),
                e,
            )
        })?;
    let st_trace = staging.path().join(PARQUET_TRACE_FILE);
    let st_gen = staging.path().join("generations.jsonl");
    let st_manifest = staging.path().join("manifest.json");
    let writer = RecordsWriter::create(&st_trace, Some(&manifest), true)
        .map_err(|e| PipelineError::Invalid(e.to_string()))?;
    let sink = Rc::new(RefCell::new(ParquetSink::new(writer, args.record_probs)));
    let mut gens: JsonlAppender<GenerationLine> = JsonlAppender::create(&st_gen)?;
    let todo = this.inputs.clone();
    progress.prompts_begin(todo.len() as u64);
    let shared: Rc<RefCell<Box<dyn RoutingSink>>> =
        Rc::new(RefCell::new(Box::new(SharedParquet(sink.clone()))));
    let mut deferred = Deferred(shared.clone(), HashSet::new(), 0);
    let start = Instant::now();
    let (mut prompt_tokens, mut gen_tokens) = (0usize, 0usize);
    let categories: HashMap<&str, &str> = this
        .prompts
        .iter()
        .map(|p| (p.id.as_str(), p.category.as_str()))
        .collect();
    let tokenizer = &this.tokenizer;
    let truncated = &this.truncated;
    generate_all(
        &model,
        &todo,
        args.batch_size,
        &this.gen,
        &mut deferred,
        &mut |g| {
            let text = tokenizer.decode(&g.generated, false)?;
            gens.append(&generation_line(&g, text, &categories, truncated))?;
            shared.borrow_mut().end_prompt(&g.prompt_id)?;
            prompt_tokens += g.prompt_tokens.len();
            gen_tokens += g.generated.len();
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            progress.prompt_done((prompt_tokens + gen_tokens) as f64 / secs);
            Ok(())
        },
    )
    .step_context(|| "running the model")?;
    let records = deferred.2;
    drop(deferred);
    drop(shared);
    let sink = Rc::try_unwrap(sink)
        .map_err(|_| PipelineError::Invalid("internal: the Parquet sink is still shared".into()))?
        .into_inner();
    sink.finish()
        .map_err(|e| PipelineError::Invalid(e.to_string()))?;
    drop(gens);
    manifest.write(&st_manifest)?;
    for (from, to) in [
        (&st_trace, &trace_path),
        (&st_gen, &gen_path),
        (&st_manifest, &manifest_path),
    ] {
        std::fs::rename(from, to).map_err(|e| {
            PipelineError::io(format!("cannot move {} into place", to.display()), e)
        })?;
    }
    progress.prompts_end();
    Ok(TraceSummary {
        prompts: this.prompts.len(),
        prompts_run: todo.len(),
        prompts_resumed: 0,
        prompt_tokens,
        generated_tokens: gen_tokens,
        records,
        load_seconds: load_secs,
        run_seconds: start.elapsed().as_secs_f64(),
        trace: trace_path,
        generations: gen_path,
        manifest: manifest_path,
    })
}

/// Applies a thread count: the size of rayon's global pool, which the model's kernels (and
/// candle's matmul, through `RAYON_NUM_THREADS`) use. Must run before any tensor work;
/// process-wide.
///
/// Also runs candle's element-wise operations on the calling thread (`CANDLE_NUM_THREADS=1`
/// unless the user set it): candle 0.11 splits them over its own pool of spinning threads, which
/// compete for the cores with rayon's workers (the model's kernels, attention run per sequence on
/// rayon's threads, whose candle calls then queue on that pool's lock). The results are the same
/// bits (each output element is computed alone); the time saved is measured in
/// docs/performance.md ("Session 11").
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    check_threads(threads)?;
    if let Some(t) = threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    Ok(())
}

/// Tokenises the prompts (through the chat template when given, which writes the special tokens
/// itself), rejecting prompts that encode to nothing and token ids outside the model's vocabulary.
/// `source` names the prompt file in errors.
pub fn encode_prompts(
    prompts: &[Prompt],
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
                let Some(text) = r.get(i) else {
                    invalid!("{source}: prompt `{}` was not rendered", p.id);
                };
                tokenizer.encode(text, false)?
            }
            None => tokenizer.encode(&p.text, true)?,
        };
        if tokens.is_empty() {
            invalid!("{source}: prompt `{}` encodes to no tokens", p.id);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            invalid!(
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

/// Makes every prompt fit the model's context (prompt + `max_new_tokens` ≤
/// `max_position_embeddings`), cutting it on the `truncate` side or refusing it with its id and
/// token count. Returns the original token count of every cut prompt, by prompt id.
pub fn fit_prompts(
    inputs: &mut [PromptInput],
    cfg: &ModelConfig,
    max_new_tokens: usize,
    truncate: Option<Truncate>,
) -> Result<HashMap<String, usize>> {
    let mut cut = HashMap::new();
    for p in inputs.iter_mut() {
        if let Some(n) = fit_context(
            &p.id,
            &mut p.tokens,
            max_new_tokens,
            cfg.max_position_embeddings,
            truncate,
        )? {
            cut.insert(p.id.clone(), n);
        }
    }
    Ok(cut)
}

/// The `dtype` value of the exact mode (`--exact`).
pub const EXACT: &str = "exact";

/// Loads the checkpoint with a compute dtype name (`None`: the stored one; `exact`: the exact
/// mode of `--exact`, f32 with quantised weights dequantised exactly, see
/// `moe_xray_model::model::LoadOptions::exact`); returns the model and the load time in seconds.
pub fn load_model(dir: &Path, dtype: Option<&str>) -> Result<(MoeModel, f64)> {
    // An invalid MOE_XRAY_KERNEL is an error here, before the model loads (the kernels
    // themselves cannot report it and would treat it as unset).
    moe_xray_model::cpu_kernels::kernel_env_check().map_err(PipelineError::Invalid)?;
    let exact = dtype == Some(EXACT);
    let dtype = dtype.filter(|_| !exact).map(parse_dtype).transpose()?;
    let t = Instant::now();
    let model = MoeModel::load(
        dir,
        &LoadOptions {
            dtype,
            exact,
            ..Default::default()
        },
    )
    .map_err(PipelineError::from)
    .step_context(|| format!("loading {}", dir.display()))?;
    Ok((model, t.elapsed().as_secs_f64()))
}
