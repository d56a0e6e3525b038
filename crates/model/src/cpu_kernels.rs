//! CPU kernels for the two hot spots of the forward pass, plugged into candle: `y = x · Wᵀ` for
//! bf16 / f16 / f32 tensors ([`matmul_t`], computed by `moe_xray_kernels::matmul`) and the whole
//! MoE expert block ([`MoeAccumulator`]). The SIMD code and every `unsafe` block live in the
//! `moe-xray-kernels` crate; this file is the candle glue and the expert block's rounding logic.
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
use half::{bf16, f16};
use moe_xray_kernels::quant::{xwt_q, xwt_q_act, QActivations, QMatrix};
use rayon::prelude::*;

pub use moe_xray_kernels::matmul::{xwt, xwt_same, xwt_with, Kernel};

/// The matmul path this process takes for a model computing in `dtype` on the CPU
/// (`"avx512-bf16"`, `"avx2-fma"`, `"gemm"`; `MOE_XRAY_KERNEL` caps it), and the CPU features the
/// kernels detected, for benchmark reports. An invalid `MOE_XRAY_KERNEL` is an error.
pub fn kernel_report(dtype: DType) -> Result<(&'static str, Vec<&'static str>), String> {
    use moe_xray_kernels::matmul::{env_kernel, kernel_name, ElemKind};
    env_kernel()?;
    let kind = match dtype {
        DType::BF16 => ElemKind::Bf16,
        DType::F16 => ElemKind::F16,
        _ => ElemKind::F32,
    };
    Ok((
        kernel_name(kind),
        moe_xray_kernels::cpu::Cpu::get().feature_names(),
    ))
}

/// Whether `MOE_XRAY_KERNEL` is unset or valid (`avx512`, `avx2`, `avx2-novnni`, `generic`); the
/// error names it.
pub fn kernel_env_check() -> Result<(), String> {
    moe_xray_kernels::matmul::env_kernel().map(|_| ())
}

/// Element types of the CPU kernels (bf16, f16, f32) as candle sees them.
pub trait Elem: moe_xray_kernels::matmul::Elem + candle_core::WithDType {}
impl<T: moe_xray_kernels::matmul::Elem + candle_core::WithDType> Elem for T {}

/// `x [.., k] · w [m, k]ᵀ → [.., m]`, computed by [`MatmulT`] when both have the same dtype (bf16,
/// f16 or f32) on the CPU, by candle's matmul otherwise. On the CPU each output row is computed the
/// same way whatever the other rows are, so a token's result does not depend on its batch.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match matmul_t_cpu(x, w, false)? {
        Some(y) => Ok(y),
        None if x.rank() > 2 => x.broadcast_matmul(&w.t()?),
        None => x.matmul(&w.t()?),
    }
}

/// [`matmul_t`] with the f32 accumulators returned unrounded (f32), whatever the operands' dtype:
/// for torch's biased linear (`addmm`), which adds the bias to the f32 accumulators and rounds to
/// bf16 / f16 once, where rounding the product first and adding the bias in bf16 rounds twice.
pub(crate) fn matmul_t_f32(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match matmul_t_cpu(x, w, true)? {
        Some(y) => Ok(y),
        None => matmul_t(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?),
    }
}

