//! `cargo bench -p moe-xray-kernels --bench bf16_prefill [-- THREADS [N,N,...]]`: the two AVX-512
//! paths of bf16 × bf16 `x · Wᵀ` (`vdpbf16ps` on bf16 operands; f32 FMAs on weight panels widened
//! once, same bits), the session-11 version of the FMA path (`fma-s11`, a copy kept in
//! `benches/bf16_prefill/fma_s11.rs` for A/B) and what the model runs (`auto`: `xwt_same`, the FMA
//! path from `FMA_MIN_TOKENS` tokens on), at decode- and prefill-sized token counts n, on the
//! OLMoE-1B-7B shapes (k = 2048 → m = 1024: an expert's gate / up; 1024 → 2048: its down
//! projection; 2048 → 2048: attention).
//!
//! Median of 9 timings per cell, the paths interleaved within each repetition (the machine is
//! shared); GFLOP/s = 2·n·k·m / time. The ratio columns are medians of the per-repetition ratios
//! with their range (min–max), so a slow moment of the machine hits both sides. With
//! `BF16_BENCH_CLOCK=cpu` the time is the process's CPU time divided by the thread count (Linux
//! `/proc/self/task/*/schedstat`): on a machine shared with other jobs, time spent descheduled
//! does not count (rayon's idle spinning does, so multi-thread figures read low). With
//! `BF16_BENCH_COLD=1` every call reads another copy of the weights (1 GiB of copies per shape),
//! so the weights come from memory, as in the model's decode-sized expert calls.

use std::time::Instant;

use half::bf16;
use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::{xwt_bf16_path, xwt_same_with, Bf16Path, Kernel, FMA_MIN_TOKENS};

#[path = "bf16_prefill/fma_s11.rs"]
mod fma_s11;

/// CPU time of all threads of this process, in seconds (Linux), or `None`.
fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

fn main() {
    if Cpu::get().avx512_bf16().is_none() {
        println!("this CPU has no AVX-512 BF16: nothing to compare");
        return;
    }
    let threads_all = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Positional arguments only (`cargo bench` appends `--bench`).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let threads: Vec<usize> = match args.first().and_then(|a| a.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, threads_all],
    };
    let ns: Vec<usize> = args
        .get(1)
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 16, 24, 32, 48, 64, 128, 512]);
    let cpu_clock =
        std::env::var("BF16_BENCH_CLOCK").is_ok_and(|v| v == "cpu") && cpu_seconds().is_some();
    let cold = std::env::var("BF16_BENCH_COLD").is_ok_and(|v| v == "1");
    println!("CPU features: {}", Cpu::get().feature_names().join(" "));
    if cold {
        println!("cold weights: every call reads another copy (1 GiB in all, BF16_BENCH_COLD=1)");
    }
    if cpu_clock {
        println!("times: CPU time / threads (BF16_BENCH_CLOCK=cpu)");
    }
    println!("FMA_MIN_TOKENS = {FMA_MIN_TOKENS}; GFLOP/s, median of 9 (paths interleaved)");
    println!(
        "{:>5} {:>5} {:>5} {:>3} {:>7} {:>7} {:>7} {:>7} {:>17} {:>17}",
        "n", "k", "m", "thr", "dot", "fma", "fma-s11", "auto", "fma/dot", "fma/fma-s11"
    );
    // The pools live for the whole run (CPU time sums the live threads of the process).
    let pools: Vec<rayon::ThreadPool> = threads
        .iter()
        .map(|&th| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(th)
                .build()
                .expect("thread pool")
        })
        .collect();
    for &(k, m) in &[(2048usize, 1024usize), (1024, 2048), (2048, 2048)] {
        let w0: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
            .collect();
        // Cold weights: calls cycle through copies totalling 1 GiB, so that each call streams its
        // weights from memory as the model's expert calls do.
        let copies = if cold {
            (1usize << 30) / (2 * m * k)
        } else {
            1
        };
        let ws: Vec<Vec<bf16>> = (0..copies.max(1)).map(|_| w0.clone()).collect();
        let mut call = 0usize;
        for &n in &ns {
            let x: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 104729 % 997) as f32 - 498.0) * 1e-3))
                .collect();
            for (&th, pool) in threads.iter().zip(&pools) {
                let reps = (1_000_000_000usize / (2 * n * k * m)).clamp(1, 200);
                let mut times = vec![Vec::new(); 4];
                for _ in 0..9 {
                    for (p, ts) in times.iter_mut().enumerate() {
                        let (t, c) = (Instant::now(), cpu_seconds().filter(|_| cpu_clock));
                        pool.install(|| {
                            for _ in 0..reps {
                                let w = &ws[call % ws.len()];
                                call += 1;
                                let y = match p {
                                    0 => xwt_bf16_path(Bf16Path::Dot, &x, n, k, w, m),
                                    1 => xwt_bf16_path(Bf16Path::Fma, &x, n, k, w, m),
                                    // SAFETY: this CPU has AVX-512 BF16 (checked above), so
                                    // also AVX-512 F and BW.
                                    2 => Some(unsafe { fma_s11::xwt(&x, n, k, w, m) }),
                                    _ => Some(xwt_same_with(Kernel::Auto, &x, n, k, w, m)),
                                };
                                std::hint::black_box(y);
                            }
                        });
                        let dt = match (c, cpu_seconds()) {
                            (Some(c0), Some(c1)) => (c1 - c0) / th as f64,
                            _ => t.elapsed().as_secs_f64(),
                        };
                        ts.push(dt / reps as f64);
                    }
                }
                // Per-repetition ratios a/b (time of b over time of a): median, min, max.
                let ratio = |a: usize, b: usize| {
                    let mut r: Vec<f64> = (0..9).map(|i| times[b][i] / times[a][i]).collect();
                    r.sort_by(f64::total_cmp);
                    format!("{:.2} ({:.2}-{:.2})", r[4], r[0], r[8])
                };
                let (r_fd, r_fo) = (ratio(1, 0), ratio(1, 2));
                let rate: Vec<f64> = times
                    .iter()
                    .map(|ts| {
                        let mut ts = ts.clone();
                        ts.sort_by(f64::total_cmp);
                        2.0 * (n * k * m) as f64 / ts[ts.len() / 2] / 1e9
                    })
                    .collect();
                println!(
                    "{n:>5} {k:>5} {m:>5} {th:>3} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {r_fd:>17} {r_fo:>17}",
                    rate[0], rate[1], rate[2], rate[3]
                );
            }
        }
    }
}
