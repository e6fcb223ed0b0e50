//! The typed parameters of a stage: what every organisation trains in it and how. The
//! coordinator owns them (its configuration), sends them with every task, and each client
//! trains exactly that, so one run trains alike everywhere.
//!
//! The defaults are the learning crates' own: [`TransEConfig::fede_defaults`] for FedE and
//! [`SimSkipConfig::default`] for SimSkip; nothing here repeats them. In a configuration file
//! a stage's table lists only what differs from them (see [`StageParams::from_overrides`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use simskip_kge::TransEConfig;
use simskip_refine::SimSkipConfig;

use crate::types::StageKind;

/// Bumped whenever the meaning of a parameter changes, so a client refuses parameters it
/// would misread instead of training something else.
/// Version 2 added [`Personalization`]: an older client would train plain FedAvg without it.
/// Version 3 added SimSkip's `neighbour_share`: an older client would ignore it, and an older
/// coordinator's parameters would read as a share of 0.
pub const PARAMS_SCHEMA_VERSION: u32 = 3;

/// A stage's parameters: one type per stage kind.
#[derive(Debug, Clone, PartialEq)]
pub enum StageParams {
    /// FedE: local TransE; `epochs` is the number of local epochs per round.
    FedE(TransEConfig),
    /// Federated SimSkip.
    SimSkip(SimSkipParams),
}

/// Federated SimSkip: the model's input width, its configuration and how the shared model is
/// personalised; `config.epochs` is the number of local epochs per round. `config.backend` and
/// `config.fast_threads` say how an organisation computes, not what: they never travel, and
/// each client uses its own.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSkipParams {
    pub dim: usize,
    pub config: SimSkipConfig,
    pub personalization: Personalization,
}

/// How a federated SimSkip stage adapts the shared model to organisations whose tables are not
/// alike. In a stage's settings table: `personalization = { kind = "fed_bn" }`,
/// `{ kind = "fine_tune", epochs = 5 }` or `{ kind = "fed_prox", mu = 0.01 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "PersonalizationTable"
)]
pub enum Personalization {
    /// Plain FedAvg: every array is averaged; each organisation refines with the global model.
    FedAvg,
    /// FedBN (Li et al. 2021): BatchNorm's scale, shift and running statistics are never
    /// averaged; each organisation keeps its own and installs only the other arrays.
    FedBn,
    /// FedAvg, then `epochs` local epochs of the final global model on the organisation's own
    /// table before its gate decides what it keeps.
    FineTune { epochs: usize },
    /// FedProx (Li et al. 2020): the local objective adds `mu/2 ||w - w_global||²`, holding
    /// each round's local copy near the global model it started from.
    FedProx { mu: f32 },
}

/// What a settings table may hold for a [`Personalization`]: the same variants, each a
/// struct, because serde ignores any key beside the tag of a unit variant even when unknown
/// fields are denied; as empty structs, `{ kind = "fed_bn", mu = 1.0 }` is refused, naming
/// `mu`.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum PersonalizationTable {
    FedAvg {},
    FedBn {},
    FineTune { epochs: usize },
    FedProx { mu: f32 },
}

impl From<PersonalizationTable> for Personalization {
    fn from(table: PersonalizationTable) -> Self {
        match table {
            PersonalizationTable::FedAvg {} => Personalization::FedAvg,
            PersonalizationTable::FedBn {} => Personalization::FedBn,
            PersonalizationTable::FineTune { epochs } => Personalization::FineTune { epochs },
            PersonalizationTable::FedProx { mu } => Personalization::FedProx { mu },
        }
    }
}

impl Default for Personalization {
    /// Chosen by measurement: see the quality section of the README.
    fn default() -> Self {
        Personalization::FedAvg
    }
}

impl Personalization {
    /// Largest accepted FedProx `mu` and fine-tuning epochs: beyond them the setting is a
    /// mistake (the local copy could not move, or fine-tuning would be a whole training).
    pub const MAX_MU: f32 = 100.0;
    pub const MAX_FINE_TUNE_EPOCHS: usize = 500;

    /// FedProx's `mu`, if this is FedProx.
    pub fn proximal_mu(&self) -> Option<f32> {
        match *self {
            Personalization::FedProx { mu } => Some(mu),
            _ => None,
        }
    }

