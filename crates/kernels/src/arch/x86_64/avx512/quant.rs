//! AVX-512 VNNI dot products of the quantised-weight kernel (`super`): K-quants with
//! `vpmaddubsw` (unsigned 4/5/6-bit values × signed 8-bit activations, pair sums in i16, never
//! saturating for values < 64) and `vpdpwssd` (× the i16 group scales, summed into i32 lanes);
//! Q8_0 / Q4_0 with `vpdpbusd` (unsigned `w + 128` / nibble × signed activations, four products
//! per i32 lane, started at `−offset · Σ x`). The integer lanes and the float operations are
//! exactly those of the generic path (`kdot_generic` / `bdot_generic`), so the results are
//! bit-identical (tested in `quant::tests`).

use super::Row;
use crate::cpu::Avx512Vnni;
use std::arch::x86_64::*;

/// The generic path's `hsum16_reference` on a register: halves, then the eight-lane order.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    hsum8(_mm256_add_ps(lo, hi))
}

/// `hsum_reference` on a register: lanes i + 4, then 0 + 2 and 1 + 3, then their sum.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// One K-quant output (see `super::kdot_generic`).
pub(super) fn kdot(_: Avx512Vnni, row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
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
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { kdot_raw(row, x, xs, dx, nsb) }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `row.q`, `x` hold `256 · nsb` values, `row.sc`
/// `128 · nsb`, `row.cm` and `xs` `16 · nsb`, `row.da`, `row.db` and `dx` `nsb`.
#[allow(clippy::needless_range_loop)] // `s` indexes several arrays
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kdot_raw(row: &Row, x: &[i8], xs: &[i16], dx: &[f32], nsb: usize) -> f32 {
    let (q, sc, cm, x, xs) = (
        row.q.as_ptr(),
        row.sc.as_ptr(),
        row.cm.as_ptr(),
        x.as_ptr(),
        xs.as_ptr(),
    );
    let mut fa = _mm512_setzero_ps();
    let mut fb = _mm256_setzero_ps();
    for s in 0..nsb {
        let mut ia = _mm512_setzero_si512();
        for c in 0..4 {
            let o = s * super::QK_K + 64 * c;
            // SAFETY: o + 64 <= 256 · nsb (values) and (o + 64) / 2 <= 128 · nsb (scales).
            let (wq, xv, sv) = unsafe {
                (
                    _mm512_loadu_si512(q.add(o).cast()),
                    _mm512_loadu_si512(x.add(o).cast()),
                    _mm512_loadu_si512(sc.add(o / 2).cast()),
                )
            };
            ia = _mm512_dpwssd_epi32(ia, _mm512_maddubs_epi16(wq, xv), sv);
        }
        // SAFETY: s · 16 + 16 <= 16 · nsb.
        let (cmv, xsv) = unsafe {
            (
                _mm256_loadu_si256(cm.add(s * 16).cast()),
                _mm256_loadu_si256(xs.add(s * 16).cast()),
            )
        };
        let cr = _mm256_madd_epi16(cmv, xsv);
        let (fa_s, fb_s) = (row.da[s] * dx[s], row.db[s] * dx[s]);
        fa = _mm512_add_ps(
            fa,
            _mm512_mul_ps(_mm512_cvtepi32_ps(ia), _mm512_set1_ps(fa_s)),
        );
        fb = _mm256_add_ps(
            fb,
            _mm256_mul_ps(_mm256_cvtepi32_ps(cr), _mm256_set1_ps(fb_s)),
        );
    }
    hsum16(fa) - hsum8(fb)
}

/// One Q8_0 / Q4_0 output (see `super::bdot_generic`).
pub(super) fn bdot(_: Avx512Vnni, row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
    let lanes = init.len();
    assert!(
        lanes.is_multiple_of(16)
            && dx.len() >= lanes
            && row.da.len() >= lanes
            && row.q.len() >= 4 * lanes
            && x.len() >= 4 * lanes,
        "quant: bdot sizes"
    );
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { bdot_raw(row, x, init, dx, lanes / 16) }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `row.q` and `x` hold `64 · chunks` values,
/// `init`, `dx` and `row.da` `16 · chunks`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn bdot_raw(row: &Row, x: &[i8], init: &[i32], dx: &[f32], chunks: usize) -> f32 {
    let (q, dw, x, init, dx) = (
        row.q.as_ptr(),
        row.da.as_ptr(),
        x.as_ptr(),
        init.as_ptr(),
        dx.as_ptr(),
    );
    let mut f = _mm512_setzero_ps();
    for c in 0..chunks {
        // SAFETY: 64 · c + 64 values and 16 · c + 16 lanes are within the sizes above.
        let (i0, wq, xv, dwv, dxv) = unsafe {
            (
                _mm512_loadu_si512(init.add(16 * c).cast()),
                _mm512_loadu_si512(q.add(64 * c).cast()),
                _mm512_loadu_si512(x.add(64 * c).cast()),
                _mm512_loadu_ps(dw.add(16 * c)),
                _mm512_loadu_ps(dx.add(16 * c)),
            )
        };
        let d = _mm512_dpbusd_epi32(i0, wq, xv);
        let fv = _mm512_mul_ps(dwv, dxv);
        f = _mm512_add_ps(f, _mm512_mul_ps(_mm512_cvtepi32_ps(d), fv));
    }
    hsum16(f)
}

/// `row.decode(w, r)` compiled with AVX-512 (the same integer and copy operations, vectorised).
pub(super) fn decode(_: Avx512Vnni, row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn run(row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
        row.decode(w, r);
    }
    // SAFETY: the token proves AVX-512 F, BW and VNNI; `run` is safe code.
    unsafe { run(row, w, r) }
}

/// Four K-quant outputs of one row (four tokens): each exactly as [`kdot`] computes it, the
/// weight values and scales loaded once for the four.
pub(super) fn kdot4(
    t: Avx512Vnni,
    row: &Row,
    x: [&[i8]; 4],
    xs: [&[i16]; 4],
    dx: [&[f32]; 4],
    out: &mut [f32; 4],
) {
    let nsb = dx[0].len();
    let k = nsb * super::QK_K;
    assert!(
        row.q.len() >= k
            && row.sc.len() >= k / 2
            && row.cm.len() >= k / 16
            && row.da.len() >= nsb
            && row.db.len() >= nsb
            && (0..4).all(|j| x[j].len() >= k && xs[j].len() >= k / 16 && dx[j].len() == nsb),
        "quant: kdot4 sizes"
    );
    let _ = t;
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { kdot4_raw(row, x, xs, dx, nsb, out) }
}

/// # Safety
/// As [`kdot_raw`], for each of the four tokens.
#[allow(clippy::needless_range_loop)] // `s` indexes several arrays
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kdot4_raw(
    row: &Row,
    x: [&[i8]; 4],
    xs: [&[i16]; 4],
    dx: [&[f32]; 4],
    nsb: usize,
    out: &mut [f32; 4],
) {
    let (q, sc, cm) = (row.q.as_ptr(), row.sc.as_ptr(), row.cm.as_ptr());
    let xp = x.map(|v| v.as_ptr());
    let sp = xs.map(|v| v.as_ptr());
    let mut fa = [_mm512_setzero_ps(); 4];
    let mut fb = [_mm256_setzero_ps(); 4];
    for s in 0..nsb {
        let mut ia = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let o = s * super::QK_K + 64 * c;
            // SAFETY: o + 64 <= 256 · nsb (values) and (o + 64) / 2 <= 128 · nsb (scales).
            let (wq, sv) = unsafe {
                (
                    _mm512_loadu_si512(q.add(o).cast()),
                    _mm512_loadu_si512(sc.add(o / 2).cast()),
                )
            };
            for j in 0..4 {
                // SAFETY: token j's values hold 256 · nsb bytes.
                let xv = unsafe { _mm512_loadu_si512(xp[j].add(o).cast()) };
                ia[j] = _mm512_dpwssd_epi32(ia[j], _mm512_maddubs_epi16(wq, xv), sv);
            }
        }
        // SAFETY: s · 16 + 16 <= 16 · nsb.
        let cmv = unsafe { _mm256_loadu_si256(cm.add(s * 16).cast()) };
        for j in 0..4 {
            // SAFETY: token j's sums hold 16 · nsb values.
            let xsv = unsafe { _mm256_loadu_si256(sp[j].add(s * 16).cast()) };
            let cr = _mm256_madd_epi16(cmv, xsv);
            let (fa_s, fb_s) = (row.da[s] * dx[j][s], row.db[s] * dx[j][s]);
            fa[j] = _mm512_add_ps(
                fa[j],
                _mm512_mul_ps(_mm512_cvtepi32_ps(ia[j]), _mm512_set1_ps(fa_s)),
            );
            fb[j] = _mm256_add_ps(
                fb[j],
                _mm256_mul_ps(_mm256_cvtepi32_ps(cr), _mm256_set1_ps(fb_s)),
            );
        }
    }
    for j in 0..4 {
        out[j] = hsum16(fa[j]) - hsum8(fb[j]);
    }
}

