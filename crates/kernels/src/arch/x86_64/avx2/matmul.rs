//! A hand-written AVX2 + FMA kernel for `x · Wᵀ` that reads bf16 / f16 weights directly.
//!
//! Why: `gemm`'s f32 kernel needs f32 operands, so bf16 weights had to be converted into a buffer
//! and then packed again by `gemm` — two extra passes over every weight for each call, which
//! dominated decode steps (few tokens per expert) in the profile. Here each weight row is widened
//! in registers as it is loaded (bf16: zero-extend and shift; f16: `vcvtph2ps`).
//!
//! The arithmetic (what [`super::xwt_reference`] spells out): per k block of `KC`, eight f32
//! lanes per output, lane `l` accumulating the products of `k ≡ l (mod 8)` by FMA in k order, a
//! fixed-order horizontal sum ([`hsum`]), the scalar tail (`k % 8` elements of the last block,
//! separate products and sums), and the block sums added to the output in k-block order. Every
//! output element is computed the same way whatever `n`, the register block it falls in, the
//! panel or the thread count (deterministic, batch-invariant).
//!
//! Shape (session 13; the session-2 kernel is kept in `benches/matmul/avx2_s2.rs` for A/B):
//! - the activations are copied (f32) or widened (bf16, f16) once per call into a 64-byte-aligned
//!   buffer kept by the calling thread, rows `stride` f32 apart (a multiple of 16 plus 16, so that
//!   rows 8 KiB apart do not all fall into the same L1 sets);
//! - rayon tasks of `PANEL` weight rows; from `WIDEN_MIN_TOKENS` tokens on, each panel of bf16 /
//!   f16 weights is widened to f32 into an aligned per-thread buffer by the first token block of
//!   every k block, eight columns at a time just before its FMAs, and read from there by the other
//!   token blocks (below it, and for f32 weights, every block reads the weights in place);
//! - register blocks of `rows_for(NT)` weight rows × `NT ≤ 4` tokens: 3 × 4, 4 × 3, 6 × 2, 8 × 1
//!   (at least eight independent accumulators, so that the FMA latency is hidden, within the 16
//!   ymm registers).

use super::{Aligned, Elem, ElemKind, OutPtr};
use crate::cpu::Avx2Fma;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Tokens per register block at most.
const TOKS: usize = 4;
/// Weight rows per rayon task (a multiple of every `rows_for`): 48 rows of 2048 f32 = 384 KiB,
/// inside this machine's 512 KiB L2.
const PANEL: usize = 48;
/// k block (multiple of 8): the partial sums of the blocks are added in order.
pub(super) const KC: usize = 1024;
/// From this many tokens on, a bf16 / f16 weight panel is widened to f32 (by the first token
/// block, interleaved with its FMAs) and the other token blocks read it there.
pub(super) const WIDEN_MIN_TOKENS: usize = 17;
/// Activations up to this many f32 (8 MiB) stay allocated per calling thread.
const KEEP: usize = 1 << 21;
/// Tokens per rayon task of the activation copy (several tasks per thread for large calls).
const SPLIT_TOKENS: usize = 64;

/// Weight rows of a register block of `nt` tokens: 12 accumulators from 2 tokens on, 8 for one
/// token (the operands of the smaller side stay in registers, the other side is streamed).
const fn rows_for(nt: usize) -> usize {
    match nt {
        1 => 8,
        2 => 6,
        3 => 4,
        _ => 3,
    }
}

/// Row stride (f32) of the aligned activation and panel buffers: whole 64-byte lines, and not a
/// multiple of 4 KiB when k is one (rows 8 KiB apart map to the same L1 sets).
fn stride_of(k: usize) -> usize {
    k.next_multiple_of(16) + 16
}

