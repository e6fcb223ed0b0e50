use std::collections::{HashMap, HashSet};
use std::path::Path;

use simskip_data::{
    partition, write_partitions, ClientPartition, DataError, KgDataset, PartitionBy,
    PartitionConfig,
};

fn wordnet() -> KgDataset {
    KgDataset::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/wordnet-5k"
    )))
    .unwrap()
}

type Named = (String, String, String);

fn named(p: &ClientPartition) -> Vec<Named> {
    p.train
        .iter()
        .chain(&p.valid)
        .chain(&p.test)
        .map(|t| {
            (
                p.entities.name(t.h).to_string(),
                p.relations.name(t.r).to_string(),
                p.entities.name(t.t).to_string(),
            )
        })
        .collect()
}

fn multiset(items: impl IntoIterator<Item = Named>) -> HashMap<Named, usize> {
    let mut m = HashMap::new();
    for x in items {
        *m.entry(x).or_insert(0) += 1;
    }
    m
}

fn check_invariants(ds: &KgDataset, parts: &[ClientPartition], clients: usize) {
    assert_eq!(parts.len(), clients);
    // Every original triple lands in exactly one client.
    let original = multiset(ds.train.iter().chain(&ds.valid).chain(&ds.test).map(|t| {
        (
            ds.entities.name(t.h).to_string(),
            ds.relations.name(t.r).to_string(),
            ds.entities.name(t.t).to_string(),
        )
    }));
    let dealt = multiset(parts.iter().flat_map(named));
    assert_eq!(dealt, original);
    let labels = ds.labels.as_ref().unwrap();
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.client, i);
        assert!(!p.train.is_empty());
        // Every evaluated entity (and relation) was trained by this client.
        let ents: HashSet<u32> = p.train.iter().flat_map(|t| [t.h, t.t]).collect();
        let rels: HashSet<u32> = p.train.iter().map(|t| t.r).collect();
        for t in p.valid.iter().chain(&p.test) {
            assert!(ents.contains(&t.h) && ents.contains(&t.t) && rels.contains(&t.r));
        }
        // Roughly 80/10/10 (the fix-up only moves triples into train).
        let n = p.num_triples() as f64;
        assert!(p.train.len() as f64 >= 0.8 * n - 1.0);
        assert!(p.valid.len() as f64 <= 0.1 * n + 1.0 && p.test.len() as f64 <= 0.1 * n + 1.0);
        // Local ids map back to the source graph.
        assert_eq!(p.entity_ids.len(), p.entities.len());
        assert_eq!(p.relation_ids.len(), p.relations.len());
        for (local, &global) in p.entity_ids.iter().enumerate() {
            assert_eq!(p.entities.name(local as u32), ds.entities.name(global));
        }
        for (local, &global) in p.relation_ids.iter().enumerate() {
            assert_eq!(p.relations.name(local as u32), ds.relations.name(global));
        }
        // Labels restricted to the client's entities, with the source labels.
        let l = p.labels.as_ref().unwrap();
        assert_eq!(l.of.len(), p.entities.len());
        for (local, class) in l.of.iter().enumerate() {
            let global = p.entity_ids[local] as usize;
            assert_eq!(
                class.map(|c| l.classes.name(c)),
                labels.of[global].map(|c| labels.classes.name(c))
            );
        }
        // Only entities in this client's triples.
        let used: HashSet<u32> = p
            .train
            .iter()
            .chain(&p.valid)
            .chain(&p.test)
            .flat_map(|t| [t.h, t.t])
            .collect();
        assert_eq!(used.len(), p.entities.len());
    }
}

#[test]
fn relation_split_is_fede() {
    let ds = wordnet();
    let cfg = PartitionConfig::new(3, PartitionBy::Relation, 7);
    let parts = partition(&ds, &cfg).unwrap();
    check_invariants(&ds, &parts, 3);
    // Relations disjoint across clients and covering the graph; sizes dealt round-robin.
    let mut seen = HashSet::new();
    for p in &parts {
        for r in p.relations.names() {
            assert!(seen.insert(r.clone()), "relation {r} in two clients");
        }
    }
    assert_eq!(seen.len(), ds.num_relations());
    let mut sizes: Vec<usize> = parts.iter().map(|p| p.relations.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![3, 4, 4]);
    // Entities overlap across clients (the point of federated alignment).
    let e0: HashSet<&String> = parts[0].entities.names().iter().collect();
    assert!(parts[1..]
        .iter()
        .any(|p| p.entities.names().iter().any(|n| e0.contains(n))));
}

