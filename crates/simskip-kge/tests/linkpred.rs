//! Link prediction on tiny hand-built models with known ranks.

use simskip_data::{Matrix, Triple};
use simskip_kge::linkpred::{evaluate, query_ranks, FilterIndex, QueryRanks};
use simskip_kge::Norm;

fn tr(h: u32, r: u32, t: u32) -> Triple {
    Triple { h, r, t }
}

/// Entities on a line at 0, 1, 2.5, 4 (1-D embeddings); relation 0 translates by +1,
/// relation 1 by +2.5.
fn line() -> (Matrix, Matrix) {
    (
        Matrix::from_vec(4, 1, vec![0.0, 1.0, 2.5, 4.0]),
        Matrix::from_vec(2, 1, vec![1.0, 2.5]),
    )
}

#[test]
fn raw_and_filtered_ranks_without_ties() {
    let (e, r) = line();
    // Query (0, r0, 2): tail side q = 0 + 1 = 1; distances to 0,1,2.5,4 = 1, 0, 1.5, 3.
    // True tail 2 (d 1.5): entities 0 and 1 are closer -> raw rank 3.
    // Head side (?, r0, 2): q = 2.5 - 1 = 1.5; distances 1.5, 0.5, 1, 2.5. True head 0 (d 1.5):
    // 1 and 2 closer -> raw rank 3.
    for norm in [Norm::L1, Norm::L2] {
        let q = [tr(0, 0, 2)];
        let raw = query_ranks(&e, &r, norm, &q, &FilterIndex::empty());
        assert_eq!(
            raw,
            vec![QueryRanks {
                head: 3.0,
                tail: 3.0
            }]
        );
        // Known true (0, r0, 1) outranks the answer on the tail side: filtering it removes
        // one better candidate. (2, r0, 2) likewise on the head side.
        let known = [tr(0, 0, 2), tr(0, 0, 1), tr(2, 0, 2)];
        let filtered = query_ranks(&e, &r, norm, &q, &FilterIndex::new(&known));
        assert_eq!(
            filtered,
            vec![QueryRanks {
                head: 2.0,
                tail: 2.0
            }]
        );
        // A filtered triple that ranks *worse* than the answer changes nothing.
        let worse = [tr(0, 0, 3), tr(3, 0, 2)];
        let f = query_ranks(&e, &r, norm, &q, &FilterIndex::new(&worse));
        assert_eq!(f, raw);
        // A query triple that is itself in the filter keeps its own answer.
        let f = query_ranks(&e, &r, norm, &q, &FilterIndex::new(&[tr(0, 0, 2)]));
        assert_eq!(f, raw);
    }
}

#[test]
fn perfect_and_worst_ranks_and_metrics() {
    let (e, r) = line();
    // (1, r0, 2)? 1 + 1 = 2, nearest is 2.5 (d .5) vs 1 (d 1): tail rank 1.
    // Head side: q = 2.5 - 1 = 1.5: distances 1.5, .5, 1, 2.5 -> head 1 has rank 1.
    // (3, r1, 0): tail q = 6.5 -> entity 0 is the farthest: rank 4.
    // Head side q = 0 - 2.5 = -2.5 -> distances 2.5, 3.5, 5, 6.5 -> entity 3 rank 4.
    let q = [tr(1, 0, 2), tr(3, 1, 0)];
    let ranks = query_ranks(&e, &r, Norm::L1, &q, &FilterIndex::empty());
    assert_eq!(
        ranks,
        vec![
            QueryRanks {
                head: 1.0,
                tail: 1.0
            },
            QueryRanks {
                head: 4.0,
                tail: 4.0
            }
        ]
    );
    let m = evaluate(&e, &r, Norm::L1, &q, &FilterIndex::empty());
    assert_eq!(m.count, 2);
    assert!((m.mrr - (1.0 + 0.25) / 2.0).abs() < 1e-12);
    assert_eq!(m.hits_at_1, 0.5);
    assert_eq!(m.hits_at_3, 0.5);
    assert_eq!(m.hits_at_10, 1.0);
    assert!((m.tail.mrr - 0.625).abs() < 1e-12);
}

#[test]
fn ties_count_half() {
    // Entities at 0, 1, 2, 3 and relation +1: query (0, r, 2) -> tail q = 1, distances
    // 1, 0, 1, 2: one better (entity 1), one tie (entity 0) -> realistic rank 1 + 1 + 0.5.
    let e = Matrix::from_vec(4, 1, vec![0.0, 1.0, 2.0, 3.0]);
    let r = Matrix::from_vec(1, 1, vec![1.0]);
    let q = [tr(0, 0, 2)];
    let raw = query_ranks(&e, &r, Norm::L1, &q, &FilterIndex::empty());
    // Head side q = 2 - 1 = 1: distances 1, 0, 1, 2; answer 0 ties with 2, entity 1 better.
    assert_eq!(
        raw,
        vec![QueryRanks {
            head: 2.5,
            tail: 2.5
        }]
    );
    // Filtering the tied (0, r, 0) removes the tie on the tail side; filtering (1, r, 2)
    // removes the better head.
    let f = query_ranks(
        &e,
        &r,
        Norm::L1,
        &q,
        &FilterIndex::new(&[tr(0, 0, 0), tr(1, 0, 2)]),
    );
    assert_eq!(
        f,
        vec![QueryRanks {
            head: 1.5,
            tail: 2.0
        }]
    );
    // All entities identical: every candidate ties -> rank (1 + n) / 2.
    let flat = Matrix::from_vec(4, 2, vec![0.5; 8]);
    let r0 = Matrix::zeros(1, 2);
    let ranks = query_ranks(&flat, &r0, Norm::L2, &q, &FilterIndex::empty());
    assert_eq!(
        ranks,
        vec![QueryRanks {
            head: 2.5,
            tail: 2.5
        }]
    );
}

#[test]
fn metrics_are_empty_for_no_queries() {
    let (e, r) = line();
    let m = evaluate(&e, &r, Norm::L1, &[], &FilterIndex::empty());
    assert_eq!(m.count, 0);
    assert_eq!(m.mrr, 0.0);
}

#[test]
fn metrics_serialise() {
    let (e, r) = line();
    let m = evaluate(&e, &r, Norm::L1, &[tr(1, 0, 2)], &FilterIndex::empty());
    let s = serde_json::to_string(&m).unwrap();
    assert!(s.contains("\"hits_at_10\"") && s.contains("\"tail\""));
    let back: simskip_kge::LinkPredictionMetrics = serde_json::from_str(&s).unwrap();
    assert_eq!(back, m);
}
