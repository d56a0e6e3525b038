//! `cargo bench -p moe-xray-kernels --bench quant`: one expert projection with quantised weights
//! (ggml Q4_K, Q6_K, Q8_0, Q5_K, Q4_0 blocks) at OLMoE's (gate/up `[1024, 2048]`) and
//! Qwen3-30B-A3B's (`[768, 2048]`) expert shapes, for n = 1, 4, 8, 16, 32 and 128 tokens: moe-xray's kernel
//! (`quant::xwt_q`, best path of this CPU) against candle 0.11's `QMatMul` kept for the whole run
//! ("candle loaded") and built per call from the bytes (what the mapped residency did before
//! session 9, "candle per call"). Indicative: each figure is the fastest of the repetitions in 0.5 s
//! on the threads of the global rayon pool (`RAYON_NUM_THREADS`). Arguments (`-- q4_K q8_0`)
//! restrict the run to those types.

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
        let d = half::f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes();
        let at = if ty == QType::Q6K { 208 } else { 0 };
        b[at..at + 2].copy_from_slice(&d);
        if matches!(ty, QType::Q4K | QType::Q5K) {
            b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    data
}

fn ggml(ty: QType) -> GgmlDType {
    match ty {
        QType::Q8_0 => GgmlDType::Q8_0,
        QType::Q4_0 => GgmlDType::Q4_0,
        QType::Q4K => GgmlDType::Q4K,
        QType::Q5K => GgmlDType::Q5K,
        QType::Q6K => GgmlDType::Q6K,
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

fn main() -> candle_core::Result<()> {
    println!(
        "quant kernel path: {}; rayon threads: {}",
        kernel_name(),
        rayon::current_num_threads()
    );
    // `cargo bench --bench quant -- q4_K q8_0`: only those types.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
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
                let s = QStorage::from_data(Cow::Borrowed(d), &Device::Cpu, ggml(ty))?;
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
