//! Who is calling: how the coordinator learns an organisation's name on every call, and how
//! an organisation proves it.
//!
//! Three modes, chosen explicitly in the settings (`[server.auth]`, `[client.auth]`):
//! * **`mtls`** (the default): mutual TLS with the federation CA ([`crate::tls`]). The name is
//!   read from the client certificate on every call; only the CA can put it there.
//! * **`tokens`**: TLS with the coordinator's certificate only, and a per-organisation bearer
//!   token in the metadata of every call (`authorization: Bearer ...` beside the
//!   `simskip-organisation` name). The coordinator stores only SHA-256 digests of the tokens
//!   and compares them in constant time. Lighter to hand out than certificates; a leaked
//!   token is a leaked identity, so it never crosses in plain text.
//! * **`insecure`**: plain text, the name as the client writes it, optionally checked against
//!   a list. For experiments on one machine only: anyone who can reach the port can claim any
//!   listed name. It carries no credentials at all, so nothing secret ever crosses in clear.
//!
//! Whatever the mode, a session id is bound to the organisation that registered it: a call
//! that presents another organisation's session is treated as an unknown session.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::transport::{ClientTlsConfig, Endpoint, ServerTlsConfig};
use tonic::{Request, Status};

use crate::error::FedError;
use crate::tls::{
    organisation_from_der, peer_organisation, validate_organisation_name, AllowList, ClientTls,
    PartyFiles, ServerTls,
};

/// Metadata key of the organisation name in `tokens` mode.
pub const ORGANISATION_METADATA: &str = "simskip-organisation";
const AUTHORIZATION_METADATA: &str = "authorization";
const BEARER: &str = "Bearer ";
/// Bytes of a token made by [`new_token`] (256 bits, hex-encoded).
pub const TOKEN_BYTES: usize = 32;

/// One organisation admitted in `tokens` mode: its name and the SHA-256 of its token (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub token_sha256: String,
}

/// The coordinator's `[server.auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerAuth {
    /// Mutual TLS: `tls_dir` holds the coordinator's `cert.pem`, `key.pem` and the federation
    /// `ca.pem` (`simskip certs` writes it); only the named organisations are admitted.
    Mtls {
        tls_dir: PathBuf,
        organisations: Vec<String>,
    },
    /// TLS with the coordinator's certificate, and one bearer token per organisation.
    Tokens {
        tls_dir: PathBuf,
        organisations: Vec<TokenEntry>,
    },
    /// Plain text; names as claimed, checked against `organisations` when it is not empty.
    Insecure {
        #[serde(default)]
        organisations: Vec<String>,
    },
}

impl Default for ServerAuth {
    fn default() -> Self {
        ServerAuth::Mtls {
            tls_dir: PathBuf::from("tls/coordinator"),
            organisations: Vec::new(),
        }
    }
}

fn config_error(key: &str, value: impl std::fmt::Display, why: impl std::fmt::Display) -> FedError {
    FedError::Config(format!("{key} = {value}: {why}"))
}

impl ServerAuth {
    /// Plain text admitting any name: tests and single-machine experiments.
    pub fn insecure() -> Self {
        ServerAuth::Insecure {
            organisations: Vec::new(),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            ServerAuth::Mtls { .. } => "mtls",
            ServerAuth::Tokens { .. } => "tokens",
            ServerAuth::Insecure { .. } => "insecure",
        }
    }

    /// Checks the names and digests (not the files: [`Self::load`] reads them).
    pub fn validate(&self) -> Result<(), FedError> {
        let names: Vec<&str> = match self {
            ServerAuth::Mtls { organisations, .. } | ServerAuth::Insecure { organisations } => {
                organisations.iter().map(String::as_str).collect()
            }
            ServerAuth::Tokens { organisations, .. } => {
                for (i, e) in organisations.iter().enumerate() {
                    parse_digest(&e.token_sha256).map_err(|why| {
                        config_error(
                            &format!("server.auth.organisations[{i}].token_sha256"),
                            format!("{:?}", e.token_sha256),
                            why,
                        )
                    })?;
                }
                organisations.iter().map(|e| e.name.as_str()).collect()
            }
        };
        if names.is_empty() && !matches!(self, ServerAuth::Insecure { .. }) {
            return Err(config_error(
                "server.auth.organisations",
                "[]",
                format!(
                    "mode {:?} admits only the organisations listed here; name them",
                    self.mode()
                ),
            ));
        }
        if !names.is_empty() {
            AllowList::new(names.iter().copied())
                .map_err(|e| config_error("server.auth.organisations", format!("{names:?}"), e))?;
        }
        Ok(())
    }

