//! Throughput figures for `simskip bench` (nothing is printed).

use std::time::Instant;

use simskip_data::{KgDataset, Triple};

use crate::linkpred::{query_ranks, FilterIndex};
use crate::transe::{TransE, TransEConfig, TransETrainer};

/// Training epochs per second of TransE on `ds.train` with `cfg` (`epochs` epochs are
/// timed, after initialisation; `cfg.epochs` is ignored).
pub fn transe_epochs_per_second(ds: &KgDataset, cfg: &TransEConfig, epochs: usize) -> f64 {
    let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg.clone());
    let epochs = epochs.max(1);
    let start = Instant::now();
    for _ in 0..epochs {
        std::hint::black_box(trainer.train_epoch(&ds.train));
    }
    epochs as f64 / start.elapsed().as_secs_f64()
}

/// Filtered link-prediction throughput of `model` over `queries`, in ranking queries per
/// second: each query triple makes two rankings over all entities (head side and tail
/// side), so this is `2 * queries.len() / seconds`.
pub fn linkpred_queries_per_second(
    model: &TransE,
    queries: &[Triple],
    filter: &FilterIndex,
) -> f64 {
    let start = Instant::now();
    let ranks = query_ranks(
        &model.entities,
        &model.relations,
        model.norm,
        queries,
        filter,
    );
    std::hint::black_box(&ranks);
    2.0 * queries.len() as f64 / start.elapsed().as_secs_f64()
}

/// [`linkpred_queries_per_second`] on a dataset's test triples with the dataset's filter.
pub fn linkpred_queries_per_second_on(model: &TransE, ds: &KgDataset) -> f64 {
    linkpred_queries_per_second(model, &ds.test, &FilterIndex::from_dataset(ds))
}
