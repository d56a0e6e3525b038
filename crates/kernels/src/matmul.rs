//! `y = x · Wᵀ` on the CPU for f32 activations and bf16 / f16 / f32 weights read in place: the
//! hot path of the model's forward pass (`moe-xray-model`'s `cpu_kernels.rs` plugs it into
//! candle).
//!
//! Two implementations, both splitting the output columns into panels over rayon's threads (each
//! output element is computed by one thread, in an order that does not depend on the thread
//! count or on the other rows, so results are deterministic and batch-invariant):
//! - the hand-written AVX2 + FMA kernel (`arch/x86_64/avx2/matmul.rs`; activations in an aligned
//!   per-thread buffer, blocks of 8 / 6 / 4 / 3 weight rows × 1 / 2 / 3 / 4 tokens, eight f32
//!   lanes per accumulator, a fixed-order horizontal sum). Its scalar reference is
//!   [`xwt_reference`] (the same fused multiply-adds and additions in the same order; test
//!   `avx2_matches_its_scalar_reference_bit_for_bit`). bf16 / f16 activations of [`xwt_same`] go
//!   to it directly (widened into its buffer) on CPUs without AVX-512 BF16;
//! - weight panels widened to f32 into a per-thread buffer (it stays in L2) and multiplied by the
//!   `gemm` crate's f32 kernel (what candle uses): the path of CPUs without AVX2 / FMA;
//! - for bf16 activations × bf16 weights ([`xwt_same`]) on CPUs with AVX-512 BF16: the
//!   `vdpbf16ps` kernel (`arch/x86_64/avx512/matmul.rs`; blocks of 4 weight rows × 4 tokens, 16
//!   f32 lanes per accumulator, each fed 32 bf16 pairs per instruction). Its scalar reference is
//!   [`xwt_bf16_reference`] (test `avx512_bf16_matches_its_scalar_reference_bit_for_bit`). It sums
//!   in another order than the AVX2 kernel, so bf16 results differ from it in the last bits.
//!   From [`FMA_MIN_TOKENS`] tokens on, the same path widens each weight panel to f32 once and
//!   runs AVX-512F FMAs instead (`arch/x86_64/avx512/matmul_fma.rs`): the same products, roundings,
//!   flushes and order, so the same bits (test `avx512_fma_path_matches_the_dot_kernel_bit_for_bit`),
//!   and a token's result does not depend on how many tokens share its call.
//!
//! The path is chosen at run time from the CPU's features ([`Cpu`]); the environment variable
//! `MOE_XRAY_KERNEL` (`avx512`, `avx2`, `avx2-novnni`, `generic`; read once per process) caps it,
//! so benchmarks and tests can compare paths on one machine: `avx2` never takes the AVX-512 kernel,
//! `avx2-novnni` also keeps the quantised-weight kernel's AVX2 tile off AVX-VNNI ([`env_no_vnni`]:
//! what a CPU with AVX2 but no AVX-VNNI runs), `generic` always takes the `gemm` path.
//! [`kernel_name`] says which path a weight type takes.
//!
//! Why hand-written: candle 0.11's CPU matmul has no bf16 / f16 kernel; it widens both whole
//! operands to fresh f32 vectors on every call, which made decoding on the full OLMoE shape ~10×
//! slower than memory bandwidth allows (`docs/performance.md`).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::Cpu;

/// Elements of one f32 weight panel of the `gemm` path: 128 Ki f32 = 512 KiB, half of this
/// machine's L2 per core.
const PANEL_ELEMS: usize = 128 * 1024;

/// Which element type an [`Elem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    Bf16,
    F16,
    F32,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for f32 {}
}

