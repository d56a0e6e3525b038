//! `y = x · Wᵀ` with f32 activations and MXFP4 weights read in their packed form (OCP
//! microscaling FP4: blocks of 32 E2M1 values sharing one E8M0 power-of-two scale).
//!
//! Two storage layouts of the same numbers:
//! - [`MxLayout::Hf`]: gpt-oss's published safetensors (`*_blocks` `[rows, k/32, 16]` u8 and
//!   `*_scales` `[rows, k/32]` u8); byte `j` of a block holds value `2j` in its low nibble and
//!   `2j + 1` in its high nibble (transformers' `integrations/mxfp4.py`);
//! - [`MxLayout::Ggml`]: llama.cpp's `block_mxfp4` (GGUF type 39), 17 bytes per block: the E8M0
//!   byte, then 16 bytes whose low nibbles are values `0..16` and high nibbles values `16..32`.
//!
//! A value is `KVALUES[nibble] · e8m0_half(scale)`, where [`KVALUES`] are the E2M1 values doubled
//! (`0, 0.5, 1, 1.5, 2, 3, 4, 6` and their negatives, times two) and [`e8m0_half`] is `2^(e−128)`
//! (ggml's `ggml_e8m0_to_fp32_half`). Both factors are exact in f32 and so is their product: the
//! decoded weights are exactly transformers' / gguf-py's dequantised f32 weights.
//!
//! The kernel never dequantises a whole matrix: the AVX2 and scalar paths decode a panel of rows
//! (a few hundred KiB) into a per-thread f32 buffer and multiply it while it is in L2; the
//! AVX-512 path (`arch/x86_64/avx512/mxfp4.rs`) decodes two rows' blocks into registers and
//! multiplies them at once, eight tokens per decode. Each output element is
//! summed exactly as [`crate::matmul::xwt_reference`] sums it (k blocks of 1024, eight lanes of
//! fused multiply-adds per block, a fixed-order horizontal sum, block sums added in order), so
//! the result does not depend on the batch, the panel or the thread count, and it equals
//! `xwt_reference` on the dequantised weights bit for bit. The AVX-512 (F + BW) and AVX2 + FMA
//! paths (`vpshufb` decoding) are chosen at run time ([`mxfp4_path`], capped by
//! `MOE_XRAY_KERNEL=avx512|avx2|generic`) and tested bit for bit against the scalar reference
//! [`xwt_mxfp4_reference`].

use rayon::prelude::*;

use crate::cpu::Cpu;
use crate::matmul::{hsum_reference, Kernel};

/// Values per MXFP4 block.
pub const BLOCK: usize = 32;
/// Bytes of packed nibbles per block.
pub const NIBBLE_BYTES: usize = 16;
/// Bytes per block in ggml's layout (scale byte + nibbles).
pub const GGML_BLOCK_BYTES: usize = 17;
/// The E2M1 values, doubled (ggml's `kvalues_mxfp4`), by nibble.
pub const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// k block of the summation (as the matmul kernel's `KC`).
pub(crate) const KC: usize = 1024;

/// Half the E8M0 scale `2^(e−127)`, i.e. `2^(e−128)`, exactly (subnormal for `e < 2`; `e = 255`
/// gives `2^127`, as ggml decodes it).
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (u32::from(e) - 1) << 23
    };
    f32::from_bits(bits)
}

/// How the blocks of an MXFP4 matrix are stored (see the module docs).
#[derive(Debug, Clone, Copy)]
pub enum MxLayout<'a> {
    /// Separate nibble blocks (`rows · k/32 · 16` bytes) and scales (`rows · k/32` bytes);
    /// nibbles interleaved (low = value `2j`, high = value `2j + 1`).
    Hf { blocks: &'a [u8], scales: &'a [u8] },
    /// ggml's 17-byte blocks; nibbles split (low = value `j`, high = value `j + 16`).
    Ggml { data: &'a [u8] },
}

