//! Stage one on one machine: TransE on a graph's training triples, filtered link prediction on
//! its validation and test triples.

use std::time::Instant;

use serde::Serialize;
use simskip_data::KgDataset;
use simskip_kge::{FilterIndex, LinkPredictionMetrics, TransE, TransEConfig, TransETrainer};

/// A trained model with its figures.
#[derive(Debug)]
pub struct EmbedOutcome {
    pub model: TransE,
    pub report: EmbedReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbedReport {
    pub dataset: String,
    pub config: TransEConfig,
    pub train_seconds: f64,
    pub epochs_per_second: f64,
    pub final_loss: f32,
    pub valid: LinkPredictionMetrics,
    pub test: LinkPredictionMetrics,
}

/// Train TransE for `cfg.epochs` epochs; `on_epoch(epoch, loss)` after each.
pub fn train_transe(
    ds: &KgDataset,
    cfg: &TransEConfig,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> EmbedOutcome {
    let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg.clone());
    let start = Instant::now();
    let mut final_loss = f32::NAN;
    for epoch in 1..=cfg.epochs {
        final_loss = trainer.train_epoch(&ds.train);
        on_epoch(epoch, final_loss);
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let model = trainer.into_model();
    let filter = FilterIndex::from_dataset(ds);
    let valid = simskip_kge::evaluate(
        &model.entities,
        &model.relations,
        model.norm,
        &ds.valid,
        &filter,
    );
    let test = simskip_kge::evaluate(
        &model.entities,
        &model.relations,
        model.norm,
        &ds.test,
        &filter,
    );
    EmbedOutcome {
        report: EmbedReport {
            dataset: ds.dir.display().to_string(),
            config: cfg.clone(),
            train_seconds,
            epochs_per_second: cfg.epochs as f64 / train_seconds.max(1e-9),
            final_loss,
            valid,
            test,
        },
        model,
    }
}
