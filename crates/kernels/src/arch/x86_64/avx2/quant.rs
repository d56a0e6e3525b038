//! AVX2 tile of the quantised-weight kernel (`super`): eight weight rows × up to [`TOKENS`]
//! tokens per step. The eight rows of a strip are prepared once per call and their
//! values transposed so that one 32-byte register holds four consecutive values of each row (i32
//! lane `j`: row `j`); each token's four activation bytes are broadcast, so one `vpmaddubsw`
//! multiplies four values of eight rows (two i16 pair sums per lane). Q8_0, Q4_K and Q6_K are
//! unpacked in registers straight from the blocks; Q4_0 and Q5_K through a decoded row. Q8_0 calls
//! of at most `DIRECT_TOKENS` tokens skip the transposed copy: each block of each row is
//! multiplied as it is and eight rows' sums are reduced into one register's lanes.
//!
//! No i16 sum can saturate: Q8_0 uses the sign trick (`|w| · sign(x, w)`, `|w| <= 128`,
//! `|x| <= 127`: a pair sum is at most 32512), widened to i32 (`vpmaddwd` by ones) after every
//! `vpmaddubsw`; the other types add `U` `vpmaddubsw` results in i16 first (values below 16, 32,
//! 64: `U` = 8, 4, 2 keeps the sums within 16 · 15 · 127, 8 · 31 · 127, 4 · 63 · 127), then
//! `vpmaddwd` by ones (Q4_0) or by the group's scale (K-quants). The K-quant corrections
//! `Σ cm · xs` are `vpmaddwd` on i16 pairs. So every lane holds the generic path's exact integer
//! (`kdot_generic` / `bdot_generic`: for Q8_0 `Σ w · x`, which is `−128 · Σ x + Σ (w + 128) · x`),
//! and the float operations follow it lane for lane (`_mm256_mul_ps` / `_mm256_add_ps`, no fused
//! multiply-adds): the results are the same bits (tested in `quant::tests`).

use super::{group, Act, QMatrix, QType, Row, QK, QK_K};
use crate::cpu::Avx2;
use std::arch::x86_64::*;

/// Weight rows per strip (i32 lanes of a register).
pub(super) const ROWS: usize = 8;
/// Most tokens per tile.
pub(super) const TOKENS: usize = 4;

/// `row.decode(w, r)` compiled with AVX2 (the same integer and copy operations, vectorised).
pub(super) fn decode(_: Avx2, row: &mut Row, w: &QMatrix<'_>, r: usize) {
    #[target_feature(enable = "avx2")]
    fn run(row: &mut Row, w: &QMatrix<'_>, r: usize) {
        row.decode(w, r);
    }
    // SAFETY: the token proves AVX2; `run` is safe code.
    unsafe { run(row, w, r) }
}

/// Eight weight rows prepared for the tile (per thread, reused): decoded, the values transposed
/// (i32 lane `j` of each 32 bytes: four values of row `j`), the scales as eight-lane vectors.
/// Lanes of rows past the matrix's end are zero.
pub(super) struct Strip {
    ty: QType,
    k: usize,
    rows: Vec<Row>,
    /// Zeros standing in for missing rows (a decoded row's length).
    zero: Vec<u8>,
    /// 8 × kp bytes: the four values `4g .. 4g + 4` of row `j` at `32 g + 4 j` (Q8_0: `|w|`;
    /// other types: the unsigned value `Row::decode` gives).
    q: Vec<u8>,
    /// Q8_0: the signed values `w`, laid out as `q` (empty for the other types).
    s: Vec<u8>,
    /// Per (super-)block × 8 rows: d.
    da: Vec<f32>,
    /// K-quants, per super-block × 8 rows: the correction's scale.
    db: Vec<f32>,
    /// K-quants, per scale group × 8 rows: the scale as i16 in both halves of the lane.
    sc: Vec<i32>,
    /// K-quants, per pair of 16-value groups × 8 rows: the two correction multipliers as i16
    /// (low half: the even group).
    cm: Vec<i32>,
}

