//! Identity on a real coordinator over loopback: mutual TLS (the default) and per-organisation
//! tokens, attacked by outsiders, by an unlisted organisation holding a valid certificate, and
//! by a member trying to pass for another member. Also the run-wide quorum deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use simskip_data::NamedArray;
use simskip_fed::auth::{new_token, TokenEntry, ORGANISATION_METADATA};
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::{self, result_chunk};
use simskip_fed::tls::{ClientTls, PartyFiles, Provisioned};
use simskip_fed::{
    run_client, serve, ClientAuth, ClientConfig, ClientWork, EvalOutput, FedAvgStrategy, FedError,
    FitOutput, RunSummary, ServerAuth, ServerConfig, StageConfig, StageInfo, StageKind,
    StageParams, Strategy, WorkError,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

mod support;
use support::{add_to_every_value, loopback_listener, party};

/// Adds its id to every weight; evaluates to id/10.
struct Honest {
    id: u32,
}

impl ClientWork for Honest {
    fn entity_keys(&self) -> Vec<String> {
        vec![]
    }
    fn num_examples(&self) -> u64 {
        10
    }
    fn fit(
        &mut self,
        _: &StageInfo,
        _: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        Ok(FitOutput {
            arrays: add_to_every_value(global, self.id as f32),
            num_examples: 10,
            metrics: BTreeMap::from([("loss".to_string(), 1.0)]),
        })
    }
    fn evaluate(
        &mut self,
        _: &StageInfo,
        _: u32,
        _: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        Ok(EvalOutput {
            num_examples: 10,
            metrics: BTreeMap::from([("acc".to_string(), self.id as f64 / 10.0)]),
        })
    }
    fn finish_stage(&mut self, _: &StageInfo, _: Vec<NamedArray>) -> Result<(), WorkError> {
        Ok(())
    }
}

const HOST: &str = "127.0.0.1";

/// org-a, org-b and org-c under one CA; the coordinators below list only some of them.
fn federation(dir: &Path, federation: &str) -> Provisioned {
    support::three_organisations(dir, federation, &[HOST], 2)
}

fn server_config(out: &Path, auth: ServerAuth, min_clients: usize) -> ServerConfig {
    let mut params = StageParams::defaults(StageKind::FedAvg, 4);
    if let StageParams::SimSkip(p) = &mut params {
        p.config.batch_size = 3;
    }
    let stages = vec![support::stage("s", 2, 0, params)];
    ServerConfig {
        auth,
        // Long: a round that closed by timeout would show in the records.
        round_timeout_secs: 60.0,
        heartbeat_timeout_secs: 5.0,
        done_grace_secs: 2.0,
        ..support::server_config("identity-run", out, stages, min_clients, min_clients)
    }
}

fn strategies() -> Vec<Box<dyn Strategy>> {
    vec![Box::new(FedAvgStrategy::new(vec![NamedArray::new(
        "w",
        vec![2],
        vec![0.0, 0.0],
    )]))]
}

async fn start(cfg: ServerConfig) -> (u16, tokio::task::JoinHandle<Result<RunSummary, FedError>>) {
    let (listener, port) = loopback_listener().await;
    let server = tokio::spawn(serve(cfg, listener, strategies(), std::future::pending()));
    (port, server)
}

fn client_config(port: u16, auth: ClientAuth, name: &str) -> ClientConfig {
    let scheme = if auth == (ClientAuth::Insecure {}) {
        "http"
    } else {
        "https"
    };
    ClientConfig {
        server: format!("{scheme}://{HOST}:{port}"),
        auth,
        connect_retries: 5,
        ..support::client_config(port, name)
    }
}

fn mtls(dir: &Path) -> ClientAuth {
    ClientAuth::Mtls {
        tls_dir: dir.to_path_buf(),
        server_name: None,
    }
}

/// A hand-driven client presenting `files` (or nothing, in plain text).
async fn raw(port: u16, files: Option<&PartyFiles>) -> Result<CoordinatorClient<Channel>, String> {
    let endpoint = match files {
        Some(f) => Endpoint::from_shared(format!("https://{HOST}:{port}"))
            .unwrap()
            .tls_config(ClientTls::load(f, HOST).unwrap())
            .unwrap(),
        None => Endpoint::from_shared(format!("http://{HOST}:{port}")).unwrap(),
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(CoordinatorClient::new(channel))
}

async fn register(
    c: &mut CoordinatorClient<Channel>,
    claimed: &str,
) -> Result<String, tonic::Status> {
    let header = proto::RegisterHeader {
        client_name: claimed.into(),
        num_examples: 10,
        ..Default::default()
    };
    support::register_by_hand(c, header).await
}

async fn heartbeat(
    c: &mut CoordinatorClient<Channel>,
    session: &str,
) -> Result<proto::HeartbeatReply, tonic::Status> {
    c.heartbeat(proto::HeartbeatRequest {
        session_id: session.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn assert_honest_run(summary: &RunSummary, members: &[&str]) {
    assert!(summary.completed);
    // Two FIT rounds, the final EVALUATE and FINISH_STAGE; none closed by its timeout, and
    // only members ever answered.
    assert_eq!(summary.records.len(), 4, "{:?}", summary.records);
    for r in &summary.records {
        assert!(!r.timed_out, "round {} of {:?} timed out", r.round, r.kind);
        let answered: Vec<&str> = r.clients.keys().map(String::as_str).collect();
        assert_eq!(answered, members, "round {} {:?}", r.round, r.kind);
    }
    // FedAvg of +1 and +2 with equal weights, twice: 3.0.
    assert_eq!(summary.globals[0].arrays[0].data, vec![3.0, 3.0]);
}

/// org-a (adding 1) and org-b (adding 2) run the federation under these settings to its end,
/// and the run is the honest one.
async fn members_complete_the_run(
    server: tokio::task::JoinHandle<Result<RunSummary, FedError>>,
    org_a: ClientConfig,
    org_b: ClientConfig,
) {
    let a = tokio::spawn(run_client(org_a, Honest { id: 1 }));
    let b = tokio::spawn(run_client(org_b, Honest { id: 2 }));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let summary = server.await.unwrap().unwrap();
    assert_honest_run(&summary, &["org-a", "org-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_admits_only_listed_organisations_under_their_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("pki"), "fed");
    let evil = federation(&dir.path().join("evil-pki"), "fed");
    let auth = ServerAuth::Mtls {
        tls_dir: fed.coordinator.cert.parent().unwrap().to_path_buf(),
        organisations: vec!["org-a".into(), "org-b".into()],
    };
    let (port, server) = start(server_config(&dir.path().join("out"), auth, 2)).await;

    // Outsiders, before the members arrive.
    // Plain text gets no gRPC answer at all.
    let plain = match raw(port, None).await {
        Err(e) => e,
        Ok(mut c) => format!("{:?}", heartbeat(&mut c, "").await.unwrap_err()),
    };
    assert!(!plain.is_empty());
    // A certificate for org-a from another CA fails the handshake.
    let forged = match raw(port, Some(party(&evil, "org-a"))).await {
        Err(e) => e,
        Ok(mut c) => format!("{:?}", register(&mut c, "org-a").await.unwrap_err()),
    };
    assert!(!forged.is_empty());
    // org-c's certificate is genuine, but this federation does not list org-c: every call is
    // refused, 50 times over, and nothing about the run is said.
    for _ in 0..50 {
        let mut c = raw(port, Some(party(&fed, "org-c"))).await.unwrap();
        let refused = register(&mut c, "org-c").await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(!refused.message().contains("identity-run"));
        let probe = heartbeat(&mut c, "").await.unwrap_err();
        assert_eq!(probe.code(), Code::PermissionDenied);
    }
    // org-c cannot pass for a member either: its name is in its certificate.
    let mut c = raw(port, Some(party(&fed, "org-c"))).await.unwrap();
    assert_eq!(
        register(&mut c, "org-a").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The members run the federation over mTLS; their names come from their certificates.
    members_complete_the_run(
        server,
        client_config(port, mtls(party(&fed, "org-a").cert.parent().unwrap()), ""),
        client_config(
            port,
            mtls(party(&fed, "org-b").cert.parent().unwrap()),
            "org-b",
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cannot_use_or_evict_another_members_session() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("pki"), "fed");
    let auth = ServerAuth::Mtls {
        tls_dir: fed.coordinator.cert.parent().unwrap().to_path_buf(),
        organisations: vec!["org-a".into(), "org-b".into(), "org-c".into()],
    };
    // Four needed: the run never starts, so sessions stay as registered.
    let (port, server) = start(server_config(&dir.path().join("out"), auth, 4)).await;

    let mut b = raw(port, Some(party(&fed, "org-b"))).await.unwrap();
    let b_session = register(&mut b, "").await.unwrap();
    assert!(heartbeat(&mut b, &b_session).await.unwrap().known);

    // org-a is a member, and holds org-b's session id (leaked, say).
    let mut a = raw(port, Some(party(&fed, "org-a"))).await.unwrap();
    // Registering under org-b's name is refused; org-b's session survives.
    assert_eq!(
        register(&mut a, "org-b").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The stolen session is worth nothing without org-b's certificate.
    let reply = heartbeat(&mut a, &b_session).await.unwrap();
    assert!(!reply.known && reply.run_id.is_empty());
    let polled = a
        .poll_task(proto::PollRequest {
            session_id: b_session.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(polled.code(), Code::NotFound);
    let push = a
        .push_result(tokio_stream::iter(vec![proto::ResultChunk {
            part: Some(result_chunk::Part::Header(proto::ResultHeader {
                session_id: b_session.clone(),
                run_id: "identity-run".into(),
                ..Default::default()
            })),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(push.status, proto::ResultStatus::Accepted as i32);
    // org-a's own registration does not touch org-b's.
    let a_session = register(&mut a, "org-a").await.unwrap();
    assert_ne!(a_session, b_session);
    assert!(heartbeat(&mut b, &b_session).await.unwrap().known);
    assert!(heartbeat(&mut a, &a_session).await.unwrap().known);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_admit_their_holders_over_tls_and_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("pki"), "fed");
    let (token_a, digest_a) = new_token();
    let (token_b, digest_b) = new_token();
    let auth = ServerAuth::Tokens {
        tls_dir: fed.coordinator.cert.parent().unwrap().to_path_buf(),
        organisations: vec![
            TokenEntry {
                name: "org-a".into(),
                token_sha256: digest_a.clone(),
            },
            TokenEntry {
                name: "org-b".into(),
                token_sha256: digest_b,
            },
        ],
    };
    let (port, server) = start(server_config(&dir.path().join("out"), auth, 2)).await;
    let token_auth = |token: &str| ClientAuth::Token {
        ca: fed.ca_cert.clone(),
        token: Some(token.into()),
        token_file: None,
        server_name: None,
    };

    // Wrong token, a's token under b's name, and the stored digest instead of the token: each
    // is refused for good, with no retry.
    for (name, token) in [
        ("org-a", "0".repeat(64)),
        ("org-b", token_a.clone()),
        ("org-a", digest_a.clone()),
    ] {
        let err = run_client(
            client_config(port, token_auth(&token), name),
            Honest { id: 9 },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, FedError::Refused { what: "registration", message, .. } if message.contains("Unauthenticated")),
            "{name}: {err}"
        );
    }
    // A by-hand call that presents org-a's name with no token at all.
    let mut c = Endpoint::from_shared(format!("https://{HOST}:{port}"))
        .unwrap()
        .tls_config(ClientTls::load_server_only(&fed.ca_cert, HOST).unwrap())
        .unwrap()
        .connect()
        .await
        .map(CoordinatorClient::new)
        .unwrap();
    let mut req = tonic::Request::new(proto::HeartbeatRequest::default());
    req.metadata_mut()
        .insert(ORGANISATION_METADATA, "org-a".parse().unwrap());
    assert_eq!(
        c.heartbeat(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Plain text is not served.
    let plain = match raw(port, None).await {
        Err(e) => e,
        Ok(mut c) => format!("{:?}", heartbeat(&mut c, "").await.unwrap_err()),
    };
    assert!(!plain.is_empty());

    // The holders, one of them reading its token from a file.
    let token_file: PathBuf = dir.path().join("org-b.token");
    std::fs::write(&token_file, format!("{token_b}\n")).unwrap();
    members_complete_the_run(
        server,
        client_config(port, token_auth(&token_a), "org-a"),
        client_config(
            port,
            ClientAuth::Token {
                ca: fed.ca_cert.clone(),
                token: None,
                token_file: Some(token_file),
                server_name: None,
            },
            "org-b",
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_cannot_reach_its_minimum_is_aborted_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(&dir.path().join("out"), ServerAuth::insecure(), 3);
    cfg.quorum_timeout_secs = 1.5;
    let (port, server) = start(cfg).await;
    let lonely = tokio::spawn(run_client(
        client_config(port, ClientAuth::Insecure {}, "org-a"),
        Honest { id: 1 },
    ));
    let err = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the coordinator gives up by itself")
        .unwrap()
        .unwrap_err();
    match &err {
        FedError::Aborted { run_id, reason } => {
            assert_eq!(run_id, "identity-run");
            assert!(reason.contains("1 of the 3"), "{reason}");
        }
        other => panic!("expected Aborted, got {other}"),
    }
    // The lonely client is not left hanging either.
    let _ = tokio::time::timeout(Duration::from_secs(30), lonely)
        .await
        .expect("the client ends too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blinded_keys_align_shared_entities_and_hide_every_name_from_the_coordinator() {
    use simskip_fed::blind::{BlindKeys, KeyBlinder};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("federation.secret");
    std::fs::write(&secret, simskip_fed::blind::new_secret()).unwrap();
    let mut cfg = server_config(&dir.path().join("out"), ServerAuth::insecure(), 2);
    cfg.stages = vec![support::stage(
        "fede",
        1,
        0,
        StageParams::defaults(StageKind::FedE, 4),
    )];
    let (listener, port) = loopback_listener().await;
    let strategies: Vec<Box<dyn Strategy>> =
        vec![Box::new(simskip_fed::FedEStrategy::new(4, 0.1, 1))];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let orgs = [
        ("org-a", names(&["dog.n.01", "cat.n.01"])),
        ("org-b", names(&["cat.n.01", "fish.n.01"])),
    ];
    let mut clients = Vec::new();
    for (name, held) in orgs.clone() {
        let mut c = client_config(port, ClientAuth::Insecure {}, name);
        c.blind_keys = Some(BlindKeys {
            secret_file: secret.clone(),
        });
        let work = Marker {
            names: held,
            mark: 0.5,
            seen: Seen::default(),
        };
        clients.push(tokio::spawn(run_client(c, work)));
    }
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    let keys = summary.globals[0].keys.clone().expect("FedE keys its rows");
    // The shared entity is one row (aligned), and no name reached the coordinator: not in
    // its global table, not in anything it wrote.
    assert_eq!(keys.len(), 3, "{keys:?}");
    let blinder = KeyBlinder::from_file(&secret).unwrap();
    let mut expected = blinder.blind_all(&names(&["dog.n.01", "cat.n.01", "fish.n.01"]));
    expected.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, expected);
    for entry in walk(&dir.path().join("out")) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for n in ["dog", "cat", "fish"] {
            assert!(!text.contains(n), "{} holds {n:?}", entry.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// (event, arrays received), in order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<NamedArray>)>>>;

/// Sets every row it returns to `mark`; records what it receives.
struct Marker {
    names: Vec<String>,
    mark: f32,
    seen: Seen,
}

impl ClientWork for Marker {
    fn entity_keys(&self) -> Vec<String> {
        self.names.clone()
    }
    fn num_examples(&self) -> u64 {
        10
    }
    fn fit(
        &mut self,
        _: &StageInfo,
        round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        self.seen
            .lock()
            .unwrap()
            .push((format!("fit{round}"), global.clone()));
        let arrays = global
            .into_iter()
            .map(|mut a| {
                a.data.iter_mut().for_each(|v| *v = self.mark);
                a
            })
            .collect();
        Ok(FitOutput {
            arrays,
            num_examples: 10,
            metrics: BTreeMap::new(),
        })
    }
    fn evaluate(
        &mut self,
        _: &StageInfo,
        _: u32,
        _: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        Ok(EvalOutput {
            num_examples: 10,
            metrics: BTreeMap::new(),
        })
    }
    fn finish_stage(&mut self, _: &StageInfo, global: Vec<NamedArray>) -> Result<(), WorkError> {
        self.seen.lock().unwrap().push(("finish".into(), global));
        Ok(())
    }
}

/// A plain-text FedE run of 2 rounds at width 4 for `orgs` organisations that exchanges rows
/// of entities held by at least two (summed securely when `secure`), and the bound of its
/// rows' initial draw.
fn shared_rows_fede(out: &Path, orgs: usize, secure: bool) -> (ServerConfig, f32) {
    let mut cfg = server_config(out, ServerAuth::insecure(), orgs);
    let params = StageParams::defaults(StageKind::FedE, 4);
    let bound = match &params {
        StageParams::FedE(t) => simskip_kge::init_bound(t),
        _ => unreachable!(),
    };
    cfg.stages = vec![StageConfig {
        aggregation: simskip_fed::Robustness {
            min_holders: 2,
            ..Default::default()
        },
        secure_aggregation: secure.then(simskip_fed::secagg::SecureAggregation::default),
        ..support::stage("fede", 2, 0, params)
    }];
    (cfg, bound)
}

/// The coordinator's FedE strategy for a [`shared_rows_fede`] run.
fn fede_strategies(cfg: &ServerConfig, bound: f32) -> Vec<Box<dyn Strategy>> {
    vec![Box::new(
        simskip_fed::FedEStrategy::new(4, bound, 1).with_rule(cfg.stages[0].aggregation.clone()),
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_of_entities_held_by_one_organisation_never_leave_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, bound) = shared_rows_fede(&dir.path().join("out"), 2, false);
    let (listener, port) = loopback_listener().await;
    let strategies = fede_strategies(&cfg, bound);
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let logs: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    let mut clients = Vec::new();
    for (k, (name, held, mark)) in [
        ("org-a", names(&["a-only", "shared"]), 100.0),
        ("org-b", names(&["shared", "b-only"]), 200.0),
    ]
    .into_iter()
    .enumerate()
    {
        let work = Marker {
            names: held,
            mark,
            seen: std::sync::Arc::clone(&logs[k]),
        };
        clients.push(tokio::spawn(run_client(
            client_config(port, ClientAuth::Insecure {}, name),
            work,
        )));
    }
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    let global = &summary.globals[0];
    let keys = global.keys.clone().unwrap();
    let row = |k: &str| {
        let i = keys.iter().position(|x| x == k).unwrap();
        global.arrays[0].data[i * 4..(i + 1) * 4].to_vec()
    };
    // The shared entity is the mean of both marks; the private ones never reached the
    // coordinator: their rows there are still its initial draw, inside the bound.
    assert_eq!(row("shared"), vec![150.0; 4]);
    for k in ["a-only", "b-only"] {
        assert!(row(k).iter().all(|v| v.abs() <= bound), "{k}: {:?}", row(k));
    }
    // Each organisation's work still sees its whole table: in round 2 its private row is what
    // it produced in round 1 (kept at home), its shared row the federation's mean.
    for (k, mark, private_at) in [(0, 100.0, 0), (1, 200.0, 1)] {
        let seen = logs[k].lock().unwrap().clone();
        let (_, round2) = seen.iter().find(|(e, _)| e == "fit2").expect("round 2");
        let rows = &round2[0];
        assert_eq!(rows.shape, vec![2, 4]);
        let shared_at = 1 - private_at;
        assert_eq!(rows.data[private_at * 4..private_at * 4 + 4], [mark; 4]);
        assert_eq!(rows.data[shared_at * 4..shared_at * 4 + 4], [150.0; 4]);
    }
}

/// FedE with `secure_aggregation`: the coordinator only ever holds masked rows, and each shared
/// entity still becomes the mean over its holders (three organisations over real gRPC, the
/// client library on each side); rows one organisation holds never leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fede_rows_are_summed_securely_per_entity() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, bound) = shared_rows_fede(&dir.path().join("out"), 3, true);
    // 16-byte chunks: each masked input (3 shared entities x 4 + 1 = 13 ring elements) crosses
    // in 7 chunks, as a large table would.
    cfg.chunk_bytes = 16;
    cfg.validate().unwrap();
    let (listener, port) = loopback_listener().await;
    let strategies = fede_strategies(&cfg, bound);
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut clients = Vec::new();
    for (name, held, mark) in [
        ("org-a", names(&["a-only", "ab", "abc"]), 100.0),
        ("org-b", names(&["ab", "b-only", "abc"]), 200.0),
        ("org-c", names(&["abc", "c-only"]), 600.0),
    ] {
        let work = Marker {
            names: held,
            mark,
            seen: Seen::default(),
        };
        clients.push(tokio::spawn(run_client(
            client_config(port, ClientAuth::Insecure {}, name),
            work,
        )));
    }
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    let fits: Vec<_> = summary
        .records
        .iter()
        .filter(|r| r.kind == simskip_fed::TaskKind::Fit)
        .collect();
    assert_eq!(fits.len(), 2);
    for r in &fits {
        assert!(r.aggregated, "{:?}", r.note);
        assert_eq!(r.num_clients, 3, "{:?}", r.note);
        assert!(r.failures.is_empty(), "{:?}", r.failures);
    }
    let global = &summary.globals[0];
    let keys = global.keys.clone().unwrap();
    let row = |k: &str| {
        let i = keys.iter().position(|x| x == k).unwrap();
        global.arrays[0].data[i * 4..(i + 1) * 4].to_vec()
    };
    // Means over each entity's holders, within the fixed-point step (2^-24 per holder).
    for (k, mean) in [("ab", 150.0f32), ("abc", 300.0)] {
        assert!(
            row(k).iter().all(|v| (v - mean).abs() < 1e-4),
            "{k}: {:?}",
            row(k)
        );
    }
    for k in ["a-only", "b-only", "c-only"] {
        assert!(row(k).iter().all(|v| v.abs() <= bound), "{k}: {:?}", row(k));
    }
}
