//! `cargo bench -p moe-xray-kernels --bench quant`: one expert projection with quantised weights
//! (ggml Q4_K, Q6_K, Q8_0, Q5_K, Q4_0 blocks) at OLMoE's (gate/up `[1024, 2048]`) and
//! Qwen3-30B-A3B's (`[768, 2048]`) expert shapes, for n = 1, 4, 8, 16, 32 and 128 tokens: moe-xray's kernel
//! (`quant::xwt_q`, best path of this CPU) against candle 0.11's `QMatMul` kept for the whole run
//! ("candle loaded") and built per call from the bytes (what the mapped residency did before
//! session 9, "candle per call"). Indicative: each figure is the fastest of the repetitions in 0.5 s
//! on the threads of the global rayon pool (`RAYON_NUM_THREADS`). Arguments (`-- q4_K q8_0`)
//! restrict the run to those types.
//!
//! `cargo bench -p moe-xray-kernels --bench quant -- decode [types]`: the decode case instead. A
//! decode step calls each selected expert with 1–2 tokens and reads its weights from memory, so
//! this cycles through a pool of distinct expert matrices (768 MiB per type, far beyond the
//! caches) of OLMoE's expert shapes (gate / up `[1024, 2048]`, down `[2048, 1024]`), for Q8_0,
//! Q4_K and Q6_K (the types of Q8_0 and Q4_K_M files' experts), Q5_K (Q5_K_M files), Q4_0 and
//! MXFP4 (gpt-oss GGUF experts), n = 1, 2 and 8 (8: a decode step's attention projections at 8
//! prompts), on rayon pools of 1
//! and 2 threads: GB/s of weights per call ("cold"), the same calls on one matrix ("hot", from the
//! caches), on a quarter of it ("L2": the compute alone) and, before them, a streaming read of the
//! same pool (the bandwidth roof). `QUANT_BENCH_THREADS=1` (or 2): that pool size only.
//!
//! `cargo bench -p moe-xray-kernels --bench quant -- decode-l2 TYPE ROWS K N SECONDS`: the fastest
//! call on one matrix from the caches, for that long, on a pool of `QUANT_BENCH_THREADS` threads
//! (default 1): for a profiler, and for A/B comparisons that the other processes of a shared
//! machine disturb least. `QUANT_BENCH_OUTSIDE=1`: each call made from outside the pool (as a
//! caller that is not a rayon task: the work handed to the pool's threads and waited for).

use std::borrow::Cow;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use moe_xray_kernels::quant::{kernel_name, xwt_q, QMatrix, QType};
use rand::{Rng, SeedableRng};

fn random_matrix(ty: QType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; rows * k / ty.block_values() * ty.block_bytes()];
    rng.fill(&mut data[..]);
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        if ty == QType::Mxfp4 {
            // E8M0 2^−10 .. 2^−2.
            b[0] = rng.random_range(118u8..=126);
            continue;
        }
        let d = half::f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes();
        let at = if ty == QType::Q6K { 208 } else { 0 };
        b[at..at + 2].copy_from_slice(&d);
        if matches!(ty, QType::Q4K | QType::Q5K) {
            b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    data
}

/// candle's type for `ty` (none for MXFP4, which candle's quantised matmul does not have).
fn ggml(ty: QType) -> Option<GgmlDType> {
    match ty {
        QType::Q8_0 => Some(GgmlDType::Q8_0),
        QType::Q4_0 => Some(GgmlDType::Q4_0),
        QType::Q4K => Some(GgmlDType::Q4K),
        QType::Q5K => Some(GgmlDType::Q5K),
        QType::Q6K => Some(GgmlDType::Q6K),
        QType::Mxfp4 => None,
    }
}

/// The fastest of the repetitions in 0.5 s (robust to other processes on a shared machine).
fn time(f: &mut dyn FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut best = f64::INFINITY;
    while t.elapsed().as_secs_f64() < 0.5 {
        let r = Instant::now();
        f();
        best = best.min(r.elapsed().as_secs_f64());
    }
    best
}

