use crate::harness::*;
use concord_client::Client;
use concord_core::api::{
    ClaimRequest, CompleteItem, EnqueueRequest, PutScheduleRequest, Role, TaskState,
};
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn task(queue: &str, payload: Value) -> EnqueueRequest {
    EnqueueRequest {
        queue: queue.into(),
        payload,
        ..Default::default()
    }
}

async fn worker(admin: &Client, label: &str, caps: &[&str]) -> (String, Client) {
    let mut r = reg("workers", Role::Secondary, Some(label));
    r.capabilities = caps.iter().map(|c| c.to_string()).collect();
    let (reg, c) = register(admin, r).await;
    (reg.instance.id, c)
}

#[tokio::test]
async fn enqueue_claim_complete_with_priorities_dedup_and_stale_claims() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, w) = worker(&admin, "w1", &[]).await;
    let low = admin.enqueue(&task("jobs", json!("low"))).await.unwrap();
    assert_eq!(low.task.state, TaskState::Pending);
    let mut hi = task("jobs", json!("high"));
    hi.priority = 10;
    hi.idempotency_key = Some("k1".into());
    let high = admin.enqueue(&hi).await.unwrap();
    assert!(!high.deduplicated);
    let again = admin.enqueue(&hi).await.unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.task.id, high.task.id);

    let claimed = w.claim(&["jobs"], 1, None, 0).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].task.id, high.task.id, "highest priority first");
    assert_eq!(claimed[0].task.attempt, 1);
    assert!(claimed[0].claim.starts_with("clm_"));
    let lease = w
        .heartbeat_task(
            &high.task.id,
            &claimed[0].claim,
            Some(json!({"percent": 40})),
        )
        .await
        .unwrap();
    assert!(lease.lease_until.millis() > 0);
    assert_eq!(
        admin.get_task(&high.task.id).await.unwrap().progress,
        Some(json!({"percent": 40}))
    );
    let done = w
        .complete_task(&high.task.id, &claimed[0].claim, json!({"ok": 1}))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result, Some(json!({"ok": 1})));
    // Completing twice is refused and changes nothing.
    let err = w
        .complete_task(&high.task.id, &claimed[0].claim, json!("again"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::StaleClaim);
    assert_eq!(
        admin.get_task(&high.task.id).await.unwrap().result,
        Some(json!({"ok": 1}))
    );

    let next = w.claim(&["jobs"], 10, None, 0).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.task.id.clone()).collect::<Vec<_>>(),
        vec![low.task.id.clone()]
    );
    assert!(w.claim(&["jobs"], 10, None, 0).await.unwrap().is_empty());
    // Cancel a running task: its claim becomes stale.
    admin.cancel_task(&low.task.id).await.unwrap();
    let err = w
        .complete_task(&low.task.id, &next[0].claim, json!(1))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::StaleClaim);
    assert_eq!(
        admin.cancel_task(&low.task.id).await.unwrap_err().code,
        ErrorCode::Conflict
    );

    let q = admin.queues().await.unwrap();
    let jobs = q.iter().find(|q| q.name == "jobs").unwrap();
    assert_eq!((jobs.completed, jobs.cancelled, jobs.pending), (1, 1, 0));
    // Events for each transition.
    let ev = admin
        .read_events("sys.task.>", Some(0), 1000, 0)
        .await
        .unwrap();
    let topics: Vec<&str> = ev.events.iter().map(|e| e.topic.as_str()).collect();
    for t in [
        "sys.task.enqueued",
        "sys.task.claimed",
        "sys.task.completed",
        "sys.task.cancelled",
    ] {
        assert!(topics.contains(&t), "{t} missing from {topics:?}");
    }
}