#[test]
fn triple_split() {
    let ds = wordnet();
    let parts = partition(&ds, &PartitionConfig::new(4, PartitionBy::Triples, 1)).unwrap();
    check_invariants(&ds, &parts, 4);
    let total = ds.train.len() + ds.valid.len() + ds.test.len();
    for p in &parts {
        assert!(p.num_triples() == total / 4 || p.num_triples() == total / 4 + 1);
    }
}

#[test]
fn deterministic_for_a_seed_and_seed_matters() {
    let ds = wordnet();
    for by in [PartitionBy::Relation, PartitionBy::Triples] {
        let a = partition(&ds, &PartitionConfig::new(3, by, 42)).unwrap();
        let b = partition(&ds, &PartitionConfig::new(3, by, 42)).unwrap();
        assert_eq!(a, b);
        let c = partition(&ds, &PartitionConfig::new(3, by, 43)).unwrap();
        assert_ne!(a, c);
    }
    // For the relation split the relation groups themselves change with the seed.
    let groups = |seed| -> Vec<Vec<String>> {
        let mut g: Vec<Vec<String>> =
            partition(&ds, &PartitionConfig::new(3, PartitionBy::Relation, seed))
                .unwrap()
                .iter()
                .map(|p| {
                    let mut r = p.relations.names().to_vec();
                    r.sort();
                    r
                })
                .collect();
        g.sort();
        g
    };
    assert!((1..6).any(|s| groups(s) != groups(0)));
}

#[test]
fn invalid_configs() {
    let ds = wordnet();
    let err = partition(&ds, &PartitionConfig::new(0, PartitionBy::Relation, 0)).unwrap_err();
    assert!(matches!(err, DataError::Invalid(_)));
    let err = partition(&ds, &PartitionConfig::new(12, PartitionBy::Relation, 0)).unwrap_err();
    assert!(matches!(err, DataError::Invalid(_)));
    assert!(err.to_string().contains("11 relations"), "{err}");
    // One client per relation is allowed.
    let parts = partition(&ds, &PartitionConfig::new(11, PartitionBy::Relation, 0)).unwrap();
    assert!(parts.iter().all(|p| p.relations.len() == 1));
    let cfg = PartitionConfig {
        valid_fraction: 0.6,
        test_fraction: 0.4,
        ..PartitionConfig::default()
    };
    assert!(matches!(partition(&ds, &cfg), Err(DataError::Invalid(_))));
    let cfg = PartitionConfig {
        valid_fraction: f64::NAN,
        ..PartitionConfig::default()
    };
    assert!(matches!(partition(&ds, &cfg), Err(DataError::Invalid(_))));
}

#[test]
fn write_and_reload_round_trip() {
    let ds = wordnet();
    let parts = partition(&ds, &PartitionConfig::new(3, PartitionBy::Relation, 5)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dirs = write_partitions(&parts, out.path()).unwrap();
    assert_eq!(dirs.len(), 3);
    for (p, dir) in parts.iter().zip(&dirs) {
        assert_eq!(dir, &out.path().join(format!("client-{}", p.client)));
        for f in ["train.tsv", "valid.tsv", "test.tsv", "entity_labels.tsv"] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let loaded = KgDataset::load(dir).unwrap();
        assert_eq!(loaded.entities, p.entities);
        assert_eq!(loaded.relations, p.relations);
        assert_eq!(loaded.train, p.train);
        assert_eq!(loaded.valid, p.valid);
        assert_eq!(loaded.test, p.test);
        assert_eq!(loaded.labels, p.labels);
        let as_ds = p.to_dataset(dir.clone());
        assert_eq!(as_ds.all_true(), loaded.all_true());
        // Labels file holds exactly the client's entities.
        let lines = std::fs::read_to_string(dir.join("entity_labels.tsv"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(lines, p.entities.len());
    }
    // Rewriting a partition without labels removes the stale labels file.
    let mut unlabelled = parts[0].clone();
    unlabelled.labels = None;
    write_partitions(&[unlabelled], out.path()).unwrap();
    assert!(!dirs[0].join("entity_labels.tsv").exists());
    assert!(KgDataset::load(&dirs[0]).unwrap().labels.is_none());
}
