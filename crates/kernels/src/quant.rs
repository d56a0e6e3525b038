//! `y = x · Wᵀ` with f32 activations and weights in llama.cpp's (ggml's) quantised block formats
//! Q8_0, Q4_0, Q4_K, Q5_K and Q6_K, read in place (e.g. from a GGUF file's memory map).
//!
//! As in ggml, the activations are quantised once per call, exactly as ggml's reference
//! `quantize_row_q8_0_ref` (Q8_0 / Q4_0 weights: blocks of 32, scale `max|x| / 127` rounded to
//! f16, values `round(x / d)` half away from zero) or `quantize_row_q8_K_ref` (K-quants: blocks of
//! 256, scale `max / -127` from the value of largest magnitude, values rounded half to even, sums
//! of 16 values), and each dot product is an exact integer sum per block, scaled in f32. So a
//! projection computes what llama.cpp computes, up to the order of the f32 sums.
//!
//! The kernel is weight-stationary: rows are split into fixed panels of [`PANEL`] rows (one rayon
//! task each); the tokens go in blocks whose quantised activations stay in cache while the
//! panel's rows pass over them, four tokens per step. The AVX-512 path unpacks Q4_K, Q6_K and
//! Q8_0 blocks in registers straight from the weight bytes (each unpacked chunk feeds four
//! tokens); the other types and paths first decode a row into a small per-thread buffer
//! (unsigned 8-bit values, the 16-value group scales widened to i16, the f32 block scales). Either
//! way the weights are read from memory once per call (per token block).
//!
//! Integer part (exact on every path, identical integers): for K-quants, sixteen i32 lanes per
//! super-block of 256, lane `l` summing `scale(group(i)) · q[i] · x[i]` over the bytes
//! `i = 64c + 4l .. 64c + 4l + 3` of the four 64-byte chunks `c` (AVX-512: `vpmaddubsw` +
//! `vpdpwssd`); eight i32 lanes of the group corrections `cm[2j] · xs[2j] + cm[2j+1] · xs[2j+1]`
//! (Q4_K / Q5_K: the sub-block minimum times the activations' 16-value sums; Q6_K: 32 · scale, the
//! values' offset). For Q8_0 / Q4_0, lane `l` of 64-byte chunk `c` is `Σ (q − offset) · x` over the
//! four bytes `64c + 4l ..` (AVX-512: `vpdpbusd` on `q + 128` / the nibble, started at
//! `−offset · Σ x`; AVX2: `vpmaddubsw` with the sign trick for Q8_0).
//!
//! Float part (the same operations in the same order on every path, no fused multiply-adds):
//! K-quants `acc[l] += f32(lane[l]) · (d_w · d_x)` per super-block, the corrections likewise with
//! `(dmin_w · d_x)` into eight lanes, result `hsum16(acc) − hsum8(corr)`
//! ([`hsum16_reference`] / [`hsum_reference`]); Q8_0 / Q4_0 `acc[l] += f32(lane[l]) · (d_w · d_x)`
//! per 32-value block (lanes 0–7 the chunk's first block, 8–15 its second), result `hsum16(acc)`.
//! Every output element is computed alone from its row and its token, so results are
//! bit-identical on every path ([`xwt_q_with`]), for any `n`, panel split or thread count.

use half::f16;
use rayon::prelude::*;

use crate::cpu::Cpu;
use crate::matmul::{env_kernel, hsum16_reference, hsum_reference, Kernel};

/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Values per Q8_0 / Q4_0 block.
pub const QK: usize = 32;
/// Weight rows per rayon task.
pub const PANEL: usize = 16;

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
}

