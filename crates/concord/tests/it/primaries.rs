use crate::harness::*;
use concord_core::api::{PatchInstanceRequest, Role};
use concord_core::ErrorCode;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn registration_roles_ghosts_and_heartbeats() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (p, ps) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    assert_eq!(p.instance.role, Role::Primary);
    assert_eq!(p.fence, Some(1));
    let (s, ss) = register(&admin, reg("sisters", Role::Secondary, Some("test pane"))).await;
    assert_eq!(s.fence, None);

    // A second primary is refused and told who holds it.
    let err = admin
        .register(&reg("sisters", Role::Primary, Some("other")))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PrimaryHeld);
    assert_eq!(err.details["holder"], p.instance.id.as_str());

    // Heartbeats tell role, epoch and fence.
    let hb = ps.heartbeat(&p.instance.id).await.unwrap();
    assert_eq!((hb.role, hb.epoch, hb.fence), (Role::Primary, 1, Some(1)));
    let hb = ss.heartbeat(&s.instance.id).await.unwrap();
    assert_eq!((hb.role, hb.epoch, hb.fence), (Role::Secondary, 1, None));

    // An unlabelled secondary is a ghost: listed, and denied writes until labelled.
    let (g, gs) = register(&admin, reg("sisters", Role::Secondary, None)).await;
    let ghosts = admin.ghosts().await.unwrap().ghosts;
    assert!(ghosts
        .iter()
        .any(|x| x.instance.as_deref() == Some(g.instance.id.as_str()) && x.reason == "unlabeled"));
    let err = gs
        .campaign("sisters", &g.instance.id, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    gs.patch_instance(
        &g.instance.id,
        &PatchInstanceRequest {
            label: Some("heartbeat loop".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ghosts = admin.ghosts().await.unwrap().ghosts;
    assert!(!ghosts
        .iter()
        .any(|x| x.instance.as_deref() == Some(g.instance.id.as_str())));
    // Labelled now, it may campaign (and is told the role is held).
    assert_eq!(
        gs.campaign("sisters", &g.instance.id, None)
            .await
            .unwrap_err()
            .code,
        ErrorCode::PrimaryHeld
    );

    // A closed instance's heartbeat is unknown_instance and a ghost record.
    ss.close_instance(&s.instance.id).await.unwrap();
    let err = ss.heartbeat(&s.instance.id).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownInstance);
    let ghosts = admin.ghosts().await.unwrap().ghosts;
    assert!(ghosts
        .iter()
        .any(|x| x.instance.as_deref() == Some(s.instance.id.as_str()) && x.reason == "closed"));

    // Listings: live by default, all on request.
    let live = admin
        .list_instances(Some("sisters"), None, None)
        .await
        .unwrap()
        .instances;
    assert!(live.iter().all(|i| i.id != s.instance.id));
    let all = admin
        .list_instances(Some("sisters"), None, Some("all"))
        .await
        .unwrap()
        .instances;
    assert!(all
        .iter()
        .any(|i| i.id == s.instance.id && i.state.as_str() == "closed"));
    let e = admin.entity("sisters").await.unwrap();
    assert_eq!(e.primary.unwrap().id, p.instance.id);
    assert_eq!(e.epoch, 1);
}

#[tokio::test]
async fn fifty_campaigners_one_winner_per_epoch() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut members = Vec::new();
    for i in 0..50 {
        members.push(register(&admin, reg("race", Role::Secondary, Some(&format!("c{i}")))).await);
    }
    let members = Arc::new(members);
    let mut last_epoch = 0;
    for round in 0..5 {
        let barrier = Arc::new(tokio::sync::Barrier::new(members.len()));
        let mut tasks = Vec::new();
        for k in 0..members.len() {
            let (members, barrier) = (members.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let (r, c) = &members[k];
                barrier.wait().await;
                c.campaign("race", &r.instance.id, None).await
            }));
        }
        // Watch for two live primaries while the race runs.
        let watcher = {
            let admin = admin.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let e = admin.entity("race").await.unwrap();
                    let primaries = e
                        .instances
                        .iter()
                        .filter(|i| i.role == Role::Primary)
                        .count();
                    assert!(primaries <= 1, "two live primaries observed");
                }
            })
        };
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(g) => winners.push(g),
                Err(e) => assert_eq!(e.code, ErrorCode::PrimaryHeld, "round {round}: {e}"),
            }
        }
        watcher.await.unwrap();
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
        let g = &winners[0];
        assert!(g.epoch > last_epoch, "epochs strictly increase");
        assert_eq!(g.fence, g.epoch);
        last_epoch = g.epoch;
        let (_, c) = members
            .iter()
            .find(|(r, _)| r.instance.id == g.instance)
            .unwrap();
        c.resign("race").await.unwrap();
    }
}