impl Strip {
    /// Buffers for weights of type `ty` and row length `k` (a positive multiple of the block).
    pub(super) fn new(ty: QType, k: usize) -> Strip {
        let kp = super::padded_k(k);
        let nb = k / ty.block_values();
        let (db, sc, cm) = if ty.is_k() {
            (
                vec![0f32; ROWS * nb],
                vec![0i32; ROWS * (k / group(ty))],
                vec![0i32; ROWS * (k / 32)],
            )
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        Strip {
            ty,
            k,
            // Q8_0, Q4_K and Q6_K are read straight from their blocks.
            rows: if matches!(ty, QType::Q8_0 | QType::Q4K | QType::Q6K) {
                Vec::new()
            } else {
                (0..ROWS).map(|_| Row::new(ty, k)).collect()
            },
            zero: vec![0u8; kp],
            q: vec![0u8; ROWS * kp],
            s: if ty == QType::Q8_0 {
                vec![0u8; ROWS * kp]
            } else {
                Vec::new()
            },
            da: vec![0f32; ROWS * nb],
            db,
            sc,
            cm,
        }
    }

    /// Prepares rows `r0 .. r0 + rows` of `w` (`1 <= rows <= 8`, `w` of this strip's type and
    /// row length).
    fn fill(&mut self, t: Avx2, w: &QMatrix<'_>, r0: usize, rows: usize) {
        assert!(
            w.ty == self.ty
                && w.k == self.k
                && (1..=ROWS).contains(&rows)
                && r0.checked_add(rows).is_some_and(|e| e <= w.rows),
            "quant: strip sizes"
        );
        match self.ty {
            QType::Q8_0 => return self.fill_q8_0(t, w, r0, rows),
            QType::Q4K | QType::Q6K => return self.fill_k_direct(t, w, r0, rows),
            _ => {}
        }
        for (j, row) in self.rows.iter_mut().enumerate().take(rows) {
            decode(t, row, w, r0 + j);
        }
        let src: [&[u8]; ROWS] = std::array::from_fn(|j| {
            if j < rows {
                &self.rows[j].q[..]
            } else {
                &self.zero[..]
            }
        });
        transpose8(t, src, &mut self.q);
        let ty = self.ty;
        let live = |j: usize| j < rows;
        if ty.is_k() {
            let g = group(ty);
            let ng = QK_K / g;
            let pair = |lo: i16, hi: i16| i32::from(lo as u16) | (i32::from(hi as u16) << 16);
            for s in 0..w.k / QK_K {
                for j in 0..ROWS {
                    let row = &self.rows[j];
                    let on = live(j);
                    self.da[ROWS * s + j] = if on { row.da[s] } else { 0.0 };
                    self.db[ROWS * s + j] = if on { row.db[s] } else { 0.0 };
                    for i in 0..ng {
                        let v = row.sc[(s * QK_K + i * g) / 2];
                        self.sc[ROWS * (s * ng + i) + j] = if on { pair(v, v) } else { 0 };
                    }
                    for i in 0..8 {
                        let (lo, hi) = (row.cm[16 * s + 2 * i], row.cm[16 * s + 2 * i + 1]);
                        self.cm[ROWS * (8 * s + i) + j] = if on { pair(lo, hi) } else { 0 };
                    }
                }
            }
        } else {
            for b in 0..w.k / QK {
                for j in 0..ROWS {
                    self.da[ROWS * b + j] = if live(j) { self.rows[j].da[b] } else { 0.0 };
                }
            }
        }
    }
}

impl Strip {
    /// [`Strip::fill`] for Q8_0: the values read straight from the blocks (no decoded row).
    fn fill_q8_0(&mut self, _: Avx2, w: &QMatrix<'_>, r0: usize, rows: usize) {
        let nb = w.k / QK;
        assert!(
            self.q.len() >= ROWS * 32 * nb
                && self.s.len() >= ROWS * 32 * nb
                && self.da.len() >= ROWS * nb,
            "quant: strip sizes"
        );
        let src: [&[u8]; ROWS] =
            std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
        for (j, row) in src.iter().enumerate() {
            for b in 0..nb {
                self.da[ROWS * b + j] = if row.is_empty() {
                    0.0
                } else {
                    super::f16_at(row, 34 * b)
                };
            }
        }
        // SAFETY: the token proves AVX2; every non-empty row holds `nb` whole Q8_0 blocks
        // (`w.row`) and the buffers' lengths are asserted above.
        unsafe { fill_q8_0_raw(src, nb, self.q.as_mut_ptr(), self.s.as_mut_ptr()) }
    }
}

impl Strip {
    /// [`Strip::fill`] for Q4_K and Q6_K: the values unpacked in registers straight from the
    /// blocks, the scales read from them (the values `Row::decode` gives; no decoded row).
    fn fill_k_direct(&mut self, _: Avx2, w: &QMatrix<'_>, r0: usize, rows: usize) {
        let ty = w.ty;
        let nsb = w.k / QK_K;
        let (bb, ng) = (ty.block_bytes(), QK_K / group(ty));
        assert!(
            matches!(ty, QType::Q4K | QType::Q6K)
                && self.q.len() >= ROWS * QK_K * nsb
                && self.da.len() >= ROWS * nsb
                && self.db.len() >= ROWS * nsb
                && self.sc.len() >= ROWS * ng * nsb
                && self.cm.len() >= ROWS * 8 * nsb,
            "quant: strip sizes"
        );
        let src: [&[u8]; ROWS] =
            std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
        let pair = |lo: i16, hi: i16| i32::from(lo as u16) | (i32::from(hi as u16) << 16);
        for (j, row) in src.iter().enumerate() {
            for s in 0..nsb {
                let (da, db, sc, cm) = (
                    &mut self.da[ROWS * s + j],
                    &mut self.db[ROWS * s + j],
                    &mut self.sc[ROWS * ng * s..ROWS * ng * (s + 1)],
                    &mut self.cm[ROWS * 8 * s..ROWS * 8 * (s + 1)],
                );
                if row.is_empty() {
                    (*da, *db) = (0.0, 0.0);
                    for g in 0..ng {
                        sc[ROWS * g + j] = 0;
                    }
                    for i in 0..8 {
                        cm[ROWS * i + j] = 0;
                    }
                    continue;
                }
                let blk = &row[s * bb..(s + 1) * bb];
                if ty == QType::Q4K {
                    (*da, *db) = (super::f16_at(blk, 0), super::f16_at(blk, 2));
                    for i in 0..8 {
                        let (v, m) = super::scale_min_k4(i, &blk[4..16]);
                        let (v, m) = (i16::from(v), i16::from(m));
                        sc[ROWS * i + j] = pair(v, v);
                        cm[ROWS * i + j] = pair(m, m);
                    }
                } else {
                    let d = super::f16_at(blk, 208);
                    (*da, *db) = (d, d);
                    let v = |g: usize| i16::from(blk[192 + g] as i8);
                    for g in 0..16 {
                        sc[ROWS * g + j] = pair(v(g), v(g));
                    }
                    for i in 0..8 {
                        cm[ROWS * i + j] = pair(32 * v(2 * i), 32 * v(2 * i + 1));
                    }
                }
            }
        }
        // SAFETY: the token proves AVX2; every non-empty row holds `nsb` whole super-blocks of
        // `ty` (`w.row`) and `self.q`'s length is asserted above.
        unsafe { fill_k_raw(ty, src, nsb, self.q.as_mut_ptr()) }
    }
}

/// The 32 unsigned values `32 c .. 32 c + 32` of a Q4_K or Q6_K super-block at `b` as
/// `Row::decode` writes them (`c < 8`).
///
/// # Safety
/// The CPU must have AVX2; `b` points at a whole super-block of `ty` (Q4_K or Q6_K).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_k(ty: QType, b: *const u8, c: usize) -> __m256i {
    let low = _mm256_set1_epi8(0x0F);
    if ty == QType::Q4K {
        // SAFETY: qs bytes 32 (c / 2) .. + 32 (at 16 + …, inside the 144 bytes).
        let q = unsafe { _mm256_loadu_si256(b.add(16 + 32 * (c / 2)).cast()) };
        let q = if c.is_multiple_of(2) {
            q
        } else {
            _mm256_srli_epi16::<4>(q)
        };
        _mm256_and_si256(q, low)
    } else {
        let (h, m) = (c / 4, c % 4);
        // SAFETY: ql bytes 64h + 32 (m % 2) .. + 32 and qh bytes 128 + 32h .. + 32 (inside the
        // 210 bytes).
        let (ql, qh) = unsafe {
            (
                _mm256_loadu_si256(b.add(64 * h + 32 * (m % 2)).cast()),
                _mm256_loadu_si256(b.add(128 + 32 * h).cast()),
            )
        };
        let ql = if m < 2 {
            ql
        } else {
            _mm256_srli_epi16::<4>(ql)
        };
        let qh = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * m as i32));
        let hi = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3)));
        _mm256_or_si256(_mm256_and_si256(ql, low), hi)
    }
}

