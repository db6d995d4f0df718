//! Shared memory (DESIGN §5): the wire types of `/v1/memories`, `/v1/trust`,
//! `/v1/circles` and `/v1/forks`, and the pure rules every layer must agree on:
//! which spaces exist, who may see a memory, whom an entity trusts, what makes two
//! memories "the same", and what a valid memory looks like.
//!
//! Visibility and trust are expressed as *access tokens* (short strings such as
//! `entity:sisters` or `circle:ops`): a memory carries the tokens that grant sight
//! of it, a reader carries the tokens it holds, and it may see the memory iff the
//! two sets meet. The same sets are what the recall index stores in its filter
//! fields, so the predicate the index runs before scoring and the predicate the
//! store applies to a single read are one rule, proved equal to the plain-language
//! rule by the property tests below.

use crate::api::Role;
use crate::error::Error;
use crate::time::Timestamp;
use crate::validate;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Largest memory text, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 64;
pub const MAX_KIND_LEN: usize = 32;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Largest embedding accepted (OpenAI's largest model is 3072-d).
pub const MAX_EMBEDDING_DIM: usize = 4096;
pub const MAX_BATCH: usize = 1000;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
pub const MAX_RECALL_LIMIT: usize = 200;
pub const DEFAULT_RECALL_LIMIT: usize = 10;
pub const MAX_QUERY_BYTES: usize = 4 * 1024;
pub const MAX_TRUSTS: usize = 256;
pub const MAX_CIRCLE_MEMBERS: usize = 1024;

fn empty_object() -> Value {
    Value::Object(Default::default())
}

// ---------- spaces ----------

/// Where a memory lives, which decides who may write it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Space {
    /// `entity:<name>`: the entity's canonical memory (its primary, fenced, or admin).
    Entity(String),
    /// `instance:<id>`: one instance's scratch; a fork's branch.
    Instance(String),
    /// `shared:<name>`: the commons (any labelled live instance).
    Shared(String),
}

impl Space {
    pub fn parse(field: &str, s: &str) -> Result<Space, Error> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            Error::bad_field(
                field,
                format!("{s:?} must be entity:NAME, instance:ins_… or shared:NAME"),
            )
        })?;
        match kind {
            "entity" => validate::name(field, rest).map(|_| Space::Entity(rest.into())),
            "shared" => validate::name(field, rest).map(|_| Space::Shared(rest.into())),
            "instance" => {
                if !crate::ids::has_prefix(rest, crate::ids::INSTANCE) {
                    return Err(Error::bad_field(
                        field,
                        format!("{rest:?} is not an instance id (ins_…)"),
                    ));
                }
                Ok(Space::Instance(rest.into()))
            }
            other => Err(Error::bad_field(
                field,
                format!("unknown space kind {other:?}: use entity:, instance: or shared:"),
            )),
        }
    }

    pub fn canonical_entity(&self) -> Option<&str> {
        match self {
            Space::Entity(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Space::Entity(e) => write!(f, "entity:{e}"),
            Space::Instance(i) => write!(f, "instance:{i}"),
            Space::Shared(n) => write!(f, "shared:{n}"),
        }
    }
}

// ---------- visibility ----------

/// Who may see a memory (DESIGN §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// The writer instance (and admin).
    Private,
    /// Every instance of the owning entity.
    Entity,
    /// The entities of the circle (members as of the read).
    Circle(String),
    /// Any token.
    Public,
}

impl Visibility {
    pub fn parse(field: &str, s: &str) -> Result<Visibility, Error> {
        match s {
            "private" => Ok(Visibility::Private),
            "entity" => Ok(Visibility::Entity),
            "public" => Ok(Visibility::Public),
            _ => match s.strip_prefix("circle:") {
                Some(c) => validate::name(field, c).map(|_| Visibility::Circle(c.into())),
                None => Err(Error::bad_field(
                    field,
                    format!("{s:?} must be private, entity, circle:NAME or public"),
                )),
            },
        }
    }

    /// What a memory gets when the writer does not say: scratch stays private,
    /// canonical memory is the entity's, the commons are public.
    pub fn default_for(space: &Space) -> Visibility {
        match space {
            Space::Instance(_) => Visibility::Private,
            Space::Entity(_) => Visibility::Entity,
            Space::Shared(_) => Visibility::Public,
        }
    }
}

