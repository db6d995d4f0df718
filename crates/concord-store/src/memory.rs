//! Shared memory in the store (DESIGN §5): the [`MemoryStore`] operations, their
//! inputs and outputs, and the backend-independent parts of their rules (who may
//! write which space, how provenance is built, how a row becomes a [`Memory`]),
//! so that the SQLite and PostgreSQL implementations differ only in SQL and locks.
//!
//! The memory log: every change to a memory (creation, new version, close, purge,
//! embedding filled in) takes the next position from one counter, in the same
//! transaction as the change (PostgreSQL: a counter row locked until COMMIT, which
//! makes memory writers commit in position order; SQLite: its single writer). A memory's `seq` is the position of
//! its creation, `closed_seq` of its close, `changed_seq` of its latest change.
//! Readers that follow the log (the recall index, other replicas) ask for rows
//! with `changed_seq > watermark`, and a fork's view is "seq <= fork point and
//! not closed at the fork point".

use async_trait::async_trait;
use concord_core::api::{Instance, InstanceState, Role};
use concord_core::authz::Principal;
use concord_core::fencing::{check_fence, FenceView};
use concord_core::memory::{Circle, Memory, Owner, Provenance, Space, TrustList, Visibility};
use concord_core::token::TokenKind;
use concord_core::{Error, Result, Timestamp};
use serde_json::{json, Value};

/// Event topics of memory changes (clients invalidate caches on `sys.memory.>`).
pub mod memory_topics {
    pub const CREATED: &str = "sys.memory.created";
    pub const UPDATED: &str = "sys.memory.updated";
    pub const CLOSED: &str = "sys.memory.closed";
    pub const PURGED: &str = "sys.memory.purged";
    pub const PROMOTED: &str = "sys.memory.promoted";
    pub const TRUST_CHANGED: &str = "sys.trust.changed";
    pub const CIRCLE_CHANGED: &str = "sys.circle.changed";
}

/// One memory to write, validated by the caller (the hub), ids chosen.
#[derive(Debug, Clone)]
pub struct NewMemory {
    pub id: String,
    pub space: Space,
    pub kind: String,
    pub text: String,
    /// Normalized (`concord_core::memory::normalize_tags`).
    pub tags: Vec<String>,
    pub metadata: Value,
    pub visibility: Visibility,
    pub embedding: Option<Vec<f32>>,
    /// Without an embedding: whether the hub's embedder should compute one later.
    pub embed_pending: bool,
    pub fence: Option<u64>,
    pub valid_at: Option<i64>,
    pub idempotency_key: Option<String>,
    pub content_hash: String,
}

/// A batch of memories by one caller: one transaction, all or nothing.
#[derive(Debug, Clone)]
pub struct MemoryWrite {
    pub actor: Principal,
    /// `http`, `batch`…
    pub via: String,
    pub memories: Vec<NewMemory>,
    /// Names fields `memories[i].…` in errors (a batch) rather than `…`.
    pub batch: bool,
}

/// A new version of an open memory. `None` fields keep the current value.
#[derive(Debug, Clone)]
pub struct MemoryUpdate {
    pub actor: Principal,
    pub via: String,
    pub id: String,
    pub new_id: String,
    pub fence: Option<u64>,
    pub kind: Option<String>,
    pub text: Option<String>,
    pub tags: Option<Vec<String>>,
    pub metadata: Option<Value>,
    pub visibility: Option<Visibility>,
    pub embedding: Option<Vec<f32>>,
    /// If the text changes and no embedding is given: compute one later.
    pub embed_pending: bool,
    pub valid_at: Option<i64>,
}

/// Close (forget) a memory, or with `purge` (admin) erase every version's bytes.
#[derive(Debug, Clone)]
pub struct MemoryClose {
    pub actor: Principal,
    pub id: String,
    pub fence: Option<u64>,
    pub purge: bool,
}