impl QType {
    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q8_0 | QType::Q4_0 => QK,
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
        }
    }

    /// Whether the type is a K-quant (super-blocks of 256, Q8_K activations).
    fn is_k(self) -> bool {
        !matches!(self, QType::Q8_0 | QType::Q4_0)
    }

    /// The offset subtracted from the stored unsigned value (Q8_0: stored as `w + 128`).
    fn offset(self) -> i32 {
        match self {
            QType::Q8_0 => 128,
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
    /// n × kp values.
    x: Vec<i8>,
    /// K-quants: the 16-value sums (n × k/16).
    xs: Vec<i16>,
    /// Q8_0 / Q4_0: `−offset · Σ x` of each 4 values (n × kp/4).
    init: Vec<i32>,
    /// K-quants: scale per super-block (n × k/256); Q8_0 / Q4_0: the f16 block scale widened,
    /// repeated for each of the block's eight lanes (n × kp/4).
    d: Vec<f32>,
    /// Row length as stored (k; Q8_0 / Q4_0: k rounded up to 64, zero padded).
    kp: usize,
}

/// `k` rounded up to a multiple of 64 for Q8_0 / Q4_0 (`k` for K-quants).
fn padded_k(ty: QType, k: usize) -> usize {
    if ty.is_k() {
        k
    } else {
        k.div_ceil(64) * 64
    }
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
    if frac >= 0.5 {
        t.saturating_add(1)
    } else if frac <= -0.5 {
        t.saturating_sub(1)
    } else {
        t
    }
}

/// ggml's `quantize_row_q8_K_ref` of one super-block: the values, the 16-value sums, the scale.
pub fn quantize_q8k_block(x: &[f32], q: &mut [i8], sums: &mut [i16]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in &x[..QK_K] {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax == 0.0 {
        q[..QK_K].fill(0);
        sums[..QK_K / 16].fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qv, &v) in q[..QK_K].iter_mut().zip(&x[..QK_K]) {
        *qv = nearest_int(iscale * v).clamp(-127, 127) as i8;
    }
    for (j, s) in sums[..QK_K / 16].iter_mut().enumerate() {
        *s = q[16 * j..16 * j + 16].iter().map(|&v| i16::from(v)).sum();
    }
    1.0 / iscale
}

/// ggml's `quantize_row_q8_0_ref` of one block: the values and the scale (as stored, f16).
pub fn quantize_q8_0_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x[..QK].iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qv, &v) in q[..QK].iter_mut().zip(&x[..QK]) {
        *qv = round_away(v * id).clamp(-127, 127) as i8;
    }
    f16::from_f32(d).to_f32()
}

impl Act {
    /// Bytes the kernel reads per token (values, sums or offsets, scales).
    fn bytes_per_token(&self) -> usize {
        let n = (self.x.len() / self.kp.max(1)).max(1);
        self.x.len() / n + (2 * self.xs.len() + 4 * self.init.len() + 4 * self.d.len()) / n
    }

    fn quantize(ty: QType, x: &[f32], n: usize, k: usize) -> Act {
        let kp = padded_k(ty, k);
        let mut a = Act {
            x: vec![0i8; n * kp],
            xs: Vec::new(),
            init: Vec::new(),
            d: Vec::new(),
            kp,
        };
        if ty.is_k() {
            a.xs = vec![0i16; n * k / 16];
            a.d = vec![0f32; n * k / QK_K];
            for t in 0..n {
                for s in 0..k / QK_K {
                    let o = t * k + s * QK_K;
                    a.d[t * (k / QK_K) + s] = quantize_q8k_block(
                        &x[o..o + QK_K],
                        &mut a.x[o..o + QK_K],
                        &mut a.xs[o / 16..o / 16 + QK_K / 16],
                    );
                }
            }
        } else {
            let off = ty.offset();
            a.init = vec![0i32; n * kp / 4];
            a.d = vec![0f32; n * kp / 4];
            for t in 0..n {
                for b in 0..k / QK {
                    let (src, dst) = (t * k + b * QK, t * kp + b * QK);
                    let d = quantize_q8_0_block(&x[src..src + QK], &mut a.x[dst..dst + QK]);
                    a.d[dst / 4..dst / 4 + 8].fill(d);
                }
                for (i, v) in a.init[t * kp / 4..(t + 1) * kp / 4].iter_mut().enumerate() {
                    let o = t * kp + 4 * i;
                    let s: i32 = a.x[o..o + 4].iter().map(|&v| i32::from(v)).sum();
                    *v = -off * s;
                }
            }
        }
        a
    }
}

