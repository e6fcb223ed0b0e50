//! The organisation side: connects out to the coordinator, registers, heartbeats, and runs
//! the tasks it is given on a blocking thread until the run is DONE.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use simskip_data::NamedArray;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::auth::{ClientAuth, ClientCredentials};
use crate::blind::{BlindKeys, KeyBlinder};
use crate::chunk::{
    chunk_keys, payload_headers, Assembler, PayloadChunks, DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::coordinator::config::MAX_DURATION_SECS;
use crate::error::{FedError, WorkError};
use crate::params::StageParams;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{self, register_request, result_chunk, task_chunk};
use crate::secagg::{self, ClientRound, SecAggReply, SecAggTask};
use crate::telemetry::{ClientMetrics, MetricsServer};
use crate::types::{Payload, StageInfo, TaskKind, ENTITIES};
use crate::wire::{self, PolledHeader, TaskHeader};

/// What a FIT returns: the updated arrays (for FedE: "entities" `[n_keys, d]` in the order
/// of [`ClientWork::entity_keys`]), the example weight and any metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitOutput {
    pub arrays: Vec<NamedArray>,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// What an EVALUATE returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalOutput {
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// The local work of one organisation. Methods run on a blocking thread (training is
/// CPU-bound). The stage's typed parameters arrive validated in [`StageInfo::params`]. An
/// `Err` from any task is reported to the coordinator as a failed answer and the client
/// carries on; [`run_client`] then ends with an error naming every stage whose
/// `finish_stage` failed (its outputs are missing), once the run is over.
pub trait ClientWork: Send + 'static {
    /// Entity keys this client holds (FedE); the rows travel in this order. May be empty.
    fn entity_keys(&self) -> Vec<String>;
    /// Local training examples (the FedAvg weight).
    fn num_examples(&self) -> u64;
    /// The whole FedE table (`[n_keys, d]`, row-major, in the order of
    /// [`ClientWork::entity_keys`]) this client kept for `stage` before a restart of its
    /// process, if any: the rows a stage's row selection leaves at home start from it rather
    /// than from the stage's initial draw.
    fn kept_rows(&self, _stage: &StageInfo) -> Option<Vec<f32>> {
        None
    }
    fn fit(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError>;
    fn evaluate(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError>;
    /// The stage is over: `global` holds the final global weights (FedE: this client's
    /// entity rows). Write the stage's outputs here.
    fn finish_stage(&mut self, stage: &StageInfo, global: Vec<NamedArray>)
        -> Result<(), WorkError>;
}

/// Client settings; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Coordinator URL, e.g. "https://coordinator.example:50051" (`http://` only with
    /// `auth.mode = "insecure"`).
    pub server: String,
    /// The organisation's name. With mutual TLS it comes from the certificate and may be left
    /// empty (if set, it must agree).
    pub name: String,
    /// How this organisation proves its name (`[client.auth]`): mutual TLS by default.
    pub auth: ClientAuth,
    /// Run to join; empty: whichever run the coordinator is running.
    pub run_id: String,
    /// Consecutive failed attempts to reach the coordinator before giving up.
    pub connect_retries: u32,
    /// First retry delay; doubles up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub connect_timeout_secs: f64,
    /// Heartbeat period; `None`: the one the coordinator asks for.
    pub heartbeat_interval_secs: Option<f64>,
    /// Largest tensor chunk sent (the coordinator's preference wins when smaller).
    pub chunk_bytes: usize,
    /// gRPC max decoding/encoding message size.
    pub max_message_bytes: usize,
    /// Address of this client's Prometheus endpoint (`GET /metrics`), e.g. "127.0.0.1:9091";
    /// port 0 picks a free port. `None`: no metrics endpoint (the organisation then accepts
    /// no connection at all).
    pub metrics_listen: Option<String>,
    /// Where to write the metrics endpoint's bound address, once listening.
    pub metrics_address_file: Option<PathBuf>,
    /// Register HMAC-SHA256(federation secret, name) instead of each entity name
    /// (`[client.blind_keys]`, see [`crate::blind`]). Every organisation of the federation
    /// must use the same secret, and the coordinator must never have it.
    pub blind_keys: Option<BlindKeys>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            server: "https://127.0.0.1:50051".into(),
            name: String::new(),
            auth: ClientAuth::default(),
            run_id: String::new(),
            connect_retries: 30,
            backoff_initial_ms: 200,
            backoff_max_ms: 5000,
            connect_timeout_secs: 5.0,
            heartbeat_interval_secs: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            metrics_listen: None,
            metrics_address_file: None,
            blind_keys: None,
        }
    }
}

