//! The PostgreSQL side of shared memory, one for one with `sqlite/memory.rs`.
//! A child of `ops` so it shares its transaction type and helpers.
//!
//! Locks, in the order of the module docs of `postgres`: the entity rows of the
//! canonical spaces written (in name order, before anything else), then the
//! `memory_counter` row, held to COMMIT. The counter row makes memory writers
//! commit one after another, so memory-log positions become visible in position
//! order (DESIGN §2) and the dedup, idempotency and dimension checks see every
//! earlier write. Event seqs, taken at flush, take no lock (`postgres::horizon`).

use super::*;
use crate::memory::*;
use crate::postgres::PostgresStore;
use async_trait::async_trait;
use concord_core::memory::{Circle, Owner, Space, TrustList, Visibility};
use concord_core::Result;

fn cols(with_embedding: bool) -> String {
    format!(
        "{MEMORY_COLS}, {}",
        if with_embedding {
            "embedding"
        } else {
            "NULL::bytea"
        }
    )
}

fn mrow(r: &Row) -> R<MemoryRow> {
    let js = |i: usize| -> R<Value> { Ok(get::<Option<Value>>(r, i)?.unwrap_or(Value::Null)) };
    Ok(MemoryRow {
        id: get(r, 0)?,
        space: get(r, 1)?,
        kind: get(r, 2)?,
        text: get(r, 3)?,
        tags: js(4)?,
        metadata: js(5)?,
        visibility: get(r, 6)?,
        owner_instance: get(r, 7)?,
        owner_entity: get(r, 8)?,
        provenance: js(9)?,
        content_hash: get(r, 10)?,
        version: get(r, 11)?,
        supersedes: get(r, 12)?,
        superseded_by: get(r, 13)?,
        valid_at: get(r, 14)?,
        invalid_at: get(r, 15)?,
        created_at: get(r, 16)?,
        seq: get(r, 17)?,
        closed_seq: get(r, 18)?,
        changed_seq: get(r, 19)?,
        purged: get(r, 20)?,
        embedding_dim: get::<Option<i32>>(r, 21)?.map(i64::from),
        embedding: get(r, 22)?,
    })
}

async fn query<C: GenericClient>(c: &C, sql: &str, p: Params<'_>) -> R<Vec<StoredMemory>> {
    rows(c, sql, p)
        .await?
        .iter()
        .map(|r| mrow(r).map(MemoryRow::into_stored))
        .collect()
}

async fn get_mem<C: GenericClient>(c: &C, id: &str) -> R<Option<StoredMemory>> {
    Ok(query(
        c,
        &format!("SELECT {} FROM memories WHERE id = $1", cols(false)),
        &[&id],
    )
    .await?
    .pop())
}

async fn require<C: GenericClient>(c: &C, id: &str) -> R<StoredMemory> {
    get_mem(c, id)
        .await?
        .ok_or_else(|| Fail::Done(not_found(id)))
}

/// Locks the memory log until COMMIT (see the module docs).
async fn lock_log(t: &Tx<'_>) -> R<()> {
    row_one(
        t.c,
        "SELECT seq FROM memory_counter WHERE id = 1 FOR UPDATE",
        &[],
    )
    .await?;
    Ok(())
}

async fn next_seq(t: &Tx<'_>) -> R<i64> {
    get(
        &row_one(
            t.c,
            "UPDATE memory_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq",
            &[],
        )
        .await?,
        0,
    )
}

pub(crate) async fn last_memory_seq<C: GenericClient>(c: &C) -> R<i64> {
    get(
        &row_one(c, "SELECT seq FROM memory_counter WHERE id = 1", &[]).await?,
        0,
    )
}

async fn space_dim<C: GenericClient>(c: &C, space: &str) -> R<Option<u32>> {
    row_opt(
        c,
        "SELECT dim FROM memory_spaces WHERE space = $1",
        &[&space],
    )
    .await?
    .map(|r| get::<i32>(&r, 0).map(|d| d as u32))
    .transpose()
}

