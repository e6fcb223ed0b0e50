//! The Prometheus endpoints of a real run: a coordinator and three honest in-process clients
//! over loopback gRPC, both endpoints on port 0, scraped over plain TCP while the run is held
//! in its very last task (one client blocks in the last FINISH_STAGE until the test has read
//! the figures), so every figure read is final and nothing depends on timing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use simskip_data::NamedArray;
use simskip_fed::{
    run_client, serve, ClientConfig, ClientWork, EvalOutput, FedAvgStrategy, FedEStrategy,
    FitOutput, ServerConfig, StageConfig, StageInfo, StageKind, StageParams, Strategy, WorkError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::{add_to_every_value, loopback_listener, open_gate, Gate};

/// Opens the gate when dropped, so a failing test never leaves a client blocked.
struct Release(Gate);
impl Drop for Release {
    fn drop(&mut self) {
        open_gate(&self.0);
    }
}

/// FIT returns the global arrays plus one, with loss = id; EVALUATE reports acc = id / 10.
struct Fake {
    id: u32,
    examples: u64,
    keys: Vec<String>,
    /// Blocks in `finish_stage` of this stage, after saying so, until the gate opens.
    hold: Option<(String, Gate, tokio::sync::mpsc::UnboundedSender<()>)>,
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
        _stage: &StageInfo,
        _round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        Ok(FitOutput {
            arrays: add_to_every_value(global, 1.0),
            num_examples: self.examples,
            metrics: BTreeMap::from([("loss".to_string(), f64::from(self.id))]),
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
            metrics: BTreeMap::from([("acc".to_string(), f64::from(self.id) / 10.0)]),
        })
    }
    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        _global: Vec<NamedArray>,
    ) -> Result<(), WorkError> {
        if let Some((held, gate, entered)) = &self.hold {
            if *held == stage.name {
                let _ = entered.send(());
                let (m, cv) = &**gate;
                let open = m.lock().unwrap();
                // Bounded: a test that never opens the gate still ends.
                let _ = cv
                    .wait_timeout_while(open, Duration::from_secs(120), |open| !*open)
                    .unwrap();
            }
        }
        Ok(())
    }
}

fn stage(name: &str, kind: StageKind, rounds: u32, eval_every: u32) -> StageConfig {
    support::stage(name, rounds, eval_every, StageParams::defaults(kind, 4))
}

type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

/// The samples of a text exposition (`name{k="v",...} value`), keyed by name and sorted
/// labels; also checks that every sample's family was declared with a `# TYPE` line.
fn parse(text: &str) -> Samples {
    let mut declared = Vec::new();
    let mut out = Samples::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            declared.push(t.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let mut labels: Vec<(String, String)> = rest
                    .strip_suffix('}')
                    .unwrap()
                    .split("\",")
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                labels.sort();
                (name.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
        };
        assert!(
            declared.iter().any(|d| name.starts_with(d.as_str())),
            "{name} has no # TYPE line"
        );
        assert!(out.insert((name, labels), value).is_none(), "twice: {line}");
    }
    out
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *s.get(&(name.to_string(), l))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Sum of every sample of `name` whose labels include `labels`.
fn sum(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// `GET /metrics` over a plain TCP connection: the body, after checking status and type.
async fn scrape(addr: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut raw))
        .await
        .expect("the metrics endpoint answers")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{head}");
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(
        headers["content-length"].parse::<usize>().unwrap(),
        body.len()
    );
    body.to_string()
}

