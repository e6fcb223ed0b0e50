//! Where the second view of a positive pair comes from.
//!
//! * [`Positives::Augment`]: both views are independent augmentations of `x_i` (SimCLR).
//! * [`Positives::Neighbour`] (structure-aware): the second view is the embedding of a uniformly
//!   chosen neighbour of `i` in the local training graph, then augmented. An entity without a
//!   neighbour falls back to itself (i.e. to an augmentation of `x_i`).

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{RefineError, Result};

/// Source of the second view of each positive pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positives {
    Augment,
    Neighbour,
}

/// Undirected adjacency lists in CSR form: the neighbours of `i` are
/// `targets[offsets[i]..offsets[i + 1]]`, sorted and without duplicates or self loops.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Neighbours {
    pub offsets: Vec<usize>,
    pub targets: Vec<u32>,
}

impl Neighbours {
    /// Build from edges over entities `0..n` (e.g. `(h, t)` of each training triple). Each edge
    /// links both ways; duplicate edges and self loops are dropped.
    pub fn from_edges(n: usize, edges: &[(u32, u32)]) -> Result<Self> {
        let mut degree = vec![0usize; n];
        for &(a, b) in edges {
            if a as usize >= n || b as usize >= n {
                return Err(RefineError::EdgeOutOfRange(a, b, n));
            }
            if a != b {
                degree[a as usize] += 1;
                degree[b as usize] += 1;
            }
        }
        let mut offsets = vec![0usize; n + 1];
        for i in 0..n {
            offsets[i + 1] = offsets[i] + degree[i];
        }
        let mut fill = offsets.clone();
        let mut targets = vec![0u32; offsets[n]];
        for &(a, b) in edges {
            if a != b {
                targets[fill[a as usize]] = b;
                fill[a as usize] += 1;
                targets[fill[b as usize]] = a;
                fill[b as usize] += 1;
            }
        }
        // Sort and deduplicate each list, compacting in place.
        let mut new_offsets = vec![0usize; n + 1];
        let mut write = 0usize;
        for i in 0..n {
            let (s, e) = (offsets[i], offsets[i + 1]);
            targets[s..e].sort_unstable();
            let mut last: Option<u32> = None;
            for k in s..e {
                let t = targets[k];
                if last != Some(t) {
                    targets[write] = t;
                    write += 1;
                    last = Some(t);
                }
            }
            new_offsets[i + 1] = write;
        }
        targets.truncate(write);
        Ok(Self {
            offsets: new_offsets,
            targets,
        })
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The neighbours of `i`.
    pub fn of(&self, i: usize) -> &[u32] {
        &self.targets[self.offsets[i]..self.offsets[i + 1]]
    }

    /// A uniformly random neighbour of `i`, or `i` itself when it has none.
    pub fn sample(&self, i: usize, rng: &mut StdRng) -> u32 {
        let nb = self.of(i);
        if nb.is_empty() {
            i as u32
        } else {
            nb[rng.random_range(0..nb.len())]
        }
    }
}

/// The row whose embedding gives the second view of each anchor in `batch`: the anchor itself
/// for [`Positives::Augment`]; for [`Positives::Neighbour`], with probability `neighbour_share`
/// a random neighbour (or itself if it has none), else the anchor itself. `Neighbour` without
/// neighbour lists is a configuration error.
pub fn partner_ids(
    kind: Positives,
    neighbour_share: f32,
    batch: &[u32],
    neighbours: Option<&Neighbours>,
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    match kind {
        Positives::Augment => Ok(batch.to_vec()),
        Positives::Neighbour => {
            let nb = neighbours.ok_or_else(|| {
                RefineError::Config("neighbour positives need neighbour lists".to_string())
            })?;
            // A share of 1 draws no coin, so the default keeps its random stream.
            let all = neighbour_share >= 1.0;
            Ok(batch
                .iter()
                .map(|&i| {
                    if all || rng.random::<f32>() < neighbour_share {
                        nb.sample(i as usize, rng)
                    } else {
                        i
                    }
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn csr_is_undirected_deduplicated() {
        let nb = Neighbours::from_edges(5, &[(0, 1), (1, 0), (1, 2), (3, 3), (2, 0)]).unwrap();
        assert_eq!(nb.len(), 5);
        assert_eq!(nb.of(0), &[1, 2]);
        assert_eq!(nb.of(1), &[0, 2]);
        assert_eq!(nb.of(2), &[0, 1]);
        assert!(nb.of(3).is_empty());
        assert!(nb.of(4).is_empty());
    }

    #[test]
    fn out_of_range_edge_is_an_error() {
        assert!(matches!(
            Neighbours::from_edges(3, &[(0, 3)]),
            Err(RefineError::EdgeOutOfRange(0, 3, 3))
        ));
    }

    #[test]
    fn samples_are_neighbours_or_self() {
        let nb = Neighbours::from_edges(4, &[(0, 1), (0, 2)]).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let mut seen = [0usize; 4];
        for _ in 0..1000 {
            let s = nb.sample(0, &mut rng);
            assert!(s == 1 || s == 2);
            seen[s as usize] += 1;
        }
        assert!(seen[1] > 400 && seen[2] > 400);
        assert_eq!(nb.sample(3, &mut rng), 3);
        assert_eq!(nb.sample(1, &mut rng), 0);
    }

    #[test]
    fn the_neighbour_share_sets_how_many_anchors_pair_with_a_neighbour() {
        // Anchor 0 has neighbours 1 and 2 only: a partner equal to 0 is a self pair.
        let nb = Neighbours::from_edges(3, &[(0, 1), (0, 2)]).unwrap();
        let batch = vec![0u32; 4000];
        let self_pairs = |share: f32| {
            let mut rng = StdRng::seed_from_u64(7);
            partner_ids(Positives::Neighbour, share, &batch, Some(&nb), &mut rng)
                .unwrap()
                .iter()
                .filter(|&&p| p == 0)
                .count()
        };
        assert_eq!(self_pairs(1.0), 0);
        assert_eq!(self_pairs(0.0), batch.len());
        // Binomial(4000, 0.75): sd 27, so 6 sd is 164.
        let at_quarter = self_pairs(0.25) as i64;
        assert!((at_quarter - 3000).abs() < 164, "{at_quarter}");
        // Augment ignores the share and the lists.
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(
            partner_ids(Positives::Augment, 0.5, &batch, None, &mut rng).unwrap(),
            batch
        );
    }
}
