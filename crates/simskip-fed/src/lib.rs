//! SimSkip Federation: a Flower-like coordinator/client library over gRPC.
//!
//! Laid out by job:
//! * [`types`]: the common vocabulary (stage and task kinds, clients, results, payloads);
//! * [`params`]: the typed parameters of each stage kind, sent with every task;
//! * [`aggregate`]: pure FedAvg, FedE over a keyed [`aggregate::EntityTable`], metrics;
//! * [`robust`]: robust combination rules (median, trimmed mean, update-norm clipping);
//! * [`strategy`]: what each client receives and how results combine (FedAvg, FedE);
//! * [`coordinator`]: configuration, the pure round state machine, the gRPC service, the
//!   run's outputs, and the run loop ([`coordinator::run_server`]);
//! * [`client`]: the organisation side ([`client::run_client`] driving a [`ClientWork`]);
//! * [`chunk`]: named arrays cut into chunks, streamed lazily, reassembled with validation;
//! * `wire`: every protobuf <-> domain conversion, both directions;
//! * [`auth`]: who is calling: mTLS, per-organisation tokens or explicit plain text;
//! * [`privacy`]: differential privacy of uploads (clipping, Gaussian noise), applied by
//!   each organisation; [`accountant`]: the Rényi-DP accountant that reports epsilon;
//! * [`blind`]: entity keys blinded with the organisations' federation secret;
//! * [`secagg`]: secure aggregation (Bonawitz et al. 2017): masks, Shamir shares, fixed point;
//! * [`tls`]: federation CA provisioning, mutual-TLS configuration, identity from certificates;
//! * [`telemetry`]: the Prometheus metrics of the coordinator and of the clients, and the
//!   `GET /metrics` endpoint that serves them on a port of its own;
//! * [`error`]: the library's error type, [`FedError`].
//!
//! Clients only connect out to the coordinator; organisations accept no connections.

pub mod accountant;
pub mod aggregate;
pub mod auth;
pub mod blind;
pub mod chunk;
pub mod client;
pub mod coordinator;
pub mod error;
pub mod params;
pub mod privacy;
pub mod robust;
pub mod secagg;
pub mod strategy;
pub mod telemetry;
pub mod tls;
pub mod types;
mod wire;

/// Generated protobuf / gRPC code for `proto/simskip/v1/federation.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("simskip.v1");
}

pub use aggregate::{fedavg, fede_aggregate, weighted_metrics, AggregateError, EntityTable};
pub use auth::{ClientAuth, ServerAuth};
pub use client::{run_client, ClientConfig, ClientEnd, ClientWork, EvalOutput, FitOutput};
pub use coordinator::config::{ServerConfig, StageConfig};
pub use coordinator::rounds;
pub use coordinator::{run_server, serve, RunSummary};
pub use error::{FedError, WorkError};
pub use params::{Personalization, SimSkipParams, StageParams};
pub use robust::{Combine, Robustness};
pub use strategy::{FedAvgStrategy, FedEStrategy, Strategy};
pub use telemetry::{ClientMetrics, CoordinatorMetrics, MetricsServer};
pub use types::{GlobalSnapshot, Payload, StageInfo, StageKind, TaskKind, ENTITIES};
