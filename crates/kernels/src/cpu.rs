//! The one run-time CPU-feature check of the workspace.
//!
//! [`Cpu::get`] detects the features once per process (cached). A SIMD kernel is reachable only
//! through a token ([`Avx`], [`Avx2`], [`Avx2Fma`], [`AvxVnni`], [`Avx512Bf16`], [`Avx512Vnni`]) whose constructor returns `None` on a CPU
//! without the feature, so the `unsafe` call of a `#[target_feature]` function is justified by
//! the token's existence alone. Other crates use [`with_avx`] (an [`AvxBody`]) to compile plain Rust code with AVX
//! enabled (same operations, same results; it only changes instruction selection).

use std::sync::OnceLock;

/// The instruction-set extensions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cpu {
    avx: bool,
    avx2: bool,
    fma: bool,
    f16c: bool,
    avx512f: bool,
    avx512bw: bool,
    avx512bf16: bool,
    avx512vnni: bool,
    avxvnni: bool,
}

impl Cpu {
    /// This CPU's features (detected on the first call, then cached).
    pub fn get() -> Cpu {
        static CPU: OnceLock<Cpu> = OnceLock::new();
        *CPU.get_or_init(Cpu::detect)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect() -> Cpu {
        Cpu {
            avx: std::is_x86_feature_detected!("avx"),
            avx2: std::is_x86_feature_detected!("avx2"),
            fma: std::is_x86_feature_detected!("fma"),
            f16c: std::is_x86_feature_detected!("f16c"),
            avx512f: std::is_x86_feature_detected!("avx512f"),
            avx512bw: std::is_x86_feature_detected!("avx512bw"),
            avx512bf16: std::is_x86_feature_detected!("avx512bf16"),
            avx512vnni: std::is_x86_feature_detected!("avx512vnni"),
            avxvnni: std::is_x86_feature_detected!("avxvnni"),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect() -> Cpu {
        Cpu::default()
    }

    /// A CPU with none of the features: every kernel takes its scalar path (for tests).
    pub fn scalar() -> Cpu {
        Cpu::default()
    }

    /// The AVX token, when the CPU has AVX.
    pub fn avx(self) -> Option<Avx> {
        self.avx.then_some(Avx(()))
    }

    /// The AVX2 token, when the CPU has AVX2.
    pub fn avx2(self) -> Option<Avx2> {
        (self.avx && self.avx2).then_some(Avx2(()))
    }

    /// The AVX2 + FMA + F16C token (the matmul kernel), when the CPU has all three.
    pub fn avx2_fma(self) -> Option<Avx2Fma> {
        (self.avx && self.avx2 && self.fma && self.f16c).then_some(Avx2Fma(()))
    }

    /// The AVX2 + FMA + AVX-VNNI token (the VEX-encoded 256-bit `vpdpbusd` / `vpdpwssd` of the
    /// AVX2 quantised-weight tile: Alder Lake and later Intel cores, Zen 5), when the CPU has all
    /// three.
    pub fn avx_vnni(self) -> Option<AvxVnni> {
        (self.avx && self.avx2 && self.fma && self.avxvnni).then_some(AvxVnni(()))
    }

    /// The AVX-512 F + BW + BF16 token (the bf16 dot-product matmul kernel, `vdpbf16ps`), when
    /// the CPU has all three.
    pub fn avx512_bf16(self) -> Option<Avx512Bf16> {
        (self.avx512f && self.avx512bw && self.avx512bf16).then_some(Avx512Bf16(()))
    }

    /// The AVX-512 F + BW + VNNI token (the quantised-weight kernels, `vpdpbusd` / `vpdpwssd`),
    /// when the CPU has all three.
    pub fn avx512_vnni(self) -> Option<Avx512Vnni> {
        (self.avx512f && self.avx512bw && self.avx512vnni).then_some(Avx512Vnni(()))
    }

    /// This description without the AVX-512 features (to force the AVX2 paths).
    pub fn without_avx512(self) -> Cpu {
        Cpu {
            avx512f: false,
            avx512bw: false,
            avx512bf16: false,
            avx512vnni: false,
            ..self
        }
    }

    /// This description without AVX-VNNI (to force the plain AVX2 quantised tile).
    pub fn without_avx_vnni(self) -> Cpu {
        Cpu {
            avxvnni: false,
            ..self
        }
    }

    /// The names of the detected features the kernels use, in a fixed order (for benchmarks).
    pub fn feature_names(self) -> Vec<&'static str> {
        [
            (self.avx, "avx"),
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512bf16, "avx512bf16"),
            (self.avx512vnni, "avx512vnni"),
            (self.avxvnni, "avxvnni"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// Proof that the CPU has AVX (only [`Cpu::avx`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct Avx(());

/// Proof that the CPU has AVX2 (only [`Cpu::avx2`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct Avx2(());

/// Proof that the CPU has AVX2, FMA and F16C (only [`Cpu::avx2_fma`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct Avx2Fma(());

/// Proof that the CPU has AVX2, FMA and AVX-VNNI (only [`Cpu::avx_vnni`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct AvxVnni(());

/// Proof that the CPU has AVX-512 F, BW and BF16 (only [`Cpu::avx512_bf16`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct Avx512Bf16(());

/// Proof that the CPU has AVX-512 F, BW and VNNI (only [`Cpu::avx512_vnni`] makes one).
#[derive(Debug, Clone, Copy)]
pub struct Avx512Vnni(());

/// A computation to compile with AVX enabled (see [`with_avx`]). Implement [`AvxBody::run`] with
/// `#[inline(always)]`, and the functions it calls too: then the whole body is generated inside the
/// AVX-enabled frame. (A closure cannot carry `#[inline(always)]`; LLVM kept a large one out of
/// line, compiled *without* AVX, which made the classifier's solver 1.4× slower.)
pub trait AvxBody {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `body` compiled with AVX enabled when the CPU has AVX, else as it is. The body and
/// everything it inlines are code generated for AVX (wider registers, VEX encodings); Rust never
/// contracts `a + b * c` into a fused multiply-add, so results are identical either way.
#[inline(always)]
pub fn with_avx<B: AvxBody>(body: B) -> B::Output {
    #[cfg(target_arch = "x86_64")]
    if Cpu::get().avx().is_some() {
        #[target_feature(enable = "avx")]
        #[inline(never)]
        fn run<B: AvxBody>(body: B) -> B::Output {
            body.run()
        }
        // SAFETY: `run` only requires AVX, which the CPU has (the `Avx` token exists).
        return unsafe { run(body) };
    }
    body.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_features() {
        let s = Cpu::scalar();
        assert!(s.avx().is_none() && s.avx2().is_none() && s.avx2_fma().is_none());
        assert!(s.avx512_bf16().is_none() && s.feature_names().is_empty());
        assert!(s.avx_vnni().is_none());
        let c = Cpu::get();
        assert_eq!(c, Cpu::get());
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(c.avx2().is_some(), std::is_x86_feature_detected!("avx2"));
            assert_eq!(c.avx().is_some(), std::is_x86_feature_detected!("avx"));
            assert_eq!(
                c.avx512_bf16().is_some(),
                std::is_x86_feature_detected!("avx512bf16")
                    && std::is_x86_feature_detected!("avx512bw")
            );
            assert!(c.without_avx512().avx512_bf16().is_none());
            assert!(c.without_avx512().avx512_vnni().is_none());
            assert_eq!(
                c.avx512_vnni().is_some(),
                std::is_x86_feature_detected!("avx512vnni")
                    && std::is_x86_feature_detected!("avx512bw")
            );
            assert_eq!(
                c.without_avx512().avx2_fma().is_some(),
                c.avx2_fma().is_some()
            );
            assert_eq!(
                c.avx_vnni().is_some(),
                std::is_x86_feature_detected!("avxvnni")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
            );
            // AVX-VNNI is not an AVX-512 feature: only `without_avx_vnni` removes it.
            assert_eq!(
                c.without_avx512().avx_vnni().is_some(),
                c.avx_vnni().is_some()
            );
            assert!(c.without_avx_vnni().avx_vnni().is_none());
            assert_eq!(c.without_avx_vnni().avx2().is_some(), c.avx2().is_some());
            assert_eq!(
                c.feature_names().contains(&"avxvnni"),
                c.avx_vnni().is_some()
            );
        }
    }

    struct Sum<'a>(&'a mut usize);
    impl AvxBody for Sum<'_> {
        type Output = f64;
        #[inline(always)]
        fn run(self) -> f64 {
            *self.0 += 1;
            (0..100).map(|x| x as f64 * 0.1).sum::<f64>()
        }
    }

    #[test]
    fn with_avx_runs_the_body_once() {
        let mut n = 0;
        let v = with_avx(Sum(&mut n));
        assert_eq!(n, 1);
        assert_eq!(v, (0..100).map(|x| x as f64 * 0.1).sum::<f64>());
    }
}
