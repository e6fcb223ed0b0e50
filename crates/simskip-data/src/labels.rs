use std::path::Path;

use crate::error::{DataError, Result};
use crate::fsutil::{read_text, write_atomic};
use crate::vocab::Vocab;

/// Class labels of entities: `of[entity_id]` is the class id, or `None` when unlabelled.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub classes: Vocab,
    pub of: Vec<Option<u32>>,
}

impl Labels {
    /// Entity ids that carry a label, ascending.
    pub fn labelled(&self) -> Vec<u32> {
        (0..self.of.len() as u32)
            .filter(|&e| self.of[e as usize].is_some())
            .collect()
    }
}

/// Read `entity<TAB>label` lines. Every entity must be in `entities` (the graph or the
/// embedding table): an unknown one is an error naming the line, since a silently dropped
/// label would skew every downstream figure.
pub fn read_labels(path: &Path, entities: &Vocab) -> Result<Labels> {
    let text = read_text(path)?;
    let mut classes = Vocab::new();
    let mut of = vec![None; entities.len()];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 2 {
            return Err(DataError::parse(
                path,
                i + 1,
                format!(
                    "expected 2 tab-separated columns (entity, label), found {}",
                    fields.len()
                ),
            ));
        }
        let Some(e) = entities.get(fields[0].trim()) else {
            return Err(DataError::parse(
                path,
                i + 1,
                format!(
                    "entity '{}' is not in the graph or embedding table",
                    fields[0].trim()
                ),
            ));
        };
        if of[e as usize].is_some() {
            return Err(DataError::parse(
                path,
                i + 1,
                format!("entity '{}' is labelled more than once", fields[0].trim()),
            ));
        }
        if fields[1].trim().is_empty() {
            return Err(DataError::parse(path, i + 1, "empty label"));
        }
        of[e as usize] = Some(classes.intern(fields[1].trim()));
    }
    Ok(Labels { classes, of })
}

/// Write `entity<TAB>label` lines for the labelled entities, in entity id order (atomically).
/// Reading the file back with [`read_labels`] and the same `entities` gives equal labels
/// provided the class ids were assigned in that order (as `read_labels` does).
pub fn write_labels(path: &Path, labels: &Labels, entities: &Vocab) -> Result<()> {
    let mut s = String::new();
    for (e, class) in labels.of.iter().enumerate() {
        if let Some(c) = class {
            s.push_str(entities.name(e as u32));
            s.push('\t');
            s.push_str(labels.classes.name(*c));
            s.push('\n');
        }
    }
    write_atomic(path, s.as_bytes())
}
