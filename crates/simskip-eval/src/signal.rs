//! A label-free validation signal from the graph, to choose the best refinement epoch when
//! there are no labels: how well cosine similarity in the table retrieves held-out neighbours.
//!
//! Why it is a fair held-out signal: SimSkip refinement is trained on the training triples only
//! (their walks/contexts); the validation triples are never shown to it. An edge `(h, t)` of the
//! validation set is therefore a true relationship the refiner has not seen, and ranking `t`
//! high among all entities given `h` measures whether the table generalises the graph's
//! structure rather than memorising the training edges. Relations are ignored: the task asks
//! only "are related entities close", which is what the downstream similarity tasks use. Keep
//! the test triples out of it, so the figures reported on test stay untouched by model
//! selection.

use simskip_data::{Matrix, Triple};

use crate::knn::{for_each_similarity_row, normalised_rows};

/// Undirected neighbour lists (sorted, no duplicates) of a set of edges, e.g. the training
/// graph, used to filter known neighbours out of a ranking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjacency {
    neighbours: Vec<Vec<u32>>,
}

impl Adjacency {
    /// From undirected pairs over entities `0..num_entities`. Panics on an id out of range.
    pub fn from_pairs(num_entities: usize, pairs: &[(u32, u32)]) -> Self {
        let mut neighbours = vec![Vec::new(); num_entities];
        for &(a, b) in pairs {
            neighbours[a as usize].push(b);
            neighbours[b as usize].push(a);
        }
        for n in &mut neighbours {
            n.sort_unstable();
            n.dedup();
        }
        Self { neighbours }
    }

    /// From triples, relations ignored (`(h, t)` pairs).
    pub fn from_triples(num_entities: usize, triples: &[Triple]) -> Self {
        Self::from_pairs(num_entities, &pairs_of(triples))
    }

