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

use crate::cpu::Cpu;
use crate::rng::{Rng4, Xoshiro256pp};

/// Uniform draws from `[0, E)`, 2 ≤ E ≤ 64: b-bit fields of random words.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// b = ⌈log₂ E⌉.
    bits: u32,
    /// Fields per 64-bit word.
    per_word: usize,
    /// Bits of the experts `0..E`.
    valid: u64,
}

impl Fields {
    /// Fields for E = `ne` experts, 2 ≤ E ≤ 64.
    pub fn new(ne: usize) -> Self {
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
pub struct AliasTable {
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
    pub fn new(w: &[f64]) -> Self {
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
    pub fn draw8(&self, c: u8, u: u8, tie: &mut Xoshiro256pp) -> u32 {
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
    pub fn draw(&self, h: u32) -> u32 {
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
pub enum Draw<'a> {
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

/// The next group of four token masks (the scalar reference of the AVX2 version in `arch/x86_64/avx2/sampler.rs`).
#[inline(always)]
fn group_scalar(rng: &mut Rng4, d: Draw, k: usize) -> [u64; 4] {
    let mut m = [0u64; 4];
    match d {
        Draw::Uniform(f) => {
            let fm = (1u64 << f.bits) - 1;
            let field = |r: u64, q: usize| (1u64 << ((r >> (q as u32 * f.bits)) & fm)) & f.valid;
            let first = k.min(f.per_word);
            let r = rng.next_words();
            for (mj, &rj) in m.iter_mut().zip(&r) {
                for q in 0..first {
                    *mj |= field(rj, q);
                }
                for q in first..f.per_word {
                    *mj |= field(rj, q) & need(*mj, k);
                }
            }
            while m.iter().any(|&x| (x.count_ones() as usize) < k) {
                let r = rng.next_words();
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
                let (r1, r2) = (rng.next_words(), rng.next_words());
                for (mj, (&c, &u)) in m.iter_mut().zip(r1.iter().zip(&r2)) {
                    for q in 0..8 {
                        *mj |= 1u64
                            << a.draw8((c >> (8 * q)) as u8, (u >> (8 * q)) as u8, &mut rng.tie);
                    }
                }
                d += 8;
            }
            while d < k || m.iter().any(|&x| (x.count_ones() as usize) < k) {
                let r = rng.next_words();
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
/// and write the per-expert counts to `out` (`out.len()` = E ≤ 64). `k` experts per token,
/// fewer than the experts that can be drawn (checked for uniform draws; alias draws need more
/// than k experts of positive weight). Tokens are counted in chunks of [`CHUNK`] (a
/// multiple of four, so chunking does not change which words a token uses).
pub fn count_tokens(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    count_tokens_on(Cpu::get(), rng, t, d, k, out)
}

/// [`count_tokens`] with the kernels `cpu` allows (identical results on every CPU).
pub fn count_tokens_on(cpu: Cpu, rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    check(d, k, out.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(_avx2) = cpu.avx2() {
        out.iter_mut().for_each(|x| *x = 0);
        let mut done = 0;
        while done < t {
            let tc = (t - done).min(CHUNK);
            // SAFETY: the `Avx2` token exists only on CPUs with AVX2.
            unsafe { avx2::count_chunk(rng, tc, d, k, out) };
            done += tc;
        }
        return;
    }
    let _ = cpu;
    count_scalar(rng, t, d, k, out)
}

/// [`count_tokens`] into i16 counts (callers guarantee `t` ≤ 32767): the same draws and counts,
/// with a faster AVX2 path for fewer than 256 tokens.
pub fn count_tokens_i16(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [i16]) {
    count_tokens_i16_on(Cpu::get(), rng, t, d, k, out)
}

/// [`count_tokens_i16`] with the kernels `cpu` allows (identical results on every CPU).
pub fn count_tokens_i16_on(cpu: Cpu, rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [i16]) {
    check(d, k, out.len());
    #[cfg(target_arch = "x86_64")]
    if let (Some(_avx2), true) = (cpu.avx2(), t < 256) {
        // SAFETY: the `Avx2` token exists only on CPUs with AVX2.
        unsafe { avx2::count_small_i16(rng, t, d, k, out) };
        return;
    }
    let mut c = [0u64; 64];
    count_tokens_on(cpu, rng, t, d, k, &mut c[..out.len()]);
    for (o, &x) in out.iter_mut().zip(&c) {
        *o = x as i16;
    }
}

/// The preconditions of the samplers that are cheap to check: 1 ≤ E ≤ 64 counts and, for
/// uniform draws, k < E (with k ≥ E no token could ever be complete). k = 0 gives zero counts.
fn check(d: Draw, k: usize, ne: usize) {
    assert!((1..=64).contains(&ne), "sampler: E = {ne}, k = {k}");
    if let Draw::Uniform(f) = d {
        assert!(k < f.valid.count_ones() as usize, "sampler: k = {k} ≥ E");
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/sampler.rs"]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::tests::rng4;

    fn uniform(ne: usize) -> Draw<'static> {
        Draw::Uniform(Fields::new(ne))
    }

    #[test]
    fn uniform_subsets_are_uniform() {
        // k = 2 of E = 5: each of the 10 pairs with probability 1/10 (one token per group lane).
        let mut rng = rng4(1, 2, 3);
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
        let mut rng = rng4(0, 1, 2);
        let mut h = [0usize; 8];
        let n = 400_000;
        for _ in 0..n / 8 {
            let r = rng.next_words();
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
        let mut rng = rng4(9, 9, 9);
        let mut out = [0u64; 4];
        count_scalar(&mut rng, 60_000, Draw::Alias(&a), 2, &mut out);
        assert_eq!(out.iter().sum::<u64>(), 120_000);
        let f0 = out[0] as f64 / 60_000.0;
        assert!((f0 - 0.8).abs() < 0.01, "{f0}");
    }

    #[test]
    fn counts_are_column_sums_of_the_masks() {
        for t in [1u64, 3, 4, 7, 8, 31, 32, 33, 100, 257] {
            let mut a = rng4(5, 6, t);
            let mut b = rng4(5, 6, t);
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
        let mut a = rng4(8, 8, 8);
        let mut b = rng4(8, 8, 8);
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
                let mut a = rng4(3, 4, t);
                let mut b = rng4(3, 4, t);
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
                let mut c = rng4(3, 4, t);
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
