//! AVX2 tile of the quantised-weight kernel (`super`): eight weight rows × up to [`TOKENS`]
//! tokens per step. The eight rows of a strip are prepared once per call and their
//! values transposed so that one 32-byte register holds four consecutive values of each row (i32
//! lane `j`: row `j`); each token's four activation bytes are broadcast, so one `vpmaddubsw`
//! multiplies four values of eight rows (two i16 pair sums per lane). Every type is unpacked in
//! registers straight from the blocks (no decoded row; MXFP4's nibbles looked up as the doubled
//! E2M1 values with `vpshufb`, then handled as Q8_0's signed bytes). Q8_0, MXFP4 and Q4_0 calls
//! of at most `Isa::direct_tokens` tokens (4, 4, 2; with AVX-VNNI 2, 2, 1) skip the transposed
//! copy: each block of each row is multiplied as it is and eight rows' sums are reduced into one
//! register's lanes. Q4_K, Q5_K and Q6_K calls of at most `Isa::kdirect_tokens` tokens (4; with
//! AVX-VNNI 3) do the same: each super-block of each row unpacked in registers and multiplied as
//! stored
//! (`vpmaddubsw` with the activation bytes, `vpmaddwd` by the group scale, as ggml's
//! `ggml_vec_dot_q4_K_q8_K`), the same exact integers, the tile's float operations. The eight
//! rows' f16 block scales are converted together (`vcvtph2ps`, [`f16x8`]), and every path
//! prefetches the next eight rows while it works on these (`super::prefetch_part`: eight rows read
//! block by block are eight short streams, which the hardware prefetchers follow late; 1.1–2.5×
//! per call with the weights from memory, docs/performance.md "Session 14").
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
//!
//! With AVX-VNNI ([`Isa`]: Alder Lake and later Intel cores, Zen 5; VEX-encoded 256-bit
//! `vpdpbusd` / `vpdpwssd`) the same tile adds four u8 × i8 products straight into each i32 lane,
//! with no i16 step to keep below saturation: Q8_0 then needs no sign trick (the strip holds
//! `w + 128`, unsigned, and each block starts from the activations' offset term `−128 · Σ x`,
//! as Q4_0 does with `−8 · Σ x`), the K-quants sum each scale group's products in i32 and multiply
//! by the group's scale once (`vpmulld`), and the corrections are `vpdpwssd`. The integers are the
//! same exact sums and the float steps are unchanged, so both variants give the generic path's
//! bits (tested below and in `quant::tests`). One source serves both: the tiles are generic over
//! `VNNI` and compiled for plain AVX2; the VNNI instances are inlined into thin wrappers compiled
//! with `avx2,avxvnni` (`#[target_feature]` cannot be `#[inline(always)]`), so `vpdpbusd` is
//! emitted in place (the intrinsics are stable since Rust 1.89, the MSRV).

use super::{group, Act, QMatrix, QType, QK, QK_K};
use crate::cpu::{Avx2Fma, AvxVnni, Cpu};
use std::arch::x86_64::*;

/// The instruction set the tile runs on: AVX2 (with F16C for the block scales: [`f16x8`]), with
/// AVX-VNNI when the CPU has it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Isa {
    avx2: Avx2Fma,
    vnni: Option<AvxVnni>,
}

impl Isa {
    /// The tile's instruction set on `cpu` (`None` without AVX2 + FMA + F16C, which every AVX2
    /// CPU of Intel and AMD has; AVX-VNNI when `cpu` has it: [`Cpu::without_avx_vnni`] forces
    /// plain AVX2).
    pub(super) fn of(cpu: Cpu) -> Option<Isa> {
        Some(Isa {
            avx2: cpu.avx2_fma()?,
            vnni: cpu.avx_vnni(),
        })
    }

    /// `"avx2-vnni"` or `"avx2"`.
    pub(super) fn name(self) -> &'static str {
        if self.vnni.is_some() {
            "avx2-vnni"
        } else {
            "avx2"
        }
    }
}

/// Weight rows per strip (i32 lanes of a register).
pub(super) const ROWS: usize = 8;
/// Most tokens per tile.
pub(super) const TOKENS: usize = 4;

/// The f16 at bytes `at .. at + 2` of each row of `src` as f32, lane `j` for row `j`: one
/// `vcvtph2ps` for the eight rows' block scales. The same value as
/// `half`'s `f16::to_f32` (which the generic path uses) for every input, NaNs quieted as it does
/// (tested on all 65536). Converting the scales one by one (an inlined bit-twiddling conversion
/// until session 14) was half of a Q8_0 decode call's samples.
///
/// # Safety
/// The CPU must have AVX2 and F16C; every row holds at least `at + 2` bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16x8(src: &[&[u8]; ROWS], at: usize) -> __m256 {
    // SAFETY: bytes `at .. at + 2` of row j (caller).
    let h = |j: usize| -> i16 { unsafe { src[j].as_ptr().add(at).cast::<i16>().read_unaligned() } };
    _mm256_cvtph_ps(_mm_setr_epi16(
        h(0),
        h(1),
        h(2),
        h(3),
        h(4),
        h(5),
        h(6),
        h(7),
    ))
}

/// Where and how a block's scale is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// An f16 at this byte of the block.
    F16(usize),
    /// MXFP4's E8M0 byte at byte 0, as `2^(e − 128)`.
    E8m0,
}

impl Scale {
    /// (byte offset, E8M0).
    fn parts(self) -> (usize, bool) {
        match self {
            Scale::F16(off) => (off, false),
            Scale::E8m0 => (0, true),
        }
    }
}

/// The eight rows' E8M0 bytes at `at` as `2^(e − 128)` (MXFP4's half scale, the value
/// `crate::mxfp4::e8m0_half` gives: `(e − 1) << 23` as f32 bits, `0x200000 << e` for the
/// subnormal `e < 2`), lane `j` for row `j`.
///
/// # Safety
/// The CPU must have AVX2; every row holds at least `at + 1` bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn e8m0x8(src: &[&[u8]; ROWS], at: usize) -> __m256 {
    // SAFETY: byte `at` of row j (caller).
    let e = |j: usize| -> i32 { i32::from(unsafe { *src[j].as_ptr().add(at) }) };
    let e = _mm256_setr_epi32(e(0), e(1), e(2), e(3), e(4), e(5), e(6), e(7));
    let normal = _mm256_slli_epi32::<23>(_mm256_sub_epi32(e, _mm256_set1_epi32(1)));
    let sub = _mm256_sllv_epi32(_mm256_set1_epi32(0x20_0000), e);
    let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
    _mm256_castsi256_ps(_mm256_blendv_epi8(normal, sub, small))
}

/// The scale of each of the `nb` blocks of `bb` bytes of the eight rows of `src`, as
/// `dst[ROWS * b + j]` for row `j` and block `b` (0.0 for empty rows).
fn scales_to(_: Avx2Fma, src: &[&[u8]; ROWS], nb: usize, bb: usize, scale: Scale, dst: &mut [f32]) {
    let (off, e8m0) = scale.parts();
    assert!(
        off + 2 - usize::from(e8m0) <= bb
            && nb.checked_mul(ROWS).is_some_and(|n| n <= dst.len())
            && src
                .iter()
                .all(|r| r.is_empty() || nb.checked_mul(bb).is_some_and(|n| n <= r.len())),
        "quant: scale sizes"
    );
    // Empty rows read a non-empty one's scales, then their lanes are cleared.
    let Some(&any) = src.iter().find(|r| !r.is_empty()) else {
        dst[..ROWS * nb].fill(0.0);
        return;
    };
    let full: [&[u8]; ROWS] = std::array::from_fn(|j| if src[j].is_empty() { any } else { src[j] });
    let live: [i32; ROWS] = std::array::from_fn(|j| if src[j].is_empty() { 0 } else { -1 });
    // SAFETY: the token proves AVX2 and F16C; the lengths are asserted above.
    unsafe { scales_to_raw(&full, live, nb, bb, off, e8m0, dst.as_mut_ptr()) }
}

/// # Safety
/// The CPU must have AVX2 and F16C; each `src[j]` holds `nb · bb` bytes, `off + 2 <= bb` (E8M0:
/// `off + 1`), `dst` holds `8 · nb` floats.
#[target_feature(enable = "avx2,f16c")]
unsafe fn scales_to_raw(
    src: &[&[u8]; ROWS],
    live: [i32; ROWS],
    nb: usize,
    bb: usize,
    off: usize,
    e8m0: bool,
    dst: *mut f32,
) {
    // SAFETY: eight i32.
    let mask = _mm256_castsi256_ps(unsafe { _mm256_loadu_si256(live.as_ptr().cast()) });
    for b in 0..nb {
        // SAFETY: block b's scale of every row; floats 8b .. 8b + 8 of `dst`.
        unsafe {
            let d = if e8m0 {
                e8m0x8(src, bb * b + off)
            } else {
                f16x8(src, bb * b + off)
            };
            _mm256_storeu_ps(dst.add(ROWS * b), _mm256_and_ps(d, mask))
        };
    }
}

