//! Causal expert ablation (`moe-xray ablate`; docs/statistics.md "Causal expert ablation").
//!
//! 1. Each prompt's greedy continuation by the unablated model (`max_new_tokens`).
//! 2. One unablated teacher-forced pass over prompt + continuation: the baseline next-token NLL and
//!    argmax of every continuation token, and the routing of every fed token, whose per-prompt
//!    expert counts give the signatures, each category's contrast and each expert's load.
//! 3. For every dose `n` and category: the characteristic experts (top-`n` by contrast, per layer
//!    or globally) and `control_draws` load-matched random sets are masked in the routers
//!    ([`moe_xray_model::router::RouterMask`]) and every prompt is scored again, teacher-forced on
//!    the same continuation.
//! 4. The effect matrix (ablated × evaluated category) per dose with bootstrap CIs and paired
//!    permutation p-values against the control (`moe_xray_stats::ablation`), written to
//!    `ablation.json`, with the figures `ablation_matrix_n<N>.svg` (one per dose) and
//!    `ablation_dose_response.svg` (`moe_xray_report::ablation`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use moe_xray_model::config::{eos_token_ids, GenerationDefaults, ModelConfig};
use moe_xray_model::generate::{
    generate_all, teacher_force_batch, ForcedInput, GenerateOptions, PromptInput, Truncate,
};
use moe_xray_model::model::MoeModel;
use moe_xray_model::router::RouterMask;
use moe_xray_model::tokenizer::Tokenizer;
use moe_xray_stats::ablation::{
    self, characteristic_experts, dose_summary, effect_cell, load_matched_random,
    max_masked_per_layer, prompt_effect, signature_contrast, AblationResults, AblationSettings,
    Budget, MaskedSet, PromptEffect, PromptScores, Resampling, ABLATION_SCHEMA_VERSION,
};
use moe_xray_stats::signature::signatures;
use moe_xray_stats::sub_rng;
use moe_xray_trace::sink::NullSink;
use moe_xray_trace::{read_prompts, RoutingDecision, RoutingSink};

use crate::error::{invalid, Result, ResultExt};
use crate::outdir::{Batch, OutLock};
use crate::trace::{encode_prompts, fit_prompts, load_model, set_threads};
use crate::Progress;

/// Largest number of doses, control draws and load bins accepted.
pub const MAX_DOSES: usize = 64;
pub const MAX_CONTROL_DRAWS: usize = 1000;
pub const MAX_LOAD_BINS: usize = 1024;
/// Largest number of bootstrap / permutation repetitions per effect cell.
pub const MAX_REPS: usize = 1_000_000;

/// Options of an ablation.
#[derive(Debug, Clone, PartialEq)]
pub struct AblateOptions {
    pub model: PathBuf,
    pub prompts: PathBuf,
    /// Output directory (`ablation.json`).
    pub out: PathBuf,
    /// The `n` of each dose (experts per layer, or per layer on average with a global budget).
    pub doses: Vec<usize>,
    /// Global budget (`n · L` experts over all layers) instead of `n` per layer.
    pub global_budget: bool,
    /// Load-matched random control sets per category and dose.
    pub control_draws: usize,
    /// Load quantile bins the control draws match within.
    pub load_bins: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub chat_template: bool,
    pub dtype: Option<String>,
    pub threads: Option<usize>,
    pub boot_reps: usize,
    pub perm_reps: usize,
    pub seed: u64,
    pub truncate_prompts: Option<Truncate>,
}

