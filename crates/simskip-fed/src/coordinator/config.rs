//! The coordinator's configuration: parsed into types at the edge, validated once, each
//! error naming the key and the value.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use simskip_kge::TransEConfig;

use crate::auth::ServerAuth;
use crate::chunk::{DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES};
use crate::coordinator::rounds::{RoundsConfig, StageSpec};
use crate::error::FedError;
use crate::params::StageParams;
use crate::privacy::DpConfig;
use crate::robust::{Combine, Robustness};
use crate::secagg::SecureAggregation;
use crate::types::StageKind;

/// The longest duration any setting may ask for: a week. Longer values are typos (and
/// `1e300` seconds would not even fit a `Duration`).
pub const MAX_DURATION_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// One stage of the run, as configured: typed parameters, parsed from the stage's table.
///
/// In a settings file a stage names its kind and lists, in a `transe` (FedE) or `simskip`
/// (FedAvg of SimSkip) table, only what differs from the learning crates' defaults:
/// ```toml
/// [[server.stages]]
/// name = "fede"
/// kind = "fede"
/// rounds = 20
/// eval_every = 5
/// [server.stages.transe]
/// lr = 0.01
/// [server.stages.privacy]   # optional: DP of the uploads (see `crate::privacy`)
/// noise_multiplier = 1.0
/// clip_norm = 0.5
/// delta = 1e-5
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StageTable", into = "StageTable")]
pub struct StageConfig {
    pub name: String,
    /// FIT rounds.
    pub rounds: u32,
    /// EVALUATE after every k-th round (0: only after the last round).
    pub eval_every: u32,
    pub params: StageParams,
    /// How the coordinator combines the clients' updates; never sent to clients.
    pub aggregation: Robustness,
    /// Differential privacy of the uploads, applied by each organisation (`None`: none).
    pub privacy: Option<DpConfig>,
    /// `[server.stages.secure_aggregation]`: FIT rounds sum the updates under masks, so the
    /// coordinator sees only the example-weighted sum (FedAvg stages).
    pub secure_aggregation: Option<SecureAggregation>,
}

impl StageConfig {
    pub fn kind(&self) -> StageKind {
        self.params.kind()
    }
}

/// The settings-file form of a [`StageConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageTable {
    name: String,
    kind: StageKind,
    rounds: u32,
    #[serde(default)]
    eval_every: u32,
    /// Width of the entity table (FedE) or of the SimSkip model's input (FedAvg).
    #[serde(default = "default_dim")]
    dim: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transe: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    simskip: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    aggregation: Robustness,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    privacy: Option<DpConfig>,
    secure_aggregation: Option<SecureAggregation>,
}

/// The run's table width by default: FedE's.
fn default_dim() -> usize {
    TransEConfig::fede_defaults().dim
}

impl TryFrom<StageTable> for StageConfig {
    type Error = String;

    fn try_from(t: StageTable) -> Result<Self, String> {
        let (table, other) = match t.kind {
            StageKind::FedE => (t.transe, t.simskip.map(|_| "simskip")),
            StageKind::FedAvg => (t.simskip, t.transe.map(|_| "transe")),
        };
        if let Some(other) = other {
            return Err(format!(
                "stage {:?} is {} and cannot take a `{other}` table",
                t.name,
                t.kind.as_str()
            ));
        }
        let params = StageParams::from_overrides(t.kind, t.dim, &table.unwrap_or_default())
            .map_err(|e| format!("stage {:?}: {e}", t.name))?;
        t.aggregation
            .validate()
            .map_err(|e| format!("stage {:?}: {e}", t.name))?;
        if t.kind != StageKind::FedE && t.aggregation.min_holders != 1 {
            return Err(format!(
                "stage {:?}: aggregation.min_holders = {}: only FedE stages exchange rows by entity",
                t.name, t.aggregation.min_holders
            ));
        }
        if let Some(p) = &t.privacy {
            p.validate()
                .map_err(|e| format!("stage {:?}: {e}", t.name))?;
        }
        if let Some(secure) = &t.secure_aggregation {
            secure
                .validate()
                .map_err(|e| format!("stage {:?}: {e}", t.name))?;
            check_secure_combination(&t.name, t.kind, &t.aggregation)?;
        }
        Ok(StageConfig {
            name: t.name,
            rounds: t.rounds,
            eval_every: t.eval_every,
            params,
            aggregation: t.aggregation,
            privacy: t.privacy,
            secure_aggregation: t.secure_aggregation,
        })
    }
}