thread_local! {
    /// The aligned activations of the calling thread.
    static XS: RefCell<Aligned> = RefCell::new(Aligned::default());
    /// The widened-panel buffer of a rayon worker.
    static PANEL_BUF: RefCell<Aligned> = RefCell::new(Aligned::default());
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` with activations of type `X` (f32, or the weights' type)
/// and weights of type `T`.
pub(super) fn xwt<X: Elem, T: Elem>(
    cpu: Avx2Fma,
    x: &[X],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 || k == 0 {
        return y;
    }
    let stride = stride_of(k);
    let xs_len = n.checked_mul(stride);
    assert!(xs_len.is_some(), "xwt: activation size overflows");
    let xs_len = xs_len.unwrap_or(0);
    // A nested call on the same thread (rayon work stealing while this one waits for its
    // tasks) gets a fresh buffer.
    XS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut keep) if xs_len <= KEEP => compute(cpu, &mut keep, x, n, k, w, m, &mut y),
        _ => compute(cpu, &mut Aligned::default(), x, n, k, w, m, &mut y),
    });
    y
}

/// [`xwt`] into `y` (n × m zeros; n, m, k > 0) with `xs_buf` for the aligned activations.
#[allow(clippy::too_many_arguments)]
fn compute<X: Elem, T: Elem>(
    _: Avx2Fma,
    xs_buf: &mut Aligned,
    x: &[X],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
    y: &mut [f32],
) {
    let stride = stride_of(k);
    let xs = xs_buf.get(n * stride);
    let copy = |t0: usize, chunk: &mut [f32]| {
        let t1 = t0 + chunk.len() / stride;
        // SAFETY: the `Avx2Fma` token exists only on CPUs with AVX2, FMA and F16C; x holds
        // n·k ≥ t1·k elements (asserted in `xwt`), `chunk` (t1 − t0)·stride f32.
        unsafe { widen_rows(x, k, t0, t1, chunk, stride) };
    };
    if n > SPLIT_TOKENS {
        xs.par_chunks_mut(SPLIT_TOKENS * stride)
            .enumerate()
            .for_each(|(c, chunk)| copy(c * SPLIT_TOKENS, chunk));
    } else {
        copy(0, xs);
    }
    let xs: &[f32] = xs;
    let out = OutPtr(y.as_mut_ptr());
    let widen = n >= WIDEN_MIN_TOKENS && T::KIND != ElemKind::F32;
    (0..m.div_ceil(PANEL)).into_par_iter().for_each(|p| {
        let r0 = p * PANEL;
        let r1 = (r0 + PANEL).min(m);
        let wp = &w[r0 * k..r1 * k];
        let run = |wbuf: &mut Aligned| {
            let wf = wbuf.get((r1 - r0) * stride);
            // SAFETY: as above for the CPU; `xs` holds the n tokens' rows (stride f32 apart
            // from a 64-byte boundary), `wp` the panel's r1 − r0 weight rows, `wf`
            // (r1 − r0)·stride f32 from a 64-byte boundary; y (n × m, alive until the loop
            // ends) is written by this task in columns r0..r1 only.
            unsafe { panel::<T, true>(xs, n, k, wp, wf.as_mut_ptr(), m, r0, r1, out.get()) }
        };
        if widen {
            PANEL_BUF.with(|cell| match cell.try_borrow_mut() {
                Ok(mut b) => run(&mut b),
                Err(_) => run(&mut Aligned::default()),
            });
        } else {
            // SAFETY: as in `run` (without a panel buffer: `WIDEN` false never touches it).
            unsafe { panel::<T, false>(xs, n, k, wp, std::ptr::null_mut(), m, r0, r1, out.get()) }
        }
    });
}

/// Rows `t0..t1` of `x` (length `k`) into `buf` as f32 (exact), `stride` apart.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `x.len() >= t1 * k`, `buf.len() >= (t1 - t0) * stride`,
/// `stride >= k`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_rows<X: Elem>(
    x: &[X],
    k: usize,
    t0: usize,
    t1: usize,
    buf: &mut [f32],
    stride: usize,
) {
    let k8 = k / 8 * 8;
    for (i, t) in (t0..t1).enumerate() {
        let src = &x[t * k..(t + 1) * k];
        let dst = &mut buf[i * stride..i * stride + k];
        let mut q = 0;
        while q < k8 {
            // SAFETY: q + 8 ≤ k8 ≤ k: 8 values of `src` and 8 f32 of `dst` from q; the caller
            // guarantees the CPU features.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(q), load8(src.as_ptr().add(q))) };
            q += 8;
        }
        for q in k8..k {
            dst[q] = src[q].to_f32();
        }
    }
}

/// Output columns `r0..r1` of y from the aligned activations `xs` and the panel's weight rows
/// `w` (rows `r0..r1` of W). With `WIDEN`, the weights are widened into `wf` by the first token
/// block of every k block and read there by the others.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `xs` must hold tokens `0..n` (`stride_of(k)` f32
/// apart), `w.len() == (r1 - r0) * k`, with `WIDEN` `wf` must point to `(r1 - r0) ·
/// stride_of(k)` writable f32, `r1 <= m`, and `y` must point to `n * m` writable f32 that no
/// other thread accesses in columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel<T: Elem, const WIDEN: bool>(
    xs: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    wf: *mut f32,
    m: usize,
    r0: usize,
    r1: usize,
    y: *mut f32,
) {
    let rows = r1 - r0;
    let blk = |i: usize, t: usize, k0: usize| Blk {
        k,
        stride: stride_of(k),
        m,
        r0,
        i,
        t,
        k0,
        k1: (k0 + KC).min(k),
    };
    if n <= TOKS {
        // One token block: row blocks outside, k blocks inside, so that the weights are read
        // in memory order (a row block is contiguous) and the prefetches of the next row block
        // run ahead of it.
        let nr = rows_for(n);
        let mut i = 0;
        while i < rows {
            let i1 = (i + nr).min(rows);
            let mut k0 = 0;
            while k0 < k {
                let b = blk(i, 0, k0);
                // SAFETY: tokens 0..n, rows i..i1 ≤ rows of the panel, k0..k1 ≤ k: this
                // function's contract covers the row loop.
                unsafe {
                    match n {
                        4 => rows_loop::<T, 4>(xs, w, wf, y, i1, Mode::Direct, b),
                        3 => rows_loop::<T, 3>(xs, w, wf, y, i1, Mode::Direct, b),
                        2 => rows_loop::<T, 2>(xs, w, wf, y, i1, Mode::Direct, b),
                        _ => rows_loop::<T, 1>(xs, w, wf, y, i1, Mode::Direct, b),
                    }
                }
                k0 += KC;
            }
            i = i1;
        }
        return;
    }
    let mut k0 = 0;
    while k0 < k {
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(TOKS);
            let mode = match (WIDEN, t) {
                (false, _) => Mode::Direct,
                (true, 0) => Mode::Widen,
                (true, _) => Mode::Buffer,
            };
            let b = blk(0, t, k0);
            // SAFETY: tokens t..t + nt ≤ n, rows 0..rows of the panel, k0..k1 ≤ k: this
            // function's contract covers the row loop.
            unsafe {
                match nt {
                    4 => rows_loop::<T, 4>(xs, w, wf, y, rows, mode, b),
                    3 => rows_loop::<T, 3>(xs, w, wf, y, rows, mode, b),
                    2 => rows_loop::<T, 2>(xs, w, wf, y, rows, mode, b),
                    _ => rows_loop::<T, 1>(xs, w, wf, y, rows, mode, b),
                }
            }
            t += nt;
        }
        k0 += KC;
    }
}

