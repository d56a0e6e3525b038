//! The AVX2 kernels of `gram.rs` (exact integers, equal to the scalar definition; tests
//! `matches_the_scalar_definition`, `fused_accumulation_equals_gram_then_normalise`). Raw
//! pointers are used because the inner loops address rows by stride and the `vpmaddubsw` memory
//! operand is written in inline asm; each `unsafe fn` states the bounds it needs, and the safe
//! entry points in `gram.rs` assert them.

use super::{cover, dot, U8_MAX, U8_MAX_FOLD3};

/// Packs the rows of `c` into `buf` as u8, each zero-padded to `stride` (a multiple of 64)
/// bytes, and returns `(stride, max entry)`; `None` when an entry is outside `0..=U8_MAX`.
///
/// # Safety
/// The CPU must have AVX2, `c.len() >= n * ne`.
#[target_feature(enable = "avx2")]
unsafe fn pack_u8(c: &[i16], n: usize, ne: usize, buf: &mut Vec<u8>) -> Option<(usize, u16)> {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2 and `c.len() >= n * ne`; `buf` is resized to `n * stride` bytes above, so every row read (`i * ne + e < n * ne`) and write (`i * stride + e < n * stride`) is in bounds.
    unsafe {
        // Rows padded with zeros to whole pairs of 32-byte chunks.
        let stride = ne.div_ceil(64) * 64;
        if buf.len() < n * stride {
            buf.resize(n * stride, 0);
        }
        // Pack (saturating; out-of-range entries are rejected) and track the unsigned max, so that
        // negative entries count as huge. Stops at the first row with an entry above U8_MAX.
        let limit = _mm256_set1_epi16(U8_MAX as i16);
        let mut vmax = _mm256_setzero_si256();
        let mut smax = 0u16;
        let vec_end = ne / 32 * 32;
        for i in 0..n {
            let src = c.as_ptr().add(i * ne);
            let dst = buf.as_mut_ptr().add(i * stride);
            let mut e = 0;
            while e < vec_end {
                let x0 = _mm256_loadu_si256(src.add(e) as *const __m256i);
                let x1 = _mm256_loadu_si256(src.add(e + 16) as *const __m256i);
                vmax = _mm256_max_epu16(vmax, _mm256_max_epu16(x0, x1));
                let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(x0, x1));
                _mm256_storeu_si256(dst.add(e) as *mut __m256i, p);
                e += 32;
            }
            for e in vec_end..ne {
                let x = c[i * ne + e] as u16;
                smax = smax.max(x);
                *dst.add(e) = x.min(255) as u8;
            }
            if stride > ne {
                std::ptr::write_bytes(dst.add(ne), 0, stride - ne);
            }
            let over = _mm256_subs_epu16(vmax, limit);
            if _mm256_testz_si256(over, over) == 0 || smax > U8_MAX {
                return None;
            }
        }
        let mut lanes = [0u16; 16];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, vmax);
        let max = lanes.iter().fold(smax, |m, &x| m.max(x));
        Some((stride, max))
    }
}

