//! AVX2 path of the quantised-weight kernel (`super`): the generic dot products
//! (`kdot_generic` / `bdot_generic`) and the row decoding compiled with AVX2, so the compiler
//! vectorises their exact integer sums; the float operations are the generic path's scalar ones
//! in the same order, so the results are bit-identical (tested in `quant::tests`).

use super::Row;
use crate::cpu::Avx2;

/// One K-quant output (see `super::kdot_generic`).
pub(super) fn kdot(_: Avx2, row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
    #[target_feature(enable = "avx2")]
    fn run(row: &Row, x: &[i8], xs: &[i16], dx: &[f32]) -> f32 {
        super::kdot_generic(row, x, xs, dx)
    }
    // SAFETY: the token proves AVX2; `run` is safe code.
    unsafe { run(row, x, xs, dx) }
}

/// One Q8_0 / Q4_0 output (see `super::bdot_generic`).
pub(super) fn bdot(_: Avx2, row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
    #[target_feature(enable = "avx2")]
    fn run(row: &Row, x: &[i8], init: &[i32], dx: &[f32]) -> f32 {
        super::bdot_generic(row, x, init, dx)
    }
    // SAFETY: the token proves AVX2; `run` is safe code.
    unsafe { run(row, x, init, dx) }
}

/// `row.decode(w, r)` compiled with AVX2 (the same integer and copy operations, vectorised).
pub(super) fn decode(_: Avx2, row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
    #[target_feature(enable = "avx2")]
    fn run(row: &mut Row, w: &super::QMatrix<'_>, r: usize) {
        row.decode(w, r);
    }
    // SAFETY: the token proves AVX2; `run` is safe code.
    unsafe { run(row, w, r) }
}
