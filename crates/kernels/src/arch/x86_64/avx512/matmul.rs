//! An AVX-512 BF16 kernel for `x · Wᵀ` with bf16 activations and bf16 weights: `vdpbf16ps`
//! (`_mm512_dpbf16_ps`) multiplies 32 bf16 pairs per instruction and accumulates them into 16
//! f32 lanes, twice the multiply-adds per instruction of an AVX-512 f32 FMA and four times the
//! AVX2 kernel's, with no widening of the weights.
//!
//! What one `vdpbf16ps` does to f32 lane `l` (Intel SDM, checked on this CPU by the test
//! `avx512_bf16_matches_its_scalar_reference_bit_for_bit`): `acc ← acc + x[2l+1]·w[2l+1]`, rounded
//! to nearest even, then `acc ← acc + x[2l]·w[2l]`, rounded again — the odd element first, each
//! product exact (a bf16 × bf16 product fits f32's 24-bit significand), each sum rounded once,
//! denormal inputs (bf16 operands and the accumulator) read as zero and a denormal result flushed
//! to zero, whatever MXCSR says. [`super::dpbf16_step_reference`] is that step in scalar code.
//!
//! Shape: blocks of up to 4 weight rows × 4 tokens (16 accumulators of 16 lanes), over k blocks of
//! `KC`; the last 32-element group of a row is read with a zero-filling masked load (the reference
//! pads with zeros too). Each block's 16 lanes are summed in a fixed order (halves, then the AVX2
//! kernel's eight-lane order) and added to the output in k-block order. Every output element is
//! computed the same way whatever `n`, its block or the thread count (deterministic,
//! batch-invariant).

use super::OutPtr;
use crate::cpu::Avx512Bf16;
use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;

const ROWS: usize = 4;
const TOKS: usize = 4;
/// Software prefetch distance along a weight row (elements; 1 KiB of bf16): decode-sized calls
/// (≈ 10 tokens per expert) stream the weights from memory once, and the hint keeps more of those
/// loads in flight (2.6 % less wall time on a 2-layer OLMoE-width model's paper workload, 80
/// prompts, session 11; no effect on the results).
const PF: usize = 512;
/// Weight rows per rayon task: 48 rows of 2048 bf16 = 192 KiB, well inside L2.
pub(super) const PANEL: usize = 48;
/// k block (multiple of 32): 4 tokens' activations (4 × 2048 bf16 = 16 KiB) stay in L1.
pub(super) const KC: usize = 2048;

pub(super) fn xwt(_: Avx512Bf16, x: &[bf16], n: usize, k: usize, w: &[bf16], m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let out = OutPtr(y.as_mut_ptr());
    (0..m.div_ceil(PANEL)).into_par_iter().for_each(|p| {
        let r0 = p * PANEL;
        let r1 = (r0 + PANEL).min(m);
        // SAFETY: the `Avx512Bf16` token exists only on CPUs with AVX-512 F, BW and BF16; the
        // sizes of x and w are asserted above, and y (n × m, alive until the loop ends) is
        // written by this task in columns r0..r1 only.
        unsafe { panel(x, n, k, w, m, r0, r1, out.get()) }
    });
    y
}

/// Output columns `r0..r1` of y.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `x.len() >= n * k`, `w.len() >= r1 * k`,
/// `r1 <= m`, and `y` must point to `n * m` writable f32 that no other thread accesses in
/// columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panel(
    x: &[bf16],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
    r0: usize,
    r1: usize,
    y: *mut f32,
) {
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(TOKS);
            let mut r = r0;
            while r < r1 {
                let nr = (r1 - r).min(ROWS);
                let b = Blk { k, m, r, t, k0, k1 };
                // SAFETY: the block lies inside the panel (nr ≤ r1 − r, nt ≤ n − t, k1 ≤ k),
                // so this function's contract covers it.
                unsafe {
                    match (nr, nt) {
                        (4, 4) => block::<4, 4>(x, w, y, b),
                        (4, 3) => block::<4, 3>(x, w, y, b),
                        (4, 2) => block::<4, 2>(x, w, y, b),
                        (4, _) => block::<4, 1>(x, w, y, b),
                        (3, 4) => block::<3, 4>(x, w, y, b),
                        (3, 3) => block::<3, 3>(x, w, y, b),
                        (3, 2) => block::<3, 2>(x, w, y, b),
                        (3, _) => block::<3, 1>(x, w, y, b),
                        (2, 4) => block::<2, 4>(x, w, y, b),
                        (2, 3) => block::<2, 3>(x, w, y, b),
                        (2, 2) => block::<2, 2>(x, w, y, b),
                        (2, _) => block::<2, 1>(x, w, y, b),
                        (_, 4) => block::<1, 4>(x, w, y, b),
                        (_, 3) => block::<1, 3>(x, w, y, b),
                        (_, 2) => block::<1, 2>(x, w, y, b),
                        (_, _) => block::<1, 1>(x, w, y, b),
                    }
                }
                r += nr;
            }
            t += nt;
        }
        k0 = k1;
    }
}