impl ClientConfig {
    /// Checks every value; the error names the key (as `client.KEY`) and the value.
    pub fn validate(&self) -> Result<(), FedError> {
        let bad = |key: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(FedError::Config(format!("client.{key} = {value}: {why}")))
        };
        if Endpoint::from_shared(self.server.clone()).is_err() {
            return bad("server", &self.server, "not a URL like https://host:port");
        }
        self.auth.validate(&self.name, &self.server)?;
        if let Some(addr) = &self.metrics_listen {
            if let Err(why) = crate::telemetry::check_listen_address(addr) {
                return bad("metrics_listen", &format!("{addr:?}"), &why);
            }
        } else if let Some(path) = &self.metrics_address_file {
            return bad(
                "metrics_address_file",
                &path.display(),
                "needs client.metrics_listen",
            );
        }
        if self.chunk_bytes < 4
            || self.chunk_bytes.saturating_add(64 << 10) > self.max_message_bytes
        {
            return bad(
                "chunk_bytes",
                &self.chunk_bytes,
                &format!(
                    "must be at least 4 and, with 64 KiB of framing, fit max_message_bytes ({})",
                    self.max_message_bytes
                ),
            );
        }
        if self.backoff_initial_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            return bad(
                "backoff_initial_ms",
                &self.backoff_initial_ms,
                &format!("must be in 1..=backoff_max_ms ({})", self.backoff_max_ms),
            );
        }
        let durations = [
            ("connect_timeout_secs", Some(self.connect_timeout_secs)),
            ("heartbeat_interval_secs", self.heartbeat_interval_secs),
        ];
        for (key, v) in durations {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0 && v <= MAX_DURATION_SECS) {
                    return bad(
                        key,
                        &format!("{v:?}"),
                        &format!("must be seconds in (0, {MAX_DURATION_SECS}]"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// How a client's part in a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEnd {
    /// The coordinator said the run is DONE.
    Done,
    /// The coordinator is shutting down on request (SIGTERM/SIGINT): the run is not over
    /// and can be resumed by restarting the coordinator, then this client.
    Stopped,
}

/// Why a session ended.
enum SessionEnd {
    /// Connection trouble or unknown session: reconnect and register again.
    Reconnect(String),
    Fatal(FedError),
}

struct Session {
    client: CoordinatorClient<Channel>,
    credentials: Arc<ClientCredentials>,
    run_id: String,
    session: String,
    chunk_bytes: usize,
    poll_timeout: Duration,
    heartbeat: Duration,
}

/// Aborts the heartbeat task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_fatal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::Unimplemented
    )
}

fn classify(server: &str, what: &'static str, s: Status) -> SessionEnd {
    if is_fatal(&s) {
        SessionEnd::Fatal(FedError::Refused {
            server: server.to_string(),
            what,
            message: format!("{} ({:?})", s.message(), s.code()),
        })
    } else {
        SessionEnd::Reconnect(format!(
            "{what} at {server}: {} ({:?})",
            s.message(),
            s.code()
        ))
    }
}

fn protocol(server: &str, message: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Fatal(FedError::Protocol {
        server: server.to_string(),
        message: message.to_string(),
    })
}

/// Runs the client until the coordinator says DONE. Retries (with backoff) while the
/// coordinator is unreachable, up to `connect_retries` consecutive failures; after a broken
/// connection or a forgotten session it registers again and carries on with the current
/// global model. With `cfg.metrics_listen` set, its progress is served there as Prometheus
/// metrics (`GET /metrics`) until it returns.
pub async fn run_client<W: ClientWork>(
    mut cfg: ClientConfig,
    work: W,
) -> Result<ClientEnd, FedError> {
    cfg.validate()?;
    // Certificates and tokens are read once, before the first connection; the name in use
    // from here on is the one they prove.
    let credentials = Arc::new(cfg.auth.load(&cfg.name, &cfg.server)?);
    cfg.name = credentials.name.clone();
    let metrics = ClientMetrics::new();
    let server = match &cfg.metrics_listen {
        Some(addr) => Some(
            MetricsServer::start(
                addr,
                cfg.metrics_address_file.as_deref(),
                metrics.registry(),
                &format!("client {}", cfg.name),
            )
            .await?,
        ),
        None => None,
    };
    let outcome = drive(&cfg, &credentials, work, &metrics).await;
    if let Some(server) = server {
        server.stop().await;
    }
    outcome
}

