//! Shared circuit breakers and resource leases (DESIGN §8) on both backends.

use crate::harness::*;
use concord_core::api::{InstanceState, Role};
use concord_core::breaker::{BreakerState, Outcome, Policies, Policy, Sample};
use concord_core::lease::LeaseMode;
use concord_core::{ids, ErrorCode};
use concord_store::{
    DynStore, LeaseFilter, NewLease, NewObservation, Prober, LEASE_EXPIRED, LEASE_RELEASED,
};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Barrier;

conformance!(
    breaker_needs_distinct_instances_then_trips_probes_and_closes,
    failed_probe_reopens_the_breaker,
    concurrent_probes_grant_exactly_one,
    observations_older_than_the_window_are_ignored,
    lease_overlap_modes_fences_and_idempotency,
    concurrent_exclusive_acquires_have_one_winner,
    leases_die_with_their_holder,
    leases_expire_at_their_ttl,
    only_the_holder_renews_or_releases,
);

fn policies() -> Policies {
    Policies {
        rules: vec![(
            "provider:*".into(),
            Policy {
                window_ms: 60_000,
                min_samples: 4,
                error_rate: 0.5,
                open_ms: 200,
                min_instances: 2,
                probe_ms: 60_000,
            },
        )],
        default: Policy::default(),
    }
}

fn obs(inst: &str, subject: &str, outcome: Outcome, probe: Option<&str>) -> NewObservation {
    NewObservation {
        subject: subject.into(),
        sample: Sample {
            outcome,
            latency_ms: Some(840),
            instance: inst.into(),
            entity: Some("fleet".into()),
            host: Some("laptop".into()),
            detail: Some(format!("{outcome:?} from {inst}")),
            probe_id: probe.map(str::to_string),
            at: 0,
        },
        token: "tok_t".into(),
        idempotency: None,
    }
}

fn prober(inst: &str) -> Prober {
    Prober {
        instance: inst.into(),
        entity: Some("fleet".into()),
        token: "tok_t".into(),
    }
}

async fn two(store: &DynStore) -> (String, String) {
    let a = register(store, "fleet", Role::Secondary, Some("a")).await;
    let b = register(store, "fleet", Role::Secondary, Some("b")).await;
    (a.instance.id, b.instance.id)
}

/// Trips the breaker of `subject` with failures from two instances.
async fn trip(store: &DynStore, a: &str, b: &str, subject: &str) {
    let p = policies();
    for inst in [a, b, a, b] {
        store
            .observe(vec![obs(inst, subject, Outcome::Error, None)], &p)
            .await
            .unwrap();
    }
}

