//! TransE (Bordes et al., 2013) with hand-written gradients and lazy Adam.
//!
//! Score of a triple: `-||h + r - t||_p` (p = 1 or 2, the norm itself, not its power).
//! Training follows PyKEEN's sLCWA loop: each positive gets `negatives` corrupted triples
//! (by default head or tail, 50/50, replaced by a uniformly drawn *different* entity; see
//! [`Corruption`] and [`NegativeFilter`] for FedE's tail-only, filtered sampling), the loss is
//! either the margin ranking loss with mean reduction or FedE/RotatE's self-adversarial
//! negative-sampling loss, and after every step the touched entity rows are projected back
//! to unit L2 norm (PyKEEN's `entity_constrainer=normalize`) when
//! [`TransEConfig::normalize_entities`] is set.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use simskip_data::{Matrix, Triple};

use crate::hogwild;
use crate::linkpred::FilterIndex;
use crate::sparse::{RowGrads, SparseAdam};

/// A [`TransEConfig`] value a trainer cannot use; names the field and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("TransE config: {field} = {value} is invalid: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

fn invalid(field: &'static str, value: impl std::fmt::Display, why: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        why,
    }
}

/// The norm of the translation residual `h + r - t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Norm {
    L1,
    L2,
}

/// Training loss. Distances `d = ||h + r - t||_p`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Loss {
    /// `mean over (positive, negative) pairs of max(0, margin + d(pos) - d(neg))`
    /// (PyKEEN's `MarginRankingLoss`, mean reduction).
    MarginRanking { margin: f32 },
    /// FedE/RotatE's self-adversarial negative sampling loss, per positive
    /// `(-log σ(γ - d(pos)) - Σ_i w_i log σ(d(neg_i) - γ)) / 2` with
    /// `w = softmax(temperature · (γ - d(neg)))` treated as a constant (detached), averaged
    /// over the batch. The halving is FedE's (`(positive_loss + negative_loss) / 2`).
    SelfAdversarial { gamma: f32, temperature: f32 },
}

/// How the entity and relation tables start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingInit {
    /// [`EmbeddingInit::GammaEpsilon`] with ε = 2 under the self-adversarial loss (FedE's
    /// setting), [`EmbeddingInit::Bordes`] under the margin ranking loss.
    #[default]
    Auto,
    /// Bordes et al.: every coordinate uniform in `±6/√d`, relation rows then scaled to unit
    /// L2 norm.
    Bordes,
    /// FedE / RotatE: entities and relations uniform in `±(γ + ε)/d`, relations not
    /// normalised. Needs the self-adversarial loss (γ is its `gamma`). At d 128 the bound is
    /// 0.094 against Bordes's 0.53: distances start near γ's scale instead of far above it,
    /// so the sigmoid terms are not saturated and early rounds learn fast.
    GammaEpsilon { epsilon: f32 },
}

/// FedE's ε (AnselCmy/FedE `--epsilon`).
pub const FEDE_EPSILON: f32 = 2.0;

impl EmbeddingInit {
    /// The concrete rule for `loss` ([`EmbeddingInit::Auto`] resolved).
    pub fn resolve(self, loss: Loss) -> Self {
        match (self, loss) {
            (Self::Auto, Loss::SelfAdversarial { .. }) => Self::GammaEpsilon {
                epsilon: FEDE_EPSILON,
            },
            (Self::Auto, Loss::MarginRanking { .. }) => Self::Bordes,
            (other, _) => other,
        }
    }
}

/// Half-width of the uniform initialisation of `cfg`'s tables: `6/√d` (Bordes) or
/// `(γ + ε)/d` (FedE; 0.09375 for γ 10, ε 2, d 128). A federated coordinator that creates
/// entity rows must draw them uniformly in `±init_bound(cfg)` so that they match what a
/// [`TransETrainer`] with the same config would start from.
pub fn init_bound(cfg: &TransEConfig) -> f32 {
    let d = cfg.dim.max(1) as f32;
    match (cfg.init.resolve(cfg.loss), cfg.loss) {
        (EmbeddingInit::GammaEpsilon { epsilon }, Loss::SelfAdversarial { gamma, .. }) => {
            (gamma + epsilon) / d
        }
        _ => 6.0 / d.sqrt(),
    }
}

/// Which side of a positive a negative replaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// Head or tail, 50/50 (PyKEEN).
    #[default]
    HeadOrTail,
    /// The tail only (FedE, RotatE's `tail-batch`).
    TailOnly,
}

/// Whether a drawn negative may form a known true triple.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeFilter {
    /// Any entity other than the replaced one (PyKEEN's `BasicNegativeSampler`).
    #[default]
    None,
    /// Redraw entities that form a triple the trainer knows to be true (FedE filters tails
    /// against the client's training triples). The known triples are those given to
    /// [`TransETrainer::set_known_triples`], else the first triples trained on.
    KnownTriples,
}

/// What happens to Adam's moments when a federated round installs new entity rows
/// ([`TransETrainer::set_entities`], [`TransETrainer::set_entity_rows`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdamAcrossRounds {
    /// Moments and step counts carry over.
    #[default]
    Keep,
    /// A fresh Adam every round, entities and relations (FedE builds a new optimiser in
    /// every `client_update`).
    Reset,
}