async fn drive<W: ClientWork>(
    cfg: &ClientConfig,
    credentials: &Arc<ClientCredentials>,
    work: W,
    metrics: &ClientMetrics,
) -> Result<ClientEnd, FedError> {
    // Blinded before anything leaves: the coordinator sees only HMACs of the names.
    let keys = match &cfg.blind_keys {
        Some(b) => KeyBlinder::from_file(&b.secret_file)?.blind_all(&work.entity_keys()),
        None => work.entity_keys(),
    };
    let keys = Arc::new(keys);
    let mut home = HomeRows::new(keys.len());
    let num_examples = work.num_examples();
    let mut work = Some(work);
    let mut failures = 0u32;
    let mut unfinished = Vec::new();
    let mut backoff = Duration::from_millis(cfg.backoff_initial_ms);
    let max_backoff = Duration::from_millis(cfg.backoff_max_ms);
    loop {
        let session = match connect_and_register(cfg, credentials, &keys, num_examples).await {
            Ok(s) => s,
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Reconnect(e)) => {
                failures += 1;
                if failures > cfg.connect_retries {
                    return Err(FedError::Unreachable {
                        server: cfg.server.clone(),
                        attempts: failures,
                        last: e,
                    });
                }
                tracing::warn!(client = %cfg.name, "{e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        failures = 0;
        backoff = Duration::from_millis(cfg.backoff_initial_ms);
        tracing::info!(client = %cfg.name, run_id = %session.run_id, "registered");
        metrics.registered();
        match run_session(
            cfg,
            &session,
            &mut work,
            &mut unfinished,
            metrics,
            &mut home,
        )
        .await
        {
            Ok(ClientEnd::Stopped) => {
                tracing::info!(
                    client = %cfg.name,
                    "the coordinator stopped the run on request; it can be resumed"
                );
                return Ok(ClientEnd::Stopped);
            }
            Ok(ClientEnd::Done) if unfinished.is_empty() => return Ok(ClientEnd::Done),
            Ok(ClientEnd::Done) => {
                return Err(FedError::Work {
                    context: format!(
                        "the run is over, but {} stage(s) did not finish here",
                        unfinished.len()
                    ),
                    source: unfinished.join("; ").into(),
                })
            }
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Reconnect(e)) => {
                tracing::warn!(client = %cfg.name, "{e}; registering again");
            }
        }
    }
}

async fn connect_and_register(
    cfg: &ClientConfig,
    credentials: &Arc<ClientCredentials>,
    keys: &Arc<Vec<String>>,
    num_examples: u64,
) -> Result<Session, SessionEnd> {
    let endpoint = credentials
        .endpoint(&cfg.server)
        .map_err(SessionEnd::Fatal)?
        .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_secs))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionEnd::Reconnect(format!("cannot connect to {}: {e}", cfg.server)))?;
    let m = cfg.max_message_bytes;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(m)
        .max_encoding_message_size(m);
    let mut msgs = vec![proto::RegisterRequest {
        part: Some(register_request::Part::Header(proto::RegisterHeader {
            client_name: cfg.name.clone(),
            // Credentials travel in the TLS handshake or the call's metadata, never here.
            credentials: String::new(),
            num_examples,
            num_entity_keys: keys.len() as u64,
            run_id: cfg.run_id.clone(),
            round: 0,
        })),
    }];
    msgs.extend(
        chunk_keys(keys, cfg.chunk_bytes)
            .into_iter()
            .map(|k| proto::RegisterRequest {
                part: Some(register_request::Part::EntityKeys(proto::EntityKeys {
                    keys: k,
                })),
            }),
    );
    let mut request = tonic::Request::new(tokio_stream::iter(msgs));
    credentials.authorize(&mut request);
    // An address that accepts but never answers must not hang the client.
    request.set_timeout(CALL_DEADLINE);
    let reply = client
        .register(request)
        .await
        .map_err(|s| classify(&cfg.server, "registration", s))?
        .into_inner();
    let reply = wire::register_reply_from_proto(reply).map_err(|e| protocol(&cfg.server, e))?;
    let chunk_bytes = match reply.chunk_bytes {
        0 => cfg.chunk_bytes,
        n => n.clamp(4, cfg.chunk_bytes),
    };
    let heartbeat = cfg
        .heartbeat_interval_secs
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_millis(
            reply.heartbeat_interval_ms.clamp(10, 3_600_000),
        ));
    Ok(Session {
        client,
        credentials: credentials.clone(),
        run_id: reply.run_id,
        session: reply.session,
        chunk_bytes,
        poll_timeout: Duration::from_millis(reply.poll_timeout_ms.min(3_600_000)),
        heartbeat,
    })
}

/// Deadline of a call that carries no large payload (register, push acknowledgement).
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// Heartbeats every period; notifies `stop` (once) when the coordinator says it is stopping.
fn spawn_heartbeat(
    session: &Session,
    name: String,
    stop: tokio::sync::watch::Sender<bool>,
) -> AbortOnDrop {
    let period = session.heartbeat;
    let mut client = session.client.clone();
    let credentials = session.credentials.clone();
    let req = proto::HeartbeatRequest {
        run_id: session.run_id.clone(),
        round: 0,
        session_id: session.session.clone(),
    };
    AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let mut call = tonic::Request::new(req.clone());
            credentials.authorize(&mut call);
            call.set_timeout(period.max(Duration::from_secs(5)));
            match client.heartbeat(call).await {
                Ok(r) if r.get_ref().stopping => {
                    let _ = stop.send(true);
                    break;
                }
                Ok(r) if !r.get_ref().known => {
                    tracing::warn!(client = %name, "coordinator forgot our session");
                    break;
                }
                Ok(_) => {}
                Err(s) => tracing::debug!(client = %name, "heartbeat failed: {}", s.message()),
            }
        }
    }))
}

