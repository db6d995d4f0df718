//! `concord task …`, `concord queues`, `concord schedule …`.

use crate::cli::{e, parse_value, Conn};
use crate::output::{self, ago, opt, table};
use anyhow::{anyhow, Result};
use clap::Subcommand;
use concord_core::api::{EnqueueRequest, PutScheduleRequest, Task, TaskState};

#[derive(Subcommand)]
pub enum TaskCmd {
    /// Enqueue a task: QUEUE and PAYLOAD (JSON; a bare word is a string).
    Submit {
        queue: String,
        payload: String,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Capabilities the worker must have (comma-separated).
        #[arg(long, value_delimiter = ',')]
        requires: Vec<String>,
        /// Idempotency key: submitting it again returns the same task.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        max_attempts: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    Get {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        conn: Conn,
    },
    Cancel {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCmd {
    /// Create or replace a schedule: every N ms (--every-ms) or a cron expression (--cron, UTC).
    Set {
        name: String,
        queue: String,
        payload: String,
        #[arg(long)]
        every_ms: Option<i64>,
        #[arg(long)]
        cron: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    List {
        #[command(flatten)]
        conn: Conn,
    },
    Delete {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn task_rows(tasks: &[Task]) -> Vec<Vec<String>> {
    tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.queue.clone(),
                t.state.as_str().into(),
                t.priority.to_string(),
                format!("{}/{}", t.attempt, t.max_attempts),
                opt(&t.claimed_by),
                ago(t.updated_at.millis()),
                t.error.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

const HEADER: &[&str] = &[
    "ID",
    "QUEUE",
    "STATE",
    "PRIO",
    "ATTEMPT",
    "CLAIMED BY",
    "UPDATED",
    "ERROR",
];

pub async fn task(cmd: TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::Submit {
            queue,
            payload,
            priority,
            requires,
            key,
            max_attempts,
            conn,
        } => {
            let req = EnqueueRequest {
                queue,
                payload: parse_value(&payload),
                priority,
                requires,
                idempotency_key: key,
                max_attempts,
                ..Default::default()
            };
            let t = conn.client()?.enqueue(&req).await.map_err(e)?;
            if conn.json {
                return output::json(&t);
            }
            println!(
                "{} {} in {}{}",
                if t.deduplicated {
                    "existing"
                } else {
                    "enqueued"
                },
                t.task.id,
                t.task.queue,
                if t.deduplicated {
                    " (same idempotency key)"
                } else {
                    ""
                }
            );
        }
        TaskCmd::Get { id, conn } => {
            let t = conn.client()?.get_task(&id).await.map_err(e)?;
            if conn.json {
                return output::json(&t);
            }
            table(HEADER, &task_rows(std::slice::from_ref(&t)));
            println!("\npayload: {}", t.payload);
            if let Some(r) = &t.result {
                println!("result:  {r}");
            }
            if let Some(p) = &t.progress {
                println!("progress: {p}");
            }
        }
        TaskCmd::List {
            queue,
            state,
            limit,
            conn,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(
                    TaskState::parse(s)
                        .ok_or_else(|| anyhow!("--state: unknown task state {s:?}"))?,
                ),
            };
            let tasks = conn
                .client()?
                .list_tasks(queue.as_deref(), state, limit, None)
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&tasks);
            }
            table(HEADER, &task_rows(&tasks));
        }
        TaskCmd::Cancel { id, conn } => {
            let t = conn.client()?.cancel_task(&id).await.map_err(e)?;
            if conn.json {
                return output::json(&t);
            }
            println!("cancelled {}", t.id);
        }
    }
    Ok(())
}

pub async fn queues(conn: Conn) -> Result<()> {
    let qs = conn.client()?.queues().await.map_err(e)?;
    if conn.json {
        return output::json(&qs);
    }
    let rows: Vec<Vec<String>> = qs
        .iter()
        .map(|q| {
            vec![
                q.name.clone(),
                q.pending.to_string(),
                q.scheduled.to_string(),
                q.running.to_string(),
                q.completed.to_string(),
                q.failed.to_string(),
                q.dead.to_string(),
                q.cancelled.to_string(),
                q.oldest_pending_age_ms
                    .map(|ms| format!("{}s", ms / 1000))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "PENDING",
            "SCHEDULED",
            "RUNNING",
            "COMPLETED",
            "FAILED",
            "DEAD",
            "CANCELLED",
            "OLDEST",
        ],
        &rows,
    );
    Ok(())
}

pub async fn schedule(cmd: ScheduleCmd) -> Result<()> {
    match cmd {
        ScheduleCmd::Set {
            name,
            queue,
            payload,
            every_ms,
            cron,
            conn,
        } => {
            let req = PutScheduleRequest {
                queue,
                payload: parse_value(&payload),
                every_ms,
                cron,
                ..Default::default()
            };
            let s = conn.client()?.put_schedule(&name, &req).await.map_err(e)?;
            if conn.json {
                return output::json(&s);
            }
            println!(
                "schedule {} → {} next at {}",
                s.name,
                s.queue,
                s.next_due.to_rfc3339()
            );
        }
        ScheduleCmd::List { conn } => {
            let list = conn.client()?.schedules().await.map_err(e)?;
            if conn.json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    let every = s
                        .every_ms
                        .map(|ms| format!("every {ms} ms"))
                        .or(s.cron.clone())
                        .unwrap_or_default();
                    vec![
                        s.name.clone(),
                        s.queue.clone(),
                        every,
                        s.next_due.to_rfc3339(),
                    ]
                })
                .collect();
            table(&["NAME", "QUEUE", "WHEN", "NEXT"], &rows);
        }
        ScheduleCmd::Delete { name, conn } => {
            conn.client()?.delete_schedule(&name).await.map_err(e)?;
            if !conn.json {
                println!("deleted schedule {name}");
            }
        }
    }
    Ok(())
}
