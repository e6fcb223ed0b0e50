//! Embedding tables: a name per row plus a dense matrix. Readers for `.npy` (f32, f64; the
//! names from a sibling id list), `.safetensors` and word2vec-style text; writers for `.npy`
//! plus id list and `.safetensors`.

use crate::matrix::Matrix;
use crate::vocab::Vocab;

/// An embedding table: row `i` of `matrix` is the vector of `names.name(i)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub names: Vocab,
    pub matrix: Matrix,
}

impl Embeddings {
    pub fn dim(&self) -> usize {
        self.matrix.cols
    }
    pub fn len(&self) -> usize {
        self.matrix.rows
    }
    pub fn is_empty(&self) -> bool {
        self.matrix.rows == 0
    }
}
