use super::instances::require_labelled;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::*;
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::task::{self, Recurrence};
use concord_core::validate::{self, json_size};
use concord_core::{ids, Error, ErrorCode};
use concord_store::{topics, ClaimSpec, Completion, NewTask, ScheduleSpec, TaskFilter};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
pub const MAX_BATCH: usize = 1000;
const MAX_WAIT_MS: u64 = 60_000;

fn field(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Checks one enqueue; `prefix` names its place in a batch (`tasks[3].`).
fn new_task(req: EnqueueRequest, prefix: &str) -> Result<NewTask, Error> {
    task::validate_queue(&field(prefix, "queue"), &req.queue)?;
    json_size(&field(prefix, "payload"), &req.payload, MAX_PAYLOAD_BYTES)?;
    validate::capabilities(&field(prefix, "requires"), &req.requires)?;
    if let Some(t) = &req.target {
        if !ids::has_prefix(t, ids::INSTANCE) {
            return Err(Error::bad_field(
                &field(prefix, "target"),
                "must be an instance id (ins_…)",
            ));
        }
    }
    if let Some(k) = &req.idempotency_key {
        if k.is_empty() || k.len() > 256 {
            return Err(Error::bad_field(
                &field(prefix, "idempotency_key"),
                "must be 1..=256 bytes",
            ));
        }
    }
    let max_attempts = req.max_attempts.unwrap_or(task::DEFAULT_MAX_ATTEMPTS);
    if !(1..=100).contains(&max_attempts) {
        return Err(Error::bad_field(
            &field(prefix, "max_attempts"),
            "must be between 1 and 100",
        ));
    }
    let backoff_ms = req.backoff_ms.unwrap_or(task::DEFAULT_BACKOFF_MS);
    if !(0..=task::MAX_BACKOFF_MS).contains(&backoff_ms) {
        return Err(Error::bad_field(
            &field(prefix, "backoff_ms"),
            format!("must be between 0 and {}", task::MAX_BACKOFF_MS),
        ));
    }
    if let Some(t) = req.timeout_ms {
        task::validate_lease(&field(prefix, "timeout_ms"), t)?;
    }
    if req.depends_on.len() > 100 {
        return Err(Error::bad_field(
            &field(prefix, "depends_on"),
            "at most 100 dependencies",
        ));
    }
    for (i, d) in req.depends_on.iter().enumerate() {
        if !ids::has_prefix(d, ids::TASK) {
            return Err(Error::bad_field(
                &field(prefix, &format!("depends_on[{i}]")),
                "must be a task id (tsk_…)",
            ));
        }
    }
    Ok(NewTask {
        id: ids::new_id(ids::TASK),
        queue: req.queue,
        payload: req.payload,
        priority: req.priority,
        requires: req.requires,
        target: req.target,
        idempotency_key: req.idempotency_key,
        max_attempts,
        backoff_ms,
        not_before: req.not_before.map(|t| t.millis()),
        depends_on: req.depends_on,
        timeout_ms: req.timeout_ms,
    })
}

fn source(p: &Principal) -> EventSource {
    EventSource {
        instance: p.instance.clone(),
        entity: p.entity.clone(),
        token: Some(p.token_id.clone()),
    }
}

/// Whether the caller's token may enqueue. Whether its instance is live and
/// labelled is the store's check, inside the enqueue's own transaction: one
/// read fewer per call, and no window between the check and the write.
fn may_enqueue(p: &Principal) -> ApiResult<()> {
    authorize(
        p,
        Action::TaskEnqueue,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    Ok(())
}

/// Enqueue a task. The same idempotency_key again returns the same task (200, deduplicated).
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = EnqueueRequest,
    responses((status = 201, body = TaskEnvelope), (status = 200, body = TaskEnvelope, description = "deduplicated")))]
pub(crate) async fn enqueue(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<EnqueueRequest>,
) -> ApiResult<(StatusCode, axum::Json<TaskEnvelope>)> {
    let t = new_task(req, "")?;
    may_enqueue(&p)?;
    let mut out = s.store.enqueue(vec![t], source(&p)).await?;
    let (task, deduplicated) = out
        .pop()
        .ok_or_else(|| Error::internal("enqueue returned nothing"))?;
    let status = if deduplicated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        axum::Json(TaskEnvelope {
            task,
            deduplicated,
            next: None,
        }),
    ))
}

