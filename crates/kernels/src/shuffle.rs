//! Exactly uniform random permutations of small blocks (33 ≤ E ≤ 64 values) by sorting random
//! keys: the `permutation` baseline (`moe-xray-stats`, `baselines.rs`) permutes the expert axis of every
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
//! whose data-dependent swaps were the bottleneck of the permutation baseline), and sorting crates do not
//! expose fixed-size in-register networks.

use crate::cpu::Cpu;
use crate::rng::Rng4;

/// Smallest block length that is shuffled by sorting (shorter blocks: Fisher–Yates is cheaper).
pub const SORT_MIN: usize = 33;
/// Largest block length that is shuffled by sorting (the keys fill eight AVX2 registers).
pub const SORT_MAX: usize = 64;

/// Whether blocks of `ne` values are shuffled here ([`permute_blocks`]).
pub fn uses_sort(ne: usize) -> bool {
    (SORT_MIN..=SORT_MAX).contains(&ne)
}

/// Key of a padding value (p ≥ E): sorts after every real key.
const PAD: u32 = u32::MAX;

/// Writes to `dst` the blocks of `ne` consecutive values of `src`, each permuted uniformly and
/// independently (see the module docs; payload: the index). `src.len() == dst.len()`, a
/// multiple of `ne`, and [`uses_sort`]`(ne)`.
pub fn permute_blocks<T: Copy>(rng: &mut Rng4, src: &[T], dst: &mut [T], ne: usize) {
    permute_blocks_on(Cpu::get(), rng, src, dst, ne)
}

