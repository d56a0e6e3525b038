//! `moe-xray bench model`: times an MoE checkpoint of any supported family on a prompt workload,
//! once with routing
//! capture into a `NullSink` (the bare model) and once into a real trace writer (counts or
//! events, written to a scratch directory that is removed afterwards), and reports prefill and
//! decode tokens/s separately, wall time, the capture overhead and the peak RSS.
//!
//! Workload: the first `--num-prompts` prompts of `--prompts` (default the bundled paper80),
//! greedy decoding of exactly `--max-new-tokens` tokens per prompt (EOS is ignored so that every
//! run processes the same number of tokens), in consecutive ragged batches of `--batch-size`.
//! Like `moe-xray trace` (without `--hf-generate-compat`) the last generated token is also run
//! through the model so that it has routing records.
//!
//! Token accounting: *prefill* = the first forward step of each batch (all prompt tokens of the
//! batch at once); *decode* = every later step (one token per still-active prompt). Tokens/s =
//! tokens fed through the model in that phase / seconds spent in those `forward` calls (greedy
//! token selection and sink bookkeeping between steps count towards the wall time only). Every
//! token fed makes one routing decision per MoE layer (dense layers make none):
//! `routing_decisions` = tokens × `num_moe_layers`.
//!
//! The decoding loop is written here instead of calling `generate::generate_all` because that
//! function does not expose per-step timings; it uses the same public `MoeModel::forward` API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use moe_xray_model::config::ModelConfig;
use moe_xray_model::model::{dtype_name, MoeModel, StepSeq};
use moe_xray_model::tokenizer::Tokenizer;
use moe_xray_trace::sink::NullSink;
use moe_xray_trace::{read_prompts, CountsWriter, EventsWriter, Prompt, RoutingSink, TokenType};
use serde::Serialize;

use moe_xray_pipeline::study::PAPER80;
use moe_xray_pipeline::trace::{encode_prompts, load_model, set_threads};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Only the bare model (NullSink).
    None,
    /// Per-prompt expert counts (`moe-xray trace --mode counts`).
    Counts,
    /// One record per (token, layer) (`moe-xray trace --mode events`).
    Events,
}

#[derive(clap::Args, Debug)]
pub struct ModelBench {
    /// Checkpoint directory in Hugging Face layout of a supported MoE family (olmoe, mixtral,
    /// qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss, granitemoe), e.g. from
    /// `synth-model --preset olmoe-1b-7b`.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt set: `paper80` (bundled) or a JSONL / CSV file with id, category, text.
    #[arg(long, default_value = "paper80")]
    pub prompts: String,
    /// Use the first N prompts of the set (0 = all).
    #[arg(long, short = 'n', default_value_t = 8)]
    pub num_prompts: usize,
    /// Tokens generated per prompt (EOS ignored).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Prompts run together per ragged batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Compute threads, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute dtype (default: the checkpoint's stored dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Trace writer compared against the NullSink run.
    #[arg(long, value_enum, default_value = "events")]
    pub capture: Capture,
    /// Scratch directory for the capture run's trace (default: the system temp dir); the trace
    /// file is removed afterwards.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Print a JSON summary on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Only the capture pass: skip the NullSink pass (halves the time of side-by-side runs; no
    /// capture overhead is reported). Ignored with `--capture none`.
    #[arg(long)]
    pub skip_null: bool,
}

/// Timings of one pass over the workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassResult {
    pub sink: String,
    pub prompts: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub wall_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// (prefill + decode tokens) / wall seconds.
    pub tokens_per_second: f64,
    /// Routing decisions ((token, layer) pairs) handed to the sink.
    pub routing_decisions: u64,
    /// Seconds spent inside the sink's calls (formatting, writing, fsync): the capture's own cost,
    /// measured directly and so not subject to the run-to-run noise of comparing two passes.
    pub sink_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    model: String,
    /// transformers' `model_type`.
    family: String,
    /// Decoder layers.
    num_layers: usize,
    /// Decoder layers with a router (each routed token makes one decision at each).
    num_moe_layers: usize,
    /// Decoder-layer indices of the dense layers (no router).
    dense_layers: Vec<u32>,
    /// Routed experts per MoE layer.
    num_experts: usize,
    /// Shared experts per MoE layer (0 without).
    num_shared_experts: usize,
    /// The router kind (as in the trace manifest's `routing.router`).
    router: String,
    top_k: usize,
    hidden_size: usize,
    dtype: String,
    /// The matmul kernel path (`avx512-bf16`, `avx2-fma`, `gemm`; `MOE_XRAY_KERNEL` caps it).
    kernel: String,
    /// The CPU features the kernels detected.
    cpu_features: Vec<String>,
    threads: usize,
    batch_size: usize,
    max_new_tokens: usize,
    load_seconds: f64,
    rss_after_load_bytes: Option<u64>,
    peak_rss_bytes: Option<u64>,
    passes: Vec<PassResult>,
    /// (capture wall − null wall) / null wall; `None` without a capture pass.
    capture_overhead: Option<f64>,
    /// Capture pass: seconds inside the trace writer / its wall seconds; `None` without one.
    capture_share: Option<f64>,
}

