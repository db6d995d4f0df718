//! Shared memory over HTTP (DESIGN §5): write, version, forget, read, recall;
//! trust lists, circles, fork diffs and promotion.
//!
//! Visibility is decided here for single reads (a memory the caller may not see
//! is a 404, exactly like one that does not exist) and inside the recall index
//! for searches; both use `concord_core::memory`'s one rule.

use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::recall::Filter;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::Role;
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::memory::{
    self as rules, access_tokens, trusted_tokens, Circle, CircleList, ForkDiff, Hit, Memory,
    MemoryBatchWritten, MemoryEnvelope, MemoryWritten, PromoteRequest, Promoted, PutCircleRequest,
    PutTrustRequest, ReaderView, SearchRequest, SearchResponse, Space, TrustList, TrustRef,
    UpdateMemoryRequest, Visibility, WriteMemoryBatch, WriteMemoryRequest,
};
use concord_core::{ids, validate, Error, Result};
use concord_store::{
    MemoryClose, MemoryPromote, MemoryUpdate, MemoryWrite, NewMemory, StoredMemory, Written,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

// ---------- validation ----------

fn check_object(field: &str, v: &serde_json::Value) -> Result<()> {
    validate::object(field, v)?;
    validate::json_size(field, v, rules::MAX_METADATA_BYTES)
}

fn field(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// A write request, validated, as the store takes it.
fn new_memory(s: &AppState, req: &WriteMemoryRequest, prefix: &str) -> Result<NewMemory> {
    let space = Space::parse(&field(prefix, "space"), &req.space)?;
    let kind = req.kind.clone().unwrap_or_else(|| "note".into());
    rules::kind(&field(prefix, "kind"), &kind)?;
    rules::text(&field(prefix, "text"), &req.text)?;
    let tags = rules::normalize_tags(&field(prefix, "tags"), &req.tags)?;
    check_object(&field(prefix, "metadata"), &req.metadata)?;
    let visibility = match &req.visibility {
        Some(v) => Visibility::parse(&field(prefix, "visibility"), v)?,
        None => Visibility::default_for(&space),
    };
    if let Some(e) = &req.embedding {
        rules::embedding(&field(prefix, "embedding"), e)?;
    }
    if let Some(k) = &req.idempotency_key {
        if k.is_empty() || k.len() > rules::MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Error::bad_field(
                &field(prefix, "idempotency_key"),
                format!("must be 1 to {} bytes", rules::MAX_IDEMPOTENCY_KEY_LEN),
            ));
        }
    }
    Ok(NewMemory {
        id: ids::new_id(ids::MEMORY),
        content_hash: rules::content_hash(&kind, &req.text, &tags, &req.metadata),
        space,
        kind,
        text: req.text.clone(),
        tags,
        metadata: req.metadata.clone(),
        visibility,
        embed_pending: req.embedding.is_none() && s.memory.embedder.is_some(),
        embedding: req.embedding.clone(),
        fence: req.fence,
        valid_at: req.valid_at.map(|t| t.millis()),
        idempotency_key: req.idempotency_key.clone(),
    })
}

fn memory_id(id: &str) -> Result<()> {
    if ids::has_prefix(id, ids::MEMORY) {
        Ok(())
    } else {
        Err(Error::bad_field(
            "id",
            format!("{id:?} is not a memory id (mem_…)"),
        ))
    }
}

// ---------- who is reading ----------

/// The caller as a reader of memory: its access tokens and, for a fork, the
/// canonical view it is pinned to.
struct Reader {
    view: ReaderView,
    /// (canonical space, fork point, fork id)
    fork: Option<(String, i64, String)>,
}

async fn reader(s: &AppState, p: &Principal) -> Result<Reader> {
    let circles: Vec<String> = match &p.entity {
        Some(e) => s
            .store
            .list_circles()
            .await?
            .into_iter()
            .filter(|c| c.members.iter().any(|m| m == e))
            .map(|c| c.name)
            .collect(),
        None => Vec::new(),
    };
    let fork = match &p.instance {
        Some(i) => {
            s.store
                .get_instance(i)
                .await?
                .and_then(|inst| match (inst.role, inst.fork_point) {
                    (Role::Fork, Some(point)) => {
                        Some((format!("entity:{}", inst.entity), point, inst.id))
                    }
                    _ => None,
                })
        }
        None => None,
    };
    Ok(Reader {
        view: ReaderView::new(
            p.is_admin(),
            p.entity.as_deref(),
            p.instance.as_deref(),
            &circles,
        ),
        fork,
    })
}

