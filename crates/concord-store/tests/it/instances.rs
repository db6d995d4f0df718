//! Instances and presence: register, heartbeat, ghosts, expiry, close, update.

use crate::harness::*;
use concord_core::api::{InstanceState, PatchInstanceRequest, Role};
use concord_core::{presence, ErrorCode};
use concord_store::{topics, DynStore, InstanceFilter};
use serde_json::json;

conformance!(
    register_secondary,
    register_primary,
    register_primary_while_held_is_refused,
    register_fork,
    heartbeat_extends_lease_and_reports_fence,
    heartbeat_from_unknown_or_closed_instance_is_a_ghost,
    unlabeled_secondary_is_a_ghost_until_labeled,
    update_instance_patches_and_announces,
    expire_owned_only_by_the_owner,
    expire_due_reaps_lapsed_leases,
    close_instance_releases_the_primary,
    list_instances_filters,
);

async fn register_secondary(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let now = store.now_ms().await.unwrap();
    let reg = register(&store, "sisters", Role::Secondary, Some("test pane")).await;
    let i = &reg.instance;
    assert!(i.id.starts_with("ins_"));
    assert_eq!(
        (i.entity.as_str(), i.role, i.state),
        ("sisters", Role::Secondary, InstanceState::Live)
    );
    assert_eq!(i.label.as_deref(), Some("test pane"));
    assert_eq!(i.capabilities, ["code", "review"]);
    assert_eq!(i.meta, json!({"pane": 1}));
    assert_eq!(i.ttl_ms, TTL);
    assert!(
        i.registered_at.millis() >= now,
        "registered by the store clock"
    );
    assert_eq!(i.last_seen_at, i.registered_at);
    assert_eq!(
        i.lease_until.millis(),
        presence::write_ahead(i.registered_at.millis(), TTL)
    );
    assert_eq!((reg.epoch, reg.fence), (0, None));
    assert_eq!(store.get_instance(&i.id).await.unwrap().as_ref(), Some(i));
    assert_eq!(store.get_instance("ins_missing").await.unwrap(), None);

    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::INSTANCE_REGISTERED]);
    let e = &events[0];
    assert_eq!(e.source.instance.as_deref(), Some(i.id.as_str()));
    assert_eq!(e.source.entity.as_deref(), Some("sisters"));
    assert_eq!(e.source.token.as_deref(), Some("tok_registrar"));
    assert_eq!(e.data["role"], "secondary");
    assert_eq!(e.data["label"], "test pane");
    assert_eq!(e.data["capabilities"], json!(["code", "review"]));
    assert_eq!(e.time, i.registered_at);

    let entities = store.list_entities().await.unwrap();
    assert_eq!(entities.len(), 1);
    assert_eq!(
        (
            entities[0].name.as_str(),
            entities[0].epoch,
            entities[0].primary.as_deref(),
            entities[0].live_instances
        ),
        ("sisters", 0, None, 1)
    );
    assert_eq!(store.entity_epoch("sisters").await.unwrap(), (0, None));
    assert_eq!(store.entity_epoch("nobody").await.unwrap(), (0, None));
}

async fn register_primary(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let reg = register(&store, "sisters", Role::Primary, Some("main")).await;
    assert_eq!(reg.instance.role, Role::Primary);
    assert_eq!((reg.epoch, reg.fence), (1, Some(1)));
    assert_eq!(
        store
            .get_instance(&reg.instance.id)
            .await
            .unwrap()
            .unwrap()
            .role,
        Role::Primary
    );
    assert_eq!(
        store.entity_epoch("sisters").await.unwrap(),
        (1, Some(reg.instance.id.clone()))
    );

    let detail = store
        .get_entity("sisters")
        .await
        .unwrap()
        .expect("entity exists");
    assert_eq!(detail.epoch, 1);
    assert_eq!(
        detail.primary.as_ref().map(|p| p.id.as_str()),
        Some(reg.instance.id.as_str())
    );
    assert_eq!(detail.instances.len(), 1);
    assert!(store.get_entity("nobody").await.unwrap().is_none());

    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [topics::INSTANCE_REGISTERED, topics::PRIMARY_GRANTED]
    );
    assert_eq!(events[0].data["role"], "primary");
    assert_eq!(events[1].data["entity"], "sisters");
    assert_eq!(events[1].data["instance"], reg.instance.id.as_str());
    assert_eq!(events[1].data["epoch"], 1);
    assert_eq!(events[1].data["from"], json!(null));
    assert_eq!(events[1].data["label"], "main");
    assert!(
        store.list_ghosts().await.unwrap().is_empty(),
        "an unlabeled primary is not a ghost"
    );
}