impl AblateOptions {
    /// Defaults: doses [2], per-layer budget, 4 control draws, 4 load bins, 16 new tokens,
    /// 1000 bootstrap and permutation repetitions, seed 0.
    pub fn new(model: PathBuf, prompts: PathBuf, out: PathBuf) -> Self {
        AblateOptions {
            model,
            prompts,
            out,
            doses: vec![2],
            global_budget: false,
            control_draws: 4,
            load_bins: 4,
            max_new_tokens: 16,
            batch_size: 8,
            chat_template: false,
            dtype: None,
            threads: None,
            boot_reps: 1000,
            perm_reps: 1000,
            seed: 0,
            truncate_prompts: None,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.doses.is_empty() || self.doses.len() > MAX_DOSES {
            invalid!(
                "--n: between 1 and {MAX_DOSES} doses, got {}",
                self.doses.len()
            );
        }
        if self.doses.contains(&0) {
            invalid!("--n: every dose must be at least 1 expert");
        }
        if self.control_draws == 0 || self.control_draws > MAX_CONTROL_DRAWS {
            invalid!("--control-draws must be in 1..={MAX_CONTROL_DRAWS}");
        }
        if self.load_bins == 0 || self.load_bins > MAX_LOAD_BINS {
            invalid!("--load-bins must be in 1..={MAX_LOAD_BINS}");
        }
        if self.max_new_tokens == 0 {
            invalid!("--max-new-tokens must be at least 1 (the continuation is what is scored)");
        }
        if self.batch_size == 0 {
            invalid!("--batch-size must be at least 1");
        }
        if self.boot_reps == 0
            || self.boot_reps > MAX_REPS
            || self.perm_reps == 0
            || self.perm_reps > MAX_REPS
        {
            invalid!("--boot-reps and --perm-reps must be in 1..={MAX_REPS}");
        }
        Ok(())
    }
}

/// What an ablation produced.
#[derive(Debug, Clone)]
pub struct AblateSummary {
    pub results: AblationResults,
    pub path: PathBuf,
    /// Seconds to load the model and to run the ablation (generation, passes, statistics).
    pub load_seconds: f64,
    pub run_seconds: f64,
}

/// Routing of the fed tokens, per prompt: the chosen experts in recording order and the expert
/// counts per MoE layer.
struct Collect {
    index: HashMap<String, usize>,
    moe_index: HashMap<u32, usize>,
    num_experts: usize,
    top_k: usize,
    routes: Vec<Vec<u32>>,
    counts: Vec<Vec<f64>>,
}

impl Collect {
    fn new(ids: &[String], moe_layers: &[u32], num_experts: usize, top_k: usize) -> Self {
        let width = moe_layers.len() * num_experts;
        Collect {
            index: ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect(),
            moe_index: moe_layers
                .iter()
                .enumerate()
                .map(|(i, &l)| (l, i))
                .collect(),
            num_experts,
            top_k,
            routes: vec![Vec::new(); ids.len()],
            counts: vec![vec![0.0; width]; ids.len()],
        }
    }
}

impl RoutingSink for Collect {
    fn begin_prompt(&mut self, _: &str, _: Option<&str>) -> moe_xray_trace::Result<()> {
        Ok(())
    }
    fn record(&mut self, d: &RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        let (Some(&p), Some(&l)) = (self.index.get(d.prompt_id), self.moe_index.get(&d.layer))
        else {
            return Err(moe_xray_trace::TraceError::Sink(format!(
                "ablation: routing of unknown prompt `{}` or layer {}",
                d.prompt_id, d.layer
            )));
        };
        if d.experts.len() != self.top_k {
            return Err(moe_xray_trace::TraceError::Sink(format!(
                "ablation: {} experts routed, top_k is {}",
                d.experts.len(),
                self.top_k
            )));
        }
        self.routes[p].extend_from_slice(d.experts);
        for &e in d.experts {
            if let Some(c) = self.counts[p].get_mut(l * self.num_experts + e as usize) {
                *c += 1.0;
            }
        }
        Ok(())
    }
    fn end_prompt(&mut self, _: &str) -> moe_xray_trace::Result<()> {
        Ok(())
    }
}

/// One teacher-forced pass over all prompts (in batches) with `mask`.
fn score_all(
    model: &MoeModel,
    forced: &[ForcedInput],
    mask: Option<&RouterMask>,
    batch_size: usize,
    collect: &mut Collect,
) -> Result<Vec<PromptScores>> {
    collect.routes.iter_mut().for_each(Vec::clear);
    let mut out = Vec::with_capacity(forced.len());
    for chunk in forced.chunks(batch_size) {
        let tf = teacher_force_batch(
            model,
            chunk,
            mask,
            moe_xray_model::generate::DEFAULT_PREFILL_CHUNK,
            false,
            collect,
        )?;
        for t in tf {
            out.push(PromptScores {
                nll: t.nll,
                argmax: t.argmax,
                routes: Vec::new(),
            });
        }
    }
    for (s, r) in out.iter_mut().zip(collect.routes.iter_mut()) {
        s.routes = std::mem::take(r);
    }
    Ok(out)
}

/// The router mask of per-MoE-layer expert lists.
fn router_mask(moe_layers: &[u32], num_experts: usize, sets: &[Vec<u32>]) -> Result<RouterMask> {
    let mut m = RouterMask::new();
    for (&l, experts) in moe_layers.iter().zip(sets) {
        if !experts.is_empty() {
            m.mask_experts(l as usize, num_experts, experts)
                .map_err(crate::error::PipelineError::Invalid)?;
        }
    }
    Ok(m)
}

/// Runs the ablation on a loaded model and encoded prompts (every prompt has a category).
pub fn ablate_model(
    model: &MoeModel,
    inputs: &[PromptInput],
    eos: Vec<u32>,
    opts: &AblateOptions,
    model_name: &str,
    progress: &dyn Progress,
) -> Result<AblationResults> {
    opts.check()?;
    let cfg: &ModelConfig = model.config();
    let (ne, k) = (cfg.num_experts, cfg.num_experts_per_tok);
    let moe_layers = cfg.moe_layer_indices();
    let nl = moe_layers.len();
    if nl == 0 {
        invalid!("{model_name}: the model has no MoE layer");
    }
    // Categories in order of first appearance.
    let mut categories: Vec<String> = Vec::new();
    let mut labels = Vec::with_capacity(inputs.len());
    for p in inputs {
        let Some(c) = p.category.as_deref() else {
            invalid!("prompt `{}` has no category", p.id);
        };
        let i = match categories.iter().position(|x| x == c) {
            Some(i) => i,
            None => {
                categories.push(c.to_string());
                categories.len() - 1
            }
        };
        labels.push(i);
    }
    if categories.len() < 2 {
        invalid!("ablation needs prompts of at least two categories");
    }
    // The doses must fit the routers before any model work.
    let max_per_layer = max_masked_per_layer(ne, k);
    for &n in &opts.doses {
        if n > max_per_layer {
            invalid!("--n {n}: at most {max_per_layer} experts per layer can be masked (experts {ne} − top_k {k})");
        }
        if !opts.global_budget && n.saturating_mul(2) > ne {
            invalid!("--n {n}: a load-matched control of {n} other experts per layer needs at least {} experts, the model has {ne}", 2 * n);
        }
    }
    // 1. Greedy continuations of the unablated model.
    progress.step("greedy continuations");
    let gen = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        eos_token_ids: eos,
        hf_generate_compat: true,
        ..Default::default()
    };
    let mut continuations: HashMap<String, Vec<u32>> = HashMap::new();
    generate_all(
        model,
        inputs,
        opts.batch_size,
        &gen,
        &mut NullSink,
        &mut |g| {
            continuations.insert(g.prompt_id, g.generated);
            Ok(())
        },
    )?;
    let mut forced = Vec::with_capacity(inputs.len());
    for p in inputs {
        let cont = continuations.remove(&p.id).unwrap_or_default();
        if cont.is_empty() {
            invalid!("prompt `{}`: no continuation token was generated", p.id);
        }
        forced.push(ForcedInput {
            id: p.id.clone(),
            category: p.category.clone(),
            prompt: p.tokens.clone(),
            continuation: cont,
        });
    }
    let ids: Vec<String> = inputs.iter().map(|p| p.id.clone()).collect();
    let mut collect = Collect::new(&ids, &moe_layers, ne, k);
    // 2. The unablated pass: baseline scores, signatures, contrast, load.
    progress.step("unablated teacher-forced pass");
    let base = score_all(model, &forced, None, opts.batch_size, &mut collect)?;
    let mut passes = 1usize;
    let width = nl * ne;
    let counts: Vec<f64> = collect.counts.concat();
    let sigs = signatures(&counts, nl, ne);
    let contrast = signature_contrast(&sigs, &labels, categories.len(), width)?;
    let mut load = vec![0.0f64; width];
    for row in sigs.chunks(width) {
        load.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
    }
    load.iter_mut().for_each(|x| *x /= inputs.len() as f64);
    let rs = Resampling {
        boot_reps: opts.boot_reps,
        perm_reps: opts.perm_reps,
        seed: opts.seed,
    };
    let nc = categories.len();
    let draws = opts.control_draws;
    let mut doses = Vec::with_capacity(opts.doses.len());
    for (di, &n) in opts.doses.iter().enumerate() {
        let budget = if opts.global_budget {
            Budget::Global(n)
        } else {
            Budget::PerLayer(n)
        };
        let mut masked = Vec::with_capacity(nc);
        // effects[a][d] = per prompt effects with category a's set d masked (d = 0: characteristic).
        let mut effects: Vec<Vec<Vec<PromptEffect>>> = Vec::with_capacity(nc);
        for (a, cat) in categories.iter().enumerate() {
            let char_sets = characteristic_experts(
                &contrast[a * width..(a + 1) * width],
                nl,
                ne,
                budget,
                max_per_layer,
            )?;
            let mut random_sets = Vec::with_capacity(draws);
            for d in 0..draws {
                let rep = ((di * nc + a) * draws + d) as u64;
                let mut rng = sub_rng(opts.seed, ablation::tags::CONTROL, rep);
                random_sets.push(load_matched_random(
                    &load,
                    ne,
                    &char_sets,
                    opts.load_bins,
                    &mut rng,
                )?);
            }
            let mut per_set = Vec::with_capacity(1 + draws);
            for (d, sets) in std::iter::once(&char_sets)
                .chain(random_sets.iter())
                .enumerate()
            {
                progress.step(&format!(
                    "n = {n}: category {cat} ({}/{nc}), {}",
                    a + 1,
                    if d == 0 {
                        "characteristic experts".to_string()
                    } else {
                        format!("control draw {d}/{draws}")
                    }
                ));
                let mask = router_mask(&moe_layers, ne, sets)?;
                let scored = score_all(model, &forced, Some(&mask), opts.batch_size, &mut collect)?;
                passes += 1;
                let eff = base
                    .iter()
                    .zip(&scored)
                    .map(|(b, s)| prompt_effect(b, s, k))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                per_set.push(eff);
            }
            effects.push(per_set);
            masked.push(MaskedSet {
                category: cat.clone(),
                characteristic: char_sets,
                random: random_sets,
            });
        }
        let mut cells = Vec::with_capacity(nc * nc);
        for (a, ca) in categories.iter().enumerate() {
            for (e, ce) in categories.iter().enumerate() {
                let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == e).collect();
                let own: Vec<PromptEffect> = members.iter().map(|&i| effects[a][0][i]).collect();
                let random: Vec<Vec<PromptEffect>> = effects[a][1..]
                    .iter()
                    .map(|d| members.iter().map(|&i| d[i]).collect())
                    .collect();
                let cell = ((di * nc + a) * nc + e) as u64;
                cells.push(effect_cell(ca, ce, &own, &random, rs, cell)?);
            }
        }
        doses.push(dose_summary(n, masked, cells));
    }
    let base_tokens: usize = base.iter().map(|b| b.nll.len()).sum();
    let base_nll = base.iter().flat_map(|b| b.nll.iter()).sum::<f64>() / base_tokens.max(1) as f64;
    Ok(AblationResults {
        schema_version: ABLATION_SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model: model_name.to_string(),
        settings: AblationSettings {
            budget: if opts.global_budget {
                "global"
            } else {
                "per_layer"
            }
            .to_string(),
            doses: opts.doses.clone(),
            control_draws: draws,
            load_bins: opts.load_bins,
            max_new_tokens: opts.max_new_tokens,
            boot_reps: opts.boot_reps,
            perm_reps: opts.perm_reps,
            seed: opts.seed,
        },
        moe_layers,
        num_experts: ne,
        top_k: k,
        categories,
        prompt_ids: ids,
        continuation_tokens: forced.iter().map(|f| f.continuation.len()).collect(),
        base_nll,
        contrast: contrast.chunks(width).map(<[f64]>::to_vec).collect(),
        doses,
        passes,
    })
}

