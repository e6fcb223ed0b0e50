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
/// `||q - e||`), removing the known answers `known` (sorted) other than `answer`: one pass over
/// the table per ranking. The oracle of [`reference::query_ranks`].
fn rank_one(entities: &Matrix, norm: Norm, q: &[f32], answer: u32, known: &[u32]) -> f64 {
    let n = entities.rows;
    let d_true = dist(norm, q, entities.row(answer as usize));
    if d_true.is_nan() {
        return worst_rank(n, answer, known);
    }
    let mut better = 0usize;
    let mut ties = 0usize;
    for e in 0..n {
        let d = dist(norm, q, entities.row(e));
        better += (d < d_true) as usize;
        ties += (d == d_true) as usize;
    }
    realistic_rank(entities, norm, q, d_true, answer, known, better, ties)
}

/// The rank of a true answer whose distance is NaN: the number of remaining candidates.
fn worst_rank(n: usize, answer: u32, known: &[u32]) -> f64 {
    let removed = known
        .iter()
        .filter(|&&e| e != answer && (e as usize) < n)
        .count();
    (n - removed) as f64
}

/// `1 + better + ties / 2` once the known answers other than `answer` are taken back out of
/// the counts made over the whole table (`better`, `ties` include every entity, the answer
/// among the ties).
#[allow(clippy::too_many_arguments)]
fn realistic_rank(
    entities: &Matrix,
    norm: Norm,
    q: &[f32],
    d_true: f32,
    answer: u32,
    known: &[u32],
    mut better: usize,
    mut ties: usize,
) -> f64 {
    let n = entities.rows;
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

/// Rankings scored together in one pass over the entity table: their query vectors (64 x 128
/// floats = 32 KiB) stay in cache while the table streams past once.
const QUERY_BLOCK: usize = 64;
/// Entity rows per tile inside a pass: a tile (128 KiB at width 128) stays in L2 while every
/// query of the block is scored against it.
const ENTITY_TILE: usize = 256;

/// One ranking of a block (its query vector is the same-numbered row of the block's query
/// buffer): the true answer and the known answers to filter.
struct Ranking<'a> {
    answer: u32,
    known: &'a [u32],
}

/// Filtered realistic ranks of every query triple, batched: the rankings (two per triple) are
/// grouped in blocks of [`QUERY_BLOCK`], each block makes one pass over the entity table in
/// tiles, and the blocks run in parallel on rayon. Distances are computed exactly as
/// [`reference::query_ranks`] computes them (same per-lane sums, same reduction order, no FMA
/// contraction of the squares), so the ranks are identical, not just close. On x86-64 with
/// AVX2 and FMA the inner kernel scores 4 queries x 2 entities at a time in registers.
///
/// Panics if the entity and relation widths differ or an id is out of range.
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
    // Rankings 2i (tail side of query i) and 2i + 1 (head side).
    let ranks: Vec<f64> = queries
        .par_chunks(QUERY_BLOCK / 2)
        .flat_map_iter(|block| {
            let mut qv = Vec::with_capacity(2 * block.len() * d);
            let mut rankings = Vec::with_capacity(2 * block.len());
            for t in block {
                let h = entities.row(t.h as usize);
                let r = relations.row(t.r as usize);
                let tt = entities.row(t.t as usize);
                qv.extend(h.iter().zip(r).map(|(a, b)| a + b));
                rankings.push(Ranking {
                    answer: t.t,
                    known: filter.tails(t.h, t.r),
                });
                qv.extend(tt.iter().zip(r).map(|(a, b)| a - b));
                rankings.push(Ranking {
                    answer: t.h,
                    known: filter.heads(t.r, t.t),
                });
            }
            rank_block(entities, norm, &qv, &rankings)
        })
        .collect();
    ranks
        .chunks_exact(2)
        .map(|p| QueryRanks {
            tail: p[0],
            head: p[1],
        })
        .collect()
}

/// Ranks of one block of rankings (query vectors `qv`, row-major) in one pass over the table.
fn rank_block(entities: &Matrix, norm: Norm, qv: &[f32], rankings: &[Ranking<'_>]) -> Vec<f64> {
    let d = entities.cols;
    let n = entities.rows;
    let nq = rankings.len();
    let d_true: Vec<f32> = rankings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            dist(
                norm,
                &qv[i * d..(i + 1) * d],
                entities.row(r.answer as usize),
            )
        })
        .collect();
    let mut better = vec![0usize; nq];
    let mut ties = vec![0usize; nq];
    let kernel = kernel::Kernel::detect();
    for e0 in (0..n).step_by(ENTITY_TILE) {
        let e1 = (e0 + ENTITY_TILE).min(n);
        let tile = &entities.data[e0 * d..e1 * d];
        kernel.count(norm, d, qv, &d_true, tile, &mut better, &mut ties);
    }
    rankings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if d_true[i].is_nan() {
                worst_rank(n, r.answer, r.known)
            } else {
                realistic_rank(
                    entities,
                    norm,
                    &qv[i * d..(i + 1) * d],
                    d_true[i],
                    r.answer,
                    r.known,
                    better[i],
                    ties[i],
                )
            }
        })
        .collect()
}

