//! The candle training backend ([`Backend::Candle`](crate::train::Backend::Candle)): autograd
//! and `candle_nn::AdamW` on a [`SimSkipModel`]. It is the reference the fused step of
//! [`crate::fast`] is held to.
//!
//! The [`Weights`] are the owner between calls. `candle_nn::AdamW` keeps its moments per
//! candle variable and does not expose them, so the variables (and the optimiser holding them)
//! must live as long as the trainer for its moments to carry over from epoch to epoch, as the
//! fused trainer's do. They are a working copy: [`CandleTrainer::begin`] loads them from the
//! weights and [`CandleTrainer::finish`] writes them back, once per epoch rather than per step
//! (copying the weights through candle tensors at every step would cost more than the small
//! steps themselves).

use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;

use crate::error::{RefineError, Result};
use crate::loss::NtXentLoss;
use crate::model::SimSkipModel;
use crate::weights::Weights;

/// Owns the weights; trains a candle copy of them between [`Self::begin`] and [`Self::finish`].
pub struct CandleTrainer {
    weights: Weights,
    model: SimSkipModel,
    opt: AdamW,
    loss: NtXentLoss,
}

impl std::fmt::Debug for CandleTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleTrainer")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl CandleTrainer {
    /// A trainer of `weights` with fresh AdamW moments.
    pub fn new(
        weights: Weights,
        skip: bool,
        dropout: f32,
        temperature: f32,
        adam: ParamsAdamW,
    ) -> Result<Self> {
        let model = SimSkipModel::new(&weights, skip, dropout)?;
        let opt = AdamW::new(model.trainable_vars(), adam)?;
        Ok(Self {
            weights,
            model,
            opt,
            loss: NtXentLoss::new(temperature as f64),
        })
    }

    /// The weights as of the last [`Self::finish`] (or [`Self::set_weights`]).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Replace the weights (of the same dimension); the AdamW moments are kept.
    pub fn set_weights(&mut self, weights: Weights) -> Result<()> {
        if weights.dim() != self.weights.dim() {
            return Err(RefineError::DimMismatch {
                expected: self.weights.dim(),
                found: weights.dim(),
            });
        }
        self.weights = weights;
        Ok(())
    }

    /// Load the candle variables from the weights, before a run of [`Self::step`]s.
    pub fn begin(&mut self) -> Result<()> {
        self.model.load(&self.weights)
    }

    /// One AdamW step on the `(2N, dim)` views, dropout masks drawn from `rng`; returns the loss.
    /// Changes the candle variables only; [`Self::finish`] makes it reach the weights.
    pub fn step(&mut self, views: &[f32], rng: &mut StdRng) -> Result<f32> {
        let dim = self.weights.dim();
        let t = Tensor::from_slice(views, (views.len() / dim, dim), self.model.device())?;
        let h = self.model.encode(&t, Some(rng))?;
        let z = self.model.project(&h)?;
        let loss = self.loss.forward(&z)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    /// Write the candle variables back into the weights, after a run of [`Self::step`]s.
    pub fn finish(&mut self) -> Result<()> {
        self.model.write_into(&mut self.weights)
    }
}
