//! The SQLite side of shared memory. Every write runs in the writer thread's
//! transaction, so check-then-write (fencing, dedup, the dimension of a space) is
//! atomic without locks, and memory-log positions are taken in commit order.

use super::ops::{append_event, ensure_entity, get_instance, live_primary, source_of, to_json};
use super::{db_err, SqliteStore};
use crate::memory::*;
use async_trait::async_trait;
use concord_core::api::Instance;
use concord_core::authz::Principal;
use concord_core::fencing::FenceView;
use concord_core::memory::{Circle, Owner, Space, TrustList, Visibility};
use concord_core::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};

fn cols(with_embedding: bool) -> String {
    format!(
        "{MEMORY_COLS}, {}",
        if with_embedding { "embedding" } else { "NULL" }
    )
}

fn row(r: &Row<'_>) -> rusqlite::Result<MemoryRow> {
    let js = |i: usize| -> rusqlite::Result<Value> {
        let s: String = r.get(i)?;
        Ok(serde_json::from_str(&s).unwrap_or(Value::Null))
    };
    Ok(MemoryRow {
        id: r.get(0)?,
        space: r.get(1)?,
        kind: r.get(2)?,
        text: r.get(3)?,
        tags: js(4)?,
        metadata: js(5)?,
        visibility: r.get(6)?,
        owner_instance: r.get(7)?,
        owner_entity: r.get(8)?,
        provenance: js(9)?,
        content_hash: r.get(10)?,
        version: r.get(11)?,
        supersedes: r.get(12)?,
        superseded_by: r.get(13)?,
        valid_at: r.get(14)?,
        invalid_at: r.get(15)?,
        created_at: r.get(16)?,
        seq: r.get(17)?,
        closed_seq: r.get(18)?,
        changed_seq: r.get(19)?,
        purged: r.get::<_, i64>(20)? != 0,
        embedding_dim: r.get(21)?,
        embedding: r.get(22)?,
    })
}

fn query(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<StoredMemory>> {
    let mut s = c.prepare_cached(sql).map_err(db_err)?;
    let rows = s.query_map(p, row).map_err(db_err)?;
    rows.map(|r| r.map(MemoryRow::into_stored))
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)
}

fn get(c: &Connection, id: &str) -> Result<Option<StoredMemory>> {
    Ok(query(
        c,
        &format!("SELECT {} FROM memories WHERE id = ?1", cols(false)),
        [id],
    )?
    .pop())
}

fn require(c: &Connection, id: &str) -> Result<StoredMemory> {
    get(c, id)?.ok_or_else(|| not_found(id))
}

