//! The federation CA: it issues the coordinator's certificate (serverAuth) and one certificate
//! per organisation (clientAuth, name in the SAN URI). All the cryptography is rcgen's.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;

use super::names::{self, Host};
use super::{TlsError, ORG_URI_PREFIX};

/// Longest validity [`Validity::days_from_now`] accepts.
pub const MAX_VALIDITY_DAYS: u32 = 3650;

/// Certificates start this long before they are made, so that a party whose clock is a little
/// behind the operator's accepts them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago (clock skew) to `days` days from now.
    pub fn days_from_now(days: u32) -> Result<Self, TlsError> {
        if days == 0 || days > MAX_VALIDITY_DAYS {
            return Err(TlsError::InvalidValidity {
                days,
                max: MAX_VALIDITY_DAYS,
            });
        }
        let now = SystemTime::now();
        Ok(Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + DAY * days,
        })
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), TlsError> {
        if self.not_after <= self.not_before {
            return Err(TlsError::EmptyValidityWindow);
        }
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        Ok(())
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The federation's certificate authority, in memory.
pub struct FederationCa {
    federation: String,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationCa")
            .field("federation", &self.federation)
            .finish_non_exhaustive()
    }
}

impl FederationCa {
    /// A new self-signed CA that may sign end-entity certificates only (path length 0).
    pub fn generate(federation: &str, validity: Validity) -> Result<Self, TlsError> {
        names::validate_federation_name(federation)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(federation, &format!("{federation} federation CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity.apply(&mut params)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            federation: federation.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA that [`super::provision`] wrote (`ca.pem`, `ca.key`), to issue more certificates.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = read_text(cert_path)?;
        let key_pem = read_text(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::InvalidPem {
            path: key_path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let invalid = |detail: String| TlsError::InvalidCertificate {
            path: cert_path.to_path_buf(),
            detail,
        };
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(e.to_string()))?;
        if !cert.is_ca() {
            return Err(TlsError::NotACa {
                path: cert_path.to_path_buf(),
            });
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(TlsError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        let federation = cert
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| {
                invalid("no organisation (O) in the subject: not a federation CA".into())
            })?
            .to_string();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            federation,
            cert_pem,
            key_pem,
            issuer,
        })
    }

    pub fn federation(&self) -> &str {
        &self.federation
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The coordinator's certificate: serverAuth, one SAN per host (DNS name or IP address).
    pub fn issue_coordinator(
        &self,
        hosts: &[String],
        validity: Validity,
    ) -> Result<IssuedCert, TlsError> {
        if hosts.is_empty() {
            return Err(TlsError::NoCoordinatorHost);
        }
        let mut params = CertificateParams::default();
        for host in hosts {
            params
                .subject_alt_names
                .push(match names::parse_host(host)? {
                    Host::Ip(ip) => SanType::IpAddress(ip),
                    Host::Dns(dns) => SanType::DnsName(dns.try_into()?),
                });
        }
        params.distinguished_name = subject(
            &self.federation,
            &format!("{} coordinator", self.federation),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// An organisation's certificate: clientAuth, the name in the SAN URI
    /// `urn:simskip:org:<name>` (the place the coordinator reads) and in the subject CN.
    pub fn issue_organisation(
        &self,
        name: &str,
        validity: Validity,
    ) -> Result<IssuedCert, TlsError> {
        names::validate_organisation_name(name)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(format!("{ORG_URI_PREFIX}{name}").try_into()?)];
        params.distinguished_name = subject(&self.federation, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<IssuedCert, TlsError> {
        validity.apply(&mut params)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn subject(federation: &str, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, federation);
    dn.push(DnType::CommonName, common_name);
    dn
}

pub(crate) fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::io(path, e))
}
