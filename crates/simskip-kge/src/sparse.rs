//! Row-sparse gradients and a lazy ("sparse") Adam optimiser.
//!
//! A training batch touches only a few rows of the embedding tables. [`RowGrads`] collects
//! gradients for exactly those rows (a per-row slot table plus a compact buffer, reset in
//! time proportional to the number of touched rows), and [`SparseAdam`] updates only those
//! rows, with per-row moment estimates and a per-row step count for bias correction, so the
//! cost of a step scales with the batch, not with the size of the tables.

use simskip_data::Matrix;

const NONE: u32 = u32::MAX;

/// Gradients for the rows of one table that a batch touched.
#[derive(Debug, Clone)]
pub struct RowGrads {
    dim: usize,
    /// `slot[row]` is the position of `row` in `rows` (or `NONE`).
    slot: Vec<u32>,
    rows: Vec<u32>,
    data: Vec<f32>,
}

impl RowGrads {
    pub fn new(num_rows: usize, dim: usize) -> Self {
        Self {
            dim,
            slot: vec![NONE; num_rows],
            rows: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of rows of the underlying table.
    pub fn num_rows(&self) -> usize {
        self.slot.len()
    }

    /// Forget all gradients; costs O(touched rows).
    pub fn clear(&mut self) {
        for &r in &self.rows {
            self.slot[r as usize] = NONE;
        }
        self.rows.clear();
        self.data.clear();
    }

    /// The gradient of `row`, created as zeros (and marked touched) if absent.
    #[inline]
    pub fn row_mut(&mut self, row: u32) -> &mut [f32] {
        let mut s = self.slot[row as usize];
        if s == NONE {
            s = self.rows.len() as u32;
            self.slot[row as usize] = s;
            self.rows.push(row);
            self.data.resize(self.data.len() + self.dim, 0.0);
        }
        let s = s as usize;
        &mut self.data[s * self.dim..(s + 1) * self.dim]
    }

    /// `grad[row] += alpha * g`.
    #[inline]
    pub fn add_scaled(&mut self, row: u32, alpha: f32, g: &[f32]) {
        for (a, &b) in self.row_mut(row).iter_mut().zip(g) {
            *a += alpha * b;
        }
    }

    /// The gradient of `row` if the batch touched it.
    pub fn get(&self, row: u32) -> Option<&[f32]> {
        let s = self.slot[row as usize];
        (s != NONE).then(|| &self.data[s as usize * self.dim..(s as usize + 1) * self.dim])
    }

    /// The touched rows, in order of first touch.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// `(row, gradient)` for every touched row.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[f32])> {
        self.rows
            .iter()
            .copied()
            .zip(self.data.chunks_exact(self.dim.max(1)))
    }
}

/// Lazy Adam: only rows with a gradient in this step are updated; each row keeps its own
/// first/second moments and step count (used for bias correction), as in TensorFlow's
/// `LazyAdam` / PyTorch's `SparseAdam`.
#[derive(Debug, Clone)]
pub struct SparseAdam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    dim: usize,
    m: Vec<f32>,
    v: Vec<f32>,
    steps: Vec<u32>,
}

