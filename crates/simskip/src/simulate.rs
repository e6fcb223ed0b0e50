//! `simskip simulate`: the whole federation on one machine with real processes. It partitions
//! a graph into private client folders, writes a server config and one client config per
//! organisation, starts one `simskip-server` and N `simskip-client` processes on loopback,
//! waits for them, and prints the input-versus-refined figures from the coordinator's metrics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use simskip_data::partition::{partition, write_partitions, PartitionBy, PartitionConfig};
use simskip_data::KgDataset;

use crate::node::{ClientFile, ServerFile};
use crate::settings;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Simulation settings (TOML); defaults: bundled WordNet-5k, 3 clients. See examples/simulate.toml.
    pub config: Option<PathBuf>,
    /// Output folder (overrides `simulate.out_dir`).
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

/// The `[simulate]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateSettings {
    pub dataset: PathBuf,
    pub clients: usize,
    pub split: SplitKind,
    pub seed: u64,
    pub out_dir: PathBuf,
    /// The whole run is stopped (and reported as failed) after this long.
    pub timeout_secs: u64,
}

impl Default for SimulateSettings {
    fn default() -> Self {
        Self {
            dataset: PathBuf::from("data/wordnet-5k"),
            clients: 3,
            split: SplitKind::Relation,
            seed: 0,
            out_dir: PathBuf::from("runs/simulate"),
            timeout_secs: 1800,
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

/// Where the simulation's commands live: beside the running executable (`target/<profile>/`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test executables live one level down, in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p simskip --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound then released; the server binds it right after).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Kills the child when dropped, so an early error never leaves daemons behind.
struct Guard(Option<Child>, String);

impl Guard {
    fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        let child = self.0.as_mut().expect("child present until dropped");
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(None)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn(bin: &Path, config: &Path, log: &Path, name: &str) -> Result<Guard> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new(bin);
    // Several daemons share the machine's cores: one compute thread each, unless the user
    // chose otherwise (candle's pool busy-waits, which starves the others).
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            command.env(var, "1");
        }
    }
    let child = command
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Guard(Some(child), name.to_owned()))
}

fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = toml::to_string_pretty(value).context("serialising settings")?;
    simskip_data::fsutil::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: SimulateArgs) -> Result<()> {
    let mut file: SimulateFile = settings::load(args.config.as_deref())?;
    if let Some(out) = args.out {
        file.simulate.out_dir = out;
    }
    if let Some(c) = args.clients {
        file.simulate.clients = c;
    }
    let summary = simulate(&file)?;
    print!("{}", summary.render());
    println!("outputs: {}", file.simulate.out_dir.display());
    Ok(())
}

/// Run the federation; returns the figures read back from the coordinator's metrics.
pub fn simulate(file: &SimulateFile) -> Result<crate::node::RunFigures> {
    let sim = &file.simulate;
    let out = &sim.out_dir;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ds = KgDataset::load(&sim.dataset)
        .with_context(|| format!("loading {}", sim.dataset.display()))?;
    let by = match sim.split {
        SplitKind::Relation => PartitionBy::Relation,
        SplitKind::Triples => PartitionBy::Triples,
    };
    let parts = partition(&ds, &PartitionConfig::new(sim.clients, by, sim.seed))?;
    let dirs = write_partitions(&parts, &out.join("private"))?;
    println!(
        "partitioned {} ({} triples) into {} clients by {:?}",
        sim.dataset.display(),
        ds.train.len() + ds.valid.len() + ds.test.len(),
        sim.clients,
        sim.split
    );

    let port = free_port()?;
    let mut server = file.server.clone();
    server.server.listen = format!("127.0.0.1:{port}");
    server.server.out_dir = out.join("coordinator");
    server.server.min_clients = sim.clients;
    let server_toml = out.join("server.toml");
    write_toml(&server_toml, &server)?;

    let server_bin = sibling_binary("simskip-server")?;
    let client_bin = sibling_binary("simskip-client")?;
    let mut server_proc = spawn(&server_bin, &server_toml, &out.join("server.log"), "server")?;
    let mut clients = Vec::new();
    for (k, dir) in dirs.iter().enumerate() {
        let mut client = file.client.clone();
        client.client.server = format!("http://127.0.0.1:{port}");
        client.client.name = format!("org-{k}");
        client.data.dir = dir.clone();
        client.data.out_dir = out.join(format!("org-{k}-output"));
        let path = out.join(format!("client-{k}.toml"));
        write_toml(&path, &client)?;
        clients.push(spawn(
            &client_bin,
            &path,
            &out.join(format!("client-{k}.log")),
            &format!("org-{k}"),
        )?);
    }

    let deadline = Instant::now() + Duration::from_secs(sim.timeout_secs);
    for c in &mut clients {
        match c.wait_until(deadline)? {
            Some(s) if s.success() => {}
            Some(s) => bail!(
                "client {} exited with {s}; see {}",
                c.1,
                out.join(format!("client-{}.log", &c.1[4..])).display()
            ),
            None => bail!(
                "the simulation did not finish within {} s",
                sim.timeout_secs
            ),
        }
    }
    match server_proc.wait_until(deadline + Duration::from_secs(30))? {
        Some(s) if s.success() => {}
        Some(s) => bail!(
            "the server exited with {s}; see {}",
            out.join("server.log").display()
        ),
        None => bail!("the server did not stop after the clients finished"),
    }
    crate::node::RunFigures::read(&out.join("coordinator"))
}
