use std::collections::BTreeMap;

use simskip_data::{read_named_safetensors, write_named_safetensors, DataError, NamedArray};

#[test]
fn named_safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("global.safetensors");
    let arrays = vec![
        NamedArray::new(
            "relation",
            vec![2, 3],
            vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0],
        ),
        NamedArray::new("entity", vec![4], vec![0.25; 4]),
        NamedArray::new("scalar", vec![], vec![42.0]),
        NamedArray::new("empty", vec![0, 8], vec![]),
    ];
    let meta: BTreeMap<String, String> = [
        ("round".to_string(), "7".to_string()),
        ("model".to_string(), "TransE".to_string()),
    ]
    .into();
    write_named_safetensors(&p, &arrays, &meta).unwrap();
    assert!(!dir.path().join("global.safetensors.tmp").exists());
    let (back, back_meta) = read_named_safetensors(&p).unwrap();
    let mut sorted = arrays.clone();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(back, sorted);
    assert_eq!(back_meta, meta);

    // Overwriting replaces the file whole; no metadata reads back as empty.
    write_named_safetensors(&p, &arrays[1..2], &BTreeMap::new()).unwrap();
    let (back, back_meta) = read_named_safetensors(&p).unwrap();
    assert_eq!(back, arrays[1..2].to_vec());
    assert!(back_meta.is_empty());
}

#[test]
fn named_safetensors_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let a = NamedArray::new("a", vec![1], vec![1.0]);
    let err = write_named_safetensors(&p, &[a.clone(), a.clone()], &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("two arrays are named 'a'"));
    let bad = NamedArray {
        name: "b".into(),
        shape: vec![2, 2],
        data: vec![1.0],
    };
    assert!(matches!(
        write_named_safetensors(&p, &[bad], &BTreeMap::new()),
        Err(DataError::Invalid(_))
    ));
    assert!(!p.exists());
    // Writing into a missing folder fails cleanly, naming the file.
    let nowhere = dir.path().join("no/such/dir/x.safetensors");
    let err = write_named_safetensors(&nowhere, &[a], &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("x.safetensors"));
    // Non-F32 tensors are refused on read.
    let bytes = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2], &bytes).unwrap();
    std::fs::write(&p, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
    let msg = read_named_safetensors(&p).unwrap_err().to_string();
    assert!(msg.contains("'w'") && msg.contains("F64"), "{msg}");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert!(read_named_safetensors(&p)
        .unwrap_err()
        .to_string()
        .contains("x.safetensors"));
}
