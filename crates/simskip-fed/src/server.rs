//! The coordinator: a tonic service around the [`Rounds`] state machine.
//!
//! Clients connect out to it, register, long-poll `PollTask` and push results. A background
//! ticker advances time; every closed round is appended to `out_dir/metrics.jsonl` and
//! `out_dir/metrics.csv`, and every aggregated global model is written atomically to
//! `out_dir/<stage>/global.safetensors` (plus `out_dir/<stage>/entities.txt`, the key of each
//! row of "entities", for FedE stages).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::chunk::{Assembler, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES};
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{self, register_request, result_chunk};
use crate::rounds::{
    Event, Report, ResultOutcome, RoundRecord, Rounds, RoundsConfig, RoundsError, StageKind,
    StageSpec, Task, TaskKind,
};
use crate::strategy::{GlobalSnapshot, Strategy};
use crate::wire;

/// One stage of the run, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// "fede" or "fedavg".
    pub kind: StageKind,
    pub rounds: u32,
    /// EVALUATE after every k-th round (0 or absent: only after the last round).
    #[serde(default)]
    pub eval_every: u32,
    /// Passed to the clients with every task of the stage.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// Coordinator settings. Every field has a default, so a config file only needs what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, e.g. "0.0.0.0:50051".
    pub listen: String,
    /// Run id; the default is random.
    pub run_id: String,
    /// Shared token clients must present; `None` or empty: no check.
    pub token: Option<String>,
    /// Alive clients needed before any round starts.
    pub min_clients: usize,
    /// Fraction of alive clients selected per FIT round.
    pub fraction_fit: f64,
    /// At least this many clients are selected, and must answer, for a round to count.
    pub min_fit_clients: usize,
    pub round_timeout_secs: f64,
    /// Interval the clients are told to heartbeat at.
    pub heartbeat_interval_secs: f64,
    /// A client silent this long is dead (must register again).
    pub heartbeat_timeout_secs: f64,
    /// Longest a PollTask call is held before answering WAIT.
    pub poll_timeout_secs: f64,
    /// Tensor chunk payload size.
    pub chunk_bytes: usize,
    /// gRPC max decoding/encoding message size, both directions.
    pub max_message_bytes: usize,
    pub out_dir: PathBuf,
    pub stages: Vec<StageConfig>,
    /// Seeds client selection.
    pub seed: u64,
    /// Period of the background ticker.
    pub tick_ms: u64,
    /// After the run is DONE, how long to wait for alive clients to be told so.
    pub done_grace_secs: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            run_id: format!("run-{:016x}", rand::random::<u64>()),
            token: None,
            min_clients: 2,
            fraction_fit: 1.0,
            min_fit_clients: 2,
            round_timeout_secs: 600.0,
            heartbeat_interval_secs: 5.0,
            heartbeat_timeout_secs: 30.0,
            poll_timeout_secs: 20.0,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            out_dir: PathBuf::from("fed-out"),
            stages: Vec::new(),
            seed: 0,
            tick_ms: 100,
            done_grace_secs: 10.0,
        }
    }
}

impl ServerConfig {
    /// The state machine's view of this configuration.
    pub fn rounds_config(&self) -> RoundsConfig {
        RoundsConfig {
            run_id: self.run_id.clone(),
            min_clients: self.min_clients,
            fraction_fit: self.fraction_fit,
            min_fit_clients: self.min_fit_clients,
            round_timeout: secs(self.round_timeout_secs),
            heartbeat_timeout: secs(self.heartbeat_timeout_secs),
            seed: self.seed,
            stages: self
                .stages
                .iter()
                .map(|s| StageSpec {
                    name: s.name.clone(),
                    kind: s.kind,
                    rounds: s.rounds,
                    eval_every: s.eval_every,
                    config: s.config.clone(),
                })
                .collect(),
        }
    }

