//! The WordNet-5k graph bundled into the binary (`data/wordnet-5k`, embedded at build time), so
//! `simskip simulate` runs from any folder and from an installed binary alone.

use std::path::Path;

/// The bundled graph's files, by name, as `KgDataset::load` expects them in a folder.
pub const WORDNET_5K: &[(&str, &[u8])] = &[
    (
        "train.tsv",
        include_bytes!("../../../data/wordnet-5k/train.tsv"),
    ),
    (
        "valid.tsv",
        include_bytes!("../../../data/wordnet-5k/valid.tsv"),
    ),
    (
        "test.tsv",
        include_bytes!("../../../data/wordnet-5k/test.tsv"),
    ),
    (
        "entity_labels.tsv",
        include_bytes!("../../../data/wordnet-5k/entity_labels.tsv"),
    ),
    (
        "entity_names.tsv",
        include_bytes!("../../../data/wordnet-5k/entity_names.tsv"),
    ),
];

/// How the bundled graph is named in messages and in the run folder.
pub const WORDNET_5K_NAME: &str = "wordnet-5k (bundled)";

/// Write the bundled WordNet-5k files into `dir` (created if needed).
pub fn write_wordnet_5k(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in WORDNET_5K {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_files_load_as_a_graph() {
        let dir = tempfile::tempdir().unwrap();
        write_wordnet_5k(dir.path()).unwrap();
        let ds = simskip_data::KgDataset::load(dir.path()).unwrap();
        assert!(ds.num_entities() > 4000, "{} entities", ds.num_entities());
        assert!(!ds.train.is_empty() && !ds.valid.is_empty() && !ds.test.is_empty());
    }
}