/// `ablation.json` bytes (pretty JSON, newline-terminated).
pub fn to_json_bytes(r: &AblationResults) -> Result<Vec<u8>> {
    let mut v = serde_json::to_vec_pretty(r)
        .map_err(|e| crate::error::PipelineError::Invalid(format!("ablation.json: {e}")))?;
    v.push(b'\n');
    Ok(v)
}

/// The encoded prompts of an ablation (validated against the checkpoint; nothing is written) and
/// the checkpoint's end-of-sequence ids.
fn prepare_inputs(opts: &AblateOptions) -> Result<(Vec<PromptInput>, Vec<u32>)> {
    let source = opts.prompts.display().to_string();
    let prompts = read_prompts(&opts.prompts).step_context(|| source.clone())?;
    let cfg = ModelConfig::from_dir(&opts.model)?;
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let gen_defaults = GenerationDefaults::from_dir(&opts.model)?;
    let template = if opts.chat_template {
        Some(moe_xray_model::chat::ChatTemplate::from_dir(&opts.model)?)
    } else {
        None
    };
    let mut inputs = encode_prompts(
        &prompts,
        &source,
        &tokenizer,
        template.as_ref(),
        cfg.vocab_size,
    )?;
    fit_prompts(
        &mut inputs,
        &cfg,
        opts.max_new_tokens,
        opts.truncate_prompts,
    )
    .step_context(|| source.clone())?;
    Ok((inputs, eos_token_ids(&cfg, gen_defaults.as_ref())))
}

