//! The typed parameters of a stage: what every organisation trains in it and how. The
//! coordinator owns them (its configuration), sends them with every task, and each client
//! trains exactly that, so one run trains alike everywhere.
//!
//! The defaults are the learning crates' own: [`TransEConfig::fede_defaults`] for FedE and
//! [`SimSkipConfig::default`] for SimSkip; nothing here repeats them. In a configuration file
//! a stage's table lists only what differs from them (see [`StageParams::from_overrides`]).

use serde::de::DeserializeOwned;
use serde::Serialize;
use simskip_kge::TransEConfig;
use simskip_refine::SimSkipConfig;

use crate::types::StageKind;

/// Bumped whenever the meaning of a parameter changes, so a client refuses parameters it
/// would misread instead of training something else.
pub const PARAMS_SCHEMA_VERSION: u32 = 1;

/// A stage's parameters: one type per stage kind.
#[derive(Debug, Clone, PartialEq)]
pub enum StageParams {
    /// FedE: local TransE; `epochs` is the number of local epochs per round.
    FedE(TransEConfig),
    /// Federated SimSkip.
    SimSkip(SimSkipParams),
}

/// Federated SimSkip: the model's input width and its configuration; `config.epochs` is the
/// number of local epochs per round. `config.backend` and `config.fast_threads` say how an
/// organisation computes, not what: they never travel, and each client uses its own.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSkipParams {
    pub dim: usize,
    pub config: SimSkipConfig,
}

impl SimSkipParams {
    /// Local epochs per round of a federated SimSkip stage by default. The central default
    /// ([`SimSkipConfig::default`], 50 epochs) is a whole training; a round is a short visit.
    pub const DEFAULT_LOCAL_EPOCHS: usize = 2;
}

/// A parameter that cannot be used, naming it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    #[error("{field} = {value}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    #[error("parameters of schema version {got}; this build understands version {supported}: upgrade it")]
    Version { got: u32, supported: u32 },
    #[error("the stage parameters are missing")]
    Missing,
    #[error("stage table: {0}")]
    Table(String),
}

