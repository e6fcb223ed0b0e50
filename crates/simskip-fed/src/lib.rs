//! SimSkip Federation: a Flower-like coordinator/client library over gRPC.
//!
//! * [`chunk`]: named arrays cut into ≤ 1 MiB chunks and reassembled with validation.
//! * [`aggregate`]: FedAvg, FedE over a keyed [`aggregate::EntityTable`], weighted metrics.
//! * [`rounds`]: the pure round state machine; [`strategy`]: FedAvg / FedE strategies.
//! * [`server`]: the tonic coordinator ([`server::run_server`]); [`client`]: the
//!   organisation side ([`client::run_client`] driving a [`client::ClientWork`]).
//!
//! Clients only connect out to the coordinator; organisations accept no connections.

pub mod aggregate;
pub mod chunk;
pub mod client;
pub mod rounds;
pub mod server;
pub mod strategy;
pub mod tls;
mod wire;

/// Generated protobuf / gRPC code for `proto/simskip/v1/federation.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("simskip.v1");
}

pub use aggregate::{fedavg, fede_aggregate, weighted_metrics, AggregateError, EntityTable};
pub use client::{run_client, ClientConfig, ClientWork, EvalOutput, FitOutput, StageInfo};
pub use rounds::{StageKind, TaskKind};
pub use server::{run_server, serve, RunSummary, ServerConfig, StageConfig};
pub use strategy::{FedAvgStrategy, FedEStrategy, GlobalSnapshot, Strategy};