/// [`MatmulT`] when both operands are on the CPU with the same dtype (bf16, f16 or f32) and `w`
/// is a matrix; `None` otherwise.
fn matmul_t_cpu(x: &Tensor, w: &Tensor, f32_out: bool) -> candle_core::Result<Option<Tensor>> {
    let fast = x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && w.rank() == 2;
    if !fast {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2_no_bwd(&w, &MatmulT { f32_out }).map(Some)
}

/// The custom op behind [`matmul_t`] and [`matmul_t_f32`] (CPU only).
pub(crate) struct MatmulT {
    /// Return the f32 accumulators (else rounded to the operands' dtype).
    f32_out: bool,
}

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
        if let Some(last) = out_dims.last_mut() {
            *last = m; // rank ≥ 1, checked above
        }
        let shape = Shape::from(out_dims);
        fn run<T: Elem>(
            x: &[T],
            w: &[T],
            n: usize,
            k: usize,
            m: usize,
            f32_out: bool,
        ) -> CpuStorage {
            // Activations in the weights' type: bf16 × bf16 on the AVX-512 BF16 kernel where the
            // CPU has it, else widened to f32 (exact) for the AVX2 / gemm kernels.
            let y = xwt_same(x, n, k, w, m);
            if f32_out {
                CpuStorage::F32(y)
            } else {
                T::to_cpu_storage_owned(T::narrow(&y))
            }
        }
        let (xr, wr) = (xs..xe, ws..ws + m * k);
        let f = self.f32_out;
        let storage = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => run(&x[xr], &w[wr], n, k, m, f),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => run(&x[xr], &w[wr], n, k, m, f),
            (CpuStorage::F32(x), CpuStorage::F32(w)) => run(&x[xr], &w[wr], n, k, m, f),
            _ => candle_core::bail!(
                "matmul_t: unsupported dtypes {:?} / {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage, shape))
    }
}

/// `x · wᵀ` for the expert block: `x` holds values of `T` widened to f32 (the layer input and
/// the rounded activations), so for bf16 it is narrowed back exactly and multiplied by
/// [`xwt_same`] (the AVX-512 BF16 kernel where the CPU has it); f16 / f32 go to [`xwt`] as before.
fn xwt_act<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    if T::KIND == moe_xray_kernels::matmul::ElemKind::Bf16 {
        xwt_same(&T::narrow(x), n, k, w, m)
    } else {
        xwt(x, n, k, w, m)
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
    /// GGUF blocks read in place by `moe_xray_kernels::quant` (activations quantised as ggml
    /// does; the product is f32, rounded to the compute dtype where the others round).
    Quant(QMatrix<'a>),
}

/// Runs `f` on the elements of `src` (element type `T`).
fn with_src<T: Elem, R>(
    src: &WSrc<'_>,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match src {
        WSrc::Tensor(t) => with_slice::<T, _>(t, f),
        WSrc::Quant(_) => candle_core::bail!("cpu kernel: quantised weight read as elements"),
        WSrc::Mapped(m, offset, len) => {
            // Whole values at an aligned address, of the right dtype, covering the range.
            let all = (m.dtype == T::DTYPE)
                .then(|| T::from_bytes(m.bytes()))
                .flatten()
                .and_then(|all| all.get(*offset..offset.checked_add(*len)?));
            let Some(w) = all else {
                candle_core::bail!(
                    "cpu kernel: mapped weight {:?} {:?} does not fit",
                    m.dtype,
                    m.shape
                );
            };
            f(w)
        }
    }
}

/// `x [n, k] · Wᵀ` for an expert weight `[m, k]` from any source, in f32.
fn project<T: Elem>(
    src: &WSrc<'_>,
    x: &[f32],
    n: usize,
    k: usize,
    m: usize,
) -> candle_core::Result<Vec<f32>> {
    match src {
        WSrc::Quant(q) => Ok(xwt_q(x, n, q)),
        _ => with_src::<T, _>(src, |w| Ok(xwt_act(x, n, k, w, m))),
    }
}