async fn breaker_needs_distinct_instances_then_trips_probes_and_closes(store: DynStore) {
    let p = policies();
    let (a, b) = two(&store).await;
    let s = "provider:kimi/k2p5";
    let before = store.last_event_seq().await.unwrap();
    let batch: Vec<_> = (0..6).map(|_| obs(&a, s, Outcome::Error, None)).collect();
    store.observe(batch, &p).await.unwrap();
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    assert_eq!(
        v.state,
        BreakerState::Closed,
        "one instance alone must not trip it"
    );
    assert_eq!(v.samples, 6);
    assert_eq!(v.error_rate, 1.0);
    assert_eq!(v.p95_ms, Some(840));
    store
        .observe(vec![obs(&b, s, Outcome::Timeout, None)], &p)
        .await
        .unwrap();
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    assert_eq!(v.state, BreakerState::Open);
    let who: HashSet<String> = v.opened_by["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(who, HashSet::from([a.clone(), b.clone()]));
    let events = events_after(&store, before).await;
    let opened: Vec<_> = events
        .iter()
        .filter(|e| e.topic == "sys.breaker.opened")
        .collect();
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].data["subject"], s);
    assert_eq!(opened[0].source.instance.as_deref(), Some(b.as_str()));
    let open = store
        .list_breakers(Some(BreakerState::Open), &p)
        .await
        .unwrap();
    assert_eq!(open.len(), 1);

    // Open: no probe until retry_at.
    let r = store.probe_breaker(s, &p, prober(&a)).await.unwrap();
    assert!(!r.granted);
    let retry = r.retry_at.expect("retry_at while open");
    wait_until_past(&store, retry.millis()).await;
    let g = store.probe_breaker(s, &p, prober(&a)).await.unwrap();
    assert!(g.granted, "{g:?}");
    let d = store.probe_breaker(s, &p, prober(&b)).await.unwrap();
    assert!(!d.granted);
    assert_eq!(d.state, BreakerState::HalfOpen);
    // An observation that is not the probe's changes nothing.
    store
        .observe(vec![obs(&b, s, Outcome::Ok, None)], &p)
        .await
        .unwrap();
    assert_eq!(
        store.get_breaker(s, &p).await.unwrap().unwrap().state,
        BreakerState::HalfOpen
    );
    store
        .observe(vec![obs(&a, s, Outcome::Ok, g.probe_id.as_deref())], &p)
        .await
        .unwrap();
    assert_eq!(
        store.get_breaker(s, &p).await.unwrap().unwrap().state,
        BreakerState::Closed
    );
    let topics: Vec<String> = events_after(&store, before)
        .await
        .into_iter()
        .filter(|e| e.topic.starts_with("sys.breaker."))
        .map(|e| e.topic)
        .collect();
    assert_eq!(
        topics,
        [
            "sys.breaker.opened",
            "sys.breaker.half_open",
            "sys.breaker.probe_granted",
            "sys.breaker.closed"
        ]
    );
}

async fn failed_probe_reopens_the_breaker(store: DynStore) {
    let p = policies();
    let (a, b) = two(&store).await;
    let s = "provider:flaky";
    trip(&store, &a, &b, s).await;
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    wait_until_past(&store, v.retry_at.unwrap().millis()).await;
    // The reaper's sweep writes the half-open transition.
    assert_eq!(store.advance_breakers(&p).await.unwrap(), 1);
    assert_eq!(store.advance_breakers(&p).await.unwrap(), 0);
    let g = store.probe_breaker(s, &p, prober(&b)).await.unwrap();
    assert!(g.granted);
    store
        .observe(vec![obs(&b, s, Outcome::Error, g.probe_id.as_deref())], &p)
        .await
        .unwrap();
    let v2 = store.get_breaker(s, &p).await.unwrap().unwrap();
    assert_eq!(v2.state, BreakerState::Open);
    assert!(v2.retry_at.unwrap() > v.retry_at.unwrap());
}

async fn concurrent_probes_grant_exactly_one(store: DynStore) {
    let p = policies();
    let (a, b) = two(&store).await;
    let s = "provider:contended";
    trip(&store, &a, &b, s).await;
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    wait_until_past(&store, v.retry_at.unwrap().millis()).await;
    const N: usize = 32;
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (store, barrier, p) = (store.clone(), barrier.clone(), p.clone());
            let who = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                barrier.wait().await;
                store.probe_breaker(s, &p, prober(&who)).await.unwrap()
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        if t.await.unwrap().granted {
            granted += 1;
        }
    }
    assert_eq!(granted, 1, "exactly one probe fleet-wide");
}

async fn observations_older_than_the_window_are_ignored(store: DynStore) {
    let p = Policies {
        rules: vec![],
        default: Policy {
            window_ms: 1_000,
            min_samples: 3,
            ..Policy::default()
        },
    };
    let (a, _) = two(&store).await;
    let s = "tool:grep";
    store
        .observe(
            vec![
                obs(&a, s, Outcome::Error, None),
                obs(&a, s, Outcome::Error, None),
            ],
            &p,
        )
        .await
        .unwrap();
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    assert_eq!(v.samples, 2);
    wait_until_past(&store, v.last_observed_at.unwrap().millis() + 1_000).await;
    assert_eq!(store.get_breaker(s, &p).await.unwrap().unwrap().samples, 0);
    // A third failure now is alone in its window: below min_samples, no trip.
    store
        .observe(vec![obs(&a, s, Outcome::Error, None)], &p)
        .await
        .unwrap();
    let v = store.get_breaker(s, &p).await.unwrap().unwrap();
    assert_eq!(v.samples, 1);
    assert_eq!(v.state, BreakerState::Closed);
}