/// Four Q8_0 / Q4_0 outputs of one row (four tokens), each exactly as [`bdot`] computes it.
pub(super) fn bdot4(
    t: Avx512Vnni,
    row: &Row,
    x: [&[i8]; 4],
    init: [&[i32]; 4],
    dx: [&[f32]; 4],
    out: &mut [f32; 4],
) {
    let lanes = init[0].len();
    assert!(
        lanes.is_multiple_of(16)
            && row.da.len() >= lanes
            && row.q.len() >= 4 * lanes
            && (0..4).all(|j| {
                init[j].len() == lanes && dx[j].len() >= lanes && x[j].len() >= 4 * lanes
            }),
        "quant: bdot4 sizes"
    );
    let _ = t;
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { bdot4_raw(row, x, init, dx, lanes / 16, out) }
}

/// # Safety
/// As [`bdot_raw`], for each of the four tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn bdot4_raw(
    row: &Row,
    x: [&[i8]; 4],
    init: [&[i32]; 4],
    dx: [&[f32]; 4],
    chunks: usize,
    out: &mut [f32; 4],
) {
    let (q, dw) = (row.q.as_ptr(), row.da.as_ptr());
    let xp = x.map(|v| v.as_ptr());
    let ip = init.map(|v| v.as_ptr());
    let dp = dx.map(|v| v.as_ptr());
    let mut f = [_mm512_setzero_ps(); 4];
    for c in 0..chunks {
        // SAFETY: 64 · c + 64 values and 16 · c + 16 lanes are within the sizes above.
        let (wq, dwv) = unsafe {
            (
                _mm512_loadu_si512(q.add(64 * c).cast()),
                _mm512_loadu_ps(dw.add(16 * c)),
            )
        };
        for j in 0..4 {
            // SAFETY: as above, for token j.
            let (i0, xv, dxv) = unsafe {
                (
                    _mm512_loadu_si512(ip[j].add(16 * c).cast()),
                    _mm512_loadu_si512(xp[j].add(64 * c).cast()),
                    _mm512_loadu_ps(dp[j].add(16 * c)),
                )
            };
            let d = _mm512_dpbusd_epi32(i0, wq, xv);
            let fv = _mm512_mul_ps(dwv, dxv);
            f[j] = _mm512_add_ps(f[j], _mm512_mul_ps(_mm512_cvtepi32_ps(d), fv));
        }
    }
    for j in 0..4 {
        out[j] = hsum16(f[j]);
    }
}

