//! Layered settings: built-in defaults, then a TOML file, then `SIMSKIP_` environment
//! variables, then command-line flags (applied by the caller on the returned value).
//!
//! Environment variables use `_` after the prefix and `__` between a section and a key, so
//! keys that contain underscores stay reachable: `SIMSKIP_TRANSE__EPOCHS=50`,
//! `SIMSKIP_SIMSKIP__NOISE_VAR=0.1`, `SIMSKIP_CLIENT__SERVER_URL=http://coordinator:50051`.

use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

/// The prefix of every environment override.
pub const ENV_PREFIX: &str = "SIMSKIP";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: settings file not found")]
    Missing { path: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Load settings of type `T` from defaults, the optional TOML `file` and the environment.
/// Unknown keys are errors (the settings types deny them), so a typo never passes silently.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, SettingsError> {
    load_with_env(file, std::env::vars())
}

/// As [`load`], with the environment given explicitly (for tests).
pub fn load_with_env<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let mut builder = Config::builder();
    let origin = match file {
        Some(path) => {
            if !path.is_file() {
                return Err(SettingsError::Missing {
                    path: path.display().to_string(),
                });
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
            format!(
                "{} (with {ENV_PREFIX}_* environment overrides)",
                path.display()
            )
        }
        None => format!("settings ({ENV_PREFIX}_* environment overrides)"),
    };
    let vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars)),
    );
    let invalid = |e: config::ConfigError| SettingsError::Invalid {
        origin: origin.clone(),
        message: e.to_string(),
    };
    builder
        .build()
        .map_err(invalid)?
        .try_deserialize()
        .map_err(invalid)
}

use serde::{Deserialize, Serialize};
use simskip_eval::ProbeConfig;
use simskip_kge::TransEConfig;
use simskip_refine::SimSkipConfig;

use crate::pipeline::search::SearchSettings;

/// Which held-out signal picks the refinement epoch (or keeps the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// Validation KNN@10 when labels exist, else validation-triple neighbour retrieval.
    Auto,
    /// KNN same-label precision@10 of the validation entities (labels of test entities hidden).
    Knn,
    /// Accuracy of the MLP probe on the validation entities.
    Probe,
    /// Label-free: MRR of retrieving the other end of each validation triple by cosine.
    Graph,
}

/// How `refine` guards its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateSettings {
    /// Keep the best epoch by the validation signal, or the input when no epoch beats it.
    /// Off: the last epoch's model is the output, whatever it scores.
    pub enabled: bool,
    pub signal: SignalKind,
    /// In the federation's final decision, also watch every other task on validation data
    /// (KNN, probe accuracy and macro-F1, link prediction, graph signal): the refined table
    /// is kept only if none of them falls by more than `tolerance`.
    pub watch_all: bool,
    /// Largest fall (absolute, in the task's own units) tolerated on a watched task.
    pub tolerance: f64,
    /// Per-organisation search of SimSkip's settings on validation data (off by default).
    pub search: SearchSettings,
}

impl Default for GateSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            signal: SignalKind::Auto,
            watch_all: true,
            tolerance: 0.005,
            search: SearchSettings::default(),
        }
    }
}

impl GateSettings {
    /// One line naming the key and value.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tolerance.is_finite() && (0.0..=1.0).contains(&self.tolerance),
            "gate.tolerance = {:?}: must be in [0, 1]",
            self.tolerance
        );
        self.search.validate()
    }
}

/// Downstream evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    pub knn_k: usize,
    /// Seed of the fixed train/valid/test split of the labelled entities (60/20/20).
    pub split_seed: u64,
    pub probe: ProbeConfig,
    /// Run the MLP probe (the slowest task).
    pub run_probe: bool,
    /// Run link prediction with relations refit on the frozen table.
    pub run_link_prediction: bool,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            knn_k: 10,
            split_seed: 7,
            probe: ProbeConfig::default(),
            run_probe: true,
            run_link_prediction: true,
        }
    }
}