/// Element types of the CPU kernels: bf16, f16 and f32 (sealed: the kernels rely on the layout).
pub trait Elem: Copy + Send + Sync + 'static + sealed::Sealed {
    const KIND: ElemKind;
    /// One value as f32 (exact).
    fn to_f32(self) -> f32;
    /// Widens `src` into `dst` (same length; exact).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds an f32 to this type and back (identity for f32).
    fn round(x: f32) -> f32;
    /// Narrows f32 values to this type (round to nearest even).
    fn narrow(src: &[f32]) -> Vec<Self>;
    /// The values as bf16 when `Self` is bf16 (the AVX-512 BF16 kernel's operands), else `None`.
    fn as_bf16(_: &[Self]) -> Option<&[bf16]> {
        None
    }

    /// `bytes` (native-endian, as stored in a safetensors file on a little-endian machine) as
    /// values, or `None` when the length is not a whole number of values or the address is not
    /// aligned for `Self`.
    fn from_bytes(bytes: &[u8]) -> Option<&[Self]> {
        let size = std::mem::size_of::<Self>();
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<Self>())
            || !bytes.len().is_multiple_of(size)
        {
            return None;
        }
        // SAFETY: the address is aligned and the length a whole number of values (checked
        // above); bf16, f16 and f32 (the only implementors: the trait is sealed) have no invalid
        // bit patterns; the result borrows `bytes`, so the memory outlives it.
        Some(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<Self>(), bytes.len() / size)
        })
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32: exactly `bf16::from_f32(x).to_f32()`
/// of the `half` crate (NaNs keep their high payload bits and become quiet), written without
/// branches so that loops over slices vectorise (`half` branches per value). Test
/// `round_bf16_equals_half` (a stride through all bit patterns and every pattern near the rounding
/// boundaries); all 2³²: `cargo run --release -p moe-xray-kernels --example round_bf16_exhaustive`.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    // Round bit set and (sticky bits or the kept least significant bit set): round up. Cannot
    // carry out of 16 bits for a non-NaN value (the largest finite rounds to infinity).
    let up = u32::from((b & 0x8000) != 0 && (b & 0x1_7fff) != 0);
    let hi = if nan {
        (b >> 16) | 0x40
    } else {
        (b >> 16) + up
    };
    f32::from_bits(hi << 16)
}

impl Elem for bf16 {
    const KIND: ElemKind = ElemKind::Bf16;
    fn as_bf16(v: &[Self]) -> Option<&[bf16]> {
        Some(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        round_bf16(x)
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        let mut o = vec![bf16::ZERO; src.len()];
        o.convert_from_f32_slice(src);
        o
    }
}

impl Elem for f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    #[inline]
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
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline]
    fn round(x: f32) -> f32 {
        x
    }
    fn narrow(src: &[f32]) -> Vec<Self> {
        src.to_vec()
    }
}

/// A raw output pointer shared by the panel tasks; each task writes a disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer is never read through by two tasks at the same place.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A growable f32 buffer whose contents start at a 64-byte boundary (the AVX2 and AVX-512 FMA
/// kernels' per-thread activation and panel buffers): a vector load from a misaligned buffer can
/// touch two cache lines, which cost a third of the AVX-512 FMA loop's speed in session 12's
/// measurements (one thread, the register block alone: 96 → 148 GFLOP/s aligned).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Aligned {
    buf: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl Aligned {
    /// `len` f32 from a 64-byte boundary (contents unspecified: every user overwrites them).
    fn get(&mut self, len: usize) -> &mut [f32] {
        // 15 f32 of slack cover any 4-byte-aligned start.
        let want = len.saturating_add(15);
        if self.buf.len() < want {
            self.buf.resize(want, 0.0);
        }
        // The start is 4-byte aligned, so the distance to the next 64-byte boundary is a whole
        // number of f32 (at most 15).
        let off = (64 - self.buf.as_ptr() as usize % 64) % 64 / 4;
        &mut self.buf[off..off + len]
    }
}

/// Which implementation [`xwt_with`] / [`xwt_same_with`] use (for benchmarks and tests; the
/// model always uses `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The best path of this CPU, capped by `MOE_XRAY_KERNEL` ([`env_kernel`]).
    Auto,
    /// The AVX-512 BF16 kernel for bf16 × bf16 ([`xwt_same`]); for other types and on CPUs
    /// without AVX-512 BF16 the same as `Avx2`.
    Avx512,
    /// The hand-written AVX2 + FMA kernel (falls back to `Gemm` where unavailable).
    Avx2,
    /// Weight panels widened to f32 and multiplied by the `gemm` crate.
    Gemm,
}

/// The cap that `MOE_XRAY_KERNEL` puts on [`Kernel::Auto`] (read once per process): `avx512`
/// (or unset / empty: no cap), `avx2`, `avx2-novnni` (`avx2`, and the quantised kernel's AVX2 tile
/// without AVX-VNNI), `generic` (the `gemm` path); any other value is an error naming the variable
/// (callers that cannot report it treat it as unset).
pub fn env_kernel() -> Result<Kernel, String> {
    static ENV: std::sync::OnceLock<Result<Kernel, String>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| match std::env::var("MOE_XRAY_KERNEL") {
        Err(std::env::VarError::NotPresent) => Ok(Kernel::Avx512),
        Ok(v) => parse_kernel(&v),
        Err(e) => Err(format!("MOE_XRAY_KERNEL: {e}")),
    })
    .clone()
}

