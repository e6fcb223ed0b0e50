//! tonic's rustls configurations from a party's files. Every file is read and parsed here, so
//! that a missing or broken file is reported with its path at start-up rather than as a
//! handshake failure later.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::TlsError;

/// A party's three files: its certificate (chain), its private key and the federation CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl PartyFiles {
    /// `cert.pem`, `key.pem` and `ca.pem` in `dir`, the layout [`super::provision`] writes.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        }
    }
}

/// The coordinator's side: its identity, and the federation CA that every client certificate
/// must chain to.
#[derive(Debug)]
pub struct ServerTls;

impl ServerTls {
    /// A configuration that REQUIRES a client certificate signed by `files.ca`.
    pub fn load(files: &PartyFiles) -> Result<ServerTlsConfig, TlsError> {
        let identity = load_identity(files)?;
        let ca = load_certificates(&files.ca)?;
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .client_auth_optional(false))
    }

    /// [`Self::load`] on the folder layout of [`PartyFiles::in_dir`].
    pub fn load_dir(dir: &Path) -> Result<ServerTlsConfig, TlsError> {
        Self::load(&PartyFiles::in_dir(dir))
    }

    /// The coordinator's identity only, no client certificate asked (`tokens` mode, where
    /// each call carries a bearer token instead). `files.ca` is not read.
    pub fn load_server_only(files: &PartyFiles) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new().identity(load_identity(files)?))
    }
}

/// An organisation's side: its identity, and the federation CA that the coordinator's
/// certificate must chain to.
#[derive(Debug)]
pub struct ClientTls;

impl ClientTls {
    /// `domain_name` is the coordinator's name as in its certificate (one of the
    /// `--coordinator-host` values), checked against the server's certificate.
    pub fn load(files: &PartyFiles, domain_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let identity = load_identity(files)?;
        let ca = load_certificates(&files.ca)?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name(domain_name))
    }

    /// [`Self::load`] on the folder layout of [`PartyFiles::in_dir`].
    pub fn load_dir(dir: &Path, domain_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Self::load(&PartyFiles::in_dir(dir), domain_name)
    }

    /// Checks the coordinator against `ca` and presents no certificate (`tokens` mode).
    pub fn load_server_only(ca: &Path, domain_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(load_certificates(ca)?)
            .domain_name(domain_name))
    }
}

fn load_identity(files: &PartyFiles) -> Result<Identity, TlsError> {
    let cert = load_certificates(&files.cert)?;
    let key = read(&files.key)?;
    match PrivateKeyDer::from_pem_slice(&key) {
        Ok(_) => {}
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: files.key.clone(),
            })
        }
        Err(e) => {
            return Err(TlsError::InvalidPem {
                path: files.key.clone(),
                detail: e.to_string(),
            })
        }
    }
    Ok(Identity::from_pem(cert.into_inner(), key))
}

/// Reads a PEM file of one or more certificates and checks that each parses as X.509.
fn load_certificates(path: &Path) -> Result<Certificate, TlsError> {
    let pem = read(path)?;
    let ders = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if ders.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for der in &ders {
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::InvalidCertificate {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(Certificate::from_pem(pem))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::io(path, e))
}