// ---------------------------------------------------------------------------------------------
// Direct kernels: the weight blocks unpacked in registers (no decoded row), for Q4_K, Q6_K and
// Q8_0. The byte order of the values, the i16 scale of each byte pair, the correction lanes and
// the float operations are those of the decoded row, so the results are the same bits.

/// The 64 values of 64-byte chunk `c` (0..4) of a Q4_K / Q6_K super-block `b`, and the i16
/// group scale of each value pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn chunk_q4k(b: &[u8; 144], sc: &[i16; 8], c: usize) -> (__m512i, __m512i) {
    // SAFETY: bytes 16 + 32c .. 16 + 32c + 32 of the 144-byte block.
    let q = unsafe { _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c).cast()) };
    let lo = _mm512_castsi256_si512(q);
    let v = _mm512_inserti64x4(lo, _mm256_srli_epi16(q, 4), 1);
    let wq = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    let sv = _mm512_mask_blend_epi16(
        0xFFFF_0000,
        _mm512_set1_epi16(sc[2 * c]),
        _mm512_set1_epi16(sc[2 * c + 1]),
    );
    (wq, sv)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn chunk_q6k(b: &[u8; 210], sc16: __m512i, c: usize) -> (__m512i, __m512i) {
    let h = c / 2;
    // SAFETY: ql bytes 64h .. 64h + 64 and qh bytes 128 + 32h .. 128 + 32h + 32 of the block.
    let (ql, qh) = unsafe {
        (
            _mm512_loadu_si512(b.as_ptr().add(64 * h).cast()),
            _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h).cast()),
        )
    };
    let qhz = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
    let (ql, qhz) = if c.is_multiple_of(2) {
        (ql, qhz)
    } else {
        (_mm512_srli_epi16(ql, 4), _mm512_srli_epi16(qhz, 4))
    };
    let lo = _mm512_and_si512(ql, _mm512_set1_epi8(0x0F));
    let hi = _mm512_slli_epi16(_mm512_and_si512(qhz, _mm512_set1_epi8(3)), 4);
    let wq = _mm512_or_si512(lo, hi);
    // i16 lane i of chunk c takes group 4c + i / 8.
    let base = (4 * c) as i16;
    let idx = _mm512_set_epi16(
        base + 3,
        base + 3,
        base + 3,
        base + 3,
        base + 3,
        base + 3,
        base + 3,
        base + 3,
        base + 2,
        base + 2,
        base + 2,
        base + 2,
        base + 2,
        base + 2,
        base + 2,
        base + 2,
        base + 1,
        base + 1,
        base + 1,
        base + 1,
        base + 1,
        base + 1,
        base + 1,
        base + 1,
        base,
        base,
        base,
        base,
        base,
        base,
        base,
        base,
    );
    (wq, _mm512_permutexvar_epi16(idx, sc16))
}