async fn check_dim(t: &Tx<'_>, space: &str, v: &[f32]) -> R<()> {
    match space_dim(t.c, space).await? {
        Some(d) if d as usize != v.len() => Err(dimension_mismatch(space, d, v.len()).into()),
        Some(_) => Ok(()),
        None => {
            let dim = v.len() as i32;
            exec(
                t.c,
                "INSERT INTO memory_spaces (space, dim) VALUES ($1, $2)",
                &[&space, &dim],
            )
            .await?;
            Ok(())
        }
    }
}

async fn circle_exists(t: &Tx<'_>, name: &str) -> R<bool> {
    get(
        &row_one(
            t.c,
            "SELECT EXISTS(SELECT 1 FROM circles WHERE name = $1)",
            &[&name],
        )
        .await?,
        0,
    )
}

/// Locks the entity rows of the canonical spaces a non-admin writes, in name
/// order, before the memory log (see the module docs).
async fn lock_spaces<'s>(
    t: &Tx<'_>,
    actor: &Principal,
    spaces: impl Iterator<Item = &'s Space>,
) -> R<()> {
    if actor.is_admin() {
        return Ok(());
    }
    let mut names: Vec<&str> = spaces.filter_map(Space::canonical_entity).collect();
    names.sort();
    names.dedup();
    for n in names {
        lock_entity(t, n).await?;
    }
    Ok(())
}

async fn authorize_write(
    t: &mut Tx<'_>,
    space: &Space,
    actor: &Principal,
    fence: Option<u64>,
    instance: Option<&Instance>,
) -> R<()> {
    let (epoch, primary) = match space {
        Space::Entity(e) if !actor.is_admin() => {
            let (epoch, p) = live_primary(t, e).await?;
            (epoch, p.map(|p| p.id))
        }
        _ => (0, None),
    };
    let fence_view = match space {
        Space::Entity(_) if !actor.is_admin() => Some(FenceView {
            epoch,
            primary: primary.as_deref(),
        }),
        _ => None,
    };
    check_space_write(
        space,
        actor,
        fence,
        &WriteContext {
            now: t.now,
            instance,
            fence_view,
        },
    )?;
    Ok(())
}

async fn actor_instance(t: &Tx<'_>, actor: &Principal) -> R<Option<Instance>> {
    match &actor.instance {
        Some(i) => get_instance(t.c, i).await,
        None => Ok(None),
    }
}

