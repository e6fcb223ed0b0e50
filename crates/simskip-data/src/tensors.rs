//! Named arrays: the unit in which model weights and embedding rows travel between the
//! coordinator and the clients, and in which they are saved (as `.safetensors`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{DataError, Result};
use crate::fsutil::{read_bytes, write_atomic};

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
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "named array shape"
        );
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

/// Write `arrays` as F32 tensors, with `metadata` as the file's string metadata, to a
/// `.safetensors` file. The write is atomic ([`crate::fsutil::write_atomic`]): after a crash
/// `path` holds the previous file or the new one, never a torn one. Names must be unique and
/// non-empty, and each array's `data` must fill its `shape`.
pub fn write_named_safetensors(
    path: &Path,
    arrays: &[NamedArray],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes = named_safetensors_bytes(path, arrays, metadata)?;
    write_atomic(path, &bytes)
}

/// The bytes [`write_named_safetensors`] writes (`path` only names the file in errors).
pub(crate) fn named_safetensors_bytes(
    path: &Path,
    arrays: &[NamedArray],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    for a in arrays {
        if a.name.is_empty() || a.name == "__metadata__" {
            return Err(DataError::Invalid(format!(
                "{}: invalid tensor name '{}'",
                path.display(),
                a.name
            )));
        }
        if !seen.insert(a.name.as_str()) {
            return Err(DataError::Invalid(format!(
                "{}: two arrays are named '{}'",
                path.display(),
                a.name
            )));
        }
        let numel = a
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(a.data.len()) {
            return Err(DataError::Invalid(format!(
                "{}: array '{}' has {} values, which does not fill shape {:?}",
                path.display(),
                a.name,
                a.data.len(),
                a.shape
            )));
        }
    }
    let raw: Vec<Vec<u8>> = arrays
        .iter()
        .map(|a| a.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(arrays.len());
    for (a, b) in arrays.iter().zip(&raw) {
        let view = TensorView::new(Dtype::F32, a.shape.clone(), b)
            .map_err(|e| DataError::format(path, format!("tensor '{}': {e}", a.name)))?;
        views.push((a.name.clone(), view));
    }
    let meta: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    safetensors::serialize(views, meta)
        .map_err(|e| DataError::format(path, format!("cannot serialise safetensors: {e}")))
}

/// Parse a whole `.safetensors` file, with errors naming `path`.
pub(crate) fn parse_safetensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(SafeTensors<'a>, BTreeMap<String, String>)> {
    if bytes.is_empty() {
        return Err(DataError::format(path, "empty file"));
    }
    let bad = |e: safetensors::SafeTensorError| {
        DataError::format(path, format!("not a valid .safetensors file: {e}"))
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(bad)?;
    Ok((st, metadata))
}

/// Little-endian bytes to f32 (`bytes.len()` a multiple of 4; a tail is ignored).
pub(crate) fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian bytes to f64 (`bytes.len()` a multiple of 8; a tail is ignored).
pub(crate) fn f64s_from_le(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Read every tensor of a `.safetensors` file (all must be F32), sorted by name, and the
/// file's string metadata (empty when it has none).
pub fn read_named_safetensors(path: &Path) -> Result<(Vec<NamedArray>, BTreeMap<String, String>)> {
    let bytes = read_bytes(path)?;
    let (st, metadata) = parse_safetensors(path, &bytes)?;
    let mut arrays = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(DataError::format(
                path,
                format!(
                    "tensor '{name}' has dtype {:?}; only F32 is supported",
                    view.dtype()
                ),
            ));
        }
        arrays.push(NamedArray {
            name,
            shape: view.shape().to_vec(),
            data: f32s_from_le(view.data()),
        });
    }
    arrays.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((arrays, metadata))
}
