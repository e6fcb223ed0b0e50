//! The fused fast backend against the candle reference: from the same seed, both trainers draw
//! the same initial weights, views and dropout masks, so their losses, updated weights and
//! BatchNorm running statistics must agree. The candle backend builds its model from the same
//! `Weights` type the fused trainer owns, and writes its variables back into it.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use simskip_data::{Matrix, NamedArray};
use simskip_refine::{Augmentation, Backend, ParamSpec, Positives, SimSkipConfig, SimSkipTrainer};

fn data(rows: usize, d: usize, seed: u64) -> Matrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = (0..rows * d)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Matrix::from_vec(rows, d, v)
}

fn cfg(backend: Backend, skip: bool, zero_init: bool) -> SimSkipConfig {
    SimSkipConfig {
        skip,
        zero_init_residual: zero_init,
        batch_size: 64,
        backend,
        seed: 5,
        ..SimSkipConfig::default()
    }
}

/// The pre-BatchNorm linear biases: BatchNorm subtracts the batch mean, so their true gradient
/// is exactly 0 and both implementations only see rounding noise (~1e-9), which AdamW's
/// `m / (sqrt(v) + 1e-8)` turns into steps of up to `lr` in an arbitrary direction.
fn pre_bn_bias(name: &str) -> bool {
    name == "encoder.layer1.linear.bias" || name == "encoder.layer2.linear.bias"
}

/// Largest violation of `|a − b| <= abs_tol or |a − b| <= rel_tol·|b|`, as
/// `(excess over the tolerance, name, index, a, b)`; `None` if every value is within.
/// Pre-BatchNorm biases are held to `bias_tol` absolute.
fn worst(
    a: &[NamedArray],
    b: &[NamedArray],
    abs_tol: f32,
    rel_tol: f32,
    bias_tol: f32,
) -> Option<(f32, String, usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    let mut out: Option<(f32, String, usize, f32, f32)> = None;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape);
        for (k, (&u, &v)) in x.data.iter().zip(&y.data).enumerate() {
            let diff = (u - v).abs();
            let tol = if pre_bn_bias(&x.name) {
                bias_tol
            } else {
                abs_tol.max(rel_tol * v.abs())
            };
            let outside = diff.is_nan() || diff > tol;
            if outside && out.as_ref().is_none_or(|o| diff / tol > o.0) {
                out = Some((diff / tol, x.name.clone(), k, u, v));
            }
        }
    }
    out
}

/// Largest absolute change of every trained or statistic array (to show the comparison is not
/// between unchanged weights).
fn min_change(before: &[NamedArray], after: &[NamedArray]) -> Vec<(String, f32)> {
    before
        .iter()
        .zip(after)
        .map(|(x, y)| {
            let m = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            (x.name.clone(), m)
        })
        .collect()
}

fn trainable(name: &str) -> bool {
    ParamSpec::by_name(name).unwrap().kind.is_trainable()
}

fn batch(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).map(|i| (i * 7) % 400).collect()
}

#[test]
fn one_step_matches_candle() {
    let x = data(400, 64, 1);
    for skip in [true, false] {
        for zero_init in [true, false] {
            let mut c = SimSkipTrainer::new(64, cfg(Backend::Candle, skip, zero_init)).unwrap();
            let mut f = SimSkipTrainer::new(64, cfg(Backend::Fast, skip, zero_init)).unwrap();
            let w0 = c.export();
            assert_eq!(w0, f.export());
            let b = batch(0, 64);
            let lc = c.train_step(&x, &b, None).unwrap();
            let lf = f.train_step(&x, &b, None).unwrap();
            assert!(
                ((lc - lf) / lc).abs() < 1e-5,
                "skip {skip} zero_init {zero_init}: loss {lc} vs {lf}"
            );
            let (wc, wf) = (c.export(), f.export());
            let bad = worst(&wf, &wc, 1e-5, 1e-4, 2e-3);
            assert!(bad.is_none(), "skip {skip} zero_init {zero_init}: {bad:?}");
            // Non-vacuous: the step moved every array that gets a gradient (and the running
            // statistics) by far more than the tolerance. With a zero-initialised output layer
            // the encoder's layers get exactly zero gradient on the first step (and without the
            // skip the encoder output is constant, so the projector's first weight too).
            for (name, change) in min_change(&w0, &wc) {
                let frozen = zero_init
                    && ((name.starts_with("encoder.layer") && trainable(&name))
                        || (!skip && name == "projector.0.weight"));
                if frozen {
                    assert_eq!(change, 0.0, "{name}");
                } else {
                    assert!(change > 1e-4, "{name} moved only {change}");
                }
            }
        }
    }
}

