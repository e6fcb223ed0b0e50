//! KNN same-label precision@k under cosine similarity (the paper's precision@10).

use rayon::prelude::*;
use simskip_data::Matrix;

/// Queries scored together: their rows stay in cache while every candidate row streams past once.
const QUERY_BLOCK: usize = 32;

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
/// Panics if `labels.len() != x.rows`, or a query is out of range or unlabelled (programming
/// errors: queries come from a [`crate::LabelSplit`]).
pub fn knn_precision_at_k(x: &Matrix, labels: &[Option<u32>], queries: &[u32], k: usize) -> f64 {
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
    if queries.is_empty() || k_eff == 0 {
        return f64::NAN;
    }
    let unit = normalised_rows(x);
    let d = x.cols;
    let row = |e: u32| &unit[e as usize * d..(e as usize + 1) * d];

    let per_block: Vec<f64> = queries
        .par_chunks(QUERY_BLOCK)
        .map(|block| {
            // sims[qi * n + ci] = cos(query qi, candidate ci)
            let n = candidates.len();
            let mut sims = vec![0f32; block.len() * n];
            for (ci, &c) in candidates.iter().enumerate() {
                let rc = row(c);
                for (qi, &q) in block.iter().enumerate() {
                    sims[qi * n + ci] = dot(row(q), rc);
                }
            }
            let mut scratch: Vec<(f32, u32)> = Vec::with_capacity(n);
            let mut sum = 0.0;
            for (qi, &q) in block.iter().enumerate() {
                scratch.clear();
                scratch.extend(
                    candidates
                        .iter()
                        .zip(&sims[qi * n..(qi + 1) * n])
                        .filter(|(&c, _)| c != q)
                        .map(|(&c, &s)| (s, c)),
                );
                // best first: higher similarity, then lower id
                let order =
                    |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                if k_eff < scratch.len() {
                    scratch.select_nth_unstable_by(k_eff - 1, order);
                }
                let label = labels[q as usize];
                let same = scratch[..k_eff]
                    .iter()
                    .filter(|(_, c)| labels[*c as usize] == label)
                    .count();
                sum += same as f64 / k_eff as f64;
            }
            sum
        })
        .collect();
    per_block.iter().sum::<f64>() / queries.len() as f64
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
    #[should_panic(expected = "unlabelled")]
    fn unlabelled_query_panics() {
        let (x, labels) = six_points();
        knn_precision_at_k(&x, &labels, &[6], 2);
    }
}
