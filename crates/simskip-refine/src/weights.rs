//! The SimSkip parameters and BatchNorm running statistics, with their one layout table.
//!
//! [`PARAMS`] lists every array of the network once: its name on the wire and in saved files,
//! its shape as a function of the embedding dimension, and its kind (which also says how it is
//! initialised). Everything that needs the layout iterates that table: [`Weights::init`],
//! [`Weights::to_arrays`], [`Weights::from_arrays`], the fused trainer's views
//! ([`Weights::get`], [`Layout::range`]) and building the candle model
//! ([`SimSkipModel::new`](crate::model::SimSkipModel::new)).
//!
//! [`Weights`] owns the values: the trained parameters in one contiguous buffer and the
//! BatchNorm running statistics in another, each array at the offset the [`Layout`] gives. One
//! buffer for the trained parameters lets AdamW run as one loop over gradient and moment
//! buffers of the same layout; keeping the statistics apart lets a training step update them
//! while it reads the parameters.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::Rng;
use simskip_data::NamedArray;

use crate::error::{RefineError, Result};
use crate::train::SimSkipConfig;

/// A width of the network, as a function of the embedding dimension `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// `d`.
    Dim,
    /// The encoder's first layer, `d / 2`.
    Half,
}

impl Width {
    pub const fn of(self, dim: usize) -> usize {
        match self {
            Width::Dim => dim,
            Width::Half => dim / 2,
        }
    }
}

/// The shape of an array as a function of the embedding dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Vector(Width),
    /// `(rows, cols)`; a linear weight is `(fan_out, fan_in)`.
    Matrix(Width, Width),
}

impl Shape {
    /// The concrete shape for dimension `dim`.
    pub fn dims(self, dim: usize) -> Vec<usize> {
        match self {
            Shape::Vector(n) => vec![n.of(dim)],
            Shape::Matrix(r, c) => vec![r.of(dim), c.of(dim)],
        }
    }

    /// Number of values for dimension `dim`.
    pub const fn numel(self, dim: usize) -> usize {
        match self {
            Shape::Vector(n) => n.of(dim),
            Shape::Matrix(r, c) => r.of(dim) * c.of(dim),
        }
    }
}

/// What an array is, which decides its initial value and whether AdamW trains it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A linear layer's weight, `(fan_out, fan_in)`: PyTorch's default init, uniform in
    /// `±1/sqrt(fan_in)`, drawn before the layer's `bias` (drawn with the same bound).
    LinearWeight { bias: Param },
    /// A linear layer's bias; drawn right after its weight.
    LinearBias,
    /// BatchNorm scale γ, starts at 1.
    BnWeight,
    /// BatchNorm shift β, starts at 0.
    BnBias,
    /// BatchNorm running mean (a statistic, not trained), starts at 0.
    RunningMean,
    /// BatchNorm running variance (a statistic, not trained), starts at 1.
    RunningVar,
}

impl Kind {
    /// True for arrays the optimiser trains; false for BatchNorm running statistics.
    pub const fn is_trainable(self) -> bool {
        !matches!(self, Kind::RunningMean | Kind::RunningVar)
    }

    /// True for BatchNorm's scale, shift and running statistics: what FedBN keeps local.
    pub const fn is_batch_norm(self) -> bool {
        matches!(
            self,
            Kind::BnWeight | Kind::BnBias | Kind::RunningMean | Kind::RunningVar
        )
    }
}

/// An array of the network; its discriminant is its row in [`PARAMS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    Bn1Bias,
    Bn1RunningMean,
    Bn1RunningVar,
    Bn1Weight,
    Linear1Bias,
    Linear1Weight,
    Bn2Bias,
    Bn2RunningMean,
    Bn2RunningVar,
    Bn2Weight,
    Linear2Bias,
    Linear2Weight,
    OutBias,
    OutWeight,
    Projector0Bias,
    Projector0Weight,
    Projector2Bias,
    Projector2Weight,
}

impl Param {
    /// The row of this array in [`PARAMS`].
    pub fn spec(self) -> &'static ParamSpec {
        &PARAMS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }
}

/// One row of the parameter table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub param: Param,
    /// The array's name in exported weights (PyTorch-style module path).
    pub name: &'static str,
    pub shape: Shape,
    pub kind: Kind,
}

impl ParamSpec {
    /// The row named `name`.
    pub fn by_name(name: &str) -> Option<&'static ParamSpec> {
        PARAMS.iter().find(|s| s.name == name)
    }
}