/// Eight weight rows prepared for the tile (per thread, reused): the values unpacked from the
/// blocks and transposed (i32 lane `j` of each 32 bytes: four values of row `j`), the scales as
/// eight-lane vectors. Lanes of rows past the matrix's end are zero.
pub(super) struct Strip {
    /// The instruction set the strip is laid out for (Q8_0, MXFP4: `|w|` and `w`, or `w + 128`).
    isa: Isa,
    ty: QType,
    k: usize,
    /// 8 × kp bytes: the four values `4g .. 4g + 4` of row `j` at `32 g + 4 j` (Q8_0, MXFP4:
    /// `|w|`, with AVX-VNNI `w + 128`; other types: the unsigned value `Row::decode` gives).
    q: Vec<u8>,
    /// Q8_0 and MXFP4 without AVX-VNNI: the signed values `w`, laid out as `q` (empty otherwise).
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
    /// Buffers for weights of type `ty` and row length `k` (a positive multiple of the block),
    /// laid out for `isa`.
    pub(super) fn new(isa: Isa, ty: QType, k: usize) -> Strip {
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
            isa,
            ty,
            k,
            q: vec![0u8; ROWS * kp],
            s: if signed(ty) && isa.vnni.is_none() {
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
    /// row length), prefetching `next` meanwhile (the next rows; may be empty).
    pub(super) fn fill(&mut self, w: &QMatrix<'_>, r0: usize, rows: usize, next: &[u8]) {
        let t = self.isa.avx2;
        assert!(
            w.ty == self.ty
                && w.k == self.k
                && (1..=ROWS).contains(&rows)
                && r0.checked_add(rows).is_some_and(|e| e <= w.rows),
            "quant: strip sizes"
        );
        if self.ty.is_k() {
            self.fill_k_direct(t, w, r0, rows, next)
        } else {
            self.fill_b(t, w, r0, rows, next)
        }
    }
}

impl Strip {
    /// [`Strip::fill`] for Q8_0, Q4_0 and MXFP4: the values read straight from the blocks.
    fn fill_b(&mut self, t: Avx2Fma, w: &QMatrix<'_>, r0: usize, rows: usize, next: &[u8]) {
        let nb = w.k / QK;
        let ty = w.ty;
        let offset = self.isa.vnni.is_some();
        assert!(
            !ty.is_k()
                && self.q.len() >= ROWS * 32 * nb
                && (!signed(ty) || offset || self.s.len() >= ROWS * 32 * nb)
                && self.da.len() >= ROWS * nb,
            "quant: strip sizes"
        );
        let src: [&[u8]; ROWS] =
            std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
        let scale = if ty == QType::Mxfp4 {
            Scale::E8m0
        } else {
            Scale::F16(0)
        };
        scales_to(t, &src, nb, ty.block_bytes(), scale, &mut self.da);
        let (q, s) = (self.q.as_mut_ptr(), self.s.as_mut_ptr());
        // SAFETY: the token proves AVX2; every non-empty row holds `nb` whole blocks of `ty`
        // (`w.row`) and the buffers' lengths are asserted above (`s` only for the signed types
        // without `offset`).
        unsafe {
            match ty {
                QType::Q8_0 => fill_signed_raw::<false>(src, nb, q, s, offset, next),
                QType::Mxfp4 => fill_signed_raw::<true>(src, nb, q, s, offset, next),
                _ => fill_q4_0_raw(src, nb, q, next),
            }
        }
    }
}

impl Strip {
    /// [`Strip::fill`] for Q4_K, Q5_K and Q6_K: the values unpacked in registers straight from
    /// the blocks, the scales read from them (the values `Row::decode` gives).
    fn fill_k_direct(&mut self, t: Avx2Fma, w: &QMatrix<'_>, r0: usize, rows: usize, next: &[u8]) {
        let ty = w.ty;
        let nsb = w.k / QK_K;
        let (bb, ng) = (ty.block_bytes(), QK_K / group(ty));
        assert!(
            ty.is_k()
                && self.q.len() >= ROWS * QK_K * nsb
                && self.da.len() >= ROWS * nsb
                && self.db.len() >= ROWS * nsb
                && self.sc.len() >= ROWS * ng * nsb
                && self.cm.len() >= ROWS * 8 * nsb,
            "quant: strip sizes"
        );
        let src: [&[u8]; ROWS] =
            std::array::from_fn(|j| if j < rows { w.row(r0 + j) } else { &[] });
        if ty != QType::Q6K {
            scales_to(t, &src, nsb, bb, Scale::F16(0), &mut self.da);
            scales_to(t, &src, nsb, bb, Scale::F16(2), &mut self.db);
        } else {
            scales_to(t, &src, nsb, bb, Scale::F16(208), &mut self.da);
            scales_to(t, &src, nsb, bb, Scale::F16(208), &mut self.db);
        }
        // SAFETY: the token proves AVX2; every non-empty row holds `nsb` whole super-blocks of
        // `ty` (`w.row`) and the lengths of `self.q`, `self.sc` and `self.cm` are asserted above.
        unsafe {
            fill_k_scales_raw(ty, src, nsb, self.sc.as_mut_ptr(), self.cm.as_mut_ptr());
            fill_k_raw(ty, src, nsb, self.q.as_mut_ptr(), next);
        }
    }
}

/// Each i32 lane's low i16 in both halves (a `#[target_feature]` fn, not a closure).
#[inline]
#[target_feature(enable = "avx2")]
fn pair(v: __m256i) -> __m256i {
    _mm256_blend_epi16::<0xAA>(v, _mm256_slli_epi32::<16>(v))
}

/// The eight 6-bit group scales and the eight mins of the Q4_K or Q5_K super-block at `blk` (its
/// bytes 4 .. 16), unpacked as ggml's `ggml_vec_dot_q4_K_q8_K` does (the values `scale_min_k4`
/// gives): bytes 0 .. 8 of the first and of the second register.
///
/// # Safety
/// The CPU must have AVX2; `blk .. blk + 16` must be readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4k_scales_mins(blk: *const u8) -> (__m128i, __m128i) {
    let (k1, k2, k3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    // SAFETY: the 12 scale bytes at 4 .. 16 (caller).
    let q: [u8; 12] = unsafe { blk.add(4).cast::<[u8; 12]>().read_unaligned() };
    let u = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let scales = ((u2 & k2) | (((u0 >> 6) & k3) << 4), u0 & k1);
    let mins = (((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4), u1 & k1);
    (
        _mm_set_epi32(0, 0, scales.0 as i32, scales.1 as i32),
        _mm_set_epi32(0, 0, mins.0 as i32, mins.1 as i32),
    )
}

/// The scale lanes of eight rows of Q4_K, Q5_K or Q6_K (`Strip::sc`, `Strip::cm`; the values
/// `Row::decode` gives): per row and super-block the group scales and the correction multipliers
/// as i16 pairs in one register each (Q4_K's and Q5_K's 6-bit scales and mins unpacked as ggml's
/// `ggml_vec_dot_q4_K_q8_K` does, the same values as `scale_min_k4`), then transposed to one i32
/// lane per row; the lanes of empty rows (past the matrix's end) are zero.
///
/// # Safety
/// The CPU must have AVX2; `ty` is a K-quant; each non-empty `src[j]` holds `nsb` whole
/// super-blocks of it; `sc` holds `8 · (256 / group(ty)) · nsb` values and `cm` `64 · nsb`.
#[target_feature(enable = "avx2")]
unsafe fn fill_k_scales_raw(ty: QType, src: [&[u8]; ROWS], nsb: usize, sc: *mut i32, cm: *mut i32) {
    let (bb, ng) = (ty.block_bytes(), QK_K / group(ty));
    for s in 0..nsb {
        // Q4_K / Q5_K: scales; Q6_K: groups 0 .. 8 (`hi`: 8 .. 16); `c`: the corrections.
        let mut lo = [_mm256_setzero_si256(); ROWS];
        let mut hi = [_mm256_setzero_si256(); ROWS];
        let mut c = [_mm256_setzero_si256(); ROWS];
        for j in 0..ROWS {
            if src[j].is_empty() {
                continue;
            }
            // SAFETY: super-block s of row j (caller).
            let blk = unsafe { src[j].as_ptr().add(s * bb) };
            if ty != QType::Q6K {
                // SAFETY: AVX2 (this function's); a whole Q4_K or Q5_K super-block at `blk`
                // (caller; their scale bytes are the same).
                let (scales, mins) = unsafe { q4k_scales_mins(blk) };
                lo[j] = pair(_mm256_cvtepu8_epi32(scales));
                c[j] = pair(_mm256_cvtepu8_epi32(mins));
            } else {
                // SAFETY: the 16 scale bytes at 192 .. 208 of the 210.
                let v = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(blk.add(192).cast()) });
                lo[j] = pair(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
                hi[j] = pair(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v)));
                // (32 · v(2i), 32 · v(2i + 1)) in lane i.
                c[j] = _mm256_slli_epi16::<5>(v);
            }
        }
        // SAFETY: super-block s's 8 · ng scale lanes (ng = 8 or 16) and 64 correction lanes.
        unsafe {
            transpose_regs(&lo, sc.add(ROWS * ng * s).cast());
            if ng == 16 {
                transpose_regs(&hi, sc.add(ROWS * ng * s + ROWS * 8).cast());
            }
            transpose_regs(&c, cm.add(ROWS * 8 * s).cast());
        }
    }
}

