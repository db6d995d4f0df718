//! The event log: order, paging, the commit watch, the clock.

use crate::harness::*;
use concord_core::api::Role;
use concord_store::DynStore;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

conformance!(
    write_stats_count_commits_operations_and_time,
    read_events_in_seq_order_with_limit,
    watch_events_advances_after_a_write,
    now_ms_is_the_store_clock
);

/// The counters behind `/metrics`' store figures move with each write, and a
/// write that fails carries no operation.
async fn write_stats_count_commits_operations_and_time(store: DynStore) {
    use std::sync::atomic::Ordering::Relaxed;
    let read = |s: &DynStore| {
        let w = s.write_stats();
        (
            w.commits.load(Relaxed),
            w.operations.load(Relaxed),
            w.busy_us.load(Relaxed),
            w.commit_us.load(Relaxed),
        )
    };
    let before = read(&store);
    for i in 0..5 {
        register(
            &store,
            "counted",
            Role::Secondary,
            Some(&format!("pane {i}")),
        )
        .await;
    }
    let after = read(&store);
    // One after another: each its own transaction, on either backend.
    assert_eq!(after.0 - before.0, 5, "commits");
    assert_eq!(after.1 - before.1, 5, "operations");
    assert!(after.2 > before.2, "time in transactions");
    assert!(after.3 > before.3, "time in commits");
    assert!(
        after.3 - before.3 <= after.2 - before.2,
        "commit time is part of the transaction's"
    );

    // A write the store refuses: closing an instance that does not exist.
    assert!(store.close_instance("ins_missing", &admin()).await.is_err());
    let refused = read(&store);
    assert_eq!(refused.1, after.1, "a refused write carries no operation");
}

async fn read_events_in_seq_order_with_limit(store: DynStore) {
    let start = store.last_event_seq().await.unwrap();
    for i in 0..6 {
        register(
            &store,
            "sisters",
            Role::Secondary,
            Some(&format!("pane {i}")),
        )
        .await;
    }
    let all = events_after(&store, start).await;
    assert_eq!(all.len(), 6);
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (start + 1..=start + 6).collect::<Vec<_>>(),
        "gap-free, in order"
    );
    assert_eq!(store.last_event_seq().await.unwrap(), start + 6);
    assert!(all.windows(2).all(|w| w[0].time <= w[1].time));

    let page = store.read_events(start + 2, 3).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [start + 3, start + 4, start + 5]
    );
    assert_eq!(page[0], all[2]);
    assert!(store.read_events(start + 6, 10).await.unwrap().is_empty());
    assert!(store.read_events(start, 0).await.unwrap().is_empty());
    assert_eq!(
        store.read_events(-1, 1).await.unwrap()[0].seq,
        1,
        "the log starts at 1"
    );
}

async fn watch_events_advances_after_a_write(store: DynStore) {
    let mut rx = store.watch_events();
    let seen = *rx.borrow_and_update();
    assert_eq!(seen, store.last_event_seq().await.unwrap());
    register(&store, "sisters", Role::Secondary, Some("pane")).await;
    let last = store.last_event_seq().await.unwrap();
    assert!(last > seen);
    // Updated before the write was acknowledged: no waiting needed.
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), last);

    // A waiting reader is woken by the next commit.
    let store2 = store.clone();
    let waiter = tokio::spawn(async move {
        rx.changed().await.unwrap();
        *rx.borrow()
    });
    store2.bootstrap_admin("hash:admin", false).await.unwrap(); // no event: does not wake
    register(&store2, "sisters", Role::Secondary, Some("pane 2")).await;
    let woke = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert!(woke > last);
}

async fn now_ms_is_the_store_clock(store: DynStore) {
    let a = store.now_ms().await.unwrap();
    let b = store.now_ms().await.unwrap();
    assert!(b >= a, "the clock does not go back");
    let local = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (a - local).abs() < 60_000,
        "store clock {a} vs local {local}: same machine, same time"
    );
    let reg = register(&store, "sisters", Role::Secondary, Some("pane")).await;
    let c = store.now_ms().await.unwrap();
    assert!(reg.instance.registered_at.millis() >= b && reg.instance.registered_at.millis() <= c);
}