impl Reader {
    /// Visibility alone (fork diffs show what the fork does not see in recall).
    fn may_see(&self, m: &StoredMemory) -> bool {
        let vis =
            Visibility::parse("visibility", &m.memory.visibility).unwrap_or(Visibility::Private);
        self.view.may_see(&access_tokens(&vis, &m.owner))
    }

    /// Visibility and, for a fork, its pinned view of canonical memory.
    fn sees(&self, m: &StoredMemory) -> bool {
        if let Some((canonical, point, _)) = &self.fork {
            if &m.memory.space == canonical && m.memory.seq > *point {
                return false;
            }
        }
        self.may_see(m)
    }
}

fn hidden(id: &str) -> Error {
    Error::not_found(format!("no memory {id}"))
}

// ---------- writes ----------

async fn after_write(s: &AppState) {
    // Read-your-writes: this replica's index has the write before we answer.
    // The write is committed either way; a lagging index catches up by itself.
    if let Err(e) = s.memory.index.sync().await {
        tracing::warn!("recall index did not catch up after a write: {e}");
    }
}

fn written(w: Written) -> MemoryWritten {
    MemoryWritten {
        memory: w.memory.memory,
        deduplicated: w.deduplicated,
    }
}

async fn write_many(
    s: &AppState,
    p: Principal,
    memories: Vec<NewMemory>,
    batch: bool,
) -> Result<Vec<MemoryWritten>> {
    authorize(&p, Action::MemoryWrite, Target::default())?;
    s.memory.check_rate(&p.actor(), memories.len())?;
    let out = s
        .store
        .write_memories(MemoryWrite {
            actor: p,
            via: if batch { "batch" } else { "http" }.into(),
            memories,
            batch,
        })
        .await?;
    after_write(s).await;
    Ok(out.into_iter().map(written).collect())
}

/// Write a memory. 201, or 200 with `deduplicated: true` for an exact duplicate
/// still valid in the same space (or an idempotent retry).
#[utoipa::path(post, path = "/v1/memories", tag = "memory", request_body = WriteMemoryRequest,
    responses((status = 201, body = MemoryWritten), (status = 200, body = MemoryWritten)))]
pub(crate) async fn write(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<WriteMemoryRequest>,
) -> ApiResult<(StatusCode, axum::Json<MemoryWritten>)> {
    let m = new_memory(&s, &req, "")?;
    let mut out = write_many(&s, p, vec![m], false).await?;
    let w = out
        .pop()
        .ok_or_else(|| Error::internal("a write returned nothing"))?;
    let status = if w.deduplicated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(w)))
}

/// Write many memories in one transaction: all or nothing.
#[utoipa::path(post, path = "/v1/memories/batch", tag = "memory", request_body = WriteMemoryBatch,
    responses((status = 201, body = MemoryBatchWritten)))]
pub(crate) async fn write_batch(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<WriteMemoryBatch>,
) -> ApiResult<(StatusCode, axum::Json<MemoryBatchWritten>)> {
    if req.memories.is_empty() || req.memories.len() > rules::MAX_BATCH {
        return Err(Error::bad_field(
            "memories",
            format!("must hold 1 to {} memories", rules::MAX_BATCH),
        )
        .into());
    }
    let memories = req
        .memories
        .iter()
        .enumerate()
        .map(|(i, m)| new_memory(&s, m, &format!("memories[{i}].")))
        .collect::<Result<Vec<_>>>()?;
    let results = write_many(&s, p, memories, true).await?;
    let status = if results.iter().any(|r| !r.deduplicated) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(MemoryBatchWritten { results })))
}

#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetQuery {
    /// Also every version of the memory, oldest first.
    #[serde(default)]
    history: bool,
}

