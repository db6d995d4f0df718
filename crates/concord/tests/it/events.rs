use crate::harness::*;
use concord_client::{Client, StreamItem};
use concord_core::api::{Event, Role, SendMessageRequest};
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn collect(stream: &mut concord_client::EventStream, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Ok(Some(StreamItem::Event(e)))) => out.push(e),
            other => panic!("stream ended early after {} events: {other:?}", out.len()),
        }
    }
    out
}

#[tokio::test]
async fn publish_and_long_poll_with_patterns() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (r, me) = register(&admin, reg("crew", Role::Secondary, Some("pane"))).await;
    let start = admin.status().await.unwrap().last_event_seq;
    let a = me
        .publish("crew.channel", json!({"text": "hi"}))
        .await
        .unwrap();
    me.publish("crew.ops.deploy", json!(1)).await.unwrap();
    me.publish("other.x", json!(2)).await.unwrap();

    let page = admin
        .read_events("crew.*", Some(start), 100, 0)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    let e = &page.events[0];
    assert_eq!((e.seq, e.topic.as_str()), (a.seq, "crew.channel"));
    assert_eq!(e.source.instance.as_deref(), Some(r.instance.id.as_str()));
    assert_eq!(e.source.entity.as_deref(), Some("crew"));
    assert_eq!(e.data, json!({"text": "hi"}));
    let page = admin
        .read_events("crew.>,other.*", Some(start), 100, 0)
        .await
        .unwrap();
    assert_eq!(
        page.events
            .iter()
            .map(|e| e.topic.as_str())
            .collect::<Vec<_>>(),
        ["crew.channel", "crew.ops.deploy", "other.x"]
    );
    // The cursor moves past what was examined even when nothing matched.
    let empty = admin
        .read_events("nothing.here", Some(start), 100, 0)
        .await
        .unwrap();
    assert!(empty.events.is_empty());
    assert!(empty.next >= page.next);
    // sys.* carries the hub's own events; clients may read but not publish there.
    let sys = admin
        .read_events("sys.instance.registered", Some(0), 100, 0)
        .await
        .unwrap();
    assert!(sys
        .events
        .iter()
        .any(|e| e.data["instance"] == r.instance.id.as_str()));
    assert_eq!(
        me.publish("sys.fake", json!(1)).await.unwrap_err().code,
        ErrorCode::Forbidden
    );

    // A long-poll returns as soon as something matches.
    let waiter = {
        let admin = admin.clone();
        let next = page.next;
        tokio::spawn(async move { admin.read_events("crew.late", Some(next), 10, 10_000).await })
    };
    me.publish("crew.late", json!("now")).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.events.len(), 1);
    assert_eq!(got.events[0].data, json!("now"));
    // ...or empty when wait_ms passes.
    let none = admin
        .read_events("crew.never", Some(got.next), 10, 300)
        .await
        .unwrap();
    assert!(none.events.is_empty());
}

#[tokio::test]
async fn bad_topics_and_sizes_are_refused() {
    let hub = Hub::start();
    let admin = hub.admin();
    for bad in ["", "a..b", "a b", ".a", "a.*"] {
        let err = admin.publish(bad, json!(1)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        assert_eq!(err.details["field"], "topic");
    }
    for bad in ["a.>.b", "a..b", "a b"] {
        let err = admin.read_events(bad, None, 10, 0).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        assert_eq!(err.details["field"], "topics");
    }
    let err = admin
        .publish("big.one", json!("x".repeat(70_000)))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PayloadTooLarge);
    assert_eq!(
        admin
            .read_events(">", None, 0, 0)
            .await
            .unwrap_err()
            .details["field"],
        "limit"
    );
}