impl From<StageConfig> for StageTable {
    fn from(s: StageConfig) -> Self {
        let kind = s.kind();
        let overrides = s.params.overrides();
        let table = (!overrides.is_empty()).then_some(overrides);
        StageTable {
            name: s.name,
            kind,
            rounds: s.rounds,
            eval_every: s.eval_every,
            dim: s.params.dim(),
            transe: table.clone().filter(|_| kind == StageKind::FedE),
            simskip: table.filter(|_| kind == StageKind::FedAvg),
            aggregation: s.aggregation,
            privacy: s.privacy,
            secure_aggregation: s.secure_aggregation,
        }
    }
}

/// Secure aggregation hides every update from the coordinator, so nothing that needs to see
/// them can run with it.
fn check_secure_combination(
    stage: &str,
    kind: StageKind,
    aggregation: &Robustness,
) -> Result<(), String> {
    // FedE sums rows per entity over the round's shared rows: with min_holders = 1 a row
    // only one organisation holds would be in the sum, and its "sum" is that row.
    if kind == StageKind::FedE && aggregation.min_holders < 2 {
        return Err(format!(
            "stage {stage:?}: secure_aggregation on a fede stage needs aggregation.min_holders >= 2 (it is {}): an entity one organisation holds would be summed alone",
            aggregation.min_holders
        ));
    }
    if aggregation.combine != Combine::Mean {
        return Err(format!(
            "stage {stage:?}: aggregation.combine = {:?} needs the updates, which secure_aggregation hides: use \"mean\"",
            aggregation.combine
        ));
    }
    if let Some(c) = aggregation.clip_norm {
        return Err(format!(
            "stage {stage:?}: aggregation.clip_norm = {c} needs the updates, which secure_aggregation hides"
        ));
    }
    Ok(())
}

/// Coordinator settings. Every field has a default, so a config file only needs what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, e.g. "0.0.0.0:50051"; port 0 picks a free port.
    pub listen: String,
    /// Where to write the address actually bound (for port 0), once listening.
    pub address_file: Option<PathBuf>,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. "0.0.0.0:9090"; port 0 picks
    /// a free port. `None`: no metrics endpoint.
    pub metrics_listen: Option<String>,
    /// Where to write the metrics endpoint's bound address, once listening (before
    /// `address_file` is written).
    pub metrics_address_file: Option<PathBuf>,
    /// Run id. Empty (the default): resume the out_dir's unfinished run if its stages are
    /// these, else start a new run with a random id. Set: resume that run if the out_dir's
    /// database holds it unfinished, else start it (see `coordinator::store::Store::start`).
    pub run_id: String,
    /// Who may call and how they prove it (`[server.auth]`): mutual TLS by default.
    pub auth: ServerAuth,
    /// Alive clients needed before any round starts.
    pub min_clients: usize,
    /// Fraction of alive clients selected per FIT round.
    pub fraction_fit: f64,
    /// At least this many clients are selected, and must answer, for a round to count.
    pub min_fit_clients: usize,
    pub round_timeout_secs: f64,
    /// Longest the run waits for enough alive clients before a round; then it is aborted
    /// and the coordinator exits non-zero.
    pub quorum_timeout_secs: f64,
    /// Interval the clients are told to heartbeat at.
    pub heartbeat_interval_secs: f64,
    /// A client silent this long is dead (must register again).
    pub heartbeat_timeout_secs: f64,
    /// Longest a PollTask call is held before answering WAIT.
    pub poll_timeout_secs: f64,
    /// Tensor chunk payload size.
    pub chunk_bytes: usize,
    /// gRPC max decoding/encoding message size, both directions.
    pub max_message_bytes: usize,
    /// Most FedE entity keys one organisation may register (each costs the coordinator memory).
    pub max_entity_keys: u64,
    pub out_dir: PathBuf,
    pub stages: Vec<StageConfig>,
    /// Seeds client selection and the initial global models.
    pub seed: u64,
    /// Period of the background ticker.
    pub tick_ms: u64,
    /// After the run is DONE, how long to wait for alive clients to be told so.
    pub done_grace_secs: f64,
    /// On SIGTERM/SIGINT, how long to wait for the alive clients to be told to stop (at their
    /// next poll or heartbeat) before the coordinator exits; keep it above
    /// `heartbeat_interval_secs` so that clients busy training hear it too.
    pub stop_grace_secs: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            address_file: None,
            metrics_listen: None,
            metrics_address_file: None,
            run_id: String::new(),
            auth: ServerAuth::default(),
            min_clients: 2,
            fraction_fit: 1.0,
            min_fit_clients: 2,
            round_timeout_secs: 600.0,
            quorum_timeout_secs: 1800.0,
            heartbeat_interval_secs: 5.0,
            heartbeat_timeout_secs: 30.0,
            poll_timeout_secs: 20.0,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_entity_keys: 2_000_000,
            out_dir: PathBuf::from("fed-out"),
            stages: Vec::new(),
            seed: 0,
            tick_ms: 100,
            done_grace_secs: 10.0,
            stop_grace_secs: 8.0,
        }
    }
}

