//! The AVX2 path of `xwt` / `xwt_same` (session 13: aligned buffers, widened panels, register
//! blocks by token count) against the session-2 kernel it replaced (`benches/matmul/avx2_s2.rs`)
//! on random data: the same bits for bf16, f16 and f32 weights at decode- and prefill-like shapes.

#![cfg(target_arch = "x86_64")]

use half::{bf16, f16};
use moe_xray_kernels::cpu::Cpu;
use moe_xray_kernels::matmul::{kernel_name, xwt_same_with, xwt_with, Elem, Kernel};
use rand::{Rng, SeedableRng};

#[path = "../benches/matmul/avx2_s2.rs"]
mod avx2_s2;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check<T: Elem>(narrow: impl Fn(&[f32]) -> Vec<T>) {
    if Cpu::get().avx2_fma().is_none() {
        eprintln!("skipped: this CPU has no AVX2 + FMA + F16C");
        return;
    }
    for (c, &(n, k, m)) in [
        (1usize, 2048usize, 100usize),
        (2, 1024, 97),
        (8, 2048, 64),
        (10, 1030, 150),
        (16, 2049, 49),
        (17, 2048, 50),
        (70, 1023, 101),
        (203, 2056, 53),
    ]
    .iter()
    .enumerate()
    {
        let xs = T::narrow(&random(n * k, 300 + c as u64));
        let mut xf = vec![0f32; n * k];
        T::widen(&xs, &mut xf);
        let w = narrow(&random(m * k, 400 + c as u64));
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        let old = bits(&unsafe { avx2_s2::xwt(&xf, n, k, &w, m) });
        assert_eq!(
            bits(&xwt_with(Kernel::Avx2, &xf, n, k, &w, m)),
            old,
            "{n}x{k}x{m}"
        );
        // f32 activations with all their bits (inexact products).
        let xr = random(n * k, 500 + c as u64);
        // SAFETY: as above.
        let old_r = bits(&unsafe { avx2_s2::xwt(&xr, n, k, &w, m) });
        assert_eq!(bits(&xwt_with(Kernel::Avx2, &xr, n, k, &w, m)), old_r);
        // What the model runs (`Auto`), where it is this path (not the AVX-512 BF16 kernel,
        // not a `MOE_XRAY_KERNEL=generic` cap).
        if kernel_name(T::KIND) == "avx2-fma" {
            let same = xwt_same_with(Kernel::Auto, &xs, n, k, &w, m);
            assert_eq!(bits(&same), old, "auto {n}x{k}x{m}");
        }
        assert_eq!(bits(&xwt_same_with(Kernel::Avx2, &xs, n, k, &w, m)), old);
    }
}

#[test]
fn new_avx2_path_equals_the_session2_kernel_bf16() {
    check::<bf16>(bf16::narrow);
}

#[test]
fn new_avx2_path_equals_the_session2_kernel_f16() {
    check::<f16>(f16::narrow);
}

#[test]
fn new_avx2_path_equals_the_session2_kernel_f32() {
    check::<f32>(|v| v.to_vec());
}
