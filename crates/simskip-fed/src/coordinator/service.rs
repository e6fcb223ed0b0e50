//! The coordinator's gRPC service: a thin adapter between tonic and the [`Rounds`] state
//! machine. It converts through [`crate::wire`], holds the state machine's lock only for
//! the state machine's own calls, and runs aggregation on the blocking pool, outside the lock.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Gatekeeper};
use crate::chunk::{payload_headers, Assembler, PayloadChunks};
use crate::coordinator::rounds::{Event, IgnoreReason, Poll, ResultOutcome, Rounds, RoundsError};
use crate::coordinator::sink::log_event;
use crate::proto::coordinator_server::Coordinator;
use crate::proto::{self, register_request, result_chunk, task_chunk};
use crate::secagg::SecAggReply;
use crate::telemetry::CoordinatorMetrics;
use crate::wire;

/// What every call shares.
pub(crate) struct Shared {
    pub(crate) rounds: Mutex<Rounds>,
    pub(crate) notify: Notify,
    pub(crate) start: Instant,
    pub(crate) run_id: String,
    /// Names the caller of every call.
    pub(crate) gatekeeper: Gatekeeper,
    pub(crate) chunk_bytes: usize,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) poll_timeout: Duration,
    pub(crate) max_entity_keys: u64,
    pub(crate) closing: AtomicBool,
    /// A shutdown was requested: polls answer STOP and heartbeats say `stopping`.
    pub(crate) stopping: AtomicBool,
    /// The clients told to stop so far (by a poll or a heartbeat).
    pub(crate) told_stop: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Nanoseconds spent encoding task chunks since the last round accounting.
    pub(crate) encode_nanos: AtomicU64,
    /// To the sink's thread; `None` stops it.
    pub(crate) events: std::sync::mpsc::Sender<Option<Event>>,
    pub(crate) telemetry: CoordinatorMetrics,
}

impl Shared {
    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Notes that the client holding `session` has been told to stop.
    fn told_to_stop(&self, r: &Rounds, session: &str) {
        if let Some(info) = r.client_by_session(session) {
            let mut told = self.told_stop.lock().unwrap_or_else(|e| e.into_inner());
            told.insert(info.name.clone());
        }
    }

    /// Call with the state machine locked, after any call that may have changed it: logs and
    /// forwards what happened (in order, since the lock is held), wakes held polls, and hands
    /// a pending aggregation to the blocking pool.
    pub(crate) fn advance(self: &Arc<Self>, r: &mut Rounds) {
        r.add_overhead(self.encode_nanos.swap(0, Ordering::Relaxed) as f64 * 1e-9);
        let events = r.tick(self.now());
        for e in events {
            log_event(&e);
            self.telemetry.observe(&e);
            // The sink only goes away when the server stops.
            let _ = self.events.send(Some(e));
        }
        self.telemetry
            .observe_state(r.num_alive(), r.ignored_results());
        if let Some(job) = r.take_aggregation() {
            let shared = self.clone();
            tokio::spawn(async move {
                let done = tokio::task::spawn_blocking(move || {
                    let t0 = Instant::now();
                    let done = job.run();
                    (done, t0.elapsed().as_secs_f64())
                })
                .await;
                let mut r = shared.rounds.lock().await;
                match done {
                    Ok((done, secs)) => r.on_aggregated(done, secs),
                    // A panicking strategy is a bug; the run cannot go on without its state.
                    Err(e) => {
                        tracing::error!("aggregation panicked: {e}");
                        shared.closing.store(true, Ordering::SeqCst);
                    }
                }
                shared.advance(&mut r);
            });
        }
        self.notify.notify_waiters();
    }
}

pub(crate) struct Service {
    pub(crate) shared: Arc<Shared>,
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

/// The longest entity key a registration may carry (HMAC-SHA256 keys are 64 hex characters;
/// Freebase and WordNet names are far shorter).
const MAX_KEY_BYTES: usize = 1024;

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Service {
    /// The caller of `req`; a refusal is logged without anything the caller sent.
    fn identify<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.shared.gatekeeper.identify(req).inspect_err(|s| {
            tracing::warn!(peer = ?req.remote_addr(), "call refused: {}", s.message());
        })
    }
}

