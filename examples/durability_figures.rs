//! Durability figures, with the process-level tests' federation (3 organisations over mutual
//! TLS, each daemon a `simskip` process on loopback, one compute thread each):
//!
//! * `crash-cost`: the extra wall time a coordinator `kill -9` costs. In pairs, alternating
//!   which goes first, the quick 14-round run on WordNet-5k (FedE 6 rounds, SimSkip 3) once
//!   without crashes and once with three (the chaos test's moments: after round 2, 0.2 s
//!   after round 5, during FedE's FINISH after round 8; the coordinator restarted at once).
//!   Per pair: (wall with crashes - wall without) / 3. Prints every pair, the median and the
//!   range.
//! * `db-size DATASET`: a FedE-only run of `--rounds` rounds on DATASET (3 organisations by
//!   relation, d = 128), then the coordinator's database (closed, WAL folded in) and its
//!   checkpoints per round.
//!
//! cargo build --release -p simskip --bin simskip
//! cargo run --release -p simskip --example durability_figures -- crash-cost [--pairs 5]
//! cargo run --release -p simskip --example durability_figures -- db-size DATASET [--rounds 4]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{Federation, Proc};
use simskip_fed::coordinator::store::Store;

/// The release `simskip` beside this example's folder (`target/release/simskip`).
fn program() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("simskip"))
        .context("no folder above the example")?;
    if !path.is_file() {
        bail!(
            "{} is missing: cargo build --release -p simskip --bin simskip",
            path.display()
        );
    }
    Ok(path)
}

fn median_and_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// One quick run; the coordinator killed and restarted at once after each `(rounds
/// committed, delay)` of `crashes`. Returns the wall time from the coordinator's start to the
/// last exit.
fn quick_run(program: &Path, crashes: &[(usize, u64)]) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let mut fed = Federation::prepare(tmp.path(), &common::quick_settings());
    fed.server.server.heartbeat_interval_secs = 1.0;
    fed.server.server.heartbeat_timeout_secs = 8.0;
    fed.write_server();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(900);
    let (mut server, _) = fed.start_server(program, &["server"]);
    let mut clients: Vec<Proc> = (0..common::ORGS)
        .map(|k| fed.start_client(program, &["client"], k))
        .collect();
    for &(n, delay_ms) in crashes {
        common::wait_for_rounds(&fed.coordinator, n, deadline, &fed.server_log);
        std::thread::sleep(Duration::from_millis(delay_ms));
        drop(server); // SIGKILL
        server = common::spawn(program, &["server"], &fed.server_toml, &fed.server_log);
    }
    for (k, c) in clients.iter_mut().enumerate() {
        c.wait_ok(deadline, &format!("client {k}"), &fed.client_logs[k]);
    }
    server.wait_ok(deadline, "coordinator", &fed.server_log);
    let wall = started.elapsed().as_secs_f64();
    let rounds = common::committed(&fed.coordinator).len();
    if rounds != 14 {
        bail!("{rounds} rounds committed, not 14");
    }
    Ok(wall)
}

fn crash_cost(pairs: usize) -> Result<()> {
    let program = program()?;
    let crashes = [(2usize, 0u64), (5, 200), (8, 0)];
    let mut extra = Vec::new();
    let (mut base_walls, mut crash_walls) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let (base, crashed) = if pair % 2 == 0 {
            let b = quick_run(&program, &[])?;
            (b, quick_run(&program, &crashes)?)
        } else {
            let c = quick_run(&program, &crashes)?;
            (quick_run(&program, &[])?, c)
        };
        let per_crash = (crashed - base) / crashes.len() as f64;
        println!(
            "pair {}: without crashes {base:.1} s, with {} crashes {crashed:.1} s: {per_crash:+.2} s per crash",
            pair + 1,
            crashes.len()
        );
        extra.push(per_crash);
        base_walls.push(base);
        crash_walls.push(crashed);
    }
    let (m, lo, hi) = median_and_range(extra);
    let (bm, blo, bhi) = median_and_range(base_walls);
    let (cm, clo, chi) = median_and_range(crash_walls);
    println!(
        "{pairs} pairs: without crashes median {bm:.1} s ({blo:.1}-{bhi:.1}); with {} crashes median {cm:.1} s ({clo:.1}-{chi:.1}); extra wall time per crash median {m:.2} s (range {lo:.2} to {hi:.2})",
        crashes.len()
    );
    Ok(())
}

fn db_size(dataset: &Path, rounds: u32) -> Result<()> {
    let program = program()?;
    let tmp = tempfile::tempdir()?;
    let mut settings = common::quick_settings();
    let stages = &mut settings.server.server.stages;
    stages.truncate(1);
    stages[0].rounds = rounds;
    stages[0].eval_every = rounds;
    let mut fed = Federation::prepare_on(tmp.path(), &settings, dataset);
    fed.server.server.round_timeout_secs = 1800.0;
    fed.write_server();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let (mut server, _) = fed.start_server(&program, &["server"]);
    let mut clients: Vec<Proc> = (0..common::ORGS)
        .map(|k| fed.start_client(&program, &["client"], k))
        .collect();
    for (k, c) in clients.iter_mut().enumerate() {
        c.wait_ok(deadline, &format!("client {k}"), &fed.client_logs[k]);
    }
    server.wait_ok(deadline, "coordinator", &fed.server_log);
    let wall = started.elapsed().as_secs_f64();
    let size = |f: &str| std::fs::metadata(fed.coordinator.join(f)).map_or(0, |m| m.len());
    let (db, wal) = (size("coordinator.db"), size("coordinator.db-wal"));
    let store = Store::open_existing(&fed.coordinator)?;
    let run = store.runs()?[0].run_id.clone();
    let records = store.rounds(&run)?.len();
    let checkpoints = store.checkpoints(&run)?;
    let checkpoint_bytes: u64 = checkpoints.iter().map(|c| c.bytes).sum();
    println!(
        "{}: FedE {rounds} FIT rounds, {records} rounds stored in {wall:.0} s; database {db} bytes (+ {wal} bytes of WAL) = {:.0} bytes per round; checkpoints {} files, {:.1} MB per FIT round",
        dataset.display(),
        db as f64 / records as f64,
        checkpoints.len(),
        checkpoint_bytes as f64 / 1e6 / checkpoints.len().max(1) as f64
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Result<Option<u32>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .with_context(|| format!("{name} N"))?
                    .parse()
                    .with_context(|| format!("{name} N"))?,
            )),
            None => Ok(None),
        }
    };
    match args.first().map(String::as_str) {
        Some("crash-cost") => crash_cost(flag("--pairs")?.unwrap_or(5) as usize),
        Some("db-size") => {
            let dataset = args.get(1).context("db-size DATASET")?;
            db_size(Path::new(dataset), flag("--rounds")?.unwrap_or(4))
        }
        _ => {
            bail!("usage: durability_figures crash-cost [--pairs N] | db-size DATASET [--rounds N]")
        }
    }
}