impl std::fmt::Display for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Visibility::Private => f.write_str("private"),
            Visibility::Entity => f.write_str("entity"),
            Visibility::Circle(c) => write!(f, "circle:{c}"),
            Visibility::Public => f.write_str("public"),
        }
    }
}

/// The access token every reader holds.
pub const TOKEN_PUBLIC: &str = "public";
/// The writer token of memories written by an admin token (no instance, no entity).
pub const TOKEN_ADMIN: &str = "admin";

/// Whose a memory is, for visibility: the instance that sees `private`, the entity
/// whose instances see `entity`. The writer's own identity when it has one; for an
/// admin write, the space's owner (an admin writing `entity:sisters` writes
/// sisters' memory).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    pub instance: Option<String>,
    pub entity: Option<String>,
}

impl Owner {
    /// `space_instance_entity`: for `instance:X` spaces, X's entity.
    pub fn of(
        writer_instance: Option<&str>,
        writer_entity: Option<&str>,
        space: &Space,
        space_instance_entity: Option<&str>,
    ) -> Owner {
        let instance = writer_instance.map(str::to_string).or(match space {
            Space::Instance(i) => Some(i.clone()),
            _ => None,
        });
        let entity = writer_entity.map(str::to_string).or(match space {
            Space::Entity(e) => Some(e.clone()),
            Space::Instance(_) => space_instance_entity.map(str::to_string),
            Space::Shared(_) => None,
        });
        Owner { instance, entity }
    }
}

/// The tokens that grant sight of a memory: its owner instance always; plus the
/// owner entity (`entity`), the circle (`circle:`) or everyone (`public`).
pub fn access_tokens(visibility: &Visibility, owner: &Owner) -> Vec<String> {
    let mut t = Vec::with_capacity(2);
    if let Some(i) = &owner.instance {
        t.push(format!("instance:{i}"));
    }
    match visibility {
        Visibility::Private => {}
        Visibility::Entity => {
            if let Some(e) = &owner.entity {
                t.push(format!("entity:{e}"));
            }
        }
        Visibility::Circle(c) => t.push(format!("circle:{c}")),
        Visibility::Public => t.push(TOKEN_PUBLIC.to_string()),
    }
    t
}

/// Who is reading, resolved from the caller's token and the circles its entity is
/// in. `admin` sees everything; everyone else sees what their tokens meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderView {
    pub admin: bool,
    pub tokens: Vec<String>,
}

impl ReaderView {
    /// `circles`: the circles that have the reader's entity as a member.
    pub fn new(
        admin: bool,
        entity: Option<&str>,
        instance: Option<&str>,
        circles: &[String],
    ) -> ReaderView {
        let mut tokens = vec![TOKEN_PUBLIC.to_string()];
        if let Some(i) = instance {
            tokens.push(format!("instance:{i}"));
        }
        if let Some(e) = entity {
            tokens.push(format!("entity:{e}"));
            tokens.extend(circles.iter().map(|c| format!("circle:{c}")));
        }
        ReaderView { admin, tokens }
    }

    pub fn may_see(&self, memory_tokens: &[String]) -> bool {
        self.admin || memory_tokens.iter().any(|t| self.tokens.contains(t))
    }
}

// ---------- trust ----------

/// One entry of an entity's trust list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TrustRef {
    Entity(String),
    Instance(String),
    Circle(String),
}

impl TrustRef {
    pub fn parse(field: &str, s: &str) -> Result<TrustRef, Error> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            Error::bad_field(
                field,
                format!("{s:?} must be entity:NAME, instance:ins_… or circle:NAME"),
            )
        })?;
        match kind {
            "entity" => validate::name(field, rest).map(|_| TrustRef::Entity(rest.into())),
            "circle" => validate::name(field, rest).map(|_| TrustRef::Circle(rest.into())),
            "instance" if crate::ids::has_prefix(rest, crate::ids::INSTANCE) => {
                Ok(TrustRef::Instance(rest.into()))
            }
            "instance" => Err(Error::bad_field(
                field,
                format!("{rest:?} is not an instance id (ins_…)"),
            )),
            other => Err(Error::bad_field(
                field,
                format!("unknown trust kind {other:?}: use entity:, instance: or circle:"),
            )),
        }
    }
}