/// [`permute_blocks`] with the kernels `cpu` allows (identical results on every CPU).
pub fn permute_blocks_on<T: Copy>(cpu: Cpu, rng: &mut Rng4, src: &[T], dst: &mut [T], ne: usize) {
    assert!(uses_sort(ne) && src.len() == dst.len() && src.len().is_multiple_of(ne));
    let mut sorter = Sorter::new(ne, cpu);
    let mut payload = [0u16; SORT_MAX];
    let mut sorted = [0u32; SORT_MAX];
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

/// [`permute_blocks`] for i16 values (payload: the value's bit pattern, faster): the same
/// permutation for the same random words.
pub fn permute_blocks_i16(rng: &mut Rng4, src: &[i16], dst: &mut [i16], ne: usize) {
    permute_blocks_i16_on(Cpu::get(), rng, src, dst, ne)
}

/// [`permute_blocks_i16`] with the kernels `cpu` allows (identical results on every CPU).
pub fn permute_blocks_i16_on(cpu: Cpu, rng: &mut Rng4, src: &[i16], dst: &mut [i16], ne: usize) {
    assert!(uses_sort(ne) && src.len() == dst.len() && src.len().is_multiple_of(ne));
    let mut sorter = Sorter::new(ne, cpu);
    // Payload: the count's bit pattern; the output is the low half of the sorted keys.
    #[cfg(target_arch = "x86_64")]
    if let (Some(c), SORT_MAX) = (&sorter.avx2, ne) {
        for (s, d) in src.chunks_exact(ne).zip(dst.chunks_exact_mut(ne)) {
            #[allow(clippy::expect_used)]
            // chunks of exactly 64 elements: the conversion cannot fail
            let (s, d) = (s.try_into().expect("64"), d.try_into().expect("64"));
            // SAFETY: `Consts` exist only when AVX2 was detected (made with an `Avx2` token).
            unsafe { avx2::shuffle_i16_64(rng, s, c, d) };
        }
        return;
    }
    let mut payload = [0u16; SORT_MAX];
    let mut sorted = [0u32; SORT_MAX];
    for (s, d) in src.chunks_exact(ne).zip(dst.chunks_exact_mut(ne)) {
        for (x, &y) in payload.iter_mut().zip(s) {
            *x = y as u16;
        }
        sorter.sort(rng, &payload, &mut sorted);
        for (y, &k) in d.iter_mut().zip(&sorted) {
            *y = k as u16 as i16;
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
    /// The AVX2 network when `cpu` has AVX2.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn new(ne: usize, cpu: Cpu) -> Self {
        Sorter {
            ne,
            #[cfg(target_arch = "x86_64")]
            avx2: cpu.avx2().map(|t| avx2::Consts::new(t, ne)),
        }
    }

    /// The keys of one block in output order (position p: rank [`output_rank`]`(p)`; the
    /// real keys in positions `0..ne`), drawing until the random parts of the `ne` real keys
    /// are distinct.
    #[inline]
    fn sort(&mut self, rng: &mut Rng4, payload: &[u16; SORT_MAX], out: &mut [u32; SORT_MAX]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(c) = &self.avx2 {
            // SAFETY: `Consts` exist only when AVX2 was detected (made with an `Avx2` token).
            unsafe { avx2::sort(rng, payload, c, out) };
            return;
        }
        sort_scalar(rng, payload, self.ne, out);
    }
}

/// The keys of one attempt, in the order p = 0..64 (see the module docs).
fn draw_keys(rng: &mut Rng4, payload: &[u16; SORT_MAX], ne: usize, keys: &mut [u32; SORT_MAX]) {
    for q in 0..4 {
        let r = rng.next_words();
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
#[path = "arch/x86_64/avx2/shuffle.rs"]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::tests::rng4;

    fn avx2_available() -> bool {
        Cpu::get().avx2().is_some()
    }

    fn cpu(avx2: bool) -> Cpu {
        if avx2 {
            Cpu::get()
        } else {
            Cpu::scalar()
        }
    }

    /// The i16 entry point for i16 values, the generic (index payload) one for f64.
    trait Perm: Copy + Sized {
        fn permute(cpu: Cpu, rng: &mut Rng4, src: &[Self], dst: &mut [Self], ne: usize);
    }
    impl Perm for i16 {
        fn permute(cpu: Cpu, rng: &mut Rng4, src: &[i16], dst: &mut [i16], ne: usize) {
            permute_blocks_i16_on(cpu, rng, src, dst, ne)
        }
    }
    impl Perm for f64 {
        fn permute(cpu: Cpu, rng: &mut Rng4, src: &[f64], dst: &mut [f64], ne: usize) {
            permute_blocks_on(cpu, rng, src, dst, ne)
        }
    }

    fn permute_blocks_with<T: Perm>(
        rng: &mut Rng4,
        src: &[T],
        dst: &mut [T],
        ne: usize,
        avx2: bool,
    ) {
        T::permute(cpu(avx2), rng, src, dst, ne)
    }

    fn shuffle<T: Perm>(src: &[T], ne: usize, rep: u64, avx2: bool) -> Vec<T> {
        let mut rng = rng4(5, 77, rep);
        let mut dst = src.to_vec();
        permute_blocks_with(&mut rng, src, &mut dst, ne, avx2);
        dst
    }

    #[test]
    fn sorted_keys_are_increasing_and_complete() {
        // Through the AVX2 network when available: in rank order, strictly increasing random
        // parts (ties were redrawn), every index exactly once, padding last.
        for ne in [64, 60, 33] {
            let mut rng = rng4(1, 2, ne as u64);
            let mut sorter = Sorter::new(ne, Cpu::get());
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
        let mut rng = rng4(7, 7, 7);
        for case in 0..5000usize {
            let range = [2u64, 3, 5, 64, 1 << 32][case % 5];
            let mut keys = [0u32; SORT_MAX];
            for k in keys.chunks_mut(4) {
                for (x, &y) in k.iter_mut().zip(&rng.next_words()) {
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
            // SAFETY: AVX2 is available (checked above).
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
                let mut a = rng4(9, 1, rep);
                let mut b = rng4(9, 1, rep);
                let mut x = src.clone();
                let mut y = src.clone();
                permute_blocks_with(&mut a, &src, &mut x, ne, false);
                permute_blocks_with(&mut b, &src, &mut y, ne, true);
                assert_eq!(x, y, "ne={ne} rep={rep}");
                // Same random words consumed.
                assert_eq!(a.next_words(), b.next_words());
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
                let mut rng = rng4(0, 0, rep);
                has_tie(&attempt(&mut rng), 64) && !has_tie(&attempt(&mut rng), 64)
            })
            .expect("a tie within 10 000 blocks");
        let mut rng = rng4(0, 0, rep);
        attempt(&mut rng);
        let want = attempt(&mut rng);
        let after = rng.next_words();
        for avx2 in [false, avx2_available()] {
            let mut rng = rng4(0, 0, rep);
            let mut out = [0u32; SORT_MAX];
            Sorter::new(64, cpu(avx2)).sort(&mut rng, &payload, &mut out);
            for (p, &x) in out.iter().enumerate() {
                assert_eq!(x, want[output_rank(p, 64)], "avx2={avx2}");
            }
            assert_eq!(rng.next_words(), after);
        }
    }
}
