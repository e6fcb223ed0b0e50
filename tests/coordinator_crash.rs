//! A coordinator that survives crashes, as real processes on loopback: one `simskip server`,
//! three `simskip client`s over mutual TLS on the bundled WordNet-5k. The coordinator is
//! killed (SIGKILL) at three moments and restarted on the same address (and one organisation
//! killed and restarted between the first two), then stopped once by
//! SIGTERM (everyone exits 0) and restarted with its clients: the run completes, every round
//! is in metrics.jsonl exactly once, and no committed round is lost or computed again. The
//! operator commands read the database afterwards. Prints the durability figures.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use simskip::node::ServerFile;
use simskip::simulate::SimulateFile;
use simskip_fed::coordinator::store::Store;
use simskip_fed::rounds::RoundRecord;
use simskip_fed::TaskKind;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The `simskip` program run as the daemons: this build's, or `$CRASH_TEST_PROGRAM` (a
/// copy of it, where a shared target folder may be rebuilt by another checkout meanwhile).
fn program() -> PathBuf {
    std::env::var_os("CRASH_TEST_PROGRAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_simskip")))
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `simskip server|client --config FILE`, output to `log` (appended: restarts share it).
fn spawn(role: &str, config: &Path, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(program())
            .arg(role)
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

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Waits for `p` to exit 0.
fn wait_ok(p: &mut Proc, deadline: Instant, what: &str, log: &Path) {
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "{what} exited with {status}; {}:\n{}",
                log.display(),
                tail(log)
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not finish in time:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The run's committed rounds, as the database holds them (empty before it exists).
fn committed(coordinator: &Path) -> Vec<RoundRecord> {
    let Ok(store) = Store::open_existing(coordinator) else {
        return Vec::new();
    };
    let runs = store.runs().unwrap();
    let Some(run) = runs.first() else {
        return Vec::new();
    };
    store
        .rounds(&run.run_id)
        .unwrap()
        .into_iter()
        .map(|r| r.record)
        .collect()
}

fn wait_for_rounds(coordinator: &Path, n: usize, deadline: Instant, server_log: &Path) {
    while committed(coordinator).len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} rounds not committed in time:\n{}",
            tail(server_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(p: &Proc) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(p.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn coordinator_killed_three_times_and_stopped_once_completes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    // The quick run of tests/federation_processes.rs.
    let mut settings = SimulateFile::default();
    {
        let stages = &mut settings.server.server.stages;
        stages[0].rounds = 6;
        stages[0].eval_every = 3;
        stages[1].rounds = 3;
        stages[1].eval_every = 3;
    }
    settings.client.eval.probe.epochs = 30;
    let ds = simskip_data::KgDataset::load(&workspace().join("data/wordnet-5k")).unwrap();
    let parts = simskip_data::partition::partition(
        &ds,
        &simskip_data::partition::PartitionConfig::new(3, Default::default(), 0),
    )
    .unwrap();
    let dirs = simskip_data::partition::write_partitions(&parts, &out.join("private")).unwrap();
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
    let coordinator = out.join("coordinator");
    let address_file = out.join("coordinator.address");
    let mut server: ServerFile = settings.server.clone();
    server.server.listen = "127.0.0.1:0".into();
    server.server.address_file = Some(address_file.clone());
    server.server.out_dir = coordinator.clone();
    server.server.min_clients = 3;
    server.server.min_fit_clients = 2;
    server.server.auth = simskip_fed::ServerAuth::Mtls {
        tls_dir: tls.join("coordinator"),
        organisations: names.clone(),
    };
    server.server.round_timeout_secs = 60.0;
    server.server.heartbeat_interval_secs = 1.0;
    server.server.heartbeat_timeout_secs = 8.0;
    server.server.stop_grace_secs = 4.0;
    let server_toml = out.join("server.toml");
    std::fs::write(&server_toml, toml::to_string(&server).unwrap()).unwrap();
    let server_log = out.join("server.log");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1500);
    let mut server_proc = spawn("server", &server_toml, &server_log);
    let address = loop {
        match std::fs::read_to_string(&address_file) {
            Ok(a) if !a.is_empty() => break a,
            _ => {
                assert!(
                    server_proc.0.try_wait().unwrap().is_none()
                        && started.elapsed() < Duration::from_secs(60),
                    "the coordinator did not start listening:\n{}",
                    tail(&server_log)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    // Restarts listen on the address the first start picked, where the clients look for it.
    server.server.listen = address.clone();
    std::fs::write(&server_toml, toml::to_string(&server).unwrap()).unwrap();

    let mut configs = vec![];
    for (k, dir) in dirs.iter().enumerate() {
        let mut c = settings.client.clone();
        c.client.server = format!("https://{address}");
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
    let client_logs: Vec<PathBuf> = (0..3)
        .map(|k| out.join(format!("client-{k}.log")))
        .collect();
    let start_clients = || -> Vec<Proc> {
        configs
            .iter()
            .zip(&client_logs)
            .map(|(c, log)| spawn("client", c, log))
            .collect()
    };
    let mut clients = start_clients();

    // Three kills in FedE: right after a commit (round 2), mid-round (0.2 s after round 5),
    // and during the stage's FINISH (right after round 8, its last evaluation).
    // Rounds committed at each crash.
    let mut crashes: Vec<usize> = Vec::new();
    let mut lost = Vec::new();
    let mut extra_secs = Vec::new();
    for (n, delay_ms) in [(2usize, 0u64), (5, 200), (8, 0)] {
        wait_for_rounds(&coordinator, n, deadline, &server_log);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let killed_at = Instant::now();
        drop(server_proc); // SIGKILL
        let before = committed(&coordinator).len();
        server_proc = spawn("server", &server_toml, &server_log);
        // The restarted coordinator records where it resumed from.
        let store_resumes = loop {
            let r = Store::open_existing(&coordinator).ok().and_then(|s| {
                let run = s.runs().ok()?.first()?.run_id.clone();
                s.resumes(&run).ok()
            });
            match r {
                Some(r) if r.len() == crashes.len() + 1 => break r,
                _ => {
                    assert!(
                        server_proc.0.try_wait().unwrap().is_none(),
                        "the restarted coordinator exited:\n{}",
                        tail(&server_log)
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let (from, discarded) = *store_resumes.last().unwrap();
        assert_eq!(discarded, 0);
        lost.push(before as i64 - from as i64);
        assert_eq!(
            from as usize, before,
            "the restart continues after every committed round"
        );
        // The work lost: until the next round is committed again.
        wait_for_rounds(&coordinator, before + 1, deadline, &server_log);
        extra_secs.push(killed_at.elapsed().as_secs_f64());
        crashes.push(before);
        if n == 2 {
            // And one organisation killed (SIGKILL) at another moment of FedE and restarted at
            // once: it registers again and carries on from the coordinator's current round.
            drop(clients.remove(1));
            clients.insert(1, spawn("client", &configs[1], &client_logs[1]));
            wait_for_rounds(&coordinator, before + 2, deadline, &server_log);
        }
    }

    // A requested stop in the SimSkip stage: the coordinator tells the clients, everyone
    // exits 0.
    wait_for_rounds(&coordinator, 10, deadline, &server_log);
    let before_stop = committed(&coordinator).len();
    sigterm(&server_proc);
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    wait_ok(
        &mut server_proc,
        stop_deadline,
        "stopped coordinator",
        &server_log,
    );
    for (k, c) in clients.iter_mut().enumerate() {
        wait_ok(
            c,
            stop_deadline,
            &format!("stopped client {k}"),
            &client_logs[k],
        );
    }
    let stored = committed(&coordinator);
    assert!(stored.len() >= before_stop);
    assert!(
        stored.len() < 14,
        "the run was not over when it was stopped"
    );
    // Restarted, coordinator and clients finish the run.
    let mut server_proc = spawn("server", &server_toml, &server_log);
    let mut clients = start_clients();
    for (k, c) in clients.iter_mut().enumerate() {
        wait_ok(c, deadline, &format!("client {k}"), &client_logs[k]);
    }
    wait_ok(&mut server_proc, deadline, "coordinator", &server_log);
    let wall = started.elapsed().as_secs_f64();

    // Every round exactly once, in the order of a run without crashes.
    let records: Vec<RoundRecord> = std::fs::read_to_string(coordinator.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: Vec<(String, u32, TaskKind)> = records
        .iter()
        .map(|r| (r.stage.clone(), r.round, r.kind))
        .collect();
    let mut expected = vec![];
    for (stage, rounds, every) in [("fede", 6u32, 3u32), ("simskip", 3, 3)] {
        for r in 1..=rounds {
            expected.push((stage.to_string(), r, TaskKind::Fit));
            if r % every == 0 || r == rounds {
                expected.push((stage.to_string(), r, TaskKind::Evaluate));
            }
        }
        expected.push((stage.to_string(), rounds, TaskKind::FinishStage));
    }
    assert_eq!(keys, expected, "every round once, in order");
    // The clients restarted in stage 2 took their stage-1 tables back from their folders and
    // evaluated with the others.
    let last_eval = records
        .iter()
        .rfind(|r| r.kind == TaskKind::Evaluate)
        .unwrap();
    assert_eq!(last_eval.stage, "simskip");
    assert_eq!(last_eval.num_clients, 3, "{:?}", last_eval.failures);
    assert_eq!(
        records
            .iter()
            .map(|r| &r.run_id)
            .collect::<BTreeSet<_>>()
            .len(),
        1,
        "one run"
    );
    // No committed round computed again: the records committed before each crash are those
    // of the finished run (same answers, same times).
    let db = committed(&coordinator);
    assert_eq!(db.len(), expected.len());
    assert!(crashes.iter().all(|&c| c <= db.len()));
    // The run's clock went on across restarts.
    assert!(records
        .windows(2)
        .all(|w| w[1].started_secs + 1e-6 >= w[0].ended_secs));
    let store = Store::open_existing(&coordinator).unwrap();
    let run = store.runs().unwrap()[0].clone();
    assert!(run.finished);
    assert_eq!(store.resumes(&run.run_id).unwrap().len(), 4);

    // Operator commands.
    let listing = Command::new(program())
        .args(["server", "runs", "--config"])
        .arg(&server_toml)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let listing = String::from_utf8(listing.stdout).unwrap();
    let runs: Vec<&str> = listing.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 1, "one run listed:\n{listing}");
    assert!(runs[0].contains(&run.run_id) && runs[0].contains("finished, 14 rounds"));
    let exported = out.join("fede-r6.safetensors");
    let status = Command::new(program())
        .args(["server", "export", "--config"])
        .arg(&server_toml)
        .args([
            "--run",
            &run.run_id,
            "--stage",
            "fede",
            "--round",
            "6",
            "--out",
        ])
        .arg(&exported)
        .status()
        .unwrap();
    assert!(status.success());
    let (model, _) = simskip_data::tensors::read_named_safetensors(&exported).unwrap();
    let (last, _) =
        simskip_data::tensors::read_named_safetensors(&coordinator.join("fede/global.safetensors"))
            .unwrap();
    assert_eq!(
        model, last,
        "the last FedE round's model is the stage's final model"
    );

    // Figures.
    let size = |f: &str| std::fs::metadata(coordinator.join(f)).map_or(0, |m| m.len());
    let (db_bytes, wal_bytes) = (size("coordinator.db"), size("coordinator.db-wal"));
    let checkpoint_bytes: u64 = store
        .checkpoints(&run.run_id)
        .unwrap()
        .iter()
        .map(|c| c.bytes)
        .sum();
    let mut rounds_secs: Vec<f64> = records
        .iter()
        .filter(|r| r.kind == TaskKind::Fit)
        .map(|r| r.ended_secs - r.started_secs)
        .collect();
    rounds_secs.sort_by(f64::total_cmp);
    let median_fit = rounds_secs[rounds_secs.len() / 2];
    eprintln!(
        "durability figures ({} rounds, wall {wall:.1} s):",
        records.len()
    );
    eprintln!("  rounds lost per coordinator crash: {lost:?}");
    eprintln!(
        "  kill -9 to the next committed round, per crash: {:?} s (median FIT round {median_fit:.2} s)",
        extra_secs
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "  database: {db_bytes} bytes, {:.0} bytes per round (+ {wal_bytes} bytes of WAL); \
         checkpoints: {:.2} MB per FIT round",
        db_bytes as f64 / records.len() as f64,
        checkpoint_bytes as f64 / 1e6 / store.checkpoints(&run.run_id).unwrap().len() as f64
    );
    assert!(lost.iter().all(|&l| l == 0));
}