enum Polled {
    Wait,
    Done,
    Stop,
    Task(TaskHeader, Vec<NamedArray>),
    /// A task this client cannot read or whose payload is malformed: it is answered as a
    /// failure (so the round does not wait for it) and the client carries on.
    Refused(proto::ResultHeader),
}

/// The failure answer to the task `h` announced, without reading anything else of it.
fn refusal(h: &proto::TaskHeader, session: &str, reason: String) -> proto::ResultHeader {
    proto::ResultHeader {
        run_id: h.run_id.clone(),
        round: h.round,
        task_id: h.task_id.clone(),
        session_id: session.to_string(),
        kind: h.kind,
        error: reason,
        ..Default::default()
    }
}

async fn poll(
    cfg: &ClientConfig,
    s: &Session,
    round: u32,
    metrics: &ClientMetrics,
) -> Result<Polled, SessionEnd> {
    let mut req = tonic::Request::new(proto::PollRequest {
        run_id: s.run_id.clone(),
        round,
        session_id: s.session.clone(),
    });
    req.set_timeout(s.poll_timeout + Duration::from_secs(30));
    s.credentials.authorize(&mut req);
    let mut client = s.client.clone();
    let mut stream = client
        .poll_task(req)
        .await
        .map_err(|e| classify(&cfg.server, "polling for a task", e))?
        .into_inner();
    let header = match stream.message().await {
        Ok(Some(proto::TaskChunk {
            part: Some(task_chunk::Part::Header(h)),
        })) => h,
        Ok(_) => {
            return Err(protocol(
                &cfg.server,
                "a task stream did not start with a header",
            ))
        }
        Err(e) => return Err(classify(&cfg.server, "receiving a task", e)),
    };
    let task = match wire::task_header_from_proto(&header) {
        Ok(PolledHeader::Wait) => return Ok(Polled::Wait),
        Ok(PolledHeader::Done) => return Ok(Polled::Done),
        Ok(PolledHeader::Stop) => return Ok(Polled::Stop),
        Ok(PolledHeader::Task(t)) => t,
        // A task this client cannot read is refused, not trained on.
        Err(e) if !header.task_id.is_empty() => {
            let reason = format!("task refused: {e}");
            tracing::warn!(server = %cfg.server, round = header.round, "{reason}");
            return Ok(Polled::Refused(refusal(&header, &s.session, reason)));
        }
        Err(e) => return Err(protocol(&cfg.server, format!("task refused: {e}"))),
    };
    let mut asm = match Assembler::new(&header.arrays) {
        Ok(asm) => asm.expect_run(task.run_id.clone(), task.round),
        Err(e) => {
            let reason = format!("bad task payload: {e}");
            tracing::warn!(server = %cfg.server, round = task.round, "{reason}");
            return Ok(Polled::Refused(refusal(&header, &s.session, reason)));
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(proto::TaskChunk {
                part: Some(task_chunk::Part::Tensor(c)),
            })) => {
                metrics.add_bytes_received(c.data.len());
                if let Err(e) = asm.push(c) {
                    let reason = format!("bad task payload: {e}");
                    tracing::warn!(server = %cfg.server, round = task.round, "{reason}");
                    return Ok(Polled::Refused(refusal(&header, &s.session, reason)));
                }
            }
            Ok(Some(_)) => {
                let reason = "unexpected second task header".to_string();
                return Ok(Polled::Refused(refusal(&header, &s.session, reason)));
            }
            Ok(None) => break,
            Err(e) => return Err(classify(&cfg.server, "receiving a task", e)),
        }
    }
    let arrays = asm
        .finish()
        .map_err(|e| SessionEnd::Reconnect(format!("incomplete task from {}: {e}", cfg.server)))?;
    Ok(Polled::Task(task, arrays))
}

/// A task's outcome, ready to push.
struct Answer {
    num_examples: u64,
    metrics: BTreeMap<String, f64>,
    arrays: Vec<NamedArray>,
    error: Option<String>,
    /// Secure aggregation: the answer to the task's protocol step.
    secagg: Option<SecAggReply>,
}

