//! The coordinator as the adversary: a stub that sends an organisation tasks it cannot read.
//! Each bad task must fail that task, answered as a failure so no round waits for it, and the
//! daemon must carry on to the end of the run; nothing secret travels in a message.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use simskip_data::NamedArray;
use simskip_fed::proto::coordinator_server::{Coordinator, CoordinatorServer};
use simskip_fed::proto::{self, register_request, result_chunk, task_chunk};
use simskip_fed::{
    run_client, ClientConfig, ClientWork, EvalOutput, FitOutput, StageInfo, WorkError,
};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

mod support;

type Chunks = Pin<Box<dyn Stream<Item = Result<proto::TaskChunk, Status>> + Send>>;

#[derive(Default, Clone)]
struct Seen {
    registrations: Arc<Mutex<Vec<proto::RegisterHeader>>>,
    pushes: Arc<Mutex<Vec<proto::ResultHeader>>>,
    polls: Arc<Mutex<u32>>,
}

/// Hands out, in turn: a FIT task without its stage parameters, a FIT task whose parameters
/// claim a future schema, a FIT task of the current schema whose share of neighbour positives
/// is not a number, then DONE.
#[derive(Clone)]
struct Hostile(Seen);

fn header(
    kind: proto::TaskKind,
    task_id: &str,
    params: Option<proto::StageParams>,
) -> proto::TaskChunk {
    proto::TaskChunk {
        part: Some(task_chunk::Part::Header(proto::TaskHeader {
            run_id: "hostile".into(),
            round: 1,
            stage_name: "s".into(),
            stage_kind: proto::StageKind::Fedavg as i32,
            kind: kind as i32,
            task_id: task_id.into(),
            stage_rounds: 1,
            params,
            ..Default::default()
        })),
    }
}

#[tonic::async_trait]
impl Coordinator for Hostile {
    async fn register(
        &self,
        request: Request<Streaming<proto::RegisterRequest>>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let mut stream = request.into_inner();
        while let Some(m) = stream.message().await? {
            if let Some(register_request::Part::Header(h)) = m.part {
                self.0.registrations.lock().unwrap().push(h);
            }
        }
        Ok(Response::new(proto::RegisterReply {
            run_id: "hostile".into(),
            session_id: "s1".into(),
            heartbeat_interval_ms: 1000,
            poll_timeout_ms: 1000,
            ..Default::default()
        }))
    }

    type PollTaskStream = Chunks;

    async fn poll_task(
        &self,
        _request: Request<proto::PollRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let n = {
            let mut polls = self.0.polls.lock().unwrap();
            *polls += 1;
            *polls
        };
        let future_schema = proto::StageParams {
            schema_version: 999,
            kind: None,
            privacy: None,
        };
        let nan_share = proto::StageParams {
            schema_version: simskip_fed::params::PARAMS_SCHEMA_VERSION,
            kind: Some(proto::stage_params::Kind::Simskip(proto::SimSkipParams {
                dim: 8,
                skip: true,
                zero_init_residual: true,
                dropout: 0.1,
                augmentation: proto::Augmentation::Mask as i32,
                mask_prob: 0.2,
                noise_var: 0.13,
                positives: proto::Positives::Neighbour as i32,
                neighbour_share: f32::NAN,
                temperature: 0.5,
                lr: 1e-3,
                local_epochs: 1,
                batch_size: 32,
                personalization: Some(proto::Personalization {
                    kind: Some(proto::personalization::Kind::Fedavg(proto::PlainFedAvg {})),
                }),
                ..Default::default()
            })),
            privacy: None,
        };
        let chunk = match n {
            1 => header(proto::TaskKind::Fit, "no-params", None),
            2 => header(proto::TaskKind::Fit, "future", Some(future_schema)),
            3 => header(proto::TaskKind::Fit, "nan-share", Some(nan_share)),
            _ => header(proto::TaskKind::Done, "", None),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(chunk)))))
    }

    async fn push_result(
        &self,
        request: Request<Streaming<proto::ResultChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        let mut stream = request.into_inner();
        while let Some(m) = stream.message().await? {
            if let Some(result_chunk::Part::Header(h)) = m.part {
                self.0.pushes.lock().unwrap().push(h);
            }
        }
        Ok(Response::new(proto::PushReply::default()))
    }

    async fn heartbeat(
        &self,
        _request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        Ok(Response::new(proto::HeartbeatReply {
            run_id: "hostile".into(),
            known: true,
            ..Default::default()
        }))
    }
}

/// Would panic if it were ever given one of the hostile tasks.
struct MustNotTrain;

impl ClientWork for MustNotTrain {
    fn entity_keys(&self) -> Vec<String> {
        vec!["secret-entity".into()]
    }
    fn num_examples(&self) -> u64 {
        5
    }
    fn fit(&mut self, _: &StageInfo, _: u32, _: Vec<NamedArray>) -> Result<FitOutput, WorkError> {
        panic!("trained on a task it could not read")
    }
    fn evaluate(
        &mut self,
        _: &StageInfo,
        _: u32,
        _: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        panic!("evaluated a task it could not read")
    }
    fn finish_stage(&mut self, _: &StageInfo, _: Vec<NamedArray>) -> Result<(), WorkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tasks_fail_that_task_and_the_daemon_carries_on() {
    let (listener, port) = support::loopback_listener().await;
    let seen = Seen::default();
    tokio::spawn(
        Server::builder()
            .add_service(CoordinatorServer::new(Hostile(seen.clone())))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let cfg = ClientConfig {
        connect_retries: 3,
        backoff_max_ms: 100,
        ..support::client_config(port, "org-a")
    };
    run_client(cfg, MustNotTrain)
        .await
        .expect("the daemon ends normally at DONE");

    let pushes = seen.pushes.lock().unwrap().clone();
    let answered: BTreeMap<String, String> = pushes
        .iter()
        .map(|h| (h.task_id.clone(), h.error.clone()))
        .collect();
    assert_eq!(answered.len(), 3, "{pushes:?}");
    assert!(
        answered["no-params"].contains("task refused"),
        "{answered:?}"
    );
    assert!(answered["future"].contains("task refused"), "{answered:?}");
    assert!(
        answered["nan-share"].contains("neighbour_share"),
        "{answered:?}"
    );
    assert!(pushes
        .iter()
        .all(|h| h.arrays.is_empty() && h.session_id == "s1"));
    // What the coordinator learns at registration: the name and counts; no credentials field
    // is ever filled (they travel in TLS or call metadata).
    let regs = seen.registrations.lock().unwrap().clone();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].client_name, "org-a");
    assert!(regs[0].credentials.is_empty());
    assert_eq!((regs[0].num_examples, regs[0].num_entity_keys), (5, 1));
}
