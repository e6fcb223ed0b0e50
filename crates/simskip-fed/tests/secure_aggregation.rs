//! Secure aggregation over loopback gRPC: a real coordinator, organisations on the library's
//! client, and one organisation speaking the protocol by hand to drop out after masking.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simskip_data::NamedArray;
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::{self, result_chunk, sec_agg_reply};
use simskip_fed::secagg::{self, AdvertisedKeys, ClientRound, SecAggReply, SecAggTask};
use simskip_fed::{
    run_client, serve, ClientEnd, ClientWork, EvalOutput, FedAvgStrategy, FedError, FitOutput,
    RunSummary, ServerConfig, StageConfig, StageInfo, StageKind, StageParams, Strategy, WorkError,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

mod support;
use support::{add_to_every_value, client_config, loopback_listener};

/// FedAvg work: returns the global model plus `shift` everywhere; records the final model.
struct Shift {
    shift: f32,
    examples: u64,
    finished: Arc<Mutex<Vec<NamedArray>>>,
}

impl ClientWork for Shift {
    fn entity_keys(&self) -> Vec<String> {
        Vec::new()
    }
    fn num_examples(&self) -> u64 {
        self.examples
    }
    fn fit(
        &mut self,
        _: &StageInfo,
        _: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        Ok(FitOutput {
            arrays: add_to_every_value(global, self.shift),
            num_examples: self.examples,
            metrics: BTreeMap::from([("loss".to_string(), self.shift as f64)]),
        })
    }
    fn evaluate(
        &mut self,
        _: &StageInfo,
        _: u32,
        _: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        Ok(EvalOutput {
            num_examples: self.examples,
            metrics: BTreeMap::new(),
        })
    }
    fn finish_stage(&mut self, _: &StageInfo, global: Vec<NamedArray>) -> Result<(), WorkError> {
        *self.finished.lock().unwrap() = global;
        Ok(())
    }
}

fn server_config(out: &Path, rounds: u32, min_fit: usize, threshold: Option<u32>) -> ServerConfig {
    let stage = StageConfig {
        secure_aggregation: Some(secagg::SecureAggregation {
            threshold,
            ..Default::default()
        }),
        ..support::stage(
            "simskip",
            rounds,
            0,
            StageParams::defaults(StageKind::FedAvg, 4),
        )
    };
    ServerConfig {
        seed: 5,
        ..support::server_config("secure-run", out, vec![stage], 3, min_fit)
    }
}

fn initial() -> Vec<NamedArray> {
    vec![
        NamedArray::new("w", vec![2, 3], vec![0.5; 6]),
        NamedArray::new("bn.running_mean", vec![3], vec![-1.0; 3]),
    ]
}

/// Every value of `arrays` is its initial value plus `gain`, within the fixed-point bound
/// (far below 1e-5 here: 2^-24 steps, a handful of examples).
fn assert_gained(arrays: &[NamedArray], gain: f32) {
    for (a, init) in arrays.iter().zip(initial()) {
        assert_eq!((&a.name, &a.shape), (&init.name, &init.shape));
        for (v, i) in a.data.iter().zip(&init.data) {
            assert!(
                (v - (i + gain)).abs() < 1e-5,
                "{}: {v} vs {}",
                a.name,
                i + gain
            );
        }
    }
}

/// The run's summary once every client has ended cleanly (the coordinator given a minute).
async fn summary_after(
    clients: Vec<JoinHandle<Result<ClientEnd, FedError>>>,
    server: JoinHandle<Result<RunSummary, FedError>>,
) -> RunSummary {
    for c in clients {
        c.await.unwrap().unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_organisations_reach_the_plain_fedavg_model_under_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let cfg = server_config(dir.path(), 2, 3, None);
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(initial()))];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let mut clients = Vec::new();
    let mut finals = Vec::new();
    for (name, shift, examples) in [("a", 1.0, 1), ("b", 2.0, 1), ("c", 3.0, 2)] {
        let finished = Arc::new(Mutex::new(Vec::new()));
        finals.push(finished.clone());
        let work = Shift {
            shift,
            examples,
            finished,
        };
        clients.push(tokio::spawn(run_client(client_config(port, name), work)));
    }
    let summary = summary_after(clients, server).await;
    assert!(summary.completed);
    let fits: Vec<_> = summary
        .records
        .iter()
        .filter(|r| r.kind == simskip_fed::TaskKind::Fit)
        .collect();
    assert_eq!(fits.len(), 2);
    for r in &fits {
        assert!(r.aggregated && !r.timed_out, "{:?}", r.note);
        assert_eq!(r.num_clients, 3);
        assert!(r.note.as_deref().unwrap().starts_with("secure aggregation"));
        // Training metrics are still example-weighted: (1 + 2 + 2 * 3) / 4.
        assert_eq!(r.metrics["loss"], 2.25);
    }
    // Plain FedAvg adds (1 * 1 + 1 * 2 + 2 * 3) / 4 = 2.25 per round.
    assert_gained(&summary.globals[0].arrays, 4.5);
    for f in finals {
        assert_gained(&f.lock().unwrap(), 4.5);
    }
}

