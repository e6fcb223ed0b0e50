//! Test inputs built from a real knowledge graph.
//!
//! There is no KGE trainer in this crate, so the "embeddings" are structural features of the
//! WordNet-5k training graph (`data/wordnet-5k/train.tsv`, falling back to Kinships when absent):
//! `X = D⁻¹ (A + I) R`, the row-normalised adjacency with self loops (undirected, relations
//! ignored) times a seeded Gaussian projection `R` (`n × d`, entries N(0, 1/d)).
//! Rows of neighbouring entities share terms, so the table has real graph structure, unlike
//! i.i.d. random vectors.

#![allow(dead_code)]

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use simskip_data::triples::read_triples;
use simskip_data::{Matrix, Vocab};
use simskip_refine::Neighbours;

pub struct Graph {
    pub n: usize,
    pub edges: Vec<(u32, u32)>,
}

fn data_file() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let wn = root.join("wordnet-5k/train.tsv");
    if wn.exists() {
        wn
    } else {
        root.join("kinships/train.tsv")
    }
}

pub fn graph() -> Graph {
    let path = data_file();
    let mut entities = Vocab::new();
    let mut relations = Vocab::new();
    let triples = read_triples(&path, &mut entities, &mut relations)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Graph {
        n: entities.len(),
        edges: triples.iter().map(|t| (t.h, t.t)).collect(),
    }
}

/// `(features, neighbours)` with `d` columns.
pub fn features(d: usize) -> (Matrix, Neighbours) {
    let g = graph();
    let nb = Neighbours::from_edges(g.n, &g.edges).unwrap();
    let mut rng = StdRng::seed_from_u64(1234);
    let scale = 1.0 / (d as f32).sqrt();
    let r: Vec<f32> = (0..g.n * d)
        .map(|_| {
            let e: f32 = StandardNormal.sample(&mut rng);
            scale * e
        })
        .collect();
    let mut x = Matrix::zeros(g.n, d);
    for i in 0..g.n {
        let list = nb.of(i);
        let w = 1.0 / (list.len() + 1) as f32;
        let row = x.row_mut(i);
        for &j in std::iter::once(&(i as u32)).chain(list) {
            for (o, v) in row.iter_mut().zip(&r[j as usize * d..(j as usize + 1) * d]) {
                *o += w * v;
            }
        }
    }
    (x, nb)
}
