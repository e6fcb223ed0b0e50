//! Observability: the Prometheus metrics of the coordinator ([`CoordinatorMetrics`]) and of a
//! client ([`ClientMetrics`]), and the HTTP endpoint that serves a registry as text
//! ([`serve_metrics`], [`MetricsServer`]) on a port of its own, apart from the gRPC one.
//!
//! Every name starts with `simskip_` (the client's with `simskip_client_`). The coordinator's
//! per-round figures are derived in one place, [`CoordinatorMetrics::observe`], from the
//! events of the round state machine; the few figures no event carries (bytes on the wire,
//! alive clients, ignored results) are fed by the service and the ticker.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::coordinator::rounds::{Event, RoundRecord};
use crate::error::FedError;
use crate::types::TaskKind;

/// The common prefix of every metric name.
pub const PREFIX: &str = "simskip";

/// A gauge of floating-point values.
type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoundLabels {
    stage: String,
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    stage: String,
    kind: &'static str,
    name: String,
}

fn kind(k: TaskKind) -> KindLabels {
    KindLabels { kind: k.as_str() }
}

/// Round durations and local task times: 50 ms to 30 minutes.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ])
}

/// Aggregation times: 1 ms to 1 minute.
fn aggregation_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// The registry as Prometheus text (exposition format 0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail, and every metric here encodes.
    prometheus_text::encode(&mut text, registry).expect("metrics encode into a String");
    text
}

