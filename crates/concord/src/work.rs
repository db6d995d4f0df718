//! `concord work QUEUE -- CMD ARGS…`: any script becomes a worker.
//!
//! Registers a worker instance, keeps it alive, claims tasks and runs CMD once per
//! task with the payload as JSON on stdin. Exit 0 completes the task with stdout
//! (as JSON if it parses, else as a string); anything else fails it with stderr and
//! the exit code, to be retried per the task's policy. While CMD runs the claim is
//! heartbeated, so a long task keeps its lease and a dead worker loses it.
//!
//! The worker's client runs in degraded mode with a spool of its entity and
//! label (`--spool-dir`): spoolable writes made through it while no hub answers
//! wait on disk, and every heartbeat that reaches the hub replays them. Task
//! completions are not among them (they present a claim that lapses), so a
//! completion the hub cannot take fails and the task is retried by its lease.

use crate::cli::{e, Conn};
use anyhow::{anyhow, Result};
use clap::Args;
use concord_client::Client;
use concord_core::api::{ClaimRequest, ClaimedTask, CompleteItem, RegisterInstanceRequest};
use concord_core::ErrorCode;
use serde_json::Value;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::RwLock;

#[derive(Args)]
pub struct WorkArgs {
    /// Queue(s) to take work from (comma-separated).
    #[arg(value_delimiter = ',')]
    queues: Vec<String>,
    #[arg(long, default_value = "workers")]
    entity: String,
    /// What this worker is for (default: "work <queues>").
    #[arg(long)]
    label: Option<String>,
    /// Capabilities offered (tasks that `require` others are not claimed).
    #[arg(long, value_delimiter = ',')]
    capabilities: Vec<String>,
    /// Tasks run at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Claim lease; heartbeated every third of it while the command runs.
    #[arg(long, default_value_t = 30_000)]
    lease_ms: i64,
    /// Lease TTL of the worker instance (it heartbeats every third of it).
    #[arg(long, default_value_t = 15_000)]
    ttl_ms: i64,
    /// Stop after this many tasks (for scripts and tests).
    #[arg(long)]
    max_tasks: Option<usize>,
    /// Where writes wait while no hub answers (one file per entity and label).
    /// Default: $XDG_STATE_HOME/concord/spool, else ~/.local/state/concord/spool.
    #[arg(long, env = "CONCORD_SPOOL_DIR")]
    spool_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    conn: Conn,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The worker's registration, replaced if the hub expired it meanwhile.
struct Session {
    id: String,
    client: Client,
}

fn label(args: &WorkArgs) -> String {
    args.label
        .clone()
        .unwrap_or_else(|| format!("work {}", args.queues.join(",")))
}

async fn register(agent: &Client, args: &WorkArgs) -> Result<Session> {
    let label = label(args);
    let reg = agent
        .register(&RegisterInstanceRequest {
            entity: args.entity.clone(),
            role: Default::default(),
            label: Some(label),
            ttl_ms: Some(args.ttl_ms),
            capabilities: args.capabilities.clone(),
            endpoint: None,
            host: hostname(),
            version: None,
            persistent: false,
            forked_from: None,
            meta: serde_json::json!({"worker": {"queues": args.queues, "command": args.command}}),
        })
        .await
        .map_err(e)?;
    eprintln!(
        "concord work: registered {} in {}",
        reg.instance.id, args.entity
    );
    Ok(Session {
        client: agent
            .with_token(reg.session_token)
            .for_instance(reg.instance.id.clone()),
        id: reg.instance.id,
    })
}

pub(crate) fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/etc/hostname").ok()?;
    let h: String = h
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    (!h.is_empty()).then_some(h.chars().take(64).collect())
}