    /// Checks what the state machine does not.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.run_id.is_empty() {
            bail!("run_id must not be empty");
        }
        if self.chunk_bytes < 4 {
            bail!("chunk_bytes must be at least 4");
        }
        if self.chunk_bytes + (64 << 10) > self.max_message_bytes {
            bail!(
                "chunk_bytes {} plus framing does not fit max_message_bytes {}",
                self.chunk_bytes,
                self.max_message_bytes
            );
        }
        for (name, v) in [
            ("round_timeout_secs", self.round_timeout_secs),
            ("heartbeat_interval_secs", self.heartbeat_interval_secs),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
            ("poll_timeout_secs", self.poll_timeout_secs),
            ("done_grace_secs", self.done_grace_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number, got {v}");
            }
        }
        if self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            bail!("heartbeat_timeout_secs must exceed heartbeat_interval_secs");
        }
        for s in &self.stages {
            if s.name.is_empty() || s.name.contains(['/', '\\']) || s.name == "." || s.name == ".."
            {
                bail!("stage name {:?} cannot name a directory", s.name);
            }
        }
        Ok(())
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    /// Every closed round (FIT, EVALUATE, FINISH_STAGE) in order.
    pub records: Vec<RoundRecord>,
    /// Final global state of each stage.
    pub globals: Vec<GlobalSnapshot>,
    pub ignored_results: u64,
    /// True when the run reached DONE (false: stopped by the shutdown signal).
    pub completed: bool,
    pub out_dir: PathBuf,
}

struct Shared {
    rounds: Mutex<Rounds>,
    notify: Notify,
    start: Instant,
    run_id: String,
    token: Option<String>,
    chunk_bytes: usize,
    heartbeat_interval: Duration,
    poll_timeout: Duration,
    closing: AtomicBool,
    /// To the writer thread; `None` stops it.
    events: std::sync::mpsc::Sender<Option<Event>>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Call with the state machine locked, so that events reach the writer in order.
    fn emit(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for e in events {
            log_event(&e);
            // The writer only goes away when the server stops.
            let _ = self.events.send(Some(e));
        }
        self.notify.notify_waiters();
    }
}

fn log_event(e: &Event) {
    match e {
        Event::ClientRegistered { name, rejoined, .. } => {
            tracing::info!(client = %name, rejoined, "client registered")
        }
        Event::ClientDead { name } => tracing::warn!(client = %name, "client silent: marked dead"),
        Event::StageStarted { stage, .. } => tracing::info!(%stage, "stage started"),
        Event::RoundStarted {
            round,
            kind,
            clients,
            ..
        } => tracing::info!(
            round,
            kind = kind.as_str(),
            clients = clients.len(),
            "round started"
        ),
        Event::RoundCompleted(r) => tracing::info!(
            stage = %r.stage,
            round = r.round,
            kind = r.kind.as_str(),
            answers = r.num_clients,
            aggregated = r.aggregated,
            timed_out = r.timed_out,
            note = r.note.as_deref().unwrap_or(""),
            "round closed"
        ),
        Event::GlobalUpdated { .. } => {}
        Event::StageFinished { stage, .. } => tracing::info!(%stage, "stage finished"),
        Event::Done => tracing::info!("run done"),
    }
}

struct Service {
    shared: Arc<Shared>,
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<proto::TaskChunk, Status>> + Send>>;

fn rounds_status(e: RoundsError) -> Status {
    match e {
        RoundsError::UnknownSession(_) => Status::not_found(e.to_string()),
        RoundsError::WrongRunId { .. } => Status::failed_precondition(e.to_string()),
        RoundsError::EmptyName => Status::invalid_argument(e.to_string()),
        RoundsError::Config(_) | RoundsError::Strategy { .. } => Status::internal(e.to_string()),
    }
}

impl Service {
    fn task_header(&self, task: &Task) -> proto::TaskHeader {
        proto::TaskHeader {
            run_id: task.run_id.clone(),
            round: task.round,
            stage_index: task.stage_index as u32,
            stage_name: task.stage_name.clone(),
            stage_kind: wire::stage_kind_to_proto(task.stage_kind) as i32,
            kind: wire::task_kind_to_proto(task.kind) as i32,
            task_id: task.task_id.clone(),
            config: task.config.clone(),
            arrays: Vec::new(),
            stage_rounds: task.stage_rounds,
        }
    }

