//! Finite-difference checks of the hand-written TransE gradients.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::{Matrix, Triple};
use simskip_kge::transe::{batch_loss, batch_loss_and_gradients, Gradients};
use simskip_kge::{Loss, Norm, TransE};

const NE: usize = 6;
const NR: usize = 2;
const DIM: usize = 5;

fn tr(h: u32, r: u32, t: u32) -> Triple {
    Triple { h, r, t }
}

fn batch() -> (Vec<Triple>, Vec<Triple>) {
    // Three positives with three negatives each (entity 0 appears in several roles).
    let pos = vec![tr(0, 0, 1), tr(2, 1, 3), tr(4, 0, 0)];
    let neg = vec![
        tr(0, 0, 2),
        tr(5, 0, 1),
        tr(0, 0, 3),
        tr(2, 1, 0),
        tr(1, 1, 3),
        tr(2, 1, 5),
        tr(4, 0, 1),
        tr(3, 0, 0),
        tr(4, 0, 5),
    ];
    (pos, neg)
}

fn residual_min_abs(m: &TransE, t: Triple) -> (f32, f32) {
    let (h, r, tt) = (
        m.entities.row(t.h as usize),
        m.relations.row(t.r as usize),
        m.entities.row(t.t as usize),
    );
    let e: Vec<f32> = (0..DIM).map(|k| h[k] + r[k] - tt[k]).collect();
    let min_abs = e.iter().map(|v| v.abs()).fold(f32::INFINITY, f32::min);
    let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
    (min_abs, norm)
}

/// A model (from the first suitable seed) whose residuals stay well away from the kinks:
/// every residual coordinate |e_k| > 0.05 (L1) and, for the margin loss, every hinge
/// `margin + d(pos) - d(neg)` farther than 0.05 from zero.
fn model(norm: Norm, loss: Loss) -> TransE {
    let (pos, neg) = batch();
    let k = neg.len() / pos.len();
    for seed in 0.. {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw = |n| {
            Matrix::from_vec(
                n,
                DIM,
                (0..n * DIM).map(|_| rng.random_range(-1.0..1.0)).collect(),
            )
        };
        let m = TransE {
            entities: draw(NE),
            relations: draw(NR),
            norm,
        };
        let ok_resid = pos
            .iter()
            .chain(&neg)
            .all(|&t| residual_min_abs(&m, t).0 > 0.05 && residual_min_abs(&m, t).1 > 0.1);
        let ok_hinge = match loss {
            Loss::MarginRanking { margin } => pos.iter().enumerate().all(|(i, &p)| {
                neg[i * k..(i + 1) * k]
                    .iter()
                    .all(|&n| (margin + m.distance(p) - m.distance(n)).abs() > 0.05)
            }),
            Loss::SelfAdversarial { .. } => true,
        };
        if ok_resid && ok_hinge {
            return m;
        }
    }
    unreachable!()
}

/// Central differences of `f` w.r.t. every parameter, compared with the analytic gradient.
fn check(norm: Norm, loss: Loss, f: impl Fn(&TransE) -> f32) {
    let (pos, neg) = batch();
    let m = model(norm, loss);
    let mut g = Gradients::for_model(&m);
    let l = batch_loss_and_gradients(&m, loss, &pos, &neg, &mut g);
    assert!((l - batch_loss(&m, loss, &pos, &neg)).abs() < 1e-6);
    let eps = 1e-2f32; // residual coordinates are > 0.05 away from kinks
    let mut worst = 0.0f32;
    let mut nonzero = 0;
    for (is_rel, rows) in [(false, NE), (true, NR)] {
        for row in 0..rows {
            let analytic: Vec<f32> = if is_rel {
                g.relations.get(row as u32).map(<[f32]>::to_vec)
            } else {
                g.entities.get(row as u32).map(<[f32]>::to_vec)
            }
            .unwrap_or(vec![0.0; DIM]);
            for (k, &an) in analytic.iter().enumerate() {
                let mut plus = m.clone();
                let mut minus = m.clone();
                fn tab(mm: &mut TransE, is_rel: bool) -> &mut Matrix {
                    if is_rel {
                        &mut mm.relations
                    } else {
                        &mut mm.entities
                    }
                }
                tab(&mut plus, is_rel).row_mut(row)[k] += eps;
                tab(&mut minus, is_rel).row_mut(row)[k] -= eps;
                let numeric = (f(&plus) as f64 - f(&minus) as f64) / (2.0 * eps as f64);
                let err = (numeric as f32 - an).abs();
                worst = worst.max(err);
                assert!(
                    err < 2e-3 + 1e-2 * an.abs(),
                    "{norm:?} {loss:?} {} row {row} coord {k}: analytic {} numeric {numeric}",
                    if is_rel { "relation" } else { "entity" },
                    an
                );
                nonzero += (an.abs() > 1e-4) as usize;
            }
        }
    }
    assert!(
        nonzero > 20,
        "gradient suspiciously sparse ({nonzero} non-zero entries)"
    );
    eprintln!("{norm:?} {loss:?}: worst |analytic - numeric| = {worst:e}");
}

