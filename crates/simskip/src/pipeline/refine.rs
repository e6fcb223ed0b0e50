//! Stage two on one machine: SimSkip on an entity table, with the output chosen on held-out
//! data so it is never worse than the input by the validation signal.

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use simskip_data::{KgDataset, Matrix, NamedArray};
use simskip_eval::{knn_precision_at_k, neighbour_retrieval_mrr, pairs_of, probe};
use simskip_refine::{
    apply, train_with_selection, Neighbours, Positives, Selection, SimSkipConfig, SimSkipTrainer,
};

use super::evaluate::EvalContext;
use crate::settings::{GateSettings, SignalKind};

/// At most this many validation pairs feed the label-free signal: it is evaluated every epoch
/// and costs a pass over the whole table per pair.
const MAX_SIGNAL_PAIRS: usize = 1000;

/// At most this many validation entities are the queries of the validation-KNN signal (a
/// seeded sample, the same every epoch), each scored against the whole table: the signal runs
/// once per epoch, and 2,000 queries rank epochs as the full validation set does at a fraction
/// of the cost on a large table (its standard error is about 0.01).
const MAX_SIGNAL_QUERIES: usize = 2000;

#[derive(Debug)]
pub struct RefineOutcome {
    pub output: Matrix,
    pub weights: Vec<NamedArray>,
    pub report: RefineReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefineReport {
    pub config: SimSkipConfig,
    pub gate: bool,
    /// The validation signal that chose the output (none when the gate is off).
    pub signal: Option<String>,
    /// "input" or "epoch N" (or "last epoch" without the gate).
    pub chosen: String,
    pub selection: Option<Selection>,
    pub train_seconds: f64,
}

/// The undirected training graph, for neighbour positives.
pub fn training_neighbours(ds: &KgDataset) -> Result<Neighbours> {
    let edges: Vec<(u32, u32)> = ds.train.iter().map(|t| (t.h, t.t)).collect();
    Neighbours::from_edges(ds.num_entities(), &edges).context("building the training graph")
}

/// A score of a table on held-out data; higher is better.
pub type Signal<'a> = Box<dyn Fn(&Matrix) -> f64 + 'a>;

/// The validation signal of `kind`, with its name for the report.
pub fn validation_signal<'a>(
    ctx: &'a EvalContext<'_>,
    kind: SignalKind,
) -> Result<(String, Signal<'a>)> {
    let kind = match kind {
        SignalKind::Auto if ctx.split.is_some() => SignalKind::Knn,
        SignalKind::Auto => SignalKind::Graph,
        k => k,
    };
    match kind {
        SignalKind::Knn | SignalKind::Probe => {
            let (Some(masked), Some(split)) = (ctx.labels_without_test(), ctx.split.as_ref())
            else {
                anyhow::bail!(
                    "gate signal '{kind:?}' needs entity labels, and the dataset has none"
                );
            };
            let k = ctx.settings.knn_k;
            if kind == SignalKind::Knn {
                let mut sample = split.valid.clone();
                if sample.len() > MAX_SIGNAL_QUERIES {
                    sample.shuffle(&mut StdRng::seed_from_u64(ctx.settings.split_seed));
                    sample.truncate(MAX_SIGNAL_QUERIES);
                    sample.sort_unstable();
                }
                Ok((
                    format!(
                        "validation KNN@{k} ({} of {} validation entities)",
                        sample.len(),
                        split.valid.len()
                    ),
                    Box::new(move |x: &Matrix| knn_precision_at_k(x, &masked, &sample, k)),
                ))
            } else {
                let labels = ctx.ds.labels.as_ref().expect("split implies labels");
                let classes = labels.classes.len();
                let cfg = ctx.settings.probe.clone();
                Ok((
                    "validation probe accuracy".into(),
                    Box::new(move |x: &Matrix| {
                        probe(x, &masked, classes, split, &cfg)
                            .map_or(f64::NAN, |r| r.valid_accuracy)
                    }),
                ))
            }
        }
        SignalKind::Graph | SignalKind::Auto => {
            let mut pairs = pairs_of(&ctx.ds.valid);
            if pairs.len() > MAX_SIGNAL_PAIRS {
                pairs.shuffle(&mut StdRng::seed_from_u64(ctx.settings.split_seed));
                pairs.truncate(MAX_SIGNAL_PAIRS);
            }
            anyhow::ensure!(
                !pairs.is_empty(),
                "the label-free gate signal needs validation triples"
            );
            Ok((
                format!(
                    "validation-triple neighbour retrieval MRR ({} of {} validation triples)",
                    pairs.len(),
                    ctx.ds.valid.len()
                ),
                Box::new(move |x: &Matrix| neighbour_retrieval_mrr(x, &pairs, None)),
            ))
        }
    }
}

/// Refine `x` (rows aligned with `ctx.ds.entities`) with SimSkip.
pub fn refine_table(
    ctx: &EvalContext<'_>,
    x: &Matrix,
    cfg: &SimSkipConfig,
    gate: &GateSettings,
    on_epoch: &mut dyn FnMut(usize, f32, Option<f64>),
) -> Result<RefineOutcome> {
    cfg.validate()?;
    let neighbours = match cfg.positives {
        Positives::Neighbour => Some(training_neighbours(ctx.ds)?),
        Positives::Augment => None,
    };
    let mut trainer = SimSkipTrainer::new(x.cols, cfg.clone())?;
    let start = std::time::Instant::now();
    let (output, signal, chosen, selection) = if gate.enabled {
        let (name, score) = validation_signal(ctx, gate.signal)?;
        let mut score = |m: &Matrix| score(m);
        let selection = train_with_selection(
            &mut trainer,
            x,
            neighbours.as_ref(),
            cfg.epochs,
            &mut score,
            &mut |epoch, stats, s| on_epoch(epoch, stats.loss, Some(s)),
        )?;
        let output = apply(&selection, &trainer, x)?;
        let chosen = match selection.chosen {
            simskip_refine::Choice::Input => "input".to_owned(),
            simskip_refine::Choice::Epoch(e) => format!("epoch {e}"),
        };
        (output, Some(name), chosen, Some(selection))
    } else {
        for epoch in 1..=cfg.epochs {
            let stats = trainer.train_epoch(x, neighbours.as_ref())?;
            on_epoch(epoch, stats.loss, None);
        }
        (trainer.refine(x)?, None, "last epoch".to_owned(), None)
    };
    Ok(RefineOutcome {
        output,
        weights: trainer.export(),
        report: RefineReport {
            config: cfg.clone(),
            gate: gate.enabled,
            signal,
            chosen,
            selection,
            train_seconds: start.elapsed().as_secs_f64(),
        },
    })
}
