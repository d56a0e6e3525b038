//! Exact Gram matrices of small non-negative integer count rows (i16 entries, i32 dot products):
//! the per-layer `G = C Cᵀ` of the baselines' synthetic counts. Only the upper triangle with the
//! diagonal is computed.
//!
//! Which path runs (chosen per call; every path gives the same exact integers):
//! - x86-64 with AVX2 and every entry in `0..=63` (the usual case: counts are typically 0–40):
//!   the rows are packed once per call to u8 (zero-padded to a multiple of 64 bytes, in a
//!   per-thread buffer; the max check is fused into this pass and stops at the first row with a
//!   larger entry) and the dot products use `vpmaddubsw` (32 products per instruction, adjacent
//!   pairs summed into i16 lanes, each ≤ 2·max²). Two such results (one 64-byte chunk pair) are
//!   added in i16 (≤ 4·max²) and the four columns' sums folded with `vphaddw` (≤ 8·max² ≤ 31752),
//!   and when max ≤ 45 a second time (≤ 16·max² ≤ 32400), before `vpmaddwd(·, 1)` widens them to
//!   i32; so no i16 lane saturates or wraps. About 1.8× faster than the i16 path at 80 × 64.
//! - x86-64 with AVX2 and a larger (or negative) entry: `vpmaddwd` on the i16 rows (16 products
//!   per instruction, i32 sums).
//! - otherwise: a scalar loop.
//!
//! Both AVX2 kernels work on blocks of two rows × four columns; a row pair's last partial block is
//! shifted left, so blocks may also fill entries below the diagonal (callers ignore them).
//! Hand-written because the `gemm` crate has no integer kernels and no symmetric (syrk) product,
//! and a generic f32 GEMM spends most of its time on packing at these sizes (80 × 64 per layer).

/// Largest entry for which the u8 (`vpmaddubsw`) path is exact: one `vphaddw` fold of a 64-byte
/// chunk pair's i16 sums holds up to `8·max²`, which must fit in an i16.
#[cfg(target_arch = "x86_64")]
const U8_MAX: u16 = 63;

/// Largest entry for which the u8 path may fold twice with `vphaddw` (`16·max²` fits in an i16).
#[cfg(target_arch = "x86_64")]
const U8_MAX_FOLD3: u16 = 45;

/// `g[i·n + j] = Σ_e c[i·ne + e] · c[j·ne + e]` for `i ≤ j < n`, exactly. Callers guarantee every
/// dot product fits in an i32 (`max entry · max row sum < 2^31`) and entries are non-negative.
pub(crate) fn gram_upper(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    assert!(c.len() >= n * ne && g.len() >= n * n);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        thread_local! {
            static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // SAFETY: AVX2 was detected at run time; bounds are checked above.
        let done = PACKED.with(|b| unsafe { avx2_u8(c, n, ne, g, &mut b.borrow_mut()) });
        if !done {
            // SAFETY: as above.
            unsafe { avx2(c, n, ne, g) };
        }
        return;
    }
    scalar(c, n, ne, g);
}

