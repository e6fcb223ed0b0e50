//! The SimSkip network (paper §3.2, Fig. 3).
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
//! With `zero_init_residual` the encoder's output linear starts at zero weight and bias, so a
//! skip model is exactly the identity before training. Other linears use PyTorch's default
//! initialisation (uniform in `±1/sqrt(fan_in)` for weight and bias), drawn from the caller's
//! seeded `StdRng`; BatchNorm starts at weight 1, bias 0, running mean 0, running variance 1.
//!
//! Weights travel as [`NamedArray`]s (see [`SimSkipModel::export`]), BatchNorm running
//! statistics included, so a federated coordinator can average them.

use candle_core::{Device, Tensor, Var};
use candle_nn::{BatchNorm, Linear, ModuleT, VarMap};
use rand::rngs::StdRng;
use rand::Rng;
use simskip_data::{Matrix, NamedArray};

use crate::augment::dropout_mask;
use crate::error::{RefineError, Result};

/// Rows per chunk in [`SimSkipModel::refine`].
pub const REFINE_CHUNK: usize = 4096;

/// BatchNorm epsilon and momentum (PyTorch defaults).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// Names of the arrays of a model, sorted (the order of [`SimSkipModel::export`]).
pub const PARAM_NAMES: [&str; 18] = [
    "encoder.layer1.bn.bias",
    "encoder.layer1.bn.running_mean",
    "encoder.layer1.bn.running_var",
    "encoder.layer1.bn.weight",
    "encoder.layer1.linear.bias",
    "encoder.layer1.linear.weight",
    "encoder.layer2.bn.bias",
    "encoder.layer2.bn.running_mean",
    "encoder.layer2.bn.running_var",
    "encoder.layer2.bn.weight",
    "encoder.layer2.linear.bias",
    "encoder.layer2.linear.weight",
    "encoder.out.bias",
    "encoder.out.weight",
    "projector.0.bias",
    "projector.0.weight",
    "projector.2.bias",
    "projector.2.weight",
];

/// True for arrays that are statistics, not trained by the optimiser.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The SimSkip encoder and projector, with its variables in a [`VarMap`].
pub struct SimSkipModel {
    dim: usize,
    hidden: usize,
    skip: bool,
    dropout: f32,
    device: Device,
    varmap: VarMap,
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

fn uniform(rng: &mut StdRng, len: usize, bound: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-bound..=bound)).collect()
}

