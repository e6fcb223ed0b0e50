//! The federation as real processes on loopback: one `simskip-server`, three
//! `simskip-client`s, the bundled WordNet-5k graph split FedE-style. Checks the metrics files,
//! every organisation's outputs and the figures; and that a client killed mid-round neither
//! stalls the run past the round timeout nor stays out once restarted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use simskip::node::{RunFigures, ServerFile};
use simskip::simulate::{simulate, NodeProgram, SimulateFile};
use simskip_fed::rounds::RoundRecord;
use simskip_fed::TaskKind;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The `simskip` binary of this build, whose `server` and `client` subcommands are the daemons.
fn simskip_program() -> NodeProgram {
    NodeProgram {
        path: PathBuf::from(env!("CARGO_BIN_EXE_simskip")),
    }
}

/// A short run on the bundled WordNet-5k: few rounds, small evaluation budget.
fn quick_settings(out: &Path) -> SimulateFile {
    let mut file = SimulateFile::default();
    file.simulate.out_dir = out.to_path_buf();
    file.simulate.timeout_secs = 600;
    let stages = &mut file.server.server.stages;
    stages[0].rounds = 6;
    stages[0].eval_every = 3;
    stages[1].rounds = 3;
    stages[1].eval_every = 3;
    file.server.server.round_timeout_secs = 60.0;
    file.client.eval.probe.epochs = 30;
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

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start one of the two daemon commands (`simskip-server`, `simskip-client`).
fn spawn(bin: &str, config: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let program = match bin {
        "simskip-server" => env!("CARGO_BIN_EXE_simskip-server"),
        "simskip-client" => env!("CARGO_BIN_EXE_simskip-client"),
        other => panic!("no command {other}"),
    };
    Proc(
        Command::new(program)
            .arg("--config")
            .arg(config)
            .env("CANDLE_NUM_THREADS", "1")
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Wait for `p` to exit successfully; on failure, show the tail of its `log`.
fn wait(p: &mut Proc, deadline: Instant, what: &str, log: &Path) {
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            if !status.success() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "{what} exited with {status}; {}:\n{}",
                    log.display(),
                    tail.join("\n")
                );
            }
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not finish in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_client_does_not_stall_the_run_and_rejoins_when_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let settings = quick_settings(out);
    // Write the configs with the simulation's own layout, but drive the processes by hand.
    let ds = simskip_data::KgDataset::load(&workspace().join("data/wordnet-5k")).unwrap();
    let parts = simskip_data::partition::partition(
        &ds,
        &simskip_data::partition::PartitionConfig::new(3, Default::default(), 0),
    )
    .unwrap();
    let dirs = simskip_data::partition::write_partitions(&parts, &out.join("private")).unwrap();
    // Mutual TLS, as every deployment runs: the federation's certificates first.
    let names: Vec<String> = (0..3).map(|k| format!("org-{k}")).collect();
    let tls = out.join("tls");
    simskip_fed::tls::provision(
        &tls,
        &simskip_fed::tls::ProvisionSpec {
            federation: "test".into(),
            coordinator_hosts: vec!["127.0.0.1".into()],
            organisations: names.clone(),
            validity_days: 2,
            overwrite_ca: false,
        },
    )
    .unwrap();
    // The coordinator binds a free port itself and says which.
    let address_file = out.join("coordinator.address");
    let mut server: ServerFile = settings.server.clone();
    server.server.listen = "127.0.0.1:0".into();
    server.server.address_file = Some(address_file.clone());
    server.server.out_dir = out.join("coordinator");
    server.server.min_clients = 3;
    server.server.min_fit_clients = 2;
    server.server.auth = simskip_fed::ServerAuth::Mtls {
        tls_dir: tls.join("coordinator"),
        organisations: names.clone(),
    };
    // Short enough to see a dead client dropped within the test, long enough that a busy
    // 2-core machine does not drop live ones.
    server.server.round_timeout_secs = 12.0;
    server.server.heartbeat_interval_secs = 1.0;
    server.server.heartbeat_timeout_secs = 6.0;
    server.server.stages[0].rounds = 8;
    std::fs::write(out.join("server.toml"), toml::to_string(&server).unwrap()).unwrap();
    let started = Instant::now();
    let mut server_proc = spawn(
        "simskip-server",
        &out.join("server.toml"),
        &out.join("server.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let address = loop {
        match std::fs::read_to_string(&address_file) {
            Ok(a) if !a.is_empty() => break a,
            _ => {
                assert!(
                    server_proc.0.try_wait().unwrap().is_none() && Instant::now() < deadline,
                    "the coordinator did not start listening:\n{}",
                    std::fs::read_to_string(out.join("server.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let mut configs = vec![];
    for (k, dir) in dirs.iter().enumerate() {
        let mut c = settings.client.clone();
        c.client.server = format!("https://{address}");
        // The name comes from the certificate.
        c.client.name = String::new();
        c.client.auth = simskip_fed::ClientAuth::Mtls {
            tls_dir: tls.join(&names[k]),
            server_name: None,
        };
        c.data.dir = dir.clone();
        c.data.out_dir = out.join(format!("org-{k}-output"));
        let path = out.join(format!("client-{k}.toml"));
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        configs.push(path);
    }

    let mut clients: Vec<Proc> = configs
        .iter()
        .enumerate()
        .map(|(k, c)| spawn("simskip-client", c, &out.join(format!("client-{k}.log"))))
        .collect();

    // Kill org-2 once the run is under way (two FedE rounds recorded).
    let metrics = out.join("coordinator/metrics.jsonl");
    let rounds_done = || {
        std::fs::read_to_string(&metrics)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while rounds_done() < 2 {
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = clients.pop().unwrap();
    drop(victim); // SIGKILL mid-run
    let killed_at = rounds_done();

    // The others go on: within a round timeout (plus heartbeat detection) rounds are closing again.
    let resume_deadline = Instant::now() + Duration::from_secs(12 + 6 + 30);
    while rounds_done() < killed_at + 2 {
        assert!(
            Instant::now() < resume_deadline,
            "the run stalled after a client died:\n{}",
            std::fs::read_to_string(out.join("server.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Restart it: it registers again, receives the current global model and finishes with the others.
    clients.push(spawn(
        "simskip-client",
        &configs[2],
        &out.join("client-2-restarted.log"),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let logs = ["client-0.log", "client-1.log", "client-2-restarted.log"];
    for (k, c) in clients.iter_mut().enumerate() {
        wait(c, deadline, &format!("client {k}"), &out.join(logs[k]));
    }
    wait(
        &mut server_proc,
        deadline,
        "server",
        &out.join("server.log"),
    );
    // The round history shows org-2 missing after the kill and answering again after its
    // restart.
    let records: Vec<RoundRecord> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let missed = records
        .iter()
        .position(|r| !r.clients.contains_key("org-2"))
        .expect("org-2 missed a round after it was killed");
    assert!(
        records[missed..]
            .iter()
            .any(|r| r.kind == TaskKind::Fit && r.clients.contains_key("org-2")),
        "org-2 trained again after its restart"
    );
    assert!(
        out.join("org-2-output/simskip/entities.npy").is_file(),
        "the restarted client finished the run"
    );
    let figures = RunFigures::read(&out.join("coordinator")).unwrap();
    assert!(
        figures.stages["simskip"].clients.contains_key("org-2"),
        "restarted client evaluated in stage 2"
    );
    eprintln!(
        "run with a killed client took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
