/// A dense row-major `rows x cols` f32 matrix: the common currency between the crates
/// (embedding tables, features for the probes), cheap to hand to candle or to a gRPC chunker.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Panics if `data.len() != rows * cols`: a programming error, not a user error.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Self { rows, cols, data }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The rows at `ids`, in that order.
    pub fn select_rows(&self, ids: &[u32]) -> Matrix {
        let mut data = Vec::with_capacity(ids.len() * self.cols);
        for &i in ids {
            data.extend_from_slice(self.row(i as usize));
        }
        Matrix::from_vec(ids.len(), self.cols, data)
    }
}
