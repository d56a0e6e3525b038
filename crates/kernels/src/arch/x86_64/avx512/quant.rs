//! AVX-512 VNNI tile of the quantised-weight kernel (`super`): sixteen weight rows × up to
//! [`TOKENS`] tokens per step. The sixteen rows are decoded once per call (`super::Panel`) and
//! their values transposed so that one 64-byte register holds four consecutive values of each
//! row (i32 lane `j`: row `j`); each token's four activation bytes are broadcast, so one
//! `vpdpbusd` adds four products to each of the sixteen rows' sums. Per block (Q8_0 / Q4_0, 32
//! values, started at `−offset · Σ x`) or per scale group (K-quants: 32 values for Q4_K / Q5_K,
//! 16 for Q6_K, the group sum times the group scale with `vpmulld`; Q4_K's two half-group sums
//! fit in 16 bits, so its scale step is two `vpdpwssd`) the integer sums are exact,
//! and the K-quant corrections `Σ cm · xs` are `vpdpwssd` on i16 pairs; so every lane holds the
//! generic path's integer (`kdot_generic` / `bdot_generic`) and the float operations follow it
//! lane for lane (no fused multiply-adds): the results are the same bits (tested in
//! `quant::tests`).

use super::{prefetch_part, Act, Panel, QType, QK, QK_K};
use crate::cpu::Avx512Vnni;
use std::arch::x86_64::*;

/// Weight rows per tile (i32 lanes of a register).
pub(super) const ROWS: usize = 16;
/// Most tokens per tile (every type: a K-quant tile keeps its float sums in memory, they change
/// once per super-block).
pub(super) const TOKENS: usize = 8;

/// Most tokens of a call for which Q4_K / Q6_K tiles unpack their values from the blocks
/// ([`tile_rows`]) instead of from the panel's transposed copy: one tile (measured: at two
/// tiles, unpacking twice costs more than the copy).
pub(super) const FUSED_TOKENS: usize = TOKENS;

/// Tokens per tile for weights of type `ty`.
pub(super) fn tokens(_ty: QType) -> usize {
    TOKENS
}

/// `row.decode(w, r)` compiled with AVX-512 (the same integer and copy operations, vectorised).
pub(super) fn decode(_: Avx512Vnni, row: &mut super::Row, w: &super::QMatrix<'_>, r: usize) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn run(row: &mut super::Row, w: &super::QMatrix<'_>, r: usize) {
        row.decode(w, r);
    }
    // SAFETY: the token proves AVX-512 F, BW and VNNI; `run` is safe code.
    unsafe { run(row, w, r) }
}

/// `super::quantize_token_k` compiled with AVX-512 (the same operations, vectorised: the same
/// values).
pub(super) fn quantize_token_k(
    _: Avx512Vnni,
    x: &[f32],
    q: &mut [i8],
    xs: &mut [i16],
    d: &mut [f32],
) {
    #[target_feature(enable = "avx512f,avx512bw")]
    fn run(x: &[f32], q: &mut [i8], xs: &mut [i16], d: &mut [f32]) {
        super::quantize_token_k(x, q, xs, d);
    }
    // SAFETY: the token proves AVX-512 F and BW; `run` is safe code.
    unsafe { run(x, q, xs, d) }
}

/// `super::quantize_token_0` compiled with AVX-512 (the same operations, vectorised: the same
/// values).
pub(super) fn quantize_token_0(
    _: Avx512Vnni,
    off: i32,
    x: &[f32],
    q: &mut [i8],
    init: &mut [i32],
    d: &mut [f32],
) {
    #[target_feature(enable = "avx512f,avx512bw")]
    fn run(off: i32, x: &[f32], q: &mut [i8], init: &mut [i32], d: &mut [f32]) {
        super::quantize_token_0(off, x, q, init, d);
    }
    // SAFETY: the token proves AVX-512 F and BW; `run` is safe code.
    unsafe { run(off, x, q, init, d) }
}

/// Transposes sixteen rows of bytes (equal lengths, a multiple of 64) as 4-byte units: `dst`
/// (16 × that length) gets unit `g` of row `j` at byte `64 g + 4 j`.
pub(super) fn transpose16(_: Avx512Vnni, src: [&[u8]; 16], dst: &mut [u8]) {
    let len = src[0].len();
    assert!(
        len.is_multiple_of(64) && src.iter().all(|s| s.len() == len) && dst.len() == 16 * len,
        "quant: transpose sizes"
    );
    // SAFETY: the token proves AVX-512 F; the lengths are asserted above.
    unsafe { transpose16_raw(src.map(|s| s.as_ptr()), len / 64, dst.as_mut_ptr()) }
}

/// # Safety
/// The CPU must have AVX-512 F; each `src[j]` holds `64 · chunks` bytes, `dst` `1024 · chunks`.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_raw(src: [*const u8; 16], chunks: usize, dst: *mut u8) {
    for c in 0..chunks {
        let mut r = [_mm512_setzero_si512(); 16];
        for j in 0..16 {
            // SAFETY: bytes 64c .. 64c + 64 of row j.
            r[j] = unsafe { _mm512_loadu_si512(src[j].add(64 * c).cast()) };
        }
        // SAFETY: chunk c's 1024 bytes of `dst`.
        unsafe { transpose_regs(&r, dst.add(1024 * c)) };
    }
}

/// Stores the 4-byte units of sixteen registers transposed: unit `g` of `r[j]` at byte
/// `64 g + 4 j` of `dst`.
///
/// # Safety
/// The CPU must have AVX-512 F; `dst` holds 1024 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_regs(r: &[__m512i; 16], dst: *mut u8) {
    let o = transposed(r);
    for (u, v) in o.into_iter().enumerate() {
        // SAFETY: unit u < 16: bytes 64u .. 64u + 64 of the 1024.
        unsafe { _mm512_storeu_si512(dst.add(64 * u).cast(), v) };
    }
}

