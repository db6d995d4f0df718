//! The PostgreSQL side of the work queue, one for one with `sqlite/queue.rs`.
//! Claims take rows with `FOR UPDATE SKIP LOCKED`, so replicas claiming at once
//! never block on each other and never get the same task; complete, fail,
//! heartbeat and cancel lock the one task row they check and change.

use super::*;
use crate::postgres::PostgresStore;
use crate::queue::*;
use async_trait::async_trait;
use concord_core::api::{ClaimedTask, QueueStats, Schedule, Task, TaskState};
use concord_core::task::{
    after_failure, after_lost_claim, retry_delay, DEFAULT_BACKOFF_MS, DEFAULT_LEASE_MS,
};
use concord_core::Result;
use std::collections::BTreeMap;

const TASK_COLS: &str = "id, queue, state, priority, payload, requires, target, attempt, max_attempts, backoff_ms, \
    timeout_ms, claimed_by, lease_until, progress, result, error, idempotency_key, not_before, created_at, updated_at, \
    completed_at, claim, CASE WHEN deps = 0 THEN ARRAY[]::text[] ELSE ARRAY(SELECT dep FROM task_deps WHERE task = tasks.id ORDER BY dep) END";

fn task_from_row(r: &Row) -> R<(Task, Option<String>)> {
    let state: String = get(r, 2)?;
    let not_before: i64 = get(r, 17)?;
    Ok((
        Task {
            id: get(r, 0)?,
            queue: get(r, 1)?,
            state: TaskState::parse(&state).unwrap_or(TaskState::Pending),
            priority: get(r, 3)?,
            payload: get::<Option<Value>>(r, 4)?.unwrap_or(Value::Null),
            requires: get(r, 5)?,
            target: get(r, 6)?,
            attempt: get::<i32>(r, 7)?.max(0) as u32,
            max_attempts: get::<i32>(r, 8)?.max(0) as u32,
            backoff_ms: get(r, 9)?,
            timeout_ms: get(r, 10)?,
            claimed_by: get(r, 11)?,
            lease_until: get::<Option<i64>>(r, 12)?.map(Timestamp),
            progress: get(r, 13)?,
            result: get(r, 14)?,
            error: get(r, 15)?,
            idempotency_key: get(r, 16)?,
            not_before: (not_before > 0).then_some(Timestamp(not_before)),
            created_at: Timestamp(get(r, 18)?),
            updated_at: Timestamp(get(r, 19)?),
            completed_at: get::<Option<i64>>(r, 20)?.map(Timestamp),
            depends_on: get(r, 22)?,
        },
        get(r, 21)?,
    ))
}

pub(crate) async fn load<C: GenericClient>(c: &C, id: &str) -> R<Option<(Task, Option<String>)>> {
    row_opt(
        c,
        &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1"),
        &[&id],
    )
    .await?
    .map(|r| task_from_row(&r))
    .transpose()
}

/// The task with its row locked for the rest of the transaction.
async fn lock(t: &Tx<'_>, id: &str) -> R<Option<(Task, Option<String>)>> {
    row_opt(
        t.c,
        &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1 FOR UPDATE"),
        &[&id],
    )
    .await?
    .map(|r| task_from_row(&r))
    .transpose()
}

fn not_found(id: &str) -> Fail {
    Fail::Done(no_task(id))
}

fn stale(id: &str, state: TaskState) -> Fail {
    Fail::Done(stale_claim(id, state))
}

fn event(t: &mut Tx<'_>, topic: &'static str, source: &EventSource, tasks: &[&Task], extra: Value) {
    let list: Vec<Value> = tasks
        .iter()
        .map(|x| task_ref(&x.id, &x.queue, x.state))
        .collect();
    t.event(topic, source, task_event_data(list, extra));
}

