//! Dispatch records: the durable half of fan-out (DESIGN §8). The peers' work is
//! ordinary targeted tasks; a dispatch row remembers the request, which peer got
//! which task, and the final answer, so a dispatch outlives the request (and the
//! hub) that started it.

use crate::queue::NewTask;
use async_trait::async_trait;
use concord_core::api::TaskState;
use concord_core::Result;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct NewDispatch {
    pub id: String,
    pub command: String,
    /// The validated request, as JSON.
    pub spec: Value,
    pub deadline_ms: i64,
    /// Each peer with the task that carries its work.
    pub peers: Vec<(String, NewTask)>,
    pub token: String,
}

/// One peer of a dispatch, read together with its task and its instance's
/// lease. The coordinator re-evaluates a running dispatch on every task event,
/// so everything it decides on comes back from one query, not two reads per peer.
#[derive(Debug, Clone)]
pub struct DispatchPeerRow {
    pub instance: String,
    pub task: String,
    pub added_at: i64,
    /// The peer's task as it stands; `None` if the task is gone.
    pub work: Option<PeerWork>,
    /// When the peer instance's lease runs out, while it is live; `None` once
    /// it has ended or is gone.
    pub live_until: Option<i64>,
}

/// What a dispatch needs of a peer's task.
#[derive(Debug, Clone)]
pub struct PeerWork {
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub completed_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct DispatchRecord {
    pub id: String,
    pub command: String,
    pub spec: Value,
    /// running, completed, degraded, failed.
    pub state: String,
    pub result: Option<Value>,
    pub outcome: Value,
    pub created_at: i64,
    pub deadline_ms: i64,
    pub finished_at: Option<i64>,
    pub peers: Vec<DispatchPeerRow>,
}

#[async_trait]
pub trait DispatchStore: Send + Sync {
    /// The record, the peers' tasks and an event, in one transaction.
    async fn create_dispatch(&self, d: NewDispatch) -> Result<()>;
    /// More peers for a running dispatch (a retry, or peers that appeared).
    async fn add_dispatch_peers(&self, id: &str, peers: Vec<(String, NewTask)>) -> Result<()>;
    /// The record with each peer's task and liveness (see [`DispatchPeerRow`]).
    async fn get_dispatch(&self, id: &str) -> Result<Option<DispatchRecord>>;
    /// Finishes a running dispatch (false if it was no longer running) and cancels
    /// the given tasks that have not started, in one transaction.
    async fn finish_dispatch(
        &self,
        id: &str,
        state: &str,
        result: Option<Value>,
        outcome: Value,
        cancel: Vec<String>,
    ) -> Result<bool>;
    async fn running_dispatches(&self) -> Result<Vec<String>>;
}