/// Where the weights of a register block come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Read (and widened in registers) from the weight rows.
    Direct,
    /// As `Direct`, and stored widened into the panel buffer.
    Widen,
    /// Read from the panel buffer (widened by an earlier block).
    Buffer,
}

/// Panel rows `b.i..end` for tokens `b.t..b.t + NT`: blocks of `rows_for(NT)` rows, the
/// remaining rows one at a time.
///
/// # Safety
/// As [`panel`], for these tokens and rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn rows_loop<T: Elem, const NT: usize>(
    xs: &[f32],
    w: &[T],
    wf: *mut f32,
    y: *mut f32,
    end: usize,
    mode: Mode,
    b: Blk,
) {
    const { assert!(rows_for(1) == 8 && rows_for(2) == 6 && rows_for(3) == 4) };
    let nr = rows_for(NT);
    let mut i = b.i;
    // SAFETY: every block covers rows i..i + NR ≤ end and the tokens and k range of `b`:
    // inside the caller's contract.
    unsafe {
        while i + nr <= end {
            let b = Blk { i, ..b };
            match (NT, mode) {
                (1, Mode::Direct) => block::<T, 8, NT, 0>(xs, w, wf, y, b),
                (1, Mode::Widen) => block::<T, 8, NT, 1>(xs, w, wf, y, b),
                (1, Mode::Buffer) => block::<T, 8, NT, 2>(xs, w, wf, y, b),
                (2, Mode::Direct) => block::<T, 6, NT, 0>(xs, w, wf, y, b),
                (2, Mode::Widen) => block::<T, 6, NT, 1>(xs, w, wf, y, b),
                (2, Mode::Buffer) => block::<T, 6, NT, 2>(xs, w, wf, y, b),
                (3, Mode::Direct) => block::<T, 4, NT, 0>(xs, w, wf, y, b),
                (3, Mode::Widen) => block::<T, 4, NT, 1>(xs, w, wf, y, b),
                (3, Mode::Buffer) => block::<T, 4, NT, 2>(xs, w, wf, y, b),
                (_, Mode::Direct) => block::<T, 3, NT, 0>(xs, w, wf, y, b),
                (_, Mode::Widen) => block::<T, 3, NT, 1>(xs, w, wf, y, b),
                (_, Mode::Buffer) => block::<T, 3, NT, 2>(xs, w, wf, y, b),
            }
            i += nr;
        }
        while i < end {
            let b = Blk { i, ..b };
            match mode {
                Mode::Direct => block::<T, 1, NT, 0>(xs, w, wf, y, b),
                Mode::Widen => block::<T, 1, NT, 1>(xs, w, wf, y, b),
                Mode::Buffer => block::<T, 1, NT, 2>(xs, w, wf, y, b),
            }
            i += 1;
        }
    }
}