/// The u8 path (see module docs). Packs `c` into `buf` and returns `false` without touching `g`
/// when an entry is outside `0..=U8_MAX`.
///
/// # Safety
/// The CPU must have AVX2, `c.len() >= n * ne` and `g.len() >= n * n`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2_u8(
    c: &[i16],
    n: usize,
    ne: usize,
    g: &mut [f64],
    buf: &mut Vec<u8>,
) -> bool {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2 and the sizes; `pack_u8` fills `buf` with `n` rows of `stride` bytes, and the blocks visited by `cover` have `i + 1 < n` and `j + 4 <= n`, so every load from `bp` and store to `gp` is in bounds.
    unsafe {
        let Some((stride, max)) = pack_u8(c, n, ne, buf) else {
            return false;
        };
        // Chunk pairs per row; see the module docs for the i16 bounds.
        let npairs = stride / 64;
        let bp = buf.as_ptr();
        let gp = g.as_mut_ptr();
        let single = |i: usize, j: usize| {
            *gp.add(i * n + j) = dot(&c[i * ne..(i + 1) * ne], &c[j * ne..(j + 1) * ne]) as f64
        };
        let store = |i: usize, j: usize, [s0, s1]: [__m128i; 2]| {
            // In bounds: j + 4 ≤ n and i + 1 < n.
            _mm256_storeu_pd(gp.add(i * n + j), _mm256_cvtepi32_pd(s0));
            _mm256_storeu_pd(gp.add((i + 1) * n + j), _mm256_cvtepi32_pd(s1));
        };
        // The two-row blocks of the fused kernel's `rows_block`; ≤ 64 experts (the common case) gets
        // a constant stride and trip count.
        match (max <= U8_MAX_FOLD3, npairs) {
            (true, 1) => cover(
                n,
                |i, j| store(i, j, rows_block::<2, true, true>(bp, stride, 1, i, j)),
                single,
            ),
            (false, 1) => cover(
                n,
                |i, j| store(i, j, rows_block::<2, false, true>(bp, stride, 1, i, j)),
                single,
            ),
            (true, m) => cover(
                n,
                |i, j| store(i, j, rows_block::<2, true, false>(bp, stride, m, i, j)),
                single,
            ),
            (false, m) => cover(
                n,
                |i, j| store(i, j, rows_block::<2, false, false>(bp, stride, m, i, j)),
                single,
            ),
        }
        true
    }
}

/// [`accumulate_normalised`] on the u8 path: packs `c` and runs [`acc_blocks`] (specialised
/// for the fold depth and for one chunk pair per row).
///
/// # Safety
/// The CPU must have AVX2, `n >= 4`, `c.len() >= n * ne`, `inv.len() >= n` and `acc.len() >= n * n`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2_u8_acc(
    c: &[i16],
    n: usize,
    ne: usize,
    inv: &mut [f64],
    acc: &mut [f64],
    buf: &mut Vec<u8>,
) -> bool {
    // SAFETY: the caller guarantees AVX2 and the sizes; `pack_u8` packs `n` rows of `stride` bytes, as `acc_blocks` requires.
    unsafe {
        debug_assert!(n >= 4);
        let Some((stride, max)) = pack_u8(c, n, ne, buf) else {
            return false;
        };
        let buf = &buf[..n * stride];
        let inv = &mut inv[..n];
        let npairs = stride / 64;
        // ≤ 64 experts (the common case) gets a constant stride and trip count.
        match (max <= U8_MAX_FOLD3, npairs) {
            (true, 1) => acc_blocks::<true, true>(buf, stride, n, inv, acc),
            (false, 1) => acc_blocks::<false, true>(buf, stride, n, inv, acc),
            (true, _) => acc_blocks::<true, false>(buf, stride, n, inv, acc),
            (false, _) => acc_blocks::<false, false>(buf, stride, n, inv, acc),
        }
        true
    }
}

/// Rows per block of [`acc_blocks`]. With one chunk pair per row, three rows take six ymm
/// registers for a group's whole column loop, plus the three broadcast `inv[row]`,
/// `inv[j..j+4]`, the `vpmaddwd` ones and four temporaries: 15 of the 16. With four rows LLVM
/// spills and shuffles registers (114 instructions per 4 × 4 block, against 77 per 3 × 4).
/// Whole call at 80 × 64 (cachegrind): two rows 24.7k, three 24.0k, four 24.9k instructions.
const GROUP: usize = 3;

/// Lane masks keeping lanes q ≥ skip, indexed by skip.
const KEEP: [[i64; 4]; 4] = [
    [-1, -1, -1, -1],
    [0, -1, -1, -1],
    [0, 0, -1, -1],
    [0, 0, 0, -1],
];

