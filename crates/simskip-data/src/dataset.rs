use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::labels::{read_labels, Labels};
use crate::triples::{read_triples, Triple};
use crate::vocab::Vocab;

/// A knowledge graph folder: `train.tsv`, `valid.tsv`, `test.tsv`, optionally
/// `entity_labels.tsv`. Entity and relation ids are assigned in order of first appearance
/// (train, then valid, then test), so the same folder always gives the same ids.
#[derive(Debug, Clone)]
pub struct KgDataset {
    pub dir: PathBuf,
    pub entities: Vocab,
    pub relations: Vocab,
    pub train: Vec<Triple>,
    pub valid: Vec<Triple>,
    pub test: Vec<Triple>,
    pub labels: Option<Labels>,
}

impl KgDataset {
    /// Load a dataset folder. `entity_labels.tsv` is read strictly: a label for an entity that
    /// occurs in no triple is an error naming the line. Every shipped dataset satisfies this
    /// (all 5,000 labelled `wordnet-5k` entities occur in its triples, as do all labelled
    /// entities of `wordnet-40k` and `wordnet-full`), and `partition::write_partitions` writes
    /// labels restricted to each client's entities.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataError::Invalid(format!(
                "{}: not a dataset folder (expected train.tsv, valid.tsv, test.tsv)",
                dir.display()
            )));
        }
        let mut entities = Vocab::new();
        let mut relations = Vocab::new();
        let train = read_triples(&dir.join("train.tsv"), &mut entities, &mut relations)?;
        let valid = read_triples(&dir.join("valid.tsv"), &mut entities, &mut relations)?;
        let test = read_triples(&dir.join("test.tsv"), &mut entities, &mut relations)?;
        let labels_path = dir.join("entity_labels.tsv");
        let labels = if labels_path.exists() {
            Some(read_labels(&labels_path, &entities)?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_owned(),
            entities,
            relations,
            train,
            valid,
            test,
            labels,
        })
    }

    pub fn num_entities(&self) -> usize {
        self.entities.len()
    }

    pub fn num_relations(&self) -> usize {
        self.relations.len()
    }

    /// All known true triples (train, valid and test), for filtered ranking.
    pub fn all_true(&self) -> HashSet<Triple> {
        self.train
            .iter()
            .chain(&self.valid)
            .chain(&self.test)
            .copied()
            .collect()
    }
}