/// The 4-byte units of sixteen registers transposed: lane `j` of result `g` is unit `g` of
/// `r[j]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn transposed(r: &[__m512i; 16]) -> [__m512i; 16] {
    // Pairs of rows interleaved by 4-byte units, then by 8-byte units: b[4i + e] holds, in
    // 128-bit lane L, unit 4L + e of rows 4i .. 4i + 4.
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // The 4 × 4 transpose of 128-bit lanes of b[e], b[4 + e], b[8 + e], b[12 + e].
    let mut o = [_mm512_setzero_si512(); 16];
    for e in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x44>(b[e], b[4 + e]);
        let c1 = _mm512_shuffle_i32x4::<0xEE>(b[e], b[4 + e]);
        let c2 = _mm512_shuffle_i32x4::<0x44>(b[8 + e], b[12 + e]);
        let c3 = _mm512_shuffle_i32x4::<0xEE>(b[8 + e], b[12 + e]);
        o[e] = _mm512_shuffle_i32x4::<0x88>(c0, c2);
        o[4 + e] = _mm512_shuffle_i32x4::<0xDD>(c0, c2);
        o[8 + e] = _mm512_shuffle_i32x4::<0x88>(c1, c3);
        o[12 + e] = _mm512_shuffle_i32x4::<0xDD>(c1, c3);
    }
    o
}

/// The outputs of the panel's sixteen rows for tokens `t0 .. t0 + tn` (`1 <= tn <=
/// tokens(ty)`): `out[16 j + r]` for token `t0 + j` and row `r`.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile(
    _: Avx512Vnni,
    ty: QType,
    p: &Panel,
    act: &Act,
    t0: usize,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    let (k, nb) = (act.k, act.nb);
    let end = t0.saturating_add(tn);
    let common = tn >= 1
        && tn <= tokens(ty)
        && k == nb * ty.block_values()
        && p.q.len() >= 16 * k
        && p.da.len() >= 16 * nb
        && end.checked_mul(k).is_some_and(|v| act.x.len() >= v)
        && act.d.len() >= end * nb;
    if ty.is_k() {
        let g = super::group(ty);
        assert!(
            common
                && p.db.len() >= 16 * nb
                && p.sc.len() >= 16 * nb * (QK_K / g)
                && p.cm.len() >= 16 * nb * 8
                && act.xs.len() >= end * k / 16,
            "quant: tile sizes"
        );
        // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above; the
        // 16-bit scale step (`N`) is taken for Q4_K only, whose values are 4-bit.
        unsafe {
            match (ty, tn) {
                (QType::Q4K, 1) => ktile_raw::<1, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 2) => ktile_raw::<2, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 3) => ktile_raw::<3, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 4) => ktile_raw::<4, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 5) => ktile_raw::<5, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 6) => ktile_raw::<6, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, 7) => ktile_raw::<7, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q4K, _) => ktile_raw::<8, 32, true, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 1) => ktile_raw::<1, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 2) => ktile_raw::<2, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 3) => ktile_raw::<3, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 4) => ktile_raw::<4, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 5) => ktile_raw::<5, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 6) => ktile_raw::<6, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, 7) => ktile_raw::<7, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (QType::Q6K, _) => ktile_raw::<8, 16, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 1) => ktile_raw::<1, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 2) => ktile_raw::<2, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 3) => ktile_raw::<3, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 4) => ktile_raw::<4, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 5) => ktile_raw::<5, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 6) => ktile_raw::<6, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, 7) => ktile_raw::<7, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
                (_, _) => ktile_raw::<8, 32, false, false>(&NO_ROWS, p, act, t0, out, &[]),
            }
        }
    } else {
        assert!(common && act.init.len() >= end * nb, "quant: tile sizes");
        // SAFETY: the token proves AVX-512 F, BW and VNNI; the lengths are asserted above.
        unsafe {
            match tn {
                1 => btile_raw::<1>(p, act, t0, out),
                2 => btile_raw::<2>(p, act, t0, out),
                3 => btile_raw::<3>(p, act, t0, out),
                4 => btile_raw::<4>(p, act, t0, out),
                5 => btile_raw::<5>(p, act, t0, out),
                6 => btile_raw::<6>(p, act, t0, out),
                7 => btile_raw::<7>(p, act, t0, out),
                _ => btile_raw::<8>(p, act, t0, out),
            }
        }
    }
}

/// [`tile`] for Q4_K / Q6_K with the values unpacked straight from rows `r0 .. r0 + rows` of
/// `w` (`rows <= 16`) in registers, without the panel's transposed copy (only its scale lanes,
/// which must hold those rows): the same integers and float steps, so the same bits. For a
/// single tile of tokens, this spares the panel's stores and reloads. `next`: bytes to prefetch
/// meanwhile (the next panel's rows; empty for none).
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_rows(
    _: Avx512Vnni,
    w: &super::QMatrix<'_>,
    r0: usize,
    rows: usize,
    p: &Panel,
    act: &Act,
    t0: usize,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let (ty, k, nb) = (w.ty, act.k, act.nb);
    let end = t0.saturating_add(tn);
    let g = super::group(ty);
    assert!(
        matches!(ty, QType::Q4K | QType::Q6K)
            && rows <= 16
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && (1..=TOKENS).contains(&tn)
            && w.k == k
            && k == nb * QK_K
            && p.da.len() >= 16 * nb
            && p.db.len() >= 16 * nb
            && p.sc.len() >= 16 * nb * (QK_K / g)
            && p.cm.len() >= 16 * nb * 8
            && end.checked_mul(k).is_some_and(|v| act.x.len() >= v)
            && act.d.len() >= end * nb
            && act.xs.len() >= end * k / 16,
        "quant: tile sizes"
    );
    let src: [&[u8]; 16] = std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the type, rows and lengths are asserted
    // above (each `w.row` holds `nb` whole super-blocks); the 16-bit scale step (`N`) is taken
    // for Q4_K only, whose values are 4-bit.
    unsafe {
        match (ty, tn) {
            (QType::Q4K, 1) => ktile_raw::<1, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 2) => ktile_raw::<2, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 3) => ktile_raw::<3, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 4) => ktile_raw::<4, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 5) => ktile_raw::<5, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 6) => ktile_raw::<6, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, 7) => ktile_raw::<7, 32, true, true>(&src, p, act, t0, out, next),
            (QType::Q4K, _) => ktile_raw::<8, 32, true, true>(&src, p, act, t0, out, next),
            (_, 1) => ktile_raw::<1, 16, false, true>(&src, p, act, t0, out, next),
            (_, 2) => ktile_raw::<2, 16, false, true>(&src, p, act, t0, out, next),
            (_, 3) => ktile_raw::<3, 16, false, true>(&src, p, act, t0, out, next),
            (_, 4) => ktile_raw::<4, 16, false, true>(&src, p, act, t0, out, next),
            (_, 5) => ktile_raw::<5, 16, false, true>(&src, p, act, t0, out, next),
            (_, 6) => ktile_raw::<6, 16, false, true>(&src, p, act, t0, out, next),
            (_, 7) => ktile_raw::<7, 16, false, true>(&src, p, act, t0, out, next),
            (_, _) => ktile_raw::<8, 16, false, true>(&src, p, act, t0, out, next),
        }
    }
}

