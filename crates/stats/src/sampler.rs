//! Exact samplers of the load-balancing baselines for E ≤ 64 experts, four tokens at a time.
//!
//! A token's selection is a 64-bit mask of its k distinct experts. Tokens are drawn in groups of
//! four *lanes*, lane j from its own xoshiro256++ stream ([`Rng4`]); the per-expert counts of a
//! (prompt, layer) are the column sums of its token masks, kept bit-sliced ([`Sliced`]).
//!
//! * **Uniform k-subset** ([`Draw::Uniform`]): expert indices are b-bit fields of the random
//!   words (b = ⌈log₂ E⌉, fields ≥ E skipped), taken until k distinct experts are set. The set of
//!   the first k distinct values of an i.i.d. uniform sequence is a uniform k-subset (by
//!   symmetry). The first min(k, ⌊64/b⌋) fields of a lane's first word are ORed
//!   unconditionally (they cannot overshoot k); every later field is ORed only while fewer than k
//!   bits are set.
//! * **Sequential draw without replacement** ([`Draw::Alias`]): each pick is drawn from the full
//!   distribution with Vose's alias method ([`AliasTable`]) and rejected when already taken,
//!   which is exactly the renormalised sequential draw (numpy's `choice(replace=False, p=…)`).
//!   Byte draws ([`AliasTable::draw8`]): eight picks per lane from two words while at least
//!   eight unconditional picks are left, then four per word; the first k unconditionally, later
//!   ones only while fewer than k are set. Ties of the acceptance byte (1/256) are decided by a
//!   fifth, scalar stream.
//! * When some lane of a group still has fewer than k experts after its words, **all four**
//!   lanes advance by one word (lanes already complete ignore theirs). So the random words a
//!   lane consumes depend on its group, not on how the group is computed.
//!
//! On x86-64 with AVX2 the group runs in SIMD registers (byte shuffles for the alias table);
//! elsewhere a scalar loop does exactly the same operations (test
//! `avx2_and_scalar_samplers_agree`).
//! Everything is integer arithmetic, so the counts are identical either way. Hand-written
//! because no maintained crate samples k-subsets as bit masks or counts them bit-sliced.

use crate::baselines::Xoshiro256pp;
use crate::sub_rng;
use rand::RngCore;

/// Four xoshiro256++ streams (Blackman & Vigna 2021), stored word-major: `s[w][lane]`, and a
/// fifth, scalar one (`tie`) that resolves the rare ties of byte alias draws
/// ([`AliasTable::draw8`]).
pub(crate) struct Rng4 {
    pub(crate) s: [[u64; 4]; 4],
    tie: Xoshiro256pp,
}

impl Rng4 {
    /// Lane j is seeded with words 4 + 4j .. 8 + 4j of `sub_rng(seed, tag, rep)` (words 0..4
    /// seed the repetition's scalar stream, see `baselines::RepRng`), the tie stream with words
    /// 20..24.
    pub(crate) fn new(seed: u64, tag: u64, rep: u64) -> Self {
        let mut c = sub_rng(seed, tag, rep);
        for _ in 0..4 {
            c.next_u64();
        }
        let mut s = [[0u64; 4]; 4];
        for lane in 0..4 {
            for w in &mut s {
                w[lane] = c.next_u64();
            }
            if (0..4).all(|w| s[w][lane] == 0) {
                s[0][lane] = 1; // probability 2^-256; the all-zero state is a fixed point
            }
        }
        let mut tie = [0u64; 4];
        for x in &mut tie {
            *x = c.next_u64();
        }
        if tie == [0; 4] {
            tie[0] = 1;
        }
        Rng4 {
            s,
            tie: Xoshiro256pp::from_state(tie),
        }
    }

    /// The next word of every lane.
    #[inline(always)]
    pub(crate) fn next(&mut self) -> [u64; 4] {
        let mut out = [0u64; 4];
        for (lane, o) in out.iter_mut().enumerate() {
            let [s0, s1, s2, s3] = [
                self.s[0][lane],
                self.s[1][lane],
                self.s[2][lane],
                self.s[3][lane],
            ];
            *o = s0.wrapping_add(s3).rotate_left(23).wrapping_add(s0);
            let t = s1 << 17;
            let s2 = s2 ^ s0;
            let s3 = s3 ^ s1;
            let s1 = s1 ^ s2;
            let s0 = s0 ^ s3;
            let s2 = s2 ^ t;
            let s3 = s3.rotate_left(45);
            self.s[0][lane] = s0;
            self.s[1][lane] = s1;
            self.s[2][lane] = s2;
            self.s[3][lane] = s3;
        }
        out
    }
}

/// Uniform draws from `[0, E)`, 2 ≤ E ≤ 64: b-bit fields of random words.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields {
    /// b = ⌈log₂ E⌉.
    bits: u32,
    /// Fields per 64-bit word.
    per_word: usize,
    /// Bits of the experts `0..E`.
    valid: u64,
}

impl Fields {
    pub(crate) fn new(ne: usize) -> Self {
        assert!((2..=64).contains(&ne));
        let bits = ne.next_power_of_two().trailing_zeros();
        Fields {
            bits,
            per_word: (64 / bits) as usize,
            valid: if ne == 64 { u64::MAX } else { (1u64 << ne) - 1 },
        }
    }
}

/// Vose alias table over E ≤ 64 experts, padded with zero-weight columns to E' = 2^b. A draw
/// takes 32 random bits: the top b choose a column exactly uniformly, the low s = 32 − b are
/// compared with the column's threshold `ceil(prob · 2^s)` (so probabilities are exact to
/// 2^-s, 1.5e-8 for E = 64). Entry = threshold | alias << s; a column with prob = 1 is its own
/// alias (threshold capped at 2^s − 1). Zero-weight experts and padding are never drawn.
///
/// For E' ≤ 64 the table also draws from two random bytes ([`AliasTable::draw8`]): the low b
/// bits of one choose the column, the other is the top 8 bits of the s-bit uniform, compared with
/// the top 8 bits of the threshold; only when they are equal (probability 1/256 per draw) do
/// s − 8 more bits from the tie stream decide against the threshold's low s − 8 bits. The
/// outcome is the same function of an s-bit uniform as in [`AliasTable::draw`], so the
/// probabilities are the same, exact to 2^-s.
#[derive(Debug, Clone)]
pub(crate) struct AliasTable {
    /// s = 32 − b.
    shift: u32,
    entries: Vec<u32>,
    /// Byte draws (E' ≤ 64, else empty): per column its alias, the threshold's top 8 bits and
    /// its low s − 8 bits.
    alias8: Vec<u8>,
    thr8: Vec<u8>,
    rest: Vec<u32>,
    /// `alias8` and `thr8` (zero-padded to 64) as four 16-byte tables each XORed with the
    /// previous one (see `avx2::lookup8`), each stored twice (one copy per 128-bit lane).
    lut_alias: [[u8; 32]; 4],
    lut_thr: [[u8; 32]; 4],
}

