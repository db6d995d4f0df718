//! The reaper: expires instances that stopped heartbeating.
//!
//! Two sources, both safe to run on every replica at once: this hub's memory
//! (instances whose last heartbeat here is older than their TTL; the store expires
//! them only if this hub still owns the lease) and the store's durable leases
//! (instances nobody answers for any more: heartbeats elsewhere stopped, or a
//! replica died). Safety never depends on it: a primary reaped late is still fenced.

use crate::AppState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The durable sweep runs every this many memory sweeps.
const DURABLE_EVERY: u32 = 5;

pub(crate) async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    let mut retention = tokio::time::interval(state.config.retention_interval);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = retention.tick() => {
                prune(&state).await;
                continue;
            }
            _ = stop.changed() => break,
        }
        n = n.wrapping_add(1);
        sweep_memory(&state).await;
        requeue(&state).await;
        if n.is_multiple_of(DURABLE_EVERY) {
            sweep_durable(&state).await;
            fire_schedules(&state).await;
            finish_dispatches(&state).await;
            coordination(&state).await;
            state.limits.shrink();
        }
    }
}

async fn sweep_memory(state: &Arc<AppState>) {
    for id in state.presence.overdue(state.now_ms()) {
        match state.store.expire_owned(&id, &state.config.hub_id).await {
            Ok(Some(inst)) => {
                state
                    .metrics
                    .instances_expired
                    .fetch_add(1, Ordering::Relaxed);
                state.presence.primary_released(&inst.entity, &inst.id);
                state.primary_released.send_modify(|v| *v += 1);
                tracing::info!(instance = %inst.id, entity = %inst.entity, "expired: no heartbeat within ttl");
                state.presence.remove(&id);
            }
            // Not ours any more (another replica took the lease) or already ended.
            Ok(None) => state.presence.remove(&id),
            Err(e) => {
                tracing::warn!("reaper: cannot expire {id}: {e}");
                return;
            }
        }
    }
}

async fn sweep_durable(state: &Arc<AppState>) {
    loop {
        match state.store.expire_due(256).await {
            Ok(expired) => {
                for inst in &expired {
                    state
                        .metrics
                        .instances_expired
                        .fetch_add(1, Ordering::Relaxed);
                    state.presence.remove(&inst.id);
                    state.presence.primary_released(&inst.entity, &inst.id);
                    tracing::info!(instance = %inst.id, entity = %inst.entity, "expired: durable lease lapsed");
                }
                if !expired.is_empty() {
                    state.primary_released.send_modify(|v| *v += 1);
                }
                if expired.len() < 256 {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("reaper: durable sweep failed: {e}");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Tasks whose claim lease lapsed go back to the queue; due retries and
/// scheduled tasks become pending.
async fn requeue(state: &Arc<AppState>) {
    if let Err(e) = state.store.requeue_lapsed(1000).await {
        tracing::warn!("requeue: {e}");
    }
}

/// Enqueues one task per due time of each due schedule. Every replica may do
/// this at once: the store fires a due time once (idempotency key per due time).
async fn fire_schedules(state: &Arc<AppState>) {
    let due = match state.store.due_schedules().await {
        Ok(d) => d,
        Err(e) => return tracing::warn!("schedules: {e}"),
    };
    let Ok(now) = state.store.now_ms().await else {
        return;
    };
    for s in due {
        let Ok(rec) = concord_core::task::Recurrence::parse(s.every_ms, s.cron.as_deref()) else {
            tracing::warn!(schedule = %s.name, "schedule has an invalid recurrence; skipped");
            continue;
        };
        // Missed due times (the hub was down) fire once, for the latest of them.
        let Some(next) = rec.next_after(now.max(s.next_due.millis())) else {
            continue;
        };
        match state
            .store
            .fire_schedule(&s.name, s.next_due.millis(), next)
            .await
        {
            Ok(Some(t)) => tracing::debug!(schedule = %s.name, task = %t.id, "schedule fired"),
            Ok(None) => {}
            Err(e) => tracing::warn!(schedule = %s.name, "schedule: {e}"),
        }
    }
}

/// Dispatches nobody waits on (wait: false, or the hub restarted) still finish at
/// their deadline or quorum.
async fn finish_dispatches(state: &Arc<AppState>) {
    let running = match state.store.running_dispatches().await {
        Ok(r) => r,
        Err(e) => return tracing::warn!("dispatch sweep: {e}"),
    };
    for id in running {
        if let Err(e) = crate::dispatch::evaluate(state, &id).await {
            tracing::warn!(dispatch = %id, "dispatch sweep: {e}");
        }
    }
}

/// Leases past their TTL end (and say so); open breakers whose time is up are
/// announced half-open. Every replica may run this at once: each change is made once.
async fn coordination(state: &Arc<AppState>) {
    match state.store.expire_leases(256).await {
        Ok(gone) => {
            for l in gone {
                tracing::info!(lease = %l.id, resource = %l.resource, holder = %l.holder, "lease expired");
            }
        }
        Err(e) => tracing::warn!("lease expiry: {e}"),
    }
    if let Err(e) = state.store.advance_breakers(&state.config.breakers).await {
        tracing::warn!("breaker sweep: {e}");
    }
}

async fn prune(state: &Arc<AppState>) {
    if let Err(e) = state
        .store
        .prune_tasks(state.config.tasks_retention_ms)
        .await
    {
        tracing::warn!("task retention: {e}");
    }
    let c = &state.config;
    match state
        .store
        .prune(
            c.events_max_age_ms,
            c.events_max_count,
            c.inbox_retention_ms,
        )
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::debug!(removed = n, "retention pruned the log and inboxes"),
        Err(e) => tracing::warn!("retention: {e}"),
    }
}
