//! Embedding tables: a name per row plus a dense matrix.
//!
//! Formats, chosen by [`Embeddings::read`] from the file extension:
//! - `.npy`: a 2-D float32 or float64 array (C or Fortran order, either byte order), one row
//!   per entity. Row names come from the sibling id list `<stem>.ids.txt` (`emb.npy` ->
//!   `emb.ids.txt`, one name per line); without it the rows are named `0`, `1`, ...
//! - `.safetensors`: a 2-D F32 or F64 tensor named `embeddings`. Names from the sibling
//!   `<stem>.ids.txt` when present, else from the metadata key `ids` (names joined by `\n`),
//!   else `0`, `1`, ...
//! - anything else is text (`.txt`, `.vec`, `.w2v`, ...): `name v1 v2 ...` per line, separated
//!   by whitespace, with an optional word2vec header line `COUNT DIM` that is checked against
//!   the body. A first line made of exactly two unsigned integers is taken as that header (so
//!   a 1-dimensional table whose first name is a number needs the header).
//!
//! Every reader rejects NaN and infinite values, duplicate names, ragged rows and empty files
//! with one [`DataError`] naming the file (and for text the 1-based line). Writers produce
//! files the readers accept, and write atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use npyz::{DType, Order, TypeChar, WriterBuilder};

use crate::error::{DataError, Result};
use crate::fsutil::{self, read_bytes, write_atomic};
use crate::labels::{read_labels, Labels};
use crate::matrix::Matrix;
use crate::tensors::{
    f32s_from_le, f64s_from_le, named_safetensors_bytes, parse_safetensors, NamedArray,
};
use crate::vocab::Vocab;

/// Name of the tensor holding the table in a `.safetensors` embeddings file.
pub const EMBEDDINGS_TENSOR: &str = "embeddings";
/// Metadata key holding the row names (joined by `\n`) in a `.safetensors` embeddings file.
pub const IDS_METADATA_KEY: &str = "ids";

/// An embedding table: row `i` of `matrix` is the vector of `names.name(i)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub names: Vocab,
    pub matrix: Matrix,
}

/// The on-disk formats of an embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingFormat {
    Npy,
    Safetensors,
    Text,
}

impl EmbeddingFormat {
    /// The format a path means, from its extension (case-insensitive): `.npy`,
    /// `.safetensors`, anything else text.
    pub fn from_path(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("npy") => EmbeddingFormat::Npy,
            Some("safetensors") => EmbeddingFormat::Safetensors,
            _ => EmbeddingFormat::Text,
        }
    }
}

/// The id list that goes with a binary table: `emb.npy` -> `emb.ids.txt`.
pub fn ids_path(path: &Path) -> PathBuf {
    path.with_extension("ids.txt")
}

impl Embeddings {
    /// A table from names and rows; an error when the counts differ or a name repeats
    /// (a [`Vocab`] cannot hold a repeat, so only the count can be wrong).
    pub fn new(names: Vocab, matrix: Matrix) -> Result<Self> {
        let e = Self { names, matrix };
        e.check_shape()?;
        Ok(e)
    }

    pub fn dim(&self) -> usize {
        self.matrix.cols
    }
    pub fn len(&self) -> usize {
        self.matrix.rows
    }
    pub fn is_empty(&self) -> bool {
        self.matrix.rows == 0
    }

    /// The vector of `name`, if the table has it.
    pub fn vector(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.get(name)? as usize;
        (i < self.matrix.rows).then(|| self.matrix.row(i))
    }

    /// Read a table, the format chosen by the extension (see the module docs).
    pub fn read(path: &Path) -> Result<Self> {
        match EmbeddingFormat::from_path(path) {
            EmbeddingFormat::Npy => Self::read_npy(path),
            EmbeddingFormat::Safetensors => Self::read_safetensors(path),
            EmbeddingFormat::Text => Self::read_text(path),
        }
    }

    /// Write a table, the format chosen by the extension (see the module docs).
    pub fn write(&self, path: &Path) -> Result<()> {
        match EmbeddingFormat::from_path(path) {
            EmbeddingFormat::Npy => self.write_npy(path),
            EmbeddingFormat::Safetensors => self.write_safetensors(path),
            EmbeddingFormat::Text => self.write_text(path),
        }
    }