/// TransE hyper-parameters. Missing fields in serialised form take the [`Default`] values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransEConfig {
    pub dim: usize,
    pub norm: Norm,
    pub loss: Loss,
    /// Negatives per positive.
    pub negatives: usize,
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f32,
    pub epochs: usize,
    pub seed: u64,
    /// Project touched entity rows to unit L2 norm after every step (and all rows at
    /// initialisation), as PyKEEN's TransE does.
    pub normalize_entities: bool,
    pub init: EmbeddingInit,
    pub corruption: Corruption,
    pub negative_filter: NegativeFilter,
    pub adam_across_rounds: AdamAcrossRounds,
    /// Threads per epoch. 1 trains sequentially and is reproducible from the seed; more
    /// trains lock-free (Hogwild!, see [`crate::hogwild`]): faster, not bit-reproducible.
    pub threads: usize,
}

/// Upper bound of [`TransEConfig::threads`].
pub const MAX_THREADS: usize = 1024;

impl Default for TransEConfig {
    /// d 128, L1, margin ranking with margin 5, 4 negatives per positive, batch 256, Adam lr
    /// 0.01, 100 epochs, unit-norm entities, one thread.
    ///
    /// [`TransEConfig::pykeen_reference`] with a wider margin and more negatives, chosen on
    /// UMLS's validation set (examples/transe_quality.rs, 5 seeds): with unit-norm entities an
    /// L1 distance at d 128 spans about 0 to 11, so PyKEEN's margin 1 leaves most pairs
    /// separated after a few epochs and the gradient vanishes. Validation MRR .587 (margin 1,
    /// 1 negative) -> .762 / .811 / .773 (margins 3 / 5 / 8, 4 negatives); 4 negatives cost
    /// 2.8x the CPU of one for +.04 test MRR.
    fn default() -> Self {
        Self {
            loss: Loss::MarginRanking { margin: 5.0 },
            negatives: 4,
            ..Self::pykeen_reference()
        }
    }
}

impl TransEConfig {
    /// PyKEEN-style TransE, this crate's default before the margin and negatives were tuned
    /// (the README's earlier UMLS figures): d 128, L1, margin ranking (margin 1), one
    /// negative per positive, batch 256, Adam lr 0.01, 100 epochs, unit-norm entities.
    pub fn pykeen_reference() -> Self {
        Self {
            dim: 128,
            norm: Norm::L1,
            loss: Loss::MarginRanking { margin: 1.0 },
            negatives: 1,
            batch_size: 256,
            lr: 0.01,
            epochs: 100,
            seed: 0,
            normalize_entities: true,
            init: EmbeddingInit::Auto,
            corruption: Corruption::HeadOrTail,
            negative_filter: NegativeFilter::None,
            adam_across_rounds: AdamAcrossRounds::Keep,
            threads: 1,
        }
    }

    /// FedE's (AnselCmy/FedE) TransE settings: d 128, L1 distance (`gamma - ||h+r-t||_1`),
    /// self-adversarial loss with γ 10 and temperature 1, 256 negatives, batch 512, Adam
    /// lr 0.001, no entity normalisation, tables uniform in `±(γ+ε)/d` with ε 2. `epochs` is
    /// FedE's number of local epochs per round (3).
    ///
    /// Sampling, chosen on FB15k-237 split in 3 by relation (examples/fede_fidelity.rs, test
    /// set after 10 rounds, one setting changed at a time; the original FedE reaches tail MRR
    /// .398 / H@10 .634, head-and-tail MRR .293 / H@10 .506):
    /// * negatives filtered against the client's known triples (as FedE does): tail MRR
    ///   .341 -> .362 and head-and-tail .280 -> .297 with head-or-tail corruption, at no extra
    ///   CPU; the default;
    /// * FedE's tail-only corruption reaches the original's tail figures (with the filter:
    ///   .400 / .636) but ranks heads worse (head-and-tail .297 -> .289, round 3 head-side MRR
    ///   .135 -> .042); users rank both sides, so head-or-tail stays the default;
    /// * a new Adam every round (FedE) instead of one kept across rounds: tail MRR .393 -> .389
    ///   (tail-only); the state is kept.
    pub fn fede_defaults() -> Self {
        Self {
            dim: 128,
            norm: Norm::L1,
            loss: Loss::SelfAdversarial {
                gamma: 10.0,
                temperature: 1.0,
            },
            negatives: 256,
            batch_size: 512,
            lr: 0.001,
            epochs: 3,
            seed: 0,
            normalize_entities: false,
            init: EmbeddingInit::GammaEpsilon {
                epsilon: FEDE_EPSILON,
            },
            corruption: Corruption::HeadOrTail,
            negative_filter: NegativeFilter::KnownTriples,
            adam_across_rounds: AdamAcrossRounds::Keep,
            threads: 1,
        }
    }

    /// Checks every value a trainer relies on; the error names the field and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dim == 0 {
            return Err(invalid("dim", self.dim, "must be at least 1"));
        }
        if self.negatives == 0 {
            return Err(invalid("negatives", self.negatives, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", self.batch_size, "must be at least 1"));
        }
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(invalid(
                "threads",
                self.threads,
                "must be between 1 and 1024",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("lr", self.lr, "must be finite and positive"));
        }
        match self.loss {
            Loss::MarginRanking { margin } => {
                if !(margin.is_finite() && margin > 0.0) {
                    return Err(invalid(
                        "loss.margin",
                        margin,
                        "must be finite and positive",
                    ));
                }
            }
            Loss::SelfAdversarial { gamma, temperature } => {
                if !(gamma.is_finite() && gamma > 0.0) {
                    return Err(invalid("loss.gamma", gamma, "must be finite and positive"));
                }
                if !(temperature.is_finite() && temperature >= 0.0) {
                    return Err(invalid(
                        "loss.temperature",
                        temperature,
                        "must be finite and non-negative",
                    ));
                }
            }
        }
        if let EmbeddingInit::GammaEpsilon { epsilon } = self.init {
            if !(epsilon.is_finite() && epsilon >= 0.0) {
                return Err(invalid(
                    "init.epsilon",
                    epsilon,
                    "must be finite and non-negative",
                ));
            }
            if let Loss::MarginRanking { .. } = self.loss {
                return Err(invalid(
                    "init",
                    "gamma_epsilon",
                    "needs the self_adversarial loss (its gamma sets the bound)",
                ));
            }
        }
        Ok(())
    }
}

