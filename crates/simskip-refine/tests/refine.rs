//! Behaviour of the SimSkip model, trainer and selection on real-graph features.

mod common;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use simskip_data::Matrix;
use simskip_refine::{
    apply, train_with_selection, Augmentation, Choice, Positives, RefineError, SimSkipConfig,
    SimSkipModel, SimSkipTrainer, Weights, PARAMS,
};

const D: usize = 32;

fn cfg(seed: u64) -> SimSkipConfig {
    SimSkipConfig {
        seed,
        batch_size: 128,
        ..SimSkipConfig::default()
    }
}

/// The model's encoding of `input`, flattened (in training mode when given a RNG).
fn encoded(m: &SimSkipModel, input: &Tensor, rng: Option<&mut StdRng>) -> Vec<f32> {
    m.encode(input, rng)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn small(x: &Matrix, rows: usize) -> Matrix {
    let ids: Vec<u32> = (0..rows as u32).collect();
    x.select_rows(&ids)
}

#[test]
fn layer_shapes_and_parameter_counts() {
    let mut rng = StdRng::seed_from_u64(0);
    let d = 48;
    let w = Weights::init(d, &SimSkipConfig::default(), &mut rng).unwrap();
    let m = SimSkipModel::new(&w, true, 0.1).unwrap();
    let arrays = w.to_arrays();
    let names: Vec<&str> = arrays.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, PARAMS.iter().map(|s| s.name).collect::<Vec<_>>());
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "export is sorted by name");
    let shape = |n: &str| arrays.iter().find(|a| a.name == n).unwrap().shape.clone();
    assert_eq!(shape("encoder.layer1.linear.weight"), vec![d / 2, d]);
    assert_eq!(shape("encoder.layer2.linear.weight"), vec![d, d / 2]);
    assert_eq!(shape("encoder.out.weight"), vec![d, d]);
    assert_eq!(shape("projector.0.weight"), vec![d, d]);
    assert_eq!(shape("projector.2.weight"), vec![d, d]);
    assert_eq!(shape("encoder.layer1.bn.running_var"), vec![d / 2]);
    assert_eq!(shape("encoder.layer2.bn.running_mean"), vec![d]);
    // Paper: encoder weights d·d/2 + d/2·d + d·d, projector d·d twice.
    let enc_w: usize = [
        "encoder.layer1.linear.weight",
        "encoder.layer2.linear.weight",
        "encoder.out.weight",
    ]
    .iter()
    .map(|n| shape(n).iter().product::<usize>())
    .sum();
    assert_eq!(enc_w, d * d / 2 + d / 2 * d + d * d);
    let biases = d / 2 + d + d + d + d;
    let bn_affine = 2 * (d / 2) + 2 * d;
    assert_eq!(
        m.num_trainable_parameters(),
        enc_w + 2 * d * d + biases + bn_affine
    );
    assert_eq!(w.num_trainable(), m.num_trainable_parameters());
    // BatchNorm statistics start at mean 0, variance 1.
    let rv = arrays
        .iter()
        .find(|a| a.name == "encoder.layer2.bn.running_var")
        .unwrap();
    assert!(rv.data.iter().all(|&v| v == 1.0));
    // PyTorch default init bound 1/sqrt(fan_in).
    let w1 = arrays
        .iter()
        .find(|a| a.name == "encoder.layer1.linear.weight")
        .unwrap();
    let b = 1.0 / (d as f32).sqrt();
    assert!(w1.data.iter().all(|v| v.abs() <= b));
    assert!(w1.data.iter().any(|v| v.abs() > 0.9 * b));
    let out = arrays
        .iter()
        .find(|a| a.name == "encoder.out.weight")
        .unwrap();
    assert!(out.data.iter().all(|&v| v == 0.0), "zero_init_residual");
}

#[test]
fn skip_with_zero_init_is_exact_identity_before_training() {
    let (x, _) = common::features(D);
    let t = SimSkipTrainer::new(D, cfg(1)).unwrap();
    let y = t.refine(&x).unwrap();
    assert_eq!(y, x);

    let minus = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            skip: false,
            ..cfg(1)
        },
    )
    .unwrap();
    let y = minus.refine(&x).unwrap();
    assert_ne!(y, x);
    // Without skip and with the zero output layer, g(x) = 0.
    assert!(y.data.iter().all(|&v| v == 0.0));

    let minus = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            skip: false,
            zero_init_residual: false,
            ..cfg(1)
        },
    )
    .unwrap();
    let y = minus.refine(&x).unwrap();
    let diff: f32 = y.data.iter().zip(&x.data).map(|(a, b)| (a - b).abs()).sum();
    assert!(diff > 1.0);

    let no_zero = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            zero_init_residual: false,
            ..cfg(1)
        },
    )
    .unwrap();
    assert_ne!(no_zero.refine(&x).unwrap(), x);
}

