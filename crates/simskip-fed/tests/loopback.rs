//! In-process coordinator and clients over loopback gRPC, with fake deterministic work.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use simskip_data::tensors::read_named_safetensors;
use simskip_data::NamedArray;
use simskip_fed::chunk::DEFAULT_MAX_MESSAGE_BYTES;
use simskip_fed::{
    run_client, serve, ClientConfig, ClientWork, EvalOutput, FedAvgStrategy, FedEStrategy,
    FedError, FitOutput, ServerAuth, ServerConfig, StageConfig, StageInfo, StageKind, StageParams,
    Strategy, WorkError,
};

mod support;
use support::{add_to_every_value, client_config, loopback_listener, open_gate, Gate};

type Log = Arc<Mutex<Vec<(String, String, Vec<NamedArray>)>>>;

/// FedAvg: returns global + id. FedE: returns its rows + 1. Records what it receives.
struct Fake {
    id: u32,
    examples: u64,
    keys: Vec<String>,
    /// (event, stage, arrays) as received.
    log: Log,
    /// Blocks in FIT of this round until released.
    block: Option<(u32, Gate)>,
}

impl ClientWork for Fake {
    fn entity_keys(&self) -> Vec<String> {
        self.keys.clone()
    }
    fn num_examples(&self) -> u64 {
        self.examples
    }
    fn fit(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        // The stage's typed parameters arrive as configured on the coordinator.
        assert_eq!(stage.params, stage_params(&stage.name, stage.kind()));
        if let Some((r, gate)) = &self.block {
            if *r == round {
                support::wait_until_open(gate);
            }
        }
        self.log
            .lock()
            .unwrap()
            .push((format!("fit{round}"), stage.name.clone(), global.clone()));
        let add = match stage.kind() {
            StageKind::FedE => 1.0,
            StageKind::FedAvg => self.id as f32,
        };
        Ok(FitOutput {
            arrays: add_to_every_value(global, add),
            num_examples: self.examples,
            metrics: BTreeMap::from([("loss".to_string(), self.id as f64)]),
        })
    }
    fn evaluate(
        &mut self,
        _stage: &StageInfo,
        _round: u32,
        _global: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        Ok(EvalOutput {
            num_examples: self.examples,
            metrics: BTreeMap::from([("acc".to_string(), self.id as f64 / 10.0)]),
        })
    }
    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        global: Vec<NamedArray>,
    ) -> Result<(), WorkError> {
        self.log
            .lock()
            .unwrap()
            .push(("finish".into(), stage.name.clone(), global));
        Ok(())
    }
}

/// Each stage's parameters differ from the defaults in a way the stage name determines, so a
/// client can check it trains exactly what the coordinator configured.
fn stage_params(name: &str, kind: StageKind) -> StageParams {
    let mut p = StageParams::defaults(kind, 4);
    match &mut p {
        StageParams::FedE(t) => t.negatives = name.len(),
        StageParams::SimSkip(s) => {
            s.config.skip = false;
            s.config.batch_size = name.len() + 1;
        }
    }
    p
}

fn stage(name: &str, kind: StageKind, rounds: u32, eval_every: u32) -> StageConfig {
    support::stage(name, rounds, eval_every, stage_params(name, kind))
}

fn server_config(out: &Path, stages: Vec<StageConfig>, min: usize, min_fit: usize) -> ServerConfig {
    ServerConfig {
        seed: 3,
        ..support::server_config("test-run", out, stages, min, min_fit)
    }
}

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