/// `TN` outputs of one Q4_K or Q6_K row (`row`: its blocks) for `TN` tokens.
pub(super) fn kdot_direct<const TN: usize>(
    t: Avx512Vnni,
    ty: super::QType,
    row: &[u8],
    x: [&[i8]; TN],
    xs: [&[i16]; TN],
    dx: [&[f32]; TN],
    out: &mut [f32],
) {
    let nsb = dx[0].len();
    let k = nsb * super::QK_K;
    assert!(
        matches!(ty, super::QType::Q4K | super::QType::Q6K)
            && row.len() == nsb * ty.block_bytes()
            && out.len() >= TN
            && (0..TN).all(|j| x[j].len() >= k && xs[j].len() >= k / 16 && dx[j].len() == nsb),
        "quant: kdot_direct sizes"
    );
    let _ = t;
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { kdot_direct_raw::<TN>(ty, row, x, xs, dx, nsb, out) }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `row` holds `nsb` blocks of `ty`, each token
/// `256 · nsb` values, `16 · nsb` sums and `nsb` scales; `out` holds `TN` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kdot_direct_raw<const TN: usize>(
    ty: super::QType,
    row: &[u8],
    x: [&[i8]; TN],
    xs: [&[i16]; TN],
    dx: [&[f32]; TN],
    nsb: usize,
    out: &mut [f32],
) {
    let bb = ty.block_bytes();
    let xp = x.map(|v| v.as_ptr());
    let sp = xs.map(|v| v.as_ptr());
    let mut fa = [_mm512_setzero_ps(); TN];
    let mut fb = [_mm256_setzero_ps(); TN];
    for s in 0..nsb {
        let blk = &row[s * bb..(s + 1) * bb];
        let mut ia = [_mm512_setzero_si512(); TN];
        let (cmv, da, db);
        if ty == super::QType::Q4K {
            let Ok(b) = <&[u8; 144]>::try_from(blk) else {
                return;
            };
            let mut sc = [0i16; 8];
            let mut cm = [0i16; 16];
            for j in 0..8 {
                let (a, m) = super::scale_min_k4(j, &b[4..16]);
                sc[j] = i16::from(a);
                cm[2 * j] = i16::from(m);
                cm[2 * j + 1] = i16::from(m);
            }
            // SAFETY: 16 i16 on the stack.
            cmv = unsafe { _mm256_loadu_si256(cm.as_ptr().cast()) };
            da = super::f16_at(b, 0);
            db = super::f16_at(b, 2);
            for c in 0..4 {
                let (wq, sv) = chunk_q4k(b, &sc, c);
                for j in 0..TN {
                    // SAFETY: token j's values hold 256 · nsb bytes.
                    let xv = unsafe { _mm512_loadu_si512(xp[j].add(s * 256 + 64 * c).cast()) };
                    ia[j] = _mm512_dpwssd_epi32(ia[j], _mm512_maddubs_epi16(wq, xv), sv);
                }
            }
        } else {
            let Ok(b) = <&[u8; 210]>::try_from(blk) else {
                return;
            };
            // SAFETY: the 16 scale bytes 192..208 of the block.
            let sc8 = unsafe { _mm_loadu_si128(b.as_ptr().add(192).cast()) };
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            cmv = _mm256_slli_epi16(sc16, 5);
            let scz = _mm512_castsi256_si512(sc16);
            da = super::f16_at(b, 208);
            db = da;
            for c in 0..4 {
                let (wq, sv) = chunk_q6k(b, scz, c);
                for j in 0..TN {
                    // SAFETY: token j's values hold 256 · nsb bytes.
                    let xv = unsafe { _mm512_loadu_si512(xp[j].add(s * 256 + 64 * c).cast()) };
                    ia[j] = _mm512_dpwssd_epi32(ia[j], _mm512_maddubs_epi16(wq, xv), sv);
                }
            }
        }
        for j in 0..TN {
            // SAFETY: token j's sums hold 16 · nsb values.
            let xsv = unsafe { _mm256_loadu_si256(sp[j].add(s * 16).cast()) };
            let cr = _mm256_madd_epi16(cmv, xsv);
            let (fa_s, fb_s) = (da * dx[j][s], db * dx[j][s]);
            fa[j] = _mm512_add_ps(
                fa[j],
                _mm512_mul_ps(_mm512_cvtepi32_ps(ia[j]), _mm512_set1_ps(fa_s)),
            );
            fb[j] = _mm256_add_ps(
                fb[j],
                _mm256_mul_ps(_mm256_cvtepi32_ps(cr), _mm256_set1_ps(fb_s)),
            );
        }
    }
    for j in 0..TN {
        out[j] = hsum16(fa[j]) - hsum8(fb[j]);
    }
}