impl ServerConfig {
    /// Checks every value; the error names the key (as `server.KEY`) and the value.
    pub fn validate(&self) -> Result<(), FedError> {
        let bad = |key: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(FedError::Config(format!("server.{key} = {value}: {why}")))
        };
        if self.run_id.contains(['/', '\\']) || self.run_id == "." || self.run_id == ".." {
            return bad(
                "run_id",
                &format!("{:?}", self.run_id),
                "cannot name a directory (checkpoints go in out_dir/checkpoints/<run_id>)",
            );
        }
        if let Some(addr) = &self.metrics_listen {
            if let Err(why) = crate::telemetry::check_listen_address(addr) {
                return bad("metrics_listen", &format!("{addr:?}"), &why);
            }
            if *addr == self.listen {
                return bad(
                    "metrics_listen",
                    &format!("{addr:?}"),
                    "must differ from server.listen",
                );
            }
        } else if let Some(path) = &self.metrics_address_file {
            return bad(
                "metrics_address_file",
                &path.display(),
                "needs server.metrics_listen",
            );
        }
        if self.min_clients == 0 {
            return bad("min_clients", &0, "must be at least 1");
        }
        if self.min_fit_clients == 0 {
            return bad("min_fit_clients", &0, "must be at least 1");
        }
        if !(self.fraction_fit > 0.0 && self.fraction_fit <= 1.0) {
            return bad(
                "fraction_fit",
                &format!("{:?}", self.fraction_fit),
                "must be in (0, 1]",
            );
        }
        if self.chunk_bytes < 4 {
            return bad("chunk_bytes", &self.chunk_bytes, "must be at least 4");
        }
        if self.chunk_bytes.saturating_add(64 << 10) > self.max_message_bytes {
            return bad(
                "chunk_bytes",
                &self.chunk_bytes,
                &format!(
                    "plus 64 KiB of framing must fit max_message_bytes ({})",
                    self.max_message_bytes
                ),
            );
        }
        if self.max_entity_keys == 0 {
            return bad("max_entity_keys", &0, "must be at least 1");
        }
        if self.tick_ms == 0 || self.tick_ms > 60_000 {
            return bad("tick_ms", &self.tick_ms, "must be in 1..=60000");
        }
        for (key, v) in [
            ("round_timeout_secs", self.round_timeout_secs),
            ("quorum_timeout_secs", self.quorum_timeout_secs),
            ("heartbeat_interval_secs", self.heartbeat_interval_secs),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
            ("poll_timeout_secs", self.poll_timeout_secs),
            ("done_grace_secs", self.done_grace_secs),
            ("stop_grace_secs", self.stop_grace_secs),
        ] {
            if !(v.is_finite() && (0.0..=MAX_DURATION_SECS).contains(&v)) {
                return bad(
                    key,
                    &format!("{v:?}"),
                    &format!("must be a number of seconds in [0, {MAX_DURATION_SECS}]"),
                );
            }
        }
        if self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            return bad(
                "heartbeat_timeout_secs",
                &self.heartbeat_timeout_secs,
                &format!(
                    "must exceed heartbeat_interval_secs ({})",
                    self.heartbeat_interval_secs
                ),
            );
        }
        self.auth.validate()?;
        if self.stages.is_empty() {
            return bad("stages", &"[]", "at least one stage is needed");
        }
        let mut names = std::collections::HashSet::new();
        let mut table_dim = None;
        for (i, s) in self.stages.iter().enumerate() {
            let key = format!("stages[{i}].name");
            if s.name.is_empty() || s.name.contains(['/', '\\']) || s.name == "." || s.name == ".."
            {
                return bad(&key, &format!("{:?}", s.name), "cannot name a directory");
            }
            if !names.insert(s.name.as_str()) {
                return bad(&key, &format!("{:?}", s.name), "stage names must be unique");
            }
            s.params
                .validate()
                .map_err(|e| FedError::Config(format!("server.stages[{i}] ({}): {e}", s.name)))?;
            s.aggregation
                .validate()
                .map_err(|e| FedError::Config(format!("server.stages[{i}] ({}): {e}", s.name)))?;
            if let Some(secure) = &s.secure_aggregation {
                let key = |k: &str| format!("server.stages[{i}] ({}): {k}", s.name);
                secure.validate().map_err(|e| FedError::Config(key(&e)))?;
                check_secure_combination(&s.name, s.kind(), &s.aggregation)
                    .map_err(FedError::Config)?;
                // A round must be able to select at least `threshold` organisations.
                let needed = secure.threshold.map_or(2, |t| t as usize);
                if self.min_fit_clients < needed {
                    return bad(
                        "min_fit_clients",
                        &self.min_fit_clients,
                        &format!(
                            "stage {:?} aggregates securely and needs at least {needed} \
                             organisations per round (its secure_aggregation.threshold, or 2)",
                            s.name
                        ),
                    );
                }
            }
            // A SimSkip stage refines the table an earlier FedE stage produced: same width.
            match (s.kind(), table_dim) {
                (StageKind::FedE, _) => table_dim = Some(s.params.dim()),
                (StageKind::FedAvg, Some(d)) if d != s.params.dim() => {
                    return bad(
                        &format!("stages[{i}].dim"),
                        &s.params.dim(),
                        &format!("the FedE stage before it produces {d}-wide tables"),
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The state machine's view of this configuration.
    pub fn rounds_config(&self) -> RoundsConfig {
        RoundsConfig {
            run_id: self.run_id.clone(),
            min_clients: self.min_clients,
            fraction_fit: self.fraction_fit,
            min_fit_clients: self.min_fit_clients,
            round_timeout: secs(self.round_timeout_secs),
            heartbeat_timeout: secs(self.heartbeat_timeout_secs),
            quorum_timeout: secs(self.quorum_timeout_secs),
            seed: self.seed,
            stages: self
                .stages
                .iter()
                .map(|s| StageSpec {
                    name: s.name.clone(),
                    rounds: s.rounds,
                    eval_every: s.eval_every,
                    params: s.params.clone(),
                    privacy: s.privacy.clone(),
                    secure: s.secure_aggregation,
                })
                .collect(),
        }
    }
}

/// A validated number of seconds as a `Duration` (validation bounds it, so this cannot panic).
pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, MAX_DURATION_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// A plain-text run of one FedE stage, with `top` (top-level keys) before its tables.
    fn parse_one_fede_stage(top: &str) -> ServerConfig {
        parse(&format!(
            r#"
            {top}
            [auth]
            mode = "insecure"
            [[stages]]
            name = "s"
            kind = "fede"
            rounds = 1
            "#
        ))
        .unwrap()
    }

    #[test]
    fn stages_parse_into_typed_params_and_round_trip() {
        let cfg = parse(
            r#"
            [auth]
            mode = "insecure"
            [[stages]]
            name = "fede"
            kind = "fede"
            rounds = 2
            dim = 16
            [stages.transe]
            lr = 0.01
            [[stages]]
            name = "simskip"
            kind = "fedavg"
            rounds = 1
            dim = 16
            [stages.simskip]
            skip = false
            [stages.aggregation]
            combine = "trimmed_mean"
            trim = 0.2
            clip_norm = 5.0
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let StageParams::FedE(t) = &cfg.stages[0].params else {
            panic!("not FedE")
        };
        assert_eq!((t.dim, t.lr), (16, 0.01));
        let StageParams::SimSkip(p) = &cfg.stages[1].params else {
            panic!("not SimSkip")
        };
        assert!(!p.config.skip);
        assert_eq!(
            cfg.stages[1].aggregation.combine,
            crate::robust::Combine::TrimmedMean
        );
        assert_eq!(cfg.stages[1].aggregation.clip_norm, Some(5.0));
        let again: ServerConfig =
            serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(
            r#"
            [[stages]]
            name = "s"
            kind = "fedavg"
            rounds = 1
            [stages.simskip]
            batch_size = 0
            "#,
        )
        .unwrap_err();
        assert!(e.contains("batch_size"), "{e}");
        let e = parse(
            r#"
            [[stages]]
            name = "s"
            kind = "fede"
            rounds = 1
            [stages.simskip]
            lr = 0.1
            "#,
        )
        .unwrap_err();
        assert!(e.contains("cannot take a `simskip` table"), "{e}");
        let mut cfg = parse_one_fede_stage("poll_timeout_secs = 1e300");
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("server.poll_timeout_secs = 1e300"), "{e}");
        cfg.poll_timeout_secs = 1.0;
        cfg.stages.push(StageConfig {
            name: "refine".into(),
            rounds: 1,
            eval_every: 0,
            params: StageParams::defaults(StageKind::FedAvg, 7),
            aggregation: Robustness::default(),
            privacy: None,
            secure_aggregation: None,
        });
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("server.stages[1].dim = 7"), "{e}");
    }

    #[test]
    fn secure_fede_needs_rows_of_shared_entities_only() {
        let stage = |min_holders: u32| {
            parse(&format!(
                r#"
                min_fit_clients = 2
                [auth]
                mode = "insecure"
                [[stages]]
                name = "fede"
                kind = "fede"
                rounds = 1
                [stages.aggregation]
                min_holders = {min_holders}
                [stages.secure_aggregation]
                frac_bits = 24
                "#
            ))
        };
        let e = stage(1).unwrap_err();
        assert!(e.contains("aggregation.min_holders >= 2 (it is 1)"), "{e}");
        let cfg = stage(2).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.stages[0].secure_aggregation.is_some());
    }

    #[test]
    fn metrics_endpoint_settings_are_checked() {
        let mut cfg = parse_one_fede_stage(
            r#"metrics_listen = "127.0.0.1:0"
            metrics_address_file = "metrics.addr""#,
        );
        cfg.validate().unwrap();
        assert_eq!(cfg.metrics_listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(ServerConfig::default().metrics_listen, None);
        cfg.metrics_listen = Some("9090".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("server.metrics_listen = \"9090\""), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        cfg.metrics_listen = Some(cfg.listen.clone());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("must differ from server.listen"), "{e}");
        cfg.metrics_listen = None;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("server.metrics_address_file = metrics.addr"),
            "{e}"
        );
    }
}
