//! The PostgreSQL side of resource leases, one for one with `sqlite/lease.rs`.
//! An acquire locks the holder's instance row (`FOR SHARE`: it cannot end
//! meanwhile) and then the `lease_counter` row (`FOR UPDATE`), which serializes
//! acquires across replicas: the overlap check reads every lease committed before
//! it, and the counter gives the fence.

use super::*;
use crate::lease::*;
use crate::postgres::PostgresStore;
use async_trait::async_trait;
use concord_core::api::Lease;
use concord_core::lease::LeaseMode;
use concord_core::Result;

const COLS: &str =
    "l.id, l.resource, l.mode, l.holder, l.entity, l.fence, l.acquired_at, l.expires_at, l.reason";

fn from_row(r: &Row) -> R<Lease> {
    let mode: String = get(r, 2)?;
    Ok(Lease {
        id: get(r, 0)?,
        resource: get(r, 1)?,
        mode: LeaseMode::parse(&mode).unwrap_or(LeaseMode::Exclusive),
        holder: get(r, 3)?,
        entity: get(r, 4)?,
        fence: get::<i64>(r, 5)? as u64,
        acquired_at: Timestamp(get(r, 6)?),
        expires_at: Timestamp(get(r, 7)?),
        reason: get(r, 8)?,
    })
}

async fn query<C: GenericClient>(c: &C, sql: &str, p: Params<'_>) -> R<Vec<Lease>> {
    rows(c, sql, p).await?.iter().map(from_row).collect()
}

async fn live<C: GenericClient>(c: &C, now: i64) -> R<Vec<Lease>> {
    query(
        c,
        &format!("SELECT {COLS} FROM leases l JOIN instances i ON i.id = l.holder WHERE l.state = 'held' AND l.expires_at > $1 AND i.state = 'live' ORDER BY l.acquired_at, l.id"),
        &[&now],
    )
    .await
}

/// The live lease, its row locked.
async fn lock_held(t: &Tx<'_>, id: &str) -> R<Lease> {
    query(
        t.c,
        &format!("SELECT {COLS} FROM leases l WHERE l.id = $1 AND l.state = 'held' AND l.expires_at > $2 FOR UPDATE"),
        &[&id, &t.now],
    )
    .await?
    .pop()
    .ok_or_else(|| Fail::Done(not_held(id)))
}

async fn end(t: &Tx<'_>, id: &str, state: &str) -> R<()> {
    exec(
        t.c,
        "UPDATE leases SET state = $2, ended_at = $3 WHERE id = $1",
        &[&id, &state, &t.now],
    )
    .await?;
    Ok(())
}