/// An MXFP4 matrix `[rows, k]` (row-major, each row `k / 32` blocks), sizes checked.
#[derive(Debug, Clone, Copy)]
pub struct MxMatrix<'a> {
    layout: MxLayout<'a>,
    rows: usize,
    k: usize,
}

impl<'a> MxMatrix<'a> {
    /// The matrix, or `None` when `k` is not a positive multiple of 32 or the byte slices are
    /// not exactly the size `rows × k` needs.
    pub fn new(layout: MxLayout<'a>, rows: usize, k: usize) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return None;
        }
        let blocks = rows.checked_mul(k / BLOCK)?;
        let ok = match layout {
            MxLayout::Hf { blocks: b, scales } => {
                b.len() == blocks.checked_mul(NIBBLE_BYTES)? && scales.len() == blocks
            }
            MxLayout::Ggml { data } => data.len() == blocks.checked_mul(GGML_BLOCK_BYTES)?,
        };
        ok.then_some(MxMatrix { layout, rows, k })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row length (values).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The stored bytes.
    pub fn layout(&self) -> MxLayout<'a> {
        self.layout
    }

    /// Rows `r0..r1` as a matrix of their own (`None` if out of range).
    pub fn sub(&self, r0: usize, r1: usize) -> Option<MxMatrix<'a>> {
        if r0 > r1 || r1 > self.rows {
            return None;
        }
        let bpr = self.k / BLOCK;
        let layout = match self.layout {
            MxLayout::Hf { blocks, scales } => MxLayout::Hf {
                blocks: blocks.get(r0 * bpr * NIBBLE_BYTES..r1 * bpr * NIBBLE_BYTES)?,
                scales: scales.get(r0 * bpr..r1 * bpr)?,
            },
            MxLayout::Ggml { data } => MxLayout::Ggml {
                data: data.get(r0 * bpr * GGML_BLOCK_BYTES..r1 * bpr * GGML_BLOCK_BYTES)?,
            },
        };
        Some(MxMatrix {
            layout,
            rows: r1 - r0,
            k: self.k,
        })
    }

    /// Block `b` of the whole matrix (row-major block index): its scale byte, its nibbles and
    /// whether they are interleaved.
    #[inline(always)]
    pub(crate) fn block(&self, b: usize) -> (u8, &'a [u8; NIBBLE_BYTES], bool) {
        match self.layout {
            MxLayout::Hf { blocks, scales } => (scales[b], arr16(blocks, b * NIBBLE_BYTES), true),
            MxLayout::Ggml { data } => {
                let o = b * GGML_BLOCK_BYTES;
                (data[o], arr16(data, o + 1), false)
            }
        }
    }

    /// Row `r` decoded into `out` (length `k`), exactly.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.k,
            "mxfp4: row or buffer size"
        );
        let bpr = self.k / BLOCK;
        for (j, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (e, q, inter) = self.block(r * bpr + j);
            decode_block_scalar(e, q, inter, arr32_mut(dst));
        }
    }

    /// The whole matrix decoded (tests and small tensors only).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.k];
        for (r, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// One block's 32 values (the scalar decoder; the AVX2 one gives the same bits).
#[inline]
pub fn decode_block_scalar(e: u8, q: &[u8; NIBBLE_BYTES], interleaved: bool, out: &mut [f32; 32]) {
    let d = e8m0_half(e);
    for (j, &b) in q.iter().enumerate() {
        let lo = f32::from(KVALUES[usize::from(b & 0x0F)]) * d;
        let hi = f32::from(KVALUES[usize::from(b >> 4)]) * d;
        if interleaved {
            out[2 * j] = lo;
            out[2 * j + 1] = hi;
        } else {
            out[j] = lo;
            out[j + 16] = hi;
        }
    }
}

/// The 16 bytes at `i` of `s` (bounds-checked).
#[inline(always)]
pub(crate) fn arr16(s: &[u8], i: usize) -> &[u8; NIBBLE_BYTES] {
    #[allow(clippy::expect_used)] // the slice has exactly 16 elements
    s[i..i + NIBBLE_BYTES].try_into().expect("16 bytes")
}

/// `s` (exactly one block long) as an array.
#[inline(always)]
pub(crate) fn arr32_mut(s: &mut [f32]) -> &mut [f32; BLOCK] {
    #[allow(clippy::expect_used)] // chunks of exactly BLOCK elements
    s.try_into().expect("32 values")
}

/// Rows per panel: as many as fit 256 KiB of f32, between 4 and 64 (depends on `k` only).
fn panel_rows(k: usize) -> usize {
    ((64 * 1024) / k.max(1)).clamp(4, 64)
}

/// The implementation [`xwt_mxfp4_on`] runs.
#[derive(Debug, Clone, Copy)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::cpu::Avx2Fma),
    #[cfg(target_arch = "x86_64")]
    Avx512(crate::cpu::Avx512Vnni),
}