/// Read a memory (404 if the caller may not see it).
#[utoipa::path(get, path = "/v1/memories/{id}", tag = "memory",
    params(("id" = String, Path), GetQuery), responses((status = 200, body = MemoryEnvelope)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> ApiResult<axum::Json<MemoryEnvelope>> {
    memory_id(&id)?;
    authorize(&p, Action::MemoryRead, Target::default())?;
    let r = reader(&s, &p).await?;
    let m = s
        .store
        .get_memory(&id)
        .await?
        .filter(|m| r.sees(m))
        .ok_or_else(|| hidden(&id))?;
    let history = if q.history {
        Some(
            s.store
                .memory_history(&id)
                .await?
                .into_iter()
                .filter(|m| r.sees(m))
                .map(|m| m.memory)
                .collect(),
        )
    } else {
        None
    };
    Ok(axum::Json(MemoryEnvelope {
        memory: m.memory,
        history,
    }))
}

/// Write version n+1 of an open memory and close n (same write rules as a write).
#[utoipa::path(put, path = "/v1/memories/{id}", tag = "memory", request_body = UpdateMemoryRequest,
    params(("id" = String, Path)), responses((status = 200, body = MemoryEnvelope)))]
pub(crate) async fn update(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<UpdateMemoryRequest>,
) -> ApiResult<axum::Json<MemoryEnvelope>> {
    memory_id(&id)?;
    if let Some(k) = &req.kind {
        rules::kind("kind", k)?;
    }
    if let Some(t) = &req.text {
        rules::text("text", t)?;
    }
    let tags = req
        .tags
        .as_ref()
        .map(|t| rules::normalize_tags("tags", t))
        .transpose()?;
    if let Some(m) = &req.metadata {
        check_object("metadata", m)?;
    }
    let visibility = req
        .visibility
        .as_ref()
        .map(|v| Visibility::parse("visibility", v))
        .transpose()?;
    if let Some(e) = &req.embedding {
        rules::embedding("embedding", e)?;
    }
    authorize(&p, Action::MemoryWrite, Target::default())?;
    let r = reader(&s, &p).await?;
    s.store
        .get_memory(&id)
        .await?
        .filter(|m| r.sees(m))
        .ok_or_else(|| hidden(&id))?;
    s.memory.check_rate(&p.actor(), 1)?;
    let m = s
        .store
        .update_memory(MemoryUpdate {
            actor: p,
            via: "http".into(),
            id,
            new_id: ids::new_id(ids::MEMORY),
            fence: req.fence,
            kind: req.kind,
            text: req.text,
            tags,
            metadata: req.metadata,
            visibility,
            embed_pending: req.embedding.is_none() && s.memory.embedder.is_some(),
            embedding: req.embedding,
            valid_at: req.valid_at.map(|t| t.millis()),
        })
        .await?;
    after_write(&s).await;
    Ok(axum::Json(MemoryEnvelope {
        memory: m.memory,
        history: None,
    }))
}

#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    /// For canonical (`entity:`) memories: the epoch of your primary grant.
    #[serde(default, deserialize_with = "concord_core::fencing::deserialize_fence")]
    fence: Option<u64>,
    /// Admin: erase the bytes of every version, leave tombstones.
    #[serde(default)]
    purge: bool,
}

/// Forget (close without successor), or `purge=true` (admin).
#[utoipa::path(delete, path = "/v1/memories/{id}", tag = "memory",
    params(("id" = String, Path), DeleteQuery), responses((status = 200, body = MemoryEnvelope)))]