const fn row(param: Param, name: &'static str, shape: Shape, kind: Kind) -> ParamSpec {
    ParamSpec {
        param,
        name,
        shape,
        kind,
    }
}

use Kind::*;
use Param::*;
use Width::{Dim as D, Half as H};

/// Rows of [`PARAMS`].
pub const NUM_PARAMS: usize = 18;

/// The parameter table (a `static`, so [`Param::spec`] can hand out `'static` rows): every weight, bias and BatchNorm statistic of the network, sorted by
/// name (the order of [`Weights::to_arrays`], and of the saved and transmitted weights).
///
/// Encoder `g`: `Linear(d, d/2) → BN → ReLU → Dropout`, `Linear(d/2, d) → BN → ReLU → Dropout`,
/// `Linear(d, d)`; projector `Linear(d, d) → ReLU → Linear(d, d)`. Sorted by name, the linear
/// layers come in network order, which is the order [`Weights::init`] draws them in.
pub static PARAMS: [ParamSpec; NUM_PARAMS] = [
    row(Bn1Bias, "encoder.layer1.bn.bias", Shape::Vector(H), BnBias),
    row(
        Bn1RunningMean,
        "encoder.layer1.bn.running_mean",
        Shape::Vector(H),
        RunningMean,
    ),
    row(
        Bn1RunningVar,
        "encoder.layer1.bn.running_var",
        Shape::Vector(H),
        RunningVar,
    ),
    row(
        Bn1Weight,
        "encoder.layer1.bn.weight",
        Shape::Vector(H),
        BnWeight,
    ),
    row(
        Linear1Bias,
        "encoder.layer1.linear.bias",
        Shape::Vector(H),
        LinearBias,
    ),
    row(
        Linear1Weight,
        "encoder.layer1.linear.weight",
        Shape::Matrix(H, D),
        LinearWeight { bias: Linear1Bias },
    ),
    row(Bn2Bias, "encoder.layer2.bn.bias", Shape::Vector(D), BnBias),
    row(
        Bn2RunningMean,
        "encoder.layer2.bn.running_mean",
        Shape::Vector(D),
        RunningMean,
    ),
    row(
        Bn2RunningVar,
        "encoder.layer2.bn.running_var",
        Shape::Vector(D),
        RunningVar,
    ),
    row(
        Bn2Weight,
        "encoder.layer2.bn.weight",
        Shape::Vector(D),
        BnWeight,
    ),
    row(
        Linear2Bias,
        "encoder.layer2.linear.bias",
        Shape::Vector(D),
        LinearBias,
    ),
    row(
        Linear2Weight,
        "encoder.layer2.linear.weight",
        Shape::Matrix(D, H),
        LinearWeight { bias: Linear2Bias },
    ),
    row(OutBias, "encoder.out.bias", Shape::Vector(D), LinearBias),
    row(
        OutWeight,
        "encoder.out.weight",
        Shape::Matrix(D, D),
        LinearWeight { bias: OutBias },
    ),
    row(
        Projector0Bias,
        "projector.0.bias",
        Shape::Vector(D),
        LinearBias,
    ),
    row(
        Projector0Weight,
        "projector.0.weight",
        Shape::Matrix(D, D),
        LinearWeight {
            bias: Projector0Bias,
        },
    ),
    row(
        Projector2Bias,
        "projector.2.bias",
        Shape::Vector(D),
        LinearBias,
    ),
    row(
        Projector2Weight,
        "projector.2.weight",
        Shape::Matrix(D, D),
        LinearWeight {
            bias: Projector2Bias,
        },
    ),
];

// Each row sits at its `Param`'s index, so `Param::spec` is a plain index.
const _: () = {
    let mut i = 0;
    while i < PARAMS.len() {
        assert!(PARAMS[i].param as usize == i);
        i += 1;
    }
};

/// Where each array of [`PARAMS`] lives for one dimension: trainable arrays in the parameter
/// buffer, running statistics in the statistics buffer, each in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    dim: usize,
    /// `(start, end)` of each row in its buffer.
    spans: [(usize, usize); NUM_PARAMS],
    trainable_len: usize,
    statistics_len: usize,
}