async fn space_owner(t: &Tx<'_>, actor: &Principal, space: &Space) -> R<Owner> {
    let inst_entity = match space {
        Space::Instance(i) if actor.instance.is_none() => {
            get_instance(t.c, i).await?.map(|i| i.entity)
        }
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

async fn insert(t: &Tx<'_>, m: &Insert<'_>) -> R<()> {
    let space = m.space.to_string();
    let visibility = m.visibility.to_string();
    let emb = m.embedding.map(encode_vec);
    let dim = m.embedding.map(|v| v.len() as i32);
    let pending = m.embedding.is_none() && m.embed_pending;
    let (idem_actor, idem_key) = (m.idem.map(|x| x.0), m.idem.map(|x| x.1));
    exec(
        t.c,
        "INSERT INTO memories (id, lineage, space, kind, text, tags, metadata, visibility, owner_instance, owner_entity, \
         writer_instance, writer_entity, provenance, content_hash, version, supersedes, valid_at, created_at, seq, changed_seq, \
         purged, embedding, embedding_dim, embed_pending, idem_actor, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $19, FALSE, $20, $21, $22, $23, $24)",
        &[
            &m.id,
            &m.lineage,
            &space,
            &m.kind,
            &m.text,
            &Json(m.tags),
            &Json(m.metadata),
            &visibility,
            &m.owner.instance,
            &m.owner.entity,
            &m.provenance.instance,
            &m.provenance.entity,
            &Json(m.provenance),
            &m.content_hash,
            &m.version,
            &m.supersedes,
            &m.valid_at,
            &t.now,
            &m.seq,
            &emb,
            &dim,
            &pending,
            &idem_actor,
            &idem_key,
        ],
    )
    .await?;
    Ok(())
}

async fn write_one(
    t: &mut Tx<'_>,
    actor: &Principal,
    instance: Option<&Instance>,
    via: &str,
    m: &NewMemory,
    promoted_from: Option<String>,
) -> R<Written> {
    authorize_write(t, &m.space, actor, m.fence, instance).await?;
    let space = m.space.to_string();
    let idem_actor = actor.actor();
    if let Some(key) = &m.idempotency_key {
        let prior = row_opt(
            t.c,
            "SELECT id FROM memories WHERE idem_actor = $1 AND idempotency_key = $2",
            &[&idem_actor, key],
        )
        .await?;
        if let Some(r) = prior {
            let id: String = get(&r, 0)?;
            return Ok(Written {
                memory: require(t.c, &id).await?,
                deduplicated: true,
            });
        }
    }
    if let Visibility::Circle(name) = &m.visibility {
        if !circle_exists(t, name).await? {
            return Err(no_circle(name).into());
        }
    }
    let visibility = m.visibility.to_string();
    let dup = query(
        t.c,
        &format!(
            "SELECT {} FROM memories WHERE space = $1 AND content_hash = $2 AND visibility = $3 \
             AND invalid_at IS NULL AND NOT purged LIMIT 1",
            cols(false)
        ),
        &[&space, &m.content_hash, &visibility],
    )
    .await?
    .pop();
    if let Some(existing) = dup {
        return Ok(Written {
            memory: existing,
            deduplicated: true,
        });
    }
    if let Some(v) = &m.embedding {
        check_dim(t, &space, v).await?;
    }
    let owner = space_owner(t, actor, &m.space).await?;
    let prov = provenance(actor, instance, via, m.fence, promoted_from);
    let seq = next_seq(t).await?;
    insert(
        t,
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
            valid_at: m.valid_at.unwrap_or(t.now),
            seq,
            embedding: m.embedding.as_deref(),
            embed_pending: m.embed_pending,
            idem: m
                .idempotency_key
                .as_deref()
                .map(|k| (idem_actor.as_str(), k)),
        },
    )
    .await?;
    let stored = require(t.c, &m.id).await?;
    let (topic, extra) = match &prov.promoted_from {
        Some(from) => (memory_topics::PROMOTED, json!({"promoted_from": from})),
        None => (memory_topics::CREATED, json!({})),
    };
    t.event(topic, &source_of(actor), event_data(&stored.memory, extra));
    Ok(Written {
        memory: stored,
        deduplicated: false,
    })
}

async fn write_memories(t: &mut Tx<'_>, w: &MemoryWrite) -> R<Vec<Written>> {
    lock_spaces(t, &w.actor, w.memories.iter().map(|m| &m.space)).await?;
    lock_log(t).await?;
    let instance = actor_instance(t, &w.actor).await?;
    let mut out = Vec::with_capacity(w.memories.len());
    for (i, m) in w.memories.iter().enumerate() {
        match write_one(t, &w.actor, instance.as_ref(), &w.via, m, None).await {
            Ok(x) => out.push(x),
            Err(Fail::Done(e)) => return Err(Fail::Done(in_batch(e, w.batch, i))),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The current row and its space, with the locks a change to it needs taken.
async fn locked_current(t: &Tx<'_>, id: &str, actor: &Principal) -> R<(StoredMemory, Space)> {
    let first = require(t.c, id).await?;
    let space = Space::parse("space", &first.memory.space)?;
    lock_spaces(t, actor, std::iter::once(&space)).await?;
    lock_log(t).await?;
    // Re-read under the log lock: no memory change can interleave from here.
    Ok((require(t.c, id).await?, space))
}

async fn update(t: &mut Tx<'_>, u: &MemoryUpdate) -> R<StoredMemory> {
    let (cur, space) = locked_current(t, &u.id, &u.actor).await?;
    let instance = actor_instance(t, &u.actor).await?;
    authorize_write(t, &space, &u.actor, u.fence, instance.as_ref()).await?;
    if !cur.memory.is_open() {
        return Err(closed_conflict(&cur.memory).into());
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
        if !circle_exists(t, name).await? {
            return Err(no_circle(name).into());
        }
    }
    let (embedding, pending): (Option<Vec<f32>>, bool) = match &u.embedding {
        Some(v) => (Some(v.clone()), false),
        None if text == old.text => {
            let r = row_one(
                t.c,
                "SELECT embedding, embed_pending FROM memories WHERE id = $1",
                &[&u.id],
            )
            .await?;
            let e: Option<Vec<u8>> = get(&r, 0)?;
            (e.as_deref().map(decode_vec), get(&r, 1)?)
        }
        None => (None, u.embed_pending),
    };
    if let Some(v) = &embedding {
        check_dim(t, &old.space, v).await?;
    }
    let lineage: String = get(
        &row_one(t.c, "SELECT lineage FROM memories WHERE id = $1", &[&u.id]).await?,
        0,
    )?;
    let hash = concord_core::memory::content_hash(&kind, &text, &tags, &metadata);
    let owner = space_owner(t, &u.actor, &space).await?;
    let prov = provenance(&u.actor, instance.as_ref(), &u.via, u.fence, None);
    let seq = next_seq(t).await?;
    exec(
        t.c,
        "UPDATE memories SET invalid_at = $2, superseded_by = $3, closed_seq = $4, changed_seq = $4 WHERE id = $1",
        &[&u.id, &t.now, &u.new_id, &seq],
    )
    .await?;
    insert(
        t,
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
            valid_at: u.valid_at.unwrap_or(t.now),
            seq,
            embedding: embedding.as_deref(),
            embed_pending: pending,
            idem: None,
        },
    )
    .await?;
    let stored = require(t.c, &u.new_id).await?;
    t.event(
        memory_topics::UPDATED,
        &source_of(&u.actor),
        event_data(&stored.memory, json!({"supersedes": u.id})),
    );
    Ok(stored)
}

async fn close(t: &mut Tx<'_>, x: &MemoryClose) -> R<StoredMemory> {
    if x.purge {
        if !x.actor.is_admin() {
            return Err(Error::forbidden("only an admin may purge a memory").into());
        }
        let (cur, _) = locked_current(t, &x.id, &x.actor).await?;
        if cur.memory.purged {
            return Ok(cur);
        }
        let lineage: String = get(
            &row_one(t.c, "SELECT lineage FROM memories WHERE id = $1", &[&x.id]).await?,
            0,
        )?;
        let seq = next_seq(t).await?;
        let n = exec(
            t.c,
            "UPDATE memories SET text = '', tags = '[]'::json, metadata = '{}'::json, embedding = NULL, embedding_dim = NULL, \
             embed_pending = FALSE, purged = TRUE, invalid_at = COALESCE(invalid_at, $2), closed_seq = COALESCE(closed_seq, $3), \
             changed_seq = $3 WHERE lineage = $1",
            &[&lineage, &t.now, &seq],
        )
        .await?;
        let stored = require(t.c, &x.id).await?;
        t.event(
            memory_topics::PURGED,
            &source_of(&x.actor),
            event_data(&stored.memory, json!({"versions": n, "purge_seq": seq})),
        );
        return Ok(stored);
    }
    let (cur, space) = locked_current(t, &x.id, &x.actor).await?;
    let instance = actor_instance(t, &x.actor).await?;
    authorize_write(t, &space, &x.actor, x.fence, instance.as_ref()).await?;
    if !cur.memory.is_open() {
        return Ok(cur);
    }
    let seq = next_seq(t).await?;
    exec(
        t.c,
        "UPDATE memories SET invalid_at = $2, closed_seq = $3, changed_seq = $3 WHERE id = $1",
        &[&x.id, &t.now, &seq],
    )
    .await?;
    let stored = require(t.c, &x.id).await?;
    t.event(
        memory_topics::CLOSED,
        &source_of(&x.actor),
        event_data(&stored.memory, json!({"closed_seq": seq})),
    );
    Ok(stored)
}

async fn history<C: GenericClient>(c: &C, id: &str) -> R<Vec<StoredMemory>> {
    query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE lineage = (SELECT lineage FROM memories WHERE id = $1) ORDER BY version",
            cols(false)
        ),
        &[&id],
    )
    .await
}

async fn by_seq<C: GenericClient>(c: &C, seqs: &[i64]) -> R<Vec<StoredMemory>> {
    let seqs = seqs.to_vec();
    query(
        c,
        &format!("SELECT {} FROM memories WHERE seq = ANY($1)", cols(false)),
        &[&seqs],
    )
    .await
}

async fn changes<C: GenericClient>(c: &C, after: i64, limit: usize) -> R<Vec<StoredMemory>> {
    query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE changed_seq > $1 ORDER BY changed_seq, seq LIMIT $2",
            cols(true)
        ),
        &[&after, &limit_param(limit)],
    )
    .await
}

