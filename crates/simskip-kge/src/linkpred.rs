//! Filtered link prediction for TransE-style tables.
//!
//! For every query triple `(h, r, t)` two rankings are made over all entities:
//! the tail side `(h, r, ?)`, where candidate `e` has distance `||h + r - e||_p`, and the
//! head side `(?, r, t)`, where candidate `e` has distance `||e + r - t||_p`
//! (computed as `||e - (t - r)||_p`). In the *filtered* setting every other entity that
//! forms a known true triple (from [`FilterIndex`]) is removed from the candidates; the
//! true answer itself always stays.
//!
//! **Rank** is the *realistic* rank, PyKEEN's default: with `better` the number of
//! remaining candidates with a strictly smaller distance and `ties` the number of other
//! remaining candidates at exactly the same distance,
//! `rank = 1 + better + ties / 2` (the mean of the optimistic rank `1 + better` and the
//! pessimistic rank `1 + better + ties`). A true answer with a NaN distance gets the worst
//! rank (`number of remaining candidates`). MRR is the mean of `1 / rank`, Hits@k the
//! fraction of rankings with `rank <= k`. The main figures average both sides (so each query
//! triple counts twice); [`TailOnly`] holds the tail-side figures, as FedE reports them.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use simskip_data::{KgDataset, Matrix, Triple};

use crate::transe::{lanes2, Norm};

/// Known true answers: `(h, r) -> sorted tails` and `(r, t) -> sorted heads`.
#[derive(Debug, Clone, Default)]
pub struct FilterIndex {
    tails: HashMap<(u32, u32), Vec<u32>>,
    heads: HashMap<(u32, u32), Vec<u32>>,
}

impl FilterIndex {
    /// Index the given true triples (duplicates are fine).
    pub fn new<'a, I: IntoIterator<Item = &'a Triple>>(triples: I) -> Self {
        let mut f = Self::default();
        for t in triples {
            f.tails.entry((t.h, t.r)).or_default().push(t.t);
            f.heads.entry((t.r, t.t)).or_default().push(t.h);
        }
        for v in f.tails.values_mut().chain(f.heads.values_mut()) {
            v.sort_unstable();
            v.dedup();
        }
        f
    }

    /// An index with no known triples: evaluation is then *raw* (unfiltered).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Train, valid and test triples of a dataset.
    pub fn from_dataset(ds: &KgDataset) -> Self {
        Self::new(ds.train.iter().chain(&ds.valid).chain(&ds.test))
    }

    /// Known tails of `(h, r, ?)`, sorted.
    pub fn tails(&self, h: u32, r: u32) -> &[u32] {
        self.tails.get(&(h, r)).map_or(&[], Vec::as_slice)
    }

    /// Known heads of `(?, r, t)`, sorted.
    pub fn heads(&self, r: u32, t: u32) -> &[u32] {
        self.heads.get(&(r, t)).map_or(&[], Vec::as_slice)
    }
}

/// Tail-side (`(h, r, ?)`) figures.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TailOnly {
    pub mrr: f64,
    pub hits_at_1: f64,
    pub hits_at_3: f64,
    pub hits_at_10: f64,
}

/// Filtered link-prediction figures over `count` query triples (both sides averaged),
/// plus the tail side alone.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LinkPredictionMetrics {
    /// Number of query triples (each ranked on both sides).
    pub count: usize,
    pub mrr: f64,
    pub hits_at_1: f64,
    pub hits_at_3: f64,
    pub hits_at_10: f64,
    pub tail: TailOnly,
}

/// Realistic ranks of one query triple on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QueryRanks {
    /// Rank of the true head among candidates for `(?, r, t)`.
    pub head: f64,
    /// Rank of the true tail among candidates for `(h, r, ?)`.
    pub tail: f64,
}

#[inline]
fn dist(norm: Norm, q: &[f32], e: &[f32]) -> f32 {
    // For L2 the squared distance orders candidates identically.
    match norm {
        Norm::L1 => lanes2(q, e, f32::abs),
        Norm::L2 => lanes2(q, e, |x| x * x),
    }
}

/// Realistic filtered rank of `answer` for query vector `q` (candidate distance
/// `||q - e||`), removing the known answers `known` (sorted) other than `answer`.
fn rank_one(entities: &Matrix, norm: Norm, q: &[f32], answer: u32, known: &[u32]) -> f64 {
    let n = entities.rows;
    let d_true = dist(norm, q, entities.row(answer as usize));
    let removed = known
        .iter()
        .filter(|&&e| e != answer && (e as usize) < n)
        .count();
    if d_true.is_nan() {
        return (n - removed) as f64;
    }
    let mut better = 0usize;
    let mut ties = 0usize;
    for e in 0..n {
        let d = dist(norm, q, entities.row(e));
        better += (d < d_true) as usize;
        ties += (d == d_true) as usize;
    }
    // The answer tied with itself.
    ties -= 1;
    for &e in known {
        if e == answer || e as usize >= n {
            continue;
        }
        let d = dist(norm, q, entities.row(e as usize));
        if d < d_true {
            better -= 1;
        } else if d == d_true {
            ties -= 1;
        }
    }
    1.0 + better as f64 + ties as f64 / 2.0
}