impl Layout {
    pub fn new(dim: usize) -> Self {
        let mut spans = [(0, 0); NUM_PARAMS];
        let (mut trainable_len, mut statistics_len) = (0, 0);
        for (span, spec) in spans.iter_mut().zip(&PARAMS) {
            let end = if spec.kind.is_trainable() {
                &mut trainable_len
            } else {
                &mut statistics_len
            };
            let start = *end;
            *end += spec.shape.numel(dim);
            *span = (start, *end);
        }
        Self {
            dim,
            spans,
            trainable_len,
            statistics_len,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The range of `param` in its buffer (parameters or statistics, by its kind).
    pub fn range(&self, param: Param) -> Range<usize> {
        let (start, end) = self.spans[param as usize];
        start..end
    }

    /// The arrays of `a` and `b` in `buf` (both in the parameter buffer, or both in the
    /// statistics buffer), mutable together.
    pub(crate) fn two_mut<'a>(
        &self,
        buf: &'a mut [f32],
        a: Param,
        b: Param,
    ) -> (&'a mut [f32], &'a mut [f32]) {
        two_mut(buf, self.range(a), self.range(b))
    }

    /// Length of the trained-parameter buffer (the number of trained scalars).
    pub fn trainable_len(&self) -> usize {
        self.trainable_len
    }

    /// Length of the BatchNorm statistics buffer.
    pub fn statistics_len(&self) -> usize {
        self.statistics_len
    }
}

/// Every parameter and BatchNorm running statistic of one SimSkip network.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    layout: Layout,
    /// The trained arrays, in table order.
    trainable: Vec<f32>,
    /// The BatchNorm running statistics, in table order.
    statistics: Vec<f32>,
}

fn check_dim(dim: usize) -> Result<()> {
    if dim < 2 {
        return Err(RefineError::Config(format!(
            "dimension must be >= 2, got {dim}"
        )));
    }
    Ok(())
}

impl Weights {
    /// Weights of a `dim`-dimensional model (`dim >= 2`) as initialised from `rng`: linear layers
    /// with PyTorch's default (weight then bias, uniform in `±1/sqrt(fan_in)`, layer by layer in
    /// network order), except that `cfg.zero_init_residual` sets the encoder's output layer to
    /// zero (no draws; a skip model is then exactly the identity); BatchNorm at weight 1, bias
    /// 0, running mean 0, running variance 1.
    pub fn init(dim: usize, cfg: &SimSkipConfig, rng: &mut StdRng) -> Result<Self> {
        check_dim(dim)?;
        let layout = Layout::new(dim);
        let mut w = Self {
            layout,
            trainable: vec![0.0; layout.trainable_len],
            statistics: vec![0.0; layout.statistics_len],
        };
        for spec in &PARAMS {
            match spec.kind {
                LinearWeight { bias } => {
                    if cfg.zero_init_residual && spec.param == OutWeight {
                        continue; // already zero, weight and bias
                    }
                    let fan_in = spec.shape.dims(dim)[1];
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    for p in [spec.param, bias] {
                        for v in w.get_mut(p) {
                            *v = rng.random_range(-bound..=bound);
                        }
                    }
                }
                BnWeight | RunningVar => w.get_mut(spec.param).fill(1.0),
                LinearBias | BnBias | RunningMean => {}
            }
        }
        Ok(w)
    }