/// A session may only be used by the organisation that registered it: another one's session
/// is as unknown as a made-up one (and a session id alone is worth nothing to a thief who
/// cannot also present the owner's credentials).
fn owned_session(r: &Rounds, caller: &Caller, session: &str) -> Result<(), Status> {
    match r.client_by_session(session) {
        Some(info) if caller.owns(&info.name) => Ok(()),
        _ => Err(Status::not_found(format!(
            "unknown session {session:?}: register again"
        ))),
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<Streaming<proto::RegisterRequest>>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        // Nothing of the stream is read before the caller is known.
        let caller = self.identify(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(proto::RegisterRequest {
                part: Some(register_request::Part::Header(h)),
            }) => h,
            _ => return Err(bad_request("registration must start with a header")),
        };
        let name = self
            .shared
            .gatekeeper
            .registration_name(&caller, &header.client_name)
            .inspect_err(|s| tracing::warn!(claimed = %header.client_name, "registration refused: {}", s.message()))?;
        if header.num_entity_keys > self.shared.max_entity_keys {
            return Err(bad_request(format!(
                "{} entity keys announced; this coordinator takes at most {} per organisation",
                header.num_entity_keys, self.shared.max_entity_keys
            )));
        }
        let mut keys = Vec::with_capacity(header.num_entity_keys.min(1 << 20) as usize);
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(register_request::Part::EntityKeys(k)) => {
                    if let Some(long) = k.keys.iter().find(|k| k.len() > MAX_KEY_BYTES) {
                        return Err(bad_request(format!(
                            "an entity key of {} bytes; at most {MAX_KEY_BYTES}",
                            long.len()
                        )));
                    }
                    keys.extend(k.keys);
                    if keys.len() as u64 > header.num_entity_keys {
                        return Err(bad_request(format!(
                            "more entity keys than the {} announced",
                            header.num_entity_keys
                        )));
                    }
                }
                _ => return Err(bad_request("unexpected second header")),
            }
        }
        if keys.len() as u64 != header.num_entity_keys {
            return Err(bad_request(format!(
                "{} entity keys announced, {} received",
                header.num_entity_keys,
                keys.len()
            )));
        }
        let reg = {
            let mut r = self.shared.rounds.lock().await;
            let reg = r
                .on_register(
                    &name,
                    &header.run_id,
                    header.num_examples,
                    keys,
                    self.shared.now(),
                )
                .map_err(rounds_status)?;
            self.shared.advance(&mut r);
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
        let caller = self.identify(&request)?;
        let req = request.into_inner();
        if !req.run_id.is_empty() && req.run_id != self.shared.run_id {
            return Err(Status::failed_precondition(format!(
                "wrong run id {:?} (this run is {:?})",
                req.run_id, self.shared.run_id
            )));
        }
        let deadline = tokio::time::Instant::now() + self.shared.poll_timeout;
        let poll = loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.shared.now();
            let poll = {
                let mut r = self.shared.rounds.lock().await;
                owned_session(&r, &caller, &req.session_id)?;
                if self.shared.is_stopping() {
                    self.shared.told_to_stop(&r, &req.session_id);
                    let message = proto::TaskChunk {
                        part: Some(task_chunk::Part::Header(wire::stop_header(
                            &self.shared.run_id,
                        ))),
                    };
                    return Ok(Response::new(Box::pin(tokio_stream::once(Ok(message)))));
                }
                r.task_for(&req.session_id, now).map_err(rounds_status)?
            };
            if !matches!(poll, Poll::Wait) || self.shared.closing.load(Ordering::SeqCst) {
                break poll;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => break Poll::Wait,
            }
        };
        let task = match poll {
            Poll::Task(task) => task,
            idle => {
                let header = wire::idle_header(&idle, &self.shared.run_id);
                let message = proto::TaskChunk {
                    part: Some(task_chunk::Part::Header(header)),
                };
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(message)))));
            }
        };
        let mut header = wire::task_header(&task);
        header.arrays = payload_headers(&task.payload);
        // Chunks are built one by one as the client reads them: no copy of the payload.
        let chunks = PayloadChunks::new(
            task.payload,
            self.shared.chunk_bytes,
            &task.run_id,
            task.round,
        );
        let shared = self.shared.clone();
        let tensors = TimedChunks { chunks, shared }.map(|c| {
            Ok(proto::TaskChunk {
                part: Some(task_chunk::Part::Tensor(c)),
            })
        });
        let first = proto::TaskChunk {
            part: Some(task_chunk::Part::Header(header)),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            std::iter::once(Ok(first)).chain(tensors),
        ))))
    }

    async fn push_result(
        &self,
        request: Request<Streaming<proto::ResultChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        let caller = self.identify(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(proto::ResultChunk {
                part: Some(result_chunk::Part::Header(h)),
            }) => h,
            _ => return Err(bad_request("result must start with a header")),
        };
        // Nothing of the payload is read before the header is admitted.
        let masked_len = wire::masked_len_announced(&header);
        let announced = header
            .arrays
            .iter()
            .fold(masked_len.saturating_mul(8), |sum, a| {
                sum.saturating_add(a.num_bytes)
            });
        let admitted = {
            let mut r = self.shared.rounds.lock().await;
            match owned_session(&r, &caller, &header.session_id) {
                Ok(()) => r.admit_push(&header.session_id, &header.task_id, announced),
                Err(_) => {
                    r.note_ignored();
                    Err(IgnoreReason::UnknownSession(header.session_id.clone()))
                }
            }
        };
        if let Err(reason) = admitted {
            tracing::warn!("result refused before reading: {reason}");
            let outcome = ResultOutcome::Ignored(reason);
            return Ok(Response::new(wire::push_reply(
                &self.shared.run_id,
                header.round,
                &outcome,
            )));
        }
        let mut decode = Duration::ZERO;
        let mut masked = wire::MaskedAssembler::new(masked_len);
        let assembled = async {
            let mut asm = Assembler::new(&header.arrays)
                .map_err(|e| e.to_string())?
                .expect_run(header.run_id.clone(), header.round);
            while let Some(m) = stream
                .message()
                .await
                .map_err(|e| e.message().to_string())?
            {
                match m.part {
                    Some(result_chunk::Part::Tensor(c)) => {
                        self.shared.telemetry.add_bytes_in(c.data.len());
                        let t0 = Instant::now();
                        asm.push(c).map_err(|e| e.to_string())?;
                        decode += t0.elapsed();
                    }
                    Some(result_chunk::Part::Masked(c)) => {
                        self.shared.telemetry.add_bytes_in(c.values.len() * 8);
                        masked.push(c)?;
                    }
                    _ => return Err("unexpected second header".to_string()),
                }
            }
            let arrays = asm.finish().map_err(|e| e.to_string())?;
            Ok((arrays, masked.finish()?))
        }
        .await;
        let (arrays, masked_values) = match assembled {
            Ok(parts) => parts,
            Err(problem) => {
                // A broken stream fails the task now, instead of holding the round until its
                // timeout: the client was admitted, so the failure is its own.
                let mut report =
                    wire::report_from_proto(header, Vec::new()).map_err(bad_request)?;
                report.error = Some(format!("broken result stream: {problem}"));
                let mut r = self.shared.rounds.lock().await;
                r.on_result(report, self.shared.now());
                self.shared.advance(&mut r);
                return Err(bad_request(problem));
            }
        };
        let mut report = wire::report_from_proto(header, arrays).map_err(bad_request)?;
        if let Some(SecAggReply::Masked(m)) = &mut report.secagg {
            if masked_len > 0 {
                if !m.values.is_empty() {
                    return Err(bad_request("masked values both inline and in chunks"));
                }
                m.values = masked_values;
            }
        }
        let round = report.round;
        let outcome = {
            let mut r = self.shared.rounds.lock().await;
            let outcome = r.on_result(report, self.shared.now());
            if !matches!(outcome, ResultOutcome::Ignored(_)) {
                r.add_overhead(decode.as_secs_f64());
            }
            self.shared.advance(&mut r);
            outcome
        };
        if let ResultOutcome::Ignored(reason) = &outcome {
            tracing::warn!("result ignored: {reason}");
        }
        Ok(Response::new(wire::push_reply(
            &self.shared.run_id,
            round,
            &outcome,
        )))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let caller = self.identify(&request)?;
        let req = request.into_inner();
        let now = self.shared.now();
        let (st, round, stopping) = {
            let mut r = self.shared.rounds.lock().await;
            if owned_session(&r, &caller, &req.session_id).is_err() {
                return Ok(Response::new(proto::HeartbeatReply::default()));
            }
            let stopping = self.shared.is_stopping();
            if stopping {
                self.shared.told_to_stop(&r, &req.session_id);
            }
            (
                r.on_heartbeat(&req.session_id, now),
                r.current_round(),
                stopping,
            )
        };
        let known = st.known && (req.run_id.is_empty() || req.run_id == self.shared.run_id);
        // A caller without a session learns nothing about the run.
        if !known {
            return Ok(Response::new(proto::HeartbeatReply::default()));
        }
        Ok(Response::new(proto::HeartbeatReply {
            run_id: self.shared.run_id.clone(),
            round,
            known,
            done: st.done,
            stopping,
        }))
    }
}

/// Counts the time spent building chunks into the coordinator's overhead of the round.
struct TimedChunks {
    chunks: PayloadChunks,
    shared: Arc<Shared>,
}

impl Iterator for TimedChunks {
    type Item = proto::TensorChunk;

    fn next(&mut self) -> Option<proto::TensorChunk> {
        let t0 = Instant::now();
        let c = self.chunks.next();
        self.shared
            .encode_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some(c) = &c {
            self.shared.telemetry.add_bytes_out(c.data.len());
        }
        c
    }
}
