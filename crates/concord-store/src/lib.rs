//! The [`Store`] trait: Concord's domain operations, each atomic, and its two
//! backends (embedded SQLite, PostgreSQL).
//!
//! The trait speaks the domain (`register_instance`, `campaign`, `put_state`), never
//! SQL: every operation that checks and then writes (fencing, primary election) does
//! both inside one transaction of the backend, and appends its events to the log in
//! that same transaction. Time for leases comes from the store's clock (the hub's for
//! SQLite, the database's `now()` for PostgreSQL), so replicas never disagree.

pub mod breaker;
pub mod dispatch;
pub mod lease;
mod memory;
mod model;
pub mod postgres;
pub mod queue;
pub mod sqlite;
mod write_stats;

pub use breaker::*;
pub use dispatch::*;
pub use lease::*;
pub use memory::*;
pub use model::*;
pub use queue::*;
pub use write_stats::WriteStats;

use async_trait::async_trait;
use concord_core::api::{
    EntityDetail, EntitySummary, Event, Ghost, HeartbeatResponse, Instance, PatchInstanceRequest,
    PrimaryGrant, Resigned, StateEntry, TokenInfo,
};
use concord_core::authz::Principal;
use concord_core::Result;
use std::sync::Arc;

/// Shared handle to whichever backend the hub runs on.
pub type DynStore = Arc<dyn Store>;

#[async_trait]
pub trait Store:
    EventStore
    + QueueStore
    + DispatchStore
    + MemoryStore
    + BreakerStore
    + LeaseStore
    + Send
    + Sync
    + 'static
{
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Counters of this process's write transactions (see [`WriteStats`]).
    fn write_stats(&self) -> &WriteStats;

    /// The store's clock in ms since the epoch (the database's for PostgreSQL).
    async fn now_ms(&self) -> Result<i64>;

    // ----- tokens -----

    /// Installs an admin token with this secret hash. With `only_if_none`, does so only
    /// when no admin token exists yet (first start). Returns whether one was created.
    async fn bootstrap_admin(&self, secret_hash: &str, only_if_none: bool) -> Result<bool>;
    async fn create_token(&self, token: NewToken) -> Result<TokenInfo>;
    /// Lists admin, agent and reader tokens (session tokens are listed with their instance).
    async fn list_tokens(&self) -> Result<Vec<TokenInfo>>;
    /// Revokes a token; false if there was no such live token.
    async fn revoke_token(&self, id: &str) -> Result<bool>;
    /// Resolves a secret's hash to its caller; `None` for unknown or revoked tokens.
    async fn authenticate(&self, secret_hash: &str) -> Result<Option<Principal>>;

    // ----- instances and presence -----

    /// Registers an instance (and, for `role: primary`, grants the primary role in
    /// the same transaction, or fails with `primary_held`).
    async fn register_instance(&self, new: NewInstance) -> Result<Registration>;
    /// The durable part of a heartbeat: writes the lease ahead and takes lease
    /// ownership for `owner`. For an instance that is not live it records a ghost
    /// and returns `unknown_instance`.
    async fn heartbeat(&self, instance: &str, owner: &str) -> Result<DurableHeartbeat>;
    /// Expires `instance` if it is still live and `owner` still owns its lease (the
    /// in-memory expiry of the replica that received its last heartbeat).
    async fn expire_owned(&self, instance: &str, owner: &str) -> Result<Option<Instance>>;
    /// Expires every live instance whose durable lease has passed (store clock).
    /// Safe to run on every replica at once: each instance is expired once.
    async fn expire_due(&self, limit: usize) -> Result<Vec<Instance>>;
    async fn close_instance(&self, instance: &str, actor: &Principal) -> Result<Instance>;
    async fn update_instance(
        &self,
        instance: &str,
        patch: PatchInstanceRequest,
    ) -> Result<Instance>;
    async fn get_instance(&self, instance: &str) -> Result<Option<Instance>>;
    async fn list_instances(&self, filter: InstanceFilter) -> Result<Vec<Instance>>;
    /// Records a heartbeat or call from something the hub does not know as live.
    async fn record_ghost(&self, ghost: NewGhost) -> Result<()>;
    /// Unlabelled live secondaries/forks plus recorded ghosts, newest first.
    async fn list_ghosts(&self) -> Result<Vec<Ghost>>;

    // ----- entities and primaries -----

    async fn list_entities(&self) -> Result<Vec<EntitySummary>>;
    async fn get_entity(&self, entity: &str) -> Result<Option<EntityDetail>>;
    /// Grants the primary role to `instance` if no live primary holds it
    /// (`primary_held` with `details.holder` otherwise). Increments the epoch.
    async fn campaign(&self, entity: &str, instance: &str) -> Result<PrimaryGrant>;
    /// The primary steps down and stays live as a secondary. `instance: None` (admin)
    /// removes whoever holds it.
    async fn resign(&self, entity: &str, instance: Option<&str>) -> Result<Resigned>;
    /// Atomic handover to `to`. `from: None` is an admin transfer.
    async fn transfer(&self, entity: &str, from: Option<&str>, to: &str) -> Result<PrimaryGrant>;
    /// The live primary, or with `version`, a live instance of that version (primary first).
    async fn route(&self, entity: &str, version: Option<&str>) -> Result<Option<Instance>>;
    /// Epoch and live primary id of every entity (heartbeat answers are served from this).
    async fn entity_epoch(&self, entity: &str) -> Result<(u64, Option<String>)>;

    // ----- entity state (fenced) -----

    async fn put_state(&self, write: StateWrite) -> Result<StateEntry>;
    async fn delete_state(&self, write: StateDelete) -> Result<bool>;
    async fn get_state(&self, entity: &str, key: &str) -> Result<Option<StateEntry>>;
    async fn list_state(&self, entity: &str) -> Result<Vec<StateEntry>>;

    // ----- events -----

    /// Events with `seq > after`, in order, at most `limit`.
    async fn read_events(&self, after: i64, limit: usize) -> Result<Vec<Event>>;
    async fn last_event_seq(&self) -> Result<i64>;

    /// The newest event seq this process knows was committed: updated after every
    /// local commit that appended events and, on PostgreSQL, by the LISTEN/NOTIFY
    /// hint from other replicas. A wake-up signal only: readers fetch the events
    /// themselves with [`Store::read_events`].
    fn watch_events(&self) -> tokio::sync::watch::Receiver<i64>;

    /// Changes when the memory log may have moved: what wakes the recall index and
    /// the embedder. A wake-up hint, as [`Store::watch_events`]; by default the
    /// same (every commit that appended events, which memory writes do, and on
    /// PostgreSQL every other replica's NOTIFY). SQLite narrows it to commits that
    /// took a memory-log position, so a queue or event load does not make the
    /// recall index re-read the store after every group commit.
    fn watch_memory(&self) -> tokio::sync::watch::Receiver<i64> {
        self.watch_events()
    }
}

