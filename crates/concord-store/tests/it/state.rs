//! Entity state: fenced writes, compare-and-set, revisions, events.

use crate::harness::*;
use concord_core::api::Role;
use concord_core::authz::Principal;
use concord_core::ErrorCode;
use concord_store::{topics, DynStore, StateDelete, StateWrite};
use serde_json::{json, Value};

conformance!(
    state_writes_are_fenced,
    state_compare_and_set,
    state_revisions_are_event_positions,
    state_of_an_unknown_entity,
);

fn put(
    entity: &str,
    key: &str,
    value: Value,
    fence: Option<u64>,
    if_revision: Option<i64>,
    actor: &Principal,
) -> StateWrite {
    StateWrite {
        entity: entity.into(),
        key: key.into(),
        value,
        fence,
        if_revision,
        actor: actor.clone(),
    }
}

fn del(
    entity: &str,
    key: &str,
    fence: Option<u64>,
    if_revision: Option<i64>,
    actor: &Principal,
) -> StateDelete {
    StateDelete {
        entity: entity.into(),
        key: key.into(),
        fence,
        if_revision,
        actor: actor.clone(),
    }
}

async fn state_writes_are_fenced(store: DynStore) {
    let p = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let (pp, sp) = (session(&p), session(&s));

    let e = store
        .put_state(put(
            "sisters",
            "config",
            json!({"mode": "a"}),
            Some(1),
            None,
            &pp,
        ))
        .await
        .unwrap();
    assert_eq!(
        (e.key.as_str(), &e.value, e.updated_by.as_str()),
        ("config", &json!({"mode": "a"}), p.id.as_str())
    );
    assert_eq!(
        store.get_state("sisters", "config").await.unwrap().as_ref(),
        Some(&e)
    );

    let err = expect_err(
        store
            .put_state(put("sisters", "config", json!(1), Some(1), None, &sp))
            .await,
        ErrorCode::Fenced,
    );
    assert_eq!(
        err.details["epoch"], 1,
        "a secondary is fenced even with the current epoch"
    );
    expect_err(
        store
            .put_state(put("sisters", "config", json!(1), None, None, &pp))
            .await,
        ErrorCode::Fenced,
    );
    expect_err(
        store
            .put_state(put("sisters", "config", json!(1), Some(0), None, &pp))
            .await,
        ErrorCode::Fenced,
    );
    expect_err(
        store
            .put_state(put("sisters", "config", json!(1), Some(2), None, &pp))
            .await,
        ErrorCode::Fenced,
    );

    let by_admin = store
        .put_state(put("sisters", "owner", json!("ops"), None, None, &admin()))
        .await
        .unwrap();
    assert_eq!(
        by_admin.updated_by, "admin:tok_admin",
        "admin writes without a fence"
    );

    // After a transfer the old primary's fence is stale.
    store.transfer("sisters", Some(&p.id), &s.id).await.unwrap();
    let err = expect_err(
        store
            .put_state(put("sisters", "config", json!("late"), Some(1), None, &pp))
            .await,
        ErrorCode::Fenced,
    );
    assert_eq!(err.details["epoch"], 2);
    let err = expect_err(
        store
            .put_state(put("sisters", "config", json!("stale"), Some(1), None, &sp))
            .await,
        ErrorCode::Fenced,
    );
    assert_eq!(
        err.details["epoch"], 2,
        "the new primary must present the new epoch"
    );
    store
        .put_state(put(
            "sisters",
            "config",
            json!({"mode": "b"}),
            Some(2),
            None,
            &sp,
        ))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_state("sisters", "config")
            .await
            .unwrap()
            .unwrap()
            .value,
        json!({"mode": "b"})
    );

    let keys: Vec<String> = store
        .list_state("sisters")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["config", "owner"]);
    assert!(store.list_state("anvil").await.unwrap().is_empty());

    expect_err(
        store
            .delete_state(del("sisters", "config", Some(1), None, &pp))
            .await,
        ErrorCode::Fenced,
    );
    assert!(store
        .delete_state(del("sisters", "config", Some(2), None, &sp))
        .await
        .unwrap());
    assert!(
        !store
            .delete_state(del("sisters", "config", Some(2), None, &sp))
            .await
            .unwrap(),
        "already gone"
    );
    assert_eq!(store.get_state("sisters", "config").await.unwrap(), None);
    assert!(store
        .delete_state(del("sisters", "owner", None, None, &admin()))
        .await
        .unwrap());
    assert!(store.list_state("sisters").await.unwrap().is_empty());
}

