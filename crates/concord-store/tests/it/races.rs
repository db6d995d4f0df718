//! Concurrency invariants under real concurrency (DESIGN §11): spawned tasks on a
//! multi-threaded runtime, released together by a barrier. The bodies take a list
//! of stores so that PostgreSQL runs them again across two replicas (`pg_only`).

use crate::harness::*;
use concord_core::api::{InstanceState, Role};
use concord_core::token::TokenKind;
use concord_core::{ids, ErrorCode};
use concord_store::{topics, DynStore, NewToken};
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Barrier;

conformance!(
    campaign_race_has_one_winner_per_round,
    event_positions_become_visible_in_order,
    reapers_expire_each_instance_once
);

async fn campaign_race_has_one_winner_per_round(store: DynStore) {
    campaign_race(vec![store]).await;
}

async fn event_positions_become_visible_in_order(store: DynStore) {
    event_order(vec![store]).await;
}

async fn reapers_expire_each_instance_once(store: DynStore) {
    reaper_race(vec![store]).await;
}

const CAMPAIGNERS: usize = 50;
const ROUNDS: usize = 5;

/// 50 instances of one entity campaign at the same instant, five rounds, the
/// winner resigning between rounds: exactly one grant per round, every loser told
/// who holds it, and the epoch up by exactly one each round.
pub async fn campaign_race(stores: Vec<DynStore>) {
    let entity = "racers";
    let mut ids = Vec::new();
    for i in 0..CAMPAIGNERS {
        let store = &stores[i % stores.len()];
        ids.push(
            register(store, entity, Role::Secondary, Some(&format!("racer {i}")))
                .await
                .instance
                .id,
        );
    }
    let before = stores[0].last_event_seq().await.unwrap();
    let mut last_epoch = 0;
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(CAMPAIGNERS));
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (store, barrier, id) = (
                    stores[i % stores.len()].clone(),
                    barrier.clone(),
                    id.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    let result = store.campaign(entity, &id).await;
                    (id, result)
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for t in tasks {
            let (id, result) = t.await.unwrap();
            match result {
                Ok(grant) => won.push((id, grant)),
                Err(e) => lost.push((id, e)),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one winner, got {won:?}"
        );
        let (winner, grant) = won.pop().unwrap();
        assert_eq!(grant.instance, winner);
        assert_eq!(
            grant.epoch,
            last_epoch + 1,
            "round {round}: one grant, one epoch step"
        );
        assert_eq!(grant.fence, grant.epoch);
        for (id, e) in &lost {
            assert_eq!(e.code, ErrorCode::PrimaryHeld, "{id}: {e:?}");
            assert_eq!(e.details["holder"], winner.as_str());
        }
        for store in &stores {
            assert_eq!(
                store.entity_epoch(entity).await.unwrap(),
                (grant.epoch, Some(winner.clone()))
            );
        }
        last_epoch = grant.epoch;
        stores[round % stores.len()]
            .resign(entity, Some(&winner))
            .await
            .unwrap();
        winners.push(winner);
    }
    let grants: Vec<u64> = events_after(&stores[0], before)
        .await
        .into_iter()
        .filter(|e| e.topic == topics::PRIMARY_GRANTED)
        .map(|e| e.data["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(
        grants,
        (1..=ROUNDS as u64).collect::<Vec<_>>(),
        "one grant event per round"
    );
}

const WRITERS_PER_STORE: usize = 6;
const WRITES_PER_WRITER: usize = 40;

/// Many concurrent appenders on every store while a reader on every store polls
/// `read_events(cursor)`: each poll must continue exactly at cursor + 1 with no
/// gap. A position that became visible only after a higher one had been read
/// (a late back-fill) would show up as a gap and fail the test.
pub async fn event_order(stores: Vec<DynStore>) {
    let start = stores[0].last_event_seq().await.unwrap();
    let total = stores.len() * WRITERS_PER_STORE * WRITES_PER_WRITER;
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(stores.len() * (WRITERS_PER_STORE + 1)));

    let readers: Vec<_> = stores
        .iter()
        .map(|store| {
            let (store, done, barrier) = (store.clone(), done.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut cursor = start;
                let mut polls = 0usize;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let batch = store.read_events(cursor, 64).await.unwrap();
                    polls += 1;
                    for e in &batch {
                        assert_eq!(e.seq, cursor + 1, "poll after {cursor} skipped to {}: a position became visible out of order", e.seq);
                        cursor = e.seq;
                    }
                    if finished && batch.is_empty() {
                        return (cursor, polls);
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();

    let writers: Vec<_> = (0..stores.len() * WRITERS_PER_STORE)
        .map(|w| {
            let (store, barrier) = (stores[w % stores.len()].clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for _ in 0..WRITES_PER_WRITER {
                    let id = ids::new_id(ids::TOKEN);
                    let token = NewToken {
                        secret_hash: format!("hash:{id}"),
                        id,
                        kind: TokenKind::Reader,
                        entity: None,
                        name: Some(format!("writer {w}")),
                        instance: None,
                    };
                    store.create_token(token).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let end = start + total as i64;
    for r in readers {
        let (cursor, polls) = r.await.unwrap();
        assert_eq!(cursor, end, "every appended event was read");
        assert!(polls > 1);
    }
    assert_eq!(stores[0].last_event_seq().await.unwrap(), end);
    let events = events_after(&stores[0], start).await;
    assert_eq!(events.len(), total);
    assert!(events.iter().all(|e| e.topic == topics::TOKEN_CREATED));
    let unique: HashSet<&str> = events
        .iter()
        .map(|e| e.data["id"].as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), total, "each write appended its own event");
}

const DUE: usize = 24;
const REAPERS_PER_STORE: usize = 3;

/// Reapers on every store at once over the same lapsed instances: each instance
/// is expired by exactly one of them, and announced exactly once.
pub async fn reaper_race(stores: Vec<DynStore>) {
    let mut due = BTreeSet::new();
    let mut lease_end = 0;
    for i in 0..DUE {
        let store = &stores[i % stores.len()];
        // The first instance of each entity is its primary: reaping must release it.
        let role = if i < 6 {
            Role::Primary
        } else {
            Role::Secondary
        };
        let entity = format!("reaped{}", i % 6);
        let reg = register_with(store, request(&entity, role, Some("short-lived")), 1_000)
            .await
            .instance;
        lease_end = lease_end.max(reg.lease_until.millis());
        due.insert(reg.id);
    }
    let keeper = register(&stores[0], "reaped0", Role::Secondary, Some("long-lived"))
        .await
        .instance;
    wait_until_past(&stores[0], lease_end).await;
    let before = stores[0].last_event_seq().await.unwrap();

    let barrier = Arc::new(Barrier::new(stores.len() * REAPERS_PER_STORE));
    let reapers: Vec<_> = (0..stores.len() * REAPERS_PER_STORE)
        .map(|r| {
            let (store, barrier) = (stores[r % stores.len()].clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut mine = Vec::new();
                loop {
                    let batch = store.expire_due(5).await.unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|i| {
                        assert_eq!(i.state, InstanceState::Expired);
                        i.id
                    }));
                }
            })
        })
        .collect();
    let mut expired = Vec::new();
    for r in reapers {
        expired.extend(r.await.unwrap());
    }
    let unique: BTreeSet<String> = expired.iter().cloned().collect();
    assert_eq!(unique.len(), expired.len(), "no instance was expired twice");
    assert_eq!(unique, due, "every lapsed instance was expired");
    let announced: Vec<String> = events_after(&stores[0], before)
        .await
        .into_iter()
        .filter(|e| e.topic == topics::INSTANCE_EXPIRED)
        .map(|e| e.data["instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        announced.len(),
        DUE,
        "one sys.instance.expired per instance"
    );
    assert_eq!(announced.into_iter().collect::<BTreeSet<_>>(), due);
    assert_eq!(
        stores[0]
            .get_instance(&keeper.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        InstanceState::Live
    );
    for e in 0..6 {
        assert_eq!(
            stores[0]
                .entity_epoch(&format!("reaped{e}"))
                .await
                .unwrap()
                .1,
            None
        );
    }
}