#[inline(always)]
fn dot(a: &[i16], b: &[i16]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Scalar version of [`gram_upper`].
fn scalar(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    for i in 0..n {
        let a = &c[i * ne..(i + 1) * ne];
        for j in i..n {
            g[i * n + j] = dot(a, &c[j * ne..(j + 1) * ne]) as f64;
        }
    }
}

/// Visits the upper triangle of an `n × n` matrix in blocks of rows `(i, i+1)` × columns
/// `j..j+4` (`block(i, j)`) and single entries (`single(i, j)`). A row pair's last partial block
/// is shifted left to end at column `n` (recomputing, or filling below the diagonal, a few
/// entries with the same exact values) instead of falling back to single entries.
#[inline(always)]
fn cover(n: usize, mut block: impl FnMut(usize, usize), mut single: impl FnMut(usize, usize)) {
    let mut i = 0;
    while i + 2 <= n {
        let mut j = i;
        while j + 4 <= n {
            block(i, j);
            j += 4;
        }
        if j < n {
            if n >= 4 {
                block(i, n - 4);
            } else {
                for jj in j..n {
                    single(i, jj);
                    single(i + 1, jj);
                }
            }
        }
        i += 2;
    }
    if i < n {
        single(i, i);
    }
}

/// The u8 path (see module docs). Packs `c` into `buf` and returns `false` without touching `g`
/// when an entry is outside `0..=U8_MAX`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_u8(c: &[i16], n: usize, ne: usize, g: &mut [f64], buf: &mut Vec<u8>) -> bool {
    use std::arch::x86_64::*;
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
            return false;
        }
    }
    let mut lanes = [0u16; 16];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, vmax);
    let max = lanes.iter().fold(smax, |m, &x| m.max(x));
    // Chunk pairs per row; see the module docs for the i16 bounds.
    let npairs = stride / 64;
    let bp = buf.as_ptr();
    let gp = g.as_mut_ptr();
    let single = |i: usize, j: usize| {
        *gp.add(i * n + j) = dot(&c[i * ne..(i + 1) * ne], &c[j * ne..(j + 1) * ne]) as f64
    };
    let store = |i: usize, j: usize, (s0, s1): (__m128i, __m128i)| {
        // In bounds: j + 4 ≤ n and i + 1 < n.
        _mm256_storeu_pd(gp.add(i * n + j), _mm256_cvtepi32_pd(s0));
        _mm256_storeu_pd(gp.add((i + 1) * n + j), _mm256_cvtepi32_pd(s1));
    };
    // ≤ 64 experts (the common case) gets a constant trip count.
    match (max <= U8_MAX_FOLD3, npairs) {
        (true, 1) => cover(
            n,
            |i, j| store(i, j, u8_block::<true>(bp, stride, i, j, 1)),
            single,
        ),
        (false, 1) => cover(
            n,
            |i, j| store(i, j, u8_block::<false>(bp, stride, i, j, 1)),
            single,
        ),
        (true, m) => cover(
            n,
            |i, j| store(i, j, u8_block::<true>(bp, stride, i, j, m)),
            single,
        ),
        (false, m) => cover(
            n,
            |i, j| store(i, j, u8_block::<false>(bp, stride, i, j, m)),
            single,
        ),
    }
    true
}

/// Dot products of packed rows `i`, `i+1` with rows `j..j+4` (`stride` bytes apart, `npairs`
/// pairs of 32-byte chunks): lane q of the first (second) result is the dot product of row i
/// (i+1) with row j+q. Each pair's `vpmaddubsw` results are summed in i16 and folded with one
/// (two if `FOLD3`) `vphaddw` levels before widening; see the bounds in the module docs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn u8_block<const FOLD3: bool>(
    bp: *const u8,
    stride: usize,
    i: usize,
    j: usize,
    npairs: usize,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let r0 = bp.add(i * stride);
    let r1 = bp.add((i + 1) * stride);
    let cols: [*const u8; 4] = std::array::from_fn(|q| bp.add((j + q) * stride));
    // Lane q of each 128-bit half of h0 (h1) is a partial dot of row i (i+1) with j+q.
    let mut h0 = _mm256_setzero_si256();
    let mut h1 = _mm256_setzero_si256();
    for pair in 0..npairs {
        let mut a0 = [_mm256_setzero_si256(); 4];
        let mut a1 = [_mm256_setzero_si256(); 4];
        for o in [pair * 64, pair * 64 + 32] {
            let x0 = _mm256_loadu_si256(r0.add(o) as *const __m256i);
            let x1 = _mm256_loadu_si256(r1.add(o) as *const __m256i);
            for q in 0..4 {
                let y = _mm256_loadu_si256(cols[q].add(o) as *const __m256i);
                a0[q] = _mm256_add_epi16(a0[q], _mm256_maddubs_epi16(x0, y));
                a1[q] = _mm256_add_epi16(a1[q], _mm256_maddubs_epi16(x1, y));
            }
        }
        if FOLD3 {
            // Per 128-bit half: vphaddw → [4 lanes of q0, 4 of q1] (and q2, q3), vphaddw →
            // [2 lanes of each q], vpmaddwd(1) → [q0, q1, q2, q3] in i32.
            let f = |a: &[__m256i; 4]| {
                let h =
                    _mm256_hadd_epi16(_mm256_hadd_epi16(a[0], a[1]), _mm256_hadd_epi16(a[2], a[3]));
                _mm256_madd_epi16(h, ones)
            };
            h0 = _mm256_add_epi32(h0, f(&a0));
            h1 = _mm256_add_epi32(h1, f(&a1));
        } else {
            // Per 128-bit half: vphaddw → [4 lanes of q, 4 lanes of q+1], vpmaddwd(1) →
            // [q, q, q+1, q+1] in i32, vphaddd → [q0, q1, q2, q3].
            let w = |a: __m256i, b: __m256i| _mm256_madd_epi16(_mm256_hadd_epi16(a, b), ones);
            h0 = _mm256_add_epi32(h0, _mm256_hadd_epi32(w(a0[0], a0[1]), w(a0[2], a0[3])));
            h1 = _mm256_add_epi32(h1, _mm256_hadd_epi32(w(a1[0], a1[1]), w(a1[2], a1[3])));
        }
    }
    let lo =
        |h: __m256i| _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
    (lo(h0), lo(h1))
}

