//! Degraded mode of concord-client (issue #11 item 6, ADR-012): with the hub
//! stopped, spoolable writes wait in the spool file and arrive exactly once, in
//! order, when it is back; reads fail fast and say so; a write the hub refuses
//! on replay is set aside without blocking the rest.

use crate::harness::*;
use concord_client::{memory, spooled, Client, Spool};
use concord_core::api::{EnqueueRequest, Event, ObservationRequest, Role};
use concord_core::{ErrorCode, Result};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An instance of `entity` whose client runs in degraded mode with a spool in `dir`.
async fn spooling_instance(hub: &Hub, entity: &str, dir: &std::path::Path) -> (String, Client) {
    let mut req = reg(entity, Role::Secondary, Some("spooler"));
    // Long enough that the instance outlives the hub's downtime.
    req.ttl_ms = Some(600_000);
    let (r, session) = register(&hub.admin(), req).await;
    let spool = Spool::open(dir, entity, "spooler").expect("spool");
    let id = r.instance.id.clone();
    (id.clone(), session.for_instance(id).with_spool(spool))
}

/// Every retained event on `topics`, oldest first.
async fn events(c: &Client, topics: &str) -> Vec<Event> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = c
            .read_events(topics, Some(from), 1000, 0)
            .await
            .expect("read");
        if page.events.is_empty() {
            return out;
        }
        from = page.next;
        out.extend(page.events);
    }
}

fn enqueue(queue: &str, key: Option<&str>, i: i64) -> EnqueueRequest {
    serde_json::from_value(json!({"queue": queue, "payload": {"i": i}, "idempotency_key": key}))
        .expect("enqueue request")
}

fn assert_spooled<T: std::fmt::Debug>(what: &str, r: Result<T>) {
    match r {
        Err(e) if spooled(&e) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(
                e.message.starts_with("hub unreachable; spooled"),
                "{what}: {}",
                e.message
            );
        }
        other => panic!("{what}: expected a spooled write, got {other:?}"),
    }
}

