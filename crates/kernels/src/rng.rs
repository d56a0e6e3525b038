//! xoshiro256++ (Blackman & Vigna, "Scrambled linear pseudorandom number generators", 2021):
//! one scalar step ([`step`]), a single stream ([`Xoshiro256pp`]) and four streams side by side
//! ([`Rng4`], whose AVX2 version in `arch/x86_64/avx2/rng.rs` runs the same step on four lanes).
//! Hand-written (reference algorithm) because the baselines consume ~10⁵ words per repetition and
//! ChaCha8 costs several times more per word; rand's `SmallRng` does not promise a fixed
//! algorithm and `rand_xoshiro` is not a dependency.

use rand::RngCore;

/// One xoshiro256++ step: the output word and the state advanced in place.
#[inline(always)]
pub fn step(s: &mut [u64; 4]) -> u64 {
    let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
    let t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = s[3].rotate_left(45);
    result
}

/// One xoshiro256++ stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    /// From an explicit state (must not be all zero).
    pub fn from_state(s: [u64; 4]) -> Self {
        assert!(s != [0; 4], "xoshiro256++ state must not be all zero");
        Xoshiro256pp { s }
    }

    /// Seeded with the next four words of `seeder` (an all-zero state, probability 2^-256, is
    /// replaced by `[1, 0, 0, 0]`: the all-zero state is a fixed point).
    pub fn from_rng(seeder: &mut impl RngCore) -> Self {
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = seeder.next_u64();
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro256pp { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        step(&mut self.s)
    }
}

/// Four xoshiro256++ streams (lanes), stored word-major: `s[w][lane]`, and a fifth, scalar one
/// (`tie`) that resolves the rare ties of byte alias draws (`sampler::AliasTable::draw8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng4 {
    pub(crate) s: [[u64; 4]; 4],
    pub(crate) tie: Xoshiro256pp,
}

impl Rng4 {
    /// Lane j is seeded with words 4j .. 4j + 4 of `seeder`, the tie stream with words 16..20
    /// (all-zero states replaced as in [`Xoshiro256pp::from_rng`]).
    pub fn from_rng(seeder: &mut impl RngCore) -> Self {
        let mut s = [[0u64; 4]; 4];
        for lane in 0..4 {
            for w in &mut s {
                w[lane] = seeder.next_u64();
            }
            if (0..4).all(|w| s[w][lane] == 0) {
                s[0][lane] = 1; // probability 2^-256; the all-zero state is a fixed point
            }
        }
        Rng4 {
            s,
            tie: Xoshiro256pp::from_rng(seeder),
        }
    }

    /// The next word of every lane.
    #[inline(always)]
    pub fn next_words(&mut self) -> [u64; 4] {
        std::array::from_fn(|lane| {
            let mut st = [
                self.s[0][lane],
                self.s[1][lane],
                self.s[2][lane],
                self.s[3][lane],
            ];
            let out = step(&mut st);
            for (w, x) in st.into_iter().enumerate() {
                self.s[w][lane] = x;
            }
            out
        })
    }

    /// Lane `lane` as a single stream (tests).
    pub fn lane(&self, lane: usize) -> Xoshiro256pp {
        Xoshiro256pp::from_state(std::array::from_fn(|w| self.s[w][lane]))
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/rng.rs"]
pub(crate) mod avx2;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A test generator with a fixed seed.
    pub(crate) fn rng4(a: u64, b: u64, c: u64) -> Rng4 {
        let mut seeder =
            rand_chacha::ChaCha8Rng::seed_from_u64(a ^ b.rotate_left(21) ^ c.rotate_left(42));
        Rng4::from_rng(&mut seeder)
    }

    #[test]
    fn reference_vector() {
        // xoshiro256++ from state (1, 2, 3, 4): the first outputs of the reference C code.
        let mut r = Xoshiro256pp::from_state([1, 2, 3, 4]);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [41943041, 58720359, 3588806011781223]);
    }

    #[test]
    fn lanes_are_xoshiro256pp_streams() {
        let mut r = rng4(1, 2, 3);
        let mut refs: Vec<Xoshiro256pp> = (0..4).map(|lane| r.lane(lane)).collect();
        for _ in 0..100 {
            let got = r.next_words();
            for (lane, x) in refs.iter_mut().enumerate() {
                assert_eq!(got[lane], x.next_u64());
            }
        }
    }

    #[test]
    fn avx2_and_scalar_steps_agree() {
        let Some(t) = crate::cpu::Cpu::get().avx2() else {
            return;
        };
        let mut a = rng4(4, 5, 6);
        let mut b = a.clone();
        for _ in 0..1000 {
            assert_eq!(avx2::next_words_avx2(t, &mut a), b.next_words());
        }
        assert_eq!(a, b);
    }
}
