//! The coordinator's round state machine: pure (no network, no clock — time is passed in
//! as a `Duration` since the start of the run), driven by events in and actions out.
//!
//! Life of a run:
//! * Clients register ([`Rounds::on_register`]); they stay alive while they heartbeat or call
//!   in at least every `heartbeat_timeout` ([`Rounds::tick`] marks silent ones dead and
//!   forgets their session, so they must register again).
//! * The run starts when at least `max(min_clients, min_fit_clients)` clients are alive;
//!   after that each round (FIT, EVALUATE or FINISH_STAGE) starts when at least
//!   `min_fit_clients` are, so a dead client stalls the run for one round timeout at most.
//! * FIT: `max(ceil(fraction_fit * alive), min_fit_clients)` (capped at alive) clients are
//!   chosen by a seeded shuffle; each gets a task with the current global model when it
//!   polls ([`Rounds::task_for`]). The round closes when every selected client answered
//!   (or died, failed or re-registered) or `round_timeout` passed. With at least
//!   `min_fit_clients` successful results the round hands out an [`AggregationJob`]
//!   ([`Rounds::take_aggregation`]) that the caller runs where it likes (off its event loop,
//!   outside its lock) and returns ([`Rounds::on_aggregated`]); otherwise the round is
//!   recorded as failed (`aggregated: false`) and the run MOVES ON to the next round, as
//!   Flower does: rounds are never retried, so a run always terminates.
//! * EVALUATE: after every `eval_every`-th FIT round and always after a stage's last round,
//!   sent to all alive clients, same closing rules; metrics are example-weighted.
//! * FINISH_STAGE: after the stage's last round, sent to all alive clients (and to clients
//!   that join during it) with the final global payload; closes when all acknowledged or on
//!   timeout. Then the next stage starts, and after the last one every poll answers DONE.
//! * A result is counted at most once: a wrong run id, an unknown session, a task from an
//!   earlier round, a task never issued to that client or a duplicate is ignored and
//!   reported as such ([`ResultOutcome::Ignored`]).
//! * A client re-registering under the same name gets a new session; a task issued to its
//!   old session no longer holds the round up, and it receives the current global model
//!   with its next task.
//! * A stage with differential privacy charges every FIT round to its Rényi-DP accountant,
//!   at sampling rate q = selected / registered organisations, and records q
//!   ([`DP_SAMPLING_RATE`]) and the epsilon spent so far at the stage's delta
//!   ([`DP_EPSILON`]) among the round's metrics. A resumed run recharges its accountants
//!   from the recorded rates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simskip_data::NamedArray;

use crate::accountant::RdpAccountant;
use crate::aggregate::{weighted_metrics, AggregateError};
use crate::params::StageParams;
use crate::privacy::DpConfig;
use crate::secagg::{self, SecAggReply, SecAggTask, SecureAggregation, SecureFit};
use crate::strategy::Strategy;
use crate::types::{
    ClientInfo, ClientResult, GlobalSnapshot, Payload, StageInfo, StageKind, TaskKind,
};

/// One stage of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub name: String,
    /// FIT rounds in the stage.
    pub rounds: u32,
    /// EVALUATE after every k-th FIT round (0: only after the last one).
    pub eval_every: u32,
    /// Sent to the clients with every task of the stage; its kind is the stage's kind.
    pub params: StageParams,
    /// Differential privacy of the uploads (`None`: none); sent with every task.
    pub privacy: Option<DpConfig>,
    /// FIT rounds sum the updates under secure aggregation (FedAvg stages only); DP noise
    /// is then split across the round's organisations.
    pub secure: Option<SecureAggregation>,
}

impl StageSpec {
    pub fn kind(&self) -> StageKind {
        self.params.kind()
    }
}

/// Round rules.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundsConfig {
    pub run_id: String,
    pub min_clients: usize,
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub round_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// Longest the run may wait, between rounds, for enough alive clients to start the next
    /// round; past it the run is aborted (it can no longer reach its minimum).
    pub quorum_timeout: Duration,
    pub seed: u64,
    pub stages: Vec<StageSpec>,
}

/// The round metric holding the epsilon a DP stage has spent so far (at its delta).
pub const DP_EPSILON: &str = "dp_epsilon";
/// The round metric holding the delta at which [`DP_EPSILON`] holds.
pub const DP_DELTA: &str = "dp_delta";
/// The round metric holding the sampling rate a DP stage's FIT round was charged at.
pub const DP_SAMPLING_RATE: &str = "dp_sampling_rate";

/// A task for one client.
#[derive(Debug, Clone)]
pub struct Task {
    pub run_id: String,
    pub task_id: String,
    pub kind: TaskKind,
    pub stage: StageInfo,
    pub round: u32,
    pub payload: Payload,
    /// Secure aggregation: the protocol step this task asks for.
    pub secagg: Option<SecAggTask>,
}

/// What a poll gets.
// A `Poll` is built once per call and moved straight to the caller, never stored in bulk:
// boxing the task would cost an allocation per poll for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Poll {
    Task(Task),
    /// Nothing to do yet: poll again.
    Wait,
    /// The run is over.
    Done,
}

impl Poll {
    /// The task, if this poll got one.
    pub fn into_task(self) -> Option<Task> {
        match self {
            Poll::Task(t) => Some(t),
            _ => None,
        }
    }
}

/// A round's FIT results, with the strategy that folds them in, taken out of the state
/// machine so that the caller can aggregate off its event loop and outside its lock; give the
/// outcome back with [`Rounds::on_aggregated`].
pub struct AggregationJob {
    stage: usize,
    round: u32,
    strategy: Box<dyn Strategy>,
    results: Vec<ClientResult>,
    /// A secure round: the protocol, with every answer needed to unmask the sum (then
    /// `results` carry metrics only).
    secure: Option<Box<SecureFit>>,
}

/// An [`AggregationJob`] that ran.
pub struct Aggregated {
    stage: usize,
    round: u32,
    strategy: Box<dyn Strategy>,
    outcome: Result<(), AggregateError>,
}

impl AggregationJob {
    /// Folds the results into the strategy's global state (a secure round: unmasks the sum
    /// first). CPU-bound.
    pub fn run(self) -> Aggregated {
        let AggregationJob {
            stage,
            round,
            mut strategy,
            results,
            secure,
        } = self;
        let outcome = match secure {
            None => strategy.aggregate_fit(results),
            Some(protocol) => match protocol.finish() {
                Ok(sum) => strategy.aggregate_secure(sum),
                Err(e) => Err(AggregateError::Secure(e.to_string())),
            },
        };
        Aggregated {
            stage,
            round,
            strategy,
            outcome,
        }
    }
}

