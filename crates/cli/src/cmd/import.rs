//! `moe-xray import vllm|sglang|hf INPUTS... --out DIR`: routing recorded by serving engines (or
//! Hugging Face router logits, routed by the family's rule) →
//! moe-xray's trace format (`trace.jsonl` + `manifest.json`), so that `analyze`, `health` and
//! `compare` run on it. What each source records and lacks: docs/trace-format.md, "Importing
//! routing from serving engines".

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use moe_xray_import::{sglang, vllm, ModelShape, Staged};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub engine: Engine,
}

#[derive(clap::Subcommand, Debug)]
pub enum Engine {
    /// vLLM `routed_experts`: .npy / .npz arrays [tokens, layers, top_k] (with --requests) or
    /// JSONL of OpenAI-compatible responses carrying prompt_routed_experts / routed_experts.
    Vllm(EngineArgs),
    /// SGLang: JSONL of /generate responses with meta_info.routed_experts (base64 int32), or
    /// expert-distribution recorder dumps (.pt; per_token, per_pass, stat).
    Sglang(EngineArgs),
    /// Hugging Face router logits (output_router_logits=True) saved as .safetensors
    /// (`router_logits.{i}`, optional `input_ids`, `attention_mask`) or .pt (torch.save of a dict
    /// with `router_logits`, the tuple transformers returns): routed by the family's rule from
    /// --config (required; DeepSeek-V3 also reads e_score_correction_bias from the safetensors
    /// beside it). --requests (optional) names the batch rows in order and gives prompt_tokens.
    Hf(EngineArgs),
}

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// Input files: .npy, .npz, .jsonl (one response per line), .pt (SGLang recorder dumps).
    #[arg(required = true, value_name = "INPUTS")]
    pub inputs: Vec<PathBuf>,
    /// Output directory (must not exist or be empty); receives trace.jsonl and manifest.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The model's config.json (or its directory): layers, dense layers, experts, top-k.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Requests file for .npy / .npz inputs: JSONL {"prompt_id", "prompt_tokens",
    /// "completion_tokens"?, "category"?} per request.
    #[arg(long, value_name = "FILE")]
    pub requests: Option<PathBuf>,
    /// Number of routed experts E (without --config).
    #[arg(long)]
    pub num_experts: Option<usize>,
    /// Layer dimension of the arrays (without --config; every layer is taken as an MoE layer).
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// Experts per token k (without --config, or when the config lacks num_experts_per_tok).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Model name recorded in the manifest (default: from the config).
    #[arg(long)]
    pub model_name: Option<String>,
    /// No summary line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Arrays,
    Jsonl,
    Pt,
    Safetensors,
}

fn kind(p: &Path) -> Result<Kind> {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let inner = p
        .file_stem()
        .map(Path::new)
        .and_then(|s| s.extension())
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    Ok(match ext.as_str() {
        "npy" | "npz" => Kind::Arrays,
        "jsonl" | "json" | "ndjson" => Kind::Jsonl,
        "gz" | "zst" if matches!(inner.as_str(), "jsonl" | "json" | "ndjson") => Kind::Jsonl,
        "pt" | "pth" => Kind::Pt,
        "safetensors" => Kind::Safetensors,
        _ => bail!(
            "{}: unknown input type (expected .npy, .npz, .jsonl, .jsonl.gz, .jsonl.zst, .pt or .safetensors)",
            p.display()
        ),
    })
}

fn shape(a: &EngineArgs) -> Result<ModelShape> {
    let mut s = match &a.config {
        Some(c) => {
            if a.num_experts.is_some() || a.num_layers.is_some() {
                bail!(
                    "--num-experts / --num-layers conflict with --config (the config gives them)"
                );
            }
            ModelShape::from_config(c)?
        }
        None => {
            let e = a
                .num_experts
                .context("give --config (the model's config.json) or --num-experts")?;
            if e == 0 || e > moe_xray_import::config::MAX_EXPERTS {
                bail!(
                    "--num-experts {e} must be in 1..={}",
                    moe_xray_import::config::MAX_EXPERTS
                );
            }
            if a.num_layers == Some(0) {
                bail!("--num-layers must be at least 1");
            }
            ModelShape::explicit(e, a.num_layers, None)
        }
    };
    match (s.top_k, a.top_k) {
        (Some(k0), Some(k)) if k0 != k => {
            bail!("--top-k {k} differs from the config's num_experts_per_tok = {k0}")
        }
        (_, Some(k)) => {
            if k == 0 || k > s.num_experts {
                bail!("--top-k {k} must be in 1..={}", s.num_experts);
            }
            s.top_k = Some(k)
        }
        _ => {}
    }
    if let Some(n) = &a.model_name {
        s.model = n.clone();
    }
    Ok(s)
}