async fn register_primary_while_held_is_refused(store: DynStore) {
    let first = register(&store, "sisters", Role::Primary, Some("main")).await;
    let before = store.last_event_seq().await.unwrap();
    let e = expect_err(
        store
            .register_instance(new_instance(
                request("sisters", Role::Primary, Some("second")),
                TTL,
            ))
            .await,
        ErrorCode::PrimaryHeld,
    );
    assert_eq!(e.details["holder"], first.instance.id.as_str());
    assert_eq!(e.details["label"], "main");
    assert_eq!(e.details["epoch"], 1);
    assert_eq!(
        store
            .list_instances(InstanceFilter::default())
            .await
            .unwrap()
            .len(),
        1,
        "nothing registered"
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        before,
        "nothing announced"
    );
    assert_eq!(
        store.entity_epoch("sisters").await.unwrap(),
        (1, Some(first.instance.id.clone()))
    );
    // Another entity is unaffected.
    let other = register(&store, "anvil", Role::Primary, Some("main")).await;
    assert_eq!(other.fence, Some(1));
}

async fn register_fork(store: DynStore) {
    let parent = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let seq = store.last_memory_seq().await.unwrap();
    let mut req = request("sisters", Role::Fork, Some("long experiment"));
    req.forked_from = Some(parent.id.clone());
    let fork = register_with(&store, req, TTL).await;
    assert_eq!(fork.instance.role, Role::Fork);
    assert_eq!(
        fork.instance.forked_from.as_deref(),
        Some(parent.id.as_str())
    );
    assert_eq!(
        fork.instance.fork_point,
        Some(seq),
        "forked at the memory-log position of its registration"
    );
    assert_eq!(fork.fence, None);

    let stranger = register(&store, "anvil", Role::Secondary, Some("x"))
        .await
        .instance;
    let mut req = request("sisters", Role::Fork, Some("bad"));
    req.forked_from = Some(stranger.id.clone());
    let e = expect_err(
        store.register_instance(new_instance(req, TTL)).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "forked_from");
    let mut req = request("sisters", Role::Fork, Some("bad"));
    req.forked_from = Some("ins_nowhere".into());
    let e = expect_err(
        store.register_instance(new_instance(req, TTL)).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "forked_from");
    let sisters = InstanceFilter {
        entity: Some("sisters".into()),
        ..Default::default()
    };
    assert_eq!(store.list_instances(sisters).await.unwrap().len(), 2);
}

