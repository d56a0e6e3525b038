//! `y = x · W` on the CPU for f32 activations and a row-major weight `W [k, m]` of bf16 / f16 /
//! f32 read in place: the layout GPT-OSS stores its experts in (`gate_up_proj [E, H, 2I]`,
//! `down_proj [E, I, H]`), so they can be multiplied straight from the memory-mapped checkpoint
//! instead of being transposed into RAM at load.
//!
//! Numerics: every output is the chain `acc = fma(x[kk], w[kk, j], acc)` for `kk = 0..k` from
//! `acc = 0` (weights widened exactly to f32). Each vector lane of the SIMD kernels carries one
//! output column through that very chain, so the AVX-512, AVX2 and generic paths all give the
//! same bits as [`xw_reference`], and a token's row never depends on the other rows (batch
//! invariance). Columns are split into panels of [`PANEL`] over rayon's threads; each output
//! element is computed by one thread, so results do not depend on the thread count either.
//!
//! The path is chosen from the CPU's features and capped by `MOE_XRAY_KERNEL` as in
//! [`crate::matmul`] (`avx512`, `avx2`, `generic`).

use rayon::prelude::*;

use crate::cpu::Cpu;
use crate::matmul::{env_kernel, Elem, Kernel};

/// Output columns per rayon task (a panel of 32 bf16 columns is one 64-byte line per weight row).
pub const PANEL: usize = 32;

/// A raw output pointer shared by the panel tasks; each task writes a disjoint set of columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above; no two tasks access the same element.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The scalar reference: `y [n, m] = x [n, k] · w [k, m]`, each output the fused multiply-add
/// chain over `kk = 0..k` in order, from 0. Slow (one output at a time).
pub fn xw_reference<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    check(x, n, k, w, m);
    let mut y = vec![0f32; n * m];
    for t in 0..n {
        for j in 0..m {
            let mut acc = 0f32;
            for kk in 0..k {
                acc = x[t * k + kk].mul_add(w[kk * m + j].to_f32(), acc);
            }
            y[t * m + j] = acc;
        }
    }
    y
}

/// Panics unless the operands hold `n × k` and `k × m` values and `n × m` fits in `usize`
/// (the bounds the unsafe kernels rely on).
fn check<T>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) {
    assert!(
        n.checked_mul(k).is_some_and(|v| x.len() >= v)
            && k.checked_mul(m).is_some_and(|v| w.len() >= v),
        "xw: operand sizes"
    );
    assert!(n.checked_mul(m).is_some(), "xw: output size overflows");
}

/// `y [n, m] = x [n, k] · w [k, m]` (f32 result, not rounded to `T`), on the best path of this
/// CPU capped by `MOE_XRAY_KERNEL`.
pub fn xw<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    xw_with(Kernel::Auto, x, n, k, w, m)
}

/// The path [`xw`] takes on this CPU: `"avx512"`, `"avx2-fma"` or `"generic"`.
pub fn xw_kernel_name() -> &'static str {
    match path(Kernel::Auto) {
        Path::Avx512 => "avx512",
        Path::Avx2 => "avx2-fma",
        Path::Generic => "generic",
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx512,
    Avx2,
    Generic,
}

fn path(kernel: Kernel) -> Path {
    let k = match kernel {
        Kernel::Auto => env_kernel().unwrap_or(Kernel::Avx512),
        k => k,
    };
    let cpu = Cpu::get();
    if k == Kernel::Avx512 && cpu.avx512_bf16().is_some() && cpu.avx2_fma().is_some() {
        Path::Avx512
    } else if matches!(k, Kernel::Avx512 | Kernel::Avx2) && cpu.avx2_fma().is_some() {
        Path::Avx2
    } else {
        Path::Generic
    }
}

