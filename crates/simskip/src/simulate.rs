//! `simskip simulate`: the whole federation on one machine with real processes. It partitions
//! a graph into private client folders, writes a server config and one client config per
//! organisation, starts one coordinator (`simskip server`) and N organisations
//! (`simskip client`) on loopback, watches them, and prints the input-versus-refined figures
//! from the coordinator's metrics.
//!
//! Order of work, so that a mistake costs nothing: every setting is checked in this process
//! (the configs the daemons will read are parsed back and the coordinator's strategies built)
//! before the output folder is touched or any process started; the output folder is then
//! cleared only if it is empty or a previous run's (it holds [`RUN_MARKER`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use simskip_data::partition::{
    partition, write_partitions, ClientPartition, PartitionBy, PartitionConfig,
};
use simskip_data::KgDataset;

use simskip_fed::blind::BlindKeys;
use simskip_fed::tls::{provision, ProvisionSpec, COORDINATOR_DIR};
use simskip_fed::{ClientAuth, ServerAuth};

use crate::node::{ClientFile, RunFigures, ServerFile};
use crate::settings;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Simulation settings (TOML); defaults: bundled WordNet-5k, 3 clients. See examples/simulate.toml.
    pub config: Option<PathBuf>,
    /// Output folder (overrides `simulate.out_dir`). It must be new, empty, or a previous
    /// simulation's output (which is replaced).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Number of clients (overrides `simulate.clients`).
    #[arg(long)]
    pub clients: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitKind {
    Relation,
    Triples,
}

/// How the simulated organisations prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulateAuth {
    /// A federation CA and one certificate per party are made for the run (`OUT/tls`), as
    /// `simskip certs` would; every call runs mutual TLS.
    Mtls,
    /// Plain text on loopback, names as claimed (to measure what TLS costs).
    Insecure,
}

/// The `[simulate]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateSettings {
    /// Graph folder to partition; absent: the WordNet-5k graph bundled in the binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    pub clients: usize,
    pub split: SplitKind,
    pub seed: u64,
    pub out_dir: PathBuf,
    /// The whole run is stopped (and reported as failed) after this long.
    pub timeout_secs: u64,
    pub auth: SimulateAuth,
    /// The organisations register HMAC-SHA256 of their entity names under a federation
    /// secret made for the run (`OUT/federation.secret`, never given to the coordinator).
    pub blind_keys: bool,
}

impl Default for SimulateSettings {
    fn default() -> Self {
        Self {
            dataset: None,
            clients: 3,
            split: SplitKind::Relation,
            seed: 0,
            out_dir: PathBuf::from("runs/simulate"),
            timeout_secs: 1800,
            auth: SimulateAuth::Mtls,
            blind_keys: true,
        }
    }
}

/// A simulation file: `[simulate]`, the coordinator's `[server]` and model, and the clients'
/// training and evaluation sections, shared by every simulated organisation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateFile {
    pub simulate: SimulateSettings,
    pub server: ServerFile,
    pub client: ClientFile,
}

/// The run's certificates, under the output folder: `ca.pem`, `ca.key`, `coordinator/`, and
/// one folder per organisation.
pub const TLS_DIR: &str = "tls";

impl SimulateAuth {
    /// The coordinator's URL at `address` (host:port).
    fn url(self, address: &str) -> String {
        match self {
            SimulateAuth::Mtls => format!("https://{address}"),
            SimulateAuth::Insecure => format!("http://{address}"),
        }
    }
}

/// The organisations' federation secret for blinded entity keys, under the output folder.
pub const SECRET_FILE: &str = "federation.secret";

/// Creates `path` with mode 0600 (a secret never sits in a file others can read).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{text}").with_context(|| format!("writing {}", path.display()))
}

/// The file every folder `simulate` creates holds; only such a folder (or an empty one) is
/// ever cleared by a later run.
pub const RUN_MARKER: &str = ".simskip-simulate-run";

/// Variables a daemon inherits from `simulate`'s environment. Nothing else passes: above all
/// no `SIMSKIP_*` variable, since those configure the simulation itself and the daemons read
/// their whole configuration from the files `simulate` writes.
const INHERITED_ENV: &[&str] = &["PATH", "RUST_LOG", "RUST_BACKTRACE"];

