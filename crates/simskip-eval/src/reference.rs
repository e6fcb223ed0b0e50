//! The straightforward implementations the fast ones replaced: one candle step per batch for
//! the probe, a dot product per pair for KNN and the neighbour signal. They are the oracles of
//! the tests and the baselines of the benchmarks (`examples/eval_speed.rs`); nothing in the
//! pipeline calls them.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use simskip_data::Matrix;

use crate::error::Result;
use crate::f1::{accuracy, macro_f1};
use crate::knn::{dot, knn_candidates, normalised_rows};
use crate::probe::{probe_inputs, ProbeConfig, ProbeInputs, ProbeResult};
use crate::signal::{check_retrieval_inputs, Adjacency};
use crate::split::LabelSplit;

/// Queries scored together: their rows stay in cache while every candidate row streams past once.
const QUERY_BLOCK: usize = 32;

/// [`crate::probe`] with candle: one autograd step per batch.
pub fn probe(
    x: &Matrix,
    labels: &[Option<u32>],
    num_classes: usize,
    split: &LabelSplit,
    cfg: &ProbeConfig,
) -> Result<ProbeResult> {
    let ProbeInputs {
        train: (train_x, train_y),
        valid: (valid_x, valid_y),
        test: (test_x, test_y),
    } = probe_inputs(x, labels, num_classes, split, cfg)?;
    let d = x.cols;
    let device = Device::Cpu;
    let valid_x = Tensor::from_vec(valid_x, (split.valid.len(), d), &device)?;
    let test_x = Tensor::from_vec(test_x, (split.test.len(), d), &device)?;

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mlp = Mlp::new(&[d, cfg.hidden, cfg.hidden, num_classes], &mut rng, &device)?;
    let mut opt = AdamW::new(
        mlp.vars.clone(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;

    let mut order: Vec<usize> = (0..split.train.len()).collect();
    let mut batch_x = Vec::with_capacity(cfg.batch_size * d);
    let mut batch_y = Vec::with_capacity(cfg.batch_size);
    let mut best: Option<(f64, usize, Vec<u32>)> = None; // (valid acc, epoch, test predictions)
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size) {
            batch_x.clear();
            batch_y.clear();
            for &i in chunk {
                batch_x.extend_from_slice(&train_x[i * d..(i + 1) * d]);
                batch_y.push(train_y[i]);
            }
            let xb = Tensor::from_slice(&batch_x, (chunk.len(), d), &device)?;
            let yb = Tensor::from_slice(&batch_y, chunk.len(), &device)?;
            let loss = candle_nn::loss::cross_entropy(&mlp.forward(&xb)?, &yb)?;
            opt.backward_step(&loss)?;
        }
        let valid_acc = accuracy(&mlp.predict(&valid_x)?, &valid_y);
        if best.as_ref().is_none_or(|(b, _, _)| valid_acc > *b) {
            best = Some((valid_acc, epoch, mlp.predict(&test_x)?));
        } else if let (Some(p), Some((_, best_epoch, _))) = (cfg.patience, &best) {
            if epoch - best_epoch >= p {
                break;
            }
        }
    }
    let (valid_accuracy, best_epoch, test_pred) = best.expect("validated: at least one epoch");
    Ok(ProbeResult {
        accuracy: accuracy(&test_pred, &test_y),
        macro_f1: macro_f1(&test_pred, &test_y, num_classes),
        valid_accuracy,
        best_epoch,
    })
}

/// A ReLU MLP over candle `Linear` layers whose weights are `Var`s initialised from our RNG.
struct Mlp {
    layers: Vec<Linear>,
    vars: Vec<Var>,
}

