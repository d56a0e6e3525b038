//! `y = x · Wᵀ` on the CPU for f32 activations and bf16 / f16 / f32 weights read in place: the
//! hot path of the model's forward pass (`moe-xray-model`'s `cpu_kernels.rs` plugs it into
//! candle).
//!
//! Two implementations, both splitting the output columns into panels over rayon's threads (each
//! output element is computed by one thread, in an order that does not depend on the thread
//! count or on the other rows, so results are deterministic and batch-invariant):
//! - the hand-written AVX2 + FMA kernel (`arch/x86_64/avx2/matmul.rs`; blocks of 3 weight rows ×
//!   4 tokens, eight f32 lanes per accumulator, a fixed-order horizontal sum). Its scalar
//!   reference is [`xwt_reference`] (the same fused multiply-adds and additions in the same
//!   order; test `avx2_matches_its_scalar_reference_bit_for_bit`);
//! - weight panels widened to f32 into a per-thread buffer (it stays in L2) and multiplied by the
//!   `gemm` crate's f32 kernel (what candle uses): the path of CPUs without AVX2 / FMA.
//!
//! Why hand-written: candle 0.11's CPU matmul has no bf16 / f16 kernel; it widens both whole
//! operands to fresh f32 vectors on every call, which made decoding on the full OLMoE shape ~10×
//! slower than memory bandwidth allows (`docs/performance.md`).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::Cpu;

/// Elements of one f32 weight panel of the `gemm` path: 128 Ki f32 = 512 KiB, half of this
/// machine's L2 per core.
const PANEL_ELEMS: usize = 128 * 1024;

/// Which element type an [`Elem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    Bf16,
    F16,
    F32,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for f32 {}
}

/// Element types of the CPU kernels: bf16, f16 and f32 (sealed: the kernels rely on the layout).
pub trait Elem: Copy + Send + Sync + 'static + sealed::Sealed {
    const KIND: ElemKind;
    /// One value as f32 (exact).
    fn to_f32(self) -> f32;
    /// Widens `src` into `dst` (same length; exact).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds an f32 to this type and back (identity for f32).
    fn round(x: f32) -> f32;
    /// Narrows f32 values to this type (round to nearest even).
    fn narrow(src: &[f32]) -> Vec<Self>;

    /// `bytes` (native-endian, as stored in a safetensors file on a little-endian machine) as
    /// values, or `None` when the length is not a whole number of values or the address is not
    /// aligned for `Self`.
    fn from_bytes(bytes: &[u8]) -> Option<&[Self]> {
        let size = std::mem::size_of::<Self>();
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<Self>())
            || !bytes.len().is_multiple_of(size)
        {
            return None;
        }
        // SAFETY: the address is aligned and the length a whole number of values (checked
        // above); bf16, f16 and f32 (the only implementors: the trait is sealed) have no invalid
        // bit patterns; the result borrows `bytes`, so the memory outlives it.
        Some(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<Self>(), bytes.len() / size)
        })
    }
}

impl Elem for bf16 {
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    #[inline]
    fn round(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        let mut o = vec![bf16::ZERO; src.len()];
        o.convert_from_f32_slice(src);
        o
    }
}

impl Elem for f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    #[inline]
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        let mut o = vec![f16::ZERO; src.len()];
        o.convert_from_f32_slice(src);
        o
    }
}

impl Elem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline]
    fn round(x: f32) -> f32 {
        x
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        src.to_vec()
    }
}