    /// Read a 2-D float32/float64 `.npy` array plus its `<stem>.ids.txt` names (or `0`, `1`,
    /// ... when there is no id list).
    pub fn read_npy(path: &Path) -> Result<Self> {
        let bytes = read_bytes(path)?;
        let fail = |m: String| DataError::format(path, m);
        if bytes.is_empty() {
            return Err(fail("empty file".into()));
        }
        let (data_offset, pre_shape) = npy_preflight(&bytes).map_err(fail)?;
        let npy = npyz::NpyFile::new(&bytes[..])
            .map_err(|e| fail(format!("not a valid .npy file: {e}")))?;
        let shape = npy.shape().to_vec();
        if shape != pre_shape {
            return Err(fail(format!(
                "ambiguous .npy header (shape {shape:?} or {pre_shape:?}?)"
            )));
        }
        if shape.len() != 2 {
            return Err(fail(format!(
                "expected a 2-D array (one row per entity), found shape {shape:?}"
            )));
        }
        let (rows, cols) = match (usize::try_from(shape[0]), usize::try_from(shape[1])) {
            (Ok(r), Ok(c)) => (r, c),
            _ => return Err(fail(format!("shape {shape:?} is too large"))),
        };
        check_dims(path, rows, cols)?;
        let dtype = npy.dtype();
        let item = match &dtype {
            DType::Plain(ts)
                if ts.type_char() == TypeChar::Float && matches!(ts.size_field(), 4 | 8) =>
            {
                ts.size_field() as usize
            }
            other => {
                return Err(fail(format!(
                    "unsupported dtype {}: expected float32 ('<f4') or float64 ('<f8')",
                    other.descr()
                )))
            }
        };
        let expected = rows.checked_mul(cols).and_then(|n| n.checked_mul(item));
        let found = bytes.len() - data_offset;
        if expected != Some(found) {
            return Err(fail(format!(
                "header says {rows} x {cols} values of {item} bytes, but {found} bytes of data follow \
                 (truncated or corrupt file)"
            )));
        }
        let order = npy.order();
        let values: Vec<f64> = if item == 4 {
            npy.into_vec::<f32>()
                .map_err(|e| fail(format!("cannot read data: {e}")))?
                .into_iter()
                .map(f64::from)
                .collect()
        } else {
            npy.into_vec::<f64>()
                .map_err(|e| fail(format!("cannot read data: {e}")))?
        };
        let names = names_for(path, rows, None)?;
        let data = to_f32_checked(path, &values, rows, cols, order == Order::Fortran, &names)?;
        Ok(Self {
            names,
            matrix: Matrix::from_vec(rows, cols, data),
        })
    }

