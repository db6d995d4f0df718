//! Token secrets: 32 random bytes shown once, stored only as a SHA-256 hash, so a
//! leaked database never yields a usable credential.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Everything.
    Admin,
    /// Bound to one entity: may register instances of it.
    Agent,
    /// Read-only: dashboards, monitors.
    Reader,
    /// Issued at registration, bound to one instance; every later call by it uses it.
    Session,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Agent => "agent",
            TokenKind::Reader => "reader",
            TokenKind::Session => "session",
        }
    }
    pub fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "admin" => Some(TokenKind::Admin),
            "agent" => Some(TokenKind::Agent),
            "reader" => Some(TokenKind::Reader),
            "session" => Some(TokenKind::Session),
            _ => None,
        }
    }
}

/// A new secret, printable (hex), prefixed so that it is recognisable in a config file.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("cnc_{}", hex::encode(bytes))
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_hash_stably() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
    }
}