/// The work of [`avx2_u8_acc`] (n ≥ 4, rows packed `stride` bytes apart in `buf`; `ONE`: the
/// stride is 64): the diagonal first (every `inv` is needed before any block is normalised),
/// then row groups `i..i+GROUP` while they fit and, when `n mod GROUP ≥ 2`, one row pair (a
/// single last row has no column j > i), each group covering its columns from i + 1 in blocks of
/// four ([`rows_block`]); every block is converted, scaled and added to `acc` in place.
///
/// # Safety
/// The CPU must have AVX2 (the sizes are asserted), and with `ONE` the stride must be 64.
#[target_feature(enable = "avx2")]
unsafe fn acc_blocks<const FOLD3: bool, const ONE: bool>(
    buf: &[u8],
    stride: usize,
    n: usize,
    inv: &mut [f64],
    acc: &mut [f64],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2; the sizes are asserted above, the diagonal loop reads rows `< n` and writes `inv[i..i + 4]` with `i + 4 <= n`, and every block has `row < n`, `j + 4 <= n` (see `cover_cols!`), so every pointer access is in bounds.
    unsafe {
        let stride = if ONE { 64 } else { stride };
        let npairs = stride / 64;
        assert!(n >= 4 && buf.len() >= n * stride && inv.len() >= n && acc.len() >= n * n);
        let bp = buf.as_ptr();
        // Squared norms (exact i32), four rows at a time: lane sums by two vphaddd levels, then
        // 1/√G[i,i] with vsqrtpd and vdivpd (correctly rounded, as the scalar sqrt and division),
        // masked to 0 where G[i,i] = 0.
        let ones = _mm256_set1_epi16(1);
        let mut i = 0;
        while i + 4 <= n {
            let s: [__m256i; 4] =
                std::array::from_fn(|r| row_norm(bp, stride, npairs, i + r, ones));
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
            let g = _mm256_cvtepi32_pd(halves(h));
            let r = _mm256_div_pd(_mm256_set1_pd(1.0), _mm256_sqrt_pd(g));
            let r = _mm256_and_pd(r, _mm256_cmp_pd::<_CMP_GT_OQ>(g, _mm256_setzero_pd()));
            _mm256_storeu_pd(inv.as_mut_ptr().add(i), r);
            i += 4;
        }
        for (i, r) in inv.iter_mut().enumerate().take(n).skip(i) {
            let mut lanes = [0i32; 8];
            let s = row_norm(bp, stride, npairs, i, ones);
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
            let gii = lanes.iter().sum::<i32>() as f64;
            *r = if gii > 0.0 { 1.0 / gii.sqrt() } else { 0.0 };
        }
        let ip = inv.as_ptr();
        let ap = acc.as_mut_ptr();
        // acc[row·n + j + q] += (s[q]·inv[row])·inv[j + q] for the lanes q ≥ skip (ri = inv[row]
        // in every lane).
        let add_row = |row: usize, ri: __m256d, j: usize, skip: usize, s: __m128i| {
            // In bounds: row < n and j + 4 ≤ n.
            let rj = _mm256_loadu_pd(ip.add(j));
            let mut t = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(s), ri), rj);
            if skip > 0 {
                let keep = _mm256_loadu_si256(KEEP[skip].as_ptr() as *const __m256i);
                t = _mm256_and_pd(t, _mm256_castsi256_pd(keep));
            }
            let a = ap.add(row * n + j);
            _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), t));
        };
        // A row group from row i covers its columns from i + 1 (no entry it needs lies left of
        // that) in blocks of four: (j, skip = 0) for j = i+1, i+5, … while j + 4 ≤ n, then, if
        // columns remain, one block shifted left to end at column n, (n − 4, skip = j − (n − 4)),
        // whose first `skip` lanes are masked: the previous block of the group already added them
        // or, when there is none (j = i + 1), they are on or below the diagonal. (Macros rather
        // than closures around `rows_block`: a closure does not inherit the target features, so
        // the kernel would not be inlined into it.)
        macro_rules! cover_cols {
            ($i:expr, $block:ident) => {{
                let mut j = $i;
                while j + 4 <= n {
                    $block!(j, 0);
                    j += 4;
                }
                if j < n {
                    $block!(n - 4, j - (n - 4));
                }
            }};
        }
        let mut i = 0;
        while i + GROUP <= n {
            let ri: [__m256d; GROUP] = std::array::from_fn(|r| _mm256_set1_pd(*ip.add(i + r)));
            macro_rules! group {
                ($j:expr, $skip:expr) => {{
                    let (j, skip) = ($j, $skip);
                    let s = rows_block::<GROUP, FOLD3, ONE>(bp, stride, npairs, i, j);
                    for r in 0..GROUP {
                        add_row(i + r, ri[r], j, skip, s[r]);
                    }
                }};
            }
            cover_cols!(i + 1, group);
            i += GROUP;
        }
        if i + 2 <= n {
            let ri: [__m256d; 2] = std::array::from_fn(|r| _mm256_set1_pd(*ip.add(i + r)));
            macro_rules! pair {
                ($j:expr, $skip:expr) => {{
                    let (j, skip) = ($j, $skip);
                    let s = rows_block::<2, FOLD3, ONE>(bp, stride, npairs, i, j);
                    add_row(i, ri[0], j, skip, s[0]);
                    add_row(i + 1, ri[1], j, skip, s[1]);
                }};
            }
            cover_cols!(i + 1, pair);
        }
    }
}

