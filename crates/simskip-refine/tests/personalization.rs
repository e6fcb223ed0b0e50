//! What federated personalisation asks of the trainer: FedBN's import that keeps BatchNorm
//! local, and FedProx's proximal term (fast backend; the candle backend refuses it).

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use simskip_data::Matrix;
use simskip_refine::{Backend, Param, SimSkipConfig, SimSkipTrainer, PARAMS};

fn data(rows: usize, d: usize, seed: u64) -> Matrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = (0..rows * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Matrix::from_vec(rows, d, v)
}

fn trainer(seed: u64, backend: Backend) -> SimSkipTrainer {
    SimSkipTrainer::new(
        16,
        SimSkipConfig {
            seed,
            backend,
            batch_size: 32,
            fast_threads: 1,
            ..SimSkipConfig::default()
        },
    )
    .unwrap()
}

fn is_bn(p: Param) -> bool {
    p.spec().kind.is_batch_norm()
}

#[test]
fn import_keeping_batch_norm_installs_everything_else() {
    let mut mine = trainer(1, Backend::Fast);
    let mut theirs = trainer(2, Backend::Fast);
    mine.train_epoch(&data(128, 16, 3), None).unwrap();
    // Shifted data: other BatchNorm statistics.
    let mut other = data(128, 16, 4);
    other.data.iter_mut().for_each(|v| *v = *v * 3.0 + 1.0);
    theirs.train_epoch(&other, None).unwrap();
    let before = mine.weights().clone();
    let global = theirs.export();
    mine.import_keeping(&global, is_bn).unwrap();
    let mut bn = 0;
    for spec in &PARAMS {
        let now = mine.weights().get(spec.param);
        if is_bn(spec.param) {
            bn += 1;
            assert_eq!(now, before.get(spec.param), "{} stays local", spec.name);
        } else {
            assert_eq!(
                now,
                theirs.weights().get(spec.param),
                "{} installed",
                spec.name
            );
        }
        assert_ne!(
            before.get(spec.param),
            theirs.weights().get(spec.param),
            "{} differs between the two, so the check means something",
            spec.name
        );
    }
    assert_eq!(bn, 8, "two BatchNorm layers: scale, shift, mean, variance");
    // Bad arrays are refused and change nothing.
    let snapshot = mine.weights().clone();
    assert!(mine.import_keeping(&global[1..], is_bn).is_err());
    assert_eq!(mine.weights(), &snapshot);
}

/// Squared distance of the trained parameters from `anchor`.
fn drift(t: &SimSkipTrainer, anchor: &[f32]) -> f64 {
    t.weights()
        .trainable()
        .iter()
        .zip(anchor)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum()
}

#[test]
fn proximal_term_holds_the_local_copy_near_its_anchor() {
    let x = data(256, 16, 7);
    let mut free = trainer(1, Backend::Fast);
    let mut held = trainer(1, Backend::Fast);
    let anchor = held.weights().trainable().to_vec();
    held.anchor_proximal(Some(1e4)).unwrap();
    for _ in 0..3 {
        free.train_epoch(&x, None).unwrap();
        held.train_epoch(&x, None).unwrap();
    }
    let (df, dh) = (drift(&free, &anchor), drift(&held, &anchor));
    assert!(
        df > 0.0 && dh < 0.5 * df,
        "drift with mu {dh} vs without {df}"
    );
    // Removing the term trains freely again.
    held.anchor_proximal(None).unwrap();
}

#[test]
fn the_candle_backend_refuses_the_proximal_term() {
    let mut t = trainer(1, Backend::Candle);
    let e = t.anchor_proximal(Some(0.1)).unwrap_err().to_string();
    assert!(e.contains("fast"), "{e}");
    t.anchor_proximal(None).unwrap();
}
