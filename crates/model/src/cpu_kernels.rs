//! CPU kernels for the two hot spots of the forward pass: `y = x · Wᵀ` for bf16 / f16 tensors
//! (converting the weight panel by panel) and the whole MoE expert block ([`MoeAccumulator`]).
//!
//! Why hand-written: candle 0.11's CPU matmul has no bf16 / f16 kernel. It widens *both whole
//! operands* to freshly allocated f32 vectors on every call, multiplies them with `gemm`'s f32
//! kernel and narrows the result back. For a weight matrix used by a handful of tokens (an expert
//! in a decode step) that means writing 2× the weight's size in new f32 memory (page faults,
//! zeroing) for a few multiply-adds; it made decoding on the full OLMoE shape ~10× slower than
//! memory bandwidth allows (profile in `docs/performance.md`). No maintained crate offers a
//! bf16-weight × f32-activation GEMM on CPU that plugs into candle, so this module does the
//! narrowest thing: it converts the activations once, then walks the weight in panels of rows,
//! converts each panel into a small per-thread f32 buffer (it stays in L2) and hands it to the
//! same `gemm` f32 kernel candle uses. The numerics are candle's: bf16 operands widened exactly
//! to f32, f32 accumulation, one rounding of the result to bf16 / f16 (what torch's CPU bf16
//! matmul does too).
//!
//! Panels are split across rayon's threads by output column, so every output element is computed
//! by one thread with the same accumulation order whatever the thread count (deterministic).
//!
//! `matmul_t` is a candle [`CustomOp2`]: on CUDA / Metal callers get candle's matmul. f32 goes
//! through the same kernel, which makes every token's result independent of the batch it is in
//! (`gemm`'s summation order can depend on the matrix sizes).
//!
//! [`MoeAccumulator`] runs the SwiGLU experts of one layer on raw CPU slices with f32 work
//! buffers, rounding to the compute dtype at exactly the points where transformers' bf16 ops
//! round (each matmul output, `silu`, the `silu · up` product, the routing-weight product and
//! every `index_add_` in expert order), so it is op for op the candle code it replaced while
//! skipping ~12 tensor ops and their allocations per expert and step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use crate::weights::MappedTensor;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// `x [.., k] · w [m, k]ᵀ → [.., m]`, computed by [`MatmulT`] when both have the same dtype (bf16,
/// f16 or f32) on the CPU, by candle's matmul otherwise. On the CPU each output row is computed the
/// same way whatever the other rows are, so a token's result does not depend on its batch.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let fast = x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && w.rank() == 2;
    if fast {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        x.apply_op2_no_bwd(&w, &MatmulT)
    } else if x.rank() > 2 {
        x.broadcast_matmul(&w.t()?)
    } else {
        x.matmul(&w.t()?)
    }
}

/// The custom op behind [`matmul_t`] (CPU only).
pub(crate) struct MatmulT;

/// Elements of one f32 weight panel: 128 Ki f32 = 512 KiB, half of this machine's L2 per core.
const PANEL_ELEMS: usize = 128 * 1024;

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "moe-xray-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xd = l1.dims();
        let wd = l2.dims();
        if xd.is_empty() || wd.len() != 2 || xd[xd.len() - 1] != wd[1] {
            candle_core::bail!(
                "matmul_t: shapes {xd:?} and {wd:?} do not match (x [.., k], w [m, k])"
            );
        }
        let k = wd[1];
        let m = wd[0];
        let n = l1.shape().elem_count() / k.max(1);
        let (Some((xs, xe)), Some((ws, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("matmul_t: operands must be contiguous");
        };
        let mut out_dims = xd.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = m;
        let shape = Shape::from(out_dims);
        fn run<T: Elem>(x: &[T], w: &[T], n: usize, k: usize, m: usize) -> CpuStorage {
            let mut xf = vec![0f32; x.len()];
            T::widen(x, &mut xf);
            T::to_cpu_storage_owned(T::narrow(&xwt(&xf, n, k, w, m)))
        }
        let (xr, wr) = (xs..xe, ws..ws + m * k);
        let storage = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => run(&x[xr], &w[wr], n, k, m),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => run(&x[xr], &w[wr], n, k, m),
            (CpuStorage::F32(x), CpuStorage::F32(w)) => run(&x[xr], &w[wr], n, k, m),
            _ => candle_core::bail!(
                "matmul_t: unsupported dtypes {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage, shape))
    }
}

/// A raw output pointer shared by the panel tasks; each task writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` with f32 `x` and weights of type `T`: the AVX2 + FMA kernel
/// below for bf16 / f16 weights where the CPU has it, else panels converted for `gemm`.
pub fn xwt<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    xwt_with(Kernel::Auto, x, n, k, w, m)
}

