//! Strided matrix products on the `gemm` crate (the GEMM Burn's flex backend runs): the per-head
//! products inside the attention kernel, and the frozen layers' products of `fused::linear`.

/// A matrix inside a slice: element `(r, c)` at `offset + r·row_stride + c·col_stride` (the bf16
/// GEMM's left operand is the same type).
pub(crate) use crate::bf16_gemm::Lhs as View;

impl<'a> View<'a> {
    /// A `rows × cols` matrix at `offset` whose rows are `row_stride` apart, columns adjacent.
    pub fn rows(data: &'a [f32], offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data, offset, rows, cols, row_stride, col_stride: 1 }
    }

    /// Rows `first..end` of the matrix, as a view of the same memory.
    pub fn row_range(self, first: usize, end: usize) -> Self {
        assert!(first <= end && end <= self.rows, "row_range: rows {first}..{end} of {}", self.rows);
        Self { offset: self.offset + first * self.row_stride, rows: end - first, ..self }
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

/// `dst = beta·lhs·rhs` (or `dst += beta·lhs·rhs` with `accumulate`), `dst` a `lhs.rows ×
/// rhs.cols` row-major matrix at the start of `dst` whose rows are `dst_row_stride ≥ rhs.cols`
/// apart (a block of columns of a wider matrix; the elements between its rows are not touched).
/// Single-threaded: the attention kernel runs one of these per head, in parallel over heads.
pub(crate) fn matmul_strided(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    beta: f32,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k, "matmul: inner dimensions {k} and {} differ", rhs.rows);
    assert!(dst_row_stride >= n, "matmul: destination rows {dst_row_stride} apart hold {n} columns");
    if m == 0 || n == 0 {
        return;
    }
    let extent = (m - 1) * dst_row_stride + n;
    assert!(dst.len() >= extent, "matmul: destination holds {} of {extent} elements", dst.len());
    lhs.check(lhs.data.len(), "lhs");
    rhs.check(rhs.data.len(), "rhs");
    if k == 0 {
        if !accumulate {
            dst[..extent].chunks_mut(dst_row_stride).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: `dst` is borrowed mutably, so no operand aliases it, and holds the rows (asserted);
    // it is initialised, so it may be read when accumulating.
    unsafe { gemm_into(dst.as_mut_ptr(), dst_row_stride, lhs, rhs, accumulate, beta, gemm::Parallelism::None) }
}

/// `lhs·rhs` into a new row-major buffer, optionally on top of `row` repeated on every row (a
/// bias). A large right operand (a layer's weight) has its output columns split over rayon's
/// threads here, one single-threaded `gemm` per block ([`SPLIT_COLUMNS_FROM`]); other products
/// use `gemm`'s own threads when large (flex's threshold, 192³ multiply-adds). No zero fill:
/// `gemm` writes every element.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) fn product(lhs: View, rhs: View, row: Option<&[f32]>) -> Vec<f32> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k, "product: inner dimensions {k} and {} differ", rhs.rows);
    assert!(row.is_none_or(|r| r.len() == n), "product: the added row must have {n} elements");
    lhs.check(lhs.data.len(), "lhs");
    rhs.check(rhs.data.len(), "rhs");
    let mut out: Vec<f32> = match row {
        Some(row) => {
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(row);
            }
            out
        }
        None if k == 0 => vec![0.0; m * n],
        None => Vec::with_capacity(m * n),
    };
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let threads = rayon::current_num_threads();
    let block = n.div_ceil(threads).next_multiple_of(16);
    if n > block && n.saturating_mul(k) >= SPLIT_COLUMNS_FROM {
        // `gemm` runs a product with one row (decoding) as a matrix-vector loop on one thread,
        // and splits one with up to a few thousand rows worse than this;
        // each thread takes a block of output columns and packs only its part of the weight.
        let dst = SendPtr(out.as_mut_ptr());
        rayon::scope(|scope| {
            for first in (0..n).step_by(block) {
                let dst = &dst;
                let cols = block.min(n - first);
                let rhs = View { offset: rhs.offset + first * rhs.col_stride, cols, ..rhs };
                scope.spawn(move |_| {
                    // SAFETY: the blocks' columns are disjoint, so no two threads touch one
                    // element; `out`'s allocation holds the `m·n` elements, and `gemm` reads them
                    // only with a bias row, which initialised them.
                    unsafe {
                        let dst = dst.0.add(first);
                        gemm_into(dst, n, lhs, rhs, row.is_some(), 1.0, gemm::Parallelism::None)
                    }
                });
            }
        });
        // SAFETY: every element was written by one of the blocks.
        unsafe { out.set_len(m * n) };
        return out;
    }
    // SAFETY: `out`'s allocation holds the `m·n` elements, written through a raw pointer; they
    // are read only with a bias row, which initialised them, and all are written by `gemm` before
    // the length is set.
    unsafe {
        gemm_into(out.as_mut_ptr(), n, lhs, rhs, row.is_some(), 1.0, parallelism(m, n, k));
        out.set_len(m * n);
    }
    out
}

/// From this many elements in the right operand (256 KiB of `f32`), [`product`] splits the output
/// columns over the threads itself, when that gives two blocks of at least 16 columns.
const SPLIT_COLUMNS_FROM: usize = 1 << 16;

/// A pointer handed to the threads of [`product`], each writing its own columns.
struct SendPtr(*mut f32);
// SAFETY: the threads write disjoint elements (see `product`).
unsafe impl Sync for SendPtr {}

/// `dst += lhs·rhs`, `dst` a contiguous row-major `lhs.rows × rhs.cols` matrix, on `gemm`'s
/// threads when large (its right operand is a thin factor, never a layer's weight). Adds a low-rank update into a layer's output in
/// the same pass that writes it back, with no buffer for the update.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) fn add_product(dst: &mut [f32], lhs: View, rhs: View) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k, "add_product: inner dimensions {k} and {} differ", rhs.rows);
    assert!(dst.len() == m * n, "add_product: destination holds {} of {} elements", dst.len(), m * n);
    lhs.check(lhs.data.len(), "lhs");
    rhs.check(rhs.data.len(), "rhs");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: `dst` is borrowed mutably, so no operand aliases it, holds the `m·n` elements and is
    // initialised.
    unsafe { gemm_into(dst.as_mut_ptr(), n, lhs, rhs, true, 1.0, parallelism(m, n, k)) }
}

/// Threads for an `m×k · k×n` product: rayon's when it has at least flex's threshold of 192³
/// multiply-adds, else one.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst = beta·lhs·rhs`, or `dst += beta·lhs·rhs` with `read_dst`, `dst` a row-major
/// `lhs.rows × rhs.cols` matrix whose rows are `dst_row_stride` apart, with a positive inner
/// dimension.
///
/// # Safety
/// `dst` must be valid for writes of those elements, which no operand aliases, and for reads of
/// them (initialised) when `read_dst`; the operands must have been checked with [`View::check`]
/// and agree on the inner dimension.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    read_dst: bool,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; the operands' elements lie inside their slices (checked).
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            dst_row_stride as isize,
            read_dst,
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
            parallelism,
        );
    }
}