/// # Safety
/// The CPU must have AVX2; `ty` is Q4_K or Q6_K; each non-empty `src[j]` holds `nsb` whole
/// super-blocks of it; `dst` holds `2048 · nsb` bytes.
#[target_feature(enable = "avx2")]
unsafe fn fill_k_raw(ty: QType, src: [&[u8]; ROWS], nsb: usize, dst: *mut u8) {
    let bb = ty.block_bytes();
    for s in 0..nsb {
        for c in 0..8 {
            let r: [__m256i; ROWS] = std::array::from_fn(|j| {
                if src[j].is_empty() {
                    _mm256_setzero_si256()
                } else {
                    // SAFETY: super-block s of row j (caller).
                    unsafe { unpack_k(ty, src[j].as_ptr().add(s * bb), c) }
                }
            });
            // SAFETY: chunk 8s + c's 256 bytes of `dst`.
            unsafe { transpose_regs(&r, dst.add(256 * (8 * s + c))) };
        }
    }
}

/// # Safety
/// The CPU must have AVX2; each non-empty `src[j]` holds `nb` Q8_0 blocks (34 bytes each);
/// `dst` and `signed` hold `256 · nb` bytes.
#[target_feature(enable = "avx2")]
unsafe fn fill_q8_0_raw(src: [&[u8]; ROWS], nb: usize, dst: *mut u8, signed: *mut u8) {
    for b in 0..nb {
        let w: [__m256i; ROWS] = std::array::from_fn(|j| {
            if src[j].is_empty() {
                _mm256_setzero_si256()
            } else {
                // SAFETY: bytes 2 .. 34 of block b of row j.
                unsafe { _mm256_loadu_si256(src[j].as_ptr().add(34 * b + 2).cast()) }
            }
        });
        let a = w.map(|v| _mm256_abs_epi8(v));
        // SAFETY: block b's 256 bytes of `dst` and `signed`.
        unsafe {
            transpose_regs(&a, dst.add(256 * b));
            transpose_regs(&w, signed.add(256 * b));
        }
    }
}

