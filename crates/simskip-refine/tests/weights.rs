//! `Weights`: validation of imported arrays, bit-exact round trips and seeded initialisation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use simskip_data::{Matrix, NamedArray};
use simskip_refine::{Param, RefineError, SimSkipConfig, SimSkipTrainer, Weights, PARAMS};

const D: usize = 16;

/// Weights after one epoch on a seeded table: every array, BatchNorm statistics included, holds
/// values no initialisation gives.
fn trained(seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = (0..300 * D)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Matrix::from_vec(300, D, data);
    let cfg = SimSkipConfig {
        seed,
        batch_size: 64,
        zero_init_residual: false,
        ..SimSkipConfig::default()
    };
    let mut t = SimSkipTrainer::new(D, cfg).unwrap();
    t.train_epoch(&x, None).unwrap();
    t.weights().clone()
}

fn bits(arrays: &[NamedArray]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    arrays
        .iter()
        .map(|a| {
            let b = a.data.iter().map(|v| v.to_bits()).collect();
            (a.name.clone(), a.shape.clone(), b)
        })
        .collect()
}

fn position(arrays: &[NamedArray], name: &str) -> usize {
    arrays.iter().position(|a| a.name == name).unwrap()
}

#[test]
fn round_trip_is_bit_exact_with_batchnorm_statistics() {
    let w = trained(3);
    let init = Weights::init(D, &SimSkipConfig::default(), &mut StdRng::seed_from_u64(3)).unwrap();
    for p in [
        Param::Bn1RunningMean,
        Param::Bn2RunningVar,
        Param::OutWeight,
    ] {
        assert_ne!(w.get(p), init.get(p), "{p:?} moved in training");
    }
    let arrays = w.to_arrays();
    let back = Weights::from_arrays(D, &arrays).unwrap();
    assert_eq!(bits(&back.to_arrays()), bits(&arrays));
    let same_bits = |a: &[f32], b: &[f32]| {
        a.iter()
            .map(|v| v.to_bits())
            .eq(b.iter().map(|v| v.to_bits()))
    };
    assert!(same_bits(back.trainable(), w.trainable()));
    assert!(same_bits(back.statistics(), w.statistics()));
    // The order of the arrays does not matter.
    let mut reversed = arrays.clone();
    reversed.reverse();
    assert_eq!(Weights::from_arrays(D, &reversed).unwrap(), w);
    // Through a trainer: import then export gives the same arrays.
    let mut t = SimSkipTrainer::new(D, SimSkipConfig::default()).unwrap();
    t.import(&arrays).unwrap();
    assert_eq!(bits(&t.export()), bits(&arrays));
}

#[test]
fn to_arrays_follows_the_table() {
    let w = trained(4);
    let arrays = w.to_arrays();
    assert_eq!(arrays.len(), PARAMS.len());
    for (a, s) in arrays.iter().zip(&PARAMS) {
        assert_eq!(a.name, s.name);
        assert_eq!(a.shape, s.shape.dims(D));
        assert_eq!(a.data, w.get(s.param));
    }
}

#[test]
fn noisy_negative_running_variances_are_clamped_and_the_model_stays_finite() {
    let mut arrays = trained(5).to_arrays();
    let k = position(&arrays, "encoder.layer1.bn.running_var");
    let before = arrays[k].data.clone();
    // What client-level DP noise on an averaged model can give: some variances below zero.
    for v in arrays[k].data.iter_mut().step_by(2) {
        *v = -0.5;
    }
    let w = Weights::from_arrays(D, &arrays).unwrap();
    let got = w.get(Param::Bn1RunningVar);
    for (i, (&v, &b)) in got.iter().zip(&before).enumerate() {
        assert_eq!(v, if i % 2 == 0 { 0.0 } else { b }, "index {i}");
    }
    // Every other array is imported as it was.
    let back = w.to_arrays();
    for (a, b) in arrays
        .iter()
        .zip(&back)
        .filter(|(a, _)| a.name != arrays[k].name)
    {
        assert_eq!(a.data, b.data, "{}", a.name);
    }
    let mut trainer = SimSkipTrainer::new(D, SimSkipConfig::default()).unwrap();
    trainer.import(&arrays).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let x = Matrix::from_vec(
        7,
        D,
        (0..7 * D).map(|_| rng.random_range(-1.0..1.0)).collect(),
    );
    let refined = trainer.refine(&x).unwrap();
    assert!(refined.data.iter().all(|v| v.is_finite()));
}