/// Compute-thread variables: one thread per daemon unless the user chose otherwise, since
/// several daemons share the machine's cores (candle's pool busy-waits, starving the others).
const THREAD_ENV: &[&str] = &["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"];

/// The program whose `server` and `client` subcommands are the simulation's daemons.
#[derive(Debug, Clone)]
pub struct NodeProgram {
    pub path: PathBuf,
}

impl NodeProgram {
    /// The running `simskip` executable: whatever built it built the daemons too.
    pub fn current_exe() -> Result<Self> {
        let path = std::env::current_exe().context("locating the running executable")?;
        Ok(Self { path })
    }

    /// `role` (`server` or `client`) with `--config config`, with an explicit environment.
    fn command(&self, role: &str, config: &Path) -> Command {
        let mut command = Command::new(&self.path);
        command.env_clear();
        for var in INHERITED_ENV {
            if let Some(value) = std::env::var_os(var) {
                command.env(var, value);
            }
        }
        for var in THREAD_ENV {
            command.env(
                var,
                std::env::var_os(var).unwrap_or_else(|| OsString::from("1")),
            );
        }
        command.arg(role).arg("--config").arg(config);
        command
    }
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let mut file: SimulateFile = settings::load(args.config.as_deref())?;
    if let Some(out) = args.out {
        file.simulate.out_dir = out;
    }
    if let Some(c) = args.clients {
        file.simulate.clients = c;
    }
    let figures = simulate(&file, &NodeProgram::current_exe()?)?;
    print!("{}", figures.render());
    let out = &file.simulate.out_dir;
    match crate::run_report::write_for_simulation(out) {
        Ok(page) => println!("report: {}", page.display()),
        // The run itself succeeded; a report that cannot be drawn is worth a warning only.
        Err(e) => tracing::warn!("no HTML report: {e:#}"),
    }
    println!("outputs: {}", out.display());
    Ok(())
}

/// Everything a run needs, checked, before anything is written or started.
struct Plan {
    dataset_name: String,
    num_triples: usize,
    parts: Vec<ClientPartition>,
    server: ServerFile,
    clients: Vec<ClientFile>,
}

fn load_dataset(sim: &SimulateSettings) -> Result<(KgDataset, String)> {
    match &sim.dataset {
        Some(dir) => {
            let ds = KgDataset::load(dir).with_context(|| {
                format!("simulate.dataset = {:?}: cannot load it", dir.display())
            })?;
            Ok((ds, dir.display().to_string()))
        }
        None => {
            let tmp = tempfile::tempdir().context("creating a temporary folder")?;
            crate::bundled::write_wordnet_5k(tmp.path())
                .context("writing the bundled WordNet-5k graph")?;
            let ds = KgDataset::load(tmp.path()).context("loading the bundled WordNet-5k")?;
            Ok((ds, crate::bundled::WORDNET_5K_NAME.to_owned()))
        }
    }
}

/// Serialise `value` as TOML and parse it back as the daemon will, so a setting that does not
/// survive the trip fails here, not in a child process.
fn round_trip<T: Serialize + serde::de::DeserializeOwned>(value: &T, what: &str) -> Result<String> {
    let text = toml::to_string_pretty(value).with_context(|| format!("serialising {what}"))?;
    toml::from_str::<T>(&text).with_context(|| format!("{what} does not read back"))?;
    Ok(text)
}