fn arr(name: &str, shape: Vec<usize>, data: Vec<f32>) -> NamedArray {
    NamedArray::new(name, shape, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stages_three_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let cfg = server_config(
        dir.path(),
        vec![
            stage("kge", StageKind::FedE, 2, 1),
            stage("simskip", StageKind::FedAvg, 3, 2),
        ],
        3,
        2,
    );
    let initial = vec![
        arr("w", vec![2, 2], vec![0.0; 4]),
        arr("bn.running_mean", vec![2], vec![1.0, 1.0]),
    ];
    let strategies: Vec<Box<dyn Strategy>> = vec![
        Box::new(FedEStrategy::new(4, 3.0, 11)),
        Box::new(FedAvgStrategy::new(initial)),
    ];
    let t0 = Instant::now();
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));

    let specs = [
        ("a", 1, 1, keys(&["e0", "e1", "e2"])),
        ("b", 2, 1, keys(&["e1", "e2", "e3"])),
        ("c", 3, 2, keys(&["e2", "e4"])),
    ];
    let mut logs = Vec::new();
    let mut clients = Vec::new();
    for (name, id, examples, k) in specs.iter().cloned() {
        let log: Log = Arc::default();
        logs.push(log.clone());
        let work = Fake {
            id,
            examples,
            keys: k,
            log,
            block: None,
        };
        clients.push(tokio::spawn(run_client(client_config(port, name), work)));
    }
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    eprintln!("two stages x 3 clients: {:?}", t0.elapsed());
    assert!(summary.completed);
    let seq: Vec<String> = summary
        .records
        .iter()
        .map(|r| format!("{}:{}{}", r.stage, r.kind.as_str(), r.round))
        .collect();
    assert_eq!(
        seq,
        [
            "kge:fit1",
            "kge:evaluate1",
            "kge:fit2",
            "kge:evaluate2",
            "kge:finish_stage2",
            "simskip:fit1",
            "simskip:fit2",
            "simskip:evaluate2",
            "simskip:fit3",
            "simskip:evaluate3",
            "simskip:finish_stage3"
        ]
    );
    assert!(summary
        .records
        .iter()
        .all(|r| r.num_clients == 3 && !r.timed_out));

    // FedAvg: each round adds (1*1 + 1*2 + 2*3) / 4 = 2.25.
    let simskip = &summary.globals[1].arrays;
    assert_eq!(simskip[0].data, vec![6.75; 4]);
    assert_eq!(simskip[1].data, vec![7.75; 2]);
    let (saved, meta) =
        read_named_safetensors(&dir.path().join("simskip/global.safetensors")).unwrap();
    assert_eq!(meta["round"], "3");
    assert_eq!(meta["run_id"], "test-run");
    let w = saved.iter().find(|a| a.name == "w").unwrap();
    assert_eq!(w.data, vec![6.75; 4]);
    let bn = saved.iter().find(|a| a.name == "bn.running_mean").unwrap();
    assert_eq!(bn.data, vec![7.75; 2]);

    // FedE: every holder adds 1 per round, so every entity gains exactly 2.
    let table_keys = std::fs::read_to_string(dir.path().join("kge/entities.txt")).unwrap();
    let table_keys: Vec<&str> = table_keys.lines().collect();
    let mut sorted = table_keys.clone();
    sorted.sort();
    assert_eq!(sorted, ["e0", "e1", "e2", "e3", "e4"]);
    let (saved, _) = read_named_safetensors(&dir.path().join("kge/global.safetensors")).unwrap();
    assert_eq!(saved[0].shape, vec![5, 4]);
    let global_row = |k: &str| {
        let i = table_keys.iter().position(|x| *x == k).unwrap();
        saved[0].data[i * 4..(i + 1) * 4].to_vec()
    };
    for ((_, _, _, k), log) in specs.iter().zip(&logs) {
        let log = log.lock().unwrap();
        let first = &log
            .iter()
            .find(|(e, s, _)| e == "fit1" && s == "kge")
            .unwrap()
            .2[0];
        let fin = &log
            .iter()
            .find(|(e, s, _)| e == "finish" && s == "kge")
            .unwrap()
            .2[0];
        assert_eq!(first.shape, vec![k.len(), 4]);
        for (r, key) in k.iter().enumerate() {
            let before = &first.data[r * 4..(r + 1) * 4];
            let after = &fin.data[r * 4..(r + 1) * 4];
            assert!(before.iter().all(|v| v.abs() <= 3.0));
            for (b, a) in before.iter().zip(after) {
                assert!((a - (b + 2.0)).abs() < 1e-5, "{key}: {b} -> {a}");
            }
            assert_eq!(after, &global_row(key)[..]);
        }
        let fin = &log
            .iter()
            .find(|(e, s, _)| e == "finish" && s == "simskip")
            .unwrap()
            .2;
        assert_eq!(fin[0].data, vec![6.75; 4]);
    }

    // metrics.jsonl: one object per closed round.
    let jsonl = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 11);
    let fit1 = &lines[5];
    assert_eq!(fit1["stage"], "simskip");
    assert_eq!(fit1["kind"], "fit");
    assert_eq!(fit1["round"], 1);
    assert_eq!(fit1["run_id"], "test-run");
    assert_eq!(fit1["num_clients"], 3);
    assert_eq!(fit1["metrics"]["loss"], 2.25);
    assert_eq!(fit1["clients"]["c"]["num_examples"], 2);
    // Aggregation ran (off the runtime) and its time was recorded.
    assert!(fit1["coordinator"]["aggregate_secs"].as_f64().unwrap() > 0.0);
    assert!(fit1["coordinator"]["serialize_secs"].as_f64().unwrap() > 0.0);
    let eval = &lines[7];
    assert_eq!(eval["kind"], "evaluate");
    assert!((eval["metrics"]["acc"].as_f64().unwrap() - 0.225).abs() < 1e-12);

    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert!(csv.starts_with("run_id,stage,round,kind,client,metric,value\n"));
    assert!(csv.contains("test-run,simskip,1,fit,aggregate,loss,2.25\n"));
    assert!(csv.contains("test-run,simskip,1,fit,c,num_examples,2\n"));
    assert!(csv.contains("test-run,kge,2,evaluate,b,acc,0.2\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stuck_client_does_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let cfg = server_config(dir.path(), vec![stage("s", StageKind::FedAvg, 2, 0)], 3, 2);
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(vec![arr(
        "w",
        vec![1],
        vec![0.0],
    )]))];
    let t0 = Instant::now();
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let mut handles = Vec::new();
    for (name, id) in [("a", 1), ("b", 2), ("c", 3)] {
        let work = Fake {
            id,
            examples: 1,
            keys: vec![],
            log: Arc::default(),
            block: (name == "c").then(|| (1, gate.clone())),
        };
        let mut cc = client_config(port, name);
        cc.connect_retries = 1;
        handles.push(tokio::spawn(run_client(cc, work)));
    }
    let summary = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the run finishes despite the stuck client")
        .unwrap()
        .unwrap();
    let elapsed = t0.elapsed();
    eprintln!("run with a stuck client: {elapsed:?}");
    assert!(summary.completed);
    let fit1 = &summary.records[0];
    assert!(fit1.timed_out && fit1.aggregated);
    assert_eq!(fit1.missing, vec!["c".to_string()]);
    assert_eq!(fit1.metrics["loss"], 1.5);
    // Round 1: (1 + 2) / 2; round 2 again without c.
    assert_eq!(summary.globals[0].arrays[0].data, vec![3.0]);
    // a and b finished cleanly.
    for h in handles.drain(..2) {
        h.await.unwrap().unwrap();
    }
    // Release c so its blocking thread ends; it then finds the coordinator gone.
    open_gate(&gate);
    let c = tokio::time::timeout(Duration::from_secs(20), handles.pop().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(c.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_larger_than_4_mib_crosses_grpc_and_client_waits_for_server() {
    let dir = tempfile::tempdir().unwrap();
    // Hold a port (bound, not yet served) and start the client before the coordinator runs:
    // it must wait for the coordinator rather than fail.
    let (listener, port) = loopback_listener().await;
    let (rows, cols) = (40_000, 32);
    let initial = arr(
        "entity_table",
        vec![rows, cols],
        (0..rows * cols)
            .map(|i| (i % 1000) as f32 * 0.001)
            .collect(),
    );
    assert!(initial.data.len() * 4 > DEFAULT_MAX_MESSAGE_BYTES);
    let log: Log = Arc::default();
    let work = Fake {
        id: 1,
        examples: 5,
        keys: vec![],
        log: log.clone(),
        block: None,
    };
    let t0 = Instant::now();
    let client = tokio::spawn(run_client(client_config(port, "solo"), work));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cfg = server_config(
        dir.path(),
        vec![stage("big", StageKind::FedAvg, 1, 0)],
        1,
        1,
    );
    assert_eq!(cfg.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    let strategies: Vec<Box<dyn Strategy>> =
        vec![Box::new(FedAvgStrategy::new(vec![initial.clone()]))];
    let summary = serve(cfg, listener, strategies, std::future::pending())
        .await
        .unwrap();
    client.await.unwrap().unwrap();
    eprintln!("5 MB table round trip: {:?}", t0.elapsed());

    let expected: Vec<f32> = initial.data.iter().map(|v| v + 1.0).collect();
    assert_eq!(summary.globals[0].arrays[0].data, expected);
    let received = &log.lock().unwrap()[0].2[0];
    assert_eq!(received, &initial);
    let (saved, _) = read_named_safetensors(&dir.path().join("big/global.safetensors")).unwrap();
    assert_eq!(saved[0].shape, vec![rows, cols]);
    assert_eq!(saved[0].data, expected);
}

#[tokio::test]
async fn unlisted_organisation_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let mut cfg = server_config(dir.path(), vec![stage("s", StageKind::FedAvg, 1, 0)], 1, 1);
    cfg.auth = ServerAuth::Insecure {
        organisations: vec!["org-a".into()],
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(vec![arr(
        "w",
        vec![1],
        vec![0.0],
    )]))];
    let server = tokio::spawn(serve(cfg, listener, strategies, async {
        let _ = stop_rx.await;
    }));
    let work = Fake {
        id: 1,
        examples: 1,
        keys: vec![],
        log: Arc::default(),
        block: None,
    };
    let cc = client_config(port, "intruder");
    let err = run_client(cc, work).await.unwrap_err();
    assert!(
        matches!(&err, FedError::Refused { what: "registration", server, .. } if server == &format!("http://127.0.0.1:{port}")),
        "{err}"
    );
    stop_tx.send(()).unwrap();
    let summary = server.await.unwrap().unwrap();
    assert!(!summary.completed);
}

#[test]
fn server_config_parses_with_defaults_and_rejects_unknown_fields() {
    let cfg: ServerConfig = serde_json::from_str(
        r#"{"listen":"127.0.0.1:7000","min_clients":3,
            "stages":[{"name":"kge","kind":"fede","rounds":5},
                      {"name":"simskip","kind":"fedavg","rounds":10,"eval_every":2,"simskip":{"lr":0.01}}]}"#,
    )
    .unwrap();
    assert_eq!(cfg.min_clients, 3);
    assert_eq!(cfg.stages[0].kind(), StageKind::FedE);
    let StageParams::SimSkip(p) = &cfg.stages[1].params else {
        panic!("the fedavg stage has SimSkip parameters")
    };
    assert_eq!(p.config.lr, 0.01);
    // The old string map is gone from the configuration, as from the protocol.
    assert!(serde_json::from_str::<ServerConfig>(
        r#"{"stages":[{"name":"s","kind":"fedavg","rounds":1,"config":{"lr":"0.01"}}]}"#
    )
    .is_err());
    // No run id by default: the coordinator's database gives one (new, or the run to resume).
    assert!(cfg.run_id.is_empty());
    assert_eq!(cfg.chunk_bytes, 1 << 20);
    // Mutual TLS is the default, and it needs the organisations named.
    assert_eq!(cfg.auth.mode(), "mtls");
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("server.auth.organisations"), "{e}");
    assert!(serde_json::from_str::<ServerConfig>(r#"{"min_client":3}"#).is_err());
    assert!(serde_json::from_str::<ClientConfig>(r#"{"name":"a","tokn":"x"}"#).is_err());
    let cc: ClientConfig = serde_json::from_str(r#"{"name":"a","server":"http://h:1"}"#).unwrap();
    assert_eq!(cc.connect_retries, 30);
    // Plain text is refused unless asked for by name.
    let e = cc.validate().unwrap_err().to_string();
    assert!(e.contains("client.server") && e.contains("https://"), "{e}");
    let cc: ClientConfig =
        serde_json::from_str(r#"{"name":"a","server":"http://h:1","auth":{"mode":"insecure"}}"#)
            .unwrap();
    cc.validate().unwrap();
}

/// A rogue organisation on the project's own generated gRPC client, speaking the protocol by
/// hand. It registers like an honest client, then tries each attack below against a real
/// coordinator with two honest clients.
mod rogue {
    use super::*;
    use simskip_fed::chunk::encode_arrays;
    use simskip_fed::proto::coordinator_client::CoordinatorClient;
    use simskip_fed::proto::{self, result_chunk};
    use tonic::transport::Channel;

    pub async fn connect(port: u16) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap()
    }

    pub async fn register(
        c: &mut CoordinatorClient<Channel>,
        name: &str,
        num_examples: u64,
        announced_keys: u64,
    ) -> Result<String, tonic::Status> {
        let header = proto::RegisterHeader {
            client_name: name.into(),
            num_examples,
            num_entity_keys: announced_keys,
            ..Default::default()
        };
        support::register_by_hand(c, header).await
    }

    /// Polls until a FIT task arrives; returns its header and arrays.
    pub async fn fit_task(
        c: &mut CoordinatorClient<Channel>,
        session: &str,
    ) -> (proto::TaskHeader, Vec<NamedArray>) {
        loop {
            let (h, arrays) = support::poll_task_by_hand(c, session).await;
            if h.kind == proto::TaskKind::Fit as i32 {
                return (h, arrays);
            }
        }
    }

    /// Pushes `arrays` as the answer to `task`, with the chunks `tamper` makes of them.
    pub async fn push(
        c: &mut CoordinatorClient<Channel>,
        session: &str,
        task: &proto::TaskHeader,
        num_examples: u64,
        arrays: &[NamedArray],
        tamper: impl FnOnce(&mut Vec<proto::TensorChunk>, &mut Vec<proto::ArrayHeader>),
    ) -> Result<proto::PushReply, tonic::Status> {
        let (mut headers, mut chunks) = encode_arrays(arrays, 1 << 10, &task.run_id, task.round);
        tamper(&mut chunks, &mut headers);
        let header = proto::ResultChunk {
            part: Some(result_chunk::Part::Header(proto::ResultHeader {
                run_id: task.run_id.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                session_id: session.into(),
                kind: task.kind,
                num_examples,
                arrays: headers,
                ..Default::default()
            })),
        };
        let messages: Vec<proto::ResultChunk> = std::iter::once(header)
            .chain(chunks.into_iter().map(|t| proto::ResultChunk {
                part: Some(result_chunk::Part::Tensor(t)),
            }))
            .collect();
        c.push_result(tokio_stream::iter(messages))
            .await
            .map(|r| r.into_inner())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rogue_organisation_cannot_poison_stall_or_probe_the_run() {
    use simskip_fed::proto;
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let mut cfg = server_config(dir.path(), vec![stage("s", StageKind::FedAvg, 2, 0)], 3, 2);
    // Long enough that a round closing by timeout would show.
    cfg.round_timeout_secs = 60.0;
    // The rogue never answers the final EVALUATE; it is dropped once silent this long.
    cfg.heartbeat_timeout_secs = 4.0;
    cfg.max_entity_keys = 1000;
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(vec![arr(
        "w",
        vec![4],
        vec![0.0; 4],
    )]))];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let mut c = rogue::connect(port).await;

    // Announcing more entity keys than allowed is refused before any key is read.
    let refused = rogue::register(&mut c, "hoarder", 1, 10_000_000)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Without a session, a heartbeat learns nothing about the run.
    let probe = c
        .heartbeat(proto::HeartbeatRequest {
            session_id: "guess".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe, proto::HeartbeatReply::default());

    // Two honest organisations and the rogue, each declaring 1 example.
    let mut honest = Vec::new();
    for (name, id) in [("a", 1), ("b", 2)] {
        let work = Fake {
            id,
            examples: 1,
            keys: vec![],
            log: Arc::default(),
            block: None,
        };
        honest.push(tokio::spawn(run_client(client_config(port, name), work)));
    }
    let session = rogue::register(&mut c, "rogue", 1, 0).await.unwrap();

    // Round 1.
    let (task, global) = rogue::fit_task(&mut c, &session).await;
    // A 2 GiB payload without a valid session: refused on its header, nothing read.
    let huge = rogue::push(
        &mut c,
        "no-session",
        &task,
        1,
        &global,
        |chunks, headers| {
            headers[0].shape = vec![1 << 29];
            headers[0].num_bytes = 1 << 31;
            chunks.truncate(1);
        },
    )
    .await
    .unwrap();
    assert_eq!(huge.status, proto::ResultStatus::Ignored as i32);
    // The same from the rogue's own session: larger than its task's arrays, refused too.
    let huge = rogue::push(&mut c, &session, &task, 1, &global, |chunks, headers| {
        headers[0].shape = vec![1 << 29];
        headers[0].num_bytes = 1 << 31;
        chunks.truncate(1);
    })
    .await
    .unwrap();
    assert_eq!(huge.status, proto::ResultStatus::Ignored as i32);
    // NaN weights claiming 10^12 examples: a recorded failure, never a change to the model.
    let poison = vec![arr("w", vec![4], vec![f32::NAN; 4])];
    let reply = rogue::push(
        &mut c,
        &session,
        &task,
        1_000_000_000_000,
        &poison,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(reply.status, proto::ResultStatus::FailureRecorded as i32);

    // Round 2: a duplicated chunk closes the push at once and fails the rogue's task, so the
    // round does not wait for its timeout.
    let (task, global) = rogue::fit_task(&mut c, &session).await;
    let dup = rogue::push(&mut c, &session, &task, 1, &global, |chunks, _| {
        let first = chunks[0].clone();
        chunks.insert(1, first);
    })
    .await
    .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::InvalidArgument);

    for h in honest {
        h.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    assert!(summary.completed);
    let fits: Vec<_> = summary
        .records
        .iter()
        .filter(|r| r.kind == simskip_fed::TaskKind::Fit)
        .collect();
    assert_eq!(fits.len(), 2);
    for r in &fits {
        assert!(r.failures.contains_key("rogue"), "{r:?}");
        assert!(!r.timed_out, "round {} waited for its timeout", r.round);
        assert_eq!(r.num_clients, 2);
    }
    // Exactly the honest-only aggregate: each round adds (1 + 2) / 2.
    assert_eq!(summary.globals[0].arrays[0].data, vec![3.0; 4]);
    assert!(summary.ignored_results >= 2);
}

/// A requested shutdown tells every client to stop (the idle one at its poll, the one busy
/// training at its heartbeat), flushes the run's outputs and ends without completing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requested_shutdown_stops_clients_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let mut cfg = server_config(dir.path(), vec![stage("s", StageKind::FedAvg, 5, 0)], 2, 1);
    cfg.fraction_fit = 0.5;
    cfg.round_timeout_secs = 30.0;
    cfg.stop_grace_secs = 5.0;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(vec![arr(
        "w",
        vec![1],
        vec![0.0],
    )]))];
    let server = tokio::spawn(serve(cfg, listener, strategies, async {
        let _ = stop_rx.await;
    }));
    // Both block in FIT of round 2: the one selected is busy when the stop comes, the other
    // idles in its polls.
    let gate: Gate = Arc::default();
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let work = Fake {
                id: i as u32 + 1,
                examples: 1,
                keys: vec![],
                log: Arc::default(),
                block: Some((2, gate.clone())),
            };
            tokio::spawn(run_client(client_config(port, name), work))
        })
        .collect();
    let metrics = dir.path().join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 1 {
        assert!(Instant::now() < deadline, "round 1 did not close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Round 2 is under way: one client holds its task.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    stop_tx.send(()).unwrap();
    for c in clients {
        let end = c.await.unwrap().unwrap();
        assert_eq!(end, simskip_fed::ClientEnd::Stopped);
    }
    let summary = server.await.unwrap().unwrap();
    assert!(summary.shutdown_requested && !summary.completed);
    assert_eq!(summary.records.len(), 1, "{:?}", summary.records);
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "stopped in {:?}",
        asked.elapsed()
    );
    // Let the blocked work return so the runtime can shut down.
    open_gate(&gate);
}

/// Two clients, a (FedAvg +1 per round) and b (+2), equal weights: every FIT round adds 1.5
/// to the FedAvg global.
/// A [`Fake`] that blocks in FIT of one round of one stage until its gate opens.
struct HeldAt {
    inner: Fake,
    stage: &'static str,
    round: u32,
    gate: Gate,
}

impl ClientWork for HeldAt {
    fn entity_keys(&self) -> Vec<String> {
        self.inner.entity_keys()
    }
    fn num_examples(&self) -> u64 {
        self.inner.num_examples()
    }
    fn fit(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        if (stage.name.as_str(), round) == (self.stage, self.round) {
            support::wait_until_open(&self.gate);
        }
        self.inner.fit(stage, round, global)
    }
    fn evaluate(
        &mut self,
        stage: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        self.inner.evaluate(stage, round, global)
    }
    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        global: Vec<NamedArray>,
    ) -> Result<(), WorkError> {
        self.inner.finish_stage(stage, global)
    }
}

/// With `block`, both block in FIT of that (stage, round) until the gate opens.
fn resumable_clients(
    port: u16,
    block: Option<(&'static str, u32, Gate)>,
) -> Vec<tokio::task::JoinHandle<Result<simskip_fed::ClientEnd, FedError>>> {
    [("a", 1, keys(&["e0", "e1"])), ("b", 2, keys(&["e1", "e2"]))]
        .into_iter()
        .map(|(name, id, k)| {
            let work = Fake {
                id,
                examples: 1,
                keys: k,
                log: Arc::default(),
                block: None,
            };
            let (stage, round, gate) = block.clone().unwrap_or(("", 0, Arc::default()));
            let work = HeldAt {
                inner: work,
                stage,
                round,
                gate,
            };
            tokio::spawn(run_client(client_config(port, name), work))
        })
        .collect()
}

fn resumable_strategies() -> Vec<Box<dyn Strategy>> {
    vec![
        Box::new(FedEStrategy::new(4, 3.0, 11)),
        Box::new(FedAvgStrategy::new(vec![arr("w", vec![2], vec![0.0; 2])])),
    ]
}

fn resumable_config(out: &Path) -> ServerConfig {
    let mut cfg = server_config(
        out,
        vec![
            stage("kge", StageKind::FedE, 3, 0),
            stage("simskip", StageKind::FedAvg, 4, 2),
        ],
        2,
        2,
    );
    // The default: the run id comes from the database (a new one, or the run to resume).
    cfg.run_id = String::new();
    cfg.round_timeout_secs = 10.0;
    cfg
}

/// Runs the coordinator until `rounds` rounds are in metrics.jsonl, then stops it on request.
/// The clients hold FIT of round `block.1` of stage `block.0` until the stop.
async fn run_until(
    out: &Path,
    rounds: usize,
    block: (&'static str, u32),
) -> simskip_fed::RunSummary {
    let gate: Gate = Arc::default();
    let (listener, port) = loopback_listener().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        resumable_config(out),
        listener,
        resumable_strategies(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let clients = resumable_clients(port, Some((block.0, block.1, gate.clone())));
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < rounds {
        assert!(Instant::now() < deadline, "{rounds} rounds did not close");
        if server.is_finished() {
            panic!("the coordinator ended early: {:?}", server.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_tx.send(()).unwrap();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), simskip_fed::ClientEnd::Stopped);
    }
    open_gate(&gate);
    server.await.unwrap().unwrap()
}

fn metrics_records(out: &Path) -> Vec<simskip_fed::rounds::RoundRecord> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (stage, round, kind) of every round, in order, as an uninterrupted run closes them.
fn expected_rounds() -> Vec<(String, u32, simskip_fed::TaskKind)> {
    use simskip_fed::TaskKind::*;
    let mut v: Vec<(&str, u32, simskip_fed::TaskKind)> = vec![
        ("kge", 1, Fit),
        ("kge", 2, Fit),
        ("kge", 3, Fit),
        ("kge", 3, Evaluate),
        ("kge", 3, FinishStage),
        ("simskip", 1, Fit),
        ("simskip", 2, Fit),
        ("simskip", 2, Evaluate),
        ("simskip", 3, Fit),
        ("simskip", 4, Fit),
        ("simskip", 4, Evaluate),
    ];
    v.push(("simskip", 4, FinishStage));
    v.into_iter()
        .map(|(s, r, k)| (s.to_string(), r, k))
        .collect()
}

fn keys_of(
    records: &[simskip_fed::rounds::RoundRecord],
) -> Vec<(String, u32, simskip_fed::TaskKind)> {
    records
        .iter()
        .map(|r| (r.stage.clone(), r.round, r.kind))
        .collect()
}

/// Stopped twice (once in each stage) and restarted with the same configuration, the
/// coordinator continues the same run: same run id, every round exactly once in the database
/// and in metrics.jsonl, none recomputed, and the same final model as an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_coordinator_resumes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let first = run_until(out, 2, ("kge", 3)).await;
    assert!(first.shutdown_requested && first.resumed.is_none());
    let committed = first.records.len();
    assert_eq!(committed, 2);
    let second = run_until(out, 8, ("simskip", 3)).await;
    assert_eq!(second.run_id, first.run_id, "the same run goes on");
    let resumed = second.resumed.clone().expect("resumed");
    assert_eq!(
        (resumed.from_rounds, resumed.discarded_rounds),
        (committed, 0),
        "no committed round lost"
    );
    assert!(resumed.fallbacks.is_empty());
    // The last incarnation runs to the end.
    let (listener, port) = loopback_listener().await;
    let server = tokio::spawn(serve(
        resumable_config(out),
        listener,
        resumable_strategies(),
        std::future::pending(),
    ));
    for c in resumable_clients(port, None) {
        assert_eq!(c.await.unwrap().unwrap(), simskip_fed::ClientEnd::Done);
    }
    let last = server.await.unwrap().unwrap();
    assert!(last.completed);
    assert_eq!(last.run_id, first.run_id);
    assert_eq!(
        last.resumed.as_ref().unwrap().from_rounds,
        second.records.len()
    );
    // Each round once, in order, in the files and in the state machine's history; times
    // go on across restarts.
    let records = metrics_records(out);
    assert_eq!(keys_of(&records), expected_rounds());
    // (Floats read back from JSON may differ in the last bit.)
    assert_eq!(keys_of(&records), keys_of(&last.records));
    assert!(records.iter().all(|r| r.run_id == first.run_id));
    assert!(records
        .windows(2)
        .all(|w| w[0].ended_secs <= w[1].started_secs + 1e-9));
    let store = simskip_fed::coordinator::store::Store::open_existing(out).unwrap();
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].finished);
    assert_eq!(runs[0].rounds as usize, expected_rounds().len());
    assert_eq!(store.resumes(&first.run_id).unwrap().len(), 2);
    // 4 FIT rounds of +1.5 each, as without the restarts.
    assert_eq!(last.globals[1].arrays[0].data, vec![6.0, 6.0]);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines()
            .filter(|l| l.contains(",aggregate,num_clients,"))
            .count(),
        expected_rounds().len()
    );
    // A finished run is not resumed: the same configuration starts a new run.
    let (listener, _) = loopback_listener().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        resumable_config(out),
        listener,
        resumable_strategies(),
        async {
            let _ = stop_rx.await;
        },
    ));
    stop_tx.send(()).unwrap();
    let fresh = server.await.unwrap().unwrap();
    assert_ne!(fresh.run_id, first.run_id);
    assert!(fresh.resumed.is_none());
}

