//! Typed errors of the evaluation tasks.

/// What can go wrong in an evaluation. Contract violations that are plainly programming errors
/// (mismatched slice lengths in the metric functions) panic instead, like `Matrix::from_vec`.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A tensor operation failed inside candle (shape mismatch, backend error, ...).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The inputs cannot be evaluated as given (empty split, unlabelled entity in a split,
    /// class id out of range, table and labels of different sizes, ...).
    #[error("invalid evaluation input: {0}")]
    Invalid(String),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
