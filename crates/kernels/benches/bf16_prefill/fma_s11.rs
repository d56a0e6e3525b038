//! The session-11 FMA path of the AVX-512 bf16 × bf16 kernel
//! (`src/arch/x86_64/avx512/matmul_fma.rs` at commit 9f8815f: blocks of 5 weight rows × 4 tokens
//! reading bf16 activations, unaligned widened panels), kept for the A/B column `fma-s11` of this
//! benchmark only. Not used by the library.

use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;

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

/// The library's fixed-order 16-lane sum.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[inline(always)]
unsafe fn hsum(v: __m512) -> f32 {
    // SAFETY: the caller guarantees AVX-512 F; no memory is accessed.
    unsafe {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let v8 = _mm256_add_ps(lo, hi);
        let lo = _mm256_castps256_ps128(v8);
        let hi = _mm256_extractf128_ps::<1>(v8);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// Register block: weight rows × tokens (at most 8 × 8, see [`tile`]).
const ROWS: usize = 5;
const TOKS: usize = 4;
/// Weight rows per rayon task (a multiple of `ROWS`): 40 rows × 2048 widened to f32 = 320 KiB,
/// inside L2.
const PANEL: usize = 40;
/// The k block of the dot kernel (its partial sums are added in this order).
const KC: usize = 2048;
/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) bits.
const FTZ_DAZ: u32 = 0x8040;

/// # Safety
/// The CPU must have AVX-512 F and BW.
pub unsafe fn xwt(x: &[bf16], n: usize, k: usize, w: &[bf16], m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let groups = k.div_ceil(32);
    let out = OutPtr(y.as_mut_ptr());
    (0..m.div_ceil(PANEL)).into_par_iter().for_each_init(
        || (Vec::<f32>::new(), Vec::<f32>::new()),
        |(wbuf, lanes), p| {
            let r0 = p * PANEL;
            let r1 = (r0 + PANEL).min(m);
            wbuf.resize((r1 - r0) * groups * 32, 0.0);
            // SAFETY: the caller guarantees AVX-512 F and BW; the sizes of x and w are asserted
            // above, `buf` holds (r1 − r0)·groups·32 f32, and y (n × m, alive until the loop
            // ends) is written by this task in columns r0..r1 only.
            unsafe {
                widen(w, k, r0, r1, wbuf);
                panel(x, n, k, wbuf, m, r0, r1, out.get(), lanes);
            }
        },
    );
    y
}

/// The MXCSR register (every x86-64 CPU has it).
#[inline(always)]
fn mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: `stmxcsr` writes 4 bytes to the given address, a local u32.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

/// Writes the MXCSR register (the call to [`panel`] between two of these is not inlined, so no
/// floating-point operation of the panel moves across them).
///
/// # Safety
/// `v` must be a valid MXCSR value (reserved bits zero), e.g. one read by [`mxcsr`] with
/// rounding-control-free bits such as FTZ / DAZ set.
#[inline(always)]
unsafe fn set_mxcsr(v: u32) {
    // SAFETY: `ldmxcsr` reads 4 bytes from the given address, a local u32; the caller's contract
    // makes the value valid.
    unsafe { asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, readonly)) };
}

/// Rows `r0..r1` of `w` (length `k`) into `buf` as f32, per row and group of 32 elements: the 16
/// odd elements, then the 16 even ones (zeros past `k`).
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `w.len() >= r1 * k`, `buf.len() >= (r1 - r0) *
/// k.div_ceil(32) * 32`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn widen(w: &[bf16], k: usize, r0: usize, r1: usize, buf: &mut [f32]) {
    let groups = k.div_ceil(32);
    // SAFETY: the caller's contract: reads stay inside rows r0..r1 of w (masked for the last
    // group), writes inside buf.
    unsafe {
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let wp = w.as_ptr();
        let bp = buf.as_mut_ptr();
        for (i, r) in (r0..r1).enumerate() {
            for g in 0..groups {
                let kk = g * 32;
                let len = (k - kk).min(32);
                let v = if len == 32 {
                    _mm512_loadu_si512(wp.add(r * k + kk) as *const __m512i)
                } else {
                    let mask: __mmask32 = (1u32 << len) - 1;
                    _mm512_maskz_loadu_epi16(mask, wp.add(r * k + kk) as *const i16)
                };
                let o = bp.add((i * groups + g) * 32);
                _mm512_storeu_ps(o, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
                _mm512_storeu_ps(o.add(16), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
            }
        }
    }
}

/// Output columns `r0..r1` of y from the widened panel `wf` (rows `r0..r1`). The FMAs run with
/// MXCSR's DAZ and FTZ set (inside [`tile`], not inlined, between two MXCSR writes); the 16-lane
/// sums and the additions of the k-block sums run here with the caller's MXCSR, as in the dot
/// kernel.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `x.len() >= n * k`, `wf` as written by [`widen`] for these
/// rows, `r1 <= m`, and `y` must point to `n * m` writable f32 that no other thread accesses in
/// columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn panel(
    x: &[bf16],
    n: usize,
    k: usize,
    wf: &[f32],
    m: usize,
    r0: usize,
    r1: usize,
    y: *mut f32,
    lanes: &mut Vec<f32>,
) {
    let rows = r1 - r0;
    lanes.resize(TOKS * rows * 16, 0.0);
    let saved = mxcsr();
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(TOKS);
            // SAFETY: this function's contract (tokens t..t + nt < n, rows of the panel, the k
            // range k0..k1 ≤ k); `lanes` holds TOKS·rows·16 f32; the MXCSR value is the saved one
            // with only DAZ / FTZ added.
            unsafe {
                set_mxcsr(saved | FTZ_DAZ);
                tile(x, k, wf, rows, t, nt, k0, k1, lanes.as_mut_ptr());
                set_mxcsr(saved);
            }
            for j in 0..nt {
                for i in 0..rows {
                    // SAFETY: lanes holds 16 f32 from (j·rows + i)·16 (j < TOKS, i < rows); y's
                    // element (t + j, r0 + i) is inside this panel's columns.
                    unsafe {
                        let s = hsum(_mm512_loadu_ps(lanes.as_ptr().add((j * rows + i) * 16)));
                        let out = y.add((t + j) * m + r0 + i);
                        *out = if k0 == 0 { s } else { *out + s };
                    }
                }
            }
            t += nt;
        }
        k0 = k1;
    }
}

