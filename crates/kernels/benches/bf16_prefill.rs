//! `cargo bench -p moe-xray-kernels --bench bf16_prefill [-- THREADS]`: the two AVX-512 paths of
//! bf16 × bf16 `x · Wᵀ` (`vdpbf16ps` on bf16 operands; f32 FMAs on weight panels widened once,
//! same bits) and the AVX2 + FMA kernel, at decode- and prefill-sized token counts n, on the
//! OLMoE-1B-7B shapes (k = 2048 → m = 1024: an expert's gate / up; 2048 → 2048: attention).
//!
//! Median of 9 timings per cell, the paths interleaved within each repetition (the machine is
//! shared); GFLOP/s = 2·n·k·m / time. The `auto` column is `xwt_same` (what the model runs: the
//! FMA path from `FMA_MIN_TOKENS` tokens on).

use std::time::Instant;

use half::bf16;
use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::{xwt_bf16_path, xwt_same_with, Bf16Path, Kernel, FMA_MIN_TOKENS};

fn main() {
    if Cpu::get().avx512_bf16().is_none() {
        println!("this CPU has no AVX-512 BF16: nothing to compare");
        return;
    }
    let threads_all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = match std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, threads_all],
    };
    println!("CPU features: {}", Cpu::get().feature_names().join(" "));
    println!("FMA_MIN_TOKENS = {FMA_MIN_TOKENS}; GFLOP/s, median of 9 (paths interleaved)");
    println!(
        "{:>5} {:>5} {:>5} {:>3} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "n", "k", "m", "thr", "dot", "fma", "avx2", "auto", "fma/dot"
    );
    for &(k, m) in &[(2048usize, 1024usize), (2048, 2048)] {
        let w: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
            .collect();
        for &n in &[1usize, 8, 16, 32, 48, 64, 128, 512] {
            let x: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 104729 % 997) as f32 - 498.0) * 1e-3))
                .collect();
            for &th in &threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(th)
                    .build()
                    .expect("thread pool");
                let reps = (1_000_000_000usize / (2 * n * k * m)).clamp(1, 200);
                let mut times = vec![Vec::new(); 4];
                for _ in 0..9 {
                    for (p, ts) in times.iter_mut().enumerate() {
                        let t = Instant::now();
                        pool.install(|| {
                            for _ in 0..reps {
                                let y = match p {
                                    0 => xwt_bf16_path(Bf16Path::Dot, &x, n, k, &w, m),
                                    1 => xwt_bf16_path(Bf16Path::Fma, &x, n, k, &w, m),
                                    2 => Some(xwt_same_with(Kernel::Avx2, &x, n, k, &w, m)),
                                    _ => Some(xwt_same_with(Kernel::Auto, &x, n, k, &w, m)),
                                };
                                std::hint::black_box(y);
                            }
                        });
                        ts.push(t.elapsed().as_secs_f64() / reps as f64);
                    }
                }
                let rate: Vec<f64> = times
                    .iter_mut()
                    .map(|ts| {
                        ts.sort_by(f64::total_cmp);
                        2.0 * (n * k * m) as f64 / ts[ts.len() / 2] / 1e9
                    })
                    .collect();
                println!(
                    "{n:>5} {k:>5} {m:>5} {th:>3} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2}",
                    rate[0],
                    rate[1],
                    rate[2],
                    rate[3],
                    rate[1] / rate[0]
                );
            }
        }
    }
}
