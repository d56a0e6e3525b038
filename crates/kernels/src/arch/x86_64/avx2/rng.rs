//! xoshiro256++ on the four lanes of [`Rng4`] in AVX2 registers (state word w of every lane in
//! register w): the same step as [`super::step`], lane by lane.

use std::arch::x86_64::*;

use super::Rng4;
use crate::mem::{load256, store256};

/// One step of all four lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn next(s: &mut [__m256i; 4]) -> __m256i {
    let x = _mm256_add_epi64(s[0], s[3]);
    let rot = _mm256_or_si256(_mm256_slli_epi64(x, 23), _mm256_srli_epi64(x, 41));
    let out = _mm256_add_epi64(rot, s[0]);
    let t = _mm256_slli_epi64(s[1], 17);
    s[2] = _mm256_xor_si256(s[2], s[0]);
    s[3] = _mm256_xor_si256(s[3], s[1]);
    s[1] = _mm256_xor_si256(s[1], s[2]);
    s[0] = _mm256_xor_si256(s[0], s[3]);
    s[2] = _mm256_xor_si256(s[2], t);
    s[3] = _mm256_or_si256(_mm256_slli_epi64(s[3], 45), _mm256_srli_epi64(s[3], 19));
    out
}

/// The four lanes' states in registers.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn load(rng: &Rng4) -> [__m256i; 4] {
    [
        load256(&rng.s[0]),
        load256(&rng.s[1]),
        load256(&rng.s[2]),
        load256(&rng.s[3]),
    ]
}

/// Writes the registers back to the lanes' states.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn store(rng: &mut Rng4, s: &[__m256i; 4]) {
    for (w, v) in rng.s.iter_mut().zip(s) {
        store256(w, *v);
    }
}

/// [`Rng4::next`] through the registers (tests).
#[cfg(test)]
pub(crate) fn next_words_avx2(_: crate::cpu::Avx2, rng: &mut Rng4) -> [u64; 4] {
    #[target_feature(enable = "avx2")]
    fn run(rng: &mut Rng4) -> [u64; 4] {
        let mut s = load(rng);
        let v = next(&mut s);
        store(rng, &s);
        let mut out = [0u64; 4];
        store256(&mut out, v);
        out
    }
    // SAFETY: the `Avx2` token exists only on CPUs with AVX2.
    unsafe { run(rng) }
}
