//! Named arrays: the unit in which model weights and embedding rows travel between the
//! coordinator and the clients, and in which they are saved.

/// A named f32 array with its shape, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedArray {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedArray {
    /// Panics when `data` does not fill `shape`: a programming error.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "named array shape");
        Self {
            name: name.into(),
            shape,
            data,
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