/// Where a register block sits: output columns (= weight rows) from `r`, tokens from `t`, the k
/// range `k0..k1` (KC-aligned; only the last one may end in a non-multiple of 32).
#[derive(Clone, Copy)]
struct Blk {
    k: usize,
    m: usize,
    r: usize,
    t: usize,
    k0: usize,
    k1: usize,
}

/// The sum of the 16 lanes in a fixed order: lanes `i + (i + 8)`, then the AVX2 kernel's
/// eight-lane order ([`super::hsum16_reference`]).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m512) -> f32 {
    // SAFETY: the caller guarantees AVX-512 F (which implies AVX); no memory is accessed.
    unsafe {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let v8 = _mm256_add_ps(lo, hi);
        let lo = _mm256_castps256_ps128(v8);
        let hi = _mm256_extractf128_ps::<1>(v8);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// 32 bf16 at `p` (the first `len` of them, the rest zero) as a `vdpbf16ps` operand.
///
/// # Safety
/// `p` must point to `len` readable bf16 (`len ≤ 32`); the CPU must have AVX-512 F and BW.
#[inline(always)]
unsafe fn load32(p: *const bf16, len: usize) -> __m512bh {
    // SAFETY: the caller's contract; a masked load reads only the `len` selected elements (no
    // fault on masked-out ones); `__m512i` and `__m512bh` are both 64-byte vectors.
    unsafe {
        let v = if len == 32 {
            _mm512_loadu_si512(p as *const __m512i)
        } else {
            let mask: __mmask32 = (1u32 << len) - 1;
            _mm512_maskz_loadu_epi16(mask, p as *const i16)
        };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
}

/// One register block: `NR` weight rows × `NT` tokens over the k range of `b`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `x` must hold tokens `t..t + NT`, `w` rows
/// `r..r + NR` (length k each), and `y` must point to `n * m` writable f32 with
/// `(t + NT - 1) * m + r + NR <= n * m` that no other thread accesses there.
#[inline(always)]
unsafe fn block<const NR: usize, const NT: usize>(x: &[bf16], w: &[bf16], y: *mut f32, b: Blk) {
    // SAFETY: the caller's contract: every load reads inside rows of x and w (kk + len ≤ k1 ≤ k),
    // the writes stay inside y's block; the CPU has the features.
    unsafe {
        let Blk { k, m, r, t, k0, k1 } = b;
        let mut acc = [[_mm512_setzero_ps(); NR]; NT];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut kk = k0;
        while kk < k1 {
            let len = (k1 - kk).min(32);
            let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); NR];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = load32(wp.add((r + i) * k + kk), len);
                // A hint only (never faults, even past the end): the same row PF elements ahead.
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((r + i) * k + kk + PF).cast::<i8>());
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = load32(xp.add((t + j) * k + kk), len);
                for (i, v) in wv.iter().enumerate() {
                    a[i] = _mm512_dpbf16_ps(a[i], xv, *v);
                }
            }
            kk += 32;
        }
        for (j, a) in acc.iter().enumerate() {
            for (i, v) in a.iter().enumerate() {
                let s = hsum(*v);
                let out = y.add((t + j) * m + r + i);
                *out = if k0 == 0 { s } else { *out + s };
            }
        }
    }
}