/// The squared norm of packed row i, spread over eight i32 lanes: each 64-byte chunk's two
/// `vpmaddubsw` results (≤ 2·63² per i16 lane each) summed in i16 (≤ 4·63²), widened to i32
/// with `vpmaddwd(·, 1)`.
///
/// # Safety
/// The CPU must have AVX2; `bp` must point to `(i + 1) * stride` readable bytes and `npairs * 64 <= stride`.
#[inline(always)]
unsafe fn row_norm(
    bp: *const u8,
    stride: usize,
    npairs: usize,
    i: usize,
    ones: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2 and that row `i` (`npairs` chunk pairs of 64 bytes) is readable from `bp`.
    unsafe {
        let row = bp.add(i * stride);
        let mut s = _mm256_setzero_si256();
        for pair in 0..npairs {
            let x0 = _mm256_loadu_si256(row.add(pair * 64) as *const __m256i);
            let x1 = _mm256_loadu_si256(row.add(pair * 64 + 32) as *const __m256i);
            let h = _mm256_add_epi16(_mm256_maddubs_epi16(x0, x0), _mm256_maddubs_epi16(x1, x1));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(h, ones));
        }
        s
    }
}

/// Lanes `[q0, q1, q2, q3]` (per 128-bit half, in i32) of the four columns' i16 sums `a[q]`
/// (each lane ≤ 4·max², one chunk pair): with `FOLD3`, vphaddw → [4 lanes of q0, 4 of q1] (and
/// q2, q3), vphaddw → [2 lanes of each q], vpmaddwd(1); otherwise vphaddw → [4 lanes of q,
/// 4 lanes of q+1], vpmaddwd(1) → [q, q, q+1, q+1] in i32, vphaddd. See the module docs for
/// the bounds.
///
/// # Safety
/// The CPU must have AVX2 (inlined into AVX2 functions only).
#[inline(always)]
unsafe fn fold<const FOLD3: bool>(
    a: &[std::arch::x86_64::__m256i; 4],
    ones: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2; no memory is accessed.
    unsafe {
        if FOLD3 {
            let h = _mm256_hadd_epi16(_mm256_hadd_epi16(a[0], a[1]), _mm256_hadd_epi16(a[2], a[3]));
            _mm256_madd_epi16(h, ones)
        } else {
            let w = |a: __m256i, b: __m256i| _mm256_madd_epi16(_mm256_hadd_epi16(a, b), ones);
            _mm256_hadd_epi32(w(a[0], a[1]), w(a[2], a[3]))
        }
    }
}