async fn state_compare_and_set(store: DynStore) {
    let a = admin();
    let created = store
        .put_state(put("sisters", "lock", json!(1), None, Some(0), &a))
        .await
        .unwrap();
    let err = expect_err(
        store
            .put_state(put("sisters", "lock", json!(2), None, Some(0), &a))
            .await,
        ErrorCode::Conflict,
    );
    assert_eq!(
        err.details,
        json!({"key": "lock", "revision": created.revision}),
        "if_revision 0 creates only"
    );
    let err = expect_err(
        store
            .put_state(put(
                "sisters",
                "lock",
                json!(2),
                None,
                Some(created.revision + 1),
                &a,
            ))
            .await,
        ErrorCode::Conflict,
    );
    assert_eq!(err.details["revision"], created.revision);
    let updated = store
        .put_state(put(
            "sisters",
            "lock",
            json!(2),
            None,
            Some(created.revision),
            &a,
        ))
        .await
        .unwrap();
    assert!(updated.revision > created.revision);
    assert_eq!(
        store
            .get_state("sisters", "lock")
            .await
            .unwrap()
            .unwrap()
            .value,
        json!(2)
    );

    expect_err(
        store
            .delete_state(del("sisters", "lock", None, Some(created.revision), &a))
            .await,
        ErrorCode::Conflict,
    );
    assert!(store
        .delete_state(del("sisters", "lock", None, Some(updated.revision), &a))
        .await
        .unwrap());
    // Absent is revision 0.
    expect_err(
        store
            .put_state(put(
                "sisters",
                "lock",
                json!(3),
                None,
                Some(updated.revision),
                &a,
            ))
            .await,
        ErrorCode::Conflict,
    );
    store
        .put_state(put("sisters", "lock", json!(3), None, Some(0), &a))
        .await
        .unwrap();
}

async fn state_revisions_are_event_positions(store: DynStore) {
    let p = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let pp = session(&p);
    let before = store.last_event_seq().await.unwrap();
    let odd = json!({"text": "nul \u{0} and \"quotes\"", "n": 1.5, "big": u64::MAX, "list": [true, null]});
    let e1 = store
        .put_state(put("sisters", "a", odd.clone(), Some(1), None, &pp))
        .await
        .unwrap();
    let e2 = store
        .put_state(put("sisters", "b", json!("x"), Some(1), None, &pp))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_state("sisters", "a")
            .await
            .unwrap()
            .unwrap()
            .value,
        odd,
        "values come back exactly"
    );
    // Failed writes leave no trace in the log.
    expect_err(
        store
            .put_state(put("sisters", "a", json!(0), Some(9), None, &pp))
            .await,
        ErrorCode::Fenced,
    );
    expect_err(
        store
            .put_state(put("sisters", "a", json!(0), Some(1), Some(0), &pp))
            .await,
        ErrorCode::Conflict,
    );
    assert!(store
        .delete_state(del("sisters", "a", Some(1), None, &pp))
        .await
        .unwrap());

    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::STATE_CHANGED; 3]);
    assert_eq!(
        events[0].seq, e1.revision,
        "the revision is the seq of its event"
    );
    assert_eq!(events[1].seq, e2.revision);
    assert_eq!(
        events[0].data,
        json!({"entity": "sisters", "key": "a", "updated_by": p.id, "fence": 1, "deleted": false})
    );
    assert_eq!(
        events[2].data,
        json!({"entity": "sisters", "key": "a", "updated_by": p.id, "fence": 1, "deleted": true})
    );
    assert_eq!(events[0].source.instance.as_deref(), Some(p.id.as_str()));
    assert_eq!(events[0].source.entity.as_deref(), Some("sisters"));
    assert_eq!(events[0].source.token, Some(pp.token_id.clone()));
    assert_eq!(events[0].time, e1.updated_at);
}

async fn state_of_an_unknown_entity(store: DynStore) {
    let stray = register(&store, "anvil", Role::Primary, Some("main"))
        .await
        .instance;
    let err = expect_err(
        store
            .put_state(put(
                "ghosttown",
                "k",
                json!(1),
                Some(1),
                None,
                &session(&stray),
            ))
            .await,
        ErrorCode::Fenced,
    );
    assert_eq!(err.details["epoch"], 0);
    assert!(
        store
            .list_entities()
            .await
            .unwrap()
            .iter()
            .all(|e| e.name != "ghosttown"),
        "a refused write creates nothing"
    );
    store
        .put_state(put("ghosttown", "k", json!(1), None, None, &admin()))
        .await
        .unwrap();
    assert!(
        store
            .list_entities()
            .await
            .unwrap()
            .iter()
            .any(|e| e.name == "ghosttown"),
        "an admin write creates the entity"
    );
}
