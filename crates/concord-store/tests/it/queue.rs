//! The work queue (DESIGN §7): enqueue with idempotency keys and dependencies,
//! claims by priority, target and capabilities, heartbeats, completion, failure
//! with backoff, cancellation with its cascade, lapsed and released claims,
//! schedules and pruning. Every transition is checked for its `sys.task.*` event,
//! and every refused call for changing nothing.

use crate::harness::*;
use concord_core::api::{ClaimedTask, Event, EventSource, Role, Task, TaskState};
use concord_core::task::DEFAULT_LEASE_MS;
use concord_core::{ids, ErrorCode, Timestamp};
use concord_store::{topics, ClaimSpec, Completion, DynStore, NewTask, ScheduleSpec, TaskFilter};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Barrier;

conformance!(
    enqueue_get_list_and_stats,
    idempotency_keys_return_the_first_task,
    claims_follow_priority_target_requires_and_time,
    claims_need_a_live_instance,
    only_a_live_labelled_instance_enqueues_or_claims_as_itself,
    task_heartbeat_extends_the_lease_and_records_progress,
    complete_one_by_one_and_in_batches,
    completing_for_outcomes_changes_and_announces_the_same,
    complete_and_claim_is_both_or_neither,
    a_batch_completion_claims_the_next_in_the_same_transaction,
    stale_claims_are_refused_and_change_nothing,
    failures_retry_with_backoff_then_die,
    cancel_stops_a_task_and_cascades_to_dependents,
    dependencies_gate_claims,
    lapsed_claims_return_to_pending_or_die,
    ending_an_instance_releases_its_tasks,
    schedules_fire_once_per_due_time,
    prune_removes_old_finished_tasks,
    concurrent_claimers_never_share_a_task,
    a_claim_racing_the_claimers_end_leaves_nothing_held,
    a_dependent_racing_its_dependencys_death_is_cancelled,
);

// ---------- fixtures ----------

/// A task as the hub would build it from a minimal enqueue request.
pub fn task(queue: &str) -> NewTask {
    NewTask {
        id: ids::new_id(ids::TASK),
        queue: queue.into(),
        payload: json!({"job": queue}),
        priority: 0,
        requires: vec![],
        target: None,
        idempotency_key: None,
        max_attempts: 3,
        backoff_ms: 1_000,
        not_before: None,
        depends_on: vec![],
        timeout_ms: None,
    }
}

fn source() -> EventSource {
    EventSource {
        instance: None,
        entity: None,
        token: Some("tok_producer".into()),
    }
}

pub async fn enqueue(store: &DynStore, tasks: Vec<NewTask>) -> Vec<Task> {
    store
        .enqueue(tasks, source())
        .await
        .expect("enqueue")
        .into_iter()
        .map(|(t, dup)| {
            assert!(!dup, "{} was not expected to be a duplicate", t.id);
            t
        })
        .collect()
}

pub async fn enqueue_one(store: &DynStore, t: NewTask) -> Task {
    enqueue(store, vec![t]).await.remove(0)
}

pub fn spec(instance: &str, queue: &str, max: u32) -> ClaimSpec {
    ClaimSpec {
        instance: instance.into(),
        queues: vec![queue.into()],
        max,
        lease_ms: None,
    }
}

pub async fn claim(store: &DynStore, spec: ClaimSpec) -> Vec<ClaimedTask> {
    store.claim_tasks(spec).await.expect("claim")
}

async fn get(store: &DynStore, id: &str) -> Task {
    store
        .get_task(id)
        .await
        .expect("get task")
        .unwrap_or_else(|| panic!("task {id} exists"))
}

async fn worker(store: &DynStore, name: &str) -> String {
    register(store, "workers", Role::Secondary, Some(name))
        .await
        .instance
        .id
}

fn completion(c: &ClaimedTask, result: serde_json::Value) -> Completion {
    Completion {
        id: c.task.id.clone(),
        claim: c.claim.clone(),
        result,
    }
}

/// The `sys.task.*` events after `after`, as (topic, [(task id, state)]).
/// Completions of three claimed tasks: the first and third with their claims
/// (results `{"ok": 1}` and `"done"`), the second with a forged claim, and a
/// fourth for a task that does not exist.
fn mixed_completions(got: &[ClaimedTask]) -> Vec<Completion> {
    vec![
        completion(&got[0], json!({"ok": 1})),
        Completion {
            claim: "clm_forged".into(),
            ..completion(&got[1], json!(null))
        },
        completion(&got[2], json!("done")),
        Completion {
            id: "tsk_missing".into(),
            ..completion(&got[2], json!(null))
        },
    ]
}

/// The stats' counts agree with the tasks themselves, queue by queue (SQLite keeps
/// them as counters the writer updates on every move; PostgreSQL counts rows).
pub async fn assert_stats_match_tasks(store: &DynStore) {
    let mut tasks = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_tasks(TaskFilter {
                queue: None,
                state: None,
                after: after.clone(),
                limit: 500,
            })
            .await
            .unwrap();
        after = page.last().map(|t| t.id.clone());
        let done = page.len() < 500;
        tasks.extend(page);
        if done {
            break;
        }
    }
    let mut expected: BTreeMap<String, [u64; 7]> = BTreeMap::new();
    for t in &tasks {
        let i = match t.state {
            TaskState::Pending => 0,
            TaskState::Scheduled => 1,
            TaskState::Running => 2,
            TaskState::Completed => 3,
            TaskState::Failed => 4,
            TaskState::Dead => 5,
            TaskState::Cancelled => 6,
        };
        expected.entry(t.queue.clone()).or_default()[i] += 1;
    }
    let got: BTreeMap<String, [u64; 7]> = store
        .queue_stats()
        .await
        .unwrap()
        .into_iter()
        .map(|q| {
            let n = [
                q.pending,
                q.scheduled,
                q.running,
                q.completed,
                q.failed,
                q.dead,
                q.cancelled,
            ];
            (q.name, n)
        })
        .filter(|(_, n)| n.iter().any(|&x| x > 0))
        .collect();
    assert_eq!(
        got, expected,
        "stats [pending, scheduled, running, completed, failed, dead, cancelled] per queue"
    );
}

