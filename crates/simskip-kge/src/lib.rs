//! simskip-kge: TransE knowledge-graph embeddings in plain Rust.
//!
//! * [`transe`]: the model, its hand-written gradients and a trainer with lazy (row-sparse)
//!   Adam, so an epoch costs time proportional to the number of triples.
//! * [`linkpred`]: filtered link prediction (MRR, Hits@k; realistic rank).
//! * [`refit`]: closed-form relation vectors for a frozen (e.g. refined) entity table.
//! * [`hogwild`]: lock-free multi-threaded TransE epochs.
//! * [`sparse`]: row-sparse gradients and lazy Adam.
//! * [`bench`]: throughput figures for `simskip bench`.

pub mod bench;
pub mod hogwild;
pub mod linkpred;
pub mod refit;
pub mod sparse;
pub mod transe;

pub use linkpred::{evaluate, FilterIndex, LinkPredictionMetrics, QueryRanks, TailOnly};
pub use refit::refit_relations;
pub use transe::{
    init_bound, AdamAcrossRounds, ConfigError, Corruption, EmbeddingInit, Loss, NegativeFilter,
    Norm, TransE, TransEConfig, TransETrainer,
};
