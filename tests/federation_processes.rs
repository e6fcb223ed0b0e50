//! The federation as real processes on loopback: one `simskip-server`, three
//! `simskip-client`s, the bundled WordNet-5k graph split FedE-style. Checks the metrics files,
//! every organisation's outputs and the figures; and that a client killed mid-round neither
//! stalls the run past the round timeout nor stays out once restarted, even when it was away
//! for the end of the FedE stage.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Federation, Proc};
use simskip::node::RunFigures;
use simskip::simulate::{simulate, NodeProgram, SimulateFile};
use simskip_fed::rounds::RoundRecord;
use simskip_fed::TaskKind;

/// The `simskip` binary of this build, whose `server` and `client` subcommands are the daemons.
fn simskip_program() -> NodeProgram {
    NodeProgram {
        path: PathBuf::from(env!("CARGO_BIN_EXE_simskip")),
    }
}

/// A short run on the bundled WordNet-5k: few rounds, small evaluation budget.
fn quick_settings(out: &Path) -> SimulateFile {
    let mut file = common::quick_settings();
    file.simulate.out_dir = out.to_path_buf();
    file.simulate.timeout_secs = 600;
    file
}

#[test]
fn three_clients_run_both_stages_over_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let figures =
        simulate(&quick_settings(&out), &simskip_program()).expect("simulation runs to the end");

    // Metrics history, as JSON lines and CSV, and the global model of each stage.
    let coordinator = out.join("coordinator");
    let jsonl = std::fs::read_to_string(coordinator.join("metrics.jsonl")).unwrap();
    let csv = std::fs::read_to_string(coordinator.join("metrics.csv")).unwrap();
    assert!(
        jsonl.lines().count() >= 6 + 3,
        "one record per round at least:\n{jsonl}"
    );
    assert!(
        csv.lines().next().unwrap().contains("metric"),
        "CSV header: {csv:.200}"
    );
    for stage in ["fede", "simskip"] {
        assert!(
            coordinator.join(stage).join("global.safetensors").is_file(),
            "{stage} global model"
        );
    }

    // FedE: the weighted test MRR is far above random ranking (about 0.002 over these graphs).
    let fede = &figures.stages["fede"];
    assert_eq!(fede.clients.len(), 3);
    let mrr = fede.aggregate["test.mrr"];
    assert!(mrr > 0.02, "FedE test MRR {mrr}");
    // The aggregate is a weighted mean of the clients: between their extremes.
    let client_mrr: Vec<f64> = fede.clients.values().map(|m| m["test.mrr"]).collect();
    let (lo, hi) = client_mrr
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    assert!(
        lo - 1e-9 <= mrr && mrr <= hi + 1e-9,
        "{mrr} outside [{lo}, {hi}]"
    );

    // SimSkip: input and refined figures from every client.
    let simskip = &figures.stages["simskip"];
    for key in [
        "input.knn_at_10",
        "refined.knn_at_10",
        "input.lp_mrr",
        "refined.lp_mrr",
        "input.probe_accuracy",
    ] {
        assert!(
            simskip.aggregate.contains_key(key),
            "missing {key}: {:?}",
            simskip.aggregate
        );
    }

    // The coordinator aligned the organisations' entities by blinded keys only (simulate's
    // default): its FedE row keys are HMACs, fewer than the organisations' rows together
    // (shared entities are one row), and no entity name appears among them.
    let keys = std::fs::read_to_string(coordinator.join("fede/entities.txt")).unwrap();
    let keys: Vec<&str> = keys.lines().collect();
    assert!(keys
        .iter()
        .all(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit())));
    let mut held = 0;
    for k in 0..3 {
        let org = out.join(format!("org-{k}-output"));
        let names = simskip_data::Embeddings::read(&org.join("fede/entities.npy"))
            .unwrap()
            .names;
        assert!(names.names().iter().all(|n| !keys.contains(&n.as_str())));
        held += names.len();
    }
    assert!(keys.len() < held, "{} keys for {held} rows", keys.len());

    // Each organisation wrote its own stage-1 and refined tables and the gate decision.
    for k in 0..3 {
        let org = out.join(format!("org-{k}-output"));
        let refined = simskip_data::Embeddings::read(&org.join("simskip/entities.npy")).unwrap();
        let stage1 = simskip_data::Embeddings::read(&org.join("fede/entities.npy")).unwrap();
        assert_eq!(refined.names, stage1.names);
        assert_eq!(refined.dim(), 128);
        let gate: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(org.join("simskip/gate.json")).unwrap())
                .unwrap();
        // The gate watched every task on validation data: the refined table is kept only if
        // it wins on the primary signal and no other task falls beyond the tolerance.
        let tolerance = gate["tolerance"].as_f64().unwrap();
        let scores: Vec<(f64, f64)> = gate["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["input"].as_f64().unwrap_or(f64::NAN),
                    s["refined"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect();
        let tasks: Vec<&str> = gate["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["task"].as_str().unwrap())
            .collect();
        assert!(
            tasks.iter().any(|t| t.contains("probe macro-F1"))
                && tasks.iter().any(|t| t.contains("link-prediction")),
            "watched tasks {tasks:?}"
        );
        let (input, refined_score) = scores[0];
        assert_eq!(
            (input, refined_score),
            (
                gate["input"].as_f64().unwrap(),
                gate["refined"].as_f64().unwrap()
            )
        );
        let no_fall = scores[1..]
            .iter()
            .all(|(i, r)| i.is_nan() || *r >= i - tolerance);
        let expected = if refined_score > input && no_fall {
            "refined"
        } else {
            "input"
        };
        assert_eq!(gate["output"], expected, "gate decision {gate}");
        if expected == "input" {
            assert_eq!(
                refined.matrix, stage1.matrix,
                "gate kept the input, so the table is the input"
            );
        }
    }
    let table = figures.render();
    assert!(
        table.contains("aggregate") && table.contains("refined"),
        "{table}"
    );
    // Beside the federated model's figures, what each organisation kept, and its aggregate.
    assert_eq!(figures.stages["simskip"].kept.len(), 3);
    assert!(table.contains("kept ("), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("aggregate") && l.contains(" kept ")),
        "{table}"
    );
}