/// The 32 unsigned values `32 c .. 32 c + 32` of a Q4_K, Q5_K or Q6_K super-block at `b` as
/// `Row::decode` writes them (`c < 8`).
///
/// # Safety
/// The CPU must have AVX2; `b` points at a whole super-block of `ty` (a K-quant).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_k(ty: QType, b: *const u8, c: usize) -> __m256i {
    let low = _mm256_set1_epi8(0x0F);
    if ty != QType::Q6K {
        let q5 = ty == QType::Q5K;
        // SAFETY: qs bytes 32 (c / 2) .. + 32 (at 16 + … of Q4_K's 144 bytes, at 48 + … of
        // Q5_K's 176).
        let q =
            unsafe { _mm256_loadu_si256(b.add(if q5 { 48 } else { 16 } + 32 * (c / 2)).cast()) };
        let q = if c.is_multiple_of(2) {
            q
        } else {
            _mm256_srli_epi16::<4>(q)
        };
        let v = _mm256_and_si256(q, low);
        if !q5 {
            return v;
        }
        // SAFETY: Q5_K's 32 qh bytes at 16 .. 48.
        let qh = unsafe { _mm256_loadu_si256(b.add(16).cast()) };
        _mm256_or_si256(v, q5_high(qh, c))
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

/// Q5_K's fifth bit of values `32 c .. 32 c + 32` (`c < 8`): 16 where bit `c` of the byte of
/// `qh` is set, else 0 (`Row::decode`'s `| 16`).
#[inline]
#[target_feature(enable = "avx2")]
fn q5_high(qh: __m256i, c: usize) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << c) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// The 32 unsigned values of the Q4_0 block at `blk` in value order (`Row::decode`'s: the low
/// nibbles of its 16 bytes, then the high nibbles).
///
/// # Safety
/// The CPU must have AVX2; `blk .. blk + 18` must be readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_0_values(blk: *const u8) -> __m256i {
    // SAFETY: the 16 value bytes at 2 .. 18 (caller).
    let v = unsafe { _mm_loadu_si128(blk.add(2).cast()) };
    let low = _mm_set1_epi8(0x0F);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
    _mm256_set_m128i(hi, _mm_and_si128(v, low))
}

/// # Safety
/// The CPU must have AVX2; `ty` is a K-quant; each non-empty `src[j]` holds `nsb` whole
/// super-blocks of it; `dst` holds `2048 · nsb` bytes.
#[target_feature(enable = "avx2")]
unsafe fn fill_k_raw(ty: QType, src: [&[u8]; ROWS], nsb: usize, dst: *mut u8, next: &[u8]) {
    let bb = ty.block_bytes();
    for s in 0..nsb {
        super::prefetch_part(next, s, nsb);
        for c in 0..8 {
            // Loops, not closures: a closure is compiled without the function's target features,
            // and `unpack_k` was then called out of line (half of a Q4_K call at n = 1).
            let mut r = [_mm256_setzero_si256(); ROWS];
            for j in 0..ROWS {
                if !src[j].is_empty() {
                    // SAFETY: super-block s of row j (caller).
                    r[j] = unsafe { unpack_k(ty, src[j].as_ptr().add(s * bb), c) };
                }
            }
            // SAFETY: chunk 8s + c's 256 bytes of `dst`.
            unsafe { transpose_regs(&r, dst.add(256 * (8 * s + c))) };
        }
    }
}

/// Q8_0 or MXFP4 (`MX`) blocks' signed values `w`: `dst` gets `|w|` and `signed` gets `w`
/// transposed, or with `offset` `dst` gets `w + 128` (`signed` is not touched).
///
/// # Safety
/// The CPU must have AVX2; each non-empty `src[j]` holds `nb` blocks (34 bytes each, MXFP4 17);
/// `dst` holds `256 · nb` bytes, and without `offset` `signed` too.
#[target_feature(enable = "avx2")]
unsafe fn fill_signed_raw<const MX: bool>(
    src: [&[u8]; ROWS],
    nb: usize,
    dst: *mut u8,
    signed: *mut u8,
    offset: bool,
    next: &[u8],
) {
    let flip = _mm256_set1_epi8(i8::MIN);
    for b in 0..nb {
        super::prefetch_part(next, b, nb);
        // Loops, not closures (`fill_k_raw`).
        let mut w = [_mm256_setzero_si256(); ROWS];
        for j in 0..ROWS {
            if !src[j].is_empty() {
                // SAFETY: block b of row j (caller).
                w[j] = unsafe { signed_values(MX, src[j].as_ptr(), b) };
            }
        }
        let mut a = [_mm256_setzero_si256(); ROWS];
        for j in 0..ROWS {
            a[j] = if offset {
                _mm256_xor_si256(w[j], flip)
            } else {
                _mm256_abs_epi8(w[j])
            };
        }
        if offset {
            // SAFETY: block b's 256 bytes of `dst`.
            unsafe { transpose_regs(&a, dst.add(256 * b)) };
            continue;
        }
        // SAFETY: block b's 256 bytes of `dst` and `signed`.
        unsafe {
            transpose_regs(&a, dst.add(256 * b));
            transpose_regs(&w, signed.add(256 * b));
        }
    }
}

/// The 32 signed values of block `b` of a row of Q8_0 (the bytes as stored) or MXFP4 (`mx`: the
/// nibbles looked up as the doubled E2M1 values, [`crate::mxfp4::KVALUES`], with `vpshufb`), in
/// value order.
///
/// # Safety
/// The CPU must have AVX2; block `b` of the row at `row` must be readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_values(mx: bool, row: *const u8, b: usize) -> __m256i {
    if !mx {
        // SAFETY: bytes 2 .. 34 of the block (caller).
        return unsafe { _mm256_loadu_si256(row.add(34 * b + 2).cast()) };
    }
    // SAFETY: the 16 nibble bytes at 1 .. 17 of the block (caller); the table's 16 bytes.
    let (v, lut) = unsafe {
        (
            _mm_loadu_si128(row.add(17 * b + 1).cast()),
            _mm_loadu_si128(crate::mxfp4::KVALUES.as_ptr().cast()),
        )
    };
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, low));
    let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16::<4>(v), low));
    _mm256_set_m128i(hi, lo)
}

/// Whether the strip holds `ty`'s values signed, as Q8_0's (`|w|` with the sign trick, or
/// `w + 128` with AVX-VNNI): Q8_0 and MXFP4.
fn signed(ty: QType) -> bool {
    matches!(ty, QType::Q8_0 | QType::Mxfp4)
}