/// Where a register block sits: panel rows from `i` (output columns from `r0 + i`; `k` elements
/// apart in the weights, `stride` f32 apart in the panel buffer), tokens from `t` (`stride` f32
/// apart), the k range `k0..k1` (KC-aligned; only the last one may end in a non-multiple of 8).
#[derive(Clone, Copy)]
struct Blk {
    k: usize,
    stride: usize,
    m: usize,
    r0: usize,
    i: usize,
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

/// One register block: `NR` panel rows × `NT` tokens over the k range of `b`. `MODE` 0: the
/// weights read from `w` (widened in registers), 1: the same and stored into `wf`, 2: read from
/// `wf`. The operands of the smaller side are loaded once per group of eight columns, the other
/// side's once per FMA row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `xs` must hold tokens `t..t + NT` (`stride` apart), `w`
/// panel rows `i..i + NR` (length k each); for `MODE` 1 and 2 `wf` must point to the panel
/// buffer (rows `stride` apart; columns `k0..k8` of these rows written by an earlier `MODE` 1
/// block for `MODE` 2), and `y` must point to `n * m` writable f32 with
/// `(t + NT - 1) * m + r0 + i + NR <= n * m` that no other thread accesses there.
#[inline(always)]
unsafe fn block<T: Elem, const NR: usize, const NT: usize, const MODE: u8>(
    xs: &[f32],
    w: &[T],
    wf: *mut f32,
    y: *mut f32,
    b: Blk,
) {
    // SAFETY: the caller's contract: all vector reads stay inside rows of xs, w and wf
    // (kk + 8 ≤ k8 ≤ k ≤ stride), the writes inside wf's rows and y's block; the CPU has the
    // features.
    unsafe {
        let Blk {
            k,
            stride,
            m,
            r0,
            i: ri,
            t,
            k0,
            k1,
        } = b;
        let mut acc = [[_mm256_setzero_ps(); NR]; NT];
        let wp = w.as_ptr().add(ri * k);
        // Never dereferenced in MODE 0 (where wf may be null).
        let wo = wf.wrapping_add(ri * stride);
        let xo = xs.as_ptr().add(t * stride);
        let k8 = k0 + (k1 - k0) / 8 * 8;
        let mut kk = k0;
        while kk < k8 {
            if NT >= 3 && MODE != 2 && t == 0 && (kk - k0) % 32 == 0 {
                // A hint only (never faults, even past the panel): the same 64 bytes of the
                // rows of the next row block, into L2, while the first token block streams this
                // one (the weights come from L3 or memory once per call). Measured
                // (`--bench matmul -- avx2`, weights from memory): 1.1–1.4× at 4 tokens; in
                // the blocks of 6 and 8 rows (1–2 tokens) it cost up to 30 % with the weights
                // in L3 and gained little from memory, so they leave it to the hardware.
                for i in 0..NR {
                    _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add((NR + i) * k + kk).cast::<i8>());
                }
            }
            if NR <= NT {
                let mut wv = [_mm256_setzero_ps(); NR];
                for (i, v) in wv.iter_mut().enumerate() {
                    *v = wload::<T, MODE>(
                        wp.add(i * k + kk),
                        wo.wrapping_add(i * stride + kk),
                        NT == 1,
                    );
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_load_ps(xo.add(j * stride + kk));
                    for (i, v) in wv.iter().enumerate() {
                        a[i] = _mm256_fmadd_ps(xv, *v, a[i]);
                    }
                }
            } else {
                let mut xv = [_mm256_setzero_ps(); NT];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_load_ps(xo.add(j * stride + kk));
                }
                for i in 0..NR {
                    let wv = wload::<T, MODE>(
                        wp.add(i * k + kk),
                        wo.wrapping_add(i * stride + kk),
                        NT == 1,
                    );
                    for (j, a) in acc.iter_mut().enumerate() {
                        a[i] = _mm256_fmadd_ps(xv[j], wv, a[i]);
                    }
                }
            }
            kk += 8;
        }
        for (j, a) in acc.iter().enumerate() {
            for (i, v) in a.iter().enumerate() {
                let mut s = hsum(*v);
                for q in k8..k1 {
                    s += *xo.add(j * stride + q) * (*wp.add(i * k + q)).to_f32();
                }
                let out = y.add((t + j) * m + r0 + ri + i);
                *out = if k0 == 0 { s } else { *out + s };
            }
        }
    }
}

