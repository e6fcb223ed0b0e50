//! Errors of provisioning and of loading TLS files. Each names the field or the path at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("organisation name {name:?}: {reason}")]
    InvalidOrganisation { name: String, reason: &'static str },
    #[error("organisations: at least one organisation is needed")]
    NoOrganisations,
    #[error("federation name {name:?}: {reason}")]
    InvalidFederation { name: String, reason: &'static str },
    #[error("coordinator_hosts: at least one DNS name or IP address is needed")]
    NoCoordinatorHost,
    #[error("coordinator host {host:?}: {reason}")]
    InvalidCoordinatorHost { host: String, reason: &'static str },
    #[error("validity_days = {days}: must be between 1 and {max}")]
    InvalidValidity { days: u32, max: u32 },
    #[error("validity window: not_after must be later than not_before")]
    EmptyValidityWindow,
    #[error(
        "{}: a federation CA already exists; replacing it invalidates every certificate it \
         signed (pass --force to do so)",
        path.display()
    )]
    CaExists { path: PathBuf },
    #[error("{}: file not found", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in the file", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("{}: invalid PEM: {detail}", path.display())]
    InvalidPem { path: PathBuf, detail: String },
    #[error("{}: not a valid X.509 certificate: {detail}", path.display())]
    InvalidCertificate { path: PathBuf, detail: String },
    #[error("{}: the certificate is not a CA (basic constraints)", path.display())]
    NotACa { path: PathBuf },
    #[error("{}: this private key does not belong to {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

impl TlsError {
    /// `Missing` for a file that does not exist, `Io` for any other failure.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::Missing { path }
        } else {
            Self::Io { path, source }
        }
    }
}
