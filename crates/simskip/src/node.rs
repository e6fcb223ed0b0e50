//! The two daemons: `simskip-server` (the coordinator: FedE, then FedAvg of the SimSkip model)
//! and `simskip-client` (an organisation: trains on its private folder, answers tasks).
//! Their settings files, and reading a finished run's figures back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use simskip_data::KgDataset;
use simskip_fed::coordinator::rounds;
use simskip_fed::coordinator::store::Store;
use simskip_fed::{
    ClientConfig, FedAvgStrategy, FedEStrategy, ServerConfig, SimSkipParams, StageConfig,
    StageKind, StageParams, Strategy,
};
use simskip_kge::TransEConfig;
use simskip_refine::SimSkipTrainer;

use crate::settings::{self, EvalSettings, GateSettings};
use crate::work::{ComputeSettings, FederatedWork, WorkSettings};

#[derive(Debug, Parser)]
#[command(
    name = "simskip-server",
    version,
    about = "SimSkip federation coordinator (FedE, then federated SimSkip)"
)]
pub struct ServerArgs {
    /// Settings file (TOML) with [server] and its [[server.stages]]; SIMSKIP_SERVER__KEY etc. override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides server.metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Operator commands on the coordinator's database (server.out_dir/coordinator.db);
    /// without one, the coordinator runs (or resumes its unfinished run).
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerCommand {
    /// List the runs in the coordinator's database and their rounds.
    Runs(RunsArgs),
    /// Write the global model of a run after a given FIT round (its checkpoint) to a file.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    /// The coordinator's settings file (its server.out_dir holds the database).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only this run.
    #[arg(long)]
    pub run: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The coordinator's settings file (its server.out_dir holds the database).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run id (see `runs`).
    #[arg(long)]
    pub run: String,
    /// FIT round whose aggregated model to export.
    #[arg(long)]
    pub round: u32,
    /// Stage name; needed only when several stages have that round.
    #[arg(long)]
    pub stage: Option<String>,
    /// Output .safetensors file; a FedE table's row keys go to FILE.keys.txt beside it.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Parser)]
#[command(
    name = "simskip-client",
    version,
    about = "SimSkip federation client: trains on private data, shares only weights and metrics"
)]
pub struct ClientArgs {
    /// Settings file (TOML) with [client], [data], [compute], [gate], [eval];
    /// SIMSKIP_CLIENT__NAME etc. override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator URL (overrides client.server).
    #[arg(long)]
    pub server: Option<String>,
    /// Serve this organisation's progress as Prometheus metrics at http://ADDR/metrics
    /// (overrides client.metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// `simskip-server`'s settings file: the `[server]` section, stages included. What every
/// organisation trains is in the stages' typed parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerFile {
    pub server: ServerConfig,
}

impl Default for ServerFile {
    /// FedE for 20 rounds (rows exchanged only for entities held by at least 2
    /// organisations), then 10 rounds of federated SimSkip; figures every 5 rounds and after
    /// each stage. Each stage trains with its learning crate's defaults, except:
    /// FedE at lr 0.01 (FedE's 0.001 is tuned for FB15k-237's 272k triples; on the bundled
    /// WordNet-5k a client has about 2k triples, 4 Adam steps an epoch, and 20 rounds at 0.001
    /// leave the table barely trained: test MRR .023 against .07), and the SimSkip stage takes
    /// neighbour positives, the best refinement of the WordNet-5k study (README).
    fn default() -> Self {
        let dim = TransEConfig::fede_defaults().dim;
        let mut fede = StageParams::defaults(StageKind::FedE, dim);
        if let StageParams::FedE(t) = &mut fede {
            t.lr = 0.01;
        }
        let mut simskip = StageParams::defaults(StageKind::FedAvg, dim);
        if let StageParams::SimSkip(p) = &mut simskip {
            p.config.positives = simskip_refine::Positives::Neighbour;
        }
        let server = ServerConfig {
            min_clients: 3,
            min_fit_clients: 2,
            round_timeout_secs: 120.0,
            out_dir: PathBuf::from("coordinator"),
            stages: vec![
                StageConfig {
                    name: "fede".into(),
                    rounds: 20,
                    eval_every: 5,
                    params: fede,
                    // An entity held by one organisation is trained at home and its row
                    // never leaves it (README, Security).
                    aggregation: simskip_fed::Robustness {
                        min_holders: 2,
                        ..Default::default()
                    },
                    privacy: None,
                    secure_aggregation: None,
                },
                StageConfig {
                    name: "simskip".into(),
                    rounds: 10,
                    eval_every: 5,
                    params: simskip,
                    aggregation: Default::default(),
                    privacy: None,
                    secure_aggregation: None,
                },
            ],
            ..ServerConfig::default()
        };
        Self { server }
    }
}

