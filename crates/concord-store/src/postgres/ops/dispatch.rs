//! The PostgreSQL side of dispatch records, one for one with `sqlite/dispatch.rs`.
//! `finish` updates the row only while it is `running`, so replicas evaluating
//! the same dispatch at once finish it exactly once.

use super::queue::{enqueue, finish_unsuccessfully};
use super::*;
use crate::dispatch::*;
use crate::postgres::PostgresStore;
use crate::queue::NewTask;
use async_trait::async_trait;
use concord_core::api::TaskState;
use concord_core::Result;

async fn add_peers(
    t: &mut Tx<'_>,
    id: &str,
    peers: &[(String, NewTask)],
    source: &EventSource,
) -> R<()> {
    let tasks: Vec<NewTask> = peers.iter().map(|(_, t)| t.clone()).collect();
    let created = enqueue(t, &tasks, source).await?;
    for ((instance, _), (task, _)) in peers.iter().zip(created) {
        exec(
            t.c,
            "INSERT INTO dispatch_peers (dispatch, instance, task, added_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, instance, &task.id, &t.now],
        )
        .await?;
    }
    Ok(())
}

async fn create(t: &mut Tx<'_>, d: &NewDispatch) -> R<()> {
    exec(
        t.c,
        "INSERT INTO dispatches (id, command, spec, state, outcome, created_at, deadline) VALUES ($1, $2, $3, 'running', '{}', $4, $5)",
        &[&d.id, &d.command, &Json(&d.spec), &t.now, &d.deadline_ms],
    )
    .await?;
    let source = EventSource {
        token: Some(d.token.clone()),
        ..Default::default()
    };
    add_peers(t, &d.id, &d.peers, &source).await?;
    let peers: Vec<&str> = d.peers.iter().map(|(i, _)| i.as_str()).collect();
    t.event(
        topics::DISPATCH_CREATED,
        &source,
        json!({"id": d.id, "command": d.command, "peers": peers}),
    );
    Ok(())
}

async fn get_record<C: GenericClient>(c: &C, id: &str) -> R<Option<DispatchRecord>> {
    let Some(r) = row_opt(
        c,
        "SELECT id, command, spec, state, result, outcome, created_at, deadline, finished_at FROM dispatches WHERE id = $1",
        &[&id],
    )
    .await?
    else {
        return Ok(None);
    };
    let mut rec = DispatchRecord {
        id: get(&r, 0)?,
        command: get(&r, 1)?,
        spec: get::<Option<Value>>(&r, 2)?.unwrap_or(Value::Null),
        state: get(&r, 3)?,
        result: get(&r, 4)?,
        outcome: get::<Option<Value>>(&r, 5)?.unwrap_or(Value::Null),
        created_at: get(&r, 6)?,
        deadline_ms: get(&r, 7)?,
        finished_at: get(&r, 8)?,
        peers: vec![],
    };
    let peers = rows(
        c,
        "SELECT p.instance, p.task, p.added_at, t.id, t.state, t.result, t.error, t.completed_at, \
                CASE WHEN i.state = 'live' THEN i.lease_until END \
         FROM dispatch_peers p \
         LEFT JOIN tasks t ON t.id = p.task \
         LEFT JOIN instances i ON i.id = p.instance \
         WHERE p.dispatch = $1 ORDER BY p.added_at, p.instance",
        &[&id],
    )
    .await?;
    for p in peers {
        let work = match get::<Option<String>>(&p, 3)? {
            None => None,
            Some(_) => Some(PeerWork {
                state: TaskState::parse(&get::<String>(&p, 4)?).unwrap_or(TaskState::Pending),
                result: get(&p, 5)?,
                error: get(&p, 6)?,
                completed_at: get(&p, 7)?,
            }),
        };
        rec.peers.push(DispatchPeerRow {
            instance: get(&p, 0)?,
            task: get(&p, 1)?,
            added_at: get(&p, 2)?,
            work,
            live_until: get(&p, 8)?,
        });
    }
    Ok(Some(rec))
}

async fn finish(
    t: &mut Tx<'_>,
    id: &str,
    state: &str,
    result: &Option<Value>,
    outcome: &Value,
    cancel: &[String],
) -> R<bool> {
    let n = exec(
        t.c,
        "UPDATE dispatches SET state = $2, result = $3, outcome = $4, finished_at = $5 WHERE id = $1 AND state = 'running'",
        &[&id, &state, &result.as_ref().map(Json), &Json(outcome), &t.now],
    )
    .await?;
    if n == 0 {
        return Ok(false);
    }
    for task_id in cancel {
        let locked = row_opt(
            t.c,
            "SELECT state, queue FROM tasks WHERE id = $1 FOR UPDATE",
            &[task_id],
        )
        .await?;
        if let Some(r) = locked {
            let st: String = get(&r, 0)?;
            let queue: String = get(&r, 1)?;
            if matches!(
                TaskState::parse(&st),
                Some(TaskState::Pending | TaskState::Scheduled)
            ) {
                finish_unsuccessfully(
                    t,
                    task_id,
                    TaskState::Cancelled,
                    &format!("dispatch {id} finished"),
                )
                .await?;
                t.event(
                    topics::TASK_CANCELLED,
                    &hub_source(),
                    json!({"tasks": [{"id": task_id, "queue": queue, "state": "cancelled"}], "by": id}),
                );
            }
        }
    }
    t.event(
        topics::DISPATCH_FINISHED,
        &hub_source(),
        json!({"id": id, "state": state}),
    );
    Ok(true)
}

#[async_trait]
impl DispatchStore for PostgresStore {
    async fn create_dispatch(&self, d: NewDispatch) -> Result<()> {
        self.inner
            .write(move |t| {
                let d = d.clone();
                Box::pin(async move { create(t, &d).await })
            })
            .await
    }

    async fn add_dispatch_peers(&self, id: &str, peers: Vec<(String, NewTask)>) -> Result<()> {
        let id = id.to_string();
        self.inner
            .write(move |t| {
                let (id, peers) = (id.clone(), peers.clone());
                Box::pin(async move {
                    add_peers(t, &id, &peers, &hub_source()).await?;
                    let added: Vec<&str> = peers.iter().map(|(i, _)| i.as_str()).collect();
                    t.event(
                        topics::DISPATCH_PEERS_ADDED,
                        &hub_source(),
                        json!({"id": id, "peers": added}),
                    );
                    Ok(())
                })
            })
            .await
    }

    async fn get_dispatch(&self, id: &str) -> Result<Option<DispatchRecord>> {
        let c = self.inner.client().await?;
        get_record(&c, id).await.map_err(Error::from)
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
        self.inner
            .write(move |t| {
                let (id, state, result, outcome, cancel) = (
                    id.clone(),
                    state.clone(),
                    result.clone(),
                    outcome.clone(),
                    cancel.clone(),
                );
                Box::pin(async move { finish(t, &id, &state, &result, &outcome, &cancel).await })
            })
            .await
    }

    async fn running_dispatches(&self) -> Result<Vec<String>> {
        let c = self.inner.client().await?;
        let rs = rows(
            &c,
            "SELECT id FROM dispatches WHERE state = 'running' ORDER BY deadline",
            &[],
        )
        .await
        .map_err(Error::from)?;
        rs.iter()
            .map(|r| get::<String>(r, 0).map_err(Error::from))
            .collect()
    }
}