fn task_events(events: &[Event]) -> Vec<(String, Vec<(String, String)>)> {
    events
        .iter()
        .filter(|e| e.topic.starts_with("sys.task."))
        .map(|e| {
            let tasks = e.data["tasks"]
                .as_array()
                .unwrap_or_else(|| panic!("{} carries its tasks: {}", e.topic, e.data))
                .iter()
                .map(|t| {
                    (
                        t["id"].as_str().unwrap().to_string(),
                        t["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (e.topic.clone(), tasks)
        })
        .collect()
}

fn one(id: &str, state: &str) -> Vec<(String, String)> {
    vec![(id.to_string(), state.to_string())]
}

fn ev(topic: &str, tasks: Vec<(String, String)>) -> (String, Vec<(String, String)>) {
    (topic.to_string(), tasks)
}

/// The lease a claim or heartbeat made between the store times `t0` and `t1`.
#[track_caller]
fn assert_lease(until: i64, t0: i64, t1: i64, lease: i64) {
    assert!(
        (t0 + lease..=t1 + lease).contains(&until),
        "lease until {until} is not {lease} ms after a time in [{t0}, {t1}]"
    );
}

// ---------- bodies ----------

async fn enqueue_get_list_and_stats(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let t0 = store.now_ms().await.unwrap();
    let mut a = task("build");
    a.payload = json!({"cmd": "make", "args": [1, 2]});
    a.priority = 5;
    a.requires = vec!["code".into()];
    a.max_attempts = 4;
    a.backoff_ms = 250;
    a.timeout_ms = Some(60_000);
    let mut later = task("build");
    later.not_before = Some(t0 + 3_600_000);
    let mut other = task("deploy");
    other.idempotency_key = Some("deploy-once".into());
    let out = store
        .enqueue(vec![a.clone(), later.clone(), other.clone()], source())
        .await
        .unwrap();
    let t1 = store.now_ms().await.unwrap();
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|(_, dup)| !dup));
    let t = &out[0].0;
    assert_eq!(t.id, a.id);
    assert_eq!(t.queue, "build");
    assert_eq!(t.state, TaskState::Pending);
    assert_eq!(t.priority, 5);
    assert_eq!(t.payload, json!({"cmd": "make", "args": [1, 2]}));
    assert_eq!(t.requires, ["code"]);
    assert_eq!((t.attempt, t.max_attempts, t.backoff_ms), (0, 4, 250));
    assert_eq!(t.timeout_ms, Some(60_000));
    assert_eq!((t.claimed_by.as_deref(), t.lease_until), (None, None));
    assert_eq!((t.progress.as_ref(), t.result.as_ref()), (None, None));
    assert_eq!(
        (t.error.as_deref(), t.idempotency_key.as_deref()),
        (None, None)
    );
    assert_eq!(t.not_before, None);
    assert!(t.depends_on.is_empty());
    assert!((t0..=t1).contains(&t.created_at.millis()), "store clock");
    assert_eq!(t.updated_at, t.created_at);
    assert_eq!(t.completed_at, None);
    let l = &out[1].0;
    assert_eq!(l.state, TaskState::Scheduled, "not_before in the future");
    assert_eq!(l.not_before, Some(Timestamp(t0 + 3_600_000)));

    // What enqueue answers is what the store holds, field for field.
    for (t, _) in &out {
        assert_eq!(&get(&store, &t.id).await, t);
    }
    assert_eq!(store.get_task("tsk_missing").await.unwrap(), None);

    let ids_of = |v: Vec<Task>| v.into_iter().map(|t| t.id).collect::<BTreeSet<_>>();
    let all = |queue: Option<&str>, state: Option<TaskState>| TaskFilter {
        queue: queue.map(str::to_string),
        state,
        after: None,
        limit: 100,
    };
    assert_eq!(
        ids_of(store.list_tasks(all(Some("build"), None)).await.unwrap()),
        BTreeSet::from([a.id.clone(), later.id.clone()])
    );
    assert_eq!(
        ids_of(
            store
                .list_tasks(all(None, Some(TaskState::Scheduled)))
                .await
                .unwrap()
        ),
        BTreeSet::from([later.id.clone()])
    );
    assert_eq!(
        store.list_tasks(all(None, None)).await.unwrap().len(),
        3,
        "no filter lists every queue"
    );
    // Paging: ids sort, `after` continues where a page ended.
    let page1 = store
        .list_tasks(TaskFilter {
            limit: 2,
            ..all(None, None)
        })
        .await
        .unwrap();
    assert_eq!(page1.len(), 2);
    assert!(page1[0].id < page1[1].id);
    let page2 = store
        .list_tasks(TaskFilter {
            after: Some(page1[1].id.clone()),
            ..all(None, None)
        })
        .await
        .unwrap();
    assert_eq!(page2.len(), 1);
    assert!(page2[0].id > page1[1].id);

    let stats = store.queue_stats().await.unwrap();
    let names: Vec<&str> = stats.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["build", "deploy"]);
    assert_eq!(
        (stats[0].pending, stats[0].scheduled, stats[0].running),
        (1, 1, 0)
    );
    assert_eq!((stats[1].pending, stats[1].completed), (1, 0));
    assert!(stats[0].oldest_pending_age_ms.is_some_and(|a| a >= 0));

    let events = events_after(&store, before).await;
    assert_eq!(
        task_events(&events),
        [ev(
            topics::TASK_ENQUEUED,
            vec![
                (a.id.clone(), "pending".into()),
                (later.id.clone(), "scheduled".into()),
                (other.id.clone(), "pending".into()),
            ]
        )],
        "one event for the batch"
    );
    assert_eq!(events[0].source, source());
    assert_stats_match_tasks(&store).await;
}

async fn idempotency_keys_return_the_first_task(store: DynStore) {
    let mut first = task("mail");
    first.idempotency_key = Some("send:42".into());
    first.payload = json!({"to": "ops"});
    let created = enqueue_one(&store, first.clone()).await;
    let before = store.last_event_seq().await.unwrap();

    // The same key again, with another id and payload: the first task comes back.
    let mut again = task("mail");
    again.idempotency_key = Some("send:42".into());
    again.payload = json!({"to": "someone else"});
    let out = store.enqueue(vec![again], source()).await.unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].1, "deduplicated");
    assert_eq!(out[0].0, created);

    // In one batch: a new key twice, and the old key, each answered in order.
    let mut x = task("mail");
    x.idempotency_key = Some("send:43".into());
    let mut y = task("mail");
    y.idempotency_key = Some("send:43".into());
    let mut z = task("mail");
    z.idempotency_key = Some("send:42".into());
    let out = store
        .enqueue(vec![x.clone(), y, z], source())
        .await
        .unwrap();
    let got: Vec<(&str, bool)> = out.iter().map(|(t, d)| (t.id.as_str(), *d)).collect();
    assert_eq!(
        got,
        [
            (x.id.as_str(), false),
            (x.id.as_str(), true),
            (created.id.as_str(), true)
        ]
    );
    assert_eq!(
        store
            .list_tasks(TaskFilter {
                queue: Some("mail".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        2
    );
    // Only what was created is announced.
    assert_eq!(
        task_events(&events_after(&store, before).await),
        [ev(topics::TASK_ENQUEUED, one(&x.id, "pending"))]
    );
}

async fn claims_follow_priority_target_requires_and_time(store: DynStore) {
    let w1 = worker(&store, "w1").await; // capabilities: code, review
    let mut req = request("workers", Role::Secondary, Some("w2"));
    req.capabilities = vec!["code".into()];
    let w2 = register_with(&store, req, TTL).await.instance.id;

    let t0 = store.now_ms().await.unwrap();
    let mk = |priority: i32| {
        let mut t = task("jobs");
        t.priority = priority;
        t
    };
    let low = mk(0);
    let high = mk(9);
    let mid = mk(5);
    let low2 = mk(0);
    let mut gpu = mk(8);
    gpu.requires = vec!["gpu".into()];
    let mut review = mk(1);
    review.requires = vec!["review".into(), "code".into()];
    let mut for_w2 = mk(7);
    for_w2.target = Some(w2.clone());
    let mut later = mk(9);
    later.not_before = Some(t0 + 3_600_000);
    let mut short = mk(-1);
    short.timeout_ms = Some(5_000);
    let elsewhere = task("other");
    enqueue(
        &store,
        vec![
            low.clone(),
            high.clone(),
            mid.clone(),
            low2.clone(),
            gpu.clone(),
            review.clone(),
            for_w2.clone(),
            later.clone(),
            short.clone(),
            elsewhere.clone(),
        ],
    )
    .await;
    let before = store.last_event_seq().await.unwrap();

    // w1: highest priority first, then oldest; never another's target, never a
    // task whose capabilities it lacks, never one not yet due.
    let c0 = store.now_ms().await.unwrap();
    let got = claim(&store, spec(&w1, "jobs", 4)).await;
    let c1 = store.now_ms().await.unwrap();
    let order: Vec<&str> = got.iter().map(|c| c.task.id.as_str()).collect();
    assert_eq!(order, [&high.id, &mid.id, &review.id, &low.id]);
    for c in &got {
        assert!(c.claim.starts_with("clm_"));
        assert_eq!(c.task.state, TaskState::Running);
        assert_eq!(c.task.attempt, 1);
        assert_eq!(c.task.claimed_by.as_deref(), Some(w1.as_str()));
        assert_lease(
            c.task.lease_until.unwrap().millis(),
            c0,
            c1,
            DEFAULT_LEASE_MS,
        );
        assert_eq!(get(&store, &c.task.id).await, c.task);
    }
    let claims: BTreeSet<&str> = got.iter().map(|c| c.claim.as_str()).collect();
    assert_eq!(claims.len(), 4, "a fresh claim token per task");

    // The rest for w1: the task's own timeout is its lease; a claim's lease wins.
    let c0 = store.now_ms().await.unwrap();
    let rest = claim(&store, spec(&w1, "jobs", 10)).await;
    let c1 = store.now_ms().await.unwrap();
    let order: Vec<&str> = rest.iter().map(|c| c.task.id.as_str()).collect();
    assert_eq!(order, [&low2.id, &short.id]);
    assert_lease(rest[1].task.lease_until.unwrap().millis(), c0, c1, 5_000);
    assert!(claim(&store, spec(&w1, "jobs", 10)).await.is_empty());

    // w2 gets its target; it lacks `gpu`, as does everyone.
    let c0 = store.now_ms().await.unwrap();
    let mine = claim(
        &store,
        ClaimSpec {
            lease_ms: Some(2_000),
            ..spec(&w2, "jobs", 10)
        },
    )
    .await;
    let c1 = store.now_ms().await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].task.id, for_w2.id);
    assert_lease(mine[0].task.lease_until.unwrap().millis(), c0, c1, 2_000);
    assert_eq!(get(&store, &gpu.id).await.state, TaskState::Pending);
    assert_eq!(get(&store, &later.id).await.state, TaskState::Scheduled);

    // Several queues at once.
    let both = claim(
        &store,
        ClaimSpec {
            queues: vec!["jobs".into(), "other".into()],
            ..spec(&w1, "jobs", 10)
        },
    )
    .await;
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].task.id, elsewhere.id);

    let events = events_after(&store, before).await;
    let claimed: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topics::TASK_CLAIMED)
        .collect();
    assert_eq!(claimed.len(), 4, "one event per claim call that got tasks");
    assert_eq!(claimed[0].data["by"], w1.as_str());
    assert_eq!(claimed[0].source.instance.as_deref(), Some(w1.as_str()));
    assert_eq!(claimed[0].source.entity.as_deref(), Some("workers"));
    assert_eq!(claimed[0].data["tasks"].as_array().unwrap().len(), 4);
    assert_eq!(claimed[2].data["by"], w2.as_str());
    assert_eq!(
        task_events(&events)[2],
        ev(topics::TASK_CLAIMED, one(&for_w2.id, "running"))
    );
}