/// An organisation speaking the protocol by hand on the generated gRPC client.
struct HandClient {
    c: CoordinatorClient<Channel>,
    session: String,
}

impl HandClient {
    async fn register(port: u16, name: &str, examples: u64) -> Self {
        let mut c = CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let header = proto::RegisterHeader {
            client_name: name.into(),
            num_examples: examples,
            ..Default::default()
        };
        let session = support::register_by_hand(&mut c, header).await.unwrap();
        HandClient { c, session }
    }

    /// Polls until a task with a secure aggregation step arrives.
    async fn secure_task(&mut self) -> (proto::TaskHeader, Vec<NamedArray>) {
        loop {
            let (h, arrays) = support::poll_task_by_hand(&mut self.c, &self.session).await;
            if h.secagg.is_some() {
                return (h, arrays);
            }
        }
    }

    async fn answer(
        &mut self,
        task: &proto::TaskHeader,
        examples: u64,
        reply: sec_agg_reply::Step,
    ) {
        let r = self.push_with(task, examples, reply).await;
        assert_eq!(
            r.status,
            proto::ResultStatus::Accepted as i32,
            "{}",
            r.message
        );
    }

    /// Pushes a header carrying `reply` alone; returns the coordinator's answer.
    async fn push(
        &mut self,
        task: &proto::TaskHeader,
        reply: sec_agg_reply::Step,
    ) -> proto::PushReply {
        self.push_with(task, 0, reply).await
    }

    async fn push_with(
        &mut self,
        task: &proto::TaskHeader,
        examples: u64,
        reply: sec_agg_reply::Step,
    ) -> proto::PushReply {
        let header = proto::ResultChunk {
            part: Some(result_chunk::Part::Header(proto::ResultHeader {
                run_id: task.run_id.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                session_id: self.session.clone(),
                kind: task.kind,
                num_examples: examples,
                secagg: Some(proto::SecAggReply { step: Some(reply) }),
                ..Default::default()
            })),
        };
        self.c
            .push_result(tokio_stream::iter(vec![header]))
            .await
            .unwrap()
            .into_inner()
    }
}