pub async fn run(args: WorkArgs) -> Result<()> {
    if args.queues.is_empty() {
        return Err(anyhow!("give at least one queue"));
    }
    let agent = crate::mcp::with_spool(
        "work",
        args.conn.client()?,
        args.spool_dir.as_deref(),
        &args.entity,
        &label(&args),
    )?;
    let session = Arc::new(RwLock::new(register(&agent, &args).await?));
    crate::mcp::replay(&session.read().await.client).await;
    let stopping = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let args = Arc::new(args);

    // Presence: heartbeat every TTL/3; re-register if the hub forgot us.
    let beat = {
        let (session, stopping, agent, args) = (
            session.clone(),
            stopping.clone(),
            agent.clone(),
            args.clone(),
        );
        tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis((args.ttl_ms / 3).max(200) as u64)).await;
                let (id, c) = {
                    let s = session.read().await;
                    (s.id.clone(), s.client.clone())
                };
                match c.heartbeat(&id).await {
                    Err(err) if err.code == ErrorCode::UnknownInstance => {
                        eprintln!("concord work: the hub expired {id}; registering again");
                        if let Ok(new) = register(&agent, &args).await {
                            *session.write().await = new;
                        }
                    }
                    Err(err) => eprintln!("concord work: heartbeat: {}", err.message),
                    Ok(_) => crate::mcp::replay(&c).await,
                }
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (session, stopping, done, args) = (
            session.clone(),
            stopping.clone(),
            done.clone(),
            args.clone(),
        );
        workers.push(tokio::spawn(async move {
            let queues: Vec<&str> = args.queues.iter().map(String::as_str).collect();
            // The task claimed with the last completion, run next.
            let mut next: Option<ClaimedTask> = None;
            while !stopping.load(Ordering::Relaxed) {
                if args
                    .max_tasks
                    .is_some_and(|m| done.load(Ordering::Relaxed) >= m)
                {
                    stopping.store(true, Ordering::Relaxed);
                    break;
                }
                let c = session.read().await.client.clone();
                let t = match next.take() {
                    Some(t) => t,
                    None => match c.claim(&queues, 1, Some(args.lease_ms), 5_000).await {
                        Ok(mut tasks) => match tasks.pop() {
                            Some(t) => t,
                            None => continue,
                        },
                        Err(err) => {
                            eprintln!("concord work: claim: {}", err.message);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                // Claim the next task with this one's completion, unless this is
                // the last one wanted.
                let more = !stopping.load(Ordering::Relaxed)
                    && args
                        .max_tasks
                        .is_none_or(|m| done.load(Ordering::Relaxed) + 1 < m);
                next = run_task(&c, &t, &args, more.then_some(&queues[..])).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let all = futures::future::join_all(workers);
    tokio::select! {
        _ = all => {}
        _ = shutdown_signal() => {
            eprintln!("concord work: stopping (tasks in flight lose their claim and are retried)");
        }
    }
    stopping.store(true, Ordering::Relaxed);
    beat.abort();
    let s = session.read().await;
    let _ = s.client.close_instance(&s.id).await;
    eprintln!(
        "concord work: closed {} after {} tasks",
        s.id,
        done.load(Ordering::Relaxed)
    );
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An item's error in a list answer (`{"code", "message", "details"}`) as the
/// error a single call would have returned.
pub(crate) fn item_error(error: Value) -> concord_core::Error {
    concord_core::Error::from_body(&serde_json::json!({ "error": error })).unwrap_or_else(|| {
        concord_core::Error::internal(format!("the hub refused the completion: {error}"))
    })
}

/// Runs one task and reports its outcome; a success with `claim_next` also
/// claims the next task in the same call, and returns it.
async fn run_task(
    c: &Client,
    t: &ClaimedTask,
    args: &WorkArgs,
    claim_next: Option<&[&str]>,
) -> Option<ClaimedTask> {
    let outcome = execute(c, t, args).await;
    let reported = match outcome {
        Ok(stdout) => {
            let result =
                serde_json::from_str::<Value>(stdout.trim()).unwrap_or(Value::String(stdout));
            // Through the list form with one item: it answers the outcome, not
            // the completed task with its payload, which this loop would drop.
            let both = match claim_next {
                Some(queues) => Some(
                    c.complete_batch_and_claim(
                        vec![CompleteItem {
                            id: t.task.id.clone(),
                            claim: t.claim.clone(),
                            result: result.clone(),
                        }],
                        ClaimRequest {
                            queues: queues.iter().map(|q| q.to_string()).collect(),
                            max: Some(1),
                            lease_ms: Some(args.lease_ms),
                            wait_ms: None,
                        },
                    )
                    .await,
                ),
                None => None,
            };
            match both {
                // The next task is claimed even when this completion was refused
                // (its claim went stale meanwhile): run it either way.
                Some(Ok((outcomes, mut next))) => {
                    if let Some(error) = outcomes.into_iter().find_map(|o| o.error) {
                        report_failed(t, &item_error(error));
                    }
                    Ok(next.pop())
                }
                // A call refused as a whole (its claim half, say) changed
                // nothing: complete alone.
                _ => c
                    .complete_task(&t.task.id, &t.claim, result)
                    .await
                    .map(|_| None),
            }
        }
        Err(error) => c
            .fail_task(&t.task.id, &t.claim, &error, true)
            .await
            .map(|_| None),
    };
    reported.unwrap_or_else(|err| {
        report_failed(t, &err);
        None
    })
}

/// Says on stderr that the hub refused `t`'s outcome; the worker goes on.
fn report_failed(t: &ClaimedTask, err: &concord_core::Error) {
    eprintln!(
        "concord work: reporting {}: {} ({})",
        t.task.id,
        err.message,
        err.code.as_str()
    );
}

/// Runs the command for one task; Ok(stdout) on exit 0, Err(description) otherwise.
async fn execute(
    c: &Client,
    t: &ClaimedTask,
    args: &WorkArgs,
) -> std::result::Result<String, String> {
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("CONCORD_TASK_ID", &t.task.id)
        .env("CONCORD_TASK_QUEUE", &t.task.queue)
        .env("CONCORD_TASK_ATTEMPT", t.task.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start {:?}: {err}", args.command[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let payload = serde_json::to_vec(&t.task.payload).unwrap_or_default();
        // A command that does not read its stdin is fine.
        let _ = stdin.write_all(&payload).await;
    }
    let every = Duration::from_millis((args.lease_ms / 3).max(500) as u64);
    let wait = child.wait_with_output();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            out = &mut wait => {
                let out = out.map_err(|err| format!("waiting for the command: {err}"))?;
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if out.status.success() {
                    return Ok(stdout);
                }
                let stderr = String::from_utf8_lossy(&out.stderr);
                let code = out.status.code().map(|c| c.to_string()).unwrap_or_else(|| "signal".into());
                return Err(format!("exit {code}: {}", stderr.trim()));
            }
            _ = tokio::time::sleep(every) => {
                if let Err(err) = c.heartbeat_task(&t.task.id, &t.claim, None).await {
                    if err.code == ErrorCode::StaleClaim || err.code == ErrorCode::NotFound {
                        // The task was cancelled or re-claimed: stop working on it.
                        return Err(format!("claim lost: {}", err.message));
                    }
                }
            }
        }
    }
}