/// No rows: the panel path of [`ktile_raw`].
const NO_ROWS: [&[u8]; 16] = [&[]; 16];

/// The four activation bytes at `p`, broadcast to every i32 lane.
///
/// # Safety
/// The CPU must have AVX-512 F; `p .. p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bcast4<T>(p: *const T) -> __m512i {
    // SAFETY: the caller guarantees four readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `T <= 8`; `p` holds the sixteen rows of a Q8_0 /
/// Q4_0 matrix with `act.k` values (`16 · act.k` value bytes, `16 · act.nb` scales) and `act`
/// tokens `t0 .. t0 + T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn btile_raw<const T: usize>(
    p: &Panel,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    let nb = act.nb;
    let (pq, pd) = (p.q.as_ptr(), p.da.as_ptr());
    let (xp, ip, dp) = act.block_ptrs::<T>(t0);
    let mut f = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let mut w = [_mm512_setzero_si512(); 8];
        for (i, wi) in w.iter_mut().enumerate() {
            // SAFETY: unit 8b + i < k / 4 of the transposed values (64 bytes each).
            *wi = unsafe { _mm512_loadu_si512(pq.add(64 * (8 * b + i)).cast()) };
        }
        // SAFETY: scales 16b .. 16b + 16.
        let dwv = unsafe { _mm512_loadu_ps(pd.add(16 * b)) };
        for j in 0..T {
            // SAFETY: values QK·b .. QK·b + 32, block b's offset and scale of token j.
            let (x, i0, dx) = unsafe { (xp[j].add(QK * b), *ip[j].add(b), *dp[j].add(b)) };
            let mut a0 = _mm512_set1_epi32(i0);
            let mut a1 = _mm512_setzero_si512();
            for i in (0..8).step_by(2) {
                // SAFETY: bytes 4i .. 4i + 8 of the block's 32.
                let (x0, x1) = unsafe { (bcast4(x.add(4 * i)), bcast4(x.add(4 * i + 4))) };
                a0 = _mm512_dpbusd_epi32(a0, w[i], x0);
                a1 = _mm512_dpbusd_epi32(a1, w[i + 1], x1);
            }
            let s = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
            f[j] = _mm512_add_ps(
                f[j],
                _mm512_mul_ps(s, _mm512_mul_ps(dwv, _mm512_set1_ps(dx))),
            );
        }
    }
    for (j, fj) in f.into_iter().enumerate() {
        // SAFETY: 16 (j + 1) <= 16 T <= out.len().
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), fj) };
    }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `T <= 8`; `G` is the type's scale group (16 or
