//! The rules for organisation, federation and coordinator-host names: one place, used when
//! provisioning and again when a name is read back from a peer's certificate.

use std::net::IpAddr;

use super::TlsError;

/// The SAN URI that carries an organisation's name: `urn:simskip:org:<name>`.
pub const ORG_URI_PREFIX: &str = "urn:simskip:org:";

/// X.509's upper bound for a common name (RFC 5280, ub-common-name), which carries the name too.
const MAX_NAME_LEN: usize = 64;

/// Folder names that provisioning writes next to the organisations' folders.
const RESERVED: [&str; 3] = ["coordinator", "ca.pem", "ca.key"];

/// An organisation name is also a folder name and part of a URN: 1–64 ASCII letters, digits,
/// `-`, `_` or `.`, starting with a letter or digit, and not a name provisioning uses itself.
pub fn validate_organisation_name(name: &str) -> Result<(), TlsError> {
    let fail = |reason| {
        Err(TlsError::InvalidOrganisation {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return fail("must start with an ASCII letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return fail("may hold only ASCII letters, digits, '-', '_' and '.'");
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return fail("is reserved by the provisioning layout");
    }
    Ok(())
}

/// Validates every name and rejects duplicates, case-insensitively because the names become
/// folders and some file systems fold case.
pub(crate) fn validate_organisations(names: &[String]) -> Result<(), TlsError> {
    if names.is_empty() {
        return Err(TlsError::NoOrganisations);
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        validate_organisation_name(name)?;
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(TlsError::InvalidOrganisation {
                name: name.clone(),
                reason: "is listed twice (names are compared ignoring case)",
            });
        }
    }
    Ok(())
}

pub(crate) fn validate_federation_name(name: &str) -> Result<(), TlsError> {
    let fail = |reason| {
        Err(TlsError::InvalidFederation {
            name: name.to_string(),
            reason,
        })
    };
    if name.trim().is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 64 characters");
    }
    if !name.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return fail("may hold only printable ASCII characters");
    }
    Ok(())
}

/// A coordinator host as it goes into a SAN: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    Dns(String),
}

pub(crate) fn parse_host(host: &str) -> Result<Host, TlsError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let fail = |reason| {
        Err(TlsError::InvalidCoordinatorHost {
            host: host.to_string(),
            reason,
        })
    };
    if host.is_empty() || host.len() > 253 {
        return fail("a DNS name has 1 to 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return fail("each DNS label has 1 to 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return fail("is neither an IP address nor a DNS name (letters, digits, '-', '.')");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail("a DNS label neither starts nor ends with '-'");
        }
    }
    Ok(Host::Dns(host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organisation_names() {
        for ok in ["org-a", "Hospital_7", "a", "x.y"] {
            validate_organisation_name(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".hidden",
            "../x",
            "a/b",
            "a b",
            "coordinator",
            "CA.key",
            "é",
        ] {
            assert!(validate_organisation_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_organisation_name(&"a".repeat(65)).is_err());
        let dup = validate_organisations(&["org-a".into(), "ORG-A".into()]).unwrap_err();
        assert!(matches!(dup, TlsError::InvalidOrganisation { name, .. } if name == "ORG-A"));
        assert!(matches!(
            validate_organisations(&[]),
            Err(TlsError::NoOrganisations)
        ));
    }

    #[test]
    fn hosts() {
        assert_eq!(
            parse_host("127.0.0.1").unwrap(),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_host("::1").unwrap(), Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            parse_host("Coordinator.example").unwrap(),
            Host::Dns("coordinator.example".into())
        );
        for bad in ["", "a..b", "-a", "a_b", "a b", "http://x"] {
            assert!(parse_host(bad).is_err(), "{bad:?} accepted");
        }
    }
}