fn lease(holder: &str, resource: &str, mode: LeaseMode, key: Option<&str>) -> NewLease {
    NewLease {
        id: ids::new_id(ids::LEASE),
        resource: resource.into(),
        mode,
        ttl_ms: 60_000,
        reason: Some(format!("work on {resource}")),
        idempotency_key: key.map(str::to_string),
        holder: holder.into(),
        entity: Some("fleet".into()),
        token: "tok_t".into(),
    }
}

async fn lease_overlap_modes_fences_and_idempotency(store: DynStore) {
    let (a, b) = two(&store).await;
    let (l1, dup) = store
        .acquire_lease(lease(&a, "src/**", LeaseMode::Exclusive, Some("k1")))
        .await
        .unwrap();
    assert!(!dup);
    let (again, dup) = store
        .acquire_lease(lease(&a, "src/**", LeaseMode::Exclusive, Some("k1")))
        .await
        .unwrap();
    assert!(dup);
    assert_eq!(again.id, l1.id);
    let e = expect_err(
        store
            .acquire_lease(lease(&b, "src/a.rs", LeaseMode::Shared, None))
            .await,
        ErrorCode::LeaseConflict,
    );
    let c = &e.details["conflicts"][0];
    assert_eq!(c["holder"], a.as_str());
    assert_eq!(c["reason"], "work on src/**");
    assert!(c["expires_at"].is_string());
    // Disjoint resources and shared-with-shared coexist; fences grow.
    let (l2, _) = store
        .acquire_lease(lease(&b, "docs/*.md", LeaseMode::Shared, None))
        .await
        .unwrap();
    let (l3, _) = store
        .acquire_lease(lease(&a, "docs/readme.md", LeaseMode::Shared, None))
        .await
        .unwrap();
    assert!(l1.fence < l2.fence && l2.fence < l3.fence);
    expect_err(
        store
            .acquire_lease(lease(&b, "docs/", LeaseMode::Exclusive, None))
            .await,
        ErrorCode::LeaseConflict,
    );
    let by_res = store
        .list_leases(LeaseFilter {
            resource: Some("docs/readme.md".into()),
            holder: None,
        })
        .await
        .unwrap();
    assert_eq!(by_res.len(), 2);
    let by_holder = store
        .list_leases(LeaseFilter {
            resource: None,
            holder: Some(a.clone()),
        })
        .await
        .unwrap();
    assert_eq!(by_holder.len(), 2);
}

