//! Request and response bodies of HTTP API v1, shared by the server (which also
//! generates `/openapi.json` from them) and the client.
//!
//! Requests deny unknown fields: a misspelt `fence` must be a 400, not a silently
//! unfenced write.

use crate::time::Timestamp;
use crate::token::TokenKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

fn empty_object() -> Value {
    Value::Object(Default::default())
}

// ---------- tokens ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// `admin`, `agent` or `reader` (session tokens come from registering an instance).
    pub kind: TokenKind,
    /// Required for `agent`: the entity the token may register instances of.
    #[serde(default)]
    pub entity: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TokenInfo {
    pub id: String,
    pub kind: TokenKind,
    pub entity: Option<String>,
    pub name: Option<String>,
    /// Session tokens: the instance they belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub kind: TokenKind,
    pub entity: Option<String>,
    pub name: Option<String>,
    pub created_at: Timestamp,
    /// The secret. Shown once; the hub keeps only its hash.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `GET /v1/whoami`: what the hub makes of the caller's token. An agent that was
/// handed a token (say, in an MCP client's config) can ask who it acts as.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WhoAmI {
    pub token_id: String,
    pub kind: TokenKind,
    /// Agent tokens: the entity they are bound to. Session tokens: the instance's entity.
    pub entity: Option<String>,
    /// Session tokens: the instance they are bound to.
    pub instance: Option<String>,
}