async fn claims_need_a_live_instance(store: DynStore) {
    enqueue_one(&store, task("jobs")).await;
    let refused = |store: DynStore, id: String| async move {
        let seq = store.last_event_seq().await.unwrap();
        expect_err(
            store.claim_tasks(spec(&id, "jobs", 1)).await,
            ErrorCode::UnknownInstance,
        );
        assert_eq!(
            store.last_event_seq().await.unwrap(),
            seq,
            "nothing announced"
        );
    };
    refused(store.clone(), "ins_nobody".into()).await;
    let w = register(&store, "workers", Role::Secondary, Some("short")).await;
    store
        .close_instance(&w.instance.id, &admin())
        .await
        .unwrap();
    refused(store.clone(), w.instance.id.clone()).await;
    // A live record whose lease has lapsed (nobody reaped it yet) cannot claim.
    let lapsed = register_with(
        &store,
        request("workers", Role::Secondary, Some("lapsed")),
        1_000,
    )
    .await
    .instance;
    wait_until_past(&store, lapsed.lease_until.millis()).await;
    refused(store.clone(), lapsed.id.clone()).await;
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats[0].pending, stats[0].running), (1, 0));
}

async fn only_a_live_labelled_instance_enqueues_or_claims_as_itself(store: DynStore) {
    let as_instance = |id: &str| EventSource {
        instance: Some(id.to_string()),
        entity: Some("workers".into()),
        token: Some("tok_session".into()),
    };
    let ghost = register(&store, "workers", Role::Secondary, None)
        .await
        .instance;
    let ended = register(&store, "workers", Role::Secondary, Some("ended"))
        .await
        .instance;
    store.close_instance(&ended.id, &admin()).await.unwrap();
    let seq = store.last_event_seq().await.unwrap();
    let refused = [
        (ghost.id.as_str(), ErrorCode::Forbidden),
        (ended.id.as_str(), ErrorCode::UnknownInstance),
        ("ins_nobody", ErrorCode::UnknownInstance),
    ];
    for (id, code) in refused {
        let mut keyed = task("jobs");
        keyed.idempotency_key = Some(format!("key-{id}"));
        expect_err(
            store
                .enqueue(vec![task("jobs"), keyed], as_instance(id))
                .await,
            code,
        );
    }
    assert!(
        store.queue_stats().await.unwrap().is_empty(),
        "nothing enqueued"
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        seq,
        "nothing announced"
    );

    // A labelled secondary and an unlabelled primary are writers.
    let labelled = worker(&store, "labelled").await;
    let primary = register(&store, "solo", Role::Primary, None).await.instance;
    for id in [labelled.as_str(), primary.id.as_str()] {
        let out = store
            .enqueue(vec![task("jobs")], as_instance(id))
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
    }
    // The ghost may not claim them either, and its refusal holds nothing.
    expect_err(
        store.claim_tasks(spec(&ghost.id, "jobs", 2)).await,
        ErrorCode::Forbidden,
    );
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats[0].pending, stats[0].running), (2, 0));
    assert_eq!(claim(&store, spec(&labelled, "jobs", 2)).await.len(), 2);
    assert_stats_match_tasks(&store).await;
}

async fn task_heartbeat_extends_the_lease_and_records_progress(store: DynStore) {
    let w = worker(&store, "w").await;
    let t = enqueue_one(&store, task("jobs")).await;
    let c = claim(
        &store,
        ClaimSpec {
            lease_ms: Some(10_000),
            ..spec(&w, "jobs", 1)
        },
    )
    .await
    .remove(0);
    let before = store.last_event_seq().await.unwrap();
    let t0 = store.now_ms().await.unwrap();
    let until = store
        .heartbeat_task(&t.id, &c.claim, Some(json!({"pct": 50})))
        .await
        .unwrap();
    let t1 = store.now_ms().await.unwrap();
    assert_lease(until, t0, t1, 10_000);
    let got = get(&store, &t.id).await;
    assert_eq!(got.lease_until, Some(Timestamp(until)));
    assert_eq!(got.progress, Some(json!({"pct": 50})));
    assert_eq!(got.state, TaskState::Running);
    // No progress keeps the last one.
    store.heartbeat_task(&t.id, &c.claim, None).await.unwrap();
    assert_eq!(get(&store, &t.id).await.progress, Some(json!({"pct": 50})));
    let e = expect_err(
        store.heartbeat_task(&t.id, "clm_forged", None).await,
        ErrorCode::StaleClaim,
    );
    assert_eq!(e.details["task"], t.id.as_str());
    expect_err(
        store.heartbeat_task("tsk_missing", &c.claim, None).await,
        ErrorCode::NotFound,
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        before,
        "a heartbeat is not a transition"
    );
}

async fn complete_one_by_one_and_in_batches(store: DynStore) {
    let w = worker(&store, "w").await;
    let tasks = enqueue(&store, vec![task("jobs"), task("jobs"), task("jobs")]).await;
    let got = claim(&store, spec(&w, "jobs", 3)).await;
    assert_eq!(got.len(), 3);
    let before = store.last_event_seq().await.unwrap();
    let t0 = store.now_ms().await.unwrap();
    let out = store.complete_tasks(mixed_completions(&got)).await.unwrap();
    let t1 = store.now_ms().await.unwrap();
    assert_eq!(out.len(), 4, "one outcome per item, in order");
    let done = out[0].as_ref().unwrap();
    assert_eq!(done.id, got[0].task.id);
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result, Some(json!({"ok": 1})));
    assert_eq!(done.lease_until, None);
    let at = done.completed_at.unwrap().millis();
    assert!((t0..=t1).contains(&at));
    assert_eq!(&get(&store, &done.id).await, done);
    assert_eq!(
        out[1].as_ref().unwrap_err().code,
        ErrorCode::StaleClaim,
        "a wrong claim fails its item only"
    );
    assert_eq!(get(&store, &got[1].task.id).await, got[1].task);
    assert_eq!(
        out[2].as_ref().unwrap().result,
        Some(json!("done")),
        "later items still complete"
    );
    assert_eq!(out[3].as_ref().unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(
        task_events(&events_after(&store, before).await),
        [ev(
            topics::TASK_COMPLETED,
            vec![
                (got[0].task.id.clone(), "completed".into()),
                (got[2].task.id.clone(), "completed".into())
            ]
        )]
    );
    // Completing twice: the claim is no longer current.
    let again = store
        .complete_tasks(vec![completion(&got[0], json!(2))])
        .await
        .unwrap();
    let e = again[0].as_ref().unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleClaim);
    assert_eq!(e.details["state"], "completed");
    assert_eq!(
        get(&store, &got[0].task.id).await.result,
        Some(json!({"ok": 1}))
    );
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats[0].completed, stats[0].running), (2, 1));
    assert_eq!(tasks.len(), 3);
    assert_stats_match_tasks(&store).await;
}

