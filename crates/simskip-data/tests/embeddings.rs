use std::path::{Path, PathBuf};

use npyz::WriterBuilder;
use simskip_data::embeddings::{ids_path, EMBEDDINGS_TENSOR};
use simskip_data::{write_named_safetensors, DataError, Embeddings, Matrix, NamedArray, Vocab};

fn table() -> Embeddings {
    let names = Vocab::from_names(["dog", "cat", "emu"].map(String::from));
    let data = vec![0.1, -2.5, 3.0e-7, 1.0, 0.0, -0.0, 123456.78, 1e-30, -1e30];
    Embeddings::new(names, Matrix::from_vec(3, 3, data)).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A `.npy` file built by hand as numpy writes it (version 1.0, header padded to 64 bytes).
fn npy_bytes(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn err_msg(r: Result<Embeddings, DataError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn npy_f32_round_trip_with_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("emb.npy");
    let e = table();
    e.write_npy(&p).unwrap();
    assert_eq!(ids_path(&p), dir.path().join("emb.ids.txt"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("emb.ids.txt")).unwrap(),
        "dog\ncat\nemu\n"
    );
    let back = Embeddings::read(&p).unwrap();
    assert_eq!(back, e);
    assert_eq!(back.vector("emu").unwrap()[2], -1e30);
    // No temporary files left behind.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
}

#[test]
fn npy_f64_read_c_and_fortran_order() {
    let dir = tempfile::tempdir().unwrap();
    // 2 x 3 array [[1, 2, 3], [4, 5, 6]].
    let p = dir.path().join("c.npy");
    std::fs::write(
        &p,
        npy_bytes(
            "<f8",
            false,
            "(2, 3)",
            &f64_bytes(&[1., 2., 3., 4., 5., 6.]),
        ),
    )
    .unwrap();
    let e = Embeddings::read(&p).unwrap();
    assert_eq!((e.len(), e.dim()), (2, 3));
    assert_eq!(e.matrix.data, vec![1., 2., 3., 4., 5., 6.]);
    assert_eq!(e.names.names(), ["0", "1"]); // no id list
    let p = dir.path().join("f.npy");
    std::fs::write(
        &p,
        npy_bytes("<f8", true, "(2, 3)", &f64_bytes(&[1., 4., 2., 5., 3., 6.])),
    )
    .unwrap();
    assert_eq!(
        Embeddings::read(&p).unwrap().matrix.data,
        vec![1., 2., 3., 4., 5., 6.]
    );
}

#[test]
fn npy_f64_round_trip_via_npyz() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e64.npy");
    let vals: Vec<f64> = (0..12).map(|i| i as f64 * 0.25 - 1.0).collect();
    let mut buf = Vec::new();
    {
        let mut w = npyz::WriteOptions::<f64>::new()
            .default_dtype()
            .shape(&[4, 3])
            .writer(&mut buf)
            .begin_nd()
            .unwrap();
        w.extend(vals.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(&p, buf).unwrap();
    write(dir.path(), "e64.ids.txt", "a\nb\nc\nd\n");
    let e = Embeddings::read(&p).unwrap();
    assert_eq!(e.names.names(), ["a", "b", "c", "d"]);
    assert_eq!(
        e.matrix.data,
        vals.iter().map(|&v| v as f32).collect::<Vec<_>>()
    );
    // And back out as f32 npy.
    let q = dir.path().join("again.npy");
    e.write_npy(&q).unwrap();
    assert_eq!(Embeddings::read(&q).unwrap(), e);
}

#[test]
fn npy_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, bytes: Vec<u8>| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let msg = err_msg(Embeddings::read(&p));
        assert!(msg.contains(name), "{msg}");
        msg
    };
    let m = case(
        "nan.npy",
        npy_bytes("<f8", false, "(2, 2)", &f64_bytes(&[1., 2., f64::NAN, 4.])),
    );
    assert!(m.contains("row 1 ('1'), column 0 is NaN"), "{m}");
    let m = case(
        "inf.npy",
        npy_bytes(
            "<f8",
            false,
            "(2, 2)",
            &f64_bytes(&[1., f64::INFINITY, 3., 4.]),
        ),
    );
    assert!(m.contains("row 0") && m.contains("infinite"), "{m}");
    let m = case(
        "big.npy",
        npy_bytes("<f8", false, "(1, 2)", &f64_bytes(&[1e300, 1.])),
    );
    assert!(m.contains("float32 range"), "{m}");
    let m = case("int.npy", npy_bytes("<i4", false, "(1, 2)", &[0u8; 8]));
    assert!(m.contains("unsupported dtype") && m.contains("<i4"), "{m}");
    let m = case(
        "one_d.npy",
        npy_bytes("<f8", false, "(3,)", &f64_bytes(&[1., 2., 3.])),
    );
    assert!(m.contains("2-D"), "{m}");
    let m = case(
        "three_d.npy",
        npy_bytes("<f8", false, "(1, 1, 2)", &f64_bytes(&[1., 2.])),
    );
    assert!(m.contains("2-D"), "{m}");
    let m = case(
        "short.npy",
        npy_bytes("<f8", false, "(2, 3)", &f64_bytes(&[1., 2.])),
    );
    assert!(m.contains("truncated"), "{m}");
    let m = case("rows0.npy", npy_bytes("<f8", false, "(0, 3)", &[]));
    assert!(m.contains("no embedding vectors"), "{m}");
    let m = case("empty.npy", Vec::new());
    assert!(m.contains("empty file"), "{m}");
    let m = case("junk.npy", b"hello world, not numpy".to_vec());
    assert!(m.contains("not a .npy file"), "{m}");
    // Hostile headers: huge shapes, deep nesting, header longer than the file.
    let m = case(
        "overflow.npy",
        npy_bytes(
            "<f8",
            false,
            "(18446744073709551615, 18446744073709551615)",
            &[],
        ),
    );
    assert!(m.contains("too large"), "{m}");
    let m = case(
        "zero_overflow.npy",
        npy_bytes("<f8", false, "(0, 4294967296, 4294967296, 4294967296)", &[]),
    );
    assert!(m.contains("too large"), "{m}");
    let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
    let m = case("nested.npy", npy_bytes("<f8", false, &deep, &[]));
    assert!(m.contains("nested too deeply"), "{m}");
    let mut long = b"\x93NUMPY\x02\x00".to_vec();
    long.extend(u32::MAX.to_le_bytes());
    let m = case("long.npy", long);
    assert!(m.contains("implausibly large"), "{m}");
    let mut cut = npy_bytes("<f8", false, "(2, 3)", &[]);
    cut.truncate(30);
    let m = case("cut.npy", cut);
    assert!(m.contains("truncated"), "{m}");
    let m = case("noshape.npy", npy_bytes("<f8", false, "'x'", &[]));
    assert!(m.contains("shape"), "{m}");
    let m = case("badver.npy", b"\x93NUMPY\x09\x00\x00\x00".to_vec());
    assert!(m.contains("version 9.0"), "{m}");
}

#[test]
fn npy_id_list_problems() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("emb.npy");
    table().write_npy(&p).unwrap();
    let ids = write(dir.path(), "emb.ids.txt", "dog\ncat\n");
    let m = err_msg(Embeddings::read(&p));
    assert!(
        m.contains("emb.ids.txt") && m.contains("has 2 names") && m.contains("3 rows"),
        "{m}"
    );
    std::fs::write(&ids, "dog\ncat\ndog\n").unwrap();
    let m = err_msg(Embeddings::read(&p));
    assert!(
        m.contains("emb.ids.txt:3:") && m.contains("duplicate name 'dog'"),
        "{m}"
    );
    std::fs::write(&ids, "dog\n\nemu\n").unwrap();
    let m = err_msg(Embeddings::read(&p));
    assert!(
        m.contains("emb.ids.txt:2:") && m.contains("empty name"),
        "{m}"
    );
    // Trailing blank lines and CRLF are fine.
    std::fs::write(&ids, "a\r\nb\r\nc\r\n\n").unwrap();
    assert_eq!(Embeddings::read(&p).unwrap().names.names(), ["a", "b", "c"]);
    // Missing id list: numbered names.
    std::fs::remove_file(&ids).unwrap();
    let e = Embeddings::read(&p).unwrap();
    assert_eq!(e.names.names(), ["0", "1", "2"]);
    assert_eq!(e.matrix, table().matrix);
}