/// Enqueue many tasks in one transaction.
#[utoipa::path(post, path = "/v1/tasks/batch", tag = "tasks", request_body = EnqueueBatchRequest,
    responses((status = 201, body = TaskList)))]
pub(crate) async fn enqueue_batch(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<EnqueueBatchRequest>,
) -> ApiResult<(StatusCode, axum::Json<TaskList>)> {
    if req.tasks.is_empty() || req.tasks.len() > MAX_BATCH {
        return Err(Error::bad_field("tasks", format!("must hold 1..={MAX_BATCH} tasks")).into());
    }
    let tasks = req
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| new_task(t, &format!("tasks[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    may_enqueue(&p)?;
    let out = s.store.enqueue(tasks, source(&p)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TaskList {
            tasks: out.into_iter().map(|(t, _)| t).collect(),
        }),
    ))
}

/// Claim tasks (session token): highest priority first, then oldest; long-polls with wait_ms.
#[utoipa::path(post, path = "/v1/tasks/claim", tag = "tasks", request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse)))]
pub(crate) async fn claim(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<ClaimRequest>,
) -> ApiResult<axum::Json<ClaimResponse>> {
    let ask = claim_ask(&p, req, "")?;
    let first = async { Ok(((), s.store.claim_tasks(ask.spec.clone()).await?)) };
    let ((), tasks) = ask.claim(&s, &p, first).await?;
    Ok(axum::Json(ClaimResponse { tasks: tasks? }))
}

/// A checked claim request: what to claim, for whom, and how long to wait.
struct ClaimAsk {
    spec: ClaimSpec,
    deadline: tokio::time::Instant,
    wait_ms: u64,
}

impl ClaimAsk {
    /// Runs `first` (an operation whose last step is this claim), then long-polls
    /// while it claimed nothing. The outer error is `first`'s: it changed
    /// nothing; the inner one is a later claim's, after `first` committed.
    async fn claim<T>(
        &self,
        s: &AppState,
        p: &Principal,
        first: impl std::future::Future<Output = concord_core::Result<(T, Vec<ClaimedTask>)>>,
    ) -> ApiResult<(T, ApiResult<Vec<ClaimedTask>>)> {
        // A claim that will not wait needs no receiver: subscribing takes the
        // bus's lock, and dropping a receiver walks every event sent meanwhile.
        if self.wait_ms == 0 {
            let (done, tasks) = first.await?;
            return Ok((done, Ok(tasks)));
        }
        // A long poll holds one of the token's slots while it waits.
        let _slot = s.limits.long_poll(&p.token_id)?;
        // Listen before claiming, so work that arrives in between wakes us.
        let rx = s.bus.subscribe();
        let (done, tasks) = first.await?;
        Ok((done, wait_for_work(s, self, rx, tasks).await))
    }
}

/// What a completion answers in `next`: it stands whatever the wait after it
/// brings, so a failed re-claim is answered as no task, not as an error that
/// would hide the completion.
fn next_after_completion(next: ApiResult<Vec<ClaimedTask>>) -> Vec<ClaimedTask> {
    next.unwrap_or_else(|e| {
        tracing::debug!("claim after a completion: {e:?}");
        Vec::new()
    })
}