/// Where a client's private data lives and where its outputs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// Graph folder: train.tsv, valid.tsv, test.tsv, optional entity_labels.tsv.
    pub dir: PathBuf,
    /// Private output folder (stage-1 embeddings, refined embeddings, gate decision).
    pub out_dir: PathBuf,
    /// Start stage 2 from this table instead of a FedE stage.
    pub input_embeddings: Option<PathBuf>,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            out_dir: PathBuf::from("out"),
            input_embeddings: None,
        }
    }
}

/// `simskip-client`'s settings file. What to train comes from the coordinator with each
/// task; these are the organisation's own: where its data is, how it computes, how it judges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientFile {
    pub client: ClientConfig,
    pub data: DataSettings,
    pub compute: ComputeSettings,
    pub gate: GateSettings,
    pub eval: EvalSettings,
}

/// The strategies of the configured stages, in order, their initial global models drawn
/// from `server.seed`.
pub fn strategies(server: &ServerConfig) -> Result<Vec<Box<dyn Strategy>>> {
    server
        .stages
        .iter()
        .map(|stage| -> Result<Box<dyn Strategy>> {
            Ok(match &stage.params {
                StageParams::FedE(cfg) => Box::new(
                    // New rows start as a client's own TransE with these settings would.
                    FedEStrategy::new(cfg.dim, simskip_kge::init_bound(cfg), server.seed)
                        .with_rule(stage.aggregation.clone()),
                ),
                StageParams::SimSkip(p) => Box::new(
                    simskip_strategy(p, server.seed)
                        .with_context(|| format!("the initial model of stage {:?}", stage.name))?
                        .with_rule(stage.aggregation.clone()),
                ),
            })
        })
        .collect()
}

/// The FedAvg strategy of a SimSkip stage: its initial model drawn from `seed`, and under
/// FedBN its BatchNorm arrays left to each organisation.
pub fn simskip_strategy(p: &SimSkipParams, seed: u64) -> Result<FedAvgStrategy> {
    let cfg = simskip_refine::SimSkipConfig {
        seed,
        ..p.config.clone()
    };
    let initial = SimSkipTrainer::new(p.dim, cfg)?.export();
    let local = if p.personalization.keeps_batch_norm_local() {
        simskip_refine::PARAMS
            .iter()
            .filter(|s| s.kind.is_batch_norm())
            .map(|s| s.name.to_owned())
            .collect()
    } else {
        Vec::new()
    };
    Ok(FedAvgStrategy::new(initial).with_local_arrays(local))
}

pub fn run_server(args: ServerArgs) -> Result<()> {
    match args.command {
        Some(ServerCommand::Runs(r)) => {
            let out_dir = server_out_dir(r.config.as_deref().or(args.config.as_deref()))?;
            print!("{}", list_runs(&out_dir, r.run.as_deref())?);
            return Ok(());
        }
        Some(ServerCommand::Export(e)) => {
            let out_dir = server_out_dir(e.config.as_deref().or(args.config.as_deref()))?;
            let written = export_model(&out_dir, &e.run, e.stage.as_deref(), e.round, &e.out)?;
            for path in written {
                println!("{}", path.display());
            }
            return Ok(());
        }
        None => {}
    }
    let mut file: ServerFile = settings::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        file.server.listen = listen;
    }
    if let Some(addr) = args.metrics_listen {
        file.server.metrics_listen = Some(addr);
    }
    file.server.validate()?;
    let strategies = strategies(&file.server)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let summary = runtime.block_on(async {
        let signal = shutdown_signal()?;
        let stop = async move {
            let name = signal.await;
            tracing::info!(signal = name, "shutdown requested");
        };
        anyhow::Ok(simskip_fed::run_server(file.server.clone(), strategies, stop).await?)
    })?;
    if summary.completed {
        tracing::info!(run_id = %summary.run_id, out = %summary.out_dir.display(), "run finished");
        return Ok(());
    }
    if summary.shutdown_requested {
        tracing::info!(
            run_id = %summary.run_id,
            rounds = summary.records.len(),
            out = %summary.out_dir.display(),
            "run stopped on request; restart the coordinator with the same settings to resume it"
        );
        return Ok(());
    }
    anyhow::bail!(
        "run {} stopped before it finished (see the log); restart the coordinator with the same \
         settings to resume it",
        summary.run_id
    )
}

