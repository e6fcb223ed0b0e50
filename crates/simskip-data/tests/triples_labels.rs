use std::path::Path;

use simskip_data::{
    read_labels, read_triples, write_labels, write_triples, DataError, KgDataset, Vocab,
};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn triples_good_file_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t.tsv", "a\tr1\tb\r\n\nb\tr2\tc\nc\tr1\ta\n");
    let (mut e, mut r) = (Vocab::new(), Vocab::new());
    let ts = read_triples(&p, &mut e, &mut r).unwrap();
    assert_eq!(ts.len(), 3);
    assert_eq!(e.names(), ["a", "b", "c"]);
    assert_eq!(r.names(), ["r1", "r2"]);
    assert_eq!((ts[1].h, ts[1].r, ts[1].t), (1, 1, 2));

    let out = dir.path().join("out.tsv");
    write_triples(&out, &ts, &e, &r).unwrap();
    assert!(!dir.path().join("out.tsv.tmp").exists());
    let (mut e2, mut r2) = (Vocab::new(), Vocab::new());
    assert_eq!(read_triples(&out, &mut e2, &mut r2).unwrap(), ts);
    assert_eq!(e2, e);
}

#[test]
fn triples_wrong_column_count_names_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.tsv", "a\tr\tb\nb\tr\tc\nc\tr\n");
    let err = read_triples(&p, &mut Vocab::new(), &mut Vocab::new()).unwrap_err();
    assert!(matches!(err, DataError::Parse { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains(":3:"), "{msg}");
    assert!(msg.contains("found 2"), "{msg}");
}

#[test]
fn triples_empty_field_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.tsv", "a\t\tb\n");
    let msg = read_triples(&p, &mut Vocab::new(), &mut Vocab::new())
        .unwrap_err()
        .to_string();
    assert!(msg.contains(":1:") && msg.contains("empty"), "{msg}");
    let missing = dir.path().join("nope.tsv");
    let err = read_triples(&missing, &mut Vocab::new(), &mut Vocab::new()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("nope.tsv"));
}

#[test]
fn triples_binary_file_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.tsv");
    std::fs::write(&p, b"a\tr\tb\n\xff\xfe\x00").unwrap();
    let err = read_triples(&p, &mut Vocab::new(), &mut Vocab::new()).unwrap_err();
    assert!(matches!(err, DataError::Parse { line: 2, .. }), "{err:?}");
}

#[test]
fn labels_unknown_entity_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "labels.tsv", "a\tx\nzzz\ty\n");
    let vocab = Vocab::from_names(["a".to_string(), "b".to_string()]);
    let err = read_labels(&p, &vocab).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Parse { line: 2, .. }), "{msg}");
    assert!(msg.contains("'zzz'"), "{msg}");
}

#[test]
fn labels_duplicate_entity_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = Vocab::from_names(["a", "b", "c"].map(String::from));
    let p = write(dir.path(), "dup.tsv", "a\tx\nb\ty\na\tx\n");
    let msg = read_labels(&p, &vocab).unwrap_err().to_string();
    assert!(
        msg.contains(":3:") && msg.contains("more than once"),
        "{msg}"
    );

    let p = write(dir.path(), "ok.tsv", "c\ty\na\tx\n");
    let l = read_labels(&p, &vocab).unwrap();
    assert_eq!(l.labelled(), vec![0, 2]);
    assert_eq!(l.classes.name(l.of[2].unwrap()), "y");
    assert_eq!(l.of[1], None);
    let out = dir.path().join("out.tsv");
    write_labels(&out, &l, &vocab).unwrap();
    let back = read_labels(&out, &vocab).unwrap();
    // Same labels by name (class ids follow file order).
    for e in 0..3 {
        assert_eq!(
            l.of[e].map(|c| l.classes.name(c).to_string()),
            back.of[e].map(|c| back.classes.name(c).to_string())
        );
    }
}

#[test]
fn bundled_datasets_load() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"));
    let wn = KgDataset::load(&root.join("wordnet-5k")).unwrap();
    assert_eq!(wn.num_entities(), 5000);
    assert_eq!(wn.num_relations(), 11);
    assert_eq!(
        (wn.train.len(), wn.valid.len(), wn.test.len()),
        (6008, 333, 333)
    );
    let labels = wn.labels.as_ref().unwrap();
    assert_eq!(labels.labelled().len(), 5000);
    assert_eq!(labels.classes.len(), 41);
    for (name, e, r) in [
        ("umls", 135, 46),
        ("kinships", 104, 25),
        ("nations", 14, 55),
    ] {
        let ds = KgDataset::load(&root.join(name)).unwrap();
        assert_eq!((ds.num_entities(), ds.num_relations()), (e, r), "{name}");
        assert!(ds.labels.is_none());
    }
    assert!(root.join("WORDNET-LICENSE.txt").exists());
}