#[tokio::test]
async fn writes_while_the_hub_is_down_arrive_once_in_order_when_it_returns() {
    let mut hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (id, c) = spooling_instance(&hub, "spoolers", dir.path()).await;
    c.publish("spool.t", json!({"i": 0}))
        .await
        .expect("direct while up");

    hub.kill9();
    for i in 1..=3 {
        assert_spooled(
            "shared memory",
            c.remember(&memory("shared:notes", &format!("note {i}")))
                .await,
        );
    }
    assert_spooled(
        "own instance memory",
        c.remember(&memory(&format!("instance:{id}"), "private scratch"))
            .await,
    );
    for i in 1..=5 {
        assert_spooled("event", c.publish("spool.t", json!({"i": i})).await);
    }
    assert_spooled(
        "keyed enqueue",
        c.enqueue(&enqueue("spoolq", Some("job-1"), 1)).await,
    );
    assert_spooled(
        "unkeyed enqueue",
        c.enqueue(&enqueue("spoolq", None, 2)).await,
    );
    assert_spooled(
        "observation",
        c.observe(&ObservationRequest {
            subject: "provider:spooled".into(),
            outcome: "error".into(),
            latency_ms: Some(12),
            detail: None,
            probe_id: None,
            idempotency_key: None,
        })
        .await,
    );

    // Reads fail fast, and say nothing was spooled.
    let t = Instant::now();
    let e = c
        .list_tasks(Some("spoolq"), None, 10, None)
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(
        e.message.contains("hub unreachable") && e.message.contains("not spooled"),
        "{}",
        e.message
    );
    // So do writes that are not safe to replay: canonical memory, state.
    let e = c
        .remember(&memory("entity:spoolers", "canonical"))
        .await
        .unwrap_err();
    assert!(
        !spooled(&e) && e.message.contains("not spooled"),
        "{}",
        e.message
    );
    let e = c
        .put_state("spoolers", "k", json!(1), Some(1), None)
        .await
        .unwrap_err();
    assert!(
        !spooled(&e) && e.message.contains("not spooled"),
        "{}",
        e.message
    );

    let status = c.spool_status().await.expect("a spool");
    assert_eq!((status.pending, status.rejected), (12, 0));
    assert!(status.oldest_age_ms.is_some());
    assert_eq!(status.path, dir.path().join("spoolers-spooler.spool"));

    hub.respawn_same_port();
    // The next write goes out after everything spooled before it.
    c.publish("spool.t", json!({"i": 6}))
        .await
        .expect("after restart");
    let status = c.spool_status().await.unwrap();
    assert_eq!((status.pending, status.rejected), (0, 0));
    assert_eq!(
        std::fs::metadata(&status.path).unwrap().len(),
        0,
        "a drained spool is emptied"
    );

    let admin = hub.admin();
    let seen: Vec<i64> = events(&admin, "spool.t")
        .await
        .iter()
        .map(|e| e.data["i"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seen,
        (0..=6).collect::<Vec<_>>(),
        "each event once, in order"
    );
    let memories: Vec<String> = events(&admin, "sys.memory.created")
        .await
        .iter()
        .map(|e| e.data["space"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        memories,
        vec![
            "shared:notes".to_string(),
            "shared:notes".into(),
            "shared:notes".into(),
            format!("instance:{id}"),
        ]
    );
    let tasks = admin
        .list_tasks(Some("spoolq"), None, 10, None)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(admin.breaker("provider:spooled").await.unwrap().samples, 1);

    // Replaying again sends nothing: the spool is empty.
    let report = c.replay_spool().await;
    assert_eq!((report.delivered, report.rejected), (0, 0));
}

#[tokio::test]
async fn a_write_refused_on_replay_is_set_aside_and_the_rest_go_on() {
    let mut hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (_id, c) = spooling_instance(&hub, "poisoned", dir.path()).await;
    hub.kill9();
    assert_spooled("before", c.publish("ok.before", json!(1)).await);
    // `sys.` is the hub's own: refused with 403 on replay.
    assert_spooled("reserved topic", c.publish("sys.forged", json!(2)).await);
    assert_spooled("after", c.publish("ok.after", json!(3)).await);
    hub.respawn_same_port();

    let report = c.replay_spool().await;
    assert_eq!((report.delivered, report.rejected), (2, 1), "{report:?}");
    assert!(report.stopped.is_none());
    let status = c.spool_status().await.unwrap();
    assert_eq!((status.pending, status.rejected), (0, 1));
    let rejected = std::fs::read_to_string(&status.rejected_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(rejected.trim()).unwrap();
    assert_eq!(line["body"]["topic"], "sys.forged");
    assert_eq!(line["error"]["code"], "forbidden");
    let topics: Vec<String> = events(&hub.admin(), "ok.>")
        .await
        .into_iter()
        .map(|e| e.topic)
        .collect();
    assert_eq!(topics, vec!["ok.before", "ok.after"]);
}

#[tokio::test]
async fn a_spool_left_by_a_dead_process_is_replayed_by_the_next_one() {
    let mut hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (_id, c) = spooling_instance(&hub, "heirs", dir.path()).await;
    hub.kill9();
    for i in 0..3 {
        assert_spooled("event", c.publish("heir.t", json!({"i": i})).await);
    }
    // The process goes away with its writes on disk only.
    drop(c);
    hub.respawn_same_port();
    let (_id, next) = spooling_instance(&hub, "heirs", dir.path()).await;
    assert_eq!(next.spool_status().await.unwrap().pending, 3);
    let report = next.replay_spool().await;
    assert_eq!(report.delivered, 3, "{report:?}");
    let seen: Vec<i64> = events(&hub.admin(), "heir.t")
        .await
        .iter()
        .map(|e| e.data["i"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, vec![0, 1, 2]);
}

#[tokio::test]
async fn a_hub_killed_mid_stream_gets_every_write_exactly_once() {
    let mut hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let (_id, c) = spooling_instance(&hub, "streamers", dir.path()).await;
    const N: i64 = 400;
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (c, acked) = (c.clone(), acked.clone());
        tokio::spawn(async move {
            let mut outcomes = (0, 0);
            for i in 0..N {
                // Memory writes and enqueues interleaved with events, all keyed.
                let r = match i % 4 {
                    0 => c
                        .remember(&memory("shared:stream", &format!("m{i}")))
                        .await
                        .map(|_| ()),
                    1 => c.enqueue(&enqueue("stream", None, i)).await.map(|_| ()),
                    _ => c.publish("stream.t", json!({"i": i})).await.map(|_| ()),
                };
                match r {
                    Ok(()) => outcomes.0 += 1,
                    Err(e) if spooled(&e) => outcomes.1 += 1,
                    Err(e) => panic!("write {i}: neither applied nor spooled: {e}"),
                }
                acked.fetch_add(1, Ordering::SeqCst);
            }
            outcomes
        })
    };
    // Kill the hub while writes are in flight.
    eventually(Duration::from_secs(60), "a stream under way", || {
        let acked = acked.clone();
        async move { (acked.load(Ordering::SeqCst) >= 60).then_some(()) }
    })
    .await;
    hub.kill9();
    let (direct, spooled_n) = writer.await.unwrap();
    assert!(
        direct >= 60 && spooled_n > 0,
        "{direct} direct, {spooled_n} spooled"
    );
    hub.respawn_same_port();
    let report = c.replay_spool().await;
    assert!(report.stopped.is_none(), "{report:?}");
    assert_eq!(report.rejected, 0);

    let admin = hub.admin();
    let seen: Vec<i64> = events(&admin, "stream.t")
        .await
        .iter()
        .map(|e| e.data["i"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (0..N).filter(|i| i % 4 >= 2).collect();
    assert_eq!(seen, want, "every event exactly once, in order");
    let memories = events(&admin, "sys.memory.created")
        .await
        .into_iter()
        .filter(|e| e.data["space"] == "shared:stream")
        .count();
    assert_eq!(memories as i64, N / 4);
    let tasks = admin
        .list_tasks(Some("stream"), None, 1000, None)
        .await
        .unwrap();
    let mut payloads: Vec<i64> = tasks
        .iter()
        .map(|t| t.payload["i"].as_i64().unwrap())
        .collect();
    payloads.sort();
    assert_eq!(payloads, (0..N).filter(|i| i % 4 == 1).collect::<Vec<_>>());
}
