use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TYPES: [QType; 6] = QType::ALL;

/// Random blocks of `ty` for a `[rows, k]` matrix (random quants, scales in a realistic range).
fn random_matrix(ty: QType, rows: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = rows * k / ty.block_values();
    let mut data = vec![0u8; blocks * ty.block_bytes()];
    rng.fill(&mut data[..]);
    let put = |b: &mut [u8], at: usize, v: f32| {
        b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    };
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        let d = rng.random_range(0.001f32..0.05);
        let dmin = rng.random_range(0.0f32..0.02);
        match ty {
            QType::Q8_0 | QType::Q4_0 => put(b, 0, d),
            QType::Q4K | QType::Q5K => {
                put(b, 0, d);
                put(b, 2, dmin);
            }
            QType::Q6K => put(b, 208, d),
            // 2^(e − 128) from 2^−10 to 2^−2 (`d`'s range, times the doubled values' 12).
            QType::Mxfp4 => b[0] = rng.random_range(118u8..=126),
        }
    }
    data
}

fn random_x(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * k)
        .map(|i| {
            // Some outliers and a zero block now and then.
            if i % 997 == 5 {
                rng.random_range(-20.0f32..20.0)
            } else {
                rng.random_range(-1.0f32..1.0)
            }
        })
        .collect()
}

/// The activations as the kernel sees them, dequantised (values × their block scale), and the
/// per-element bound on the quantisation error.
fn quantised_x(ty: QType, x: &[f32], n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut xq = vec![0f32; n * k];
    let mut err = vec![0f32; n * k];
    let bv = if ty.is_k() { QK_K } else { QK };
    for (b, (src, (dst, e))) in x
        .chunks_exact(bv)
        .zip(xq.chunks_exact_mut(bv).zip(err.chunks_exact_mut(bv)))
        .enumerate()
    {
        let _ = b;
        let mut q = vec![0i8; bv];
        let d = if ty.is_k() {
            let mut s = [0i16; 16];
            quantize_q8k_block(src, &mut q, &mut s)
        } else {
            quantize_q8_0_block(src, &mut q)
        };
        for j in 0..bv {
            dst[j] = f32::from(q[j]) * d;
            e[j] = 0.6 * d.abs();
        }
    }
    (xq, err)
}

fn check_against_reference(ty: QType, n: usize, rows: usize, k: usize, seed: u64) {
    let data = random_matrix(ty, rows, k, seed);
    let w = QMatrix::new(ty, &data, rows, k).unwrap();
    let x = random_x(n, k, seed + 1);
    let y = xwt_q(&x, n, &w);
    let wd = w.dequantize();
    let (xq, err) = quantised_x(ty, &x, n, k);
    for t in 0..n {
        for r in 0..rows {
            let (wr, xr) = (&wd[r * k..(r + 1) * k], &xq[t * k..(t + 1) * k]);
            let exact: f64 = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let mag: f64 = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| f64::from((a * b).abs()))
                .sum();
            let got = f64::from(y[t * rows + r]);
            // Same quantised operands: only f32 rounding of the block sums differs.
            assert!(
                (got - exact).abs() <= 2e-5 * mag + 1e-6,
                "{} n={n} rows={rows} k={k} t={t} r={r}: {got} vs {exact} (mag {mag})",
                ty.name()
            );
            // Against the unquantised activations: the q8 rounding bound.
            let plain: f64 = wr
                .iter()
                .zip(&x[t * k..(t + 1) * k])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let bound: f64 = wr
                .iter()
                .zip(&err[t * k..(t + 1) * k])
                .map(|(&a, &e)| f64::from(a.abs() * e))
                .sum();
            assert!(
                (got - plain).abs() <= bound + 2e-5 * mag + 1e-6,
                "{} t={t} r={r}: {got} vs unquantised {plain} (bound {bound})",
                ty.name()
            );
        }
    }
}