/// A raw output pointer shared by the panel tasks; each task writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer is never read through by two tasks at the same place.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Which implementation [`xwt_with`] uses (for benchmarks; the model always uses `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX2 when the CPU has it, else `Gemm`.
    Auto,
    /// The hand-written AVX2 + FMA kernel (falls back to `Gemm` where unavailable).
    Avx2,
    /// Weight panels widened to f32 and multiplied by the `gemm` crate.
    Gemm,
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` with f32 `x` and weights of type `T`: the AVX2 + FMA kernel
/// for any weight type where the CPU has it, else panels converted for `gemm`.
pub fn xwt<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    xwt_with(Kernel::Auto, x, n, k, w, m)
}

/// [`xwt`] with a chosen kernel.
pub fn xwt_with<T: Elem>(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
) -> Vec<f32> {
    let (nk, mk) = (n.checked_mul(k), m.checked_mul(k));
    assert!(
        nk.is_some_and(|v| x.len() >= v) && mk.is_some_and(|v| w.len() >= v),
        "xwt: operand sizes"
    );
    assert!(n.checked_mul(m).is_some(), "xwt: output size overflows");
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), true) = (Cpu::get().avx2_fma(), kernel != Kernel::Gemm) {
        return avx2::xwt(t, x, n, k, w, m);
    }
    let _ = (kernel, Cpu::get);
    gemm_t(x, n, k, m, |rows, buf| {
        T::widen(&w[rows.start * k..rows.end * k], buf)
    })
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/matmul.rs"]
mod avx2;

/// The AVX2 kernel's k blocks (its `KC`): partial sums of each block are added in order.
const KC_REFERENCE: usize = 1024;

/// The horizontal sum of eight f32 lanes in the AVX2 kernel's order: halves, then lanes 0 + 2
/// and 1 + 3, then their sum.
#[inline]
pub fn hsum_reference(a: [f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let (s0, s1) = (s[0] + s[2], s[1] + s[3]);
    s0 + s1
}

/// The scalar reference of the AVX2 kernel: the same operations in the same order, one output
/// at a time (per k block of 1024: eight lane accumulators of fused multiply-adds over whole
/// groups of eight, [`hsum_reference`], then the scalar tail with separate products and sums;
/// block sums added in order). Bit-identical to `xwt_with(Kernel::Avx2, ..)` on AVX2 CPUs;
/// slow (tests and documentation only).
pub fn xwt_reference<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    for t in 0..n {
        for r in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            let wr = &w[r * k..(r + 1) * k];
            let mut out = 0f32;
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + KC_REFERENCE).min(k);
                let k8 = k0 + (k1 - k0) / 8 * 8;
                let mut acc = [0f32; 8];
                for kk in (k0..k8).step_by(8) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = xr[kk + l].mul_add(wr[kk + l].to_f32(), *a);
                    }
                }
                let mut s = hsum_reference(acc);
                for q in k8..k1 {
                    s += xr[q] * wr[q].to_f32();
                }
                out = if k0 == 0 { s } else { out + s };
                k0 = k1;
            }
            y[t * m + r] = out;
        }
    }
    y
}

/// `y [n, m] = x [n, k] · Wᵀ` where `load(rows, buf)` writes rows `rows` of W (each `k` long) as
/// f32 into `buf`.
fn gemm_t<F>(x: &[f32], n: usize, k: usize, m: usize, load: F) -> Vec<f32>
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    if k == 0 {
        return y;
    }
    assert!(x.len() >= n * k, "xwt: operand sizes");
    // Panel height: as many weight rows as fit PANEL_ELEMS, a multiple of 16, at least 16.
    let panel = ((PANEL_ELEMS / k).max(16) / 16 * 16).min(m.next_multiple_of(16));
    let n_panels = m.div_ceil(panel);
    let out = OutPtr(y.as_mut_ptr());
    let xp = x.as_ptr() as usize;
    (0..n_panels).into_par_iter().for_each_init(
        || vec![0f32; panel * k],
        |buf, p| {
            let r0 = p * panel;
            let r1 = (r0 + panel).min(m);
            let rows = r1 - r0;
            let b = &mut buf[..rows * k];
            load(r0..r1, b);
            // SAFETY: dst covers columns r0..r1 of every row of y (row stride m), disjoint from
            // the other tasks', and y outlives the loop; lhs is x [n, k] row-major (asserted
            // size); rhs is the panel viewed as a k × rows matrix (element (kk, j) at
            // b[j * k + kk]).
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    out.get().add(r0),
                    1,
                    m as isize,
                    false,
                    xp as *const f32,
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn check_reference<T: Elem>(w_of: impl Fn(&[f32]) -> Vec<T>) {
        // Ragged register blocks, several k blocks with a tail, the widened-panel path (> 16
        // tokens), panels of 48 rows with a ragged last one.
        for &(n, k, m) in &[
            (1, 64, 10),
            (3, 300, 7),
            (4, 1030, 50),
            (5, 2051, 49),
            (17, 200, 97),
            (37, 1100, 13),
        ] {
            let x = random(n * k, 1 + n as u64);
            let w = w_of(&random(m * k, 2 + m as u64));
            let want = xwt_reference(&x, n, k, &w, m);
            #[cfg(target_arch = "x86_64")]
            if Cpu::get().avx2_fma().is_some() {
                let got = xwt_with(Kernel::Avx2, &x, n, k, &w, m);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{:?} {n}x{k}x{m}", T::KIND);
            }
            // The gemm path: same products, another summation order.
            let g = xwt_with(Kernel::Gemm, &x, n, k, &w, m);
            for (a, b) in g.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt(), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn avx2_matches_its_scalar_reference_bit_for_bit() {
        check_reference::<f32>(|v| v.to_vec());
        check_reference::<bf16>(bf16::narrow);
        check_reference::<f16>(f16::narrow);
    }

    #[test]
    fn from_bytes_checks_length_and_alignment() {
        #[repr(C, align(8))]
        struct Aligned([u8; 16]);
        let mut a = Aligned([0; 16]);
        for (c, v) in a.0.chunks_mut(4).zip([1.0f32, -2.0, 3.5, 0.25]) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(f32::from_bytes(&a.0), Some(&[1.0f32, -2.0, 3.5, 0.25][..]));
        assert_eq!(f32::from_bytes(&a.0[4..12]), Some(&[-2.0f32, 3.5][..]));
        assert_eq!(f32::from_bytes(&a.0[1..5]), None, "misaligned");
        assert_eq!(f32::from_bytes(&a.0[..6]), None, "not whole values");
        assert_eq!(bf16::from_bytes(&a.0[..6]).map(<[bf16]>::len), Some(3));
        assert_eq!(f16::from_bytes(&a.0[1..3]), None, "misaligned");
    }

    #[test]
    fn thread_count_does_not_change_results() {
        let (n, k, m) = (9, 512, 700);
        let x = random(n * k, 5);
        let w = bf16::narrow(&random(m * k, 6));
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| xwt(&x, n, k, &w, m))
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