#[tokio::test]
async fn hundred_sse_subscribers_get_exactly_their_events_in_order() {
    let hub = Hub::start();
    let admin = hub.admin();
    let start = admin.status().await.unwrap().last_event_seq;
    let patterns = ["a.*", "a.>", "b.x", "app.>,b.*", "a.y.*"];
    let topics = ["a.x", "a.y.z", "b.x", "b.y", "app.k.l", "c"];
    let mut subs = Vec::new();
    for i in 0..100 {
        let p = patterns[i % patterns.len()];
        subs.push((p, admin.stream_events(p, Some(start), None).await.unwrap()));
    }
    let mut published = Vec::new();
    for i in 0..300 {
        let t = topics[i % topics.len()];
        published.push((admin.publish(t, json!(i)).await.unwrap().seq, t));
    }
    let mut tasks = Vec::new();
    for (p, mut s) in subs {
        let set = concord_core::topic::PatternSet::parse("t", Some(p)).unwrap();
        let expected: Vec<i64> = published
            .iter()
            .filter(|(_, t)| set.matches(t))
            .map(|(s, _)| *s)
            .collect();
        tasks.push(tokio::spawn(async move {
            let got = collect(&mut s, expected.len()).await;
            assert_eq!(
                got.iter().map(|e| e.seq).collect::<Vec<_>>(),
                expected,
                "pattern {p}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_subscriber_resumes_after_1000_events_without_gap_or_duplicate() {
    let hub = Hub::start();
    let admin = hub.admin();
    let start = admin.status().await.unwrap().last_event_seq;
    let mut s = admin.stream_events("r.>", Some(start), None).await.unwrap();
    for i in 0..10 {
        admin.publish("r.a", json!(i)).await.unwrap();
    }
    let first = collect(&mut s, 10).await;
    drop(s);
    let last_seen = first.last().unwrap().seq;
    for i in 10..1010 {
        admin
            .publish(if i % 2 == 0 { "r.a" } else { "r.b.c" }, json!(i))
            .await
            .unwrap();
    }
    // Last-Event-ID wins over ?from.
    let mut s = admin
        .stream_events("r.>", Some(0), Some(last_seen))
        .await
        .unwrap();
    let rest = collect(&mut s, 1000).await;
    let values: Vec<i64> = first
        .iter()
        .chain(rest.iter())
        .map(|e| e.data.as_i64().unwrap())
        .collect();
    assert_eq!(values, (0..1010).collect::<Vec<_>>());
    let seqs: Vec<i64> = rest.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

async fn metric(hub: &Hub, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", hub.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[tokio::test]
async fn a_stalled_subscriber_delays_nobody_and_disconnects_leak_nothing() {
    let hub = Hub::start();
    let admin = hub.admin();
    let start = admin.status().await.unwrap().last_event_seq;
    let base = metric(&hub, "concord_event_subscribers").await;
    // A client that opens a stream and never reads it.
    let stalled = reqwest::Client::new()
        .get(format!(
            "{}/v1/events/stream?topics=s.>&from={start}",
            hub.url
        ))
        .bearer_auth(&hub.admin)
        .send()
        .await
        .unwrap();
    let mut live = admin.stream_events("s.>", Some(start), None).await.unwrap();
    let blob = "x".repeat(4096);
    let n = 6000; // ~25 MB: far past socket buffers and the per-subscriber bus buffer
    let publisher = {
        let admin = admin.clone();
        let blob = blob.clone();
        tokio::spawn(async move {
            for i in 0..n {
                admin
                    .publish("s.data", json!({"i": i, "blob": blob}))
                    .await
                    .unwrap();
            }
        })
    };
    let got = collect(&mut live, n).await;
    publisher.await.unwrap();
    assert_eq!(got.last().unwrap().data["i"], n - 1);
    assert!(metric(&hub, "concord_event_subscribers").await >= base + 2.0);
    drop(stalled);
    drop(live);
    eventually(
        Duration::from_secs(10),
        "subscribers to go back down",
        || async { (metric(&hub, "concord_event_subscribers").await <= base).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn retention_expires_old_cursors_loudly() {
    let hub = Hub::start_with(&["--events-max-count", "20", "--retention-interval-ms", "100"]);
    let admin = hub.admin();
    for i in 0..60 {
        admin.publish("old.x", json!(i)).await.unwrap();
    }
    let err = eventually(Duration::from_secs(10), "retention to prune", || {
        let admin = admin.clone();
        async move { admin.read_events(">", Some(1), 10, 0).await.err() }
    })
    .await;
    assert_eq!(err.code, ErrorCode::CursorExpired);
    let mut s = admin.stream_events(">", Some(1), None).await.unwrap();
    match s.next().await.unwrap() {
        Some(StreamItem::Error(e)) => assert_eq!(e.code, ErrorCode::CursorExpired),
        other => panic!("expected cursor_expired, got {other:?}"),
    }
    assert_eq!(
        s.next().await.unwrap(),
        None,
        "the stream closes after cursor_expired"
    );
    // Without a cursor, reading starts at the oldest retained event.
    let page = admin.read_events(">", None, 100, 0).await.unwrap();
    assert!(!page.events.is_empty() && page.events.len() <= 60);
}

fn msg(to: &str, subject: &str, body: Value) -> SendMessageRequest {
    SendMessageRequest {
        to: to.into(),
        subject: subject.into(),
        body,
        thread_id: None,
        ack_required: true,
    }
}

#[tokio::test]
async fn messages_reach_every_kind_of_address_and_wait_for_acks() {
    let mut hub = Hub::start();
    let admin = hub.admin();
    let (p, ps) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let mut r = reg("sisters", Role::Secondary, Some("reviewer"));
    r.capabilities = vec!["review".into()];
    let (s, ss) = register(&admin, r).await;
    let mut r = reg("anvil", Role::Primary, Some("anvil main"));
    r.capabilities = vec!["review".into()];
    let (a, as_) = register(&admin, r).await;

    let to_primary = as_
        .send_message(&msg("primary:sisters", "ping", json!({"q": 1})))
        .await
        .unwrap();
    assert_eq!(to_primary.delivered_to, vec![p.instance.id.clone()]);
    let to_entity = as_
        .send_message(&msg("entity:sisters", "all", json!("hello")))
        .await
        .unwrap();
    let mut both = vec![p.instance.id.clone(), s.instance.id.clone()];
    both.sort();
    assert_eq!(to_entity.delivered_to, both);
    let to_cap = ps
        .send_message(&msg("cap:review", "review this", json!({"pr": 7})))
        .await
        .unwrap();
    let mut reviewers = vec![s.instance.id.clone(), a.instance.id.clone()];
    reviewers.sort();
    assert_eq!(to_cap.delivered_to, reviewers);
    let direct = ps
        .send_message(&SendMessageRequest {
            thread_id: Some(to_primary.thread_id.clone()),
            ..msg(&format!("instance:{}", a.instance.id), "pong", json!(2))
        })
        .await
        .unwrap();
    assert_eq!(direct.thread_id, to_primary.thread_id);
    let err = ps
        .send_message(&msg("entity:nobody", "x", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(
        ps.send_message(&msg("team:x", "x", json!(1)))
            .await
            .unwrap_err()
            .details["field"],
        "to"
    );

    // The primary's inbox: two messages, with provenance.
    let inbox = ps.inbox(0, 100, 0, false).await.unwrap();
    assert_eq!(
        inbox
            .messages
            .iter()
            .map(|m| m.subject.as_str())
            .collect::<Vec<_>>(),
        ["ping", "all"]
    );
    assert_eq!(
        inbox.messages[0].from.instance.as_deref(),
        Some(a.instance.id.as_str())
    );
    assert_eq!(inbox.messages[0].from.entity.as_deref(), Some("anvil"));
    // Unacked messages come back until acked.
    ps.ack(&inbox.messages[0].id).await.unwrap();
    let unacked = ps.inbox(0, 100, 0, true).await.unwrap();
    assert_eq!(unacked.messages.len(), 1);
    assert_eq!(unacked.messages[0].subject, "all");
    assert!(ps.inbox(0, 100, 0, false).await.unwrap().messages[0].acked);
    assert_eq!(
        ps.ack("msg_01ARZ3NDEKTSV4RRFFQ69G5FAV")
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    // Someone else's message cannot be acked.
    assert_eq!(
        ss.ack(&to_primary.id).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    // Only instances have inboxes.
    assert_eq!(
        admin.inbox(0, 10, 0, false).await.unwrap_err().code,
        ErrorCode::Forbidden
    );

    // A long-poll on the inbox wakes on delivery.
    let waiter = {
        let ss = ss.clone();
        let after = ss.inbox(0, 100, 0, false).await.unwrap().next;
        tokio::spawn(async move { ss.inbox(after, 100, 10_000, false).await })
    };
    as_.send_message(&msg(
        &format!("instance:{}", s.instance.id),
        "wake",
        json!(null),
    ))
    .await
    .unwrap();
    let woke = waiter.await.unwrap().unwrap();
    assert_eq!(woke.messages.len(), 1);
    assert_eq!(woke.messages[0].subject, "wake");

    // Inboxes survive a restart of the hub.
    hub.kill9();
    hub.spawn();
    let ps: Client = hub.admin().with_token(ps.token().unwrap().to_string());
    let again = ps.inbox(0, 100, 0, true).await.unwrap();
    assert_eq!(again.messages.len(), 1);
    assert_eq!(again.messages[0].subject, "all");
}

#[tokio::test]
async fn cli_publish_tail_send_inbox() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (p, _) = register(&admin, reg("cli", Role::Primary, Some("main"))).await;
    let from = admin.status().await.unwrap().last_event_seq.to_string();
    let out = hub.cli(&["publish", "cli.note", r#"{"n":1}"#, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = hub.cli(&["tail", "cli.*", "--from", &from, "--count", "1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["topic"], "cli.note");
    assert_eq!(ev["data"]["n"], 1);
    let out = hub.cli(&[
        "send",
        &format!("instance:{}", p.instance.id),
        "hello",
        "world",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(BIN)
        .args(["inbox", "--json", "--ack"])
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &p.session_token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["messages"][0]["body"], "world");
}
