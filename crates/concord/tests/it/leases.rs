//! Resource leases through HTTP and the CLI (DESIGN §8).

use crate::harness::*;
use concord_core::api::{AcquireLeaseRequest, LeaseMode, Role};
use concord_core::ErrorCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

fn acq(resource: &str, mode: LeaseMode) -> AcquireLeaseRequest {
    AcquireLeaseRequest {
        resource: resource.into(),
        mode,
        ttl_ms: Some(600_000),
        reason: Some("refactor parser".into()),
        idempotency_key: None,
    }
}

#[tokio::test]
async fn concurrent_exclusive_acquires_on_overlapping_globs_have_one_winner() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut sessions = Vec::new();
    for i in 0..8 {
        sessions.push(
            register(&admin, reg("devs", Role::Secondary, Some(&format!("d{i}"))))
                .await
                .1,
        );
    }
    let barrier = Arc::new(Barrier::new(sessions.len()));
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, barrier) = (c.clone(), barrier.clone());
            let res = [
                "repo:/src/**",
                "repo:/src/a.rs",
                "repo:/src/",
                "repo:/**/*.rs",
            ][i % 4];
            tokio::spawn(async move {
                barrier.wait().await;
                c.acquire_lease(&acq(res, LeaseMode::Exclusive)).await
            })
        })
        .collect();
    let mut wins = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(env) => wins.push(env.lease),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::LeaseConflict);
                let c = &e.details["conflicts"][0];
                assert_eq!(c["reason"], "refactor parser");
                assert!(c["holder"].as_str().unwrap().starts_with("ins_"));
            }
        }
    }
    assert_eq!(wins.len(), 1);
    assert!(wins[0].id.starts_with("lse_"));
    // Shared leases on a disjoint tree coexist; fences grow.
    let s1 = sessions[1]
        .acquire_lease(&acq("repo:/docs/*.md", LeaseMode::Shared))
        .await
        .unwrap();
    let s2 = sessions[2]
        .acquire_lease(&acq("repo:/docs/a.md", LeaseMode::Shared))
        .await
        .unwrap();
    assert!(wins[0].fence < s1.lease.fence && s1.lease.fence < s2.lease.fence);
    let listed = admin.leases(Some("repo:/docs/a.md"), None).await.unwrap();
    assert_eq!(listed.leases.len(), 2);
    // Idempotent acquire returns the same lease.
    let mut k = acq("db:prod", LeaseMode::Exclusive);
    k.idempotency_key = Some("once".into());
    let first = sessions[3].acquire_lease(&k).await.unwrap();
    let again = sessions[3].acquire_lease(&k).await.unwrap();
    assert_eq!(first.lease.id, again.lease.id);
    assert!(again.deduplicated);
    // Holder renews and releases; a stranger cannot; admin can force.
    assert_eq!(
        sessions[4]
            .release_lease(&first.lease.id, false)
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    sessions[3]
        .renew_lease(&first.lease.id, Some(900_000))
        .await
        .unwrap();
    sessions[3]
        .release_lease(&first.lease.id, false)
        .await
        .unwrap();
    admin.release_lease(&s1.lease.id, true).await.unwrap();
    assert_eq!(
        sessions[1]
            .release_lease(&s1.lease.id, false)
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn bad_lease_requests_name_the_field() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, c) = register(&admin, reg("devs", Role::Secondary, Some("a"))).await;
    for (res, field) in [
        ("src/{a,b}.rs", "resource"),
        ("src/a**", "resource"),
        ("src/[ab", "resource"),
    ] {
        let e = c
            .acquire_lease(&acq(res, LeaseMode::Exclusive))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{res}");
        assert_eq!(e.details["field"], field);
    }
    let mut t = acq("src/a.rs", LeaseMode::Exclusive);
    t.ttl_ms = Some(10);
    assert_eq!(
        c.acquire_lease(&t).await.unwrap_err().details["field"],
        "ttl_ms"
    );
    let e: concord_core::Error = c
        .call::<_, serde_json::Value>(
            reqwest::Method::POST,
            "/v1/leases",
            Some(&serde_json::json!({"resource": "a", "mode": "sometimes"})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.details["field"], "mode");
    // Leases are held by instances: an admin token cannot acquire.
    assert_eq!(
        admin
            .acquire_lease(&acq("a", LeaseMode::Exclusive))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    assert!(admin.leases(None, None).await.unwrap().leases.is_empty());
}

#[tokio::test]
async fn a_dead_holder_loses_its_leases_and_lease_check_sees_them() {
    let hub = Hub::start();
    let admin = hub.admin();
    let mut req = reg("devs", Role::Secondary, Some("mortal"));
    req.ttl_ms = Some(1_000);
    let (dead, c) = register(&admin, req).await;
    let l = c
        .acquire_lease(&acq("repo:/src/**", LeaseMode::Exclusive))
        .await
        .unwrap()
        .lease;

    // While it lives, `lease check` blocks a commit touching the tree.
    let out = hub.cli(&[
        "lease",
        "check",
        "--prefix",
        "repo:/",
        "src/parser.rs",
        "README.md",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&l.holder));
    let ok = hub.cli(&["lease", "check", "--prefix", "repo:/", "README.md"]);
    assert!(ok.status.success());
    let own = hub.cli(&[
        "lease",
        "check",
        "--prefix",
        "repo:/",
        "--instance",
        &dead.instance.id,
        "src/parser.rs",
    ]);
    assert!(
        own.status.success(),
        "the holder's own lease is not a conflict"
    );

    // No heartbeats: gone within its TTL + 1 s (plus the reaper's period).
    let start = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the dead holder's lease released",
        || {
            let admin = admin.clone();
            async move {
                admin
                    .leases(None, None)
                    .await
                    .unwrap()
                    .leases
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_millis(2_500),
        "took {:?}",
        start.elapsed()
    );
    let page = admin
        .read_events("sys.lease.>", Some(0), 100, 0)
        .await
        .unwrap();
    let rel = page
        .events
        .iter()
        .find(|e| e.topic == "sys.lease.released")
        .expect("released event");
    assert_eq!(rel.data["why"], "holder_ended");
    assert_eq!(rel.data["id"], l.id.as_str());
    let ok = hub.cli(&["lease", "check", "--prefix", "repo:/", "src/parser.rs"]);
    assert!(ok.status.success());
}