async fn pending<C: GenericClient>(c: &C, limit: usize) -> R<Vec<PendingEmbedding>> {
    rows(
        c,
        "SELECT id, space, text FROM memories WHERE embed_pending AND NOT purged ORDER BY seq LIMIT $1",
        &[&limit_param(limit)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(PendingEmbedding {
            id: get(r, 0)?,
            space: get(r, 1)?,
            text: get(r, 2)?,
        })
    })
    .collect()
}

async fn set_embeddings(t: &mut Tx<'_>, vectors: &[(String, Vec<f32>)]) -> R<usize> {
    lock_log(t).await?;
    let mut n = 0;
    for (id, v) in vectors {
        let Some(r) = row_opt(
            t.c,
            "SELECT space FROM memories WHERE id = $1 AND embed_pending AND NOT purged",
            &[id],
        )
        .await?
        else {
            continue;
        };
        let space: String = get(&r, 0)?;
        let ok = concord_core::memory::embedding("embedding", v).is_ok()
            && match space_dim(t.c, &space).await? {
                Some(d) => d as usize == v.len(),
                None => check_dim(t, &space, v).await.is_ok(),
            };
        let seq = next_seq(t).await?;
        if ok {
            let dim = v.len() as i32;
            exec(
                t.c,
                "UPDATE memories SET embedding = $2, embedding_dim = $3, embed_pending = FALSE, changed_seq = $4 WHERE id = $1",
                &[id, &encode_vec(v), &dim, &seq],
            )
            .await?;
            n += 1;
        } else {
            tracing::warn!(memory = %id, dim = v.len(), "the embedder's vector does not fit its space; left without one");
            exec(
                t.c,
                "UPDATE memories SET embed_pending = FALSE, changed_seq = $2 WHERE id = $1",
                &[id, &seq],
            )
            .await?;
        }
    }
    Ok(n)
}