/// The i16 path: two rows × four columns per block, eight `vpmaddwd` accumulators, horizontal
/// sums converted to f64 and stored four at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    use std::arch::x86_64::*;
    /// Lane q of the result is the sum of the eight lanes of `acc[q]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum4(acc: &[__m256i; 4]) -> __m128i {
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
        |i, j| *gp.add(i * n + j) = dot(&c[i * ne..(i + 1) * ne], &c[j * ne..(j + 1) * ne]) as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The i64 definition, upper triangle only.
    fn check(c: &[i16], n: usize, ne: usize, g: &[f64], what: &str) {
        for i in 0..n {
            for j in i..n {
                let want: i64 = (0..ne)
                    .map(|e| c[i * ne + e] as i64 * c[j * ne + e] as i64)
                    .sum();
                assert_eq!(g[i * n + j], want as f64, "{what} {n}x{ne} ({i},{j})");
            }
        }
    }

    /// Entries in `0..=hi` from a fixed LCG, with `hi` itself forced at a few positions.
    fn counts(n: usize, ne: usize, hi: i16, seed: u64) -> Vec<i16> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut c: Vec<i16> = (0..n * ne)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % (hi as u64 + 1)) as i16
            })
            .collect();
        for x in c.iter_mut().step_by(7) {
            *x = hi;
        }
        c
    }

    #[test]
    fn matches_the_scalar_definition() {
        let shapes = [
            (0, 5),
            (1, 1),
            (2, 3),
            (3, 0),
            (3, 5),
            (4, 4),
            (5, 7),
            (6, 33),
            (9, 16),
            (13, 64),
            (80, 64),
            (81, 97),
            (5, 128),
            (7, 300),
        ];
        let mut inputs: Vec<(usize, usize, Vec<i16>, String)> = Vec::new();
        for (s, &(n, ne)) in shapes.iter().enumerate() {
            let s = s as u64;
            inputs.push((n, ne, counts(n, ne, 40, s), "0..=40".into()));
            // The u8 path's two thresholds (45: two vphaddw levels, 63: u8 path at all), all
            // entries at them (worst case for the i16 sums), and one above.
            for hi in [45, 46, 63, 64] {
                inputs.push((n, ne, counts(n, ne, hi, s), format!("0..={hi}")));
                inputs.push((n, ne, vec![hi; n * ne], format!("all {hi}")));
            }
            inputs.push((n, ne, counts(n, ne, 255, s), "0..=255".into()));
            inputs.push((n, ne, counts(n, ne, 2000, s), "0..=2000".into()));
            inputs.push((n, ne, vec![0; n * ne], "zeros".into()));
            // Outside the contract, but the u8 path must still refuse it (unsigned max check).
            let mut neg = counts(n, ne, 30, s);
            if let Some(x) = neg.last_mut() {
                *x = -1;
            }
            inputs.push((n, ne, neg, "negative".into()));
        }
        // One packing buffer for all inputs, starting with junk: stale bytes must not leak into
        // the zero padding.
        #[cfg(target_arch = "x86_64")]
        let mut buf = vec![0x55u8; 1 << 16];
        for (n, ne, c, what) in &inputs {
            let (n, ne) = (*n, *ne);
            // The dispatched kernel and the scalar fallback.
            let mut g = vec![-1.0; n * n];
            gram_upper(c, n, ne, &mut g);
            check(c, n, ne, &g, &format!("dispatch {what}"));
            let mut g = vec![-1.0; n * n];
            scalar(c, n, ne, &mut g);
            check(c, n, ne, &g, &format!("scalar {what}"));
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut g = vec![-1.0; n * n];
                // SAFETY: AVX2 detected; sizes match.
                unsafe { avx2(c, n, ne, &mut g) };
                check(c, n, ne, &g, &format!("i16 {what}"));
                let max = c.iter().map(|&x| x as u16).max().unwrap_or(0);
                let mut g = vec![-1.0; n * n];
                // SAFETY: as above.
                let took = unsafe { avx2_u8(c, n, ne, &mut g, &mut buf) };
                assert_eq!(
                    took,
                    max <= U8_MAX,
                    "u8 path taken {what} {n}x{ne} max {max}"
                );
                if took {
                    check(c, n, ne, &g, &format!("u8 {what}"));
                } else {
                    assert!(g.iter().all(|&x| x == -1.0), "u8 path wrote g {what}");
                }
            }
        }
    }
}