/// The distance kernels: `count` adds, for every query `i` and every entity row of a tile,
/// `d < d_true[i]` to `better[i]` and `d == d_true[i]` to `ties[i]`, with `d` computed
/// bit-for-bit as [`dist`] computes it.
mod kernel {
    use super::{dist, Norm};

    #[derive(Clone, Copy)]
    pub(super) enum Kernel {
        Portable,
        #[cfg(target_arch = "x86_64")]
        Avx2Fma,
    }

    impl Kernel {
        pub(super) fn detect() -> Self {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2Fma;
            }
            Kernel::Portable
        }

        #[allow(clippy::too_many_arguments)]
        pub(super) fn count(
            self,
            norm: Norm,
            d: usize,
            qv: &[f32],
            d_true: &[f32],
            tile: &[f32],
            better: &mut [usize],
            ties: &mut [usize],
        ) {
            match self {
                Kernel::Portable => portable(norm, d, qv, d_true, tile, better, ties),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Fma => {
                    // SAFETY: the CPU supports AVX2 and FMA (checked in `detect`).
                    unsafe { avx2::count(norm, d, qv, d_true, tile, better, ties) }
                }
            }
        }
    }

    /// Queries `i` in `from..` against all rows of `tile`, one distance at a time.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn portable_from(
        from: usize,
        norm: Norm,
        d: usize,
        qv: &[f32],
        d_true: &[f32],
        tile: &[f32],
        better: &mut [usize],
        ties: &mut [usize],
    ) {
        for i in from..d_true.len() {
            let q = &qv[i * d..(i + 1) * d];
            let t = d_true[i];
            for row in tile.chunks_exact(d) {
                let x = dist(norm, q, row);
                better[i] += (x < t) as usize;
                ties[i] += (x == t) as usize;
            }
        }
    }

    fn portable(
        norm: Norm,
        d: usize,
        qv: &[f32],
        d_true: &[f32],
        tile: &[f32],
        better: &mut [usize],
        ties: &mut [usize],
    ) {
        portable_from(0, norm, d, qv, d_true, tile, better, ties);
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::{dist, portable_from, Norm};

        /// Queries per register block.
        const QR: usize = 4;

        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn count(
            norm: Norm,
            d: usize,
            qv: &[f32],
            d_true: &[f32],
            tile: &[f32],
            better: &mut [usize],
            ties: &mut [usize],
        ) {
            let nq = d_true.len();
            let rows = tile.len() / d;
            let full = nq / QR * QR;
            for g in (0..full).step_by(QR) {
                let q = &qv[g * d..(g + QR) * d];
                // lanes [q0 e0, q0 e1, q1 e0, q1 e1, q2 e0, q2 e1, q3 e0, q3 e1]
                let t = _mm256_setr_ps(
                    d_true[g],
                    d_true[g],
                    d_true[g + 1],
                    d_true[g + 1],
                    d_true[g + 2],
                    d_true[g + 2],
                    d_true[g + 3],
                    d_true[g + 3],
                );
                let mut nb = _mm256_setzero_si256();
                let mut nt = _mm256_setzero_si256();
                let pairs = rows / 2 * 2;
                for e in (0..pairs).step_by(2) {
                    let dv = match norm {
                        Norm::L1 => distances::<true>(d, q, &tile[e * d..(e + 2) * d]),
                        Norm::L2 => distances::<false>(d, q, &tile[e * d..(e + 2) * d]),
                    };
                    // a true comparison is all ones, i.e. -1 as an integer
                    nb = _mm256_sub_epi32(
                        nb,
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(dv, t)),
                    );
                    nt = _mm256_sub_epi32(
                        nt,
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(dv, t)),
                    );
                }
                let mut b = [0i32; 8];
                let mut c = [0i32; 8];
                _mm256_storeu_si256(b.as_mut_ptr().cast(), nb);
                _mm256_storeu_si256(c.as_mut_ptr().cast(), nt);
                for k in 0..QR {
                    better[g + k] += (b[2 * k] + b[2 * k + 1]) as usize;
                    ties[g + k] += (c[2 * k] + c[2 * k + 1]) as usize;
                }
                if pairs < rows {
                    let row = &tile[pairs * d..(pairs + 1) * d];
                    for k in 0..QR {
                        let x = dist(norm, &q[k * d..(k + 1) * d], row);
                        better[g + k] += (x < d_true[g + k]) as usize;
                        ties[g + k] += (x == d_true[g + k]) as usize;
                    }
                }
            }
            portable_from(full, norm, d, qv, d_true, tile, better, ties);
        }

        /// The 8 distances of queries `q` (4 rows) to entity rows `e` (2 rows), in the lane
        /// order of [`count`]. Per pair: 8 lane sums of `|q - e|` (L1) or `(q - e)^2` (L2) over
        /// the 8-wide chunks, reduced `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`, then
        /// the leftover columns added one by one: exactly `transe::lanes2`. The accumulation
        /// `acc + x` is issued as `fma(x, 1, acc)`, which rounds once and is therefore the same
        /// sum, but runs on the multiply ports and leaves the add ports to the subtractions.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn distances<const L1: bool>(d: usize, q: &[f32], e: &[f32]) -> __m256 {
            debug_assert!(q.len() == QR * d && e.len() == 2 * d);
            let sign = _mm256_set1_ps(-0.0);
            let one = _mm256_set1_ps(1.0);
            let mut acc = [_mm256_setzero_ps(); 8];
            let chunks = d / 8;
            let (qp, ep) = (q.as_ptr(), e.as_ptr());
            for c in 0..chunks {
                let o = c * 8;
                let e0 = _mm256_loadu_ps(ep.add(o));
                let e1 = _mm256_loadu_ps(ep.add(d + o));
                for k in 0..QR {
                    let qk = _mm256_loadu_ps(qp.add(k * d + o));
                    let x0 = _mm256_sub_ps(qk, e0);
                    let x1 = _mm256_sub_ps(qk, e1);
                    if L1 {
                        let a0 = _mm256_andnot_ps(sign, x0);
                        let a1 = _mm256_andnot_ps(sign, x1);
                        acc[2 * k] = _mm256_fmadd_ps(a0, one, acc[2 * k]);
                        acc[2 * k + 1] = _mm256_fmadd_ps(a1, one, acc[2 * k + 1]);
                    } else {
                        let s0 = _mm256_mul_ps(x0, x0);
                        let s1 = _mm256_mul_ps(x1, x1);
                        acc[2 * k] = _mm256_add_ps(acc[2 * k], s0);
                        acc[2 * k + 1] = _mm256_add_ps(acc[2 * k + 1], s1);
                    }
                }
            }
            // the reduction tree of lanes2, for 8 accumulators at once
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h45 = _mm256_hadd_ps(acc[4], acc[5]);
            let h67 = _mm256_hadd_ps(acc[6], acc[7]);
            let g0 = _mm256_hadd_ps(h01, h23);
            let g1 = _mm256_hadd_ps(h45, h67);
            let lo = _mm256_permute2f128_ps::<0x20>(g0, g1);
            let hi = _mm256_permute2f128_ps::<0x31>(g0, g1);
            let mut s = _mm256_add_ps(lo, hi);
            let rest = chunks * 8;
            if rest < d {
                let mut v = [0f32; 8];
                _mm256_storeu_ps(v.as_mut_ptr(), s);
                for k in 0..QR {
                    for j in 0..2 {
                        let (qr, er) = (&q[k * d..(k + 1) * d], &e[j * d..(j + 1) * d]);
                        let mut x = v[2 * k + j];
                        for (a, b) in qr[rest..].iter().zip(&er[rest..]) {
                            let t = a - b;
                            x += if L1 { t.abs() } else { t * t };
                        }
                        v[2 * k + j] = x;
                    }
                }
                s = _mm256_loadu_ps(v.as_ptr());
            }
            s
        }
    }
}

/// The straightforward scorer, one pass over the table per ranking: the oracle of the tests
/// and the baseline of the benchmarks.
pub mod reference {
    use super::*;

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

    /// [`super::evaluate`] with the reference scorer.
    pub fn evaluate(
        entities: &Matrix,
        relations: &Matrix,
        norm: Norm,
        queries: &[Triple],
        filter: &FilterIndex,
    ) -> LinkPredictionMetrics {
        metrics_from_ranks(&query_ranks(entities, relations, norm, queries, filter))
    }
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
