//! The per-organisation settings search on the bundled WordNet-5k graph: the kept table is the
//! one the gate judged, it is the best accepted candidate on the primary validation signal, a
//! table the gate refuses is never kept, the search is reproducible, and it runs at the end of
//! a federated stage as the organisation's settings say.

use std::path::Path;

use simskip::pipeline::gate::{against, watched_scores};
use simskip::pipeline::refine::validation_signal;
use simskip::pipeline::search::{draw, search, SearchSettings};
use simskip::pipeline::{train_transe, EvalContext};
use simskip::settings::{EvalSettings, GateSettings};
use simskip::work::{FederatedWork, WorkSettings};
use simskip_data::{KgDataset, Matrix};
use simskip_fed::{ClientWork, StageInfo, StageKind, StageParams};
use simskip_kge::TransEConfig;
use simskip_refine::{SimSkipConfig, SimSkipTrainer};

fn wordnet() -> KgDataset {
    KgDataset::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k")).unwrap()
}

/// A TransE table with some label structure, quickly.
fn transe_table(ds: &KgDataset) -> (Matrix, TransEConfig) {
    let cfg = TransEConfig {
        dim: 32,
        epochs: 15,
        ..TransEConfig::default()
    };
    (train_transe(ds, &cfg, &mut |_, _| {}).model.entities, cfg)
}

fn gate_with(candidates: usize, epochs: usize) -> GateSettings {
    GateSettings {
        search: SearchSettings {
            candidates,
            epochs,
            seed: 3,
        },
        ..GateSettings::default()
    }
}

#[test]
fn the_kept_table_is_the_best_candidate_the_gate_accepts() {
    let ds = wordnet();
    let (x, transe) = transe_table(&ds);
    let ctx = EvalContext::new(&ds, EvalSettings::default(), transe.norm);
    let gate = gate_with(4, 3);
    let base = SimSkipConfig::default();
    let outcome = search(&ctx, &x, &base, None, None, None, &gate).unwrap();
    assert_eq!(outcome.tried.len(), 4);
    assert_eq!(outcome.epochs_trained, 12);
    // The candidates are the grid's draw for the seed, in order.
    let drawn = draw(4, 3);
    for (t, c) in outcome.tried.iter().zip(&drawn) {
        assert_eq!(t.candidate.as_ref(), Some(c));
        assert_eq!(t.epoch.is_some(), t.gate.is_some());
    }
    let input_scores = watched_scores(&ctx, &gate, &x).unwrap();
    // Every judged candidate was compared with the input's own scores on every watched task.
    for d in outcome.tried.iter().filter_map(|t| t.gate.as_ref()) {
        let inputs: Vec<f64> = d.scores.iter().map(|s| s.input).collect();
        let expected: Vec<f64> = input_scores.iter().map(|s| s.1).collect();
        assert_eq!(inputs, expected);
        assert!(
            d.scores.len() >= 5,
            "KNN, probe acc and F1, LP, graph signal"
        );
    }
    match outcome.chosen {
        None => {
            assert_eq!(outcome.output, x, "nothing accepted: the input is kept");
            assert!(outcome.weights.is_none());
        }
        Some(i) => {
            let chosen = outcome.tried[i].gate.as_ref().unwrap();
            assert!(chosen.keep_refined);
            // The kept table is the one judged: re-judging it gives the same scores.
            let again = against(&input_scores, &ctx, &gate, &outcome.output).unwrap();
            assert_eq!(again.scores, chosen.scores);
            for s in &again.scores {
                assert!(s.refined >= s.input - gate.tolerance, "{s:?}");
            }
            // No accepted candidate has a better primary validation score.
            for d in outcome.tried.iter().filter_map(|t| t.gate.as_ref()) {
                if d.keep_refined {
                    assert!(d.scores[0].refined <= chosen.scores[0].refined);
                }
            }
            // The weights returned give the kept table.
            let c = outcome.tried[i].candidate.unwrap();
            let mut trainer = SimSkipTrainer::new(x.cols, c.config(&base, 3)).unwrap();
            trainer.import(outcome.weights.as_ref().unwrap()).unwrap();
            assert_eq!(trainer.refine(&x).unwrap(), outcome.output);
        }
    }
    // Reproducible: the same settings give the same choice and table.
    let again = search(&ctx, &x, &base, None, None, None, &gate).unwrap();
    assert_eq!(again.chosen, outcome.chosen);
    assert_eq!(again.output, outcome.output);
}

