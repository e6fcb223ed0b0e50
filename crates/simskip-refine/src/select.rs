//! Epoch selection against a validation score, with the input itself as a candidate.
//!
//! The skip connection's promise is "no worse than the input"; this module makes it hold on the
//! caller's validation signal: the input table is scored first, each epoch's refined table
//! after, and the best candidate wins. If no epoch beats the input strictly, the input is kept.

use serde::Serialize;
use simskip_data::Matrix;

use crate::error::Result;
use crate::positives::Neighbours;
use crate::train::{EpochStats, SimSkipTrainer};
use crate::weights::Weights;

/// Which table is the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Choice {
    /// The input table, unchanged.
    Input,
    /// The model after this epoch (1-based: `Epoch(1)` is after the first training epoch).
    Epoch(usize),
}

/// Outcome of [`train_with_selection`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Selection {
    pub chosen: Choice,
    /// Score of the input table.
    pub input_score: f64,
    /// Score of the chosen candidate (equals `input_score` for [`Choice::Input`]).
    pub best_score: f64,
    /// `(epoch, mean training loss, score of the refined table)` for each epoch, 1-based.
    pub history: Vec<(usize, f32, f64)>,
}

/// The one rule by which a candidate table replaces the incumbent: it scores strictly higher.
/// A NaN score never wins, and any real score beats a NaN bar (an incumbent that could not be
/// scored). Every gate of the project decides with this function.
pub fn beats(candidate: f64, bar: f64) -> bool {
    candidate > bar || (bar.is_nan() && !candidate.is_nan())
}

/// Train `epochs` epochs, scoring the input and each epoch's refined table with `score`
/// (higher is better; a NaN score never wins) and calling `on_epoch(epoch, stats, score)`.
///
/// At the end the model holds the weights of the best epoch. If no epoch scores strictly above
/// the input, `chosen` is [`Choice::Input`] and the model is restored to its weights from before
/// this call (the state the input was scored against; the identity for a fresh skip model with
/// `zero_init_residual`), and the caller should output the input unchanged (see [`apply`]).
pub fn train_with_selection(
    trainer: &mut SimSkipTrainer,
    x: &Matrix,
    neighbours: Option<&Neighbours>,
    epochs: usize,
    score: &mut dyn FnMut(&Matrix) -> f64,
    on_epoch: &mut dyn FnMut(usize, &EpochStats, f64),
) -> Result<Selection> {
    let input_score = score(x);
    let initial: Weights = trainer.weights().clone();
    let mut best: Option<(usize, f64, Weights)> = None;
    let mut history = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let stats = trainer.train_epoch(x, neighbours)?;
        let refined = trainer.refine(x)?;
        let s = score(&refined);
        on_epoch(epoch, &stats, s);
        history.push((epoch, stats.loss, s));
        let bar = best.as_ref().map_or(input_score, |b| b.1);
        if beats(s, bar) {
            best = Some((epoch, s, trainer.weights().clone()));
        }
    }
    let (chosen, best_score, weights) = match best {
        Some((e, s, w)) => (Choice::Epoch(e), s, w),
        None => (Choice::Input, input_score, initial),
    };
    trainer.set_weights(weights)?;
    tracing::info!(?chosen, input_score, best_score, "simskip selection");
    Ok(Selection {
        chosen,
        input_score,
        best_score,
        history,
    })
}

/// The output table: `x` itself for [`Choice::Input`], else `trainer.refine(x)` (the trainer
/// must hold the selected weights, as [`train_with_selection`] leaves it).
pub fn apply(selection: &Selection, trainer: &SimSkipTrainer, x: &Matrix) -> Result<Matrix> {
    match selection.chosen {
        Choice::Input => Ok(x.clone()),
        Choice::Epoch(_) => trainer.refine(x),
    }
}
