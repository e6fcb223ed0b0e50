//! KNN same-label precision@k under cosine similarity (the paper's precision@10).

use rayon::prelude::*;
use simskip_data::Matrix;

use crate::matmul::{matmul, Operand};

/// Similarities held per block of queries, in floats (8 MiB): a block has
/// `SIMILARITY_BUDGET / candidates` query rows (at most [`MAX_QUERY_BLOCK`]), so memory stays
/// bounded however large the table.
const SIMILARITY_BUDGET: usize = 1 << 21;
/// Query rows per block at most (one gemm call per block).
const MAX_QUERY_BLOCK: usize = 128;

/// Rows of `x` scaled to unit L2 norm; an all-zero row stays zero (cosine 0 to everything).
pub(crate) fn normalised_rows(x: &Matrix) -> Vec<f32> {
    let mut data = x.data.clone();
    if x.cols == 0 {
        return data;
    }
    data.par_chunks_mut(x.cols).for_each(|row| {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    });
    data
}

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `per_row(i, sims)` for every query `i`, where `sims[j]` is the dot product of row
/// `queries[i]` of `unit` with row `j` of `candidates` (both row-major with `d` columns).
///
/// The similarities come from one gemm product per block of queries (parallel over blocks
/// with rayon, each block on one thread), so a row of `sims` is the complete similarity row of
/// its query and every score in it, the query's target included, is computed the same way.
/// Results are in query order.
pub(crate) fn for_each_similarity_row<T: Send>(
    unit: &[f32],
    d: usize,
    queries: &[u32],
    candidates: &[f32],
    per_row: impl Fn(usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    let n = candidates.len().checked_div(d).unwrap_or(0);
    if queries.is_empty() {
        return Vec::new();
    }
    let block = (SIMILARITY_BUDGET / n.max(1)).clamp(1, MAX_QUERY_BLOCK);
    let blocks: Vec<Vec<T>> = queries
        .par_chunks(block)
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(rows, sims): &mut (Vec<f32>, Vec<f32>), (b, ids)| {
                rows.clear();
                for &q in ids {
                    rows.extend_from_slice(&unit[q as usize * d..(q as usize + 1) * d]);
                }
                sims.resize(ids.len() * n, 0.0);
                matmul(
                    sims,
                    ids.len(),
                    n,
                    d,
                    false,
                    Operand::rows(rows, d),
                    Operand::transposed(candidates, d),
                    false,
                );
                (0..ids.len())
                    .map(|i| per_row(b * block + i, &sims[i * n..(i + 1) * n]))
                    .collect()
            },
        )
        .collect();
    blocks.into_iter().flatten().collect()
}

/// `f32::total_cmp` as an integer key: `key(a) < key(b)` iff `a.total_cmp(&b)` is `Less`.
#[inline]
fn order_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The `k` best `(similarity, id)` of a similarity row over `ids` (ascending), skipping
/// `exclude`: higher similarity first, ties to the lower id (the first seen). `best` is
/// cleared and refilled, best first.
fn top_k(sims: &[f32], ids: &[u32], exclude: u32, k: usize, best: &mut Vec<(i32, u32)>) {
    best.clear();
    for (&s, &c) in sims.iter().zip(ids) {
        let key = order_key(s);
        if best.len() == k {
            // strictly better than the worst kept; an equal one has a higher id and loses
            if key <= best[k - 1].0 {
                continue;
            }
            if c == exclude {
                continue;
            }
            best.pop();
        } else if c == exclude {
            continue;
        }
        let at = best.partition_point(|b| b.0 >= key);
        best.insert(at, (key, c));
    }
}

