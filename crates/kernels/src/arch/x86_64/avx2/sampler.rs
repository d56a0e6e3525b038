//! The AVX2 version of the samplers in `sampler.rs` (same random words, same counts; test
//! `avx2_and_scalar_samplers_agree`). Every function needs AVX2; the entry points
//! [`count_chunk`] and [`count_small_i16`] are called only with an [`crate::cpu::Avx2`] token.

use super::{AliasTable, Draw, Fields, Sliced, MAX_PLANES};
use crate::mem::{arr_mut, load256, store256};
use crate::rng::avx2::next;
use crate::rng::{Rng4, Xoshiro256pp};
use std::arch::x86_64::*;

/// Set bits per 64-bit lane (nibble table, Muła et al.).
#[inline]
#[target_feature(enable = "avx2")]
fn popcnt(x: __m256i) -> __m256i {
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let lo = _mm256_and_si256(x, low);
    let hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    let c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
    _mm256_sad_epu8(c, _mm256_setzero_si256())
}

#[inline]
#[target_feature(enable = "avx2")]
fn any(v: __m256i) -> bool {
    _mm256_movemask_epi8(v) != 0
}

/// One-hot masks of the low b bits of every lane, restricted to the experts `0..E` (a no-op
/// unless `MASKED`, i.e. E < 2^b).
#[inline]
#[target_feature(enable = "avx2")]
fn onehot<const MASKED: bool>(r: __m256i, f: Fields) -> __m256i {
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
fn lookup8(
    rc: __m256i,
    ru: __m256i,
    valid: u32,
    a: &AliasTable,
    tie: &mut Xoshiro256pp,
) -> __m256i {
    let col = _mm256_and_si256(rc, _mm256_set1_epi8((a.alias8.len() - 1) as i8));
    let sixteen = _mm256_set1_epi8(16);
    let mut idx = col;
    let mut alias = _mm256_shuffle_epi8(load256(&a.lut_alias[0]), idx);
    let mut thr = _mm256_shuffle_epi8(load256(&a.lut_thr[0]), idx);
    for t in 1..4 {
        idx = _mm256_sub_epi8(idx, sixteen);
        alias = _mm256_xor_si256(alias, _mm256_shuffle_epi8(load256(&a.lut_alias[t]), idx));
        thr = _mm256_xor_si256(thr, _mm256_shuffle_epi8(load256(&a.lut_thr[t]), idx));
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
fn byte_mask(m: u32) -> __m256i {
    spread_bits::<0>(_mm256_set1_epi32(m as i32))
}

/// The 32 bits of bytes `B..B + 4` of each 128-bit half of `v` (both halves must hold the
/// same bytes) spread to byte lanes: byte i of the result is all ones iff bit i of those 32
/// bits is set (byte shuffle, bit select, compare).
#[inline]
#[target_feature(enable = "avx2")]
fn spread_bits<const B: i8>(v: __m256i) -> __m256i {
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
fn resolve_ties(col: __m256i, tied: u32, a: &AliasTable, tie: &mut Xoshiro256pp) -> u32 {
    let mut c = [0u8; 32];
    store256(&mut c, col);
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
fn onehot8(ex: __m256i, q: u32) -> __m256i {
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
fn opaque(mut v: __m256i) -> __m256i {
    // SAFETY: an empty template: no instruction, no memory or stack access; `v` is passed
    // through unchanged.
    unsafe {
        std::arch::asm!(
        "/* {0} */",
        inout(ymm_reg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    v
}

/// OR the one-hot (or empty) mask `oh` into the lanes of `m` whose count `c` (= bits set in
/// `m`) is below k, keeping `c` exact: a chain of cheap operations instead of a popcount.
#[inline]
#[target_feature(enable = "avx2")]
fn gated(m: &mut __m256i, c: &mut __m256i, oh: __m256i, kv: __m256i) {
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
fn uniform_groups<const MASKED: bool, const B: i32, const K: usize>(
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
fn alias_groups<const K: usize>(
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
    fn push(&mut self, filled: &mut usize, m: __m256i) {
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
    fn add8(&mut self) {
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
    fn finish(&mut self) {
        for i in 0..self.filled {
            ripple(self.planes, self.buf[i], 0);
        }
        self.filled = 0;
    }
}

/// Carry-save adder on four lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn csa(a: __m256i, b: __m256i, c: __m256i) -> (__m256i, __m256i) {
    let u = _mm256_xor_si256(a, b);
    (
        _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c)),
        _mm256_xor_si256(u, c),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn ripple(planes: &mut [__m256i], mut c: __m256i, from: usize) {
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
fn uniform_dispatch<const K: usize>(
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
fn lane_planes<const P: usize>(
    rng: &mut Rng4,
    t: u64,
    d: Draw,
    k: usize,
    n: usize,
) -> [__m256i; P] {
    let mut s = crate::rng::avx2::load(rng);
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
    let keep = load256(&keep);
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
    crate::rng::avx2::store(rng, &s);
    all
}

/// Planes needed for the per-lane counters of `t` tokens (each lane counts at most ⌈t/4⌉).
fn lane_plane_count(t: u64) -> usize {
    ((64 - t.div_ceil(4).leading_zeros()) as usize).clamp(3, MAX_PLANES)
}

/// [`super::count_tokens`] for one chunk (AVX2 required): per-lane counters summed over the lanes at the end.
#[target_feature(enable = "avx2")]
pub(super) fn count_chunk(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [u64]) {
    let n = lane_plane_count(t);
    let planes = lane_planes::<MAX_PLANES>(rng, t, d, k, n);
    // Sum the four lanes' counters.
    let mut lanes = [[0u64; 4]; MAX_PLANES];
    for (l, v) in lanes.iter_mut().zip(&planes[..n]) {
        store256(l, *v);
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
pub(super) fn count_small_i16(rng: &mut Rng4, t: u64, d: Draw, k: usize, out: &mut [i16]) {
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
            store256(arr_mut::<i16, 16>(out, 16 * i), *v);
        }
    } else {
        let mut all = [0i16; 64];
        for (i, v) in c.iter().enumerate() {
            store256(arr_mut::<i16, 16>(&mut all, 16 * i), *v);
        }
        out.copy_from_slice(&all[..out.len()]);
    }
}

/// Counts below 256 from the eight planes in lane 0 of `planes`: each plane's 64 bits are
/// spread to 64 bytes (qword broadcast, [`spread_bits`]) and added in at weight 2^p.
/// Returns the bytes of experts 0..32 and 32..64.
#[inline]
#[target_feature(enable = "avx2")]
fn byte_counts(planes: &[__m256i; 8]) -> (__m256i, __m256i) {
    let (mut c0, mut c1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    // Horner's scheme from the top plane: c ← 2c + bit (a set bit compares to −1).
    for &w in planes.iter().rev() {
        let v = _mm256_permute4x64_epi64::<0>(w);
        c0 = _mm256_sub_epi8(_mm256_add_epi8(c0, c0), spread_bits::<0>(v));
        c1 = _mm256_sub_epi8(_mm256_add_epi8(c1, c1), spread_bits::<4>(v));
    }
    (c0, c1)
}
