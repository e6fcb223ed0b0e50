//! Trainer behaviour: lazy Adam touches only batch rows, determinism, and real UMLS.

use std::path::Path;

use simskip_data::{KgDataset, Triple};
use simskip_kge::linkpred::{evaluate, FilterIndex};
use simskip_kge::{Loss, Norm, TransEConfig, TransETrainer};

fn tr(h: u32, r: u32, t: u32) -> Triple {
    Triple { h, r, t }
}

fn toy_triples() -> Vec<Triple> {
    (0..200u32)
        .map(|i| tr(i % 50, i % 3, (i * 7 + 1) % 50))
        .collect()
}

#[test]
fn lazy_adam_touches_only_batch_rows() {
    for loss in [
        // A margin larger than any distance keeps every hinge active, so all batch rows move.
        Loss::MarginRanking { margin: 50.0 },
        Loss::SelfAdversarial {
            gamma: 4.0,
            temperature: 1.0,
        },
    ] {
        for normalize_entities in [true, false] {
            let cfg = TransEConfig {
                dim: 16,
                negatives: 2,
                loss,
                normalize_entities,
                ..Default::default()
            };
            let mut t = TransETrainer::new(100, 5, cfg);
            let pos = [tr(1, 0, 2), tr(3, 4, 1)];
            let neg = [tr(1, 0, 7), tr(9, 0, 2), tr(3, 4, 11), tr(3, 4, 12)];
            let before = t.model().clone();
            let loss_value = t.step_with_negatives(&pos, &neg);
            assert!(loss_value.is_finite() && loss_value > 0.0);
            let after = t.model();
            let touched_e = [1u32, 2, 3, 7, 9, 11, 12];
            for i in 0..100u32 {
                let same = before.entities.row(i as usize) == after.entities.row(i as usize);
                // Bit-identical when untouched (compare bit patterns, not just values).
                if !touched_e.contains(&i) {
                    let b: Vec<u32> = before
                        .entities
                        .row(i as usize)
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    let a: Vec<u32> = after
                        .entities
                        .row(i as usize)
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert_eq!(a, b, "untouched entity row {i} changed");
                    assert_eq!(t.entity_steps()[i as usize], 0);
                } else {
                    assert!(!same, "touched entity row {i} did not move");
                    assert_eq!(t.entity_steps()[i as usize], 1);
                }
            }
            for r in 0..5u32 {
                let same = before.relations.row(r as usize) == after.relations.row(r as usize);
                assert_eq!(same, !(r == 0 || r == 4), "relation row {r}");
            }
        }
    }
}

