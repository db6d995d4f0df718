//! The crash suite: a mixed load against the hub, `kill -9` at random moments,
//! restart, many cycles. A checker compares the clients' log of acknowledged
//! operations with the store. Short in CI; `CONCORD_CHAOS_CYCLES=50` (see
//! scripts/chaos) for the long form.

use crate::harness::*;
use concord_client::Client;
use concord_core::api::{EnqueueRequest, Role, TaskState};
use concord_core::ErrorCode;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the clients were told succeeded.
#[derive(Default)]
struct Acked {
    registrations: HashSet<String>,
    state_writes: Vec<(String, i64, u64)>,
    enqueued: HashSet<String>,
    completed: HashMap<String, u32>,
    memories: HashSet<String>,
    ops: u64,
}

fn cycles() -> usize {
    std::env::var("CONCORD_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

async fn worker_loop(admin: Client, acked: Arc<Mutex<Acked>>, stop: Arc<AtomicBool>, w: usize) {
    // Each worker: its own instance, primary of its own entity, so its fence is known.
    let entity = format!("chaos{w}");
    let mut r = reg(&entity, Role::Secondary, Some(&format!("chaos worker {w}")));
    r.ttl_ms = Some(60_000);
    let Ok(me_reg) = admin.register(&r).await else {
        return;
    };
    acked
        .lock()
        .unwrap()
        .registrations
        .insert(me_reg.instance.id.clone());
    let me = admin.with_token(me_reg.session_token.clone());
    let fence = match me.campaign(&entity, &me_reg.instance.id, None).await {
        Ok(g) => g.fence,
        Err(_) => return,
    };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let res: Result<(), concord_core::Error> = async {
            match i % 6 {
                0 => {
                    let r = admin
                        .register(&reg(&entity, Role::Secondary, Some(&format!("extra {i}"))))
                        .await?;
                    acked.lock().unwrap().registrations.insert(r.instance.id);
                }
                1 => {
                    let key = format!("k{}", i % 50);
                    let e = me
                        .put_state(&entity, &key, json!(i), Some(fence), None)
                        .await?;
                    acked
                        .lock()
                        .unwrap()
                        .state_writes
                        .push((key, e.revision, fence));
                }
                2 => {
                    let t = me
                        .enqueue(&EnqueueRequest {
                            queue: format!("chaos{w}"),
                            payload: json!(i),
                            ..Default::default()
                        })
                        .await?;
                    acked.lock().unwrap().enqueued.insert(t.task.id);
                }
                3 => {
                    for t in me
                        .claim(&[&format!("chaos{w}")], 5, Some(60_000), 0)
                        .await?
                    {
                        match me.complete_task(&t.task.id, &t.claim, json!("done")).await {
                            Ok(_) => {
                                *acked
                                    .lock()
                                    .unwrap()
                                    .completed
                                    .entry(t.task.id)
                                    .or_default() += 1
                            }
                            Err(e) if e.code == ErrorCode::StaleClaim => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                4 => {
                    let m = concord_client::memory("shared:chaos", &format!("chaos {w} {i}"));
                    let written = me.remember(&m).await?;
                    acked.lock().unwrap().memories.insert(written.memory.id);
                }
                _ => {
                    me.heartbeat(&me_reg.instance.id).await?;
                }
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => acked.lock().unwrap().ops += 1,
            // The hub is down: the outcome of this call is unknown; nothing was acked.
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn kill_9_cycles_lose_nothing_acknowledged() {
    let mut hub = Hub::start();
    kill_9_cycles(&mut hub, "sqlite").await;
}

#[tokio::test]
async fn kill_9_cycles_on_postgres_lose_nothing_acknowledged() {
    let Some(mut c) = Cluster::start(
        "chaos::kill_9_cycles_on_postgres_lose_nothing_acknowledged",
        1,
    ) else {
        return;
    };
    kill_9_cycles(&mut c.hubs[0], "postgres").await;
    c.finish().await;
}

/// The body of both crash suites: `cycles()` rounds of mixed load, `kill -9` at a
/// random moment, restart; then the checker.
async fn kill_9_cycles(hub: &mut Hub, backend: &str) {
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut epochs: HashMap<String, u64> = HashMap::new();
    let n = cycles();
    for cycle in 0..n {
        let admin = hub.admin();
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..6)
            .map(|w| {
                tokio::spawn(worker_loop(
                    admin.clone(),
                    acked.clone(),
                    stop.clone(),
                    w + cycle * 10,
                ))
            })
            .collect();
        // A random moment: after a random number of acknowledged operations.
        let target = acked.lock().unwrap().ops + 50 + (rand_u64() % 400);
        eventually(Duration::from_secs(60), "load to make progress", || {
            let acked = acked.clone();
            async move { (acked.lock().unwrap().ops >= target).then_some(()) }
        })
        .await;
        hub.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.await;
        }
        hub.spawn();
        // Epochs never go backwards.
        for e in hub.admin().entities().await.unwrap().entities {
            let prev = epochs.insert(e.name.clone(), e.epoch).unwrap_or(0);
            assert!(
                e.epoch >= prev,
                "epoch of {} went back from {prev} to {}",
                e.name,
                e.epoch
            );
        }
    }
    let admin = hub.admin();
    let a = std::mem::take(&mut *acked.lock().unwrap());
    let all: HashSet<String> = admin
        .list_instances(None, None, Some("all"))
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    let lost_regs = a
        .registrations
        .iter()
        .filter(|id| !all.contains(*id))
        .count();
    let mut lost_state = 0;
    let mut by_entity: HashMap<String, Vec<concord_core::api::StateEntry>> = HashMap::new();
    for (key, rev, _) in &a.state_writes {
        // Every acknowledged write is there or was overwritten by a later one.
        let found = by_entity
            .values()
            .flatten()
            .any(|e| &e.key == key && e.revision >= *rev);
        if !found {
            let mut ok = false;
            for e in admin.entities().await.unwrap().entities {
                let entries = admin.list_state(&e.name).await.unwrap().entries;
                ok |= entries.iter().any(|x| &x.key == key && x.revision >= *rev);
                by_entity.insert(e.name, entries);
            }
            if !ok {
                lost_state += 1;
            }
        }
    }
    let mut lost_tasks = 0;
    for id in &a.enqueued {
        if admin.get_task(id).await.is_err() {
            lost_tasks += 1;
        }
    }
    let mut lost_memories = 0;
    for id in &a.memories {
        if admin.memory(id, false).await.is_err() {
            lost_memories += 1;
        }
    }
    let mut double = 0;
    let mut not_completed = 0;
    for (id, n) in &a.completed {
        if *n > 1 {
            double += 1;
        }
        if admin.get_task(id).await.unwrap().state != TaskState::Completed {
            not_completed += 1;
        }
    }
    eprintln!(
        "chaos ({backend}): {n} cycles, {} operations acknowledged ({} registrations, {} state writes, {} enqueues, {} completions, {} memory writes); \
         lost {}, double-completed {double}, completion lost {not_completed}",
        a.ops,
        a.registrations.len(),
        a.state_writes.len(),
        a.enqueued.len(),
        a.completed.len(),
        a.memories.len(),
        lost_regs + lost_state + lost_tasks + lost_memories
    );
    assert_eq!(
        (
            lost_regs,
            lost_state,
            lost_tasks,
            lost_memories,
            double,
            not_completed
        ),
        (0, 0, 0, 0, 0, 0)
    );
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

const FROZEN_PRIMARY: &str = r#"
import json, os, sys, time, urllib.request, urllib.error
url, token, inst, fence = os.environ["HUB"], os.environ["TOKEN"], os.environ["INST"], int(os.environ["FENCE"])
def call(method, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
        headers={"authorization": "Bearer " + token, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
i = 0
while True:
    i += 1
    hb = call("POST", "/v1/instances/%s/heartbeat" % inst, {})
    w = call("PUT", "/v1/entities/paused/state/beat", {"value": i, "fence": fence})
    print(json.dumps({"i": i, "heartbeat": hb[0], "write": w[0], "code": w[1].get("error", {}).get("code")}), flush=True)
    time.sleep(0.2)
"#;

/// A primary frozen with SIGSTOP past its TTL, then resumed, has every write
/// rejected (fenced); a worker frozen past its task lease cannot complete the
/// task another worker now owns. Both are real processes.
#[tokio::test]
async fn paused_primaries_and_workers_are_fenced_after_they_resume() {
    use std::io::BufRead;
    let hub = Hub::start();
    let admin = hub.admin();
    let mut r = reg("paused", Role::Primary, Some("frozen primary"));
    r.ttl_ms = Some(1_000);
    let (p, _) = register(&admin, r).await;
    let mut primary = std::process::Command::new("python3")
        .args(["-c", FROZEN_PRIMARY])
        .env("HUB", &hub.url)
        .env("TOKEN", &p.session_token)
        .env("INST", &p.instance.id)
        .env("FENCE", p.fence.unwrap().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let mut lines = std::io::BufReader::new(primary.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["write"], 200, "the live primary writes: {first}");

    // The worker: `concord work`, whose command outlives the pause.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = std::process::Command::new(BIN)
        .args([
            "work",
            "pausing",
            "--entity",
            "workers",
            "--label",
            "frozen worker",
            "--lease-ms",
            "1500",
            "--ttl-ms",
            "60000",
        ])
        .args([
            "--",
            "sh",
            "-c",
            "cat > /dev/null; sleep 3; echo '\"late\"'",
        ])
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &hub.admin)
        .env("CONCORD_SPOOL_DIR", hub.dir.join("spool"))
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let task = admin
        .enqueue(&EnqueueRequest {
            queue: "pausing".into(),
            payload: json!(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .task;
    eventually(Duration::from_secs(20), "the worker to claim", || {
        let admin = admin.clone();
        let id = task.id.clone();
        async move { (admin.get_task(&id).await.unwrap().state == TaskState::Running).then_some(()) }
    })
    .await;

    for pid in [primary.id(), worker.id()] {
        assert!(std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    // Past the TTL and the lease: the role and the task move on.
    let (other, oc) = register(&admin, {
        let mut r = reg("paused", Role::Secondary, Some("takes over"));
        r.ttl_ms = Some(60_000);
        r
    })
    .await;
    let g2 = oc
        .campaign("paused", &other.instance.id, Some(10_000))
        .await
        .unwrap();
    assert!(g2.epoch > p.fence.unwrap());
    let (_, w2) = register(
        &admin,
        reg("workers", Role::Secondary, Some("second worker")),
    )
    .await;
    let taken = w2.claim(&["pausing"], 1, None, 10_000).await.unwrap();
    assert_eq!(taken[0].task.id, task.id);

    for pid in [primary.id(), worker.id()] {
        assert!(std::process::Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    // Every write of the resumed primary is fenced.
    let after: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (after["write"].as_i64(), after["code"].as_str()),
        (Some(409), Some("fenced")),
        "{after}"
    );
    assert_eq!(after["heartbeat"], 404, "its instance expired");
    // The resumed worker finishes its command and is refused.
    eventually(
        Duration::from_secs(20),
        "the resumed worker to report",
        || {
            let path = log.path().to_path_buf();
            async move {
                std::fs::read_to_string(path)
                    .ok()
                    .filter(|l| l.contains("stale_claim"))
                    .map(|_| ())
            }
        },
    )
    .await;
    w2.complete_task(&task.id, &taken[0].claim, json!("by the new owner"))
        .await
        .unwrap();
    assert_eq!(
        admin.get_task(&task.id).await.unwrap().result,
        Some(json!("by the new owner"))
    );
    assert_eq!(
        admin.get_state("paused", "beat").await.unwrap().value,
        json!(1),
        "no write after the pause"
    );
    let _ = primary.kill();
    let _ = worker.kill();
    let _ = primary.wait();
    let _ = worker.wait();
}