impl std::fmt::Display for TrustRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustRef::Entity(e) => write!(f, "entity:{e}"),
            TrustRef::Instance(i) => write!(f, "instance:{i}"),
            TrustRef::Circle(c) => write!(f, "circle:{c}"),
        }
    }
}

/// The tokens that identify a memory's writer, for trust and writer filters.
/// An admin write (no instance, no entity) is the operator's: [`TOKEN_ADMIN`].
pub fn writer_tokens(entity: Option<&str>, instance: Option<&str>) -> Vec<String> {
    let mut t = Vec::with_capacity(2);
    if let Some(e) = entity {
        t.push(format!("entity:{e}"));
    }
    if let Some(i) = instance {
        t.push(format!("instance:{i}"));
    }
    if t.is_empty() {
        t.push(TOKEN_ADMIN.to_string());
    }
    t
}

/// The writer tokens an entity trusts: itself, the operator, and its list with
/// circles expanded to their current members.
pub fn trusted_tokens(
    entity: &str,
    trusts: &[TrustRef],
    circle_members: impl Fn(&str) -> Vec<String>,
) -> Vec<String> {
    let mut t = vec![format!("entity:{entity}"), TOKEN_ADMIN.to_string()];
    for r in trusts {
        match r {
            TrustRef::Entity(e) => t.push(format!("entity:{e}")),
            TrustRef::Instance(i) => t.push(format!("instance:{i}")),
            TrustRef::Circle(c) => {
                t.extend(circle_members(c).into_iter().map(|m| format!("entity:{m}")))
            }
        }
    }
    t.sort();
    t.dedup();
    t
}

// ---------- content ----------

/// Tags as stored: validated, deduplicated, sorted (so that the hash and the
/// index do not depend on the order a client sent them in).
pub fn normalize_tags(field: &str, tags: &[String]) -> Result<Vec<String>, Error> {
    if tags.len() > MAX_TAGS {
        return Err(Error::bad_field(field, format!("at most {MAX_TAGS} tags")));
    }
    let mut out = Vec::with_capacity(tags.len());
    for (i, t) in tags.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if t.is_empty() || t.len() > MAX_TAG_LEN {
            return Err(Error::bad_field(
                &f,
                format!("must be 1 to {MAX_TAG_LEN} bytes"),
            ));
        }
        if !t
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
        {
            return Err(Error::bad_field(
                &f,
                format!("{t:?} may contain only letters, digits, '-', '_', '.', ':' and '/'"),
            ));
        }
        out.push(t.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Kinds are short words: `fact`, `learning`, `anti_pattern`...
pub fn kind(field: &str, k: &str) -> Result<(), Error> {
    if k.is_empty() || k.len() > MAX_KIND_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    if !k
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::bad_field(
            field,
            format!("{k:?} must be a short word (letters, digits, '_', '-')"),
        ));
    }
    Ok(())
}

pub fn text(field: &str, t: &str) -> Result<(), Error> {
    if t.trim().is_empty() {
        return Err(Error::bad_field(field, "must not be empty"));
    }
    if t.len() > MAX_TEXT_BYTES {
        return Err(Error::bad_field(
            field,
            format!("{} bytes is over the limit of {MAX_TEXT_BYTES}", t.len()),
        ));
    }
    Ok(())
}

