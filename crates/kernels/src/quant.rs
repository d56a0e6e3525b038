//! `y = x · Wᵀ` with f32 activations and weights in llama.cpp's (ggml's) quantised block formats
//! Q8_0, Q4_0, Q4_K, Q5_K, Q6_K and MXFP4, read in place (e.g. from a GGUF file's memory map).
//!
//! As in ggml, the activations are quantised once per call, exactly as ggml's reference
//! `quantize_row_q8_0_ref` (Q8_0 / Q4_0 / MXFP4 weights: blocks of 32, scale `max|x| / 127` rounded
//! to f16, values `round(x / d)` half away from zero) or `quantize_row_q8_K_ref` (K-quants: blocks
//! of 256, scale `max / -127` from the value of largest magnitude, values rounded half to even,
//! sums of 16 values), and each dot product is an exact integer sum per block, scaled in f32. So a
//! projection computes what llama.cpp computes, up to the order of the f32 sums (for Q8_0 in ggml's
//! own order).
//!
//! The kernel is weight-stationary: rows are split into fixed panels of [`PANEL`] rows (one rayon
//! task each). On the AVX-512 VNNI path a panel's sixteen rows are prepared once per call (Q8_0,
//! Q4_K and Q6_K unpacked in registers straight from the blocks, Q4_0 and Q5_K through a decoded
//! row; the values transposed so that i32 lane `j` of a 64-byte register holds four consecutive
//! values of row `j`; the scales gathered into sixteen-lane vectors), then every token tile (up to
//! 8 tokens) multiplies the sixteen rows at once: each token's four activation bytes broadcast, one
//! `vpdpbusd` adds four products to sixteen rows' sums. With a single tile of tokens (n ≤ 8,
//! decode), Q4_K and Q6_K skip the transposed copy: the values are unpacked and transposed in
//! registers inside the tile, and only the scale lanes are prepared. Q8_0 calls of one token
//! multiply the blocks as stored, each row's bytes in address order, and reduce the sixteen rows'
//! partial sums of each block pair to one lane per row. While a panel computes, the bytes of the
//! next one are prefetched into L2 (a decode call reads its weights from memory). The AVX2 path
//! does the same on strips of eight rows (the values transposed four to an i32 lane of a 32-byte
//! register, tiles of up to 4 tokens, `vpmaddubsw` on |w| · sign(x, w) for Q8_0 and MXFP4 (its
//! nibbles looked up as the signed E2M1 values with `vpshufb`), on the unsigned values summed in
//! i16 below saturation for the others; every type unpacked in registers from the blocks; Q8_0 and
//! MXFP4 calls of 1–4 tokens, Q4_0 of 1–2 and K-quants of 1–4 multiply the blocks as they are,
//! eight rows' sums reduced with `vphaddd`; with AVX-VNNI, `vpdpbusd` on `w + 128` / the unsigned
//! values, Q8_0 direct up to 2 tokens: `avx2-vnni`, `MOE_XRAY_KERNEL=avx2-novnni` turns it off).
//! The generic path decodes one row at a time into a small per-thread buffer (unsigned 8-bit
//! values, the 16-value group scales widened to i16, the f32 block scales) and takes the tokens in
//! blocks of `TBLOCK` (64), decoding each row once per token block: one weight read per call up to
//! 64 tokens.
//!
//! Integer part (exact on every path, identical integers): for K-quants, per super-block of 256,
//! `ia = Σ scale(group(i)) · q[i] · x[i]` and the group corrections `ib = Σ_g cm[g] · xs[g]`
//! (Q4_K / Q5_K: the sub-block minimum times the activations' 16-value sums; Q6_K: 32 · scale,
//! the values' offset); for Q8_0 / Q4_0 / MXFP4, per block of 32, `s = −offset · Σ x + Σ q · x`
//! (= `Σ w · x`, `q` the stored value made unsigned: `w + 128` / the nibble / the doubled E2M1
//! value plus 128).
//!
//! Float part (the same operations in the same order on every path, no fused multiply-adds):
//! K-quants `fa += f32(ia) · (d_w · d_x)` and `fb += f32(ib) · (dmin_w · d_x)` per super-block in
//! order, result `fa − fb`; Q8_0 / Q4_0 / MXFP4 `acc += f32(s) · (d_w · d_x)` per block in order,
//! which is ggml's `ggml_vec_dot_q8_0_q8_0` bit for bit (MXFP4: `d_w = 2^(e − 128)`, as
//! `ggml_vec_dot_mxfp4_q8_0`). Every output element is computed alone from its row and its token,
//! so results are bit-identical on every path ([`xwt_q_with`]), for any `n`, panel split, tile or
//! thread count.

use half::f16;
use rayon::prelude::*;

use crate::cpu::Cpu;
use crate::matmul::{env_kernel, env_no_vnni, Kernel};
use crate::mxfp4::{e8m0_half, KVALUES};

/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Values per Q8_0 / Q4_0 block.
pub const QK: usize = 32;
/// Weight rows per rayon task.
pub const PANEL: usize = 16;

// The AVX-512 tile prepares exactly one panel of rows at a time.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(PANEL == avx512::ROWS);

/// The quantised weight types the kernel reads (ggml block layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 34-byte blocks of 32: f16 scale, 32 × i8.
    Q8_0,
    /// 18-byte blocks of 32: f16 scale, 16 bytes of nibbles (value `nibble − 8`).
    Q4_0,
    /// 144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128
    /// bytes of nibbles.
    Q4K,
    /// 176-byte super-blocks of 256: as Q4_K plus 32 bytes of fifth bits.
    Q5K,
    /// 210-byte super-blocks of 256: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs,
    /// 16 × i8 scales, f16 d (value `q − 32`).
    Q6K,
    /// 17-byte blocks of 32 (ggml's `block_mxfp4`, GGUF type 39): the E8M0 scale byte `e`, 16
    /// bytes of nibbles (low: values 0..16, high: 16..32); value `KVALUES[nibble] · 2^(e − 128)`
    /// (the E2M1 value doubled times half the scale, [`crate::mxfp4`]). Multiplied as ggml's
    /// `ggml_vec_dot_mxfp4_q8_0` does: Q8_0 activations, the integer `Σ KVALUES[q] · x` per
    /// block, times `2^(e − 128) · d_x`. Not on the AVX-512 path (the AVX2 tile runs it there).
    Mxfp4,
}