/// 32); `p` holds the sixteen rows of a K-quant matrix with `act.k` values (`16 · act.k` value
/// bytes; per super-block 16 · 256 / G scales, 16 · 8 correction pairs, 16 d and 16 db) and
/// `act` tokens `t0 .. t0 + T`. `N` (narrow) only when `G == 32`, the values are below 16 and the
/// scales below 2^15 (Q4_K): then each half group's integer sum (16 products, at most
/// 16 · 15 · 127 < 2^15 in magnitude) is an exact i16 and the scale step is `vpdpwssd`.
/// `F` (fused): the values are unpacked from `src` (the sixteen rows' blocks of Q4_K if `G` is
/// 32, Q6_K if 16; empty for missing rows) instead of read from `p.q`, which is then unused;
/// `next` is prefetched meanwhile, a share per chunk.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn ktile_raw<const T: usize, const G: usize, const N: bool, const F: bool>(
    src: &[&[u8]; 16],
    p: &Panel,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let nsb = act.nb;
    let ng = QK_K / G;
    let (pq, psc, pcm, pda, pdb) = (
        p.q.as_ptr(),
        p.sc.as_ptr(),
        p.cm.as_ptr(),
        p.da.as_ptr(),
        p.db.as_ptr(),
    );
    let (xp, sp, dp) = act.k_ptrs::<T>(t0);
    // The float sums change once per super-block: kept in memory, the registers go to the
    // integer sums of the T tokens.
    let mut fa = [0f32; ROWS * TOKENS];
    let mut fb = [0f32; ROWS * TOKENS];
    // Fused (`F`): the rows' blocks, unpacked and transposed in registers chunk by chunk.
    let fty = if G == 16 { QType::Q6K } else { QType::Q4K };
    for s in 0..nsb {
        let mut ia = [_mm512_setzero_si512(); T];
        for cc in 0..4 {
            // Chunk c: values 64c .. 64c + 64 of the sixteen rows, as 16 units of 4.
            let c = 4 * s + cc;
            let mut wv = [_mm512_setzero_si512(); 16];
            prefetch_part(next, c, 4 * nsb);
            if F {
                for (j, wj) in wv.iter_mut().enumerate() {
                    if !src[j].is_empty() {
                        // SAFETY: chunk c of a row of whole Q4_K / Q6_K super-blocks (caller).
                        *wj = unsafe { unpack_chunk(fty, src[j], c) };
                    }
                }
                wv = transposed(&wv);
            } else {
                for (u, wu) in wv.iter_mut().enumerate() {
                    // SAFETY: unit 16c + u < k / 4 of the transposed values.
                    *wu = unsafe { _mm512_loadu_si512(pq.add(64 * (16 * c + u)).cast()) };
                }
            }
            for gi in 0..64 / G {
                let g = cc * (64 / G) + gi;
                let v0 = s * QK_K + g * G;
                // SAFETY: group s · ng + g of the scales.
                let scv = unsafe { _mm512_loadu_si512(psc.add(16 * (s * ng + g)).cast()) };
                let w = &wv[gi * (G / 4)..(gi + 1) * (G / 4)];
                for j in 0..T {
                    // SAFETY: values v0 .. v0 + G of token j.
                    let x = unsafe { xp[j].add(v0) };
                    let mut a0 = _mm512_setzero_si512();
                    let mut a1 = _mm512_setzero_si512();
                    for i in (0..G / 4).step_by(2) {
                        // SAFETY: bytes 4i .. 4i + 8 of the group's G.
                        let (x0, x1) = unsafe { (bcast4(x.add(4 * i)), bcast4(x.add(4 * i + 4))) };
                        a0 = _mm512_dpbusd_epi32(a0, w[i], x0);
                        a1 = _mm512_dpbusd_epi32(a1, w[i + 1], x1);
                    }
                    ia[j] = if N {
                        // a0, a1: exact i16 in the low halves; scv's high halves are zero.
                        _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(ia[j], a0, scv), a1, scv)
                    } else {
                        let sum = _mm512_add_epi32(a0, a1);
                        _mm512_add_epi32(ia[j], _mm512_mullo_epi32(sum, scv))
                    };
                }
            }
        }
        let mut ib = [_mm512_setzero_si512(); T];
        for i in 0..8 {
            // SAFETY: correction pair 8s + i.
            let cmv = unsafe { _mm512_loadu_si512(pcm.add(16 * (8 * s + i)).cast()) };
            for j in 0..T {
                // SAFETY: sums 16s + 2i, 16s + 2i + 1 of token j.
                let xv = unsafe { bcast4(sp[j].add(16 * s + 2 * i)) };
                ib[j] = _mm512_dpwssd_epi32(ib[j], cmv, xv);
            }
        }
        // SAFETY: super-block s's sixteen scales.
        let (dav, dbv) = unsafe {
            (
                _mm512_loadu_ps(pda.add(16 * s)),
                _mm512_loadu_ps(pdb.add(16 * s)),
            )
        };
        for j in 0..T {
            // SAFETY: super-block s's scale of token j; lanes 16j .. 16j + 16 of fa / fb
            // (j < T <= TOKENS).
            unsafe {
                let dx = _mm512_set1_ps(*dp[j].add(s));
                let a = _mm512_mul_ps(_mm512_cvtepi32_ps(ia[j]), _mm512_mul_ps(dav, dx));
                let b = _mm512_mul_ps(_mm512_cvtepi32_ps(ib[j]), _mm512_mul_ps(dbv, dx));
                let (pa, pb) = (fa.as_mut_ptr().add(16 * j), fb.as_mut_ptr().add(16 * j));
                _mm512_storeu_ps(pa, _mm512_add_ps(_mm512_loadu_ps(pa), a));
                _mm512_storeu_ps(pb, _mm512_add_ps(_mm512_loadu_ps(pb), b));
            }
        }
    }
    for j in 0..T {
        // SAFETY: 16 (j + 1) <= 16 T <= out.len() = fa.len() = fb.len().
        unsafe {
            let (a, b) = (
                _mm512_loadu_ps(fa.as_ptr().add(16 * j)),
                _mm512_loadu_ps(fb.as_ptr().add(16 * j)),
            );
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), _mm512_sub_ps(a, b));
        }
    }
}

/// The 64 unsigned values `64 c .. 64 c + 64` of a row (`row`: its blocks) as `Row::decode`
/// writes them, unpacked in a register (Q8_0, Q4_K, Q6_K; values past the row's end: zero).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `ty` is one of those three types, `row` holds
/// whole blocks of it and `64 c` is below the row's length rounded up to 64.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn unpack_chunk(ty: QType, row: &[u8], c: usize) -> __m512i {
    let p = row.as_ptr();
    match ty {
        QType::Q8_0 => {
            let flip = _mm256_set1_epi8(-128);
            let nb = row.len() / 34;
            // SAFETY: bytes 2 .. 34 of block 2c (2c < nb: the chunk starts inside the row).
            let q0 = unsafe { _mm256_loadu_si256(p.add(68 * c + 2).cast()) };
            let q1 = if 2 * c + 1 < nb {
                // SAFETY: bytes 2 .. 34 of block 2c + 1.
                _mm256_xor_si256(
                    unsafe { _mm256_loadu_si256(p.add(68 * c + 36).cast()) },
                    flip,
                )
            } else {
                _mm256_setzero_si256()
            };
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_xor_si256(q0, flip)), q1)
        }
        QType::Q4K => {
            let (s, cc) = (c / 4, c % 4);
            // The 32 bytes in both halves (a broadcast load, no shuffle), the upper half shifted
            // to its high nibbles.
            // SAFETY: bytes 16 + 32cc .. 48 + 32cc of super-block s (144 bytes).
            let q = unsafe {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(144 * s + 16 + 32 * cc).cast()))
            };
            let sh = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
            _mm512_and_si512(_mm512_srlv_epi16(q, sh), _mm512_set1_epi8(0x0F))
        }
        _ => {
            // Q6_K.
            let (s, cc) = (c / 4, c % 4);
            let (b, h) = (p.wrapping_add(210 * s), cc / 2);
            // SAFETY: ql bytes 64h .. 64h + 64 and qh bytes 128 + 32h .. 160 + 32h of
            // super-block s (210 bytes).
            let (ql, qh) = unsafe {
                (
                    _mm512_loadu_si512(b.add(64 * h).cast()),
                    _mm256_loadu_si256(b.add(128 + 32 * h).cast()),
                )
            };
            let qhz = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2));
            let (ql, qhz) = if cc.is_multiple_of(2) {
                (ql, qhz)
            } else {
                (_mm512_srli_epi16(ql, 4), _mm512_srli_epi16(qhz, 4))
            };
            let lo = _mm512_and_si512(ql, _mm512_set1_epi8(0x0F));
            let hi = _mm512_slli_epi16(_mm512_and_si512(qhz, _mm512_set1_epi8(3)), 4);
            _mm512_or_si512(lo, hi)
        }
    }
}