/// A value of `MOE_XRAY_KERNEL` as the cap it puts on [`Kernel::Auto`].
fn parse_kernel(v: &str) -> Result<Kernel, String> {
    match v.trim() {
        "" | "avx512" | "auto" => Ok(Kernel::Avx512),
        "avx2" | NO_VNNI => Ok(Kernel::Avx2),
        "generic" | "gemm" => Ok(Kernel::Gemm),
        other => Err(format!(
            "MOE_XRAY_KERNEL={other:?}: expected avx512, avx2, {NO_VNNI} or generic"
        )),
    }
}

/// The `MOE_XRAY_KERNEL` value that caps at AVX2 and keeps AVX-VNNI off too.
const NO_VNNI: &str = "avx2-novnni";

/// Whether `MOE_XRAY_KERNEL` is `avx2-novnni` (read once per process): the AVX2 cap of
/// [`env_kernel`], and the quantised-weight kernel's AVX2 tile without AVX-VNNI.
pub fn env_no_vnni() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| std::env::var("MOE_XRAY_KERNEL").is_ok_and(|v| v.trim() == NO_VNNI))
}

/// `kernel` with `Auto` replaced by the cap of `MOE_XRAY_KERNEL`.
fn resolve(kernel: Kernel) -> Kernel {
    match kernel {
        Kernel::Auto => env_kernel().unwrap_or(Kernel::Avx512),
        k => k,
    }
}

/// The path that [`xwt_same`] (`Kernel::Auto`) takes for weights (and activations) of type
/// `kind` on this CPU: `"avx512-bf16"`, `"avx2-fma"` or `"gemm"` (`"avx512-bf16"` covers both of its
/// implementations, [`Bf16Path`], which give the same bits).
pub fn kernel_name(kind: ElemKind) -> &'static str {
    let k = resolve(Kernel::Auto);
    let cpu = Cpu::get();
    if k == Kernel::Avx512 && kind == ElemKind::Bf16 && cpu.avx512_bf16().is_some() {
        "avx512-bf16"
    } else if k != Kernel::Gemm && cpu.avx2_fma().is_some() {
        "avx2-fma"
    } else {
        "gemm"
    }
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` with f32 `x` and weights of type `T`: the AVX2 + FMA kernel
/// for any weight type where the CPU has it, else panels converted for `gemm`.
pub fn xwt<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    xwt_with(Kernel::Auto, x, n, k, w, m)
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
    let (nk, mk) = (n.checked_mul(k), m.checked_mul(k));
    assert!(
        nk.is_some_and(|v| x.len() >= v) && mk.is_some_and(|v| w.len() >= v),
        "xwt: operand sizes"
    );
    assert!(n.checked_mul(m).is_some(), "xwt: output size overflows");
    let kernel = resolve(kernel);
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), true) = (Cpu::get().avx2_fma(), kernel != Kernel::Gemm) {
        return avx2::xwt(t, &x[..n * k], n, k, w, m);
    }
    let _ = (kernel, Cpu::get);
    gemm_t(x, n, k, m, |rows, buf| {
        T::widen(&w[rows.start * k..rows.end * k], buf)
    })
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` with activations in the weights' type `T` (a model computing
/// in bf16 / f16 / f32): bf16 × bf16 on the AVX-512 BF16 kernel where the CPU has it, otherwise
/// the activations widened to f32 (exact) and [`xwt`]'s kernel (the AVX2 one widens them into its
/// own aligned buffer). The result is f32 (not rounded to `T`).
pub fn xwt_same<T: Elem>(x: &[T], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    xwt_same_with(Kernel::Auto, x, n, k, w, m)
}

/// [`xwt_same`] with a chosen kernel.
pub fn xwt_same_with<T: Elem>(
    kernel: Kernel,
    x: &[T],
    n: usize,
    k: usize,
    w: &[T],
    m: usize,
) -> Vec<f32> {
    let nk = n.checked_mul(k);
    assert!(
        nk.is_some_and(|v| x.len() >= v) && m.checked_mul(k).is_some_and(|v| w.len() >= v),
        "xwt: operand sizes"
    );
    assert!(n.checked_mul(m).is_some(), "xwt: output size overflows");
    let nk = n * k;
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), Kernel::Avx512, Some(xb), Some(wb)) = (
        Cpu::get().avx512_bf16(),
        resolve(kernel),
        T::as_bf16(x),
        T::as_bf16(w),
    ) {
        return if n >= FMA_MIN_TOKENS {
            avx512_fma::xwt(t, xb, n, k, wb, m)
        } else {
            avx512::xwt(t, xb, n, k, wb, m)
        };
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(t), true) = (Cpu::get().avx2_fma(), resolve(kernel) != Kernel::Gemm) {
        return avx2::xwt(t, &x[..nk], n, k, w, m);
    }
    let mut xf = vec![0f32; nk];
    T::widen(&x[..nk], &mut xf);
    xwt_with(kernel, &xf, n, k, w, m)
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/matmul.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/matmul.rs"]
mod avx512;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/matmul_fma.rs"]
mod avx512_fma;