    /// Read the 2-D F32/F64 tensor `embeddings` of a `.safetensors` file; names from the
    /// sibling `<stem>.ids.txt`, else the metadata key `ids`, else `0`, `1`, ...
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes = read_bytes(path)?;
        let (st, metadata) = parse_safetensors(path, &bytes)?;
        let fail = |m: String| DataError::format(path, m);
        let view = match st.tensor(EMBEDDINGS_TENSOR) {
            Ok(v) => v,
            Err(_) => {
                let mut names = st.names();
                names.sort();
                return Err(fail(format!(
                    "no tensor named '{EMBEDDINGS_TENSOR}' (the file has: {})",
                    if names.is_empty() {
                        "no tensors".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        };
        let shape = view.shape().to_vec();
        if shape.len() != 2 {
            return Err(fail(format!(
                "tensor '{EMBEDDINGS_TENSOR}' must be 2-D (one row per entity), found shape {shape:?}"
            )));
        }
        let (rows, cols) = (shape[0], shape[1]);
        check_dims(path, rows, cols)?;
        let values: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => f32s_from_le(view.data())
                .into_iter()
                .map(f64::from)
                .collect(),
            safetensors::Dtype::F64 => f64s_from_le(view.data()),
            other => {
                return Err(fail(format!(
                "tensor '{EMBEDDINGS_TENSOR}' has unsupported dtype {other:?}: expected F32 or F64"
            )))
            }
        };
        let names = names_for(
            path,
            rows,
            metadata.get(IDS_METADATA_KEY).map(|s| s.as_str()),
        )?;
        let data = to_f32_checked(path, &values, rows, cols, false, &names)?;
        Ok(Self {
            names,
            matrix: Matrix::from_vec(rows, cols, data),
        })
    }

    /// Read a text table: `name v1 v2 ...` lines, optional word2vec header `COUNT DIM`.
    pub fn read_text(path: &Path) -> Result<Self> {
        let text = fsutil::read_text(path)?;
        let mut header: Option<(usize, usize, usize)> = None; // (line, count, dim)
        let mut dim: Option<(usize, usize)> = None; // (dim, line that set it)
        let mut names = Vocab::new();
        let mut name_lines: Vec<usize> = Vec::new();
        let mut data: Vec<f32> = Vec::new();
        let mut first = true;
        for (i, line) in text.lines().enumerate() {
            let ln = i + 1;
            let mut toks = line.split_whitespace();
            let Some(name) = toks.next() else { continue };
            if first {
                first = false;
                if let Some((count, d)) = parse_header(line) {
                    if d == 0 {
                        return Err(DataError::parse(path, ln, "header declares dimension 0"));
                    }
                    header = Some((ln, count, d));
                    dim = Some((d, ln));
                    continue;
                }
            }
            let start = data.len();
            for (j, tok) in toks.enumerate() {
                let v = parse_value(tok).map_err(|problem| {
                    DataError::parse(path, ln, format!("value {} of '{name}' {problem}", j + 1))
                })?;
                data.push(v);
            }
            let n = data.len() - start;
            match dim {
                None if n == 0 => {
                    return Err(DataError::parse(
                        path,
                        ln,
                        format!("'{name}' has no values (expected `name v1 v2 ...`)"),
                    ))
                }
                None => dim = Some((n, ln)),
                Some((d, from)) if n != d => {
                    let why = if header.is_some() {
                        format!("the dimension in the header on line {from}")
                    } else {
                        format!("the dimension of line {from}")
                    };
                    return Err(DataError::parse(
                        path,
                        ln,
                        format!("line {ln} has {n} values, expected {d} ({why})"),
                    ));
                }
                Some(_) => {}
            }
            if let Some(prev) = names.get(name) {
                return Err(DataError::parse(
                    path,
                    ln,
                    format!(
                        "duplicate name '{name}' (first on line {})",
                        name_lines[prev as usize]
                    ),
                ));
            }
            names.intern(name);
            name_lines.push(ln);
        }
        let rows = names.len();
        if let Some((ln, count, d)) = header {
            if count != rows {
                return Err(DataError::parse(
                    path,
                    ln,
                    format!(
                        "header says {count} vectors of dimension {d}, but the file has {rows}"
                    ),
                ));
            }
        }
        let Some((cols, _)) = dim.filter(|_| rows > 0) else {
            return Err(DataError::format(path, "empty file: no embedding vectors"));
        };
        Ok(Self {
            names,
            matrix: Matrix::from_vec(rows, cols, data),
        })
    }

    /// Write a float32 `.npy` file plus the `<stem>.ids.txt` id list, each atomically (the
    /// array first). Non-finite values are refused, as the readers would refuse them.
    pub fn write_npy(&self, path: &Path) -> Result<()> {
        self.check_writable(path)?;
        let ids = self.ids_text(path)?;
        let io = |e: std::io::Error| DataError::io(path, e);
        let mut buf: Vec<u8> = Vec::with_capacity(128 + self.matrix.data.len() * 4);
        {
            let mut w = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&[self.matrix.rows as u64, self.matrix.cols as u64])
                .writer(&mut buf)
                .begin_nd()
                .map_err(io)?;
            w.extend(self.matrix.data.iter().copied()).map_err(io)?;
            w.finish().map_err(io)?;
        }
        write_atomic(path, &buf)?;
        write_atomic(&ids_path(path), ids.as_bytes())
    }

    /// Write a `.safetensors` file (F32 tensor `embeddings`, names in the metadata key `ids`)
    /// plus the `<stem>.ids.txt` id list, each atomically.
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        self.check_writable(path)?;
        let ids = self.ids_text(path)?;
        let array = NamedArray {
            name: EMBEDDINGS_TENSOR.to_string(),
            shape: vec![self.matrix.rows, self.matrix.cols],
            data: self.matrix.data.clone(),
        };
        let meta = std::collections::BTreeMap::from([(
            IDS_METADATA_KEY.to_string(),
            self.names.names().join("\n"),
        )]);
        let bytes = named_safetensors_bytes(path, std::slice::from_ref(&array), &meta)?;
        write_atomic(path, &bytes)?;
        write_atomic(&ids_path(path), ids.as_bytes())
    }

    /// Write word2vec-style text: a `COUNT DIM` header, then `name v1 v2 ...` per row, with
    /// values printed exactly (shortest round-trip form). Names must be non-empty and free of
    /// whitespace.
    pub fn write_text(&self, path: &Path) -> Result<()> {
        self.check_writable(path)?;
        if let Some(bad) = self
            .names
            .names()
            .iter()
            .find(|n| n.is_empty() || n.contains(char::is_whitespace))
        {
            return Err(DataError::Invalid(format!(
                "{}: name '{bad}' cannot be written as text (empty or containing whitespace)",
                path.display()
            )));
        }
        let mut s = String::with_capacity(self.matrix.data.len() * 10 + 32);
        s.push_str(&format!("{} {}\n", self.matrix.rows, self.matrix.cols));
        for i in 0..self.matrix.rows {
            s.push_str(self.names.name(i as u32));
            for v in self.matrix.row(i) {
                s.push(' ');
                s.push_str(&v.to_string());
            }
            s.push('\n');
        }
        write_atomic(path, s.as_bytes())
    }

    /// Read the `entity<TAB>label` file at `labels_path` against this table: every labelled
    /// entity must have a vector (an unknown one is an error naming its line).
    pub fn check_labels(&self, labels_path: &Path) -> Result<Labels> {
        read_labels(labels_path, &self.names)
    }

    /// The rows of the table in `vocab`'s order (row `i` is the vector of `vocab.name(i)`).
    /// An entity of `vocab` with no vector is an error naming it.
    pub fn align_to(&self, vocab: &Vocab) -> Result<Matrix> {
        self.check_shape()?;
        let mut ids = Vec::with_capacity(vocab.len());
        let mut missing: Vec<&str> = Vec::new();
        for name in vocab.names() {
            match self.names.get(name) {
                Some(i) => ids.push(i),
                None => missing.push(name),
            }
        }
        if let Some(first) = missing.first() {
            let more = if missing.len() > 1 {
                let shown: Vec<String> = missing[1..missing.len().min(6)]
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect();
                format!(
                    " (and {} more of the {} entities: {}{})",
                    missing.len() - 1,
                    vocab.len(),
                    shown.join(", "),
                    if missing.len() > 6 { ", ..." } else { "" }
                )
            } else {
                String::new()
            };
            return Err(DataError::Invalid(format!(
                "entity '{first}' has no vector in the embedding table{more}"
            )));
        }
        Ok(self.matrix.select_rows(&ids))
    }

    /// The fields are public: check they agree before indexing.
    fn check_shape(&self) -> Result<()> {
        let m = &self.matrix;
        if m.rows.checked_mul(m.cols) != Some(m.data.len()) {
            return Err(DataError::Invalid(format!(
                "embedding matrix holds {} values, not {} x {}",
                m.data.len(),
                m.rows,
                m.cols
            )));
        }
        if self.names.len() != m.rows {
            return Err(DataError::Invalid(format!(
                "embedding table has {} names for {} rows",
                self.names.len(),
                m.rows
            )));
        }
        Ok(())
    }

    fn check_writable(&self, path: &Path) -> Result<()> {
        self.check_shape()
            .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
        if let Some(i) = self.matrix.data.iter().position(|v| !v.is_finite()) {
            let (r, c) = (i / self.matrix.cols, i % self.matrix.cols);
            return Err(DataError::Invalid(format!(
                "{}: refusing to write row {r} ('{}'), column {c}: {} (rows and columns count from 0)",
                path.display(),
                self.names.name(r as u32),
                self.matrix.data[i]
            )));
        }
        Ok(())
    }

    /// The id list contents (one name per line), checking every name can be written.
    fn ids_text(&self, path: &Path) -> Result<String> {
        if let Some(bad) = self
            .names
            .names()
            .iter()
            .find(|n| n.is_empty() || n.contains(['\n', '\r']))
        {
            return Err(DataError::Invalid(format!(
                "{}: name {bad:?} cannot go in an id list (empty or containing a line break)",
                path.display()
            )));
        }
        let mut s = self.names.names().join("\n");
        s.push('\n');
        Ok(s)
    }
}

/// Shape checks common to the binary readers.
fn check_dims(path: &Path, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 {
        return Err(DataError::format(
            path,
            format!("no embedding vectors (shape [0, {cols}])"),
        ));
    }
    if cols == 0 {
        return Err(DataError::format(
            path,
            format!("vectors have dimension 0 (shape [{rows}, 0])"),
        ));
    }
    Ok(())
}

/// A word2vec header: exactly two unsigned integers.
fn parse_header(line: &str) -> Option<(usize, usize)> {
    let mut t = line.split_whitespace();
    let (a, b) = (t.next()?, t.next()?);
    if t.next().is_some() {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// One text value, or what is wrong with it (phrased to follow "value 3 of 'dog' ").
fn parse_value(tok: &str) -> std::result::Result<f32, String> {
    let v: f64 = tok
        .parse()
        .map_err(|_| format!("is not a number: '{tok}'"))?;
    if v.is_nan() {
        return Err(format!("is NaN ('{tok}')"));
    }
    if v.is_infinite() {
        return Err(format!("is infinite ('{tok}')"));
    }
    if v.abs() > f32::MAX as f64 {
        return Err(format!("'{tok}' is out of the float32 range"));
    }
    Ok(v as f32)
}

/// Row-major f32 from file values, rejecting non-finite values and values beyond f32, naming
/// the row.
fn to_f32_checked(
    path: &Path,
    values: &[f64],
    rows: usize,
    cols: usize,
    fortran: bool,
    names: &Vocab,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(values.len());
    for r in 0..rows {
        for c in 0..cols {
            let v = if fortran {
                values[c * rows + r]
            } else {
                values[r * cols + c]
            };
            let problem = if v.is_nan() {
                "is NaN"
            } else if v.is_infinite() {
                "is infinite"
            } else if v.abs() > f32::MAX as f64 {
                "is out of the float32 range"
            } else {
                out.push(v as f32);
                continue;
            };
            return Err(DataError::format(
                path,
                format!(
                    "row {r} ('{}'), column {c} {problem} (rows and columns count from 0)",
                    names.name(r as u32)
                ),
            ));
        }
    }
    Ok(out)
}

/// Row names for a binary table at `path`: the sibling id list if it exists, else the names in
/// the file's metadata (`\n`-joined), else `0`, `1`, ...
fn names_for(path: &Path, rows: usize, from_metadata: Option<&str>) -> Result<Vocab> {
    let ids = ids_path(path);
    if ids.exists() {
        let text = fsutil::read_text(&ids)?;
        let mut lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
        while lines.last().is_some_and(|l| l.trim().is_empty()) {
            lines.pop();
        }
        let v = vocab_from_list(&lines, |i, m| DataError::parse(&ids, i + 1, m))?;
        if v.len() != rows {
            return Err(DataError::format(
                &ids,
                format!(
                    "has {} names but {} has {rows} rows",
                    v.len(),
                    path.display()
                ),
            ));
        }
        return Ok(v);
    }
    if let Some(meta) = from_metadata {
        let list: Vec<&str> = meta.split('\n').collect();
        let v = vocab_from_list(&list, |i, m| {
            DataError::format(
                path,
                format!("metadata '{IDS_METADATA_KEY}', name {}: {m}", i + 1),
            )
        })?;
        if v.len() != rows {
            return Err(DataError::format(
                path,
                format!(
                    "metadata '{IDS_METADATA_KEY}' has {} names for {rows} rows",
                    v.len()
                ),
            ));
        }
        return Ok(v);
    }
    Ok(Vocab::from_names((0..rows).map(|i| i.to_string())))
}

/// A vocabulary from a list of names, rejecting empty and repeated names; `err(index, message)`
/// builds the error for the entry at 0-based `index`.
fn vocab_from_list(list: &[&str], err: impl Fn(usize, String) -> DataError) -> Result<Vocab> {
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(list.len());
    for (i, &name) in list.iter().enumerate() {
        if name.is_empty() {
            return Err(err(i, "empty name".into()));
        }
        if let Some(&j) = first.get(name) {
            return Err(err(
                i,
                format!("duplicate name '{name}' (first at entry {})", j + 1),
            ));
        }
        first.insert(name, i);
    }
    Ok(Vocab::from_names(list.iter().map(|s| s.to_string())))
}

/// The largest `.npy` header accepted (numpy itself refuses headers over 10,000 bytes).
const MAX_NPY_HEADER: usize = 1 << 16;
/// The deepest bracket nesting accepted in a `.npy` header.
const MAX_NPY_NESTING: usize = 16;

/// Sanity checks on a `.npy` preamble and header before `npyz` parses it, for the hostile
/// inputs it does not guard against (a header length beyond the file, deeply nested brackets,
/// a shape whose size overflows). Returns the data offset and the shape.
fn npy_preflight(bytes: &[u8]) -> std::result::Result<(usize, Vec<u64>), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic at the start)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        2 | 3 => return Err("truncated .npy header".into()),
        v => return Err(format!("unsupported .npy format version {v}.{}", bytes[7])),
    };
    if len > MAX_NPY_HEADER {
        return Err(format!(".npy header of {len} bytes is implausibly large"));
    }
    let end = start + len;
    if end > bytes.len() {
        return Err("truncated .npy file: the header runs past the end of the file".into());
    }
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| "the .npy header is not text".to_string())?;
    let mut depth = 0usize;
    for ch in text.chars() {
        match ch {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NPY_NESTING {
                    return Err("malformed .npy header (brackets nested too deeply)".into());
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let shape = npy_header_shape(text).ok_or("malformed .npy header: no readable 'shape'")?;
    let mut numel: u64 = 1;
    for &d in shape.iter().filter(|&&d| d != 0) {
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    }
    if numel.checked_mul(16).is_none() {
        return Err(format!("shape {shape:?} is too large"));
    }
    Ok((end, shape))
}

/// The `'shape': (a, b, ...)` entry of a `.npy` header dict.
fn npy_header_shape(text: &str) -> Option<Vec<u64>> {
    for key in ["'shape'", "\"shape\""] {
        let mut from = 0;
        while let Some(at) = text[from..].find(key) {
            let rest = text[from + at + key.len()..].trim_start();
            from += at + key.len();
            let Some(rest) = rest.strip_prefix(':') else {
                continue;
            };
            let rest = rest.trim_start();
            let close = match rest.chars().next()? {
                '(' => ')',
                '[' => ']',
                _ => return None,
            };
            let inner = &rest[1..rest.find(close)?];
            return inner
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| t.trim_end_matches(['L', 'l']).parse::<u64>().ok())
                .collect();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_detection() {
        assert_eq!(parse_header("400000 300"), Some((400000, 300)));
        assert_eq!(parse_header(" 3\t2 "), Some((3, 2)));
        assert_eq!(parse_header("dog 0.5"), None);
        assert_eq!(parse_header("3 2 1"), None);
        assert_eq!(parse_header("-3 2"), None);
        assert_eq!(parse_header("3 2.0"), None);
    }

    #[test]
    fn npy_shape_from_header() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
        assert_eq!(npy_header_shape(h), Some(vec![3, 4]));
        assert_eq!(
            npy_header_shape("{'shape': (5,), 'descr': '<f8'}"),
            Some(vec![5])
        );
        assert_eq!(npy_header_shape("{\"shape\": [2L, 3L]}"), Some(vec![2, 3]));
        assert_eq!(npy_header_shape("{'shape': ()}"), Some(vec![]));
        // A record field called 'shape' is not the shape entry.
        let rec = "{'descr': [('shape', '<f4')], 'fortran_order': False, 'shape': (7, 1), }";
        assert_eq!(npy_header_shape(rec), Some(vec![7, 1]));
        assert_eq!(npy_header_shape("{'shape': (-1, 2)}"), None);
        assert_eq!(npy_header_shape("{'shape': (1, 2"), None);
        assert_eq!(npy_header_shape("{'descr': '<f4'}"), None);
    }

    #[test]
    fn npy_preflight_never_panics_on_prefixes_of_a_good_file() {
        let e = Embeddings::new(
            Vocab::from_names(["a".to_string(), "b".to_string()]),
            Matrix::from_vec(2, 2, vec![1.0, 2.0, 3.0, 4.0]),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.npy");
        e.write_npy(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        // Every truncation (and a byte flip at every position) is either read or rejected.
        for n in 0..bytes.len() {
            std::fs::write(&p, &bytes[..n]).unwrap();
            assert!(Embeddings::read_npy(&p).is_err(), "prefix {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            std::fs::write(&p, &b).unwrap();
            let _ = Embeddings::read_npy(&p);
        }
    }
}