impl std::fmt::Debug for AggregationJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregationJob")
            .field("stage", &self.stage)
            .field("round", &self.round)
            .field("results", &self.results.len())
            .finish()
    }
}

/// What a client sends back for a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub run_id: String,
    pub session: String,
    pub round: u32,
    pub task_id: String,
    pub kind: TaskKind,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
    pub arrays: Vec<NamedArray>,
    /// The client failed the task.
    pub error: Option<String>,
    /// Secure aggregation: the answer to the task's protocol step.
    pub secagg: Option<SecAggReply>,
}

/// Why a result was not counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IgnoreReason {
    #[error("wrong run id {got:?} (this run is {expected:?})")]
    WrongRunId { expected: String, got: String },
    #[error("unknown session {0:?}: register again")]
    UnknownSession(String),
    #[error("task {task_id:?} of round {round} is not from the current round")]
    NotCurrentRound { task_id: String, round: u32 },
    #[error("task {0:?} was not issued to this client")]
    UnknownTask(String),
    #[error("duplicate result for task {0:?}")]
    Duplicate(String),
    #[error("the result announces {announced} bytes; its task allows {limit}")]
    TooLarge { announced: u64, limit: u64 },
}

/// What became of a result.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultOutcome {
    Accepted,
    /// Counted as a failed answer (client error or invalid arrays).
    Failure(String),
    Ignored(IgnoreReason),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoundsError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("client name must not be empty")]
    EmptyName,
    #[error("client expects run {got:?} but this run is {expected:?}")]
    WrongRunId { expected: String, got: String },
    #[error("unknown session {0:?}: register again")]
    UnknownSession(String),
    #[error("strategy of stage {stage:?}: {source}")]
    Strategy {
        stage: String,
        #[source]
        source: AggregateError,
    },
}

/// A client's answer in a round record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// Coordinator time spent on a round, excluding the clients' work.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overhead {
    /// Building payloads and (added by the server) encoding/decoding chunks.
    pub serialize_secs: f64,
    pub aggregate_secs: f64,
    pub total_secs: f64,
}

/// Everything about a closed round (FIT, EVALUATE or FINISH_STAGE): one line of
/// `metrics.jsonl`, which reads back into this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub run_id: String,
    pub stage_index: usize,
    pub stage: String,
    pub stage_kind: StageKind,
    pub round: u32,
    pub kind: TaskKind,
    pub selected: Vec<String>,
    /// Successful answers.
    pub num_clients: usize,
    pub clients: BTreeMap<String, ClientRecord>,
    pub failures: BTreeMap<String, String>,
    /// Selected but never answered (timed out, died or re-registered).
    pub missing: Vec<String>,
    /// FIT: the strategy aggregated. EVALUATE: enough answers to count. FINISH: always false.
    pub aggregated: bool,
    pub note: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    pub timed_out: bool,
    pub started_secs: f64,
    pub ended_secs: f64,
    pub coordinator: Overhead,
}

/// What happened, for the server to log and persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ClientRegistered {
        name: String,
        session: String,
        rejoined: bool,
    },
    ClientDead {
        name: String,
    },
    StageStarted {
        stage_index: usize,
        stage: String,
    },
    RoundStarted {
        stage_index: usize,
        round: u32,
        kind: TaskKind,
        clients: Vec<String>,
    },
    RoundCompleted(RoundRecord),
    /// After a successful FIT aggregation.
    GlobalUpdated {
        stage_index: usize,
        stage: String,
        round: u32,
        global: GlobalSnapshot,
    },
    StageFinished {
        stage_index: usize,
        stage: String,
    },
    Done,
    /// The run ended without finishing: it waited `quorum_timeout` for enough clients.
    Aborted {
        reason: String,
    },
}

/// Where a resumed run continues from (see [`Rounds::resume`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumePoint {
    /// The committed rounds, in the order they closed.
    pub records: Vec<RoundRecord>,
    /// The run's clock at the restart (the last record's end): the resumed run's times
    /// continue from it.
    pub now: Duration,
}

/// Heartbeat answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatStatus {
    pub known: bool,
    pub done: bool,
}

/// A registration accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub run_id: String,
    pub session: String,
}

#[derive(Debug)]
struct ClientState {
    info: ClientInfo,
    last_seen: Duration,
    alive: bool,
    told_done: bool,
}

#[derive(Debug)]
struct Issued {
    task_id: String,
    session: String,
    /// Still holding the round up.
    waiting: bool,
}

#[derive(Debug)]
struct RoundState {
    kind: TaskKind,
    stage: usize,
    round: u32,
    started: Duration,
    selected: Vec<String>,
    tasks: BTreeMap<String, Issued>,
    results: BTreeMap<String, ClientResult>,
    failures: BTreeMap<String, String>,
    serialize_secs: f64,
    /// A FIT round under secure aggregation.
    secure: Option<SecureRound>,
}

/// The secure-aggregation state of a FIT round.
#[derive(Debug)]
struct SecureRound {
    /// `None` when the protocol could not start (see `failed`).
    protocol: Option<SecureFit>,
    /// When the current protocol step started (each step has `round_timeout`).
    step_started: Duration,
    /// The training answers (examples, metrics) given with the keys, for the round's record.
    trained: BTreeMap<String, ClientResult>,
    /// The last step closed and the sum can be unmasked.
    ready: bool,
    /// Why the protocol stopped short, if it did.
    failed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Next {
    Fit { stage: usize, round: u32 },
    Evaluate { stage: usize, round: u32 },
    Finish { stage: usize },
}

impl Next {
    /// "round 3 (fit) of stage \"fede\"", for messages.
    fn describe(&self, stages: &[StageSpec]) -> String {
        let (stage, what) = match *self {
            Next::Fit { stage, round } => (stage, format!("fit round {round}")),
            Next::Evaluate { stage, round } => (stage, format!("evaluation after round {round}")),
            Next::Finish { stage } => (stage, "the end of the stage".to_string()),
        };
        format!("{what} of stage {:?}", stages[stage].name)
    }
}

// One phase per coordinator, replaced in place: boxing the collecting state would only add an
// allocation per round.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    Idle(Next),
    Collect(RoundState),
    /// A FIT round closed with enough results; its record waits for the aggregation job.
    Aggregating(Box<RoundRecord>),
    Done {
        at: Duration,
    },
}

