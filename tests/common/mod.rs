//! The process-level tests' shared setup: the bundled WordNet-5k split over three
//! organisations, the federation's certificates, the coordinator's and the organisations'
//! config files, and the daemons as child processes (killed with SIGKILL when dropped).

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use simskip::node::{ClientFile, ServerFile};
use simskip::simulate::SimulateFile;
use simskip_fed::coordinator::store::Store;
use simskip_fed::rounds::RoundRecord;

/// Organisations of the test federation (`org-0`, `org-1`, `org-2`).
pub const ORGS: usize = 3;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A running daemon; dropping it is a `kill -9`.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit 0; on failure or past `deadline`, shows `log`'s tail.
    pub fn wait_ok(&mut self, deadline: Instant, what: &str, log: &Path) {
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
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
}

/// `PROGRAM ARGS... --config CONFIG` with one compute thread, its output appended to `log`
/// (restarts share it).
pub fn spawn(program: &Path, args: &[&str], config: &Path, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(program)
            .args(args)
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

/// The last lines of a log, for failure messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The run's committed rounds, as the database holds them (empty before it exists).
pub fn committed(coordinator: &Path) -> Vec<RoundRecord> {
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

pub fn wait_for_rounds(coordinator: &Path, n: usize, deadline: Instant, server_log: &Path) {
    while committed(coordinator).len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} rounds not committed in time:\n{}",
            tail(server_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A short run's settings on the bundled WordNet-5k: 6 FedE rounds and 3 SimSkip rounds,
/// figures every 3, a small evaluation budget.
pub fn quick_settings() -> SimulateFile {
    let mut file = SimulateFile::default();
    let stages = &mut file.server.server.stages;
    stages[0].rounds = 6;
    stages[0].eval_every = 3;
    stages[1].rounds = 3;
    stages[1].eval_every = 3;
    file.server.server.round_timeout_secs = 60.0;
    file.client.eval.probe.epochs = 30;
    file
}

/// One federation's files in a folder: each organisation's private data, the certificates
/// (mutual TLS, as every deployment runs), and the daemons' config files.
pub struct Federation {
    pub out: PathBuf,
    /// The coordinator's settings: edit, then [`Federation::write_server`].
    pub server: ServerFile,
    pub server_toml: PathBuf,
    pub server_log: PathBuf,
    /// The coordinator's output folder (database, metrics, checkpoints).
    pub coordinator: PathBuf,
    pub client_configs: Vec<PathBuf>,
    pub client_logs: Vec<PathBuf>,
    client: ClientFile,
    data_dirs: Vec<PathBuf>,
    tls: PathBuf,
    address_file: PathBuf,
}

impl Federation {
    /// [`Federation::prepare_on`] the bundled WordNet-5k.
    pub fn prepare(out: &Path, settings: &SimulateFile) -> Self {
        Self::prepare_on(out, settings, &workspace().join("data/wordnet-5k"))
    }

    /// Partitions `dataset` over [`ORGS`] organisations (FedE's relation split), makes the
    /// certificates, and writes the coordinator's file: a free port (named in an address
    /// file), every organisation required to start, two per FIT round.
    pub fn prepare_on(out: &Path, settings: &SimulateFile, dataset: &Path) -> Self {
        let ds = simskip_data::KgDataset::load(dataset).unwrap();
        let parts = simskip_data::partition::partition(
            &ds,
            &simskip_data::partition::PartitionConfig::new(ORGS, Default::default(), 0),
        )
        .unwrap();
        let data_dirs =
            simskip_data::partition::write_partitions(&parts, &out.join("private")).unwrap();
        let names = Self::names();
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
        let mut server = settings.server.clone();
        server.server.listen = "127.0.0.1:0".into();
        server.server.address_file = Some(address_file.clone());
        server.server.out_dir = coordinator.clone();
        server.server.min_clients = ORGS;
        server.server.min_fit_clients = 2;
        server.server.auth = simskip_fed::ServerAuth::Mtls {
            tls_dir: tls.join("coordinator"),
            organisations: names,
        };
        let fed = Self {
            out: out.to_path_buf(),
            server,
            server_toml: out.join("server.toml"),
            server_log: out.join("server.log"),
            coordinator,
            client_configs: (0..ORGS)
                .map(|k| out.join(format!("client-{k}.toml")))
                .collect(),
            client_logs: (0..ORGS)
                .map(|k| out.join(format!("client-{k}.log")))
                .collect(),
            client: settings.client.clone(),
            data_dirs,
            tls,
            address_file,
        };
        fed.write_server();
        fed
    }

    pub fn names() -> Vec<String> {
        (0..ORGS).map(|k| format!("org-{k}")).collect()
    }

    /// Organisation `k`'s private output folder.
    pub fn org_output(&self, k: usize) -> PathBuf {
        self.out.join(format!("org-{k}-output"))
    }

    pub fn write_server(&self) {
        std::fs::write(&self.server_toml, toml::to_string(&self.server).unwrap()).unwrap();
    }

    /// Starts the coordinator (`program args...`), waits until it listens, and pins its
    /// `listen` to that address (so a restart listens where the organisations look); then
    /// writes the organisations' files, pointing there. Returns the process and address.
    pub fn start_server(&mut self, program: &Path, args: &[&str]) -> (Proc, String) {
        let started = Instant::now();
        let mut proc = spawn(program, args, &self.server_toml, &self.server_log);
        let address = loop {
            match std::fs::read_to_string(&self.address_file) {
                Ok(a) if !a.is_empty() => break a,
                _ => {
                    assert!(
                        proc.0.try_wait().unwrap().is_none()
                            && started.elapsed() < Duration::from_secs(60),
                        "the coordinator did not start listening:\n{}",
                        tail(&self.server_log)
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        self.server.server.listen = address.clone();
        self.write_server();
        let names = Self::names();
        for (k, name) in names.iter().enumerate() {
            let mut c = self.client.clone();
            c.client.server = format!("https://{address}");
            // The name comes from the certificate.
            c.client.name = String::new();
            c.client.auth = simskip_fed::ClientAuth::Mtls {
                tls_dir: self.tls.join(name),
                server_name: None,
            };
            c.data.dir = self.data_dirs[k].clone();
            c.data.out_dir = self.org_output(k);
            std::fs::write(&self.client_configs[k], toml::to_string(&c).unwrap()).unwrap();
        }
        (proc, address)
    }

    /// Starts organisation `k`'s daemon (`program args...`).
    pub fn start_client(&self, program: &Path, args: &[&str], k: usize) -> Proc {
        spawn(program, args, &self.client_configs[k], &self.client_logs[k])
    }
}