impl SimSkipModel {
    /// A model for `dim`-dimensional embeddings (`dim >= 2`), initialised from `rng`.
    pub fn new(
        dim: usize,
        skip: bool,
        zero_init_residual: bool,
        dropout: f32,
        rng: &mut StdRng,
    ) -> Result<Self> {
        if dim < 2 {
            return Err(RefineError::Config(format!(
                "dimension must be >= 2, got {dim}"
            )));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(RefineError::Config(format!(
                "dropout must be in [0, 1), got {dropout}"
            )));
        }
        let device = Device::Cpu;
        let hidden = dim / 2;
        let varmap = VarMap::new();
        let put = |name: &str, shape: Vec<usize>, data: Vec<f32>| -> Result<Tensor> {
            let var = Var::from_vec(data, shape, &device)?;
            let t = var.as_tensor().clone();
            varmap.data().lock().unwrap().insert(name.to_string(), var);
            Ok(t)
        };
        // PyTorch default Linear init: weight and bias uniform in ±1/sqrt(fan_in).
        let mut linear =
            |name: &str, fan_in: usize, fan_out: usize, zero: bool| -> Result<Linear> {
                let bound = 1.0 / (fan_in as f32).sqrt();
                let (w, b) = if zero {
                    (vec![0.0; fan_in * fan_out], vec![0.0; fan_out])
                } else {
                    let w = uniform(rng, fan_in * fan_out, bound);
                    let b = uniform(rng, fan_out, bound);
                    (w, b)
                };
                let w = put(&format!("{name}.weight"), vec![fan_out, fan_in], w)?;
                let b = put(&format!("{name}.bias"), vec![fan_out], b)?;
                Ok(Linear::new(w, Some(b)))
            };
        let l1 = linear("encoder.layer1.linear", dim, hidden, false)?;
        let l2 = linear("encoder.layer2.linear", hidden, dim, false)?;
        let out = linear("encoder.out", dim, dim, zero_init_residual)?;
        let p0 = linear("projector.0", dim, dim, false)?;
        let p2 = linear("projector.2", dim, dim, false)?;
        let bn = |name: &str, n: usize| -> Result<BatchNorm> {
            let rm = put(&format!("{name}.running_mean"), vec![n], vec![0.0; n])?;
            let rv = put(&format!("{name}.running_var"), vec![n], vec![1.0; n])?;
            let w = put(&format!("{name}.weight"), vec![n], vec![1.0; n])?;
            let b = put(&format!("{name}.bias"), vec![n], vec![0.0; n])?;
            // `rm`/`rv` are variables, so BatchNorm shares their storage: its running-stat
            // updates are visible through the VarMap (and imports reach BatchNorm).
            Ok(BatchNorm::new_with_momentum(
                n,
                rm,
                rv,
                w,
                b,
                BN_EPS,
                BN_MOMENTUM,
            )?)
        };
        let bn1 = bn("encoder.layer1.bn", hidden)?;
        let bn2 = bn("encoder.layer2.bn", dim)?;
        Ok(Self {
            dim,
            hidden,
            skip,
            dropout,
            device,
            varmap,
            l1,
            bn1,
            l2,
            bn2,
            out,
            p0,
            p2,
        })
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

    /// The variables (trainable and BatchNorm statistics) by name.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The variables the optimiser trains (everything but BatchNorm running statistics), sorted
    /// by name.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let data = self.varmap.data().lock().unwrap();
        let mut named: Vec<(&String, &Var)> = data.iter().filter(|(n, _)| !is_buffer(n)).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
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

    /// Expected shape of each array, in [`PARAM_NAMES`] order.
    pub fn shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, h) = (self.dim, self.hidden);
        PARAM_NAMES
            .iter()
            .map(|&n| {
                let shape = match n {
                    "encoder.layer1.linear.weight" => vec![h, d],
                    "encoder.layer2.linear.weight" => vec![d, h],
                    "encoder.out.weight" | "projector.0.weight" | "projector.2.weight" => {
                        vec![d, d]
                    }
                    _ if n.starts_with("encoder.layer1.") => vec![h],
                    _ => vec![d],
                };
                (n, shape)
            })
            .collect()
    }

    /// All weights and BatchNorm running statistics as named arrays, sorted by name.
    pub fn export(&self) -> Result<Vec<NamedArray>> {
        let data = self.varmap.data().lock().unwrap();
        let mut out = Vec::with_capacity(PARAM_NAMES.len());
        for name in PARAM_NAMES {
            let var = data
                .get(name)
                .ok_or_else(|| RefineError::MissingArray(name.to_string()))?;
            let shape = var.dims().to_vec();
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            out.push(NamedArray::new(name, shape, values));
        }
        Ok(out)
    }

    /// Overwrite the weights (and BatchNorm statistics) from named arrays.
    ///
    /// Every name of [`PARAM_NAMES`] must be present with the model's shape; otherwise nothing
    /// is changed and a [`RefineError::MissingArray`] or [`RefineError::ShapeMismatch`] is
    /// returned. Arrays with other names are ignored (so a caller may bundle extra state).
    pub fn import(&mut self, arrays: &[NamedArray]) -> Result<()> {
        // Validate everything before touching any variable.
        let mut chosen = Vec::with_capacity(PARAM_NAMES.len());
        for (name, shape) in self.shapes() {
            let a = arrays
                .iter()
                .find(|a| a.name == name)
                .ok_or_else(|| RefineError::MissingArray(name.to_string()))?;
            if a.shape != shape || a.data.len() != shape.iter().product::<usize>() {
                return Err(RefineError::ShapeMismatch {
                    name: name.to_string(),
                    expected: shape,
                    found: a.shape.clone(),
                    len: a.data.len(),
                });
            }
            chosen.push((name, a));
        }
        let data = self.varmap.data().lock().unwrap();
        for (name, a) in chosen {
            let var = data
                .get(name)
                .ok_or_else(|| RefineError::MissingArray(name.to_string()))?;
            let t = Tensor::from_slice(&a.data, a.shape.as_slice(), &self.device)?;
            var.set(&t)?;
        }
        Ok(())
    }
}