/// The sum of the two 128-bit halves of `h` (i32 lanes).
///
/// # Safety
/// The CPU must have AVX2 (inlined into AVX2 functions only).
#[inline(always)]
unsafe fn halves(h: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2; no memory is accessed.
    unsafe { _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h)) }
}

/// `vpmaddubsw` of the ymm value `$x` (unsigned bytes) with the 32 bytes at the memory operand
/// `$addr` (signed bytes; the packed counts are ≤ 63, so signedness does not matter), written
/// in inline asm so that the load stays folded into the instruction: with the intrinsic plus
/// `_mm256_loadu_si256`, the compiler loads each column chunk once into a register for all
/// rows of [`rows_block`], which with the row chunks held in registers needs more than 16 ymm
/// registers. `pure, readonly`: no side effects, reads memory only.
macro_rules! maddubs_mem {
    ($x:expr, $addr:literal, $($reg:tt)*) => {{
        let r: std::arch::x86_64::__m256i;
        std::arch::asm!(
            concat!("vpmaddubsw {r}, {x}, ymmword ptr ", $addr),
            r = lateout(ymm_reg) r,
            x = in(ymm_reg) $x,
            $($reg)*
            options(pure, readonly, nostack, preserves_flags),
        );
        r
    }};
}

/// Dot products of packed rows `i..i+R` with rows `j..j+4` (`stride` bytes apart, `npairs`
/// pairs of 32-byte chunks): lane q of result r is the dot product of row i+r with row j+q.
/// Row by row, a chunk pair's eight `vpmaddubsw` take the row's two chunks from registers and
/// the column chunks from memory ([`maddubs_mem`]); the results are summed and folded exactly
/// by [`fold`] (same i16 bounds, see the module docs). When `npairs` is 1 and this is
/// inlined into the column loop, the row chunks are loop-invariant and stay in registers.
/// `ONE`: `stride` is 64, so every column is addressed from one register with a constant
/// offset.
///
/// # Safety
/// The CPU must have AVX2; `bp` must point to packed rows of `stride` bytes (`npairs * 64 <= stride`; with `ONE`, `stride == 64`) covering rows `i..i + R` and `j..j + 4`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn rows_block<const R: usize, const FOLD3: bool, const ONE: bool>(
    bp: *const u8,
    stride: usize,
    npairs: usize,
    i: usize,
    j: usize,
) -> [std::arch::x86_64::__m128i; R] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2 and that rows `i..i + R` and `j..j + 4` (`npairs` chunk pairs each, `stride` bytes apart) are readable from `bp`; the inline `vpmaddubsw` reads 32 bytes at such addresses only and has no other effect.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        // Columns j, j+1, j+2 are addressed from c0, column j+3 from c3.
        let c0 = bp.add(j * stride);
        let c3 = c0.add(3 * stride);
        let mut h = [_mm256_setzero_si256(); R];
        for pair in 0..npairs {
            let (p, p3) = (c0.add(pair * 64), c3.add(pair * 64));
            for (r, h) in h.iter_mut().enumerate() {
                let row = bp.add((i + r) * stride + pair * 64);
                let x0 = _mm256_loadu_si256(row as *const __m256i);
                let x1 = _mm256_loadu_si256(row.add(32) as *const __m256i);
                // With the stride known (64), all four columns are addressed from p.
                let a = if ONE {
                    [
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p}]", p = in(reg) p,),
                            maddubs_mem!(x1, "[{p} + 32]", p = in(reg) p,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p} + 64]", p = in(reg) p,),
                            maddubs_mem!(x1, "[{p} + 96]", p = in(reg) p,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p} + 128]", p = in(reg) p,),
                            maddubs_mem!(x1, "[{p} + 160]", p = in(reg) p,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p} + 192]", p = in(reg) p,),
                            maddubs_mem!(x1, "[{p} + 224]", p = in(reg) p,),
                        ),
                    ]
                } else {
                    [
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p}]", p = in(reg) p,),
                            maddubs_mem!(x1, "[{p} + 32]", p = in(reg) p,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p} + {s}]", p = in(reg) p, s = in(reg) stride,),
                            maddubs_mem!(x1, "[{p} + {s} + 32]", p = in(reg) p, s = in(reg) stride,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p} + 2*{s}]", p = in(reg) p, s = in(reg) stride,),
                            maddubs_mem!(x1, "[{p} + 2*{s} + 32]", p = in(reg) p, s = in(reg) stride,),
                        ),
                        _mm256_add_epi16(
                            maddubs_mem!(x0, "[{p}]", p = in(reg) p3,),
                            maddubs_mem!(x1, "[{p} + 32]", p = in(reg) p3,),
                        ),
                    ]
                };
                *h = _mm256_add_epi32(*h, fold::<FOLD3>(&a, ones));
            }
        }
        h.map(|h| halves(h))
    }
}