#[tokio::test]
async fn stale_fences_are_rejected_after_transfer_and_expiry() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (a, sa) = register(&admin, reg("anvil", Role::Primary, Some("a"))).await;
    let (b, sb) = register(&admin, reg("anvil", Role::Secondary, Some("b"))).await;
    let fa = a.fence.unwrap();
    sa.put_state("anvil", "config", json!({"v": 1}), Some(fa), None)
        .await
        .unwrap();

    // Secondaries are fenced, whatever fence they claim.
    let err = sb
        .put_state("anvil", "config", json!({"v": 2}), Some(fa), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Fenced);

    // Transfer: a new epoch; the old primary's fence is dead.
    let g = sa.transfer("anvil", &b.instance.id).await.unwrap();
    assert_eq!(g.epoch, fa + 1);
    let err = sa
        .put_state("anvil", "config", json!({"v": 3}), Some(fa), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Fenced);
    assert_eq!(err.details["epoch"], g.epoch);
    // Even with the new epoch number, the old primary is not the primary.
    let err = sa
        .put_state("anvil", "config", json!({"v": 3}), Some(g.epoch), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Fenced);
    // The new primary with a missing or old fence is fenced too.
    assert_eq!(
        sb.put_state("anvil", "config", json!(4), None, None)
            .await
            .unwrap_err()
            .code,
        ErrorCode::Fenced
    );
    assert_eq!(
        sb.put_state("anvil", "config", json!(4), Some(fa), None)
            .await
            .unwrap_err()
            .code,
        ErrorCode::Fenced
    );
    let e = sb
        .put_state("anvil", "config", json!({"v": 5}), Some(g.epoch), None)
        .await
        .unwrap();
    assert_eq!(e.updated_by, b.instance.id);
    // Heartbeats tell the old primary it lost the role.
    let hb = sa.heartbeat(&a.instance.id).await.unwrap();
    assert_eq!((hb.role, hb.fence), (Role::Secondary, None));

    // Compare-and-set on revisions.
    let err = sb
        .put_state(
            "anvil",
            "config",
            json!(6),
            Some(g.epoch),
            Some(e.revision - 1),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    sb.put_state("anvil", "config", json!(6), Some(g.epoch), Some(e.revision))
        .await
        .unwrap();
    assert_eq!(
        sb.put_state("anvil", "fresh", json!(1), Some(g.epoch), Some(0))
            .await
            .unwrap()
            .value,
        json!(1)
    );
    assert_eq!(
        sb.put_state("anvil", "fresh", json!(2), Some(g.epoch), Some(0))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Conflict
    );
    // Admin writes without a fence; deletes are fenced like writes.
    admin
        .put_state("anvil", "ops/note", json!("hi"), None, None)
        .await
        .unwrap();
    assert_eq!(
        sa.delete_state("anvil", "ops/note", Some(fa))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Fenced
    );
    assert!(
        sb.delete_state("anvil", "ops/note", Some(g.epoch))
            .await
            .unwrap()
            .deleted
    );
    let keys: HashSet<String> = admin
        .list_state("anvil")
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["config".to_string(), "fresh".to_string()])
    );
    assert_eq!(
        admin.get_state("anvil", "config").await.unwrap().value,
        json!(6)
    );

    // Resign: the primary stays live as a secondary, and its fence dies.
    sb.resign("anvil").await.unwrap();
    assert_eq!(
        sb.put_state("anvil", "config", json!(7), Some(g.epoch), None)
            .await
            .unwrap_err()
            .code,
        ErrorCode::Fenced
    );
    let hb = sb.heartbeat(&b.instance.id).await.unwrap();
    assert_eq!(hb.role, Role::Secondary);
}

