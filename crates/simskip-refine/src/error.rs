//! Typed errors of the refinement crate.

/// Everything that can go wrong while building, training, exporting or importing a SimSkip model.
#[derive(Debug, thiserror::Error)]
pub enum RefineError {
    /// An error from the candle tensor library.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A weight array of the parameter table is absent from the imported set.
    #[error("weights: missing array `{name}`")]
    MissingArray { name: String },
    /// An imported array's name is not in the parameter table (a wrong name or an extra array).
    #[error("weights: unexpected array `{name}`: not a SimSkip parameter")]
    UnexpectedArray { name: String },
    /// An imported set names the same array more than once.
    #[error("weights: array `{name}` appears more than once")]
    DuplicateArray { name: String },
    /// An imported array's shape (or data length) differs from the table's for this dimension
    /// (for instance weights of a model of another dimension).
    #[error(
        "weights: array `{name}` has shape {found:?} (data length {len}), expected {expected:?} for dimension {dim}"
    )]
    ShapeMismatch {
        name: String,
        dim: usize,
        expected: Vec<usize>,
        found: Vec<usize>,
        len: usize,
    },
    /// An imported array holds a NaN or an infinity.
    #[error("weights: array `{name}` has the non-finite value {value} at index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    /// The input table's width differs from the model's dimension.
    #[error("input has {found} columns, the model expects {expected}")]
    DimMismatch { expected: usize, found: usize },
    /// The neighbour lists describe a different number of entities than the table has rows.
    #[error("neighbours cover {found} entities, the table has {expected} rows")]
    NeighbourCount { expected: usize, found: usize },
    /// An edge names an entity outside `0..n`.
    #[error("edge ({0}, {1}) names an entity outside 0..{2}")]
    EdgeOutOfRange(u32, u32, usize),
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, RefineError>;
