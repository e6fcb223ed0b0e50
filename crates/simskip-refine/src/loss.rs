//! NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (paper Eq. 1).
//!
//! For `2N` projections `z` laid out as `[view 1 of rows 0..N; view 2 of rows 0..N]`:
//! `s_ij = cos(z_i, z_j) / τ`, the diagonal `s_ii` is set to a large negative number (a sample is
//! never its own negative), and the loss is the cross-entropy of row `i` against its positive
//! `(i + N) mod 2N`, averaged over all `2N` rows.

use candle_core::{DType, Device, Tensor};

use crate::error::{RefineError, Result};

/// Added to the diagonal of the similarity matrix: `exp` of it is exactly 0 in f32.
const DIAGONAL_FILL: f32 = -1.0e9;

/// NT-Xent with the diagonal mask and the positive indices cached for the last batch size.
#[derive(Debug, Clone)]
pub struct NtXentLoss {
    temperature: f64,
    cache: Option<(usize, Tensor, Tensor)>,
}

impl NtXentLoss {
    pub fn new(temperature: f64) -> Self {
        Self {
            temperature,
            cache: None,
        }
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    fn helpers(&mut self, n2: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some((n, mask, targets)) = &self.cache {
            if *n == n2 {
                return Ok((mask.clone(), targets.clone()));
            }
        }
        let mut mask = vec![0f32; n2 * n2];
        for i in 0..n2 {
            mask[i * n2 + i] = DIAGONAL_FILL;
        }
        let mask = Tensor::from_vec(mask, (n2, n2), device)?;
        let half = n2 / 2;
        let targets: Vec<u32> = (0..n2).map(|i| ((i + half) % n2) as u32).collect();
        let targets = Tensor::from_vec(targets, n2, device)?;
        self.cache = Some((n2, mask.clone(), targets.clone()));
        Ok((mask, targets))
    }

    /// The mean NT-Xent loss (a scalar tensor) of `z` with shape `(2N, k)`.
    pub fn forward(&mut self, z: &Tensor) -> Result<Tensor> {
        let (n2, _) = z.dims2()?;
        if n2 < 2 || n2 % 2 != 0 {
            return Err(RefineError::Config(format!(
                "NT-Xent needs an even number (>= 2) of projections, got {n2}"
            )));
        }
        if !(self.temperature > 0.0) {
            return Err(RefineError::Config(format!(
                "temperature must be positive, got {}",
                self.temperature
            )));
        }
        let (mask, targets) = self.helpers(n2, z.device())?;
        let z = z.to_dtype(DType::F32)?;
        let norm = (z.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
        let zn = z.broadcast_div(&norm)?;
        let sim = (zn.matmul(&zn.t()?)? * (1.0 / self.temperature))?;
        let logits = (sim + mask)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
    }
}

/// One-off NT-Xent of `z` (`2N × k`) at temperature `temperature`.
pub fn nt_xent(z: &Tensor, temperature: f64) -> Result<Tensor> {
    NtXentLoss::new(temperature).forward(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 NT-Xent, written from the formula, independent of candle.
    fn by_hand(z: &[[f64; 2]], tau: f64) -> f64 {
        let n2 = z.len();
        let cos = |a: &[f64; 2], b: &[f64; 2]| {
            let dot = a[0] * b[0] + a[1] * b[1];
            dot / ((a[0] * a[0] + a[1] * a[1]).sqrt() * (b[0] * b[0] + b[1] * b[1]).sqrt())
        };
        let mut total = 0.0;
        for i in 0..n2 {
            let pos = (i + n2 / 2) % n2;
            let denom: f64 = (0..n2)
                .filter(|&k| k != i)
                .map(|k| (cos(&z[i], &z[k]) / tau).exp())
                .sum();
            total += -((cos(&z[i], &z[pos]) / tau).exp() / denom).ln();
        }
        total / n2 as f64
    }

    #[test]
    fn matches_hand_computation() {
        // N = 2, d = 2: rows 0,1 are view 1 of samples a,b; rows 2,3 view 2.
        let z = [[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0]];
        for &tau in &[0.5, 0.1, 1.0] {
            let t =
                Tensor::new(&[[1f32, 0.], [0., 2.], [3., 1.], [-1., 1.]], &Device::Cpu).unwrap();
            let got = nt_xent(&t, tau).unwrap().to_scalar::<f32>().unwrap() as f64;
            let want = by_hand(&z, tau);
            assert!(
                (got - want).abs() < 1e-4 * want.max(1.0),
                "tau {tau}: {got} vs {want}"
            );
        }
        // A literal check of one value, worked out on paper for τ = 1:
        // cos(z0,z1)=0, cos(z0,z2)=3/√10, cos(z0,z3)=-1/√2, cos(z1,z2)=1/√10, cos(z1,z3)=1/√2,
        // cos(z2,z3)=-2/√20.
        let (a, b, c, d, e, f) = (
            0.0f64,
            3.0 / 10f64.sqrt(),
            -1.0 / 2f64.sqrt(),
            1.0 / 10f64.sqrt(),
            1.0 / 2f64.sqrt(),
            -2.0 / 20f64.sqrt(),
        );
        let l0 = -(b - (a.exp() + b.exp() + c.exp()).ln());
        let l1 = -(e - (a.exp() + d.exp() + e.exp()).ln());
        let l2 = -(b - (b.exp() + d.exp() + f.exp()).ln());
        let l3 = -(e - (c.exp() + e.exp() + f.exp()).ln());
        let literal = (l0 + l1 + l2 + l3) / 4.0;
        assert!((literal - by_hand(&z, 1.0)).abs() < 1e-12);
    }

    #[test]
    fn perfect_alignment_has_low_loss() {
        // Positives identical and orthogonal to the other pair: loss is log(1 + 2e^{-1/τ}·...) small.
        let t = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 0.], [0., 1.]], &Device::Cpu).unwrap();
        let aligned = nt_xent(&t, 0.1).unwrap().to_scalar::<f32>().unwrap();
        let t2 = Tensor::new(&[[1f32, 0.], [0., 1.], [0., 1.], [1., 0.]], &Device::Cpu).unwrap();
        let swapped = nt_xent(&t2, 0.1).unwrap().to_scalar::<f32>().unwrap();
        assert!(aligned < 0.01 && swapped > 5.0, "{aligned} {swapped}");
    }

    #[test]
    fn rejects_odd_batch() {
        let t = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(nt_xent(&t, 0.5), Err(RefineError::Config(_))));
    }
}