pub(crate) async fn forget(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<axum::Json<MemoryEnvelope>> {
    memory_id(&id)?;
    authorize(&p, Action::MemoryWrite, Target::default())?;
    let r = reader(&s, &p).await?;
    s.store
        .get_memory(&id)
        .await?
        .filter(|m| r.sees(m))
        .ok_or_else(|| hidden(&id))?;
    let m = s
        .store
        .close_memory(MemoryClose {
            actor: p,
            id,
            fence: q.fence,
            purge: q.purge,
        })
        .await?;
    after_write(&s).await;
    Ok(axum::Json(MemoryEnvelope {
        memory: m.memory,
        history: None,
    }))
}

// ---------- recall ----------

fn validated_search(req: &SearchRequest) -> Result<usize> {
    if req.query.len() > rules::MAX_QUERY_BYTES {
        return Err(Error::bad_field(
            "query",
            format!("at most {} bytes", rules::MAX_QUERY_BYTES),
        ));
    }
    for (i, sp) in req.spaces.iter().enumerate() {
        Space::parse(&format!("spaces[{i}]"), sp)?;
    }
    for (i, k) in req.kinds.iter().enumerate() {
        rules::kind(&format!("kinds[{i}]"), k)?;
    }
    rules::normalize_tags("tags", &req.tags)?;
    for (i, e) in req.writers.entities.iter().enumerate() {
        validate::name(&format!("writers.entities[{i}]"), e)?;
    }
    for (i, x) in req.writers.instances.iter().enumerate() {
        if !ids::has_prefix(x, ids::INSTANCE) {
            return Err(Error::bad_field(
                &format!("writers.instances[{i}]"),
                "must be an instance id (ins_…)",
            ));
        }
    }
    let limit = req.limit.unwrap_or(rules::DEFAULT_RECALL_LIMIT);
    if limit == 0 || limit > rules::MAX_RECALL_LIMIT {
        return Err(Error::bad_field(
            "limit",
            format!("must be 1 to {}", rules::MAX_RECALL_LIMIT),
        ));
    }
    if req.recency_half_life_ms.is_some_and(|h| h <= 0) {
        return Err(Error::bad_field("recency_half_life_ms", "must be positive"));
    }
    if let Some(e) = &req.embedding {
        rules::embedding("embedding", e)?;
    }
    Ok(limit)
}

async fn trusted(s: &AppState, p: &Principal) -> Result<Vec<String>> {
    let Some(entity) = &p.entity else {
        return Err(Error::bad_field(
            "trusted_only",
            "the caller has no entity whose trust list could apply",
        ));
    };
    let trust = s.store.get_trust(entity).await?;
    let refs: Vec<TrustRef> = trust
        .trusts
        .iter()
        .filter_map(|t| TrustRef::parse("trusts", t).ok())
        .collect();
    let circles: HashMap<String, Vec<String>> = s
        .store
        .list_circles()
        .await?
        .into_iter()
        .map(|c| (c.name, c.members))
        .collect();
    Ok(trusted_tokens(entity, &refs, |c| {
        circles.get(c).cloned().unwrap_or_default()
    }))
}

/// Recall: hybrid (BM25 + vectors, fused by reciprocal rank, weighted by
/// recency) when a vector is available, full-text otherwise. Visibility applies
/// before anything is scored.
#[utoipa::path(post, path = "/v1/memories/search", tag = "memory", request_body = SearchRequest,
    responses((status = 200, body = SearchResponse)))]
pub(crate) async fn search(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<SearchRequest>,
) -> ApiResult<axum::Json<SearchResponse>> {
    let limit = validated_search(&req)?;
    authorize(&p, Action::MemoryRead, Target::default())?;
    let r = reader(&s, &p).await?;
    let trusted = if req.trusted_only {
        Some(trusted(&s, &p).await?)
    } else {
        None
    };
    let writers = {
        let mut w: Vec<String> = req
            .writers
            .entities
            .iter()
            .map(|e| format!("entity:{e}"))
            .collect();
        w.extend(
            req.writers
                .instances
                .iter()
                .map(|i| format!("instance:{i}")),
        );
        (!w.is_empty()).then_some(w)
    };
    let mut spaces = req.spaces.clone();
    if let Some((canonical, _, fork)) = &r.fork {
        // A fork reading its entity's memory reads its own branch with it.
        if spaces.contains(canonical) {
            spaces.push(format!("instance:{fork}"));
        }
    }
    let (vector, mut note) = query_vector(&s, &req, &spaces).await?;
    let filter = Filter {
        acl: (!r.view.admin).then(|| r.view.tokens.clone()),
        trusted,
        writers,
        spaces,
        kinds: req.kinds.clone(),
        tags: rules::normalize_tags("tags", &req.tags)?,
        since: req.since.map(|t| t.millis()),
        until: req.until.map(|t| t.millis()),
        as_of: req.as_of.map(|t| t.millis()),
        include_closed: req.include_closed,
        now: s.now_ms(),
        fork: r.fork.as_ref().map(|(c, p, _)| (c.clone(), *p)),
    };
    let default_view = req.as_of.is_none() && !req.include_closed;
    let fork_canonical = r.fork.as_ref().map(|f| f.0.clone());
    let searched = s
        .memory
        .index
        .search(
            filter,
            req.query.clone(),
            vector,
            limit,
            req.recency_half_life_ms,
        )
        .await?;
    if note.is_none() {
        note = searched.note;
    }
    let seqs: Vec<i64> = searched.found.iter().map(|f| f.seq).collect();
    let mut rows: HashMap<i64, StoredMemory> = s
        .store
        .memories_by_seq(&seqs)
        .await?
        .into_iter()
        .map(|m| (m.memory.seq, m))
        .collect();
    let results = searched
        .found
        .into_iter()
        .filter_map(|f| {
            let m = rows.remove(&f.seq)?;
            // The store is the truth: the index may lag another replica's close.
            let closed_ok = !default_view
                || m.memory.is_open()
                || fork_canonical.as_deref() == Some(m.memory.space.as_str());
            (r.sees(&m) && !m.memory.purged && closed_ok).then_some(Hit {
                memory: m.memory,
                score: f.score,
                explain: f.explain,
            })
        })
        .collect();
    Ok(axum::Json(SearchResponse {
        mode: if searched.hybrid {
            "hybrid"
        } else {
            "fulltext"
        }
        .into(),
        note,
        results,
    }))
}