async fn concurrent_exclusive_acquires_have_one_winner(store: DynStore) {
    const N: usize = 16;
    let mut holders = Vec::new();
    for i in 0..N {
        holders.push(
            register(&store, "racers", Role::Secondary, Some(&format!("r{i}")))
                .await
                .instance
                .id,
        );
    }
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = holders
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (store, barrier, h) = (store.clone(), barrier.clone(), h.clone());
            // Different but overlapping globs.
            let res = [
                "src/**",
                "src/parser/*.rs",
                "src/parser/mod.rs",
                "**/mod.rs",
            ][i % 4];
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .acquire_lease(lease(&h, res, LeaseMode::Exclusive, None))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::LeaseConflict, "{e:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(
        store
            .list_leases(LeaseFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn leases_die_with_their_holder(store: DynStore) {
    let (a, b) = two(&store).await;
    store
        .acquire_lease(lease(&a, "repo:/src/**", LeaseMode::Exclusive, None))
        .await
        .unwrap();
    let before = store.last_event_seq().await.unwrap();
    let inst = store.get_instance(&a).await.unwrap().unwrap();
    store.close_instance(&a, &session(&inst)).await.unwrap();
    assert!(store
        .list_leases(LeaseFilter::default())
        .await
        .unwrap()
        .is_empty());
    let ev = events_after(&store, before).await;
    let rel = ev
        .iter()
        .find(|e| e.topic == LEASE_RELEASED)
        .expect("released event");
    assert_eq!(rel.data["why"], "holder_ended");
    assert_eq!(rel.data["holder"], a.as_str());
    // The resource is free for the next holder; a closed holder cannot acquire.
    store
        .acquire_lease(lease(&b, "repo:/src/x.rs", LeaseMode::Exclusive, None))
        .await
        .unwrap();
    expect_err(
        store
            .acquire_lease(lease(&a, "other", LeaseMode::Exclusive, None))
            .await,
        ErrorCode::UnknownInstance,
    );

    // Expiry of the holder by its durable lease releases too.
    let short = register_with(
        &store,
        request("fleet", Role::Secondary, Some("short")),
        1_000,
    )
    .await
    .instance;
    store
        .acquire_lease(lease(&short.id, "db:prod", LeaseMode::Exclusive, None))
        .await
        .unwrap();
    wait_until_past(&store, short.lease_until.millis()).await;
    let expired = store.expire_due(100).await.unwrap();
    assert!(expired
        .iter()
        .any(|i| i.id == short.id && i.state == InstanceState::Expired));
    assert!(store
        .list_leases(LeaseFilter {
            resource: Some("db:prod".into()),
            holder: None
        })
        .await
        .unwrap()
        .is_empty());
}

async fn leases_expire_at_their_ttl(store: DynStore) {
    let (a, b) = two(&store).await;
    let mut l = lease(&a, "db:prod", LeaseMode::Exclusive, None);
    l.ttl_ms = 1_000;
    let (held, _) = store.acquire_lease(l).await.unwrap();
    expect_err(
        store
            .acquire_lease(lease(&b, "db:prod", LeaseMode::Exclusive, None))
            .await,
        ErrorCode::LeaseConflict,
    );
    wait_until_past(&store, held.expires_at.millis()).await;
    // Past its TTL it no longer conflicts, even before the reaper ran.
    assert!(store
        .list_leases(LeaseFilter::default())
        .await
        .unwrap()
        .is_empty());
    let before = store.last_event_seq().await.unwrap();
    let gone = store.expire_leases(100).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, held.id);
    assert!(topics_of(&events_after(&store, before).await).contains(&LEASE_EXPIRED));
    assert!(store.expire_leases(100).await.unwrap().is_empty());
    store
        .acquire_lease(lease(&b, "db:prod", LeaseMode::Exclusive, None))
        .await
        .unwrap();
}

async fn only_the_holder_renews_or_releases(store: DynStore) {
    let (a, b) = two(&store).await;
    let (l, _) = store
        .acquire_lease(lease(&a, "src/lib.rs", LeaseMode::Exclusive, None))
        .await
        .unwrap();
    expect_err(
        store.renew_lease(&l.id, &b, 5_000).await,
        ErrorCode::Forbidden,
    );
    let r = store.renew_lease(&l.id, &a, 120_000).await.unwrap();
    assert!(r.expires_at > l.expires_at);
    let binst = store.get_instance(&b).await.unwrap().unwrap();
    expect_err(
        store.release_lease(&l.id, Some(&b), &session(&binst)).await,
        ErrorCode::Forbidden,
    );
    let ainst = store.get_instance(&a).await.unwrap().unwrap();
    store
        .release_lease(&l.id, Some(&a), &session(&ainst))
        .await
        .unwrap();
    expect_err(
        store.release_lease(&l.id, Some(&a), &session(&ainst)).await,
        ErrorCode::NotFound,
    );
    let (l2, _) = store
        .acquire_lease(lease(&b, "src/lib.rs", LeaseMode::Exclusive, None))
        .await
        .unwrap();
    let before = store.last_event_seq().await.unwrap();
    store.release_lease(&l2.id, None, &admin()).await.unwrap();
    let ev = events_after(&store, before).await;
    assert_eq!(ev[0].topic, LEASE_RELEASED);
    assert_eq!(ev[0].data["why"], "forced");
}