    /// Neighbours of `e`, ascending.
    pub fn of(&self, e: u32) -> &[u32] {
        &self.neighbours[e as usize]
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// True for a graph over no entities.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

/// The `(h, t)` pairs of triples, in order.
pub fn pairs_of(triples: &[Triple]) -> Vec<(u32, u32)> {
    triples.iter().map(|t| (t.h, t.t)).collect()
}

/// Panics, naming [`neighbour_retrieval_mrr`], if a pair's id is out of range for `x` or the
/// adjacency is not one list per row of `x`.
pub(crate) fn check_retrieval_inputs(
    x: &Matrix,
    pairs: &[(u32, u32)],
    filter_train_neighbours: Option<&Adjacency>,
) {
    for &(h, t) in pairs {
        assert!(
            (h as usize) < x.rows && (t as usize) < x.rows,
            "neighbour_retrieval_mrr: pair ({h}, {t}) out of range for {} rows",
            x.rows
        );
    }
    if let Some(adj) = filter_train_neighbours {
        assert_eq!(
            adj.len(),
            x.rows,
            "neighbour_retrieval_mrr: adjacency size vs table rows"
        );
    }
}

/// Symmetrised mean reciprocal rank of held-out neighbours under cosine similarity.
///
/// For every pair `(h, t)` (self-pairs `h == t` are skipped) the target `t` is ranked among all
/// entities except `h` by cosine similarity to `h`, and `h` among all except `t` given `t`; the
/// result is the mean of the `2·pairs` reciprocal ranks (in `(0, 1]`, higher is better).
///
/// * Filtered setting: with `filter_train_neighbours = Some(adj)`, the other known neighbours of
///   the query (`adj.of(h)` when ranking `t`) are removed from the competitors, as in filtered
///   link prediction; the target itself is never removed. Pass the training graph's adjacency:
///   a table that pulls all training neighbours close should not be penalised for it.
/// * Ties are scored by the mean of the optimistic and pessimistic ranks
///   (`1 + #better + #tied / 2`), so a collapsed table (everything equal) scores about
///   `2 / num_entities`, not a perfect 1.
/// * Returns NaN when there is nothing to rank (no non-self pairs).
///
/// Cost: `O(2·pairs·rows·cols)` as blocked gemm products (bounded memory, parallel over blocks
/// of queries), then one counting pass per ranking; the target's score comes from the same
/// product as its competitors', so ties are exact. Callers evaluating it often (the refinement
/// gate) pass a sample of the pairs.
///
/// Panics if an id is out of range for `x`.
pub fn neighbour_retrieval_mrr(
    x: &Matrix,
    pairs: &[(u32, u32)],
    filter_train_neighbours: Option<&Adjacency>,
) -> f64 {
    check_retrieval_inputs(x, pairs, filter_train_neighbours);
    // (query, target) rankings, both directions of every non-self pair
    let (queries, targets): (Vec<u32>, Vec<u32>) = pairs
        .iter()
        .filter(|(h, t)| h != t)
        .flat_map(|&(h, t)| [(h, t), (t, h)])
        .unzip();
    if queries.is_empty() {
        return f64::NAN;
    }
    let unit = normalised_rows(x);
    let reciprocal_ranks = for_each_similarity_row(&unit, x.cols, &queries, &unit, |i, sims| {
        let (query, target) = (queries[i], targets[i]);
        let s_target = sims[target as usize];
        let mut better = 0usize;
        let mut tied = 0usize;
        for &s in sims {
            better += (s > s_target) as usize;
            tied += (s == s_target) as usize;
        }
        // take the target, the query and the filtered neighbours back out of the counts
        let mut remove = |s: f32| {
            if s > s_target {
                better -= 1;
            } else if s == s_target {
                tied -= 1;
            }
        };
        remove(s_target);
        remove(sims[query as usize]);
        if let Some(adj) = filter_train_neighbours {
            for &e in adj.of(query) {
                if e != query && e != target {
                    remove(sims[e as usize]);
                }
            }
        }
        1.0 / (1.0 + better as f64 + tied as f64 / 2.0)
    });
    reciprocal_ranks.iter().sum::<f64>() / reciprocal_ranks.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five 2-D points at angles 0°, 20°, 60°, 150°, 270° (ids 0..4), lengths varied.
    fn points() -> Matrix {
        let deg = [0.0f32, 20.0, 60.0, 150.0, 270.0];
        let mut data = Vec::new();
        for (i, d) in deg.iter().enumerate() {
            let r = d.to_radians();
            data.extend_from_slice(&[(1.0 + i as f32) * r.cos(), (1.0 + i as f32) * r.sin()]);
        }
        Matrix::from_vec(5, 2, data)
    }

    #[test]
    fn hand_case_unfiltered() {
        let x = points();
        // pair (0, 2):
        //   given 0, rank 2 among {1, 2, 3, 4}: angles 20, 60, 150, 90(270°) -> 1 is closer -> rank 2
        //   given 2, rank 0 among {0, 1, 3, 4}: angles 60, 40, 90, 150(210°) -> 1 closer -> rank 2
        // pair (3, 4):
        //   given 3, rank 4 among {0,1,2,4}: angles 150,130,90,120 -> 2 and 4... sorted: 2 (90),
        //     4 (120), 1 (130), 0 (150) -> rank 2
        //   given 4, rank 3 among {0,1,2,3}: angles 90,110,150,120 -> 0 (90), 1 (110),
        //     3 (120) -> rank 3
        // MRR = (1/2 + 1/2 + 1/2 + 1/3) / 4 = (11/6) / 4 = 11/24
        let mrr = neighbour_retrieval_mrr(&x, &[(0, 2), (3, 4)], None);
        assert!((mrr - 11.0 / 24.0).abs() < 1e-12, "{mrr}");
        // a self pair is skipped, an empty set is NaN
        let same = neighbour_retrieval_mrr(&x, &[(0, 2), (3, 4), (1, 1)], None);
        assert!((same - mrr).abs() < 1e-12);
        assert!(neighbour_retrieval_mrr(&x, &[], None).is_nan());
    }

    #[test]
    fn hand_case_filtered() {
        let x = points();
        // training graph: 0-1 and 4-0. Filtering removes 1 and 4 from the competitors given 0
        // and 0 given 4, but nothing given 2 or 3.
        let adj = Adjacency::from_pairs(5, &[(0, 1), (4, 0)]);
        // (0, 2): given 0 -> competitors {3} only: rank 1; given 2 -> unchanged, rank 2
        // (3, 4): given 3 -> unchanged, rank 2; given 4 -> {1, 2, 3}: 110, 150, 120 -> 1 (110),
        //          3 (120): rank 2
        // MRR = (1 + 1/2 + 1/2 + 1/2) / 4 = 2.5 / 4 = 0.625
        let mrr = neighbour_retrieval_mrr(&x, &[(0, 2), (3, 4)], Some(&adj));
        assert!((mrr - 0.625).abs() < 1e-12, "{mrr}");
        // the target is never filtered, even when it is a training neighbour too
        let adj = Adjacency::from_pairs(5, &[(0, 2)]);
        let one = neighbour_retrieval_mrr(&x, &[(0, 2)], Some(&adj));
        assert!((one - 0.5).abs() < 1e-12, "{one}");
    }

    #[test]
    fn collapsed_table_is_not_rewarded() {
        // all rows equal: every competitor ties, rank = 1 + (n - 2) / 2
        let n = 10;
        let x = Matrix::from_vec(n, 3, vec![1.0; n * 3]);
        let mrr = neighbour_retrieval_mrr(&x, &[(0, 1), (2, 3)], None);
        assert!(
            (mrr - 1.0 / (1.0 + (n as f64 - 2.0) / 2.0)).abs() < 1e-12,
            "{mrr}"
        );
    }

    #[test]
    fn matches_the_reference_on_a_random_table() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, d) = (400, 16);
        let data: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Matrix::from_vec(n, d, data);
        let pairs: Vec<(u32, u32)> = (0..150)
            .map(|_| (rng.random_range(0..n as u32), rng.random_range(0..n as u32)))
            .collect();
        let train: Vec<(u32, u32)> = (0..600)
            .map(|_| (rng.random_range(0..n as u32), rng.random_range(0..n as u32)))
            .collect();
        let adj = Adjacency::from_pairs(n, &train);
        for filter in [None, Some(&adj)] {
            let fast = neighbour_retrieval_mrr(&x, &pairs, filter);
            let slow = crate::reference::neighbour_retrieval_mrr(&x, &pairs, filter);
            assert!((fast - slow).abs() < 1e-9, "{fast} vs {slow}");
        }
    }

    #[test]
    fn adjacency_from_triples() {
        let tr = [
            Triple { h: 0, r: 0, t: 2 },
            Triple { h: 2, r: 1, t: 0 },
            Triple { h: 1, r: 0, t: 2 },
        ];
        let adj = Adjacency::from_triples(3, &tr);
        assert_eq!(adj.of(0), &[2]);
        assert_eq!(adj.of(2), &[0, 1]);
        assert_eq!(adj.of(1), &[2]);
    }
}
