//! The SQLite side of dispatch records.

use super::ops::append_event;
use super::queue::{enqueue, finish_unsuccessfully, json_col, load, Serialized};
use super::{db_err, SqliteStore};
use crate::dispatch::*;
use crate::model::topics;
use crate::queue::NewTask;
use async_trait::async_trait;
use concord_core::api::{EventSource, TaskState};
use concord_core::Result;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

fn add_peers(
    c: &Connection,
    now: i64,
    id: &str,
    peers: &[(String, NewTask)],
    source: &EventSource,
) -> Result<()> {
    let tasks: Vec<NewTask> = peers.iter().map(|(_, t)| t.clone()).collect();
    let created = enqueue(c, now, Serialized::new(tasks), source)?;
    for ((instance, _), (task, _)) in peers.iter().zip(created) {
        c.prepare_cached("INSERT OR IGNORE INTO dispatch_peers (dispatch, instance, task, added_at) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![id, instance, task.id, now]))
            .map_err(db_err)?;
    }
    Ok(())
}

fn create(c: &Connection, now: i64, d: &NewDispatch) -> Result<()> {
    c.execute(
        "INSERT INTO dispatches (id, command, spec, state, outcome, created_at, deadline) VALUES (?1, ?2, ?3, 'running', '{}', ?4, ?5)",
        params![d.id, d.command, d.spec.to_string(), now, d.deadline_ms],
    )
    .map_err(db_err)?;
    let source = EventSource {
        token: Some(d.token.clone()),
        ..Default::default()
    };
    add_peers(c, now, &d.id, &d.peers, &source)?;
    let peers: Vec<&str> = d.peers.iter().map(|(i, _)| i.as_str()).collect();
    append_event(
        c,
        now,
        topics::DISPATCH_CREATED,
        &source,
        json!({"id": d.id, "command": d.command, "peers": peers}),
    )?;
    Ok(())
}

fn get(c: &Connection, id: &str) -> Result<Option<DispatchRecord>> {
    let row = c
        .query_row(
            "SELECT id, command, spec, state, result, outcome, created_at, deadline, finished_at FROM dispatches WHERE id = ?1",
            [id],
            |r| {
                let parse = |s: Option<String>| s.map(|s| serde_json::from_str::<Value>(&s).unwrap_or(Value::Null));
                Ok(DispatchRecord {
                    id: r.get(0)?,
                    command: r.get(1)?,
                    spec: parse(r.get(2)?).unwrap_or(Value::Null),
                    state: r.get(3)?,
                    result: parse(r.get(4)?),
                    outcome: parse(r.get(5)?).unwrap_or(Value::Null),
                    created_at: r.get(6)?,
                    deadline_ms: r.get(7)?,
                    finished_at: r.get(8)?,
                    peers: vec![],
                })
            },
        )
        .optional()
        .map_err(db_err)?;
    let Some(mut rec) = row else { return Ok(None) };
    let mut s = c
        .prepare_cached(
            "SELECT p.instance, p.task, p.added_at, t.id, t.state, t.result, t.error, t.completed_at, \
                    CASE WHEN i.state = 'live' THEN i.lease_until END \
             FROM dispatch_peers p \
             LEFT JOIN tasks t ON t.id = p.task \
             LEFT JOIN instances i ON i.id = p.instance \
             WHERE p.dispatch = ?1 ORDER BY p.added_at, p.instance",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map([id], |r| {
            let work = match r.get::<_, Option<String>>(3)? {
                None => None,
                Some(_) => Some(PeerWork {
                    state: TaskState::parse(&r.get::<_, String>(4)?).unwrap_or(TaskState::Pending),
                    result: json_col(r, 5)?,
                    error: r.get(6)?,
                    completed_at: r.get(7)?,
                }),
            };
            Ok(DispatchPeerRow {
                instance: r.get(0)?,
                task: r.get(1)?,
                added_at: r.get(2)?,
                work,
                live_until: r.get(8)?,
            })
        })
        .map_err(db_err)?;
    rec.peers = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?;
    Ok(Some(rec))
}

fn finish(
    c: &Connection,
    now: i64,
    id: &str,
    state: &str,
    result: &Option<Value>,
    outcome: &Value,
    cancel: &[String],
) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE dispatches SET state = ?2, result = ?3, outcome = ?4, finished_at = ?5 WHERE id = ?1 AND state = 'running'",
            params![id, state, result.as_ref().map(|r| r.to_string()), outcome.to_string(), now],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Ok(false);
    }
    for t in cancel {
        if let Some((task, _)) = load(c, t)? {
            if matches!(task.state, TaskState::Pending | TaskState::Scheduled) {
                finish_unsuccessfully(
                    c,
                    now,
                    t,
                    TaskState::Cancelled,
                    &format!("dispatch {id} finished"),
                )?;
                append_event(
                    c,
                    now,
                    topics::TASK_CANCELLED,
                    &EventSource::default(),
                    json!({"tasks": [{"id": t, "queue": task.queue, "state": "cancelled"}], "by": id}),
                )?;
            }
        }
    }
    append_event(
        c,
        now,
        topics::DISPATCH_FINISHED,
        &EventSource::default(),
        json!({"id": id, "state": state}),
    )?;
    Ok(true)
}

#[async_trait]
impl DispatchStore for SqliteStore {
    async fn create_dispatch(&self, d: NewDispatch) -> Result<()> {
        self.writer.write(move |c, now| create(c, now, &d)).await
    }

    async fn add_dispatch_peers(&self, id: &str, peers: Vec<(String, NewTask)>) -> Result<()> {
        let id = id.to_string();
        self.writer
            .write(move |c, now| {
                add_peers(c, now, &id, &peers, &EventSource::default())?;
                let added: Vec<&str> = peers.iter().map(|(i, _)| i.as_str()).collect();
                append_event(
                    c,
                    now,
                    topics::DISPATCH_PEERS_ADDED,
                    &EventSource::default(),
                    json!({"id": id, "peers": added}),
                )?;
                Ok(())
            })
            .await
    }

    async fn get_dispatch(&self, id: &str) -> Result<Option<DispatchRecord>> {
        let id = id.to_string();
        self.readers.read(move |c| get(c, &id)).await
    }

    async fn finish_dispatch(
        &self,
        id: &str,
        state: &str,
        result: Option<Value>,
        outcome: Value,
        cancel: Vec<String>,
    ) -> Result<bool> {
        let (id, state) = (id.to_string(), state.to_string());
        self.writer
            .write(move |c, now| finish(c, now, &id, &state, &result, &outcome, &cancel))
            .await
    }

    async fn running_dispatches(&self) -> Result<Vec<String>> {
        self.readers
            .read(|c| {
                let mut s = c
                    .prepare_cached(
                        "SELECT id FROM dispatches WHERE state = 'running' ORDER BY deadline",
                    )
                    .map_err(db_err)?;
                let rows = s.query_map([], |r| r.get(0)).map_err(db_err)?;
                rows.collect::<rusqlite::Result<Vec<String>>>()
                    .map_err(db_err)
            })
            .await
    }
}