/// A TransE model: one row per entity and per relation.
#[derive(Clone, Debug, PartialEq)]
pub struct TransE {
    pub entities: Matrix,
    pub relations: Matrix,
    pub norm: Norm,
}

impl TransE {
    /// Bordes et al.'s initialisation: every coordinate uniform in `[-6/√d, 6/√d]`, relation
    /// rows then scaled to unit L2 norm. (Entity rows are normalised by the trainer when
    /// [`TransEConfig::normalize_entities`] is set.)
    pub fn random<R: Rng + ?Sized>(
        num_entities: usize,
        num_relations: usize,
        dim: usize,
        norm: Norm,
        rng: &mut R,
    ) -> Self {
        assert!(dim > 0, "TransE: dim must be positive");
        let bound = 6.0 / (dim as f32).sqrt();
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n * dim)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        };
        let entities = Matrix::from_vec(num_entities, dim, draw(num_entities));
        let mut relations = Matrix::from_vec(num_relations, dim, draw(num_relations));
        for i in 0..num_relations {
            normalize_l2(relations.row_mut(i));
        }
        Self {
            entities,
            relations,
            norm,
        }
    }

    /// Fresh tables by `cfg`'s initialisation rule ([`EmbeddingInit`], bound
    /// [`init_bound`]); entity rows are normalised when [`TransEConfig::normalize_entities`]
    /// is set.
    pub fn init<R: Rng + ?Sized>(
        num_entities: usize,
        num_relations: usize,
        cfg: &TransEConfig,
        rng: &mut R,
    ) -> Self {
        let mut model = match cfg.init.resolve(cfg.loss) {
            EmbeddingInit::GammaEpsilon { .. } => {
                let bound = init_bound(cfg);
                let mut draw = |n: usize| -> Vec<f32> {
                    (0..n * cfg.dim)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect()
                };
                let entities = Matrix::from_vec(num_entities, cfg.dim, draw(num_entities));
                let relations = Matrix::from_vec(num_relations, cfg.dim, draw(num_relations));
                Self {
                    entities,
                    relations,
                    norm: cfg.norm,
                }
            }
            _ => Self::random(num_entities, num_relations, cfg.dim, cfg.norm, rng),
        };
        if cfg.normalize_entities {
            model.normalize_entities();
        }
        model
    }

    pub fn dim(&self) -> usize {
        self.entities.cols
    }

    pub fn num_entities(&self) -> usize {
        self.entities.rows
    }

    pub fn num_relations(&self) -> usize {
        self.relations.rows
    }

    /// `||h + r - t||_p`.
    pub fn distance(&self, t: Triple) -> f32 {
        let h = self.entities.row(t.h as usize);
        let r = self.relations.row(t.r as usize);
        let tt = self.entities.row(t.t as usize);
        match self.norm {
            Norm::L1 => lanes(h, r, tt, |e| e.abs()),
            Norm::L2 => lanes(h, r, tt, |e| e * e).sqrt(),
        }
    }

    /// `-||h + r - t||_p`: higher is more plausible.
    pub fn score(&self, t: Triple) -> f32 {
        -self.distance(t)
    }

    /// Scale every entity row to unit L2 norm (zero rows stay zero).
    pub fn normalize_entities(&mut self) {
        for i in 0..self.entities.rows {
            normalize_l2(self.entities.row_mut(i));
        }
    }
}

