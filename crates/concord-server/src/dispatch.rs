//! The dispatch coordinator: turns a dispatch record and its peers' tasks into
//! a verdict, and finishes the dispatch when the quorum rule says so.
//!
//! It keeps no state of its own. Every evaluation reads the record and the tasks
//! from the store and applies the pure rules of `concord_core::dispatch`; the
//! store finishes a dispatch only while it is still running. So any replica may
//! evaluate any dispatch at any time (the request that waits, the reaper, a GET),
//! a dispatch survives a hub restart, and it is finished exactly once.

use crate::AppState;
use concord_core::api::{
    DispatchPeer, DispatchRequest, DispatchView, Event, Instance, InstanceState, ReducerKind, Role,
    TaskState,
};
use concord_core::dispatch::{
    reduce, verdict, Answer, IfUnderMin, Quorum, Reducer, Tally, Verdict,
};
use concord_core::{ids, Error, Result, Timestamp};
use concord_store::{topics, DispatchRecord, InstanceFilter, NewTask};
use serde_json::{json, Value};

/// Retries of an idempotent `single` dispatch on other peers.
const SINGLE_RETRIES: usize = 3;

pub fn default_reducer() -> Reducer {
    Reducer {
        kind: ReducerKind::All,
        path: None,
        weight_path: None,
        score_path: None,
        key_path: None,
    }
}

/// Live instances that match the selector, primaries first, then oldest.
pub async fn candidates(
    state: &AppState,
    req: &DispatchRequest,
    exclude: &[String],
) -> Result<Vec<Instance>> {
    let sel = &req.select;
    let roles = sel
        .roles
        .clone()
        .unwrap_or_else(|| vec![Role::Primary, Role::Secondary]);
    let now = state.store.now_ms().await?;
    let mut out: Vec<Instance> = state
        .store
        .list_instances(InstanceFilter {
            entity: sel.entity.clone(),
            role: None,
            state: Some(InstanceState::Live),
        })
        .await?
        .into_iter()
        .filter(|i| i.lease_until.millis() >= now)
        .filter(|i| roles.contains(&i.role))
        .filter(|i| sel.capabilities.iter().all(|c| i.capabilities.contains(c)))
        .filter(|i| !i.is_unlabeled() || i.role == Role::Primary)
        .filter(|i| !exclude.contains(&i.id))
        .collect();
    out.sort_by_key(|i| (i.role != Role::Primary, i.registered_at));
    Ok(out)
}

/// How many peers a dispatch sends to at most.
pub fn fan_out(req: &DispatchRequest) -> usize {
    match req.quorum {
        Quorum::Single => 1,
        Quorum::Multi => req.max.unwrap_or(req.min.unwrap_or(1)).max(1),
        Quorum::Any => usize::MAX,
    }
}

/// The queue a command's peer tasks go to.
pub fn peer_queue(command: &str) -> String {
    format!("dispatch.{command}")
}

/// The peer's work: a task only it can claim, in `dispatch.<command>`.
pub fn peer_task(
    dispatch: &str,
    req: &DispatchRequest,
    instance: &str,
    deadline_ms: i64,
    now: i64,
) -> NewTask {
    NewTask {
        id: ids::new_id(ids::TASK),
        queue: peer_queue(&req.command),
        payload: json!({"dispatch": dispatch, "command": req.command, "payload": req.payload}),
        priority: 0,
        requires: vec![],
        target: Some(instance.to_string()),
        idempotency_key: Some(format!("dispatch:{dispatch}:{instance}")),
        max_attempts: 1,
        backoff_ms: 0,
        not_before: None,
        depends_on: vec![],
        timeout_ms: Some((deadline_ms - now).clamp(1_000, concord_core::task::MAX_LEASE_MS)),
    }
}