fn read_address(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_and_client_serve_their_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = loopback_listener().await;
    // FIT rounds: 2 + 2; EVALUATE: after each kge round, after refine's last; FINISH: 2.
    let stages = vec![
        stage("kge", StageKind::FedE, 2, 1),
        stage("refine", StageKind::FedAvg, 2, 0),
    ];
    let fit_rounds: u32 = stages.iter().map(|s| s.rounds).sum();
    let server_metrics_file = dir.path().join("coordinator.metrics-addr");
    let cfg = ServerConfig {
        round_timeout_secs: 60.0,
        heartbeat_timeout_secs: 5.0,
        metrics_listen: Some("127.0.0.1:0".into()),
        metrics_address_file: Some(server_metrics_file.clone()),
        ..support::server_config("metrics-run", &dir.path().join("out"), stages, 3, 2)
    };
    let strategies: Vec<Box<dyn Strategy>> = vec![
        Box::new(FedEStrategy::new(4, 1.0, 5)),
        Box::new(FedAvgStrategy::new(vec![NamedArray::new(
            "w",
            vec![2],
            vec![0.0; 2],
        )])),
    ];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));

    let gate: Gate = Arc::default();
    let release = Release(gate.clone());
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let client_metrics_file = dir.path().join("org-c.metrics-addr");
    let mut clients = Vec::new();
    for (name, id, examples) in [("a", 1, 1), ("b", 2, 1), ("c", 3, 2)] {
        let mut cfg = support::client_config(port, name);
        let mut hold = None;
        if name == "c" {
            cfg.metrics_listen = Some("127.0.0.1:0".into());
            cfg.metrics_address_file = Some(client_metrics_file.clone());
            hold = Some(("refine".to_string(), gate.clone(), entered_tx.clone()));
        }
        let work = Fake {
            id,
            examples,
            keys: vec![format!("e{id}"), "shared".into()],
            hold,
        };
        clients.push(tokio::spawn(run_client(cfg, work)));
    }

    // c is in the last task of the run: every other round is closed and counted.
    tokio::time::timeout(Duration::from_secs(120), entered.recv())
        .await
        .expect("the run reaches its last FINISH_STAGE")
        .unwrap();

    let addr = read_address(&server_metrics_file);
    let s = parse(&scrape(&addr).await);
    let closed = |stage: &str, kind: &str| {
        sum(
            &s,
            "simskip_rounds_closed_total",
            &[("stage", stage), ("kind", kind)],
        )
    };
    assert_eq!(
        sum(&s, "simskip_rounds_closed_total", &[("kind", "fit")]),
        f64::from(fit_rounds)
    );
    assert_eq!(
        sum(&s, "simskip_rounds_closed_total", &[("outcome", "failed")]),
        0.0
    );
    assert_eq!(closed("kge", "evaluate"), 2.0);
    assert_eq!(closed("refine", "evaluate"), 1.0);
    assert_eq!(closed("kge", "finish_stage"), 1.0);
    assert_eq!(closed("refine", "finish_stage"), 0.0, "still held open");
    let by_kind = |name: &str, kind: &str| value(&s, name, &[("kind", kind)]);
    assert_eq!(
        by_kind("simskip_results_accepted_total", "fit"),
        3.0 * f64::from(fit_rounds)
    );
    assert_eq!(by_kind("simskip_results_accepted_total", "evaluate"), 9.0);
    assert_eq!(
        by_kind("simskip_results_accepted_total", "finish_stage"),
        3.0
    );
    assert_eq!(sum(&s, "simskip_results_failed_total", &[]), 0.0);
    assert_eq!(value(&s, "simskip_results_ignored_total", &[]), 0.0);
    assert_eq!(value(&s, "simskip_clients_registered_total", &[]), 3.0);
    assert_eq!(value(&s, "simskip_clients_alive", &[]), 3.0);
    assert_eq!(value(&s, "simskip_stage_index", &[]), 1.0);
    assert_eq!(value(&s, "simskip_round", &[]), 2.0);
    assert!(value(&s, "simskip_bytes_in_total", &[]) > 0.0);
    assert!(value(&s, "simskip_bytes_out_total", &[]) > 0.0);
    assert_eq!(
        by_kind("simskip_round_duration_seconds_count", "fit"),
        f64::from(fit_rounds)
    );
    assert_eq!(
        value(&s, "simskip_aggregation_seconds_count", &[]),
        f64::from(fit_rounds)
    );
    // Example-weighted: (1 * 0.1 + 1 * 0.2 + 2 * 0.3) / 4 and (1 * 1 + 1 * 2 + 2 * 3) / 4.
    let metric = |stage: &str, kind: &str, name: &str| {
        value(
            &s,
            "simskip_aggregate_metric",
            &[("stage", stage), ("kind", kind), ("name", name)],
        )
    };
    let acc = metric("refine", "evaluate", "acc");
    assert!(acc.is_finite() && (acc - 0.225).abs() < 1e-9, "{acc}");
    assert_eq!(metric("kge", "fit", "loss"), 2.25);

    // The held client's own figures.
    let addr = read_address(&client_metrics_file);
    let c = parse(&scrape(&addr).await);
    let by_kind = |name: &str, kind: &str| value(&c, name, &[("kind", kind)]);
    assert_eq!(value(&c, "simskip_client_registrations_total", &[]), 1.0);
    assert_eq!(
        by_kind("simskip_client_tasks_started_total", "fit"),
        f64::from(fit_rounds)
    );
    assert_eq!(
        by_kind("simskip_client_tasks_completed_total", "fit"),
        f64::from(fit_rounds)
    );
    assert_eq!(
        by_kind("simskip_client_tasks_completed_total", "evaluate"),
        3.0
    );
    assert_eq!(
        by_kind("simskip_client_tasks_started_total", "finish_stage"),
        2.0
    );
    assert_eq!(
        by_kind("simskip_client_tasks_completed_total", "finish_stage"),
        1.0,
        "the second is in progress"
    );
    assert_eq!(sum(&c, "simskip_client_tasks_failed_total", &[]), 0.0);
    assert_eq!(value(&c, "simskip_client_stage_index", &[]), 1.0);
    assert!(value(&c, "simskip_client_bytes_received_total", &[]) > 0.0);
    assert!(value(&c, "simskip_client_bytes_sent_total", &[]) > 0.0);
    assert_eq!(
        value(
            &c,
            "simskip_client_last_metric",
            &[("stage", "refine"), ("kind", "evaluate"), ("name", "acc")]
        ),
        0.3
    );

    // Let the run end: both endpoints close with it.
    drop(release);
    for client in clients {
        client.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();
    assert!(summary.completed);
    assert_eq!(summary.records.len(), 9);
    for file in [&server_metrics_file, &client_metrics_file] {
        let addr = read_address(file);
        assert!(
            TcpStream::connect(&addr).await.is_err(),
            "{addr} still accepts after the run"
        );
    }
}

#[test]
fn client_metrics_settings_are_checked() {
    let mut cfg = ClientConfig {
        name: "org-a".into(),
        metrics_listen: Some("127.0.0.1:0".into()),
        ..ClientConfig::default()
    };
    cfg.validate().unwrap();
    cfg.metrics_listen = Some("localhost".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("client.metrics_listen = \"localhost\""), "{e}");
    cfg.metrics_listen = None;
    cfg.metrics_address_file = Some("m.addr".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("client.metrics_address_file = m.addr"), "{e}");
}
