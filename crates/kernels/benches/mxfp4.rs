//! `cargo bench -p moe-xray-kernels --bench mxfp4`: time of one gpt-oss-20b gate_up projection
//! (5760 × 2880, MXFP4 weights read from the packed bytes) against the bf16 kernel on the same
//! shape and the dequantised values, for n = 1, 8 and 64 tokens, with the packed weights'
//! effective GB/s. The MXFP4 kernel is timed on each of its SIMD paths this CPU has (AVX-512,
//! then AVX2 forced with `Cpu::without_avx512`), in the same process; `MOE_XRAY_KERNEL` caps
//! them. Indicative: each figure is the mean over ≥ 1 s of repetitions.

use std::time::Instant;

use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::{xwt, Elem};
use moe_xray_kernels::mxfp4::{mxfp4_path, xwt_mxfp4_on, MxLayout, MxMatrix, BLOCK, NIBBLE_BYTES};
use rand::{Rng, SeedableRng};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

fn main() {
    let (k, m) = (2880, 5760);
    let nb = m * k / BLOCK;
    let blocks = random_bytes(nb * NIBBLE_BYTES, 1);
    // Scales in a range where the products stay finite.
    let scales: Vec<u8> = random_bytes(nb, 2)
        .into_iter()
        .map(|b| 100 + b % 40)
        .collect();
    let Some(w) = MxMatrix::new(
        MxLayout::Hf {
            blocks: &blocks,
            scales: &scales,
        },
        m,
        k,
    ) else {
        eprintln!("bench mxfp4: inconsistent shape");
        std::process::exit(1);
    };
    let wb = half::bf16::narrow(&w.dequantize());
    for n in [1usize, 8, 64] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let time = |f: &dyn Fn() -> Vec<f32>| {
            let t = Instant::now();
            let mut reps = 0u32;
            while t.elapsed().as_secs_f64() < 1.0 {
                std::hint::black_box(f());
                reps += 1;
            }
            t.elapsed().as_secs_f64() / f64::from(reps)
        };
        let c = time(&|| xwt(&x, n, k, &wb, m));
        let mut cpus = vec![Cpu::get()];
        if mxfp4_path(Cpu::get()) == "avx512" {
            cpus.push(Cpu::get().without_avx512());
        }
        for cpu in cpus {
            let a = time(&|| xwt_mxfp4_on(cpu, &x, n, &w));
            println!(
                "n={n}: mxfp4 [{}] {:.2} ms ({:.1} GB/s of packed weights, {:.2}x bf16), bf16 {:.2} ms",
                mxfp4_path(cpu),
                a * 1e3,
                (m * k) as f64 * 17.0 / 32.0 / a / 1e9,
                a / c,
                c * 1e3
            );
        }
    }
}
