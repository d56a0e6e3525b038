//! The prefill path of the bf16 × bf16 kernel: AVX-512F f32 FMAs on weight panels widened to f32
//! once per call, **bit-identical** to the `vdpbf16ps` kernel (`matmul.rs` next to this file).
//!
//! Why it is the same arithmetic: one `vdpbf16ps` step on f32 lane `l` is `acc ← acc +
//! x[2l+1]·w[2l+1]` rounded to nearest even, then `acc ← acc + x[2l]·w[2l]` rounded again, with
//! denormal inputs read as zero and denormal results flushed to zero. A bf16 × bf16 product has at
//! most 16 significant bits, so it is exact in the FMA's internal precision and `fma(x, w, acc)`
//! rounds `acc + x·w` once: the same step. Here the odd and the even elements of every group of
//! 32 are split into two f32 vectors (bf16 → f32 is exact: the odd element of a 32-bit pair is the
//! pair with its low half cleared, the even one the pair shifted left by 16) and fed to two FMAs
//! per lane, odd first. MXCSR's DAZ and FTZ bits are set around the FMA loops only (`tile`, not
//! inlined, between two `ldmxcsr`) so that denormals behave as in `vdpbf16ps`; the 16-lane sums
//! and the k-block sums, which the dot kernel computes without flushing, run with the caller's
//! MXCSR (the accumulators pass through a small per-thread buffer; [`hsum16`] sums 16 of them at a
//! time with the same additions as the dot kernel's `hsum`). The k blocks (`KC`), the zero padding
//! of the last group, the 16-lane sum and the order of the block sums are the dot kernel's. Tests
//! `avx512_fma_path_matches_the_dot_kernel_bit_for_bit`,
//! `avx512_bf16_denormals_ties_and_signed_zeros_match_the_reference` and (every block shape)
//! `every_block_shape_matches_the_dot_kernel_bit_for_bit` check it.
//!
//! Why it is faster: on the CPUs measured a `vdpbf16ps` costs about four f32 FMAs of issue
//! bandwidth and two FMAs do the same work here. Session 12 (`cargo bench -p moe-xray-kernels
//! --bench bf16_prefill`, one thread, AVX-512 Xeon, OLMoE shapes): about 1.0× the dot kernel at
//! 8 tokens with the weights in cache (1.1–1.3× streamed from memory), 1.15–1.25× at 16,
//! 1.4–1.7× from 48 on (110–135 GFLOP/s per core against the dot kernel's ~80). [`super::xwt_same`] takes this path from
//! `FMA_MIN_TOKENS` tokens on; since both paths give the same bits, a token's result does not
//! depend on the batch it is in.
//!
//! Shape:
//! - the activations are split once per call into f32 (per token and group of 32: 16 odd then 16
//!   even f32; zeros past k), in a buffer kept by the calling thread;
//! - rayon tasks of one panel of `PANEL` weight rows (from `GROUP_MIN_TOKENS` tokens on: equal
//!   tasks of about `MAX_GROUP` panels, a multiple of the thread count, token chunks of `CHUNK`
//!   outside); each panel is widened into a per-thread buffer like the activations, by the first
//!   token block of every k block, group by group just before its FMAs (the loads from memory and
//!   the stores overlap the FMAs);
//! - register blocks of `ROWS` weight rows × `TOKS` tokens (25 accumulators).
//!
//! Both buffers start on 64-byte boundaries (every row then does: rows are whole 128-byte
//! groups): a 64-byte load across two cache lines costs a third of the loop's speed.

