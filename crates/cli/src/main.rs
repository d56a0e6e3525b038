//! The `moe-xray` command-line tool. Only this binary uses `anyhow`; the library crates have
//! `thiserror` errors.

use clap::{Parser, Subcommand};

mod cmd;

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
    /// Run an MoE model on prompts and record the experts its router picks (routing traces).
    Trace(cmd::trace::Args),
    /// Write a random-weight OLMoE checkpoint in the exact Hugging Face layout.
    SynthModel(cmd::synth_model::Args),
    /// The whole study in one command: trace, analyze, figures, HTML report.
    Run(cmd::run::Args),
    /// The whole study on an embedded synthetic model and the bundled paper80 prompts.
    Demo(cmd::demo::Args),
    /// Routing health of a trace: expert load, entropy, dead experts, co-activation.
    Health(cmd::health::Args),
    /// Compare the routing of two runs (drift guard).
    Compare(cmd::compare::Args),
    /// Benchmark model execution with routing capture.
    Bench(cmd::bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(a) => cmd::analyze::run(a),
        Command::Trace(a) => cmd::trace::run(a),
        Command::SynthModel(a) => cmd::synth_model::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Health(a) => cmd::health::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
