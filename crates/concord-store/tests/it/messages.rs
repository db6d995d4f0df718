//! The event log's write side and inboxes (`EventStore`, DESIGN §6): client
//! events, retention, messages, acks.

use crate::harness::*;
use concord_core::address::Address;
use concord_core::api::{EventSource, MessageFrom, Role};
use concord_core::{ids, ErrorCode};
use concord_store::{topics, DynStore, NewMessage};
use serde_json::json;

conformance!(
    publish_appends_client_events,
    retention_prunes_by_count_and_age_and_never_reuses_a_seq,
    messages_reach_the_live_instances_addressed,
    inboxes_page_and_ack,
    retention_drops_inboxes_of_ended_instances,
);

async fn publish_appends_client_events(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let source = EventSource {
        instance: Some("ins_x".into()),
        entity: Some("sisters".into()),
        token: Some("tok_x".into()),
    };
    let seq = store
        .publish(
            "app.build.done",
            source.clone(),
            json!({"ok": true, "n": 3}),
        )
        .await
        .unwrap();
    assert_eq!(seq, before + 1);
    assert_eq!(store.last_event_seq().await.unwrap(), seq);
    assert_eq!(
        *store.watch_events().borrow(),
        seq,
        "local readers are woken before the answer"
    );
    let events = events_after(&store, before).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].seq, events[0].topic.as_str()),
        (seq, "app.build.done")
    );
    assert_eq!(events[0].source, source);
    assert_eq!(events[0].data, json!({"ok": true, "n": 3}));
    let next = store
        .publish("app.build.done", EventSource::default(), json!(null))
        .await
        .unwrap();
    assert_eq!(next, seq + 1);
}

async fn retention_prunes_by_count_and_age_and_never_reuses_a_seq(store: DynStore) {
    const YEAR: i64 = 365 * 86_400_000;
    assert_eq!(store.event_floor().await.unwrap(), 0);
    for i in 0..10 {
        store
            .publish("app.tick", EventSource::default(), json!({"i": i}))
            .await
            .unwrap();
    }
    let head = store.last_event_seq().await.unwrap();
    assert_eq!(head, 10);

    // By count: keep the newest 4.
    assert_eq!(store.prune(YEAR, 4, YEAR).await.unwrap(), 6);
    assert_eq!(store.event_floor().await.unwrap(), 6);
    let left: Vec<i64> = events_after(&store, 0)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [7, 8, 9, 10]);
    assert_eq!(
        store.prune(YEAR, 4, YEAR).await.unwrap(),
        0,
        "nothing more to do"
    );
    assert_eq!(store.event_floor().await.unwrap(), 6);
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        head,
        "the head survives retention"
    );

    // By age: everything older than now goes.
    let newest = events_after(&store, 0).await.last().unwrap().time.millis();
    wait_until_past(&store, newest).await;
    assert_eq!(
        store.prune(0, 1_000, YEAR).await.unwrap(),
        3,
        "all but the newest"
    );
    assert_eq!(store.event_floor().await.unwrap(), 9);
    let left: Vec<i64> = events_after(&store, 0)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [10], "the newest event always stays");
    assert_eq!(store.last_event_seq().await.unwrap(), head);
    assert_eq!(
        store.prune(0, 0, YEAR).await.unwrap(),
        0,
        "even with max_count 0"
    );

    // However much retention removed, positions keep counting up: a reader
    // holding cursor `head` must see what comes next.
    let seq = store
        .publish("app.tick", EventSource::default(), json!({"i": 10}))
        .await
        .unwrap();
    assert_eq!(seq, head + 1, "a seq is never handed out twice");
    let after_head = events_after(&store, head).await;
    assert_eq!(after_head.len(), 1);
    assert_eq!(after_head[0].seq, head + 1);
}

fn message(from: Option<&concord_core::api::Instance>, to: &str, subject: &str) -> NewMessage {
    NewMessage {
        id: ids::new_id(ids::MESSAGE),
        thread_id: None,
        from: MessageFrom {
            instance: from.map(|i| i.id.clone()),
            entity: from.map(|i| i.entity.clone()),
        },
        token: "tok_sender".into(),
        to: Address::parse("to", to).unwrap(),
        to_text: to.into(),
        subject: subject.into(),
        body: json!({"text": subject}),
        ack_required: false,
    }
}

