//! The compose deployment without a Docker engine: the services of
//! `deploy/docker-compose.yml` (same commands, same environment, same config files) started as
//! processes in separate Linux network namespaces, one per organisation, linked to the
//! coordinator's namespace by veth pairs, so every byte crosses a real network stack.
//!
//! Volume mounts become host folders: a container path (`/data`, `/out`) in the config files is
//! redirected by the matching `SIMSKIP_DATA__DIR` / `SIMSKIP_DATA__OUT_DIR` /
//! `SIMSKIP_SERVER__OUT_DIR` override, and `/etc/simskip/X` is read from `deploy/config/X`. The
//! compose service name `coordinator` resolves through `/etc/netns/<ns>/hosts`, which
//! `ip netns exec` mounts over `/etc/hosts`.
//!
//! Needs root and iproute2; elsewhere it says why and skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
}

#[derive(Debug, Deserialize)]
struct Service {
    command: Vec<String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    volumes: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces, veths and hosts files made by this test, removed on drop.
struct Network {
    namespaces: Vec<String>,
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = sh(&["ip", "netns", "delete", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skip_reason() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("not Linux".into());
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("network namespaces need root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (`ip`) is not installed".into());
    }
    let probe = format!("simskip-probe-{}", std::process::id());
    if let Err(e) = sh(&["ip", "netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace here: {e}"));
    }
    let _ = sh(&["ip", "netns", "delete", &probe]);
    None
}

#[test]
fn compose_services_run_in_network_namespaces() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED deploy_netns: {why}");
        return;
    }
    let root = workspace();
    let compose: Compose = serde_norway::from_str(
        &std::fs::read_to_string(root.join("deploy/docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_simskip"))
        .parent()
        .unwrap()
        .to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let orgs: Vec<&String> = compose
        .services
        .keys()
        .filter(|s| *s != "coordinator")
        .collect();
    assert_eq!(
        orgs.len(),
        3,
        "the compose file describes three organisations"
    );

    // Each organisation's private folder, as the compose volumes expect them.
    let parts = tmp.path().join("parts");
    let status = Command::new(bin_dir.join("simskip"))
        .args([
            "partition",
            root.join("data/wordnet-5k").to_str().unwrap(),
            "--clients",
            "3",
            "--out",
        ])
        .arg(&parts)
        .status()
        .unwrap();
    assert!(status.success());
    for (k, org) in orgs.iter().enumerate() {
        let dir = tmp.path().join(org.as_str());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::rename(parts.join(format!("client-{k}")), dir.join("data")).unwrap();
    }

    // The federation's certificates, made as the compose file's header says (`simskip certs
    // --out deploy/tls ...`); each service's `./tls/<party>` volume points into this folder.
    let mut certs = Command::new(bin_dir.join("simskip"));
    certs
        .args(["certs", "--out"])
        .arg(tmp.path().join("tls"))
        .args(["--coordinator-host", "coordinator", "--days", "2"]);
    for org in &orgs {
        certs.args(["--org", org.as_str()]);
    }
    assert!(certs.status().unwrap().success());
    // The organisations' federation secret, in each organisation's folder only.
    let secret = tmp
        .path()
        .join("tls")
        .join(orgs[0].as_str())
        .join("federation.secret");
    let made = Command::new(bin_dir.join("simskip"))
        .args(["secret", "--out"])
        .arg(&secret)
        .status()
        .unwrap();
    assert!(made.success());
    for org in &orgs[1..] {
        std::fs::copy(
            &secret,
            tmp.path()
                .join("tls")
                .join(org.as_str())
                .join("federation.secret"),
        )
        .unwrap();
    }

    // One namespace per service; org K reaches the coordinator over veth 10.203.K.0/30.
    let tag = std::process::id() % 100_000;
    let ns_of = |service: &str| format!("ss{tag}-{service}");
    let mut net = Network { namespaces: vec![] };
    let coord_ns = ns_of("coordinator");
    sh(&["ip", "netns", "add", &coord_ns]).unwrap();
    net.namespaces.push(coord_ns.clone());
    sh(&["ip", "-n", &coord_ns, "link", "set", "lo", "up"]).unwrap();
    for (k, org) in orgs.iter().enumerate() {
        let ns = ns_of(org);
        sh(&["ip", "netns", "add", &ns]).unwrap();
        net.namespaces.push(ns.clone());
        let (a, b) = (format!("ss{tag}c{k}"), format!("ss{tag}o{k}"));
        sh(&[
            "ip", "link", "add", &a, "netns", &coord_ns, "type", "veth", "peer", "name", &b,
            "netns", &ns,
        ])
        .unwrap();
        let coord_ip = format!("10.203.{k}.1");
        sh(&[
            "ip",
            "-n",
            &coord_ns,
            "addr",
            "add",
            &format!("{coord_ip}/30"),
            "dev",
            &a,
        ])
        .unwrap();
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.203.{k}.2/30"),
            "dev",
            &b,
        ])
        .unwrap();
        for (n, dev) in [(&coord_ns, &a), (&ns, &b)] {
            sh(&["ip", "-n", n, "link", "set", dev, "up"]).unwrap();
        }
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]).unwrap();
        std::fs::create_dir_all(format!("/etc/netns/{ns}")).unwrap();
        std::fs::write(
            format!("/etc/netns/{ns}/hosts"),
            format!("127.0.0.1 localhost\n{coord_ip} coordinator\n"),
        )
        .unwrap();
    }

    let start = |service: &str| -> Proc {
        let svc = &compose.services[service];
        let dir = tmp.path().join(service);
        std::fs::create_dir_all(dir.join("out")).unwrap();
        let mut args: Vec<String> = svc.command.clone();
        args[0] = bin_dir.join(&args[0]).display().to_string();
        for a in args.iter_mut() {
            if let Some(rest) = a.strip_prefix("/etc/simskip/") {
                *a = root.join("deploy/config").join(rest).display().to_string();
            }
        }
        let mut env = svc.environment.clone();
        for volume in &svc.volumes {
            let source = volume.split(':').next().unwrap();
            let container = volume.split(':').nth(1).unwrap();
            let mut host = dir.join(container.trim_start_matches('/'));
            let key = match (service, container) {
                // The entrypoint's copy of the certificate folder is where the config points.
                ("coordinator", "/tls-in") => {
                    host = tmp.path().join(source.trim_start_matches("./"));
                    "SIMSKIP_SERVER__AUTH__TLS_DIR"
                }
                (_, "/tls-in") => {
                    host = tmp.path().join(source.trim_start_matches("./"));
                    // The entrypoint copies the secret beside the certificate.
                    env.insert(
                        "SIMSKIP_CLIENT__BLIND_KEYS__SECRET_FILE".into(),
                        host.join("federation.secret").display().to_string(),
                    );
                    "SIMSKIP_CLIENT__AUTH__TLS_DIR"
                }
                ("coordinator", "/out") => "SIMSKIP_SERVER__OUT_DIR",
                (_, "/data") => "SIMSKIP_DATA__DIR",
                (_, "/out") => "SIMSKIP_DATA__OUT_DIR",
                other => panic!("unexpected volume {other:?}"),
            };
            env.insert(key.into(), host.display().to_string());
        }
        let log = std::fs::File::create(tmp.path().join(format!("{service}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns_of(service)])
            .args(&args)
            .envs(&env)
            .env("CANDLE_NUM_THREADS", "1")
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    };

    let mut server = start("coordinator");
    let mut clients: Vec<(String, Proc)> = orgs.iter().map(|o| (o.to_string(), start(o))).collect();
    let deadline = Instant::now() + Duration::from_secs(900);
    let dump = |what: &str| {
        let mut s = String::new();
        for svc in compose.services.keys() {
            let log =
                std::fs::read_to_string(tmp.path().join(format!("{svc}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            s += &format!(
                "--- {svc} ---\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        panic!("{what}\n{s}");
    };
    for (name, proc) in &mut clients {
        loop {
            if let Some(status) = proc.0.try_wait().unwrap() {
                if !status.success() {
                    dump(&format!("{name} exited with {status}"));
                }
                break;
            }
            if Instant::now() > deadline {
                dump("the deployment did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    while server.0.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            dump("the coordinator did not stop");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // The coordinator wrote its history and each organisation its own refined table.
    let metrics =
        std::fs::read_to_string(tmp.path().join("coordinator/out/metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().count() > 5,
        "metrics history too short:\n{metrics}"
    );
    for org in &orgs {
        let out = tmp.path().join(org.as_str()).join("out");
        assert!(
            out.join("simskip/entities.npy").is_file(),
            "{org} wrote no refined table"
        );
        assert!(
            out.join("fede/entities.npy").is_file(),
            "{org} wrote no stage-1 table"
        );
    }
    // The deployment blinds entity keys: the coordinator's FedE row keys are all HMACs.
    let keys =
        std::fs::read_to_string(tmp.path().join("coordinator/out/fede/entities.txt")).unwrap();
    assert!(
        keys.lines()
            .all(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit())),
        "the coordinator saw entity names:\n{keys:.300}"
    );
    let log = std::fs::read_to_string(tmp.path().join("coordinator.log")).unwrap();
    assert!(!log.contains("panicked"), "coordinator log:\n{log}");
    drop(net);
}