impl QType {
    /// Every type the kernel reads.
    pub const ALL: [QType; 6] = [
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
        QType::Mxfp4,
    ];

    /// The type of ggml name `name` (`q8_0`, `q4_0`, `q4_K`, `q5_K`, `q6_K`, `mxfp4`).
    pub fn from_name(name: &str) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q8_0 | QType::Q4_0 | QType::Mxfp4 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
            QType::Mxfp4 => 17,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4K => "q4_K",
            QType::Q5K => "q5_K",
            QType::Q6K => "q6_K",
            QType::Mxfp4 => "mxfp4",
        }
    }

    /// Whether the type is a K-quant (super-blocks of 256, Q8_K activations).
    fn is_k(self) -> bool {
        !matches!(self, QType::Q8_0 | QType::Q4_0 | QType::Mxfp4)
    }

    /// The offset subtracted from the stored unsigned value (Q8_0 and MXFP4: a decoded row
    /// holds `w + 128`).
    fn offset(self) -> i32 {
        match self {
            QType::Q8_0 | QType::Mxfp4 => 128,
            QType::Q4_0 => 8,
            _ => 0,
        }
    }
}

/// A quantised matrix `[rows, k]` (row-major, each row `k / block_values` blocks), sizes checked.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    ty: QType,
    data: &'a [u8],
    rows: usize,
    k: usize,
}

impl<'a> QMatrix<'a> {
    /// The matrix, or `None` when `k` is not a positive multiple of the type's block or `data`
    /// is not exactly the size `rows × k` needs.
    pub fn new(ty: QType, data: &'a [u8], rows: usize, k: usize) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(ty.block_values()) {
            return None;
        }
        let bytes = rows
            .checked_mul(k / ty.block_values())?
            .checked_mul(ty.block_bytes())?;
        (data.len() == bytes).then_some(QMatrix { ty, data, rows, k })
    }

    /// The weight type.
    pub fn ty(&self) -> QType {
        self.ty
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row length (values).
    pub fn k(&self) -> usize {
        self.k
    }

    fn row_bytes(&self) -> usize {
        self.k / self.ty.block_values() * self.ty.block_bytes()
    }

    /// The bytes of row `r` (`r < rows`).
    fn row(&self, r: usize) -> &'a [u8] {
        let b = self.row_bytes();
        &self.data[r * b..(r + 1) * b]
    }

    /// Row `r` dequantised into `out` (length `k`) with ggml's `dequantize_row_*` formulas.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.k,
            "quant: row or buffer size"
        );
        let (bv, bb) = (self.ty.block_values(), self.ty.block_bytes());
        for (blk, y) in self.row(r).chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
            dequantize_block(self.ty, blk, y);
        }
    }

    /// The whole matrix dequantised (tests and small tensors only).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.k];
        for (r, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One block dequantised (ggml's reference formulas and operation order).
fn dequantize_block(ty: QType, b: &[u8], y: &mut [f32]) {
    match ty {
        QType::Q8_0 => {
            let d = f16_at(b, 0);
            for (j, v) in y.iter_mut().enumerate() {
                *v = f32::from(b[2 + j] as i8) * d;
            }
        }
        QType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                y[j] = f32::from(i16::from(b[2 + j] & 0xF) - 8) * d;
                y[j + 16] = f32::from(i16::from(b[2 + j] >> 4) - 8) * d;
            }
        }
        QType::Q4K | QType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == QType::Q5K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for c in 0..4 {
                let (s1, m1) = scale_min_k4(2 * c, scales);
                let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                for l in 0..32 {
                    let (mut lo, mut hi) = (qs[32 * c + l] & 0xF, qs[32 * c + l] >> 4);
                    if ty == QType::Q5K {
                        lo += if qh[l] & (1 << (2 * c)) != 0 { 16 } else { 0 };
                        hi += if qh[l] & (2 << (2 * c)) != 0 { 16 } else { 0 };
                    }
                    y[64 * c + l] = d1 * f32::from(lo) - m1;
                    y[64 * c + 32 + l] = d2 * f32::from(hi) - m2;
                }
            }
        }
        QType::Mxfp4 => crate::mxfp4::decode_block_scalar(
            b[0],
            crate::mxfp4::arr16(b, 1),
            false,
            crate::mxfp4::arr32_mut(y),
        ),
        QType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            let mut q = [0u8; QK_K];
            unpack_q6(ql, qh, &mut q);
            for (i, v) in y.iter_mut().enumerate() {
                let s = f32::from(sc[i / 16] as i8);
                *v = d * s * f32::from(i16::from(q[i]) - 32);
            }
        }
    }
}