use super::{Aligned, OutPtr};
use crate::cpu::Avx512Bf16;
use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Register block: weight rows × tokens (`ROWS · TOKS` accumulators plus `min(ROWS, TOKS)`
/// preloaded operands and one streamed operand: 31 of the 32 vector registers).
const ROWS: usize = 5;
const TOKS: usize = 5;
/// Weight rows per panel (a multiple of `ROWS`): 40 rows × 2048 widened to f32 = 320 KiB, inside
/// L2.
const PANEL: usize = 40;
/// The k block of the dot kernel (its partial sums are added in this order).
const KC: usize = super::avx512::KC;
/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) bits.
const FTZ_DAZ: u32 = 0x8040;
/// Token chunk of a task of several panels (a multiple of `TOKS`): 40 tokens × 2048 split to f32
/// = 320 KiB, beside up to `MAX_GROUP` widened panels in L2.
const CHUNK: usize = 40;
/// Panels per task at most, about (3 × 320 KiB widened, in L2 with a token chunk).
const MAX_GROUP: usize = 3;
/// From this many tokens on, tasks take several panels: the split activations of all tokens
/// (2048 × 4 bytes each for k = 2048) no longer fit in L2 beside a panel, and each task reads all
/// of them (measured: 107–116 → 115–121 GFLOP/s per core at 512 tokens).
const GROUP_MIN_TOKENS: usize = 128;
/// Tokens per rayon task of the activation split (several tasks per thread for large calls).
const SPLIT_TOKENS: usize = 32;

pub(super) fn xwt(
    cpu: Avx512Bf16,
    x: &[bf16],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 || k == 0 {
        // Empty sums are +0, as in the dot kernel.
        return y;
    }
    let groups = k.div_ceil(32);
    // Widened rows (weights and activations) are `stride` f32 long: a whole number of 128-byte
    // groups, so every row of a 64-byte-aligned buffer starts on a 64-byte boundary.
    let stride = groups * 32;
    let xs_len = n.checked_mul(stride);
    assert!(xs_len.is_some(), "xwt: activation size overflows");
    let xs_len = xs_len.unwrap_or(0);
    // The split activations live in a buffer of the calling thread, kept between calls up to
    // `KEEP` f32 (allocating and faulting in a fresh one costs a few % at prefill sizes); a nested
    // call on the same thread (rayon work stealing) gets a fresh one.
    XS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut keep) if xs_len <= KEEP => compute(cpu, &mut keep, x, n, k, w, m, stride, &mut y),
        _ => compute(cpu, &mut Aligned::default(), x, n, k, w, m, stride, &mut y),
    });
    y
}

/// Split activations up to this many f32 (8 MiB) stay allocated per calling thread.
const KEEP: usize = 1 << 21;

thread_local! {
    /// The split-activation buffer of the calling thread.
    static XS: RefCell<Aligned> = RefCell::new(Aligned::default());
    /// The widened-panel buffer and the lane buffer of a rayon worker.
    static PANEL_BUFS: RefCell<(Aligned, Vec<f32>)> =
        RefCell::new((Aligned::default(), Vec::new()));
}

/// [`xwt`] into `y` (n × m, zeros) with `xs_buf` for the split activations.
#[allow(clippy::too_many_arguments)]
fn compute(
    _: Avx512Bf16,
    xs_buf: &mut Aligned,
    x: &[bf16],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
    stride: usize,
    y: &mut [f32],
) {
    let xs = xs_buf.get(n * stride);
    // The activations split into odd / even f32 once per call (the tiles read them n/TOKS·m/ROWS
    // times in all), in parallel over tokens.
    xs.par_chunks_mut(SPLIT_TOKENS * stride)
        .enumerate()
        .for_each(|(c, chunk)| {
            let t0 = c * SPLIT_TOKENS;
            let t1 = t0 + chunk.len() / stride;
            // SAFETY: the `Avx512Bf16` token exists only on CPUs with AVX-512 F, BW and BF16;
            // x holds n·k ≥ t1·k elements (asserted in `xwt`), `chunk` (t1 − t0)·stride f32.
            unsafe { widen(x, k, t0, t1, chunk) };
        });
    let xs: &[f32] = xs;
    let out = OutPtr(y.as_mut_ptr());
    // Tasks of several panels when there are many tokens (their split activations no longer fit
    // in L2, and each task reads all of them): a token chunk is then read from memory once per
    // task instead of once per panel. The task count is a multiple of the thread count (at least
    // 4 per thread), so that the threads get equal shares; the results do not depend on it.
    let panels = m.div_ceil(PANEL);
    let rows_per_task = if n >= GROUP_MIN_TOKENS {
        let threads = rayon::current_num_threads().max(1);
        let tasks = panels
            .div_ceil(MAX_GROUP)
            .max(4 * threads)
            .next_multiple_of(threads);
        m.div_ceil(tasks).next_multiple_of(ROWS).max(PANEL)
    } else {
        PANEL
    };
    (0..m.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|p| {
            let r0 = p * rows_per_task;
            let r1 = (r0 + rows_per_task).min(m);
            let run = |wbuf: &mut Aligned, lanes: &mut Vec<f32>| {
                let wf = wbuf.get((r1 - r0) * stride);
                // SAFETY: as above for the CPU; the size of w is asserted in `xwt` (so the
                // slice of rows r0..r1 exists), `wf` holds (r1 − r0)·stride f32 and `xs`
                // n·stride, both from 64-byte boundaries; y (n × m, alive until the loop ends)
                // is written by this task in columns r0..r1 only.
                unsafe {
                    panel(
                        xs,
                        n,
                        k,
                        &w[r0 * k..r1 * k],
                        wf,
                        m,
                        r0,
                        r1,
                        out.get(),
                        lanes,
                    )
                };
            };
            PANEL_BUFS.with(|cell| match cell.try_borrow_mut() {
                Ok(mut b) => {
                    let (wbuf, lanes) = &mut *b;
                    run(wbuf, lanes)
                }
                Err(_) => run(&mut Aligned::default(), &mut Vec::new()),
            });
        });
}