/// Embeddings must be finite and not absurdly long.
pub fn embedding(field: &str, v: &[f32]) -> Result<(), Error> {
    if v.is_empty() || v.len() > MAX_EMBEDDING_DIM {
        return Err(Error::bad_field(
            field,
            format!("must have 1 to {MAX_EMBEDDING_DIM} dimensions"),
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::bad_field(
            field,
            format!("element {i} is not a finite number"),
        ));
    }
    if v.iter().all(|x| *x == 0.0) {
        return Err(Error::bad_field(field, "must not be all zeros"));
    }
    Ok(())
}

/// JSON with object keys sorted, whatever the map type: the hash must not depend
/// on whether serde_json was built with `preserve_order`.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical_json(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `sha256:<hex>` of kind, text, normalized tags and canonical metadata: what
/// "exact duplicate" means. Visibility is not content; the store requires it to
/// match too before it deduplicates.
pub fn content_hash(kind: &str, text: &str, tags: &[String], metadata: &Value) -> String {
    let mut meta = String::new();
    canonical_json(metadata, &mut meta);
    let mut h = Sha256::new();
    for part in [kind, text] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update((tags.len() as u64).to_le_bytes());
    for t in tags {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    }
    h.update(meta.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---------- wire types ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteMemoryRequest {
    /// `entity:NAME`, `instance:ins_…` or `shared:NAME`.
    pub space: String,
    /// A short word; default `note`.
    #[serde(default)]
    pub kind: Option<String>,
    pub text: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// `private`, `entity`, `circle:NAME` or `public`; default by space
    /// (instance: private, entity: entity, shared: public).
    #[serde(default)]
    pub visibility: Option<String>,
    /// The memory's vector; all memories of a space share one dimension.
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    /// Required for `entity:` spaces (unless admin): the epoch of your primary grant.
    #[serde(default, deserialize_with = "crate::fencing::deserialize_fence")]
    pub fence: Option<u64>,
    /// When the knowledge became true; default now.
    #[serde(default)]
    pub valid_at: Option<Timestamp>,
    /// A retry with the same key by the same caller returns the first write.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteMemoryBatch {
    pub memories: Vec<WriteMemoryRequest>,
}

/// A new version: absent fields keep the current version's value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateMemoryRequest {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub visibility: Option<String>,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    #[serde(default, deserialize_with = "crate::fencing::deserialize_fence")]
    pub fence: Option<u64>,
    #[serde(default)]
    pub valid_at: Option<Timestamp>,
}

/// Set by the hub from the caller's token, never from the request body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct Provenance {
    pub instance: Option<String>,
    pub entity: Option<String>,
    pub role: Option<Role>,
    pub host: Option<String>,
    pub token: String,
    /// How the write arrived: `http`, `batch`, `promote`.
    pub via: String,
    pub fence: Option<u64>,
    /// For promoted memories: the fork-branch memory they were copied from.
    pub promoted_from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Memory {
    pub id: String,
    pub space: String,
    pub kind: String,
    /// Empty once purged.
    pub text: String,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub visibility: String,
    pub provenance: Provenance,
    pub content_hash: String,
    pub version: i64,
    pub supersedes: Option<String>,
    pub superseded_by: Option<String>,
    pub valid_at: Timestamp,
    pub invalid_at: Option<Timestamp>,
    pub created_at: Timestamp,
    /// Position in the memory log.
    pub seq: i64,
    /// Dimension of the stored embedding, if it has one yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_dim: Option<u32>,
    /// An admin purged the bytes; only this tombstone remains.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purged: bool,
}

impl Memory {
    pub fn is_open(&self) -> bool {
        self.invalid_at.is_none() && !self.purged
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemoryWritten {
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deduplicated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemoryBatchWritten {
    pub results: Vec<MemoryWritten>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemoryEnvelope {
    pub memory: Memory,
    /// With `?history=true`: every version, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Memory>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WriterFilter {
    #[serde(default)]
    pub entities: Vec<String>,
    #[serde(default)]
    pub instances: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    #[serde(default)]
    pub query: String,
    /// Empty: every space the caller may see.
    #[serde(default)]
    pub spaces: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<String>,
    /// A memory must carry every tag listed.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Keep only writers the caller's entity trusts (itself always).
    #[serde(default)]
    pub trusted_only: bool,
    #[serde(default)]
    pub writers: WriterFilter,
    /// Created at or after.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Created at or before.
    #[serde(default)]
    pub until: Option<Timestamp>,
    /// The view at a past time: what was recorded and valid then.
    #[serde(default)]
    pub as_of: Option<Timestamp>,
    /// Also closed (superseded, forgotten) versions.
    #[serde(default)]
    pub include_closed: bool,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Halves a hit's score every this many ms of age; none: no recency weighting.
    #[serde(default)]
    pub recency_half_life_ms: Option<i64>,
    /// The query's vector (else the hub's embedder computes one, if configured).
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
}

/// Why a hit scored what it did. Ranks are 1-based positions in each list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct Explain {
    pub bm25: Option<f32>,
    pub bm25_rank: Option<u32>,
    /// Cosine similarity.
    pub vector: Option<f32>,
    pub vector_rank: Option<u32>,
    /// The recency factor applied (1 without a half-life).
    pub recency: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Hit {
    pub memory: Memory,
    pub score: f32,
    pub explain: Explain,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// `fulltext` or `hybrid`.
    pub mode: String,
    /// Why the search is full-text only, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub results: Vec<Hit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutTrustRequest {
    /// `entity:NAME`, `instance:ins_…`, `circle:NAME`.
    pub trusts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TrustList {
    pub entity: String,
    pub trusts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCircleRequest {
    /// Entity names.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Circle {
    pub name: String,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CircleList {
    pub circles: Vec<Circle>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkDiff {
    /// The fork instance's id.
    pub fork: String,
    pub entity: String,
    /// The memory-log position the fork diverged at.
    pub fork_point: i64,
    /// The fork's own memories (`instance:<fork>`), open versions.
    pub branch: Vec<Memory>,
    /// Canonical memories written or closed after the fork point.
    pub canonical_since: Vec<Memory>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub memory_ids: Vec<String>,
    #[serde(default, deserialize_with = "crate::fencing::deserialize_fence")]
    pub fence: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Promoted {
    pub promoted: Vec<MemoryWritten>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn spaces_parse_and_name_the_field() {
        assert_eq!(
            Space::parse("space", "entity:sisters").unwrap(),
            Space::Entity("sisters".into())
        );
        assert_eq!(
            Space::parse("space", "shared:providers")
                .unwrap()
                .to_string(),
            "shared:providers"
        );
        let id = crate::ids::new_id("ins");
        assert_eq!(
            Space::parse("space", &format!("instance:{id}")).unwrap(),
            Space::Instance(id)
        );
        for bad in [
            "sisters",
            "team:x",
            "entity:",
            "instance:nope",
            "shared:a b",
            "",
        ] {
            assert_eq!(
                Space::parse("space", bad).unwrap_err().details["field"],
                "space",
                "{bad}"
            );
        }
    }

    #[test]
    fn visibility_parses() {
        assert_eq!(
            Visibility::parse("visibility", "circle:ops").unwrap(),
            Visibility::Circle("ops".into())
        );
        assert!(Visibility::parse("visibility", "circle:").is_err());
        assert!(Visibility::parse("visibility", "everyone").is_err());
        assert_eq!(Visibility::Circle("ops".into()).to_string(), "circle:ops");
    }

    #[test]
    fn hash_ignores_tag_order_and_key_order_but_not_content() {
        let a = content_hash(
            "learning",
            "x",
            &normalize_tags("tags", &["b".into(), "a".into()]).unwrap(),
            &json!({"k": 1, "j": [1, {"z": 1, "y": 2}]}),
        );
        let b = content_hash(
            "learning",
            "x",
            &normalize_tags("tags", &["a".into(), "b".into(), "a".into()]).unwrap(),
            &json!({"j": [1, {"y": 2, "z": 1}], "k": 1}),
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            content_hash("learning", "y", &["a".into(), "b".into()], &json!({}))
        );
        assert_ne!(
            content_hash("ab", "c", &[], &json!({})),
            content_hash("a", "bc", &[], &json!({}))
        );
        assert!(a.starts_with("sha256:"));
    }

    #[test]
    fn bad_content_is_named() {
        assert_eq!(text("text", " ").unwrap_err().details["field"], "text");
        assert!(text("text", &"a".repeat(MAX_TEXT_BYTES + 1)).is_err());
        assert!(text("text", &"a".repeat(MAX_TEXT_BYTES)).is_ok());
        assert!(embedding("embedding", &[1.0, f32::NAN]).is_err());
        assert!(embedding("embedding", &[f32::INFINITY]).is_err());
        assert!(embedding("embedding", &[]).is_err());
        assert!(embedding("embedding", &[0.5, 0.1]).is_ok());
        assert!(kind("kind", "anti_pattern").is_ok());
        assert!(kind("kind", "two words").is_err());
        assert_eq!(
            normalize_tags("tags", &["ok".into(), "not ok".into()])
                .unwrap_err()
                .details["field"],
            "tags[1]"
        );
    }

    #[test]
    fn trust_expands_circles_and_always_includes_self() {
        let t = trusted_tokens(
            "sisters",
            &[
                TrustRef::Circle("ops".into()),
                TrustRef::Instance("ins_x".into()),
            ],
            |c| {
                if c == "ops" {
                    vec!["anvil".into()]
                } else {
                    vec![]
                }
            },
        );
        assert!(t.contains(&"entity:sisters".to_string()));
        assert!(t.contains(&"entity:anvil".to_string()));
        assert!(t.contains(&"instance:ins_x".to_string()));
        assert!(!t.contains(&"entity:forge".to_string()));
    }

    /// The plain-language rule of DESIGN §5, written independently of tokens.
    fn rule(
        vis: &Visibility,
        owner: &Owner,
        r_admin: bool,
        r_entity: Option<&str>,
        r_instance: Option<&str>,
        r_circles: &[String],
    ) -> bool {
        if r_admin {
            return true;
        }
        if owner.instance.is_some() && owner.instance.as_deref() == r_instance {
            return true;
        }
        match vis {
            Visibility::Private => false,
            Visibility::Entity => owner.entity.is_some() && owner.entity.as_deref() == r_entity,
            Visibility::Circle(c) => r_entity.is_some() && r_circles.contains(c),
            Visibility::Public => true,
        }
    }

    fn pick(xs: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
        proptest::option::of(proptest::sample::select(xs.to_vec()).prop_map(str::to_string))
    }

    proptest! {
        #[test]
        fn tokens_agree_with_the_rule(
            vis in prop_oneof![
                Just(Visibility::Private), Just(Visibility::Entity), Just(Visibility::Public),
                Just(Visibility::Circle("ops".into())), Just(Visibility::Circle("dev".into()))
            ],
            o_inst in pick(&["ins_a", "ins_b"]),
            o_ent in pick(&["sisters", "anvil"]),
            r_admin: bool,
            r_inst in pick(&["ins_a", "ins_b", "ins_c"]),
            r_ent in pick(&["sisters", "anvil", "forge"]),
            in_ops: bool,
            in_dev: bool,
        ) {
            let owner = Owner { instance: o_inst, entity: o_ent };
            let mut circles = vec![];
            if in_ops { circles.push("ops".to_string()); }
            if in_dev { circles.push("dev".to_string()); }
            let reader = ReaderView::new(r_admin, r_ent.as_deref(), r_inst.as_deref(), &circles);
            let by_tokens = reader.may_see(&access_tokens(&vis, &owner));
            let by_rule = rule(&vis, &owner, r_admin, r_ent.as_deref(), r_inst.as_deref(), &circles);
            prop_assert_eq!(by_tokens, by_rule);
        }

        #[test]
        fn trust_tokens_agree_with_the_rule(
            w_ent in pick(&["sisters", "anvil", "forge"]),
            w_inst in pick(&["ins_a", "ins_b"]),
            trust_anvil: bool,
            trust_ins_b: bool,
            trust_ops: bool,
        ) {
            let mut trusts = vec![];
            if trust_anvil { trusts.push(TrustRef::Entity("anvil".into())); }
            if trust_ins_b { trusts.push(TrustRef::Instance("ins_b".into())); }
            if trust_ops { trusts.push(TrustRef::Circle("ops".into())); }
            let trusted = trusted_tokens("sisters", &trusts, |_| vec!["forge".into()]);
            let writer = writer_tokens(w_ent.as_deref(), w_inst.as_deref());
            let by_tokens = writer.iter().any(|t| trusted.contains(t));
            let admin_write = w_ent.is_none() && w_inst.is_none();
            let by_rule = admin_write
                || w_ent.as_deref() == Some("sisters")
                || (trust_anvil && w_ent.as_deref() == Some("anvil"))
                || (trust_ops && w_ent.as_deref() == Some("forge"))
                || (trust_ins_b && w_inst.as_deref() == Some("ins_b"));
            prop_assert_eq!(by_tokens, by_rule);
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = Space::parse("space", &s);
            let _ = Visibility::parse("visibility", &s);
            let _ = TrustRef::parse("trusts", &s);
        }
    }
}