/// Sets a task to a final failure state and cancels everything that depends on it
/// (iteratively: a chain of dependents is walked breadth-first).
pub(crate) async fn finish_unsuccessfully(
    t: &mut Tx<'_>,
    id: &str,
    state: TaskState,
    error: &str,
) -> R<()> {
    let mut work = vec![(id.to_string(), state, error.to_string())];
    let mut first = true;
    while let Some((id, state, error)) = work.pop() {
        exec(
            t.c,
            "UPDATE tasks SET state = $2, error = $3, claim = NULL, claimed_by = NULL, lease_until = NULL, \
             updated_at = $4, completed_at = $4 WHERE id = $1",
            &[&id, &state.as_str(), &error, &t.now],
        )
        .await?;
        if !first {
            if let Some((task, _)) = load(t.c, &id).await? {
                event(
                    t,
                    topics::TASK_CANCELLED,
                    &hub_source(),
                    &[&task],
                    json!({"reason": error}),
                );
            }
        }
        first = false;
        let dependents = rows(
            t.c,
            "SELECT d.task FROM task_deps d JOIN tasks x ON x.id = d.task \
             WHERE d.dep = $1 AND x.state NOT IN ('completed', 'dead', 'cancelled') FOR UPDATE OF x",
            &[&id],
        )
        .await?;
        for r in dependents {
            let d: String = get(&r, 0)?;
            work.push((
                d,
                TaskState::Cancelled,
                format!("cancelled: dependency {id} is {}", state.as_str()),
            ));
        }
    }
    Ok(())
}

/// A running task whose claim was lost (lease lapsed, claimer ended). The event
/// carries the state the task is left in, as every other task event does.
async fn lose_claim(t: &mut Tx<'_>, task: &Task, reason: &str) -> R<()> {
    let (topic, why) = match after_lost_claim(task.attempt, task.max_attempts) {
        TaskState::Dead => {
            let why = format!(
                "{reason}; out of attempts ({}/{})",
                task.attempt, task.max_attempts
            );
            finish_unsuccessfully(t, &task.id, TaskState::Dead, &why).await?;
            (topics::TASK_DEAD, why)
        }
        _ => {
            exec(
                t.c,
                "UPDATE tasks SET state = 'pending', claim = NULL, claimed_by = NULL, lease_until = NULL, \
                 error = $2, updated_at = $3 WHERE id = $1",
                &[&task.id, &reason, &t.now],
            )
            .await?;
            (topics::TASK_REQUEUED, reason.to_string())
        }
    };
    let (after, _) = load(t.c, &task.id)
        .await?
        .ok_or_else(|| not_found(&task.id))?;
    event(
        t,
        topic,
        &hub_source(),
        &[&after],
        json!({"reason": why, "claimed_by": task.claimed_by}),
    );
    Ok(())
}

/// Called when an instance ends (its row is locked): its claims go back at once.
pub(crate) async fn release_claims(t: &mut Tx<'_>, instance: &str) -> R<()> {
    let held = rows(
        t.c,
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'running' AND claimed_by = $1 FOR UPDATE"
        ),
        &[&instance],
    )
    .await?;
    for r in held {
        let (task, _) = task_from_row(&r)?;
        lose_claim(t, &task, &format!("claimer {instance} ended")).await?;
    }
    Ok(())
}

/// The id of the task enqueued earlier under this idempotency key, if any.
async fn by_key(t: &Tx<'_>, key: &str) -> R<Option<String>> {
    row_opt(
        t.c,
        "SELECT id FROM tasks WHERE idempotency_key = $1",
        &[&key],
    )
    .await?
    .map(|r| get(&r, 0))
    .transpose()
}