async fn get_trust<C: GenericClient>(c: &C, entity: &str) -> R<TrustList> {
    let stored = row_opt(c, "SELECT trusts FROM trust WHERE entity = $1", &[&entity])
        .await?
        .map(|r| get::<Option<Value>>(&r, 0))
        .transpose()?
        .flatten();
    Ok(trust_list(entity, stored))
}

/// Locks the entity (its primary decides).
async fn put_trust(
    t: &mut Tx<'_>,
    entity: &str,
    trusts: &[String],
    actor: &Principal,
) -> R<TrustList> {
    ensure_entity(t, entity).await?;
    lock_entity(t, entity).await?;
    let primary = if actor.is_admin() {
        None
    } else {
        live_primary(t, entity).await?.1.map(|p| p.id)
    };
    check_trust_writer(entity, actor, primary.as_deref())?;
    exec(
        t.c,
        "INSERT INTO trust (entity, trusts, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (entity) DO UPDATE SET trusts = excluded.trusts, updated_at = excluded.updated_at",
        &[&entity, &Json(trusts), &t.now],
    )
    .await?;
    t.event(
        memory_topics::TRUST_CHANGED,
        &source_of(actor),
        json!({"entity": entity, "trusts": trusts}),
    );
    get_trust(t.c, entity).await
}