/// After training in a secure round: the update stays here, and the answer carries the
/// training's examples and metrics with the organisation's fresh public keys instead.
fn secure_begin(
    secure: &mut SecureState,
    task: &TaskHeader,
    begin: &SecAggTask,
    layout: &[(String, Vec<usize>)],
    answer: Answer,
) -> Answer {
    *secure = None;
    if answer.error.is_some() {
        return answer;
    }
    let context = secagg::context(&task.run_id, task.stage.index, task.round);
    match ClientRound::begin(begin, &context, layout, &answer.arrays, answer.num_examples) {
        Ok((state, keys)) => {
            *secure = Some(((task.stage.index, task.round), state));
            Answer {
                arrays: Vec::new(),
                secagg: Some(keys),
                ..answer
            }
        }
        Err(e) => Answer {
            num_examples: 0,
            metrics: BTreeMap::new(),
            arrays: Vec::new(),
            error: Some(format!("secure aggregation: {e}")),
            secagg: None,
        },
    }
}

/// This organisation's part in the secure FIT round under way: (stage, round) and state.
type SecureState = Option<((usize, u32), ClientRound)>;

/// Answers a secure-aggregation step after the first (no local work: protocol only).
fn secure_step(secure: &mut SecureState, task: &TaskHeader, step: &SecAggTask) -> Answer {
    let reply = match secure {
        Some((at, round)) if *at == (task.stage.index, task.round) => {
            round.step(step).map_err(|e| e.to_string())
        }
        _ => Err("no secure aggregation of this round under way here".to_string()),
    };
    let (secagg, error) = match reply {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(format!("secure aggregation: {e}"))),
    };
    Answer {
        num_examples: 0,
        metrics: BTreeMap::new(),
        arrays: Vec::new(),
        error,
        secagg,
    }
}

async fn run_session<W: ClientWork>(
    cfg: &ClientConfig,
    s: &Session,
    work: &mut Option<W>,
    unfinished: &mut Vec<String>,
    metrics: &ClientMetrics,
    home: &mut HomeRows,
) -> Result<ClientEnd, SessionEnd> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let _heartbeat = spawn_heartbeat(s, cfg.name.clone(), stop_tx);
    // A stop heard by the heartbeat ends the session even during local work (which is left
    // to finish on its thread: the run will redo that round when it resumes).
    let end = tokio::select! {
        biased;
        // (An `Err`: the heartbeat ended for another reason, e.g. a forgotten session; the
        // session loop finds out by itself.)
        Ok(_) = stop_rx.wait_for(|stop| *stop) => return Ok(ClientEnd::Stopped),
        end = session_loop(cfg, s, work, unfinished, metrics, home) => end,
    };
    match end {
        // The coordinator closed the connection after saying it stops.
        Err(SessionEnd::Reconnect(_)) if *stop_rx.borrow() => Ok(ClientEnd::Stopped),
        end => end,
    }
}