#[tokio::test]
async fn requires_targets_retries_and_dead_tasks() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (gpu_id, gpu) = worker(&admin, "gpu box", &["gpu"]).await;
    let (_, cpu) = worker(&admin, "cpu box", &[]).await;
    let mut t = task("train", json!(1));
    t.requires = vec!["gpu".into()];
    let needs_gpu = admin.enqueue(&t).await.unwrap().task;
    let mut t = task("train", json!(2));
    t.target = Some(gpu_id.clone());
    let targeted = admin.enqueue(&t).await.unwrap().task;
    assert!(
        cpu.claim(&["train"], 10, None, 0).await.unwrap().is_empty(),
        "cpu can claim neither"
    );
    let got = gpu.claim(&["train"], 10, None, 0).await.unwrap();
    let mut ids: Vec<String> = got.iter().map(|c| c.task.id.clone()).collect();
    ids.sort();
    let mut want = vec![needs_gpu.id.clone(), targeted.id.clone()];
    want.sort();
    assert_eq!(ids, want);

    // Failure with retry: failed, then claimable again after the backoff, then dead.
    let mut t = task("flaky", json!(null));
    t.max_attempts = Some(2);
    t.backoff_ms = Some(200);
    let flaky = admin.enqueue(&t).await.unwrap().task;
    let c1 = cpu.claim(&["flaky"], 1, None, 0).await.unwrap().remove(0);
    let failed = cpu
        .fail_task(&flaky.id, &c1.claim, "boom", true)
        .await
        .unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.error.as_deref(), Some("boom"));
    let c2 = cpu
        .claim(&["flaky"], 1, None, 5_000)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(c2.task.attempt, 2);
    let dead = cpu
        .fail_task(&flaky.id, &c2.claim, "boom again", true)
        .await
        .unwrap();
    assert_eq!(dead.state, TaskState::Dead);
    // retry: false goes straight to dead.
    let once = admin
        .enqueue(&task("flaky", json!(null)))
        .await
        .unwrap()
        .task;
    let c = cpu.claim(&["flaky"], 1, None, 0).await.unwrap().remove(0);
    assert_eq!(
        cpu.fail_task(&once.id, &c.claim, "fatal", false)
            .await
            .unwrap()
            .state,
        TaskState::Dead
    );
}

#[tokio::test]
async fn lapsed_leases_and_dead_claimers_return_tasks() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, slow) = worker(&admin, "slow", &[]).await;
    let (fast_id, fast) = worker(&admin, "fast", &[]).await;
    let t = admin.enqueue(&task("lease", json!(1))).await.unwrap().task;
    let old = slow
        .claim(&["lease"], 1, Some(1_000), 0)
        .await
        .unwrap()
        .remove(0);
    // Nobody heartbeats the claim: the task comes back and another worker takes it.
    let new = fast
        .claim(&["lease"], 1, None, 10_000)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(new.task.id, t.id);
    assert_eq!(new.task.attempt, 2);
    let err = slow
        .complete_task(&t.id, &old.claim, json!("late"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::StaleClaim);
    fast.complete_task(&t.id, &new.claim, json!("done"))
        .await
        .unwrap();

    // A claimer that closes returns its tasks at once.
    let t2 = admin.enqueue(&task("lease", json!(2))).await.unwrap().task;
    let c = fast.claim(&["lease"], 1, None, 0).await.unwrap().remove(0);
    assert_eq!(c.task.id, t2.id);
    fast.close_instance(&fast_id).await.unwrap();
    let back = admin.get_task(&t2.id).await.unwrap();
    assert_eq!(back.state, TaskState::Pending);
    assert_eq!(back.attempt, 1);
    assert!(slow
        .claim(&["lease"], 1, None, 0)
        .await
        .unwrap()
        .iter()
        .any(|x| x.task.id == t2.id));
}