async fn list_circles<C: GenericClient>(c: &C) -> R<Vec<Circle>> {
    rows(c, "SELECT name, members FROM circles ORDER BY name", &[])
        .await?
        .iter()
        .map(|r| {
            Ok(Circle {
                name: get(r, 0)?,
                members: from_value(get::<Option<Value>>(r, 1)?.unwrap_or(Value::Null)),
            })
        })
        .collect()
}

async fn put_circle(
    t: &mut Tx<'_>,
    name: &str,
    members: &[String],
    actor: &Principal,
) -> R<Circle> {
    if !actor.is_admin() {
        return Err(Error::forbidden("only an admin may change circles").into());
    }
    let mut members = members.to_vec();
    members.sort();
    members.dedup();
    exec(
        t.c,
        "INSERT INTO circles (name, members, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET members = excluded.members, updated_at = excluded.updated_at",
        &[&name, &Json(&members), &t.now],
    )
    .await?;
    t.event(
        memory_topics::CIRCLE_CHANGED,
        &source_of(actor),
        json!({"circle": name, "members": members}),
    );
    Ok(Circle {
        name: name.into(),
        members,
    })
}

async fn fork_of<C: GenericClient>(c: &C, fork: &str) -> R<(Instance, i64)> {
    let inst = get_instance(c, fork)
        .await?
        .ok_or_else(|| Fail::Done(Error::not_found(format!("no instance {fork}"))))?;
    match inst.fork_point {
        Some(p) if inst.role == Role::Fork => Ok((inst, p)),
        _ => Err(Error::bad_field("fork", format!("instance {fork} is not a fork")).into()),
    }
}

async fn fork_diff<C: GenericClient>(c: &C, fork: &str) -> R<ForkDiffRaw> {
    let (inst, point) = fork_of(c, fork).await?;
    let branch_space = format!("instance:{fork}");
    let branch = query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE space = $1 AND invalid_at IS NULL AND NOT purged ORDER BY seq",
            cols(false)
        ),
        &[&branch_space],
    )
    .await?;
    let canonical = format!("entity:{}", inst.entity);
    let canonical_since = query(
        c,
        &format!(
            "SELECT {} FROM memories WHERE space = $1 AND (seq > $2 OR closed_seq > $2) ORDER BY seq",
            cols(false)
        ),
        &[&canonical, &point],
    )
    .await?;
    Ok(ForkDiffRaw {
        fork: inst,
        fork_point: point,
        branch,
        canonical_since,
    })
}

async fn promote(t: &mut Tx<'_>, p: &MemoryPromote) -> R<Vec<Written>> {
    let (inst, _) = fork_of(t.c, &p.fork).await?;
    let canonical = Space::Entity(inst.entity.clone());
    lock_spaces(t, &p.actor, std::iter::once(&canonical)).await?;
    lock_log(t).await?;
    let branch = format!("instance:{}", p.fork);
    let instance = actor_instance(t, &p.actor).await?;
    let mut out = Vec::with_capacity(p.memory_ids.len());
    for (i, (id, new_id)) in p.memory_ids.iter().zip(&p.new_ids).enumerate() {
        let field = format!("memory_ids[{i}]");
        let src = get_mem(t.c, id)
            .await?
            .filter(|m| m.memory.space == branch)
            .ok_or_else(|| {
                Fail::Done(Error::bad_field(
                    &field,
                    format!("{id} is not a memory of the fork's branch {branch}"),
                ))
            })?;
        if !src.memory.is_open() {
            return Err(Error::bad_field(&field, format!("{id} is closed")).into());
        }
        let emb: Option<Vec<u8>> = get(
            &row_one(t.c, "SELECT embedding FROM memories WHERE id = $1", &[id]).await?,
            0,
        )?;
        let m = &src.memory;
        let new = NewMemory {
            id: new_id.clone(),
            space: canonical.clone(),
            kind: m.kind.clone(),
            text: m.text.clone(),
            tags: m.tags.clone(),
            metadata: m.metadata.clone(),
            visibility: Visibility::parse("visibility", &m.visibility)?,
            embedding: emb.as_deref().map(decode_vec),
            embed_pending: false,
            fence: p.fence,
            valid_at: Some(m.valid_at.millis()),
            idempotency_key: None,
            content_hash: m.content_hash.clone(),
        };
        out.push(
            write_one(
                t,
                &p.actor,
                instance.as_ref(),
                "promote",
                &new,
                Some(id.clone()),
            )
            .await?,
        );
    }
    Ok(out)
}

