//! SimSkip embedding refinement ("Can Contrastive Learning Refine Embeddings", arXiv 2404.08701).
//!
//! A skip-connection encoder `f(x) = x + g(x)` is trained with the SimCLR NT-Xent loss on two
//! augmented views of each input embedding (random masking and/or Gaussian noise), optionally
//! using a graph neighbour as the second view. After training, [`SimSkipTrainer::refine`] maps
//! an embedding table to its refined version in evaluation mode.
//!
//! * [`weights`] — the parameter table and [`Weights`], the one owner of every parameter and
//!   BatchNorm statistic, with export/import as named arrays (for FedAvg);
//! * [`model`] — the encoder/projector in candle, built from [`Weights`];
//! * [`augment`] — masking and Gaussian-noise augmentations;
//! * [`loss`] — NT-Xent;
//! * [`positives`] — augmentation or neighbour positives, with a CSR neighbour list;
//! * [`train`] — configuration and the trainer (AdamW, seeded, reproducible);
//! * [`fast`] — the hand-fused CPU training step behind [`Backend::Fast`];
//! * [`candle_trainer`] — the candle training step behind [`Backend::Candle`], the reference;
//! * [`select`] — epoch selection against a caller-provided validation score;
//! * [`bench`] — training throughput measurement.
//!
//! All randomness (initialisation, dropout, augmentation, shuffles, neighbour choice) comes from
//! one seeded `StdRng`, so a run is reproducible bit for bit from its seed.

pub mod augment;
pub mod bench;
pub mod candle_trainer;
pub mod error;
pub mod fast;
pub mod loss;
pub mod model;
pub mod positives;
pub mod select;
pub mod train;
pub mod weights;

pub use augment::{Augmentation, Augmenter};
pub use error::{RefineError, Result};
pub use loss::{nt_xent, NtXentLoss};
pub use model::SimSkipModel;
pub use positives::{Neighbours, Positives};
pub use select::{apply, beats, train_with_selection, Choice, Selection};
pub use train::{Backend, EpochStats, SimSkipConfig, SimSkipTrainer};
pub use weights::{Param, ParamSpec, Weights, PARAMS};