/// Eight weights of a block as f32: `MODE` 2 from the panel buffer at `wo`; otherwise from `wp`
/// (widened in registers; by [`load8_shuffled`] if `shuffled`), with `MODE` 1 also stored at
/// `wo`.
///
/// # Safety
/// The CPU must have AVX2 and F16C; `wp` must point to 8 readable values unless `MODE` is 2;
/// `wo` to 8 readable (`MODE` 2) or writable (`MODE` 1) f32 on a 32-byte boundary.
#[inline(always)]
unsafe fn wload<T: Elem, const MODE: u8>(wp: *const T, wo: *mut f32, shuffled: bool) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        if MODE == 2 {
            _mm256_load_ps(wo)
        } else {
            let v = if shuffled {
                load8_shuffled(wp)
            } else {
                load8(wp)
            };
            if MODE == 1 {
                _mm256_store_ps(wo, v);
            }
            v
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

/// [`load8`] with bf16 widened by a broadcast load and one byte shuffle (the values in the high 16
/// bits of the f32 lanes, zeros below: the same f32): one ALU operation instead of two, faster
/// where the weights are streamed past one token (8 rows × 1 token blocks), slower in the blocks
/// that hold three rows in registers (the shuffle control takes a register).
///
/// # Safety
/// As [`load8`].
#[inline(always)]
unsafe fn load8_shuffled<T: Elem>(p: *const T) -> __m256 {
    // SAFETY: as in `load8`.
    unsafe {
        match T::KIND {
            ElemKind::Bf16 => {
                // The 8 values in both 128-bit halves (a load, no ALU operation), then one byte
                // shuffle puts values 0–3 (low half) and 4–7 (high half) into the high 16 bits
                // of the f32 lanes, zeros below: one ALU operation instead of a zero-extension
                // and a shift.
                let h = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
                let z = -128i8;
                let ctl = _mm256_setr_epi8(
                    z, z, 0, 1, z, z, 2, 3, z, z, 4, 5, z, z, 6, 7, //
                    z, z, 8, 9, z, z, 10, 11, z, z, 12, 13, z, z, 14, 15,
                );
                _mm256_castsi256_ps(_mm256_shuffle_epi8(h, ctl))
            }
            _ => load8(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::Cpu;
    use crate::matmul::{xwt_reference, Elem};
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every register block shape (1–4 tokens × all their row counts and the one-row rest), token
    /// counts on both sides of `WIDEN_MIN_TOKENS`, ragged last panels, k below 8, with a tail,
    /// at KC − 1, KC, KC + 1 and over several k blocks with a tail; activations in f32 and in the
    /// weights' type.
    fn check_shapes<T: Elem>(narrow: impl Fn(&[f32]) -> Vec<T>) {
        let Some(cpu) = Cpu::get().avx2_fma() else {
            eprintln!("skipped: this CPU has no AVX2 + FMA + F16C");
            return;
        };
        let kc = super::KC;
        let ks = [3usize, 8, 13, 300, kc - 1, kc, kc + 1, 2 * kc + 3];
        let ms = [1usize, 7, 13, super::PANEL + 11, 2 * super::PANEL + 5];
        let wm = super::WIDEN_MIN_TOKENS;
        let ns = [
            1usize,
            2,
            3,
            4,
            5,
            6,
            7,
            wm - 1,
            wm,
            wm + 1,
            wm + 5,
            2 * wm + 3,
        ];
        for (c, &k) in ks.iter().enumerate() {
            // Fewer (n, m) pairs for the long rows, every pair for the short ones.
            for (d, &m) in ms.iter().enumerate() {
                for &n in &ns {
                    if k > 300 && (n + d) % 3 != 0 {
                        continue;
                    }
                    // f32 activations with all their bits (products inexact: the unfused
                    // tail and the FMAs differ), and activations of the weights' type.
                    let xf = random(n * k, 1000 + n as u64);
                    let w = narrow(&random(m * k, 2000 + (10 * c + d) as u64));
                    let want = bits(&xwt_reference(&xf, n, k, &w, m));
                    let got = super::xwt(cpu, &xf, n, k, &w, m);
                    assert_eq!(bits(&got), want, "{:?} f32 x, n {n} k {k} m {m}", T::KIND);
                    let xt = T::narrow(&xf);
                    let xtf: Vec<f32> = xt.iter().map(|v| v.to_f32()).collect();
                    let want = bits(&xwt_reference(&xtf, n, k, &w, m));
                    let got = super::xwt(cpu, &xt, n, k, &w, m);
                    assert_eq!(bits(&got), want, "{:?} same x, n {n} k {k} m {m}", T::KIND);
                }
            }
        }
        // No k: zeros.
        let z = super::xwt::<f32, T>(cpu, &[], 5, 0, &[], 9);
        assert!(z.len() == 45 && z.iter().all(|v| v.to_bits() == 0));
        assert!(super::xwt::<f32, T>(cpu, &[], 0, 4, &narrow(&[0.5; 12]), 3).is_empty());
    }

    #[test]
    fn every_block_shape_matches_the_reference_bf16() {
        check_shapes::<bf16>(bf16::narrow);
    }

    #[test]
    fn every_block_shape_matches_the_reference_f16() {
        check_shapes::<f16>(f16::narrow);
    }

    #[test]
    fn every_block_shape_matches_the_reference_f32() {
        check_shapes::<f32>(|v| v.to_vec());
    }

    #[test]
    fn thread_counts_and_batches_give_the_same_bits() {
        let Some(cpu) = Cpu::get().avx2_fma() else {
            eprintln!("skipped: this CPU has no AVX2 + FMA + F16C");
            return;
        };
        // Several panels with a ragged last one, the widened path, a k tail over two k blocks,
        // more tokens than one activation-copy task.
        let (n, k, m) = (
            super::SPLIT_TOKENS + 9,
            super::KC + 37,
            3 * super::PANEL + 17,
        );
        let x = bf16::narrow(&random(n * k, 51));
        let w = bf16::narrow(&random(m * k, 52));
        let all = super::xwt(cpu, &x, n, k, &w, m);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| super::xwt(cpu, &x, n, k, &w, m));
            assert_eq!(bits(&got), bits(&all), "{threads} threads");
        }
        // A token's result does not depend on the other tokens of its call (widened or not).
        for (t0, t1) in [(0, 1), (3, 5), (7, 7 + super::WIDEN_MIN_TOKENS), (n - 4, n)] {
            let part = super::xwt(cpu, &x[t0 * k..t1 * k], t1 - t0, k, &w, m);
            assert_eq!(bits(&part), bits(&all[t0 * m..t1 * m]), "tokens {t0}..{t1}");
        }
        let mut xf = vec![0f32; n * k];
        bf16::widen(&x, &mut xf);
        assert_eq!(bits(&xwt_reference(&xf, n, k, &w, m)), bits(&all));
    }

    #[test]
    fn concurrent_and_nested_calls_reuse_buffers_safely() {
        use rayon::prelude::*;
        let Some(cpu) = Cpu::get().avx2_fma() else {
            eprintln!("skipped: this CPU has no AVX2 + FMA + F16C");
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
            .map(|(i, &(n, k, m))| {
                (
                    bf16::narrow(&random(n * k, 60 + i as u64)),
                    bf16::narrow(&random(m * k, 90 + i as u64)),
                )
            })
            .collect();
        let want: Vec<Vec<u32>> = cases
            .iter()
            .zip(&data)
            .map(|(&(n, k, m), (x, w))| {
                let mut xf = vec![0f32; n * k];
                bf16::widen(x, &mut xf);
                bits(&xwt_reference(&xf, n, k, w, m))
            })
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
    fn aligned_buffers_start_on_64_bytes_and_strides_avoid_4k() {
        let mut a = super::Aligned::default();
        for len in [0usize, 1, 15, 16, 17, 1000, 3] {
            let s = a.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % 64, 0, "len {len}");
        }
        for k in [1usize, 7, 8, 1024, 2048, 2051] {
            let s = super::stride_of(k);
            assert!(
                s >= k && s.is_multiple_of(16) && !(s * 4).is_multiple_of(4096),
                "k {k}"
            );
        }
    }
}