/// What the coordinator counts. Cloning shares the same metrics.
#[derive(Clone, Debug)]
pub struct CoordinatorMetrics {
    registry: Arc<Registry>,
    rounds_closed: Family<RoundLabels, Counter>,
    stage_index: Gauge,
    round: Gauge,
    clients_alive: Gauge,
    clients_registered: Counter,
    clients_dead: Counter,
    results_accepted: Family<KindLabels, Counter>,
    results_failed: Family<KindLabels, Counter>,
    results_missing: Family<KindLabels, Counter>,
    results_ignored: Counter,
    /// The state machine's running count of ignored results, as last seen.
    ignored_seen: Arc<AtomicU64>,
    bytes_in: Counter,
    bytes_out: Counter,
    round_seconds: HistogramFamily<KindLabels>,
    aggregation_seconds: Histogram,
    aggregate_metric: Family<MetricLabels, FloatGauge>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix(PREFIX);
        let m = Self {
            registry: Arc::default(),
            rounds_closed: Family::default(),
            stage_index: Gauge::default(),
            round: Gauge::default(),
            clients_alive: Gauge::default(),
            clients_registered: Counter::default(),
            clients_dead: Counter::default(),
            results_accepted: Family::default(),
            results_failed: Family::default(),
            results_missing: Family::default(),
            results_ignored: Counter::default(),
            ignored_seen: Arc::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            round_seconds: Family::new_with_constructor(duration_histogram),
            aggregation_seconds: aggregation_histogram(),
            aggregate_metric: Family::default(),
        };
        r.register(
            "rounds_closed",
            "Closed rounds by stage, kind (fit, evaluate, finish_stage) and outcome (ok: FIT \
             aggregated, EVALUATE counted, FINISH_STAGE acknowledged by every selected client; \
             failed otherwise)",
            m.rounds_closed.clone(),
        );
        r.register(
            "stage_index",
            "Index of the stage of the latest round started",
            m.stage_index.clone(),
        );
        r.register(
            "round",
            "Round number of the latest round started",
            m.round.clone(),
        );
        r.register(
            "clients_alive",
            "Registered clients not yet silent for heartbeat_timeout_secs",
            m.clients_alive.clone(),
        );
        r.register(
            "clients_registered",
            "Registrations, re-registrations included",
            m.clients_registered.clone(),
        );
        r.register(
            "clients_dead",
            "Clients marked dead for silence",
            m.clients_dead.clone(),
        );
        r.register(
            "results_accepted",
            "Results counted in their round, by task kind (added when the round closes)",
            m.results_accepted.clone(),
        );
        r.register(
            "results_failed",
            "Failed answers (client error or invalid result), by task kind (added when the \
             round closes)",
            m.results_failed.clone(),
        );
        r.register(
            "results_missing",
            "Selected clients that never answered (timed out, died or re-registered), by task \
             kind",
            m.results_missing.clone(),
        );
        r.register(
            "results_ignored",
            "Results not counted: stale, duplicate, unknown session or task, too large",
            m.results_ignored.clone(),
        );
        r.register(
            "bytes_in",
            "Payload bytes received in result streams",
            m.bytes_in.clone(),
        );
        r.register(
            "bytes_out",
            "Payload bytes sent in task streams",
            m.bytes_out.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Wall time of closed rounds, from start to close (aggregation included), by kind",
            m.round_seconds.clone(),
        );
        r.register(
            "aggregation_seconds",
            "Time the strategy took to aggregate a FIT round",
            m.aggregation_seconds.clone(),
        );
        r.register(
            "aggregate_metric",
            "Latest example-weighted metric of each stage and round kind, by metric name",
            m.aggregate_metric.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The metrics as Prometheus text.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// Counts what an event of the round state machine says.
    pub fn observe(&self, e: &Event) {
        match e {
            Event::ClientRegistered { .. } => {
                self.clients_registered.inc();
            }
            Event::ClientDead { .. } => {
                self.clients_dead.inc();
            }
            Event::RoundStarted {
                stage_index, round, ..
            } => {
                self.stage_index.set(*stage_index as i64);
                self.round.set(i64::from(*round));
            }
            Event::RoundCompleted(r) => self.round_closed(r),
            Event::StageStarted { .. }
            | Event::GlobalUpdated { .. }
            | Event::StageFinished { .. }
            | Event::Done
            | Event::Aborted { .. } => {}
        }
    }

    fn round_closed(&self, r: &RoundRecord) {
        let k = kind(r.kind);
        let ok = match r.kind {
            TaskKind::Fit | TaskKind::Evaluate => r.aggregated,
            TaskKind::FinishStage => r.failures.is_empty() && r.missing.is_empty(),
        };
        self.rounds_closed
            .get_or_create(&RoundLabels {
                stage: r.stage.clone(),
                kind: k.kind,
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
        self.results_accepted
            .get_or_create(&k)
            .inc_by(r.clients.len() as u64);
        self.results_failed
            .get_or_create(&k)
            .inc_by(r.failures.len() as u64);
        self.results_missing
            .get_or_create(&k)
            .inc_by(r.missing.len() as u64);
        self.round_seconds
            .get_or_create(&k)
            .observe((r.ended_secs - r.started_secs).max(0.0));
        // A FIT round went to the strategy when it aggregated, or when its aggregation failed
        // (which took time too).
        if r.kind == TaskKind::Fit && (r.aggregated || r.coordinator.aggregate_secs > 0.0) {
            self.aggregation_seconds
                .observe(r.coordinator.aggregate_secs);
        }
        for (name, v) in &r.metrics {
            self.aggregate_metric
                .get_or_create(&MetricLabels {
                    stage: r.stage.clone(),
                    kind: k.kind,
                    name: name.clone(),
                })
                .set(*v);
        }
    }

    /// What no event says: the clients alive now and the state machine's running count of
    /// ignored results.
    pub fn observe_state(&self, alive: usize, ignored_total: u64) {
        self.clients_alive.set(alive as i64);
        let before = self
            .ignored_seen
            .fetch_max(ignored_total, Ordering::Relaxed);
        if ignored_total > before {
            self.results_ignored.inc_by(ignored_total - before);
        }
    }

    /// Payload bytes received from a client.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.inc_by(n as u64);
    }

    /// Payload bytes sent to a client.
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.inc_by(n as u64);
    }
}

/// What a client counts: its progress through the run. Cloning shares the same metrics.
#[derive(Clone, Debug)]
pub struct ClientMetrics {
    registry: Arc<Registry>,
    registrations: Counter,
    tasks_started: Family<KindLabels, Counter>,
    tasks_completed: Family<KindLabels, Counter>,
    tasks_failed: Family<KindLabels, Counter>,
    results_not_accepted: Counter,
    bytes_received: Counter,
    bytes_sent: Counter,
    stage_index: Gauge,
    round: Gauge,
    task_seconds: HistogramFamily<KindLabels>,
    last_metric: Family<MetricLabels, FloatGauge>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientMetrics {
    /// Fresh metrics in a registry of their own.
    pub fn new() -> Self {
        let mut reg = Registry::with_prefix(PREFIX);
        let r = reg.sub_registry_with_prefix("client");
        let m = Self {
            registry: Arc::default(),
            registrations: Counter::default(),
            tasks_started: Family::default(),
            tasks_completed: Family::default(),
            tasks_failed: Family::default(),
            results_not_accepted: Counter::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            stage_index: Gauge::default(),
            round: Gauge::default(),
            task_seconds: Family::new_with_constructor(duration_histogram),
            last_metric: Family::default(),
        };
        r.register(
            "registrations",
            "Registrations with the coordinator (a new session after a broken connection \
             counts again)",
            m.registrations.clone(),
        );
        r.register(
            "tasks_started",
            "Tasks received, by kind",
            m.tasks_started.clone(),
        );
        r.register(
            "tasks_completed",
            "Tasks whose local work succeeded, by kind",
            m.tasks_completed.clone(),
        );
        r.register(
            "tasks_failed",
            "Tasks whose local work failed (reported to the coordinator as failed), by kind",
            m.tasks_failed.clone(),
        );
        r.register(
            "results_not_accepted",
            "Results the coordinator answered as failed or ignored",
            m.results_not_accepted.clone(),
        );
        r.register(
            "bytes_received",
            "Payload bytes received in task streams",
            m.bytes_received.clone(),
        );
        r.register(
            "bytes_sent",
            "Payload bytes sent in result streams",
            m.bytes_sent.clone(),
        );
        r.register(
            "stage_index",
            "Index of the stage of the latest task",
            m.stage_index.clone(),
        );
        r.register("round", "Round of the latest task", m.round.clone());
        r.register(
            "task_seconds",
            "Time of the local work of a task, by kind",
            m.task_seconds.clone(),
        );
        r.register(
            "last_metric",
            "Latest metric this client reported, by stage, task kind and metric name",
            m.last_metric.clone(),
        );
        Self {
            registry: Arc::new(reg),
            ..m
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The metrics as Prometheus text.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    pub(crate) fn registered(&self) {
        self.registrations.inc();
    }

    pub(crate) fn task_started(&self, k: TaskKind, stage_index: usize, round: u32) {
        self.tasks_started.get_or_create(&kind(k)).inc();
        self.stage_index.set(stage_index as i64);
        self.round.set(i64::from(round));
    }

    /// The local work of a task ended, successfully with `metrics` or not.
    pub(crate) fn task_ended<'a>(
        &self,
        k: TaskKind,
        stage: &str,
        took: Duration,
        metrics: Option<impl IntoIterator<Item = (&'a String, &'a f64)>>,
    ) {
        let labels = kind(k);
        self.task_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        let Some(metrics) = metrics else {
            self.tasks_failed.get_or_create(&labels).inc();
            return;
        };
        self.tasks_completed.get_or_create(&labels).inc();
        for (name, v) in metrics {
            self.last_metric
                .get_or_create(&MetricLabels {
                    stage: stage.to_string(),
                    kind: labels.kind,
                    name: name.clone(),
                })
                .set(*v);
        }
    }

    pub(crate) fn result_not_accepted(&self) {
        self.results_not_accepted.inc();
    }

    pub(crate) fn add_bytes_received(&self, n: usize) {
        self.bytes_received.inc_by(n as u64);
    }

    /// A handle that counts bytes sent (moved into a result stream).
    pub(crate) fn bytes_sent(&self) -> Counter {
        self.bytes_sent.clone()
    }
}

/// Checks a `host:port` listen address without resolving it: the port a number, the host
/// not empty. The error says why, in a few words.
pub fn check_listen_address(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("not a host:port address".into());
    };
    if host.is_empty() {
        return Err("the host is missing (e.g. 127.0.0.1:9090 or 0.0.0.0:9090)".into());
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("port {port:?} is not a number in 0..=65535"));
    }
    Ok(())
}

/// Binds `addr` (`host:port`; port 0 picks a free port).
pub async fn bind(addr: &str) -> Result<TcpListener, FedError> {
    let listen_error = |reason: String| FedError::Listen {
        addr: addr.to_string(),
        reason,
    };
    let resolved: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| listen_error(e.to_string()))?
        .next()
        .ok_or_else(|| listen_error("resolves to nothing".into()))?;
    TcpListener::bind(resolved)
        .await
        .map_err(|e| listen_error(format!("binding {resolved}: {e}")))
}