/// Filtered realistic ranks of every query triple (parallel over queries).
pub fn query_ranks(
    entities: &Matrix,
    relations: &Matrix,
    norm: Norm,
    queries: &[Triple],
    filter: &FilterIndex,
) -> Vec<QueryRanks> {
    assert_eq!(
        entities.cols, relations.cols,
        "entity and relation widths differ"
    );
    let d = entities.cols;
    queries
        .par_iter()
        .map_init(
            || vec![0.0f32; d],
            |q, t| {
                let h = entities.row(t.h as usize);
                let r = relations.row(t.r as usize);
                let tt = entities.row(t.t as usize);
                for k in 0..d {
                    q[k] = h[k] + r[k];
                }
                let tail = rank_one(entities, norm, q, t.t, filter.tails(t.h, t.r));
                for k in 0..d {
                    q[k] = tt[k] - r[k];
                }
                let head = rank_one(entities, norm, q, t.h, filter.heads(t.r, t.t));
                QueryRanks { head, tail }
            },
        )
        .collect()
}

/// MRR and Hits@{1,3,10} from ranks (see the module docs).
pub fn metrics_from_ranks(ranks: &[QueryRanks]) -> LinkPredictionMetrics {
    #[derive(Default)]
    struct Acc {
        rr: f64,
        h1: f64,
        h3: f64,
        h10: f64,
    }
    fn add(a: &mut Acc, r: f64) {
        a.rr += 1.0 / r;
        a.h1 += (r <= 1.0) as u8 as f64;
        a.h3 += (r <= 3.0) as u8 as f64;
        a.h10 += (r <= 10.0) as u8 as f64;
    }
    let mut both = Acc::default();
    let mut tail = Acc::default();
    for q in ranks {
        add(&mut both, q.head);
        add(&mut both, q.tail);
        add(&mut tail, q.tail);
    }
    let n = ranks.len();
    if n == 0 {
        return LinkPredictionMetrics::default();
    }
    let (n1, n2) = (n as f64, 2.0 * n as f64);
    LinkPredictionMetrics {
        count: n,
        mrr: both.rr / n2,
        hits_at_1: both.h1 / n2,
        hits_at_3: both.h3 / n2,
        hits_at_10: both.h10 / n2,
        tail: TailOnly {
            mrr: tail.rr / n1,
            hits_at_1: tail.h1 / n1,
            hits_at_3: tail.h3 / n1,
            hits_at_10: tail.h10 / n1,
        },
    }
}

/// Filtered link prediction of `queries` (see the module docs for the ranking protocol).
pub fn evaluate(
    model_entities: &Matrix,
    relations: &Matrix,
    norm: Norm,
    queries: &[Triple],
    filter: &FilterIndex,
) -> LinkPredictionMetrics {
    metrics_from_ranks(&query_ranks(
        model_entities,
        relations,
        norm,
        queries,
        filter,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(h: u32, r: u32, t: u32) -> Triple {
        Triple { h, r, t }
    }

    #[test]
    fn filter_index_sorts_and_dedups() {
        let f = FilterIndex::new(&[tr(0, 0, 3), tr(0, 0, 1), tr(0, 0, 3), tr(2, 0, 3)]);
        assert_eq!(f.tails(0, 0), &[1, 3]);
        assert_eq!(f.heads(0, 3), &[0, 2]);
        assert!(f.tails(1, 0).is_empty());
    }

    #[test]
    fn metrics_from_known_ranks() {
        let m = metrics_from_ranks(&[
            QueryRanks {
                head: 1.0,
                tail: 2.0,
            },
            QueryRanks {
                head: 4.0,
                tail: 10.5,
            },
        ]);
        assert_eq!(m.count, 2);
        assert!((m.mrr - (1.0 + 0.5 + 0.25 + 1.0 / 10.5) / 4.0).abs() < 1e-12);
        assert_eq!(m.hits_at_1, 0.25);
        assert_eq!(m.hits_at_3, 0.5);
        assert_eq!(m.hits_at_10, 0.75);
        assert!((m.tail.mrr - (0.5 + 1.0 / 10.5) / 2.0).abs() < 1e-12);
        assert_eq!(m.tail.hits_at_10, 0.5);
        assert_eq!(m.tail.hits_at_1, 0.0);
    }
}
