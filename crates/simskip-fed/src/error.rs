//! The federation library's errors. Binaries wrap them with context; nothing here is `anyhow`.

use std::path::PathBuf;

use crate::coordinator::rounds::RoundsError;
use crate::coordinator::store::StoreError;
use crate::params::ParamsError;

/// An error of the client's local work ([`crate::ClientWork`]): whatever the organisation's
/// code reports, carried as a message to the coordinator and, when fatal, to the caller.
pub type WorkError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum FedError {
    /// A configuration value that cannot be used; names the key and value.
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid stage parameters: {0}")]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Rounds(#[from] RoundsError),
    /// The coordinator's database (see [`crate::coordinator::store`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen address {addr:?}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("writing the run's outputs: {0}")]
    Output(String),
    /// The run ended before its last stage (it could no longer reach its minimum clients).
    #[error("run {run_id} aborted: {reason}")]
    Aborted { run_id: String, reason: String },
    /// The coordinator could not be reached within the configured attempts.
    #[error("could not reach the coordinator at {server} after {attempts} attempts: {last}")]
    Unreachable {
        server: String,
        attempts: u32,
        last: String,
    },
    /// The coordinator refused this client for good (bad credentials, wrong run, bad request).
    #[error("the coordinator at {server} refused {what}: {message}")]
    Refused {
        server: String,
        what: &'static str,
        message: String,
    },
    /// The coordinator sent something this client cannot use.
    #[error("bad message from the coordinator at {server}: {message}")]
    Protocol { server: String, message: String },
    /// The organisation's own work failed in a way that ends the client.
    #[error("{context}: {source}")]
    Work {
        context: String,
        #[source]
        source: WorkError,
    },
}