async fn heartbeat_extends_lease_and_reports_fence(store: DynStore) {
    let primary = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let secondary = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();

    let hb = store.heartbeat(&primary.id, "hub-b").await.unwrap();
    assert_eq!(hb.instance.id, primary.id);
    assert_eq!(hb.instance.role, Role::Primary);
    assert_eq!((hb.epoch, hb.fence), (1, Some(1)));
    assert!(hb.instance.last_seen_at >= primary.last_seen_at);
    assert!(
        hb.instance.lease_until >= primary.lease_until,
        "the lease only moves forward"
    );
    assert_eq!(
        hb.instance.lease_until.millis(),
        presence::write_ahead(hb.instance.last_seen_at.millis(), TTL),
        "the presence rule"
    );
    let stored = store.get_instance(&primary.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.last_seen_at, stored.lease_until),
        (hb.instance.last_seen_at, hb.instance.lease_until),
        "durable"
    );
    let resp = concord_store::heartbeat_response(&hb);
    assert_eq!(
        (resp.role, resp.epoch, resp.fence, resp.lease_until),
        (Role::Primary, 1, Some(1), hb.instance.lease_until)
    );

    let hb = store.heartbeat(&secondary.id, "hub-a").await.unwrap();
    assert_eq!(
        (hb.instance.role, hb.epoch, hb.fence),
        (Role::Secondary, 1, None)
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        before,
        "a heartbeat announces nothing"
    );
    assert!(store.list_ghosts().await.unwrap().is_empty());
}

async fn heartbeat_from_unknown_or_closed_instance_is_a_ghost(store: DynStore) {
    let e = expect_err(
        store.heartbeat("ins_unknown", "hub-a").await,
        ErrorCode::UnknownInstance,
    );
    assert_eq!(e.details["instance"], "ins_unknown");
    let closed = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    store.close_instance(&closed.id, &admin()).await.unwrap();
    let before = store.last_event_seq().await.unwrap();
    expect_err(
        store.heartbeat(&closed.id, "hub-a").await,
        ErrorCode::UnknownInstance,
    );
    expect_err(
        store.heartbeat(&closed.id, "hub-a").await,
        ErrorCode::UnknownInstance,
    );

    let ghosts = store.list_ghosts().await.unwrap();
    let mut found: Vec<(Option<&str>, &str)> = ghosts
        .iter()
        .map(|g| (g.instance.as_deref(), g.reason.as_str()))
        .collect();
    found.sort();
    let mut want = vec![
        (Some("ins_unknown"), "unknown_instance"),
        (Some(closed.id.as_str()), "closed"),
    ];
    want.sort();
    assert_eq!(found, want);
    let g = ghosts.iter().find(|g| g.reason == "closed").unwrap();
    assert_eq!(g.entity.as_deref(), Some("sisters"));
    assert_eq!(g.host.as_deref(), Some("laptop"));

    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [topics::GHOST],
        "announced once, not at every heartbeat"
    );
    assert_eq!(events[0].data["reason"], "closed");
    assert_eq!(events[0].data["instance"], closed.id.as_str());
}

async fn unlabeled_secondary_is_a_ghost_until_labeled(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let ghost = register(&store, "sisters", Role::Secondary, None)
        .await
        .instance;
    let blank = register(&store, "sisters", Role::Fork, Some("   "))
        .await
        .instance;
    register(&store, "sisters", Role::Secondary, Some("labelled")).await;
    let ghosts = store.list_ghosts().await.unwrap();
    let mut ids: Vec<&str> = ghosts
        .iter()
        .map(|g| g.instance.as_deref().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![ghost.id.as_str(), blank.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(ghosts
        .iter()
        .all(|g| g.reason == "unlabeled" && g.entity.as_deref() == Some("sisters")));
    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [
            topics::INSTANCE_REGISTERED,
            topics::GHOST,
            topics::INSTANCE_REGISTERED,
            topics::GHOST,
            topics::INSTANCE_REGISTERED
        ]
    );
    assert_eq!(events[1].data["reason"], "unlabeled");

    let patch = PatchInstanceRequest {
        label: Some("now labelled".into()),
        ..Default::default()
    };
    store.update_instance(&ghost.id, patch).await.unwrap();
    let ghosts = store.list_ghosts().await.unwrap();
    assert_eq!(ghosts.len(), 1);
    assert_eq!(ghosts[0].instance.as_deref(), Some(blank.id.as_str()));
}

async fn update_instance_patches_and_announces(store: DynStore) {
    let inst = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();
    let patch = PatchInstanceRequest {
        label: None,
        capabilities: Some(vec!["deploy".into()]),
        endpoint: Some("http://10.0.0.2:9000".into()),
        meta: Some(json!({"pane": 2, "tmux": "main"})),
    };
    let updated = store.update_instance(&inst.id, patch).await.unwrap();
    assert_eq!(
        updated.label.as_deref(),
        Some("pane"),
        "unpatched fields are kept"
    );
    assert_eq!(updated.capabilities, ["deploy"]);
    assert_eq!(updated.endpoint.as_deref(), Some("http://10.0.0.2:9000"));
    assert_eq!(updated.meta, json!({"pane": 2, "tmux": "main"}));
    assert_eq!(
        store.get_instance(&inst.id).await.unwrap().as_ref(),
        Some(&updated)
    );
    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::INSTANCE_UPDATED]);
    assert_eq!(events[0].data["capabilities"], json!(["deploy"]));
    assert_eq!(events[0].data["label"], "pane");

    expect_err(
        store
            .update_instance("ins_missing", PatchInstanceRequest::default())
            .await,
        ErrorCode::NotFound,
    );
    store.close_instance(&inst.id, &admin()).await.unwrap();
    expect_err(
        store
            .update_instance(&inst.id, PatchInstanceRequest::default())
            .await,
        ErrorCode::UnknownInstance,
    );
}

