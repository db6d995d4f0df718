//! The SQLite operations. Each write function runs inside the writer's group
//! transaction (under its own savepoint), so check-then-write is atomic: nothing
//! else writes between the check and the write.

use super::db_err;
use crate::model::{topics, *};
use concord_core::api::{
    EntityDetail, EntitySummary, Event, EventSource, Ghost, Instance, InstanceState,
    PatchInstanceRequest, PrimaryGrant, Resigned, Role, StateEntry, TokenInfo,
};
use concord_core::authz::Principal;
use concord_core::fencing::{check_fence, FenceView};
use concord_core::token::TokenKind;
use concord_core::{ids, presence, Error, ErrorCode, Result, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};

/// Ghost records re-announce on `sys.ghost` at most this often.
const GHOST_REANNOUNCE_MS: i64 = 60_000;
/// Ghost records are listed for this long after they were last seen.
const GHOST_LISTED_MS: i64 = 86_400_000;

// ---------- helpers ----------

pub(crate) fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned + Default>(s: &str) -> T {
    serde_json::from_str(s).unwrap_or_default()
}

pub(crate) fn append_event(
    c: &Connection,
    now: i64,
    topic: &str,
    source: &EventSource,
    data: Value,
) -> Result<i64> {
    let (source_json, data_json) = (to_json(source), to_json(&data));
    c.prepare_cached("INSERT INTO events (topic, time, source, data) VALUES (?1, ?2, ?3, ?4)")
        .and_then(|mut s| s.execute(params![topic, now, source_json, data_json]))
        .map_err(db_err)?;
    let seq = c.last_insert_rowid();
    let json_bytes = topic.len() + source_json.len() + data_json.len();
    super::recent::note_appended(json_bytes, || Event {
        seq,
        topic: topic.to_string(),
        time: Timestamp(now),
        source: source.clone(),
        data,
    });
    Ok(seq)
}

fn hub_source() -> EventSource {
    EventSource::default()
}

pub(crate) fn source_of(p: &Principal) -> EventSource {
    EventSource {
        instance: p.instance.clone(),
        entity: p.entity.clone(),
        token: Some(p.token_id.clone()),
    }
}

const INSTANCE_COLS: &str = "id, entity, role, label, state, persistent, capabilities, endpoint, host, version, forked_from, fork_point, meta, ttl_ms, registered_at, last_seen_at, lease_until";

fn instance_from_row(r: &Row<'_>) -> rusqlite::Result<Instance> {
    let role: String = r.get(2)?;
    let state: String = r.get(4)?;
    let caps: String = r.get(6)?;
    let meta: String = r.get(12)?;
    Ok(Instance {
        id: r.get(0)?,
        entity: r.get(1)?,
        role: Role::parse(&role).unwrap_or_default(),
        label: r.get(3)?,
        state: InstanceState::parse(&state).unwrap_or(InstanceState::Closed),
        persistent: r.get::<_, i64>(5)? != 0,
        capabilities: from_json(&caps),
        endpoint: r.get(7)?,
        host: r.get(8)?,
        version: r.get(9)?,
        forked_from: r.get(10)?,
        fork_point: r.get(11)?,
        meta: serde_json::from_str(&meta).unwrap_or_else(|_| json!({})),
        ttl_ms: r.get(13)?,
        registered_at: Timestamp(r.get(14)?),
        last_seen_at: Timestamp(r.get(15)?),
        lease_until: Timestamp(r.get(16)?),
    })
}

pub(crate) fn get_instance(c: &Connection, id: &str) -> Result<Option<Instance>> {
    c.prepare_cached(&format!(
        "SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row([id], instance_from_row).optional())
    .map_err(db_err)
}

/// What a write made as an instance needs of its row: who it is, its
/// capabilities as stored (JSON), and whether it may write. A narrow read for
/// the queue's hot paths (every enqueue and claim): `get_instance` also decodes
/// the metadata and the capabilities, which they do not use.
pub(crate) struct Actor {
    pub(crate) id: String,
    pub(crate) entity: String,
    pub(crate) capabilities_json: String,
    pub(crate) lease_until: i64,
    state: InstanceState,
    role: Role,
    label: Option<String>,
}

impl Actor {
    /// See `Instance::refuse_ghost`.
    pub(crate) fn refuse_ghost(&self) -> Result<()> {
        concord_core::api::refuse_ghost(&self.id, self.role, self.label.as_deref())
    }

    /// See `Instance::refuse_unless_writer`.
    pub(crate) fn refuse_unless_writer(&self) -> Result<()> {
        concord_core::api::refuse_unless_writer(
            &self.id,
            self.state,
            self.role,
            self.label.as_deref(),
        )
    }

    pub(crate) fn is_live(&self) -> bool {
        self.state == InstanceState::Live
    }
}

pub(crate) fn get_actor(c: &Connection, id: &str) -> Result<Option<Actor>> {
    c.prepare_cached(
        "SELECT entity, role, label, state, capabilities, lease_until FROM instances WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([id], |r| {
            let role: String = r.get(1)?;
            let state: String = r.get(3)?;
            Ok(Actor {
                id: id.to_string(),
                entity: r.get(0)?,
                role: Role::parse(&role).unwrap_or_default(),
                label: r.get(2)?,
                state: InstanceState::parse(&state).unwrap_or(InstanceState::Closed),
                capabilities_json: r.get(4)?,
                lease_until: r.get(5)?,
            })
        })
        .optional()
    })
    .map_err(db_err)
}