#[test]
fn a_table_the_gate_refuses_is_never_kept() {
    let ds = wordnet();
    let (x, transe) = transe_table(&ds);
    let ctx = EvalContext::new(&ds, EvalSettings::default(), transe.norm);
    // An incumbent that has lost the label structure (rows shifted by one entity).
    let n = x.rows;
    let shifted = Matrix::from_vec(
        n,
        x.cols,
        (0..n).flat_map(|i| x.row((i + 1) % n).to_vec()).collect(),
    );
    let gate = gate_with(0, 1);
    let decision = simskip::pipeline::gate::gate(&ctx, &gate, &x, &shifted).unwrap();
    let outcome = search(
        &ctx,
        &x,
        &SimSkipConfig::default(),
        None,
        None,
        Some((&shifted, &decision)),
        &gate,
    )
    .unwrap();
    assert_eq!(outcome.tried.len(), 1);
    assert!(!outcome.tried[0].gate.as_ref().unwrap().keep_refined);
    assert_eq!(outcome.chosen, None);
    assert_eq!(outcome.output, x);
}

#[test]
fn search_settings_are_validated_naming_the_key() {
    let e = gate_with(SearchSettings::GRID + 1, 5)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("gate.search.candidates"), "{e}");
    let e = gate_with(2, 0).validate().unwrap_err().to_string();
    assert!(e.contains("gate.search.epochs"), "{e}");
    assert!(
        gate_with(0, 0).validate().is_ok(),
        "no search, no epochs needed"
    );
    // Distinct draws, each reproducible.
    let all = draw(SearchSettings::GRID, 1);
    for (i, a) in all.iter().enumerate() {
        assert!(!all[i + 1..].contains(a));
    }
    assert_eq!(draw(5, 9), draw(5, 9));
}

#[test]
fn an_organisation_searches_at_the_end_of_a_federated_stage() {
    let ds = wordnet();
    let (x, transe) = transe_table(&ds);
    let dir = tempfile::tempdir().unwrap();
    let settings = WorkSettings {
        gate: gate_with(2, 2),
        ..WorkSettings::default()
    };
    let mut org = FederatedWork::with_table(
        ds.clone(),
        dir.path().join("org"),
        settings.clone(),
        x.clone(),
        transe.norm,
    )
    .unwrap();
    let stage = StageInfo {
        index: 1,
        name: "simskip".into(),
        rounds: 1,
        params: StageParams::defaults(StageKind::FedAvg, x.cols),
        privacy: None,
    };
    let global = SimSkipTrainer::new(x.cols, SimSkipConfig::default())
        .unwrap()
        .export();
    let fit = ClientWork::fit(&mut org, &stage, 1, global).unwrap();
    ClientWork::finish_stage(&mut org, &stage, fit.arrays).unwrap();
    let folder = dir.path().join("org").join("simskip");
    let decision: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("gate.json")).unwrap()).unwrap();
    let tried = decision["search"]["tried"].as_array().unwrap();
    assert_eq!(tried.len(), 3, "the federated output and 2 candidates");
    assert!(
        tried[0]["candidate"].is_null(),
        "the federated output first"
    );
    let kept = simskip::cli::load_table(&folder.join("entities.npy"), &ds).unwrap();
    let ctx = EvalContext::new(&ds, settings.eval.clone(), transe.norm);
    match decision["search"]["chosen"].as_u64() {
        None => {
            assert_eq!(decision["output"], "input");
            assert_eq!(kept, x);
        }
        Some(i) => {
            assert_eq!(decision["output"], "refined");
            // The kept table scores what its gate decision says on the primary signal.
            let (_, primary) = validation_signal(&ctx, settings.gate.signal).unwrap();
            let said = tried[i as usize]["gate"]["scores"][0]["refined"]
                .as_f64()
                .unwrap();
            assert!((primary(&kept) - said).abs() < 1e-9);
        }
    }
    assert!(decision["kept_figures"]["knn_at_10"].as_f64().is_some());
}