/// The next memory-log position.
fn next_seq(c: &Connection) -> Result<i64> {
    super::recent::note_memory_moved();
    c.prepare_cached("UPDATE memory_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err)
}

pub(crate) fn last_memory_seq(c: &Connection) -> Result<i64> {
    c.query_row("SELECT seq FROM memory_counter WHERE id = 1", [], |r| {
        r.get(0)
    })
    .map_err(db_err)
}

fn space_dim(c: &Connection, space: &str) -> Result<Option<u32>> {
    c.query_row(
        "SELECT dim FROM memory_spaces WHERE space = ?1",
        [space],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map_err(db_err)
    .map(|d| d.map(|d| d as u32))
}

/// Checks (and on first use records) the space's embedding dimension.
fn check_dim(c: &Connection, space: &str, v: &[f32]) -> Result<()> {
    match space_dim(c, space)? {
        Some(d) if d as usize != v.len() => Err(dimension_mismatch(space, d, v.len())),
        Some(_) => Ok(()),
        None => {
            c.execute(
                "INSERT INTO memory_spaces (space, dim) VALUES (?1, ?2)",
                params![space, v.len() as i64],
            )
            .map_err(db_err)?;
            Ok(())
        }
    }
}

fn circle_exists(c: &Connection, name: &str) -> Result<bool> {
    c.query_row(
        "SELECT EXISTS(SELECT 1 FROM circles WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )
    .map_err(db_err)
}

/// Loads what [`check_space_write`] needs and applies it.
fn authorize_write(
    c: &Connection,
    now: i64,
    space: &Space,
    actor: &Principal,
    fence: Option<u64>,
    instance: Option<&Instance>,
) -> Result<()> {
    let primary;
    let fence_view = match space {
        Space::Entity(e) if !actor.is_admin() => {
            let (epoch, p) = live_primary(c, now, e)?;
            primary = p.map(|p| p.id);
            Some(FenceView {
                epoch,
                primary: primary.as_deref(),
            })
        }
        _ => None,
    };
    check_space_write(
        space,
        actor,
        fence,
        &WriteContext {
            now,
            instance,
            fence_view,
        },
    )
}

fn actor_instance(c: &Connection, actor: &Principal) -> Result<Option<Instance>> {
    match &actor.instance {
        Some(i) => get_instance(c, i),
        None => Ok(None),
    }
}

/// The entity of `instance:X` (for the owner of admin writes there).
fn space_owner(c: &Connection, actor: &Principal, space: &Space) -> Result<Owner> {
    let inst_entity = match space {
        Space::Instance(i) if actor.instance.is_none() => get_instance(c, i)?.map(|i| i.entity),
        _ => None,
    };
    Ok(Owner::of(
        actor.instance.as_deref(),
        actor.entity.as_deref(),
        space,
        inst_entity.as_deref(),
    ))
}

struct Insert<'a> {
    id: &'a str,
    lineage: &'a str,
    space: &'a Space,
    kind: &'a str,
    text: &'a str,
    tags: &'a [String],
    metadata: &'a Value,
    visibility: &'a Visibility,
    owner: &'a Owner,
    provenance: &'a concord_core::memory::Provenance,
    content_hash: &'a str,
    version: i64,
    supersedes: Option<&'a str>,
    valid_at: i64,
    seq: i64,
    embedding: Option<&'a [f32]>,
    embed_pending: bool,
    idem: Option<(&'a str, &'a str)>,
}

fn insert(c: &Connection, now: i64, m: &Insert<'_>) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO memories (id, lineage, space, kind, text, tags, metadata, visibility, owner_instance, owner_entity, \
         writer_instance, writer_entity, provenance, content_hash, version, supersedes, valid_at, created_at, seq, changed_seq, \
         purged, embedding, embedding_dim, embed_pending, idem_actor, idempotency_key) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?19, 0, ?20, ?21, ?22, ?23, ?24)",
    )
    .and_then(|mut s| {
        s.execute(params![
            m.id,
            m.lineage,
            m.space.to_string(),
            m.kind,
            m.text,
            to_json(&m.tags),
            to_json(m.metadata),
            m.visibility.to_string(),
            m.owner.instance,
            m.owner.entity,
            m.provenance.instance,
            m.provenance.entity,
            to_json(m.provenance),
            m.content_hash,
            m.version,
            m.supersedes,
            m.valid_at,
            now,
            m.seq,
            m.embedding.map(encode_vec),
            m.embedding.map(|v| v.len() as i64),
            (m.embedding.is_none() && m.embed_pending) as i64,
            m.idem.map(|x| x.0),
            m.idem.map(|x| x.1),
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

fn write_one(
    c: &Connection,
    now: i64,
    actor: &Principal,
    instance: Option<&Instance>,
    via: &str,
    m: &NewMemory,
    promoted_from: Option<String>,
) -> Result<Written> {
    authorize_write(c, now, &m.space, actor, m.fence, instance)?;
    let space = m.space.to_string();
    let idem_actor = actor.actor();
    if let Some(key) = &m.idempotency_key {
        let prior: Option<String> = c
            .query_row(
                "SELECT id FROM memories WHERE idem_actor = ?1 AND idempotency_key = ?2",
                params![idem_actor, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if let Some(id) = prior {
            return Ok(Written {
                memory: require(c, &id)?,
                deduplicated: true,
            });
        }
    }
    if let Visibility::Circle(name) = &m.visibility {
        if !circle_exists(c, name)? {
            return Err(no_circle(name));
        }
    }
    let dup = query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE space = ?1 AND content_hash = ?2 AND visibility = ?3 AND invalid_at IS NULL AND purged = 0 LIMIT 1",
            cols(false)
        ),
        params![space, m.content_hash, m.visibility.to_string()],
    )?
    .pop();
    if let Some(existing) = dup {
        return Ok(Written {
            memory: existing,
            deduplicated: true,
        });
    }
    if let Some(v) = &m.embedding {
        check_dim(c, &space, v)?;
    }
    let owner = space_owner(c, actor, &m.space)?;
    let prov = provenance(actor, instance, via, m.fence, promoted_from);
    let seq = next_seq(c)?;
    insert(
        c,
        now,
        &Insert {
            id: &m.id,
            lineage: &m.id,
            space: &m.space,
            kind: &m.kind,
            text: &m.text,
            tags: &m.tags,
            metadata: &m.metadata,
            visibility: &m.visibility,
            owner: &owner,
            provenance: &prov,
            content_hash: &m.content_hash,
            version: 1,
            supersedes: None,
            valid_at: m.valid_at.unwrap_or(now),
            seq,
            embedding: m.embedding.as_deref(),
            embed_pending: m.embed_pending,
            idem: m
                .idempotency_key
                .as_deref()
                .map(|k| (idem_actor.as_str(), k)),
        },
    )?;
    let stored = require(c, &m.id)?;
    let (topic, extra) = match &prov.promoted_from {
        Some(from) => (memory_topics::PROMOTED, json!({"promoted_from": from})),
        None => (memory_topics::CREATED, json!({})),
    };
    append_event(
        c,
        now,
        topic,
        &source_of(actor),
        event_data(&stored.memory, extra),
    )?;
    Ok(Written {
        memory: stored,
        deduplicated: false,
    })
}

fn write_memories(c: &Connection, now: i64, w: &MemoryWrite) -> Result<Vec<Written>> {
    let instance = actor_instance(c, &w.actor)?;
    w.memories
        .iter()
        .enumerate()
        .map(|(i, m)| {
            write_one(c, now, &w.actor, instance.as_ref(), &w.via, m, None)
                .map_err(|e| in_batch(e, w.batch, i))
        })
        .collect()
}

fn update(c: &Connection, now: i64, u: &MemoryUpdate) -> Result<StoredMemory> {
    let cur = require(c, &u.id)?;
    let space = Space::parse("space", &cur.memory.space)?;
    let instance = actor_instance(c, &u.actor)?;
    authorize_write(c, now, &space, &u.actor, u.fence, instance.as_ref())?;
    if !cur.memory.is_open() {
        return Err(closed_conflict(&cur.memory));
    }
    let old = &cur.memory;
    let kind = u.kind.clone().unwrap_or(old.kind.clone());
    let text = u.text.clone().unwrap_or(old.text.clone());
    let tags = u.tags.clone().unwrap_or(old.tags.clone());
    let metadata = u.metadata.clone().unwrap_or(old.metadata.clone());
    let visibility = match &u.visibility {
        Some(v) => v.clone(),
        None => Visibility::parse("visibility", &old.visibility)?,
    };
    if let Visibility::Circle(name) = &visibility {
        if !circle_exists(c, name)? {
            return Err(no_circle(name));
        }
    }
    // The vector follows the text: kept when the text is unchanged.
    let (embedding, pending): (Option<Vec<f32>>, bool) = match &u.embedding {
        Some(v) => (Some(v.clone()), false),
        None if text == old.text => {
            let (e, p): (Option<Vec<u8>>, i64) = c
                .query_row(
                    "SELECT embedding, embed_pending FROM memories WHERE id = ?1",
                    [&u.id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(db_err)?;
            (e.as_deref().map(decode_vec), p != 0)
        }
        None => (None, u.embed_pending),
    };
    if let Some(v) = &embedding {
        check_dim(c, &old.space, v)?;
    }
    let lineage: String = c
        .query_row("SELECT lineage FROM memories WHERE id = ?1", [&u.id], |r| {
            r.get(0)
        })
        .map_err(db_err)?;
    let hash = concord_core::memory::content_hash(&kind, &text, &tags, &metadata);
    let owner = space_owner(c, &u.actor, &space)?;
    let prov = provenance(&u.actor, instance.as_ref(), &u.via, u.fence, None);
    let seq = next_seq(c)?;
    c.execute(
        "UPDATE memories SET invalid_at = ?2, superseded_by = ?3, closed_seq = ?4, changed_seq = ?4 WHERE id = ?1",
        params![u.id, now, u.new_id, seq],
    )
    .map_err(db_err)?;
    insert(
        c,
        now,
        &Insert {
            id: &u.new_id,
            lineage: &lineage,
            space: &space,
            kind: &kind,
            text: &text,
            tags: &tags,
            metadata: &metadata,
            visibility: &visibility,
            owner: &owner,
            provenance: &prov,
            content_hash: &hash,
            version: old.version + 1,
            supersedes: Some(&u.id),
            valid_at: u.valid_at.unwrap_or(now),
            seq,
            embedding: embedding.as_deref(),
            embed_pending: pending,
            idem: None,
        },
    )?;
    let stored = require(c, &u.new_id)?;
    append_event(
        c,
        now,
        memory_topics::UPDATED,
        &source_of(&u.actor),
        event_data(&stored.memory, json!({"supersedes": u.id})),
    )?;
    Ok(stored)
}

fn close(c: &Connection, now: i64, x: &MemoryClose) -> Result<StoredMemory> {
    let cur = require(c, &x.id)?;
    if x.purge {
        if !x.actor.is_admin() {
            return Err(Error::forbidden("only an admin may purge a memory"));
        }
        if cur.memory.purged {
            return Ok(cur);
        }
        let lineage: String = c
            .query_row("SELECT lineage FROM memories WHERE id = ?1", [&x.id], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        let seq = next_seq(c)?;
        let n = c
            .execute(
                "UPDATE memories SET text = '', tags = '[]', metadata = '{}', embedding = NULL, embedding_dim = NULL, \
                 embed_pending = 0, purged = 1, invalid_at = COALESCE(invalid_at, ?2), closed_seq = COALESCE(closed_seq, ?3), \
                 changed_seq = ?3 WHERE lineage = ?1",
                params![lineage, now, seq],
            )
            .map_err(db_err)?;
        let stored = require(c, &x.id)?;
        append_event(
            c,
            now,
            memory_topics::PURGED,
            &source_of(&x.actor),
            event_data(&stored.memory, json!({"versions": n, "purge_seq": seq})),
        )?;
        return Ok(stored);
    }
    let space = Space::parse("space", &cur.memory.space)?;
    let instance = actor_instance(c, &x.actor)?;
    authorize_write(c, now, &space, &x.actor, x.fence, instance.as_ref())?;
    if !cur.memory.is_open() {
        return Ok(cur);
    }
    let seq = next_seq(c)?;
    c.execute(
        "UPDATE memories SET invalid_at = ?2, closed_seq = ?3, changed_seq = ?3 WHERE id = ?1",
        params![x.id, now, seq],
    )
    .map_err(db_err)?;
    let stored = require(c, &x.id)?;
    append_event(
        c,
        now,
        memory_topics::CLOSED,
        &source_of(&x.actor),
        event_data(&stored.memory, json!({"closed_seq": seq})),
    )?;
    Ok(stored)
}

fn history(c: &Connection, id: &str) -> Result<Vec<StoredMemory>> {
    query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE lineage = (SELECT lineage FROM memories WHERE id = ?1) ORDER BY version",
            cols(false)
        ),
        [id],
    )
}

fn by_seq(c: &Connection, seqs: &[i64]) -> Result<Vec<StoredMemory>> {
    query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE seq IN (SELECT value FROM json_each(?1))",
            cols(false)
        ),
        [to_json(&seqs)],
    )
}

fn changes(c: &Connection, after: i64, limit: usize) -> Result<Vec<StoredMemory>> {
    query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE changed_seq > ?1 ORDER BY changed_seq, seq LIMIT ?2",
            cols(true)
        ),
        params![after, limit as i64],
    )
}

fn pending(c: &Connection, limit: usize) -> Result<Vec<PendingEmbedding>> {
    let mut s = c
        .prepare_cached(
            "SELECT id, space, text FROM memories WHERE embed_pending = 1 AND purged = 0 ORDER BY seq LIMIT ?1",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map([limit as i64], |r| {
            Ok(PendingEmbedding {
                id: r.get(0)?,
                space: r.get(1)?,
                text: r.get(2)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

fn set_embeddings(c: &Connection, vectors: &[(String, Vec<f32>)]) -> Result<usize> {
    let mut n = 0;
    for (id, v) in vectors {
        let space: Option<String> = c
            .query_row(
                "SELECT space FROM memories WHERE id = ?1 AND embed_pending = 1 AND purged = 0",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        let Some(space) = space else { continue };
        let ok = concord_core::memory::embedding("embedding", v).is_ok()
            && check_dim(c, &space, v).is_ok();
        let seq = next_seq(c)?;
        if ok {
            c.execute(
                "UPDATE memories SET embedding = ?2, embedding_dim = ?3, embed_pending = 0, changed_seq = ?4 WHERE id = ?1",
                params![id, encode_vec(v), v.len() as i64, seq],
            )
            .map_err(db_err)?;
            n += 1;
        } else {
            tracing::warn!(memory = %id, dim = v.len(), "the embedder's vector does not fit its space; left without one");
            c.execute(
                "UPDATE memories SET embed_pending = 0, changed_seq = ?2 WHERE id = ?1",
                params![id, seq],
            )
            .map_err(db_err)?;
        }
    }
    Ok(n)
}

fn get_trust(c: &Connection, entity: &str) -> Result<TrustList> {
    let stored: Option<String> = c
        .query_row(
            "SELECT trusts FROM trust WHERE entity = ?1",
            [entity],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    Ok(trust_list(
        entity,
        stored.and_then(|s| serde_json::from_str(&s).ok()),
    ))
}

fn put_trust(
    c: &Connection,
    now: i64,
    entity: &str,
    trusts: &[String],
    actor: &Principal,
) -> Result<TrustList> {
    let primary = if actor.is_admin() {
        None
    } else {
        live_primary(c, now, entity)?.1.map(|p| p.id)
    };
    check_trust_writer(entity, actor, primary.as_deref())?;
    ensure_entity(c, now, entity)?;
    c.execute(
        "INSERT INTO trust (entity, trusts, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT(entity) DO UPDATE SET trusts = excluded.trusts, updated_at = excluded.updated_at",
        params![entity, to_json(&trusts), now],
    )
    .map_err(db_err)?;
    append_event(
        c,
        now,
        memory_topics::TRUST_CHANGED,
        &source_of(actor),
        json!({"entity": entity, "trusts": trusts}),
    )?;
    get_trust(c, entity)
}

fn list_circles(c: &Connection) -> Result<Vec<Circle>> {
    let mut s = c
        .prepare_cached("SELECT name, members FROM circles ORDER BY name")
        .map_err(db_err)?;
    let rows = s
        .query_map([], |r| {
            let m: String = r.get(1)?;
            Ok(Circle {
                name: r.get(0)?,
                members: serde_json::from_str(&m).unwrap_or_default(),
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

fn put_circle(
    c: &Connection,
    now: i64,
    name: &str,
    members: &[String],
    actor: &Principal,
) -> Result<Circle> {
    if !actor.is_admin() {
        return Err(Error::forbidden("only an admin may change circles"));
    }
    let mut members = members.to_vec();
    members.sort();
    members.dedup();
    c.execute(
        "INSERT INTO circles (name, members, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT(name) DO UPDATE SET members = excluded.members, updated_at = excluded.updated_at",
        params![name, to_json(&members), now],
    )
    .map_err(db_err)?;
    append_event(
        c,
        now,
        memory_topics::CIRCLE_CHANGED,
        &source_of(actor),
        json!({"circle": name, "members": members}),
    )?;
    Ok(Circle {
        name: name.into(),
        members,
    })
}

fn fork_of(c: &Connection, fork: &str) -> Result<(Instance, i64)> {
    let inst =
        get_instance(c, fork)?.ok_or_else(|| Error::not_found(format!("no instance {fork}")))?;
    match inst.fork_point {
        Some(p) if inst.role == concord_core::api::Role::Fork => Ok((inst, p)),
        _ => Err(Error::bad_field(
            "fork",
            format!("instance {fork} is not a fork"),
        )),
    }
}

fn fork_diff(c: &Connection, fork: &str) -> Result<ForkDiffRaw> {
    let (inst, point) = fork_of(c, fork)?;
    let branch = query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE space = ?1 AND invalid_at IS NULL AND purged = 0 ORDER BY seq",
            cols(false)
        ),
        [format!("instance:{fork}")],
    )?;
    let canonical_since = query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE space = ?1 AND (seq > ?2 OR closed_seq > ?2) ORDER BY seq",
            cols(false)
        ),
        params![format!("entity:{}", inst.entity), point],
    )?;
    Ok(ForkDiffRaw {
        fork: inst,
        fork_point: point,
        branch,
        canonical_since,
    })
}

fn promote(c: &Connection, now: i64, p: &MemoryPromote) -> Result<Vec<Written>> {
    let (inst, _) = fork_of(c, &p.fork)?;
    let branch = format!("instance:{}", p.fork);
    let instance = actor_instance(c, &p.actor)?;
    let mut out = Vec::with_capacity(p.memory_ids.len());
    for (i, (id, new_id)) in p.memory_ids.iter().zip(&p.new_ids).enumerate() {
        let field = format!("memory_ids[{i}]");
        let src = get(c, id)?
            .filter(|m| m.memory.space == branch)
            .ok_or_else(|| {
                Error::bad_field(
                    &field,
                    format!("{id} is not a memory of the fork's branch {branch}"),
                )
            })?;
        if !src.memory.is_open() {
            return Err(Error::bad_field(&field, format!("{id} is closed")));
        }
        let embedding: Option<Vec<u8>> = c
            .query_row("SELECT embedding FROM memories WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        let m = &src.memory;
        let new = NewMemory {
            id: new_id.clone(),
            space: Space::Entity(inst.entity.clone()),
            kind: m.kind.clone(),
            text: m.text.clone(),
            tags: m.tags.clone(),
            metadata: m.metadata.clone(),
            visibility: Visibility::parse("visibility", &m.visibility)?,
            embedding: embedding.as_deref().map(decode_vec),
            embed_pending: false,
            fence: p.fence,
            valid_at: Some(m.valid_at.millis()),
            idempotency_key: None,
            content_hash: m.content_hash.clone(),
        };
        out.push(write_one(
            c,
            now,
            &p.actor,
            instance.as_ref(),
            "promote",
            &new,
            Some(id.clone()),
        )?);
    }
    Ok(out)
}

#[async_trait]
impl MemoryStore for SqliteStore {
    async fn write_memories(&self, w: MemoryWrite) -> Result<Vec<Written>> {
        self.writer
            .write(move |c, now| write_memories(c, now, &w))
            .await
    }

    async fn update_memory(&self, u: MemoryUpdate) -> Result<StoredMemory> {
        self.writer.write(move |c, now| update(c, now, &u)).await
    }

    async fn close_memory(&self, x: MemoryClose) -> Result<StoredMemory> {
        self.writer.write(move |c, now| close(c, now, &x)).await
    }

    async fn get_memory(&self, id: &str) -> Result<Option<StoredMemory>> {
        let id = id.to_string();
        self.readers.read(move |c| get(c, &id)).await
    }

    async fn memory_history(&self, id: &str) -> Result<Vec<StoredMemory>> {
        let id = id.to_string();
        self.readers.read(move |c| history(c, &id)).await
    }

    async fn memories_by_seq(&self, seqs: &[i64]) -> Result<Vec<StoredMemory>> {
        let seqs = seqs.to_vec();
        self.readers.read(move |c| by_seq(c, &seqs)).await
    }

    async fn memory_changes(&self, after: i64, limit: usize) -> Result<Vec<StoredMemory>> {
        self.readers.read(move |c| changes(c, after, limit)).await
    }

    async fn last_memory_seq(&self) -> Result<i64> {
        self.readers.read(last_memory_seq).await
    }

    async fn space_dimension(&self, space: &str) -> Result<Option<u32>> {
        let space = space.to_string();
        self.readers.read(move |c| space_dim(c, &space)).await
    }

    async fn pending_embeddings(&self, limit: usize) -> Result<Vec<PendingEmbedding>> {
        self.readers.read(move |c| pending(c, limit)).await
    }

    async fn set_embeddings(&self, vectors: Vec<(String, Vec<f32>)>) -> Result<usize> {
        self.writer
            .write(move |c, _| set_embeddings(c, &vectors))
            .await
    }

    async fn put_trust(
        &self,
        entity: &str,
        trusts: Vec<String>,
        actor: &Principal,
    ) -> Result<TrustList> {
        let (e, a) = (entity.to_string(), actor.clone());
        self.writer
            .write(move |c, now| put_trust(c, now, &e, &trusts, &a))
            .await
    }

    async fn get_trust(&self, entity: &str) -> Result<TrustList> {
        let e = entity.to_string();
        self.readers.read(move |c| get_trust(c, &e)).await
    }

    async fn put_circle(
        &self,
        name: &str,
        members: Vec<String>,
        actor: &Principal,
    ) -> Result<Circle> {
        let (n, a) = (name.to_string(), actor.clone());
        self.writer
            .write(move |c, now| put_circle(c, now, &n, &members, &a))
            .await
    }

    async fn list_circles(&self) -> Result<Vec<Circle>> {
        self.readers.read(list_circles).await
    }

    async fn fork_diff(&self, fork: &str) -> Result<ForkDiffRaw> {
        let f = fork.to_string();
        self.readers.read(move |c| fork_diff(c, &f)).await
    }

    async fn promote(&self, p: MemoryPromote) -> Result<Vec<Written>> {
        self.writer.write(move |c, now| promote(c, now, &p)).await
    }
}
