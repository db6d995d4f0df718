//! Dispatch records (DESIGN §8): the record and its peers' tasks made together,
//! each peer read back with its task and its instance's liveness, peers added
//! once per instance, and a dispatch finished exactly once, cancelling the peers
//! that had not started.

use crate::harness::*;
use crate::queue::{assert_stats_match_tasks, claim, spec};
use concord_core::api::{Role, TaskState};
use concord_core::ids;
use concord_store::{topics, Completion, DispatchRecord, DynStore, NewDispatch, NewTask};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Barrier;

conformance!(
    a_dispatch_reads_back_its_peers_work_and_liveness,
    finishing_cancels_unstarted_peers_and_happens_once,
    peers_are_added_once_per_instance,
    concurrent_finishes_finish_once,
);

const QUEUE: &str = "dispatch.summarize";

/// A peer's task as the coordinator builds it: only that instance may claim it.
fn peer(dispatch: &str, instance: &str) -> (String, NewTask) {
    (
        instance.to_string(),
        NewTask {
            id: ids::new_id(ids::TASK),
            queue: QUEUE.into(),
            payload: json!({"dispatch": dispatch, "command": "summarize"}),
            priority: 0,
            requires: vec![],
            target: Some(instance.to_string()),
            idempotency_key: Some(format!("dispatch:{dispatch}:{instance}")),
            max_attempts: 1,
            backoff_ms: 0,
            not_before: None,
            depends_on: vec![],
            timeout_ms: Some(30_000),
        },
    )
}

async fn peers(store: &DynStore, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        let label = format!("peer-{i}");
        out.push(
            register(store, "fleet", Role::Secondary, Some(&label))
                .await
                .instance
                .id,
        );
    }
    out
}

async fn create(store: &DynStore, instances: &[String]) -> String {
    let id = ids::new_id(ids::DISPATCH);
    store
        .create_dispatch(NewDispatch {
            id: id.clone(),
            command: "summarize".into(),
            spec: json!({"command": "summarize", "quorum": "multi"}),
            deadline_ms: store.now_ms().await.unwrap() + 30_000,
            peers: instances.iter().map(|i| peer(&id, i)).collect(),
            token: "tok_dispatcher".into(),
        })
        .await
        .expect("create dispatch");
    id
}

async fn record(store: &DynStore, id: &str) -> DispatchRecord {
    store
        .get_dispatch(id)
        .await
        .expect("get dispatch")
        .unwrap_or_else(|| panic!("dispatch {id} exists"))
}

/// The peer row of `instance`.
fn row<'a>(rec: &'a DispatchRecord, instance: &str) -> &'a concord_store::DispatchPeerRow {
    rec.peers
        .iter()
        .find(|p| p.instance == instance)
        .unwrap_or_else(|| panic!("{instance} is a peer of {}", rec.id))
}