/// The 16-lane accumulators of tokens `t..t + nt` × all `rows` rows of the panel over `k0..k1`,
/// stored at `lanes[(j · rows + i) · 16 ..]` for token `t + j` and panel row `i`.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; MXCSR should have DAZ and FTZ set (for the dot kernel's
/// bits); `x` must hold tokens `t..t + nt` (length k each, `k1 <= k`), `wf` the `rows` widened
/// rows, `lanes` must point to `nt · rows · 16` writable f32, `nt <= TOKS`.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile(
    x: &[bf16],
    k: usize,
    wf: &[f32],
    rows: usize,
    t: usize,
    nt: usize,
    k0: usize,
    k1: usize,
    lanes: *mut f32,
) {
    let groups = k.div_ceil(32);
    let mut r = 0;
    while r < rows {
        let nr = (rows - r).min(ROWS);
        let b = Blk {
            k,
            groups,
            rows,
            r,
            t,
            k0,
            k1,
        };
        // SAFETY: the block lies inside the tile (nr ≤ rows − r, nt ≤ TOKS), so this
        // function's contract covers it.
        unsafe {
            match nr {
                8 => tokens::<8>(nt, x, wf, lanes, b),
                7 => tokens::<7>(nt, x, wf, lanes, b),
                6 => tokens::<6>(nt, x, wf, lanes, b),
                5 => tokens::<5>(nt, x, wf, lanes, b),
                4 => tokens::<4>(nt, x, wf, lanes, b),
                3 => tokens::<3>(nt, x, wf, lanes, b),
                2 => tokens::<2>(nt, x, wf, lanes, b),
                _ => tokens::<1>(nt, x, wf, lanes, b),
            }
        }
        r += nr;
    }
}

/// [`block`] for `NR` rows and `nt` tokens (`nt ≤ 8`).
///
/// # Safety
/// As [`block`] with `NT = nt`.
#[inline(always)]
unsafe fn tokens<const NR: usize>(nt: usize, x: &[bf16], wf: &[f32], lanes: *mut f32, b: Blk) {
    // SAFETY: the caller's contract.
    unsafe {
        match nt {
            8 => block::<NR, 8>(x, wf, lanes, b),
            7 => block::<NR, 7>(x, wf, lanes, b),
            6 => block::<NR, 6>(x, wf, lanes, b),
            5 => block::<NR, 5>(x, wf, lanes, b),
            4 => block::<NR, 4>(x, wf, lanes, b),
            3 => block::<NR, 3>(x, wf, lanes, b),
            2 => block::<NR, 2>(x, wf, lanes, b),
            _ => block::<NR, 1>(x, wf, lanes, b),
        }
    }
}

/// Where a register block sits: panel rows from `r` (of `rows`, each `groups · 32` f32 widened),
/// tokens from `t`, the k range `k0..k1` (KC-aligned).
#[derive(Clone, Copy)]
struct Blk {
    k: usize,
    groups: usize,
    rows: usize,
    r: usize,
    t: usize,
    k0: usize,
    k1: usize,
}

/// One register block: `NR` weight rows × `NT` tokens over the k range of `b`.
///
/// # Safety
/// As [`tile`], for tokens `t..t + NT` and panel rows `r..r + NR`.
#[inline(always)]
unsafe fn block<const NR: usize, const NT: usize>(x: &[bf16], wf: &[f32], lanes: *mut f32, b: Blk) {
    // SAFETY: the caller's contract: x loads read inside the tokens' rows (masked past k1),
    // widened-weight loads inside the panel rows (groups·32 f32 each), writes inside y's block.
    unsafe {
        let Blk {
            k,
            groups,
            rows,
            r,
            t,
            k0,
            k1,
        } = b;
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); NR]; NT];
        let wp = wf.as_ptr();
        let xp = x.as_ptr();
        let stride = groups * 32;
        let mut kk = k0;
        while kk < k1 {
            let len = (k1 - kk).min(32);
            let mask: __mmask32 = if len == 32 {
                u32::MAX
            } else {
                (1u32 << len) - 1
            };
            let wo = wp.add(r * stride + kk);
            // The odd elements (first for every lane), then the even ones.
            let mut wv = [_mm512_setzero_ps(); NR];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(wo.add(i * stride));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_epi16(mask, xp.add((t + j) * k + kk) as *const i16);
                let xo = _mm512_castsi512_ps(_mm512_and_si512(xv, hi));
                for (i, v) in wv.iter().enumerate() {
                    a[i] = _mm512_fmadd_ps(xo, *v, a[i]);
                }
            }
            for (i, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(wo.add(i * stride + 16));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_epi16(mask, xp.add((t + j) * k + kk) as *const i16);
                let xe = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(xv));
                for (i, v) in wv.iter().enumerate() {
                    a[i] = _mm512_fmadd_ps(xe, *v, a[i]);
                }
            }
            kk += 32;
        }
        for (j, a) in acc.iter().enumerate() {
            for (i, v) in a.iter().enumerate() {
                _mm512_storeu_ps(lanes.add((j * rows + r + i) * 16), *v);
            }
        }
    }
}
