//! `cargo bench -p moe-xray-kernels --bench matmul`: GFLOP/s of `x · Wᵀ` with bf16 weights
//! (the expert and attention projections of OLMoE-1B-7B) for the AVX-512 BF16 kernel (bf16
//! activations, where the CPU has it), the hand-written AVX2 kernel and widened panels through the
//! `gemm` crate, on 1 thread and on all threads.
//!
//! Shapes: k = 2048 → m = 1024 (an expert's gate / up), k = 1024 → m = 2048 (down), for token
//! counts n typical of a decode step (1–16 tokens per expert) and of prefill (64–256).
//!
//! It first measures this machine's roofline: peak f32 FMA throughput (12 independent AVX2 FMA
//! chains per thread; AVX-512: 12 chains of 16 lanes), peak bf16 dot-product throughput (12
//! independent `vdpbf16ps` chains, 64 flops each) and streaming read bandwidth (AVX2 sum over 1 GiB), on 1 thread and on all
//! threads; then the kernel on a 512 MiB bf16 weight (out of cache, as in a decode step) as
//! effective weight GB/s.
//!
//! `cargo bench -p moe-xray-kernels --bench matmul -- avx2 [THREADS] [N,N,...] [SHAPES]`: only the
//! AVX2 path of bf16 × bf16 `xwt_same` (what a bf16 model runs on a CPU without AVX-512 BF16)
//! against the session-2 AVX2 kernel (`s2`: the activations widened into a fresh `Vec`, then the
//! kernel kept in `benches/matmul/avx2_s2.rs`), same bits, at decode- and prefill-sized token
//! counts on the OLMoE-1B-7B shapes (SHAPES: `experts` (default: 2048→1024, 1024→2048,
//! 2048→2048) or `lm_head` (2048→50304)). Median of 9 timings per cell (7 from 200 tokens on),
//! the two interleaved; the ratio column is the median of the per-repetition ratios s2 / new with
//! their range. With `MATMUL_BENCH_COLD=1` every call reads another copy of the weights (512 MiB
//! of copies per shape): the weights come from memory, as in decode steps. With
//! `MATMUL_BENCH_CLOCK=cpu` the time is the process's CPU time divided by the thread count (Linux
//! `/proc/self/task/*/schedstat`): time spent descheduled on a shared machine does not count.

use std::time::Instant;

use half::bf16;
use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::{xwt_same_with, xwt_with, Elem, Kernel};

#[cfg(target_arch = "x86_64")]
#[path = "matmul/avx2_s2.rs"]
mod avx2_s2;