/// Transposes eight rows of bytes (equal lengths, a multiple of 32) as 4-byte units: `dst`
/// (8 × that length) gets unit `g` of row `j` at byte `32 g + 4 j`.
fn transpose8(_: Avx2, src: [&[u8]; ROWS], dst: &mut [u8]) {
    let len = src[0].len();
    assert!(
        len.is_multiple_of(32) && src.iter().all(|s| s.len() == len) && dst.len() == ROWS * len,
        "quant: transpose sizes"
    );
    // SAFETY: the token proves AVX2; the lengths are asserted above.
    unsafe { transpose8_raw(src.map(|s| s.as_ptr()), len / 32, dst.as_mut_ptr()) }
}

/// # Safety
/// The CPU must have AVX2; each `src[j]` holds `32 · chunks` bytes, `dst` `256 · chunks`.
#[target_feature(enable = "avx2")]
unsafe fn transpose8_raw(src: [*const u8; ROWS], chunks: usize, dst: *mut u8) {
    for c in 0..chunks {
        let mut r = [_mm256_setzero_si256(); ROWS];
        for j in 0..ROWS {
            // SAFETY: bytes 32c .. 32c + 32 of row j.
            r[j] = unsafe { _mm256_loadu_si256(src[j].add(32 * c).cast()) };
        }
        // SAFETY: chunk c's 256 bytes of `dst`.
        unsafe { transpose_regs(&r, dst.add(256 * c)) };
    }
}