/// The query's vector: the caller's (checked against the spaces' dimension), or
/// the hub embedder's; `None` with a note saying why recall is full-text only.
async fn query_vector(
    s: &AppState,
    req: &SearchRequest,
    spaces: &[String],
) -> Result<(Option<Vec<f32>>, Option<String>)> {
    if let Some(v) = &req.embedding {
        for sp in spaces {
            if let Some(d) = s.store.space_dimension(sp).await? {
                if d as usize != v.len() {
                    return Err(Error::bad_field(
                        "embedding",
                        format!(
                            "has {} dimensions, but the embeddings of {sp} have {d}",
                            v.len()
                        ),
                    ));
                }
            }
        }
        if spaces.is_empty() {
            let dims = s.memory.index.dims();
            if !dims.is_empty() && !dims.contains(&v.len()) {
                return Err(Error::bad_field(
                    "embedding",
                    format!(
                        "has {} dimensions; the stored embeddings have {dims:?}",
                        v.len()
                    ),
                ));
            }
        }
        return Ok((Some(v.clone()), None));
    }
    let Some(embedder) = &s.memory.embedder else {
        return Ok((
            None,
            Some("no embedding given and no embedder configured: full-text only".into()),
        ));
    };
    if req.query.trim().is_empty() {
        return Ok((None, None));
    }
    match embedder
        .embed(
            std::slice::from_ref(&req.query),
            crate::recall::embedder::QUERY_TIMEOUT,
        )
        .await
    {
        Ok(mut v) => Ok((v.pop(), None)),
        Err(e) => Ok((None, Some(format!("{}; full-text only", e.message)))),
    }
}

// ---------- trust and circles ----------

/// Replace an entity's trust list (admin or the entity's live primary).
#[utoipa::path(put, path = "/v1/trust/{entity}", tag = "memory", request_body = PutTrustRequest,
    params(("entity" = String, Path)), responses((status = 200, body = TrustList)))]
pub(crate) async fn put_trust(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
    Json(req): Json<PutTrustRequest>,
) -> ApiResult<axum::Json<TrustList>> {
    validate::name("entity", &entity)?;
    if req.trusts.len() > rules::MAX_TRUSTS {
        return Err(
            Error::bad_field("trusts", format!("at most {} entries", rules::MAX_TRUSTS)).into(),
        );
    }
    let mut trusts = Vec::with_capacity(req.trusts.len());
    for (i, t) in req.trusts.iter().enumerate() {
        trusts.push(TrustRef::parse(&format!("trusts[{i}]"), t)?.to_string());
    }
    trusts.dedup();
    authorize(
        &p,
        Action::TrustWrite,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    Ok(axum::Json(s.store.put_trust(&entity, trusts, &p).await?))
}

#[utoipa::path(get, path = "/v1/trust/{entity}", tag = "memory",
    params(("entity" = String, Path)), responses((status = 200, body = TrustList)))]
pub(crate) async fn get_trust(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
) -> ApiResult<axum::Json<TrustList>> {
    validate::name("entity", &entity)?;
    authorize(
        &p,
        Action::TrustRead,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    Ok(axum::Json(s.store.get_trust(&entity).await?))
}

/// Set a circle's members (admin). Visibility `circle:NAME` needs the circle.
#[utoipa::path(put, path = "/v1/circles/{name}", tag = "memory", request_body = PutCircleRequest,
    params(("name" = String, Path)), responses((status = 200, body = Circle)))]