/// Peak GFLOP/s of one thread for AVX-512: (f32 FMA, bf16 dot product), 12 independent chains
/// each; zeros where the CPU lacks the feature.
#[cfg(target_arch = "x86_64")]
fn avx512_peaks_one_thread() -> (f64, f64) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    fn fma(iters: usize) -> f32 {
        let mut a = [_mm512_set1_ps(1.0); 12];
        let x = _mm512_set1_ps(0.999_999);
        let y = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, x, y);
            }
        }
        let mut t = _mm512_setzero_ps();
        for v in a {
            t = _mm512_add_ps(t, v);
        }
        _mm512_reduce_add_ps(t)
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dot(iters: usize) -> f32 {
        let mut a = [_mm512_set1_ps(1.0); 12];
        // SAFETY: both are 64-byte vectors of plain bits.
        let x = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3f80)) };
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, x, x);
            }
        }
        let mut t = _mm512_setzero_ps();
        for v in a {
            t = _mm512_add_ps(t, v);
        }
        _mm512_reduce_add_ps(t)
    }
    let iters = 20_000_000;
    let mut out = (0.0, 0.0);
    if is_x86_feature_detected!("avx512f") {
        let t = Instant::now();
        // SAFETY: AVX-512 F was detected.
        std::hint::black_box(unsafe { fma(iters) });
        out.0 = (iters * 12 * 16 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
    }
    if Cpu::get().avx512_bf16().is_some() {
        let t = Instant::now();
        // SAFETY: AVX-512 F and BF16 were detected.
        std::hint::black_box(unsafe { dot(iters) });
        out.1 = (iters * 12 * 32 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_peaks_one_thread() -> (f64, f64) {
    (0.0, 0.0)
}

/// Peak f32 GFLOP/s of one thread: 12 independent FMA chains of 8 lanes.
#[cfg(target_arch = "x86_64")]
fn fma_peak_one_thread() -> f64 {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma")]
    fn run(iters: usize) -> f32 {
        let mut a = [_mm256_set1_ps(1.0); 12];
        let x = _mm256_set1_ps(0.999_999);
        let y = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, x, y);
            }
        }
        let mut s = [0f32; 8];
        let mut t = _mm256_setzero_ps();
        for v in a {
            t = _mm256_add_ps(t, v);
        }
        // SAFETY: `s` holds 8 writable f32; `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), t) };
        s.iter().sum()
    }
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return 0.0;
    }
    let iters = 50_000_000;
    let t = Instant::now();
    // SAFETY: AVX2 and FMA were detected.
    std::hint::black_box(unsafe { run(iters) });
    (iters * 12 * 8 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_one_thread() -> f64 {
    0.0
}

/// Streaming read GB/s of `threads` threads over a 1 GiB buffer (best of 3).
fn read_bandwidth(buf: &[f32], threads: usize) -> f64 {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = pool.install(|| {
            buf.par_chunks(1 << 20)
                .map(|c| {
                    // Eight partial sums so the compiler vectorises (no FP reassociation needed).
                    let mut p = [0f32; 8];
                    for q in c.chunks_exact(8) {
                        for (a, b) in p.iter_mut().zip(q) {
                            *a += b;
                        }
                    }
                    p.iter().sum::<f32>()
                })
                .sum()
        });
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::mem::size_of_val(buf) as f64 / best / 1e9
}

fn roofline(threads_all: usize) {
    println!("roofline of this machine");
    let one = (0..3).map(|_| fma_peak_one_thread()).fold(0.0, f64::max);
    let all: f64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads_all)
            .map(|_| s.spawn(fma_peak_one_thread))
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    println!(
        "  peak f32 FMA (AVX2): {one:.1} GFLOP/s on 1 thread, {all:.1} GFLOP/s on {threads_all} threads"
    );
    println!("  CPU features: {}", Cpu::get().feature_names().join(" "));
    let best = |v: Vec<(f64, f64)>| {
        v.into_iter()
            .fold((0.0f64, 0.0f64), |a, b| (a.0.max(b.0), a.1.max(b.1)))
    };
    let (f1, d1) = best((0..3).map(|_| avx512_peaks_one_thread()).collect());
    let (fa, da): (f64, f64) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads_all)
            .map(|_| s.spawn(avx512_peaks_one_thread))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread"))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    println!(
        "  peak f32 FMA (AVX-512): {f1:.1} GFLOP/s on 1 thread, {fa:.1} GFLOP/s on {threads_all} threads"
    );
    println!(
        "  peak bf16 dot (vdpbf16ps): {d1:.1} GFLOP/s on 1 thread, {da:.1} GFLOP/s on {threads_all} threads"
    );
    let buf = vec![1f32; 1 << 28];
    let r1 = read_bandwidth(&buf, 1);
    let ra = read_bandwidth(&buf, threads_all);
    println!("  streaming read: {r1:.1} GB/s on 1 thread, {ra:.1} GB/s on {threads_all} threads");
    drop(buf);
    // The kernel on a weight far larger than the caches (decode-like: few tokens, every weight
    // byte read once from memory).
    let (k, m) = (2048usize, 131072usize);
    let w: Vec<bf16> = (0..m * k)
        .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
        .collect();
    for &n in &[1usize, 4, 10] {
        let x: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32((i % 13) as f32 * 1e-2))
            .collect();
        for kernel in [Kernel::Avx512, Kernel::Avx2] {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                std::hint::black_box(xwt_same_with(kernel, &x, n, k, &w, m));
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "  {kernel:?} kernel, 512 MiB bf16 weight, n = {n:>2}: {:.1} GB/s of weights, {:.1} GFLOP/s (all threads)",
                (m * k * 2) as f64 / best / 1e9,
                2.0 * (n * m * k) as f64 / best / 1e9
            );
        }
    }
}

