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
//! - otherwise: a scalar loop ([`scalar`]).
//!
//! Both AVX2 kernels of [`gram_upper`] work on blocks of two rows × four columns; a row pair's last
//! partial block is shifted left, so blocks may also fill entries below the diagonal (callers
//! ignore them). The u8 blocks are those of the fused [`accumulate_normalised`] (`rows_block`),
//! which works on blocks of three rows ([`GROUP`]) × four columns with the rows held in registers
//! across a row group's column blocks and the column operand of `vpmaddubsw` read from memory (77
//! instructions per block at ne ≤ 64, 6.4 per entry, against 8.3 for 2 × 4 blocks with both
//! operands loaded); each entry's `vpmaddubsw` results are summed and folded exactly as above, so
//! the same i16 bounds hold.
//!
//! Hand-written because the `gemm` crate has no integer kernels and no symmetric (syrk) product,
//! and a generic f32 GEMM spends most of its time on packing at these sizes (80 × 64 per layer).

use crate::cpu::Cpu;

/// Largest entry for which the u8 (`vpmaddubsw`) path is exact: one `vphaddw` fold of a 64-byte
/// chunk pair's i16 sums holds up to `8·max²`, which must fit in an i16.
#[cfg(target_arch = "x86_64")]
const U8_MAX: u16 = 63;

/// Largest entry for which the u8 path may fold twice with `vphaddw` (`16·max²` fits in an i16).
#[cfg(target_arch = "x86_64")]
const U8_MAX_FOLD3: u16 = 45;

/// `g[i·n + j] = Σ_e c[i·ne + e] · c[j·ne + e]` for `i ≤ j < n`, exactly. Callers guarantee every
/// dot product fits in an i32 (`max entry · max row sum < 2^31`) and entries are non-negative
/// (otherwise the sums wrap, on every path alike). Entries below the diagonal may change.
pub fn gram_upper(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    gram_upper_on(Cpu::get(), c, n, ne, g)
}