/// Copy chosen memories of a fork's branch into its entity's canonical space.
#[derive(Debug, Clone)]
pub struct MemoryPromote {
    pub actor: Principal,
    pub fork: String,
    pub memory_ids: Vec<String>,
    /// Ids for the copies, one per memory id.
    pub new_ids: Vec<String>,
    pub fence: Option<u64>,
}

/// A memory as the store keeps it: the wire form plus what readers need to decide
/// who may see it, where it sits in the log, and its vector.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMemory {
    pub memory: Memory,
    pub owner: Owner,
    pub closed_seq: Option<i64>,
    pub changed_seq: i64,
    /// Filled by [`MemoryStore::memory_changes`] only (others leave it out: it is
    /// the bulk of a row and handlers never send it).
    pub embedding: Option<Vec<f32>>,
}

/// What a write returned: the memory and whether it already existed.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub memory: StoredMemory,
    pub deduplicated: bool,
}

/// A fork's divergence from its entity's canonical memory.
#[derive(Debug, Clone)]
pub struct ForkDiffRaw {
    pub fork: Instance,
    pub fork_point: i64,
    pub branch: Vec<StoredMemory>,
    pub canonical_since: Vec<StoredMemory>,
}

/// A memory still waiting for the hub's embedder.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEmbedding {
    pub id: String,
    pub space: String,
    pub text: String,
}

#[async_trait]
pub trait MemoryStore: Send + Sync {
    /// Writes a batch (one transaction): checks each space's write rule (fencing
    /// for canonical spaces), deduplicates exact duplicates and idempotent retries,
    /// appends `sys.memory.created` per new memory.
    async fn write_memories(&self, w: MemoryWrite) -> Result<Vec<Written>>;
    /// Writes version n+1 and closes n, in one transaction.
    async fn update_memory(&self, u: MemoryUpdate) -> Result<StoredMemory>;
    /// Closes without successor, or purges (admin). Idempotent on a closed memory.
    async fn close_memory(&self, c: MemoryClose) -> Result<StoredMemory>;
    async fn get_memory(&self, id: &str) -> Result<Option<StoredMemory>>;
    /// Every version of the memory's lineage, oldest first.
    async fn memory_history(&self, id: &str) -> Result<Vec<StoredMemory>>;
    /// Memories by creation position (the recall index's key).
    async fn memories_by_seq(&self, seqs: &[i64]) -> Result<Vec<StoredMemory>>;
    /// Rows changed after `after` (by `changed_seq`), oldest change first, with
    /// their embeddings: the feed the recall index follows.
    async fn memory_changes(&self, after: i64, limit: usize) -> Result<Vec<StoredMemory>>;
    /// The memory log's last committed position.
    async fn last_memory_seq(&self) -> Result<i64>;
    /// The dimension embeddings of `space` have, if any was stored yet.
    async fn space_dimension(&self, space: &str) -> Result<Option<u32>>;
    /// Open memories that wait for the hub's embedder, oldest first.
    async fn pending_embeddings(&self, limit: usize) -> Result<Vec<PendingEmbedding>>;
    /// Stores computed embeddings for still-pending memories (a memory closed or
    /// given a vector meanwhile is skipped); a vector whose dimension does not
    /// match its space's is dropped and the memory is no longer pending. Returns
    /// how many were stored.
    async fn set_embeddings(&self, vectors: Vec<(String, Vec<f32>)>) -> Result<usize>;
    /// Replaces an entity's trust list (admin or the entity's live primary).
    async fn put_trust(
        &self,
        entity: &str,
        trusts: Vec<String>,
        actor: &Principal,
    ) -> Result<TrustList>;
    async fn get_trust(&self, entity: &str) -> Result<TrustList>;
    async fn put_circle(
        &self,
        name: &str,
        members: Vec<String>,
        actor: &Principal,
    ) -> Result<Circle>;
    async fn list_circles(&self) -> Result<Vec<Circle>>;
    async fn fork_diff(&self, fork: &str) -> Result<ForkDiffRaw>;
    /// Copies branch memories into canonical (the entity's primary with its
    /// fence, or admin), with `provenance.promoted_from`.
    async fn promote(&self, p: MemoryPromote) -> Result<Vec<Written>>;
}