fn require_instance(c: &Connection, id: &str) -> Result<Instance> {
    get_instance(c, id)?.ok_or_else(|| Error::not_found(format!("no instance {id}")))
}

/// (epoch, primary) of an entity; (0, None) if it does not exist yet.
fn entity_row(c: &Connection, entity: &str) -> Result<Option<(u64, Option<String>)>> {
    c.prepare_cached("SELECT epoch, primary_instance FROM entities WHERE name = ?1")
        .and_then(|mut s| {
            s.query_row([entity], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                .optional()
        })
        .map_err(db_err)
}

pub(crate) fn ensure_entity(c: &Connection, now: i64, entity: &str) -> Result<()> {
    c.prepare_cached("INSERT OR IGNORE INTO entities (name, epoch, primary_instance, created_at) VALUES (?1, 0, NULL, ?2)")
        .and_then(|mut s| s.execute(params![entity, now]))
        .map_err(db_err)?;
    Ok(())
}

/// Ends an instance (expired or closed): releases its primary role and says so.
/// Task claims and resource leases of the instance are released here too.
fn end_instance(
    c: &Connection,
    now: i64,
    inst: &Instance,
    state: InstanceState,
    reason: &str,
) -> Result<Instance> {
    c.prepare_cached(
        "UPDATE instances SET state = ?2, ended_at = ?3 WHERE id = ?1 AND state = 'live'",
    )
    .and_then(|mut s| s.execute(params![inst.id, state.as_str(), now]))
    .map_err(db_err)?;
    if let Some((epoch, Some(primary))) = entity_row(c, &inst.entity)? {
        if primary == inst.id {
            c.execute(
                "UPDATE entities SET primary_instance = NULL WHERE name = ?1",
                [&inst.entity],
            )
            .map_err(db_err)?;
            append_event(
                c,
                now,
                topics::PRIMARY_RELEASED,
                &hub_source(),
                json!({"entity": inst.entity, "instance": inst.id, "epoch": epoch, "reason": reason}),
            )?;
        }
    }
    super::queue::release_claims(c, now, &inst.id)?;
    super::lease::release_holder(c, now, &inst.id, reason)?;
    let topic = match state {
        InstanceState::Closed => topics::INSTANCE_CLOSED,
        _ => topics::INSTANCE_EXPIRED,
    };
    append_event(
        c,
        now,
        topic,
        &hub_source(),
        json!({"instance": inst.id, "entity": inst.entity, "role": inst.role, "label": inst.label, "reason": reason}),
    )?;
    let mut ended = inst.clone();
    ended.state = state;
    Ok(ended)
}

/// Whether the instance holds a lease that has not run out (store clock).
fn is_live(inst: &Instance, now: i64) -> bool {
    inst.state == InstanceState::Live && inst.lease_until.millis() >= now
}

/// The live primary of an entity, expiring a holder whose durable lease lapsed.
pub(crate) fn live_primary(
    c: &Connection,
    now: i64,
    entity: &str,
) -> Result<(u64, Option<Instance>)> {
    let Some((epoch, primary)) = entity_row(c, entity)? else {
        return Ok((0, None));
    };
    let Some(pid) = primary else {
        return Ok((epoch, None));
    };
    match get_instance(c, &pid)? {
        Some(p) if is_live(&p, now) => Ok((epoch, Some(p))),
        Some(p) => {
            if p.state == InstanceState::Live {
                end_instance(c, now, &p, InstanceState::Expired, "lease lapsed")?;
            } else {
                c.execute(
                    "UPDATE entities SET primary_instance = NULL WHERE name = ?1",
                    [entity],
                )
                .map_err(db_err)?;
            }
            Ok((epoch, None))
        }
        None => Ok((epoch, None)),
    }
}

/// Grants the primary role in the current transaction.
fn grant_primary(
    c: &Connection,
    now: i64,
    entity: &str,
    inst: &Instance,
    topic: &str,
    from: Option<&str>,
) -> Result<PrimaryGrant> {
    let (epoch, _) = entity_row(c, entity)?.unwrap_or((0, None));
    let epoch = epoch + 1;
    c.execute(
        "UPDATE entities SET epoch = ?2, primary_instance = ?3 WHERE name = ?1",
        params![entity, epoch as i64, inst.id],
    )
    .map_err(db_err)?;
    c.execute(
        "UPDATE instances SET role = 'primary' WHERE id = ?1",
        [&inst.id],
    )
    .map_err(db_err)?;
    append_event(
        c,
        now,
        topic,
        &hub_source(),
        json!({"entity": entity, "instance": inst.id, "epoch": epoch, "from": from, "label": inst.label}),
    )?;
    Ok(PrimaryGrant {
        instance: inst.id.clone(),
        epoch,
        fence: epoch,
    })
}

fn primary_held(entity: &str, epoch: u64, holder: &Instance) -> Error {
    Error::new(ErrorCode::PrimaryHeld, format!("entity {entity} already has a live primary: {}", holder.id))
        .with_details(json!({"holder": holder.id, "label": holder.label, "epoch": epoch, "lease_until": holder.lease_until}))
}

// ---------- tokens ----------

const TOKEN_COLS: &str = "id, kind, entity, name, instance, created_at";

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenInfo> {
    let kind: String = r.get(1)?;
    Ok(TokenInfo {
        id: r.get(0)?,
        kind: TokenKind::parse(&kind).unwrap_or(TokenKind::Reader),
        entity: r.get(2)?,
        name: r.get(3)?,
        instance: r.get(4)?,
        created_at: Timestamp(r.get(5)?),
    })
}

pub(crate) fn bootstrap_admin(
    c: &Connection,
    now: i64,
    hash: &str,
    only_if_none: bool,
) -> Result<bool> {
    let exists: bool = c
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM tokens WHERE secret_hash = ?1 AND revoked_at IS NULL)",
            [hash],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if exists {
        return Ok(false);
    }
    if only_if_none {
        let any: bool = c
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM tokens WHERE kind = 'admin' AND revoked_at IS NULL)",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if any {
            return Ok(false);
        }
    }
    insert_token(
        c,
        now,
        &NewToken {
            id: ids::new_id(ids::TOKEN),
            kind: TokenKind::Admin,
            entity: None,
            name: Some("bootstrap".into()),
            instance: None,
            secret_hash: hash.into(),
        },
    )?;
    Ok(true)
}