#[test]
fn several_steps_stay_close() {
    let x = data(400, 64, 2);
    for skip in [true, false] {
        let mut c = SimSkipTrainer::new(64, cfg(Backend::Candle, skip, true)).unwrap();
        let mut f = SimSkipTrainer::new(64, cfg(Backend::Fast, skip, true)).unwrap();
        let w0 = c.export();
        for s in 0..8 {
            let b = batch(s * 64 % 400, 64);
            let lc = c.train_step(&x, &b, None).unwrap();
            let lf = f.train_step(&x, &b, None).unwrap();
            assert!(((lc - lf) / lc).abs() < 1e-4, "step {s}: {lc} vs {lf}");
        }
        let (wc, wf) = (c.export(), f.export());
        let bad = worst(&wf, &wc, 1e-4, 1e-3, 8.0 * 2e-3);
        assert!(bad.is_none(), "skip {skip}: {bad:?}");
        let changes = min_change(&w0, &wc);
        assert!(
            changes.iter().all(|(n, c)| *c > 1e-3 || pre_bn_bias(n)),
            "{changes:?}"
        );
        // The refined embeddings agree too.
        let (rc, rf) = (c.refine(&x).unwrap(), f.refine(&x).unwrap());
        let err = rc
            .data
            .iter()
            .zip(&rf.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-3, "skip {skip}: refine differs by {err}");
    }
}

/// The comparison above does catch a different computation: a fast trainer at another
/// temperature (same weights, views and masks) fails it.
#[test]
fn comparison_detects_a_different_step() {
    let x = data(400, 64, 3);
    let mut c = SimSkipTrainer::new(64, cfg(Backend::Candle, true, true)).unwrap();
    let mut other = cfg(Backend::Fast, true, true);
    other.temperature = 0.49;
    let mut f = SimSkipTrainer::new(64, other).unwrap();
    let b = batch(0, 64);
    let lc = c.train_step(&x, &b, None).unwrap();
    let lf = f.train_step(&x, &b, None).unwrap();
    assert!(((lc - lf) / lc).abs() > 1e-5);
    let (wc, wf) = (c.export(), f.export());
    assert!(worst(&wf, &wc, 1e-5, 1e-4, 2e-3).is_some());
}

/// Whole epochs (including a short last batch), noise augmentation, neighbour-free config, and
/// weight decay: the two backends still agree.
#[test]
fn epochs_with_noise_and_weight_decay_match() {
    let x = data(300, 32, 4);
    let mk = |backend| SimSkipConfig {
        augmentation: Augmentation::Both,
        positives: Positives::Augment,
        weight_decay: 0.01,
        dropout: 0.2,
        ..cfg(backend, true, true)
    };
    let mut c = SimSkipTrainer::new(32, mk(Backend::Candle)).unwrap();
    let mut f = SimSkipTrainer::new(32, mk(Backend::Fast)).unwrap();
    for _ in 0..2 {
        let sc = c.train_epoch(&x, None).unwrap();
        let sf = f.train_epoch(&x, None).unwrap();
        assert_eq!(sc.samples, sf.samples);
        assert!(
            ((sc.loss - sf.loss) / sc.loss).abs() < 1e-4,
            "{sc:?} {sf:?}"
        );
    }
    let (wc, wf) = (c.export(), f.export());
    let bad = worst(&wf, &wc, 2e-4, 2e-3, 10.0 * 2e-3);
    assert!(bad.is_none(), "{bad:?}");
}

/// Imported weights are the ones the next step of either backend starts from, and exports see
/// each backend's latest weights.
#[test]
fn import_reaches_the_next_step_of_both_backends() {
    let x = data(400, 64, 5);
    let mut donor = SimSkipTrainer::new(64, cfg(Backend::Candle, true, false)).unwrap();
    donor.train_step(&x, &batch(0, 64), None).unwrap();
    let w = donor.export();

    let mut c = SimSkipTrainer::new(64, cfg(Backend::Candle, true, true)).unwrap();
    let mut f = SimSkipTrainer::new(64, cfg(Backend::Fast, true, true)).unwrap();
    for t in [&mut c, &mut f] {
        t.train_step(&x, &batch(64, 64), None).unwrap();
        t.import(&w).unwrap();
        assert_eq!(t.export(), w);
    }
    let lc = c.train_step(&x, &batch(128, 64), None).unwrap();
    let lf = f.train_step(&x, &batch(128, 64), None).unwrap();
    assert!(((lc - lf) / lc).abs() < 1e-5, "{lc} vs {lf}");
    let (wc, wf) = (c.export(), f.export());
    assert_ne!(wf, w);
    let bad = worst(&wf, &wc, 1e-5, 1e-4, 2.0 * 2e-3);
    assert!(bad.is_none(), "{bad:?}");
}

#[test]
fn backend_config_round_trips_and_defaults() {
    let c: SimSkipConfig = serde_json::from_str(r#"{"backend": "candle"}"#).unwrap();
    assert_eq!(c.backend, Backend::Candle);
    let d: SimSkipConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(d.backend, SimSkipConfig::default().backend);
    let s = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<SimSkipConfig>(&s).unwrap(), c);
}