impl Path {
    /// The best path of `cpu`, capped by `MOE_XRAY_KERNEL` (`avx512`, `avx2`, `generic`).
    fn choose(cpu: Cpu) -> Path {
        let cap = crate::matmul::env_kernel().unwrap_or(Kernel::Avx512);
        #[cfg(target_arch = "x86_64")]
        {
            if cap == Kernel::Avx512 {
                if let Some(t) = cpu.avx512_vnni() {
                    return Path::Avx512(t);
                }
            }
            if cap != Kernel::Gemm {
                if let Some(t) = cpu.avx2_fma() {
                    return Path::Avx2(t);
                }
            }
        }
        let _ = (cpu, cap);
        Path::Scalar
    }

    fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => "avx512",
        }
    }
}

/// The path [`xwt_mxfp4_on`] takes for `cpu` (capped by `MOE_XRAY_KERNEL`): `"avx512"`
/// (AVX-512 F + BW), `"avx2"` (AVX2 + FMA) or `"scalar"`.
pub fn mxfp4_path(cpu: Cpu) -> &'static str {
    Path::choose(cpu).name()
}

/// `y [n, rows] = x [n, k] · Wᵀ` for MXFP4 `w` (AVX-512 or AVX2 + FMA where the CPU has it and
/// `MOE_XRAY_KERNEL` allows it, else the scalar reference's operations; panel-parallel; the
/// same bits on every path). Panics if `x` is shorter than `n · k`.
pub fn xwt_mxfp4(x: &[f32], n: usize, w: &MxMatrix<'_>) -> Vec<f32> {
    xwt_mxfp4_on(Cpu::get(), x, n, w)
}

/// [`xwt_mxfp4`] on the paths of a given CPU description (`Cpu::scalar()` forces the scalar one,
/// `Cpu::get().without_avx512()` the AVX2 one).
pub fn xwt_mxfp4_on(cpu: Cpu, x: &[f32], n: usize, w: &MxMatrix<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.rows);
    assert!(
        n.checked_mul(k).is_some_and(|v| x.len() >= v) && n.checked_mul(m).is_some(),
        "xwt_mxfp4: operand sizes"
    );
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let path = Path::choose(cpu);
    let pr = panel_rows(k);
    let panels: Vec<Vec<f32>> = (0..m.div_ceil(pr))
        .into_par_iter()
        .map_init(Vec::<f32>::new, |buf, p| {
            let r0 = p * pr;
            let r1 = (r0 + pr).min(m);
            let rows = r1 - r0;
            let bpr = k / BLOCK;
            let mut out = vec![0f32; n * rows];
            match path {
                #[cfg(target_arch = "x86_64")]
                Path::Avx512(t) => avx512::xwt_fused(t, x, n, w, r0, rows, &mut out),
                #[cfg(target_arch = "x86_64")]
                Path::Avx2(t) => {
                    buf.resize(rows * k, 0.0);
                    avx2::decode_rows(t, w, r0 * bpr, buf);
                    avx2::dot_panel(t, x, n, k, buf, rows, &mut out);
                }
                Path::Scalar => {
                    buf.resize(rows * k, 0.0);
                    for (i, dst) in buf.chunks_exact_mut(BLOCK).enumerate() {
                        let (e, q, inter) = w.block(r0 * bpr + i);
                        decode_block_scalar(e, q, inter, arr32_mut(dst));
                    }
                    for t in 0..n {
                        for r in 0..rows {
                            out[t * rows + r] =
                                dot_reference(&x[t * k..(t + 1) * k], &buf[r * k..(r + 1) * k]);
                        }
                    }
                }
            }
            out
        })
        .collect();
    for (p, out) in panels.iter().enumerate() {
        let r0 = p * pr;
        let rows = out.len() / n;
        for t in 0..n {
            y[t * m + r0..t * m + r0 + rows].copy_from_slice(&out[t * rows..(t + 1) * rows]);
        }
    }
    y
}

