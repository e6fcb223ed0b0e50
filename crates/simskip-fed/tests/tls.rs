//! Mutual TLS with the federation CA: who may connect, and which organisation name the
//! coordinator sees. A stub coordinator on 127.0.0.1:0 answers `Heartbeat` with the name it
//! read from the peer's certificate (in `run_id`) and `Register` with the name the client
//! claimed next to the name its certificate carries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::coordinator_server::{Coordinator, CoordinatorServer};
use simskip_fed::proto::{self, register_request};
use simskip_fed::tls::{
    organisation_from_der, peer_organisation, provision, AllowList, ClientTls, FederationCa,
    PartyFiles, PeerIdentityError, ProvisionSpec, Provisioned, ServerTls, TlsError, Validity,
};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::transport::{ClientTlsConfig, Endpoint, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status, Streaming};

mod support;
use support::party as org;

/// The name the coordinator's certificate carries and the clients dial.
const HOST: &str = "localhost";

#[derive(Clone)]
struct Stub {
    allow: AllowList,
    /// Every organisation admitted by `Heartbeat`, in order.
    admitted: Arc<Mutex<Vec<String>>>,
}

type Chunks = Pin<Box<dyn Stream<Item = Result<proto::TaskChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Stub {
    async fn register(
        &self,
        request: Request<Streaming<proto::RegisterRequest>>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let certified = peer_organisation(&request)?;
        let claimed = match request.into_inner().message().await? {
            Some(proto::RegisterRequest {
                part: Some(register_request::Part::Header(h)),
            }) => h.client_name,
            _ => return Err(Status::invalid_argument("no header")),
        };
        Ok(Response::new(proto::RegisterReply {
            run_id: certified,
            session_id: claimed,
            ..Default::default()
        }))
    }

    type PollTaskStream = Chunks;

    async fn poll_task(
        &self,
        _request: Request<proto::PollRequest>,
    ) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn push_result(
        &self,
        _request: Request<Streaming<proto::ResultChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let org = self.allow.admit(&request)?;
        self.admitted.lock().unwrap().push(org.clone());
        Ok(Response::new(proto::HeartbeatReply {
            run_id: org,
            known: true,
            ..Default::default()
        }))
    }
}

struct Running {
    addr: SocketAddr,
    admitted: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn admitted(&self) -> Vec<String> {
        self.admitted.lock().unwrap().clone()
    }
}

/// A stub coordinator on 127.0.0.1:0, with TLS when `tls` is given. It admits org-a and
/// org-b. The listener is bound before this returns, so connections queue until it serves.
async fn start(tls: Option<ServerTlsConfig>) -> Running {
    let (listener, _) = support::loopback_listener().await;
    let addr = listener.local_addr().unwrap();
    let stub = Stub {
        allow: AllowList::new(["org-a", "org-b"]).unwrap(),
        admitted: Arc::default(),
    };
    let admitted = stub.admitted.clone();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let router = builder.add_service(CoordinatorServer::new(stub));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    Running { addr, admitted }
}

/// Provisions org-a, org-b and org-c (org-c is not in the stub's allow-list).
fn federation(dir: &Path, name: &str) -> Provisioned {
    support::three_organisations(dir, name, &[HOST, "127.0.0.1"], 30)
}

async fn connect(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<CoordinatorClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    Ok(CoordinatorClient::new(endpoint.connect().await?))
}