#[tokio::test]
async fn dependencies_gate_and_cascade() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, w) = worker(&admin, "w", &[]).await;
    let a = admin.enqueue(&task("deps", json!("a"))).await.unwrap().task;
    let mut b = task("deps", json!("b"));
    b.depends_on = vec![a.id.clone()];
    b.priority = 100;
    let b = admin.enqueue(&b).await.unwrap().task;
    assert_eq!(b.depends_on, vec![a.id.clone()]);
    let first = w.claim(&["deps"], 10, None, 0).await.unwrap();
    assert_eq!(
        first.iter().map(|c| c.task.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()],
        "b waits for a"
    );
    w.complete_task(&a.id, &first[0].claim, json!(1))
        .await
        .unwrap();
    let second = w.claim(&["deps"], 10, None, 0).await.unwrap();
    assert_eq!(second[0].task.id, b.id);

    let d = admin
        .enqueue(&EnqueueRequest {
            max_attempts: Some(1),
            ..task("deps2", json!("d"))
        })
        .await
        .unwrap()
        .task;
    let c = admin
        .enqueue(&EnqueueRequest {
            depends_on: vec![d.id.clone()],
            ..task("deps2", json!("c"))
        })
        .await
        .unwrap()
        .task;
    let e = admin
        .enqueue(&EnqueueRequest {
            depends_on: vec![c.id.clone()],
            ..task("deps2", json!("e"))
        })
        .await
        .unwrap()
        .task;
    let cd = w.claim(&["deps2"], 10, None, 0).await.unwrap().remove(0);
    w.fail_task(&d.id, &cd.claim, "broken", true).await.unwrap();
    for id in [&c.id, &e.id] {
        let t = admin.get_task(id).await.unwrap();
        assert_eq!(t.state, TaskState::Cancelled, "{id}");
        assert!(t.error.unwrap().contains("dependency"));
    }
    let err = admin
        .enqueue(&EnqueueRequest {
            depends_on: vec!["tsk_01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
            ..task("x", json!(1))
        })
        .await
        .unwrap_err();
    assert_eq!(err.details["field"], "depends_on[0]");
}

#[tokio::test]
async fn bad_queue_input_is_refused() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, w) = worker(&admin, "w", &[]).await;
    for (q, field) in [
        ("", "queue"),
        ("a b", "queue"),
        (&"q".repeat(129)[..], "queue"),
    ] {
        let err = admin.enqueue(&task(q, json!(1))).await.unwrap_err();
        assert_eq!(
            (err.code, err.details["field"].as_str()),
            (ErrorCode::BadRequest, Some(field))
        );
    }
    let err = admin
        .enqueue(&task("q", json!("x".repeat(300_000))))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PayloadTooLarge);
    for max in [0, 1001] {
        assert_eq!(
            w.claim(&["q"], max, None, 0).await.unwrap_err().details["field"],
            "max"
        );
    }
    let err = admin
        .enqueue_batch(vec![task("q", json!(1)), task("bad queue", json!(2))])
        .await
        .unwrap_err();
    assert_eq!(err.details["field"], "tasks[1].queue");
    assert!(
        admin.queues().await.unwrap().is_empty(),
        "nothing was enqueued"
    );
    assert_eq!(
        admin.claim(&["q"], 1, None, 0).await.unwrap_err().code,
        ErrorCode::Forbidden,
        "admins don't claim"
    );
}