/// From this many tokens on, the AVX-512 path of [`xwt_same`] (bf16 × bf16) widens each weight
/// panel to f32 once and runs f32 FMAs (`arch/x86_64/avx512/matmul_fma.rs`) instead of
/// `vdpbf16ps`: bit-identical results (so a token's result does not depend on its batch), faster
/// from about this many tokens on (session 12, `cargo bench -p moe-xray-kernels --bench
/// bf16_prefill`, OLMoE shapes: FMA / dot 0.98–1.04 at 8 tokens with the weights in cache,
/// 1.05–1.3 with them streamed from memory (`BF16_BENCH_COLD=1`), 0.7–0.9 at 4 tokens, 1.15–1.4
/// at 16).
pub const FMA_MIN_TOKENS: usize = 8;

/// The two implementations of the AVX-512 bf16 × bf16 path (benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// `vdpbf16ps` on the bf16 operands.
    Dot,
    /// Weight panels widened to f32 once, f32 FMAs (same bits as `Dot`).
    Fma,
}

/// `y [n, m] = x [n, k] · w [m, k]ᵀ` (bf16 × bf16) on one AVX-512 path whatever `n`, or `None`
/// on CPUs without AVX-512 BF16. For benchmarks and tests; [`xwt_same`] chooses by `n`.
pub fn xwt_bf16_path(
    path: Bf16Path,
    x: &[bf16],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
) -> Option<Vec<f32>> {
    assert!(
        n.checked_mul(k).is_some_and(|v| x.len() >= v)
            && m.checked_mul(k).is_some_and(|v| w.len() >= v),
        "xwt: operand sizes"
    );
    assert!(n.checked_mul(m).is_some(), "xwt: output size overflows");
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Cpu::get().avx512_bf16() {
        return Some(match path {
            Bf16Path::Dot => avx512::xwt(t, x, n, k, w, m),
            Bf16Path::Fma => avx512_fma::xwt(t, x, n, k, w, m),
        });
    }
    let _ = path;
    None
}

/// One `vdpbf16ps` step on one f32 lane, in scalar code: `acc + a·b` with the product exact and
/// one rounding to nearest even, denormal inputs (`acc`, `a`, `b`) read as zero of the same sign
/// and a denormal result flushed to zero of the same sign (the instruction ignores MXCSR).
#[inline]
pub fn dpbf16_step_reference(acc: f32, a: bf16, b: bf16) -> f32 {
    let daz = |v: f32| {
        if v.is_subnormal() {
            0f32.copysign(v)
        } else {
            v
        }
    };
    let r = daz(a.to_f32()).mul_add(daz(b.to_f32()), daz(acc));
    daz(r)
}

/// The sum of 16 f32 lanes in the AVX-512 kernel's order: lanes `i + (i + 8)`, then
/// [`hsum_reference`].
#[inline]
pub fn hsum16_reference(a: [f32; 16]) -> f32 {
    hsum_reference(std::array::from_fn(|i| a[i] + a[i + 8]))
}

/// The scalar reference of the AVX-512 BF16 kernel: the same operations in the same order, one
/// output at a time (per k block of 2048: sixteen f32 lanes, each fed the pairs `(2l, 2l + 1)` of
/// every group of 32 elements — the last group padded with zeros — by two
/// [`dpbf16_step_reference`] steps, odd element first; [`hsum16_reference`]; block sums added in
/// order). Bit-identical to `xwt_same_with(Kernel::Avx512, ..)` on CPUs with AVX-512 BF16; slow
/// (tests and documentation only).
pub fn xwt_bf16_reference(x: &[bf16], n: usize, k: usize, w: &[bf16], m: usize) -> Vec<f32> {
    const KC: usize = 2048;
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    let at = |v: &[bf16], i: usize, end: usize| if i < end { v[i] } else { bf16::ZERO };
    for t in 0..n {
        for r in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            let wr = &w[r * k..(r + 1) * k];
            let mut out = 0f32;
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + KC).min(k);
                let mut acc = [0f32; 16];
                for g in (k0..k1).step_by(32) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        let (e, o) = (g + 2 * l, g + 2 * l + 1);
                        *a = dpbf16_step_reference(*a, at(xr, o, k1), at(wr, o, k1));
                        *a = dpbf16_step_reference(*a, at(xr, e, k1), at(wr, e, k1));
                    }
                }
                let s = hsum16_reference(acc);
                out = if k0 == 0 { s } else { out + s };
                k0 = k1;
            }
            y[t * m + r] = out;
        }
    }
    y
}