#[test]
fn refine_chunks_agree_with_one_pass() {
    let (x, _) = common::features(D);
    let mut t = SimSkipTrainer::new(D, cfg(2)).unwrap();
    t.train_epoch(&small(&x, 1000), None).unwrap();
    // 5000 rows => chunks of 4096 + 904; compare with rows refined in a separate call.
    let all = t.refine(&x).unwrap();
    let tail = t.refine(&x.select_rows(&[4500, 10, 4095, 4096])).unwrap();
    for (k, &i) in [4500usize, 10, 4095, 4096].iter().enumerate() {
        for (a, b) in all.row(i).iter().zip(tail.row(k)) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

#[test]
fn eval_is_deterministic_train_dropout_differs() {
    let (x, _) = common::features(D);
    let t = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            zero_init_residual: false,
            ..cfg(3)
        },
    )
    .unwrap();
    let xs = small(&x, 64);
    let m = t.model().unwrap();
    let input = Tensor::from_slice(&xs.data, (64, D), &Device::Cpu).unwrap();
    let e1 = encoded(&m, &input, None);
    let e2 = encoded(&m, &input, None);
    assert_eq!(e1, e2);
    assert_eq!(m.refine(&xs).unwrap().data, e1);
    let mut rng = StdRng::seed_from_u64(5);
    let t1 = encoded(&m, &input, Some(&mut rng));
    let t2 = encoded(&m, &input, Some(&mut rng));
    assert_ne!(t1, t2, "dropout masks differ between training passes");
    // Same masks (same rng state) => same training output.
    let mut ra = StdRng::seed_from_u64(6);
    let mut rb = StdRng::seed_from_u64(6);
    let a = encoded(&m, &input, Some(&mut ra));
    let b = encoded(&m, &input, Some(&mut rb));
    assert_eq!(a, b);
    // Without dropout, training mode is deterministic too.
    let t0 = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            dropout: 0.0,
            zero_init_residual: false,
            ..cfg(3)
        },
    )
    .unwrap();
    let m0 = t0.model().unwrap();
    let a = encoded(&m0, &input, Some(&mut rng));
    let b = encoded(&m0, &input, Some(&mut rng));
    assert_eq!(a, b);
    // Train-mode passes updated the model's running statistics, so its evaluation output moved;
    // the model is a copy, so the trainer's weights did not.
    assert_ne!(m.refine(&xs).unwrap().data, e1);
    assert_eq!(t.refine(&xs).unwrap().data, e1);
}

#[test]
fn export_import_round_trip_including_batchnorm_stats() {
    let (x, _) = common::features(D);
    let xs = small(&x, 1500);
    let mut a = SimSkipTrainer::new(D, cfg(10)).unwrap();
    a.train_epoch(&xs, None).unwrap();
    let wa = a.export();
    let rm = wa
        .iter()
        .find(|w| w.name == "encoder.layer1.bn.running_mean")
        .unwrap();
    assert!(
        rm.data.iter().any(|&v| v != 0.0),
        "running mean was updated"
    );
    let out = wa.iter().find(|w| w.name == "encoder.out.weight").unwrap();
    assert!(out.data.iter().any(|&v| v != 0.0), "output layer trained");

    let mut b = SimSkipTrainer::new(D, cfg(11)).unwrap();
    assert_ne!(b.export(), wa);
    b.import(&wa).unwrap();
    assert_eq!(b.export(), wa);
    assert_eq!(b.refine(&x).unwrap(), a.refine(&x).unwrap());
    // Training continues from the imported weights.
    b.train_epoch(&xs, None).unwrap();
    assert_ne!(b.export(), wa);
}