/// Locks each dependency `FOR KEY SHARE` before reading its state: a dependency
/// that dies concurrently (failed, cancelled, lost on its last attempt) either
/// committed first, and is seen dead here, or waits for this transaction and
/// then finds the new dependent when it cancels its dependents. Without the lock
/// the dependent could slip in unseen and wait forever on a dead task.
pub(crate) async fn enqueue(
    t: &mut Tx<'_>,
    tasks: &[NewTask],
    source: &EventSource,
) -> R<Vec<(Task, bool)>> {
    if let Some(id) = &source.instance {
        share_instance(t, id)
            .await?
            .ok_or_else(|| Error::unknown_instance(id))?
            .refuse_unless_writer()?;
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut created: Vec<Task> = Vec::new();
    for nt in tasks {
        // A repeat is answered before anything else is checked (as SQLite does):
        // its dependencies may have been pruned since the first enqueue.
        if let Some(key) = &nt.idempotency_key {
            if let Some(existing) = by_key(t, key).await? {
                let (task, _) = load(t.c, &existing)
                    .await?
                    .ok_or_else(|| not_found(&existing))?;
                out.push((task, true));
                continue;
            }
        }
        let mut dead_dep = None;
        for (i, d) in nt.depends_on.iter().enumerate() {
            let state: Option<String> = row_opt(
                t.c,
                "SELECT state FROM tasks WHERE id = $1 FOR KEY SHARE",
                &[d],
            )
            .await?
            .map(|r| get(&r, 0))
            .transpose()?;
            match state.as_deref().and_then(TaskState::parse) {
                None => {
                    return Err(Fail::Done(Error::bad_field(
                        &format!("depends_on[{i}]"),
                        format!("no task {d}"),
                    )))
                }
                Some(s @ (TaskState::Dead | TaskState::Cancelled)) => {
                    dead_dep = Some((d.clone(), s))
                }
                Some(_) => {}
            }
        }
        let not_before = nt.not_before.unwrap_or(0);
        let state = if not_before > t.now {
            TaskState::Scheduled
        } else {
            TaskState::Pending
        };
        // ON CONFLICT on the idempotency key: a concurrent enqueue with the same key
        // on another replica waits for ours and then finds it.
        let inserted = exec(
            t.c,
            "INSERT INTO tasks (id, queue, state, priority, payload, requires, target, attempt, max_attempts, backoff_ms, \
             timeout_ms, idempotency_key, not_before, deps, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11, $12, $13, $14, $14) \
             ON CONFLICT (idempotency_key) DO NOTHING",
            &[
                &nt.id,
                &nt.queue,
                &state.as_str(),
                &nt.priority,
                &Json(&nt.payload),
                &nt.requires,
                &nt.target,
                &(nt.max_attempts as i32),
                &nt.backoff_ms,
                &nt.timeout_ms,
                &nt.idempotency_key,
                &not_before,
                &(nt.depends_on.len() as i32),
                &t.now,
            ],
        )
        .await?;
        if inserted == 0 {
            let key = nt.idempotency_key.as_deref().unwrap_or_default();
            let existing = by_key(t, key).await?.ok_or_else(|| {
                Fail::Done(Error::internal(format!(
                    "task {} conflicted on idempotency key {key:?} that no task holds",
                    nt.id
                )))
            })?;
            let (task, _) = load(t.c, &existing)
                .await?
                .ok_or_else(|| not_found(&existing))?;
            out.push((task, true));
            continue;
        }
        for d in &nt.depends_on {
            exec(
                t.c,
                "INSERT INTO task_deps (task, dep) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&nt.id, d],
            )
            .await?;
        }
        if let Some((d, s)) = dead_dep {
            let why = format!("cancelled: dependency {d} is {}", s.as_str());
            finish_unsuccessfully(t, &nt.id, TaskState::Cancelled, &why).await?;
        }
        let (task, _) = load(t.c, &nt.id).await?.ok_or_else(|| not_found(&nt.id))?;
        created.push(task.clone());
        out.push((task, false));
    }
    if !created.is_empty() {
        let refs: Vec<&Task> = created.iter().collect();
        event(t, topics::TASK_ENQUEUED, source, &refs, json!({}));
    }
    // Enqueued behind a dependency that had already died: cancelled at birth,
    // and said so like any other cancellation.
    for task in created.iter().filter(|x| x.state == TaskState::Cancelled) {
        event(
            t,
            topics::TASK_CANCELLED,
            &hub_source(),
            &[task],
            json!({"reason": task.error}),
        );
    }
    Ok(out)
}

/// Holds the claimer's row `FOR KEY SHARE` until COMMIT: an expiry or close of the
/// claimer (which locks the row `FOR UPDATE`, then returns the claimer's running
/// tasks) either ends it first, and the claim is refused, or waits for the claim
/// and then finds and releases the tasks it took. Without the lock a claim
/// racing the claimer's end would leave tasks held by an ended instance until
/// their leases ran out.
async fn claim(t: &mut Tx<'_>, spec: &ClaimSpec) -> R<Vec<ClaimedTask>> {
    let inst = share_instance(t, &spec.instance)
        .await?
        .filter(|i| i.state == InstanceState::Live && i.lease_until.millis() >= t.now)
        .ok_or_else(|| Fail::Done(Error::unknown_instance(&spec.instance)))?;
    inst.refuse_ghost()?;
    let candidates = rows(
        t.c,
        "SELECT t.id, t.timeout_ms FROM tasks t \
         WHERE t.queue = ANY($1) AND t.state IN ('pending', 'scheduled', 'failed') AND t.not_before <= $2 \
         AND (t.target IS NULL OR t.target = $3) AND t.requires <@ $4 \
         AND (t.deps = 0 OR NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks t2 ON t2.id = d.dep \
              WHERE d.task = t.id AND t2.state <> 'completed')) \
         ORDER BY t.priority DESC, t.seq LIMIT $5 FOR UPDATE OF t SKIP LOCKED",
        &[&spec.queues, &t.now, &spec.instance, &inst.capabilities, &(spec.max as i64)],
    )
    .await?;
    let mut out = Vec::with_capacity(candidates.len());
    for r in candidates {
        let id: String = get(&r, 0)?;
        let timeout: Option<i64> = get(&r, 1)?;
        let lease = spec.lease_ms.or(timeout).unwrap_or(DEFAULT_LEASE_MS);
        let token = ids::new_id(ids::CLAIM);
        let until = t.now + lease;
        let row = row_one(
            t.c,
            &format!(
                "UPDATE tasks SET state = 'running', attempt = attempt + 1, claimed_by = $2, claim = $3, lease_ms = $4, \
                 lease_until = $5, updated_at = $6 WHERE id = $1 RETURNING {TASK_COLS}"
            ),
            &[&id, &spec.instance, &token, &lease, &until, &t.now],
        )
        .await?;
        let (task, _) = task_from_row(&row)?;
        out.push(ClaimedTask { task, claim: token });
    }
    if !out.is_empty() {
        let refs: Vec<&Task> = out.iter().map(|c| &c.task).collect();
        let src = EventSource {
            instance: Some(inst.id.clone()),
            entity: Some(inst.entity.clone()),
            token: None,
        };
        event(t, topics::TASK_CLAIMED, &src, &refs, json!({"by": inst.id}));
    }
    Ok(out)
}

async fn current(t: &Tx<'_>, id: &str, claim: &str) -> R<Task> {
    let (task, cur) = lock(t, id).await?.ok_or_else(|| not_found(id))?;
    if task.state != TaskState::Running || cur.as_deref() != Some(claim) {
        return Err(stale(id, task.state));
    }
    Ok(task)
}

async fn heartbeat(t: &mut Tx<'_>, id: &str, claim: &str, progress: &Option<Value>) -> R<i64> {
    current(t, id, claim).await?;
    let row = row_one(
        t.c,
        "UPDATE tasks SET lease_until = $2 + COALESCE(lease_ms, $3), progress = COALESCE($4, progress), updated_at = $2 \
         WHERE id = $1 RETURNING lease_until",
        &[&id, &t.now, &DEFAULT_LEASE_MS, &progress.as_ref().map(Json)],
    )
    .await?;
    get(&row, 0)
}

/// Completes each item whose claim is current; with `read_back`, answers the
/// completed task, else only that it completed (the row is locked and checked
/// on its state and claim alone).
async fn complete_and_claim(
    t: &mut Tx<'_>,
    done: &Completion,
    next: &ClaimSpec,
) -> R<(Task, Vec<ClaimedTask>)> {
    let task = complete(t, std::slice::from_ref(done), true)
        .await?
        .pop()
        .ok_or_else(|| Fail::Done(Error::internal("complete returned nothing")))?
        .map_err(Fail::Done)?
        .ok_or_else(|| Fail::Done(no_task(&done.id)))?;
    Ok((task, claim(t, next).await?))
}

async fn complete(
    t: &mut Tx<'_>,
    items: &[Completion],
    read_back: bool,
) -> R<Vec<Result<Option<Task>>>> {
    let mut out = Vec::with_capacity(items.len());
    let mut done: Vec<Value> = Vec::new();
    let mut by = None;
    for it in items {
        let Some(held) = row_opt(
            t.c,
            "SELECT state, claim FROM tasks WHERE id = $1 FOR UPDATE",
            &[&it.id],
        )
        .await?
        else {
            out.push(Err(no_task(&it.id)));
            continue;
        };
        let state: String = get(&held, 0)?;
        let state = TaskState::parse(&state).unwrap_or(TaskState::Pending);
        let claim: Option<String> = get(&held, 1)?;
        if state != TaskState::Running || claim.as_deref() != Some(it.claim.as_str()) {
            out.push(Err(stale_claim(&it.id, state)));
            continue;
        }
        let set = "UPDATE tasks SET state = 'completed', result = $2, lease_until = NULL, updated_at = $3, \
                   completed_at = $3 WHERE id = $1";
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&it.id, &Json(&it.result), &t.now];
        let (queue, claimer, task) = if read_back {
            let row = row_one(t.c, &format!("{set} RETURNING {TASK_COLS}"), &args).await?;
            let (task, _) = task_from_row(&row)?;
            (task.queue.clone(), task.claimed_by.clone(), Some(task))
        } else {
            let row = row_one(t.c, &format!("{set} RETURNING queue, claimed_by"), &args).await?;
            (get(&row, 0)?, get(&row, 1)?, None)
        };
        if done.is_empty() {
            by = claimer;
        }
        done.push(task_ref(&it.id, &queue, TaskState::Completed));
        out.push(Ok(task));
    }
    if !done.is_empty() {
        let src = EventSource {
            instance: by,
            ..hub_source()
        };
        t.event(
            topics::TASK_COMPLETED,
            &src,
            task_event_data(done, Value::Null),
        );
    }
    Ok(out)
}

