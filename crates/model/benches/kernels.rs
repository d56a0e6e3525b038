//! `cargo bench -p moe-xray-model --bench kernels`: GFLOP/s of `x · Wᵀ` with bf16 weights
//! (the expert and attention projections of OLMoE-1B-7B) for the hand-written AVX2 kernel and for
//! widened panels through the `gemm` crate, on 1 thread and on all threads.
//!
//! Shapes: k = 2048 → m = 1024 (an expert's gate / up), k = 1024 → m = 2048 (down), for token
//! counts n typical of a decode step (1–16 tokens per expert) and of prefill (64–256).

use std::time::Instant;

use half::bf16;
use moe_xray_model::cpu_kernels::{xwt_with, Kernel};

fn main() {
    let threads_all = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("x·Wᵀ, bf16 weights, f32 activations; GFLOP/s = 2·n·k·m / time (best of 5)");
    println!(
        "{:>5} {:>5} {:>5} {:>8} {:>10} {:>10}",
        "n", "k", "m", "threads", "avx2", "gemm"
    );
    for &(k, m) in &[(2048usize, 1024usize), (1024, 2048)] {
        let w: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
            .collect();
        for &n in &[1usize, 4, 16, 64, 256] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-3)
                .collect();
            for threads in [1, threads_all] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let mut rates = Vec::new();
                for kernel in [Kernel::Avx2, Kernel::Gemm] {
                    let reps = (4_000_000_000usize / (2 * n * k * m)).clamp(1, 200);
                    let mut best = f64::INFINITY;
                    for _ in 0..5 {
                        let t = Instant::now();
                        pool.install(|| {
                            for _ in 0..reps {
                                std::hint::black_box(xwt_with(kernel, &x, n, k, &w, m));
                            }
                        });
                        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                    }
                    rates.push(2.0 * (n * k * m) as f64 / best / 1e9);
                }
                println!(
                    "{n:>5} {k:>5} {m:>5} {threads:>8} {:>10.1} {:>10.1}",
                    rates[0], rates[1]
                );
            }
        }
    }
}