/// The event log's write side and agent inboxes (DESIGN §6).
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends an event; returns its seq.
    async fn publish(
        &self,
        topic: &str,
        source: concord_core::api::EventSource,
        data: serde_json::Value,
    ) -> Result<i64>;
    /// Appends an event unless `key` was used for an event before in `scope`
    /// (see `concord_core::idempotency`): then nothing is appended and the first
    /// event's seq comes back with `true`. The check and the append are one
    /// transaction, so two concurrent publishes with one key append one event.
    async fn publish_once(
        &self,
        topic: &str,
        source: concord_core::api::EventSource,
        data: serde_json::Value,
        scope: &str,
        key: &str,
    ) -> Result<(i64, bool)>;
    /// Events with seq <= this were removed by retention (0: none yet).
    async fn event_floor(&self) -> Result<i64>;
    /// Removes events older than `max_age_ms` or beyond the newest `max_count`,
    /// idempotency keys older than `max_age_ms`, and inbox entries of instances that ended more than `inbox_retention_ms` ago.
    async fn prune(&self, max_age_ms: i64, max_count: i64, inbox_retention_ms: i64) -> Result<u64>;
    /// Resolves the address to live instances and delivers to each inbox, in one
    /// transaction; `not_found` when nobody live matches.
    async fn send_message(&self, msg: NewMessage) -> Result<concord_core::api::SentMessage>;
    async fn read_inbox(
        &self,
        instance: &str,
        after: i64,
        limit: usize,
        unacked_only: bool,
    ) -> Result<Vec<concord_core::api::InboxMessage>>;
    /// Acks a message in this instance's inbox; false if it was not there.
    async fn ack_message(&self, instance: &str, message: &str) -> Result<bool>;
}

/// Convenience: the heartbeat answer from a durable heartbeat.
pub fn heartbeat_response(hb: &DurableHeartbeat) -> HeartbeatResponse {
    HeartbeatResponse {
        lease_until: hb.instance.lease_until,
        role: hb.instance.role,
        epoch: hb.epoch,
        fence: hb.fence,
    }
}
