//! The SimSkip network in candle (paper §3.2, Fig. 3).
//!
//! Encoder `g`:
//! * layer 1: `Linear(d, d/2) → BatchNorm1d → ReLU → Dropout(p)`
//! * layer 2: `Linear(d/2, d) → BatchNorm1d → ReLU → Dropout(p)`
//! * output: `Linear(d, d)`
//!
//! and the refined embedding is `f(x) = x + g(x)` (skip connection) or `f(x) = g(x)` without it
//! (the paper's "SimSkip⁻" ablation). The projector `p = Linear(d, d) → ReLU → Linear(d, d)` is
//! only used for the contrastive loss, on `z = p(f(x))`.
//!
//! A [`SimSkipModel`] is built from [`Weights`], which own the values (their layout, names and
//! initialisation live in [`crate::weights`]); the model's candle variables are a copy, made for
//! evaluation ([`SimSkipModel::refine`]) and for the candle training backend, which writes them
//! back with [`SimSkipModel::write_into`].

use candle_core::{Device, Tensor, Var};
use candle_nn::{BatchNorm, Linear, ModuleT};
use rand::rngs::StdRng;
use simskip_data::Matrix;

use crate::augment::dropout_mask;
use crate::error::{RefineError, Result};
use crate::weights::{Param, Weights, PARAMS};

/// Rows per chunk in [`SimSkipModel::refine`].
pub const REFINE_CHUNK: usize = 4096;

/// BatchNorm epsilon and momentum (PyTorch defaults).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// The SimSkip encoder and projector as candle modules over variables built from [`Weights`].
pub struct SimSkipModel {
    dim: usize,
    hidden: usize,
    skip: bool,
    dropout: f32,
    device: Device,
    /// One variable per row of [`PARAMS`], in table order.
    vars: Vec<Var>,
    l1: Linear,
    bn1: BatchNorm,
    l2: Linear,
    bn2: BatchNorm,
    out: Linear,
    p0: Linear,
    p2: Linear,
}

impl std::fmt::Debug for SimSkipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSkipModel")
            .field("dim", &self.dim)
            .field("hidden", &self.hidden)
            .field("skip", &self.skip)
            .field("dropout", &self.dropout)
            .finish_non_exhaustive()
    }
}