#[test]
fn import_errors_are_typed_and_leave_the_trainer_unchanged() {
    let mut t = SimSkipTrainer::new(D, cfg(0)).unwrap();
    let before = t.export();
    let other = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            zero_init_residual: false,
            ..cfg(1)
        },
    )
    .unwrap()
    .export();
    let missing: Vec<_> = other
        .iter()
        .filter(|a| a.name != "encoder.layer2.bn.running_var")
        .cloned()
        .collect();
    assert!(matches!(
        t.import(&missing),
        Err(RefineError::MissingArray { name }) if name == "encoder.layer2.bn.running_var"
    ));
    // Weights of a model of another dimension: the client's architecture differs.
    let big = SimSkipTrainer::new(64, cfg(0)).unwrap().export();
    let err = t.import(&big).unwrap_err();
    assert!(
        matches!(&err, RefineError::ShapeMismatch { dim: D, .. }),
        "{err:?}"
    );
    assert_eq!(t.export(), before, "failed imports changed nothing");
    t.import(&other).unwrap();
    assert_eq!(t.export(), other);
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let (x, _) = common::features(D);
    let xs = small(&x, 2000);
    let run = |seed: u64, positives: Positives| {
        let c = SimSkipConfig {
            seed,
            positives,
            augmentation: Augmentation::Both,
            ..cfg(seed)
        };
        let mut t = SimSkipTrainer::new(D, c).unwrap();
        let nbs = simskip_refine::Neighbours::from_edges(
            2000,
            &common::graph()
                .edges
                .iter()
                .copied()
                .filter(|&(a, b)| a < 2000 && b < 2000)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let s = t.train_epoch(&xs, Some(&nbs)).unwrap();
        (t.export(), s)
    };
    let (a, sa) = run(7, Positives::Augment);
    let (b, sb) = run(7, Positives::Augment);
    assert_eq!(a, b);
    assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
    let (c, _) = run(8, Positives::Augment);
    assert_ne!(a, c);
    let (n1, _) = run(7, Positives::Neighbour);
    let (n2, _) = run(7, Positives::Neighbour);
    assert_eq!(n1, n2);
    assert_ne!(n1, a);
}

#[test]
fn loss_decreases_on_real_features() {
    let (x, nb) = common::features(D);
    for positives in [Positives::Augment, Positives::Neighbour] {
        let mut t = SimSkipTrainer::new(
            D,
            SimSkipConfig {
                positives,
                lr: 1e-3,
                ..cfg(21)
            },
        )
        .unwrap();
        let losses: Vec<f32> = (0..6)
            .map(|_| t.train_epoch(&x, Some(&nb)).unwrap().loss)
            .collect();
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(
            losses[5] < losses[0] - 0.05,
            "{positives:?}: loss did not decrease: {losses:?}"
        );
    }
}

#[test]
fn neighbour_positives_are_actual_neighbours() {
    let (x, nb) = common::features(D);
    // No augmentation (mask probability 0), so view rows are exact copies of table rows.
    let c = SimSkipConfig {
        positives: Positives::Neighbour,
        augmentation: Augmentation::Mask,
        mask_prob: 0.0,
        ..cfg(4)
    };
    let mut t = SimSkipTrainer::new(D, c).unwrap();
    let batch: Vec<u32> = (0..x.rows as u32).step_by(7).collect();
    let views = t.make_views(&x, &batch, Some(&nb)).unwrap();
    let b = batch.len();
    let row_of = |k: usize| &views[k * D..(k + 1) * D];
    let mut with_neighbours = 0;
    for (k, &i) in batch.iter().enumerate() {
        assert_eq!(row_of(k), x.row(i as usize), "view 1 is the anchor");
        let second = row_of(b + k);
        let list = nb.of(i as usize);
        if list.is_empty() {
            assert_eq!(
                second,
                x.row(i as usize),
                "isolated entity falls back to itself"
            );
        } else {
            with_neighbours += 1;
            assert!(
                list.iter().any(|&j| second == x.row(j as usize)),
                "second view of {i} is not a neighbour's row"
            );
        }
    }
    assert!(with_neighbours > b / 2);
    // Neighbour positives without neighbour lists are a configuration error.
    assert!(matches!(
        t.train_epoch(&x, None),
        Err(RefineError::Config(_))
    ));
    // Lists of the wrong size are rejected.
    let wrong = simskip_refine::Neighbours::from_edges(3, &[(0, 1)]).unwrap();
    assert!(matches!(
        t.train_epoch(&x, Some(&wrong)),
        Err(RefineError::NeighbourCount { .. })
    ));
}

#[test]
fn last_batch_of_one_is_dropped() {
    let (x, _) = common::features(D);
    let xs = small(&x, 257);
    let mut t = SimSkipTrainer::new(
        D,
        SimSkipConfig {
            batch_size: 128,
            ..cfg(5)
        },
    )
    .unwrap();
    let s = t.train_epoch(&xs, None).unwrap();
    assert_eq!(s.samples, 256);
    let rv = t.export();
    assert!(rv.iter().all(|a| a.data.iter().all(|v| v.is_finite())));
    let xs = small(&x, 258);
    assert_eq!(t.train_epoch(&xs, None).unwrap().samples, 258);
}