/// `x [n, k] · W [k, m]` with `W` the row-major elements `offset..offset + k·m` of a tensor left
/// in the memory-mapped checkpoint (GPT-OSS stores its experts so), computed in place by
/// `moe_xray_kernels::xw` and rounded once to the compute dtype (as [`matmul_t`] rounds). `x` and
/// the mapping must have the same dtype (bf16 / f16 / f32), on the CPU.
pub(crate) fn xw_mapped(
    x: &Tensor,
    w: &MappedTensor,
    offset: usize,
    k: usize,
    m: usize,
) -> candle_core::Result<Tensor> {
    let (n, kx) = x.dims2()?;
    if kx != k || !x.device().is_cpu() || x.dtype() != w.dtype {
        candle_core::bail!(
            "xw_mapped: input {:?} {:?} does not fit the mapped weight {:?} {:?} (k {k})",
            x.dtype(),
            x.dims(),
            w.dtype,
            w.shape
        );
    }
    let Some(len) = k.checked_mul(m) else {
        candle_core::bail!("xw_mapped: weight size {k} × {m} overflows");
    };
    fn run<T: Elem>(
        x: &Tensor,
        w: &MappedTensor,
        offset: usize,
        (n, k, m, len): (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = with_src::<T, _>(&WSrc::Mapped(w, offset, len), |w| {
            Ok(moe_xray_kernels::xw::xw(&xf, n, k, w, m))
        })?;
        Tensor::from_vec(y, (n, m), x.device())?.to_dtype(x.dtype())
    }
    let dims = (n, k, m, len);
    match x.dtype() {
        DType::BF16 => run::<bf16>(x, w, offset, dims),
        DType::F16 => run::<f16>(x, w, offset, dims),
        DType::F32 => run::<f32>(x, w, offset, dims),
        d => candle_core::bail!("xw_mapped: unsupported dtype {d:?}"),
    }
}

/// `a + b` for two contiguous CPU tensors of one shape in bf16 / f16, each sum computed in f32 and
/// rounded once to the dtype (torch's reduced-precision add; candle's gives the same values for
/// normal numbers), on rayon's threads for large tensors; candle's add otherwise (f32, other
/// devices, views).
///
/// Why: candle 0.11's bf16 add converts eight values at a time through a run-time CPU-feature check
/// per load and store; the two residual adds of every layer were ≈ 10 % of a bf16 prefill step's
/// samples (profile in `docs/performance.md`, session 12).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fits = a.device().is_cpu()
        && b.device().is_cpu()
        && a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && a.is_contiguous()
        && b.is_contiguous();
    fn run<T: Elem>(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        const CHUNK: usize = 1 << 14;
        let out = with_slice::<T, _>(a, |x| {
            with_slice::<T, _>(b, |y| {
                let mut out = Vec::with_capacity(x.len());
                let parts: Vec<Vec<T>> = x
                    .par_chunks(CHUNK)
                    .zip(y.par_chunks(CHUNK))
                    .map(|(x, y)| {
                        let (mut xf, mut yf) = (vec![0f32; x.len()], vec![0f32; y.len()]);
                        T::widen(x, &mut xf);
                        T::widen(y, &mut yf);
                        for (u, &v) in xf.iter_mut().zip(&yf) {
                            *u = T::round(*u + v);
                        }
                        T::narrow(&xf)
                    })
                    .collect();
                for p in parts {
                    out.extend_from_slice(&p);
                }
                Ok(out)
            })
        })?;
        Tensor::from_vec(out, a.dims(), a.device())
    }
    match a.dtype() {
        DType::BF16 if fits => run::<bf16>(a, b),
        DType::F16 if fits => run::<f16>(a, b),
        _ => a + b,
    }
}