#[test]
fn margin_ranking_gradients() {
    let (pos, neg) = batch();
    for norm in [Norm::L1, Norm::L2] {
        // margin 2 keeps all hinges active for most seeds; margin 0.3 leaves some inactive.
        for margin in [2.0, 0.3] {
            let loss = Loss::MarginRanking { margin };
            check(norm, loss, |m| batch_loss(m, loss, &pos, &neg));
        }
    }
}

/// The self-adversarial weights are detached, so the analytic gradient is that of the loss
/// with the softmax weights held at their current values: recompute that loss by hand.
fn self_adversarial_fixed_weights(m: &TransE, at: &TransE, gamma: f32, temp: f32) -> f32 {
    let (pos, neg) = batch();
    let k = neg.len() / pos.len();
    let ls = |x: f32| -> f64 { -((-x as f64).exp().ln_1p()) };
    let mut total = 0.0f64;
    for (i, &p) in pos.iter().enumerate() {
        let negs = &neg[i * k..(i + 1) * k];
        let w: Vec<f64> = negs
            .iter()
            .map(|&n| (temp as f64 * (gamma - at.distance(n)) as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut l = -ls(gamma - m.distance(p));
        for (j, &n) in negs.iter().enumerate() {
            l -= w[j] / z * ls(m.distance(n) - gamma);
        }
        total += l / 2.0;
    }
    (total / pos.len() as f64) as f32
}

#[test]
fn self_adversarial_gradients() {
    for norm in [Norm::L1, Norm::L2] {
        for (gamma, temp) in [(2.0, 1.0), (4.0, 0.5)] {
            let loss = Loss::SelfAdversarial {
                gamma,
                temperature: temp,
            };
            let at = model(norm, loss);
            let (pos, neg) = batch();
            // The hand-written reference agrees with the library's loss value...
            let reference = self_adversarial_fixed_weights(&at, &at, gamma, temp);
            assert!((reference - batch_loss(&at, loss, &pos, &neg)).abs() < 1e-5);
            // ...and its derivative (weights frozen at `at`) with the analytic gradient.
            check(norm, loss, |m| {
                self_adversarial_fixed_weights(m, &at, gamma, temp)
            });
        }
    }
}

#[test]
fn self_adversarial_single_negative_is_exact_gradient() {
    // With one negative the softmax weight is 1, so detaching changes nothing.
    let pos = vec![tr(0, 0, 1), tr(2, 1, 3)];
    let neg = vec![tr(0, 0, 4), tr(5, 1, 3)];
    let loss = Loss::SelfAdversarial {
        gamma: 3.0,
        temperature: 1.0,
    };
    let m = model(Norm::L2, loss);
    let mut g = Gradients::for_model(&m);
    batch_loss_and_gradients(&m, loss, &pos, &neg, &mut g);
    let eps = 1e-2;
    for row in 0..NE {
        for k in 0..DIM {
            let (mut p, mut q) = (m.clone(), m.clone());
            p.entities.row_mut(row)[k] += eps;
            q.entities.row_mut(row)[k] -= eps;
            let numeric =
                (batch_loss(&p, loss, &pos, &neg) - batch_loss(&q, loss, &pos, &neg)) / (2.0 * eps);
            let analytic = g.entities.get(row as u32).map_or(0.0, |r| r[k]);
            assert!(
                (numeric - analytic).abs() < 2e-3,
                "row {row} coord {k}: {analytic} vs {numeric}"
            );
        }
    }
}

#[test]
fn untouched_rows_have_no_gradient() {
    let (pos, neg) = batch();
    let m = model(Norm::L1, Loss::MarginRanking { margin: 2.0 });
    let mut g = Gradients::for_model(&m);
    batch_loss_and_gradients(
        &m,
        Loss::MarginRanking { margin: 2.0 },
        &pos[..1],
        &neg[..3],
        &mut g,
    );
    let mut rows = g.entities.rows().to_vec();
    rows.sort_unstable();
    assert_eq!(rows, vec![0, 1, 2, 3, 5]);
    assert_eq!(g.relations.rows(), &[0]);
    assert!(g.entities.get(4).is_none());
}
