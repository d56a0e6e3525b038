//! AVX2 dot products of the quantised-weight kernel (`super`): the AVX-512 path's integer lanes
//! in two eight-lane halves (lanes 0–7 from the first 32 bytes of each 64-byte chunk, 8–15 from
//! the second): K-quants with `vpmaddubsw` + `vpmaddwd` (× the i16 group scales); Q4_0 with
//! `vpmaddubsw` + `vpmaddwd` by ones, started at `−8 · Σ x`; Q8_0 with the sign trick
//! (`|w|` × `sign(x, w)`, products ≤ 128 · 127 so the i16 pair sums never saturate), which gives
//! `Σ w · x` directly, the same integer as the AVX-512 path's `−128 · Σ x + Σ (w + 128) · x`.
//! Float operations as the generic path's; bit-identical results (tested in `quant::tests`).

use super::Row;
use crate::cpu::Avx2;
use std::arch::x86_64::*;

/// `hsum_reference` on a register: lanes i + 4, then 0 + 2 and 1 + 3, then their sum.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// One K-quant output (see `super::kdot_generic`).
pub(super) fn kdot(_: Avx2, row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
    let nsb = dx.len();
    let k = nsb * super::QK_K;
    assert!(
        row.q.len() >= k
            && row.sc.len() >= k / 2
            && row.cm.len() >= k / 16
            && row.da.len() >= nsb
            && row.db.len() >= nsb
            && x.len() >= k
            && xs.len() >= k / 16,
        "quant: kdot sizes"
    );
    // SAFETY: the token proves AVX2; the lengths are asserted above.
    unsafe { kdot_raw(row, x, xs, dx, nsb) }
}

/// # Safety
/// The CPU must have AVX2; `row.q`, `x` hold `256 · nsb` values, `row.sc` `128 · nsb`,
/// `row.cm` and `xs` `16 · nsb`, `row.da`, `row.db` and `dx` `nsb`.
#[allow(clippy::needless_range_loop)] // `s` indexes several arrays
#[target_feature(enable = "avx2")]
unsafe fn kdot_raw(row: &Row, x: &[i8], xs: &[i16], dx: &[f32], nsb: usize) -> f32 {
    let (q, sc, cm, x, xs) = (
        row.q.as_ptr(),
        row.sc.as_ptr(),
        row.cm.as_ptr(),
        x.as_ptr(),
        xs.as_ptr(),
    );
    let (mut fa0, mut fa1, mut fb) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    for s in 0..nsb {
        let (mut i0, mut i1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in 0..4 {
            let o = s * super::QK_K + 64 * c;
            // SAFETY: o + 64 <= 256 · nsb (values) and (o + 64) / 2 <= 128 · nsb (scales).
            let (w0, w1, x0, x1, s0, s1) = unsafe {
                (
                    _mm256_loadu_si256(q.add(o).cast()),
                    _mm256_loadu_si256(q.add(o + 32).cast()),
                    _mm256_loadu_si256(x.add(o).cast()),
                    _mm256_loadu_si256(x.add(o + 32).cast()),
                    _mm256_loadu_si256(sc.add(o / 2).cast()),
                    _mm256_loadu_si256(sc.add(o / 2 + 16).cast()),
                )
            };
            i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), s0));
            i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), s1));
        }
        // SAFETY: s · 16 + 16 <= 16 · nsb.
        let (cmv, xsv) = unsafe {
            (
                _mm256_loadu_si256(cm.add(s * 16).cast()),
                _mm256_loadu_si256(xs.add(s * 16).cast()),
            )
        };
        let cr = _mm256_madd_epi16(cmv, xsv);
        let (fa_s, fb_s) = (
            _mm256_set1_ps(row.da[s] * dx[s]),
            _mm256_set1_ps(row.db[s] * dx[s]),
        );
        fa0 = _mm256_add_ps(fa0, _mm256_mul_ps(_mm256_cvtepi32_ps(i0), fa_s));
        fa1 = _mm256_add_ps(fa1, _mm256_mul_ps(_mm256_cvtepi32_ps(i1), fa_s));
        fb = _mm256_add_ps(fb, _mm256_mul_ps(_mm256_cvtepi32_ps(cr), fb_s));
    }
    hsum8(_mm256_add_ps(fa0, fa1)) - hsum8(fb)
}

/// One Q8_0 (`signed`) / Q4_0 output (see `super::bdot_generic`).
pub(super) fn bdot(t: Avx2, signed: bool, row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
    let _ = t;
    let lanes = init.len();
    assert!(
        lanes.is_multiple_of(16)
            && dx.len() >= lanes
            && row.da.len() >= lanes
            && row.q.len() >= 4 * lanes
            && x.len() >= 4 * lanes,
        "quant: bdot sizes"
    );
    // SAFETY: the token proves AVX2; the lengths are asserted above.
    unsafe { bdot_raw(signed, row, x, init, dx, lanes / 8) }
}

/// # Safety
/// The CPU must have AVX2; `row.q` and `x` hold `32 · halves` values, `init`, `dx` and
/// `row.da` `8 · halves`; `halves` is even.
#[target_feature(enable = "avx2")]
unsafe fn bdot_raw(
    signed: bool,
    row: &Row,
    x: &[i8],
    init: &[i32],
    dx: &[f32],
    halves: usize,
) -> f32 {
    let (q, dw, x, init, dx) = (
        row.q.as_ptr(),
        row.da.as_ptr(),
        x.as_ptr(),
        init.as_ptr(),
        dx.as_ptr(),
    );
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let mut f = [_mm256_setzero_ps(), _mm256_setzero_ps()];
    for h in 0..halves {
        // SAFETY: 32 · h + 32 values and 8 · h + 8 lanes are within the sizes above.
        let (i0, wq, xv, dwv, dxv) = unsafe {
            (
                _mm256_loadu_si256(init.add(8 * h).cast()),
                _mm256_loadu_si256(q.add(32 * h).cast()),
                _mm256_loadu_si256(x.add(32 * h).cast()),
                _mm256_loadu_ps(dw.add(8 * h)),
                _mm256_loadu_ps(dx.add(8 * h)),
            )
        };
        let d = if signed {
            let w = _mm256_xor_si256(wq, flip);
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
            _mm256_madd_epi16(p, ones)
        } else {
            _mm256_add_epi32(i0, _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv), ones))
        };
        let fv = _mm256_mul_ps(dwv, dxv);
        f[h % 2] = _mm256_add_ps(f[h % 2], _mm256_mul_ps(_mm256_cvtepi32_ps(d), fv));
    }
    hsum8(_mm256_add_ps(f[0], f[1]))
}

/// `row.decode(w, r)` compiled with AVX2 (the same integer and copy operations, vectorised).
pub(super) fn decode(_: Avx2, row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
    #[target_feature(enable = "avx2")]
    fn run(row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
        row.decode(w, r);
    }
    // SAFETY: the token proves AVX2; `run` is safe code.
    unsafe { run(row, w, r) }
}