/// One output element in the kernel's order (k blocks of [`KC`]: eight lanes of fused
/// multiply-adds, [`hsum_reference`], block sums added in order); `k` is a multiple of 8.
#[inline]
fn dot_reference(x: &[f32], w: &[f32]) -> f32 {
    let k = x.len();
    let mut out = 0f32;
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + KC).min(k);
        let mut acc = [0f32; 8];
        for kk in (k0..k1).step_by(8) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = x[kk + l].mul_add(w[kk + l], *a);
            }
        }
        let s = hsum_reference(acc);
        out = if k0 == 0 { s } else { out + s };
        k0 = k1;
    }
    out
}

/// The scalar reference of [`xwt_mxfp4`]: one row decoded at a time, one output at a time, in
/// the kernel's order (tests and documentation; slow).
pub fn xwt_mxfp4_reference(x: &[f32], n: usize, w: &MxMatrix<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.rows);
    assert!(x.len() >= n * k, "xwt_mxfp4: operand sizes");
    let mut y = vec![0f32; n * m];
    let mut row = vec![0f32; k];
    for r in 0..m {
        w.dequantize_row(r, &mut row);
        for t in 0..n {
            y[t * m + r] = dot_reference(&x[t * k..(t + 1) * k], &row);
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/mxfp4.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/mxfp4.rs"]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random()).collect()
    }

    fn random_x(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Scales in a range where the products stay finite (the kernel is exact anyway).
    fn scales(len: usize, seed: u64) -> Vec<u8> {
        random_bytes(len, seed)
            .into_iter()
            .map(|b| 100 + b % 40)
            .collect()
    }

    #[test]
    fn e8m0_matches_powers_of_two() {
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(130), 4.0);
        assert_eq!(e8m0_half(0), 2f32.powi(-128));
        assert_eq!(e8m0_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_half(2), 2f32.powi(-126));
        assert_eq!(e8m0_half(255), 2f32.powi(127));
    }

    #[test]
    fn decodes_both_layouts_as_documented() {
        // Nibbles 1 (0.5) low and 0xF (-6) high; scale 127 = 2^0.
        let q = [0xF1u8; 16];
        let mut out = [0f32; 32];
        decode_block_scalar(127, &q, true, &mut out);
        for j in 0..16 {
            assert_eq!((out[2 * j], out[2 * j + 1]), (0.5, -6.0));
        }
        let mut q2 = [0u8; 16];
        q2[0] = 0x72; // low 2 (1.0), high 7 (6.0)
        decode_block_scalar(128, &q2, false, &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[16], 12.0);
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, &v)| i == 0 || i == 16 || v == 0.0));
    }

    #[test]
    fn simd_paths_and_scalar_agree_bit_for_bit_and_equal_dequantised_reference() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Odd row counts (the AVX-512 path pairs rows), one block per row, token counts around
        // both unrolls (4 and 8), k across the summation block (1024).
        for &(n, k, m) in &[
            (1, 32, 3),
            (1, 32, 1),
            (3, 64, 17),
            (8, 32, 2),
            (8, 96, 9),
            (5, 2880, 7),
            (17, 1056, 70),
            (4, 3072, 5),
            (17, 32, 65),
        ] {
            let nb = m * k / BLOCK;
            let x = random_x(n * k, 3 + n as u64);
            let hb = random_bytes(nb * 16, 4 + m as u64);
            let hs = scales(nb, 5 + k as u64);
            let mut gd = random_bytes(nb * 17, 6);
            for (i, s) in hs.iter().enumerate() {
                gd[i * 17] = *s;
            }
            for layout in [
                MxLayout::Hf {
                    blocks: &hb,
                    scales: &hs,
                },
                MxLayout::Ggml { data: &gd },
            ] {
                let w = MxMatrix::new(layout, m, k).unwrap();
                let want = xwt_mxfp4_reference(&x, n, &w);
                let scalar = xwt_mxfp4_on(Cpu::scalar(), &x, n, &w);
                assert_eq!(bits(&scalar), bits(&want), "scalar {n}x{k}x{m}");
                let auto = xwt_mxfp4(&x, n, &w);
                assert_eq!(bits(&auto), bits(&want), "auto {n}x{k}x{m}");
                // Each SIMD path this machine has, forced (the AVX2 one without AVX-512).
                let avx2 = xwt_mxfp4_on(Cpu::get().without_avx512(), &x, n, &w);
                assert_eq!(bits(&avx2), bits(&want), "avx2 {n}x{k}x{m}");
                if Cpu::get().avx512_vnni().is_some()
                    && std::env::var_os("MOE_XRAY_KERNEL").is_none()
                {
                    assert_eq!(mxfp4_path(Cpu::get()), "avx512");
                }
                if mxfp4_path(Cpu::get()) == "avx512" {
                    assert_eq!(mxfp4_path(Cpu::get().without_avx512()), "avx2");
                    let avx512 = xwt_mxfp4_on(Cpu::get(), &x, n, &w);
                    assert_eq!(bits(&avx512), bits(&want), "avx512 {n}x{k}x{m}");
                }
                // The dequantised f32 weights through the f32 matmul reference: same bits.
                let deq = w.dequantize();
                let f = crate::matmul::xwt_reference(&x, n, k, &deq, m);
                assert_eq!(bits(&f), bits(&want), "dequantised {n}x{k}x{m}");
                // A token's result does not depend on the others.
                let one = xwt_mxfp4(&x[..k], 1, &w);
                assert_eq!(bits(&one), bits(&want[..m]));
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        let b = vec![0u8; 2 * 16];
        let s = vec![0u8; 2];
        assert!(MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s
            },
            2,
            32
        )
        .is_some());
        assert!(MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s
            },
            1,
            32
        )
        .is_none());
        assert!(MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s[..1]
            },
            2,
            32
        )
        .is_none());
        assert!(MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s
            },
            1,
            48
        )
        .is_none());
        assert!(MxMatrix::new(MxLayout::Ggml { data: &b[..17] }, 1, 32).is_some());
        assert!(MxMatrix::new(MxLayout::Ggml { data: &b[..16] }, 1, 32).is_none());
        assert!(MxMatrix::new(MxLayout::Ggml { data: &b }, usize::MAX, 32).is_none());
        let w = MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s,
            },
            2,
            32,
        )
        .unwrap();
        assert_eq!(w.sub(1, 2).unwrap().rows(), 1);
        assert!(w.sub(1, 3).is_none());
    }

    #[test]
    fn thread_count_does_not_change_results() {
        let (n, k, m) = (6, 256, 300);
        let nb = m * k / BLOCK;
        let (b, s) = (random_bytes(nb * 16, 9), scales(nb, 10));
        let w = MxMatrix::new(
            MxLayout::Hf {
                blocks: &b,
                scales: &s,
            },
            m,
            k,
        )
        .unwrap();
        let x = random_x(n * k, 11);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| xwt_mxfp4(&x, n, &w))
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }
}
