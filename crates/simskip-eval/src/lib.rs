//! Downstream tasks that compare an input embedding table with its SimSkip-refined version:
//! KNN same-label precision, an MLP label probe, a label-free neighbour-retrieval signal for
//! choosing the refinement epoch, and a plain-text report. Each module has one job:
//!
//! * [`split`]: a fixed, seeded, stratified train/valid/test split of the labelled entities;
//! * [`knn`]: KNN same-label precision@k under cosine similarity;
//! * [`probe`]: a 3-layer MLP classifier trained on one split, selected on another, reported on
//!   the third;
//! * [`f1`]: accuracy and macro-F1;
//! * [`signal`]: mean reciprocal rank of held-out graph neighbours (no labels needed);
//! * [`report`]: the figures of one table and their aligned rendering;
//! * [`reference`]: the straightforward implementations the fast ones replaced, kept as test
//!   oracles and benchmark baselines.
//!
//! Similarities are blocked `gemm` products and the probe trains on full-matrix `gemm` steps;
//! both use rayon's threads (`RAYON_NUM_THREADS`).
//!
//! Link prediction lives in `simskip-kge` and is not wired in here yet; [`report::TaskFigures`]
//! carries its columns so the lead can fill them in.

pub mod error;
pub mod f1;
pub mod knn;
mod matmul;
pub mod probe;
pub mod reference;
pub mod report;
pub mod signal;
pub mod split;

pub use error::{EvalError, Result};
pub use f1::{accuracy, macro_f1};
pub use knn::knn_precision_at_k;
pub use probe::{probe, ProbeConfig, ProbeResult};
pub use report::{render_table, Comparison, TaskFigures};
pub use signal::{neighbour_retrieval_mrr, pairs_of, Adjacency};
pub use split::{label_split, LabelSplit};
