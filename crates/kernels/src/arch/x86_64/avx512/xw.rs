//! The AVX-512 kernel of `x · W` (row-major `W [k, m]`, [`super::xw`]): a panel of 32 output
//! columns is two 16-lane accumulators per token, blocks of 6 tokens (12 accumulators); for each
//! `kk` the 32 weights of row `kk` are widened in registers and `fma(x[t, kk], w, acc)` is applied
//! lane by lane — the reference chain, so the result is bit-identical to
//! [`super::xw_reference`] and to the AVX2 kernel.

use super::PANEL;
use crate::cpu::Avx512Bf16;
use crate::matmul::{Elem, ElemKind};
use std::arch::x86_64::*;

const TOKS: usize = 6;
const VECS: usize = PANEL / 16;

/// Columns `c0..c0 + PANEL` of `y` for all `n` tokens.
///
/// # Safety
/// The CPU must have F16C besides the token's features; `x` must hold `n × k` values, `w`
/// `k × m`, `c0 + PANEL <= m`, and `y` must point to `n × m` writable f32 that no other thread
/// accesses in columns `c0..c0 + PANEL`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel<T: Elem>(
    t: Avx512Bf16,
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
        // SAFETY: the token proves AVX-512 F and BW; tokens t0..t0 + nt are inside x and y
        // (caller's contract for the rest).
        unsafe {
            match nt {
                6 => block::<T, 6>(x, k, w, m, c0, t0, y),
                5 => block::<T, 5>(x, k, w, m, c0, t0, y),
                4 => block::<T, 4>(x, k, w, m, c0, t0, y),
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
/// The CPU must have AVX-512 F and BW and F16C; `x` must hold tokens `t0..t0 + NT` (k values
/// each), `w` `k × m` values with `c0 + PANEL <= m`, and `y` point to writable f32 covering
/// `(t0 + NT - 1) * m + c0 + PANEL` that no other thread accesses there.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
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
        let mut acc = [[_mm512_setzero_ps(); VECS]; NT];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for kk in 0..k {
            let row = wp.add(kk * m + c0);
            let mut wv = [_mm512_setzero_ps(); VECS];
            for (v, o) in wv.iter_mut().enumerate() {
                *o = load16(row.add(16 * v));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add((t0 + j) * k + kk));
                for (v, wv) in wv.iter().enumerate() {
                    a[v] = _mm512_fmadd_ps(xv, *wv, a[v]);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                _mm512_storeu_ps(y.add((t0 + j) * m + c0 + 16 * v), *a);
            }
        }
    }
}

/// Sixteen consecutive values of `T` at `p` as f32 lanes (exact widening).
///
/// # Safety
/// `p` must point to 16 readable values; the CPU must have AVX-512 F and BW.
#[inline(always)]
unsafe fn load16<T: Elem>(p: *const T) -> __m512 {
    // SAFETY: the caller's contract (16 readable values, CPU features); `T::KIND` names the
    // element type, so the cast reads the same bytes as 16 × u16 or 16 × f32.
    unsafe {
        match T::KIND {
            ElemKind::Bf16 => {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            ElemKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            ElemKind::F32 => _mm512_loadu_ps(p as *const f32),
        }
    }
}