/// Q6_K's 6-bit values (0..64) of one super-block, in value order.
#[inline(always)]
fn unpack_q6(ql: &[u8], qh: &[u8], q: &mut [u8]) {
    for h in 0..2 {
        let (ql, qh, q) = (
            &ql[64 * h..64 * h + 64],
            &qh[32 * h..32 * h + 32],
            &mut q[128 * h..],
        );
        for l in 0..32 {
            q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activations.

/// Activations quantised for one call (see the module docs).
struct Act {
    /// n × k values.
    x: Vec<i8>,
    /// K-quants: the 16-value sums (n × k/16).
    xs: Vec<i16>,
    /// Q8_0 / Q4_0: `−offset · Σ x` of each block of 32 (n × k/32).
    init: Vec<i32>,
    /// K-quants: scale per super-block (n × k/256); Q8_0 / Q4_0: the f16 scale of each block of
    /// 32, widened (n × k/32).
    d: Vec<f32>,
    /// Row length.
    k: usize,
    /// Blocks (Q8_0 / Q4_0) or super-blocks (K-quants) per row.
    nb: usize,
}

/// `k` rounded up to a multiple of 64 (the decoded row's length: whole 64-byte chunks).
fn padded_k(k: usize) -> usize {
    k.div_ceil(64) * 64
}

/// ggml's `nearest_int`: round half to even by adding 1.5 · 2^23 (exact for |v| < 2^22; the
/// callers' values are within ±127, and anything else is clamped afterwards).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let val = v + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// C's `roundf` (half away from zero) for |v| < 2^31, without a libm call.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    // Branch-free (vectorised): at most one of the two steps applies.
    t.saturating_add(i32::from(frac >= 0.5))
        .saturating_sub(i32::from(frac <= -0.5))
}

/// ggml's `quantize_row_q8_K_ref` of one super-block: the values, the 16-value sums, the scale.
///
/// Written so that the compiler vectorises it (the largest magnitude over sixteen lanes, then
/// the first value of that magnitude, which is the value ggml's strict `>` scan keeps: NaN never
/// compares greater and `f32::max` ignores it), with the same results as the scan.
#[inline(always)]
pub fn quantize_q8k_block(x: &[f32], q: &mut [i8], sums: &mut [i16]) -> f32 {
    let x = &x[..QK_K];
    let mut lanes = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = max_of_lanes(lanes);
    if amax == 0.0 {
        q[..QK_K].fill(0);
        sums[..QK_K / 16].fill(0);
        return 0.0;
    }
    // `amax` is the magnitude of some value of the block, so the search finds it.
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
    let iscale = -127.0 / max;
    for (qv, &v) in q[..QK_K].iter_mut().zip(x) {
        *qv = nearest_int(iscale * v).clamp(-127, 127) as i8;
    }
    for (j, s) in sums[..QK_K / 16].iter_mut().enumerate() {
        *s = q[16 * j..16 * j + 16].iter().map(|&v| i16::from(v)).sum();
    }
    1.0 / iscale
}

/// ggml's `quantize_row_q8_0_ref` of one block: the values and the scale (as stored, f16).
#[inline(always)]
pub fn quantize_q8_0_block(x: &[f32], q: &mut [i8]) -> f32 {
    let x = &x[..QK];
    // The largest magnitude over sixteen lanes (`max` is exact and ignores NaN: the same value
    // as a running fold).
    let mut lanes = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = max_of_lanes(lanes);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qv, &v) in q[..QK].iter_mut().zip(x) {
        *qv = round_away(v * id).clamp(-127, 127) as i8;
    }
    f16::from_f32(d).to_f32()
}

/// The largest of sixteen magnitudes, folded as a tree (`f32::max` is exact and ignores NaN, so
/// any order gives the value of a running fold).
#[inline(always)]
fn max_of_lanes(mut l: [f32; 16]) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            l[i] = l[i].max(l[i + w]);
        }
    }
    l[0]
}

/// One token's values quantised for K-quant weights: `q` (k values), the 16-value sums `xs`
/// (k/16) and the super-block scales `d` (k/256).
#[inline(always)]
fn quantize_token_k(x: &[f32], q: &mut [i8], xs: &mut [i16], d: &mut [f32]) {
    for (s, d) in d.iter_mut().enumerate() {
        let o = s * QK_K;
        *d = quantize_q8k_block(
            &x[o..o + QK_K],
            &mut q[o..o + QK_K],
            &mut xs[o / 16..o / 16 + QK_K / 16],
        );
    }
}

/// One token's values quantised for Q8_0 / Q4_0 weights (offset `off`): `q` (k values), the
/// block offsets `init` and scales `d` (k/32 each).
#[inline(always)]
fn quantize_token_0(off: i32, x: &[f32], q: &mut [i8], init: &mut [i32], d: &mut [f32]) {
    for (b, (d, init)) in d.iter_mut().zip(init.iter_mut()).enumerate() {
        let o = b * QK;
        *d = quantize_q8_0_block(&x[o..o + QK], &mut q[o..o + QK]);
        let s: i32 = q[o..o + QK].iter().map(|&v| i32::from(v)).sum();
        *init = -off * s;
    }
}

impl Act {
    fn quantize(cpu: Cpu, ty: QType, x: &[f32], n: usize, k: usize) -> Act {
        #[cfg(target_arch = "x86_64")]
        let wide = cpu.avx512_vnni();
        #[cfg(not(target_arch = "x86_64"))]
        let _ = cpu;
        let nb = k / ty.block_values();
        let mut a = Act {
            x: vec![0i8; n * k],
            xs: Vec::new(),
            init: Vec::new(),
            d: vec![0f32; n * nb],
            k,
            nb,
        };
        // Tokens are independent: large calls (prefill) quantise them on rayon's threads, the
        // same values in any split.
        let min_tokens = (1usize << 16).div_ceil(k.max(1));
        let x = &x[..n * k];
        if ty.is_k() {
            a.xs = vec![0i16; n * k / 16];
            a.x.par_chunks_mut(k)
                .zip(a.xs.par_chunks_mut(k / 16))
                .zip(a.d.par_chunks_mut(nb))
                .zip(x.par_chunks(k))
                .with_min_len(min_tokens)
                .for_each(|(((q, xs), d), x)| {
                    #[cfg(target_arch = "x86_64")]
                    if let Some(t) = wide {
                        avx512::quantize_token_k(t, x, q, xs, d);
                        return;
                    }
                    quantize_token_k(x, q, xs, d);
                });
        } else {
            let off = ty.offset();
            a.init = vec![0i32; n * nb];
            a.x.par_chunks_mut(k)
                .zip(a.init.par_chunks_mut(nb))
                .zip(a.d.par_chunks_mut(nb))
                .zip(x.par_chunks(k))
                .with_min_len(min_tokens)
                .for_each(|(((q, init), d), x)| {
                    #[cfg(target_arch = "x86_64")]
                    if let Some(t) = wide {
                        avx512::quantize_token_0(t, off, x, q, init, d);
                        return;
                    }
                    quantize_token_0(off, x, q, init, d);
                });
        }
        a
    }

