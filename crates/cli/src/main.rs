//! The `moe-xray` command-line tool. Only this binary uses `anyhow`; the library crates have
//! `thiserror` errors.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod cmd;
mod errors;
mod progress;

#[derive(Parser, Debug)]
#[command(name = "moe-xray", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute routing signatures, similarity statistics, baselines, classifiers from traces.
    Analyze(cmd::analyze::Args),
    /// Causal expert ablation: mask each category's characteristic experts in the router and measure the change in next-token NLL, top-1 agreement and routing against load-matched random experts.
    Ablate(cmd::ablate::Args),
    /// Run an MoE model on prompts and record the experts its router picks (routing traces).
    Trace(cmd::trace::Args),
    /// Write a random-weight MoE checkpoint (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, GPT-OSS, Granite-MoE) in the exact Hugging Face layout.
    SynthModel(cmd::synth_model::Args),
    /// The whole study in one command: trace, analyze, figures, HTML report.
    Run(cmd::run::Args),
    /// The whole study on an embedded synthetic model and the bundled paper80 prompts.
    Demo(cmd::demo::Args),
    /// Map step of a sharded analysis: one part of the traces' per-prompt counts (or, with
    /// --gram-sums, per-category Gram sums; with --health, also the health accumulator) -> a
    /// shard file.
    Map(cmd::map::Args),
    /// Merge step: shard files -> exactly the outputs of one `analyze` (and, with --health DIR,
    /// of one `health`) over all their traces.
    Merge(cmd::merge::Args),
    /// Routing health of a trace: expert load, entropy, dead experts, co-activation.
    Health(cmd::health::Args),
    /// Compare the routing of two runs (drift guard).
    Compare(cmd::compare::Args),
    /// Compare two or more models' routing on the same prompts across architectures (RSA, CKA, expert matching).
    CompareModels(cmd::compare_models::Args),
    /// Benchmark model execution with routing capture.
    Bench(cmd::bench::Args),
    /// Import routing recorded by serving engines (vLLM, SGLang) as a moe-xray trace.
    Import(cmd::import::Args),
    /// Convert a routing trace to a Parquet file or a Hive-partitioned Parquet dataset.
    Convert(cmd::convert::Args),
    /// Internal: renders chat templates in a memory- and time-limited child process (started by
    /// `trace` and `run`; see `moe_xray_model::chat`).
    #[command(name = "__render-chat-template", hide = true)]
    RenderChatTemplate,
}

fn main() {
    let cli = Cli::parse();
    // Parquet traces (files and datasets) for every command that reads traces.
    moe_xray_pipeline::install_trace_formats();
    let result = moe_xray_pipeline::outdir::check_rayon_env()
        .map_err(anyhow::Error::from)
        .and_then(|()| match cli.command {
            Command::Analyze(a) => cmd::analyze::run(a),
            Command::Ablate(a) => cmd::ablate::run(a),
            Command::Trace(a) => cmd::trace::run(a),
            Command::SynthModel(a) => cmd::synth_model::run(a),
            Command::Run(a) => cmd::run::run(a),
            Command::Demo(a) => cmd::demo::run(a),
            Command::Map(a) => cmd::map::run(a),
            Command::Merge(a) => cmd::merge::run(a),
            Command::Health(a) => cmd::health::run(a),
            Command::Compare(a) => cmd::compare::run(a),
            Command::CompareModels(a) => cmd::compare_models::run(a),
            Command::Bench(a) => cmd::bench::run(a),
            Command::Import(a) => cmd::import::run(a),
            Command::Convert(a) => cmd::convert::run(a),
            Command::RenderChatTemplate => moe_xray_model::chat::serve_render_request(
                std::io::stdin().lock(),
                std::io::stdout().lock(),
            )
            .map_err(Into::into),
        });
    if let Err(e) = result {
        // Each cause once: library errors print their OS error and also return it as source().
        eprintln!("error: {}", errors::error_chain(&e));
        std::process::exit(1);
    }
}
