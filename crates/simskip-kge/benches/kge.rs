//! Criterion benchmarks: one TransE training epoch and filtered link prediction on UMLS.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use simskip_data::KgDataset;
use simskip_kge::linkpred::{query_ranks, FilterIndex};
use simskip_kge::{TransEConfig, TransETrainer};

fn umls() -> KgDataset {
    KgDataset::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/umls"
    )))
    .expect("load data/umls")
}

fn bench(c: &mut Criterion) {
    let ds = umls();
    let mut trainer = TransETrainer::new(
        ds.num_entities(),
        ds.num_relations(),
        TransEConfig::default(),
    );
    c.bench_function("transe_umls_epoch_d128_margin", |b| {
        b.iter(|| trainer.train_epoch(&ds.train))
    });

    let mut fede = TransETrainer::new(
        ds.num_entities(),
        ds.num_relations(),
        TransEConfig {
            negatives: 64,
            ..TransEConfig::fede_defaults()
        },
    );
    c.bench_function("transe_umls_epoch_d128_selfadv_64neg", |b| {
        b.iter(|| fede.train_epoch(&ds.train))
    });

    let model = trainer.into_model();
    let filter = FilterIndex::from_dataset(&ds);
    c.bench_function("linkpred_umls_test_filtered", |b| {
        b.iter(|| {
            query_ranks(
                &model.entities,
                &model.relations,
                model.norm,
                &ds.test,
                &filter,
            )
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