impl Plan {
    fn check(file: &SimulateFile) -> Result<Self> {
        let sim = &file.simulate;
        if sim.timeout_secs == 0 {
            bail!("simulate.timeout_secs = 0: the run needs time, give it at least 1");
        }
        if sim.out_dir.as_os_str().is_empty() {
            bail!("simulate.out_dir is empty: name an output folder");
        }
        let (ds, dataset_name) = load_dataset(sim)?;
        let by = match sim.split {
            SplitKind::Relation => PartitionBy::Relation,
            SplitKind::Triples => PartitionBy::Triples,
        };
        let parts = partition(&ds, &PartitionConfig::new(sim.clients, by, sim.seed))
            .with_context(|| format!("simulate.clients = {}", sim.clients))?;

        let out = &sim.out_dir;
        let mut server = file.server.clone();
        // The coordinator binds a free port itself and writes it down: no port is reserved
        // and released, so no other process can take it in between.
        server.server.listen = "127.0.0.1:0".into();
        server.server.address_file = Some(out.join(ADDRESS_FILE));
        server.server.out_dir = out.join("coordinator");
        server.server.min_clients = sim.clients;
        let names: Vec<String> = (0..sim.clients).map(|k| format!("org-{k}")).collect();
        let tls = out.join(TLS_DIR);
        server.server.auth = match sim.auth {
            SimulateAuth::Mtls => ServerAuth::Mtls {
                tls_dir: tls.join(COORDINATOR_DIR),
                organisations: names.clone(),
            },
            SimulateAuth::Insecure => ServerAuth::Insecure {
                organisations: names.clone(),
            },
        };
        round_trip(&server, "the coordinator's settings")?;
        // What the coordinator checks when it starts, done here first.
        server
            .server
            .validate()
            .context("coordinator settings ([server.server])")?;
        crate::node::strategies(&server.server)
            .context("coordinator settings ([[server.server.stages]])")?;

        file.client
            .gate
            .validate()
            .context("the organisations' settings ([client.gate])")?;
        let clients = (0..sim.clients)
            .map(|k| {
                let mut client = file.client.clone();
                client.client.name = names[k].clone();
                client.client.auth = match sim.auth {
                    SimulateAuth::Mtls => ClientAuth::Mtls {
                        tls_dir: tls.join(&names[k]),
                        server_name: None,
                    },
                    SimulateAuth::Insecure => ClientAuth::Insecure {},
                };
                client.client.blind_keys = sim.blind_keys.then(|| BlindKeys {
                    secret_file: out.join(SECRET_FILE),
                });
                // Until the coordinator says where it listens.
                client.client.server = sim.auth.url("127.0.0.1:1");
                client
                    .client
                    .validate()
                    .context("the organisations' settings ([client.client])")?;
                client.data.dir = out.join("private").join(format!("client-{k}"));
                client.data.out_dir = out.join(format!("org-{k}-output"));
                round_trip(&client, "the organisations' settings ([client])")?;
                Ok(client)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dataset_name,
            num_triples: ds.train.len() + ds.valid.len() + ds.test.len(),
            parts,
            server,
            clients,
        })
    }
}