async fn expire_owned_only_by_the_owner(store: DynStore) {
    let primary = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    // Registered by hub-a: another replica cannot expire it from its memory view.
    assert_eq!(
        store.expire_owned(&primary.id, "hub-b").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .get_instance(&primary.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        InstanceState::Live
    );
    // A heartbeat through hub-b moves the lease's ownership there.
    store.heartbeat(&primary.id, "hub-b").await.unwrap();
    assert_eq!(
        store.expire_owned(&primary.id, "hub-a").await.unwrap(),
        None,
        "hub-a no longer owns it"
    );
    let before = store.last_event_seq().await.unwrap();
    let expired = store
        .expire_owned(&primary.id, "hub-b")
        .await
        .unwrap()
        .expect("the owner expires it");
    assert_eq!(expired.state, InstanceState::Expired);
    assert_eq!(
        store
            .get_instance(&primary.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        InstanceState::Expired
    );
    assert_eq!(
        store.entity_epoch("sisters").await.unwrap(),
        (1, None),
        "the primary role is released"
    );
    assert_eq!(
        store.expire_owned(&primary.id, "hub-b").await.unwrap(),
        None,
        "once"
    );
    assert_eq!(
        store.expire_owned("ins_missing", "hub-b").await.unwrap(),
        None
    );
    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [topics::PRIMARY_RELEASED, topics::INSTANCE_EXPIRED]
    );
    assert_eq!(events[1].data["reason"], "no heartbeat within ttl");
}

async fn expire_due_reaps_lapsed_leases(store: DynStore) {
    let short = register_with(
        &store,
        request("sisters", Role::Primary, Some("main")),
        1_000,
    )
    .await
    .instance;
    let long = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();
    assert!(
        store.expire_due(100).await.unwrap().is_empty(),
        "nothing is due yet"
    );

    wait_until_past(&store, short.lease_until.millis()).await;
    let expired = store.expire_due(100).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, short.id);
    assert_eq!(expired[0].state, InstanceState::Expired);
    assert_eq!(
        store.get_instance(&short.id).await.unwrap().unwrap().state,
        InstanceState::Expired
    );
    assert_eq!(
        store.get_instance(&long.id).await.unwrap().unwrap().state,
        InstanceState::Live
    );
    assert_eq!(store.entity_epoch("sisters").await.unwrap(), (1, None));
    assert!(
        store.expire_due(100).await.unwrap().is_empty(),
        "each instance expires once"
    );

    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [topics::PRIMARY_RELEASED, topics::INSTANCE_EXPIRED]
    );
    assert_eq!(events[0].data["instance"], short.id.as_str());
    assert_eq!(events[0].data["epoch"], 1);
    assert_eq!(events[0].data["reason"], "lease lapsed");
    assert_eq!(events[1].data["instance"], short.id.as_str());
    assert_eq!(events[1].data["role"], "primary");

    // The expired primary is now a ghost when it heartbeats, and the role is free.
    expect_err(
        store.heartbeat(&short.id, "hub-a").await,
        ErrorCode::UnknownInstance,
    );
    let ghosts = store.list_ghosts().await.unwrap();
    assert!(ghosts
        .iter()
        .any(|g| g.instance.as_deref() == Some(short.id.as_str()) && g.reason == "expired"));
    let grant = store.campaign("sisters", &long.id).await.unwrap();
    assert_eq!(grant.epoch, 2);
}

