//! Small strided matrix products on the `gemm` crate (the GEMM Burn's flex backend runs), for the
//! per-head products inside the attention kernel.

/// A matrix inside a slice: element `(r, c)` at `offset + r·row_stride + c·col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A `rows × cols` matrix at `offset` whose rows are `row_stride` apart, columns adjacent.
    pub fn rows(data: &'a [f32], offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data, offset, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Panics unless every element lies inside `len` elements from the start of the slice.
    fn check(&self, len: usize, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < len, "matmul: {what} reaches element {last} of {len}");
        }
    }
}

/// `dst = beta·lhs·rhs` (or `dst += beta·lhs·rhs` with `accumulate`), `dst` a contiguous
/// `lhs.rows × rhs.cols` row-major matrix at the start of `dst`. Single-threaded: the attention
/// kernel runs one of these per head, in parallel over heads.
pub(crate) fn matmul(dst: &mut [f32], lhs: View, rhs: View, beta: f32, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k, "matmul: inner dimensions {k} and {} differ", rhs.rows);
    assert!(dst.len() >= m * n, "matmul: destination holds {} of {} elements", dst.len(), m * n);
    lhs.check(lhs.data.len(), "lhs");
    rhs.check(rhs.data.len(), "rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: every element the product reads lies inside `lhs.data` and `rhs.data` (checked
    // above), every element it writes inside `dst[..m·n]`, and `dst` is borrowed mutably, so no
    // operand aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