macro_rules! tx {
    ($store:expr, [$($arg:ident),*], |$t:ident| $call:expr) => {
        $store
            .inner
            .write(move |$t| {
                $(let $arg = $arg.clone();)*
                Box::pin(async move { $call.await })
            })
            .await
    };
}

macro_rules! read {
    ($store:expr, |$c:ident| $call:expr) => {{
        let $c = $store.inner.client().await?;
        $call.await.map_err(Error::from)
    }};
}

#[async_trait]
impl MemoryStore for PostgresStore {
    async fn write_memories(&self, w: MemoryWrite) -> Result<Vec<Written>> {
        tx!(self, [w], |t| write_memories(t, &w))
    }

    async fn update_memory(&self, u: MemoryUpdate) -> Result<StoredMemory> {
        tx!(self, [u], |t| update(t, &u))
    }

    async fn close_memory(&self, x: MemoryClose) -> Result<StoredMemory> {
        tx!(self, [x], |t| close(t, &x))
    }

    async fn get_memory(&self, id: &str) -> Result<Option<StoredMemory>> {
        read!(self, |c| get_mem(&c, id))
    }

    async fn memory_history(&self, id: &str) -> Result<Vec<StoredMemory>> {
        read!(self, |c| history(&c, id))
    }

    async fn memories_by_seq(&self, seqs: &[i64]) -> Result<Vec<StoredMemory>> {
        read!(self, |c| by_seq(&c, seqs))
    }

    async fn memory_changes(&self, after: i64, limit: usize) -> Result<Vec<StoredMemory>> {
        read!(self, |c| changes(&c, after, limit))
    }

    async fn last_memory_seq(&self) -> Result<i64> {
        read!(self, |c| last_memory_seq(&c))
    }

    async fn space_dimension(&self, space: &str) -> Result<Option<u32>> {
        read!(self, |c| space_dim(&c, space))
    }

    async fn pending_embeddings(&self, limit: usize) -> Result<Vec<PendingEmbedding>> {
        read!(self, |c| pending(&c, limit))
    }

    async fn set_embeddings(&self, vectors: Vec<(String, Vec<f32>)>) -> Result<usize> {
        tx!(self, [vectors], |t| set_embeddings(t, &vectors))
    }

    async fn put_trust(
        &self,
        entity: &str,
        trusts: Vec<String>,
        actor: &Principal,
    ) -> Result<TrustList> {
        let (e, a) = (entity.to_string(), actor.clone());
        tx!(self, [e, a, trusts], |t| put_trust(t, &e, &trusts, &a))
    }

    async fn get_trust(&self, entity: &str) -> Result<TrustList> {
        read!(self, |c| get_trust(&c, entity))
    }

    async fn put_circle(
        &self,
        name: &str,
        members: Vec<String>,
        actor: &Principal,
    ) -> Result<Circle> {
        let (n, a) = (name.to_string(), actor.clone());
        tx!(self, [n, a, members], |t| put_circle(t, &n, &members, &a))
    }

    async fn list_circles(&self) -> Result<Vec<Circle>> {
        read!(self, |c| list_circles(&c))
    }

    async fn fork_diff(&self, fork: &str) -> Result<ForkDiffRaw> {
        read!(self, |c| fork_diff(&c, fork))
    }

    async fn promote(&self, p: MemoryPromote) -> Result<Vec<Written>> {
        tx!(self, [p], |t| promote(t, &p))
    }
}