/// The round state machine. See the module docs for the rules.
pub struct Rounds {
    cfg: RoundsConfig,
    /// One per stage; `None` only while that stage's [`AggregationJob`] is out.
    strategies: Vec<Option<Box<dyn Strategy>>>,
    /// Registrations that arrived while their stage's strategy was out aggregating.
    pending_registrations: Vec<(usize, ClientInfo)>,
    job: Option<AggregationJob>,
    clients: BTreeMap<String, ClientState>,
    sessions: HashMap<String, String>,
    phase: Phase,
    stage_started: Vec<bool>,
    rng: StdRng,
    task_seq: u64,
    past_tasks: HashSet<String>,
    events: Vec<Event>,
    records: Vec<RoundRecord>,
    ignored: u64,
    /// Since when the run waits for enough alive clients to start a round.
    short_of_clients_since: Option<Duration>,
    /// Why the run was aborted, if it was.
    aborted: Option<String>,
    /// A resumed run waits for `min_clients` again before its first round, so that the
    /// organisations all have time to reconnect (none misses a stage's end, say).
    regathering: bool,
    /// Privacy spent by each stage with DP (`None`: a stage without).
    accountants: Vec<Option<RdpAccountant>>,
}

impl Rounds {
    /// One strategy per stage, kinds matching.
    pub fn new(cfg: RoundsConfig, strategies: Vec<Box<dyn Strategy>>) -> Result<Self, RoundsError> {
        let bad = |m: String| Err(RoundsError::Config(m));
        if cfg.stages.is_empty() {
            return bad("no stages".into());
        }
        if strategies.len() != cfg.stages.len() {
            return bad(format!(
                "{} stages but {} strategies",
                cfg.stages.len(),
                strategies.len()
            ));
        }
        for (s, st) in cfg.stages.iter().zip(&strategies) {
            if s.kind() != st.kind() {
                return bad(format!(
                    "stage {:?} is {} but its strategy is {}",
                    s.name,
                    s.kind().as_str(),
                    st.kind().as_str()
                ));
            }
        }
        let mut names = HashSet::new();
        for s in &cfg.stages {
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return bad(format!(
                    "stage names must be unique and non-empty: {:?}",
                    s.name
                ));
            }
        }
        if cfg.min_clients == 0 || cfg.min_fit_clients == 0 {
            return bad("min_clients and min_fit_clients must be at least 1".into());
        }
        if !(cfg.fraction_fit > 0.0 && cfg.fraction_fit <= 1.0) {
            return bad(format!("fraction_fit {} not in (0, 1]", cfg.fraction_fit));
        }
        let n = cfg.stages.len();
        for s in &cfg.stages {
            if let Some(p) = &s.privacy {
                p.validate()
                    .map_err(|e| RoundsError::Config(format!("stage {:?}: {e}", s.name)))?;
            }
        }
        Ok(Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            strategies: strategies.into_iter().map(Some).collect(),
            pending_registrations: Vec::new(),
            job: None,
            clients: BTreeMap::new(),
            sessions: HashMap::new(),
            phase: Phase::Idle(Next::Fit { stage: 0, round: 1 }),
            stage_started: vec![false; n],
            task_seq: 0,
            past_tasks: HashSet::new(),
            events: Vec::new(),
            records: Vec::new(),
            ignored: 0,
            short_of_clients_since: None,
            aborted: None,
            regathering: false,
            accountants: cfg
                .stages
                .iter()
                .map(|s| s.privacy.as_ref().map(|_| RdpAccountant::default()))
                .collect(),
            cfg,
        })
    }

    /// Continues a run after a restart: `point.records` are the rounds the previous
    /// incarnation closed and committed, in order; the strategies must already hold the
    /// global state those rounds left (see [`Strategy::restore`]). The round after the last
    /// record is the next one to run (a round that was open at the crash runs again, from
    /// scratch). Clients register again; like a new run, the resumed one waits for
    /// `min_clients` before its first round (then `min_fit_clients` gates each round).
    pub fn resume(
        cfg: RoundsConfig,
        strategies: Vec<Box<dyn Strategy>>,
        point: ResumePoint,
    ) -> Result<Self, RoundsError> {
        let mut r = Self::new(cfg, strategies)?;
        for (i, rec) in point.records.iter().enumerate() {
            let fits = r
                .cfg
                .stages
                .get(rec.stage_index)
                .is_some_and(|s| s.name == rec.stage && rec.round <= s.rounds.max(1));
            if !fits || rec.run_id != r.cfg.run_id {
                return Err(RoundsError::Config(format!(
                    "record {i} (stage {:?} #{}, round {}, run {:?}) does not belong to this run",
                    rec.stage, rec.stage_index, rec.round, rec.run_id
                )));
            }
        }
        if let Some(last) = point.records.last() {
            let next = r.next_after(last.stage_index, last.round, last.kind);
            let current = match next {
                Some(Next::Fit { stage, .. })
                | Some(Next::Evaluate { stage, .. })
                | Some(Next::Finish { stage }) => stage,
                None => r.cfg.stages.len(),
            };
            for s in 0..r.cfg.stages.len() {
                r.stage_started[s] = s < current
                    || (s == current && point.records.iter().any(|rec| rec.stage_index == s));
            }
            match next {
                Some(n) => r.phase = Phase::Idle(n),
                None => {
                    r.phase = Phase::Done { at: point.now };
                    r.events.push(Event::Done);
                }
            }
            r.regathering = true;
            // A different selection sequence from the first incarnation's, still seeded.
            r.rng = StdRng::seed_from_u64(r.cfg.seed ^ ((point.records.len() as u64) << 32));
        }
        for rec in &point.records {
            if let Some(q) = rec.metrics.get(DP_SAMPLING_RATE) {
                r.charge_privacy(rec.stage_index, *q);
            }
        }
        r.records = point.records;
        Ok(r)
    }

    /// Charges one FIT round of `stage` at sampling rate `q` to its accountant; the epsilon
    /// spent so far and the stage's delta it holds at (`None`: the stage has no DP).
    fn charge_privacy(&mut self, stage: usize, q: f64) -> Option<(f64, f64)> {
        let dp = self.cfg.stages.get(stage)?.privacy.as_ref()?;
        let acc = self.accountants.get_mut(stage)?.as_mut()?;
        // Both validated: the settings in `new`, q as a ratio clamped to [0, 1].
        acc.compose_subsampled_gaussian(q.clamp(0.0, 1.0), dp.noise_multiplier, 1)
            .ok()?;
        acc.epsilon(dp.delta).ok().map(|(eps, _)| (eps, dp.delta))
    }

    pub fn config(&self) -> &RoundsConfig {
        &self.cfg
    }
    pub fn run_id(&self) -> &str {
        &self.cfg.run_id
    }
    /// Every closed round so far.
    pub fn records(&self) -> &[RoundRecord] {
        &self.records
    }
    /// Results ignored so far.
    pub fn ignored_results(&self) -> u64 {
        self.ignored
    }
    /// `None` for an unknown stage, or while its aggregation job is out.
    pub fn strategy(&self, stage: usize) -> Option<&dyn Strategy> {
        self.strategies.get(stage)?.as_deref()
    }

    /// The aggregation a closed FIT round waits for, if any: run it (anywhere, any thread)
    /// and hand the outcome to [`Rounds::on_aggregated`]. Until then the run does not advance.
    pub fn take_aggregation(&mut self) -> Option<AggregationJob> {
        self.job.take()
    }

    /// Completes the round that waited for `done`, with the seconds its aggregation took.
    pub fn on_aggregated(&mut self, done: Aggregated, aggregate_secs: f64) {
        let Aggregated {
            stage,
            round,
            mut strategy,
            outcome,
        } = done;
        let mut still_pending = Vec::new();
        for (s, info) in std::mem::take(&mut self.pending_registrations) {
            if s != stage {
                still_pending.push((s, info));
            } else if let Err(e) = strategy.on_client_registered(&info) {
                tracing::error!(client = %info.name, "strategy registration after aggregation: {e}");
            }
        }
        self.pending_registrations = still_pending;
        self.strategies[stage] = Some(strategy);
        let Phase::Aggregating(mut record) =
            std::mem::replace(&mut self.phase, Phase::Done { at: Duration::ZERO })
        else {
            unreachable!("an aggregation job exists only while its round is aggregating");
        };
        debug_assert_eq!((record.stage_index, record.round), (stage, round));
        match outcome {
            Ok(()) => record.aggregated = true,
            Err(e) => record.note = Some(format!("aggregation failed: {e}")),
        }
        record.coordinator.aggregate_secs = aggregate_secs;
        record.coordinator.total_secs = record.coordinator.serialize_secs + aggregate_secs;
        self.finish_close(*record);
    }
    /// True while a closed FIT round waits for its aggregation.
    pub fn is_aggregating(&self) -> bool {
        matches!(self.phase, Phase::Aggregating(_))
    }
    /// Why the run was aborted before finishing (see [`RoundsConfig::quorum_timeout`]).
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }
    /// When the run became DONE.
    pub fn done_at(&self) -> Option<Duration> {
        match self.phase {
            Phase::Done { at } => Some(at),
            _ => None,
        }
    }
    /// Round number of the round being collected (0 when none).
    pub fn current_round(&self) -> u32 {
        match &self.phase {
            Phase::Collect(rs) => rs.round,
            _ => 0,
        }
    }
    /// (stage index, round, kind) of the round being collected.
    pub fn current(&self) -> Option<(usize, u32, TaskKind)> {
        match &self.phase {
            Phase::Collect(rs) => Some((rs.stage, rs.round, rs.kind)),
            _ => None,
        }
    }
    /// Names of the alive clients, sorted.
    pub fn alive_clients(&self) -> Vec<String> {
        self.clients
            .values()
            .filter(|c| c.alive)
            .map(|c| c.info.name.clone())
            .collect()
    }
    /// How many clients are alive.
    pub fn num_alive(&self) -> usize {
        self.clients.values().filter(|c| c.alive).count()
    }
    /// True when every alive client has been answered DONE.
    pub fn all_alive_told_done(&self) -> bool {
        self.clients.values().all(|c| !c.alive || c.told_done)
    }
    pub fn client_by_session(&self, session: &str) -> Option<&ClientInfo> {
        let name = self.sessions.get(session)?;
        self.clients.get(name).map(|c| &c.info)
    }

    /// Registers `name` (or re-registers it with a new session).
    pub fn on_register(
        &mut self,
        name: &str,
        expected_run_id: &str,
        num_examples: u64,
        entity_keys: Vec<String>,
        now: Duration,
    ) -> Result<Registered, RoundsError> {
        if name.is_empty() {
            return Err(RoundsError::EmptyName);
        }
        if !expected_run_id.is_empty() && expected_run_id != self.cfg.run_id {
            return Err(RoundsError::WrongRunId {
                expected: self.cfg.run_id.clone(),
                got: expected_run_id.to_string(),
            });
        }
        let session = new_session_id();
        let info = ClientInfo {
            name: name.to_string(),
            session: session.clone(),
            num_examples,
            entity_keys: Arc::new(entity_keys),
        };
        for (i, (stage, st)) in self
            .cfg
            .stages
            .iter()
            .zip(self.strategies.iter_mut())
            .enumerate()
        {
            match st {
                Some(st) => {
                    st.on_client_registered(&info)
                        .map_err(|source| RoundsError::Strategy {
                            stage: stage.name.clone(),
                            source,
                        })?
                }
                None => self.pending_registrations.push((i, info.clone())),
            }
        }
        let rejoined = if let Some(old) = self.clients.remove(name) {
            self.sessions.remove(&old.info.session);
            self.release(name);
            true
        } else {
            false
        };
        self.sessions.insert(session.clone(), name.to_string());
        self.clients.insert(
            name.to_string(),
            ClientState {
                info,
                last_seen: now,
                alive: true,
                told_done: false,
            },
        );
        self.events.push(Event::ClientRegistered {
            name: name.to_string(),
            session: session.clone(),
            rejoined,
        });
        Ok(Registered {
            run_id: self.cfg.run_id.clone(),
            session,
        })
    }

    /// The client's task in the current round no longer holds the round up.
    fn release(&mut self, name: &str) {
        if let Phase::Collect(rs) = &mut self.phase {
            if let Some(t) = rs.tasks.get_mut(name) {
                t.waiting = false;
            }
        }
    }

    fn touch(&mut self, session: &str, now: Duration) -> Option<String> {
        let name = self.sessions.get(session)?.clone();
        if let Some(c) = self.clients.get_mut(&name) {
            c.last_seen = c.last_seen.max(now);
        }
        Some(name)
    }

    pub fn on_heartbeat(&mut self, session: &str, now: Duration) -> HeartbeatStatus {
        HeartbeatStatus {
            known: self.touch(session, now).is_some(),
            done: self.is_done(),
        }
    }

    /// Adds coordinator time (e.g. chunk encoding) to the round being collected.
    pub fn add_overhead(&mut self, secs: f64) {
        if let Phase::Collect(rs) = &mut self.phase {
            rs.serialize_secs += secs;
        }
    }

    /// What this session should do now. Counts as a sign of life. A task already handed out
    /// but not answered is handed out again (the client polls only when idle, so it lost it).
    pub fn task_for(&mut self, session: &str, now: Duration) -> Result<Poll, RoundsError> {
        let name = self
            .touch(session, now)
            .ok_or_else(|| RoundsError::UnknownSession(session.to_string()))?;
        let rs = match &mut self.phase {
            Phase::Done { .. } => {
                if let Some(c) = self.clients.get_mut(&name) {
                    c.told_done = true;
                }
                return Ok(Poll::Done);
            }
            Phase::Idle(_) | Phase::Aggregating(_) => return Ok(Poll::Wait),
            Phase::Collect(rs) => rs,
        };
        // Clients that join during FINISH_STAGE get their final payload too.
        if rs.kind == TaskKind::FinishStage
            && rs.tasks.get(&name).is_none_or(|t| t.session != session)
            && !rs.results.contains_key(&name)
        {
            self.task_seq += 1;
            let task_id = format!("t{}-{}", self.task_seq, name);
            let old = rs.tasks.insert(
                name.clone(),
                Issued {
                    task_id,
                    session: session.to_string(),
                    waiting: true,
                },
            );
            if let Some(old) = old {
                self.past_tasks.insert(old.task_id);
            }
        }
        let Some(issued) = rs.tasks.get(&name) else {
            return Ok(Poll::Wait);
        };
        if issued.session != session
            || !issued.waiting
            || rs.results.contains_key(&name)
            || rs.failures.contains_key(&name)
        {
            return Ok(Poll::Wait);
        }
        let client = &self.clients[&name].info;
        let Some(strategy) = self.strategies[rs.stage].as_deref() else {
            unreachable!("a stage's strategy is out only while its round is aggregating");
        };
        let secagg = match &rs.secure {
            None => None,
            Some(sr) => match sr.protocol.as_ref().and_then(|p| p.ask(&name)) {
                Some(ask) => Some(ask.clone()),
                None => return Ok(Poll::Wait),
            },
        };
        // Only the first step of a secure round carries the global model.
        let payload = match &secagg {
            Some(ask) if !matches!(ask, SecAggTask::Begin { .. }) => Ok(Payload::empty()),
            _ => strategy.payload(client),
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                // The strategy cannot serve this client: count it as a failed answer.
                rs.failures.insert(name.clone(), format!("payload: {e}"));
                if let Some(t) = rs.tasks.get_mut(&name) {
                    t.waiting = false;
                }
                return Ok(Poll::Wait);
            }
        };
        let stage = &self.cfg.stages[rs.stage];
        Ok(Poll::Task(Task {
            run_id: self.cfg.run_id.clone(),
            task_id: issued.task_id.clone(),
            kind: rs.kind,
            stage: StageInfo {
                index: rs.stage,
                name: stage.name.clone(),
                rounds: stage.rounds,
                params: stage.params.clone(),
                privacy: stage
                    .privacy
                    .as_ref()
                    // Noise is split over a round's organisations only where every one of them
                    // is in every coordinate's sum (FedAvg); a FedE row's sum has only its
                    // holders, so each FedE upload keeps the full noise.
                    .map(|p| {
                        let split = stage.secure.is_some() && stage.kind() == StageKind::FedAvg;
                        p.for_client(split, rs.selected.len())
                    }),
            },
            round: rs.round,
            payload,
            secagg,
        }))
    }

    /// Counts a result refused before it reached the state machine (a session presented by
    /// an organisation that does not own it).
    pub fn note_ignored(&mut self) {
        self.ignored += 1;
    }

    /// Checks a result's header before its payload is read: the session must be known, the
    /// task the one this client holds in the current round, and the announced payload no
    /// larger than the task's arrays. Returns the client's name.
    pub fn admit_push(
        &mut self,
        session: &str,
        task_id: &str,
        announced_bytes: u64,
    ) -> Result<String, IgnoreReason> {
        let admitted = self.admit(session, task_id, announced_bytes);
        if admitted.is_err() {
            self.ignored += 1;
        }
        admitted
    }

    fn admit(
        &self,
        session: &str,
        task_id: &str,
        announced_bytes: u64,
    ) -> Result<String, IgnoreReason> {
        let name = self
            .sessions
            .get(session)
            .ok_or_else(|| IgnoreReason::UnknownSession(session.to_string()))?;
        let Phase::Collect(rs) = &self.phase else {
            return Err(IgnoreReason::UnknownTask(task_id.to_string()));
        };
        if !rs
            .tasks
            .get(name)
            .is_some_and(|t| t.task_id == task_id && t.session == session && t.waiting)
        {
            return Err(IgnoreReason::UnknownTask(task_id.to_string()));
        }
        let limit = match (rs.kind, self.strategies[rs.stage].as_deref()) {
            // A secure round's answers carry no arrays: the update travels masked, as the
            // ring elements of the masked-input step.
            (TaskKind::Fit, _) if rs.secure.is_some() => rs
                .secure
                .as_ref()
                .and_then(|s| s.protocol.as_ref())
                .and_then(|p| p.masked_len())
                .map_or(0, |n| n as u64 * 8),
            (TaskKind::Fit, Some(st)) => st.fit_result_bytes(&self.clients[name].info),
            _ => 0,
        };
        if announced_bytes > limit {
            return Err(IgnoreReason::TooLarge {
                announced: announced_bytes,
                limit,
            });
        }
        Ok(name.clone())
    }

    /// Records a client's result. Never advances the round: call [`Rounds::tick`] after.
    pub fn on_result(&mut self, report: Report, now: Duration) -> ResultOutcome {
        let outcome = self.result_outcome(report, now);
        if matches!(outcome, ResultOutcome::Ignored(_)) {
            self.ignored += 1;
        }
        outcome
    }

    fn result_outcome(&mut self, report: Report, now: Duration) -> ResultOutcome {
        use IgnoreReason::*;
        if report.run_id != self.cfg.run_id {
            return ResultOutcome::Ignored(WrongRunId {
                expected: self.cfg.run_id.clone(),
                got: report.run_id,
            });
        }
        let Some(name) = self.touch(&report.session, now) else {
            return ResultOutcome::Ignored(UnknownSession(report.session));
        };
        let stale = || NotCurrentRound {
            task_id: report.task_id.clone(),
            round: report.round,
        };
        let Phase::Collect(rs) = &mut self.phase else {
            return ResultOutcome::Ignored(if self.past_tasks.contains(&report.task_id) {
                stale()
            } else {
                UnknownTask(report.task_id.clone())
            });
        };
        let current = rs
            .tasks
            .get(&name)
            .is_some_and(|t| t.task_id == report.task_id && t.session == report.session);
        if !current {
            return ResultOutcome::Ignored(if self.past_tasks.contains(&report.task_id) {
                stale()
            } else {
                UnknownTask(report.task_id.clone())
            });
        }
        if report.round != rs.round {
            return ResultOutcome::Ignored(stale());
        }
        if let Some(sr) = &mut rs.secure {
            if report.kind != rs.kind {
                return ResultOutcome::Ignored(UnknownTask(report.task_id));
            }
            let waiting = rs.tasks.get(&name).is_some_and(|t| t.waiting);
            if !waiting || rs.failures.contains_key(&name) {
                return ResultOutcome::Ignored(Duplicate(report.task_id));
            }
            if let Some(t) = rs.tasks.get_mut(&name) {
                t.waiting = false;
            }
            let client = self.clients[&name].info.clone();
            let outcome = secure_answer(sr, &client, report);
            if let Err(e) = &outcome {
                rs.failures.insert(name, e.clone());
            }
            return match outcome {
                Ok(()) => ResultOutcome::Accepted,
                Err(e) => ResultOutcome::Failure(e),
            };
        }
        if rs.results.contains_key(&name) || rs.failures.contains_key(&name) {
            return ResultOutcome::Ignored(Duplicate(report.task_id));
        }
        if report.kind != rs.kind {
            return ResultOutcome::Ignored(UnknownTask(report.task_id));
        }
        if let Some(t) = rs.tasks.get_mut(&name) {
            t.waiting = false;
        }
        let client = self.clients[&name].info.clone();
        let bad_metric = report.metrics.iter().find(|(_, v)| !v.is_finite());
        let error = match (report.error, bad_metric) {
            (Some(e), _) => Some(format!("client error: {e}")),
            (None, Some((k, v))) => Some(format!("invalid result: metric {k:?} is {v}")),
            (None, None) if rs.kind == TaskKind::Fit => self.strategies[rs.stage]
                .as_deref()
                .and_then(|st| st.check_fit_result(&client, &report.arrays).err())
                .map(|e| format!("invalid result: {e}")),
            (None, None) => None,
        };
        if let Some(e) = error {
            rs.failures.insert(name, e.clone());
            return ResultOutcome::Failure(e);
        }
        rs.results.insert(
            name,
            ClientResult {
                // A client weighs at most what it declared when it registered: a result cannot
                // claim more examples and take the global model over.
                num_examples: report.num_examples.min(client.num_examples),
                client,
                arrays: report.arrays,
                metrics: report.metrics,
            },
        );
        ResultOutcome::Accepted
    }

    /// Advances time: marks silent clients dead, closes finished or timed-out rounds, starts
    /// the next ones. Returns everything that happened since the last call.
    pub fn tick(&mut self, now: Duration) -> Vec<Event> {
        let dead: Vec<String> = self
            .clients
            .values()
            .filter(|c| c.alive && now.saturating_sub(c.last_seen) > self.cfg.heartbeat_timeout)
            .map(|c| c.info.name.clone())
            .collect();
        for name in dead {
            let c = self.clients.get_mut(&name).expect("listed");
            c.alive = false;
            let session = c.info.session.clone();
            self.sessions.remove(&session);
            self.release(&name);
            self.events.push(Event::ClientDead { name });
        }
        loop {
            match &self.phase {
                Phase::Done { .. } | Phase::Aggregating(_) => break,
                Phase::Idle(next) => {
                    let next = *next;
                    let alive = self.clients.values().filter(|c| c.alive).count();
                    // `min_clients` gates the start of the run only: once under way, a client
                    // that dies must not stall it beyond one round timeout (it may rejoin).
                    let needed = if self.stage_started.iter().any(|&s| s) && !self.regathering {
                        self.cfg.min_fit_clients
                    } else {
                        self.cfg.min_clients.max(self.cfg.min_fit_clients)
                    };
                    if alive < needed {
                        let since = *self.short_of_clients_since.get_or_insert(now);
                        if now.saturating_sub(since) >= self.cfg.quorum_timeout {
                            let reason = format!(
                                "only {alive} of the {needed} clients needed were alive for {:.0} s \
                                 (server.quorum_timeout_secs) before {}",
                                self.cfg.quorum_timeout.as_secs_f64(),
                                next.describe(&self.cfg.stages),
                            );
                            self.aborted = Some(reason.clone());
                            self.phase = Phase::Done { at: now };
                            self.events.push(Event::Aborted { reason });
                        }
                        break;
                    }
                    self.short_of_clients_since = None;
                    self.regathering = false;
                    self.start(next, now);
                }
                Phase::Collect(rs) => {
                    let all_in = rs.tasks.values().all(|t| !t.waiting);
                    let since = rs.secure.as_ref().map_or(rs.started, |s| s.step_started);
                    let timed_out = now.saturating_sub(since) >= self.cfg.round_timeout;
                    if !(all_in || timed_out) {
                        break;
                    }
                    if rs.secure.is_some() && self.next_secure_step(now) {
                        continue;
                    }
                    self.close(now, !all_in);
                }
            }
        }
        std::mem::take(&mut self.events)
    }

    fn start(&mut self, next: Next, now: Duration) {
        let (stage, round, kind) = match next {
            Next::Fit { stage, round } => (stage, round, TaskKind::Fit),
            Next::Evaluate { stage, round } => (stage, round, TaskKind::Evaluate),
            Next::Finish { stage } => (stage, self.cfg.stages[stage].rounds, TaskKind::FinishStage),
        };
        if !self.stage_started[stage] {
            self.stage_started[stage] = true;
            let infos: Vec<ClientInfo> = self
                .clients
                .values()
                .filter(|c| c.alive)
                .map(|c| c.info.clone())
                .collect();
            self.events.push(Event::StageStarted {
                stage_index: stage,
                stage: self.cfg.stages[stage].name.clone(),
            });
            let Some(strategy) = self.strategies[stage].as_mut() else {
                unreachable!("strategies are out only while a round is aggregating");
            };
            if let Err(e) = strategy.initial(&infos) {
                tracing::error!(stage = %self.cfg.stages[stage].name, "strategy initial: {e}");
            }
            if self.cfg.stages[stage].rounds == 0 && kind == TaskKind::Fit {
                self.phase = Phase::Idle(Next::Finish { stage });
                return;
            }
        }
        if let Some(strategy) = self.strategies[stage].as_mut() {
            strategy.on_round_start();
        }
        let mut alive = self.alive_clients();
        let selected = if kind == TaskKind::Fit {
            alive.shuffle(&mut self.rng);
            let want = (self.cfg.fraction_fit * alive.len() as f64).ceil() as usize;
            let n = want.max(self.cfg.min_fit_clients).min(alive.len());
            let mut s: Vec<String> = alive.into_iter().take(n).collect();
            s.sort();
            s
        } else {
            alive
        };
        let mut tasks = BTreeMap::new();
        for name in &selected {
            self.task_seq += 1;
            let task_id = format!("t{}-{}", self.task_seq, name);
            tasks.insert(
                name.clone(),
                Issued {
                    task_id,
                    session: self.clients[name].info.session.clone(),
                    waiting: true,
                },
            );
        }
        self.events.push(Event::RoundStarted {
            stage_index: stage,
            round,
            kind,
            clients: selected.clone(),
        });
        let secure = match (&self.cfg.stages[stage].secure, kind) {
            (Some(config), TaskKind::Fit) => {
                Some(self.secure_round(stage, round, config, &selected, now))
            }
            _ => None,
        };
        if secure.as_ref().is_some_and(|s| s.failed.is_some()) {
            // Nothing can be aggregated securely: no task goes out, the round closes at once.
            tasks.clear();
        }
        self.phase = Phase::Collect(RoundState {
            kind,
            stage,
            round,
            started: now,
            selected,
            tasks,
            results: BTreeMap::new(),
            failures: BTreeMap::new(),
            serialize_secs: 0.0,
            secure,
        });
    }

    /// The secure-aggregation state of a FIT round of `selected` (failed at once when the
    /// protocol cannot run: that round then aggregates nothing).
    fn secure_round(
        &self,
        stage: usize,
        round: u32,
        config: &SecureAggregation,
        selected: &[String],
        now: Duration,
    ) -> SecureRound {
        let context = secagg::context(&self.cfg.run_id, stage, round);
        let strategy = self.strategies[stage].as_deref();
        let len = strategy.and_then(|s| s.secure_len());
        // FedE: each organisation's rows in the round's shared row space.
        let rows: BTreeMap<String, secagg::SecureRows> = selected
            .iter()
            .filter_map(|n| {
                let info = &self.clients.get(n)?.info;
                Some((n.clone(), strategy?.secure_rows(info)?))
            })
            .collect();
        let protocol = match len {
            Some(len) => {
                SecureFit::new(config, &context, len, selected, &rows).map_err(|e| e.to_string())
            }
            None => Err("the stage's strategy cannot aggregate securely".to_string()),
        };
        let (protocol, failed) = match protocol {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        SecureRound {
            protocol,
            step_started: now,
            trained: BTreeMap::new(),
            ready: false,
            failed,
        }
    }

    /// Closes the current step of a secure FIT round and, if the protocol goes on, issues the
    /// next step's tasks. `false`: the round is over (unmasked or failed) and must close.
    fn next_secure_step(&mut self, now: Duration) -> bool {
        let Phase::Collect(rs) = &mut self.phase else {
            return false;
        };
        let Some(sr) = &mut rs.secure else {
            return false;
        };
        let Some(protocol) = sr.protocol.as_mut() else {
            return false;
        };
        match protocol.advance() {
            Ok(true) => {}
            Ok(false) => {
                sr.ready = true;
                return false;
            }
            Err(e) => {
                sr.failed = Some(e.to_string());
                return false;
            }
        }
        sr.step_started = now;
        self.past_tasks
            .extend(rs.tasks.values().map(|t| t.task_id.clone()));
        rs.tasks.clear();
        for name in protocol.participants() {
            // A participant that left (or registered again, losing its protocol state) is
            // simply absent from this step.
            let Some(c) = self.clients.get(&name).filter(|c| c.alive) else {
                continue;
            };
            self.task_seq += 1;
            rs.tasks.insert(
                name.clone(),
                Issued {
                    task_id: format!("t{}-{}", self.task_seq, name),
                    session: c.info.session.clone(),
                    waiting: true,
                },
            );
        }
        true
    }

    fn close(&mut self, now: Duration, timed_out: bool) {
        let Phase::Collect(rs) = std::mem::replace(&mut self.phase, Phase::Done { at: now }) else {
            unreachable!("close outside a round");
        };
        let spec = &self.cfg.stages[rs.stage];
        self.past_tasks
            .extend(rs.tasks.values().map(|t| t.task_id.clone()));
        let mut rs = rs;
        // A secure round counts the organisations whose masked input is in the sum; the
        // coordinator knows their training metrics, never their updates.
        let mut secure = None;
        let mut secure_note = None;
        if let Some(sr) = rs.secure.take() {
            let survivors = sr
                .protocol
                .as_ref()
                .map(|p| p.survivors())
                .unwrap_or_default();
            let mut trained = sr.trained;
            rs.results = survivors
                .iter()
                .filter_map(|n| trained.remove_entry(n))
                .collect();
            if let (true, Some(protocol)) = (sr.ready, sr.protocol) {
                secure = Some(Box::new(protocol));
                secure_note = Some(format!(
                    "secure aggregation: the sum of {} organisations",
                    survivors.len()
                ));
            } else {
                secure_note = Some(format!(
                    "secure aggregation failed: {}",
                    sr.failed
                        .as_deref()
                        .unwrap_or("the protocol did not finish")
                ));
            }
        }
        let is_secure = secure_note.is_some();
        let results: Vec<ClientResult> = rs.results.into_values().collect();
        let enough = results.len() >= self.cfg.min_fit_clients && (!is_secure || secure.is_some());
        let note = if !enough && rs.kind != TaskKind::FinishStage {
            Some(match &secure_note {
                Some(n) if secure.is_none() => n.clone(),
                _ => format!(
                    "only {} of the required {} clients answered",
                    results.len(),
                    self.cfg.min_fit_clients
                ),
            })
        } else {
            secure_note
        };
        let metric_inputs: Vec<(u64, BTreeMap<String, f64>)> = results
            .iter()
            .map(|r| (r.num_examples, r.metrics.clone()))
            .collect();
        let answered: HashSet<&str> = results
            .iter()
            .map(|r| r.client.name.as_str())
            .chain(rs.failures.keys().map(|s| s.as_str()))
            .collect();
        let missing = if is_secure {
            // Every selected organisation outside the sum that did not fail: it dropped out.
            rs.selected
                .iter()
                .filter(|n| !answered.contains(n.as_str()))
                .cloned()
                .collect()
        } else {
            rs.tasks
                .keys()
                .filter(|n| !answered.contains(n.as_str()))
                .cloned()
                .collect()
        };
        let mut metrics = weighted_metrics(&metric_inputs);
        if rs.kind == TaskKind::Fit && spec.privacy.is_some() {
            // Every FIT round is charged, aggregated or not: the uploads were made.
            let q = (rs.selected.len() as f64 / self.clients.len().max(1) as f64).min(1.0);
            if let Some((eps, delta)) = self.charge_privacy(rs.stage, q) {
                metrics.insert(DP_SAMPLING_RATE.to_owned(), q);
                metrics.insert(DP_EPSILON.to_owned(), eps);
                metrics.insert(DP_DELTA.to_owned(), delta);
            }
        }
        let spec = &self.cfg.stages[rs.stage];
        let record = RoundRecord {
            run_id: self.cfg.run_id.clone(),
            stage_index: rs.stage,
            stage: spec.name.clone(),
            stage_kind: spec.kind(),
            round: rs.round,
            kind: rs.kind,
            selected: rs.selected,
            num_clients: results.len(),
            clients: results
                .iter()
                .map(|r| {
                    (
                        r.client.name.clone(),
                        ClientRecord {
                            num_examples: r.num_examples,
                            metrics: r.metrics.clone(),
                        },
                    )
                })
                .collect(),
            failures: rs.failures,
            missing,
            // FIT: set once the aggregation succeeds. EVALUATE: enough answers to count.
            aggregated: rs.kind == TaskKind::Evaluate && enough,
            note,
            metrics,
            timed_out,
            started_secs: rs.started.as_secs_f64(),
            ended_secs: now.as_secs_f64(),
            coordinator: Overhead {
                serialize_secs: rs.serialize_secs,
                aggregate_secs: 0.0,
                total_secs: rs.serialize_secs,
            },
        };
        if rs.kind == TaskKind::Fit && enough {
            let Some(strategy) = self.strategies[rs.stage].take() else {
                unreachable!("one aggregation at a time");
            };
            self.job = Some(AggregationJob {
                stage: rs.stage,
                round: rs.round,
                strategy,
                results,
                secure,
            });
            self.phase = Phase::Aggregating(Box::new(record));
            return;
        }
        self.finish_close(record);
    }

    /// Records a closed round and moves on to what follows it.
    fn finish_close(&mut self, record: RoundRecord) {
        let (stage, round, kind) = (record.stage_index, record.round, record.kind);
        let spec = self.cfg.stages[stage].clone();
        let now = Duration::from_secs_f64(record.ended_secs);
        let updated = (record.aggregated && kind == TaskKind::Fit)
            .then(|| self.strategies[stage].as_deref())
            .flatten()
            .map(|strategy| Event::GlobalUpdated {
                stage_index: stage,
                stage: spec.name.clone(),
                round,
                global: strategy.global(),
            });
        self.records.push(record.clone());
        self.events.push(Event::RoundCompleted(record));
        self.events.extend(updated);
        if kind == TaskKind::FinishStage {
            self.events.push(Event::StageFinished {
                stage_index: stage,
                stage: spec.name.clone(),
            });
        }
        match self.next_after(stage, round, kind) {
            Some(n) => self.phase = Phase::Idle(n),
            None => {
                self.phase = Phase::Done { at: now };
                self.events.push(Event::Done);
            }
        }
    }

    /// What follows the round `(stage, round, kind)`; `None`: the run is over.
    fn next_after(&self, stage: usize, round: u32, kind: TaskKind) -> Option<Next> {
        let spec = &self.cfg.stages[stage];
        match kind {
            TaskKind::Fit => {
                let eval = round == spec.rounds
                    || (spec.eval_every > 0 && round.is_multiple_of(spec.eval_every));
                if eval {
                    Some(Next::Evaluate { stage, round })
                } else {
                    Some(Next::Fit {
                        stage,
                        round: round + 1,
                    })
                }
            }
            TaskKind::Evaluate => {
                if round < spec.rounds {
                    Some(Next::Fit {
                        stage,
                        round: round + 1,
                    })
                } else {
                    Some(Next::Finish { stage })
                }
            }
            TaskKind::FinishStage => (stage + 1 < self.cfg.stages.len()).then_some(Next::Fit {
                stage: stage + 1,
                round: 1,
            }),
        }
    }
}

