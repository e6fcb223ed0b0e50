//! Setup shared by the loopback tests: a port to serve on, the coordinator's and the clients'
//! configurations with the test timings, the fake work's arithmetic, gates that hold a client
//! in a task, a federation PKI, and the protocol spoken by hand on the generated client.
// Each test file uses the part it needs; the rest is unused from that file's point of view.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use simskip_data::NamedArray;
use simskip_fed::chunk::Assembler;
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::{self, register_request, task_chunk};
use simskip_fed::tls::{provision, PartyFiles, ProvisionSpec, Provisioned};
use simskip_fed::{
    ClientAuth, ClientConfig, Robustness, ServerAuth, ServerConfig, StageConfig, StageParams,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A listener on 127.0.0.1, port 0 (the system picks a free one), and the port it got.
pub async fn loopback_listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// A stage without robust aggregation, differential privacy or secure aggregation.
pub fn stage(name: &str, rounds: u32, eval_every: u32, params: StageParams) -> StageConfig {
    StageConfig {
        name: name.into(),
        rounds,
        eval_every,
        params,
        aggregation: Robustness::default(),
        privacy: None,
        secure_aggregation: None,
    }
}

/// A coordinator in plain text with short rounds, heartbeats and polls, so a test run takes
/// seconds; tests that need longer rounds or another identity set those fields over this.
pub fn server_config(
    run_id: &str,
    out: &Path,
    stages: Vec<StageConfig>,
    min_clients: usize,
    min_fit_clients: usize,
) -> ServerConfig {
    ServerConfig {
        run_id: run_id.into(),
        min_clients,
        min_fit_clients,
        round_timeout_secs: 1.0,
        heartbeat_interval_secs: 0.2,
        heartbeat_timeout_secs: 3.0,
        poll_timeout_secs: 1.0,
        out_dir: out.to_path_buf(),
        stages,
        tick_ms: 20,
        done_grace_secs: 1.0,
        // These tests exercise the rounds; tests/identity.rs runs the same over mTLS/tokens.
        auth: ServerAuth::insecure(),
        ..ServerConfig::default()
    }
}

/// A plain-text client of the coordinator on 127.0.0.1:`port`, retrying its connection
/// quickly (the coordinator may start after it).
pub fn client_config(port: u16, name: &str) -> ClientConfig {
    ClientConfig {
        server: format!("http://127.0.0.1:{port}"),
        name: name.into(),
        connect_retries: 20,
        backoff_initial_ms: 50,
        backoff_max_ms: 200,
        auth: ClientAuth::Insecure {},
        ..ClientConfig::default()
    }
}

/// `global` with `add` added to every value: the fake work's training.
pub fn add_to_every_value(global: Vec<NamedArray>, add: f32) -> Vec<NamedArray> {
    global
        .into_iter()
        .map(|mut a| {
            a.data.iter_mut().for_each(|v| *v += add);
            a
        })
        .collect()
}

/// Holds a client's work until the test opens it.
pub type Gate = Arc<(Mutex<bool>, Condvar)>;

/// Blocks until `gate` is open.
pub fn wait_until_open(gate: &Gate) {
    let (m, cv) = &**gate;
    let mut open = m.lock().unwrap();
    while !*open {
        open = cv.wait(open).unwrap();
    }
}

/// Opens `gate`, releasing every work blocked on it.
pub fn open_gate(gate: &Gate) {
    let (m, cv) = &**gate;
    *m.lock().unwrap() = true;
    cv.notify_all();
}

/// org-a, org-b and org-c under one new CA in `dir`, the coordinator's certificate naming
/// `coordinator_hosts`.
pub fn three_organisations(
    dir: &Path,
    federation: &str,
    coordinator_hosts: &[&str],
    validity_days: u32,
) -> Provisioned {
    provision(
        dir,
        &ProvisionSpec {
            federation: federation.into(),
            coordinator_hosts: coordinator_hosts.iter().map(|h| h.to_string()).collect(),
            organisations: vec!["org-a".into(), "org-b".into(), "org-c".into()],
            validity_days,
            overwrite_ca: false,
        },
    )
    .unwrap()
}

/// The files of organisation `name` in `p`.
pub fn party<'a>(p: &'a Provisioned, name: &str) -> &'a PartyFiles {
    &p.organisations
        .iter()
        .find(|o| o.name == name)
        .unwrap()
        .files
}

/// Registers on the generated gRPC client with `header` alone (no entity keys follow);
/// returns the session id.
pub async fn register_by_hand(
    c: &mut CoordinatorClient<Channel>,
    header: proto::RegisterHeader,
) -> Result<String, tonic::Status> {
    let header = proto::RegisterRequest {
        part: Some(register_request::Part::Header(header)),
    };
    let reply = c.register(tokio_stream::iter(vec![header])).await?;
    Ok(reply.into_inner().session_id)
}

/// Polls once on the generated gRPC client and reads the whole task: its header and arrays.
pub async fn poll_task_by_hand(
    c: &mut CoordinatorClient<Channel>,
    session: &str,
) -> (proto::TaskHeader, Vec<NamedArray>) {
    let mut stream = c
        .poll_task(proto::PollRequest {
            session_id: session.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(proto::TaskChunk {
        part: Some(task_chunk::Part::Header(h)),
    }) = stream.message().await.unwrap()
    else {
        panic!("a task starts with a header")
    };
    let mut asm = Assembler::new(&h.arrays).unwrap();
    while let Some(proto::TaskChunk {
        part: Some(task_chunk::Part::Tensor(t)),
    }) = stream.message().await.unwrap()
    {
        asm.push(t).unwrap();
    }
    (h, asm.finish().unwrap())
}
