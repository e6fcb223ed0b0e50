//! Closed-form relation refitting against hand values and brute force.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::{Matrix, Triple};
use simskip_kge::{refit_relations, Norm, TransE};

fn tr(h: u32, r: u32, t: u32) -> Triple {
    Triple { h, r, t }
}

fn entities() -> Matrix {
    // 2-D entities.
    Matrix::from_vec(
        5,
        2,
        vec![0.0, 0.0, 1.0, 2.0, 3.0, -1.0, 10.0, 4.0, -2.0, 0.5],
    )
}

#[test]
fn hand_values_mean_and_median() {
    let e = entities();
    // Relation 0: t - h = (1,2), (3,-1), (10,4)   -> mean (14/3, 5/3), median (3, 2).
    // Relation 1: t - h = (-2, .5), (1, 2) - (3, -1) = (-2, 3)  -> mean (-2, 1.75),
    //             median (even count: midpoint) (-2, 1.75).
    // Relation 2: no triples -> zeros.
    let triples = [
        tr(0, 0, 1),
        tr(0, 0, 2),
        tr(0, 0, 3),
        tr(0, 1, 4),
        tr(2, 1, 1),
    ];
    let l2 = refit_relations(&e, &triples, 3, Norm::L2);
    assert_eq!((l2.rows, l2.cols), (3, 2));
    assert!((l2.row(0)[0] - 14.0 / 3.0).abs() < 1e-6 && (l2.row(0)[1] - 5.0 / 3.0).abs() < 1e-6);
    assert_eq!(l2.row(1), &[-2.0, 1.75]);
    assert_eq!(l2.row(2), &[0.0, 0.0]);
    let l1 = refit_relations(&e, &triples, 3, Norm::L1);
    assert_eq!(l1.row(0), &[3.0, 2.0]);
    assert_eq!(l1.row(1), &[-2.0, 1.75]);
    assert_eq!(l1.row(2), &[0.0, 0.0]);
}

fn objective(e: &Matrix, rels: &Matrix, triples: &[Triple], norm: Norm) -> f64 {
    let m = TransE {
        entities: e.clone(),
        relations: rels.clone(),
        norm,
    };
    triples
        .iter()
        .map(|&t| {
            let d = m.distance(t) as f64;
            match norm {
                Norm::L1 => d,
                Norm::L2 => d * d, // least squares
            }
        })
        .sum()
}

#[test]
fn refit_beats_every_perturbation() {
    let mut rng = StdRng::seed_from_u64(7);
    let (ne, nr, d) = (30, 3, 4);
    let e = Matrix::from_vec(
        ne,
        d,
        (0..ne * d).map(|_| rng.random_range(-1.0..1.0)).collect(),
    );
    let triples: Vec<Triple> = (0..60)
        .map(|_| {
            tr(
                rng.random_range(0..ne as u32),
                rng.random_range(0..nr as u32),
                rng.random_range(0..ne as u32),
            )
        })
        .collect();
    for norm in [Norm::L1, Norm::L2] {
        let best = refit_relations(&e, &triples, nr, norm);
        let f0 = objective(&e, &best, &triples, norm);
        // Brute force: coordinate perturbations and random directions never improve.
        for _ in 0..300 {
            let mut p = best.clone();
            let scale = [0.3f32, 0.03, 0.003][rng.random_range(0..3)];
            for v in p.data.iter_mut() {
                *v += rng.random_range(-scale..scale);
            }
            assert!(
                objective(&e, &p, &triples, norm) >= f0 - 1e-4,
                "{norm:?}: perturbation improved"
            );
        }
        for i in 0..best.data.len() {
            for delta in [-0.01f32, 0.01] {
                let mut p = best.clone();
                p.data[i] += delta;
                assert!(objective(&e, &p, &triples, norm) >= f0 - 1e-5);
            }
        }
    }
}

#[test]
fn refit_recovers_exact_translations() {
    // Tails built as heads + r exactly: both norms recover r (up to rounding).
    let mut rng = StdRng::seed_from_u64(1);
    let (n, d) = (20, 3);
    let rel = [0.5f32, -1.0, 0.25];
    let mut data: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for i in 0..n / 2 {
        for k in 0..d {
            data[(n / 2 + i) * d + k] = data[i * d + k] + rel[k];
        }
    }
    let e = Matrix::from_vec(n, d, data);
    let triples: Vec<Triple> = (0..n / 2)
        .map(|i| tr(i as u32, 0, (n / 2 + i) as u32))
        .collect();
    for norm in [Norm::L1, Norm::L2] {
        let r = refit_relations(&e, &triples, 1, norm);
        for (got, want) in r.row(0).iter().zip(rel) {
            assert!((got - want).abs() < 1e-5);
        }
    }
}