// ---------------------------------------------------------------------------------------------
// Decoded weight rows.

/// One weight row decoded for the dot products (per thread, reused).
#[derive(Default)]
struct Row {
    /// Unsigned values (kp): K-quants the stored 4/5/6-bit value, Q8_0 `w + 128`, Q4_0 the
    /// nibble; padding: the offset (a zero weight).
    q: Vec<u8>,
    /// K-quants: the group scale of each byte pair (k/2).
    sc: Vec<i16>,
    /// K-quants: the correction multiplier of each 16-value group (k/16).
    cm: Vec<i16>,
    /// K-quants: d per super-block; Q8_0 / Q4_0: d per lane (kp/4; padding 0).
    da: Vec<f32>,
    /// K-quants: the correction's scale per super-block (dmin; Q6_K: d).
    db: Vec<f32>,
}

impl Row {
    fn new(ty: QType, k: usize) -> Row {
        let kp = padded_k(ty, k);
        if ty.is_k() {
            Row {
                q: vec![0; k],
                sc: vec![0; k / 2],
                cm: vec![0; k / 16],
                da: vec![0.0; k / QK_K],
                db: vec![0.0; k / QK_K],
            }
        } else {
            Row {
                q: vec![ty.offset() as u8; kp],
                da: vec![0.0; kp / 4],
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
                    self.da[8 * i..8 * i + 8].fill(f16_at(b, 0));
                }
                QType::Q4_0 => {
                    for j in 0..16 {
                        q[j] = b[2 + j] & 0xF;
                        q[j + 16] = b[2 + j] >> 4;
                    }
                    self.da[8 * i..8 * i + 8].fill(f16_at(b, 0));
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

/// One output of a K-quant row and one token's Q8_K activations (generic path).
#[allow(clippy::needless_range_loop)] // `s` indexes several arrays
fn kdot_generic(row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
    let mut fa = [0f32; 16];
    let mut fb = [0f32; 8];
    for s in 0..dx.len() {
        let mut ia = [0i32; 16];
        for c in 0..4 {
            for (l, lane) in ia.iter_mut().enumerate() {
                for b in 0..4 {
                    let i = s * QK_K + 64 * c + 4 * l + b;
                    *lane += i32::from(row.sc[i / 2]) * i32::from(row.q[i]) * i32::from(x[i]);
                }
            }
        }
        let cr: [i32; 8] = std::array::from_fn(|j| {
            let g = s * 16 + 2 * j;
            i32::from(row.cm[g]) * i32::from(xs[g])
                + i32::from(row.cm[g + 1]) * i32::from(xs[g + 1])
        });
        let (fa_s, fb_s) = (row.da[s] * dx[s], row.db[s] * dx[s]);
        for l in 0..16 {
            fa[l] += ia[l] as f32 * fa_s;
        }
        for j in 0..8 {
            fb[j] += cr[j] as f32 * fb_s;
        }
    }
    hsum16_reference(fa) - hsum_reference(fb)
}

/// One output of a Q8_0 / Q4_0 row and one token's Q8_0 activations (generic path).
fn bdot_generic(row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
    let mut f = [0f32; 16];
    for (lane, (&i0, (&dw, &dxl))) in init.iter().zip(row.da.iter().zip(dx)).enumerate() {
        let mut d = i0;
        for b in 0..4 {
            let i = 4 * lane + b;
            d += i32::from(row.q[i]) * i32::from(x[i]);
        }
        f[lane % 16] += d as f32 * (dw * dxl);
    }
    hsum16_reference(f)
}

/// The implementation [`xwt_q_with`] runs.
#[derive(Debug, Clone, Copy)]
enum Path {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::cpu::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(crate::cpu::Avx512Vnni),
}

impl Path {
    fn choose(cpu: Cpu, kernel: Kernel) -> Path {
        let kernel = match kernel {
            Kernel::Auto => env_kernel().unwrap_or(Kernel::Avx512),
            k => k,
        };
        #[cfg(target_arch = "x86_64")]
        {
            if kernel == Kernel::Avx512 {
                if let Some(t) = cpu.avx512_vnni() {
                    return Path::Avx512(t);
                }
            }
            if kernel != Kernel::Gemm {
                if let Some(t) = cpu.avx2() {
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
            Path::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => "avx512-vnni",
        }
    }

    /// Whether this path reads weights of type `ty` straight from their blocks (no decoded
    /// row): AVX-512 for Q4_K, Q6_K and Q8_0.
    #[inline(always)]
    fn direct(self, ty: QType) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => matches!(ty, QType::Q4K | QType::Q6K | QType::Q8_0),
            _ => {
                let _ = ty;
                false
            }
        }
    }

    /// Decodes row `r` of `w` (compiled for the path's instruction set).
    #[inline(always)]
    fn decode(self, row: &mut Row, w: &QMatrix<'_>, r: usize) {
        match self {
            Path::Generic => row.decode(w, r),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(t) => avx2::decode(t, row, w, r),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) => avx512::decode(t, row, w, r),
        }
    }

    /// The outputs of one K-quant row for tokens `0..tn` (`tn <= TOKS`; the slices of tokens
    /// `tn..` repeat the last one and their outputs are ignored).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn kdot4(
        self,
        ty: QType,
        wrow: &[u8],
        row: &Row,
        tn: usize,
        x: [&[i8]; TOKS],
        xs: [&[i16]; TOKS],
        dx: [&[f32]; TOKS],
        out: &mut [f32; TOKS],
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if self.direct(ty) && tn == TOKS => {
                avx512::kdot_direct::<TOKS>(t, ty, wrow, x, xs, dx, out)
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if self.direct(ty) => {
                for j in 0..tn {
                    avx512::kdot_direct::<1>(t, ty, wrow, [x[j]], [xs[j]], [dx[j]], &mut out[j..]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if tn == TOKS => avx512::kdot4(t, row, x, xs, dx, out),
            _ => {
                for j in 0..tn {
                    out[j] = match self {
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx2(t) => avx2::kdot(t, row, x[j], xs[j], dx[j]),
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx512(t) => avx512::kdot(t, row, x[j], xs[j], dx[j]),
                        Path::Generic => kdot_generic(row, x[j], xs[j], dx[j]),
                    };
                }
            }
        }
    }

    /// The outputs of one Q8_0 / Q4_0 row for tokens `0..tn` (as [`Path::kdot4`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn bdot4(
        self,
        ty: QType,
        wrow: &[u8],
        row: &Row,
        tn: usize,
        x: [&[i8]; TOKS],
        init: [&[i32]; TOKS],
        dx: [&[f32]; TOKS],
        out: &mut [f32; TOKS],
    ) {
        let signed = ty == QType::Q8_0;
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if self.direct(ty) && tn == TOKS => {
                avx512::bdot_direct_q8::<TOKS>(t, wrow, x, init, dx, out)
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if self.direct(ty) => {
                for j in 0..tn {
                    avx512::bdot_direct_q8::<1>(t, wrow, [x[j]], [init[j]], [dx[j]], &mut out[j..]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(t) if tn == TOKS => avx512::bdot4(t, row, x, init, dx, out),
            _ => {
                for j in 0..tn {
                    out[j] = match self {
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx2(t) => avx2::bdot(t, signed, row, x[j], init[j], dx[j]),
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx512(t) => avx512::bdot(t, row, x[j], init[j], dx[j]),
                        Path::Generic => bdot_generic(row, x[j], init[j], dx[j]),
                    };
                }
            }
        }
    }
}

/// Tokens per step of the AVX-512 path (one weight load feeds four tokens).
const TOKS: usize = 4;

/// Tokens per block of the row loop on the decoded-row paths: 64 tokens' quantised activations
/// of a 2048-wide row take ≈ 400 KB (values, per-lane scales and offsets), inside L2.
const TBLOCK: usize = 64;

/// Bytes of quantised activations per token block on the direct (AVX-512) paths: a share of L1.
const L1_ACT: usize = 24 * 1024;

/// `v[start..start + len]`.
#[inline(always)]
fn slice<T>(v: &[T], start: usize, len: usize) -> &[T] {
    &v[start..start + len]
}

/// The path [`xwt_q`] takes on this CPU (capped by `MOE_XRAY_KERNEL`): `"avx512-vnni"`,
/// `"avx2"` or `"generic"`.
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
    let mut y = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return y;
    }
    let path = Path::choose(cpu, kernel);
    let ty = w.ty;
    let act = Act::quantize(ty, x, n, k);
    let kp = act.kp;
    let panels: Vec<Vec<f32>> = (0..m.div_ceil(PANEL))
        .into_par_iter()
        .map_init(
            || Row::new(ty, k),
            |row, p| {
                let r0 = p * PANEL;
                let r1 = (r0 + PANEL).min(m);
                let rows = r1 - r0;
                let mut out = vec![0f32; n * rows];
                let direct = path.direct(ty);
                // Tokens in blocks whose quantised activations stay in cache while the panel's
                // rows pass over them: ≈ 24 KiB (L1) when the weights are unpacked in
                // registers (cheap to repeat per block), TBLOCK tokens (L2) when each row is
                // decoded into a buffer first.
                let tblock = if direct {
                    (L1_ACT / act.bytes_per_token().max(1) / TOKS * TOKS).max(TOKS)
                } else {
                    TBLOCK
                };
                for tb in (0..n).step_by(tblock) {
                    let tend = (tb + tblock).min(n);
                    for r in r0..r1 {
                        let wrow = w.row(r);
                        if !direct {
                            path.decode(row, w, r);
                        }
                        let mut t = tb;
                        while t < tend {
                            let tn = (tend - t).min(TOKS);
                            let mut v = [0f32; TOKS];
                            if ty.is_k() {
                                let nsb = k / QK_K;
                                let xs: [&[i8]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.x, (t + j.min(tn - 1)) * k, k)
                                });
                                let ss: [&[i16]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.xs, (t + j.min(tn - 1)) * k / 16, k / 16)
                                });
                                let ds: [&[f32]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.d, (t + j.min(tn - 1)) * nsb, nsb)
                                });
                                path.kdot4(ty, wrow, row, tn, xs, ss, ds, &mut v);
                            } else {
                                let nl = kp / 4;
                                let xs: [&[i8]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.x, (t + j.min(tn - 1)) * kp, kp)
                                });
                                let is: [&[i32]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.init, (t + j.min(tn - 1)) * nl, nl)
                                });
                                let ds: [&[f32]; TOKS] = std::array::from_fn(|j| {
                                    slice(&act.d, (t + j.min(tn - 1)) * nl, nl)
                                });
                                path.bdot4(ty, wrow, row, tn, xs, is, ds, &mut v);
                            }
                            for (j, &vj) in v[..tn].iter().enumerate() {
                                out[(t + j) * rows + (r - r0)] = vj;
                            }
                            t += tn;
                        }
                    }
                }
                out
            },
        )
        .collect();
    for (p, out) in panels.iter().enumerate() {
        let r0 = p * PANEL;
        let rows = out.len() / n;
        for t in 0..n {
            y[t * m + r0..t * m + r0 + rows].copy_from_slice(&out[t * rows..(t + 1) * rows]);
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx2/quant.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "arch/x86_64/avx512/quant.rs"]
mod avx512;

#[cfg(test)]
mod tests;