/// Whether an event may change a running dispatch's verdict, so that the
/// request waiting on it evaluates again. A claim moves a peer from pending to
/// running, which no quorum rule tells apart; events about other queues' tasks
/// are none of its business. Waking on less matters: every evaluation reads the
/// record, and 10 peers make some 40 task events per dispatch.
pub fn may_change(e: &Event, queue: &str) -> bool {
    match e.topic.as_str() {
        topics::TASK_COMPLETED
        | topics::TASK_FAILED
        | topics::TASK_DEAD
        | topics::TASK_CANCELLED
        | topics::TASK_REQUEUED => e.data["tasks"]
            .as_array()
            .is_none_or(|ts| ts.iter().any(|t| t["queue"] == queue)),
        topics::INSTANCE_REGISTERED
        | topics::INSTANCE_UPDATED
        | topics::INSTANCE_EXPIRED
        | topics::INSTANCE_CLOSED
        | topics::DISPATCH_PEERS_ADDED
        | topics::DISPATCH_FINISHED => true,
        _ => false,
    }
}

/// Reads the dispatch, finishes it if its quorum rule says so, and returns its view.
pub async fn evaluate(state: &AppState, id: &str) -> Result<DispatchView> {
    let rec = state
        .store
        .get_dispatch(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("no dispatch {id}")))?;
    let now = state.store.now_ms().await?;
    if rec.state != "running" {
        return Ok(view(&rec, now));
    }
    let req: DispatchRequest = serde_json::from_value(rec.spec.clone())
        .map_err(|e| Error::internal(format!("dispatch spec: {e}")))?;
    let deadline_passed = now >= rec.deadline_ms;
    let peers = peer_states(&rec, now);
    let ok = peers.iter().filter(|p| p.state == "completed").count();
    let outstanding = peers
        .iter()
        .filter(|p| p.state == "pending" || p.state == "running")
        .count();
    let failed = peers
        .iter()
        .filter(|p| p.state == "failed" || p.state == "cancelled")
        .count();

    // Replace failed peers of an idempotent single dispatch; bring in peers that
    // appeared for one that waits for them.
    if !deadline_passed && ok == 0 && outstanding == 0 {
        let tried: Vec<String> = rec.peers.iter().map(|p| p.instance.clone()).collect();
        let want = match req.quorum {
            Quorum::Single if req.idempotent && failed > 0 && failed <= SINGLE_RETRIES => 1,
            _ if rec.peers.is_empty() && req.if_under_min == IfUnderMin::Wait => fan_out(&req),
            _ => 0,
        };
        if want > 0 {
            let more: Vec<(String, NewTask)> = candidates(state, &req, &tried)
                .await?
                .into_iter()
                .take(want)
                .map(|i| {
                    let t = peer_task(&rec.id, &req, &i.id, rec.deadline_ms, now);
                    (i.id, t)
                })
                .collect();
            if !more.is_empty() {
                state.store.add_dispatch_peers(&rec.id, more).await?;
                return Box::pin(evaluate(state, id)).await;
            }
        }
    }

    let reducer = req.reducer.clone().unwrap_or_else(default_reducer);
    let tally = Tally {
        quorum: req.quorum,
        min: req.min.unwrap_or(1),
        max: req.max.unwrap_or(usize::MAX),
        if_under_min: req.if_under_min,
        first_wins: reducer.kind == ReducerKind::First,
        selected: rec.peers.len(),
        ok,
        outstanding,
        deadline_passed,
    };
    let v = verdict(tally);
    if v == Verdict::Running {
        return Ok(view(&rec, now));
    }
    let mut answered: Vec<&DispatchPeer> =
        peers.iter().filter(|p| p.state == "completed").collect();
    answered.sort_by_key(|p| p.latency_ms.unwrap_or(i64::MAX));
    let answers: Vec<Answer> = answered
        .iter()
        .map(|p| Answer {
            instance: p.instance.clone(),
            result: p.result.clone().unwrap_or(Value::Null),
        })
        .collect();
    let (state_name, result, outcome) = match v {
        Verdict::Failed => ("failed", None, json!({"reason": failure_reason(&tally)})),
        _ => {
            let r = reduce(&reducer, &answers);
            let name = if v == Verdict::Degraded {
                "degraded"
            } else {
                "completed"
            };
            let result = if answers.is_empty() {
                None
            } else {
                Some(r.value)
            };
            (name, result, json!({"excluded": r.excluded, "tie": r.tie}))
        }
    };
    // Peers that have not started are cancelled; running ones may still answer
    // (recorded as late, not used).
    let cancel: Vec<String> = peers
        .iter()
        .filter(|p| p.state == "pending")
        .map(|p| p.task.clone())
        .collect();
    state
        .store
        .finish_dispatch(&rec.id, state_name, result, outcome, cancel)
        .await?;
    let rec = state
        .store
        .get_dispatch(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("no dispatch {id}")))?;
    Ok(view(&rec, now))
}