    /// Token `t`'s values.
    #[inline(always)]
    fn x(&self, t: usize) -> &[i8] {
        &self.x[t * self.k..(t + 1) * self.k]
    }

    /// Token `t`'s 16-value sums (K-quants).
    #[inline(always)]
    fn xs(&self, t: usize) -> &[i16] {
        &self.xs[t * self.k / 16..(t + 1) * self.k / 16]
    }

    /// Token `t`'s block offsets (Q8_0 / Q4_0).
    #[inline(always)]
    fn init(&self, t: usize) -> &[i32] {
        &self.init[t * self.nb..(t + 1) * self.nb]
    }

    /// Token `t`'s block scales.
    #[inline(always)]
    fn d(&self, t: usize) -> &[f32] {
        &self.d[t * self.nb..(t + 1) * self.nb]
    }

    /// Where tokens `t0 .. t0 + T` start in the values, the block offsets and the block scales
    /// (the Q8_0 / Q4_0 tiles). Panics if a token is out of range.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn block_ptrs<const T: usize>(
        &self,
        t0: usize,
    ) -> ([*const i8; T], [*const i32; T], [*const f32; T]) {
        (
            std::array::from_fn(|j| self.x(t0 + j).as_ptr()),
            std::array::from_fn(|j| self.init(t0 + j).as_ptr()),
            std::array::from_fn(|j| self.d(t0 + j).as_ptr()),
        )
    }

    /// Where tokens `t0 .. t0 + T` start in the values, the 16-value sums and the super-block
    /// scales (the K-quant tiles). Panics if a token is out of range.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn k_ptrs<const T: usize>(
        &self,
        t0: usize,
    ) -> ([*const i8; T], [*const i16; T], [*const f32; T]) {
        (
            std::array::from_fn(|j| self.x(t0 + j).as_ptr()),
            std::array::from_fn(|j| self.xs(t0 + j).as_ptr()),
            std::array::from_fn(|j| self.d(t0 + j).as_ptr()),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Decoded weight rows.

/// One weight row decoded for the dot products (per thread, reused).
#[derive(Default)]
struct Row {
    /// Unsigned values (k rounded up to 64): K-quants the stored 4/5/6-bit value, Q8_0
    /// `w + 128`, Q4_0 the nibble; padding: zero (never multiplied).
    q: Vec<u8>,
    /// K-quants: the group scale of each byte pair (k/2).
    sc: Vec<i16>,
    /// K-quants: the correction multiplier of each 16-value group (k/16).
    cm: Vec<i16>,
    /// K-quants: d per super-block; Q8_0 / Q4_0: d per block of 32.
    da: Vec<f32>,
    /// K-quants: the correction's scale per super-block (dmin; Q6_K: d).
    db: Vec<f32>,
}

impl Row {
    fn new(ty: QType, k: usize) -> Row {
        let kp = padded_k(k);
        if ty.is_k() {
            Row {
                q: vec![0; kp],
                sc: vec![0; k / 2],
                cm: vec![0; k / 16],
                da: vec![0.0; k / QK_K],
                db: vec![0.0; k / QK_K],
            }
        } else {
            Row {
                q: vec![0; kp],
                da: vec![0.0; k / QK],
                ..Row::default()
            }
        }
    }

    /// Decodes row `r` of `w` (this row's buffers were made by `Row::new(w.ty, w.k)`).
    #[inline(always)]
    pub(crate) fn decode(&mut self, w: &QMatrix<'_>, r: usize) {
        let ty = w.ty;
        let (bv, bb) = (ty.block_values(), ty.block_bytes());
        for (i, b) in w.row(r).chunks_exact(bb).enumerate() {
            let q = &mut self.q[i * bv..(i + 1) * bv];
            match ty {
                QType::Q8_0 => {
                    for (d, &s) in q.iter_mut().zip(&b[2..34]) {
                        *d = s ^ 0x80;
                    }
                    self.da[i] = f16_at(b, 0);
                }
                QType::Q4_0 => {
                    for j in 0..16 {
                        q[j] = b[2 + j] & 0xF;
                        q[j + 16] = b[2 + j] >> 4;
                    }
                    self.da[i] = f16_at(b, 0);
                }
                QType::Mxfp4 => {
                    for j in 0..16 {
                        q[j] = KVALUES[usize::from(b[1 + j] & 0xF)] as u8 ^ 0x80;
                        q[j + 16] = KVALUES[usize::from(b[1 + j] >> 4)] as u8 ^ 0x80;
                    }
                    self.da[i] = e8m0_half(b[0]);
                }
                QType::Q4K | QType::Q5K => {
                    let scales = &b[4..16];
                    let (qh, qs) = if ty == QType::Q5K {
                        (&b[16..48], &b[48..176])
                    } else {
                        (&b[0..0], &b[16..144])
                    };
                    for c in 0..4 {
                        let qs = &qs[32 * c..32 * c + 32];
                        let (lo, hi) = q[64 * c..64 * c + 64].split_at_mut(32);
                        for l in 0..32 {
                            lo[l] = qs[l] & 0xF;
                            hi[l] = qs[l] >> 4;
                        }
                        if ty == QType::Q5K {
                            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                            for l in 0..32 {
                                lo[l] |= if qh[l] & u1 != 0 { 16 } else { 0 };
                                hi[l] |= if qh[l] & u2 != 0 { 16 } else { 0 };
                            }
                        }
                    }
                    for j in 0..8 {
                        let (s, m) = scale_min_k4(j, scales);
                        self.sc[i * 128 + 16 * j..i * 128 + 16 * j + 16].fill(i16::from(s));
                        self.cm[i * 16 + 2 * j..i * 16 + 2 * j + 2].fill(i16::from(m));
                    }
                    self.da[i] = f16_at(b, 0);
                    self.db[i] = f16_at(b, 2);
                }
                QType::Q6K => {
                    unpack_q6(&b[0..128], &b[128..192], q);
                    for g in 0..16 {
                        let s = i16::from(b[192 + g] as i8);
                        self.sc[i * 128 + 8 * g..i * 128 + 8 * g + 8].fill(s);
                        self.cm[i * 16 + g] = 32 * s;
                    }
                    let d = f16_at(b, 208);
                    self.da[i] = d;
                    self.db[i] = d;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products: the generic reference (the SIMD paths give the same bits).

/// One output of a K-quant row and one token's Q8_K activations (generic path): per
/// super-block the exact integers `ia = Σ sc · q · x` and `ib = Σ cm · xs`, then
/// `fa += f32(ia) · (d_w · d_x)` and `fb += f32(ib) · (db_w · d_x)`; the result is `fa − fb`.
#[inline(always)]
fn kdot_generic(row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
    let (mut fa, mut fb) = (0f32, 0f32);
    for (s, &dxs) in dx.iter().enumerate() {
        let o = s * QK_K;
        let (q, xv, sc) = (
            &row.q[o..o + QK_K],
            &x[o..o + QK_K],
            &row.sc[o / 2..(o + QK_K) / 2],
        );
        let mut ia = 0i32;
        for ((q, xv), &sc) in q.chunks_exact(2).zip(xv.chunks_exact(2)).zip(sc) {
            let p = i32::from(q[0]) * i32::from(xv[0]) + i32::from(q[1]) * i32::from(xv[1]);
            ia += i32::from(sc) * p;
        }
        let mut ib = 0i32;
        for (&c, &v) in row.cm[s * 16..s * 16 + 16]
            .iter()
            .zip(&xs[s * 16..s * 16 + 16])
        {
            ib += i32::from(c) * i32::from(v);
        }
        fa += ia as f32 * (row.da[s] * dxs);
        fb += ib as f32 * (row.db[s] * dxs);
    }
    fa - fb
}

/// One output of a Q8_0 / Q4_0 / MXFP4 row and one token's Q8_0 activations (generic path): per
/// block of 32 the exact integer `s = −offset · Σ x + Σ q · x` (= `Σ w · x`), then
/// `acc += f32(s) · (d_w · d_x)`, as ggml's `ggml_vec_dot_q8_0_q8_0` (and, `d_w · d_x` being
/// `d_x · d_w` exactly, `ggml_vec_dot_mxfp4_q8_0`).
#[inline(always)]
fn bdot_generic(row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (&i0, &dxb)) in init.iter().zip(dx).enumerate() {
        let o = b * QK;
        let mut s = i0;
        for (&q, &v) in row.q[o..o + QK].iter().zip(&x[o..o + QK]) {
            s += i32::from(q) * i32::from(v);
        }
        acc += s as f32 * (row.da[b] * dxb);
    }
    acc
}

/// The implementation [`xwt_q_with`] runs.
#[derive(Debug, Clone, Copy)]
enum Path {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Isa),
    #[cfg(target_arch = "x86_64")]
    Avx512(crate::cpu::Avx512Vnni),
}

impl Path {
    fn choose(cpu: Cpu, kernel: Kernel) -> Path {
        let (kernel, cpu) = match kernel {
            // `MOE_XRAY_KERNEL=avx2-novnni`: the AVX2 tile without AVX-VNNI.
            Kernel::Auto if env_no_vnni() => (Kernel::Avx2, cpu.without_avx_vnni()),
            Kernel::Auto => (env_kernel().unwrap_or(Kernel::Avx512), cpu),
            k => (k, cpu),
        };
        #[cfg(target_arch = "x86_64")]
        {
            if kernel == Kernel::Avx512 {
                if let Some(t) = cpu.avx512_vnni() {
                    return Path::Avx512(t);
                }
            }
            if kernel != Kernel::Gemm {
                if let Some(t) = avx2::Isa::of(cpu) {
                    return Path::Avx2(t);
                }
            }
        }
        let _ = (cpu, kernel);
        Path::Generic
    }

    fn name(self) -> &'static str {
        match self {
            Path::Generic => "generic",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(t) => t.name(),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => "avx512-vnni",
        }
    }

    /// Decodes row `r` of `w` (compiled for the path's instruction set).
    #[inline(always)]
    fn decode(self, row: &mut Row, w: &QMatrix<'_>, r: usize) {
        match self {
            Path::Generic => row.decode(w, r),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(_) => row.decode(w, r),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) => avx512::decode(t, row, w, r),
        }
    }

    /// The output of a decoded row and token `t` (the row-at-a-time paths).
    #[inline(always)]
    fn dot(self, ty: QType, row: &Row, act: &Act, t: usize) -> f32 {
        match (self, ty.is_k()) {
            (_, true) => kdot_generic(row, act.x(t), act.xs(t), act.d(t)),
            (_, false) => bdot_generic(row, act.x(t), act.init(t), act.d(t)),
        }
    }
}

/// Tokens per block of the row-at-a-time loop (generic and AVX2 paths): 64 tokens' quantised
/// activations of a 2048-wide row take ≈ 140 KB, inside L2.
const TBLOCK: usize = 64;

/// Values per scale group of a K-quant in the tile: 32 (Q4_K, Q5_K: one 6-bit scale per 32
/// values) or 16 (Q6_K).
#[cfg(target_arch = "x86_64")]
fn group(ty: QType) -> usize {
    if ty == QType::Q6K {
        16
    } else {
        32
    }
}

/// Sixteen weight rows prepared for the AVX-512 tile (per thread, reused): decoded, the values
/// transposed so that each 64 bytes hold the same four values of the sixteen rows (i32 lane `j`:
/// row `j`), the scales as sixteen-lane vectors. Lanes of rows past the matrix's end are zero.
#[cfg(target_arch = "x86_64")]
struct Panel {
    rows: Vec<Row>,
    /// Zeros standing in for missing rows (length: a decoded row's).
    zero: Vec<u8>,
    /// 16 × kp bytes: the four values `4g .. 4g + 4` of row `j` at `64 g + 4 j`.
    q: Vec<u8>,
    /// Per (super-)block × 16 rows: d (K-quants, Q8_0 / Q4_0).
    da: Vec<f32>,
    /// K-quants, per super-block × 16 rows: the correction's scale.
    db: Vec<f32>,
    /// K-quants, per scale group (of [`group`] values) × 16 rows: the scale.
    sc: Vec<i32>,
    /// K-quants, per pair of 16-value groups × 16 rows: the two correction multipliers as i16
    /// (low half: the even group).
    cm: Vec<i32>,
}

#[cfg(target_arch = "x86_64")]
impl Panel {
    fn new(ty: QType, k: usize) -> Panel {
        let kp = padded_k(k);
        let nb = k / ty.block_values();
        let (db, sc, cm) = if ty.is_k() {
            (
                vec![0f32; 16 * nb],
                vec![0i32; 16 * (k / group(ty))],
                vec![0i32; 16 * (k / 32)],
            )
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        Panel {
            // Decoded rows only for the types whose values are not unpacked in registers.
            rows: if avx512::direct(ty) {
                Vec::new()
            } else {
                (0..avx512::ROWS).map(|_| Row::new(ty, k)).collect()
            },
            zero: vec![0u8; kp],
            q: vec![0u8; 16 * kp],
            da: vec![0f32; 16 * nb],
            db,
            sc,
            cm,
        }
    }

    /// Only the scale lanes of rows `r0 .. r0 + rows` of `w` (`rows <= 16`; Q8_0, Q4_K or Q6_K).
    fn fill_scales_of(
        &mut self,
        t: crate::cpu::Avx512Vnni,
        w: &QMatrix<'_>,
        r0: usize,
        rows: usize,
    ) {
        if !avx512::fill_scales(t, w, r0, rows, self) {
            self.fill_scales(w, r0, rows);
        }
    }

    /// Prepares rows `r0 .. r0 + rows` of `w` (`rows <= 16`), prefetching `next` (the bytes the
    /// next panel reads) meanwhile.
    fn fill(
        &mut self,
        t: crate::cpu::Avx512Vnni,
        w: &QMatrix<'_>,
        r0: usize,
        rows: usize,
        next: &[u8],
    ) {
        let ty = w.ty;
        if avx512::direct(ty) {
            avx512::fill_values(t, w, r0, rows, &mut self.q, next);
            self.fill_scales_of(t, w, r0, rows);
            return;
        }
        for (j, row) in self.rows.iter_mut().enumerate().take(rows) {
            avx512::decode(t, row, w, r0 + j);
        }
        let src: [&[u8]; 16] = std::array::from_fn(|j| {
            if j < rows {
                &self.rows[j].q[..]
            } else {
                &self.zero[..]
            }
        });
        avx512::transpose16(t, src, &mut self.q);
        let live = |j: usize| j < rows;
        if ty.is_k() {
            let g = group(ty);
            let ng = QK_K / g;
            for s in 0..w.k / QK_K {
                for j in 0..16 {
                    let row = &self.rows[j];
                    let on = live(j);
                    self.da[16 * s + j] = if on { row.da[s] } else { 0.0 };
                    self.db[16 * s + j] = if on { row.db[s] } else { 0.0 };
                    for i in 0..ng {
                        self.sc[16 * (s * ng + i) + j] = if on {
                            i32::from(row.sc[(s * QK_K + i * g) / 2])
                        } else {
                            0
                        };
                    }
                    for i in 0..8 {
                        let (lo, hi) = (row.cm[16 * s + 2 * i], row.cm[16 * s + 2 * i + 1]);
                        self.cm[16 * (8 * s + i) + j] = if on {
                            i32::from(lo as u16) | (i32::from(hi as u16) << 16)
                        } else {
                            0
                        };
                    }
                }
            }
        } else {
            for b in 0..w.k / QK {
                for j in 0..16 {
                    self.da[16 * b + j] = if live(j) { self.rows[j].da[b] } else { 0.0 };
                }
            }
        }
    }
}

/// Panels kept per thread between calls (one per weight type and row length: a model's
/// projections alternate between a few — a Q4_K_M file mixes Q4_K, Q6_K and Q8_0 over the hidden,
/// expert and shared-expert widths, so the cache holds more than one layer's pairs).
#[cfg(target_arch = "x86_64")]
const PANEL_CACHE_LEN: usize = 8;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's panels, kept between calls (their buffers are sized by the type and `k`).
    static PANEL_CACHE: std::cell::RefCell<Vec<(QType, usize, Panel)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's panel for weights of type `ty` and row length `k` (made when no
/// cached one matches, replacing the least recently used; a fresh one if the cache is in use).
/// The panel's contents are rewritten by every fill, so the key only has to fix its buffer sizes.
#[cfg(target_arch = "x86_64")]
fn with_panel(ty: QType, k: usize, f: impl FnOnce(&mut Panel)) {
    let mut f = Some(f);
    PANEL_CACHE.with(|c| {
        if let Ok(mut cache) = c.try_borrow_mut() {
            // Least recently used first: a hit moves its entry to the back.
            match cache.iter().position(|(t, kk, _)| *t == ty && *kk == k) {
                Some(i) => {
                    let hit = cache.remove(i);
                    cache.push(hit);
                }
                None => {
                    if cache.len() >= PANEL_CACHE_LEN {
                        cache.remove(0);
                    }
                    cache.push((ty, k, Panel::new(ty, k)));
                }
            }
            let i = cache.len() - 1;
            if let (Some((_, _, panel)), Some(f)) = (cache.get_mut(i), f.take()) {
                f(panel);
            }
        }
    });
    if let Some(f) = f {
        f(&mut Panel::new(ty, k));
    }
}

#[cfg(target_arch = "x86_64")]
impl Panel {
    /// The scale lanes of rows `r0 .. r0 + rows` read from their blocks (Q8_0, Q4_K, Q6_K: the
    /// values `Row::decode` gives).
    fn fill_scales(&mut self, w: &QMatrix<'_>, r0: usize, rows: usize) {
        let ty = w.ty;
        let (bb, nb) = (ty.block_bytes(), w.k / ty.block_values());
        let pair = |lo: i16, hi: i16| i32::from(lo as u16) | (i32::from(hi as u16) << 16);
        for j in 0..16 {
            let row = (j < rows).then(|| w.row(r0 + j));
            for b in 0..nb {
                let blk = row.map(|r| &r[b * bb..(b + 1) * bb]);
                match (ty, blk) {
                    (QType::Q8_0, Some(blk)) => self.da[16 * b + j] = f16_at(blk, 0),
                    (QType::Q4K, Some(blk)) => {
                        self.da[16 * b + j] = f16_at(blk, 0);
                        self.db[16 * b + j] = f16_at(blk, 2);
                        for i in 0..8 {
                            let (sc, m) = scale_min_k4(i, &blk[4..16]);
                            self.sc[16 * (8 * b + i) + j] = i32::from(sc);
                            self.cm[16 * (8 * b + i) + j] = pair(i16::from(m), i16::from(m));
                        }
                    }
                    (QType::Q6K, Some(blk)) => {
                        let d = f16_at(blk, 208);
                        self.da[16 * b + j] = d;
                        self.db[16 * b + j] = d;
                        let sc = |g: usize| i16::from(blk[192 + g] as i8);
                        for g in 0..16 {
                            self.sc[16 * (16 * b + g) + j] = i32::from(sc(g));
                        }
                        for i in 0..8 {
                            self.cm[16 * (8 * b + i) + j] =
                                pair(32 * sc(2 * i), 32 * sc(2 * i + 1));
                        }
                    }
                    _ => {
                        self.da[16 * b + j] = 0.0;
                        if ty.is_k() {
                            self.db[16 * b + j] = 0.0;
                            let ng = QK_K / group(ty);
                            for i in 0..ng {
                                self.sc[16 * (ng * b + i) + j] = 0;
                            }
                            for i in 0..8 {
                                self.cm[16 * (8 * b + i) + j] = 0;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The path [`xwt_q`] takes on this CPU (capped by `MOE_XRAY_KERNEL`): `"avx512-vnni"`,
/// `"avx2-vnni"` (the AVX2 tile with AVX-VNNI), `"avx2"` or `"generic"`.
pub fn kernel_name() -> &'static str {
    Path::choose(Cpu::get(), Kernel::Auto).name()
}

/// `y [n, rows] = x [n, k] · Wᵀ` for quantised `w` (the best path of this CPU, capped by
/// `MOE_XRAY_KERNEL`). Panics if `x` is shorter than `n · k`.
pub fn xwt_q(x: &[f32], n: usize, w: &QMatrix<'_>) -> Vec<f32> {
    xwt_q_with(Kernel::Auto, x, n, w)
}

/// [`xwt_q`] on a chosen path: `Avx512` (AVX-512 VNNI), `Avx2`, `Gemm` (the generic path),
/// each falling back to the next where the CPU lacks it. All paths give the same bits.
pub fn xwt_q_with(kernel: Kernel, x: &[f32], n: usize, w: &QMatrix<'_>) -> Vec<f32> {
    xwt_q_on(Cpu::get(), kernel, x, n, w)
}

/// [`xwt_q_with`] on the paths of a given CPU description.
pub fn xwt_q_on(cpu: Cpu, kernel: Kernel, x: &[f32], n: usize, w: &QMatrix<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.rows);
    assert!(
        n.checked_mul(k).is_some_and(|v| x.len() >= v) && n.checked_mul(m).is_some(),
        "xwt_q: operand sizes"
    );
    if n == 0 || m == 0 {
        return vec![0f32; n * m];
    }
    let act = Act::quantize(cpu, w.ty, x, n, k);
    xwt_q_act_on(cpu, kernel, &act, n, w)
}

/// Activations quantised once (ggml's Q8_0 or Q8_K, by the weights' type) for several matrices
/// of the same type and row length, e.g. an expert's gate and up projections.
pub struct QActivations {
    ty: QType,
    n: usize,
    act: Act,
}

impl QActivations {
    /// `x [n, k]` quantised for weights of type `ty`. Panics if `x` is shorter than `n · k` or
    /// `k` is not a positive multiple of the type's block.
    pub fn new(ty: QType, x: &[f32], n: usize, k: usize) -> QActivations {
        assert!(
            k > 0
                && k.is_multiple_of(ty.block_values())
                && n.checked_mul(k).is_some_and(|v| x.len() >= v),
            "QActivations: operand sizes"
        );
        QActivations {
            ty,
            n,
            act: Act::quantize(Cpu::get(), ty, x, n, k),
        }
    }

    /// Whether these activations serve weights `w` (same type and row length).
    pub fn fits(&self, w: &QMatrix<'_>) -> bool {
        self.ty == w.ty && self.act.k == w.k
    }
}

/// `y [n, rows] = x · Wᵀ` from activations quantised beforehand (the same bits as [`xwt_q`] on
/// the `x` they came from). Panics unless `act.fits(w)`.
pub fn xwt_q_act(act: &QActivations, w: &QMatrix<'_>) -> Vec<f32> {
    assert!(
        act.fits(w),
        "xwt_q_act: activations of another type or length"
    );
    if act.n == 0 || w.rows == 0 {
        return vec![0f32; act.n * w.rows];
    }
    xwt_q_act_on(Cpu::get(), Kernel::Auto, &act.act, act.n, w)
}

/// The kernel on quantised activations (`act` holds `n` tokens of `w`'s type and length; n, rows
/// positive).
fn xwt_q_act_on(cpu: Cpu, kernel: Kernel, act: &Act, n: usize, w: &QMatrix<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.rows);
    let ty = w.ty;
    let path = match Path::choose(cpu, kernel) {
        // MXFP4 has no AVX-512 tile: the AVX2 one (every AVX-512 CPU has AVX2 + FMA + F16C).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512(_) if ty == QType::Mxfp4 => {
            avx2::Isa::of(cpu).map_or(Path::Generic, Path::Avx2)
        }
        p => p,
    };
    // The outputs panel by panel: panel p (rows r0 .. r0 + rows) at r0 · n, token-major
    // (`out[t · rows + r]`); for one token this is `y` itself.
    let mut pm = vec![0f32; n * m];
    let panels = pm.par_chunks_mut(PANEL * n).enumerate();
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512(t) => panels.for_each(|(p, out)| {
            let r0 = p * PANEL;
            let rows = out.len() / n;
            // The next panel's rows, prefetched while this one computes (rayon hands each
            // thread a run of consecutive panels).
            let rb = w.row_bytes();
            let next = &w.data[(r0 + rows) * rb..(r0 + rows + PANEL).min(m) * rb];
            // Decode (one token) on Q8_0: the blocks multiplied as stored, no panel.
            if n <= avx512::Q8_0_DIRECT_TOKENS && avx512::q8_0_direct_fits(w) {
                let mut tile = [0f32; avx512::ROWS * avx512::TOKENS];
                avx512::q8_0_direct(t, w, r0, rows, act, n, &mut tile, next);
                for j in 0..n {
                    out[j * rows..(j + 1) * rows].copy_from_slice(&tile[16 * j..16 * j + rows]);
                }
                return;
            }
            with_panel(ty, k, |panel| {
                let mut tile = [0f32; avx512::ROWS * avx512::TOKENS];
                // Few tokens (Q4_K, Q6_K): the values unpacked in registers for each tile
                // of tokens, no transposed copy in the panel (only its scale lanes).
                let fused = n <= avx512::FUSED_TOKENS && matches!(ty, QType::Q4K | QType::Q6K);
                if fused {
                    panel.fill_scales_of(t, w, r0, rows);
                } else {
                    panel.fill(t, w, r0, rows, next);
                }
                let step = avx512::tokens(ty);
                let mut t0 = 0;
                while t0 < n {
                    let tn = step.min(n - t0);
                    if fused {
                        let pf = if t0 == 0 { next } else { &[] };
                        avx512::tile_rows(t, w, r0, rows, panel, act, t0, tn, &mut tile, pf);
                    } else {
                        avx512::tile(t, ty, panel, act, t0, tn, &mut tile);
                    }
                    for j in 0..tn {
                        out[(t0 + j) * rows..(t0 + j + 1) * rows]
                            .copy_from_slice(&tile[16 * j..16 * j + rows]);
                    }
                    t0 += tn;
                }
            });
        }),
        // The strip (two transposed copies of eight rows, ≈ 2 · 8 · k bytes, zeroed) is made
        // only for calls that use it: the direct paths of few tokens do not.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2(t) => panels.for_each_init(
            || None,
            |strip, (p, out)| {
                let r0 = p * PANEL;
                let rows = out.len() / n;
                avx2::panel(t, strip, w, act, n, r0, rows, out);
            },
        ),
        _ => panels.for_each_init(
            || Row::new(ty, k),
            |row, (p, out)| {
                let r0 = p * PANEL;
                let rows = out.len() / n;
                for tb in (0..n).step_by(TBLOCK) {
                    for r in r0..r0 + rows {
                        path.decode(row, w, r);
                        for t in tb..(tb + TBLOCK).min(n) {
                            out[t * rows + (r - r0)] = path.dot(ty, row, act, t);
                        }
                    }
                }
            },
        ),
    }
    if n == 1 {
        return pm;
    }
    let mut y = vec![0f32; n * m];
    for (p, out) in pm.chunks(PANEL * n).enumerate() {
        let r0 = p * PANEL;
        let rows = out.len() / n;
        for t in 0..n {
            y[t * m + r0..t * m + r0 + rows].copy_from_slice(&out[t * rows..(t + 1) * rows]);
        }
    }
    y
}

/// Prefetches part `i` of `parts` (whole cache lines, in address order) of `next` into L2:
/// the bytes the next panel (or strip) of rows will read, fetched while this one computes, so a
/// call whose weights come from memory keeps a steady stream of line requests in flight (eight or
/// sixteen rows read block by block are as many short streams, which the hardware prefetchers
/// follow late). Used by the AVX-512 and AVX2 paths.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_part(next: &[u8], i: usize, parts: usize) {
    const LINE: usize = 64;
    let lines = next.len().div_ceil(LINE);
    if parts == 0 || lines == 0 {
        return;
    }
    let (a, b) = (i * lines / parts, ((i + 1) * lines / parts).min(lines));
    let p = next.as_ptr();
    for l in a..b {
        // SAFETY: `_mm_prefetch` (SSE, in every x86_64 CPU) only hints the cache and never
        // faults; `l < lines`, so the address is inside `next` anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                p.wrapping_add(l * LINE).cast(),
            )
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/quant.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/quant.rs"]
mod avx512;

#[cfg(test)]
mod tests;
