//! Splitting one knowledge graph into private client folders (FedE's relation split, or
//! random triples).
//!
//! Both splits pool the source graph's train, valid and test triples, give each pooled triple
//! to exactly one client, and split each client's share 80/10/10 (by default) into its own
//! train/valid/test. A valid or test triple whose head, tail or relation does not occur in
//! that client's train is then moved into train, so every entity and relation a client is
//! evaluated on has been trained by that client. (The relation check goes beyond FedE's
//! entity check; with the relation split it never fires, since a client owns all triples of
//! its relations.)
//!
//! The result depends only on the graph, the config and the `rand` version (the shuffles use
//! `StdRng` seeded with `seed`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::dataset::KgDataset;
use crate::error::{DataError, Result};
use crate::labels::{write_labels, Labels};
use crate::triples::{write_triples, Triple};
use crate::vocab::Vocab;

/// How the triples are dealt to the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionBy {
    /// FedE: the relations are shuffled and dealt round-robin into disjoint groups; a client
    /// gets every triple of its relations. Entities overlap across clients, relations do not.
    #[default]
    Relation,
    /// All triples shuffled and dealt round-robin: clients share entities and relations.
    Triples,
}

/// Parameters of [`partition`].
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionConfig {
    /// Number of clients, at least 1 (and at most the number of relations for
    /// [`PartitionBy::Relation`]).
    pub clients: usize,
    pub by: PartitionBy,
    pub seed: u64,
    /// Share of each client's triples for its valid split (0.1).
    pub valid_fraction: f64,
    /// Share of each client's triples for its test split (0.1).
    pub test_fraction: f64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            clients: 3,
            by: PartitionBy::Relation,
            seed: 0,
            valid_fraction: 0.1,
            test_fraction: 0.1,
        }
    }
}

impl PartitionConfig {
    /// `clients` clients, split `by`, with `seed`, and the default 80/10/10 split.
    pub fn new(clients: usize, by: PartitionBy, seed: u64) -> Self {
        Self {
            clients,
            by,
            seed,
            ..Self::default()
        }
    }
}

/// One client's private graph. It has its own vocabularies, with ids assigned exactly as
/// [`KgDataset::load`] assigns them to the folder [`write_partitions`] writes (first
/// appearance in train, then valid, then test), so the in-memory partition and the reloaded
/// folder agree id for id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPartition {
    /// The client's index, `0..clients`; its folder is `client-{client}`.
    pub client: usize,
    /// Local entity ids; names are the source graph's (they are the global keys).
    pub entities: Vocab,
    /// Local relation ids.
    pub relations: Vocab,
    pub train: Vec<Triple>,
    pub valid: Vec<Triple>,
    pub test: Vec<Triple>,
    /// The source graph's labels restricted to this client's entities, with class ids local
    /// to the client (assigned in entity order, as reading the written file does): compare
    /// classes across clients by name. `None` when the source graph has no labels.
    pub labels: Option<Labels>,
    /// Source graph entity id of each local entity id.
    pub entity_ids: Vec<u32>,
    /// Source graph relation id of each local relation id.
    pub relation_ids: Vec<u32>,
}

impl ClientPartition {
    pub fn num_triples(&self) -> usize {
        self.train.len() + self.valid.len() + self.test.len()
    }

