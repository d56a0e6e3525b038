//! The AVX2 sorting network of `shuffle.rs` (same random words, same permutations as the scalar
//! fallback; test `avx2_and_scalar_shuffles_agree`). Every function needs AVX2; [`Consts`] are
//! made only with an [`crate::cpu::Avx2`] token, and the entry points take them.

use super::{PAD, SORT_MAX};
use crate::cpu::Avx2;
use crate::mem::{arr, arr_mut, load128, load256, store256};
use crate::rng::avx2::next;
use crate::rng::Rng4;
use std::arch::x86_64::*;

/// Per-E constants: padding keys by register (initial layout, value p = 8·reg + lane), and
/// the neighbour pairs to ignore in the tie test (sorted layout of [`sort`], see there).
pub(super) struct Consts {
    pad: [__m256i; 8],
    skip: [__m256i; 8],
    /// Whether ranks are put in ascending order (E < 64), see [`super::output_rank`].
    transpose: bool,
}

impl Consts {
    pub(super) fn new(_: Avx2, ne: usize) -> Self {
        // SAFETY: the `Avx2` token exists only on CPUs with AVX2.
        unsafe { Self::new_avx2(ne) }
    }

    #[target_feature(enable = "avx2")]
    fn new_avx2(ne: usize) -> Self {
        let mut pad = [0u32; SORT_MAX];
        let mut skip = [0u32; SORT_MAX];
        for reg in 0..8 {
            for lane in 0..8 {
                if 8 * reg + lane >= ne {
                    pad[8 * reg + lane] = PAD;
                }
                // Register b, lane a holds sorted key i = 8a + b; its pair is (i, i + 1).
                if 8 * lane + reg + 1 >= ne {
                    skip[8 * reg + lane] = u32::MAX;
                }
            }
        }
        let mut c = Consts {
            pad: [_mm256_setzero_si256(); 8],
            skip: [_mm256_setzero_si256(); 8],
            transpose: ne < SORT_MAX,
        };
        for reg in 0..8 {
            c.pad[reg] = load256(arr::<u32, 8>(&pad, 8 * reg));
            c.skip[reg] = load256(arr::<u32, 8>(&skip, 8 * reg));
        }
        c
    }
}

/// Compare-exchange: the smaller key to `r[a]`.
#[inline]
#[target_feature(enable = "avx2")]
fn ce(r: &mut [__m256i; 8], a: usize, b: usize) {
    let lo = _mm256_min_epu32(r[a], r[b]);
    let hi = _mm256_max_epu32(r[a], r[b]);
    r[a] = lo;
    r[b] = hi;
}

/// Lane a of the result is lane a XOR (2^S − 1) of `x`.
#[inline]
#[target_feature(enable = "avx2")]
fn flip_lanes<const S: u32>(x: __m256i) -> __m256i {
    match S {
        1 => _mm256_shuffle_epi32::<0b10_11_00_01>(x),
        2 => _mm256_shuffle_epi32::<0b00_01_10_11>(x),
        _ => _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)),
    }
}

/// Lane a of the result is lane a XOR 2^(S−1) of `x`.
#[inline]
#[target_feature(enable = "avx2")]
fn swap_lanes<const S: u32>(x: __m256i) -> __m256i {
    match S {
        1 => _mm256_shuffle_epi32::<0b10_11_00_01>(x),
        2 => _mm256_shuffle_epi32::<0b01_00_11_10>(x),
        _ => _mm256_permute4x64_epi64::<0b01_00_11_10>(x),
    }
}

/// Lanes whose bit S − 1 is set from `b`, the others from `a`.
#[inline]
#[target_feature(enable = "avx2")]
fn blend_upper<const S: u32>(a: __m256i, b: __m256i) -> __m256i {
    match S {
        1 => _mm256_blend_epi32::<0b1010_1010>(a, b),
        2 => _mm256_blend_epi32::<0b1100_1100>(a, b),
        _ => _mm256_blend_epi32::<0b1111_0000>(a, b),
    }
}