/// Counts the decisions passing through to the wrapped sink and times the sink's own work.
struct Counting<'a> {
    inner: &'a mut dyn RoutingSink,
    n: u64,
    /// Time spent inside the wrapped sink's calls.
    busy: Duration,
}

impl Counting<'_> {
    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn RoutingSink) -> T) -> T {
        let t = Instant::now();
        let out = f(&mut *self.inner);
        self.busy += t.elapsed();
        out
    }
}

impl RoutingSink for Counting<'_> {
    fn begin_prompt(&mut self, id: &str, category: Option<&str>) -> moe_xray_trace::Result<()> {
        self.timed(|s| s.begin_prompt(id, category))
    }
    fn record(&mut self, d: &moe_xray_trace::RoutingDecision<'_>) -> moe_xray_trace::Result<()> {
        self.n += 1;
        self.timed(|s| s.record(d))
    }
    fn end_prompt(&mut self, id: &str) -> moe_xray_trace::Result<()> {
        self.timed(|s| s.end_prompt(id))
    }
    fn wants_probs(&self) -> bool {
        self.inner.wants_probs()
    }
}

/// Greedy choice: highest logit, ties to the lowest id (as `torch.argmax`), NaN never wins.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || (logits[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// A value of `/proc/self/status` in bytes (`VmHWM` = peak RSS, `VmRSS` = current); `None` off
/// Linux or if the line is missing.
pub fn proc_status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kb(&s, key).map(|kb| kb * 1024)
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let v: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(v),
            Some(_) => None,
        }
    })
}

struct Seq {
    id: String,
    category: String,
    prompt: Vec<u32>,
}

/// Runs the workload once through `sink` and times it.
pub fn run_pass(
    model: &MoeModel,
    seqs: &[(String, String, Vec<u32>)],
    batch_size: usize,
    max_new_tokens: usize,
    sink_name: &str,
    sink: &mut dyn RoutingSink,
) -> Result<PassResult> {
    let seqs: Vec<Seq> = seqs
        .iter()
        .map(|(id, c, t)| Seq {
            id: id.clone(),
            category: c.clone(),
            prompt: t.clone(),
        })
        .collect();
    let mut sink = Counting {
        inner: sink,
        n: 0,
        busy: Duration::ZERO,
    };
    let mut r = PassResult {
        sink: sink_name.to_string(),
        prompts: seqs.len(),
        ..Default::default()
    };
    let wall = Instant::now();
    for chunk in seqs.chunks(batch_size.max(1)) {
        let mut states: Vec<_> = chunk.iter().map(|s| model.new_sequence(&s.id)).collect();
        for s in chunk {
            sink.begin_prompt(&s.id, Some(&s.category))?;
        }
        let mut next: Vec<Vec<u32>> = chunk.iter().map(|s| s.prompt.clone()).collect();
        let mut generated = vec![0usize; chunk.len()];
        // `active[i]`: prompt i still has a chunk to feed; its last chunk wants no logits.
        let mut active: Vec<bool> = vec![true; chunk.len()];
        let mut first = true;
        while active.iter().any(|&a| a) {
            let idx: Vec<usize> = (0..chunk.len()).filter(|&i| active[i]).collect();
            let fed: usize = idx.iter().map(|&i| next[i].len()).sum();
            let logits = {
                let mut step: Vec<StepSeq<'_>> = Vec::with_capacity(idx.len());
                let mut rest: &mut [_] = &mut states[..];
                let mut base = 0usize;
                for &i in &idx {
                    let (_, tail) = rest.split_at_mut(i - base);
                    let (one, tail) = tail.split_at_mut(1);
                    rest = tail;
                    base = i + 1;
                    step.push(StepSeq {
                        state: &mut one[0],
                        tokens: &next[i],
                        token_type: if first {
                            TokenType::Prompt
                        } else {
                            TokenType::Generation
                        },
                        want_logits: generated[i] < max_new_tokens,
                    });
                }
                let t = Instant::now();
                let out = model.forward(&mut step, &mut sink)?;
                let secs = t.elapsed().as_secs_f64();
                if first {
                    r.prefill_seconds += secs;
                    r.prefill_tokens += fed;
                } else {
                    r.decode_seconds += secs;
                    r.decode_tokens += fed;
                }
                out
            };
            for (&i, lg) in idx.iter().zip(logits) {
                match lg {
                    Some(lg) => {
                        next[i] = vec![argmax(&lg)];
                        generated[i] += 1;
                    }
                    None => {
                        active[i] = false;
                        sink.end_prompt(&chunk[i].id)?;
                    }
                }
            }
            first = false;
        }
    }
    r.wall_seconds = wall.elapsed().as_secs_f64();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    r.prefill_tokens_per_second = rate(r.prefill_tokens, r.prefill_seconds);
    r.decode_tokens_per_second = rate(r.decode_tokens, r.decode_seconds);
    r.tokens_per_second = rate(r.prefill_tokens + r.decode_tokens, r.wall_seconds);
    r.routing_decisions = sink.n;
    r.sink_seconds = sink.busy.as_secs_f64();
    Ok(r)
}