/// The MXCSR register (every x86-64 CPU has it).
#[inline(always)]
fn mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: `stmxcsr` writes 4 bytes to the given address, a local u32.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

/// Writes the MXCSR register (the call to [`tile`] between two of these is not inlined, so no
/// floating-point operation of the tile moves across them).
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
/// odd elements, then the 16 even ones (zeros past `k`). Used for the weight panels and for the
/// activations.
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

/// Output columns `r0..r1` of y from the split activations `xs` and the weight rows `wp` (rows
/// `r0..r1` of w, bf16), widened into `wf` by the first token block of every k block (the
/// following token blocks read them there). The FMAs run with MXCSR's DAZ and FTZ set (inside
/// [`tile`], not inlined, between two MXCSR writes); the 16-lane sums and the additions of the
/// k-block sums run here with the caller's MXCSR, as in the dot kernel.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `xs` as written by [`widen`] for tokens `0..n`,
/// `wp.len() == (r1 - r0) * k`, `wf.len() >= (r1 - r0) * k.div_ceil(32) * 32` from a 64-byte
/// boundary, `r1 <= m`, and `y` must point to `n * m` writable f32 that no other thread accesses
/// in columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn panel(
    xs: &[f32],
    n: usize,
    k: usize,
    wp: &[bf16],
    wf: &mut [f32],
    m: usize,
    r0: usize,
    r1: usize,
    y: *mut f32,
    lanes: &mut Vec<f32>,
) {
    let rows = r1 - r0;
    let stride = k.div_ceil(32) * 32;
    lanes.resize(TOKS * rows.min(PANEL) * 16, 0.0);
    let saved = mxcsr();
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        // Token chunks outside, sub-panels of PANEL rows inside: a chunk's split activations
        // stay in L2 while every sub-panel of the task reads them.
        let mut tc = 0;
        while tc < n {
            let tc1 = (tc + CHUNK).min(n);
            let mut s0 = 0;
            while s0 < rows {
                let s1 = (s0 + PANEL).min(rows);
                let sr = s1 - s0;
                let mut t = tc;
                while t < tc1 {
                    let nt = (tc1 - t).min(TOKS);
                    // The slices first (bounds-checked), so that nothing between the MXCSR
                    // writes can panic.
                    let src = if t == 0 {
                        Some(&wp[s0 * k..s1 * k])
                    } else {
                        None
                    };
                    let wsub = &mut wf[s0 * stride..s1 * stride];
                    // SAFETY: this function's contract (tokens t..t + nt ≤ n, rows s0..s1 of
                    // the panel, the k range k0..k1 ≤ k); `lanes` holds TOKS·sr·16 f32; the
                    // first token block (t = 0) of each k block and sub-panel widens wf's
                    // columns k0..k1 of these rows before the others read them; the MXCSR value
                    // is the saved one with only DAZ / FTZ added.
                    unsafe {
                        set_mxcsr(saved | FTZ_DAZ);
                        tile(xs, k, src, wsub, sr, t, nt, k0, k1, lanes.as_mut_ptr());
                        set_mxcsr(saved);
                    }
                    for j in 0..nt {
                        let mut c0 = 0;
                        while c0 < sr {
                            let cnt = (sr - c0).min(16);
                            // SAFETY: lanes holds 16 f32 from (j·sr + i)·16 for j < TOKS,
                            // i < sr; y's elements (t + j, r0 + s0 + c0 ..) (cnt of them) are
                            // inside this panel's columns (masked loads and stores touch only
                            // those).
                            unsafe {
                                let s = hsum16(lanes.as_ptr().add((j * sr + c0) * 16), cnt);
                                let out = y.add((t + j) * m + r0 + s0 + c0);
                                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                                let v = if k0 == 0 {
                                    s
                                } else {
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), s)
                                };
                                _mm512_mask_storeu_ps(out, mask, v);
                            }
                            c0 += cnt;
                        }
                    }
                    t += nt;
                }
                s0 = s1;
            }
            tc = tc1;
        }
        k0 = k1;
    }
}