async fn acquire(t: &mut Tx<'_>, n: &NewLease) -> R<(Lease, bool)> {
    let state = row_opt(
        t.c,
        "SELECT state FROM instances WHERE id = $1 FOR SHARE",
        &[&n.holder],
    )
    .await?
    .map(|r| get::<String>(&r, 0))
    .transpose()?;
    if state.as_deref() != Some(InstanceState::Live.as_str()) {
        return Err(Fail::Done(Error::unknown_instance(&n.holder)));
    }
    let fence: i64 = get(
        &row_one(
            t.c,
            "SELECT fence FROM lease_counter WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?,
        0,
    )?;
    if let Some(key) = &n.idempotency_key {
        let same = query(
            t.c,
            &format!("SELECT {COLS} FROM leases l WHERE l.holder = $1 AND l.idempotency_key = $2 AND l.state = 'held' AND l.expires_at > $3"),
            &[&n.holder, key, &t.now],
        )
        .await?;
        if let Some(l) = same.into_iter().next() {
            return Ok((l, true));
        }
    }
    check_conflicts(n, &live(t.c, t.now).await?)?;
    let fence = fence + 1;
    exec(
        t.c,
        "UPDATE lease_counter SET fence = $1 WHERE id = 1",
        &[&fence],
    )
    .await?;
    let expires = t.now + n.ttl_ms;
    exec(
        t.c,
        "INSERT INTO leases (id, resource, mode, holder, entity, fence, reason, idempotency_key, acquired_at, expires_at, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'held')",
        &[&n.id, &n.resource, &n.mode.as_str(), &n.holder, &n.entity, &fence, &n.reason, &n.idempotency_key, &t.now, &expires],
    )
    .await?;
    let lease = Lease {
        id: n.id.clone(),
        resource: n.resource.clone(),
        mode: n.mode,
        holder: n.holder.clone(),
        entity: n.entity.clone(),
        fence: fence as u64,
        acquired_at: Timestamp(t.now),
        expires_at: Timestamp(expires),
        reason: n.reason.clone(),
    };
    let source = EventSource {
        instance: Some(n.holder.clone()),
        entity: n.entity.clone(),
        token: Some(n.token.clone()),
    };
    t.event(LEASE_ACQUIRED, &source, event_data(&lease, json!({})));
    Ok((lease, false))
}

/// Releases every lease of an instance that ended: called from `end_instance`,
/// in its transaction (which holds the instance's row).
pub(crate) async fn release_holder(t: &mut Tx<'_>, instance: &str, reason: &str) -> R<()> {
    let leases = query(
        t.c,
        &format!("SELECT {COLS} FROM leases l WHERE l.holder = $1 AND l.state = 'held' ORDER BY l.id FOR UPDATE"),
        &[&instance],
    )
    .await?;
    for l in leases {
        end(t, &l.id, "holder_ended").await?;
        t.event(
            LEASE_RELEASED,
            &hub_source(),
            event_data(&l, json!({"why": "holder_ended", "detail": reason})),
        );
    }
    Ok(())
}

#[async_trait]
impl LeaseStore for PostgresStore {
    async fn acquire_lease(&self, l: NewLease) -> Result<(Lease, bool)> {
        self.inner
            .write(move |t| {
                let l = l.clone();
                Box::pin(async move { acquire(t, &l).await })
            })
            .await
    }

    async fn renew_lease(&self, id: &str, holder: &str, ttl_ms: i64) -> Result<Lease> {
        let (id, holder) = (id.to_string(), holder.to_string());
        self.inner
            .write(move |t| {
                let (id, holder) = (id.clone(), holder.clone());
                Box::pin(async move {
                    let mut l = lock_held(t, &id).await?;
                    check_holder(&l, Some(&holder))?;
                    l.expires_at = Timestamp(t.now + ttl_ms);
                    exec(
                        t.c,
                        "UPDATE leases SET expires_at = $2 WHERE id = $1",
                        &[&id, &l.expires_at.millis()],
                    )
                    .await?;
                    let source = EventSource {
                        instance: Some(holder.clone()),
                        entity: l.entity.clone(),
                        token: None,
                    };
                    t.event(LEASE_RENEWED, &source, event_data(&l, json!({})));
                    Ok(l)
                })
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
        self.inner
            .write(move |t| {
                let (id, holder, actor) = (id.clone(), holder.clone(), actor.clone());
                Box::pin(async move {
                    let l = lock_held(t, &id).await?;
                    check_holder(&l, holder.as_deref())?;
                    end(t, &id, "released").await?;
                    let why = if holder.is_some() {
                        "released"
                    } else {
                        "forced"
                    };
                    t.event(
                        LEASE_RELEASED,
                        &source_of(&actor),
                        event_data(&l, json!({"why": why, "by": actor.actor()})),
                    );
                    Ok(l)
                })
            })
            .await
    }

    async fn list_leases(&self, filter: LeaseFilter) -> Result<Vec<Lease>> {
        let c = self.inner.client().await?;
        async {
            let now = now_ms(&c).await?;
            R::Ok(
                live(&c, now)
                    .await?
                    .into_iter()
                    .filter(|l| filter_matches(&filter, l))
                    .collect(),
            )
        }
        .await
        .map_err(Error::from)
    }

    async fn expire_leases(&self, limit: usize) -> Result<Vec<Lease>> {
        self.inner
            .write(move |t| {
                Box::pin(async move {
                    let due = query(
                        t.c,
                        &format!("SELECT {COLS} FROM leases l WHERE l.state = 'held' AND l.expires_at <= $1 ORDER BY l.id LIMIT $2 FOR UPDATE SKIP LOCKED"),
                        &[&t.now, &limit_param(limit)],
                    )
                    .await?;
                    for l in &due {
                        end(t, &l.id, "expired").await?;
                        t.event(LEASE_EXPIRED, &hub_source(), event_data(l, json!({"why": "ttl"})));
                    }
                    exec(
                        t.c,
                        "DELETE FROM leases WHERE state <> 'held' AND ended_at < $1",
                        &[&(t.now - 86_400_000)],
                    )
                    .await?;
                    Ok(due)
                })
            })
            .await
    }
}