/// A worker's loop in one transaction: the completion and the next claim land
/// together, and when either is refused neither does.
async fn complete_and_claim_is_both_or_neither(store: DynStore) {
    let w = worker(&store, "w").await;
    let tasks = enqueue(&store, vec![task("jobs"), task("jobs"), task("jobs")]).await;
    let first = claim(&store, spec(&w, "jobs", 1)).await.remove(0);
    assert_eq!(first.task.id, tasks[0].id);
    let before = store.last_event_seq().await.unwrap();
    let (done, next) = store
        .complete_and_claim(completion(&first, json!("r1")), spec(&w, "jobs", 1))
        .await
        .unwrap();
    assert_eq!(done.id, tasks[0].id);
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result, Some(json!("r1")));
    assert_eq!(next.len(), 1);
    let second = next[0].clone();
    assert_eq!(
        second.task.id, tasks[1].id,
        "the next in order, not the one completed"
    );
    assert_eq!(second.task.state, TaskState::Running);
    assert_eq!(second.task.claimed_by.as_deref(), Some(w.as_str()));
    assert_eq!(&get(&store, &second.task.id).await, &second.task);
    let announced = task_events(&events_after(&store, before).await);
    assert_eq!(announced.len(), 2, "{announced:?}");
    assert!(announced.contains(&ev(topics::TASK_COMPLETED, one(&tasks[0].id, "completed"))));
    assert!(announced
        .iter()
        .any(|(topic, _)| topic == topics::TASK_CLAIMED));

    // A stale claim: nothing completes and nothing is claimed.
    let before = store.last_event_seq().await.unwrap();
    expect_err(
        store
            .complete_and_claim(completion(&first, json!("again")), spec(&w, "jobs", 1))
            .await,
        ErrorCode::StaleClaim,
    );
    assert_eq!(get(&store, &tasks[2].id).await, tasks[2], "still pending");
    // A claimer that may not claim: the completion is undone with it.
    expect_err(
        store
            .complete_and_claim(
                completion(&second, json!("r2")),
                spec("ins_nobody", "jobs", 1),
            )
            .await,
        ErrorCode::UnknownInstance,
    );
    assert_eq!(
        get(&store, &second.task.id).await,
        second.task,
        "still running, same claim"
    );
    assert_eq!(get(&store, &tasks[2].id).await, tasks[2]);
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        before,
        "nothing announced"
    );

    // Nothing left to claim: the completion stands alone.
    let (done, next) = store
        .complete_and_claim(completion(&second, json!("r2")), spec(&w, "empty", 1))
        .await
        .unwrap();
    assert_eq!((done.state, next.len()), (TaskState::Completed, 0));
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(
        (stats[0].completed, stats[0].running, stats[0].pending),
        (2, 0, 1)
    );
    assert_stats_match_tasks(&store).await;
}

/// The batch form: each item keeps its own outcome, the claim lands with them,
/// and a refused claim undoes the completions too.
async fn a_batch_completion_claims_the_next_in_the_same_transaction(store: DynStore) {
    let w = worker(&store, "w").await;
    let tasks = enqueue(&store, (0..4).map(|_| task("jobs")).collect()).await;
    let got = claim(&store, spec(&w, "jobs", 2)).await;
    assert_eq!(got.len(), 2);
    // A refused claim: nothing completes.
    let before = store.last_event_seq().await.unwrap();
    expect_err(
        store
            .complete_outcomes_and_claim(
                vec![completion(&got[0], json!(1))],
                spec("ins_nobody", "jobs", 2),
            )
            .await,
        ErrorCode::UnknownInstance,
    );
    assert_eq!(get(&store, &got[0].task.id).await, got[0].task);
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        before,
        "nothing announced"
    );
    // One good item, one stale: the good one completes, the next two are claimed.
    let stale = Completion {
        claim: "clm_stale".into(),
        ..completion(&got[1], json!(2))
    };
    let (out, next) = store
        .complete_outcomes_and_claim(
            vec![completion(&got[0], json!(1)), stale],
            spec(&w, "jobs", 2),
        )
        .await
        .unwrap();
    assert!(out[0].is_ok());
    assert_eq!(out[1].as_ref().unwrap_err().code, ErrorCode::StaleClaim);
    assert_eq!(
        get(&store, &got[0].task.id).await.state,
        TaskState::Completed
    );
    assert_eq!(
        get(&store, &got[1].task.id).await,
        got[1].task,
        "still running"
    );
    let ids: Vec<&str> = next.iter().map(|t| t.task.id.as_str()).collect();
    assert_eq!(ids, [tasks[2].id.as_str(), tasks[3].id.as_str()]);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(
        (stats[0].completed, stats[0].running, stats[0].pending),
        (1, 3, 0)
    );
    assert_stats_match_tasks(&store).await;
}

/// The batch route's completion answers outcomes only; what it changes and
/// announces is what `complete_tasks` would have.
async fn completing_for_outcomes_changes_and_announces_the_same(store: DynStore) {
    let w = worker(&store, "w").await;
    enqueue(&store, vec![task("jobs"), task("jobs"), task("jobs")]).await;
    let got = claim(&store, spec(&w, "jobs", 3)).await;
    let before = store.last_event_seq().await.unwrap();
    let out = store
        .complete_outcomes(mixed_completions(&got))
        .await
        .unwrap();
    assert_eq!(out.len(), 4, "one outcome per item, in order");
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    assert_eq!(out[1].as_ref().unwrap_err().code, ErrorCode::StaleClaim);
    assert_eq!(out[3].as_ref().unwrap_err().code, ErrorCode::NotFound);
    for (c, result) in [(&got[0], json!({"ok": 1})), (&got[2], json!("done"))] {
        let t = get(&store, &c.task.id).await;
        assert_eq!((t.state, t.result), (TaskState::Completed, Some(result)));
        assert_eq!(t.lease_until, None);
    }
    assert_eq!(get(&store, &got[1].task.id).await, got[1].task, "unchanged");
    let events = events_after(&store, before).await;
    assert_eq!(
        task_events(&events),
        [ev(
            topics::TASK_COMPLETED,
            vec![
                (got[0].task.id.clone(), "completed".into()),
                (got[2].task.id.clone(), "completed".into())
            ]
        )]
    );
    assert_eq!(events[0].source.instance.as_deref(), Some(w.as_str()));
    assert_eq!(events[0].data["tasks"][1]["queue"], "jobs");
    let again = store
        .complete_outcomes(vec![completion(&got[0], json!(2))])
        .await
        .unwrap();
    assert_eq!(again[0].as_ref().unwrap_err().code, ErrorCode::StaleClaim);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats[0].completed, stats[0].running), (2, 1));
    assert_stats_match_tasks(&store).await;
}

