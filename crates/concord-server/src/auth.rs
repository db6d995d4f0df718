//! Bearer-token authentication with a small in-process cache.
//!
//! Heartbeats are the hot path and must not cost a database round trip, so a
//! resolved token is cached. Revocation on this replica drops the entry at once;
//! other replicas drop it when they read the `sys.token.revoked` event from the log
//! (see `tail.rs`), and every entry also ages out after [`CACHE_TTL`] as a backstop.
//! A std `RwLock`: held for a map lookup only, never across an await.

use crate::metrics::Metrics;
use concord_core::authz::Principal;
use concord_core::token::hash_secret;
use concord_core::{Error, Result};
use concord_store::DynStore;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// How long a resolved token is trusted without asking the store again. Longer
/// than the heartbeat interval (TTL/3, 5 s by default) by design: with a shorter
/// cache nearly every heartbeat would cost a token lookup, a database round trip
/// on PostgreSQL, on the hot path. Revocations do not wait for it: they reach
/// every replica through the log within milliseconds; this is the backstop.
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 100_000;

#[derive(Default)]
pub struct AuthCache {
    by_hash: RwLock<HashMap<String, (Principal, Instant)>>,
}

impl AuthCache {
    pub async fn authenticate(
        &self,
        store: &DynStore,
        metrics: &Metrics,
        secret: &str,
    ) -> Result<Principal> {
        self.authenticate_hash(store, metrics, hash_secret(secret))
            .await
    }

    /// Like [`authenticate`](Self::authenticate) for a token known by its hash only
    /// (a dashboard session keeps the hash, never the token).
    pub async fn authenticate_hash(
        &self,
        store: &DynStore,
        metrics: &Metrics,
        hash: String,
    ) -> Result<Principal> {
        if let Ok(map) = self.by_hash.read() {
            if let Some((p, at)) = map.get(&hash) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(p.clone());
                }
            }
        }
        metrics.token_lookups.fetch_add(1, Ordering::Relaxed);
        let principal = store
            .authenticate(&hash)
            .await?
            .ok_or_else(|| Error::unauthorized("unknown or revoked token"))?;
        if let Ok(mut map) = self.by_hash.write() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(hash, (principal.clone(), Instant::now()));
        }
        Ok(principal)
    }

    /// Caches a token this hub just created and so knows already (an instance's
    /// session token at registration): its first use, typically the instance's
    /// first heartbeat, then needs no lookup either.
    pub fn remember(&self, secret_hash: String, principal: Principal) {
        if let Ok(mut map) = self.by_hash.write() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(secret_hash, (principal, Instant::now()));
        }
    }

    /// Forgets a token (revoked) or every token of an instance (closed).
    pub fn forget(&self, token_id: Option<&str>, instance: Option<&str>) {
        if let Ok(mut map) = self.by_hash.write() {
            map.retain(|_, (p, _)| {
                token_id.is_none_or(|t| p.token_id != t)
                    && instance.is_none_or(|i| p.instance.as_deref() != Some(i))
            });
        }
    }
}
