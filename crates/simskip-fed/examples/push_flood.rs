//! Peak memory of a coordinator flooded by one push of 2 GiB: the coordinator (in this
//! process, plain text on loopback) waits for a second organisation, and a rogue that holds a
//! session and a FIT task streams a result of 2 GiB, generated lazily in 1 MiB chunks, three
//! ways: announced as 2 GiB with no session, announced as 2 GiB from its own session, and
//! announced as the task's true size but followed by 2 GiB of chunks. Prints the process's peak
//! RSS (VmHWM) before and after each, the bytes the rogue managed to send, and the reply.
//!
//! cargo run --release -p simskip-fed --example push_flood -- [GIB]

use std::time::{Duration, Instant};

use simskip_data::NamedArray;
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::{self, register_request, result_chunk, task_chunk};
use simskip_fed::{
    serve, FedAvgStrategy, ServerAuth, ServerConfig, StageConfig, StageKind, StageParams, Strategy,
};
use tokio::net::TcpListener;

const CHUNK: usize = 1 << 20;

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let gib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2);
    let total = gib << 30;
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let cfg = ServerConfig {
        run_id: "flood".into(),
        auth: ServerAuth::insecure(),
        min_clients: 1,
        min_fit_clients: 1,
        round_timeout_secs: 600.0,
        out_dir: dir.path().to_path_buf(),
        stages: vec![StageConfig {
            name: "s".into(),
            rounds: 1,
            eval_every: 0,
            params: StageParams::defaults(StageKind::FedAvg, 4),
            aggregation: Default::default(),
            privacy: None,
            secure_aggregation: None,
        }],
        ..ServerConfig::default()
    };
    let strategies: Vec<Box<dyn Strategy>> =
        vec![Box::new(FedAvgStrategy::new(vec![NamedArray::new(
            "w",
            vec![4],
            vec![0.0; 4],
        )]))];
    tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));
    let mut c = loop {
        match CoordinatorClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => break c.max_encoding_message_size(8 << 20),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let header = proto::RegisterRequest {
        part: Some(register_request::Part::Header(proto::RegisterHeader {
            client_name: "rogue".into(),
            num_examples: 1,
            ..Default::default()
        })),
    };
    let session = c
        .register(tokio_stream::iter(vec![header]))
        .await?
        .into_inner()
        .session_id;
    // Its FIT task.
    let task = loop {
        let mut s = c
            .poll_task(proto::PollRequest {
                session_id: session.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if let Some(proto::TaskChunk {
            part: Some(task_chunk::Part::Header(h)),
        }) = s.message().await?
        {
            if h.kind == proto::TaskKind::Fit as i32 {
                while s.message().await?.is_some() {}
                break h;
            }
        }
    };

    println!(
        "flood of {gib} GiB in {} KiB chunks; peak RSS before: {:.1} MiB",
        CHUNK >> 10,
        vm_hwm_mib()
    );
    for (case, session_id, announced) in [
        (
            "2 GiB announced, no session",
            "no-such-session".to_string(),
            total,
        ),
        ("2 GiB announced, own session", session.clone(), total),
        (
            "true size announced, 2 GiB of chunks follow",
            session.clone(),
            16,
        ),
    ] {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let head = proto::ResultChunk {
            part: Some(result_chunk::Part::Header(proto::ResultHeader {
                run_id: task.run_id.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                session_id,
                kind: task.kind,
                num_examples: 1,
                arrays: vec![proto::ArrayHeader {
                    name: "w".into(),
                    shape: vec![announced / 4],
                    num_bytes: announced,
                    ..task.arrays[0].clone()
                }],
                ..Default::default()
            })),
        };
        let run_id = task.run_id.clone();
        let round = task.round;
        let chunks = (0..total / CHUNK as u64).map(move |i| {
            counter.fetch_add(CHUNK as u64, std::sync::atomic::Ordering::Relaxed);
            proto::ResultChunk {
                part: Some(result_chunk::Part::Tensor(proto::TensorChunk {
                    array_index: 0,
                    offset: i * CHUNK as u64,
                    data: vec![0u8; CHUNK],
                    run_id: run_id.clone(),
                    round,
                })),
            }
        });
        let t0 = Instant::now();
        let reply = c
            .push_result(tokio_stream::iter(std::iter::once(head).chain(chunks)))
            .await;
        let outcome = match reply {
            Ok(r) => {
                let r = r.into_inner();
                format!(
                    "{:?}: {}",
                    proto::ResultStatus::try_from(r.status),
                    r.message
                )
            }
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        println!(
            "{case}: answered in {:.3} s after the rogue generated {:.1} MiB; peak RSS now {:.1} MiB; {outcome}",
            t0.elapsed().as_secs_f64(),
            sent.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1 << 20) as f64,
            vm_hwm_mib()
        );
    }
    Ok(())
}