/// The coordinator's output folder, from its settings file.
fn server_out_dir(config: Option<&Path>) -> Result<PathBuf> {
    let file: ServerFile = settings::load(config)?;
    Ok(file.server.out_dir)
}

/// `simskip server runs`: every run in the database (or only `only`), with its rounds.
pub fn list_runs(out_dir: &Path, only: Option<&str>) -> Result<String> {
    use std::fmt::Write;
    let store = Store::open_existing(out_dir)?;
    let mut out = format!("database {}\n", store.path().display());
    let runs = store.runs()?;
    if let Some(run) = only {
        anyhow::ensure!(
            runs.iter().any(|r| r.run_id == run),
            "no run {run:?} in {}",
            store.path().display()
        );
    }
    for run in runs.iter().filter(|r| only.is_none_or(|o| o == r.run_id)) {
        let resumes = store.resumes(&run.run_id)?;
        let orgs = store.organisations(&run.run_id)?;
        let _ = writeln!(
            out,
            "\nrun {}: {}, {} rounds, created {} (unix), stages {:.12}, resumed {}x, \
             organisations {}",
            run.run_id,
            if run.finished {
                "finished"
            } else {
                "unfinished"
            },
            run.rounds,
            run.created_unix,
            run.fingerprint,
            resumes.len(),
            orgs.iter()
                .map(|(n, k)| format!("{n} ({k} registrations)"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let _ = writeln!(
            out,
            "{:>4} {:<12} {:>5} {:<12} {:>7} {:<10} {:>9} {:<10} checkpoint",
            "seq", "stage", "round", "kind", "answers", "aggregated", "secs", "closed"
        );
        for r in store.rounds(&run.run_id)? {
            let rec = &r.record;
            let checkpoint = r.checkpoint.as_ref().map_or(String::from("-"), |c| {
                format!("{} ({:.1} MB)", c.path.display(), c.bytes as f64 / 1e6)
            });
            let _ = writeln!(
                out,
                "{:>4} {:<12} {:>5} {:<12} {:>7} {:<10} {:>9.2} {:<10} {}",
                r.seq,
                rec.stage,
                rec.round,
                rec.kind.as_str(),
                rec.num_clients,
                if rec.aggregated { "yes" } else { "no" },
                rec.ended_secs - rec.started_secs,
                r.closed_unix,
                checkpoint
            );
        }
    }
    Ok(out)
}

/// `simskip server export`: the checkpoint of `run` after FIT round `round` (of `stage`),
/// verified against its hash, copied to `out` (and its row keys to `out.keys.txt`). Returns
/// the files written.
pub fn export_model(
    out_dir: &Path,
    run: &str,
    stage: Option<&str>,
    round: u32,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let store = Store::open_existing(out_dir)?;
    let c = store.checkpoint_at(run, stage, round)?;
    let global = store.load_checkpoint(&c).map_err(|fault| {
        anyhow::anyhow!(
            "checkpoint {} of run {run:?}: {fault}",
            store.checkpoint_path(&c).display()
        )
    })?;
    let meta = BTreeMap::from([
        ("run_id".to_string(), run.to_string()),
        ("stage".to_string(), c.stage.clone()),
        ("round".to_string(), c.round.to_string()),
    ]);
    simskip_data::tensors::write_named_safetensors(out, &global.arrays, &meta)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut written = vec![out.to_path_buf()];
    if let Some(keys) = &global.keys {
        let mut path = out.as_os_str().to_owned();
        path.push(".keys.txt");
        let path = PathBuf::from(path);
        let mut text = keys.join("\n");
        text.push('\n');
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C). The handlers are installed before it
/// returns, so a signal that arrives while the daemon starts is not lost.
fn shutdown_signal() -> Result<impl std::future::Future<Output = &'static str> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

pub fn run_client(args: ClientArgs) -> Result<()> {
    let mut file: ClientFile = settings::load(args.config.as_deref())?;
    if let Some(server) = args.server {
        file.client.server = server;
    }
    if let Some(addr) = args.metrics_listen {
        file.client.metrics_listen = Some(addr);
    }
    file.client.validate()?;
    file.gate.validate()?;
    let ds = KgDataset::load(&file.data.dir)
        .with_context(|| format!("loading the private graph {}", file.data.dir.display()))?;
    let settings = WorkSettings {
        compute: file.compute.clone(),
        gate: file.gate.clone(),
        eval: file.eval.clone(),
    };
    let work = FederatedWork::new(
        ds,
        file.data.out_dir.clone(),
        settings,
        file.data.input_embeddings.as_deref(),
    )?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let ended = runtime.block_on(async {
        let signal = shutdown_signal()?;
        tokio::select! {
            end = simskip_fed::run_client(file.client.clone(), work) => anyhow::Ok(Ok(end?)),
            name = signal => anyhow::Ok(Err(name)),
        }
    });
    // Local work interrupted by a stop may still run on a blocking thread: do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match ended? {
        Ok(simskip_fed::ClientEnd::Done) => tracing::info!("run done"),
        Ok(simskip_fed::ClientEnd::Stopped) => {
            tracing::info!("the coordinator stopped the run; restart this client to resume")
        }
        Err(signal) => tracing::info!(%signal, "stopped by signal; restart this client to resume"),
    }
    Ok(())
}

/// The aggregated and per-client figures of a finished run, read from the coordinator's
/// `metrics.jsonl`: the last evaluation of each stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    /// stage name -> (round, aggregated metrics, per-client metrics)
    pub stages: BTreeMap<String, StageFigures>,
}

const TASKS: [&str; 5] = [
    "knn_at_10",
    "probe_accuracy",
    "probe_macro_f1",
    "lp_mrr",
    "lp_hits_at_10",
];

impl StageFigures {
    /// Per client with a known gate decision, and for the aggregate when every client's is
    /// known: the row label ("kept (input)" ...) and the kept table's figures, unprefixed.
    fn kept_rows(&self) -> BTreeMap<&str, (String, BTreeMap<String, f64>)> {
        let mut rows = BTreeMap::new();
        let mut sums: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for (client, m) in &self.clients {
            let Some(kept) = self.kept.get(client) else {
                continue;
            };
            // Figures the organisation measured on what it keeps (after fine-tuning) beat the
            // last evaluation's, which scored the federated model's output.
            let figures: BTreeMap<String, f64> = match self.kept_figures.get(client) {
                Some(own) if !own.is_empty() => TASKS
                    .iter()
                    .filter_map(|t| Some((t.to_string(), *own.get(*t)?)))
                    .collect(),
                _ => TASKS
                    .iter()
                    .filter_map(|t| Some((t.to_string(), *m.get(&format!("{kept}.{t}"))?)))
                    .collect(),
            };
            let w = self.client_examples.get(client).copied().unwrap_or(0) as f64;
            for (t, v) in &figures {
                let e = sums
                    .entry(TASKS.iter().find(|x| *x == t).copied().unwrap_or(""))
                    .or_default();
                e.0 += w * v;
                e.1 += w;
            }
            rows.insert(client.as_str(), (format!("kept ({kept})"), figures));
        }
        if !self.clients.is_empty() && self.clients.keys().all(|c| self.kept.contains_key(c)) {
            let figures = sums
                .into_iter()
                .filter(|(_, (_, w))| *w > 0.0)
                .map(|(t, (s, w))| (t.to_string(), s / w))
                .collect();
            rows.insert("aggregate", ("kept".to_string(), figures));
        }
        rows
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageFigures {
    pub round: u32,
    pub aggregate: BTreeMap<String, f64>,
    pub clients: BTreeMap<String, BTreeMap<String, f64>>,
    /// Example weight of each client in that evaluation.
    pub client_examples: BTreeMap<String, u64>,
    /// What each organisation's gate kept ("input" or "refined"), when known (see
    /// [`RunFigures::with_kept`]).
    pub kept: BTreeMap<String, String>,
    /// The kept table's test figures as the organisation measured them at the end of the
    /// stage, when the kept table is not the one the last evaluation scored (fine-tuning).
    pub kept_figures: BTreeMap<String, BTreeMap<String, f64>>,
    /// (round, aggregated metrics) of every evaluation, in order.
    pub history: Vec<(u32, BTreeMap<String, f64>)>,
    /// A DP stage's privacy spent after its last FIT round.
    pub privacy: Option<PrivacySpent>,
}

/// What a differentially private stage spent, from its last FIT round's record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrivacySpent {
    pub round: u32,
    pub epsilon: f64,
    pub delta: f64,
}

impl RunFigures {
    pub fn read(coordinator_dir: &Path) -> Result<Self> {
        let path = coordinator_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut figures = RunFigures::default();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            if v["kind"] == "fit" {
                let m = &v["metrics"];
                if let (Some(epsilon), Some(delta)) =
                    (m[rounds::DP_EPSILON].as_f64(), m[rounds::DP_DELTA].as_f64())
                {
                    let stage = v["stage"].as_str().unwrap_or_default().to_owned();
                    figures.stages.entry(stage).or_default().privacy = Some(PrivacySpent {
                        round: v["round"].as_u64().unwrap_or_default() as u32,
                        epsilon,
                        delta,
                    });
                }
            }
            if v["kind"] != "evaluate" {
                continue;
            }
            let stage = v["stage"].as_str().unwrap_or_default().to_owned();
            let round = v["round"].as_u64().unwrap_or_default() as u32;
            let aggregate: BTreeMap<String, f64> =
                serde_json::from_value(v["metrics"].clone()).unwrap_or_default();
            let clients: BTreeMap<String, BTreeMap<String, f64>> = v["clients"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(name, c)| {
                            (
                                name.clone(),
                                serde_json::from_value(c["metrics"].clone()).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let client_examples: BTreeMap<String, u64> = v["clients"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(name, c)| (name.clone(), c["num_examples"].as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            let entry = figures.stages.entry(stage).or_default();
            entry.history.push((round, aggregate.clone()));
            entry.round = round;
            entry.aggregate = aggregate;
            entry.clients = clients;
            entry.client_examples = client_examples;
        }
        Ok(figures)
    }

    /// Adds what each organisation's gate kept at the end of `stage`: `kept` maps a client to
    /// "input" or "refined" (its `gate.json`). The final evaluation scored the same global
    /// model the organisation refined its table with, so the kept table's figures are that
    /// evaluation's input or refined figures for the client; the aggregate "kept" row weighs
    /// them like the other rows.
    pub fn with_kept(mut self, stage: &str, kept: BTreeMap<String, String>) -> Self {
        if let Some(f) = self.stages.get_mut(stage) {
            f.kept = kept;
        }
        self
    }

    /// The kept tables' own test figures, per organisation (see [`StageFigures::kept_figures`]).
    pub fn with_kept_figures(
        mut self,
        stage: &str,
        figures: BTreeMap<String, BTreeMap<String, f64>>,
    ) -> Self {
        if let Some(f) = self.stages.get_mut(stage) {
            f.kept_figures = figures;
        }
        self
    }

    /// Tables: per stage, one row per client and the aggregate.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (stage, f) in &self.stages {
            let mut rows: Vec<(String, &BTreeMap<String, f64>)> =
                f.clients.iter().map(|(c, m)| (c.clone(), m)).collect();
            rows.push(("aggregate".into(), &f.aggregate));
            let has_refined = f.aggregate.keys().any(|k| k.starts_with("refined."));
            out.push_str(&format!(
                "\nstage '{stage}', evaluation after round {}:\n",
                f.round
            ));
            if let Some(p) = &f.privacy {
                out.push_str(&format!(
                    "differential privacy: epsilon = {:.3} at delta = {:e} after {} rounds\n",
                    p.epsilon, p.delta, p.round
                ));
            }
            if has_refined {
                out.push_str(&format!(
                    "{:<12} {:<16} {:>8} {:>9} {:>9} {:>8} {:>8}\n",
                    "client", "table", "KNN@10", "probe acc", "probe F1", "LP MRR", "LP H@10"
                ));
                let kept_rows = f.kept_rows();
                for (name, m) in &rows {
                    let mut tables: Vec<(String, &BTreeMap<String, f64>, &str)> = vec![
                        ("input".into(), *m, "input"),
                        ("refined".into(), *m, "refined"),
                    ];
                    if let Some((label, km)) = kept_rows.get(name.as_str()) {
                        tables.push((label.clone(), km, ""));
                    }
                    for (label, m, prefix) in tables {
                        let g = |k: &str| {
                            let key = if prefix.is_empty() {
                                k.to_owned()
                            } else {
                                format!("{prefix}.{k}")
                            };
                            m.get(&key).map_or("-".to_owned(), |v| format!("{v:.4}"))
                        };
                        out.push_str(&format!(
                            "{:<12} {:<16} {:>8} {:>9} {:>9} {:>8} {:>8}\n",
                            name,
                            label,
                            g("knn_at_10"),
                            g("probe_accuracy"),
                            g("probe_macro_f1"),
                            g("lp_mrr"),
                            g("lp_hits_at_10")
                        ));
                    }
                }
            } else {
                out.push_str(&format!(
                    "{:<12} {:>9} {:>9} {:>10} {:>9} {:>10}\n",
                    "client", "valid MRR", "test MRR", "test H@1", "test H@10", "tail MRR"
                ));
                for (name, m) in &rows {
                    let g = |k: &str| m.get(k).map_or("-".to_owned(), |v| format!("{v:.4}"));
                    out.push_str(&format!(
                        "{:<12} {:>9} {:>9} {:>10} {:>9} {:>10}\n",
                        name,
                        g("valid.mrr"),
                        g("test.mrr"),
                        g("test.hits_at_1"),
                        g("test.hits_at_10"),
                        g("test.tail_mrr")
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rows_follow_each_gate_and_weigh_the_aggregate_by_examples() {
        let m = |i: f64, r: f64| {
            BTreeMap::from([
                ("input.knn_at_10".to_string(), i),
                ("refined.knn_at_10".to_string(), r),
            ])
        };
        let mut f = StageFigures {
            clients: BTreeMap::from([
                ("a".to_string(), m(0.5, 0.6)),
                ("b".to_string(), m(0.3, 0.2)),
            ]),
            client_examples: BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 3)]),
            aggregate: m(0.35, 0.3),
            ..StageFigures::default()
        };
        // Until every gate is known there is no aggregate "kept" row.
        f.kept = BTreeMap::from([("a".to_string(), "refined".to_string())]);
        let rows = f.kept_rows();
        assert_eq!(rows["a"].0, "kept (refined)");
        assert_eq!(rows["a"].1["knn_at_10"], 0.6);
        assert!(!rows.contains_key("aggregate"));
        f.kept.insert("b".into(), "input".into());
        let rows = f.kept_rows();
        assert_eq!(rows["b"].1["knn_at_10"], 0.3);
        let agg = rows["aggregate"].1["knn_at_10"];
        assert!((agg - (0.6 + 3.0 * 0.3) / 4.0).abs() < 1e-12, "{agg}");
        let figures = RunFigures {
            stages: BTreeMap::from([("simskip".to_string(), f)]),
        };
        let table = figures.render();
        assert!(
            table.contains("kept (refined)") && table.contains("kept (input)"),
            "{table}"
        );
    }

    #[test]
    fn an_organisations_own_figures_of_its_kept_table_win() {
        let mut f = StageFigures {
            clients: BTreeMap::from([(
                "a".to_string(),
                BTreeMap::from([("refined.knn_at_10".to_string(), 0.6)]),
            )]),
            client_examples: BTreeMap::from([("a".to_string(), 1)]),
            kept: BTreeMap::from([("a".to_string(), "refined".to_string())]),
            ..StageFigures::default()
        };
        assert_eq!(f.kept_rows()["a"].1["knn_at_10"], 0.6);
        // Fine-tuned after the last evaluation: the organisation's own figure is shown.
        f.kept_figures = BTreeMap::from([(
            "a".to_string(),
            BTreeMap::from([("knn_at_10".to_string(), 0.7)]),
        )]);
        assert_eq!(f.kept_rows()["a"].1["knn_at_10"], 0.7);
        assert_eq!(f.kept_rows()["aggregate"].1["knn_at_10"], 0.7);
    }
}
