//! Training throughput measurement.

use std::time::Instant;

use simskip_data::Matrix;

use crate::error::Result;
use crate::train::{SimSkipConfig, SimSkipTrainer};

/// Anchors (input rows; each gives two views) trained per second of wall time over `epochs`
/// epochs of `x` with `cfg` (augmentation positives), on the backend `cfg.backend` selects.
/// Model construction is not timed.
pub fn training_samples_per_second(x: &Matrix, cfg: &SimSkipConfig, epochs: usize) -> Result<f64> {
    let mut trainer = SimSkipTrainer::new(x.cols, cfg.clone())?;
    let start = Instant::now();
    let mut samples = 0usize;
    for _ in 0..epochs {
        samples += trainer.train_epoch(x, None)?.samples;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(samples as f64 / secs.max(1e-9))
}
