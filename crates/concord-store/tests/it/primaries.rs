//! Primary election: campaign, resign, transfer, routing.

use crate::harness::*;
use concord_core::api::{InstanceState, Role};
use concord_core::ErrorCode;
use concord_store::{topics, DynStore};
use serde_json::json;

conformance!(
    campaign_resign_transfer_increase_the_epoch,
    campaign_and_transfer_need_a_live_member,
    campaign_takes_over_a_lapsed_primary,
    route_with_and_without_version,
);

async fn role_of(store: &DynStore, id: &str) -> Role {
    store.get_instance(id).await.unwrap().unwrap().role
}

async fn campaign_resign_transfer_increase_the_epoch(store: DynStore) {
    let a = register(&store, "sisters", Role::Secondary, Some("a"))
        .await
        .instance;
    let b = register(&store, "sisters", Role::Secondary, Some("b"))
        .await
        .instance;
    let c = register(&store, "sisters", Role::Secondary, Some("c"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();

    let g = store.campaign("sisters", &a.id).await.unwrap();
    assert_eq!(
        (g.instance.as_str(), g.epoch, g.fence),
        (a.id.as_str(), 1, 1)
    );
    assert_eq!(role_of(&store, &a.id).await, Role::Primary);
    let seq = store.last_event_seq().await.unwrap();
    let again = store.campaign("sisters", &a.id).await.unwrap();
    assert_eq!(again, g, "re-campaigning by the primary is idempotent");
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        seq,
        "and grants nothing new"
    );

    let e = expect_err(
        store.campaign("sisters", &b.id).await,
        ErrorCode::PrimaryHeld,
    );
    assert_eq!(e.details["holder"], a.id.as_str());
    assert_eq!(e.details["epoch"], 1);

    let e = expect_err(
        store.resign("sisters", Some(&b.id)).await,
        ErrorCode::Fenced,
    );
    assert_eq!(e.details["epoch"], 1);
    let r = store.resign("sisters", Some(&a.id)).await.unwrap();
    assert_eq!((r.instance.as_str(), r.epoch), (a.id.as_str(), 1));
    assert_eq!(
        role_of(&store, &a.id).await,
        Role::Secondary,
        "a resigned primary stays live as a secondary"
    );
    assert_eq!(
        store.get_instance(&a.id).await.unwrap().unwrap().state,
        InstanceState::Live
    );
    assert_eq!(store.entity_epoch("sisters").await.unwrap(), (1, None));
    expect_err(
        store.resign("sisters", Some(&a.id)).await,
        ErrorCode::Conflict,
    );

    let g = store.campaign("sisters", &b.id).await.unwrap();
    assert_eq!(g.epoch, 2);
    let e = expect_err(
        store.transfer("sisters", Some(&c.id), &a.id).await,
        ErrorCode::Fenced,
    );
    assert_eq!(
        e.details["epoch"], 2,
        "a non-primary cannot hand the role over"
    );
    assert_eq!(role_of(&store, &b.id).await, Role::Primary);

    let g = store.transfer("sisters", Some(&b.id), &c.id).await.unwrap();
    assert_eq!(
        (g.instance.as_str(), g.epoch, g.fence),
        (c.id.as_str(), 3, 3)
    );
    assert_eq!(
        (role_of(&store, &b.id).await, role_of(&store, &c.id).await),
        (Role::Secondary, Role::Primary)
    );
    let same = store.transfer("sisters", Some(&c.id), &c.id).await.unwrap();
    assert_eq!(same.epoch, 3, "a transfer to the holder changes nothing");

    let g = store.transfer("sisters", None, &a.id).await.unwrap();
    assert_eq!(g.epoch, 4, "admin transfer");
    let r = store.resign("sisters", None).await.unwrap();
    assert_eq!(
        (r.instance.as_str(), r.epoch),
        (a.id.as_str(), 4),
        "admin resign removes whoever holds it"
    );
    expect_err(store.resign("sisters", None).await, ErrorCode::Conflict);
    let g = store.transfer("sisters", None, &b.id).await.unwrap();
    assert_eq!(g.epoch, 5, "an admin transfer with no holder grants");

    let events = events_after(&store, before).await;
    let grants: Vec<(&str, u64, Option<&str>)> = events
        .iter()
        .filter(|e| e.topic == topics::PRIMARY_GRANTED || e.topic == topics::PRIMARY_TRANSFERRED)
        .map(|e| {
            (
                e.data["instance"].as_str().unwrap(),
                e.data["epoch"].as_u64().unwrap(),
                e.data["from"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        grants,
        [
            (a.id.as_str(), 1, None),
            (b.id.as_str(), 2, None),
            (c.id.as_str(), 3, Some(b.id.as_str())),
            (a.id.as_str(), 4, Some(c.id.as_str())),
            (b.id.as_str(), 5, None),
        ],
        "each grant has its own, strictly higher epoch"
    );
    assert_eq!(
        topics_of(&events),
        [
            topics::PRIMARY_GRANTED,
            topics::PRIMARY_RELEASED,
            topics::PRIMARY_GRANTED,
            topics::PRIMARY_TRANSFERRED,
            topics::PRIMARY_TRANSFERRED,
            topics::PRIMARY_RELEASED,
            topics::PRIMARY_TRANSFERRED,
        ]
    );
    assert_eq!(
        events[1].data,
        json!({"entity": "sisters", "instance": a.id, "epoch": 1, "reason": "resigned"})
    );
}

async fn campaign_and_transfer_need_a_live_member(store: DynStore) {
    let a = register(&store, "sisters", Role::Secondary, Some("a"))
        .await
        .instance;
    let foreign = register(&store, "anvil", Role::Secondary, Some("x"))
        .await
        .instance;
    let e = expect_err(
        store.campaign("sisters", &foreign.id).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "instance");
    expect_err(
        store.campaign("sisters", "ins_missing").await,
        ErrorCode::UnknownInstance,
    );
    let e = expect_err(
        store.transfer("sisters", None, &foreign.id).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "to");
    store.close_instance(&a.id, &admin()).await.unwrap();
    expect_err(
        store.campaign("sisters", &a.id).await,
        ErrorCode::UnknownInstance,
    );
    expect_err(
        store.transfer("sisters", None, &a.id).await,
        ErrorCode::UnknownInstance,
    );
    assert_eq!(
        store.entity_epoch("sisters").await.unwrap(),
        (0, None),
        "no grant happened"
    );
}

async fn campaign_takes_over_a_lapsed_primary(store: DynStore) {
    let old = register_with(
        &store,
        request("sisters", Role::Primary, Some("old")),
        1_000,
    )
    .await
    .instance;
    let new = register(&store, "sisters", Role::Secondary, Some("new"))
        .await
        .instance;
    expect_err(
        store.campaign("sisters", &new.id).await,
        ErrorCode::PrimaryHeld,
    );
    wait_until_past(&store, old.lease_until.millis()).await;
    let before = store.last_event_seq().await.unwrap();
    // No reaper has run: the campaign itself finds the lease lapsed.
    let g = store.campaign("sisters", &new.id).await.unwrap();
    assert_eq!(g.epoch, 2);
    assert_eq!(
        store.get_instance(&old.id).await.unwrap().unwrap().state,
        InstanceState::Expired
    );
    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [
            topics::PRIMARY_RELEASED,
            topics::INSTANCE_EXPIRED,
            topics::PRIMARY_GRANTED
        ]
    );
}

async fn route_with_and_without_version(store: DynStore) {
    assert_eq!(
        store.route("sisters", None).await.unwrap(),
        None,
        "unknown entity"
    );
    let mut r = request("sisters", Role::Secondary, Some("v1 worker"));
    r.version = Some("v1".into());
    let s1 = register_with(&store, r, TTL).await.instance;
    let mut r = request("sisters", Role::Secondary, Some("v2 worker"));
    r.version = Some("v2".into());
    let s2 = register_with(&store, r, TTL).await.instance;
    assert_eq!(
        store.route("sisters", None).await.unwrap(),
        None,
        "no primary"
    );
    assert_eq!(
        store
            .route("sisters", Some("v1"))
            .await
            .unwrap()
            .map(|i| i.id),
        Some(s1.id.clone())
    );

    let mut r = request("sisters", Role::Primary, Some("main"));
    r.version = Some("v1".into());
    let p = register_with(&store, r, TTL).await.instance;
    assert_eq!(
        store.route("sisters", None).await.unwrap().map(|i| i.id),
        Some(p.id.clone())
    );
    assert_eq!(
        store
            .route("sisters", Some("v1"))
            .await
            .unwrap()
            .map(|i| i.id),
        Some(p.id.clone()),
        "the primary first"
    );
    assert_eq!(
        store
            .route("sisters", Some("v2"))
            .await
            .unwrap()
            .map(|i| i.id),
        Some(s2.id.clone())
    );
    assert_eq!(store.route("sisters", Some("v3")).await.unwrap(), None);

    store.close_instance(&s2.id, &admin()).await.unwrap();
    assert_eq!(
        store.route("sisters", Some("v2")).await.unwrap(),
        None,
        "only live instances"
    );
    store.resign("sisters", Some(&p.id)).await.unwrap();
    assert_eq!(store.route("sisters", None).await.unwrap(), None);
    let v1 = store
        .route("sisters", Some("v1"))
        .await
        .unwrap()
        .map(|i| i.id)
        .unwrap();
    assert!(v1 == p.id || v1 == s1.id);
}