/// `import hf`: every input is a router-logits file (.safetensors / .pt), in the given order.
fn run_hf(a: &EngineArgs, s: ModelShape) -> Result<()> {
    if a.config.is_none() {
        bail!("import hf needs --config (the model's config.json): the routing rule, dense layers and top-k are the family's");
    }
    if a.top_k.is_some() {
        bail!("import hf takes top-k from the config (num_experts_per_tok); drop --top-k");
    }
    let router = moe_xray_import::hf::HfRouter::load(&s)?;
    let mut staged = Staged::create(&a.out, s)?;
    moe_xray_import::hf::import(&mut staged, &router, &a.inputs, a.requests.as_deref())?;
    let sources: Vec<String> = a.inputs.iter().map(|p| p.display().to_string()).collect();
    let import = json!({
        "sources": sources,
        "source_format": "Hugging Face output_router_logits: one tensor per MoE layer [batch * seq, num_experts] (safetensors router_logits.{i}, or torch.save of the tuple), optional input_ids / attention_mask",
        "records": "expert ids and weights recovered with the family's routing rule (moe_xray_model::router::route) from the router logits",
        "lacks": ["probs (not written)", "prompt boundary and prompt ids unless --requests is given"],
    });
    let (out, st) = staged.finish("hf", import)?;
    if !a.quiet {
        eprintln!(
            "imported {} prompts ({} prompt tokens, {} generation tokens, {} padding tokens skipped) from hf router logits into {}",
            st.prompts,
            st.prompt_tokens,
            st.generation_tokens,
            st.padding_tokens,
            out.display()
        );
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let (engine, a) = match &args.engine {
        Engine::Vllm(a) => ("vllm", a),
        Engine::Sglang(a) => ("sglang", a),
        Engine::Hf(a) => ("hf", a),
    };
    let s = shape(a)?;
    let mut groups: [Vec<PathBuf>; 4] = Default::default();
    for p in &a.inputs {
        let k = kind(p)?;
        match (engine, k) {
            ("vllm", Kind::Pt) => bail!(
                "{}: .pt dumps are SGLang's expert-distribution recorder; use `import sglang`",
                p.display()
            ),
            ("sglang", Kind::Arrays) => bail!(
                "{}: .npy / .npz arrays are vLLM's routed_experts; use `import vllm`",
                p.display()
            ),
            ("hf", Kind::Arrays | Kind::Jsonl) => bail!(
                "{}: import hf reads router logits (.safetensors or .pt); engine outputs go to `import vllm` / `import sglang`",
                p.display()
            ),
            ("vllm" | "sglang", Kind::Safetensors) => bail!(
                "{}: .safetensors router logits are Hugging Face's; use `import hf`",
                p.display()
            ),
            _ => {}
        }
        groups[k as usize].push(p.clone());
    }
    if engine == "hf" {
        return run_hf(a, s);
    }
    let [arrays, jsonl, pt, _] = groups;
    if !arrays.is_empty() && a.requests.is_none() {
        bail!("--requests FILE is required with .npy / .npz inputs: the arrays do not record where each prompt ends");
    }
    let top_k = s.top_k;
    let hidden = s.num_hidden_layers;
    let mut staged = Staged::create(&a.out, s)?;
    let (format, records, lacks) = if engine == "vllm" {
        if let Some(r) = &a.requests {
            vllm::import_arrays(&mut staged, &arrays, r)?;
        }
        vllm::import_jsonl(&mut staged, &jsonl)?;
        (
            "routed_experts int32 [prompt_tokens + completion_tokens - 1, num_hidden_layers, top_k] (vllm/outputs.py CompletionOutput.routed_experts; OpenAI server: prompt_routed_experts + choices[].routed_experts)",
            "expert ids per token, decoder layer and top-k slot",
            json!(["router weights (trace has no weights: --weighted is unavailable)", "the last generated token (never forwarded)", "prompt boundary inside .npy/.npz arrays (taken from --requests)"]),
        )
    } else {
        if !jsonl.is_empty() {
            let layers = hidden.context(
                "SGLang's base64 arrays do not carry their shape: give --config or --num-layers",
            )?;
            let k = top_k.context("give --top-k (or a config with num_experts_per_tok)")?;
            sglang::import_jsonl(&mut staged, &jsonl, layers, k)?;
        }
        if !pt.is_empty() {
            let k = top_k.context(
                "give --top-k (or a config with num_experts_per_tok) to import recorder dumps",
            )?;
            sglang::import_pt(&mut staged, &pt, k)?;
        }
        (
            "meta_info.routed_experts base64 int32 [prompt_tokens + completion_tokens - 1, num_hidden_layers, top_k] (python/sglang/srt/layers/moe/routed_experts_capturer.py); recorder dumps of python/sglang/srt/eplb/expert_distribution.py",
            "expert ids per token, decoder layer and top-k slot (per_token dumps: per forward pass, physical ids mapped to logical)",
            json!(["router weights", "the last generated token (never forwarded)", "request ids in recorder dumps (each forward pass / step is one pseudo-prompt)"]),
        )
    };
    let sources: Vec<String> = a.inputs.iter().map(|p| p.display().to_string()).collect();
    let import = json!({
        "sources": sources,
        "source_format": format,
        "records": records,
        "lacks": lacks,
    });
    let (out, st) = staged.finish(engine, import)?;
    if a.quiet {
        return Ok(());
    }
    eprintln!(
        "imported {} prompts ({} prompt tokens, {} generation tokens, {} padding tokens skipped) from {engine} into {}",
        st.prompts,
        st.prompt_tokens,
        st.generation_tokens,
        st.padding_tokens,
        out.display()
    );
    Ok(())
}