    /// Local epochs after the last round (0 unless fine-tuning).
    pub fn fine_tune_epochs(&self) -> usize {
        match *self {
            Personalization::FineTune { epochs } => epochs,
            _ => 0,
        }
    }

    /// BatchNorm stays with each organisation.
    pub fn keeps_batch_norm_local(&self) -> bool {
        matches!(self, Personalization::FedBn)
    }

    pub fn validate(&self) -> Result<(), ParamsError> {
        match *self {
            Personalization::FineTune { epochs }
                if !(1..=Self::MAX_FINE_TUNE_EPOCHS).contains(&epochs) =>
            {
                Err(ParamsError::invalid(
                    "personalization.epochs",
                    epochs,
                    format!(
                        "fine-tuning epochs must be in 1..={}",
                        Self::MAX_FINE_TUNE_EPOCHS
                    ),
                ))
            }
            Personalization::FedProx { mu } if !(mu > 0.0 && mu <= Self::MAX_MU) => {
                Err(ParamsError::invalid(
                    "personalization.mu",
                    mu,
                    format!("FedProx's mu must be in (0, {}]", Self::MAX_MU),
                ))
            }
            _ => Ok(()),
        }
    }
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
                personalization: Personalization::default(),
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
                let mut config_keys = overrides.clone();
                let personalization = match config_keys.remove(PERSONALIZATION) {
                    None => base.personalization,
                    Some(v) => serde_json::from_value(v)
                        .map_err(|e| ParamsError::Table(format!("{PERSONALIZATION}: {e}")))?,
                };
                StageParams::SimSkip(SimSkipParams {
                    dim: base.dim,
                    config: overlay(&base.config, &config_keys)?,
                    personalization,
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
                    .map_err(|e| ParamsError::Table(format!("SimSkip parameters: {e}")))?;
                p.personalization.validate()
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
                let with = |config: &SimSkipConfig, personalization: &Personalization| {
                    let mut m = to_map(config);
                    if let Ok(v) = serde_json::to_value(personalization) {
                        m.insert(PERSONALIZATION.into(), v);
                    }
                    m
                };
                (
                    with(&p.config, &p.personalization),
                    with(&b.config, &b.personalization),
                )
            }
            _ => unreachable!("defaults() keeps the kind"),
        };
        now.into_iter()
            .filter(|(k, v)| base.get(k) != Some(v) && k != "dim")
            .collect()
    }
}

/// The key of a SimSkip stage's table that holds its [`Personalization`].
const PERSONALIZATION: &str = "personalization";

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

    #[test]
    fn personalization_is_typed_validated_and_round_trips() {
        let p = StageParams::from_overrides(
            StageKind::FedAvg,
            8,
            &map(json!({"personalization": {"kind": "fed_prox", "mu": 0.05}, "lr": 0.002})),
        )
        .unwrap();
        let StageParams::SimSkip(s) = &p else {
            panic!("kind changed")
        };
        assert_eq!(s.personalization, Personalization::FedProx { mu: 0.05 });
        assert_eq!(s.config.lr, 0.002);
        let again = StageParams::from_overrides(StageKind::FedAvg, 8, &p.overrides()).unwrap();
        assert_eq!(again, p);
        // The default is not repeated in the minimal overrides.
        let d = StageParams::defaults(StageKind::FedAvg, 8);
        assert!(d.overrides().is_empty(), "{:?}", d.overrides());
        for (bad, key) in [
            (json!({"kind": "fed_prox", "mu": 0.0}), "personalization.mu"),
            (json!({"kind": "fed_prox", "mu": 1e9}), "personalization.mu"),
            (
                json!({"kind": "fine_tune", "epochs": 0}),
                "personalization.epochs",
            ),
            (json!({"kind": "fedbn"}), "fedbn"),
            (json!({"kind": "fed_bn", "mu": 1.0}), "mu"),
            (json!({"kind": "fed_avg", "epochs": 3}), "epochs"),
            (json!({"kind": "fine_tune"}), "epochs"),
        ] {
            let e = StageParams::from_overrides(
                StageKind::FedAvg,
                8,
                &map(json!({ "personalization": bad })),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let fedbn = StageParams::from_overrides(
            StageKind::FedAvg,
            8,
            &map(json!({"personalization": {"kind": "fed_bn"}})),
        )
        .unwrap();
        let StageParams::SimSkip(s) = &fedbn else {
            panic!("kind changed")
        };
        assert!(s.personalization.keeps_batch_norm_local());
    }
}