/// Stores the 4-byte units of eight registers transposed: unit `g` of `r[j]` at byte `32 g + 4 j`
/// of `dst`.
///
/// # Safety
/// The CPU must have AVX2; `dst` holds 256 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose_regs(r: &[__m256i; ROWS], dst: *mut u8) {
    // a[2i], a[2i + 1]: rows 2i, 2i + 1 interleaved by units (per 128-bit lane).
    let mut a = [_mm256_setzero_si256(); ROWS];
    for i in 0..4 {
        a[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4h + e]: unit e (+ 4 in the upper 128-bit lane) of rows 4h .. 4h + 4.
    let mut b = [_mm256_setzero_si256(); ROWS];
    for h in 0..2 {
        b[4 * h] = _mm256_unpacklo_epi64(a[4 * h], a[4 * h + 2]);
        b[4 * h + 1] = _mm256_unpackhi_epi64(a[4 * h], a[4 * h + 2]);
        b[4 * h + 2] = _mm256_unpacklo_epi64(a[4 * h + 1], a[4 * h + 3]);
        b[4 * h + 3] = _mm256_unpackhi_epi64(a[4 * h + 1], a[4 * h + 3]);
    }
    for e in 0..4 {
        let lo = _mm256_permute2x128_si256::<0x20>(b[e], b[4 + e]);
        let hi = _mm256_permute2x128_si256::<0x31>(b[e], b[4 + e]);
        // SAFETY: units e and 4 + e: bytes 32e .. 32e + 32 and 32 (4 + e) .. + 32 of the 256.
        unsafe {
            _mm256_storeu_si256(dst.add(32 * e).cast(), lo);
            _mm256_storeu_si256(dst.add(32 * (4 + e)).cast(), hi);
        }
    }
}

/// The outputs of rows `r0 .. r0 + rows` of `w` (`rows <= 16`) for all `n` tokens of `act`:
/// `out[t · rows + r]` for token `t` and row `r0 + r`.
#[allow(clippy::too_many_arguments)]
pub(super) fn panel(
    t: Avx2,
    strip: &mut Strip,
    w: &QMatrix<'_>,
    act: &Act,
    n: usize,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    assert!(
        n.checked_mul(rows).is_some_and(|v| out.len() == v),
        "quant: panel sizes"
    );
    let mut tile = [0f32; ROWS * TOKENS];
    let direct = w.ty == QType::Q8_0 && n <= DIRECT_TOKENS;
    let mut h = 0;
    while h < rows {
        let rr = ROWS.min(rows - h);
        if direct {
            // Few tokens: the blocks multiplied as they are, no transposed copy.
            direct_q8_0(t, w, r0 + h, rr, act, n, &mut tile);
            for j in 0..n {
                let o = j * rows + h;
                out[o..o + rr].copy_from_slice(&tile[ROWS * j..ROWS * j + rr]);
            }
            h += rr;
            continue;
        }
        strip.fill(t, w, r0 + h, rr);
        let mut t0 = 0;
        while t0 < n {
            let tn = TOKENS.min(n - t0);
            run_tile(t, strip, act, t0, tn, &mut tile);
            for j in 0..tn {
                let o = (t0 + j) * rows + h;
                out[o..o + rr].copy_from_slice(&tile[ROWS * j..ROWS * j + rr]);
            }
            t0 += tn;
        }
        h += rr;
    }
}

/// Most tokens of a call for which Q8_0 rows are multiplied straight from their blocks
/// ([`direct_q8_0`]); the transposed strip pays off from here on.
const DIRECT_TOKENS: usize = 2;

/// The outputs of rows `r0 .. r0 + rows` of Q8_0 `w` (`1 <= rows <= 8`) for tokens `0 .. tn`
/// of `act` (`1 <= tn <= DIRECT_TOKENS`), multiplied straight from the blocks: per row and
/// block the 32 products in one register (the sign trick, as the tile), the eight rows' sums
/// reduced into one register's lanes (`vphaddd`), then the tile's float operations.
fn direct_q8_0(
    _: Avx2,
    w: &QMatrix<'_>,
    r0: usize,
    rows: usize,
    act: &Act,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    let (k, nb) = (act.k, act.nb);
    assert!(
        w.ty == QType::Q8_0
            && w.k == k
            && k == nb * QK
            && (1..=ROWS).contains(&rows)
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && (1..=DIRECT_TOKENS).contains(&tn)
            && act.x.len() >= tn * k
            && act.d.len() >= tn * nb,
        "quant: direct sizes"
    );
    let src: [&[u8]; ROWS] = std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
    // SAFETY: the token proves AVX2; every non-empty row holds `nb` whole Q8_0 blocks
    // (`w.row`), and the activations' lengths are asserted above.
    unsafe {
        if tn == 1 {
            bdirect_raw::<1>(src, act, out);
        } else {
            bdirect_raw::<2>(src, act, out);
        }
    }
}

