//! The batched scorer against the straightforward reference, on real data (UMLS): the ranks
//! must be identical, not just close, for both norms, raw and filtered, including exact ties
//! (duplicated entity rows), NaN rows and widths that are not a multiple of the SIMD width.

use std::path::PathBuf;

use simskip_data::{KgDataset, Matrix};
use simskip_kge::linkpred::{query_ranks, reference, FilterIndex};
use simskip_kge::{Norm, TransE, TransEConfig, TransETrainer};

fn umls() -> KgDataset {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/umls"));
    KgDataset::load(&dir).expect("load data/umls")
}

fn trained(ds: &KgDataset, dim: usize, norm: Norm) -> TransE {
    let cfg = TransEConfig {
        dim,
        norm,
        epochs: 5,
        ..TransEConfig::default()
    };
    let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg);
    trainer.train(&ds.train);
    trainer.into_model()
}

fn assert_same_ranks(entities: &Matrix, relations: &Matrix, norm: Norm, ds: &KgDataset) {
    let queries: Vec<_> = ds.test.iter().chain(&ds.valid).copied().collect();
    for filter in [FilterIndex::from_dataset(ds), FilterIndex::empty()] {
        let fast = query_ranks(entities, relations, norm, &queries, &filter);
        let slow = reference::query_ranks(entities, relations, norm, &queries, &filter);
        assert_eq!(fast.len(), slow.len());
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(a, b, "query {i} {:?} ({norm:?})", queries[i]);
        }
    }
}

#[test]
fn batched_ranks_equal_reference_on_umls() {
    let ds = umls();
    for norm in [Norm::L1, Norm::L2] {
        // 128 is a multiple of 8; 21 leaves a remainder after the 8-wide chunks
        for dim in [128, 21] {
            let model = trained(&ds, dim, norm);
            assert_same_ranks(&model.entities, &model.relations, norm, &ds);
        }
    }
}

#[test]
fn batched_ranks_equal_reference_with_ties_and_nan() {
    let ds = umls();
    for norm in [Norm::L1, Norm::L2] {
        let model = trained(&ds, 24, norm);
        let mut entities = model.entities.clone();
        // exact ties: every third entity a copy of its predecessor
        for e in (1..entities.rows).step_by(3) {
            let row = entities.row(e - 1).to_vec();
            entities.row_mut(e).copy_from_slice(&row);
        }
        // a NaN row: its distances are NaN, neither better nor tied; as an answer it ranks last
        entities.row_mut(7)[3] = f32::NAN;
        assert_same_ranks(&entities, &model.relations, norm, &ds);
        // relation vectors of zero: the query entity ties with nothing but its duplicates
        let zero = Matrix::zeros(model.relations.rows, model.relations.cols);
        assert_same_ranks(&entities, &zero, norm, &ds);
    }
}
