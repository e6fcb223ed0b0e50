//! The coordinator's database on its own: the resume rule, a round stored once, and what a
//! round close costs with the default run's models (printed as figures).

use std::collections::BTreeMap;
use std::time::Instant;

use simskip_data::NamedArray;
use simskip_fed::coordinator::store::{Start, Store, StoreError};
use simskip_fed::rounds::{Overhead, RoundRecord};
use simskip_fed::{GlobalSnapshot, Robustness, StageConfig, StageKind, StageParams, TaskKind};

fn stages(fede_rounds: u32) -> Vec<StageConfig> {
    vec![
        StageConfig {
            name: "fede".into(),
            rounds: fede_rounds,
            eval_every: 5,
            params: StageParams::defaults(StageKind::FedE, 128),
            aggregation: Robustness::default(),
            privacy: None,
            secure_aggregation: None,
        },
        StageConfig {
            name: "simskip".into(),
            rounds: 10,
            eval_every: 5,
            params: StageParams::defaults(StageKind::FedAvg, 128),
            aggregation: Robustness::default(),
            privacy: None,
            secure_aggregation: None,
        },
    ]
}

fn record(run_id: &str, stage: usize, round: u32, kind: TaskKind) -> RoundRecord {
    RoundRecord {
        run_id: run_id.into(),
        stage_index: stage,
        stage: ["fede", "simskip"][stage].into(),
        stage_kind: [StageKind::FedE, StageKind::FedAvg][stage],
        round,
        kind,
        selected: vec!["org-0".into(), "org-1".into(), "org-2".into()],
        num_clients: 3,
        clients: BTreeMap::new(),
        failures: BTreeMap::new(),
        missing: vec![],
        aggregated: kind != TaskKind::FinishStage,
        note: None,
        metrics: BTreeMap::from([("loss".to_string(), 0.5)]),
        timed_out: false,
        started_secs: round as f64,
        ended_secs: round as f64 + 0.5,
        coordinator: Overhead::default(),
    }
}

#[test]
fn resume_rule_and_rounds_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let Start::New { run_id } = store.start("", &stages(20)).unwrap() else {
        panic!("an empty database starts a new run")
    };
    store
        .commit_round(&record(&run_id, 0, 1, TaskKind::Evaluate), None)
        .unwrap();
    // The same round again is refused by the database: a round is never stored twice.
    let again = store.commit_round(&record(&run_id, 0, 1, TaskKind::Evaluate), None);
    assert!(matches!(again, Err(StoreError::Db { .. })), "{again:?}");
    drop(store);

    let mut store = Store::open(dir.path()).unwrap();
    // No run id: the unfinished run with the same stages is resumed ...
    let Start::Resumed(r) = store.start("", &stages(20)).unwrap() else {
        panic!("resumed")
    };
    assert_eq!((r.run_id.as_str(), r.records.len()), (run_id.as_str(), 1));
    // ... other stages are refused, naming the run ...
    let e = store.start("", &stages(21)).unwrap_err();
    assert!(matches!(&e, StoreError::StagesDiffer { run_id: r, .. } if r == &run_id));
    // ... another explicit run id starts that run, and a finished run is not resumed.
    assert_eq!(
        store.start("other", &stages(21)).unwrap(),
        Start::New {
            run_id: "other".into()
        }
    );
    store.finish_run(&run_id).unwrap();
    let e = store.start(&run_id, &stages(20)).unwrap_err();
    assert!(matches!(e, StoreError::Finished { .. }), "{e}");
}

/// The default simulation's shapes: a FedE table of the bundled WordNet-5k's entities at
/// dim 128 and a SimSkip model of a few 128x128 layers; 20 + 10 FIT rounds with evaluations
/// every 5. Prints the cost of each round close and the database's size per round.
#[test]
fn round_close_costs() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let Start::New { run_id } = store.start("", &stages(20)).unwrap() else {
        panic!("new")
    };
    let entities = 5_000; // WordNet-5k's entities
    let keys: Vec<String> = (0..entities).map(|i| format!("{i:08}")).collect();
    let fede = GlobalSnapshot {
        arrays: vec![NamedArray::new(
            "entities",
            vec![entities, 128],
            vec![0.25; entities * 128],
        )],
        keys: Some(keys),
    };
    let simskip = GlobalSnapshot {
        arrays: ["l1.weight", "l2.weight", "l3.weight"]
            .iter()
            .map(|n| NamedArray::new(*n, vec![128, 128], vec![0.5; 128 * 128]))
            .collect(),
        keys: None,
    };
    let mut tx_ms = Vec::new();
    let mut ckpt_ms = Vec::new();
    let mut rounds = 0;
    let t0 = Instant::now();
    for (stage, n, global) in [(0usize, 20u32, &fede), (1, 10, &simskip)] {
        for r in 1..=n {
            let cost = store
                .commit_round(&record(&run_id, stage, r, TaskKind::Fit), Some(global))
                .unwrap();
            tx_ms.push(cost.transaction_ms);
            ckpt_ms.push(cost.checkpoint_ms);
            rounds += 1;
            if r % 5 == 0 {
                let cost = store
                    .commit_round(&record(&run_id, stage, r, TaskKind::Evaluate), None)
                    .unwrap();
                tx_ms.push(cost.transaction_ms);
                rounds += 1;
            }
        }
        store
            .commit_round(&record(&run_id, stage, n, TaskKind::FinishStage), None)
            .unwrap();
        rounds += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let checkpoints: u64 = store
        .checkpoints(&run_id)
        .unwrap()
        .iter()
        .map(|c| c.bytes)
        .sum();
    // Closing the database folds its write-ahead log in.
    drop(store);
    let size = |f: &str| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len());
    let (db, wal) = (size("coordinator.db"), size("coordinator.db-wal"));
    eprintln!(
        "round close, {rounds} rounds: transaction median {:.2} ms; checkpoint write+sync+hash \
         median {:.1} ms (FIT rounds); database {db} bytes = {:.0} bytes per round (+ {wal} \
         bytes of WAL); checkpoints {:.2} MB per FIT round; {wall:.2} s in all",
        median(&mut tx_ms),
        median(&mut ckpt_ms),
        db as f64 / rounds as f64,
        checkpoints as f64 / 1e6 / 30.0
    );
    let store = Store::open_existing(dir.path()).unwrap();
    assert_eq!(store.rounds(&run_id).unwrap().len(), rounds);
}
