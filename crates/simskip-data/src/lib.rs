//! Data formats for SimSkip federation: knowledge-graph triples, entity labels and
//! embedding tables, with readers that name the file, line and problem on bad input.

pub mod dataset;
pub mod embeddings;
pub mod error;
pub mod labels;
pub mod matrix;
pub mod partition;
pub mod tensors;
pub mod triples;
pub mod vocab;

pub use dataset::KgDataset;
pub use embeddings::Embeddings;
pub use error::{DataError, Result};
pub use labels::Labels;
pub use matrix::Matrix;
pub use triples::Triple;
pub use vocab::Vocab;
pub use tensors::NamedArray;