#[test]
fn safetensors_round_trip_and_name_sources() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("emb.safetensors");
    let e = table();
    e.write_safetensors(&p).unwrap();
    assert!(dir.path().join("emb.ids.txt").exists());
    assert_eq!(Embeddings::read(&p).unwrap(), e);
    // Without the sibling id list, the names come from the metadata.
    std::fs::remove_file(dir.path().join("emb.ids.txt")).unwrap();
    assert_eq!(Embeddings::read(&p).unwrap(), e);
    // The sibling id list wins over the metadata.
    write(dir.path(), "emb.ids.txt", "x\ny\nz\n");
    assert_eq!(Embeddings::read(&p).unwrap().names.names(), ["x", "y", "z"]);

    // F64 tensor, no metadata, no id list: numbered names.
    let q = dir.path().join("f64.safetensors");
    let vals = [1.5f64, -2.0, 3.25, 4.0];
    let bytes = f64_bytes(&vals);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2, 2], &bytes).unwrap();
    std::fs::write(
        &q,
        safetensors::serialize([(EMBEDDINGS_TENSOR, view)], None).unwrap(),
    )
    .unwrap();
    let f = Embeddings::read(&q).unwrap();
    assert_eq!(f.names.names(), ["0", "1"]);
    assert_eq!(f.matrix.data, vec![1.5, -2.0, 3.25, 4.0]);
}