#[test]
fn every_type_matches_dequantised_reference() {
    for (i, ty) in TYPES.into_iter().enumerate() {
        let s = 100 * i as u64;
        if ty.is_k() {
            check_against_reference(ty, 1, 3, 256, s);
            check_against_reference(ty, 5, 17, 512, s + 10);
            check_against_reference(ty, 8, 33, 768, s + 20);
        } else {
            check_against_reference(ty, 1, 3, 32, s);
            check_against_reference(ty, 3, 17, 96, s + 10);
            check_against_reference(ty, 8, 33, 256, s + 20);
            check_against_reference(ty, 2, 5, 2048, s + 30);
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn every_path_gives_the_generic_bits() {
    let cpu = Cpu::get();
    for (i, ty) in TYPES.into_iter().enumerate() {
        // Tile edges: rows not a multiple of the 16-row panel, token counts not a multiple of
        // the 4 (K-quants) / 8 (Q8_0, Q4_0) tokens of a tile, K of one block, K not a multiple
        // of 64 values (Q8_0 / Q4_0).
        let shapes: &[(usize, usize, usize)] = if ty.is_k() {
            &[
                (1, 1, 256),
                (3, 17, 512),
                (9, 40, 2048),
                (5, 16, 256),
                (2, 31, 768),
                (7, 33, 256),
                (4, 15, 1024),
            ]
        } else {
            &[
                (1, 1, 32),
                (3, 17, 96),
                (9, 40, 2048),
                (2, 5, 160),
                (13, 19, 32),
                (8, 16, 64),
                (17, 47, 288),
                (11, 1, 224),
            ]
        };
        for &(n, rows, k) in shapes {
            let data = random_matrix(ty, rows, k, 7 + i as u64);
            let w = QMatrix::new(ty, &data, rows, k).unwrap();
            let x = random_x(n, k, 9);
            let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
            assert_eq!(g, bits(&xwt_q_on(cpu, Kernel::Gemm, &x, n, &w)));
            let a2 = bits(&xwt_q_on(cpu.without_avx512(), Kernel::Avx2, &x, n, &w));
            assert_eq!(g, a2, "{} avx2 n={n} rows={rows} k={k}", ty.name());
            let a5 = bits(&xwt_q_on(cpu, Kernel::Avx512, &x, n, &w));
            assert_eq!(g, a5, "{} avx512 n={n} rows={rows} k={k}", ty.name());
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The paths were really taken on this CPU (when it has them).
        assert_eq!(
            Path::choose(cpu, Kernel::Avx512).name(),
            if cpu.avx512_vnni().is_some() {
                "avx512-vnni"
            } else if cpu.avx2().is_some() {
                if cpu.avx_vnni().is_some() {
                    "avx2-vnni"
                } else {
                    "avx2"
                }
            } else {
                "generic"
            }
        );
    }
}

#[test]
fn results_do_not_depend_on_batch_or_threads() {
    for ty in TYPES {
        // n > TBLOCK: tokens in two blocks of the row loop.
        let (n, rows, k) = (70, 50, 512);
        let data = random_matrix(ty, rows, k, 3);
        let w = QMatrix::new(ty, &data, rows, k).unwrap();
        let x = random_x(n, k, 4);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| xwt_q(&x, n, &w))
        };
        let one = run(1);
        assert_eq!(bits(&one), bits(&run(3)), "{}", ty.name());
        for t in 0..n {
            let single = xwt_q(&x[t * k..(t + 1) * k], 1, &w);
            assert_eq!(bits(&single), bits(&one[t * rows..(t + 1) * rows]));
        }
    }
}

#[test]
fn wrong_sizes_are_refused() {
    for ty in TYPES {
        let (bv, bb) = (ty.block_values(), ty.block_bytes());
        let data = vec![0u8; 4 * bb];
        assert!(QMatrix::new(ty, &data, 2, 2 * bv).is_some());
        assert!(QMatrix::new(ty, &data[..4 * bb - 1], 2, 2 * bv).is_none());
        assert!(QMatrix::new(ty, &data, 3, 2 * bv).is_none());
        assert!(QMatrix::new(ty, &data, 2, 2 * bv + 1).is_none());
        assert!(QMatrix::new(ty, &data, 4, bv / 2).is_none());
        assert!(QMatrix::new(ty, &data, 2, 0).is_none());
        assert!(QMatrix::new(ty, &data, usize::MAX, bv).is_none());
        assert!(QMatrix::new(ty, &data, usize::MAX / 2, 4 * bv).is_none());
        // Empty products.
        let w = QMatrix::new(ty, &[], 0, bv).unwrap();
        assert!(xwt_q(&vec![0.0; bv], 1, &w).is_empty());
    }
}

#[test]
fn activations_are_quantised_as_ggml_does() {
    // q8_K: scale from the value of largest magnitude, iscale = -127 / max, ties to even.
    let mut x = [0f32; QK_K];
    x[0] = -127.0;
    x[1] = 2.5;
    x[2] = 3.5;
    x[3] = -0.5;
    let (mut q, mut s) = ([0i8; QK_K], [0i16; 16]);
    let d = quantize_q8k_block(&x, &mut q, &mut s);
    assert_eq!(d, 1.0); // max = -127: iscale = 1
    assert_eq!(&q[..4], &[-127, 2, 4, 0]); // 2.5 -> 2, 3.5 -> 4, -0.5 -> 0 (half to even)
    assert_eq!(s[0], -121);
    assert_eq!(&s[1..], &[0; 15]);
    // q8_0: d = max|x| / 127 rounded to f16, values rounded half away from zero.
    let mut x = [0f32; QK];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    let mut q = [0i8; QK];
    let d = quantize_q8_0_block(&x, &mut q);
    assert_eq!(d, 1.0);
    assert_eq!(&q[..3], &[127, 3, -3]);
    // All zero: scale 0, values 0.
    let d = quantize_q8_0_block(&[0.0; QK], &mut q);
    assert_eq!((d, q), (0.0, [0; QK]));
}

#[test]
fn dequantisation_follows_ggml() {
    // Q4_K: one super-block with scale 2 / min 1 for sub-block 0 and value 5 at position 0.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
    b[4] = 2; // sc0
    b[8] = 1; // m0
    b[16] = 0x35; // value 0 -> 5 (sub-block 0), value 32 -> 3 (sub-block 1: scale 0, min 0)
    let w = QMatrix::new(QType::Q4K, &b, 1, 256).unwrap();
    let d = w.dequantize();
    assert_eq!(d[0], 0.5 * 2.0 * 5.0 - 0.25);
    assert_eq!(d[1], -0.25);
    assert_eq!(d[32], 0.0);
    // Q6_K: value 0 = (ql & 15 | (qh & 3) << 4) - 32, times d · scale.
    let mut b = vec![0u8; 210];
    b[0] = 0x07;
    b[128] = 0x02;
    b[192] = (-3i8) as u8;
    b[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    let w = QMatrix::new(QType::Q6K, &b, 1, 256).unwrap();
    let d = w.dequantize();
    assert_eq!(d[0], 0.5 * -3.0 * (39.0 - 32.0));
    assert_eq!(d[1], 0.5 * -3.0 * -32.0);
    assert_eq!(d[16], 0.0);
}

#[test]
fn q8_0_equals_ggml_vec_dot_bit_for_bit() {
    // ggml's `ggml_vec_dot_q8_0_q8_0` (generic): per block `sumi = Σ w · x` (integers), then
    // `sumf += sumi · (d_w · d_x)`, blocks in order.
    let (n, rows, k) = (5, 21, 320);
    let data = random_matrix(QType::Q8_0, rows, k, 41);
    let w = QMatrix::new(QType::Q8_0, &data, rows, k).unwrap();
    let x = random_x(n, k, 42);
    let y = xwt_q(&x, n, &w);
    for t in 0..n {
        let (xq, dx) = q8_0_activations(&x[t * k..(t + 1) * k]);
        for r in 0..rows {
            let mut sumf = 0f32;
            for b in 0..k / QK {
                let blk = &data[(r * k / QK + b) * 34..(r * k / QK + b + 1) * 34];
                let sumi: i32 = (0..QK)
                    .map(|i| i32::from(blk[2 + i] as i8) * i32::from(xq[b * QK + i]))
                    .sum();
                sumf += sumi as f32 * (f16_at(blk, 0) * dx[b]);
            }
            assert_eq!(sumf.to_bits(), y[t * rows + r].to_bits(), "t={t} r={r}");
        }
    }
}

/// One token's activations quantised as ggml's `quantize_row_q8_0`: the values and each block's
/// scale.
fn q8_0_activations(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut xq = vec![0i8; x.len()];
    let dx = x
        .chunks_exact(QK)
        .zip(xq.chunks_exact_mut(QK))
        .map(|(x, q)| quantize_q8_0_block(x, q))
        .collect();
    (xq, dx)
}

#[test]
fn mxfp4_equals_ggml_vec_dot_bit_for_bit() {
    // ggml's `ggml_vec_dot_mxfp4_q8_0` (generic): per block `d = d_x · e8m0_half(e)` and
    // `sumi = Σ x[j] · kvalues[lo nibble j] + Σ x[j + 16] · kvalues[hi nibble j]`, then
    // `sumf += d · sumi`, blocks in order; the activations quantised by `quantize_row_q8_0`.
    let (n, rows, k) = (5, 21, 320);
    let data = random_matrix(QType::Mxfp4, rows, k, 43);
    let w = QMatrix::new(QType::Mxfp4, &data, rows, k).unwrap();
    let x = random_x(n, k, 44);
    let y = xwt_q(&x, n, &w);
    let kv = crate::mxfp4::KVALUES;
    for t in 0..n {
        let (xq, dx) = q8_0_activations(&x[t * k..(t + 1) * k]);
        for r in 0..rows {
            let mut sumf = 0f32;
            for b in 0..k / QK {
                let blk = &data[(r * k / QK + b) * 17..(r * k / QK + b + 1) * 17];
                let d = dx[b] * crate::mxfp4::e8m0_half(blk[0]);
                let (mut sumi1, mut sumi2) = (0i32, 0i32);
                for j in 0..QK / 2 {
                    let q = blk[1 + j];
                    sumi1 += i32::from(xq[b * QK + j]) * i32::from(kv[usize::from(q & 0xF)]);
                    sumi2 += i32::from(xq[b * QK + j + 16]) * i32::from(kv[usize::from(q >> 4)]);
                }
                sumf += d * (sumi1 + sumi2) as f32;
            }
            assert_eq!(sumf.to_bits(), y[t * rows + r].to_bits(), "t={t} r={r}");
        }
    }
}

#[test]
fn mxfp4_dequantises_as_the_mxfp4_kernel_decodes() {
    // The same block in ggml's layout through `QMatrix::dequantize` and through
    // `mxfp4::MxMatrix` (exact decoding, the f32 path's values).
    let (rows, k) = (7, 96);
    let data = random_matrix(QType::Mxfp4, rows, k, 45);
    let q = QMatrix::new(QType::Mxfp4, &data, rows, k)
        .unwrap()
        .dequantize();
    let m =
        crate::mxfp4::MxMatrix::new(crate::mxfp4::MxLayout::Ggml { data: &data }, rows, k).unwrap();
    let mut eye = vec![0f32; k * k];
    for i in 0..k {
        eye[i * k + i] = 1.0;
    }
    // x = I: row i of the result is column i of W, exactly (one non-zero product per sum).
    let cols = crate::mxfp4::xwt_mxfp4(&eye, k, &m);
    for r in 0..rows {
        for c in 0..k {
            assert_eq!(
                q[r * k + c].to_bits(),
                cols[c * rows + r].to_bits(),
                "{r} {c}"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_panel_transpose_moves_every_unit() {
    let Some(t) = Cpu::get().avx512_vnni() else {
        return;
    };
    let len = 192;
    let rows: Vec<Vec<u8>> = (0..16)
        .map(|j| (0..len).map(|i| (j * 31 + i * 7 + i / 64) as u8).collect())
        .collect();
    let src: [&[u8]; 16] = std::array::from_fn(|j| &rows[j][..]);
    let mut dst = vec![0u8; 16 * len];
    avx512::transpose16(t, src, &mut dst);
    for g in 0..len / 4 {
        for (j, row) in rows.iter().enumerate() {
            assert_eq!(
                &dst[64 * g + 4 * j..64 * g + 4 * j + 4],
                &row[4 * g..4 * g + 4]
            );
        }
    }
}

/// A K-quant matrix of `rows` × `k` whose every super-block has the largest magnitudes the
/// format allows: Q4_K nibbles 15 and 6-bit scales / mins 63 (or all zero bits in every other
/// row), Q6_K values 63 or 0 and scales ±127 / −128; d and dmin large.
fn extreme_matrix(ty: QType, rows: usize, k: usize) -> Vec<u8> {
    let (bb, nb) = (ty.block_bytes(), k / QK_K);
    let mut data = vec![0u8; rows * nb * bb];
    for (i, b) in data.chunks_exact_mut(bb).enumerate() {
        let r = i / nb;
        match ty {
            QType::Q4K => {
                b[0..2].copy_from_slice(&f16::from_f32(3.0e3).to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(-1.5e3).to_le_bytes());
                let fill = if r % 2 == 0 { 0xFF } else { 0x0F };
                b[4..16].fill(fill);
                b[16..144].fill(if r % 3 == 2 { 0 } else { 0xFF });
            }
            QType::Q6K => {
                b[0..192].fill(if r % 2 == 0 { 0xFF } else { 0 });
                for (g, s) in b[192..208].iter_mut().enumerate() {
                    *s = match (g + r) % 3 {
                        0 => 127,
                        1 => 0x80, // −128
                        _ => 0x81, // −127
                    };
                }
                b[208..210].copy_from_slice(&f16::from_f32(-2.0e3).to_le_bytes());
            }
            _ => unreachable!("extreme_matrix: K-quants of the tile only"),
        }
    }
    data
}

#[test]
fn k_quant_tiles_give_the_generic_bits_at_every_edge() {
    let cpu = Cpu::get();
    // Token counts 1 ..= 17 (one tile with the values unpacked in registers up to 8, then the
    // panel path with whole and partial tiles), rows around the 16-row panel, k of one
    // super-block and of several.
    for (i, ty) in [QType::Q4K, QType::Q6K, QType::Q5K].into_iter().enumerate() {
        for &(rows, k) in &[(1usize, 256usize), (15, 256), (17, 512), (33, 768)] {
            let data = random_matrix(ty, rows, k, 50 + i as u64);
            let w = QMatrix::new(ty, &data, rows, k).unwrap();
            for n in 1..=17 {
                let x = random_x(n, k, 60 + n as u64);
                let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
                let a5 = bits(&xwt_q_on(cpu, Kernel::Avx512, &x, n, &w));
                assert_eq!(g, a5, "{} n={n} rows={rows} k={k}", ty.name());
            }
        }
    }
}

#[test]
fn k_quant_extremes_give_the_generic_bits() {
    // The largest integer sums the formats allow: Q4_K's half-group sums reach
    // 16 · 15 · 127 = 30480 (the AVX-512 tile's 16-bit scale step), Q6_K's group sums
    // 16 · 63 · 127 with scales −128 and 127.
    let cpu = Cpu::get();
    for ty in [QType::Q4K, QType::Q6K] {
        for &(n, rows, k) in &[(1usize, 16usize, 256usize), (8, 17, 512), (13, 5, 256)] {
            let data = extreme_matrix(ty, rows, k);
            let w = QMatrix::new(ty, &data, rows, k).unwrap();
            // ±1 everywhere: every quantised activation is ±127; token parity flips the sign
            // pattern, and one token is all +1 (a single sign in every group).
            let x: Vec<f32> = (0..n * k)
                .map(|i| {
                    let (t, v) = (i / k, i % k);
                    if t == 0 || (v / 4 + t) % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect();
            let g = xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w);
            assert!(g.iter().all(|v| v.is_finite()), "{}", ty.name());
            assert!(g[..rows].iter().all(|v| *v != 0.0), "{}", ty.name());
            let a5 = xwt_q_on(cpu, Kernel::Avx512, &x, n, &w);
            assert_eq!(bits(&g), bits(&a5), "{} n={n} rows={rows} k={k}", ty.name());
            // Token 0 (all +1, quantised to +127 with d_x = 1/127) against the exact sum of the
            // dequantised row: the integer sums are exact, only the f32 steps round.
            let wd = w.dequantize();
            for r in 0..rows {
                let row = &wd[r * k..(r + 1) * k];
                let exact: f64 = row.iter().map(|&v| f64::from(v)).sum();
                let mag: f64 = row.iter().map(|&v| f64::from(v.abs())).sum();
                let got = f64::from(g[r]);
                assert!(
                    (got - exact).abs() <= 1e-5 * mag,
                    "{} r={r}: {got} vs {exact}",
                    ty.name()
                );
            }
        }
    }
}

/// A `[rows, k]` matrix of `ty` whose every byte is `fill`, with the f16 scales set to 0.01
/// (Q6_K: the i8 group scales alternate −128 / 127 when `fill` is 0x80).
fn filled_matrix(ty: QType, rows: usize, k: usize, fill: u8) -> Vec<u8> {
    let mut data = vec![fill; rows * k / ty.block_values() * ty.block_bytes()];
    let d = f16::from_f32(0.01).to_le_bytes();
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        match ty {
            QType::Q8_0 | QType::Q4_0 => b[0..2].copy_from_slice(&d),
            QType::Q4K | QType::Q5K => {
                b[0..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&d);
            }
            QType::Q6K => {
                b[208..210].copy_from_slice(&d);
                if fill == 0x80 {
                    for g in 0..16 {
                        b[192 + g] = if g % 2 == 0 { 0x80 } else { 0x7F };
                    }
                }
            }
            // 2^−7 (nibbles 7 / 15: the doubled E2M1 values ±12, the largest).
            QType::Mxfp4 => b[0] = 121,
        }
    }
    data
}

#[test]
fn the_avx2_tile_gives_the_generic_bits_at_extreme_values() {
    // Largest weights (Q8_0: −128 and 127; 4/5/6-bit values 15 / 31 / 63; scales and mins 63;
    // Q6_K scales −128 / 127) times activations that quantise to ±127 in every sign pattern:
    // the tile's i16 pair sums come closest to saturation here (Q8_0: 2 · 128 · 127; Q4_K:
    // 16 · 15 · 127; Q5_K: 8 · 31 · 127; Q6_K: 4 · 63 · 127); strips of 8 rows cut at odd row
    // counts, token counts that are not a multiple of the 4-token tile, k of one block.
    let cpu = Cpu::get();
    for ty in TYPES {
        let bv = ty.block_values();
        for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0x88] {
            for &(n, rows, k) in &[(1, 1, bv), (5, 9, bv), (3, 7, 2 * bv), (9, 17, 3 * bv)] {
                let data = filled_matrix(ty, rows, k, fill);
                let w = QMatrix::new(ty, &data, rows, k).unwrap();
                let patterns: [&dyn Fn(usize) -> f32; 4] = [
                    &|_| 1.0,
                    &|_| -1.0,
                    &|i| if i % 2 == 0 { 1.0 } else { -1.0 },
                    &|i| if (i / 2) % 3 == 0 { -1.0 } else { 1.0 },
                ];
                for (pi, pat) in patterns.iter().enumerate() {
                    let x: Vec<f32> = (0..n * k).map(pat).collect();
                    let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
                    let a2 = bits(&xwt_q_on(cpu.without_avx512(), Kernel::Avx2, &x, n, &w));
                    assert_eq!(
                        g,
                        a2,
                        "{} fill {fill:#x} pattern {pi} n={n} rows={rows} k={k}",
                        ty.name()
                    );
                    // The reference itself: an exact integer sum per block (Q8_0 all −128
                    // against all 127 activations).
                    if ty == QType::Q8_0 && fill == 0x80 && pi == 0 {
                        let blocks = (k / QK) as f32;
                        let per = (-128 * 127 * QK as i32) as f32;
                        let dx = f16::from_f32(1.0 / 127.0).to_f32();
                        let dw = f16::from_f32(0.01).to_f32();
                        let mut acc = 0f32;
                        for _ in 0..blocks as usize {
                            acc += per * (dw * dx);
                        }
                        assert_eq!(f32::from_bits(g[0]), acc);
                    }
                }
            }
        }
    }
}

#[test]
fn the_avx2_tile_covers_every_strip_and_token_edge() {
    // Row counts around the 8-row strip and 16-row panel, token counts around the 4-token
    // tile, on random blocks: the AVX2 path against the generic bits.
    let cpu = Cpu::get();
    for (i, ty) in TYPES.into_iter().enumerate() {
        let k = 2 * ty.block_values();
        for rows in [1usize, 7, 8, 9, 15, 16, 23, 25] {
            let data = random_matrix(ty, rows, k, 50 + i as u64 + rows as u64);
            let w = QMatrix::new(ty, &data, rows, k).unwrap();
            for n in [1usize, 2, 3, 4, 5, 8, 11] {
                let x = random_x(n, k, 60 + n as u64);
                let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
                let a2 = bits(&xwt_q_on(cpu.without_avx512(), Kernel::Avx2, &x, n, &w));
                assert_eq!(g, a2, "{} n={n} rows={rows} k={k}", ty.name());
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if cpu.avx2().is_some() {
        // The forced AVX2 kernel really is the AVX2 path on this CPU (with AVX-VNNI when the CPU
        // has it; its own tests are in `avx2::tests`).
        let a2 = if cpu.avx_vnni().is_some() {
            "avx2-vnni"
        } else {
            "avx2"
        };
        assert_eq!(Path::choose(cpu.without_avx512(), Kernel::Avx2).name(), a2);
        assert_eq!(Path::choose(cpu, Kernel::Avx2).name(), a2);
    }
}

/// ggml's `quantize_row_q8_K_ref` as a plain scan (the form the kernel's vectorised version
/// replaced): the first value of largest magnitude by strict `>`.
fn q8k_block_scan(x: &[f32], q: &mut [i8], sums: &mut [i16]) -> f32 {
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

/// ggml's `quantize_row_q8_0_ref` as a plain scan, with `roundf` by branches.
fn q8_0_block_scan(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x[..QK].iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (qv, &v) in q[..QK].iter_mut().zip(&x[..QK]) {
        let t = (v * id) as i32;
        let frac = v * id - t as f32;
        let r = if frac >= 0.5 {
            t.saturating_add(1)
        } else if frac <= -0.5 {
            t.saturating_sub(1)
        } else {
            t
        };
        *qv = r.clamp(-127, 127) as i8;
    }
    f16::from_f32(d).to_f32()
}

/// Hostile activation blocks: NaN, infinities, ties of magnitude with both signs, zeros of both
/// signs, subnormals, huge values, exact halves.
fn hostile_blocks(len: usize) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let mut out = Vec::new();
    for case in 0..40 {
        let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let at = |rng: &mut ChaCha8Rng| rng.random_range(0..len);
        match case % 10 {
            0 => x[at(&mut rng)] = f32::NAN,
            1 => x[at(&mut rng)] = f32::INFINITY,
            2 => {
                x[at(&mut rng)] = f32::NEG_INFINITY;
                x[at(&mut rng)] = f32::NAN;
            }
            3 => {
                // The largest magnitude twice, with opposite signs: the first one sets the sign.
                let (i, j) = (at(&mut rng), at(&mut rng));
                x[i] = 9.0;
                x[j] = -9.0;
            }
            4 => x
                .iter_mut()
                .for_each(|v| *v = if rng.random() { 0.0 } else { -0.0 }),
            5 => x.iter_mut().for_each(|v| *v *= 1e-40),
            6 => x[at(&mut rng)] = 3.0e38,
            7 => {
                // Exact halves after scaling: max 127 gives scale 1.
                x[0] = 127.0;
                for (i, v) in x.iter_mut().enumerate().skip(1) {
                    *v = (i as f32 - 16.0) + 0.5;
                }
            }
            8 => x.iter_mut().for_each(|v| *v = f32::NAN),
            _ => x[at(&mut rng)] = -2.5e9,
        }
        out.push(x);
    }
    out
}

#[test]
fn vectorised_activation_quantisers_equal_the_scans() {
    let bits8 = |q: &[i8]| q.to_vec();
    for x in hostile_blocks(QK_K) {
        let (mut qa, mut sa, mut qb, mut sb) = ([0i8; QK_K], [0i16; 16], [0i8; QK_K], [0i16; 16]);
        let da = quantize_q8k_block(&x, &mut qa, &mut sa);
        let db = q8k_block_scan(&x, &mut qb, &mut sb);
        assert_eq!(da.to_bits(), db.to_bits(), "q8_K scale of {x:?}");
        assert_eq!((bits8(&qa), sa), (bits8(&qb), sb));
    }
    for x in hostile_blocks(QK) {
        let (mut qa, mut qb) = ([0i8; QK], [0i8; QK]);
        let da = quantize_q8_0_block(&x, &mut qa);
        let db = q8_0_block_scan(&x, &mut qb);
        assert_eq!(da.to_bits(), db.to_bits(), "q8_0 scale of {x:?}");
        assert_eq!(qa, qb, "q8_0 values of {x:?}");
    }
    // Whole tokens through the per-path quantisation (the AVX-512 build where the CPU has it)
    // against the scans, block by block.
    let k = 4 * QK_K;
    let x: Vec<f32> = hostile_blocks(QK_K).into_iter().take(8).flatten().collect();
    for ty in [QType::Q4K, QType::Q8_0] {
        for cpu in [Cpu::get(), Cpu::scalar()] {
            let a = Act::quantize(cpu, ty, &x, 2, k);
            for t in 0..2 {
                let xt = &x[t * k..(t + 1) * k];
                if ty.is_k() {
                    for s in 0..k / QK_K {
                        let (mut q, mut sm) = ([0i8; QK_K], [0i16; 16]);
                        let d = q8k_block_scan(&xt[s * QK_K..], &mut q, &mut sm);
                        assert_eq!(a.d(t)[s].to_bits(), d.to_bits());
                        assert_eq!(&a.x(t)[s * QK_K..(s + 1) * QK_K], &q[..]);
                        assert_eq!(&a.xs(t)[s * 16..(s + 1) * 16], &sm[..]);
                    }
                } else {
                    for b in 0..k / QK {
                        let mut q = [0i8; QK];
                        let d = q8_0_block_scan(&xt[b * QK..], &mut q);
                        assert_eq!(a.d(t)[b].to_bits(), d.to_bits());
                        assert_eq!(&a.x(t)[b * QK..(b + 1) * QK], &q[..]);
                        let s: i32 = q.iter().map(|&v| i32::from(v)).sum();
                        assert_eq!(a.init(t)[b], -128 * s);
                    }
                }
            }
        }
    }
}

#[test]
fn q8_0_decode_path_gives_the_generic_bits_at_every_edge() {
    let cpu = Cpu::get();
    // One token (the direct path on AVX-512) and two (the panel path), rows around the 16-row
    // panel, k of one block, odd and even block counts, one to three strips of 32 blocks.
    for (i, &(rows, k)) in [
        (1usize, 32usize),
        (15, 64),
        (16, 96),
        (17, 1024),
        (33, 1056),
        (5, 2080),
        (40, 3104),
    ]
    .iter()
    .enumerate()
    {
        for fill in [None, Some(0x80u8), Some(0x7F), Some(0xFF)] {
            let data = match fill {
                None => random_matrix(QType::Q8_0, rows, k, 90 + i as u64),
                Some(f) => filled_matrix(QType::Q8_0, rows, k, f),
            };
            let w = QMatrix::new(QType::Q8_0, &data, rows, k).unwrap();
            for n in 1..=3 {
                let mut x = random_x(n, k, 100 + n as u64);
                if fill.is_some() {
                    // The largest activations: every value ±127 after quantisation.
                    x.iter_mut()
                        .enumerate()
                        .for_each(|(j, v)| *v = if j % 3 == 0 { -1.0 } else { 1.0 });
                }
                let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
                let a5 = bits(&xwt_q_on(cpu, Kernel::Avx512, &x, n, &w));
                assert_eq!(g, a5, "q8_0 n={n} rows={rows} k={k} fill={fill:?}");
            }
            // The direct kernel at two tokens too (the dispatch sends it one).
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = cpu.avx512_vnni() {
                let x = random_x(2, k, 7);
                let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, 2, &w));
                let act = Act::quantize(cpu, QType::Q8_0, &x, 2, k);
                for r0 in (0..rows).step_by(16) {
                    let r = 16.min(rows - r0);
                    let mut tile = [0f32; avx512::ROWS * avx512::TOKENS];
                    avx512::q8_0_direct(t, &w, r0, r, &act, 2, &mut tile, &[]);
                    for j in 0..2 {
                        assert_eq!(
                            bits(&tile[16 * j..16 * j + r]),
                            g[j * rows + r0..j * rows + r0 + r],
                            "q8_0 direct, 2 tokens, rows={rows} k={k} r0={r0}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn k_quant_direct_path_gives_the_strip_and_generic_bits() {
    // The direct Q4_K / Q6_K path of the AVX2 tile (1 ..= 4 tokens) against the transposed strip
    // and its tile, and against the generic path, bit for bit: rows around the 8-row strip, one to
    // four super-blocks, random blocks and every byte one value (Q4_K: nibbles 0 / 15, scales and
    // mins 0 / 63 / mixed; Q6_K: values 0 / 63, group scales −1, −128 / 127, 127, −120), with
    // random activations and ones of ±127 after quantisation; every variant of this CPU (AVX-VNNI
    // too where present) at every n up to 4, whatever its dispatch bound.
    let cpu = Cpu::get().without_avx512();
    let isas: Vec<avx2::Isa> = [cpu, cpu.without_avx_vnni()]
        .into_iter()
        .filter_map(avx2::Isa::of)
        .collect();
    if isas.is_empty() {
        return;
    }
    let mut checked = 0usize;
    for (i, ty) in [QType::Q4K, QType::Q6K].into_iter().enumerate() {
        for &(rows, nsb) in &[(1usize, 1usize), (7, 2), (8, 3), (13, 1), (17, 4), (24, 2)] {
            let k = nsb * QK_K;
            for fill in [
                None,
                Some(0x00u8),
                Some(0xFF),
                Some(0x80),
                Some(0x7F),
                Some(0x88),
            ] {
                let data = match fill {
                    None => random_matrix(ty, rows, k, 300 + 10 * i as u64 + rows as u64),
                    Some(f) => filled_matrix(ty, rows, k, f),
                };
                let w = QMatrix::new(ty, &data, rows, k).unwrap();
                for n in 1..=4 {
                    let mut x = random_x(n, k, 400 + n as u64 + nsb as u64);
                    if fill.is_some_and(|f| f != 0x88) {
                        x.iter_mut()
                            .enumerate()
                            .for_each(|(j, v)| *v = if j % 5 == 1 { -1.0 } else { 1.0 });
                    }
                    let what = format!("{} n={n} rows={rows} k={k} fill={fill:?}", ty.name());
                    let g = bits(&xwt_q_on(Cpu::scalar(), Kernel::Gemm, &x, n, &w));
                    let a2 = bits(&xwt_q_on(cpu, Kernel::Avx2, &x, n, &w));
                    assert_eq!(g, a2, "dispatch: {what}");
                    let act = Act::quantize(cpu, ty, &x, n, k);
                    for &t in &isas {
                        let mut strip = avx2::Strip::new(t, ty, k);
                        for r0 in (0..rows).step_by(avx2::ROWS) {
                            let r = avx2::ROWS.min(rows - r0);
                            let mut direct = [0f32; avx2::ROWS * avx2::TOKENS];
                            let mut tile = [0f32; avx2::ROWS * avx2::TOKENS];
                            avx2::direct_k(t, &w, r0, r, &act, n, &mut direct, &[]);
                            strip.fill(&w, r0, r, &[]);
                            avx2::run_tile(&strip, &act, 0, n, &mut tile);
                            for j in 0..n {
                                let d = bits(&direct[8 * j..8 * j + r]);
                                assert_eq!(d, bits(&tile[8 * j..8 * j + r]), "strip: {what}");
                                let o = j * rows + r0;
                                assert_eq!(d, g[o..o + r], "generic: {what} r0={r0}");
                                checked += r;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 0);
}