/// `dst` gets the values of each Q4_0 block (the nibbles, unsigned, as `Row::decode` writes
/// them) transposed.
///
/// # Safety
/// The CPU must have AVX2; each non-empty `src[j]` holds `nb` Q4_0 blocks (18 bytes each);
/// `dst` holds `256 · nb` bytes.
#[target_feature(enable = "avx2")]
unsafe fn fill_q4_0_raw(src: [&[u8]; ROWS], nb: usize, dst: *mut u8, next: &[u8]) {
    for b in 0..nb {
        super::prefetch_part(next, b, nb);
        // Loops, not closures (`fill_k_raw`).
        let mut r = [_mm256_setzero_si256(); ROWS];
        for j in 0..ROWS {
            if !src[j].is_empty() {
                // SAFETY: block b of row j (caller).
                r[j] = unsafe { q4_0_values(src[j].as_ptr().add(18 * b)) };
            }
        }
        // SAFETY: block b's 256 bytes of `dst`.
        unsafe { transpose_regs(&r, dst.add(256 * b)) };
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
/// `out[t · rows + r]` for token `t` and row `r0 + r`. `strip` is made on first use (the direct
/// paths of few tokens need none) and kept by the caller for its next panels.
#[allow(clippy::too_many_arguments)]
pub(super) fn panel(
    t: Isa,
    strip: &mut Option<Strip>,
    w: &QMatrix<'_>,
    act: &Act,
    n: usize,
    r0: usize,
    rows: usize,
    out: &mut [f32],
) {
    assert!(
        n.checked_mul(rows).is_some_and(|v| out.len() == v)
            && strip.as_ref().is_none_or(|s| {
                t.vnni.is_some() == s.isa.vnni.is_some() && s.ty == w.ty && s.k == w.k
            }),
        "quant: panel sizes"
    );
    let mut tile = [0f32; ROWS * TOKENS];
    let direct = !w.ty.is_k() && n <= t.direct_tokens(w.ty);
    let kdirect = w.ty.is_k() && n <= t.kdirect_tokens();
    let mut h = 0;
    while h < rows {
        let rr = ROWS.min(rows - h);
        // The next eight rows (contiguous after these), prefetched while these compute.
        let rb = w.row_bytes();
        let after = r0 + h + rr;
        let next = &w.data[after * rb..(after + ROWS).min(w.rows) * rb];
        if kdirect {
            // Few tokens: the K-quant super-blocks multiplied as they are, no transposed copy.
            direct_k(t, w, r0 + h, rr, act, n, &mut tile, next);
            for j in 0..n {
                let o = j * rows + h;
                out[o..o + rr].copy_from_slice(&tile[ROWS * j..ROWS * j + rr]);
            }
            h += rr;
            continue;
        }
        if direct {
            // Few tokens: the blocks multiplied as they are, no transposed copy.
            direct_b(t, w, r0 + h, rr, act, n, &mut tile, next);
            for j in 0..n {
                let o = j * rows + h;
                out[o..o + rr].copy_from_slice(&tile[ROWS * j..ROWS * j + rr]);
            }
            h += rr;
            continue;
        }
        let strip = strip.get_or_insert_with(|| Strip::new(t, w.ty, w.k));
        strip.fill(w, r0 + h, rr, next);
        let mut t0 = 0;
        while t0 < n {
            let tn = TOKENS.min(n - t0);
            run_tile(strip, act, t0, tn, &mut tile);
            for j in 0..tn {
                let o = (t0 + j) * rows + h;
                out[o..o + rr].copy_from_slice(&tile[ROWS * j..ROWS * j + rr]);
            }
            t0 += tn;
        }
        h += rr;
    }
}

/// Most tokens of a call for which Q8_0, MXFP4 and Q4_0 rows are multiplied straight from their
/// blocks ([`direct_b`]; [`Isa::direct_tokens`] says up to where it pays for each).
const DIRECT_TOKENS: usize = 4;

impl Isa {
    /// Most tokens of a call of type `ty` (Q8_0, MXFP4 or Q4_0) for which the direct path is
    /// faster than the transposed strip (MXFP4 as Q8_0, whose tiles it shares after the values
    /// are looked up: on plain AVX2 at gpt-oss's `[2880, 2880]` direct 1.65×, 1.28×, 1.15×, 1.01×
    /// faster at 1–4 tokens). Measured at OLMoE expert shapes: Q8_0 on plain AVX2 1.3–1.4×
    /// faster direct at 3 and 4 tokens, with AVX-VNNI the strip's tile 1.0–1.1× faster from 3
    /// tokens; Q4_0 (whose strip tile sums eight `vpmaddubsw` in i16 before widening, cheaper
    /// than Q8_0's sign trick) on plain AVX2 1.25× faster direct at 1 token, about even at 2,
    /// the strip 1.1–1.2× faster at 3 and 4 (docs/performance.md, "Session 15"). With AVX-VNNI
    /// Q4_0 stops one token earlier, as Q8_0 does (inferred; no AVX-VNNI CPU here).
    fn direct_tokens(self, ty: QType) -> usize {
        let plain = if signed(ty) { DIRECT_TOKENS } else { 2 };
        if self.vnni.is_some() {
            plain / 2
        } else {
            plain
        }
    }
}

/// The outputs of rows `r0 .. r0 + rows` of Q8_0, MXFP4 or Q4_0 `w` (`1 <= rows <= 8`) for
/// tokens `0 .. tn` of `act` (`1 <= tn <= t.direct_tokens(w.ty)`), multiplied straight from the
/// blocks: per row and block the 32 products in one register (Q8_0 and MXFP4: the sign trick on
/// the signed values, as the tile; with AVX-VNNI `w + 128`; Q4_0: the nibbles; the block's
/// offset term added after the reduction where the products leave it out), the eight rows' sums
/// reduced into one register's lanes (`vphaddd`), then the tile's float operations.
#[allow(clippy::too_many_arguments)]
fn direct_b(
    t: Isa,
    w: &QMatrix<'_>,
    r0: usize,
    rows: usize,
    act: &Act,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let (k, nb) = (act.k, act.nb);
    assert!(
        !w.ty.is_k()
            && w.k == k
            && k == nb * QK
            && (1..=ROWS).contains(&rows)
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && (1..=t.direct_tokens(w.ty)).contains(&tn)
            && act.x.len() >= tn * k
            && act.d.len() >= tn * nb
            && act.init.len() >= tn * nb,
        "quant: direct sizes"
    );
    // Rows past `rows` repeat the last one (their lanes are not used): no branch per row.
    let src: [&[u8]; ROWS] = std::array::from_fn(|j| w.row(r0 + j.min(rows - 1)));
    // SAFETY: the token proves AVX2 and F16C (and AVX-VNNI for the `_vnni` variants); every
    // row holds `nb` whole blocks of `w.ty` (`w.row`), and the activations' lengths are
    // asserted above.
    unsafe {
        match (w.ty, t.vnni, tn) {
            (QType::Q8_0, Some(_), 1) => bdirect_vnni::<1, B8>(src, act, out, next),
            (QType::Q8_0, Some(_), _) => bdirect_vnni::<2, B8>(src, act, out, next),
            (QType::Q8_0, None, 1) => bdirect_raw::<1, B8, false>(src, act, out, next),
            (QType::Q8_0, None, 2) => bdirect_raw::<2, B8, false>(src, act, out, next),
            (QType::Q8_0, None, 3) => bdirect_raw::<3, B8, false>(src, act, out, next),
            (QType::Q8_0, None, _) => bdirect_raw::<4, B8, false>(src, act, out, next),
            (QType::Mxfp4, Some(_), 1) => bdirect_vnni::<1, BMX>(src, act, out, next),
            (QType::Mxfp4, Some(_), _) => bdirect_vnni::<2, BMX>(src, act, out, next),
            (QType::Mxfp4, None, 1) => bdirect_raw::<1, BMX, false>(src, act, out, next),
            (QType::Mxfp4, None, 2) => bdirect_raw::<2, BMX, false>(src, act, out, next),
            (QType::Mxfp4, None, 3) => bdirect_raw::<3, BMX, false>(src, act, out, next),
            (QType::Mxfp4, None, _) => bdirect_raw::<4, BMX, false>(src, act, out, next),
            (_, Some(_), 1) => bdirect_vnni::<1, B4>(src, act, out, next),
            (_, Some(_), _) => bdirect_vnni::<2, B4>(src, act, out, next),
            (_, None, 1) => bdirect_raw::<1, B4, false>(src, act, out, next),
            (_, None, 2) => bdirect_raw::<2, B4, false>(src, act, out, next),
            (_, None, 3) => bdirect_raw::<3, B4, false>(src, act, out, next),
            (_, None, _) => bdirect_raw::<4, B4, false>(src, act, out, next),
        }
    }
}

/// Most tokens of a call for which K-quant rows are multiplied straight from their super-blocks
/// ([`direct_k`]; [`Isa::kdirect_tokens`] says up to where it pays).
const KDIRECT_TOKENS: usize = 4;

impl Isa {
    /// Most tokens of a call for which the direct K-quant path is used instead of the
    /// transposed strip. Measured on plain AVX2 at OLMoE expert shapes (one thread, from the
    /// caches): direct 1.4–1.7× faster at n = 1, 1.3–1.5× at 2, 1.16–1.24× at 3, 1.03–1.07× at
    /// 4. The direct path uses no AVX-VNNI instruction, and the AVX-VNNI strip tile is
    /// 1.04–1.08× faster than the plain one at n = 2–4 (docs/performance.md), so with AVX-VNNI
    /// it stops at 3 (inferred from those two measurements; not measured on an AVX-VNNI CPU).
    fn kdirect_tokens(self) -> usize {
        if self.vnni.is_some() {
            KDIRECT_TOKENS - 1
        } else {
            KDIRECT_TOKENS
        }
    }
}

/// The outputs of rows `r0 .. r0 + rows` of Q4_K, Q5_K or Q6_K `w` (`1 <= rows <= 8`) for tokens
/// `0 .. tn` of `act` (`1 <= tn <= KDIRECT_TOKENS`), multiplied straight from the super-blocks:
/// per row and super-block the values unpacked in registers (as `unpack_k`), `vpmaddubsw` with
/// the activation bytes, `vpmaddwd` by the group's scale, the corrections `vpmaddwd` of the
/// multipliers and the 16-value sums (the same exact integers as the tile and `kdot_generic`),
/// the eight rows' sums reduced into one register's lanes, then the tile's float operations.
#[allow(clippy::too_many_arguments)]
pub(super) fn direct_k(
    t: Isa,
    w: &QMatrix<'_>,
    r0: usize,
    rows: usize,
    act: &Act,
    tn: usize,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let _: Avx2Fma = t.avx2;
    let (k, nsb) = (act.k, act.nb);
    assert!(
        w.ty.is_k()
            && w.k == k
            && k == nsb * QK_K
            && (1..=ROWS).contains(&rows)
            && r0.checked_add(rows).is_some_and(|e| e <= w.rows)
            && (1..=KDIRECT_TOKENS).contains(&tn)
            && act.x.len() >= tn * k
            && act.xs.len() >= tn * k / 16
            && act.d.len() >= tn * nsb,
        "quant: direct sizes"
    );
    // Rows past `rows` repeat the last one (their lanes are not used): no branch per row.
    let src: [&[u8]; ROWS] = std::array::from_fn(|j| w.row(r0 + j.min(rows - 1)));
    // SAFETY: the token proves AVX2 and F16C; every row holds `nsb` whole super-blocks of
    // `w.ty` (`w.row`), and the activations' lengths are asserted above.
    unsafe {
        match (w.ty, tn) {
            (QType::Q6K, 1) => kdirect_raw::<1, K6>(src, act, out, next),
            (QType::Q6K, 2) => kdirect_raw::<2, K6>(src, act, out, next),
            (QType::Q6K, 3) => kdirect_raw::<3, K6>(src, act, out, next),
            (QType::Q6K, _) => kdirect_raw::<4, K6>(src, act, out, next),
            (QType::Q5K, 1) => kdirect_raw::<1, K5>(src, act, out, next),
            (QType::Q5K, 2) => kdirect_raw::<2, K5>(src, act, out, next),
            (QType::Q5K, 3) => kdirect_raw::<3, K5>(src, act, out, next),
            (QType::Q5K, _) => kdirect_raw::<4, K5>(src, act, out, next),
            (_, 1) => kdirect_raw::<1, K4>(src, act, out, next),
            (_, 2) => kdirect_raw::<2, K4>(src, act, out, next),
            (_, 3) => kdirect_raw::<3, K4>(src, act, out, next),
            (_, _) => kdirect_raw::<4, K4>(src, act, out, next),
        }
    }
}

/// The K-quant of [`kdirect_raw`] (a const generic argument): Q4_K, Q5_K, Q6_K.
const K4: u8 = 4;
const K5: u8 = 5;
const K6: u8 = 6;

/// # Safety
/// The CPU must have AVX2 and F16C; `T <= KDIRECT_TOKENS`; each `src[j]` holds `act.nb`
/// super-blocks of Q4_K, Q5_K or Q6_K (`KQ`: [`K4`], [`K5`], [`K6`]); `act` holds tokens
/// `0 .. T` (values, 16-value sums, scales).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn kdirect_raw<const T: usize, const KQ: u8>(
    src: [&[u8]; ROWS],
    act: &Act,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let nsb = act.nb;
    let q6 = KQ == K6;
    let ty = match KQ {
        K6 => QType::Q6K,
        K5 => QType::Q5K,
        _ => QType::Q4K,
    };
    let bb = ty.block_bytes();
    let (xp, sp, dp) = act.k_ptrs::<T>(0);
    let low = _mm256_set1_epi8(0x0F);
    // The eight rows' cache lines asked for up front (weights come from memory in decode): the
    // strip's unpacking loop kept many loads in flight, the multiplies between this path's
    // loads do not (Q6_K from memory, 1 thread: 1.4–2.1× slower without this).
    for row in src {
        for o in (0..row.len()).step_by(64) {
            // SAFETY: a prefetch never faults; `o` is inside the row.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(o).cast()) };
        }
    }
    let mut fa = [_mm256_setzero_ps(); T];
    let mut fb = [_mm256_setzero_ps(); T];
    for s in 0..nsb {
        super::prefetch_part(next, s, nsb);
        // SAFETY: the scales of super-block s of every row (caller): Q6_K's d at 208,
        // Q4_K's and Q5_K's d and dmin at 0 and 2.
        let (dav, dbv) = unsafe {
            if q6 {
                let d = f16x8(&src, s * bb + 208);
                (d, d)
            } else {
                (f16x8(&src, s * bb), f16x8(&src, s * bb + 2))
            }
        };
        let mut va = [[_mm256_setzero_si256(); ROWS]; T];
        let mut vb = [[_mm256_setzero_si256(); ROWS]; T];
        for r in 0..ROWS {
            let row = src[r];
            // SAFETY: super-block s of row r (caller).
            let blk = unsafe { row.as_ptr().add(s * bb) };
            let mut acc = [_mm256_setzero_si256(); T];
            let cmv;
            if q6 {
                // SAFETY: the 16 scale bytes at 192 .. 208 of the 210.
                let v = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(blk.add(192).cast()) });
                // Lane i: the i16 scale of group i (`lo`) or 8 + i (`hi`) in both halves.
                let lo = pair(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
                let hi = pair(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v)));
                // (32 · v(2i), 32 · v(2i + 1)) in lane i.
                cmv = _mm256_slli_epi16::<5>(v);
                for c in 0..8 {
                    // SAFETY: a whole Q6_K super-block at `blk`.
                    let wv = unsafe { unpack_k(ty, blk, c) };
                    // Groups 2c (low 128 bits) and 2c + 1 (high).
                    let g = (2 * c % 8) as i32;
                    let idx = _mm256_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1);
                    let scv = _mm256_permutevar8x32_epi32(if c < 4 { lo } else { hi }, idx);
                    for j in 0..T {
                        // SAFETY: values 256s + 32c .. + 32 of token j (caller).
                        let x = unsafe { _mm256_loadu_si256(xp[j].add(QK_K * s + 32 * c).cast()) };
                        let p = _mm256_maddubs_epi16(wv, x);
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, scv));
                    }
                }
            } else {
                // SAFETY: AVX2 (this function's); a whole Q4_K or Q5_K super-block at `blk`
                // (caller).
                let (scales, mins) = unsafe { q4k_scales_mins(blk) };
                let sc = pair(_mm256_cvtepu8_epi32(scales));
                cmv = pair(_mm256_cvtepu8_epi32(mins));
                let q5 = KQ == K5;
                let qh = if q5 {
                    // SAFETY: Q5_K's 32 qh bytes at 16 .. 48.
                    unsafe { _mm256_loadu_si256(blk.add(16).cast()) }
                } else {
                    _mm256_setzero_si256()
                };
                let qs = if q5 { 48 } else { 16 };
                for p in 0..4 {
                    // SAFETY: qs bytes 32p .. 32p + 32 (at 16 + … of Q4_K's 144 bytes, at
                    // 48 + … of Q5_K's 176).
                    let qv = unsafe { _mm256_loadu_si256(blk.add(qs + 32 * p).cast()) };
                    // Groups 2p (low nibbles) and 2p + 1 (high); Q5_K adds the fifth bits
                    // (values below 32: a pair of products is at most 2 · 31 · 127).
                    let mut wl = _mm256_and_si256(qv, low);
                    let mut wh = _mm256_and_si256(_mm256_srli_epi16::<4>(qv), low);
                    if q5 {
                        wl = _mm256_or_si256(wl, q5_high(qh, 2 * p));
                        wh = _mm256_or_si256(wh, q5_high(qh, 2 * p + 1));
                    }
                    let sl = _mm256_permutevar8x32_epi32(sc, _mm256_set1_epi32(2 * p as i32));
                    let sh = _mm256_permutevar8x32_epi32(sc, _mm256_set1_epi32(2 * p as i32 + 1));
                    for j in 0..T {
                        // SAFETY: values 256s + 64p .. + 64 of token j (caller).
                        let (xl, xh) = unsafe {
                            let at = xp[j].add(QK_K * s + 64 * p);
                            (
                                _mm256_loadu_si256(at.cast()),
                                _mm256_loadu_si256(at.add(32).cast()),
                            )
                        };
                        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wl, xl), sl);
                        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wh, xh), sh);
                        acc[j] = _mm256_add_epi32(acc[j], _mm256_add_epi32(pl, ph));
                    }
                }
            }
            for j in 0..T {
                va[j][r] = acc[j];
                // SAFETY: the 16 sums of super-block s of token j (caller).
                let xs = unsafe { _mm256_loadu_si256(sp[j].add(16 * s).cast()) };
                vb[j][r] = _mm256_madd_epi16(cmv, xs);
            }
        }
        for j in 0..T {
            let (ia, ib) = (hsum8x8(&va[j]), hsum8x8(&vb[j]));
            // SAFETY: super-block s's scale of token j.
            let dx = _mm256_set1_ps(unsafe { *dp[j].add(s) });
            let a = _mm256_mul_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(dav, dx));
            let b = _mm256_mul_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(dbv, dx));
            fa[j] = _mm256_add_ps(fa[j], a);
            fb[j] = _mm256_add_ps(fb[j], b);
        }
    }
    for j in 0..T {
        // SAFETY: 8 (j + 1) <= 8 T <= out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(ROWS * j), _mm256_sub_ps(fa[j], fb[j])) };
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

/// The block type of [`bdirect_raw`] (a const generic argument): Q8_0, Q4_0, MXFP4.
const B8: u8 = 0;
const B4: u8 = 1;
const BMX: u8 = 2;

/// [`bdirect_raw`] with AVX-VNNI.
///
/// # Safety
/// As [`bdirect_raw`]; the CPU must have AVX-VNNI.
#[target_feature(enable = "avx2,avxvnni,f16c")]
unsafe fn bdirect_vnni<const T: usize, const B: u8>(
    src: [&[u8]; ROWS],
    act: &Act,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    // SAFETY: the caller's guarantees, AVX-VNNI included.
    unsafe { bdirect_raw::<T, B, true>(src, act, out, next) }
}

/// # Safety
/// The CPU must have AVX2 and F16C, and AVX-VNNI if `VNNI`; `T <= DIRECT_TOKENS`; each
/// `src[j]` holds `act.nb` blocks of Q8_0, Q4_0 or MXFP4 (`B`: [`B8`], [`B4`], [`BMX`]); `act`
/// holds tokens `0 .. T` (values, offsets, scales).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn bdirect_raw<const T: usize, const B: u8, const VNNI: bool>(
    src: [&[u8]; ROWS],
    act: &Act,
    out: &mut [f32; ROWS * TOKENS],
    next: &[u8],
) {
    let (k, nb) = (act.k, act.nb);
    let bb = match B {
        B8 => 34,
        B4 => 18,
        _ => 17,
    };
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut f = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        super::prefetch_part(next, b, nb);
        // SAFETY: block b's scale of every row (caller).
        let dwv = unsafe {
            if B == BMX {
                e8m0x8(&src, bb * b)
            } else {
                f16x8(&src, bb * b)
            }
        };
        let mut xs = [_mm256_setzero_si256(); T];
        for (j, xj) in xs.iter_mut().enumerate() {
            // SAFETY: values 32b .. 32b + 32 of token j < T (caller).
            *xj = unsafe { _mm256_loadu_si256(act.x.as_ptr().add(j * k + QK * b).cast()) };
        }
        let mut v = [[_mm256_setzero_si256(); ROWS]; T];
        for (r, row) in src.iter().enumerate() {
            if B == B4 {
                // Σ q · x with the nibbles `q` (unsigned); the offset term `−8 · Σ x` is added
                // after the reduction.
                // SAFETY: block b of the row (caller).
                let q = unsafe { q4_0_values(row.as_ptr().add(18 * b)) };
                for j in 0..T {
                    v[j][r] = if VNNI {
                        // SAFETY: `VNNI`: the caller guarantees AVX-VNNI.
                        unsafe { dpbusd(_mm256_setzero_si256(), q, xs[j]) }
                    } else {
                        // Pair sums at most 2 · 15 · 127: no saturation.
                        _mm256_madd_epi16(_mm256_maddubs_epi16(q, xs[j]), ones)
                    };
                }
                continue;
            }
            // SAFETY: block b of the row (caller).
            let wv = unsafe { signed_values(B == BMX, row.as_ptr(), b) };
            if VNNI {
                // Σ (w + 128) · x; the offset term is added after the reduction.
                let q = _mm256_xor_si256(wv, flip);
                for j in 0..T {
                    // SAFETY: `VNNI`: the caller guarantees AVX-VNNI.
                    v[j][r] = unsafe { dpbusd(_mm256_setzero_si256(), q, xs[j]) };
                }
                continue;
            }
            let a = _mm256_abs_epi8(wv);
            for j in 0..T {
                let pr = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xs[j], wv));
                v[j][r] = _mm256_madd_epi16(pr, ones);
            }
        }
        for j in 0..T {
            let mut si = hsum8x8(&v[j]);
            if VNNI || B == B4 {
                // Q8_0 / MXFP4 with AVX-VNNI: −128 · Σ x + Σ (w + 128) · x = Σ w · x; Q4_0:
                // −8 · Σ x + Σ q · x (rows past the end: lanes ignored).
                si = _mm256_add_epi32(si, _mm256_set1_epi32(act.init[j * nb + b]));
            }
            let s = _mm256_cvtepi32_ps(si);
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
pub(super) fn run_tile(p: &Strip, act: &Act, t0: usize, tn: usize, out: &mut [f32; ROWS * TOKENS]) {
    let (ty, vnni) = (p.ty, p.isa.vnni.is_some());
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
        // SAFETY: the strip's token proves AVX2 (and AVX-VNNI for the `_vnni` variants); the
        // lengths are asserted above; U is chosen so that the i16 sums of each type's values
        // cannot overflow (module docs; the VNNI tile has no i16 sums).
        unsafe {
            match (ty, tn) {
                (QType::Q6K, 1) if vnni => ktile_vnni::<1, 16>(p, act, t0, out),
                (QType::Q6K, 2) if vnni => ktile_vnni::<2, 16>(p, act, t0, out),
                (QType::Q6K, 3) if vnni => ktile_vnni::<3, 16>(p, act, t0, out),
                (QType::Q6K, _) if vnni => ktile_vnni::<4, 16>(p, act, t0, out),
                (_, 1) if vnni => ktile_vnni::<1, 32>(p, act, t0, out),
                (_, 2) if vnni => ktile_vnni::<2, 32>(p, act, t0, out),
                (_, 3) if vnni => ktile_vnni::<3, 32>(p, act, t0, out),
                (_, _) if vnni => ktile_vnni::<4, 32>(p, act, t0, out),
                (QType::Q4K, 1) => ktile_raw::<1, 32, 8, false>(p, act, t0, out),
                (QType::Q4K, 2) => ktile_raw::<2, 32, 8, false>(p, act, t0, out),
                (QType::Q4K, 3) => ktile_raw::<3, 32, 8, false>(p, act, t0, out),
                (QType::Q4K, _) => ktile_raw::<4, 32, 8, false>(p, act, t0, out),
                (QType::Q5K, 1) => ktile_raw::<1, 32, 4, false>(p, act, t0, out),
                (QType::Q5K, 2) => ktile_raw::<2, 32, 4, false>(p, act, t0, out),
                (QType::Q5K, 3) => ktile_raw::<3, 32, 4, false>(p, act, t0, out),
                (QType::Q5K, _) => ktile_raw::<4, 32, 4, false>(p, act, t0, out),
                (_, 1) => ktile_raw::<1, 16, 2, false>(p, act, t0, out),
                (_, 2) => ktile_raw::<2, 16, 2, false>(p, act, t0, out),
                (_, 3) => ktile_raw::<3, 16, 2, false>(p, act, t0, out),
                (_, _) => ktile_raw::<4, 16, 2, false>(p, act, t0, out),
            }
        }
    } else {
        let q8 = signed(ty);
        assert!(
            common && act.init.len() >= end * nb && (!q8 || vnni || p.s.len() >= ROWS * k),
            "quant: tile sizes"
        );
        // SAFETY: the strip's token proves AVX2 (and AVX-VNNI for the `_vnni` variants); the
        // lengths are asserted above.
        unsafe {
            match (q8, tn) {
                (_, 1) if vnni => btile_vnni::<1>(p, act, t0, out),
                (_, 2) if vnni => btile_vnni::<2>(p, act, t0, out),
                (_, 3) if vnni => btile_vnni::<3>(p, act, t0, out),
                (_, _) if vnni => btile_vnni::<4>(p, act, t0, out),
                (true, 1) => btile_raw::<1, true, false>(p, act, t0, out),
                (true, 2) => btile_raw::<2, true, false>(p, act, t0, out),
                (true, 3) => btile_raw::<3, true, false>(p, act, t0, out),
                (true, _) => btile_raw::<4, true, false>(p, act, t0, out),
                (false, 1) => btile_raw::<1, false, false>(p, act, t0, out),
                (false, 2) => btile_raw::<2, false, false>(p, act, t0, out),
                (false, 3) => btile_raw::<3, false, false>(p, act, t0, out),
                (false, _) => btile_raw::<4, false, false>(p, act, t0, out),
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

/// `acc + Σ a · b` over the four byte pairs of each i32 lane (`a` unsigned, `b` signed):
/// `vpdpbusd`, exact (no i16 step, no saturation). Inlined into the `_vnni` wrappers, which are
/// compiled with AVX-VNNI, so the instruction is emitted in place.
///
/// # Safety
/// The CPU must have AVX-VNNI.
#[inline(always)]
unsafe fn dpbusd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller guarantees AVX-VNNI.
    unsafe { _mm256_dpbusd_avx_epi32(acc, a, b) }
}

/// `acc + Σ a · b` over the two i16 pairs of each i32 lane: `vpdpwssd` (`vpmaddwd` +
/// `vpaddd` in one instruction).
///
/// # Safety
/// The CPU must have AVX-VNNI.
#[inline(always)]
unsafe fn dpwssd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller guarantees AVX-VNNI.
    unsafe { _mm256_dpwssd_avx_epi32(acc, a, b) }
}

/// [`btile_raw`] with AVX-VNNI (Q8_0 and Q4_0 alike: `w + 128` or the nibble, from the
/// block's offset term).
///
/// # Safety
/// As [`btile_raw`] (for Q8_0 the strip holds `w + 128` and no signed values); the CPU must
/// have AVX-VNNI.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn btile_vnni<const T: usize>(
    p: &Strip,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    // SAFETY: the caller's guarantees, AVX-VNNI included.
    unsafe { btile_raw::<T, false, true>(p, act, t0, out) }
}

/// # Safety
/// The CPU must have AVX2, and AVX-VNNI if `VNNI`; `T <= 4`; `p` holds the eight rows of a
/// Q8_0 (`Q8`) or Q4_0 matrix with `act.k` values (`8 · act.k` value bytes, for Q8_0 without
/// `VNNI` also the signed ones, `8 · act.nb` scales) and `act` tokens `t0 .. t0 + T` (values,
/// offsets and scales).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn btile_raw<const T: usize, const Q8: bool, const VNNI: bool>(
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
        if VNNI {
            // `−offset · Σ x + Σ q · x`, the unsigned values `q` four to a lane in i32; even
            // and odd units in two accumulators (two chains of `vpdpbusd` latency per token).
            let mut a1 = [_mm256_setzero_si256(); T];
            for j in 0..T {
                // SAFETY: block b's offset of token j.
                a[j] = _mm256_set1_epi32(unsafe { *ip[j].add(b) });
            }
            for i in 0..QK / 4 {
                let u = 8 * b + i;
                // SAFETY: unit u < k / 4 of the transposed values.
                let wv = unsafe { _mm256_loadu_si256(pq.add(32 * u).cast()) };
                let acc = if i % 2 == 0 { &mut a } else { &mut a1 };
                for j in 0..T {
                    // SAFETY: values 4u .. 4u + 4 of token j; `VNNI`: the caller guarantees
                    // AVX-VNNI.
                    acc[j] = unsafe { dpbusd(acc[j], wv, bcast4(xp[j].add(4 * u))) };
                }
            }
            for j in 0..T {
                a[j] = _mm256_add_epi32(a[j], a1[j]);
            }
        } else if Q8 {
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

/// [`ktile_raw`] with AVX-VNNI (each scale group's products summed in i32).
///
/// # Safety
/// As [`ktile_raw`]; the CPU must have AVX-VNNI.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn ktile_vnni<const T: usize, const G: usize>(
    p: &Strip,
    act: &Act,
    t0: usize,
    out: &mut [f32; ROWS * TOKENS],
) {
    // SAFETY: the caller's guarantees, AVX-VNNI included (U = 1 divides G / 4 and is unused).
    unsafe { ktile_raw::<T, G, 1, true>(p, act, t0, out) }
}

/// # Safety
/// The CPU must have AVX2, and AVX-VNNI if `VNNI`; `T <= 4`; `G` is the type's scale group (16
/// or 32) and `U` divides `G / 4` and bounds the i16 sums (module docs; unused with `VNNI`);
/// `p` holds the eight rows of a K-quant matrix with `act.k` values (`8 · act.k` value bytes;
/// per super-block 8 · 256 / G scales, 8 · 8 correction pairs, 8 d and 8 db) and `act` tokens
/// `t0 .. t0 + T` (values, sums, scales).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ktile_raw<const T: usize, const G: usize, const U: usize, const VNNI: bool>(
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
            if VNNI {
                // The group's products in i32 (at most 32 · 63 · 127: exact), then times the
                // group's scale (the i16 in the lane's high half, sign-extended).
                // Even and odd units in two accumulators (two chains of `vpdpbusd` latency per
                // token).
                let sc32 = _mm256_srai_epi32::<16>(scv);
                let mut h = [[_mm256_setzero_si256(); T]; 2];
                for i in 0..G / 4 {
                    let u = u0 + i;
                    // SAFETY: unit u < k / 4 of the transposed values.
                    let wv = unsafe { _mm256_loadu_si256(pq.add(32 * u).cast()) };
                    let acc = &mut h[i % 2];
                    for j in 0..T {
                        // SAFETY: values 4u .. 4u + 4 of token j; `VNNI`: the caller
                        // guarantees AVX-VNNI.
                        acc[j] = unsafe { dpbusd(acc[j], wv, bcast4(xp[j].add(4 * u))) };
                    }
                }
                for j in 0..T {
                    let hj = _mm256_add_epi32(h[0][j], h[1][j]);
                    ia[j] = _mm256_add_epi32(ia[j], _mm256_mullo_epi32(hj, sc32));
                }
                continue;
            }
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
                ib[j] = if VNNI {
                    // SAFETY: `VNNI`: the caller guarantees AVX-VNNI.
                    unsafe { dpwssd(ib[j], cmv, xv) }
                } else {
                    _mm256_add_epi32(ib[j], _mm256_madd_epi16(cmv, xv))
                };
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

#[cfg(test)]
mod tests {
    //! The AVX-VNNI variant of the tile against the plain AVX2 tile and the generic path, bit for
    //! bit (the shared tests in `quant::tests` run whichever variant this CPU has).

    use super::super::{xwt_q_on, Path, QMatrix, QType, QK_K};
    use crate::cpu::Cpu;
    use crate::matmul::Kernel;
    use half::f16;
    use rand::{Rng, SeedableRng};

    const TYPES: [QType; 6] = QType::ALL;

    /// Random blocks of `ty` (every quant and scale bit random) with finite f16 block scales.
    fn random_matrix(ty: QType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut data = vec![0u8; rows * k / ty.block_values() * ty.block_bytes()];
        rng.fill(&mut data[..]);
        for b in data.chunks_exact_mut(ty.block_bytes()) {
            let mut put = |at: usize| {
                let v = rng.random_range(-0.05f32..0.05);
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            };
            match ty {
                QType::Q6K => put(208),
                QType::Q4K | QType::Q5K => {
                    put(0);
                    put(2);
                }
                // E8M0: 2^−10 .. 2^−2.
                QType::Mxfp4 => b[0] = rng.random_range(118u8..=126),
                _ => put(0),
            }
        }
        data
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The generic, plain AVX2 and AVX2 + AVX-VNNI results of `x · wᵀ`, asserted equal bit for bit
    /// (the VNNI one only where this CPU has AVX-VNNI).
    fn check(w: &QMatrix<'_>, x: &[f32], n: usize, what: &str) -> Vec<u32> {
        let cpu = Cpu::get().without_avx512();
        let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, x, n, w));
        let plain = bits(&xwt_q_on(cpu.without_avx_vnni(), Kernel::Avx2, x, n, w));
        assert_eq!(g, plain, "plain AVX2: {what}");
        if cpu.avx_vnni().is_some() {
            let vnni = bits(&xwt_q_on(cpu, Kernel::Avx2, x, n, w));
            assert_eq!(g, vnni, "AVX-VNNI: {what}");
        }
        g
    }

    #[test]
    fn the_vnni_tile_gives_the_avx2_and_generic_bits_at_every_edge() {
        // Rows around the 8-row strip and the 16-row panel; tokens 1 ..= 9 (the direct Q8_0
        // path up to 2, then whole and partial 4-token tiles) and two tiles and a half; one,
        // two and three blocks per row.
        for (i, ty) in TYPES.into_iter().enumerate() {
            let bv = ty.block_values();
            for kb in [1usize, 2, 3] {
                let k = kb * bv;
                for rows in [1usize, 7, 8, 9, 15, 16, 17, 25] {
                    let seed = 1000 * i as u64 + 10 * kb as u64 + rows as u64;
                    let data = random_matrix(ty, rows, k, seed);
                    let w = QMatrix::new(ty, &data, rows, k).unwrap();
                    for n in (1..=9).chain([10, 13]) {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + n as u64);
                        let x: Vec<f32> = (0..n * k)
                            .map(|i| {
                                if i % 61 == 3 {
                                    rng.random_range(-30.0f32..30.0)
                                } else {
                                    rng.random_range(-1.0f32..1.0)
                                }
                            })
                            .collect();
                        let what = format!("{} n={n} rows={rows} k={k}", ty.name());
                        check(&w, &x, n, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn the_vnni_tile_gives_the_generic_bits_at_extreme_values() {
        // Every byte of the blocks one value: Q8_0 weights −128 (0x80: `w + 128` is 0 and the
        // offset term carries the whole sum), 127, −1, 0; nibbles and 5/6-bit values at their
        // largest with scales and mins 63; Q6_K scales −128 / 127 / −1 (the sign extension of
        // the group scale); activations quantised to ±127 in every sign pattern (the largest
        // i32 group sums and corrections) and a zero token.
        for ty in TYPES {
            let bv = ty.block_values();
            for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0x88, 0x0F, 0xF0] {
                for &(n, rows, k) in &[
                    (1usize, 1usize, bv),
                    (2, 9, bv),
                    (3, 8, 2 * bv),
                    (9, 17, bv),
                ] {
                    let mut data = vec![fill; rows * k / bv * ty.block_bytes()];
                    for (bi, b) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
                        let d = f16::from_f32(if bi % 2 == 0 { 0.01 } else { -0.02 }).to_le_bytes();
                        match ty {
                            QType::Q6K => {
                                b[208..210].copy_from_slice(&d);
                                for g in 0..16 {
                                    b[192 + g] = [0x80, 0x7F, 0xFF, fill][(g + bi) % 4];
                                }
                            }
                            QType::Q4K | QType::Q5K => {
                                b[0..2].copy_from_slice(&d);
                                b[2..4].copy_from_slice(&d);
                            }
                            // E8M0 2^−7 and 2^−6.
                            QType::Mxfp4 => b[0] = 121 + (bi % 2) as u8,
                            _ => b[0..2].copy_from_slice(&d),
                        }
                    }
                    let w = QMatrix::new(ty, &data, rows, k).unwrap();
                    let patterns: [&dyn Fn(usize) -> f32; 5] = [
                        &|_| 1.0,
                        &|_| -1.0,
                        &|i| if i % 2 == 0 { 1.0 } else { -1.0 },
                        &|i| if (i / 4) % 3 == 0 { -1.0 } else { 1.0 },
                        &|i| if i / k == 1 { 0.0 } else { -1.0 },
                    ];
                    for (pi, pat) in patterns.iter().enumerate() {
                        let x: Vec<f32> = (0..n * k).map(pat).collect();
                        let what = format!(
                            "{} fill {fill:#x} pattern {pi} n={n} rows={rows}",
                            ty.name()
                        );
                        let g = check(&w, &x, n, &what);
                        // The reference is the exact sum: Q8_0 all −128 against all +127
                        // activations gives −128 · 127 per value.
                        if ty == QType::Q8_0 && fill == 0x80 && pi == 0 && k == bv {
                            let dx = f16::from_f32(1.0 / 127.0).to_f32();
                            let dw = f16::from_f32(0.01).to_f32();
                            let want = (-128 * 127 * bv as i32) as f32 * (dw * dx);
                            assert_eq!(f32::from_bits(g[0]), want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_largest_k_quant_sums_are_exact() {
        // Q6_K: every value 63 and every scale −128, activations +127: the largest group sum
        // (16 · 63 · 127) times the most negative scale, over a whole super-block; the
        // result against the dequantised row's exact sum.
        let (n, rows, k) = (5usize, 9usize, 2 * QK_K);
        let mut data = vec![0xFFu8; rows * 2 * 210];
        for b in data.chunks_exact_mut(210) {
            b[192..208].fill(0x80);
            b[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        }
        let w = QMatrix::new(QType::Q6K, &data, rows, k).unwrap();
        let x = vec![1.0f32; n * k];
        let g = check(&w, &x, n, "q6_K extremes");
        let row: f64 = w.dequantize()[..k].iter().map(|&v| f64::from(v)).sum();
        assert_eq!(row, 0.5 * -128.0 * 31.0 * k as f64);
        for v in g {
            let got = f64::from(f32::from_bits(v));
            assert!((got - row).abs() <= 1e-6 * row.abs(), "{got} vs {row}");
        }
    }

    #[test]
    fn scales_convert_as_half_does() {
        let Some(t) = Cpu::get().avx2_fma() else {
            return;
        };
        // Every pattern at every lane; empty rows give 0.0.
        for h0 in (0..=u16::MAX).step_by(super::ROWS) {
            let rows: Vec<[u8; 4]> = (0..super::ROWS as u16)
                .map(|j| {
                    let [a, b] = (h0 + j).to_le_bytes();
                    [7, a, b, 9]
                })
                .collect();
            for live in [super::ROWS, 5] {
                let src: [&[u8]; super::ROWS] =
                    std::array::from_fn(|j| if j < live { &rows[j][..] } else { &[] });
                let mut got = [0f32; super::ROWS];
                super::scales_to(t, &src, 1, 4, super::Scale::F16(1), &mut got);
                for (j, g) in got.into_iter().enumerate() {
                    let h = h0 + j as u16;
                    let want = if j < live {
                        f16::from_bits(h).to_f32()
                    } else {
                        0.0
                    };
                    assert_eq!(g.to_bits(), want.to_bits(), "{h:#06x}");
                }
            }
        }
    }

    #[test]
    fn e8m0_scales_convert_as_e8m0_half_does() {
        let Some(t) = Cpu::get().avx2_fma() else {
            return;
        };
        // All 256 exponents (0 and 1 subnormal, 255 = 2^127), eight lanes at a time; empty rows
        // give 0.0.
        for e0 in (0..=255u8).step_by(super::ROWS) {
            let rows: Vec<[u8; 17]> = (0..super::ROWS as u8)
                .map(|j| {
                    let mut b = [0x5Au8; 17];
                    b[0] = e0 + j;
                    b
                })
                .collect();
            for live in [super::ROWS, 3] {
                let src: [&[u8]; super::ROWS] =
                    std::array::from_fn(|j| if j < live { &rows[j][..] } else { &[] });
                let mut got = [0f32; super::ROWS];
                super::scales_to(t, &src, 1, 17, super::Scale::E8m0, &mut got);
                for (j, g) in got.into_iter().enumerate() {
                    let e = e0 + j as u8;
                    let want = if j < live {
                        crate::mxfp4::e8m0_half(e)
                    } else {
                        0.0
                    };
                    assert_eq!(g.to_bits(), want.to_bits(), "e = {e}");
                }
            }
        }
    }

    #[test]
    fn the_paths_are_named_and_taken() {
        let cpu = Cpu::get();
        let Some(t) = super::Isa::of(cpu) else {
            assert!(super::Isa::of(Cpu::scalar()).is_none());
            return;
        };
        let want = if cpu.avx_vnni().is_some() {
            "avx2-vnni"
        } else {
            "avx2"
        };
        assert_eq!(t.name(), want);
        assert_eq!(
            Path::choose(cpu.without_avx512(), Kernel::Avx2).name(),
            want
        );
        assert_eq!(
            Path::choose(cpu.without_avx_vnni(), Kernel::Avx2).name(),
            "avx2"
        );
        assert!(super::Isa::of(cpu.without_avx_vnni()).is_some_and(|t| t.vnni.is_none()));
        // `MOE_XRAY_KERNEL=avx2-novnni` (when the tests run with it): the plain AVX2 tile.
        if crate::matmul::env_no_vnni() {
            assert_eq!(super::super::kernel_name(), "avx2");
        } else if crate::matmul::env_kernel() == Ok(Kernel::Avx2) {
            assert_eq!(super::super::kernel_name(), want);
        }
    }
}
