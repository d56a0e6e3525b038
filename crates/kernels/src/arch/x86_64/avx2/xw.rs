//! The AVX2 + FMA kernel of `x · W` (row-major `W [k, m]`, [`super::xw`]): a panel of 32 output
//! columns is four 8-lane accumulators per token, blocks of 3 tokens (12 accumulators); for each
//! `kk` the 32 weights of row `kk` are widened in registers (bf16: zero-extend and shift; f16:
//! `vcvtph2ps`) and `fma(x[t, kk], w, acc)` is applied lane by lane — the reference chain, so the
//! result is bit-identical to [`super::xw_reference`].

use super::PANEL;
use crate::cpu::Avx2Fma;
use crate::matmul::{Elem, ElemKind};
use std::arch::x86_64::*;

const TOKS: usize = 3;
const VECS: usize = PANEL / 8;

/// Columns `c0..c0 + PANEL` of `y` for all `n` tokens.
///
/// # Safety
/// `x` must hold `n × k` values, `w` `k × m`, `c0 + PANEL <= m`, and `y` must point to `n × m`
/// writable f32 that no other thread accesses in columns `c0..c0 + PANEL`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel<T: Elem>(
    t: Avx2Fma,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
    c0: usize,
    y: *mut f32,
) {
    let _ = t;
    let mut t0 = 0;
    while t0 < n {
        let nt = (n - t0).min(TOKS);
        // SAFETY: the token proves AVX2, FMA and F16C; tokens t0..t0 + nt are inside x and y
        // (caller's contract for the rest).
        unsafe {
            match nt {
                3 => block::<T, 3>(x, k, w, m, c0, t0, y),
                2 => block::<T, 2>(x, k, w, m, c0, t0, y),
                _ => block::<T, 1>(x, k, w, m, c0, t0, y),
            }
        }
        t0 += nt;
    }
}

/// Tokens `t0..t0 + NT`, columns `c0..c0 + PANEL`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` must hold tokens `t0..t0 + NT` (k values each),
/// `w` `k × m` values with `c0 + PANEL <= m`, and `y` point to writable f32 covering
/// `(t0 + NT - 1) * m + c0 + PANEL` that no other thread accesses there.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<T: Elem, const NT: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    m: usize,
    c0: usize,
    t0: usize,
    y: *mut f32,
) {
    // SAFETY: every read is at kk < k, columns c0..c0 + PANEL <= m of w and tokens t0..t0 + NT
    // of x; every write inside this task's columns of y (caller's contract).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); VECS]; NT];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for kk in 0..k {
            let row = wp.add(kk * m + c0);
            let mut wv = [_mm256_setzero_ps(); VECS];
            for (v, o) in wv.iter_mut().enumerate() {
                *o = load8(row.add(8 * v));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*xp.add((t0 + j) * k + kk));
                for (v, wv) in wv.iter().enumerate() {
                    a[v] = _mm256_fmadd_ps(xv, *wv, a[v]);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                _mm256_storeu_ps(y.add((t0 + j) * m + c0 + 8 * v), *a);
            }
        }
    }
}

/// Eight consecutive values of `T` at `p` as f32 lanes (exact widening).
///
/// # Safety
/// `p` must point to 8 readable values; the CPU must have AVX2 and F16C.
#[inline(always)]
unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
    // SAFETY: the caller's contract (8 readable values, CPU features); `T::KIND` names the
    // element type, so the cast reads the same bytes as 8 × u16 or 8 × f32.
    unsafe {
        match T::KIND {
            ElemKind::Bf16 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
        }
    }
}