/// Whether [`fill_values`] unpacks type `ty` straight from its blocks.
pub(super) fn direct(ty: QType) -> bool {
    matches!(ty, QType::Q8_0 | QType::Q4K | QType::Q6K)
}

/// The panel's transposed values (`dst`: 16 × the row length rounded up to 64) of rows
/// `r0 .. r0 + rows` of `w` (`rows <= 16`, type Q8_0, Q4_K or Q6_K), unpacked from the blocks in
/// registers; lanes of missing rows are zero. `next` (bytes the next panel reads) is prefetched
/// meanwhile.
pub(super) fn fill_values(
    _: Avx512Vnni,
    w: &super::QMatrix<'_>,
    r0: usize,
    rows: usize,
    dst: &mut [u8],
    next: &[u8],
) {
    let kp = super::padded_k(w.k);
    assert!(
        direct(w.ty)
            && rows <= 16
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && dst.len() == 16 * kp,
        "quant: fill sizes"
    );
    if w.ty == QType::Q8_0 && rows > 0 {
        let (rb, nb) = (w.row_bytes(), w.k / QK);
        let base = w.row(r0).as_ptr();
        // SAFETY: the token proves AVX-512 F, BW and VNNI; rows r0 .. r0 + rows hold nb whole
        // blocks each (`rb` bytes), and `dst` holds 16 · kp = 1024 · ⌈nb / 2⌉ bytes (asserted).
        unsafe { fill_q8_0_raw(base, rb, rows, nb, dst.as_mut_ptr(), next) };
        return;
    }
    let src: [&[u8]; 16] = std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
    // SAFETY: the token proves AVX-512 F, BW and VNNI; the type, rows and lengths are asserted
    // above (each `w.row` holds whole blocks of the type).
    unsafe { fill_values_raw(w.ty, src, kp / 64, dst.as_mut_ptr(), next) }
}

/// [`fill_values_raw`] for Q8_0: the same bytes (`w + 128`; lanes of missing rows zero), with
/// the sixteen rows' pointers fixed once and no per-row branch in the loop over block pairs.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `base` points at `rows` (1 ..= 16) consecutive rows
/// of `rb` bytes, each `nb` Q8_0 blocks; `dst` holds `1024 · ⌈nb / 2⌉` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn fill_q8_0_raw(
    base: *const u8,
    rb: usize,
    rows: usize,
    nb: usize,
    dst: *mut u8,
    next: &[u8],
) {
    // Missing rows repeat the last one; their lanes are zeroed after the transpose.
    let rp: [*const u8; 16] = std::array::from_fn(|j| base.wrapping_add(j.min(rows - 1) * rb));
    let live: __mmask16 = if rows >= 16 {
        0xFFFF
    } else {
        (1u16 << rows) - 1
    };
    let flip = _mm512_set1_epi8(-128);
    let chunks = nb.div_ceil(2);
    let store = |c: usize, r: &[__m512i; 16]| {
        let o = transposed(r);
        for (u, v) in o.into_iter().enumerate() {
            let v = if live == 0xFFFF {
                v
            } else {
                _mm512_maskz_mov_epi32(live, v)
            };
            // SAFETY: unit u < 16 of chunk c < ⌈nb / 2⌉: inside `dst` (caller).
            unsafe { _mm512_storeu_si512(dst.add(1024 * c + 64 * u).cast(), v) };
        }
    };
    for c in 0..nb / 2 {
        prefetch_part(next, c, chunks);
        let r: [__m512i; 16] = std::array::from_fn(|j| {
            // SAFETY: blocks 2c and 2c + 1 < nb of row j: bytes 68c + 2 .. 68c + 34 and
            // 68c + 36 .. 68c + 68 (caller).
            let v = unsafe {
                let lo = _mm256_loadu_si256(rp[j].add(68 * c + 2).cast());
                let hi = _mm256_loadu_si256(rp[j].add(68 * c + 36).cast());
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            };
            _mm512_xor_si512(v, flip)
        });
        store(c, &r);
    }
    if nb % 2 == 1 {
        // The odd last block: the upper half of each register is zero.
        let c = nb / 2;
        prefetch_part(next, c, chunks);
        let r: [__m512i; 16] = std::array::from_fn(|j| {
            // SAFETY: bytes 68c + 2 .. 68c + 34 of row j: block 2c = nb − 1 (caller).
            let lo = unsafe { _mm256_loadu_si256(rp[j].add(68 * c + 2).cast()) };
            _mm512_zextsi256_si512(_mm256_xor_si256(lo, _mm256_set1_epi8(-128)))
        });
        store(c, &r);
    }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `ty` is Q8_0, Q4_K or Q6_K; each non-empty
/// `src[j]` holds a row of `64 · chunks` values (rounded up) in whole blocks; `dst` holds
/// `1024 · chunks` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn fill_values_raw(ty: QType, src: [&[u8]; 16], chunks: usize, dst: *mut u8, next: &[u8]) {
    let mut r = [_mm512_setzero_si512(); 16];
    for c in 0..chunks {
        prefetch_part(next, c, chunks);
        for (j, rj) in r.iter_mut().enumerate() {
            *rj = if src[j].is_empty() {
                _mm512_setzero_si512()
            } else {
                // SAFETY: chunk c of a row of 64 · chunks values (caller).
                unsafe { unpack_chunk(ty, src[j], c) }
            };
        }
        // SAFETY: chunk c's 1024 bytes of `dst` (caller).
        unsafe { transpose_regs(&r, dst.add(1024 * c)) };
    }
}