/// Connects and sends one heartbeat: the organisation name the server saw, or why not.
async fn heartbeat(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<String, String> {
    let mut client = connect(addr, tls).await.map_err(|e| format!("{e:?}"))?;
    let reply = client
        .heartbeat(proto::HeartbeatRequest::default())
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(reply.into_inner().run_id)
}

fn copy_party(files: &PartyFiles, dir: &Path) -> PartyFiles {
    std::fs::create_dir_all(dir).unwrap();
    let out = PartyFiles::in_dir(dir);
    std::fs::copy(&files.cert, &out.cert).unwrap();
    std::fs::copy(&files.key, &out.key).unwrap();
    std::fs::copy(&files.ca, &out.ca).unwrap();
    out
}

#[tokio::test]
async fn federation_client_connects_and_server_sees_its_organisation() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    for name in ["org-a", "org-b"] {
        let tls = ClientTls::load(org(&fed, name), HOST).unwrap();
        assert_eq!(heartbeat(server.addr, Some(tls)).await.unwrap(), name);
    }
    assert_eq!(server.admitted(), ["org-a", "org-b"]);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("fed"), "fed");
    let rogue = federation(&dir.path().join("rogue"), "rogue");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    // The rogue's own org-a certificate, with the real federation CA as trust root, so the
    // client accepts the server and only the server's check of the client can refuse it.
    let mut files = copy_party(org(&rogue, "org-a"), &dir.path().join("mix"));
    files.ca = fed.coordinator.ca.clone();
    let refused = heartbeat(server.addr, Some(ClientTls::load(&files, HOST).unwrap())).await;
    assert!(refused.is_err(), "rogue certificate admitted: {refused:?}");

    let good = ClientTls::load(org(&fed, "org-a"), HOST).unwrap();
    assert_eq!(heartbeat(server.addr, Some(good)).await.unwrap(), "org-a");
    assert_eq!(server.admitted(), ["org-a"]);
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("fed"), "fed");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    let ca = FederationCa::load(&fed.ca_cert, &fed.ca_key).unwrap();
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = ca
        .issue_organisation(
            "org-a",
            Validity {
                not_before: now - 10 * day,
                not_after: now - day,
            },
        )
        .unwrap();
    let files = copy_party(org(&fed, "org-a"), &dir.path().join("expired"));
    std::fs::write(&files.cert, &expired.cert_pem).unwrap();
    std::fs::write(&files.key, &expired.key_pem).unwrap();
    // Same CA, same name: only the validity window differs from an admitted certificate.
    let der = pem_der(&files.cert);
    assert_eq!(organisation_from_der(&der).unwrap(), "org-a");

    let refused = heartbeat(server.addr, Some(ClientTls::load(&files, HOST).unwrap())).await;
    assert!(
        refused.is_err(),
        "expired certificate admitted: {refused:?}"
    );
    assert!(server.admitted().is_empty());
}

#[tokio::test]
async fn name_comes_from_the_certificate_not_from_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    // org-a's client holding org-b's certificate and claiming to be org-a.
    let tls = ClientTls::load(org(&fed, "org-b"), HOST).unwrap();
    let mut client = connect(server.addr, Some(tls)).await.unwrap();
    let header = proto::RegisterRequest {
        part: Some(register_request::Part::Header(proto::RegisterHeader {
            client_name: "org-a".into(),
            ..Default::default()
        })),
    };
    let reply = client
        .register(tokio_stream::iter([header]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.session_id, "org-a", "the claim reached the server");
    assert_eq!(
        reply.run_id, "org-b",
        "the certificate's name is what counts"
    );

    // org-c holds a valid federation certificate but is not in the coordinator's list.
    let tls = ClientTls::load(org(&fed, "org-c"), HOST).unwrap();
    let mut client = connect(server.addr, Some(tls)).await.unwrap();
    let status = client
        .heartbeat(proto::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(server.admitted().is_empty());

    let allow = AllowList::new(["org-a"]).unwrap();
    assert!(allow.check("org-a").is_ok());
    assert_eq!(
        allow.check("org-b").unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn plain_text_client_fails_against_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    let refused = heartbeat(server.addr, None).await;
    assert!(refused.is_err(), "plain text admitted: {refused:?}");
    assert!(server.admitted().is_empty());
}

#[tokio::test]
async fn client_refuses_a_server_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(&dir.path().join("fed"), "fed");
    let rogue = federation(&dir.path().join("rogue"), "rogue");
    // A rogue coordinator, configured to accept the federation's client certificates.
    let mut rogue_server = copy_party(&rogue.coordinator, &dir.path().join("rogue-server"));
    rogue_server.ca = fed.ca_cert.clone();
    let server = start(Some(ServerTls::load(&rogue_server).unwrap())).await;

    let tls = ClientTls::load(org(&fed, "org-a"), HOST).unwrap();
    let refused = heartbeat(server.addr, Some(tls)).await;
    assert!(
        refused.is_err(),
        "client accepted a rogue server: {refused:?}"
    );
    assert!(server.admitted().is_empty());
}

#[tokio::test]
async fn coordinator_certificate_is_no_client_certificate() {
    // Signed by the federation CA, but serverAuth only and without an organisation name.
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    let server = start(Some(ServerTls::load(&fed.coordinator).unwrap())).await;

    let tls = ClientTls::load(&fed.coordinator, HOST).unwrap();
    let refused = heartbeat(server.addr, Some(tls)).await;
    assert!(
        refused.is_err(),
        "serverAuth certificate admitted: {refused:?}"
    );
    assert_eq!(
        organisation_from_der(&pem_der(&fed.coordinator.cert)),
        Err(PeerIdentityError::NoName)
    );
}

#[tokio::test]
async fn plain_text_server_sees_no_organisation() {
    let server = start(None).await;
    let mut client = connect(server.addr, None).await.unwrap();
    let status = client
        .heartbeat(proto::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[test]
fn provision_writes_the_layout_with_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    assert_eq!(fed.ca_cert, dir.path().join("ca.pem"));
    assert_eq!(fed.ca_key, dir.path().join("ca.key"));
    assert_eq!(
        fed.coordinator,
        PartyFiles::in_dir(&dir.path().join("coordinator"))
    );
    let names: Vec<_> = fed.organisations.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["org-a", "org-b", "org-c"]);
    let ca = std::fs::read(&fed.ca_cert).unwrap();
    for o in &fed.organisations {
        assert_eq!(o.files, PartyFiles::in_dir(&dir.path().join(&o.name)));
        assert_eq!(std::fs::read(&o.files.ca).unwrap(), ca);
        let der = pem_der(&o.files.cert);
        assert_eq!(organisation_from_der(&der).unwrap(), o.name);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), o.name);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }
    let der = pem_der(&fed.coordinator.cert);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fed.ca_key), 0o600);
        assert_eq!(mode(&fed.coordinator.key), 0o600);
        for o in &fed.organisations {
            assert_eq!(mode(&o.files.key), 0o600);
        }
    }
}