#[test]
fn safetensors_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let meta = Default::default();
    write_named_safetensors(
        &p,
        &[NamedArray::new("weights", vec![2, 2], vec![0.0; 4])],
        &meta,
    )
    .unwrap();
    let m = err_msg(Embeddings::read(&p));
    assert!(
        m.contains("no tensor named 'embeddings'") && m.contains("weights"),
        "{m}"
    );
    write_named_safetensors(
        &p,
        &[NamedArray::new("embeddings", vec![4], vec![0.0; 4])],
        &meta,
    )
    .unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("2-D"));
    write_named_safetensors(
        &p,
        &[NamedArray::new(
            "embeddings",
            vec![2, 2],
            vec![0.0, 1.0, f32::NAN, 0.0],
        )],
        &meta,
    )
    .unwrap();
    let m = err_msg(Embeddings::read(&p));
    assert!(m.contains("row 1 ('1'), column 0 is NaN"), "{m}");
    let bytes = vec![0u8; 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![1, 1], &bytes).unwrap();
    std::fs::write(
        &p,
        safetensors::serialize([("embeddings", view)], None).unwrap(),
    )
    .unwrap();
    let m = err_msg(Embeddings::read(&p));
    assert!(m.contains("unsupported dtype I32"), "{m}");
    std::fs::write(&p, b"").unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("empty file"));
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("not a valid .safetensors file"));
    // Metadata ids inconsistent with the rows.
    let meta = [("ids".to_string(), "a\nb\nc".to_string())].into();
    write_named_safetensors(
        &p,
        &[NamedArray::new("embeddings", vec![2, 1], vec![0.0, 1.0])],
        &meta,
    )
    .unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("3 names for 2 rows"));
    let meta = [("ids".to_string(), "a\na".to_string())].into();
    write_named_safetensors(
        &p,
        &[NamedArray::new("embeddings", vec![2, 1], vec![0.0, 1.0])],
        &meta,
    )
    .unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("duplicate name 'a'"));
}

#[test]
fn text_with_and_without_header() {
    let dir = tempfile::tempdir().unwrap();
    let plain = write(dir.path(), "e.txt", "dog 0.5 -1\ncat 2e-3 4\n\n");
    let e = Embeddings::read(&plain).unwrap();
    assert_eq!(e.names.names(), ["dog", "cat"]);
    assert_eq!(e.matrix.data, vec![0.5, -1.0, 0.002, 4.0]);
    let w2v = write(dir.path(), "e.w2v", "2 2\r\ndog\t0.5  -1\r\ncat 2e-3 4\r\n");
    assert_eq!(Embeddings::read(&w2v).unwrap(), e);
    let vec = write(dir.path(), "e.vec", "\u{feff}2 2\ndog 0.5 -1\ncat 2e-3 4");
    assert_eq!(Embeddings::read(&vec).unwrap(), e);
    // Writer output (with header) reads back exactly.
    let out = dir.path().join("out.txt");
    table().write_text(&out).unwrap();
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("3 3\n"));
    assert_eq!(Embeddings::read(&out).unwrap(), table());
    // Generic write() dispatches on the extension.
    for ext in ["npy", "safetensors", "vec"] {
        let q = dir.path().join(format!("any.{ext}"));
        table().write(&q).unwrap();
        assert_eq!(Embeddings::read(&q).unwrap(), table(), "{ext}");
    }
}