impl AliasTable {
    /// Table for non-negative weights with a positive sum (at most 2^31 of them).
    pub(crate) fn new(w: &[f64]) -> Self {
        assert!(!w.is_empty() && w.len() <= 1 << 31);
        let padded = w.len().next_power_of_two().max(2);
        let shift = 32 - padded.trailing_zeros();
        let w: Vec<f64> = (0..padded)
            .map(|i| w.get(i).copied().unwrap_or(0.0))
            .collect();
        let total: f64 = w.iter().sum();
        let mut prob: Vec<f64> = w.iter().map(|x| x * padded as f64 / total).collect();
        let mut alias: Vec<usize> = (0..padded).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..padded).partition(|&i| prob[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            alias[s] = l;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers are 1 up to rounding. A zero-weight leftover (possible only through rounding)
        // must never be returned: it always takes the heaviest expert instead.
        let heaviest = (0..padded).fold(0, |m, i| if w[i] > w[m] { i } else { m });
        for i in large.into_iter().chain(small) {
            if w[i] > 0.0 {
                prob[i] = 1.0;
            } else {
                prob[i] = 0.0;
                alias[i] = heaviest;
            }
        }
        let scale = (1u64 << shift) as f64;
        let entries = (0..padded)
            .map(|c| {
                let thr = (prob[c].clamp(0.0, 1.0) * scale).ceil() as u64;
                let (thr, a) = if thr >= 1u64 << shift {
                    ((1u64 << shift) - 1, c)
                } else {
                    (thr, alias[c])
                };
                (thr | (a as u64) << shift) as u32
            })
            .collect::<Vec<u32>>();
        let low = (1u32 << shift) - 1;
        let rbits = shift - 8;
        let mut t = AliasTable {
            shift,
            entries,
            alias8: Vec::new(),
            thr8: Vec::new(),
            rest: Vec::new(),
            lut_alias: [[0; 32]; 4],
            lut_thr: [[0; 32]; 4],
        };
        if padded <= 64 {
            t.alias8 = t.entries.iter().map(|&e| (e >> shift) as u8).collect();
            t.thr8 = t
                .entries
                .iter()
                .map(|&e| ((e & low) >> rbits) as u8)
                .collect();
            t.rest = t.entries.iter().map(|&e| e & ((1 << rbits) - 1)).collect();
            let chain = |v: &[u8]| {
                let mut bytes = [0u8; 64];
                bytes[..v.len()].copy_from_slice(v);
                std::array::from_fn(|k| {
                    std::array::from_fn(|i| {
                        let i = i % 16;
                        bytes[16 * k + i] ^ if k == 0 { 0 } else { bytes[16 * (k - 1) + i] }
                    })
                })
            };
            t.lut_alias = chain(&t.alias8);
            t.lut_thr = chain(&t.thr8);
        }
        t
    }

    /// One draw from two random bytes (tables with at most 64 columns): the low b bits of `c`
    /// choose the column, `u` is the top byte of the uniform; `tie` supplies the rest when `u`
    /// equals the threshold's top byte (see the type's docs).
    #[inline(always)]
    pub(crate) fn draw8(&self, c: u8, u: u8, tie: &mut Xoshiro256pp) -> u32 {
        let col = (c as usize) & (self.alias8.len() - 1);
        let accept = match u.cmp(&self.thr8[col]) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => {
                (tie.next_u64() as u32 & ((1 << (self.shift - 8)) - 1)) < self.rest[col]
            }
        };
        if accept {
            col as u32
        } else {
            self.alias8[col] as u32
        }
    }

    /// One draw from 32 random bits.
    #[inline(always)]
    pub(crate) fn draw(&self, h: u32) -> u32 {
        let col = ((h as u64) >> self.shift) as usize;
        let low = (1u32 << self.shift) - 1;
        let e = self.entries[col];
        if (h & low) < (e & low) {
            col as u32
        } else {
            e >> self.shift
        }
    }
}

/// How one token picks its k experts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Draw<'a> {
    /// A uniform k-subset (E ≤ 64, k < E).
    Uniform(Fields),
    /// Sequentially without replacement from the table's distribution (more than k experts
    /// carry weight).
    Alias(&'a AliasTable),
}

/// All ones while fewer than `k` bits of `mask` are set, else zero.
#[inline(always)]
fn need(mask: u64, k: usize) -> u64 {
    ((mask.count_ones() as usize) < k) as u64 * u64::MAX
}