/// Other stages than the stored unfinished run's are refused with one line naming the run.
#[tokio::test]
async fn resume_with_other_stages_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let first = run_until(out, 1, ("kge", 2)).await;
    let mut cfg = resumable_config(out);
    cfg.stages[1].rounds = 9;
    let (listener, _) = loopback_listener().await;
    let err = serve(
        cfg,
        listener,
        resumable_strategies(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FedError::Store(simskip_fed::coordinator::store::StoreError::StagesDiffer { run_id, .. }) if run_id == &first.run_id),
        "{err}"
    );
    assert_eq!(err.to_string().lines().count(), 1, "{err}");
}

/// A corrupted last checkpoint is detected by its hash: the run resumes from the checkpoint
/// before it, re-runs the rounds after that one, and says so in its typed outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_checkpoint_falls_back_to_the_one_before() {
    use simskip_fed::coordinator::store::{CheckpointFault, Store};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    // Into stage 2, with two of its FIT checkpoints (round 4 held until the stop).
    let first = run_until(out, 9, ("simskip", 4)).await;
    assert_eq!(first.records.len(), 9);
    let store = Store::open_existing(out).unwrap();
    let checkpoints = store.checkpoints(&first.run_id).unwrap();
    let last = checkpoints.last().unwrap().clone();
    assert_eq!((last.stage.as_str(), last.round), ("simskip", 3));
    let path = store.checkpoint_path(&last);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    drop(store);

    let (listener, port) = loopback_listener().await;
    let server = tokio::spawn(serve(
        resumable_config(out),
        listener,
        resumable_strategies(),
        std::future::pending(),
    ));
    for c in resumable_clients(port, None) {
        c.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    assert!(summary.completed);
    let resumed = summary.resumed.unwrap();
    assert_eq!(resumed.fallbacks.len(), 1);
    let f = &resumed.fallbacks[0];
    assert_eq!(
        (f.stage.as_str(), f.round, f.resumed_from),
        ("simskip", 3, Some(2))
    );
    assert!(
        matches!(f.fault, CheckpointFault::HashMismatch { .. }),
        "{:?}",
        f.fault
    );
    // simskip round 3 and what followed it ran again; nothing appears twice.
    assert_eq!(resumed.from_rounds, 8);
    assert_eq!(resumed.discarded_rounds, first.records.len() - 8);
    let records = metrics_records(out);
    assert_eq!(keys_of(&records), expected_rounds());
    assert_eq!(summary.globals[1].arrays[0].data, vec![6.0, 6.0]);
}
