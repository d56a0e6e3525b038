//! `cargo bench -p moe-xray-kernels --bench mxfp4`: time of one gpt-oss-20b gate_up projection
//! (5760 × 2880, MXFP4 weights read from the packed bytes) against the bf16 kernel on the same
//! shape and the dequantised values, for n = 1, 8 and 64 tokens, with the packed weights'
//! effective GB/s. Indicative: each figure is the mean over ≥ 1 s of repetitions.

use std::time::Instant;

use moe_xray_kernels::matmul::{xwt, Elem};
use moe_xray_kernels::mxfp4::{xwt_mxfp4, MxLayout, MxMatrix, BLOCK, NIBBLE_BYTES};
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
        let a = time(&|| xwt_mxfp4(&x, n, &w));
        let c = time(&|| xwt(&x, n, k, &wb, m));
        println!(
            "n={n}: mxfp4 {:.2} ms ({:.1} GB/s of packed weights), bf16 {:.2} ms",
            a * 1e3,
            (m * k) as f64 * 17.0 / 32.0 / a / 1e9,
            c * 1e3
        );
    }
}