/// A session id: 128 bits from the operating system's generator, so that no one can guess
/// another client's session from the run's seed or from its own.
fn new_session_id() -> String {
    use rand::TryRngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random generator is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod secure_tests;

/// Takes one answer of a secure FIT round: the keys step also brings the training outcome
/// (examples and metrics, for the record); no step carries arrays.
fn secure_answer(sr: &mut SecureRound, client: &ClientInfo, report: Report) -> Result<(), String> {
    if let Some(e) = report.error {
        return Err(format!("client error: {e}"));
    }
    if !report.arrays.is_empty() {
        return Err("invalid result: a secure round's answer carries no arrays".into());
    }
    if let Some((k, v)) = report.metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(format!("invalid result: metric {k:?} is {v}"));
    }
    let Some(reply) = report.secagg else {
        return Err("invalid result: no secure aggregation answer".into());
    };
    let begins = matches!(reply, SecAggReply::Keys(_));
    sr.protocol
        .as_mut()
        .ok_or("secure aggregation did not start")?
        .on_reply(&client.name, reply)
        .map_err(|e| format!("secure aggregation: {e}"))?;
    if begins {
        sr.trained.insert(
            client.name.clone(),
            ClientResult {
                num_examples: report.num_examples.min(client.num_examples),
                client: client.clone(),
                arrays: Vec::new(),
                metrics: report.metrics,
            },
        );
    }
    Ok(())
}
