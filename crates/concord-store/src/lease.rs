//! Resource leases (DESIGN §8), the store's side.
//!
//! An acquire checks every live lease for an overlap (`concord_core::lease`) and
//! writes the new one in the same transaction, serialized by the one
//! `lease_counter` row, which also hands out the fence: on SQLite by the single
//! writer, on PostgreSQL by locking that row `FOR UPDATE` first. A lease dies at its
//! TTL (`expire_leases`, run by the reaper) and with its holder instance (released
//! inside `end_instance` of both backends, the way task claims are).

use async_trait::async_trait;
use concord_core::api::Lease;
use concord_core::authz::Principal;
use concord_core::lease::{conflicts, LeaseMode};
use concord_core::{Error, ErrorCode, Result};
use serde_json::{json, Value};

pub const LEASE_ACQUIRED: &str = "sys.lease.acquired";
pub const LEASE_RENEWED: &str = "sys.lease.renewed";
pub const LEASE_RELEASED: &str = "sys.lease.released";
pub const LEASE_EXPIRED: &str = "sys.lease.expired";

/// A validated acquire, with the id chosen by the hub and the holder from the token.
#[derive(Debug, Clone)]
pub struct NewLease {
    pub id: String,
    /// Canonical form (`concord_core::lease::validate_resource`).
    pub resource: String,
    pub mode: LeaseMode,
    pub ttl_ms: i64,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
    pub holder: String,
    pub entity: Option<String>,
    pub token: String,
}

#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    /// Leases overlapping this resource.
    pub resource: Option<String>,
    pub holder: Option<String>,
}

#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Grants the lease, or `lease_conflict` with `details.conflicts` (the live
    /// holders' leases that overlap it). With an idempotency key the holder already
    /// used on a live lease, returns that lease and `true`.
    async fn acquire_lease(&self, l: NewLease) -> Result<(Lease, bool)>;
    /// Extends a live lease of `holder` to now + ttl.
    async fn renew_lease(&self, id: &str, holder: &str, ttl_ms: i64) -> Result<Lease>;
    /// Releases a live lease: by its holder, or with `holder: None` (admin force).
    async fn release_lease(
        &self,
        id: &str,
        holder: Option<&str>,
        actor: &Principal,
    ) -> Result<Lease>;
    /// Live leases (held, unexpired, holder live), oldest first.
    async fn list_leases(&self, filter: LeaseFilter) -> Result<Vec<Lease>>;
    /// Ends leases whose TTL has passed, with `sys.lease.expired`.
    async fn expire_leases(&self, limit: usize) -> Result<Vec<Lease>>;
}

/// The `lease_conflict` error for `new` against the live leases, if any conflict.
pub(crate) fn check_conflicts(new: &NewLease, live: &[Lease]) -> Result<()> {
    let hits: Vec<Value> = live
        .iter()
        .filter(|l| conflicts(new.mode, &new.resource, l.mode, &l.resource))
        .map(|l| {
            json!({"id": l.id, "resource": l.resource, "mode": l.mode, "holder": l.holder,
                   "entity": l.entity, "reason": l.reason, "expires_at": l.expires_at})
        })
        .collect();
    if hits.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorCode::LeaseConflict,
        format!(
            "{} {} overlaps {} live lease(s)",
            new.mode.as_str(),
            new.resource,
            hits.len()
        ),
    )
    .with_details(json!({ "conflicts": hits })))
}

pub(crate) fn filter_matches(f: &LeaseFilter, l: &Lease) -> bool {
    f.holder.as_ref().is_none_or(|h| &l.holder == h)
        && f.resource
            .as_ref()
            .is_none_or(|r| concord_core::lease::overlaps(r, &l.resource))
}

pub(crate) fn event_data(l: &Lease, extra: Value) -> Value {
    let mut v = json!({"id": l.id, "resource": l.resource, "mode": l.mode, "holder": l.holder,
                       "entity": l.entity, "fence": l.fence, "expires_at": l.expires_at, "reason": l.reason});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

pub(crate) fn not_held(id: &str) -> Error {
    Error::not_found(format!("no live lease {id}"))
}

/// Only the holder may renew or release its lease (admins force-release).
pub(crate) fn check_holder(l: &Lease, holder: Option<&str>) -> Result<()> {
    match holder {
        Some(h) if h != l.holder => Err(Error::forbidden(format!(
            "lease {} is held by {}, not {h}",
            l.id, l.holder
        ))),
        _ => Ok(()),
    }
}