fn neg_distance_to(x: &Matrix) -> impl FnMut(&Matrix) -> f64 + '_ {
    move |y: &Matrix| {
        -y.data
            .iter()
            .zip(&x.data)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
    }
}

#[test]
fn selection_keeps_input_when_nothing_beats_it() {
    let (x, _) = common::features(D);
    let xs = small(&x, 1000);
    let mut t = SimSkipTrainer::new(D, cfg(30)).unwrap();
    let mut score = neg_distance_to(&xs);
    let mut seen = Vec::new();
    let sel = train_with_selection(&mut t, &xs, None, 3, &mut score, &mut |e, s, sc| {
        seen.push((e, s.samples, sc))
    })
    .unwrap();
    assert_eq!(sel.chosen, Choice::Input);
    assert_eq!(sel.input_score, 0.0);
    assert_eq!(sel.best_score, 0.0);
    assert_eq!(sel.history.len(), 3);
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(sel.history.iter().all(|h| h.2 < 0.0));
    let out = apply(&sel, &t, &xs).unwrap();
    assert_eq!(out, xs);
    // The model was restored to its pre-training (identity) weights.
    assert_eq!(t.refine(&xs).unwrap(), xs);
    let json = serde_json::to_string(&sel).unwrap();
    assert!(json.contains("\"Input\""));
}

#[test]
fn selection_restores_best_epoch() {
    let (x, _) = common::features(D);
    let xs = small(&x, 1000);
    let mut t = SimSkipTrainer::new(D, cfg(31)).unwrap();
    // Scripted scores by call order: input 0, then epochs 1..4 score 1, 5, 2, 3, so epoch 2 wins.
    let mut calls = 0usize;
    let fixed = [0.0, 1.0, 5.0, 2.0, 3.0];
    let mut tables: Vec<Matrix> = Vec::new();
    let mut score = |y: &Matrix| {
        let s = fixed[calls];
        calls += 1;
        tables.push(y.clone());
        s
    };
    let sel = train_with_selection(&mut t, &xs, None, 4, &mut score, &mut |_, _, _| {}).unwrap();
    assert_eq!(sel.chosen, Choice::Epoch(2));
    assert_eq!(sel.best_score, 5.0);
    assert_eq!(
        sel.history.iter().map(|h| h.2).collect::<Vec<_>>(),
        vec![1.0, 5.0, 2.0, 3.0]
    );
    let out = apply(&sel, &t, &xs).unwrap();
    assert_eq!(out, tables[2], "restored weights reproduce epoch 2's table");
    assert_ne!(out, tables[4]);
}

#[test]
fn config_serde_and_validation() {
    let c = SimSkipConfig::default();
    assert!(c.skip && c.zero_init_residual);
    assert_eq!(c.mask_prob, 0.2);
    assert_eq!(c.noise_var, 0.13);
    assert_eq!(c.augmentation, Augmentation::Mask);
    let json = serde_json::to_string(&c).unwrap();
    let back: SimSkipConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    let partial: SimSkipConfig =
        serde_json::from_str(r#"{"augmentation":"both","positives":"neighbour","epochs":3}"#)
            .unwrap();
    assert_eq!(partial.augmentation, Augmentation::Both);
    assert_eq!(partial.positives, Positives::Neighbour);
    assert_eq!(partial.epochs, 3);
    assert_eq!(partial.batch_size, 256);
    for bad in [
        SimSkipConfig {
            batch_size: 1,
            ..c.clone()
        },
        SimSkipConfig {
            temperature: 0.0,
            ..c.clone()
        },
        SimSkipConfig {
            dropout: 1.0,
            ..c.clone()
        },
        SimSkipConfig {
            mask_prob: 1.5,
            ..c.clone()
        },
    ] {
        assert!(matches!(
            SimSkipTrainer::new(D, bad),
            Err(RefineError::Config(_))
        ));
    }
    assert!(matches!(
        SimSkipTrainer::new(1, c.clone()),
        Err(RefineError::Config(_))
    ));
    let t = SimSkipTrainer::new(D, c).unwrap();
    assert!(matches!(
        t.refine(&Matrix::zeros(3, D + 1)),
        Err(RefineError::DimMismatch { .. })
    ));
}