impl SparseAdam {
    /// PyTorch's defaults apart from `lr`: beta1 0.9, beta2 0.999, eps 1e-8.
    pub fn new(num_rows: usize, dim: usize, lr: f32) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            dim,
            m: vec![0.0; num_rows * dim],
            v: vec![0.0; num_rows * dim],
            steps: vec![0; num_rows],
        }
    }

    /// Zero all moments and step counts.
    pub fn reset(&mut self) {
        self.m.fill(0.0);
        self.v.fill(0.0);
        self.steps.fill(0);
    }

    /// Number of updates each row has received.
    pub fn steps(&self) -> &[u32] {
        &self.steps
    }

    /// Per-row step counts and the first and second moments (row-major, `dim` per row), for
    /// the lock-free trainer, which updates them in place through atomic views.
    pub(crate) fn state_mut(&mut self) -> (&mut [u32], &mut [f32], &mut [f32]) {
        (&mut self.steps, &mut self.m, &mut self.v)
    }

    /// Apply one Adam update to the rows of `table` present in `grads`.
    pub fn step(&mut self, table: &mut Matrix, grads: &RowGrads) {
        assert_eq!(table.cols, self.dim, "SparseAdam: table width");
        assert_eq!(table.rows, self.steps.len(), "SparseAdam: table height");
        let d = self.dim;
        let (b1, b2) = (self.beta1, self.beta2);
        for (row, g) in grads.iter() {
            let i = row as usize;
            self.steps[i] += 1;
            let t = self.steps[i].min(i32::MAX as u32) as i32;
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            let step = self.lr / bc1;
            let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
            let m = &mut self.m[i * d..(i + 1) * d];
            let v = &mut self.v[i * d..(i + 1) * d];
            let w = table.row_mut(i);
            for (((wk, mk), vk), &gk) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                *mk = b1 * *mk + (1.0 - b1) * gk;
                *vk = b2 * *vk + (1.0 - b2) * gk * gk;
                // PyTorch: p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
                *wk -= step * *mk / (vk.sqrt() * inv_sqrt_bc2 + self.eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_grads_accumulate_and_clear() {
        let mut g = RowGrads::new(5, 2);
        g.add_scaled(3, 1.0, &[1.0, 2.0]);
        g.add_scaled(1, 2.0, &[1.0, 1.0]);
        g.add_scaled(3, -1.0, &[0.5, 0.5]);
        assert_eq!(g.rows(), &[3, 1]);
        assert_eq!(g.get(3).unwrap(), &[0.5, 1.5]);
        assert_eq!(g.get(1).unwrap(), &[2.0, 2.0]);
        assert!(g.get(0).is_none());
        g.clear();
        assert!(g.is_empty());
        assert!(g.get(3).is_none());
        g.add_scaled(0, 1.0, &[1.0, 1.0]);
        assert_eq!(
            g.iter().collect::<Vec<_>>(),
            vec![(0u32, &[1.0f32, 1.0][..])]
        );
    }

    #[test]
    fn reset_clears_the_moments() {
        // After steps along +g, a step along -g moves by less than lr with kept moments, and
        // by exactly lr (a first step) after a reset.
        let mut g = RowGrads::new(2, 1);
        let mut back = RowGrads::new(2, 1);
        g.add_scaled(0, 1.0, &[1.0]);
        back.add_scaled(0, 1.0, &[-1.0]);
        let run = |reset: bool| {
            let mut table = Matrix::zeros(2, 1);
            let mut adam = SparseAdam::new(2, 1, 0.1);
            for _ in 0..5 {
                adam.step(&mut table, &g);
            }
            if reset {
                adam.reset();
                assert_eq!(adam.steps(), &[0, 0]);
            }
            let before = table.row(0)[0];
            adam.step(&mut table, &back);
            table.row(0)[0] - before
        };
        assert!((run(true) - 0.1).abs() < 1e-6);
        assert!(run(false) < 0.0, "kept momentum still points along +g");
    }

    #[test]
    fn first_adam_step_moves_by_lr_times_sign() {
        // With bias correction the first Adam step is lr * g / (|g| + eps) ~= lr * sign(g).
        let mut table = Matrix::zeros(3, 2);
        let mut adam = SparseAdam::new(3, 2, 0.1);
        let mut g = RowGrads::new(3, 2);
        g.add_scaled(1, 1.0, &[2.0, -0.5]);
        adam.step(&mut table, &g);
        assert!((table.row(1)[0] + 0.1).abs() < 1e-6);
        assert!((table.row(1)[1] - 0.1).abs() < 1e-6);
        assert_eq!(table.row(0), &[0.0, 0.0]);
        assert_eq!(table.row(2), &[0.0, 0.0]);
        assert_eq!(adam.steps(), &[0, 1, 0]);
    }
}
