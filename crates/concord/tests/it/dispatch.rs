use crate::harness::*;
use concord_core::api::{
    DispatchRequest, DispatchSelect, IfUnderMin, Quorum, Reducer, ReducerKind, Role,
};
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A real peer process: `concord work` serving `dispatch.<command>` with a shell script.
struct Peer(Child);

impl Peer {
    fn start(hub: &Hub, label: &str, caps: &str, script: &str) -> Peer {
        let child = Command::new(BIN)
            .args([
                "work",
                "dispatch.review",
                "--entity",
                "reviewers",
                "--label",
                label,
                "--capabilities",
                caps,
            ])
            .args(["--ttl-ms", "2000", "--", "sh", "-c", script])
            .env("CONCORD_URL", &hub.url)
            .env("CONCORD_TOKEN", &hub.admin)
            .env("CONCORD_SPOOL_DIR", hub.dir.join("spool"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Peer(child)
    }
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn answer(v: Value) -> String {
    format!("cat > /dev/null; echo '{v}'")
}

async fn wait_for_peers(hub: &Hub, n: usize) {
    let admin = hub.admin();
    eventually(Duration::from_secs(20), "peers registered", || {
        let admin = admin.clone();
        async move {
            (admin
                .list_instances(Some("reviewers"), None, None)
                .await
                .unwrap()
                .instances
                .len()
                >= n)
                .then_some(())
        }
    })
    .await;
}

fn req(quorum: Quorum, reducer: ReducerKind, path: Option<&str>) -> DispatchRequest {
    DispatchRequest {
        command: "review".into(),
        payload: json!({"pr": 7}),
        select: DispatchSelect {
            entity: Some("reviewers".into()),
            capabilities: vec!["review".into()],
            roles: None,
        },
        quorum,
        min: None,
        max: None,
        timeout_ms: Some(10_000),
        reducer: Some(Reducer {
            kind: reducer,
            path: path.map(Into::into),
            weight_path: None,
            score_path: None,
            key_path: None,
        }),
        if_under_min: IfUnderMin::Fail,
        idempotent: false,
        wait: None,
    }
}

#[tokio::test]
async fn multi_majority_with_attribution() {
    let hub = Hub::start();
    let _a = Peer::start(&hub, "r1", "review", &answer(json!({"verdict": "approve"})));
    let _b = Peer::start(&hub, "r2", "review", &answer(json!({"verdict": "approve"})));
    let _c = Peer::start(&hub, "r3", "review", &answer(json!({"verdict": "reject"})));
    let _x = Peer::start(
        &hub,
        "other",
        "lint",
        &answer(json!({"verdict": "never asked"})),
    );
    wait_for_peers(&hub, 4).await;
    let mut r = req(Quorum::Multi, ReducerKind::Majority, Some("/verdict"));
    r.min = Some(2);
    r.max = Some(5);
    let v = hub.admin().dispatch(&r).await.unwrap();
    assert_eq!(v.state, "completed", "{v:?}");
    assert_eq!(v.selected, 3, "only peers with the capability");
    assert_eq!(v.responded, 3);
    assert_eq!(v.result.as_ref().unwrap()["value"], "approve");
    assert!(v
        .peers
        .iter()
        .all(|p| p.result.is_some() && p.latency_ms.is_some()));
    // The peers saw the payload.
    let got = hub.admin().get_dispatch(&v.id).await.unwrap();
    assert_eq!(got, v);
    let ev = hub
        .admin()
        .read_events("sys.dispatch.*", Some(0), 100, 0)
        .await
        .unwrap();
    assert!(ev
        .events
        .iter()
        .any(|e| e.topic == "sys.dispatch.finished" && e.data["id"] == v.id.as_str()));
}

#[tokio::test]
async fn single_retries_only_when_idempotent() {
    let hub = Hub::start();
    let _bad = Peer::start(
        &hub,
        "bad",
        "review",
        "cat > /dev/null; echo broken >&2; exit 1",
    );
    wait_for_peers(&hub, 1).await;
    let _good = Peer::start(&hub, "good", "review", &answer(json!({"ok": true})));
    wait_for_peers(&hub, 2).await;
    // The older (bad) peer is asked first.
    let v = hub
        .admin()
        .dispatch(&req(Quorum::Single, ReducerKind::First, None))
        .await
        .unwrap();
    assert_eq!(v.state, "failed", "{v:?}");
    assert_eq!(v.peers.len(), 1);
    assert!(v.peers[0].error.as_deref().unwrap().contains("broken"));
    let mut r = req(Quorum::Single, ReducerKind::First, None);
    r.idempotent = true;
    let v = hub.admin().dispatch(&r).await.unwrap();
    assert_eq!(v.state, "completed", "{v:?}");
    assert_eq!(v.result, Some(json!({"ok": true})));
    assert_eq!(v.peers.len(), 2);
    assert_eq!(v.peers[0].state, "failed");
}

#[tokio::test]
async fn any_with_first_answers_at_once_and_slow_peers_are_late() {
    let hub = Hub::start();
    let _fast = Peer::start(&hub, "fast", "review", &answer(json!({"n": 1})));
    let _slow = Peer::start(
        &hub,
        "slow",
        "review",
        "cat > /dev/null; sleep 3; echo '{\"n\": 2}'",
    );
    wait_for_peers(&hub, 2).await;
    let v = hub
        .admin()
        .dispatch(&req(Quorum::Any, ReducerKind::First, None))
        .await
        .unwrap();
    assert_eq!(v.state, "completed");
    assert_eq!(v.result, Some(json!({"n": 1})));
    // The slow peer finishes later: recorded as late, the answer does not change.
    let admin = hub.admin();
    let id = v.id.clone();
    let late = eventually(Duration::from_secs(15), "the late answer", || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let v = admin.get_dispatch(&id).await.unwrap();
            v.peers.iter().any(|p| p.late).then_some(v)
        }
    })
    .await;
    assert_eq!(late.result, Some(json!({"n": 1})));
}

#[tokio::test]
async fn deadlines_dying_peers_and_if_under_min() {
    let hub = Hub::start();
    let admin = hub.admin();
    // No peers at all.
    let err = admin
        .dispatch(&req(Quorum::Any, ReducerKind::All, None))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NoPeers);
    let mut r = req(Quorum::Any, ReducerKind::All, None);
    r.if_under_min = IfUnderMin::Degraded;
    let v = admin.dispatch(&r).await.unwrap();
    assert_eq!((v.state.as_str(), v.result.clone()), ("degraded", None));
    // wait: peers that appear before the deadline are asked.
    let mut r = req(Quorum::Multi, ReducerKind::All, Some("/n"));
    r.min = Some(1);
    r.max = Some(1);
    r.if_under_min = IfUnderMin::Wait;
    let pending = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.dispatch(&r).await })
    };
    let _late_joiner = Peer::start(&hub, "joiner", "review", &answer(json!({"n": 5})));
    let v = pending.await.unwrap().unwrap();
    assert_eq!(v.state, "completed", "{v:?}");
    assert_eq!(v.result.unwrap()[0]["value"], 5);
    drop(_late_joiner);
    eventually(Duration::from_secs(20), "the joiner to expire", || {
        let admin = admin.clone();
        async move {
            admin
                .list_instances(Some("reviewers"), None, None)
                .await
                .unwrap()
                .instances
                .is_empty()
                .then_some(())
        }
    })
    .await;

    // A peer that dies mid-dispatch counts as failed at its instance expiry, not
    // at the deadline; a slow one times out.
    let mut dying = Peer::start(&hub, "dying", "review", "cat > /dev/null; sleep 30");
    let _ok = Peer::start(&hub, "steady", "review", &answer(json!({"n": 1})));
    wait_for_peers(&hub, 2).await;
    let mut r = req(Quorum::Multi, ReducerKind::All, Some("/n"));
    r.min = Some(2);
    r.max = Some(2);
    r.timeout_ms = Some(60_000);
    r.if_under_min = IfUnderMin::Degraded;
    let started = std::time::Instant::now();
    let pending = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.dispatch(&r).await })
    };
    // Once the dying peer holds its task, kill it.
    eventually(Duration::from_secs(20), "the dying peer to start", || {
        let admin = admin.clone();
        async move {
            let running = admin
                .list_tasks(
                    Some("dispatch.review"),
                    Some(concord_core::api::TaskState::Running),
                    10,
                    None,
                )
                .await
                .unwrap();
            (!running.is_empty()).then_some(())
        }
    })
    .await;
    dying.kill9();
    let v = pending.await.unwrap().unwrap();
    assert_eq!(v.state, "degraded", "{v:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed at the peer's expiry, not the 60 s deadline"
    );
    assert!(v.peers.iter().any(|p| p.state == "failed"));
    assert_eq!(v.result.unwrap().as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_dispatch_that_does_not_wait_survives_a_hub_restart() {
    let mut hub = Hub::start();
    let admin = hub.admin();
    let (reg, peer) = register(&admin, {
        let mut r = reg("reviewers", Role::Secondary, Some("manual"));
        r.capabilities = vec!["review".into()];
        r.ttl_ms = Some(60_000);
        r
    })
    .await;
    let mut r = req(Quorum::Single, ReducerKind::First, None);
    r.wait = Some(false);
    let v = admin.dispatch(&r).await.unwrap();
    assert_eq!(v.state, "running");
    hub.kill9();
    hub.spawn();
    let peer = hub.admin().with_token(peer.token().unwrap().to_string());
    let claimed = peer
        .claim(&["dispatch.review"], 1, None, 5_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].task.payload["payload"], json!({"pr": 7}));
    assert_eq!(
        claimed[0].task.target.as_deref(),
        Some(reg.instance.id.as_str())
    );
    peer.complete_task(&claimed[0].task.id, &claimed[0].claim, json!("lgtm"))
        .await
        .unwrap();
    let admin = hub.admin();
    let id = v.id.clone();
    let done = eventually(Duration::from_secs(10), "the dispatch to finish", || {
        let (admin, id) = (admin.clone(), id.clone());
        async move { Some(admin.get_dispatch(&id).await.unwrap()).filter(|v| v.state != "running") }
    })
    .await;
    assert_eq!(
        (done.state.as_str(), done.result),
        ("completed", Some(json!("lgtm")))
    );
}