impl Mlp {
    /// `widths = [in, hidden.., out]`.
    fn new(widths: &[usize], rng: &mut StdRng, device: &Device) -> Result<Self> {
        let mut layers = Vec::new();
        let mut vars = Vec::new();
        for w in widths.windows(2) {
            let (fan_in, fan_out) = (w[0], w[1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut uniform = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = Var::from_vec(uniform(fan_out * fan_in), (fan_out, fan_in), device)?;
            let bias = Var::from_vec(uniform(fan_out), fan_out, device)?;
            layers.push(Linear::new(
                weight.as_tensor().clone(),
                Some(bias.as_tensor().clone()),
            ));
            vars.push(weight);
            vars.push(bias);
        }
        Ok(Self { layers, vars })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Arg-max class of every row.
    fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        let logits = self.forward(x)?;
        debug_assert_eq!(logits.dtype(), DType::F32);
        Ok(logits.argmax(1)?.to_vec1::<u32>()?)
    }
}

/// [`crate::knn_precision_at_k`], one dot product per pair.
pub fn knn_precision_at_k(x: &Matrix, labels: &[Option<u32>], queries: &[u32], k: usize) -> f64 {
    let Some((candidates, k_eff)) = knn_candidates(x, labels, queries, k) else {
        return f64::NAN;
    };
    let unit = normalised_rows(x);
    let d = x.cols;
    let row = |e: u32| &unit[e as usize * d..(e as usize + 1) * d];

    let per_block: Vec<f64> = queries
        .par_chunks(QUERY_BLOCK)
        .map(|block| {
            // sims[qi * n + ci] = cos(query qi, candidate ci)
            let n = candidates.len();
            let mut sims = vec![0f32; block.len() * n];
            for (ci, &c) in candidates.iter().enumerate() {
                let rc = row(c);
                for (qi, &q) in block.iter().enumerate() {
                    sims[qi * n + ci] = dot(row(q), rc);
                }
            }
            let mut scratch: Vec<(f32, u32)> = Vec::with_capacity(n);
            let mut sum = 0.0;
            for (qi, &q) in block.iter().enumerate() {
                scratch.clear();
                scratch.extend(
                    candidates
                        .iter()
                        .zip(&sims[qi * n..(qi + 1) * n])
                        .filter(|(&c, _)| c != q)
                        .map(|(&c, &s)| (s, c)),
                );
                // best first: higher similarity, then lower id
                let order =
                    |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                if k_eff < scratch.len() {
                    scratch.select_nth_unstable_by(k_eff - 1, order);
                }
                let label = labels[q as usize];
                let same = scratch[..k_eff]
                    .iter()
                    .filter(|(_, c)| labels[*c as usize] == label)
                    .count();
                sum += same as f64 / k_eff as f64;
            }
            sum
        })
        .collect();
    per_block.iter().sum::<f64>() / queries.len() as f64
}

/// [`crate::neighbour_retrieval_mrr`], one pass over the table per ranking.
pub fn neighbour_retrieval_mrr(
    x: &Matrix,
    pairs: &[(u32, u32)],
    filter_train_neighbours: Option<&Adjacency>,
) -> f64 {
    check_retrieval_inputs(x, pairs, filter_train_neighbours);
    let unit = normalised_rows(x);
    let d = x.cols;
    let row = |e: u32| &unit[e as usize * d..(e as usize + 1) * d];

    let reciprocal_rank = |query: u32, target: u32| -> f64 {
        let q = row(query);
        let s_target = dot(q, row(target));
        let mut better = 0usize;
        let mut tied = 0usize;
        for e in 0..x.rows as u32 {
            if e == query || e == target {
                continue;
            }
            if filter_train_neighbours.is_some_and(|adj| adj.of(query).binary_search(&e).is_ok()) {
                continue;
            }
            let s = dot(q, row(e));
            if s > s_target {
                better += 1;
            } else if s == s_target {
                tied += 1;
            }
        }
        1.0 / (1.0 + better as f64 + tied as f64 / 2.0)
    };

    let (sum, count) = pairs
        .par_iter()
        .filter(|(h, t)| h != t)
        .map(|&(h, t)| (reciprocal_rank(h, t) + reciprocal_rank(t, h), 2usize))
        .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}