/// Mean over `queries` of the fraction of each query's `k` nearest neighbours that share its
/// label.
///
/// * Neighbours are the OTHER labelled entities of the whole table (every row `e` with
///   `labels[e].is_some()`, whatever split it is in), ranked by cosine similarity to the query,
///   ties broken by the lower entity id, so the result is deterministic.
/// * When fewer than `k` other labelled entities exist, all of them are retrieved and the
///   precision divides by the number actually retrieved, not by `k`.
/// * Returns NaN when nothing can be scored (no queries, `k == 0`, or a single labelled entity).
///
/// Cost: the similarities are blocked gemm products (see [`crate::reference`] for the
/// pair-by-pair version it replaced, whose figures it reproduces up to float rounding of the
/// dot products), followed by a one-pass top-`k` selection per query; memory is bounded by
/// blocks of query rows, never `queries x rows`.
///
/// Panics if `labels.len() != x.rows`, or a query is out of range or unlabelled (programming
/// errors: queries come from a [`crate::LabelSplit`]).
/// Checks the inputs of a KNN@k evaluation and returns the labelled candidates and the `k`
/// that fits them; `None` when there is nothing to score (no query, or no neighbour).
pub(crate) fn knn_candidates(
    x: &Matrix,
    labels: &[Option<u32>],
    queries: &[u32],
    k: usize,
) -> Option<(Vec<u32>, usize)> {
    assert_eq!(labels.len(), x.rows, "knn: labels length vs table rows");
    for &q in queries {
        assert!(
            labels.get(q as usize).is_some_and(Option::is_some),
            "knn: query entity {q} is out of range or unlabelled"
        );
    }
    let candidates: Vec<u32> = (0..x.rows as u32)
        .filter(|&e| labels[e as usize].is_some())
        .collect();
    let k_eff = k.min(candidates.len().saturating_sub(1));
    (!queries.is_empty() && k_eff > 0).then_some((candidates, k_eff))
}

