//! The only crate of moe-xray that contains `unsafe` code: every SIMD kernel, the raw-pointer
//! parallel writes of the matmul kernel, the calls into the `gemm` crate and the memory maps, each
//! behind a small **safe** API. Every other crate of the workspace is `#![forbid(unsafe_code)]`.
//!
//! Layout (as in `memchr`): each module (`sampler`, `shuffle`, `gram`, `matmul`, `rng`) holds the
//! safe entry points and a portable scalar implementation; its AVX2 version lives beside it in
//! `src/arch/x86_64/avx2/`. The CPU's features are detected once ([`cpu::Cpu`]); an AVX2 kernel
//! is only reachable through a [`cpu::Avx2`] token, which exists only when the CPU has AVX2.
//! Every SIMD path has a scalar reference and a test asserting that both give the same result
//! bit for bit (integer kernels: the same integers; float kernels: the same operations in the
//! same order).
//!
//! Rules for `unsafe` here (enforced by the workspace lints `unsafe_op_in_unsafe_fn`,
//! `clippy::undocumented_unsafe_blocks`, `clippy::missing_safety_doc`): every `unsafe fn` has a
//! `# Safety` section, every `unsafe` block a `// SAFETY:` comment naming the invariant it
//! relies on, and safe functions check (assert) the bounds their unsafe blocks rely on.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cpu;
pub mod gram;
pub mod linalg;
pub mod matmul;
pub mod mmap;
pub mod mxfp4;
pub mod quant;
pub mod rng;
pub mod sampler;
pub mod shuffle;
pub mod xw;

/// Safe loads and stores of whole arrays into AVX registers (no alignment requirement).
#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/mem.rs"]
mod mem;
