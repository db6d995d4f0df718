//! The work queue's store operations (DESIGN §7).

use async_trait::async_trait;
use concord_core::api::{ClaimedTask, EventSource, QueueStats, Schedule, Task, TaskState};
use concord_core::{Error, Result};
use serde_json::Value;

/// A validated enqueue, with the id chosen by the hub.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub queue: String,
    pub payload: Value,
    pub priority: i32,
    pub requires: Vec<String>,
    pub target: Option<String>,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
    pub backoff_ms: i64,
    /// Absolute time in ms, if any.
    pub not_before: Option<i64>,
    pub depends_on: Vec<String>,
    pub timeout_ms: Option<i64>,
}

/// A claim by one instance. Its capabilities are read from the store, not trusted
/// from the request.
#[derive(Debug, Clone)]
pub struct ClaimSpec {
    pub instance: String,
    pub queues: Vec<String>,
    pub max: u32,
    pub lease_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub id: String,
    pub claim: String,
    pub result: Value,
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub queue: Option<String>,
    pub state: Option<TaskState>,
    /// Tasks with id greater than this (ids sort by creation time).
    pub after: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub name: String,
    pub queue: String,
    pub payload: Value,
    pub every_ms: Option<i64>,
    pub cron: Option<String>,
    pub priority: i32,
    pub requires: Vec<String>,
    pub max_attempts: u32,
    /// First due time, computed by the hub from the recurrence.
    pub next_due: i64,
}

#[async_trait]
pub trait QueueStore: Send + Sync {
    /// Enqueues all in one transaction. Each result says whether it was a duplicate
    /// of an earlier enqueue with the same idempotency key. When `source` names an
    /// instance, that instance must be live and not a ghost
    /// ([`Instance::refuse_unless_writer`](concord_core::api::Instance::refuse_unless_writer)),
    /// checked inside the transaction.
    async fn enqueue(&self, tasks: Vec<NewTask>, source: EventSource) -> Result<Vec<(Task, bool)>>;
    /// Claims up to `max` claimable tasks for the instance: highest priority first,
    /// then oldest; each gets a fresh claim token and lease. The instance must be
    /// live with a current lease (else `unknown_instance`) and not a ghost.
    async fn claim_tasks(&self, spec: ClaimSpec) -> Result<Vec<ClaimedTask>>;
    /// Extends the lease of a current claim and records progress; `stale_claim` otherwise.
    async fn heartbeat_task(&self, id: &str, claim: &str, progress: Option<Value>) -> Result<i64>;
    /// Completes each task whose claim is current; one outcome per item, one transaction.
    async fn complete_tasks(&self, items: Vec<Completion>) -> Result<Vec<Result<Task>>>;
    /// `complete_tasks`, answering only whether each item completed: no task is
    /// read back. The batch route answers outcomes, and reading a hundred tasks
    /// back (payloads parsed) was an eighth of the SQLite writer's time under
    /// batch load.
    async fn complete_outcomes(&self, items: Vec<Completion>) -> Result<Vec<Result<()>>>;
    /// Completes one task and claims as `next` says, in one transaction: both or
    /// neither (a stale claim, or a caller that may not claim, changes nothing).
    /// A worker's loop then costs one call and one commit per task instead of two.
    async fn complete_and_claim(
        &self,
        done: Completion,
        next: ClaimSpec,
    ) -> Result<(Task, Vec<ClaimedTask>)>;
    /// `complete_outcomes` and a claim as `next` says, in one transaction: each
    /// item has its own outcome, as in the batch; a refused claim changes nothing.
    async fn complete_outcomes_and_claim(
        &self,
        items: Vec<Completion>,
        next: ClaimSpec,
    ) -> Result<(Vec<Result<()>>, Vec<ClaimedTask>)>;
    async fn fail_task(&self, id: &str, claim: &str, error: &str, retry: bool) -> Result<Task>;
    /// Cancels a task that has not finished; a running task's claim becomes stale.
    async fn cancel_task(&self, id: &str, by: &str) -> Result<Task>;
    async fn get_task(&self, id: &str) -> Result<Option<Task>>;
    async fn list_tasks(&self, filter: TaskFilter) -> Result<Vec<Task>>;
    async fn queue_stats(&self) -> Result<Vec<QueueStats>>;
    /// Returns tasks whose claim lease lapsed to pending (or dead when out of
    /// attempts), and marks due scheduled/failed tasks pending. Safe on every replica.
    async fn requeue_lapsed(&self, limit: usize) -> Result<usize>;
    async fn put_schedule(&self, spec: ScheduleSpec) -> Result<Schedule>;
    async fn delete_schedule(&self, name: &str) -> Result<bool>;
    async fn list_schedules(&self) -> Result<Vec<Schedule>>;
    /// Schedules due now: (name, due time ms, recurrence text) to fire.
    async fn due_schedules(&self) -> Result<Vec<Schedule>>;
    /// Enqueues one task for `schedule` at `due` (idempotent per due time across
    /// replicas and restarts) and moves it to `next_due`.
    async fn fire_schedule(&self, name: &str, due: i64, next_due: i64) -> Result<Option<Task>>;
    /// Removes finished tasks older than `retention_ms`.
    async fn prune_tasks(&self, retention_ms: i64) -> Result<u64>;
}

/// A completion's per-item answers as `complete_tasks` gives them, from a
/// backend's completion that was asked to read each task back.
pub(crate) fn read_back(out: Vec<Result<Option<Task>>>) -> Vec<Result<Task>> {
    out.into_iter()
        .map(|r| {
            r.and_then(|t| t.ok_or_else(|| Error::internal("a completed task was not read back")))
        })
        .collect()
}

/// A completion's per-item answers as `complete_outcomes` gives them.
pub(crate) fn outcomes(out: Vec<Result<Option<Task>>>) -> Vec<Result<()>> {
    out.into_iter().map(|r| r.map(|_| ())).collect()
}

/// A task as `sys.task.*` events name it.
pub(crate) fn task_ref(id: &str, queue: &str, state: TaskState) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), id.into());
    m.insert("queue".into(), queue.into());
    m.insert("state".into(), state.as_str().into());
    Value::Object(m)
}

/// A `sys.task.*` event's data: `{"tasks": list}` and the fields of `extra`.
///
/// Built by hand, not with `json!({"tasks": list})`: the macro serializes its
/// values by reference, which deep-copied every task ref (5% of the SQLite
/// writer's time under batch claims).
pub(crate) fn task_event_data(list: Vec<Value>, extra: Value) -> Value {
    let mut data = serde_json::Map::new();
    data.insert("tasks".into(), Value::Array(list));
    if let Value::Object(m) = extra {
        data.extend(m);
    }
    Value::Object(data)
}

/// The error for a task id that does not exist.
pub(crate) fn no_task(id: &str) -> Error {
    Error::not_found(format!("no task {id}"))
}

/// The error for a claim that is no longer the task's current one.
pub(crate) fn stale_claim(id: &str, state: TaskState) -> Error {
    Error::new(
        concord_core::ErrorCode::StaleClaim,
        format!(
            "claim on task {id} is not current (task is {})",
            state.as_str()
        ),
    )
    .with_details(serde_json::json!({"task": id, "state": state}))
}