impl SimSkipModel {
    /// A model with variables holding a copy of `weights`. `dropout` must be in `[0, 1)`.
    pub fn new(weights: &Weights, skip: bool, dropout: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(RefineError::Config(format!(
                "dropout must be in [0, 1), got {dropout}"
            )));
        }
        let device = Device::Cpu;
        let (dim, hidden) = (weights.dim(), weights.hidden());
        let vars = PARAMS
            .iter()
            .map(|s| Var::from_slice(weights.get(s.param), s.shape.dims(dim), &device))
            .collect::<candle_core::Result<Vec<Var>>>()?;
        let t = |p: Param| vars[p as usize].as_tensor().clone();
        let linear = |w: Param, b: Param| Linear::new(t(w), Some(t(b)));
        // The running statistics are variables, so BatchNorm shares their storage: its updates
        // in training mode are visible through `vars` (and reach `write_into`).
        let bn = |n: usize, mean: Param, var: Param, w: Param, b: Param| {
            BatchNorm::new_with_momentum(n, t(mean), t(var), t(w), t(b), BN_EPS, BN_MOMENTUM)
        };
        use Param::*;
        Ok(Self {
            l1: linear(Linear1Weight, Linear1Bias),
            bn1: bn(hidden, Bn1RunningMean, Bn1RunningVar, Bn1Weight, Bn1Bias)?,
            l2: linear(Linear2Weight, Linear2Bias),
            bn2: bn(dim, Bn2RunningMean, Bn2RunningVar, Bn2Weight, Bn2Bias)?,
            out: linear(OutWeight, OutBias),
            p0: linear(Projector0Weight, Projector0Bias),
            p2: linear(Projector2Weight, Projector2Bias),
            dim,
            hidden,
            skip,
            dropout,
            device,
            vars,
        })
    }

    /// Overwrite the variables with `weights` (of this model's dimension).
    pub fn load(&self, weights: &Weights) -> Result<()> {
        self.check_dim(weights)?;
        for (var, s) in self.vars.iter().zip(&PARAMS) {
            let t = Tensor::from_slice(weights.get(s.param), var.dims(), &self.device)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Copy the variables (trained values and BatchNorm statistics) into `weights`.
    pub fn write_into(&self, weights: &mut Weights) -> Result<()> {
        self.check_dim(weights)?;
        for (var, s) in self.vars.iter().zip(&PARAMS) {
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            weights.get_mut(s.param).copy_from_slice(&values);
        }
        Ok(())
    }

    fn check_dim(&self, weights: &Weights) -> Result<()> {
        if weights.dim() != self.dim {
            return Err(RefineError::DimMismatch {
                expected: self.dim,
                found: weights.dim(),
            });
        }
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Width of the encoder's first layer, `dim / 2`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn skip(&self) -> bool {
        self.skip
    }

    pub fn dropout(&self) -> f32 {
        self.dropout
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variables the optimiser trains (everything but BatchNorm running statistics), in
    /// table order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vars
            .iter()
            .zip(&PARAMS)
            .filter(|(_, s)| s.kind.is_trainable())
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Number of trained scalars: linear weights and biases, BatchNorm weights and biases.
    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `x Wᵀ + 1 bᵀ`. The bias is added through a rank-one matmul rather than a broadcast:
    /// the same values, but its gradient `1ᵀ G` is then a gemm instead of candle's slow strided
    /// sum over the batch dimension.
    fn linear(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&l.weight().t()?)?;
        match l.bias() {
            None => Ok(y),
            Some(b) => {
                let n = x.dim(0)?;
                let ones = Tensor::ones((n, 1), x.dtype(), &self.device)?;
                Ok((y + ones.matmul(&b.unsqueeze(0)?)?)?)
            }
        }
    }

    fn apply_dropout(&self, h: Tensor, rng: Option<&mut StdRng>) -> Result<Tensor> {
        match rng {
            Some(rng) if self.dropout > 0.0 => {
                let (r, c) = h.dims2()?;
                let mask =
                    Tensor::from_vec(dropout_mask(r * c, self.dropout, rng), (r, c), &self.device)?;
                Ok((h * mask)?)
            }
            _ => Ok(h),
        }
    }

    /// The encoder output `f(x)` for a `(n, dim)` tensor.
    ///
    /// `train = Some(rng)`: training mode (BatchNorm on batch statistics, updating its running
    /// statistics; dropout masks drawn from `rng`). `train = None`: evaluation mode (running
    /// statistics, no dropout), deterministic.
    pub fn encode(&self, x: &Tensor, train: Option<&mut StdRng>) -> Result<Tensor> {
        let is_train = train.is_some();
        let mut rng = train;
        let h = self.linear(&self.l1, x)?;
        let h = self.bn1.forward_t(&h, is_train)?.relu()?;
        let h = self.apply_dropout(h, rng.as_deref_mut())?;
        let h = self.linear(&self.l2, &h)?;
        let h = self.bn2.forward_t(&h, is_train)?.relu()?;
        let h = self.apply_dropout(h, rng)?;
        let g = self.linear(&self.out, &h)?;
        if self.skip {
            Ok((x + g)?)
        } else {
            Ok(g)
        }
    }

    /// The projector `p(h) = W2 relu(W1 h + b1) + b2`.
    pub fn project(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.linear(&self.p0, h)?.relu()?;
        self.linear(&self.p2, &h)
    }

    /// Refined embeddings `f(x)` in evaluation mode, in chunks of [`REFINE_CHUNK`] rows.
    pub fn refine(&self, x: &Matrix) -> Result<Matrix> {
        if x.cols != self.dim {
            return Err(RefineError::DimMismatch {
                expected: self.dim,
                found: x.cols,
            });
        }
        let mut data = Vec::with_capacity(x.data.len());
        for start in (0..x.rows).step_by(REFINE_CHUNK) {
            let end = (start + REFINE_CHUNK).min(x.rows);
            let chunk = &x.data[start * x.cols..end * x.cols];
            let t = Tensor::from_slice(chunk, (end - start, x.cols), &self.device)?;
            let y = self.encode(&t, None)?;
            data.extend(y.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Matrix::from_vec(x.rows, x.cols, data))
    }
}