/// First step of the bitonic merge into runs of 2^(S+3) (key i = 8·lane + reg): key i
/// against key i XOR (2^(S+3) − 1), i.e. register b against 7 − b, lane a against
/// a XOR (2^S − 1); the lower index keeps the smaller key.
#[inline]
#[target_feature(enable = "avx2")]
fn flip<const S: u32>(r: &mut [__m256i; 8]) {
    for b in 0..4 {
        let x = r[b];
        let y = flip_lanes::<S>(r[7 - b]);
        let lo = _mm256_min_epu32(x, y);
        let hi = _mm256_max_epu32(x, y);
        // Lanes with bit S − 1 set are the upper index of their pair.
        r[b] = blend_upper::<S>(lo, hi);
        r[7 - b] = flip_lanes::<S>(blend_upper::<S>(hi, lo));
    }
}

/// Half-cleaner on the lane bit S − 1 (key i against i XOR 2^(S+2)).
#[inline]
#[target_feature(enable = "avx2")]
fn clean_lanes<const S: u32>(r: &mut [__m256i; 8]) {
    for x in r.iter_mut() {
        let y = swap_lanes::<S>(*x);
        let lo = _mm256_min_epu32(*x, y);
        let hi = _mm256_max_epu32(*x, y);
        *x = blend_upper::<S>(lo, hi);
    }
}

/// Half-cleaners on the register bits 4, 2, 1 (key i against i XOR 4, 2, 1).
#[inline]
#[target_feature(enable = "avx2")]
fn clean_regs(r: &mut [__m256i; 8]) {
    for d in [4, 2, 1] {
        for b in 0..8 {
            if b & d == 0 {
                ce(r, b, b | d);
            }
        }
    }
}