/// Which implementation [`xwt_with`] uses (for benchmarks; the model always uses `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX2 when the CPU has it, else `Gemm`.
    Auto,
    /// The hand-written AVX2 + FMA kernel (falls back to `Gemm` where unavailable).
    Avx2,
    /// Weight panels widened to f32 and multiplied by the `gemm` crate.
    Gemm,
}

/// [`xwt`] with a chosen kernel.
pub fn xwt_with<T: Elem>(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Gemm && avx2::available() {
        return avx2::xwt(x, n, k, w, m);
    }
    let _ = kernel;
    gemm_t(x, n, k, m, |rows, buf| {
        T::widen(&w[rows.start * k..rows.end * k], buf)
    })
}

/// A hand-written AVX2 + FMA kernel for `x · Wᵀ` that reads bf16 / f16 weights directly.
///
/// Why: `gemm`'s f32 kernel needs f32 operands, so bf16 weights had to be converted into a buffer
/// and then packed again by `gemm` — two extra passes over every weight for each call, which
/// dominated decode steps (few tokens per expert) in the profile. Here each weight row is widened
/// in registers as it is loaded (bf16: zero-extend and shift; f16: `vcvtph2ps`).
///
/// Shape: blocks of 3 weight rows × 4 tokens, 12 accumulators of 8 lanes over a k block of
/// `KC`, then a fixed-order horizontal sum (plus a scalar tail for `k % 8` in the last block)
/// added to the output in k-block order. Every output element is computed the same way whatever
/// `n`, the block it falls in or the thread count (deterministic).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Elem, OutPtr};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    const ROWS: usize = 3;
    const TOKS: usize = 4;
    /// Weight rows per rayon task: 48 rows of 2048 bf16 = 192 KiB, well inside L2.
    const PANEL: usize = 48;
    /// k block (multiple of 8).
    const KC: usize = 1024;
    /// From this many tokens on, a weight panel is widened to f32 once instead of in registers by
    /// every token block (fewer instructions per FMA; below it, the extra pass over memory costs
    /// more than it saves: `cargo bench --bench kernels`).
    const WIDEN_MIN_TOKENS: usize = 16;

    pub(super) fn xwt<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
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
                // SAFETY: AVX2 and FMA were detected; indices stay inside x, w, buf and y
                // (asserted sizes); this task writes only columns r0..r1.
                unsafe {
                    if n > WIDEN_MIN_TOKENS && T::DTYPE != candle_core::DType::F32 {
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

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn block<T: Elem, const NR: usize, const NT: usize>(
        x: &[f32],
        w: &[T],
        y: *mut f32,
        b: Blk,
    ) {
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
                *v = T::load8(wp.add((wr + i) * k + kk));
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

/// `y [n, m] = x [n, k] · Wᵀ` where `load(rows, buf)` writes rows `rows` of W (each `k` long) as
/// f32 into `buf`.
fn gemm_t<F>(x: &[f32], n: usize, k: usize, m: usize, load: F) -> Vec<f32>
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    if k == 0 {
        return y;
    }
    // Panel height: as many weight rows as fit PANEL_ELEMS, a multiple of 16, at least 16.
    let panel = ((PANEL_ELEMS / k).max(16) / 16 * 16).min(m.next_multiple_of(16));
    let n_panels = m.div_ceil(panel);
    let out = OutPtr(y.as_mut_ptr());
    let xp = x.as_ptr() as usize;
    (0..n_panels).into_par_iter().for_each_init(
        || vec![0f32; panel * k],
        |buf, p| {
            let r0 = p * panel;
            let r1 = (r0 + panel).min(m);
            let rows = r1 - r0;
            let b = &mut buf[..rows * k];
            load(r0..r1, b);
            // SAFETY: dst covers columns r0..r1 of every row of y (row stride m), disjoint from
            // the other tasks'; lhs is x [n, k] row-major; rhs is the panel viewed as a k × rows
            // matrix (element (kk, j) at b[j * k + kk]).
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    out.get().add(r0),
                    1,
                    m as isize,
                    false,
                    xp as *const f32,
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    y
}

/// Element types of the CPU kernels: bf16, f16 and f32.
pub trait Elem: candle_core::WithDType {
    /// One value as f32.
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive values as f32 lanes.
    ///
    /// # Safety
    /// `p` must point to 8 readable values and the CPU must have AVX2 (and F16C for f16).
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds an f32 to this type and back (identity for f32).
    fn round(x: f32) -> f32;
    /// Narrows f32 values to this type (round to nearest even).
    fn narrow(src: &[f32]) -> Vec<Self>;
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the upper half of an f32: zero-extend to 32 bits and shift left by 16.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn round(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        let mut o = vec![bf16::ZERO; src.len()];
        o.convert_from_f32_slice(src);
        o
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        let mut o = vec![f16::ZERO; src.len()];
        o.convert_from_f32_slice(src);
        o
    }
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn round(x: f32) -> f32 {
        x
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        src.to_vec()
    }
}

/// Runs `f` on the contiguous CPU slice of `t` (element type `T`).
fn with_slice<T: Elem, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cpu kernel called on a non-CPU tensor");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("cpu kernel: tensor is not contiguous");
    };
    f(&T::cpu_storage_as_slice(cpu)?[a..b])
}

/// Where an expert weight matrix is read from: a candle tensor, or elements `offset..offset + len`
/// of a tensor left in the memory-mapped checkpoint.
pub(crate) enum WSrc<'a> {
    Tensor(&'a Tensor),
    Mapped(&'a MappedTensor, usize, usize),
}

/// Runs `f` on the elements of `src` (element type `T`).
fn with_src<T: Elem, R>(
    src: &WSrc<'_>,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match src {
        WSrc::Tensor(t) => with_slice::<T, _>(t, f),
        WSrc::Mapped(m, offset, len) => {
            let bytes = m.bytes();
            let size = std::mem::size_of::<T>();
            if m.dtype != T::DTYPE
                || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
                || (offset + len) * size > bytes.len()
            {
                candle_core::bail!(
                    "cpu kernel: mapped weight {:?} {:?} does not fit",
                    m.dtype,
                    m.shape
                );
            }
            // SAFETY: dtype, alignment and length were checked; bf16 / f16 / f32 have no invalid
            // bit patterns; the mapping is read-only and outlives the borrow.
            let all = unsafe {
                std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size)
            };
            f(&all[*offset..offset + len])
        }
    }
}

/// The MoE block of one layer on the CPU: `Σ_e w_e · down_e(silu(gate_e(x)) · up_e(x))` over
/// each token's selected experts, accumulated in expert-index order.
///
/// Rounding points (identity for f32), as transformers' `OlmoeExperts` in bf16 / f16: the gate
/// and up projections, `silu` (evaluated in f32), the product `silu · up`, the down projection,
/// the product with the routing weight (itself rounded to the compute dtype) and each
/// accumulation into the output.
pub(crate) struct MoeAccumulator {
    dtype: DType,
    hidden: usize,
    inter: usize,
    /// The layer input widened to f32, `[n_tok, hidden]`.
    x: Vec<f32>,
    /// The output so far, `[n_tok, hidden]`; every value representable in `dtype`.
    acc: Vec<f32>,
}

impl MoeAccumulator {
    /// Whether the kernels serve this tensor (CPU, bf16 / f16 / f32).
    pub(crate) fn supports(h: &Tensor) -> bool {
        h.device().is_cpu() && matches!(h.dtype(), DType::BF16 | DType::F16 | DType::F32)
    }

    /// Starts a layer's MoE block for the input `h` `[n_tok, hidden]`.
    pub(crate) fn new(h: &Tensor, inter: usize) -> candle_core::Result<Self> {
        let (n, hidden) = h.dims2()?;
        if !matches!(h.dtype(), DType::BF16 | DType::F16 | DType::F32) {
            candle_core::bail!("MoE cpu kernel: unsupported dtype {:?}", h.dtype());
        }
        // Widening to f32 is exact.
        let x = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(MoeAccumulator {
            dtype: h.dtype(),
            hidden,
            inter,
            x,
            acc: vec![0f32; n * hidden],
        })
    }

    /// Adds one expert's contribution for the token rows `rows` with combination weights `ws`.
    /// `w = [gate, up, down]`: `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`, all in the
    /// compute dtype.
    pub(crate) fn add_expert(
        &mut self,
        rows: &[u32],
        ws: &[f32],
        w: [WSrc<'_>; 3],
    ) -> candle_core::Result<()> {
        match self.dtype {
            DType::BF16 => self.add_expert_t::<bf16>(rows, ws, w),
            DType::F16 => self.add_expert_t::<f16>(rows, ws, w),
            DType::F32 => self.add_expert_t::<f32>(rows, ws, w),
            d => candle_core::bail!("MoE cpu kernel: unsupported dtype {d:?}"),
        }
    }

    fn add_expert_t<T: Elem>(
        &mut self,
        rows: &[u32],
        ws: &[f32],
        [wg, wu, wd]: [WSrc<'_>; 3],
    ) -> candle_core::Result<()> {
        let (h, i, n) = (self.hidden, self.inter, rows.len());
        let shape_ok = |src: &WSrc<'_>, r: usize, c: usize| match src {
            WSrc::Tensor(t) => t.dims() == [r, c],
            WSrc::Mapped(_, _, len) => *len == r * c,
        };
        if !(shape_ok(&wg, i, h) && shape_ok(&wu, i, h) && shape_ok(&wd, h, i)) {
            candle_core::bail!(
                "MoE cpu kernel: expert weight shapes do not match [{i}, {h}] / [{h}, {i}]"
            );
        }
        // Token rows of one expert are distinct and ascending (each token selects an expert at
        // most once); the parallel scatter into `acc` below relies on it.
        if rows.windows(2).any(|p| p[0] >= p[1]) || rows.len() != ws.len() {
            candle_core::bail!("MoE cpu kernel: expert rows must be distinct and ascending");
        }
        if let Some(&r) = rows.last() {
            if r as usize * h + h > self.acc.len() {
                candle_core::bail!("MoE cpu kernel: token row {r} out of range");
            }
        }
        // Element-wise passes run on rayon's threads when large (prefill), else in one task.
        let min_rows = |len: usize| (1usize << 15).div_ceil(len.max(1));
        let mut xe = vec![0f32; n * h];
        xe.par_chunks_mut(h)
            .with_min_len(min_rows(h))
            .zip(rows.par_iter())
            .for_each(|(dst, &r)| {
                let r = r as usize;
                dst.copy_from_slice(&self.x[r * h..(r + 1) * h]);
            });
        let g = with_src::<T, _>(&wg, |w| Ok(xwt(&xe, n, h, w, i)))?;
        let u = with_src::<T, _>(&wu, |w| Ok(xwt(&xe, n, h, w, i)))?;
        let mut act = vec![0f32; n * i];
        act.par_chunks_mut(i)
            .with_min_len(min_rows(i))
            .zip(g.par_chunks(i))
            .zip(u.par_chunks(i))
            .for_each(|((a, g), u)| {
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    let g = T::round(g);
                    // candle's f32 silu: v / (1 + exp(-v)).
                    let s = T::round(g / (1.0 + (-g).exp()));
                    *a = T::round(s * T::round(u));
                }
            });
        let y = with_src::<T, _>(&wd, |w| Ok(xwt(&act, n, i, w, h)))?;
        let acc = OutPtr(self.acc.as_mut_ptr());
        y.par_chunks(h)
            .with_min_len(min_rows(h))
            .zip(rows.par_iter())
            .zip(ws.par_iter())
            .for_each(|((yr, &r), &w)| {
                let w = T::round(w);
                // SAFETY: rows are distinct and in range (checked above), so every task writes
                // its own row of `acc`, which outlives the loop.
                let a = unsafe { std::slice::from_raw_parts_mut(acc.get().add(r as usize * h), h) };
                for (a, &v) in a.iter_mut().zip(yr) {
                    *a = T::round(*a + T::round(T::round(v) * w));
                }
            });
        Ok(())
    }

    /// The block's output `[n_tok, hidden]` in the compute dtype.
    pub(crate) fn finish(self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let shape = (self.acc.len() / self.hidden.max(1), self.hidden);
        // Every value is representable in the compute dtype, so narrowing only changes the type.
        Tensor::from_vec(self.acc, shape, device)?.to_dtype(self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        // candle's own path: widen to f32, multiply, round once.
        x.to_dtype(DType::F32)
            .unwrap()
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
    }

    fn random(n: usize, k: usize, seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn matches_widened_f32_matmul() {
        for dtype in [DType::BF16, DType::F16] {
            // Shapes cover a single partial panel, several panels with a ragged last one, n = 1.
            for &(n, k, m) in &[
                (1, 64, 10),
                (5, 2048, 1024),
                (17, 1024, 2048),
                (3, 300, 777),
            ] {
                let x = random(n, k, 1, dtype);
                let w = random(m, k, 2, dtype);
                let got = matmul_t(&x, &w).unwrap().to_dtype(DType::F32).unwrap();
                let want = reference(&x, &w).to_dtype(DType::F32).unwrap();
                assert_eq!(got.dims(), &[n, m]);
                let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let r = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // Same f32 products; only the accumulation order may differ, so results agree
                // to one rounding of the output format.
                let ulp = if dtype == DType::BF16 {
                    1.0 / 128.0
                } else {
                    1.0 / 1024.0
                };
                for (a, b) in g.iter().zip(&r) {
                    assert!(
                        (a - b).abs() <= ulp * b.abs().max(1.0),
                        "{dtype:?} {n}x{k}x{m}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn views_and_higher_rank_inputs() {
        let x = random(6, 128, 3, DType::BF16).reshape((2, 3, 128)).unwrap();
        let w_full = random(40, 128, 4, DType::BF16);
        let w = w_full.narrow(0, 8, 16).unwrap();
        let got = matmul_t(&x, &w).unwrap();
        assert_eq!(got.dims(), &[2, 3, 16]);
        let want = reference(&x.reshape((6, 128)).unwrap(), &w)
            .reshape((2, 3, 16))
            .unwrap();
        let d = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 0.05, "max abs diff {d}");
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        for dtype in [DType::F32, DType::BF16] {
            // 37 rows cover the widened-panel path (> 16 tokens) and ragged register blocks.
            let x = random(37, 200, 7, dtype);
            let w = random(50, 200, 8, dtype);
            let all = matmul_t(&x, &w).unwrap().to_dtype(DType::F32).unwrap();
            for r in [0usize, 5, 36] {
                let one = matmul_t(&x.narrow(0, r, 1).unwrap(), &w)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                assert_eq!(
                    all.get(r).unwrap().to_vec1::<f32>().unwrap(),
                    one.get(0).unwrap().to_vec1::<f32>().unwrap(),
                    "{dtype:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_results() {
        let x = random(9, 512, 5, DType::BF16);
        let w = random(700, 512, 6, DType::BF16);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    matmul_t(&x, &w)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
