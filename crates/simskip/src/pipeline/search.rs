//! SimSkip's settings chosen by measurement, per organisation: a few settings drawn from a
//! fixed grid are each trained on the organisation's own table (from the federated model, or
//! from the identity centrally), each candidate's best epoch is chosen on the primary
//! validation signal, and the gate judges it on every watched task. The output is the candidate
//! with the best primary validation score among those the gate accepts, or the input. Only
//! validation data is read; the search's cost (candidates, epochs, seconds) is reported.

use std::time::Instant;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simskip_data::{Matrix, NamedArray};
use simskip_refine::{
    apply, beats, train_with_selection, Choice, Neighbours, Positives, SimSkipConfig,
    SimSkipTrainer,
};

use super::evaluate::EvalContext;
use super::gate::{against, watched_scores, GateDecision};
use super::refine::validation_signal;
use crate::settings::GateSettings;

/// NT-Xent temperatures tried.
pub const TEMPERATURES: [f32; 4] = [0.1, 0.2, 0.5, 1.0];
/// Learning rates tried (the paper searches 1e-3 and 3e-4 among others).
pub const LEARNING_RATES: [f64; 4] = [1e-4, 3e-4, 1e-3, 3e-3];
/// Augmentation strength: the masking probability is scaled by it (at most 0.9), the noise's
/// standard deviation too.
pub const STRENGTHS: [f32; 3] = [0.5, 1.0, 2.0];
/// Shares of neighbour positives tried (0: every anchor pairs with itself, as in SimCLR).
pub const NEIGHBOUR_SHARES: [f32; 3] = [0.0, 0.5, 1.0];

/// How much searching an organisation does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchSettings {
    /// Settings drawn from the grid and tried (0: no search, the base settings only).
    pub candidates: usize,
    /// Training epochs of each candidate; its table is its best epoch on the primary
    /// validation signal (so the epoch count is searched too).
    pub epochs: usize,
    /// Seed of the draw from the grid.
    pub seed: u64,
}

impl Default for SearchSettings {
    fn default() -> Self {
        Self {
            candidates: 0,
            epochs: 10,
            seed: 0,
        }
    }
}

impl SearchSettings {
    /// The grid's size: at most this many distinct candidates.
    pub const GRID: usize =
        TEMPERATURES.len() * LEARNING_RATES.len() * STRENGTHS.len() * NEIGHBOUR_SHARES.len();

    /// One line naming the key and value.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.candidates <= Self::GRID,
            "gate.search.candidates = {}: the grid has {} settings",
            self.candidates,
            Self::GRID
        );
        anyhow::ensure!(
            self.candidates == 0 || (1..=1000).contains(&self.epochs),
            "gate.search.epochs = {}: must be in 1..=1000",
            self.epochs
        );
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.candidates > 0
    }
}

/// One point of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    pub temperature: f32,
    pub lr: f64,
    pub strength: f32,
    pub neighbour_share: f32,
}

impl Candidate {
    /// `base` with this candidate's settings (its augmentation kind, batch size and
    /// architecture stay).
    pub fn config(&self, base: &SimSkipConfig, epochs: usize) -> SimSkipConfig {
        SimSkipConfig {
            temperature: self.temperature,
            lr: self.lr,
            mask_prob: (base.mask_prob * self.strength).min(0.9),
            noise_var: base.noise_var * self.strength * self.strength,
            positives: Positives::Neighbour,
            neighbour_share: self.neighbour_share,
            epochs,
            ..base.clone()
        }
    }
}

/// `n` distinct grid points, drawn with `seed`.
pub fn draw(n: usize, seed: u64) -> Vec<Candidate> {
    let mut grid = Vec::with_capacity(SearchSettings::GRID);
    for &temperature in &TEMPERATURES {
        for &lr in &LEARNING_RATES {
            for &strength in &STRENGTHS {
                for &neighbour_share in &NEIGHBOUR_SHARES {
                    grid.push(Candidate {
                        temperature,
                        lr,
                        strength,
                        neighbour_share,
                    });
                }
            }
        }
    }
    grid.shuffle(&mut StdRng::seed_from_u64(seed));
    grid.truncate(n);
    grid
}

/// What one candidate did.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// "incumbent" (the table the caller brings, e.g. the federated model's output) or the
    /// candidate's settings.
    pub candidate: Option<Candidate>,
    /// The epoch its table comes from (none: no epoch beat the input on the primary signal).
    pub epoch: Option<usize>,
    /// The gate's decision on its table (none when it had no table).
    pub gate: Option<GateDecision>,
    pub seconds: f64,
}

/// The search's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SearchOutcome {
    /// Index into `tried` of the kept table, none for the input.
    pub chosen: Option<usize>,
    pub tried: Vec<Tried>,
    /// Epochs trained over all candidates, and the whole search's wall time (training,
    /// validation scoring and the gates).
    pub epochs_trained: usize,
    pub seconds: f64,
    #[serde(skip)]
    pub output: Matrix,
    /// The model weights of the kept table when a grid candidate is kept (none for the input
    /// or the incumbent, whose weights the caller holds).
    #[serde(skip)]
    pub weights: Option<Vec<NamedArray>>,
}

