//! The organisation name of a request's peer, read from its verified client certificate.

use std::collections::BTreeSet;

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use super::names::{self, ORG_URI_PREFIX};
use super::TlsError;

/// The organisation name of the peer that sent `req`: the `urn:simskip:org:<name>` SAN URI of
/// its leaf certificate. The TLS layer has already verified that certificate against the
/// federation CA, so only the CA can have put the name there; nothing in the request body is
/// read. `Unauthenticated` when the connection has no client certificate (plain text, or a
/// server without [`super::ServerTls`]) or the certificate holds no valid name.
///
/// Call it first in every RPC handler (for a streaming request, on the `Request<Streaming<_>>`
/// before reading the stream).
pub fn peer_organisation<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate: mutual TLS is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate: mutual TLS is required"))?;
    organisation_from_der(leaf.as_ref())
        .map_err(|reason| Status::unauthenticated(format!("client certificate: {reason}")))
}

/// Why a certificate yields no organisation name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
    #[error("bad subject alternative name extension: {0}")]
    BadSubjectAltName(String),
    #[error("no urn:simskip:org:<name> URI among its subject alternative names")]
    NoName,
    #[error("more than one urn:simskip:org:<name> URI among its subject alternative names")]
    SeveralNames,
    #[error("{0}")]
    InvalidName(String),
}

/// The organisation name in a DER certificate: the one SAN URI that starts with
/// [`ORG_URI_PREFIX`], validated as an organisation name.
pub fn organisation_from_der(der: &[u8]) -> Result<String, PeerIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PeerIdentityError::NotX509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerIdentityError::BadSubjectAltName(e.to_string()))?
        .ok_or(PeerIdentityError::NoName)?;
    let mut found = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(ORG_URI_PREFIX),
            _ => None,
        });
    let name = found.next().ok_or(PeerIdentityError::NoName)?;
    if found.next().is_some() {
        return Err(PeerIdentityError::SeveralNames);
    }
    names::validate_organisation_name(name)
        .map_err(|e| PeerIdentityError::InvalidName(e.to_string()))?;
    Ok(name.to_string())
}

/// The organisations a coordinator admits, as its config names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    names: BTreeSet<String>,
}

impl AllowList {
    /// Each name must be a valid organisation name; duplicates are an error.
    pub fn new<I, S>(names: I) -> Result<Self, TlsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        names::validate_organisations(&names)?;
        Ok(Self {
            names: names.into_iter().collect(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// `PermissionDenied` for a name outside the list (its identity is known, but not admitted).
    pub fn check(&self, name: &str) -> Result<(), Status> {
        if self.contains(name) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "organisation {name:?} is not a member of this federation"
            )))
        }
    }

    /// [`peer_organisation`] then [`Self::check`]: the admitted name of the request's peer.
    pub fn admit<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let name = peer_organisation(req)?;
        self.check(&name)?;
        Ok(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
}