fn insert_token(c: &Connection, now: i64, t: &NewToken) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO tokens (id, kind, entity, name, instance, secret_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| s.execute(params![t.id, t.kind.as_str(), t.entity, t.name, t.instance, t.secret_hash, now]))
    .map_err(db_err)?;
    Ok(())
}

pub(crate) fn create_token(c: &Connection, now: i64, t: &NewToken) -> Result<TokenInfo> {
    insert_token(c, now, t)?;
    append_event(
        c,
        now,
        topics::TOKEN_CREATED,
        &hub_source(),
        json!({"id": t.id, "kind": t.kind, "entity": t.entity, "name": t.name}),
    )?;
    Ok(TokenInfo {
        id: t.id.clone(),
        kind: t.kind,
        entity: t.entity.clone(),
        name: t.name.clone(),
        instance: t.instance.clone(),
        created_at: Timestamp(now),
    })
}

pub(crate) fn list_tokens(c: &Connection) -> Result<Vec<TokenInfo>> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLS} FROM tokens WHERE revoked_at IS NULL AND kind != 'session' ORDER BY id"
        ))
        .map_err(db_err)?;
    let rows = s.query_map([], token_from_row).map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

pub(crate) fn revoke_token(c: &Connection, now: i64, id: &str) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now],
        )
        .map_err(db_err)?;
    if n > 0 {
        append_event(
            c,
            now,
            topics::TOKEN_REVOKED,
            &hub_source(),
            json!({"id": id}),
        )?;
    }
    Ok(n > 0)
}