async fn fail(t: &mut Tx<'_>, id: &str, claim: &str, error: &str, retry: bool) -> R<Task> {
    let task = current(t, id, claim).await?;
    match after_failure(task.attempt, task.max_attempts, retry) {
        TaskState::Failed => {
            let not_before = t.now + retry_delay(task.backoff_ms, task.attempt);
            exec(
                t.c,
                "UPDATE tasks SET state = 'failed', error = $2, claim = NULL, claimed_by = NULL, lease_until = NULL, \
                 not_before = $3, updated_at = $4 WHERE id = $1",
                &[&id, &error, &not_before, &t.now],
            )
            .await?;
            let (task, _) = load(t.c, id).await?.ok_or_else(|| not_found(id))?;
            event(
                t,
                topics::TASK_FAILED,
                &hub_source(),
                &[&task],
                json!({"error": error, "retry_at": not_before}),
            );
            Ok(task)
        }
        _ => {
            finish_unsuccessfully(t, id, TaskState::Dead, error).await?;
            let (task, _) = load(t.c, id).await?.ok_or_else(|| not_found(id))?;
            event(
                t,
                topics::TASK_DEAD,
                &hub_source(),
                &[&task],
                json!({"error": error}),
            );
            Ok(task)
        }
    }
}

async fn cancel(t: &mut Tx<'_>, id: &str, by: &str) -> R<Task> {
    let (task, _) = lock(t, id).await?.ok_or_else(|| not_found(id))?;
    if task.state.is_final() {
        return Err(Fail::Done(
            Error::conflict(format!("task {id} is already {}", task.state.as_str()))
                .with_details(json!({"task": id, "state": task.state})),
        ));
    }
    finish_unsuccessfully(t, id, TaskState::Cancelled, &format!("cancelled by {by}")).await?;
    let (task, _) = load(t.c, id).await?.ok_or_else(|| not_found(id))?;
    event(
        t,
        topics::TASK_CANCELLED,
        &hub_source(),
        &[&task],
        json!({"by": by}),
    );
    Ok(task)
}