async fn stale_claims_are_refused_and_change_nothing(store: DynStore) {
    let w1 = worker(&store, "w1").await;
    let w2 = worker(&store, "w2").await;
    let t = enqueue_one(&store, task("jobs")).await;
    let old = claim(
        &store,
        ClaimSpec {
            lease_ms: Some(50),
            ..spec(&w1, "jobs", 1)
        },
    )
    .await
    .remove(0);
    wait_until_past(&store, old.task.lease_until.unwrap().millis()).await;
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 1);
    let new = claim(&store, spec(&w2, "jobs", 1)).await.remove(0);
    assert_eq!(new.task.id, t.id);
    assert_eq!(new.task.attempt, 2);
    assert_eq!(new.task.claimed_by.as_deref(), Some(w2.as_str()));
    assert_ne!(new.claim, old.claim);

    // The first worker wakes up and tries everything with its lapsed claim.
    let snapshot = get(&store, &t.id).await;
    let seq = store.last_event_seq().await.unwrap();
    let e = expect_err(
        store
            .heartbeat_task(&t.id, &old.claim, Some(json!("mine")))
            .await,
        ErrorCode::StaleClaim,
    );
    assert_eq!(e.details, json!({"task": t.id, "state": "running"}));
    let out = store
        .complete_tasks(vec![completion(&old, json!("by w1"))])
        .await
        .unwrap();
    assert_eq!(out[0].as_ref().unwrap_err().code, ErrorCode::StaleClaim);
    expect_err(
        store
            .fail_task(&t.id, &old.claim, "w1 gives up", true)
            .await,
        ErrorCode::StaleClaim,
    );
    expect_err(
        store
            .fail_task(&t.id, &old.claim, "w1 gives up", false)
            .await,
        ErrorCode::StaleClaim,
    );
    assert_eq!(get(&store, &t.id).await, snapshot, "nothing changed");
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        seq,
        "nothing announced"
    );

    // The current claim still works, and once it is done every claim is stale.
    store
        .complete_tasks(vec![completion(&new, json!("by w2"))])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    expect_err(
        store.fail_task(&t.id, &new.claim, "late", true).await,
        ErrorCode::StaleClaim,
    );
    expect_err(
        store.heartbeat_task(&t.id, &new.claim, None).await,
        ErrorCode::StaleClaim,
    );
    let done = get(&store, &t.id).await;
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result, Some(json!("by w2")));
    assert_stats_match_tasks(&store).await;
}

async fn failures_retry_with_backoff_then_die(store: DynStore) {
    let w = worker(&store, "w").await;
    let mut t = task("flaky");
    t.max_attempts = 3;
    t.backoff_ms = 400;
    let t = enqueue_one(&store, t).await;
    let before = store.last_event_seq().await.unwrap();

    // Attempt 1 fails: retried after the backoff, not before.
    let c = claim(&store, spec(&w, "flaky", 1)).await.remove(0);
    let f0 = store.now_ms().await.unwrap();
    let failed = store
        .fail_task(&t.id, &c.claim, "timeout talking to k2", true)
        .await
        .unwrap();
    let f1 = store.now_ms().await.unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.error.as_deref(), Some("timeout talking to k2"));
    assert_eq!(failed.attempt, 1);
    assert_eq!(
        (failed.claimed_by.as_deref(), failed.lease_until),
        (None, None)
    );
    let retry_at = failed.not_before.unwrap().millis();
    assert_lease(retry_at, f0, f1, 400);
    assert_eq!(get(&store, &t.id).await, failed);
    assert!(
        claim(&store, spec(&w, "flaky", 1)).await.is_empty(),
        "not claimable during its backoff"
    );
    wait_until_past(&store, retry_at).await;

    // Attempt 2 fails: the backoff doubles.
    let c = claim(&store, spec(&w, "flaky", 1)).await.remove(0);
    assert_eq!(c.task.attempt, 2);
    let f0 = store.now_ms().await.unwrap();
    let failed = store
        .fail_task(&t.id, &c.claim, "again", true)
        .await
        .unwrap();
    let f1 = store.now_ms().await.unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    let retry_at = failed.not_before.unwrap().millis();
    assert_lease(retry_at, f0, f1, 800);
    // A failed task that comes due is pending again, for the stats and listings.
    wait_until_past(&store, retry_at).await;
    assert!(store.requeue_lapsed(100).await.unwrap() >= 1);
    assert_eq!(get(&store, &t.id).await.state, TaskState::Pending);

    // Attempt 3 of 3 fails: dead, whatever `retry` says.
    let c = claim(&store, spec(&w, "flaky", 1)).await.remove(0);
    assert_eq!(c.task.attempt, 3);
    let dead = store
        .fail_task(&t.id, &c.claim, "third time", true)
        .await
        .unwrap();
    assert_eq!(dead.state, TaskState::Dead);
    assert_eq!(dead.error.as_deref(), Some("third time"));
    assert!(dead.completed_at.is_some());
    assert!(claim(&store, spec(&w, "flaky", 1)).await.is_empty());

    let events = events_after(&store, before).await;
    let topics: Vec<&str> = topics_of(&events)
        .into_iter()
        .filter(|t| t.starts_with("sys.task."))
        .collect();
    assert_eq!(
        topics,
        [
            topics::TASK_CLAIMED,
            topics::TASK_FAILED,
            topics::TASK_CLAIMED,
            topics::TASK_FAILED,
            topics::TASK_CLAIMED,
            topics::TASK_DEAD
        ]
    );
    let failed_ev = events
        .iter()
        .find(|e| e.topic == topics::TASK_FAILED)
        .unwrap();
    assert_eq!(failed_ev.data["error"], "timeout talking to k2");
    assert!(failed_ev.data["retry_at"].is_i64());
    assert_eq!(
        task_events(&events).last().unwrap(),
        &ev(topics::TASK_DEAD, one(&t.id, "dead"))
    );

    // `retry: false` kills at once, and a dead task cancels what depends on it.
    let hopeless = enqueue_one(&store, task("flaky")).await;
    let mut child = task("flaky");
    child.depends_on = vec![hopeless.id.clone()];
    let child = enqueue_one(&store, child).await;
    let before = store.last_event_seq().await.unwrap();
    let c = claim(&store, spec(&w, "flaky", 1)).await.remove(0);
    assert_eq!(c.task.id, hopeless.id);
    let dead = store
        .fail_task(&hopeless.id, &c.claim, "bad input", false)
        .await
        .unwrap();
    assert_eq!((dead.state, dead.attempt), (TaskState::Dead, 1));
    let child = get(&store, &child.id).await;
    assert_eq!(child.state, TaskState::Cancelled);
    let why = child.error.unwrap();
    assert!(
        why.contains(&hopeless.id) && why.contains("dead"),
        "the reason names the dependency: {why}"
    );
    let evs = task_events(&events_after(&store, before).await);
    assert!(evs.contains(&ev(topics::TASK_DEAD, one(&hopeless.id, "dead"))));
    assert!(evs.contains(&ev(topics::TASK_CANCELLED, one(&child.id, "cancelled"))));
    assert_stats_match_tasks(&store).await;
}