fn load_prompts(spec: &str) -> Result<Vec<Prompt>> {
    if spec == "paper80" {
        // Parse the bundled set through the same reader as a user's file.
        let dir =
            std::env::temp_dir().join(format!("moe-xray-bench-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("paper80.jsonl");
        std::fs::write(&path, PAPER80).with_context(|| format!("writing {}", path.display()))?;
        let res = read_prompts(&path);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(res?)
    } else {
        let p = Path::new(spec);
        if !p.exists() {
            bail!("--prompts {spec}: no such file (and not a bundled set; bundled: paper80)");
        }
        Ok(read_prompts(p)?)
    }
}

/// "16 layers" when every decoder layer is an MoE layer, else "3 layers (2 MoE, dense [0])".
fn layers_text(num_layers: usize, num_moe: usize, dense: &[u32]) -> String {
    if dense.is_empty() {
        format!("{num_layers} layers")
    } else {
        format!("{num_layers} layers ({num_moe} MoE, dense {dense:?})")
    }
}

fn gb(b: Option<u64>) -> String {
    b.map(|b| format!("{:.2} GB", b as f64 / 1e9))
        .unwrap_or_else(|| "n/a".into())
}

pub fn run(b: ModelBench) -> Result<()> {
    set_threads(b.threads)?;
    // Checked first: an invalid MOE_XRAY_KERNEL fails before the model loads.
    moe_xray_model::cpu_kernels::kernel_env_check().map_err(anyhow::Error::msg)?;
    if b.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut prompts = load_prompts(&b.prompts)?;
    if b.num_prompts > 0 {
        if b.num_prompts > prompts.len() {
            bail!(
                "--num-prompts {}: the prompt set {} has only {} prompts",
                b.num_prompts,
                b.prompts,
                prompts.len()
            );
        }
        prompts.truncate(b.num_prompts);
    }
    let tokenizer = Tokenizer::from_dir(&b.model)?;
    let vocab = ModelConfig::from_dir(&b.model)?.vocab_size;
    let inputs = encode_prompts(&prompts, &b.prompts, &tokenizer, None, vocab)?;
    let (model, load_seconds) = load_model(&b.model, b.dtype.as_deref())?;
    let rss_after_load = proc_status_bytes("VmRSS");
    let (kernel, features) =
        moe_xray_model::cpu_kernels::kernel_report(model.dtype()).map_err(anyhow::Error::msg)?;
    let cfg = model.config().clone();
    let seqs: Vec<(String, String, Vec<u32>)> = inputs
        .into_iter()
        .map(|p| (p.id, p.category.unwrap_or_default(), p.tokens))
        .collect();

    let mut passes = Vec::new();
    if !(b.skip_null && b.capture != Capture::None) {
        passes.push(run_pass(
            &model,
            &seqs,
            b.batch_size,
            b.max_new_tokens,
            "null",
            &mut NullSink,
        )?);
    }
    if b.capture != Capture::None {
        let scratch = b
            .scratch
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("moe-xray-bench-model-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let res = (|| -> Result<PassResult> {
            Ok(match b.capture {
                Capture::Counts => {
                    let mut w = CountsWriter::create(
                        scratch.join("counts.jsonl"),
                        cfg.num_hidden_layers,
                        cfg.num_experts,
                    )?
                    .with_dense_layers(&cfg.dense_layer_indices())?;
                    run_pass(
                        &model,
                        &seqs,
                        b.batch_size,
                        b.max_new_tokens,
                        "counts",
                        &mut w,
                    )?
                }
                _ => {
                    let mut w = EventsWriter::create(scratch.join("trace.jsonl"))?;
                    run_pass(
                        &model,
                        &seqs,
                        b.batch_size,
                        b.max_new_tokens,
                        "events",
                        &mut w,
                    )?
                }
            })
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        passes.push(res?);
    }
    let null_pass = passes.iter().find(|p| p.sink == "null");
    let capture_pass = passes.iter().find(|p| p.sink != "null");
    let capture_overhead = match (null_pass, capture_pass) {
        (Some(n), Some(c)) => Some((c.wall_seconds - n.wall_seconds) / n.wall_seconds.max(1e-12)),
        _ => None,
    };
    let capture_share = capture_pass.map(|c| c.sink_seconds / c.wall_seconds.max(1e-12));
    let threads = b.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let summary = Summary {
        model: b.model.display().to_string(),
        family: cfg.model_type().to_string(),
        num_layers: cfg.num_hidden_layers,
        num_moe_layers: cfg.moe_layer_indices().len(),
        dense_layers: cfg.dense_layer_indices(),
        num_experts: cfg.num_experts,
        num_shared_experts: cfg.moe.shared.map_or(0, |s| s.count),
        router: cfg.moe.router.name().to_string(),
        top_k: cfg.num_experts_per_tok,
        hidden_size: cfg.hidden_size,
        dtype: dtype_name(model.dtype()).to_string(),
        kernel: kernel.to_string(),
        cpu_features: features.iter().map(|f| f.to_string()).collect(),
        threads,
        batch_size: b.batch_size,
        max_new_tokens: b.max_new_tokens,
        load_seconds,
        rss_after_load_bytes: rss_after_load,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
        passes,
        capture_overhead,
        capture_share,
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "bench model: {} ({}, {} x {} experts{}, top-{} ({} router), hidden {}, {}), {} prompts x {} new tokens, batch {}, threads {}",
        summary.model,
        summary.family,
        layers_text(summary.num_layers, summary.num_moe_layers, &summary.dense_layers),
        summary.num_experts,
        match summary.num_shared_experts {
            0 => String::new(),
            n => format!(" + {n} shared"),
        },
        summary.top_k,
        summary.router,
        summary.hidden_size,
        summary.dtype,
        prompts.len(),
        b.max_new_tokens,
        b.batch_size,
        threads
    );
    println!(
        "kernel {} (CPU features: {})",
        summary.kernel,
        summary.cpu_features.join(" ")
    );
    println!(
        "load {:.2} s, RSS after load {}, peak RSS {}",
        load_seconds,
        gb(summary.rss_after_load_bytes),
        gb(summary.peak_rss_bytes)
    );
    println!(
        "{:<8} {:>9} {:>10} {:>12} {:>9} {:>10} {:>12} {:>9} {:>10}",
        "sink",
        "prefill",
        "prefill s",
        "prefill t/s",
        "decode",
        "decode s",
        "decode t/s",
        "wall s",
        "total t/s"
    );
    for p in &summary.passes {
        println!(
            "{:<8} {:>9} {:>10.2} {:>12.2} {:>9} {:>10.2} {:>12.2} {:>9.2} {:>10.2}",
            p.sink,
            p.prefill_tokens,
            p.prefill_seconds,
            p.prefill_tokens_per_second,
            p.decode_tokens,
            p.decode_seconds,
            p.decode_tokens_per_second,
            p.wall_seconds,
            p.tokens_per_second
        );
    }
    let capture_pass = summary.passes.iter().find(|p| p.sink != "null");
    if let (Some(o), Some(c)) = (capture_overhead, capture_pass) {
        println!(
            "capture overhead ({} vs null, wall): {:+.2} %",
            c.sink,
            o * 100.0
        );
    }
    if let (Some(share), Some(c)) = (capture_share, capture_pass) {
        println!(
            "time inside the {} writer: {:.3} s = {:.2} % of that pass's wall time (measured directly)",
            c.sink,
            c.sink_seconds,
            share * 100.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t   42 kB\n";
        assert_eq!(parse_status_kb(s, "VmHWM"), Some(123456));
        assert_eq!(parse_status_kb(s, "VmRSS"), Some(42));
        assert_eq!(parse_status_kb(s, "VmSwap"), None);
        assert_eq!(parse_status_kb("VmHWMX: 5 kB", "VmHWM"), None);
    }

    #[test]
    fn layers_text_names_dense_layers() {
        assert_eq!(layers_text(16, 16, &[]), "16 layers");
        assert_eq!(layers_text(3, 2, &[0]), "3 layers (2 MoE, dense [0])");
    }

    #[test]
    fn argmax_ties_lowest() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }
}