/// `Σ_k f(h[k] + r[k] - t[k])` with 8 independent accumulators (lets the compiler vectorise).
#[inline]
fn lanes(h: &[f32], r: &[f32], t: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (hc, rc, tc) = (h.chunks_exact(8), r.chunks_exact(8), t.chunks_exact(8));
    let (hr, rr, tr) = (hc.remainder(), rc.remainder(), tc.remainder());
    for ((a, b), c) in hc.zip(rc).zip(tc) {
        for l in 0..8 {
            acc[l] += f(a[l] + b[l] - c[l]);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for ((a, b), c) in hr.iter().zip(rr).zip(tr) {
        s += f(a + b - c);
    }
    s
}

/// `Σ_k f(q[k] - e[k])`, same lane structure as [`lanes`].
#[inline]
pub(crate) fn lanes2(q: &[f32], e: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (qc, ec) = (q.chunks_exact(8), e.chunks_exact(8));
    let (qr, er) = (qc.remainder(), ec.remainder());
    for (a, c) in qc.zip(ec) {
        for l in 0..8 {
            acc[l] += f(a[l] - c[l]);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (a, c) in qr.iter().zip(er) {
        s += f(a - c);
    }
    s
}

pub(crate) fn normalize_l2(x: &mut [f32]) {
    let n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    if n > 0.0 {
        let inv = 1.0 / n;
        x.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Row-sparse gradients of the loss w.r.t. the entity and relation tables.
#[derive(Debug, Clone)]
pub struct Gradients {
    pub entities: RowGrads,
    pub relations: RowGrads,
}

impl Gradients {
    pub fn new(num_entities: usize, num_relations: usize, dim: usize) -> Self {
        Self {
            entities: RowGrads::new(num_entities, dim),
            relations: RowGrads::new(num_relations, dim),
        }
    }

    pub fn for_model(model: &TransE) -> Self {
        Self::new(model.num_entities(), model.num_relations(), model.dim())
    }

    pub fn clear(&mut self) {
        self.entities.clear();
        self.relations.clear();
    }
}

#[inline]
fn log_sigmoid(x: f32) -> f32 {
    // log σ(x) = -softplus(-x), computed stably.
    let z = -x;
    -(z.max(0.0) + (-z.abs()).exp().ln_1p())
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn check_batch(positives: &[Triple], negatives: &[Triple]) -> usize {
    assert!(!positives.is_empty(), "empty batch");
    assert!(
        !negatives.is_empty() && negatives.len().is_multiple_of(positives.len()),
        "negatives ({}) must be a non-zero multiple of positives ({})",
        negatives.len(),
        positives.len()
    );
    negatives.len() / positives.len()
}

/// Per positive `i` (with negatives `negatives[i*k..(i+1)*k]`): its loss term and the
/// derivative of the batch loss w.r.t. each distance (`coef[0]` for the positive,
/// `coef[1..]` for the negatives), written into `coef`. Returns the loss term, already
/// divided by the batch normaliser.
fn loss_terms(
    loss: Loss,
    d_pos: f32,
    d_neg: &[f32],
    batch: usize,
    coef: &mut [f32],
    weights: &mut Vec<f32>,
) -> f32 {
    let k = d_neg.len();
    match loss {
        Loss::MarginRanking { margin } => {
            let norm = 1.0 / (batch * k) as f32;
            let mut l = 0.0;
            coef[0] = 0.0;
            for j in 0..k {
                let x = margin + d_pos - d_neg[j];
                if x > 0.0 {
                    l += x;
                    coef[0] += norm;
                    coef[1 + j] = -norm;
                } else {
                    coef[1 + j] = 0.0;
                }
            }
            l * norm
        }
        Loss::SelfAdversarial { gamma, temperature } => {
            let norm = 0.5 / batch as f32;
            // Detached softmax weights over the negatives' scores γ - d.
            weights.clear();
            weights.extend(d_neg.iter().map(|&d| temperature * (gamma - d)));
            let mx = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0.0;
            for w in weights.iter_mut() {
                *w = (*w - mx).exp();
                z += *w;
            }
            let mut l = -log_sigmoid(gamma - d_pos);
            coef[0] = norm * sigmoid(d_pos - gamma);
            for j in 0..k {
                let w = weights[j] / z;
                l -= w * log_sigmoid(d_neg[j] - gamma);
                coef[1 + j] = -norm * w * sigmoid(gamma - d_neg[j]);
            }
            l * norm
        }
    }
}

/// The mean batch loss, without gradients. `negatives[i*k..(i+1)*k]` are the `k`
/// corruptions of `positives[i]`.
pub fn batch_loss(model: &TransE, loss: Loss, positives: &[Triple], negatives: &[Triple]) -> f32 {
    let k = check_batch(positives, negatives);
    let mut coef = vec![0.0; k + 1];
    let mut weights = Vec::new();
    let mut d_neg = vec![0.0; k];
    let mut total = 0.0;
    for (i, &p) in positives.iter().enumerate() {
        for (d, &n) in d_neg.iter_mut().zip(&negatives[i * k..(i + 1) * k]) {
            *d = model.distance(n);
        }
        total += loss_terms(
            loss,
            model.distance(p),
            &d_neg,
            positives.len(),
            &mut coef,
            &mut weights,
        );
    }
    total
}

/// The mean batch loss and its gradients w.r.t. every touched row (written into `grads`,
/// which is cleared first). `negatives[i*k..(i+1)*k]` are the `k` corruptions of
/// `positives[i]`. At a kink (a zero residual coordinate for L1, a zero residual for L2, a
/// hinge exactly at zero) the sub-gradient 0 is used, as PyTorch does.
pub fn batch_loss_and_gradients(
    model: &TransE,
    loss: Loss,
    positives: &[Triple],
    negatives: &[Triple],
    grads: &mut Gradients,
) -> f32 {
    let mut scratch = Scratch::default();
    batch_loss_and_gradients_with(model, loss, positives, negatives, grads, &mut scratch)
}

#[derive(Default, Debug, Clone)]
pub(crate) struct Scratch {
    coef: Vec<f32>,
    weights: Vec<f32>,
    d_neg: Vec<f32>,
    g: Vec<f32>,
}

pub(crate) fn batch_loss_and_gradients_with(
    model: &TransE,
    loss: Loss,
    positives: &[Triple],
    negatives: &[Triple],
    grads: &mut Gradients,
    s: &mut Scratch,
) -> f32 {
    let k = check_batch(positives, negatives);
    grads.clear();
    s.coef.resize(k + 1, 0.0);
    s.d_neg.resize(k, 0.0);
    s.g.resize(model.dim(), 0.0);
    let mut total = 0.0;
    for (i, &p) in positives.iter().enumerate() {
        let negs = &negatives[i * k..(i + 1) * k];
        for (d, &n) in s.d_neg.iter_mut().zip(negs) {
            *d = model.distance(n);
        }
        total += loss_terms(
            loss,
            model.distance(p),
            &s.d_neg,
            positives.len(),
            &mut s.coef,
            &mut s.weights,
        );
        accumulate(model, grads, p, s.coef[0], &mut s.g);
        for (j, &n) in negs.iter().enumerate() {
            accumulate(model, grads, n, s.coef[1 + j], &mut s.g);
        }
    }
    total
}

/// Add `c * ∂||h + r - t|| / ∂(h, r, t)` to the gradients.
#[inline]
fn accumulate(model: &TransE, grads: &mut Gradients, t: Triple, c: f32, g: &mut [f32]) {
    if c == 0.0 {
        return;
    }
    let h = model.entities.row(t.h as usize);
    let r = model.relations.row(t.r as usize);
    let tt = model.entities.row(t.t as usize);
    match model.norm {
        Norm::L1 => {
            for k in 0..g.len() {
                let e = h[k] + r[k] - tt[k];
                g[k] = if e > 0.0 {
                    c
                } else if e < 0.0 {
                    -c
                } else {
                    0.0
                };
            }
        }
        Norm::L2 => {
            let mut n2 = 0.0f32;
            for k in 0..g.len() {
                let e = h[k] + r[k] - tt[k];
                g[k] = e;
                n2 += e * e;
            }
            let n = n2.sqrt();
            let scale = if n > 0.0 { c / n } else { 0.0 };
            g.iter_mut().for_each(|v| *v *= scale);
        }
    }
    grads.entities.add_scaled(t.h, 1.0, g);
    grads.relations.add_scaled(t.r, 1.0, g);
    grads.entities.add_scaled(t.t, -1.0, g);
}

/// Draws per negative before [`NegativeFilter::KnownTriples`] gives up and keeps a known
/// answer.
pub const FILTER_DRAWS: usize = 32;

/// Draw an entity uniformly from `0..n` other than `not` (PyKEEN's `BasicNegativeSampler`).
#[inline]
fn other_entity(rng: &mut StdRng, n: u32, not: u32) -> u32 {
    if n < 2 {
        return not;
    }
    let e = rng.random_range(0..n - 1);
    if e >= not {
        e + 1
    } else {
        e
    }
}

/// [`TransETrainer::sample_negatives`] with an explicit generator, entity count and filter
/// (`None`: unfiltered).
pub(crate) fn sample_negatives_with(
    rng: &mut StdRng,
    cfg: &TransEConfig,
    n: u32,
    filter: Option<&FilterIndex>,
    positives: &[Triple],
    out: &mut Vec<Triple>,
) {
    out.clear();
    for &p in positives {
        let (known_tails, known_heads) = match filter {
            Some(f) => (f.tails(p.h, p.r), f.heads(p.r, p.t)),
            None => (&[][..], &[][..]),
        };
        for _ in 0..cfg.negatives {
            let mut c = p;
            let tail = match cfg.corruption {
                Corruption::TailOnly => true,
                Corruption::HeadOrTail => rng.random::<bool>(),
            };
            let (replaced, known) = if tail {
                (p.t, known_tails)
            } else {
                (p.h, known_heads)
            };
            let mut e = other_entity(rng, n, replaced);
            for _ in 1..FILTER_DRAWS {
                if known.binary_search(&e).is_err() {
                    break;
                }
                e = other_entity(rng, n, replaced);
            }
            if tail {
                c.t = e;
            } else {
                c.h = e;
            }
            out.push(c);
        }
    }
}

/// Trains a [`TransE`] model with lazy Adam; optimiser state persists across calls (and
/// across federated rounds when the coordinator replaces entity rows through
/// [`TransETrainer::set_entities`] / [`TransETrainer::set_entity_rows`] or [`Self::model`]).
#[derive(Debug, Clone)]
pub struct TransETrainer {
    /// The model; callers may overwrite rows between epochs (shapes must not change).
    pub model: TransE,
    cfg: TransEConfig,
    rng: StdRng,
    ent_adam: SparseAdam,
    rel_adam: SparseAdam,
    grads: Gradients,
    scratch: Scratch,
    order: Vec<u32>,
    batch: Vec<Triple>,
    negs: Vec<Triple>,
    epochs_done: usize,
    /// True triples negatives must avoid ([`NegativeFilter::KnownTriples`]).
    known: Option<FilterIndex>,
}

impl TransETrainer {
    /// A freshly initialised model ([`TransE::init`]) drawn from `StdRng::seed_from_u64(cfg.seed)`;
    /// the same generator then drives shuffling and negative sampling.
    pub fn new(num_entities: usize, num_relations: usize, cfg: TransEConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let model = TransE::init(num_entities, num_relations, &cfg, &mut rng);
        Self::with_rng(model, cfg, rng)
    }

    /// Continue training an existing model (its norm is replaced by `cfg.norm`; `cfg.dim`
    /// must match the model's width). Entity rows are not re-normalised here.
    pub fn from_model(mut model: TransE, cfg: TransEConfig) -> Self {
        assert_eq!(
            model.dim(),
            cfg.dim,
            "TransETrainer::from_model: model dim != cfg.dim"
        );
        assert_eq!(
            model.relations.cols, cfg.dim,
            "TransETrainer::from_model: relation dim"
        );
        model.norm = cfg.norm;
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self::with_rng(model, cfg, rng)
    }

    fn with_rng(model: TransE, cfg: TransEConfig, rng: StdRng) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("{e} (call TransEConfig::validate before building a trainer)");
        }
        let (ne, nr, d) = (model.num_entities(), model.num_relations(), model.dim());
        Self {
            ent_adam: SparseAdam::new(ne, d, cfg.lr),
            rel_adam: SparseAdam::new(nr, d, cfg.lr),
            grads: Gradients::new(ne, nr, d),
            scratch: Scratch::default(),
            order: Vec::new(),
            batch: Vec::new(),
            negs: Vec::new(),
            epochs_done: 0,
            known: None,
            model,
            cfg,
            rng,
        }
    }

    pub fn config(&self) -> &TransEConfig {
        &self.cfg
    }

    pub fn model(&self) -> &TransE {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut TransE {
        &mut self.model
    }

    pub fn into_model(self) -> TransE {
        self.model
    }

    /// Epochs trained so far by this trainer.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Replace the whole entity table (same shape) at the start of a federated round; Adam
    /// state is kept or reset as [`TransEConfig::adam_across_rounds`] says.
    pub fn set_entities(&mut self, entities: Matrix) {
        assert_eq!(
            (entities.rows, entities.cols),
            (self.model.entities.rows, self.model.entities.cols),
            "set_entities: shape"
        );
        self.model.entities = entities;
        self.begin_round();
    }

    /// Overwrite entity rows `ids[i]` with `rows.row(i)` at the start of a federated round;
    /// Adam state is kept or reset as [`TransEConfig::adam_across_rounds`] says.
    pub fn set_entity_rows(&mut self, ids: &[u32], rows: &Matrix) {
        assert_eq!(ids.len(), rows.rows, "set_entity_rows: ids vs rows");
        assert_eq!(rows.cols, self.model.dim(), "set_entity_rows: width");
        self.begin_round();
        for (i, &id) in ids.iter().enumerate() {
            self.model
                .entities
                .row_mut(id as usize)
                .copy_from_slice(rows.row(i));
        }
    }

    fn begin_round(&mut self) {
        if self.cfg.adam_across_rounds == AdamAcrossRounds::Reset {
            self.reset_optimizer();
        }
    }

    /// The true triples that [`NegativeFilter::KnownTriples`] keeps negatives away from
    /// (FedE: the client's training triples).
    pub fn set_known_triples(&mut self, triples: &[Triple]) {
        self.known = Some(FilterIndex::new(triples));
    }

    /// Forget Adam's moments and step counts.
    pub fn reset_optimizer(&mut self) {
        self.ent_adam.reset();
        self.rel_adam.reset();
    }

    /// Adam step counts per entity row (how many batches touched each row).
    pub fn entity_steps(&self) -> &[u32] {
        self.ent_adam.steps()
    }

    /// Adam step counts per relation row.
    pub fn relation_steps(&self) -> &[u32] {
        self.rel_adam.steps()
    }

    /// Draw `cfg.negatives` corruptions per positive into `out` (cleared first), on the side
    /// [`TransEConfig::corruption`] says. With [`NegativeFilter::KnownTriples`] an entity
    /// forming a known true triple is redrawn, up to [`FILTER_DRAWS`] times (then the last
    /// draw is kept, so a relation whose every entity is a known answer cannot stall).
    pub fn sample_negatives(&mut self, positives: &[Triple], out: &mut Vec<Triple>) {
        let n = self.model.num_entities() as u32;
        let filter = match self.cfg.negative_filter {
            NegativeFilter::None => None,
            NegativeFilter::KnownTriples => self.known.as_ref(),
        };
        sample_negatives_with(&mut self.rng, &self.cfg, n, filter, positives, out);
    }

    /// One optimisation step on `positives` with the given negatives (layout as in
    /// [`batch_loss_and_gradients`]); only rows the batch touches change. Returns the loss.
    pub fn step_with_negatives(&mut self, positives: &[Triple], negatives: &[Triple]) -> f32 {
        let loss = batch_loss_and_gradients_with(
            &self.model,
            self.cfg.loss,
            positives,
            negatives,
            &mut self.grads,
            &mut self.scratch,
        );
        self.ent_adam
            .step(&mut self.model.entities, &self.grads.entities);
        self.rel_adam
            .step(&mut self.model.relations, &self.grads.relations);
        if self.cfg.normalize_entities {
            for &row in self.grads.entities.rows() {
                normalize_l2(self.model.entities.row_mut(row as usize));
            }
        }
        loss
    }

    /// One step on `positives` with freshly sampled negatives. Returns the loss.
    pub fn train_batch(&mut self, positives: &[Triple]) -> f32 {
        let mut negs = std::mem::take(&mut self.negs);
        self.sample_negatives(positives, &mut negs);
        let loss = self.step_with_negatives(positives, &negs);
        self.negs = negs;
        loss
    }

    /// One pass over `triples` in a fresh random order, in batches of `cfg.batch_size` (the
    /// last one possibly smaller). Returns the mean loss per positive over the epoch.
    pub fn train_epoch(&mut self, triples: &[Triple]) -> f32 {
        self.epochs_done += 1;
        if triples.is_empty() {
            return 0.0;
        }
        if self.cfg.negative_filter == NegativeFilter::KnownTriples && self.known.is_none() {
            self.set_known_triples(triples);
        }
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(0..triples.len() as u32);
        // Fisher-Yates.
        for i in (1..order.len()).rev() {
            let j = self.rng.random_range(0..=i);
            order.swap(i, j);
        }
        let threads = self
            .cfg
            .threads
            .min(triples.len().div_ceil(self.cfg.batch_size));
        if threads > 1 {
            let total = self.parallel_epoch(triples, &order, threads);
            self.order = order;
            return (total / triples.len() as f64) as f32;
        }
        let mut batch = std::mem::take(&mut self.batch);
        let mut total = 0.0f64;
        for chunk in order.chunks(self.cfg.batch_size) {
            batch.clear();
            batch.extend(chunk.iter().map(|&i| triples[i as usize]));
            let l = self.train_batch(&batch);
            total += l as f64 * batch.len() as f64;
        }
        self.order = order;
        self.batch = batch;
        (total / triples.len() as f64) as f32
    }

    /// The epoch of [`Self::train_epoch`] over `order` on `threads` threads (Hogwild!).
    fn parallel_epoch(&mut self, triples: &[Triple], order: &[u32], threads: usize) -> f64 {
        let seeds = hogwild::thread_seeds(&mut self.rng, threads);
        let hyper = |a: &SparseAdam| hogwild::AdamHyper {
            lr: a.lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
        };
        let known = match self.cfg.negative_filter {
            NegativeFilter::None => None,
            NegativeFilter::KnownTriples => self.known.as_ref(),
        };
        let plan = hogwild::EpochPlan {
            cfg: &self.cfg,
            triples,
            order,
            known,
            ent_adam: hyper(&self.ent_adam),
            rel_adam: hyper(&self.rel_adam),
        };
        hogwild::parallel_epoch(
            &mut self.model,
            self.ent_adam.state_mut(),
            self.rel_adam.state_mut(),
            &plan,
            &seeds,
        )
    }

    /// `cfg.epochs` epochs; returns the per-epoch mean losses.
    pub fn train(&mut self, triples: &[Triple]) -> Vec<f32> {
        (0..self.cfg.epochs)
            .map(|e| {
                let l = self.train_epoch(triples);
                tracing::debug!(epoch = e + 1, loss = l, "transe epoch");
                l
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) - 0.5f32.ln()).abs() < 1e-6);
        assert!(log_sigmoid(-200.0).is_finite());
        assert!((log_sigmoid(-200.0) + 200.0).abs() < 1e-3);
        assert!(log_sigmoid(200.0).abs() < 1e-6);
        assert!((sigmoid(-200.0)).abs() < 1e-30);
    }

    #[test]
    fn negatives_never_equal_the_positive() {
        let mut t = TransETrainer::new(
            3,
            1,
            TransEConfig {
                dim: 2,
                negatives: 50,
                ..Default::default()
            },
        );
        let p = [Triple { h: 0, r: 0, t: 1 }];
        let mut out = Vec::new();
        t.sample_negatives(&p, &mut out);
        assert_eq!(out.len(), 50);
        let mut heads = 0;
        for n in &out {
            assert_ne!(*n, p[0]);
            assert!(n.h == p[0].h || n.t == p[0].t);
            assert!(n.h < 3 && n.t < 3);
            heads += (n.h != p[0].h) as usize;
        }
        assert!(
            heads > 5 && heads < 45,
            "head/tail corruption should be ~50/50: {heads}"
        );
    }

    #[test]
    fn config_defaults() {
        let c = TransEConfig::default();
        assert_eq!(
            (c.dim, c.negatives, c.batch_size, c.epochs, c.threads),
            (128, 4, 256, 100, 1)
        );
        assert_eq!(c.loss, Loss::MarginRanking { margin: 5.0 });
        let p = TransEConfig::pykeen_reference();
        assert_eq!((p.negatives, p.threads), (1, 1));
        assert_eq!(p.loss, Loss::MarginRanking { margin: 1.0 });
        assert_eq!(
            TransEConfig {
                loss: p.loss,
                negatives: p.negatives,
                ..c.clone()
            },
            p
        );
        let f = TransEConfig::fede_defaults();
        assert_eq!((f.dim, f.negatives, f.batch_size), (128, 256, 512));
        assert_eq!(f.norm, Norm::L1);
    }

    #[test]
    fn fede_init_bound_is_gamma_plus_epsilon_over_dim() {
        let f = TransEConfig::fede_defaults();
        assert_eq!(init_bound(&f), 0.09375);
        // Auto picks FedE's rule under the self-adversarial loss, Bordes's under margin.
        let auto = TransEConfig {
            init: EmbeddingInit::Auto,
            ..f.clone()
        };
        assert_eq!(init_bound(&auto), 0.09375);
        let margin = TransEConfig::default();
        assert_eq!(init_bound(&margin), 6.0 / 128f32.sqrt());
        // The trainer's tables follow the bound, relations included and not normalised.
        let t = TransETrainer::new(50, 7, f);
        let m = t.model();
        assert!(m
            .entities
            .data
            .iter()
            .chain(&m.relations.data)
            .all(|v| v.abs() <= 0.09375));
        let max_rel = m.relations.data.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(
            max_rel > 0.08,
            "relations not drawn in the full bound: {max_rel}"
        );
    }

    fn sampler(cfg: TransEConfig, n: usize) -> TransETrainer {
        TransETrainer::new(n, 2, TransEConfig { dim: 4, ..cfg })
    }

    #[test]
    fn tail_only_corruption_never_changes_the_head() {
        let mut t = sampler(
            TransEConfig {
                negatives: 200,
                corruption: Corruption::TailOnly,
                ..TransEConfig::fede_defaults()
            },
            20,
        );
        let p = [Triple { h: 3, r: 1, t: 7 }, Triple { h: 0, r: 0, t: 19 }];
        let mut out = Vec::new();
        t.sample_negatives(&p, &mut out);
        assert_eq!(out.len(), 400);
        for (i, n) in out.iter().enumerate() {
            let q = p[i / 200];
            assert_eq!((n.h, n.r), (q.h, q.r));
            assert_ne!(n.t, q.t);
        }
    }

    #[test]
    fn filtered_negatives_never_form_a_known_true_triple() {
        // Entities 0..6; (0, r0, ?) has known tails 1..=4 and (?, r0, 1) known heads 0, 2, 5,
        // so the only admissible tails are 0 and 5 and the only admissible head is 3 or 4.
        let known = [
            Triple { h: 0, r: 0, t: 1 },
            Triple { h: 0, r: 0, t: 2 },
            Triple { h: 0, r: 0, t: 3 },
            Triple { h: 0, r: 0, t: 4 },
            Triple { h: 2, r: 0, t: 1 },
            Triple { h: 5, r: 0, t: 1 },
            Triple { h: 1, r: 1, t: 1 },
        ];
        let truth: std::collections::HashSet<Triple> = known.iter().copied().collect();
        for corruption in [Corruption::TailOnly, Corruption::HeadOrTail] {
            let mut t = sampler(
                TransEConfig {
                    negatives: 300,
                    corruption,
                    negative_filter: NegativeFilter::KnownTriples,
                    ..TransEConfig::fede_defaults()
                },
                6,
            );
            t.set_known_triples(&known);
            let mut out = Vec::new();
            t.sample_negatives(&known[..1], &mut out);
            assert_eq!(out.len(), 300);
            for n in &out {
                assert!(
                    !truth.contains(n),
                    "{corruption:?}: {n:?} is a known triple"
                );
            }
            let tails: std::collections::HashSet<u32> =
                out.iter().filter(|n| n.h == 0).map(|n| n.t).collect();
            assert_eq!(tails, [0, 5].into_iter().collect());
        }
        // Without the filter the same draws do hit known triples.
        let mut t = sampler(
            TransEConfig {
                negatives: 300,
                corruption: Corruption::TailOnly,
                ..TransEConfig::fede_defaults()
            },
            6,
        );
        let mut out = Vec::new();
        t.sample_negatives(&known[..1], &mut out);
        assert!(out.iter().any(|n| truth.contains(n)));
    }

    #[test]
    fn adam_reset_each_round_clears_the_moments() {
        let triples: Vec<Triple> = (0..40u32)
            .map(|i| Triple {
                h: i % 10,
                r: i % 2,
                t: (i * 3 + 1) % 10,
            })
            .collect();
        for (mode, cleared) in [
            (AdamAcrossRounds::Reset, true),
            (AdamAcrossRounds::Keep, false),
        ] {
            let mut t = TransETrainer::new(
                10,
                2,
                TransEConfig {
                    dim: 8,
                    negatives: 4,
                    batch_size: 8,
                    adam_across_rounds: mode,
                    ..TransEConfig::fede_defaults()
                },
            );
            t.train_epoch(&triples);
            assert!(t.entity_steps().iter().all(|&s| s > 0));
            assert!(t.relation_steps().iter().all(|&s| s > 0));
            let rows = t.model().entities.clone();
            t.set_entities(rows);
            assert_eq!(
                t.entity_steps().iter().all(|&s| s == 0),
                cleared,
                "{mode:?}"
            );
            assert_eq!(
                t.relation_steps().iter().all(|&s| s == 0),
                cleared,
                "{mode:?}"
            );
        }
    }

    #[test]
    fn validation_names_the_bad_field_and_value() {
        let ok = TransEConfig::fede_defaults();
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(TransEConfig::default().validate(), Ok(()));
        let cases: Vec<(TransEConfig, &str, &str)> = vec![
            (
                TransEConfig {
                    negatives: 0,
                    ..ok.clone()
                },
                "negatives",
                "0",
            ),
            (
                TransEConfig {
                    batch_size: 0,
                    ..ok.clone()
                },
                "batch_size",
                "0",
            ),
            (
                TransEConfig {
                    threads: 0,
                    ..ok.clone()
                },
                "threads",
                "0",
            ),
            (
                TransEConfig {
                    threads: 5000,
                    ..ok.clone()
                },
                "threads",
                "5000",
            ),
            (
                TransEConfig {
                    lr: f32::NAN,
                    ..ok.clone()
                },
                "lr",
                "NaN",
            ),
            (
                TransEConfig {
                    lr: f32::INFINITY,
                    ..ok.clone()
                },
                "lr",
                "inf",
            ),
            (
                TransEConfig {
                    init: EmbeddingInit::GammaEpsilon { epsilon: 2.0 },
                    ..TransEConfig::default()
                },
                "init",
                "gamma_epsilon",
            ),
        ];
        for (cfg, field, value) in cases {
            match cfg.validate() {
                Err(ConfigError::Invalid {
                    field: f, value: v, ..
                }) => {
                    assert_eq!((f, v.as_str()), (field, value));
                }
                other => panic!("{field}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn new_settings_deserialise_by_name_and_unknown_fields_are_rejected() {
        let c: TransEConfig = serde_json::from_str(
            r#"{"corruption": "tail_only", "negative_filter": "known_triples",
                "adam_across_rounds": "reset", "init": {"gamma_epsilon": {"epsilon": 1.0}},
                "loss": {"SelfAdversarial": {"gamma": 6.0, "temperature": 1.0}}}"#,
        )
        .unwrap();
        assert_eq!(c.corruption, Corruption::TailOnly);
        assert_eq!(c.negative_filter, NegativeFilter::KnownTriples);
        assert_eq!(c.adam_across_rounds, AdamAcrossRounds::Reset);
        assert_eq!(init_bound(&c), 7.0 / 128.0);
        assert!(serde_json::from_str::<TransEConfig>(r#"{"corruptoin": "tail_only"}"#).is_err());
        assert!(serde_json::from_str::<TransEConfig>(r#"{"corruption": "heads"}"#).is_err());
    }

    #[test]
    fn init_bounds_and_unit_relations() {
        let mut rng = StdRng::seed_from_u64(3);
        let m = TransE::random(10, 4, 16, Norm::L1, &mut rng);
        let b = 6.0 / 4.0;
        assert!(m.entities.data.iter().all(|v| v.abs() <= b));
        for i in 0..4 {
            let n: f32 = m.relations.row(i).iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }
}