    /// Reads the files: the TLS configuration to serve with (none for `insecure`) and the
    /// gatekeeper that names every caller.
    pub fn load(&self) -> Result<(Option<ServerTlsConfig>, Gatekeeper), FedError> {
        self.validate()?;
        let tls_error = |dir: &Path, e| {
            config_error(
                "server.auth.tls_dir",
                dir.display(),
                format!("{e} (make the files with `simskip certs`)"),
            )
        };
        Ok(match self {
            ServerAuth::Mtls {
                tls_dir,
                organisations,
            } => {
                let tls = ServerTls::load_dir(tls_dir).map_err(|e| tls_error(tls_dir, e))?;
                let allow = AllowList::new(organisations.iter().cloned()).expect("validated");
                (Some(tls), Gatekeeper(Arc::new(Gate::Mtls(allow))))
            }
            ServerAuth::Tokens {
                tls_dir,
                organisations,
            } => {
                let tls = ServerTls::load_server_only(&PartyFiles::in_dir(tls_dir))
                    .map_err(|e| tls_error(tls_dir, e))?;
                let digests = organisations
                    .iter()
                    .map(|e| {
                        (
                            e.name.clone(),
                            parse_digest(&e.token_sha256).expect("validated"),
                        )
                    })
                    .collect();
                (Some(tls), Gatekeeper(Arc::new(Gate::Tokens(digests))))
            }
            ServerAuth::Insecure { organisations } => {
                let allow = (!organisations.is_empty())
                    .then(|| AllowList::new(organisations.iter().cloned()).expect("validated"));
                (None, Gatekeeper(Arc::new(Gate::Insecure(allow))))
            }
        })
    }
}

/// Who a call comes from, as the transport or its credentials prove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Proven by a certificate or a token.
    Organisation(String),
    /// `insecure` mode: nothing is proven; the session id is the only credential.
    Unverified,
}

impl Caller {
    /// True when this caller may use a session registered by `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        match self {
            Caller::Organisation(name) => name == owner,
            Caller::Unverified => true,
        }
    }
}

#[derive(Debug)]
enum Gate {
    Mtls(AllowList),
    Tokens(BTreeMap<String, [u8; 32]>),
    Insecure(Option<AllowList>),
}

/// Names the caller of every call (cheap to clone).
#[derive(Debug, Clone)]
pub struct Gatekeeper(Arc<Gate>);

impl Gatekeeper {
    /// The caller of `req`. `Unauthenticated` without valid credentials, `PermissionDenied`
    /// for a proven organisation that this federation does not list. The reasons name no
    /// member of the federation and nothing of the run.
    pub fn identify<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        match &*self.0 {
            Gate::Mtls(allow) => {
                let name = peer_organisation(req)?;
                allow.check(&name)?;
                Ok(Caller::Organisation(name))
            }
            Gate::Tokens(digests) => {
                let meta = req.metadata();
                let name = meta
                    .get(ORGANISATION_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Status::unauthenticated(format!("no {ORGANISATION_METADATA} metadata"))
                    })?;
                let token = meta
                    .get(AUTHORIZATION_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix(BEARER))
                    .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
                let presented = digest(token);
                // Unknown names and wrong tokens get the same answer.
                let matches = digests
                    .get(name)
                    .is_some_and(|d| bool::from(d.ct_eq(&presented)));
                if matches {
                    Ok(Caller::Organisation(name.to_string()))
                } else {
                    Err(Status::unauthenticated("bad organisation or token"))
                }
            }
            Gate::Insecure(_) => Ok(Caller::Unverified),
        }
    }

    /// The name a registration is recorded under: the proven one (the header may repeat it,
    /// or leave it empty, but not claim another), or in `insecure` mode the claimed one,
    /// checked against the list when there is one.
    pub fn registration_name(&self, caller: &Caller, claimed: &str) -> Result<String, Status> {
        match (caller, &*self.0) {
            (Caller::Organisation(name), _) => {
                if claimed.is_empty() || claimed == name {
                    Ok(name.clone())
                } else {
                    Err(Status::permission_denied(format!(
                        "your credentials name {name:?}; you cannot register as {claimed:?}"
                    )))
                }
            }
            (Caller::Unverified, Gate::Insecure(allow)) => {
                if claimed.is_empty() {
                    return Err(Status::invalid_argument("a client name is required"));
                }
                if let Some(allow) = allow {
                    allow.check(claimed)?;
                }
                Ok(claimed.to_string())
            }
            (Caller::Unverified, _) => Err(Status::unauthenticated("no credentials")),
        }
    }
}

