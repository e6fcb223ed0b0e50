//! The coordinator: configuration ([`config`]), the pure round state machine ([`rounds`]),
//! the gRPC service ([`service`]), the run's outputs ([`sink`]), and the run loop here that
//! binds, ticks, and stops.

pub mod config;
pub mod rounds;
mod service;
mod sink;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify};

use crate::error::FedError;
use crate::proto::coordinator_server::CoordinatorServer;
use crate::strategy::Strategy;
use crate::telemetry::{CoordinatorMetrics, MetricsServer};
use crate::types::GlobalSnapshot;
use config::{secs, ServerConfig};
use rounds::{Event, ResumePoint, RoundRecord, Rounds};
use service::{Service, Shared};
use sink::Sink;
use store::{CheckpointFallback, Start, Store};

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    /// Every closed round (FIT, EVALUATE, FINISH_STAGE) in order.
    pub records: Vec<RoundRecord>,
    /// Final global state of each stage.
    pub globals: Vec<GlobalSnapshot>,
    pub ignored_results: u64,
    /// True when the run reached DONE (false: stopped by the shutdown signal, or a fault).
    pub completed: bool,
    /// The `shutdown` future resolved (SIGTERM/SIGINT): the run was stopped on request and
    /// can be resumed by restarting the coordinator with the same configuration.
    pub shutdown_requested: bool,
    pub out_dir: PathBuf,
    /// Set when this run continued an earlier incarnation's (see [`store::Store::start`]).
    pub resumed: Option<Resumed>,
    /// Per round this incarnation committed: (checkpoint ms, transaction ms).
    pub commit_ms: Vec<(f64, f64)>,
}

/// How a restarted coordinator continued its run.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    /// Committed rounds it continued after.
    pub from_rounds: usize,
    /// Committed rounds dropped because they came after a bad checkpoint.
    pub discarded_rounds: usize,
    /// Bad checkpoints skipped.
    pub fallbacks: Vec<CheckpointFallback>,
}

/// Binds `cfg.listen` and runs the coordinator until the run is DONE (all stages complete
/// and every alive client told DONE, or `done_grace_secs` passed) or `shutdown` resolves.
/// `strategies`: one per stage, in stage order, kinds matching. With `cfg.address_file` set,
/// the bound address (useful with port 0) is written there once listening. With
/// `cfg.metrics_listen` set, Prometheus metrics are served there (`GET /metrics`) while the
/// run lasts, and its bound address is written to `cfg.metrics_address_file` first.
pub async fn run_server(
    cfg: ServerConfig,
    strategies: Vec<Box<dyn Strategy>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, FedError> {
    cfg.validate()?;
    let listen_error = |reason: String| FedError::Listen {
        addr: cfg.listen.clone(),
        reason,
    };
    let addr: SocketAddr = tokio::net::lookup_host(&cfg.listen)
        .await
        .map_err(|e| listen_error(e.to_string()))?
        .next()
        .ok_or_else(|| listen_error("resolves to nothing".into()))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| listen_error(format!("binding {addr}: {e}")))?;
    serve(cfg, listener, strategies, shutdown).await
}

