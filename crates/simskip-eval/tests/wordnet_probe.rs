//! The probe (and KNN) on real data: WordNet-5k with its 41 supersense labels.
//!
//! Features are built from the training graph only, with no embedding model involved:
//! for entity `e`,
//! * `log(1 + count)` of its training triples per (relation, direction) — `2·R` columns
//!   (which relations an entity takes part in says a lot about its part of speech and
//!   supersense: verbs have `_verb_group`, artifacts `_has_part`, ...);
//! * the mean one-hot label of its training-graph neighbours that are in the TRAIN part of the
//!   label split — `C` columns (zeros when it has none), so no valid/test label leaks in;
//! * one column flagging "has at least one train-labelled neighbour".
//!
//! These are real, noisy, partially informative features: many entities have a single
//! training edge. The probe must beat the majority-class baseline by a clear margin.

use std::path::PathBuf;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::{KgDataset, Matrix};
use simskip_eval::{knn_precision_at_k, label_split, probe, LabelSplit, ProbeConfig};

fn wordnet_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SIMSKIP_WORDNET_5K") {
        return PathBuf::from(dir);
    }
    let in_repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k");
    if in_repo.join("entity_labels.tsv").exists() {
        return in_repo;
    }
    let shared = PathBuf::from("/work/shared/datasets/wordnet-5k");
    assert!(
        shared.join("entity_labels.tsv").exists(),
        "WordNet-5k not found in data/wordnet-5k or {}; set SIMSKIP_WORDNET_5K",
        shared.display()
    );
    shared
}

struct Fixture {
    features: Matrix,
    labels: Vec<Option<u32>>,
    num_classes: usize,
    split: LabelSplit,
}

fn fixture() -> Fixture {
    let ds = KgDataset::load(&wordnet_dir()).expect("load wordnet-5k");
    let labels = ds.labels.as_ref().expect("entity_labels.tsv");
    let num_classes = labels.classes.len();
    assert_eq!(num_classes, 41);
    let split = label_split(labels, 42, 0.2, 0.2);

    let n = ds.num_entities();
    let r = ds.num_relations();
    let mut train_label: Vec<Option<u32>> = vec![None; n];
    for &e in &split.train {
        train_label[e as usize] = labels.of[e as usize];
    }
    let d = 2 * r + num_classes + 1;
    let mut x = Matrix::zeros(n, d);
    let mut neighbour_count = vec![0f32; n];
    for t in &ds.train {
        x.row_mut(t.h as usize)[2 * t.r as usize] += 1.0;
        x.row_mut(t.t as usize)[2 * t.r as usize + 1] += 1.0;
        for (a, b) in [(t.h, t.t), (t.t, t.h)] {
            if let Some(c) = train_label[b as usize] {
                x.row_mut(a as usize)[2 * r + c as usize] += 1.0;
                neighbour_count[a as usize] += 1.0;
            }
        }
    }
    for (row, &count) in x.data.chunks_mut(d).zip(&neighbour_count) {
        for v in &mut row[..2 * r] {
            *v = v.ln_1p();
        }
        if count > 0.0 {
            for v in &mut row[2 * r..2 * r + num_classes] {
                *v /= count;
            }
            row[d - 1] = 1.0;
        }
    }
    Fixture {
        features: x,
        labels: labels.of.clone(),
        num_classes,
        split,
    }
}

/// Accuracy on test of always predicting the most frequent train class.
fn majority_baseline(f: &Fixture) -> f64 {
    let mut count = vec![0usize; f.num_classes];
    for &e in &f.split.train {
        count[f.labels[e as usize].unwrap() as usize] += 1;
    }
    let majority = (0..f.num_classes)
        .max_by_key(|&c| (count[c], std::cmp::Reverse(c)))
        .unwrap() as u32;
    let hits = f
        .split
        .test
        .iter()
        .filter(|&&e| f.labels[e as usize] == Some(majority))
        .count();
    hits as f64 / f.split.test.len() as f64
}

#[test]
fn probe_beats_majority_and_is_deterministic() {
    let f = fixture();
    let base = majority_baseline(&f);
    let cfg = ProbeConfig {
        epochs: 30,
        patience: Some(5),
        seed: 7,
        ..ProbeConfig::default()
    };
    let t0 = Instant::now();
    let a = probe(&f.features, &f.labels, f.num_classes, &f.split, &cfg).unwrap();
    eprintln!(
        "wordnet-5k probe on {}x{}: {a:?}, majority baseline {base:.4}, {:.2?}",
        f.features.rows,
        f.features.cols,
        t0.elapsed()
    );
    assert!(a.accuracy > base + 0.15, "probe {a:?} vs majority {base}");
    assert!(a.macro_f1 > 0.1 && a.macro_f1 <= 1.0, "{a:?}");
    let b = probe(&f.features, &f.labels, f.num_classes, &f.split, &cfg).unwrap();
    assert_eq!(a, b, "same seed, same result");
}

#[test]
fn knn_on_real_features_beats_random_table() {
    let f = fixture();
    let t0 = Instant::now();
    let real = knn_precision_at_k(&f.features, &f.labels, &f.split.test, 10);
    let elapsed = t0.elapsed();
    let mut rng = StdRng::seed_from_u64(3);
    let noise = Matrix::from_vec(
        f.features.rows,
        f.features.cols,
        (0..f.features.data.len())
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
    );
    let random = knn_precision_at_k(&noise, &f.labels, &f.split.test, 10);
    eprintln!("knn@10 real {real:.4} random {random:.4} ({elapsed:.2?})");
    // a random table retrieves labels at about the class-frequency rate (sum of p_c^2 ≈ 0.1)
    assert!(random < 0.2, "{random}");
    assert!(real > random + 0.1, "real {real} vs random {random}");
}

/// The timing figure: the default probe (hidden 256, 100 epochs, batch 256) on a 5000×128
/// table (the real features mixed into 128 columns by a seeded random projection).
/// `cargo test -p simskip-eval --test wordnet_probe -- --ignored --nocapture`
#[test]
#[ignore = "timing only"]
fn probe_timing_5000x128() {
    let f = fixture();
    let d_in = f.features.cols;
    let d = 128;
    let mut rng = StdRng::seed_from_u64(11);
    let proj: Vec<f32> = (0..d_in * d)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut x = Matrix::zeros(f.features.rows, d);
    for i in 0..x.rows {
        let src = f.features.row(i);
        for (j, out) in x.row_mut(i).iter_mut().enumerate() {
            *out = src
                .iter()
                .enumerate()
                .map(|(k, v)| v * proj[k * d + j])
                .sum();
        }
    }
    let t0 = Instant::now();
    let r = probe(
        &x,
        &f.labels,
        f.num_classes,
        &f.split,
        &ProbeConfig::default(),
    )
    .unwrap();
    eprintln!(
        "probe 5000x128, default config: {r:?} in {:.2?}",
        t0.elapsed()
    );
}