#[test]
fn a_wrong_name_is_rejected() {
    let mut arrays = trained(5).to_arrays();
    let k = position(&arrays, "projector.0.bias");
    arrays[k].name = "projector.1.bias".into();
    match Weights::from_arrays(D, &arrays) {
        Err(RefineError::UnexpectedArray { name }) => assert_eq!(name, "projector.1.bias"),
        r => panic!("expected UnexpectedArray, got {r:?}"),
    }
}

#[test]
fn a_missing_array_is_rejected() {
    let mut arrays = trained(5).to_arrays();
    arrays.remove(position(&arrays, "encoder.layer1.bn.running_mean"));
    match Weights::from_arrays(D, &arrays) {
        Err(RefineError::MissingArray { name }) => {
            assert_eq!(name, "encoder.layer1.bn.running_mean")
        }
        r => panic!("expected MissingArray, got {r:?}"),
    }
}

#[test]
fn an_extra_array_is_rejected() {
    let mut arrays = trained(5).to_arrays();
    arrays.push(NamedArray::new("optimizer.step", vec![1], vec![3.0]));
    match Weights::from_arrays(D, &arrays) {
        Err(RefineError::UnexpectedArray { name }) => assert_eq!(name, "optimizer.step"),
        r => panic!("expected UnexpectedArray, got {r:?}"),
    }
}

#[test]
fn a_duplicate_array_is_rejected() {
    let mut arrays = trained(5).to_arrays();
    let again = arrays[position(&arrays, "encoder.out.bias")].clone();
    arrays.push(again);
    match Weights::from_arrays(D, &arrays) {
        Err(RefineError::DuplicateArray { name }) => assert_eq!(name, "encoder.out.bias"),
        r => panic!("expected DuplicateArray, got {r:?}"),
    }
}

#[test]
fn weights_of_another_dimension_are_rejected() {
    let other = Weights::init(
        2 * D,
        &SimSkipConfig::default(),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap()
    .to_arrays();
    match Weights::from_arrays(D, &other) {
        Err(RefineError::ShapeMismatch {
            name,
            dim,
            expected,
            found,
            len,
        }) => {
            // The first array of the table, a layer-1 BatchNorm vector of width dim / 2.
            assert_eq!(name, PARAMS[0].name);
            assert_eq!((dim, expected, found, len), (D, vec![D / 2], vec![D], D));
        }
        r => panic!("expected ShapeMismatch, got {r:?}"),
    }
    // The same arrays fit a trainer of their own dimension.
    assert!(Weights::from_arrays(2 * D, &other).is_ok());
}

#[test]
fn a_data_length_that_disagrees_with_the_shape_is_rejected() {
    let mut arrays = trained(5).to_arrays();
    let k = position(&arrays, "projector.2.weight");
    arrays[k].data.pop();
    match Weights::from_arrays(D, &arrays) {
        Err(RefineError::ShapeMismatch { name, len, .. }) => {
            assert_eq!((name.as_str(), len), ("projector.2.weight", D * D - 1))
        }
        r => panic!("expected ShapeMismatch, got {r:?}"),
    }
}

#[test]
fn non_finite_values_are_rejected() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut arrays = trained(5).to_arrays();
        let k = position(&arrays, "encoder.layer2.bn.running_var");
        arrays[k].data[7] = bad;
        match Weights::from_arrays(D, &arrays) {
            Err(RefineError::NonFinite { name, index, value }) => {
                assert_eq!(name, "encoder.layer2.bn.running_var");
                assert_eq!(index, 7);
                assert_eq!(value.to_bits(), bad.to_bits());
            }
            r => panic!("expected NonFinite for {bad}, got {r:?}"),
        }
    }
}

