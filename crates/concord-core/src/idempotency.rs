//! Idempotency keys of event publishes and observations.
//!
//! A client that lost a reply (the hub died after committing) or that replays its
//! offline spool sends the same write again with the same key; the hub answers as
//! before instead of applying it twice. Keys are scoped so that one caller can
//! never collide with, or probe for, another caller's keys: by the caller's
//! entity when it has one (so an instance that was re-registered under a new
//! session still finds the keys its earlier session used), else by its token.

use crate::authz::Principal;
use crate::error::Error;

/// Longest key accepted (the same bound as memory writes').
pub const MAX_KEY_LEN: usize = crate::memory::MAX_IDEMPOTENCY_KEY_LEN;

/// Which feature a key belongs to: the same key may be used once per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Event,
    Observation,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Event => "event",
            KeyKind::Observation => "observation",
        }
    }
}

/// The namespace a caller's keys live in.
pub fn scope(p: &Principal) -> String {
    match &p.entity {
        Some(e) => format!("entity:{e}"),
        None => format!("token:{}", p.token_id),
    }
}

/// A key must be 1..=[`MAX_KEY_LEN`] bytes of printable ASCII: it is echoed in
/// logs and compared byte for byte on both backends.
pub fn validate_key(field: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be 1 to {MAX_KEY_LEN} bytes"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::bad_field(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenKind;

    fn principal(entity: Option<&str>, instance: Option<&str>) -> Principal {
        Principal {
            token_id: "tok_1".into(),
            kind: TokenKind::Agent,
            entity: entity.map(str::to_string),
            instance: instance.map(str::to_string),
        }
    }

    #[test]
    fn scope_is_the_entity_across_sessions_else_the_token() {
        assert_eq!(
            scope(&principal(Some("sisters"), Some("ins_a"))),
            scope(&principal(Some("sisters"), Some("ins_b")))
        );
        assert_eq!(scope(&principal(Some("sisters"), None)), "entity:sisters");
        assert_eq!(scope(&principal(None, None)), "token:tok_1");
        assert_ne!(
            scope(&principal(Some("a"), None)),
            scope(&principal(Some("b"), None))
        );
    }

    #[test]
    fn keys_are_bounded_printable_ascii() {
        assert!(validate_key("k", "spool_01J0000000000000000000000").is_ok());
        for bad in ["", "has space", "tab\t", "é"] {
            let e = validate_key("idempotency_key", bad).unwrap_err();
            assert_eq!(e.details["field"], "idempotency_key", "{bad:?}");
        }
        assert!(validate_key("k", &"x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_key("k", &"x".repeat(MAX_KEY_LEN + 1)).is_err());
    }
}