// ---------- instances ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Authoritative; at most one live per entity.
    Primary,
    /// Labelled, non-authoritative.
    #[default]
    Secondary,
    /// Diverged from a point in the entity's memory log.
    Fork,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Fork => "fork",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "primary" => Some(Role::Primary),
            "secondary" => Some(Role::Secondary),
            "fork" => Some(Role::Fork),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Live,
    Expired,
    Closed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Live => "live",
            InstanceState::Expired => "expired",
            InstanceState::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<InstanceState> {
        match s {
            "live" => Some(InstanceState::Live),
            "expired" => Some(InstanceState::Expired),
            "closed" => Some(InstanceState::Closed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstanceRequest {
    pub entity: String,
    #[serde(default)]
    pub role: Role,
    /// Required in spirit for secondaries and forks: without one the instance is a ghost.
    #[serde(default)]
    pub label: Option<String>,
    /// Lease TTL; heartbeat every TTL/3. Default 15000, range 1000..=86400000.
    #[serde(default)]
    pub ttl_ms: Option<i64>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub persistent: bool,
    /// Forks: the instance they diverged from.
    #[serde(default)]
    pub forked_from: Option<String>,
    #[serde(default = "empty_object")]
    pub meta: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Instance {
    pub id: String,
    pub entity: String,
    pub role: Role,
    pub label: Option<String>,
    pub state: InstanceState,
    pub persistent: bool,
    pub capabilities: Vec<String>,
    pub endpoint: Option<String>,
    pub host: Option<String>,
    pub version: Option<String>,
    pub forked_from: Option<String>,
    /// Forks: the memory-log position they diverged at.
    pub fork_point: Option<i64>,
    pub meta: Value,
    pub ttl_ms: i64,
    pub registered_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub lease_until: Timestamp,
}

impl Instance {
    /// Secondaries and forks must say what they are for; one that does not is a ghost.
    pub fn is_unlabeled(&self) -> bool {
        is_unlabeled(self.label.as_deref())
    }

    /// The ghost rule: an unlabelled secondary or fork may not write shared state
    /// until it says what it is for. A primary needs no label.
    pub fn refuse_ghost(&self) -> Result<(), crate::Error> {
        refuse_ghost(&self.id, self.role, self.label.as_deref())
    }

    /// Whether this instance may write shared state as itself: it is live (an
    /// ended one is unknown to the fleet) and not a ghost. The stores run this
    /// inside the write's own transaction where they can (enqueue, claim), so an
    /// instance that ends or is demoted meanwhile cannot slip one more write in.
    pub fn refuse_unless_writer(&self) -> Result<(), crate::Error> {
        refuse_unless_writer(&self.id, self.state, self.role, self.label.as_deref())
    }
}

/// `Instance::is_unlabeled` on the label alone.
pub fn is_unlabeled(label: Option<&str>) -> bool {
    label.map(str::trim).unwrap_or("").is_empty()
}

/// `Instance::refuse_ghost` on the fields it reads, for a store that reads only
/// those (the SQLite writer's hot paths do).
pub fn refuse_ghost(id: &str, role: Role, label: Option<&str>) -> Result<(), crate::Error> {
    if role != Role::Primary && is_unlabeled(label) {
        return Err(crate::Error::forbidden(format!(
            "instance {id} has no label: it is a ghost until labelled (PATCH /v1/instances/{id} {{\"label\": …}})"
        )));
    }
    Ok(())
}

/// `Instance::refuse_unless_writer` on the fields it reads.
pub fn refuse_unless_writer(
    id: &str,
    state: InstanceState,
    role: Role,
    label: Option<&str>,
) -> Result<(), crate::Error> {
    if state != InstanceState::Live {
        return Err(crate::Error::unknown_instance(id));
    }
    refuse_ghost(id, role, label)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub instance: Instance,
    /// Bearer token for every later call by this instance. Shown once.
    pub session_token: String,
    /// The epoch of the primary grant, when registered as primary.
    pub fence: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchInstanceRequest {
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub meta: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HeartbeatResponse {
    pub lease_until: Timestamp,
    pub role: Role,
    pub epoch: u64,
    /// The instance's fence when it is the primary.
    pub fence: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceEnvelope {
    pub instance: Instance,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceList {
    pub instances: Vec<Instance>,
}

// ---------- entities, primaries ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EntitySummary {
    pub name: String,
    pub epoch: u64,
    /// Id of the live primary, if any.
    pub primary: Option<String>,
    pub live_instances: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EntityList {
    pub entities: Vec<EntitySummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EntityDetail {
    pub name: String,
    pub epoch: u64,
    pub primary: Option<Instance>,
    /// Live instances.
    pub instances: Vec<Instance>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    pub instance: String,
    /// Block up to this long for the role to become free (like etcd's Campaign).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PrimaryGrant {
    pub instance: String,
    pub epoch: u64,
    /// The fencing token: equal to the epoch of this grant.
    pub fence: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ResignRequest {
    /// Admin only: the primary to remove. An instance resigns itself.
    #[serde(default)]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resigned {
    pub instance: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteResponse {
    pub instance: Instance,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Ghost {
    pub instance: Option<String>,
    pub entity: Option<String>,
    /// `unlabeled`, `unknown_instance`, `expired`, `closed`.
    pub reason: String,
    pub seen_at: Timestamp,
    pub host: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GhostList {
    pub ghosts: Vec<Ghost>,
}

// ---------- entity state ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutStateRequest {
    pub value: Value,
    /// Required for instances: the epoch of your primary grant.
    #[serde(default, deserialize_with = "crate::fencing::deserialize_fence")]
    pub fence: Option<u64>,
    /// Compare-and-set: the write applies only if the key is at this revision (0 = absent).
    #[serde(default)]
    pub if_revision: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DeleteStateRequest {
    #[serde(default, deserialize_with = "crate::fencing::deserialize_fence")]
    pub fence: Option<u64>,
    #[serde(default)]
    pub if_revision: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct StateEntry {
    pub key: String,
    pub value: Value,
    pub revision: i64,
    pub updated_by: String,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StateList {
    pub entity: String,
    pub entries: Vec<StateEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: bool,
}

// ---------- events ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct EventSource {
    pub instance: Option<String>,
    pub entity: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub topic: String,
    pub time: Timestamp,
    pub source: EventSource,
    pub data: Value,
}

// ---------- status ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HubStatus {
    pub version: String,
    pub backend: String,
    pub hub_id: String,
    pub uptime_ms: u64,
    pub entities: u64,
    pub live_instances: u64,
    pub ghosts: u64,
    pub last_event_seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Dot-separated words; `sys.…` is the hub's own.
    pub topic: String,
    #[serde(default)]
    pub data: Value,
    /// Publishing again with the same key (from the same entity, or the same
    /// token for callers without one) returns the first event's seq instead of
    /// appending a second event: a client that lost the reply, or replays its
    /// offline spool, can send again safely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Published {
    pub seq: i64,
    /// True when the idempotency key had been used: `seq` is the first event's.
    #[serde(default)]
    pub deduplicated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<Event>,
    /// Pass as `from` to continue after what this page covered.
    pub next: i64,
}

// ---------- messages ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    /// `instance:ins_…`, `entity:NAME` (every live instance), `primary:NAME`, `cap:CAPABILITY`.
    pub to: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub body: Value,
    #[serde(default)]
    pub thread_id: Option<String>,
    #[serde(default)]
    pub ack_required: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SentMessage {
    pub id: String,
    pub thread_id: String,
    pub delivered_to: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct MessageFrom {
    pub instance: Option<String>,
    pub entity: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InboxMessage {
    pub id: String,
    pub from: MessageFrom,
    pub to: String,
    pub subject: String,
    pub body: Value,
    pub thread_id: String,
    pub ack_required: bool,
    pub acked: bool,
    pub created_at: Timestamp,
    /// Position in this instance's inbox; pass as `after` to read on.
    pub cursor: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InboxPage {
    pub messages: Vec<InboxMessage>,
    pub next: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Acked {
    pub acked: bool,
}

// ---------- work queue ----------

pub use crate::task::TaskState;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    pub queue: String,
    #[serde(default)]
    pub payload: Value,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Capabilities the claiming instance must have.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Only this instance may claim it.
    #[serde(default)]
    pub target: Option<String>,
    /// The same key again returns the same task (`deduplicated: true`).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Default 3.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// First retry delay; doubles each attempt. Default 1000.
    #[serde(default)]
    pub backoff_ms: Option<i64>,
    /// Not claimable before this time (state `scheduled` until then).
    #[serde(default)]
    pub not_before: Option<Timestamp>,
    /// Claimable only once all of these completed; cancelled if one dies.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Default lease for claims of this task when the claim does not say.
    #[serde(default)]
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Task {
    pub id: String,
    pub queue: String,
    pub state: TaskState,
    pub priority: i32,
    pub payload: Value,
    pub requires: Vec<String>,
    pub target: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff_ms: i64,
    pub timeout_ms: Option<i64>,
    pub claimed_by: Option<String>,
    pub lease_until: Option<Timestamp>,
    pub progress: Option<Value>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub not_before: Option<Timestamp>,
    pub depends_on: Vec<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub completed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskEnvelope {
    pub task: Task,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deduplicated: bool,
    /// Only from a completion with `claim_next`: the tasks it claimed (possibly none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Vec<ClaimedTask>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBatchRequest {
    pub tasks: Vec<EnqueueRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    #[serde(default)]
    pub queues: Vec<String>,
    /// 1..=1000, default 1.
    #[serde(default)]
    pub max: Option<u32>,
    /// Lease of the claim; default the task's timeout_ms, else 30000.
    #[serde(default)]
    pub lease_ms: Option<i64>,
    /// Wait up to this long for something claimable (0..=60000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClaimedTask {
    #[serde(flatten)]
    pub task: Task,
    /// Present with heartbeat, complete and fail; stale once the claim is lost.
    pub claim: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimResponse {
    pub tasks: Vec<ClaimedTask>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskHeartbeatRequest {
    pub claim: String,
    #[serde(default)]
    pub progress: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskLease {
    pub lease_until: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    pub claim: String,
    #[serde(default)]
    pub result: Value,
    /// Also claim the caller's next task(s), in the same transaction as the
    /// completion (both or neither; with `wait_ms`, a long poll follows a
    /// completion that found nothing to claim): a worker's loop in one call.
    /// The claimed tasks are in the answer's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_next: Option<ClaimRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    pub claim: String,
    #[serde(default)]
    pub error: String,
    /// Default true: retry after backoff while attempts remain.
    #[serde(default)]
    pub retry: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteItem {
    pub id: String,
    pub claim: String,
    #[serde(default)]
    pub result: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBatchRequest {
    pub items: Vec<CompleteItem>,
    /// Also claim the caller's next tasks, in the same transaction as the
    /// completions (each item keeps its own outcome; a refused claim changes
    /// nothing); they come back in the answer's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_next: Option<ClaimRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ItemOutcome {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompleteBatchResponse {
    pub results: Vec<ItemOutcome>,
    /// Only with `claim_next`: the tasks it claimed (possibly none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Vec<ClaimedTask>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct QueueStats {
    pub name: String,
    pub pending: u64,
    pub scheduled: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub dead: u64,
    pub cancelled: u64,
    pub oldest_pending_age_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PutScheduleRequest {
    pub queue: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub every_ms: Option<i64>,
    /// 5 fields: minute hour day month weekday (UTC).
    #[serde(default)]
    pub cron: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Schedule {
    pub name: String,
    pub queue: String,
    pub payload: Value,
    pub every_ms: Option<i64>,
    pub cron: Option<String>,
    pub priority: i32,
    pub requires: Vec<String>,
    pub max_attempts: u32,
    pub next_due: Timestamp,
    pub last_enqueued_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<Schedule>,
}

// ---------- dispatch ----------

pub use crate::dispatch::{IfUnderMin, Quorum, Reducer, ReducerKind};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DispatchSelect {
    #[serde(default)]
    pub entity: Option<String>,
    /// The peer must have all of these.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Default: primary and secondary.
    #[serde(default)]
    pub roles: Option<Vec<Role>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchRequest {
    /// A word; peers receive the work in queue `dispatch.<command>`.
    pub command: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub select: DispatchSelect,
    pub quorum: Quorum,
    #[serde(default)]
    pub min: Option<usize>,
    #[serde(default)]
    pub max: Option<usize>,
    /// Deadline from now; default 30000, range 100..=3600000.
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    /// Default `all`.
    #[serde(default)]
    pub reducer: Option<Reducer>,
    #[serde(default)]
    pub if_under_min: IfUnderMin,
    /// Only idempotent commands are retried on another peer.
    #[serde(default)]
    pub idempotent: bool,
    /// Default true: answer when the dispatch is done; false: answer at once.
    #[serde(default)]
    pub wait: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DispatchPeer {
    pub instance: String,
    pub task: String,
    /// pending, running, completed, failed, timeout, cancelled.
    pub state: String,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub latency_ms: Option<i64>,
    /// Answered after the dispatch had its answer: recorded, not used.
    pub late: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DispatchView {
    pub id: String,
    pub command: String,
    /// running, completed, degraded, failed.
    pub state: String,
    pub result: Option<Value>,
    /// Peers the reducer left out, with the reason; majority ties.
    pub outcome: Value,
    pub peers: Vec<DispatchPeer>,
    pub selected: usize,
    pub responded: usize,
    pub created_at: Timestamp,
    pub deadline: Timestamp,
    pub finished_at: Option<Timestamp>,
}

// ---------- breakers and leases (wire types live with their rules) ----------

pub use crate::breaker::{
    BreakerList, BreakerState, BreakerView, ObservationBatch, ObservationRequest, ObserveBody,
    Observed, Outcome, ProbeResponse,
};
pub use crate::lease::{
    AcquireLeaseRequest, Lease, LeaseEnvelope, LeaseList, LeaseMode, RenewLeaseRequest,
};