impl SearchOutcome {
    /// One line for logs and reports.
    pub fn summary(&self) -> String {
        let kept = match self.chosen {
            None => "the input".to_owned(),
            Some(i) => match (&self.tried[i].candidate, self.tried[i].epoch) {
                (None, _) => "the incumbent".to_owned(),
                (Some(c), e) => format!(
                    "temperature {} lr {} strength {} neighbour share {} (epoch {})",
                    c.temperature,
                    c.lr,
                    c.strength,
                    c.neighbour_share,
                    e.unwrap_or(0)
                ),
            },
        };
        format!(
            "settings search: {} candidates, {} epochs, {:.1} s; kept {kept}",
            self.tried.len(),
            self.epochs_trained,
            self.seconds
        )
    }
}

/// Searches SimSkip's settings for `input` (rows aligned with `ctx.ds.entities`) as
/// `gate_settings.search` says.
///
/// * `base`: the settings the candidates vary (architecture, augmentation kind, batch size).
/// * `start`: weights every candidate starts from (the federated model), or none for a fresh
///   model (the identity with `zero_init_residual`).
/// * `incumbent`: a table already in hand with the gate's decision on it (by the same
///   `gate_settings`), kept if it wins; the input's scores are taken from that decision.
pub fn search(
    ctx: &EvalContext<'_>,
    input: &Matrix,
    base: &SimSkipConfig,
    start: Option<&[NamedArray]>,
    neighbours: Option<&Neighbours>,
    incumbent: Option<(&Matrix, &GateDecision)>,
    gate_settings: &GateSettings,
) -> Result<SearchOutcome> {
    let settings = &gate_settings.search;
    settings.validate()?;
    let began = Instant::now();
    let owned;
    let neighbours = match neighbours {
        Some(n) => n,
        None => {
            owned = super::refine::training_neighbours(ctx.ds)?;
            &owned
        }
    };
    let input_scores = match incumbent {
        Some((_, decision)) => decision
            .scores
            .iter()
            .map(|s| (s.task.clone(), s.input))
            .collect(),
        None => watched_scores(ctx, gate_settings, input)?,
    };
    let (_, primary) = validation_signal(ctx, gate_settings.signal)?;
    let mut tried = Vec::new();
    // The table and weights of each entry of `tried` that has a table of its own (the
    // incumbent's stays with the caller).
    let mut tables = Vec::new();
    if let Some((_, decision)) = incumbent {
        tried.push(Tried {
            candidate: None,
            epoch: None,
            gate: Some(decision.clone()),
            seconds: 0.0,
        });
        tables.push(None);
    }
    let mut epochs_trained = 0;
    for candidate in draw(settings.candidates, settings.seed) {
        let t = Instant::now();
        let cfg = candidate.config(base, settings.epochs);
        let mut trainer = SimSkipTrainer::new(input.cols, cfg)?;
        if let Some(weights) = start {
            trainer
                .import(weights)
                .context("the search's starting model")?;
        }
        let mut score = |m: &Matrix| primary(m);
        let selection = train_with_selection(
            &mut trainer,
            input,
            Some(neighbours),
            settings.epochs,
            &mut score,
            &mut |_, _, _| {},
        )?;
        epochs_trained += settings.epochs;
        let (epoch, decision, table) = match selection.chosen {
            Choice::Input => (None, None, None),
            Choice::Epoch(e) => {
                let table = apply(&selection, &trainer, input)?;
                let decision = against(&input_scores, ctx, gate_settings, &table)?;
                (
                    Some(e),
                    Some(decision),
                    Some((table, Some(trainer.export()))),
                )
            }
        };
        tried.push(Tried {
            candidate: Some(candidate),
            epoch,
            gate: decision,
            seconds: t.elapsed().as_secs_f64(),
        });
        tables.push(table);
    }
    // The best primary validation score among the tables the gate accepts.
    let mut chosen: Option<(usize, f64)> = None;
    for (i, t) in tried.iter().enumerate() {
        let Some(d) = t.gate.as_ref().filter(|d| d.keep_refined) else {
            continue;
        };
        let s = d.scores[0].refined;
        if chosen.is_none_or(|(_, best)| beats(s, best)) {
            chosen = Some((i, s));
        }
    }
    let (output, weights) = match (chosen, incumbent) {
        (Some((0, _)), Some((table, _))) => (table.clone(), None),
        (Some((i, _)), _) => tables[i].take().expect("an accepted candidate has a table"),
        (None, _) => (input.clone(), None),
    };
    Ok(SearchOutcome {
        chosen: chosen.map(|(i, _)| i),
        tried,
        epochs_trained,
        seconds: began.elapsed().as_secs_f64(),
        output,
        weights,
    })
}