/// The next group of four token masks (scalar reference of [`avx2`]).
#[inline(always)]
fn group_scalar(rng: &mut Rng4, d: Draw, k: usize) -> [u64; 4] {
    let mut m = [0u64; 4];
    match d {
        Draw::Uniform(f) => {
            let fm = (1u64 << f.bits) - 1;
            let field = |r: u64, q: usize| (1u64 << ((r >> (q as u32 * f.bits)) & fm)) & f.valid;
            let first = k.min(f.per_word);
            let r = rng.next();
            for (mj, &rj) in m.iter_mut().zip(&r) {
                for q in 0..first {
                    *mj |= field(rj, q);
                }
                for q in first..f.per_word {
                    *mj |= field(rj, q) & need(*mj, k);
                }
            }
            while m.iter().any(|&x| (x.count_ones() as usize) < k) {
                let r = rng.next();
                for (mj, &rj) in m.iter_mut().zip(&r) {
                    for q in 0..f.per_word {
                        *mj |= field(rj, q) & need(*mj, k);
                    }
                }
            }
        }
        Draw::Alias(a) => {
            // Eight draws per lane from two words (column bytes, acceptance bytes) while at
            // least eight unconditional draws are left, then four per word (column bytes 0..4,
            // acceptance bytes 4..8). Ties are resolved lane by lane, draw by draw.
            let mut d = 0;
            while d + 8 <= k {
                let (r1, r2) = (rng.next(), rng.next());
                for (mj, (&c, &u)) in m.iter_mut().zip(r1.iter().zip(&r2)) {
                    for q in 0..8 {
                        *mj |= 1u64
                            << a.draw8((c >> (8 * q)) as u8, (u >> (8 * q)) as u8, &mut rng.tie);
                    }
                }
                d += 8;
            }
            while d < k || m.iter().any(|&x| (x.count_ones() as usize) < k) {
                let r = rng.next();
                let mut ex = [[0u32; 4]; 4];
                for (exj, &rj) in ex.iter_mut().zip(&r) {
                    for (q, x) in exj.iter_mut().enumerate() {
                        *x = a.draw8(
                            (rj >> (8 * q)) as u8,
                            (rj >> (32 + 8 * q)) as u8,
                            &mut rng.tie,
                        );
                    }
                }
                for (mj, exj) in m.iter_mut().zip(&ex) {
                    for (q, &x) in exj.iter().enumerate() {
                        if d + q < k || (mj.count_ones() as usize) < k {
                            *mj |= 1u64 << x;
                        }
                    }
                }
                d += 4;
            }
        }
    }
    m
}

/// Per-expert counts of up to 64 experts kept bit-sliced ("vertical counters"): bit e of plane
/// p is bit p of expert e's count. Eight masks are added at once through a carry-save adder tree
/// (the Harley–Seal scheme, see Muła, Kurz & Lemire, "Faster population counts using AVX2
/// instructions", Computer Journal 2018): ~6 bit operations per token instead of k increments.
struct Sliced {
    planes: [u64; MAX_PLANES],
    /// Planes in use: the bit length of the largest possible count (at least 3).
    n: usize,
}

/// Tokens per chunk: counts of one chunk stay below 2^22, so [`MAX_PLANES`] always suffice.
const CHUNK: u64 = 1 << 22;
const MAX_PLANES: usize = 24;

/// Carry-save adder: `a + b + c = 2·hi + lo` bitwise.
#[inline(always)]
fn csa(a: u64, b: u64, c: u64) -> (u64, u64) {
    let u = a ^ b;
    ((a & b) | (u & c), u ^ c)
}

impl Sliced {
    /// Counters for at most `max_count` ≤ [`CHUNK`] additions.
    fn new(max_count: u64) -> Self {
        Sliced {
            planes: [0; MAX_PLANES],
            n: ((64 - max_count.leading_zeros()) as usize).clamp(3, MAX_PLANES),
        }
    }

    /// Add the bits of `c` at weight 2^from.
    #[inline(always)]
    fn ripple(&mut self, mut c: u64, from: usize) {
        for p in &mut self.planes[from..self.n] {
            let t = *p & c;
            *p ^= c;
            c = t;
        }
    }

    #[inline(always)]
    fn add8(&mut self, m: &[u64; 8]) {
        let [ones, twos, fours] = [self.planes[0], self.planes[1], self.planes[2]];
        let (ta, ones) = csa(ones, m[0], m[1]);
        let (tb, ones) = csa(ones, m[2], m[3]);
        let (fa, twos) = csa(twos, ta, tb);
        let (ta, ones) = csa(ones, m[4], m[5]);
        let (tb, ones) = csa(ones, m[6], m[7]);
        let (fb, twos) = csa(twos, ta, tb);
        let (eights, fours) = csa(fours, fa, fb);
        self.planes[0] = ones;
        self.planes[1] = twos;
        self.planes[2] = fours;
        self.ripple(eights, 3);
    }

    /// Add another bit-sliced counter (its planes from the lowest; missing ones are zero) at
    /// weight 1.
    #[inline(always)]
    fn add_planes(&mut self, other: impl Iterator<Item = u64>) {
        let mut other = other.fuse();
        let mut carry = 0u64;
        for p in &mut self.planes[..self.n] {
            let (hi, lo) = csa(*p, other.next().unwrap_or(0), carry);
            *p = lo;
            carry = hi;
        }
    }

    /// Add the counts of experts `0..out.len()` to `out`.
    #[inline(always)]
    fn add_counts_to(&self, out: &mut [u64]) {
        let mut c = [0u32; 64];
        for (p, &w) in self.planes[..self.n].iter().enumerate() {
            for (e, x) in c.iter_mut().enumerate() {
                *x |= (((w >> e) & 1) as u32) << p;
            }
        }
        for (o, &x) in out.iter_mut().zip(&c) {
            *o += x as u64;
        }
    }
}

/// Scalar version of [`count_tokens`].
fn count_scalar(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    out.iter_mut().for_each(|x| *x = 0);
    let mut done = 0;
    while done < t {
        let tc = (t - done).min(CHUNK);
        count_chunk_scalar(rng, tc, d, k, out);
        done += tc;
    }
}

fn count_chunk_scalar(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    let mut sc = Sliced::new(t);
    let mut buf = [0u64; 8];
    let mut filled = 0;
    let mut left = t;
    while left > 0 {
        let g = group_scalar(rng, d, k);
        let take = left.min(4) as usize;
        for &m in &g[..take] {
            buf[filled] = m;
            filled += 1;
            if filled == 8 {
                sc.add8(&buf);
                filled = 0;
            }
        }
        left -= take as u64;
    }
    for &m in &buf[..filled] {
        sc.ripple(m, 0);
    }
    sc.add_counts_to(out);
}

/// Draw `t` tokens (groups of four from `rng`, the surplus lanes of the last group discarded)
/// and write the per-expert counts to `out` (`out.len()` = E ≤ 64). `k` ≥ 1 experts per token,
/// fewer than the experts that can be drawn. Tokens are counted in chunks of [`CHUNK`] (a
/// multiple of four, so chunking does not change which words a token uses).
pub(crate) fn count_tokens(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        out.iter_mut().for_each(|x| *x = 0);
        let mut done = 0;
        while done < t {
            let tc = (t - done).min(CHUNK);
            // SAFETY: AVX2 was detected at run time.
            unsafe { avx2::count_chunk(rng, tc, d, k, out) };
            done += tc;
        }
        return;
    }
    count_scalar(rng, t, d, k, out)
}