/// CPU time of all threads of this process, in seconds (Linux), or `None`.
fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// The focused AVX2 bf16 comparison (see the top of this file).
fn avx2_mode(args: &[String]) {
    let Some(_) = Cpu::get().avx2_fma() else {
        println!("this CPU has no AVX2 + FMA + F16C: nothing to compare");
        return;
    };
    let threads_all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = match args.first().and_then(|a| a.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, threads_all],
    };
    let ns: Vec<usize> = args
        .get(1)
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 10, 16, 64, 200, 1743]);
    let shapes: &[(usize, usize)] = match args.get(2).map(String::as_str) {
        Some("lm_head") => &[(2048, 50304)],
        _ => &[(2048, 1024), (1024, 2048), (2048, 2048)],
    };
    let cold = std::env::var("MATMUL_BENCH_COLD").is_ok_and(|v| v == "1");
    let cpu_clock =
        std::env::var("MATMUL_BENCH_CLOCK").is_ok_and(|v| v == "cpu") && cpu_seconds().is_some();
    if cpu_clock {
        println!("times: CPU time / threads (MATMUL_BENCH_CLOCK=cpu)");
    }
    println!("CPU features: {}", Cpu::get().feature_names().join(" "));
    if cold {
        println!("cold weights: every call reads another copy (512 MiB per shape)");
    }
    println!("bf16 x bf16 on the AVX2 path; GFLOP/s, median (s2 and new interleaved)");
    println!(
        "{:>5} {:>5} {:>5} {:>3} {:>7} {:>7} {:>17}",
        "n", "k", "m", "thr", "s2", "new", "new/s2 speed"
    );
    let pools: Vec<rayon::ThreadPool> = threads
        .iter()
        .map(|&th| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(th)
                .build()
                .expect("thread pool")
        })
        .collect();
    for &(k, m) in shapes {
        let w0: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
            .collect();
        let copies = if cold {
            (1usize << 29) / (2 * m * k)
        } else {
            1
        };
        let ws: Vec<Vec<bf16>> = (0..copies.max(1)).map(|_| w0.clone()).collect();
        let mut call = 0usize;
        for &n in &ns {
            let x: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 104729 % 997) as f32 - 498.0) * 1e-3))
                .collect();
            let s2 = |w: &[bf16]| {
                let mut xf = vec![0f32; n * k];
                bf16::widen(&x, &mut xf);
                // SAFETY: AVX2, FMA and F16C were checked at the top.
                unsafe { avx2_s2::xwt(&xf, n, k, w, m) }
            };
            let reps_n = if n >= 200 { 7 } else { 9 };
            for (&th, pool) in threads.iter().zip(&pools) {
                let reps = (400_000_000usize / (2 * n * k * m)).clamp(1, 200);
                let mut times = vec![Vec::new(); 2];
                for _ in 0..reps_n {
                    for (p, ts) in times.iter_mut().enumerate() {
                        let (t, c) = (Instant::now(), cpu_seconds().filter(|_| cpu_clock));
                        pool.install(|| {
                            for _ in 0..reps {
                                let w = &ws[call % ws.len()];
                                call += 1;
                                let y = if p == 0 {
                                    s2(w)
                                } else {
                                    xwt_same_with(Kernel::Avx2, &x, n, k, w, m)
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
                let mut r: Vec<f64> = (0..reps_n).map(|i| times[0][i] / times[1][i]).collect();
                r.sort_by(f64::total_cmp);
                let rate: Vec<f64> = times
                    .iter()
                    .map(|ts| {
                        let mut ts = ts.clone();
                        ts.sort_by(f64::total_cmp);
                        2.0 * (n * k * m) as f64 / ts[ts.len() / 2] / 1e9
                    })
                    .collect();
                println!(
                    "{n:>5} {k:>5} {m:>5} {th:>3} {:>7.1} {:>7.1} {:>17}",
                    rate[0],
                    rate[1],
                    format!("{:.2} ({:.2}-{:.2})", r[reps_n / 2], r[0], r[reps_n - 1])
                );
            }
        }
    }
}

fn main() {
    // Positional arguments only (`cargo bench` appends `--bench`).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("avx2") {
        avx2_mode(&args[1..]);
        return;
    }
    let threads_all = std::thread::available_parallelism().map_or(1, |n| n.get());
    roofline(threads_all);
    println!(
        "x·Wᵀ, bf16 weights; avx512: bf16 activations (vdpbf16ps), avx2 / gemm: f32 activations;"
    );
    println!("GFLOP/s = 2·n·k·m / time (best of 5)");
    println!(
        "{:>5} {:>5} {:>5} {:>8} {:>10} {:>10} {:>10}",
        "n", "k", "m", "threads", "avx512", "avx2", "gemm"
    );
    for &(k, m) in &[(2048usize, 1024usize), (1024, 2048)] {
        let w: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4))
            .collect();
        for &n in &[1usize, 4, 16, 64, 256] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 104729 % 997) as f32 - 498.0) * 1e-3).to_f32())
                .collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            for threads in [1, threads_all] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let mut rates = Vec::new();
                for kernel in [Kernel::Avx512, Kernel::Avx2, Kernel::Gemm] {
                    let reps = (4_000_000_000usize / (2 * n * k * m)).clamp(1, 200);
                    let mut best = f64::INFINITY;
                    for _ in 0..5 {
                        let t = Instant::now();
                        pool.install(|| {
                            for _ in 0..reps {
                                if kernel == Kernel::Avx512 {
                                    std::hint::black_box(xwt_same_with(kernel, &xb, n, k, &w, m));
                                } else {
                                    std::hint::black_box(xwt_with(kernel, &x, n, k, &w, m));
                                }
                            }
                        });
                        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                    }
                    rates.push(2.0 * (n * k * m) as f64 / best / 1e9);
                }
                println!(
                    "{n:>5} {k:>5} {m:>5} {threads:>8} {:>10.1} {:>10.1} {:>10.1}",
                    rates[0], rates[1], rates[2]
                );
            }
        }
    }
}