async fn requeue_lapsed(t: &mut Tx<'_>, limit: usize) -> R<usize> {
    let lapsed = rows(
        t.c,
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'running' AND lease_until < $1 \
             ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED"
        ),
        &[&t.now, &limit_param(limit)],
    )
    .await?;
    let n = lapsed.len();
    for r in lapsed {
        let (task, _) = task_from_row(&r)?;
        lose_claim(t, &task, "claim lease expired").await?;
    }
    let promoted = exec(
        t.c,
        "UPDATE tasks SET state = 'pending', updated_at = $1 WHERE id IN (SELECT id FROM tasks \
         WHERE state IN ('scheduled', 'failed') AND not_before <= $1 FOR UPDATE SKIP LOCKED)",
        &[&t.now],
    )
    .await?;
    Ok(n + promoted as usize)
}

const SCHEDULE_COLS: &str =
    "name, queue, payload, every_ms, cron, priority, requires, max_attempts, next_due, last_enqueued_at, created_at";

fn schedule_from_row(r: &Row) -> R<Schedule> {
    Ok(Schedule {
        name: get(r, 0)?,
        queue: get(r, 1)?,
        payload: get::<Option<Value>>(r, 2)?.unwrap_or(Value::Null),
        every_ms: get(r, 3)?,
        cron: get(r, 4)?,
        priority: get(r, 5)?,
        requires: get(r, 6)?,
        max_attempts: get::<i32>(r, 7)?.max(0) as u32,
        next_due: Timestamp(get(r, 8)?),
        last_enqueued_at: get::<Option<i64>>(r, 9)?.map(Timestamp),
        created_at: Timestamp(get(r, 10)?),
    })
}

