//! The SimSkip federation application: settings, the single-machine pipeline (embed, refine,
//! evaluate), the federated client work and coordinator assembly, and the simulation driver.
//! The `simskip`, `simskip-server` and `simskip-client` binaries are thin wrappers over it.

pub mod bench;
pub mod bundled;
pub mod certs;
pub mod cli;
pub mod logging;
pub mod node;
pub mod pipeline;
pub(crate) mod private_state;
pub mod progress;
pub mod report;
pub mod run_report;
pub mod settings;
pub mod simulate;
pub mod work;
