//! Shared circuit breakers through HTTP and the CLI (DESIGN §8).

use crate::harness::*;
use concord_core::api::{BreakerState, ObservationRequest, Role};
use concord_core::ErrorCode;
use std::sync::Arc;
use tokio::sync::Barrier;

const RULE: &str =
    "provider:*=window_ms=60000,min_samples=4,error_rate=0.5,open_ms=300,min_instances=2,probe_ms=60000";

fn o(subject: &str, outcome: &str, probe: Option<&str>) -> ObservationRequest {
    ObservationRequest {
        subject: subject.into(),
        outcome: outcome.into(),
        latency_ms: Some(840),
        detail: Some("HTTP 529 overloaded".into()),
        probe_id: probe.map(str::to_string),
        idempotency_key: None,
    }
}

#[tokio::test]
async fn fleet_trips_a_breaker_and_exactly_one_probe_closes_it() {
    let hub = Hub::start_with(&["--breaker", RULE]);
    let admin = hub.admin();
    let (a, ca) = register(&admin, reg("fleet", Role::Secondary, Some("a"))).await;
    let (b, cb) = register(&admin, reg("fleet", Role::Secondary, Some("b"))).await;
    let s = "provider:kimi/k2p5";
    // One instance alone cannot trip it (min_instances=2), even with a batch.
    let r = ca
        .observe_batch((0..5).map(|_| o(s, "error", None)).collect())
        .await
        .unwrap();
    assert_eq!(r.accepted, 5);
    assert_eq!(admin.breaker(s).await.unwrap().state, BreakerState::Closed);
    cb.observe(&o(s, "timeout", None)).await.unwrap();
    let v = admin.breaker(s).await.unwrap();
    assert_eq!(v.state, BreakerState::Open);
    assert_eq!(v.samples, 6);
    assert_eq!(v.p50_ms, Some(840));
    let hosts: Vec<&str> = v.opened_by["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["testhost", "testhost"]);
    let open = admin.breakers(Some(BreakerState::Open)).await.unwrap();
    assert_eq!(open.breakers.len(), 1);

    // Wait for half-open, then many concurrent probe requests: one granted.
    let retry = v.retry_at.unwrap();
    eventually(std::time::Duration::from_secs(10), "half open", || {
        let admin = admin.clone();
        async move {
            (admin.breaker(s).await.unwrap().state == BreakerState::HalfOpen).then_some(())
        }
    })
    .await;
    assert!(concord_core::Timestamp::now() >= retry);
    const N: usize = 24;
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                c.probe(s).await.unwrap()
            })
        })
        .collect();
    let mut grants = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.granted {
            grants.push(r);
        } else {
            assert!(
                r.retry_at.is_some(),
                "a denied probe says when to ask again"
            );
        }
    }
    assert_eq!(grants.len(), 1, "exactly one probe fleet-wide");
    let probe_id = grants[0].probe_id.clone().unwrap();
    // The probe id is what ties the report to the grant.
    ca.observe(&o(s, "ok", Some(&probe_id))).await.unwrap();
    assert_eq!(admin.breaker(s).await.unwrap().state, BreakerState::Closed);
    let page = admin
        .read_events("sys.breaker.>", Some(0), 1000, 0)
        .await
        .unwrap();
    let topics: Vec<String> = page.events.iter().map(|e| e.topic.clone()).collect();
    let opened = page
        .events
        .iter()
        .find(|e| e.topic == "sys.breaker.opened")
        .unwrap();
    assert_eq!(
        opened.source.instance.as_deref(),
        Some(b.instance.id.as_str())
    );
    let granted = page
        .events
        .iter()
        .find(|e| e.topic == "sys.breaker.probe_granted")
        .unwrap();
    assert!(
        granted.data["prober"] == a.instance.id.as_str()
            || granted.data["prober"] == b.instance.id.as_str()
    );
    assert!(
        topics.contains(&"sys.breaker.closed".to_string()),
        "{topics:?}"
    );
}

#[tokio::test]
async fn bad_observations_name_the_field_and_need_a_session() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, c) = register(&admin, reg("fleet", Role::Secondary, Some("a"))).await;
    let e = c.observe(&o("provider:x", "meh", None)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.details["field"], "outcome");
    let e = c
        .observe_batch(vec![
            o("provider:x", "ok", None),
            o("bad subject", "ok", None),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.details["field"], "observations[1].subject");
    let mut neg = o("provider:x", "ok", None);
    neg.latency_ms = Some(-1);
    assert_eq!(
        c.observe(&neg).await.unwrap_err().details["field"],
        "latency_ms"
    );
    // Provenance comes from a session: an admin token has none.
    assert_eq!(
        admin
            .observe(&o("provider:x", "ok", None))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    assert_eq!(
        admin.breaker("provider:x").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    // Nothing was recorded by the rejected requests.
    assert!(admin.breakers(None).await.unwrap().breakers.is_empty());
}

#[tokio::test]
async fn one_writer_cannot_flood_observations() {
    let hub = Hub::start_with(&["--observe-rate", "5"]);
    let admin = hub.admin();
    let (_, c) = register(&admin, reg("fleet", Role::Secondary, Some("a"))).await;
    let e = c
        .observe_batch((0..50).map(|_| o("provider:y", "error", None)).collect())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::RateLimited);
    let out = hub.cli(&["breaker", "list"]);
    assert!(out.status.success());
}