    /// The partition as a dataset (with `dir` as its folder), equal to what
    /// `KgDataset::load` gives for the folder `write_partitions` writes.
    pub fn to_dataset(&self, dir: impl Into<PathBuf>) -> KgDataset {
        KgDataset {
            dir: dir.into(),
            entities: self.entities.clone(),
            relations: self.relations.clone(),
            train: self.train.clone(),
            valid: self.valid.clone(),
            test: self.test.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// Split `ds` across `cfg.clients` clients (see the module docs). Errors
/// ([`DataError::Invalid`]) when there are no clients, more clients than relations for the
/// relation split, more clients than triples for the triple split, or fractions outside
/// `[0, 1)` whose sum reaches 1.
pub fn partition(ds: &KgDataset, cfg: &PartitionConfig) -> Result<Vec<ClientPartition>> {
    let c = cfg.clients;
    if c == 0 {
        return Err(DataError::Invalid(
            "partition: clients must be at least 1".into(),
        ));
    }
    let (vf, tf) = (cfg.valid_fraction, cfg.test_fraction);
    if !(vf.is_finite() && tf.is_finite() && vf >= 0.0 && tf >= 0.0 && vf + tf < 1.0) {
        return Err(DataError::Invalid(format!(
            "partition: valid_fraction {vf} and test_fraction {tf} must be >= 0 with a sum below 1"
        )));
    }
    let pooled: Vec<Triple> = ds
        .train
        .iter()
        .chain(&ds.valid)
        .chain(&ds.test)
        .copied()
        .collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut groups: Vec<Vec<Triple>> = vec![Vec::new(); c];
    match cfg.by {
        PartitionBy::Relation => {
            let r = ds.num_relations();
            if c > r {
                return Err(DataError::Invalid(format!(
                    "partition: cannot give {c} clients disjoint relations: {} has only {r} relations",
                    ds.dir.display()
                )));
            }
            let mut rels: Vec<u32> = (0..r as u32).collect();
            rels.shuffle(&mut rng);
            let mut owner = vec![0usize; r];
            for (k, &rel) in rels.iter().enumerate() {
                owner[rel as usize] = k % c;
            }
            for t in &pooled {
                groups[owner[t.r as usize]].push(*t);
            }
            for g in &mut groups {
                g.shuffle(&mut rng);
            }
        }
        PartitionBy::Triples => {
            if c > pooled.len() {
                return Err(DataError::Invalid(format!(
                    "partition: cannot deal {} triples of {} to {c} clients",
                    pooled.len(),
                    ds.dir.display()
                )));
            }
            let mut all = pooled;
            all.shuffle(&mut rng);
            for (k, t) in all.into_iter().enumerate() {
                groups[k % c].push(t);
            }
        }
    }
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(client, g)| build_client(ds, client, g, vf, tf))
        .collect())
}

/// Split one client's (shuffled) triples, fix up valid/test, and re-index locally.
fn build_client(
    ds: &KgDataset,
    client: usize,
    g: Vec<Triple>,
    vf: f64,
    tf: f64,
) -> ClientPartition {
    let n = g.len();
    let n_test = ((n as f64 * tf).round() as usize).min(n);
    let n_valid = ((n as f64 * vf).round() as usize).min(n - n_test);
    let n_train = n - n_valid - n_test;
    let mut train = g[..n_train].to_vec();
    let mut valid = g[n_train..n_train + n_valid].to_vec();
    let mut test = g[n_train + n_valid..].to_vec();

    // Every evaluated entity and relation must have been trained by this client.
    let ents: HashSet<u32> = train.iter().flat_map(|t| [t.h, t.t]).collect();
    let rels: HashSet<u32> = train.iter().map(|t| t.r).collect();
    let trained = |t: &Triple| ents.contains(&t.h) && ents.contains(&t.t) && rels.contains(&t.r);
    let (keep_valid, move_valid): (Vec<Triple>, Vec<Triple>) = valid.into_iter().partition(trained);
    let (keep_test, move_test): (Vec<Triple>, Vec<Triple>) = test.into_iter().partition(trained);
    train.extend(move_valid);
    train.extend(move_test);
    valid = keep_valid;
    test = keep_test;

    // Local ids in the order read_triples assigns them (h, r, t; train, valid, test).
    let mut entities = Vocab::new();
    let mut relations = Vocab::new();
    let mut entity_ids = Vec::new();
    let mut relation_ids = Vec::new();
    let mut local = |ts: &[Triple]| -> Vec<Triple> {
        ts.iter()
            .map(|t| {
                let mut ent = |e: u32| {
                    let id = entities.intern(ds.entities.name(e));
                    if id as usize == entity_ids.len() {
                        entity_ids.push(e);
                    }
                    id
                };
                let h = ent(t.h);
                let tt = ent(t.t);
                let r = relations.intern(ds.relations.name(t.r));
                if r as usize == relation_ids.len() {
                    relation_ids.push(t.r);
                }
                Triple { h, r, t: tt }
            })
            .collect()
    };
    let train = local(&train);
    let valid = local(&valid);
    let test = local(&test);

    let labels = ds.labels.as_ref().map(|l| {
        let mut classes = Vocab::new();
        let of = entity_ids
            .iter()
            .map(|&g| {
                l.of.get(g as usize)
                    .copied()
                    .flatten()
                    .map(|c| classes.intern(l.classes.name(c)))
            })
            .collect();
        Labels { classes, of }
    });
    ClientPartition {
        client,
        entities,
        relations,
        train,
        valid,
        test,
        labels,
        entity_ids,
        relation_ids,
    }
}

/// Write each partition to `out_dir/client-{client}/` (`train.tsv`, `valid.tsv`, `test.tsv`
/// and, when the partition has labels, `entity_labels.tsv`), a folder [`KgDataset::load`]
/// reads back to the same ids. Folders are created as needed and files written atomically;
/// a stale `entity_labels.tsv` from an earlier run is removed when the partition has no
/// labels. Returns the client folders in the order of `parts`.
///
/// Partitions of WordNet are WordNet copies: ship `WORDNET-LICENSE.txt` with them.
pub fn write_partitions(parts: &[ClientPartition], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::with_capacity(parts.len());
    for p in parts {
        let dir = out_dir.join(format!("client-{}", p.client));
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        write_triples(&dir.join("train.tsv"), &p.train, &p.entities, &p.relations)?;
        write_triples(&dir.join("valid.tsv"), &p.valid, &p.entities, &p.relations)?;
        write_triples(&dir.join("test.tsv"), &p.test, &p.entities, &p.relations)?;
        let labels_path = dir.join("entity_labels.tsv");
        match &p.labels {
            Some(l) => write_labels(&labels_path, l, &p.entities)?,
            None if labels_path.exists() => {
                std::fs::remove_file(&labels_path).map_err(|e| DataError::io(&labels_path, e))?
            }
            None => {}
        }
        dirs.push(dir);
    }
    Ok(dirs)
}
