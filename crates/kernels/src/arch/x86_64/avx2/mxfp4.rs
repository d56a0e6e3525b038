//! AVX2 + FMA path of the MXFP4 kernel (`mxfp4.rs`): blocks decoded with `vpshufb` (nibble →
//! doubled E2M1 value as i8) and widened to f32, then multiplied by the scale; the panel's dot
//! products in the scalar reference's order (k blocks of 1024, eight FMA lanes, the same
//! horizontal sum), four tokens per pass over a weight row.

use std::arch::x86_64::*;

use super::{MxMatrix, BLOCK, KC, KVALUES, NIBBLE_BYTES};
use crate::cpu::Avx2Fma;
use crate::matmul::hsum_reference;

/// Decodes the blocks `first..first + buf.len() / 32` of `w` into `buf`.
pub(super) fn decode_rows(t: Avx2Fma, w: &MxMatrix<'_>, first: usize, buf: &mut [f32]) {
    for (i, dst) in buf.chunks_exact_mut(BLOCK).enumerate() {
        let (e, q, inter) = w.block(first + i);
        let dst: &mut [f32; BLOCK] = super::arr32_mut(dst);
        // SAFETY: the token proves AVX2 / FMA / F16C.
        unsafe { decode_block(t, e, q, inter, dst) }
    }
}

/// The 32 values of a block as i8 (`KVALUES` entries, `lut` holding them): values `0..16`, then
/// `16..32` (`interleaved`: the HF layout, low nibble = even value; otherwise ggml's, low nibbles
/// = the first 16 values). Shared by the AVX2 and AVX-512 paths.
///
/// # Safety
/// The CPU must have AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block_i8(
    lut: __m128i,
    q: &[u8; NIBBLE_BYTES],
    interleaved: bool,
) -> (__m128i, __m128i) {
    // SAFETY: `q` is 16 readable bytes (unaligned load); the features are enabled.
    unsafe {
        let v = _mm_loadu_si128(q.as_ptr().cast::<__m128i>());
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
        let (a, b) = if interleaved {
            (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
        } else {
            (lo, hi)
        };
        (_mm_shuffle_epi8(lut, a), _mm_shuffle_epi8(lut, b))
    }
}

/// # Safety
/// The CPU must have AVX2 (the token's features).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_block(
    _: Avx2Fma,
    e: u8,
    q: &[u8; NIBBLE_BYTES],
    interleaved: bool,
    out: &mut [f32; BLOCK],
) {
    // SAFETY: `q` is 16 readable bytes and `KVALUES` 16 bytes (unaligned loads); `out` is 32
    // writable f32, stored as four groups of 8 at offsets 0, 8, 16, 24; the features are enabled.
    unsafe {
        let lut = _mm_loadu_si128(KVALUES.as_ptr().cast::<__m128i>());
        let (a, b) = block_i8(lut, q, interleaved);
        let d = _mm256_set1_ps(super::e8m0_half(e));
        let widen = |x: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)), d);
        let p = out.as_mut_ptr();
        _mm256_storeu_ps(p, widen(a));
        _mm256_storeu_ps(p.add(8), widen(_mm_srli_si128::<8>(a)));
        _mm256_storeu_ps(p.add(16), widen(b));
        _mm256_storeu_ps(p.add(24), widen(_mm_srli_si128::<8>(b)));
    }
}

/// `out [n, rows] = x [n, k] · panelᵀ` for the decoded panel `w` (`rows × k`, `k % 8 == 0`).
pub(super) fn dot_panel(
    t: Avx2Fma,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    assert!(
        k.is_multiple_of(8) && x.len() >= n * k && w.len() >= rows * k && out.len() >= n * rows,
        "mxfp4 dot_panel: sizes"
    );
    for r in 0..rows {
        let wr = &w[r * k..(r + 1) * k];
        let mut tok = 0;
        while tok < n {
            let nt = (n - tok).min(4);
            let xs = &x[tok * k..(tok + nt) * k];
            let mut res = [0f32; 4];
            // SAFETY: the token proves the features; the sizes are asserted above and inside.
            unsafe {
                match nt {
                    4 => dot::<4>(t, xs, wr, &mut res),
                    3 => dot::<3>(t, xs, wr, &mut res),
                    2 => dot::<2>(t, xs, wr, &mut res),
                    _ => dot::<1>(t, xs, wr, &mut res),
                }
            }
            for (j, v) in res.iter().take(nt).enumerate() {
                out[(tok + j) * rows + r] = *v;
            }
            tok += nt;
        }
    }
}

/// `NT` tokens (`xs`: `NT` rows of `k = w.len()`) times one weight row `w`, in the reference's
/// order.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot<const NT: usize>(_: Avx2Fma, xs: &[f32], w: &[f32], res: &mut [f32; 4]) {
    let k = w.len();
    assert!(
        xs.len() >= NT * k && k.is_multiple_of(8),
        "mxfp4 dot: sizes"
    );
    let (xp, wp) = (xs.as_ptr(), w.as_ptr());
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        // SAFETY: every load reads 8 f32 at `kk < k1 ≤ k` (k a multiple of 8) of `w` or of
        // token row `j < NT` of `xs` (asserted length); the features are enabled.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); NT];
            let mut kk = k0;
            while kk < k1 {
                let wv = _mm256_loadu_ps(wp.add(kk));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(j * k + kk)), wv, *a);
                }
                kk += 8;
            }
            for (j, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let s = hsum_reference(lanes);
                res[j] = if k0 == 0 { s } else { res[j] + s };
            }
        }
        k0 = k1;
    }
}