async fn a_dispatch_reads_back_its_peers_work_and_liveness(store: DynStore) {
    let ps = peers(&store, 3).await;
    let before = store.last_event_seq().await.unwrap();
    let id = create(&store, &ps).await;

    let rec = record(&store, &id).await;
    assert_eq!(rec.state, "running");
    assert_eq!(rec.command, "summarize");
    assert_eq!(rec.spec["quorum"], "multi");
    assert!(rec.result.is_none() && rec.finished_at.is_none());
    assert_eq!(rec.peers.len(), 3);
    let now = store.now_ms().await.unwrap();
    for p in &rec.peers {
        let work = p.work.as_ref().expect("the peer's task exists");
        assert_eq!(work.state, TaskState::Pending, "{}", p.instance);
        assert!(work.result.is_none() && work.completed_at.is_none());
        assert!(
            p.live_until.is_some_and(|u| u >= now),
            "{} is live",
            p.instance
        );
        let task = store.get_task(&p.task).await.unwrap().expect("peer task");
        assert_eq!(task.target.as_deref(), Some(p.instance.as_str()));
        assert_eq!(task.queue, QUEUE);
    }
    assert_eq!(store.running_dispatches().await.unwrap(), vec![id.clone()]);
    let created: Vec<_> = store
        .read_events(before, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.topic == topics::DISPATCH_CREATED)
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].data["id"], id.as_str());
    assert_eq!(created[0].source.token.as_deref(), Some("tok_dispatcher"));

    // One answers, one fails, one's instance ends.
    let (a, b, c) = (&ps[0], &ps[1], &ps[2]);
    let got = claim(&store, spec(a, QUEUE, 10)).await;
    assert_eq!(got.len(), 1, "a claims only its own task");
    store
        .complete_tasks(vec![Completion {
            id: got[0].task.id.clone(),
            claim: got[0].claim.clone(),
            result: json!({"summary": "ok"}),
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let got = claim(&store, spec(b, QUEUE, 10)).await;
    assert_eq!(got.len(), 1);
    store
        .fail_task(&got[0].task.id, &got[0].claim, "model refused", false)
        .await
        .unwrap();
    let reg = store.get_instance(c).await.unwrap().unwrap();
    store.close_instance(c, &session(&reg)).await.unwrap();

    let rec = record(&store, &id).await;
    let wa = row(&rec, a).work.as_ref().unwrap();
    assert_eq!(wa.state, TaskState::Completed);
    assert_eq!(wa.result, Some(json!({"summary": "ok"})));
    assert!(wa.completed_at.is_some_and(|t| t >= row(&rec, a).added_at));
    let wb = row(&rec, b).work.as_ref().unwrap();
    assert!(
        matches!(wb.state, TaskState::Dead | TaskState::Failed),
        "{:?}",
        wb.state
    );
    assert_eq!(wb.error.as_deref(), Some("model refused"));
    assert!(row(&rec, b).live_until.is_some(), "b is still live");
    assert_eq!(row(&rec, c).live_until, None, "c has ended");
    assert!(row(&rec, c).work.is_some());

    assert!(store
        .get_dispatch("dsp_nothing_here")
        .await
        .unwrap()
        .is_none());
    assert_stats_match_tasks(&store).await;
}

async fn finishing_cancels_unstarted_peers_and_happens_once(store: DynStore) {
    let ps = peers(&store, 3).await;
    let id = create(&store, &ps).await;
    // a is running, b and c have not started.
    let running = claim(&store, spec(&ps[0], QUEUE, 1)).await.remove(0);
    let rec = record(&store, &id).await;
    let cancel: Vec<String> = rec.peers.iter().map(|p| p.task.clone()).collect();

    let before = store.last_event_seq().await.unwrap();
    let done = store
        .finish_dispatch(
            &id,
            "degraded",
            Some(json!({"mean": 0.5})),
            json!({"excluded": [], "tie": false}),
            cancel.clone(),
        )
        .await
        .unwrap();
    assert!(done);

    let rec = record(&store, &id).await;
    assert_eq!(rec.state, "degraded");
    assert_eq!(rec.result, Some(json!({"mean": 0.5})));
    assert_eq!(rec.outcome["tie"], false);
    assert!(rec.finished_at.is_some());
    // The running peer may still answer; the others were cancelled.
    assert_eq!(
        row(&rec, &ps[0]).work.as_ref().unwrap().state,
        TaskState::Running
    );
    for p in &ps[1..] {
        let w = row(&rec, p).work.as_ref().unwrap();
        assert_eq!(w.state, TaskState::Cancelled, "{p}");
        assert!(w.error.as_deref().is_some_and(|e| e.contains(&id)));
    }
    assert!(store.running_dispatches().await.unwrap().is_empty());
    let events = store.read_events(before, 100).await.unwrap();
    let finished: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topics::DISPATCH_FINISHED)
        .collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].data["state"], "degraded");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.topic == topics::TASK_CANCELLED)
            .count(),
        2
    );

    // A second finish changes nothing, and no event is written.
    let seq = store.last_event_seq().await.unwrap();
    let again = store
        .finish_dispatch(&id, "failed", None, json!({"reason": "late"}), cancel)
        .await
        .unwrap();
    assert!(!again);
    let rec = record(&store, &id).await;
    assert_eq!(rec.state, "degraded");
    assert_eq!(rec.result, Some(json!({"mean": 0.5})));
    assert_eq!(store.last_event_seq().await.unwrap(), seq);

    // The running peer's late answer is still recorded.
    store
        .complete_tasks(vec![Completion {
            id: running.task.id.clone(),
            claim: running.claim.clone(),
            result: json!({"late": true}),
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let rec = record(&store, &id).await;
    let w = row(&rec, &ps[0]).work.as_ref().unwrap();
    assert_eq!(w.state, TaskState::Completed);
    assert!(w.completed_at >= rec.finished_at);
    assert_stats_match_tasks(&store).await;
}

async fn peers_are_added_once_per_instance(store: DynStore) {
    let ps = peers(&store, 3).await;
    let id = create(&store, &ps[..1]).await;
    let before = store.last_event_seq().await.unwrap();
    store
        .add_dispatch_peers(&id, vec![peer(&id, &ps[1]), peer(&id, &ps[2])])
        .await
        .unwrap();
    // The same instance again: its row and its task stay as they were.
    store
        .add_dispatch_peers(&id, vec![peer(&id, &ps[1])])
        .await
        .unwrap();
    let rec = record(&store, &id).await;
    assert_eq!(rec.peers.len(), 3);
    let tasks: std::collections::HashSet<&str> =
        rec.peers.iter().map(|p| p.task.as_str()).collect();
    assert_eq!(tasks.len(), 3, "one task per peer");
    let queued = store
        .list_tasks(concord_store::TaskFilter {
            queue: Some(QUEUE.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(queued.len(), 3, "no task for the repeated peer");
    let added: Vec<_> = store
        .read_events(before, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.topic == topics::DISPATCH_PEERS_ADDED)
        .collect();
    assert_eq!(added.len(), 2);
    assert_eq!(added[0].data["peers"], json!([ps[1], ps[2]]));
    assert_stats_match_tasks(&store).await;
}

async fn concurrent_finishes_finish_once(store: DynStore) {
    let ps = peers(&store, 2).await;
    let id = create(&store, &ps).await;
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let mut joins = Vec::new();
    for i in 0..n {
        let (store, id, barrier) = (store.clone(), id.clone(), barrier.clone());
        joins.push(tokio::spawn(async move {
            barrier.wait().await;
            let state = if i % 2 == 0 { "completed" } else { "failed" };
            let won = store
                .finish_dispatch(&id, state, Some(json!({"by": i})), json!({}), vec![])
                .await
                .unwrap();
            (won, state, i)
        }));
    }
    let mut winners = Vec::new();
    for j in joins {
        let (won, state, i) = j.await.unwrap();
        if won {
            winners.push((state, i));
        }
    }
    assert_eq!(winners.len(), 1, "exactly one finish wins: {winners:?}");
    let rec = record(&store, &id).await;
    assert_eq!(rec.state, winners[0].0);
    assert_eq!(rec.result, Some(json!({"by": winners[0].1})));
    assert_stats_match_tasks(&store).await;
}