#[test]
fn text_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, text: &str| {
        let p = write(dir.path(), name, text);
        let err = Embeddings::read(&p).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        (err, msg)
    };
    let (_, m) = case("count.txt", "3 2\na 1 2\nb 3 4\n");
    assert!(
        m.contains("count.txt:1:") && m.contains("header says 3 vectors") && m.contains("has 2"),
        "{m}"
    );
    let (_, m) = case("dim.txt", "2 3\na 1 2 3\nb 3 4\n");
    assert!(
        m.contains("dim.txt:3:") && m.contains("line 3 has 2 values, expected 3"),
        "{m}"
    );
    let mut ragged = String::new();
    for i in 0..6 {
        ragged.push_str(&format!("e{i} {}\n", vec!["0.5"; 128].join(" ")));
    }
    ragged.push_str(&format!("e6 {}\n", vec!["0.5"; 127].join(" ")));
    let (err, m) = case("ragged.txt", &ragged);
    assert!(matches!(err, DataError::Parse { line: 7, .. }));
    assert!(m.contains("line 7 has 127 values, expected 128"), "{m}");
    let (_, m) = case("nonnum.txt", "a 1 2\nb 1 x2y\n");
    assert!(
        m.contains("nonnum.txt:2:") && m.contains("'x2y'") && m.contains("value 2 of 'b'"),
        "{m}"
    );
    let (_, m) = case("nan.txt", "a 1 2\nb NaN 2\n");
    assert!(m.contains("nan.txt:2:") && m.contains("NaN"), "{m}");
    let (_, m) = case("inf.txt", "a 1 -inf\n");
    assert!(m.contains("inf.txt:1:") && m.contains("infinite"), "{m}");
    let (_, m) = case("huge.txt", "a 1 1e39\n");
    assert!(m.contains("float32 range"), "{m}");
    let (_, m) = case("dup.txt", "a 1 2\nb 1 2\n\na 3 4\n");
    assert!(
        m.contains("dup.txt:4:") && m.contains("duplicate name 'a' (first on line 1)"),
        "{m}"
    );
    let (_, m) = case("empty.txt", "");
    assert!(m.contains("empty file"), "{m}");
    let (_, m) = case("blank.txt", "\n  \n\n");
    assert!(m.contains("empty file"), "{m}");
    let (_, m) = case("header_only.txt", "0 5\n");
    assert!(m.contains("empty file"), "{m}");
    let (_, m) = case("novalues.txt", "a\nb 1\n");
    assert!(
        m.contains("novalues.txt:1:") && m.contains("no values"),
        "{m}"
    );
    let (_, m) = case("dim0.txt", "1 0\na\n");
    assert!(m.contains("dimension 0"), "{m}");
    // Binary data under a text extension.
    let p = dir.path().join("bin.txt");
    std::fs::write(&p, [0x93u8, b'N', 0xff, 0xfe]).unwrap();
    assert!(err_msg(Embeddings::read(&p)).contains("not UTF-8"));
}

#[test]
fn writers_refuse_what_readers_reject() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = table();
    e.matrix.data[4] = f32::NAN;
    assert!(e
        .write_npy(&dir.path().join("x.npy"))
        .unwrap_err()
        .to_string()
        .contains("'cat'"));
    let spaced = Embeddings::new(
        Vocab::from_names(["a b".to_string()]),
        Matrix::from_vec(1, 1, vec![1.0]),
    )
    .unwrap();
    assert!(spaced.write_text(&dir.path().join("x.txt")).is_err());
    // ... but a name with a space is fine in an id list.
    spaced.write_npy(&dir.path().join("s.npy")).unwrap();
    assert_eq!(Embeddings::read(&dir.path().join("s.npy")).unwrap(), spaced);
    assert!(Embeddings::new(Vocab::from_names(["a".to_string()]), Matrix::zeros(2, 1)).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2); // s.npy + s.ids.txt
}

#[test]
fn align_to_reorders_and_names_missing() {
    let e = table();
    let vocab = Vocab::from_names(["emu", "dog"].map(String::from));
    let m = e.align_to(&vocab).unwrap();
    assert_eq!((m.rows, m.cols), (2, 3));
    assert_eq!(m.row(0), e.vector("emu").unwrap());
    assert_eq!(m.row(1), e.vector("dog").unwrap());
    let vocab = Vocab::from_names(["dog", "wolf", "fox"].map(String::from));
    let err = e.align_to(&vocab).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Invalid(_)));
    assert!(
        msg.contains("'wolf'") && msg.contains("'fox'") && msg.contains("1 more"),
        "{msg}"
    );
}

#[test]
fn check_labels_against_table() {
    let dir = tempfile::tempdir().unwrap();
    let e = table();
    let ok = write(dir.path(), "ok.tsv", "dog\tmammal\nemu\tbird\n");
    let l = e.check_labels(&ok).unwrap();
    assert_eq!(l.labelled(), vec![0, 2]);
    let bad = write(dir.path(), "bad.tsv", "dog\tmammal\nwolf\tmammal\n");
    let msg = e.check_labels(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("bad.tsv:2:") && msg.contains("'wolf'"),
        "{msg}"
    );
}