#[tokio::test]
async fn bad_dispatches_are_refused() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut r = req(Quorum::Multi, ReducerKind::All, None);
    r.min = Some(3);
    r.max = Some(2);
    assert_eq!(
        admin.dispatch(&r).await.unwrap_err().details["field"],
        "min"
    );
    let mut r = req(Quorum::Any, ReducerKind::All, None);
    r.timeout_ms = Some(10);
    assert_eq!(
        admin.dispatch(&r).await.unwrap_err().details["field"],
        "timeout_ms"
    );
    let r = req(Quorum::Any, ReducerKind::Majority, Some("verdict"));
    assert_eq!(
        admin.dispatch(&r).await.unwrap_err().details["field"],
        "reducer.path"
    );
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/dispatch", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"command": "x", "quorum": "any", "reducer": {"kind": "median"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["details"]["field"], "reducer.kind");
}

#[tokio::test]
async fn cli_dispatch_prints_the_answer() {
    let hub = Hub::start();
    let _a = Peer::start(
        &hub,
        "r1",
        "review",
        &answer(json!({"hits": [{"id": 1}, {"id": 2}]})),
    );
    let _b = Peer::start(
        &hub,
        "r2",
        "review",
        &answer(json!({"hits": [{"id": 2}, {"id": 3}]})),
    );
    wait_for_peers(&hub, 2).await;
    let out = hub.cli(&[
        "dispatch",
        "review",
        "{}",
        "--select",
        "entity=reviewers,cap=review",
        "--quorum",
        "any",
        "--reducer",
        "union",
        "--path",
        "/hits",
        "--key-path",
        "/id",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<i64> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
}