/// The 16-lane sums of `cnt ≤ 16` accumulators stored one after the other at `lanes` (16 f32
/// each), in one vector (element `i` for accumulator `i`; elements from `cnt` on are zero): the
/// same additions, with the same operands in the same order, as [`hsum`] on each accumulator
/// (lanes `i + (i + 8)`, then `i + (i + 4)`, then `0 + 2` and `1 + 3`, then their sum), done
/// on 16 accumulators at a time with shuffles between the steps.
///
/// # Safety
/// The CPU must have AVX-512 F; `lanes` must point to `cnt · 16` readable f32.
#[inline(always)]
unsafe fn hsum16(lanes: *const f32, cnt: usize) -> __m512 {
    // SAFETY: the caller's contract: loads only accumulators 0..cnt.
    unsafe {
        // Slot s holds accumulator 4·(s mod 4) + s / 4, so that the result comes out in order
        // (the steps below leave accumulator of slot l + 4q at element 4l + q).
        let mut v = [_mm512_setzero_ps(); 16];
        for (s, v) in v.iter_mut().enumerate() {
            let a = 4 * (s % 4) + s / 4;
            if a < cnt {
                *v = _mm512_loadu_ps(lanes.add(a * 16));
            }
        }
        // Lanes i + (i + 8): slots 2p, 2p + 1 → the low and high 256 bits of r[p].
        let mut r = [_mm512_setzero_ps(); 8];
        for (p, r) in r.iter_mut().enumerate() {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            *r = _mm512_add_ps(lo, hi);
        }
        // Then i + (i + 4): r[2q], r[2q + 1] → the four 128-bit lanes of s[q] (slots 4q..4q+4).
        let mut s = [_mm512_setzero_ps(); 4];
        for (q, s) in s.iter_mut().enumerate() {
            let (a, b) = (r[2 * q], r[2 * q + 1]);
            let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            *s = _mm512_add_ps(lo, hi);
        }
        // Then 0 + 2 and 1 + 3 in every 128-bit lane: s[2h], s[2h + 1] → u[h].
        let mut u = [_mm512_setzero_ps(); 2];
        for (h, u) in u.iter_mut().enumerate() {
            let (a, b) = (s[2 * h], s[2 * h + 1]);
            let lo = _mm512_shuffle_ps::<0b01_00_01_00>(a, b);
            let hi = _mm512_shuffle_ps::<0b11_10_11_10>(a, b);
            *u = _mm512_add_ps(lo, hi);
        }
        // Then 0 + 1.
        let lo = _mm512_shuffle_ps::<0b10_00_10_00>(u[0], u[1]);
        let hi = _mm512_shuffle_ps::<0b11_01_11_01>(u[0], u[1]);
        _mm512_add_ps(lo, hi)
    }
}

