//! One safe entry point to the `gemm` crate for the evaluation kernels (KNN, the probe).

use gemm::Parallelism;

/// A matrix operand: its buffer with the row and column strides, in elements.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// Products of at least this many multiply-adds are split over rayon's threads; smaller ones
/// run on the calling thread (threading them costs more than it saves).
const PARALLEL_WORK: usize = 1 << 22;

/// `dst (m x n, row-major) = [dst +] lhs (m x k) · rhs (k x n)`.
///
/// `parallel`: let gemm use rayon's threads when the product is large enough. Callers already
/// running inside a rayon task pass `false`.
///
/// Panics if an operand is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    parallel: bool,
) {
    assert!(dst.len() >= m * n, "matmul: destination too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        lhs.data.len() > (m - 1) * lhs.row_stride + (k - 1) * lhs.col_stride,
        "matmul: lhs too short"
    );
    assert!(
        rhs.data.len() > (k - 1) * rhs.row_stride + (n - 1) * rhs.col_stride,
        "matmul: rhs too short"
    );
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= PARALLEL_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every strided access inside the operand slices; `dst` is
    // exclusively borrowed, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_products_with_transposes() {
        // a = [[1, 2, 3], [4, 5, 6]] (2x3), b = [[1, 0], [0, 1], [1, 1]] (3x2)
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [0.0f32; 4];
        matmul(
            &mut c,
            2,
            2,
            3,
            false,
            Operand::rows(&a, 3),
            Operand::rows(&b, 2),
            true,
        );
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
        // a aᵀ (2x2) = [[14, 32], [32, 77]], accumulated onto ones
        let mut c = [1.0f32; 4];
        matmul(
            &mut c,
            2,
            2,
            3,
            true,
            Operand::rows(&a, 3),
            Operand::transposed(&a, 3),
            false,
        );
        assert_eq!(c, [15.0, 33.0, 33.0, 78.0]);
    }
}
