//! Organisation identity through mutual TLS with a federation CA.
//!
//! The organisations trust neither each other nor the network, so every connection that is not
//! loopback runs mutual TLS against one federation CA, and an organisation's name is read from
//! the certificate it presents, never from what it writes in a message. The layout follows
//! NVIDIA FLARE's provisioning: the operator keeps the CA, and hands each party a folder with
//! its own certificate, its key and the CA certificate.
//!
//! * [`provision`]: one CA, the coordinator's certificate and one per organisation
//!   ([`ProvisionSpec`] → folder layout in [`Provisioned`]); [`FederationCa`] issues single
//!   certificates.
//! * [`ServerTls`] / [`ClientTls`]: tonic's rustls configurations from a party's folder
//!   ([`PartyFiles`]); the server REQUIRES a client certificate from the federation CA.
//! * [`peer_organisation`] and [`AllowList`]: the organisation name of a request's peer.
//!
//! ## Where the name lives
//! The canonical place is the certificate's subject alternative name of type URI,
//! `urn:simskip:org:<name>` ([`ORG_URI_PREFIX`]); exactly one such URI must be present. The
//! subject CN carries the same name for people reading the certificate, and is never read:
//! SANs are where X.509 (RFC 5280, RFC 6125) puts identities, and the URN prefix cannot be
//! confused with a host name (the coordinator's certificate has none).

mod ca;
mod config;
mod error;
mod identity;
mod names;
mod provision;

pub use ca::{FederationCa, IssuedCert, Validity, MAX_VALIDITY_DAYS};
pub use config::{ClientTls, PartyFiles, ServerTls};
pub use error::TlsError;
pub use identity::{organisation_from_der, peer_organisation, AllowList, PeerIdentityError};
pub use names::{validate_organisation_name, ORG_URI_PREFIX};
pub use provision::{
    provision, OrganisationFiles, ProvisionSpec, Provisioned, COORDINATOR_DIR,
    DEFAULT_VALIDITY_DAYS,
};