fn failure_reason(t: &Tally) -> String {
    if t.selected == 0 {
        "no peers matched the selector".into()
    } else {
        format!(
            "{} of {} peers answered; the quorum needed more",
            t.ok, t.selected
        )
    }
}

/// Each peer's state from its task and its instance's liveness, as the store
/// read them with the record.
fn peer_states(rec: &DispatchRecord, now: i64) -> Vec<DispatchPeer> {
    rec.peers
        .iter()
        .map(|p| {
            let alive = p.live_until.is_some_and(|until| until >= now);
            let (st, result, error, latency, late) = match &p.work {
                None => (
                    "failed",
                    None,
                    Some("task vanished".to_string()),
                    None,
                    false,
                ),
                Some(t) => {
                    let done_at = t.completed_at;
                    let late = rec
                        .finished_at
                        .is_some_and(|f| done_at.is_some_and(|d| d > f));
                    match t.state {
                        TaskState::Completed => (
                            "completed",
                            t.result.clone(),
                            None,
                            done_at.map(|d| d - p.added_at),
                            late,
                        ),
                        TaskState::Dead | TaskState::Failed => (
                            "failed",
                            None,
                            t.error.clone(),
                            done_at.map(|d| d - p.added_at),
                            false,
                        ),
                        TaskState::Cancelled => ("cancelled", None, t.error.clone(), None, false),
                        _ if !alive => (
                            "failed",
                            None,
                            Some(format!("peer {} is no longer live", p.instance)),
                            None,
                            false,
                        ),
                        _ if now >= rec.deadline_ms => (
                            "timeout",
                            None,
                            Some("no answer by the deadline".into()),
                            None,
                            false,
                        ),
                        TaskState::Running => ("running", None, None, None, false),
                        _ => ("pending", None, None, None, false),
                    }
                }
            };
            DispatchPeer {
                instance: p.instance.clone(),
                task: p.task.clone(),
                state: st.into(),
                result,
                error,
                latency_ms: latency,
                late,
            }
        })
        .collect()
}

fn view(rec: &DispatchRecord, now: i64) -> DispatchView {
    let peers = peer_states(rec, now);
    let responded = peers.iter().filter(|p| p.state == "completed").count();
    DispatchView {
        id: rec.id.clone(),
        command: rec.command.clone(),
        state: rec.state.clone(),
        result: rec.result.clone(),
        outcome: rec.outcome.clone(),
        selected: peers.len(),
        responded,
        peers,
        created_at: Timestamp(rec.created_at),
        deadline: Timestamp(rec.deadline_ms),
        finished_at: rec.finished_at.map(Timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::api::EventSource;

    fn event(topic: &str, data: Value) -> Event {
        Event {
            seq: 1,
            topic: topic.into(),
            time: Timestamp(0),
            source: EventSource::default(),
            data,
        }
    }

    #[test]
    fn only_outcomes_of_its_queue_and_peer_changes_wake_a_dispatch() {
        let q = peer_queue("summarize");
        let ours = json!({"tasks": [{"id": "tsk_1", "queue": q, "state": "completed"}]});
        let theirs = json!({"tasks": [{"id": "tsk_2", "queue": "email", "state": "completed"}]});
        assert!(may_change(&event(topics::TASK_COMPLETED, ours.clone()), &q));
        assert!(may_change(&event(topics::TASK_DEAD, ours.clone()), &q));
        assert!(!may_change(&event(topics::TASK_COMPLETED, theirs), &q));
        // A claim or an enqueue moves no verdict.
        assert!(!may_change(&event(topics::TASK_CLAIMED, ours.clone()), &q));
        assert!(!may_change(&event(topics::TASK_ENQUEUED, ours), &q));
        // A task event without its tasks is not trusted to be someone else's.
        assert!(may_change(&event(topics::TASK_CANCELLED, json!({})), &q));
        assert!(may_change(&event(topics::INSTANCE_EXPIRED, json!({})), &q));
        assert!(may_change(&event(topics::DISPATCH_FINISHED, json!({})), &q));
        assert!(!may_change(&event("deploys.done", json!({})), &q));
    }
}
