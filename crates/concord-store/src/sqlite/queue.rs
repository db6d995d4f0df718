//! The SQLite side of the work queue. Claims are race-free without row locks
//! because every write runs on the single writer thread: the SELECT of claimable
//! tasks and the UPDATE that claims them see no other writer in between.

use super::ops::{append_event, get_actor};
use super::{db_err, SqliteStore};
use crate::model::topics;
use crate::queue::*;
use async_trait::async_trait;
use concord_core::api::{ClaimedTask, EventSource, QueueStats, Schedule, Task, TaskState};
use concord_core::task::{after_failure, after_lost_claim, retry_delay, DEFAULT_LEASE_MS};
use concord_core::{ids, Error, Result, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Every column of a task, in `task_from_row`'s order. The payload lives in
/// `task_payloads` (written once; see schema version 8), found by rowid.
const TASK_COLS: &str = "id, queue, state, priority, (SELECT payload FROM task_payloads WHERE task = tasks.rowid), requires, target, attempt, max_attempts, backoff_ms, \
    timeout_ms, claimed_by, lease_until, progress, result, error, idempotency_key, not_before, created_at, updated_at, \
    completed_at, claim, CASE WHEN deps = 0 THEN '[]' ELSE (SELECT json_group_array(dep) FROM task_deps WHERE task = tasks.id) END";
/// How many columns `TASK_COLS` names; a query may append its own after them.
const TASK_COLS_LEN: usize = 23;

pub(crate) fn json_col(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Value>> {
    Ok(r.get::<_, Option<String>>(i)?
        .map(|s| serde_json::from_str(&s).unwrap_or(Value::Null)))
}

/// A task row with its payload still JSON text: (task with a null payload, its
/// claim, the payload text). The claim path answers this way, and the caller's
/// thread parses the payloads (`Claimed::parse`), so the one writer thread does
/// not: parsing the payloads of a claimed batch was 8% of it under the batch
/// queue benchmark.
fn task_parts(r: &Row<'_>) -> rusqlite::Result<(Task, Option<String>, Option<String>)> {
    let state: String = r.get(2)?;
    let requires: String = r.get(5)?;
    let deps: String = r.get(22)?;
    let not_before: i64 = r.get(17)?;
    Ok((
        Task {
            id: r.get(0)?,
            queue: r.get(1)?,
            state: TaskState::parse(&state).unwrap_or(TaskState::Pending),
            priority: r.get(3)?,
            payload: Value::Null,
            requires: serde_json::from_str(&requires).unwrap_or_default(),
            target: r.get(6)?,
            attempt: r.get(7)?,
            max_attempts: r.get(8)?,
            backoff_ms: r.get(9)?,
            timeout_ms: r.get(10)?,
            claimed_by: r.get(11)?,
            lease_until: r.get::<_, Option<i64>>(12)?.map(Timestamp),
            progress: json_col(r, 13)?,
            result: json_col(r, 14)?,
            error: r.get(15)?,
            idempotency_key: r.get(16)?,
            not_before: (not_before > 0).then_some(Timestamp(not_before)),
            created_at: Timestamp(r.get(18)?),
            updated_at: Timestamp(r.get(19)?),
            completed_at: r.get::<_, Option<i64>>(20)?.map(Timestamp),
            depends_on: serde_json::from_str(&deps).unwrap_or_default(),
        },
        r.get(21)?,
        r.get(4)?,
    ))
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<(Task, Option<String>)> {
    let (mut task, claim, payload) = task_parts(r)?;
    task.payload = parse_payload(payload);
    Ok((task, claim))
}

fn parse_payload(text: Option<String>) -> Value {
    text.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// Claimed tasks whose payloads are still JSON text (see `task_parts`).
struct Claimed(Vec<(ClaimedTask, Option<String>)>);

impl Claimed {
    fn parse(self) -> Vec<ClaimedTask> {
        self.0
            .into_iter()
            .map(|(mut t, payload)| {
                t.task.payload = parse_payload(payload);
                t
            })
            .collect()
    }
}

pub(crate) fn load(c: &Connection, id: &str) -> Result<Option<(Task, Option<String>)>> {
    c.prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], task_from_row).optional())
        .map_err(db_err)
}

fn hub() -> EventSource {
    EventSource::default()
}

/// Tasks moved between (queue, state) counts by one job, handed to `counts` at
/// the job's end (which folds them over the writer's whole transaction). Every
/// statement that inserts a task, changes its state or deletes it records its
/// move here (or in `move_one`).
///
/// A list searched in order, not a map: a job touches a few (queue, state)
/// pairs, often one queue for a hundred tasks, and a map keyed by an owned
/// queue name allocated that name once per task.
#[derive(Default)]
struct Moves(Vec<(String, &'static str, i64)>);

impl Moves {
    fn add(&mut self, queue: &str, state: TaskState, n: i64) {
        let state = state.as_str();
        match self
            .0
            .iter_mut()
            .find(|(q, s, _)| *s == state && q == queue)
        {
            Some((_, _, m)) => *m += n,
            None => self.0.push((queue.to_string(), state, n)),
        }
    }

    fn moved(&mut self, queue: &str, from: TaskState, to: TaskState) {
        self.add(queue, from, -1);
        self.add(queue, to, 1);
    }

    fn write(self, c: &Connection) -> Result<()> {
        super::counts::add(c, self.0)
    }
}

/// Records one task's move at once (the paths that move one task at a time).
fn move_one(c: &Connection, queue: &str, from: TaskState, to: TaskState) -> Result<()> {
    let mut m = Moves::default();
    m.moved(queue, from, to);
    m.write(c)
}

/// Records the moves of the tasks a bulk statement is about to change:
/// `select` yields (queue, state, count) of exactly those rows, and `to` is
/// where they go (None: deleted).
fn move_selected(c: &Connection, select: &str, arg: i64, to: Option<TaskState>) -> Result<()> {
    let mut m = Moves::default();
    let mut s = c.prepare_cached(select).map_err(db_err)?;
    let rows = s
        .query_map([arg], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db_err)?;
    for row in rows {
        let (queue, state, n) = row.map_err(db_err)?;
        if let Some(from) = TaskState::parse(&state) {
            m.add(&queue, from, -n);
            if let Some(to) = to {
                m.add(&queue, to, n);
            }
        }
    }
    m.write(c)
}

fn event(
    c: &Connection,
    now: i64,
    topic: &str,
    source: &EventSource,
    tasks: &[&Task],
    extra: Value,
) -> Result<i64> {
    let list: Vec<Value> = tasks
        .iter()
        .map(|t| task_ref(&t.id, &t.queue, t.state))
        .collect();
    event_of(c, now, topic, source, list, extra)
}

/// Appends a `sys.task.*` event naming `list` (see `task_ref`).
fn event_of(
    c: &Connection,
    now: i64,
    topic: &str,
    source: &EventSource,
    list: Vec<Value>,
    extra: Value,
) -> Result<i64> {
    append_event(c, now, topic, source, task_event_data(list, extra))
}

/// Sets a task to a final failure state and cancels everything that depends on it.
pub(crate) fn finish_unsuccessfully(
    c: &Connection,
    now: i64,
    id: &str,
    state: TaskState,
    error: &str,
) -> Result<()> {
    let before: Option<(String, String)> = c
        .prepare_cached("SELECT queue, state FROM tasks WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_err)?;
    c.prepare_cached(
        "UPDATE tasks SET state = ?2, error = ?3, claim = NULL, claimed_by = NULL, lease_until = NULL, \
         updated_at = ?4, completed_at = ?4 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, state.as_str(), error, now]))
    .map_err(db_err)?;
    if let Some((queue, from)) = before {
        if let Some(from) = TaskState::parse(&from) {
            move_one(c, &queue, from, state)?;
        }
    }
    let dependents: Vec<String> = {
        let mut s = c
            .prepare_cached(
                "SELECT d.task FROM task_deps d JOIN tasks t ON t.id = d.task \
                 WHERE d.dep = ?1 AND t.state NOT IN ('completed', 'dead', 'cancelled')",
            )
            .map_err(db_err)?;
        let rows = s.query_map([id], |r| r.get(0)).map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    for d in dependents {
        let why = format!("cancelled: dependency {id} is {}", state.as_str());
        finish_unsuccessfully(c, now, &d, TaskState::Cancelled, &why)?;
        if let Some((t, _)) = load(c, &d)? {
            event(
                c,
                now,
                topics::TASK_CANCELLED,
                &hub(),
                &[&t],
                json!({"reason": why}),
            )?;
        }
    }
    Ok(())
}

/// A running task whose claim was lost (lease lapsed, claimer ended). The event
/// carries the state the task is left in, as every other task event does.
fn lose_claim(c: &Connection, now: i64, t: &Task, reason: &str) -> Result<()> {
    let (topic, why) = match after_lost_claim(t.attempt, t.max_attempts) {
        TaskState::Dead => {
            let why = format!(
                "{reason}; out of attempts ({}/{})",
                t.attempt, t.max_attempts
            );
            finish_unsuccessfully(c, now, &t.id, TaskState::Dead, &why)?;
            (topics::TASK_DEAD, why)
        }
        _ => {
            c.prepare_cached(
                "UPDATE tasks SET state = 'pending', claim = NULL, claimed_by = NULL, lease_until = NULL, \
                 error = ?2, updated_at = ?3 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![t.id, reason, now]))
            .map_err(db_err)?;
            move_one(c, &t.queue, t.state, TaskState::Pending)?;
            (topics::TASK_REQUEUED, reason.to_string())
        }
    };
    let (after, _) = load(c, &t.id)?.ok_or_else(|| no_task(&t.id))?;
    event(
        c,
        now,
        topic,
        &hub(),
        &[&after],
        json!({"reason": why, "claimed_by": t.claimed_by}),
    )?;
    Ok(())
}

fn running_where(
    c: &Connection,
    clause: &str,
    arg: &dyn rusqlite::ToSql,
    limit: usize,
) -> Result<Vec<Task>> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'running' AND {clause} LIMIT ?2"
        ))
        .map_err(db_err)?;
    let rows = s
        .query_map(params![arg, limit as i64], |r| {
            task_from_row(r).map(|t| t.0)
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// Called when an instance ends: its claims go back to the queue at once.
pub(crate) fn release_claims(c: &Connection, now: i64, instance: &str) -> Result<()> {
    for t in running_where(c, "claimed_by = ?1", &instance, usize::MAX >> 1)? {
        lose_claim(c, now, &t, &format!("claimer {instance} ended"))?;
    }
    Ok(())
}

/// Tasks to enqueue, with their payloads already JSON text. `QueueStore::enqueue`
/// builds this before its write job, so that the one writer thread does not
/// serialize payloads (100 of 1 KiB each were 6% of it under the batch queue
/// benchmark); the writer's own callers (dispatch, schedules) build it in place.
pub(crate) struct Serialized(Vec<(NewTask, String)>);

impl Serialized {
    pub(crate) fn new(tasks: Vec<NewTask>) -> Serialized {
        Serialized(
            tasks
                .into_iter()
                .map(|t| {
                    let text = serde_json::to_string(&t.payload).unwrap_or_else(|_| "null".into());
                    (t, text)
                })
                .collect(),
        )
    }
}

pub(crate) fn enqueue(
    c: &Connection,
    now: i64,
    tasks: Serialized,
    source: &EventSource,
) -> Result<Vec<(Task, bool)>> {
    if let Some(id) = &source.instance {
        get_actor(c, id)?
            .ok_or_else(|| Error::unknown_instance(id))?
            .refuse_unless_writer()?;
    }
    let mut out: Vec<(Task, bool)> = Vec::with_capacity(tasks.0.len());
    let mut moves = Moves::default();
    // Prepared once for the whole list: looking a statement up in the cache
    // hashes its text, per task and statement.
    let mut insert_task = c
        .prepare_cached(
            "INSERT INTO tasks (id, queue, state, priority, requires, target, attempt, max_attempts, backoff_ms, \
             timeout_ms, idempotency_key, not_before, deps, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)",
        )
        .map_err(db_err)?;
    let mut insert_payload = c
        .prepare_cached("INSERT INTO task_payloads (task, payload) VALUES (?1, ?2)")
        .map_err(db_err)?;
    for (t, payload) in tasks.0 {
        if let Some(key) = &t.idempotency_key {
            let existing: Option<String> = c
                .prepare_cached("SELECT id FROM tasks WHERE idempotency_key = ?1")
                .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
                .map_err(db_err)?;
            if let Some(id) = existing {
                let (task, _) = load(c, &id)?.ok_or_else(|| no_task(&id))?;
                out.push((task, true));
                continue;
            }
        }
        let mut dead_dep = None;
        for (i, d) in t.depends_on.iter().enumerate() {
            let state: Option<String> = c
                .prepare_cached("SELECT state FROM tasks WHERE id = ?1")
                .and_then(|mut s| s.query_row([d], |r| r.get(0)).optional())
                .map_err(db_err)?;
            match state.as_deref().and_then(TaskState::parse) {
                None => {
                    return Err(Error::bad_field(
                        &format!("depends_on[{i}]"),
                        format!("no task {d}"),
                    ))
                }
                Some(s @ (TaskState::Dead | TaskState::Cancelled)) => {
                    dead_dep = Some((d.clone(), s))
                }
                Some(_) => {}
            }
        }
        let not_before = t.not_before.unwrap_or(0);
        let state = if not_before > now {
            TaskState::Scheduled
        } else {
            TaskState::Pending
        };
        let requires = if t.requires.is_empty() {
            "[]".to_string()
        } else {
            serde_json::to_string(&t.requires).unwrap_or_else(|_| "[]".into())
        };
        insert_task
            .execute(params![
                t.id,
                t.queue,
                state.as_str(),
                t.priority,
                requires,
                t.target,
                t.max_attempts,
                t.backoff_ms,
                t.timeout_ms,
                t.idempotency_key,
                not_before,
                t.depends_on.len() as i64,
                now
            ])
            .map_err(db_err)?;
        insert_payload
            .execute(params![c.last_insert_rowid(), payload])
            .map_err(db_err)?;
        moves.add(&t.queue, state, 1);
        for d in &t.depends_on {
            c.prepare_cached("INSERT OR IGNORE INTO task_deps (task, dep) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![t.id, d]))
                .map_err(db_err)?;
        }
        let task = if let Some((d, s)) = dead_dep {
            finish_unsuccessfully(
                c,
                now,
                &t.id,
                TaskState::Cancelled,
                &format!("cancelled: dependency {d} is {}", s.as_str()),
            )?;
            load(c, &t.id)?.ok_or_else(|| no_task(&t.id))?.0
        } else {
            // The row just written, without reading it back (and parsing its
            // payload again): the conformance suite compares it with get_task.
            inserted(t, state, now)
        };
        out.push((task, false));
    }
    moves.write(c)?;
    let created: Vec<&Task> = out.iter().filter(|(_, old)| !old).map(|(t, _)| t).collect();
    if !created.is_empty() {
        event(c, now, topics::TASK_ENQUEUED, source, &created, json!({}))?;
    }
    // Enqueued behind a dependency that had already died: cancelled at birth,
    // and said so like any other cancellation.
    for t in created.iter().filter(|t| t.state == TaskState::Cancelled) {
        event(
            c,
            now,
            topics::TASK_CANCELLED,
            &hub(),
            &[t],
            json!({"reason": t.error}),
        )?;
    }
    Ok(out)
}

/// The task as `enqueue`'s INSERT stored it.
fn inserted(t: NewTask, state: TaskState, now: i64) -> Task {
    Task {
        id: t.id,
        queue: t.queue,
        state,
        priority: t.priority,
        payload: t.payload,
        requires: t.requires,
        target: t.target,
        attempt: 0,
        max_attempts: t.max_attempts,
        backoff_ms: t.backoff_ms,
        timeout_ms: t.timeout_ms,
        claimed_by: None,
        lease_until: None,
        progress: None,
        result: None,
        error: None,
        idempotency_key: t.idempotency_key,
        not_before: t.not_before.filter(|&n| n > 0).map(Timestamp),
        created_at: Timestamp(now),
        updated_at: Timestamp(now),
        completed_at: None,
        depends_on: t.depends_on,
    }
}

/// The condition of the `tasks_claimable` partial index, which a query must
/// repeat to use it (schema version 9 says why it is not an `IN` list).
const CLAIMABLE: &str = "(state = 'pending' OR state = 'scheduled' OR state = 'failed')";

fn claim(c: &Connection, now: i64, spec: &ClaimSpec) -> Result<Claimed> {
    let inst = get_actor(c, &spec.instance)?
        .filter(|i| i.is_live() && i.lease_until >= now)
        .ok_or_else(|| Error::unknown_instance(&spec.instance))?;
    inst.refuse_ghost()?;
    let caps = &inst.capabilities_json;
    // One placeholder per queue (not json_each), so the planner walks the partial
    // index of claimable tasks instead of scanning the table.
    let placeholders: Vec<String> = (0..spec.queues.len())
        .map(|i| format!("?{}", i + 5))
        .collect();
    // The rowid comes last, after `task_parts`'s columns: the UPDATE finds the
    // row by it, not by a second walk of the id index.
    let sql = format!(
        "SELECT {TASK_COLS}, tasks.rowid FROM tasks INDEXED BY tasks_claimable \
         WHERE tasks.queue IN ({}) AND {CLAIMABLE} AND tasks.not_before <= ?1 \
         AND (tasks.target IS NULL OR tasks.target = ?2) \
         AND (tasks.requires = '[]' OR NOT EXISTS (SELECT 1 FROM json_each(tasks.requires) r \
              WHERE r.value NOT IN (SELECT value FROM json_each(?3)))) \
         AND (tasks.deps = 0 OR NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks t2 ON t2.id = d.dep \
              WHERE d.task = tasks.id AND t2.state != 'completed')) \
         ORDER BY tasks.priority DESC, tasks.rowid LIMIT ?4",
        placeholders.join(", ")
    );
    // The candidates come back whole: the claimed task is this row with the
    // claim's changes, so nothing is read again after the UPDATE.
    let candidates: Vec<(Task, Option<String>, i64)> = {
        let mut s = c.prepare_cached(&sql).map_err(db_err)?;
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&now, &spec.instance, &caps, &spec.max];
        for q in &spec.queues {
            args.push(q);
        }
        let rows = s
            .query_map(args.as_slice(), |r| {
                let rowid = r.get(TASK_COLS_LEN)?;
                task_parts(r).map(|(t, _, p)| (t, p, rowid))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    let mut out = Vec::with_capacity(candidates.len());
    let mut moves = Moves::default();
    let mut update = c
        .prepare_cached(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, claimed_by = ?2, claim = ?3, lease_ms = ?4, \
             lease_until = ?5, updated_at = ?6 WHERE rowid = ?1",
        )
        .map_err(db_err)?;
    for (mut task, payload, rowid) in candidates {
        let lease = spec
            .lease_ms
            .or(task.timeout_ms)
            .unwrap_or(DEFAULT_LEASE_MS);
        let token = ids::new_id(ids::CLAIM);
        update
            .execute(params![
                rowid,
                spec.instance,
                token,
                lease,
                now + lease,
                now
            ])
            .map_err(db_err)?;
        moves.moved(&task.queue, task.state, TaskState::Running);
        task.state = TaskState::Running;
        task.attempt += 1;
        task.claimed_by = Some(spec.instance.clone());
        task.lease_until = Some(Timestamp(now + lease));
        task.updated_at = Timestamp(now);
        out.push((ClaimedTask { task, claim: token }, payload));
    }
    moves.write(c)?;
    if !out.is_empty() {
        let refs: Vec<&Task> = out.iter().map(|(t, _)| &t.task).collect();
        let src = EventSource {
            instance: Some(inst.id.clone()),
            entity: Some(inst.entity.clone()),
            token: None,
        };
        event(
            c,
            now,
            topics::TASK_CLAIMED,
            &src,
            &refs,
            json!({"by": inst.id}),
        )?;
    }
    Ok(Claimed(out))
}

/// The task, if `claim` is its current claim.
fn current(c: &Connection, id: &str, claim: &str) -> Result<Task> {
    let (task, current) = load(c, id)?.ok_or_else(|| no_task(id))?;
    if task.state != TaskState::Running || current.as_deref() != Some(claim) {
        return Err(stale_claim(id, task.state));
    }
    Ok(task)
}

fn heartbeat(
    c: &Connection,
    now: i64,
    id: &str,
    claim: &str,
    progress: &Option<Value>,
) -> Result<i64> {
    current(c, id, claim)?;
    let lease: i64 = c
        .query_row(
            "SELECT COALESCE(lease_ms, ?2) FROM tasks WHERE id = ?1",
            params![id, DEFAULT_LEASE_MS],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let until = now + lease;
    let progress = progress
        .as_ref()
        .map(|p| serde_json::to_string(p).unwrap_or_else(|_| "null".into()));
    c.prepare_cached(
        "UPDATE tasks SET lease_until = ?2, progress = COALESCE(?3, progress), updated_at = ?4 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, until, progress, now]))
    .map_err(db_err)?;
    Ok(until)
}

/// Completes each item whose claim is current; with `read_back`, answers the
/// completed task, else only that it completed (and the claim is checked on a
/// narrow read, without the payload). The event names the tasks from that read.
fn complete(
    c: &Connection,
    now: i64,
    items: &[Completion],
    read_back: bool,
) -> Result<Vec<Result<Option<Task>>>> {
    let mut out = Vec::with_capacity(items.len());
    let mut done = Vec::new();
    let mut by = None;
    let mut moves = Moves::default();
    // With `read_back`, the whole row is read once, before the update, and the
    // answer is that row with the completion's changes (reading it again after
    // the UPDATE parsed the payload a second time). Either read also takes the
    // rowid, by which the UPDATE finds the row without walking the id index a
    // second time. Both statements are prepared once for the whole list.
    let mut read = if read_back {
        c.prepare_cached(&format!(
            "SELECT {TASK_COLS}, rowid FROM tasks WHERE id = ?1"
        ))
    } else {
        c.prepare_cached("SELECT queue, state, claim, claimed_by, rowid FROM tasks WHERE id = ?1")
    }
    .map_err(db_err)?;
    let mut update = c
        .prepare_cached(
            "UPDATE tasks SET state = 'completed', result = ?2, lease_until = NULL, updated_at = ?3, \
             completed_at = ?3 WHERE rowid = ?1",
        )
        .map_err(db_err)?;
    for it in items {
        let held = read
            .query_row([&it.id], |r| {
                if read_back {
                    let rowid: i64 = r.get(TASK_COLS_LEN)?;
                    let (t, claim) = task_from_row(r)?;
                    let claimed_by = t.claimed_by.clone();
                    return Ok((t.queue.clone(), t.state, claim, claimed_by, Some(t), rowid));
                }
                let state: String = r.get(1)?;
                let state = TaskState::parse(&state).unwrap_or(TaskState::Pending);
                Ok((r.get(0)?, state, r.get(2)?, r.get(3)?, None, r.get(4)?))
            })
            .optional()
            .map_err(db_err)?;
        let Some((queue, state, claim, claimed_by, task, rowid)) = held else {
            out.push(Err(no_task(&it.id)));
            continue;
        };
        if state != TaskState::Running || claim.as_deref() != Some(it.claim.as_str()) {
            out.push(Err(stale_claim(&it.id, state)));
            continue;
        }
        let result = serde_json::to_string(&it.result).unwrap_or_else(|_| "null".into());
        update
            .execute(params![rowid, result, now])
            .map_err(db_err)?;
        if done.is_empty() {
            by = claimed_by;
        }
        moves.moved(&queue, state, TaskState::Completed);
        done.push(task_ref(&it.id, &queue, TaskState::Completed));
        out.push(Ok(task.map(|mut t| {
            t.state = TaskState::Completed;
            t.result = Some(it.result.clone());
            t.lease_until = None;
            t.updated_at = Timestamp(now);
            t.completed_at = Some(Timestamp(now));
            t
        })));
    }
    moves.write(c)?;
    if !done.is_empty() {
        let source = EventSource {
            instance: by,
            ..hub()
        };
        event_of(c, now, topics::TASK_COMPLETED, &source, done, json!({}))?;
    }
    Ok(out)
}

fn fail(c: &Connection, now: i64, id: &str, claim: &str, error: &str, retry: bool) -> Result<Task> {
    let t = current(c, id, claim)?;
    match after_failure(t.attempt, t.max_attempts, retry) {
        TaskState::Failed => {
            let not_before = now + retry_delay(t.backoff_ms, t.attempt);
            c.prepare_cached(
                "UPDATE tasks SET state = 'failed', error = ?2, claim = NULL, claimed_by = NULL, lease_until = NULL, \
                 not_before = ?3, updated_at = ?4 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, error, not_before, now]))
            .map_err(db_err)?;
            move_one(c, &t.queue, t.state, TaskState::Failed)?;
            let (t, _) = load(c, id)?.ok_or_else(|| no_task(id))?;
            event(
                c,
                now,
                topics::TASK_FAILED,
                &hub(),
                &[&t],
                json!({"error": error, "retry_at": not_before}),
            )?;
            Ok(t)
        }
        _ => {
            finish_unsuccessfully(c, now, id, TaskState::Dead, error)?;
            let (t, _) = load(c, id)?.ok_or_else(|| no_task(id))?;
            event(
                c,
                now,
                topics::TASK_DEAD,
                &hub(),
                &[&t],
                json!({"error": error}),
            )?;
            Ok(t)
        }
    }
}

fn cancel(c: &Connection, now: i64, id: &str, by: &str) -> Result<Task> {
    let (t, _) = load(c, id)?.ok_or_else(|| no_task(id))?;
    if t.state.is_final() {
        return Err(
            Error::conflict(format!("task {id} is already {}", t.state.as_str()))
                .with_details(json!({"task": id, "state": t.state})),
        );
    }
    finish_unsuccessfully(
        c,
        now,
        id,
        TaskState::Cancelled,
        &format!("cancelled by {by}"),
    )?;
    let (t, _) = load(c, id)?.ok_or_else(|| no_task(id))?;
    event(
        c,
        now,
        topics::TASK_CANCELLED,
        &hub(),
        &[&t],
        json!({"by": by}),
    )?;
    Ok(t)
}

fn list(c: &Connection, f: &TaskFilter) -> Result<Vec<Task>> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR state = ?2) \
             AND (?3 IS NULL OR id > ?3) ORDER BY id LIMIT ?4"
        ))
        .map_err(db_err)?;
    let rows = s
        .query_map(
            params![
                f.queue,
                f.state.map(TaskState::as_str),
                f.after,
                f.limit as i64
            ],
            |r| task_from_row(r).map(|t| t.0),
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// Counts come from `task_counts` (kept by the writer; see `Moves`), not from a scan: the table
/// holds every finished task until pruned. The oldest pending task of a queue is
/// the one walk that remains, over that queue's claimable entries only.
fn stats(c: &Connection, now: i64) -> Result<Vec<QueueStats>> {
    let counts: Vec<(String, String, i64)> = {
        let mut s = c
            .prepare_cached("SELECT queue, state, n FROM task_counts WHERE n > 0 ORDER BY queue")
            .map_err(db_err)?;
        let rows = s
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
    };
    let mut by_queue: BTreeMap<String, QueueStats> = BTreeMap::new();
    for (queue, state, n) in counts {
        let q = by_queue.entry(queue.clone()).or_insert_with(|| QueueStats {
            name: queue,
            ..Default::default()
        });
        let n = n as u64;
        match TaskState::parse(&state) {
            Some(TaskState::Pending) => q.pending = n,
            Some(TaskState::Scheduled) => q.scheduled = n,
            Some(TaskState::Running) => q.running = n,
            Some(TaskState::Completed) => q.completed = n,
            Some(TaskState::Failed) => q.failed = n,
            Some(TaskState::Dead) => q.dead = n,
            Some(TaskState::Cancelled) => q.cancelled = n,
            None => {}
        }
    }
    let mut oldest = c
        .prepare_cached(&format!(
            "SELECT MIN(created_at) FROM tasks INDEXED BY tasks_claimable \
                 WHERE queue = ?1 AND {CLAIMABLE} AND state = 'pending'"
        ))
        .map_err(db_err)?;
    for q in by_queue.values_mut().filter(|q| q.pending > 0) {
        let at: Option<i64> = oldest.query_row([&q.name], |r| r.get(0)).map_err(db_err)?;
        q.oldest_pending_age_ms = at.map(|o| (now - o).max(0));
    }
    Ok(by_queue.into_values().collect())
}

fn requeue_lapsed(c: &Connection, now: i64, limit: usize) -> Result<usize> {
    let lapsed = running_where(c, "lease_until < ?1", &now, limit)?;
    for t in &lapsed {
        lose_claim(c, now, t, "claim lease expired")?;
    }
    move_selected(
        c,
        "SELECT queue, state, count(*) FROM tasks INDEXED BY tasks_waiting \
         WHERE state IN ('scheduled', 'failed') AND not_before <= ?1 GROUP BY queue, state",
        now,
        Some(TaskState::Pending),
    )?;
    let promoted = c
        .execute(
            "UPDATE tasks SET state = 'pending', updated_at = ?1 WHERE id IN (SELECT id FROM tasks INDEXED BY tasks_waiting \
             WHERE state IN ('scheduled', 'failed') AND not_before <= ?1)",
            [now],
        )
        .map_err(db_err)?;
    Ok(lapsed.len() + promoted)
}

const SCHEDULE_COLS: &str =
    "name, queue, payload, every_ms, cron, priority, requires, max_attempts, next_due, last_enqueued_at, created_at";

fn schedule_from_row(r: &Row<'_>) -> rusqlite::Result<Schedule> {
    let requires: String = r.get(6)?;
    Ok(Schedule {
        name: r.get(0)?,
        queue: r.get(1)?,
        payload: json_col(r, 2)?.unwrap_or(Value::Null),
        every_ms: r.get(3)?,
        cron: r.get(4)?,
        priority: r.get(5)?,
        requires: serde_json::from_str(&requires).unwrap_or_default(),
        max_attempts: r.get(7)?,
        next_due: Timestamp(r.get(8)?),
        last_enqueued_at: r.get::<_, Option<i64>>(9)?.map(Timestamp),
        created_at: Timestamp(r.get(10)?),
    })
}

fn get_schedule(c: &Connection, name: &str) -> Result<Option<Schedule>> {
    c.prepare_cached(&format!(
        "SELECT {SCHEDULE_COLS} FROM schedules WHERE name = ?1"
    ))
    .and_then(|mut s| s.query_row([name], schedule_from_row).optional())
    .map_err(db_err)
}

fn put_schedule(c: &Connection, now: i64, s: &ScheduleSpec) -> Result<Schedule> {
    c.prepare_cached(
        "INSERT INTO schedules (name, queue, payload, every_ms, cron, priority, requires, max_attempts, next_due, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT(name) DO UPDATE SET queue = excluded.queue, \
         payload = excluded.payload, every_ms = excluded.every_ms, cron = excluded.cron, priority = excluded.priority, \
         requires = excluded.requires, max_attempts = excluded.max_attempts, next_due = excluded.next_due",
    )
    .and_then(|mut st| {
        st.execute(params![
            s.name,
            s.queue,
            serde_json::to_string(&s.payload).unwrap_or_else(|_| "null".into()),
            s.every_ms,
            s.cron,
            s.priority,
            serde_json::to_string(&s.requires).unwrap_or_else(|_| "[]".into()),
            s.max_attempts,
            s.next_due,
            now
        ])
    })
    .map_err(db_err)?;
    append_event(
        c,
        now,
        topics::SCHEDULE_CHANGED,
        &hub(),
        json!({"name": s.name, "deleted": false, "next_due": s.next_due}),
    )?;
    get_schedule(c, &s.name)?.ok_or_else(|| Error::internal("schedule vanished"))
}

fn fire(c: &Connection, now: i64, name: &str, due: i64, next_due: i64) -> Result<Option<Task>> {
    let Some(s) = get_schedule(c, name)? else {
        return Ok(None);
    };
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
        backoff_ms: concord_core::task::DEFAULT_BACKOFF_MS,
        not_before: None,
        depends_on: vec![],
        timeout_ms: None,
    };
    let src = EventSource {
        token: Some(format!("schedule:{name}")),
        ..hub()
    };
    let mut created = enqueue(c, now, Serialized::new(vec![task]), &src)?;
    c.execute(
        "UPDATE schedules SET next_due = ?2, last_enqueued_at = ?3 WHERE name = ?1",
        params![name, next_due, now],
    )
    .map_err(db_err)?;
    Ok(created.pop().map(|(t, _)| t))
}

#[async_trait]
impl QueueStore for SqliteStore {
    async fn enqueue(&self, tasks: Vec<NewTask>, source: EventSource) -> Result<Vec<(Task, bool)>> {
        let tasks = Serialized::new(tasks);
        self.writer
            .write(move |c, now| enqueue(c, now, tasks, &source))
            .await
    }

    async fn claim_tasks(&self, spec: ClaimSpec) -> Result<Vec<ClaimedTask>> {
        Ok(self
            .writer
            .write(move |c, now| claim(c, now, &spec))
            .await?
            .parse())
    }

    async fn heartbeat_task(&self, id: &str, claim: &str, progress: Option<Value>) -> Result<i64> {
        let (id, claim) = (id.to_string(), claim.to_string());
        self.writer
            .write(move |c, now| heartbeat(c, now, &id, &claim, &progress))
            .await
    }

    async fn complete_tasks(&self, items: Vec<Completion>) -> Result<Vec<Result<Task>>> {
        let out = self
            .writer
            .write(move |c, now| complete(c, now, &items, true));
        Ok(read_back(out.await?))
    }

    async fn complete_outcomes(&self, items: Vec<Completion>) -> Result<Vec<Result<()>>> {
        let out = self
            .writer
            .write(move |c, now| complete(c, now, &items, false));
        Ok(outcomes(out.await?))
    }

    async fn complete_and_claim(
        &self,
        done: Completion,
        next: ClaimSpec,
    ) -> Result<(Task, Vec<ClaimedTask>)> {
        let (task, next) = self
            .writer
            .write(move |c, now| {
                let task = complete(c, now, std::slice::from_ref(&done), true)?
                    .pop()
                    .ok_or_else(|| Error::internal("complete returned nothing"))??
                    .ok_or_else(|| no_task(&done.id))?;
                Ok((task, claim(c, now, &next)?))
            })
            .await?;
        Ok((task, next.parse()))
    }

    async fn complete_outcomes_and_claim(
        &self,
        items: Vec<Completion>,
        next: ClaimSpec,
    ) -> Result<(Vec<Result<()>>, Vec<ClaimedTask>)> {
        let (done, next) = self
            .writer
            .write(move |c, now| {
                let done = complete(c, now, &items, false)?;
                Ok((outcomes(done), claim(c, now, &next)?))
            })
            .await?;
        Ok((done, next.parse()))
    }

    async fn fail_task(&self, id: &str, claim: &str, error: &str, retry: bool) -> Result<Task> {
        let (id, claim, error) = (id.to_string(), claim.to_string(), error.to_string());
        self.writer
            .write(move |c, now| fail(c, now, &id, &claim, &error, retry))
            .await
    }

    async fn cancel_task(&self, id: &str, by: &str) -> Result<Task> {
        let (id, by) = (id.to_string(), by.to_string());
        self.writer
            .write(move |c, now| cancel(c, now, &id, &by))
            .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let id = id.to_string();
        self.readers
            .read(move |c| Ok(load(c, &id)?.map(|t| t.0)))
            .await
    }

    async fn list_tasks(&self, filter: TaskFilter) -> Result<Vec<Task>> {
        self.readers.read(move |c| list(c, &filter)).await
    }

    async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let now = Timestamp::now().millis();
        self.readers.read(move |c| stats(c, now)).await
    }

    async fn requeue_lapsed(&self, limit: usize) -> Result<usize> {
        self.writer
            .write(move |c, now| requeue_lapsed(c, now, limit))
            .await
    }

    async fn put_schedule(&self, spec: ScheduleSpec) -> Result<Schedule> {
        self.writer
            .write(move |c, now| put_schedule(c, now, &spec))
            .await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.writer
            .write(move |c, now| {
                let n = c
                    .execute("DELETE FROM schedules WHERE name = ?1", [&name])
                    .map_err(db_err)?;
                if n > 0 {
                    append_event(
                        c,
                        now,
                        topics::SCHEDULE_CHANGED,
                        &hub(),
                        json!({"name": name, "deleted": true}),
                    )?;
                }
                Ok(n > 0)
            })
            .await
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        self.readers
            .read(|c| {
                let mut s = c
                    .prepare_cached(&format!(
                        "SELECT {SCHEDULE_COLS} FROM schedules ORDER BY name"
                    ))
                    .map_err(db_err)?;
                let rows = s.query_map([], schedule_from_row).map_err(db_err)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
            })
            .await
    }

    async fn due_schedules(&self) -> Result<Vec<Schedule>> {
        let now = Timestamp::now().millis();
        self.readers
            .read(move |c| {
                let mut s = c
                    .prepare_cached(&format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE next_due <= ?1 ORDER BY next_due"))
                    .map_err(db_err)?;
                let rows = s.query_map([now], schedule_from_row).map_err(db_err)?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
            })
            .await
    }

    async fn fire_schedule(&self, name: &str, due: i64, next_due: i64) -> Result<Option<Task>> {
        let name = name.to_string();
        self.writer
            .write(move |c, now| fire(c, now, &name, due, next_due))
            .await
    }

    async fn prune_tasks(&self, retention_ms: i64) -> Result<u64> {
        self.writer
            .write(move |c, now| {
                let cut = now - retention_ms;
                c.execute(
                    "DELETE FROM task_deps WHERE task IN (SELECT id FROM tasks WHERE completed_at < ?1 \
                     AND state IN ('completed', 'dead', 'cancelled'))",
                    [cut],
                )
                .map_err(db_err)?;
                c.execute(
                    "DELETE FROM task_payloads WHERE task IN (SELECT rowid FROM tasks WHERE completed_at < ?1 \
                     AND state IN ('completed', 'dead', 'cancelled'))",
                    [cut],
                )
                .map_err(db_err)?;
                move_selected(
                    c,
                    "SELECT queue, state, count(*) FROM tasks WHERE completed_at < ?1 \
                     AND state IN ('completed', 'dead', 'cancelled') GROUP BY queue, state",
                    cut,
                    None,
                )?;
                let n = c
                    .execute("DELETE FROM tasks WHERE completed_at < ?1 AND state IN ('completed', 'dead', 'cancelled')", [cut])
                    .map_err(db_err)?;
                Ok(n as u64)
            })
            .await
    }
}
