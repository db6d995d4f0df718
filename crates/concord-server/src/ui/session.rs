//! Dashboard sessions: a random id in an `HttpOnly; SameSite=Strict` cookie, mapped
//! on the server to the hash of the token that logged in and a CSRF token.
//!
//! Why a server-side map and not the token itself in the cookie: the token is a
//! long-lived secret (an admin token works until revoked) and must not sit in the
//! browser; the session id is worthless after logout or [`LIFETIME`], and logout
//! really ends it. Why the token's *hash*: every request resolves the hash through
//! the same auth cache as bearer tokens, so revoking the token ends its dashboard
//! sessions too, on every replica that learns of the revocation. The map is per
//! hub process: behind several replicas, pin dashboard users to one (sticky
//! sessions) or log in again after a failover; a restart logs everyone out.

use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie's name.
pub const COOKIE: &str = "concord_ui";
/// The header that carries the session's CSRF token on every unsafe request.
pub const CSRF_HEADER: &str = "x-concord-csrf";
/// How long a session lasts after login, however active it is: short enough that
/// a forgotten browser tab does not stay an admin for days.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Live sessions kept at most; the oldest go first (a login flood cannot grow memory).
const MAX_SESSIONS: usize = 10_000;

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the token that logged in (the auth cache's key).
    pub token_hash: String,
    /// Sent back in the `X-Concord-CSRF` header (or the `csrf` form field) on every
    /// unsafe request: a cross-site page cannot read it, so it cannot forge one.
    pub csrf: String,
    expires_at: Instant,
}

/// Every live session of this hub process.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session; returns its id (the cookie value) and the session.
    pub fn create(&self, token_hash: String) -> (String, Session) {
        let id = random_hex();
        let session = Session {
            token_hash,
            csrf: random_hex(),
            expires_at: Instant::now() + LIFETIME,
        };
        if let Ok(mut map) = self.by_id.lock() {
            let now = Instant::now();
            map.retain(|_, s| s.expires_at > now);
            if map.len() >= MAX_SESSIONS {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, s)| s.expires_at)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
            map.insert(id.clone(), session.clone());
        }
        (id, session)
    }

    /// The live session with this id, if any.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.by_id.lock().ok()?;
        match map.get(id) {
            Some(s) if s.expires_at > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.by_id.lock() {
            map.remove(id);
        }
    }
}

/// 32 bytes from the operating system's generator, hex: unguessable.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The session id in a request's `Cookie` header(s).
pub fn cookie_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Compares a presented CSRF token with the session's in time independent of where
/// they differ, so the answer's timing does not leak the token byte by byte.
pub fn csrf_matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Set-Cookie` value that starts a session. `secure` when the browser reached
/// the hub over TLS (directly or through a proxy that says so).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends one.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn sessions_are_random_and_end_at_logout() {
        let s = Sessions::default();
        let (a, sa) = s.create("h1".into());
        let (b, sb) = s.create("h1".into());
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
        assert_eq!(a.len(), 64);
        assert_eq!(s.get(&a).map(|x| x.token_hash), Some("h1".into()));
        s.remove(&a);
        assert!(s.get(&a).is_none());
        assert!(s.get(&b).is_some());
        assert!(s.get("nope").is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            HeaderValue::from_static("a=1; concord_ui=abc ; b=2"),
        );
        assert_eq!(cookie_id(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            HeaderValue::from_static("concord_uix=1; concord_ui="),
        );
        assert_eq!(cookie_id(&h), None);
    }

    #[test]
    fn csrf_comparison_needs_the_exact_token() {
        assert!(csrf_matches("abcd", "abcd"));
        assert!(!csrf_matches("abcd", "abce"));
        assert!(!csrf_matches("abcd", "abc"));
        assert!(!csrf_matches("abcd", ""));
    }

    #[test]
    fn cookie_flags() {
        let c = set_cookie("x", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(!c.contains("Secure"));
        assert!(set_cookie("x", true).ends_with("; Secure"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
