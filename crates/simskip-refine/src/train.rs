//! Configuration and training loop.

use candle_nn::ParamsAdamW;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simskip_data::{Matrix, NamedArray};

use crate::augment::{Augmentation, Augmenter};
use crate::candle_trainer::CandleTrainer;
use crate::error::{RefineError, Result};
use crate::fast::{AdamWParams, FastTrainer, Proximal};
use crate::model::SimSkipModel;
use crate::positives::{partner_ids, Neighbours, Positives};
use crate::weights::{Param, Weights};

/// Which implementation runs a training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The candle graph with autograd and `candle_nn::AdamW` (the reference).
    Candle,
    /// The hand-fused CPU step of [`crate::fast`]: same forward pass, loss, gradients and AdamW
    /// update on plain `f32` buffers.
    #[default]
    Fast,
}

/// SimSkip hyper-parameters.
///
/// Paper values: masking 20% (`mask_prob = 0.2`), noise variance 0.13, learning rate searched
/// over {1e-3, 3e-4, 3e-6, 1e-5}. The paper reports "mask" and "gaussian" as separate variants
/// (and mask+noise once for text) without naming a default, so `augmentation` defaults to
/// [`Augmentation::Mask`]. Dropout, temperature, batch size and epochs are not given in the
/// paper; the defaults are SimCLR-style choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimSkipConfig {
    /// `f(x) = x + g(x)` (true) or `g(x)` (false, "SimSkip⁻").
    pub skip: bool,
    /// Start the encoder's output linear at zero, so the skip model starts as the identity.
    pub zero_init_residual: bool,
    /// Dropout probability after each encoder layer.
    pub dropout: f32,
    pub augmentation: Augmentation,
    /// Probability α that a coordinate is masked.
    pub mask_prob: f32,
    /// Variance of the Gaussian noise (standard deviation `sqrt(noise_var)`).
    pub noise_var: f32,
    pub positives: Positives,
    /// With neighbour positives: the share of anchors whose second view is a neighbour (the
    /// others pair with a second augmentation of themselves).
    pub neighbour_share: f32,
    /// NT-Xent temperature τ.
    pub temperature: f32,
    pub lr: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Implementation of the training step.
    pub backend: Backend,
    /// Threads of the fast backend (gemm and row-parallel loops on rayon's global pool);
    /// 0 = rayon's thread count, 1 = the calling thread only.
    pub fast_threads: usize,
}

impl Default for SimSkipConfig {
    fn default() -> Self {
        Self {
            skip: true,
            zero_init_residual: true,
            dropout: 0.1,
            augmentation: Augmentation::Mask,
            mask_prob: 0.2,
            noise_var: 0.13,
            positives: Positives::Augment,
            neighbour_share: 1.0,
            temperature: 0.5,
            lr: 1e-3,
            weight_decay: 0.0,
            epochs: 50,
            batch_size: 256,
            seed: 42,
            backend: Backend::default(),
            fast_threads: 0,
        }
    }
}

impl SimSkipConfig {
    /// Check value ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RefineError::Config(m));
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if !(0.0..=1.0).contains(&self.mask_prob) {
            return bad(format!(
                "mask_prob must be in [0, 1], got {}",
                self.mask_prob
            ));
        }
        if !(0.0..=1.0).contains(&self.neighbour_share) {
            return bad(format!(
                "neighbour_share must be in [0, 1], got {}",
                self.neighbour_share
            ));
        }
        if !(self.noise_var >= 0.0 && self.noise_var.is_finite()) {
            return bad(format!("noise_var must be >= 0, got {}", self.noise_var));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be > 0, got {}", self.lr));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.batch_size < 2 {
            return bad(format!("batch_size must be >= 2, got {}", self.batch_size));
        }
        Ok(())
    }

    pub fn augmenter(&self) -> Augmenter {
        Augmenter::new(self.augmentation, self.mask_prob, self.noise_var)
    }
}

/// Result of one training epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Mean NT-Xent loss over the epoch's anchors.
    pub loss: f32,
    /// Anchors (input rows) trained on; each gives two views.
    pub samples: usize,
}

/// The implementation that owns the weights and steps them (boxed: both are large).
enum Engine {
    Fast(Box<FastTrainer>),
    Candle(Box<CandleTrainer>),
}

impl Engine {
    fn weights(&self) -> &Weights {
        match self {
            Engine::Fast(f) => f.weights(),
            Engine::Candle(c) => c.weights(),
        }
    }

    fn set_weights(&mut self, w: Weights) -> Result<()> {
        match self {
            Engine::Fast(f) => f.set_weights(w),
            Engine::Candle(c) => c.set_weights(w),
        }
    }

    /// Before a run of steps (the candle backend loads its variables).
    fn begin(&mut self) -> Result<()> {
        match self {
            Engine::Fast(_) => Ok(()),
            Engine::Candle(c) => c.begin(),
        }
    }