/// The organisation's `[client.auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientAuth {
    /// Mutual TLS: `tls_dir` holds this organisation's `cert.pem`, `key.pem` and the
    /// federation `ca.pem`. The organisation's name is the one in its certificate.
    Mtls {
        tls_dir: PathBuf,
        /// The coordinator's name as in its certificate; default: the host of `client.server`.
        #[serde(default)]
        server_name: Option<String>,
    },
    /// TLS (the coordinator's certificate checked against `ca`) and a bearer token, given
    /// inline or, better, in a file readable only by the organisation.
    Token {
        ca: PathBuf,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        token_file: Option<PathBuf>,
        #[serde(default)]
        server_name: Option<String>,
    },
    /// Plain text, no credentials. (A struct variant, so that a stray key such as a token
    /// next to it is refused rather than ignored.)
    Insecure {},
}

impl Default for ClientAuth {
    fn default() -> Self {
        ClientAuth::Mtls {
            tls_dir: PathBuf::from("tls"),
            server_name: None,
        }
    }
}

/// What a client needs to reach the coordinator: its proven name, its TLS configuration and
/// the metadata it adds to every call.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// The name this organisation registers under.
    pub name: String,
    tls: Option<ClientTlsConfig>,
    /// `tokens` mode: (organisation, "Bearer <token>").
    bearer: Option<(
        MetadataValue<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
}

impl ClientAuth {
    pub fn mode(&self) -> &'static str {
        match self {
            ClientAuth::Mtls { .. } => "mtls",
            ClientAuth::Token { .. } => "token",
            ClientAuth::Insecure {} => "insecure",
        }
    }

    /// `https://` for the TLS modes, `http://` for `insecure`: a mismatch is a settings
    /// mistake, reported as such rather than as a handshake failure.
    pub fn validate(&self, name: &str, server: &str) -> Result<(), FedError> {
        let tls = !matches!(self, ClientAuth::Insecure {});
        let scheme_ok = if tls {
            server.starts_with("https://")
        } else {
            server.starts_with("http://")
        };
        if !scheme_ok {
            return Err(config_error(
                "client.server",
                server,
                format!(
                    "client.auth.mode {:?} needs an {} URL",
                    self.mode(),
                    if tls { "https://" } else { "http://" }
                ),
            ));
        }
        match self {
            ClientAuth::Mtls { .. } => {}
            ClientAuth::Token {
                token, token_file, ..
            } => {
                if token.is_some() == token_file.is_some() {
                    return Err(config_error(
                        "client.auth",
                        "mode \"token\"",
                        "set exactly one of token and token_file",
                    ));
                }
                if name.is_empty() {
                    return Err(config_error(
                        "client.name",
                        "\"\"",
                        "mode \"token\" needs the organisation's name",
                    ));
                }
            }
            ClientAuth::Insecure {} => {
                if name.is_empty() {
                    return Err(config_error(
                        "client.name",
                        "\"\"",
                        "every organisation needs a name",
                    ));
                }
            }
        }
        if !name.is_empty() {
            validate_organisation_name(name)
                .map_err(|e| config_error("client.name", format!("{name:?}"), e))?;
        }
        Ok(())
    }

    /// Reads the files. `name` is `client.name` (may be empty in `mtls` mode, where the
    /// certificate names the organisation; if set, it must agree with the certificate).
    pub fn load(&self, name: &str, server: &str) -> Result<ClientCredentials, FedError> {
        self.validate(name, server)?;
        let host = || -> Result<String, FedError> {
            let uri: tonic::codegen::http::Uri = server
                .parse()
                .map_err(|e| config_error("client.server", server, e))?;
            uri.host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or_else(|| config_error("client.server", server, "no host"))
        };
        match self {
            ClientAuth::Mtls {
                tls_dir,
                server_name,
            } => {
                let files = PartyFiles::in_dir(tls_dir);
                let pem = std::fs::read(&files.cert).map_err(|e| {
                    config_error(
                        "client.auth.tls_dir",
                        tls_dir.display(),
                        format!("{}: {e}", files.cert.display()),
                    )
                })?;
                let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                    .next()
                    .and_then(Result::ok)
                    .ok_or_else(|| {
                        config_error(
                            "client.auth.tls_dir",
                            tls_dir.display(),
                            format!("{}: no certificate", files.cert.display()),
                        )
                    })?;
                let proven = organisation_from_der(der.as_ref()).map_err(|e| {
                    config_error(
                        "client.auth.tls_dir",
                        tls_dir.display(),
                        format!("{}: {e}", files.cert.display()),
                    )
                })?;
                if !name.is_empty() && name != proven {
                    return Err(config_error(
                        "client.name",
                        format!("{name:?}"),
                        format!(
                            "the certificate in {} is for {proven:?}",
                            files.cert.display()
                        ),
                    ));
                }
                let server_name = match server_name {
                    Some(s) => s.clone(),
                    None => host()?,
                };
                let tls = ClientTls::load(&files, &server_name)
                    .map_err(|e| config_error("client.auth.tls_dir", tls_dir.display(), e))?;
                Ok(ClientCredentials {
                    name: proven,
                    tls: Some(tls),
                    bearer: None,
                })
            }
            ClientAuth::Token {
                ca,
                token,
                token_file,
                server_name,
            } => {
                let token = match (token, token_file) {
                    (Some(t), _) => t.trim().to_string(),
                    (None, Some(path)) => std::fs::read_to_string(path)
                        .map_err(|e| config_error("client.auth.token_file", path.display(), e))?
                        .trim()
                        .to_string(),
                    (None, None) => unreachable!("validated"),
                };
                if token.is_empty() {
                    return Err(config_error("client.auth.token", "\"\"", "empty token"));
                }
                let bearer = MetadataValue::try_from(format!("{BEARER}{token}"))
                    .map_err(|_| config_error("client.auth.token", "(hidden)", "not ASCII text"))?;
                let org = MetadataValue::try_from(name)
                    .map_err(|_| config_error("client.name", name, "not ASCII text"))?;
                let server_name = match server_name {
                    Some(s) => s.clone(),
                    None => host()?,
                };
                let tls = ClientTls::load_server_only(ca, &server_name)
                    .map_err(|e| config_error("client.auth.ca", ca.display(), e))?;
                Ok(ClientCredentials {
                    name: name.to_string(),
                    tls: Some(tls),
                    bearer: Some((org, bearer)),
                })
            }
            ClientAuth::Insecure {} => Ok(ClientCredentials {
                name: name.to_string(),
                tls: None,
                bearer: None,
            }),
        }
    }
}