#[test]
fn killed_client_does_not_stall_the_run_and_rejoins_when_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let mut fed = Federation::prepare(out, &common::quick_settings());
    // Short enough to see a dead client dropped within the test, long enough that a busy
    // 2-core machine does not drop live ones.
    fed.server.server.round_timeout_secs = 12.0;
    fed.server.server.heartbeat_interval_secs = 1.0;
    fed.server.server.heartbeat_timeout_secs = 6.0;
    fed.server.server.stages[0].rounds = 8;
    fed.write_server();
    let server_bin = Path::new(env!("CARGO_BIN_EXE_simskip-server"));
    let client_bin = Path::new(env!("CARGO_BIN_EXE_simskip-client"));
    let started = Instant::now();
    let (mut server_proc, _) = fed.start_server(server_bin, &[]);
    let mut clients: Vec<Proc> = (0..common::ORGS)
        .map(|k| fed.start_client(client_bin, &[], k))
        .collect();

    // Kill org-2 once the run is under way (two FedE rounds recorded).
    let metrics = fed.coordinator.join("metrics.jsonl");
    let records = || -> Vec<RoundRecord> {
        std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while records().len() < 2 {
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = clients.pop().unwrap();
    drop(victim); // SIGKILL mid-run
    let killed_at = records().len();

    // The others go on: within a round timeout (plus heartbeat detection) rounds are closing again.
    let resume_deadline = Instant::now() + Duration::from_secs(12 + 6 + 30);
    while records().len() < killed_at + 2 {
        assert!(
            Instant::now() < resume_deadline,
            "the run stalled after a client died:\n{}",
            common::tail(&fed.server_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // It stays away until the FedE stage is over (its FINISH closed without it), then is
    // restarted: it registers again, builds its stage-1 table from the FedE rows it kept at
    // its last task, and refines it with the others.
    let fede_finished = |r: &RoundRecord| r.stage == "fede" && r.kind == TaskKind::FinishStage;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !records().iter().any(fede_finished) {
        assert!(
            Instant::now() < deadline,
            "the FedE stage did not finish:\n{}",
            common::tail(&fed.server_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    clients.push(fed.start_client(client_bin, &[], 2));
    let deadline = Instant::now() + Duration::from_secs(600);
    for (k, c) in clients.iter_mut().enumerate() {
        c.wait_ok(deadline, &format!("client {k}"), &fed.client_logs[k]);
    }
    server_proc.wait_ok(deadline, "server", &fed.server_log);
    // The round history shows org-2 missing after the kill, absent from the FedE stage's
    // end, and answering again in the SimSkip stage after its restart.
    let records = records();
    let missed = records
        .iter()
        .position(|r| !r.clients.contains_key("org-2"))
        .expect("org-2 missed a round after it was killed");
    let finish = records.iter().position(fede_finished).unwrap();
    assert!(!records[finish].clients.contains_key("org-2"));
    assert!(missed < finish);
    assert!(
        records[finish..]
            .iter()
            .any(|r| r.stage == "simskip" && r.clients.contains_key("org-2")),
        "org-2 took part in the SimSkip stage after its restart"
    );
    let org2 = fed.org_output(2);
    let stage1 = simskip_data::Embeddings::read(&org2.join("fede/entities.npy")).unwrap();
    let refined = simskip_data::Embeddings::read(&org2.join("simskip/entities.npy")).unwrap();
    assert_eq!(
        stage1.names, refined.names,
        "the restarted client finished the run"
    );
    let figures = RunFigures::read(&fed.coordinator).unwrap();
    assert!(
        figures.stages["simskip"].clients.contains_key("org-2"),
        "restarted client evaluated in stage 2"
    );
    eprintln!(
        "run with a killed client took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