async fn session_loop<W: ClientWork>(
    cfg: &ClientConfig,
    s: &Session,
    work: &mut Option<W>,
    unfinished: &mut Vec<String>,
    metrics: &ClientMetrics,
    home: &mut HomeRows,
) -> Result<ClientEnd, SessionEnd> {
    let mut round = 0u32;
    let mut secure: SecureState = None;
    loop {
        let (task, arrays) = match poll(cfg, s, round, metrics).await? {
            Polled::Wait => continue,
            Polled::Done => {
                tracing::info!(client = %cfg.name, "run done");
                return Ok(ClientEnd::Done);
            }
            Polled::Stop => return Ok(ClientEnd::Stopped),
            Polled::Task(t, a) => (t, a),
            Polled::Refused(header) => {
                push_header_only(cfg, s, header).await?;
                continue;
            }
        };
        round = task.round;
        tracing::debug!(client = %cfg.name, stage = %task.stage.name, round, kind = task.kind.as_str(), "task");
        if let Some(step) = task
            .secagg
            .as_ref()
            .filter(|s| !matches!(s, SecAggTask::Begin { .. }))
        {
            let answer = secure_step(&mut secure, &task, step);
            if answer.error.is_some() || matches!(step, SecAggTask::Unmask(_)) {
                secure = None;
            }
            push(cfg, s, &task, answer, metrics).await?;
            continue;
        }
        // A secure round starts: the update will be masked against the global model's layout.
        let layout: Vec<(String, Vec<usize>)> = match task.secagg {
            Some(_) => arrays
                .iter()
                .map(|a| (a.name.clone(), a.shape.clone()))
                .collect(),
            None => Vec::new(),
        };
        // With DP, the update is measured against what the task carried: the global model,
        // or exactly the FedE rows that go back.
        let received =
            (task.kind == TaskKind::Fit && task.stage.privacy.is_some()).then(|| arrays.clone());
        // FedE with a row selection: the work sees its whole table (the rows that stayed home
        // are its own), and only the selected rows go back.
        let kept = || work.as_ref().and_then(|w| w.kept_rows(&task.stage));
        let arrays = match home.expand(&task, arrays, kept) {
            Ok(a) => a,
            Err(reason) => {
                tracing::warn!(client = %cfg.name, round, "task refused: {reason}");
                let header = wire::result_header(
                    &task,
                    &s.session,
                    0,
                    BTreeMap::new(),
                    Some(format!("task refused: {reason}")),
                );
                push_header_only(cfg, s, header).await?;
                continue;
            }
        };
        let Some(mut w) = work.take() else {
            return Err(SessionEnd::Fatal(FedError::Work {
                context: "the local work".into(),
                source: "was lost when an earlier task panicked".into(),
            }));
        };
        let (kind, stage) = (task.kind, task.stage.clone());
        let default_examples = w.num_examples();
        metrics.task_started(kind, task.stage.index, round);
        let t0 = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let out = match kind {
                TaskKind::Fit => w.fit(&stage, round, arrays).map(|o| Answer {
                    num_examples: o.num_examples,
                    metrics: o.metrics,
                    arrays: o.arrays,
                    error: None,
                    secagg: None,
                }),
                TaskKind::Evaluate => w.evaluate(&stage, round, arrays).map(|o| Answer {
                    num_examples: o.num_examples,
                    metrics: o.metrics,
                    arrays: Vec::new(),
                    error: None,
                    secagg: None,
                }),
                TaskKind::FinishStage => w.finish_stage(&stage, arrays).map(|()| Answer {
                    num_examples: default_examples,
                    metrics: BTreeMap::new(),
                    arrays: Vec::new(),
                    error: None,
                    secagg: None,
                }),
            };
            (w, out)
        })
        .await;
        let (w, out) = joined.map_err(|e| {
            SessionEnd::Fatal(FedError::Work {
                context: format!("local {} task", kind.as_str()),
                source: format!("panicked: {e}").into(),
            })
        })?;
        *work = Some(w);
        metrics.task_ended(
            kind,
            &task.stage.name,
            t0.elapsed(),
            out.as_ref().ok().map(|a| &a.metrics),
        );
        let answer = match out {
            Ok(mut a) => {
                if kind == TaskKind::Fit {
                    a.arrays = home.keep_and_select(&task, a.arrays);
                }
                match (&task.stage.privacy, &received) {
                    (Some(dp), Some(received)) => privatise(&task, dp, received, a),
                    _ => a,
                }
            }
            Err(e) => {
                tracing::error!(client = %cfg.name, "local {} failed: {e}", kind.as_str());
                let message = e.to_string();
                if kind == TaskKind::FinishStage {
                    // The run goes on (a later stage may still succeed); the client reports
                    // the stages it could not finish when the run is over.
                    unfinished.push(format!("{}: {message}", task.stage.name));
                }
                Answer {
                    num_examples: 0,
                    metrics: BTreeMap::new(),
                    arrays: Vec::new(),
                    error: Some(message),
                    secagg: None,
                }
            }
        };
        let answer = match &task.secagg {
            Some(begin) => secure_begin(&mut secure, &task, begin, &layout, answer),
            None => answer,
        };
        push(cfg, s, &task, answer, metrics).await?;
    }
}

/// Clips and noises a FIT answer before it leaves (the organisation's own randomness, which
/// the coordinator cannot predict). An upload that cannot be privatised is not sent: the
/// answer becomes an error.
fn privatise(
    task: &TaskHeader,
    dp: &crate::privacy::ClientDp,
    received: &[NamedArray],
    mut answer: Answer,
) -> Answer {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    match crate::privacy::privatise_upload(
        task.stage.kind(),
        dp,
        received,
        &mut answer.arrays,
        &mut rng,
    ) {
        Ok(p) => {
            answer.metrics.insert(
                DP_CLIPPED_FRACTION.to_owned(),
                p.clipped as f64 / p.updates.max(1) as f64,
            );
            answer
        }
        Err(e) => Answer {
            num_examples: 0,
            metrics: BTreeMap::new(),
            arrays: Vec::new(),
            error: Some(e.to_string()),
            secagg: None,
        },
    }
}

/// The FIT metric of a DP stage: the fraction of updates (FedAvg: the one update; FedE: the
/// rows) whose norm exceeded the clip bound, for tuning the bound.
pub const DP_CLIPPED_FRACTION: &str = "dp_clipped_fraction";

/// The organisation's whole FedE table between tasks, for stages where only some rows travel
/// (`row_selection`): the rows that stay home are the ones the work itself produced last.
struct HomeRows {
    num_keys: usize,
    /// Stage index -> its latest full `[num_keys, dim]` rows.
    tables: BTreeMap<usize, Vec<f32>>,
}

impl HomeRows {
    fn new(num_keys: usize) -> Self {
        Self {
            num_keys,
            tables: BTreeMap::new(),
        }
    }