    /// Weights from named arrays, validated against the table for dimension `dim`: exactly the
    /// table's names (none missing, none extra, none twice), each with the table's shape for
    /// `dim` and only finite values. A set exported by a model of another dimension fails with
    /// [`RefineError::ShapeMismatch`]. The order of `arrays` does not matter. Negative running
    /// variances (DP noise on an averaged model) are clamped to 0.
    pub fn from_arrays(dim: usize, arrays: &[NamedArray]) -> Result<Self> {
        check_dim(dim)?;
        let mut found: [Option<&NamedArray>; NUM_PARAMS] = [None; NUM_PARAMS];
        for a in arrays {
            let spec = ParamSpec::by_name(&a.name).ok_or_else(|| RefineError::UnexpectedArray {
                name: a.name.clone(),
            })?;
            if found[spec.param as usize].replace(a).is_some() {
                return Err(RefineError::DuplicateArray {
                    name: a.name.clone(),
                });
            }
        }
        let layout = Layout::new(dim);
        let mut w = Self {
            layout,
            trainable: vec![0.0; layout.trainable_len],
            statistics: vec![0.0; layout.statistics_len],
        };
        for (spec, a) in PARAMS.iter().zip(found) {
            let a = a.ok_or_else(|| RefineError::MissingArray {
                name: spec.name.to_string(),
            })?;
            let expected = spec.shape.dims(dim);
            if a.shape != expected || a.data.len() != spec.shape.numel(dim) {
                return Err(RefineError::ShapeMismatch {
                    name: a.name.clone(),
                    dim,
                    expected,
                    found: a.shape.clone(),
                    len: a.data.len(),
                });
            }
            if let Some((index, &value)) = a.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(RefineError::NonFinite {
                    name: a.name.clone(),
                    index,
                    value,
                });
            }
            let target = w.get_mut(spec.param);
            target.copy_from_slice(&a.data);
            if spec.kind == Kind::RunningVar {
                // A variance is never negative, but an average of running variances that
                // carry differential-privacy noise can be. Clamping is post-processing (it
                // costs no privacy) and BatchNorm adds its epsilon, so 0 stays usable.
                for v in target.iter_mut().filter(|v| **v < 0.0) {
                    *v = 0.0;
                }
            }
        }
        Ok(w)
    }

    /// Every array as a [`NamedArray`], in table order (sorted by name).
    pub fn to_arrays(&self) -> Vec<NamedArray> {
        PARAMS
            .iter()
            .map(|s| NamedArray::new(s.name, s.shape.dims(self.dim()), self.get(s.param).to_vec()))
            .collect()
    }

    pub fn dim(&self) -> usize {
        self.layout.dim
    }

    /// Width of the encoder's first layer, `dim / 2`.
    pub fn hidden(&self) -> usize {
        Width::Half.of(self.dim())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The values of `param`, row-major.
    pub fn get(&self, param: Param) -> &[f32] {
        let r = self.layout.range(param);
        if param.spec().kind.is_trainable() {
            &self.trainable[r]
        } else {
            &self.statistics[r]
        }
    }

    pub fn get_mut(&mut self, param: Param) -> &mut [f32] {
        let r = self.layout.range(param);
        if param.spec().kind.is_trainable() {
            &mut self.trainable[r]
        } else {
            &mut self.statistics[r]
        }
    }

    /// The trained parameters, every trainable array in table order ([`Layout::range`]).
    pub fn trainable(&self) -> &[f32] {
        &self.trainable
    }

    /// The BatchNorm running statistics, in table order ([`Layout::range`]).
    pub fn statistics(&self) -> &[f32] {
        &self.statistics
    }

    /// Both buffers at once: the trained parameters and the statistics, for a training step that
    /// reads the first while it updates the second.
    pub fn buffers_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.trainable, &mut self.statistics)
    }

    /// Number of trained scalars: linear weights and biases, BatchNorm weights and biases.
    pub fn num_trainable(&self) -> usize {
        self.trainable.len()
    }
}

/// Two disjoint ranges of `buf`, both mutable.
///
/// # Panics
/// If the ranges overlap or leave `buf` (a programming error: ranges come from a [`Layout`]).
pub(crate) fn two_mut(
    buf: &mut [f32],
    a: Range<usize>,
    b: Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    if a.start < b.start {
        assert!(a.end <= b.start, "overlapping ranges");
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        assert!(b.end <= a.start, "overlapping ranges");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_linears_pair_with_their_bias() {
        let names: Vec<&str> = PARAMS.iter().map(|s| s.name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
        for s in &PARAMS {
            if let LinearWeight { bias } = s.kind {
                let layer = s.name.strip_suffix(".weight").unwrap();
                assert_eq!(bias.name(), format!("{layer}.bias"));
                assert_eq!(bias.spec().kind, LinearBias);
                let (Shape::Matrix(rows, _), Shape::Vector(n)) = (s.shape, bias.spec().shape)
                else {
                    panic!("{}: weight must be a matrix, bias a vector", s.name);
                };
                assert_eq!(rows, n, "{}", s.name);
            }
        }
    }

    #[test]
    fn layout_packs_each_buffer_without_gaps() {
        let l = Layout::new(10);
        let mut t = 0;
        let mut s = 0;
        for spec in &PARAMS {
            let r = l.range(spec.param);
            assert_eq!(r.len(), spec.shape.numel(10));
            let end = if spec.kind.is_trainable() {
                &mut t
            } else {
                &mut s
            };
            assert_eq!(r.start, *end, "{}", spec.name);
            *end = r.end;
        }
        assert_eq!((t, s), (l.trainable_len(), l.statistics_len()));
        assert_eq!(s, 2 * 5 + 2 * 10);
    }

    #[test]
    fn two_mut_gives_the_asked_ranges_in_either_order() {
        let mut buf: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let (a, b) = two_mut(&mut buf, 6..9, 1..3);
        assert_eq!((&a[..], &b[..]), (&[6.0, 7.0, 8.0][..], &[1.0, 2.0][..]));
        let (a, b) = two_mut(&mut buf, 0..2, 2..4);
        assert_eq!((&a[..], &b[..]), (&[0.0, 1.0][..], &[2.0, 3.0][..]));
    }
}
