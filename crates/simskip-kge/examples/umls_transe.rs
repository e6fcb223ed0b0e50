//! TransE on UMLS, PyKEEN-style (`TransEConfig::pykeen_reference()`, the earlier default): d 128, 100 epochs, batch 256, Adam lr 0.01, margin 1,
//! L1, one negative per positive, unit-norm entities. Prints filtered test figures.
//!
//! `cargo run -p simskip-kge --release --example umls_transe [-- SEED [DATA_DIR]]`

use std::path::PathBuf;
use std::time::Instant;

use simskip_data::KgDataset;
use simskip_kge::linkpred::{evaluate, FilterIndex};
use simskip_kge::{TransEConfig, TransETrainer};

fn main() {
    let mut args = std::env::args().skip(1);
    let seed: u64 = args.next().map(|s| s.parse().expect("seed")).unwrap_or(0);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/umls")));
    let ds = KgDataset::load(&dir).expect("load UMLS");
    let cfg = TransEConfig {
        seed,
        ..TransEConfig::pykeen_reference()
    };
    println!(
        "UMLS: {} entities, {} relations, {} train / {} valid / {} test; {:?}",
        ds.num_entities(),
        ds.num_relations(),
        ds.train.len(),
        ds.valid.len(),
        ds.test.len(),
        cfg
    );
    let start = Instant::now();
    let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg.clone());
    let losses = trainer.train(&ds.train);
    let secs = start.elapsed().as_secs_f64();
    let model = trainer.into_model();

    let filter = FilterIndex::from_dataset(&ds);
    let start = Instant::now();
    let m = evaluate(
        &model.entities,
        &model.relations,
        model.norm,
        &ds.test,
        &filter,
    );
    let eval_secs = start.elapsed().as_secs_f64();

    println!(
        "final epoch loss   {:.4}",
        losses.last().copied().unwrap_or(f32::NAN)
    );
    println!(
        "test (both sides)  MRR {:.4}  Hits@1 {:.4}  Hits@3 {:.4}  Hits@10 {:.4}",
        m.mrr, m.hits_at_1, m.hits_at_3, m.hits_at_10
    );
    println!(
        "test (tail only)   MRR {:.4}  Hits@1 {:.4}  Hits@3 {:.4}  Hits@10 {:.4}",
        m.tail.mrr, m.tail.hits_at_1, m.tail.hits_at_3, m.tail.hits_at_10
    );
    println!(
        "training {:.3} s ({:.1} epochs/s); link prediction {:.0} queries/s ({} triples x 2 sides in {:.3} s)",
        secs,
        cfg.epochs as f64 / secs,
        2.0 * m.count as f64 / eval_secs,
        m.count,
        eval_secs
    );
}