// ---------- rules shared by both backends ----------

/// What the backend loaded, inside the write's transaction, to decide a write.
pub(crate) struct WriteContext<'a> {
    pub now: i64,
    /// The caller's instance (session tokens), as stored.
    pub instance: Option<&'a Instance>,
    /// For `entity:` spaces: the entity's epoch and live primary.
    pub fence_view: Option<FenceView<'a>>,
}

/// Whether `actor` may write into `space` now. Admin may write anywhere.
pub(crate) fn check_space_write(
    space: &Space,
    actor: &Principal,
    fence: Option<u64>,
    ctx: &WriteContext<'_>,
) -> Result<()> {
    if actor.is_admin() {
        return Ok(());
    }
    if actor.kind != TokenKind::Session {
        return Err(Error::forbidden(format!(
            "a {} token may not write memories: register an instance and use its session token",
            actor.kind.as_str()
        )));
    }
    let writer = actor.instance.as_deref().unwrap_or("");
    let live = ctx
        .instance
        .is_some_and(|i| i.state == InstanceState::Live && i.lease_until.millis() >= ctx.now);
    match space {
        Space::Entity(_) => {
            let view = ctx.fence_view.unwrap_or(FenceView {
                epoch: 0,
                primary: None,
            });
            check_fence(view, writer, fence)
        }
        Space::Instance(id) => {
            if id != writer {
                return Err(Error::forbidden(format!(
                    "instance:{id} is written only by instance {id}"
                )));
            }
            if !live {
                return Err(Error::unknown_instance(writer));
            }
            Ok(())
        }
        Space::Shared(name) => {
            let Some(inst) = ctx.instance.filter(|_| live) else {
                return Err(Error::forbidden(format!(
                    "shared:{name} is written only by live instances; {writer} is not live (a ghost)"
                )));
            };
            if inst.is_unlabeled() && inst.role != Role::Primary {
                return Err(Error::forbidden(format!(
                    "shared:{name} is written only by labelled instances; {writer} has no label (a ghost)"
                )));
            }
            Ok(())
        }
    }
}

pub(crate) fn provenance(
    actor: &Principal,
    instance: Option<&Instance>,
    via: &str,
    fence: Option<u64>,
    promoted_from: Option<String>,
) -> Provenance {
    Provenance {
        instance: actor.instance.clone(),
        entity: actor.entity.clone(),
        role: instance.map(|i| i.role),
        host: instance.and_then(|i| i.host.clone()),
        token: actor.token_id.clone(),
        via: via.to_string(),
        fence,
        promoted_from,
    }
}

/// Renames the field of a 400 to `memories[i].field` for batch writes.
pub(crate) fn in_batch(e: Error, batch: bool, i: usize) -> Error {
    if !batch {
        return e;
    }
    let Some(field) = e.details.get("field").and_then(Value::as_str) else {
        return e;
    };
    let field = format!("memories[{i}].{field}");
    let message = e
        .message
        .split_once(": ")
        .map(|(_, m)| format!("{field}: {m}"))
        .unwrap_or(e.message.clone());
    let mut details = e.details.clone();
    details["field"] = json!(field);
    Error {
        code: e.code,
        message,
        details,
    }
}

pub(crate) fn dimension_mismatch(space: &str, have: u32, got: usize) -> Error {
    Error::bad_field(
        "embedding",
        format!("has {got} dimensions, but the embeddings of {space} have {have}"),
    )
}

pub(crate) fn no_circle(name: &str) -> Error {
    Error::bad_field("visibility", format!("there is no circle {name}"))
}

pub(crate) fn not_found(id: &str) -> Error {
    Error::not_found(format!("no memory {id}"))
}