async fn metrics_handler(
    axum::extract::State(registry): axum::extract::State<Arc<Registry>>,
) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_text::encode(&mut text, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "the metrics could not be encoded\n".to_string(),
        ),
    }
}

/// Serves `GET /metrics` (the registry as Prometheus text) on `listener` until `shutdown`
/// resolves. Returns the bound address (useful with port 0) and the server's task.
pub fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .with_state(registry);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((addr, task))
}

/// A running metrics endpoint; stopped by [`MetricsServer::stop`] or when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl MetricsServer {
    /// Binds `listen`, serves `registry` there, and writes the bound address to
    /// `address_file` (atomically) when given. `who` names the process in the log line.
    pub async fn start(
        listen: &str,
        address_file: Option<&Path>,
        registry: Arc<Registry>,
        who: &str,
    ) -> Result<Self, FedError> {
        let listener = bind(listen).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) = serve_metrics(listener, registry, async {
            let _ = stopped.await;
        })
        .map_err(|e| FedError::Listen {
            addr: listen.to_string(),
            reason: e.to_string(),
        })?;
        let server = Self {
            addr,
            stop: Some(stop),
            task,
        };
        if let Some(path) = address_file {
            simskip_data::fsutil::write_atomic(path, addr.to_string().as_bytes()).map_err(|e| {
                FedError::Output(format!(
                    "writing the bound metrics address to {}: {e}",
                    path.display()
                ))
            })?;
        }
        tracing::info!("{who}: Prometheus metrics at http://{addr}/metrics");
        Ok(server)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (for up to 5 s), and ends the task.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(Ok(Err(e))) => tracing::warn!("metrics endpoint: {e}"),
            Ok(_) => {}
            Err(_) => tracing::warn!("metrics endpoint slow to stop: aborted"),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::coordinator::rounds::{ClientRecord, Overhead};
    use crate::types::StageKind;

    type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

    /// `name{k="v",...} value` lines of a text exposition, keyed by name and sorted labels.
    fn samples(text: &str) -> Samples {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut labels: Vec<(String, String)> = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    labels.sort();
                    (n.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            assert!(out.insert((name, labels), value).is_none(), "{line}");
        }
        out
    }

    fn get(s: &Samples, name: &str, l: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = l
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        *s.get(&(name.to_string(), labels))
            .unwrap_or_else(|| panic!("no {name} {l:?}"))
    }

    /// A closed round of stage "fede"; FIT and EVALUATE count with two answers or more, and
    /// only a FIT round that counted was aggregated (in 20 ms).
    fn record(kind: TaskKind, round: u32, clients: &[&str], failed: &[&str]) -> RoundRecord {
        let enough = kind != TaskKind::FinishStage && clients.len() >= 2;
        RoundRecord {
            run_id: "r".into(),
            stage_index: 0,
            stage: "fede".into(),
            stage_kind: StageKind::FedE,
            round,
            kind,
            selected: clients
                .iter()
                .chain(failed)
                .map(|s| s.to_string())
                .collect(),
            num_clients: clients.len(),
            clients: clients
                .iter()
                .map(|c| {
                    (
                        c.to_string(),
                        ClientRecord {
                            num_examples: 1,
                            metrics: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
            failures: failed
                .iter()
                .map(|c| (c.to_string(), "boom".to_string()))
                .collect(),
            missing: Vec::new(),
            aggregated: enough,
            note: None,
            metrics: BTreeMap::from([("mrr".to_string(), 0.25 * f64::from(round))]),
            timed_out: false,
            started_secs: 1.0,
            ended_secs: 3.5,
            coordinator: Overhead {
                serialize_secs: 0.0,
                aggregate_secs: if kind == TaskKind::Fit && enough {
                    0.02
                } else {
                    0.0
                },
                total_secs: 0.0,
            },
        }
    }

    #[test]
    fn coordinator_counts_what_the_events_say() {
        let m = CoordinatorMetrics::new();
        for name in ["a", "b", "c"] {
            m.observe(&Event::ClientRegistered {
                name: name.into(),
                session: "s".into(),
                rejoined: false,
            });
        }
        m.observe(&Event::ClientDead { name: "c".into() });
        m.observe(&Event::RoundStarted {
            stage_index: 1,
            round: 2,
            kind: TaskKind::Fit,
            clients: vec![],
        });
        m.observe(&Event::RoundCompleted(record(
            TaskKind::Fit,
            1,
            &["a", "b"],
            &[],
        )));
        m.observe(&Event::RoundCompleted(record(
            TaskKind::Fit,
            2,
            &["a"],
            &["b"],
        )));
        m.observe(&Event::RoundCompleted(record(
            TaskKind::Evaluate,
            2,
            &["a", "b"],
            &[],
        )));
        m.observe(&Event::RoundCompleted(record(
            TaskKind::FinishStage,
            2,
            &["a", "b"],
            &[],
        )));
        m.observe_state(2, 3);
        m.observe_state(2, 3); // the same running total again: nothing new
        m.observe_state(2, 4);
        m.add_bytes_in(100);
        m.add_bytes_out(40);
        m.add_bytes_out(2);

        let s = samples(&m.encode());
        let closed = |kind: &str, outcome: &str| {
            get(
                &s,
                "simskip_rounds_closed_total",
                &[("stage", "fede"), ("kind", kind), ("outcome", outcome)],
            )
        };
        assert_eq!(closed("fit", "ok"), 1.0);
        assert_eq!(closed("fit", "failed"), 1.0);
        assert_eq!(closed("evaluate", "ok"), 1.0);
        assert_eq!(closed("finish_stage", "ok"), 1.0);
        let by_kind = |name: &str, kind: &str| get(&s, name, &[("kind", kind)]);
        assert_eq!(by_kind("simskip_results_accepted_total", "fit"), 3.0);
        assert_eq!(by_kind("simskip_results_failed_total", "fit"), 1.0);
        assert_eq!(by_kind("simskip_results_accepted_total", "evaluate"), 2.0);
        assert_eq!(get(&s, "simskip_results_ignored_total", &[]), 4.0);
        assert_eq!(get(&s, "simskip_clients_registered_total", &[]), 3.0);
        assert_eq!(get(&s, "simskip_clients_dead_total", &[]), 1.0);
        assert_eq!(get(&s, "simskip_clients_alive", &[]), 2.0);
        assert_eq!(get(&s, "simskip_stage_index", &[]), 1.0);
        assert_eq!(get(&s, "simskip_round", &[]), 2.0);
        assert_eq!(get(&s, "simskip_bytes_in_total", &[]), 100.0);
        assert_eq!(get(&s, "simskip_bytes_out_total", &[]), 42.0);
        // Two FIT rounds of 2.5 s each; only the first went to the strategy.
        assert_eq!(by_kind("simskip_round_duration_seconds_count", "fit"), 2.0);
        assert_eq!(by_kind("simskip_round_duration_seconds_sum", "fit"), 5.0);
        assert_eq!(
            get(
                &s,
                "simskip_round_duration_seconds_bucket",
                &[("kind", "fit"), ("le", "+Inf")]
            ),
            2.0
        );
        assert_eq!(get(&s, "simskip_aggregation_seconds_count", &[]), 1.0);
        // The latest value of each (stage, kind, metric) wins.
        let metric = |kind: &str| {
            get(
                &s,
                "simskip_aggregate_metric",
                &[("stage", "fede"), ("kind", kind), ("name", "mrr")],
            )
        };
        assert_eq!(metric("fit"), 0.5);
        assert_eq!(metric("evaluate"), 0.5);
    }

    #[test]
    fn client_counts_its_tasks() {
        let m = ClientMetrics::new();
        m.registered();
        m.task_started(TaskKind::Fit, 0, 1);
        let metrics = BTreeMap::from([("loss".to_string(), 1.5)]);
        m.task_ended(
            TaskKind::Fit,
            "fede",
            Duration::from_millis(200),
            Some(&metrics),
        );
        m.task_started(TaskKind::Evaluate, 1, 3);
        m.task_ended(
            TaskKind::Evaluate,
            "simskip",
            Duration::from_millis(100),
            None::<&BTreeMap<String, f64>>,
        );
        m.add_bytes_received(64);
        m.bytes_sent().inc_by(32);
        let s = samples(&m.encode());
        let by_kind = |name: &str, kind: &str| get(&s, name, &[("kind", kind)]);
        assert_eq!(get(&s, "simskip_client_registrations_total", &[]), 1.0);
        assert_eq!(by_kind("simskip_client_tasks_started_total", "fit"), 1.0);
        assert_eq!(by_kind("simskip_client_tasks_completed_total", "fit"), 1.0);
        assert_eq!(
            by_kind("simskip_client_tasks_failed_total", "evaluate"),
            1.0
        );
        assert_eq!(
            by_kind("simskip_client_task_seconds_count", "evaluate"),
            1.0
        );
        assert_eq!(get(&s, "simskip_client_stage_index", &[]), 1.0);
        assert_eq!(get(&s, "simskip_client_round", &[]), 3.0);
        assert_eq!(get(&s, "simskip_client_bytes_received_total", &[]), 64.0);
        assert_eq!(get(&s, "simskip_client_bytes_sent_total", &[]), 32.0);
        assert_eq!(
            get(
                &s,
                "simskip_client_last_metric",
                &[("stage", "fede"), ("kind", "fit"), ("name", "loss")]
            ),
            1.5
        );
    }

    #[test]
    fn listen_addresses_are_checked() {
        assert!(check_listen_address("127.0.0.1:0").is_ok());
        assert!(check_listen_address("[::1]:9090").is_ok());
        assert!(check_listen_address("coordinator:9090").is_ok());
        assert!(check_listen_address("9090").is_err());
        assert!(check_listen_address(":9090").is_err());
        assert!(check_listen_address("0.0.0.0:99999").is_err());
    }
}