impl ClientCredentials {
    /// The endpoint of `server` with this organisation's TLS configuration.
    pub fn endpoint(&self, server: &str) -> Result<Endpoint, FedError> {
        let endpoint = Endpoint::from_shared(server.to_string())
            .map_err(|e| config_error("client.server", server, e))?;
        match &self.tls {
            Some(tls) => Ok(endpoint.tls_config(tls.clone())?),
            None => Ok(endpoint),
        }
    }

    /// Adds this organisation's credentials to a call (tokens mode; TLS needs nothing).
    pub fn authorize<T>(&self, req: &mut Request<T>) {
        if let Some((org, bearer)) = &self.bearer {
            req.metadata_mut()
                .insert(ORGANISATION_METADATA, org.clone());
            req.metadata_mut()
                .insert(AUTHORIZATION_METADATA, bearer.clone());
        }
    }
}

/// A new random token (256 bits from the OS generator, hex) and its SHA-256 digest (hex), the
/// form `server.auth.organisations[].token_sha256` takes.
pub fn new_token() -> (String, String) {
    use rand::TryRngCore;
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random generator failed");
    let token = hex(&bytes);
    let digest = token_digest(&token);
    (token, digest)
}

/// SHA-256 of a token, hex: what the coordinator stores.
pub fn token_digest(token: &str) -> String {
    hex(&digest(token))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_digest(text: &str) -> Result<[u8; 32], &'static str> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hexadecimal digits, the SHA-256 of the token (`simskip token`)");
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_digest_round_trips_and_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (token, hash) = new_token();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert_eq!(parse_digest(&hash).unwrap(), digest(&token));
        assert_ne!(new_token().0, token);
        assert!(parse_digest("xyz").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }

    fn gate(auth: &ServerAuth) -> Gatekeeper {
        match auth {
            ServerAuth::Tokens { organisations, .. } => Gatekeeper(Arc::new(Gate::Tokens(
                organisations
                    .iter()
                    .map(|e| (e.name.clone(), parse_digest(&e.token_sha256).unwrap()))
                    .collect(),
            ))),
            other => other.load().unwrap().1,
        }
    }

    fn call(org: Option<&str>, token: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(o) = org {
            req.metadata_mut()
                .insert(ORGANISATION_METADATA, o.parse().unwrap());
        }
        if let Some(t) = token {
            req.metadata_mut().insert(
                AUTHORIZATION_METADATA,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        req
    }

    #[test]
    fn tokens_identify_only_their_own_organisation() {
        let (ta, ha) = new_token();
        let (tb, hb) = new_token();
        let auth = ServerAuth::Tokens {
            tls_dir: "unused".into(),
            organisations: vec![
                TokenEntry {
                    name: "org-a".into(),
                    token_sha256: ha,
                },
                TokenEntry {
                    name: "org-b".into(),
                    token_sha256: hb,
                },
            ],
        };
        auth.validate().unwrap();
        let g = gate(&auth);
        assert_eq!(
            g.identify(&call(Some("org-a"), Some(&ta))).unwrap(),
            Caller::Organisation("org-a".into())
        );
        // b's token does not make one org-a, an unknown name gets the same answer, and the
        // digest itself is no token.
        for (org, token) in [
            (Some("org-a"), Some(tb.as_str())),
            (Some("org-z"), Some(ta.as_str())),
            (Some("org-a"), None),
            (None, Some(ta.as_str())),
            (Some("org-a"), Some(token_digest(&ta).as_str())),
        ] {
            let err = g.identify(&call(org, token)).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::Unauthenticated,
                "{org:?} {token:?}"
            );
        }
        let a = Caller::Organisation("org-a".into());
        assert_eq!(g.registration_name(&a, "").unwrap(), "org-a");
        assert_eq!(g.registration_name(&a, "org-a").unwrap(), "org-a");
        assert_eq!(
            g.registration_name(&a, "org-b").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(a.owns("org-a") && !a.owns("org-b"));
    }

    #[test]
    fn insecure_checks_claimed_names_against_its_list() {
        let g = gate(&ServerAuth::Insecure {
            organisations: vec!["org-a".into()],
        });
        let caller = g.identify(&call(None, None)).unwrap();
        assert_eq!(caller, Caller::Unverified);
        assert_eq!(g.registration_name(&caller, "org-a").unwrap(), "org-a");
        assert_eq!(
            g.registration_name(&caller, "org-x").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let open = gate(&ServerAuth::insecure());
        assert_eq!(open.registration_name(&caller, "anyone").unwrap(), "anyone");
    }

    #[test]
    fn settings_mistakes_are_one_line_naming_the_key() {
        let err = ServerAuth::default().validate().unwrap_err().to_string();
        assert!(err.contains("server.auth.organisations"), "{err}");
        let err = ServerAuth::Tokens {
            tls_dir: "x".into(),
            organisations: vec![TokenEntry {
                name: "org-a".into(),
                token_sha256: "secret".into(),
            }],
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.auth.organisations[0].token_sha256"),
            "{err}"
        );
        let err = ServerAuth::Mtls {
            tls_dir: "x".into(),
            organisations: vec!["org-a".into(), "org-a".into()],
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.auth.organisations"), "{err}");
        let err = ServerAuth::Mtls {
            tls_dir: "/nonexistent/simskip".into(),
            organisations: vec!["org-a".into()],
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.auth.tls_dir") && err.contains("/nonexistent/simskip"),
            "{err}"
        );

        let err = ClientAuth::default()
            .validate("org-a", "http://h:1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client.server") && err.contains("https://"),
            "{err}"
        );
        let err = ClientAuth::Insecure {}
            .validate("org-a", "https://h:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http://"), "{err}");
        let both = ClientAuth::Token {
            ca: "ca.pem".into(),
            token: Some("t".into()),
            token_file: Some("f".into()),
            server_name: None,
        };
        assert!(both.validate("org-a", "https://h:1").is_err());
    }

    #[test]
    fn settings_parse_from_toml_and_reject_unknown_keys() {
        let auth: ServerAuth = toml::from_str(
            "mode = \"tokens\"\ntls_dir = \"t\"\n[[organisations]]\nname = \"org-a\"\ntoken_sha256 = \"00\"\n",
        )
        .unwrap();
        assert!(
            matches!(auth, ServerAuth::Tokens { ref organisations, .. } if organisations.len() == 1)
        );
        assert!(toml::from_str::<ServerAuth>(
            "mode = \"mtls\"\ntls_dir = \"t\"\norganisations = []\ntoken = \"x\"\n"
        )
        .is_err());
        assert!(toml::from_str::<ServerAuth>("mode = \"plain\"\n").is_err());
        let c: ClientAuth = toml::from_str("mode = \"insecure\"\n").unwrap();
        assert_eq!(c, ClientAuth::Insecure {});
        assert!(toml::from_str::<ClientAuth>("mode = \"insecure\"\ntoken = \"x\"\n").is_err());
    }
}
