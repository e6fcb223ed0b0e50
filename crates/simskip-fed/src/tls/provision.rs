//! Provisioning: one federation CA, the coordinator's certificate and one per organisation,
//! written as one folder per party. Everything is generated and checked in memory before the
//! first file is written.
//!
//! ```text
//! OUT/ca.pem, OUT/ca.key            the CA: stays with the operator
//! OUT/coordinator/{cert,key,ca}.pem for the coordinator
//! OUT/<org>/{cert,key,ca}.pem       for each organisation
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::ca::{FederationCa, Validity};
use super::config::PartyFiles;
use super::{names, TlsError};

/// The `--days` default of `simskip certs`.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// The folder of the coordinator's files under the output folder.
pub const COORDINATOR_DIR: &str = "coordinator";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionSpec {
    /// Name of the federation: the subject O of every certificate.
    pub federation: String,
    /// DNS names and IP addresses the organisations use to reach the coordinator (its SANs).
    pub coordinator_hosts: Vec<String>,
    /// Organisation names, one certificate and folder each.
    pub organisations: Vec<String>,
    /// Validity of every certificate, the CA's included, from now.
    pub validity_days: u32,
    /// Replace an existing CA (and so invalidate every certificate it signed).
    pub overwrite_ca: bool,
}

/// The files one organisation receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrganisationFiles {
    pub name: String,
    pub files: PartyFiles,
}

/// What [`provision`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub ca_cert: PathBuf,
    /// The CA's private key: keep it with the operator, never hand it to a party.
    pub ca_key: PathBuf,
    pub coordinator: PartyFiles,
    /// In the order of [`ProvisionSpec::organisations`].
    pub organisations: Vec<OrganisationFiles>,
}

/// Generates the CA and every certificate, then writes them under `out_dir` (created if
/// needed). Keys are written with mode 0600 and the party folders with mode 0700 (Unix).
/// Refuses to replace an existing `ca.pem`/`ca.key` unless `spec.overwrite_ca`.
pub fn provision(out_dir: &Path, spec: &ProvisionSpec) -> Result<Provisioned, TlsError> {
    names::validate_organisations(&spec.organisations)?;
    let validity = Validity::days_from_now(spec.validity_days)?;
    let ca_cert = out_dir.join("ca.pem");
    let ca_key = out_dir.join("ca.key");
    if !spec.overwrite_ca {
        for path in [&ca_cert, &ca_key] {
            if path.exists() {
                return Err(TlsError::CaExists { path: path.clone() });
            }
        }
    }

    let ca = FederationCa::generate(&spec.federation, validity)?;
    let coordinator = ca.issue_coordinator(&spec.coordinator_hosts, validity)?;
    let organisations = spec
        .organisations
        .iter()
        .map(|name| Ok((name, ca.issue_organisation(name, validity)?)))
        .collect::<Result<Vec<_>, TlsError>>()?;

    create_dir(out_dir)?;
    write_file(&ca_cert, ca.cert_pem(), Secrecy::Public)?;
    write_file(&ca_key, ca.key_pem(), Secrecy::Private)?;
    let write_party = |dir: PathBuf, cert: &super::IssuedCert| -> Result<PartyFiles, TlsError> {
        create_dir(&dir)?;
        let files = PartyFiles::in_dir(&dir);
        write_file(&files.cert, &cert.cert_pem, Secrecy::Public)?;
        write_file(&files.key, &cert.key_pem, Secrecy::Private)?;
        write_file(&files.ca, ca.cert_pem(), Secrecy::Public)?;
        Ok(files)
    };
    let coordinator = write_party(out_dir.join(COORDINATOR_DIR), &coordinator)?;
    let organisations = organisations
        .into_iter()
        .map(|(name, cert)| {
            Ok(OrganisationFiles {
                name: name.clone(),
                files: write_party(out_dir.join(name), &cert)?,
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    Ok(Provisioned {
        ca_cert,
        ca_key,
        coordinator,
        organisations,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    Public,
    Private,
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| TlsError::io(dir, e))
}

/// A private file is removed first and created anew with mode 0600, so that its content never
/// sits in a file that others could read, whatever the mode of an old file was.
fn write_file(path: &Path, content: &str, secrecy: Secrecy) -> Result<(), TlsError> {
    let io = |e| TlsError::io(path, e);
    let mut options = fs::OpenOptions::new();
    options.write(true);
    match secrecy {
        Secrecy::Public => {
            options.create(true).truncate(true);
        }
        Secrecy::Private => {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
            options.create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(content.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}