/// The lane sums of eight registers: lane `r` of the result is the sum of `v[r]`'s lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8x8(v: &[__m256i; ROWS]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // Low 128-bit lane: rows 0-3 (4-7) of the values' lanes 0-3; high: of lanes 4-7.
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x31>(a, b),
    )
}

/// # Safety
/// The CPU must have AVX2; `T <= DIRECT_TOKENS`; each non-empty `src[j]` holds `act.nb` Q8_0
/// blocks; `act` holds tokens `0 .. T`.
#[target_feature(enable = "avx2")]
unsafe fn bdirect_raw<const T: usize>(
    src: [&[u8]; ROWS],
    act: &Act,
    out: &mut [f32; ROWS * TOKENS],
) {
    let (k, nb) = (act.k, act.nb);
    let ones = _mm256_set1_epi16(1);
    let mut f = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let mut dw = [0f32; ROWS];
        for (d, row) in dw.iter_mut().zip(&src) {
            if !row.is_empty() {
                *d = super::f16_at(row, 34 * b);
            }
        }
        // SAFETY: eight floats.
        let dwv = unsafe { _mm256_loadu_ps(dw.as_ptr()) };
        // SAFETY: values 32b .. 32b + 32 of token j < T (caller).
        let xs: [__m256i; T] = std::array::from_fn(|j| unsafe {
            _mm256_loadu_si256(act.x.as_ptr().add(j * k + QK * b).cast())
        });
        let mut v = [[_mm256_setzero_si256(); ROWS]; T];
        for (r, row) in src.iter().enumerate() {
            if row.is_empty() {
                continue;
            }
            // SAFETY: bytes 2 .. 34 of block b of the row (caller).
            let wv = unsafe { _mm256_loadu_si256(row.as_ptr().add(34 * b + 2).cast()) };
            let a = _mm256_abs_epi8(wv);
            for j in 0..T {
                let pr = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xs[j], wv));
                v[j][r] = _mm256_madd_epi16(pr, ones);
            }
        }
        for j in 0..T {
            let s = _mm256_cvtepi32_ps(hsum8x8(&v[j]));
            let dx = _mm256_set1_ps(act.d[j * nb + b]);
            f[j] = _mm256_add_ps(f[j], _mm256_mul_ps(s, _mm256_mul_ps(dwv, dx)));
        }
    }
    for (j, fj) in f.into_iter().enumerate() {
        // SAFETY: 8 (j + 1) <= 8 T <= out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(ROWS * j), fj) };
    }
}