/// The 16-lane accumulators of tokens `t..t + nt` × all `rows` rows of the panel over `k0..k1`,
/// stored at `lanes[(j · rows + i) · 16 ..]` for token `t + j` and panel row `i`. With `src`
/// (the panel's bf16 rows), columns `k0..k1` of `wf` are widened from it first, group by group
/// (the widening's loads and stores overlap the FMAs).
///
/// # Safety
/// The CPU must have AVX-512 F and BW; MXCSR should have DAZ and FTZ set (for the dot kernel's
/// bits); `xs` must hold the split tokens `t..t + nt`, `wf` room for the `rows` widened rows
/// (each `k.div_ceil(32) · 32` f32, from a 64-byte boundary; columns `k0..k1` already widened
/// unless `src` is given), `src` (if given) `rows · k` bf16, `k1 <= k`, `lanes` must point to
/// `nt · rows · 16` writable f32, `nt <= TOKS`.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile(
    xs: &[f32],
    k: usize,
    src: Option<&[bf16]>,
    wf: &mut [f32],
    rows: usize,
    t: usize,
    nt: usize,
    k0: usize,
    k1: usize,
    lanes: *mut f32,
) {
    let stride = k.div_ceil(32) * 32;
    let mut r = 0;
    while r < rows {
        let nr = (rows - r).min(ROWS);
        let b = Blk {
            k,
            stride,
            rows,
            r,
            t,
            k0,
            k1,
        };
        // SAFETY: the block lies inside the tile (nr ≤ rows − r, nt ≤ TOKS), so this
        // function's contract covers it.
        unsafe {
            let wf = wf.as_mut_ptr();
            match (nr, src) {
                (5, Some(w)) => tokens::<5, true>(nt, xs, w, wf, lanes, b),
                (4, Some(w)) => tokens::<4, true>(nt, xs, w, wf, lanes, b),
                (3, Some(w)) => tokens::<3, true>(nt, xs, w, wf, lanes, b),
                (2, Some(w)) => tokens::<2, true>(nt, xs, w, wf, lanes, b),
                (_, Some(w)) => tokens::<1, true>(nt, xs, w, wf, lanes, b),
                (5, None) => tokens::<5, false>(nt, xs, &[], wf, lanes, b),
                (4, None) => tokens::<4, false>(nt, xs, &[], wf, lanes, b),
                (3, None) => tokens::<3, false>(nt, xs, &[], wf, lanes, b),
                (2, None) => tokens::<2, false>(nt, xs, &[], wf, lanes, b),
                (_, None) => tokens::<1, false>(nt, xs, &[], wf, lanes, b),
            }
        }
        r += nr;
    }
}

/// [`block`] for `NR` rows and `nt` tokens (`nt ≤ TOKS`).
///
/// # Safety
/// As [`block`] with `NT = nt`.
#[inline(always)]
unsafe fn tokens<const NR: usize, const WIDEN: bool>(
    nt: usize,
    xs: &[f32],
    src: &[bf16],
    wf: *mut f32,
    lanes: *mut f32,
    b: Blk,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match nt {
            5 => block::<NR, 5, WIDEN>(xs, src, wf, lanes, b),
            4 => block::<NR, 4, WIDEN>(xs, src, wf, lanes, b),
            3 => block::<NR, 3, WIDEN>(xs, src, wf, lanes, b),
            2 => block::<NR, 2, WIDEN>(xs, src, wf, lanes, b),
            _ => block::<NR, 1, WIDEN>(xs, src, wf, lanes, b),
        }
    }
}

/// Where a register block sits: panel rows from `r` (of `rows`; `k` bf16 apart in the source,
/// `stride` f32 apart widened), tokens from `t` (`stride` f32 apart), the k range `k0..k1`
/// (KC-aligned).
#[derive(Clone, Copy)]
struct Blk {
    k: usize,
    stride: usize,
    rows: usize,
    r: usize,
    t: usize,
    k0: usize,
    k1: usize,
}