async fn put_schedule(t: &mut Tx<'_>, s: &ScheduleSpec) -> R<Schedule> {
    let row = row_one(
        t.c,
        &format!(
            "INSERT INTO schedules (name, queue, payload, every_ms, cron, priority, requires, max_attempts, next_due, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, \
             payload = excluded.payload, every_ms = excluded.every_ms, cron = excluded.cron, priority = excluded.priority, \
             requires = excluded.requires, max_attempts = excluded.max_attempts, next_due = excluded.next_due \
             RETURNING {SCHEDULE_COLS}"
        ),
        &[
            &s.name,
            &s.queue,
            &Json(&s.payload),
            &s.every_ms,
            &s.cron,
            &s.priority,
            &s.requires,
            &(s.max_attempts as i32),
            &s.next_due,
            &t.now,
        ],
    )
    .await?;
    t.event(
        topics::SCHEDULE_CHANGED,
        &hub_source(),
        json!({"name": s.name, "deleted": false, "next_due": s.next_due}),
    );
    schedule_from_row(&row)
}

async fn fire(t: &mut Tx<'_>, name: &str, due: i64, next_due: i64) -> R<Option<Task>> {
    let Some(row) = row_opt(
        t.c,
        &format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE name = $1 FOR UPDATE"),
        &[&name],
    )
    .await?
    else {
        return Ok(None);
    };
    let s = schedule_from_row(&row)?;
    if s.next_due.millis() != due {
        return Ok(None); // another replica fired it, or it was edited
    }
    let task = NewTask {
        id: ids::new_id(ids::TASK),
        queue: s.queue.clone(),
        payload: s.payload.clone(),
        priority: s.priority,
        requires: s.requires.clone(),
        target: None,
        idempotency_key: Some(format!("schedule:{name}:{due}")),
        max_attempts: s.max_attempts,
        backoff_ms: DEFAULT_BACKOFF_MS,
        not_before: None,
        depends_on: vec![],
        timeout_ms: None,
    };
    let src = EventSource {
        token: Some(format!("schedule:{name}")),
        ..hub_source()
    };
    let mut created = enqueue(t, &[task], &src).await?;
    exec(
        t.c,
        "UPDATE schedules SET next_due = $2, last_enqueued_at = $3 WHERE name = $1",
        &[&name, &next_due, &t.now],
    )
    .await?;
    Ok(created.pop().map(|(task, _)| task))
}