#[tokio::test]
async fn a_silent_primary_loses_the_role_within_ttl_plus_one_second() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut r = reg("quiet", Role::Primary, Some("main"));
    r.ttl_ms = Some(1_000);
    let (p, ps) = register(&admin, r).await;
    let (s, ss) = register(&admin, reg("quiet", Role::Secondary, Some("standby"))).await;
    let last_beat = Instant::now();
    ps.heartbeat(&p.instance.id).await.unwrap();
    let lost_at = eventually(Duration::from_secs(5), "the primary to expire", || {
        let admin = admin.clone();
        async move {
            let e = admin.entity("quiet").await.unwrap();
            e.primary.is_none().then(Instant::now)
        }
    })
    .await;
    let took = lost_at.duration_since(last_beat);
    assert!(
        took <= Duration::from_millis(2_000),
        "role released {took:?} after the last heartbeat (ttl 1 s)"
    );
    let inst = admin.get_instance(&p.instance.id).await.unwrap();
    assert_eq!(inst.state.as_str(), "expired");
    // Its writes are fenced, its heartbeats unknown.
    let err = ps
        .put_state("quiet", "k", json!(1), p.fence, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code, ErrorCode::Fenced | ErrorCode::Forbidden),
        "{err}"
    );
    assert_eq!(
        ps.heartbeat(&p.instance.id).await.unwrap_err().code,
        ErrorCode::UnknownInstance
    );
    // The next campaign gets epoch + 1.
    let g = ss.campaign("quiet", &s.instance.id, None).await.unwrap();
    assert_eq!(g.epoch, p.fence.unwrap() + 1);
}

#[tokio::test]
async fn campaign_waits_for_the_role_like_etcd() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (p, ps) = register(&admin, reg("wait", Role::Primary, Some("main"))).await;
    let (s, ss) = register(&admin, reg("wait", Role::Secondary, Some("next"))).await;
    let waiter =
        tokio::spawn(async move { ss.campaign("wait", &s.instance.id, Some(10_000)).await });
    // The waiter is blocked while the role is held...
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    ps.close_instance(&p.instance.id).await.unwrap();
    let g = waiter.await.unwrap().unwrap();
    assert_eq!(g.epoch, 2);
    // ...and a campaign that waits too little is told who holds it.
    let (o, os) = register(&admin, reg("wait", Role::Secondary, Some("late"))).await;
    let err = os
        .campaign("wait", &o.instance.id, Some(200))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PrimaryHeld);
}

#[tokio::test]
async fn routing_by_primary_and_version() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut r1 = reg("router", Role::Secondary, Some("old"));
    r1.version = Some("v1".into());
    let (v1, _) = register(&admin, r1).await;
    assert_eq!(
        admin.route("router").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let mut r3 = reg("router", Role::Primary, Some("new"));
    r3.version = Some("v3".into());
    let (v3, _) = register(&admin, r3).await;
    assert_eq!(admin.route("router").await.unwrap().id, v3.instance.id);
    assert_eq!(admin.route("router:v1").await.unwrap().id, v1.instance.id);
    assert_eq!(admin.route("router:v3").await.unwrap().id, v3.instance.id);
    assert_eq!(
        admin.route("router:v9").await.unwrap_err().code,
        ErrorCode::NotFound
    );
}
