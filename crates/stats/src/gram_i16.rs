//! Exact Gram matrices of small non-negative integer count rows (i16 entries, i32 dot products):
//! the per-layer `G = C Cᵀ` of the baselines' synthetic counts. Only the upper triangle with the
//! diagonal is computed. On x86-64 with AVX2 the dot products use `vpmaddwd` (16 products per
//! instruction), four columns at a time; elsewhere a scalar loop. Integer arithmetic is exact, so
//! both give identical results. Hand-written because the `gemm` crate has no integer kernels and
//! no symmetric (syrk) product, and a generic f32 GEMM spends most of its time on packing at
//! these sizes (80 × 64 per layer).

/// `g[i·n + j] = Σ_e c[i·ne + e] · c[j·ne + e]` for `i ≤ j < n`, exactly. Callers guarantee every
/// dot product fits in an i32 (`max entry · max row sum < 2^31`) and entries are non-negative.
pub(crate) fn gram_upper(c: &[i16], n: usize, ne: usize, g: &mut [f64]) {
    assert!(c.len() >= n * ne && g.len() >= n * n);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected at run time; bounds are checked above.
        unsafe { avx2(c, n, ne, g) };
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

/// Two rows × four columns per block: eight `vpmaddwd` accumulators, horizontal sums converted to
/// f64 and stored four at a time. Blocks may also fill a few entries below the diagonal (unused).
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
    let mut i = 0;
    while i + 2 <= n {
        let mut j = i;
        while j + 4 <= n {
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
            j += 4;
        }
        for jj in j..n {
            let b = &c[jj * ne..(jj + 1) * ne];
            g[i * n + jj] = dot(&c[i * ne..(i + 1) * ne], b) as f64;
            g[(i + 1) * n + jj] = dot(&c[(i + 1) * ne..(i + 2) * ne], b) as f64;
        }
        i += 2;
    }
    if i < n {
        g[i * n + i] = dot(&c[i * ne..(i + 1) * ne], &c[i * ne..(i + 1) * ne]) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_scalar_definition() {
        for (n, ne) in [(1, 1), (5, 7), (9, 16), (13, 64), (80, 64), (6, 33)] {
            let c: Vec<i16> = (0..n * ne).map(|x| ((x * 37 + 11) % 97) as i16).collect();
            // The dispatched kernel (AVX2 where available) and the scalar fallback.
            let mut g = vec![-1.0; n * n];
            gram_upper(&c, n, ne, &mut g);
            let mut gs = vec![-1.0; n * n];
            scalar(&c, n, ne, &mut gs);
            for i in 0..n {
                for j in i..n {
                    let want: i64 = (0..ne)
                        .map(|e| c[i * ne + e] as i64 * c[j * ne + e] as i64)
                        .sum();
                    assert_eq!(g[i * n + j], want as f64, "{n}x{ne} ({i},{j})");
                    assert_eq!(gs[i * n + j], want as f64, "scalar {n}x{ne} ({i},{j})");
                }
            }
        }
    }
}