#[tokio::test]
async fn sixteen_workers_drain_20000_tasks_exactly_once_while_some_die() {
    let hub = Hub::start();
    let admin = hub.admin();
    let n = 20_000;
    for chunk in 0..20 {
        // Generous attempts: one task may be caught by several dying workers.
        let batch = (0..1000)
            .map(|i| EnqueueRequest {
                max_attempts: Some(50),
                ..task("drain", json!({"n": chunk * 1000 + i}))
            })
            .collect();
        admin.enqueue_batch(batch).await.unwrap();
    }
    let completions: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..16 {
        let (admin, completions, stop) = (admin.clone(), completions.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut generation = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut r = reg(
                    "drainers",
                    Role::Secondary,
                    Some(&format!("w{w}-{generation}")),
                );
                r.ttl_ms = Some(3_000);
                let (reg, c) = register(&admin, r).await;
                generation += 1;
                let mut rounds = 0;
                loop {
                    // A worker whose instance expired under load registers again.
                    if c.heartbeat(&reg.instance.id).await.is_err() {
                        break;
                    }
                    let claimed = match c.claim(&["drain"], 20, Some(5_000), 500).await {
                        Ok(v) => v,
                        Err(e) if e.code == ErrorCode::UnknownInstance => break,
                        Err(e) => panic!("claim: {e}"),
                    };
                    if claimed.is_empty() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    }
                    rounds += 1;
                    // Every 7th round of some workers, die mid-task: keep the claims,
                    // never complete them. Half die loudly (close), half silently
                    // (stop heartbeating and let the instance expire).
                    if w % 4 == 0 && rounds % 7 == 0 {
                        if generation % 2 == 0 {
                            c.close_instance(&reg.instance.id).await.unwrap();
                        }
                        break;
                    }
                    if w % 2 == 0 {
                        let items = claimed
                            .iter()
                            .map(|t| CompleteItem {
                                id: t.task.id.clone(),
                                claim: t.claim.clone(),
                                result: json!(w),
                            })
                            .collect();
                        for (t, out) in claimed.iter().zip(c.complete_batch(items).await.unwrap()) {
                            if out.ok == Some(true) {
                                *completions
                                    .lock()
                                    .unwrap()
                                    .entry(t.task.id.clone())
                                    .or_default() += 1;
                            }
                        }
                    } else {
                        for t in &claimed {
                            if c.complete_task(&t.task.id, &t.claim, json!(w))
                                .await
                                .is_ok()
                            {
                                *completions
                                    .lock()
                                    .unwrap()
                                    .entry(t.task.id.clone())
                                    .or_default() += 1;
                            }
                        }
                    }
                }
            }
        }));
    }
    eventually(Duration::from_secs(240), "every task completed", || {
        let admin = admin.clone();
        async move {
            let q = admin.queues().await.unwrap();
            let d = q.iter().find(|q| q.name == "drain")?;
            (d.completed == n as u64).then_some(())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    let completions = completions.lock().unwrap().clone();
    assert_eq!(
        completions.len(),
        n,
        "every task completed once through the API"
    );
    assert!(
        completions.values().all(|&c| c == 1),
        "no task completed twice"
    );
    let q = admin.queues().await.unwrap();
    let d = q.iter().find(|q| q.name == "drain").unwrap();
    assert_eq!(
        (d.completed, d.pending, d.running, d.dead),
        (n as u64, 0, 0, 0)
    );
    let retried = admin
        .list_tasks(Some("drain"), Some(TaskState::Completed), 1000, None)
        .await
        .unwrap();
    eprintln!(
        "drain: {n} tasks, some retried (first page max attempt {})",
        retried.iter().map(|t| t.attempt).max().unwrap_or(0)
    );
}

#[tokio::test]
async fn schedules_fire_once_per_due_time_across_a_restart() {
    let mut hub = Hub::start();
    let admin = hub.admin();
    let s = admin
        .put_schedule(
            "tick",
            &PutScheduleRequest {
                queue: "ticks".into(),
                payload: json!({"k": 1}),
                every_ms: Some(1_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(s.next_due.millis() % 1000, 0);
    let dues = |tasks: &[concord_core::api::Task]| -> Vec<i64> {
        let mut d: Vec<i64> = tasks
            .iter()
            .map(|t| {
                t.idempotency_key
                    .as_deref()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        d.sort();
        d
    };
    eventually(Duration::from_secs(10), "two ticks", || {
        let admin = admin.clone();
        async move {
            (admin
                .list_tasks(Some("ticks"), None, 100, None)
                .await
                .unwrap()
                .len()
                >= 2)
                .then_some(())
        }
    })
    .await;
    hub.kill9();
    hub.spawn();
    let admin = hub.admin();
    let before = admin
        .list_tasks(Some("ticks"), None, 1000, None)
        .await
        .unwrap()
        .len();
    eventually(Duration::from_secs(10), "ticks after the restart", || {
        let admin = admin.clone();
        async move {
            (admin
                .list_tasks(Some("ticks"), None, 1000, None)
                .await
                .unwrap()
                .len()
                >= before + 2)
                .then_some(())
        }
    })
    .await;
    let tasks = admin
        .list_tasks(Some("ticks"), None, 1000, None)
        .await
        .unwrap();
    let d = dues(&tasks);
    let mut unique = d.clone();
    unique.dedup();
    assert_eq!(unique, d, "one task per due time");
    assert!(d.iter().all(|x| x % 1000 == 0));
    assert_eq!(tasks[0].payload, json!({"k": 1}));
    assert_eq!(admin.schedules().await.unwrap().len(), 1);
    admin.delete_schedule("tick").await.unwrap();
    assert_eq!(
        admin.delete_schedule("tick").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let err = admin
        .put_schedule(
            "bad",
            &PutScheduleRequest {
                queue: "q".into(),
                cron: Some("61 * * * *".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.details["field"], "cron");
}

#[tokio::test]
async fn the_shell_worker_runs_any_script() {
    let hub = Hub::start();
    let admin = hub.admin();
    // First in line: its script cancels its own task, so its completion is
    // refused (stale claim), while the same call claims the next task.
    let cancelled = admin
        .enqueue(&task("shell", json!({"cancel": true})))
        .await
        .unwrap()
        .task;
    let ok = admin
        .enqueue(&task("shell", json!({"n": 21})))
        .await
        .unwrap()
        .task;
    let text = admin
        .enqueue(&task("shell", json!({"n": 0, "plain": true})))
        .await
        .unwrap()
        .task;
    let bad = admin
        .enqueue(&EnqueueRequest {
            max_attempts: Some(1),
            ..task("shell", json!({"n": -1}))
        })
        .await
        .unwrap()
        .task;
    let script = r#"payload=$(cat); case "$payload" in *cancel*) "$CONCORD_BIN" task cancel "$CONCORD_TASK_ID" >/dev/null && echo '"cancelled"';; *'-1'*) echo "negative input" >&2; exit 3;; *plain*) echo "just text";; *) echo "{\"seen\": $payload, \"task\": \"$CONCORD_TASK_ID\"}";; esac"#;
    let out = tokio::process::Command::new(BIN)
        .args([
            "work",
            "shell",
            "--entity",
            "shellers",
            "--label",
            "sh worker",
            "--max-tasks",
            "4",
            // Longer than the timeout below: a next task claimed with the refused
            // completion and then dropped would sit out this lease.
            "--lease-ms",
            "600000",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("CONCORD_BIN", BIN)
        .kill_on_drop(true)
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &hub.admin)
        .env("CONCORD_SPOOL_DIR", hub.dir.join("spool"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("reporting {}", cancelled.id)) && stderr.contains("stale_claim"),
        "{stderr}"
    );
    let cancelled = admin.get_task(&cancelled.id).await.unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert_eq!(cancelled.result, None);
    let ok = admin.get_task(&ok.id).await.unwrap();
    assert_eq!(ok.state, TaskState::Completed);
    assert_eq!(ok.result, Some(json!({"seen": {"n": 21}, "task": ok.id})));
    assert_eq!(
        admin.get_task(&text.id).await.unwrap().result,
        Some(json!("just text\n"))
    );
    let bad = admin.get_task(&bad.id).await.unwrap();
    assert_eq!(bad.state, TaskState::Dead);
    assert!(
        bad.error
            .as_deref()
            .unwrap()
            .contains("exit 3: negative input"),
        "{:?}",
        bad.error
    );
    // The worker closed its instance on the way out.
    assert!(admin
        .list_instances(Some("shellers"), None, None)
        .await
        .unwrap()
        .instances
        .is_empty());
}

#[tokio::test]
async fn cli_task_commands() {
    let hub = Hub::start();
    let out = hub.cli(&[
        "task",
        "submit",
        "cliq",
        r#"{"a":1}"#,
        "--priority",
        "5",
        "--key",
        "once",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = t["task"]["id"].as_str().unwrap().to_string();
    let again: Value = serde_json::from_slice(
        &hub.cli(&["task", "submit", "cliq", "{}", "--key", "once", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(again["task"]["id"], id.as_str());
    assert_eq!(again["deduplicated"], true);
    let got: Value =
        serde_json::from_slice(&hub.cli(&["task", "get", &id, "--json"]).stdout).unwrap();
    assert_eq!(got["priority"], 5);
    let list: Value = serde_json::from_slice(
        &hub.cli(&["task", "list", "--queue", "cliq", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(hub.cli(&["task", "cancel", &id]).status.success());
    let q: Value = serde_json::from_slice(&hub.cli(&["queues", "--json"]).stdout).unwrap();
    assert_eq!(q[0]["cancelled"], 1);
    let human = hub.cli(&["queues"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("cliq"));
}

fn next_in(queue: &str, max: u32, wait_ms: u64) -> ClaimRequest {
    ClaimRequest {
        queues: vec![queue.into()],
        max: Some(max),
        lease_ms: None,
        wait_ms: Some(wait_ms),
    }
}

/// `claim_next` on complete: a worker's loop in one call. The completion and the
/// next claim land together; a bad `claim_next` is refused naming its field and
/// completes nothing; with `wait_ms` the call long-polls for the next task.
#[tokio::test]
async fn complete_with_claim_next_runs_a_worker_loop_in_one_call() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (reg, w) = register(&admin, reg("workers", Role::Secondary, Some("w"))).await;
    let a = admin.enqueue(&task("jobs", json!("a"))).await.unwrap().task;
    let b = admin.enqueue(&task("jobs", json!("b"))).await.unwrap().task;
    let first = w.claim(&["jobs"], 1, None, 0).await.unwrap().remove(0);
    assert_eq!(first.task.id, a.id);

    // Refused: the field is named, and the task is neither completed nor is
    // another one claimed.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tasks/{}/complete", hub.url, a.id))
        .bearer_auth(&reg.session_token)
        .json(&json!({"claim": first.claim, "claim_next": {"queues": ["jobs"], "max": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["details"]["field"], "claim_next.max");
    assert_eq!(
        admin.get_task(&a.id).await.unwrap().state,
        TaskState::Running
    );
    assert_eq!(
        admin.get_task(&b.id).await.unwrap().state,
        TaskState::Pending
    );

    let (done, next) = w
        .complete_and_claim(&a.id, &first.claim, json!("ra"), next_in("jobs", 1, 0))
        .await
        .unwrap();
    assert_eq!(
        (done.id.as_str(), done.state),
        (a.id.as_str(), TaskState::Completed)
    );
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].task.id, b.id);
    assert_eq!(
        next[0].task.claimed_by.as_deref(),
        Some(reg.instance.id.as_str())
    );

    // The queue is empty: the call waits for the next task, which arrives
    // while (or before) it waits.
    let waiting = {
        let (w, id, claim) = (w.clone(), b.id.clone(), next[0].claim.clone());
        tokio::spawn(async move {
            w.complete_and_claim(&id, &claim, json!("rb"), next_in("jobs", 1, 10_000))
                .await
        })
    };
    let c = admin.enqueue(&task("jobs", json!("c"))).await.unwrap().task;
    let (done, next) = waiting.await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].task.id, c.id);

    // A stale claim completes nothing and claims nothing.
    let d = admin.enqueue(&task("jobs", json!("d"))).await.unwrap().task;
    let err = w
        .complete_and_claim(&a.id, &first.claim, json!("again"), next_in("jobs", 1, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::StaleClaim);
    assert_eq!(
        admin.get_task(&d.id).await.unwrap().state,
        TaskState::Pending
    );
    assert_eq!(
        admin.get_task(&a.id).await.unwrap().result,
        Some(json!("ra"))
    );
}

/// The batch completion takes `claim_next` too: each item keeps its outcome, the
/// next tasks come back in `next`, and a bad `claim_next` completes nothing.
#[tokio::test]
async fn a_batch_completion_with_claim_next_returns_the_next_batch() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (reg, w) = register(&admin, reg("workers", Role::Secondary, Some("w"))).await;
    for i in 0..4 {
        admin.enqueue(&task("jobs", json!(i))).await.unwrap();
    }
    let got = w.claim(&["jobs"], 2, None, 0).await.unwrap();
    let items = |claims: &[concord_core::api::ClaimedTask]| -> Vec<CompleteItem> {
        claims
            .iter()
            .map(|t| CompleteItem {
                id: t.task.id.clone(),
                claim: t.claim.clone(),
                result: json!("ok"),
            })
            .collect()
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tasks/complete", hub.url))
        .bearer_auth(&reg.session_token)
        .json(&json!({"items": items(&got), "claim_next": {"queues": ["bad queue"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["details"]["field"], "claim_next.queues[0]");
    assert_eq!(
        admin.get_task(&got[0].task.id).await.unwrap().state,
        TaskState::Running
    );

    let (outcomes, next) = w
        .complete_batch_and_claim(items(&got), next_in("jobs", 2, 0))
        .await
        .unwrap();
    assert!(outcomes.iter().all(|o| o.ok == Some(true)), "{outcomes:?}");
    assert_eq!(next.len(), 2);
    assert!(next
        .iter()
        .all(|t| !got.iter().any(|g| g.task.id == t.task.id)));
    let (_, last) = w
        .complete_batch_and_claim(items(&next), next_in("jobs", 2, 0))
        .await
        .unwrap();
    assert!(last.is_empty(), "all four done: {last:?}");
    let q = admin.queues().await.unwrap();
    assert_eq!((q[0].completed, q[0].running, q[0].pending), (4, 0, 0));
}