pub(crate) fn authenticate(c: &Connection, hash: &str) -> Result<Option<Principal>> {
    c.prepare_cached(
        "SELECT t.id, t.kind, COALESCE(t.entity, i.entity), t.instance FROM tokens t \
         LEFT JOIN instances i ON i.id = t.instance WHERE t.secret_hash = ?1 AND t.revoked_at IS NULL",
    )
    .and_then(|mut s| {
        s.query_row([hash], |r| {
            let kind: String = r.get(1)?;
            Ok(Principal {
                token_id: r.get(0)?,
                kind: TokenKind::parse(&kind).unwrap_or(TokenKind::Reader),
                entity: r.get(2)?,
                instance: r.get(3)?,
            })
        })
        .optional()
    })
    .map_err(db_err)
}

// ---------- instances ----------

pub(crate) fn register_instance(c: &Connection, now: i64, n: &NewInstance) -> Result<Registration> {
    let req = &n.request;
    ensure_entity(c, now, &req.entity)?;
    if let Some(limit) = n.max_live_per_entity {
        let live: i64 = c
            .prepare_cached("SELECT count(*) FROM instances WHERE entity = ?1 AND state = 'live'")
            .and_then(|mut s| s.query_row([&req.entity], |r| r.get(0)))
            .map_err(db_err)?;
        if live >= i64::from(limit) {
            return Err(too_many_instances(&req.entity, limit));
        }
    }
    if req.role == Role::Primary {
        let (epoch, holder) = live_primary(c, now, &req.entity)?;
        if let Some(h) = holder {
            return Err(primary_held(&req.entity, epoch, &h));
        }
    }
    if let Some(parent) = &req.forked_from {
        let p = require_instance(c, parent)
            .map_err(|_| Error::bad_field("forked_from", format!("no instance {parent}")))?;
        if p.entity != req.entity {
            return Err(Error::bad_field(
                "forked_from",
                "must be an instance of the same entity",
            ));
        }
    }
    let lease_until = presence::write_ahead(now, n.ttl_ms);
    // A fork's fork point is the memory-log position at registration: it reads
    // canonical memory as of there (DESIGN §5).
    let fork_point: Option<i64> = if req.role == Role::Fork {
        Some(super::memory::last_memory_seq(c)?)
    } else {
        None
    };
    let stored_role = if req.role == Role::Primary {
        Role::Secondary
    } else {
        req.role
    };
    c.prepare_cached(&format!(
        "INSERT INTO instances ({INSTANCE_COLS}, lease_owner) VALUES (?1, ?2, ?3, ?4, 'live', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?15, ?16)"
    ))
    .and_then(|mut s| {
        s.execute(params![
            n.id,
            req.entity,
            stored_role.as_str(),
            req.label,
            req.persistent as i64,
            to_json(&req.capabilities),
            req.endpoint,
            req.host,
            req.version,
            req.forked_from,
            fork_point,
            to_json(&req.meta),
            n.ttl_ms,
            now,
            lease_until,
            n.owner,
        ])
    })
    .map_err(db_err)?;
    insert_token(
        c,
        now,
        &NewToken {
            id: n.session_token_id.clone(),
            kind: TokenKind::Session,
            entity: Some(req.entity.clone()),
            name: req.label.clone(),
            instance: Some(n.id.clone()),
            secret_hash: n.session_secret_hash.clone(),
        },
    )?;
    let mut inst = require_instance(c, &n.id)?;
    append_event(
        c,
        now,
        topics::INSTANCE_REGISTERED,
        &EventSource {
            instance: Some(n.id.clone()),
            entity: Some(req.entity.clone()),
            token: Some(n.registered_by.clone()),
        },
        json!({"instance": n.id, "entity": req.entity, "role": req.role, "label": req.label, "host": req.host, "version": req.version, "capabilities": req.capabilities}),
    )?;
    if inst.is_unlabeled() && inst.role != Role::Primary && req.role != Role::Primary {
        record_ghost(
            c,
            now,
            &NewGhost {
                instance: Some(n.id.clone()),
                entity: Some(req.entity.clone()),
                reason: "unlabeled".into(),
                host: req.host.clone(),
            },
        )?;
    }
    let mut fence = None;
    if req.role == Role::Primary {
        let g = grant_primary(c, now, &req.entity, &inst, topics::PRIMARY_GRANTED, None)?;
        inst.role = Role::Primary;
        fence = Some(g.fence);
    }
    let (epoch, _) = entity_row(c, &req.entity)?.unwrap_or((0, None));
    Ok(Registration {
        instance: inst,
        epoch,
        fence,
    })
}