/// One register block: `NR` weight rows × `NT` tokens over the k range of `b`: per group of 32,
/// the odd halves (one FMA per accumulator), then the even halves. The operand of the smaller
/// side is held in registers, the other one read once per FMA row. With `WIDEN`, each group of
/// the `NR` rows is first widened from `src` into `wf` (16 odd, then 16 even f32; zeros past k).
///
/// # Safety
/// As [`tile`], for tokens `t..t + NT` and panel rows `r..r + NR` (`src` holds the panel's rows
/// if `WIDEN`).
#[inline(always)]
unsafe fn block<const NR: usize, const NT: usize, const WIDEN: bool>(
    xs: &[f32],
    src: &[bf16],
    wf: *mut f32,
    lanes: *mut f32,
    b: Blk,
) {
    // SAFETY: the caller's contract: bf16 loads read inside rows r..r + NR of `src` (masked past
    // k), widened stores and loads whole groups (32 f32) inside the rows of `wf`, split
    // activation loads inside the tokens' rows (zeros past k), writes stay inside the tile's
    // lanes.
    unsafe {
        let Blk {
            k,
            stride,
            rows,
            r,
            t,
            k0,
            k1,
        } = b;
        let mut acc = [[_mm512_setzero_ps(); NR]; NT];
        let wo = wf.add(r * stride);
        let xo = xs.as_ptr().add(t * stride);
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut kk = k0;
        while kk < k1 {
            if WIDEN {
                let len = (k - kk).min(32);
                for i in 0..NR {
                    let p = src.as_ptr().add((r + i) * k + kk);
                    // A hint only (never faults, even past the end): the same group of the rows
                    // of the next row block, into L2 (the weights come from L3 or memory once
                    // per call; measured faster than hints 1–8 KiB ahead along the row with
                    // `BF16_BENCH_COLD=1`).
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(NR * k).cast::<i8>());
                    let v = if len == 32 {
                        _mm512_loadu_si512(p as *const __m512i)
                    } else {
                        let mask: __mmask32 = (1u32 << len) - 1;
                        _mm512_maskz_loadu_epi16(mask, p as *const i16)
                    };
                    let o = wo.add(i * stride + kk);
                    _mm512_storeu_ps(o, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
                    _mm512_storeu_ps(o.add(16), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
                }
            }
            // h = 0: the odd elements (first for every lane), h = 16: the even ones.
            for h in [0, 16] {
                if NR <= NT {
                    let mut wv = [_mm512_setzero_ps(); NR];
                    for (i, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(wo.add(i * stride + kk + h));
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(xo.add(j * stride + kk + h));
                        for (i, v) in wv.iter().enumerate() {
                            a[i] = _mm512_fmadd_ps(xv, *v, a[i]);
                        }
                    }
                } else {
                    let mut xv = [_mm512_setzero_ps(); NT];
                    for (j, v) in xv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(xo.add(j * stride + kk + h));
                    }
                    for i in 0..NR {
                        let wv = _mm512_loadu_ps(wo.add(i * stride + kk + h));
                        for (j, a) in acc.iter_mut().enumerate() {
                            a[i] = _mm512_fmadd_ps(xv[j], wv, a[i]);
                        }
                    }
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

#[cfg(test)]
mod tests {
    use crate::cpu::Cpu;
    use crate::matmul::xwt_bf16_reference;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<bf16> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_block_shape_matches_the_dot_kernel_bit_for_bit() {
        let Some(cpu) = Cpu::get().avx512_bf16() else {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        };
        // Every token count up to 2·TOKS + 1 (whole blocks plus every ragged one); m with whole
        // panels, a ragged last panel and a last row block of every size (m mod ROWS ≠ 0); k below
        // one group, with a tail in the last group, and over several k blocks with a tail.
        let ms = [
            1usize,
            3,
            super::ROWS + 1,
            super::PANEL + 2 * super::ROWS + 3,
            2 * super::PANEL + 4,
        ];
        for n in 1..=2 * super::TOKS + 1 {
            for (c, &(k, m)) in [
                (7usize, ms[0]),
                (33, ms[1]),
                (300, ms[2]),
                (1000, ms[3]),
                (2100, ms[4]),
            ]
            .iter()
            .enumerate()
            {
                let x = random(n * k, 100 + n as u64);
                let w = random(m * k, 200 + c as u64);
                let dot = super::super::avx512::xwt(cpu, &x, n, k, &w, m);
                let fma = super::xwt(cpu, &x, n, k, &w, m);
                assert_eq!(bits(&fma), bits(&dot), "n {n} k {k} m {m}");
                if k <= 300 {
                    let want = xwt_bf16_reference(&x, n, k, &w, m);
                    assert_eq!(bits(&fma), bits(&want), "n {n} k {k} m {m}");
                }
            }
        }
        // No k at all: zeros, as the dot kernel.
        for (n, m) in [(1, 1), (super::TOKS + 1, super::PANEL + 1)] {
            let dot = super::super::avx512::xwt(cpu, &[], n, 0, &[], m);
            assert_eq!(bits(&super::xwt(cpu, &[], n, 0, &[], m)), bits(&dot));
            assert!(dot.iter().all(|v| v.to_bits() == 0));
        }
        // Two k blocks whose second one is a single partial group (k = KC + 5), larger n.
        let (n, k, m) = (3 * super::TOKS + 2, super::KC + 5, super::ROWS + 2);
        let (x, w) = (random(n * k, 7), random(m * k, 8));
        let dot = super::super::avx512::xwt(cpu, &x, n, k, &w, m);
        assert_eq!(bits(&super::xwt(cpu, &x, n, k, &w, m)), bits(&dot));
    }

    #[test]
    fn tasks_of_several_panels_match_the_dot_kernel_at_any_thread_count() {
        let Some(cpu) = Cpu::get().avx512_bf16() else {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        };
        // From GROUP_MIN_TOKENS tokens on, tasks take up to MAX_GROUP panels (how many depends on
        // the thread count) and walk token chunks: a ragged last chunk (n mod CHUNK ≠ 0, not a
        // multiple of TOKS either), a ragged last panel and task (m mod PANEL = 7).
        let n = super::GROUP_MIN_TOKENS + super::CHUNK / 2 + 2;
        let (k, m) = (100, 12 * super::PANEL + 7);
        let (x, w) = (random(n * k, 31), random(m * k, 32));
        let dot = super::super::avx512::xwt(cpu, &x, n, k, &w, m);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let fma = pool.install(|| super::xwt(cpu, &x, n, k, &w, m));
            assert_eq!(bits(&fma), bits(&dot), "{threads} threads");
        }
    }

    #[test]
    fn concurrent_and_nested_calls_reuse_buffers_safely() {
        use rayon::prelude::*;
        let Some(cpu) = Cpu::get().avx512_bf16() else {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        };
        // Calls of different sizes inside rayon tasks: the thread-local buffers are reused by
        // later, smaller calls (stale contents must not leak in) and a call that starts while
        // another one on the same thread waits for its tasks gets fresh buffers.
        let cases: Vec<(usize, usize, usize)> = (0..12)
            .map(|i| (1 + 7 * i % 23, 40 + 61 * i % 300, 3 + 37 * i % 130))
            .collect();
        let data: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, &(n, k, m))| (random(n * k, 50 + i as u64), random(m * k, 80 + i as u64)))
            .collect();
        let want: Vec<Vec<u32>> = cases
            .iter()
            .zip(&data)
            .map(|(&(n, k, m), (x, w))| bits(&super::super::avx512::xwt(cpu, x, n, k, w, m)))
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for _ in 0..3 {
            let got: Vec<Vec<u32>> = pool.install(|| {
                cases
                    .par_iter()
                    .zip(&data)
                    .map(|(&(n, k, m), (x, w))| bits(&super::xwt(cpu, x, n, k, w, m)))
                    .collect()
            });
            assert_eq!(got, want);
        }
    }

    #[test]
    fn aligned_buffers_start_on_64_bytes_and_keep_their_length() {
        let mut a = super::Aligned::default();
        for len in [0usize, 1, 15, 16, 17, 1000, 3] {
            let s = a.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % 64, 0, "len {len}");
        }
    }
}
