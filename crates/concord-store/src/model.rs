//! Inputs and outputs of store operations that are not wire types.

use concord_core::api::{Instance, InstanceState, RegisterInstanceRequest, Role};
use concord_core::authz::Principal;
use concord_core::token::TokenKind;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub kind: TokenKind,
    pub entity: Option<String>,
    pub name: Option<String>,
    pub instance: Option<String>,
    pub secret_hash: String,
}

/// A validated registration, with the ids and session token chosen by the hub.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub id: String,
    pub request: RegisterInstanceRequest,
    pub ttl_ms: i64,
    pub session_token_id: String,
    pub session_secret_hash: String,
    /// The replica registering it: it owns the lease until another replica takes it.
    pub owner: String,
    /// Token that registered it (for the event's source).
    pub registered_by: String,
    /// Refuse the registration when the entity already has this many live instances.
    pub max_live_per_entity: Option<u32>,
}

/// The error for an entity at its live-instance limit.
pub fn too_many_instances(entity: &str, limit: u32) -> concord_core::Error {
    concord_core::Error::conflict(format!(
        "entity {entity} already has {limit} live instances (the hub's --max-instances-per-entity); close some first"
    ))
    .with_details(serde_json::json!({"entity": entity, "limit": limit}))
}

#[derive(Debug, Clone)]
pub struct Registration {
    pub instance: Instance,
    pub epoch: u64,
    pub fence: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct DurableHeartbeat {
    pub instance: Instance,
    pub epoch: u64,
    pub fence: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    pub entity: Option<String>,
    pub role: Option<Role>,
    /// `None` lists every state.
    pub state: Option<InstanceState>,
}

#[derive(Debug, Clone)]
pub struct NewGhost {
    pub instance: Option<String>,
    pub entity: Option<String>,
    pub reason: String,
    pub host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StateWrite {
    pub entity: String,
    pub key: String,
    pub value: Value,
    pub fence: Option<u64>,
    pub if_revision: Option<i64>,
    pub actor: Principal,
}

#[derive(Debug, Clone)]
pub struct StateDelete {
    pub entity: String,
    pub key: String,
    pub fence: Option<u64>,
    pub if_revision: Option<i64>,
    pub actor: Principal,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub thread_id: Option<String>,
    pub from: concord_core::api::MessageFrom,
    pub token: String,
    pub to: concord_core::address::Address,
    /// The address as written (`entity:sisters`).
    pub to_text: String,
    pub subject: String,
    pub body: Value,
    pub ack_required: bool,
}

/// Event topics the hub appends (DESIGN §6: `sys.` is reserved for the hub).
pub mod topics {
    pub const INSTANCE_REGISTERED: &str = "sys.instance.registered";
    pub const INSTANCE_UPDATED: &str = "sys.instance.updated";
    pub const INSTANCE_EXPIRED: &str = "sys.instance.expired";
    pub const INSTANCE_CLOSED: &str = "sys.instance.closed";
    pub const PRIMARY_GRANTED: &str = "sys.primary.granted";
    pub const PRIMARY_RELEASED: &str = "sys.primary.released";
    pub const PRIMARY_TRANSFERRED: &str = "sys.primary.transferred";
    pub const GHOST: &str = "sys.ghost";
    pub const STATE_CHANGED: &str = "sys.state.changed";
    pub const TOKEN_CREATED: &str = "sys.token.created";
    pub const TOKEN_REVOKED: &str = "sys.token.revoked";
    pub const MESSAGE_SENT: &str = "sys.message.sent";
    pub const MESSAGE_ACKED: &str = "sys.message.acked";
    pub const TASK_ENQUEUED: &str = "sys.task.enqueued";
    pub const TASK_CLAIMED: &str = "sys.task.claimed";
    pub const TASK_COMPLETED: &str = "sys.task.completed";
    pub const TASK_FAILED: &str = "sys.task.failed";
    pub const TASK_DEAD: &str = "sys.task.dead";
    pub const TASK_CANCELLED: &str = "sys.task.cancelled";
    pub const TASK_REQUEUED: &str = "sys.task.requeued";
    pub const SCHEDULE_CHANGED: &str = "sys.schedule.changed";
    pub const DISPATCH_CREATED: &str = "sys.dispatch.created";
    pub const DISPATCH_PEERS_ADDED: &str = "sys.dispatch.peers_added";
    pub const DISPATCH_FINISHED: &str = "sys.dispatch.finished";
}