/// The outputs of the strip's eight rows for tokens `t0 .. t0 + tn` (`1 <= tn <= TOKENS`):
/// `out[8 j + r]` for token `t0 + j` and row `r`.
fn run_tile(_: Avx2, p: &Strip, act: &Act, t0: usize, tn: usize, out: &mut [f32; ROWS * TOKENS]) {
    let ty = p.ty;
    let (k, nb) = (act.k, act.nb);
    let end = t0.saturating_add(tn);
    let common = (1..=TOKENS).contains(&tn)
        && k == p.k
        && k == nb * ty.block_values()
        && p.q.len() >= ROWS * k
        && p.da.len() >= ROWS * nb
        && end.checked_mul(k).is_some_and(|v| act.x.len() >= v)
        && act.d.len() >= end * nb;
    if ty.is_k() {
        let g = group(ty);
        assert!(
            common
                && p.db.len() >= ROWS * nb
                && p.sc.len() >= ROWS * nb * (QK_K / g)
                && p.cm.len() >= ROWS * nb * 8
                && act.xs.len() >= end * k / 16,
            "quant: tile sizes"
        );
        // SAFETY: the token proves AVX2; the lengths are asserted above; U is chosen so that
        // the i16 sums of each type's values cannot overflow (module docs).
        unsafe {
            match (ty, tn) {
                (QType::Q4K, 1) => ktile_raw::<1, 32, 8>(p, act, t0, out),
                (QType::Q4K, 2) => ktile_raw::<2, 32, 8>(p, act, t0, out),
                (QType::Q4K, 3) => ktile_raw::<3, 32, 8>(p, act, t0, out),
                (QType::Q4K, _) => ktile_raw::<4, 32, 8>(p, act, t0, out),
                (QType::Q5K, 1) => ktile_raw::<1, 32, 4>(p, act, t0, out),
                (QType::Q5K, 2) => ktile_raw::<2, 32, 4>(p, act, t0, out),
                (QType::Q5K, 3) => ktile_raw::<3, 32, 4>(p, act, t0, out),
                (QType::Q5K, _) => ktile_raw::<4, 32, 4>(p, act, t0, out),
                (_, 1) => ktile_raw::<1, 16, 2>(p, act, t0, out),
                (_, 2) => ktile_raw::<2, 16, 2>(p, act, t0, out),
                (_, 3) => ktile_raw::<3, 16, 2>(p, act, t0, out),
                (_, _) => ktile_raw::<4, 16, 2>(p, act, t0, out),
            }
        }
    } else {
        let q8 = ty == QType::Q8_0;
        assert!(
            common && act.init.len() >= end * nb && (!q8 || p.s.len() >= ROWS * k),
            "quant: tile sizes"
        );
        // SAFETY: the token proves AVX2; the lengths are asserted above.
        unsafe {
            match (q8, tn) {
                (true, 1) => btile_raw::<1, true>(p, act, t0, out),
                (true, 2) => btile_raw::<2, true>(p, act, t0, out),
                (true, 3) => btile_raw::<3, true>(p, act, t0, out),
                (true, _) => btile_raw::<4, true>(p, act, t0, out),
                (false, 1) => btile_raw::<1, false>(p, act, t0, out),
                (false, 2) => btile_raw::<2, false>(p, act, t0, out),
                (false, 3) => btile_raw::<3, false>(p, act, t0, out),
                (false, _) => btile_raw::<4, false>(p, act, t0, out),
            }
        }
    }
}

/// The four bytes at `p`, broadcast to every i32 lane.
///
/// # Safety
/// The CPU must have AVX2; `p .. p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast4<T>(p: *const T) -> __m256i {
    // SAFETY: the caller guarantees four readable bytes.
    _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// # Safety
/// The CPU must have AVX2; `T <= 4`; `p` holds the eight rows of a Q8_0 (`Q8`) or Q4_0 matrix
/// with `act.k` values (`8 · act.k` value bytes, for Q8_0 also the signed ones, `8 · act.nb`
/// scales) and `act` tokens `t0 .. t0 + T` (values, offsets and scales).
#[target_feature(enable = "avx2")]
unsafe fn btile_raw<const T: usize, const Q8: bool>(
    p: &Strip,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    let nb = act.nb;
    let (pq, ps, pd) = (p.q.as_ptr(), p.s.as_ptr(), p.da.as_ptr());
    let (xp, ip, dp) = act.block_ptrs::<T>(t0);
    let ones = _mm256_set1_epi16(1);
    let mut f = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let mut a = [_mm256_setzero_si256(); T];
        if Q8 {
            // Σ w · x directly (the block's offset term is already inside).
            for i in 0..QK / 4 {
                let u = 8 * b + i;
                // SAFETY: unit u < k / 4 of the transposed values (32 bytes each).
                let (wa, ws) = unsafe {
                    (
                        _mm256_loadu_si256(pq.add(32 * u).cast()),
                        _mm256_loadu_si256(ps.add(32 * u).cast()),
                    )
                };
                for j in 0..T {
                    // SAFETY: values 4u .. 4u + 4 of token j.
                    let x = unsafe { bcast4(xp[j].add(4 * u)) };
                    let pr = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, ws));
                    a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(pr, ones));
                }
            }
        } else {
            let mut h = [_mm256_setzero_si256(); T];
            for i in 0..QK / 4 {
                let u = 8 * b + i;
                // SAFETY: unit u < k / 4 of the transposed values.
                let wv = unsafe { _mm256_loadu_si256(pq.add(32 * u).cast()) };
                for j in 0..T {
                    // SAFETY: values 4u .. 4u + 4 of token j.
                    let x = unsafe { bcast4(xp[j].add(4 * u)) };
                    h[j] = _mm256_add_epi16(h[j], _mm256_maddubs_epi16(wv, x));
                }
            }
            for j in 0..T {
                // SAFETY: block b's offset of token j.
                let i0 = _mm256_set1_epi32(unsafe { *ip[j].add(b) });
                a[j] = _mm256_add_epi32(i0, _mm256_madd_epi16(h[j], ones));
            }
        }
        // SAFETY: scales 8b .. 8b + 8.
        let dwv = unsafe { _mm256_loadu_ps(pd.add(ROWS * b)) };
        for j in 0..T {
            // SAFETY: block b's scale of token j.
            let dx = _mm256_set1_ps(unsafe { *dp[j].add(b) });
            let s = _mm256_cvtepi32_ps(a[j]);
            f[j] = _mm256_add_ps(f[j], _mm256_mul_ps(s, _mm256_mul_ps(dwv, dx)));
        }
    }
    for (j, fj) in f.into_iter().enumerate() {
        // SAFETY: 8 (j + 1) <= 8 T <= out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(ROWS * j), fj) };
    }
}