pub(crate) fn heartbeat(
    c: &Connection,
    now: i64,
    id: &str,
    owner: &str,
) -> Result<Result<DurableHeartbeat>> {
    let inst = get_instance(c, id)?;
    let reason = match &inst {
        None => Some("unknown_instance"),
        Some(i) if i.state == InstanceState::Closed => Some("closed"),
        Some(i) if i.state == InstanceState::Expired => Some("expired"),
        Some(i) if i.lease_until.millis() < now => {
            end_instance(c, now, i, InstanceState::Expired, "lease lapsed")?;
            Some("expired")
        }
        Some(_) => None,
    };
    if let Some(reason) = reason {
        record_ghost(
            c,
            now,
            &NewGhost {
                instance: Some(id.to_string()),
                entity: inst.as_ref().map(|i| i.entity.clone()),
                reason: reason.into(),
                host: inst.as_ref().and_then(|i| i.host.clone()),
            },
        )?;
        return Ok(Err(Error::unknown_instance(id)));
    }
    let Some(mut inst) = inst else {
        return Ok(Err(Error::unknown_instance(id)));
    };
    let lease_until = presence::write_ahead(now, inst.ttl_ms);
    c.prepare_cached(
        "UPDATE instances SET last_seen_at = ?2, lease_until = ?3, lease_owner = ?4 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, now, lease_until, owner]))
    .map_err(db_err)?;
    inst.last_seen_at = Timestamp(now);
    inst.lease_until = Timestamp(lease_until);
    let (epoch, primary) = entity_row(c, &inst.entity)?.unwrap_or((0, None));
    let fence = (primary.as_deref() == Some(id)).then_some(epoch);
    Ok(Ok(DurableHeartbeat {
        instance: inst,
        epoch,
        fence,
    }))
}

pub(crate) fn expire_owned(
    c: &Connection,
    now: i64,
    id: &str,
    owner: &str,
) -> Result<Option<Instance>> {
    let owned: Option<String> = c
        .query_row(
            "SELECT lease_owner FROM instances WHERE id = ?1 AND state = 'live'",
            [id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .flatten();
    if owned.as_deref() != Some(owner) {
        return Ok(None);
    }
    let inst = require_instance(c, id)?;
    end_instance(
        c,
        now,
        &inst,
        InstanceState::Expired,
        "no heartbeat within ttl",
    )
    .map(Some)
}

pub(crate) fn expire_due(c: &Connection, now: i64, limit: usize) -> Result<Vec<Instance>> {
    let due: Vec<Instance> = {
        let mut s = c
            .prepare_cached(&format!(
                "SELECT {INSTANCE_COLS} FROM instances WHERE state = 'live' AND lease_until < ?1 ORDER BY lease_until LIMIT ?2"
            ))
            .map_err(db_err)?;
        let rows = s
            .query_map(params![now, limit as i64], instance_from_row)
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    due.iter()
        .map(|i| end_instance(c, now, i, InstanceState::Expired, "lease lapsed"))
        .collect()
}

pub(crate) fn close_instance(
    c: &Connection,
    now: i64,
    id: &str,
    actor: &Principal,
) -> Result<Instance> {
    let inst = require_instance(c, id)?;
    if inst.state != InstanceState::Live {
        return Ok(inst);
    }
    let reason = if actor.instance.as_deref() == Some(id) {
        "closed by itself"
    } else {
        "closed by operator"
    };
    end_instance(c, now, &inst, InstanceState::Closed, reason)
}

pub(crate) fn update_instance(
    c: &Connection,
    now: i64,
    id: &str,
    p: &PatchInstanceRequest,
) -> Result<Instance> {
    let inst = require_instance(c, id)?;
    if inst.state != InstanceState::Live {
        return Err(Error::unknown_instance(id));
    }
    let label = p.label.clone().or(inst.label.clone());
    let caps = p.capabilities.clone().unwrap_or(inst.capabilities.clone());
    let endpoint = p.endpoint.clone().or(inst.endpoint.clone());
    let meta = p.meta.clone().unwrap_or(inst.meta.clone());
    c.execute(
        "UPDATE instances SET label = ?2, capabilities = ?3, endpoint = ?4, meta = ?5 WHERE id = ?1",
        params![id, label, to_json(&caps), endpoint, to_json(&meta)],
    )
    .map_err(db_err)?;
    if p.label.is_some() {
        c.execute(
            "DELETE FROM ghosts WHERE instance = ?1 AND reason = 'unlabeled'",
            [id],
        )
        .map_err(db_err)?;
    }
    append_event(
        c,
        now,
        topics::INSTANCE_UPDATED,
        &hub_source(),
        json!({"instance": id, "entity": inst.entity, "label": label, "capabilities": caps, "endpoint": endpoint}),
    )?;
    require_instance(c, id)
}

pub(crate) fn list_instances(c: &Connection, f: &InstanceFilter) -> Result<Vec<Instance>> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {INSTANCE_COLS} FROM instances WHERE (?1 IS NULL OR entity = ?1) AND (?2 IS NULL OR role = ?2) \
             AND (?3 IS NULL OR state = ?3) ORDER BY entity, registered_at, id"
        ))
        .map_err(db_err)?;
    let rows = s
        .query_map(
            params![
                f.entity,
                f.role.map(Role::as_str),
                f.state.map(InstanceState::as_str)
            ],
            instance_from_row,
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

pub(crate) fn record_ghost(c: &Connection, now: i64, g: &NewGhost) -> Result<()> {
    let key = format!(
        "{}:{}",
        g.reason,
        g.instance.as_deref().or(g.entity.as_deref()).unwrap_or("?")
    );
    let prev: Option<i64> = c
        .query_row("SELECT seen_at FROM ghosts WHERE key = ?1", [&key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db_err)?;
    c.prepare_cached(
        "INSERT INTO ghosts (key, instance, entity, reason, host, first_seen, seen_at, count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1) \
         ON CONFLICT(key) DO UPDATE SET seen_at = excluded.seen_at, count = count + 1, host = COALESCE(excluded.host, host)",
    )
    .and_then(|mut s| s.execute(params![key, g.instance, g.entity, g.reason, g.host, now]))
    .map_err(db_err)?;
    if prev.is_none_or(|p| now - p > GHOST_REANNOUNCE_MS) {
        append_event(
            c,
            now,
            topics::GHOST,
            &hub_source(),
            json!({"instance": g.instance, "entity": g.entity, "reason": g.reason, "host": g.host}),
        )?;
    }
    Ok(())
}

pub(crate) fn list_ghosts(c: &Connection, now: i64) -> Result<Vec<Ghost>> {
    let mut s = c
        .prepare_cached(
            "SELECT g.instance, g.entity, g.reason, g.seen_at, g.host FROM ghosts g \
             WHERE g.reason != 'unlabeled' AND g.seen_at > ?1 \
             UNION ALL \
             SELECT i.id, i.entity, 'unlabeled', i.last_seen_at, i.host FROM instances i \
             WHERE i.state = 'live' AND i.role != 'primary' AND (i.label IS NULL OR trim(i.label) = '') \
             ORDER BY 4 DESC",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map([now - GHOST_LISTED_MS], |r| {
            Ok(Ghost {
                instance: r.get(0)?,
                entity: r.get(1)?,
                reason: r.get(2)?,
                seen_at: Timestamp(r.get(3)?),
                host: r.get(4)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

// ---------- entities and primaries ----------

pub(crate) fn list_entities(c: &Connection) -> Result<Vec<EntitySummary>> {
    let mut s = c
        .prepare_cached(
            "SELECT e.name, e.epoch, e.primary_instance, \
             (SELECT count(*) FROM instances i WHERE i.entity = e.name AND i.state = 'live') \
             FROM entities e ORDER BY e.name",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map([], |r| {
            Ok(EntitySummary {
                name: r.get(0)?,
                epoch: r.get::<_, i64>(1)? as u64,
                primary: r.get(2)?,
                live_instances: r.get::<_, i64>(3)? as u64,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

pub(crate) fn get_entity(c: &Connection, entity: &str) -> Result<Option<EntityDetail>> {
    let Some((epoch, primary)) = entity_row(c, entity)? else {
        return Ok(None);
    };
    let instances = list_instances(
        c,
        &InstanceFilter {
            entity: Some(entity.into()),
            role: None,
            state: Some(InstanceState::Live),
        },
    )?;
    let primary = primary.and_then(|p| instances.iter().find(|i| i.id == p).cloned());
    Ok(Some(EntityDetail {
        name: entity.into(),
        epoch,
        primary,
        instances,
    }))
}

pub(crate) fn entity_epoch(c: &Connection, entity: &str) -> Result<(u64, Option<String>)> {
    Ok(entity_row(c, entity)?.unwrap_or((0, None)))
}

fn live_member(c: &Connection, now: i64, entity: &str, id: &str, field: &str) -> Result<Instance> {
    let inst = get_instance(c, id)?.ok_or_else(|| Error::unknown_instance(id))?;
    if inst.entity != entity {
        return Err(Error::bad_field(
            field,
            format!(
                "instance {id} belongs to entity {}, not {entity}",
                inst.entity
            ),
        ));
    }
    if !is_live(&inst, now) {
        return Err(Error::unknown_instance(id));
    }
    Ok(inst)
}

pub(crate) fn campaign(c: &Connection, now: i64, entity: &str, id: &str) -> Result<PrimaryGrant> {
    let inst = live_member(c, now, entity, id, "instance")?;
    let (epoch, holder) = live_primary(c, now, entity)?;
    match holder {
        Some(h) if h.id == id => Ok(PrimaryGrant {
            instance: h.id,
            epoch,
            fence: epoch,
        }),
        Some(h) => Err(primary_held(entity, epoch, &h)),
        None => grant_primary(c, now, entity, &inst, topics::PRIMARY_GRANTED, None),
    }
}

pub(crate) fn resign(c: &Connection, now: i64, entity: &str, id: Option<&str>) -> Result<Resigned> {
    let (epoch, holder) = live_primary(c, now, entity)?;
    let Some(h) = holder else {
        return Err(Error::conflict(format!(
            "entity {entity} has no live primary"
        )));
    };
    if let Some(id) = id {
        if h.id != id {
            return Err(Error::fenced(
                epoch,
                format!("instance {id} is not the primary of {entity}"),
            ));
        }
    }
    c.execute(
        "UPDATE entities SET primary_instance = NULL WHERE name = ?1",
        [entity],
    )
    .map_err(db_err)?;
    c.execute(
        "UPDATE instances SET role = 'secondary' WHERE id = ?1",
        [&h.id],
    )
    .map_err(db_err)?;
    append_event(
        c,
        now,
        topics::PRIMARY_RELEASED,
        &hub_source(),
        json!({"entity": entity, "instance": h.id, "epoch": epoch, "reason": "resigned"}),
    )?;
    Ok(Resigned {
        instance: h.id,
        epoch,
    })
}

pub(crate) fn transfer(
    c: &Connection,
    now: i64,
    entity: &str,
    from: Option<&str>,
    to: &str,
) -> Result<PrimaryGrant> {
    let target = live_member(c, now, entity, to, "to")?;
    let (epoch, holder) = live_primary(c, now, entity)?;
    if let Some(from) = from {
        if holder.as_ref().map(|h| h.id.as_str()) != Some(from) {
            return Err(Error::fenced(
                epoch,
                format!("instance {from} is not the primary of {entity}"),
            ));
        }
    }
    if holder.as_ref().is_some_and(|h| h.id == to) {
        return Ok(PrimaryGrant {
            instance: to.into(),
            epoch,
            fence: epoch,
        });
    }
    if let Some(h) = &holder {
        c.execute(
            "UPDATE instances SET role = 'secondary' WHERE id = ?1",
            [&h.id],
        )
        .map_err(db_err)?;
    }
    grant_primary(
        c,
        now,
        entity,
        &target,
        topics::PRIMARY_TRANSFERRED,
        holder.as_ref().map(|h| h.id.as_str()),
    )
}

pub(crate) fn route(
    c: &Connection,
    now: i64,
    entity: &str,
    version: Option<&str>,
) -> Result<Option<Instance>> {
    let (_, primary) = entity_row(c, entity)?.unwrap_or((0, None));
    let live = list_instances(
        c,
        &InstanceFilter {
            entity: Some(entity.into()),
            role: None,
            state: Some(InstanceState::Live),
        },
    )?;
    let live: Vec<Instance> = live
        .into_iter()
        .filter(|i| i.lease_until.millis() >= now)
        .collect();
    let is_primary = |i: &Instance| primary.as_deref() == Some(i.id.as_str());
    let candidates: Vec<&Instance> = match version {
        None => live.iter().filter(|i| is_primary(i)).collect(),
        Some(v) => live
            .iter()
            .filter(|i| i.version.as_deref() == Some(v))
            .collect(),
    };
    Ok(candidates
        .iter()
        .find(|i| is_primary(i))
        .or(candidates.first())
        .map(|i| (*i).clone()))
}

// ---------- entity state ----------

fn state_from_row(r: &Row<'_>) -> rusqlite::Result<StateEntry> {
    let v: String = r.get(1)?;
    Ok(StateEntry {
        key: r.get(0)?,
        value: serde_json::from_str(&v).unwrap_or(Value::Null),
        revision: r.get(2)?,
        updated_by: r.get(3)?,
        updated_at: Timestamp(r.get(4)?),
    })
}

pub(crate) fn get_state(c: &Connection, entity: &str, key: &str) -> Result<Option<StateEntry>> {
    c.prepare_cached("SELECT key, value, revision, updated_by, updated_at FROM entity_state WHERE entity = ?1 AND key = ?2")
        .and_then(|mut s| s.query_row([entity, key], state_from_row).optional())
        .map_err(db_err)
}

pub(crate) fn list_state(c: &Connection, entity: &str) -> Result<Vec<StateEntry>> {
    let mut s = c
        .prepare_cached("SELECT key, value, revision, updated_by, updated_at FROM entity_state WHERE entity = ?1 ORDER BY key")
        .map_err(db_err)?;
    let rows = s.query_map([entity], state_from_row).map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// The fencing and compare-and-set checks shared by put and delete.
fn check_state_write(
    c: &Connection,
    now: i64,
    entity: &str,
    key: &str,
    fence: Option<u64>,
    if_revision: Option<i64>,
    actor: &Principal,
) -> Result<Option<StateEntry>> {
    if actor.is_admin() {
        ensure_entity(c, now, entity)?;
    } else {
        let writer = actor.instance.as_deref().unwrap_or("");
        let (epoch, primary) = live_primary(c, now, entity)?;
        check_fence(
            FenceView {
                epoch,
                primary: primary.as_ref().map(|p| p.id.as_str()),
            },
            writer,
            fence,
        )?;
    }
    let current = get_state(c, entity, key)?;
    if let Some(want) = if_revision {
        let have = current.as_ref().map(|s| s.revision).unwrap_or(0);
        if have != want {
            return Err(
                Error::conflict(format!("{key} is at revision {have}, not {want}"))
                    .with_details(json!({"key": key, "revision": have})),
            );
        }
    }
    Ok(current)
}

pub(crate) fn put_state(c: &Connection, now: i64, w: &StateWrite) -> Result<StateEntry> {
    check_state_write(c, now, &w.entity, &w.key, w.fence, w.if_revision, &w.actor)?;
    let by = w.actor.actor();
    let revision = append_event(
        c,
        now,
        topics::STATE_CHANGED,
        &source_of(&w.actor),
        json!({"entity": w.entity, "key": w.key, "updated_by": by, "fence": w.fence, "deleted": false}),
    )?;
    c.prepare_cached(
        "INSERT INTO entity_state (entity, key, value, revision, updated_by, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT(entity, key) DO UPDATE SET value = excluded.value, revision = excluded.revision, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute(params![w.entity, w.key, to_json(&w.value), revision, by, now]))
    .map_err(db_err)?;
    Ok(StateEntry {
        key: w.key.clone(),
        value: w.value.clone(),
        revision,
        updated_by: by,
        updated_at: Timestamp(now),
    })
}

pub(crate) fn delete_state(c: &Connection, now: i64, w: &StateDelete) -> Result<bool> {
    let current = check_state_write(c, now, &w.entity, &w.key, w.fence, w.if_revision, &w.actor)?;
    if current.is_none() {
        return Ok(false);
    }
    c.execute(
        "DELETE FROM entity_state WHERE entity = ?1 AND key = ?2",
        [&w.entity, &w.key],
    )
    .map_err(db_err)?;
    append_event(
        c,
        now,
        topics::STATE_CHANGED,
        &source_of(&w.actor),
        json!({"entity": w.entity, "key": w.key, "updated_by": w.actor.actor(), "fence": w.fence, "deleted": true}),
    )?;
    Ok(true)
}

// ---------- events ----------

pub(crate) fn read_events(c: &Connection, after: i64, limit: usize) -> Result<Vec<Event>> {
    let mut s = c
        .prepare_cached("SELECT seq, topic, time, source, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .map_err(db_err)?;
    let rows = s
        .query_map(params![after, limit as i64], |r| {
            let source: String = r.get(3)?;
            let data: String = r.get(4)?;
            Ok(Event {
                seq: r.get(0)?,
                topic: r.get(1)?,
                time: Timestamp(r.get(2)?),
                source: from_json(&source),
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

pub(crate) fn last_event_seq(c: &Connection) -> Result<i64> {
    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
        .map_err(db_err)
}