async fn cancel_stops_a_task_and_cascades_to_dependents(store: DynStore) {
    let w = worker(&store, "w").await;
    let root = enqueue_one(&store, task("chain")).await;
    let mut mid = task("chain");
    mid.depends_on = vec![root.id.clone()];
    let mid = enqueue_one(&store, mid).await;
    let mut leaf = task("chain");
    leaf.depends_on = vec![mid.id.clone()];
    let leaf = enqueue_one(&store, leaf).await;
    let side = enqueue_one(&store, task("chain")).await;
    let before = store.last_event_seq().await.unwrap();

    let cancelled = store.cancel_task(&root.id, "tok_ops").await.unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert_eq!(cancelled.error.as_deref(), Some("cancelled by tok_ops"));
    assert!(cancelled.completed_at.is_some());
    let mid_now = get(&store, &mid.id).await;
    assert_eq!(mid_now.state, TaskState::Cancelled);
    assert_eq!(
        mid_now.error.as_deref(),
        Some(format!("cancelled: dependency {} is cancelled", root.id).as_str())
    );
    let leaf_now = get(&store, &leaf.id).await;
    assert_eq!(
        leaf_now.state,
        TaskState::Cancelled,
        "the cascade is transitive"
    );
    assert!(leaf_now.error.unwrap().contains(&mid.id));
    assert_eq!(get(&store, &side.id).await.state, TaskState::Pending);
    let events = events_after(&store, before).await;
    let evs = task_events(&events);
    assert_eq!(evs.len(), 3, "{evs:?}");
    for id in [&root.id, &mid.id, &leaf.id] {
        assert!(evs.contains(&ev(topics::TASK_CANCELLED, one(id, "cancelled"))));
    }
    let by = events
        .iter()
        .find(|e| e.data["tasks"][0]["id"] == root.id.as_str())
        .unwrap();
    assert_eq!(by.data["by"], "tok_ops");

    // A running task can be cancelled: its claim dies with it.
    let c = claim(&store, spec(&w, "chain", 1)).await.remove(0);
    assert_eq!(c.task.id, side.id);
    store.cancel_task(&side.id, "tok_ops").await.unwrap();
    let out = store
        .complete_tasks(vec![completion(&c, json!(1))])
        .await
        .unwrap();
    assert_eq!(out[0].as_ref().unwrap_err().code, ErrorCode::StaleClaim);
    let side_now = get(&store, &side.id).await;
    assert_eq!(side_now.state, TaskState::Cancelled);
    assert_eq!(side_now.claimed_by, None);

    // Final tasks cannot be cancelled; unknown ones are not found.
    let seq = store.last_event_seq().await.unwrap();
    let e = expect_err(
        store.cancel_task(&root.id, "tok_ops").await,
        ErrorCode::Conflict,
    );
    assert_eq!(e.details["state"], "cancelled");
    expect_err(
        store.cancel_task("tsk_missing", "tok_ops").await,
        ErrorCode::NotFound,
    );
    assert_eq!(store.last_event_seq().await.unwrap(), seq);
    assert_stats_match_tasks(&store).await;
}

async fn dependencies_gate_claims(store: DynStore) {
    let w = worker(&store, "w").await;
    let a1 = task("dag");
    let a2 = task("dag");
    let mut b = task("dag");
    b.priority = 100; // would be first if it were claimable
    b.depends_on = vec![a1.id.clone(), a2.id.clone()];
    // Dependencies may be enqueued in the same batch, before their dependents.
    let out = enqueue(&store, vec![a1.clone(), a2.clone(), b.clone()]).await;
    assert_eq!(
        out[2].depends_on.iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([&a1.id, &a2.id])
    );
    assert_eq!(out[2].state, TaskState::Pending);

    let got = claim(&store, spec(&w, "dag", 10)).await;
    let ids: BTreeSet<&str> = got.iter().map(|c| c.task.id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from([a1.id.as_str(), a2.id.as_str()]));
    let (c1, c2) = if got[0].task.id == a1.id {
        (&got[0], &got[1])
    } else {
        (&got[1], &got[0])
    };
    store
        .complete_tasks(vec![completion(c1, json!(1))])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(
        claim(&store, spec(&w, "dag", 10)).await.is_empty(),
        "one dependency is still running"
    );
    // A dependency that fails and will retry keeps the dependent waiting.
    let f = store
        .fail_task(&a2.id, &c2.claim, "oops", true)
        .await
        .unwrap();
    assert_eq!(f.state, TaskState::Failed);
    assert_eq!(get(&store, &b.id).await.state, TaskState::Pending);
    wait_until_past(&store, f.not_before.unwrap().millis()).await;
    let c2 = claim(&store, spec(&w, "dag", 10)).await.remove(0);
    assert_eq!(c2.task.id, a2.id, "the retry, not the dependent");
    store
        .complete_tasks(vec![completion(&c2, json!(2))])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let got = claim(&store, spec(&w, "dag", 10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].task.id, b.id,
        "claimable once all dependencies completed"
    );

    // An unknown dependency is refused, and the whole batch with it.
    let seq = store.last_event_seq().await.unwrap();
    let fine = task("dag");
    let mut bad = task("dag");
    bad.depends_on = vec![a1.id.clone(), "tsk_nonexistent".into()];
    let e = expect_err(
        store.enqueue(vec![fine.clone(), bad], source()).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "depends_on[1]");
    assert_eq!(store.get_task(&fine.id).await.unwrap(), None);
    assert_eq!(store.last_event_seq().await.unwrap(), seq);

    // Depending on a task that is already cancelled: cancelled at once, and said so.
    let gone = enqueue_one(&store, task("dag")).await;
    store.cancel_task(&gone.id, "tok_ops").await.unwrap();
    let mut orphan = task("dag");
    orphan.depends_on = vec![gone.id.clone()];
    let before = store.last_event_seq().await.unwrap();
    let orphan = store
        .enqueue(vec![orphan], source())
        .await
        .unwrap()
        .remove(0)
        .0;
    assert_eq!(orphan.state, TaskState::Cancelled);
    assert!(orphan.error.as_deref().unwrap().contains(&gone.id));
    assert_eq!(
        task_events(&events_after(&store, before).await),
        [
            ev(topics::TASK_ENQUEUED, one(&orphan.id, "cancelled")),
            ev(topics::TASK_CANCELLED, one(&orphan.id, "cancelled"))
        ]
    );
    assert!(claim(&store, spec(&w, "dag", 10)).await.is_empty());
    assert_stats_match_tasks(&store).await;
}

async fn lapsed_claims_return_to_pending_or_die(store: DynStore) {
    let w = worker(&store, "w").await;
    let mut t = task("jobs");
    t.max_attempts = 2;
    let t = enqueue_one(&store, t).await;
    let short = |w: &str| ClaimSpec {
        lease_ms: Some(50),
        ..spec(w, "jobs", 1)
    };
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 0);
    let c = claim(&store, short(&w)).await.remove(0);
    wait_until_past(&store, c.task.lease_until.unwrap().millis()).await;
    let before = store.last_event_seq().await.unwrap();
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 1);
    let back = get(&store, &t.id).await;
    assert_eq!(back.state, TaskState::Pending);
    assert_eq!(back.attempt, 1, "the lost attempt counts");
    assert_eq!((back.claimed_by.as_deref(), back.lease_until), (None, None));
    assert_eq!(back.error.as_deref(), Some("claim lease expired"));
    let evs = events_after(&store, before).await;
    assert_eq!(
        task_events(&evs),
        [ev(topics::TASK_REQUEUED, one(&t.id, "pending"))]
    );
    assert_eq!(evs[0].data["reason"], "claim lease expired");
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 0, "once");

    // Lapsing on the last attempt: dead.
    let c = claim(&store, short(&w)).await.remove(0);
    assert_eq!(c.task.attempt, 2);
    wait_until_past(&store, c.task.lease_until.unwrap().millis()).await;
    let before = store.last_event_seq().await.unwrap();
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 1);
    let dead = get(&store, &t.id).await;
    assert_eq!(dead.state, TaskState::Dead);
    assert!(dead.error.unwrap().contains("out of attempts (2/2)"));
    assert_eq!(
        task_events(&events_after(&store, before).await),
        [ev(topics::TASK_DEAD, one(&t.id, "dead"))]
    );

    // A scheduled task becomes pending once due.
    let now = store.now_ms().await.unwrap();
    let mut s = task("jobs");
    s.not_before = Some(now + 1_000);
    let s = enqueue_one(&store, s).await;
    assert_eq!(s.state, TaskState::Scheduled);
    wait_until_past(&store, now + 1_000).await;
    assert_eq!(store.requeue_lapsed(100).await.unwrap(), 1);
    assert_eq!(get(&store, &s.id).await.state, TaskState::Pending);

    // The limit bounds one sweep; the next sweep takes the rest.
    let many = enqueue(&store, (0..5).map(|_| task("bulk")).collect()).await;
    let got = claim(
        &store,
        ClaimSpec {
            lease_ms: Some(50),
            ..spec(&w, "bulk", 5)
        },
    )
    .await;
    assert_eq!(got.len(), many.len());
    let last_lease = got
        .iter()
        .map(|c| c.task.lease_until.unwrap().millis())
        .max()
        .unwrap();
    wait_until_past(&store, last_lease).await;
    assert_eq!(store.requeue_lapsed(3).await.unwrap(), 3);
    assert_eq!(store.requeue_lapsed(3).await.unwrap(), 2);
    assert_eq!(store.requeue_lapsed(3).await.unwrap(), 0);
    assert_stats_match_tasks(&store).await;
}

