//! NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (paper Eq. 1).
//!
//! For `2N` projections `z` laid out as `[view 1 of rows 0..N; view 2 of rows 0..N]`:
//! `s_ij = cos(z_i, z_j) / τ`, the diagonal `s_ii` is set to a large negative number (a sample is
//! never its own negative), and the loss is the cross-entropy of row `i` against its positive
//! `(i + N) mod 2N`, averaged over all `2N` rows.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::{RefineError, Result};

/// NT-Xent at a fixed temperature.
///
/// Row normalisation is done with candle; the similarity matrix `ẑ ẑᵀ`, the masked
/// log-softmax cross-entropy and their backward pass are one fused CPU operation
/// ([`NtXentOnNormalised`]), which keeps the softmax from the forward pass for the backward pass
/// and needs one matmul there instead of two.
#[derive(Debug, Clone)]
pub struct NtXentLoss {
    temperature: f64,
}

impl NtXentLoss {
    pub fn new(temperature: f64) -> Self {
        Self { temperature }
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The mean NT-Xent loss (a scalar tensor) of `z` with shape `(2N, k)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (n2, _) = z.dims2()?;
        if n2 < 2 || n2 % 2 != 0 {
            return Err(RefineError::Config(format!(
                "NT-Xent needs an even number (>= 2) of projections, got {n2}"
            )));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(RefineError::Config(format!(
                "temperature must be positive, got {}",
                self.temperature
            )));
        }
        let z = z.to_dtype(DType::F32)?;
        let norm = (z.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
        let zn = z.broadcast_div(&norm)?.contiguous()?;
        Ok(zn.apply_op1(NtXentOnNormalised {
            inv_tau: (1.0 / self.temperature) as f32,
            saved: Arc::new(Mutex::new(None)),
        })?)
    }
}

/// One-off NT-Xent of `z` (`2N × k`) at temperature `temperature`.
pub fn nt_xent(z: &Tensor, temperature: f64) -> Result<Tensor> {
    NtXentLoss::new(temperature).forward(z)
}

/// Fused NT-Xent on row-normalised projections `ẑ` (`2N × k`): with `s = ẑ ẑᵀ`,
/// `L = mean_i [ logsumexp_{j≠i}(s_ij/τ) − s_{i,(i+N) mod 2N}/τ ]`.
/// Excluding the diagonal from the sum is the same as setting it to −∞ before the softmax.
///
/// Gradient: `∂L/∂s_ij = (p_ij − [j = pos(i)]) / (2N·τ)` (`p` the row softmax, 0 on the
/// diagonal), and `∂L/∂ẑ = (G + Gᵀ) ẑ` for that matrix `G`, which the forward pass saves.
#[derive(Debug, Clone)]
pub struct NtXentOnNormalised {
    pub inv_tau: f32,
    saved: Arc<Mutex<Option<Vec<f32>>>>,
}

impl NtXentOnNormalised {
    /// `(loss, G + Gᵀ)` from the similarity matrix `s` (`n2 × n2`, row-major; consumed).
    fn loss_and_grad(&self, mut s: Vec<f32>, n2: usize) -> (f32, Vec<f32>) {
        let scale = self.inv_tau / n2 as f32;
        let mut total = 0f64;
        for (i, row) in s.chunks_exact_mut(n2).enumerate() {
            total += nt_xent_row(row, i, self.inv_tau, scale) as f64;
        }
        symmetrise(&mut s, n2);
        ((total / n2 as f64) as f32, s)
    }
}

/// Row `i` of the fused NT-Xent: turns `row` (the similarities `s_i·` of anchor `i` among
/// `row.len() = 2N` projections) into row `i` of `G` (`(p_ij − [j = pos(i)])·scale`, `p` the
/// softmax of `s_i·/τ` without the diagonal) and returns the row's loss
/// `logsumexp_{j≠i}(s_ij/τ) − s_{i,pos(i)}/τ`.
pub(crate) fn nt_xent_row(row: &mut [f32], i: usize, inv_tau: f32, scale: f32) -> f32 {
    let n2 = row.len();
    let pos = (i + n2 / 2) % n2;
    // The diagonal is excluded: −∞ gives exp(·) = 0 and keeps the loops branch-free.
    row[i] = f32::NEG_INFINITY;
    // Max in 8 independent lanes (vectorises), then across them.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let m = lanes.iter().fold(rest, |a, &v| a.max(v)) * inv_tau;
    let positive = row[pos] * inv_tau;
    let mut sum = 0f32;
    for v in row.iter_mut() {
        let e = (*v * inv_tau - m).exp();
        *v = e;
        sum += e;
    }
    let loss = m + sum.ln() - positive;
    let k = scale / sum;
    for v in row.iter_mut() {
        *v *= k;
    }
    row[pos] -= scale;
    loss
}

/// `G ← G + Gᵀ` in place for a row-major `n2 × n2` matrix, in tiles.
pub(crate) fn symmetrise(s: &mut [f32], n2: usize) {
    const T: usize = 32;
    for bi in (0..n2).step_by(T) {
        for bj in (bi..n2).step_by(T) {
            for i in bi..(bi + T).min(n2) {
                let j0 = if bi == bj { i + 1 } else { bj };
                for j in j0..(bj + T).min(n2) {
                    let v = s[i * n2 + j] + s[j * n2 + i];
                    s[i * n2 + j] = v;
                    s[j * n2 + i] = v;
                }
            }
        }
    }
}

impl CustomOp1 for NtXentOnNormalised {
    fn name(&self) -> &'static str {
        "nt-xent-on-normalised"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (n2, k) = layout.shape().dims2()?;
        let zn = match layout.contiguous_offsets() {
            Some((o1, o2)) => &data[o1..o2],
            None => candle_core::bail!("nt-xent expects contiguous projections"),
        };
        let t = Tensor::from_slice(zn, (n2, k), &Device::Cpu)?;
        let s = t.matmul(&t.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let (loss, g) = self.loss_and_grad(s, n2);
        *self.saved.lock().unwrap() = Some(g);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n2, _) = arg.dims2()?;
        let g = match self.saved.lock().unwrap().take() {
            Some(g) => g,
            None => {
                let arg = arg.contiguous()?;
                let s = arg.matmul(&arg.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                self.loss_and_grad(s, n2).1
            }
        };
        let gs = Tensor::from_vec(g, (n2, n2), arg.device())?;
        let upstream = grad_res.to_dtype(DType::F32)?;
        let grad = gs.matmul(&arg.detach())?.broadcast_mul(&upstream)?;
        Ok(Some(grad))
    }
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

    /// The fused op's loss and gradient against the composed candle graph (diagonal mask,
    /// log-softmax, gather), for several tiles of the symmetrisation (2N = 70 > 32).
    #[test]
    fn gradient_matches_composed_graph() {
        use candle_core::Var;
        let n2 = 70;
        let vals: Vec<f32> = (0..n2 * 3)
            .map(|k| ((k * 37 % 11) as f32 - 5.0) / 3.0 + (k % 5) as f32 * 0.1)
            .collect();
        let tau = 0.5;
        let dev = Device::Cpu;
        let z1 = Var::from_vec(vals.clone(), (n2, 3), &dev).unwrap();
        let loss = nt_xent(z1.as_tensor(), tau).unwrap();
        let g1 = loss
            .backward()
            .unwrap()
            .get(z1.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap();
        let g1 = g1.to_vec1::<f32>().unwrap();

        let z2 = Var::from_vec(vals, (n2, 3), &dev).unwrap();
        let z = z2.as_tensor();
        let norm = (z.sqr().unwrap().sum_keepdim(1).unwrap() + 1e-12)
            .unwrap()
            .sqrt()
            .unwrap();
        let zn = z.broadcast_div(&norm).unwrap();
        let sim = (zn.matmul(&zn.t().unwrap()).unwrap() * (1.0 / tau)).unwrap();
        let mut mask = vec![0f32; n2 * n2];
        for i in 0..n2 {
            mask[i * n2 + i] = -1e9;
        }
        let logits = (sim + Tensor::from_vec(mask, (n2, n2), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..n2).map(|i| ((i + n2 / 2) % n2) as u32).collect();
        let targets = Tensor::from_vec(targets, n2, &dev).unwrap();
        let loss2 = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let g2 = loss2
            .backward()
            .unwrap()
            .get(z)
            .unwrap()
            .flatten_all()
            .unwrap();
        let g2 = g2.to_vec1::<f32>().unwrap();
        let (l1, l2) = (
            loss.to_scalar::<f32>().unwrap(),
            loss2.to_scalar::<f32>().unwrap(),
        );
        assert!((l1 - l2).abs() < 1e-5, "{l1} {l2}");
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(g1.iter().any(|g| g.abs() > 1e-4));
    }
}
