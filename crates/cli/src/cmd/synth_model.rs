//! `moe-xray synth-model`: write a random-weight OLMoE checkpoint in the exact Hugging Face layout.
//!
//! The construction (initialisation scales, tokenizer, `--planted` classes) is documented in
//! `moe_xray_model::synth`.

use std::path::PathBuf;

use anyhow::Context;
use moe_xray_model::synth::{self, SynthDtype, SynthSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output checkpoint directory (must not exist, be empty, or be an earlier synthetic checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Base shape: tiny (vocab 512, 2 layers, 8 experts), small (OLMo tokenizer, 4 layers, 16 experts),
    /// olmoe-1b-7b (the full OLMoE-1B-7B shape, bf16, 3 shards).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
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
    /// Renormalise the top-k router weights (`norm_topk_prob: true`).
    #[arg(long)]
    pub norm_topk_prob: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No summary line and no progress.
    #[arg(long)]
    pub quiet: bool,
}

/// The checkpoint specification the arguments describe.
pub fn spec_from_args(a: &Args) -> anyhow::Result<SynthSpec> {
    let mut s = SynthSpec::preset(&a.preset)?;
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
    s.norm_topk_prob = a.norm_topk_prob;
    s.validate()?;
    Ok(s)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let spec = spec_from_args(&a)?;
    // The checkpoint is written to a temporary sibling and renamed into place as a whole; the
    // lock beside it keeps a second writer out.
    let _lock = moe_xray_pipeline::outdir::OutLock::acquire_beside(&a.out)?;
    let t0 = std::time::Instant::now();
    let progress = crate::progress::spinner(
        a.quiet,
        &format!(
            "synth-model: writing {} parameters ({} layers x {} experts, {})",
            spec.num_parameters(),
            spec.num_layers,
            spec.num_experts,
            spec.dtype.torch_name()
        ),
    );
    let summary = synth::write_checkpoint(&spec, &a.out)
        .with_context(|| format!("writing synthetic checkpoint to {}", a.out.display()))?;
    drop(progress);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !a.quiet {
        println!(
            "wrote {} ({} parameters, {} layers x {} experts top-{}, {}, {} weight bytes, tokenizer: {}{}) in {:.1} s",
            summary.out_dir.display(),
            summary.num_parameters,
            spec.num_layers,
            spec.num_experts,
            spec.top_k,
            spec.dtype.torch_name(),
            summary.weight_bytes,
            summary.tokenizer,
            if spec.planted { ", planted" } else { "" },
            t0.elapsed().as_secs_f64()
        );
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