/// [`gram_upper`] with the kernels `cpu` allows (identical results on every CPU).
pub fn gram_upper_on(cpu: Cpu, c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    // Callers bound n (the prompts held at once, trace::limits) far below 2^32.
    #[allow(clippy::expect_used)]
    let nn = n.checked_mul(n).expect("gram: n² overflows");
    assert!(n.checked_mul(ne).is_some_and(|x| c.len() >= x) && g.len() >= nn);
    #[cfg(target_arch = "x86_64")]
    if let Some(_avx2) = cpu.avx2() {
        // SAFETY: the `Avx2` token exists only on CPUs with AVX2; the sizes are asserted above.
        let done = PACKED.with(|b| unsafe { avx2::avx2_u8(c, n, ne, g, &mut b.borrow_mut()) });
        if !done {
            // SAFETY: as above.
            unsafe { avx2::avx2(c, n, ne, g) };
        }
        return;
    }
    let _ = cpu;
    scalar(c, n, ne, g);
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread buffer of the packed u8 rows.
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// For the counts `c` (N×E, row-major) of one layer: `inv[i] = 1/√G[i,i]` (0 when the row is
/// empty) and `acc[i·n + j] += (G[i,j]·inv[i])·inv[j]` for every i < j, where `G = C Cᵀ` is
/// exact — the same f64 operations, value for value, as [`gram_upper`] followed by
/// the per-layer accumulation of the baselines (`acc[i·n + j] += G[i,j]·inv[i]·inv[j]`), without writing G (the normalisation is applied to each
/// block of dot products as it comes out of the kernel). Entries of `acc` on and below the
/// diagonal may change (callers read only i < j). Returns `false`, writing nothing, unless the
/// u8 AVX2 path applies (every entry in `0..=63`, n ≥ 4).
pub fn accumulate_normalised(
    c: &[i16],
    n: usize,
    ne: usize,
    inv: &mut [f64],
    acc: &mut [f64],
) -> bool {
    // Callers bound n (the prompts held at once, trace::limits) far below 2^32.
    #[allow(clippy::expect_used)]
    let nn = n.checked_mul(n).expect("gram: n² overflows");
    assert!(n.checked_mul(ne).is_some_and(|x| c.len() >= x) && inv.len() >= n && acc.len() >= nn);
    #[cfg(target_arch = "x86_64")]
    if let (Some(_avx2), true) = (Cpu::get().avx2(), n >= 4) {
        // SAFETY: the `Avx2` token exists only on CPUs with AVX2; n ≥ 4 and the sizes are
        // asserted above.
        return PACKED
            .with(|b| unsafe { avx2::avx2_u8_acc(c, n, ne, inv, acc, &mut b.borrow_mut()) });
    }
    false
}

#[inline(always)]
fn dot(a: &[i16], b: &[i16]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Scalar version of [`gram_upper`] (the reference of the AVX2 kernels).
pub fn scalar(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
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

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/gram.rs"]
mod avx2;

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
    fn fused_accumulation_equals_gram_then_normalise() {
        // Every n mod 3 (row groups plus a leftover row pair or row) with every column offset
        // of the last, shifted block; one or two chunk pairs per row, full or padded.
        let mut shapes: Vec<(usize, usize)> = Vec::new();
        for n in (4..=13).chain([80, 81]) {
            for ne in [4, 7, 16, 33, 64, 97, 128] {
                shapes.push((n, ne));
            }
        }
        for (s, &(n, ne)) in shapes.iter().enumerate() {
            // The u8 path's thresholds; `all`: every entry at the bound (the largest i16
            // sums).
            for (hi, all) in [
                (0, false),
                (1, false),
                (40, false),
                (45, false),
                (45, true),
                (46, false),
                (46, true),
                (63, false),
                (63, true),
                (64, false),
            ] {
                let mut c = if all {
                    vec![hi; n * ne]
                } else {
                    counts(n, ne, hi, s as u64)
                };
                if hi > 1 {
                    // An empty row: its inv is 0.
                    c[ne..2 * ne].iter_mut().for_each(|x| *x = 0);
                }
                // Reference: the exact Gram, then the two loops of `baselines::rep_stats`,
                // applied twice (two layers) to a non-zero starting acc.
                let mut g = vec![0.0; n * n];
                scalar(&c, n, ne, &mut g);
                let want_inv: Vec<f64> = (0..n)
                    .map(|i| {
                        let gii = g[i * n + i];
                        if gii > 0.0 {
                            1.0 / gii.sqrt()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let start: Vec<f64> = (0..n * n).map(|x| (x % 11) as f64 * 0.125).collect();
                let mut want = start.clone();
                for _ in 0..2 {
                    for i in 0..n {
                        for j in i + 1..n {
                            want[i * n + j] += g[i * n + j] * want_inv[i] * want_inv[j];
                        }
                    }
                }
                let mut inv = vec![-1.0; n];
                let mut acc = start.clone();
                let took = (0..2)
                    .map(|_| accumulate_normalised(&c, n, ne, &mut inv, &mut acc))
                    .collect::<Vec<_>>();
                let what = format!("{n}x{ne} 0..={hi} all {all}");
                #[cfg(target_arch = "x86_64")]
                let expect = hi <= U8_MAX as i16 && Cpu::get().avx2().is_some();
                #[cfg(not(target_arch = "x86_64"))]
                let expect = false;
                assert_eq!(took, vec![expect; 2], "{what}");
                if !expect {
                    assert_eq!(acc, start, "{what}: refused but wrote acc");
                    continue;
                }
                assert_eq!(inv, want_inv, "{what}");
                for i in 0..n {
                    for j in i + 1..n {
                        assert_eq!(acc[i * n + j], want[i * n + j], "{what} ({i},{j})");
                    }
                }
            }
        }
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
            let mut g = vec![-1.0; n * n];
            gram_upper_on(Cpu::scalar(), c, n, ne, &mut g);
            check(c, n, ne, &g, &format!("scalar dispatch {what}"));
            #[cfg(target_arch = "x86_64")]
            if Cpu::get().avx2().is_some() {
                let mut g = vec![-1.0; n * n];
                // SAFETY: AVX2 detected; sizes match.
                unsafe { avx2::avx2(c, n, ne, &mut g) };
                check(c, n, ne, &g, &format!("i16 {what}"));
                let max = c.iter().map(|&x| x as u16).max().unwrap_or(0);
                let mut g = vec![-1.0; n * n];
                // SAFETY: as above.
                let took = unsafe { avx2::avx2_u8(c, n, ne, &mut g, &mut buf) };
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