    /// The task's arrays with the selected rows placed into the full table. Before the
    /// work's first rows of the stage, the rows that stay home are those the work `kept`
    /// before a restart, or else start as the coordinator's would: uniform in the stage's
    /// initial bound, seeded by its seed.
    fn expand(
        &mut self,
        task: &TaskHeader,
        mut arrays: Vec<NamedArray>,
        kept: impl FnOnce() -> Option<Vec<f32>>,
    ) -> Result<Vec<NamedArray>, String> {
        let (Some(positions), StageParams::FedE(cfg)) = (&task.rows, &task.stage.params) else {
            return Ok(arrays);
        };
        let dim = cfg.dim;
        if positions
            .last()
            .is_some_and(|&p| p as usize >= self.num_keys)
        {
            return Err(format!(
                "row_selection names position {} of {} rows",
                positions.last().unwrap_or(&0),
                self.num_keys
            ));
        }
        let Some(rows) = arrays.iter_mut().find(|a| a.name == ENTITIES) else {
            return Err(format!("no '{ENTITIES}' array"));
        };
        if rows.shape != [positions.len(), dim] || rows.data.len() != positions.len() * dim {
            return Err(format!(
                "'{ENTITIES}' of shape {:?} for {} selected rows of width {dim}",
                rows.shape,
                positions.len()
            ));
        }
        let num_keys = self.num_keys;
        let full = self
            .tables
            .entry(task.stage.index)
            .or_insert_with(|| {
                use rand::{Rng, SeedableRng};
                if let Some(rows) = kept().filter(|r| r.len() == num_keys * dim) {
                    return rows;
                }
                let b = simskip_kge::init_bound(cfg);
                let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
                (0..num_keys * dim)
                    .map(|_| rng.random_range(-b..b))
                    .collect()
            })
            .clone();
        let mut full = full;
        for (i, &p) in positions.iter().enumerate() {
            let p = p as usize;
            full[p * dim..(p + 1) * dim].copy_from_slice(&rows.data[i * dim..(i + 1) * dim]);
        }
        *rows = NamedArray::new(ENTITIES, vec![self.num_keys, dim], full);
        Ok(arrays)
    }

    /// After a FIT: remembers the work's full rows and keeps only the selected ones to send.
    fn keep_and_select(
        &mut self,
        task: &TaskHeader,
        mut arrays: Vec<NamedArray>,
    ) -> Vec<NamedArray> {
        let (Some(positions), StageParams::FedE(cfg)) = (&task.rows, &task.stage.params) else {
            return arrays;
        };
        let dim = cfg.dim;
        if let Some(rows) = arrays.iter_mut().find(|a| a.name == ENTITIES) {
            if rows.shape == [self.num_keys, dim] && rows.data.len() == self.num_keys * dim {
                self.tables.insert(task.stage.index, rows.data.clone());
                let data = positions
                    .iter()
                    .flat_map(|&p| {
                        rows.data[p as usize * dim..(p as usize + 1) * dim]
                            .iter()
                            .copied()
                    })
                    .collect();
                *rows = NamedArray::new(ENTITIES, vec![positions.len(), dim], data);
            }
            // Any other shape goes as it is, and the coordinator refuses it.
        }
        arrays
    }
}

/// Answers a task with a header alone (a refusal).
async fn push_header_only(
    cfg: &ClientConfig,
    s: &Session,
    header: proto::ResultHeader,
) -> Result<(), SessionEnd> {
    let first = proto::ResultChunk {
        part: Some(result_chunk::Part::Header(header)),
    };
    let mut request = tonic::Request::new(tokio_stream::iter(std::iter::once(first)));
    s.credentials.authorize(&mut request);
    request.set_timeout(CALL_DEADLINE);
    let mut client = s.client.clone();
    match client.push_result(request).await {
        Ok(_) => Ok(()),
        Err(e) => Err(classify(&cfg.server, "pushing a refusal", e)),
    }
}

