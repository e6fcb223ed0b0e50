//! A coordinator that survives crashes, as real processes on loopback: one `simskip server`,
//! three `simskip client`s over mutual TLS on the bundled WordNet-5k. The coordinator is
//! killed (SIGKILL) at three moments and restarted on the same address (and one organisation
//! killed and restarted between the first two), then stopped once by SIGTERM (everyone exits
//! 0) and restarted with its clients; then one organisation is killed in the SimSkip stage and
//! restarted: the run completes, every round is in metrics.jsonl exactly once, no committed
//! round is lost or computed again, and the organisation killed in the SimSkip stage did no
//! FedE work again. The operator commands read the database afterwards. Prints the
//! durability figures.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Federation, Proc};
use simskip_fed::coordinator::store::Store;
use simskip_fed::rounds::RoundRecord;
use simskip_fed::TaskKind;

/// The `simskip` program run as the daemons: this build's, or `$CRASH_TEST_PROGRAM` (a
/// copy of it, where a shared target folder may be rebuilt by another checkout meanwhile).
fn program() -> PathBuf {
    std::env::var_os("CRASH_TEST_PROGRAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_simskip")))
}

#[test]
fn coordinator_killed_three_times_and_stopped_once_completes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    // The quick run of tests/federation_processes.rs.
    let mut fed = Federation::prepare(out, &common::quick_settings());
    fed.server.server.round_timeout_secs = 60.0;
    fed.server.server.heartbeat_interval_secs = 1.0;
    fed.server.server.heartbeat_timeout_secs = 8.0;
    fed.server.server.stop_grace_secs = 4.0;
    fed.write_server();
    let (coordinator, server_log) = (fed.coordinator.clone(), fed.server_log.clone());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1500);
    let (mut server_proc, _) = fed.start_server(&program(), &["server"]);
    let spawn_server = || common::spawn(&program(), &["server"], &fed.server_toml, &server_log);
    let spawn_client = |k: usize| fed.start_client(&program(), &["client"], k);
    let start_clients = || -> Vec<Proc> { (0..common::ORGS).map(spawn_client).collect() };
    let mut clients = start_clients();

    // The rounds of a run without crashes, in order.
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

    // Three kills in FedE: right after a commit (round 2), mid-round (0.2 s after round 5),
    // and during the stage's FINISH (right after round 8, its last evaluation).
    // Rounds committed at each crash.
    let mut crashes: Vec<usize> = Vec::new();
    let mut lost = Vec::new();
    let mut extra_secs = Vec::new();
    for (n, delay_ms) in [(2usize, 0u64), (5, 200), (8, 0)] {
        common::wait_for_rounds(&coordinator, n, deadline, &server_log);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let killed_at = Instant::now();
        drop(server_proc); // SIGKILL
        let before = common::committed(&coordinator).len();
        server_proc = spawn_server();
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
                        common::tail(&server_log)
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
        common::wait_for_rounds(&coordinator, before + 1, deadline, &server_log);
        extra_secs.push(killed_at.elapsed().as_secs_f64());
        crashes.push(before);
        if n == 2 {
            // And one organisation killed (SIGKILL) at another moment of FedE and restarted at
            // once: it registers again and carries on from the coordinator's current round.
            drop(clients.remove(1));
            clients.insert(1, spawn_client(1));
            common::wait_for_rounds(&coordinator, before + 2, deadline, &server_log);
        }
    }

    // A requested stop in the SimSkip stage: the coordinator tells the clients, everyone
    // exits 0.
    common::wait_for_rounds(&coordinator, 10, deadline, &server_log);
    let before_stop = common::committed(&coordinator).len();
    server_proc.sigterm();
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    server_proc.wait_ok(stop_deadline, "stopped coordinator", &server_log);
    for (k, c) in clients.iter_mut().enumerate() {
        c.wait_ok(
            stop_deadline,
            &format!("stopped client {k}"),
            &fed.client_logs[k],
        );
    }
    let stored = common::committed(&coordinator);
    assert!(stored.len() >= before_stop);
    assert!(
        stored.len() < 14,
        "the run was not over when it was stopped"
    );
    // Restarted, coordinator and clients carry on.
    let mut server_proc = spawn_server();
    let mut clients = start_clients();
    // One organisation killed (SIGKILL) in the SimSkip stage, once a round of the resumed
    // run is committed, and restarted at once: it must carry on with its stage-1 table and
    // the last global model it kept, without any FedE work.
    // Killed once SimSkip's FIT round 2 is committed, so that the round it interrupts is a
    // FIT round (it is back before the evaluation after it).
    let fit2 = 1 + expected
        .iter()
        .position(|k| *k == ("simskip".to_string(), 2, TaskKind::Fit))
        .unwrap();
    common::wait_for_rounds(&coordinator, fit2, deadline, &server_log);
    assert_eq!(common::committed(&coordinator).len(), fit2);
    let org0 = fed.org_output(0);
    let kept_files = [
        "fede/entities.npy",
        "stage2-input.json",
        "state/fede.safetensors",
    ];
    let read_kept = || -> Vec<Vec<u8>> {
        kept_files
            .iter()
            .map(|f| std::fs::read(org0.join(f)).unwrap())
            .collect()
    };
    let kept_before = read_kept();
    assert!(
        org0.join("state/simskip-global.safetensors").is_file(),
        "org-0 kept the last global SimSkip model it received"
    );
    drop(clients.remove(0));
    let org_killed_at = common::committed(&coordinator).len();
    clients.insert(0, spawn_client(0));
    for (k, c) in clients.iter_mut().enumerate() {
        c.wait_ok(deadline, &format!("client {k}"), &fed.client_logs[k]);
    }
    server_proc.wait_ok(deadline, "coordinator", &server_log);
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
    let db = common::committed(&coordinator);
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
    // The organisation killed in the SimSkip stage did no FedE work after its restart (its
    // stage-1 table and FedE state are byte for byte those from before), and answered the
    // rest of the SimSkip stage.
    assert_eq!(read_kept(), kept_before, "org-0's FedE files are untouched");
    let after_kill = &records[org_killed_at..];
    assert!(after_kill.iter().all(|r| r.stage == "simskip"));
    for kind in [TaskKind::Evaluate, TaskKind::FinishStage] {
        assert!(
            after_kill
                .iter()
                .any(|r| r.kind == kind && r.clients.contains_key("org-0")),
            "org-0 answered the SimSkip {kind:?} after its restart: {after_kill:?}"
        );
    }
    assert!(org0.join("simskip/entities.npy").is_file());

    // Operator commands.
    let listing = Command::new(program())
        .args(["server", "runs", "--config"])
        .arg(&fed.server_toml)
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
        .arg(&fed.server_toml)
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
