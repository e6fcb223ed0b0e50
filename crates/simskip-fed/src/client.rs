//! The organisation side: connects out to the coordinator, registers, heartbeats, and runs
//! the tasks it is given on a blocking thread until the run is DONE.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde::{Deserialize, Serialize};
use simskip_data::NamedArray;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::chunk::{chunk_keys, Assembler, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES};
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{self, register_request, task_chunk};
use crate::rounds::{StageKind, TaskKind};
use crate::wire;

/// The stage a task belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    pub index: usize,
    pub name: String,
    pub kind: StageKind,
    /// FIT rounds in the stage.
    pub rounds: u32,
}

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
/// CPU-bound); an `Err` from `fit`/`evaluate` is reported to the coordinator as a failed
/// answer and the client carries on, an `Err` from `finish_stage` ends [`run_client`].
pub trait ClientWork: Send + 'static {
    /// Entity keys this client holds (FedE); the rows travel in this order. May be empty.
    fn entity_keys(&self) -> Vec<String>;
    /// Local training examples (the FedAvg weight).
    fn num_examples(&self) -> u64;
    fn fit(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> anyhow::Result<FitOutput>;
    fn evaluate(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> anyhow::Result<EvalOutput>;
    /// The stage is over: `global` holds the final global weights (FedE: this client's
    /// entity rows). Write the stage's outputs here.
    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> anyhow::Result<()>;
}

/// Client settings; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Coordinator URL, e.g. "http://coordinator.example:50051".
    pub server: String,
    /// Unique client name (re-registering under it replaces the previous session).
    pub name: String,
    /// Shared token, if the coordinator has one.
    pub token: String,
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
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:50051".into(),
            name: String::new(),
            token: String::new(),
            run_id: String::new(),
            connect_retries: 30,
            backoff_initial_ms: 200,
            backoff_max_ms: 5000,
            connect_timeout_secs: 5.0,
            heartbeat_interval_secs: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why a session ended.
enum SessionEnd {
    /// Connection trouble or unknown session: reconnect and register again.
    Reconnect(anyhow::Error),
    Fatal(anyhow::Error),
}

struct Session {
    client: CoordinatorClient<Channel>,
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

fn classify(server: &str, what: &str, s: Status) -> SessionEnd {
    let err = anyhow!("{what} at {server}: {} ({:?})", s.message(), s.code());
    if is_fatal(&s) {
        SessionEnd::Fatal(err)
    } else {
        SessionEnd::Reconnect(err)
    }
}

/// Runs the client until the coordinator says DONE. Retries (with backoff) while the
/// coordinator is unreachable, up to `connect_retries` consecutive failures; after a broken
/// connection or a forgotten session it registers again and carries on with the current
/// global model.
pub async fn run_client<W: ClientWork>(cfg: ClientConfig, work: W) -> anyhow::Result<()> {
    if cfg.name.is_empty() {
        bail!("client name must not be empty");
    }
    let keys = Arc::new(work.entity_keys());
    let num_examples = work.num_examples();
    let mut work = Some(work);
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(cfg.backoff_initial_ms.max(1));
    let max_backoff = Duration::from_millis(cfg.backoff_max_ms.max(cfg.backoff_initial_ms));
    loop {
        let session = match connect_and_register(&cfg, &keys, num_examples).await {
            Ok(s) => s,
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Reconnect(e)) => {
                failures += 1;
                if failures > cfg.connect_retries {
                    return Err(e.context(format!(
                        "could not reach the coordinator at {} after {} attempts",
                        cfg.server, failures
                    )));
                }
                tracing::warn!(client = %cfg.name, "{e:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        failures = 0;
        backoff = Duration::from_millis(cfg.backoff_initial_ms.max(1));
        tracing::info!(client = %cfg.name, session = %session.session, run_id = %session.run_id, "registered");
        match run_session(&cfg, &session, &mut work).await {
            Ok(()) => return Ok(()),
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Reconnect(e)) => {
                tracing::warn!(client = %cfg.name, "{e:#}; registering again");
                if work.is_none() {
                    bail!("the local work was lost (task panicked)");
                }
            }
        }
    }
}

async fn connect_and_register(
    cfg: &ClientConfig,
    keys: &Arc<Vec<String>>,
    num_examples: u64,
) -> Result<Session, SessionEnd> {
    let endpoint = Endpoint::from_shared(cfg.server.clone())
        .map_err(|e| SessionEnd::Fatal(anyhow!("bad server URL {:?}: {e}", cfg.server)))?
        .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_secs.max(0.001)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionEnd::Reconnect(anyhow!("cannot connect to {}: {e}", cfg.server)))?;
    let m = cfg.max_message_bytes;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(m)
        .max_encoding_message_size(m);
    let mut msgs = vec![proto::RegisterRequest {
        part: Some(register_request::Part::Header(proto::RegisterHeader {
            client_name: cfg.name.clone(),
            credentials: cfg.token.clone(),
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
    let reply = match client.register(tokio_stream::iter(msgs)).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::Unauthenticated => {
            return Err(SessionEnd::Fatal(anyhow!(
                "server at {} refused registration of {:?}: {}",
                cfg.server,
                cfg.name,
                s.message()
            )))
        }
        Err(s) => return Err(classify(&cfg.server, "registration", s)),
    };
    let chunk_bytes = match reply.chunk_bytes as usize {
        0 => cfg.chunk_bytes,
        n => n.min(cfg.chunk_bytes),
    };
    let hb = cfg
        .heartbeat_interval_secs
        .map(|s| Duration::from_secs_f64(s.max(0.01)))
        .unwrap_or(Duration::from_millis(reply.heartbeat_interval_ms.max(10)));
    Ok(Session {
        client,
        run_id: reply.run_id,
        session: reply.session_id,
        chunk_bytes,
        poll_timeout: Duration::from_millis(reply.poll_timeout_ms),
        heartbeat: hb,
    })
}

fn spawn_heartbeat(session: &Session, name: String) -> AbortOnDrop {
    let period = session.heartbeat;
    let mut client = session.client.clone();
    let req = proto::HeartbeatRequest {
        run_id: session.run_id.clone(),
        round: 0,
        session_id: session.session.clone(),
    };
    AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            match client.heartbeat(req.clone()).await {
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

struct ReceivedTask {
    header: proto::TaskHeader,
    kind: TaskKind,
    arrays: Vec<NamedArray>,
}

async fn poll(cfg: &ClientConfig, s: &Session, round: u32) -> Result<ReceivedTask, SessionEnd> {
    let mut req = tonic::Request::new(proto::PollRequest {
        run_id: s.run_id.clone(),
        round,
        session_id: s.session.clone(),
    });
    req.set_timeout(s.poll_timeout + Duration::from_secs(30));
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
            return Err(SessionEnd::Reconnect(anyhow!(
                "task stream from {} did not start with a header",
                cfg.server
            )))
        }
        Err(e) => return Err(classify(&cfg.server, "receiving a task", e)),
    };
    let kind = wire::task_kind_from_proto(header.kind)
        .ok_or_else(|| SessionEnd::Fatal(anyhow!("task without a kind from {}", cfg.server)))?;
    let mut asm = Assembler::new(&header.arrays)
        .map_err(|e| SessionEnd::Fatal(anyhow!("bad task from {}: {e}", cfg.server)))?
        .expect_run(header.run_id.clone(), header.round);
    loop {
        match stream.message().await {
            Ok(Some(proto::TaskChunk {
                part: Some(task_chunk::Part::Tensor(c)),
            })) => asm
                .push(c)
                .map_err(|e| SessionEnd::Fatal(anyhow!("bad task from {}: {e}", cfg.server)))?,
            Ok(Some(_)) => {
                return Err(SessionEnd::Fatal(anyhow!(
                    "unexpected second task header from {}",
                    cfg.server
                )))
            }
            Ok(None) => break,
            Err(e) => return Err(classify(&cfg.server, "receiving a task", e)),
        }
    }
    let arrays = asm
        .finish()
        .map_err(|e| SessionEnd::Reconnect(anyhow!("incomplete task from {}: {e}", cfg.server)))?;
    Ok(ReceivedTask {
        header,
        kind,
        arrays,
    })
}

/// Output of one task, ready to push.
struct Done {
    num_examples: u64,
    metrics: BTreeMap<String, f64>,
    error: Option<String>,
    messages_arrays: Vec<NamedArray>,
}

async fn run_session<W: ClientWork>(
    cfg: &ClientConfig,
    s: &Session,
    work: &mut Option<W>,
) -> Result<(), SessionEnd> {
    let _heartbeat = spawn_heartbeat(s, cfg.name.clone());
    let mut round = 0u32;
    loop {
        let task = poll(cfg, s, round).await?;
        let h = &task.header;
        match task.kind {
            TaskKind::Wait => continue,
            TaskKind::Done => {
                tracing::info!(client = %cfg.name, "run done");
                return Ok(());
            }
            _ => {}
        }
        round = h.round;
        let stage = StageInfo {
            index: h.stage_index as usize,
            name: h.stage_name.clone(),
            kind: wire::stage_kind_from_proto(h.stage_kind).ok_or_else(|| {
                SessionEnd::Fatal(anyhow!("task without a stage kind from {}", cfg.server))
            })?,
            rounds: h.stage_rounds,
        };
        tracing::debug!(client = %cfg.name, stage = %stage.name, round, kind = task.kind.as_str(), "task");
        let mut w = work.take().expect("work is present between tasks");
        let config = h.config.clone();
        let kind = task.kind;
        let arrays = task.arrays;
        let default_examples = w.num_examples();
        let joined = tokio::task::spawn_blocking(move || {
            let out = match kind {
                TaskKind::Fit => w.fit(&stage, round, arrays, &config).map(|o| Done {
                    num_examples: o.num_examples,
                    metrics: o.metrics,
                    error: None,
                    messages_arrays: o.arrays,
                }),
                TaskKind::Evaluate => w.evaluate(&stage, round, arrays, &config).map(|o| Done {
                    num_examples: o.num_examples,
                    metrics: o.metrics,
                    error: None,
                    messages_arrays: Vec::new(),
                }),
                _ => w.finish_stage(&stage, arrays, &config).map(|()| Done {
                    num_examples: default_examples,
                    metrics: BTreeMap::new(),
                    error: None,
                    messages_arrays: Vec::new(),
                }),
            };
            (w, out)
        })
        .await;
        let (w, out) = match joined {
            Ok(x) => x,
            Err(e) => {
                return Err(SessionEnd::Fatal(anyhow!(
                    "local {} task panicked: {e}",
                    kind.as_str()
                )))
            }
        };
        *work = Some(w);
        let mut fatal = None;
        let done = match out {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(client = %cfg.name, "local {} failed: {e:#}", kind.as_str());
                let message = format!("{e:#}");
                if kind == TaskKind::FinishStage {
                    fatal = Some(e.context(format!("finishing stage {:?}", h.stage_name)));
                }
                Done {
                    num_examples: 0,
                    metrics: BTreeMap::new(),
                    error: Some(message),
                    messages_arrays: Vec::new(),
                }
            }
        };
        let header = proto::ResultHeader {
            run_id: h.run_id.clone(),
            round: h.round,
            task_id: h.task_id.clone(),
            session_id: s.session.clone(),
            kind: wire::task_kind_to_proto(kind) as i32,
            num_examples: done.num_examples,
            metrics: done.metrics,
            arrays: Vec::new(),
            error: done.error.unwrap_or_default(),
        };
        let chunk_bytes = s.chunk_bytes;
        let arrays = done.messages_arrays;
        let messages = tokio::task::spawn_blocking(move || {
            wire::result_messages(header, &arrays, chunk_bytes)
        })
        .await
        .map_err(|e| SessionEnd::Fatal(anyhow!("encoding result: {e}")))?;
        let mut client = s.client.clone();
        match client.push_result(tokio_stream::iter(messages)).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.status != proto::ResultStatus::Accepted as i32 {
                    tracing::warn!(client = %cfg.name, round, "result not accepted: {}", r.message);
                }
            }
            Err(e) => match classify(&cfg.server, "pushing a result", e) {
                SessionEnd::Fatal(e) => return Err(SessionEnd::Fatal(e)),
                SessionEnd::Reconnect(e) => {
                    if let Some(f) = fatal {
                        return Err(SessionEnd::Fatal(f));
                    }
                    return Err(SessionEnd::Reconnect(e));
                }
            },
        }
        if let Some(f) = fatal {
            return Err(SessionEnd::Fatal(f));
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("run_id", &self.run_id)
            .field("session", &self.session)
            .finish()
    }
}