macro_rules! tx {
    ($store:expr, [$($arg:ident),*], |$t:ident| $body:expr) => {
        $store
            .inner
            .write(move |$t| {
                $(let $arg = $arg.clone();)*
                Box::pin(async move { $body.await })
            })
            .await
    };
}

#[async_trait]
impl QueueStore for PostgresStore {
    async fn enqueue(&self, tasks: Vec<NewTask>, source: EventSource) -> Result<Vec<(Task, bool)>> {
        tx!(self, [tasks, source], |t| enqueue(t, &tasks, &source))
    }

    async fn claim_tasks(&self, spec: ClaimSpec) -> Result<Vec<ClaimedTask>> {
        tx!(self, [spec], |t| claim(t, &spec))
    }

    async fn heartbeat_task(&self, id: &str, claim: &str, progress: Option<Value>) -> Result<i64> {
        let (id, claim) = (id.to_string(), claim.to_string());
        tx!(self, [id, claim, progress], |t| heartbeat(
            t, &id, &claim, &progress
        ))
    }

    async fn complete_tasks(&self, items: Vec<Completion>) -> Result<Vec<Result<Task>>> {
        Ok(read_back(tx!(self, [items], |t| complete(
            t, &items, true
        ))?))
    }

    async fn complete_outcomes(&self, items: Vec<Completion>) -> Result<Vec<Result<()>>> {
        Ok(outcomes(tx!(self, [items], |t| complete(
            t, &items, false
        ))?))
    }

    async fn complete_and_claim(
        &self,
        done: Completion,
        next: ClaimSpec,
    ) -> Result<(Task, Vec<ClaimedTask>)> {
        tx!(self, [done, next], |t| complete_and_claim(t, &done, &next))
    }

    async fn complete_outcomes_and_claim(
        &self,
        items: Vec<Completion>,
        next: ClaimSpec,
    ) -> Result<(Vec<Result<()>>, Vec<ClaimedTask>)> {
        tx!(self, [items, next], |t| async {
            let done = complete(t, &items, false).await?;
            Ok((outcomes(done), claim(t, &next).await?))
        })
    }

    async fn fail_task(&self, id: &str, claim: &str, error: &str, retry: bool) -> Result<Task> {
        let (id, claim, error) = (id.to_string(), claim.to_string(), error.to_string());
        tx!(self, [id, claim, error], |t| fail(
            t, &id, &claim, &error, retry
        ))
    }

    async fn cancel_task(&self, id: &str, by: &str) -> Result<Task> {
        let (id, by) = (id.to_string(), by.to_string());
        tx!(self, [id, by], |t| cancel(t, &id, &by))
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        timed(async {
            let c = self.inner.client().await?;
            Ok(load(&c, id).await.map_err(Error::from)?.map(|t| t.0))
        })
        .await
    }