/// Checks a claim request (`prefix` names its place: `claim_next.` within a
/// completion) and that the caller is an instance that may claim.
fn claim_ask(p: &Principal, req: ClaimRequest, prefix: &str) -> ApiResult<ClaimAsk> {
    let queues = if req.queues.is_empty() {
        vec!["default".to_string()]
    } else {
        req.queues
    };
    if queues.len() > 64 {
        return Err(Error::bad_field(&field(prefix, "queues"), "at most 64 queues").into());
    }
    for (i, q) in queues.iter().enumerate() {
        task::validate_queue(&field(prefix, &format!("queues[{i}]")), q)?;
    }
    let max = req.max.unwrap_or(1);
    if !(1..=task::MAX_CLAIM).contains(&max) {
        return Err(Error::bad_field(
            &field(prefix, "max"),
            format!("must be between 1 and {}", task::MAX_CLAIM),
        )
        .into());
    }
    if let Some(l) = req.lease_ms {
        task::validate_lease(&field(prefix, "lease_ms"), l)?;
    }
    let wait_ms = req.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(
            Error::bad_field(&field(prefix, "wait_ms"), format!("at most {MAX_WAIT_MS}")).into(),
        );
    }
    let Some(me) = p.instance.clone() else {
        return Err(Error::forbidden("only an instance (session token) claims tasks").into());
    };
    authorize(
        p,
        Action::TaskClaim,
        Target {
            entity: p.entity.as_deref(),
            instance: Some(&me),
        },
    )?;
    // Live, lease current and labelled: checked by the store inside the claim.
    Ok(ClaimAsk {
        spec: ClaimSpec {
            instance: me,
            queues,
            max,
            lease_ms: req.lease_ms,
        },
        deadline: tokio::time::Instant::now() + Duration::from_millis(wait_ms),
        wait_ms,
    })
}

/// The long poll after a first claim found `tasks` (`rx` subscribed before it):
/// claims again on anything that can make a task claimable, until it finds some
/// or the deadline passes.
async fn wait_for_work(
    s: &AppState,
    ask: &ClaimAsk,
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::bus::BusEvent>>,
    mut tasks: Vec<ClaimedTask>,
) -> ApiResult<Vec<ClaimedTask>> {
    loop {
        if !tasks.is_empty() || tokio::time::Instant::now() >= ask.deadline {
            return Ok(tasks);
        }
        // Wake on anything that can make a task claimable; re-check at least every
        // second for scheduled tasks and backoffs coming due.
        let recheck = (tokio::time::Instant::now() + Duration::from_secs(1)).min(ask.deadline);
        loop {
            match tokio::time::timeout_at(recheck, rx.recv()).await {
                Err(_) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(_)) => return Err(Error::unavailable("the hub is shutting down").into()),
                Ok(Ok(e)) => match e.topic.as_str() {
                    topics::TASK_ENQUEUED
                    | topics::TASK_REQUEUED
                    | topics::TASK_COMPLETED
                    | topics::TASK_FAILED => break,
                    _ => {}
                },
            }
        }
        tasks = s.store.claim_tasks(ask.spec.clone()).await?;
    }
}

fn authorize_work(p: &Principal) -> ApiResult<()> {
    authorize(
        p,
        Action::TaskWork,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    Ok(())
}

fn check_claim(claim: &str) -> ApiResult<()> {
    if !ids::has_prefix(claim, ids::CLAIM) {
        return Err(Error::bad_field("claim", "must be a claim token (clm_…)").into());
    }
    Ok(())
}

/// Extend a claim's lease and record progress.
#[utoipa::path(post, path = "/v1/tasks/{id}/heartbeat", tag = "tasks", request_body = TaskHeartbeatRequest,
    params(("id" = String, Path)), responses((status = 200, body = TaskLease)))]
pub(crate) async fn heartbeat(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<TaskHeartbeatRequest>,
) -> ApiResult<axum::Json<TaskLease>> {
    check_claim(&req.claim)?;
    if let Some(pr) = &req.progress {
        json_size("progress", pr, 16 * 1024)?;
    }
    authorize_work(&p)?;
    let until = s
        .store
        .heartbeat_task(&id, &req.claim, req.progress)
        .await?;
    Ok(axum::Json(TaskLease {
        lease_until: concord_core::Timestamp(until),
    }))
}

/// Complete a task with its current claim (409 stale_claim otherwise); with
/// `claim_next`, claim the caller's next task in the same transaction.
#[utoipa::path(post, path = "/v1/tasks/{id}/complete", tag = "tasks", request_body = CompleteRequest,
    params(("id" = String, Path)), responses((status = 200, body = TaskEnvelope)))]