/// Bytes per second of a plain read of `buf` on the current rayon pool (sum of u64 words).
fn stream_read(buf: &[u8]) -> f64 {
    use rayon::prelude::*;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 20)
            .map(|c| {
                let mut p = [0u64; 8];
                for q in c.chunks_exact(64) {
                    for (a, b) in p.iter_mut().zip(q.chunks_exact(8)) {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(b);
                        *a = a.wrapping_add(u64::from_le_bytes(w));
                    }
                }
                p.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    buf.len() as f64 / best
}

/// The decode case (module docs): pools of distinct matrices, n = 1 and 2, 1 and 2 threads.
fn decode(only: &[String]) {
    const POOL: usize = 768 << 20;
    println!(
        "decode: quant kernel path {}; pool {} MiB of distinct matrices per type",
        kernel_name(),
        POOL >> 20
    );
    for ty in QType::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == ty.name()) {
            continue;
        }
        let per = 2048 * 1024 / ty.block_values() * ty.block_bytes();
        let count = POOL / per;
        let data = random_matrix(ty, 1024 * count, 2048, 7);
        // `QUANT_BENCH_THREADS=1`: only that pool size.
        let threads_only: Option<usize> = std::env::var("QUANT_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok());
        for threads in [1usize, 2] {
            if threads_only.is_some_and(|t| t != threads) {
                continue;
            }
            let Ok(pool) = rayon::ThreadPoolBuilder::new().num_threads(threads).build() else {
                eprintln!("bench quant: no thread pool");
                std::process::exit(1);
            };
            pool.install(|| {
                let roof = stream_read(&data);
                print!(
                    "{:5} {threads} thread(s): streaming read {:5.1} GB/s;",
                    ty.name(),
                    roof / 1e9
                );
                for (label, rows, k) in [("gate/up", 1024usize, 2048usize), ("down", 2048, 1024)] {
                    let mats: Vec<QMatrix<'_>> = data
                        .chunks_exact(per)
                        .filter_map(|d| QMatrix::new(ty, d, rows, k))
                        .collect();
                    for n in [1usize, 2, 8] {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
                        let x: Vec<f32> =
                            (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                        let mut cold = f64::INFINITY;
                        for _ in 0..4 {
                            let t = Instant::now();
                            for w in &mats {
                                std::hint::black_box(xwt_q(&x, n, w));
                            }
                            cold = cold.min(t.elapsed().as_secs_f64() / mats.len() as f64);
                        }
                        let hot = time(&mut || {
                            std::hint::black_box(xwt_q(&x, n, &mats[0]));
                        });
                        // A quarter of the matrix: from L2, the compute alone.
                        let quarter = &data[..per / 4];
                        let l2 = QMatrix::new(ty, quarter, rows / 4, k).map_or(0.0, |w| {
                            time(&mut || {
                                std::hint::black_box(xwt_q(&x, n, &w));
                            })
                        });
                        print!(
                            " | {label} n={n}: cold {:6.1} us {:5.1} GB/s, hot {:6.1} us, L2 {:5.1} GB/s",
                            cold * 1e6,
                            per as f64 / cold / 1e9,
                            hot * 1e6,
                            quarter.len() as f64 / l2 / 1e9
                        );
                    }
                }
                println!();
            });
        }
    }
}

/// `decode-l2 TYPE ROWS K N SECONDS`: one quarter-size matrix from the caches, called for that
/// long (for a profiler).
fn decode_l2(args: &[String]) {
    let num = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let ty = args
        .first()
        .and_then(|a| QType::from_name(a))
        .unwrap_or(QType::Q8_0);
    let (rows, k, n, secs) = (num(1, 256), num(2, 2048), num(3, 1), num(4, 3));
    let data = random_matrix(ty, rows, k, 7);
    let Some(w) = QMatrix::new(ty, &data, rows, k) else {
        eprintln!("bench quant: inconsistent shape");
        std::process::exit(1);
    };
    let x: Vec<f32> = (0..n * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
    // Called from inside a pool of `QUANT_BENCH_THREADS` threads (default 1), as from a rayon task.
    let threads = std::env::var("QUANT_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let Ok(pool) = rayon::ThreadPoolBuilder::new().num_threads(threads).build() else {
        eprintln!("bench quant: no thread pool");
        std::process::exit(1);
    };
    // The fastest call (robust to other processes on a shared machine).
    let run = || {
        let t = Instant::now();
        let mut best = f64::INFINITY;
        while t.elapsed().as_secs_f64() < secs as f64 {
            let c = Instant::now();
            std::hint::black_box(xwt_q(&x, n, &w));
            best = best.min(c.elapsed().as_secs_f64());
        }
        best
    };
    // `QUANT_BENCH_OUTSIDE=1`: called from this (non-pool) thread into that pool, as a caller
    // outside rayon does (each call then hands its work to the pool's threads and waits).
    let per = if std::env::var("QUANT_BENCH_OUTSIDE").is_ok_and(|v| v == "1") {
        let t = Instant::now();
        let mut best = f64::INFINITY;
        while t.elapsed().as_secs_f64() < secs as f64 {
            let c = Instant::now();
            std::hint::black_box(pool.install(|| xwt_q(&x, n, &w)));
            best = best.min(c.elapsed().as_secs_f64());
        }
        best
    } else {
        pool.install(run)
    };
    println!(
        "{} [{rows}, {k}] n={n}: {:.2} us per call (fastest), {:.1} GB/s",
        ty.name(),
        per * 1e6,
        data.len() as f64 / per / 1e9
    );
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if args.first().is_some_and(|a| a == "decode-l2") {
        decode_l2(&args[1..]);
        return Ok(());
    }
    if args.first().is_some_and(|a| a == "decode") {
        decode(&args[1..]);
        return Ok(());
    }
    println!(
        "quant kernel path: {}; rayon threads: {}",
        kernel_name(),
        rayon::current_num_threads()
    );
    // `cargo bench --bench quant -- q4_K q8_0`: only those types.
    let only = args;
    for ty in [QType::Q4K, QType::Q6K, QType::Q8_0, QType::Q5K, QType::Q4_0] {
        if !only.is_empty() && !only.iter().any(|o| o == ty.name()) {
            continue;
        }
        for (label, rows, k) in [("olmoe", 1024usize, 2048usize), ("qwen3", 768, 2048)] {
            let data = random_matrix(ty, rows, k, 1);
            let Some(w) = QMatrix::new(ty, &data, rows, k) else {
                eprintln!("bench quant: inconsistent shape");
                std::process::exit(1);
            };
            let qt = |d: &[u8]| -> candle_core::Result<QMatMul> {
                let Some(gt) = ggml(ty) else {
                    return Err(candle_core::Error::Msg(format!(
                        "candle has no {}",
                        ty.name()
                    )));
                };
                let s = QStorage::from_data(Cow::Borrowed(d), &Device::Cpu, gt)?;
                QMatMul::from_qtensor(QTensor::new(s, (rows, k))?)
            };
            let loaded = qt(&data)?;
            for n in [1usize, 4, 8, 16, 32, 128] {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
                let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let xt = Tensor::from_slice(&x, (n, k), &Device::Cpu)?;
                let ours = time(&mut || {
                    std::hint::black_box(xwt_q(&x, n, &w));
                });
                let mut err = None;
                let cl = time(&mut || {
                    if let Err(e) = loaded.forward(&xt) {
                        err = Some(e);
                    }
                });
                let cp = time(&mut || match qt(&data).and_then(|m| m.forward(&xt)) {
                    Ok(y) => {
                        std::hint::black_box(y);
                    }
                    Err(e) => err = Some(e),
                });
                if let Some(e) = err {
                    return Err(e);
                }
                println!(
                    "{:5} {label} [{rows}, {k}] n={n:2}: ours {:7.3} ms ({:5.1} GB/s of weights) | candle loaded {:7.3} ms ({:4.1}x) | candle per call {:7.3} ms ({:4.1}x)",
                    ty.name(),
                    ours * 1e3,
                    data.len() as f64 / ours / 1e9,
                    cl * 1e3,
                    cl / ours,
                    cp * 1e3,
                    cp / ours,
                );
            }
        }
    }
    Ok(())
}