/// # Safety
/// The CPU must have AVX2; `T <= 4`; `G` is the type's scale group (16 or 32) and `U` divides
/// `G / 4` and bounds the i16 sums (module docs); `p` holds the eight rows of a K-quant matrix
/// with `act.k` values (`8 · act.k` value bytes; per super-block 8 · 256 / G scales, 8 · 8
/// correction pairs, 8 d and 8 db) and `act` tokens `t0 .. t0 + T` (values, sums, scales).
#[target_feature(enable = "avx2")]
unsafe fn ktile_raw<const T: usize, const G: usize, const U: usize>(
    p: &Strip,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
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
    let mut fa = [_mm256_setzero_ps(); T];
    let mut fb = [_mm256_setzero_ps(); T];
    for s in 0..nsb {
        let mut ia = [_mm256_setzero_si256(); T];
        for g in 0..ng {
            // SAFETY: group s · ng + g of the scales.
            let scv = unsafe { _mm256_loadu_si256(psc.add(ROWS * (s * ng + g)).cast()) };
            let u0 = (s * QK_K + g * G) / 4;
            for part in 0..G / 4 / U {
                let mut h = [_mm256_setzero_si256(); T];
                for i in 0..U {
                    let u = u0 + part * U + i;
                    // SAFETY: unit u < k / 4 of the transposed values.
                    let wv = unsafe { _mm256_loadu_si256(pq.add(32 * u).cast()) };
                    for j in 0..T {
                        // SAFETY: values 4u .. 4u + 4 of token j.
                        let x = unsafe { bcast4(xp[j].add(4 * u)) };
                        h[j] = _mm256_add_epi16(h[j], _mm256_maddubs_epi16(wv, x));
                    }
                }
                for j in 0..T {
                    ia[j] = _mm256_add_epi32(ia[j], _mm256_madd_epi16(h[j], scv));
                }
            }
        }
        let mut ib = [_mm256_setzero_si256(); T];
        for i in 0..8 {
            // SAFETY: correction pair 8s + i.
            let cmv = unsafe { _mm256_loadu_si256(pcm.add(ROWS * (8 * s + i)).cast()) };
            for j in 0..T {
                // SAFETY: sums 16s + 2i, 16s + 2i + 1 of token j.
                let xv = unsafe { bcast4(sp[j].add(16 * s + 2 * i)) };
                ib[j] = _mm256_add_epi32(ib[j], _mm256_madd_epi16(cmv, xv));
            }
        }
        // SAFETY: super-block s's eight scales.
        let (dav, dbv) = unsafe {
            (
                _mm256_loadu_ps(pda.add(ROWS * s)),
                _mm256_loadu_ps(pdb.add(ROWS * s)),
            )
        };
        for j in 0..T {
            // SAFETY: super-block s's scale of token j.
            let dx = _mm256_set1_ps(unsafe { *dp[j].add(s) });
            let a = _mm256_mul_ps(_mm256_cvtepi32_ps(ia[j]), _mm256_mul_ps(dav, dx));
            let b = _mm256_mul_ps(_mm256_cvtepi32_ps(ib[j]), _mm256_mul_ps(dbv, dx));
            fa[j] = _mm256_add_ps(fa[j], a);
            fb[j] = _mm256_add_ps(fb[j], b);
        }
    }
    for j in 0..T {
        // SAFETY: 8 (j + 1) <= 8 T <= out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(ROWS * j), _mm256_sub_ps(fa[j], fb[j])) };
    }
}
