//! The SQLite side of resource leases. The single writer serializes acquires, so
//! the overlap check and the insert cannot interleave with another acquire.

use super::ops::append_event;
use super::{db_err, SqliteStore};
use crate::lease::*;
use async_trait::async_trait;
use concord_core::api::{EventSource, InstanceState, Lease};
use concord_core::authz::Principal;
use concord_core::lease::LeaseMode;
use concord_core::{Error, Result, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::json;

const COLS: &str =
    "l.id, l.resource, l.mode, l.holder, l.entity, l.fence, l.acquired_at, l.expires_at, l.reason";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    let mode: String = r.get(2)?;
    Ok(Lease {
        id: r.get(0)?,
        resource: r.get(1)?,
        mode: LeaseMode::parse(&mode).unwrap_or(LeaseMode::Exclusive),
        holder: r.get(3)?,
        entity: r.get(4)?,
        fence: r.get::<_, i64>(5)? as u64,
        acquired_at: Timestamp(r.get(6)?),
        expires_at: Timestamp(r.get(7)?),
        reason: r.get(8)?,
    })
}

fn query(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<Lease>> {
    let mut s = c.prepare_cached(sql).map_err(db_err)?;
    let rows = s.query_map(p, from_row).map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// Held, unexpired leases of live holders.
fn live(c: &Connection, now: i64) -> Result<Vec<Lease>> {
    query(
        c,
        &format!("SELECT {COLS} FROM leases l JOIN instances i ON i.id = l.holder WHERE l.state = 'held' AND l.expires_at > ?1 AND i.state = 'live' ORDER BY l.acquired_at, l.id"),
        [now],
    )
}

fn held(c: &Connection, now: i64, id: &str) -> Result<Lease> {
    query(
        c,
        &format!("SELECT {COLS} FROM leases l WHERE l.id = ?1 AND l.state = 'held' AND l.expires_at > ?2"),
        params![id, now],
    )?
    .pop()
    .ok_or_else(|| not_held(id))
}

fn end(c: &Connection, now: i64, id: &str, state: &str) -> Result<()> {
    c.prepare_cached("UPDATE leases SET state = ?2, ended_at = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, state, now]))
        .map_err(db_err)?;
    Ok(())
}

fn acquire(c: &Connection, now: i64, n: &NewLease) -> Result<(Lease, bool)> {
    let holder_state: Option<String> = c
        .prepare_cached("SELECT state FROM instances WHERE id = ?1")
        .and_then(|mut s| s.query_row([&n.holder], |r| r.get(0)).optional())
        .map_err(db_err)?;
    if holder_state.as_deref() != Some(InstanceState::Live.as_str()) {
        return Err(Error::unknown_instance(&n.holder));
    }
    if let Some(key) = &n.idempotency_key {
        let same = query(
            c,
            &format!("SELECT {COLS} FROM leases l WHERE l.holder = ?1 AND l.idempotency_key = ?2 AND l.state = 'held' AND l.expires_at > ?3"),
            params![n.holder, key, now],
        )?;
        if let Some(l) = same.into_iter().next() {
            return Ok((l, true));
        }
    }
    check_conflicts(n, &live(c, now)?)?;
    let fence: i64 = c
        .prepare_cached("UPDATE lease_counter SET fence = fence + 1 WHERE id = 1 RETURNING fence")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err)?;
    let expires = now + n.ttl_ms;
    c.prepare_cached("INSERT INTO leases (id, resource, mode, holder, entity, fence, reason, idempotency_key, acquired_at, expires_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'held')")
        .and_then(|mut s| s.execute(params![n.id, n.resource, n.mode.as_str(), n.holder, n.entity, fence, n.reason, n.idempotency_key, now, expires]))
        .map_err(db_err)?;
    let lease = Lease {
        id: n.id.clone(),
        resource: n.resource.clone(),
        mode: n.mode,
        holder: n.holder.clone(),
        entity: n.entity.clone(),
        fence: fence as u64,
        acquired_at: Timestamp(now),
        expires_at: Timestamp(expires),
        reason: n.reason.clone(),
    };
    let source = EventSource {
        instance: Some(n.holder.clone()),
        entity: n.entity.clone(),
        token: Some(n.token.clone()),
    };
    append_event(
        c,
        now,
        LEASE_ACQUIRED,
        &source,
        event_data(&lease, json!({})),
    )?;
    Ok((lease, false))
}

/// Releases every lease of an instance that ended (closed or expired): called
/// from `end_instance`, in its transaction.
pub(crate) fn release_holder(c: &Connection, now: i64, instance: &str, reason: &str) -> Result<()> {
    let leases = query(
        c,
        &format!("SELECT {COLS} FROM leases l WHERE l.holder = ?1 AND l.state = 'held'"),
        [instance],
    )?;
    for l in leases {
        end(c, now, &l.id, "holder_ended")?;
        append_event(
            c,
            now,
            LEASE_RELEASED,
            &EventSource::default(),
            event_data(&l, json!({"why": "holder_ended", "detail": reason})),
        )?;
    }
    Ok(())
}

#[async_trait]
impl LeaseStore for SqliteStore {
    async fn acquire_lease(&self, l: NewLease) -> Result<(Lease, bool)> {
        self.writer.write(move |c, now| acquire(c, now, &l)).await
    }

    async fn renew_lease(&self, id: &str, holder: &str, ttl_ms: i64) -> Result<Lease> {
        let (id, holder) = (id.to_string(), holder.to_string());
        self.writer
            .write(move |c, now| {
                let mut l = held(c, now, &id)?;
                check_holder(&l, Some(&holder))?;
                l.expires_at = Timestamp(now + ttl_ms);
                c.prepare_cached("UPDATE leases SET expires_at = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id, l.expires_at.millis()]))
                    .map_err(db_err)?;
                let source = EventSource {
                    instance: Some(holder.clone()),
                    entity: l.entity.clone(),
                    token: None,
                };
                append_event(c, now, LEASE_RENEWED, &source, event_data(&l, json!({})))?;
                Ok(l)
            })
            .await
    }

    async fn release_lease(
        &self,
        id: &str,
        holder: Option<&str>,
        actor: &Principal,
    ) -> Result<Lease> {
        let (id, holder, actor) = (id.to_string(), holder.map(str::to_string), actor.clone());
        self.writer
            .write(move |c, now| {
                let l = held(c, now, &id)?;
                check_holder(&l, holder.as_deref())?;
                end(c, now, &id, "released")?;
                let source = EventSource {
                    instance: actor.instance.clone(),
                    entity: actor.entity.clone(),
                    token: Some(actor.token_id.clone()),
                };
                let why = if holder.is_some() {
                    "released"
                } else {
                    "forced"
                };
                append_event(
                    c,
                    now,
                    LEASE_RELEASED,
                    &source,
                    event_data(&l, json!({"why": why, "by": actor.actor()})),
                )?;
                Ok(l)
            })
            .await
    }

    async fn list_leases(&self, filter: LeaseFilter) -> Result<Vec<Lease>> {
        let now = concord_core::Timestamp::now().millis();
        self.readers
            .read(move |c| {
                Ok(live(c, now)?
                    .into_iter()
                    .filter(|l| filter_matches(&filter, l))
                    .collect())
            })
            .await
    }

    async fn expire_leases(&self, limit: usize) -> Result<Vec<Lease>> {
        self.writer
            .write(move |c, now| {
                let due = query(
                    c,
                    &format!("SELECT {COLS} FROM leases l WHERE l.state = 'held' AND l.expires_at <= ?1 ORDER BY l.expires_at LIMIT ?2"),
                    params![now, limit as i64],
                )?;
                for l in &due {
                    end(c, now, &l.id, "expired")?;
                    append_event(c, now, LEASE_EXPIRED, &EventSource::default(), event_data(l, json!({"why": "ttl"})))?;
                }
                // Ended leases are kept a day for the record, then dropped.
                c.prepare_cached("DELETE FROM leases WHERE state <> 'held' AND ended_at < ?1")
                    .and_then(|mut s| s.execute([now - 86_400_000]))
                    .map_err(db_err)?;
                Ok(due)
            })
            .await
    }
}