/// Like [`run_server`] on an already bound listener (`cfg.listen` is ignored): bind port 0
/// and read `listener.local_addr()` to run on a free port.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    strategies: Vec<Box<dyn Strategy>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, FedError> {
    let mut cfg = cfg;
    cfg.validate()?;
    // Certificates and keys are read before anything is written or served.
    let (tls, gatekeeper) = cfg.auth.load()?;
    let (rounds, store, resumed, clock) = open_run(&mut cfg, strategies)?;
    let sink = Sink::open(&cfg.out_dir, &cfg.run_id, store)?;
    let (tx, rx) = std::sync::mpsc::channel::<Option<Event>>();
    let sink_thread = std::thread::spawn(move || -> (Result<(), FedError>, Vec<(f64, f64)>) {
        let mut sink = sink;
        let mut first_err = None;
        while let Ok(Some(e)) = rx.recv() {
            if let Err(err) = sink.handle(e) {
                tracing::error!("writing run outputs: {err}");
                first_err.get_or_insert(err);
            }
        }
        let costs = sink
            .costs
            .iter()
            .map(|c| (c.checkpoint_ms, c.transaction_ms))
            .collect();
        (first_err.map_or(Ok(()), Err), costs)
    });

    let shared = Arc::new(Shared {
        rounds: Mutex::new(rounds),
        notify: Notify::new(),
        // A resumed run's clock goes on from where the last committed round ended.
        start: Instant::now()
            .checked_sub(clock)
            .unwrap_or_else(Instant::now),
        run_id: cfg.run_id.clone(),
        gatekeeper,
        chunk_bytes: cfg.chunk_bytes,
        heartbeat_interval: secs(cfg.heartbeat_interval_secs),
        poll_timeout: secs(cfg.poll_timeout_secs),
        max_entity_keys: cfg.max_entity_keys,
        closing: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        told_stop: Default::default(),
        encode_nanos: AtomicU64::new(0),
        events: tx,
        telemetry: CoordinatorMetrics::new(),
    });
    let metrics = match &cfg.metrics_listen {
        Some(addr) => Some(
            MetricsServer::start(
                addr,
                cfg.metrics_address_file.as_deref(),
                shared.telemetry.registry(),
                "coordinator",
            )
            .await?,
        ),
        None => None,
    };
    let local = listener.local_addr().map_err(|e| FedError::Listen {
        addr: cfg.listen.clone(),
        reason: e.to_string(),
    })?;
    if let Some(path) = &cfg.address_file {
        simskip_data::fsutil::write_atomic(path, local.to_string().as_bytes()).map_err(|e| {
            FedError::Output(format!(
                "writing the bound address to {}: {e}",
                path.display()
            ))
        })?;
    }
    tracing::info!(run_id = %cfg.run_id, addr = %local, auth = cfg.auth.mode(), "coordinator listening");
    if tls.is_none() {
        tracing::warn!(
            "server.auth.mode = \"insecure\": plain text, and any caller may claim a name; \
             use it on one machine only"
        );
    }

    // Ticker: advances time and decides when the run is over.
    let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let ticker = {
        let shared = shared.clone();
        let grace = secs(cfg.done_grace_secs);
        let period = Duration::from_millis(cfg.tick_ms);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let now = shared.now();
                let over = {
                    let mut r = shared.rounds.lock().await;
                    shared.advance(&mut r);
                    r.done_at().is_some_and(|at| {
                        r.all_alive_told_done() || now.saturating_sub(at) >= grace
                    }) || r.aborted().is_some()
                        || shared.closing.load(Ordering::SeqCst)
                };
                if over {
                    let _ = finished_tx.send(());
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
        let grace = secs(cfg.stop_grace_secs);
        async move {
            tokio::select! {
                _ = finished_rx => {}
                _ = shutdown => {
                    tracing::info!(
                        grace_secs = grace.as_secs_f64(),
                        "shutdown requested: telling the clients to stop"
                    );
                    shared.stopping.store(true, Ordering::SeqCst);
                    shared.notify.notify_waiters();
                    tell_clients_to_stop(&shared, grace).await;
                }
            }
            // Release held long-polls so the graceful shutdown does not wait for them.
            shared.closing.store(true, Ordering::SeqCst);
            shared.notify.notify_waiters();
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let served = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    ticker.abort();

    let shutdown_requested = shared.stopping.load(Ordering::SeqCst);
    let (records, globals, ignored, completed, aborted) = {
        let mut r = shared.rounds.lock().await;
        // Flush what the last tick produced, then stop the sink.
        shared.advance(&mut r);
        let _ = shared.events.send(None);
        let n = r.config().stages.len();
        (
            r.records().to_vec(),
            (0..n)
                .filter_map(|i| r.strategy(i).map(|s| s.global()))
                .collect(),
            r.ignored_results(),
            r.is_done() && r.aborted().is_none(),
            r.aborted().map(str::to_string),
        )
    };
    let _ = ticker.await;
    if let Some(m) = metrics {
        m.stop().await;
    }
    let written = tokio::task::spawn_blocking(move || sink_thread.join())
        .await
        .map_err(|e| FedError::Output(format!("joining the output writer: {e}")))?;
    served?;
    let commit_ms = match written {
        Ok((r, costs)) => {
            r?;
            costs
        }
        Err(_) => return Err(FedError::Output("the output writer panicked".into())),
    };
    if let Some(reason) = aborted {
        return Err(FedError::Aborted {
            run_id: cfg.run_id,
            reason,
        });
    }
    Ok(RunSummary {
        run_id: cfg.run_id,
        records,
        globals,
        ignored_results: ignored,
        completed,
        shutdown_requested,
        out_dir: cfg.out_dir,
        resumed,
        commit_ms,
    })
}

/// Opens the out_dir's database and decides the run (see [`Store::start`]): a new one, or the
/// one to resume, whose strategies get their checkpointed global models back and whose
/// metrics files are rewritten from the database. Resolves `cfg.run_id`. Returns the state
/// machine, the store, how the run resumed, and the run's clock to continue from.
fn open_run(
    cfg: &mut ServerConfig,
    mut strategies: Vec<Box<dyn Strategy>>,
) -> Result<(Rounds, Store, Option<Resumed>, Duration), FedError> {
    let mut store = Store::open(&cfg.out_dir)?;
    match store.start(&cfg.run_id, &cfg.stages)? {
        Start::New { run_id } => {
            cfg.run_id = run_id;
            let rounds = Rounds::new(cfg.rounds_config(), strategies)?;
            Ok((rounds, store, None, Duration::ZERO))
        }
        Start::Resumed(resume) => {
            cfg.run_id = resume.run_id.clone();
            for (stage, (round, global)) in resume.globals {
                let name = cfg.stages.get(stage).map_or("?", |s| s.name.as_str());
                let Some(strategy) = strategies.get_mut(stage) else {
                    return Err(FedError::Config(format!(
                        "the database holds a checkpoint of stage #{stage}, which this \
                         configuration does not have"
                    )));
                };
                strategy.restore(global).map_err(|e| {
                    FedError::Config(format!(
                        "the checkpoint of round {round} of stage {name:?} does not fit: {e}"
                    ))
                })?;
            }
            for f in &resume.fallbacks {
                tracing::warn!(
                    stage = %f.stage,
                    round = f.round,
                    path = %f.path.display(),
                    fault = %f.fault,
                    resumed_from = ?f.resumed_from,
                    "bad checkpoint: resuming from the one before"
                );
            }
            let clock = resume.records.last().map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(r.ended_secs.max(0.0))
            });
            let resumed = Resumed {
                from_rounds: resume.records.len(),
                discarded_rounds: resume.discarded_rounds,
                fallbacks: resume.fallbacks,
            };
            tracing::info!(
                run_id = %cfg.run_id,
                rounds = resumed.from_rounds,
                discarded = resumed.discarded_rounds,
                "resuming the run from the database"
            );
            // The files may miss the last committed round, or hold discarded ones.
            sink::export_metrics(&cfg.out_dir, &store.all_records()?)?;
            let rounds = Rounds::resume(
                cfg.rounds_config(),
                strategies,
                ResumePoint {
                    records: resume.records,
                    now: clock,
                },
            )?;
            Ok((rounds, store, Some(resumed), clock))
        }
    }
}

/// Waits until every alive client has been told to stop (at its next poll or heartbeat), or
/// `grace` has passed.
async fn tell_clients_to_stop(shared: &Arc<Shared>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let alive = shared.rounds.lock().await.alive_clients();
        let all_told = {
            let told = shared.told_stop.lock().unwrap_or_else(|e| e.into_inner());
            alive.iter().all(|name| told.contains(name))
        };
        if all_told {
            tracing::info!(clients = alive.len(), "every alive client was told to stop");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                clients = alive.len(),
                "stop grace over before every client was told to stop"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