/// Adds `ablation.json` (as `json`) and the figures `ablation_matrix_n<N>.svg` (one per dose)
/// and `ablation_dose_response.svg` (into `fig_dir`) to `batch`.
pub fn stage_ablation(
    results: &AblationResults,
    json: &Path,
    fig_dir: &Path,
    batch: &mut Batch,
) -> Result<()> {
    batch.add(json, to_json_bytes(results)?)?;
    for (i, d) in results.doses.iter().enumerate() {
        if let Some(svg) = moe_xray_report::ablation::effect_matrix(results, i) {
            batch.add(fig_dir.join(format!("ablation_matrix_n{}.svg", d.n)), svg)?;
        }
    }
    batch.add(
        fig_dir.join("ablation_dose_response.svg"),
        moe_xray_report::ablation::dose_response(results),
    )?;
    Ok(())
}

/// Reads the prompts and the checkpoint and runs [`ablate_model`], writing nothing (the caller
/// holds the output folder's lock and stages the outputs, e.g. `run --ablate`). Returns the
/// results and the seconds to load the model and to run the ablation.
pub fn ablate_unstaged(
    opts: &AblateOptions,
    progress: &dyn Progress,
) -> Result<(AblationResults, f64, f64)> {
    opts.check()?;
    let (inputs, eos) = prepare_inputs(opts)?;
    let (model, load_seconds) = load_model(&opts.model, opts.dtype.as_deref())?;
    let t0 = Instant::now();
    let results = ablate_model(
        &model,
        &inputs,
        eos,
        opts,
        &opts.model.display().to_string(),
        progress,
    )?;
    Ok((results, load_seconds, t0.elapsed().as_secs_f64()))
}

/// The whole command: reads the prompts and the checkpoint, runs [`ablate_model`], writes
/// `OUT/ablation.json` and the figures.
pub fn ablate(opts: &AblateOptions, progress: &dyn Progress) -> Result<AblateSummary> {
    opts.check()?;
    set_threads(opts.threads)?;
    let (inputs, eos) = prepare_inputs(opts)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        crate::error::PipelineError::io(format!("creating {}", opts.out.display()), e)
    })?;
    let _lock = OutLock::acquire(&opts.out)?;
    let (model, load_seconds) = load_model(&opts.model, opts.dtype.as_deref())?;
    let t0 = Instant::now();
    let results = ablate_model(
        &model,
        &inputs,
        eos,
        opts,
        &opts.model.display().to_string(),
        progress,
    )?;
    let path = opts.out.join("ablation.json");
    let mut batch = Batch::new();
    stage_ablation(&results, &path, &opts.out, &mut batch)?;
    batch.commit()?;
    Ok(AblateSummary {
        results,
        path,
        load_seconds,
        run_seconds: t0.elapsed().as_secs_f64(),
    })
}