    async fn list_tasks(&self, f: TaskFilter) -> Result<Vec<Task>> {
        timed(async {
            let c = self.inner.client().await?;
            let state = f.state.map(TaskState::as_str);
            let rs = rows(
                &c,
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR state = $2) \
                     AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4"
                ),
                &[&f.queue, &state, &f.after, &limit_param(f.limit)],
            )
            .await
            .map_err(Error::from)?;
            rs.iter()
                .map(|r| task_from_row(r).map(|t| t.0).map_err(Error::from))
                .collect()
        })
        .await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        timed(async {
            let c = self.inner.client().await?;
            let now = now_ms(&c).await.map_err(Error::from)?;
            let rs = rows(
                &c,
                "SELECT queue, state, count(*), MIN(CASE WHEN state = 'pending' THEN created_at END) \
                 FROM tasks GROUP BY queue, state ORDER BY queue",
                &[],
            )
            .await
            .map_err(Error::from)?;
            let mut by_queue: BTreeMap<String, QueueStats> = BTreeMap::new();
            for r in rs {
                let queue: String = get(&r, 0).map_err(Error::from)?;
                let state: String = get(&r, 1).map_err(Error::from)?;
                let n = get::<i64>(&r, 2).map_err(Error::from)? as u64;
                let oldest: Option<i64> = get(&r, 3).map_err(Error::from)?;
                let q = by_queue.entry(queue.clone()).or_insert_with(|| QueueStats {
                    name: queue,
                    ..Default::default()
                });
                match TaskState::parse(&state) {
                    Some(TaskState::Pending) => {
                        q.pending = n;
                        q.oldest_pending_age_ms = oldest.map(|o| (now - o).max(0));
                    }
                    Some(TaskState::Scheduled) => q.scheduled = n,
                    Some(TaskState::Running) => q.running = n,
                    Some(TaskState::Completed) => q.completed = n,
                    Some(TaskState::Failed) => q.failed = n,
                    Some(TaskState::Dead) => q.dead = n,
                    Some(TaskState::Cancelled) => q.cancelled = n,
                    None => {}
                }
            }
            Ok(by_queue.into_values().collect())
        })
        .await
    }

    async fn requeue_lapsed(&self, limit: usize) -> Result<usize> {
        tx!(self, [], |t| requeue_lapsed(t, limit))
    }

    async fn put_schedule(&self, spec: ScheduleSpec) -> Result<Schedule> {
        tx!(self, [spec], |t| put_schedule(t, &spec))
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        tx!(self, [name], |t| async move {
            let n = exec(t.c, "DELETE FROM schedules WHERE name = $1", &[&name]).await?;
            if n > 0 {
                t.event(
                    topics::SCHEDULE_CHANGED,
                    &hub_source(),
                    json!({"name": name, "deleted": true}),
                );
            }
            Ok(n > 0)
        })
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        timed(async {
            let c = self.inner.client().await?;
            let rs = rows(
                &c,
                &format!("SELECT {SCHEDULE_COLS} FROM schedules ORDER BY name"),
                &[],
            )
            .await
            .map_err(Error::from)?;
            rs.iter()
                .map(|r| schedule_from_row(r).map_err(Error::from))
                .collect()
        })
        .await
    }

    async fn due_schedules(&self) -> Result<Vec<Schedule>> {
        timed(async {
            let c = self.inner.client().await?;
            let now = now_ms(&c).await.map_err(Error::from)?;
            let rs = rows(
                &c,
                &format!(
                    "SELECT {SCHEDULE_COLS} FROM schedules WHERE next_due <= $1 ORDER BY next_due"
                ),
                &[&now],
            )
            .await
            .map_err(Error::from)?;
            rs.iter()
                .map(|r| schedule_from_row(r).map_err(Error::from))
                .collect()
        })
        .await
    }

    async fn fire_schedule(&self, name: &str, due: i64, next_due: i64) -> Result<Option<Task>> {
        let name = name.to_string();
        tx!(self, [name], |t| fire(t, &name, due, next_due))
    }

    async fn prune_tasks(&self, retention_ms: i64) -> Result<u64> {
        tx!(self, [], |t| async move {
            let cut = t.now - retention_ms;
            exec(
                t.c,
                "DELETE FROM task_deps WHERE task IN (SELECT id FROM tasks WHERE completed_at < $1 \
                 AND state IN ('completed', 'dead', 'cancelled'))",
                &[&cut],
            )
            .await?;
            exec(t.c, "DELETE FROM tasks WHERE completed_at < $1 AND state IN ('completed', 'dead', 'cancelled')", &[&cut])
                .await
        })
    }
}
