//! Exactly uniform random permutations of small blocks (33 ≤ E ≤ 64 values) by sorting random
//! keys: the `permutation` baseline (`baselines.rs`) permutes the expert axis of every
//! (prompt, layer) block independently (other E: Fisher–Yates there).
//!
//! **Method.** Value p of a block gets the 32-bit key `r_p · 2^16 + payload_p`, with `r_p` a
//! uniform 16-bit integer (independent for all p) and `payload_p` the value itself (the bit
//! pattern of an i16 count) or its index (any other element type). If two random parts are
//! equal (a *tie*, probability ≈ E(E−1)/2 · 2^−16 ≈ 3 % at E = 64) the block draws all its keys
//! afresh. Otherwise the keys are sorted and the block is rewritten in key order — for E = 64
//! with the ranks in the order of an 8×8 transpose (position 8b + a gets rank 8a + b,
//! [`output_rank`]), the order in which the AVX2 network leaves them. Why exactly uniform: with
//! distinct `r_p`, the order depends on the `r_p` alone; the `r_p` are i.i.d., hence
//! exchangeable, and "no tie" is a symmetric event, so conditioned on it all E! orders remain
//! equally likely; a fixed relabelling of the output positions maps the uniform distribution to
//! itself. The i16 and the index payload give the same permutation for the same random words.
//!
//! **Random words.** Block by block in memory order, every attempt takes four words of each lane
//! of [`Rng4`] (four calls of `next()`, 1024 bits): the 32-bit half h ∈ {0, 1} of word j of call
//! q holds the random parts of the values p = 16q + 2j + h (its low 16 bits) and
//! p = 16q + 8 + 2j + h (its high 16 bits). Values p ≥ E (padding to 64) get the key `u32::MAX`,
//! which sorts last, and take no part in the tie test.
//!
//! **AVX2.** The 64 keys live in eight registers; an optimal 8-input network (Knuth, TAOCP 3,
//! 19 comparators) across the registers sorts every lane, then three bitonic merge stages
//! (Batcher 1968, in the variant whose first step compares i with i XOR (2^s − 1), so that all
//! comparators point the same way) merge the lanes into runs of 16, 32 and 64. Ties are
//! adjacent after sorting: 63 lane-wise comparisons find them. The sorted sequence of a multiset
//! of keys is unique, so the scalar fallback (`sort_unstable`, then the same output order) gives
//! identical results (test `avx2_and_scalar_shuffles_agree`). Hand-written: no maintained crate
//! shuffles many tiny arrays with SIMD (rand's `SliceRandom::shuffle` is a scalar Fisher–Yates,
//! whose data-dependent swaps were the bottleneck of this baseline), and sorting crates do not
//! expose fixed-size in-register networks.

use std::any::TypeId;

use crate::sampler::Rng4;

/// Smallest block length that is shuffled by sorting (shorter blocks: Fisher–Yates is cheaper).
pub(crate) const SORT_MIN: usize = 33;
/// Largest block length that is shuffled by sorting (the keys fill eight AVX2 registers).
pub(crate) const SORT_MAX: usize = 64;

/// Whether blocks of `ne` values are shuffled here ([`permute_blocks`]).
pub(crate) fn uses_sort(ne: usize) -> bool {
    (SORT_MIN..=SORT_MAX).contains(&ne)
}

/// Key of a padding value (p ≥ E): sorts after every real key.
const PAD: u32 = u32::MAX;

