//! Data formats for SimSkip federation: knowledge-graph triples, entity labels and
//! embedding tables, with readers that name the file, line and problem on bad input.

pub mod dataset;
pub mod embeddings;
pub mod error;
pub mod fsutil;
pub mod labels;
pub mod matrix;
pub mod partition;
pub mod tensors;
pub mod triples;
pub mod vocab;

pub use dataset::KgDataset;
pub use embeddings::{EmbeddingFormat, Embeddings};
pub use error::{DataError, Result};
pub use fsutil::write_atomic;
pub use labels::{read_labels, write_labels, Labels};
pub use matrix::Matrix;
pub use partition::{partition, write_partitions, ClientPartition, PartitionBy, PartitionConfig};
pub use tensors::{read_named_safetensors, write_named_safetensors, NamedArray};
pub use triples::{read_triples, write_triples, Triple};
pub use vocab::Vocab;
