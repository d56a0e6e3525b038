//! Times the three null baselines alone on the `bench analyze` data (80 prompts × 16 layers × 64
//! experts, k = 8, 64 tokens per prompt), for profiling:
//!
//! ```text
//! cargo build --release -p moe-xray-stats --example bench_baselines
//! RAYON_NUM_THREADS=1 REPS=50 valgrind --tool=cachegrind target/release/examples/bench_baselines Marg
//! ```
//!
//! Arguments select baselines by a substring of their name (`Perm`, `Uniform`, `Marg`; none: all
//! three); `REPS` sets the repetitions (default 1000).
use moe_xray_stats::baselines::{run_baseline, Baseline};
use moe_xray_stats::bench::{synthetic_rows, SynthShape};
use moe_xray_stats::input::build_input;

fn main() {
    let shape = SynthShape {
        prompts: 80,
        categories: 4,
        layers: 16,
        experts: 64,
        top_k: 8,
        tokens: 64,
        seed: 0,
    };
    let input = build_input(16, 64, 8, false, synthetic_rows(&shape)).expect("valid shape");
    let which: Vec<String> = std::env::args().skip(1).collect();
    let reps = std::env::var("REPS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(1000);
    for b in [
        Baseline::Permutation,
        Baseline::LoadBalanceUniform,
        Baseline::LoadBalanceMarginal,
    ] {
        if !which.is_empty() && !which.iter().any(|w| format!("{b:?}").contains(w.as_str())) {
            continue;
        }
        let t0 = std::time::Instant::now();
        let r = run_baseline(b, &input, reps, 0);
        println!(
            "{b:?} {:.3} s  mean {:.6} std {:.6} pair_std {:.6}",
            t0.elapsed().as_secs_f64(),
            r.mean,
            r.std,
            r.pair_std
        );
    }
}