/// 8×8 transpose of 32-bit lanes: lane a of register b ↔ lane b of register a.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose(r: &mut [__m256i; 8]) {
    let t: [__m256i; 8] = std::array::from_fn(|j| {
        let (a, b) = (r[2 * (j / 2)], r[2 * (j / 2) + 1]);
        if j % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // u[4h + m]: columns m and m + 4 of the rows 4h .. 4h + 4.
    let u: [__m256i; 8] = std::array::from_fn(|j| {
        let (h, m) = (j / 4, j % 4);
        let (a, b) = (t[4 * h + m / 2], t[4 * h + 2 + m / 2]);
        if m % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    for m in 0..4 {
        r[m] = _mm256_permute2x128_si256::<0x20>(u[m], u[4 + m]);
        r[m + 4] = _mm256_permute2x128_si256::<0x31>(u[m], u[4 + m]);
    }
}

/// See [`super::Sorter::sort`]; same random words and result as the scalar fallback.
#[target_feature(enable = "avx2")]
pub(super) fn sort(
    rng: &mut Rng4,
    payload: &[u16; SORT_MAX],
    c: &Consts,
    out: &mut [u32; SORT_MAX],
) {
    let mut low = [_mm256_setzero_si256(); 8];
    for (reg, l) in low.iter_mut().enumerate() {
        let p = load128(arr::<u16, 8>(payload, 8 * reg));
        *l = _mm256_or_si256(_mm256_cvtepu16_epi32(p), c.pad[reg]);
    }
    let mut r = sort_regs(rng, &low, c);
    if c.transpose {
        transpose(&mut r);
    }
    for (reg, x) in r.iter().enumerate() {
        store256(arr_mut::<u32, 8>(out, 8 * reg), *x);
    }
}

/// A block of exactly 64 i16 values (payload: their bit patterns), permuted from `src` to
/// `dst`: the same result as [`sort`] followed by taking the low halves of the keys.
#[target_feature(enable = "avx2")]
pub(super) fn shuffle_i16_64(
    rng: &mut Rng4,
    src: &[i16; SORT_MAX],
    c: &Consts,
    dst: &mut [i16; SORT_MAX],
) {
    let mut low = [_mm256_setzero_si256(); 8];
    for (reg, l) in low.iter_mut().enumerate() {
        *l = _mm256_cvtepu16_epi32(load128(arr::<i16, 8>(src, 8 * reg)));
    }
    let r = sort_regs(rng, &low, c);
    let lo16 = _mm256_set1_epi32(0xffff);
    for h in 0..4 {
        let a = _mm256_and_si256(r[2 * h], lo16);
        let b = _mm256_and_si256(r[2 * h + 1], lo16);
        // packus works per 128-bit half: [a0..3 b0..3 | a4..7 b4..7] → reorder the quarters.
        let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
        store256(arr_mut::<i16, 16>(dst, 16 * h), p);
    }
}

/// Sorts the 64 keys of `r`: afterwards lane a of register b holds the key of rank 8a + b.
#[inline]
#[target_feature(enable = "avx2")]
fn network(r: &mut [__m256i; 8]) {
    // Sort every lane across the registers (Knuth's 19-comparator network).
    // (Written out: a loop over the pairs is not unrolled, and `r` would live in memory.)
    ce(r, 0, 2);
    ce(r, 1, 3);
    ce(r, 4, 6);
    ce(r, 5, 7);
    ce(r, 0, 4);
    ce(r, 1, 5);
    ce(r, 2, 6);
    ce(r, 3, 7);
    ce(r, 0, 1);
    ce(r, 2, 3);
    ce(r, 4, 5);
    ce(r, 6, 7);
    ce(r, 2, 4);
    ce(r, 3, 5);
    ce(r, 1, 4);
    ce(r, 3, 6);
    ce(r, 1, 2);
    ce(r, 3, 4);
    ce(r, 5, 6);
    // Now key i = 8·lane + reg; merge lanes into runs of 16, 32, 64.
    flip::<1>(r);
    clean_regs(r);
    flip::<2>(r);
    clean_lanes::<1>(r);
    clean_regs(r);
    flip::<3>(r);
    clean_lanes::<2>(r);
    clean_lanes::<1>(r);
    clean_regs(r);
}

/// [`network`] on the keys `keys[8·reg + lane]`, stored register by register.
#[cfg(test)]
#[target_feature(enable = "avx2")]
pub(super) fn network_on(keys: &[u32; SORT_MAX]) -> [u32; SORT_MAX] {
    let mut r = [_mm256_setzero_si256(); 8];
    for (reg, x) in r.iter_mut().enumerate() {
        *x = load256(arr::<u32, 8>(keys, 8 * reg));
    }
    network(&mut r);
    let mut out = [0u32; SORT_MAX];
    for (reg, x) in r.iter().enumerate() {
        store256(arr_mut::<u32, 8>(&mut out, 8 * reg), *x);
    }
    out
}

/// Sorted keys for the payload lanes `low` (padding included), drawing until there is no
/// tie: lane a of register b holds the key of rank 8a + b.
#[inline]
#[target_feature(enable = "avx2")]
fn sort_regs(rng: &mut Rng4, low: &[__m256i; 8], c: &Consts) -> [__m256i; 8] {
    let mut st = crate::rng::avx2::load(rng);
    let himask = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let succ = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7);
    loop {
        let mut r = [_mm256_setzero_si256(); 8];
        for q in 0..4 {
            let v = next(&mut st);
            r[2 * q] = _mm256_or_si256(_mm256_slli_epi32::<16>(v), low[2 * q]);
            r[2 * q + 1] = _mm256_or_si256(_mm256_and_si256(v, himask), low[2 * q + 1]);
        }
        network(&mut r);
        // Tie test: key i (register b, lane a) against key i + 1 (register b + 1, lane a;
        // for b = 7: register 0, lane a + 1); a tie leaves an XOR below 2^16.
        let mut m = _mm256_set1_epi32(-1);
        for b in 0..8 {
            let nb = if b < 7 {
                r[b + 1]
            } else {
                _mm256_permutevar8x32_epi32(r[0], succ)
            };
            let x = _mm256_or_si256(_mm256_xor_si256(r[b], nb), c.skip[b]);
            m = _mm256_min_epu32(m, x);
        }
        let below = _mm256_cmpeq_epi32(_mm256_min_epu32(m, _mm256_set1_epi32(0xffff)), m);
        if _mm256_movemask_epi8(below) != 0 {
            continue;
        }
        crate::rng::avx2::store(rng, &st);
        return r;
    }
}
