//! Relation vectors for a frozen entity table.
//!
//! A refined entity table comes without relation vectors; to run TransE link prediction on
//! it we fit, for every relation `r`, the vector that best translates heads onto tails over
//! the training triples `T_r` of that relation, in closed form:
//!
//! * [`Norm::L1`]: `argmin_r Σ_{(h,t)∈T_r} ||h + r - t||_1` separates over coordinates, each
//!   minimised by the **median** of `(t - h)_k` (for an even count every value between the two
//!   middle ones is optimal; we return their midpoint).
//! * [`Norm::L2`]: the least-squares solution `argmin_r Σ ||h + r - t||_2^2`, i.e. the
//!   coordinate-wise **mean** of `t - h`. (The minimiser of the un-squared sum would be the
//!   geometric median; the mean is the standard, closed-form choice.)
//!
//! Relations without training triples get zero vectors.

use simskip_data::{Matrix, Triple};

use crate::transe::Norm;

/// Fit relation vectors (`num_relations x entities.cols`) to `triples` with `entities` frozen.
pub fn refit_relations(
    entities: &Matrix,
    triples: &[Triple],
    num_relations: usize,
    norm: Norm,
) -> Matrix {
    let d = entities.cols;
    let mut out = Matrix::zeros(num_relations, d);
    match norm {
        Norm::L2 => {
            let mut counts = vec![0usize; num_relations];
            let mut sums = vec![0.0f64; num_relations * d];
            for t in triples {
                let r = t.r as usize;
                assert!(
                    r < num_relations,
                    "relation id {r} >= num_relations {num_relations}"
                );
                counts[r] += 1;
                let (h, tt) = (entities.row(t.h as usize), entities.row(t.t as usize));
                for ((s, &a), &b) in sums[r * d..(r + 1) * d].iter_mut().zip(h).zip(tt) {
                    *s += b as f64 - a as f64;
                }
            }
            for r in 0..num_relations {
                if counts[r] > 0 {
                    let inv = 1.0 / counts[r] as f64;
                    for (o, s) in out.row_mut(r).iter_mut().zip(&sums[r * d..(r + 1) * d]) {
                        *o = (s * inv) as f32;
                    }
                }
            }
        }
        Norm::L1 => {
            // Group triples by relation, then take per-coordinate medians.
            let mut by_rel: Vec<Vec<u32>> = vec![Vec::new(); num_relations];
            for (i, t) in triples.iter().enumerate() {
                let r = t.r as usize;
                assert!(
                    r < num_relations,
                    "relation id {r} >= num_relations {num_relations}"
                );
                by_rel[r].push(i as u32);
            }
            let mut col = Vec::new();
            for (r, ids) in by_rel.iter().enumerate() {
                if ids.is_empty() {
                    continue;
                }
                for k in 0..d {
                    col.clear();
                    col.extend(ids.iter().map(|&i| {
                        let t = triples[i as usize];
                        entities.row(t.t as usize)[k] - entities.row(t.h as usize)[k]
                    }));
                    out.row_mut(r)[k] = median(&mut col);
                }
            }
        }
    }
    out
}

/// Median of a non-empty slice (midpoint of the two middle values for even lengths);
/// reorders the slice.
fn median(v: &mut [f32]) -> f32 {
    let n = v.len();
    let mid = n / 2;
    let (lo, m, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
    let upper = *m;
    if n % 2 == 1 {
        upper
    } else {
        let lower = lo.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ((lower as f64 + upper as f64) / 2.0) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
    }
}