#[test]
fn provision_refuses_to_replace_a_ca_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let first = federation(dir.path(), "fed");
    let ca_before = std::fs::read(&first.ca_cert).unwrap();
    let mut spec = ProvisionSpec {
        federation: "fed".into(),
        coordinator_hosts: vec![HOST.into()],
        organisations: vec!["org-a".into()],
        validity_days: 30,
        overwrite_ca: false,
    };
    let err = provision(dir.path(), &spec).unwrap_err();
    assert!(
        matches!(&err, TlsError::CaExists { path } if path == &first.ca_cert),
        "{err}"
    );
    assert_eq!(std::fs::read(&first.ca_cert).unwrap(), ca_before);

    spec.overwrite_ca = true;
    let second = provision(dir.path(), &spec).unwrap();
    assert_ne!(std::fs::read(&second.ca_cert).unwrap(), ca_before);
}

#[test]
fn provision_rejects_bad_specs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = |orgs: &[&str], hosts: &[&str], days| ProvisionSpec {
        federation: "fed".into(),
        coordinator_hosts: hosts.iter().map(|s| s.to_string()).collect(),
        organisations: orgs.iter().map(|s| s.to_string()).collect(),
        validity_days: days,
        overwrite_ca: false,
    };
    let cases = [
        spec(&["org-a", "org-a"], &[HOST], 30),
        spec(&["../escape"], &[HOST], 30),
        spec(&[""], &[HOST], 30),
        spec(&[], &[HOST], 30),
        spec(&["org-a"], &[], 30),
        spec(&["org-a"], &["not a host"], 30),
        spec(&["org-a"], &[HOST], 0),
    ];
    for case in &cases {
        assert!(provision(dir.path(), case).is_err(), "{case:?} accepted");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "wrote files"
    );
}

#[test]
fn loading_names_the_missing_or_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let fed = federation(dir.path(), "fed");
    let files = copy_party(org(&fed, "org-a"), &dir.path().join("broken"));

    std::fs::remove_file(&files.key).unwrap();
    let err = ClientTls::load(&files, HOST).unwrap_err();
    assert!(
        matches!(&err, TlsError::Missing { path } if path == &files.key),
        "{err}"
    );
    assert!(err.to_string().contains(&files.key.display().to_string()));

    std::fs::write(&files.key, "not a key").unwrap();
    let err = ServerTls::load(&files).unwrap_err();
    assert!(
        matches!(&err, TlsError::NoPrivateKey { path } if path == &files.key),
        "{err}"
    );

    std::fs::write(
        &files.ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::copy(&org(&fed, "org-a").key, &files.key).unwrap();
    let err = ServerTls::load(&files).unwrap_err();
    assert!(
        matches!(&err, TlsError::InvalidCertificate { path, .. } if path == &files.ca),
        "{err}"
    );

    let err = ServerTls::load_dir(&dir.path().join("nowhere")).unwrap_err();
    let want: PathBuf = dir.path().join("nowhere").join("cert.pem");
    assert!(
        matches!(&err, TlsError::Missing { path } if path == &want),
        "{err}"
    );
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}