impl ParamsError {
    pub(crate) fn invalid(field: &str, value: impl ToString, reason: impl Into<String>) -> Self {
        ParamsError::Invalid {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl StageParams {
    pub fn kind(&self) -> StageKind {
        match self {
            StageParams::FedE(_) => StageKind::FedE,
            StageParams::SimSkip(_) => StageKind::FedAvg,
        }
    }

    /// The default parameters of a stage kind, with `dim` as the table / model width.
    pub fn defaults(kind: StageKind, dim: usize) -> Self {
        match kind {
            StageKind::FedE => StageParams::FedE(TransEConfig {
                dim,
                ..TransEConfig::fede_defaults()
            }),
            StageKind::FedAvg => StageParams::SimSkip(SimSkipParams {
                dim,
                config: SimSkipConfig {
                    epochs: SimSkipParams::DEFAULT_LOCAL_EPOCHS,
                    ..SimSkipConfig::default()
                },
            }),
        }
    }

    /// The defaults of `kind` with the keys of `overrides` (a stage's table of a settings
    /// file: TOML or JSON object) laid over them. Unknown keys and ill-typed values are
    /// errors naming the key; the result is validated.
    pub fn from_overrides(
        kind: StageKind,
        dim: usize,
        overrides: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ParamsError> {
        let params = match Self::defaults(kind, dim) {
            StageParams::FedE(base) => StageParams::FedE(overlay(&base, overrides)?),
            StageParams::SimSkip(base) => {
                for local in ["backend", "fast_threads"] {
                    if overrides.contains_key(local) {
                        return Err(ParamsError::Table(format!(
                            "`{local}` is each organisation's own choice (its [simskip] section), not the stage's"
                        )));
                    }
                }
                StageParams::SimSkip(SimSkipParams {
                    dim: base.dim,
                    config: overlay(&base.config, overrides)?,
                })
            }
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ParamsError> {
        match self {
            StageParams::FedE(c) => c
                .validate()
                .map_err(|e| ParamsError::Table(format!("FedE parameters: {e}"))),
            StageParams::SimSkip(p) => {
                if p.dim == 0 {
                    return Err(ParamsError::invalid("dim", 0, "must be at least 1"));
                }
                if p.config.epochs == 0 {
                    return Err(ParamsError::invalid(
                        "epochs",
                        0,
                        "local epochs per round must be at least 1",
                    ));
                }
                p.config
                    .validate()
                    .map_err(|e| ParamsError::Table(format!("SimSkip parameters: {e}")))
            }
        }
    }

    /// The table / model width.
    pub fn dim(&self) -> usize {
        match self {
            StageParams::FedE(c) => c.dim,
            StageParams::SimSkip(p) => p.dim,
        }
    }

    /// Only the keys that differ from the defaults of this kind and width: what a settings
    /// file needs to say to reproduce these parameters.
    pub fn overrides(&self) -> serde_json::Map<String, serde_json::Value> {
        let (now, base) = match (self, Self::defaults(self.kind(), self.dim())) {
            (StageParams::FedE(c), StageParams::FedE(b)) => (to_map(c), to_map(&b)),
            (StageParams::SimSkip(p), StageParams::SimSkip(b)) => {
                (to_map(&p.config), to_map(&b.config))
            }
            _ => unreachable!("defaults() keeps the kind"),
        };
        now.into_iter()
            .filter(|(k, v)| base.get(k) != Some(v) && k != "dim")
            .collect()
    }
}

fn to_map<T: Serialize>(value: &T) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// `base` with `overrides` replacing whole top-level keys, read back through the type's own
/// deserializer (which denies unknown keys). `dim` is refused: it is the stage's.
fn overlay<T: Serialize + DeserializeOwned>(
    base: &T,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, ParamsError> {
    if overrides.contains_key("dim") {
        return Err(ParamsError::Table(
            "`dim` is set once for the whole run (the stage's `dim`), not in its table".into(),
        ));
    }
    let mut merged = to_map(base);
    for (k, v) in overrides {
        merged.insert(k.clone(), v.clone());
    }
    serde_json::from_value(serde_json::Value::Object(merged))
        .map_err(|e| ParamsError::Table(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn overrides_lay_over_the_learning_crates_defaults() {
        let p =
            StageParams::from_overrides(StageKind::FedE, 64, &map(json!({"lr": 0.01}))).unwrap();
        let StageParams::FedE(c) = &p else {
            panic!("kind changed")
        };
        assert_eq!(c.lr, 0.01);
        assert_eq!(c.dim, 64);
        assert_eq!(c.negatives, TransEConfig::fede_defaults().negatives);
        // Round trip through the minimal overrides.
        let again = StageParams::from_overrides(StageKind::FedE, 64, &p.overrides()).unwrap();
        assert_eq!(again, p);
        assert_eq!(p.overrides().len(), 1);
    }

    #[test]
    fn unknown_keys_bad_values_and_local_settings_are_refused_by_name() {
        let e = StageParams::from_overrides(StageKind::FedAvg, 8, &map(json!({"tempreature": 1})))
            .unwrap_err();
        assert!(e.to_string().contains("tempreature"), "{e}");
        let e = StageParams::from_overrides(StageKind::FedE, 8, &map(json!({"batch_size": 0})))
            .unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
        let e = StageParams::from_overrides(StageKind::FedAvg, 8, &map(json!({"backend": "fast"})))
            .unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
        let e =
            StageParams::from_overrides(StageKind::FedAvg, 8, &map(json!({"dim": 4}))).unwrap_err();
        assert!(e.to_string().contains("dim"), "{e}");
        let e =
            StageParams::from_overrides(StageKind::FedAvg, 0, &serde_json::Map::new()).unwrap_err();
        assert!(e.to_string().contains("dim"), "{e}");
    }
}