pub(crate) fn closed_conflict(m: &Memory) -> Error {
    Error::conflict(match &m.superseded_by {
        Some(n) => format!("memory {} is closed: superseded by {n}", m.id),
        None => format!("memory {} is closed", m.id),
    })
    .with_details(json!({"id": m.id, "superseded_by": m.superseded_by}))
}

/// Little-endian f32s: the stored form of an embedding in both backends.
pub(crate) fn encode_vec(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn decode_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A row's columns, as both backends read them.
pub(crate) struct MemoryRow {
    pub id: String,
    pub space: String,
    pub kind: String,
    pub text: String,
    pub tags: Value,
    pub metadata: Value,
    pub visibility: String,
    pub owner_instance: Option<String>,
    pub owner_entity: Option<String>,
    pub provenance: Value,
    pub content_hash: String,
    pub version: i64,
    pub supersedes: Option<String>,
    pub superseded_by: Option<String>,
    pub valid_at: i64,
    pub invalid_at: Option<i64>,
    pub created_at: i64,
    pub seq: i64,
    pub closed_seq: Option<i64>,
    pub changed_seq: i64,
    pub purged: bool,
    pub embedding_dim: Option<i64>,
    pub embedding: Option<Vec<u8>>,
}

/// The columns [`MemoryRow`] is read from, in order. `embedding` last, so that
/// queries that do not need it select `NULL` in its place.
pub(crate) const MEMORY_COLS: &str = "id, space, kind, text, tags, metadata, visibility, owner_instance, owner_entity, provenance, content_hash, version, supersedes, superseded_by, valid_at, invalid_at, created_at, seq, closed_seq, changed_seq, purged, embedding_dim";

impl MemoryRow {
    pub(crate) fn into_stored(self) -> StoredMemory {
        StoredMemory {
            memory: Memory {
                id: self.id,
                space: self.space,
                kind: self.kind,
                text: self.text,
                tags: serde_json::from_value(self.tags).unwrap_or_default(),
                metadata: self.metadata,
                visibility: self.visibility,
                provenance: serde_json::from_value(self.provenance).unwrap_or_default(),
                content_hash: self.content_hash,
                version: self.version,
                supersedes: self.supersedes,
                superseded_by: self.superseded_by,
                valid_at: Timestamp(self.valid_at),
                invalid_at: self.invalid_at.map(Timestamp),
                created_at: Timestamp(self.created_at),
                seq: self.seq,
                embedding_dim: self.embedding_dim.map(|d| d as u32),
                purged: self.purged,
            },
            owner: Owner {
                instance: self.owner_instance,
                entity: self.owner_entity,
            },
            closed_seq: self.closed_seq,
            changed_seq: self.changed_seq,
            embedding: self.embedding.as_deref().map(decode_vec),
        }
    }
}

/// The event data of a memory change.
pub(crate) fn event_data(m: &Memory, extra: Value) -> Value {
    let mut d =
        json!({"id": m.id, "space": m.space, "seq": m.seq, "kind": m.kind, "version": m.version});
    if let (Some(o), Value::Object(e)) = (d.as_object_mut(), extra) {
        o.extend(e);
    }
    d
}

/// The trust list as stored: parsed back into the strings it was given as.
pub(crate) fn trust_list(entity: &str, stored: Option<Value>) -> TrustList {
    TrustList {
        entity: entity.to_string(),
        trusts: stored
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
    }
}

/// Who may change an entity's trust list: admin, or its live primary.
pub(crate) fn check_trust_writer(
    entity: &str,
    actor: &Principal,
    primary: Option<&str>,
) -> Result<()> {
    if actor.is_admin() {
        return Ok(());
    }
    if actor.instance.is_some() && actor.instance.as_deref() == primary {
        return Ok(());
    }
    Err(Error::forbidden(format!(
        "only an admin or the live primary of {entity} may change its trust list"
    )))
}