async fn ending_an_instance_releases_its_tasks(store: DynStore) {
    let w = worker(&store, "closer").await;
    let keep = enqueue_one(&store, task("jobs")).await;
    let mut last = task("jobs");
    last.max_attempts = 1;
    let last = enqueue_one(&store, last).await;
    let got = claim(&store, spec(&w, "jobs", 2)).await;
    assert_eq!(got.len(), 2);
    let before = store.last_event_seq().await.unwrap();

    // Closed: its tasks go back at once (or die on their last attempt).
    store.close_instance(&w, &admin()).await.unwrap();
    let back = get(&store, &keep.id).await;
    assert_eq!(back.state, TaskState::Pending);
    assert_eq!(back.attempt, 1);
    assert_eq!(back.claimed_by, None);
    assert_eq!(
        back.error.as_deref(),
        Some(format!("claimer {w} ended").as_str())
    );
    let dead = get(&store, &last.id).await;
    assert_eq!(dead.state, TaskState::Dead);
    assert!(dead.error.unwrap().contains("out of attempts (1/1)"));
    let evs = task_events(&events_after(&store, before).await);
    assert!(evs.contains(&ev(topics::TASK_REQUEUED, one(&keep.id, "pending"))));
    assert!(evs.contains(&ev(topics::TASK_DEAD, one(&last.id, "dead"))));
    // The closed worker's claims are stale.
    let out = store
        .complete_tasks(got.iter().map(|c| completion(c, json!(1))).collect())
        .await
        .unwrap();
    assert!(out
        .iter()
        .all(|r| r.as_ref().unwrap_err().code == ErrorCode::StaleClaim));

    // Expired by the durable sweep: the same.
    let quick = register_with(
        &store,
        request("workers", Role::Secondary, Some("quick")),
        1_000,
    )
    .await
    .instance;
    let c = claim(&store, spec(&quick.id, "jobs", 1)).await.remove(0);
    assert_eq!((c.task.id.as_str(), c.task.attempt), (keep.id.as_str(), 2));
    wait_until_past(&store, quick.lease_until.millis()).await;
    let expired = store.expire_due(100).await.unwrap();
    assert_eq!(expired.len(), 1);
    let back = get(&store, &keep.id).await;
    assert_eq!((back.state, back.attempt), (TaskState::Pending, 2));

    // Expired from a replica's memory (expire_owned): the same.
    let owned = worker(&store, "owned").await;
    let c = claim(&store, spec(&owned, "jobs", 1)).await.remove(0);
    assert_eq!(c.task.attempt, 3);
    assert!(store.expire_owned(&owned, "hub-a").await.unwrap().is_some());
    let dead = get(&store, &keep.id).await;
    assert_eq!(dead.state, TaskState::Dead, "third of three attempts lost");
    assert_stats_match_tasks(&store).await;
}