async fn messages_reach_the_live_instances_addressed(store: DynStore) {
    let p = register(&store, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let mut r = request("anvil", Role::Secondary, Some("deployer"));
    r.capabilities = vec!["deploy".into()];
    let x = register_with(&store, r, TTL).await.instance;
    let gone = register(&store, "sisters", Role::Secondary, Some("gone"))
        .await
        .instance;
    store.close_instance(&gone.id, &admin()).await.unwrap();
    let mut both = vec![p.id.clone(), s.id.clone()];
    both.sort();

    let before = store.last_event_seq().await.unwrap();
    let sent = store
        .send_message(message(Some(&x), "entity:sisters", "hello all"))
        .await
        .unwrap();
    assert_eq!(
        sent.delivered_to, both,
        "every live instance of the entity, by id"
    );
    assert_eq!(
        sent.thread_id, sent.id,
        "a new message starts its own thread"
    );
    let to = |addr: &str| message(Some(&x), addr, "hi");
    assert_eq!(
        store
            .send_message(to("primary:sisters"))
            .await
            .unwrap()
            .delivered_to,
        vec![p.id.clone()]
    );
    assert_eq!(
        store
            .send_message(to(&format!("instance:{}", s.id)))
            .await
            .unwrap()
            .delivered_to,
        vec![s.id.clone()]
    );
    assert_eq!(
        store
            .send_message(to("cap:review"))
            .await
            .unwrap()
            .delivered_to,
        both,
        "by capability"
    );
    assert_eq!(
        store
            .send_message(to("cap:deploy"))
            .await
            .unwrap()
            .delivered_to,
        vec![x.id.clone()],
        "across entities"
    );

    let seq = store.last_event_seq().await.unwrap();
    for addr in [
        "entity:nobody",
        "primary:anvil",
        "cap:flying",
        &format!("instance:{}", gone.id),
    ] {
        let e = expect_err(store.send_message(to(addr)).await, ErrorCode::NotFound);
        assert_eq!(e.details["to"], addr);
    }
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        seq,
        "an undeliverable message leaves no trace"
    );

    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::MESSAGE_SENT; 5]);
    assert_eq!(
        events[0].data,
        json!({"id": sent.id, "thread_id": sent.id, "to": "entity:sisters", "delivered_to": both, "subject": "hello all"})
    );
    assert_eq!(
        events[0].source,
        EventSource {
            instance: Some(x.id.clone()),
            entity: Some("anvil".into()),
            token: Some("tok_sender".into())
        }
    );
}

async fn inboxes_page_and_ack(store: DynStore) {
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let mut first = message(None, &format!("instance:{}", s.id), "one");
    first.ack_required = true;
    first.body = json!({"nested": {"list": [1, 2]}, "text": "x\u{0}y"});
    let one = store.send_message(first.clone()).await.unwrap();
    let sent_seq = store.last_event_seq().await.unwrap();
    let mut reply = message(None, &format!("instance:{}", s.id), "two");
    reply.thread_id = Some(one.thread_id.clone());
    let two = store.send_message(reply).await.unwrap();
    assert_eq!(two.thread_id, one.id, "a reply joins the thread");
    store
        .send_message(message(None, &format!("instance:{}", s.id), "three"))
        .await
        .unwrap();

    let inbox = store.read_inbox(&s.id, 0, 100, false).await.unwrap();
    assert_eq!(
        inbox.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    let m = &inbox[0];
    assert_eq!(
        (m.id.as_str(), m.to.as_str()),
        (one.id.as_str(), format!("instance:{}", s.id).as_str())
    );
    assert_eq!(m.body, first.body, "bodies come back exactly");
    assert_eq!(m.from, MessageFrom::default());
    assert!(m.ack_required && !m.acked);
    assert_eq!(
        m.cursor, sent_seq,
        "the cursor is the seq of the message's event"
    );
    assert!(inbox.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(inbox[1].thread_id, one.id);

    let page = store
        .read_inbox(&s.id, inbox[0].cursor, 1, false)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, inbox[1].id);
    assert!(store
        .read_inbox("ins_nobody", 0, 100, false)
        .await
        .unwrap()
        .is_empty());

    let before = store.last_event_seq().await.unwrap();
    assert!(store.ack_message(&s.id, &one.id).await.unwrap());
    assert!(
        store.ack_message(&s.id, &one.id).await.unwrap(),
        "acking twice still finds it"
    );
    assert!(!store.ack_message(&s.id, "msg_unknown").await.unwrap());
    assert!(
        !store.ack_message("ins_other", &one.id).await.unwrap(),
        "only the recipient's inbox"
    );
    let events = events_after(&store, before).await;
    assert_eq!(topics_of(&events), [topics::MESSAGE_ACKED], "acked once");
    assert_eq!(events[0].data, json!({"id": one.id, "instance": s.id}));

    let all = store.read_inbox(&s.id, 0, 100, false).await.unwrap();
    assert!(all[0].acked);
    let unacked: Vec<String> = store
        .read_inbox(&s.id, 0, 100, true)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.subject)
        .collect();
    assert_eq!(unacked, ["two", "three"]);
}

async fn retention_drops_inboxes_of_ended_instances(store: DynStore) {
    const YEAR: i64 = 365 * 86_400_000;
    let stays = register(&store, "sisters", Role::Secondary, Some("stays"))
        .await
        .instance;
    let leaves = register(&store, "sisters", Role::Secondary, Some("leaves"))
        .await
        .instance;
    store
        .send_message(message(None, "entity:sisters", "for both"))
        .await
        .unwrap();
    store.close_instance(&leaves.id, &admin()).await.unwrap();
    let closed_at = store.now_ms().await.unwrap();
    assert_eq!(
        store.prune(YEAR, 1_000_000, YEAR).await.unwrap(),
        0,
        "recently ended: kept"
    );
    assert_eq!(
        store
            .read_inbox(&leaves.id, 0, 10, false)
            .await
            .unwrap()
            .len(),
        1
    );
    wait_until_past(&store, closed_at).await;
    assert_eq!(store.prune(YEAR, 1_000_000, 0).await.unwrap(), 1);
    assert!(store
        .read_inbox(&leaves.id, 0, 10, false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .read_inbox(&stays.id, 0, 10, false)
            .await
            .unwrap()
            .len(),
        1,
        "live inboxes are kept"
    );
}