/// `TN` outputs of one Q8_0 row (`row`: its blocks) for `TN` tokens (activations padded to a
/// multiple of 64 values).
pub(super) fn bdot_direct_q8<const TN: usize>(
    t: Avx512Vnni,
    row: &[u8],
    x: [&[i8]; TN],
    init: [&[i32]; TN],
    dx: [&[f32]; TN],
    out: &mut [f32],
) {
    let blocks = row.len() / 34;
    let lanes = blocks.div_ceil(2) * 16;
    assert!(
        row.len() == blocks * 34
            && out.len() >= TN
            && (0..TN).all(|j| {
                init[j].len() == lanes && dx[j].len() == lanes && x[j].len() == 4 * lanes
            }),
        "quant: bdot_direct sizes"
    );
    let _ = t;
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
    unsafe { bdot_direct_q8_raw::<TN>(row, x, init, dx, blocks, out) }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `row` holds `blocks` Q8_0 blocks; each token
/// `64 · ⌈blocks / 2⌉` values and `16 · ⌈blocks / 2⌉` init and scale lanes; `out` `TN` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn bdot_direct_q8_raw<const TN: usize>(
    row: &[u8],
    x: [&[i8]; TN],
    init: [&[i32]; TN],
    dx: [&[f32]; TN],
    blocks: usize,
    out: &mut [f32],
) {
    let xp = x.map(|v| v.as_ptr());
    let ip = init.map(|v| v.as_ptr());
    let dp = dx.map(|v| v.as_ptr());
    let flip = _mm256_set1_epi8(-128);
    let mut f = [_mm512_setzero_ps(); TN];
    for c in 0..blocks.div_ceil(2) {
        let b0 = &row[68 * c..68 * c + 34];
        // SAFETY: bytes 2..34 of block 2c.
        let q0 = unsafe { _mm256_loadu_si256(b0.as_ptr().add(2).cast()) };
        let d0 = super::f16_at(b0, 0);
        let (q1, d1) = if 2 * c + 1 < blocks {
            let b1 = &row[68 * c + 34..68 * c + 68];
            // SAFETY: bytes 2..34 of block 2c + 1.
            let q1 = unsafe { _mm256_loadu_si256(b1.as_ptr().add(2).cast()) };
            (q1, super::f16_at(b1, 0))
        } else {
            // Padding: a zero weight (the activations are zero there too).
            (_mm256_setzero_si256(), 0.0)
        };
        let wq = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_xor_si256(q0, flip)),
            _mm256_xor_si256(q1, flip),
            1,
        );
        let dwv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        for j in 0..TN {
            // SAFETY: 64 · c + 64 values and 16 · c + 16 lanes of token j.
            let (i0, xv, dxv) = unsafe {
                (
                    _mm512_loadu_si512(ip[j].add(16 * c).cast()),
                    _mm512_loadu_si512(xp[j].add(64 * c).cast()),
                    _mm512_loadu_ps(dp[j].add(16 * c)),
                )
            };
            let d = _mm512_dpbusd_epi32(i0, wq, xv);
            let fv = _mm512_mul_ps(dwv, dxv);
            f[j] = _mm512_add_ps(f[j], _mm512_mul_ps(_mm512_cvtepi32_ps(d), fv));
        }
    }
    for j in 0..TN {
        out[j] = hsum16(f[j]);
    }
}
