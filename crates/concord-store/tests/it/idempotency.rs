//! Idempotency keys of event publishes and observations: what makes a client's
//! resend (a lost reply, a replayed offline spool) safe.

use crate::harness::*;
use concord_core::api::EventSource;
use concord_core::breaker::{Outcome, Policies, Sample};
use concord_store::{DynStore, NewObservation};
use serde_json::json;

conformance!(
    a_keyed_publish_appends_once_and_answers_the_first_seq,
    concurrent_publishes_with_one_key_append_one_event,
    a_keyed_observation_is_counted_once,
    keys_are_pruned_with_the_event_log,
);

async fn a_keyed_publish_appends_once_and_answers_the_first_seq(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let src = EventSource {
        instance: Some("ins_a".into()),
        entity: Some("sisters".into()),
        token: Some("tok_a".into()),
    };
    let (seq, dup) = store
        .publish_once(
            "app.x",
            src.clone(),
            json!({"i": 1}),
            "entity:sisters",
            "k1",
        )
        .await
        .unwrap();
    assert!(!dup);
    // A resend, even with other data, answers the first event and appends nothing.
    let again = store
        .publish_once(
            "app.x",
            src.clone(),
            json!({"i": 2}),
            "entity:sisters",
            "k1",
        )
        .await
        .unwrap();
    assert_eq!(again, (seq, true));
    assert_eq!(store.last_event_seq().await.unwrap(), seq);
    // The same key in another scope, or for an observation, is another key.
    let (other, dup) = store
        .publish_once("app.x", src, json!({"i": 3}), "entity:anvil", "k1")
        .await
        .unwrap();
    assert!(!dup);
    assert_eq!(other, seq + 1);
    let events = events_after(&store, before).await;
    assert_eq!(
        events
            .iter()
            .map(|e| e.data["i"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(3)]
    );
}

async fn concurrent_publishes_with_one_key_append_one_event(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .publish_once(
                    "app.race",
                    EventSource::default(),
                    json!({"i": i}),
                    "entity:racers",
                    "the-key",
                )
                .await
                .unwrap()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let events = events_after(&store, before).await;
    assert_eq!(events.len(), 1, "one event for one key: {events:?}");
    assert!(answers.iter().all(|(seq, _)| *seq == events[0].seq));
    assert_eq!(answers.iter().filter(|(_, dup)| !dup).count(), 1);
}

fn keyed(inst: &str, key: Option<&str>) -> NewObservation {
    NewObservation {
        subject: "provider:once".into(),
        sample: Sample {
            outcome: Outcome::Ok,
            latency_ms: Some(10),
            instance: inst.into(),
            entity: Some("fleet".into()),
            host: None,
            detail: None,
            probe_id: None,
            at: 0,
        },
        token: "tok_t".into(),
        idempotency: key.map(|k| ("entity:fleet".to_string(), k.to_string())),
    }
}

async fn a_keyed_observation_is_counted_once(store: DynStore) {
    let p = Policies::default();
    let skipped = store
        .observe(
            vec![keyed("ins_a", Some("o1")), keyed("ins_a", Some("o2"))],
            &p,
        )
        .await
        .unwrap();
    assert_eq!(skipped, 0);
    // A resend of o1 (its reply was lost) and a new o3; unkeyed ones always count.
    let skipped = store
        .observe(
            vec![
                keyed("ins_a", Some("o1")),
                keyed("ins_a", Some("o3")),
                keyed("ins_a", None),
            ],
            &p,
        )
        .await
        .unwrap();
    assert_eq!(skipped, 1);
    let v = store
        .get_breaker("provider:once", &p)
        .await
        .unwrap()
        .expect("observed");
    assert_eq!(v.samples, 4, "{v:?}");
}

async fn keys_are_pruned_with_the_event_log(store: DynStore) {
    let (seq, _) = store
        .publish_once("app.p", EventSource::default(), json!(1), "entity:p", "old")
        .await
        .unwrap();
    // A negative age removes every key (and every event but the newest).
    store.prune(-1, 1_000_000, 0).await.unwrap();
    let (again, dup) = store
        .publish_once("app.p", EventSource::default(), json!(2), "entity:p", "old")
        .await
        .unwrap();
    assert!(!dup, "the pruned key is free again");
    assert!(again > seq);
}