/// RoPE in the rotate-half form on the CPU, `x · cos + rotate_half(x) · sin` for `x` `[1, heads, t,
/// d]` and tables `cos` / `sin` `[≥ t, d / 2]` in `x`'s dtype, with each product and the sum rounded
/// to that dtype — the element-wise operations of candle's `rope_slow` and of transformers'
/// `apply_rotary_pos_emb`, fused into one pass. `None` where it does not apply (another device
/// or dtype, an odd `d`, short tables); the caller then takes candle's `rope_slow`.
///
/// Why: `rope_slow` is about ten candle operations on small per-sequence tensors, each with its own
/// allocation; at 80 sequences × 16 layers × (q, k) that was ≈ 12 % of a bf16 prefill step
/// (profile in `docs/performance.md`, session 12).
pub(crate) fn rope_rotate_half(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let (b, _, t, d) = x.dims4()?;
    let (rows, half) = cos.dims2()?;
    if !x.device().is_cpu()
        || b != 1
        || d % 2 != 0
        || half * 2 != d
        || rows < t
        || sin.dims2()? != (rows, half)
        || cos.dtype() != x.dtype()
        || sin.dtype() != x.dtype()
    {
        return Ok(None);
    }
    fn run<T: Elem>(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (t, half): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        // Widening to f32 is exact; every result below is rounded to `T`, so narrowing back is too.
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let cv = cos.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let sv = sin.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let d = 2 * half;
        let mut out = vec![0f32; xv.len()];
        for (row, (o, xr)) in out.chunks_exact_mut(d).zip(xv.chunks_exact(d)).enumerate() {
            let p = row % t;
            let (c, s) = (&cv[p * half..(p + 1) * half], &sv[p * half..(p + 1) * half]);
            let (x1, x2) = xr.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for i in 0..half {
                // rotate_half(x) = [-x2, x1]; negation is exact.
                o1[i] = T::round(T::round(x1[i] * c[i]) + T::round(-x2[i] * s[i]));
                o2[i] = T::round(T::round(x2[i] * c[i]) + T::round(x1[i] * s[i]));
            }
        }
        Tensor::from_vec(out, x.dims(), x.device())?.to_dtype(x.dtype())
    }
    let dims = (t, half);
    Ok(Some(match x.dtype() {
        DType::BF16 => run::<bf16>(x, cos, sin, dims)?,
        DType::F16 => run::<f16>(x, cos, sin, dims)?,
        DType::F32 => run::<f32>(x, cos, sin, dims)?,
        _ => return Ok(None),
    }))
}

/// One expert's share of a MoE block: its token rows (distinct, ascending), their combination
/// weights and its `[gate, up, down]` weights.
pub(crate) struct ExpertCall<'a> {
    pub rows: &'a [u32],
    pub ws: &'a [f32],
    pub w: [WSrc<'a>; 3],
}

