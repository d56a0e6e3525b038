//! The session-2 AVX2 + FMA kernel of `x · Wᵀ` (`src/arch/x86_64/avx2/matmul.rs` at commit
//! dc0aa77: rayon tasks of 48-row panels, the panel widened into an unaligned `Vec` when n > 16,
//! register blocks of 3 rows × 4 tokens), kept for the A/B columns of `benches/matmul.rs` and the
//! test `tests/avx2_session2.rs` only. Not used by the library.

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

use moe_xray_kernels::matmul::{Elem, ElemKind};
use rayon::prelude::*;
use std::arch::x86_64::*;

const ROWS: usize = 3;
const TOKS: usize = 4;
/// Weight rows per rayon task: 48 rows of 2048 bf16 = 192 KiB, well inside L2.
const PANEL: usize = 48;
/// k block (multiple of 8).
const KC: usize = 1024;
/// From this many tokens on, a weight panel is widened to f32 once instead of in registers by
/// every token block (fewer instructions per FMA; below it, the extra pass over memory costs
/// more than it saves: `cargo bench -p moe-xray-kernels --bench matmul`).
const WIDEN_MIN_TOKENS: usize = 16;

/// # Safety
/// The CPU must have AVX2, FMA and F16C.
pub unsafe fn xwt<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let out = OutPtr(y.as_mut_ptr());
    (0..m.div_ceil(PANEL))
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |buf, p| {
            let r0 = p * PANEL;
            let r1 = (r0 + PANEL).min(m);
            // SAFETY: the caller guarantees AVX2, FMA and F16C; the sizes
            // of x and w are asserted above, `buf` has (r1 − r0)·k elements, and y (n × m, alive
            // until the loop ends) is written by this task in columns r0..r1 only.
            unsafe {
                if n > WIDEN_MIN_TOKENS && T::KIND != ElemKind::F32 {
                    // Several token blocks will read this panel: widen it once (exactly, so
                    // the results are the same as reading the weights directly).
                    buf.resize((r1 - r0) * k, 0.0);
                    T::widen(&w[r0 * k..r1 * k], buf);
                    panel::<f32>(x, n, k, buf, m, r0, r1, 0, out.get())
                } else {
                    panel::<T>(x, n, k, w, m, r0, r1, r0, out.get())
                }
            }
        });
    y
}

/// Output columns `r0..r1` of y, the weight rows read from row `wr0` of `w`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x.len() >= n * k`, `w` must hold rows
/// `wr0..wr0 + (r1 - r0)` of length `k`, `r1 <= m`, and `y` must point to `n * m` writable f32
/// that no other thread accesses in columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel<T: Elem>(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
    r0: usize,
    r1: usize,
    wr0: usize,
    y: *mut f32,
) {
    // k in blocks of KC so that a block of 4 tokens' activations (4 × KC f32 = 16 KiB) stays
    // in L1 while the weight panel (≤ 48 rows, bf16, ≤ 192 KiB) is re-read from L2 for every
    // token block. Partial sums of the k blocks are added in order into y.
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(TOKS);
            let mut r = r0;
            while r < r1 {
                let nr = (r1 - r).min(ROWS);
                let b = Blk {
                    k,
                    m,
                    r,
                    wr: r - r0 + wr0,
                    t,
                    k0,
                    k1,
                };
                // SAFETY: the block lies inside the panel (nr ≤ r1 − r, nt ≤ n − t, k1 ≤ k),
                // so this function's contract covers it.
                unsafe {
                    match (nr, nt) {
                        (3, 4) => block::<T, 3, 4>(x, w, y, b),
                        (3, 3) => block::<T, 3, 3>(x, w, y, b),
                        (3, 2) => block::<T, 3, 2>(x, w, y, b),
                        (3, _) => block::<T, 3, 1>(x, w, y, b),
                        (2, 4) => block::<T, 2, 4>(x, w, y, b),
                        (2, 3) => block::<T, 2, 3>(x, w, y, b),
                        (2, 2) => block::<T, 2, 2>(x, w, y, b),
                        (2, _) => block::<T, 2, 1>(x, w, y, b),
                        (_, 4) => block::<T, 1, 4>(x, w, y, b),
                        (_, 3) => block::<T, 1, 3>(x, w, y, b),
                        (_, 2) => block::<T, 1, 2>(x, w, y, b),
                        (_, _) => block::<T, 1, 1>(x, w, y, b),
                    }
                }
                r += nr;
            }
            t += nt;
        }
        k0 = k1;
    }
}

/// Where a register block sits: output columns from `r` (weight rows from `wr`), tokens
/// from `t`, the k range
/// `k0..k1` (KC-aligned; only the last one may end in a non-multiple of 8).
#[derive(Clone, Copy)]
struct Blk {
    k: usize,
    m: usize,
    r: usize,
    wr: usize,
    t: usize,
    k0: usize,
    k1: usize,
}

/// The sum of the eight lanes in a fixed order: (l + h) over the halves, then lanes 0 + 2 and
/// 1 + 3, then their sum ([`super::hsum_reference`]).
///
/// # Safety
/// The CPU must have AVX (inlined into AVX2 functions only).
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: the caller guarantees AVX; no memory is accessed.
    unsafe {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// One register block: `NR` weight rows × `NT` tokens over the k range of `b`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` must hold tokens `t..t + NT`, `w` rows
/// `wr..wr + NR` (length k each), and `y` must point to `n * m` writable f32 with
/// `(t + NT - 1) * m + r + NR <= n * m` that no other thread accesses there.
#[inline(always)]
unsafe fn block<T: Elem, const NR: usize, const NT: usize>(
    x: &[f32],
    w: &[T],
    y: *mut f32,
    b: Blk,
) {
    // SAFETY: the caller's contract: all pointer reads stay inside rows of x and w (kk + 8 ≤ k8
    // ≤ k), the writes inside y's block; the CPU has the features.
    unsafe {
        let Blk {
            k,
            m,
            r,
            wr,
            t,
            k0,
            k1,
        } = b;
        let mut acc = [[_mm256_setzero_ps(); NR]; NT];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let k8 = k0 + (k1 - k0) / 8 * 8;
        let mut kk = k0;
        while kk < k8 {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = load8(wp.add((wr + i) * k + kk));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add((t + j) * k + kk));
                for (i, v) in wv.iter().enumerate() {
                    a[i] = _mm256_fmadd_ps(xv, *v, a[i]);
                }
            }
            kk += 8;
        }
        for (j, a) in acc.iter().enumerate() {
            for (i, v) in a.iter().enumerate() {
                let mut s = hsum(*v);
                for q in k8..k1 {
                    s += x[(t + j) * k + q] * w[(wr + i) * k + q].to_f32();
                }
                let out = y.add((t + j) * m + r + i);
                *out = if k0 == 0 { s } else { *out + s };
            }
        }
    }
}

/// Eight consecutive values of `T` at `p` as f32 lanes (bf16: zero-extend and shift left by 16,
/// the exact widening; f16: `vcvtph2ps`; f32: a plain load).
///
/// # Safety
/// `p` must point to 8 readable values; the CPU must have AVX2 and F16C.
#[inline(always)]
unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
    // SAFETY: the caller's contract (8 readable values, CPU features); `T::KIND` names the
    // element type, so the cast reads the same bytes as 8 × u16 or 8 × f32.
    unsafe {
        match T::KIND {
            ElemKind::Bf16 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
        }
    }
}
