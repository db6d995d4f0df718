//! What only PostgreSQL has: several hub replicas (two stores, two pools) on one
//! schema, the LISTEN/NOTIFY wake-up between them, concurrent migrations, and
//! losing the database and getting it back.

use crate::harness::*;
use crate::races;
use concord_core::api::Role;
use concord_core::token::TokenKind;
use concord_core::ErrorCode;
use concord_store::postgres::PostgresStore;
use concord_store::{DynStore, NewToken, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Two replicas on one fresh schema.
async fn replicas(test: &str) -> Option<(String, String, DynStore, DynStore)> {
    let url = pg_url(test)?;
    let schema = fresh_schema();
    let a = pg_store(&url, &schema).await;
    let b = pg_store(&url, &schema).await;
    Some((url, schema, a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn campaign_race_across_two_replicas() {
    let Some((url, schema, a, b)) = replicas("pg_only::campaign_race_across_two_replicas").await
    else {
        return;
    };
    races::campaign_race(vec![a, b]).await;
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_positions_become_visible_in_order_across_two_replicas() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::event_positions_become_visible_in_order_across_two_replicas").await
    else {
        return;
    };
    races::event_order(vec![a, b]).await;
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reapers_on_two_replicas_expire_each_instance_once() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::reapers_on_two_replicas_expire_each_instance_once").await
    else {
        return;
    };
    races::reaper_race(vec![a, b]).await;
    drop_schema(&url, &schema).await;
}

/// Waits until `store`'s commit watch reaches `seq`.
async fn watch_reaches(store: &DynStore, seq: i64, secs: u64) {
    let mut rx = store.watch_events();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while *rx.borrow_and_update() < seq {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the watch never reached {seq} (at {})",
            *rx.borrow()
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_hears_commits_of_another_replica() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::watch_hears_commits_of_another_replica").await
    else {
        return;
    };
    let mut rx = b.watch_events();
    let seen = *rx.borrow_and_update();
    for i in 0..20 {
        register(&a, "sisters", Role::Secondary, Some(&format!("pane {i}"))).await;
    }
    let last = a.last_event_seq().await.unwrap();
    assert!(last > seen);
    // Woken by NOTIFY (the periodic re-read would take seconds longer).
    let t0 = Instant::now();
    watch_reaches(&b, last, 10).await;
    eprintln!(
        "replica b heard seq {last} {:?} after the last commit",
        t0.elapsed()
    );
    assert_eq!(
        b.read_events(seen, 1000)
            .await
            .unwrap()
            .last()
            .map(|e| e.seq),
        Some(last)
    );
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once() {
    let Some(url) = pg_url("pg_only::replicas_starting_together_migrate_once") else {
        return;
    };
    let schema = fresh_schema();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (url, schema) = (url.clone(), schema.clone());
            tokio::spawn(async move { PostgresStore::connect_with(&url, Some(&schema), 2).await })
        })
        .collect();
    let mut stores = Vec::new();
    for s in starts {
        stores.push(s.await.unwrap().expect("every replica starts"));
    }
    let admin = pg_admin(&url).await;
    let row = admin
        .query_one(
            &format!("SELECT count(*), count(DISTINCT version) FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .unwrap();
    let (applied, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert!(applied >= 1);
    assert_eq!(applied, distinct, "each version applied once");
    let sequences: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_sequences WHERE schemaname = $1 AND sequencename = 'event_seq'",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sequences, 1);
    // And a later start finds everything in place.
    let again = PostgresStore::connect_with(&url, Some(&schema), 2)
        .await
        .unwrap();
    assert_eq!(again.last_event_seq().await.unwrap(), 0);
    drop(stores);
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_unavailable() {
    // Nothing listens on port 1: refused at once, reported as 503, not a hang.
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        PostgresStore::connect(
            "postgres://postgres@127.0.0.1:1/test",
            Some("t_unreachable"),
        ),
    )
    .await
    .expect("connect gives up in bounded time");
    let e = res.err().expect("cannot connect");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert!(
        e.message.starts_with("database unavailable"),
        "{}",
        e.message
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_names_are_checked() {
    for bad in ["Upper", "has space", "semi;colon", "pg_catalog", "", "1abc"] {
        let e = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", Some(bad))
            .await
            .err()
            .expect("refused");
        assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}: {e:?}");
    }
}

/// A TCP proxy in front of the database, to take it away and bring it back
/// without touching the real server (other tests share it).
struct Proxy {
    port: u16,
    target: String,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(port: u16, target: String) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let to = target.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) drops every open pipe:
            // to the store, the database has gone away.
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = to.clone();
                pipes.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while pipes.try_join_next().is_some() {}
            }
        });
        Proxy {
            port,
            target,
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        *self = Proxy::start(self.port, self.target.clone()).await;
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_the_database_going_away_and_coming_back() {
    let Some(url) = pg_url("pg_only::survives_the_database_going_away_and_coming_back") else {
        return;
    };
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => {
            eprintln!("!!! SKIPPED survives_the_database_going_away_and_coming_back: needs a TCP database URL !!!");
            return;
        }
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let mut proxy = Proxy::start(0, format!("{host}:{port}")).await;
    let user = cfg.get_user().unwrap_or("postgres");
    let mut via_proxy = format!(
        "host=127.0.0.1 port={} user={} dbname={}",
        proxy.port,
        quote(user),
        quote(cfg.get_dbname().unwrap_or(user))
    );
    if let Some(pw) = cfg.get_password() {
        via_proxy.push_str(&format!(
            " password={}",
            quote(&String::from_utf8_lossy(pw))
        ));
    }
    let schema = fresh_schema();
    let a: DynStore = Arc::new(
        PostgresStore::connect_with(&via_proxy, Some(&schema), 4)
            .await
            .expect("connect via proxy"),
    );
    let b = pg_store(&url, &schema).await;
    let inst = register(&a, "sisters", Role::Primary, Some("main"))
        .await
        .instance;
    let token = reader_token;

    // The database goes away: every kind of call answers 503, promptly.
    proxy.stop().await;
    let t0 = Instant::now();
    for e in [
        expect_err(a.list_tokens().await, ErrorCode::Unavailable),
        expect_err(
            a.create_token(token("while down")).await,
            ErrorCode::Unavailable,
        ),
        expect_err(a.heartbeat(&inst.id, "hub-a").await, ErrorCode::Unavailable),
        expect_err(
            a.campaign("sisters", &inst.id).await,
            ErrorCode::Unavailable,
        ),
    ] {
        assert!(
            e.message.starts_with("database unavailable"),
            "{}",
            e.message
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );

    // It comes back: the pool hands out fresh connections at once.
    proxy.restart().await;
    a.list_tokens().await.expect("reads work again");
    a.create_token(token("after"))
        .await
        .expect("writes work again");
    let hb = a
        .heartbeat(&inst.id, "hub-a")
        .await
        .expect("heartbeats work again");
    assert_eq!(hb.fence, Some(1));

    // And the listener has reconnected: another replica's commit reaches it.
    register(&b, "sisters", Role::Secondary, Some("from b")).await;
    let last = b.last_event_seq().await.unwrap();
    watch_reaches(&a, last, 30).await;

    drop(a);
    proxy.stop().await;
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_on_two_replicas_never_share_a_task() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::claimers_on_two_replicas_never_share_a_task").await
    else {
        return;
    };
    crate::queue::drain_race(vec![a, b], 2_000, 16).await;
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_the_claimers_end_across_two_replicas() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::claims_racing_the_claimers_end_across_two_replicas").await
    else {
        return;
    };
    crate::queue::end_race(vec![a.clone(), b.clone()]).await;
    crate::queue::dependency_race(vec![a, b]).await;
    drop_schema(&url, &schema).await;
}

/// A new reader token: a write that appends one event.
fn reader_token(name: &str) -> NewToken {
    let id = concord_core::ids::new_id(concord_core::ids::TOKEN);
    NewToken {
        secret_hash: format!("hash:{id}"),
        id,
        kind: TokenKind::Reader,
        entity: None,
        name: Some(name.into()),
        instance: None,
    }
}

/// Waits until the events table holds a row above `seq` (read directly, past
/// any horizon): the spawned write has committed.
async fn committed_above(admin: &tokio_postgres::Client, schema: &str, seq: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {schema}.events WHERE seq > $1"),
                &[&seq],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the write never committed");
        tokio::task::yield_now().await;
    }
}

/// Takes an event seq in `tx` the way the store does: the xid first.
async fn take_seq(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> i64 {
    tx.query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap();
    tx.query_one(&format!("SELECT nextval('{schema}.event_seq')"), &[])
        .await
        .unwrap()
        .get(0)
}

fn seqs(events: &[concord_core::api::Event]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

/// The delivery horizon (`postgres/horizon.rs`) against a transaction that takes
/// a seq and stays open, as a slow appender on a third replica would: the writes
/// committed after it are held back on both replicas (their writers wait, no
/// reader sees past the open seq), and once it commits everything is delivered in
/// order. Then the same with a transaction that rolls back: its seq is passed
/// over, and nothing waits for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_appender_holds_delivery_back_and_a_rolled_back_one_is_passed() {
    let Some((url, schema, a, b)) =
        replicas("pg_only::an_open_appender_holds_delivery_back_and_a_rolled_back_one_is_passed")
            .await
    else {
        return;
    };
    a.create_token(reader_token("before")).await.unwrap();
    let mut raw = pg_admin(&url).await;

    // A transaction takes a seq the way the store does (xid first) and stays open.
    let slow = raw.transaction().await.unwrap();
    let held = take_seq(&slow, &schema).await;
    let write = {
        let a = a.clone();
        tokio::spawn(async move { a.create_token(reader_token("after the open one")).await })
    };
    let admin = pg_admin(&url).await;
    committed_above(&admin, &schema, held).await;
    for (name, store) in [("a", &a), ("b", &b)] {
        assert!(
            store.read_events(held - 1, 10).await.unwrap().is_empty(),
            "replica {name} read past seq {held}, which an open transaction holds"
        );
        assert!(
            store.last_event_seq().await.unwrap() < held,
            "replica {name}"
        );
    }
    assert!(
        !write.is_finished(),
        "the write returned before its event could be read"
    );
    slow.execute(
        &format!(
            "INSERT INTO {schema}.events (seq, topic, time, source, data) \
             VALUES ($1, 'test.slow', 0, '{{}}', '{{}}')"
        ),
        &[&held],
    )
    .await
    .unwrap();
    slow.commit().await.unwrap();
    write.await.unwrap().unwrap();
    for (name, store) in [("a", &a), ("b", &b)] {
        let events = store.read_events(held - 1, 10).await.unwrap();
        assert_eq!(seqs(&events), vec![held, held + 1], "replica {name}");
        assert_eq!(events[0].topic, "test.slow");
        assert_eq!(store.last_event_seq().await.unwrap(), held + 1);
    }

    // A transaction takes a seq and rolls back: the seq is never delivered, and
    // the writes after it go through once it has ended.
    let doomed = raw.transaction().await.unwrap();
    let lost = take_seq(&doomed, &schema).await;
    let write = {
        let b = b.clone();
        tokio::spawn(async move { b.create_token(reader_token("after the lost one")).await })
    };
    committed_above(&admin, &schema, lost).await;
    assert!(a.read_events(lost - 1, 10).await.unwrap().is_empty());
    doomed.rollback().await.unwrap();
    write.await.unwrap().unwrap();
    for (name, store) in [("a", &a), ("b", &b)] {
        let mut events = store.read_events(lost - 1, 10).await.unwrap();
        if events.is_empty() {
            // Replica a learns of b's commit by NOTIFY; a fresh round may still
            // be waiting out the rolled-back transaction's gap.
            watch_reaches(store, lost + 1, 10).await;
            events = store.read_events(lost - 1, 10).await.unwrap();
        }
        assert_eq!(seqs(&events), vec![lost + 1], "replica {name}");
    }
    drop(raw);
    drop_schema(&url, &schema).await;
}