/// The panel's scale lanes (`super::Panel` `da`, `db`, `sc`, `cm`) of rows `r0 .. r0 + rows` of
/// `w` (`rows <= 16`, type Q8_0, Q4_K or Q6_K), gathered from the blocks of the sixteen rows
/// and decoded in registers (the values `Row::decode` gives); lanes of missing rows are zero.
pub(super) fn fill_scales(
    _: Avx512Vnni,
    w: &super::QMatrix<'_>,
    r0: usize,
    rows: usize,
    p: &mut Panel,
) -> bool {
    let ty = w.ty;
    let (bb, nb) = (ty.block_bytes(), w.k / ty.block_values());
    let rb = w.row_bytes();
    // The gathers' i32 offsets reach 15 rows past the first.
    let fits = rb.checked_mul(16).is_some_and(|v| v <= i32::MAX as usize);
    if !fits || !direct(ty) {
        return false;
    }
    let ok = rows <= 16
        && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
        && p.da.len() >= 16 * nb
        && (!ty.is_k()
            || (p.db.len() >= 16 * nb
                && p.sc.len() >= 16 * nb * (QK_K / super::group(ty))
                && p.cm.len() >= 16 * nb * 8));
    assert!(ok, "quant: fill_scales sizes");
    if rows == 0 {
        return true;
    }
    let base = &w.data[r0 * rb..(r0 + rows) * rb];
    let mask: __mmask16 = if rows == 16 {
        0xFFFF
    } else {
        (1u16 << rows) - 1
    };
    // SAFETY: the token proves AVX-512 F, BW and VNNI; every gather reads 4 bytes inside block
    // b of row j < rows (masked), i.e. inside `base`, and the panel's lengths are asserted.
    unsafe { fill_scales_raw(ty, base.as_ptr(), rb as i32, bb, nb, mask, p) };
    true
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `base` points at the first of the rows selected by
/// `mask` (each `rb` bytes, `nb` blocks of `bb` bytes of type `ty`: Q8_0, Q4_K or Q6_K); the
/// panel's lanes hold `nb` blocks; `16 · rb` must fit in an `i32` (the gathers' lane offsets
/// `j · rb` would otherwise wrap and read outside the rows — the caller falls back to the scalar
/// gather in that case).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn fill_scales_raw(
    ty: QType,
    base: *const u8,
    rb: i32,
    bb: usize,
    nb: usize,
    mask: __mmask16,
    p: &mut Panel,
) {
    let idx = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(rb),
    );
    let zero = _mm512_setzero_si512();
    // Called below only with b < nb and at + 4 <= bb.
    let gather = |b: usize, at: usize| {
        // SAFETY: 4 bytes at offset `at` (at + 4 <= bb) of block b < nb of each row selected by
        // `mask` (caller).
        unsafe { _mm512_mask_i32gather_epi32::<1>(zero, mask, idx, base.add(b * bb + at).cast()) }
    };
    let half = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    let (da, db, sc, cm) = (
        p.da.as_mut_ptr(),
        p.db.as_mut_ptr(),
        p.sc.as_mut_ptr(),
        p.cm.as_mut_ptr(),
    );
    let m16 = _mm512_set1_epi32(0xFFFF);
    // Q4_K: byte masks, and `vpshufb` controls taking byte i of every 32-bit lane to its low
    // byte (`ctl_one`), or to its low byte and to the low byte of its high half (`ctl_two`);
    // the other bytes zero (control bit 7).
    let (c3f, c0f, c30) = (
        _mm512_set1_epi8(0x3F),
        _mm512_set1_epi8(0x0F),
        _mm512_set1_epi8(0x30),
    );
    // The lane's first byte within its 128-bit lane: 4 · (lane mod 4).
    let at = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
    let ctl_one: [__m512i; 4] = std::array::from_fn(|i| {
        _mm512_add_epi32(_mm512_set1_epi32(0x8080_8000_u32 as i32 | i as i32), at)
    });
    let ctl_two: [__m512i; 4] = std::array::from_fn(|i| {
        let both = _mm512_add_epi32(at, _mm512_slli_epi32::<16>(at));
        _mm512_add_epi32(
            _mm512_set1_epi32(0x8000_8000_u32 as i32 | (0x1_0001 * i as i32)),
            both,
        )
    });
    for b in 0..nb {
        // The stores below: 16 lanes at 16 · (block, group or pair index) of the panel's
        // arrays, which hold nb blocks (caller).
        match ty {
            // SAFETY: lanes 16b .. 16b + 16 of `da`.
            QType::Q8_0 => unsafe { _mm512_storeu_ps(da.add(16 * b), half(gather(b, 0))) },
            QType::Q4K => {
                let h = gather(b, 0);
                let (a, bq, c) = (gather(b, 4), gather(b, 8), gather(b, 12));
                // SAFETY: lanes 16b .. 16b + 16 of `da` and `db`.
                unsafe {
                    _mm512_storeu_ps(da.add(16 * b), half(h));
                    _mm512_storeu_ps(db.add(16 * b), half(_mm512_srli_epi32::<16>(h)));
                }
                // ggml's `get_scale_min_k4` on four bytes at once: byte i of `sv[0]` / `mv[0]`
                // is sub-block i's scale / min, of `sv[1]` / `mv[1]` sub-block 4 + i's (the
                // high two bits, `(q >> 6) << 4`, are `(q >> 2) & 0x30` of the 32-bit lane).
                let sv = [
                    _mm512_and_si512(a, c3f),
                    _mm512_or_si512(
                        _mm512_and_si512(c, c0f),
                        _mm512_and_si512(_mm512_srli_epi32::<2>(a), c30),
                    ),
                ];
                let mv = [
                    _mm512_and_si512(bq, c3f),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32::<4>(c), c0f),
                        _mm512_and_si512(_mm512_srli_epi32::<2>(bq), c30),
                    ),
                ];
                for j in 0..8 {
                    let (q, i) = (j / 4, j % 4);
                    let s = _mm512_shuffle_epi8(sv[q], ctl_one[i]);
                    let m = _mm512_shuffle_epi8(mv[q], ctl_two[i]);
                    let o = 16 * (8 * b + j);
                    // SAFETY: group / pair 8b + j of `sc` and `cm` (8 per super-block).
                    unsafe {
                        _mm512_storeu_si512(sc.add(o).cast(), s);
                        _mm512_storeu_si512(cm.add(o).cast(), m);
                    }
                }
            }
            _ => {
                // Q6_K: d at bytes 208..210 (the upper half of the dword at 206), the 16 i8
                // scales at 192..208.
                let d = half(_mm512_srli_epi32::<16>(gather(b, 206)));
                // SAFETY: lanes 16b .. 16b + 16 of `da` and `db`.
                unsafe {
                    _mm512_storeu_ps(da.add(16 * b), d);
                    _mm512_storeu_ps(db.add(16 * b), d);
                }
                let mut s = [zero; 16];
                for q in 0..4 {
                    let v = gather(b, 192 + 4 * q);
                    for i in 0..4 {
                        let sh = _mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * i as i32));
                        s[4 * q + i] = _mm512_srai_epi32::<24>(sh);
                    }
                }
                for (g, sg) in s.iter().enumerate() {
                    // SAFETY: group 16b + g of `sc` (16 per super-block).
                    unsafe { _mm512_storeu_si512(sc.add(16 * (16 * b + g)).cast(), *sg) };
                }
                for i in 0..8 {
                    let lo = _mm512_and_si512(_mm512_slli_epi32::<5>(s[2 * i]), m16);
                    let hi = _mm512_slli_epi32::<21>(s[2 * i + 1]);
                    // SAFETY: pair 8b + i of `cm` (8 per super-block).
                    unsafe {
                        _mm512_storeu_si512(
                            cm.add(16 * (8 * b + i)).cast(),
                            _mm512_or_si512(lo, hi),
                        )
                    };
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode calls (one token): Q8_0 blocks multiplied as they are stored.

/// Most tokens of a call for which Q8_0 weights are multiplied as stored ([`q8_0_direct`]):
/// one. Measured on one thread, from L2, `[256, 2048]`: 32.3 µs against 51.4 µs through the
/// panel's transposed copy; at two tokens the two paths are level (60.1 µs against 58.6 µs),
/// since each partial-sum register is reduced once per token while the copy serves both.
pub(super) const Q8_0_DIRECT_TOKENS: usize = 1;

/// Block pairs per strip of [`q8_0_direct_raw`] (1024 values: the strip's partial sums of 16
/// rows take 16 KB per token, inside L1).
const STRIP_PAIRS: usize = 16;

/// Whether [`q8_0_direct`] takes weights `w`: Q8_0, and the gathers' i32 offsets (up to 15 rows
/// past the first) fit.
pub(super) fn q8_0_direct_fits(w: &super::QMatrix<'_>) -> bool {
    w.ty == QType::Q8_0
        && w.row_bytes()
            .checked_mul(16)
            .is_some_and(|v| v <= i32::MAX as usize)
}

/// The outputs of rows `r0 .. r0 + rows` of Q8_0 weights `w` (`1 <= rows <= 16`) for tokens
/// `0 .. tn` of `act` (`1 <= tn <= 2`, all the call's tokens; the kernel dispatches here up to
/// [`Q8_0_DIRECT_TOKENS`]): `out[16 j + r]` for token `j` and row `r` (lanes of missing rows
/// hold copies of the last row's). Each row's
/// blocks are read in order, two blocks per register, and multiplied with the tokens' values
/// (`vpdpbusd` on `w + 128`, the block's `−128 · Σ x` added after), the sixteen partial-sum
/// registers of a block pair then reduced to one lane per row: the same integers as the
/// generic path's, and the float steps in its order, so the same bits. `next` (bytes the next
/// panel reads) is prefetched meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) fn q8_0_direct(
    _: Avx512Vnni,
    w: &super::QMatrix<'_>,
    r0: usize,
    rows: usize,
    act: &Act,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let (k, nb) = (act.k, act.nb);
    assert!(
        q8_0_direct_fits(w)
            && (1..=16).contains(&rows)
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && (1..=2).contains(&tn)
            && w.k == k
            && k == nb * QK
            && tn.checked_mul(k).is_some_and(|v| act.x.len() >= v)
            && act.d.len() >= tn * nb
            && act.init.len() >= tn * nb,
        "quant: direct tile sizes"
    );
    let rb = w.row_bytes();
    let base = w.row(r0).as_ptr();
    // SAFETY: the token proves AVX-512 F, BW and VNNI; rows r0 .. r0 + rows hold nb whole
    // blocks each (`rb` bytes), 16 · rb fits in an i32, and the activations hold tn tokens of
    // nb blocks (asserted above).
    unsafe {
        match tn {
            1 => q8_0_direct_raw::<1>(base, rb, rows, nb, act, out, next),
            _ => q8_0_direct_raw::<2>(base, rb, rows, nb, act, out, next),
        }
    }
}