async fn close_instance_releases_the_primary(store: DynStore) {
    let primary = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();
    let closed = store.close_instance(&primary.id, &admin()).await.unwrap();
    assert_eq!(closed.state, InstanceState::Closed);
    assert_eq!(
        store
            .get_instance(&primary.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        InstanceState::Closed
    );
    assert_eq!(store.entity_epoch("sisters").await.unwrap(), (1, None));
    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [topics::PRIMARY_RELEASED, topics::INSTANCE_CLOSED]
    );
    assert_eq!(events[0].data["reason"], "closed by operator");
    assert_eq!(events[1].data["reason"], "closed by operator");

    let again = store.close_instance(&primary.id, &admin()).await.unwrap();
    assert_eq!(
        again.state,
        InstanceState::Closed,
        "closing twice is harmless"
    );
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        events.last().unwrap().seq,
        "and announces nothing"
    );
    expect_err(
        store.close_instance("ins_missing", &admin()).await,
        ErrorCode::NotFound,
    );

    let own = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();
    store.close_instance(&own.id, &session(&own)).await.unwrap();
    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::INSTANCE_CLOSED]);
    assert_eq!(events[0].data["reason"], "closed by itself");
}

async fn list_instances_filters(store: DynStore) {
    let p = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let a = register(&store, "anvil", Role::Secondary, Some("worker"))
        .await
        .instance;
    store.close_instance(&s.id, &admin()).await.unwrap();
    // Sorted by entity, then registration time; two registrations in the same
    // millisecond fall back to id order, which ULIDs do not promise follows time.
    let ids = |v: Vec<concord_core::api::Instance>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let all = ids(store
        .list_instances(InstanceFilter::default())
        .await
        .unwrap());
    assert_eq!(all[0], a.id, "anvil sorts before sisters");
    assert_eq!(
        sorted(all[1..].to_vec()),
        sorted(vec![p.id.clone(), s.id.clone()])
    );
    let sisters = InstanceFilter {
        entity: Some("sisters".into()),
        ..Default::default()
    };
    assert_eq!(
        sorted(ids(store.list_instances(sisters).await.unwrap())),
        sorted(vec![p.id.clone(), s.id.clone()])
    );
    let live = InstanceFilter {
        state: Some(InstanceState::Live),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_instances(live).await.unwrap()),
        [a.id.clone(), p.id.clone()]
    );
    let primaries = InstanceFilter {
        role: Some(Role::Primary),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_instances(primaries).await.unwrap()),
        vec![p.id.clone()]
    );
    let closed_sisters = InstanceFilter {
        entity: Some("sisters".into()),
        role: Some(Role::Secondary),
        state: Some(InstanceState::Closed),
    };
    assert_eq!(
        ids(store.list_instances(closed_sisters).await.unwrap()),
        vec![s.id.clone()]
    );
    let entities = store.list_entities().await.unwrap();
    let summary: Vec<(&str, u64)> = entities
        .iter()
        .map(|e| (e.name.as_str(), e.live_instances))
        .collect();
    assert_eq!(summary, [("anvil", 1), ("sisters", 1)]);
}