/// Writes to `dst` the blocks of `ne` consecutive values of `src`, each permuted uniformly and
/// independently (see the module docs). `src.len() == dst.len()`, a multiple of `ne`.
pub(crate) fn permute_blocks<T: Copy + 'static>(
    rng: &mut Rng4,
    src: &[T],
    dst: &mut [T],
    ne: usize,
) {
    permute_blocks_with(rng, src, dst, ne, avx2_available());
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` as an i16 slice when `T` is i16.
fn as_i16<T: 'static>(x: &[T]) -> Option<&[i16]> {
    // SAFETY: T is i16 (same type id), so the slice is reinterpreted as itself.
    (TypeId::of::<T>() == TypeId::of::<i16>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<i16>(), x.len()) })
}

fn as_i16_mut<T: 'static>(x: &mut [T]) -> Option<&mut [i16]> {
    // SAFETY: as in `as_i16`; the borrow of `x` is moved into the result.
    (TypeId::of::<T>() == TypeId::of::<i16>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<i16>(), x.len()) })
}

fn permute_blocks_with<T: Copy + 'static>(
    rng: &mut Rng4,
    src: &[T],
    dst: &mut [T],
    ne: usize,
    avx2: bool,
) {
    assert!(uses_sort(ne) && src.len() == dst.len() && src.len().is_multiple_of(ne));
    // Never the AVX2 kernel on a CPU without AVX2, whatever the caller asks.
    let mut sorter = Sorter::new(ne, avx2 && avx2_available());
    let mut payload = [0u16; SORT_MAX];
    let mut sorted = [0u32; SORT_MAX];
    if let (Some(s16), Some(d16)) = (as_i16(src), as_i16_mut(dst)) {
        // Payload: the count's bit pattern; the output is the low half of the sorted keys.
        #[cfg(target_arch = "x86_64")]
        if let (Some(c), SORT_MAX) = (&sorter.avx2, ne) {
            for (s, d) in s16.chunks_exact(ne).zip(d16.chunks_exact_mut(ne)) {
                let (s, d) = (s.try_into().expect("64"), d.try_into().expect("64"));
                // SAFETY: `Consts` exist only when AVX2 was detected.
                unsafe { avx2::shuffle_i16_64(rng, s, c, d) };
            }
            return;
        }
        for (s, d) in s16.chunks_exact(ne).zip(d16.chunks_exact_mut(ne)) {
            for (x, &y) in payload.iter_mut().zip(s) {
                *x = y as u16;
            }
            sorter.sort(rng, &payload, &mut sorted);
            for (y, &k) in d.iter_mut().zip(&sorted) {
                *y = k as u16 as i16;
            }
        }
    } else {
        // Payload: the index.
        for (p, x) in payload.iter_mut().enumerate() {
            *x = p as u16;
        }
        for (s, d) in src.chunks_exact(ne).zip(dst.chunks_exact_mut(ne)) {
            sorter.sort(rng, &payload, &mut sorted);
            for (y, &k) in d.iter_mut().zip(&sorted) {
                *y = s[(k & 0xffff) as usize];
            }
        }
    }
}

/// Sorts the keys of one block, with AVX2 or the scalar fallback.
struct Sorter {
    ne: usize,
    #[cfg(target_arch = "x86_64")]
    avx2: Option<avx2::Consts>,
}

impl Sorter {
    /// `use_avx2` only when AVX2 was detected.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn new(ne: usize, use_avx2: bool) -> Self {
        Sorter {
            ne,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only when AVX2 is available.
            avx2: use_avx2.then(|| unsafe { avx2::Consts::new(ne) }),
        }
    }

    /// The keys of one block in output order (position p: rank [`output_rank`]`(p)`; the
    /// real keys in positions `0..ne`), drawing until the random parts of the `ne` real keys
    /// are distinct.
    #[inline]
    fn sort(&mut self, rng: &mut Rng4, payload: &[u16; SORT_MAX], out: &mut [u32; SORT_MAX]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(c) = &self.avx2 {
            // SAFETY: `Consts` exist only when AVX2 was detected.
            unsafe { avx2::sort(rng, payload, c, out) };
            return;
        }
        sort_scalar(rng, payload, self.ne, out);
    }
}

/// The keys of one attempt, in the order p = 0..64 (see the module docs).
fn draw_keys(rng: &mut Rng4, payload: &[u16; SORT_MAX], ne: usize, keys: &mut [u32; SORT_MAX]) {
    for q in 0..4 {
        let r = rng.next();
        for h in 0..2 {
            for lane in 0..8 {
                let p = 16 * q + 8 * h + lane;
                let half = (r[lane / 2] >> (32 * (lane % 2))) as u32;
                let random = if h == 0 {
                    half << 16
                } else {
                    half & 0xffff_0000
                };
                keys[p] = if p < ne {
                    random | payload[p] as u32
                } else {
                    PAD
                };
            }
        }
    }
}

/// The rank (in ascending key order) of the key written to position p of a block: p itself
/// for E < 64; for E = 64 the 8×8 transpose (p = 8b + a gets rank 8a + b), the order in which
/// the AVX2 network leaves the keys. A fixed relabelling of the positions keeps a uniform
/// permutation uniform.
fn output_rank(p: usize, ne: usize) -> usize {
    if ne == SORT_MAX {
        8 * (p % 8) + p / 8
    } else {
        p
    }
}

/// Whether two sorted neighbours among the first `ne` keys share their random part.
fn has_tie(sorted: &[u32], ne: usize) -> bool {
    sorted[..ne].windows(2).any(|w| (w[0] ^ w[1]) >> 16 == 0)
}

fn sort_scalar(rng: &mut Rng4, payload: &[u16; SORT_MAX], ne: usize, out: &mut [u32; SORT_MAX]) {
    loop {
        draw_keys(rng, payload, ne, out);
        out[..ne].sort_unstable();
        if !has_tie(out, ne) {
            let sorted = *out;
            for (p, x) in out.iter_mut().enumerate() {
                *x = sorted[output_rank(p, ne)];
            }
            return;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Rng4, PAD, SORT_MAX};
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
        #[target_feature(enable = "avx2")]
        pub(super) unsafe fn new(ne: usize) -> Self {
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
            let load = |v: &[u32; SORT_MAX], reg: usize| {
                _mm256_loadu_si256(v[8 * reg..].as_ptr() as *const __m256i)
            };
            Consts {
                pad: std::array::from_fn(|reg| load(&pad, reg)),
                skip: std::array::from_fn(|reg| load(&skip, reg)),
                transpose: ne < SORT_MAX,
            }
        }
    }

    /// xoshiro256++ on the four lanes (state word w of every lane in `s[w]`).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn next(s: &mut [__m256i; 4]) -> __m256i {
        // SAFETY: AVX2 is enabled for this function.
        unsafe { crate::sampler::avx2::next(s) }
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
    pub(super) unsafe fn sort(
        rng: &mut Rng4,
        payload: &[u16; SORT_MAX],
        c: &Consts,
        out: &mut [u32; SORT_MAX],
    ) {
        // SAFETY: 8 × 8 u16 of `payload`, 8 × 8 u32 of `out`.
        let low: [__m256i; 8] = std::array::from_fn(|reg| {
            let p = unsafe { _mm_loadu_si128(payload[8 * reg..].as_ptr() as *const __m128i) };
            _mm256_or_si256(_mm256_cvtepu16_epi32(p), c.pad[reg])
        });
        let mut r = sort_regs(rng, &low, c);
        if c.transpose {
            transpose(&mut r);
        }
        for (reg, x) in r.iter().enumerate() {
            unsafe { _mm256_storeu_si256(out[8 * reg..].as_mut_ptr() as *mut __m256i, *x) };
        }
    }

    /// A block of exactly 64 i16 values (payload: their bit patterns), permuted from `src` to
    /// `dst`: the same result as [`sort`] followed by taking the low halves of the keys.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn shuffle_i16_64(
        rng: &mut Rng4,
        src: &[i16; SORT_MAX],
        c: &Consts,
        dst: &mut [i16; SORT_MAX],
    ) {
        // SAFETY: 8 × 8 i16 of `src`, 4 × 16 i16 of `dst`.
        let low: [__m256i; 8] = std::array::from_fn(|reg| {
            let p = unsafe { _mm_loadu_si128(src[8 * reg..].as_ptr() as *const __m128i) };
            _mm256_cvtepu16_epi32(p)
        });
        let r = sort_regs(rng, &low, c);
        let lo16 = _mm256_set1_epi32(0xffff);
        for h in 0..4 {
            let a = _mm256_and_si256(r[2 * h], lo16);
            let b = _mm256_and_si256(r[2 * h + 1], lo16);
            // packus works per 128-bit half: [a0..3 b0..3 | a4..7 b4..7] → reorder the quarters.
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
            unsafe { _mm256_storeu_si256(dst[16 * h..].as_mut_ptr() as *mut __m256i, p) };
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
        let mut r: [__m256i; 8] = std::array::from_fn(|reg| unsafe {
            _mm256_loadu_si256(keys[8 * reg..].as_ptr() as *const __m256i)
        });
        network(&mut r);
        let mut out = [0u32; SORT_MAX];
        for (reg, x) in r.iter().enumerate() {
            unsafe { _mm256_storeu_si256(out[8 * reg..].as_mut_ptr() as *mut __m256i, *x) };
        }
        out
    }

    /// Sorted keys for the payload lanes `low` (padding included), drawing until there is no
    /// tie: lane a of register b holds the key of rank 8a + b.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sort_regs(rng: &mut Rng4, low: &[__m256i; 8], c: &Consts) -> [__m256i; 8] {
        // SAFETY: 4 × 4 u64 of `rng.s`.
        let mut st: [__m256i; 4] = std::array::from_fn(|w| unsafe {
            _mm256_loadu_si256(rng.s[w].as_ptr() as *const __m256i)
        });
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
            for (w, x) in st.iter().enumerate() {
                unsafe { _mm256_storeu_si256(rng.s[w].as_mut_ptr() as *mut __m256i, *x) };
            }
            return r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shuffle<T: Copy + 'static>(src: &[T], ne: usize, rep: u64, avx2: bool) -> Vec<T> {
        let mut rng = Rng4::new(5, 77, rep);
        let mut dst = src.to_vec();
        permute_blocks_with(&mut rng, src, &mut dst, ne, avx2);
        dst
    }

    #[test]
    fn sorted_keys_are_increasing_and_complete() {
        // Through the AVX2 network when available: in rank order, strictly increasing random
        // parts (ties were redrawn), every index exactly once, padding last.
        for ne in [64, 60, 33] {
            let mut rng = Rng4::new(1, 2, ne as u64);
            let mut sorter = Sorter::new(ne, avx2_available());
            let payload: [u16; SORT_MAX] = std::array::from_fn(|p| p as u16);
            let mut out = [0u32; SORT_MAX];
            for _ in 0..2000 {
                sorter.sort(&mut rng, &payload, &mut out);
                let mut ranked = [0u32; SORT_MAX];
                for (p, &k) in out.iter().enumerate() {
                    ranked[output_rank(p, ne)] = k;
                }
                let real = &ranked[..ne];
                assert!(
                    real.windows(2).all(|w| w[0] >> 16 < w[1] >> 16),
                    "{ranked:?}"
                );
                assert!(ranked[ne..].iter().all(|&k| k == PAD));
                let mut idx: Vec<u32> = real.iter().map(|k| k & 0xffff).collect();
                idx.sort_unstable();
                assert_eq!(idx, (0..ne as u32).collect::<Vec<u32>>());
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_network_sorts_inputs_with_duplicates() {
        // Random 0-1 inputs (the 0-1 principle), few distinct values, distinct values, and
        // sorted / reversed / constant inputs: the network's output, read in rank order, is
        // the sorted input.
        if !avx2_available() {
            return;
        }
        let mut rng = Rng4::new(7, 7, 7);
        for case in 0..5000usize {
            let range = [2u64, 3, 5, 64, 1 << 32][case % 5];
            let mut keys = [0u32; SORT_MAX];
            for k in keys.chunks_mut(4) {
                for (x, &y) in k.iter_mut().zip(&rng.next()) {
                    *x = (y % range) as u32;
                }
            }
            match case {
                0 => keys = std::array::from_fn(|p| p as u32),
                1 => keys = std::array::from_fn(|p| 63 - p as u32),
                2 => keys = [u32::MAX; SORT_MAX],
                3 => keys = std::array::from_fn(|p| (p % 2) as u32 * u32::MAX),
                _ => {}
            }
            // SAFETY: AVX2 is available.
            let got = unsafe { avx2::network_on(&keys) };
            let mut want = keys;
            want.sort_unstable();
            for (p, &g) in got.iter().enumerate() {
                assert_eq!(g, want[output_rank(p, SORT_MAX)], "case {case}: {keys:?}");
            }
        }
    }

    #[test]
    fn output_is_a_permutation_of_each_block() {
        for ne in [33, 40, 60, 63, 64] {
            let src: Vec<i16> = (0..ne * 9).map(|x| ((x * 7) % 5) as i16 - 1).collect();
            let src64: Vec<f64> = src.iter().map(|&x| x as f64).collect();
            for avx2 in [false, avx2_available()] {
                let d = shuffle(&src, ne, 1, avx2);
                let d64 = shuffle(&src64, ne, 1, avx2);
                // Index payload (f64) and value payload (i16) give the same permutation.
                assert_eq!(d64, d.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let mut moved = false;
                for (a, b) in src.chunks(ne).zip(d.chunks(ne)) {
                    moved |= a != b;
                    let (mut a, mut b) = (a.to_vec(), b.to_vec());
                    a.sort_unstable();
                    b.sort_unstable();
                    assert_eq!(a, b, "ne={ne}");
                }
                assert!(moved);
            }
        }
    }

    #[test]
    fn avx2_and_scalar_shuffles_agree() {
        if !avx2_available() {
            return;
        }
        for ne in [33, 47, 60, 64] {
            let src: Vec<i16> = (0..ne * 50).map(|x| (x % 300) as i16).collect();
            for rep in 0..20 {
                let mut a = Rng4::new(9, 1, rep);
                let mut b = Rng4::new(9, 1, rep);
                let mut x = src.clone();
                let mut y = src.clone();
                permute_blocks_with(&mut a, &src, &mut x, ne, false);
                permute_blocks_with(&mut b, &src, &mut y, ne, true);
                assert_eq!(x, y, "ne={ne} rep={rep}");
                // Same random words consumed.
                assert_eq!(a.next(), b.next());
            }
        }
    }

    #[test]
    fn deterministic_per_stream() {
        let src: Vec<i16> = (0..64 * 20).map(|x| (x % 64) as i16).collect();
        let avx2 = avx2_available();
        assert_eq!(shuffle(&src, 64, 3, avx2), shuffle(&src, 64, 3, avx2));
        assert_ne!(shuffle(&src, 64, 3, avx2), shuffle(&src, 64, 4, avx2));
    }

    #[test]
    fn each_value_lands_in_each_position_uniformly() {
        // 64 distinct values, 4000 blocks: each (value, position) cell ≈ 4000/64 = 62.5.
        let blocks = 4000;
        let src: Vec<i16> = (0..64 * blocks).map(|x| (x % 64) as i16).collect();
        let d = shuffle(&src, 64, 0, avx2_available());
        let mut h = vec![0u32; 64 * 64];
        for b in d.chunks(64) {
            for (pos, &v) in b.iter().enumerate() {
                h[v as usize * 64 + pos] += 1;
            }
        }
        let expect = blocks as f64 / 64.0;
        let sd = (expect * (1.0 - 1.0 / 64.0)).sqrt();
        // 4096 cells: a 5.5-SD deviation anywhere has probability ≈ 1.6e-4.
        assert!(
            h.iter().all(|&x| (x as f64 - expect).abs() < 5.5 * sd),
            "{h:?}"
        );
        // Chi-square over the cells of the first value (63 d.o.f.): mean 63, sd ≈ 11.2.
        let chi: f64 = h[..64]
            .iter()
            .map(|&x| (x as f64 - expect).powi(2) / expect)
            .sum();
        assert!(chi < 63.0 + 6.0 * 11.3, "{chi}");
    }

    #[test]
    fn relative_orders_of_four_values_are_uniform() {
        // Four marked values among 64 (and among 33): the order in which they appear is one of
        // 24, each with probability 1/24.
        for ne in [64, 33] {
            let draws = 48_000;
            let src: Vec<i16> = (0..ne * draws).map(|x| ((x % ne) as i16).min(4)).collect();
            let d = shuffle(&src, ne, 2, avx2_available());
            let mut h = [0u32; 256];
            for b in d.chunks(ne) {
                let code = b
                    .iter()
                    .filter(|&&v| v < 4)
                    .fold(0usize, |acc, &v| acc * 4 + v as usize);
                h[code] += 1;
            }
            let p = 1.0 / 24.0;
            let expect = draws as f64 * p;
            let sd = (draws as f64 * p * (1.0 - p)).sqrt();
            let seen: Vec<u32> = h.iter().copied().filter(|&x| x > 0).collect();
            assert_eq!(seen.len(), 24);
            for &x in &seen {
                assert!((x as f64 - expect).abs() < 5.0 * sd, "ne={ne} {seen:?}");
            }
        }
    }

    #[test]
    fn ties_are_redrawn() {
        let mut k = [0u32; SORT_MAX];
        k[0] = 0x0005_0001;
        k[1] = 0x0005_0002;
        assert!(has_tie(&k, 2));
        k[1] = 0x0006_0001;
        assert!(!has_tie(&k, 2));
        // A stream whose first keys tie (≈ 3 % of blocks of 64) and whose second do not: both
        // paths return the second attempt's keys and leave the stream after it.
        let payload: [u16; SORT_MAX] = std::array::from_fn(|p| p as u16);
        let attempt = |rng: &mut Rng4| {
            let mut k = [0u32; SORT_MAX];
            draw_keys(rng, &payload, 64, &mut k);
            k.sort_unstable();
            k
        };
        let rep = (0..10_000)
            .find(|&rep| {
                let mut rng = Rng4::new(0, 0, rep);
                has_tie(&attempt(&mut rng), 64) && !has_tie(&attempt(&mut rng), 64)
            })
            .expect("a tie within 10 000 blocks");
        let mut rng = Rng4::new(0, 0, rep);
        attempt(&mut rng);
        let want = attempt(&mut rng);
        let after = rng.next();
        for avx2 in [false, avx2_available()] {
            let mut rng = Rng4::new(0, 0, rep);
            let mut out = [0u32; SORT_MAX];
            Sorter::new(64, avx2).sort(&mut rng, &payload, &mut out);
            for (p, &x) in out.iter().enumerate() {
                assert_eq!(x, want[output_rank(p, 64)], "avx2={avx2}");
            }
            assert_eq!(rng.next(), after);
        }
    }
}
