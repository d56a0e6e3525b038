//! AVX-512 path of the MXFP4 kernel (`mxfp4.rs`), with no f32 panel buffer. Two weight rows are
//! processed together: the same block of both is decoded with `vpshufb` (nibble → doubled E2M1
//! value as i8), widened and scaled into four 16-lane registers in a *row-pair* layout (lanes
//! `0..8`: eight consecutive values of row `2p`; lanes `8..16`: the same eight of row `2p + 1`),
//! and multiplied at once by up to [`TOKENS`] tokens, each token's eight values broadcast to
//! both halves. Each half of an accumulator is then exactly the scalar reference's eight-lane
//! accumulator of its row (k blocks of 1024, lane `l` sums positions `≡ l mod 8` in k order,
//! the same horizontal sum, block sums added in order), so the results are the reference's bits.
//! A missing partner row (odd row count) is decoded as zeros and its sums are dropped.

use std::arch::x86_64::*;

use super::{MxMatrix, BLOCK, KC, KVALUES, NIBBLE_BYTES};
use crate::cpu::Avx512Vnni;
use crate::matmul::hsum_reference;

/// Most tokens per pass over a pair of weight rows (one accumulator register each).
pub(super) const TOKENS: usize = 8;

/// Block `a` of one row and block `b` (same k range) of the next, decoded into four registers
/// in the row-pair layout: group `g` holds values `8g..8g + 8` of `a`, then the same of `b`.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_two_regs(
    a: (u8, &[u8; NIBBLE_BYTES], bool),
    b: (u8, &[u8; NIBBLE_BYTES], bool),
) -> [__m512; 4] {
    // SAFETY: `KVALUES` is 16 bytes (unaligned load); the features are enabled (AVX-512 F implies
    // the AVX2 that `block_i8` needs).
    unsafe {
        let lut = _mm_loadu_si128(KVALUES.as_ptr().cast::<__m128i>());
        let (a0, a1) = super::avx2::block_i8(lut, a.1, a.2);
        let (b0, b1) = super::avx2::block_i8(lut, b.1, b.2);
        let d = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(super::e8m0_half(a.0)),
            _mm512_set1_ps(super::e8m0_half(b.0)),
        );
        let widen = |x: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)), d);
        [
            widen(_mm_unpacklo_epi64(a0, b0)),
            widen(_mm_unpackhi_epi64(a0, b0)),
            widen(_mm_unpacklo_epi64(a1, b1)),
            widen(_mm_unpackhi_epi64(a1, b1)),
        ]
    }
}

/// The two halves of an accumulator, each summed as the reference sums its eight lanes.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum_pair(a: __m512) -> [f32; 2] {
    let mut lanes = [0f32; 16];
    // SAFETY: 16 writable f32; the feature is enabled.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
    let (mut lo, mut hi) = ([0f32; 8], [0f32; 8]);
    lo.copy_from_slice(&lanes[..8]);
    hi.copy_from_slice(&lanes[8..]);
    [hsum_reference(lo), hsum_reference(hi)]
}

/// `out [n, rows] = x [n, k] · W[r0..r0 + rows]ᵀ`, decoding each pair of blocks into registers
/// and multiplying it at once (no panel buffer; the blocks are decoded once per [`TOKENS`]
/// tokens).
pub(super) fn xwt_fused(
    t: Avx512Vnni,
    x: &[f32],
    n: usize,
    w: &MxMatrix<'_>,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    let k = w.k();
    assert!(
        x.len() >= n * k && r0 + rows <= w.rows() && out.len() >= n * rows,
        "mxfp4 xwt_fused: sizes"
    );
    for p in 0..rows.div_ceil(2) {
        let ra = r0 + 2 * p;
        let rb = (2 * p + 1 < rows).then_some(ra + 1);
        let mut tok = 0;
        while tok < n {
            let nt = (n - tok).min(TOKENS);
            let xs = &x[tok * k..(tok + nt) * k];
            let mut res = [[0f32; 2]; TOKENS];
            // SAFETY: the token proves the features; the sizes are asserted above and inside.
            unsafe {
                match nt {
                    8 => fused::<8>(t, xs, w, ra, rb, &mut res),
                    7 => fused::<7>(t, xs, w, ra, rb, &mut res),
                    6 => fused::<6>(t, xs, w, ra, rb, &mut res),
                    5 => fused::<5>(t, xs, w, ra, rb, &mut res),
                    4 => fused::<4>(t, xs, w, ra, rb, &mut res),
                    3 => fused::<3>(t, xs, w, ra, rb, &mut res),
                    2 => fused::<2>(t, xs, w, ra, rb, &mut res),
                    _ => fused::<1>(t, xs, w, ra, rb, &mut res),
                }
            }
            for (j, v) in res.iter().take(nt).enumerate() {
                out[(tok + j) * rows + 2 * p] = v[0];
                if rb.is_some() {
                    out[(tok + j) * rows + 2 * p + 1] = v[1];
                }
            }
            tok += nt;
        }
    }
}

/// `NT` tokens times weight rows `ra` and `rb` (a row of zeros when `None`) of `w`, decoded
/// block by block into registers, in the reference's order.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn fused<const NT: usize>(
    _: Avx512Vnni,
    xs: &[f32],
    w: &MxMatrix<'_>,
    ra: usize,
    rb: Option<usize>,
    res: &mut [[f32; 2]; TOKENS],
) {
    const ZERO: [u8; NIBBLE_BYTES] = [0; NIBBLE_BYTES];
    let k = w.k();
    let bpr = k / BLOCK;
    assert!(
        NT <= TOKENS && xs.len() >= NT * k && KC.is_multiple_of(BLOCK),
        "mxfp4 fused: sizes"
    );
    let xp = xs.as_ptr();
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        // SAFETY: every token load reads 8 f32 at `kk < k1 ≤ k` of token row `j < NT` of `xs`
        // (asserted length, k a multiple of 32); blocks are read through `MxMatrix::block`
        // (bounds-checked); the features are enabled.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); NT];
            for kb in k0 / BLOCK..k1 / BLOCK {
                let a = w.block(ra * bpr + kb);
                let b = match rb {
                    Some(r) => w.block(r * bpr + kb),
                    None => (127, &ZERO, a.2),
                };
                let g = decode_two_regs(a, b);
                for (gi, wv) in g.iter().enumerate() {
                    let kk = kb * BLOCK + 8 * gi;
                    for (j, acc_j) in acc.iter_mut().enumerate() {
                        let x8 = _mm256_loadu_pd(xp.add(j * k + kk).cast::<f64>());
                        let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(x8));
                        *acc_j = _mm512_fmadd_ps(xv, *wv, *acc_j);
                    }
                }
            }
            for (j, a) in acc.iter().enumerate() {
                let [s0, s1] = hsum_pair(*a);
                res[j] = if k0 == 0 {
                    [s0, s1]
                } else {
                    [res[j][0] + s0, res[j][1] + s1]
                };
            }
        }
        k0 = k1;
    }
}