pub(crate) async fn complete(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<CompleteRequest>,
) -> ApiResult<axum::Json<TaskEnvelope>> {
    check_claim(&req.claim)?;
    json_size("result", &req.result, MAX_PAYLOAD_BYTES)?;
    authorize_work(&p)?;
    let done = Completion {
        id,
        claim: req.claim,
        result: req.result,
    };
    let Some(next) = req.claim_next else {
        let task = s
            .store
            .complete_tasks(vec![done])
            .await?
            .pop()
            .ok_or_else(|| Error::internal("complete returned nothing"))??;
        return Ok(axum::Json(TaskEnvelope {
            task,
            deduplicated: false,
            next: None,
        }));
    };
    let ask = claim_ask(&p, next, "claim_next.")?;
    let first = s.store.complete_and_claim(done, ask.spec.clone());
    let (task, next) = ask.claim(&s, &p, first).await?;
    Ok(axum::Json(TaskEnvelope {
        task,
        deduplicated: false,
        next: Some(next_after_completion(next)),
    }))
}

/// Complete many tasks; one outcome per item. With `claim_next`, claim the
/// caller's next tasks in the same transaction.
#[utoipa::path(post, path = "/v1/tasks/complete", tag = "tasks", request_body = CompleteBatchRequest,
    responses((status = 200, body = CompleteBatchResponse)))]
pub(crate) async fn complete_batch(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<CompleteBatchRequest>,
) -> ApiResult<axum::Json<CompleteBatchResponse>> {
    if req.items.is_empty() || req.items.len() > MAX_BATCH {
        return Err(Error::bad_field("items", format!("must hold 1..={MAX_BATCH} items")).into());
    }
    for (i, it) in req.items.iter().enumerate() {
        if !ids::has_prefix(&it.claim, ids::CLAIM) {
            return Err(Error::bad_field(
                &format!("items[{i}].claim"),
                "must be a claim token (clm_…)",
            )
            .into());
        }
        json_size(&format!("items[{i}].result"), &it.result, MAX_PAYLOAD_BYTES)?;
    }
    authorize_work(&p)?;
    let ask = match req.claim_next {
        Some(next) => Some(claim_ask(&p, next, "claim_next.")?),
        None => None,
    };
    let ids: Vec<String> = req.items.iter().map(|i| i.id.clone()).collect();
    let items = req
        .items
        .into_iter()
        .map(|i| Completion {
            id: i.id,
            claim: i.claim,
            result: i.result,
        })
        .collect();
    let (out, next) = match &ask {
        None => (s.store.complete_outcomes(items).await?, None),
        Some(ask) => {
            let first = s.store.complete_outcomes_and_claim(items, ask.spec.clone());
            let (out, next) = ask.claim(&s, &p, first).await?;
            (out, Some(next_after_completion(next)))
        }
    };
    let results = ids
        .into_iter()
        .zip(out)
        .map(|(id, r)| match r {
            Ok(_) => ItemOutcome {
                id,
                ok: Some(true),
                error: None,
            },
            Err(e) => ItemOutcome {
                id,
                ok: None,
                error: Some(e.to_body()["error"].clone()),
            },
        })
        .collect();
    Ok(axum::Json(CompleteBatchResponse { results, next }))
}

/// Fail a task: retried after backoff while attempts remain (and `retry`), else dead.
#[utoipa::path(post, path = "/v1/tasks/{id}/fail", tag = "tasks", request_body = FailRequest,
    params(("id" = String, Path)), responses((status = 200, body = TaskEnvelope)))]
pub(crate) async fn fail(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<FailRequest>,
) -> ApiResult<axum::Json<TaskEnvelope>> {
    check_claim(&req.claim)?;
    if req.error.len() > 64 * 1024 {
        return Err(Error::bad_field("error", "at most 64 KiB").into());
    }
    authorize_work(&p)?;
    let task = s
        .store
        .fail_task(&id, &req.claim, &req.error, req.retry.unwrap_or(true))
        .await?;
    Ok(axum::Json(TaskEnvelope {
        task,
        deduplicated: false,
        next: None,
    }))
}

