//! `cargo bench -p moe-xray-kernels --bench quant_vnni`: the AVX2 quantised tile with AVX-VNNI
//! (`vpdpbusd` / `vpdpwssd` on 256-bit registers) against the same tile without it (forced with
//! `Cpu::without_avx_vnni`), both with AVX-512 switched off (`Cpu::without_avx512`), in one
//! process: one expert projection at OLMoE's gate/up shape `[1024, 2048]` and its down shape
//! `[2048, 1024]` for Q8_0, Q4_K and Q6_K, n = 1, 4, 8, 32 and 128 tokens, weights hot in the
//! caches, on the threads of the global rayon pool (`RAYON_NUM_THREADS`).
//!
//! The two paths are timed in alternation (ROUNDS rounds; each figure is the fastest of the
//! repetitions in 0.1 s), and the speed-up is reported as the median of the per-round ratios
//! with their range, so that other processes on a shared machine affect both sides alike. Both
//! paths give the same bits (checked here before timing). Arguments (`-- q4_K q8_0`) restrict
//! the run to those types. On a CPU without AVX-VNNI it says so and exits.

use std::time::Instant;

use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::Kernel;
use moe_xray_kernels::quant::{xwt_q_on, QMatrix, QType};
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 7;

fn random_matrix(ty: QType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; rows * k / ty.block_values() * ty.block_bytes()];
    rng.fill(&mut data[..]);
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        let d = half::f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes();
        let at = if ty == QType::Q6K { 208 } else { 0 };
        b[at..at + 2].copy_from_slice(&d);
        if ty == QType::Q4K {
            b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    data
}

/// The fastest of the repetitions in 0.1 s.
fn time(f: &mut dyn FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut best = f64::INFINITY;
    while t.elapsed().as_secs_f64() < 0.1 {
        let r = Instant::now();
        f();
        best = best.min(r.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cpu = Cpu::get().without_avx512();
    if cpu.avx_vnni().is_none() || cpu.avx2().is_none() {
        println!(
            "bench quant_vnni: this CPU has no AVX-VNNI (features: {:?})",
            Cpu::get().feature_names()
        );
        return;
    }
    let plain = cpu.without_avx_vnni();
    println!(
        "quant AVX2 tile, AVX-VNNI vs plain AVX2; CPU features {:?}; rayon threads {}; {ROUNDS} interleaved rounds",
        Cpu::get().feature_names(),
        rayon::current_num_threads()
    );
    for ty in [QType::Q8_0, QType::Q4K, QType::Q6K] {
        if !only.is_empty() && !only.iter().any(|o| o == ty.name()) {
            continue;
        }
        for (label, rows, k) in [("gate/up", 1024usize, 2048usize), ("down", 2048, 1024)] {
            let data = random_matrix(ty, rows, k, 1);
            let Some(w) = QMatrix::new(ty, &data, rows, k) else {
                eprintln!("bench quant_vnni: inconsistent shape");
                std::process::exit(1);
            };
            for n in [1usize, 4, 8, 32, 128] {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
                let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let a = xwt_q_on(plain, Kernel::Avx2, &x, n, &w);
                let b = xwt_q_on(cpu, Kernel::Avx2, &x, n, &w);
                if a.iter()
                    .map(|v| v.to_bits())
                    .ne(b.iter().map(|v| v.to_bits()))
                {
                    eprintln!("bench quant_vnni: {} n={n}: the paths differ", ty.name());
                    std::process::exit(1);
                }
                let (mut ta, mut tb, mut ratios) = (f64::INFINITY, f64::INFINITY, Vec::new());
                for _ in 0..ROUNDS {
                    let ra = time(&mut || {
                        std::hint::black_box(xwt_q_on(plain, Kernel::Avx2, &x, n, &w));
                    });
                    let rb = time(&mut || {
                        std::hint::black_box(xwt_q_on(cpu, Kernel::Avx2, &x, n, &w));
                    });
                    ta = ta.min(ra);
                    tb = tb.min(rb);
                    ratios.push(ra / rb);
                }
                ratios.sort_by(f64::total_cmp);
                println!(
                    "{:5} {label:7} [{rows}, {k}] n={n:3}: avx2 {:8.1} us | avx2-vnni {:8.1} us | speed-up {:.2}x (rounds {:.2}-{:.2})",
                    ty.name(),
                    ta * 1e6,
                    tb * 1e6,
                    ratios[ROUNDS / 2],
                    ratios[0],
                    ratios[ROUNDS - 1],
                );
            }
        }
    }
}
