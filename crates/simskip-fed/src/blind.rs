//! Blinded entity keys: the organisations share a federation secret that the coordinator never
//! holds, and register HMAC-SHA256(secret, entity name) instead of the name. Equal names give
//! equal keys at every organisation, so the coordinator still aligns the entities they share
//! (FedE averages a row over its holders), but it learns no name: inverting a key needs the
//! secret (HMAC is a PRF; guessing names without the secret is no easier than guessing the
//! secret). The organisation keeps its real names: rows travel in the order of its keys, and
//! its outputs are written under its own names.
//!
//! What blinding does not hide: how many entities each organisation holds, and which keys two
//! organisations have in common (the overlap structure). A member holds the secret and can
//! blind any name it guesses.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::FedError;

/// Fewest bytes a federation secret may have (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// Where an organisation's federation secret comes from (`[client.blind_keys]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlindKeys {
    /// A file holding the secret (its text, trimmed), readable by the organisation only.
    pub secret_file: PathBuf,
}

/// Blinds entity names with one federation secret.
#[derive(Clone)]
pub struct KeyBlinder {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyBlinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBlinder(..)")
    }
}

impl KeyBlinder {
    /// `secret`: at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, FedError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(FedError::Config(format!(
                "the federation secret has {} bytes; at least {MIN_SECRET_BYTES} are needed",
                secret.len()
            )));
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|e| FedError::Config(format!("federation secret: {e}")))?;
        Ok(Self { mac })
    }

    /// Reads the secret from `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, FedError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FedError::Config(format!(
                "client.blind_keys.secret_file = {}: {e}",
                path.display()
            ))
        })?;
        Self::new(text.trim().as_bytes()).map_err(|e| {
            FedError::Config(format!(
                "client.blind_keys.secret_file = {}: {e}",
                path.display()
            ))
        })
    }

    /// The key an entity travels under: 64 hex digits of HMAC-SHA256(secret, name).
    pub fn blind(&self, name: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(name.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Every key, in order.
    pub fn blind_all(&self, names: &[String]) -> Vec<String> {
        names.iter().map(|n| self.blind(n)).collect()
    }
}

/// A new federation secret: 256 bits from the OS generator, hex.
pub fn new_secret() -> String {
    crate::auth::new_token().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2 has a 4-byte key (too short for us); case 4's key is 25 bytes.
        let key: Vec<u8> = (1..=25).collect();
        let blinder = KeyBlinder::new(&key).unwrap();
        let data = vec![0xcdu8; 50];
        let mut mac = blinder.mac.clone();
        mac.update(&data);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"
        );
    }

    #[test]
    fn same_secret_aligns_names_and_another_does_not() {
        let a = KeyBlinder::new(b"federation secret 1").unwrap();
        let b = KeyBlinder::new(b"federation secret 1").unwrap();
        let other = KeyBlinder::new(b"federation secret 2").unwrap();
        let names = vec!["dog.n.01".to_string(), "cat.n.01".to_string()];
        assert_eq!(a.blind_all(&names), b.blind_all(&names));
        assert_ne!(a.blind("dog.n.01"), other.blind("dog.n.01"));
        assert_ne!(a.blind("dog.n.01"), a.blind("cat.n.01"));
        let key = a.blind("dog.n.01");
        assert_eq!(key.len(), 64);
        assert!(!key.contains("dog"));
        assert!(KeyBlinder::new(b"short").is_err());
        assert_ne!(new_secret(), new_secret());
    }
}
