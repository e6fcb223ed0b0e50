//! `simskip embed`, `refine` and `eval` as a user runs them, on the bundled WordNet-5k graph:
//! files written, figures sane, the gate never below the input on validation, and clear
//! one-line errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn simskip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simskip"))
        .args(args)
        .env("SIMSKIP_TRANSE__EPOCHS", "30")
        .output()
        .expect("simskip runs")
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn dataset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn embed_refine_eval_on_wordnet_5k() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset();
    let ds = ds.to_str().unwrap();
    let emb = tmp.path().join("emb");
    let stdout = ok(simskip(&[
        "embed",
        ds,
        "--out",
        emb.to_str().unwrap(),
        "--dim",
        "64",
    ]));
    assert!(stdout.contains("test"), "{stdout}");
    let report = json(&emb.join("report.json"));
    let mrr = report["test"]["mrr"].as_f64().unwrap();
    // Random ranking over 5,000 entities gives an MRR near 0.002.
    assert!(mrr > 0.02, "TransE test MRR {mrr}");
    assert_eq!(
        report["config"]["epochs"], 30,
        "the environment override reached the run"
    );

    let refined = tmp.path().join("refined");
    let input = emb.join("entities.npy");
    let stdout = ok(simskip(&[
        "refine",
        ds,
        "--input",
        input.to_str().unwrap(),
        "--out",
        refined.to_str().unwrap(),
        "--epochs",
        "4",
        "--eval",
    ]));
    assert!(stdout.contains("gate on validation KNN@10"), "{stdout}");
    let report = json(&refined.join("report.json"));
    let selection = &report["refine"]["selection"];
    let (input_score, best) = (
        selection["input_score"].as_f64().unwrap(),
        selection["best_score"].as_f64().unwrap(),
    );
    assert!(
        best >= input_score,
        "gate output below the input on validation: {best} < {input_score}"
    );
    assert_eq!(selection["history"].as_array().unwrap().len(), 4);
    let knn_in = report["eval"]["input"]["knn_at_10"].as_f64().unwrap();
    let knn_out = report["eval"]["refined"]["knn_at_10"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&knn_in) && (0.0..=1.0).contains(&knn_out));
    // 41 supersenses: a table with any signal beats the chance level of ~1/41 by far.
    assert!(knn_in > 0.1, "input KNN@10 {knn_in}");
    if report["refine"]["chosen"] == "input" {
        let a = simskip_data::Embeddings::read(&input).unwrap();
        let b = simskip_data::Embeddings::read(&refined.join("refined.npy")).unwrap();
        assert_eq!(a, b, "the gate kept the input, so the output is the input");
    }

    let eval_json = tmp.path().join("eval.json");
    let stdout = ok(simskip(&[
        "eval",
        ds,
        "--input",
        input.to_str().unwrap(),
        "--refined",
        refined.join("refined.safetensors").to_str().unwrap(),
        "--report",
        eval_json.to_str().unwrap(),
        "--no-probe",
    ]));
    assert!(
        stdout.contains("KNN@10") && stdout.contains("refined"),
        "{stdout}"
    );
    let figures = json(&eval_json);
    assert_eq!(
        figures["input"]["knn_at_10"].as_f64().unwrap(),
        knn_in,
        "the same split and figures as refine --eval"
    );
    assert!(figures["input"]["lp_mrr"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_gets_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "00001930n 0.1 0.2\n00002684n 0.3\n").unwrap();
    let out = simskip(&[
        "eval",
        dataset().to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("bad.txt") && stderr.contains(":2"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = simskip(&[
        "embed",
        "/nonexistent/graph",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/nonexistent/graph"),
        "{stderr}"
    );

    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[simskip]\ntemprature = 0.1\n").unwrap();
    let out = simskip(&[
        "--config",
        cfg.to_str().unwrap(),
        "refine",
        dataset().to_str().unwrap(),
        "-i",
        "x",
        "-o",
        "y",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("temprature") && stderr.contains("bad.toml"),
        "{stderr}"
    );
}