#[test]
fn entity_rows_stay_unit_norm() {
    let mut t = TransETrainer::new(
        50,
        3,
        TransEConfig {
            dim: 8,
            ..Default::default()
        },
    );
    for i in 0..50 {
        let n: f32 = t.model().entities.row(i).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
    t.train_epoch(&toy_triples());
    for i in 0..50 {
        let n: f32 = t.model().entities.row(i).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_tables_different_seed_differs() {
    let run = |seed| {
        let cfg = TransEConfig {
            dim: 8,
            batch_size: 32,
            negatives: 3,
            epochs: 3,
            seed,
            ..Default::default()
        };
        let mut t = TransETrainer::new(50, 3, cfg);
        let losses = t.train(&toy_triples());
        (losses, t.into_model())
    };
    let (la, a) = run(42);
    let (lb, b) = run(42);
    let (_, c) = run(43);
    assert_eq!(la, lb);
    assert_eq!(a, b);
    assert_ne!(a.entities, c.entities);
    assert_ne!(a.relations, c.relations);
}

#[test]
fn loss_decreases_and_adam_state_persists_across_rounds() {
    let cfg = TransEConfig {
        dim: 16,
        batch_size: 50,
        ..Default::default()
    };
    let mut t = TransETrainer::new(50, 3, cfg.clone());
    let triples = toy_triples();
    let first = t.train_epoch(&triples);
    for _ in 0..20 {
        t.train_epoch(&triples);
    }
    let last = t.train_epoch(&triples);
    assert!(last < first, "loss did not decrease: {first} -> {last}");
    // A federated round: overwrite some entity rows; optimiser steps are kept.
    let steps_before = t.entity_steps()[0];
    assert!(steps_before > 0);
    let rows = t.model().entities.select_rows(&[1, 0]);
    t.set_entity_rows(&[0, 1], &rows);
    assert_eq!(t.model().entities.row(0), rows.row(0));
    assert_eq!(t.entity_steps()[0], steps_before);
    // from_model continues from the given tables.
    let model = t.into_model();
    let t2 = TransETrainer::from_model(model.clone(), cfg);
    assert_eq!(t2.model(), &model);
}

#[test]
fn config_serde_roundtrip_and_defaults() {
    let cfg = TransEConfig::fede_defaults();
    let s = serde_json::to_string(&cfg).unwrap();
    let back: TransEConfig = serde_json::from_str(&s).unwrap();
    assert_eq!(back, cfg);
    let partial: TransEConfig = serde_json::from_str(r#"{"dim": 32, "norm": "L2"}"#).unwrap();
    assert_eq!(partial.dim, 32);
    assert_eq!(partial.norm, Norm::L2);
    assert_eq!(partial.epochs, TransEConfig::default().epochs);
}

#[test]
fn umls_transe_learns() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/umls"));
    let ds = KgDataset::load(dir).expect("load data/umls");
    let cfg = TransEConfig {
        dim: 64,
        epochs: 30,
        seed: 1,
        ..Default::default()
    };
    let mut t = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg);
    let losses = t.train(&ds.train);
    assert!(losses.last().unwrap() < &losses[0]);
    let m = t.model();
    let metrics = evaluate(
        &m.entities,
        &m.relations,
        m.norm,
        &ds.test,
        &FilterIndex::from_dataset(&ds),
    );
    eprintln!("UMLS d=64, 30 epochs: {metrics:?}");
    assert_eq!(metrics.count, ds.test.len());
    assert!(
        metrics.mrr > 0.3,
        "test MRR {} (random ~ {})",
        metrics.mrr,
        1.0 / 135.0
    );
    assert!(
        metrics.hits_at_10 > 0.6,
        "test Hits@10 {}",
        metrics.hits_at_10
    );
    // The figures `simskip bench` reports.
    let small = TransEConfig {
        dim: 16,
        ..Default::default()
    };
    let eps = simskip_kge::bench::transe_epochs_per_second(&ds, &small, 1);
    let qps = simskip_kge::bench::linkpred_queries_per_second_on(m, &ds);
    assert!(eps.is_finite() && eps > 0.0 && qps.is_finite() && qps > 0.0);
}

#[test]
fn parallel_epochs_cover_the_same_batches_and_learn_umls() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/umls"));
    let ds = KgDataset::load(dir).expect("load data/umls");
    let cfg = |threads| TransEConfig {
        dim: 64,
        epochs: 30,
        seed: 1,
        threads,
        ..Default::default()
    };
    // Same shuffle, same batches, each taken once: a relation row gets one Adam step per
    // batch that holds it, whichever thread ran the batch (under the self-adversarial loss
    // every triple has a non-zero gradient; a margin's inactive hinges would not count).
    let adversarial = |threads| TransEConfig {
        loss: Loss::SelfAdversarial {
            gamma: 10.0,
            temperature: 1.0,
        },
        negatives: 4,
        ..cfg(threads)
    };
    let mut one = TransETrainer::new(ds.num_entities(), ds.num_relations(), adversarial(1));
    let mut four = TransETrainer::new(ds.num_entities(), ds.num_relations(), adversarial(4));
    one.train_epoch(&ds.train);
    four.train_epoch(&ds.train);
    assert_eq!(one.relation_steps(), four.relation_steps());
    assert!(four.relation_steps().iter().all(|&s| s > 0));
    assert_ne!(
        one.model(),
        four.model(),
        "different negatives, different tables"
    );
    let mut four = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg(4));
    let losses = four.train(&ds.train);
    assert!(losses.last().unwrap() < &losses[0]);
    let m = four.model();
    for i in 0..ds.num_entities() {
        let n: f32 = m.entities.row(i).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-4, "entity row {i} norm² {n}");
    }
    let metrics = evaluate(
        &m.entities,
        &m.relations,
        m.norm,
        &ds.test,
        &FilterIndex::from_dataset(&ds),
    );
    assert!(metrics.mrr > 0.3, "4 threads: test MRR {}", metrics.mrr);
    assert!(
        metrics.hits_at_10 > 0.6,
        "4 threads: Hits@10 {}",
        metrics.hits_at_10
    );
}