pub(crate) async fn put_circle(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(name): Path<String>,
    Json(req): Json<PutCircleRequest>,
) -> ApiResult<axum::Json<Circle>> {
    validate::name("name", &name)?;
    if req.members.len() > rules::MAX_CIRCLE_MEMBERS {
        return Err(Error::bad_field(
            "members",
            format!("at most {} members", rules::MAX_CIRCLE_MEMBERS),
        )
        .into());
    }
    for (i, m) in req.members.iter().enumerate() {
        validate::name(&format!("members[{i}]"), m)?;
    }
    authorize(&p, Action::CircleWrite, Target::default())?;
    Ok(axum::Json(
        s.store.put_circle(&name, req.members, &p).await?,
    ))
}

#[utoipa::path(get, path = "/v1/circles", tag = "memory", responses((status = 200, body = CircleList)))]
pub(crate) async fn list_circles(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<CircleList>> {
    authorize(&p, Action::CircleRead, Target::default())?;
    Ok(axum::Json(CircleList {
        circles: s.store.list_circles().await?,
    }))
}

// ---------- forks ----------

/// A fork's branch and what changed in canonical memory since its fork point
/// (each list filtered by what the caller may see).
#[utoipa::path(get, path = "/v1/forks/{id}/diff", tag = "memory",
    params(("id" = String, Path)), responses((status = 200, body = ForkDiff)))]
pub(crate) async fn fork_diff(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ForkDiff>> {
    if !ids::has_prefix(&id, ids::INSTANCE) {
        return Err(Error::bad_field("fork", "must be an instance id (ins_…)").into());
    }
    authorize(&p, Action::ForkRead, Target::default())?;
    let r = reader(&s, &p).await?;
    let d = s.store.fork_diff(&id).await?;
    let keep = |v: Vec<StoredMemory>| -> Vec<Memory> {
        v.into_iter()
            .filter(|m| r.may_see(m))
            .map(|m| m.memory)
            .collect()
    };
    Ok(axum::Json(ForkDiff {
        fork: d.fork.id,
        entity: d.fork.entity,
        fork_point: d.fork_point,
        branch: keep(d.branch),
        canonical_since: keep(d.canonical_since),
    }))
}

/// Copy chosen branch memories into the entity's canonical memory (its primary
/// with its fence, or admin), with `provenance.promoted_from`.
#[utoipa::path(post, path = "/v1/forks/{id}/promote", tag = "memory", request_body = PromoteRequest,
    params(("id" = String, Path)), responses((status = 200, body = Promoted)))]
pub(crate) async fn promote(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<PromoteRequest>,
) -> ApiResult<axum::Json<Promoted>> {
    if !ids::has_prefix(&id, ids::INSTANCE) {
        return Err(Error::bad_field("fork", "must be an instance id (ins_…)").into());
    }
    if req.memory_ids.is_empty() || req.memory_ids.len() > rules::MAX_BATCH {
        return Err(Error::bad_field(
            "memory_ids",
            format!("must hold 1 to {} ids", rules::MAX_BATCH),
        )
        .into());
    }
    for (i, m) in req.memory_ids.iter().enumerate() {
        if !ids::has_prefix(m, ids::MEMORY) {
            return Err(Error::bad_field(
                &format!("memory_ids[{i}]"),
                "must be a memory id (mem_…)",
            )
            .into());
        }
    }
    let fork = s
        .store
        .get_instance(&id)
        .await?
        .ok_or_else(|| Error::not_found(format!("no instance {id}")))?;
    authorize(
        &p,
        Action::ForkPromote,
        Target {
            entity: Some(&fork.entity),
            instance: None,
        },
    )?;
    s.memory.check_rate(&p.actor(), req.memory_ids.len())?;
    let new_ids = req
        .memory_ids
        .iter()
        .map(|_| ids::new_id(ids::MEMORY))
        .collect();
    let out = s
        .store
        .promote(MemoryPromote {
            actor: p,
            fork: id,
            memory_ids: req.memory_ids,
            new_ids,
            fence: req.fence,
        })
        .await?;
    after_write(&s).await;
    Ok(axum::Json(Promoted {
        promoted: out.into_iter().map(written).collect(),
    }))
}
