//! The federation's common vocabulary: what the coordinator's state machine, the strategies,
//! the wire conversions and the client all speak. It depends on nothing else in the crate
//! but the pure aggregation types, so no module imports another in a circle.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use simskip_data::NamedArray;

use crate::aggregate::EntityTable;
use crate::params::StageParams;
use crate::privacy::ClientDp;

/// The name of the array in which FedE entity rows travel, in both directions.
pub const ENTITIES: &str = "entities";

/// How a stage aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StageKind {
    /// Keyed entity table, each entity averaged over the clients that hold it.
    #[serde(rename = "fede")]
    FedE,
    /// Example-weighted average of all arrays.
    #[serde(rename = "fedavg")]
    FedAvg,
}

impl StageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::FedE => "fede",
            StageKind::FedAvg => "fedavg",
        }
    }
}

/// What a task asks of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Fit,
    Evaluate,
    FinishStage,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Fit => "fit",
            TaskKind::Evaluate => "evaluate",
            TaskKind::FinishStage => "finish_stage",
        }
    }
}

/// The stage a task belongs to, as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageInfo {
    pub index: usize,
    pub name: String,
    /// FIT rounds in the stage.
    pub rounds: u32,
    /// What the stage trains and how; its kind is the stage's kind.
    pub params: StageParams,
    /// Clipping and noise the organisation applies to its upload (`None`: no DP).
    pub privacy: Option<ClientDp>,
}

impl StageInfo {
    pub fn kind(&self) -> StageKind {
        self.params.kind()
    }
}

/// A registered client as the strategies see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInfo {
    pub name: String,
    pub session: String,
    pub num_examples: u64,
    /// FedE entity keys the client holds, in the order its rows travel.
    pub entity_keys: Arc<Vec<String>>,
}

/// A successful result, handed by value to [`crate::Strategy::aggregate_fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClientResult {
    pub client: ClientInfo,
    pub num_examples: u64,
    pub arrays: Vec<NamedArray>,
    pub metrics: BTreeMap<String, f64>,
}

/// The arrays a task carries. Built without copying the global state: the FedAvg model is
/// shared by every client's task, and a FedE client's rows are gathered from the shared
/// table chunk by chunk while the task streams (see [`crate::chunk::PayloadChunks`]).
#[derive(Debug, Clone)]
pub enum Payload {
    /// Whole arrays, shared.
    Arrays(Arc<[NamedArray]>),
    /// The rows of `keys` in `table`, as one `[keys.len(), dim]` array named [`ENTITIES`].
    Rows {
        table: Arc<EntityTable>,
        keys: Arc<Vec<String>>,
        /// When only some of the client's rows travel (entities held by too few
        /// organisations stay home): their positions in the client's registered key order,
        /// ascending, one per key of `keys`. `None`: all of them, in that order.
        positions: Option<Arc<[u32]>>,
    },
}

impl Payload {
    /// No arrays.
    pub fn empty() -> Self {
        Payload::Arrays(Arc::from(Vec::new()))
    }

    /// Materialises the arrays (tests and in-process use; the wire streams instead).
    pub fn to_arrays(&self) -> Result<Vec<NamedArray>, crate::AggregateError> {
        match self {
            Payload::Arrays(a) => Ok(a.to_vec()),
            Payload::Rows { table, keys, .. } => Ok(vec![table.rows_for(keys)?]),
        }
    }
}

/// The global state of a stage, for saving: the arrays and, for a keyed table, the key of
/// each row of the "entities" array.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalSnapshot {
    pub arrays: Vec<NamedArray>,
    pub keys: Option<Vec<String>>,
}