/// Experts run concurrently (see [`MoeAccumulator::add_experts`]) when the block has at most this
/// many token rows in all ...
const CONCURRENT_MAX_ROWS: usize = 2048;
/// ... and at most this many per expert on average (a decode step of up to ~100 sequences with
/// top-8 of 64 experts).
const CONCURRENT_MAX_MEAN_ROWS: usize = 16;

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
    /// Round each routing weight to the compute dtype before the product (OLMoE, Qwen,
    /// Granite); Mixtral and DeepSeek multiply by the f32 weight and round the product.
    round_weights: bool,
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
            round_weights: true,
        })
    }

    /// Adds one expert's contribution for the token rows `rows` with combination weights `ws`.
    /// `w = [gate, up, down]`: `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`, all in the
    /// compute dtype.
    #[cfg(test)]
    pub(crate) fn add_expert(
        &mut self,
        rows: &[u32],
        ws: &[f32],
        w: [WSrc<'_>; 3],
    ) -> candle_core::Result<()> {
        self.add_experts(vec![ExpertCall { rows, ws, w }])
    }

    /// Adds the contributions of several experts, in the order given (expert-index order).
    ///
    /// When the calls are small (a decode step: a few tokens per expert) the experts' outputs are
    /// computed concurrently on rayon's threads — one matrix of a few tokens is too little work to
    /// split well across threads, and each split is a synchronisation — and then added to the
    /// output one after the other in the given order, so the result is the same bits as adding
    /// them one at a time. Larger calls (prefill) run one expert at a time, each split by the
    /// kernels across the threads.
    pub(crate) fn add_experts(&mut self, calls: Vec<ExpertCall<'_>>) -> candle_core::Result<()> {
        match self.dtype {
            DType::BF16 => self.add_experts_t::<bf16>(calls),
            DType::F16 => self.add_experts_t::<f16>(calls),
            DType::F32 => self.add_experts_t::<f32>(calls),
            d => candle_core::bail!("MoE cpu kernel: unsupported dtype {d:?}"),
        }
    }

    fn add_experts_t<T: Elem>(&mut self, calls: Vec<ExpertCall<'_>>) -> candle_core::Result<()> {
        for c in &calls {
            self.check(c)?;
        }
        let rows_total = calls.iter().map(|c| c.rows.len()).sum::<usize>();
        let concurrent = calls.len() > 1
            && rows_total <= CONCURRENT_MAX_ROWS
            && rows_total <= calls.len() * CONCURRENT_MAX_MEAN_ROWS;
        if concurrent {
            // Every output is held until all are done: at most CONCURRENT_MAX_ROWS rows of
            // `hidden` f32.
            let ys = calls
                .par_iter()
                .map(|c| self.expert_output::<T>(c))
                .collect::<Vec<_>>();
            for (c, y) in calls.iter().zip(ys) {
                self.accumulate::<T>(c, &y?);
            }
        } else {
            for c in &calls {
                let y = self.expert_output::<T>(c)?;
                self.accumulate::<T>(c, &y);
            }
        }
        Ok(())
    }

    /// Checks one call's weight shapes and token rows against this block.
    fn check(&self, c: &ExpertCall<'_>) -> candle_core::Result<()> {
        let (h, i) = (self.hidden, self.inter);
        let shape_ok = |src: &WSrc<'_>, r: usize, col: usize| match src {
            WSrc::Tensor(t) => t.dims() == [r, col],
            WSrc::Mapped(_, _, len) => Some(*len) == r.checked_mul(col),
            WSrc::Quant(q) => q.rows() == r && q.k() == col,
        };
        let [wg, wu, wd] = &c.w;
        if !(shape_ok(wg, i, h) && shape_ok(wu, i, h) && shape_ok(wd, h, i)) {
            candle_core::bail!(
                "MoE cpu kernel: expert weight shapes do not match [{i}, {h}] / [{h}, {i}]"
            );
        }
        // Token rows of one expert are distinct and ascending (each token selects an expert at
        // most once); the parallel scatter into `acc` relies on it.
        if c.rows.windows(2).any(|p| p[0] >= p[1]) || c.rows.len() != c.ws.len() {
            candle_core::bail!("MoE cpu kernel: expert rows must be distinct and ascending");
        }
        if let Some(&r) = c.rows.last() {
            if r as usize >= self.acc.len() / h.max(1) {
                candle_core::bail!("MoE cpu kernel: token row {r} out of range");
            }
        }
        Ok(())
    }

    /// One expert's down-projection output for its token rows, `[rows, hidden]` in f32 (not yet
    /// rounded); the call must have passed [`Self::check`].
    fn expert_output<T: Elem>(&self, c: &ExpertCall<'_>) -> candle_core::Result<Vec<f32>> {
        let (h, i, n) = (self.hidden, self.inter, c.rows.len());
        let [wg, wu, wd] = &c.w;
        // Element-wise passes run on rayon's threads when large (prefill), else in one task.
        let min_rows = |len: usize| (1usize << 15).div_ceil(len.max(1));
        let mut xe = vec![0f32; n * h];
        xe.par_chunks_mut(h)
            .with_min_len(min_rows(h))
            .zip(c.rows.par_iter())
            .for_each(|(dst, &r)| {
                let r = r as usize;
                dst.copy_from_slice(&self.x[r * h..(r + 1) * h]);
            });
        let (g, u) = match (wg, wu) {
            // Quantised gate and up of one type: the activations are quantised once.
            (WSrc::Quant(qg), WSrc::Quant(qu)) if qg.ty() == qu.ty() => {
                let a = QActivations::new(qg.ty(), &xe, n, h);
                (xwt_q_act(&a, qg), xwt_q_act(&a, qu))
            }
            _ => (
                project::<T>(wg, &xe, n, h, i)?,
                project::<T>(wu, &xe, n, h, i)?,
            ),
        };
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
        project::<T>(wd, &act, n, i, h)
    }

    /// Adds `w · round(y)` to the call's rows of the output, rounding as transformers does; the
    /// call must have passed [`Self::check`].
    fn accumulate<T: Elem>(&mut self, c: &ExpertCall<'_>, y: &[f32]) {
        let h = self.hidden.max(1);
        let min_rows = (1usize << 15).div_ceil(h);
        // The rows of `acc` this expert adds to (distinct, ascending and in range, checked), as
        // disjoint mutable slices.
        let mut targets: Vec<&mut [f32]> = Vec::with_capacity(c.rows.len());
        let mut chunks = self.acc.chunks_exact_mut(h);
        let mut next = 0usize;
        for &r in c.rows {
            if let Some(row) = chunks.nth(r as usize - next) {
                targets.push(row);
            }
            next = r as usize + 1;
        }
        let round_weights = self.round_weights;
        y.par_chunks(h)
            .with_min_len(min_rows)
            .zip(targets.into_par_iter())
            .zip(c.ws.par_iter())
            .for_each(|((yr, a), &w)| {
                let w = if round_weights { T::round(w) } else { w };
                for (a, &v) in a.iter_mut().zip(yr) {
                    *a = T::round(*a + T::round(T::round(v) * w));
                }
            });
    }

    /// Whether routing weights are rounded to the compute dtype before the product (default).
    pub(crate) fn round_weights(mut self, yes: bool) -> Self {
        self.round_weights = yes;
        self
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

    /// Experts computed concurrently (one `add_experts` call of small experts) give the same bits
    /// as adding them one at a time, in expert order, at 1 and 2 threads, for bf16, f16 and f32.
    #[test]
    fn concurrent_experts_equal_one_at_a_time() {
        let (n_tok, hidden, inter, n_exp, top) = (24usize, 64usize, 48usize, 8usize, 3usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Each token picks `top` distinct experts with a random weight.
        let mut groups: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_exp];
        for t in 0..n_tok {
            let mut picked = Vec::new();
            while picked.len() < top {
                let e = rng.random_range(0..n_exp);
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            for e in picked {
                groups[e].0.push(t as u32);
                groups[e].1.push(rng.random_range(0.05f32..1.0));
            }
        }
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let h = random(n_tok, hidden, 11, dtype);
            let ws: Vec<[Tensor; 3]> = (0..n_exp as u64)
                .map(|e| {
                    [
                        random(inter, hidden, 100 + 3 * e, dtype),
                        random(inter, hidden, 101 + 3 * e, dtype),
                        random(hidden, inter, 102 + 3 * e, dtype),
                    ]
                })
                .collect();
            let run = |threads: usize, together: bool| -> Vec<u32> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut acc = MoeAccumulator::new(&h, inter).unwrap();
                    let calls: Vec<ExpertCall<'_>> = groups
                        .iter()
                        .zip(&ws)
                        .filter(|((rows, _), _)| !rows.is_empty())
                        .map(|((rows, w), [g, u, d])| ExpertCall {
                            rows,
                            ws: w,
                            w: [WSrc::Tensor(g), WSrc::Tensor(u), WSrc::Tensor(d)],
                        })
                        .collect();
                    if together {
                        acc.add_experts(calls).unwrap();
                    } else {
                        for c in calls {
                            acc.add_expert(c.rows, c.ws, c.w).unwrap();
                        }
                    }
                    bits(&acc.finish(&Device::Cpu).unwrap())
                })
            };
            let want = run(1, false);
            assert!(want.iter().any(|&b| b != 0), "{dtype:?}: empty output");
            for threads in [1, 2] {
                assert_eq!(run(threads, true), want, "{dtype:?}, {threads} threads");
            }
        }
    }

    /// The values of `v` widened to f32, as bit patterns.
    fn bits(v: &Tensor) -> Vec<u32> {
        let v = v.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// The fused RoPE gives candle's `rope_slow` bits (bf16, f16, f32; tables longer than t).
    #[test]
    fn fused_rope_equals_rope_slow() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for &(h, t, d, rows) in &[
                (3usize, 5usize, 16usize, 5usize),
                (2, 1, 64, 9),
                (4, 7, 8, 12),
            ] {
                let x = random(h * t, d, 21, dtype).reshape((1, h, t, d)).unwrap();
                let cos = random(rows, d / 2, 22, dtype);
                let sin = random(rows, d / 2, 23, dtype);
                let got = rope_rotate_half(&x, &cos, &sin).unwrap().unwrap();
                let want = candle_nn::rotary_emb::rope_slow(
                    &x,
                    &cos.narrow(0, 0, t).unwrap(),
                    &sin.narrow(0, 0, t).unwrap(),
                )
                .unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dtype(), dtype);
                assert_eq!(bits(&got), bits(&want), "{dtype:?} h{h} t{t} d{d}");
            }
        }
        // Not applicable: odd head dim, tables of the wrong width.
        let x = random(2, 6, 1, DType::F32).reshape((1, 1, 2, 6)).unwrap();
        let c = random(2, 2, 2, DType::F32);
        assert!(rope_rotate_half(&x, &c, &c).unwrap().is_none());
    }

    /// The rounded add gives candle's bits on normal values (bf16, f16; many chunks, ties,
    /// cancellation, overflow to infinity) and falls back to candle's add for f32 and views.
    #[test]
    fn rounded_add_equals_candle_add() {
        for dtype in [DType::BF16, DType::F16] {
            let n = 40_000usize;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let mut xa: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let mut xb: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            // Exact cancellation, ties at the rounding boundary, overflow.
            xa[0] = 1.5;
            xb[0] = -1.5;
            xa[1] = 1.0;
            xb[1] = 1.0 / 256.0;
            xa[2] = 1.0;
            xb[2] = 3.0 / 256.0;
            let big = if dtype == DType::BF16 {
                3.0e38
            } else {
                60000.0
            };
            xa[3] = big;
            xb[3] = big;
            let a = Tensor::from_vec(xa, (n / 8, 8), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::from_vec(xb, (n / 8, 8), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = add(&a, &b).unwrap();
            let want = (&a + &b).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.dims(), want.dims());
            let g = bits(&got);
            assert_eq!(g, bits(&want), "{dtype:?}");
            assert!(f32::from_bits(g[3]).is_infinite(), "{dtype:?}: overflow");
            // A non-contiguous view takes candle's add.
            let at = a.t().unwrap();
            let bt = b.t().unwrap();
            assert_eq!(bits(&add(&at, &bt).unwrap()), bits(&(&at + &bt).unwrap()));
        }
    }

    /// Bad calls are refused before anything is computed.
    #[test]
    fn expert_calls_are_checked() {
        let h = random(4, 32, 1, DType::F32);
        let (g, u, d) = (
            random(16, 32, 2, DType::F32),
            random(16, 32, 3, DType::F32),
            random(32, 16, 4, DType::F32),
        );
        let call = |rows: &'static [u32], ws: &'static [f32]| ExpertCall {
            rows,
            ws,
            w: [WSrc::Tensor(&g), WSrc::Tensor(&u), WSrc::Tensor(&d)],
        };
        let mut acc = MoeAccumulator::new(&h, 16).unwrap();
        assert!(acc.add_experts(vec![call(&[2, 1], &[0.5, 0.5])]).is_err());
        assert!(acc.add_experts(vec![call(&[4], &[0.5])]).is_err());
        assert!(acc.add_experts(vec![call(&[1], &[0.5, 0.5])]).is_err());
        let bad_shape = ExpertCall {
            rows: &[0],
            ws: &[1.0],
            w: [WSrc::Tensor(&d), WSrc::Tensor(&u), WSrc::Tensor(&g)],
        };
        assert!(acc.add_experts(vec![bad_shape]).is_err());
        acc.add_experts(vec![call(&[0, 3], &[0.5, 0.25]), call(&[1], &[1.0])])
            .unwrap();
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