    fn step(&mut self, views: &[f32], rng: &mut StdRng) -> Result<f32> {
        match self {
            Engine::Fast(f) => Ok(f.step(views, rng)),
            Engine::Candle(c) => c.step(views, rng),
        }
    }

    /// After a run of steps (the candle backend writes its variables back to the weights).
    fn finish(&mut self) -> Result<()> {
        match self {
            Engine::Fast(_) => Ok(()),
            Engine::Candle(c) => c.finish(),
        }
    }
}

/// Trains one SimSkip network: the backend that owns its [`Weights`] (and the AdamW state beside
/// them), and the random generator every random draw comes from.
pub struct SimSkipTrainer {
    cfg: SimSkipConfig,
    engine: Engine,
    /// Reused views buffer.
    views: Vec<f32>,
    rng: StdRng,
    augmenter: Augmenter,
    epochs_done: usize,
}

impl std::fmt::Debug for SimSkipTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSkipTrainer")
            .field("cfg", &self.cfg)
            .field("dim", &self.dim())
            .field("epochs_done", &self.epochs_done)
            .finish_non_exhaustive()
    }
}

impl SimSkipTrainer {
    /// A fresh model for `dim`-dimensional embeddings, initialised from `cfg.seed`
    /// ([`Weights::init`]).
    pub fn new(dim: usize, cfg: SimSkipConfig) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let weights = Weights::init(dim, &cfg, &mut rng)?;
        let params = ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        };
        let engine = match cfg.backend {
            Backend::Candle => Engine::Candle(Box::new(CandleTrainer::new(
                weights,
                cfg.skip,
                cfg.dropout,
                cfg.temperature,
                params,
            )?)),
            Backend::Fast => {
                let threads = match cfg.fast_threads {
                    0 => rayon::current_num_threads(),
                    t => t,
                };
                let adam = AdamWParams {
                    lr: params.lr,
                    beta1: params.beta1,
                    beta2: params.beta2,
                    eps: params.eps,
                    weight_decay: params.weight_decay,
                };
                Engine::Fast(Box::new(FastTrainer::new(
                    weights,
                    cfg.skip,
                    cfg.dropout,
                    cfg.temperature,
                    adam,
                    threads,
                )))
            }
        };
        Ok(Self {
            engine,
            views: Vec::new(),
            augmenter: cfg.augmenter(),
            cfg,
            rng,
            epochs_done: 0,
        })
    }

    pub fn config(&self) -> &SimSkipConfig {
        &self.cfg
    }

    /// Dimension of the embeddings this trainer refines.
    pub fn dim(&self) -> usize {
        self.weights().dim()
    }

    /// The current weights and BatchNorm statistics.
    pub fn weights(&self) -> &Weights {
        self.engine.weights()
    }

    /// Replace the weights (of this trainer's dimension); the AdamW state is kept.
    pub fn set_weights(&mut self, weights: Weights) -> Result<()> {
        self.engine.set_weights(weights)
    }

    /// The weights as named arrays, sorted by name ([`Weights::to_arrays`]).
    pub fn export(&self) -> Vec<NamedArray> {
        self.weights().to_arrays()
    }

    /// Replace the weights with `arrays`, validated by [`Weights::from_arrays`] for this
    /// trainer's dimension; on error nothing changes. The AdamW state is kept.
    pub fn import(&mut self, arrays: &[NamedArray]) -> Result<()> {
        let w = Weights::from_arrays(self.dim(), arrays)?;
        self.set_weights(w)
    }

    /// Replace the weights with `arrays` (validated as [`Self::import`] does) except the
    /// arrays for which `local` is true, which keep this trainer's current values: FedBN keeps
    /// BatchNorm local (`|p| p.spec().kind.is_batch_norm()`). On error nothing changes.
    pub fn import_keeping(
        &mut self,
        arrays: &[NamedArray],
        local: impl Fn(Param) -> bool,
    ) -> Result<()> {
        let mut w = Weights::from_arrays(self.dim(), arrays)?;
        for spec in crate::weights::PARAMS.iter().filter(|s| local(s.param)) {
            w.get_mut(spec.param)
                .copy_from_slice(self.weights().get(spec.param));
        }
        self.set_weights(w)
    }

    /// FedProx: with `Some(mu)`, every later step minimises the contrastive loss plus
    /// `mu/2 ||w - w_anchor||²`, anchored at the current weights (call it right after
    /// installing the global model); `None` removes the term. The term is computed by the fast
    /// backend; the candle backend refuses it rather than silently train without it.
    pub fn anchor_proximal(&mut self, mu: Option<f32>) -> Result<()> {
        match &mut self.engine {
            Engine::Fast(f) => {
                let proximal = mu.map(|mu| Proximal {
                    mu,
                    anchor: f.weights().trainable().to_vec(),
                });
                f.set_proximal(proximal)
            }
            Engine::Candle(_) if mu.is_none() => Ok(()),
            Engine::Candle(_) => Err(RefineError::Config(
                "FedProx's proximal term is computed by the fast SimSkip backend only: set the \
                 organisation's compute.simskip_backend = \"fast\""
                    .into(),
            )),
        }
    }

    /// A candle model of the current weights (a copy: changing it leaves the trainer's alone).
    pub fn model(&self) -> Result<SimSkipModel> {
        SimSkipModel::new(self.weights(), self.cfg.skip, self.cfg.dropout)
    }

    /// Refined embeddings `f(x)` of the current weights, in evaluation mode
    /// ([`SimSkipModel::refine`]).
    pub fn refine(&self, x: &Matrix) -> Result<Matrix> {
        self.model()?.refine(x)
    }

    /// Epochs trained so far by this trainer.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// The two augmented views of `batch` as one row-major `(2·b, dim)` buffer: rows `0..b` are
    /// view 1 of the anchors, rows `b..2b` view 2 (of the anchors or of their neighbours).
    pub fn make_views(
        &mut self,
        x: &Matrix,
        batch: &[u32],
        neighbours: Option<&Neighbours>,
    ) -> Result<Vec<f32>> {
        let mut buf = Vec::with_capacity(2 * batch.len() * x.cols);
        self.fill_views(x, batch, neighbours, &mut buf)?;
        Ok(buf)
    }

    /// [`Self::make_views`] into a reused buffer (cleared first).
    fn fill_views(
        &mut self,
        x: &Matrix,
        batch: &[u32],
        neighbours: Option<&Neighbours>,
        buf: &mut Vec<f32>,
    ) -> Result<()> {
        let partners = partner_ids(
            self.cfg.positives,
            self.cfg.neighbour_share,
            batch,
            neighbours,
            &mut self.rng,
        )?;
        buf.clear();
        for &i in batch.iter().chain(partners.iter()) {
            buf.extend_from_slice(x.row(i as usize));
        }
        self.augmenter.apply(buf, &mut self.rng);
        Ok(())
    }

    /// One optimisation step on `batch` (at least 2 anchors); returns the batch loss.
    pub fn train_step(
        &mut self,
        x: &Matrix,
        batch: &[u32],
        neighbours: Option<&Neighbours>,
    ) -> Result<f32> {
        self.check_width(x)?;
        self.engine.begin()?;
        let loss = self.step(x, batch, neighbours)?;
        self.engine.finish()?;
        Ok(loss)
    }

    fn check_width(&self, x: &Matrix) -> Result<()> {
        if x.cols != self.dim() {
            return Err(RefineError::DimMismatch {
                expected: self.dim(),
                found: x.cols,
            });
        }
        Ok(())
    }

    /// [`Self::train_step`] between the engine's `begin` and `finish`.
    fn step(&mut self, x: &Matrix, batch: &[u32], neighbours: Option<&Neighbours>) -> Result<f32> {
        if batch.len() < 2 {
            return Err(RefineError::Config(format!(
                "a training batch needs at least 2 rows, got {}",
                batch.len()
            )));
        }
        let mut views = std::mem::take(&mut self.views);
        let out = self
            .fill_views(x, batch, neighbours, &mut views)
            .and_then(|()| self.engine.step(&views, &mut self.rng));
        self.views = views;
        out
    }

    /// One pass over the rows of `x` in shuffled batches of `batch_size` (a last batch of fewer
    /// than 2 rows is dropped: BatchNorm needs two). `neighbours` is required for
    /// [`Positives::Neighbour`] and must cover `x.rows` entities.
    pub fn train_epoch(
        &mut self,
        x: &Matrix,
        neighbours: Option<&Neighbours>,
    ) -> Result<EpochStats> {
        self.check_width(x)?;
        if let Some(nb) = neighbours {
            if nb.len() != x.rows {
                return Err(RefineError::NeighbourCount {
                    expected: x.rows,
                    found: nb.len(),
                });
            }
        }
        if self.cfg.positives == Positives::Neighbour && neighbours.is_none() {
            return Err(RefineError::Config(
                "neighbour positives need neighbour lists".to_string(),
            ));
        }
        let mut ids: Vec<u32> = (0..x.rows as u32).collect();
        ids.shuffle(&mut self.rng);
        let mut total = 0f64;
        let mut samples = 0usize;
        self.engine.begin()?;
        for batch in ids.chunks(self.cfg.batch_size) {
            if batch.len() < 2 {
                continue;
            }
            let l = self.step(x, batch, neighbours)?;
            total += l as f64 * batch.len() as f64;
            samples += batch.len();
        }
        self.engine.finish()?;
        self.epochs_done += 1;
        let loss = if samples > 0 {
            (total / samples as f64) as f32
        } else {
            f32::NAN
        };
        tracing::debug!(epoch = self.epochs_done, loss, samples, "simskip epoch");
        Ok(EpochStats { loss, samples })
    }

    /// Train `cfg.epochs` epochs; the stats of each.
    pub fn fit(&mut self, x: &Matrix, neighbours: Option<&Neighbours>) -> Result<Vec<EpochStats>> {
        (0..self.cfg.epochs)
            .map(|_| self.train_epoch(x, neighbours))
            .collect()
    }
}