/// Sixteen registers of partial sums (register `j`: row `j`, lanes 0–7 of one block, 8–15 of
/// the next) reduced to two: lane `j` of the first holds row `j`'s sum over the first block's
/// lanes, of the second over the next block's.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce_pairs(p: &[__m512i; 16]) -> (__m512i, __m512i) {
    // Per 128-bit lane: [p0+p2, q0+q2, p1+p3, q1+q3] of rows 2i, 2i + 1.
    let a: [__m512i; 8] = std::array::from_fn(|i| {
        _mm512_add_epi32(
            _mm512_unpacklo_epi32(p[2 * i], p[2 * i + 1]),
            _mm512_unpackhi_epi32(p[2 * i], p[2 * i + 1]),
        )
    });
    // Per 128-bit lane: the lane's sums of rows 4i .. 4i + 4.
    let b: [__m512i; 4] = std::array::from_fn(|i| {
        _mm512_add_epi32(
            _mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
            _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]),
        )
    });
    // [rows 0–3 first block, rows 0–3 next block, rows 4–7 first, rows 4–7 next] (and 8–15).
    let e0 = _mm512_add_epi32(
        _mm512_shuffle_i32x4::<0x88>(b[0], b[1]),
        _mm512_shuffle_i32x4::<0xDD>(b[0], b[1]),
    );
    let e1 = _mm512_add_epi32(
        _mm512_shuffle_i32x4::<0x88>(b[2], b[3]),
        _mm512_shuffle_i32x4::<0xDD>(b[2], b[3]),
    );
    (
        _mm512_shuffle_i32x4::<0x88>(e0, e1),
        _mm512_shuffle_i32x4::<0xDD>(e0, e1),
    )
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `base` points at `rows` (1 ..= 16) consecutive rows
/// of `rb` bytes, each `nb` Q8_0 blocks, `16 · rb` fits in an `i32`; `act` holds `T` (1 or 2)
/// tokens of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_0_direct_raw<const T: usize>(
    base: *const u8,
    rb: usize,
    rows: usize,
    nb: usize,
    act: &Act,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    // Missing rows repeat the last one (their lanes are not used).
    let rp: [*const u8; 16] = std::array::from_fn(|j| base.wrapping_add(j.min(rows - 1) * rb));
    let idx = _mm512_mullo_epi32(
        _mm512_min_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(rows as i32 - 1),
        ),
        _mm512_set1_epi32(rb as i32),
    );
    let (xp, ip, dp) = act.block_ptrs::<T>(0);
    let flip = _mm512_set1_epi8(-128);
    let pairs = nb.div_ceil(2);
    let strips = pairs.div_ceil(STRIP_PAIRS);
    let mut f = [_mm512_setzero_ps(); T];
    // The strip's partial sums: [pair][token][row], written before they are read.
    let mut part = [[[const { std::mem::MaybeUninit::<__m512i>::uninit() }; 16]; T]; STRIP_PAIRS];
    // Whole pairs; an odd last block is taken alone.
    let full = nb / 2;
    for s in 0..strips {
        let (q0, q1) = (s * STRIP_PAIRS, ((s + 1) * STRIP_PAIRS).min(pairs));
        let q1f = q1.min(full);
        // Row by row (each row's bytes in address order), the partial sums of every pair.
        for (j, &row) in rp.iter().enumerate() {
            prefetch_part(next, s * 16 + j, strips * 16);
            for q in q0..q1f {
                // SAFETY: blocks 2q and 2q + 1 < nb of row j: bytes 68q + 2 .. 68q + 34 and
                // 68q + 36 .. 68q + 68, inside the row's 34 · nb.
                let wv = unsafe {
                    let lo = _mm256_loadu_si256(row.add(68 * q + 2).cast());
                    let hi = _mm256_loadu_si256(row.add(68 * q + 36).cast());
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                };
                let wv = _mm512_xor_si512(wv, flip);
                for t in 0..T {
                    // SAFETY: values 64q .. 64q + 64 of token t (2q + 1 < nb).
                    let xv = unsafe { _mm512_loadu_si512(xp[t].add(64 * q).cast()) };
                    part[q - q0][t][j].write(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv));
                }
            }
            if q1f < q1 {
                // The odd last block (q1f = full, block 2 full = nb − 1), upper half zero.
                let q = q1f;
                // SAFETY: bytes 68q + 2 .. 68q + 34 of row j: block nb − 1.
                let wv = unsafe {
                    _mm512_zextsi256_si512(_mm256_loadu_si256(row.add(68 * q + 2).cast()))
                };
                let wv = _mm512_xor_si512(wv, flip);
                for t in 0..T {
                    // SAFETY: values 64q .. 64q + 32 of token t: block nb − 1.
                    let xv = unsafe {
                        _mm512_zextsi256_si512(_mm256_loadu_si256(xp[t].add(64 * q).cast()))
                    };
                    part[q - q0][t][j].write(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv));
                }
            }
        }
        // Pair by pair: one lane per row, then the float steps block by block in order.
        for q in q0..q1 {
            let b = 2 * q;
            let gather = |b: usize| {
                // SAFETY: 4 bytes at the start of block b < nb of each of the sixteen (repeated)
                // rows: inside their blocks.
                let v = unsafe {
                    _mm512_i32gather_epi32::<1>(idx, base.add(34 * b).cast::<i32>().cast())
                };
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
            };
            let dw0 = gather(b);
            let dw1 = if b + 1 < nb { gather(b + 1) } else { dw0 };
            for t in 0..T {
                // SAFETY: the row loop above wrote all sixteen rows of pair q, token t, and
                // `MaybeUninit<__m512i>` has the layout of `__m512i`.
                let p = unsafe { &*part[q - q0][t].as_ptr().cast::<[__m512i; 16]>() };
                let (s0, s1) = reduce_pairs(p);
                for (bb, sum, dw) in [(b, s0, dw0), (b + 1, s1, dw1)] {
                    if bb < nb {
                        // SAFETY: block bb < nb's offset and scale of token t.
                        let (i0, dx) = unsafe { (*ip[t].add(bb), *dp[t].add(bb)) };
                        let sum = _mm512_add_epi32(sum, _mm512_set1_epi32(i0));
                        f[t] = _mm512_add_ps(
                            f[t],
                            _mm512_mul_ps(
                                _mm512_cvtepi32_ps(sum),
                                _mm512_mul_ps(dw, _mm512_set1_ps(dx)),
                            ),
                        );
                    }
                }
            }
        }
    }
    for (t, ft) in f.into_iter().enumerate() {
        // SAFETY: 16 (t + 1) <= 16 T <= out.len().
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * t), ft) };
    }
}