pub fn knn_precision_at_k(x: &Matrix, labels: &[Option<u32>], queries: &[u32], k: usize) -> f64 {
    let Some((candidates, k_eff)) = knn_candidates(x, labels, queries, k) else {
        return f64::NAN;
    };
    let unit = normalised_rows(x);
    let d = x.cols;
    let mut packed = Vec::with_capacity(candidates.len() * d);
    for &c in &candidates {
        packed.extend_from_slice(&unit[c as usize * d..(c as usize + 1) * d]);
    }
    let precisions = for_each_similarity_row(&unit, d, queries, &packed, |i, sims| {
        let q = queries[i];
        let mut best = Vec::with_capacity(k_eff + 1);
        top_k(sims, &candidates, q, k_eff, &mut best);
        let label = labels[q as usize];
        let same = best
            .iter()
            .filter(|(_, c)| labels[*c as usize] == label)
            .count();
        same as f64 / k_eff as f64
    });
    precisions.iter().sum::<f64>() / queries.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six 2-D points, angles in degrees from the x axis (cosine only sees angles):
    ///   id 0: 0°   label A      id 3: 90°  label B
    ///   id 1: 10°  label A      id 4: 100° label B
    ///   id 2: 50°  label B      id 5: 180° label A
    /// plus id 6 at 5°, unlabelled (must never be retrieved).
    fn six_points() -> (Matrix, Vec<Option<u32>>) {
        let deg = [0.0f32, 10.0, 50.0, 90.0, 100.0, 180.0, 5.0];
        let mut data = Vec::new();
        for (i, d) in deg.iter().enumerate() {
            let r = d.to_radians();
            // different lengths: cosine must not care
            let len = 1.0 + i as f32;
            data.extend_from_slice(&[len * r.cos(), len * r.sin()]);
        }
        let (a, b) = (Some(0), Some(1));
        (Matrix::from_vec(7, 2, data), vec![a, a, b, b, b, a, None])
    }

    #[test]
    fn exact_precision_on_hand_points() {
        let (x, labels) = six_points();
        // k = 2 nearest labelled others, by angular distance:
        //   0 (0°):   1 (10°), 2 (50°)      -> A,B   -> 1/2
        //   1 (10°):  0 (10), 2 (40)        -> A,B   -> 1/2
        //   2 (50°):  1 (40), 3 (40)        -> A,B   -> 1/2 (both kept at k = 2)
        //   3 (90°):  4 (10), 2 (40)        -> B,B   -> 1
        //   4 (100°): 3 (10), 2 (50)        -> B,B   -> 1
        //   5 (180°): 4 (80), 3 (90)        -> B,B   -> 0
        // mean over all six = (0.5 + 0.5 + 0.5 + 1 + 1 + 0) / 6 = 3.5 / 6
        let all = [0, 1, 2, 3, 4, 5];
        let p = knn_precision_at_k(&x, &labels, &all, 2);
        assert!((p - 3.5 / 6.0).abs() < 1e-12, "{p}");
        // k = 1 for queries 0, 5: 0 -> 1 (A, hit), 5 -> 4 (B, miss) -> 0.5
        assert!((knn_precision_at_k(&x, &labels, &[0, 5], 1) - 0.5).abs() < 1e-12);
        // k = 3 for query 3 (90°): 4 (10°), 2 (40°), 1 (80°) -> B,B,A -> 2/3
        assert!((knn_precision_at_k(&x, &labels, &[3], 3) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn tie_breaks_by_lower_id() {
        // query 0 at 45°; ids 1 (on the y axis) and 2 (on the x axis) are at exactly the same
        // cosine (the products are bit-identical); id 3 points away.
        let x = Matrix::from_vec(4, 2, vec![1.0, 1.0, 0.0, 2.0, 3.0, 0.0, -1.0, -1.0]);
        let labels = [Some(0), Some(0), Some(1), Some(1)];
        assert_eq!(knn_precision_at_k(&x, &labels, &[0], 1), 1.0);
        // swap the labels of the tied pair: id 1 still wins the tie, now a miss
        let labels = [Some(0), Some(1), Some(0), Some(1)];
        assert_eq!(knn_precision_at_k(&x, &labels, &[0], 1), 0.0);
    }

    #[test]
    fn k_larger_than_available_divides_by_retrieved() {
        let (x, labels) = six_points();
        // only 5 other labelled entities exist: query 0 retrieves 1,2,3,4,5 -> A,B,B,B,A = 2/5
        let p = knn_precision_at_k(&x, &labels, &[0], 100);
        assert!((p - 2.0 / 5.0).abs() < 1e-12, "{p}");
        // a single labelled entity: nothing to retrieve
        let lone = vec![Some(0), None, None, None, None, None, None];
        assert!(knn_precision_at_k(&x, &lone, &[0], 10).is_nan());
        assert!(knn_precision_at_k(&x, &labels, &[], 10).is_nan());
    }

    #[test]
    fn blocked_matches_naive_on_many_queries() {
        // more queries than one block, random-ish points: compare against a full sort
        let n = 150;
        let d = 5;
        let data: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 10.0)
            .collect();
        let x = Matrix::from_vec(n, d, data);
        let labels: Vec<Option<u32>> = (0..n)
            .map(|e| {
                if e % 11 == 0 {
                    None
                } else {
                    Some((e % 3) as u32)
                }
            })
            .collect();
        let queries: Vec<u32> = (0..n as u32)
            .filter(|&e| labels[e as usize].is_some())
            .collect();
        let k = 10;
        let unit = normalised_rows(&x);
        let mut naive = 0.0;
        for &q in &queries {
            let mut c: Vec<(f32, u32)> = queries
                .iter()
                .filter(|&&e| e != q)
                .map(|&e| {
                    (
                        dot(&unit[q as usize * d..][..d], &unit[e as usize * d..][..d]),
                        e,
                    )
                })
                .collect();
            c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            naive += c[..k]
                .iter()
                .filter(|(_, e)| labels[*e as usize] == labels[q as usize])
                .count() as f64
                / k as f64;
        }
        naive /= queries.len() as f64;
        let got = knn_precision_at_k(&x, &labels, &queries, k);
        assert!((got - naive).abs() < 1e-12, "{got} vs {naive}");
    }

    #[test]
    fn matches_the_reference_on_a_random_table() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, d) = (700, 24);
        let data: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Matrix::from_vec(n, d, data);
        let labels: Vec<Option<u32>> = (0..n)
            .map(|_| rng.random_bool(0.9).then(|| rng.random_range(0..4)))
            .collect();
        let queries: Vec<u32> = (0..n as u32)
            .filter(|&e| labels[e as usize].is_some())
            .step_by(2)
            .collect();
        for k in [1, 10, 50] {
            let fast = knn_precision_at_k(&x, &labels, &queries, k);
            let slow = crate::reference::knn_precision_at_k(&x, &labels, &queries, k);
            assert!((fast - slow).abs() < 1e-12, "k {k}: {fast} vs {slow}");
        }
    }

    #[test]
    #[should_panic(expected = "unlabelled")]
    fn unlabelled_query_panics() {
        let (x, labels) = six_points();
        knn_precision_at_k(&x, &labels, &[6], 2);
    }
}
