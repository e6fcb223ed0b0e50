//! Typed errors of the refinement crate.

/// Everything that can go wrong while building, training, exporting or importing a SimSkip model.
#[derive(Debug, thiserror::Error)]
pub enum RefineError {
    /// An error from the candle tensor library.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A weight array the model needs is absent from the imported set.
    #[error("import: missing array `{0}`")]
    MissingArray(String),
    /// An imported array's shape (or data length) differs from the model's.
    #[error(
        "import: array `{name}` has shape {found:?} (data length {len}), expected {expected:?}"
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        len: usize,
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
