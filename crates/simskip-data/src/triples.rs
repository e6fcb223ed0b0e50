use std::path::Path;

use crate::error::{DataError, Result};
use crate::fsutil::{read_text, write_atomic};
use crate::vocab::Vocab;

/// A (head, relation, tail) triple of dense ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Triple {
    pub h: u32,
    pub r: u32,
    pub t: u32,
}

/// Read `head<TAB>relation<TAB>tail` lines, interning names into the vocabularies.
/// Blank lines are skipped; any other line without exactly three non-empty fields is an error.
pub fn read_triples(
    path: &Path,
    entities: &mut Vocab,
    relations: &mut Vocab,
) -> Result<Vec<Triple>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 3 {
            return Err(DataError::parse(
                path,
                i + 1,
                format!(
                    "expected 3 tab-separated columns (head, relation, tail), found {}",
                    fields.len()
                ),
            ));
        }
        if fields.iter().any(|f| f.trim().is_empty()) {
            return Err(DataError::parse(
                path,
                i + 1,
                "empty head, relation or tail",
            ));
        }
        out.push(Triple {
            h: entities.intern(fields[0].trim()),
            r: relations.intern(fields[1].trim()),
            t: entities.intern(fields[2].trim()),
        });
    }
    Ok(out)
}

/// Write triples back as TSV with names (atomically: see [`write_atomic`]).
pub fn write_triples(
    path: &Path,
    triples: &[Triple],
    entities: &Vocab,
    relations: &Vocab,
) -> Result<()> {
    let mut s = String::with_capacity(triples.len() * 32);
    for t in triples {
        s.push_str(entities.name(t.h));
        s.push('\t');
        s.push_str(relations.name(t.r));
        s.push('\t');
        s.push_str(entities.name(t.t));
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}