/// [`count_tokens`] into i16 counts (callers guarantee `t` ≤ 32767): the same draws and counts,
/// with a faster AVX2 path for fewer than 256 tokens.
pub(crate) fn count_tokens_i16(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if t < 256 && out.len() <= 64 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected at run time.
        unsafe { avx2::count_small_i16(rng, t, d, k, out) };
        return;
    }
    let mut c = [0u64; 64];
    count_tokens(rng, t, d, k, &mut c[..out.len()]);
    for (o, &x) in out.iter_mut().zip(&c) {
        *o = x as i16;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{AliasTable, Draw, Fields, Rng4, Sliced, Xoshiro256pp, MAX_PLANES};
    use std::arch::x86_64::*;

    /// xoshiro256++ on four lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn next(s: &mut [__m256i; 4]) -> __m256i {
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

    /// Set bits per 64-bit lane (nibble table, Muła et al.).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn popcnt(x: __m256i) -> __m256i {
        let lut = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
            3, 3, 4,
        );
        let low = _mm256_set1_epi8(0x0f);
        let lo = _mm256_and_si256(x, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
        let c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
        _mm256_sad_epu8(c, _mm256_setzero_si256())
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn any(v: __m256i) -> bool {
        _mm256_movemask_epi8(v) != 0
    }

    /// One-hot masks of the low b bits of every lane, restricted to the experts `0..E` (a no-op
    /// unless `MASKED`, i.e. E < 2^b).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn onehot<const MASKED: bool>(r: __m256i, f: Fields) -> __m256i {
        let fm = _mm256_set1_epi64x(((1u64 << f.bits) - 1) as i64);
        let x = _mm256_sllv_epi64(_mm256_set1_epi64x(1), _mm256_and_si256(r, fm));
        if MASKED {
            _mm256_and_si256(x, _mm256_set1_epi64x(f.valid as i64))
        } else {
            x
        }
    }

    /// Byte alias draws ([`AliasTable::draw8`]): column bytes `rc`, acceptance bytes `ru`;
    /// expert indices in the bytes selected by `valid` (a `movemask` bit mask), the others
    /// undefined. The 64-entry byte tables are looked up with byte shuffles: four 16-byte tables
    /// XOR-chained, so that the XOR of `shuffle(lut[t], col − 16t)` over t is table[col] (an
    /// index below 16t is negative and selects zero). Ties are resolved in byte order, i.e. lane
    /// by lane and draw by draw, exactly as the scalar loop does.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lookup8(
        rc: __m256i,
        ru: __m256i,
        valid: u32,
        a: &AliasTable,
        tie: &mut Xoshiro256pp,
    ) -> __m256i {
        let col = _mm256_and_si256(rc, _mm256_set1_epi8((a.alias8.len() - 1) as i8));
        let sixteen = _mm256_set1_epi8(16);
        let table = |t: &[u8; 32]| _mm256_loadu_si256(t.as_ptr() as *const __m256i);
        let mut idx = col;
        let mut alias = _mm256_shuffle_epi8(table(&a.lut_alias[0]), idx);
        let mut thr = _mm256_shuffle_epi8(table(&a.lut_thr[0]), idx);
        for t in 1..4 {
            idx = _mm256_sub_epi8(idx, sixteen);
            alias = _mm256_xor_si256(alias, _mm256_shuffle_epi8(table(&a.lut_alias[t]), idx));
            thr = _mm256_xor_si256(thr, _mm256_shuffle_epi8(table(&a.lut_thr[t]), idx));
        }
        // u ≥ thr (unsigned): the alias, unless it is a tie.
        let reject = _mm256_cmpeq_epi8(_mm256_max_epu8(ru, thr), ru);
        let ex = _mm256_blendv_epi8(col, alias, reject);
        let tied = _mm256_movemask_epi8(_mm256_cmpeq_epi8(ru, thr)) as u32 & valid;
        if tied != 0 {
            // The tied bytes that take their column instead of the alias.
            let take = resolve_ties(col, tied, a, tie);
            return _mm256_blendv_epi8(ex, col, byte_mask(take));
        }
        ex
    }

    /// The bytes of a 32-bit mask spread to byte lanes: byte i all ones iff bit i is set.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn byte_mask(m: u32) -> __m256i {
        spread_bits::<0>(_mm256_set1_epi32(m as i32))
    }

    /// The 32 bits of bytes `B..B + 4` of each 128-bit half of `v` (both halves must hold the
    /// same bytes) spread to byte lanes: byte i of the result is all ones iff bit i of those 32
    /// bits is set (byte shuffle, bit select, compare).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn spread_bits<const B: i8>(v: __m256i) -> __m256i {
        let idx = _mm256_setr_epi8(
            B,
            B,
            B,
            B,
            B,
            B,
            B,
            B,
            B + 1,
            B + 1,
            B + 1,
            B + 1,
            B + 1,
            B + 1,
            B + 1,
            B + 1,
            B + 2,
            B + 2,
            B + 2,
            B + 2,
            B + 2,
            B + 2,
            B + 2,
            B + 2,
            B + 3,
            B + 3,
            B + 3,
            B + 3,
            B + 3,
            B + 3,
            B + 3,
            B + 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx), bits), bits)
    }

    /// The rare slow path of [`lookup8`] (kept out of line so that the fast path inlines): the
    /// bytes set in `tied`, in increasing order, each take the tie stream's next word; returns
    /// the mask of those that take their column (the others keep the alias). The result comes
    /// back in a register and is blended in by the caller, so no vector is rebuilt through
    /// memory byte by byte (that store-forwarding stall cost more than the ties themselves).
    #[cold]
    #[inline(never)]
    #[target_feature(enable = "avx2")]
    unsafe fn resolve_ties(col: __m256i, tied: u32, a: &AliasTable, tie: &mut Xoshiro256pp) -> u32 {
        let mut c = [0u8; 32];
        _mm256_storeu_si256(c.as_mut_ptr() as *mut __m256i, col);
        let rmask = (1u32 << (a.shift - 8)) - 1;
        let mut take = 0u32;
        let mut bits = tied;
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            let ci = c[i as usize] as usize;
            take |= (((tie.next_u64() as u32 & rmask) < a.rest[ci]) as u32) << i;
        }
        take
    }

    /// One-hot mask of draw q (byte q of every lane).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn onehot8(ex: __m256i, q: u32) -> __m256i {
        // Byte q of each 64-bit lane moved to its low byte, the other bytes zeroed (a control
        // byte with the top bit set selects zero): one shuffle instead of a shift and a mask.
        let (lo, hi) = (q as i64, q as i64 + 8);
        let ctl = _mm256_setr_epi64x(lo | !0xff, hi | !0xff, lo | !0xff, hi | !0xff);
        let x = _mm256_shuffle_epi8(ex, ctl);
        _mm256_sllv_epi64(_mm256_set1_epi64x(1), x)
    }

    /// `v` unchanged, but opaque to the optimiser. Without it LLVM narrows the 64-bit lane masks
    /// of [`gated`] to 32 bits and widens them back (about ten extra instructions per gated
    /// draw); an empty `asm!` block emits no instruction.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn opaque(mut v: __m256i) -> __m256i {
        // An empty template: no instruction, no memory or stack access.
        std::arch::asm!(
            "/* {0} */",
            inout(ymm_reg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
        v
    }

    /// OR the one-hot (or empty) mask `oh` into the lanes of `m` whose count `c` (= bits set in
    /// `m`) is below k, keeping `c` exact: a chain of cheap operations instead of a popcount.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn gated(m: &mut __m256i, c: &mut __m256i, oh: __m256i, kv: __m256i) {
        let need = opaque(_mm256_cmpgt_epi64(kv, *c));
        let stale = _mm256_cmpeq_epi64(_mm256_andnot_si256(*m, oh), _mm256_setzero_si256());
        *m = _mm256_or_si256(*m, _mm256_and_si256(oh, need));
        // −1 in the lanes that gained a bit.
        *c = _mm256_sub_epi64(*c, _mm256_andnot_si256(stale, need));
    }

    /// `groups` groups of uniform draws (see [`super::group_scalar`]) into `acc`, the last one
    /// restricted to the lanes in `keep`. The loop over groups is in the same function as the
    /// draws, so that constants stay in registers.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn uniform_groups<const MASKED: bool, const B: i32, const K: usize>(
        state: &mut [__m256i; 4],
        f: Fields,
        k: usize,
        groups: u64,
        keep: __m256i,
        acc: &mut Acc,
    ) {
        debug_assert_eq!(f.bits as i32, B);
        debug_assert!(K == 0 || K == k);
        let k = if K > 0 { K } else { k };
        // Fields per word, a constant so that the loops over fields unroll.
        let per_word = 64 / B as usize;
        let kv = _mm256_set1_epi64x(k as i64);
        let first = k.min(per_word);
        // The generator state and the buffer fill count are locals (in registers), written
        // back once at the end.
        let mut st = *state;
        let s = &mut st;
        let mut filled = acc.filled;
        for g in 0..groups {
            let mut r = next(s);
            let mut m = _mm256_setzero_si256();
            let mut c = _mm256_setzero_si256();
            for q in 0..per_word {
                let oh = onehot::<MASKED>(r, f);
                if q < first {
                    m = _mm256_or_si256(m, oh);
                    if q + 1 == first {
                        c = popcnt(m);
                    }
                } else {
                    gated(&mut m, &mut c, oh, kv);
                }
                r = _mm256_srli_epi64::<B>(r);
            }
            while any(_mm256_cmpgt_epi64(kv, c)) {
                let mut r = next(s);
                for _ in 0..per_word {
                    gated(&mut m, &mut c, onehot::<MASKED>(r, f), kv);
                    r = _mm256_srli_epi64::<B>(r);
                }
            }
            if g + 1 == groups {
                m = _mm256_and_si256(m, keep);
            }
            acc.push(&mut filled, m);
        }
        acc.filled = filled;
        *state = st;
    }

    /// `groups` groups of alias draws (see [`super::group_scalar`]) into `acc`, as
    /// [`uniform_groups`].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn alias_groups<const K: usize>(
        state: &mut [__m256i; 4],
        a: &AliasTable,
        k: usize,
        tie: &mut Xoshiro256pp,
        groups: u64,
        keep: __m256i,
        acc: &mut Acc,
    ) {
        debug_assert!(K == 0 || K == k);
        let k = if K > 0 { K } else { k };
        let kv = _mm256_set1_epi64x(k as i64);
        // Four draws per word: column bytes 0..4, acceptance bytes 4..8 of each lane.
        let four = |s: &mut [__m256i; 4], tie: &mut Xoshiro256pp| {
            let r = next(s);
            lookup8(r, _mm256_srli_epi64::<32>(r), 0x0f0f_0f0f, a, tie)
        };
        let rem = (k % 4) as u32;
        // Locals in registers, written back at the end (see `uniform_groups`).
        let mut st = *state;
        let s = &mut st;
        let mut filled = acc.filled;
        for g in 0..groups {
            let mut m = _mm256_setzero_si256();
            for _ in 0..k / 8 {
                let rc = next(s);
                let ru = next(s);
                let ex = lookup8(rc, ru, u32::MAX, a, tie);
                for q in 0..8 {
                    m = _mm256_or_si256(m, onehot8(ex, q));
                }
            }
            for _ in 0..(k % 8) / 4 {
                let ex = four(s, tie);
                for q in 0..4 {
                    m = _mm256_or_si256(m, onehot8(ex, q));
                }
            }
            let partial = (rem > 0).then(|| four(s, tie));
            if let Some(ex) = partial {
                for q in 0..rem {
                    m = _mm256_or_si256(m, onehot8(ex, q));
                }
            }
            let mut c = popcnt(m);
            if let Some(ex) = partial {
                for q in rem..4 {
                    gated(&mut m, &mut c, onehot8(ex, q), kv);
                }
            }
            while any(_mm256_cmpgt_epi64(kv, c)) {
                let ex = four(s, tie);
                gated(&mut m, &mut c, onehot8(ex, 0), kv);
                gated(&mut m, &mut c, onehot8(ex, 1), kv);
                // Usually every lane is complete after two more picks; the last two are then
                // no-ops and are skipped (the same counts and random words either way).
                if any(_mm256_cmpgt_epi64(kv, c)) {
                    gated(&mut m, &mut c, onehot8(ex, 2), kv);
                    gated(&mut m, &mut c, onehot8(ex, 3), kv);
                }
            }
            if g + 1 == groups {
                m = _mm256_and_si256(m, keep);
            }
            acc.push(&mut filled, m);
        }
        acc.filled = filled;
        *state = st;
    }

    /// Per-lane bit-sliced counters fed one group of masks at a time; eight groups go through
    /// the carry-save tree together, the rest ([`Acc::finish`]) are added one by one.
    struct Acc<'a> {
        planes: &'a mut [__m256i],
        buf: [__m256i; 8],
        filled: usize,
    }

    impl Acc<'_> {
        #[inline]
        #[target_feature(enable = "avx2")]
        /// Buffer one group; `filled` is the caller's local copy of `self.filled` (so that it
        /// stays in a register; the caller writes it back).
        unsafe fn push(&mut self, filled: &mut usize, m: __m256i) {
            self.buf[*filled] = m;
            *filled += 1;
            if *filled == 8 {
                *filled = 0;
                self.add8();
            }
        }

        /// The eight buffered groups through the carry-save tree (out of line: once per eight
        /// groups, and it keeps [`Acc::push`] small enough to inline).
        #[inline(never)]
        #[target_feature(enable = "avx2")]
        unsafe fn add8(&mut self) {
            let (m, planes) = (&self.buf, &mut *self.planes);
            let (ta, ones) = csa(planes[0], m[0], m[1]);
            let (tb, ones) = csa(ones, m[2], m[3]);
            let (fa, twos) = csa(planes[1], ta, tb);
            let (ta, ones) = csa(ones, m[4], m[5]);
            let (tb, ones) = csa(ones, m[6], m[7]);
            let (fb, twos) = csa(twos, ta, tb);
            let (eights, fours) = csa(planes[2], fa, fb);
            planes[0] = ones;
            planes[1] = twos;
            planes[2] = fours;
            ripple(planes, eights, 3);
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn finish(&mut self) {
            for i in 0..self.filled {
                ripple(self.planes, self.buf[i], 0);
            }
            self.filled = 0;
        }
    }

    /// Carry-save adder on four lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn csa(a: __m256i, b: __m256i, c: __m256i) -> (__m256i, __m256i) {
        let u = _mm256_xor_si256(a, b);
        (
            _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c)),
            _mm256_xor_si256(u, c),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn ripple(planes: &mut [__m256i], mut c: __m256i, from: usize) {
        for p in &mut planes[from..] {
            let t = _mm256_and_si256(*p, c);
            *p = _mm256_xor_si256(*p, c);
            c = t;
        }
    }

    /// [`uniform_groups`] monomorphised on b (loops over the fields unroll), on whether fields
    /// ≥ E exist, and on k (`K`, 0: at run time).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn uniform_dispatch<const K: usize>(
        s: &mut [__m256i; 4],
        f: Fields,
        k: usize,
        groups: u64,
        keep: __m256i,
        acc: &mut Acc,
    ) {
        let full = f.valid == u64::MAX;
        match (f.bits, full) {
            (6, true) => uniform_groups::<false, 6, K>(s, f, k, groups, keep, acc),
            (6, false) => uniform_groups::<true, 6, K>(s, f, k, groups, keep, acc),
            (5, true) => uniform_groups::<false, 5, K>(s, f, k, groups, keep, acc),
            (5, false) => uniform_groups::<true, 5, K>(s, f, k, groups, keep, acc),
            (4, true) => uniform_groups::<false, 4, K>(s, f, k, groups, keep, acc),
            (4, false) => uniform_groups::<true, 4, K>(s, f, k, groups, keep, acc),
            (3, true) => uniform_groups::<false, 3, K>(s, f, k, groups, keep, acc),
            (3, false) => uniform_groups::<true, 3, K>(s, f, k, groups, keep, acc),
            (2, true) => uniform_groups::<false, 2, K>(s, f, k, groups, keep, acc),
            (2, false) => uniform_groups::<true, 2, K>(s, f, k, groups, keep, acc),
            _ => uniform_groups::<false, 1, K>(s, f, k, groups, keep, acc),
        }
    }

    /// The per-lane bit-sliced counters of `t` tokens (groups in AVX2 registers, eight groups
    /// through the carry-save tree at a time); `n` ≤ P planes are used.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lane_planes<const P: usize>(
        rng: &mut Rng4,
        t: u64,
        d: Draw,
        k: usize,
        n: usize,
    ) -> [__m256i; P] {
        let mut s = [
            _mm256_loadu_si256(rng.s[0].as_ptr() as *const __m256i),
            _mm256_loadu_si256(rng.s[1].as_ptr() as *const __m256i),
            _mm256_loadu_si256(rng.s[2].as_ptr() as *const __m256i),
            _mm256_loadu_si256(rng.s[3].as_ptr() as *const __m256i),
        ];
        let mut all = [_mm256_setzero_si256(); P];
        let mut acc = Acc {
            planes: &mut all[..n],
            buf: [_mm256_setzero_si256(); 8],
            filled: 0,
        };
        // Groups of four tokens; the surplus lanes of the last group are discarded.
        let groups = t.div_ceil(4);
        let rest = (t % 4) as usize;
        let keep: [i64; 4] = std::array::from_fn(|j| if rest == 0 || j < rest { -1 } else { 0 });
        let keep = _mm256_loadu_si256(keep.as_ptr() as *const __m256i);
        // k = 8 (OLMoE, most MoE models) is compiled separately so that every k-dependent loop
        // bound is a constant; other k take the same code with k at run time (K = 0).
        match (d, k) {
            (Draw::Uniform(f), 8) => uniform_dispatch::<8>(&mut s, f, k, groups, keep, &mut acc),
            (Draw::Uniform(f), _) => uniform_dispatch::<0>(&mut s, f, k, groups, keep, &mut acc),
            (Draw::Alias(a), 8) => {
                alias_groups::<8>(&mut s, a, k, &mut rng.tie, groups, keep, &mut acc)
            }
            (Draw::Alias(a), _) => {
                alias_groups::<0>(&mut s, a, k, &mut rng.tie, groups, keep, &mut acc)
            }
        }
        acc.finish();
        for (w, v) in rng.s.iter_mut().zip(&s) {
            _mm256_storeu_si256(w.as_mut_ptr() as *mut __m256i, *v);
        }
        all
    }

    /// Planes needed for the per-lane counters of `t` tokens (each lane counts at most ⌈t/4⌉).
    fn lane_plane_count(t: u64) -> usize {
        ((64 - t.div_ceil(4).leading_zeros()) as usize).clamp(3, MAX_PLANES)
    }

    /// [`super::count_tokens`] for one chunk: per-lane counters summed over the lanes at the end.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn count_chunk(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
        let n = lane_plane_count(t);
        let planes = lane_planes::<MAX_PLANES>(rng, t, d, k, n);
        // Sum the four lanes' counters.
        let mut lanes = [[0u64; 4]; MAX_PLANES];
        for (l, v) in lanes.iter_mut().zip(&planes[..n]) {
            _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, *v);
        }
        let mut total = Sliced::new(t);
        for lane in 0..4 {
            total.add_planes(lanes[..n].iter().map(|l| l[lane]));
        }
        total.add_counts_to(out);
    }

    /// [`super::count_tokens_i16`] for t < 256 tokens: at most seven lane planes, the four lanes
    /// summed bit-sliced in registers (lanes 2, 3 onto 0, 1, then 1 onto 0), the eight total
    /// planes spread to bytes and widened to i16. Every loop has a constant trip count (planes
    /// beyond the n in use are zero and add nothing), so the whole reduction stays in registers.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn count_small_i16(
        rng: &mut Rng4,
        t: u64,
        d: Draw,
        k: usize,
        out: &mut [i16],
    ) {
        debug_assert!(t < 256 && out.len() <= 64);
        let n = lane_plane_count(t);
        let p = lane_planes::<7>(rng, t, d, k, n);
        let zero = _mm256_setzero_si256();
        // Lanes 2, 3 onto lanes 0, 1: eight planes.
        let mut h = [zero; 8];
        let mut carry = zero;
        for i in 0..7 {
            let sw = _mm256_permute2x128_si256::<1>(p[i], p[i]);
            (carry, h[i]) = csa(p[i], sw, carry);
        }
        h[7] = carry;
        // Lane 1 onto lane 0; counts < 256 need only the first eight planes (the ninth, the
        // final carry, is zero).
        let mut q = [zero; 8];
        carry = zero;
        for i in 0..8 {
            let sw = _mm256_shuffle_epi32::<0x4e>(h[i]);
            (carry, q[i]) = csa(h[i], sw, carry);
        }
        let (c0, c1) = byte_counts(&q);
        let widen = |x: __m128i| _mm256_cvtepu8_epi16(x);
        let c = [
            widen(_mm256_castsi256_si128(c0)),
            widen(_mm256_extracti128_si256::<1>(c0)),
            widen(_mm256_castsi256_si128(c1)),
            widen(_mm256_extracti128_si256::<1>(c1)),
        ];
        if out.len() == 64 {
            for (i, v) in c.iter().enumerate() {
                _mm256_storeu_si256(out.as_mut_ptr().add(16 * i) as *mut __m256i, *v);
            }
        } else {
            let mut all = [0i16; 64];
            for (i, v) in c.iter().enumerate() {
                _mm256_storeu_si256(all.as_mut_ptr().add(16 * i) as *mut __m256i, *v);
            }
            out.copy_from_slice(&all[..out.len()]);
        }
    }

    /// Counts below 256 from the eight planes in lane 0 of `planes`: each plane's 64 bits are
    /// spread to 64 bytes (qword broadcast, [`spread_bits`]) and added in at weight 2^p.
    /// Returns the bytes of experts 0..32 and 32..64.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn byte_counts(planes: &[__m256i; 8]) -> (__m256i, __m256i) {
        let (mut c0, mut c1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        // Horner's scheme from the top plane: c ← 2c + bit (a set bit compares to −1).
        for &w in planes.iter().rev() {
            let v = _mm256_permute4x64_epi64::<0>(w);
            c0 = _mm256_sub_epi8(_mm256_add_epi8(c0, c0), spread_bits::<0>(v));
            c1 = _mm256_sub_epi8(_mm256_add_epi8(c1, c1), spread_bits::<4>(v));
        }
        (c0, c1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(ne: usize) -> Draw<'static> {
        Draw::Uniform(Fields::new(ne))
    }

    #[test]
    fn lanes_are_xoshiro256pp_streams() {
        let mut r = Rng4::new(1, 2, 3);
        let mut refs: Vec<crate::baselines::Xoshiro256pp> = (0..4)
            .map(|lane| {
                crate::baselines::Xoshiro256pp::from_state(std::array::from_fn(|w| r.s[w][lane]))
            })
            .collect();
        for _ in 0..100 {
            let got = r.next();
            for (lane, x) in refs.iter_mut().enumerate() {
                assert_eq!(got[lane], x.next_u64());
            }
        }
    }

    #[test]
    fn uniform_subsets_are_uniform() {
        // k = 2 of E = 5: each of the 10 pairs with probability 1/10 (one token per group lane).
        let mut rng = Rng4::new(1, 2, 3);
        let mut h = std::collections::BTreeMap::new();
        for _ in 0..12_500 {
            for m in group_scalar(&mut rng, uniform(5), 2) {
                assert_eq!(m.count_ones(), 2);
                assert!(m < 32);
                *h.entry(m).or_insert(0usize) += 1;
            }
        }
        assert_eq!(h.len(), 10);
        for &x in h.values() {
            assert!((x as f64 - 5000.0).abs() < 5.0 * 4500.0f64.sqrt(), "{h:?}");
        }
    }

    #[test]
    fn alias_draws_follow_the_weights_and_skip_zero_weights() {
        let w = [5.0, 0.0, 1.0, 0.0, 2.0, 9.0, 0.5];
        let a = AliasTable::new(&w);
        let mut rng = Rng4::new(0, 1, 2);
        let mut h = [0usize; 8];
        let n = 400_000;
        for _ in 0..n / 8 {
            let r = rng.next();
            for x in r {
                h[a.draw(x as u32) as usize] += 1;
                h[a.draw((x >> 32) as u32) as usize] += 1;
            }
        }
        let total: f64 = w.iter().sum();
        for (e, &c) in h.iter().enumerate() {
            let p = w.get(e).copied().unwrap_or(0.0) / total;
            let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
            assert!((c as f64 - n as f64 * p).abs() < 5.0 * sd, "{e}: {h:?}");
        }
        assert_eq!(h[1] + h[3] + h[7], 0);
    }

    #[test]
    fn draw8_is_draw_of_the_same_32_bits() {
        // Column byte c, acceptance byte u, and on a tie the low s − 8 bits v of the next tie
        // word: the 32-bit draw of (c mod 2^b) : u : v.
        for w in [
            vec![5.0, 0.0, 1.0, 0.0, 2.0, 9.0, 0.5],
            (0..64).map(|e| 1.0 + (e % 5) as f64 * 0.37).collect(),
            vec![1.0, 3.0],
            (0..33).map(|e| (e * e) as f64).collect(),
        ] {
            let a = AliasTable::new(&w);
            let (b, s) = (32 - a.shift, a.shift);
            let mut tie = Xoshiro256pp::from_state([1, 2, 3, 4]);
            let mut ties = 0;
            for c in 0..=u8::MAX {
                for u in 0..=u8::MAX {
                    let v = tie.clone().next_u64() as u32 & ((1 << (s - 8)) - 1);
                    let before = tie.clone();
                    let got = a.draw8(c, u, &mut tie);
                    ties += (tie != before) as usize;
                    let col = c as u32 & ((1 << b) - 1);
                    let h = col << s | (u as u32) << (s - 8) | v;
                    assert_eq!(got, a.draw(h), "{w:?} c={c} u={u}");
                }
            }
            // Exactly one acceptance byte per column byte ties with the threshold.
            assert_eq!(ties, 256, "{w:?}");
        }
    }

    #[test]
    fn sequential_draws_without_replacement() {
        // Two draws without replacement from weights (3,1,1,1)/6: P(expert 0 picked) =
        // 1/2 + 3 · (1/6) · (3/5) = 0.8.
        let a = AliasTable::new(&[3.0, 1.0, 1.0, 1.0]);
        let mut rng = Rng4::new(9, 9, 9);
        let mut out = [0u64; 4];
        count_scalar(&mut rng, 60_000, Draw::Alias(&a), 2, &mut out);
        assert_eq!(out.iter().sum::<u64>(), 120_000);
        let f0 = out[0] as f64 / 60_000.0;
        assert!((f0 - 0.8).abs() < 0.01, "{f0}");
    }

    #[test]
    fn counts_are_column_sums_of_the_masks() {
        for t in [1u64, 3, 4, 7, 8, 31, 32, 33, 100, 257] {
            let mut a = Rng4::new(5, 6, t);
            let mut b = Rng4::new(5, 6, t);
            let mut want = [0u64; 64];
            let mut left = t;
            while left > 0 {
                let g = group_scalar(&mut a, uniform(64), 8);
                for &m in &g[..left.min(4) as usize] {
                    for (e, w) in want.iter_mut().enumerate() {
                        *w += (m >> e) & 1;
                    }
                }
                left -= left.min(4);
            }
            let mut got = [0u64; 64];
            count_scalar(&mut b, t, uniform(64), 8, &mut got);
            assert_eq!(got, want, "t = {t}");
            assert_eq!(a.s, b.s);
        }
    }

    #[test]
    fn counts_span_chunks() {
        // More tokens than one chunk of bit-sliced counters: totals and agreement still hold.
        let t = CHUNK + 6;
        let mut a = Rng4::new(8, 8, 8);
        let mut b = Rng4::new(8, 8, 8);
        let mut x = vec![0u64; 8];
        let mut y = vec![0u64; 8];
        count_scalar(&mut a, t, uniform(8), 2, &mut x);
        count_tokens(&mut b, t, uniform(8), 2, &mut y);
        assert_eq!(x, y);
        assert_eq!(x.iter().sum::<u64>(), 2 * t);
        // Each expert is picked with probability 2/8 per token.
        for &c in &x {
            let sd = (t as f64 * 0.25 * 0.75).sqrt();
            assert!((c as f64 - t as f64 / 4.0).abs() < 5.0 * sd, "{x:?}");
        }
    }

    #[test]
    fn avx2_and_scalar_samplers_agree() {
        let table = AliasTable::new(&(0..60).map(|e| 1.0 + (e % 7) as f64).collect::<Vec<_>>());
        let skewed = AliasTable::new(&[50.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 3.0, 2.0]);
        let cases: Vec<(Draw, usize, usize)> = vec![
            (uniform(64), 8, 64),
            (uniform(40), 8, 40),
            (uniform(60), 4, 60),
            (uniform(5), 2, 5),
            (uniform(64), 12, 64),
            (uniform(2), 1, 2),
            // Every field width b = 1…6, with and without fields ≥ E.
            (uniform(4), 1, 4),
            (uniform(3), 2, 3),
            (uniform(16), 3, 16),
            (uniform(12), 4, 12),
            (uniform(32), 5, 32),
            (uniform(20), 3, 20),
            (uniform(8), 7, 8),
            (Draw::Alias(&table), 8, 60),
            (Draw::Alias(&table), 7, 60),
            (Draw::Alias(&skewed), 3, 9),
        ];
        for (d, k, ne) in cases {
            for t in [1u64, 2, 5, 8, 31, 32, 33, 64, 65, 250] {
                let mut a = Rng4::new(3, 4, t);
                let mut b = Rng4::new(3, 4, t);
                let mut x = vec![0u64; ne];
                let mut y = vec![0u64; ne];
                count_scalar(&mut a, t, d, k, &mut x);
                count_tokens(&mut b, t, d, k, &mut y);
                assert_eq!(x, y, "{d:?} k={k} t={t}");
                assert_eq!(a.s, b.s, "{d:?} k={k} t={t}");
                assert_eq!(a.tie, b.tie, "{d:?} k={k} t={t}");
                assert_eq!(x.iter().sum::<u64>(), t * k as u64);
                assert!(x.iter().all(|&c| c <= t));
                // The i16 entry point (bit-sliced lane sums in registers for t < 256).
                let mut c = Rng4::new(3, 4, t);
                let mut z = vec![0i16; ne];
                count_tokens_i16(&mut c, t, d, k, &mut z);
                let x16: Vec<i16> = x.iter().map(|&v| v as i16).collect();
                assert_eq!(z, x16, "i16 {d:?} k={k} t={t}");
                assert_eq!(c.s, a.s, "i16 {d:?} k={k} t={t}");
                assert_eq!(c.tie, a.tie, "i16 {d:?} k={k} t={t}");
            }
        }
    }
}