/// The settings of the `simskip` command: one section per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub transe: TransEConfig,
    pub simskip: SimSkipConfig,
    pub gate: GateSettings,
    pub eval: EvalSettings,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn file_then_environment_layers() {
        let f = toml_file("[transe]\nepochs = 5\ndim = 32\n[simskip]\nnoise_var = 0.2\n");
        let env = [
            ("SIMSKIP_TRANSE__EPOCHS".to_owned(), "7".to_owned()),
            ("SIMSKIP_SIMSKIP__MASK_PROB".to_owned(), "0.3".to_owned()),
            ("OTHER_TRANSE__DIM".to_owned(), "9".to_owned()),
        ];
        let s: Settings = load_with_env(Some(f.path()), env).unwrap();
        assert_eq!(s.transe.epochs, 7, "environment beats the file");
        assert_eq!(s.transe.dim, 32, "file beats the default");
        assert!((s.simskip.noise_var - 0.2).abs() < 1e-6);
        assert!(
            (s.simskip.mask_prob - 0.3).abs() < 1e-6,
            "keys with underscores are reachable"
        );
        assert_eq!(s.eval, EvalSettings::default());
    }

    #[test]
    fn the_settings_search_is_configured_under_the_gate() {
        let f = toml_file("[gate.search]\ncandidates = 6\n");
        let env = [("SIMSKIP_GATE__SEARCH__EPOCHS".to_owned(), "4".to_owned())];
        let s: Settings = load_with_env(Some(f.path()), env).unwrap();
        assert_eq!(s.gate.search.candidates, 6);
        assert_eq!(s.gate.search.epochs, 4);
        assert!(s.gate.search.enabled() && s.gate.validate().is_ok());
        assert!(
            !GateSettings::default().search.enabled(),
            "off unless asked for"
        );
        let f = toml_file("[gate.search]\ncandidates = 1000\n");
        let s: Settings = load_with_env(Some(f.path()), []).unwrap();
        let e = s.gate.validate().unwrap_err().to_string();
        assert!(e.contains("gate.search.candidates = 1000"), "{e}");
        let f = toml_file("[gate.search]\ncandidate = 3\n");
        let e = load_with_env::<Settings>(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("candidate"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file() {
        let f = toml_file("[transe]\nepochz = 5\n");
        let err = load_with_env::<Settings>(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epochz") && err.contains(&f.path().display().to_string()),
            "{err}"
        );
        let f = toml_file("[simskip]\nlr = \"fast\"\n");
        let err = load_with_env::<Settings>(Some(f.path()), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lr"), "{err}");
        let err = load_with_env::<Settings>(Some(Path::new("/nonexistent/x.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x.toml") && err.contains("not found"),
            "{err}"
        );
    }

    #[test]
    fn shipped_config_files_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let sim: crate::simulate::SimulateFile =
            load_with_env(Some(&root.join("examples/simulate.toml")), []).unwrap();
        assert_eq!(sim.simulate.clients, 3);
        assert_eq!(sim.server.server.stages.len(), 2);
        // As the built-in default: FedE exchanges rows of shared entities only.
        assert_eq!(sim.server.server.stages[0].aggregation.min_holders, 2);
        let server: crate::node::ServerFile =
            load_with_env(Some(&root.join("deploy/config/server.toml")), []).unwrap();
        assert_eq!(server.server.out_dir, Path::new("/out"));
        assert_eq!(
            server.server.metrics_listen.as_deref(),
            Some("0.0.0.0:9090")
        );
        server.server.validate().unwrap();
        let env = [(
            "SIMSKIP_SERVER__METRICS_LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        )];
        let server: crate::node::ServerFile =
            load_with_env(Some(&root.join("deploy/config/server.toml")), env).unwrap();
        assert_eq!(server.server.metrics_listen.as_deref(), Some("127.0.0.1:0"));
        let env = [("SIMSKIP_CLIENT__NAME".to_owned(), "org-a".to_owned())];
        let client: crate::node::ClientFile =
            load_with_env(Some(&root.join("deploy/config/client.toml")), env).unwrap();
        assert_eq!(client.client.name, "org-a");
        assert_eq!(client.data.dir, Path::new("/data"));
    }

    /// The compose deployment runs the safe settings by default: mutual TLS, blinded keys,
    /// FedE rows only for entities two organisations hold, and both stages summed under secure
    /// aggregation (FedE per entity). Differential privacy stays optional (a commented block).
    #[test]
    fn compose_deployment_defaults_to_the_safe_settings() {
        use simskip_fed::{ClientAuth, ServerAuth, StageKind};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let server: crate::node::ServerFile =
            load_with_env(Some(&root.join("deploy/config/server.toml")), []).unwrap();
        let server = server.server;
        server.validate().unwrap();
        assert!(matches!(server.auth, ServerAuth::Mtls { .. }));
        let [fede, simskip] = &server.stages[..] else {
            panic!("two stages: {:?}", server.stages);
        };
        assert_eq!(fede.kind(), StageKind::FedE);
        assert_eq!(fede.aggregation.min_holders, 2);
        assert_eq!(simskip.kind(), StageKind::FedAvg);
        for stage in [fede, simskip] {
            let secure = stage
                .secure_aggregation
                .expect("every stage is summed securely");
            assert_eq!(secure, simskip_fed::secagg::SecureAggregation::default());
        }
        assert!(fede.privacy.is_none() && simskip.privacy.is_none());
        let env = [("SIMSKIP_CLIENT__NAME".to_owned(), "org-a".to_owned())];
        let client: crate::node::ClientFile =
            load_with_env(Some(&root.join("deploy/config/client.toml")), env).unwrap();
        client.client.validate().unwrap();
        assert!(matches!(client.client.auth, ClientAuth::Mtls { .. }));
        assert!(client.client.blind_keys.is_some());
    }
}