#[test]
fn a_rejected_import_leaves_the_trainer_unchanged() {
    let mut t = SimSkipTrainer::new(D, SimSkipConfig::default()).unwrap();
    let before = t.export();
    let mut arrays = trained(6).to_arrays();
    let last = arrays.len() - 1;
    arrays[last].data[0] = f32::NAN;
    assert!(t.import(&arrays).is_err());
    assert_eq!(t.export(), before);
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    for zero_init_residual in [true, false] {
        let cfg = SimSkipConfig {
            zero_init_residual,
            ..SimSkipConfig::default()
        };
        let init = |seed| Weights::init(D, &cfg, &mut StdRng::seed_from_u64(seed)).unwrap();
        assert_eq!(bits(&init(9).to_arrays()), bits(&init(9).to_arrays()));
        assert_ne!(init(9), init(10));
        // A trainer draws its initial weights first from its seed.
        let t = SimSkipTrainer::new(
            D,
            SimSkipConfig {
                seed: 9,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(bits(&t.export()), bits(&init(9).to_arrays()));
    }
}

/// The documented draw order, written out independently of the table: PyTorch's default init
/// for each linear layer in network order (weight, then bias, uniform in ±1/sqrt(fan_in)), the
/// encoder's output layer skipped and zero with `zero_init_residual`, BatchNorm at 1 and 0.
#[test]
fn init_draws_in_network_order() {
    for zero_init_residual in [true, false] {
        let cfg = SimSkipConfig {
            zero_init_residual,
            ..SimSkipConfig::default()
        };
        let w = Weights::init(D, &cfg, &mut StdRng::seed_from_u64(21)).unwrap();
        let mut rng = StdRng::seed_from_u64(21);
        let h = D / 2;
        let layers = [
            (Param::Linear1Weight, Param::Linear1Bias, D, h),
            (Param::Linear2Weight, Param::Linear2Bias, h, D),
            (Param::OutWeight, Param::OutBias, D, D),
            (Param::Projector0Weight, Param::Projector0Bias, D, D),
            (Param::Projector2Weight, Param::Projector2Bias, D, D),
        ];
        for (wp, bp, fan_in, fan_out) in layers {
            if zero_init_residual && wp == Param::OutWeight {
                assert!(w.get(wp).iter().chain(w.get(bp)).all(|&v| v == 0.0));
                continue;
            }
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
            };
            assert_eq!(w.get(wp), draw(fan_in * fan_out).as_slice(), "{wp:?}");
            assert_eq!(w.get(bp), draw(fan_out).as_slice(), "{bp:?}");
        }
        for (p, v) in [
            (Param::Bn1Weight, 1.0),
            (Param::Bn1Bias, 0.0),
            (Param::Bn1RunningMean, 0.0),
            (Param::Bn1RunningVar, 1.0),
            (Param::Bn2Weight, 1.0),
            (Param::Bn2Bias, 0.0),
            (Param::Bn2RunningMean, 0.0),
            (Param::Bn2RunningVar, 1.0),
        ] {
            assert!(w.get(p).iter().all(|&x| x == v), "{p:?}");
        }
    }
}

#[test]
fn dimensions_below_two_are_a_config_error() {
    let cfg = SimSkipConfig::default();
    assert!(matches!(
        Weights::init(1, &cfg, &mut StdRng::seed_from_u64(0)),
        Err(RefineError::Config(_))
    ));
    assert!(matches!(
        Weights::from_arrays(0, &[]),
        Err(RefineError::Config(_))
    ));
}
