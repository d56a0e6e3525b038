//! `moe-xray synth-model`: write a random-weight checkpoint of any supported MoE family in the
//! exact Hugging Face layout.
//!
//! The construction (tensor table, initialisation scales, tokenizer, `--planted` classes, the
//! presets and their sources) is documented in `moe_xray_model::synth`.

use std::path::PathBuf;

use anyhow::Context;
use moe_xray_model::synth::{self, SynthDtype, SynthSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output checkpoint directory (must not exist, be empty, or be an earlier synthetic checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Model family (transformers `model_type`): olmoe, mixtral, qwen2_moe, qwen3_moe,
    /// deepseek_v2, deepseek_v3, gpt_oss, granitemoe. Without --preset: the family's tiny preset
    /// (olmoe: `tiny`). With --preset it must be the preset's family. Default: olmoe.
    #[arg(long)]
    pub family: Option<String>,
    /// Base shape. OLMoE: tiny (vocab 512, 2 layers, 8 experts), small (OLMo tokenizer, 4 layers,
    /// 16 experts), olmoe-1b-7b. Tiny test shapes of the other families (vocab 512, hidden 64,
    /// 2-3 layers): tiny-mixtral, tiny-qwen2-moe, tiny-qwen3-moe, tiny-deepseek-v2,
    /// tiny-deepseek-v3, tiny-gpt-oss, tiny-granitemoe. Published shapes (bf16): mixtral-8x7b,
    /// qwen1.5-moe-a2.7b, qwen3-30b-a3b, deepseek-v2-lite, moonlight-16b-a3b (deepseek_v3),
    /// gpt-oss-20b, granite-3.0-3b-a800m. Default: the tiny preset of --family.
    #[arg(long)]
    pub preset: Option<String>,
    /// Number of layers (overrides the preset).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Number of experts per layer.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts selected per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA when smaller than --heads; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size (>= 50280 uses the OLMo tokenizer, smaller a project byte-level tokenizer).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Weight dtype: f32, bf16 or f16 (default: the preset's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Positive control: router made sensitive to token classes (math, code, question, narrative).
    #[arg(long)]
    pub planted: bool,
    /// Number of safetensors shards (default: the preset's).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Output format: safetensors (a Hugging Face checkpoint directory) or gguf (one llama.cpp
    /// GGUF file; --out is then the file name, ending in .gguf).
    #[arg(long, default_value = "safetensors")]
    pub format: String,
    /// GGUF tensor types (--format gguf): f32, bf16, q8_0 (as llama.cpp's converter writes
    /// them), q4_k_m (llama-quantize's Q4_K_M mix: Q4_K with Q6_K for the output and some
    /// attn_v / ffn_down tensors) or mxfp4 (gpt_oss: the routed experts as ggml MXFP4, the rest
    /// in --dtype with norms, router, biases and sinks F32, as llama.cpp's converter writes the
    /// MXFP4 checkpoint of the same arguments, with the same expert values). Default: bf16.
    /// With --format safetensors only `mxfp4` (gpt_oss presets): the routed experts as MXFP4
    /// `*_blocks` / `*_scales` with `quantization_config` in config.json, everything else in
    /// --dtype (gpt-oss-20b: bf16), the published openai/gpt-oss layout; the experts are the
    /// same seed's values quantised (`--preset gpt-oss-20b --quant mxfp4` is about 13.8 GB).
    #[arg(long)]
    pub quant: Option<String>,
    /// Renormalise the top-k router weights (`norm_topk_prob: true`; olmoe, qwen2_moe,
    /// qwen3_moe, deepseek_v3; mixtral always renormalises).
    #[arg(long)]
    pub norm_topk_prob: bool,
    /// After writing, load the checkpoint with moe-xray's model, run 8 short texts (code, math,
    /// story, factual; 4 generated tokens each) and print the experts used and the max/mean
    /// expert load of every MoE layer (slow for the published shapes).
    #[arg(long)]
    pub routing: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No summary line and no progress.
    #[arg(long)]
    pub quiet: bool,
}

/// The checkpoint specification the arguments describe.
pub fn spec_from_args(a: &Args) -> anyhow::Result<SynthSpec> {
    let family = a.family.as_deref().map(synth::parse_family).transpose()?;
    let preset = match (&a.preset, family) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => synth::tiny_preset(f).to_string(),
        (None, None) => "tiny".to_string(),
    };
    let mut s = SynthSpec::preset(&preset)?;
    if let Some(f) = family {
        if f != s.family {
            anyhow::bail!(
                "--preset {preset} is a {} checkpoint but --family is {}: give one of them, or \
                 a preset of that family ({})",
                s.family.model_type(),
                f.model_type(),
                synth::PRESET_FAMILIES
                    .iter()
                    .filter(|(_, pf)| *pf == f)
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let heads_given = a.heads.is_some();
    if let Some(v) = a.layers {
        s.num_layers = v;
    }
    if let Some(v) = a.experts {
        s.num_experts = v;
    }
    if let Some(v) = a.top_k {
        s.top_k = v;
    }
    if let Some(v) = a.hidden {
        s.hidden_size = v;
    }
    if let Some(v) = a.intermediate {
        s.intermediate_size = v;
    }
    if let Some(v) = a.heads {
        s.num_heads = v;
    }
    match a.kv_heads {
        Some(v) => s.num_kv_heads = v,
        None if heads_given => s.num_kv_heads = s.num_heads,
        None => {}
    }
    if let Some(v) = a.vocab {
        s.vocab_size = v;
    }
    if let Some(d) = &a.dtype {
        s.dtype = SynthDtype::parse(d)?;
    }
    if let Some(v) = a.shards {
        s.shards = v;
    }
    s.seed = a.seed;
    s.planted = a.planted;
    if a.format == "gguf"
        && a.quant
            .as_deref()
            .is_some_and(|q| q.eq_ignore_ascii_case("mxfp4"))
    {
        // the file is the conversion of the HF MXFP4 checkpoint of the same arguments
        s.mxfp4_experts = true;
    }
    if a.format == "safetensors" {
        match a.quant.as_deref() {
            None => {}
            Some(q) if q.eq_ignore_ascii_case("mxfp4") => s.mxfp4_experts = true,
            Some(q) => anyhow::bail!(
                "--quant {q} needs --format gguf (safetensors checkpoints take only --quant mxfp4, \
                 for gpt_oss)"
            ),
        }
    }
    if a.norm_topk_prob {
        s.norm_topk_prob = true;
    }
    s.validate()?;
    Ok(s)
}

/// `--format gguf`: the GGUF file (see `moe_xray_model::synth_gguf`).
fn run_gguf(a: &Args, spec: &SynthSpec) -> anyhow::Result<()> {
    use moe_xray_model::synth_gguf::{self, GgufQuant};
    let quant = GgufQuant::parse(a.quant.as_deref().unwrap_or("bf16"))?;
    if a.shards.is_some() || (a.dtype.is_some() && quant != GgufQuant::Mxfp4) {
        anyhow::bail!(
            "--dtype and --shards are safetensors options; with --format gguf give --quant \
             (--dtype only with --quant mxfp4: the dtype of the tensors it leaves unquantised)"
        );
    }
    let _lock = moe_xray_pipeline::outdir::OutLock::acquire_beside(&a.out)?;
    let t0 = std::time::Instant::now();
    let progress = crate::progress::spinner(
        a.quiet,
        &format!(
            "synth-model: writing {} {} parameters ({} layers x {} experts) as GGUF {}",
            spec.family.model_type(),
            spec.num_parameters(),
            spec.num_layers,
            spec.num_experts,
            quant.name()
        ),
    );
    let summary = synth_gguf::write_gguf(spec, quant, &a.out)
        .with_context(|| format!("writing synthetic GGUF {}", a.out.display()))?;
    drop(progress);
    let elapsed = t0.elapsed().as_secs_f64();
    let routing = routing_check(a)?;
    if a.json {
        print_json(&summary, routing.as_ref())?;
    } else if !a.quiet {
        let types: Vec<String> = summary
            .tensor_types
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        println!(
            "wrote {} ({} as GGUF `{}`, {}, {} parameters, {} layers x {} experts top-{}, {} bytes, tensors: {}, tokenizer: {}{}) in {:.1} s",
            summary.path.display(),
            summary.model_type,
            summary.arch,
            summary.quant,
            summary.num_parameters,
            spec.num_layers,
            spec.num_experts,
            spec.top_k,
            summary.file_bytes,
            types.join(", "),
            summary.tokenizer,
            if spec.planted { ", planted" } else { "" },
            elapsed
        );
        if let Some(r) = &routing {
            print_routing(r);
        }
    }
    Ok(())
}

/// `--routing`: the routing check of the model just written (`None` without the flag).
fn routing_check(a: &Args) -> anyhow::Result<Option<Vec<synth::LayerRouting>>> {
    if !a.routing {
        return Ok(None);
    }
    let p = crate::progress::spinner(a.quiet, "synth-model: routing check");
    let r = synth::routing_summary(&a.out, &synth::ROUTING_TEXTS, 4)
        .with_context(|| format!("routing check of {}", a.out.display()))?;
    drop(p);
    Ok(Some(r))
}

/// `--json`: the write summary, with the routing check under `routing` when there is one.
fn print_json(
    summary: &impl serde::Serialize,
    routing: Option<&Vec<synth::LayerRouting>>,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(summary)?;
    if let Some(r) = routing {
        v["routing"] = serde_json::to_value(r)?;
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn print_routing(r: &[synth::LayerRouting]) {
    println!("layer  experts_used  max/mean_load  selections");
    for l in r {
        println!(
            "{:5}  {:>12}  {:13.2}  {:10}",
            l.layer,
            format!("{}/{}", l.experts_used, l.num_experts),
            l.max_over_mean_load,
            l.selections
        );
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let spec = spec_from_args(&a)?;
    match a.format.as_str() {
        "safetensors" => {}
        "gguf" => return run_gguf(&a, &spec),
        other => anyhow::bail!("unknown --format `{other}` (safetensors or gguf)"),
    }
    // The checkpoint is written to a temporary sibling and renamed into place as a whole; the
    // lock beside it keeps a second writer out.
    let _lock = moe_xray_pipeline::outdir::OutLock::acquire_beside(&a.out)?;
    let t0 = std::time::Instant::now();
    let progress = crate::progress::spinner(
        a.quiet,
        &format!(
            "synth-model: writing {} {} parameters ({} layers x {} experts, {}{})",
            spec.family.model_type(),
            spec.num_parameters(),
            spec.num_layers,
            spec.num_experts,
            spec.dtype.torch_name(),
            if spec.mxfp4_experts {
                ", MXFP4 experts"
            } else {
                ""
            }
        ),
    );
    let summary = synth::write_checkpoint(&spec, &a.out)
        .with_context(|| format!("writing synthetic checkpoint to {}", a.out.display()))?;
    drop(progress);
    let elapsed = t0.elapsed().as_secs_f64();
    let routing = routing_check(&a)?;
    if a.json {
        print_json(&summary, routing.as_ref())?;
    } else if !a.quiet {
        println!(
            "wrote {} ({}, {} parameters, {} layers x {} experts top-{}, {}{}, {} weight bytes, tokenizer: {}{}) in {:.1} s",
            summary.out_dir.display(),
            summary.model_type,
            summary.num_parameters,
            spec.num_layers,
            spec.num_experts,
            spec.top_k,
            spec.dtype.torch_name(),
            if spec.mxfp4_experts {
                " with MXFP4 experts"
            } else {
                ""
            },
            summary.weight_bytes,
            summary.tokenizer,
            if spec.planted { ", planted" } else { "" },
            elapsed
        );
        if let Some(r) = &routing {
            print_routing(r);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: Args,
    }

    fn spec(argv: &[&str]) -> anyhow::Result<SynthSpec> {
        let mut v = vec!["synth-model"];
        v.extend_from_slice(argv);
        spec_from_args(&Wrap::try_parse_from(v)?.args)
    }

    #[test]
    fn presets_and_overrides() {
        let s = spec(&["--out", "x", "--preset", "olmoe-1b-7b"]).unwrap();
        assert_eq!(
            (s.hidden_size, s.num_experts, s.top_k, s.shards),
            (2048, 64, 8, 3)
        );
        assert_eq!(s.dtype, SynthDtype::Bf16);
        let s = spec(&[
            "--out",
            "x",
            "--layers",
            "3",
            "--experts",
            "12",
            "--top-k",
            "3",
            "--heads",
            "8",
        ])
        .unwrap();
        assert_eq!((s.num_layers, s.num_experts, s.top_k), (3, 12, 3));
        // --heads without --kv-heads means plain multi-head attention
        assert_eq!((s.num_heads, s.num_kv_heads), (8, 8));
        let s = spec(&[
            "--out",
            "x",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--dtype",
            "f16",
            "--seed",
            "9",
        ])
        .unwrap();
        assert_eq!((s.num_kv_heads, s.dtype, s.seed), (2, SynthDtype::F16, 9));
        let s = spec(&[
            "--out",
            "x",
            "--planted",
            "--shards",
            "2",
            "--norm-topk-prob",
        ])
        .unwrap();
        assert!(s.planted && s.norm_topk_prob);
        assert_eq!(s.shards, 2);
    }

    #[test]
    fn family_and_preset_choose_the_checkpoint() {
        use moe_xray_model::config::Family;
        // default: the OLMoE tiny preset
        let s = spec(&["--out", "x"]).unwrap();
        assert_eq!((s.family, s.num_layers), (Family::Olmoe, 2));
        // --family alone: that family's tiny preset (hyphens or underscores)
        for (f, want) in [
            ("mixtral", Family::Mixtral),
            ("qwen2-moe", Family::Qwen2Moe),
            ("qwen3_moe", Family::Qwen3Moe),
            ("deepseek_v2", Family::DeepseekV2),
            ("deepseek-v3", Family::DeepseekV3),
            ("gpt_oss", Family::GptOss),
            ("granitemoe", Family::GraniteMoe),
        ] {
            let s = spec(&["--out", "x", "--family", f]).unwrap();
            assert_eq!(s.family, want, "{f}");
            assert_eq!(s.vocab_size, 512, "{f}");
        }
        // --preset alone: the preset's family, its own norm_topk_prob kept
        let s = spec(&["--out", "x", "--preset", "qwen3-30b-a3b"]).unwrap();
        assert_eq!(
            (s.family, s.num_experts, s.top_k),
            (Family::Qwen3Moe, 128, 8)
        );
        assert!(s.norm_topk_prob);
        // both, agreeing
        let s = spec(&[
            "--out",
            "x",
            "--family",
            "gpt_oss",
            "--preset",
            "gpt-oss-20b",
            "--layers",
            "2",
        ])
        .unwrap();
        assert_eq!((s.family, s.num_layers), (Family::GptOss, 2));
        // both, contradicting: one error naming the preset's family and the family's presets
        let e = spec(&[
            "--out",
            "x",
            "--family",
            "mixtral",
            "--preset",
            "qwen3-30b-a3b",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("qwen3_moe") && e.contains("mixtral-8x7b"), "{e}");
        let e = spec(&["--out", "x", "--family", "llama"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown --family") && e.contains("granitemoe"),
            "{e}"
        );
        let e = spec(&["--out", "x", "--family", "gpt_oss", "--norm-topk-prob"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--norm-topk-prob"), "{e}");
        let e = spec(&["--out", "x", "--family", "mixtral", "--planted"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--planted"), "{e}");
    }

    #[test]
    fn help_lists_every_preset_and_family() {
        use clap::CommandFactory;
        let help = Wrap::command().render_long_help().to_string();
        for p in synth::PRESETS {
            assert!(help.contains(p), "--help does not list preset {p}");
        }
        for f in moe_xray_model::config::SUPPORTED_MODEL_TYPES {
            assert!(help.contains(f), "--help does not list family {f}");
        }
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let e = spec(&["--out", "x", "--preset", "huge"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown preset"), "{e}");
        let e = spec(&["--out", "x", "--dtype", "f64"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("f64"), "{e}");
        let e = spec(&["--out", "x", "--heads", "8", "--kv-heads", "3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--kv-heads"), "{e}");
        assert!(spec(&["--out", "x", "--experts", "0"]).is_err());
    }

    #[test]
    fn quant_mxfp4_is_for_gpt_oss_safetensors() {
        let s = spec(&["--out", "x", "--family", "gpt_oss", "--quant", "mxfp4"]).unwrap();
        assert!(s.mxfp4_experts);
        let s = spec(&["--out", "x", "--preset", "gpt-oss-20b", "--quant", "MXFP4"]).unwrap();
        assert!(s.mxfp4_experts && s.dtype == SynthDtype::Bf16);
        assert!(
            !spec(&["--out", "x", "--family", "gpt_oss"])
                .unwrap()
                .mxfp4_experts
        );
        let e = spec(&["--out", "x", "--family", "mixtral", "--quant", "mxfp4"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mxfp4") && e.contains("mixtral"), "{e}");
        let e = spec(&["--out", "x", "--family", "gpt_oss", "--quant", "q8_0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--format gguf"), "{e}");
        let e = spec(&[
            "--out", "x", "--family", "gpt_oss", "--quant", "mxfp4", "--hidden", "48",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of 32"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.gguf");
        let w = Wrap::try_parse_from([
            "synth-model",
            "--out",
            out.to_str().unwrap(),
            "--family",
            "gpt_oss",
            "--format",
            "gguf",
            "--quant",
            "mxfp4",
        ])
        .unwrap();
        run(w.args).unwrap();
        let f = moe_xray_model::gguf::GgufFile::open(&out).unwrap();
        assert!(f.is_mxfp4("blk.0.ffn_up_exps.weight"));
        // GGUF MXFP4 is gpt_oss only, and --dtype is for mxfp4 only
        let gguf = |extra: &[&str]| {
            let mut v = vec![
                "synth-model",
                "--out",
                out.to_str().unwrap(),
                "--format",
                "gguf",
            ];
            v.extend_from_slice(extra);
            let w = Wrap::try_parse_from(v).unwrap();
            run(w.args).unwrap_err().to_string()
        };
        let e = gguf(&["--family", "mixtral", "--quant", "mxfp4"]);
        assert!(e.contains("mixtral"), "{e}");
        let e = gguf(&["--family", "gpt_oss", "--quant", "mxfp4", "--hidden", "48"]);
        assert!(e.contains("multiple of 32"), "{e}");
        let e = gguf(&["--family", "gpt_oss", "--quant", "q8_0", "--dtype", "bf16"]);
        assert!(e.contains("--dtype"), "{e}");
    }

    #[test]
    fn run_writes_a_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let w = Wrap::try_parse_from([
            "synth-model",
            "--out",
            out.to_str().unwrap(),
            "--layers",
            "1",
        ])
        .unwrap();
        run(w.args).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
    }
}