    async fn wait_task(&self, round: u32) -> Task {
        let r = self.shared.rounds.lock().await;
        let (stage_index, round, _) = r.current().unwrap_or((0, round, TaskKind::Wait));
        let spec = &r.config().stages[stage_index];
        Task {
            run_id: self.shared.run_id.clone(),
            task_id: String::new(),
            kind: TaskKind::Wait,
            stage_index,
            stage_name: spec.name.clone(),
            stage_kind: spec.kind,
            stage_rounds: spec.rounds,
            round,
            config: BTreeMap::new(),
            arrays: Vec::new(),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<Streaming<proto::RegisterRequest>>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(proto::RegisterRequest {
                part: Some(register_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "registration must start with a header",
                ))
            }
        };
        if let Some(token) = self.shared.token.as_deref().filter(|t| !t.is_empty()) {
            if header.credentials != token {
                tracing::warn!(client = %header.client_name, "registration refused: bad token");
                return Err(Status::unauthenticated("bad token"));
            }
        }
        let mut keys = Vec::with_capacity(header.num_entity_keys.min(1 << 24) as usize);
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(register_request::Part::EntityKeys(k)) => {
                    keys.extend(k.keys);
                    if keys.len() as u64 > header.num_entity_keys {
                        return Err(Status::invalid_argument(format!(
                            "more entity keys than the {} announced",
                            header.num_entity_keys
                        )));
                    }
                }
                _ => return Err(Status::invalid_argument("unexpected second header")),
            }
        }
        if keys.len() as u64 != header.num_entity_keys {
            return Err(Status::invalid_argument(format!(
                "{} entity keys announced, {} received",
                header.num_entity_keys,
                keys.len()
            )));
        }
        let now = self.shared.now();
        let reg = {
            let mut r = self.shared.rounds.lock().await;
            let reg = r
                .on_register(
                    &header.client_name,
                    &header.run_id,
                    header.num_examples,
                    keys,
                    now,
                )
                .map_err(rounds_status)?;
            self.shared.emit(r.tick(now));
            reg
        };
        Ok(Response::new(proto::RegisterReply {
            run_id: reg.run_id,
            round: 0,
            session_id: reg.session,
            heartbeat_interval_ms: self.shared.heartbeat_interval.as_millis() as u64,
            poll_timeout_ms: self.shared.poll_timeout.as_millis() as u64,
            chunk_bytes: self.shared.chunk_bytes as u64,
        }))
    }

    type PollTaskStream = TaskStream;

    async fn poll_task(
        &self,
        request: Request<proto::PollRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let req = request.into_inner();
        if !req.run_id.is_empty() && req.run_id != self.shared.run_id {
            return Err(Status::failed_precondition(format!(
                "wrong run id {:?} (this run is {:?})",
                req.run_id, self.shared.run_id
            )));
        }
        let deadline = tokio::time::Instant::now() + self.shared.poll_timeout;
        let task = loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.shared.now();
            let found = {
                let mut r = self.shared.rounds.lock().await;
                r.task_for(&req.session_id, now).map_err(rounds_status)?
            };
            if let Some(t) = found {
                break t;
            }
            if self.shared.closing.load(Ordering::SeqCst) {
                break self.wait_task(req.round).await;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => break self.wait_task(req.round).await,
            }
        };
        let header = self.task_header(&task);
        let chunk_bytes = self.shared.chunk_bytes;
        let t0 = Instant::now();
        let messages = tokio::task::spawn_blocking(move || {
            wire::task_messages(header, &task.arrays, chunk_bytes)
        })
        .await
        .map_err(|e| Status::internal(format!("encoding task: {e}")))?;
        let encode_secs = t0.elapsed().as_secs_f64();
        self.shared.rounds.lock().await.add_overhead(encode_secs);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            messages.into_iter().map(Ok),
        ))))
    }

    async fn push_result(
        &self,
        request: Request<Streaming<proto::ResultChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(proto::ResultChunk {
                part: Some(result_chunk::Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("result must start with a header")),
        };
        let mut decode = Duration::ZERO;
        let mut asm = Assembler::new(&header.arrays)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .expect_run(header.run_id.clone(), header.round);
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(result_chunk::Part::Tensor(c)) => {
                    let t0 = Instant::now();
                    asm.push(c)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    decode += t0.elapsed();
                }
                _ => return Err(Status::invalid_argument("unexpected second header")),
            }
        }
        let t0 = Instant::now();
        let arrays = asm
            .finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        decode += t0.elapsed();
        let kind = wire::task_kind_from_proto(header.kind)
            .ok_or_else(|| Status::invalid_argument("result has no task kind"))?;
        let report = Report {
            run_id: header.run_id,
            session: header.session_id,
            round: header.round,
            task_id: header.task_id,
            kind,
            num_examples: header.num_examples,
            metrics: header.metrics,
            arrays,
            error: (!header.error.is_empty()).then_some(header.error),
        };
        let round = report.round;
        let now = self.shared.now();
        let outcome = {
            let mut r = self.shared.rounds.lock().await;
            let outcome = r.on_result(report, now);
            if !matches!(outcome, ResultOutcome::Ignored(_)) {
                r.add_overhead(decode.as_secs_f64());
            }
            self.shared.emit(r.tick(now));
            outcome
        };
        let (status, message) = match outcome {
            ResultOutcome::Accepted => (proto::ResultStatus::Accepted, String::new()),
            ResultOutcome::Failure(m) => (proto::ResultStatus::FailureRecorded, m),
            ResultOutcome::Ignored(reason) => {
                tracing::warn!("result ignored: {reason}");
                (proto::ResultStatus::Ignored, reason.to_string())
            }
        };
        Ok(Response::new(proto::PushReply {
            run_id: self.shared.run_id.clone(),
            round,
            status: status as i32,
            message,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let req = request.into_inner();
        let now = self.shared.now();
        let (st, round) = {
            let mut r = self.shared.rounds.lock().await;
            (r.on_heartbeat(&req.session_id, now), r.current_round())
        };
        Ok(Response::new(proto::HeartbeatReply {
            run_id: self.shared.run_id.clone(),
            round,
            known: st.known && (req.run_id.is_empty() || req.run_id == self.shared.run_id),
            done: st.done,
        }))
    }
}

/// Appends records and writes global models; runs on its own thread.
struct Writer {
    out_dir: PathBuf,
    run_id: String,
    jsonl: File,
    csv: File,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Writer {
    fn open(out_dir: &Path, run_id: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let open = |name: &str| -> anyhow::Result<(File, bool)> {
            let p = out_dir.join(name);
            let fresh = !p.exists() || std::fs::metadata(&p)?.len() == 0;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))?;
            Ok((f, fresh))
        };
        let (jsonl, _) = open("metrics.jsonl")?;
        let (mut csv, fresh) = open("metrics.csv")?;
        if fresh {
            writeln!(csv, "run_id,stage,round,kind,client,metric,value")?;
        }
        Ok(Self {
            out_dir: out_dir.to_path_buf(),
            run_id: run_id.to_string(),
            jsonl,
            csv,
        })
    }

    fn handle(&mut self, e: Event) -> anyhow::Result<()> {
        match e {
            Event::RoundCompleted(rec) => {
                let line = serde_json::to_string(&rec)?;
                writeln!(self.jsonl, "{line}")?;
                self.jsonl.flush()?;
                let prefix = format!(
                    "{},{},{},{}",
                    csv_field(&rec.run_id),
                    csv_field(&rec.stage),
                    rec.round,
                    rec.kind.as_str()
                );
                let mut rows = String::new();
                for (client, c) in &rec.clients {
                    let client = csv_field(client);
                    rows += &format!("{prefix},{client},num_examples,{}\n", c.num_examples);
                    for (m, v) in &c.metrics {
                        rows += &format!("{prefix},{client},{},{v}\n", csv_field(m));
                    }
                }
                rows += &format!("{prefix},aggregate,num_clients,{}\n", rec.num_clients);
                for (m, v) in &rec.metrics {
                    rows += &format!("{prefix},aggregate,{},{v}\n", csv_field(m));
                }
                rows += &format!(
                    "{prefix},aggregate,coordinator_secs,{}\n",
                    rec.coordinator.total_secs
                );
                self.csv.write_all(rows.as_bytes())?;
                self.csv.flush()?;
            }
            Event::GlobalUpdated {
                stage,
                round,
                global,
                ..
            } => {
                let dir = self.out_dir.join(&stage);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let meta = BTreeMap::from([
                    ("run_id".to_string(), self.run_id.clone()),
                    ("stage".to_string(), stage.clone()),
                    ("round".to_string(), round.to_string()),
                ]);
                if let Some(keys) = &global.keys {
                    let mut text = keys.join("\n");
                    text.push('\n');
                    simskip_data::fsutil::write_atomic(&dir.join("entities.txt"), text.as_bytes())?;
                }
                simskip_data::tensors::write_named_safetensors(
                    &dir.join("global.safetensors"),
                    &global.arrays,
                    &meta,
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Binds `cfg.listen` and runs the coordinator until the run is DONE (all stages complete
/// and every alive client told DONE, or `done_grace_secs` passed) or `shutdown` resolves.
/// `strategies`: one per stage, in stage order, kinds matching.
pub async fn run_server(
    cfg: ServerConfig,
    strategies: Vec<Box<dyn Strategy>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunSummary> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&cfg.listen)
        .await
        .with_context(|| format!("resolving listen address {:?}", cfg.listen))?
        .collect();
    let addr = addrs
        .first()
        .with_context(|| format!("listen address {:?} resolves to nothing", cfg.listen))?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    serve(cfg, listener, strategies, shutdown).await
}

/// Like [`run_server`] on an already bound listener (`cfg.listen` is ignored): bind port 0
/// and read `listener.local_addr()` to run on a free port.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    strategies: Vec<Box<dyn Strategy>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    let rounds = Rounds::new(cfg.rounds_config(), strategies)?;
    let mut writer = Writer::open(&cfg.out_dir, &cfg.run_id)?;
    let (tx, rx) = std::sync::mpsc::channel::<Option<Event>>();
    let writer_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut first_err = None;
        while let Ok(Some(e)) = rx.recv() {
            if let Err(err) = writer.handle(e) {
                tracing::error!("writing run outputs: {err:#}");
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    });

    let shared = Arc::new(Shared {
        rounds: Mutex::new(rounds),
        notify: Notify::new(),
        start: Instant::now(),
        run_id: cfg.run_id.clone(),
        token: cfg.token.clone(),
        chunk_bytes: cfg.chunk_bytes,
        heartbeat_interval: secs(cfg.heartbeat_interval_secs),
        poll_timeout: secs(cfg.poll_timeout_secs),
        closing: AtomicBool::new(false),
        events: tx,
    });
    let local = listener.local_addr().ok();
    tracing::info!(run_id = %cfg.run_id, addr = ?local, "coordinator listening");

    // Ticker: advances time and decides when the run is over.
    let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<bool>();
    let ticker = {
        let shared = shared.clone();
        let grace = secs(cfg.done_grace_secs);
        let period = Duration::from_millis(cfg.tick_ms.max(1));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let now = shared.now();
                let over = {
                    let mut r = shared.rounds.lock().await;
                    shared.emit(r.tick(now));
                    r.done_at().is_some_and(|at| {
                        r.all_alive_told_done() || now.saturating_sub(at) >= grace
                    })
                };
                if over {
                    let _ = finished_tx.send(true);
                    break;
                }
            }
        })
    };

    let m = cfg.max_message_bytes;
    let svc = CoordinatorServer::new(Service {
        shared: shared.clone(),
    })
    .max_decoding_message_size(m)
    .max_encoding_message_size(m);
    let stop = {
        let shared = shared.clone();
        async move {
            tokio::select! {
                _ = finished_rx => {}
                _ = shutdown => tracing::info!("shutdown requested"),
            }
            // Release held long-polls so the graceful shutdown does not wait for them.
            shared.closing.store(true, Ordering::SeqCst);
            shared.notify.notify_waiters();
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    ticker.abort();

    let (records, globals, ignored, completed) = {
        let mut r = shared.rounds.lock().await;
        // Flush what the last tick produced, then stop the writer.
        shared.emit(r.tick(shared.now()));
        let _ = shared.events.send(None);
        let n = r.config().stages.len();
        (
            r.records().to_vec(),
            (0..n)
                .filter_map(|i| r.strategy(i).map(|s| s.global()))
                .collect(),
            r.ignored_results(),
            r.is_done(),
        )
    };
    let _ = ticker.await;
    let written = tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .context("joining the output writer")?;
    served.context("gRPC server")?;
    match written {
        Ok(r) => r?,
        Err(_) => bail!("output writer panicked"),
    }
    Ok(RunSummary {
        run_id: cfg.run_id,
        records,
        globals,
        ignored_results: ignored,
        completed,
        out_dir: cfg.out_dir,
    })
}