async fn schedules_fire_once_per_due_time(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let now = store.now_ms().await.unwrap();
    let due = now - 1_000;
    let nightly = |priority: i32, next_due: i64| ScheduleSpec {
        name: "nightly".into(),
        queue: "cron".into(),
        payload: json!({"report": "daily"}),
        every_ms: Some(60_000),
        cron: None,
        priority,
        requires: vec!["code".into()],
        max_attempts: 2,
        next_due,
    };
    let s = store.put_schedule(nightly(3, due)).await.unwrap();
    assert_eq!(s.name, "nightly");
    assert_eq!(
        (s.queue.as_str(), s.priority, s.max_attempts),
        ("cron", 3, 2)
    );
    assert_eq!((s.every_ms, s.cron.as_deref()), (Some(60_000), None));
    assert_eq!(s.next_due, Timestamp(due));
    assert_eq!(s.last_enqueued_at, None);
    // Put again: an update, not a second schedule.
    let s = store.put_schedule(nightly(4, due)).await.unwrap();
    assert_eq!(s.priority, 4);
    let later = store
        .put_schedule(ScheduleSpec {
            name: "weekly".into(),
            every_ms: None,
            cron: Some("0 3 * * 1".into()),
            next_due: now + 3_600_000,
            ..nightly(0, 0)
        })
        .await
        .unwrap();
    assert_eq!(later.cron.as_deref(), Some("0 3 * * 1"));
    let names: Vec<String> = store
        .list_schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["nightly", "weekly"]);
    let due_now: Vec<String> = store
        .due_schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(due_now, ["nightly"]);

    // Two callers fire the same due time at once: one task.
    let barrier = Arc::new(Barrier::new(2));
    let fires: Vec<_> = (0..2)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.fire_schedule("nightly", due, due + 60_000).await
            })
        })
        .collect();
    let mut fired = Vec::new();
    for f in fires {
        if let Some(t) = f.await.unwrap().unwrap() {
            fired.push(t);
        }
    }
    assert_eq!(fired.len(), 1, "fired once: {fired:?}");
    let t = &fired[0];
    assert_eq!(t.queue, "cron");
    assert_eq!(t.payload, json!({"report": "daily"}));
    assert_eq!((t.priority, t.max_attempts), (4, 2));
    assert_eq!(t.requires, ["code"]);
    assert_eq!(
        t.idempotency_key.as_deref(),
        Some(format!("schedule:nightly:{due}").as_str())
    );
    let s = store
        .list_schedules()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "nightly")
        .unwrap();
    assert_eq!(s.next_due, Timestamp(due + 60_000));
    assert!(s.last_enqueued_at.is_some());
    assert!(store.due_schedules().await.unwrap().is_empty());
    // Firing a due time that has passed, or an unknown schedule: nothing.
    assert_eq!(
        store
            .fire_schedule("nightly", due, due + 60_000)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.fire_schedule("nobody", due, due + 1).await.unwrap(),
        None
    );
    // A schedule set back to a due time it already fired (an edit, a restore
    // from backup) does not enqueue that due time twice: the idempotency key.
    store.put_schedule(nightly(4, due)).await.unwrap();
    let again = store
        .fire_schedule("nightly", due, due + 60_000)
        .await
        .unwrap()
        .expect("the schedule moves on");
    assert_eq!(again.id, t.id, "the same task, not a second one");
    let in_queue = store
        .list_tasks(TaskFilter {
            queue: Some("cron".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(in_queue.len(), 1);

    assert!(store.delete_schedule("weekly").await.unwrap());
    assert!(!store.delete_schedule("weekly").await.unwrap());
    let names: Vec<String> = store
        .list_schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["nightly"]);

    let events = events_after(&store, before).await;
    let changed: Vec<(&str, bool)> = events
        .iter()
        .filter(|e| e.topic == topics::SCHEDULE_CHANGED)
        .map(|e| {
            (
                e.data["name"].as_str().unwrap(),
                e.data["deleted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        [
            ("nightly", false),
            ("nightly", false),
            ("weekly", false),
            ("nightly", false),
            ("weekly", true)
        ]
    );
    let enq: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == topics::TASK_ENQUEUED)
        .collect();
    assert_eq!(enq.len(), 1, "one enqueue announced");
    assert_eq!(enq[0].source.token.as_deref(), Some("schedule:nightly"));
    assert_stats_match_tasks(&store).await;
}

async fn prune_removes_old_finished_tasks(store: DynStore) {
    let w = worker(&store, "w").await;
    let done = enqueue_one(&store, task("jobs")).await;
    let gone = enqueue_one(&store, task("jobs")).await;
    let mut waiting = task("jobs");
    waiting.depends_on = vec![done.id.clone()];
    let waiting = enqueue_one(&store, waiting).await;
    let c = claim(&store, spec(&w, "jobs", 1)).await.remove(0);
    assert_eq!(c.task.id, done.id);
    let finished = store
        .complete_tasks(vec![completion(&c, json!(1))])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let cancelled = store.cancel_task(&gone.id, "tok_ops").await.unwrap();
    assert_eq!(store.prune_tasks(3_600_000).await.unwrap(), 0, "too recent");
    let newest = finished
        .completed_at
        .unwrap()
        .millis()
        .max(cancelled.completed_at.unwrap().millis());
    wait_until_past(&store, newest).await;
    assert_eq!(store.prune_tasks(0).await.unwrap(), 2);
    assert_eq!(store.get_task(&done.id).await.unwrap(), None);
    assert_eq!(store.get_task(&gone.id).await.unwrap(), None);
    // What is not finished stays, and stays claimable: its dependency completed.
    let c = claim(&store, spec(&w, "jobs", 1)).await.remove(0);
    assert_eq!(c.task.id, waiting.id);
    assert_eq!(store.prune_tasks(0).await.unwrap(), 0);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(
        (stats[0].running, stats[0].completed, stats[0].cancelled),
        (1, 0, 0)
    );
    assert_stats_match_tasks(&store).await;
}

async fn concurrent_claimers_never_share_a_task(store: DynStore) {
    drain_race(vec![store.clone()], 400, 16).await;
    assert_stats_match_tasks(&store).await;
}

/// `claimers` workers, spread over the stores, drain `n` tasks at once with
/// batch claims of varying size while a reaper sweeps lapsed claims: every task
/// is claimed once and completed once, no completion is refused (a refusal
/// would mean two live claims on one task), and the queue ends empty.
pub async fn drain_race(stores: Vec<DynStore>, n: usize, claimers: usize) {
    let mut workers = Vec::new();
    for i in 0..claimers {
        let store = &stores[i % stores.len()];
        workers.push(worker(store, &format!("drainer {i}")).await);
    }
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        enqueue(
            &stores[0],
            chunk
                .iter()
                .map(|i| {
                    let mut t = task("drain");
                    t.priority = (*i % 3) as i32;
                    t.payload = json!({"n": i});
                    t
                })
                .collect(),
        )
        .await;
    }
    let before = stores[0].last_event_seq().await.unwrap();
    let claims: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let completions: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(claimers + 1));
    let reaper = {
        let (store, barrier) = (stores[stores.len() - 1].clone(), barrier.clone());
        let finished = finished.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let mut sweeps = 0;
            while !finished.load(Ordering::Relaxed) {
                store.requeue_lapsed(100).await.unwrap();
                sweeps += 1;
                tokio::task::yield_now().await;
            }
            sweeps
        })
    };
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let store = stores[i % stores.len()].clone();
            let (claims, completions, calls, barrier) = (
                claims.clone(),
                completions.clone(),
                calls.clone(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let max = 1 + (i % 4) as u32;
                loop {
                    calls.fetch_add(1, Ordering::Relaxed);
                    let got = store.claim_tasks(spec(&w, "drain", max)).await.unwrap();
                    if got.is_empty() {
                        return;
                    }
                    {
                        let mut claims = claims.lock().unwrap();
                        for c in &got {
                            claims
                                .entry(c.task.id.clone())
                                .or_default()
                                .push(c.claim.clone());
                        }
                    }
                    let items: Vec<Completion> = got
                        .iter()
                        .map(|c| completion(c, json!({"by": w})))
                        .collect();
                    let out = store.complete_tasks(items).await.unwrap();
                    let mut completions = completions.lock().unwrap();
                    for (c, r) in got.iter().zip(out) {
                        if let Err(e) = r {
                            panic!("{w} could not complete {}: {e:?}", c.task.id);
                        }
                        *completions.entry(c.task.id.clone()).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    finished.store(true, Ordering::Relaxed);
    let sweeps = reaper.await.unwrap();
    let claims = claims.lock().unwrap().clone();
    let completions = completions.lock().unwrap().clone();
    assert_eq!(claims.len(), n, "every task was claimed");
    let twice: Vec<_> = claims.iter().filter(|(_, c)| c.len() > 1).collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(completions.len(), n);
    assert!(
        completions.values().all(|&k| k == 1),
        "completed more than once"
    );
    let stats = stores[0].queue_stats().await.unwrap();
    let q = stats.iter().find(|q| q.name == "drain").unwrap();
    assert_eq!(
        (q.completed, q.pending, q.running),
        (n as u64, 0, 0),
        "the queue drained"
    );
    // The log says the same: each task claimed once and completed once.
    let events = stores[0].read_events(before, 1_000_000).await.unwrap();
    for topic in [topics::TASK_CLAIMED, topics::TASK_COMPLETED] {
        let mut seen = BTreeMap::<String, usize>::new();
        for (_, tasks) in task_events(&events).into_iter().filter(|(t, _)| t == topic) {
            for (id, _) in tasks {
                *seen.entry(id).or_default() += 1;
            }
        }
        assert_eq!(seen.len(), n, "{topic}");
        assert!(seen.values().all(|&k| k == 1), "{topic} once per task");
    }
    eprintln!(
        "{n} tasks drained by {claimers} claimers over {} store(s): {} claim calls, {sweeps} reaper sweeps",
        stores.len(),
        calls.load(Ordering::Relaxed)
    );
}

async fn a_claim_racing_the_claimers_end_leaves_nothing_held(store: DynStore) {
    end_race(vec![store]).await;
}

async fn a_dependent_racing_its_dependencys_death_is_cancelled(store: DynStore) {
    dependency_race(vec![store]).await;
}

const RACE_ROUNDS: usize = 25;

/// A worker claims while it is being closed, round after round: whichever
/// commits first, no task may be left running under the ended worker (that
/// would hold it until its lease ran out, DESIGN §4: an ended instance's claims
/// are released at once).
pub async fn end_race(stores: Vec<DynStore>) {
    for round in 0..RACE_ROUNDS {
        let (a, b) = (
            stores[round % stores.len()].clone(),
            stores[(round + 1) % stores.len()].clone(),
        );
        let w = worker(&a, &format!("racer {round}")).await;
        let queue = format!("race{round}");
        enqueue(&a, (0..4).map(|_| task(&queue)).collect()).await;
        let barrier = Arc::new(Barrier::new(2));
        let claimer = {
            let (w, queue, barrier) = (w.clone(), queue.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                a.claim_tasks(spec(&w, &queue, 4)).await
            })
        };
        let closer = {
            let (w, b2, barrier) = (w.clone(), b.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                b2.close_instance(&w, &admin()).await
            })
        };
        let claimed = claimer.await.unwrap();
        closer.await.unwrap().unwrap();
        match claimed {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code, ErrorCode::UnknownInstance, "{e:?}"),
        }
        let held: Vec<Task> = b
            .list_tasks(TaskFilter {
                queue: Some(queue.clone()),
                state: Some(TaskState::Running),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            held.is_empty(),
            "round {round}: tasks still held by the closed {w}: {held:?}"
        );
    }
}

/// A dependent is enqueued while its dependency is cancelled, round after
/// round: whichever commits first, the dependent must end up cancelled, never
/// pending forever behind a dead task.
pub async fn dependency_race(stores: Vec<DynStore>) {
    for round in 0..RACE_ROUNDS {
        let (a, b) = (
            stores[round % stores.len()].clone(),
            stores[(round + 1) % stores.len()].clone(),
        );
        let dep = enqueue_one(&a, task("deps")).await;
        let mut child = task("deps");
        child.depends_on = vec![dep.id.clone()];
        let child_id = child.id.clone();
        let barrier = Arc::new(Barrier::new(2));
        let enq = {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                a.enqueue(vec![child], source()).await
            })
        };
        let cancel = {
            let (b2, id) = (b.clone(), dep.id.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                b2.cancel_task(&id, "tok_ops").await
            })
        };
        enq.await.unwrap().unwrap();
        cancel.await.unwrap().unwrap();
        let child = get(&b, &child_id).await;
        assert_eq!(
            child.state,
            TaskState::Cancelled,
            "round {round}: the dependent of a cancelled task"
        );
    }
}