/// [`xw`] with a chosen kernel (`Gemm` = the generic path; every path gives the same bits).
pub fn xw_with<T: Elem>(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
) -> Vec<f32> {
    check(x, n, k, w, m);
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let p = path(kernel);
    let out = OutPtr(y.as_mut_ptr());
    (0..m.div_ceil(PANEL)).into_par_iter().for_each(|q| {
        let c0 = q * PANEL;
        let c1 = (c0 + PANEL).min(m);
        #[cfg(target_arch = "x86_64")]
        if c1 - c0 == PANEL {
            match (p, Cpu::get().avx512_bf16(), Cpu::get().avx2_fma()) {
                (Path::Avx512, Some(t), Some(_)) => {
                    // SAFETY: the token proves AVX-512 F/BW (and the AVX2 token F16C); the sizes
                    // are checked above, c0 + PANEL <= m, and this task alone writes columns
                    // c0..c0 + PANEL of y (n × m, alive until the parallel loop ends).
                    unsafe { avx512::panel(t, x, n, k, w, m, c0, out.get()) };
                    return;
                }
                (Path::Avx2 | Path::Avx512, _, Some(t)) => {
                    // SAFETY: as above with the AVX2 + FMA + F16C token.
                    unsafe { avx2::panel(t, x, n, k, w, m, c0, out.get()) };
                    return;
                }
                _ => {}
            }
        }
        let _ = p;
        // SAFETY: c1 <= m and this task alone writes columns c0..c1 of y (n × m, alive).
        unsafe { generic_panel(x, n, k, w, m, c0, c1, out.get()) };
    });
    y
}

/// Columns `c0..c1` (at most [`PANEL`]) of `y`, portable code: the reference chain per output.
///
/// # Safety
/// `x` must hold `n × k` values, `w` `k × m`, `c0 <= c1 <= m`, `c1 - c0 <= PANEL`, and `y` must
/// point to `n × m` writable f32 that no other thread accesses in columns `c0..c1`.
#[allow(clippy::too_many_arguments)]
unsafe fn generic_panel<T: Elem>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
    c0: usize,
    c1: usize,
    y: *mut f32,
) {
    let width = c1 - c0;
    let mut acc = [0f32; PANEL];
    for t in 0..n {
        acc[..width].fill(0.0);
        let xr = &x[t * k..(t + 1) * k];
        for (kk, &xv) in xr.iter().enumerate() {
            let wr = &w[kk * m + c0..kk * m + c1];
            for (a, &wv) in acc[..width].iter_mut().zip(wr) {
                *a = xv.mul_add(wv.to_f32(), *a);
            }
        }
        for (j, &a) in acc[..width].iter().enumerate() {
            // SAFETY: t < n and c0 + j < c1 <= m, so the element is inside y and in this
            // task's columns (caller's contract).
            unsafe { *y.add(t * m + c0 + j) = a };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/xw.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/xw.rs"]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn all_paths<T: Elem>(w: &[T], n: usize, k: usize, m: usize, seed: u64) {
        let x = data(n * k, seed);
        let r = xw_reference(&x, n, k, w, m);
        for kern in [Kernel::Avx512, Kernel::Avx2, Kernel::Gemm, Kernel::Auto] {
            let y = xw_with(kern, &x, n, k, w, m);
            let same = y.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{kern:?} differs from the reference (n {n} k {k} m {m})"
            );
        }
    }

    #[test]
    fn every_path_matches_the_reference_bit_for_bit() {
        for &(n, k, m) in &[
            (1, 7, 32),
            (3, 64, 96),
            (5, 33, 70),
            (9, 130, 64),
            (2, 1, 31),
        ] {
            let wf = data(k * m, (n * 31 + k) as u64);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            all_paths(&wf, n, k, m, 1);
            all_paths(&wb, n, k, m, 2);
            all_paths(&wh, n, k, m, 3);
        }
    }

    #[test]
    fn reference_is_the_product() {
        // x = [[1, 2]], w = [[1, 2, 3], [4, 5, 6]] → [[9, 12, 15]].
        let y = xw_reference(&[1.0, 2.0], 1, 2, &[1f32, 2., 3., 4., 5., 6.], 3);
        assert_eq!(y, vec![9.0, 12.0, 15.0]);
        let y = xw(&[1.0, 2.0], 1, 2, &[1f32, 2., 3., 4., 5., 6.], 3);
        assert_eq!(y, vec![9.0, 12.0, 15.0]);
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch_or_thread_count() {
        let (k, m) = (200, 160);
        let w: Vec<bf16> = data(k * m, 9).iter().map(|&v| bf16::from_f32(v)).collect();
        let x = data(7 * k, 4);
        let all = xw(&x, 7, k, &w, m);
        for t in 0..7 {
            let one = xw(&x[t * k..(t + 1) * k], 1, k, &w, m);
            assert_eq!(one, all[t * m..(t + 1) * m].to_vec(), "row {t}");
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let single = pool.install(|| xw(&x, 7, k, &w, m));
        assert_eq!(single, all);
    }

    #[test]
    #[should_panic(expected = "xw: operand sizes")]
    fn short_operands_are_refused() {
        let _ = xw(&[0f32; 3], 2, 2, &[0f32; 4], 2);
    }
}
