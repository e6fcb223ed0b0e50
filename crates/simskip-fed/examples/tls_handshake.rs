//! Cost of mutual TLS against plain text, paired in one run on loopback: (1) a new connection
//! (TCP + TLS handshake + HTTP/2 set-up) plus one small unary call, (2) one small call on an
//! open connection. Plain and TLS samples alternate (ABAB, the order flipping every pair), so
//! both see the same machine load.
//!
//! `cargo run --release -p simskip-fed --example tls_handshake -- [PAIRS]` (default 200).

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use simskip_fed::proto;
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::coordinator_server::{Coordinator, CoordinatorServer};
use simskip_fed::tls::{peer_organisation, provision, ClientTls, ProvisionSpec, ServerTls};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

struct Echo;

type Chunks = Pin<Box<dyn Stream<Item = Result<proto::TaskChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Echo {
    async fn register(
        &self,
        _: Request<Streaming<proto::RegisterRequest>>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type PollTaskStream = Chunks;
    async fn poll_task(&self, _: Request<proto::PollRequest>) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn push_result(
        &self,
        _: Request<Streaming<proto::ResultChunk>>,
    ) -> Result<Response<proto::PushReply>, Status> {
        Err(Status::unimplemented("bench"))
    }
    /// Reads the peer's organisation when there is TLS, as the coordinator will on every call.
    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let run_id = if request.peer_certs().is_some() {
            peer_organisation(&request)?
        } else {
            String::new()
        };
        Ok(Response::new(proto::HeartbeatReply {
            run_id,
            known: true,
            ..Default::default()
        }))
    }
}

async fn start(tls: Option<ServerTlsConfig>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder.add_service(CoordinatorServer::new(Echo));
    // As the coordinator does: without TCP_NODELAY, delayed ACKs add ~40 ms to handshakes.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(router.serve_with_incoming(incoming));
    Ok(addr)
}

fn endpoint(addr: SocketAddr, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    Ok(match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone())?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    }
    .tcp_nodelay(true))
}

async fn call(client: &mut CoordinatorClient<Channel>) -> anyhow::Result<()> {
    client.heartbeat(proto::HeartbeatRequest::default()).await?;
    Ok(())
}

async fn connect_and_call(endpoint: &Endpoint) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut client = CoordinatorClient::new(endpoint.connect().await?);
    call(&mut client).await?;
    Ok(t.elapsed())
}

async fn one_call(client: &mut CoordinatorClient<Channel>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    call(client).await?;
    Ok(t.elapsed())
}

fn summary(label: &str, mut xs: Vec<Duration>) -> f64 {
    xs.sort();
    let q = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    println!(
        "{label:<26} median {:>8.1} us   p10 {:>8.1}  p90 {:>8.1}  min {:>8.1}  max {:>8.1}  (n={})",
        q(0.5),
        q(0.1),
        q(0.9),
        q(0.0),
        q(1.0),
        xs.len()
    );
    q(0.5)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pairs: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| anyhow::anyhow!("PAIRS {n:?}: {e}"))?,
        None => 200,
    };
    let dir = tempfile::tempdir()?;
    let fed = provision(
        dir.path(),
        &ProvisionSpec {
            federation: "bench".into(),
            coordinator_hosts: vec!["localhost".into()],
            organisations: vec!["org-a".into()],
            validity_days: 1,
            overwrite_ca: false,
        },
    )?;
    let plain = endpoint(start(None).await?, None)?;
    let client_tls = ClientTls::load(&fed.organisations[0].files, "localhost")?;
    let tls = endpoint(
        start(Some(ServerTls::load(&fed.coordinator)?)).await?,
        Some(&client_tls),
    )?;

    // Warm-up: first connections pay for lazy initialisation on both sides.
    for _ in 0..10 {
        connect_and_call(&plain).await?;
        connect_and_call(&tls).await?;
    }
    let (mut new_plain, mut new_tls) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        if i % 2 == 0 {
            new_plain.push(connect_and_call(&plain).await?);
            new_tls.push(connect_and_call(&tls).await?);
        } else {
            new_tls.push(connect_and_call(&tls).await?);
            new_plain.push(connect_and_call(&plain).await?);
        }
    }
    let mut open_plain = CoordinatorClient::new(plain.connect().await?);
    let mut open_tls = CoordinatorClient::new(tls.connect().await?);
    let (mut call_plain, mut call_tls) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        if i % 2 == 0 {
            call_plain.push(one_call(&mut open_plain).await?);
            call_tls.push(one_call(&mut open_tls).await?);
        } else {
            call_tls.push(one_call(&mut open_tls).await?);
            call_plain.push(one_call(&mut open_plain).await?);
        }
    }

    println!("loopback, {pairs} interleaved pairs; mutual TLS 1.3, ECDSA P-256 (rcgen), ring");
    let a = summary("connect+call plain", new_plain);
    let b = summary("connect+call mTLS", new_tls);
    println!(
        "{:<26} {:.2}x (+{:.1} us)",
        "  ratio of medians",
        b / a,
        b - a
    );
    let a = summary("call on open conn plain", call_plain);
    let b = summary("call on open conn mTLS", call_tls);
    println!(
        "{:<26} {:.2}x (+{:.1} us)",
        "  ratio of medians",
        b / a,
        b - a
    );
    Ok(())
}
