//! A safe front end for the `gemm` crate's f64 matrix product (whose entry point takes raw
//! pointers and strides): strided views whose every element is checked to lie inside their slice
//! when they are made.

/// A read-only strided matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f64],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable strided matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f64],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Whether the largest index of a `rows × cols` view with these strides lies below `len`.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)));
    last.is_some_and(|l| l < len) && isize::try_from(rs.max(cs)).is_ok()
}

impl<'a> MatRef<'a> {
    /// A view of `data`; panics unless every element lies inside `data`.
    pub fn new(
        data: &'a [f64],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert!(
            fits(data.len(), rows, cols, row_stride, col_stride),
            "MatRef: {rows}×{cols} view with strides ({row_stride}, {col_stride}) exceeds {} elements",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: col_stride,
        }
    }
}

impl<'a> MatMut<'a> {
    /// A view of `data`; panics unless every element lies inside `data`. Distinct elements must
    /// not share a place (a zero stride with more than one row or column is refused).
    pub fn new(
        data: &'a mut [f64],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        assert!(
            fits(data.len(), rows, cols, row_stride, col_stride)
                && (rows <= 1 || row_stride > 0)
                && (cols <= 1 || col_stride > 0)
                && (rows <= 1 || cols <= 1 || row_stride != col_stride),
            "MatMut: {rows}×{cols} view with strides ({row_stride}, {col_stride}) is not valid for {} elements",
            data.len()
        );
        MatMut {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: col_stride,
        }
    }
}

/// `dst := lhs · rhs` (`accumulate = false`) or `dst := dst + lhs · rhs` (`accumulate = true`),
/// single-threaded, by `gemm::gemm` (its f64 kernel; the summation order depends only on the
/// shapes).
pub fn gemm_f64(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "gemm_f64: shapes {}×{} = {}×{} · {}×{}",
        m,
        n,
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element of the three views lies inside its slice (checked by the
    // constructors, strides fit in isize); dst is borrowed mutably, so it does not overlap lhs or
    // rhs, and its elements are distinct places; with read_dst = false gemm only writes dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one sum at a time.
    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|q| a[i * k + q] * b[q * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_match_the_definition() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|x| (x % 5) as f64 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|x| (x % 3) as f64 + 0.5).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![9.0; m * n];
        gemm_f64(
            MatMut::new(&mut c, m, n, n, 1),
            MatRef::new(&a, m, k, k, 1),
            MatRef::new(&b, k, n, n, 1),
            false,
        );
        assert_eq!(c, want);
        // Accumulate, column-major destination, transposed operand views.
        let mut ct = vec![1.0; m * n];
        gemm_f64(
            MatMut::new(&mut ct, m, n, 1, m),
            MatRef::new(&a, m, k, k, 1),
            MatRef::new(&b, k, n, n, 1),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(ct[j * m + i], want[i * n + j] + 1.0);
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn views_outside_the_slice_are_refused() {
        let a = vec![0.0; 10];
        MatRef::new(&a, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "not valid")]
    fn aliased_destinations_are_refused() {
        let mut a = vec![0.0; 10];
        MatMut::new(&mut a, 3, 3, 1, 1);
    }
}