/// Cancel a task that has not finished; a running task's claim becomes stale.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path)), responses((status = 200, body = TaskEnvelope)))]
pub(crate) async fn cancel(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<TaskEnvelope>> {
    authorize(
        &p,
        Action::TaskCancel,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    require_labelled(&s, &p).await?;
    let task = s.store.cancel_task(&id, &p.actor()).await?;
    Ok(axum::Json(TaskEnvelope {
        task,
        deduplicated: false,
        next: None,
    }))
}

/// One task.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskEnvelope)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<TaskEnvelope>> {
    authorize(&p, Action::TaskRead, Target::default())?;
    let task = s
        .store
        .get_task(&id)
        .await?
        .ok_or_else(|| Error::not_found(format!("no task {id}")))?;
    Ok(axum::Json(TaskEnvelope {
        task,
        deduplicated: false,
        next: None,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    queue: Option<String>,
    state: Option<TaskState>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Tasks after this id (pages in creation order).
    after: Option<String>,
}

/// List tasks, oldest first, paged by `after`.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery), responses((status = 200, body = TaskList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<TaskList>> {
    authorize(&p, Action::TaskRead, Target::default())?;
    if let Some(queue) = &q.queue {
        task::validate_queue("queue", queue)?;
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::bad_field("limit", "must be between 1 and 1000").into());
    }
    let tasks = s
        .store
        .list_tasks(TaskFilter {
            queue: q.queue,
            state: q.state,
            after: q.after,
            limit,
        })
        .await?;
    Ok(axum::Json(TaskList { tasks }))
}

/// Counts per state for every queue.
#[utoipa::path(get, path = "/v1/queues", tag = "tasks", responses((status = 200, body = QueueList)))]
pub(crate) async fn queues(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<QueueList>> {
    authorize(&p, Action::TaskRead, Target::default())?;
    Ok(axum::Json(QueueList {
        queues: s.store.queue_stats().await?,
    }))
}

/// Create or replace a recurring schedule (every_ms or a 5-field cron, UTC).
#[utoipa::path(put, path = "/v1/schedules/{name}", tag = "tasks", request_body = PutScheduleRequest,
    params(("name" = String, Path)), responses((status = 200, body = Schedule)))]
pub(crate) async fn put_schedule(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(name): Path<String>,
    Json(req): Json<PutScheduleRequest>,
) -> ApiResult<axum::Json<Schedule>> {
    validate::name("name", &name)?;
    task::validate_queue("queue", &req.queue)?;
    json_size("payload", &req.payload, MAX_PAYLOAD_BYTES)?;
    validate::capabilities("requires", &req.requires)?;
    let max_attempts = req.max_attempts.unwrap_or(task::DEFAULT_MAX_ATTEMPTS);
    if !(1..=100).contains(&max_attempts) {
        return Err(Error::bad_field("max_attempts", "must be between 1 and 100").into());
    }
    let rec = Recurrence::parse(req.every_ms, req.cron.as_deref())?;
    authorize(&p, Action::ScheduleWrite, Target::default())?;
    let now = s.store.now_ms().await?;
    let next_due = rec
        .next_after(now)
        .ok_or_else(|| Error::bad_field("cron", "never fires"))?;
    let sched = s
        .store
        .put_schedule(ScheduleSpec {
            name,
            queue: req.queue,
            payload: req.payload,
            every_ms: req.every_ms,
            cron: req.cron,
            priority: req.priority,
            requires: req.requires,
            max_attempts,
            next_due,
        })
        .await?;
    Ok(axum::Json(sched))
}

/// Every schedule with its next due time.
#[utoipa::path(get, path = "/v1/schedules", tag = "tasks", responses((status = 200, body = ScheduleList)))]
pub(crate) async fn list_schedules(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<ScheduleList>> {
    authorize(&p, Action::TaskRead, Target::default())?;
    Ok(axum::Json(ScheduleList {
        schedules: s.store.list_schedules().await?,
    }))
}

/// Remove a schedule (tasks it already enqueued stay).
#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "tasks", params(("name" = String, Path)),
    responses((status = 200, body = Deleted)))]
pub(crate) async fn delete_schedule(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Deleted>> {
    authorize(&p, Action::ScheduleWrite, Target::default())?;
    if !s.store.delete_schedule(&name).await? {
        return Err(Error::new(ErrorCode::NotFound, format!("no schedule {name}")).into());
    }
    Ok(axum::Json(Deleted { deleted: true }))
}