/// The AVX2 kernel's k blocks (its `KC`): partial sums of each block are added in order.
const KC_REFERENCE: usize = 1024;

/// The horizontal sum of eight f32 lanes in the AVX2 kernel's order: halves, then lanes 0 + 2
/// and 1 + 3, then their sum.
#[inline]
pub fn hsum_reference(a: [f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let (s0, s1) = (s[0] + s[2], s[1] + s[3]);
    s0 + s1
}

/// The scalar reference of the AVX2 kernel: the same operations in the same order, one output
/// at a time (per k block of 1024: eight lane accumulators of fused multiply-adds over whole
/// groups of eight, [`hsum_reference`], then the scalar tail with separate products and sums;
/// block sums added in order). Bit-identical to `xwt_with(Kernel::Avx2, ..)` on AVX2 CPUs;
/// slow (tests and documentation only).
pub fn xwt_reference<T: Elem>(x: &[f32], n: usize, k: usize, w: &[T], m: usize) -> Vec<f32> {
    assert!(x.len() >= n * k && w.len() >= m * k, "xwt: operand sizes");
    let mut y = vec![0f32; n * m];
    for t in 0..n {
        for r in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            let wr = &w[r * k..(r + 1) * k];
            let mut out = 0f32;
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + KC_REFERENCE).min(k);
                let k8 = k0 + (k1 - k0) / 8 * 8;
                let mut acc = [0f32; 8];
                for kk in (k0..k8).step_by(8) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = xr[kk + l].mul_add(wr[kk + l].to_f32(), *a);
                    }
                }
                let mut s = hsum_reference(acc);
                for q in k8..k1 {
                    s += xr[q] * wr[q].to_f32();
                }
                out = if k0 == 0 { s } else { out + s };
                k0 = k1;
            }
            y[t * m + r] = out;
        }
    }
    y
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
    assert!(x.len() >= n * k, "xwt: operand sizes");
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
            // the other tasks', and y outlives the loop; lhs is x [n, k] row-major (asserted
            // size); rhs is the panel viewed as a k × rows matrix (element (kk, j) at
            // b[j * k + kk]).
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn check_reference<T: Elem>(w_of: impl Fn(&[f32]) -> Vec<T>) {
        // Ragged register blocks, several k blocks with a tail, the widened-panel path (> 16
        // tokens), panels of 48 rows with a ragged last one.
        for &(n, k, m) in &[
            (1, 64, 10),
            (3, 300, 7),
            (4, 1030, 50),
            (5, 2051, 49),
            (17, 200, 97),
            (37, 1100, 13),
        ] {
            let x = random(n * k, 1 + n as u64);
            let w = w_of(&random(m * k, 2 + m as u64));
            let want = xwt_reference(&x, n, k, &w, m);
            #[cfg(target_arch = "x86_64")]
            if Cpu::get().avx2_fma().is_some() {
                let got = xwt_with(Kernel::Avx2, &x, n, k, &w, m);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{:?} {n}x{k}x{m}", T::KIND);
            }
            // The gemm path: same products, another summation order.
            let g = xwt_with(Kernel::Gemm, &x, n, k, &w, m);
            for (a, b) in g.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt(), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn avx2_matches_its_scalar_reference_bit_for_bit() {
        check_reference::<f32>(|v| v.to_vec());
        check_reference::<bf16>(bf16::narrow);
        check_reference::<f16>(f16::narrow);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Whether this CPU runs the AVX-512 BF16 kernel (prints why a test is skipped otherwise).
    fn has_avx512_bf16(test: &str) -> bool {
        let yes = Cpu::get().avx512_bf16().is_some();
        if !yes {
            eprintln!("{test}: skipped, this CPU has no AVX-512 BF16");
        }
        yes
    }

    #[test]
    fn avx512_bf16_matches_its_scalar_reference_bit_for_bit() {
        if !has_avx512_bf16("avx512_bf16_matches_its_scalar_reference_bit_for_bit") {
            return;
        }
        // Ragged register blocks (m, n not multiples of 4), tails of every length class (k not a
        // multiple of 32, k < 32), several k blocks (k > 2048) with a tail, several panels of 48
        // rows with a ragged last one.
        for &(n, k, m) in &[
            (1, 64, 10),
            (1, 7, 3),
            (3, 300, 7),
            (4, 1030, 50),
            (5, 2051, 49),
            (6, 4096, 9),
            (17, 200, 97),
            (37, 4133, 13),
        ] {
            let x = bf16::narrow(&random(n * k, 11 + n as u64));
            let w = bf16::narrow(&random(m * k, 12 + m as u64));
            let want = xwt_bf16_reference(&x, n, k, &w, m);
            let got = xwt_same_with(Kernel::Avx512, &x, n, k, &w, m);
            assert_eq!(bits(&got), bits(&want), "{n}x{k}x{m}");
            // Same products as the AVX2 kernel, another summation order.
            let a2 = xwt_same_with(Kernel::Avx2, &x, n, k, &w, m);
            for (a, b) in a2.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt(), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn avx512_fma_path_matches_the_dot_kernel_bit_for_bit() {
        if !has_avx512_bf16("avx512_fma_path_matches_the_dot_kernel_bit_for_bit") {
            return;
        }
        // Ragged blocks (m not a multiple of 4, n not of 6), k tails (k % 32 ≠ 0, k < 32), several
        // k blocks with a tail, several panels with a ragged last one, n across FMA_MIN_TOKENS.
        for &(n, k, m) in &[
            (1, 64, 10),
            (1, 7, 3),
            (7, 300, 7),
            (13, 1030, 50),
            (16, 2051, 49),
            (17, 4096, 9),
            (40, 200, 97),
            (37, 4133, 13),
        ] {
            let x = bf16::narrow(&random(n * k, 41 + n as u64));
            let w = bf16::narrow(&random(m * k, 42 + m as u64));
            let dot = xwt_bf16_path(Bf16Path::Dot, &x, n, k, &w, m).unwrap();
            let fma = xwt_bf16_path(Bf16Path::Fma, &x, n, k, &w, m).unwrap();
            assert_eq!(bits(&fma), bits(&dot), "{n}x{k}x{m}");
            assert_eq!(bits(&fma), bits(&xwt_bf16_reference(&x, n, k, &w, m)));
            assert_eq!(
                bits(&fma),
                bits(&xwt_same_with(Kernel::Avx512, &x, n, k, &w, m))
            );
        }
        // Sums that land in or next to the denormal range (FTZ / DAZ in the FMA path, the
        // instruction's own flushing in the dot path; 16-lane and k-block sums unflushed in
        // both): sparse values around 2⁻⁶³ whose products are around 2⁻¹²⁶, mixed signs.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, k, m) = (19, 2100, 23);
        let mut pick = |len: usize| -> Vec<bf16> {
            (0..len)
                .map(|_| {
                    if rng.random_bool(0.95) {
                        return bf16::ZERO;
                    }
                    let e = rng.random_range(-65i32..-61);
                    let s = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
                    let f = [1.0f32, 1.5, 1.25, 1.75][rng.random_range(0..4)];
                    bf16::from_f32(s * f * 2f32.powi(e))
                })
                .collect()
        };
        let (x, w) = (pick(n * k), pick(m * k));
        let dot = xwt_bf16_path(Bf16Path::Dot, &x, n, k, &w, m).unwrap();
        let fma = xwt_bf16_path(Bf16Path::Fma, &x, n, k, &w, m).unwrap();
        let denormal = dot.iter().filter(|v| v.is_subnormal()).count();
        assert!(denormal > 10, "the case reaches denormal sums ({denormal})");
        assert_eq!(bits(&fma), bits(&dot));
        // MXCSR is restored: a denormal sum still is one afterwards.
        let d = std::hint::black_box(2f32.powi(-120)) * std::hint::black_box(2f32.powi(-10));
        assert!(d.is_subnormal());
    }

    #[test]
    fn avx512_bf16_denormals_ties_and_signed_zeros_match_the_reference() {
        if !has_avx512_bf16("avx512_bf16_denormals_ties_and_signed_zeros_match_the_reference") {
            return;
        }
        // Values that tell the instruction's semantics apart: denormal operands (read as zero),
        // products and partial sums in the denormal range (flushed), half-ulp ties (two
        // roundings, odd element first), signed zeros, huge values (overflow to infinity).
        let special = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            2f32.powi(-24),
            1.5 * 2f32.powi(-24),
            2f32.powi(-63),
            2f32.powi(-64),
            -2f32.powi(-70),
            2f32.powi(-126),
            -1.5 * 2f32.powi(-126),
            f32::from_bits(0x0001_0000), // a bf16 denormal
            -f32::from_bits(0x0040_0000),
            2f32.powi(30),
            -2f32.powi(30),
            2f32.powi(100),
            3.0,
            0.1,
        ];
        let (n, k, m) = (5, 77, 6);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        let mut pick = |len: usize| -> Vec<bf16> {
            (0..len)
                .map(|_| bf16::from_f32(special[rng.random_range(0..special.len())]))
                .collect()
        };
        for _ in 0..20 {
            let x = pick(n * k);
            let w = pick(m * k);
            let want = xwt_bf16_reference(&x, n, k, &w, m);
            let got = xwt_same_with(Kernel::Avx512, &x, n, k, &w, m);
            assert_eq!(bits(&got), bits(&want));
            let fma = xwt_bf16_path(Bf16Path::Fma, &x, n, k, &w, m).unwrap();
            assert_eq!(bits(&fma), bits(&want), "the FMA path");
        }
        // The step itself: two roundings, the odd element first; denormals flushed.
        let one = bf16::ONE;
        let h = bf16::from_f32(2f32.powi(-24));
        let h15 = bf16::from_f32(1.5 * 2f32.powi(-24));
        // Lane 0 holds 1 (group 0), then gets x[33]·1 and x[32]·1 (group 1): the odd element
        // first gives 1 + 2⁻²² (1 + 1.5·2⁻²⁴ rounds up, then a tie rounds to even), the even
        // element first would give 1 + 2⁻²³.
        let mut x = vec![bf16::ZERO; 34];
        let mut w = vec![bf16::ZERO; 34];
        (x[0], x[32], x[33]) = (one, h, h15);
        (w[0], w[32], w[33]) = (one, one, one);
        let y = xwt_same_with(Kernel::Avx512, &x, 1, 34, &w, 1);
        assert_eq!(y[0], 1.0 + 2f32.powi(-22));
        assert_eq!(bits(&y), bits(&xwt_bf16_reference(&x, 1, 34, &w, 1)));
        assert_eq!(
            dpbf16_step_reference(1.0, h, one),
            1.0,
            "a tie rounds to even"
        );
        assert_eq!(
            dpbf16_step_reference(1.0 + 2f32.powi(-23), h, one),
            1.0 + 2f32.powi(-22),
            "a tie rounds to even (upwards)"
        );
        let tiny = bf16::from_f32(2f32.powi(-70));
        assert_eq!(dpbf16_step_reference(0.0, tiny, tiny).to_bits(), 0);
        let den = bf16::from_bits(1);
        assert_eq!(dpbf16_step_reference(0.0, den, one).to_bits(), 0);
    }

    #[test]
    fn avx512_bf16_rows_do_not_depend_on_the_batch_or_the_threads() {
        if !has_avx512_bf16("avx512_bf16_rows_do_not_depend_on_the_batch_or_the_threads") {
            return;
        }
        // n ≥ FMA_MIN_TOKENS takes the FMA path, a single row and FMA_MIN_TOKENS − 1 rows the dot
        // path: same bits.
        let (n, k, m) = (FMA_MIN_TOKENS.max(37), 1000, 131);
        let x = bf16::narrow(&random(n * k, 21));
        let w = bf16::narrow(&random(m * k, 22));
        let all = xwt_same_with(Kernel::Avx512, &x, n, k, &w, m);
        for r in [0usize, 3, 4, 17, n - 1] {
            let one = xwt_same_with(Kernel::Avx512, &x[r * k..(r + 1) * k], 1, k, &w, m);
            assert_eq!(bits(&all[r * m..(r + 1) * m]), bits(&one), "row {r}");
        }
        let few = FMA_MIN_TOKENS - 1;
        let part = xwt_same_with(Kernel::Avx512, &x[16 * k..(16 + few) * k], few, k, &w, m);
        assert_eq!(bits(&all[16 * m..(16 + few) * m]), bits(&part), "rows 16..");
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| xwt_same_with(Kernel::Avx512, &x, n, k, &w, m))
        };
        assert_eq!(bits(&run(1)), bits(&all));
        assert_eq!(bits(&run(3)), bits(&all));
    }

    #[test]
    fn xwt_same_widens_other_types_exactly() {
        // f32 / f16 (and bf16 on the AVX2 path) equal `xwt` on the widened activations.
        let (n, k, m) = (5, 130, 21);
        let xf = random(n * k, 31);
        let w32 = random(m * k, 32);
        assert_eq!(
            bits(&xwt_same(&xf, n, k, &w32, m)),
            bits(&xwt(&xf, n, k, &w32, m))
        );
        let (x16, w16) = (f16::narrow(&xf), f16::narrow(&w32));
        let mut x16f = vec![0f32; n * k];
        f16::widen(&x16, &mut x16f);
        assert_eq!(
            bits(&xwt_same(&x16, n, k, &w16, m)),
            bits(&xwt(&x16f, n, k, &w16, m))
        );
        let (xb, wb) = (bf16::narrow(&xf), bf16::narrow(&w32));
        let mut xbf = vec![0f32; n * k];
        bf16::widen(&xb, &mut xbf);
        assert_eq!(
            bits(&xwt_same_with(Kernel::Avx2, &xb, n, k, &wb, m)),
            bits(&xwt_with(Kernel::Avx2, &xbf, n, k, &wb, m))
        );
    }

    /// `round_bf16` equals `half`'s conversion on every class of value: a stride through all 2³²
    /// bit patterns, every pattern around the rounding boundary of some values, NaNs, infinities,
    /// denormals, signed zeros and the overflow to infinity.
    #[test]
    fn round_bf16_equals_half() {
        let check = |b: u32| {
            let x = f32::from_bits(b);
            let want = bf16::from_f32(x).to_f32().to_bits();
            assert_eq!(round_bf16(x).to_bits(), want, "{b:#010x}");
        };
        let mut b = 0u32;
        loop {
            check(b);
            match b.checked_add(4093) {
                Some(n) => b = n,
                None => break,
            }
        }
        for base in [
            0u32,
            0x3f80_0000,
            0x7f7f_0000,
            0x0000_8000,
            0x7f80_0000,
            0x8000_0000,
        ] {
            for low in 0..0x2_0000u32 {
                check(base | low);
                check((base | low) ^ 0x8000_0000);
            }
        }
        for b in [
            0x7fc0_0000u32,
            0x7f80_0001,
            0xffff_ffff,
            0x7f7f_ffff,
            0x0000_0001,
            0x807f_ffff,
        ] {
            check(b);
        }
    }

    #[test]
    fn kernel_env_values() {
        assert_eq!(parse_kernel("avx512"), Ok(Kernel::Avx512));
        assert_eq!(parse_kernel(""), Ok(Kernel::Avx512));
        assert_eq!(parse_kernel(" avx2 "), Ok(Kernel::Avx2));
        assert_eq!(parse_kernel("avx2-novnni"), Ok(Kernel::Avx2));
        assert_eq!(
            env_no_vnni(),
            std::env::var("MOE_XRAY_KERNEL").is_ok_and(|v| v.trim() == "avx2-novnni")
        );
        assert_eq!(parse_kernel("generic"), Ok(Kernel::Gemm));
        let e = parse_kernel("avx-512").unwrap_err();
        assert!(
            e.contains("MOE_XRAY_KERNEL") && e.contains("avx-512"),
            "{e}"
        );
        assert!(["avx512-bf16", "avx2-fma", "gemm"].contains(&kernel_name(ElemKind::Bf16)));
        if env_kernel() == Ok(Kernel::Avx512) && Cpu::get().avx512_bf16().is_some() {
            assert_eq!(kernel_name(ElemKind::Bf16), "avx512-bf16");
        }
        assert_ne!(kernel_name(ElemKind::F32), "avx512-bf16");
    }

    #[test]
    fn from_bytes_checks_length_and_alignment() {
        #[repr(C, align(8))]
        struct Aligned([u8; 16]);
        let mut a = Aligned([0; 16]);
        for (c, v) in a.0.chunks_mut(4).zip([1.0f32, -2.0, 3.5, 0.25]) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(f32::from_bytes(&a.0), Some(&[1.0f32, -2.0, 3.5, 0.25][..]));
        assert_eq!(f32::from_bytes(&a.0[4..12]), Some(&[-2.0f32, 3.5][..]));
        assert_eq!(f32::from_bytes(&a.0[1..5]), None, "misaligned");
        assert_eq!(f32::from_bytes(&a.0[..6]), None, "not whole values");
        assert_eq!(bf16::from_bytes(&a.0[..6]).map(<[bf16]>::len), Some(3));
        assert_eq!(f16::from_bytes(&a.0[1..3]), None, "misaligned");
    }

    #[test]
    fn thread_count_does_not_change_results() {
        let (n, k, m) = (9, 512, 700);
        let x = random(n * k, 5);
        let w = bf16::narrow(&random(m * k, 6));
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| xwt(&x, n, k, &w, m))
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