/// Make `out` an empty run folder holding [`RUN_MARKER`]. A folder that exists must be empty
/// or a previous run's: anything else is refused untouched.
pub fn prepare_out_dir(out: &Path) -> Result<()> {
    match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("output folder {}: {e}", out.display()),
        Ok(mut entries) => {
            let empty = entries.next().is_none();
            if !empty {
                if !out.join(RUN_MARKER).is_file() {
                    bail!(
                        "output folder {} is not empty and is not a previous simulation's \
                         (no {RUN_MARKER} file in it): choose a new or empty folder with --out",
                        out.display()
                    );
                }
                for entry in std::fs::read_dir(out)? {
                    let path = entry?.path();
                    let removed = if path.is_dir() && !path.is_symlink() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.with_context(|| format!("clearing {}", path.display()))?;
                }
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join(RUN_MARKER),
        "Output of `simskip simulate`; a later run with this output folder replaces it.\n",
    )
    .with_context(|| format!("writing {}", out.join(RUN_MARKER).display()))
}

/// Where, in the run folder, the coordinator writes the address it bound.
const ADDRESS_FILE: &str = "coordinator.address";

/// The address the coordinator bound, once it has written it; fails at once with the
/// coordinator's own message if it exits first.
fn bound_address(coordinator: &mut Daemon, path: &Path, deadline: Instant) -> Result<String> {
    loop {
        if let Ok(address) = std::fs::read_to_string(path) {
            if !address.trim().is_empty() {
                return Ok(address.trim().to_owned());
            }
        }
        if let Some(status) = coordinator.poll()? {
            bail!(
                "{} exited with {status} before listening: {} (log: {})",
                coordinator.name,
                coordinator.message(),
                coordinator.log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!("the coordinator did not start listening in time (simulate.timeout_secs)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A started daemon; killed when dropped, so an early error never leaves daemons behind.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Start `command` with stdout and stderr going to `log`.
    pub fn spawn(mut command: Command, name: &str, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child,
            status: None,
        })
    }

    /// The exit status, once the process has ended.
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("watching {}", self.name))?;
        }
        Ok(self.status)
    }

    /// The daemon's own account of its failure: its last `error:` line, else its last line.
    fn message(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last_error = log.lines().rev().find(|l| l.starts_with("error:"));
        let last = log.lines().rev().find(|l| !l.trim().is_empty());
        match last_error.or(last) {
            Some(line) => line.trim().to_owned(),
            None => "(nothing in its log)".to_owned(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.poll() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until every daemon has exited successfully. The first one to fail ends the wait at
/// once with its own message (a coordinator that rejects its configuration exits at start);
/// the rest are killed when the caller drops them.
pub fn watch(daemons: &mut [Daemon], deadline: Instant) -> Result<()> {
    loop {
        let mut running = 0;
        for d in daemons.iter_mut() {
            match d.poll()? {
                None => running += 1,
                Some(status) if status.success() => {}
                Some(status) => bail!(
                    "{} exited with {status}: {} (log: {})",
                    d.name,
                    d.message(),
                    d.log.display()
                ),
            }
        }
        if running == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let waiting: Vec<&str> = daemons
                .iter()
                .filter(|d| d.status.is_none())
                .map(|d| d.name.as_str())
                .collect();
            bail!(
                "the simulation did not finish in time (simulate.timeout_secs); still running: {}",
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = toml::to_string_pretty(value).context("serialising settings")?;
    simskip_data::fsutil::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Run the federation with `program`'s daemons; returns the figures read back from the
/// coordinator's metrics.
pub fn simulate(file: &SimulateFile, program: &NodeProgram) -> Result<RunFigures> {
    let sim = &file.simulate;
    let out = &sim.out_dir;
    let plan = Plan::check(file)?;
    let deadline = Instant::now() + Duration::from_secs(sim.timeout_secs);

    prepare_out_dir(out)?;
    if sim.auth == SimulateAuth::Mtls {
        let names = plan.clients.iter().map(|c| c.client.name.clone()).collect();
        provision(
            &out.join(TLS_DIR),
            &ProvisionSpec {
                federation: "simskip-simulate".into(),
                coordinator_hosts: vec!["127.0.0.1".into(), "localhost".into()],
                organisations: names,
                validity_days: 7,
                overwrite_ca: false,
            },
        )
        .context("making the run's certificates")?;
    }
    if sim.blind_keys {
        write_private(&out.join(SECRET_FILE), &simskip_fed::blind::new_secret())?;
    }
    let dirs = write_partitions(&plan.parts, &out.join("private"))?;
    let planned: Vec<&PathBuf> = plan.clients.iter().map(|c| &c.data.dir).collect();
    anyhow::ensure!(
        dirs.iter().collect::<Vec<_>>() == planned,
        "partitions written to {dirs:?}, not where the client settings point"
    );
    println!(
        "partitioned {} ({} triples) into {} clients by {:?}",
        plan.dataset_name, plan.num_triples, sim.clients, sim.split
    );
    let server_toml = out.join("server.toml");
    write_toml(&server_toml, &plan.server)?;
    let mut daemons = vec![Daemon::spawn(
        program.command("server", &server_toml),
        "the coordinator",
        &out.join("server.log"),
    )?];
    let address = bound_address(&mut daemons[0], &out.join(ADDRESS_FILE), deadline)?;
    for (k, client) in plan.clients.iter().enumerate() {
        let path = out.join(format!("client-{k}.toml"));
        let mut client = client.clone();
        client.client.server = sim.auth.url(&address);
        write_toml(&path, &client)?;
        daemons.push(Daemon::spawn(
            program.command("client", &path),
            &client.client.name,
            &out.join(format!("client-{k}.log")),
        )?);
    }
    watch(&mut daemons, deadline)?;
    let mut figures = RunFigures::read(&out.join("coordinator"))?;
    // What each organisation kept, from its own gate decision, beside the federated model's
    // raw figures.
    for stage in &plan.server.server.stages {
        if stage.kind() != simskip_fed::StageKind::FedAvg {
            continue;
        }
        let decisions: Vec<(String, serde_json::Value)> = plan
            .clients
            .iter()
            .filter_map(|c| {
                let path = c.data.out_dir.join(&stage.name).join("gate.json");
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
                Some((c.client.name.clone(), v))
            })
            .collect();
        let kept = decisions
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), v["output"].as_str()?.to_owned())))
            .collect();
        let own = decisions
            .iter()
            .filter_map(|(name, v)| {
                let figures = serde_json::from_value(v.get("kept_figures")?.clone()).ok()?;
                Some((name.clone(), figures))
            })
            .collect();
        figures = figures
            .with_kept(&stage.name, kept)
            .with_kept_figures(&stage.name, own);
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn a_failing_daemon_ends_the_wait_with_its_own_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemons = vec![
            Daemon::spawn(
                sh("echo starting; echo 'error: model.dim must be positive' >&2; exit 3"),
                "the coordinator",
                &dir.path().join("server.log"),
            )
            .unwrap(),
            Daemon::spawn(sh("exec sleep 600"), "org-0", &dir.path().join("c.log")).unwrap(),
        ];
        let far = Instant::now() + Duration::from_secs(3600);
        let err = watch(&mut daemons, far).unwrap_err().to_string();
        assert!(
            err.contains("the coordinator") && err.contains("error: model.dim must be positive"),
            "{err}"
        );
        assert_eq!(daemons[0].poll().unwrap().and_then(|s| s.code()), Some(3));
        assert_eq!(daemons[1].poll().unwrap(), None, "org-0 still running");
        let sleeper = daemons.pop().unwrap();
        let pid = sleeper.child.id();
        drop(sleeper);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "a dropped daemon is killed and reaped"
        );
    }

    #[test]
    fn successful_daemons_end_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemons = vec![
            Daemon::spawn(sh("exit 0"), "a", &dir.path().join("a.log")).unwrap(),
            Daemon::spawn(sh("sleep 0.2"), "b", &dir.path().join("b.log")).unwrap(),
        ];
        watch(&mut daemons, Instant::now() + Duration::from_secs(3600)).unwrap();
    }

    #[test]
    fn out_dir_is_replaced_only_when_empty_or_a_previous_run() {
        let tmp = tempfile::tempdir().unwrap();
        // A foreign folder: refused, nothing deleted.
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir_all(foreign.join("sub")).unwrap();
        std::fs::write(foreign.join("sub/keep.txt"), "mine").unwrap();
        let err = prepare_out_dir(&foreign).unwrap_err().to_string();
        assert!(
            err.contains("not empty") && err.contains(RUN_MARKER),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(foreign.join("sub/keep.txt")).unwrap(),
            "mine"
        );
        assert!(!foreign.join(RUN_MARKER).exists());

        // A new folder and an empty one become run folders.
        for dir in [tmp.path().join("new/nested"), tmp.path().join("empty")] {
            if dir.ends_with("empty") {
                std::fs::create_dir(&dir).unwrap();
            }
            prepare_out_dir(&dir).unwrap();
            assert!(dir.join(RUN_MARKER).is_file());
        }

        // A previous run's folder is cleared and marked again.
        let run = tmp.path().join("new/nested");
        std::fs::create_dir_all(run.join("coordinator")).unwrap();
        std::fs::write(run.join("coordinator/metrics.jsonl"), "{}").unwrap();
        prepare_out_dir(&run).unwrap();
        let left: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(RUN_MARKER)]);

        // A file where the folder should be is refused.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(prepare_out_dir(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn daemons_get_an_explicit_environment() {
        let program = NodeProgram {
            path: PathBuf::from("env"),
        };
        // `env server --config X` would run a program; only the environment is inspected.
        let command = program.command("server", Path::new("x.toml"));
        let envs: Vec<(String, Option<String>)> = command
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        for (key, _) in &envs {
            assert!(
                INHERITED_ENV.contains(&key.as_str()) || THREAD_ENV.contains(&key.as_str()),
                "{key} passed to a daemon"
            );
        }
        for var in THREAD_ENV {
            assert!(envs.iter().any(|(k, v)| k == var && v.is_some()), "{var}");
        }
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args, ["server", "--config", "x.toml"]);
    }
}