fn keys_to_proto(k: &AdvertisedKeys) -> proto::SecAggKeys {
    proto::SecAggKeys {
        client_id: k.client,
        cipher_public: k.cipher_public.to_vec(),
        mask_public: k.mask_public.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_organisation_dropping_after_masking_leaves_the_sum_of_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    let cfg = server_config(dir.path(), 1, 2, Some(2));
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(FedAvgStrategy::new(initial()))];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let mut clients = Vec::new();
    for (name, shift) in [("a", 1.0), ("b", 2.0)] {
        let work = Shift {
            shift,
            examples: 1,
            finished: Arc::default(),
        };
        clients.push(tokio::spawn(run_client(client_config(port, name), work)));
    }

    // "d" trains (a huge shift, to show if it leaked into the sum), advertises its keys,
    // shares them, and is gone before sending its masked input.
    let mut d = HandClient::register(port, "d", 1).await;
    let (begin, global) = d.secure_task().await;
    let Some(proto::sec_agg_task::Step::Begin(b)) = begin.secagg.as_ref().unwrap().step.clone()
    else {
        panic!("the first step is begin")
    };
    let layout: Vec<_> = global
        .iter()
        .map(|a| (a.name.clone(), a.shape.clone()))
        .collect();
    let update: Vec<NamedArray> = global
        .iter()
        .map(|a| NamedArray::new(a.name.clone(), a.shape.clone(), vec![1000.0; a.data.len()]))
        .collect();
    let context = secagg::context(&begin.run_id, begin.stage_index as usize, begin.round);
    let (mut state, keys) = ClientRound::begin(
        &SecAggTask::Begin {
            client: b.client_id,
            threshold: b.threshold as usize,
            frac_bits: b.frac_bits,
            rows: None,
        },
        &context,
        &layout,
        &update,
        1,
    )
    .unwrap();
    let SecAggReply::Keys(keys) = keys else {
        panic!("begin answers with keys")
    };
    d.answer(&begin, 1, sec_agg_reply::Step::Keys(keys_to_proto(&keys)))
        .await;
    let (roster_task, _) = d.secure_task().await;
    let Some(proto::sec_agg_task::Step::Roster(roster)) =
        roster_task.secagg.as_ref().unwrap().step.clone()
    else {
        panic!("the second step is the roster")
    };
    let roster: Vec<AdvertisedKeys> = roster
        .keys
        .iter()
        .map(|k| AdvertisedKeys {
            client: k.client_id,
            cipher_public: k.cipher_public.as_slice().try_into().unwrap(),
            mask_public: k.mask_public.as_slice().try_into().unwrap(),
        })
        .collect();
    assert_eq!(roster.len(), 3);
    let SecAggReply::Shares(sealed) = state.step(&SecAggTask::Roster(roster)).unwrap() else {
        panic!("the roster is answered with shares")
    };
    let sealed = proto::SecAggInbox {
        shares: sealed
            .iter()
            .map(|s| proto::SealedShares {
                from: s.from,
                to: s.to,
                nonce: s.nonce.to_vec(),
                ciphertext: s.ciphertext.clone(),
            })
            .collect(),
    };
    d.answer(&roster_task, 0, sec_agg_reply::Step::Shares(sealed))
        .await;
    // Its masked input announces 2^40 ring elements (8 TiB): refused on the header, before
    // any value is read; the round goes on without it.
    let (inbox_task, _) = d.secure_task().await;
    let r = d
        .push(
            &inbox_task,
            sec_agg_reply::Step::Masked(proto::SecAggMaskedInput {
                client_id: b.client_id,
                values: Vec::new(),
                len: 1 << 40,
            }),
        )
        .await;
    assert_eq!(
        r.status,
        proto::ResultStatus::Ignored as i32,
        "{}",
        r.message
    );
    assert!(
        r.message.contains("announces 8796093022208 bytes"),
        "{}",
        r.message
    );
    drop(d);

    let summary = summary_after(clients, server).await;
    assert!(summary.completed);
    let fit = &summary.records[0];
    assert_eq!(fit.kind, simskip_fed::TaskKind::Fit);
    assert!(fit.aggregated, "{:?}", fit.note);
    assert_eq!(fit.num_clients, 2);
    assert_eq!(fit.missing, vec!["d".to_string()]);
    // The survivors' FedAvg: (1 + 2) / 2; nothing of d's update.
    assert_gained(&summary.globals[0].arrays, 1.5);
}