/// Streams an answer: header, then its chunks, built one by one as they are sent.
async fn push(
    cfg: &ClientConfig,
    s: &Session,
    task: &TaskHeader,
    answer: Answer,
    metrics: &ClientMetrics,
) -> Result<(), SessionEnd> {
    let payload = Payload::Arrays(Arc::from(answer.arrays));
    let mut header = wire::result_header(
        task,
        &s.session,
        answer.num_examples,
        answer.metrics,
        answer.error,
    );
    header.secagg = answer.secagg.as_ref().map(wire::secagg_reply_to_proto);
    header.arrays = payload_headers(&payload);
    let first = proto::ResultChunk {
        part: Some(result_chunk::Part::Header(header)),
    };
    // A masked input streams after the header, like arrays (it can be far larger than one
    // message).
    let masked = match answer.secagg {
        Some(SecAggReply::Masked(m)) => m.values,
        _ => Vec::new(),
    };
    let sent = metrics.bytes_sent();
    let sent_masked = sent.clone();
    let chunks = PayloadChunks::new(payload, s.chunk_bytes, &task.run_id, task.round)
        .map(move |c| {
            sent.inc_by(c.data.len() as u64);
            proto::ResultChunk {
                part: Some(result_chunk::Part::Tensor(c)),
            }
        })
        .chain(wire::masked_chunks(masked, s.chunk_bytes).map(move |c| {
            sent_masked.inc_by(c.values.len() as u64 * 8);
            proto::ResultChunk {
                part: Some(result_chunk::Part::Masked(c)),
            }
        }));
    let mut client = s.client.clone();
    let mut request = tonic::Request::new(tokio_stream::iter(std::iter::once(first).chain(chunks)));
    s.credentials.authorize(&mut request);
    match client.push_result(request).await {
        Ok(r) => {
            let r = r.into_inner();
            if r.status != proto::ResultStatus::Accepted as i32 {
                metrics.result_not_accepted();
                tracing::warn!(client = %cfg.name, round = task.round, "result not accepted: {}", r.message);
            }
            Ok(())
        }
        Err(e) => Err(classify(&cfg.server, "pushing a result", e)),
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("run_id", &self.run_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fede_task(rows: Option<Vec<u32>>) -> TaskHeader {
        TaskHeader {
            run_id: "r".into(),
            task_id: "t".into(),
            round: 1,
            kind: TaskKind::Fit,
            rows,
            stage: StageInfo {
                index: 0,
                name: "fede".into(),
                rounds: 1,
                params: StageParams::defaults(crate::types::StageKind::FedE, 2),
                privacy: None,
            },
            secagg: None,
        }
    }

    #[test]
    fn home_rows_fill_the_unselected_rows_and_send_back_only_the_selected() {
        let mut home = HomeRows::new(3);
        // A coordinator's selection that the organisation cannot use is refused, not trained.
        let bad = [
            (vec![3], vec![1, 2]),    // position out of range
            (vec![0, 2], vec![1, 2]), // fewer rows than positions
        ];
        for (pos, shape) in bad {
            let rows = NamedArray::new(ENTITIES, shape.clone(), vec![0.0; shape.iter().product()]);
            assert!(home
                .expand(&fede_task(Some(pos)), vec![rows], || None)
                .is_err());
        }
        // Rows 0 and 2 arrive; row 1 starts inside the stage's initial bound.
        let task = fede_task(Some(vec![0, 2]));
        let rows = NamedArray::new(ENTITIES, vec![2, 2], vec![5.0, 5.0, 7.0, 7.0]);
        let full = home.expand(&task, vec![rows], || None).unwrap();
        assert_eq!(full[0].shape, vec![3, 2]);
        assert_eq!(&full[0].data[0..2], &[5.0, 5.0]);
        assert_eq!(&full[0].data[4..6], &[7.0, 7.0]);
        let StageParams::FedE(cfg) = &task.stage.params else {
            unreachable!()
        };
        let b = simskip_kge::init_bound(cfg);
        assert!(full[0].data[2..4].iter().all(|v| v.abs() <= b));
        // After the work's FIT: only rows 0 and 2 go back; row 1 is remembered at home.
        let trained = vec![NamedArray::new(
            ENTITIES,
            vec![3, 2],
            vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0],
        )];
        let sent = home.keep_and_select(&task, trained);
        assert_eq!(sent[0].shape, vec![2, 2]);
        assert_eq!(sent[0].data, vec![1.0, 1.0, 3.0, 3.0]);
        let next = home
            .expand(
                &task,
                vec![NamedArray::new(ENTITIES, vec![2, 2], vec![9.0; 4])],
                || panic!("the table of the stage is known"),
            )
            .unwrap();
        assert_eq!(next[0].data, vec![9.0, 9.0, 2.0, 2.0, 9.0, 9.0]);
        // Without a selection, nothing changes.
        let all = vec![NamedArray::new(ENTITIES, vec![3, 2], vec![0.5; 6])];
        assert_eq!(
            home.expand(&fede_task(None), all.clone(), || None).unwrap(),
            all
        );
    }

    #[test]
    fn home_rows_after_a_restart_start_from_the_kept_table() {
        let task = fede_task(Some(vec![1]));
        let arrived = || vec![NamedArray::new(ENTITIES, vec![1, 2], vec![5.0, 5.0])];
        // The table the work kept before its restart fills the rows that stay home.
        let mut home = HomeRows::new(3);
        let kept = vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0];
        let full = home
            .expand(&task, arrived(), || Some(kept.clone()))
            .unwrap();
        assert_eq!(full[0].data, vec![1.0, 1.0, 5.0, 5.0, 3.0, 3.0]);
        // A kept table of another size is not used: the initial draw is.
        let mut home = HomeRows::new(3);
        let full = home
            .expand(&task, arrived(), || Some(vec![1.0; 4]))
            .unwrap();
        assert_ne!(&full[0].data[0..2], &[1.0, 1.0]);
        assert_eq!(&full[0].data[2..4], &[5.0, 5.0]);
    }
}