/// The i16 path: two rows × four columns per block, eight `vpmaddwd` accumulators, horizontal
/// sums converted to f64 and stored four at a time.
///
/// # Safety
/// The CPU must have AVX2, `c.len() >= n * ne` and `g.len() >= n * n`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2 and the sizes; the blocks visited by `cover` have `i + 1 < n` and `j + 4 <= n`, and chunk loads end at `ch * 16 + 16 <= ne` within a row, so every load from `p` and store to `gp` is in bounds.
    unsafe {
        /// Lane q of the result is the sum of the eight lanes of `acc[q]`.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn hsum4(acc: &[__m256i; 4]) -> __m128i {
            let h01 = _mm256_hadd_epi32(acc[0], acc[1]);
            let h23 = _mm256_hadd_epi32(acc[2], acc[3]);
            let h = _mm256_hadd_epi32(h01, h23);
            _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
        }
        let chunks = ne / 16;
        let tail = chunks * 16;
        let p = c.as_ptr();
        let gp = g.as_mut_ptr();
        cover(
            n,
            |i, j| {
                let mut a0 = [_mm256_setzero_si256(); 4];
                let mut a1 = [_mm256_setzero_si256(); 4];
                for ch in 0..chunks {
                    let x0 = _mm256_loadu_si256(p.add(i * ne + ch * 16) as *const __m256i);
                    let x1 = _mm256_loadu_si256(p.add((i + 1) * ne + ch * 16) as *const __m256i);
                    for q in 0..4 {
                        let y = _mm256_loadu_si256(p.add((j + q) * ne + ch * 16) as *const __m256i);
                        a0[q] = _mm256_add_epi32(a0[q], _mm256_madd_epi16(x0, y));
                        a1[q] = _mm256_add_epi32(a1[q], _mm256_madd_epi16(x1, y));
                    }
                }
                let mut s0 = hsum4(&a0);
                let mut s1 = hsum4(&a1);
                if tail < ne {
                    let t0: [i32; 4] = std::array::from_fn(|q| {
                        dot(
                            &c[i * ne + tail..(i + 1) * ne],
                            &c[(j + q) * ne + tail..(j + q + 1) * ne],
                        )
                    });
                    let t1: [i32; 4] = std::array::from_fn(|q| {
                        dot(
                            &c[(i + 1) * ne + tail..(i + 2) * ne],
                            &c[(j + q) * ne + tail..(j + q + 1) * ne],
                        )
                    });
                    s0 = _mm_add_epi32(s0, _mm_loadu_si128(t0.as_ptr() as *const __m128i));
                    s1 = _mm_add_epi32(s1, _mm_loadu_si128(t1.as_ptr() as *const __m128i));
                }
                // In bounds: j + 4 ≤ n and i + 1 < n.
                _mm256_storeu_pd(gp.add(i * n + j), _mm256_cvtepi32_pd(s0));
                _mm256_storeu_pd(gp.add((i + 1) * n + j), _mm256_cvtepi32_pd(s1));
            },
            |i, j| {
                *gp.add(i * n + j) = dot(&c[i * ne..(i + 1) * ne], &c[j * ne..(j + 1) * ne]) as f64
            },
        );
    }
}
